//! Planning, the first step of a pass: from one observation, the decision of the instance's
//! policy (manual or sentinel), who holds the write lease after it, and the credential
//! repairs, with restarts not repeated too soon.

use std::collections::BTreeMap;

use super::{Handle, Target, dispatch::RESTART_QUIET};
use crate::decide::{
    credentials, lease,
    model::{Durable, NodeObs, Observed, Plan},
};

/// One pass's observation: the data nodes, and the sentinels under policy sentinel.
#[derive(Debug)]
pub struct Snapshot {
    pub data: Observed,
    pub sentinels: Option<BTreeMap<String, NodeObs>>,
}

impl Snapshot {
    pub fn take(handle: &Handle, target: Target<'_>) -> Self {
        Snapshot {
            data: handle.observe(),
            sentinels: target.sentinel.map(|_| handle.observe_sentinels()),
        }
    }
}

/// What to do now for one instance.
pub fn plan(
    handle: &Handle,
    target: Target<'_>,
    durable: &Durable,
    seen: &Snapshot,
    now_ms: i64,
) -> Plan {
    let (desired, observed) = (target.desired, &seen.data);
    let mut plan = match (target.sentinel, &seen.sentinels) {
        (Some(sd), Some(sentinels)) if !observed.switchover_in_flight => {
            crate::decide::sentinel::decide(desired, sd, durable, observed, sentinels, now_ms)
        }
        // A Sentinel switchover runs its own steps; the decisions wait for them.
        (Some(_), _) => Plan::default(),
        (None, _) => crate::decide::manual::decide(desired, durable, observed, now_ms),
    };
    let after = plan.durable.as_ref().unwrap_or(durable).master.as_deref();
    plan.lease_holder = match (target.sentinel, &seen.sentinels) {
        (Some(sd), Some(sentinels)) => lease::holder_sentinel(desired, sd, after, sentinels),
        _ => lease::holder_manual(desired, after),
    };
    // The master is moving: no grant may go to the old one from here on, and none may
    // have gone since it was observed (the decision would rest on a stale view).
    if let Some(old) = durable.master.as_deref()
        && Some(old) != after
    {
        let granted = observed.nodes.get(old).map_or(0, |o| o.lease_grants);
        if !handle.revoke(old, granted) {
            // It is heard again: it keeps the lease (it was the holder, or it would not
            // have been granted one).
            return Plan {
                notes: vec![format!(
                    "{old} was granted its write lease meanwhile; deciding again"
                )],
                lease_holder: Some(old.to_owned()),
                ..Plan::default()
            };
        }
    }
    let repairs = credentials::repairs(desired, durable, observed);
    plan.notes.extend(repairs.notes);
    plan.restarts = repairs
        .restart
        .into_iter()
        .filter(|pod| {
            handle
                .dispatcher()
                .not_done_lately("restart", pod, RESTART_QUIET)
        })
        .collect();
    plan
}
