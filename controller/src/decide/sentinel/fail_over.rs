//! Policy sentinel when the master is lost and the controller is up: the controller chooses
//! the replica by the manual core's rule (the highest final offset), and Sentinel promotes
//! that one (the runtime steers its failover there); or, when no sentinel can (none knows the
//! replica yet: the bootstrap window), the controller promotes it and hands it to every
//! sentinel as at bootstrap.

use valkey_proto::v1::{Promote, SentinelFailover, SentinelMaster, command::Action};

use super::{Round, failing_over, failover_in_progress, knows_replicas, monitor, replica_at};
use crate::decide::{
    Cause,
    manual::{self, OFFSETS_SETTLE_MS, came_back_empty, converge, offsets_final},
    model::{FailoverRecord, NodeSpec, Plan, definitely_down, down_for_ms, is_up},
};

impl Round<'_> {
    /// The master's own agent says its Valkey is gone, or it came back empty, or the
    /// sentinels hold it objectively down while no failover runs (Sentinel aborted one and
    /// would not try again for twice failover-timeout): fail over now rather than after
    /// down-after-milliseconds, to the replica the controller chooses. True when the master
    /// is lost (nothing else is done this round).
    pub(super) fn accelerate(&self, master: &NodeSpec, plan: &mut Plan) -> bool {
        let (desired, observed) = (self.desired, self.observed);
        let master_obs = observed
            .nodes
            .get(&master.name)
            .cloned()
            .unwrap_or_default();
        let empty = came_back_empty(desired, observed, master, &master_obs);
        let stuck = super::objectively_down(&self.views) && !is_up(&master_obs);
        let gone = definitely_down(&master_obs);
        if !(gone || empty || stuck) || failover_in_progress(&self.views) {
            return false;
        }
        let (why, cause) = if empty {
            ("came back empty", Cause::RestartedEmpty)
        } else if gone {
            ("is gone", Cause::ProcessGone)
        } else {
            (
                "is objectively down and no failover runs",
                Cause::Unresponsive,
            )
        };
        let down_for_ms = down_for_ms(&master_obs);
        if gone && down_for_ms < OFFSETS_SETTLE_MS && !offsets_final(desired, observed, master) {
            plan.notes.push(format!(
                "master {} {why}; waiting for its replicas' final offsets",
                master.name
            ));
            return true;
        }
        match manual::best_candidate(desired, observed, Some(&master.name)) {
            Some(chosen) if self.steerable(chosen) => {
                plan.notes.push(format!(
                    "master {} {why}: failing over to {} through Sentinel",
                    master.name, chosen.name
                ));
                plan.sentinel_failover = Some(chosen.name.clone());
            }
            Some(chosen) if self.may_hand_over() => {
                self.hand_over(master, chosen, (why, cause), plan);
            }
            Some(chosen) => plan.notes.push(format!(
                "master {} {why}; no sentinel knows {} yet, and a sentinel that failed over \
                 before is not heard: waiting",
                master.name, chosen.name
            )),
            // No replica the controller could choose: Sentinel's own choice, as before.
            None => self.ask_sentinel(master, why, plan),
        }
        true
    }

    /// Whether a sentinel not failing over lists `chosen` among its replicas, not down: it
    /// can be steered to promote it.
    fn steerable(&self, chosen: &NodeSpec) -> bool {
        self.views
            .iter()
            .filter_map(|v| v.master)
            .filter(|m| !failing_over(m))
            .filter_map(|m| replica_at(m, &chosen.host, u32::from(chosen.port)))
            .any(|r| !r.flags.iter().any(|f| f == "s_down" || f == "o_down"))
    }

    /// Whether the controller may promote a replica itself and re-point every sentinel at it:
    /// only while no sentinel has failed over since it was handed the instance (config epoch
    /// 0 everywhere). A sentinel at a higher epoch would otherwise tell the others, through
    /// its hello messages, to go back to the old master.
    fn may_hand_over(&self) -> bool {
        let monitoring: Vec<&SentinelMaster> = self.views.iter().filter_map(|v| v.master).collect();
        !monitoring.is_empty() && monitoring.iter().all(|m| m.config_epoch == 0)
    }

    /// No sentinel can promote `chosen` (none has learned it from the master's INFO yet):
    /// promote it under a new epoch, as the manual core does, and hand it to every sentinel.
    fn hand_over(
        &self,
        master: &NodeSpec,
        chosen: &NodeSpec,
        (why, cause): (&str, Cause),
        plan: &mut Plan,
    ) {
        let next = self.durable.failed_over(FailoverRecord {
            at_ms: self.now_ms,
            from: Some(master.name.clone()),
            to: chosen.name.clone(),
            reason: format!(
                "master {} {why}; no sentinel knew a replica, so the controller promoted {}",
                master.name, chosen.name
            ),
            cause,
        });
        plan.notes.push(format!(
            "master {} {why} before any sentinel knew a replica: promoting {} (epoch {}) and \
             handing it to every sentinel",
            master.name, chosen.name, next.epoch
        ));
        plan.commands
            .push((chosen.name.clone(), Action::Promote(Promote {})));
        converge(self.desired, self.observed, chosen, plan);
        for view in &self.views {
            plan.commands.extend(monitor(self.sd, chosen, view.pod));
        }
        plan.durable = Some(next);
    }

    /// Asks a sentinel to fail over and choose the replica itself: one that knows every
    /// replica and runs no failover, when one does (another answers NOGOODSLAVE or INPROG).
    fn ask_sentinel(&self, master: &NodeSpec, why: &str, plan: &mut Plan) {
        let idle = || {
            self.views
                .iter()
                .filter(|v| v.master.is_some_and(|m| !failing_over(m)))
        };
        let asked = idle()
            .find(|v| knows_replicas(self.desired, &master.name, v))
            .or_else(|| idle().next());
        if let Some(view) = asked {
            plan.notes.push(format!(
                "master {} {why}: asking Sentinel to fail over now",
                master.name
            ));
            plan.commands.push((
                view.pod.to_owned(),
                Action::SentinelFailover(SentinelFailover {
                    name: self.sd.name.clone(),
                }),
            ));
        }
    }
}

impl<'a> Round<'a> {
    /// Sentinel names `named` master at config epoch 0 (nobody failed over since the
    /// instance was handed to the sentinels), but it is not up, while the master the
    /// controller recorded serves: the controller handed that one over (see
    /// [`Round::hand_over`]) and some sentinel has not taken it yet. Keep ours, and re-point
    /// the sentinels that still name another.
    pub(super) fn handed_over(
        &self,
        named: &NodeSpec,
        config_epoch: u64,
        plan: &mut Plan,
    ) -> Option<&'a NodeSpec> {
        let ours = self.durable.master.as_deref()?;
        let named_up = self.observed.nodes.get(&named.name).is_some_and(is_up);
        if config_epoch != 0 || ours == named.name || named_up || !self.serves_as_master(ours) {
            return None;
        }
        let ours = self.desired.node(ours)?;
        for view in &self.views {
            if view
                .master
                .is_some_and(|m| m.host != ours.host || m.port != u32::from(ours.port))
            {
                plan.commands.extend(monitor(self.sd, ours, view.pod));
            }
        }
        plan.notes.push(format!(
            "some sentinels still name {}, which is down: handing {} to them",
            named.name, ours.name
        ));
        Some(ours)
    }
}
