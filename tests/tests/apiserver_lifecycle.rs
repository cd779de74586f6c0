//! What a running instance costs the real API server and how the controller follows it there:
//! no writes in steady state (a full cold pass and a minute of agent reports), one field
//! manager per object, a field dropped from the desired object dropped from the live one, the
//! real watch waking the cold path on a spec change and not on a status change, and deletion
//! through the finalizer with and without `retainAfterDeleted`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use valkey_controller::{
    crd::{Failover, FailoverSpec, Phase, Storage},
    k8s::LABEL_INSTANCE,
};
use valkey_e2e::{
    cluster::Cluster,
    k8s::{failover, three, writes},
    wait_for,
};

const T: Duration = Duration::from_secs(60);

fn ready(f: &Failover) -> bool {
    f.status.as_ref().is_some_and(|s| s.phase == Phase::Ready)
}

/// The controller's requests but its Lease's (renewed every 5 s whatever happens) and watches.
async fn requests(cluster: &Cluster) -> BTreeMap<(String, String), u64> {
    let mut requests = cluster.requests(0).await;
    requests.retain(|(verb, resource), _| resource != "leases" && verb != "watch");
    requests
}

fn count(requests: &BTreeMap<(String, String), u64>, verb: &str, resource: &str) -> u64 {
    requests
        .get(&(verb.to_owned(), resource.to_owned()))
        .copied()
        .unwrap_or(0)
}

/// The managers of an object's own fields (not its status), each with how it wrote them.
fn managers<K: Resource>(object: &K) -> Vec<String> {
    object
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
        .map(|m| {
            format!(
                "{}/{}",
                m.manager.as_deref().unwrap_or_default(),
                m.operation.as_deref().unwrap_or_default()
            )
        })
        .collect()
}

async fn patch_spec(cluster: &Cluster, spec: serde_json::Value) {
    cluster
        .api::<Failover>()
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "spec": spec })),
        )
        .await
        .expect("patch the spec");
}

async fn template_annotations(cluster: &Cluster) -> BTreeMap<String, String> {
    let set = cluster
        .api::<StatefulSet>()
        .get("demo")
        .await
        .expect("the StatefulSet");
    set.spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_ready_instance_costs_no_writes_and_the_watch_wakes_only_on_spec_changes() {
    let cluster = Cluster::start().await;
    cluster.with_password("demo").await;
    cluster.create(failover("demo", three())).await;
    cluster.wait("demo", "Ready", T, ready).await;
    // Settled: the Ready Event and the last status writes are out.
    let settled = wait_for("the controller's writes to settle", T, || async {
        let before = writes(&requests(&cluster).await);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = requests(&cluster).await;
        (writes(&after) == before).then_some(after)
    })
    .await;

    // Every object the controller applied has its fields managed by one manager: the
    // controller's server-side apply.
    let ns = cluster.ns.clone();
    let owned = ListParams::default().labels(&format!("{LABEL_INSTANCE}=demo"));
    let mut checked = 0;
    macro_rules! one_manager {
        ($kind:ty) => {
            for object in Api::<$kind>::namespaced(cluster.admin.clone(), &ns)
                .list(&owned)
                .await
                .expect("list")
                .items
                .iter()
                .filter(|o| o.labels().get("app.kubernetes.io/managed-by").is_some())
            {
                let managers = managers(object);
                assert_eq!(
                    managers.len(),
                    1,
                    "{} {} has fields of {managers:?}",
                    <$kind>::kind(&()),
                    object.name_any()
                );
                checked += 1;
            }
        };
    }
    one_manager!(StatefulSet);
    one_manager!(Service);
    one_manager!(ConfigMap);
    one_manager!(Secret);
    one_manager!(PodDisruptionBudget);
    one_manager!(NetworkPolicy);
    assert!(checked >= 6, "only {checked} owned objects");

    // A status-only change wakes no cold pass: no Secret is read again.
    let status = serde_json::json!({ "status": { "message": "written by someone else" } });
    cluster
        .api::<Failover>()
        .patch_status("demo", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch the status");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_status = requests(&cluster).await;
    assert_eq!(
        count(&after_status, "get", "secrets"),
        count(&settled, "get", "secrets"),
        "a status change woke the cold path: {after_status:?}"
    );

    // An annotation change does wake it (a full cold pass), and that pass writes nothing.
    cluster.annotate("demo", "example.com/poke", "1").await;
    let passed = wait_for(
        "a cold pass on the annotation",
        Duration::from_secs(10),
        || async {
            let now = requests(&cluster).await;
            (count(&now, "get", "secrets") > count(&after_status, "get", "secrets")).then_some(now)
        },
    )
    .await;
    // And a minute of agent reports and heartbeats.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let minute = requests(&cluster).await;
    assert_eq!(
        writes(&minute),
        writes(&settled),
        "writes in steady state: before {settled:?}\nafter a cold pass {passed:?}\nafter a minute {minute:?}"
    );

    // A spec change reaches the StatefulSet through the real watch (no resync is due), and a
    // field dropped from the desired object is dropped from the live one.
    patch_spec(
        &cluster,
        serde_json::json!({ "podAnnotations": { "example.com/team": "cache" } }),
    )
    .await;
    wait_for(
        "the new pod annotation on the template",
        Duration::from_secs(10),
        || async {
            template_annotations(&cluster)
                .await
                .contains_key("example.com/team")
                .then_some(())
        },
    )
    .await;
    patch_spec(&cluster, serde_json::json!({ "podAnnotations": null })).await;
    wait_for(
        "the pod annotation gone from the template",
        Duration::from_secs(10),
        || async {
            (!template_annotations(&cluster)
                .await
                .contains_key("example.com/team"))
            .then_some(())
        },
    )
    .await;
}

/// The Failover is deleted through the controller's finalizer: its PVCs go unless
/// `retainAfterDeleted` keeps them.
async fn deleted(retain: bool) {
    let cluster = Cluster::start().await;
    cluster.with_password("demo").await;
    let spec = FailoverSpec {
        storage: Some(Storage {
            retain_after_deleted: retain,
            ..Storage::default()
        }),
        ..three()
    };
    cluster.create(failover("demo", spec)).await;
    cluster.wait("demo", "Ready", T, ready).await;
    let pvcs: Api<PersistentVolumeClaim> = cluster.api();
    let claims = pvcs.list(&ListParams::default()).await.expect("PVCs").items;
    assert_eq!(claims.len(), 3, "one PVC per pod from the claim template");
    cluster
        .api::<Failover>()
        .delete("demo", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the Failover to be gone", T, || async {
        cluster
            .api::<Failover>()
            .get_opt("demo")
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
    // A deleted PVC stays Terminating while its pod uses it (pvc-protection): deletion asked
    // is what the controller does.
    let doomed: Vec<String> = pvcs
        .list(&ListParams::default())
        .await
        .expect("PVCs")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .map(|p| p.name_any())
        .collect();
    if retain {
        assert!(doomed.is_empty(), "retained PVCs were deleted: {doomed:?}");
    } else {
        assert_eq!(doomed.len(), 3, "PVCs deleted: {doomed:?}");
    }
}

#[tokio::test]
async fn deletion_goes_through_the_finalizer_and_deletes_the_pvcs() {
    deleted(false).await;
}

#[tokio::test]
async fn deletion_with_retain_after_deleted_keeps_the_pvcs() {
    deleted(true).await;
}
