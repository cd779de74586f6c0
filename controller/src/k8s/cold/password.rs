//! The instance's password in a cluster. The user's Secret (`<name>-password`) holds the
//! password wanted; the pods mount the controller's own copy (`<name>-password-in-force`),
//! which changes only in the order of a rotation ([`crate::driver::rotation`]): its
//! `password.old` and `password.new` keys are added first (a pod started from then on accepts
//! both), `password` becomes the new one once every node accepts both, and the two extra keys
//! go once every node has dropped the old one. A changed Secret is rotated that way, with no
//! restart; the kubelet's lag in syncing the Secret volume is waited out step by step.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use tracing::{Instrument, info, info_span, warn};

use crate::k8s::{
    Names,
    cold::external_set,
    error::Error,
    objects::{
        data,
        password::{EXPORTER_KEY, KEY, NEW_KEY, OLD_KEY, Whose, exporter_map},
    },
    runtime::context::{Context, Instance},
};
use crate::{
    crd::Failover,
    driver::{
        StoreError,
        rotation::{PasswordStore, Rotation},
    },
    validate::Valid,
};

/// The controller's copy, as the pods see it.
#[derive(Clone, PartialEq, Eq)]
pub struct InForce {
    pub password: String,
    /// Both ends of a rotation under way.
    pub rotating: Option<(String, String)>,
}

impl std::fmt::Debug for InForce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InForce")
            .field("rotating", &self.rotating.is_some())
            .finish_non_exhaustive()
    }
}

/// The non-empty value of `key` (from `data` or `stringData`), without trailing newlines.
pub fn value(secret: &Secret, key: &str) -> Option<String> {
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok());
    from_data
        .or_else(|| secret.string_data.as_ref()?.get(key).cloned())
        .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
        .filter(|p| !p.is_empty())
}

impl InForce {
    fn of(secret: &Secret) -> Option<Self> {
        Some(InForce {
            password: value(secret, KEY)?,
            rotating: value(secret, OLD_KEY).zip(value(secret, NEW_KEY)),
        })
    }
}

/// What to do about the password now.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Steady,
    /// Rotate from the first to the second (a rotation under way is finished first, whatever
    /// the Secret says now; a later change is rotated after it).
    Rotate(String, String),
}

/// Pure: the wanted password against the one in force.
pub fn next(wanted: &str, in_force: &InForce) -> Next {
    match &in_force.rotating {
        Some((old, new)) => Next::Rotate(old.clone(), new.clone()),
        None if wanted != in_force.password => {
            Next::Rotate(in_force.password.clone(), wanted.to_owned())
        }
        None => Next::Steady,
    }
}

/// The Secret `name`, read; or, when absent, `make()` created and returned. When another pass
/// creates it first, theirs is read.
pub(super) async fn read_or_create(
    secrets: &Api<Secret>,
    name: &str,
    make: impl FnOnce() -> Secret,
) -> Result<Secret, Error> {
    let read = |source| Error::Read {
        what: format!("Secret {name}"),
        source,
    };
    if let Some(found) = secrets.get_opt(name).await.map_err(read)? {
        return Ok(found);
    }
    let secret = make();
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %name, "created");
            Ok(secret)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            secrets.get(name).await.map_err(read)
        }
        Err(source) => Err(Error::Apply {
            kind: "Secret".into(),
            name: name.to_owned(),
            source,
        }),
    }
}

/// The user's Secret: read, and created (from a CSPRNG) only when absent, never overwritten.
pub async fn wanted(failover: &Failover, ctx: &Context, names: &Names) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let name = names.password();
    let secret = read_or_create(&secrets, &name, || {
        data::generated_secret(failover, &name, data::COMPONENT_DATA)
    })
    .await?;
    value(&secret, KEY).ok_or(Error::MissingSecret {
        field: "status.passwordSecret",
        name,
        namespace: names.namespace.clone(),
    })
}

/// The controller's copy, created from `wanted` when absent (a new instance, or one made
/// before the copy existed).
pub async fn in_force(
    failover: &Failover,
    ctx: &Context,
    names: &Names,
    whose: Whose,
    wanted: &str,
) -> Result<InForce, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let name = whose.in_force(names);
    let secret = read_or_create(&secrets, &name, || {
        data::password_in_force_secret(failover, &name, whose, wanted)
    })
    .await?;
    let in_force = InForce::of(&secret).ok_or_else(|| Error::InvalidSecret {
        field: whose.field(),
        name: name.clone(),
        message: "the controller's copy has no password: delete it to make it again".into(),
    })?;
    // A copy made before the exporter's map existed gets it once.
    let map = exporter_map(&in_force.password);
    if whose == Whose::Instance && value(&secret, EXPORTER_KEY).as_deref() != Some(map.as_str()) {
        patch_data(&secrets, &name, [(EXPORTER_KEY, Some(map.as_str()))].into())
            .await
            .map_err(|source| Error::Apply {
                kind: "Secret".into(),
                name: name.clone(),
                source,
            })?;
    }
    Ok(in_force)
}

/// Sets (Some) or removes (None) keys of the Secret `name`'s data, leaving the others.
async fn patch_data(
    secrets: &Api<Secret>,
    name: &str,
    data: BTreeMap<&str, Option<&str>>,
) -> kube::Result<()> {
    let data: BTreeMap<&str, Option<ByteString>> = data
        .into_iter()
        .map(|(k, v)| (k, v.map(|v| ByteString(v.as_bytes().to_vec()))))
        .collect();
    secrets
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "data": data })),
        )
        .await
        .map(|_| ())
}

/// Starts the rotation `next` asks for, unless one runs. It waits (returning false) until the
/// agent of every data node and sentinel is connected: one left out would keep presenting the
/// old password after it is dropped. Returns whether the password is settled.
pub fn rotate(
    ctx: &Context,
    instance: &Arc<Instance>,
    valid: &Valid,
    names: &Names,
    whose: Whose,
    next: Next,
) -> bool {
    let Next::Rotate(old, new) = next else {
        return true;
    };
    let flags = instance.rotating(whose);
    if flags.running.load(Ordering::SeqCst) {
        return false;
    }
    let durable = crate::k8s::objects::status::durable_from(instance.status().as_ref());
    // Every data pod still running, a master kept past a scale-down included.
    let kept = crate::k8s::hot::kept_replicas(valid, names, durable.master.as_deref());
    let data: Vec<String> = (0..kept).map(|i| names.pod(i)).collect();
    // Under policy sentinel: the monitor whose auth-pass follows, and how many sentinels.
    let monitor = valid.sentinel().map(|_| names.monitor());
    let data_up = ctx
        .hub
        .connected_pods(&instance.key, valkey_proto::v1::NodeKind::Data);
    let sentinels = ctx
        .hub
        .connected_pods(&instance.key, valkey_proto::v1::NodeKind::Sentinel);
    let wanted_sentinels = valid.sentinel().map_or(0, |w| w.set.count());
    let missing: Vec<&String> = data.iter().filter(|p| !data_up.contains(p)).collect();
    if !missing.is_empty() || sentinels.len() < wanted_sentinels {
        info!(
            ?whose,
            ?missing,
            sentinels = sentinels.len(),
            wanted_sentinels,
            "password rotation waits for every agent"
        );
        return false;
    }
    let epoch = durable.epoch;
    let rotation = match whose {
        Whose::Instance => Rotation::instance(old, new, data, sentinels, monitor.as_deref()),
        Whose::Sentinel => Rotation::sentinel(old, new, sentinels),
    };
    let store = SecretStore {
        secrets: Api::namespaced(ctx.client.clone(), &names.namespace),
        name: whose.in_force(names),
        whose,
        instance: instance.clone(),
        external: external_set::work_file(ctx, names).filter(|_| whose == Whose::Instance),
    };
    let hub = ctx.hub.clone();
    flags.running.store(true, Ordering::SeqCst);
    let span = info_span!("password_rotation", namespace = %names.namespace, failover = %names.instance, ?whose);
    tokio::spawn(
        async move {
            let instance = store.instance.clone();
            let handle = {
                let mut slot = instance.driver.lock().await;
                instance.seeded_driver(&mut slot);
                slot.as_ref().map(|d| d.handle(&hub))
            };
            let Some(handle) = handle else {
                return;
            };
            if let Err(err) = rotation.run(&store, &handle, epoch).await {
                warn!(error = %err, "password rotation stopped; both passwords still work, retried at the next reconcile");
            }
            instance.rotating(whose).running.store(false, Ordering::SeqCst);
        }
        .instrument(span),
    );
    false
}

/// The controller's copy of the password, which the pods mount.
struct SecretStore {
    secrets: Api<Secret>,
    name: String,
    whose: Whose,
    instance: Arc<Instance>,
    /// Where an external Sentinel set's in-process agents read it, when one runs.
    external: Option<std::path::PathBuf>,
}

impl SecretStore {
    async fn patch(&self, data: BTreeMap<&str, Option<&str>>) -> Result<(), StoreError> {
        patch_data(&self.secrets, &self.name, data)
            .await
            .map_err(StoreError::new)
    }
}

impl PasswordStore for SecretStore {
    async fn begin(&self, old: &str, new: &str) -> Result<(), StoreError> {
        self.patch([(OLD_KEY, Some(old)), (NEW_KEY, Some(new))].into())
            .await
    }

    async fn commit(&self, new: &str) -> Result<(), StoreError> {
        let map = exporter_map(new);
        let mut data: BTreeMap<&str, Option<&str>> = [(KEY, Some(new))].into();
        if self.whose == Whose::Instance {
            data.insert(EXPORTER_KEY, Some(&map));
        }
        self.patch(data).await?;
        if let Some(file) = &self.external {
            crate::files::write_atomic(file, new.as_bytes()).map_err(StoreError::new)?;
        }
        if self.whose == Whose::Instance {
            self.instance.set_password(new.to_owned());
        }
        // Both passwords work from here until `finish`: the status says so.
        self.instance
            .rotating(self.whose)
            .shown
            .store(true, Ordering::SeqCst);
        self.instance.request_report();
        Ok(())
    }

    async fn finish(&self) -> Result<(), StoreError> {
        self.patch([(OLD_KEY, None), (NEW_KEY, None)].into())
            .await?;
        self.instance
            .rotating(self.whose)
            .shown
            .store(false, Ordering::SeqCst);
        self.instance.request_report();
        info!(whose = ?self.whose, "password rotated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_force(password: &str, rotating: Option<(&str, &str)>) -> InForce {
        InForce {
            password: password.into(),
            rotating: rotating.map(|(o, n)| (o.into(), n.into())),
        }
    }

    #[test]
    fn a_changed_secret_is_rotated_and_one_under_way_is_finished_first() {
        assert_eq!(next("a", &in_force("a", None)), Next::Steady);
        assert_eq!(
            next("b", &in_force("a", None)),
            Next::Rotate("a".into(), "b".into())
        );
        // Stopped half-way (committed or not): the same rotation again, even if the Secret
        // moved on meanwhile; the next one follows.
        for password in ["a", "b"] {
            assert_eq!(
                next("c", &in_force(password, Some(("a", "b")))),
                Next::Rotate("a".into(), "b".into())
            );
        }
    }

    #[test]
    fn the_copy_is_read_without_trailing_newlines_and_empty_keys_do_not_count() {
        let secret = Secret {
            data: Some(
                [
                    (KEY.to_owned(), ByteString(b"one\n".to_vec())),
                    (OLD_KEY.to_owned(), ByteString(b"one".to_vec())),
                    (NEW_KEY.to_owned(), ByteString(Vec::new())),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        assert_eq!(InForce::of(&secret), Some(in_force("one", None)));
    }
}
