//! The hot path, shared by both runtimes: one failover pass per instance, woken by the hub.
//! Observe once (a [`plan::Snapshot`]) -> decide (`decide::manual` or `decide::sentinel`) ->
//! persist the durable state, only when it changed (a [`DurableStore`]) -> dispatch commands
//! -> start a planned switchover when one is asked for or needed. Everything is sent through
//! the instance's [`Handle`]. Nothing here waits for Kubernetes objects; only the durable
//! write may hold a failover back, and that is the epoch's safety.

mod dispatch;
mod handle;
pub mod plan;
pub mod rotation;
mod store;
pub mod switchover;
pub mod through_sentinel;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, info};

pub use crate::decide::Cause;
pub use crate::decide::switchover::{Chosen, Refused};
pub use handle::Handle;
pub use store::{DurableStore, StoreError};

use crate::{
    decide::model::{Desired, Durable, PendingSwitchover},
    decide::sentinel::SentinelDesired,
    hub::{Hub, InstanceKey, LeaseHolder},
};
use dispatch::Dispatch;
use plan::Snapshot;
use switchover::Manual;
use through_sentinel::ThroughSentinel;

/// Who wanted the switchover this pass tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverSource {
    /// The user (an annotation, a control request).
    Asked,
    /// The core (a scale-down), a terminating master or a roll.
    Needed,
}

/// What a pass did that the runtime reports or acts on.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Decision notes not said before (each is said once while it holds).
    pub new_notes: Vec<String>,
    /// Nodes to restart: their Valkey refuses the instance password.
    pub restarts: Vec<String>,
    /// The master changed this pass, and why.
    pub master_changed: Option<Cause>,
    /// The durable state was written.
    pub persisted: bool,
    /// Commands were sent: how long from observing to sending.
    pub decided: Option<Duration>,
    /// A switchover tried this pass.
    pub switchover: Option<(SwitchoverSource, Result<String, Refused>)>,
}

/// What one pass works towards, given by the runtime.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub desired: &'a Desired,
    pub sentinel: Option<&'a SentinelDesired>,
}

/// One instance's hot path: its durable state, its dispatch, what it already said.
#[derive(Debug)]
pub struct Driver {
    key: InstanceKey,
    dispatch: Arc<Dispatch>,
    durable: Durable,
    notes: Vec<String>,
    /// Move the master off this pod (it is terminating, or rolled last): kept until the master
    /// is elsewhere, so that a switchover that cannot start yet is tried again.
    move_off: Option<String>,
}

impl Driver {
    /// The driver of `key`, from the durable state its store holds.
    pub fn new(key: InstanceKey, durable: Durable) -> Self {
        Driver {
            key,
            dispatch: Arc::default(),
            durable,
            notes: Vec::new(),
            move_off: None,
        }
    }

    pub fn key(&self) -> &InstanceKey {
        &self.key
    }

    pub fn durable(&self) -> &Durable {
        &self.durable
    }

    /// The instance's way to its agents through `hub`.
    pub fn handle(&self, hub: &Hub) -> Handle {
        Handle::new(hub, &self.key, &self.dispatch)
    }

    /// Moves the master off `pod` (when it is the master) as soon as a replica can take over.
    pub fn move_master_off(&mut self, pod: String) {
        self.move_off = Some(pod);
    }

    /// One pass. `asked`: a switchover the user asked for (a pod, or `any`). An error means
    /// the durable state could not be written and nothing was sent.
    pub async fn pass<S: DurableStore>(
        &mut self,
        hub: &Hub,
        store: &S,
        target: Target<'_>,
        asked: Option<&str>,
    ) -> Result<Outcome, StoreError> {
        let observed_at = Instant::now();
        let handle = self.handle(hub);
        let seen = Snapshot::take(&handle, target);
        let mut plan = plan::plan(&handle, target, &self.durable, &seen, crate::now_ms());
        let mut outcome = Outcome::default();
        if let Some(to) = plan.sentinel_failover.take() {
            plan.notes
                .push(self.fail_over_through_sentinel(&handle, target, &seen, to));
        }
        if let Some(next) = plan.durable {
            // Durable first: if this write fails, nothing is sent.
            store.save(&next).await?;
            outcome.persisted = true;
            outcome.master_changed = master_change(&self.durable, &next);
            self.durable = next;
        }
        handle.grant(plan.lease_holder.map(|pod| LeaseHolder {
            pod,
            epoch: self.durable.epoch,
        }));
        if !plan.commands.is_empty() {
            outcome.decided = Some(observed_at.elapsed());
            // Names and pods only: some commands carry a password.
            let commands: Vec<String> = plan
                .commands
                .iter()
                .map(|(pod, action)| {
                    format!(
                        "{pod}: {}",
                        valkey_agent::executor::action_name(Some(action))
                    )
                })
                .collect();
            debug!(epoch = self.durable.epoch, ?commands, "dispatching");
        }
        handle.dispatch(self.durable.epoch, plan.commands);
        outcome.new_notes = plan
            .notes
            .iter()
            .filter(|n| !self.notes.contains(n))
            .cloned()
            .collect();
        self.notes = plan.notes;
        outcome.restarts = plan.restarts;

        if self.move_off.as_ref() != self.durable.master.as_ref() {
            self.move_off = None;
        }
        let moving = self.move_off.is_some();
        let wanted = match asked {
            Some(to) => Some((SwitchoverSource::Asked, to.to_owned())),
            None => plan
                .switchover
                .or(moving.then(|| "any".to_owned()))
                .map(|to| (SwitchoverSource::Needed, to)),
        };
        if let Some((source, to)) = wanted {
            let started = self
                .switchover(&handle, store, target, &seen, Some(to))
                .await?;
            outcome.switchover = Some((source, started));
        }
        Ok(outcome)
    }

    /// Starts a planned, lossless switchover (see [`switchover`]) unless one is under way,
    /// from what the hub observes now. Under policy manual the intent is persisted first (the
    /// outer error: it could not be); the inner result says whether it started.
    pub async fn start_switchover<S: DurableStore>(
        &mut self,
        hub: &Hub,
        store: &S,
        target: Target<'_>,
        to: Option<String>,
    ) -> Result<Result<String, Refused>, StoreError> {
        let handle = self.handle(hub);
        let seen = Snapshot::take(&handle, target);
        self.switchover(&handle, store, target, &seen, to).await
    }

    /// Steers Sentinel's failover of the lost master to `to`, the replica the decision chose
    /// (see [`through_sentinel`]), unless one is under way; what to report.
    fn fail_over_through_sentinel(
        &self,
        handle: &Handle,
        target: Target<'_>,
        seen: &Snapshot,
        to: String,
    ) -> String {
        let (Some(sd), Some(sentinels), Some(from)) = (
            target.sentinel,
            &seen.sentinels,
            self.durable.master.clone(),
        ) else {
            return format!("no failover to {to}: not under policy sentinel");
        };
        if self.dispatch.switchover_running() {
            return format!("failover to {to} waits for the switchover under way");
        }
        let Some(to) = target.desired.node(&to).cloned() else {
            return format!("no failover to {to}: not a node of this instance");
        };
        let chosen = Chosen { from, to };
        let observed = (&seen.data, sentinels);
        let epoch = self.durable.epoch;
        match ThroughSentinel::failover(handle.clone(), target.desired, sd, epoch, chosen, observed)
        {
            Ok(through) => through.start(),
            Err(why) => format!("no failover through Sentinel yet: {why}"),
        }
    }

    async fn switchover<S: DurableStore>(
        &mut self,
        handle: &Handle,
        store: &S,
        target: Target<'_>,
        seen: &Snapshot,
        to: Option<String>,
    ) -> Result<Result<String, Refused>, StoreError> {
        if self.dispatch.switchover_running() || self.durable.switchover.is_some() {
            // The one under way finishes first; a request is looked at again afterwards.
            return Ok(Err(Refused::InProgress));
        }
        let chosen =
            crate::decide::switchover::choose(target.desired, &self.durable, &seen.data, to);
        let chosen = match chosen {
            Ok(chosen) => chosen,
            Err(why) => return Ok(Err(why)),
        };
        if let (Some(sd), Some(sentinels)) = (target.sentinel, &seen.sentinels) {
            let epoch = self.durable.epoch;
            let desired = target.desired;
            let through =
                ThroughSentinel::switchover(handle.clone(), desired, sd, epoch, chosen, sentinels);
            return Ok(through.map(ThroughSentinel::start));
        }
        let Chosen { from, to } = chosen;
        let Some(from) = target.desired.node(&from).cloned() else {
            return Ok(Err(Refused::NotANode(from)));
        };
        let epoch = self.durable.epoch + 1;
        let mut next = self.durable.clone();
        next.switchover = Some(PendingSwitchover {
            from: from.name.clone(),
            to: to.name.clone(),
            epoch,
        });
        store.save(&next).await?;
        self.durable = next;
        info!(from = %from.name, to = %to.name, epoch, "switchover intent persisted");
        let others = others(target.desired, &[&from.name, &to.name]);
        let manual = Manual {
            handle: handle.clone(),
            epoch,
            from,
            to,
            others,
        };
        Ok(Ok(manual.start()))
    }
}

/// The names of the nodes of `desired` but `but`.
fn others(desired: &Desired, but: &[&String]) -> Vec<String> {
    desired
        .nodes
        .iter()
        .filter(|n| !but.contains(&&n.name))
        .map(|n| n.name.clone())
        .collect()
}

/// Why the master changed from `before` to `after`, if it did. An epoch bumped by a
/// switchover that did not happen is not a change.
fn master_change(before: &Durable, after: &Durable) -> Option<Cause> {
    if before.master == after.master || after.master.is_none() {
        return None;
    }
    if before.master.is_none() {
        return Some(Cause::Bootstrap);
    }
    Some(
        after
            .last_failover
            .as_ref()
            .filter(|_| after.last_failover != before.last_failover)
            .map_or(Cause::Unknown, |record| record.cause),
    )
}

#[cfg(test)]
mod tests;
