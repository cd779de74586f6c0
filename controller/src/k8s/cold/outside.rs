//! Outside access, the cold path's part: the per-pod Services read once a pass (one list,
//! only for an instance reached from outside the cluster), kept on the instance for the hot
//! path, which computes the addresses (`objects::outside`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use kube::{Api, ResourceExt, api::ListParams};

use crate::{
    crd::{Failover, ServiceType},
    k8s::{
        LABEL_INSTANCE, Names,
        error::Error,
        objects::outside::{exposed, is_outside, sentinel_kind},
        runtime::context::{Context, Instance},
    },
};

/// Reads the instance's per-pod Services into `instance` (nothing, and no request, for an
/// instance reached only inside the cluster).
pub async fn refresh(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
) -> Result<(), Error> {
    let sentinels = match sentinel_kind(failover) {
        ServiceType::ClusterIP => 0,
        _ => crate::k8s::objects::sentinel::embedded(failover).map_or(0, |s| s.count()),
    };
    if !is_outside(failover) && sentinels == 0 {
        instance.set_exposed(BTreeMap::new());
        return Ok(());
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let listed = api
        .list(&ListParams::default().labels(&format!("{LABEL_INSTANCE}={}", names.instance)))
        .await
        .map_err(|source| Error::Read {
            what: "Services".into(),
            source,
        })?;
    let pods: Vec<String> = (0..failover.spec.replicas)
        .map(|i| names.pod(i))
        .chain((0..sentinels).map(|i| format!("{}-{i}", names.sentinel())))
        .collect();
    instance.set_exposed(
        listed
            .items
            .iter()
            .filter(|s| pods.contains(&s.name_any()))
            .map(|s| (s.name_any(), exposed(s)))
            .collect(),
    );
    Ok(())
}
