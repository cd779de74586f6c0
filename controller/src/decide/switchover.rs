//! Whether a planned switchover may start, and to which replica: the target must be an
//! in-sync replica that the master sees online. Pure; the driver carries the switchover out.

use super::{
    manual,
    model::{Desired, Durable, NodeSpec, Observed},
};

/// Why a planned switchover does not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("there is no master yet")]
    NoMaster,
    #[error("{0} is not a node of this instance")]
    NotANode(String),
    #[error("{0} is already the master")]
    AlreadyMaster(String),
    #[error("no replica can take over right now")]
    NoCandidate,
    #[error("{0} is not an in-sync replica right now")]
    NotInSync(String),
    #[error("{0}")]
    Sentinel(String),
    #[error("a switchover is already under way")]
    InProgress,
}

impl Refused {
    /// Worth asking again in a moment (the request itself is fine).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Refused::NoMaster
                | Refused::NoCandidate
                | Refused::NotInSync(_)
                | Refused::Sentinel(_)
                | Refused::InProgress
        )
    }
}

/// Checks a planned switchover request (`to`: a node, or `None`/`any` for the best replica)
/// against what is observed: the target must be an in-sync replica that the master sees online.
/// A switchover that may start: from the master, to an in-sync replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    /// The master now.
    pub from: String,
    pub to: NodeSpec,
}

pub fn choose(
    desired: &Desired,
    durable: &Durable,
    observed: &Observed,
    to: Option<String>,
) -> Result<Chosen, Refused> {
    let from = durable.master.clone().ok_or(Refused::NoMaster)?;
    let to = match to.filter(|t| t != "any") {
        Some(to) => {
            if desired.node(&to).is_none() {
                return Err(Refused::NotANode(to));
            }
            to
        }
        None => manual::best_candidate(desired, observed, Some(&from))
            .map(|n| n.name.clone())
            .ok_or(Refused::NoCandidate)?,
    };
    if to == from {
        return Err(Refused::AlreadyMaster(to));
    }
    let target = desired
        .node(&to)
        .cloned()
        .ok_or_else(|| Refused::NotANode(to.clone()))?;
    let target_ok = observed.nodes.get(&to).is_some_and(|o| {
        o.connected
            && o.report
                .as_ref()
                .and_then(|r| r.data.as_ref())
                .is_some_and(|d| d.master_link_up && !d.restarted_empty && !d.never_synced)
    });
    // The master must see it online too (after a full sync it waits for the first ack).
    let online_at_master = observed
        .nodes
        .get(&from)
        .and_then(|o| o.report.as_ref()?.data.as_ref())
        .is_some_and(|d| {
            d.replicas.iter().any(|r| {
                r.host == target.host && r.port == u32::from(target.port) && r.state == "online"
            })
        });
    if !(target_ok && online_at_master) {
        return Err(Refused::NotInSync(to));
    }
    Ok(Chosen { from, to: target })
}
