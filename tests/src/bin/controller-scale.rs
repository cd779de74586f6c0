//! Controller scale benchmark: N simulated agents (3 per instance) connect to the controller's
//! agent hub, each over its own gRPC connection, and report like real agents (a full report
//! every second, a heartbeat every 500 ms, and a report at once when their role changes).
//! They carry out the controller's commands on a simulated node (promote, replica-of,
//! config) and answer them.
//!
//! The controller side runs in a child process (`controller-scale serve`), so that its RSS and
//! CPU are its own. It is the hub, plus the same engine and core that the controllers use,
//! woken per instance by the hub as the Kubernetes controller is. The Kubernetes API calls are
//! left out; that is what this measures.
//!
//! For each N it reports:
//! - the controller's RSS and CPU in steady state (after every instance has a master);
//! - decision latency, from a master's "Valkey is down" report leaving its simulated agent to
//!   the Promote command arriving at a replica, over 200 failovers spread over 10 s (p50, p99).
//!
//! Run: `cargo build --release --workspace --bins && target/release/controller-scale [N ...]`
//! (default 300 1500 3000; needs `ulimit -n` above 2 N).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use valkey_controller::{
    core::{Desired, Durable, NodeSpec},
    engine::Engine,
    hub::{Hub, InstanceKey, StaticToken},
};
use valkey_proto::v1::{
    AgentMessage, CommandResult, DataState, Heartbeat, Hello, NodeKind, Outcome, ProcessState,
    Role, StateReport, agent_hub_client::AgentHubClient, agent_message::Msg, command::Action,
    controller_message,
};

const TOKEN: &str = "scale";

// ---------------------------------------------------------------- controller side (child)

async fn serve() {
    let (hub, _events) = Hub::new(StaticToken(TOKEN.into()), Duration::from_millis(500));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    let service = hub.server();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("serve");
    });
    // One durable state and engine per instance, kept in memory (a status in Kubernetes).
    let mut instances: HashMap<InstanceKey, (Arc<Engine>, Durable)> = HashMap::new();
    let mut changed = hub.subscribe_instances();
    loop {
        let key = match changed.recv().await {
            Ok(key) => key,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let (engine, durable) = instances.entry(key.clone()).or_default();
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
        };
        let plan = engine.plan(
            &hub,
            &key,
            &desired,
            None,
            durable,
            valkey_controller::now_ms(),
        );
        if let Some(next) = plan.durable {
            *durable = next;
        }
        engine.dispatch(&hub, &key, durable.epoch, plan.commands);
    }
}

// ---------------------------------------------------------------- simulated agents (parent)

/// A simulated Valkey node.
#[derive(Debug, Clone)]
struct Node {
    role: Role,
    master: Option<(String, u32)>,
    down: bool,
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
            master_link_up: node.master.is_some(),
            min_replicas_to_write: node.min_replicas,
            min_replicas_max_lag: if node.min_replicas > 0 { 5 } else { 0 },
            replica_priority: 100,
            ..DataState::default()
        }),
        ..StateReport::default()
    }
}

async fn run_agent(
    addr: String,
    agent: SimAgent,
    mut nudged: mpsc::Receiver<()>,
    promotions: Promotions,
) {
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the hub (is `ulimit -n` high enough?)");
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let hello = Hello {
        protocol_version: 1,
        namespace: "scale".into(),
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
    .expect("hello");
    let mut inbound = AgentHubClient::new(channel)
        .attach(ReceiverStream::new(rx))
        .await
        .expect("attach")
        .into_inner();
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
                let r = { let mut n = agent.node.lock().unwrap(); n.offset += 100; report(&n, seq) };
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
                        }
                        Some(Action::ReplicaOf(r)) => {
                            node.role = Role::Replica;
                            node.master = Some((r.host.clone(), r.port));
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
    rss_mib: f64,
    cpu_percent: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    failovers: usize,
}

async fn measure(agents: usize) -> Measured {
    let exe = std::env::current_exe().expect("exe");
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
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

    // Steady state: 20 s of reports and heartbeats.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, ticks0) = proc_stats(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (rss_kib, ticks1) = proc_stats(pid);
    // USER_HZ: 100 on Linux.
    let ticks_per_s = 100.0;
    let cpu_percent = (ticks1 - ticks0) as f64 / ticks_per_s / t0.elapsed().as_secs_f64() * 100.0;

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
        ns[master].lock().unwrap().down = true;
        sent.insert(instance.clone(), Instant::now());
        let _ = nudges[instance][master].try_send(());
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
        rss_mib: rss_kib as f64 / 1024.0,
        cpu_percent,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: *latencies.last().expect("failovers"),
        failovers: latencies.len(),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        runtime.block_on(serve());
        return;
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
        let result = runtime.block_on(measure(agents));
        eprintln!(
            "{} agents: RSS {:.1} MiB, CPU {:.1}%, decision p50 {:.2} ms p99 {:.2} ms",
            result.agents, result.rss_mib, result.cpu_percent, result.p50_ms, result.p99_ms
        );
        rows.push(result);
    }
    println!(
        "| agents | instances | controller RSS MiB | controller CPU % of a core | failovers | decision p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {:.2} |",
            r.agents,
            r.agents / 3,
            r.rss_mib,
            r.cpu_percent,
            r.failovers,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        );
    }
}
