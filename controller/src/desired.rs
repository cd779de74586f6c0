//! The one translation of a validated spec ([`Valid`]) into what the failover driver works
//! towards (`Desired`, and `SentinelDesired` under policy sentinel), for both runtimes. Where each
//! node is reached is the runtime's to say: stable DNS names and vouched addresses in a
//! cluster (`k8s::hot`), loopback ports locally (`local::prepare`).

use std::{collections::BTreeMap, time::Duration};

use crate::{
    decide::model::{Desired, NodeSpec},
    decide::sentinel::SentinelDesired,
    validate::Valid,
};

/// A data node and where it is reached.
#[derive(Debug, Clone)]
pub struct Placed {
    pub name: String,
    pub ordinal: u32,
    pub host: String,
    pub port: u16,
}

/// What the driver works towards for a validated spec's data nodes: `nodes` are every node
/// kept (a master on an ordinal the spec scaled away stays, retiring, with every ordinal below
/// it, until the driver has moved its role). `announce`: nodes are kept announcing their
/// address (they are reached from outside the cluster).
pub fn data(
    valid: &Valid,
    nodes: impl IntoIterator<Item = Placed>,
    hang_timeout: Duration,
    announce: bool,
) -> Desired {
    let mut nodes: Vec<NodeSpec> = nodes
        .into_iter()
        .map(|n| NodeSpec {
            retiring: n.ordinal >= valid.replicas,
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
        live_config: valid.live_config.clone(),
        announce,
    }
}

/// How Sentinel watches the instance, under policy sentinel: `monitor` is the master's name
/// in Sentinel, `sentinels` where every sentinel is reached, `announce` the outside address
/// each embedded sentinel is kept announcing, by pod.
pub fn sentinel(
    valid: &Valid,
    monitor: String,
    sentinels: Vec<(String, u32)>,
    announce: BTreeMap<String, (String, u32)>,
) -> Option<SentinelDesired> {
    let watch = valid.sentinel()?;
    Some(SentinelDesired {
        name: monitor,
        quorum: watch.quorum,
        monitor_config: watch.monitor_config.clone(),
        sentinel_addrs: sentinels,
        announce,
    })
}
