//! Measures valkey-agent's footprint (RSS, CPU) against a real valkey-server and a hub on
//! loopback: idle, at 1 report/s and at 10 reports/s. Prints a Markdown table.
//!
//! Run: `cargo run --release -p valkey-e2e --bin agent-footprint [-- SECONDS]`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use valkey_e2e::{
    hub::{Event, TestHub},
    procs::{Agent, AgentOpts, Valkey},
};

/// utime + stime in clock ticks, and RSS / peak RSS in KiB, from /proc.
fn sample(pid: i32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks, kib("VmRSS:"), kib("VmHWM:"))
}

struct Row {
    scenario: &'static str,
    reports_per_s: f64,
    cpu_percent: f64,
    rss_mib: f64,
    peak_mib: f64,
}

async fn measure(scenario: &'static str, heartbeat_ms: u64, writes: bool, seconds: u64) -> Row {
    let hub = TestHub::start("t0ken").await;
    let valkey = Valkey::start("bench");
    let mut opts = AgentOpts::for_valkey(&valkey, Some(hub.url()));
    // The production probe interval; the heartbeat sets the report rate.
    opts.probe_interval_ms = 100;
    opts.heartbeat_interval_ms = heartbeat_ms;
    let mut agent = Agent::start(opts);
    let pid = agent.proc_mut().pid().as_raw();
    let writer = writes.then(|| {
        let client = valkey.client();
        tokio::spawn(async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("conn");
            let mut i = 0u64;
            loop {
                // A new key each time: the key count changes, so every heartbeat is a report.
                let _: () = conn.set(format!("k{i}"), i).await.expect("SET");
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count_reports = || {
        hub.events()
            .iter()
            .filter(|e| matches!(e, Event::Report { .. }))
            .count()
    };
    let (t0, _, _) = sample(pid);
    let r0 = count_reports();
    let start = Instant::now();
    let mut rss_max = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(sample(pid).1);
    }
    let wall = start.elapsed().as_secs_f64();
    if std::env::var_os("FOOTPRINT_DEBUG").is_some() {
        let events = hub.events();
        let heartbeats = events
            .iter()
            .filter(|e| matches!(e, Event::Heartbeat { .. }))
            .count();
        let keys = hub
            .latest_report("bench")
            .and_then(|r| r.data)
            .map(|d| d.key_count);
        eprintln!(
            "{scenario}: {} events, {heartbeats} heartbeats, keys {keys:?}",
            events.len()
        );
    }
    let (t1, _, peak) = sample(pid);
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let row = Row {
        scenario,
        reports_per_s: (count_reports() - r0) as f64 / wall,
        cpu_percent: (t1 - t0) as f64 / ticks_per_s / wall * 100.0,
        rss_mib: rss_max as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
    };
    if let Some(writer) = writer {
        writer.abort();
    }
    row
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let seconds = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let rows = [
        measure("idle (no writes, heartbeat 1 s)", 1000, false, seconds).await,
        measure("1 report/s (writes, heartbeat 1 s)", 1000, true, seconds).await,
        measure(
            "10 reports/s (writes, heartbeat 100 ms)",
            100,
            true,
            seconds,
        )
        .await,
    ];
    println!("valkey-agent footprint, {seconds} s per scenario, probe every 100 ms\n");
    println!("| scenario | reports/s | CPU (% of a core) | RSS (MiB) | peak RSS (MiB) |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {:.1} | {:.2} | {:.1} | {:.1} |",
            row.scenario, row.reports_per_s, row.cpu_percent, row.rss_mib, row.peak_mib
        );
    }
}
