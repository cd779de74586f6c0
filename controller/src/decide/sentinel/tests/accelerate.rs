//! Policy sentinel, accelerate: a master that is gone is failed over at once, by a sentinel
//! that knows the replicas.

use super::*;

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
