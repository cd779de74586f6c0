//! The seeded randomized fault soak (`valkey_e2e::soak`), long form: `SECS` seconds (default
//! 600) per policy, manual then sentinel, and a table of what each survived: faults by kind,
//! the time to heal from each kind (median and max), acknowledged and lost writes, rounds with
//! two writable masters, and any problem. `FAULT_SEED` fixes the seed of both runs.
//!
//! Run: `cargo build --release --workspace --bins && target/release/fault-soak [SECS]`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeMap, time::Duration};

use valkey_e2e::soak::{self, Fault, Outcome, Soak};

fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

fn report(policy: &str, seed: u64, outcome: &Outcome) -> String {
    let mut by_kind: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    for (fault, took) in &outcome.faults {
        by_kind.entry(*fault).or_default().push(*took);
    }
    let mut out = format!(
        "policy {policy} (seed {seed}): {} faults survived\n\n| fault | count | heal median ms | heal max ms |\n|---|---|---|---|\n",
        outcome.faults.len()
    );
    for (fault, mut times) in by_kind {
        times.sort();
        out.push_str(&format!(
            "| {fault} | {} | {} | {} |\n",
            times.len(),
            ms(times[times.len() / 2]),
            ms(times[times.len() - 1])
        ));
    }
    out.push_str(&format!(
        "\nWAIT-acknowledged writes {}, lost {}; plain-acknowledged writes {}, lost {}; rounds with two writable masters {}\n",
        outcome.acked_waited,
        outcome.lost_waited,
        outcome.acked_plain,
        outcome.lost_plain,
        outcome.double_master_rounds
    ));
    if outcome.problems.is_empty() {
        out.push_str("problems: none\n");
    } else {
        out.push_str(&format!("PROBLEMS:\n{}\n", outcome.problems.join("\n")));
    }
    out
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let mut problems = 0;
    let mut faults = 0;
    for (policy, sentinel) in [("manual", false), ("sentinel", true)] {
        let seed = soak::seed_from_env();
        eprintln!("fault soak, policy {policy}, {secs} s, seed {seed}");
        let (outcome, _instance) = soak::run(Soak {
            sentinel,
            seed,
            duration: Duration::from_secs(secs),
        })
        .await;
        println!("{}", report(policy, seed, &outcome));
        problems += outcome.problems.len();
        faults += outcome.faults.len();
    }
    println!("fault soak: {faults} faults over 2 x {secs} s, {problems} problems");
    if problems > 0 {
        std::process::exit(1);
    }
}
