//! Planned switchovers, shared by the local runtime and the Kubernetes controller: choosing
//! and checking the target, then carrying it out losslessly, by our own pause / catch-up /
//! demote / promote sequence under policy manual, or through Sentinel (priority steering,
//! pause, catch-up, SENTINEL FAILOVER) under policy sentinel.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tracing::{info, warn};
use valkey_proto::v1::{
    CatchUp, ConfigSet, NodeKind, PauseWrites, Promote, SentinelFailover, UnpauseWrites,
    command::Action,
};

use crate::{
    decide::{
        manual,
        model::{Desired, Durable, NodeSpec, Observed},
    },
    engine::Engine,
    hub::{Hub, InstanceKey},
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
pub fn choose(
    desired: &Desired,
    durable: &Durable,
    observed: &Observed,
    to: Option<String>,
) -> Result<(String, NodeSpec), Refused> {
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
    Ok((from, target))
}

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

/// The longest a switchover that succeeds can take, under either policy: Sentinel's two waits
/// and the commands between them (under policy manual it is milliseconds). A terminating
/// master's pod holds Valkey up for this long (its preStop), and its agent waits as long.
pub const SWITCHOVER_BUDGET: Duration = Duration::from_secs(
    SENTINEL_PRIORITY_WAIT.as_secs() + SENTINEL_PROMOTION_WAIT.as_secs() + 2 * STEP.as_secs(),
);

/// Starts a planned switchover under policy manual, once the caller has persisted the intent
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
/// few round trips. The core commits or drops the intent when it sees the outcome.
pub fn start_manual(
    engine: &Arc<Engine>,
    hub: &Hub,
    key: &InstanceKey,
    desired: &Desired,
    from: NodeSpec,
    target: NodeSpec,
    epoch: u64,
) -> String {
    engine.switchover.store(true, Ordering::SeqCst);
    let others: Vec<String> = desired
        .nodes
        .iter()
        .filter(|n| n.name != from.name && n.name != target.name)
        .map(|n| n.name.clone())
        .collect();
    let (hub, key, engine) = (hub.clone(), key.clone(), engine.clone());
    let message = format!(
        "switchover {} -> {} started (epoch {epoch})",
        from.name, target.name
    );
    info!(from = %from.name, to = %target.name, epoch, "switchover started");
    tokio::spawn(async move {
        let started = Instant::now();
        let steps = Steps {
            engine: &engine,
            hub: &hub,
            key: &key,
            epoch,
        };
        let outcome = steps.hand_over(&from, &target).await;
        let _ = steps
            .send(&from.name, Action::UnpauseWrites(UnpauseWrites {}))
            .await
            .inspect_err(|err| warn!(error = %err, "could not release the pause"));
        match &outcome {
            Ok(()) => {
                let follow = manual::replica_of(&target);
                engine.dispatch(
                    &hub,
                    &key,
                    epoch,
                    others
                        .into_iter()
                        .map(|pod| (pod, follow.clone()))
                        .collect(),
                );
                info!(from = %from.name, to = %target.name, took = ?started.elapsed(), "switchover done");
            }
            Err(err) => {
                warn!(from = %from.name, to = %target.name, error = %err, "switchover undone")
            }
        }
        // Let the core look once the target's agent reports its new role (or after 2 s, when
        // the core drops the intent if the target did not take over).
        let deadline = Instant::now() + Duration::from_secs(2);
        while outcome.is_ok()
            && Instant::now() < deadline
            && !reports_master(&hub, &key, &target.name)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        engine.switchover.store(false, Ordering::SeqCst);
        // The pass that saw the target's report found the switchover still in flight and did
        // nothing: the next one commits the new master now, not at the next tick or report.
        hub.touch(&key);
    });
    message
}

/// The commands of one switchover, all under its epoch.
struct Steps<'a> {
    engine: &'a Engine,
    hub: &'a Hub,
    key: &'a InstanceKey,
    epoch: u64,
}

impl Steps<'_> {
    async fn send(&self, pod: &str, action: Action) -> Result<i64, String> {
        self.engine
            .run_command(self.hub, self.key, self.epoch, pod, action, STEP)
            .await
            .map(|result| result.offset)
    }

    /// Steps 1 to 4; on failure, undone as far as they went.
    async fn hand_over(&self, from: &NodeSpec, to: &NodeSpec) -> Result<(), String> {
        let offset = self
            .send(
                &from.name,
                Action::PauseWrites(PauseWrites { pause_ms: PAUSE_MS }),
            )
            .await?;
        self.send(
            &to.name,
            Action::CatchUp(CatchUp {
                host: from.host.clone(),
                port: u32::from(from.port),
                offset,
            }),
        )
        .await?;
        let promoted = match self.send(&from.name, manual::replica_of(to)).await {
            Ok(_) => self.send(&to.name, Action::Promote(Promote {})).await,
            Err(err) => Err(err),
        };
        let Err(err) = promoted else {
            return Ok(());
        };
        // Undo: the target follows the old master again (it may have been promoted without
        // our hearing of it), and the old master serves again.
        if let Err(undo) = self.send(&to.name, manual::replica_of(from)).await {
            warn!(pod = %to.name, error = %undo, "could not point the target back at the old master");
        }
        if let Err(undo) = self.send(&from.name, Action::Promote(Promote {})).await {
            warn!(pod = %from.name, error = %undo, "could not make the old master serve again");
        }
        Err(err)
    }
}

/// A lossless planned switchover under policy sentinel: pause writes on the master, wait for
/// the target to have its offset, steer Sentinel's choice to the target (replica-priority),
/// `SENTINEL FAILOVER`, wait for the target to serve as master, then release the pause and
/// restore the priorities. Writes stall for the duration; none that was acknowledged is lost.
#[allow(clippy::too_many_arguments)]
pub fn start_sentinel(
    engine: &Arc<Engine>,
    hub: &Hub,
    key: &InstanceKey,
    desired: &Desired,
    epoch: u64,
    monitor: String,
    from: String,
    target: NodeSpec,
) -> Result<String, Refused> {
    // A sentinel that knows the target as a good replica (it learns replicas from the master's
    // INFO, every 10 s): otherwise SENTINEL FAILOVER would find no replica to promote.
    let target_addr = (target.host.as_str(), u32::from(target.port));
    let sentinel_pod = hub
        .observe_kind(key, NodeKind::Sentinel)
        .into_iter()
        .filter(|(_, o)| o.connected)
        .find(|(_, o)| {
            o.report
                .as_ref()
                .and_then(|r| r.sentinel.as_ref())
                .and_then(|s| s.masters.iter().find(|m| m.name == monitor))
                .and_then(|m| crate::decide::sentinel::replica_at(m, target_addr.0, target_addr.1))
                .is_some_and(|r| r.master_link_up && r.flags.iter().all(|f| f == "slave"))
        })
        .map(|(pod, _)| pod)
        .ok_or_else(|| {
            Refused::Sentinel(format!(
                "{} is not an in-sync replica for Sentinel yet",
                target.name
            ))
        })?;
    let replicas: Vec<String> = desired
        .nodes
        .iter()
        .filter(|n| n.name != from)
        .map(|n| n.name.clone())
        .collect();
    let nodes = desired.nodes.clone();
    engine.switchover.store(true, Ordering::SeqCst);
    let (hub, key, engine) = (hub.clone(), key.clone(), engine.clone());
    let to = target.name.clone();
    let message = format!("switchover {from} -> {to} started through Sentinel");
    info!(from = %from, to = %to, "switchover started through Sentinel");
    tokio::spawn(async move {
        let send = |pod: String, action: Action| {
            let (hub, key, engine) = (hub.clone(), key.clone(), engine.clone());
            async move {
                engine
                    .run_command(&hub, &key, epoch, &pod, action, Duration::from_millis(8000))
                    .await
                    .map(|_| ())
            }
        };
        let priority = |value: &str| {
            Action::ConfigSet(ConfigSet {
                params: [("replica-priority".to_owned(), value.to_owned())].into(),
                ..ConfigSet::default()
            })
        };
        let steps = async {
            for pod in &replicas {
                let value = if *pod == to { "1" } else { "0" };
                send(pod.clone(), priority(value)).await?;
            }
            // Sentinel picks by the priorities it last read from INFO (every 10 s): wait until
            // it has seen the new ones, so that it promotes the target and no other.
            let deadline = Instant::now() + SENTINEL_PRIORITY_WAIT;
            let addr_of = |pod: &str| {
                nodes
                    .iter()
                    .find(|n| n.name == pod)
                    .map(|n| (n.host.clone(), u32::from(n.port)))
            };
            loop {
                let seen = hub
                    .observe_kind(&key, NodeKind::Sentinel)
                    .get(&sentinel_pod)
                    .and_then(|o| o.report.as_ref()?.sentinel.clone())
                    .and_then(|s| s.masters.into_iter().find(|m| m.name == monitor));
                let steered = seen.is_some_and(|m| {
                    replicas.iter().all(|pod| {
                        let want = if *pod == to { 1 } else { 0 };
                        addr_of(pod).is_some_and(|(host, port)| {
                            m.replicas
                                .iter()
                                .any(|r| r.host == host && r.port == port && r.priority == want)
                        })
                    })
                });
                if steered {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "Sentinel did not see the new replica priorities within {} s",
                        SENTINEL_PRIORITY_WAIT.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let offset = engine
                .run_command(
                    &hub,
                    &key,
                    epoch,
                    &from,
                    Action::PauseWrites(PauseWrites { pause_ms: 10_000 }),
                    STEP,
                )
                .await?
                .offset;
            let (from_host, from_port) =
                addr_of(&from).ok_or_else(|| format!("{from} is not a node"))?;
            send(
                to.clone(),
                Action::CatchUp(CatchUp {
                    host: from_host,
                    port: from_port,
                    offset,
                }),
            )
            .await?;
            send(
                sentinel_pod.clone(),
                Action::SentinelFailover(SentinelFailover {
                    name: monitor.clone(),
                }),
            )
            .await?;
            let deadline = Instant::now() + SENTINEL_PROMOTION_WAIT;
            loop {
                if reports_master(&hub, &key, &to) {
                    // Demote the old master before its pause ends, rather than waiting for
                    // Sentinel to convert it (which can take seconds, taking writes meanwhile).
                    send(from.clone(), manual::replica_of(&target)).await?;
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{to} did not become master within {} s",
                        SENTINEL_PROMOTION_WAIT.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let outcome: Result<(), String> = steps.await;
        // Whatever happened: release the pause and restore the priorities.
        let _ = send(from.clone(), Action::UnpauseWrites(UnpauseWrites {})).await;
        for pod in replicas.iter().chain(std::iter::once(&from)) {
            let _ = send(pod.clone(), priority("100")).await;
        }
        match outcome {
            Ok(()) => info!(from = %from, to = %to, "switchover through Sentinel done"),
            Err(err) => {
                warn!(from = %from, to = %to, error = %err, "switchover through Sentinel failed")
            }
        }
        engine.switchover.store(false, Ordering::SeqCst);
        // The pass that saw the target's report found the switchover still in flight and did
        // nothing: the next one commits the new master now, not at the next tick or report.
        hub.touch(&key);
    });
    Ok(message)
}

fn reports_master(hub: &Hub, key: &InstanceKey, pod: &str) -> bool {
    hub.observe(key).nodes.get(pod).is_some_and(|o| {
        o.report
            .as_ref()
            .and_then(|r| r.data.as_ref())
            .is_some_and(|d| d.role() == valkey_proto::v1::Role::Master)
    })
}
