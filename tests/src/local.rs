//! Drives `valkey-controller local up` as a user would: a manifest file, a working dir, the
//! control socket for status and switchover, and real clients on the nodes' ports.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::sys::signal::Signal;
use tempfile::TempDir;
use valkey_controller::local::control::{self, Request, Status};

use crate::procs::Proc;

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

/// A running `local up`.
#[derive(Debug)]
pub struct LocalInstance {
    pub dir: PathBuf,
    pub manifest: PathBuf,
    proc: Option<Proc>,
    past: Vec<Proc>,
    extra: Vec<String>,
    // Last: dropped after the processes, so their logs can still be printed.
    _tmp: TempDir,
}

impl LocalInstance {
    pub fn up(manifest_yaml: &str) -> Self {
        Self::up_with(manifest_yaml, &[])
    }

    pub fn up_with(manifest_yaml: &str, extra: &[&str]) -> Self {
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
        };
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
        cmd.args(&self.extra);
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
            s.master.is_some()
                && s.nodes.len() == nodes
                && s.nodes.iter().filter(|n| n.role == "master").count() == 1
                && s.nodes
                    .iter()
                    .filter(|n| Some(&n.pod) != s.master.as_ref())
                    .all(|n| n.role == "replica" && n.link == "up")
                && s.nodes.iter().all(|n| n.connected && n.process == "up")
        })
        .await
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

    pub fn password(&self) -> String {
        std::fs::read_to_string(self.dir.join("password"))
            .expect("password file")
            .trim()
            .to_owned()
    }

    pub fn client(&self, addr: &str) -> redis::Client {
        redis::Client::open(format!("redis://:{}@{addr}/", self.password())).expect("client")
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

    pub fn node_dir(&self, pod: &str) -> PathBuf {
        self.dir.join("nodes").join(pod)
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
    }
}
