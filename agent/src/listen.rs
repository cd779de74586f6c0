//! The agent's own listening ports (gRPC health and AgentState; metrics) are reachable from
//! the pod network: each has a cap on connections, with the oldest connection of the busiest
//! address closed for each new one beyond it, and an idle timeout. The process's descriptor
//! limit is raised to its hard limit at start, so that what the listeners may hold leaves the
//! failover path (the Valkey connections, the state file, the controller stream) its reserve.

use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};
use valkey_netguard::{Gate, GateLimits, Guarded};

/// How long a connection to an agent port may go with no byte either way: longer than any
/// scrape interval in common use, so that a Prometheus keeps its connection.
pub const IDLE: Duration = Duration::from_secs(90);

/// Connections at once to the gRPC port (kubelet probes, the controller's state reads).
pub const GRPC_CONNECTIONS: usize = 64;

/// Connections at once to the metrics port (scrapers).
pub const METRICS_CONNECTIONS: usize = 16;

/// Descriptors the agent keeps for itself beyond what its listeners may hold.
pub const RESERVE: u64 = 256;

fn limits(connections: usize) -> GateLimits {
    GateLimits {
        // Evicted connections close within a poll; room for them until they do.
        max_open: connections * 2,
        max_unproven: connections,
        deadline: None,
        budget: None,
        idle: Some(IDLE),
    }
}

/// The connections of `listener`, held to a cap of `connections` and the idle timeout.
pub fn gated(
    listener: TcpListener,
    connections: usize,
) -> impl Stream<Item = Result<Guarded<TcpStream>, std::io::Error>> {
    valkey_netguard::incoming(listener, Gate::new(limits(connections)))
}

/// Raises the soft descriptor limit to the hard one, and warns when even that leaves less
/// than the listeners may hold plus the reserve.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        warn!(soft, hard, "cannot raise the descriptor limit");
    }
    let now = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft);
    let listeners = 2 * (GRPC_CONNECTIONS + METRICS_CONNECTIONS) as u64;
    if now < listeners + RESERVE {
        warn!(
            limit = now,
            needed = listeners + RESERVE,
            "the descriptor limit is low: a flood of the agent's ports may starve failover"
        );
    } else {
        info!(limit = now, "descriptor limit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    /// Whether the server closed `stream` (EOF or reset) within a while.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn beyond_the_cap_the_busiest_address_loses_its_oldest_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(gated(listener, 4));
        // The server side of each connection is held, as a server would while serving it.
        let (tx, mut held) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(mut conn)) = accepted.next().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 16];
                    let _ = tx.send(());
                    // Reads until the guard fails the connection, then drops it.
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        // A scraper from 127.0.0.1, then a flood from 127.0.0.2.
        let mut scraper = TcpStream::connect(addr).await.unwrap();
        held.recv().await.unwrap();
        let mut flood = Vec::new();
        for _ in 0..20 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            flood.push(socket.connect(addr).await.unwrap());
            held.recv().await.unwrap();
        }
        // The flood's first ones were closed for its later ones; the scraper was not.
        assert!(closed(&mut flood[0]).await, "the flood kept its oldest");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), scraper.read(&mut [0u8; 1]))
                .await
                .is_err(),
            "the scraper was closed for the flood"
        );
    }
}
