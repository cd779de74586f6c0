//! Watches the local valkey-server or valkey-sentinel with frequent cheap probes over a
//! persistent connection, remembers what it saw (restarts, empty restarts), and publishes the
//! latest StateReport for the controller link, the health service and the state query.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{info, warn};
use valkey_proto::v1::{DataState, ProcessState, Role, SentinelState, StateReport};

use crate::{
    config::{Config, Mode},
    fence::Fence,
    health,
    info::{self, parse_info},
    metrics::Metrics,
    snapshot::{Shared, Snapshot, now_ms},
    valkey::{Valkey, ValkeyError},
};

/// What the watcher remembers between probes about the process's incarnations.
#[derive(Debug, Default)]
struct Memory {
    run_id: String,
    had_data: bool,
    restarted: bool,
    /// Set when an incarnation starts after one that held data; cleared once it holds data
    /// again or has synced from a master.
    prior_had_data: bool,
    restarts_seen: u32,
}

impl Memory {
    /// Folds one incarnation's run id and data into memory; true when the run id is new.
    fn observe(&mut self, run_id: &str, key_count: u64, synced_replica: bool) -> bool {
        let new_incarnation = !run_id.is_empty() && run_id != self.run_id;
        if new_incarnation {
            if !self.run_id.is_empty() {
                self.restarted = true;
                self.restarts_seen += 1;
                self.prior_had_data = self.had_data;
            }
            self.run_id = run_id.to_owned();
        }
        if key_count > 0 || synced_replica {
            self.prior_had_data = false;
        }
        if key_count > 0 {
            self.had_data = true;
        }
        new_incarnation
    }
}

#[derive(Debug)]
pub struct Watcher {
    config: Arc<Config>,
    local: Valkey,
    fence: Arc<Fence>,
    shared: Arc<Shared>,
    metrics: Metrics,
    tx: watch::Sender<Arc<Snapshot>>,
    memory: Memory,
    last_up: Instant,
    last_data: Option<DataState>,
    last_sentinel: Option<SentinelState>,
    /// The sentinel incarnation (run id) whose INFO period this agent set.
    tuned: String,
    last_significant: StateReport,
    last_steady: StateReport,
    last_process: ProcessState,
    last_role: i32,
}

impl Watcher {
    pub fn new(
        config: Arc<Config>,
        fence: Arc<Fence>,
        shared: Arc<Shared>,
        metrics: Metrics,
    ) -> Result<(Self, watch::Receiver<Arc<Snapshot>>), ValkeyError> {
        let local = Valkey::new(&config, config.probe_timeout)?;
        let durable = fence.get().unwrap_or_default();
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let watcher = Self {
            memory: Memory {
                run_id: durable.run_id,
                had_data: durable.had_data,
                ..Memory::default()
            },
            config,
            local,
            fence,
            shared,
            metrics,
            tx,
            last_up: Instant::now(),
            last_data: None,
            last_sentinel: None,
            tuned: String::new(),
            last_significant: StateReport::default(),
            last_steady: StateReport::default(),
            last_process: ProcessState::Unspecified,
            last_role: -1,
        };
        Ok((watcher, rx))
    }

    /// Probes forever, every probe interval, or at once when asked.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shared.probe_now.notified() => {}
            }
            self.probe_once().await;
        }
    }

    /// One probe, published.
    pub async fn probe_once(&mut self) {
        let started = Instant::now();
        let outcome = match self.config.mode {
            Mode::Data => self.probe_data().await.map(|d| (Some(d), None)),
            Mode::Sentinel => self.probe_sentinel().await.map(|s| (None, Some(s))),
        };
        let latency = started.elapsed();
        let (process, error) = match outcome {
            Ok((data, sentinel)) => {
                self.metrics.probe_latency.observe(latency.as_secs_f64());
                self.last_up = Instant::now();
                if data.is_some() {
                    self.last_data = data;
                }
                if sentinel.is_some() {
                    self.last_sentinel = sentinel;
                }
                (ProcessState::Up, String::new())
            }
            Err(err) => {
                self.metrics.probe_failures.inc();
                (err.process_state(), err.to_string())
            }
        };
        self.publish(process, error, latency);
    }

    async fn probe_data(&mut self) -> Result<DataState, ValkeyError> {
        let mut pipe = redis::pipe();
        pipe.cmd("INFO")
            .arg("server")
            .arg("replication")
            .arg("keyspace")
            .arg("persistence")
            .cmd("CONFIG")
            .arg("GET")
            .arg("min-replicas-to-write")
            .arg("min-replicas-max-lag")
            .arg("replica-priority")
            .arg("replica-announce-ip")
            .arg("replica-announce-port");
        let (text, config): (String, HashMap<String, String>) = self.local.pipe(&pipe).await?;
        let mut data = info::data_state(&parse_info(&text), &config);
        let synced_replica =
            data.role() == Role::Replica && data.master_link_up && !data.master_sync_in_progress;
        let memory = &mut self.memory;
        if memory.observe(&data.run_id, data.key_count, synced_replica) && memory.restarted {
            info!(
                run_id = %data.run_id,
                keys = data.key_count,
                had_data = memory.prior_had_data,
                "local valkey restarted"
            );
        }
        data.restarted = memory.restarted;
        data.restarts_seen = memory.restarts_seen;
        // While loading, the key count is not known yet: claim neither.
        let empty = data.key_count == 0 && !data.loading;
        data.restarted_empty = memory.restarted && memory.prior_had_data && empty;
        data.never_synced = !memory.had_data && empty && data.repl_offset <= 0 && !synced_replica;
        data.master_close_heard = data.role() == Role::Replica
            && !data.master_link_up
            && self
                .shared
                .master_close_heard(&data.master_host, data.master_port);
        data.writes_paused = self.shared.writes_paused();
        data.fenced = self.shared.lease.fenced();
        if let Err(err) = self.fence.remember(&memory.run_id, memory.had_data) {
            warn!(error = %err, "cannot persist what the agent knows of its valkey");
        }
        Ok(data)
    }

    async fn probe_sentinel(&mut self) -> Result<SentinelState, ValkeyError> {
        let text: String = self.local.query(redis::cmd("INFO").arg("server")).await?;
        let info = parse_info(&text);
        let masters: Vec<HashMap<String, String>> = self
            .local
            .query(redis::cmd("SENTINEL").arg("MASTERS"))
            .await?;
        let mut state = SentinelState {
            run_id: info
                .get("run_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            uptime_s: info
                .get("uptime_in_seconds")
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or_default(),
            version: info
                .get("valkey_version")
                .or_else(|| info.get("redis_version"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            ..SentinelState::default()
        };
        if !masters.is_empty() {
            // Per master: its replicas, its sentinels, and the address clients are given
            // (once a failover has promoted its replica, that replica's, while SENTINEL
            // MASTERS still shows the old one until the end).
            let mut pipe = redis::pipe();
            for master in &masters {
                let name = master.get("name").map(String::as_str).unwrap_or_default();
                pipe.cmd("SENTINEL").arg("REPLICAS").arg(name);
                pipe.cmd("SENTINEL").arg("SENTINELS").arg(name);
                pipe.cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(name);
            }
            let replies: Vec<redis::Value> = self.local.pipe(&pipe).await?;
            for (master, reply) in masters.iter().zip(replies.chunks(3)) {
                let [replicas, sentinels, current] = reply else {
                    break;
                };
                let replicas: Vec<HashMap<String, String>> = parse(replicas)?;
                let sentinels: Vec<HashMap<String, String>> = parse(sentinels)?;
                let mut seen = info::sentinel_master(master, &replicas, &sentinels);
                if let Some((host, port)) = parse::<Option<(String, u32)>>(current)? {
                    seen.host = host;
                    seen.port = port;
                }
                state.masters.push(seen);
            }
        }
        let announce: Vec<HashMap<String, String>> = self
            .local
            .pipe(
                redis::pipe()
                    .cmd("SENTINEL")
                    .arg("CONFIG")
                    .arg("GET")
                    .arg("announce-ip")
                    .cmd("SENTINEL")
                    .arg("CONFIG")
                    .arg("GET")
                    .arg("announce-port"),
            )
            .await?;
        for setting in announce {
            if let Some(ip) = setting.get("announce-ip") {
                state.announce_ip.clone_from(ip);
            }
            if let Some(port) = setting.get("announce-port") {
                state.announce_port = port.parse().unwrap_or_default();
            }
        }
        self.memory.observe(&state.run_id, 0, false);
        state.restarted = self.memory.restarted;
        if self.tuned != state.run_id
            && let Some(period) = self.config.sentinel_info_period
        {
            // A Sentinel that refuses it (an older one, a renamed command) still works, at
            // its own pace: said once, not a probe failure.
            if let Err(err) = self.tune_sentinel(period).await {
                warn!(error = %err, "cannot set the sentinel's INFO period; it keeps its own");
            }
            self.tuned.clone_from(&state.run_id);
        }
        Ok(state)
    }

    /// Sentinel refreshes its replicas' INFO every 10 s by default, and chooses the replica
    /// to promote, and learns new replicas, from it: with a second, the controller's choice
    /// of replica (steered by replica-priority) is seen within a second, and so is a new
    /// instance's replica. It is a runtime setting, so it is set again for each incarnation.
    async fn tune_sentinel(&mut self, period: Duration) -> Result<(), ValkeyError> {
        let ms = period.as_millis() as u64;
        let _: String = self
            .local
            .query(
                redis::cmd("SENTINEL")
                    .arg("DEBUG")
                    .arg("INFO-PERIOD")
                    .arg(ms),
            )
            .await?;
        info!(info_period_ms = ms, "sentinel INFO period set");
        Ok(())
    }

    fn publish(&mut self, process: ProcessState, error: String, latency: Duration) {
        let up = process == ProcessState::Up;
        let mut health = health::assess(process, self.last_data.as_ref().filter(|_| up));
        // It answered, but not our probe (or a data node's state was never read): alive, but
        // nothing says it serves.
        if up && (!error.is_empty() || (self.config.mode == Mode::Data && self.last_data.is_none()))
        {
            health.ready = false;
            health.reason = format!("cannot read the local state: {error}");
        }
        let report = StateReport {
            seq: 0,
            observed_at_ms: now_ms(),
            process: process.into(),
            process_error: error,
            down_for_ms: if up {
                0
            } else {
                self.last_up.elapsed().as_millis() as u64
            },
            probe_latency_us: if up { latency.as_micros() as u64 } else { 0 },
            epoch: self.fence.epoch(),
            health: Some(health),
            data: self.last_data.clone(),
            sentinel: self.last_sentinel.clone(),
            // Stamped by the link when sent.
            lease_request_ms: 0,
        };
        self.note_transitions(&report);
        let significant = significant_view(&report);
        let steady = steady_view(&report);
        let significant_changed = significant != self.last_significant;
        let changed = steady != self.last_steady;
        if significant_changed {
            self.last_significant = significant;
        }
        if changed {
            self.last_steady = steady;
        }
        self.tx.send_if_modified(|snapshot| {
            *snapshot = Arc::new(Snapshot {
                report,
                significant: snapshot.significant + u64::from(significant_changed),
                revision: snapshot.revision + u64::from(changed),
            });
            changed
        });
    }

    fn note_transitions(&mut self, report: &StateReport) {
        let process = report.process();
        if process != self.last_process {
            match process {
                ProcessState::Up => info!(addr = %self.addr(), "local process answers"),
                _ => {
                    warn!(addr = %self.addr(), state = ?process, error = %report.process_error, "local process is not serving")
                }
            }
            self.last_process = process;
        }
        if let Some(data) = report.data.as_ref() {
            self.metrics.repl_offset.set(data.repl_offset);
        }
        let role = match (process, self.config.mode, report.data.as_ref()) {
            (ProcessState::Down | ProcessState::Hung, _, _) => "down",
            (_, Mode::Sentinel, _) => "sentinel",
            (_, Mode::Data, Some(d)) if d.role() == Role::Master => "master",
            (_, Mode::Data, Some(d)) if d.role() == Role::Replica => "replica",
            _ => "unknown",
        };
        let role_code = crate::metrics::ROLES
            .iter()
            .position(|r| *r == role)
            .unwrap_or(0) as i32;
        if role_code != self.last_role {
            info!(role, "local role");
            let previous = usize::try_from(self.last_role)
                .ok()
                .and_then(|i| crate::metrics::ROLES.get(i));
            if role == "master" {
                self.shared.demotions.promoted();
            } else if previous == Some(&"master") && role == "replica" {
                // Demoted by someone else (Valkey's FAILOVER, Sentinel): start the window.
                self.shared.demotions.demoted();
            }
            self.metrics.set_role(role);
            self.last_role = role_code;
        }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.config.valkey_host, self.config.valkey_port)
    }
}

/// One reply of a pipeline read as `T`; a reply of another shape is the command's error.
fn parse<T: redis::FromRedisValue>(reply: &redis::Value) -> Result<T, ValkeyError> {
    redis::from_redis_value_ref(reply).map_err(|err| ValkeyError::Reply(err.to_string()))
}

/// The report without the clock's fields: equal views mean nothing changed.
fn steady_view(report: &StateReport) -> StateReport {
    let mut view = report.clone();
    view.observed_at_ms = 0;
    view.down_for_ms = 0;
    view.probe_latency_us = 0;
    if let Some(data) = &mut view.data {
        data.uptime_s = 0;
        // master_last_io_s stays: a replica whose master fell silent reports it every
        // heartbeat, which is how the controller tells a hung master from a lost agent.
        data.master_link_down_s = 0;
        for replica in &mut data.replicas {
            replica.lag_s = 0;
        }
    }
    if let Some(sentinel) = &mut view.sentinel {
        sentinel.uptime_s = 0;
    }
    view
}

/// Only what failover decisions turn on: equal views mean no report is owed right now.
fn significant_view(report: &StateReport) -> StateReport {
    let mut view = steady_view(report);
    view.process_error.clear();
    if let Some(data) = &mut view.data {
        data.master_last_io_s = 0;
        data.key_count = data.key_count.min(1);
        data.repl_offset = 0;
        data.second_repl_offset = 0;
        for replica in &mut data.replicas {
            replica.offset = 0;
        }
    }
    if let Some(sentinel) = &mut view.sentinel {
        for master in &mut sentinel.masters {
            for replica in &mut master.replicas {
                replica.offset = 0;
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_flags_an_empty_restart_until_it_syncs() {
        let mut memory = Memory::default();
        assert!(memory.observe("a", 0, false));
        assert!(!memory.restarted);
        memory.observe("a", 10, false);
        assert!(memory.had_data && !memory.prior_had_data);

        // Restarted with nothing: flagged.
        assert!(memory.observe("b", 0, false));
        assert!(memory.restarted && memory.prior_had_data);
        assert_eq!(memory.restarts_seen, 1);
        // Still empty: still flagged; a completed sync clears it.
        assert!(!memory.observe("b", 0, false));
        assert!(memory.prior_had_data);
        memory.observe("b", 0, true);
        assert!(!memory.prior_had_data);

        // Restarted with its data (RDB/AOF): not an empty restart.
        memory.observe("c", 10, false);
        assert!(!memory.prior_had_data && memory.restarts_seen == 2);
    }

    #[test]
    fn fresh_node_is_not_a_restart() {
        let mut memory = Memory::default();
        memory.observe("a", 0, false);
        assert!(!memory.restarted && !memory.prior_had_data);
    }

    #[test]
    fn views_separate_offsets_from_roles() {
        let base = StateReport {
            data: Some(DataState {
                role: Role::Master.into(),
                repl_offset: 10,
                key_count: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut moved = base.clone();
        if let Some(d) = moved.data.as_mut() {
            d.repl_offset = 20;
            d.key_count = 6;
        }
        moved.observed_at_ms = 99;
        assert_eq!(significant_view(&base), significant_view(&moved));
        assert_ne!(steady_view(&base), steady_view(&moved));
        let mut demoted = base.clone();
        if let Some(d) = demoted.data.as_mut() {
            d.role = Role::Replica.into();
        }
        assert_ne!(significant_view(&base), significant_view(&demoted));
    }
}
