//! Pure builders for the Valkey side of an instance: valkey.conf (ConfigMap), the password
//! Secret, the data StatefulSet with its agent sidecar, and the PodDisruptionBudget. No API
//! calls: the reconciler applies what these return, and tests compare them with fixtures.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetUpdateStrategy},
        core::v1::{
            ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, ExecAction,
            Lifecycle, LifecycleHandler, PersistentVolumeClaim, PersistentVolumeClaimSpec, Probe,
            Secret, Volume, VolumeMount, VolumeResourceRequirements,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use crate::k8s::{
    ANNOTATION_RESTART_HASH, EXPORTER_PORT, Names, Settings, VALKEY_PORT,
    objects::pod::{
        self, AgentSide, PodParts, SECRET_DIR, SWITCHOVER_WAIT_S, SetParts, agent_container,
        container_security, env, grpc_probe, main_container, memory_volume, mount,
        password_in_force_volume, port, pull_policy, token_volume,
    },
    objects::tls,
    owned_meta, selector,
};
use crate::{
    conf_text::quote,
    crd::{AccessMode, Failover, FailoverSpec, Storage},
    validate::{RESTART_KEYS, parse_memory, parse_quantity},
};

pub const COMPONENT_DATA: &str = "data";
/// Where the rendered config (with the password) lives inside the pod: memory-backed.
const RUN_DIR: &str = "/run/valkey";
const CONFIG_DIR: &str = "/etc/valkey";
/// What the pod has after the hold to stop: Valkey's shutdown (an AOF flush) and the agent's.
const SHUTDOWN_MARGIN_S: i64 = 15;

/// maxmemory from the container's memory: about 70% of the limit (or of the request when
/// there is no limit), leaving room for replication buffers and fork copy-on-write.
pub fn maxmemory(spec: &FailoverSpec) -> Option<u64> {
    let resources = spec.resources.as_ref()?;
    let memory = resources
        .limits
        .as_ref()
        .and_then(|l| l.get("memory"))
        .or_else(|| resources.requests.as_ref()?.get("memory"))?;
    let bytes = parse_quantity(&memory.0)?;
    Some((bytes * 0.7) as u64)
}

/// The backlog lets a replica that briefly lost its link resume without a full sync: 1% of
/// maxmemory, between 1 MiB and 256 MiB.
pub fn repl_backlog_size(maxmemory: Option<u64>) -> u64 {
    const MIB: u64 = 1024 * 1024;
    maxmemory.map_or(MIB, |m| (m / 100).clamp(MIB, 256 * MIB))
}

/// valkey.conf as the ConfigMap holds it. The password is not in it: the pod appends it at
/// start from the Secret. Every node starts as a replica of nobody (`replicaof 127.0.0.1 1`),
/// so a pod that comes back, empty or not, takes no writes and serves no sync until the
/// controller (or Sentinel) makes it master.
pub fn valkey_conf(spec: &FailoverSpec) -> String {
    let ports = if spec.access.enable_tls {
        crate::tls::TlsFiles::in_dir(tls::TLS_DIR).config_lines(VALKEY_PORT as u16)
    } else {
        format!("port {VALKEY_PORT}\n")
    };
    let mut conf = format!(
        "# Written by the valkey operator; edit spec.customConfigs instead.\n\
         {ports}bind * -::*\nprotected-mode no\ndir /data\n\
         appendonly yes\nappendfsync everysec\n\
         repl-ping-replica-period 1\nrepl-diskless-sync yes\nrepl-diskless-sync-delay 0\n\
         replicaof 127.0.0.1 1\n"
    );
    let maxmemory_set = spec.custom_configs.contains_key("maxmemory");
    let maxmemory = match spec.custom_configs.get("maxmemory") {
        Some(value) => parse_memory(value),
        None => maxmemory(spec),
    };
    if !maxmemory_set && let Some(bytes) = maxmemory {
        conf.push_str(&format!("maxmemory {bytes}\n"));
    }
    if !spec.custom_configs.contains_key("repl-backlog-size") {
        conf.push_str(&format!(
            "repl-backlog-size {}\n",
            repl_backlog_size(maxmemory)
        ));
    }
    if spec.replicas >= 3 && !spec.custom_configs.contains_key("min-replicas-to-write") {
        // Fencing: a master cut off from every replica stops taking writes after 5 s.
        conf.push_str("min-replicas-to-write 1\nmin-replicas-max-lag 5\n");
    }
    for module in &spec.modules {
        let mut path = if module.path.starts_with('/') {
            module.path.clone()
        } else {
            format!("/usr/lib/valkey/modules/{}", module.path)
        };
        if !path.ends_with(".so") {
            path.push_str(".so");
        }
        conf.push_str(&format!("loadmodule {}", quote(&path)));
        for arg in &module.args {
            conf.push(' ');
            conf.push_str(&quote(arg));
        }
        conf.push('\n');
    }
    for (key, value) in &spec.custom_configs {
        conf.push_str(&format!("{key} {value}\n"));
    }
    conf
}

/// A hash of what only a restart applies (restart-only keys, modules, image): when it changes
/// the pods are rolled; other customConfigs changes go live through CONFIG SET.
pub fn restart_hash(spec: &FailoverSpec) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    // Turning TLS on or off changes the port Valkey listens on: only a restart does that.
    if spec.access.enable_tls {
        hasher.update("tls\n");
    }
    for (key, value) in &spec.custom_configs {
        if RESTART_KEYS.contains(&key.to_ascii_lowercase().as_str()) {
            hasher.update(format!("{key}={value}\n"));
        }
    }
    for module in &spec.modules {
        hasher.update(format!(
            "module {} {}\n",
            module.path,
            module.args.join(" ")
        ));
    }
    hex::encode(&hasher.finalize()[..8])
}

pub fn config_map(failover: &Failover) -> ConfigMap {
    let names = Names::of(failover);
    ConfigMap {
        metadata: owned_meta(failover, names.config(), COMPONENT_DATA),
        data: Some([("valkey.conf".to_owned(), valkey_conf(&failover.spec))].into()),
        ..ConfigMap::default()
    }
}

/// A password from the operating system's CSPRNG (through rand's ThreadRng, a ChaCha CSPRNG
/// seeded from it): 32 letters and digits, about 190 bits.
pub fn generate_password() -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A password Secret of ours (the instance's, or the embedded sentinels'), from a CSPRNG;
/// created only when absent and never overwritten.
pub fn generated_secret(failover: &Failover, name: &str, component: &str) -> Secret {
    Secret {
        metadata: owned_meta(failover, name.to_owned(), component),
        string_data: Some([("password".to_owned(), generate_password())].into()),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The controller's copy of a password, which the pods mount (`k8s::password`): made from the
/// user's Secret, then changed only by a rotation.
pub fn password_in_force_secret(
    failover: &Failover,
    name: &str,
    whose: crate::k8s::objects::password::Whose,
    password: &str,
) -> Secret {
    let component = match whose {
        crate::k8s::objects::password::Whose::Instance => COMPONENT_DATA,
        crate::k8s::objects::password::Whose::Sentinel => {
            crate::k8s::objects::sentinel::COMPONENT_SENTINEL
        }
    };
    let mut data: BTreeMap<String, String> = [(
        crate::k8s::objects::password::KEY.to_owned(),
        password.to_owned(),
    )]
    .into();
    if whose == crate::k8s::objects::password::Whose::Instance {
        data.insert(
            crate::k8s::objects::password::EXPORTER_KEY.to_owned(),
            crate::k8s::objects::password::exporter_map(password),
        );
    }
    Secret {
        metadata: owned_meta(failover, name.to_owned(), component),
        string_data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// Shell lines that read the password of `dir`'s Secret into `$P`, and refuse to start when
/// it holds a character that could not be written inside a quoted config value (`"`, `\`
/// or a control character such as a newline), which could otherwise add directives.
pub fn read_password(dir: &str) -> String {
    format!(
        "P=\"$(cat {dir}/password)\"\n\
         case \"$P\" in *[\\\"\\\\]*|*[[:cntrl:]]*)\n  \
         echo \"the password in {dir}/password holds a quote, a backslash or a control \
         character; refusing to start\" >&2\n  exit 1;;\nesac\n"
    )
}

/// Shell lines (inside the config's `{ }`, indented by two) that, while a rotation is under way
/// (the Secret has `password.old`), make the default user accept every password of it by hash
/// (this `user` line overrides `requirepass`), so that a pod (re)started at any step works
/// with the old and the new one alike.
pub fn accept_rotating(dir: &str) -> String {
    format!(
        "if [ -s {dir}/password.old ]; then\n    \
         printf 'user default on'\n    \
         for f in {dir}/password {dir}/password.old {dir}/password.new; do\n      \
         if [ -s \"$f\" ]; then printf ' #%s' \"$(printf '%s' \"$(cat \"$f\")\" | sha256sum | cut -d' ' -f1)\"; fi\n    \
         done\n    \
         printf ' ~* &* +@all\\n'\n  \
         fi\n  "
    )
}

/// The shell that starts Valkey: the ConfigMap's valkey.conf plus the password and the
/// announced name, written to a memory-backed file readable by Valkey's user only.
fn valkey_start_script(names: &Names) -> String {
    format!(
        "set -eu\numask 077\n{password}\
         {{ cat {CONFIG_DIR}/valkey.conf\n  printf 'requirepass \"%s\"\\nmasterauth \"%s\"\\n' \"$P\" \"$P\"\n  \
         {accept}\
         printf 'replica-announce-ip %s\\n' \"$POD_NAME.{headless}.{namespace}.svc\"\n}} > {RUN_DIR}/valkey.conf\n\
         exec valkey-server {RUN_DIR}/valkey.conf\n",
        password = read_password(SECRET_DIR),
        accept = accept_rotating(SECRET_DIR),
        headless = names.headless(),
        namespace = names.namespace,
    )
}

/// preStop on the Valkey container: a terminating master holds until the controller has moved
/// its role away (the agent asks for that on SIGTERM), for at most SWITCHOVER_WAIT_S.
fn valkey_pre_stop(tls: bool) -> String {
    let tls = tls::cli_flags(tls);
    format!(
        "export REDISCLI_AUTH=\"$(cat {SECRET_DIR}/password)\" VALKEYCLI_AUTH=\"$(cat {SECRET_DIR}/password)\"\n\
         i=0\nwhile [ $i -lt {steps} ]; do\n  \
         valkey-cli {tls}-p {VALKEY_PORT} role 2>/dev/null | head -n1 | grep -q '^master$' || exit 0\n  \
         sleep 0.1; i=$((i+1))\ndone\n",
        steps = SWITCHOVER_WAIT_S * 10
    )
}

/// The data pods' StatefulSet: Valkey, its agent and (when asked for) the exporter.
pub fn statefulset(failover: &Failover, settings: &Settings, paused: bool) -> StatefulSet {
    let names = Names::of(failover);
    let spec = &failover.spec;
    let tls = tls::data_secret(failover);
    let mut volumes = data_volumes(&names, tls.as_deref());
    let claims = match &spec.storage {
        Some(storage) => Some(vec![data_claim(spec, storage, &names)]),
        None => {
            volumes.push(Volume {
                name: "data".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
            None
        }
    };
    let announce = format!(
        "$(VALKEY_AGENT_POD_NAME).{}.{}.svc",
        names.headless(),
        names.namespace
    );
    let agent = AgentSide {
        mode: "data",
        local_port: VALKEY_PORT,
        announce_host: &announce,
        password_file: Some(&format!("{SECRET_DIR}/password")),
        tls: tls.is_some(),
    };
    let mut containers = vec![
        valkey_container(failover, settings, tls.is_some()),
        agent_container(&names, settings, agent),
    ];
    containers.extend(exporter_container(spec, settings, tls.is_some()));
    let parts = PodParts {
        containers,
        volumes,
        annotations: [(ANNOTATION_RESTART_HASH.to_owned(), restart_hash(spec))].into(),
        termination_grace_period_seconds: Some(SWITCHOVER_WAIT_S + SHUTDOWN_MARGIN_S),
    };
    let set = SetParts {
        name: names.data(),
        component: COMPONENT_DATA,
        replicas: if paused { 0 } else { spec.replicas },
        service_name: names.headless(),
        // The controller rolls the pods itself: replicas first, the master last after a
        // switchover.
        update_strategy: Some(StatefulSetUpdateStrategy {
            type_: Some("OnDelete".into()),
            ..StatefulSetUpdateStrategy::default()
        }),
        template: pod::template(&names, COMPONENT_DATA, spec.pod_settings(), parts),
        claims,
    };
    pod::statefulset(failover, &names, set)
}

/// The Valkey container of a data pod.
fn valkey_container(failover: &Failover, settings: &Settings, tls: bool) -> Container {
    let names = Names::of(failover);
    let pod = failover.spec.pod_settings();
    let script = valkey_start_script(&names);
    Container {
        ports: Some(vec![port("valkey", VALKEY_PORT)]),
        readiness_probe: Some(grpc_probe("readiness", 2, 2)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..grpc_probe("", 5, 6)
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["sh".into(), "-c".into(), valkey_pre_stop(tls)]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: Some(
            [
                mount("data", "/data", false),
                mount("config", CONFIG_DIR, true),
                mount("password", SECRET_DIR, true),
                mount("run", RUN_DIR, false),
            ]
            .into_iter()
            .chain(tls.then(tls::tls_mount))
            .collect(),
        ),
        ..main_container("valkey", pod, &settings.valkey_image, script)
    }
}

/// The exporter container, when `spec.exporter` asks for one.
fn exporter_container(spec: &FailoverSpec, settings: &Settings, tls: bool) -> Option<Container> {
    let exporter = spec.exporter.as_ref()?;
    Some(Container {
        name: "exporter".into(),
        image: Some(
            exporter
                .image
                .clone()
                .unwrap_or(settings.exporter_image.clone()),
        ),
        image_pull_policy: Some(pull_policy(exporter.image_pull_policy)),
        env: Some(exporter_env(tls)),
        volume_mounts: Some(exporter_mounts(tls)),
        ports: Some(vec![port("metrics", EXPORTER_PORT)]),
        resources: exporter.resources.clone(),
        security_context: Some(
            exporter
                .security_context
                .clone()
                .unwrap_or(container_security()),
        ),
        ..Container::default()
    })
}

/// The volumes every data pod has; `data` is a claim or an emptyDir, added by the caller.
fn data_volumes(names: &Names, tls: Option<&str>) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        password_in_force_volume(names.password_in_force()),
        memory_volume("run"),
        token_volume(),
        tls::controller_ca_volume(names),
    ];
    if let Some(secret) = tls {
        volumes.push(tls::tls_volume(secret));
    }
    volumes
}

/// The data pods' claim template (`spec.storage`).
fn data_claim(spec: &FailoverSpec, storage: &Storage, names: &Names) -> PersistentVolumeClaim {
    let access = match storage.access_mode.unwrap_or_default() {
        AccessMode::ReadWriteOnce => "ReadWriteOnce",
        AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        AccessMode::ReadWriteMany => "ReadWriteMany",
        AccessMode::ReadOnlyMany => "ReadOnlyMany",
    };
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(selector(names, COMPONENT_DATA)),
            annotations: (!storage.annotations.is_empty()).then(|| storage.annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access.into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_owned(), claim_capacity(spec, storage))].into()),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Each data PVC's size: `storage.capacity`, or twice the memory (for the AOF and its
/// rewrite), at least 1Gi.
pub fn claim_capacity(spec: &FailoverSpec, storage: &Storage) -> Quantity {
    storage.capacity.clone().unwrap_or_else(|| {
        let bytes = maxmemory(spec).map_or(0.0, |m| m as f64 / 0.7 * 2.0);
        let gib = (bytes / 1024f64.powi(3)).ceil().max(1.0) as u64;
        Quantity(format!("{gib}Gi"))
    })
}

/// The exporter's settings: the local Valkey (over TLS, verified against the instance's CA,
/// when it serves TLS), and its password from a map that holds the local address only, never
/// as a plain password: redis_exporter sends a plain password to any target its `/scrape`
/// endpoint is asked for (oliver006/redis_exporter#1104). The endpoint is off as well in the
/// pinned version (v1.97.0); an older image named in `spec.exporter.image` ignores that
/// setting, and the map still keeps the password to the local address.
fn exporter_env(tls: bool) -> Vec<EnvVar> {
    let scheme = if tls { "rediss" } else { "redis" };
    let mut vars = vec![
        env("REDIS_ADDR", format!("{scheme}://127.0.0.1:{VALKEY_PORT}")),
        env(
            "REDIS_PASSWORD_FILE",
            format!(
                "{SECRET_DIR}/{}",
                crate::k8s::objects::password::EXPORTER_KEY
            ),
        ),
        env("REDIS_EXPORTER_DISABLE_SCRAPE_ENDPOINT", "true"),
    ];
    if tls {
        vars.push(env(
            "REDIS_EXPORTER_TLS_CA_CERT_FILE",
            format!("{}/ca.crt", tls::TLS_DIR),
        ));
    }
    vars
}

/// The exporter's mounts: the controller's copy of the password (for its map), and the
/// instance's TLS files when it serves TLS.
fn exporter_mounts(tls: bool) -> Vec<VolumeMount> {
    let mut mounts = vec![VolumeMount {
        name: "password".into(),
        mount_path: SECRET_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if tls {
        mounts.push(tls::tls_mount());
    }
    mounts
}

/// One pod down at a time, voluntarily.
pub fn pdb(failover: &Failover, component: &str, name: String) -> PodDisruptionBudget {
    let names = Names::of(failover);
    PodDisruptionBudget {
        metadata: owned_meta(failover, name, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(&names, component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests;
