//! The cold path: reconciles one Failover's Kubernetes objects, as named steps: finalizer ->
//! validate -> secrets -> hand over to the hot path -> apply what changed -> roll. It runs on a
//! change to the Failover's spec, annotations or finalizers (status changes are filtered out,
//! so the controller does not wake itself), on a change to an object it owns or a pod, and on
//! a slow resync. An object is applied only when it differs from what was last applied, so a
//! pass that finds nothing new makes no write. One error enum; its variant names are the
//! Event reasons. An invalid spec (or a missing Secret, or a NodePort already taken) sets
//! phase Failed with a message naming the field, emits a Warning and changes nothing in the
//! running instance; transient API errors are retried in seconds.

mod apply;
pub mod external_set;
pub mod outside;
mod pass;
pub mod password;
pub mod recreate;
pub mod roll;
pub mod tls_secret;
pub mod volumes;

use std::{sync::Arc, time::Duration};

use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use tracing::{Instrument, info_span, warn};

use crate::{
    crd::{Failover, Phase},
    k8s::{
        Names,
        error::Error,
        hot::{self, key_of},
        runtime::{
            apply::{publish, replace_status},
            context::{Context, Instance},
        },
    },
};
pub use apply::apply_changed;
use pass::Pass;

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
        let pass = Pass {
            ctx: &ctx,
            instance: &instance,
            failover: &failover,
            names: names.clone(),
        };
        let result = pass.run().await;
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
