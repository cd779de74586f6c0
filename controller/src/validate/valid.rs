//! What validation returns: the spec in the terms the controller acts on (parse, don't
//! validate). Both runtimes make their failover target from it (`crate::desired`), and the
//! hot path reads its live settings here, not in the raw spec.

use std::collections::BTreeMap;

use super::{Admission, Invalid, RESTART_KEYS, validate_admitted};
use crate::crd::{FailoverSpec, SentinelSettings};

/// A spec that passed validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Valid {
    /// Data nodes, master included (1 to 9).
    pub replicas: u32,
    /// Clients and replicas speak TLS to the data nodes.
    pub tls: bool,
    /// Who decides failover.
    pub policy: Policy,
    /// What the driver keeps on every node with CONFIG SET: fencing when there are enough
    /// nodes to afford it (a master cut off from every replica stops taking writes after
    /// 5 s), unless customConfigs says otherwise.
    pub live_config: BTreeMap<String, String>,
    /// customConfigs that apply live (CONFIG SET); the others roll the pods.
    pub live_settings: BTreeMap<String, String>,
}

/// Who decides failover.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Policy {
    /// The controller, on the agents' reports.
    #[default]
    Manual,
    /// Sentinel, watched and accelerated by the controller.
    Sentinel(Watch),
}

/// How Sentinel watches the instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Watch {
    pub set: SentinelSet,
    /// Sentinels that must agree the master is down.
    pub quorum: u32,
    /// down-after-milliseconds, failover-timeout, parallel-syncs, defaults filled in.
    pub monitor_config: BTreeMap<String, String>,
}

/// The sentinels that watch it.
#[derive(Debug, Clone, PartialEq)]
pub enum SentinelSet {
    /// The controller's own, `count` of them.
    Embedded { count: u32 },
    /// An existing set, at these addresses (host, port).
    External { nodes: Vec<(String, u32)> },
}

impl Valid {
    /// How Sentinel watches the instance, under policy sentinel.
    pub fn sentinel(&self) -> Option<&Watch> {
        match &self.policy {
            Policy::Manual => None,
            Policy::Sentinel(watch) => Some(watch),
        }
    }

    fn of(spec: &FailoverSpec) -> Self {
        Valid {
            replicas: spec.replicas.max(0) as u32,
            tls: spec.access.enable_tls,
            policy: spec
                .sentinel
                .as_ref()
                .map_or(Policy::Manual, |s| Policy::Sentinel(Watch::of(s))),
            live_config: live_config(spec),
            live_settings: spec
                .custom_configs
                .iter()
                .filter(|(k, _)| !RESTART_KEYS.contains(&k.to_ascii_lowercase().as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl Watch {
    fn of(settings: &SentinelSettings) -> Self {
        let set = match &settings.sentinel_reference {
            Some(reference) => SentinelSet::External {
                nodes: reference
                    .nodes
                    .iter()
                    .map(|n| (n.ip.clone(), n.port as u32))
                    .collect(),
            },
            None => SentinelSet::Embedded {
                count: settings.count().max(0) as u32,
            },
        };
        Watch {
            set,
            quorum: settings.quorum_or_default(),
            monitor_config: settings.monitor_config_or_default(),
        }
    }
}

impl SentinelSet {
    /// How many sentinels there are.
    pub fn count(&self) -> usize {
        match self {
            SentinelSet::Embedded { count } => *count as usize,
            SentinelSet::External { nodes } => nodes.len(),
        }
    }
}

/// Validates the instance's name and spec ([`validate_admitted`]) and returns the spec as the
/// controller acts on it.
pub fn parse(name: &str, spec: &FailoverSpec, admission: Admission) -> Result<Valid, Invalid> {
    validate_admitted(name, spec, admission)?;
    Ok(Valid::of(spec))
}

fn live_config(spec: &FailoverSpec) -> BTreeMap<String, String> {
    let mut live = BTreeMap::new();
    if spec.replicas >= 3 {
        live.insert("min-replicas-to-write".to_owned(), "1".to_owned());
        live.insert("min-replicas-max-lag".to_owned(), "5".to_owned());
    }
    for key in ["min-replicas-to-write", "min-replicas-max-lag"] {
        if let Some(value) = spec.custom_configs.get(key) {
            live.insert(key.to_owned(), value.clone());
        }
    }
    live
}
