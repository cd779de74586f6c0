//! The lease rule as the failover core applies it: no promotion while a cut-off master could
//! still hold its write lease, and who is granted it under each policy.

use std::collections::BTreeMap;

use valkey_proto::v1::{
    DataState, ProcessState, Role, SentinelMaster, SentinelState, StateReport, command::Action,
};

use super::*;
use crate::decide::{
    manual::{decide, tests::desired},
    model::Durable,
};

fn report(role: Role, process: ProcessState, f: impl FnOnce(&mut DataState)) -> NodeObs {
    let mut data = DataState {
        role: role.into(),
        master_host: "127.0.0.1".into(),
        master_port: 7000,
        master_link_up: role == Role::Replica,
        key_count: 5,
        repl_offset: 100,
        replica_priority: 100,
        ..DataState::default()
    };
    f(&mut data);
    NodeObs {
        connected: true,
        report: Some(StateReport {
            process: process.into(),
            data: Some(data),
            ..StateReport::default()
        }),
        ..NodeObs::default()
    }
}

/// The master's agent silent for 4 s (past the 3 s hang timeout), last granted `granted` ms ago.
fn cut_off_master(granted: Option<u64>) -> NodeObs {
    NodeObs {
        connected: false,
        unhealthy_ms: 4_000,
        lease_granted_ms: granted,
        ..report(Role::Master, ProcessState::Up, |_| {})
    }
}

/// A replica that has heard nothing from the master for `silent_s` seconds.
fn silent_replica(silent_s: i64) -> NodeObs {
    report(Role::Replica, ProcessState::Up, |d| {
        d.master_last_io_s = silent_s
    })
}

fn observed(nodes: Vec<(&str, NodeObs)>) -> Observed {
    Observed {
        nodes: nodes.into_iter().map(|(n, o)| (n.to_owned(), o)).collect(),
        switchover_in_flight: false,
    }
}

fn at_n0() -> Durable {
    Durable {
        epoch: 1,
        master: Some("n0".into()),
        ..Durable::default()
    }
}

fn promoted(plan: &crate::decide::model::Plan) -> bool {
    plan.commands
        .iter()
        .any(|(_, a)| matches!(a, Action::Promote(_)))
}

#[test]
fn no_promotion_until_the_last_grant_is_a_lease_and_a_margin_old() {
    let d = desired(3);
    for (granted, fails_over) in [
        (Some(100), false),
        (Some(LEASE_MS + MARGIN_MS - 1), false),
        (Some(LEASE_MS + MARGIN_MS), true),
        (None, true),
    ] {
        let obs = observed(vec![
            ("n0", cut_off_master(granted)),
            ("n1", silent_replica(5)),
            ("n2", silent_replica(5)),
        ]);
        let plan = decide(&d, &at_n0(), &obs, 0);
        assert_eq!(promoted(&plan), fails_over, "{granted:?}: {plan:?}");
        if !fails_over {
            assert!(
                plan.notes.iter().any(|n| n.contains("write lease")),
                "the wait is said: {:?}",
                plan.notes
            );
        }
    }
}

#[test]
fn a_replica_that_heard_the_master_less_than_a_lease_a_margin_and_a_ping_ago_holds_it() {
    let d = desired(3);
    let master = &d.nodes[0];
    // A master may have had an acknowledgement up to a ping period after a replica last heard
    // from it: 2 s of silence leaves 1 s, less than the lease and its margin.
    let obs = |silent_s| {
        observed(vec![
            ("n0", cut_off_master(None)),
            ("n1", silent_replica(silent_s)),
            ("n2", silent_replica(5)),
        ])
    };
    let why = lapsed(&obs(2), master).expect_err("n1 may still renew it");
    assert!(why.contains("replica n1"), "{why}");
    assert_eq!(lapsed(&obs(3), master), Ok(()));
    // A link reported down: from the moment it went down.
    let down = |s| {
        report(Role::Replica, ProcessState::Up, |d| {
            d.master_link_up = false;
            d.master_link_down_s = s;
        })
    };
    let obs = |s| observed(vec![("n0", cut_off_master(None)), ("n1", down(s))]);
    assert!(lapsed(&obs(1), master).is_err());
    assert_eq!(lapsed(&obs(2), master), Ok(()));
}

#[test]
fn a_2_1_split_leaves_the_master_and_its_linked_replica_alone() {
    // The controller and n2 on one side, the master and n1 on the other: n1's agent is not
    // heard, and its last word was that it is linked to the master.
    let d = desired(3);
    let unheard = NodeObs {
        connected: false,
        unhealthy_ms: 4_000,
        ..silent_replica(0)
    };
    let obs = observed(vec![
        ("n0", cut_off_master(Some(10_000))),
        ("n1", unheard),
        ("n2", silent_replica(6)),
    ]);
    let plan = decide(&d, &at_n0(), &obs, 0);
    assert!(!promoted(&plan), "{plan:?}");
    assert!(
        plan.notes.iter().any(|n| n.contains("not heard")),
        "{:?}",
        plan.notes
    );
}

#[test]
fn a_master_whose_process_is_gone_is_failed_over_without_waiting_for_its_lease() {
    let d = desired(3);
    let mut gone = report(Role::Master, ProcessState::Down, |_| {});
    gone.lease_granted_ms = Some(10);
    if let Some(r) = gone.report.as_mut() {
        r.down_for_ms = 2_000;
    }
    let link_down = || {
        report(Role::Replica, ProcessState::Up, |d| {
            d.master_link_up = false;
        })
    };
    let obs = observed(vec![("n0", gone), ("n1", link_down()), ("n2", link_down())]);
    assert!(promoted(&decide(&d, &at_n0(), &obs, 0)));
}

#[test]
fn the_lease_goes_to_the_recorded_master_of_an_instance_that_can_fail_over() {
    assert_eq!(holder_manual(&desired(3), Some("n1")), Some("n1".into()));
    assert_eq!(holder_manual(&desired(3), None), None);
    // A single node has nothing to fail over to: it is never fenced.
    assert_eq!(holder_manual(&desired(1), Some("n0")), None);
}

#[test]
fn a_hung_or_demoted_node_is_granted_nothing() {
    let up = report(Role::Master, ProcessState::Up, |_| {});
    assert!(grantable(up.report.as_ref()));
    let hung = report(Role::Master, ProcessState::Hung, |_| {});
    assert!(!grantable(hung.report.as_ref()));
    let replica = report(Role::Replica, ProcessState::Up, |_| {});
    assert!(!grantable(replica.report.as_ref()));
    assert!(!grantable(None));
}

fn sentinel_naming(port: u16, flags: &[&str]) -> NodeObs {
    NodeObs {
        connected: true,
        report: Some(StateReport {
            process: ProcessState::Up.into(),
            sentinel: Some(SentinelState {
                masters: vec![SentinelMaster {
                    name: "ns.demo".into(),
                    host: "127.0.0.1".into(),
                    port: u32::from(port),
                    config_epoch: 1,
                    flags: flags.iter().map(|f| (*f).to_owned()).collect(),
                    ..SentinelMaster::default()
                }],
                ..SentinelState::default()
            }),
            ..StateReport::default()
        }),
        ..NodeObs::default()
    }
}

#[test]
fn under_sentinel_the_lease_needs_a_quorum_of_sentinels_naming_the_master_up() {
    let d = desired(3);
    let sd = SentinelDesired {
        name: "ns.demo".into(),
        quorum: 2,
        monitor_config: BTreeMap::new(),
        sentinel_addrs: Vec::new(),
        announce: BTreeMap::new(),
    };
    let sentinels = |list: Vec<NodeObs>| -> BTreeMap<String, NodeObs> {
        list.into_iter()
            .enumerate()
            .map(|(i, o)| (format!("s{i}"), o))
            .collect()
    };
    let two = sentinels(vec![
        sentinel_naming(7000, &["master"]),
        sentinel_naming(7000, &["master"]),
    ]);
    assert_eq!(
        holder_sentinel(&d, &sd, Some("n0"), &two),
        Some("n0".into())
    );
    // Only one heard: the controller cannot vouch for the master.
    let one = sentinels(vec![sentinel_naming(7000, &["master"])]);
    assert_eq!(holder_sentinel(&d, &sd, Some("n0"), &one), None);
    // The sentinels hold it down: a failover may be on its way.
    let down = sentinels(vec![
        sentinel_naming(7000, &["master", "s_down"]),
        sentinel_naming(7000, &["master"]),
    ]);
    assert_eq!(holder_sentinel(&d, &sd, Some("n0"), &down), None);
    // They name another node.
    assert_eq!(holder_sentinel(&d, &sd, Some("n1"), &two), None);
}
