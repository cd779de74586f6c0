//! Planned switchovers carried out, shared by both runtimes: losslessly, by our own pause /
//! catch-up / demote / promote sequence under policy manual ([`Manual`]), or through Sentinel
//! under policy sentinel ([`super::through_sentinel`]). Whether one may start, and to which
//! replica, is decided in [`crate::decide::switchover`].

use std::time::{Duration, Instant};

use tracing::{info, warn};
use valkey_proto::v1::{CatchUp, ConfigSet, PauseWrites, Promote, UnpauseWrites, command::Action};

use super::{Handle, through_sentinel};
use crate::decide::{manual, model::NodeSpec};

/// How long the old master's writes stay paused at most: the whole sequence takes
/// milliseconds; should the controller die in the middle, writes resume after this.
const PAUSE_MS: u32 = 5000;

/// How long each step may take before the switchover is undone.
pub(super) const STEP: Duration = Duration::from_secs(2);

/// The longest a switchover that succeeds can take, under either policy: Sentinel's two waits
/// and the commands between them (under policy manual it is milliseconds). A terminating
/// master's pod holds Valkey up for this long (its preStop), and its agent waits as long.
pub const SWITCHOVER_BUDGET: Duration = Duration::from_secs(
    through_sentinel::PRIORITY_WAIT.as_secs()
        + through_sentinel::PROMOTION_WAIT.as_secs()
        + 2 * STEP.as_secs(),
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

pub(super) fn catch_up(from: &NodeSpec, offset: i64) -> Action {
    Action::CatchUp(CatchUp {
        host: from.host.clone(),
        port: u32::from(from.port),
        offset,
    })
}

pub(super) fn priority(value: &str) -> Action {
    Action::ConfigSet(ConfigSet {
        params: [("replica-priority".to_owned(), value.to_owned())].into(),
        ..ConfigSet::default()
    })
}

/// Waits until `pod`'s agent reports it serving as master, at most `wait`; whether it does.
pub(super) async fn await_master(handle: &Handle, pod: &str, wait: Duration) -> bool {
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
pub(super) fn finish(handle: &Handle) {
    handle.dispatcher().set_switchover(false);
    handle.touch();
}
