//! Hears a Valkey process die the moment it does, instead of at the next probe: an idle TCP
//! connection to it is closed by the kernel when the process dies (kill -9 included), so a
//! read that ends means "probe now". One watches the local Valkey (its agent reports it
//! gone at once), one the master a replica follows (its agent reports the link down, and so
//! its final offset, at once). A connection cut by the network never ends this way; the
//! probes and timeouts handle that as before.

use std::{sync::Arc, time::Duration};

use tokio::{io::AsyncReadExt, net::TcpStream, sync::watch};
use valkey_proto::v1::Role;

use crate::snapshot::{Shared, Snapshot};

/// After a close, probes at once and again after these delays: the replica's Valkey reads
/// the same close from its own socket, and may not have done so by the first probe.
const REPROBES_MS: [u64; 3] = [2, 5, 15];

/// How often a vigil with nothing to watch looks again.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// How often a vigil checks that what it watches is still what it should (a replica pointed
/// at a new master by a switchover must watch the new one before it can die).
const RETARGET_POLL: Duration = Duration::from_millis(20);

/// Watches `target()` for as long as the agent runs; `retry` paces reconnections (the probe
/// interval: while the process is down, the probes are what report it). `heard` is told of a
/// close from the other side (`Some(address)`), and of each connection made (`None`).
async fn watch_addr(
    shared: Arc<Shared>,
    retry: Duration,
    target: impl Fn() -> Option<(String, u16)>,
    heard: impl Fn(&Shared, Option<(String, u16)>),
) {
    let mut buf = [0u8; 64];
    loop {
        let Some((host, port)) = target() else {
            // Cheap (a look at the latest report), and a replica just pointed at its master
            // is watched within milliseconds: it may acknowledge writes at once.
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        };
        let connect = TcpStream::connect((host.as_str(), port));
        let Ok(Ok(mut stream)) = tokio::time::timeout(retry, connect).await else {
            tokio::time::sleep(retry).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        heard(&shared, None);
        let closed = loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {}
                },
                () = tokio::time::sleep(RETARGET_POLL) => {
                    if target().as_ref().is_none_or(|(h, p)| *h != host || *p != port) {
                        break false;
                    }
                }
            }
        };
        if closed {
            heard(&shared, Some((host.clone(), port)));
            shared.probe_now.notify_one();
            for ms in REPROBES_MS {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                shared.probe_now.notify_one();
            }
            // Closed for another reason (a client kill, an idle timeout): not in a loop.
            tokio::time::sleep(retry).await;
        }
    }
}

/// Watches the local Valkey at `host`:`port`.
pub async fn local(shared: Arc<Shared>, retry: Duration, host: String, port: u16) {
    let target = move || Some((host.clone(), port));
    watch_addr(shared, retry, target, |_, _| {}).await;
}

/// Watches the master the local replica follows, per the latest report, linked or not (a
/// replica still in its first sync acknowledges writes too). A close is recorded in
/// [`Shared::master_closed`], which marks the next reports' offsets as final, until the
/// master answers again.
pub async fn master(
    shared: Arc<Shared>,
    retry: Duration,
    snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let target = move || {
        let snapshot = snapshots.borrow();
        let data = snapshot.report.data.as_ref()?;
        let port = u16::try_from(data.master_port).ok()?;
        (data.role() == Role::Replica && port > 1).then(|| (data.master_host.clone(), port))
    };
    watch_addr(shared, retry, target, Shared::set_master_closed).await;
}
