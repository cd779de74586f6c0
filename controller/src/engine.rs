//! Dispatch, for the failover driver both runtimes share (`driver::Driver::pass`): observe the
//! hub, ask the decision floor (policy manual or sentinel) for a plan, and send its commands,
//! one in flight per pod, with SENTINEL RESET throttled. The driver persists the plan's
//! durable state (through the runtime's store) before anything here is sent.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::warn;
use valkey_proto::v1::{Command, CommandResult, NodeKind, Outcome, command::Action};

use crate::{
    decide::credentials,
    decide::lease,
    decide::model::{Desired, Durable, Plan},
    decide::sentinel::SentinelDesired,
    hub::{Hub, InstanceKey},
};

/// How long a sentinel is left alone after a SENTINEL RESET, to learn its peers and replicas.
const RESET_QUIET: Duration = Duration::from_secs(30);

/// How often a sentinel may be asked to fail over the same master.
const FAILOVER_RETRY: Duration = Duration::from_secs(1);

/// How long a node restarted for refused credentials is left to come back before it may be
/// restarted again.
const RESTART_QUIET: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Engine {
    /// Distinguishes this process's command ids from a previous one's (agents answer a
    /// repeated id from their cache without acting).
    session: String,
    ids: AtomicU64,
    /// Pods with a command in flight.
    busy: Mutex<HashSet<String>>,
    /// When each (action, pod) that must not be repeated soon was last done.
    quiet: Mutex<HashMap<(&'static str, String), Instant>>,
    /// A planned switchover is being carried out right now: the core waits for it.
    pub switchover: AtomicBool,
}

impl Default for Engine {
    fn default() -> Self {
        use rand::RngExt;
        Engine {
            session: format!("{:08x}", rand::rng().random::<u32>()),
            ids: AtomicU64::new(0),
            busy: Mutex::default(),
            quiet: Mutex::default(),
            switchover: AtomicBool::new(false),
        }
    }
}

impl Engine {
    /// A command id: readable in logs, and with 64 random bits that nobody can guess from
    /// the ones before it.
    pub fn next_id(&self, epoch: u64) -> String {
        use rand::RngExt;
        format!(
            "{}-e{epoch}-{}-{:016x}",
            self.session,
            self.ids.fetch_add(1, Ordering::Relaxed),
            rand::rng().random::<u64>()
        )
    }

    /// What to do now for one instance.
    pub fn plan(
        &self,
        hub: &Hub,
        key: &InstanceKey,
        desired: &Desired,
        sentinel: Option<&SentinelDesired>,
        durable: &Durable,
        now_ms: i64,
    ) -> Plan {
        let mut observed = hub.observe(key);
        observed.switchover_in_flight = self.switchover.load(Ordering::SeqCst);
        let sentinels = sentinel.map(|_| hub.observe_kind(key, NodeKind::Sentinel));
        let mut plan = match (sentinel, &sentinels) {
            (Some(sd), Some(sentinels)) if !observed.switchover_in_flight => {
                crate::decide::sentinel::decide(desired, sd, durable, &observed, sentinels, now_ms)
            }
            // A Sentinel switchover runs its own steps; the core waits for them.
            (Some(_), _) => Plan::default(),
            (None, _) => crate::decide::manual::decide(desired, durable, &observed, now_ms),
        };
        let after = plan.durable.as_ref().unwrap_or(durable).master.as_deref();
        plan.lease_holder = match (sentinel, &sentinels) {
            (Some(sd), Some(sentinels)) => lease::holder_sentinel(desired, sd, after, sentinels),
            _ => lease::holder_manual(desired, after),
        };
        // The master is moving: no grant may go to the old one from here on, and none may
        // have gone since it was observed (the decision would rest on a stale view).
        if let Some(old) = durable.master.as_deref()
            && Some(old) != after
        {
            let seen = observed.nodes.get(old).map_or(0, |o| o.lease_grants);
            if !hub.revoke_lease(key, old, seen) {
                // It is heard again: it keeps the lease (it was the holder, or it would not
                // have been granted one).
                return Plan {
                    notes: vec![format!(
                        "{old} was granted its write lease meanwhile; deciding again"
                    )],
                    lease_holder: Some(old.to_owned()),
                    ..Plan::default()
                };
            }
        }
        let repairs = credentials::repairs(desired, durable, &observed);
        plan.notes.extend(repairs.notes);
        plan.restarts = repairs
            .restart
            .into_iter()
            .filter(|pod| self.not_done_lately("restart", pod, RESTART_QUIET))
            .collect();
        plan
    }

    /// True, and remembered, unless `what` was done to `pod` less than `quiet` ago.
    fn not_done_lately(&self, what: &'static str, pod: &str, quiet: Duration) -> bool {
        let mut done = self.quiet.lock().unwrap_or_else(|e| e.into_inner());
        let key = (what, pod.to_owned());
        if done.get(&key).is_some_and(|t| t.elapsed() < quiet) {
            return false;
        }
        done.insert(key, Instant::now());
        true
    }

    /// Sends each command under `epoch` without waiting; a pod with a command in flight is
    /// skipped (the next pass plans again from what it then sees).
    pub fn dispatch(
        self: &Arc<Self>,
        hub: &Hub,
        key: &InstanceKey,
        epoch: u64,
        commands: Vec<(String, Action)>,
    ) {
        for (pod, action) in commands {
            if matches!(action, Action::SentinelReset(_))
                && !self.not_done_lately("reset", &pod, RESET_QUIET)
            {
                continue;
            }
            // Refused while Sentinel has no good replica yet: asked again once a second.
            if matches!(action, Action::SentinelFailover(_))
                && !self.not_done_lately("failover", &pod, FAILOVER_RETRY)
            {
                continue;
            }
            let claimed = self
                .busy
                .lock()
                .map(|mut busy| busy.insert(pod.clone()))
                .unwrap_or(false);
            if !claimed {
                continue;
            }
            let (hub, key, engine) = (hub.clone(), key.clone(), self.clone());
            tokio::spawn(async move {
                let result = engine
                    .run_command(&hub, &key, epoch, &pod, action, Duration::from_secs(5))
                    .await;
                if let Err(err) = result {
                    warn!(pod = %pod, error = %err, "command not done");
                }
                if let Ok(mut busy) = engine.busy.lock() {
                    busy.remove(&pod);
                }
            });
        }
    }

    /// Sends one command under `epoch` and waits until it is done (OK or ALREADY), within
    /// `deadline` (and a second more for the answer to arrive); the agent's answer (an offset,
    /// say).
    pub async fn run_command(
        &self,
        hub: &Hub,
        key: &InstanceKey,
        epoch: u64,
        pod: &str,
        action: Action,
        deadline: Duration,
    ) -> Result<CommandResult, String> {
        let command = Command {
            id: self.next_id(epoch),
            epoch,
            deadline_ms: deadline.as_millis() as u32,
            action: Some(action),
        };
        match hub
            .command(key, pod, command, deadline + Duration::from_secs(1))
            .await
        {
            Ok(r) if matches!(r.outcome(), Outcome::Ok | Outcome::Already) => Ok(r),
            Ok(r) => Err(format!("{pod}: {:?}: {}", r.outcome(), r.message)),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Settings the core keeps on every node with CONFIG SET: fencing when there are enough nodes
/// to afford it (a master cut off from every replica stops taking writes after 5 s), unless
/// customConfigs says otherwise.
pub fn live_config(spec: &crate::crd::FailoverSpec) -> std::collections::BTreeMap<String, String> {
    let mut live = std::collections::BTreeMap::new();
    if spec.replicas >= 3 {
        live.insert("min-replicas-to-write".to_owned(), "1".to_owned());
        live.insert("min-replicas-max-lag".to_owned(), "5".to_owned());
    }
    for key in ["min-replicas-to-write", "min-replicas-max-lag"] {
        if let Some(value) = spec.custom_configs.get(key) {
            live.insert(key.to_owned(), value.clone());
        }
    }
    live
}
