//! What an attacker without a token costs the controller: `local up` (3 nodes, policy manual)
//! with and without a flood of its hub (2,000 idle connections kept open, replaced as the hub
//! closes them, and 80 loops of gRPC streams each sending a Hello of almost 4 MiB). Per phase:
//! the controller's resident memory (before, peak, after) and kill -9 failovers, timed from the
//! kill to the controller's decision (`last_failover.at_ms`) and to the new master in status.
//!
//! Run: `cargo build --release --workspace --bins && target/release/hub-flood [ROUNDS]`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

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
/// status).
async fn failover(instance: &LocalInstance) -> (f64, f64) {
    let before = instance.wait_healthy(3, T).await;
    let (old, addr, pid) = master_of(&before);
    write_n(instance, &addr, 10, 2).await;
    let (killed_at, started) = (now_ms(), Instant::now());
    signal(pid, Signal::SIGKILL);
    let after = instance
        .wait_status("a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let seen = started.elapsed().as_secs_f64() * 1000.0;
    let decided = after
        .last_failover
        .as_ref()
        .map_or(f64::NAN, |f| (f.at_ms - killed_at) as f64);
    (decided, seen)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
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
    instance.wait_healthy(3, T).await;
    let pid = instance.proc_mut().expect("local up").pid().as_raw();
    let ca = std::fs::read_to_string(instance.dir.join("tls").join("ca.crt")).unwrap();
    let log = std::fs::read_to_string(instance.dir.join("controller.0.log")).unwrap();
    let hub: std::net::SocketAddr = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hub=")?.parse().ok())
        .expect("hub address");

    let mut quiet = Vec::new();
    for _ in 0..rounds {
        quiet.push(failover(&instance).await);
    }
    let rss_before = rss_mib(pid);

    let flood = Flood::start(hub, ca, idle, 80);
    let peak = std::sync::Arc::new(std::sync::Mutex::new(rss_before));
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
    // The flood at full strength first: every idle connection opened once.
    let started = Instant::now();
    while flood
        .counts
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
        < idle as u64
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut flooded = Vec::new();
    for _ in 0..rounds {
        flooded.push(failover(&instance).await);
    }
    let counts = (
        flood
            .counts
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        flood
            .counts
            .streams
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    drop(flood);
    sampler.abort();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let rss_after = rss_mib(pid);
    let peak = *peak.lock().unwrap();

    println!(
        "hub flood: {idle} idle connections kept, 80 large-Hello loops; {} connections and {} streams opened in all; {rounds} kill -9 rounds per phase",
        counts.0, counts.1
    );
    println!(
        "{:<10} {:>16} {:>16} {:>16} {:>16}",
        "phase", "decided med ms", "decided max ms", "seen med ms", "seen max ms"
    );
    for (name, runs) in [("quiet", &quiet), ("flooded", &flooded)] {
        let decided: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let seen: Vec<f64> = runs.iter().map(|r| r.1).collect();
        println!(
            "{:<10} {:>16.1} {:>16.1} {:>16.1} {:>16.1}",
            name,
            median(decided.clone()),
            max(&decided),
            median(seen.clone()),
            max(&seen)
        );
    }
    println!(
        "controller RSS: {rss_before:.1} MiB before the flood, {peak:.1} MiB peak during it (+{:.1}), {rss_after:.1} MiB 12 s after it",
        peak - rss_before
    );
}
