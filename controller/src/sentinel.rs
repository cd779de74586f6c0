//! The core for `policy: sentinel`: Sentinel's quorum and config epochs decide who is master;
//! the controller makes Sentinel fast and keeps it healthy. A pure function of (desired nodes,
//! Sentinel settings, durable state, data and sentinel observations) to a plan, like `core`.

use std::collections::BTreeMap;

use valkey_proto::v1::{
    PasswordRef, ProcessState, Promote, Role, SentinelFailover, SentinelMaster, SentinelMonitor,
    SentinelSet, command::Action, password_ref,
};

use crate::core::{
    self, Desired, Durable, NodeObs, NodeSpec, Observed, Plan, converge, data, definitely_down,
    is_up, others_hold_keys, role,
};

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

fn views<'a>(
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

fn failover_in_progress(views: &[SentinelView]) -> bool {
    views.iter().filter_map(|v| v.master).any(|m| {
        m.flags.iter().any(|f| f.starts_with("failover"))
            || (!m.failover_state.is_empty() && m.failover_state != "none")
    })
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
            m.replicas.iter().any(|r| {
                r.host == n.host
                    && r.port == u32::from(n.port)
                    && !r
                        .flags
                        .iter()
                        .any(|f| f == "s_down" || f == "o_down" || f == "disconnected")
            })
        })
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

/// Decides what to do now under policy sentinel.
pub fn decide(
    desired: &Desired,
    sd: &SentinelDesired,
    durable: &Durable,
    observed: &Observed,
    sentinels: &BTreeMap<String, NodeObs>,
    now_ms: i64,
) -> Plan {
    let views = views(sd, sentinels);
    let Some((host, port, config_epoch)) = sentinel_master(&views) else {
        // Nobody monitors the instance yet: bootstrap the data nodes as the manual core does,
        // then hand the master to every sentinel.
        if durable.master.is_none() {
            return core::decide(desired, durable, observed, now_ms);
        }
        let mut plan = Plan::default();
        if let Some(master) = durable.master.as_deref().and_then(|m| desired.node(m))
            && observed
                .nodes
                .get(&master.name)
                .is_some_and(|o| is_up(o) && role(o) == Role::Master)
        {
            for view in &views {
                plan.commands.extend(monitor(sd, master, view.pod));
            }
        }
        return plan;
    };

    let mut plan = Plan::default();
    let Some(master) = desired
        .nodes
        .iter()
        .find(|n| n.host == host && u32::from(n.port) == port)
    else {
        // The nodes' addresses changed (outside access turned on or off, a new load balancer
        // address): Sentinel still names an old one. When our master is the one node serving
        // as master and no failover runs, it is handed to every sentinel at its address now.
        let masters: Vec<&NodeSpec> = desired
            .nodes
            .iter()
            .filter(|n| {
                observed
                    .nodes
                    .get(&n.name)
                    .is_some_and(|o| is_up(o) && role(o) == Role::Master)
            })
            .collect();
        match (durable.master.as_deref(), masters.as_slice()) {
            (Some(ours), [only]) if only.name == ours && !failover_in_progress(&views) => {
                plan.notes.push(format!(
                    "Sentinel names {host}:{port} master, an address {ours} no longer has: \
                     monitoring it at {}:{} again",
                    only.host, only.port
                ));
                for view in &views {
                    plan.commands.extend(monitor(sd, only, view.pod));
                }
            }
            _ => plan.notes.push(format!(
                "Sentinel names {host}:{port} master, which is not a node of this instance"
            )),
        }
        return plan;
    };
    // Follow Sentinel: its master becomes ours, under a new epoch when it changed.
    if durable.master.as_deref() != Some(master.name.as_str()) {
        let mut next = durable.clone();
        next.epoch = durable.epoch.max(config_epoch) + 1;
        if durable.master.is_some() {
            next.last_failover = Some(core::FailoverRecord {
                at_ms: now_ms,
                from: durable.master.clone(),
                to: master.name.clone(),
                reason: format!("Sentinel switched master (config epoch {config_epoch})"),
                cause: crate::driver::Cause::Sentinel,
            });
        }
        next.master = Some(master.name.clone());
        plan.notes.push(format!(
            "Sentinel names {} master (config epoch {config_epoch})",
            master.name
        ));
        plan.durable = Some(next);
    }

    // Heal: every sentinel announces the address it is reached at (when that is ours to
    // choose), and monitors the instance, with the desired settings.
    for view in &views {
        if let Some((host, port)) = sd.announce.get(view.pod)
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
    for view in &views {
        match view.master {
            None => {
                plan.commands.extend(monitor(sd, master, view.pod));
            }
            // A sentinel left behind on an older master that it holds down: it never heard of
            // the failover, and cannot (Sentinel's gossip reaches it only through the
            // instance it watches, which is gone; it had not yet found the replicas). Its
            // clients are sent to a dead address: monitor the current master afresh. One
            // whose old master is up is updated by the gossip and left alone.
            Some(m)
                if (m.host != host || m.port != port)
                    && m.config_epoch < config_epoch
                    && m.flags.iter().any(|f| f == "s_down")
                    && !failover_in_progress(&views)
                    && observed
                        .nodes
                        .get(&master.name)
                        .is_some_and(|o| is_up(o) && role(o) == Role::Master) =>
            {
                plan.notes.push(format!(
                    "{} still names {}:{} master (config epoch {} < {config_epoch}): \
                     monitoring {} again",
                    view.pod, m.host, m.port, m.config_epoch, master.name
                ));
                plan.commands.extend(monitor(sd, master, view.pod));
            }
            Some(m) => {
                // Stale entries (a sentinel or replica that moved or left) are only dropped by
                // SENTINEL RESET, which forgets everything it learned: use it only when needed.
                let stale_sentinel = m.sentinels.iter().any(|p| {
                    !sd.sentinel_addrs
                        .iter()
                        .any(|(h, port)| *h == p.host && *port == p.port)
                });
                let stale_replica = m.replicas.iter().any(|r| {
                    !desired
                        .nodes
                        .iter()
                        .any(|n| n.host == r.host && u32::from(n.port) == r.port)
                });
                if (stale_sentinel || stale_replica) && !failover_in_progress(&views) {
                    plan.notes.push(format!(
                        "{} remembers a {} that is gone: SENTINEL RESET",
                        view.pod,
                        if stale_sentinel {
                            "sentinel"
                        } else {
                            "replica"
                        }
                    ));
                    plan.commands.push((
                        view.pod.to_owned(),
                        Action::SentinelReset(valkey_proto::v1::SentinelReset {
                            pattern: sd.name.clone(),
                        }),
                    ));
                    continue;
                }
                if monitor_config_differs(sd, m) || m.quorum != sd.quorum {
                    let mut params: std::collections::HashMap<String, String> =
                        sd.monitor_config.clone().into_iter().collect();
                    params.insert("quorum".into(), sd.quorum.to_string());
                    plan.commands.push((
                        view.pod.to_owned(),
                        Action::SentinelSet(SentinelSet {
                            name: sd.name.clone(),
                            params,
                            ..SentinelSet::default()
                        }),
                    ));
                }
            }
        }
    }

    let in_progress = failover_in_progress(&views);
    let master_obs = observed
        .nodes
        .get(&master.name)
        .cloned()
        .unwrap_or_default();
    let master_empty = is_up(&master_obs)
        && data(&master_obs).is_some_and(|d| {
            d.restarted_empty
                || (d.role() == Role::Replica
                    && (d.never_synced
                        || (d.key_count == 0 && others_hold_keys(desired, observed, &master.name))))
        });
    // Acceleration: the master's own agent says its Valkey is gone (or it came back empty):
    // ask a sentinel to fail over now rather than after down-after-milliseconds. Also when the
    // sentinels hold the master objectively down but no failover runs: Sentinel aborted one
    // (no replica it counted as good: its INFO of them more than 5 s old, as after a restart)
    // and would not try again for twice failover-timeout. Sentinel still picks the replica.
    let stuck = objectively_down(&views) && !is_up(&master_obs);
    if (definitely_down(&master_obs) || master_empty || stuck) && !in_progress {
        // A sentinel that knows the replicas, when one does: another answers NOGOODSLAVE.
        let asked = views
            .iter()
            .find(|v| knows_replicas(desired, &master.name, v))
            .or_else(|| views.iter().find(|v| v.master.is_some()));
        if let Some(view) = asked {
            plan.notes.push(format!(
                "master {} {}: asking Sentinel to fail over now",
                master.name,
                if master_empty {
                    "came back empty"
                } else if definitely_down(&master_obs) {
                    "is gone"
                } else {
                    "is objectively down and no failover runs"
                }
            ));
            plan.commands.push((
                view.pod.to_owned(),
                Action::SentinelFailover(SentinelFailover {
                    name: sd.name.clone(),
                }),
            ));
        }
        return plan;
    }
    if in_progress {
        return plan;
    }
    if is_up(&master_obs) && role(&master_obs) == Role::Replica {
        // Sentinel's master restarted (as every node does, a replica of nobody) with its data.
        plan.commands
            .push((master.name.clone(), Action::Promote(Promote {})));
        return plan;
    }
    if is_up(&master_obs) && role(&master_obs) == Role::Master {
        for node in &desired.nodes {
            if node.name != master.name
                && observed
                    .nodes
                    .get(&node.name)
                    .is_some_and(|o| is_up(o) && role(o) == Role::Master)
            {
                plan.notes.push(format!(
                    "two masters: {} claims master too; keeping {}, which Sentinel names, and demoting {}",
                    node.name, master.name, node.name
                ));
            }
        }
        converge(desired, observed, master, &mut plan);
    }
    plan
}

#[cfg(test)]
mod tests {
    use valkey_proto::v1::{DataState, SentinelState, StateReport};

    use super::*;

    fn desired() -> Desired {
        crate::core::tests::desired(3)
    }

    fn sd() -> SentinelDesired {
        SentinelDesired {
            name: "ns.demo".into(),
            quorum: 2,
            monitor_config: BTreeMap::from([("down-after-milliseconds".into(), "30000".into())]),
            sentinel_addrs: vec![
                ("127.0.0.1".into(), 26379),
                ("127.0.0.1".into(), 26380),
                ("127.0.0.1".into(), 26381),
            ],
            announce: BTreeMap::new(),
        }
    }

    fn node(role: Role, of: u16, keys: u64, process: ProcessState) -> NodeObs {
        NodeObs {
            connected: true,
            unhealthy_ms: 0,
            report: Some(StateReport {
                process: process.into(),
                data: Some(DataState {
                    role: role.into(),
                    master_host: "127.0.0.1".into(),
                    master_port: u32::from(of),
                    master_link_up: role == Role::Replica,
                    key_count: keys,
                    replica_priority: 100,
                    ..DataState::default()
                }),
                ..StateReport::default()
            }),
        }
    }

    fn sentinel(masters: Vec<(u16, u64)>) -> NodeObs {
        NodeObs {
            connected: true,
            unhealthy_ms: 0,
            report: Some(StateReport {
                process: ProcessState::Up.into(),
                sentinel: Some(SentinelState {
                    masters: masters
                        .into_iter()
                        .map(|(port, epoch)| SentinelMaster {
                            name: "ns.demo".into(),
                            host: "127.0.0.1".into(),
                            port: u32::from(port),
                            config_epoch: epoch,
                            quorum: 2,
                            down_after_ms: 30000,
                            flags: vec!["master".into()],
                            ..SentinelMaster::default()
                        })
                        .collect(),
                    ..SentinelState::default()
                }),
                ..StateReport::default()
            }),
        }
    }

    fn healthy() -> Observed {
        Observed {
            nodes: BTreeMap::from([
                ("n0".into(), node(Role::Master, 0, 5, ProcessState::Up)),
                ("n1".into(), node(Role::Replica, 7000, 5, ProcessState::Up)),
                ("n2".into(), node(Role::Replica, 7000, 5, ProcessState::Up)),
            ]),
            switchover_in_flight: false,
        }
    }

    fn at(master: &str) -> Durable {
        Durable {
            epoch: 1,
            master: Some(master.into()),
            ..Durable::default()
        }
    }

    fn sentinels(views: Vec<Vec<(u16, u64)>>) -> BTreeMap<String, NodeObs> {
        views
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("s{i}"), sentinel(v)))
            .collect()
    }

    #[test]
    fn the_highest_config_epoch_names_the_master() {
        let s = sentinels(vec![vec![(7000, 1)], vec![(7001, 2)], vec![(7000, 1)]]);
        let views = views(&sd(), &s);
        assert_eq!(sentinel_master(&views), Some(("127.0.0.1", 7001, 2)));
    }

    #[test]
    fn unmonitored_sentinels_are_given_the_master_and_settings() {
        let plan = decide(
            &desired(),
            &sd(),
            &at("n0"),
            &healthy(),
            &sentinels(vec![vec![], vec![], vec![]]),
            0,
        );
        let monitors: Vec<&str> = plan
            .commands
            .iter()
            .filter(|(_, a)| matches!(a, Action::SentinelMonitor(m) if m.port == 7000 && m.quorum == 2 && m.auth_pass_ref.as_ref().is_some_and(|r| r.owner() == password_ref::Owner::Instance && !r.next)))
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(monitors, ["s0", "s1", "s2"]);
        assert_eq!(
            plan.commands
                .iter()
                .filter(|(_, a)| matches!(a, Action::SentinelSet(_)))
                .count(),
            3
        );
    }

    #[test]
    fn a_missing_monitor_or_wrong_settings_are_healed_one_sentinel_at_a_time() {
        let mut s = sentinels(vec![vec![(7000, 0)], vec![], vec![(7000, 0)]]);
        if let Some(report) = s.get_mut("s2").and_then(|o| o.report.as_mut())
            && let Some(m) = report
                .sentinel
                .as_mut()
                .and_then(|st| st.masters.first_mut())
        {
            m.down_after_ms = 5000;
        }
        let plan = decide(&desired(), &sd(), &at("n0"), &healthy(), &s, 0);
        let pods: Vec<(&str, bool)> = plan
            .commands
            .iter()
            .map(|(p, a)| (p.as_str(), matches!(a, Action::SentinelMonitor(_))))
            .collect();
        assert_eq!(pods, [("s1", true), ("s1", false), ("s2", false)]);
    }

    #[test]
    fn every_monitor_config_key_is_kept_in_sync() {
        let mut wanted = sd();
        wanted.monitor_config = BTreeMap::from([
            ("down-after-milliseconds".into(), "30000".into()),
            ("failover-timeout".into(), "60000".into()),
            ("parallel-syncs".into(), "2".into()),
        ]);
        let in_sync = |m: &mut SentinelMaster| {
            m.failover_timeout_ms = 60000;
            m.parallel_syncs = 2;
        };
        type Edit = fn(&mut SentinelMaster);
        let edits: [(&str, Edit); 3] = [
            ("s0", |m| m.failover_timeout_ms = 180000),
            ("s1", |m| m.parallel_syncs = 1),
            ("s2", |_| {}),
        ];
        let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
        for (pod, edit) in edits {
            if let Some(m) = s
                .get_mut(pod)
                .and_then(|o| o.report.as_mut())
                .and_then(|r| r.sentinel.as_mut())
                .and_then(|st| st.masters.first_mut())
            {
                in_sync(m);
                edit(m);
            }
        }
        let plan = decide(&desired(), &wanted, &at("n0"), &healthy(), &s, 0);
        let set: Vec<&str> = plan
            .commands
            .iter()
            .filter(|(_, a)| {
                matches!(a, Action::SentinelSet(set)
                    if set.params.get("failover-timeout").map(String::as_str) == Some("60000")
                        && set.params.get("parallel-syncs").map(String::as_str) == Some("2"))
            })
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(set, ["s0", "s1"], "{:?}", plan.commands);
    }

    #[test]
    fn a_gone_master_makes_a_sentinel_fail_over_at_once() {
        let mut obs = healthy();
        obs.nodes
            .insert("n0".into(), node(Role::Master, 0, 5, ProcessState::Down));
        let s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
        let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
        assert_eq!(plan.commands.len(), 1);
        assert!(
            matches!(&plan.commands[0], (p, Action::SentinelFailover(f)) if p == "s0" && f.name == "ns.demo")
        );
        assert_eq!(
            plan.durable, None,
            "Sentinel, not the controller, picks the new master"
        );
    }

    /// Sentinel `pod`'s view of the monitor, to change.
    fn monitor_of<'a>(
        s: &'a mut BTreeMap<String, NodeObs>,
        pod: &str,
    ) -> Option<&'a mut SentinelMaster> {
        s.get_mut(pod)
            .and_then(|o| o.report.as_mut())
            .and_then(|r| r.sentinel.as_mut())
            .and_then(|st| st.masters.first_mut())
    }

    /// Gives sentinel `pod` these replicas (by port) in its view of the monitor.
    fn with_replicas(s: &mut BTreeMap<String, NodeObs>, pod: &str, replicas: &[(u32, &str)]) {
        if let Some(m) = monitor_of(s, pod) {
            m.replicas = replicas
                .iter()
                .map(|(port, flags)| valkey_proto::v1::SentinelPeer {
                    host: "127.0.0.1".into(),
                    port: *port,
                    flags: flags.split(',').map(str::to_owned).collect(),
                    ..valkey_proto::v1::SentinelPeer::default()
                })
                .collect();
        }
    }

    #[test]
    fn the_sentinel_asked_to_fail_over_is_one_that_knows_the_replicas() {
        let mut obs = healthy();
        obs.nodes
            .insert("n0".into(), node(Role::Master, 0, 5, ProcessState::Down));
        // s0 has not seen its master's INFO yet (no replicas: NOGOODSLAVE); s1 lists one
        // replica down; s2 knows both.
        let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
        with_replicas(&mut s, "s1", &[(7001, "slave"), (7002, "slave,s_down")]);
        with_replicas(&mut s, "s2", &[(7001, "slave"), (7002, "slave")]);
        assert_eq!(sentinels_able_to_fail_over(&desired(), &sd(), "n0", &s), 1);
        let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
        assert!(
            matches!(&plan.commands[..], [(p, Action::SentinelFailover(_))] if p == "s2"),
            "{plan:?}"
        );
        with_replicas(&mut s, "s1", &[(7001, "slave"), (7002, "slave")]);
        assert_eq!(sentinels_able_to_fail_over(&desired(), &sd(), "n0", &s), 2);
    }

    #[test]
    fn an_objectively_down_master_with_no_failover_running_is_failed_over_again() {
        let mut obs = healthy();
        obs.nodes
            .insert("n0".into(), node(Role::Master, 0, 5, ProcessState::Hung));
        let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
        let failovers = |s: &BTreeMap<String, NodeObs>, obs: &Observed| {
            decide(&desired(), &sd(), &at("n0"), obs, s, 0)
                .commands
                .iter()
                .filter(|(_, a)| matches!(a, Action::SentinelFailover(_)))
                .count()
        };
        // Hung, and no sentinel says more than that yet: left to Sentinel's timing.
        assert_eq!(failovers(&s, &obs), 0);
        let flags = |s: &mut BTreeMap<String, NodeObs>, flags: &[&str], state: &str| {
            if let Some(m) = s
                .get_mut("s1")
                .and_then(|o| o.report.as_mut()?.sentinel.as_mut()?.masters.first_mut())
            {
                m.flags = flags.iter().map(|f| (*f).to_owned()).collect();
                m.failover_state = state.into();
            }
        };
        // Objectively down and failing over: Sentinel is at it.
        flags(
            &mut s,
            &["master", "s_down", "o_down", "failover_in_progress"],
            "select_slave",
        );
        assert_eq!(failovers(&s, &obs), 0);
        // Objectively down and no failover runs (Sentinel aborted one): asked again.
        flags(&mut s, &["master", "s_down", "o_down"], "none");
        assert_eq!(failovers(&s, &obs), 1);
        // Not if the master answers after all.
        assert_eq!(failovers(&s, &healthy()), 0);
    }

    #[test]
    fn sentinels_decision_is_followed_and_the_old_master_demoted() {
        let mut obs = healthy();
        obs.nodes
            .insert("n1".into(), node(Role::Master, 0, 5, ProcessState::Up));
        obs.nodes
            .insert("n2".into(), node(Role::Replica, 7001, 5, ProcessState::Up));
        // n0 came back claiming master: two masters.
        let s = sentinels(vec![vec![(7001, 1)], vec![(7001, 1)], vec![(7000, 0)]]);
        let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 42);
        let durable = plan.durable.clone().expect("durable");
        assert_eq!((durable.master.as_deref(), durable.epoch), (Some("n1"), 2));
        assert!(
            durable
                .last_failover
                .expect("record")
                .reason
                .contains("Sentinel")
        );
        assert!(
            plan.notes.iter().any(|n| n.contains("two masters")),
            "{:?}",
            plan.notes
        );
        assert!(
            plan.commands
                .iter()
                .any(|(p, a)| p == "n0" && matches!(a, Action::ReplicaOf(r) if r.port == 7001))
        );
        // The stale sentinel is not touched: Sentinel's own gossip updates it.
        assert!(!plan.commands.iter().any(|(p, _)| p == "s2"));
    }

    #[test]
    fn a_sentinel_left_on_a_dead_old_master_monitors_the_new_one() {
        let mut obs = healthy();
        obs.nodes
            .insert("n0".into(), node(Role::Master, 0, 5, ProcessState::Down));
        obs.nodes
            .insert("n1".into(), node(Role::Master, 0, 5, ProcessState::Up));
        obs.nodes
            .insert("n2".into(), node(Role::Replica, 7001, 5, ProcessState::Up));
        let mut s = sentinels(vec![vec![(7001, 1)], vec![(7001, 1)], vec![(7000, 0)]]);
        let plan = decide(&desired(), &sd(), &at("n1"), &obs, &s, 0);
        assert!(
            !plan.commands.iter().any(|(p, _)| p == "s2"),
            "its old master not held down: gossip updates it"
        );
        if let Some(m) = monitor_of(&mut s, "s2") {
            m.flags.push("s_down".into());
        }
        let plan = decide(&desired(), &sd(), &at("n1"), &obs, &s, 0);
        assert!(
            plan.commands.iter().any(
                |(p, a)| p == "s2" && matches!(a, Action::SentinelMonitor(m) if m.port == 7001)
            ),
            "{plan:?}"
        );
        assert!(!plan.commands.iter().any(|(p, _)| p == "s0" || p == "s1"));
    }

    #[test]
    fn a_master_whose_address_changed_is_monitored_again_at_the_new_one() {
        // Sentinel names 127.0.0.1:6999, which no node has any longer; n0 is the one master.
        let s = sentinels(vec![vec![(6999, 3)], vec![(6999, 3)], vec![(6999, 3)]]);
        let plan = decide(&desired(), &sd(), &at("n0"), &healthy(), &s, 0);
        let monitored: Vec<&str> = plan
            .commands
            .iter()
            .filter(|(_, a)| matches!(a, Action::SentinelMonitor(m) if m.port == 7000))
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(monitored, ["s0", "s1", "s2"], "{plan:?}");
        // Two nodes claim master: nothing is handed over on a guess.
        let mut two = healthy();
        two.nodes
            .insert("n1".into(), node(Role::Master, 0, 5, ProcessState::Up));
        let plan = decide(&desired(), &sd(), &at("n0"), &two, &s, 0);
        assert!(plan.commands.is_empty(), "{plan:?}");
    }

    #[test]
    fn nothing_is_repointed_while_sentinel_fails_over() {
        let mut obs = healthy();
        obs.nodes
            .insert("n2".into(), node(Role::Replica, 9999, 5, ProcessState::Up));
        let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
        if let Some(report) = s.get_mut("s0").and_then(|o| o.report.as_mut())
            && let Some(m) = report
                .sentinel
                .as_mut()
                .and_then(|st| st.masters.first_mut())
        {
            m.flags.push("failover_in_progress".into());
        }
        let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
        assert!(plan.commands.is_empty(), "{plan:?}");
    }

    #[test]
    fn stale_sentinels_and_replicas_are_reset_only_where_remembered() {
        use valkey_proto::v1::SentinelPeer;
        let peer = |port: u32| SentinelPeer {
            host: "127.0.0.1".into(),
            port,
            ..SentinelPeer::default()
        };
        let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
        let set = |s: &mut BTreeMap<String, NodeObs>,
                   pod: &str,
                   sentinels: Vec<SentinelPeer>,
                   replicas: Vec<SentinelPeer>| {
            if let Some(m) = monitor_of(s, pod) {
                m.sentinels = sentinels;
                m.replicas = replicas;
            }
        };
        // Healthy: peers and replicas all current.
        set(
            &mut s,
            "s0",
            vec![peer(26380), peer(26381)],
            vec![peer(7001), peer(7002)],
        );
        let plan = decide(&desired(), &sd(), &at("n0"), &healthy(), &s, 0);
        assert!(
            !plan
                .commands
                .iter()
                .any(|(_, a)| matches!(a, Action::SentinelReset(_))),
            "{plan:?}"
        );
        // s1 remembers a sentinel on an old port; s2 a replica that no longer exists.
        set(
            &mut s,
            "s1",
            vec![peer(26379), peer(26999)],
            vec![peer(7001)],
        );
        set(
            &mut s,
            "s2",
            vec![peer(26379)],
            vec![peer(7001), peer(7009)],
        );
        let plan = decide(&desired(), &sd(), &at("n0"), &healthy(), &s, 0);
        let resets: Vec<&str> = plan
            .commands
            .iter()
            .filter(|(_, a)| matches!(a, Action::SentinelReset(r) if r.pattern == "ns.demo"))
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(resets, ["s1", "s2"]);
    }

    #[test]
    fn a_restarted_master_is_promoted_back_unless_empty() {
        let s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
        let mut obs = healthy();
        obs.nodes
            .insert("n0".into(), node(Role::Replica, 1, 5, ProcessState::Up));
        let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
        assert!(
            matches!(&plan.commands[..], [(p, Action::Promote(_))] if p == "n0"),
            "{plan:?}"
        );
        obs.nodes
            .insert("n0".into(), node(Role::Replica, 1, 0, ProcessState::Up));
        let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
        assert!(
            matches!(&plan.commands[..], [(_, Action::SentinelFailover(_))]),
            "{plan:?}"
        );
    }
}
