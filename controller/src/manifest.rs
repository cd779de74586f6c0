//! Reads a Failover manifest (the same YAML as in Kubernetes) for the local runtime into the
//! CRD's own types, and validates it the way the cluster controller does (`validate`), with
//! errors that name the field. Unknown fields are errors here, where a typo would otherwise be
//! silently ignored.

use serde::Deserialize;

use crate::{
    crd::FailoverSpec,
    validate::{Admission, Invalid, Valid, is_dns_label, parse},
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
    /// The spec as validated, filled in by [`Manifest::parse`].
    #[serde(skip)]
    pub valid: Valid,
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

impl Metadata {
    /// The annotations, as Kubernetes keeps them (strings to strings).
    pub fn annotations(&self) -> Result<std::collections::BTreeMap<String, String>, ManifestError> {
        let Some(value) = &self.annotations else {
            return Ok(Default::default());
        };
        serde_yaml::from_value(value.clone()).map_err(|e| ManifestError::Invalid {
            field: "metadata.annotations".into(),
            message: format!("must map strings to strings: {e}"),
        })
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
    /// Too big or too deeply nested to be read safely.
    #[error("{path}: {why}")]
    TooLarge { path: String, why: String },
}

/// The largest manifest read: a Failover is a few KiB; Kubernetes stores at most 1.5 MiB.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// The deepest nesting read, in flow brackets or in indentation and `- ` levels; a Failover
/// with the deepest affinity rules stays under 20.
pub const MAX_NESTING: usize = 128;

/// Refuses text that would take the YAML parser long or much memory to read: over the size
/// limit, or nested past [`MAX_NESTING`] (checked before parsing, since the parser itself
/// takes time that grows faster than the depth).
fn check_shape(text: &str, origin: &str) -> Result<(), ManifestError> {
    let too_large = |why: String| ManifestError::TooLarge {
        path: origin.to_owned(),
        why,
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(too_large(format!(
            "{} bytes; the limit is {MAX_MANIFEST_BYTES}",
            text.len()
        )));
    }
    let mut flow = 0usize;
    for (number, line) in text.lines().enumerate() {
        // A quote opens a quoted scalar only where a scalar starts; elsewhere (`it's`) it is
        // text. Multi-line quoted scalars are read as if each line were one: only lenient.
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        let mut rest = line.trim_start();
        let mut dashes = 0;
        while let Some(after) = rest.strip_prefix("- ") {
            dashes += 1;
            rest = after.trim_start();
        }
        if indent / 2 + dashes > MAX_NESTING {
            return Err(too_large(format!(
                "line {}: nested more than {MAX_NESTING} levels deep",
                number + 1
            )));
        }
        for c in line.chars() {
            let after_space = prev == ' ';
            let starts_scalar = matches!(prev, ' ' | ':' | '-' | '[' | '{' | ',' | '?');
            if !c.is_whitespace() {
                prev = c;
            } else if quote.is_none() {
                prev = ' ';
            }
            match (quote, c) {
                (None, '#') if after_space => break,
                (None, '"' | '\'') if starts_scalar => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow > MAX_NESTING {
                        return Err(too_large(format!(
                            "line {}: nested more than {MAX_NESTING} levels deep",
                            number + 1
                        )));
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
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
        check_shape(text, origin)?;
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
        let valid = manifest.validate()?;
        Ok(Manifest { valid, ..manifest })
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    fn validate(&self) -> Result<Valid, ManifestError> {
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
        if let Some(namespace) = &self.metadata.namespace
            && !is_dns_label(namespace)
        {
            return Err(invalid(
                "metadata.namespace",
                format!(
                    "{namespace:?} is not a namespace name (at most 63 lowercase letters, digits \
                     and '-', starting and ending alphanumeric)"
                ),
            ));
        }
        Ok(parse(
            &self.metadata.name,
            &self.spec,
            Admission::default(),
        )?)
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
            (
                GOOD.replace(
                    "name: demo\n",
                    "name: demo\n  namespace: 'x\"; id; echo \"'\n",
                ),
                "metadata.namespace",
            ),
            (
                GOOD.replace(
                    "allkeys-lru",
                    "\"allkeys-lru\\nrequirepass x\\ndir /etc\\nreplicaof 10.0.0.1 6379\"",
                ),
                "spec.customConfigs.maxmemory-policy",
            ),
        ];
        for (text, field) in cases {
            let err = Manifest::parse(&text, "m.yaml")
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{field} not named in: {err}");
        }
    }

    #[test]
    fn manifests_too_big_or_too_deep_are_refused_before_parsing() {
        let deep_flow = format!("{GOOD}  podAnnotations: {}\n", "[".repeat(200_000));
        let deep_block: String = (0..300)
            .map(|i| format!("{}a{i}:\n", " ".repeat(i * 2)))
            .collect();
        let dashes = format!("{GOOD}  tolerations:\n{}x\n", "- ".repeat(300));
        let big = format!(
            "{GOOD}  podAnnotations:\n    a: \"{}\"\n",
            "x".repeat(2 << 20)
        );
        for (what, text) in [
            ("flow", deep_flow),
            ("block", format!("{GOOD}{deep_block}")),
            ("dashes", dashes),
            ("size", big),
        ] {
            // TooLarge comes from the pre-check only: the parser never ran on this text.
            match Manifest::parse(&text, "m.yaml") {
                Err(ManifestError::TooLarge { path, why }) => {
                    assert_eq!(path, "m.yaml", "{what}");
                    assert!(
                        why.contains("levels deep") || why.contains("limit"),
                        "{what}: {why}"
                    );
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        // Quotes and comments do not hide brackets; brackets in strings are not nesting.
        let hidden = format!("{GOOD}  podAnnotations: [x'{}\n", "[".repeat(200));
        assert!(matches!(
            Manifest::parse(&hidden, "m.yaml"),
            Err(ManifestError::TooLarge { .. })
        ));
        let quoted = format!("{GOOD}  podAnnotations:\n    a: \"{}\"\n", "[".repeat(500));
        assert!(Manifest::parse(&quoted, "m.yaml").is_ok());
    }
}
