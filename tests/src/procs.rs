//! Real child processes for tests: valkey-server, valkey-sentinel and valkey-agent, each on a
//! free loopback port with its own dir, killed on drop (and when the test process dies), with
//! its log printed if the test is failing.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tempfile::TempDir;

use crate::free_port;

/// The password every test Valkey requires.
pub const PASSWORD: &str = "test-password-1";

/// One child process and its log file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `log`; the child is killed if this test
    /// process dies.
    #[allow(unsafe_code)]
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: set_pdeathsig is a single async-signal-safe prctl(2) call.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({:?}): {e}", cmd.get_program()));
        Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reaped: false,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        assert!(!self.reaped, "{} already exited", self.name);
        nix::sys::signal::kill(self.pid(), signal)
            .unwrap_or_else(|e| panic!("signal {signal} to {}: {e}", self.name));
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        self.reaped |= status.is_some();
        status
    }

    /// Waits (polling, so async tests keep running) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!("----- {} log ({}) -----", self.name, self.log.display());
            for line in tail {
                eprintln!("{line}");
            }
            eprintln!("----- end of {} log -----", self.name);
        }
    }
}

/// Blocks until something accepts TCP connections on `port`.
fn wait_listening(name: &str, port: u16, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Some(status) = proc.exited() {
            panic!(
                "{name} exited with {status} before listening:\n{}",
                proc.log_text()
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "{name} did not listen on {port} within 10s:\n{}",
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A real valkey-server on loopback, requiring [`PASSWORD`], with no persistence unless the
/// extra arguments ask for it.
#[derive(Debug)]
pub struct Valkey {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    extra: Vec<String>,
    /// A config read first (the arguments override what it says), written anew at every
    /// start, as a pod's start script does: what CONFIG REWRITE (Sentinel) left in the file
    /// is not trusted across a restart.
    conf: Option<String>,
    proc: Option<Proc>,
    past: Vec<Proc>,
    // Last: dropped after the processes, so their logs can still be printed.
    _tmp: TempDir,
}

impl Valkey {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Self {
        Self::start_at(name, free_port(), extra)
    }

    /// Starts on a given port.
    pub fn start_at(name: &str, port: u16, extra: &[&str]) -> Self {
        Self::start_conf(name, port, None, extra)
    }

    /// Starts on a given port with `conf` as its config file (written into its dir anew at
    /// every start), the harness's arguments overriding it: loopback, its own dir,
    /// [`PASSWORD`], no persistence.
    pub fn start_with_conf(name: &str, port: u16, conf: &str) -> Self {
        Self::start_conf(name, port, Some(conf), &[])
    }

    fn start_conf(name: &str, port: u16, conf: Option<&str>, extra: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("valkey-{name}-"))
            .tempdir()
            .expect("temp dir");
        std::fs::write(tmp.path().join("password"), PASSWORD).expect("write password file");
        let conf = conf.map(str::to_owned);
        let mut valkey = Self {
            name: name.to_owned(),
            port,
            dir: tmp.path().to_owned(),
            _tmp: tmp,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            conf,
            proc: None,
            past: Vec::new(),
        };
        valkey.spawn();
        valkey
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("valkey-server");
        if let Some(conf) = &self.conf {
            let path = self.dir.join("valkey.conf");
            std::fs::write(&path, conf).expect("write valkey.conf");
            cmd.arg(path);
        }
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--requirepass", PASSWORD, "--masterauth", PASSWORD])
            .args(["--save", "", "--appendonly", "no"])
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .args(&self.extra);
        let log = self.dir.join(format!("valkey.{}.log", self.past.len()));
        cmd.arg("--logfile").arg(&log);
        let mut proc = Proc::spawn(&format!("valkey {}", self.name), &mut cmd, &log);
        wait_listening(&self.name, self.port, &mut proc);
        self.proc = Some(proc);
    }

    pub fn host(&self) -> String {
        "127.0.0.1".to_owned()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn password_file(&self) -> PathBuf {
        self.dir.join("password")
    }

    pub fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("valkey is running")
    }

    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
            self.past.push(proc);
        }
    }

    /// Whether its process runs (it was not killed, and has not exited).
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// Starts again on the same port and dir (with no persistence: empty, unless an RDB was
    /// saved there and the extra arguments load it).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| (*s).to_owned()).collect();
        self.restart();
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{}/", self.port))
            .expect("client")
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to valkey {}: {e}", self.name))
    }

    /// INFO <section> as key/value pairs.
    pub async fn info(&self, section: &str) -> std::collections::HashMap<String, String> {
        let mut conn = self.conn().await;
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await
            .expect("INFO");
        text.lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// A real valkey-sentinel on loopback.
#[derive(Debug)]
pub struct Sentinel {
    pub port: u16,
    pub dir: PathBuf,
    proc: Option<Proc>,
    // Last: dropped after the process, so its log can still be printed.
    _tmp: TempDir,
}

impl Sentinel {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// A sentinel monitoring `name` at the master on `master_port` (with [`PASSWORD`]).
    pub fn monitoring(name: &str, master_port: u16, quorum: u32, down_after_ms: u64) -> Self {
        Self::start_with(&format!(
            "sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
             sentinel auth-pass {name} {PASSWORD}\n\
             sentinel down-after-milliseconds {name} {down_after_ms}\n\
             sentinel failover-timeout {name} 10000\n\
             sentinel parallel-syncs {name} 1\n"
        ))
    }

    fn start_with(extra_conf: &str) -> Self {
        Self::start_at_with(free_port(), extra_conf)
    }

    fn start_at_with(port: u16, extra_conf: &str) -> Self {
        Self::start_listening_at(port, |port| format!("port {port}\n"), extra_conf)
    }

    /// A sentinel with no password on a given port.
    pub fn start_at(port: u16) -> Self {
        Self::start_at_with(port, "")
    }

    /// [`Sentinel::with_password`] on a given port.
    pub fn with_password_at(port: u16, password: &str) -> Self {
        Self::start_at_with(port, &Self::password_conf(password))
    }

    /// A sentinel of an embedded set: it requires `password` of its clients and presents it
    /// to its peers, as the sentinel pod's start script sets it up.
    pub fn with_password(password: &str) -> Self {
        Self::start_with(&Self::password_conf(password))
    }

    fn password_conf(password: &str) -> String {
        format!("requirepass \"{password}\"\nsentinel sentinel-pass \"{password}\"\n")
    }

    /// Its process.
    pub fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("sentinel is running")
    }

    /// A sentinel speaking TLS only, as an external set run by someone else would: it serves
    /// `cert`, trusts `ca` (for its clients and for the nodes and peers it links to over TLS),
    /// and requires every client to present a certificate.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Self {
        Self::start_listening(
            |port| {
                format!(
                    "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-ca-cert-file {}\ntls-replication yes\ntls-auth-clients yes\n",
                    cert.display(),
                    key.display(),
                    ca.display()
                )
            },
            "",
        )
    }

    fn start_listening(listen: impl Fn(u16) -> String, extra_conf: &str) -> Self {
        Self::start_listening_at(free_port(), listen, extra_conf)
    }

    fn start_listening_at(port: u16, listen: impl Fn(u16) -> String, extra_conf: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("sentinel-")
            .tempdir()
            .expect("temp dir");
        let conf = format!(
            "{}bind 127.0.0.1\nprotected-mode no\ndir {}\nsentinel resolve-hostnames yes\n{extra_conf}",
            listen(port),
            tmp.path().display()
        );
        std::fs::write(tmp.path().join("sentinel.conf"), conf).expect("write sentinel.conf");
        let mut sentinel = Self {
            port,
            dir: tmp.path().to_owned(),
            _tmp: tmp,
            proc: None,
        };
        let mut cmd = Command::new("valkey-sentinel");
        cmd.arg(sentinel.dir.join("sentinel.conf"));
        let mut proc = Proc::spawn("sentinel", &mut cmd, &sentinel.dir.join("sentinel.log"));
        wait_listening("sentinel", port, &mut proc);
        sentinel.proc = Some(proc);
        sentinel
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).expect("client")
    }

    /// A client that logs in with `password`.
    pub fn client_with(&self, password: &str) -> redis::Client {
        redis::Client::open(format!("redis://:{password}@127.0.0.1:{}/", self.port))
            .expect("client")
    }
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    pub sentinel: bool,
    pub valkey_port: u16,
    pub password_file: Option<PathBuf>,
    pub controller: Option<String>,
    pub token_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub failover: String,
    pub pod: String,
    pub probe_interval_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub extra: Vec<String>,
}

impl AgentOpts {
    /// An agent for `valkey`, reporting to `controller` when given, with the token "t0ken".
    pub fn for_valkey(valkey: &Valkey, controller: Option<String>) -> Self {
        let token_file = valkey.dir.join("agent-token");
        std::fs::write(&token_file, "t0ken\n").expect("write token");
        Self {
            sentinel: false,
            valkey_port: valkey.port,
            password_file: Some(valkey.password_file()),
            controller,
            token_file: Some(token_file),
            data_dir: valkey.dir.join("agent"),
            failover: "demo".into(),
            pod: valkey.name.clone(),
            probe_interval_ms: 50,
            heartbeat_interval_ms: 500,
            extra: Vec::new(),
        }
    }
}

/// A real valkey-agent process.
#[derive(Debug)]
pub struct Agent {
    pub opts: AgentOpts,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    proc: Option<Proc>,
    past: Vec<Proc>,
}

/// The agent binary, built beside the test binaries (or named by VALKEY_AGENT_BIN).
pub fn agent_bin() -> PathBuf {
    if let Ok(path) = std::env::var("VALKEY_AGENT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // Test binaries live in target/<profile>/deps, bench binaries in target/<profile>.
    let mut profile_dir = exe.parent().expect("target dir");
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().expect("target dir");
    }
    let bin = profile_dir.join("valkey-agent");
    if !bin.exists() {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "valkey-agent", "--bin", "valkey-agent"]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building valkey-agent failed");
    }
    bin
}

impl Agent {
    pub fn start(opts: AgentOpts) -> Self {
        Self::start_at(opts, (free_port(), free_port()))
    }

    /// Starts with its gRPC and metrics servers on the given ports.
    pub fn start_at(opts: AgentOpts, (grpc, metrics): (u16, u16)) -> Self {
        let mut agent = Self {
            opts,
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
            proc: None,
            past: Vec::new(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let opts = &self.opts;
        let mut cmd = Command::new(agent_bin());
        cmd.env_clear()
            .env("RUST_LOG", "info,valkey_agent=debug")
            .arg("--mode")
            .arg(if opts.sentinel { "sentinel" } else { "data" })
            .arg("--valkey-addr")
            .arg(format!("127.0.0.1:{}", opts.valkey_port))
            .arg("--data-dir")
            .arg(&opts.data_dir)
            .arg("--listen")
            .arg(self.grpc.to_string())
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .arg("--failover")
            .arg(&opts.failover)
            .arg("--pod-name")
            .arg(&opts.pod)
            .arg("--probe-interval-ms")
            .arg(opts.probe_interval_ms.to_string())
            .arg("--heartbeat-interval-ms")
            .arg(opts.heartbeat_interval_ms.to_string())
            .args(["--probe-timeout-ms", "500", "--reconnect-max-ms", "500"]);
        if let Some(file) = &opts.password_file {
            cmd.arg("--valkey-password-file").arg(file);
        }
        if let Some(addr) = &opts.controller {
            cmd.arg("--controller-addr").arg(addr);
        }
        if let Some(file) = &opts.token_file {
            cmd.arg("--token-file").arg(file);
        }
        cmd.args(&opts.extra);
        std::fs::create_dir_all(&opts.data_dir).expect("agent data dir");
        let log = opts.data_dir.join(format!("agent.{}.log", self.past.len()));
        let mut proc = Proc::spawn(&format!("agent {}", opts.pod), &mut cmd, &log);
        wait_listening(&format!("agent {}", opts.pod), self.grpc.port(), &mut proc);
        self.proc = Some(proc);
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("agent is running")
    }

    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
            self.past.push(proc);
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn terminate(&self) {
        if let Some(proc) = &self.proc {
            proc.signal(Signal::SIGTERM);
        }
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// The grpc.health.v1 status of `service` ("" is liveness, "readiness" readiness).
    pub async fn health(
        &self,
        service: &str,
    ) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let response = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()?;
        Some(response.into_inner().status())
    }

    /// The agent's local state query.
    pub async fn state(&self) -> Option<valkey_proto::v1::StateReport> {
        let mut client = valkey_proto::v1::agent_state_client::AgentStateClient::connect(format!(
            "http://{}",
            self.grpc
        ))
        .await
        .ok()?;
        Some(
            client
                .get_state(valkey_proto::v1::GetStateRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    }

    pub async fn metrics_text(&self) -> String {
        crate::http_get(self.metrics, "/metrics")
            .await
            .unwrap_or_default()
    }
}
