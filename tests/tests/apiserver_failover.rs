//! The controller against the real API server (etcd and kube-apiserver built from Go modules),
//! as `valkey-controller run` on its own service account's RBAC, with pods made from its
//! StatefulSets' templates and their real Valkeys, sentinels and agents (tokens from the
//! TokenRequest API, reviewed by the real TokenReview).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use valkey_controller::crd::{FailoverSpec, Phase};
use valkey_e2e::{
    cluster::{Cluster, Install},
    k8s::failover,
};

fn ready(f: &valkey_controller::crd::Failover) -> bool {
    f.status.as_ref().is_some_and(|s| s.phase == Phase::Ready)
}

fn three() -> FailoverSpec {
    FailoverSpec {
        replicas: 3,
        ..FailoverSpec::default()
    }
}

#[tokio::test]
async fn a_manual_instance_becomes_ready_through_the_real_api_server() {
    let cluster = Cluster::start_with(
        Install::ClusterWide,
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await;
    cluster.with_password("demo").await;
    cluster.create(failover("demo", three())).await;
    let ready = cluster
        .wait("demo", "Ready", Duration::from_secs(60), ready)
        .await;
    let status = ready.status.expect("status");
    assert!(status.master.is_some(), "{status:#?}");
}
