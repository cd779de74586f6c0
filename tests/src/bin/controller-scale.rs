//! Controller scale benchmark: N simulated agents (3 per instance) connect to the controller's
//! agent hub, each over its own gRPC connection, and report like real agents (a full report
//! every second, a heartbeat every 500 ms, and a report at once when their role changes).
//! They carry out the controller's commands on a simulated node (promote, replica-of,
//! config) and answer them.
//!
//! The controller side runs in a child process, so that its RSS and CPU are its own:
//! - `controller-scale serve`: the hub and the shared failover driver alone, woken per
//!   instance by the hub, with the durable state in memory (no Kubernetes API);
//! - `controller-scale --k8s`: the real Kubernetes path. The cold path (`reconcile`) runs once
//!   per instance, as the Controller's first list does, then again every resync; the hot path
//!   (a failover loop per instance) is woken by the hub. Both talk to the in-memory API server
//!   (kube-fake-client, served over HTTP from a process of its own, `controller-scale
//!   apiserver`) with 10 ms added to every request, through the controller's own request
//!   counter.
//!
//! For each N it reports:
//! - the controller's RSS and CPU in steady state (after every instance has a master);
//! - with `--k8s`, API requests per second in steady state, by verb, in all and per instance;
//! - decision latency, from a master's "Valkey is down" report (its replicas report their link
//!   down at the same moment, as after a kill -9) leaving the simulated agents to the Promote
//!   command arriving at a replica, over a storm of 200 failovers spread over 10 s (p50, p99,
//!   max; with `--k8s` it includes the durable status write).
//!
//! - `controller-scale --k8s --real`: the same against the real API server (kube-apiserver and
//!   etcd from tests/apiserver/, started by the child; no latency added).
//!
//! Run: `cargo build --release --workspace --bins && target/release/controller-scale [--k8s
//! [--real]] [N ...]` (N agents; default 300 1500 3000; needs `ulimit -n` above 2 N).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use valkey_controller::{
    decide::model::{Desired, Durable, NodeSpec},
    driver::{Driver, DurableStore, StoreError, Target},
    hub::{Hub, InstanceKey, StaticToken},
};
use valkey_proto::v1::{
    AgentMessage, CommandResult, DataState, Heartbeat, Hello, NodeKind, Outcome, ProcessState,
    Role, StateReport, agent_hub_client::AgentHubClient, agent_message::Msg, command::Action,
    controller_message,
};

const TOKEN: &str = "scale";
/// Whether the simulated nodes take writes (their offsets move with every report).
static WRITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
const NAMESPACE: &str = "scale";
/// Latency added to every Kubernetes API request in `--k8s` mode.
const API_LATENCY: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------- controller side (child)

async fn serve() {
    let (hub, _events) = Hub::new(StaticToken(TOKEN.into()), Duration::from_millis(500));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    serve_hub(&hub, listener);
    // One driver per instance, its durable state kept in memory (a status in Kubernetes).
    let mut instances: HashMap<InstanceKey, Driver> = HashMap::new();
    let mut changed = hub.subscribe_instances();
    loop {
        let key = match changed.recv().await {
            Ok(key) => key,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let driver = instances
            .entry(key.clone())
            .or_insert_with(|| Driver::new(key.clone(), Durable::default()));
        let desired = Desired {
            nodes: (0..3)
                .map(|i| {
                    let pod = format!("{}-{i}", key.name);
                    let (host, port) =
                        hub.hello(&key, &pod).map_or(("unknown".into(), 6379), |h| {
                            (h.announce_host, h.announce_port as u16)
                        });
                    NodeSpec {
                        name: pod,
                        ordinal: i,
                        host,
                        port,
                        retiring: false,
                    }
                })
                .collect(),
            hang_timeout_ms: 5000,
            replica_silence_s: 5,
            live_config: [
                ("min-replicas-to-write".to_owned(), "1".to_owned()),
                ("min-replicas-max-lag".to_owned(), "5".to_owned()),
            ]
            .into(),
            announce: false,
        };
        let target = Target {
            desired: &desired,
            sentinel: None,
        };
        driver
            .pass(&hub, &InMemory, target, None)
            .await
            .expect("an in-memory store does not fail");
    }
}

/// The durable state kept in the driver only.
struct InMemory;

impl DurableStore for InMemory {
    async fn save(&self, _: &Durable) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The in-memory API server (kube-fake-client) over HTTP, in a process of its own so that
/// neither its CPU nor its memory counts as the controller's, with `API_LATENCY` added to
/// every answer. Prints its port.
async fn apiserver() {
    use valkey_controller::crd::Failover;
    // Gone with the controller side that started it.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).expect("pdeathsig");
    let fake = kube_fake_client::ClientBuilder::new()
        .with_resource::<Failover>()
        .with_status_subresource::<Failover>()
        .with_status_subresource::<k8s_openapi::api::apps::v1::StatefulSet>()
        .build()
        .await
        .expect("fake API server");
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let fake = fake.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = axum::body::to_bytes(body, 64 << 20)
                .await
                .unwrap_or_default();
            let request = http::Request::from_parts(parts, kube::client::Body::from(bytes));
            tokio::time::sleep(API_LATENCY).await;
            match fake.send(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let bytes = http_body_util::BodyExt::collect(body)
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    http::Response::from_parts(parts, axum::body::Body::from(bytes))
                }
                Err(err) => {
                    let mut response = http::Response::new(axum::body::Body::from(err.to_string()));
                    *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                    response
                }
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    axum::serve(listener, app).await.expect("serve");
}

/// The real Kubernetes path against the in-memory API server, or with `real` against the
/// real one (kube-apiserver and etcd, no added latency); prints the hub's port, then once a
/// second the API requests counted so far (`requests verb=n ...`).
// A benchmark's setup, read top to bottom.
#[allow(clippy::too_many_lines)]
async fn serve_k8s(instances: usize, real: Option<&valkey_e2e::apiserver::ControlPlane>) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::{Api, api::PostParams, runtime::events::Reporter};
    use valkey_controller::{
        crd::{Failover, FailoverSpec},
        k8s::{
            LABEL_COMPONENT, LABEL_INSTANCE, Settings,
            cold::{RESYNC, reconcile},
            runtime::context::Context,
            runtime::metrics::Metrics,
            runtime::requests,
        },
    };

    let _ = rustls::crypto::ring::default_provider().install_default();
    // The API server: the real one, or the in-memory one in a process of its own.
    let (fake, server) = match real {
        Some(plane) => {
            let admin = plane.admin().await;
            valkey_e2e::apiserver::create_namespace(&admin, NAMESPACE, &[]).await;
            (admin, None)
        }
        None => {
            let exe = std::env::current_exe().expect("exe");
            let mut server = tokio::process::Command::new(exe)
                .arg("apiserver")
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn the API server");
            let mut out = tokio::io::BufReader::new(server.stdout.take().expect("stdout"));
            let mut line = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
                .await
                .expect("API server port");
            let url: http::Uri = format!("http://127.0.0.1:{}", line.trim())
                .parse()
                .expect("url");
            let config = kube::Config::new(url);
            (
                kube::Client::try_from(config).expect("client"),
                Some(server),
            )
        }
    };
    // The objects a cluster would hold before the controller starts: the Failovers, and the
    // pods the StatefulSet controller makes (written directly: not the controller's requests).
    let failovers: Api<Failover> = Api::namespaced(fake.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(fake.clone(), NAMESPACE);
    for i in 0..instances {
        let name = format!("i{i}");
        let mut failover = Failover::new(
            &name,
            FailoverSpec {
                replicas: 3,
                ..FailoverSpec::default()
            },
        );
        failover.metadata.namespace = Some(NAMESPACE.into());
        failovers
            .create(&PostParams::default(), &failover)
            .await
            .expect("Failover");
        for ordinal in 0..3 {
            // A pod the real API server takes too: one container.
            let pod = Pod {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("{name}-{ordinal}")),
                    namespace: Some(NAMESPACE.into()),
                    labels: Some(
                        [
                            (LABEL_INSTANCE.to_owned(), name.clone()),
                            (LABEL_COMPONENT.to_owned(), "data".to_owned()),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::core::v1::PodSpec {
                    containers: vec![k8s_openapi::api::core::v1::Container {
                        name: "valkey".into(),
                        image: Some("valkey/valkey:8.0".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            };
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("pod");
        }
    }
    let metrics = Arc::new(Metrics::default());
    let client = requests::counting(fake.clone(), metrics.clone());

    let (hub, _events) = Hub::new(StaticToken(TOKEN.into()), Duration::from_millis(500));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    serve_hub(&hub, listener);
    let recorder = valkey_controller::k8s::runtime::events::Recorder::new(
        client.clone(),
        Reporter {
            controller: "valkey-operator".into(),
            instance: None,
        },
    );
    let mut ctx = Context::new(client, hub.clone(), Settings::default(), recorder);
    ctx.metrics = metrics.clone();
    let ctx = Arc::new(ctx);
    for pod in pods.list(&Default::default()).await.expect("pods").items {
        ctx.pods.apply(pod);
    }
    // The cold path's first pass over every Failover (the Controller's initial list), a few
    // at a time; then one resync per instance every RESYNC, spread out.
    let all: Vec<Failover> = failovers
        .list(&Default::default())
        .await
        .expect("list")
        .items;
    futures::StreamExt::for_each_concurrent(
        futures::stream::iter(all.iter().cloned()),
        16,
        |failover| {
            let ctx = ctx.clone();
            let failovers = failovers.clone();
            async move {
                let name = failover.metadata.name.clone().unwrap_or_default();
                reconcile(Arc::new(failover), ctx.clone())
                    .await
                    .expect("first reconcile");
                // The watch then delivers the object with its finalizer: a second pass, as in
                // a cluster (the in-memory API also bumps the generation on that patch).
                let current = failovers.get(&name).await.expect("get");
                reconcile(Arc::new(current), ctx)
                    .await
                    .expect("second reconcile");
            }
        },
    )
    .await;
    for (i, failover) in all.into_iter().enumerate() {
        let ctx = ctx.clone();
        let failovers = failovers.clone();
        let offset = RESYNC.mul_f64(i as f64 / instances as f64);
        tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let name = failover.metadata.name.clone().unwrap_or_default();
            loop {
                if let Ok(current) = failovers.get(&name).await {
                    let _ = reconcile(Arc::new(current), ctx.clone()).await;
                }
                tokio::time::sleep(RESYNC).await;
            }
        });
    }
    valkey_controller::k8s::hot::wake_on_reports(ctx.clone());
    println!("{port}");
    let _server = server;
    loop {
        let counts: Vec<String> = metrics
            .requests()
            .into_iter()
            .map(|(label, n)| format!("{}:{}={n}", label.verb, label.resource))
            .collect();
        println!("requests {}", counts.join(" "));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------- simulated agents (parent)

/// A simulated Valkey node.
#[derive(Debug, Clone)]
struct Node {
    role: Role,
    master: Option<(String, u32)>,
    down: bool,
    /// Its link to the master is down (the master died).
    link_down: bool,
    offset: i64,
    min_replicas: u32,
}

/// Promote commands seen, by instance: when the first one arrived.
type Promotions = Arc<Mutex<HashMap<String, Instant>>>;

struct SimAgent {
    instance: String,
    pod: String,
    port: u32,
    node: Arc<Mutex<Node>>,
    /// Sends a report now.
    nudge: mpsc::Sender<()>,
}

fn report(node: &Node, seq: u64) -> StateReport {
    if node.down {
        return StateReport {
            seq,
            process: ProcessState::Down as i32,
            ..StateReport::default()
        };
    }
    StateReport {
        seq,
        observed_at_ms: valkey_controller::now_ms(),
        process: ProcessState::Up as i32,
        data: Some(DataState {
            role: node.role as i32,
            run_id: "sim".into(),
            key_count: 1000,
            repl_offset: node.offset,
            master_host: node
                .master
                .as_ref()
                .map(|m| m.0.clone())
                .unwrap_or("127.0.0.1".into()),
            master_port: node.master.as_ref().map_or(1, |m| m.1),
            master_link_up: node.master.is_some() && !node.link_down,
            min_replicas_to_write: node.min_replicas,
            min_replicas_max_lag: if node.min_replicas > 0 { 5 } else { 0 },
            replica_priority: 100,
            ..DataState::default()
        }),
        ..StateReport::default()
    }
}

/// One connection to the hub: hello, then the stream of controller messages.
async fn attach(
    addr: &str,
    agent: &SimAgent,
) -> Result<
    (
        mpsc::Sender<AgentMessage>,
        tonic::Streaming<valkey_proto::v1::ControllerMessage>,
    ),
    String,
> {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect (is `ulimit -n` high enough?): {e}"))?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let hello = Hello {
        protocol_version: 1,
        namespace: NAMESPACE.into(),
        failover: agent.instance.clone(),
        pod_name: agent.pod.clone(),
        kind: NodeKind::Data as i32,
        announce_host: "127.0.0.1".into(),
        announce_port: agent.port,
        token: TOKEN.into(),
        agent_version: "sim".into(),
        ..Hello::default()
    };
    tx.send(AgentMessage {
        msg: Some(Msg::Hello(hello)),
    })
    .await
    .map_err(|e| e.to_string())?;
    let inbound = AgentHubClient::new(channel)
        .attach(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("attach: {e}"))?
        .into_inner();
    Ok((tx, inbound))
}

async fn run_agent(
    addr: String,
    agent: SimAgent,
    mut nudged: mpsc::Receiver<()>,
    promotions: Promotions,
) {
    // Like a real agent, it retries (a hub swamped by thousands of connections at once may
    // reset some of them).
    let mut attempt = 0;
    let (tx, mut inbound) = loop {
        attempt += 1;
        match attach(&addr, &agent).await {
            Ok(attached) => break attached,
            Err(err) if attempt < 50 => {
                if attempt == 1 {
                    eprintln!("{}: {err}; retrying", agent.pod);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("{}: cannot attach after {attempt} tries: {err}", agent.pod),
        }
    };
    let mut seq = 0u64;
    let first = report(&agent.node.lock().unwrap(), seq);
    tx.send(AgentMessage {
        msg: Some(Msg::Report(first)),
    })
    .await
    .expect("report");
    let mut full = tokio::time::interval(Duration::from_secs(1));
    let mut beat = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = full.tick() => {
                seq += 1;
                let r = {
                    let mut n = agent.node.lock().unwrap();
                    if WRITING.load(std::sync::atomic::Ordering::Relaxed) { n.offset += 100; }
                    report(&n, seq)
                };
                if tx.send(AgentMessage { msg: Some(Msg::Report(r)) }).await.is_err() { return; }
            }
            _ = beat.tick() => {
                if tx.send(AgentMessage { msg: Some(Msg::Heartbeat(Heartbeat::default())) }).await.is_err() { return; }
            }
            Some(()) = nudged.recv() => {
                seq += 1;
                let r = report(&agent.node.lock().unwrap(), seq);
                if tx.send(AgentMessage { msg: Some(Msg::Report(r)) }).await.is_err() { return; }
            }
            message = inbound.next() => {
                let Some(Ok(message)) = message else { return };
                let Some(controller_message::Msg::Command(command)) = message.msg else { continue };
                {
                    let mut node = agent.node.lock().unwrap();
                    match &command.action {
                        Some(Action::Promote(_)) => {
                            promotions.lock().unwrap().entry(agent.instance.clone()).or_insert_with(Instant::now);
                            node.role = Role::Master;
                            node.master = None;
                            node.link_down = false;
                        }
                        Some(Action::ReplicaOf(r)) => {
                            node.role = Role::Replica;
                            node.master = Some((r.host.clone(), r.port));
                            node.link_down = false;
                        }
                        Some(Action::ConfigSet(c)) => {
                            if let Some(v) = c.params.get("min-replicas-to-write") {
                                node.min_replicas = v.parse().unwrap_or(0);
                            }
                        }
                        _ => {}
                    }
                }
                let result = CommandResult {
                    id: command.id.clone(),
                    outcome: Outcome::Ok as i32,
                    epoch: command.epoch,
                    ..CommandResult::default()
                };
                if tx.send(AgentMessage { msg: Some(Msg::Result(result)) }).await.is_err() { return; }
                let _ = agent.nudge.try_send(());
            }
        }
    }
}

/// The child's RSS (KiB) and CPU ticks (utime + stime).
fn proc_stats(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    (rss, ticks)
}

struct Measured {
    agents: usize,
    /// API requests per second in steady state, by `verb:resource` (`--k8s`): under write
    /// load, and idle.
    requests: Vec<(String, f64)>,
    idle_requests: Vec<(String, f64)>,
    within_2s: usize,
    rss_mib: f64,
    cpu_percent: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    failovers: usize,
}

// A benchmark's measurement, read top to bottom.
#[allow(clippy::too_many_lines)]
async fn measure(agents: usize, k8s: bool, real: bool) -> Measured {
    let exe = std::env::current_exe().expect("exe");
    let mut command = tokio::process::Command::new(exe);
    if k8s {
        command.arg("serve-k8s").arg((agents / 3).to_string());
        if real {
            command.arg("real");
        }
    } else {
        command.arg("serve");
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the controller side");
    let pid = child.id().expect("pid");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line)
        .await
        .expect("port");
    let addr = format!("http://127.0.0.1:{}", line.trim());
    // The child's request counts, as it last printed them.
    let counts: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    {
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::AsyncBufReadExt::lines(stdout);
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(rest) = line.strip_prefix("requests ") else {
                    continue;
                };
                let parsed = rest
                    .split_whitespace()
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.to_owned(), v.parse().ok()?))
                    })
                    .collect();
                *counts.lock().unwrap() = parsed;
            }
        });
    }

    let instances = agents / 3;
    let promotions: Promotions = Arc::default();
    let mut nodes: HashMap<String, Vec<Arc<Mutex<Node>>>> = HashMap::new();
    let mut nudges: HashMap<String, Vec<mpsc::Sender<()>>> = HashMap::new();
    for i in 0..instances {
        let instance = format!("i{i}");
        for ordinal in 0..3u32 {
            let node = Arc::new(Mutex::new(Node {
                role: Role::Replica,
                master: None,
                down: false,
                link_down: false,
                offset: 1000,
                min_replicas: 0,
            }));
            let (nudge, nudged) = mpsc::channel(4);
            let agent = SimAgent {
                instance: instance.clone(),
                pod: format!("{instance}-{ordinal}"),
                port: 10_000 + i as u32 * 3 + ordinal,
                node: node.clone(),
                nudge: nudge.clone(),
            };
            nodes.entry(instance.clone()).or_default().push(node);
            nudges.entry(instance.clone()).or_default().push(nudge);
            tokio::spawn(run_agent(addr.clone(), agent, nudged, promotions.clone()));
            if (i * 3 + ordinal as usize) % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    // Every instance bootstrapped: exactly one master each.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = nodes.values().all(|ns| {
            ns.iter()
                .filter(|n| n.lock().unwrap().role == Role::Master)
                .count()
                == 1
                && ns
                    .iter()
                    .filter(|n| n.lock().unwrap().master.is_some())
                    .count()
                    == 2
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{agents} agents: not every instance bootstrapped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    promotions.lock().unwrap().clear();

    // Steady state: reports and heartbeats. With the Kubernetes path, over 65 s under write
    // load (two periods of the status's volatile fields), then 65 s idle (once the last
    // offsets are written).
    let steady = Duration::from_secs(if k8s { 65 } else { 20 });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rate = |before: &HashMap<String, u64>, after: &HashMap<String, u64>, secs: f64| {
        let mut rates: Vec<(String, f64)> = after
            .iter()
            .map(|(key, n)| {
                (
                    key.clone(),
                    (n - before.get(key).copied().unwrap_or(0)) as f64 / secs,
                )
            })
            .filter(|(_, r)| *r > 0.0)
            .collect();
        rates.sort_by(|a, b| a.0.cmp(&b.0));
        rates
    };
    let (_, ticks0) = proc_stats(pid);
    let counts0 = counts.lock().unwrap().clone();
    let t0 = Instant::now();
    tokio::time::sleep(steady).await;
    let (rss_kib, ticks1) = proc_stats(pid);
    let counts1 = counts.lock().unwrap().clone();
    let window = t0.elapsed().as_secs_f64();
    let requests = rate(&counts0, &counts1, window);
    // USER_HZ: 100 on Linux.
    let ticks_per_s = 100.0;
    let cpu_percent = (ticks1 - ticks0) as f64 / ticks_per_s / window * 100.0;
    let mut idle_requests = Vec::new();
    if k8s {
        WRITING.store(false, std::sync::atomic::Ordering::Relaxed);
        // Every offset is still from the next report on; the last ones moved are written
        // with the volatile fields at most 30 s later. Count from there.
        tokio::time::sleep(Duration::from_secs(33)).await;
        let idle0 = counts.lock().unwrap().clone();
        let t1 = Instant::now();
        tokio::time::sleep(steady).await;
        let idle1 = counts.lock().unwrap().clone();
        idle_requests = rate(&idle0, &idle1, t1.elapsed().as_secs_f64());
        WRITING.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    // Failovers: a master reports its Valkey gone; time until a replica is told to promote.
    let failovers = 200.min(instances);
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let keys: Vec<String> = (0..failovers)
        .map(|i| format!("i{}", i * instances / failovers))
        .collect();
    for instance in &keys {
        let ns = &nodes[instance];
        let master = ns
            .iter()
            .position(|n| n.lock().unwrap().role == Role::Master)
            .expect("master");
        // As after a kill -9: the process is gone and its replicas' links drop at once.
        for (i, node) in ns.iter().enumerate() {
            let mut node = node.lock().unwrap();
            if i == master {
                node.down = true;
            } else {
                node.link_down = true;
            }
        }
        sent.insert(instance.clone(), Instant::now());
        for nudge in &nudges[instance] {
            let _ = nudge.try_send(());
        }
        tokio::time::sleep(Duration::from_millis(10_000 / failovers as u64)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while promotions.lock().unwrap().len() < failovers && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = promotions.lock().unwrap().clone();
    let mut latencies: Vec<f64> = keys
        .iter()
        .filter_map(|k| Some((*promoted.get(k)? - sent[k]).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let _ = child.kill().await;
    Measured {
        agents,
        requests,
        idle_requests,
        within_2s: latencies.iter().filter(|l| **l <= 2000.0).count(),
        rss_mib: rss_kib as f64 / 1024.0,
        cpu_percent,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: *latencies.last().expect("failovers"),
        failovers: latencies.len(),
    }
}

/// Serves the hub's gRPC service on `listener`, in the background.
fn serve_hub(hub: &Hub, listener: tokio::net::TcpListener) {
    let service = hub.server();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("serve");
    });
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => return runtime.block_on(serve()),
        Some("apiserver") => return runtime.block_on(apiserver()),
        Some("serve-k8s") => {
            let instances = args.get(1).and_then(|n| n.parse().ok()).expect("instances");
            // Started on the main thread, which outlives its processes' use.
            let plane = (args.get(2).map(String::as_str) == Some("real"))
                .then(valkey_e2e::apiserver::ControlPlane::start);
            return runtime.block_on(serve_k8s(instances, plane.as_ref()));
        }
        _ => {}
    }
    let k8s = args.first().map(String::as_str) == Some("--k8s");
    if k8s {
        args.remove(0);
    }
    let real = args.first().map(String::as_str) == Some("--real");
    if real {
        args.remove(0);
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![300, 1500, 3000]
    } else {
        args.iter()
            .map(|a| a.parse().expect("agent counts"))
            .collect()
    };
    let mut rows = Vec::new();
    for agents in sizes {
        let result = runtime.block_on(measure(agents, k8s, real));
        eprintln!(
            "{} agents: RSS {:.1} MiB, CPU {:.1}%, decision p50 {:.2} ms p99 {:.2} ms",
            result.agents, result.rss_mib, result.cpu_percent, result.p50_ms, result.p99_ms
        );
        rows.push(result);
    }
    println!(
        "| agents | instances | controller RSS MiB | controller CPU % of a core | failovers | within 2 s | decision p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {:.2} | {:.2} | {:.2} |",
            r.agents,
            r.agents / 3,
            r.rss_mib,
            r.cpu_percent,
            r.failovers,
            r.within_2s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        );
    }
    if k8s {
        println!();
        println!(
            "| instances | steady state | API requests/s by verb and resource | total/s | per instance/s | writes/s |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            for (state, requests) in [("write load", &r.requests), ("idle", &r.idle_requests)] {
                let total: f64 = requests.iter().map(|(_, n)| n).sum();
                let writes: f64 = requests
                    .iter()
                    .filter(|(key, _)| {
                        !key.starts_with("get:")
                            && !key.starts_with("list:")
                            && !key.starts_with("watch:")
                    })
                    .map(|(_, n)| n)
                    .sum::<f64>()
                    + 0.0; // not -0.0 when there is none
                let by_kind: Vec<String> = requests
                    .iter()
                    .map(|(key, n)| format!("{key} {n:.3}"))
                    .collect();
                println!(
                    "| {} | {state} | {} | {:.3} | {:.5} | {:.3} |",
                    r.agents / 3,
                    if by_kind.is_empty() {
                        "none".to_owned()
                    } else {
                        by_kind.join(", ")
                    },
                    total,
                    total / (r.agents / 3) as f64,
                    writes
                );
            }
        }
    }
    if let Some(last) = rows.last() {
        let total: f64 = last.requests.iter().map(|(_, n)| n).sum();
        println!(
            "{} instances{}: steady state {:.5} API requests per instance per second; decision p99 {:.2} ms",
            last.agents / 3,
            match (k8s, real) {
                (true, true) => " (Kubernetes path, the real API server)",
                (true, false) => " (Kubernetes path, 10 ms API latency)",
                _ => " (no Kubernetes API)",
            },
            total / (last.agents / 3) as f64,
            last.p99_ms
        );
    }
}
