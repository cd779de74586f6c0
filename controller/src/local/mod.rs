//! The local runtime: `valkey-controller local up -f <failover.yaml>` runs the failover core
//! and the agent hub in-process and stands in for the kubelet, with every node's data, logs
//! and the controller's durable state in one working directory.

pub mod conf;
pub mod control;
mod rotation;
pub mod supervisor;

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{error, info, warn};
use valkey_proto::v1::NodeKind;

use crate::{
    core::{Desired, Durable, NodeSpec, PendingSwitchover},
    engine::Engine,
    hub::{Hub, HubEvent, InstanceKey, StaticToken},
    manifest::{Manifest, ManifestError},
    sentinel::SentinelDesired,
    switchover,
};
use conf::{Passwords, old_password_path};
use rotation::{maybe_rotate_sentinel_password, start_rotation};
use supervisor::{Supervised, free_ports, log_path, port_in_use, sibling_or_path, which};

/// Everything that can stop `local up` before or while it runs; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("-f {path}: {source}")]
    ReadManifest {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "{name} not found on PATH: install it (Debian: apt-get install -t bookworm-backports valkey-server valkey-sentinel) or pass --{flag}"
    )]
    MissingBinary { name: String, flag: &'static str },
    #[error("--dir {dir}: it holds instance {found}, not {wanted}; choose another --dir")]
    OtherInstance {
        dir: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("--dir {dir}: a controller is already running there")]
    AlreadyRunning { dir: PathBuf },
    #[error(
        "port {port} ({what} of {pod}) is in use; stop what listens there or remove {state} to pick new ports"
    )]
    PortInUse {
        pod: String,
        what: &'static str,
        port: u16,
        state: PathBuf,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid state file: {source}")]
    BadState {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Spawn(#[from] supervisor::SpawnError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LocalError + 'a {
    move |source| LocalError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// How `local up` was asked to run.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub manifest: PathBuf,
    pub dir: Option<PathBuf>,
    pub hang_timeout: Duration,
    pub probe_interval_ms: u64,
}

/// Ports of one node, kept across runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePorts {
    pub valkey: u16,
    pub agent: u16,
    pub metrics: u16,
}

/// The working dir's durable state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub namespace: String,
    pub name: String,
    pub durable: Durable,
    pub ports: BTreeMap<String, NodePorts>,
    /// Embedded sentinels' ports (policy sentinel), kept across runs.
    #[serde(default)]
    pub sentinels: BTreeMap<String, NodePorts>,
}

/// Writes a file atomically: temp file, fsync, rename. Readable by this user only: the working
/// dir holds passwords.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl LocalState {
    fn load(path: &Path) -> Result<Option<Self>, LocalError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| LocalError::BadState {
                        path: path.to_owned(),
                        source,
                    })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LocalError::Io {
                what: "reading",
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn save(&self, path: &Path) -> Result<(), LocalError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| LocalError::BadState {
            path: path.to_owned(),
            source,
        })?;
        write_atomic(path, &bytes).map_err(io("writing", path))
    }
}

/// The default working dir of an instance.
pub fn default_dir(namespace: &str, name: &str) -> PathBuf {
    PathBuf::from(".valkey-local").join(format!("{namespace}-{name}"))
}

fn pod_name(name: &str, ordinal: u32) -> String {
    format!("{name}-{ordinal}")
}

fn random_secret() -> String {
    use rand::RngExt;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Reads a secret file, creating it (mode 0600) when missing.
fn secret_file(path: &Path) -> Result<String, LocalError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_secret();
            write_atomic(path, secret.as_bytes()).map_err(io("writing", path))?;
            Ok(secret)
        }
        Err(source) => Err(LocalError::Io {
            what: "reading",
            path: path.to_owned(),
            source,
        }),
    }
}

/// The two processes of one node.
#[derive(Debug)]
struct NodeProcs {
    valkey: Supervised,
    agent: Supervised,
}

struct Runtime {
    key: InstanceKey,
    dir: PathBuf,
    state_path: PathBuf,
    state: LocalState,
    desired: Desired,
    manifest: Manifest,
    password_file: PathBuf,
    token_file: PathBuf,
    valkey_bin: PathBuf,
    agent_bin: PathBuf,
    hub_addr: std::net::SocketAddr,
    probe_interval_ms: u64,
    procs: BTreeMap<String, NodeProcs>,
    last_notes: Vec<String>,
    /// Policy sentinel: how Sentinel watches this instance.
    sentinel: Option<SentinelDesired>,
    /// valkey-sentinel, for embedded sentinels.
    sentinel_bin: Option<PathBuf>,
    /// An external Sentinel set: (pod name given to its in-process agent, host, port).
    external: Vec<(String, String, u16)>,
    /// The sentinels' password in force, read by their agents: for embedded sentinels the
    /// controller's copy (`sentinel-password`) that follows the Secret through a rotation; for
    /// an external set the Secret itself.
    sentinel_password_file: Option<PathBuf>,
    /// Embedded sentinels with a password: the Secret's name and file
    /// (`<dir>/secrets/<name>/password`), the password wanted.
    sentinel_secret: Option<(String, PathBuf)>,
}

impl Runtime {
    fn node_dir(&self, pod: &str) -> PathBuf {
        self.dir.join("nodes").join(pod)
    }

    /// A data node's valkey.conf, generated afresh before every start (see [`conf`]).
    fn write_config(&self, pod: &str, ports: NodePorts) -> Result<(), LocalError> {
        let node_dir = self.node_dir(pod);
        std::fs::create_dir_all(&node_dir).map_err(io("creating", &node_dir))?;
        let passwords =
            Passwords::read(&self.password_file).map_err(io("reading", &self.password_file))?;
        let conf = conf::ValkeyConf {
            port: ports.valkey,
            dir: &node_dir,
            log: &log_path(&self.dir, &format!("{pod}.valkey")),
            passwords: &passwords,
            custom: &self.manifest.spec.custom_configs,
        }
        .render();
        let path = node_dir.join("valkey.conf");
        write_atomic(&path, conf.as_bytes()).map_err(io("writing", &path))
    }

    /// A sentinel's sentinel.conf before every start: what Sentinel learned is kept (its
    /// state must survive a restart), its port and password lines are regenerated.
    fn write_sentinel_config(&self, pod: &str, ports: NodePorts) -> Result<(), LocalError> {
        let node_dir = self.node_dir(pod);
        std::fs::create_dir_all(&node_dir).map_err(io("creating", &node_dir))?;
        let path = node_dir.join("sentinel.conf");
        let passwords = match self
            .sentinel_secret
            .as_ref()
            .and(self.sentinel_password_file.as_ref())
        {
            Some(file) => Some(Passwords::read(file).map_err(io("reading", file))?),
            None => None,
        };
        let existing = std::fs::read_to_string(&path).ok();
        let empty = BTreeMap::new();
        let conf = conf::SentinelConf {
            port: ports.valkey,
            dir: &node_dir,
            log: &log_path(&self.dir, &format!("{pod}.sentinel")),
            passwords: passwords.as_ref(),
            custom: self
                .manifest
                .spec
                .sentinel
                .as_ref()
                .map_or(&empty, |s| &s.custom_configs),
        }
        .render(existing.as_deref());
        if existing.as_deref() != Some(conf.as_str()) {
            write_atomic(&path, conf.as_bytes()).map_err(io("writing", &path))?;
        }
        Ok(())
    }

    /// Writes the config of `pod` for its next start.
    fn write_any_config(
        &self,
        pod: &str,
        ports: NodePorts,
        sentinel: bool,
    ) -> Result<(), LocalError> {
        if sentinel && self.sentinel_bin.is_some() {
            self.write_sentinel_config(pod, ports)
        } else {
            self.write_config(pod, ports)
        }
    }

    fn procs_for(&self, pod: &str, ports: NodePorts, sentinel: bool) -> NodeProcs {
        let (what, program, conf) = match (&self.sentinel_bin, sentinel) {
            (Some(bin), true) => ("valkey-sentinel", bin.clone(), "sentinel.conf"),
            _ => ("valkey-server", self.valkey_bin.clone(), "valkey.conf"),
        };
        let conf = self.node_dir(pod).join(conf);
        let valkey = Supervised::new(
            format!("{pod} {what}"),
            program,
            vec![conf.display().to_string()],
            log_path(&self.dir, &format!("{pod}.{what}-stdout")),
        );
        let mut agent_args: Vec<String> = if sentinel {
            let mut args = vec!["--mode".into(), "sentinel".into()];
            if let Some(file) = &self.sentinel_password_file {
                args.extend(["--valkey-password-file".into(), file.display().to_string()]);
            }
            args
        } else {
            vec![
                "--valkey-password-file".into(),
                self.password_file.display().to_string(),
            ]
        };
        agent_args.extend([
            "--valkey-addr".into(),
            format!("127.0.0.1:{}", ports.valkey),
            "--controller-addr".into(),
            format!("http://{}", self.hub_addr),
            "--token-file".into(),
            self.token_file.display().to_string(),
            "--namespace".into(),
            self.key.namespace.clone(),
            "--failover".into(),
            self.key.name.clone(),
            "--pod-name".into(),
            pod.to_owned(),
            "--data-dir".into(),
            self.node_dir(pod).join("agent").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", ports.agent),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", ports.metrics),
            "--probe-interval-ms".into(),
            self.probe_interval_ms.to_string(),
            "--reconnect-max-ms".into(),
            "1000".into(),
        ]);
        let agent = Supervised::new(
            format!("{pod} valkey-agent"),
            self.agent_bin.clone(),
            agent_args,
            log_path(&self.dir, &format!("{pod}.agent")),
        );
        NodeProcs { valkey, agent }
    }

    /// The processes to run: the desired nodes, those still retiring, and the sentinels; each
    /// with its ports and whether it is a sentinel.
    fn wanted_pods(&self) -> Vec<(String, NodePorts, bool)> {
        let data = self
            .desired
            .nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), *self.state.ports.get(&n.name)?, false)));
        let sentinels = self
            .state
            .sentinels
            .iter()
            .filter(|_| self.sentinel_bin.is_some())
            .map(|(pod, ports)| (pod.clone(), *ports, true));
        data.chain(sentinels).collect()
    }

    /// Starts the nodes not running yet: every Valkey first, and each agent once its Valkey
    /// listens, so that no agent reports a Valkey that has merely not started yet as gone.
    fn start_missing(&mut self) -> Result<(), LocalError> {
        let mut started = Vec::new();
        for (pod, ports, sentinel) in self.wanted_pods() {
            if self.procs.contains_key(&pod) {
                continue;
            }
            let mut procs = self.procs_for(&pod, ports, sentinel);
            self.write_any_config(&pod, ports, sentinel)?;
            procs.valkey.start()?;
            self.procs.insert(pod.clone(), procs);
            started.push((pod, ports));
        }
        for (pod, ports) in started {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !port_in_use(ports.valkey) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(procs) = self.procs.get_mut(&pod) {
                procs.agent.start()?;
            }
            info!(pod = %pod, valkey = ports.valkey, agent = ports.agent, "node started");
        }
        Ok(())
    }

    /// Stands in for the kubelet's restarts: a process that died is started again after
    /// [`supervisor::RESTART_DELAY`], a Valkey or Sentinel with its config generated anew.
    fn tend(&mut self) {
        for (pod, ports, sentinel) in self.wanted_pods() {
            let Some(procs) = self.procs.get_mut(&pod) else {
                continue;
            };
            procs.agent.reap();
            if procs.agent.due() {
                procs.agent.restart();
            }
            procs.valkey.reap();
            if !procs.valkey.due() {
                continue;
            }
            let written = self.write_any_config(&pod, ports, sentinel);
            let Some(procs) = self.procs.get_mut(&pod) else {
                continue;
            };
            match written {
                Ok(()) => procs.valkey.restart(),
                Err(err) => {
                    warn!(pod = %pod, error = %err, "cannot write the config; restart postponed");
                    procs.valkey.postpone();
                }
            }
        }
    }

    /// Stops retiring nodes once the master is not one of them (scale down).
    fn stop_retiring(&mut self) -> Result<(), LocalError> {
        let master_stays = self
            .state
            .durable
            .master
            .as_deref()
            .and_then(|m| self.desired.node(m))
            .is_some_and(|n| !n.retiring);
        if !master_stays {
            return Ok(());
        }
        let extra: Vec<String> = self
            .desired
            .nodes
            .iter()
            .filter(|n| n.retiring)
            .map(|n| n.name.clone())
            .collect();
        self.desired.nodes.retain(|n| !n.retiring);
        for pod in extra {
            if let Some(mut procs) = self.procs.remove(&pod) {
                procs.agent.stop(Signal::SIGKILL, Duration::from_secs(1));
                procs.valkey.stop(Signal::SIGTERM, Duration::from_secs(5));
                info!(pod = %pod, "node removed (scaled down)");
            }
            self.state.ports.remove(&pod);
            self.state.save(&self.state_path)?;
        }
        Ok(())
    }

    fn status(&self, hub: &Hub) -> control::Status {
        let pids = self
            .procs
            .iter()
            .map(|(pod, p)| (pod.clone(), (p.valkey.pid(), p.agent.pid())))
            .collect();
        let mut status = control::status(
            &self.key,
            &self.state.durable,
            &self.desired,
            hub,
            &self.dir,
            &pids,
        );
        // How to reach the monitor: the sentinels' Secret when they have one, else the
        // instance's password; the old one is named while a rotation is under way.
        let (secret, in_force) = match (&self.sentinel_secret, &self.sentinel_password_file) {
            (Some((name, _)), Some(in_force)) => (name.clone(), in_force),
            _ => (
                self.password_file.display().to_string(),
                &self.password_file,
            ),
        };
        status.monitor.password_secret = Some(secret);
        let old = old_password_path(in_force);
        status.monitor.old_password_secret = old.exists().then(|| old.display().to_string());
        if let Some(sd) = &self.sentinel {
            let observed = hub.observe_kind(&self.key, NodeKind::Sentinel);
            let external = self
                .external
                .iter()
                .map(|(pod, host, port)| (pod.clone(), format!("{host}:{port}")));
            status.monitor = control::MonitorStatus {
                policy: "sentinel".into(),
                password_secret: status.monitor.password_secret.take(),
                old_password_secret: status.monitor.old_password_secret.take(),
                name: Some(sd.name.clone()),
                quorum: Some(sd.quorum),
                nodes: self
                    .state
                    .sentinels
                    .iter()
                    .map(|(pod, ports)| (pod.clone(), format!("127.0.0.1:{}", ports.valkey)))
                    .chain(external)
                    .map(|(pod, addr)| {
                        let obs = observed.get(&pod);
                        let master = obs
                            .and_then(|o| o.report.as_ref()?.sentinel.as_ref())
                            .and_then(|s| s.masters.iter().find(|m| m.name == sd.name));
                        control::SentinelNodeStatus {
                            sentinel_pid: self.procs.get(&pod).and_then(|p| p.valkey.pid()),
                            pod,
                            addr,
                            connected: obs.is_some_and(|o| o.connected),
                            master: master.map(|m| format!("{}:{}", m.host, m.port)),
                            config_epoch: master.map(|m| m.config_epoch),
                            replicas: master.map(|m| m.num_replicas),
                            flags: master.map(|m| m.flags.clone()).unwrap_or_default(),
                        }
                    })
                    .collect(),
            };
        }
        status
    }

    fn shutdown(&mut self) {
        for procs in self.procs.values_mut() {
            procs.agent.stop(Signal::SIGKILL, Duration::from_secs(1));
        }
        for procs in self.procs.values_mut() {
            procs.valkey.stop(Signal::SIGTERM, Duration::from_secs(10));
        }
    }
}

/// Prepares the working dir and everything `up` needs, checking all bad input before any
/// process starts.
fn prepare(options: &UpOptions) -> Result<Runtime, LocalError> {
    let text =
        std::fs::read_to_string(&options.manifest).map_err(|source| LocalError::ReadManifest {
            path: options.manifest.clone(),
            source,
        })?;
    let manifest = Manifest::parse(&text, &options.manifest.display().to_string())?;
    let key = InstanceKey {
        namespace: manifest.namespace().to_owned(),
        name: manifest.metadata.name.clone(),
    };
    // An external Sentinel set gets no processes of ours: an agent for each of its sentinels
    // runs inside the controller instead.
    let external: Vec<(String, String, u16)> = manifest
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.sentinel_reference.as_ref())
        .map(|reference| {
            reference
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        format!("{}-external-sentinel-{i}", key.name),
                        n.ip.clone(),
                        // Validated: 1..=65535.
                        u16::try_from(n.port).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let sentinel_bin = match &manifest.spec.sentinel {
        Some(s) if s.sentinel_reference.is_none() => {
            Some(which("valkey-sentinel").ok_or(LocalError::MissingBinary {
                name: "valkey-sentinel".into(),
                flag: "path",
            })?)
        }
        _ => None,
    };
    let valkey_bin = which("valkey-server").ok_or(LocalError::MissingBinary {
        name: "valkey-server".into(),
        flag: "path",
    })?;
    let agent_bin = std::env::var_os("VALKEY_AGENT_BIN")
        .map(PathBuf::from)
        .or_else(|| sibling_or_path("valkey-agent"))
        .ok_or(LocalError::MissingBinary {
            name: "valkey-agent".into(),
            flag: "path",
        })?;

    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| default_dir(&key.namespace, &key.name));
    std::fs::create_dir_all(dir.join("logs")).map_err(io("creating", &dir))?;
    let dir = dir.canonicalize().map_err(io("resolving", &dir))?;
    // Secrets are files in the working dir: a Secret named N is `secrets/N/password`.
    let sentinel_secret = match manifest
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.password_secret())
    {
        None => None,
        Some((field, name)) => {
            let file = dir.join("secrets").join(&name).join("password");
            let readable = std::fs::read_to_string(&file).is_ok_and(|p| !p.trim().is_empty());
            if !readable {
                return Err(LocalError::Manifest(ManifestError::Invalid {
                    field: field.to_owned(),
                    message: format!(
                        "Secret {name:?} not found (the local runtime reads it from {})",
                        file.display()
                    ),
                }));
            }
            Some((name, file))
        }
    };
    let state_path = dir.join("state.json");
    let mut state = LocalState::load(&state_path)?.unwrap_or_else(|| LocalState {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        ..LocalState::default()
    });
    if state.namespace != key.namespace || state.name != key.name {
        return Err(LocalError::OtherInstance {
            dir,
            found: format!("{}/{}", state.namespace, state.name),
            wanted: format!("{}/{}", key.namespace, key.name),
        });
    }
    if control::is_running(&dir) {
        return Err(LocalError::AlreadyRunning { dir });
    }

    let replicas = manifest.spec.replicas as u32;
    if let Some(settings) = manifest
        .spec
        .sentinel
        .as_ref()
        .filter(|s| s.sentinel_reference.is_none())
    {
        for ordinal in 0..settings.count() {
            let pod = format!("{}-sentinel-{ordinal}", key.name);
            if let std::collections::btree_map::Entry::Vacant(entry) = state.sentinels.entry(pod) {
                let [sentinel, agent, metrics] =
                    free_ports().map_err(io("finding free ports on", Path::new("127.0.0.1")))?;
                entry.insert(NodePorts {
                    valkey: sentinel,
                    agent,
                    metrics,
                });
            }
        }
    }
    for ordinal in 0..replicas {
        let pod = pod_name(&key.name, ordinal);
        if let std::collections::btree_map::Entry::Vacant(entry) = state.ports.entry(pod) {
            let [valkey, agent, metrics] =
                free_ports().map_err(io("finding free ports on", Path::new("127.0.0.1")))?;
            entry.insert(NodePorts {
                valkey,
                agent,
                metrics,
            });
        }
    }
    // Nodes beyond the replica count keep running, retiring, until the master is elsewhere.
    let mut nodes: Vec<NodeSpec> = state
        .ports
        .iter()
        .filter_map(|(pod, ports)| {
            let ordinal = pod.rsplit_once('-')?.1.parse::<u32>().ok()?;
            Some(NodeSpec {
                name: pod.clone(),
                ordinal,
                host: "127.0.0.1".into(),
                port: ports.valkey,
                retiring: ordinal >= replicas,
            })
        })
        .collect();
    nodes.sort_by_key(|n| n.ordinal);
    let desired = Desired {
        nodes,
        hang_timeout_ms: options.hang_timeout.as_millis() as u64,
        replica_silence_s: (options.hang_timeout.as_secs() as i64).max(2),
        live_config: crate::engine::live_config(&manifest.spec),
    };
    let runtime = Runtime {
        password_file: dir.join("password"),
        token_file: dir.join("agent-token"),
        key,
        state_path,
        state,
        desired,
        manifest,
        valkey_bin,
        agent_bin,
        hub_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        probe_interval_ms: options.probe_interval_ms,
        procs: BTreeMap::new(),
        last_notes: Vec::new(),
        sentinel: None,
        sentinel_bin: None,
        external: Vec::new(),
        sentinel_password_file: None,
        sentinel_secret: None,
        dir,
    };
    // Embedded sentinels use the controller's copy of their password, which follows the Secret
    // through a rotation; an external set's agents read the Secret itself.
    let (sentinel_password_file, sentinel_secret) = match sentinel_secret {
        None => (None, None),
        Some((_, file)) if !external.is_empty() => (Some(file), None),
        Some((name, file)) => {
            let copy = runtime.dir.join("sentinel-password");
            if !copy.exists() {
                let password = std::fs::read(&file).map_err(io("reading", &file))?;
                write_atomic(&copy, &password).map_err(io("writing", &copy))?;
            }
            (Some(copy), Some((name, file)))
        }
    };
    let runtime = Runtime {
        sentinel: match &runtime.manifest.spec.sentinel {
            Some(settings) => Some(SentinelDesired {
                name: format!("{}.{}", runtime.key.namespace, runtime.key.name),
                quorum: settings.quorum_or_default(),
                monitor_config: settings.monitor_config_or_default(),
                auth_pass: secret_file(&runtime.password_file)?,
                sentinel_addrs: runtime
                    .state
                    .sentinels
                    .values()
                    .map(|p| ("127.0.0.1".to_owned(), u32::from(p.valkey)))
                    .chain(external.iter().map(|(_, h, p)| (h.clone(), u32::from(*p))))
                    .collect(),
            }),
            None => None,
        },
        sentinel_bin,
        external,
        sentinel_password_file,
        sentinel_secret,
        ..runtime
    };
    for (pod, ports, _) in runtime.wanted_pods() {
        for (what, port) in [
            ("valkey", ports.valkey),
            ("agent", ports.agent),
            ("metrics", ports.metrics),
        ] {
            // A Valkey killed with its controller may leave a forked child (AOF rewrite,
            // diskless sync) holding its port for a moment: give it a few seconds.
            let deadline = Instant::now() + Duration::from_secs(3);
            while port_in_use(port) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if port_in_use(port) {
                return Err(LocalError::PortInUse {
                    pod,
                    what,
                    port,
                    state: runtime.state_path.clone(),
                });
            }
        }
    }
    secret_file(&runtime.password_file)?;
    secret_file(&runtime.token_file)?;
    runtime.state.save(&runtime.state_path)?;
    Ok(runtime)
}

/// Shared between the loop and the tasks it spawns.
#[derive(Debug, Default)]
struct Flight {
    engine: Arc<Engine>,
    /// A password rotation is under way.
    rotating: AtomicBool,
    /// A rotation of the sentinels' own password is under way.
    sentinel_rotating: AtomicBool,
    /// When the last rotation failed (it is retried no sooner than 5 s later).
    rotation_failed: Mutex<Option<Instant>>,
}

/// Runs the instance until `shutdown` resolves; then stops every process it started.
pub async fn up(
    options: UpOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LocalError> {
    let mut runtime = prepare(&options)?;
    let token = secret_file(&runtime.token_file)?;
    let (hub, mut hub_events) = Hub::new(StaticToken(token.clone()), Duration::from_millis(500));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("binding the hub on", Path::new("127.0.0.1:0")))?;
    runtime.hub_addr = listener
        .local_addr()
        .map_err(io("binding the hub on", Path::new("127.0.0.1:0")))?;
    let server = tonic::transport::Server::builder()
        .add_service(hub.server())
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server_task = tokio::spawn(server);
    let control_listener = control::bind(&runtime.dir)?;

    runtime.start_missing()?;
    let (external_stop, external_tasks) = start_external_agents(&runtime, &token);
    info!(
        instance = %format_args!("{}/{}", runtime.key.namespace, runtime.key.name),
        dir = %runtime.dir.display(),
        hub = %runtime.hub_addr,
        "local instance up; password in {}",
        runtime.password_file.display()
    );

    let flight = Arc::new(Flight::default());
    let mut changed = hub.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut printer = control::Printer::default();
    tokio::pin!(shutdown);
    let started = Instant::now();

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.changed() => {}
            _ = tick.tick() => runtime.tend(),
            Some(event) = hub_events.recv() => match event {
                HubEvent::SwitchoverRequested { pod, .. } => {
                    if runtime.state.durable.master.as_deref() == Some(pod.as_str()) {
                        let _ = start_switchover(&mut runtime, &hub, &flight, None);
                    }
                }
            },
            accepted = control_listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let status = runtime.status(&hub);
                    let request = control::read_request(stream).await;
                    if let Some((request, stream)) = request {
                        let reply = match request {
                            control::Request::Status => control::Reply::status(status),
                            control::Request::Switchover { to } => match start_switchover(&mut runtime, &hub, &flight, to) {
                                Ok(message) => control::Reply::ok(message),
                                Err(message) => control::Reply::error(message),
                            },
                            control::Request::RotatePassword => match start_rotation(&runtime, &hub, &flight) {
                                Ok(message) => control::Reply::ok(message),
                                Err(message) => control::Reply::error(message),
                            },
                        };
                        tokio::spawn(control::write_reply(stream, reply));
                    }
                }
            }
        }
        if let Err(err) = reconcile(&mut runtime, &hub, &flight) {
            error!(error = %err, "reconcile failed; stopping");
            runtime.shutdown();
            server_task.abort();
            return Err(err);
        }
        if started.elapsed() > Duration::from_millis(500) {
            printer.maybe_print(&runtime.status(&hub));
        }
    }
    info!("stopping every process");
    let _ = external_stop.send(true);
    for task in external_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    runtime.shutdown();
    server_task.abort();
    control::unbind(&runtime.dir);
    Ok(())
}

/// One pass: observe, decide, persist, then send.
fn reconcile(runtime: &mut Runtime, hub: &Hub, flight: &Arc<Flight>) -> Result<(), LocalError> {
    let plan = flight.engine.plan(
        hub,
        &runtime.key,
        &runtime.desired,
        runtime.sentinel.as_ref(),
        &runtime.state.durable,
        crate::now_ms(),
    );
    // The same situation gives the same notes pass after pass: say each once.
    if plan.notes != runtime.last_notes {
        for note in plan
            .notes
            .iter()
            .filter(|n| !runtime.last_notes.contains(n))
        {
            info!("{note}");
        }
        runtime.last_notes = plan.notes.clone();
    }
    if let Some(durable) = plan.durable {
        runtime.state.durable = durable;
        // Durable first: if this fails, nothing is sent.
        runtime.state.save(&runtime.state_path)?;
    }
    flight.engine.dispatch(
        hub,
        &runtime.key,
        runtime.state.durable.epoch,
        plan.commands,
    );
    // SIGTERM (the AOF is flushed); the restart generates its config with the password in
    // force.
    for pod in &plan.restarts {
        if let Some(procs) = runtime.procs.get(pod) {
            warn!(pod = %pod, "its Valkey refuses the instance password; restarting it");
            procs.valkey.signal(Signal::SIGTERM);
        }
    }
    if let Some(target) = plan.switchover
        && let Err(message) = start_switchover(runtime, hub, flight, Some(target))
    {
        // Retried on the next pass until the target is in sync.
        tracing::debug!("switchover for scale-down not started yet: {message}");
    }
    maybe_rotate_sentinel_password(runtime, hub, flight);
    runtime.start_missing()?;
    runtime.stop_retiring()?;
    Ok(())
}

/// Starts a planned, lossless switchover (see [`crate::switchover`]); under policy manual the
/// intent is persisted first.
fn start_switchover(
    runtime: &mut Runtime,
    hub: &Hub,
    flight: &Arc<Flight>,
    to: Option<String>,
) -> Result<String, String> {
    if flight.engine.switchover.load(Ordering::SeqCst) || runtime.state.durable.switchover.is_some()
    {
        return Err("a switchover is already under way".into());
    }
    let observed = hub.observe(&runtime.key);
    let (from, target) =
        switchover::choose(&runtime.desired, &runtime.state.durable, &observed, to)
            .map_err(|e| e.to_string())?;
    let epoch = runtime.state.durable.epoch;
    if let Some(sd) = &runtime.sentinel {
        return switchover::start_sentinel(
            &flight.engine,
            hub,
            &runtime.key,
            &runtime.desired,
            epoch,
            sd.name.clone(),
            from,
            target,
        )
        .map_err(|e| e.to_string());
    }
    runtime.state.durable.switchover = Some(PendingSwitchover {
        from: from.clone(),
        to: target.name.clone(),
        epoch: epoch + 1,
    });
    if let Err(err) = runtime.state.save(&runtime.state_path) {
        runtime.state.durable.switchover = None;
        return Err(format!("cannot persist the switchover: {err}"));
    }
    Ok(switchover::start_manual(
        &flight.engine,
        hub,
        &runtime.key,
        from,
        target,
        epoch + 1,
    ))
}

/// Runs an agent, in this process, for each sentinel of an external set (which has no agents
/// of its own), so that the hub and the Sentinel core treat it like an embedded one.
fn start_external_agents(
    runtime: &Runtime,
    token: &str,
) -> (
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = runtime
        .external
        .iter()
        .map(|(pod, host, port)| {
            let config = valkey_agent::Config {
                mode: valkey_agent::config::Mode::Sentinel,
                valkey_host: host.clone(),
                valkey_port: *port,
                valkey_username: None,
                valkey_password: runtime
                    .sentinel_password_file
                    .as_ref()
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .map(|p| p.trim().to_owned()),
                valkey_password_file: runtime.sentinel_password_file.clone(),
                controller: Some(valkey_agent::config::ControllerConfig {
                    addr: format!("http://{}", runtime.hub_addr),
                    token: valkey_agent::config::TokenSource::Inline(token.to_owned()),
                    reconnect_max: Duration::from_secs(1),
                }),
                namespace: runtime.key.namespace.clone(),
                failover: runtime.key.name.clone(),
                pod_name: pod.clone(),
                announce_host: host.clone(),
                announce_port: *port,
                data_dir: runtime.dir.join("external").join(pod),
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                metrics_listen: None,
                probe_interval: Duration::from_millis(runtime.probe_interval_ms),
                probe_timeout: Duration::from_secs(1),
                heartbeat_interval: Duration::from_secs(1),
                command_deadline: Duration::from_secs(10),
                shutdown_switchover_timeout: Duration::ZERO,
            };
            let mut stopped = stopped.clone();
            let pod = pod.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if let Err(err) = valkey_agent::run(config, shutdown).await {
                    warn!(pod = %pod, error = %err, "the agent for an external sentinel stopped");
                }
            })
        })
        .collect();
    (stop, tasks)
}
