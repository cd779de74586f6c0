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

pub(super) fn up(data: DataState) -> NodeObs {
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

pub(super) fn master(keys: u64, offset: i64) -> NodeObs {
    up(DataState {
        role: Role::Master.into(),
        key_count: keys,
        repl_offset: offset,
        ..DataState::default()
    })
}

pub(super) fn replica(of: u16, offset: i64) -> NodeObs {
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

pub(super) fn with(mut obs: NodeObs, f: impl FnOnce(&mut NodeObs)) -> NodeObs {
    f(&mut obs);
    obs
}

pub(super) fn data_mut(obs: &mut NodeObs) -> &mut DataState {
    obs.report
        .as_mut()
        .and_then(|r| r.data.as_mut())
        .expect("data")
}

/// Its agent says its Valkey has been gone for a while (long enough that the failover does
/// not wait for the replicas' final offsets).
pub(super) fn down(obs: NodeObs) -> NodeObs {
    with(obs, |o| {
        if let Some(r) = o.report.as_mut() {
            r.set_process(ProcessState::Down);
            r.down_for_ms = OFFSETS_SETTLE_MS;
        }
        o.unhealthy_ms = 100;
    })
}

/// Its agent says its Valkey is gone this very moment.
pub(super) fn just_down(obs: NodeObs) -> NodeObs {
    with(down(obs), |o| {
        if let Some(r) = o.report.as_mut() {
            r.down_for_ms = 0;
        }
    })
}

pub(super) fn observed(nodes: &[(&str, NodeObs)]) -> Observed {
    Observed {
        nodes: nodes
            .iter()
            .map(|(n, o)| ((*n).to_owned(), o.clone()))
            .collect(),
        switchover_in_flight: false,
    }
}

pub(super) fn at(master: &str, epoch: u64) -> Durable {
    Durable {
        epoch,
        master: Some(master.into()),
        ..Durable::default()
    }
}

pub(super) fn promotes(plan: &Plan) -> Vec<&str> {
    plan.commands
        .iter()
        .filter(|(_, a)| matches!(a, Action::Promote(_)))
        .map(|(n, _)| n.as_str())
        .collect()
}

pub(super) fn replicaofs(plan: &Plan) -> Vec<(&str, u32)> {
    plan.commands
        .iter()
        .filter_map(|(n, a)| match a {
            Action::ReplicaOf(r) => Some((n.as_str(), r.port)),
            _ => None,
        })
        .collect()
}

/// A replica that has reported losing its master: its offset is final.
/// A replica whose agent heard its master's process close the connection, and then probed
/// its link down: its offset is final.
pub(super) fn lost_master(obs: NodeObs) -> NodeObs {
    with(obs, |o| {
        let d = data_mut(o);
        d.master_link_up = false;
        d.master_close_heard = true;
    })
}

pub(super) fn arb_obs() -> impl Strategy<Value = NodeObs> {
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

mod bootstrap;
mod commit_switchover;
mod fail_over;
mod steady;
mod why_failed;
