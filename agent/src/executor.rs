//! Carries out the controller's commands on the local process: one at a time, each behind the
//! epoch fence, within a deadline, idempotent (a repeated id returns the first result), and
//! answered with a typed result.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::Mutex;
use tracing::{info, warn};
use valkey_proto::v1::{Command, CommandResult, ConfigSet, Outcome, ReplicaOf, command::Action};

use crate::{
    actions::{
        Acted, Done, Refusal, acl_set_user, catch_up, check_host_port, check_word, config_set,
        failed, invalid, is_master, offset_of, replication, reply_is_invalid, sentinel_monitor,
        sorted,
    },
    clients,
    config::{Config, Mode},
    fence::{Admit, Fence},
    metrics::{CommandLabel, Metrics},
    passwords,
    snapshot::{Shared, now_ms},
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
        match tokio::time::timeout(deadline, self.act(local, action, deadline)).await {
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

    async fn act(&self, local: &mut Valkey, action: &Action, deadline: Duration) -> Acted {
        match action {
            Action::ReplicaOf(ReplicaOf { host, port }) => {
                check_host_port("replica_of", host, *port)?;
                if host == &self.config.announce_host
                    && *port == u32::from(self.config.announce_port)
                {
                    return Err(invalid("replica_of names this node itself"));
                }
                let was_master = is_master(local).await?;
                let reply: String = local
                    .query(redis::cmd("REPLICAOF").arg(host).arg(*port))
                    .await?;
                if reply.contains("Already connected") {
                    return Ok(Done::already(format!("already a replica of {host}:{port}")));
                }
                let moved = if was_master {
                    self.move_clients(local).await
                } else {
                    String::new()
                };
                Ok(Done::ok(format!("now a replica of {host}:{port}{moved}")))
            }
            Action::Promote(_) => {
                if is_master(local).await? {
                    return Ok(Done::already("already a master"));
                }
                let _: String = local
                    .query(redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
                    .await?;
                // Master again (an undone switchover): its writers are no longer stale.
                self.shared.demotions.promoted();
                Ok(Done::ok("promoted to master"))
            }
            Action::PauseWrites(pause) => {
                if pause.pause_ms == 0 {
                    return Err(invalid("pause_writes.pause_ms must be above 0"));
                }
                let _: String = local
                    .query(
                        redis::cmd("CLIENT")
                            .arg("PAUSE")
                            .arg(pause.pause_ms)
                            .arg("WRITE"),
                    )
                    .await?;
                self.shared
                    .paused_until_ms
                    .store(now_ms() + i64::from(pause.pause_ms), Ordering::Relaxed);
                // Every write this master took is in its stream up to here.
                let offset = offset_of(&replication(local).await?);
                Ok(Done {
                    message: format!("writes paused for {} ms at offset {offset}", pause.pause_ms),
                    offset,
                    ..Done::default()
                })
            }
            Action::UnpauseWrites(_) => {
                let _: String = local.query(redis::cmd("CLIENT").arg("UNPAUSE")).await?;
                self.shared.paused_until_ms.store(0, Ordering::Relaxed);
                Ok(Done::ok("writes unpaused"))
            }
            Action::CatchUp(catch_up) => {
                check_host_port("catch_up", &catch_up.host, catch_up.port)?;
                self::catch_up(local, catch_up, deadline).await
            }
            Action::ConfigSet(config) => {
                let params = passwords::merged(
                    &self.config,
                    "config_set",
                    &config.params,
                    &config.password_params,
                )?;
                let resolved = ConfigSet {
                    params,
                    rewrite: config.rewrite,
                    password_params: HashMap::new(),
                };
                config_set(local, &resolved).await
            }
            Action::AclSetUser(acl) => acl_set_user(local, acl).await,
            Action::SentinelMonitor(monitor) => {
                let auth_pass = match &monitor.auth_pass_ref {
                    Some(reference) => Some(passwords::resolve(&self.config, reference)?),
                    None => None,
                };
                sentinel_monitor(local, monitor, auth_pass.as_deref()).await
            }
            Action::SentinelSet(set) => {
                check_word("sentinel_set.name", &set.name)?;
                let params = passwords::merged(
                    &self.config,
                    "sentinel_set",
                    &set.params,
                    &set.password_params,
                )?;
                if params.is_empty() {
                    return Err(invalid("sentinel_set.params is empty"));
                }
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg("SET").arg(&set.name);
                for (key, value) in sorted(&params) {
                    check_word("sentinel_set.params key", key)?;
                    cmd.arg(key).arg(value);
                }
                let _: String = local.query(&cmd).await.map_err(reply_is_invalid)?;
                Ok(Done::ok(format!(
                    "set {} parameter(s) on {}",
                    params.len(),
                    set.name
                )))
            }
            Action::SentinelConfigSet(set) => {
                let params = passwords::merged(
                    &self.config,
                    "sentinel_config_set",
                    &set.params,
                    &set.password_params,
                )?;
                if params.is_empty() {
                    return Err(invalid("sentinel_config_set.params is empty"));
                }
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg("CONFIG").arg("SET");
                for (key, value) in sorted(&params) {
                    check_word("sentinel_config_set.params key", key)?;
                    cmd.arg(key).arg(value);
                }
                let _: String = local.query(&cmd).await.map_err(reply_is_invalid)?;
                Ok(Done::ok(format!(
                    "set {} sentinel setting(s)",
                    params.len()
                )))
            }
            Action::SentinelReset(reset) => {
                check_word("sentinel_reset.pattern", &reset.pattern)?;
                let n: i64 = local
                    .query(redis::cmd("SENTINEL").arg("RESET").arg(&reset.pattern))
                    .await?;
                Ok(Done::ok(format!("reset {n} master(s)")))
            }
            Action::SentinelFailover(failover) => {
                check_word("sentinel_failover.name", &failover.name)?;
                match local
                    .query::<String>(redis::cmd("SENTINEL").arg("FAILOVER").arg(&failover.name))
                    .await
                {
                    Ok(_) => Ok(Done::ok(format!("failover of {} started", failover.name))),
                    Err(ValkeyError::Reply(msg)) if msg.contains("INPROG") => Ok(Done::already(
                        format!("a failover of {} is in progress", failover.name),
                    )),
                    Err(err) => Err(err.into()),
                }
            }
        }
    }

    /// This node just stopped being master: its clients move (see [`crate::clients`]). A
    /// note for the command's answer.
    async fn move_clients(&self, local: &mut Valkey) -> String {
        self.shared.demotions.demoted();
        match clients::disconnect_all(local).await {
            Ok(n) => format!("; {n} clients disconnected"),
            Err(err) => {
                warn!(error = %err, "could not disconnect the clients of the demoted node");
                format!("; clients not disconnected: {err}")
            }
        }
    }
}
