//! The pod template both StatefulSets share (data pods and embedded sentinels): one builder
//! for the template (labels, the user's pod settings, the defaults the operator insists on),
//! the main container's common fields, the agent sidecar and the volumes every pod mounts.
//! Pure, like every builder.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy},
        core::v1::{
            Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
            EnvVarSource, GRPCAction, ObjectFieldSelector, PersistentVolumeClaim, PodAffinityTerm,
            PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
            ProjectedVolumeSource, SeccompProfile, SecretVolumeSource, SecurityContext,
            ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
            WeightedPodAffinityTerm,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use crate::crd::{Failover, PodSettings, PullPolicy};
use crate::k8s::{
    AGENT_METRICS_PORT, AGENT_PORT, Names, Settings, TOKEN_AUDIENCE, objects::tls, owned_meta,
    selector,
};

/// Where the agent's token is mounted.
const TOKEN_DIR: &str = "/var/run/secrets/valkey-agent";
/// Where a pod's password Secret is mounted.
pub const SECRET_DIR: &str = "/etc/valkey-secret";

/// How long a terminating master's Valkey is held up (preStop), and its agent waits, for the
/// controller to move the role away: the longest switchover that succeeds, plus a margin for
/// the agent's request to reach the controller.
pub const SWITCHOVER_WAIT_S: i64 =
    crate::driver::switchover::SWITCHOVER_BUDGET.as_secs() as i64 + 2;

/// The agent sidecar's place in its pod.
#[derive(Debug, Clone, Copy)]
pub struct AgentSide<'a> {
    /// `data` or `sentinel`.
    pub mode: &'a str,
    /// The local process's port.
    pub local_port: i32,
    /// The address the agent announces for its process.
    pub announce_host: &'a str,
    /// Where the process's password is mounted.
    pub password_file: Option<&'a str>,
    pub tls: bool,
}

/// A pod's own parts: what its template holds beyond the pod settings.
#[derive(Debug, Default)]
pub struct PodParts {
    pub containers: Vec<Container>,
    pub volumes: Vec<Volume>,
    /// Annotations beside the user's podAnnotations (a restart hash, a certificate's hash).
    pub annotations: BTreeMap<String, String>,
    pub termination_grace_period_seconds: Option<i64>,
}

/// The pod template of `component`'s pods.
pub fn template(
    names: &Names,
    component: &str,
    pod: PodSettings<'_>,
    parts: PodParts,
) -> PodTemplateSpec {
    let select = selector(names, component);
    let mut labels = select.clone();
    labels.extend(crate::k8s::labels(names, component));
    let mut annotations = pod.pod_annotations.clone();
    annotations.extend(parts.annotations);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            // The agent authenticates with a projected token of its own; nothing in the pod
            // talks to the API.
            automount_service_account_token: Some(false),
            containers: parts.containers,
            volumes: Some(parts.volumes),
            affinity: Some(anti_affinity(pod.affinity, select)),
            tolerations: (!pod.tolerations.is_empty()).then(|| pod.tolerations.to_vec()),
            node_selector: (!pod.node_selector.is_empty()).then(|| pod.node_selector.clone()),
            security_context: Some(pod_security(pod.security_context)),
            image_pull_secrets: (!pod.image_pull_secrets.is_empty())
                .then(|| pod.image_pull_secrets.to_vec()),
            termination_grace_period_seconds: parts.termination_grace_period_seconds,
            enable_service_links: Some(false),
            ..PodSpec::default()
        }),
    }
}

/// A component's StatefulSet around its pod template.
#[derive(Debug)]
pub struct SetParts {
    pub name: String,
    pub component: &'static str,
    pub replicas: i32,
    pub service_name: String,
    pub update_strategy: Option<StatefulSetUpdateStrategy>,
    pub template: PodTemplateSpec,
    pub claims: Option<Vec<PersistentVolumeClaim>>,
}

pub fn statefulset(failover: &Failover, names: &Names, set: SetParts) -> StatefulSet {
    StatefulSet {
        metadata: owned_meta(failover, set.name, set.component),
        spec: Some(StatefulSetSpec {
            replicas: Some(set.replicas),
            service_name: Some(set.service_name),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: set.update_strategy,
            selector: LabelSelector {
                match_labels: Some(selector(names, set.component)),
                ..LabelSelector::default()
            },
            template: set.template,
            volume_claim_templates: set.claims,
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The main container's fields set from the pod settings: its image (`default_image` when the
/// spec names none), pull policy and resources, and the operator's container security.
pub fn main_container(
    name: &str,
    pod: PodSettings<'_>,
    default_image: &str,
    command: String,
) -> Container {
    Container {
        name: name.into(),
        image: Some(pod.image.unwrap_or(default_image).to_owned()),
        image_pull_policy: Some(pull_policy(pod.image_pull_policy)),
        command: Some(vec!["sh".into(), "-c".into(), command]),
        env: Some(vec![env_field("POD_NAME", "metadata.name")]),
        resources: pod.resources.cloned(),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

pub fn pull_policy(policy: Option<PullPolicy>) -> String {
    match policy.unwrap_or_default() {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
    .into()
}

pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

pub fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

pub fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

pub fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

/// Probes go through the agent's grpc.health.v1: "" is the local process answering,
/// "readiness" is serving (a master, or a replica in sync).
pub fn grpc_probe(service: &str, period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: AGENT_PORT,
            service: Some(service.into()),
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Non-root, no privilege escalation, read-only root, no capabilities.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The pod default: uid 999, gid 1000, fsGroup 1000. Either way the runtime's default
/// seccomp profile applies unless the spec names another (the restricted Pod Security level
/// requires one).
pub fn pod_security(given: Option<&PodSecurityContext>) -> PodSecurityContext {
    let mut context = given.cloned().unwrap_or(PodSecurityContext {
        run_as_user: Some(999),
        run_as_group: Some(1000),
        fs_group: Some(1000),
        run_as_non_root: Some(true),
        ..PodSecurityContext::default()
    });
    context
        .seccomp_profile
        .get_or_insert_with(|| SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        });
    context
}

/// The default: spread this component's pods across nodes when possible.
pub fn anti_affinity(given: Option<&Affinity>, labels: BTreeMap<String, String>) -> Affinity {
    given.cloned().unwrap_or(Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(labels),
                            ..LabelSelector::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    })
}

/// The agent sidecar of a data or a sentinel pod.
pub fn agent_container(names: &Names, settings: &Settings, side: AgentSide<'_>) -> Container {
    let AgentSide {
        mode,
        local_port,
        announce_host,
        password_file,
        tls,
    } = side;
    let mut env = vec![
        env("VALKEY_AGENT_MODE", mode),
        env(
            "VALKEY_AGENT_VALKEY_ADDR",
            format!("127.0.0.1:{local_port}"),
        ),
        env(
            "VALKEY_AGENT_CONTROLLER_ADDR",
            settings.controller_addr.clone(),
        ),
        env("VALKEY_AGENT_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
        env("VALKEY_AGENT_NAMESPACE", names.namespace.clone()),
        env("VALKEY_AGENT_FAILOVER", names.instance.clone()),
        env_field("VALKEY_AGENT_POD_NAME", "metadata.name"),
        env("VALKEY_AGENT_ANNOUNCE_HOST", announce_host),
        env("VALKEY_AGENT_ANNOUNCE_PORT", local_port.to_string()),
        env("VALKEY_AGENT_DATA_DIR", "/data"),
        env("VALKEY_AGENT_LISTEN", format!("0.0.0.0:{AGENT_PORT}")),
        env(
            "VALKEY_AGENT_METRICS_LISTEN",
            format!("0.0.0.0:{AGENT_METRICS_PORT}"),
        ),
        env("VALKEY_AGENT_LOG_FORMAT", "json"),
        // A terminating master's agent waits as long as its Valkey is held up.
        env(
            "VALKEY_AGENT_SHUTDOWN_SWITCHOVER_TIMEOUT_MS",
            (SWITCHOVER_WAIT_S * 1000).to_string(),
        ),
        env(
            "VALKEY_AGENT_CONTROLLER_CA_FILE",
            format!("{}/ca.crt", tls::CONTROLLER_CA_DIR),
        ),
    ];
    let mut mounts = vec![
        mount("data", "/data", false),
        mount("agent-token", TOKEN_DIR, true),
        mount("controller-ca", tls::CONTROLLER_CA_DIR, true),
    ];
    if tls {
        env.extend(tls::agent_tls_env());
        mounts.push(tls::tls_mount());
    }
    if let Some(file) = password_file {
        env.push(self::env("VALKEY_AGENT_VALKEY_PASSWORD_FILE", file));
        mounts.push(mount("password", SECRET_DIR, true));
    }
    Container {
        name: "agent".into(),
        image: Some(settings.agent_image.clone()),
        command: Some(vec!["valkey-agent".into()]),
        env: Some(env),
        ports: Some(vec![
            port("agent-grpc", AGENT_PORT),
            port("agent-metrics", AGENT_METRICS_PORT),
        ]),
        liveness_probe: Some(Probe {
            tcp_socket: Some(k8s_openapi::api::core::v1::TCPSocketAction {
                port: IntOrString::Int(AGENT_PORT),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Probe::default()
        }),
        resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_owned(), Quantity("10m".into())),
                    ("memory".to_owned(), Quantity("16Mi".into())),
                ]
                .into(),
            ),
            limits: Some([("memory".to_owned(), Quantity("64Mi".into()))].into()),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

/// The projected service-account token the agent presents to the controller.
pub fn token_volume() -> Volume {
    Volume {
        name: "agent-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub fn memory_volume(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("16Mi".into())),
        }),
        ..Volume::default()
    }
}

/// The controller's copy of a password, every key: `password`, and during a rotation
/// `password.old` and `password.new`. Mounted whole (not by subPath) so that the kubelet
/// brings each change to the running pod.
pub fn password_in_force_volume(secret: String) -> Volume {
    Volume {
        name: "password".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o400),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}
