//! Carries out the controller's commands on the local process: one at a time, each behind the
//! epoch fence, within a deadline, idempotent (a repeated id returns the first result), and
//! answered with a typed result.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Mutex;
use tracing::{info, warn};
use valkey_proto::v1::{Command, CommandResult, Outcome, command::Action};

use crate::{
    actions::{Acted, Actions, Refusal, failed, invalid},
    config::{Config, Mode},
    fence::{Admit, Fence},
    metrics::{CommandLabel, Metrics},
    snapshot::Shared,
    valkey::{Valkey, ValkeyError},
};

/// How many answered command ids are remembered for idempotent re-delivery.
const REMEMBERED_RESULTS: usize = 512;

#[derive(Debug, Default)]
struct Remembered {
    results: HashMap<String, CommandResult>,
    order: VecDeque<String>,
}

impl Remembered {
    fn insert(&mut self, result: CommandResult) {
        if self
            .results
            .insert(result.id.clone(), result.clone())
            .is_none()
        {
            self.order.push_back(result.id);
        }
        while self.order.len() > REMEMBERED_RESULTS {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
    }
}

struct Inner {
    local: Valkey,
    remembered: Remembered,
}

/// Runs commands against the local process over a connection of its own.
pub struct Executor {
    config: Arc<Config>,
    fence: Arc<Fence>,
    shared: Arc<Shared>,
    metrics: Metrics,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("mode", &self.config.mode)
            .finish_non_exhaustive()
    }
}

/// The command's name, for logs and metrics.
pub fn action_name(action: Option<&Action>) -> &'static str {
    match action {
        None => "unknown",
        Some(Action::ReplicaOf(_)) => "replica_of",
        Some(Action::Promote(_)) => "promote",
        Some(Action::PauseWrites(_)) => "pause_writes",
        Some(Action::UnpauseWrites(_)) => "unpause_writes",
        Some(Action::CatchUp(_)) => "catch_up",
        Some(Action::ConfigSet(_)) => "config_set",
        Some(Action::AclSetUser(_)) => "acl_set_user",
        Some(Action::SentinelMonitor(_)) => "sentinel_monitor",
        Some(Action::SentinelSet(_)) => "sentinel_set",
        Some(Action::SentinelReset(_)) => "sentinel_reset",
        Some(Action::SentinelFailover(_)) => "sentinel_failover",
        Some(Action::SentinelConfigSet(_)) => "sentinel_config_set",
    }
}

/// Which process kind a command is for; None: either.
fn action_mode(action: &Action) -> Option<Mode> {
    match action {
        Action::ReplicaOf(_)
        | Action::Promote(_)
        | Action::PauseWrites(_)
        | Action::UnpauseWrites(_)
        | Action::CatchUp(_)
        | Action::ConfigSet(_) => Some(Mode::Data),
        Action::SentinelMonitor(_)
        | Action::SentinelSet(_)
        | Action::SentinelReset(_)
        | Action::SentinelFailover(_)
        | Action::SentinelConfigSet(_) => Some(Mode::Sentinel),
        // Sentinel has ACLs too: its own password rotates the same way.
        Action::AclSetUser(_) => None,
    }
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Unspecified => "unspecified",
        Outcome::Ok => "ok",
        Outcome::Already => "already",
        Outcome::StaleEpoch => "stale_epoch",
        Outcome::Invalid => "invalid",
        Outcome::Failed => "failed",
        Outcome::Timeout => "timeout",
    }
}

impl Executor {
    pub fn new(
        config: Arc<Config>,
        fence: Arc<Fence>,
        shared: Arc<Shared>,
        metrics: Metrics,
    ) -> Result<Self, ValkeyError> {
        let local = Valkey::new(&config, config.command_deadline)?;
        Ok(Self {
            config,
            fence,
            shared,
            metrics,
            inner: Mutex::new(Inner {
                local,
                remembered: Remembered::default(),
            }),
        })
    }

    /// Carries out one command and answers it. Never fails: every problem is an outcome.
    pub async fn execute(&self, command: Command) -> CommandResult {
        let started = Instant::now();
        let mut inner = self.inner.lock().await;
        if let Some(result) = inner.remembered.results.get(&command.id) {
            info!(id = %command.id, "command already answered; repeating its result");
            return result.clone();
        }
        let name = action_name(command.action.as_ref());
        let acted = self.admit_and_act(&mut inner.local, &command).await;
        let mut result = CommandResult {
            id: command.id.clone(),
            epoch: self.fence.epoch(),
            took_us: started.elapsed().as_micros() as u64,
            ..CommandResult::default()
        };
        match acted {
            Ok(done) => {
                result.set_outcome(if done.already {
                    Outcome::Already
                } else {
                    Outcome::Ok
                });
                result.message = done.message;
                result.offset = done.offset;
            }
            Err(refusal) => {
                result.set_outcome(refusal.outcome);
                result.message = refusal.message;
            }
        }
        let outcome = result.outcome();
        self.metrics
            .commands
            .get_or_create(&CommandLabel {
                command: name,
                outcome: outcome_label(outcome),
            })
            .inc();
        if matches!(outcome, Outcome::Ok | Outcome::Already) {
            info!(id = %result.id, command = name, epoch = command.epoch, outcome = outcome_label(outcome), took_us = result.took_us, message = %result.message, "command done");
        } else {
            warn!(id = %result.id, command = name, epoch = command.epoch, outcome = outcome_label(outcome), message = %result.message, "command not done");
        }
        if !result.id.is_empty() && outcome != Outcome::Timeout {
            inner.remembered.insert(result.clone());
        }
        self.shared.probe_now.notify_one();
        result
    }

    fn actions(&self) -> Actions<'_> {
        Actions {
            config: &self.config,
            shared: &self.shared,
        }
    }

    async fn admit_and_act(&self, local: &mut Valkey, command: &Command) -> Acted {
        if command.id.is_empty() {
            return Err(invalid("command.id is empty"));
        }
        let Some(action) = &command.action else {
            return Err(invalid(
                "command has no action this agent knows (a newer controller?)",
            ));
        };
        if let Some(mode) = action_mode(action)
            && mode != self.config.mode
        {
            return Err(invalid(format!(
                "{} is not valid on a {:?} node",
                action_name(Some(action)),
                self.config.mode
            )));
        }
        // Every command is fenced, the waits too: a target that has seen a newer epoch refuses
        // to take part in an older switchover.
        match self.fence.advance(command.epoch) {
            Ok(Admit::Yes) => {}
            Ok(Admit::Stale { current }) => {
                return Err(Refusal {
                    outcome: Outcome::StaleEpoch,
                    message: format!(
                        "command epoch {} is older than this agent's epoch {current}",
                        command.epoch
                    ),
                });
            }
            Err(err) => return Err(failed(format!("cannot persist the epoch: {err}"))),
        }
        let deadline = match command.deadline_ms {
            0 => self.config.command_deadline,
            ms => Duration::from_millis(u64::from(ms)),
        };
        match tokio::time::timeout(deadline, self.actions().act(local, action, deadline)).await {
            Ok(acted) => acted,
            Err(_) => {
                // The connection may still deliver a late reply: start afresh.
                local.reset();
                Err(Refusal {
                    outcome: Outcome::Timeout,
                    message: format!("not done within the deadline of {deadline:?}"),
                })
            }
        }
    }
}
