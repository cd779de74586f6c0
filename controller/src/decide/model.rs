//! What both policies decide over: the nodes an instance should have (`Desired`), what their
//! agents last said (`Observed`), what must survive a restart of the controller (`Durable`),
//! and what to do now (`Plan`), with the readings of an observation every rule uses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use valkey_proto::v1::{ProcessState, Role, StateReport, command::Action};

use super::Cause;

/// One Valkey node the instance should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub ordinal: u32,
    /// The announced address replicas use to reach it.
    pub host: String,
    pub port: u16,
    /// Being scaled away: never a candidate; removed once it is not the master.
    pub retiring: bool,
}

/// What the instance should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub nodes: Vec<NodeSpec>,
    /// A master that is hung or whose agent is silent this long (and whose replicas agree they
    /// lost it) is failed over.
    pub hang_timeout_ms: u64,
    /// A replica counts its master link as lost when it heard nothing for this long.
    pub replica_silence_s: i64,
    /// Settings kept on every node with CONFIG SET (fencing and user settings).
    pub live_config: BTreeMap<String, String>,
    /// Each node announces its `host` and `port` (replica-announce-ip/-port, kept with CONFIG
    /// SET): the address clients outside the cluster reach it at (NodePort, LoadBalancer).
    pub announce: bool,
}

/// What the controller currently knows of one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeObs {
    /// The agent's stream is up.
    pub connected: bool,
    /// Milliseconds since the node was last seen connected with its Valkey up (u64::MAX: never).
    pub unhealthy_ms: u64,
    /// The agent's latest report.
    pub report: Option<StateReport>,
    /// Milliseconds since the node was last sent a write lease, or since this controller
    /// started if it sent none (its predecessor may have); None: not known to the hub.
    pub lease_granted_ms: Option<u64>,
    /// How many write leases it was sent (to tell whether one went out since).
    pub lease_grants: u64,
}

/// Everything observed, by node name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub nodes: BTreeMap<String, NodeObs>,
    /// A planned switchover's FAILOVER command is being carried out right now.
    pub switchover_in_flight: bool,
}

/// Why the last failover happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub at_ms: i64,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    /// The reason as a closed set (metric labels, Event reasons).
    #[serde(default)]
    pub cause: Cause,
}

/// A planned switchover under way: intent written before the FAILOVER command is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSwitchover {
    pub from: String,
    pub to: String,
    pub epoch: u64,
}

/// The controller's durable state for one instance; persisted before any role change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    pub epoch: u64,
    pub master: Option<String>,
    #[serde(default)]
    pub last_failover: Option<FailoverRecord>,
    #[serde(default)]
    pub switchover: Option<PendingSwitchover>,
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Persist this before sending any command.
    pub durable: Option<Durable>,
    /// Commands, to be sent under the (new) durable epoch.
    pub commands: Vec<(String, Action)>,
    /// A planned switchover the runtime should carry out (to this node, or the best one).
    pub switchover: Option<String>,
    /// Under policy sentinel: the master is lost and the controller chose this replica; the
    /// runtime steers Sentinel's failover to it (see `driver::through_sentinel`).
    pub sentinel_failover: Option<String>,
    /// Nodes the runtime should restart (their Valkey refuses the password in force; see
    /// [`super::credentials`]).
    pub restarts: Vec<String>,
    /// Things worth an Event / a log line.
    pub notes: Vec<String>,
    /// The node to grant the master's write lease to from now on (see [`super::lease`]).
    pub lease_holder: Option<String>,
}

pub(crate) fn data(obs: &NodeObs) -> Option<&valkey_proto::v1::DataState> {
    obs.report.as_ref()?.data.as_ref()
}

/// An agent heard from less recently than this (3 heartbeats) is silent, whatever its stream
/// says: a partition leaves a TCP stream open, unaware, for many seconds.
pub const AGENT_SILENT_MS: u64 = 1_500;

/// Connected and heard from lately, and its Valkey answers.
pub(crate) fn is_up(obs: &NodeObs) -> bool {
    obs.connected
        && obs.unhealthy_ms < AGENT_SILENT_MS
        && obs
            .report
            .as_ref()
            .is_some_and(|r| r.process() == ProcessState::Up && r.data.is_some())
}

pub(crate) fn role(obs: &NodeObs) -> Role {
    data(obs).map(|d| d.role()).unwrap_or(Role::Unspecified)
}

pub(crate) fn follows(obs: &NodeObs, master: &NodeSpec) -> bool {
    data(obs).is_some_and(|d| {
        d.role() == Role::Replica
            && d.master_host == master.host
            && d.master_port == u32::from(master.port)
    })
}

/// Empty after a restart, or never synced: must never be a sync source or a candidate.
pub(crate) fn is_empty_node(obs: &NodeObs) -> bool {
    data(obs).is_some_and(|d| d.restarted_empty || d.never_synced)
}

/// How long the node's Valkey has been down: what its agent last said, or, when its agent has
/// said nothing new since (a process that stays down changes nothing worth a report), how long
/// ago the controller last saw it up, by its own clock.
pub(crate) fn down_for_ms(obs: &NodeObs) -> u64 {
    let reported = obs.report.as_ref().map_or(0, |r| r.down_for_ms);
    let unseen = if obs.unhealthy_ms == u64::MAX {
        0
    } else {
        obs.unhealthy_ms
    };
    reported.max(unseen)
}

/// The agent itself says its Valkey is gone: definite, no vote needed.
pub(crate) fn definitely_down(obs: &NodeObs) -> bool {
    obs.connected
        && obs
            .report
            .as_ref()
            .is_some_and(|r| r.process() == ProcessState::Down)
}

impl Durable {
    /// The state once the controller has moved the master as `record` says: the next epoch,
    /// the new master, and why.
    pub fn failed_over(&self, record: FailoverRecord) -> Durable {
        Durable {
            epoch: self.epoch + 1,
            master: Some(record.to.clone()),
            last_failover: Some(record),
            switchover: self.switchover.clone(),
        }
    }
}

impl Desired {
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}
