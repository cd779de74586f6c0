//! The seeded randomized fault soak (see `valkey_e2e::soak`) for about 2 minutes per policy.
//! `FAULT_SEED` replays a run; `FAULT_SOAK_SECS` changes its length. The seed is printed at
//! the start and in every failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use valkey_e2e::soak::{self, Soak};

fn duration() -> Duration {
    let secs = std::env::var("FAULT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

async fn soak(sentinel: bool) {
    let seed = soak::seed_from_env();
    let policy = if sentinel { "sentinel" } else { "manual" };
    eprintln!("fault soak, policy {policy}, seed {seed} (replay with FAULT_SEED={seed})");
    let (outcome, _instance) = soak::run(Soak {
        sentinel,
        seed,
        duration: duration(),
    })
    .await;
    let faults: Vec<String> = outcome.faults.iter().map(|(f, _)| f.to_string()).collect();
    eprintln!(
        "{} faults survived: {}; {} WAIT- and {} plain-acknowledged writes, {} plain lost",
        faults.len(),
        faults.join(", "),
        outcome.acked_waited,
        outcome.acked_plain,
        outcome.lost_plain
    );
    assert!(
        outcome.problems.is_empty(),
        "policy {policy}, seed {seed} (replay with FAULT_SEED={seed}): {}",
        outcome.problems.join("\n")
    );
    assert!(!faults.is_empty(), "no fault was injected");
    assert!(outcome.acked_waited > 0, "no write was acknowledged");
}

#[tokio::test]
async fn fault_soak_under_policy_manual_keeps_every_acknowledged_write() {
    soak(false).await;
}

#[tokio::test]
async fn fault_soak_under_policy_sentinel_keeps_every_acknowledged_write() {
    soak(true).await;
}
