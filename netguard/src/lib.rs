//! What a client that has not proven who it is may cost a listener: connection slots, with the
//! oldest connection of the busiest address closed to make room; a deadline and a byte budget
//! until it proves itself; an idle timeout; and log lines about it at a bounded rate with its
//! fields escaped. The controller's agent hub and the agent's own ports share it, so that a
//! flood of connections from the pod network can neither use up a process's file descriptors
//! nor keep out the clients failover depends on.

mod gate;
mod guarded;
mod log;

pub use gate::{Admission, Gate, GateLimits};
pub use guarded::{ConnInfo, Guarded, Turn};
pub use log::{Throttle, untrusted};

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// A listener's accept loop, through its gate: the next connection that gets a slot, with
/// the accepts that fail (out of file descriptors, say) retried after a pause and the
/// connections refused for want of a slot closed at once; both logged at a bounded rate.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    gate: Arc<Gate>,
    refused: Throttle,
    failed: Throttle,
}

impl Acceptor {
    pub fn new(listener: TcpListener, gate: Arc<Gate>) -> Self {
        Self {
            listener,
            gate,
            refused: Throttle::default(),
            failed: Throttle::default(),
        }
    }

    /// The next admitted connection, its peer and its slot.
    pub async fn next(&mut self) -> (TcpStream, SocketAddr, Admission) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    if let Some(failed) = self.failed.hit() {
                        warn!(error = %err, failed, "accept failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(admission) = self.gate.admit(peer.ip()) else {
                if let Some(refused) = self.refused.hit() {
                    warn!(
                        refused,
                        "every connection slot is taken; closing new connections"
                    );
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            return (stream, peer, admission);
        }
    }
}

/// The plain TCP connections of `listener`, each admitted by `gate` and guarded by it.
pub fn incoming(
    listener: TcpListener,
    gate: Arc<Gate>,
) -> impl Stream<Item = Result<Guarded<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut acceptor = Acceptor::new(listener, gate);
        loop {
            let (stream, _, admission) = acceptor.next().await;
            if tx.send(Ok(admission.guard(stream))).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(idle: Duration) -> GateLimits {
        GateLimits {
            max_open: 8,
            max_unproven: 8,
            deadline: None,
            budget: None,
            idle: Some(idle),
        }
    }

    /// Echoes every connection of `gate` on a new listener; returns its address.
    async fn echo(gate: Arc<Gate>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(incoming(listener, gate));
        tokio::spawn(async move {
            while let Some(Ok(mut conn)) = accepted.next().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        if conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_talking_one_is_kept() {
        let gate = Gate::new(limits(Duration::from_millis(600)));
        let addr = echo(gate.clone()).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut talking = TcpStream::connect(addr).await.unwrap();
        let started = tokio::time::Instant::now();
        // The talking one says something every 200 ms, three times the idle timeout long.
        let mut buf = [0u8; 8];
        while started.elapsed() < Duration::from_millis(1800) {
            talking.write_all(b"ping").await.unwrap();
            talking.read_exact(&mut buf[..4]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            idle.read(&mut buf).await.unwrap_or(0),
            0,
            "the idle one was kept"
        );
        assert_eq!(gate.open(), 1, "only the talking one is held");
    }

    #[tokio::test]
    async fn a_proven_connection_leaves_the_unproven_ones_and_is_never_evicted() {
        let gate = Gate::new(GateLimits {
            max_unproven: 1,
            ..limits(Duration::from_secs(60))
        });
        let peer: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let agent = gate.admit(peer).unwrap();
        agent.conn.prove();
        let first = gate.admit(peer).unwrap();
        assert_eq!(gate.unproven(), 1);
        let second = gate.admit(peer).unwrap();
        assert!(
            !agent.unproven.is_evicted(),
            "a proven connection was evicted"
        );
        assert!(first.unproven.is_evicted() && !second.unproven.is_evicted());
        assert_eq!(gate.open(), 3);
    }
}
