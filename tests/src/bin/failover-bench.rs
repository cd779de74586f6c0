//! Failover benchmark: ours against plain Sentinel, measured in the same run on the same
//! machine. Scenarios, each run `RUNS` times per setup:
//! - kill: SIGKILL of the master's valkey-server, timed to the first acknowledged write on
//!   another node;
//! - hang: SIGSTOP of the master, timed the same way (SIGCONT afterwards);
//! - switchover: a planned switchover (ours: `local switchover`; Sentinel: `SENTINEL
//!   FAILOVER`), measured as the longest gap between two acknowledged writes.
//!
//! Setups: plain Sentinel at down-after-milliseconds 5000 and 1000; ours under policy manual;
//! ours under policy sentinel at down-after-milliseconds 30000 and 5000.
//!
//! Clients find the master as real ones do: through Sentinel (`GET-MASTER-ADDR-BY-NAME`, asked
//! again after any error, as Sentinel-aware clients do), or under policy manual through the
//! read-write route: a pooled client (the redis crate's connection manager, never recreated)
//! behind a role-following proxy, as behind the read-write Service; like redis-py's and
//! Jedis's pools it replaces a connection that stopped answering for 1 s. For each run the bench
//! also counts how long writes kept failing after the event, and whether they still failed
//! 5 s after the new master took its first write. Two writers run together: one plain `SET` (acknowledged = replied OK),
//! one `SET` + `WAIT 1 100` (acknowledged = a replica confirmed). After each run, acknowledged
//! keys missing on the new master are counted as lost. A monitor asks every node for its role
//! every 20 ms and writes a probe key to each node that claims master; a round in which two
//! nodes accept it is a moment with two writable masters.
//!
//! Output: a table (median, p90, max), `failover-bench.csv` (one line per run) and
//! `failover-bench.png` (the distributions side by side).
//!
//! Run: `cargo build --release --workspace --bins && target/release/failover-bench [RUNS]`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use valkey_controller::local::control::{self, Request};
use valkey_e2e::{
    local::LocalInstance,
    monitor::Monitor,
    procs::{PASSWORD, Sentinel, Valkey},
    proxy::RoleProxy,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Kill,
    Hang,
    Switchover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill -9",
            Scenario::Hang => "hang (SIGSTOP)",
            Scenario::Switchover => "planned switchover",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Hang => "hang",
            Scenario::Switchover => "switchover",
        }
    }
}

/// How the client finds the master.
#[derive(Clone)]
enum Discovery {
    /// Through the read-write route: a role-following proxy (the Service), with a pooled
    /// client that reconnects on its own and never asks where the master is; the controller's
    /// status is only used to check the data afterwards.
    Routed(std::path::PathBuf, String),
    /// Sentinel ports, the monitor name, and the sentinels' password if any.
    Sentinel(Vec<u16>, String, Option<String>),
}

impl Discovery {
    async fn master(&self) -> Option<String> {
        match self {
            Discovery::Routed(dir, _) => {
                control::request(dir, &Request::Status)
                    .await
                    .ok()?
                    .status?
                    .master_addr
            }
            Discovery::Sentinel(ports, name, password) => {
                for port in ports {
                    let client =
                        redis::Client::open(sentinel_url(*port, password.as_deref())).ok()?;
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(Duration::from_millis(200)))
                        .set_response_timeout(Some(Duration::from_millis(500)));
                    let Ok(mut conn) = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                    else {
                        continue;
                    };
                    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(name)
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    if let Some((host, port)) = addr {
                        return Some(format!("{host}:{port}"));
                    }
                }
                None
            }
        }
    }
}

/// How a client logs in: the password, and for a TLS-only instance the CA it verifies with.
#[derive(Clone)]
struct Auth {
    password: String,
    ca: Option<std::path::PathBuf>,
}

impl Auth {
    fn client(&self, addr: &str) -> redis::Client {
        match &self.ca {
            None => valkey_e2e::local::client(&format!("redis://:{}@{addr}/", self.password)),
            Some(ca) => valkey_e2e::local::tls_client(ca, addr, Some(&self.password)),
        }
    }
}

/// Acknowledged writes: key number -> (node that acknowledged it, when it was sent, when it
/// was acknowledged). Behind the proxy the node is not known: "routed".
type Acks = Arc<Mutex<BTreeMap<u64, (String, Instant, Instant)>>>;

struct Writer {
    stop: Arc<AtomicBool>,
    acks: Acks,
    /// When writes failed (an error, not a slow reply).
    failures: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One write, and WAIT 1 when asked: Some(true) acknowledged, Some(false) done but not
/// confirmed by a replica, None failed.
async fn write_one<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    key: String,
    i: u64,
    wait: bool,
) -> Option<bool> {
    let set: redis::RedisResult<()> = redis::cmd("SET").arg(key).arg(i).query_async(conn).await;
    set.ok()?;
    if !wait {
        return Some(true);
    }
    let replicas: redis::RedisResult<i64> =
        redis::cmd("WAIT").arg(1).arg(100).query_async(conn).await;
    Some(replicas.is_ok_and(|n| n >= 1))
}

fn conn_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(200)))
        .set_response_timeout(Some(Duration::from_millis(1000)))
}

impl Writer {
    /// Writes `<prefix><n>` in a loop to the master it finds; `wait` adds `WAIT 1 100` and
    /// counts a write as acknowledged only when a replica confirmed it.
    fn start(discovery: Discovery, auth: Auth, prefix: &'static str, wait: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Acks = Arc::default();
        let failures: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let (stop_flag, acks_ref, failed) = (stop.clone(), acks.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let record = |i: u64, addr: &str, sent: Instant, acked: Option<bool>| match acked {
                Some(true) => {
                    acks_ref
                        .lock()
                        .unwrap()
                        .insert(i, (addr.to_owned(), sent, Instant::now()));
                }
                Some(false) => {}
                None => failed.lock().unwrap().push(Instant::now()),
            };
            let mut i = 0u64;
            // FAILOVER_BENCH_PACE_MS: a pause after each acknowledged write (default none: each
            // writer writes as fast as it is answered, which keeps both cores busy).
            let pace = Duration::from_millis(
                std::env::var("FAILOVER_BENCH_PACE_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            );
            if let Discovery::Routed(_, proxy) = &discovery {
                let client = auth.client(proxy);
                // Reconnects within milliseconds: 2 ms doubling to 10 ms between attempts (the
                // default waits 100 ms at least).
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_millis(200)))
                    .set_response_timeout(Some(Duration::from_millis(1000)))
                    .set_min_delay(Duration::from_millis(2))
                    .set_max_delay(Duration::from_millis(10));
                let pool = || {
                    redis::aio::ConnectionManager::new_with_config(client.clone(), config.clone())
                };
                let mut conn = pool().await.expect("pooled client");
                let mut answered = Instant::now();
                while !stop_flag.load(Ordering::Relaxed) {
                    i += 1;
                    let sent = Instant::now();
                    let acked = write_one(&mut conn, format!("{prefix}{i}"), i, wait).await;
                    record(i, "routed", sent, acked);
                    if acked.is_some() {
                        answered = Instant::now();
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                        continue;
                    }
                    // A connection that stopped answering (a hung master: a timeout, then
                    // errors while the manager waits on it) is replaced, as pools such as
                    // redis-py's and Jedis's discard it; other errors are the manager's to
                    // recover from.
                    if answered.elapsed() >= Duration::from_millis(1000) {
                        if let Ok(fresh) = pool().await {
                            conn = fresh;
                        }
                        answered = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                return;
            }
            let mut conn: Option<(String, redis::aio::MultiplexedConnection)> = None;
            while !stop_flag.load(Ordering::Relaxed) {
                if conn.is_none() {
                    let Some(addr) = discovery.master().await else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    };
                    let client = auth.client(&addr);
                    match client
                        .get_multiplexed_async_connection_with_config(&conn_config())
                        .await
                    {
                        Ok(c) => conn = Some((addr, c)),
                        Err(_) => {
                            failed.lock().unwrap().push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                    }
                }
                let Some((addr, c)) = conn.as_mut() else {
                    continue;
                };
                i += 1;
                let sent = Instant::now();
                let acked = write_one(c, format!("{prefix}{i}"), i, wait).await;
                record(i, addr, sent, acked);
                if acked.is_some() && !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
                if acked.is_none() {
                    // As Sentinel-aware clients do: ask again where the master is.
                    conn = None;
                }
            }
        });
        Self {
            stop,
            acks,
            failures,
            task,
        }
    }

    /// How long after `since` writes still failed (zero if none did).
    fn failing_for(&self, since: Instant) -> Duration {
        self.failures
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t > since)
            .max()
            .map_or(Duration::ZERO, |t| *t - since)
    }

    /// The first write sent after `since` and acknowledged by another node than `old`.
    fn first_elsewhere(&self, since: Instant, old: &str) -> Option<Instant> {
        let acks = self.acks.lock().unwrap();
        acks.values()
            .filter(|(a, sent, _)| a != old && *sent > since)
            .map(|(_, _, t)| *t)
            .min()
    }

    /// The longest time between two consecutive acknowledged writes after `since`.
    fn longest_gap(&self, since: Instant) -> Duration {
        let acks = self.acks.lock().unwrap();
        let mut times: Vec<Instant> = acks
            .values()
            .map(|(_, _, t)| *t)
            .filter(|t| *t > since)
            .collect();
        times.sort();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    async fn finish(self) -> BTreeMap<u64, (String, Instant, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.acks.lock().unwrap().clone()
    }
}

#[derive(Clone, Debug)]
struct Sample {
    setup: &'static str,
    scenario: Scenario,
    /// Failover time (kill, hang) or the longest write gap (switchover).
    time: Duration,
    lost_plain: usize,
    lost_waited: usize,
    double_master_rounds: u64,
    /// No new master within 90 s.
    failed: bool,
    /// From the event to the last failed write.
    failing: Duration,
    /// Writes still failed more than 5 s after the new master took its first one.
    stuck: bool,
    /// Ours: when the controller recorded the failover, from the event (its clock and ours
    /// are the same). Tells a slow decision from a slow client.
    decided: Option<Duration>,
}

async fn missing_on(addr: &str, auth: &Auth, prefix: &str, keys: &BTreeSet<u64>) -> usize {
    let client = auth.client(addr);
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let mut missing = 0;
    let keys: Vec<u64> = keys.iter().copied().collect();
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.exists(format!("{prefix}{k}"));
        }
        let found: Vec<bool> = pipe.query_async(&mut conn).await.expect("EXISTS");
        missing += found.iter().filter(|f| !**f).count();
    }
    missing
}

/// What a setup gives one run: how to find the master, the nodes, the master's address and
/// pid, and how to ask for a planned switchover.
struct Target {
    discovery: Discovery,
    auth: Auth,
    nodes: Vec<String>,
    master_addr: String,
    master_pid: u32,
    /// Asks for a planned switchover; when the request that was accepted was sent.
    switchover: Box<dyn Fn() -> futures::future::BoxFuture<'static, Instant> + Send + Sync>,
}

async fn measure(setup: &'static str, scenario: Scenario, target: Target) -> Sample {
    let plain = Writer::start(target.discovery.clone(), target.auth.clone(), "p", false);
    let waited = Writer::start(target.discovery.clone(), target.auth.clone(), "w", true);
    let auth = target.auth.clone();
    let monitor = Monitor::start(target.nodes.clone(), move |addr| auth.client(addr));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = Pid::from_raw(target.master_pid as i32);
    let wall = std::time::SystemTime::now();
    // The event: the signal, or the switchover request that was accepted (ours is refused
    // while Sentinel has not seen the replicas' priorities yet, up to 10 s after the last).
    let started = match scenario {
        Scenario::Kill => {
            nix::sys::signal::kill(pid, Signal::SIGKILL).expect("kill");
            Instant::now()
        }
        Scenario::Hang => {
            nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("stop");
            Instant::now()
        }
        Scenario::Switchover => (target.switchover)().await,
    };
    let deadline = started + Duration::from_secs(90);
    let moved = loop {
        if let Some(t) = plain.first_elsewhere(started, &target.master_addr) {
            break Some(t);
        }
        if Instant::now() > deadline {
            eprintln!("{setup} / {}: no new master within 90 s", scenario.name());
            break None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    if scenario == Scenario::Hang {
        nix::sys::signal::kill(pid, Signal::SIGCONT).expect("cont");
    }
    // Keep writing and watching a while: a resumed old master must not take writes, and a
    // client must not still be failing 5 s after the event.
    let watch_until =
        (moved.unwrap_or(started) + Duration::from_secs(2)).max(started + Duration::from_secs(6));
    tokio::time::sleep(watch_until.saturating_duration_since(Instant::now())).await;
    let failing = plain.failing_for(started).max(waited.failing_for(started));
    let settled = moved.unwrap_or(started).max(started);
    let stuck = moved.is_none()
        || plain.failing_for(settled) > Duration::from_secs(5)
        || waited.failing_for(settled) > Duration::from_secs(5);
    let gap = plain.longest_gap(started - Duration::from_millis(500));
    let double_master_rounds = monitor.finish().await;
    let plain_acks = plain.finish().await;
    let waited_acks = waited.finish().await;
    let new_master = match target.discovery.master().await {
        Some(master) => master,
        None => target.master_addr.clone(),
    };
    let keys = |acks: &BTreeMap<u64, (String, Instant, Instant)>| {
        acks.keys().copied().collect::<BTreeSet<u64>>()
    };
    let lost_plain = missing_on(&new_master, &target.auth, "p", &keys(&plain_acks)).await;
    let lost_waited = missing_on(&new_master, &target.auth, "w", &keys(&waited_acks)).await;
    let time = match (scenario, moved) {
        (Scenario::Switchover, _) => gap,
        (_, Some(moved)) => moved - started,
        (_, None) => Duration::from_secs(90),
    };
    let decided = match &target.discovery {
        Discovery::Routed(dir, _) => control::request(dir, &Request::Status)
            .await
            .ok()
            .and_then(|reply| reply.status?.last_failover)
            .and_then(|record| {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(record.at_ms as u64);
                at.duration_since(wall).ok()
            }),
        Discovery::Sentinel(..) => None,
    };
    let sample = Sample {
        setup,
        scenario,
        decided,
        time,
        lost_plain,
        lost_waited,
        double_master_rounds,
        failed: moved.is_none(),
        failing,
        stuck,
    };
    eprintln!("{setup} / {}: {sample:?}", scenario.name());
    sample
}

const SCENARIOS: [Scenario; 3] = [Scenario::Kill, Scenario::Hang, Scenario::Switchover];

/// The scenarios to run: all, or those named in FAILOVER_BENCH_SCENARIOS (`kill,switchover`).
fn scenarios() -> Vec<Scenario> {
    let only = std::env::var("FAILOVER_BENCH_SCENARIOS").ok();
    SCENARIOS
        .into_iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|k| k.trim() == s.key()))
        })
        .collect()
}

/// Ours in the local runtime: one instance for every run, healed between runs.
async fn ours(setup: &'static str, manifest: &str, sentinel: bool, runs: usize) -> Vec<Sample> {
    let instance = Arc::new(LocalInstance::up(manifest));
    let proxy = RoleProxy::for_local(instance.dir.clone()).await;
    let mut samples = Vec::new();
    for scenario in scenarios() {
        for _ in 0..runs {
            let status = instance
                .wait_status(
                    "a master with in-sync replicas",
                    Duration::from_secs(120),
                    |s| {
                        s.nodes.len() == 3
                            && s.nodes.iter().all(|n| n.connected && n.process == "up")
                            && s.nodes.iter().filter(|n| n.role == "master").count() == 1
                            && s.nodes
                                .iter()
                                .filter(|n| n.role == "replica")
                                .all(|n| n.link == "up")
                            && (!sentinel
                                || s.monitor
                                    .nodes
                                    .iter()
                                    .all(|m| m.connected && m.master == s.master_addr))
                    },
                )
                .await;
            let master = status.master.clone().expect("master");
            let node = status.nodes.iter().find(|n| n.pod == master).expect("node");
            let discovery = if sentinel {
                let ports: Vec<u16> = status
                    .monitor
                    .nodes
                    .iter()
                    .map(|m| {
                        m.addr
                            .rsplit_once(':')
                            .expect("addr")
                            .1
                            .parse()
                            .expect("port")
                    })
                    .collect();
                for port in &ports {
                    sentinel_knows_replicas(
                        *port,
                        status.monitor.name.as_deref().expect("monitor"),
                        2,
                        instance.sentinel_password().as_deref(),
                    )
                    .await;
                }
                Discovery::Sentinel(
                    ports,
                    status.monitor.name.clone().expect("monitor"),
                    instance.sentinel_password(),
                )
            } else {
                Discovery::Routed(instance.dir.clone(), proxy.addr())
            };
            let for_switchover = instance.clone();
            let target = Target {
                discovery,
                auth: Auth {
                    password: instance.password(),
                    ca: Some(instance.dir.join("tls").join("ca.crt"))
                        .filter(|_| instance.dir.join("tls").join("tls.crt").exists()),
                },
                nodes: status.nodes.iter().map(|n| n.addr.clone()).collect(),
                master_addr: node.addr.clone(),
                master_pid: node.valkey_pid.expect("pid"),
                switchover: Box::new(move || {
                    let instance = for_switchover.clone();
                    Box::pin(async move {
                        // Retried while the controller says the replicas are not ready yet.
                        for _ in 0..200 {
                            let sent = Instant::now();
                            if instance.switchover(None).await.ok {
                                return sent;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        panic!("the controller never accepted the switchover");
                    })
                }),
            };
            samples.push(measure(setup, scenario, target).await);
        }
    }
    samples
}

/// A sentinel on loopback, with its password if it has one.
fn sentinel_url(port: u16, password: Option<&str>) -> String {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    format!("redis://{auth}127.0.0.1:{port}/")
}

/// Waits until a sentinel knows `n` replicas in good standing (flags exactly "slave").
async fn sentinel_knows_replicas(port: u16, name: &str, n: usize, password: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = redis::Client::open(sentinel_url(port, password)).expect("client");
    loop {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let replicas: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
                .arg("REPLICAS")
                .arg(name)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            let good = replicas
                .iter()
                .filter(|r| r.get("flags").map(String::as_str) == Some("slave"))
                .count();
            if good >= n {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "sentinel did not learn its replicas"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Plain Sentinel: fresh processes for every run.
async fn plain_sentinel(setup: &'static str, down_after_ms: u64, runs: usize) -> Vec<Sample> {
    let mut samples = Vec::new();
    for scenario in scenarios() {
        for _ in 0..runs {
            let master = Valkey::start("m");
            let port = master.port.to_string();
            let replicas = [
                Valkey::start_with("r1", &["--replicaof", "127.0.0.1", &port]),
                Valkey::start_with("r2", &["--replicaof", "127.0.0.1", &port]),
            ];
            let sentinels: Vec<Sentinel> = (0..3)
                .map(|_| Sentinel::monitoring("bench", master.port, 2, down_after_ms))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            for s in &sentinels {
                loop {
                    let mut conn = s
                        .client()
                        .get_multiplexed_async_connection()
                        .await
                        .expect("sentinel");
                    let info: std::collections::HashMap<String, String> = redis::cmd("SENTINEL")
                        .arg("MASTER")
                        .arg("bench")
                        .query_async(&mut conn)
                        .await
                        .expect("SENTINEL MASTER");
                    if info.get("num-slaves").map(String::as_str) == Some("2")
                        && info.get("num-other-sentinels").map(String::as_str) == Some("2")
                    {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "sentinels did not discover each other"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                sentinel_knows_replicas(s.port, "bench", 2, None).await;
            }
            let first_sentinel = sentinels[0].port;
            let target = Target {
                discovery: Discovery::Sentinel(
                    sentinels.iter().map(|s| s.port).collect(),
                    "bench".into(),
                    None,
                ),
                auth: Auth {
                    password: PASSWORD.into(),
                    ca: None,
                },
                nodes: std::iter::once(master.addr())
                    .chain(replicas.iter().map(Valkey::addr))
                    .collect(),
                master_addr: master.addr(),
                master_pid: master.proc().pid().as_raw() as u32,
                switchover: Box::new(move || {
                    Box::pin(async move {
                        let sent = Instant::now();
                        let client =
                            redis::Client::open(format!("redis://127.0.0.1:{first_sentinel}/"))
                                .expect("client");
                        let mut conn = client
                            .get_multiplexed_async_connection()
                            .await
                            .expect("sentinel");
                        let _: String = redis::cmd("SENTINEL")
                            .arg("FAILOVER")
                            .arg("bench")
                            .query_async(&mut conn)
                            .await
                            .expect("SENTINEL FAILOVER");
                        sent
                    })
                }),
            };
            samples.push(measure(setup, scenario, target).await);
            drop(sentinels);
            drop(replicas);
        }
    }
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn table(samples: &[Sample], setups: &[&'static str]) -> String {
    let mut out = String::from(
        "| scenario | setup | runs | median ms | p90 ms | max ms | writes failing median ms | max ms | lost SET acks | lost WAIT 1 acks | two-master rounds | no failover | still failing 5 s on |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for scenario in scenarios() {
        for setup in setups {
            let of: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.scenario == scenario && s.setup == *setup)
                .collect();
            if of.is_empty() {
                continue;
            }
            let mut times: Vec<Duration> = of.iter().map(|s| s.time).collect();
            times.sort();
            let mut failing: Vec<Duration> = of.iter().map(|s| s.failing).collect();
            failing.sort();
            out.push_str(&format!(
                "| {} | {setup} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                scenario.name(),
                of.len(),
                ms(percentile(&times, 0.5)),
                ms(percentile(&times, 0.9)),
                ms(*times.last().expect("samples")),
                ms(percentile(&failing, 0.5)),
                ms(*failing.last().expect("samples")),
                of.iter().map(|s| s.lost_plain).sum::<usize>(),
                of.iter().map(|s| s.lost_waited).sum::<usize>(),
                of.iter().map(|s| s.double_master_rounds).sum::<u64>(),
                of.iter().filter(|s| s.failed).count(),
                of.iter().filter(|s| s.stuck).count(),
            ));
        }
    }
    out
}

/// Three panels (one per scenario), each setup's runs as points on a log time axis.
fn chart(
    samples: &[Sample],
    setups: &[&'static str],
    path: &std::path::Path,
) -> Result<(), String> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| format!("DejaVuSans.ttf (apt-get install fonts-dejavu-core): {e}"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "registering the font".to_owned())?;
    let root = BitMapBackend::new(path, (1500, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, SCENARIOS.len()));
    let colors = [RED, MAGENTA, BLUE, GREEN, CYAN];
    for (panel, scenario) in panels.iter().zip(SCENARIOS) {
        let title = match scenario {
            Scenario::Switchover => "planned switchover: longest write gap (ms)".to_owned(),
            _ => format!("{}: to first write on the new master (ms)", scenario.name()),
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(110)
            .y_label_area_size(55)
            .build_cartesian_2d(
                -0.5f64..(setups.len() as f64 - 0.5),
                (1f64..100_000f64).log_scale(),
            )
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_labels(setups.len())
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                setups
                    .get(i)
                    .map(|s| {
                        s.replace("plain Sentinel, down-after ", "Sentinel ")
                            .replace("ours, policy ", "ours ")
                            .replace(", down-after ", " ")
                    })
                    .unwrap_or_default()
            })
            .x_label_style(
                ("sans-serif", 11)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .y_label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, setup) in setups.iter().enumerate() {
            let color = colors[i % colors.len()];
            let times: Vec<f64> = samples
                .iter()
                .filter(|s| s.scenario == scenario && s.setup == *setup)
                .map(|s| (s.time.as_secs_f64() * 1000.0).max(1.0))
                .collect();
            let n = times.len().max(1) as f64;
            chart
                .draw_series(times.iter().enumerate().map(|(j, t)| {
                    let x = i as f64 - 0.25 + 0.5 * (j as f64 + 0.5) / n;
                    Circle::new((x, *t), 4, color.filled())
                }))
                .map_err(|e| e.to_string())?;
            let mut sorted = times.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            if let Some(median) = sorted.get(sorted.len() / 2) {
                chart
                    .draw_series(LineSeries::new(
                        [(i as f64 - 0.35, *median), (i as f64 + 0.35, *median)],
                        BLACK.stroke_width(2),
                    ))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    root.present().map_err(|e| e.to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = include_str!("../../../deploy/examples/failover.yaml");
    let seed_5000 = seed.replace(
        "down-after-milliseconds: \"30000\"",
        "down-after-milliseconds: \"5000\"",
    );
    assert_ne!(
        seed, seed_5000,
        "the seed example sets down-after-milliseconds"
    );
    let manual = "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: bench\n  namespace: bench\nspec:\n  replicas: 3\n";
    let manual_tls = format!("{manual}  access:\n    enableTLS: true\n");
    let setups = [
        "plain Sentinel, down-after 5000",
        "plain Sentinel, down-after 1000",
        "ours, policy manual",
        "ours, policy sentinel, down-after 30000",
        "ours, policy sentinel, down-after 5000",
        "ours, policy manual, TLS",
    ];
    // FAILOVER_BENCH_SETUPS=0,2 runs only those setups (by their index above).
    let only: Option<Vec<usize>> = std::env::var("FAILOVER_BENCH_SETUPS")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    let wanted = |i: usize| only.as_ref().is_none_or(|o| o.contains(&i));
    let mut samples = Vec::new();
    if wanted(0) {
        samples.extend(plain_sentinel(setups[0], 5000, runs).await);
    }
    if wanted(1) {
        samples.extend(plain_sentinel(setups[1], 1000, runs).await);
    }
    if wanted(2) {
        samples.extend(ours(setups[2], manual, false, runs).await);
    }
    if wanted(3) {
        samples.extend(ours(setups[3], seed, true, runs).await);
    }
    if wanted(4) {
        samples.extend(ours(setups[4], &seed_5000, true, runs).await);
    }
    if wanted(5) {
        samples.extend(ours(setups[5], &manual_tls, false, runs).await);
    }

    println!("{}", table(&samples, &setups));
    let csv: String = samples
        .iter()
        .map(|s| {
            format!(
                "\"{}\",{},{:.1},{},{},{},{},{:.1},{},{}\n",
                s.setup,
                s.scenario.key(),
                s.time.as_secs_f64() * 1000.0,
                s.lost_plain,
                s.lost_waited,
                s.double_master_rounds,
                s.failed,
                s.failing.as_secs_f64() * 1000.0,
                s.stuck,
                s.decided
                    .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
                    .unwrap_or_default()
            )
        })
        .collect();
    std::fs::write(
        "failover-bench.csv",
        format!(
            "setup,scenario,ms,lost_set_acks,lost_wait1_acks,two_master_rounds,failed,failing_ms,stuck,decided_ms\n{csv}"
        ),
    )
    .expect("write csv");
    match chart(
        &samples,
        &setups,
        std::path::Path::new("failover-bench.png"),
    ) {
        Ok(()) => println!("chart: failover-bench.png"),
        Err(err) => eprintln!("no chart: {err}"),
    }
    println!("per-run figures: failover-bench.csv");
}
