//! The failover core for `policy: manual`: a pure function of (desired nodes, durable state,
//! the agents' latest observations, the clock) to a plan (a new durable state to persist first,
//! then commands). No I/O, no Kubernetes, no gRPC transport here.

use std::collections::BTreeMap;

use valkey_proto::v1::{ConfigSet, Promote, ReplicaOf, Role, command::Action};

use super::{
    Cause,
    model::{
        Desired, Durable, FailoverRecord, NodeObs, NodeSpec, Observed, PendingSwitchover, Plan,
        data, definitely_down, down_for_ms, follows, is_empty_node, is_up, role,
    },
};

/// The best promotion candidate among `nodes` except `excluded`: up, a replica with data
/// (never an empty or never-synced node), not priority 0; highest offset, then priority
/// (lower is preferred, as in Valkey), then lowest ordinal.
pub fn best_candidate<'a>(
    desired: &'a Desired,
    observed: &Observed,
    excluded: Option<&str>,
) -> Option<&'a NodeSpec> {
    desired
        .nodes
        .iter()
        .filter(|n| Some(n.name.as_str()) != excluded && !n.retiring)
        .filter_map(|n| Some((n, observed.nodes.get(&n.name)?)))
        .filter(|(_, obs)| is_up(obs) && !is_empty_node(obs))
        .filter_map(|(n, obs)| Some((n, data(obs)?)))
        .filter(|(_, d)| d.replica_priority != 0 || d.role() == Role::Master)
        .min_by_key(|(n, d)| {
            (
                std::cmp::Reverse(d.repl_offset),
                d.replica_priority,
                n.ordinal,
            )
        })
        .map(|(n, _)| n)
}

/// Bootstrap choice: the node with the most data, then the highest offset, then the lowest
/// ordinal; only among nodes that answer, and an empty or never-synced node only when every
/// node is (a brand-new instance).
fn bootstrap_choice<'a>(desired: &'a Desired, observed: &Observed) -> Option<&'a NodeSpec> {
    desired
        .nodes
        .iter()
        .filter(|n| !n.retiring)
        .filter_map(|n| Some((n, observed.nodes.get(&n.name)?)))
        .filter(|(_, obs)| is_up(obs))
        .filter_map(|(n, obs)| Some((n, is_empty_node(obs), data(obs)?)))
        .min_by_key(|(n, empty, d)| {
            (
                *empty,
                std::cmp::Reverse(d.key_count),
                std::cmp::Reverse(d.repl_offset),
                n.ordinal,
            )
        })
        .map(|(n, _, _)| n)
}

pub(crate) fn replica_of(master: &NodeSpec) -> Action {
    Action::ReplicaOf(ReplicaOf {
        host: master.host.clone(),
        port: u32::from(master.port),
    })
}

/// Whether a node other than `name` answers with data (even one that may not be promoted).
fn others_hold_data(desired: &Desired, observed: &Observed, name: &str) -> bool {
    desired
        .nodes
        .iter()
        .filter(|n| n.name != name)
        .filter_map(|n| observed.nodes.get(&n.name))
        .any(|obs| is_up(obs) && !is_empty_node(obs))
}

/// Whether a node other than `name` answers holding keys.
pub(crate) fn others_hold_keys(desired: &Desired, observed: &Observed, name: &str) -> bool {
    desired
        .nodes
        .iter()
        .filter(|n| n.name != name)
        .filter_map(|n| observed.nodes.get(&n.name))
        .any(|obs| is_up(obs) && data(obs).is_some_and(|d| d.key_count > 0))
}

/// Whether the master's replicas agree it is gone: at least one reachable replica follows it,
/// and every reachable replica that follows it has lost its link or heard nothing for a while.
/// Replicas that follow nobody (just restarted) or another node are no evidence either way.
fn replicas_lost_master(desired: &Desired, observed: &Observed, master: &NodeSpec) -> bool {
    let mut following = desired
        .nodes
        .iter()
        .filter(|n| n.name != master.name)
        .filter_map(|n| observed.nodes.get(&n.name))
        .filter(|obs| is_up(obs) && follows(obs, master))
        .peekable();
    following.peek().is_some()
        && following.all(|obs| {
            data(obs).is_some_and(|d| {
                !d.master_link_up || d.master_last_io_s >= desired.replica_silence_s
            })
        })
}

/// How long the failover of a master whose process is gone waits for the replicas that
/// followed it to report their link down, before choosing among the offsets it has.
pub const OFFSETS_SETTLE_MS: u64 = 1_000;

/// Every reachable replica that followed `master` has reported losing it, in a report its
/// agent probed after it heard the master's process close its connection: their reported
/// offsets are final, so the highest is the replica with the most data. Until then a replica's
/// offset may be a heartbeat old, and the one that acknowledged the last writes (WAIT) could
/// look behind one that merely reported later. A link-down report alone is not enough: a
/// replica still in its first sync reports its link down, yet acknowledges the writes it
/// receives until its next probe (the bootstrap test caught it).
pub(crate) fn offsets_final(desired: &Desired, observed: &Observed, master: &NodeSpec) -> bool {
    desired
        .nodes
        .iter()
        .filter(|n| n.name != master.name)
        .filter_map(|n| observed.nodes.get(&n.name))
        .filter(|obs| is_up(obs) && follows(obs, master))
        .all(|obs| data(obs).is_some_and(|d| !d.master_link_up && d.master_close_heard))
}

/// Decides what to do now under policy manual, in phases: commit (or drop) a planned
/// switchover, bootstrap the first master, tell why the master failed (if it did), fail over,
/// or in steady state keep the nodes in line.
pub fn decide(desired: &Desired, durable: &Durable, observed: &Observed, now_ms: i64) -> Plan {
    let round = Round {
        desired,
        durable,
        observed,
        now_ms,
    };
    if let Some(pending) = &durable.switchover {
        return round.commit_switchover(pending);
    }
    let Some(master) = durable.master.as_deref().and_then(|m| desired.node(m)) else {
        return round.bootstrap();
    };
    let master_obs = observed
        .nodes
        .get(&master.name)
        .cloned()
        .unwrap_or(NodeObs {
            unhealthy_ms: u64::MAX,
            ..NodeObs::default()
        });
    let mut plan = Plan::default();
    match round.why_failed(master, &master_obs, &mut plan) {
        Some((cause, reason)) => round.fail_over(master, &master_obs, cause, reason, &mut plan),
        None => round.steady(master, &master_obs, &mut plan),
    }
    plan
}

/// One decision's inputs.
struct Round<'a> {
    desired: &'a Desired,
    durable: &'a Durable,
    observed: &'a Observed,
    now_ms: i64,
}

impl Round<'_> {
    /// A planned switchover in progress: leave the nodes alone while it runs, then commit it
    /// if the target took over, or drop it if not.
    fn commit_switchover(&self, pending: &PendingSwitchover) -> Plan {
        let mut plan = Plan::default();
        if self.observed.switchover_in_flight {
            return plan;
        }
        let mut next = self.durable.clone();
        let target_is_master = self
            .observed
            .nodes
            .get(&pending.to)
            .is_some_and(|obs| is_up(obs) && role(obs) == Role::Master);
        next.epoch = next.epoch.max(pending.epoch);
        if target_is_master {
            next.master = Some(pending.to.clone());
            next.last_failover = Some(FailoverRecord {
                at_ms: self.now_ms,
                from: Some(pending.from.clone()),
                to: pending.to.clone(),
                reason: "planned switchover".into(),
                cause: Cause::Switchover,
            });
            plan.notes.push(format!(
                "switchover {} -> {} done",
                pending.from, pending.to
            ));
        } else {
            plan.notes.push(format!(
                "switchover {} -> {} did not happen; {} stays master",
                pending.from, pending.to, pending.from
            ));
        }
        next.switchover = None;
        plan.durable = Some(next);
        plan
    }

    /// No master yet: choose one once every desired node answers.
    fn bootstrap(&self) -> Plan {
        let (desired, observed) = (self.desired, self.observed);
        let mut plan = Plan::default();
        let all_up = desired
            .nodes
            .iter()
            .filter(|n| !n.retiring)
            .all(|n| observed.nodes.get(&n.name).is_some_and(is_up));
        if !all_up {
            return plan;
        }
        if let Some(chosen) = bootstrap_choice(desired, observed) {
            let mut next = self.durable.clone();
            next.epoch += 1;
            next.master = Some(chosen.name.clone());
            plan.notes.push(format!(
                "bootstrap: {} is master (epoch {})",
                chosen.name, next.epoch
            ));
            if observed
                .nodes
                .get(&chosen.name)
                .is_some_and(|o| role(o) != Role::Master)
            {
                plan.commands
                    .push((chosen.name.clone(), Action::Promote(Promote {})));
            }
            converge(desired, observed, chosen, &mut plan);
            plan.durable = Some(next);
        }
        plan
    }

    /// Why the master failed, if it did: its process is gone, it came back empty, or it has
    /// been unresponsive and its replicas lost it (once its write lease has lapsed; until then
    /// a note says why not yet).
    fn why_failed(
        &self,
        master: &NodeSpec,
        master_obs: &NodeObs,
        plan: &mut Plan,
    ) -> Option<(Cause, String)> {
        let (desired, observed) = (self.desired, self.observed);
        if definitely_down(master_obs) {
            return Some((
                Cause::ProcessGone,
                format!("master {} process is gone", master.name),
            ));
        }
        if came_back_empty(desired, observed, master, master_obs) {
            return Some((
                Cause::RestartedEmpty,
                format!("master {} restarted with an empty dataset", master.name),
            ));
        }
        if is_up(master_obs)
            || master_obs.unhealthy_ms < desired.hang_timeout_ms
            || !replicas_lost_master(desired, observed, master)
        {
            return None;
        }
        // Cut off, it may still take writes until its lease lapses and it fences itself.
        match super::lease::lapsed(observed, master) {
            Ok(()) => Some((
                Cause::Unresponsive,
                format!(
                    "master {} unresponsive for {} ms and its replicas lost it",
                    master.name, master_obs.unhealthy_ms
                ),
            )),
            Err(why) => {
                plan.notes.push(format!(
                    "master {} unresponsive; no failover until its write lease lapses: {why}",
                    master.name
                ));
                None
            }
        }
    }

    /// Promote the best candidate, once the replicas' offsets are final; or keep an empty
    /// master when no other node holds data (it is all there is).
    fn fail_over(
        &self,
        master: &NodeSpec,
        master_obs: &NodeObs,
        cause: Cause,
        reason: String,
        plan: &mut Plan,
    ) {
        let (desired, observed) = (self.desired, self.observed);
        let down_for_ms = down_for_ms(master_obs);
        if definitely_down(master_obs)
            && down_for_ms < OFFSETS_SETTLE_MS
            && !offsets_final(desired, observed, master)
        {
            plan.notes
                .push(format!("{reason}; waiting for its replicas' final offsets"));
            return;
        }
        let master_up = is_up(master_obs);
        match best_candidate(desired, observed, Some(&master.name)) {
            Some(candidate) => {
                let next = self.durable.failed_over(FailoverRecord {
                    at_ms: self.now_ms,
                    from: Some(master.name.clone()),
                    to: candidate.name.clone(),
                    reason: reason.clone(),
                    cause,
                });
                plan.notes.push(format!(
                    "failover {} -> {} (epoch {}): {reason}",
                    master.name, candidate.name, next.epoch
                ));
                plan.commands
                    .push((candidate.name.clone(), Action::Promote(Promote {})));
                converge(desired, observed, candidate, plan);
                plan.durable = Some(next);
            }
            None if master_up && !others_hold_data(desired, observed, &master.name) => {
                plan.notes.push(format!(
                    "{reason}; no other node holds data, so {} stays master",
                    master.name
                ));
                if role(master_obs) == Role::Replica {
                    plan.commands
                        .push((master.name.clone(), Action::Promote(Promote {})));
                }
                converge(desired, observed, master, plan);
            }
            None => plan
                .notes
                .push(format!("{reason}; no candidate to promote yet")),
        }
    }

    /// The master serves: the others follow it, and a retiring master hands its role over
    /// first. The recorded master came back (as every node does, a replica of nobody) with its
    /// data: promote it back, in the same epoch.
    fn steady(&self, master: &NodeSpec, master_obs: &NodeObs, plan: &mut Plan) {
        if !is_up(master_obs) {
            return;
        }
        match role(master_obs) {
            Role::Master => {
                converge(self.desired, self.observed, master, plan);
                if master.retiring {
                    // The master is being scaled away: move the role first.
                    plan.switchover =
                        best_candidate(self.desired, self.observed, Some(&master.name))
                            .map(|n| n.name.clone());
                }
            }
            Role::Replica => plan
                .commands
                .push((master.name.clone(), Action::Promote(Promote {}))),
            _ => {}
        }
    }
}

/// Nodes start as replicas of nobody, so a restarted master answers as a replica until it is
/// promoted back; one that came back empty must not be. Or, restarted, it has no keys while
/// another node has some: whatever its agent remembers (it may not have seen the last writes
/// before the crash), its data is not the newest. Both policies use this rule.
pub(crate) fn came_back_empty(
    desired: &Desired,
    observed: &Observed,
    master: &NodeSpec,
    master_obs: &NodeObs,
) -> bool {
    is_up(master_obs)
        && data(master_obs).is_some_and(|d| {
            d.restarted_empty
                || (d.role() == Role::Replica
                    && (d.never_synced
                        || (d.key_count == 0 && others_hold_keys(desired, observed, &master.name))))
        })
}

/// Every other answering node replicates from `master`; live settings are kept everywhere.
pub(crate) fn converge(desired: &Desired, observed: &Observed, master: &NodeSpec, plan: &mut Plan) {
    for node in &desired.nodes {
        let Some(obs) = observed.nodes.get(&node.name).filter(|o| is_up(o)) else {
            continue;
        };
        let relink = node.name != master.name && !follows(obs, master);
        if let Some(d) = data(obs) {
            let current = BTreeMap::from([
                ("min-replicas-to-write", d.min_replicas_to_write.to_string()),
                ("min-replicas-max-lag", d.min_replicas_max_lag.to_string()),
            ]);
            let mut drift: std::collections::HashMap<String, String> = desired
                .live_config
                .iter()
                .filter(|(k, v)| current.get(k.as_str()).is_some_and(|c| c != *v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if desired.announce
                && (d.replica_announce_ip != node.host
                    || d.replica_announce_port != u32::from(node.port))
            {
                drift.insert("replica-announce-ip".into(), node.host.clone());
                drift.insert("replica-announce-port".into(), node.port.to_string());
            }
            if !drift.is_empty() {
                plan.commands.push((
                    node.name.clone(),
                    Action::ConfigSet(ConfigSet {
                        params: drift,
                        ..ConfigSet::default()
                    }),
                ));
            }
        }
        // After the settings: a replica announces itself to its master as it links.
        if relink {
            plan.commands.push((node.name.clone(), replica_of(master)));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
