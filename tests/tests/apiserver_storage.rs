//! A StatefulSet field the real API server keeps fixed (its volume claim templates): changing
//! it is refused there with a 422, so the controller deletes the set with its pods orphaned and
//! creates it again; the pods keep running (same uids) and the instance stays Ready.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{apps::v1::StatefulSet, core::v1::Pod};
use kube::{
    ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use valkey_controller::{
    crd::{Failover, FailoverSpec, Phase, Storage},
    k8s::LABEL_INSTANCE,
};
use valkey_e2e::{cluster::Cluster, k8s::failover, wait_for};

const T: Duration = Duration::from_secs(60);

fn ready(f: &Failover) -> bool {
    f.status.as_ref().is_some_and(|s| s.phase == Phase::Ready)
}

async fn pod_uids(cluster: &Cluster) -> BTreeMap<String, String> {
    cluster
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("{LABEL_INSTANCE}=demo")))
        .await
        .expect("pods")
        .items
        .into_iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect()
}

fn claim_class(set: &StatefulSet) -> Option<String> {
    set.spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .first()?
        .spec
        .as_ref()?
        .storage_class_name
        .clone()
}

#[tokio::test]
async fn a_fixed_statefulset_field_is_changed_by_recreating_the_set_around_running_pods() {
    let cluster = Cluster::start().await;
    cluster.with_password("demo").await;
    let spec = FailoverSpec {
        replicas: 3,
        storage: Some(Storage {
            storage_class_name: Some("standard".into()),
            ..Storage::default()
        }),
        ..FailoverSpec::default()
    };
    cluster.create(failover("demo", spec)).await;
    cluster.wait("demo", "Ready", T, ready).await;
    let sets = cluster.api::<StatefulSet>();
    let old = sets.get("demo").await.expect("StatefulSet");
    let pods = pod_uids(&cluster).await;
    assert_eq!(pods.len(), 3);

    cluster
        .api::<Failover>()
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"storage": {"storageClassName": "fast"}}})),
        )
        .await
        .expect("patch");
    let new = wait_for("the StatefulSet made anew", T, || async {
        let set = sets.get_opt("demo").await.ok()??;
        (set.uid() != old.uid()).then_some(set)
    })
    .await;
    assert_eq!(claim_class(&new).as_deref(), Some("fast"));
    // The pods were kept running (orphaned, then adopted), not made anew.
    assert_eq!(pod_uids(&cluster).await, pods);
    let notes: Vec<String> = cluster
        .events()
        .await
        .into_iter()
        .filter(|(_, reason, _)| reason == "RecreatingStatefulSet")
        .map(|(_, _, note)| note)
        .collect();
    assert!(!notes.is_empty(), "no RecreatingStatefulSet Event");
    cluster.wait("demo", "Ready still", T, ready).await;
}
