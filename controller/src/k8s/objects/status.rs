//! The Failover's status, built purely from what the agents report, the controller's durable
//! state and the pods, and the durable state read back from a status. Phase `Ready` only when
//! every pod runs, exactly one master serves and every replica's link to it is up.

use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use std::collections::BTreeMap;

use valkey_proto::v1::Role;

use crate::k8s::Names;
use crate::{
    crd::{
        FailoverStatus, MonitorStatus, NodeRole, PendingSwitchoverStatus, Phase, Policy,
        SentinelMonitorNode, ValkeyNode,
    },
    decide::model::{Durable, FailoverRecord, Observed, PendingSwitchover},
};

/// The durable state kept in the status: epoch, master, last failover, pending switchover.
pub fn durable_from(status: Option<&FailoverStatus>) -> Durable {
    let Some(status) = status else {
        return Durable::default();
    };
    let at_ms = status
        .last_failover_time
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map_or(0, |t| t.as_millisecond());
    Durable {
        epoch: status.epoch.max(0) as u64,
        master: status.master.clone(),
        last_failover: status
            .master
            .clone()
            .zip(status.last_failover_reason.clone())
            .map(|(to, reason)| FailoverRecord {
                at_ms,
                from: status.last_failover_from.clone(),
                to,
                reason,
                cause: crate::decide::Cause::Unknown,
            }),
        switchover: status
            .pending_switchover
            .as_ref()
            .map(|p| PendingSwitchover {
                from: p.from.clone(),
                to: p.to.clone(),
                epoch: p.epoch.max(0) as u64,
            }),
    }
}

/// Writes the durable state into a status.
pub fn durable_into(durable: &Durable, status: &mut FailoverStatus) {
    status.epoch = durable.epoch as i64;
    status.master = durable.master.clone();
    if let Some(last) = &durable.last_failover {
        status.last_failover_time = Timestamp::from_millisecond(last.at_ms)
            .ok()
            .map(|t| t.to_string());
        status.last_failover_reason = Some(last.reason.clone());
        status.last_failover_from = last.from.clone();
    }
    status.pending_switchover = durable
        .switchover
        .as_ref()
        .map(|p| PendingSwitchoverStatus {
            from: p.from.clone(),
            to: p.to.clone(),
            epoch: p.epoch as i64,
        });
}

/// Everything the status is built from.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub names: &'a Names,
    pub replicas: i32,
    pub generation: Option<i64>,
    pub paused: bool,
    pub durable: &'a Durable,
    /// The master's announced `host:port`, which every replica must follow.
    pub master_addr: Option<String>,
    pub observed: &'a Observed,
    pub pods: &'a [Pod],
    pub sentinel: Option<SentinelInputs>,
    /// The TLS Secret the data nodes serve from, when TLS is on.
    pub tls_secret: Option<String>,
    /// While a password rotation lets both passwords in: the Secret that holds the old one
    /// (key `password.old`).
    pub old_password_secret: Option<String>,
    /// The address each node announces to clients outside the cluster, where it does.
    pub announced: BTreeMap<String, (String, u16)>,
    pub now: Timestamp,
}

#[derive(Debug)]
pub struct SentinelInputs {
    pub monitor: String,
    pub password_secret: Option<String>,
    /// The TLS Secret the sentinels serve from, when TLS is on.
    pub tls_secret: Option<String>,
    /// The sentinels in use: host and port.
    pub nodes: Vec<(String, i32)>,
    pub quorum: u32,
    /// How many sentinels know every replica and so could fail the master over now.
    pub able_to_fail_over: usize,
}

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

pub fn build(inputs: &Inputs<'_>) -> FailoverStatus {
    let mut status = FailoverStatus {
        tls_secret: inputs.tls_secret.clone(),
        ..FailoverStatus::default()
    };
    durable_into(inputs.durable, &mut status);
    status.observed_generation = inputs.generation;
    status.nodes = (0..inputs.replicas).map(|o| node(inputs, o)).collect();
    let health = Health::of(inputs, &status.nodes);
    (status.phase, status.message) = phase(inputs, &status.nodes, &health);
    status.conditions = conditions(inputs, &health, &status.message);
    status.monitor = monitor(inputs);
    status.monitor.old_password_secret = inputs.old_password_secret.clone();
    status
}

/// One data node as its agent reports it.
fn node(inputs: &Inputs<'_>, ordinal: i32) -> ValkeyNode {
    let names = inputs.names;
    let pod_name = names.pod(ordinal);
    let pod = inputs
        .pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(&pod_name));
    let obs = inputs.observed.nodes.get(&pod_name);
    // What a node whose agent is gone, or whose Valkey is down, last said is history.
    let data = obs
        .filter(|o| o.connected)
        .and_then(|o| o.report.as_ref())
        .filter(|r| r.process() == valkey_proto::v1::ProcessState::Up)
        .and_then(|r| r.data.as_ref());
    let role = match data.map(|d| d.role()) {
        Some(Role::Master) => NodeRole::Master,
        Some(Role::Replica) => NodeRole::Replica,
        _ => NodeRole::None,
    };
    let master_offset = inputs
        .durable
        .master
        .as_ref()
        .and_then(|m| inputs.observed.nodes.get(m))
        .and_then(|o| o.report.as_ref()?.data.as_ref())
        .map(|d| d.repl_offset);
    let announced = inputs.announced.get(&pod_name);
    ValkeyNode {
        id: data.map(|d| d.run_id.clone()).unwrap_or_default(),
        role,
        ip: match announced {
            Some((host, _)) => host.clone(),
            None => pod
                .and_then(|p| p.status.as_ref()?.pod_ip.clone())
                .unwrap_or_default(),
        },
        port: announced.map_or(crate::k8s::VALKEY_PORT, |(_, port)| i32::from(*port)),
        master_ref: data
            .filter(|d| d.role() == Role::Replica && d.master_port > 1)
            .map(|d| format!("{}:{}", d.master_host, d.master_port)),
        stateful_set: names.data(),
        node_name: pod
            .and_then(|p| p.spec.as_ref()?.node_name.clone())
            .unwrap_or_default(),
        pod_name,
        repl_offset: data.map_or(0, |d| d.repl_offset),
        lag: match (data, master_offset) {
            (Some(d), Some(m)) if role == NodeRole::Replica => (m - d.repl_offset).max(0),
            _ => 0,
        },
        link_up: data.is_some_and(|d| d.master_link_up),
        fenced: data.is_some_and(|d| d.fenced),
    }
}

/// What the phase and the conditions are judged from.
struct Health<'a> {
    /// Nodes that claim master.
    masters: usize,
    /// Every node but the master follows it, linked.
    replicas_in_sync: bool,
    /// Every node's agent is connected.
    all_reporting: bool,
    /// Under policy sentinel, fewer than the quorum of sentinels know the replicas: a master
    /// lost now would not be failed over (NOGOODSLAVE).
    sentinels_short: Option<&'a SentinelInputs>,
    ready: bool,
}

impl<'a> Health<'a> {
    fn of(inputs: &'a Inputs<'_>, nodes: &[ValkeyNode]) -> Self {
        let master = inputs.durable.master.as_ref();
        let masters = nodes.iter().filter(|n| n.role == NodeRole::Master).count();
        let master_node = nodes.iter().find(|n| Some(&n.pod_name) == master);
        let replicas_in_sync = nodes
            .iter()
            .filter(|n| Some(&n.pod_name) != master)
            .all(|n| {
                n.role == NodeRole::Replica
                    && n.link_up
                    && n.master_ref == inputs.master_addr
                    && synced(inputs, n)
            });
        let all_reporting = nodes.iter().all(|n| reporting(inputs, n));
        let sentinels_short = inputs
            .sentinel
            .as_ref()
            .filter(|s| s.able_to_fail_over < s.quorum as usize);
        let ready = !inputs.paused
            && masters == 1
            && master_node.is_some_and(|n| n.role == NodeRole::Master)
            && replicas_in_sync
            && all_reporting
            && sentinels_short.is_none();
        Health {
            masters,
            replicas_in_sync,
            all_reporting,
            sentinels_short,
            ready,
        }
    }
}

/// Its agent's latest report has it done syncing and loading: a replica whose link is up can
/// still be loading what it was sent, and then it has none of it to serve or to promote.
fn synced(inputs: &Inputs<'_>, node: &ValkeyNode) -> bool {
    inputs
        .observed
        .nodes
        .get(&node.pod_name)
        .and_then(|o| o.report.as_ref()?.data.as_ref())
        .is_some_and(|d| !d.master_sync_in_progress && !d.loading)
}

fn reporting(inputs: &Inputs<'_>, node: &ValkeyNode) -> bool {
    inputs
        .observed
        .nodes
        .get(&node.pod_name)
        .is_some_and(|o| o.connected)
}

/// The phase, and the message that says why.
fn phase(inputs: &Inputs<'_>, nodes: &[ValkeyNode], health: &Health<'_>) -> (Phase, String) {
    if inputs.paused {
        return (
            Phase::Paused,
            "paused: scaled to zero pods; PVCs and Secrets kept".into(),
        );
    }
    if health.ready {
        return (
            Phase::Ready,
            format!(
                "master {} with {} replica(s) in sync",
                inputs.durable.master.as_deref().unwrap_or("?"),
                inputs.replicas - 1
            ),
        );
    }
    let why = if health.masters > 1 {
        format!(
            "{} nodes claim master; the controller is demoting the extra one",
            health.masters
        )
    } else if !health.all_reporting {
        let waiting = nodes
            .iter()
            .filter(|n| !reporting(inputs, n))
            .map(|n| n.pod_name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        format!("waiting for the agents of {waiting}")
    } else if let Some(refusing) = refusing_password(inputs) {
        format!(
            "{refusing}: up, but refusing the instance password \
             (a replica is restarted, the master is not; see Events)"
        )
    } else if inputs.durable.master.is_none() {
        "choosing a master".into()
    } else if let Some(s) = health.sentinels_short.filter(|_| health.replicas_in_sync) {
        format!(
            "replicas in sync, but only {} of the {} sentinels needed (quorum) know them all \
             yet: Sentinel could not fail the master over now",
            s.able_to_fail_over, s.quorum
        )
    } else {
        "replicas are syncing".into()
    };
    (Phase::Creating, why)
}

/// Ready, Progressing and Degraded, each with the phase's message.
fn conditions(inputs: &Inputs<'_>, health: &Health<'_>, message: &str) -> Vec<Condition> {
    let (ready, paused) = (health.ready, inputs.paused);
    let no_master = inputs.durable.master.is_none();
    let progressing = if ready {
        "Stable"
    } else if paused {
        "Paused"
    } else {
        "Reconciling"
    };
    let degraded = if ready || no_master {
        "AsExpected"
    } else if health.replicas_in_sync && health.sentinels_short.is_some() {
        "SentinelsDoNotKnowReplicas"
    } else {
        "ReplicasNotInSync"
    };
    let at = |kind: &str, ok: bool, reason: &str| {
        condition(kind, ok, reason, message, inputs.generation, inputs.now)
    };
    vec![
        at("Ready", ready, if ready { "Ready" } else { "NotReady" }),
        at("Progressing", !ready && !paused, progressing),
        at("Degraded", !ready && !no_master && !paused, degraded),
    ]
}

/// How the instance is watched: by the controller, or by Sentinel under its monitor name.
fn monitor(inputs: &Inputs<'_>) -> MonitorStatus {
    match &inputs.sentinel {
        None => MonitorStatus {
            policy: Policy::Manual,
            ..MonitorStatus::default()
        },
        Some(s) => MonitorStatus {
            policy: Policy::Sentinel,
            name: Some(s.monitor.clone()),
            password_secret: s.password_secret.clone(),
            tls_secret: s.tls_secret.clone(),
            nodes: s
                .nodes
                .iter()
                .map(|(host, port)| SentinelMonitorNode {
                    ip: host.clone(),
                    port: *port,
                    flags: None,
                })
                .collect(),
            ..MonitorStatus::default()
        },
    }
}

/// The status without its volatile fields (replication offsets and lag, which move with every
/// write): what must be written at once when it changes.
pub fn settled(status: &FailoverStatus) -> FailoverStatus {
    let mut settled = status.clone();
    for node in &mut settled.nodes {
        node.repl_offset = 0;
        node.lag = 0;
    }
    settled
}

/// The connected nodes whose Valkey refuses the password their agent holds, if any.
fn refusing_password(inputs: &Inputs<'_>) -> Option<String> {
    let refusing: Vec<&str> = inputs
        .observed
        .nodes
        .iter()
        .filter(|(_, o)| crate::decide::credentials::refuses_password(o))
        .map(|(pod, _)| pod.as_str())
        .collect();
    (!refusing.is_empty()).then(|| refusing.join(", "))
}

/// Keeps a condition's transition time when its status did not change, so that a status
/// written every pass does not churn.
pub fn keep_transition_times(new: &mut FailoverStatus, old: Option<&FailoverStatus>) {
    let Some(old) = old else { return };
    for condition in &mut new.conditions {
        if let Some(previous) = old
            .conditions
            .iter()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = previous.last_transition_time.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::model::NodeObs;
    use valkey_proto::v1::{DataState, StateReport};

    fn obs(role: Role, link: bool, offset: i64) -> NodeObs {
        NodeObs {
            connected: true,
            unhealthy_ms: 0,
            report: Some(StateReport {
                process: valkey_proto::v1::ProcessState::Up as i32,
                data: Some(DataState {
                    role: role as i32,
                    master_link_up: link,
                    repl_offset: offset,
                    master_host: "demo-0.demo-headless.prod.svc".into(),
                    master_port: 6379,
                    ..DataState::default()
                }),
                ..StateReport::default()
            }),
            ..NodeObs::default()
        }
    }

    /// Instance `demo` in `prod`, demo-0 master in epoch 3.
    fn demo_with_master() -> (Names, Durable) {
        let names = Names {
            instance: "demo".into(),
            namespace: "prod".into(),
        };
        let durable = Durable {
            epoch: 3,
            master: Some("demo-0".into()),
            ..Durable::default()
        };
        (names, durable)
    }

    fn inputs<'a>(names: &'a Names, durable: &'a Durable, observed: &'a Observed) -> Inputs<'a> {
        Inputs {
            names,
            replicas: 3,
            generation: Some(2),
            paused: false,
            durable,
            master_addr: Some("demo-0.demo-headless.prod.svc:6379".into()),
            observed,
            pods: &[],
            sentinel: None,
            tls_secret: None,
            old_password_secret: None,
            announced: BTreeMap::new(),
            now: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_node_refusing_the_password_is_named_in_the_message() {
        let (names, durable) = demo_with_master();
        let mut observed = Observed::default();
        observed
            .nodes
            .insert("demo-0".into(), obs(Role::Master, false, 100));
        observed
            .nodes
            .insert("demo-1".into(), obs(Role::Replica, true, 100));
        let mut refusing = obs(Role::Replica, false, 0);
        if let Some(r) = refusing.report.as_mut() {
            r.process = valkey_proto::v1::ProcessState::AuthFailed.into();
        }
        observed.nodes.insert("demo-2".into(), refusing);
        let status = build(&inputs(&names, &durable, &observed));
        assert_eq!(status.phase, Phase::Creating);
        assert!(
            status
                .message
                .starts_with("demo-2: up, but refusing the instance password"),
            "{}",
            status.message
        );
        assert_eq!(status.nodes[2].role, NodeRole::None);
    }

    #[test]
    fn ready_only_with_one_master_and_every_replica_linked() {
        let (names, durable) = demo_with_master();
        let mut observed = Observed::default();
        observed
            .nodes
            .insert("demo-0".into(), obs(Role::Master, false, 100));
        observed
            .nodes
            .insert("demo-1".into(), obs(Role::Replica, true, 90));
        observed
            .nodes
            .insert("demo-2".into(), obs(Role::Replica, false, 0));
        let status = build(&inputs(&names, &durable, &observed));
        assert_eq!(status.phase, Phase::Creating);
        assert_eq!(status.message, "replicas are syncing");
        assert_eq!(status.nodes[1].lag, 10);
        assert_eq!(
            status.nodes[1].master_ref.as_deref(),
            Some("demo-0.demo-headless.prod.svc:6379")
        );
        observed
            .nodes
            .insert("demo-2".into(), obs(Role::Replica, true, 100));
        let status = build(&inputs(&names, &durable, &observed));
        assert_eq!(status.phase, Phase::Ready, "{}", status.message);
        assert_eq!(
            (status.epoch, status.master.as_deref()),
            (3, Some("demo-0"))
        );
        // Linked, but still loading what it was sent, or syncing: not Ready.
        for stage in ["loading", "syncing"] {
            let mut busy = obs(Role::Replica, true, 100);
            if let Some(d) = busy.report.as_mut().and_then(|r| r.data.as_mut()) {
                d.loading = stage == "loading";
                d.master_sync_in_progress = stage == "syncing";
            }
            let mut with_busy = observed.clone();
            with_busy.nodes.insert("demo-2".into(), busy);
            let busy_status = build(&inputs(&names, &durable, &with_busy));
            assert_eq!(busy_status.phase, Phase::Creating, "{stage}");
            assert_eq!(busy_status.message, "replicas are syncing", "{stage}");
        }
        assert_eq!(status.observed_generation, Some(2));
        let mut chained = obs(Role::Replica, true, 100);
        if let Some(d) = chained.report.as_mut().and_then(|r| r.data.as_mut()) {
            d.master_host = "demo-1.demo-headless.prod.svc".into();
        }
        let mut with_chain = observed.clone();
        with_chain.nodes.insert("demo-2".into(), chained);
        let chained_status = build(&inputs(&names, &durable, &with_chain));
        assert_eq!(
            chained_status.phase,
            Phase::Creating,
            "a replica following another replica"
        );
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );
        observed
            .nodes
            .insert("demo-1".into(), obs(Role::Master, false, 100));
        let status = build(&inputs(&names, &durable, &observed));
        assert_eq!(status.phase, Phase::Creating);
        assert!(
            status.message.contains("2 nodes claim master"),
            "{}",
            status.message
        );
    }

    #[test]
    fn under_sentinel_ready_waits_for_a_quorum_of_sentinels_that_know_the_replicas() {
        let (names, durable) = demo_with_master();
        let mut observed = Observed::default();
        observed
            .nodes
            .insert("demo-0".into(), obs(Role::Master, false, 100));
        for pod in ["demo-1", "demo-2"] {
            observed
                .nodes
                .insert(pod.into(), obs(Role::Replica, true, 100));
        }
        let with_able = |able_to_fail_over| {
            build(&Inputs {
                sentinel: Some(SentinelInputs {
                    monitor: "prod.demo".into(),
                    password_secret: None,
                    tls_secret: None,
                    nodes: vec![],
                    quorum: 2,
                    able_to_fail_over,
                }),
                ..inputs(&names, &durable, &observed)
            })
        };
        let short = with_able(1);
        assert_eq!(short.phase, Phase::Creating);
        assert!(
            short.message.contains("only 1 of the 2 sentinels"),
            "{}",
            short.message
        );
        assert!(
            short
                .conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.reason == "SentinelsDoNotKnowReplicas")
        );
        assert_eq!(with_able(2).phase, Phase::Ready);
    }

    #[test]
    fn the_durable_state_round_trips_through_the_status() {
        let durable = Durable {
            epoch: 7,
            master: Some("demo-2".into()),
            last_failover: Some(FailoverRecord {
                at_ms: 1_700_000_000_123,
                from: Some("demo-0".into()),
                to: "demo-2".into(),
                reason: "master down".into(),
                cause: crate::decide::Cause::Unknown,
            }),
            switchover: Some(PendingSwitchover {
                from: "demo-2".into(),
                to: "demo-1".into(),
                epoch: 8,
            }),
        };
        let mut status = FailoverStatus::default();
        durable_into(&durable, &mut status);
        assert_eq!(durable_from(Some(&status)), durable);
        assert_eq!(durable_from(None), Durable::default());
    }
}
