//! Pure builders of every object a Failover owns, one file per kind: the data pods
//! (`data`: config, StatefulSet, PDB), the pod template both StatefulSets share (`pod`), the
//! embedded sentinels (`sentinel`), Services (`services`), the NetworkPolicy
//! (`network_policy`), TLS (`tls`), the password Secrets' shape (`password`), outside addresses
//! (`outside`), and the status (`status`). No API calls: the cold path applies what these
//! return, the hot path writes the status, and tests compare them with fixtures.

pub mod data;
pub mod network_policy;
pub mod outside;
pub mod password;
pub mod pod;
pub mod sentinel;
pub mod services;
pub mod status;
pub mod tls;

use crate::{
    crd::Failover,
    k8s::{Names, Settings, is_paused},
};

/// Every object the controller applies for a Failover (but the password Secret, which is
/// generated at apply time), in apply order: what `valkey-controller render` prints.
pub fn render(
    failover: &Failover,
    settings: &Settings,
) -> Result<Vec<serde_json::Value>, crate::validate::Invalid> {
    let names = Names::of(failover);
    crate::validate::validate_admitted(&names.instance, &failover.spec, settings.admission)?;
    let allowed = network_policy::allowed(failover)?;
    let paused = is_paused(failover);
    let mut objects = Vec::new();
    let mut push = |value: Result<serde_json::Value, serde_json::Error>| {
        if let Ok(value) = value {
            objects.push(value);
        }
    };
    push(serde_json::to_value(data::config_map(failover)));
    push(serde_json::to_value(tls::controller_ca_config_map(
        failover,
        &settings.controller_ca,
    )));
    if let Some(certificate) = tls::certificate(failover) {
        push(serde_json::to_value(certificate));
    }
    for service in services::data_services(failover)? {
        push(serde_json::to_value(service));
    }
    push(serde_json::to_value(network_policy::network_policy(
        failover, settings, allowed,
    )));
    push(serde_json::to_value(data::statefulset(
        failover, settings, paused,
    )));
    push(serde_json::to_value(data::pdb(
        failover,
        data::COMPONENT_DATA,
        names.data(),
    )));
    let (configs, sets, sentinel_services, budgets) =
        sentinel::objects(failover, settings, paused, None);
    configs
        .into_iter()
        .for_each(|o| push(serde_json::to_value(o)));
    sentinel_services
        .into_iter()
        .for_each(|o| push(serde_json::to_value(o)));
    sets.into_iter().for_each(|o| push(serde_json::to_value(o)));
    budgets
        .into_iter()
        .for_each(|o| push(serde_json::to_value(o)));
    Ok(objects)
}
