//! Partitions in Linux network namespaces (`valkey_e2e::partition`): for each scenario and
//! both policies, no write acknowledged with WAIT is lost and there is never a moment with two
//! writable masters. Plain-acknowledged writes the isolated master took before it fenced
//! itself may be lost (replication is asynchronous): they are printed, and partition-bench
//! reports them. Skipped, saying why, when not run as root.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use valkey_e2e::partition::{Report, Scenario, System, run, unavailable};

async fn check(system: System, scenario: Scenario) {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: partition tests need network namespaces: {why}");
        return;
    }
    let report: Report = run(system, scenario).await;
    eprintln!("{report:#?}");
    assert!(
        report.wait_acked > 0 && report.plain_acked > 0,
        "{report:?}"
    );
    assert_eq!(
        report.wait_lost, 0,
        "WAIT-acknowledged writes lost: {report:?}"
    );
    assert_eq!(
        report.two_masters_rounds, 0,
        "two writable masters at once: {report:?}"
    );
}

macro_rules! scenarios {
    ($($name:ident: $system:expr, $scenario:expr;)*) => {
        $(
            #[tokio::test]
            async fn $name() {
                check($system, $scenario).await;
            }
        )*
    };
}

scenarios! {
    manual_master_isolated_with_one_client_group: System::Manual, Scenario::MasterIsolated;
    manual_controller_isolated: System::Manual, Scenario::ControllerIsolated;
    manual_one_replica_isolated: System::Manual, Scenario::ReplicaIsolated;
    manual_2_1_split: System::Manual, Scenario::Split21;
    manual_flapping: System::Manual, Scenario::Flapping;
    manual_masters_agent_isolated: System::Manual, Scenario::MasterAgentIsolated;
    sentinel_master_isolated_with_one_client_group: System::Sentinel, Scenario::MasterIsolated;
    sentinel_controller_isolated: System::Sentinel, Scenario::ControllerIsolated;
    sentinel_one_replica_isolated: System::Sentinel, Scenario::ReplicaIsolated;
    sentinel_2_1_split: System::Sentinel, Scenario::Split21;
    sentinel_flapping: System::Sentinel, Scenario::Flapping;
    sentinel_masters_agent_isolated: System::Sentinel, Scenario::MasterAgentIsolated;
}
