//! Stands in for the kubelet: runs one valkey-server and one valkey-agent per node on
//! loopback, notices when they die so that the runtime restarts them (after a short delay, as
//! a kubelet would, with their config generated anew), and kills them with the runtime (also
//! when the runtime itself is killed hard).

use std::{
    os::unix::{fs::OpenOptionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tracing::{info, warn};

/// How long a dead process stays down before it is started again.
pub const RESTART_DELAY: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {what} ({program}): {source}")]
    Spawn {
        what: String,
        program: String,
        source: std::io::Error,
    },
    #[error("cannot open log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open network namespace {path} (--netns): {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One supervised process: how to start it, and its current child.
#[derive(Debug)]
pub struct Supervised {
    pub what: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    died_at: Option<Instant>,
    pub restarts: u32,
    /// Started in this network namespace (see [`super::hosts`]).
    netns: Option<PathBuf>,
}

impl Supervised {
    pub fn new(what: String, program: PathBuf, args: Vec<String>, log: PathBuf) -> Self {
        Self {
            what,
            program,
            args,
            log,
            child: None,
            died_at: None,
            restarts: 0,
            netns: None,
        }
    }

    /// Runs the process in a network namespace of its own (`None`: this one).
    pub fn in_netns(mut self, netns: Option<PathBuf>) -> Self {
        self.netns = netns;
        self
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process; it dies with this one (PR_SET_PDEATHSIG).
    #[allow(unsafe_code)]
    pub fn start(&mut self) -> Result<(), SpawnError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&self.log)
            .map_err(|source| SpawnError::Log {
                path: self.log.clone(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| SpawnError::Log {
            path: self.log.clone(),
            source,
        })?;
        let mut cmd = Command::new(&self.program);
        // Its own process group: a Ctrl-C in the terminal reaches the runtime only, which then
        // stops its children in order.
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let netns = match &self.netns {
            Some(path) => Some(
                super::hosts::open(path).map_err(|source| SpawnError::Netns {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        // SAFETY: the closure only makes async-signal-safe calls: prctl(2), and setns(2) on a
        // file opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                match &netns {
                    Some(file) => super::hosts::enter(file),
                    None => Ok(()),
                }
            });
        }
        let child = cmd.spawn().map_err(|source| SpawnError::Spawn {
            what: self.what.clone(),
            program: self.program.display().to_string(),
            source,
        })?;
        self.child = Some(child);
        self.died_at = None;
        Ok(())
    }

    /// Notices a death; the process is due for a restart [`RESTART_DELAY`] later.
    pub fn reap(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            warn!(what = %self.what, %status, "process exited; restarting it in {RESTART_DELAY:?}");
            self.child = None;
            self.died_at = Some(Instant::now());
        }
    }

    /// Dead for [`RESTART_DELAY`]: start it again now. The caller prepares what the start
    /// reads first (a config file generated anew), as a kubelet's start script would.
    pub fn due(&self) -> bool {
        self.child.is_none() && self.died_at.is_some_and(|t| t.elapsed() >= RESTART_DELAY)
    }

    /// Tries again after another [`RESTART_DELAY`].
    pub fn postpone(&mut self) {
        self.died_at = Some(Instant::now());
    }

    /// Starts a process that is due; a failed start is tried again later.
    pub fn restart(&mut self) {
        self.restarts += 1;
        match self.start() {
            Ok(()) => info!(what = %self.what, pid = ?self.pid(), "restarted"),
            Err(err) => {
                warn!(what = %self.what, error = %err, "restart failed");
                self.postpone();
            }
        }
    }

    /// Sends a signal without waiting: a process that exits on it is restarted like any
    /// other that died.
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// Sends a signal and waits up to `grace` for the exit, then kills.
    pub async fn stop(&mut self, signal: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The binary next to this one (valkey-agent beside valkey-controller), or from PATH.
pub fn sibling_or_path(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe().ok()?.parent()?.join(name);
    if beside.is_file() {
        return Some(beside);
    }
    which(name)
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether something already listens on 127.0.0.1:port.
pub fn port_in_use(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
}

pub fn log_path(dir: &Path, what: &str) -> PathBuf {
    dir.join("logs").join(format!("{what}.log"))
}
