//! The Kubernetes writes both paths make, each a thin wrapper over one API call: server-side
//! apply of an owned object only when it differs from what was last applied, merge patches of
//! the Failover and its status, pod restarts, and Events.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::events::EventType,
};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::crd::{Failover, FailoverStatus};
use crate::k8s::{Names, runtime::context::Applied};

/// The field manager of everything this controller applies.
pub const MANAGER: &str = "valkey-operator";

/// The hash of an object as it would be applied.
pub fn hash_of<K: Serialize>(object: &K) -> String {
    let bytes = serde_json::to_vec(object).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Whether `object` differs from what was last applied as `last`.
pub fn differs<K: Serialize>(object: &K, last: Option<&Applied>) -> bool {
    last.is_none_or(|last| last.hash != hash_of(object))
}

/// A namespaced object this controller applies (every k8s-openapi kind is one).
pub trait Object:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Object for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
{
}

/// Server-side apply, forced: this controller owns these objects' fields.
pub async fn apply<K: Object>(
    client: &Client,
    namespace: &str,
    object: &K,
) -> Result<K, kube::Error> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

/// A merge patch of the Failover's metadata (a handled annotation); returns the new object.
pub async fn merge_failover(
    client: &Client,
    names: &Names,
    patch: &serde_json::Value,
) -> Result<Failover, kube::Error> {
    let api: Api<Failover> = Api::namespaced(client.clone(), &names.namespace);
    api.patch(
        &names.instance,
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
}

/// A merge patch of the status with the fields of `next` that differ from `previous`; a field
/// that is gone is sent as null so that it is removed.
pub async fn patch_status(
    client: &Client,
    names: &Names,
    previous: Option<&FailoverStatus>,
    next: &FailoverStatus,
) -> Result<(), kube::Error> {
    let value = serde_json::to_value(next).map_err(kube::Error::SerdeError)?;
    let previous = previous
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or_default();
    let Some(fields) = merge_diff(&previous, &value) else {
        return Ok(());
    };
    let api: Api<Failover> = Api::namespaced(client.clone(), &names.namespace);
    let patch = serde_json::json!({ "status": fields });
    api.patch_status(
        &names.instance,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

/// The JSON merge patch (RFC 7386) that turns `previous` into `next`: changed fields only,
/// nested objects field by field, and a field gone (or null) as null, so that it is removed
/// from the object too. None when nothing changed.
pub fn merge_diff(
    previous: &serde_json::Value,
    next: &serde_json::Value,
) -> Option<serde_json::Value> {
    use serde_json::Value;
    match (previous.as_object(), next.as_object()) {
        (Some(previous), Some(next)) => {
            let mut fields = serde_json::Map::new();
            for (key, value) in next {
                match previous.get(key) {
                    Some(old) if old == value => {}
                    Some(old) if old.is_object() && value.is_object() => {
                        if let Some(diff) = merge_diff(old, value) {
                            fields.insert(key.clone(), diff);
                        }
                    }
                    _ => {
                        fields.insert(key.clone(), value.clone());
                    }
                }
            }
            for (key, old) in previous {
                if !old.is_null() && next.get(key).is_none_or(Value::is_null) {
                    fields.insert(key.clone(), Value::Null);
                }
            }
            (!fields.is_empty()).then_some(Value::Object(fields))
        }
        _ => (previous != next).then(|| next.clone()),
    }
}

/// Deletes a pod so that its StatefulSet starts it again (its start script regenerating its
/// config).
/// A pod already gone counts as restarted.
pub async fn restart_pod(
    client: &Client,
    cache: &crate::k8s::runtime::context::PodCache,
    namespace: &str,
    pod: &str,
) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deleted = match pods.delete(pod, &DeleteParams::default()).await {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other.map(|_| ()),
    };
    if deleted.is_ok() {
        // Not running that pod any more, whenever the pod watch says so.
        cache.delete(namespace, pod);
    }
    deleted
}

/// Records an Event on the Failover; a failure is logged, never fatal.
pub async fn publish(
    recorder: &crate::k8s::runtime::events::Recorder,
    failover: &Failover,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    if let Err(err) = recorder
        .publish(type_, reason, note, &failover.object_ref(&()))
        .await
    {
        warn!(failover = %failover.name_any(), error = %err, reason, "could not record an Event");
    }
}

/// Writes `next` as the instance's status unless it is what was last written; remembers it.
/// Returns whether anything was written.
pub async fn replace_status(
    client: &Client,
    names: &Names,
    instance: &crate::k8s::runtime::context::Instance,
    next: FailoverStatus,
) -> Result<bool, kube::Error> {
    let _writing = instance.status_lock.lock().await;
    let previous = instance.status();
    if previous.as_ref() == Some(&next) {
        return Ok(false);
    }
    patch_status(client, names, previous.as_ref(), &next).await?;
    instance.remember_status(next);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge_diff;

    #[test]
    fn a_merge_diff_removes_nested_fields_and_is_empty_when_nothing_changed() {
        let previous = json!({"phase": "Ready", "monitor": {"policy": "manual", "oldPasswordSecret": "s"}, "gone": null});
        let next = json!({"phase": "Ready", "monitor": {"policy": "manual"}, "gone": null});
        assert_eq!(
            merge_diff(&previous, &next),
            Some(json!({"monitor": {"oldPasswordSecret": null}}))
        );
        assert_eq!(merge_diff(&next, &next), None);
        assert_eq!(
            merge_diff(
                &next,
                &json!({"phase": "Creating", "monitor": {"policy": "manual"}})
            ),
            Some(json!({"phase": "Creating"}))
        );
        assert_eq!(merge_diff(&json!(null), &next), Some(next.clone()));
    }
}
