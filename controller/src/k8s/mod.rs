//! The Kubernetes runtime, in tiers that only look down: pure builders of the objects a
//! Failover owns and of its status (`objects/`); what both paths stand on (`runtime/`: shared
//! per-instance state, writes, Events, metrics, leader election, agent auth, the hub's TLS);
//! the hot path that runs the shared failover driver per instance (`hot/`); the cold path that
//! reconciles the objects as named steps (`cold/`); and `run`, which wires them to the
//! cluster. Here: the names, labels and settings every tier uses, and the error (`error`).

pub mod cold;
pub mod error;
pub mod hot;
pub mod objects;
pub mod run;
pub mod runtime;

pub use objects::render;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::Failover;

/// Label on every object and pod of an instance: the Failover's name.
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// `data` (Valkey pods) or `sentinel`.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// `master` or `replica`, patched on pods at promotion: the Services route by it.
pub const LABEL_ROLE: &str = "valkey.buf.red/role";
/// Annotation: `"true"` scales the instance to zero pods, keeping PVCs and Secrets.
pub const ANNOTATION_PAUSED: &str = "valkey.buf.red/paused";
/// Annotation: a pod name, or `any`: a planned switchover.
pub const ANNOTATION_SWITCHOVER: &str = "valkey.buf.red/switchover";
/// Pod template annotation: hash of the settings that need a restart.
pub const ANNOTATION_RESTART_HASH: &str = "valkey.buf.red/restart-hash";
/// Finalizer: ordered cleanup (PVCs unless retainAfterDeleted).
pub const FINALIZER: &str = "valkey.buf.red/cleanup";
/// The agent's audience for its projected service-account token.
pub const TOKEN_AUDIENCE: &str = "valkey-controller";

pub const VALKEY_PORT: i32 = 6379;
pub const SENTINEL_PORT: i32 = 26379;
pub const AGENT_PORT: i32 = 9400;
pub const AGENT_METRICS_PORT: i32 = 9401;
pub const EXPORTER_PORT: i32 = 9121;

/// What the builders need beyond the Failover: images and where agents find the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub valkey_image: String,
    pub agent_image: String,
    pub exporter_image: String,
    /// e.g. `https://valkey-controller.valkey-system.svc:7070`
    pub controller_addr: String,
    /// The CA bundle (PEM) the hub's certificate chains to, handed to every agent.
    pub controller_ca: String,
    /// `--allow-privileged-pods`: pod settings that are refused by default pass through.
    pub admission: crate::validate::Admission,
    /// The controller's own namespace: the NetworkPolicies admit its pods to the agents.
    pub controller_namespace: String,
    /// `--watch-namespace`: Failovers (and everything they own) of these namespaces only, so
    /// that the controller needs no cluster-wide rights but TokenReviews. Empty: every
    /// namespace.
    pub watch_namespaces: Vec<String>,
    /// `--work-dir`: files for the agents the controller runs itself (an external Sentinel
    /// set's), on an in-memory volume.
    pub work_dir: std::path::PathBuf,
    /// Where those agents reach this process's hub (loopback).
    pub in_process_hub: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            valkey_image: "valkey/valkey:8.0".into(),
            agent_image: format!("ghcr.io/buf-red/valkey-agent:{}", env!("CARGO_PKG_VERSION")),
            exporter_image: "oliver006/redis_exporter:v1.97.0".into(),
            controller_addr: "https://valkey-controller.valkey-system.svc:7070".into(),
            controller_ca: String::new(),
            admission: crate::validate::Admission::default(),
            controller_namespace: "valkey-system".into(),
            watch_namespaces: Vec::new(),
            work_dir: "/run/valkey-controller".into(),
            in_process_hub: "https://127.0.0.1:7070".into(),
        }
    }
}

/// Names of everything an instance owns, in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Names {
    pub instance: String,
    pub namespace: String,
}

impl Names {
    pub fn of(failover: &Failover) -> Self {
        Names {
            instance: failover.name_any(),
            namespace: failover.namespace().unwrap_or_else(|| "default".into()),
        }
    }
    pub fn data(&self) -> String {
        self.instance.clone()
    }
    pub fn headless(&self) -> String {
        format!("{}-headless", self.instance)
    }
    pub fn read_only(&self) -> String {
        format!("{}-read", self.instance)
    }
    pub fn config(&self) -> String {
        format!("{}-config", self.instance)
    }
    pub fn password(&self) -> String {
        format!("{}-password", self.instance)
    }

    /// The controller's copy of the password, which the pods mount (`k8s::password`).
    pub fn password_in_force(&self) -> String {
        format!("{}-password-in-force", self.instance)
    }
    pub fn controller_ca(&self) -> String {
        format!("{}-controller-ca", self.instance)
    }
    /// The TLS Secret (issued, or written by cert-manager) and the Certificate.
    pub fn tls(&self) -> String {
        format!("{}-tls", self.instance)
    }
    pub fn metrics(&self) -> String {
        format!("{}-metrics", self.instance)
    }
    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.instance)
    }
    pub fn sentinel(&self) -> String {
        format!("{}-sentinel", self.instance)
    }
    /// The embedded sentinels' password, generated when `access.defaultPasswordSecret` names
    /// none.
    pub fn sentinel_password(&self) -> String {
        format!("{}-password", self.sentinel())
    }
    /// The embedded sentinels' sentinel.conf template.
    pub fn sentinel_config(&self) -> String {
        format!("{}-sentinel-config", self.instance)
    }
    pub fn sentinel_headless(&self) -> String {
        format!("{}-sentinel-headless", self.instance)
    }
    /// The monitor name in Sentinel: unique per instance.
    pub fn monitor(&self) -> String {
        format!("{}.{}", self.namespace, self.instance)
    }
    /// A data pod's stable DNS name, announced to replicas and Sentinel.
    pub fn pod_host(&self, pod: &str) -> String {
        format!("{pod}.{}.{}.svc", self.headless(), self.namespace)
    }
    pub fn sentinel_host(&self, pod: &str) -> String {
        format!("{pod}.{}.{}.svc", self.sentinel_headless(), self.namespace)
    }
}

/// Labels that select one component of one instance.
pub fn selector(names: &Names, component: &str) -> BTreeMap<String, String> {
    [
        (LABEL_INSTANCE.to_owned(), names.instance.clone()),
        (LABEL_COMPONENT.to_owned(), component.to_owned()),
    ]
    .into()
}

/// Labels on owned objects: the selector plus who manages them.
pub fn labels(names: &Names, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector(names, component);
    labels.insert("app.kubernetes.io/name".into(), "valkey".into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "valkey-operator".into(),
    );
    labels
}

/// What the controller watches, one scope at a time: each namespace it is given, or the
/// whole cluster (None).
pub fn scopes(settings: &Settings) -> Vec<Option<String>> {
    if settings.watch_namespaces.is_empty() {
        vec![None]
    } else {
        settings
            .watch_namespaces
            .iter()
            .cloned()
            .map(Some)
            .collect()
    }
}

/// An API for `K` over one scope: a namespace, or the whole cluster.
pub fn scoped_api<K>(client: &kube::Client, scope: Option<&str>) -> kube::Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(namespace) => kube::Api::namespaced(client.clone(), namespace),
        None => kube::Api::all(client.clone()),
    }
}

/// Metadata for an object the Failover owns (deleted with it by the garbage collector).
pub fn owned_meta(failover: &Failover, name: String, component: &str) -> ObjectMeta {
    let names = Names::of(failover);
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels(&names, component)),
        owner_references: owner(failover).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner(failover: &Failover) -> Option<OwnerReference> {
    failover.controller_owner_ref(&())
}

/// Whether the paused annotation is set.
pub fn is_paused(failover: &Failover) -> bool {
    failover
        .annotations()
        .get(ANNOTATION_PAUSED)
        .is_some_and(|v| v == "true")
}
