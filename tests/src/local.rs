//! Drives `valkey-controller local up` as a user would: a manifest file, a working dir, the
//! control socket for status and switchover, and real clients on the nodes' ports.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use redis::AsyncCommands;
use tempfile::TempDir;
use valkey_controller::local::control::{self, Request, Status};

use crate::{procs::Proc, wait_for};

const T: Duration = Duration::from_secs(30);

/// A manifest for a manual-policy instance named `demo` with `replicas` nodes.
pub fn manifest(replicas: u32) -> String {
    format!(
        "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\n  namespace: e2e\nspec:\n  replicas: {replicas}\n"
    )
}

/// A binary built beside the test binaries.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run cargo build --workspace first",
        path.display()
    );
    path
}

/// One master, `nodes` nodes, every other one a replica linked to it, every agent connected.
fn healthy(s: &Status, nodes: usize) -> bool {
    s.master.is_some()
        && s.nodes.len() == nodes
        && s.nodes.iter().filter(|n| n.role == "master").count() == 1
        && s.nodes
            .iter()
            .filter(|n| Some(&n.pod) != s.master.as_ref())
            .all(|n| n.role == "replica" && n.link == "up")
        && s.nodes.iter().all(|n| n.connected && n.process == "up")
}

/// A running `local up`.
#[derive(Debug)]
pub struct LocalInstance {
    pub dir: PathBuf,
    pub manifest: PathBuf,
    proc: Option<Proc>,
    past: Vec<Proc>,
    extra: Vec<String>,
    /// `RUST_LOG` of the controller and the agents it starts.
    log_level: String,
    /// The network namespace the controller runs in (see [`crate::netns`]).
    netns: Option<crate::netns::Host>,
    // Last: dropped after the processes, so their logs can still be printed.
    _tmp: TempDir,
}

impl LocalInstance {
    pub fn up(manifest_yaml: &str) -> Self {
        Self::up_with(manifest_yaml, &[])
    }

    /// Starts with `files` (paths relative to the working dir, and contents) written first,
    /// as a user would create Secrets.
    pub fn up_with_files(manifest_yaml: &str, files: &[(&str, &str)]) -> Self {
        Self::up_prepared(manifest_yaml, &[], files)
    }

    pub fn up_with(manifest_yaml: &str, extra: &[&str]) -> Self {
        Self::up_prepared(manifest_yaml, extra, &[])
    }

    /// Starts with `RUST_LOG=<level>` for the controller and every agent.
    pub fn up_logging(manifest_yaml: &str, level: &str) -> Self {
        Self::up_prepared_as(manifest_yaml, &[], &[], level)
    }

    fn up_prepared(manifest_yaml: &str, extra: &[&str], files: &[(&str, &str)]) -> Self {
        Self::up_prepared_as(manifest_yaml, extra, files, "info")
    }

    fn up_prepared_as(
        manifest_yaml: &str,
        extra: &[&str],
        files: &[(&str, &str)],
        log_level: &str,
    ) -> Self {
        Self::up_full(manifest_yaml, extra, files, log_level, None)
    }

    /// Starts the controller inside `host`'s network namespace, with `extra` flags (`--netns`
    /// for its nodes).
    pub fn up_in(manifest_yaml: &str, extra: &[String], host: &crate::netns::Host) -> Self {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let level = std::env::var("PARTITION_LOG").unwrap_or_else(|_| "info".into());
        Self::up_full(manifest_yaml, &extra, &[], &level, Some(host.clone()))
    }

    fn up_full(
        manifest_yaml: &str,
        extra: &[&str],
        files: &[(&str, &str)],
        log_level: &str,
        netns: Option<crate::netns::Host>,
    ) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("local-")
            .tempdir()
            .expect("temp dir");
        let manifest = tmp.path().join("failover.yaml");
        std::fs::write(&manifest, manifest_yaml).expect("write manifest");
        let mut instance = Self {
            dir: tmp.path().join("instance"),
            manifest,
            _tmp: tmp,
            proc: None,
            past: Vec::new(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            log_level: log_level.to_owned(),
            netns,
        };
        for (path, content) in files {
            let path = instance.dir.join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, content).expect("write file");
        }
        instance.start();
        instance
    }

    /// The command line, for tests that expect `local up` to refuse.
    pub fn command(manifest: &Path, dir: &Path) -> Command {
        let mut cmd = Command::new(bin("valkey-controller"));
        cmd.env("VALKEY_AGENT_BIN", bin("valkey-agent"))
            .env("RUST_LOG", "info")
            .args(["local", "up", "-f"])
            .arg(manifest)
            .arg("--dir")
            .arg(dir);
        cmd
    }

    pub fn start(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("instance dir");
        let mut cmd = Self::command(&self.manifest, &self.dir);
        cmd.args(&self.extra).env("RUST_LOG", &self.log_level);
        if let Some(host) = &self.netns {
            crate::netns::command_in(&mut cmd, host);
        }
        let log = self.dir.join(format!("controller.{}.log", self.past.len()));
        self.proc = Some(Proc::spawn("valkey-controller local up", &mut cmd, &log));
    }

    pub fn set_manifest(&self, yaml: &str) {
        std::fs::write(&self.manifest, yaml).expect("write manifest");
    }

    /// Ctrl-C, and wait for a clean exit.
    pub async fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.signal(Signal::SIGINT);
            let status = proc.wait_exit(Duration::from_secs(30)).await;
            assert!(
                status.is_some_and(|s| s.success()),
                "local up did not stop cleanly: {status:?}"
            );
            self.past.push(proc);
        }
    }

    /// kill -9 of the controller itself.
    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
            self.past.push(proc);
        }
    }

    pub async fn try_status(&self) -> Option<Status> {
        control::request(&self.dir, &Request::Status)
            .await
            .ok()?
            .status
    }

    /// Waits for a status that satisfies `check`.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(status) = self.try_status().await {
                if check(&status) {
                    return status;
                }
                last = Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last status:\n{}",
                    last.as_ref()
                        .map(control::render)
                        .unwrap_or_else(|| "none".into())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ready: a master, and every other node a replica with its link up.
    pub async fn wait_healthy(&self, nodes: usize, timeout: Duration) -> Status {
        self.wait_status("a master with in-sync replicas", timeout, |s| {
            healthy(s, nodes)
        })
        .await
    }

    /// [`LocalInstance::wait_healthy`], or None when it is not healthy within `timeout`.
    pub async fn try_healthy(&self, nodes: usize, timeout: Duration) -> Option<Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status().await
                && healthy(&status, nodes)
            {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn switchover(&self, to: Option<&str>) -> control::Reply {
        control::request(
            &self.dir,
            &Request::Switchover {
                to: to.map(str::to_owned),
            },
        )
        .await
        .expect("switchover request")
    }

    /// Asks for a password rotation and waits until it is over (the old password dropped).
    pub async fn rotate_password(&self) -> Status {
        let old = self.password();
        let reply = control::request(&self.dir, &Request::RotatePassword)
            .await
            .expect("rotate");
        assert!(reply.ok, "{}", reply.message);
        self.wait_status("the rotation to finish", T, |s| {
            s.nodes.iter().all(|n| n.connected)
                && !self.dir.join("password.old").exists()
                && self.password() != old
        })
        .await
    }

    pub fn password(&self) -> String {
        std::fs::read_to_string(self.dir.join("password"))
            .expect("password file")
            .trim()
            .to_owned()
    }

    /// The embedded sentinels' password: the one `local up` made (`<dir>/sentinel-password`),
    /// or the copy of their Secret. None for an external set.
    pub fn sentinel_password(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("sentinel-password"))
            .ok()
            .map(|p| p.trim().to_owned())
    }

    /// A client of one of the embedded sentinels, with their password.
    pub fn sentinel_client(&self, addr: &str) -> redis::Client {
        let auth = self
            .sentinel_password()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        client(&format!("redis://{auth}{addr}/"))
    }

    pub fn client(&self, addr: &str) -> redis::Client {
        valkey_client(&self.dir, addr, &self.password())
    }

    /// A connection that waits up to 10 s for a reply (WAIT can take a while).
    pub async fn conn(&self, addr: &str) -> redis::aio::MultiplexedConnection {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        self.client(addr)
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// Waits until `before`'s Valkey has been restarted (a new pid) and is back as a replica
    /// with its link up.
    pub async fn wait_replica_back(&self, before: &control::NodeStatus, what: &str) -> Status {
        self.wait_status(what, T, |s| {
            s.nodes.iter().any(|n| {
                n.pod == before.pod
                    && n.valkey_pid.is_some()
                    && n.valkey_pid != before.valkey_pid
                    && n.process == "up"
                    && n.role == "replica"
                    && n.link == "up"
            })
        })
        .await
    }

    /// Waits for a master other than `old`.
    pub async fn wait_new_master(&self, old: &str) -> Status {
        self.wait_status("a new master", T, |s| {
            s.master.as_deref().is_some_and(|m| m != old)
        })
        .await
    }

    pub fn node_dir(&self, pod: &str) -> PathBuf {
        self.dir.join("nodes").join(pod)
    }

    /// The whole pod dies (kill -9 of its agent and its Valkey) and its data is gone, before
    /// the runtime restarts it (1 s later): it comes back empty.
    pub fn kill_and_wipe(&self, node: &control::NodeStatus) {
        for pid in [node.agent_pid, node.valkey_pid].into_iter().flatten() {
            if alive(pid) {
                signal(pid, Signal::SIGKILL);
            }
        }
        let data = self.node_dir(&node.pod).join("appendonlydir");
        std::fs::remove_dir_all(&data).unwrap_or_else(|e| panic!("wiping {}: {e}", data.display()));
    }

    pub fn proc_mut(&mut self) -> Option<&mut Proc> {
        self.proc.as_mut()
    }
}

impl Drop for LocalInstance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.dir.join("logs");
            if let Ok(entries) = std::fs::read_dir(&logs) {
                for entry in entries.flatten() {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("----- {} -----", entry.path().display());
                    for line in &lines[lines.len().saturating_sub(60)..] {
                        eprintln!("{line}");
                    }
                }
            }
        }
        // The controller's own log is printed by Proc's drop; its children die with it.
        if std::thread::panicking() && std::env::var_os("VALKEY_E2E_KEEP").is_some() {
            // Keep the working dir (every log whole) for a look after the failure.
            let kept = std::mem::replace(&mut self._tmp, TempDir::new().expect("temp dir")).keep();
            eprintln!(
                "VALKEY_E2E_KEEP: the working dir is kept at {}",
                kept.display()
            );
        }
    }
}

/// A client of a node of the instance in `dir`: over TLS, verified against `<dir>/tls/ca.crt`,
/// when the instance serves TLS (its certificate is in `<dir>/tls/tls.crt`).
pub fn valkey_client(dir: &Path, addr: &str, password: &str) -> redis::Client {
    if !dir.join("tls").join("tls.crt").exists() {
        return client(&format!("redis://:{password}@{addr}/"));
    }
    tls_client(&dir.join("tls").join("ca.crt"), addr, Some(password))
}

/// Connection info with TCP_NODELAY, as common clients (redis-py, Jedis, Lettuce) set it.
fn nodelay(url: &str) -> redis::ConnectionInfo {
    use redis::IntoConnectionInfo;
    url.into_connection_info()
        .expect("connection info")
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
}

/// A client of `url` with TCP_NODELAY.
pub fn client(url: &str) -> redis::Client {
    redis::Client::open(nodelay(url)).expect("client")
}

/// A TLS client of `addr` that trusts the CA bundle in `ca_file` only.
pub fn tls_client(ca_file: &Path, addr: &str, password: Option<&str>) -> redis::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(ca_file).expect("read the CA bundle");
    let url = match password {
        Some(password) => format!("rediss://:{password}@{addr}/"),
        None => format!("rediss://{addr}/"),
    };
    redis::Client::build_with_tls(
        nodelay(&url),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        },
    )
    .expect("TLS client")
}

pub fn master_of(status: &Status) -> (String, String, u32) {
    let master = status.master.clone().expect("a master");
    let node = status
        .nodes
        .iter()
        .find(|n| n.pod == master)
        .expect("master node");
    (
        master,
        node.addr.clone(),
        node.valkey_pid.expect("master pid"),
    )
}

pub fn node<'a>(status: &'a Status, pod: &str) -> &'a control::NodeStatus {
    status.nodes.iter().find(|n| n.pod == pod).expect("node")
}

pub fn signal(pid: u32, signal: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), signal).expect("signal");
}

pub fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// Asserts that every node of `status` holds every key of `keys` (w<n>); `context` says when.
pub async fn assert_every_node_holds(
    instance: &LocalInstance,
    status: &Status,
    keys: &BTreeSet<u64>,
    context: &str,
) {
    for n in &status.nodes {
        assert_eq!(
            missing_on(instance, &n.addr, keys).await,
            Vec::<u64>::new(),
            "{context}: {} lost acknowledged keys",
            n.pod
        );
    }
}

/// The written keys (w<n>) missing on the node at `addr`.
pub async fn missing_on(instance: &LocalInstance, addr: &str, keys: &BTreeSet<u64>) -> Vec<u64> {
    missing_with_prefix(instance, addr, "w", keys).await
}

/// The written keys (`<prefix><n>`) missing on the node at `addr`.
pub async fn missing_with_prefix(
    instance: &LocalInstance,
    addr: &str,
    prefix: &str,
    keys: &BTreeSet<u64>,
) -> Vec<u64> {
    let names: Vec<String> = keys.iter().map(|k| format!("{prefix}{k}")).collect();
    // Sentinel kills every normal client of a node it sends REPLICAOF to, including one it
    // already follows (the leader of a failover does so until every replica is reconfigured):
    // a killed connection is looked up again on a new one, as any client would.
    let mut missing = None;
    for _ in 0..5 {
        let mut conn = instance.conn(addr).await;
        match try_missing_keys(&mut conn, &names).await {
            Ok(found) => {
                missing = Some(found);
                break;
            }
            Err(err) if err.is_connection_dropped() || err.is_io_error() => continue,
            Err(err) => panic!("EXISTS on {addr}: {err}"),
        }
    }
    let missing: BTreeSet<String> = missing
        .unwrap_or_else(|| panic!("EXISTS on {addr}: the connection was dropped 5 times"))
        .into_iter()
        .collect();
    keys.iter()
        .copied()
        .filter(|k| missing.contains(&format!("{prefix}{k}")))
        .collect()
}

/// [`missing_keys`], with the error.
pub async fn try_missing_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> redis::RedisResult<Vec<String>> {
    let mut missing = Vec::new();
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.exists(k);
        }
        let exists: Vec<bool> = pipe.query_async(conn).await?;
        missing.extend(
            chunk
                .iter()
                .zip(exists)
                .filter(|(_, e)| !e)
                .map(|(k, _)| k.clone()),
        );
    }
    Ok(missing)
}

/// The keys of `keys` that do not exist on the node behind `conn` (EXISTS, 1000 at a time).
pub async fn missing_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> Vec<String> {
    try_missing_keys(conn, keys).await.expect("EXISTS")
}

pub async fn write_n(instance: &LocalInstance, addr: &str, n: u64, replicas: i64) -> BTreeSet<u64> {
    let mut conn = instance.conn(addr).await;
    for i in 1..=n {
        let _: () = conn.set(format!("w{i}"), i).await.expect("SET");
    }
    let acks: i64 = redis::cmd("WAIT")
        .arg(replicas)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(acks, replicas);
    (1..=n).collect()
}

/// Asks for a switchover until it is accepted: right after a full sync the master may not
/// count the target online yet, and the controller says so.
pub async fn switchover_when_ready(instance: &LocalInstance, to: &str) {
    wait_for(
        &format!("a switchover to {to} to be accepted"),
        T,
        || async {
            let reply = instance.switchover(Some(to)).await;
            if !reply.ok {
                assert!(
                    reply.message.contains("not an in-sync replica"),
                    "{}",
                    reply.message
                );
            }
            reply.ok.then_some(())
        },
    )
    .await;
}

/// A client that keeps writing to whichever node the controller names master, as an
/// application following the routing would, and remembers every acknowledged write.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    acked_count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// `wait_replicas`: 0 counts a plain SET reply as the acknowledgement; 1 requires WAIT 1.
    /// Keys are `w<n>`.
    pub fn start(dir: PathBuf, wait_replicas: i64) -> Self {
        Self::start_paced(dir, "w", wait_replicas, Duration::ZERO)
    }

    /// Keys are `<prefix><n>`, one write at most every `pace`. The password is read from the
    /// working dir at every (re)connect, so the writer follows a rotation as a client that
    /// reads its Secret would.
    pub fn start_paced(
        dir: PathBuf,
        prefix: &'static str,
        wait_replicas: i64,
        pace: Duration,
    ) -> Self {
        let master = move || {
            let dir = dir.clone();
            async move {
                let status = control::request(&dir, &Request::Status)
                    .await
                    .ok()
                    .and_then(|r| r.status);
                let addr = status.and_then(|s| s.master_addr)?;
                let password = std::fs::read_to_string(dir.join("password"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                Some(valkey_client(&dir, &addr, &password))
            }
        };
        Self::following(master, prefix, wait_replicas, pace)
    }

    /// Writes to the master `master` names (a client for it), asked again at every
    /// (re)connect, as an application behind a Service or Sentinel would.
    pub fn following<F, Fut>(
        master: F,
        prefix: &'static str,
        wait_replicas: i64,
        pace: Duration,
    ) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Option<redis::Client>> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let acked_count = Arc::new(AtomicU64::new(0));
        let (stop_flag, acked_set, count) = (stop.clone(), acked.clone(), acked_count.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            let mut conn: Option<redis::aio::MultiplexedConnection> = None;
            while !stop_flag.load(Ordering::Relaxed) {
                if conn.is_none() {
                    let Some(client) = master().await else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(Duration::from_millis(500)))
                        .set_response_timeout(Some(Duration::from_millis(3000)));
                    match client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                    {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else {
                    continue;
                };
                i += 1;
                let set: redis::RedisResult<()> = c.set(format!("{prefix}{i}"), i).await;
                let acknowledged = match set {
                    Err(_) => false,
                    Ok(()) if wait_replicas == 0 => true,
                    Ok(()) => {
                        let acks: redis::RedisResult<i64> = redis::cmd("WAIT")
                            .arg(wait_replicas)
                            .arg(1000)
                            .query_async(c)
                            .await;
                        acks.is_ok_and(|n| n >= wait_replicas)
                    }
                };
                if acknowledged {
                    acked_set.lock().unwrap().insert(i);
                    count.fetch_add(1, Ordering::Relaxed);
                } else {
                    // Error or not acknowledged: look the master up again.
                    conn = None;
                }
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
        });
        Self {
            stop,
            acked,
            acked_count,
            task,
        }
    }

    /// The keys acknowledged so far.
    pub fn acked(&self) -> BTreeSet<u64> {
        self.acked.lock().unwrap().clone()
    }

    pub fn count(&self) -> u64 {
        self.acked_count.load(Ordering::Relaxed)
    }

    /// Waits for `more` further acknowledged writes.
    pub async fn wait_more(&self, more: u64) {
        let target = self.count() + more;
        wait_for(&format!("{more} more acknowledged writes"), T, || async {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    pub async fn finish(self) -> BTreeSet<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer task");
        self.acked.lock().unwrap().clone()
    }
}
