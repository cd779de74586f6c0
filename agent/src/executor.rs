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
use valkey_proto::v1::{
    AclSetUser, Command, CommandResult, ConfigSet, Failover, Outcome, ReplicaOf, SentinelMonitor,
    command::Action,
};

use crate::{
    config::{Config, Mode},
    fence::{Admit, Fence},
    info::parse_info,
    local::{Local, LocalError},
    metrics::{CommandLabel, Metrics},
    watcher::{Shared, now_ms},
};

/// How many answered command ids are remembered for idempotent re-delivery.
const REMEMBERED_RESULTS: usize = 512;
/// How often long commands (FAILOVER, WaitReplica) look at the server.
const POLL: Duration = Duration::from_millis(10);

/// The outcome of acting, before the bookkeeping fields are filled in.
type Acted = Result<Done, Refusal>;

#[derive(Debug, Default)]
struct Done {
    already: bool,
    message: String,
    offset: i64,
    master: Option<(String, u32)>,
}

impl Done {
    fn ok(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }
    fn already(message: impl Into<String>) -> Self {
        Self {
            already: true,
            message: message.into(),
            ..Self::default()
        }
    }
}

#[derive(Debug)]
struct Refusal {
    outcome: Outcome,
    message: String,
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal {
        outcome: Outcome::Invalid,
        message: message.into(),
    }
}

fn failed(message: impl Into<String>) -> Refusal {
    Refusal {
        outcome: Outcome::Failed,
        message: message.into(),
    }
}

impl From<LocalError> for Refusal {
    fn from(err: LocalError) -> Self {
        match err {
            LocalError::Hung(_) => Refusal {
                outcome: Outcome::Timeout,
                message: err.to_string(),
            },
            other => failed(other.to_string()),
        }
    }
}

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
    local: Local,
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
        Some(Action::Failover(_)) => "failover",
        Some(Action::PauseWrites(_)) => "pause_writes",
        Some(Action::UnpauseWrites(_)) => "unpause_writes",
        Some(Action::WaitReplica(_)) => "wait_replica",
        Some(Action::ConfigSet(_)) => "config_set",
        Some(Action::AclSetUser(_)) => "acl_set_user",
        Some(Action::SentinelMonitor(_)) => "sentinel_monitor",
        Some(Action::SentinelRemove(_)) => "sentinel_remove",
        Some(Action::SentinelSet(_)) => "sentinel_set",
        Some(Action::SentinelReset(_)) => "sentinel_reset",
        Some(Action::SentinelFailover(_)) => "sentinel_failover",
        Some(Action::SentinelGetMasterAddr(_)) => "sentinel_get_master_addr",
        Some(Action::Shutdown(_)) => "shutdown",
        Some(Action::SentinelConfigSet(_)) => "sentinel_config_set",
    }
}

/// Which process kind a command is for; None: either.
fn action_mode(action: &Action) -> Option<Mode> {
    match action {
        Action::ReplicaOf(_)
        | Action::Promote(_)
        | Action::Failover(_)
        | Action::PauseWrites(_)
        | Action::UnpauseWrites(_)
        | Action::WaitReplica(_)
        | Action::ConfigSet(_) => Some(Mode::Data),
        Action::SentinelMonitor(_)
        | Action::SentinelRemove(_)
        | Action::SentinelSet(_)
        | Action::SentinelReset(_)
        | Action::SentinelFailover(_)
        | Action::SentinelGetMasterAddr(_)
        | Action::SentinelConfigSet(_) => Some(Mode::Sentinel),
        // Sentinel has ACLs too: its own password rotates the same way.
        Action::AclSetUser(_) | Action::Shutdown(_) => None,
    }
}

/// Read-only commands pass the fence whatever their epoch.
fn is_read_only(action: &Action) -> bool {
    matches!(
        action,
        Action::WaitReplica(_) | Action::SentinelGetMasterAddr(_)
    )
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

fn check_host_port(field: &str, host: &str, port: u32) -> Result<(), Refusal> {
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(invalid(format!(
            "{field}.host {host:?} is not a host name or address"
        )));
    }
    if port == 0 || port > u32::from(u16::MAX) {
        return Err(invalid(format!(
            "{field}.port {port} is out of range 1..=65535"
        )));
    }
    Ok(())
}

fn check_word(field: &str, value: &str) -> Result<(), Refusal> {
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(invalid(format!(
            "{field} {value:?} must be one non-empty word"
        )));
    }
    Ok(())
}

impl Executor {
    pub fn new(
        config: Arc<Config>,
        fence: Arc<Fence>,
        shared: Arc<Shared>,
        metrics: Metrics,
    ) -> Result<Self, LocalError> {
        let local = Local::new(&config, config.command_deadline)?;
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
                if let Some((host, port)) = done.master {
                    result.master_host = host;
                    result.master_port = port;
                }
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

    async fn admit_and_act(&self, local: &mut Local, command: &Command) -> Acted {
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
        if !is_read_only(action) {
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

    async fn act(&self, local: &mut Local, action: &Action, deadline: Duration) -> Acted {
        match action {
            Action::ReplicaOf(ReplicaOf { host, port }) => {
                check_host_port("replica_of", host, *port)?;
                if host == &self.config.announce_host
                    && *port == u32::from(self.config.announce_port)
                {
                    return Err(invalid("replica_of names this node itself"));
                }
                let reply: String = local
                    .query(redis::cmd("REPLICAOF").arg(host).arg(*port))
                    .await?;
                Ok(if reply.contains("Already connected") {
                    Done::already(format!("already a replica of {host}:{port}"))
                } else {
                    Done::ok(format!("now a replica of {host}:{port}"))
                })
            }
            Action::Promote(_) => {
                let info = replication(local).await?;
                if info.get("role").map(String::as_str) == Some("master") {
                    return Ok(Done::already("already a master"));
                }
                let _: String = local
                    .query(redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
                    .await?;
                Ok(Done::ok("promoted to master"))
            }
            Action::Failover(failover) => self.failover(local, failover).await,
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
                Ok(Done::ok(format!("writes paused for {} ms", pause.pause_ms)))
            }
            Action::UnpauseWrites(_) => {
                let _: String = local.query(redis::cmd("CLIENT").arg("UNPAUSE")).await?;
                self.shared.paused_until_ms.store(0, Ordering::Relaxed);
                Ok(Done::ok("writes unpaused"))
            }
            Action::WaitReplica(wait) => {
                check_host_port("wait_replica", &wait.host, wait.port)?;
                wait_replica(local, &wait.host, wait.port, deadline).await
            }
            Action::ConfigSet(config) => config_set(local, config).await,
            Action::AclSetUser(acl) => acl_set_user(local, acl).await,
            Action::SentinelMonitor(monitor) => sentinel_monitor(local, monitor).await,
            Action::SentinelRemove(remove) => {
                check_word("sentinel_remove.name", &remove.name)?;
                match local
                    .query::<String>(redis::cmd("SENTINEL").arg("REMOVE").arg(&remove.name))
                    .await
                {
                    Ok(_) => Ok(Done::ok(format!("stopped monitoring {}", remove.name))),
                    Err(LocalError::Reply(msg)) if msg.contains("No such master") => {
                        Ok(Done::already(format!("{} is not monitored", remove.name)))
                    }
                    Err(err) => Err(err.into()),
                }
            }
            Action::SentinelSet(set) => {
                check_word("sentinel_set.name", &set.name)?;
                if set.params.is_empty() {
                    return Err(invalid("sentinel_set.params is empty"));
                }
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg("SET").arg(&set.name);
                for (key, value) in sorted(&set.params) {
                    check_word("sentinel_set.params key", key)?;
                    cmd.arg(key).arg(value);
                }
                let _: String = local.query(&cmd).await.map_err(reply_is_invalid)?;
                Ok(Done::ok(format!(
                    "set {} parameter(s) on {}",
                    set.params.len(),
                    set.name
                )))
            }
            Action::SentinelConfigSet(set) => {
                if set.params.is_empty() {
                    return Err(invalid("sentinel_config_set.params is empty"));
                }
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg("CONFIG").arg("SET");
                for (key, value) in sorted(&set.params) {
                    check_word("sentinel_config_set.params key", key)?;
                    cmd.arg(key).arg(value);
                }
                let _: String = local.query(&cmd).await.map_err(reply_is_invalid)?;
                Ok(Done::ok(format!(
                    "set {} sentinel setting(s)",
                    set.params.len()
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
                    Err(LocalError::Reply(msg)) if msg.contains("INPROG") => Ok(Done::already(
                        format!("a failover of {} is in progress", failover.name),
                    )),
                    Err(err) => Err(err.into()),
                }
            }
            Action::SentinelGetMasterAddr(get) => {
                check_word("sentinel_get_master_addr.name", &get.name)?;
                let addr: Option<(String, String)> = local
                    .query(
                        redis::cmd("SENTINEL")
                            .arg("GET-MASTER-ADDR-BY-NAME")
                            .arg(&get.name),
                    )
                    .await?;
                let (host, port) = addr
                    .ok_or_else(|| failed(format!("no master named {} is monitored", get.name)))?;
                let port = port
                    .parse::<u32>()
                    .map_err(|_| failed(format!("bad port {port:?}")))?;
                Ok(Done {
                    message: format!("{host}:{port}"),
                    master: Some((host, port)),
                    ..Done::default()
                })
            }
            Action::Shutdown(shutdown) => {
                if let Err(LocalError::Down(_)) = local.query::<String>(&redis::cmd("PING")).await {
                    return Ok(Done::already("already down"));
                }
                let mode = if shutdown.save { "SAVE" } else { "NOSAVE" };
                match local
                    .query::<String>(redis::cmd("SHUTDOWN").arg(mode))
                    .await
                {
                    Ok(_) | Err(LocalError::Down(_)) => {
                        local.reset();
                        Ok(Done::ok(format!("shut down ({mode})")))
                    }
                    Err(err) => Err(err.into()),
                }
            }
        }
    }

    /// FAILOVER TO host port TIMEOUT ms [FORCE], then wait until this node follows the target.
    async fn failover(&self, local: &mut Local, failover: &Failover) -> Acted {
        let Failover {
            host,
            port,
            timeout_ms,
            force,
        } = failover;
        check_host_port("failover", host, *port)?;
        if *force && *timeout_ms == 0 {
            return Err(invalid("failover.force needs failover.timeout_ms above 0"));
        }
        let info = replication(local).await?;
        let follows_target = |info: &HashMap<String, String>| {
            info.get("role").map(String::as_str) == Some("slave")
                && info.get("master_host") == Some(host)
                && info.get("master_port").and_then(|p| p.parse::<u32>().ok()) == Some(*port)
        };
        if follows_target(&info) {
            return Ok(Done::already(format!("already a replica of {host}:{port}")));
        }
        if info.get("role").map(String::as_str) != Some("master") {
            return Err(invalid(
                "failover must run on the master; this node is a replica",
            ));
        }
        let in_progress = info
            .get("master_failover_state")
            .is_some_and(|s| s != "no-failover");
        if !in_progress {
            let mut cmd = redis::cmd("FAILOVER");
            cmd.arg("TO").arg(host).arg(*port);
            if *timeout_ms > 0 {
                cmd.arg("TIMEOUT").arg(*timeout_ms);
            }
            if *force {
                cmd.arg("FORCE");
            }
            let _: String = local.query(&cmd).await.map_err(reply_is_invalid)?;
        }
        loop {
            let info = replication(local).await?;
            if follows_target(&info) {
                let offset = info
                    .get("master_repl_offset")
                    .and_then(|o| o.parse().ok())
                    .unwrap_or_default();
                return Ok(Done {
                    message: format!("handed over to {host}:{port}"),
                    offset,
                    ..Done::default()
                });
            }
            let state = info.get("master_failover_state").map(String::as_str);
            if info.get("role").map(String::as_str) == Some("master")
                && state == Some("no-failover")
            {
                return Err(failed(
                    "the failover was aborted (the target did not catch up in time, or left)",
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// INFO replication as a map.
async fn replication(local: &mut Local) -> Result<HashMap<String, String>, LocalError> {
    let text: String = local.query(redis::cmd("INFO").arg("replication")).await?;
    Ok(parse_info(&text)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// A server's refusal of a malformed request is the requester's fault, not a failure.
fn reply_is_invalid(err: LocalError) -> Refusal {
    match err {
        LocalError::Reply(message) => invalid(message),
        other => other.into(),
    }
}

fn sorted(map: &HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut pairs: Vec<_> = map.iter().collect();
    pairs.sort();
    pairs
}

/// Waits until the replica at host:port has acknowledged the master offset seen at the start.
async fn wait_replica(local: &mut Local, host: &str, port: u32, deadline: Duration) -> Acted {
    let info = replication(local).await?;
    if info.get("role").map(String::as_str) != Some("master") {
        return Err(invalid(
            "wait_replica must run on the master; this node is a replica",
        ));
    }
    let target: i64 = info
        .get("master_repl_offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or_default();
    let started = Instant::now();
    // Give up a little before the command's own deadline, so the answer says how far it got.
    let deadline = deadline.saturating_sub(Duration::from_millis(100));
    let mut seen = None;
    loop {
        let info = replication(local).await?;
        let connected: u32 = info
            .get("connected_slaves")
            .and_then(|n| n.parse().ok())
            .unwrap_or_default();
        let replica = (0..connected).find_map(|i| {
            let line = info.get(&format!("slave{i}"))?;
            let fields: HashMap<_, _> = line.split(',').filter_map(|f| f.split_once('=')).collect();
            let matches = fields.get("ip") == Some(&host)
                && fields.get("port").and_then(|p| p.parse::<u32>().ok()) == Some(port);
            matches.then(|| {
                fields
                    .get("offset")
                    .and_then(|o| o.parse::<i64>().ok())
                    .unwrap_or(-1)
            })
        });
        seen = replica.or(seen);
        if replica.is_some_and(|offset| offset >= target) {
            return Ok(Done {
                message: format!("{host}:{port} has offset {target}"),
                offset: target,
                ..Done::default()
            });
        }
        if started.elapsed() + POLL >= deadline {
            return Err(Refusal {
                outcome: Outcome::Timeout,
                message: match seen {
                    None => format!("{host}:{port} is not a connected replica"),
                    Some(offset) => format!("{host}:{port} reached offset {offset} of {target}"),
                },
            });
        }
        // WAIT makes the master ask its replicas for an ack now rather than within a second.
        if connected > 0 {
            let _ = local
                .query_within::<i64>(
                    redis::cmd("WAIT").arg(connected).arg(50),
                    Some(Duration::from_millis(500)),
                )
                .await;
        } else {
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn config_set(local: &mut Local, config: &ConfigSet) -> Acted {
    if config.params.is_empty() {
        return Err(invalid("config_set.params is empty"));
    }
    let params = sorted(&config.params);
    let mut get = redis::cmd("CONFIG");
    get.arg("GET");
    for (key, _) in &params {
        check_word("config_set.params key", key)?;
        get.arg(key.as_str());
    }
    let current: HashMap<String, String> = local.query(&get).await?;
    let unchanged = params
        .iter()
        .all(|(key, value)| current.get(key.as_str()) == Some(*value));
    if !unchanged {
        let mut set = redis::cmd("CONFIG");
        set.arg("SET");
        for (key, value) in &params {
            set.arg(key.as_str()).arg(value.as_str());
        }
        let _: String = local.query(&set).await.map_err(reply_is_invalid)?;
    }
    let mut note = String::new();
    if config.rewrite && !unchanged {
        match local
            .query::<String>(redis::cmd("CONFIG").arg("REWRITE"))
            .await
        {
            Ok(_) => note.push_str("; config file rewritten"),
            Err(LocalError::Reply(msg)) if msg.contains("without a config file") => {
                note.push_str("; no config file to rewrite");
            }
            Err(err) => return Err(failed(format!("CONFIG REWRITE: {err}"))),
        }
    }
    let keys = params
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Ok(if unchanged {
        Done::already(format!("{keys} already set"))
    } else {
        Done::ok(format!("set {keys}{note}"))
    })
}

async fn acl_set_user(local: &mut Local, acl: &AclSetUser) -> Acted {
    check_word("acl_set_user.username", &acl.username)?;
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER").arg(&acl.username).arg("reset");
    cmd.arg(if acl.enabled { "on" } else { "off" });
    for hash in &acl.password_sha256 {
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid(
                "acl_set_user.password_sha256 holds a value that is not 64 hex digits",
            ));
        }
        cmd.arg(format!("#{}", hash.to_ascii_lowercase()));
    }
    for rule in &acl.rules {
        check_word("acl_set_user.rules entry", rule)?;
        if rule.starts_with(['>', '<', '#', '!']) {
            return Err(invalid(
                "acl_set_user.rules may not carry passwords; use password_sha256",
            ));
        }
        cmd.arg(rule);
    }
    let _: String = local.query(&cmd).await.map_err(reply_is_invalid)?;
    Ok(Done::ok(format!(
        "user {} set ({} password(s), {} rule(s))",
        acl.username,
        acl.password_sha256.len(),
        acl.rules.len()
    )))
}

async fn sentinel_monitor(local: &mut Local, monitor: &SentinelMonitor) -> Acted {
    check_word("sentinel_monitor.name", &monitor.name)?;
    check_host_port("sentinel_monitor", &monitor.host, monitor.port)?;
    if monitor.quorum == 0 {
        return Err(invalid("sentinel_monitor.quorum must be at least 1"));
    }
    let existing = match local
        .query::<HashMap<String, String>>(redis::cmd("SENTINEL").arg("MASTER").arg(&monitor.name))
        .await
    {
        Ok(map) => Some(map),
        Err(LocalError::Reply(msg)) if msg.contains("No such master") => None,
        Err(err) => return Err(err.into()),
    };
    let same = existing.as_ref().is_some_and(|m| {
        m.get("ip") == Some(&monitor.host)
            && m.get("port").and_then(|p| p.parse::<u32>().ok()) == Some(monitor.port)
            && m.get("quorum").and_then(|q| q.parse::<u32>().ok()) == Some(monitor.quorum)
    });
    if !same {
        if existing.is_some() {
            let _: String = local
                .query(redis::cmd("SENTINEL").arg("REMOVE").arg(&monitor.name))
                .await?;
        }
        let _: String = local
            .query(
                redis::cmd("SENTINEL")
                    .arg("MONITOR")
                    .arg(&monitor.name)
                    .arg(&monitor.host)
                    .arg(monitor.port)
                    .arg(monitor.quorum),
            )
            .await
            .map_err(reply_is_invalid)?;
    }
    if !monitor.auth_pass.is_empty() {
        let mut set = redis::cmd("SENTINEL");
        set.arg("SET")
            .arg(&monitor.name)
            .arg("auth-pass")
            .arg(&monitor.auth_pass);
        if !monitor.auth_user.is_empty() {
            set.arg("auth-user").arg(&monitor.auth_user);
        }
        let _: String = local.query(&set).await.map_err(reply_is_invalid)?;
    }
    let what = format!(
        "{} at {}:{} quorum {}",
        monitor.name, monitor.host, monitor.port, monitor.quorum
    );
    Ok(if same {
        Done::already(format!("already monitoring {what}"))
    } else {
        Done::ok(format!("monitoring {what}"))
    })
}
