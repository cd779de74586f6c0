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
    pub sentinel: Option<SentinelSettings>,
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

/// `spec.sentinel`: Sentinel decides failover (policy sentinel).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SentinelSettings {
    #[serde(default)]
    pub replicas: Option<i64>,
    #[serde(default)]
    pub quorum: Option<i64>,
    #[serde(default)]
    pub monitor_config: BTreeMap<String, String>,
    #[serde(default)]
    pub sentinel_reference: Option<SentinelReference>,
    #[serde(default)]
    pub custom_configs: BTreeMap<String, String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub image_pull_policy: Option<serde_yaml::Value>,
    #[serde(default)]
    pub image_pull_secrets: Option<serde_yaml::Value>,
    #[serde(default)]
    pub resources: Option<serde_yaml::Value>,
    #[serde(default)]
    pub exporter: Option<serde_yaml::Value>,
    #[serde(default)]
    pub access: Option<serde_yaml::Value>,
    #[serde(default)]
    pub affinity: Option<serde_yaml::Value>,
    #[serde(default)]
    pub security_context: Option<serde_yaml::Value>,
    #[serde(default)]
    pub tolerations: Option<serde_yaml::Value>,
    #[serde(default)]
    pub node_selector: Option<serde_yaml::Value>,
    #[serde(default)]
    pub pod_annotations: Option<serde_yaml::Value>,
}

/// An existing, external set of sentinels.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SentinelReference {
    pub nodes: Vec<SentinelMonitorNode>,
    #[serde(default)]
    pub auth: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SentinelMonitorNode {
    pub ip: String,
    pub port: u16,
    #[serde(default)]
    pub flags: Option<String>,
}

/// monitorConfig keys and their defaults.
pub const MONITOR_DEFAULTS: [(&str, &str); 3] = [
    ("down-after-milliseconds", "30000"),
    ("failover-timeout", "180000"),
    ("parallel-syncs", "1"),
];

/// sentinel.conf keys the operator owns.
const SENTINEL_OWNED_KEYS: &[&str] = &[
    "port",
    "bind",
    "dir",
    "sentinel",
    "include",
    "daemonize",
    "pidfile",
    "logfile",
    "requirepass",
    "protected-mode",
];

impl SentinelSettings {
    /// The Secret holding the sentinels' own password, and the field that names it:
    /// `access.defaultPasswordSecret` (embedded) or `sentinelReference.auth.passwordSecret`.
    pub fn password_secret(&self) -> Option<(&'static str, String)> {
        let named = |value: Option<&serde_yaml::Value>, key: &str| {
            value?.get(key)?.as_str().map(str::to_owned)
        };
        match &self.sentinel_reference {
            Some(reference) => named(reference.auth.as_ref(), "passwordSecret")
                .map(|s| ("spec.sentinel.sentinelReference.auth.passwordSecret", s)),
            None => named(self.access.as_ref(), "defaultPasswordSecret")
                .map(|s| ("spec.sentinel.access.defaultPasswordSecret", s)),
        }
    }

    /// The number of sentinels in use (embedded, or referenced).
    pub fn count(&self) -> i64 {
        match &self.sentinel_reference {
            Some(reference) => reference.nodes.len() as i64,
            None => self.replicas.unwrap_or(3),
        }
    }

    /// The quorum: as set, or a majority of the configured sentinels.
    pub fn quorum(&self) -> u32 {
        self.quorum.unwrap_or(self.count() / 2 + 1) as u32
    }

    /// monitorConfig with the defaults filled in.
    pub fn monitor_config(&self) -> BTreeMap<String, String> {
        let mut config: BTreeMap<String, String> = MONITOR_DEFAULTS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        config.extend(self.monitor_config.clone());
        config
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if let Some(reference) = &self.sentinel_reference {
            if reference.nodes.len() < 3 {
                return Err(invalid(
                    "spec.sentinel.sentinelReference.nodes",
                    format!("needs at least 3 sentinels, got {}", reference.nodes.len()),
                ));
            }
        } else {
            let replicas = self.count();
            if replicas < 3 || replicas % 2 == 0 {
                return Err(invalid(
                    "spec.sentinel.replicas",
                    format!("must be odd and at least 3, got {replicas}"),
                ));
            }
        }
        if let Some(quorum) = self.quorum
            && !(1..=self.count()).contains(&quorum)
        {
            return Err(invalid(
                "spec.sentinel.quorum",
                format!("must be 1..={}, got {quorum}", self.count()),
            ));
        }
        for (key, value) in &self.monitor_config {
            if !MONITOR_DEFAULTS.iter().any(|(k, _)| k == key) {
                return Err(invalid(
                    &format!("spec.sentinel.monitorConfig.{key}"),
                    "is not a known setting (down-after-milliseconds, failover-timeout, parallel-syncs)",
                ));
            }
            if value.parse::<u64>().map_or(true, |n| n == 0) {
                return Err(invalid(
                    &format!("spec.sentinel.monitorConfig.{key}"),
                    format!("must be a positive whole number, got {value:?}"),
                ));
            }
        }
        for key in self.custom_configs.keys() {
            if SENTINEL_OWNED_KEYS.contains(&key.to_ascii_lowercase().as_str()) {
                return Err(invalid(
                    &format!("spec.sentinel.customConfigs.{key}"),
                    "is set by the operator and cannot be overridden",
                ));
            }
        }
        Ok(())
    }
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
        if let Some(sentinel) = &self.spec.sentinel {
            sentinel.validate()?;
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
        let seed = Manifest::parse(
            include_str!("../../deploy/examples/failover.yaml"),
            "failover.yaml",
        )
        .expect("seed");
        let sentinel = seed.spec.sentinel.expect("the seed uses Sentinel");
        assert_eq!((sentinel.count(), sentinel.quorum()), (3, 2));
        assert_eq!(
            sentinel.monitor_config()["down-after-milliseconds"],
            "30000"
        );
        let defaults = SentinelSettings::default();
        assert_eq!((defaults.count(), defaults.quorum()), (3, 2));
        assert_eq!(defaults.monitor_config()["parallel-syncs"], "1");
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
            (
                format!("{GOOD}  sentinel:\n    replicas: 4\n"),
                "spec.sentinel.replicas",
            ),
            (
                format!("{GOOD}  sentinel:\n    replicas: 1\n"),
                "spec.sentinel.replicas",
            ),
            (
                format!("{GOOD}  sentinel:\n    quorum: 4\n"),
                "spec.sentinel.quorum",
            ),
            (
                format!("{GOOD}  sentinel:\n    quorum: 0\n"),
                "spec.sentinel.quorum",
            ),
            (
                format!("{GOOD}  sentinel:\n    monitorConfig:\n      down-after: \"1\"\n"),
                "spec.sentinel.monitorConfig.down-after",
            ),
            (
                format!("{GOOD}  sentinel:\n    monitorConfig:\n      parallel-syncs: \"x\"\n"),
                "spec.sentinel.monitorConfig.parallel-syncs",
            ),
            (
                format!(
                    "{GOOD}  sentinel:\n    sentinelReference:\n      nodes:\n        - ip: a\n          port: 1\n"
                ),
                "spec.sentinel.sentinelReference.nodes",
            ),
            (
                format!("{GOOD}  sentinel:\n    customConfigs:\n      port: \"1\"\n"),
                "spec.sentinel.customConfigs.port",
            ),
        ];
        for (text, field) in cases {
            let err = Manifest::parse(&text, "m.yaml")
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{field} not named in: {err}");
        }
    }
}
