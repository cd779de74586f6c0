//! The Sentinel core's decisions, one behaviour per test.
use valkey_proto::v1::{DataState, SentinelState, StateReport};

use super::*;

fn desired() -> Desired {
    crate::decide::manual::tests::desired(3)
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
        ..NodeObs::default()
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
        ..NodeObs::default()
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
        plan.commands
            .iter()
            .any(|(p, a)| p == "s2" && matches!(a, Action::SentinelMonitor(m) if m.port == 7001)),
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

/// The leader of a switchover waits in `reconf_slaves` until every replica follows the new
/// master (up to failover-timeout), while the other sentinels have switched to it. When the
/// new master dies right then and comes back empty, that stale failover does not hold ours:
/// a sentinel that names the new master is asked to fail over at once.
#[test]
fn a_leader_still_reconfiguring_an_older_failover_does_not_hold_a_new_one() {
    let mut obs = healthy();
    obs.nodes
        .insert("n0".into(), node(Role::Replica, 7001, 5, ProcessState::Up));
    obs.nodes
        .insert("n1".into(), node(Role::Replica, 1, 0, ProcessState::Up));
    if let Some(d) = obs
        .nodes
        .get_mut("n1")
        .and_then(|o| o.report.as_mut())
        .and_then(|r| r.data.as_mut())
    {
        d.restarted_empty = true;
    }
    obs.nodes
        .insert("n2".into(), node(Role::Replica, 7001, 5, ProcessState::Up));
    // s0 led the switchover n0 -> n1 (config epoch 1) and still names n0, reconfiguring; s1
    // and s2 switched to n1 and know its replicas.
    let mut s = sentinels(vec![vec![(7000, 0)], vec![(7001, 1)], vec![(7001, 1)]]);
    if let Some(m) = monitor_of(&mut s, "s0") {
        m.failover_state = "reconf_slaves".into();
        m.flags.push("failover_in_progress".into());
    }
    with_replicas(&mut s, "s1", &[(7000, "slave"), (7002, "slave")]);
    with_replicas(&mut s, "s2", &[(7000, "slave"), (7002, "slave")]);
    let plan = decide(&desired(), &sd(), &at("n1"), &obs, &s, 0);
    assert!(
        matches!(&plan.commands[..], [(p, Action::SentinelFailover(_))] if p == "s1"),
        "{plan:?}"
    );
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
