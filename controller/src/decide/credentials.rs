//! Nodes that are up but unusable because their Valkey refuses the instance's password (the
//! agent re-read its password file and was refused again): which of them to restart, so that
//! the node starts from a config generated with the password in force. Pure, shared by both
//! policies and both runtimes.

use valkey_proto::v1::ProcessState;

use crate::decide::model::{Desired, Durable, NodeObs, Observed};

/// How long a node must refuse the password before it is repaired: longer than any moment of
/// a rotation in which an agent may hold the password just replaced.
pub const REPAIR_AFTER_MS: u64 = 5_000;

/// What to do about refused credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Nodes to restart.
    pub restart: Vec<String>,
    /// What a person should know (status, Events, logs).
    pub notes: Vec<String>,
}

/// The node's agent is connected and says its Valkey refuses the password it holds (re-read
/// from its file and refused again).
pub fn refuses_password(obs: &NodeObs) -> bool {
    obs.connected
        && obs
            .report
            .as_ref()
            .is_some_and(|r| r.process() == ProcessState::AuthFailed)
}

/// Every node whose agent has reported its Valkey refusing the password for at least
/// [`REPAIR_AFTER_MS`]. A node other than the recorded master is restarted: it serves
/// nobody as it is, and a restart loses nothing (its data is on disk, and it comes back as a
/// replica of nobody that the core points at the master). The master is not restarted: that
/// is a failover, and its replicas may not have every write; a note says what is wrong.
pub fn repairs(desired: &Desired, durable: &Durable, observed: &Observed) -> Repairs {
    let mut out = Repairs::default();
    for node in &desired.nodes {
        let Some(obs) = observed.nodes.get(&node.name) else {
            continue;
        };
        if !(refuses_password(obs) && obs.unhealthy_ms >= REPAIR_AFTER_MS) {
            continue;
        }
        if durable.master.as_deref() == Some(node.name.as_str()) {
            out.notes.push(format!(
                "{} (the master) refuses the instance password; it is not restarted, since \
                 that would be a failover: restore the password or restart it by hand",
                node.name
            ));
        } else {
            out.notes.push(format!(
                "{} refuses the instance password; restarting it with the password in force",
                node.name
            ));
            out.restart.push(node.name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use valkey_proto::v1::StateReport;

    use super::*;

    fn desired() -> Desired {
        crate::decide::manual::tests::desired(3)
    }

    fn obs(process: ProcessState, connected: bool, unhealthy_ms: u64) -> NodeObs {
        NodeObs {
            connected,
            unhealthy_ms,
            report: Some(StateReport {
                process: process.into(),
                ..StateReport::default()
            }),
            ..NodeObs::default()
        }
    }

    #[test]
    fn only_a_replica_refusing_the_password_for_a_while_is_restarted() {
        let durable = Durable {
            epoch: 1,
            master: Some("n0".into()),
            ..Durable::default()
        };
        let cases = [
            // (node, observation, restarted)
            (
                "n1",
                obs(ProcessState::AuthFailed, true, REPAIR_AFTER_MS),
                true,
            ),
            ("n1", obs(ProcessState::AuthFailed, true, u64::MAX), true),
            (
                "n1",
                obs(ProcessState::AuthFailed, true, REPAIR_AFTER_MS - 1),
                false,
            ),
            ("n1", obs(ProcessState::AuthFailed, false, u64::MAX), false),
            ("n1", obs(ProcessState::Up, true, u64::MAX), false),
            ("n1", obs(ProcessState::Down, true, u64::MAX), false),
            ("n0", obs(ProcessState::AuthFailed, true, u64::MAX), false),
        ];
        for (node, observation, restarted) in cases {
            let mut observed = Observed::default();
            observed.nodes.insert(node.into(), observation.clone());
            let got = repairs(&desired(), &durable, &observed);
            assert_eq!(
                got.restart == vec![node.to_owned()],
                restarted,
                "{node} {observation:?}: {got:?}"
            );
            let noted = got.notes.iter().any(|n| n.starts_with(node));
            let refusing = observation.connected
                && observation.unhealthy_ms >= REPAIR_AFTER_MS
                && observation.report.as_ref().map(|r| r.process())
                    == Some(ProcessState::AuthFailed);
            assert_eq!(noted, refusing, "{node} {observation:?}: {got:?}");
        }
    }
}
