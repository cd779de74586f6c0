//! Moving the master through Sentinel under policy sentinel, with the replica the controller
//! chose: Sentinel promotes by `replica-priority` before offsets, so every other replica gets
//! priority 0 and the chosen one 1, and `SENTINEL FAILOVER` is asked only once the sentinel
//! has read them. A planned switchover also pauses the master and waits for the target to
//! have its offset; a failover (the master is lost) has nothing to pause.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};
use valkey_proto::v1::{
    PauseWrites, SentinelFailover, SentinelMaster, UnpauseWrites, command::Action,
};

use super::{
    Handle,
    switchover::{STEP, await_master, catch_up, finish, priority},
};
use crate::decide::{
    manual,
    model::{Desired, NodeObs, NodeSpec, Observed, is_up},
    sentinel::{SentinelDesired, replica_at},
    switchover::{Chosen, Refused},
};

/// How long Sentinel may take to see the steered replica priorities. Our agents set its INFO
/// period to a second (`SENTINEL DEBUG INFO-PERIOD`); a Sentinel we do not run refreshes
/// every 10 s.
pub(super) const PRIORITY_WAIT: Duration = Duration::from_secs(14);

/// How long the target may take to serve as master after SENTINEL FAILOVER (it is promoted
/// within about a second).
pub(super) const PROMOTION_WAIT: Duration = Duration::from_secs(8);

/// How long a step's command may take.
const SENTINEL_STEP: Duration = Duration::from_millis(8000);

/// How long the old master's writes stay paused at most.
const SENTINEL_PAUSE_MS: u32 = 10_000;

/// What moves the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A planned switchover: the master serves, and is paused and demoted.
    Switchover,
    /// A failover: the master is lost.
    Failover,
}

/// The master moved through Sentinel to a replica the controller chose: steer Sentinel's
/// choice (replica-priority), for a switchover pause the master and wait for the target to
/// have its offset, `SENTINEL FAILOVER`, wait for the target to serve as master (and demote
/// the old one at once), then release the pause and restore the priorities. No write that
/// was acknowledged is lost.
#[derive(Debug)]
pub struct ThroughSentinel {
    handle: Handle,
    kind: Kind,
    epoch: u64,
    /// The master's name in Sentinel.
    monitor: String,
    /// A sentinel that knows the target as a good replica.
    sentinel: String,
    from: NodeSpec,
    to: NodeSpec,
    /// The replicas whose priority is steered: every node but the master (for a failover,
    /// those that answer).
    replicas: Vec<NodeSpec>,
}

impl ThroughSentinel {
    /// The switchover from `from` to `to`, unless no sentinel knows `to` as an in-sync replica
    /// (it learns replicas from the master's INFO): SENTINEL FAILOVER would find no replica to
    /// promote.
    pub fn switchover(
        handle: Handle,
        desired: &Desired,
        watch: &SentinelDesired,
        epoch: u64,
        Chosen { from, to }: Chosen,
        sentinels: &BTreeMap<String, NodeObs>,
    ) -> Result<Self, Refused> {
        let from = desired
            .node(&from)
            .cloned()
            .ok_or(Refused::NotANode(from))?;
        let in_sync = |r: &valkey_proto::v1::SentinelPeer| {
            r.master_link_up && r.flags.iter().all(|f| f == "slave")
        };
        let sentinel = pick_sentinel(&watch.name, &to, sentinels, in_sync).ok_or_else(|| {
            Refused::Sentinel(format!(
                "{} is not an in-sync replica for Sentinel yet",
                to.name
            ))
        })?;
        let replicas = desired
            .nodes
            .iter()
            .filter(|n| n.name != from.name)
            .cloned()
            .collect();
        Ok(ThroughSentinel {
            handle,
            kind: Kind::Switchover,
            epoch,
            monitor: watch.name.clone(),
            sentinel,
            from,
            to,
            replicas,
        })
    }

    /// The failover of the lost master `from` to `to`, which the controller chose: a
    /// sentinel that runs no failover and lists `to`, not down, is steered to promote it.
    pub fn failover(
        handle: Handle,
        desired: &Desired,
        watch: &SentinelDesired,
        epoch: u64,
        Chosen { from, to }: Chosen,
        observed: (&Observed, &BTreeMap<String, NodeObs>),
    ) -> Result<Self, Refused> {
        let (data, sentinels) = observed;
        let from = desired
            .node(&from)
            .cloned()
            .ok_or(Refused::NotANode(from))?;
        let not_down = |r: &valkey_proto::v1::SentinelPeer| {
            !r.flags.iter().any(|f| f == "s_down" || f == "o_down")
        };
        let sentinel = pick_sentinel(&watch.name, &to, sentinels, not_down).ok_or_else(|| {
            Refused::Sentinel(format!("no sentinel lists {} as a good replica", to.name))
        })?;
        let replicas = desired
            .nodes
            .iter()
            .filter(|n| n.name != from.name)
            .filter(|n| n.name == to.name || data.nodes.get(&n.name).is_some_and(is_up))
            .cloned()
            .collect();
        Ok(ThroughSentinel {
            handle,
            kind: Kind::Failover,
            epoch,
            monitor: watch.name.clone(),
            sentinel,
            from,
            to,
            replicas,
        })
    }

    /// Starts it in a task; the message to report.
    pub fn start(self) -> String {
        self.handle.dispatcher().set_switchover(true);
        let (from, to) = (&self.from.name, &self.to.name);
        let what = self.what();
        let message = format!("{what} {from} -> {to} started through Sentinel");
        info!(from = %from, to = %to, what, "started through Sentinel");
        tokio::spawn(self.run());
        message
    }

    fn what(&self) -> &'static str {
        match self.kind {
            Kind::Switchover => "switchover",
            Kind::Failover => "failover",
        }
    }

    async fn run(self) {
        let started = Instant::now();
        let outcome = self.steps().await;
        self.restore().await;
        let (from, to, what) = (&self.from.name, &self.to.name, self.what());
        match outcome {
            Ok(()) => {
                info!(from = %from, to = %to, what, took = ?started.elapsed(), "done through Sentinel");
            }
            Err(err) => {
                warn!(from = %from, to = %to, what, error = %err, "failed through Sentinel");
            }
        }
        finish(&self.handle);
    }

    async fn steps(&self) -> Result<(), String> {
        self.steer().await?;
        self.await_steered().await?;
        if self.kind == Kind::Switchover {
            let offset = self.pause().await?;
            self.send(&self.to.name, catch_up(&self.from, offset))
                .await?;
        }
        let failover = SentinelFailover {
            name: self.monitor.clone(),
        };
        self.send(&self.sentinel, Action::SentinelFailover(failover))
            .await?;
        self.await_promoted().await?;
        if self.kind == Kind::Switchover {
            // Demote the old master before its pause ends, rather than waiting for Sentinel
            // to convert it (which can take seconds, taking writes meanwhile).
            self.send(&self.from.name, manual::replica_of(&self.to))
                .await?;
        }
        Ok(())
    }

    async fn send(&self, pod: &str, action: Action) -> Result<(), String> {
        self.handle
            .command(pod, self.epoch, action, SENTINEL_STEP)
            .await
            .map(drop)
    }

    /// The target's priority 1, every other replica's 0: Sentinel promotes the target only.
    async fn steer(&self) -> Result<(), String> {
        for node in &self.replicas {
            let value = if node.name == self.to.name { "1" } else { "0" };
            self.send(&node.name, priority(value)).await?;
        }
        Ok(())
    }

    /// Sentinel picks by the priorities it last read from INFO: wait until it has seen the
    /// new ones, so that it promotes the target and no other.
    async fn await_steered(&self) -> Result<(), String> {
        let deadline = Instant::now() + PRIORITY_WAIT;
        while !self.steered() {
            if Instant::now() > deadline {
                return Err(format!(
                    "Sentinel did not see the new replica priorities within {} s",
                    PRIORITY_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    fn steered(&self) -> bool {
        let seen = self
            .handle
            .observe_sentinels()
            .remove(&self.sentinel)
            .and_then(|o| o.report?.sentinel)
            .and_then(|s| s.masters.into_iter().find(|m| m.name == self.monitor));
        // A replica the sentinel does not list (it had not read it from the master's INFO
        // yet) is one it cannot promote: only the target must be there.
        seen.is_some_and(|m| {
            self.replicas.iter().all(|node| {
                let want = u32::from(node.name == self.to.name);
                match replica_at(&m, &node.host, u32::from(node.port)) {
                    Some(r) => r.priority == want,
                    None => want == 0,
                }
            })
        })
    }

    /// The master's writes paused; its offset.
    async fn pause(&self) -> Result<i64, String> {
        let pause = PauseWrites {
            pause_ms: SENTINEL_PAUSE_MS,
        };
        let paused = self.handle.command(
            &self.from.name,
            self.epoch,
            Action::PauseWrites(pause),
            STEP,
        );
        Ok(paused.await?.offset)
    }

    async fn await_promoted(&self) -> Result<(), String> {
        if await_master(&self.handle, &self.to.name, PROMOTION_WAIT).await {
            return Ok(());
        }
        Err(format!(
            "{} did not become master within {} s",
            self.to.name,
            PROMOTION_WAIT.as_secs()
        ))
    }

    /// Whatever happened: the pause released and the priorities restored.
    async fn restore(&self) {
        if self.kind == Kind::Switchover {
            let _ = self
                .send(&self.from.name, Action::UnpauseWrites(UnpauseWrites {}))
                .await;
            let _ = self.send(&self.from.name, priority("100")).await;
        }
        for node in &self.replicas {
            let _ = self.send(&node.name, priority("100")).await;
        }
    }
}

/// A connected sentinel that monitors `monitor`, runs no failover of it, and lists `to` as a
/// replica that `good` accepts; of those, one at the highest config epoch (one handed the
/// master again is at 0 until gossip brings it along).
fn pick_sentinel(
    monitor: &str,
    to: &NodeSpec,
    sentinels: &BTreeMap<String, NodeObs>,
    good: impl Fn(&valkey_proto::v1::SentinelPeer) -> bool,
) -> Option<String> {
    let lists_target = |m: &SentinelMaster| {
        !crate::decide::sentinel::failing_over(m)
            && replica_at(m, &to.host, u32::from(to.port)).is_some_and(&good)
    };
    sentinels
        .iter()
        .filter(|(_, o)| o.connected)
        .filter_map(|(pod, o)| {
            let seen = o.report.as_ref()?.sentinel.as_ref()?;
            let m = seen.masters.iter().find(|m| m.name == monitor)?;
            lists_target(m).then_some((pod, m.config_epoch))
        })
        .rev()
        .max_by_key(|(_, epoch)| *epoch)
        .map(|(pod, _)| pod.clone())
}
