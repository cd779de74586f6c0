//! What a client of the hub may cost before and after it authenticates: connection slots, a
//! deadline and a byte budget for getting a Hello accepted, streams per connection, message
//! sizes, HTTP/2 keepalive, and how long an authenticated stream may stay silent. Anyone on
//! the pod network can reach the hub; only a valid token buys more than a few KiB and seconds.

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
pub use valkey_netguard::{ConnInfo, Gate, GateLimits};

use super::Hub;
use crate::hub::tls::ServerCert;

/// The hub's limits; `Limits::default()` is what both runtimes use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections, authenticated or not. Each agent holds one.
    pub max_connections: usize,
    /// Connections that have not yet had a Hello accepted, each with at most one stream
    /// saying hello; beyond it, for each new one, the oldest of them from the address that
    /// holds the most is closed, so that unauthenticated clients can neither use up the
    /// controller's file descriptors nor keep an agent out.
    pub max_unauthenticated: usize,
    /// From accept to an accepted Hello (TLS, HTTP/2, the Hello and its token check).
    pub auth_deadline: Duration,
    /// Bytes a connection may send before its Hello is accepted.
    pub unauthenticated_bytes: u64,
    /// Streams at once on one connection (an agent uses one).
    pub streams_per_connection: u32,
    /// Hellos whose token is being checked at once, over all connections (in a cluster, each
    /// check is a TokenReview). Taken only once a Hello has arrived, so a client that sends
    /// none holds no check.
    pub concurrent_checks: usize,
    /// The largest message the hub decodes (a report is a few KiB).
    pub max_message: usize,
    /// HTTP/2 pings on an idle connection, and how long an answer may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// The HTTP/2 flow-control windows: what a peer may send before the hub reads it.
    pub window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_unauthenticated: 256,
            auth_deadline: Duration::from_secs(10),
            unauthenticated_bytes: 64 * 1024,
            streams_per_connection: 4,
            concurrent_checks: 64,
            max_message: 1024 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            window: 256 * 1024,
        }
    }
}

impl Limits {
    /// What the hub's connection gate admits.
    pub fn gate(&self) -> GateLimits {
        GateLimits {
            max_open: self.max_connections,
            max_unproven: self.max_unauthenticated,
            deadline: Some(self.auth_deadline),
            budget: Some(self.unauthenticated_bytes),
            // Authenticated streams are watched by HTTP/2 keepalive and their heartbeats.
            idle: None,
        }
    }
}

/// Serves `hub` on `listener`, TLS only with `cert`, within the default limits, until the
/// listener fails for good. Both runtimes (and the tests' cluster) serve the hub through this.
pub async fn serve(
    hub: &Hub,
    listener: TcpListener,
    cert: Arc<ServerCert>,
) -> Result<(), tonic::transport::Error> {
    let limits = Limits::default();
    let gate = Gate::new(limits.gate());
    serve_gated(hub, listener, cert, &limits, gate).await
}

/// [`serve`] within `limits`, through `gate` (made from them), which the caller may watch.
pub async fn serve_gated(
    hub: &Hub,
    listener: TcpListener,
    cert: Arc<ServerCert>,
    limits: &Limits,
    gate: Arc<Gate>,
) -> Result<(), tonic::transport::Error> {
    let service = hub
        .server()
        .max_decoding_message_size(limits.max_message)
        .max_encoding_message_size(limits.max_message);
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .initial_stream_window_size(limits.window)
        .initial_connection_window_size(limits.window)
        .add_service(service)
        .serve_with_incoming(crate::hub::tls::incoming(listener, cert, gate))
        .await
}
