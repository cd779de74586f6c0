//! Prometheus metrics of the agent (probe latency, local role, reports sent, commands executed
//! and refused), served as OpenMetrics text on `/metrics`.

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric the agent keeps; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub probe_latency: Histogram,
    pub probe_failures: Counter,
    pub role: Family<RoleLabel, Gauge>,
    pub messages_sent: Family<KindLabel, Counter>,
    pub commands: Family<CommandLabel, Counter>,
    pub controller_connected: Gauge,
    /// The local Valkey's replication offset (the controller's status carries it only every
    /// 30 s).
    pub repl_offset: Gauge,
    /// When the certificate the local process serves expires (Unix seconds; 0 without TLS).
    pub tls_cert_expiry: Gauge,
    /// Certificate reloads handed to the local process.
    pub tls_reloads: Counter,
}

/// Roles the role gauge knows, so exactly one of them reads 1.
pub const ROLES: [&str; 5] = ["master", "replica", "sentinel", "down", "unknown"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("valkey_agent");
        let probe_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let probe_failures = Counter::default();
        let role = Family::<RoleLabel, Gauge>::default();
        let messages_sent = Family::<KindLabel, Counter>::default();
        let commands = Family::<CommandLabel, Counter>::default();
        let controller_connected = Gauge::default();
        let repl_offset = Gauge::default();
        let tls_cert_expiry = Gauge::default();
        let tls_reloads = Counter::default();
        registry.register(
            "tls_cert_expiry_timestamp_seconds",
            "When the certificate the local Valkey or Sentinel serves expires, in Unix seconds",
            tls_cert_expiry.clone(),
        );
        registry.register(
            "tls_reloads",
            "Renewed certificates handed to the local Valkey or Sentinel without a restart",
            tls_reloads.clone(),
        );
        registry.register(
            "repl_offset",
            "The local Valkey's replication offset, as last observed",
            repl_offset.clone(),
        );
        registry.register(
            "probe_latency_seconds",
            "Round trip of probes of the local Valkey or Sentinel",
            probe_latency.clone(),
        );
        registry.register(
            "probe_failures",
            "Probes that got no good answer",
            probe_failures.clone(),
        );
        registry.register(
            "role",
            "The local process's role (1 for the current one)",
            role.clone(),
        );
        registry.register(
            "messages_sent",
            "Messages sent to the controller, by kind (report, heartbeat, result)",
            messages_sent.clone(),
        );
        registry.register(
            "commands",
            "Commands from the controller, by command and outcome (stale_epoch = refused by the fence)",
            commands.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while the stream to the controller is up",
            controller_connected.clone(),
        );
        Self {
            registry: Arc::new(registry),
            probe_latency,
            probe_failures,
            role,
            messages_sent,
            commands,
            controller_connected,
            repl_offset,
            tls_cert_expiry,
            tls_reloads,
        }
    }

    pub fn set_role(&self, current: &str) {
        for role in ROLES {
            self.role
                .get_or_create(&RoleLabel { role })
                .set(i64::from(role == current));
        }
    }

    pub fn sent(&self, kind: &'static str) {
        self.messages_sent.get_or_create(&KindLabel { kind }).inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The metrics listener's connections, gated (see [`crate::listen`]), as axum takes them.
struct Gated {
    incoming: std::pin::Pin<
        Box<
            dyn futures::Stream<
                    Item = std::io::Result<valkey_netguard::Guarded<tokio::net::TcpStream>>,
                > + Send,
        >,
    >,
    addr: SocketAddr,
}

impl axum::serve::Listener for Gated {
    type Io = valkey_netguard::Guarded<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        use futures::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => return (conn, self.addr),
                // The gate retries failed accepts itself; it never ends while the listener
                // lives.
                Some(Err(_)) | None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let gated = Gated {
        incoming: Box::pin(crate::listen::gated(
            listener,
            crate::listen::METRICS_CONNECTIONS,
        )),
        addr,
    };
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(gated, app).await
}

/// Binds the metrics listener, so a port in use is reported at start.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
