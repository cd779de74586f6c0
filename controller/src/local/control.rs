//! The local runtime's status (a table for people, JSON for tools) and its control socket,
//! `<dir>/control.sock`, through which `local status` and `local switchover` reach a running
//! `local up`: one JSON request line, one JSON reply line.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use valkey_proto::v1::{ProcessState, Role};

use super::LocalError;
use crate::{
    decide::model::{Desired, Durable, FailoverRecord},
    hub::{Hub, InstanceKey},
};

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// Whether a live `local up` answers on the dir's socket.
pub fn is_running(dir: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(dir)).is_ok()
}

pub fn bind(dir: &Path) -> Result<UnixListener, LocalError> {
    let path = socket_path(dir);
    // A socket file left by a controller that was killed: nobody answers on it.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| LocalError::Io {
        what: "listening on",
        path: path.clone(),
        source,
    })?;
    // Whoever may connect may switch over or rotate the password: the owner alone, whatever
    // the umask was when the socket was made.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        LocalError::Io {
            what: "restricting to its owner",
            path,
            source,
        }
    })?;
    Ok(listener)
}

pub fn unbind(dir: &Path) {
    let _ = std::fs::remove_file(socket_path(dir));
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Switchover {
        to: Option<String>,
    },
    /// Rotate the instance's password without breaking replication or Sentinel.
    RotatePassword,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub pod: String,
    pub role: String,
    pub addr: String,
    pub connected: bool,
    pub process: String,
    pub offset: i64,
    pub lag: i64,
    pub link: String,
    pub keys: u64,
    pub retiring: bool,
    pub valkey_pid: Option<u32>,
    pub agent_pid: Option<u32>,
    /// A master whose write lease lapsed: its agent paused writes.
    #[serde(default)]
    pub fenced: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
    pub dir: String,
    pub epoch: u64,
    pub master: Option<String>,
    pub master_addr: Option<String>,
    pub last_failover: Option<FailoverRecord>,
    pub switchover: Option<String>,
    pub nodes: Vec<NodeStatus>,
    /// Who decides failover, and how to reach it.
    pub monitor: MonitorStatus,
}

/// `status.monitor`: the policy, and under policy sentinel the monitor and its sentinels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MonitorStatus {
    pub policy: String,
    /// The file holding the instance's password.
    pub password_secret: Option<String>,
    /// Kept while a password rotation is under way: both passwords work until it ends.
    pub old_password_secret: Option<String>,
    pub name: Option<String>,
    pub quorum: Option<u32>,
    pub nodes: Vec<SentinelNodeStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentinelNodeStatus {
    pub pod: String,
    pub addr: String,
    pub connected: bool,
    /// The master this sentinel names, and its config epoch.
    pub master: Option<String>,
    pub config_epoch: Option<u64>,
    /// The replicas it knows: it can promote no other (it learns them from the master's INFO).
    #[serde(default)]
    pub replicas: Option<u32>,
    pub flags: Vec<String>,
    pub sentinel_pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    pub status: Option<Status>,
}

impl Reply {
    pub fn status(status: Status) -> Self {
        Self {
            ok: true,
            message: String::new(),
            status: Some(status),
        }
    }
    pub fn ok(message: String) -> Self {
        Self {
            ok: true,
            message,
            status: None,
        }
    }
    pub fn error(message: String) -> Self {
        Self {
            ok: false,
            message,
            status: None,
        }
    }
}

/// The instance as the controller sees it now.
pub fn status(
    key: &InstanceKey,
    durable: &Durable,
    desired: &Desired,
    hub: &Hub,
    dir: &Path,
    pids: &std::collections::BTreeMap<String, (Option<u32>, Option<u32>)>,
) -> Status {
    let observed = hub.observe(key);
    let master_offset = durable
        .master
        .as_ref()
        .and_then(|m| observed.nodes.get(m))
        .and_then(|o| o.report.as_ref()?.data.as_ref().map(|d| d.repl_offset));
    let nodes = desired
        .nodes
        .iter()
        .map(|node| {
            let obs = observed.nodes.get(&node.name);
            let report = obs.and_then(|o| o.report.as_ref());
            let data = report.and_then(|r| r.data.as_ref());
            let process = match report.map(|r| r.process()) {
                Some(ProcessState::Up) => "up",
                Some(ProcessState::Down) => "down",
                Some(ProcessState::Hung) => "hung",
                Some(ProcessState::Loading) => "loading",
                Some(ProcessState::Busy) => "busy",
                Some(ProcessState::AuthFailed) => "auth-failed",
                _ => "unknown",
            };
            let role = match data.map(|d| d.role()) {
                Some(Role::Master) => "master",
                Some(Role::Replica) => "replica",
                _ => "-",
            };
            let offset = data.map(|d| d.repl_offset).unwrap_or_default();
            NodeStatus {
                pod: node.name.clone(),
                role: role.into(),
                addr: format!("{}:{}", node.host, node.port),
                connected: obs.is_some_and(|o| o.connected),
                process: process.into(),
                offset,
                lag: match (role, master_offset) {
                    ("replica", Some(m)) => (m - offset).max(0),
                    _ => 0,
                },
                link: match data {
                    Some(d) if d.role() == Role::Replica && d.master_link_up => "up".into(),
                    Some(d) if d.role() == Role::Replica => "down".into(),
                    _ => "-".into(),
                },
                keys: data.map(|d| d.key_count).unwrap_or_default(),
                retiring: node.retiring,
                valkey_pid: pids.get(&node.name).and_then(|p| p.0),
                agent_pid: pids.get(&node.name).and_then(|p| p.1),
                fenced: data.is_some_and(|d| d.fenced),
            }
        })
        .collect();
    Status {
        instance: format!("{}/{}", key.namespace, key.name),
        dir: dir.display().to_string(),
        epoch: durable.epoch,
        master_addr: durable
            .master
            .as_ref()
            .and_then(|m| desired.node(m))
            .map(|n| format!("{}:{}", n.host, n.port)),
        master: durable.master.clone(),
        last_failover: durable.last_failover.clone(),
        switchover: durable
            .switchover
            .as_ref()
            .map(|s| format!("{} -> {}", s.from, s.to)),
        nodes,
        monitor: MonitorStatus {
            policy: "manual".into(),
            ..MonitorStatus::default()
        },
    }
}

/// The status as a table for a terminal.
pub fn render(status: &Status) -> String {
    let mut out = format!(
        "{}  epoch {}  master {} ({})\n",
        status.instance,
        status.epoch,
        status.master.as_deref().unwrap_or("-"),
        status.master_addr.as_deref().unwrap_or("-"),
    );
    if let Some(f) = &status.last_failover {
        let secs = f.at_ms.div_euclid(1000);
        out.push_str(&format!(
            "last failover: {} -> {} at {:02}:{:02}:{:02}.{:03} UTC: {}\n",
            f.from.as_deref().unwrap_or("-"),
            f.to,
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            f.at_ms.rem_euclid(1000),
            f.reason
        ));
    }
    if status.monitor.policy == "sentinel" {
        out.push_str(&format!(
            "policy sentinel: monitor {} quorum {}\n",
            status.monitor.name.as_deref().unwrap_or("-"),
            status.monitor.quorum.unwrap_or_default()
        ));
        for s in &status.monitor.nodes {
            out.push_str(&format!(
                "  {:<24} {:<16} {:<9} master {} (config epoch {}, {} replicas known)\n",
                s.pod,
                s.addr,
                if s.connected { "connected" } else { "no-agent" },
                s.master.as_deref().unwrap_or("-"),
                s.config_epoch
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into()),
                s.replicas
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into())
            ));
        }
    }
    if let Some(s) = &status.switchover {
        out.push_str(&format!("switchover under way: {s}\n"));
    }
    out.push_str(&format!(
        "{:<20} {:<8} {:<16} {:<8} {:>12} {:>8} {:<5} {:>8}\n",
        "POD", "ROLE", "ADDR", "PROCESS", "OFFSET", "LAG", "LINK", "KEYS"
    ));
    for n in &status.nodes {
        out.push_str(&format!(
            "{:<20} {:<8} {:<16} {:<8} {:>12} {:>8} {:<5} {:>8}\n",
            n.pod,
            n.role,
            n.addr,
            if n.connected && n.fenced {
                "fenced"
            } else if n.connected {
                n.process.as_str()
            } else {
                "no-agent"
            },
            n.offset,
            n.lag,
            n.link,
            n.keys
        ));
    }
    out
}

/// Prints the table at once when a role, process or master changes, and every 10 s otherwise.
#[derive(Debug, Default)]
pub struct Printer {
    last: Option<(Instant, String, Vec<String>)>,
}

impl Printer {
    pub fn maybe_print(&mut self, status: &Status) {
        let table = render(status);
        let roles: Vec<String> = status
            .nodes
            .iter()
            .map(|n| format!("{}{}{}", n.role, n.process, n.connected))
            .chain([status.master.clone().unwrap_or_default()])
            .collect();
        let due = match &self.last {
            None => true,
            Some((at, text, last_roles)) => {
                *last_roles != roles || (*text != table && at.elapsed() >= Duration::from_secs(10))
            }
        };
        if due {
            println!("{table}");
            self.last = Some((Instant::now(), table, roles));
        }
    }
}

/// A request read from the control socket, and where its reply goes.
pub type Asked = (Request, tokio::sync::oneshot::Sender<Reply>);

/// Serves the control socket: each client in a task of its own (reads one request line
/// within 2 s, hands it to the control loop, writes the reply), so that a client that connects
/// and says nothing holds up no failover.
pub fn serve(listener: UnixListener) -> tokio::sync::mpsc::Receiver<Asked> {
    let (asked, requests) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, say: try again shortly rather than give up.
                    tracing::warn!(error = %err, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let asked = asked.clone();
            tokio::spawn(async move {
                let Some((request, stream)) = read_request(stream).await else {
                    return;
                };
                let (reply_to, reply) = tokio::sync::oneshot::channel();
                if asked.send((request, reply_to)).await.is_ok()
                    && let Ok(reply) = reply.await
                {
                    write_reply(stream, reply).await;
                }
            });
        }
    });
    requests
}

async fn read_request(stream: UnixStream) -> Option<(Request, UnixStream)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // One short JSON line: a client cannot make the runtime buffer more than 4 KiB.
    let mut limited = (&mut reader).take(4096);
    tokio::time::timeout(Duration::from_secs(2), limited.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    let request = serde_json::from_str(&line).ok()?;
    Some((request, reader.into_inner()))
}

async fn write_reply(mut stream: UnixStream, reply: Reply) {
    if let Ok(mut line) = serde_json::to_string(&reply) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes()).await;
    }
}

/// Sends one request to a running `local up` in `dir`.
pub async fn request(dir: &Path, request: &Request) -> Result<Reply, String> {
    let path = socket_path(dir);
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        format!(
            "no running `local up` in {} ({}): {e}",
            dir.display(),
            path.display()
        )
    })?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(15), reader.read_line(&mut reply))
        .await
        .map_err(|_| "no reply within 15 s".to_owned())?
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))
}
