//! The Sentinel core's decisions, one behaviour per test.
use valkey_proto::v1::{DataState, SentinelState, StateReport};

use super::*;

pub(super) fn desired() -> Desired {
    crate::decide::manual::tests::desired(3)
}

pub(super) fn sd() -> SentinelDesired {
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

pub(super) fn node(role: Role, of: u16, keys: u64, process: ProcessState) -> NodeObs {
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

pub(super) fn sentinel(masters: Vec<(u16, u64)>) -> NodeObs {
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

pub(super) fn healthy() -> Observed {
    Observed {
        nodes: BTreeMap::from([
            ("n0".into(), node(Role::Master, 0, 5, ProcessState::Up)),
            ("n1".into(), node(Role::Replica, 7000, 5, ProcessState::Up)),
            ("n2".into(), node(Role::Replica, 7000, 5, ProcessState::Up)),
        ]),
        switchover_in_flight: false,
    }
}

pub(super) fn at(master: &str) -> Durable {
    Durable {
        epoch: 1,
        master: Some(master.into()),
        ..Durable::default()
    }
}

pub(super) fn sentinels(views: Vec<Vec<(u16, u64)>>) -> BTreeMap<String, NodeObs> {
    views
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("s{i}"), sentinel(v)))
        .collect()
}

/// Sentinel `pod`'s view of the monitor, to change.
pub(super) fn monitor_of<'a>(
    s: &'a mut BTreeMap<String, NodeObs>,
    pod: &str,
) -> Option<&'a mut SentinelMaster> {
    s.get_mut(pod)
        .and_then(|o| o.report.as_mut())
        .and_then(|r| r.sentinel.as_mut())
        .and_then(|st| st.masters.first_mut())
}

/// Gives sentinel `pod` these replicas (by port) in its view of the monitor.
pub(super) fn with_replicas(
    s: &mut BTreeMap<String, NodeObs>,
    pod: &str,
    replicas: &[(u32, &str)],
) {
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

mod accelerate;
mod follow;
mod heal;
