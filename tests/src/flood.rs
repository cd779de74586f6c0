//! An attacker on the hub's network without a token: idle TCP connections, replaced as fast
//! as the hub closes them, and gRPC streams that each try to send a Hello of almost 4 MiB.
//! Used by the flood test and by `hub-flood`, which measures what it costs the controller.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpStream, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use valkey_proto::v1::{AgentMessage, Hello, agent_hub_client::AgentHubClient, agent_message::Msg};

/// What the flood did so far.
#[derive(Debug, Default)]
pub struct FloodCounts {
    /// TCP connections opened.
    pub connections: AtomicU64,
    /// Large Hellos tried.
    pub streams: AtomicU64,
}

/// A running flood; stopped when dropped.
#[derive(Debug)]
pub struct Flood {
    tasks: Vec<JoinHandle<()>>,
    pub counts: Arc<FloodCounts>,
}

impl Drop for Flood {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How many descriptors this process may open: the soft limit raised to the hard one.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

impl Flood {
    /// Starts `idle` idle connections (kept at that number: the oldest is dropped for each
    /// new one) and `streams` loops of large Hellos against the hub at `addr`, whose
    /// certificate chains to `ca_pem`.
    pub fn start(addr: std::net::SocketAddr, ca_pem: String, idle: usize, streams: usize) -> Self {
        let counts = Arc::new(FloodCounts::default());
        let mut tasks = Vec::new();
        let c = counts.clone();
        tasks.push(tokio::spawn(async move {
            let mut held = std::collections::VecDeque::with_capacity(idle);
            loop {
                if let Ok(stream) = TcpStream::connect(addr).await {
                    held.push_back(stream);
                    c.connections.fetch_add(1, Ordering::Relaxed);
                }
                while held.len() > idle {
                    held.pop_front();
                }
                // Full speed until `idle` are open, then 200 new ones a second.
                if held.len() >= idle {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
        for _ in 0..streams {
            let (c, ca) = (counts.clone(), ca_pem.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    c.streams.fetch_add(1, Ordering::Relaxed);
                    large_hello(addr, &ca).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
        Self { tasks, counts }
    }
}

/// A gRPC channel to the hub at `addr`, over TLS verified against `ca_pem`.
pub async fn hub_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await
}

/// One stream whose Hello is almost 4 MiB (gRPC's default message limit), sent as fast as the
/// hub takes it; returns when the hub ends it.
async fn large_hello(addr: std::net::SocketAddr, ca_pem: &str) {
    let Ok(channel) = hub_channel(addr, ca_pem).await else {
        return;
    };
    let (tx, rx) = mpsc::channel(1);
    let hello = Hello {
        pod_name: "intruder".into(),
        token: "not-a-token".into(),
        agent_version: "x".repeat(4 * 1024 * 1024 - 4096),
        ..Hello::default()
    };
    let _ = tx
        .send(AgentMessage {
            msg: Some(Msg::Hello(hello)),
        })
        .await;
    if let Ok(response) = AgentHubClient::new(channel)
        .attach(ReceiverStream::new(rx))
        .await
    {
        let mut inbound = response.into_inner();
        while let Ok(Some(_)) = inbound.message().await {}
    }
}
