//! partition-bench: the partition scenarios of `valkey_e2e::partition` against ours (both
//! policies) and plain Valkey Sentinel, in the same run, on a network of Linux network
//! namespaces (run as root). Per scenario and system it prints the acknowledged writes lost
//! (plain `SET`, and `SET` + `WAIT`), how long after the partition began the last lost one was
//! acknowledged, the time with two writable masters, and the longest time no client had a write
//! acknowledged. The last line sums up ours.
//!
//! `partition-bench [ROUNDS]` (default 1). `PARTITION_BENCH_SYSTEMS` (manual,sentinel,plain)
//! and `PARTITION_BENCH_SCENARIOS` (1-6, in the table's order) pick a subset.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use valkey_e2e::partition::{Report, Scenario, System, run, unavailable};

fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

fn pick<T: Copy>(var: &str, all: &[(&str, T)]) -> Vec<T> {
    match std::env::var(var) {
        Ok(list) => list
            .split(',')
            .map(|want| {
                all.iter()
                    .find(|(name, _)| *name == want.trim())
                    .map(|(_, v)| *v)
                    .unwrap_or_else(|| panic!("{var}: unknown {want:?}"))
            })
            .collect(),
        Err(_) => all.iter().map(|(_, v)| *v).collect(),
    }
}

#[tokio::main]
async fn main() {
    if let Some(why) = unavailable() {
        eprintln!("partition-bench needs network namespaces: {why}");
        std::process::exit(2);
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse().expect("ROUNDS: a number"))
        .unwrap_or(1);
    let systems = pick(
        "PARTITION_BENCH_SYSTEMS",
        &[
            ("manual", System::Manual),
            ("sentinel", System::Sentinel),
            ("plain", System::PlainSentinel),
        ],
    );
    let numbered: Vec<(String, Scenario)> = Scenario::ALL
        .iter()
        .enumerate()
        .map(|(i, s)| ((i + 1).to_string(), *s))
        .collect();
    let numbered: Vec<(&str, Scenario)> = numbered.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let scenarios = pick("PARTITION_BENCH_SCENARIOS", &numbered);

    println!(
        "| scenario | system | plain acked | plain lost | lost acked within (ms) | WAIT acked | WAIT lost | two writable masters (ms) | longest without an ack (ms) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut ours: Vec<Report> = Vec::new();
    for scenario in &scenarios {
        for system in &systems {
            for _ in 0..rounds {
                let r = run(*system, *scenario).await;
                println!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    scenario.name(),
                    system.name(),
                    r.plain_acked,
                    r.plain_lost,
                    r.plain_lost_within.map_or("-".into(), ms),
                    r.wait_acked,
                    r.wait_lost,
                    ms(r.two_masters),
                    ms(r.unavailable),
                );
                if *system != System::PlainSentinel {
                    ours.push(r);
                }
            }
        }
    }
    let plain: usize = ours.iter().map(|r| r.plain_lost).sum();
    let wait: usize = ours.iter().map(|r| r.wait_lost).sum();
    let within = ours.iter().filter_map(|r| r.plain_lost_within).max();
    let two = ours.iter().map(|r| r.two_masters).max().unwrap_or_default();
    println!(
        "ours, {} runs: acknowledged writes lost: {plain} plain (all acknowledged within {} ms of their partition), {wait} WAIT; longest time with two writable masters: {} ms",
        ours.len(),
        within.map_or("-".into(), ms),
        ms(two),
    );
}
