//! Reads a Failover manifest (the same YAML as in Kubernetes) for the local runtime into the
//! CRD's own types, and validates it the way the cluster controller does (`validate`), with
//! errors that name the field. Unknown fields are errors here, where a typo would otherwise be
//! silently ignored.

use serde::Deserialize;

use crate::{
    crd::FailoverSpec,
    validate::{Invalid, validate},
};

pub const API_VERSION: &str = "valkey.buf.red/v1alpha1";
pub const KIND: &str = "Failover";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: FailoverSpec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<serde_yaml::Value>,
    #[serde(default)]
    pub annotations: Option<serde_yaml::Value>,
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

impl From<Invalid> for ManifestError {
    fn from(err: Invalid) -> Self {
        ManifestError::Invalid {
            field: err.field,
            message: err.message,
        }
    }
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
        let mut unknown = Vec::new();
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let ignoring = serde_ignored::Deserializer::new(deserializer, &mut record);
        let manifest: Manifest =
            serde_path_to_error::deserialize(ignoring).map_err(|source| ManifestError::Parse {
                path: origin.to_owned(),
                source,
            })?;
        if let Some(field) = unknown.first() {
            return Err(invalid(field, "is not a field of Failover"));
        }
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
        Ok(validate(&self.metadata.name, &self.spec)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SentinelSettings;

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
        assert_eq!((sentinel.count(), sentinel.quorum_or_default()), (3, 2));
        assert_eq!(
            sentinel.monitor_config_or_default()["down-after-milliseconds"],
            "30000"
        );
        let defaults = SentinelSettings::default();
        assert_eq!((defaults.count(), defaults.quorum_or_default()), (3, 2));
        assert_eq!(defaults.monitor_config_or_default()["parallel-syncs"], "1");
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
            (
                GOOD.replace("replicas: 3", "replicas: three"),
                "spec.replicas",
            ),
            (
                GOOD.replace("maxmemory-policy", "port"),
                "spec.customConfigs.port",
            ),
            (GOOD.replace("name: demo", "name: Demo_1"), "metadata.name"),
            (GOOD.replace("kind: Failover", "kind: Pod"), "kind"),
            (
                GOOD.replace("  replicas: 3\n", "  replicas: 3\n  replicaz: 1\n"),
                "spec.replicaz",
            ),
            (GOOD.replace("  replicas: 3\n", ""), "replicas"),
            (
                format!("{GOOD}  sentinel:\n    replicas: 4\n"),
                "spec.sentinel.replicas",
            ),
            (
                format!("{GOOD}  sentinel:\n    quorum: 4\n"),
                "spec.sentinel.quorum",
            ),
            (
                format!("{GOOD}  sentinel:\n    monitorConfig:\n      down-after: \"1\"\n"),
                "spec.sentinel.monitorConfig.down-after",
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
            (
                format!("{GOOD}  resources:\n    limits:\n      memory: 1Gb\n"),
                "spec.resources.limits.memory",
            ),
            (
                format!("{GOOD}  access:\n    serviceType: NodePort\n    ports: \"30001\"\n"),
                "spec.access.ports",
            ),
            (
                format!("{GOOD}  access:\n    serviceTyp: NodePort\n"),
                "spec.access.serviceTyp",
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
