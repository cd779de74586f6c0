//! An attacker on the pod network without a token. Against the hub: idle TCP connections,
//! replaced as fast as the hub closes them; gRPC streams that each try to send a Hello of
//! almost 4 MiB; and TLS connections that open every stream they may and never say hello.
//! Against the agents' own ports: idle connections, replaced as they are closed. Used by the
//! flood tests and by `hub-flood`, which measures what each costs failover.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{io::AsyncReadExt, net::TcpStream, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use valkey_proto::v1::{AgentMessage, Hello, agent_hub_client::AgentHubClient, agent_message::Msg};

/// What the flood did so far.
#[derive(Debug, Default)]
pub struct FloodCounts {
    /// TCP connections opened.
    pub connections: AtomicU64,
    /// Streams opened (large Hellos, or streams that never say hello).
    pub streams: AtomicU64,
    /// Streams the hub refused at once (RESOURCE_EXHAUSTED).
    pub refused: AtomicU64,
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
    hub_channel_from(addr, ca_pem, None).await
}

/// [`hub_channel`] from the local address `from` (any loopback address works on Linux).
pub async fn hub_channel_from(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    from: Option<IpAddr>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    Endpoint::from_shared(format!("https://{addr}"))?
        .local_address(from)
        .tls_config(tls)?
        .connect()
        .await
}

/// A TCP connection to `addr` from the local address `from`.
pub async fn connect_from(addr: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// One stream on `channel` that never says hello: resolves when the hub answers it (a refusal,
/// or the end of its deadline), with what it answered.
pub async fn silent_stream(channel: tonic::transport::Channel) -> tonic::Code {
    let (tx, rx) = mpsc::channel::<AgentMessage>(1);
    let answered = AgentHubClient::new(channel)
        .attach(ReceiverStream::new(rx))
        .await;
    drop(tx);
    match answered {
        Ok(response) => {
            let mut inbound = response.into_inner();
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return tonic::Code::Ok,
                    Err(status) => return status.code(),
                }
            }
        }
        Err(status) => status.code(),
    }
}

impl Flood {
    /// `connections` TLS connections from `from` to the hub at `addr`, each opening 4 streams
    /// (the most the hub allows) that never say hello; each connection is opened again as soon
    /// as the hub has ended all its streams.
    pub fn silent(
        addr: SocketAddr,
        ca_pem: String,
        connections: usize,
        from: Option<IpAddr>,
    ) -> Self {
        let counts = Arc::new(FloodCounts::default());
        let tasks = (0..connections)
            .map(|_| {
                let (c, ca) = (counts.clone(), ca_pem.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok(channel) = hub_channel_from(addr, &ca, from).await else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        let streams = (0..4).map(|_| {
                            let (c, channel) = (c.clone(), channel.clone());
                            async move {
                                c.streams.fetch_add(1, Ordering::Relaxed);
                                if silent_stream(channel).await == tonic::Code::ResourceExhausted {
                                    c.refused.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                        futures::future::join_all(streams).await;
                    }
                })
            })
            .collect();
        Self { tasks, counts }
    }

    /// `per_target` idle TCP connections to each of `targets`, each opened again as soon as
    /// it is closed.
    pub fn idle(targets: &[SocketAddr], per_target: usize) -> Self {
        let counts = Arc::new(FloodCounts::default());
        let mut tasks = Vec::new();
        for &target in targets {
            for _ in 0..per_target {
                let c = counts.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let Ok(mut stream) = TcpStream::connect(target).await else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        let mut buf = [0u8; 256];
                        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                }));
            }
        }
        Self { tasks, counts }
    }
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
