//! Planned switchovers carried out, shared by both runtimes: losslessly, by our own pause /
//! catch-up / demote / promote sequence under policy manual ([`Manual`]), or through Sentinel
//! (priority steering, pause, catch-up, SENTINEL FAILOVER) under policy sentinel
//! ([`ThroughSentinel`]). Whether one may start, and to which replica, is decided in
//! [`crate::decide::switchover`].

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};
use valkey_proto::v1::{
    CatchUp, ConfigSet, PauseWrites, Promote, SentinelFailover, UnpauseWrites, command::Action,
};

use super::Handle;
use crate::decide::{
    manual,
    model::{Desired, NodeObs, NodeSpec},
    sentinel::SentinelDesired,
    switchover::{Chosen, Refused},
};

/// How long the old master's writes stay paused at most: the whole sequence takes
/// milliseconds; should the controller die in the middle, writes resume after this.
const PAUSE_MS: u32 = 5000;

/// How long each step may take before the switchover is undone.
const STEP: Duration = Duration::from_secs(2);

/// Under policy sentinel: how long Sentinel may take to see the steered replica priorities.
/// It reads its replicas' INFO every 10 s; their agents report what it saw within a second.
const SENTINEL_PRIORITY_WAIT: Duration = Duration::from_secs(14);

/// Under policy sentinel: how long the target may take to serve as master after SENTINEL
/// FAILOVER (it is promoted within about a second).
const SENTINEL_PROMOTION_WAIT: Duration = Duration::from_secs(8);

/// Under policy sentinel: how long a step's command may take.
const SENTINEL_STEP: Duration = Duration::from_millis(8000);

/// Under policy sentinel: how long the old master's writes stay paused at most.
const SENTINEL_PAUSE_MS: u32 = 10_000;

/// The longest a switchover that succeeds can take, under either policy: Sentinel's two waits
/// and the commands between them (under policy manual it is milliseconds). A terminating
/// master's pod holds Valkey up for this long (its preStop), and its agent waits as long.
pub const SWITCHOVER_BUDGET: Duration = Duration::from_secs(
    SENTINEL_PRIORITY_WAIT.as_secs() + SENTINEL_PROMOTION_WAIT.as_secs() + 2 * STEP.as_secs(),
);

/// A planned switchover under policy manual, once the driver has persisted the intent
/// (`PendingSwitchover` at `epoch`). Every step is a command under that epoch:
/// 1. pause writes on the master and take its offset;
/// 2. wait until the target has processed that offset (measured on the target);
/// 3. demote the master to a replica of the target (its clients are disconnected);
/// 4. promote the target; the other replicas follow it;
/// 5. release the pause (the old master is a replica by then, or the master again).
///
/// A step that fails undoes the ones before it: the target goes back to following the old
/// master, which is master again, and the pause is released. Valkey's own FAILOVER does the
/// same steps but waits for the target's acknowledgement, which while writes are paused
/// arrives only with the replica's once-a-second REPLCONF ACK: 160 to 800 ms instead of a
/// few round trips. The decisions commit or drop the intent when they see the outcome.
#[derive(Debug)]
pub struct Manual {
    pub handle: Handle,
    pub epoch: u64,
    pub from: NodeSpec,
    pub to: NodeSpec,
    /// The other replicas: they follow the target once it is promoted.
    pub others: Vec<String>,
}

impl Manual {
    /// Starts the switchover in a task; the message to report.
    pub fn start(self) -> String {
        self.handle.dispatcher().set_switchover(true);
        let message = format!(
            "switchover {} -> {} started (epoch {})",
            self.from.name, self.to.name, self.epoch
        );
        info!(from = %self.from.name, to = %self.to.name, epoch = self.epoch, "switchover started");
        tokio::spawn(self.run());
        message
    }

    async fn run(self) {
        let (from, to) = (&self.from.name, &self.to.name);
        let started = Instant::now();
        let outcome = self.hand_over().await;
        self.release().await;
        match &outcome {
            Ok(()) => {
                self.others_follow();
                info!(from = %from, to = %to, took = ?started.elapsed(), "switchover done");
                // Let the decisions look once the target's agent reports its new role (or
                // after 2 s, when they drop the intent if the target did not take over).
                await_master(&self.handle, to, Duration::from_secs(2)).await;
            }
            Err(err) => warn!(from = %from, to = %to, error = %err, "switchover undone"),
        }
        finish(&self.handle);
    }

    async fn send(&self, pod: &str, action: Action) -> Result<i64, String> {
        self.handle
            .command(pod, self.epoch, action, STEP)
            .await
            .map(|result| result.offset)
    }

    /// Steps 1 to 4; on failure, undone as far as they went.
    async fn hand_over(&self) -> Result<(), String> {
        let offset = self.pause().await?;
        self.catch_up(offset).await?;
        let promoted = match self.demote().await {
            Ok(()) => self.promote().await,
            Err(err) => Err(err),
        };
        if let Err(err) = promoted {
            self.undo().await;
            return Err(err);
        }
        Ok(())
    }

    /// 1: the master's writes paused; its offset.
    async fn pause(&self) -> Result<i64, String> {
        let pause = PauseWrites { pause_ms: PAUSE_MS };
        self.send(&self.from.name, Action::PauseWrites(pause)).await
    }

    /// 2: the target has processed `offset`.
    async fn catch_up(&self, offset: i64) -> Result<(), String> {
        let to = &self.to.name;
        self.send(to, catch_up(&self.from, offset)).await.map(drop)
    }

    /// 3: the master follows the target.
    async fn demote(&self) -> Result<(), String> {
        let follow = manual::replica_of(&self.to);
        self.send(&self.from.name, follow).await.map(drop)
    }

    /// 4: the target serves as master.
    async fn promote(&self) -> Result<(), String> {
        let promote = Action::Promote(Promote {});
        self.send(&self.to.name, promote).await.map(drop)
    }

    /// The target follows the old master again (it may have been promoted without our
    /// hearing of it), and the old master serves again.
    async fn undo(&self) {
        let (from, to) = (&self.from.name, &self.to.name);
        if let Err(undo) = self.send(to, manual::replica_of(&self.from)).await {
            warn!(pod = %to, error = %undo, "could not point the target back at the old master");
        }
        if let Err(undo) = self.send(from, Action::Promote(Promote {})).await {
            warn!(pod = %from, error = %undo, "could not make the old master serve again");
        }
    }

    /// 5: the pause released, whatever happened.
    async fn release(&self) {
        let _ = self
            .send(&self.from.name, Action::UnpauseWrites(UnpauseWrites {}))
            .await
            .inspect_err(|err| warn!(error = %err, "could not release the pause"));
    }

    fn others_follow(&self) {
        let follow = manual::replica_of(&self.to);
        let commands = self.others.iter().map(|pod| (pod.clone(), follow.clone()));
        self.handle.dispatch(self.epoch, commands.collect());
    }
}

/// A lossless planned switchover under policy sentinel: steer Sentinel's choice to the target
/// (replica-priority), pause writes on the master, wait for the target to have its offset,
/// `SENTINEL FAILOVER`, wait for the target to serve as master and demote the old one, then
/// release the pause and restore the priorities. Writes stall for the duration; none that was
/// acknowledged is lost.
#[derive(Debug)]
pub struct ThroughSentinel {
    handle: Handle,
    epoch: u64,
    /// The master's name in Sentinel.
    monitor: String,
    /// A sentinel that knows the target as a good replica.
    sentinel: String,
    from: NodeSpec,
    to: NodeSpec,
    /// Every node but the master.
    replicas: Vec<NodeSpec>,
}

impl ThroughSentinel {
    /// The switchover from `from` to `to`, unless no sentinel knows `to` as an in-sync replica
    /// (it learns replicas from the master's INFO, every 10 s): SENTINEL FAILOVER would find
    /// no replica to promote.
    pub fn new(
        handle: Handle,
        desired: &Desired,
        watch: &SentinelDesired,
        epoch: u64,
        Chosen { from, to }: Chosen,
        sentinels: &BTreeMap<String, NodeObs>,
    ) -> Result<Self, Refused> {
        let monitor = watch.name.clone();
        let from = desired
            .node(&from)
            .cloned()
            .ok_or(Refused::NotANode(from))?;
        let knows_target = |o: &NodeObs| {
            o.report
                .as_ref()
                .and_then(|r| r.sentinel.as_ref())
                .and_then(|s| s.masters.iter().find(|m| m.name == monitor))
                .and_then(|m| crate::decide::sentinel::replica_at(m, &to.host, u32::from(to.port)))
                .is_some_and(|r| r.master_link_up && r.flags.iter().all(|f| f == "slave"))
        };
        let sentinel = sentinels
            .iter()
            .find(|(_, o)| o.connected && knows_target(o))
            .map(|(pod, _)| pod.clone())
            .ok_or_else(|| {
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
            epoch,
            monitor,
            sentinel,
            from,
            to,
            replicas,
        })
    }

    /// Starts the switchover in a task; the message to report.
    pub fn start(self) -> String {
        self.handle.dispatcher().set_switchover(true);
        let (from, to) = (&self.from.name, &self.to.name);
        let message = format!("switchover {from} -> {to} started through Sentinel");
        info!(from = %from, to = %to, "switchover started through Sentinel");
        tokio::spawn(self.run());
        message
    }

    async fn run(self) {
        let outcome = self.steps().await;
        self.restore().await;
        let (from, to) = (&self.from.name, &self.to.name);
        match outcome {
            Ok(()) => info!(from = %from, to = %to, "switchover through Sentinel done"),
            Err(err) => {
                warn!(from = %from, to = %to, error = %err, "switchover through Sentinel failed")
            }
        }
        finish(&self.handle);
    }

    async fn steps(&self) -> Result<(), String> {
        self.steer().await?;
        self.await_steered().await?;
        let offset = self.pause().await?;
        self.send(&self.to.name, catch_up(&self.from, offset))
            .await?;
        let failover = SentinelFailover {
            name: self.monitor.clone(),
        };
        self.send(&self.sentinel, Action::SentinelFailover(failover))
            .await?;
        self.await_promoted().await?;
        // Demote the old master before its pause ends, rather than waiting for Sentinel to
        // convert it (which can take seconds, taking writes meanwhile).
        self.send(&self.from.name, manual::replica_of(&self.to))
            .await
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

    /// Sentinel picks by the priorities it last read from INFO (every 10 s): wait until it
    /// has seen the new ones, so that it promotes the target and no other.
    async fn await_steered(&self) -> Result<(), String> {
        let deadline = Instant::now() + SENTINEL_PRIORITY_WAIT;
        while !self.steered() {
            if Instant::now() > deadline {
                return Err(format!(
                    "Sentinel did not see the new replica priorities within {} s",
                    SENTINEL_PRIORITY_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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
        seen.is_some_and(|m| {
            self.replicas.iter().all(|node| {
                let want = u32::from(node.name == self.to.name);
                m.replicas.iter().any(|r| {
                    r.host == node.host && r.port == u32::from(node.port) && r.priority == want
                })
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
        if await_master(&self.handle, &self.to.name, SENTINEL_PROMOTION_WAIT).await {
            return Ok(());
        }
        Err(format!(
            "{} did not become master within {} s",
            self.to.name,
            SENTINEL_PROMOTION_WAIT.as_secs()
        ))
    }

    /// Whatever happened: the pause released and the priorities restored.
    async fn restore(&self) {
        let _ = self
            .send(&self.from.name, Action::UnpauseWrites(UnpauseWrites {}))
            .await;
        for node in self.replicas.iter().chain(std::iter::once(&self.from)) {
            let _ = self.send(&node.name, priority("100")).await;
        }
    }
}

fn catch_up(from: &NodeSpec, offset: i64) -> Action {
    Action::CatchUp(CatchUp {
        host: from.host.clone(),
        port: u32::from(from.port),
        offset,
    })
}

fn priority(value: &str) -> Action {
    Action::ConfigSet(ConfigSet {
        params: [("replica-priority".to_owned(), value.to_owned())].into(),
        ..ConfigSet::default()
    })
}

/// Waits until `pod`'s agent reports it serving as master, at most `wait`; whether it does.
async fn await_master(handle: &Handle, pod: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if handle.reports_master(pod) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The switchover is over: the pass that saw the target's report found it still in flight
/// and did nothing, so the next one is woken now to commit the new master, not at the next
/// tick or report.
fn finish(handle: &Handle) {
    handle.dispatcher().set_switchover(false);
    handle.touch();
}
