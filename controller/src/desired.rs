//! The one translation of a `FailoverSpec` into what the failover driver works towards
//! (`Desired`, and `SentinelDesired` under policy sentinel), for both runtimes. Where each
//! node is reached is the runtime's to say: stable DNS names and vouched addresses in a
//! cluster (`k8s::hot`), loopback ports locally (`local::prepare`).

use std::{collections::BTreeMap, time::Duration};

use crate::{
    crd::FailoverSpec,
    decide::model::{Desired, NodeSpec},
    decide::sentinel::SentinelDesired,
};

/// A data node and where it is reached.
#[derive(Debug, Clone)]
pub struct Placed {
    pub name: String,
    pub ordinal: u32,
    pub host: String,
    pub port: u16,
}

/// What the driver works towards for `spec`'s data nodes: `nodes` are every node kept (a
/// master on an ordinal the spec scaled away stays, retiring, with every ordinal below it,
/// until the driver has moved its role). `announce`: nodes are kept announcing their address
/// (they are reached from outside the cluster).
pub fn data(
    spec: &FailoverSpec,
    nodes: impl IntoIterator<Item = Placed>,
    hang_timeout: Duration,
    announce: bool,
) -> Desired {
    let mut nodes: Vec<NodeSpec> = nodes
        .into_iter()
        .map(|n| NodeSpec {
            retiring: i64::from(n.ordinal) >= i64::from(spec.replicas),
            name: n.name,
            ordinal: n.ordinal,
            host: n.host,
            port: n.port,
        })
        .collect();
    nodes.sort_by_key(|n| n.ordinal);
    Desired {
        nodes,
        hang_timeout_ms: hang_timeout.as_millis() as u64,
        replica_silence_s: (hang_timeout.as_secs() as i64).max(2),
        live_config: live_config(spec),
        announce,
    }
}

/// How Sentinel watches the instance, under policy sentinel: `monitor` is the master's name
/// in Sentinel, `sentinels` where every sentinel is reached, `announce` the outside address
/// each embedded sentinel is kept announcing, by pod.
pub fn sentinel(
    spec: &FailoverSpec,
    monitor: String,
    sentinels: Vec<(String, u32)>,
    announce: BTreeMap<String, (String, u32)>,
) -> Option<SentinelDesired> {
    let settings = spec.sentinel.as_ref()?;
    Some(SentinelDesired {
        name: monitor,
        quorum: settings.quorum_or_default(),
        monitor_config: settings.monitor_config_or_default(),
        sentinel_addrs: sentinels,
        announce,
    })
}

/// Settings kept on every node with CONFIG SET: fencing when there are enough nodes to afford
/// it (a master cut off from every replica stops taking writes after 5 s), unless
/// customConfigs says otherwise.
pub fn live_config(spec: &FailoverSpec) -> BTreeMap<String, String> {
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
