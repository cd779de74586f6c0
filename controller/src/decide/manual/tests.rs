//! Table tests of every branch of `decide`, and a property test over random observations.

use proptest::prelude::*;
use valkey_proto::v1::{DataState, ProcessState, StateReport};

use super::*;
use crate::decide::model::PendingSwitchover;

pub(crate) fn desired(n: u32) -> Desired {
    Desired {
        nodes: (0..n)
            .map(|i| NodeSpec {
                name: format!("n{i}"),
                ordinal: i,
                host: "127.0.0.1".into(),
                port: 7000 + i as u16,
                retiring: false,
            })
            .collect(),
        hang_timeout_ms: 3000,
        replica_silence_s: 3,
        live_config: BTreeMap::new(),
        announce: false,
    }
}

fn up(data: DataState) -> NodeObs {
    NodeObs {
        connected: true,
        unhealthy_ms: 0,
        report: Some(StateReport {
            process: ProcessState::Up.into(),
            data: Some(DataState {
                replica_priority: 100,
                ..data
            }),
            ..StateReport::default()
        }),
        ..NodeObs::default()
    }
}

fn master(keys: u64, offset: i64) -> NodeObs {
    up(DataState {
        role: Role::Master.into(),
        key_count: keys,
        repl_offset: offset,
        ..DataState::default()
    })
}

fn replica(of: u16, offset: i64) -> NodeObs {
    up(DataState {
        role: Role::Replica.into(),
        master_host: "127.0.0.1".into(),
        master_port: u32::from(of),
        master_link_up: true,
        key_count: 1,
        repl_offset: offset,
        ..DataState::default()
    })
}

fn with(mut obs: NodeObs, f: impl FnOnce(&mut NodeObs)) -> NodeObs {
    f(&mut obs);
    obs
}

fn data_mut(obs: &mut NodeObs) -> &mut DataState {
    obs.report
        .as_mut()
        .and_then(|r| r.data.as_mut())
        .expect("data")
}

/// Its agent says its Valkey has been gone for a while (long enough that the failover does
/// not wait for the replicas' final offsets).
fn down(obs: NodeObs) -> NodeObs {
    with(obs, |o| {
        if let Some(r) = o.report.as_mut() {
            r.set_process(ProcessState::Down);
            r.down_for_ms = OFFSETS_SETTLE_MS;
        }
        o.unhealthy_ms = 100;
    })
}

/// Its agent says its Valkey is gone this very moment.
fn just_down(obs: NodeObs) -> NodeObs {
    with(down(obs), |o| {
        if let Some(r) = o.report.as_mut() {
            r.down_for_ms = 0;
        }
    })
}

fn observed(nodes: &[(&str, NodeObs)]) -> Observed {
    Observed {
        nodes: nodes
            .iter()
            .map(|(n, o)| ((*n).to_owned(), o.clone()))
            .collect(),
        switchover_in_flight: false,
    }
}

fn at(master: &str, epoch: u64) -> Durable {
    Durable {
        epoch,
        master: Some(master.into()),
        ..Durable::default()
    }
}

fn promotes(plan: &Plan) -> Vec<&str> {
    plan.commands
        .iter()
        .filter(|(_, a)| matches!(a, Action::Promote(_)))
        .map(|(n, _)| n.as_str())
        .collect()
}

fn replicaofs(plan: &Plan) -> Vec<(&str, u32)> {
    plan.commands
        .iter()
        .filter_map(|(n, a)| match a {
            Action::ReplicaOf(r) => Some((n.as_str(), r.port)),
            _ => None,
        })
        .collect()
}

#[test]
fn bootstrap_waits_for_every_node_then_picks_the_most_data() {
    let d = desired(3);
    let partial = observed(&[("n0", master(0, 0)), ("n1", master(5, 0))]);
    assert_eq!(
        decide(&d, &Durable::default(), &partial, 0),
        Plan::default()
    );

    let cases = [
        // (keys, offsets) per node -> chosen
        ([(0, 0), (5, 0), (3, 90)], "n1"),
        ([(5, 10), (5, 20), (5, 20)], "n1"),
        ([(0, 0), (0, 0), (0, 0)], "n0"),
        ([(1, 0), (0, 0), (1, 0)], "n0"),
    ];
    for (nodes, chosen) in cases {
        let obs = observed(&[
            ("n0", master(nodes[0].0, nodes[0].1)),
            ("n1", master(nodes[1].0, nodes[1].1)),
            ("n2", master(nodes[2].0, nodes[2].1)),
        ]);
        let plan = decide(&d, &Durable::default(), &obs, 0);
        let durable = plan.durable.clone().expect("persisted first");
        assert_eq!(
            (durable.epoch, durable.master.as_deref()),
            (1, Some(chosen)),
            "{nodes:?}"
        );
        assert!(
            promotes(&plan).is_empty(),
            "already a master: nothing to promote"
        );
        let port = d.node(chosen).expect("node").port;
        let mut others = replicaofs(&plan);
        others.sort();
        let expected: Vec<(&str, u32)> = ["n0", "n1", "n2"]
            .into_iter()
            .filter(|n| *n != chosen)
            .map(|n| (n, u32::from(port)))
            .collect();
        assert_eq!(others, expected);
    }
}

#[test]
fn bootstrap_promotes_a_chosen_replica() {
    let d = desired(2);
    let obs = observed(&[("n0", replica(9999, 50)), ("n1", master(0, 0))]);
    let plan = decide(&d, &Durable::default(), &obs, 0);
    assert_eq!(
        plan.durable.clone().expect("durable").master.as_deref(),
        Some("n0")
    );
    assert_eq!(promotes(&plan), ["n0"]);
    assert_eq!(replicaofs(&plan), [("n1", 7000)]);
}

#[test]
fn steady_state_does_nothing() {
    let d = desired(3);
    let obs = observed(&[
        ("n0", master(5, 100)),
        ("n1", replica(7000, 100)),
        ("n2", replica(7000, 90)),
    ]);
    assert_eq!(decide(&d, &at("n0", 1), &obs, 0), Plan::default());
}

#[test]
fn wrong_master_and_returning_old_master_are_repointed() {
    let d = desired(3);
    let obs = observed(&[
        ("n0", master(5, 100)),
        ("n1", replica(7002, 100)),
        ("n2", master(5, 80)),
    ]);
    let plan = decide(&d, &at("n0", 2), &obs, 0);
    assert_eq!(plan.durable, None, "no role change, nothing to persist");
    assert_eq!(replicaofs(&plan), [("n1", 7000), ("n2", 7000)]);
    assert!(promotes(&plan).is_empty());
}

/// A replica that has reported losing its master: its offset is final.
fn lost_master(obs: NodeObs) -> NodeObs {
    with(obs, |o| data_mut(o).master_link_up = false)
}

#[test]
fn a_crashed_master_fails_over_at_once_to_the_highest_offset() {
    let d = desired(3);
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", lost_master(replica(7000, 90))),
        ("n2", lost_master(replica(7000, 95))),
    ]);
    let plan = decide(&d, &at("n0", 4), &obs, 1234);
    let durable = plan.durable.clone().expect("durable");
    assert_eq!((durable.epoch, durable.master.as_deref()), (5, Some("n2")));
    let record = durable.last_failover.expect("record");
    assert_eq!(
        (record.at_ms, record.from.as_deref(), record.to.as_str()),
        (1234, Some("n0"), "n2")
    );
    assert!(record.reason.contains("gone"));
    assert_eq!(promotes(&plan), ["n2"]);
    assert_eq!(replicaofs(&plan), [("n1", 7002)]);
}

#[test]
fn a_crashed_master_waits_for_its_replicas_final_offsets_for_a_while() {
    let d = desired(3);
    // n2 still reports its link up: its offset may be a heartbeat old, though it may hold the
    // last acknowledged writes.
    let waiting = observed(&[
        ("n0", just_down(master(5, 100))),
        ("n1", lost_master(replica(7000, 95))),
        ("n2", replica(7000, 90)),
    ]);
    let plan = decide(&d, &at("n0", 4), &waiting, 0);
    assert_eq!(plan.durable, None, "{plan:?}");
    assert!(promotes(&plan).is_empty());
    assert!(
        plan.notes.iter().any(|n| n.contains("final offsets")),
        "{plan:?}"
    );

    // n2 reports losing it, with its final offset, the highest: it is the one promoted.
    let settled = observed(&[
        ("n0", just_down(master(5, 100))),
        ("n1", lost_master(replica(7000, 95))),
        ("n2", lost_master(replica(7000, 99))),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 4), &settled, 0)), ["n2"]);

    // A replica that never reports does not hold the failover up for long.
    let mut late = waiting.clone();
    if let Some(r) = late.nodes.get_mut("n0").and_then(|o| o.report.as_mut()) {
        r.down_for_ms = OFFSETS_SETTLE_MS;
    }
    assert_eq!(promotes(&decide(&d, &at("n0", 4), &late, 0)), ["n1"]);
}

#[test]
fn candidates_exclude_empty_never_synced_and_priority_zero() {
    let d = desired(4);
    let empty = with(replica(7000, 500), |o| data_mut(o).restarted_empty = true);
    let fresh = with(replica(7000, 400), |o| data_mut(o).never_synced = true);
    let zero = with(replica(7000, 300), |o| data_mut(o).replica_priority = 0);
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", empty.clone()),
        ("n2", fresh.clone()),
        ("n3", zero.clone()),
    ]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    assert_eq!(plan.durable, None);
    assert!(promotes(&plan).is_empty());
    assert!(plan.notes[0].contains("no candidate"), "{:?}", plan.notes);

    let ok = replica(7000, 1);
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", empty),
        ("n2", fresh),
        ("n3", ok),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n3"]);
}

#[test]
fn priority_then_ordinal_break_offset_ties() {
    let d = desired(4);
    let p = |prio: u32| with(replica(7000, 100), |o| data_mut(o).replica_priority = prio);
    let obs = observed(&[
        ("n0", down(master(1, 100))),
        ("n1", p(100)),
        ("n2", p(10)),
        ("n3", p(10)),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n2"]);
}

#[test]
fn a_master_restarted_empty_is_never_the_sync_source() {
    let d = desired(3);
    let empty_master = with(master(0, 0), |o| data_mut(o).restarted_empty = true);
    // Its replicas lost their link when it died and have not resynced yet.
    let waiting = |off| with(replica(7000, off), |o| data_mut(o).master_link_up = false);
    let obs = observed(&[
        ("n0", empty_master),
        ("n1", waiting(100)),
        ("n2", waiting(120)),
    ]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    assert_eq!(
        plan.durable.clone().expect("durable").master.as_deref(),
        Some("n2")
    );
    assert_eq!(promotes(&plan), ["n2"]);
    let mut repoint = replicaofs(&plan);
    repoint.sort();
    assert_eq!(
        repoint,
        [("n0", 7002), ("n1", 7002)],
        "the empty node syncs from the new master"
    );
}

#[test]
fn a_single_empty_node_stays_master() {
    let d = desired(1);
    let obs = observed(&[(
        "n0",
        with(master(0, 0), |o| data_mut(o).restarted_empty = true),
    )]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    assert_eq!(plan.durable, None);
    assert!(plan.commands.is_empty());
    assert!(plan.notes[0].contains("stays master"), "{:?}", plan.notes);
}

#[test]
fn a_lost_agent_alone_is_no_reason_to_fail_over() {
    let d = desired(3);
    let lost = with(master(5, 100), |o| {
        o.connected = false;
        o.unhealthy_ms = 60_000;
    });
    let obs = observed(&[
        ("n0", lost),
        ("n1", replica(7000, 100)),
        ("n2", replica(7000, 100)),
    ]);
    assert_eq!(decide(&d, &at("n0", 1), &obs, 0), Plan::default());
}

#[test]
fn a_hung_master_fails_over_only_after_the_timeout_and_when_replicas_agree() {
    let d = desired(3);
    let hung = |ms| {
        with(master(5, 100), |o| {
            if let Some(r) = o.report.as_mut() {
                r.set_process(ProcessState::Hung);
            }
            o.unhealthy_ms = ms;
        })
    };
    let silent = |s| with(replica(7000, 100), |o| data_mut(o).master_last_io_s = s);
    let cases = [
        (2_000, 5, 5, false), // not long enough
        (3_000, 5, 1, false), // one replica still hears it
        (3_000, 5, 5, true),  // timed out and both replicas lost it
        (3_000, 1, 1, false), // replicas still hear it: only the probe is stuck
    ];
    for (ms, io1, io2, fails_over) in cases {
        let obs = observed(&[("n0", hung(ms)), ("n1", silent(io1)), ("n2", silent(io2))]);
        let plan = decide(&d, &at("n0", 1), &obs, 0);
        assert_eq!(
            plan.durable.is_some(),
            fails_over,
            "{ms} {io1} {io2}: {plan:?}"
        );
        assert_eq!(promotes(&plan).len(), usize::from(fails_over));
    }
    // A link reported down (for long enough that the master fenced itself) counts as lost.
    let obs = observed(&[
        ("n0", hung(5_000)),
        (
            "n1",
            with(replica(7000, 1), |o| {
                data_mut(o).master_link_up = false;
                data_mut(o).master_link_down_s = 2;
            }),
        ),
    ]);
    assert_eq!(
        promotes(&decide(&desired(2), &at("n0", 1), &obs, 0)),
        ["n1"]
    );
    // No reachable replica: nobody confirms, nothing happens.
    let obs = observed(&[("n0", hung(60_000))]);
    assert_eq!(decide(&desired(2), &at("n0", 1), &obs, 0), Plan::default());
}

#[test]
fn an_unseen_master_after_a_controller_restart_is_no_reason_to_fail_over() {
    let d = desired(3);
    // The controller just restarted: the master's agent has not said hello yet, and the
    // replicas came back following nobody.
    let nobody = || with(replica(1, 100), |o| data_mut(o).master_link_up = false);
    let obs = observed(&[("n1", nobody()), ("n2", nobody())]);
    let plan = decide(&d, &at("n0", 4), &obs, 0);
    assert!(
        plan.durable.is_none() && promotes(&plan).is_empty(),
        "{plan:?}"
    );
}

#[test]
fn a_pending_switchover_is_left_alone_then_committed_or_dropped() {
    let d = desired(2);
    let pending = Durable {
        switchover: Some(PendingSwitchover {
            from: "n0".into(),
            to: "n1".into(),
            epoch: 3,
        }),
        ..at("n0", 2)
    };
    let mut obs = observed(&[("n0", replica(7001, 100)), ("n1", master(5, 100))]);
    obs.switchover_in_flight = true;
    assert_eq!(decide(&d, &pending, &obs, 0), Plan::default());

    obs.switchover_in_flight = false;
    let done = decide(&d, &pending, &obs, 77).durable.expect("durable");
    assert_eq!(
        (done.epoch, done.master.as_deref(), done.switchover.as_ref()),
        (3, Some("n1"), None)
    );
    assert_eq!(
        done.last_failover.expect("record").reason,
        "planned switchover"
    );

    let obs = observed(&[("n0", master(5, 100)), ("n1", replica(7000, 100))]);
    let dropped = decide(&d, &pending, &obs, 0).durable.expect("durable");
    assert_eq!(
        (
            dropped.epoch,
            dropped.master.as_deref(),
            dropped.switchover.as_ref()
        ),
        (3, Some("n0"), None)
    );
}

#[test]
fn scaling_the_master_away_asks_for_a_switchover_first() {
    let mut d = desired(3);
    d.nodes[2].retiring = true;
    let obs = observed(&[
        ("n0", replica(7002, 100)),
        ("n1", replica(7002, 120)),
        ("n2", master(5, 120)),
    ]);
    let plan = decide(&d, &at("n2", 1), &obs, 0);
    assert_eq!(plan.switchover.as_deref(), Some("n1"));
    assert!(plan.commands.is_empty() && plan.durable.is_none());
    // A retiring node is never a candidate.
    let obs = observed(&[
        ("n0", down(master(5, 100))),
        ("n1", replica(7000, 10)),
        ("n2", replica(7000, 120)),
    ]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n1"]);
}

#[test]
fn a_restarted_master_is_promoted_back_unless_it_came_back_empty() {
    let d = desired(3);
    // Every node starts as a replica of nobody: here the master came back with its data.
    let nobody = |keys: u64, offset| {
        with(replica(1, offset), |o| {
            let d = data_mut(o);
            d.master_link_up = false;
            d.key_count = keys;
        })
    };
    let obs = observed(&[
        ("n0", nobody(5, 100)),
        ("n1", nobody(5, 100)),
        ("n2", nobody(5, 90)),
    ]);
    let plan = decide(&d, &at("n0", 3), &obs, 0);
    assert_eq!(plan.durable, None, "same master, same epoch");
    assert_eq!(promotes(&plan), ["n0"]);

    // Came back empty: a replica holding data takes over instead.
    let empty = with(nobody(0, 0), |o| data_mut(o).restarted_empty = true);
    let obs = observed(&[("n0", empty), ("n1", nobody(5, 100)), ("n2", nobody(5, 90))]);
    let plan = decide(&d, &at("n0", 3), &obs, 0);
    assert_eq!(plan.durable.clone().expect("durable").epoch, 4);
    assert_eq!(promotes(&plan), ["n1"]);

    // Came back with no keys, its agent unaware it ever held any (it crashed right after its
    // first writes), while the replicas hold keys: not promoted back either.
    let unaware = nobody(0, 0);
    let obs = observed(&[
        ("n0", unaware),
        ("n1", nobody(5, 100)),
        ("n2", nobody(5, 90)),
    ]);
    let plan = decide(&d, &at("n0", 3), &obs, 0);
    assert_eq!(promotes(&plan), ["n1"]);

    // Fresh and empty everywhere (nothing was ever written): it is promoted back.
    let fresh = || with(nobody(0, 0), |o| data_mut(o).never_synced = true);
    let obs = observed(&[("n0", fresh()), ("n1", fresh()), ("n2", fresh())]);
    assert_eq!(promotes(&decide(&d, &at("n0", 1), &obs, 0)), ["n0"]);
}

#[test]
fn live_config_drift_is_set() {
    let mut d = desired(2);
    d.live_config = BTreeMap::from([
        ("min-replicas-to-write".into(), "1".into()),
        ("min-replicas-max-lag".into(), "10".into()),
    ]);
    let obs = observed(&[("n0", master(1, 1)), ("n1", replica(7000, 1))]);
    let plan = decide(&d, &at("n0", 1), &obs, 0);
    let sets: Vec<&str> = plan
        .commands
        .iter()
        .filter(|(_, a)| matches!(a, Action::ConfigSet(c) if c.params.len() == 2))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(sets, ["n0", "n1"]);
}

fn arb_obs() -> impl Strategy<Value = NodeObs> {
    (
        any::<bool>(),
        0u64..10_000,
        prop_oneof![
            Just(ProcessState::Up),
            Just(ProcessState::Down),
            Just(ProcessState::Hung)
        ],
        prop_oneof![Just(Role::Master), Just(Role::Replica)],
        0u16..4,
        any::<bool>(),
        0i64..1000,
        0u64..3,
        (
            any::<bool>(),
            any::<bool>(),
            0i64..6,
            prop_oneof![Just(0u32), Just(100u32)],
        ),
    )
        .prop_map(
            |(
                connected,
                unhealthy_ms,
                process,
                role,
                of,
                link,
                offset,
                keys,
                (empty, never, io, prio),
            )| NodeObs {
                connected,
                unhealthy_ms,
                report: Some(StateReport {
                    process: process.into(),
                    data: Some(DataState {
                        role: role.into(),
                        master_host: "127.0.0.1".into(),
                        master_port: 7000 + u32::from(of),
                        master_link_up: link,
                        repl_offset: offset,
                        key_count: keys,
                        restarted_empty: empty,
                        never_synced: never,
                        master_last_io_s: io,
                        replica_priority: prio,
                        ..DataState::default()
                    }),
                    ..StateReport::default()
                }),
                ..NodeObs::default()
            },
        )
}

proptest! {
    /// Over random sequences of observations: every epoch has at most one node promoted, a
    /// promotion always bumps the epoch, and no empty or never-synced node is promoted while a
    /// node that holds data answers.
    #[test]
    fn no_two_masters_in_one_epoch_and_no_empty_promotion(
        steps in proptest::collection::vec(proptest::collection::vec(arb_obs(), 4), 1..25)
    ) {
        let d = desired(4);
        let mut durable = Durable::default();
        let mut promoted_in: BTreeMap<u64, String> = BTreeMap::new();
        for (t, nodes) in steps.into_iter().enumerate() {
            let obs = Observed {
                nodes: nodes.into_iter().enumerate().map(|(i, o)| (format!("n{i}"), o)).collect(),
                switchover_in_flight: false,
            };
            let plan = decide(&d, &durable, &obs, t as i64);
            let next = plan.durable.clone().unwrap_or_else(|| durable.clone());
            prop_assert!(next.epoch >= durable.epoch);
            for node in promotes(&plan) {
                let o = &obs.nodes[node];
                let data = o.report.as_ref().and_then(|r| r.data.as_ref()).expect("data");
                let data_elsewhere = obs.nodes.values().any(|o| {
                    is_up(o) && o.report.as_ref().and_then(|r| r.data.as_ref()).is_some_and(|d| {
                        !d.restarted_empty && !d.never_synced
                    })
                });
                let empty = data.restarted_empty || data.never_synced;
                prop_assert!(!(empty && data_elsewhere), "promoted an empty node {node}");
                prop_assert_eq!(next.master.as_deref(), Some(node));
                if let Some(before) = promoted_in.insert(next.epoch, node.to_owned()) {
                    prop_assert_eq!(&before, node, "two masters promoted in epoch {}", next.epoch);
                }
                if plan.durable.is_some() {
                    prop_assert!(next.epoch > durable.epoch, "a promotion without a new epoch");
                }
            }
            durable = next;
        }
    }
}
