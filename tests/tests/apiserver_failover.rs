//! The controller against the real API server (etcd and kube-apiserver built from Go modules),
//! as `valkey-controller run` on its own service account's RBAC, with pods made from its
//! StatefulSets' templates in a namespace that enforces Pod Security `restricted`, and their
//! real Valkeys, sentinels and agents (tokens from the TokenRequest API, reviewed by the real
//! TokenReview). An application writes through the role label throughout.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use valkey_controller::{
    crd::{Failover, FailoverSpec, Phase, SentinelSettings},
    k8s::ANNOTATION_SWITCHOVER,
};
use valkey_e2e::{
    cluster::{Cluster, Install},
    k8s::failover,
};

const T: Duration = Duration::from_secs(60);
const RESTRICTED: [(&str, &str); 1] = [("pod-security.kubernetes.io/enforce", "restricted")];

fn ready(f: &Failover) -> bool {
    f.status.as_ref().is_some_and(|s| s.phase == Phase::Ready)
}

fn spec(sentinel: bool) -> FailoverSpec {
    FailoverSpec {
        replicas: 3,
        sentinel: sentinel.then(SentinelSettings::default),
        ..FailoverSpec::default()
    }
}

/// The role labels name `master` master and every other data pod replica.
async fn labels_follow(cluster: &Cluster, master: &str) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let labels = cluster.role_labels("demo").await;
        let right = labels.len() == 3
            && labels
                .iter()
                .all(|(pod, role)| role == if pod == master { "master" } else { "replica" });
        if right {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the role labels did not follow the master {master}: {labels:?}\nstatus: {:#?}",
            cluster.failover("demo").await.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ready; an annotated switchover; a kill -9 of the master: under a writer that waits for
/// `wait_replicas` acknowledgements, every acknowledged write is on the final master, and the
/// status, the role labels and the Events follow.
async fn switchover_and_kill_9(install: Install, sentinel: bool, wait_replicas: i64) {
    let cluster = Cluster::start_with(install, &RESTRICTED).await;
    cluster.with_password("demo").await;
    cluster.create(failover("demo", spec(sentinel))).await;
    let up = cluster.wait("demo", "Ready", T, ready).await;
    let first = up
        .status
        .as_ref()
        .and_then(|s| s.master.clone())
        .expect("a master");
    labels_follow(&cluster, &first).await;
    if sentinel {
        // No Secret named for the sentinels: one is generated, and the status names it for
        // clients that discover the master through Sentinel.
        let named = up
            .status
            .as_ref()
            .and_then(|s| s.monitor.password_secret.clone());
        assert_eq!(named.as_deref(), Some("demo-sentinel-password"));
        let secret = cluster
            .api::<Secret>()
            .get("demo-sentinel-password")
            .await
            .expect("the sentinels' generated password Secret");
        assert!(valkey_controller::k8s::cold::password::value(&secret, "password").is_some());
    }
    let writer = cluster.writer("demo", wait_replicas);
    writer.wait_more(50).await;

    // A planned switchover through the annotation.
    cluster.annotate("demo", ANNOTATION_SWITCHOVER, "any").await;
    let switched = cluster
        .wait("demo", "the switchover", T, |f| {
            f.status.as_ref().is_some_and(|s| {
                s.phase == Phase::Ready && s.master.as_ref().is_some_and(|m| *m != first)
            }) && !f.annotations().contains_key(ANNOTATION_SWITCHOVER)
        })
        .await;
    let second = switched
        .status
        .as_ref()
        .and_then(|s| s.master.clone())
        .expect("master");
    labels_follow(&cluster, &second).await;
    writer.wait_more(50).await;

    // kill -9 of the master's Valkey (the kubelet starts it again, empty).
    let epoch = switched
        .status
        .as_ref()
        .map(|s| s.epoch)
        .unwrap_or_default();
    cluster.kubelet.kill_valkey(&second);
    let failed_over = cluster
        .wait("demo", "a failover off the killed master", T, |f| {
            f.status
                .as_ref()
                .is_some_and(|s| s.master.as_ref().is_some_and(|m| *m != second) && s.epoch > epoch)
        })
        .await;
    let third = failed_over
        .status
        .as_ref()
        .and_then(|s| s.master.clone())
        .expect("master");
    assert_eq!(
        failed_over
            .status
            .as_ref()
            .and_then(|s| s.last_failover_from.as_deref()),
        Some(second.as_str())
    );
    labels_follow(&cluster, &third).await;
    writer.wait_more(50).await;
    let acked = writer.finish().await;
    // Back to Ready once the restarted node has synced as a replica.
    let end = cluster.wait("demo", "Ready again", T, ready).await;
    assert_eq!(
        end.status.as_ref().and_then(|s| s.master.clone()),
        Some(third.clone())
    );
    let missing = cluster.missing(&third, &acked).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)]
    );
    // The failover path records its Events without waiting for them.
    let what = format!("a Switchover Event and a Decision Event naming {second}");
    valkey_e2e::wait_for(&what, Duration::from_secs(10), || async {
        let events = cluster.events().await;
        let switchover = events.iter().any(|(_, reason, _)| reason == "Switchover");
        let decision = events
            .iter()
            .any(|(_, reason, note)| reason == "Decision" && note.contains(&second));
        (switchover && decision).then_some(())
    })
    .await;
}

#[tokio::test]
async fn policy_manual_switches_over_and_fails_over_through_the_real_api_server() {
    switchover_and_kill_9(Install::ClusterWide, false, 1).await;
}

#[tokio::test]
async fn policy_sentinel_switches_over_and_fails_over_through_the_real_api_server() {
    switchover_and_kill_9(Install::ClusterWide, true, 2).await;
}

#[tokio::test]
async fn the_namespaced_install_is_enough_for_a_switchover_and_a_failover() {
    switchover_and_kill_9(Install::Namespaced, false, 1).await;
}
