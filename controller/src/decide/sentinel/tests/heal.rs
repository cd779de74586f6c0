//! Policy sentinel, heal: sentinels that lost the monitor, its settings or its address, or
//! remember stale peers and replicas, are put right one at a time.

use super::*;

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

/// s0 led a failover to n1 (config epoch 9) and was still pointing the replicas at it when
/// n1 died; s1 and s2 failed n1 over to n0 at epoch 10, and s0, finishing late, switched to
/// n1 at epoch 10 too. Gossip at an equal epoch changes nothing: it is monitored again.
#[test]
fn a_sentinel_overtaken_at_the_same_epoch_monitors_the_master_again() {
    let mut obs = healthy();
    obs.nodes
        .insert("n1".into(), node(Role::Replica, 7000, 5, ProcessState::Up));
    let s = sentinels(vec![vec![(7001, 10)], vec![(7000, 10)], vec![(7000, 10)]]);
    let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
    assert!(
        plan.commands
            .iter()
            .any(|(p, a)| p == "s0" && matches!(a, Action::SentinelMonitor(m) if m.port == 7000)),
        "{plan:?}"
    );
    // Not within a few seconds of the failover the controller followed: Sentinel's gossip
    // may still bring it along, and monitoring it again would reset its config epoch.
    let mut recent = at("n0");
    recent.last_failover = Some(FailoverRecord {
        at_ms: 10_000,
        from: Some("n1".into()),
        to: "n0".into(),
        reason: "Sentinel switched master".into(),
        cause: crate::decide::Cause::Sentinel,
    });
    let soon = decide(
        &desired(),
        &sd(),
        &recent,
        &obs,
        &s,
        10_000 + GOSSIP_GRACE_MS - 1,
    );
    assert!(!soon.commands.iter().any(|(p, _)| p == "s0"), "{soon:?}");
    let later = decide(
        &desired(),
        &sd(),
        &recent,
        &obs,
        &s,
        10_000 + GOSSIP_GRACE_MS,
    );
    assert!(later.commands.iter().any(|(p, _)| p == "s0"), "{later:?}");
    // Not while n1 still claims master: that is two masters, which steady state settles.
    obs.nodes
        .insert("n1".into(), node(Role::Master, 0, 5, ProcessState::Up));
    let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
    assert!(!plan.commands.iter().any(|(p, _)| p == "s0"), "{plan:?}");
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
