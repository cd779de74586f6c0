//! A seeded randomized fault soak of `local up`, as an operator's worst day would go: faults
//! drawn from a seed (kill -9 of the master, a replica, an agent or the controller; SIGSTOP of
//! the master; the master's data wiped before its restart; a planned switchover; a password
//! rotation; a sentinel killed), one at a time, each followed by a wait for the instance to
//! heal, while two writers (plain SET, and SET + WAIT, see [`wait_for`]) record every
//! acknowledgement and a monitor looks for two writable masters. After every fault the master
//! must hold every WAIT-acknowledged key; at the end: one master, every replica linked and equal
//! in key count, every WAIT-acknowledged key on every node, no round with two writable masters.
//! The test suite runs it for about 2 minutes per policy, `fault-soak` for longer.

use std::{
    fmt,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use valkey_controller::local::control::Status;

use crate::{
    local::{LocalInstance, Writer, alive, missing_with_prefix, signal},
    monitor::Monitor,
};

/// How long the instance may take to heal after one fault.
const HEAL: Duration = Duration::from_secs(90);

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    KillMaster,
    KillReplica,
    KillAgent,
    KillController,
    StopMaster,
    WipeMaster,
    Switchover,
    RotatePassword,
    KillSentinel,
}

impl Fault {
    /// The faults that apply to a policy.
    fn menu(sentinel: bool) -> Vec<Fault> {
        let mut all = vec![
            Fault::KillMaster,
            Fault::KillReplica,
            Fault::KillAgent,
            Fault::KillController,
            Fault::StopMaster,
            Fault::WipeMaster,
            Fault::Switchover,
            Fault::RotatePassword,
        ];
        if sentinel {
            all.push(Fault::KillSentinel);
        }
        all
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillMaster => "kill -9 master",
            Fault::KillReplica => "kill -9 replica",
            Fault::KillAgent => "kill -9 agent",
            Fault::KillController => "kill -9 controller",
            Fault::StopMaster => "SIGSTOP master",
            Fault::WipeMaster => "wipe + kill master",
            Fault::Switchover => "planned switchover",
            Fault::RotatePassword => "password rotation",
            Fault::KillSentinel => "kill -9 sentinel",
        })
    }
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Soak {
    pub sentinel: bool,
    pub seed: u64,
    pub duration: Duration,
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Each fault, and how long the instance took to heal from it.
    pub faults: Vec<(Fault, Duration)>,
    pub acked_waited: usize,
    pub acked_plain: usize,
    /// WAIT-acknowledged keys missing at the end (must be 0).
    pub lost_waited: usize,
    /// Plain-acknowledged keys missing at the end (asynchronous replication may lose a few on a
    /// crash: counted, not a problem).
    pub lost_plain: usize,
    pub double_master_rounds: u64,
    /// Everything that went wrong, each with the fault it followed; empty on success.
    pub problems: Vec<String>,
}

/// The manifest for a policy: three nodes; under policy sentinel three sentinels with
/// down-after-milliseconds 5000, so that a hung master is failed over within a fault's time.
pub fn manifest(sentinel: bool) -> String {
    let sentinel = if sentinel {
        "  sentinel:\n    replicas: 3\n    monitorConfig:\n      down-after-milliseconds: \"5000\"\n"
    } else {
        ""
    };
    format!(
        "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: soak\n  namespace: e2e\nspec:\n  replicas: 3\n{sentinel}"
    )
}

/// How many replicas a write must reach before it counts as acknowledged (WAIT n). Under
/// policy manual, one: the controller promotes the replica with the highest final offset.
/// Under policy sentinel, every replica, although a crash now keeps a `WAIT 1` write (the
/// controller steers Sentinel to that replica; `a_master_killed_right_after_bootstrap_*` and
/// failover-bench check it): a hung master resumed while Sentinel has not yet pointed the other
/// replica at the new one can still have a `WAIT 1` write acknowledged by that replica and
/// then lost (this soak caught it once in six runs; docs/failover.md, "Not covered").
pub fn wait_for(sentinel: bool) -> i64 {
    if sentinel { 2 } else { 1 }
}

/// The seed from `FAULT_SEED`, or a fresh one.
pub fn seed_from_env() -> u64 {
    std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// Healthy: one master, every other node its replica with the link up, every agent connected
/// and every process up; under policy sentinel every sentinel connected, naming it, and knowing
/// both replicas (Sentinel learns them from the master's INFO, every 10 s, and can promote no
/// replica it does not know).
pub fn healthy(status: &Status, sentinel: bool) -> bool {
    let Some(master) = status.master.as_deref() else {
        return false;
    };
    let nodes_ok = status.nodes.len() == 3
        && status
            .nodes
            .iter()
            .all(|n| n.connected && n.process == "up")
        && status.nodes.iter().all(|n| {
            if n.pod == master {
                n.role == "master"
            } else {
                n.role == "replica" && n.link == "up"
            }
        });
    let sentinels_ok = !sentinel
        || (status.monitor.nodes.len() == 3
            && status.monitor.nodes.iter().all(|s| {
                s.connected
                    && s.master.is_some()
                    && s.master.as_deref() == status.master_addr.as_deref()
                    && s.replicas == Some(2)
            }));
    nodes_ok && sentinels_ok
}

struct Run {
    instance: LocalInstance,
    sentinel: bool,
    rng: StdRng,
}

impl Run {
    async fn status(&self) -> Option<Status> {
        self.instance.try_status().await
    }

    /// Waits until the instance is healthy again.
    async fn heal(&self, timeout: Duration) -> Result<Status, String> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(status) = self.status().await {
                if healthy(&status, self.sentinel) {
                    return Ok(status);
                }
                last = Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "not healthy within {timeout:?}; last status:\n{}",
            last.as_ref()
                .map(valkey_controller::local::control::render)
                .unwrap_or_else(|| "none (the controller does not answer)".into())
        ))
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.rng.random_range(0..items.len())])
    }

    /// Waits until the master is another node than `old`, for at most `timeout`.
    async fn master_moved(&self, old: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .status()
                .await
                .is_some_and(|s| s.master.as_deref().is_some_and(|m| m != old))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits until the runtime has restarted the process whose pid `pid_of` reads (its pid
    /// differs from `old`), so that no status from before the fault passes for healed.
    async fn restarted(
        &self,
        what: &str,
        old: Option<u32>,
        pid_of: impl Fn(&Status) -> Option<u32>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.status().await
                && pid_of(&status).is_some_and(|pid| Some(pid) != old)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("{what} was not restarted within 30 s"))
    }

    /// Does `fault` to a healthy instance whose status is `status`.
    async fn inject(&mut self, fault: Fault, status: &Status) -> Result<(), String> {
        let master = status.master.clone().ok_or("no master")?;
        let node = |pod: &str| status.nodes.iter().find(|n| n.pod == pod);
        let master_node = node(&master).ok_or("no master node")?;
        let replicas: Vec<_> = status.nodes.iter().filter(|n| n.pod != master).collect();
        let valkey_of = |pod: String| {
            move |s: &Status| {
                s.nodes
                    .iter()
                    .find(|n| n.pod == pod)
                    .and_then(|n| n.valkey_pid)
            }
        };
        let agent_of = |pod: String| {
            move |s: &Status| {
                s.nodes
                    .iter()
                    .find(|n| n.pod == pod)
                    .and_then(|n| n.agent_pid)
            }
        };
        match fault {
            Fault::KillMaster => {
                kill(master_node.valkey_pid, Signal::SIGKILL);
                self.restarted(&master, master_node.valkey_pid, valkey_of(master.clone()))
                    .await?;
            }
            Fault::KillReplica => {
                let replica = *self.pick(&replicas).ok_or("no replica")?;
                kill(replica.valkey_pid, Signal::SIGKILL);
                self.restarted(
                    &replica.pod,
                    replica.valkey_pid,
                    valkey_of(replica.pod.clone()),
                )
                .await?;
            }
            Fault::KillAgent => {
                let all: Vec<_> = status.nodes.iter().collect();
                let victim = *self.pick(&all).ok_or("no node")?;
                kill(victim.agent_pid, Signal::SIGKILL);
                self.restarted(&victim.pod, victim.agent_pid, agent_of(victim.pod.clone()))
                    .await?;
            }
            Fault::KillController => {
                let pids: Vec<u32> = status.nodes.iter().filter_map(|n| n.valkey_pid).collect();
                self.instance.kill9();
                // Its children die with it (PR_SET_PDEATHSIG); start again once they are gone.
                let deadline = Instant::now() + Duration::from_secs(10);
                while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.instance.start();
            }
            Fault::StopMaster => {
                let pid = master_node.valkey_pid.ok_or("no master pid")?;
                signal(pid, Signal::SIGSTOP);
                let moved = self.master_moved(&master, Duration::from_secs(30)).await;
                signal(pid, Signal::SIGCONT);
                if !moved {
                    return Err("a hung master was not failed over within 30 s".into());
                }
            }
            Fault::WipeMaster => {
                self.instance.kill_and_wipe(master_node);
                self.restarted(&master, master_node.valkey_pid, valkey_of(master.clone()))
                    .await?;
            }
            Fault::Switchover => {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let reply = self.instance.switchover(None).await;
                    if reply.ok {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(format!("switchover refused for 30 s: {}", reply.message));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if !self.master_moved(&master, Duration::from_secs(30)).await {
                    return Err("the switchover did not move the master within 30 s".into());
                }
            }
            Fault::RotatePassword => {
                self.instance.rotate_password().await;
            }
            Fault::KillSentinel => {
                let pids: Vec<u32> = status
                    .monitor
                    .nodes
                    .iter()
                    .filter_map(|s| s.sentinel_pid)
                    .collect();
                let pid = self.pick(&pids).copied().ok_or("no sentinel pid")?;
                let pod = status
                    .monitor
                    .nodes
                    .iter()
                    .find(|s| s.sentinel_pid == Some(pid))
                    .map(|s| s.pod.clone())
                    .unwrap_or_default();
                kill(Some(pid), Signal::SIGKILL);
                let what = format!("sentinel {pod}");
                self.restarted(&what, Some(pid), move |s: &Status| {
                    s.monitor
                        .nodes
                        .iter()
                        .find(|n| n.pod == pod)
                        .and_then(|n| n.sentinel_pid)
                })
                .await?;
            }
        }
        Ok(())
    }
}

fn kill(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid.filter(|p| alive(*p)) {
        signal(pid, sig);
    }
}

/// Key counts of every node, once they agree (replication caught up), within `timeout`.
async fn equal_key_counts(run: &Run, timeout: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        if let Some(status) = run.status().await {
            let mut counts = Vec::new();
            for n in &status.nodes {
                let mut conn = run.instance.conn(&n.addr).await;
                let keys: redis::RedisResult<u64> =
                    redis::cmd("DBSIZE").query_async(&mut conn).await;
                counts.push((n.pod.clone(), keys.unwrap_or(u64::MAX)));
            }
            if counts.windows(2).all(|w| w[0].1 == w[1].1) && counts[0].1 != u64::MAX {
                return Ok(counts[0].1);
            }
            last = counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("key counts never agreed: {last:?}"))
}

/// Runs the soak and reports what it saw; `problems` is empty on success. The instance is
/// handed back still running, so that a caller that fails on a problem prints its logs.
// One soak, its phases read top to bottom.
#[allow(clippy::too_many_lines)]
pub async fn run(soak: Soak) -> (Outcome, LocalInstance) {
    let mut outcome = Outcome::default();
    let mut run = Run {
        instance: LocalInstance::up(&manifest(soak.sentinel)),
        sentinel: soak.sentinel,
        rng: StdRng::seed_from_u64(soak.seed),
    };
    let status = match run.heal(HEAL).await {
        Ok(status) => status,
        Err(err) => {
            outcome.problems.push(format!("bootstrap: {err}"));
            return (outcome, run.instance);
        }
    };
    let dir = run.instance.dir.clone();
    let monitor_dir = dir.clone();
    let client_for = move |addr: &str| {
        let password = std::fs::read_to_string(monitor_dir.join("password")).unwrap_or_default();
        crate::local::valkey_client(&monitor_dir, addr, password.trim())
    };
    let nodes = status.nodes.iter().map(|n| n.addr.clone()).collect();
    let monitor = Monitor::start(nodes, client_for);
    let pace = Duration::from_millis(2);
    let waited = Writer::start_paced(dir.clone(), "a", wait_for(soak.sentinel), pace);
    let plain = Writer::start_paced(dir.clone(), "p", 0, pace);
    // Faults start once every node has reported holding written data: right after bootstrap
    // the controller's view of the replicas lags (see the issue-10 note), and a fault in that
    // window is a separate, known problem rather than what this soak looks for.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reported = run
            .status()
            .await
            .is_some_and(|s| s.nodes.len() == 3 && s.nodes.iter().all(|n| n.keys > 0));
        if reported {
            break;
        }
        if Instant::now() > deadline {
            outcome
                .problems
                .push("no node reported written data within 30 s of the first writes".into());
            return (outcome, run.instance);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let menu = Fault::menu(soak.sentinel);
    let started = Instant::now();
    let mut status = status;
    while started.elapsed() < soak.duration {
        let fault = *run.pick(&menu).unwrap_or(&Fault::KillMaster);
        let at = outcome.faults.len() + 1;
        let began = Instant::now();
        if let Err(err) = run.inject(fault, &status).await {
            outcome
                .problems
                .push(format!("fault {at} ({fault}): {err}"));
            break;
        }
        match run.heal(HEAL).await {
            Ok(healed) => status = healed,
            Err(err) => {
                outcome
                    .problems
                    .push(format!("after fault {at} ({fault}): {err}"));
                break;
            }
        }
        // Writes flow again through both writers before the next fault.
        let (w, p) = (waited.count(), plain.count());
        let deadline = Instant::now() + Duration::from_secs(30);
        while (waited.count() < w + 5 || plain.count() < p + 5) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if waited.count() < w + 5 || plain.count() < p + 5 {
            outcome.problems.push(format!(
                "after fault {at} ({fault}): writes did not resume within 30 s"
            ));
            break;
        }
        // Every key WAIT-acknowledged so far is on the master now.
        let acked = waited.acked();
        let master = status.master_addr.clone().unwrap_or_default();
        let lost = missing_with_prefix(&run.instance, &master, "a", &acked).await;
        if !lost.is_empty() {
            outcome.problems.push(format!(
                "after fault {at} ({fault}): the master lacks {} WAIT-acknowledged keys: {:?}",
                lost.len(),
                &lost[..lost.len().min(10)]
            ));
            break;
        }
        outcome.faults.push((fault, began.elapsed()));
    }
    let waited = waited.finish().await;
    let plain = plain.finish().await;
    outcome.double_master_rounds = monitor.finish().await;
    outcome.acked_waited = waited.len();
    outcome.acked_plain = plain.len();
    if outcome.double_master_rounds > 0 {
        outcome.problems.push(format!(
            "{} rounds with two writable masters",
            outcome.double_master_rounds
        ));
    }
    let status = match run.heal(HEAL).await {
        Ok(status) => status,
        Err(err) => {
            outcome.problems.push(format!("at the end: {err}"));
            return (outcome, run.instance);
        }
    };
    if let Err(err) = equal_key_counts(&run, Duration::from_secs(30)).await {
        outcome.problems.push(format!("at the end: {err}"));
    }
    for node in &status.nodes {
        let lost = missing_with_prefix(&run.instance, &node.addr, "a", &waited).await;
        if !lost.is_empty() {
            outcome.problems.push(format!(
                "{} lacks {} WAIT-acknowledged keys (first: a{})",
                node.pod,
                lost.len(),
                lost[0]
            ));
        }
        outcome.lost_waited = outcome.lost_waited.max(lost.len());
    }
    let master_addr = status.master_addr.clone().unwrap_or_default();
    outcome.lost_plain = missing_with_prefix(&run.instance, &master_addr, "p", &plain)
        .await
        .len();
    (outcome, run.instance)
}
