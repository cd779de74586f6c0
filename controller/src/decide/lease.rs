//! The controller's side of the master's write lease (the agent's side is
//! `valkey_agent::lease`): who is granted it, and when a master cut off from the controller can
//! no longer hold it, so that another node may be promoted without two writable masters. Pure;
//! every age here is measured on the controller's own monotonic clock, or read off a report as
//! an age measured on one node's clock; no two clocks are compared. See docs/failover.md,
//! "The write lease".

use std::collections::BTreeMap;

use valkey_proto::v1::{ProcessState, Role, StateReport};

use crate::{
    decide::model::{Desired, NodeObs, NodeSpec, Observed, data, follows},
    decide::sentinel::{SentinelDesired, sentinel_master, views},
};

/// How long a grant, or a replica's acknowledgement, lets a master keep taking writes.
pub const LEASE_MS: u64 = 1_500;
/// What the controller waits beyond the lease: the agent's fence check (every 50 ms), its
/// `CLIENT PAUSE` reaching Valkey, and clock rates that differ a little.
pub const MARGIN_MS: u64 = 500;
/// A master sends its replicas something at least this often (`repl-ping-replica-period 1`),
/// so a partition began at most this long after a replica last heard from it.
const PING_PERIOD_MS: i64 = 1_000;

/// Whether `master` could still hold its lease: Ok when it cannot (it was sent no grant for
/// the lease and the margin, and each replica that followed it has reported losing it long
/// enough ago that it had fenced itself by then); otherwise why not.
pub fn lapsed(observed: &Observed, master: &NodeSpec) -> Result<(), String> {
    let wait = LEASE_MS + MARGIN_MS;
    if observed
        .nodes
        .get(&master.name)
        .and_then(|o| o.lease_granted_ms)
        .is_some_and(|ago| ago < wait)
    {
        return Err(format!(
            "it was granted its write lease less than {wait} ms ago"
        ));
    }
    for (pod, obs) in observed
        .nodes
        .iter()
        .filter(|(pod, _)| **pod != master.name)
    {
        let Some(d) = data(obs).filter(|_| follows(obs, master)) else {
            continue;
        };
        // How long before its report the master can last have had its acknowledgement.
        let ago = if d.master_link_up {
            d.master_last_io_s * 1000 - PING_PERIOD_MS
        } else {
            d.master_link_down_s * 1000
        };
        if ago < wait as i64 {
            let heard = if obs.connected {
                ""
            } else {
                " (its agent is not heard: it may still be linked)"
            };
            return Err(format!("replica {pod} may still acknowledge it{heard}"));
        }
    }
    Ok(())
}

/// Who should hold the lease under policy manual: the recorded master, when it serves as one
/// and the instance has a replica to fail over to.
pub fn holder_manual(desired: &Desired, master: Option<&str>) -> Option<String> {
    (desired.nodes.len() >= 2)
        .then(|| master.map(str::to_owned))
        .flatten()
}

/// Who should hold the lease under policy sentinel: the master Sentinel names, while at least
/// the quorum of sentinels the controller hears name it and none of them holds it down. A
/// controller that cannot hear the quorum grants nothing, and the master keeps its role only
/// through its replicas: the sentinels that can promote another node are not on its side.
pub fn holder_sentinel(
    desired: &Desired,
    sd: &SentinelDesired,
    master: Option<&str>,
    sentinels: &BTreeMap<String, NodeObs>,
) -> Option<String> {
    let node = desired.node(master?)?;
    let views = views(sd, sentinels);
    let (host, port, _) = sentinel_master(&views)?;
    if host != node.host || port != u32::from(node.port) {
        return None;
    }
    let naming = views
        .iter()
        .filter_map(|v| v.master)
        .filter(|m| m.host == node.host && m.port == u32::from(node.port))
        .filter(|m| !m.flags.iter().any(|f| f == "s_down" || f == "o_down"))
        .count();
    (desired.nodes.len() >= 2 && naming >= sd.quorum as usize).then(|| node.name.clone())
}

/// Whether a node may be granted the lease now: its agent's latest report has its Valkey up
/// and serving as master. A hung master is granted nothing, so its lease lapses and it fences
/// itself should it come back.
pub fn grantable(report: Option<&StateReport>) -> bool {
    report.is_some_and(|r| {
        r.process() == ProcessState::Up && r.data.as_ref().is_some_and(|d| d.role() == Role::Master)
    })
}

#[cfg(test)]
mod tests;
