//! Checks a Failover spec beyond what the CRD schema can express, the same way for a cluster
//! and for the local runtime, with errors that name the field. Pure: nothing here reads the
//! API; what needs it (a Secret that must exist, a NodePort already taken) is checked where
//! the objects are applied.

mod conf_keys;
mod privilege;
mod text;
mod valid;

use std::collections::BTreeMap;

use crate::crd::{FailoverSpec, InstanceAccess, SentinelSettings, ServiceType};
pub use privilege::Admission;
pub use text::{MAX_VALUE_LEN, REFUSED_KEYS, is_dns_label};
pub use valid::{Policy, SentinelSet, Valid, Watch, parse};

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

/// sentinel.conf keys the operator owns, or that touch the pod's filesystem (Sentinel unlinks
/// a `unixsocket` path before it binds it).
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
    "unixsocket",
    "unixsocketperm",
    "aclfile",
    "masterauth",
    "masteruser",
    "replicaof",
];
const SENTINEL_OWNED_PREFIXES: &[&str] = &["tls-", "cluster-"];

/// monitorConfig keys and their defaults.
pub const MONITOR_DEFAULTS: [(&str, &str); 3] = [
    ("down-after-milliseconds", "30000"),
    ("failover-timeout", "180000"),
    ("parallel-syncs", "1"),
];

/// valkey.conf keys that cannot change on a running server: a change rolls the pods.
pub const RESTART_KEYS: &[&str] = &[
    "databases",
    "io-threads",
    "loadmodule",
    "rename-command",
    "tcp-backlog",
    "unixsocketperm",
    "supervised",
    "always-show-logo",
];

/// A spec the controller will not act on: `field` is its path, e.g. `spec.replicas`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks the instance's name (it becomes part of pod and Service names) and its spec, with
/// privileged pod settings refused.
pub fn validate(name: &str, spec: &FailoverSpec) -> Result<(), Invalid> {
    validate_admitted(name, spec, Admission::default())
}

/// [`validate`], admitting what `admission` allows beyond the defaults.
pub fn validate_admitted(
    name: &str,
    spec: &FailoverSpec,
    admission: Admission,
) -> Result<(), Invalid> {
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
    if !(1..=9).contains(&spec.replicas) {
        return Err(invalid(
            "spec.replicas",
            format!("must be 1..=9, got {}", spec.replicas),
        ));
    }
    text::check_config_map(
        "spec.customConfigs",
        &spec.custom_configs,
        OWNED_KEYS,
        OWNED_PREFIXES,
    )?;
    check_resources("spec.resources", spec.resources.as_ref())?;
    if let Some(storage) = &spec.storage
        && let Some(capacity) = &storage.capacity
        && parse_quantity(&capacity.0).is_none()
    {
        return Err(invalid(
            "spec.storage.capacity",
            format!(
                "{:?} is not a quantity below 2^63 (e.g. 1Gi, 500Mi)",
                capacity.0
            ),
        ));
    }
    if let Some(exporter) = &spec.exporter {
        check_resources("spec.exporter.resources", exporter.resources.as_ref())?;
    }
    node_port_pool(spec)?;
    sentinel_node_port_pool(spec)?;
    check_references(spec)?;
    for (i, module) in spec.modules.iter().enumerate() {
        text::check_module_path(&format!("spec.modules[{i}].path"), &module.path)?;
        for (j, arg) in module.args.iter().enumerate() {
            text::check_value(&format!("spec.modules[{i}].args[{j}]"), arg)?;
        }
    }
    check_metadata("spec", &spec.pod_annotations, &spec.node_selector)?;
    text::check_annotations("spec.access.annotations", &spec.access.annotations)?;
    if let Some(storage) = &spec.storage {
        text::check_annotations("spec.storage.annotations", &storage.annotations)?;
    }
    check_images(spec)?;
    if let Some(sentinel) = &spec.sentinel {
        validate_sentinel(sentinel)?;
        // Sentinel opens its links to the data nodes and to its peers with one setting
        // (tls-replication): its TLS follows the data nodes'.
        let sentinel_tls = sentinel
            .access
            .as_ref()
            .is_some_and(|a| a.access.enable_tls);
        if sentinel_tls && !spec.access.enable_tls && sentinel.sentinel_reference.is_none() {
            return Err(invalid(
                "spec.sentinel.access.enableTLS",
                "needs spec.access.enableTLS: embedded sentinels reach the data nodes and each \
                 other with one TLS setting (with spec.access.enableTLS they use TLS anyway)",
            ));
        }
    }
    privilege::check(spec, admission)
}

fn check_resources(
    field: &str,
    resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
) -> Result<(), Invalid> {
    let Some(resources) = resources else {
        return Ok(());
    };
    for (kind, map) in [
        ("limits", resources.limits.as_ref()),
        ("requests", resources.requests.as_ref()),
    ] {
        for (name, quantity) in map.into_iter().flatten() {
            if parse_quantity(&quantity.0).is_none() {
                return Err(invalid(
                    format!("{field}.{kind}.{name}"),
                    format!(
                        "{:?} is not a quantity below 2^63 (e.g. 512Mi, 1Gi, 250m)",
                        quantity.0
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The NodePort pool (`spec.access.ports`): one port per pod, no repeats, only with
/// serviceType NodePort. Empty when no pool is given.
pub fn node_port_pool(spec: &FailoverSpec) -> Result<Vec<i32>, Invalid> {
    pool("spec.access.ports", &spec.access, spec.replicas)
}

/// An embedded Sentinel set's NodePort pool (`spec.sentinel.access.ports`): one port per
/// sentinel, none that the data pods' pool holds too.
pub fn sentinel_node_port_pool(spec: &FailoverSpec) -> Result<Vec<i32>, Invalid> {
    const FIELD: &str = "spec.sentinel.access.ports";
    let Some((sentinel, access)) = spec
        .sentinel
        .as_ref()
        .filter(|s| s.sentinel_reference.is_none())
        .and_then(|s| Some((s, s.access.as_ref()?)))
    else {
        return Ok(Vec::new());
    };
    let ports = pool(FIELD, &access.access, sentinel.count())?;
    let data = node_port_pool(spec)?;
    if let Some(port) = ports.iter().find(|p| data.contains(p)) {
        return Err(invalid(
            FIELD,
            format!("port {port} is in spec.access.ports too"),
        ));
    }
    Ok(ports)
}

/// A NodePort pool at `field` of `access`: one port for each of `count` pods.
fn pool(field: &'static str, access: &InstanceAccess, count: i32) -> Result<Vec<i32>, Invalid> {
    let Some(text) = access.ports.as_deref() else {
        return Ok(Vec::new());
    };
    if access.service_type != ServiceType::NodePort {
        return Err(invalid(field, "a NodePort pool needs serviceType NodePort"));
    }
    let mut ports = Vec::new();
    for part in text.split(',') {
        let bad = || {
            invalid(
                field,
                format!("{part:?} is not a port or a range like 30001-30003"),
            )
        };
        let (from, to) = match part.trim().split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part.trim(), part.trim()),
        };
        let from: i32 = from.parse().map_err(|_| bad())?;
        let to: i32 = to.parse().map_err(|_| bad())?;
        if !(1..=65535).contains(&from) || !(1..=65535).contains(&to) || from > to {
            return Err(bad());
        }
        ports.extend(from..=to);
    }
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(field, format!("port {} is listed twice", w[0])));
    }
    if ports.len() != count as usize {
        return Err(invalid(
            field,
            format!(
                "must hold one port per pod: {} port(s) for {} pod(s)",
                ports.len(),
                count
            ),
        ));
    }
    Ok(ports)
}

/// A DNS subdomain: dot-separated labels of lowercase letters, digits and '-', at most 253
/// characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A pod's annotations and node selector (`prefix`: `spec` or `spec.sentinel`).
fn check_metadata(
    prefix: &str,
    annotations: &BTreeMap<String, String>,
    node_selector: &BTreeMap<String, String>,
) -> Result<(), Invalid> {
    text::check_annotations(&format!("{prefix}.podAnnotations"), annotations)?;
    text::check_labels(&format!("{prefix}.nodeSelector"), node_selector)
}

/// Images: one token of printable characters (the Valkey version is read from the tag).
fn check_images(spec: &FailoverSpec) -> Result<(), Invalid> {
    let sentinel = spec.sentinel.as_ref();
    let images = [
        ("spec.image", spec.image.as_ref()),
        (
            "spec.exporter.image",
            spec.exporter.as_ref().and_then(|e| e.image.as_ref()),
        ),
        (
            "spec.sentinel.image",
            sentinel.and_then(|s| s.image.as_ref()),
        ),
        (
            "spec.sentinel.exporter.image",
            sentinel
                .and_then(|s| s.exporter.as_ref())
                .and_then(|e| e.image.as_ref()),
        ),
    ];
    for (field, image) in images {
        if let Some(image) = image {
            text::check_value(field, image)?;
            if image.is_empty() || image.contains(char::is_whitespace) {
                return Err(invalid(
                    field,
                    format!("{image:?} is not an image reference"),
                ));
            }
        }
    }
    Ok(())
}

/// A name of another object (a Secret, an Issuer): a DNS subdomain, as Kubernetes requires.
/// The local runtime makes it a directory name under `<dir>/secrets/`, so nothing else may
/// pass (no `/`, no `..`).
fn check_object_name(field: &str, name: &str) -> Result<(), Invalid> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} is not an object name: lowercase letters, digits, '-' and '.', \
                 starting and ending alphanumeric, at most 253 characters"
            ),
        ))
    }
}

/// Every object the spec names by reference.
fn check_references(spec: &FailoverSpec) -> Result<(), Invalid> {
    let sentinel = spec.sentinel.as_ref();
    let sentinel_access = sentinel.and_then(|s| s.access.as_ref());
    let auth = sentinel
        .and_then(|s| s.sentinel_reference.as_ref())
        .and_then(|r| r.auth.as_ref());
    let names = [
        ("spec.access.certIssuer", spec.access.cert_issuer.as_ref()),
        (
            "spec.sentinel.access.certIssuer",
            sentinel_access.and_then(|a| a.access.cert_issuer.as_ref()),
        ),
        (
            "spec.sentinel.access.defaultPasswordSecret",
            sentinel_access.and_then(|a| a.default_password_secret.as_ref()),
        ),
        (
            "spec.sentinel.access.externalTLSSecret",
            sentinel_access.and_then(|a| a.external_tls_secret.as_ref()),
        ),
        (
            "spec.sentinel.sentinelReference.auth.passwordSecret",
            auth.and_then(|a| a.password_secret.as_ref()),
        ),
        (
            "spec.sentinel.sentinelReference.auth.tlsSecret",
            auth.and_then(|a| a.tls_secret.as_ref()),
        ),
    ];
    for (field, name) in names {
        if let Some(name) = name {
            check_object_name(field, name)?;
        }
    }
    Ok(())
}

/// The most sentinels an instance is watched by, embedded or external: a quorum of more is
/// slower to agree and buys no safety; the bound keeps a manifest from making the controller
/// run (or talk to) thousands.
pub const MAX_SENTINELS: usize = 9;

fn validate_sentinel(sentinel: &SentinelSettings) -> Result<(), Invalid> {
    if let Some(reference) = &sentinel.sentinel_reference {
        if !(3..=MAX_SENTINELS).contains(&reference.nodes.len()) {
            return Err(invalid(
                "spec.sentinel.sentinelReference.nodes",
                format!(
                    "needs 3 to {MAX_SENTINELS} sentinels, got {}",
                    reference.nodes.len()
                ),
            ));
        }
        for (i, node) in reference.nodes.iter().enumerate() {
            if node.ip.trim().is_empty() || !(1..=65535).contains(&node.port) {
                return Err(invalid(
                    format!("spec.sentinel.sentinelReference.nodes[{i}]"),
                    "needs a host and a port 1..=65535",
                ));
            }
            let host = node.ip.as_str();
            if host.parse::<std::net::IpAddr>().is_err()
                && !is_dns_subdomain(&host.to_ascii_lowercase())
            {
                return Err(invalid(
                    format!("spec.sentinel.sentinelReference.nodes[{i}].ip"),
                    format!("{host:?} is not an IP address or a DNS name"),
                ));
            }
        }
    } else {
        let replicas = sentinel.count();
        if replicas < 3 || replicas % 2 == 0 || replicas as usize > MAX_SENTINELS {
            return Err(invalid(
                "spec.sentinel.replicas",
                format!("must be odd, 3 to {MAX_SENTINELS}, got {replicas}"),
            ));
        }
    }
    if let Some(quorum) = sentinel.quorum
        && !(1..=sentinel.count()).contains(&quorum)
    {
        return Err(invalid(
            "spec.sentinel.quorum",
            format!("must be 1..={}, got {quorum}", sentinel.count()),
        ));
    }
    for (key, value) in &sentinel.monitor_config {
        if !MONITOR_DEFAULTS.iter().any(|(k, _)| k == key) {
            return Err(invalid(
                format!("spec.sentinel.monitorConfig.{key}"),
                "is not a known setting (down-after-milliseconds, failover-timeout, parallel-syncs)",
            ));
        }
        if value.parse::<u64>().map_or(true, |n| n == 0) {
            return Err(invalid(
                format!("spec.sentinel.monitorConfig.{key}"),
                format!("must be a positive whole number, got {value:?}"),
            ));
        }
        // A cut-off master fences itself within the write lease: Sentinel must not promote
        // another node sooner.
        let fenced_within = crate::decide::lease::LEASE_MS + crate::decide::lease::MARGIN_MS;
        if key == "down-after-milliseconds" && value.parse::<u64>().is_ok_and(|n| n < fenced_within)
        {
            return Err(invalid(
                format!("spec.sentinel.monitorConfig.{key}"),
                format!(
                    "must be at least {fenced_within} (the master's write lease and its margin, so that a cut-off master has paused writes before Sentinel promotes another node), got {value}"
                ),
            ));
        }
    }
    text::check_config_map(
        "spec.sentinel.customConfigs",
        &sentinel.custom_configs,
        SENTINEL_OWNED_KEYS,
        SENTINEL_OWNED_PREFIXES,
    )?;
    check_metadata(
        "spec.sentinel",
        &sentinel.pod_annotations,
        &sentinel.node_selector,
    )?;
    if let Some(access) = &sentinel.access {
        text::check_annotations(
            "spec.sentinel.access.annotations",
            &access.access.annotations,
        )?;
    }
    check_resources("spec.sentinel.resources", sentinel.resources.as_ref())
}

impl SentinelSettings {
    /// The number of sentinels in use (embedded, or referenced).
    pub fn count(&self) -> i32 {
        match &self.sentinel_reference {
            Some(reference) => reference.nodes.len() as i32,
            None => self.replicas.unwrap_or(3),
        }
    }

    /// The quorum: as set, or a majority of the configured sentinels.
    pub fn quorum_or_default(&self) -> u32 {
        self.quorum.unwrap_or(self.count() / 2 + 1).max(1) as u32
    }

    /// monitorConfig with the defaults filled in.
    pub fn monitor_config_or_default(&self) -> BTreeMap<String, String> {
        let mut config: BTreeMap<String, String> = MONITOR_DEFAULTS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        config.extend(self.monitor_config.clone());
        config
    }

    /// The Secret holding the sentinels' own password, and the field that names it:
    /// `access.defaultPasswordSecret` (embedded) or `sentinelReference.auth.passwordSecret`.
    pub fn password_secret(&self) -> Option<(&'static str, String)> {
        match &self.sentinel_reference {
            Some(reference) => reference
                .auth
                .as_ref()?
                .password_secret
                .clone()
                .map(|s| ("spec.sentinel.sentinelReference.auth.passwordSecret", s)),
            None => self
                .access
                .as_ref()?
                .default_password_secret
                .clone()
                .map(|s| ("spec.sentinel.access.defaultPasswordSecret", s)),
        }
    }
}

/// A Kubernetes quantity (`512Mi`, `1Gi`, `250m`, `1e3`) as a number of base units.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    let value = number * factor;
    // Kubernetes' own bound: a quantity is at most 2^63 - 1 of its base unit.
    (number >= 0.0 && value.is_finite() && value < i64::MAX as f64).then_some(value)
}

/// A valkey.conf size (`100mb`, `1gb`, `1048576`) in bytes.
pub fn parse_memory(text: &str) -> Option<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number
        .checked_mul(factor)
        .filter(|bytes| i64::try_from(*bytes).is_ok())
}

#[cfg(test)]
mod tests;
