//! The Kubernetes controller's two paths against the in-memory API server, with real
//! valkey-server processes and agents: failover (the hot path) does not wait for object
//! applies (the cold path), only for its durable status write; the controller does not wake
//! its cold path with its own status writes; and a report that only moves an offset costs no
//! API write.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    api::{Patch, PatchParams},
    runtime::WatchStreamExt,
};
use valkey_controller::{
    crd::Failover,
    hub::InstanceKey,
    k8s::{cold::cold_trigger, error::Error, hot::HotError},
};
use valkey_e2e::{
    k8s::{FakeCluster, NS, Nodes, ordinal, ready, three_running_nodes},
    wait_for,
};
use valkey_proto::v1::Role;

const T: Duration = Duration::from_secs(30);

fn key() -> InstanceKey {
    InstanceKey {
        namespace: NS.into(),
        name: "demo".into(),
    }
}

/// Demo, Ready, and its master's pod name.
async fn ready_instance() -> (FakeCluster, Nodes, String) {
    let (cluster, nodes) = three_running_nodes().await;
    let up = cluster
        .reconcile_until(NS, "demo", "phase Ready", T, ready)
        .await;
    let master = up.status.and_then(|s| s.master).expect("a master");
    (cluster, nodes, master)
}

/// The pods whose agent reports a serving master.
fn reported_masters(cluster: &FakeCluster) -> Vec<String> {
    cluster
        .hub
        .observe(&key())
        .nodes
        .into_iter()
        .filter(|(_, o)| {
            o.connected
                && o.report
                    .as_ref()
                    .and_then(|r| r.data.as_ref())
                    .is_some_and(|d| d.role() == Role::Master)
        })
        .map(|(pod, _)| pod)
        .collect()
}

async fn status_master(cluster: &FakeCluster) -> Option<String> {
    cluster
        .failover(NS, "demo")
        .await
        .status
        .and_then(|s| s.master)
}

#[tokio::test]
async fn a_failing_apply_of_an_unrelated_object_does_not_delay_a_failover() {
    let (cluster, mut nodes, master) = ready_instance().await;
    // Every PodDisruptionBudget write fails from now on, and the next cold pass must write
    // them all again (as after a controller restart).
    cluster.faults.fail("PATCH", "poddisruptionbudgets");
    let instance = cluster.ctx.known(&key()).expect("known");
    instance.cold.lock().unwrap().applied.clear();
    let failed = cluster.reconcile(NS, "demo").await;
    assert!(
        matches!(&failed, Err(Error::Apply { kind, .. }) if kind == "PodDisruptionBudget"),
        "{failed:?}"
    );

    nodes.acked_writes(&master, 1).await;
    nodes.valkeys[ordinal(&master)].kill9();
    // The cold path keeps failing meanwhile; the hot loops (woken by the reports) fail over.
    let promoted = wait_for("a new master in the status", T, || async {
        let cold = cluster.reconcile(NS, "demo").await;
        assert!(cold.is_err(), "the PDB still fails");
        status_master(&cluster).await.filter(|m| *m != master)
    })
    .await;
    wait_for("the new master serving", T, || async {
        reported_masters(&cluster).contains(&promoted).then_some(())
    })
    .await;
    cluster.faults.heal();
    cluster.reconcile(NS, "demo").await.expect("healed");
}

#[tokio::test]
async fn a_failing_durable_write_holds_the_failover_and_the_next_pass_retries() {
    let (cluster, mut nodes, master) = ready_instance().await;
    cluster.faults.fail("PATCH", "/status");
    let attempts = |cluster: &FakeCluster| {
        cluster
            .requests()
            .get(&("patch".to_owned(), "failovers/status".to_owned()))
            .copied()
            .unwrap_or(0)
    };
    let before = attempts(&cluster);
    nodes.acked_writes(&master, 1).await;
    nodes.valkeys[ordinal(&master)].kill9();
    // Passes that would fail over run and fail to persist the new epoch ...
    wait_for("the master reported down", T, || async {
        let down = cluster
            .hub
            .observe(&key())
            .nodes
            .get(&master)
            .and_then(|o| o.report.as_ref())
            .is_some_and(|r| r.process() == valkey_proto::v1::ProcessState::Down);
        down.then_some(())
    })
    .await;
    let mut refused = 0;
    while refused < 3 {
        refused += wait_for("a pass that fails to persist a failover", T, || async {
            let pass = cluster.hot_pass(NS, "demo").await;
            matches!(pass, Err(HotError::Durable(_))).then_some(1)
        })
        .await;
    }
    assert!(attempts(&cluster) > before);
    // ... and nothing was sent: no replica was promoted.
    let promoted: Vec<String> = reported_masters(&cluster)
        .into_iter()
        .filter(|pod| *pod != master)
        .collect();
    assert!(promoted.is_empty(), "{promoted:?}");
    assert_eq!(
        status_master(&cluster).await.as_deref(),
        Some(master.as_str())
    );

    cluster.faults.heal();
    let promoted = wait_for("the failover once the status can be written", T, || async {
        let _ = cluster.hot_pass(NS, "demo").await;
        status_master(&cluster).await.filter(|m| *m != master)
    })
    .await;
    wait_for("the new master serving", T, || async {
        reported_masters(&cluster).contains(&promoted).then_some(())
    })
    .await;
    let status = cluster.failover(NS, "demo").await.status.expect("status");
    assert_eq!(status.epoch, 2, "{status:#?}");
}

#[tokio::test]
async fn status_writes_do_not_wake_the_cold_path() {
    let (cluster, _nodes, _master) = ready_instance().await;
    let before = cluster.failover(NS, "demo").await;
    // The hot path writes the status again (volatile fields are due at once).
    let mut status = before.status.clone().expect("status");
    status.message = "changed by a status write".into();
    cluster
        .api::<Failover>(NS)
        .patch_status(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await
        .expect("status write");
    let after_status = cluster.failover(NS, "demo").await;
    assert_ne!(
        after_status.metadata.resource_version,
        before.metadata.resource_version
    );
    let mut spec = after_status.clone();
    spec.spec
        .custom_configs
        .insert("maxmemory-policy".into(), "allkeys-lru".into());
    spec.metadata.generation = spec.metadata.generation.map(|g| g + 1);
    let mut annotated = after_status.clone();
    annotated
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("valkey.buf.red/switchover".into(), "any".into());

    // The watch events, through the same filter the controller's Failover watch uses.
    let events = vec![
        Ok(before.clone()),
        Ok(after_status),
        Ok(spec),
        Ok(annotated),
    ];
    let passed: Vec<Failover> = futures::stream::iter(events)
        .predicate_filter(cold_trigger, Default::default())
        .map(|f: Result<Failover, _>| f.expect("event"))
        .collect()
        .await;
    let versions: Vec<_> = passed
        .iter()
        .map(|f| (f.metadata.generation, f.metadata.annotations.clone()))
        .collect();
    assert_eq!(passed.len(), 3, "status-only change filtered: {versions:?}");
    assert_eq!(
        passed[0].metadata.resource_version,
        before.metadata.resource_version
    );
}

#[tokio::test]
async fn reports_that_only_move_offsets_cost_no_api_write() {
    let (cluster, nodes, master) = ready_instance().await;
    // Settle: both replicas in sync, their links up in the status, the status of the current
    // generation (the in-memory API bumps it for the finalizer too, and the cold pass that
    // change wakes hands it to the hot path), and passes that write nothing (the Ready status
    // and role labels are written).
    nodes.acked_writes(&master, 1).await;
    wait_for("a settled status with every link up", T, || async {
        let writes = cluster.writes();
        cluster.reconcile(NS, "demo").await.expect("cold pass");
        cluster.hot_pass(NS, "demo").await.expect("pass");
        let failover = cluster.failover(NS, "demo").await;
        let status = failover.status?;
        let linked = status
            .nodes
            .iter()
            .all(|n| n.pod_name == master || n.link_up);
        let current = status.observed_generation == failover.metadata.generation;
        (linked && current && status.nodes.len() == 3 && cluster.writes() == writes).then_some(())
    })
    .await;
    let writes = cluster.writes();
    let requests_before = cluster.requests();
    let offset_of = |pod: &str| {
        cluster
            .hub
            .observe(&key())
            .nodes
            .get(pod)
            .and_then(|o| o.report.as_ref()?.data.as_ref())
            .map_or(0, |d| d.repl_offset)
    };
    let offsets: Vec<i64> = (0..3).map(|i| offset_of(&format!("demo-{i}"))).collect();
    nodes.acked_writes(&master, 50).await;
    // Every agent reports its new offset; passes run on those reports.
    wait_for("every node to report a new offset", T, || async {
        cluster.hot_pass(NS, "demo").await.expect("pass");
        (0..3)
            .all(|i| offset_of(&format!("demo-{i}")) > offsets[i])
            .then_some(())
    })
    .await;
    for _ in 0..5 {
        cluster.hot_pass(NS, "demo").await.expect("pass");
        cluster.reconcile(NS, "demo").await.expect("cold pass");
    }
    let new: Vec<_> = cluster
        .requests()
        .into_iter()
        .filter(|(k, n)| requests_before.get(k) != Some(n))
        .collect();
    assert_eq!(cluster.writes(), writes, "new requests: {new:?}");
    // Offsets alone are never written: they ride along with the next settled change.
    let status = cluster.failover(NS, "demo").await.status.expect("status");
    assert!(
        status
            .nodes
            .iter()
            .all(|n| n.repl_offset < offset_of(&n.pod_name))
    );
    let _ = Arc::clone(&cluster.ctx);
}
