//! One cold pass over one Failover, as named steps on a [`Pass`]: finalizer -> validate ->
//! passwords (the Secrets it references, the instance's and the sentinels' copies) -> hand the
//! accepted spec to the hot path -> rotate a changed password -> apply what changed ->
//! outside addresses, volumes, surplus Services -> roll (or the paused status). A deleted
//! Failover is cleaned up instead.

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
use tracing::info;

use super::{
    RESYNC, external_set, outside,
    password::{self, InForce},
    roll, volumes,
};
use crate::{
    crd::{Failover, Phase},
    decide::model::{Durable, Observed},
    k8s::{
        FINALIZER, LABEL_INSTANCE, Names,
        error::Error,
        hot, is_paused,
        objects::{data, network_policy, password::Whose, status, tls},
        runtime::{
            apply::{publish, replace_status, restart_pod},
            context::{Context, Instance},
        },
    },
    validate::{Valid, parse},
};

/// One reconcile of one Failover: what every step works on.
pub(super) struct Pass<'a> {
    pub ctx: &'a Context,
    pub instance: &'a Instance,
    pub failover: &'a Arc<Failover>,
    pub names: Names,
}

/// The passwords this pass found: the instance's (wanted, in force), and an embedded Sentinel
/// set's own.
struct Passwords {
    wanted: String,
    in_force: InForce,
    /// The sentinels' password, when they have one (embedded or external).
    sentinel: Option<String>,
    /// An embedded set's: wanted, and the copy the sentinels mount.
    sentinel_in_force: Option<(String, InForce)>,
}

impl Pass<'_> {
    pub async fn run(&self) -> Result<Action, Error> {
        if self.failover.metadata.deletion_timestamp.is_some() {
            self.instance.withdraw();
            return self.cleanup().await;
        }
        self.ensure_finalizer().await?;
        let valid = Arc::new(self.validate().map_err(Error::InvalidSpec)?);
        let passwords = self.passwords().await?;
        let paused = is_paused(self.failover);
        self.hand_over(&valid, &passwords, paused).await?;
        // A changed password Secret is rotated in; the cold path looks again until it is done.
        let settled = paused || self.rotate(&valid, &passwords);
        let kept = self.kept(&valid).await;
        let recreating = self.apply_objects(paused, kept).await?;
        let (ctx, instance, failover, names) =
            (self.ctx, self.instance, self.failover, &self.names);
        outside::refresh(ctx, instance, failover, names).await?;
        volumes::expand(ctx, instance, failover, names).await?;
        self.sweep_pod_services(kept).await?;
        if paused {
            let next = self.paused_status();
            replace_status(&ctx.client, names, instance, next)
                .await
                .map_err(Error::Status)?;
        } else {
            self.roll().await?;
        }
        Ok(if recreating {
            Action::requeue(Duration::from_secs(1))
        } else if kept > failover.spec.replicas {
            Action::requeue(Duration::from_secs(2))
        } else if !settled {
            Action::requeue(Duration::from_secs(5))
        } else {
            Action::requeue(RESYNC)
        })
    }

    /// Nothing is applied from an invalid spec.
    fn validate(&self) -> Result<Valid, crate::validate::Invalid> {
        let (failover, names) = (self.failover, &self.names);
        let valid = parse(&names.instance, &failover.spec, self.ctx.settings.admission)?;
        network_policy::allowed(failover)?;
        Ok(valid)
    }

    /// The Secrets the spec references, the NodePorts it claims, and the passwords in force.
    async fn passwords(&self) -> Result<Passwords, Error> {
        let (ctx, failover, names) = (self.ctx, self.failover, &self.names);
        let sentinel = self.check_secrets().await?;
        self.check_node_ports().await?;
        let wanted = password::wanted(failover, ctx, names).await?;
        let in_force = password::in_force(failover, ctx, names, Whose::Instance, &wanted).await?;
        // An embedded Sentinel set's own password has a copy the sentinels mount too.
        let embedded = failover
            .spec
            .sentinel
            .as_ref()
            .is_some_and(|s| s.sentinel_reference.is_none());
        let sentinel_in_force = match sentinel.as_deref().filter(|_| embedded) {
            Some(wanted) => Some((
                wanted.to_owned(),
                password::in_force(failover, ctx, names, Whose::Sentinel, wanted).await?,
            )),
            None => None,
        };
        Ok(Passwords {
            wanted,
            in_force,
            sentinel,
            sentinel_in_force,
        })
    }

    /// The hot path goes on from here, whatever becomes of the applies: it gets the accepted
    /// Failover (and its external Sentinel set's agents run), or, paused, lets go of it.
    async fn hand_over(
        &self,
        valid: &Arc<Valid>,
        passwords: &Passwords,
        paused: bool,
    ) -> Result<(), Error> {
        let (instance, failover) = (self.instance, self.failover);
        if let Ok(mut hot) = instance.hot.lock() {
            hot.rejected = None;
        }
        if paused {
            instance.withdraw();
            return Ok(());
        }
        let password = &passwords.in_force.password;
        let sentinel = passwords.sentinel.as_deref();
        external_set::ensure(
            self.ctx,
            instance,
            failover,
            &self.names,
            password,
            sentinel,
        )
        .await?;
        instance.accept(failover.clone(), valid.clone(), password.clone());
        Ok(())
    }

    /// Starts the rotation of a changed password (the instance's, an embedded set's); whether
    /// none is needed or under way.
    fn rotate(&self, valid: &Valid, passwords: &Passwords) -> bool {
        let (ctx, names) = (self.ctx, &self.names);
        let shared = ctx.instance(&self.instance.key);
        let rotate = |whose, next| password::rotate(ctx, &shared, valid, names, whose, next);
        let wanted = &passwords.wanted;
        let instance_settled = rotate(Whose::Instance, password::next(wanted, &passwords.in_force));
        let sentinel_settled =
            passwords
                .sentinel_in_force
                .as_ref()
                .is_none_or(|(wanted, in_force)| {
                    rotate(Whose::Sentinel, password::next(wanted, in_force))
                });
        instance_settled && sentinel_settled
    }

    /// How many data pods to keep: a master on an ordinal the spec scaled away keeps its pod
    /// until the hot path has switched it over (the cold path looks again shortly).
    async fn kept(&self, valid: &Valid) -> i32 {
        let master = match self.instance.driver.lock().await.as_ref() {
            Some(driver) => driver.durable().master.clone(),
            None => self.instance.status().and_then(|s| s.master),
        };
        hot::kept_replicas(valid, &self.names, master.as_deref())
    }

    /// Adds the finalizer with a JSON patch that fails if the finalizers changed meanwhile (a
    /// concurrent writer's finalizer is never lost; the retry sees it).
    async fn ensure_finalizer(&self) -> Result<(), Error> {
        let (ctx, failover, names) = (self.ctx, self.failover, &self.names);
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
    async fn remove_finalizer(&self) -> Result<(), Error> {
        let (ctx, failover, names) = (self.ctx, self.failover, &self.names);
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

    /// Referenced Secrets must exist before anything uses them; returns the sentinels' password.
    async fn check_secrets(&self) -> Result<Option<String>, Error> {
        let (failover, ctx, names) = (self.failover, self.ctx, &self.names);
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
        match found.and_then(|secret| password::value(&secret, crate::k8s::objects::password::KEY))
        {
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
    async fn check_node_ports(&self) -> Result<(), Error> {
        let (failover, ctx, instance, names) =
            (self.failover, self.ctx, self.instance, &self.names);
        let mut pool =
            crate::validate::node_port_pool(&failover.spec).map_err(Error::InvalidSpec)?;
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

    /// Deletes the per-pod Services (`<name>-N`) of ordinals at or above `kept`, after a scale
    /// down. It lists the instance's Services only when `kept` differs from the count it last
    /// swept for (and once after a start), so a steady instance costs nothing.
    async fn sweep_pod_services(&self, kept: i32) -> Result<(), Error> {
        let (ctx, instance, names) = (self.ctx, self.instance, &self.names);
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

    fn paused_status(&self) -> crate::crd::FailoverStatus {
        let (ctx, instance, failover, names) =
            (self.ctx, self.instance, self.failover, &self.names);
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

    /// A changed pod template rolls the pods, replicas first, master last after a switchover.
    async fn roll(&self) -> Result<(), Error> {
        let (ctx, instance, failover, names) =
            (self.ctx, self.instance, self.failover, &self.names);
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

    /// Ordered cleanup on deletion: the PVCs go too unless storage.retainAfterDeleted; then
    /// the finalizer is removed and the garbage collector takes the owned objects.
    async fn cleanup(&self) -> Result<Action, Error> {
        let (ctx, failover, names) = (self.ctx, self.failover, &self.names);
        let retain = failover
            .spec
            .storage
            .as_ref()
            .is_some_and(|s| s.retain_after_deleted);
        if !retain {
            let pvcs: Api<PersistentVolumeClaim> =
                Api::namespaced(ctx.client.clone(), &names.namespace);
            let listed = pvcs
                .list(
                    &ListParams::default().labels(&format!("{LABEL_INSTANCE}={}", names.instance)),
                )
                .await
                .map_err(Error::Cleanup)?;
            for pvc in listed.items {
                pvcs.delete(&pvc.name_any(), &DeleteParams::default())
                    .await
                    .map_err(Error::Cleanup)?;
            }
        }
        ctx.forget(&hot::key_of(names));
        self.remove_finalizer().await?;
        info!(retain, "deleted");
        Ok(Action::await_change())
    }
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
