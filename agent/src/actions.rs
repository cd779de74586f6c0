//! Every action behind the controller's commands, one function each, on the local process:
//! what a command does once the executor has admitted it (fence, deadline, idempotence, in
//! `executor.rs`), and the typed answer it gives.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use std::sync::atomic::Ordering;

use tracing::warn;
use valkey_proto::v1::{
    AclSetUser, CatchUp, ConfigSet, Outcome, ReplicaOf, SentinelConfigSet, SentinelMonitor,
    SentinelSet, command::Action,
};

use crate::{
    clients,
    config::Config,
    info::parse_info,
    passwords,
    snapshot::{Shared, now_ms},
    valkey::{Valkey, ValkeyError},
};

/// How often a catching-up replica looks at its offset: writes are paused meanwhile.
pub(crate) const CATCH_UP_POLL: Duration = Duration::from_millis(1);

/// The outcome of acting, before the bookkeeping fields are filled in.
pub(crate) type Acted = Result<Done, Refusal>;

#[derive(Debug, Default)]
pub(crate) struct Done {
    pub(crate) already: bool,
    pub(crate) message: String,
    pub(crate) offset: i64,
}

impl Done {
    pub(crate) fn ok(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }
    pub(crate) fn already(message: impl Into<String>) -> Self {
        Self {
            already: true,
            message: message.into(),
            ..Self::default()
        }
    }
}

#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) outcome: Outcome,
    pub(crate) message: String,
}

pub(crate) fn invalid(message: impl Into<String>) -> Refusal {
    Refusal {
        outcome: Outcome::Invalid,
        message: message.into(),
    }
}

pub(crate) fn failed(message: impl Into<String>) -> Refusal {
    Refusal {
        outcome: Outcome::Failed,
        message: message.into(),
    }
}

impl From<ValkeyError> for Refusal {
    fn from(err: ValkeyError) -> Self {
        match err {
            ValkeyError::Hung(_) => Refusal {
                outcome: Outcome::Timeout,
                message: err.to_string(),
            },
            other => failed(other.to_string()),
        }
    }
}

/// The actions, on the local process: what each command does once the executor admitted it.
pub(crate) struct Actions<'a> {
    pub(crate) config: &'a Config,
    pub(crate) shared: &'a Shared,
}

impl Actions<'_> {
    pub(crate) async fn act(
        &self,
        local: &mut Valkey,
        action: &Action,
        deadline: Duration,
    ) -> Acted {
        match action {
            Action::ReplicaOf(replica_of) => self.replica_of(local, replica_of).await,
            Action::Promote(_) => self.promote(local).await,
            Action::PauseWrites(pause) => self.pause_writes(local, pause.pause_ms).await,
            Action::UnpauseWrites(_) => self.unpause_writes(local).await,
            Action::CatchUp(to) => {
                check_host_port("catch_up", &to.host, to.port)?;
                catch_up(local, to, deadline).await
            }
            Action::ConfigSet(config) => self.config_set(local, config).await,
            Action::AclSetUser(acl) => acl_set_user(local, acl).await,
            Action::SentinelMonitor(monitor) => {
                let auth_pass = match &monitor.auth_pass_ref {
                    Some(reference) => Some(passwords::resolve(self.config, reference)?),
                    None => None,
                };
                sentinel_monitor(local, monitor, auth_pass.as_deref()).await
            }
            Action::SentinelSet(set) => self.sentinel_set(local, set).await,
            Action::SentinelConfigSet(set) => self.sentinel_config_set(local, set).await,
            Action::SentinelReset(reset) => sentinel_reset(local, &reset.pattern).await,
            Action::SentinelFailover(failover) => sentinel_failover(local, &failover.name).await,
        }
    }

    async fn replica_of(&self, local: &mut Valkey, to: &ReplicaOf) -> Acted {
        let ReplicaOf { host, port } = to;
        check_host_port("replica_of", host, *port)?;
        if host == &self.config.announce_host && *port == u32::from(self.config.announce_port) {
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

    async fn promote(&self, local: &mut Valkey) -> Acted {
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

    async fn pause_writes(&self, local: &mut Valkey, pause_ms: u32) -> Acted {
        if pause_ms == 0 {
            return Err(invalid("pause_writes.pause_ms must be above 0"));
        }
        let _: String = local
            .query(redis::cmd("CLIENT").arg("PAUSE").arg(pause_ms).arg("WRITE"))
            .await?;
        self.shared
            .paused_until_ms
            .store(now_ms() + i64::from(pause_ms), Ordering::Relaxed);
        // Every write this master took is in its stream up to here.
        let offset = offset_of(&replication(local).await?);
        Ok(Done {
            message: format!("writes paused for {pause_ms} ms at offset {offset}"),
            offset,
            ..Done::default()
        })
    }

    async fn unpause_writes(&self, local: &mut Valkey) -> Acted {
        let _: String = local.query(redis::cmd("CLIENT").arg("UNPAUSE")).await?;
        self.shared.paused_until_ms.store(0, Ordering::Relaxed);
        Ok(Done::ok("writes unpaused"))
    }

    /// CONFIG SET, with the passwords it names resolved from this pod's files.
    async fn config_set(&self, local: &mut Valkey, config: &ConfigSet) -> Acted {
        let params = passwords::merged(
            self.config,
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

    async fn sentinel_set(&self, local: &mut Valkey, set: &SentinelSet) -> Acted {
        check_word("sentinel_set.name", &set.name)?;
        let params = passwords::merged(
            self.config,
            "sentinel_set",
            &set.params,
            &set.password_params,
        )?;
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("SET").arg(&set.name);
        sentinel_params(local, cmd, "sentinel_set", &params).await?;
        Ok(Done::ok(format!(
            "set {} parameter(s) on {}",
            params.len(),
            set.name
        )))
    }

    async fn sentinel_config_set(&self, local: &mut Valkey, set: &SentinelConfigSet) -> Acted {
        let field = "sentinel_config_set";
        let params = passwords::merged(self.config, field, &set.params, &set.password_params)?;
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("CONFIG").arg("SET");
        sentinel_params(local, cmd, field, &params).await?;
        Ok(Done::ok(format!(
            "set {} sentinel setting(s)",
            params.len()
        )))
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

/// Sends `cmd` with `params` (checked, in a stable order) appended; refused when empty.
async fn sentinel_params(
    local: &mut Valkey,
    mut cmd: redis::Cmd,
    field: &str,
    params: &HashMap<String, String>,
) -> Result<(), Refusal> {
    if params.is_empty() {
        return Err(invalid(format!("{field}.params is empty")));
    }
    for (key, value) in sorted(params) {
        check_word(&format!("{field}.params key"), key)?;
        cmd.arg(key).arg(value);
    }
    let _: String = local.query(&cmd).await.map_err(reply_is_invalid)?;
    Ok(())
}

async fn sentinel_reset(local: &mut Valkey, pattern: &str) -> Acted {
    check_word("sentinel_reset.pattern", pattern)?;
    let n: i64 = local
        .query(redis::cmd("SENTINEL").arg("RESET").arg(pattern))
        .await?;
    Ok(Done::ok(format!("reset {n} master(s)")))
}

async fn sentinel_failover(local: &mut Valkey, name: &str) -> Acted {
    check_word("sentinel_failover.name", name)?;
    match local
        .query::<String>(redis::cmd("SENTINEL").arg("FAILOVER").arg(name))
        .await
    {
        Ok(_) => Ok(Done::ok(format!("failover of {name} started"))),
        Err(ValkeyError::Reply(msg)) if msg.contains("INPROG") => Ok(Done::already(format!(
            "a failover of {name} is in progress"
        ))),
        Err(err) => Err(err.into()),
    }
}

pub(crate) fn check_host_port(field: &str, host: &str, port: u32) -> Result<(), Refusal> {
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

pub(crate) fn check_word(field: &str, value: &str) -> Result<(), Refusal> {
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(invalid(format!(
            "{field} {value:?} must be one non-empty word"
        )));
    }
    Ok(())
}

/// Whether INFO replication says this node is a replica of host:port.
pub(crate) fn follows(info: &HashMap<String, String>, host: &str, port: u32) -> bool {
    info.get("role").map(String::as_str) == Some("slave")
        && info.get("master_host").map(String::as_str) == Some(host)
        && info.get("master_port").and_then(|p| p.parse::<u32>().ok()) == Some(port)
}

pub(crate) async fn is_master(local: &mut Valkey) -> Result<bool, ValkeyError> {
    Ok(replication(local).await?.get("role").map(String::as_str) == Some("master"))
}

/// INFO replication as a map.
pub(crate) async fn replication(
    local: &mut Valkey,
) -> Result<HashMap<String, String>, ValkeyError> {
    let text: String = local.query(redis::cmd("INFO").arg("replication")).await?;
    Ok(parse_info(&text)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// A server's refusal of a malformed request is the requester's fault, not a failure.
pub(crate) fn reply_is_invalid(err: ValkeyError) -> Refusal {
    match err {
        ValkeyError::Reply(message) => invalid(message),
        other => other.into(),
    }
}

pub(crate) fn sorted(map: &HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut pairs: Vec<_> = map.iter().collect();
    pairs.sort();
    pairs
}

pub(crate) fn offset_of(info: &HashMap<String, String>) -> i64 {
    info.get("master_repl_offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or_default()
}

/// On a replica: waits until it follows host:port and has processed up to the offset.
pub(crate) async fn catch_up(local: &mut Valkey, catch_up: &CatchUp, deadline: Duration) -> Acted {
    let CatchUp { host, port, offset } = catch_up;
    let started = Instant::now();
    let deadline = deadline.saturating_sub(Duration::from_millis(100));
    loop {
        let info = replication(local).await?;
        if !follows(&info, host, *port) {
            return Err(invalid(format!(
                "catch_up: this node is not a replica of {host}:{port}"
            )));
        }
        let reached = offset_of(&info);
        if reached >= *offset {
            return Ok(Done {
                message: format!("caught up with {host}:{port} at offset {reached}"),
                offset: reached,
                ..Done::default()
            });
        }
        if started.elapsed() + CATCH_UP_POLL >= deadline {
            return Err(Refusal {
                outcome: Outcome::Timeout,
                message: format!("reached offset {reached} of {offset} from {host}:{port}"),
            });
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

pub(crate) async fn config_set(local: &mut Valkey, config: &ConfigSet) -> Acted {
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
    // A replica tells its master where it is reached (REPLCONF listening-port, and the IP it
    // announces) only when its link is made: a changed announce takes effect by making the
    // link again (a partial resync; nothing is lost).
    let announce_changed = params.iter().any(|(key, value)| {
        key.starts_with("replica-announce-") && current.get(key.as_str()) != Some(*value)
    });
    if announce_changed {
        let killed: Result<i64, _> = local
            .query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("master"))
            .await;
        if matches!(killed, Ok(n) if n > 0) {
            note.push_str("; master link made again to announce it");
        }
    }
    if config.rewrite && !unchanged {
        match local
            .query::<String>(redis::cmd("CONFIG").arg("REWRITE"))
            .await
        {
            Ok(_) => note.push_str("; config file rewritten"),
            Err(ValkeyError::Reply(msg)) if msg.contains("without a config file") => {
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

pub(crate) async fn acl_set_user(local: &mut Valkey, acl: &AclSetUser) -> Acted {
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

/// SENTINEL MONITOR, then `auth_pass` (read from the file the command named) as auth-pass.
pub(crate) async fn sentinel_monitor(
    local: &mut Valkey,
    monitor: &SentinelMonitor,
    auth_pass: Option<&str>,
) -> Acted {
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
        Err(ValkeyError::Reply(msg)) if msg.contains("No such master") => None,
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
    if let Some(auth_pass) = auth_pass {
        let mut set = redis::cmd("SENTINEL");
        set.arg("SET")
            .arg(&monitor.name)
            .arg("auth-pass")
            .arg(auth_pass);
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
