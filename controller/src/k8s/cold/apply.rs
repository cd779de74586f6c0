//! The cold pass's apply step: every owned object, applied only where it differs from what
//! was last applied (and not changed by anyone since).

use kube::ResourceExt;

use super::{
    pass::Pass,
    recreate::{self, SetApplied},
    tls_secret,
};
use crate::k8s::{
    error::Error,
    objects::{data, network_policy, sentinel, services, tls},
    runtime::{
        apply,
        context::{Applied, Context, Instance},
    },
};

impl Pass<'_> {
    /// Every owned object, applied only where it differs from what was last applied. One that
    /// fails does not stop the others; the first error is returned (and retried).
    /// Applies what changed; returns whether a StatefulSet is being recreated.
    pub(super) async fn apply_objects(&self, paused: bool, kept: i32) -> Result<bool, Error> {
        let (ctx, instance, failover, names) =
            (self.ctx, self.instance, self.failover, &self.names);
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
}

/// The error of one apply, if it failed.
fn done<K>(result: Result<Option<K>, Error>) -> Option<Error> {
    result.err()
}

/// Applies `object` unless the same was applied last (and has not been changed since: the
/// owned-object watch forgets a record whose object someone else changed).
pub async fn apply_changed<K: apply::Object>(
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
