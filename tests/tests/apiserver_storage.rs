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

/// Binds each PVC of the test namespace to a PersistentVolume of its size, as the PV
/// controller would once a volume is provisioned: the PV, the claim's `volumeName`, its status.
async fn bind_claims(cluster: &Cluster, class: &str) {
    use k8s_openapi::api::core::v1::{
        HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
        PersistentVolumeSpec,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let pvcs = cluster.api::<PersistentVolumeClaim>();
    let pvs: kube::Api<PersistentVolume> = kube::Api::all(cluster.admin.clone());
    for pvc in pvcs.list(&ListParams::default()).await.expect("PVCs").items {
        let name = pvc.name_any();
        let pv_name = format!("{}-{name}", cluster.ns);
        let pv = PersistentVolume {
            metadata: kube::api::ObjectMeta {
                name: Some(pv_name.clone()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                capacity: Some([("storage".to_owned(), Quantity("1Gi".into()))].into()),
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some(class.into()),
                host_path: Some(HostPathVolumeSource {
                    path: format!("/tmp/{pv_name}"),
                    type_: None,
                }),
                claim_ref: Some(ObjectReference {
                    namespace: Some(cluster.ns.clone()),
                    name: Some(name.clone()),
                    uid: pvc.uid(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        pvs.create(&kube::api::PostParams::default(), &pv)
            .await
            .expect("create the PV");
        let bind = serde_json::json!({ "spec": { "volumeName": pv_name } });
        pvcs.patch(&name, &PatchParams::default(), &Patch::Merge(&bind))
            .await
            .expect("bind the claim");
        let bound = serde_json::json!({ "status": {
            "phase": "Bound",
            "accessModes": ["ReadWriteOnce"],
            "capacity": { "storage": "1Gi" },
        }});
        pvcs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&bound))
            .await
            .expect("the claim's status");
    }
}

#[tokio::test]
async fn a_larger_capacity_grows_bound_claims_where_the_storage_class_allows() {
    use k8s_openapi::api::{core::v1::PersistentVolumeClaim, storage::v1::StorageClass};
    let cluster = Cluster::start().await;
    cluster.with_password("demo").await;
    let class = format!("grow-{}", cluster.ns);
    let storage_class = StorageClass {
        metadata: kube::api::ObjectMeta {
            name: Some(class.clone()),
            ..Default::default()
        },
        provisioner: "example.com/none".into(),
        allow_volume_expansion: Some(true),
        ..Default::default()
    };
    kube::Api::<StorageClass>::all(cluster.admin.clone())
        .create(&kube::api::PostParams::default(), &storage_class)
        .await
        .expect("StorageClass");
    let spec = FailoverSpec {
        replicas: 3,
        storage: Some(Storage {
            storage_class_name: Some(class.clone()),
            capacity: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "1Gi".into(),
            )),
            ..Storage::default()
        }),
        ..FailoverSpec::default()
    };
    cluster.create(failover("demo", spec)).await;
    cluster.wait("demo", "Ready", T, ready).await;
    bind_claims(&cluster, &class).await;
    cluster
        .api::<Failover>()
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"storage": {"capacity": "2Gi"}}})),
        )
        .await
        .expect("patch");
    let pvcs = cluster.api::<PersistentVolumeClaim>();
    wait_for("every claim to ask for 2Gi", T, || async {
        let claims = pvcs.list(&ListParams::default()).await.ok()?.items;
        claims
            .iter()
            .all(|c| {
                c.spec
                    .as_ref()
                    .and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage"))
                    .is_some_and(|q| q.0 == "2Gi")
            })
            .then_some(())
    })
    .await;
}
