//! What the watcher last saw of the local process (`Snapshot`), and the state the executor, the
//! lease, the clients' mover and the watcher share (`Shared`): its own module, so that those
//! modules depend on it rather than on each other.

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::Notify;
use valkey_proto::v1::StateReport;

/// The latest observation, with counters that tell consumers what kind of change it was.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub report: StateReport,
    /// Bumped when something a failover decision depends on changed (role, link, process ...).
    pub significant: u64,
    /// Bumped on any change but the clock's (offsets, lag, key counts too).
    pub revision: u64,
}

/// State the command executor shares with the watcher.
#[derive(Debug, Default)]
pub struct Shared {
    /// Unix ms until which this agent has paused writes (0: not paused).
    pub paused_until_ms: AtomicI64,
    /// Asks for a probe right away (after a command changed something).
    pub probe_now: Notify,
    /// When this node stopped being master: its clients are moved off.
    pub demotions: crate::clients::Demotions,
    /// The master's write lease (see [`crate::lease`]).
    pub lease: crate::lease::Lease,
    /// The master (host, port) whose connection [`crate::vigil`] heard closed from its side,
    /// until it reconnects to it.
    pub master_closed: std::sync::Mutex<Option<(String, u16)>>,
}

impl Shared {
    pub fn writes_paused(&self) -> bool {
        self.paused_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Records that the connection to the master at `host`:`port` was closed from its side
    /// (`Some`), or that it answers again (`None`).
    pub fn set_master_closed(&self, closed: Option<(String, u16)>) {
        if let Ok(mut slot) = self.master_closed.lock() {
            *slot = closed;
        }
    }

    /// Whether the connection to the master at `host`:`port` was heard closed from its side.
    pub fn master_close_heard(&self, host: &str, port: u32) -> bool {
        self.master_closed.lock().is_ok_and(|slot| {
            slot.as_ref()
                .is_some_and(|(h, p)| h == host && u32::from(*p) == port)
        })
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
