//! Password rotation in the local runtime: the instance's password (`local rotate-password`)
//! and the sentinels' own one (following its Secret), each changed in the order that never
//! cuts off a node, a replica, a sentinel or a client that moves over.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::warn;
use valkey_proto::v1::NodeKind;

use super::{
    Flight, Runtime,
    conf::{new_password_path, old_password_path},
    random_secret, write_atomic,
};
use crate::{
    driver::{
        StoreError,
        rotation::{PasswordStore, Rotation},
    },
    hub::Hub,
};

/// The local runtime keeps a rotation's passwords in files beside the one in force
/// (`<file>.old`, `<file>.new`): every config is generated from them and the agents read them.
struct Files {
    in_force: PathBuf,
}

fn written(path: &Path, text: &str) -> Result<(), StoreError> {
    write_atomic(path, text.as_bytes()).map_err(StoreError::new)
}

impl PasswordStore for Files {
    async fn begin(&self, old: &str, new: &str) -> Result<(), StoreError> {
        written(&old_password_path(&self.in_force), old)?;
        written(&new_password_path(&self.in_force), new)
    }

    async fn commit(&self, new: &str) -> Result<(), StoreError> {
        written(&self.in_force, new)
    }

    async fn finish(&self) -> Result<(), StoreError> {
        for path in [
            new_password_path(&self.in_force),
            old_password_path(&self.in_force),
        ] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::new(e));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Rotates the instance's password (`local rotate-password`) to a new random one: the data
/// nodes accept both, replicas (`masterauth`) and Sentinel (`auth-pass`) switch, then the old
/// one is dropped.
pub(super) fn start_rotation(
    runtime: &Runtime,
    hub: &Hub,
    flight: &Arc<Flight>,
) -> Result<String, String> {
    if flight.rotating.swap(true, Ordering::SeqCst) {
        return Err("a password rotation is already under way".into());
    }
    let old = match std::fs::read_to_string(&runtime.password_file) {
        Ok(old) => old.trim().to_owned(),
        Err(e) => {
            flight.rotating.store(false, Ordering::SeqCst);
            return Err(format!("reading {}: {e}", runtime.password_file.display()));
        }
    };
    let new = random_secret();
    let connected = hub.observe(&runtime.key);
    let targets: Vec<String> = runtime
        .desired
        .nodes
        .iter()
        .filter(|n| connected.nodes.get(&n.name).is_some_and(|o| o.connected))
        .map(|n| n.name.clone())
        .collect();
    let rotation = Rotation::instance(
        old,
        new,
        targets,
        hub.connected_pods(&runtime.key, NodeKind::Sentinel),
        runtime.sentinel.as_ref().map(|sd| sd.name.as_str()),
    );
    let files = Files {
        in_force: runtime.password_file.clone(),
    };
    spawn_rotation(rotation, files, runtime, hub, flight, |f| &f.rotating);
    Ok("password rotation started".into())
}

fn spawn_rotation(
    rotation: Rotation,
    files: Files,
    runtime: &Runtime,
    hub: &Hub,
    flight: &Arc<Flight>,
    running: fn(&Flight) -> &AtomicBool,
) {
    let (handle, flight) = (runtime.driver.handle(hub), flight.clone());
    let epoch = runtime.state.durable.epoch;
    tokio::spawn(async move {
        let what = rotation.what;
        if let Err(err) = rotation.run(&files, &handle, epoch).await {
            // The old password stays accepted (`.old` kept): nothing is cut off; retried later.
            warn!(what, error = %err, "password rotation stopped; both passwords still work");
            if let Ok(mut failed) = flight.rotation_failed.lock() {
                *failed = Some(Instant::now());
            }
        }
        running(&flight).store(false, Ordering::SeqCst);
    });
}

/// The sentinels' own password follows its Secret: when the Secret's content differs from the
/// password in force (`sentinel-password`), every embedded sentinel accepts both, presents the
/// new one to its peers (`SENTINEL CONFIG SET sentinel-pass`), and then drops the old one. A
/// rotation waits until every sentinel is connected, and retries 5 s after a failure.
pub(super) fn maybe_rotate_sentinel_password(runtime: &Runtime, hub: &Hub, flight: &Arc<Flight>) {
    let (Some((_, secret)), Some(in_force)) =
        (&runtime.sentinel_secret, &runtime.sentinel_password_file)
    else {
        return;
    };
    if runtime.state.sentinels.is_empty() || flight.sentinel_rotating.load(Ordering::SeqCst) {
        return;
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .ok()
            .map(|p| p.trim().to_owned())
    };
    let (Some(wanted), Some(current)) = (read(secret), read(in_force)) else {
        return;
    };
    if wanted.is_empty() || wanted == current {
        return;
    }
    let recently_failed = flight
        .rotation_failed
        .lock()
        .map(|t| t.is_some_and(|t| t.elapsed() < Duration::from_secs(5)))
        .unwrap_or(false);
    let targets = hub.connected_pods(&runtime.key, NodeKind::Sentinel);
    if recently_failed || targets.len() < runtime.state.sentinels.len() {
        return;
    }
    flight.sentinel_rotating.store(true, Ordering::SeqCst);
    let rotation = Rotation::sentinel(current, wanted, targets);
    let files = Files {
        in_force: in_force.clone(),
    };
    spawn_rotation(rotation, files, runtime, hub, flight, |f| {
        &f.sentinel_rotating
    });
}
