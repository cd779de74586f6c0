//! TLS objects of an instance, built purely: the controller's CA bundle that agents verify
//! the hub with (a ConfigMap), and, with `enableTLS`, what Valkey and Sentinel serve: a
//! cert-manager `Certificate` when `certIssuer` names an Issuer, else a Secret issued from the
//! controller's CA (see [`crate::k8s::cold::tls_secret`]). Both Secrets have the layout of a TLS Secret
//! (`tls.crt`, `tls.key`, `ca.crt`), mounted at [`TLS_DIR`].

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, EnvVar, KeyToPath, Secret, SecretVolumeSource, Volume,
    VolumeMount,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{Failover, IssuerType};
use crate::k8s::{Names, owned_meta};

/// Where the agent finds the CA bundle of the controller's hub.
pub const CONTROLLER_CA_DIR: &str = "/etc/valkey-agent/controller-ca";
/// Where Valkey, Sentinel, the agent and the exporter find the instance's TLS files.
pub const TLS_DIR: &str = "/tls";

/// cert-manager's Certificate (cert-manager.io/v1), the fields this operator sets.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cert-manager.io",
    version = "v1",
    kind = "Certificate",
    namespaced,
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    pub secret_name: String,
    pub issuer_ref: IssuerRef,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usages: Vec<String>,
    /// cert-manager renews at two thirds of the lifetime by default, as we do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<PrivateKey>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IssuerRef {
    pub name: String,
    pub kind: String,
    pub group: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrivateKey {
    pub rotation_policy: String,
}

/// Whether the instance serves TLS.
pub fn enabled(failover: &Failover) -> bool {
    failover.spec.access.enable_tls
}

/// The Secret the data nodes serve from (the instance's: issued, or cert-manager's).
pub fn data_secret(failover: &Failover) -> Option<String> {
    enabled(failover).then(|| Names::of(failover).tls())
}

/// The Secret the sentinels are reached with (`status.monitor.tlsSecret`). Embedded ones
/// serve from `externalTLSSecret` when given, else from the instance's, whose names cover the
/// sentinels too. An external set is verified with `sentinelReference.auth.tlsSecret`.
pub fn sentinel_secret(failover: &Failover) -> Option<String> {
    let sentinel = failover.spec.sentinel.as_ref()?;
    if let Some(reference) = &sentinel.sentinel_reference {
        return reference.auth.as_ref()?.tls_secret.clone();
    }
    let external = sentinel
        .access
        .as_ref()
        .and_then(|a| a.external_tls_secret.clone());
    data_secret(failover).map(|own| external.unwrap_or(own))
}

/// Every name clients and peers reach the instance's nodes and sentinels by, and the agent's
/// own (loopback).
pub fn dns_names(failover: &Failover) -> Vec<String> {
    let names = Names::of(failover);
    let ns = &names.namespace;
    let mut out = Vec::new();
    for service in [
        names.data(),
        names.read_only(),
        names.headless(),
        names.sentinel(),
        names.sentinel_headless(),
    ] {
        out.push(format!("{service}.{ns}.svc"));
        out.push(format!("{service}.{ns}.svc.cluster.local"));
    }
    for headless in [names.headless(), names.sentinel_headless()] {
        out.push(format!("*.{headless}.{ns}.svc"));
        out.push(format!("*.{headless}.{ns}.svc.cluster.local"));
    }
    out.push("localhost".into());
    out
}

/// The loopback address the agent and the exporter connect to.
pub const IP_ADDRESSES: [&str; 1] = ["127.0.0.1"];

/// The cert-manager Certificate, when `certIssuer` names an issuer.
pub fn certificate(failover: &Failover) -> Option<Certificate> {
    let access = &failover.spec.access;
    let issuer = access.cert_issuer.clone().filter(|_| access.enable_tls)?;
    let names = Names::of(failover);
    let kind = match access.cert_issuer_type.unwrap_or_default() {
        IssuerType::ClusterIssuer => "ClusterIssuer",
        IssuerType::Issuer => "Issuer",
    };
    Some(Certificate {
        metadata: owned_meta(
            failover,
            names.tls(),
            crate::k8s::objects::data::COMPONENT_DATA,
        ),
        spec: CertificateSpec {
            secret_name: names.tls(),
            issuer_ref: IssuerRef {
                name: issuer,
                kind: kind.into(),
                group: "cert-manager.io".into(),
            },
            dns_names: dns_names(failover),
            ip_addresses: IP_ADDRESSES.iter().map(|s| (*s).to_owned()).collect(),
            usages: vec!["server auth".into(), "client auth".into()],
            duration: Some("2160h".into()),
            private_key: Some(PrivateKey {
                rotation_policy: "Always".into(),
            }),
        },
    })
}

/// The Secret issued from the controller's CA (no `certIssuer`).
pub fn issued_secret(failover: &Failover, issued: &crate::tls::Issued, ca_pem: &str) -> Secret {
    let names = Names::of(failover);
    Secret {
        metadata: owned_meta(
            failover,
            names.tls(),
            crate::k8s::objects::data::COMPONENT_DATA,
        ),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt", &issued.cert_pem),
                ("tls.key", &issued.key_pem),
                ("ca.crt", &ca_pem.to_owned()),
            ]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), ByteString(value.as_bytes().to_vec())))
            .collect(),
        ),
        ..Secret::default()
    }
}

/// The controller's CA bundle, for the agents of this instance.
pub fn controller_ca_config_map(failover: &Failover, ca_pem: &str) -> ConfigMap {
    let names = Names::of(failover);
    ConfigMap {
        metadata: owned_meta(
            failover,
            names.controller_ca(),
            crate::k8s::objects::data::COMPONENT_DATA,
        ),
        data: Some([("ca.crt".to_owned(), ca_pem.to_owned())].into()),
        ..ConfigMap::default()
    }
}

pub fn controller_ca_volume(names: &Names) -> Volume {
    Volume {
        name: "controller-ca".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names.controller_ca(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The TLS Secret, readable by the pod's group (Valkey runs in it), nobody else.
pub fn tls_volume(secret: &str) -> Volume {
    Volume {
        name: "tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: Some(
                ["tls.crt", "tls.key", "ca.crt"]
                    .into_iter()
                    .map(|key| KeyToPath {
                        key: key.into(),
                        path: key.into(),
                        mode: None,
                    })
                    .collect(),
            ),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub fn tls_mount() -> VolumeMount {
    VolumeMount {
        name: "tls".into(),
        mount_path: TLS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The agent's settings for a TLS-only local process: verify it, and watch what it serves.
pub fn agent_tls_env() -> Vec<EnvVar> {
    let files = crate::tls::TlsFiles::in_dir(TLS_DIR);
    [
        ("VALKEY_AGENT_VALKEY_TLS_CA_FILE", files.ca),
        ("VALKEY_AGENT_VALKEY_TLS_CERT_FILE", files.cert),
        ("VALKEY_AGENT_VALKEY_TLS_KEY_FILE", files.key),
    ]
    .into_iter()
    .map(|(name, value)| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    })
    .collect()
}

/// valkey-cli's TLS flags, for the scripts that run it in a pod.
pub fn cli_flags(tls: bool) -> String {
    if tls {
        format!("--tls --cacert {TLS_DIR}/ca.crt ")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{FailoverSpec, SentinelSettings},
        k8s::{
            Settings,
            objects::{data, sentinel},
        },
        tls::{CA_LIFETIME, Ca},
    };

    fn tls_failover(issuer: Option<(&str, IssuerType)>) -> Failover {
        let mut spec = FailoverSpec {
            replicas: 3,
            sentinel: Some(SentinelSettings::default()),
            ..FailoverSpec::default()
        };
        spec.access.enable_tls = true;
        if let Some((name, kind)) = issuer {
            spec.access.cert_issuer = Some(name.into());
            spec.access.cert_issuer_type = Some(kind);
        }
        let mut failover = Failover::new("demo", spec);
        failover.metadata.namespace = Some("prod".into());
        failover
    }

    #[test]
    fn a_certificate_is_asked_of_the_named_issuer_of_either_kind() {
        for (kind, expected) in [
            (IssuerType::ClusterIssuer, "ClusterIssuer"),
            (IssuerType::Issuer, "Issuer"),
        ] {
            let cert = certificate(&tls_failover(Some(("corp-ca", kind)))).unwrap();
            let json = serde_json::to_value(&cert).unwrap();
            assert_eq!(json["apiVersion"], "cert-manager.io/v1");
            assert_eq!(json["kind"], "Certificate");
            assert_eq!(json["metadata"]["name"], "demo-tls");
            assert_eq!(json["spec"]["secretName"], "demo-tls");
            assert_eq!(
                json["spec"]["issuerRef"],
                serde_json::json!({"name": "corp-ca", "kind": expected, "group": "cert-manager.io"})
            );
            let dns: Vec<&str> = json["spec"]["dnsNames"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            for name in [
                "demo.prod.svc",
                "demo-read.prod.svc",
                "*.demo-headless.prod.svc",
                "*.demo-headless.prod.svc.cluster.local",
                "demo-sentinel.prod.svc",
                "*.demo-sentinel-headless.prod.svc",
                "localhost",
            ] {
                assert!(dns.contains(&name), "{name} missing from {dns:?}");
            }
            assert_eq!(
                json["spec"]["ipAddresses"],
                serde_json::json!(["127.0.0.1"])
            );
            assert_eq!(
                json["spec"]["usages"],
                serde_json::json!(["server auth", "client auth"])
            );
        }
        // No issuer named, or no TLS: no Certificate.
        assert!(certificate(&tls_failover(None)).is_none());
        let mut plain = tls_failover(Some(("corp-ca", IssuerType::Issuer)));
        plain.spec.access.enable_tls = false;
        assert!(certificate(&plain).is_none());
    }

    #[test]
    fn the_self_issued_secret_covers_every_name_and_carries_the_ca() {
        let failover = tls_failover(None);
        let ca = Ca::generate("controller CA", CA_LIFETIME).unwrap();
        let mut names = dns_names(&failover);
        names.extend(IP_ADDRESSES.iter().map(|s| (*s).to_owned()));
        let issued = ca.issue(&names, CA_LIFETIME).unwrap();
        let secret = issued_secret(&failover, &issued, &ca.0.cert_pem);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = secret.data.unwrap();
        assert_eq!(data["ca.crt"].0, ca.0.cert_pem.as_bytes());
        let sans = crate::tls::subject_alt_names(std::str::from_utf8(&data["tls.crt"].0).unwrap());
        assert!(
            sans.contains(&"DNSName(*.demo-headless.prod.svc)".to_owned()),
            "{sans:?}"
        );
        assert!(
            sans.contains(&"DNSName(demo.prod.svc)".to_owned()),
            "{sans:?}"
        );
        assert!(
            sans.contains(&"IPAddress(7f:00:00:01)".to_owned()),
            "{sans:?}"
        );
    }

    #[test]
    fn tls_pods_serve_tls_only_and_every_container_gets_the_files() {
        let failover = tls_failover(None);
        let conf = data::valkey_conf(&failover.spec);
        assert!(conf.contains("port 0\ntls-port 6379\n"), "{conf}");
        assert!(conf.contains("tls-cert-file \"/tls/tls.crt\"\n"), "{conf}");
        assert!(conf.contains("tls-replication yes\n"), "{conf}");
        let mut with_exporter = failover.clone();
        with_exporter.spec.exporter = Some(Default::default());
        let set = data::statefulset(&with_exporter, &Settings::default(), false);
        let pod = set.spec.unwrap().template.spec.unwrap();
        let tls_volume = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            tls_volume.secret.unwrap().secret_name.as_deref(),
            Some("demo-tls")
        );
        for container in &pod.containers {
            let mounts = container.volume_mounts.clone().unwrap_or_default();
            assert!(
                mounts
                    .iter()
                    .any(|m| m.name == "tls" && m.mount_path == TLS_DIR),
                "{} lacks the TLS files",
                container.name
            );
        }
        let env = |name: &str| {
            pod.containers
                .iter()
                .flat_map(|c| c.env.clone().unwrap_or_default())
                .find(|e| e.name == name)
                .and_then(|e| e.value)
        };
        assert_eq!(
            env("REDIS_ADDR").as_deref(),
            Some("rediss://127.0.0.1:6379")
        );
        assert_eq!(
            env("VALKEY_AGENT_VALKEY_TLS_CA_FILE").as_deref(),
            Some("/tls/ca.crt")
        );
        assert_eq!(
            env("VALKEY_AGENT_CONTROLLER_CA_FILE").as_deref(),
            Some("/etc/valkey-agent/controller-ca/ca.crt")
        );
        let pre_stop = serde_json::to_string(&pod.containers[0].lifecycle).unwrap();
        assert!(
            pre_stop.contains("valkey-cli --tls --cacert /tls/ca.crt "),
            "{pre_stop}"
        );
        // Sentinels: TLS lines written at every start, the same files mounted.
        let (_, sets, _, _) = sentinel::objects(&failover, &Settings::default(), false, None);
        let sentinel_pod = sets[0].clone().spec.unwrap().template.spec.unwrap();
        let script = sentinel_pod.containers[0]
            .command
            .clone()
            .unwrap()
            .join(" ");
        assert!(script.contains("tls-port 26379"), "{script}");
        assert!(script.contains("-e '^tls-'"), "{script}");
        // Turning TLS on rolls the pods (the port changes).
        let mut plain = failover.clone();
        plain.spec.access.enable_tls = false;
        assert_ne!(
            data::restart_hash(&plain.spec),
            data::restart_hash(&failover.spec)
        );
    }

    #[test]
    fn external_sentinel_tls_secret_is_used_for_the_sentinels() {
        let mut failover = tls_failover(None);
        failover.spec.sentinel = Some(SentinelSettings {
            access: Some(crate::crd::SentinelInstanceAccess {
                external_tls_secret: Some("sentinel-certs".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            sentinel_secret(&failover).as_deref(),
            Some("sentinel-certs")
        );
        assert_eq!(data_secret(&failover).as_deref(), Some("demo-tls"));
    }

    #[test]
    fn an_external_sets_tls_secret_is_the_monitors() {
        let mut failover = tls_failover(None);
        let reference = |tls_secret: Option<&str>| crate::crd::SentinelReference {
            nodes: Vec::new(),
            auth: Some(crate::crd::Authorization {
                tls_secret: tls_secret.map(str::to_owned),
                ..Default::default()
            }),
        };
        failover.spec.sentinel = Some(SentinelSettings {
            sentinel_reference: Some(reference(Some("their-ca"))),
            ..Default::default()
        });
        assert_eq!(sentinel_secret(&failover).as_deref(), Some("their-ca"));
        // Not the instance's own: the external set does not serve it.
        failover.spec.sentinel = Some(SentinelSettings {
            sentinel_reference: Some(reference(None)),
            ..Default::default()
        });
        assert_eq!(sentinel_secret(&failover), None);
        // No sentinels at all: no monitor Secret.
        failover.spec.sentinel = None;
        assert_eq!(sentinel_secret(&failover), None);
    }
}
