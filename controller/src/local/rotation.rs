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

use tracing::{info, warn};
use valkey_proto::v1::{
    AclSetUser, ConfigSet, NodeKind, PasswordRef, command::Action, password_ref::Owner,
};

use super::{
    Flight, Runtime,
    conf::{new_password_path, old_password_path, sha256_hex},
    random_secret, write_atomic,
};
use crate::hub::{Hub, InstanceKey};

/// The password a rotation moves to, as commands name it: each agent reads it from
/// `<file>.new`, which the rotation writes before its first command.
fn next(owner: Owner) -> PasswordRef {
    PasswordRef {
        owner: owner as i32,
        next: true,
    }
}

/// How long one agent has to carry out one step.
const STEP_DEADLINE: Duration = Duration::from_secs(5);

/// One password rotation, in the order that never cuts anyone off: both passwords are written
/// beside the one in force first (`<file>.old`, shown as `status.monitor.oldPasswordSecret`,
/// and `<file>.new`), so that a process (re)started at any step accepts both; every target
/// accepts both, the clients switch (`switches`), the password file (which the agents re-read
/// when refused, and every config is generated from) takes the new one, and only then do the
/// targets drop the old one.
struct Rotation {
    what: &'static str,
    old: String,
    new: String,
    in_force: PathBuf,
    targets: Vec<String>,
    switches: Vec<(String, Action)>,
}

impl Rotation {
    async fn run(
        self,
        hub: Hub,
        key: InstanceKey,
        flight: Arc<Flight>,
        epoch: u64,
    ) -> Result<(), String> {
        let send = |pod: String, action: Action| {
            let (hub, key, flight) = (hub.clone(), key.clone(), flight.clone());
            async move { run_step(&hub, &key, &flight, epoch, &pod, action).await }
        };
        let accept = |hashes: Vec<String>| {
            Action::AclSetUser(AclSetUser {
                username: "default".into(),
                enabled: true,
                password_sha256: hashes,
                rules: vec!["~*".into(), "&*".into(), "+@all".into()],
            })
        };
        let (old_file, new_file) = (
            old_password_path(&self.in_force),
            new_password_path(&self.in_force),
        );
        for (file, password) in [(&old_file, &self.old), (&new_file, &self.new)] {
            write_atomic(file, password.as_bytes())
                .map_err(|e| format!("{}: {e}", file.display()))?;
        }
        for pod in &self.targets {
            send(
                pod.clone(),
                accept(vec![sha256_hex(&self.old), sha256_hex(&self.new)]),
            )
            .await?;
        }
        for (pod, action) in self.switches {
            send(pod, action).await?;
        }
        write_atomic(&self.in_force, self.new.as_bytes())
            .map_err(|e| format!("{}: {e}", self.in_force.display()))?;
        for pod in &self.targets {
            send(pod.clone(), accept(vec![sha256_hex(&self.new)])).await?;
        }
        let _ = std::fs::remove_file(&new_file);
        let _ = std::fs::remove_file(&old_file);
        info!(what = self.what, "password rotated");
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
    let mut switches: Vec<(String, Action)> = targets
        .iter()
        .map(|pod| {
            let masterauth = Action::ConfigSet(ConfigSet {
                password_params: [("masterauth".to_owned(), next(Owner::Instance))].into(),
                ..ConfigSet::default()
            });
            (pod.clone(), masterauth)
        })
        .collect();
    if let Some(sd) = &runtime.sentinel {
        for pod in connected_sentinels(runtime, hub) {
            let auth = Action::SentinelSet(valkey_proto::v1::SentinelSet {
                name: sd.name.clone(),
                password_params: [("auth-pass".to_owned(), next(Owner::Instance))].into(),
                ..Default::default()
            });
            switches.push((pod, auth));
        }
    }
    let rotation = Rotation {
        what: "instance",
        old,
        new,
        in_force: runtime.password_file.clone(),
        targets,
        switches,
    };
    spawn_rotation(rotation, runtime, hub, flight, |f| &f.rotating);
    Ok("password rotation started".into())
}

pub(super) fn connected_sentinels(runtime: &Runtime, hub: &Hub) -> Vec<String> {
    hub.observe_kind(&runtime.key, NodeKind::Sentinel)
        .into_iter()
        .filter(|(_, o)| o.connected)
        .map(|(pod, _)| pod)
        .collect()
}

fn spawn_rotation(
    rotation: Rotation,
    runtime: &Runtime,
    hub: &Hub,
    flight: &Arc<Flight>,
    running: fn(&Flight) -> &AtomicBool,
) {
    let (hub, key, flight) = (hub.clone(), runtime.key.clone(), flight.clone());
    let epoch = runtime.state.durable.epoch;
    tokio::spawn(async move {
        let what = rotation.what;
        if let Err(err) = rotation.run(hub, key, flight.clone(), epoch).await {
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
    let targets = connected_sentinels(runtime, hub);
    if recently_failed || targets.len() < runtime.state.sentinels.len() {
        return;
    }
    flight.sentinel_rotating.store(true, Ordering::SeqCst);
    let switches = targets
        .iter()
        .map(|pod| {
            let pass = valkey_proto::v1::SentinelConfigSet {
                password_params: [("sentinel-pass".to_owned(), next(Owner::Sentinel))].into(),
                ..Default::default()
            };
            (pod.clone(), Action::SentinelConfigSet(pass))
        })
        .collect();
    let rotation = Rotation {
        what: "sentinel",
        old: current,
        new: wanted,
        in_force: in_force.clone(),
        targets,
        switches,
    };
    spawn_rotation(rotation, runtime, hub, flight, |f| &f.sentinel_rotating);
}

/// Sends one step's command under `epoch` and waits until it is done (see
/// [`crate::engine::Engine::run_command`]). A node that restarts meanwhile comes back
/// accepting both passwords, so the step is retried for about 20 s rather than the rotation
/// stopped; every step is idempotent.
async fn run_step(
    hub: &Hub,
    key: &InstanceKey,
    flight: &Flight,
    epoch: u64,
    pod: &str,
    action: Action,
) -> Result<(), String> {
    use backon::Retryable;
    let once = || {
        flight
            .engine
            .run_command(hub, key, epoch, pod, action.clone(), STEP_DEADLINE)
    };
    once.retry(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(12),
    )
    .notify(|err, after| warn!(pod, error = %err, ?after, "rotation step not done; retrying"))
    .await
    .map(|_| ())
}
