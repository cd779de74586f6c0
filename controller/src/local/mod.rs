//! The local runtime: `valkey-controller local up -f <failover.yaml>` runs the failover core
//! and the agent hub in-process and stands in for the kubelet, with every node's data, logs
//! and the controller's durable state in one working directory.

mod auth;
pub mod conf;
pub mod control;
pub mod hosts;
mod ports;
mod prepare;
mod procs;
mod rotation;
mod state;
pub mod supervisor;
mod tls;
mod workdir;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tracing::{error, info, warn};
use valkey_proto::v1::NodeKind;

pub use crate::files::write_atomic;
use crate::{
    decide::model::Desired,
    decide::sentinel::SentinelDesired,
    driver::{Driver, StoreError, SwitchoverSource, Target},
    hub::{Hub, HubEvent, InstanceKey},
    manifest::{Manifest, ManifestError},
};
use conf::old_password_path;
use ports::Registry;
use prepare::prepare;
use rotation::{maybe_rotate_sentinel_password, start_rotation};
pub use state::{LocalState, NodePorts, default_dir};
use state::{StateFile, pod_name, random_secret, secret_file};
use supervisor::{Supervised, port_in_use, sibling_or_path, which};

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
    #[error(
        "--dir: {path} is {why} (uid {owner}): local up keeps passwords there; remove it, or choose a --dir of your own"
    )]
    UnsafeDir {
        path: PathBuf,
        owner: u32,
        why: &'static str,
    },
    #[error(transparent)]
    Spawn(#[from] supervisor::SpawnError),
    #[error(transparent)]
    Persist(#[from] StoreError),
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
    /// Lifetime of the certificates the runtime issues (renewed at two thirds of it).
    pub cert_lifetime: Duration,
    /// Where each node runs (loopback unless `--netns`).
    pub hosts: hosts::Hosts,
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
    /// The pods whose agents the hub admits (kept by `start_missing`).
    pods: auth::Pods,
    hosts: hosts::Hosts,
    probe_interval_ms: u64,
    procs: BTreeMap<String, NodeProcs>,
    /// The hot path; `state.durable` mirrors its durable state after every pass.
    driver: Driver,
    /// Policy sentinel: how Sentinel watches this instance.
    sentinel: Option<SentinelDesired>,
    /// valkey-sentinel, for embedded sentinels.
    sentinel_bin: Option<PathBuf>,
    /// An external Sentinel set's sentinels, each with an agent in this process.
    external: Vec<crate::external::ExternalNode>,
    /// How the external set is reached over TLS (`sentinelReference.auth.tlsSecret`).
    external_tls: Option<valkey_agent::config::ValkeyTls>,
    /// The sentinels' password in force, read by their agents: for embedded sentinels the
    /// controller's copy (`sentinel-password`) that follows the Secret through a rotation; for
    /// an external set the Secret itself.
    sentinel_password_file: Option<PathBuf>,
    /// Embedded sentinels with a password: the Secret's name and file
    /// (`<dir>/secrets/<name>/password`), the password wanted.
    sentinel_secret: Option<(String, PathBuf)>,
    /// The CA in `<dir>/tls/`, the hub's certificate, and the instance's when TLS is on.
    tls: tls::LocalTls,
    /// Sentinels restarting one at a time to load a renewed certificate.
    sentinel_roll: tls::SentinelRoll,
}

impl Runtime {
    /// What a driver pass needs: the driver, the state file, and what it works towards.
    fn hot_parts(&mut self) -> (&mut Driver, StateFile<'_>, Target<'_>) {
        let store = StateFile {
            path: &self.state_path,
            state: &self.state,
        };
        let target = Target {
            desired: &self.desired,
            sentinel: self.sentinel.as_ref(),
        };
        (&mut self.driver, store, target)
    }

    fn node_dir(&self, pod: &str) -> PathBuf {
        self.dir.join("nodes").join(pod)
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
            (None, Some(generated)) => (generated.display().to_string(), generated),
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
                .map(|n| (n.pod.clone(), format!("{}:{}", n.host, n.port)));
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
                    .map(|(pod, ports)| {
                        (
                            pod.clone(),
                            format!("{}:{}", self.hosts.ip(pod), ports.valkey),
                        )
                    })
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
}

impl Runtime {
    /// Renews the certificates that are due, and restarts the embedded sentinels one at a time
    /// after a renewal of the instance's certificate (Sentinel cannot reload it).
    fn renew_certificates(&mut self, hub: &Hub) {
        match self.tls.renew_due() {
            Ok(true) if self.sentinel_bin.is_some() => {
                let pods: Vec<String> = self.state.sentinels.keys().cloned().collect();
                self.sentinel_roll.request(pods);
            }
            Ok(_) => {}
            Err(err) => warn!(error = %err, "cannot renew a certificate; retrying"),
        }
        // Every 100 ms tick: look at the sentinels only while a roll is under way.
        if self.sentinel_roll.is_idle() {
            return;
        }
        let observed = hub.observe_kind(&self.key, NodeKind::Sentinel);
        let procs = &self.procs;
        let step = self.sentinel_roll.step(
            |pod| procs.get(pod).and_then(|p| p.valkey.pid()),
            |pod| {
                observed
                    .get(pod)
                    .is_some_and(|o| o.connected && o.unhealthy_ms < 500)
            },
        );
        if let tls::RollStep::Restart(pod) = step
            && let Some(procs) = self.procs.get(&pod)
        {
            info!(pod = %pod, "restarting the sentinel to load the renewed certificate");
            procs.valkey.signal(nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// Shared between the loop and the tasks it spawns.
#[derive(Debug, Default)]
struct Flight {
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
    let mut runtime = prepare(&options).await?;
    let token = secret_file(&runtime.token_file)?;
    let auth = auth::LocalAuth::new(token.clone(), runtime.key.clone(), runtime.pods.clone());
    let (hub, mut hub_events) = Hub::new(auth, Duration::from_millis(500));
    let hub_at = format!("{}:0", runtime.hosts.hub());
    let listener = tokio::net::TcpListener::bind(&hub_at)
        .await
        .map_err(io("binding the hub on", Path::new(&hub_at)))?;
    runtime.hub_addr = listener
        .local_addr()
        .map_err(io("binding the hub on", Path::new(&hub_at)))?;
    // The hub speaks TLS only, with a certificate from the working dir's CA.
    let server_task = {
        let (hub, cert) = (hub.clone(), runtime.tls.hub.clone());
        tokio::spawn(async move {
            if let Err(err) = crate::hub::limits::serve(&hub, listener, cert).await {
                error!(error = %err, "the agent hub stopped");
            }
        })
    };
    let mut control_requests = control::serve(control::bind(&runtime.dir)?);

    runtime.start_missing().await?;
    let external_agents = start_external_agents(&runtime, &token);
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
    let mut retry = Backoff::default();

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.changed() => {}
            _ = tick.tick() => {
                runtime.tend();
                runtime.renew_certificates(&hub);
            }
            Some(event) = hub_events.recv() => match event {
                HubEvent::SwitchoverRequested { pod, .. } => runtime.driver.move_master_off(pod),
            },
            Some((request, reply_to)) = control_requests.recv() => {
                let reply = match request {
                    control::Request::Status => control::Reply::status(runtime.status(&hub)),
                    control::Request::Switchover { to } => match start_switchover(&mut runtime, &hub, to).await {
                        Ok(message) => control::Reply::ok(message),
                        Err(message) => control::Reply::error(message),
                    },
                    control::Request::RotatePassword => match start_rotation(&runtime, &hub, &flight) {
                        Ok(message) => control::Reply::ok(message),
                        Err(message) => control::Reply::error(message),
                    },
                };
                let _ = reply_to.send(reply);
            }
        }
        if retry.due() {
            match reconcile(&mut runtime, &hub, &flight).await {
                Ok(()) => retry.succeeded(),
                // A full disk or no file descriptor left: nothing was sent that the state
                // does not hold (it is written first), so the pass is tried again, later each
                // time, with every process left running.
                Err(err) => {
                    let wait = retry.failed();
                    error!(error = %err, retry_in_ms = wait.as_millis() as u64, "reconcile failed; retrying");
                }
            }
        }
        if started.elapsed() > Duration::from_millis(500) {
            printer.maybe_print(&runtime.status(&hub));
        }
    }
    info!("stopping every process");
    external_agents.stop(Duration::from_secs(3)).await;
    runtime.shutdown().await;
    server_task.abort();
    control::unbind(&runtime.dir);
    Ok(())
}

/// When a failed pass is tried again: 100 ms after the first failure, doubling up to 5 s.
#[derive(Debug, Default)]
struct Backoff {
    failed: Option<(Instant, Duration)>,
}

impl Backoff {
    fn due(&self) -> bool {
        self.failed.is_none_or(|(at, wait)| at.elapsed() >= wait)
    }

    fn failed(&mut self) -> Duration {
        let wait = self.failed.map_or(Duration::from_millis(100), |(_, wait)| {
            (wait * 2).min(Duration::from_secs(5))
        });
        self.failed = Some((Instant::now(), wait));
        wait
    }

    fn succeeded(&mut self) {
        self.failed = None;
    }
}

/// One pass of the shared hot path, then what only the local runtime does: restart processes,
/// rotate the sentinels' password, start and stop nodes.
async fn reconcile(
    runtime: &mut Runtime,
    hub: &Hub,
    flight: &Arc<Flight>,
) -> Result<(), LocalError> {
    let (driver, store, target) = runtime.hot_parts();
    let outcome = driver.pass(hub, &store, target, None).await?;
    runtime.state.durable = runtime.driver.durable().clone();
    for note in &outcome.new_notes {
        info!("{note}");
    }
    // SIGTERM (the AOF is flushed); the restart generates its config with the password in
    // force.
    for pod in &outcome.restarts {
        if let Some(procs) = runtime.procs.get(pod) {
            warn!(pod = %pod, "its Valkey refuses the instance password; restarting it");
            procs.valkey.signal(Signal::SIGTERM);
        }
    }
    if let Some((SwitchoverSource::Needed, Err(why))) = &outcome.switchover {
        // Retried on the next pass until a replica is in sync.
        tracing::debug!("switchover not started yet: {why}");
    }
    maybe_rotate_sentinel_password(runtime, hub, flight);
    runtime.start_missing().await?;
    runtime.stop_retiring().await?;
    Ok(())
}

/// A switchover asked for on the control socket.
async fn start_switchover(
    runtime: &mut Runtime,
    hub: &Hub,
    to: Option<String>,
) -> Result<String, String> {
    let (driver, store, target) = runtime.hot_parts();
    let started = driver.start_switchover(hub, &store, target, to).await;
    runtime.state.durable = runtime.driver.durable().clone();
    match started {
        Ok(started) => started.map_err(|why| why.to_string()),
        Err(err) => Err(format!("cannot persist the switchover: {err}")),
    }
}

/// Runs an agent, in this process, for each sentinel of an external set (which has no agents
/// of its own), so that the hub and the Sentinel core treat it like an embedded one.
fn start_external_agents(runtime: &Runtime, token: &str) -> crate::external::Agents {
    crate::external::Agents::start(&crate::external::Setup {
        key: runtime.key.clone(),
        nodes: runtime.external.clone(),
        username: None,
        sentinel_password_file: runtime.sentinel_password_file.clone(),
        instance_password_file: runtime.password_file.clone(),
        tls: runtime.external_tls.clone(),
        hub_addr: format!("https://{}", runtime.hub_addr),
        token: token.to_owned(),
        hub_ca_file: runtime.tls.ca_file.clone(),
        data_dir: runtime.dir.join("external"),
        probe_interval: Duration::from_millis(runtime.probe_interval_ms),
    })
}
