//! Leader election on the real API server's Leases: two controller processes, only the leader
//! serves agents and writes; a kill -9 of the leader hands the instance to the other within
//! the lease time, which then fails it over.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use valkey_controller::crd::{Failover, Phase};
use valkey_e2e::{
    cluster::{Cluster, Install},
    k8s::{failover, three},
    wait_for,
};

/// The controller's Lease duration (k8s::run).
const LEASE: Duration = Duration::from_secs(15);

fn ready(f: &Failover) -> bool {
    f.status.as_ref().is_some_and(|s| s.phase == Phase::Ready)
}

async fn holder(cluster: &Cluster) -> Option<String> {
    cluster
        .api::<Lease>()
        .get_opt("valkey-controller")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Requests of controller `i` to anything but its Lease.
async fn acting(cluster: &Cluster, i: usize) -> u64 {
    cluster
        .requests(i)
        .await
        .iter()
        .filter(|((_, resource), _)| resource != "leases")
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test]
async fn only_the_leader_acts_and_the_other_takes_over_after_a_kill_9() {
    let mut cluster = Cluster::new(Install::ClusterWide, &[]).await;
    cluster.start_controller("controller-a").await;
    wait_for("controller-a to lead", LEASE, || async {
        (holder(&cluster).await.as_deref() == Some("controller-a")).then_some(())
    })
    .await;
    cluster.start_controller("controller-b").await;
    cluster.with_password("demo").await;
    cluster.create(failover("demo", three())).await;
    let up = cluster
        .wait("demo", "Ready", Duration::from_secs(60), ready)
        .await;
    let master = up.status.and_then(|s| s.master).expect("a master");
    // The follower touched nothing but the Lease it waits for.
    assert_eq!(
        acting(&cluster, 1).await,
        0,
        "{:?}",
        cluster.requests(1).await
    );
    assert!(acting(&cluster, 0).await > 0);

    // kill -9 of the leader: it releases nothing; the other takes the Lease once it lapses.
    cluster.controllers[0].proc.kill9();
    let killed = Instant::now();
    wait_for(
        "controller-b to lead",
        LEASE + Duration::from_secs(10),
        || async { (holder(&cluster).await.as_deref() == Some("controller-b")).then_some(()) },
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= LEASE + Duration::from_secs(3),
        "took over after {took:?}"
    );
    // The new leader serves the agents and fails the instance over.
    let epoch = cluster
        .failover("demo")
        .await
        .status
        .map(|s| s.epoch)
        .unwrap_or_default();
    wait_for(
        "the agents to reach the new leader",
        Duration::from_secs(30),
        || async {
            let text = valkey_e2e::http_get(cluster.controllers[1].http, "/metrics")
                .await
                .ok()?;
            text.lines()
                .any(|l| l == "valkey_controller_connected_agents 3")
                .then_some(())
        },
    )
    .await;
    // Writes the replicas acknowledged, then kill -9 of the master's Valkey (the kubelet
    // starts it again, empty).
    let writer = cluster.writer("demo", 1);
    writer.wait_more(20).await;
    let acked = writer.finish().await;
    cluster.kubelet.kill_valkey(&master);
    let after = cluster
        .wait(
            "demo",
            "a failover by the new leader",
            Duration::from_secs(60),
            |f| {
                f.status.as_ref().is_some_and(|s| {
                    s.epoch > epoch && s.master.as_ref().is_some_and(|m| *m != master)
                })
            },
        )
        .await;
    let new_master = after.status.and_then(|s| s.master).expect("master");
    let missing = cluster.missing(&new_master, &acked).await;
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}
