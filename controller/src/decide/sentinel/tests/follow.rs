//! Policy sentinel, follow: the master is the one the highest config epoch names; the old
//! one is demoted, and nothing is repointed while Sentinel fails over.

use super::*;

#[test]
fn the_highest_config_epoch_names_the_master() {
    let s = sentinels(vec![vec![(7000, 1)], vec![(7001, 2)], vec![(7000, 1)]]);
    let views = views(&sd(), &s);
    assert_eq!(sentinel_master(&views), Some(("127.0.0.1", 7001, 2)));
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

/// The leader of a switchover waits in `reconf_slaves` until every replica follows the new
/// master (up to failover-timeout), while the other sentinels have switched to it. When the
/// new master dies right then and comes back empty, that stale failover does not hold ours:
/// the sentinels that name the new master are steered to fail it over at once.
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
    assert_eq!(plan.sentinel_failover.as_deref(), Some("n0"), "{plan:?}");
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

/// A switchover asked a sentinel that was handed the master again (config epoch 0) while the
/// others are at 10: its failover, not yet promoted, is Sentinel's own, whatever its epoch.
/// The target it just promoted is not demoted as a second master.
#[test]
fn a_failover_at_a_lower_config_epoch_still_holds_the_nodes() {
    let mut obs = healthy();
    obs.nodes
        .insert("n2".into(), node(Role::Master, 0, 5, ProcessState::Up));
    let mut s = sentinels(vec![vec![(7000, 10)], vec![(7000, 0)], vec![(7000, 10)]]);
    if let Some(m) = monitor_of(&mut s, "s1") {
        m.flags = vec!["master".into(), "failover_in_progress".into()];
        m.failover_state = "wait_promotion".into();
    }
    let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
    assert!(!plan.commands.iter().any(|(p, _)| p == "n2"), "{plan:?}");
}

#[test]
fn a_restarted_master_is_promoted_back_unless_empty() {
    let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
    for pod in ["s0", "s1", "s2"] {
        with_replicas(&mut s, pod, &[(7001, "slave"), (7002, "slave")]);
    }
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
    assert_eq!(plan.sentinel_failover.as_deref(), Some("n1"), "{plan:?}");
    assert!(plan.commands.is_empty(), "{plan:?}");
}
