//! An external Sentinel set (`sentinelReference`) in a cluster: the leading controller runs an
//! agent for each of its sentinels in-process ([`crate::external`], as `local up` does), so
//! that the Sentinel core sees the set, monitors the instance through it, heals it and fails
//! over with it. The agents read what they need from files in the controller's work dir
//! (`<work-dir>/<namespace>/<name>/`, 0700, files 0600, on an in-memory volume): the instance's
//! password (SENTINEL MONITOR's auth-pass is resolved from it), the set's password
//! (`auth.passwordSecret`), its CA and client certificate (`auth.tlsSecret`) and the hub's CA.
//! They log in to the hub on loopback with the process's own token. A change of any of these
//! restarts them; the instance paused, deleted or no longer referencing a set stops them.

use std::{
    hash::{Hash, Hasher},
    os::unix::fs::PermissionsExt,
    path::Path,
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tracing::info;

use crate::k8s::{
    Names,
    error::Error,
    runtime::context::{Context, ExternalAgents, Instance},
};
use crate::{
    crd::Failover,
    external::{self, Agents, Setup},
    files::write_atomic,
};

/// The keys of a TLS Secret the agents use.
const TLS_KEYS: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

fn tls_field() -> &'static str {
    "spec.sentinel.sentinelReference.auth.tlsSecret"
}

/// The instance's password where the external set's agents read it (under the work dir
/// `ensure` made private); returns the file.
pub fn write_instance_password(
    ctx: &Context,
    names: &Names,
    password: &str,
) -> Result<std::path::PathBuf, String> {
    let file = instance_password_path(ctx, names);
    if std::fs::read(&file).ok().as_deref() != Some(password.as_bytes()) {
        write_atomic(&file, password.as_bytes()).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(file)
}

/// The instance's password file of a running external set, if there is one.
pub fn work_file(ctx: &Context, names: &Names) -> Option<std::path::PathBuf> {
    let file = instance_password_path(ctx, names);
    file.exists().then_some(file)
}

fn instance_password_path(ctx: &Context, names: &Names) -> std::path::PathBuf {
    ctx.settings
        .work_dir
        .join(&names.namespace)
        .join(&names.instance)
        .join("instance-password")
}

/// Runs (or restarts, or stops) the agents for the instance's external set.
/// `sentinel_password` is the set's password, as the cold path read it.
pub async fn ensure(
    ctx: &Context,
    instance: &Instance,
    failover: &Failover,
    names: &Names,
    password: &str,
    sentinel_password: Option<&str>,
) -> Result<(), Error> {
    let reference = failover
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.sentinel_reference.as_ref());
    let Some(reference) = reference else {
        instance.stop_external();
        return Ok(());
    };
    let auth = reference.auth.as_ref();
    let tls_files = match auth.and_then(|a| a.tls_secret.as_deref()) {
        Some(name) => Some((name.to_owned(), tls_secret(ctx, names, name).await?)),
        None => None,
    };
    let nodes = external::nodes(&names.instance, reference);
    let username = auth.and_then(|a| a.username.clone());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // The instance's password is not in it: the agents read it from its file at each command,
    // and a rotation rewrites that file (`write_instance_password`).
    (&nodes, &username, sentinel_password, &tls_files).hash(&mut hasher);
    (&ctx.settings.in_process_hub, &ctx.settings.controller_ca).hash(&mut hasher);
    let fingerprint = hasher.finish();
    let unchanged = instance
        .external
        .lock()
        .map(|r| r.as_ref().is_some_and(|r| r.fingerprint == fingerprint))
        .unwrap_or(false);
    if unchanged {
        write_instance_password(ctx, names, password).map_err(Error::WorkDir)?;
        return Ok(());
    }

    let dir = ctx
        .settings
        .work_dir
        .join(&names.namespace)
        .join(&names.instance);
    let write = |path: &Path, content: &[u8]| {
        write_atomic(path, content).map_err(|e| format!("{}: {e}", path.display()))
    };
    private_dir(&ctx.settings.work_dir).map_err(Error::WorkDir)?;
    private_dir(&ctx.settings.work_dir.join(&names.namespace)).map_err(Error::WorkDir)?;
    private_dir(&dir).map_err(Error::WorkDir)?;
    let instance_password_file =
        write_instance_password(ctx, names, password).map_err(Error::WorkDir)?;
    let sentinel_password_file = match sentinel_password {
        Some(p) => {
            let file = dir.join("sentinel-password");
            write(&file, p.as_bytes()).map_err(Error::WorkDir)?;
            Some(file)
        }
        None => None,
    };
    let hub_ca_file = dir.join("hub-ca.crt");
    write(&hub_ca_file, ctx.settings.controller_ca.as_bytes()).map_err(Error::WorkDir)?;
    let tls = match &tls_files {
        Some((name, files)) => {
            let secret_dir = dir.join("tls");
            private_dir(&secret_dir).map_err(Error::WorkDir)?;
            for key in TLS_KEYS {
                let path = secret_dir.join(key);
                match files.iter().find(|(k, _)| k == key) {
                    Some((_, content)) => write(&path, content).map_err(Error::WorkDir)?,
                    None => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Some(
                external::tls_from_dir(&secret_dir).map_err(|message| Error::InvalidSecret {
                    field: tls_field(),
                    name: name.clone(),
                    message,
                })?,
            )
        }
        None => None,
    };
    let setup = Setup {
        key: instance.key.clone(),
        nodes,
        username,
        sentinel_password_file,
        instance_password_file,
        tls,
        hub_addr: ctx.settings.in_process_hub.clone(),
        token: ctx.in_process_token.to_string(),
        hub_ca_file,
        data_dir: dir.join("agents"),
        probe_interval: Duration::from_millis(500),
    };
    let replaced = instance.external.lock().ok().and_then(|mut r| r.take());
    if let Some(old) = replaced {
        // Dropping them stops them; the new ones take over at once.
        drop(old);
        info!("the external Sentinel set changed: restarting its agents");
    } else {
        info!(
            sentinels = setup.nodes.len(),
            "running agents for the external Sentinel set"
        );
    }
    let running = ExternalAgents {
        fingerprint,
        agents: Agents::start(&setup),
    };
    if let Ok(mut slot) = instance.external.lock() {
        *slot = Some(running);
    }
    Ok(())
}

/// The TLS Secret's keys the agents use, with their contents.
async fn tls_secret(
    ctx: &Context,
    names: &Names,
    name: &str,
) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {name}"),
            source,
        })?
        .ok_or_else(|| Error::MissingSecret {
            field: tls_field(),
            name: name.to_owned(),
            namespace: names.namespace.clone(),
        })?;
    let data = secret.data.unwrap_or_default();
    Ok(TLS_KEYS
        .iter()
        .filter_map(|key| Some(((*key).to_owned(), data.get(*key)?.0.clone())))
        .collect())
}

/// Creates `dir` for this user alone.
fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("{}: {e}", dir.display()))
}
