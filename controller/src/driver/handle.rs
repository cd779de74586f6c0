//! One instance's way to its agents: what the hub observes of it, the commands sent to it
//! (one awaited, or a plan's dispatched), and its write lease (granted, revoked). The hot
//! pass, the switchover and a password rotation all go through one; it is cheap to clone
//! into a task.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tracing::warn;
use valkey_proto::v1::{Command, CommandResult, NodeKind, Outcome, Role, command::Action};

use super::dispatch::Dispatch;
use crate::{
    decide::model::{NodeObs, Observed},
    hub::{Hub, InstanceKey, LeaseHolder},
};

/// How long a dispatched command may take.
const DISPATCHED_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Handle {
    hub: Hub,
    key: InstanceKey,
    dispatch: Arc<Dispatch>,
}

impl Handle {
    pub(super) fn new(hub: &Hub, key: &InstanceKey, dispatch: &Arc<Dispatch>) -> Self {
        Handle {
            hub: hub.clone(),
            key: key.clone(),
            dispatch: dispatch.clone(),
        }
    }

    pub fn key(&self) -> &InstanceKey {
        &self.key
    }

    pub(super) fn dispatcher(&self) -> &Dispatch {
        &self.dispatch
    }

    /// The data nodes as the hub sees them now, and whether a switchover is running.
    pub fn observe(&self) -> Observed {
        let mut observed = self.hub.observe(&self.key);
        observed.switchover_in_flight = self.dispatch.switchover_running();
        observed
    }

    /// The sentinels as the hub sees them now, by pod.
    pub fn observe_sentinels(&self) -> BTreeMap<String, NodeObs> {
        self.hub.observe_kind(&self.key, NodeKind::Sentinel)
    }

    /// The pods whose agents are connected now.
    pub fn connected(&self) -> Vec<String> {
        self.hub.connected_pods(&self.key, NodeKind::Data)
    }

    /// `pod`'s agent reports it serving as master.
    pub fn reports_master(&self, pod: &str) -> bool {
        self.hub.observe(&self.key).nodes.get(pod).is_some_and(|o| {
            o.report
                .as_ref()
                .and_then(|r| r.data.as_ref())
                .is_some_and(|d| d.role() == Role::Master)
        })
    }

    /// Sends one command under `epoch` and waits until it is done (OK or ALREADY), within
    /// `deadline` (and a second more for the answer to arrive); the agent's answer (an offset,
    /// say).
    pub async fn command(
        &self,
        pod: &str,
        epoch: u64,
        action: Action,
        deadline: Duration,
    ) -> Result<CommandResult, String> {
        let command = Command {
            id: self.dispatch.next_id(epoch),
            epoch,
            deadline_ms: deadline.as_millis() as u32,
            action: Some(action),
        };
        match self
            .hub
            .command(&self.key, pod, command, deadline + Duration::from_secs(1))
            .await
        {
            Ok(r) if matches!(r.outcome(), Outcome::Ok | Outcome::Already) => Ok(r),
            Ok(r) => Err(format!("{pod}: {:?}: {}", r.outcome(), r.message)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends each command under `epoch` without waiting; a pod with a command in flight is
    /// skipped (the next pass plans again from what it then sees).
    pub fn dispatch(&self, epoch: u64, commands: Vec<(String, Action)>) {
        for (pod, action) in commands {
            if !self.dispatch.claim(&pod, &action) {
                continue;
            }
            let handle = self.clone();
            tokio::spawn(async move {
                let result = handle
                    .command(&pod, epoch, action, DISPATCHED_DEADLINE)
                    .await;
                if let Err(err) = result {
                    warn!(pod = %pod, error = %err, "command not done");
                }
                handle.dispatch.done(&pod);
            });
        }
    }

    /// Who may hold the write lease now (none: nobody).
    pub fn grant(&self, holder: Option<LeaseHolder>) {
        self.hub.hold_lease(&self.key, holder);
    }

    /// Takes the lease from `pod`, unless it was granted one after the `seen`-th grant.
    pub fn revoke(&self, pod: &str, seen: u64) -> bool {
        self.hub.revoke_lease(&self.key, pod, seen)
    }

    /// Wakes the instance's next pass now.
    pub fn touch(&self) {
        self.hub.touch(&self.key);
    }
}
