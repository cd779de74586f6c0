//! Policy sentinel, accelerate: a lost master is failed over at once, to the replica the
//! controller chooses (the highest final offset), through Sentinel when a sentinel knows it,
//! or by the controller itself in the bootstrap window.

use super::*;
use crate::decide::Cause;

/// The master n0's process is gone; n1 and n2 followed it, at these offsets, and have
/// reported their links down (`final_offsets`) or not yet.
fn lost(offsets: [i64; 2], final_offsets: bool) -> Observed {
    let mut obs = healthy();
    obs.nodes
        .insert("n0".into(), node(Role::Master, 0, 5, ProcessState::Down));
    for (name, offset) in [("n1", offsets[0]), ("n2", offsets[1])] {
        let d = obs
            .nodes
            .get_mut(name)
            .and_then(|o| o.report.as_mut()?.data.as_mut());
        if let Some(d) = d {
            d.repl_offset = offset;
            d.master_link_up = !final_offsets;
            d.master_close_heard = final_offsets;
        }
    }
    obs
}

/// The sentinels a plan hands the master at `port` (SENTINEL MONITOR).
fn monitored_at(plan: &Plan, port: u32) -> Vec<&str> {
    plan.commands
        .iter()
        .filter_map(|(p, a)| match a {
            Action::SentinelMonitor(m) if m.port == port => Some(p.as_str()),
            _ => None,
        })
        .collect()
}

/// Three sentinels naming n0 at config epoch 0, each knowing both replicas.
fn knowing() -> BTreeMap<String, NodeObs> {
    let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
    for pod in ["s0", "s1", "s2"] {
        with_replicas(&mut s, pod, &[(7001, "slave"), (7002, "slave")]);
    }
    s
}

#[test]
fn a_gone_master_waits_for_its_replicas_final_offsets_then_fails_over_to_the_highest() {
    let s = knowing();
    let waiting = decide(&desired(), &sd(), &at("n0"), &lost([90, 120], false), &s, 0);
    assert_eq!(waiting.sentinel_failover, None, "{waiting:?}");
    assert!(waiting.commands.is_empty(), "{waiting:?}");
    assert!(waiting.notes.iter().any(|n| n.contains("final offsets")));

    // n2 has the most data: it is the one Sentinel is steered to, whatever its cache says.
    let plan = decide(&desired(), &sd(), &at("n0"), &lost([90, 120], true), &s, 0);
    assert_eq!(plan.sentinel_failover.as_deref(), Some("n2"), "{plan:?}");
    assert_eq!(
        plan.durable, None,
        "Sentinel promotes it and the controller follows"
    );
    assert!(plan.commands.is_empty(), "{plan:?}");
    let plan = decide(&desired(), &sd(), &at("n0"), &lost([150, 120], true), &s, 0);
    assert_eq!(plan.sentinel_failover.as_deref(), Some("n1"));
}

#[test]
fn a_master_lost_before_any_sentinel_knew_a_replica_is_failed_over_by_the_controller() {
    // The bootstrap window: the sentinels monitor n0 but have not read its INFO yet.
    let s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
    let plan = decide(&desired(), &sd(), &at("n0"), &lost([90, 120], true), &s, 7);
    assert_eq!(plan.sentinel_failover, None);
    let next = plan.durable.as_ref().expect("a new durable state");
    assert_eq!((next.master.as_deref(), next.epoch), (Some("n2"), 2));
    let record = next.last_failover.as_ref().expect("a failover record");
    assert_eq!((record.cause, record.at_ms), (Cause::ProcessGone, 7));
    assert!(
        plan.commands
            .iter()
            .any(|(p, a)| p == "n2" && matches!(a, Action::Promote(_)))
    );
    assert!(
        plan.commands
            .iter()
            .any(|(p, a)| p == "n1" && matches!(a, Action::ReplicaOf(r) if r.port == 7002))
    );
    let monitored = monitored_at(&plan, 7002);
    assert_eq!(monitored, ["s0", "s1", "s2"], "every sentinel is handed n2");
}

#[test]
fn the_controller_never_hands_over_once_a_sentinel_has_failed_over() {
    // s2 moved the master before (config epoch 3) and knows no replica now: a hand-over would
    // put the others at epoch 0, and its hello messages would send them back to n0.
    let s = sentinels(vec![vec![(7000, 3)], vec![(7000, 3)], vec![(7000, 3)]]);
    let plan = decide(&desired(), &sd(), &at("n0"), &lost([90, 120], true), &s, 0);
    assert_eq!((plan.durable, plan.sentinel_failover), (None, None));
    assert!(plan.commands.is_empty(), "{:?}", plan.commands);
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("no sentinel knows n2"))
    );
}

#[test]
fn a_handed_over_master_is_kept_while_sentinels_still_name_the_dead_one() {
    // After the hand-over: two sentinels still name n0 (down), one names n2, all at epoch 0.
    let mut obs = lost([90, 120], true);
    obs.nodes
        .insert("n2".into(), node(Role::Master, 0, 5, ProcessState::Up));
    obs.nodes
        .insert("n1".into(), node(Role::Replica, 7002, 5, ProcessState::Up));
    let s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7002, 0)]]);
    let mut durable = at("n2");
    durable.epoch = 2;
    let plan = decide(&desired(), &sd(), &durable, &obs, &s, 0);
    assert_eq!(plan.durable, None, "n2 stays recorded: {plan:?}");
    let monitored = monitored_at(&plan, 7002);
    assert_eq!(monitored, ["s0", "s1"]);
    // Once a sentinel failed over (epoch 1), its choice is followed as always.
    let s = sentinels(vec![vec![(7000, 1)], vec![(7000, 1)], vec![(7002, 0)]]);
    let plan = decide(&desired(), &sd(), &durable, &obs, &s, 0);
    assert_eq!(
        plan.durable.and_then(|d| d.master),
        Some("n0".to_owned()),
        "Sentinel's choice at a higher config epoch is followed"
    );
}

#[test]
fn a_failover_whose_replica_is_promoted_does_not_hold_up_the_next_one() {
    // s0 led a failover to n0 and is still pointing the other replicas at it (reconf_slaves,
    // for up to failover-timeout); n0 died meanwhile. s1 and s2 run none and know the replicas.
    let mut s = knowing();
    if let Some(m) = monitor_of(&mut s, "s0") {
        m.flags = vec!["master".into(), "failover_in_progress".into()];
        m.failover_state = "reconf_slaves".into();
    }
    let plan = decide(&desired(), &sd(), &at("n0"), &lost([90, 120], true), &s, 0);
    assert_eq!(plan.sentinel_failover.as_deref(), Some("n2"), "{plan:?}");
    // A failover that has not promoted its replica yet is Sentinel's: nothing is done.
    if let Some(m) = monitor_of(&mut s, "s0") {
        m.failover_state = "wait_promotion".into();
    }
    let plan = decide(&desired(), &sd(), &at("n0"), &lost([90, 120], true), &s, 0);
    assert_eq!(plan.sentinel_failover, None, "{plan:?}");
}

#[test]
fn an_objectively_down_master_with_no_failover_running_is_failed_over_again() {
    let mut obs = healthy();
    obs.nodes
        .insert("n0".into(), node(Role::Master, 0, 5, ProcessState::Hung));
    let mut s = knowing();
    let chosen = |s: &BTreeMap<String, NodeObs>, obs: &Observed| {
        decide(&desired(), &sd(), &at("n0"), obs, s, 0).sentinel_failover
    };
    // Hung, and no sentinel says more than that yet: left to Sentinel's timing.
    assert_eq!(chosen(&s, &obs), None);
    let flags = |s: &mut BTreeMap<String, NodeObs>, flags: &[&str], state: &str| {
        if let Some(m) = monitor_of(s, "s1") {
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
    assert_eq!(chosen(&s, &obs), None);
    // Objectively down and no failover runs (Sentinel aborted one): failed over again.
    flags(&mut s, &["master", "s_down", "o_down"], "none");
    assert_eq!(chosen(&s, &obs).as_deref(), Some("n1"));
    // Not if the master answers after all.
    assert_eq!(chosen(&s, &healthy()), None);
}

#[test]
fn with_no_replica_to_choose_a_sentinel_that_knows_the_replicas_chooses() {
    // Both replicas came back empty: the controller has no candidate; Sentinel is asked, by
    // one that lists every replica (s0 has not seen its master's INFO; s1 lists one down).
    let mut obs = lost([0, 0], true);
    for name in ["n1", "n2"] {
        if let Some(d) = obs
            .nodes
            .get_mut(name)
            .and_then(|o| o.report.as_mut()?.data.as_mut())
        {
            d.restarted_empty = true;
        }
    }
    let mut s = sentinels(vec![vec![(7000, 0)], vec![(7000, 0)], vec![(7000, 0)]]);
    with_replicas(&mut s, "s1", &[(7001, "slave"), (7002, "slave,s_down")]);
    with_replicas(&mut s, "s2", &[(7001, "slave"), (7002, "slave")]);
    assert_eq!(sentinels_able_to_fail_over(&desired(), &sd(), "n0", &s), 1);
    let plan = decide(&desired(), &sd(), &at("n0"), &obs, &s, 0);
    assert!(
        matches!(&plan.commands[..], [(p, Action::SentinelFailover(_))] if p == "s2"),
        "{plan:?}"
    );
}

#[test]
fn a_master_lost_before_any_sentinel_monitors_it_is_kept_as_under_policy_manual() {
    // n0 was chosen at bootstrap and died before the sentinels were handed it.
    let unmonitored = sentinels(vec![vec![], vec![], vec![]]);
    let mut obs = lost([90, 120], true);
    let plan = decide(&desired(), &sd(), &at("n0"), &obs, &unmonitored, 0);
    assert_eq!(
        plan.durable.and_then(|d| d.master).as_deref(),
        Some("n2"),
        "failed over as the manual core does"
    );
    // Back as a replica of nobody, with its data, and nobody else has more: promoted back,
    // then handed to the sentinels once it serves.
    obs.nodes
        .insert("n0".into(), node(Role::Replica, 1, 5, ProcessState::Up));
    obs.nodes
        .insert("n1".into(), node(Role::Replica, 7000, 5, ProcessState::Up));
    obs.nodes
        .insert("n2".into(), node(Role::Replica, 7000, 5, ProcessState::Up));
    let plan = decide(&desired(), &sd(), &at("n0"), &obs, &unmonitored, 0);
    assert!(
        plan.commands
            .iter()
            .any(|(p, a)| p == "n0" && matches!(a, Action::Promote(_))),
        "{plan:?}"
    );
    assert!(
        !plan
            .commands
            .iter()
            .any(|(_, a)| matches!(a, Action::SentinelMonitor(_)))
    );
}
