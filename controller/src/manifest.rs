//! Reads a Failover manifest (the same YAML as in Kubernetes) for the local runtime, and
//! validates what the local runtime uses, with errors that name the field.

use std::collections::BTreeMap;

use serde::Deserialize;

pub const API_VERSION: &str = "valkey.buf.red/v1alpha1";
pub const KIND: &str = "Failover";

/// valkey.conf keys the operator owns; customConfigs may not set them.
pub const OWNED_KEYS: &[&str] = &[
    "bind",
    "port",
    "dir",
    "replicaof",
    "slaveof",
    "requirepass",
    "masterauth",
    "masteruser",
    "replica-announce-ip",
    "replica-announce-port",
    "slave-announce-ip",
    "slave-announce-port",
    "include",
    "daemonize",
    "pidfile",
    "logfile",
    "aclfile",
    "unixsocket",
];
const OWNED_PREFIXES: &[&str] = &["tls-", "cluster-"];

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// The Failover spec. Fields the local runtime does not use yet are accepted as they are, so
/// that one manifest serves both a cluster and a laptop.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub image: Option<String>,
    pub replicas: i64,
    #[serde(default)]
    pub custom_configs: BTreeMap<String, String>,
    #[serde(default)]
    pub sentinel: Option<serde_yaml::Value>,
    #[serde(default)]
    pub image_pull_policy: Option<serde_yaml::Value>,
    #[serde(default)]
    pub image_pull_secrets: Option<serde_yaml::Value>,
    #[serde(default)]
    pub resources: Option<serde_yaml::Value>,
    #[serde(default)]
    pub storage: Option<serde_yaml::Value>,
    #[serde(default)]
    pub exporter: Option<serde_yaml::Value>,
    #[serde(default)]
    pub access: Option<serde_yaml::Value>,
    #[serde(default)]
    pub pod_annotations: Option<serde_yaml::Value>,
    #[serde(default)]
    pub affinity: Option<serde_yaml::Value>,
    #[serde(default)]
    pub tolerations: Option<serde_yaml::Value>,
    #[serde(default)]
    pub node_selector: Option<serde_yaml::Value>,
    #[serde(default)]
    pub security_context: Option<serde_yaml::Value>,
    #[serde(default)]
    pub modules: Option<serde_yaml::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: not a Failover manifest: {source}")]
    Parse {
        path: String,
        source: serde_path_to_error::Error<serde_yaml::Error>,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

impl Manifest {
    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ManifestError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let manifest: Manifest =
            serde_path_to_error::deserialize(deserializer).map_err(|source| {
                ManifestError::Parse {
                    path: origin.to_owned(),
                    source,
                }
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion",
                format!("must be {API_VERSION}, not {:?}", self.api_version),
            ));
        }
        if self.kind != KIND {
            return Err(invalid(
                "kind",
                format!("must be {KIND}, not {:?}", self.kind),
            ));
        }
        let name = &self.metadata.name;
        let dns = !name.is_empty()
            && name.len() <= 52
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !dns {
            return Err(invalid(
                "metadata.name",
                format!(
                    "{name:?} must be 1-52 lowercase letters, digits or '-', starting and ending alphanumeric"
                ),
            ));
        }
        if !(1..=9).contains(&self.spec.replicas) {
            return Err(invalid(
                "spec.replicas",
                format!("must be 1..=9, got {}", self.spec.replicas),
            ));
        }
        for key in self.spec.custom_configs.keys() {
            let lower = key.to_ascii_lowercase();
            if OWNED_KEYS.contains(&lower.as_str())
                || OWNED_PREFIXES.iter().any(|p| lower.starts_with(p))
            {
                return Err(invalid(
                    &format!("spec.customConfigs.{key}"),
                    "is set by the operator and cannot be overridden",
                ));
            }
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(invalid(
                    &format!("spec.customConfigs.{key:?}"),
                    "is not a valkey.conf key",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\nspec:\n  replicas: 3\n  customConfigs:\n    maxmemory-policy: allkeys-lru\n";

    #[test]
    fn the_examples_parse() {
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
            let manifest = Manifest::parse(text, file).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(manifest.spec.replicas, 3, "{file}");
        }
        let manifest = Manifest::parse(GOOD, "good").expect("good");
        assert_eq!(
            (manifest.namespace(), manifest.metadata.name.as_str()),
            ("default", "demo")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("replicas: 3", "replicas: 0"), "spec.replicas"),
            (GOOD.replace("replicas: 3", "replicas: 10"), "spec.replicas"),
            (
                GOOD.replace("replicas: 3", "replicas: three"),
                "spec.replicas",
            ),
            (
                GOOD.replace("maxmemory-policy", "port"),
                "spec.customConfigs.port",
            ),
            (
                GOOD.replace("maxmemory-policy", "tls-port"),
                "spec.customConfigs.tls-port",
            ),
            (GOOD.replace("name: demo", "name: Demo_1"), "metadata.name"),
            (GOOD.replace("kind: Failover", "kind: Pod"), "kind"),
            (
                GOOD.replace("  replicas: 3\n", "  replicas: 3\n  replicaz: 1\n"),
                "replicaz",
            ),
            (GOOD.replace("  replicas: 3\n", ""), "replicas"),
        ];
        for (text, field) in cases {
            let err = Manifest::parse(&text, "m.yaml")
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{field} not named in: {err}");
        }
    }
}
