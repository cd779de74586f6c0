//! Partition scenarios, for the harness tests (`tests/tests/partition.rs`) and
//! `partition-bench`: a three-node instance (ours under either policy, or plain Valkey
//! Sentinel as the baseline) on a network of namespaces ([`crate::netns`]), clients writing
//! from two namespaces of their own, a partition made and healed, and a Jepsen-style check:
//! every acknowledged write must be on the final master and on its replicas.
//!
//! Hosts: `n0`..`n2` each run a Valkey with its agent (and, under a Sentinel policy, a
//! sentinel), `ctl` the controller, `ca` and `cb` a client group each. Each group runs two
//! writers: plain `SET`, and `SET` + `WAIT` (1 replica under policy manual, every replica
//! under a Sentinel policy: what each promises, see docs/failover.md). A writer finds the
//! master by asking every node it can reach for its `ROLE`, as a Sentinel-aware client or a
//! Service following the role label would.
//!
//! To look into a run: `PARTITION_DEBUG=1` prints the controller's status and logs after it,
//! and `PARTITION_LOG` sets `RUST_LOG` for the controller and its agents.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;

use crate::{
    local::{LocalInstance, client},
    monitor::Monitor,
    netns::{Net, command_in, spawn_in},
    procs::Proc,
};

/// Who keeps the instance available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Ours, policy manual: the controller decides.
    Manual,
    /// Ours, policy sentinel: three sentinels decide, the controller helps.
    Sentinel,
    /// Valkey and three sentinels as a Helm chart runs them: no controller, no agents.
    PlainSentinel,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Manual => "ours, policy manual",
            System::Sentinel => "ours, policy sentinel",
            System::PlainSentinel => "plain Sentinel",
        }
    }

    fn sentinels(self) -> bool {
        self != System::Manual
    }

    /// Replicas a WAIT asks for: the acknowledgement each system promises to keep. Ours
    /// promise one under both policies (the controller chooses the replica with the most
    /// data); plain Sentinel only a write every replica has (it chooses from cached INFO).
    fn wait_for(self) -> i64 {
        if self == System::PlainSentinel { 2 } else { 1 }
    }
}

/// What is cut, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The master is cut off from everyone but client group `ca`.
    MasterIsolated,
    /// The controller is cut off from everyone.
    ControllerIsolated,
    /// One replica is cut off from everyone.
    ReplicaIsolated,
    /// The master and `ca` on one side; both replicas, the controller and `cb` on the other.
    Split21,
    /// The master is cut off (but from `ca`) and healed, again and again.
    Flapping,
    /// Only the master's agent (its namespace) is cut off from the controller: its Valkey
    /// still serves its replicas and every client.
    MasterAgentIsolated,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::MasterIsolated,
        Scenario::ControllerIsolated,
        Scenario::ReplicaIsolated,
        Scenario::Split21,
        Scenario::Flapping,
        Scenario::MasterAgentIsolated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::MasterIsolated => "master isolated (one client group with it)",
            Scenario::ControllerIsolated => "controller isolated",
            Scenario::ReplicaIsolated => "one replica isolated",
            Scenario::Split21 => "2/1 split, master on the 1 side",
            Scenario::Flapping => "flapping: master cut 2 s, healed 1 s, 4 times",
            Scenario::MasterAgentIsolated => "master's agent cut from the controller",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub system: System,
    pub scenario: Scenario,
    pub plain_acked: usize,
    pub plain_lost: usize,
    /// The latest a lost plain write was acknowledged, after the partition began.
    pub plain_lost_within: Option<Duration>,
    pub wait_acked: usize,
    pub wait_lost: usize,
    /// Rounds (every 20 ms) in which two nodes took a write, and the time they covered.
    pub two_masters_rounds: u64,
    pub two_masters: Duration,
    /// The longest time no client had a write acknowledged, from the partition on.
    pub unavailable: Duration,
}

const HOSTS: [&str; 6] = ["n0", "n1", "n2", "ctl", "ca", "cb"];
const GROUPS: [&str; 2] = ["ca", "cb"];
const T: Duration = Duration::from_secs(60);
const WRITE_TIMEOUT: Duration = Duration::from_millis(300);
/// Sentinel's down-after-milliseconds in both Sentinel systems.
const DOWN_AFTER_MS: u64 = 5000;

/// A running instance on its network.
#[derive(Debug)]
pub struct Cluster {
    pub system: System,
    /// `ip:port` of `n0`..`n2`'s Valkey.
    pub nodes: Vec<String>,
    password: String,
    // Held for their processes' lives (killed on drop, logs printed on failure); dropped
    // before the network they run in.
    ours: Option<LocalInstance>,
    _plain: Vec<Proc>,
    pub net: Net,
    _dir: tempfile::TempDir,
}

fn node_host(i: usize) -> &'static str {
    HOSTS[i]
}

impl Cluster {
    pub async fn start(system: System) -> Self {
        let net = Net::new(&HOSTS);
        let dir = tempfile::Builder::new()
            .prefix("partition-")
            .tempdir()
            .expect("temp dir");
        match system {
            System::PlainSentinel => Self::start_plain(net, dir).await,
            _ => Self::startours(system, net, dir).await,
        }
    }

    async fn startours(system: System, net: Net, dir: tempfile::TempDir) -> Self {
        let sentinel = if system.sentinels() {
            format!(
                "  sentinel:\n    replicas: 3\n    quorum: 2\n    monitorConfig:\n      down-after-milliseconds: \"{DOWN_AFTER_MS}\"\n      failover-timeout: \"10000\"\n"
            )
        } else {
            String::new()
        };
        let manifest = format!(
            "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\n  namespace: e2e\nspec:\n  replicas: 3\n{sentinel}"
        );
        let mut extra = Vec::new();
        for i in 0..3 {
            let host = net.host(node_host(i));
            for pod in [format!("demo-{i}"), format!("demo-sentinel-{i}")] {
                extra.push("--netns".to_owned());
                extra.push(format!("{pod}={},{}", host.path().display(), host.ip));
            }
        }
        extra.push("--hub-host".into());
        extra.push(net.ip("ctl").to_string());
        let instance = LocalInstance::up_in(&manifest, &extra, net.host("ctl"));
        let status = instance
            .wait_status(
                "a master, in-sync replicas and sentinels knowing them",
                T,
                |s| {
                    s.master.is_some()
                        && s.nodes.iter().filter(|n| n.role == "master").count() == 1
                        && s.nodes
                            .iter()
                            .filter(|n| n.role == "replica")
                            .all(|n| n.link == "up")
                        && s.nodes.len() == 3
                        && s.monitor.nodes.iter().all(|m| m.replicas == Some(2))
                },
            )
            .await;
        let mut nodes: Vec<(String, String)> = status
            .nodes
            .iter()
            .map(|n| (n.pod.clone(), n.addr.clone()))
            .collect();
        nodes.sort();
        Self {
            system,
            nodes: nodes.into_iter().map(|(_, addr)| addr).collect(),
            password: instance.password(),
            ours: Some(instance),
            _plain: Vec::new(),
            net,
            _dir: dir,
        }
    }

    async fn start_plain(net: Net, dir: tempfile::TempDir) -> Self {
        let password = format!("pw{}", std::process::id());
        let master = net.ip("n0");
        let mut plain = Vec::new();
        for i in 0..3 {
            let host = net.host(node_host(i)).clone();
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let replicaof = if i == 0 {
                String::new()
            } else {
                format!("replicaof {master} 6379\n")
            };
            let valkey = format!(
                "port 6379\nbind {ip}\nprotected-mode no\ndir {d}\nrequirepass {password}\nmasterauth {password}\n\
                 appendonly yes\nrepl-ping-replica-period 1\nreplica-announce-ip {ip}\n{replicaof}",
                ip = host.ip,
                d = node_dir.display()
            );
            plain.push(spawn_with_conf(
                "valkey-server",
                i,
                &node_dir,
                &valkey,
                &host,
            ));
            let sentinel = format!(
                "port 26379\nbind {ip}\nprotected-mode no\ndir {d}\n\
                 sentinel monitor m {master} 6379 2\nsentinel auth-pass m {password}\n\
                 sentinel down-after-milliseconds m {DOWN_AFTER_MS}\nsentinel failover-timeout m 10000\n\
                 sentinel parallel-syncs m 1\n",
                ip = host.ip,
                d = node_dir.display()
            );
            plain.push(spawn_with_conf(
                "valkey-sentinel",
                i,
                &node_dir,
                &sentinel,
                &host,
            ));
        }
        let nodes: Vec<String> = (0..3)
            .map(|i| format!("{}:6379", net.ip(node_host(i))))
            .collect();
        let cluster = Self {
            system: System::PlainSentinel,
            nodes,
            password,
            ours: None,
            _plain: plain,
            net,
            _dir: dir,
        };
        // Every sentinel knows both replicas (it learns them from the master's INFO).
        let sentinels: Vec<String> = (0..3)
            .map(|i| format!("{}:26379", cluster.net.ip(node_host(i))))
            .collect();
        crate::wait_for("the sentinels to know both replicas", T, || {
            let sentinels = sentinels.clone();
            async move {
                for addr in &sentinels {
                    let mut conn = connect(&format!("redis://{addr}/")).await?;
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg("m")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    if replicas.len() != 2 {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
        cluster
    }

    fn url(&self, addr: &str) -> String {
        format!("redis://:{}@{addr}/", self.password)
    }

    /// The node that answers ROLE as master, when exactly one does and both others follow it
    /// with their link up and its offset.
    async fn settled(&self) -> Option<usize> {
        let mut roles = Vec::new();
        for addr in &self.nodes {
            let mut conn = connect(&self.url(addr)).await?;
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .ok()?;
            roles.push(info);
        }
        let field = |info: &str, key: &str| -> Option<String> {
            info.lines().find_map(|l| {
                l.strip_prefix(&format!("{key}:"))
                    .map(|v| v.trim().to_owned())
            })
        };
        let masters: Vec<usize> = (0..3)
            .filter(|i| field(&roles[*i], "role").as_deref() == Some("master"))
            .collect();
        let [master] = masters[..] else { return None };
        let offset = field(&roles[master], "master_repl_offset")?;
        let (ip, port) = self.nodes[master].split_once(':')?;
        (0..3)
            .filter(|i| *i != master)
            .all(|i| {
                field(&roles[i], "master_host").as_deref() == Some(ip)
                    && field(&roles[i], "master_port").as_deref() == Some(port)
                    && field(&roles[i], "master_link_status").as_deref() == Some("up")
                    && field(&roles[i], "slave_repl_offset").as_ref() == Some(&offset)
            })
            .then_some(master)
    }

    /// The master now (ROLE asked from outside every partition).
    async fn master(&self) -> usize {
        crate::wait_for("one master", T, || self.settled()).await
    }

    /// The keys of `keys` missing on node `i`.
    async fn missing(&self, i: usize, keys: &[String]) -> Vec<String> {
        let mut conn = connect(&self.url(&self.nodes[i]))
            .await
            .expect("a node to check");
        crate::local::missing_keys(&mut conn, keys).await
    }
}

/// Writes `conf` to `<dir>/<program>.conf` and starts `program` with it in `host`'s namespace,
/// logging to `<dir>/<program>.log`.
fn spawn_with_conf(
    program: &str,
    i: usize,
    dir: &std::path::Path,
    conf: &str,
    host: &crate::netns::Host,
) -> Proc {
    let path = dir.join(format!("{program}.conf"));
    std::fs::write(&path, conf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut cmd = Command::new(program);
    cmd.arg(&path);
    command_in(&mut cmd, host);
    Proc::spawn(
        &format!("n{i} {program}"),
        &mut cmd,
        &dir.join(format!("{program}.log")),
    )
}

async fn connect(url: &str) -> Option<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(200)))
        .set_response_timeout(Some(WRITE_TIMEOUT));
    client(url)
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()
}

/// One acknowledged write.
#[derive(Debug, Clone)]
struct Ack {
    key: String,
    wait: bool,
    at: Instant,
}

/// The writers of both client groups, each on a thread in its group's namespace.
struct Writers {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(cluster: &Cluster) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for group in GROUPS {
            for wait in [false, true] {
                let urls: Vec<String> = cluster.nodes.iter().map(|a| cluster.url(a)).collect();
                let (stop, acks) = (stop.clone(), acks.clone());
                let want = cluster.system.wait_for();
                let prefix = format!("{group}:{}", if wait { "wait" } else { "plain" });
                threads.push(spawn_in(cluster.net.host(group), move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(write_loop(urls, prefix, wait.then_some(want), stop, acks));
                }));
            }
        }
        Self {
            stop,
            acks,
            threads,
        }
    }

    /// Acknowledgements so far, by writer (`<group>:plain`, `<group>:wait`).
    fn per_writer(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        if let Ok(acks) = self.acks.lock() {
            for ack in acks.iter() {
                let writer = ack.key.rsplit_once(':').map_or("", |(w, _)| w);
                *counts.entry(writer.to_owned()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Waits until every writer has had `more` writes acknowledged from now on.
    async fn wait_each(&self, more: usize, what: &str) {
        let before = self.per_writer();
        crate::wait_for(what, T, || {
            let now = self.per_writer();
            let done = now.len() == GROUPS.len() * 2
                && now
                    .iter()
                    .all(|(w, n)| *n >= before.get(w).copied().unwrap_or(0) + more);
            async move { done.then_some(()) }
        })
        .await;
    }

    fn finish(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// Writes unique keys to whichever node it finds serving as master, recording each
/// acknowledgement; `wait`: how many replicas must acknowledge too.
async fn write_loop(
    urls: Vec<String>,
    prefix: String,
    wait: Option<i64>,
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
) {
    let mut conns: Vec<Option<MultiplexedConnection>> = vec![None; urls.len()];
    let mut current: Option<usize> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(i) = current else {
            current = find_master(&urls, &mut conns).await;
            if current.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            continue;
        };
        let Some(conn) = conns[i].as_mut() else {
            current = None;
            continue;
        };
        n += 1;
        let key = format!("{prefix}:{n}");
        let acked = match wait {
            None => redis::cmd("SET")
                .arg(&key)
                .arg(n)
                .query_async::<()>(conn)
                .await
                .is_ok(),
            Some(want) => {
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(&key)
                    .arg(n)
                    .ignore()
                    .cmd("WAIT")
                    .arg(want)
                    .arg(200);
                matches!(pipe.query_async::<(i64,)>(conn).await, Ok((got,)) if got >= want)
            }
        };
        if acked {
            if let Ok(mut acks) = acks.lock() {
                acks.push(Ack {
                    key,
                    wait: wait.is_some(),
                    at: Instant::now(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        } else {
            // Refused, timed out, or the node is gone: look for the master again.
            conns[i] = None;
            current = None;
        }
    }
}

async fn find_master(
    urls: &[String],
    conns: &mut [Option<MultiplexedConnection>],
) -> Option<usize> {
    for (i, url) in urls.iter().enumerate() {
        if conns[i].is_none() {
            conns[i] = connect(url).await;
        }
        let Some(conn) = conns[i].as_mut() else {
            continue;
        };
        match redis::cmd("ROLE").query_async::<redis::Value>(conn).await {
            Ok(redis::Value::Array(items)) if matches!(items.first(), Some(redis::Value::BulkString(b)) if b.as_slice() == b"master") =>
            {
                return Some(i);
            }
            Ok(_) => {}
            Err(_) => conns[i] = None,
        }
    }
    None
}

/// How long a partition is held: past the failover it would cause.
fn hold(system: System) -> Duration {
    match system {
        System::Manual => Duration::from_secs(8),
        _ => Duration::from_millis(DOWN_AFTER_MS + 6000),
    }
}

/// Runs one scenario on a fresh instance and checks every acknowledged write afterwards.
pub async fn run(system: System, scenario: Scenario) -> Report {
    let cluster = Cluster::start(system).await;
    let master = cluster.master().await;
    let writers = Writers::start(&cluster);
    writers.wait_each(20, "every writer's first writes").await;
    let password = cluster.password.clone();
    let monitor = Monitor::start(cluster.nodes.clone(), move |addr| {
        client(&format!("redis://:{password}@{addr}/"))
    });
    let m = node_host(master);
    let replicas: Vec<&str> = (0..3).filter(|i| *i != master).map(node_host).collect();
    // From the moment the partition is in place (each cut is a few `ip` commands).
    let mut begun = Instant::now();
    match scenario {
        Scenario::MasterIsolated => cluster.net.isolate(m, &["ca"]),
        Scenario::ControllerIsolated => cluster.net.isolate("ctl", &[]),
        Scenario::ReplicaIsolated => cluster.net.isolate(replicas[0], &[]),
        Scenario::Split21 => cluster
            .net
            .split(&[m, "ca"], &[replicas[0], replicas[1], "ctl", "cb"]),
        Scenario::MasterAgentIsolated => cluster.net.cut(m, "ctl"),
        Scenario::Flapping => {
            for round in 0..4 {
                cluster.net.isolate(m, &["ca"]);
                if round == 0 {
                    begun = Instant::now();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.net.heal();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    if scenario != Scenario::Flapping {
        begun = Instant::now();
        tokio::time::sleep(hold(system)).await;
    }
    cluster.net.heal();
    crate::wait_for(
        "one master with both replicas in sync after healing",
        T,
        || cluster.settled(),
    )
    .await;
    // Writes go on a moment after healing, so that the time to recover counts.
    writers
        .wait_each(10, "every writer's writes after healing")
        .await;
    let acks = writers.finish();
    let (two_masters_rounds, two_masters) = monitor.finish_timed().await;
    crate::wait_for("the last writes to reach every replica", T, || {
        cluster.settled()
    })
    .await;
    if std::env::var_os("PARTITION_DEBUG").is_some()
        && let Some(instance) = &cluster.ours
        && let Some(status) = instance.try_status().await
    {
        eprintln!(
            "{}\n{:?}",
            valkey_controller::local::control::render(&status),
            status.last_failover
        );
        for file in [
            "controller.0.log",
            "logs/demo-0.agent.log",
            "logs/demo-1.agent.log",
        ] {
            let log = std::fs::read_to_string(instance.dir.join(file)).unwrap_or_default();
            eprintln!("----- {file}\n{log}");
        }
    }
    let (plain, wait): (Vec<&Ack>, Vec<&Ack>) = acks.iter().partition(|a| !a.wait);
    let mut lost: BTreeSet<String> = BTreeSet::new();
    let keys: Vec<String> = acks.iter().map(|a| a.key.clone()).collect();
    for i in 0..3 {
        lost.extend(cluster.missing(i, &keys).await);
    }
    let lost_plain: Vec<&&Ack> = plain.iter().filter(|a| lost.contains(&a.key)).collect();
    // Availability as the application keeps it: a write acknowledged and later lost was not
    // available.
    let mut times: Vec<Instant> = acks
        .iter()
        .filter(|a| a.at >= begun && !lost.contains(&a.key))
        .map(|a| a.at)
        .collect();
    times.insert(0, begun);
    times.sort();
    let unavailable = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    Report {
        system,
        scenario,
        plain_acked: plain.len(),
        plain_lost: lost_plain.len(),
        plain_lost_within: lost_plain
            .iter()
            .map(|a| a.at.saturating_duration_since(begun))
            .max(),
        wait_acked: wait.len(),
        wait_lost: wait.iter().filter(|a| lost.contains(&a.key)).count(),
        two_masters_rounds,
        two_masters,
        unavailable,
    }
}

/// Why partition tests cannot run here, if they cannot (they then say so and pass).
pub fn unavailable() -> Option<String> {
    crate::netns::Net::unavailable()
}
