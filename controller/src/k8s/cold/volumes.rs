//! Growing `storage.capacity` grows the data PVCs where their StorageClass allows it
//! (`allowVolumeExpansion`). A PVC never shrinks: a smaller capacity only sizes PVCs made from
//! then on, and an Event says the existing ones keep their size. The PVCs are listed only when
//! the capacity differs from the one last brought about (and once after a controller start);
//! each smaller one is patched.

use k8s_openapi::{
    api::core::v1::PersistentVolumeClaim, apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::events::EventType,
};
use tracing::info;

use crate::k8s::{
    LABEL_COMPONENT, LABEL_INSTANCE, Names,
    error::Error,
    objects::data::{COMPONENT_DATA, claim_capacity},
    runtime::apply::{MANAGER, publish},
    runtime::context::{Context, Instance},
};
use crate::{crd::Failover, validate::parse_quantity};

/// Which PVCs must grow to reach a capacity, and which are already larger (they stay so).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sizing {
    pub grow: Vec<String>,
    pub larger: Vec<String>,
}

fn requested(pvc: &PersistentVolumeClaim) -> Option<f64> {
    let requests = pvc.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?;
    parse_quantity(&requests.get("storage")?.0)
}

/// Compares each PVC's request with `capacity`; a PVC whose request cannot be read is grown.
pub fn sizing(pvcs: &[PersistentVolumeClaim], capacity: &Quantity) -> Sizing {
    let mut sizing = Sizing::default();
    let Some(want) = parse_quantity(&capacity.0) else {
        return sizing;
    };
    for pvc in pvcs {
        match requested(pvc) {
            Some(have) if have > want => sizing.larger.push(pvc.name_any()),
            Some(have) if have == want => {}
            _ => sizing.grow.push(pvc.name_any()),
        }
    }
    sizing
}

/// Brings the instance's data PVCs to `storage.capacity` (growing only).
pub async fn expand(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
) -> Result<(), Error> {
    let Some(storage) = &failover.spec.storage else {
        return Ok(());
    };
    let capacity = claim_capacity(&failover.spec, storage);
    let done = instance
        .cold
        .lock()
        .map(|cold| cold.claims_sized_for.as_deref() == Some(capacity.0.as_str()))
        .unwrap_or(false);
    if done {
        return Ok(());
    }
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let selector = format!(
        "{LABEL_INSTANCE}={},{LABEL_COMPONENT}={COMPONENT_DATA}",
        names.instance
    );
    let listed = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Read {
            what: "the data PVCs".into(),
            source,
        })?;
    let sizing = sizing(&listed.items, &capacity);
    let patch = serde_json::json!({
        "spec": { "resources": { "requests": { "storage": capacity.0 } } }
    });
    let mut grown = Vec::new();
    for name in &sizing.grow {
        match api
            .patch(
                name,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => grown.push(name.clone()),
            // Refused for good (the StorageClass does not allow expansion, or a quota): say
            // so once; a change of capacity tries again.
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 403 | 422) => {
                let note = format!(
                    "PVC {name} cannot grow to {}: {}",
                    capacity.0, status.message
                );
                publish(
                    &ctx.recorder,
                    failover,
                    EventType::Warning,
                    "VolumeExpansionRefused",
                    &note,
                )
                .await;
            }
            Err(source) => {
                return Err(Error::Apply {
                    kind: "PersistentVolumeClaim".into(),
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    if !grown.is_empty() {
        info!(pvcs = ?grown, capacity = %capacity.0, "growing the data PVCs");
        let note = format!("growing {} to {}", grown.join(", "), capacity.0);
        publish(
            &ctx.recorder,
            failover,
            EventType::Normal,
            "ExpandingVolumes",
            &note,
        )
        .await;
    }
    if !sizing.larger.is_empty() {
        let note = format!(
            "{} stay larger than {}: a PVC cannot shrink (new PVCs get the new size)",
            sizing.larger.join(", "),
            capacity.0
        );
        publish(
            &ctx.recorder,
            failover,
            EventType::Warning,
            "VolumeShrinkIgnored",
            &note,
        )
        .await;
    }
    if let Ok(mut cold) = instance.cold.lock() {
        cold.claims_sized_for = Some(capacity.0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};
    use kube::api::ObjectMeta;

    use super::*;

    fn pvc(name: &str, size: Option<&str>) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                resources: Some(VolumeResourceRequirements {
                    requests: size.map(|s| [("storage".to_owned(), Quantity(s.into()))].into()),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }
    }

    #[test]
    fn only_smaller_claims_grow_and_larger_ones_are_named() {
        let pvcs = [
            pvc("data-demo-0", Some("1Gi")),
            pvc("data-demo-1", Some("2048Mi")),
            pvc("data-demo-2", Some("3Gi")),
            pvc("data-demo-3", None),
        ];
        assert_eq!(
            sizing(&pvcs, &Quantity("2Gi".into())),
            Sizing {
                grow: vec!["data-demo-0".into(), "data-demo-3".into()],
                larger: vec!["data-demo-2".into()],
            }
        );
        assert_eq!(
            sizing(&pvcs, &Quantity("not a size".into())),
            Sizing::default()
        );
    }
}
