//! The Kubernetes side of the hot path: one failover pass of the shared [`Driver`], woken by
//! the hub for one instance, with the durable state persisted as one status patch. Around it
//! only what failover needs in a cluster: Events for its decisions, role labels (patched only
//! when a role changes), live settings, and the status, written only when something but its
//! volatile fields (offsets, lag) changed. Nothing here applies objects or waits for them:
//! that is the cold path's job ([`crate::k8s::cold`]).

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};
use tracing::{Instrument, debug, info, info_span, warn};
use valkey_proto::v1::{ConfigSet, Role, command::Action as AgentAction};

use crate::k8s::{
    ANNOTATION_SWITCHOVER, LABEL_ROLE, Names, SENTINEL_PORT, VALKEY_PORT, is_paused,
    objects::password::Whose,
    objects::status,
    runtime::apply::{self, patch_status, publish, restart_pod},
    runtime::context::{Context, Instance},
};
use crate::{
    crd::Failover,
    decide::model::{Desired, Durable},
    decide::sentinel::SentinelDesired,
    desired::Placed,
    driver::{DurableStore, Handle, Outcome, Refused, StoreError, SwitchoverSource, Target},
    hub::{Hub, InstanceKey},
    validate::{SentinelSet, Valid},
};

/// Why a hot pass stopped early. Only the durable write stops a failover.
#[derive(Debug, thiserror::Error)]
pub enum HotError {
    #[error(transparent)]
    Durable(#[from] StoreError),
    #[error("writing the status: {0}")]
    Status(#[source] kube::Error),
    #[error("patching {what}: {source}")]
    Patch {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl HotError {
    /// The Event reason: the variant's name.
    pub fn reason(&self) -> &'static str {
        match self {
            HotError::Durable(_) => "Durable",
            HotError::Status(_) => "Status",
            HotError::Patch { .. } => "Patch",
        }
    }
}

/// The durable state's home in a cluster: the Failover's status, one merge patch.
struct StatusStore<'a> {
    ctx: &'a Context,
    names: &'a Names,
    instance: &'a Instance,
}

impl DurableStore for StatusStore<'_> {
    async fn save(&self, durable: &Durable) -> Result<(), StoreError> {
        let _writing = self.instance.status_lock.lock().await;
        let previous = self.instance.status();
        let mut next = previous.clone().unwrap_or_default();
        status::durable_into(durable, &mut next);
        patch_status(&self.ctx.client, self.names, previous.as_ref(), &next)
            .await
            .map_err(StoreError::new)?;
        if let Ok(mut hot) = self.instance.hot.lock() {
            hot.status = Some(next);
        }
        Ok(())
    }
}

/// Starts the instance's loops ([`run`]) unless they run.
pub fn start(ctx: &Arc<Context>, instance: &Arc<Instance>) {
    if ctx.claim_hot_loop(instance) {
        tokio::spawn(run(ctx.clone(), instance.clone()));
    }
}

/// Runs the instance's two loops for as long as the controller runs: decisions, on every
/// wake (a report from one of its agents, a change the cold path accepted) and at least once a
/// second (failure detection runs on time as well as on reports); and reporting (role labels,
/// status, live settings) after each decision pass, apart, so that no API call but the durable
/// write stands between a report and the command it calls for.
pub async fn run(ctx: Arc<Context>, instance: Arc<Instance>) {
    let reporting = {
        let (ctx, instance) = (ctx.clone(), instance.clone());
        async move {
            while ctx.serves(&instance) {
                instance.report_due(std::time::Duration::from_secs(5)).await;
                if let Err(err) = publish_state(&ctx, &instance).await {
                    warn!(failover = %instance.key.name, error = %err, "reporting; retrying");
                }
            }
        }
    };
    let deciding = async {
        while ctx.serves(&instance) {
            instance.woken(std::time::Duration::from_secs(1)).await;
            if let Err(err) = decide(&ctx, &instance).await {
                warn!(failover = %instance.key.name, error = %err, "failover pass; retrying");
            }
            instance.request_report();
        }
    };
    tokio::join!(reporting, deciding);
}

/// Wakes an instance's decision loop on every report, connect and disconnect of its agents
/// (never the cold path); runs until the hub goes.
pub fn wake_on_reports(ctx: Arc<Context>) {
    let mut reported = ctx.hub.subscribe_instances();
    tokio::spawn(async move {
        loop {
            match reported.recv().await {
                Ok(key) => {
                    if let Some(instance) = ctx.known(&key) {
                        instance.wake();
                    }
                }
                // Missed some: every decision loop also runs once a second.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// A decision pass and then a reporting pass, one after the other (what the loops of [`run`]
/// do; tests drive it by hand).
pub async fn pass(ctx: &Context, instance: &Instance) -> Result<(), HotError> {
    decide(ctx, instance).await?;
    publish_state(ctx, instance).await
}

/// The instance as the hot path works from it: its accepted Failover (unless paused), and
/// that spec as validated.
struct Working {
    failover: Arc<Failover>,
    valid: Arc<Valid>,
    names: Names,
}

fn working(instance: &Instance) -> Option<Working> {
    let failover = instance.failover().filter(|f| !is_paused(f))?;
    let valid = instance.valid()?;
    let names = Names::of(&failover);
    Some(Working {
        failover,
        valid,
        names,
    })
}

/// One decision pass: the shared driver's (observe, decide, persist, dispatch, switchover),
/// then what it calls for at once (Events, restarts, the end of an asked-for switchover).
pub async fn decide(ctx: &Context, instance: &Instance) -> Result<(), HotError> {
    let Some(work) = working(instance) else {
        return Ok(());
    };
    let span = info_span!("failover_pass", namespace = %instance.key.namespace, failover = %instance.key.name);
    decide_on(ctx, instance, &work).instrument(span).await
}

async fn decide_on(ctx: &Context, instance: &Instance, work: &Working) -> Result<(), HotError> {
    let (failover, names) = (&*work.failover, &work.names);
    // Nothing is decided before the cold path has the instance's password Secret.
    if instance.password().is_none() {
        return Ok(());
    }
    let mut slot = instance.driver.lock().await;
    instance.seeded_driver(&mut slot);
    let Some(driver) = slot.as_mut() else {
        return Ok(());
    };
    let pods = ctx.pods.data_pods(names);
    let master = driver.durable().master.clone();
    let (desired, sentinel) = targets(ctx, instance, work, &pods, master.as_deref());
    let target = Target {
        desired: &desired,
        sentinel: sentinel.as_ref(),
    };
    let asked = failover.annotations().get(ANNOTATION_SWITCHOVER).cloned();
    let store = StatusStore {
        ctx,
        names,
        instance,
    };
    let outcome = driver
        .pass(&ctx.hub, &store, target, asked.as_deref())
        .await?;
    drop(slot);
    report(ctx, instance, failover, names, outcome).await
}

/// One reporting pass: live settings, role labels and the status, from what the agents
/// report and the durable state.
pub async fn publish_state(ctx: &Context, instance: &Instance) -> Result<(), HotError> {
    let Some(work) = working(instance) else {
        return Ok(());
    };
    let (failover, names) = (&work.failover, &work.names);
    if instance.password().is_none() {
        return Ok(());
    }
    let span = info_span!("report", namespace = %names.namespace, failover = %names.instance);
    async {
        let (handle, durable) = {
            let slot = instance.driver.lock().await;
            match slot.as_ref() {
                Some(driver) => (driver.handle(&ctx.hub), driver.durable().clone()),
                None => return Ok(()),
            }
        };
        apply_live_settings(instance, &handle, &work.valid, durable.epoch).await;
        let pods = ctx.pods.data_pods(names);
        label_roles(ctx, names, &durable, &pods).await?;
        let (desired, sentinel) = targets(ctx, instance, &work, &pods, durable.master.as_deref());
        write_status(
            ctx,
            instance,
            failover,
            names,
            &desired,
            sentinel.as_ref(),
            &pods,
        )
        .await
    }
    .instrument(span)
    .await
}

/// Records an Event without holding up the pass (Events are for people, not for failover).
fn announce(ctx: &Context, failover: &Failover, type_: EventType, reason: &str, note: &str) {
    let (recorder, failover) = (ctx.recorder.clone(), failover.clone());
    let (reason, note) = (reason.to_owned(), note.to_owned());
    tokio::spawn(async move { publish(&recorder, &failover, type_, &reason, &note).await });
}

/// Events and metrics for what the pass did; restarts of pods refusing the password; the end
/// of an asked-for switchover (its annotation is removed).
async fn report(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
    outcome: Outcome,
) -> Result<(), HotError> {
    if let Some(cause) = outcome.master_changed {
        ctx.metrics.master_changed(cause);
    }
    if let Some(took) = outcome.decided {
        ctx.metrics.decided(took);
    }
    for note in &outcome.new_notes {
        info!("{note}");
        announce(ctx, failover, EventType::Normal, "Decision", note);
    }
    for pod in &outcome.restarts {
        restart_pod(&ctx.client, &ctx.pods, &names.namespace, pod)
            .await
            .map_err(|source| HotError::Patch {
                what: format!("Pod {pod} (restart)"),
                source,
            })?;
        let note = format!("{pod} refused the instance password; its pod was restarted");
        announce(
            ctx,
            failover,
            EventType::Warning,
            "CredentialsRefused",
            &note,
        );
    }
    match outcome.switchover {
        Some((SwitchoverSource::Asked, started)) if !is_retried(&started) => {
            let (type_, reason, note) = match &started {
                Ok(message) => (EventType::Normal, "Switchover", message.clone()),
                Err(why) => (EventType::Warning, "SwitchoverRefused", why.to_string()),
            };
            announce(ctx, failover, type_, reason, &note);
            let patch = serde_json::json!({
                "metadata": { "annotations": { ANNOTATION_SWITCHOVER: null } }
            });
            let patched = apply::merge_failover(&ctx.client, names, &patch)
                .await
                .map_err(|source| HotError::Patch {
                    what: format!("Failover {} (annotation)", names.instance),
                    source,
                })?;
            // Work from the Failover without the request, or the next pass would ask again.
            if let (Some(password), Some(valid)) = (instance.password(), instance.valid()) {
                instance.accept(Arc::new(patched), valid, password);
            }
        }
        Some((_, Err(why))) => debug!("switchover not started yet: {why}"),
        _ => {}
    }
    Ok(())
}

fn is_retried(started: &Result<String, Refused>) -> bool {
    started.as_ref().err().is_some_and(Refused::is_transient)
}

/// The role label each data pod should carry: the Services route by it.
fn wanted_role(hub: &Hub, key: &InstanceKey, durable: &Durable, pod: &str) -> &'static str {
    let reported = hub
        .observe(key)
        .nodes
        .get(pod)
        .filter(|o| o.connected)
        .and_then(|o| o.report.as_ref()?.data.as_ref())
        .map(|d| d.role());
    match reported {
        Some(Role::Master) if durable.master.as_deref() == Some(pod) => "master",
        Some(Role::Replica) => "replica",
        _ => "none",
    }
}

/// Patches a pod's role label when it differs from its role (one patch per role change).
async fn label_roles(
    ctx: &Context,
    names: &Names,
    durable: &Durable,
    pods: &[Pod],
) -> Result<(), HotError> {
    let key = key_of(names);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    for pod in pods {
        let name = pod.name_any();
        let wanted = wanted_role(&ctx.hub, &key, durable, &name);
        if pod.labels().get(LABEL_ROLE).map(String::as_str) == Some(wanted) {
            continue;
        }
        let patch = serde_json::json!({ "metadata": { "labels": { LABEL_ROLE: wanted } } });
        let patched = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| HotError::Patch {
                what: format!("Pod {name} (role label)"),
                source,
            })?;
        ctx.pods.apply(patched);
    }
    Ok(())
}

/// The status from what the agents report: written at once when anything but the volatile
/// fields changed, with the volatile fields as they are then. Offsets alone never cost a
/// write: they move with every write and, on an idle instance, with every replication ping
/// (once a second); live offsets are in the agents' metrics.
#[allow(clippy::too_many_arguments)]
async fn write_status(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
    desired: &Desired,
    sentinel: Option<&SentinelDesired>,
    pods: &[Pod],
) -> Result<(), HotError> {
    // One status write at a time: the durable state is read back from the last one.
    let _writing = instance.status_lock.lock().await;
    let durable = &status::durable_from(instance.status().as_ref());
    let observed = ctx.hub.observe(&instance.key);
    let mut next = status::build(&status::Inputs {
        names,
        replicas: failover.spec.replicas,
        generation: failover.metadata.generation,
        paused: false,
        durable,
        master_addr: durable
            .master
            .as_ref()
            .and_then(|m| desired.node(m))
            .map(|n| format!("{}:{}", n.host, n.port)),
        observed: &observed,
        pods,
        sentinel: sentinel.map(|sd| status::SentinelInputs {
            monitor: sd.name.clone(),
            password_secret: crate::k8s::objects::sentinel::password_secret(failover)
                .or_else(|| {
                    failover
                        .spec
                        .sentinel
                        .as_ref()
                        .and_then(|s| s.password_secret())
                })
                .map(|(_, name)| name),
            tls_secret: crate::k8s::objects::tls::sentinel_secret(failover),
            nodes: sd
                .sentinel_addrs
                .iter()
                .map(|(h, p)| (h.clone(), *p as i32))
                .collect(),
            quorum: sd.quorum,
            able_to_fail_over: durable.master.as_deref().map_or(0, |m| {
                crate::decide::sentinel::sentinels_able_to_fail_over(
                    desired,
                    sd,
                    m,
                    &ctx.hub
                        .observe_kind(&instance.key, valkey_proto::v1::NodeKind::Sentinel),
                )
            }),
        }),
        tls_secret: crate::k8s::objects::tls::data_secret(failover),
        old_password_secret: [Whose::Instance, Whose::Sentinel]
            .into_iter()
            .find(|w| {
                instance
                    .rotating(*w)
                    .shown
                    .load(std::sync::atomic::Ordering::SeqCst)
            })
            .map(|w| w.in_force(names)),
        announced: if desired.announce {
            desired
                .nodes
                .iter()
                .map(|n| (n.name.clone(), (n.host.clone(), n.port)))
                .collect()
        } else {
            BTreeMap::new()
        },
        now: Timestamp::now(),
    });
    let previous = instance
        .hot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .status
        .clone();
    status::keep_transition_times(&mut next, previous.as_ref());
    if previous.as_ref().map(status::settled) == Some(status::settled(&next)) {
        return Ok(());
    }
    patch_status(&ctx.client, names, previous.as_ref(), &next)
        .await
        .map_err(HotError::Status)?;
    let phase_changed = previous.as_ref().map(|s| s.phase) != Some(next.phase);
    if phase_changed {
        announce(
            ctx,
            failover,
            EventType::Normal,
            &format!("{:?}", next.phase),
            &next.message,
        );
    }
    if let Ok(mut hot) = instance.hot.lock() {
        hot.status = Some(next);
    }
    Ok(())
}

/// customConfigs that apply live go out with CONFIG SET to every connected node once they
/// change; keys that need a restart wait for the roll.
async fn apply_live_settings(instance: &Instance, handle: &Handle, valid: &Valid, epoch: u64) {
    let wanted = valid.live_settings.clone();
    let last = instance.hot.lock().ok().and_then(|hot| hot.live.clone());
    if last.as_ref() == Some(&wanted) {
        return;
    }
    let connected = handle.connected();
    if !wanted.is_empty() {
        if connected.len() < valid.replicas as usize {
            return;
        }
        for pod in connected {
            let action = AgentAction::ConfigSet(ConfigSet {
                params: wanted.clone().into_iter().collect(),
                ..ConfigSet::default()
            });
            let sent = handle
                .command(&pod, epoch, action, std::time::Duration::from_secs(5))
                .await;
            if let Err(err) = sent {
                warn!(pod = %pod, error = %err, "live settings not applied; retrying next pass");
                return;
            }
        }
    }
    if let Ok(mut hot) = instance.hot.lock() {
        hot.live = Some(wanted);
    }
}

pub fn key_of(names: &Names) -> InstanceKey {
    InstanceKey {
        namespace: names.namespace.clone(),
        name: names.instance.clone(),
    }
}

/// What the driver works towards ([`crate::desired`]): the data pods, each at its pod's
/// stable DNS name and Valkey port. The address an agent announces is taken only where the
/// pod object vouches for it (its DNS name or IP, and its declared `valkey` port): a replayed
/// token cannot point replicas and Sentinel, which log in with the password, at a host of its
/// choosing.
///
/// A master on an ordinal the spec scaled away stays, `retiring`, with every ordinal below it,
/// until the driver has moved its role (a planned switchover first, as in the local runtime);
/// the cold path keeps the StatefulSet that large meanwhile ([`kept_replicas`]).
///
/// Reached from outside the cluster (`k8s::outside`), a node is at its outside address once
/// that is known (the controller read it from the API, so no vouching is needed), and every
/// node is kept announcing its address.
/// What the driver works towards now: the data nodes, and Sentinel's watch under policy
/// sentinel (the decision pass and the reporting pass both need them).
fn targets(
    ctx: &Context,
    instance: &Instance,
    work: &Working,
    pods: &[Pod],
    master: Option<&str>,
) -> (Desired, Option<SentinelDesired>) {
    let desired = desired(ctx, instance, work, pods, master);
    let outside = sentinel_addresses(ctx, instance, &work.failover, &work.names);
    (
        desired,
        sentinel_desired(&work.valid, &work.names, &outside),
    )
}

fn desired(
    ctx: &Context,
    instance: &Instance,
    work: &Working,
    pods: &[Pod],
    master: Option<&str>,
) -> Desired {
    let (failover, names) = (&work.failover, &work.names);
    let key = key_of(names);
    let outside = crate::k8s::objects::outside::addresses(
        failover.spec.access.service_type,
        pods,
        &instance.exposed(),
        VALKEY_PORT,
    );
    let placed = (0..kept_replicas(&work.valid, names, master)).map(|ordinal| {
        let name = names.pod(ordinal);
        let dns = names.pod_host(&name);
        let object = pods.iter().find(|p| p.name_any() == name);
        let (host, port) = ctx
            .hub
            .hello(&key, &name)
            .filter(|h| vouched(object, &dns, &h.announce_host, h.announce_port))
            .map_or((dns.clone(), VALKEY_PORT as u16), |h| {
                (h.announce_host, h.announce_port as u16)
            });
        let (host, port) = outside.get(&name).cloned().unwrap_or((host, port));
        Placed {
            name,
            ordinal: ordinal as u32,
            host,
            port,
        }
    });
    crate::desired::data(
        &work.valid,
        placed,
        ctx.hang_timeout,
        crate::k8s::objects::outside::is_outside(failover),
    )
}

/// How many data pods to keep: the spec's replicas, or more while the master sits on an
/// ordinal the spec scaled away (it is switched over first).
pub fn kept_replicas(valid: &Valid, names: &Names, master: Option<&str>) -> i32 {
    let wanted = valid.replicas as i32;
    let master_ordinal = master
        .and_then(|m| m.strip_prefix(&format!("{}-", names.instance)))
        .and_then(|n| n.parse::<i32>().ok());
    match master_ordinal {
        Some(ordinal) if ordinal >= wanted && wanted > 0 => ordinal + 1,
        _ => wanted,
    }
}

/// Whether `pod` vouches for an agent's announced address: its DNS name or one of its IPs,
/// and the port its Valkey container declares (6379 when it declares none).
fn vouched(pod: Option<&Pod>, dns: &str, host: &str, port: u32) -> bool {
    let Some(pod) = pod else {
        return false;
    };
    let status = pod.status.as_ref();
    let ips = status
        .and_then(|s| s.pod_ip.iter().next())
        .into_iter()
        .chain(
            status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|ip| &ip.ip),
        );
    let host_ok = host == dns || ips.into_iter().any(|ip| ip == host);
    let declared = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("valkey"))
        .map_or(VALKEY_PORT, |p| p.container_port);
    host_ok && i64::from(port) == i64::from(declared)
}

/// The sentinels' outside addresses, by pod, where known.
pub fn sentinel_addresses(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
) -> BTreeMap<String, (String, u16)> {
    match crate::k8s::objects::outside::sentinel_kind(failover) {
        crate::crd::ServiceType::ClusterIP => BTreeMap::new(),
        kind => crate::k8s::objects::outside::addresses(
            kind,
            &ctx.pods
                .pods_of(names, crate::k8s::objects::sentinel::COMPONENT_SENTINEL),
            &instance.exposed(),
            SENTINEL_PORT,
        ),
    }
}

/// How Sentinel watches the instance (policy sentinel).
///
/// `outside`: the embedded sentinels' outside addresses, by pod (`k8s::outside`): where one is
/// known, the sentinel is kept announcing it and its peers are expected there.
pub fn sentinel_desired(
    valid: &Valid,
    names: &Names,
    outside: &BTreeMap<String, (String, u16)>,
) -> Option<SentinelDesired> {
    let sentinels = match &valid.sentinel()?.set {
        SentinelSet::External { nodes } => nodes.clone(),
        SentinelSet::Embedded { count } => (0..*count)
            .map(|i| {
                let pod = format!("{}-{i}", names.sentinel());
                match outside.get(&pod) {
                    Some((host, port)) => (host.clone(), u32::from(*port)),
                    None => (names.sentinel_host(&pod), SENTINEL_PORT as u32),
                }
            })
            .collect(),
    };
    let announce = outside
        .iter()
        .map(|(pod, (host, port))| (pod.clone(), (host.clone(), u32::from(*port))))
        .collect();
    crate::desired::sentinel(valid, names.monitor(), sentinels, announce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodIP, PodSpec, PodStatus};

    fn pod(ip: &str, valkey_port: Option<i32>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "valkey".into(),
                    ports: valkey_port.map(|p| {
                        vec![ContainerPort {
                            name: Some("valkey".into()),
                            container_port: p,
                            ..ContainerPort::default()
                        }]
                    }),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                pod_ips: Some(vec![PodIP {
                    ip: "fd00::7".into(),
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn only_the_pods_own_names_and_declared_port_are_taken_from_an_agent() {
        let dns = "demo-0.demo-headless.prod.svc";
        let p = pod("10.1.2.3", None);
        assert!(vouched(Some(&p), dns, dns, 6379));
        assert!(vouched(Some(&p), dns, "10.1.2.3", 6379));
        assert!(vouched(Some(&p), dns, "fd00::7", 6379));
        // Another host, another port, or no pod object: the agent's word is not enough.
        assert!(!vouched(Some(&p), dns, "10.9.9.9", 6379));
        assert!(!vouched(Some(&p), dns, "attacker.example.com", 6379));
        assert!(!vouched(Some(&p), dns, "10.1.2.3", 6380));
        assert!(!vouched(None, dns, dns, 6379));
        // A pod that declares its Valkey port: that port only.
        let declared = pod("10.1.2.3", Some(7000));
        assert!(vouched(Some(&declared), dns, "10.1.2.3", 7000));
        assert!(!vouched(Some(&declared), dns, "10.1.2.3", 6379));
    }
}
