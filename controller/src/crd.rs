//! The `Failover` custom resource (`valkey.buf.red/v1alpha1`) as Rust types, from which the
//! CRD is generated (`valkey-controller crd`; `deploy/base/crd.yaml` is kept in sync by a test).
//! Field meanings are in shared/API.md; validation the schema can express is in the schema
//! (ranges, enums, CEL), the rest is checked by the controller.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext,
        Toleration,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Condition},
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Valkey master with replicas, kept available by Sentinel (`spec.sentinel`) or by the
/// controller itself.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "valkey.buf.red",
    version = "v1alpha1",
    kind = "Failover",
    plural = "failovers",
    shortname = "vkf",
    namespaced,
    status = "FailoverStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Sentinels","type":"integer","jsonPath":".spec.sentinel.replicas"}"#,
    printcolumn = r#"{"name":"Access","type":"string","jsonPath":".spec.access.serviceType"}"#,
    printcolumn = r#"{"name":"Master","type":"string","jsonPath":".status.master"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// Valkey image, e.g. valkey/valkey:8.0-alpine; the Valkey version is read from its tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Valkey pods, master included.
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra valkey.conf settings; keys the operator owns are rejected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_configs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exporter: Option<Exporter>,
    #[serde(default)]
    pub access: InstanceAccess,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Present: policy sentinel. Absent: policy manual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelSettings>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ValkeyModule>,
}

/// The pod settings data and sentinel pods share, borrowed from either spec: one builder makes
/// both pod templates (`k8s::pod`). A view rather than one flattened struct in the types above:
/// the two copies of the fields carry different descriptions in the schema (the data pods'
/// `image` names the Valkey version rule), and the CRD stays byte-identical.
#[derive(Debug, Clone, Copy)]
pub struct PodSettings<'a> {
    pub image: Option<&'a str>,
    pub image_pull_policy: Option<PullPolicy>,
    pub image_pull_secrets: &'a [LocalObjectReference],
    pub resources: Option<&'a ResourceRequirements>,
    pub pod_annotations: &'a BTreeMap<String, String>,
    pub affinity: Option<&'a Affinity>,
    pub tolerations: &'a [Toleration],
    pub node_selector: &'a BTreeMap<String, String>,
    pub security_context: Option<&'a PodSecurityContext>,
}

impl FailoverSpec {
    /// The data pods' settings.
    pub fn pod_settings(&self) -> PodSettings<'_> {
        PodSettings {
            image: self.image.as_deref(),
            image_pull_policy: self.image_pull_policy,
            image_pull_secrets: &self.image_pull_secrets,
            resources: self.resources.as_ref(),
            pod_annotations: &self.pod_annotations,
            affinity: self.affinity.as_ref(),
            tolerations: &self.tolerations,
            node_selector: &self.node_selector,
            security_context: self.security_context.as_ref(),
        }
    }
}

impl SentinelSettings {
    /// The sentinel pods' settings: the image, its pull policy and pull secrets fall back to
    /// the data pods' (`instance`).
    pub fn pod_settings<'a>(&'a self, instance: &'a FailoverSpec) -> PodSettings<'a> {
        let pull_secrets = if self.image_pull_secrets.is_empty() {
            &instance.image_pull_secrets
        } else {
            &self.image_pull_secrets
        };
        PodSettings {
            image: self.image.as_deref().or(instance.image.as_deref()),
            image_pull_policy: self.image_pull_policy.or(instance.image_pull_policy),
            image_pull_secrets: pull_secrets,
            resources: self.resources.as_ref(),
            pod_annotations: &self.pod_annotations,
            affinity: self.affinity.as_ref(),
            tolerations: &self.tolerations,
            node_selector: &self.node_selector,
            security_context: self.security_context.as_ref(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// PVC size; absent: twice the memory limit (or request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<AccessMode>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Keep the PVCs when the Failover is deleted.
    #[serde(default)]
    pub retain_after_deleted: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AccessMode {
    #[default]
    ReadWriteOnce,
    ReadWriteOncePod,
    ReadWriteMany,
    ReadOnlyMany,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exporter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IssuerType {
    #[default]
    ClusterIssuer,
    Issuer,
}

/// How clients reach Valkey.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceAccess {
    #[serde(default)]
    pub service_type: ServiceType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_prefer: Option<IpFamily>,
    /// NodePort pool: `30001,30002` or `30001-30003`; one port per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$"))]
    pub ports: Option<String>,
    #[serde(default, rename = "enableTLS")]
    pub enable_tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_issuer_type: Option<IssuerType>,
}

/// `spec.sentinel`: the embedded Sentinel's settings, or a reference to an external set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.replicas) || (self.replicas >= 3 && self.replicas % 2 == 1)",
     "message": "spec.sentinel.replicas must be odd and at least 3"},
    {"rule": "!has(self.quorum) || has(self.sentinelReference) || self.quorum <= (has(self.replicas) ? self.replicas : 3)",
     "message": "spec.sentinel.quorum must be at most the number of sentinels"},
]))]
pub struct SentinelSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Sentinels: odd, at least 3 (default 3), at most 9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 9))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_configs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exporter: Option<Exporter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<SentinelInstanceAccess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Use an existing external Sentinel set instead of creating one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_reference: Option<SentinelReference>,
    /// SENTINEL SET parameters: down-after-milliseconds, failover-timeout, parallel-syncs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(k, k in ['down-after-milliseconds', 'failover-timeout', 'parallel-syncs'])",
         "message": "spec.sentinel.monitorConfig accepts down-after-milliseconds, failover-timeout and parallel-syncs"},
    ]))]
    pub monitor_config: BTreeMap<String, String>,
    /// Sentinels that must agree the master is down; default a majority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub quorum: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SentinelInstanceAccess {
    #[serde(flatten)]
    pub access: InstanceAccess,
    /// Secret with key `password`: Sentinel's requirepass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_password_secret: Option<String>,
    /// Use this TLS Secret instead of issuing one.
    #[serde(
        default,
        rename = "externalTLSSecret",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_tls_secret: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SentinelReference {
    /// At least 3 sentinels, at most 9.
    #[schemars(length(min = 3, max = 9))]
    pub nodes: Vec<SentinelMonitorNode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Authorization>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SentinelMonitorNode {
    pub ip: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValkeyModule {
    /// Absolute, or a file name under the image's module directory (`.so` appended).
    #[schemars(length(min = 1))]
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    #[default]
    Creating,
    Ready,
    Failed,
    Paused,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Manual,
    Sentinel,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverStatus {
    #[serde(default)]
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<ValkeyNode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    #[serde(default)]
    pub monitor: MonitorStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The current master pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// The failover epoch (bumped at every promotion).
    #[serde(default)]
    pub epoch: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_reason: Option<String>,
    /// The master before the last failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_from: Option<String>,
    /// A planned switchover under way (written before it starts, cleared when it is over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_switchover: Option<PendingSwitchoverStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingSwitchoverStatus {
    pub from: String,
    pub to: String,
    pub epoch: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Master,
    Replica,
    #[default]
    None,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValkeyNode {
    /// Run id.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub role: NodeRole,
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_ref: Option<String>,
    #[serde(default)]
    pub stateful_set: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub repl_offset: i64,
    #[serde(default)]
    pub lag: i64,
    #[serde(default)]
    pub link_up: bool,
    /// A master whose write lease lapsed (cut off from the controller and its replicas): its
    /// agent paused writes until the controller grants the lease again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fenced: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitorStatus {
    #[serde(default)]
    pub policy: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_password_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<SentinelMonitorNode>,
}

/// The CRD as YAML, as `valkey-controller crd` prints it and deploy/base/crd.yaml holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&Failover::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_crd_yaml_is_in_sync_with_the_types() {
        let generated = crd_yaml().expect("crd yaml");
        let committed = include_str!("../../deploy/base/crd.yaml");
        assert!(
            generated == committed,
            "deploy/base/crd.yaml is stale: run `cargo run -p valkey-controller -- crd > deploy/base/crd.yaml`"
        );
    }

    #[test]
    fn the_examples_deserialize_into_the_types() {
        for (file, text) in [
            (
                "failover.yaml",
                include_str!("../../deploy/examples/failover.yaml"),
            ),
            (
                "failover-manual.yaml",
                include_str!("../../deploy/examples/failover-manual.yaml"),
            ),
        ] {
            let failover: Failover =
                serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(failover.spec.replicas, 3, "{file}");
        }
    }

    #[test]
    fn the_schema_is_structural_every_property_typed() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(Failover::crd()).expect("json");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        fn walk(path: &str, node: &serde_json::Value, bad: &mut Vec<String>) {
            if let Some(obj) = node.as_object() {
                let typed = obj.contains_key("type")
                    || obj.contains_key("x-kubernetes-int-or-string")
                    || obj.contains_key("x-kubernetes-preserve-unknown-fields");
                if !typed {
                    bad.push(path.to_owned());
                }
                for key in ["oneOf", "anyOf", "allOf", "$ref"] {
                    if obj.contains_key(key) && !path.contains("x-kubernetes") {
                        bad.push(format!("{path} has {key}"));
                    }
                }
                if let Some(props) = obj.get("properties").and_then(|p| p.as_object()) {
                    for (name, child) in props {
                        walk(&format!("{path}.{name}"), child, bad);
                    }
                }
                for key in ["items", "additionalProperties"] {
                    if let Some(child) = obj.get(key).filter(|c| c.is_object()) {
                        walk(&format!("{path}[{key}]"), child, bad);
                    }
                }
            }
        }
        let mut bad = Vec::new();
        walk("", schema, &mut bad);
        assert!(bad.is_empty(), "not structural: {bad:#?}");
        let columns = &crd["spec"]["versions"][0]["additionalPrinterColumns"];
        assert_eq!(columns.as_array().map(Vec::len), Some(7));
        assert_eq!(
            crd["spec"]["versions"][0]["subresources"]["status"],
            serde_json::json!({})
        );
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["vkf"])
        );
    }
}
