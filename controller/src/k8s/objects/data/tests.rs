//! Tests of the pure builders of a data node's objects.

use super::*;
use crate::crd::{Storage, ValkeyModule};
use crate::k8s::{AGENT_PORT, objects::pod::pod_security};
use k8s_openapi::api::core::v1::{PodSecurityContext, PodSpec, ResourceRequirements};
use std::time::Duration;

pub(crate) fn failover(spec: FailoverSpec) -> Failover {
    let mut failover = Failover::new("demo", spec);
    failover.metadata.namespace = Some("prod".into());
    failover.metadata.uid = Some("uid-1".into());
    failover
}

fn with_memory(limit: &str) -> FailoverSpec {
    FailoverSpec {
        replicas: 3,
        resources: Some(ResourceRequirements {
            limits: Some([("memory".to_owned(), Quantity(limit.into()))].into()),
            ..Default::default()
        }),
        ..FailoverSpec::default()
    }
}

#[test]
fn valkey_conf_sizes_memory_and_starts_as_a_replica_of_nobody() {
    let conf = valkey_conf(&with_memory("1Gi"));
    assert!(conf.contains("\nreplicaof 127.0.0.1 1\n"), "{conf}");
    assert!(conf.contains(&format!("\nmaxmemory {}\n", (1024f64.powi(3) * 0.7) as u64)));
    assert!(conf.contains(&format!(
        "\nrepl-backlog-size {}\n",
        (1024f64.powi(3) * 0.7) as u64 / 100
    )));
    assert!(conf.contains("min-replicas-to-write 1"));
    assert!(
        !conf.contains("requirepass"),
        "no password in the ConfigMap"
    );
    let mut spec = with_memory("1Gi");
    spec.custom_configs
        .insert("maxmemory".into(), "100mb".into());
    spec.modules.push(ValkeyModule {
        path: "valkey-json".into(),
        args: vec![],
    });
    let conf = valkey_conf(&spec);
    assert_eq!(conf.matches("maxmemory ").count(), 1, "{conf}");
    assert!(conf.contains("maxmemory 100mb\n"));
    assert!(conf.contains(&format!("repl-backlog-size {}\n", 1024 * 1024)));
    assert!(conf.contains("loadmodule \"/usr/lib/valkey/modules/valkey-json.so\"\n"));
    let single = valkey_conf(&FailoverSpec {
        replicas: 1,
        ..FailoverSpec::default()
    });
    assert!(!single.contains("min-replicas-to-write"));
    assert!(!single.contains("maxmemory "));
}

#[test]
fn only_restart_keys_change_the_restart_hash() {
    let base = with_memory("1Gi");
    let mut live = base.clone();
    live.custom_configs
        .insert("maxmemory-policy".into(), "allkeys-lru".into());
    let mut restart = base.clone();
    restart
        .custom_configs
        .insert("databases".into(), "32".into());
    assert_eq!(restart_hash(&base), restart_hash(&live));
    assert_ne!(restart_hash(&base), restart_hash(&restart));
}

#[test]
fn passwords_are_random_and_long() {
    let (a, b) = (generate_password(), generate_password());
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
}

#[test]
fn the_statefulset_has_the_agent_probes_prestop_and_defaults() {
    let mut spec = with_memory("1Gi");
    spec.storage = Some(Storage::default());
    spec.exporter = Some(Default::default());
    let sts = statefulset(&failover(spec.clone()), &Settings::default(), false);
    let meta = &sts.metadata;
    assert_eq!(meta.name.as_deref(), Some("demo"));
    assert_eq!(
        meta.owner_references.as_ref().map(|o| o[0].uid.as_str()),
        Some("uid-1")
    );
    let s = sts.spec.as_ref().expect("spec");
    assert_eq!(s.replicas, Some(3));
    assert_eq!(s.service_name.as_deref(), Some("demo-headless"));
    let pod = s.template.spec.as_ref().expect("pod");
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["valkey", "agent", "exporter"]);
    let valkey = &pod.containers[0];
    let ready = valkey
        .readiness_probe
        .as_ref()
        .and_then(|p| p.grpc.as_ref())
        .expect("grpc");
    assert_eq!(
        (ready.port, ready.service.as_deref()),
        (AGENT_PORT, Some("readiness"))
    );
    assert!(
        valkey
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .is_some()
    );
    let script = &valkey.command.as_ref().expect("command")[2];
    assert!(script.contains("demo-headless.prod.svc"), "{script}");
    let security = pod.security_context.as_ref().expect("pod security");
    assert_eq!(
        (security.run_as_user, security.fs_group),
        (Some(999), Some(1000))
    );
    assert!(
        pod.affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .is_some()
    );
    let claims = s.volume_claim_templates.as_ref().expect("PVC");
    let size = claims[0]
        .spec
        .as_ref()
        .and_then(|c| c.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .map(|r| r["storage"].0.clone());
    assert_eq!(size.as_deref(), Some("2Gi"), "twice the memory limit");
    let agent_env: BTreeMap<String, String> = pod.containers[1]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    assert_eq!(agent_env["VALKEY_AGENT_FAILOVER"], "demo");
    assert_eq!(agent_env["VALKEY_AGENT_NAMESPACE"], "prod");
    let paused = statefulset(&failover(spec), &Settings::default(), true);
    assert_eq!(paused.spec.and_then(|s| s.replicas), Some(0));
}

/// What the restricted Pod Security level finds wrong with a pod (each field it checks).
fn restricted_violations(pod: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    let pod_security = pod.security_context.clone().unwrap_or_default();
    if pod.host_network == Some(true) || pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        out.push("host namespaces".to_owned());
    }
    if pod.automount_service_account_token != Some(false) {
        out.push("automountServiceAccountToken is not false".to_owned());
    }
    for volume in pod.volumes.iter().flatten() {
        let allowed = volume.config_map.is_some()
            || volume.secret.is_some()
            || volume.empty_dir.is_some()
            || volume.projected.is_some()
            || volume.persistent_volume_claim.is_some()
            || volume.downward_api.is_some()
            || volume.csi.is_some()
            || volume.ephemeral.is_some();
        if !allowed {
            out.push(format!("volume {} has a restricted type", volume.name));
        }
    }
    let pod_seccomp = pod_security
        .seccomp_profile
        .as_ref()
        .map(|p| p.type_.clone());
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let sc = c.security_context.clone().unwrap_or_default();
        let name = &c.name;
        if sc.privileged == Some(true) {
            out.push(format!("{name}: privileged"));
        }
        if sc.allow_privilege_escalation != Some(false) {
            out.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.iter().flatten().any(|d| d == "ALL") {
            out.push(format!("{name}: capabilities do not drop ALL"));
        }
        if caps.add.iter().flatten().any(|a| a != "NET_BIND_SERVICE") {
            out.push(format!("{name}: adds capabilities"));
        }
        if sc.run_as_non_root.or(pod_security.run_as_non_root) != Some(true) {
            out.push(format!("{name}: runAsNonRoot is not true"));
        }
        if sc.run_as_user.or(pod_security.run_as_user) == Some(0) {
            out.push(format!("{name}: runs as uid 0"));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.clone())
            .or(pod_seccomp.clone());
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
            out.push(format!(
                "{name}: no RuntimeDefault or Localhost seccomp profile"
            ));
        }
        if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
            out.push(format!("{name}: hostPort"));
        }
    }
    out
}

#[test]
fn every_example_renders_pods_the_restricted_pod_security_level_admits() {
    let examples = [
        include_str!("../../../../../deploy/examples/failover.yaml"),
        include_str!("../../../../../deploy/examples/failover-manual.yaml"),
        include_str!("../../../../../deploy/examples/failover-tls.yaml"),
        include_str!("../../../../../deploy/examples/failover-external-sentinel.yaml"),
    ];
    let mut sets = 0;
    for text in examples {
        let mut failover: Failover = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        failover.spec.exporter.get_or_insert_with(Default::default);
        let objects = crate::k8s::render(&failover, &crate::k8s::Settings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        for object in objects.into_iter().filter(|o| o["kind"] == "StatefulSet") {
            let set: StatefulSet = serde_json::from_value(object).unwrap_or_else(|e| panic!("{e}"));
            let pod = set
                .spec
                .and_then(|s| s.template.spec)
                .unwrap_or_else(|| panic!("a pod template"));
            assert_eq!(restricted_violations(&pod), Vec::<String>::new());
            sets += 1;
        }
    }
    assert!(sets >= 5, "data and sentinel sets of every example: {sets}");
    // A user's pod security context keeps the default seccomp profile unless it names one.
    let given = PodSecurityContext {
        run_as_user: Some(1001),
        ..PodSecurityContext::default()
    };
    let rendered = pod_security(Some(&given));
    assert_eq!(rendered.run_as_user, Some(1001));
    assert_eq!(
        rendered.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
}

#[test]
fn a_terminating_master_is_held_as_long_as_the_longest_switchover_and_the_pod_outlives_it() {
    let sts = statefulset(&failover(with_memory("1Gi")), &Settings::default(), false);
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let container = |name: &str| {
        pod.containers
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} container"))
    };
    // The preStop polls the role every 0.1 s, this many times.
    let script = container("valkey")
        .lifecycle
        .and_then(|l| l.pre_stop)
        .and_then(|p| p.exec)
        .and_then(|e| e.command)
        .map(|c| c.join(" "))
        .expect("a preStop");
    let steps: u64 = script
        .split("while [ $i -lt ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the hold's step count");
    let hold = Duration::from_millis(steps * 100);
    let budget = crate::driver::switchover::SWITCHOVER_BUDGET;
    assert!(
        hold >= budget,
        "the preStop holds {hold:?}, the longest switchover takes {budget:?}"
    );
    // The agent keeps the master's stream open as long, so the switchover's commands reach it.
    let agent_wait: u64 = container("agent")
        .env
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "VALKEY_AGENT_SHUTDOWN_SWITCHOVER_TIMEOUT_MS")
        .and_then(|e| e.value?.parse().ok())
        .expect("the agent's shutdown wait");
    assert!(Duration::from_millis(agent_wait) >= hold);
    // And the pod is not killed before the hold ends and Valkey has flushed its AOF.
    let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap_or(30) as u64);
    assert!(
        grace >= hold + Duration::from_secs(10),
        "grace {grace:?}, hold {hold:?}"
    );
}
