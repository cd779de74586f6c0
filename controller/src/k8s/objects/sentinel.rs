//! Pure builders for an embedded Sentinel set: its sentinel.conf template (ConfigMap), its
//! StatefulSet (valkey-sentinel with an agent each), its Services and its PDB. Sentinel uses
//! hostnames (resolve-hostnames / announce-hostnames), so a pod back with a new IP is found.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{
        ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, Probe, Service,
        ServicePort, Volume, VolumeMount,
    },
    policy::v1::PodDisruptionBudget,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{Failover, PodSettings, SentinelSettings};
use crate::k8s::{
    AGENT_PORT, Names, SENTINEL_PORT, Settings,
    objects::data::pdb,
    objects::pod::{
        self, AgentSide, PodParts, SECRET_DIR, SetParts, agent_container, main_container,
        memory_volume, password_in_force_volume, token_volume,
    },
    objects::services::{client_service, headless},
    objects::tls,
    owned_meta, selector,
};

pub const COMPONENT_SENTINEL: &str = "sentinel";

/// The embedded Sentinel's settings, when the instance has one (not an external set).
pub fn embedded(failover: &Failover) -> Option<&SentinelSettings> {
    failover
        .spec
        .sentinel
        .as_ref()
        .filter(|s| s.sentinel_reference.is_none())
}

/// The Secret holding the embedded sentinels' own password, and the field that names it:
/// the one `access.defaultPasswordSecret` names, else `<name>-sentinel-password`, which the
/// controller generates. Embedded sentinels always have a password: without one, anyone on the
/// pod network could re-point the monitor, take over the sentinels' users, or shut them down.
pub fn password_secret(failover: &Failover) -> Option<(&'static str, String)> {
    let sentinel = embedded(failover)?;
    Some(sentinel.password_secret().unwrap_or_else(|| {
        (
            "spec.sentinel.access.defaultPasswordSecret",
            Names::of(failover).sentinel_password(),
        )
    }))
}

/// sentinel.conf as first written. Sentinel rewrites its file with what it learns; the pod
/// copies this template only when the file is absent. The controller then issues MONITOR.
pub fn sentinel_conf(settings: &SentinelSettings) -> String {
    // The port lines (plaintext or TLS only) are written by the start script at every start.
    let mut conf = "# Written by the valkey operator; edit spec.sentinel.customConfigs instead.\n\
                    protected-mode yes\ndir /data\n\
                    sentinel resolve-hostnames yes\nsentinel announce-hostnames yes\n"
        .to_owned();
    for (key, value) in &settings.custom_configs {
        conf.push_str(&format!("{key} {value}\n"));
    }
    conf
}

/// The port lines of a sentinel: plaintext, or TLS only with every link it opens over TLS.
fn port_lines(tls: bool) -> String {
    if tls {
        crate::tls::TlsFiles::in_dir(tls::TLS_DIR).config_lines(SENTINEL_PORT as u16)
    } else {
        format!("port {SENTINEL_PORT}\n")
    }
}

/// Where a sentinel pod's agent finds the instance's password.
const INSTANCE_SECRET_DIR: &str = "/etc/valkey-instance-secret";

fn start_script(names: &Names, tls: bool) -> String {
    let password = format!(
        "{read}\
         printf 'requirepass \"%s\"\\nsentinel sentinel-pass \"%s\"\\n' \"$P\" \"$P\" >> /data/sentinel.conf\n\
         {{ {accept}}} >> /data/sentinel.conf\n",
        read = crate::k8s::objects::data::read_password(SECRET_DIR),
        accept = crate::k8s::objects::data::accept_rotating(SECRET_DIR),
    );
    format!(
        "set -eu\numask 077\n\
         [ -f /data/sentinel.conf ] || cp /etc/sentinel/sentinel.conf /data/sentinel.conf\n\
         # The ports, the password and the announced name always follow the spec, the Secret\n\
         # and the pod.\n\
         grep -v -e '^port ' -e '^tls-' -e '^requirepass' -e '^user default' \
         -e '^sentinel sentinel-pass' -e '^sentinel announce-ip' /data/sentinel.conf \
         > /data/sentinel.conf.new || true\n\
         mv /data/sentinel.conf.new /data/sentinel.conf\n\
         printf '%s' '{ports}' >> /data/sentinel.conf\n\
         printf 'sentinel announce-ip %s\\n' \"$POD_NAME.{headless}.{namespace}.svc\" >> /data/sentinel.conf\n\
         {password}exec valkey-sentinel /data/sentinel.conf\n",
        headless = names.sentinel_headless(),
        namespace = names.namespace,
        ports = port_lines(tls),
    )
}

/// Pod template annotation on sentinels: a hash of the certificate they serve. Sentinel cannot
/// reload a renewed certificate, so a new one rolls the sentinels (the StatefulSet's rolling
/// update: one pod at a time, each ready before the next).
pub const ANNOTATION_TLS_CERT: &str = "valkey.buf.red/tls-cert";

/// Every object of an embedded Sentinel set; empty without one. `tls_cert`: a hash of the
/// certificate in the sentinels' TLS Secret, when known.
pub fn objects(
    failover: &Failover,
    settings: &Settings,
    paused: bool,
    tls_cert: Option<&str>,
) -> (
    Vec<ConfigMap>,
    Vec<StatefulSet>,
    Vec<Service>,
    Vec<PodDisruptionBudget>,
) {
    let Some(sentinel) = embedded(failover) else {
        return Default::default();
    };
    let names = Names::of(failover);
    let config = ConfigMap {
        metadata: owned_meta(failover, names.sentinel_config(), COMPONENT_SENTINEL),
        data: Some([("sentinel.conf".to_owned(), sentinel_conf(sentinel))].into()),
        ..ConfigMap::default()
    };
    let statefulset = statefulset(failover, sentinel, settings, paused, tls_cert);
    let services = services(failover, sentinel);
    let budget = pdb(failover, COMPONENT_SENTINEL, names.sentinel());
    (vec![config], vec![statefulset], services, vec![budget])
}

/// The sentinels' StatefulSet: valkey-sentinel and its agent in each pod.
fn statefulset(
    failover: &Failover,
    sentinel: &SentinelSettings,
    settings: &Settings,
    paused: bool,
    tls_cert: Option<&str>,
) -> StatefulSet {
    let names = Names::of(failover);
    let tls = tls::sentinel_secret(failover);
    let pod = sentinel.pod_settings(&failover.spec);
    let mut annotations = BTreeMap::new();
    if let Some(hash) = tls_cert.filter(|_| tls.is_some()) {
        annotations.insert(ANNOTATION_TLS_CERT.to_owned(), hash.to_owned());
    }
    let parts = PodParts {
        containers: vec![
            sentinel_container(&names, pod, settings, tls.is_some()),
            agent(&names, settings, tls.is_some()),
        ],
        volumes: volumes(&names, tls.as_deref()),
        annotations,
        termination_grace_period_seconds: None,
    };
    let set = SetParts {
        name: names.sentinel(),
        component: COMPONENT_SENTINEL,
        replicas: if paused { 0 } else { sentinel.count() },
        service_name: names.sentinel_headless(),
        update_strategy: None,
        template: pod::template(&names, COMPONENT_SENTINEL, pod, parts),
        claims: None,
    };
    pod::statefulset(failover, &names, set)
}

/// The valkey-sentinel container.
fn sentinel_container(
    names: &Names,
    pod: PodSettings<'_>,
    settings: &Settings,
    tls: bool,
) -> Container {
    let mut mounts = vec![
        VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "config".into(),
            mount_path: "/etc/sentinel".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    if tls {
        mounts.push(tls::tls_mount());
    }
    mounts.push(VolumeMount {
        name: "password".into(),
        mount_path: SECRET_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    let script = start_script(names, tls);
    Container {
        ports: Some(vec![pod::port("sentinel", SENTINEL_PORT)]),
        readiness_probe: Some(Probe {
            grpc: Some(k8s_openapi::api::core::v1::GRPCAction {
                port: AGENT_PORT,
                service: Some("readiness".into()),
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        volume_mounts: Some(mounts),
        ..main_container("sentinel", pod, &settings.valkey_image, script)
    }
}

/// A sentinel's agent. Beside its sentinel's password it reads the instance's: it sets it as
/// the monitor's auth-pass when the controller names it (the controller never sends it).
fn agent(names: &Names, settings: &Settings, tls: bool) -> Container {
    let announce = format!(
        "$(VALKEY_AGENT_POD_NAME).{}.{}.svc",
        names.sentinel_headless(),
        names.namespace
    );
    let side = AgentSide {
        mode: "sentinel",
        local_port: SENTINEL_PORT,
        announce_host: &announce,
        password_file: Some(&format!("{SECRET_DIR}/password")),
        tls,
    };
    let mut agent = agent_container(names, settings, side);
    agent.env.get_or_insert_with(Vec::new).push(pod::env(
        "VALKEY_AGENT_INSTANCE_PASSWORD_FILE",
        format!("{INSTANCE_SECRET_DIR}/password"),
    ));
    agent
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: "instance-password".into(),
            mount_path: INSTANCE_SECRET_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    agent
}

/// A sentinel pod's volumes.
fn volumes(names: &Names, tls: Option<&str>) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.sentinel_config(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        token_volume(),
        memory_volume("run"),
        tls::controller_ca_volume(names),
    ];
    if let Some(secret) = tls {
        volumes.push(tls::tls_volume(secret));
    }
    // The controller's copy of the sentinels' password, which a rotation changes step by step
    // (`k8s::password`), and of the instance's.
    volumes.push(password_in_force_volume(
        crate::k8s::objects::password::Whose::Sentinel.in_force(names),
    ));
    volumes.push(Volume {
        name: "instance-password".into(),
        ..password_in_force_volume(names.password_in_force())
    });
    volumes
}

/// The sentinels' Services: headless, the client Service, and when reached from outside the
/// cluster one per sentinel (named as its pod), on its NodePort from `sentinel.access.ports`,
/// whose address the sentinel announces.
fn services(failover: &Failover, sentinel: &SentinelSettings) -> Vec<Service> {
    let names = Names::of(failover);
    let port = ServicePort {
        name: Some("sentinel".into()),
        port: SENTINEL_PORT,
        target_port: Some(IntOrString::Int(SENTINEL_PORT)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    let access = sentinel
        .access
        .as_ref()
        .map(|a| a.access.clone())
        .unwrap_or_default();
    let mut services = vec![
        headless(
            failover,
            names.sentinel_headless(),
            COMPONENT_SENTINEL,
            port.clone(),
        ),
        client_service(
            failover,
            &access,
            names.sentinel(),
            COMPONENT_SENTINEL,
            selector(&names, COMPONENT_SENTINEL),
            vec![port.clone()],
        ),
    ];
    if access.service_type == crate::crd::ServiceType::ClusterIP {
        return services;
    }
    // The spec was validated: an invalid pool never gets here.
    let pool = crate::validate::sentinel_node_port_pool(&failover.spec).unwrap_or_default();
    for ordinal in 0..sentinel.count() {
        let pod = format!("{}-{ordinal}", names.sentinel());
        let mut select = selector(&names, COMPONENT_SENTINEL);
        select.insert("statefulset.kubernetes.io/pod-name".into(), pod.clone());
        services.push(client_service(
            failover,
            &access,
            pod,
            COMPONENT_SENTINEL,
            select,
            vec![ServicePort {
                node_port: pool.get(ordinal as usize).copied(),
                ..port.clone()
            }],
        ));
    }
    services
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{FailoverSpec, SentinelInstanceAccess, SentinelReference};

    fn failover(sentinel: Option<SentinelSettings>) -> Failover {
        let mut failover = Failover::new(
            "demo",
            FailoverSpec {
                replicas: 3,
                sentinel,
                ..FailoverSpec::default()
            },
        );
        failover.metadata.namespace = Some("prod".into());
        failover
    }

    #[test]
    fn an_embedded_set_gets_its_statefulset_config_services_and_pdb() {
        let settings = SentinelSettings {
            replicas: Some(5),
            access: Some(SentinelInstanceAccess {
                default_password_secret: Some("sentinel-pw".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (configs, sets, services, pdbs) =
            objects(&failover(Some(settings)), &Settings::default(), false, None);
        let conf = &configs[0].data.as_ref().expect("data")["sentinel.conf"];
        assert!(conf.contains("sentinel announce-hostnames yes\n"));
        assert!(conf.contains("sentinel resolve-hostnames yes\n"));
        let spec = sets[0].spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(5));
        let pod = spec.template.spec.as_ref().expect("pod");
        let script = &pod.containers[0].command.as_ref().expect("command")[2];
        assert!(
            script.contains("demo-sentinel-headless.prod.svc"),
            "{script}"
        );
        assert!(script.contains("sentinel sentinel-pass"), "{script}");
        assert_eq!(pod.containers[1].name, "agent");
        // The sentinels mount the controller's copy of their password, not the user's Secret
        // (a rotation changes the copy step by step).
        let mounted: Vec<_> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref()?.secret_name.as_deref())
            .collect();
        assert!(
            mounted.contains(&"demo-sentinel-password-in-force")
                && mounted.contains(&"demo-password-in-force")
                && !mounted.contains(&"sentinel-pw"),
            "{mounted:?}"
        );
        let names: Vec<_> = services
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        assert_eq!(names, ["demo-sentinel-headless", "demo-sentinel"]);
        assert_eq!(pdbs.len(), 1);
    }

    #[test]
    fn no_objects_for_manual_policy_or_an_external_set() {
        assert!(
            objects(&failover(None), &Settings::default(), false, None)
                .1
                .is_empty()
        );
        let external = SentinelSettings {
            sentinel_reference: Some(SentinelReference::default()),
            ..Default::default()
        };
        assert!(
            objects(&failover(Some(external)), &Settings::default(), false, None)
                .1
                .is_empty()
        );
    }
}
