//! Storage in a cluster: adding `storage` to a running instance recreates its StatefulSet
//! (Kubernetes keeps volume claim templates fixed) with its pods left running, and changing
//! `storage.capacity` grows the PVCs where the StorageClass allows it, never shrinks them, and
//! says once what it could not do. The in-memory API server refuses a change of a
//! StatefulSet's fixed fields as the real one does.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod},
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use kube::{
    ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use valkey_controller::{
    crd::{Failover, Phase, Storage},
    k8s::{LABEL_COMPONENT, LABEL_INSTANCE},
};
use valkey_e2e::{
    k8s::{FakeCluster, NS, failover, ready, three, three_running_nodes, with_demo_password},
    wait_for,
};

const T: Duration = Duration::from_secs(30);

async fn set_capacity(cluster: &FakeCluster, capacity: &str) {
    cluster
        .api::<Failover>(NS)
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"storage": {"capacity": capacity}}})),
        )
        .await
        .expect("set the capacity");
}

/// The data StatefulSet's volume claim template's request, if it has one.
async fn template_capacity(cluster: &FakeCluster) -> Option<String> {
    let set = cluster
        .api::<StatefulSet>(NS)
        .get_opt("demo")
        .await
        .expect("get")?;
    let claims = set.spec?.volume_claim_templates?;
    let claim = claims.iter().find(|c| c.name_any() == "data")?;
    let requests = claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?;
    Some(requests.get("storage")?.0.clone())
}

/// Each data PVC's request, by name.
async fn claim_sizes(cluster: &FakeCluster) -> BTreeMap<String, String> {
    cluster
        .api::<PersistentVolumeClaim>(NS)
        .list(&ListParams::default())
        .await
        .expect("list PVCs")
        .items
        .into_iter()
        .map(|pvc| {
            let size = pvc
                .spec
                .and_then(|s| s.resources?.requests?.get("storage").cloned())
                .map(|q| q.0)
                .unwrap_or_default();
            (pvc.metadata.name.unwrap_or_default(), size)
        })
        .collect()
}

/// Requests the controller made for one resource.
fn requests_for(cluster: &FakeCluster, resource: &str) -> u64 {
    cluster
        .requests()
        .iter()
        .filter(|((_, r), _)| r == resource)
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test]
async fn adding_storage_recreates_the_statefulset_and_leaves_the_pods_running() {
    let (cluster, nodes) = three_running_nodes().await;
    let before = cluster
        .reconcile_until(NS, "demo", "phase Ready", T, ready)
        .await;
    let master = before.status.and_then(|s| s.master).expect("master");
    let sets = cluster.api::<StatefulSet>(NS);
    let old_uid = sets.get("demo").await.expect("sts").uid().expect("uid");
    assert_eq!(template_capacity(&cluster).await, None);
    // The StatefulSet controller owns the pods it made: deleting the set without orphaning
    // them would delete them too.
    let pods = cluster.api::<Pod>(NS);
    let mut uids = BTreeMap::new();
    for i in 0..3 {
        let name = format!("demo-{i}");
        let owned = json!({"metadata": {"ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "demo", "uid": old_uid,
            "controller": true, "blockOwnerDeletion": true,
        }]}});
        let pod = pods
            .patch(&name, &PatchParams::default(), &Patch::Merge(&owned))
            .await
            .expect("own the pod");
        uids.insert(name, pod.uid().expect("uid"));
    }
    nodes.acked_writes(&master, 20).await;

    set_capacity(&cluster, "1Gi").await;
    let recreated = wait_for(
        "the StatefulSet created again with a volume claim template",
        T,
        || async {
            cluster.reconcile(NS, "demo").await.expect("reconcile");
            let set = sets.get_opt("demo").await.expect("get")?;
            (set.uid().as_deref() != Some(old_uid.as_str())).then_some(set)
        },
    )
    .await;
    assert_eq!(template_capacity(&cluster).await.as_deref(), Some("1Gi"));
    assert_eq!(
        recreated.spec.and_then(|s| s.replicas),
        Some(3),
        "recreated at the instance's size"
    );
    let note = cluster.event(NS, "Normal", "RecreatingStatefulSet").await;
    assert!(note.contains("StatefulSet demo"), "{note}");
    // The pods were left running: the same objects, and the instance never noticed.
    for (name, uid) in &uids {
        let pod = pods.get(name).await.expect("the pod is still there");
        assert_eq!(pod.uid().as_ref(), Some(uid), "{name} was replaced");
    }
    let after = cluster
        .reconcile_until(NS, "demo", "Ready on the same master", T, |f| {
            f.status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Ready && s.master == Some(master.clone()))
        })
        .await;
    assert_eq!(
        after.status.expect("status").epoch,
        cluster
            .failover(NS, "demo")
            .await
            .status
            .expect("status")
            .epoch
    );
    assert_eq!(nodes.keys(&master).await, 20);
    // Done: further passes touch no StatefulSet.
    let touched = requests_for(&cluster, "statefulsets");
    for _ in 0..3 {
        cluster.reconcile(NS, "demo").await.expect("reconcile");
    }
    assert_eq!(requests_for(&cluster, "statefulsets"), touched);
}

/// A PVC as the StatefulSet controller makes it from the claim template.
fn claim(ordinal: i32, size: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(format!("data-demo-{ordinal}")),
            namespace: Some(NS.into()),
            labels: Some(
                [
                    (LABEL_INSTANCE.to_owned(), "demo".to_owned()),
                    (LABEL_COMPONENT.to_owned(), "data".to_owned()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(k8s_openapi::api::core::v1::VolumeResourceRequirements {
                requests: Some([("storage".to_owned(), Quantity(size.into()))].into()),
                ..Default::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Reconciles until the StatefulSet's claim template asks for `capacity`.
async fn until_template(cluster: &FakeCluster, capacity: &str) {
    wait_for(&format!("the claim template at {capacity}"), T, || async {
        cluster.reconcile(NS, "demo").await.expect("reconcile");
        (template_capacity(cluster).await.as_deref() == Some(capacity)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_larger_capacity_grows_the_pvcs_where_allowed_and_a_smaller_one_shrinks_none() {
    let cluster = with_demo_password().await;
    let mut spec = three();
    spec.storage = Some(Storage {
        capacity: Some(Quantity("1Gi".into())),
        ..Storage::default()
    });
    cluster.create(&failover("demo", spec)).await;
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    let pvcs = cluster.api::<PersistentVolumeClaim>(NS);
    for i in 0..3 {
        pvcs.create(&PostParams::default(), &claim(i, "1Gi"))
            .await
            .expect("PVC");
    }
    let all_at = |size: &str| -> BTreeMap<String, String> {
        (0..3)
            .map(|i| (format!("data-demo-{i}"), size.to_owned()))
            .collect()
    };

    // 1Gi -> 2Gi: every PVC grows, and the template sizes the PVCs to come.
    set_capacity(&cluster, "2Gi").await;
    until_template(&cluster, "2Gi").await;
    assert_eq!(claim_sizes(&cluster).await, all_at("2Gi"));
    let note = cluster.event(NS, "Normal", "ExpandingVolumes").await;
    assert!(
        note.contains("data-demo-0") && note.contains("2Gi"),
        "{note}"
    );
    // Done: further passes neither list nor patch a PVC.
    let touched = requests_for(&cluster, "persistentvolumeclaims");
    for _ in 0..3 {
        cluster.reconcile(NS, "demo").await.expect("reconcile");
    }
    assert_eq!(requests_for(&cluster, "persistentvolumeclaims"), touched);

    // A StorageClass without allowVolumeExpansion: the API server refuses; a Warning names
    // the reason once, the reconcile does not fail, and nothing retries in a loop.
    cluster.faults.refuse(
        "PATCH",
        "persistentvolumeclaims",
        403,
        "Forbidden",
        "persistentvolumeclaims \"data-demo-0\" is forbidden: only dynamically provisioned \
         pvc can be resized and the storageclass that provisions the pvc must support resize",
    );
    set_capacity(&cluster, "3Gi").await;
    until_template(&cluster, "3Gi").await;
    let note = cluster.event(NS, "Warning", "VolumeExpansionRefused").await;
    assert!(note.contains("must support resize"), "{note}");
    assert_eq!(claim_sizes(&cluster).await, all_at("2Gi"));
    let touched = requests_for(&cluster, "persistentvolumeclaims");
    for _ in 0..3 {
        cluster.reconcile(NS, "demo").await.expect("reconcile");
    }
    assert_eq!(requests_for(&cluster, "persistentvolumeclaims"), touched);
    cluster.faults.heal();

    // 3Gi -> 1Gi: a PVC cannot shrink; they keep their size and a Warning says so.
    set_capacity(&cluster, "1Gi").await;
    until_template(&cluster, "1Gi").await;
    let note = cluster.event(NS, "Warning", "VolumeShrinkIgnored").await;
    assert!(
        note.contains("data-demo-2") && note.contains("cannot shrink"),
        "{note}"
    );
    assert_eq!(claim_sizes(&cluster).await, all_at("2Gi"));
}
