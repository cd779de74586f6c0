//! Reconciles one Failover: validate -> build (pure) -> apply -> decide failover -> status.
//! One error enum for the whole pass; its variant names are the Event reasons. An invalid spec
//! (or a missing Secret, or a NodePort already taken) sets phase Failed with a message naming
//! the field, emits a Warning and changes nothing in the running instance; transient API errors
//! are retried in seconds.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::{info, warn};
use valkey_proto::v1::{ConfigSet, Role, command::Action as AgentAction};

use super::{
    ANNOTATION_SWITCHOVER, FINALIZER, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_ROLE, Names,
    SENTINEL_PORT, Settings, VALKEY_PORT, build, is_paused, roll, sentinel_objects, services,
    status,
};
use crate::{
    core::{Desired, NodeSpec},
    crd::{Failover, FailoverStatus, Phase},
    engine::{Engine, live_config},
    hub::{Hub, InstanceKey},
    sentinel::SentinelDesired,
    switchover::{self, Refused},
    validate::{Invalid, RESTART_KEYS, validate},
};

/// The field manager of everything this controller applies.
pub const MANAGER: &str = "valkey-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidSpec(Invalid),
    #[error("{field}: Secret {name:?} not found in namespace {namespace}")]
    MissingSecret {
        field: &'static str,
        name: String,
        namespace: String,
    },
    #[error("spec.access.ports: NodePort {port} is already used by Service {service}")]
    NodePortInUse { port: i32, service: String },
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status: {0}")]
    Status(#[source] kube::Error),
    #[error("cleaning up: {0}")]
    Cleanup(#[source] kube::Error),
}

impl Error {
    /// The Event reason: the variant's name.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::MissingSecret { .. } => "MissingSecret",
            Error::NodePortInUse { .. } => "NodePortInUse",
            Error::Read { .. } => "Read",
            Error::Apply { .. } => "Apply",
            Error::Status(_) => "Status",
            Error::Cleanup(_) => "Cleanup",
        }
    }

    /// The user must change something: wait for them rather than retrying fast.
    fn is_users(&self) -> bool {
        matches!(
            self,
            Error::InvalidSpec(_) | Error::MissingSecret { .. } | Error::NodePortInUse { .. }
        )
    }
}

/// Everything a reconcile pass needs; one per controller process.
pub struct Context {
    pub client: Client,
    pub hub: Hub,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<crate::k8s::metrics::Metrics>,
    pub hang_timeout: Duration,
    engines: Mutex<HashMap<InstanceKey, Arc<Engine>>>,
    /// Per instance: the plan notes already reported (each said once), and the live settings
    /// last applied with CONFIG SET.
    notes: Mutex<HashMap<InstanceKey, Vec<String>>>,
    applied_live: Mutex<HashMap<InstanceKey, BTreeMap<String, String>>>,
    /// Masters being terminated (their agent asked on SIGTERM) whose role should move.
    switchover_requests: Mutex<HashMap<InstanceKey, String>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client, hub: Hub, settings: Settings, recorder: Recorder) -> Self {
        Context {
            client,
            hub,
            settings,
            recorder,
            metrics: Arc::default(),
            hang_timeout: Duration::from_secs(5),
            engines: Mutex::default(),
            notes: Mutex::default(),
            applied_live: Mutex::default(),
            switchover_requests: Mutex::default(),
        }
    }

    /// A master's agent is being terminated: move its role on the next pass.
    pub fn request_switchover(&self, key: InstanceKey, pod: String) {
        if let Ok(mut requests) = self.switchover_requests.lock() {
            requests.insert(key, pod);
        }
    }

    /// The terminating pod, while it is still the master (the request is kept until its role
    /// has moved, so that a switchover that cannot start yet is tried again).
    fn terminating_master(&self, key: &InstanceKey, master: Option<&str>) -> Option<String> {
        let mut requests = self.switchover_requests.lock().ok()?;
        match requests.get(key) {
            Some(pod) if Some(pod.as_str()) == master => Some(pod.clone()),
            Some(_) => {
                requests.remove(key);
                None
            }
            None => None,
        }
    }

    fn engine(&self, key: &InstanceKey) -> Arc<Engine> {
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        engines.entry(key.clone()).or_default().clone()
    }
}

fn key_of(names: &Names) -> InstanceKey {
    InstanceKey {
        namespace: names.namespace.clone(),
        name: names.instance.clone(),
    }
}

/// The entry point for kube-runtime's Controller (and for the tests, which call it directly).
pub async fn reconcile(failover: Arc<Failover>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&failover, &ctx).await;
    if let Err(err) = &result {
        let note = err.to_string();
        publish(&ctx, &failover, EventType::Warning, err.reason(), &note).await;
    }
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::reason));
    match result {
        Ok(action) => Ok(action),
        Err(err) if err.is_users() => {
            warn!(failover = %failover.name_any(), error = %err, "waiting for a change");
            let mut status = failover.status.clone().unwrap_or_default();
            status.phase = Phase::Failed;
            status.message = err.to_string();
            status.observed_generation = failover.metadata.generation;
            write_status(&ctx.client, &failover, &status).await?;
            Ok(match err {
                // A spec change wakes us; a Secret or a Service elsewhere may not.
                Error::InvalidSpec(_) => Action::await_change(),
                _ => Action::requeue(Duration::from_secs(30)),
            })
        }
        Err(err) => Err(err),
    }
}

/// Transient errors: retry in seconds.
pub fn error_policy(_failover: Arc<Failover>, err: &Error, _ctx: Arc<Context>) -> Action {
    warn!(error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn publish(ctx: &Context, failover: &Failover, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx
        .recorder
        .publish(&event, &failover.object_ref(&()))
        .await
    {
        warn!(error = %err, reason, "could not record an Event");
    }
}

async fn reconcile_inner(failover: &Failover, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(failover);
    let client = &ctx.client;
    let failovers: Api<Failover> = Api::namespaced(client.clone(), &names.namespace);
    if failover.metadata.deletion_timestamp.is_some() {
        return cleanup(failover, ctx).await;
    }
    if !failover.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = failover.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        let patch = serde_json::json!({ "metadata": { "finalizers": finalizers } });
        merge_failover(&failovers, &names.instance, &patch).await?;
    }

    // Validate: nothing is applied from an invalid spec.
    validate(&names.instance, &failover.spec).map_err(Error::InvalidSpec)?;
    check_secrets(failover, client, &names).await?;
    check_node_ports(failover, client, &names).await?;

    // Build (pure), then apply.
    let paused = is_paused(failover);
    let password = ensure_password(failover, client, &names).await?;
    apply(client, &names.namespace, &build::config_map(failover)).await?;
    for service in services::data_services(failover).map_err(Error::InvalidSpec)? {
        apply(client, &names.namespace, &service).await?;
    }
    let data_set = apply(
        client,
        &names.namespace,
        &build::statefulset(failover, &ctx.settings, paused),
    )
    .await?;
    apply(
        client,
        &names.namespace,
        &build::pdb(failover, build::COMPONENT_DATA, names.data()),
    )
    .await?;
    let (configs, sets, sentinel_services, budgets) =
        sentinel_objects::objects(failover, &ctx.settings, paused);
    for object in &configs {
        apply(client, &names.namespace, object).await?;
    }
    for object in &sentinel_services {
        apply(client, &names.namespace, object).await?;
    }
    for object in &sets {
        apply(client, &names.namespace, object).await?;
    }
    for object in &budgets {
        apply(client, &names.namespace, object).await?;
    }

    // Decide failover from what the agents report, persist, then act.
    let key = key_of(&names);
    let engine = ctx.engine(&key);
    let mut durable = status::durable_from(failover.status.as_ref());
    let sentinel = sentinel_desired(failover, &names, &password);
    let desired = desired(failover, &names, &ctx.hub, ctx.hang_timeout);
    if !paused {
        let decided = Instant::now();
        let plan = engine.plan(
            &ctx.hub,
            &key,
            &desired,
            sentinel.as_ref(),
            &durable,
            crate::now_ms(),
        );
        if let Some(next) = plan.durable {
            // Durable first: if this write fails, nothing is sent.
            let mut status = failover.status.clone().unwrap_or_default();
            status::durable_into(&next, &mut status);
            write_status(client, failover, &status).await?;
            if next.epoch > durable.epoch {
                ctx.metrics.failover(
                    next.last_failover
                        .as_ref()
                        .map_or("bootstrap", |l| l.reason.as_str()),
                );
            }
            durable = next;
        }
        if !plan.commands.is_empty() {
            ctx.metrics.decided(decided.elapsed());
            tracing::debug!(failover = %names.instance, epoch = durable.epoch, commands = ?plan.commands, "dispatching");
        }
        engine.dispatch(&ctx.hub, &key, durable.epoch, plan.commands);
        report_notes(ctx, failover, &key, plan.notes).await;
        // A pod's start script generates its config with the password in force.
        for pod in &plan.restarts {
            restart_pod(client, &names.namespace, pod).await?;
            let note = format!("{pod} refused the instance password; its pod was restarted");
            publish(
                ctx,
                failover,
                EventType::Warning,
                "CredentialsRefused",
                &note,
            )
            .await;
        }
        apply_live_settings(ctx, &engine, &key, failover, durable.epoch).await;
        let asked = failover.annotations().get(ANNOTATION_SWITCHOVER).cloned();
        let terminating = ctx.terminating_master(&key, durable.master.as_deref());
        if let Some(to) = asked
            .clone()
            .or(plan.switchover)
            .or(terminating.map(|_| "any".into()))
        {
            let started = start_switchover(
                ctx,
                failover,
                &engine,
                &key,
                &desired,
                sentinel.as_ref(),
                &mut durable,
                to,
            )
            .await?;
            let retry = started.as_ref().err().is_some_and(Refused::is_transient);
            if asked.is_some() && !retry {
                // Done with the request: the result is in an Event.
                let (type_, reason, note) = match &started {
                    Ok(message) => (EventType::Normal, "Switchover", message.clone()),
                    Err(why) => (EventType::Warning, "SwitchoverRefused", why.to_string()),
                };
                publish(ctx, failover, type_, reason, &note).await;
                let patch = serde_json::json!({
                    "metadata": { "annotations": { ANNOTATION_SWITCHOVER: null } }
                });
                merge_failover(&failovers, &names.instance, &patch).await?;
            } else if let Err(why) = started {
                tracing::debug!(failover = %names.instance, "switchover not started yet: {why}");
            }
        }
    }

    // Routing: the role label follows the master within a pass.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &names.namespace);
    let data_pods = pods
        .list(&ListParams::default().labels(&format!(
            "{LABEL_INSTANCE}={},{LABEL_COMPONENT}={}",
            names.instance,
            build::COMPONENT_DATA
        )))
        .await
        .map_err(|source| Error::Read {
            what: "pods".into(),
            source,
        })?
        .items;
    let observed = ctx.hub.observe(&key);
    for pod in &data_pods {
        let name = pod.name_any();
        let reported = observed
            .nodes
            .get(&name)
            .filter(|o| o.connected)
            .and_then(|o| o.report.as_ref()?.data.as_ref())
            .map(|d| d.role());
        let wanted = match reported {
            Some(Role::Master) if durable.master.as_deref() == Some(name.as_str()) => "master",
            Some(Role::Replica) => "replica",
            _ => "none",
        };
        if pod.labels().get(LABEL_ROLE).map(String::as_str) != Some(wanted) {
            let patch = serde_json::json!({ "metadata": { "labels": { LABEL_ROLE: wanted } } });
            pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|source| Error::Apply {
                    kind: "Pod",
                    name: name.clone(),
                    source,
                })?;
        }
    }

    // Status.
    let mut next = status::build(&status::Inputs {
        names: &names,
        replicas: failover.spec.replicas,
        generation: failover.metadata.generation,
        paused,
        durable: &durable,
        master_addr: durable
            .master
            .as_ref()
            .and_then(|m| desired.node(m))
            .map(|n| format!("{}:{}", n.host, n.port)),
        observed: &observed,
        pods: &data_pods,
        sentinel: sentinel.as_ref().map(|sd| status::SentinelInputs {
            monitor: sd.name.clone(),
            password_secret: failover
                .spec
                .sentinel
                .as_ref()
                .and_then(|s| s.password_secret())
                .map(|(_, name)| name),
            nodes: sd
                .sentinel_addrs
                .iter()
                .map(|(h, p)| (h.clone(), *p as i32))
                .collect(),
        }),
        now: Timestamp::now(),
    });
    status::keep_transition_times(&mut next, failover.status.as_ref());

    // A changed pod template rolls the pods, replicas first, master last after a switchover.
    let update_revision = data_set
        .status
        .as_ref()
        .and_then(|s| s.update_revision.clone());
    let step = roll::next_step(
        &data_pods,
        update_revision.as_deref(),
        durable.master.as_deref(),
        next.phase == Phase::Ready && !paused,
    );
    match step {
        roll::Step::Nothing => {}
        roll::Step::Restart(pod) => {
            info!(failover = %names.instance, pod = %pod, "restarting for the new pod template");
            restart_pod(client, &names.namespace, &pod).await?;
            let note = format!("restarting {pod} for the new pod template");
            publish(ctx, failover, EventType::Normal, "RollingRestart", &note).await;
        }
        roll::Step::SwitchoverFirst(master) => {
            let engine = ctx.engine(&key);
            let started = start_switchover(
                ctx,
                failover,
                &engine,
                &key,
                &desired,
                sentinel.as_ref(),
                &mut durable,
                "any".into(),
            )
            .await?;
            if let Ok(message) = started {
                let note = format!("{master} is restarted last: {message}");
                publish(ctx, failover, EventType::Normal, "RollingRestart", &note).await;
            }
        }
    }
    let before = failover.status.as_ref();
    if before != Some(&next) {
        write_status(client, failover, &next).await?;
        if before.map(|s| s.phase) != Some(next.phase) {
            publish(
                ctx,
                failover,
                EventType::Normal,
                &format!("{:?}", next.phase),
                &next.message,
            )
            .await;
        }
    }
    Ok(Action::requeue(Duration::from_secs(
        if next.phase == Phase::Ready { 30 } else { 2 },
    )))
}

/// A merge patch of the Failover's metadata (finalizers, a handled annotation).
/// Deletes a pod so that its StatefulSet starts it again (its start script regenerating its
/// config).
async fn restart_pod(client: &Client, namespace: &str, pod: &str) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.delete(pod, &DeleteParams::default())
        .await
        .map(|_| ())
        .map_err(|source| Error::Apply {
            kind: "Pod",
            name: pod.to_owned(),
            source,
        })
}

async fn merge_failover(
    failovers: &Api<Failover>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), Error> {
    failovers
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::Apply {
            kind: "Failover",
            name: name.to_owned(),
            source,
        })
}

/// Server-side apply, forced: this controller owns these objects' fields.
async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: short_kind::<K>(),
        name,
        source,
    })
}

fn short_kind<K: Resource>() -> &'static str
where
    K::DynamicType: Default,
{
    match K::kind(&K::DynamicType::default()).as_ref() {
        "ConfigMap" => "ConfigMap",
        "Service" => "Service",
        "StatefulSet" => "StatefulSet",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "Secret" => "Secret",
        _ => "object",
    }
}

/// The whole status, applied by this controller (it owns every status field).
async fn write_status(
    client: &Client,
    failover: &Failover,
    status: &FailoverStatus,
) -> Result<(), Error> {
    let names = Names::of(failover);
    let api: Api<Failover> = Api::namespaced(client.clone(), &names.namespace);
    let mut value =
        serde_json::to_value(status).map_err(|e| Error::Status(kube::Error::SerdeError(e)))?;
    // A field that is gone (e.g. a finished pendingSwitchover) is sent as null, so that it is
    // removed whether the server applies the patch as an apply or as a merge.
    if let (Some(previous), Some(fields)) = (
        failover
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok()),
        value.as_object_mut(),
    ) && let Some(previous) = previous.as_object()
    {
        for key in previous.keys() {
            fields.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({
        "apiVersion": "valkey.buf.red/v1alpha1",
        "kind": "Failover",
        "status": value,
    });
    api.patch_status(
        &names.instance,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(Error::Status)
}

/// Referenced Secrets must exist before anything uses them.
async fn check_secrets(failover: &Failover, client: &Client, names: &Names) -> Result<(), Error> {
    let Some((field, name)) = failover
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.password_secret())
    else {
        return Ok(());
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    let found = secrets.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("Secret {name}"),
        source,
    })?;
    match found {
        Some(secret) if secret_value(&secret).is_some() => Ok(()),
        _ => Err(Error::MissingSecret {
            field,
            name,
            namespace: names.namespace.clone(),
        }),
    }
}

fn secret_value(secret: &Secret) -> Option<String> {
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get("password"))
        .and_then(|b| String::from_utf8(b.0.clone()).ok());
    from_data
        .or_else(|| secret.string_data.as_ref()?.get("password").cloned())
        .filter(|p| !p.is_empty())
}

/// A NodePort of the pool that another Service already holds is reported, naming it.
async fn check_node_ports(
    failover: &Failover,
    client: &Client,
    names: &Names,
) -> Result<(), Error> {
    let pool = crate::validate::node_port_pool(&failover.spec).map_err(Error::InvalidSpec)?;
    if pool.is_empty() {
        return Ok(());
    }
    let all: Api<Service> = Api::all(client.clone());
    let services = all
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: "Services".into(),
            source,
        })?;
    for service in services.items {
        let ours = service.namespace().as_deref() == Some(names.namespace.as_str())
            && service.labels().get(LABEL_INSTANCE) == Some(&names.instance);
        if ours {
            continue;
        }
        let taken = service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.node_port)
            .find(|p| pool.contains(p));
        if let Some(port) = taken {
            return Err(Error::NodePortInUse {
                port,
                service: format!(
                    "{}/{}",
                    service.namespace().unwrap_or_default(),
                    service.name_any()
                ),
            });
        }
    }
    Ok(())
}

/// The instance's password: read from its Secret, which is created (from a CSPRNG) only when
/// absent and never overwritten.
async fn ensure_password(
    failover: &Failover,
    client: &Client,
    names: &Names,
) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    let name = names.password();
    let existing = secrets.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("Secret {name}"),
        source,
    })?;
    if let Some(password) = existing.as_ref().and_then(secret_value) {
        return Ok(password);
    }
    let password = build::generate_password();
    let secret = build::password_secret(failover, &password);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(failover = %names.instance, secret = %name, "generated the instance's password");
            Ok(password)
        }
        // Someone (another pass) created it first: use theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(&name).await.map_err(|source| Error::Read {
                what: format!("Secret {name}"),
                source,
            })?;
            secret_value(&secret).ok_or(Error::MissingSecret {
                field: "status.passwordSecret",
                name,
                namespace: names.namespace.clone(),
            })
        }
        Err(source) => Err(Error::Apply {
            kind: "Secret",
            name,
            source,
        }),
    }
}

/// What the failover core works towards: the data pods, at the address each agent announces
/// (in a cluster its pod's stable DNS name, which is also the default before it has spoken).
pub fn desired(failover: &Failover, names: &Names, hub: &Hub, hang_timeout: Duration) -> Desired {
    let key = key_of(names);
    Desired {
        nodes: (0..failover.spec.replicas)
            .map(|ordinal| {
                let pod = names.pod(ordinal);
                let (host, port) = hub
                    .hello(&key, &pod)
                    .filter(|h| !h.announce_host.is_empty() && h.announce_port > 0)
                    .map_or((names.pod_host(&pod), VALKEY_PORT as u16), |h| {
                        (h.announce_host, h.announce_port as u16)
                    });
                NodeSpec {
                    host,
                    name: pod,
                    ordinal: ordinal as u32,
                    port,
                    retiring: false,
                }
            })
            .collect(),
        hang_timeout_ms: hang_timeout.as_millis() as u64,
        replica_silence_s: (hang_timeout.as_secs() as i64).max(2),
        live_config: live_config(&failover.spec),
    }
}

fn sentinel_desired(failover: &Failover, names: &Names, password: &str) -> Option<SentinelDesired> {
    let settings = failover.spec.sentinel.as_ref()?;
    let sentinel_addrs = match &settings.sentinel_reference {
        Some(reference) => reference
            .nodes
            .iter()
            .map(|n| (n.ip.clone(), n.port as u32))
            .collect(),
        None => (0..settings.count())
            .map(|i| {
                let pod = format!("{}-{i}", names.sentinel());
                (names.sentinel_host(&pod), SENTINEL_PORT as u32)
            })
            .collect(),
    };
    Some(SentinelDesired {
        name: names.monitor(),
        quorum: settings.quorum_or_default(),
        monitor_config: settings.monitor_config_or_default(),
        auth_pass: password.to_owned(),
        sentinel_addrs,
    })
}

/// Starts a planned switchover to `to` (a pod, or `any`) unless one is under way. Under policy
/// manual the intent is written to the status first. Err only for a failed status write; the
/// inner result says whether it started.
#[allow(clippy::too_many_arguments)]
async fn start_switchover(
    ctx: &Context,
    failover: &Failover,
    engine: &Arc<Engine>,
    key: &InstanceKey,
    desired: &Desired,
    sentinel: Option<&SentinelDesired>,
    durable: &mut crate::core::Durable,
    to: String,
) -> Result<Result<String, Refused>, Error> {
    if engine.switchover.load(std::sync::atomic::Ordering::SeqCst) || durable.switchover.is_some() {
        // The one under way finishes first; this request is looked at again afterwards.
        return Ok(Err(Refused::InProgress));
    }
    let observed = ctx.hub.observe(key);
    let (from, target) = match switchover::choose(desired, durable, &observed, Some(to)) {
        Ok(chosen) => chosen,
        Err(why) => return Ok(Err(why)),
    };
    if let Some(sd) = sentinel {
        return Ok(switchover::start_sentinel(
            engine,
            &ctx.hub,
            key,
            desired,
            durable.epoch,
            sd.name.clone(),
            from,
            target,
        ));
    }
    let epoch = durable.epoch + 1;
    durable.switchover = Some(crate::core::PendingSwitchover {
        from: from.clone(),
        to: target.name.clone(),
        epoch,
    });
    let mut status = failover.status.clone().unwrap_or_default();
    status::durable_into(durable, &mut status);
    write_status(&ctx.client, failover, &status).await?;
    Ok(Ok(switchover::start_manual(
        engine, &ctx.hub, key, from, target, epoch,
    )))
}

/// Each decision note once, as a Normal Event.
async fn report_notes(ctx: &Context, failover: &Failover, key: &InstanceKey, notes: Vec<String>) {
    let new: Vec<String> = {
        let mut seen = ctx.notes.lock().unwrap_or_else(|e| e.into_inner());
        let last = seen.entry(key.clone()).or_default();
        let new = notes
            .iter()
            .filter(|n| !last.contains(n))
            .cloned()
            .collect();
        *last = notes;
        new
    };
    for note in new {
        info!(failover = %key.name, "{note}");
        publish(ctx, failover, EventType::Normal, "Decision", &note).await;
    }
}

/// customConfigs that apply live go out with CONFIG SET to every connected node once they
/// change; keys that need a restart wait for the roll.
async fn apply_live_settings(
    ctx: &Context,
    engine: &Engine,
    key: &InstanceKey,
    failover: &Failover,
    epoch: u64,
) {
    let wanted: BTreeMap<String, String> = failover
        .spec
        .custom_configs
        .iter()
        .filter(|(k, _)| !RESTART_KEYS.contains(&k.to_ascii_lowercase().as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let last = ctx
        .applied_live
        .lock()
        .ok()
        .and_then(|applied| applied.get(key).cloned());
    if last.as_ref() == Some(&wanted) {
        return;
    }
    if wanted.is_empty() {
        if let Ok(mut applied) = ctx.applied_live.lock() {
            applied.insert(key.clone(), wanted);
        }
        return;
    }
    let observed = ctx.hub.observe(key);
    let connected: Vec<&String> = observed
        .nodes
        .iter()
        .filter(|(_, o)| o.connected)
        .map(|(pod, _)| pod)
        .collect();
    if connected.len() < failover.spec.replicas as usize {
        return;
    }
    for pod in connected {
        let action = AgentAction::ConfigSet(ConfigSet {
            params: wanted.clone().into_iter().collect(),
            rewrite: false,
        });
        if let Err(err) = engine
            .run_command(&ctx.hub, key, epoch, pod, action, Duration::from_secs(5))
            .await
        {
            warn!(pod = %pod, error = %err, "live settings not applied; retrying next pass");
            return;
        }
    }
    if let Ok(mut applied) = ctx.applied_live.lock() {
        applied.insert(key.clone(), wanted);
    }
}

/// Ordered cleanup on deletion: the PVCs go too unless storage.retainAfterDeleted; then the
/// finalizer is removed and the garbage collector takes the owned objects.
async fn cleanup(failover: &Failover, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(failover);
    let retain = failover
        .spec
        .storage
        .as_ref()
        .is_some_and(|s| s.retain_after_deleted);
    if !retain {
        let pvcs: Api<PersistentVolumeClaim> =
            Api::namespaced(ctx.client.clone(), &names.namespace);
        let listed = pvcs
            .list(&ListParams::default().labels(&format!("{LABEL_INSTANCE}={}", names.instance)))
            .await
            .map_err(Error::Cleanup)?;
        for pvc in listed.items {
            pvcs.delete(&pvc.name_any(), &DeleteParams::default())
                .await
                .map_err(Error::Cleanup)?;
        }
    }
    if let Ok(mut engines) = ctx.engines.lock() {
        engines.remove(&key_of(&names));
    }
    let finalizers: Vec<String> = failover
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let failovers: Api<Failover> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let patch = serde_json::json!({ "metadata": { "finalizers": finalizers } });
    failovers
        .patch(
            &names.instance,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::Cleanup)?;
    info!(failover = %names.instance, retain, "deleted");
    Ok(Action::await_change())
}
