//! What an attacker without a token costs failover and the controller: `local up` (3 nodes,
//! policy manual), kill -9 failovers with nothing else going on, then under each flood in turn:
//!
//! - `hub idle+large`: 2,000 idle connections to the hub kept open (replaced as the hub closes
//!   them) and 80 loops of gRPC streams each sending a Hello of almost 4 MiB;
//! - `hub silent`: 64 TLS connections to the hub, each with the 4 streams it may open, none of
//!   which ever says hello (16 such connections once held every Hello slot);
//! - `agent ports`: 1,100 idle connections to each agent's gRPC and metrics ports, with each
//!   agent held to 1,024 descriptors (`prlimit`), as a container's default limit would.
//!
//! Per phase: kill -9 failovers, timed from the kill to the controller's decision
//! (`last_failover.at_ms`) and to the new master in status (none within 30 s is counted as a
//! failure, not waited for); then a kill -9 of a replica's agent, timed until its restart is
//! connected to the hub again; the controller's resident memory (before, peak, after).
//!
//! Run: `cargo build --release --workspace --bins && target/release/hub-flood [ROUNDS]`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use valkey_e2e::{
    flood::{Flood, raise_fd_limit},
    local::{LocalInstance, manifest, master_of, signal, write_n},
};

const T: Duration = Duration::from_secs(30);

/// Resident memory of `pid`, MiB.
fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One kill -9 of the master: (ms to the controller's decision, ms to the new master in
/// status), or None when no new master shows within [`T`]. Err when the instance is not
/// healthy to begin with (a failover before it failed for good).
async fn failover(instance: &LocalInstance) -> Result<Option<(f64, f64)>, ()> {
    let before = instance.try_healthy(3, T).await.ok_or(())?;
    let (old, addr, pid) = master_of(&before);
    write_n(instance, &addr, 10, 2).await;
    let (killed_at, started) = (now_ms(), Instant::now());
    signal(pid, Signal::SIGKILL);
    let deadline = started + T;
    loop {
        if let Some(after) = instance.try_status().await
            && after.master.as_ref().is_some_and(|m| *m != old)
        {
            let seen = started.elapsed().as_secs_f64() * 1000.0;
            let decided = after
                .last_failover
                .as_ref()
                .map_or(f64::NAN, |f| (f.at_ms - killed_at) as f64);
            return Ok(Some((decided, seen)));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// kill -9 of a replica's agent: ms until the runtime's restart of it is connected to the hub
/// again, or None when it is not within [`T`].
async fn agent_back(instance: &LocalInstance) -> Option<f64> {
    let status = instance.try_healthy(3, T).await?;
    let (pod, pid) = status
        .nodes
        .iter()
        .filter(|n| Some(&n.pod) != status.master.as_ref())
        .find_map(|n| Some((n.pod.clone(), n.agent_pid?)))?;
    let started = Instant::now();
    signal(pid, Signal::SIGKILL);
    while started.elapsed() < T {
        if let Some(now) = instance.try_status().await
            && now
                .nodes
                .iter()
                .any(|n| n.pod == pod && n.connected && n.agent_pid.is_some_and(|p| p != pid))
        {
            return Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// One phase's results.
struct Phase {
    name: &'static str,
    /// Each kill -9: (ms to the decision, ms to the new master), or None without one.
    runs: Vec<Option<(f64, f64)>>,
    rss_before: f64,
    rss_peak: f64,
    /// kill -9 of a replica's agent: ms until its restart is connected again (None: not
    /// within 30 s).
    agent_back: Option<f64>,
    /// What the flood opened.
    opened: String,
}

impl Phase {
    /// Its line of the table.
    fn row(&self) -> String {
        let done: Vec<(f64, f64)> = self.runs.iter().flatten().copied().collect();
        let decided: Vec<f64> = done.iter().map(|r| r.0).collect();
        let seen: Vec<f64> = done.iter().map(|r| r.1).collect();
        format!(
            "{:<16} {:>8} {:>15.1} {:>15.1} {:>12.1} {:>12.1} {:>14} {:>10.1} {:>10.1}  {}",
            self.name,
            format!("{}/{}", self.runs.len() - done.len(), self.runs.len()),
            median(decided.clone()),
            max(&decided),
            median(seen.clone()),
            max(&seen),
            self.agent_back
                .map_or_else(|| "never".to_owned(), |ms| format!("{ms:.0}")),
            self.rss_before,
            self.rss_peak,
            self.opened
        )
    }
}

/// The agents' listening ports (`--listen`, `--metrics-listen`), from their command lines.
fn agent_ports(status: &valkey_controller::local::control::Status) -> Vec<std::net::SocketAddr> {
    let mut ports = Vec::new();
    for pid in status.nodes.iter().filter_map(|n| n.agent_pid) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        for flag in ["--listen", "--metrics-listen"] {
            if let Some(addr) = args
                .iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1)?.parse().ok())
            {
                ports.push(addr);
            }
        }
    }
    ports
}

/// Holds each agent to `limit` descriptors; false when `prlimit` is missing or refused.
fn limit_agents(status: &valkey_controller::local::control::Status, limit: u64) -> bool {
    status.nodes.iter().filter_map(|n| n.agent_pid).all(|pid| {
        std::process::Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={limit}:{limit}"))
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Waits until `flood` has opened `at_least` connections or streams (at most a minute).
async fn flood_going(flood: &Flood, at_least: u64) {
    let started = Instant::now();
    while flood.counts.connections.load(Ordering::Relaxed)
        + flood.counts.streams.load(Ordering::Relaxed)
        < at_least
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let fds = raise_fd_limit();
    let idle = 2000.min(fds.saturating_sub(400) as usize);
    let mut instance = LocalInstance::up(&manifest(3));
    let status = instance.wait_healthy(3, T).await;
    let pid = instance.proc_mut().expect("local up").pid().as_raw();
    let ca = std::fs::read_to_string(instance.dir.join("tls").join("ca.crt")).unwrap();
    let log = std::fs::read_to_string(instance.dir.join("controller.0.log")).unwrap();
    let hub: std::net::SocketAddr = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hub=")?.parse().ok())
        .expect("hub address");
    let targets = agent_ports(&status);
    let per_port = 1100.min((fds.saturating_sub(400) as usize) / targets.len().max(1));
    let limited = limit_agents(&status, 1024);

    let peak = Arc::new(Mutex::new(rss_mib(pid)));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let now = rss_mib(pid);
                if let Ok(mut p) = peak.lock() {
                    *p = p.max(now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut phases: Vec<Phase> = Vec::new();
    for phase in ["quiet", "hub idle+large", "hub silent", "agent ports"] {
        let before = rss_mib(pid);
        *peak.lock().unwrap() = before;
        let flood = match phase {
            "hub idle+large" => Some((Flood::start(hub, ca.clone(), idle, 80), idle as u64)),
            "hub silent" => Some((Flood::silent(hub, ca.clone(), 64, None), 64 * 4)),
            "agent ports" => Some((
                Flood::idle(&targets, per_port),
                (per_port * targets.len()) as u64,
            )),
            _ => None,
        };
        if let Some((flood, at_least)) = &flood {
            flood_going(flood, *at_least).await;
        }
        let mut runs = Vec::new();
        for _ in 0..rounds {
            match failover(&instance).await {
                Ok(run) => runs.push(run),
                Err(()) => {
                    eprintln!("{phase}: the instance did not heal; the phase stops here");
                    runs.push(None);
                    break;
                }
            }
        }
        let back = agent_back(&instance).await;
        let opened = flood.as_ref().map_or_else(String::new, |(f, _)| {
            format!(
                "{} connections, {} streams",
                f.counts.connections.load(Ordering::Relaxed),
                f.counts.streams.load(Ordering::Relaxed)
            )
        });
        drop(flood);
        let peak_now = *peak.lock().unwrap();
        let done = Phase {
            name: phase,
            runs,
            rss_before: before,
            rss_peak: peak_now,
            agent_back: back,
            opened,
        };
        eprintln!("{}", done.row());
        phases.push(done);
        // The flood's connections close and the hub forgets them before the next phase.
        tokio::time::sleep(Duration::from_secs(12)).await;
    }
    sampler.abort();
    let rss_after = rss_mib(pid);

    println!(
        "hub-flood: {rounds} kill -9 rounds per phase; hub idle+large: {idle} idle connections and 80 large-Hello loops; hub silent: 64 connections x 4 silent streams; agent ports: {per_port} idle connections to each of {} agent ports, agents held to 1024 descriptors: {limited}",
        targets.len()
    );
    println!(
        "{:<16} {:>8} {:>15} {:>15} {:>12} {:>12} {:>14} {:>10} {:>10}  opened",
        "phase",
        "failed",
        "decided med ms",
        "decided max ms",
        "seen med ms",
        "seen max ms",
        "agent back ms",
        "RSS MiB",
        "peak MiB"
    );
    for phase in &phases {
        println!("{}", phase.row());
    }
    println!("controller RSS 12 s after the last flood: {rss_after:.1} MiB");
}
