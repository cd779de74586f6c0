//! The core for `policy: sentinel`: Sentinel's quorum and config epochs decide who is master;
//! the controller makes Sentinel fast and keeps it healthy. A pure function of (desired nodes,
//! Sentinel settings, durable state, data and sentinel observations) to a plan, like `core`.

use std::collections::BTreeMap;

use valkey_proto::v1::{
    PasswordRef, ProcessState, Promote, Role, SentinelMaster, SentinelMonitor, SentinelPeer,
    SentinelSet, command::Action, password_ref,
};

use super::{
    manual::{self, converge},
    model::{Desired, Durable, FailoverRecord, NodeObs, NodeSpec, Observed, Plan, is_up, role},
};

/// How long after a failover a sentinel still naming another master is left to Sentinel's
/// gossip (hello messages every 2 s) before it is handed the master again.
pub const GOSSIP_GRACE_MS: i64 = 5_000;

/// How Sentinel should watch this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelDesired {
    /// The monitor name, unique per instance (`<namespace>.<name>`).
    pub name: String,
    pub quorum: u32,
    /// down-after-milliseconds, failover-timeout, parallel-syncs.
    pub monitor_config: BTreeMap<String, String>,
    /// The sentinels' own announced addresses (host, port): any other sentinel a sentinel
    /// remembers is stale.
    pub sentinel_addrs: Vec<(String, u32)>,
    /// Sentinels (by pod) kept announcing an address of the controller's choosing
    /// (announce-ip/-port): the one clients outside the cluster reach them at.
    pub announce: BTreeMap<String, (String, u32)>,
}

/// What one sentinel says of this instance's master.
#[derive(Debug, Clone, PartialEq)]
pub struct SentinelView<'a> {
    pub pod: &'a str,
    pub master: Option<&'a SentinelMaster>,
    /// The address it announces to its peers.
    pub announce: (&'a str, u32),
}

pub(crate) fn views<'a>(
    sd: &SentinelDesired,
    sentinels: &'a BTreeMap<String, NodeObs>,
) -> Vec<SentinelView<'a>> {
    sentinels
        .iter()
        .filter(|(_, obs)| obs.connected)
        .filter_map(|(pod, obs)| {
            let report = obs.report.as_ref()?;
            if report.process() != ProcessState::Up {
                return None;
            }
            let state = report.sentinel.as_ref()?;
            Some(SentinelView {
                pod,
                master: state.masters.iter().find(|m| m.name == sd.name),
                announce: (state.announce_ip.as_str(), state.announce_port),
            })
        })
        .collect()
}

/// The master Sentinel names: the address with the highest config epoch among the sentinels
/// that monitor this instance (on a tie, the one most of them name).
pub fn sentinel_master<'a>(views: &[SentinelView<'a>]) -> Option<(&'a str, u32, u64)> {
    let mut votes: BTreeMap<(u64, &str, u32), usize> = BTreeMap::new();
    for master in views.iter().filter_map(|v| v.master) {
        *votes
            .entry((master.config_epoch, master.host.as_str(), master.port))
            .or_default() += 1;
    }
    votes
        .into_iter()
        .max_by_key(|((epoch, _, _), n)| (*epoch, *n))
        .map(|((epoch, host, port), _)| (host, port, epoch))
}

/// Some sentinel holds the master objectively down: the quorum agreed it is gone.
fn objectively_down(views: &[SentinelView]) -> bool {
    views
        .iter()
        .filter_map(|v| v.master)
        .any(|m| m.flags.iter().any(|f| f == "o_down"))
}

/// A failover runs that has not promoted its replica yet, at any sentinel, whatever its
/// config epoch: until it has, the nodes are Sentinel's to move (a sentinel handed the master
/// again has config epoch 0, and may be the one a switchover asked). One that has promoted its
/// replica does not count (see [`promoting`]); Sentinel bounds the rest by failover-timeout.
fn failover_in_progress(views: &[SentinelView]) -> bool {
    views.iter().filter_map(|v| v.master).any(promoting)
}

/// A sentinel's failover of this monitor has not promoted its replica yet. Once it has
/// (`reconf_slaves`, `update_config`), the new master is elected (and the agents report the
/// address Sentinel gives clients, which is the promoted replica's by then): the leader only points the
/// other replicas at it, which can take until failover-timeout (3 minutes by default) when
/// one of them cannot follow, and a new master that dies meanwhile must still be failed over.
fn promoting(m: &SentinelMaster) -> bool {
    match m.failover_state.as_str() {
        "" | "none" => m.flags.iter().any(|f| f.starts_with("failover")),
        "reconf_slaves" | "reconf_replicas" | "update_config" => false,
        _ => true,
    }
}

/// A sentinel runs a failover of this monitor, in any state: it answers INPROG when asked
/// for another.
pub fn failing_over(m: &SentinelMaster) -> bool {
    m.flags.iter().any(|f| f.starts_with("failover"))
        || !matches!(m.failover_state.as_str(), "" | "none")
}

/// Whether a sentinel's view of the monitor differs from `monitorConfig` in any key it sets.
fn monitor_config_differs(sd: &SentinelDesired, m: &SentinelMaster) -> bool {
    sd.monitor_config.iter().any(|(key, value)| {
        let Ok(wanted) = value.parse::<u64>() else {
            return false;
        };
        match key.as_str() {
            "down-after-milliseconds" => wanted != m.down_after_ms,
            "failover-timeout" => wanted != m.failover_timeout_ms,
            "parallel-syncs" => wanted != u64::from(m.parallel_syncs),
            _ => false,
        }
    })
}

/// Whether a sentinel could fail the instance over now: it monitors it, and it lists every
/// replica the instance should have (all but `master`), none of them down or disconnected.
/// Sentinel learns replicas only from its master's INFO; one that has not yet done so answers
/// a failover with NOGOODSLAVE.
fn knows_replicas(desired: &Desired, master: &str, view: &SentinelView) -> bool {
    let Some(m) = view.master else { return false };
    desired
        .nodes
        .iter()
        .filter(|n| n.name != master && !n.retiring)
        .all(|n| {
            replica_at(m, &n.host, u32::from(n.port)).is_some_and(|r| {
                !r.flags
                    .iter()
                    .any(|f| f == "s_down" || f == "o_down" || f == "disconnected")
            })
        })
}

/// The replica a sentinel lists at `host`:`port` for this monitor, if it lists one.
pub fn replica_at<'a>(m: &'a SentinelMaster, host: &str, port: u32) -> Option<&'a SentinelPeer> {
    m.replicas.iter().find(|r| r.host == host && r.port == port)
}

/// How many sentinels could fail the instance (whose master is `master`) over now: the
/// status is Ready only when at least the quorum could.
pub fn sentinels_able_to_fail_over(
    desired: &Desired,
    sd: &SentinelDesired,
    master: &str,
    sentinels: &BTreeMap<String, NodeObs>,
) -> usize {
    views(sd, sentinels)
        .iter()
        .filter(|v| knows_replicas(desired, master, v))
        .count()
}

/// SENTINEL MONITOR (with auth) and the monitorConfig, for one sentinel.
fn monitor(sd: &SentinelDesired, master: &NodeSpec, pod: &str) -> [(String, Action); 2] {
    [
        (
            pod.to_owned(),
            Action::SentinelMonitor(SentinelMonitor {
                name: sd.name.clone(),
                host: master.host.clone(),
                port: u32::from(master.port),
                quorum: sd.quorum,
                auth_user: String::new(),
                // The instance's password, which the sentinel's agent reads from its own
                // file: it never crosses the agent channel.
                auth_pass_ref: Some(PasswordRef {
                    owner: password_ref::Owner::Instance as i32,
                    next: false,
                    ..PasswordRef::default()
                }),
            }),
        ),
        (
            pod.to_owned(),
            Action::SentinelSet(SentinelSet {
                name: sd.name.clone(),
                params: sd.monitor_config.clone().into_iter().collect(),
                ..SentinelSet::default()
            }),
        ),
    ]
}

/// Decides what to do now under policy sentinel, in phases: bootstrap (nobody monitors the
/// instance yet), re-address (Sentinel names an address no node has any more), then follow
/// Sentinel's master, heal the sentinels, accelerate a failover Sentinel would start late or
/// not at all, and in steady state keep the data nodes in line.
pub fn decide(
    desired: &Desired,
    sd: &SentinelDesired,
    durable: &Durable,
    observed: &Observed,
    sentinels: &BTreeMap<String, NodeObs>,
    now_ms: i64,
) -> Plan {
    let round = Round {
        desired,
        sd,
        durable,
        observed,
        views: views(sd, sentinels),
        now_ms,
    };
    let Some((host, port, config_epoch)) = sentinel_master(&round.views) else {
        return round.bootstrap();
    };
    let Some(named) = desired
        .nodes
        .iter()
        .find(|n| n.host == host && u32::from(n.port) == port)
    else {
        return round.readdress(host, port);
    };
    let mut plan = Plan::default();
    let master = round
        .handed_over(named, config_epoch, &mut plan)
        .unwrap_or(named);
    round.follow(master, config_epoch, &mut plan);
    round.heal(master, config_epoch, &mut plan);
    if round.accelerate(master, &mut plan) || failover_in_progress(&round.views) {
        return plan;
    }
    round.steady(master, &mut plan);
    plan
}

/// One decision: its inputs, and the sentinels' views of the monitor.
struct Round<'a> {
    desired: &'a Desired,
    sd: &'a SentinelDesired,
    durable: &'a Durable,
    observed: &'a Observed,
    views: Vec<SentinelView<'a>>,
    now_ms: i64,
}

impl Round<'_> {
    /// Whether `node` is up as master.
    fn serves_as_master(&self, node: &str) -> bool {
        self.observed
            .nodes
            .get(node)
            .is_some_and(|o| is_up(o) && role(o) == Role::Master)
    }

    /// Nobody monitors the instance yet: bootstrap the data nodes as the manual core does,
    /// then hand the master to every sentinel. Until a sentinel monitors it, the manual core
    /// also keeps the master: one lost before that (killed before it was even promoted) is
    /// promoted back or failed over, as under policy manual.
    fn bootstrap(&self) -> Plan {
        let serving = self
            .durable
            .master
            .as_deref()
            .and_then(|m| self.desired.node(m))
            .filter(|master| self.serves_as_master(&master.name));
        let Some(master) = serving else {
            return manual::decide(self.desired, self.durable, self.observed, self.now_ms);
        };
        let mut plan = Plan::default();
        for view in &self.views {
            plan.commands.extend(monitor(self.sd, master, view.pod));
        }
        plan
    }

    /// The nodes' addresses changed (outside access turned on or off, a new load balancer
    /// address): Sentinel still names an old one. When our master is the one node serving as
    /// master and no failover runs, it is handed to every sentinel at its address now.
    fn readdress(&self, host: &str, port: u32) -> Plan {
        let mut plan = Plan::default();
        let masters: Vec<&NodeSpec> = self
            .desired
            .nodes
            .iter()
            .filter(|n| self.serves_as_master(&n.name))
            .collect();
        match (self.durable.master.as_deref(), masters.as_slice()) {
            (Some(ours), [only]) if only.name == ours && !failover_in_progress(&self.views) => {
                plan.notes.push(format!(
                    "Sentinel names {host}:{port} master, an address {ours} no longer has: \
                     monitoring it at {}:{} again",
                    only.host, only.port
                ));
                for view in &self.views {
                    plan.commands.extend(monitor(self.sd, only, view.pod));
                }
            }
            _ => plan.notes.push(format!(
                "Sentinel names {host}:{port} master, which is not a node of this instance"
            )),
        }
        plan
    }

    /// Follow Sentinel: its master becomes ours, under a new epoch when it changed.
    fn follow(&self, master: &NodeSpec, config_epoch: u64, plan: &mut Plan) {
        let durable = self.durable;
        if durable.master.as_deref() == Some(master.name.as_str()) {
            return;
        }
        let mut next = durable.clone();
        next.epoch = durable.epoch.max(config_epoch) + 1;
        if durable.master.is_some() {
            next.last_failover = Some(FailoverRecord {
                at_ms: self.now_ms,
                from: durable.master.clone(),
                to: master.name.clone(),
                reason: format!("Sentinel switched master (config epoch {config_epoch})"),
                cause: crate::decide::Cause::Sentinel,
            });
        }
        next.master = Some(master.name.clone());
        plan.notes.push(format!(
            "Sentinel names {} master (config epoch {config_epoch})",
            master.name
        ));
        plan.durable = Some(next);
    }

    /// Heal: every sentinel announces the address it is reached at (when that is ours to
    /// choose), and monitors the instance, with the desired settings.
    fn heal(&self, master: &NodeSpec, config_epoch: u64, plan: &mut Plan) {
        for view in &self.views {
            if let Some((host, port)) = self.sd.announce.get(view.pod)
                && (view.announce.0 != host || view.announce.1 != *port)
            {
                plan.commands.push((
                    view.pod.to_owned(),
                    Action::SentinelConfigSet(valkey_proto::v1::SentinelConfigSet {
                        params: [
                            ("announce-ip".to_owned(), host.clone()),
                            ("announce-port".to_owned(), port.to_string()),
                        ]
                        .into(),
                        ..Default::default()
                    }),
                ));
            }
        }
        for view in &self.views {
            match view.master {
                None => plan.commands.extend(monitor(self.sd, master, view.pod)),
                Some(m) if self.left_behind(m, master, config_epoch) => {
                    plan.notes.push(format!(
                        "{} still names {}:{} master (config epoch {} < {config_epoch}): \
                         monitoring {} again",
                        view.pod, m.host, m.port, m.config_epoch, master.name
                    ));
                    plan.commands.extend(monitor(self.sd, master, view.pod));
                }
                Some(m) => self.tidy(view.pod, m, plan),
            }
        }
    }

    /// A sentinel left behind on another master that it holds down, or that follows ours: it
    /// never heard of the failover, and cannot (Sentinel's gossip reaches it only through the
    /// instance it watches, which is gone; it had not yet found the replicas). Or it led a
    /// failover that another overtook at the same config epoch (it was still pointing the
    /// replicas at its new master when that one died), and gossip at an equal epoch changes
    /// nothing. Its clients are sent to a dead address or a replica. One whose old master is
    /// up as master is updated by the gossip and left alone.
    fn left_behind(&self, m: &SentinelMaster, master: &NodeSpec, config_epoch: u64) -> bool {
        // Right after a failover, Sentinel's own gossip (hello messages every 2 s) is what
        // brings the others along; monitoring them again would reset their config epoch.
        let settled = self
            .durable
            .last_failover
            .as_ref()
            .is_none_or(|f| self.now_ms - f.at_ms >= GOSSIP_GRACE_MS);
        let follows_ours = self
            .desired
            .nodes
            .iter()
            .find(|n| n.host == m.host && u32::from(n.port) == m.port)
            .and_then(|n| self.observed.nodes.get(&n.name))
            .is_some_and(|o| is_up(o) && crate::decide::model::follows(o, master));
        settled
            && (m.host != master.host || m.port != u32::from(master.port))
            && m.config_epoch <= config_epoch
            && (m.flags.iter().any(|f| f == "s_down") || follows_ours)
            && !failover_in_progress(&self.views)
            && self.serves_as_master(&master.name)
    }

    /// One sentinel that monitors the current master: stale entries dropped (SENTINEL RESET,
    /// which forgets everything it learned, so only when needed), the desired settings set.
    fn tidy(&self, pod: &str, m: &SentinelMaster, plan: &mut Plan) {
        let sd = self.sd;
        let stale_sentinel = m.sentinels.iter().any(|p| {
            !sd.sentinel_addrs
                .iter()
                .any(|(h, port)| *h == p.host && *port == p.port)
        });
        let stale_replica = m.replicas.iter().any(|r| {
            !self
                .desired
                .nodes
                .iter()
                .any(|n| n.host == r.host && u32::from(n.port) == r.port)
        });
        let any_failover = self.views.iter().filter_map(|v| v.master).any(failing_over);
        if (stale_sentinel || stale_replica) && !any_failover {
            plan.notes.push(format!(
                "{pod} remembers a {} that is gone: SENTINEL RESET",
                if stale_sentinel {
                    "sentinel"
                } else {
                    "replica"
                }
            ));
            plan.commands.push((
                pod.to_owned(),
                Action::SentinelReset(valkey_proto::v1::SentinelReset {
                    pattern: sd.name.clone(),
                }),
            ));
            return;
        }
        if monitor_config_differs(sd, m) || m.quorum != sd.quorum {
            let mut params: std::collections::HashMap<String, String> =
                sd.monitor_config.clone().into_iter().collect();
            params.insert("quorum".into(), sd.quorum.to_string());
            plan.commands.push((
                pod.to_owned(),
                Action::SentinelSet(SentinelSet {
                    name: sd.name.clone(),
                    params,
                    ..SentinelSet::default()
                }),
            ));
        }
    }

    /// Steady state: Sentinel's master restarted (as every node does, a replica of nobody)
    /// with its data is promoted again; a second node claiming master is noted, and the data
    /// nodes converge on Sentinel's master.
    fn steady(&self, master: &NodeSpec, plan: &mut Plan) {
        let master_obs = self.observed.nodes.get(&master.name);
        let up = master_obs.is_some_and(is_up);
        if up && master_obs.is_some_and(|o| role(o) == Role::Replica) {
            plan.commands
                .push((master.name.clone(), Action::Promote(Promote {})));
            return;
        }
        if !self.serves_as_master(&master.name) {
            return;
        }
        for node in &self.desired.nodes {
            if node.name != master.name && self.serves_as_master(&node.name) {
                plan.notes.push(format!(
                    "two masters: {} claims master too; keeping {}, which Sentinel names, and demoting {}",
                    node.name, master.name, node.name
                ));
            }
        }
        converge(self.desired, self.observed, master, plan);
    }
}

mod fail_over;
#[cfg(test)]
mod tests;
