//! A StatefulSet's fields the API server will not change (its volume claim templates,
//! selector, service name, pod management policy) change by deleting the set with its pods
//! orphaned and creating it again: the pods keep running, and the new set adopts them (same
//! selector) and their PVCs (same claim names).
//!
//! The refusal is recognised from the API server's answer, so nothing is read beforehand: an
//! unchanged set costs nothing, a changed one one failed apply, one delete and one create.
//! While the old set is being deleted (the garbage collector first orphans its pods), the
//! apply is refused again and the delete repeated; the cold path looks again within a second.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::{Api, ResourceExt, api::DeleteParams, runtime::events::EventType};
use tracing::info;

use crate::crd::Failover;
use crate::k8s::{
    runtime::apply::publish,
    runtime::context::{Context, Instance},
    {cold::apply_changed, error::Error},
};

/// What older API servers say when an update touches a StatefulSet field they keep fixed
/// (apps/v1 validation, `ValidateStatefulSetUpdate`).
pub const FORBIDDEN_UPDATE: &str = "updates to statefulset spec for fields other than";

/// The fields a StatefulSet keeps fixed. Newer API servers (1.37 among them) refuse a change
/// to one of them field by field, as `<field>: Invalid value: ...: field is immutable`.
pub const FIXED_FIELDS: [&str; 4] = [
    "spec.volumeClaimTemplates",
    "spec.selector",
    "spec.serviceName",
    "spec.podManagementPolicy",
];

/// What became of one StatefulSet.
#[derive(Debug)]
pub enum SetApplied {
    /// As last applied: no request made.
    Unchanged,
    Applied(Box<StatefulSet>),
    /// Deleted (pods orphaned) to be created again: look again shortly.
    Recreating,
}

/// The API server refused to change a field it keeps fixed, in either wording.
pub fn is_forbidden_update(err: &kube::Error) -> bool {
    let kube::Error::Api(status) = err else {
        return false;
    };
    let fixed = |field: &str| FIXED_FIELDS.iter().any(|f| field.starts_with(f));
    let immutable_cause = status
        .details
        .iter()
        .flat_map(|d| &d.causes)
        .any(|cause| fixed(&cause.field) && cause.message.contains("field is immutable"));
    status.code == 422 && (status.message.contains(FORBIDDEN_UPDATE) || immutable_cause)
}

/// Applies `set`; when the API server refuses because a fixed field changed, deletes the
/// old set with its pods orphaned, so that the next pass creates it anew.
pub async fn apply_set(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    namespace: &str,
    set: &StatefulSet,
) -> Result<SetApplied, Error> {
    let name = set.name_any();
    let source = match apply_changed(ctx, instance, namespace, set).await {
        Ok(Some(applied)) => return Ok(SetApplied::Applied(Box::new(applied))),
        Ok(None) => return Ok(SetApplied::Unchanged),
        Err(Error::Apply { source, .. }) if is_forbidden_update(&source) => source,
        Err(err) => return Err(err),
    };
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), namespace);
    match api.delete(&name, &DeleteParams::orphan()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(source) => {
            return Err(Error::Apply {
                kind: "StatefulSet".into(),
                name,
                source,
            });
        }
    }
    if let Ok(mut cold) = instance.cold.lock() {
        cold.applied.remove(&format!("StatefulSet/{name}"));
    }
    info!(statefulset = %name, refused = %source, "recreating with its pods orphaned");
    let note = format!(
        "StatefulSet {name}: a field Kubernetes keeps fixed changed; deleted with its pods \
         kept running, to be created again"
    );
    publish(
        &ctx.recorder,
        failover,
        EventType::Normal,
        "RecreatingStatefulSet",
        &note,
    )
    .await;
    Ok(SetApplied::Recreating)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            reason: "Invalid".into(),
            ..kube::core::Status::default()
        }))
    }

    #[test]
    fn only_the_fixed_field_refusal_recreates() {
        let fixed = "StatefulSet.apps \"demo\" is invalid: spec: Forbidden: updates to \
                     statefulset spec for fields other than 'replicas', 'ordinals', \
                     'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and \
                     'minReadySeconds' are forbidden";
        assert!(is_forbidden_update(&refusal(422, fixed)));
        // Anything else invalid must not delete the set: creating it again would fail too.
        assert!(!is_forbidden_update(&refusal(
            422,
            "spec.template.spec.containers[0].image: Required value"
        )));
        assert!(!is_forbidden_update(&refusal(409, fixed)));
    }

    /// Kubernetes 1.37's wording: field by field, with the field in the status's causes.
    #[test]
    fn a_fixed_field_refused_as_immutable_recreates() {
        let immutable = |field: &str| {
            let mut err = refusal(
                422,
                &format!(
                    "StatefulSet.apps \"demo\" is invalid: {field}: Invalid value: [...]: field is immutable"
                ),
            );
            if let kube::Error::Api(status) = &mut err {
                status.details = Some(kube::core::response::StatusDetails {
                    causes: vec![kube::core::response::StatusCause {
                        reason: "FieldValueInvalid".into(),
                        message: "Invalid value: [...]: field is immutable".into(),
                        field: field.into(),
                    }],
                    name: "demo".into(),
                    group: "apps".into(),
                    kind: "statefulsets".into(),
                    uid: String::new(),
                    retry_after_seconds: 0,
                });
            }
            err
        };
        assert!(is_forbidden_update(&immutable("spec.volumeClaimTemplates")));
        assert!(is_forbidden_update(&immutable("spec.selector")));
        // An immutable field that recreating would not change is not a reason to.
        assert!(!is_forbidden_update(&immutable("metadata.name")));
    }
}
