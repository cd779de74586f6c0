//! The cold path: reconciles one Failover's Kubernetes objects, as named steps: finalizer ->
//! validate -> secrets -> hand over to the hot path -> apply what changed -> roll. It runs on a
//! change to the Failover's spec, annotations or finalizers (status changes are filtered out,
//! so the controller does not wake itself), on a change to an object it owns or a pod, and on
//! a slow resync. An object is applied only when it differs from what was last applied, so a
//! pass that finds nothing new makes no write. One error enum; its variant names are the
//! Event reasons. An invalid spec (or a missing Secret, or a NodePort already taken) sets
//! phase Failed with a message naming the field, emits a Warning and changes nothing in the
//! running instance; transient API errors are retried in seconds.

pub mod external_set;
pub mod outside;
pub mod password;
pub mod recreate;
pub mod roll;
pub mod tls_secret;
pub mod volumes;

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{PersistentVolumeClaim, Secret, Service},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use tracing::{Instrument, info, info_span, warn};

use crate::k8s::{
    FINALIZER, LABEL_INSTANCE, Names,
    error::Error,
    hot::{self, key_of},
    is_paused,
    objects::{data, network_policy, password::Whose, sentinel, services, status, tls},
    runtime::{
        apply::{self, publish, replace_status, restart_pod},
        context::{Applied, Context, Instance},
    },
};
use crate::{
    crd::{Failover, Phase},
    decide::model::{Durable, Observed},
    validate::validate_admitted,
};
use recreate::SetApplied;

/// How often a Failover is looked at again with nothing new: its Secrets read, and anything
/// whose watch event was missed applied.
pub const RESYNC: Duration = Duration::from_secs(300);

/// The entry point for kube-runtime's Controller (and for the tests, which call it directly).
pub async fn reconcile(failover: Arc<Failover>, ctx: Arc<Context>) -> Result<Action, Error> {
    let names = Names::of(&failover);
    let span = info_span!("reconcile", namespace = %names.namespace, failover = %names.instance);
    async move {
        let started = std::time::Instant::now();
        let instance = ctx.instance(&key_of(&names));
        hot::start(&ctx, &instance);
        let result = reconcile_inner(&failover, &ctx, &instance).await;
        if let Err(err) = &result {
            let note = err.to_string();
            publish(
                &ctx.recorder,
                &failover,
                EventType::Warning,
                err.reason(),
                &note,
            )
            .await;
        }
        ctx.metrics
            .reconciled(started.elapsed(), result.as_ref().err().map(Error::reason));
        match result {
            Ok(action) => Ok(action),
            Err(err) if err.is_users() => {
                warn!(error = %err, "waiting for a change");
                refused(&ctx, &instance, &failover, &names, &err).await?;
                Ok(match err {
                    // A spec change wakes us; a Secret or a Service elsewhere may not.
                    Error::InvalidSpec(_) => Action::await_change(),
                    _ => Action::requeue(Duration::from_secs(30)),
                })
            }
            Err(err) => Err(err),
        }
    }
    .instrument(span)
    .await
}

/// Transient errors: retry in seconds.
pub fn error_policy(_failover: Arc<Failover>, err: &Error, _ctx: Arc<Context>) -> Action {
    warn!(error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_inner(
    failover: &Arc<Failover>,
    ctx: &Context,
    instance: &Instance,
) -> Result<Action, Error> {
    let names = Names::of(failover);
    if failover.metadata.deletion_timestamp.is_some() {
        instance.withdraw();
        return cleanup(failover, ctx).await;
    }
    ensure_finalizer(ctx, failover, &names).await?;
    // Validate: nothing is applied from an invalid spec.
    validate_admitted(&names.instance, &failover.spec, ctx.settings.admission)
        .map_err(Error::InvalidSpec)?;
    network_policy::allowed(failover).map_err(Error::InvalidSpec)?;
    let sentinel_password = check_secrets(failover, ctx, &names).await?;
    check_node_ports(failover, ctx, instance, &names).await?;
    let wanted = password::wanted(failover, ctx, &names).await?;
    let in_force = password::in_force(failover, ctx, &names, Whose::Instance, &wanted).await?;
    let password = in_force.password.clone();
    // An embedded Sentinel set's own password has a copy the sentinels mount too.
    let embedded = failover
        .spec
        .sentinel
        .as_ref()
        .is_some_and(|s| s.sentinel_reference.is_none());
    let sentinel_in_force = match sentinel_password.as_deref().filter(|_| embedded) {
        Some(wanted) => Some((
            wanted.to_owned(),
            password::in_force(failover, ctx, &names, Whose::Sentinel, wanted).await?,
        )),
        None => None,
    };
    let paused = is_paused(failover);
    // The hot path goes on from here, whatever becomes of the applies.
    if let Ok(mut hot) = instance.hot.lock() {
        hot.rejected = None;
    }
    if paused {
        instance.withdraw();
    } else {
        external_set::ensure(
            ctx,
            instance,
            failover,
            &names,
            &password,
            sentinel_password.as_deref(),
        )
        .await?;
        instance.accept(failover.clone(), password);
    }
    // A changed password Secret is rotated in; the cold path looks again until it is done.
    let settled = paused || {
        let shared = ctx.instance(&instance.key);
        let rotate = |whose, next| password::rotate(ctx, &shared, failover, &names, whose, next);
        let instance_settled = rotate(Whose::Instance, password::next(&wanted, &in_force));
        let sentinel_settled = sentinel_in_force.as_ref().is_none_or(|(wanted, in_force)| {
            rotate(Whose::Sentinel, password::next(wanted, in_force))
        });
        instance_settled && sentinel_settled
    };
    // A master on an ordinal the spec scaled away keeps its pod until the hot path has
    // switched it over; the cold path looks again shortly.
    let master = match instance.driver.lock().await.as_ref() {
        Some(driver) => driver.durable().master.clone(),
        None => instance.status().and_then(|s| s.master),
    };
    let kept = hot::kept_replicas(failover, &names, master.as_deref());
    let recreating = apply_objects(ctx, instance, failover, &names, paused, kept).await?;
    outside::refresh(ctx, instance, failover, &names).await?;
    volumes::expand(ctx, instance, failover, &names).await?;
    sweep_pod_services(ctx, instance, &names, kept).await?;
    if paused {
        let next = paused_status(ctx, instance, failover, &names);
        replace_status(&ctx.client, &names, instance, next)
            .await
            .map_err(Error::Status)?;
    } else {
        roll(ctx, instance, failover, &names).await?;
    }
    if recreating {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if kept > failover.spec.replicas {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if !settled {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(Action::requeue(RESYNC))
}

/// Deletes the per-pod Services (`<name>-N`) of ordinals at or above `kept`, after a scale
/// down. It lists the instance's Services only when `kept` differs from the count it last
/// swept for (and once after a start), so a steady instance costs nothing.
async fn sweep_pod_services(
    ctx: &Context,
    instance: &Instance,
    names: &Names,
    kept: i32,
) -> Result<(), Error> {
    let swept = instance.cold.lock().map(|c| c.swept_for).unwrap_or(None);
    if swept == Some(kept) {
        return Ok(());
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let selector = format!("{LABEL_INSTANCE}={}", names.instance);
    let services = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Read {
            what: "Services".into(),
            source,
        })?;
    let prefix = format!("{}-", names.instance);
    for service in services.items {
        let name = service.name_any();
        let surplus = name
            .strip_prefix(&prefix)
            .and_then(|n| n.parse::<i32>().ok())
            .is_some_and(|ordinal| ordinal >= kept);
        if !surplus {
            continue;
        }
        match api.delete(&name, &Default::default()).await {
            Ok(_) => info!(service = %name, "deleted the Service of a pod scaled away"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Apply {
                    kind: "Service".into(),
                    name,
                    source,
                });
            }
        }
        if let Ok(mut cold) = instance.cold.lock() {
            cold.applied.remove(&format!("Service/{name}"));
        }
    }
    if let Ok(mut cold) = instance.cold.lock() {
        cold.swept_for = Some(kept);
    }
    Ok(())
}

/// A refused spec: phase Failed naming the field, kept while the running instance goes on.
async fn refused(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
    err: &Error,
) -> Result<(), Error> {
    if let Ok(mut hot) = instance.hot.lock() {
        hot.rejected = Some(err.to_string());
    }
    let mut next = instance
        .status()
        .or_else(|| failover.status.clone())
        .unwrap_or_default();
    next.phase = Phase::Failed;
    next.message = err.to_string();
    next.observed_generation = failover.metadata.generation;
    replace_status(&ctx.client, names, instance, next)
        .await
        .map(|_| ())
        .map_err(Error::Status)
}

fn paused_status(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
) -> crate::crd::FailoverStatus {
    let previous = instance.status();
    let durable: Durable = status::durable_from(previous.as_ref());
    let mut next = status::build(&status::Inputs {
        names,
        replicas: failover.spec.replicas,
        generation: failover.metadata.generation,
        paused: true,
        durable: &durable,
        master_addr: None,
        observed: &Observed::default(),
        pods: &ctx.pods.data_pods(names),
        sentinel: None,
        tls_secret: tls::data_secret(failover),
        old_password_secret: None,
        announced: Default::default(),
        now: Timestamp::now(),
    });
    status::keep_transition_times(&mut next, previous.as_ref());
    next
}

/// Adds the finalizer with a JSON patch that fails if the finalizers changed meanwhile (a
/// concurrent writer's finalizer is never lost; the retry sees it).
async fn ensure_finalizer(ctx: &Context, failover: &Failover, names: &Names) -> Result<(), Error> {
    let finalizers = failover.finalizers();
    if finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let patch = if finalizers.is_empty() {
        // (A test of an absent path against null is not portable: test the version instead.)
        serde_json::json!([
            { "op": "test", "path": "/metadata/resourceVersion", "value": failover.resource_version() },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ])
    } else {
        serde_json::json!([
            { "op": "test", "path": "/metadata/finalizers", "value": finalizers },
            { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER },
        ])
    };
    json_patch_failover(ctx, names, patch)
        .await
        .map_err(Error::Finalizer)
}

/// Removes the finalizer by index, testing that it is still there.
async fn remove_finalizer(ctx: &Context, failover: &Failover, names: &Names) -> Result<(), Error> {
    let Some(index) = failover.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch = serde_json::json!([
        { "op": "test", "path": path, "value": FINALIZER },
        { "op": "remove", "path": path },
    ]);
    json_patch_failover(ctx, names, patch)
        .await
        .map_err(Error::Finalizer)
}

async fn json_patch_failover(
    ctx: &Context,
    names: &Names,
    patch: serde_json::Value,
) -> Result<(), kube::Error> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
    let api: Api<Failover> = Api::namespaced(ctx.client.clone(), &names.namespace);
    api.patch(
        &names.instance,
        &PatchParams::default(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map(|_| ())
}

/// Every owned object, applied only where it differs from what was last applied. One that
/// fails does not stop the others; the first error is returned (and retried).
/// Applies what changed; returns whether a StatefulSet is being recreated.
async fn apply_objects(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
    paused: bool,
    kept: i32,
) -> Result<bool, Error> {
    let ns = names.namespace.as_str();
    let mut results = vec![done(
        apply_changed(ctx, instance, ns, &data::config_map(failover)).await,
    )];
    let controller_ca = tls::controller_ca_config_map(failover, &ctx.settings.controller_ca);
    results.push(done(apply_changed(ctx, instance, ns, &controller_ca).await));
    let mut issued = None;
    if let Some(certificate) = tls::certificate(failover) {
        results.push(done(apply_changed(ctx, instance, ns, &certificate).await));
    } else if tls::enabled(failover) {
        match tls_secret::ensure(ctx, failover).await {
            Ok(hash) => issued = Some(hash),
            Err(err) => results.push(Some(err)),
        }
    }
    // The certificate the sentinels serve: a new one rolls them (Sentinel cannot reload it).
    let sentinel_cert = match tls::sentinel_secret(failover) {
        Some(secret) if sentinel::embedded(failover).is_some() => {
            if issued.is_some() && Some(&secret) == tls::data_secret(failover).as_ref() {
                issued.clone()
            } else {
                match tls_secret::served_cert(ctx, ns, &secret).await {
                    Ok(hash) => hash,
                    Err(err) => {
                        results.push(Some(err));
                        None
                    }
                }
            }
        }
        _ => None,
    };
    for service in services::data_services(failover).map_err(Error::InvalidSpec)? {
        results.push(done(apply_changed(ctx, instance, ns, &service).await));
    }
    let allowed = network_policy::allowed(failover).map_err(Error::InvalidSpec)?;
    let policy = network_policy::network_policy(failover, &ctx.settings, allowed);
    results.push(done(apply_changed(ctx, instance, ns, &policy).await));
    let mut data_set = data::statefulset(failover, &ctx.settings, paused);
    if let Some(spec) = data_set.spec.as_mut().filter(|_| !paused) {
        spec.replicas = Some(kept);
    }
    let mut recreating = false;
    match recreate::apply_set(ctx, instance, failover, ns, &data_set).await {
        Ok(SetApplied::Applied(applied)) => {
            let revision = applied.status.and_then(|s| s.update_revision);
            if let Ok(mut cold) = instance.cold.lock() {
                cold.update_revision = revision;
            }
        }
        Ok(SetApplied::Recreating) => recreating = true,
        Ok(SetApplied::Unchanged) => {}
        Err(err) => results.push(Some(err)),
    }
    let pdb = data::pdb(failover, data::COMPONENT_DATA, names.data());
    results.push(done(apply_changed(ctx, instance, ns, &pdb).await));
    let (configs, sets, sentinel_services, budgets) =
        sentinel::objects(failover, &ctx.settings, paused, sentinel_cert.as_deref());
    for object in &configs {
        results.push(done(apply_changed(ctx, instance, ns, object).await));
    }
    for object in &sentinel_services {
        results.push(done(apply_changed(ctx, instance, ns, object).await));
    }
    for object in &sets {
        match recreate::apply_set(ctx, instance, failover, ns, object).await {
            Ok(SetApplied::Recreating) => recreating = true,
            Ok(_) => {}
            Err(err) => results.push(Some(err)),
        }
    }
    for object in &budgets {
        results.push(done(apply_changed(ctx, instance, ns, object).await));
    }
    results
        .into_iter()
        .flatten()
        .next()
        .map_or(Ok(recreating), Err)
}

/// The error of one apply, if it failed.
fn done<K>(result: Result<Option<K>, Error>) -> Option<Error> {
    result.err()
}

/// Applies `object` unless the same was applied last (and has not been changed since: the
/// owned-object watch forgets a record whose object someone else changed).
pub(super) async fn apply_changed<K: apply::Object>(
    ctx: &Context,
    instance: &Instance,
    namespace: &str,
    object: &K,
) -> Result<Option<K>, Error> {
    let kind = K::kind(&()).into_owned();
    let name = object.meta().name.clone().unwrap_or_default();
    let key = format!("{kind}/{name}");
    let hash = apply::hash_of(object);
    let unchanged = instance
        .cold
        .lock()
        .map(|cold| cold.applied.get(&key).is_some_and(|a| a.hash == hash))
        .unwrap_or(false);
    if unchanged {
        return Ok(None);
    }
    let applied = apply::apply(&ctx.client, namespace, object)
        .await
        .map_err(|source| Error::Apply { kind, name, source })?;
    if let Ok(mut cold) = instance.cold.lock() {
        cold.applied.insert(
            key,
            Applied {
                hash,
                resource_version: applied.resource_version(),
            },
        );
    }
    Ok(Some(applied))
}

/// A changed pod template rolls the pods, replicas first, master last after a switchover.
async fn roll(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
) -> Result<(), Error> {
    let status = instance.status();
    let ready = status.as_ref().is_some_and(|s| s.phase == Phase::Ready);
    let master = status.as_ref().and_then(|s| s.master.clone());
    let revision = instance
        .cold
        .lock()
        .ok()
        .and_then(|cold| cold.update_revision.clone());
    let pods = ctx.pods.data_pods(names);
    let note = match roll::next_step(&pods, revision.as_deref(), master.as_deref(), ready) {
        roll::Step::Nothing => return Ok(()),
        roll::Step::Restart(pod) => {
            info!(pod = %pod, "restarting for the new pod template");
            restart_pod(&ctx.client, &ctx.pods, &names.namespace, &pod)
                .await
                .map_err(|source| Error::Apply {
                    kind: "Pod".into(),
                    name: pod.clone(),
                    source,
                })?;
            format!("restarting {pod} for the new pod template")
        }
        roll::Step::SwitchoverFirst(master) => {
            if let Some(driver) = instance.driver.lock().await.as_mut() {
                driver.move_master_off(master.clone());
            }
            instance.wake();
            format!("{master} is restarted last: moving its role first")
        }
    };
    publish(
        &ctx.recorder,
        failover,
        EventType::Normal,
        "RollingRestart",
        &note,
    )
    .await;
    Ok(())
}

/// Referenced Secrets must exist before anything uses them; returns the sentinels' password.
async fn check_secrets(
    failover: &Failover,
    ctx: &Context,
    names: &Names,
) -> Result<Option<String>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    // Embedded sentinels always have a password: generated when no Secret is named.
    let named = failover
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.password_secret());
    if named.is_none()
        && let Some((field, name)) = crate::k8s::objects::sentinel::password_secret(failover)
    {
        let secret = password::read_or_create(&secrets, &name, || {
            data::generated_secret(
                failover,
                &name,
                crate::k8s::objects::sentinel::COMPONENT_SENTINEL,
            )
        })
        .await?;
        return password::value(&secret, crate::k8s::objects::password::KEY)
            .map(Some)
            .ok_or(Error::MissingSecret {
                field,
                name,
                namespace: names.namespace.clone(),
            });
    }
    let Some((field, name)) = named else {
        return Ok(None);
    };
    let found = secrets.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("Secret {name}"),
        source,
    })?;
    match found.and_then(|secret| password::value(&secret, crate::k8s::objects::password::KEY)) {
        Some(password) => Ok(Some(password)),
        None => Err(Error::MissingSecret {
            field,
            name,
            namespace: names.namespace.clone(),
        }),
    }
}

/// A NodePort of the pool that another Service already holds is reported, naming it. This
/// lists every Service in the cluster, so it runs once per generation of the spec.
async fn check_node_ports(
    failover: &Failover,
    ctx: &Context,
    instance: &Instance,
    names: &Names,
) -> Result<(), Error> {
    let mut pool = crate::validate::node_port_pool(&failover.spec).map_err(Error::InvalidSpec)?;
    pool.extend(
        crate::validate::sentinel_node_port_pool(&failover.spec).map_err(Error::InvalidSpec)?,
    );
    let generation = failover.metadata.generation;
    let checked = instance
        .cold
        .lock()
        .map(|cold| cold.node_ports_checked.is_some() && cold.node_ports_checked == generation)
        .unwrap_or(false);
    if pool.is_empty() || checked {
        return Ok(());
    }
    // NodePorts are the cluster's: in one namespace only that namespace's are seen.
    let mut services = Vec::new();
    for scope in crate::k8s::scopes(&ctx.settings) {
        let api: Api<Service> = crate::k8s::scoped_api(&ctx.client, scope.as_deref());
        let listed = api
            .list(&ListParams::default())
            .await
            .map_err(|source| Error::Read {
                what: "Services".into(),
                source,
            })?;
        services.extend(listed.items);
    }
    for service in services {
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
    if let Ok(mut cold) = instance.cold.lock() {
        cold.node_ports_checked = generation;
    }
    Ok(())
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
    ctx.forget(&key_of(&names));
    remove_finalizer(ctx, failover, &names).await?;
    info!(retain, "deleted");
    Ok(Action::await_change())
}

/// What wakes the cold path when a Failover changes: its spec (generation), annotations,
/// finalizers and deletion. A status write changes none of these, so the controller's own
/// status writes do not wake it.
pub fn cold_trigger(failover: &Failover) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    failover.metadata.generation.hash(&mut hasher);
    failover.annotations().hash(&mut hasher);
    failover.finalizers().hash(&mut hasher);
    failover
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .hash(&mut hasher);
    Some(hasher.finish())
}
