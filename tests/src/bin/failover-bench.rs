//! Failover benchmark: kill -9 of the master, timed from the kill to the first acknowledged
//! write on the new master, with a client that finds the master as a real one would (through
//! the controller's status, or through Sentinel). Also counts acknowledged writes lost (plain
//! SET replies, and SET + WAIT 1). Ours (policy manual, local runtime) against plain Sentinel
//! (down-after-milliseconds 1000), measured in the same run.
//!
//! Run: `cargo build --release --workspace --bins && target/release/failover-bench [RUNS]`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use redis::AsyncCommands;
use valkey_controller::local::control::{self, Request};
use valkey_e2e::{
    local::{LocalInstance, manifest},
    procs::{PASSWORD, Sentinel, Valkey},
};

/// How the client finds the master.
#[derive(Clone)]
enum Discovery {
    Controller(std::path::PathBuf),
    /// Sentinel ports and the monitor name.
    Sentinel(Vec<u16>, String),
}

impl Discovery {
    async fn master(&self) -> Option<String> {
        match self {
            Discovery::Controller(dir) => {
                control::request(dir, &Request::Status)
                    .await
                    .ok()?
                    .status?
                    .master_addr
            }
            Discovery::Sentinel(ports, name) => {
                for port in ports {
                    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
                    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
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

#[derive(Default)]
struct Log {
    /// key -> (address it was acknowledged by, when)
    plain: BTreeMap<u64, (String, Instant)>,
    waited: BTreeMap<u64, String>,
}

struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(discovery: Discovery, password: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Log::default()));
        let (stop_flag, log_ref) = (stop.clone(), log.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            let mut conn: Option<(String, redis::aio::MultiplexedConnection)> = None;
            while !stop_flag.load(Ordering::Relaxed) {
                if conn.is_none() {
                    let Some(addr) = discovery.master().await else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    };
                    let client = redis::Client::open(format!("redis://:{password}@{addr}/"))
                        .expect("client");
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(Duration::from_millis(200)))
                        .set_response_timeout(Some(Duration::from_millis(1000)));
                    match client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                    {
                        Ok(c) => conn = Some((addr, c)),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                    }
                }
                let Some((addr, c)) = conn.as_mut() else {
                    continue;
                };
                i += 1;
                let set: redis::RedisResult<()> = c.set(format!("w{i}"), i).await;
                if set.is_err() {
                    conn = None;
                    continue;
                }
                log_ref
                    .lock()
                    .unwrap()
                    .plain
                    .insert(i, (addr.clone(), Instant::now()));
                let acks: redis::RedisResult<i64> =
                    redis::cmd("WAIT").arg(1).arg(100).query_async(c).await;
                if acks.is_ok_and(|n| n >= 1) {
                    log_ref.lock().unwrap().waited.insert(i, addr.clone());
                }
            }
        });
        Self { stop, log, task }
    }

    /// The first acknowledged write after `since` by a node other than `old`.
    fn first_elsewhere(&self, since: Instant, old: &str) -> Option<Instant> {
        let log = self.log.lock().unwrap();
        log.plain
            .values()
            .filter(|(a, t)| a != old && *t > since)
            .map(|(_, t)| *t)
            .min()
    }

    async fn finish(self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        Arc::try_unwrap(self.log)
            .ok()
            .expect("writer done")
            .into_inner()
            .unwrap()
    }
}

struct Sample {
    failover: Duration,
    lost_plain: usize,
    lost_waited: usize,
}

async fn missing_on(addr: &str, password: &str, keys: impl Iterator<Item = u64>) -> usize {
    let client = redis::Client::open(format!("redis://:{password}@{addr}/")).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let mut missing = 0;
    for k in keys {
        let exists: bool = conn.exists(format!("w{k}")).await.expect("EXISTS");
        missing += usize::from(!exists);
    }
    missing
}

/// Kills the master at `old_addr` (pid), waits for the first write elsewhere, then counts losses.
async fn measure(discovery: Discovery, password: &str, old_addr: &str, pid: u32) -> Sample {
    let writer = Writer::start(discovery.clone(), password.to_owned());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill");
    let deadline = killed + Duration::from_secs(60);
    let first = loop {
        if let Some(t) = writer.first_elsewhere(killed, old_addr) {
            break t;
        }
        assert!(Instant::now() < deadline, "no failover within 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = writer.finish().await;
    let new_addr = discovery.master().await.expect("a master");
    let lost_plain = missing_on(&new_addr, password, log.plain.keys().copied()).await;
    let lost_waited = missing_on(&new_addr, password, log.waited.keys().copied()).await;
    Sample {
        failover: first - killed,
        lost_plain,
        lost_waited,
    }
}

async fn ours(runs: usize) -> Vec<Sample> {
    let instance = LocalInstance::up(&manifest(3));
    let mut samples = Vec::new();
    for run in 0..runs {
        let status = instance.wait_healthy(3, Duration::from_secs(60)).await;
        let master = status.master.clone().expect("master");
        let node = status.nodes.iter().find(|n| n.pod == master).expect("node");
        let sample = measure(
            Discovery::Controller(instance.dir.clone()),
            &instance.password(),
            &node.addr,
            node.valkey_pid.expect("pid"),
        )
        .await;
        eprintln!("ours run {run}: {:?}", sample.failover);
        samples.push(sample);
    }
    samples
}

/// Waits until a sentinel knows `n` replicas in good standing (flags exactly "slave").
async fn sentinel_knows_replicas(port: u16, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
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

/// Ours under policy sentinel: the seed's example (down-after-milliseconds 30000).
async fn ours_sentinel(runs: usize) -> Vec<Sample> {
    let instance = LocalInstance::up(include_str!("../../../deploy/examples/failover.yaml"));
    let name = "valkey-system.example-failover";
    let mut samples = Vec::new();
    for run in 0..runs {
        let status = instance
            .wait_status(
                "a master every sentinel names",
                Duration::from_secs(60),
                |s| {
                    s.nodes.iter().all(|n| n.connected && n.process == "up")
                        && s.nodes.iter().filter(|n| n.role == "master").count() == 1
                        && s.nodes
                            .iter()
                            .filter(|n| n.role == "replica")
                            .all(|n| n.link == "up")
                        && s.monitor.nodes.iter().all(|m| m.master == s.master_addr)
                },
            )
            .await;
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
            sentinel_knows_replicas(*port, name, 2).await;
        }
        let master = status.master.clone().expect("master");
        let node = status.nodes.iter().find(|n| n.pod == master).expect("node");
        let sample = measure(
            Discovery::Sentinel(ports, name.into()),
            &instance.password(),
            &node.addr,
            node.valkey_pid.expect("pid"),
        )
        .await;
        eprintln!("ours sentinel run {run}: {:?}", sample.failover);
        samples.push(sample);
    }
    samples
}

async fn sentinel(runs: usize, down_after_ms: u64) -> Vec<Sample> {
    let mut samples = Vec::new();
    for run in 0..runs {
        let master = Valkey::start("m");
        let port = master.port.to_string();
        let replicas = [
            Valkey::start_with("r1", &["--replicaof", "127.0.0.1", &port]),
            Valkey::start_with("r2", &["--replicaof", "127.0.0.1", &port]),
        ];
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| Sentinel::monitoring("bench", master.port, 2, down_after_ms))
            .collect();
        // Ready when every sentinel knows both replicas and the two other sentinels.
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
        }
        let pid = master.proc().pid().as_raw() as u32;
        let sample = measure(
            Discovery::Sentinel(sentinels.iter().map(|s| s.port).collect(), "bench".into()),
            PASSWORD,
            &master.addr(),
            pid,
        )
        .await;
        eprintln!("sentinel {down_after_ms} run {run}: {:?}", sample.failover);
        samples.push(sample);
        drop(replicas);
    }
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn row(name: &str, samples: &[Sample]) -> String {
    let mut times: Vec<Duration> = samples.iter().map(|s| s.failover).collect();
    times.sort();
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} |",
        samples.len(),
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.9)),
        ms(*times.last().expect("samples")),
        samples.iter().map(|s| s.lost_plain).sum::<usize>(),
        samples.iter().map(|s| s.lost_waited).sum::<usize>(),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let ours = ours(runs).await;
    let ours_sentinel = ours_sentinel(runs).await;
    let sentinel_1000 = sentinel(runs, 1000).await;
    println!(
        "kill -9 of the master -> first acknowledged write on the new master ({runs} runs each)\n"
    );
    println!("| setup | runs | median ms | p90 ms | max ms | lost SET acks | lost WAIT 1 acks |");
    println!("|---|---|---|---|---|---|---|");
    println!("{}", row("ours, policy manual (local runtime)", &ours));
    println!(
        "{}",
        row(
            "ours, policy sentinel, down-after-milliseconds 30000 (seed example)",
            &ours_sentinel
        )
    );
    println!(
        "{}",
        row(
            "plain Sentinel, down-after-milliseconds 1000",
            &sentinel_1000
        )
    );
    let csv: String = ours
        .iter()
        .map(|s| ("ours-manual", s))
        .chain(ours_sentinel.iter().map(|s| ("ours-sentinel-30000", s)))
        .chain(sentinel_1000.iter().map(|s| ("sentinel-1000", s)))
        .map(|(name, s)| {
            format!(
                "{name},{:.1},{},{}\n",
                s.failover.as_secs_f64() * 1000.0,
                s.lost_plain,
                s.lost_waited
            )
        })
        .collect();
    let path = std::path::Path::new("failover-bench.csv");
    std::fs::write(
        path,
        format!("setup,failover_ms,lost_set_acks,lost_wait1_acks\n{csv}"),
    )
    .expect("write csv");
    println!("\nper-run figures: {}", path.display());
}
