//! Password rotation, shared by both runtimes: the order of steps that never cuts off a node,
//! a replica, a sentinel or a client that moves over. Where the passwords live (files beside
//! the one in force locally, a Secret the pods mount in Kubernetes) is the runtime's
//! [`PasswordStore`]; the steps and the commands are here.

use std::{future::Future, time::Duration};

use tracing::{info, warn};
use valkey_proto::v1::{
    AclSetUser, ConfigSet, PasswordRef, SentinelConfigSet, SentinelSet, command::Action,
    password_ref::Owner,
};

use super::{Handle, StoreError};

/// Where a rotation keeps the passwords. Every method is idempotent: a rotation stopped at any
/// step is run again from the start with the same passwords.
pub trait PasswordStore {
    /// Keeps the old and the new password beside the one in force, so that a process
    /// (re)started from now on accepts both.
    fn begin(&self, old: &str, new: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Makes `new` the password in force: what configs are generated from and agents log in
    /// with.
    fn commit(&self, new: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forgets the old password (and the copy of the new one beside it).
    fn finish(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A rotation stopped: the old password is still accepted, nothing is cut off, and it is run
/// again later.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{pod} did not carry out the rotation step: {reason}")]
    Step { pod: String, reason: String },
}

/// How long one agent has to carry out one step.
const STEP_DEADLINE: Duration = Duration::from_secs(5);

/// One password rotation: every target accepts both passwords; the new one is made the one in
/// force; each client of the password (replicas' masterauth, Sentinel's auth-pass or
/// sentinel-pass) switches to it once its own pod holds it (`switches` name it by hash, so a
/// pod whose copy is not updated yet refuses and the step is retried); then the targets drop
/// the old one.
#[derive(Debug)]
pub struct Rotation {
    pub what: &'static str,
    pub old: String,
    pub new: String,
    /// The processes that check the password (ACL of the default user).
    pub targets: Vec<String>,
    /// The commands that make the password's users present the new one.
    pub switches: Vec<(String, Action)>,
}

/// The password in force on the agent's pod, which must be `new`.
fn in_force(owner: Owner, new: &str) -> PasswordRef {
    PasswordRef {
        owner: owner as i32,
        next: false,
        sha256: valkey_agent::passwords::sha256_hex(new),
    }
}

impl Rotation {
    /// The instance's password: the data nodes check it; replicas (`masterauth`) and the
    /// sentinels watching monitor `monitor` (`auth-pass`) present it.
    pub fn instance(
        old: String,
        new: String,
        data: Vec<String>,
        sentinels: Vec<String>,
        monitor: Option<&str>,
    ) -> Self {
        let mut switches: Vec<(String, Action)> = data
            .iter()
            .map(|pod| {
                let masterauth = ConfigSet {
                    password_params: [("masterauth".to_owned(), in_force(Owner::Instance, &new))]
                        .into(),
                    ..ConfigSet::default()
                };
                (pod.clone(), Action::ConfigSet(masterauth))
            })
            .collect();
        if let Some(monitor) = monitor {
            for pod in sentinels {
                let auth = SentinelSet {
                    name: monitor.to_owned(),
                    password_params: [("auth-pass".to_owned(), in_force(Owner::Instance, &new))]
                        .into(),
                    ..SentinelSet::default()
                };
                switches.push((pod, Action::SentinelSet(auth)));
            }
        }
        Rotation {
            what: "instance",
            old,
            new,
            targets: data,
            switches,
        }
    }

    /// The sentinels' own password: they check it, and present it to each other
    /// (`sentinel-pass`).
    pub fn sentinel(old: String, new: String, sentinels: Vec<String>) -> Self {
        let switches = sentinels
            .iter()
            .map(|pod| {
                let pass = SentinelConfigSet {
                    password_params: [(
                        "sentinel-pass".to_owned(),
                        in_force(Owner::Sentinel, &new),
                    )]
                    .into(),
                    ..SentinelConfigSet::default()
                };
                (pod.clone(), Action::SentinelConfigSet(pass))
            })
            .collect();
        Rotation {
            what: "sentinel",
            old,
            new,
            targets: sentinels,
            switches,
        }
    }

    /// Runs every step, commands under `epoch`.
    pub async fn run<S: PasswordStore>(
        self,
        store: &S,
        handle: &Handle,
        epoch: u64,
    ) -> Result<(), RotationError> {
        let step = |pod: String, action: Action| async move {
            run_step(handle, epoch, &pod, action)
                .await
                .map_err(|reason| RotationError::Step { pod, reason })
        };
        let accept = |passwords: &[&str]| {
            Action::AclSetUser(AclSetUser {
                username: "default".into(),
                enabled: true,
                password_sha256: passwords
                    .iter()
                    .map(|p| valkey_agent::passwords::sha256_hex(p))
                    .collect(),
                rules: vec!["~*".into(), "&*".into(), "+@all".into()],
            })
        };
        store.begin(&self.old, &self.new).await?;
        for pod in &self.targets {
            step(pod.clone(), accept(&[&self.old, &self.new])).await?;
        }
        info!(what = self.what, "both passwords accepted");
        store.commit(&self.new).await?;
        for (pod, action) in self.switches {
            step(pod, action).await?;
        }
        for pod in &self.targets {
            step(pod.clone(), accept(&[&self.new])).await?;
        }
        store.finish().await?;
        info!(what = self.what, "password rotated");
        Ok(())
    }
}

/// Sends one step's command and waits until it is done. A node that restarts meanwhile comes
/// back accepting both passwords, and a pod's copy of the password may lag (a Secret volume
/// is synced by the kubelet within a minute or two), so the step is retried for about three
/// minutes rather than the rotation stopped; every step is idempotent.
async fn run_step(handle: &Handle, epoch: u64, pod: &str, action: Action) -> Result<(), String> {
    use backon::Retryable;
    let once = || handle.command(pod, epoch, action.clone(), STEP_DEADLINE);
    once.retry(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(90),
    )
    .notify(|err, after| warn!(pod, error = %err, ?after, "rotation step not done; retrying"))
    .await
    .map(|_| ())
}
