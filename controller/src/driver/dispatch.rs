//! Dispatch: what the hot path keeps between passes to send commands sensibly. One command in
//! flight per pod, SENTINEL RESET and SENTINEL FAILOVER not repeated too soon, command ids
//! nobody can guess, and whether a planned switchover is running. [`super::Handle`] sends
//! through it.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use valkey_proto::v1::command::Action;

/// How long a sentinel is left alone after a SENTINEL RESET, to learn its peers and replicas.
const RESET_QUIET: Duration = Duration::from_secs(30);

/// How often a sentinel may be asked to fail over the same master.
const FAILOVER_RETRY: Duration = Duration::from_secs(1);

/// How long a node restarted for refused credentials is left to come back before it may be
/// restarted again.
pub const RESTART_QUIET: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Dispatch {
    /// Distinguishes this process's command ids from a previous one's (agents answer a
    /// repeated id from their cache without acting).
    session: String,
    ids: AtomicU64,
    /// Pods with a command in flight.
    busy: Mutex<HashSet<String>>,
    /// When each (action, pod) that must not be repeated soon was last done.
    quiet: Mutex<HashMap<(&'static str, String), Instant>>,
    /// A planned switchover is being carried out right now: the decisions wait for it.
    switchover: AtomicBool,
}

impl Default for Dispatch {
    fn default() -> Self {
        use rand::RngExt;
        Dispatch {
            session: format!("{:08x}", rand::rng().random::<u32>()),
            ids: AtomicU64::new(0),
            busy: Mutex::default(),
            quiet: Mutex::default(),
            switchover: AtomicBool::new(false),
        }
    }
}

impl Dispatch {
    /// A command id: readable in logs, and with 64 random bits that nobody can guess from
    /// the ones before it.
    pub fn next_id(&self, epoch: u64) -> String {
        use rand::RngExt;
        format!(
            "{}-e{epoch}-{}-{:016x}",
            self.session,
            self.ids.fetch_add(1, Ordering::Relaxed),
            rand::rng().random::<u64>()
        )
    }

    /// True, and remembered, unless `what` was done to `pod` less than `quiet` ago.
    pub fn not_done_lately(&self, what: &'static str, pod: &str, quiet: Duration) -> bool {
        let mut done = self.quiet.lock().unwrap_or_else(|e| e.into_inner());
        let key = (what, pod.to_owned());
        if done.get(&key).is_some_and(|t| t.elapsed() < quiet) {
            return false;
        }
        done.insert(key, Instant::now());
        true
    }

    /// Whether `action` may go to `pod` now: not a throttled Sentinel command sent lately,
    /// and no other command in flight there (then the pod is claimed until [`Self::done`]).
    pub fn claim(&self, pod: &str, action: &Action) -> bool {
        if matches!(action, Action::SentinelReset(_))
            && !self.not_done_lately("reset", pod, RESET_QUIET)
        {
            return false;
        }
        // Refused while Sentinel has no good replica yet: asked again once a second.
        if matches!(action, Action::SentinelFailover(_))
            && !self.not_done_lately("failover", pod, FAILOVER_RETRY)
        {
            return false;
        }
        self.busy
            .lock()
            .map(|mut busy| busy.insert(pod.to_owned()))
            .unwrap_or(false)
    }

    /// The command claimed for `pod` is done.
    pub fn done(&self, pod: &str) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(pod);
        }
    }

    /// A planned switchover starts (true) or ends (false).
    pub fn set_switchover(&self, running: bool) {
        self.switchover.store(running, Ordering::SeqCst);
    }

    pub fn switchover_running(&self) -> bool {
        self.switchover.load(Ordering::SeqCst)
    }
}
