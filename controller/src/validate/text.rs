//! Checks of the spec's free text that ends up in config files, start scripts and object
//! metadata: no control character (a newline would start a new directive), the syntax each
//! place requires, and sizes that cannot exhaust the controller or the nodes.

use std::collections::BTreeMap;

use super::{Invalid, invalid};
use crate::conf_text::has_control;

/// The longest customConfigs value, module argument or image accepted.
pub const MAX_VALUE_LEN: usize = 1024;
/// The most customConfigs entries accepted, each map.
pub const MAX_CONFIG_ENTRIES: usize = 256;
/// Kubernetes' limit on the annotations of one object, all keys and values together.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Directives that would hand the server to whoever writes the spec, refused in
/// customConfigs (data nodes and sentinels alike), with the reason given to the user.
pub const REFUSED_KEYS: &[(&str, &str)] = &[
    (
        "enable-debug-command",
        "opens DEBUG to clients, and with it the server's memory",
    ),
    (
        "enable-protected-configs",
        "lets clients move dir and dbfilename, and so write files wherever the server can",
    ),
    (
        "enable-module-command",
        "lets clients load any shared object into the server (use spec.modules)",
    ),
    (
        "rename-command",
        "can hide the commands the operator and Sentinel rely on (restrict clients with ACLs)",
    ),
    ("loadmodule", "is written from spec.modules"),
    (
        "user",
        "would add or change users beside the operator's (the default user's password is the Secret's)",
    ),
    ("dbfilename", "names the data files the operator keeps"),
    ("appendfilename", "names the data files the operator keeps"),
    ("appenddirname", "names the data files the operator keeps"),
];

/// The reason a customConfigs key is refused, if it is.
pub fn refused(key: &str) -> Option<&'static str> {
    let lower = key.to_ascii_lowercase();
    REFUSED_KEYS
        .iter()
        .find(|(k, _)| *k == lower)
        .map(|(_, why)| *why)
}

/// One customConfigs map (`field`: `spec.customConfigs` or `spec.sentinel.customConfigs`):
/// keys are config keys, values hold no control character, both within size limits, and no
/// key is one the operator owns (`owned`, `owned_prefixes`) or one that hands over the server.
pub fn check_config_map(
    field: &str,
    map: &BTreeMap<String, String>,
    owned: &[&str],
    owned_prefixes: &[&str],
) -> Result<(), Invalid> {
    if map.len() > MAX_CONFIG_ENTRIES {
        return Err(invalid(
            field,
            format!("has {} entries; at most {MAX_CONFIG_ENTRIES}", map.len()),
        ));
    }
    for (key, value) in map {
        let lower = key.to_ascii_lowercase();
        let syntax = !key.is_empty()
            && key.len() <= 64
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !syntax {
            return Err(invalid(
                format!("{field}.{key:?}"),
                "is not a config key (1 to 64 letters, digits and '-')",
            ));
        }
        if lower != *key {
            return Err(invalid(
                format!("{field}.{key}"),
                format!("config keys are written in lower case: {lower}"),
            ));
        }
        // An alias is the key it names: checked as that key, and written as that key only.
        let named = super::conf_keys::aliased(key);
        let canonical = named.unwrap_or(key);
        if owned.contains(&canonical) || owned_prefixes.iter().any(|p| canonical.starts_with(p)) {
            return Err(invalid(
                format!("{field}.{key}"),
                match named {
                    Some(name) => format!(
                        "is an alias of {name}, which is set by the operator and cannot be overridden"
                    ),
                    None => "is set by the operator and cannot be overridden".to_owned(),
                },
            ));
        }
        if let Some(name) = named {
            return Err(invalid(
                format!("{field}.{key}"),
                format!("is an alias: write {name}"),
            ));
        }
        if let Some(why) = refused(key) {
            return Err(invalid(
                format!("{field}.{key}"),
                format!("is refused: it {why}"),
            ));
        }
        check_value(&format!("{field}.{key}"), value)?;
        if let Some(why) = super::conf_keys::refused_value(key, value) {
            return Err(invalid(format!("{field}.{key}"), why));
        }
    }
    Ok(())
}

/// A value written into a config line or a pod: no control character, not too long.
pub fn check_value(field: &str, value: &str) -> Result<(), Invalid> {
    if has_control(value) {
        return Err(invalid(
            field,
            "holds a control character (a newline or the like would end the config line)",
        ));
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(invalid(
            field,
            format!("is {} bytes long; at most {MAX_VALUE_LEN}", value.len()),
        ));
    }
    Ok(())
}

/// A module's path: a file name under the image's module directory or an absolute path, in
/// plain characters and without `..`.
pub fn check_module_path(field: &str, path: &str) -> Result<(), Invalid> {
    let ok = !path.is_empty()
        && path.len() <= 256
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        && !path.split('/').any(|part| part == "..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            "must be a file name or an absolute path of letters, digits, '.', '_', '-' and '/', \
             without '..', at most 256 characters",
        ))
    }
}

/// A DNS label (a namespace): at most 63 lowercase letters, digits and '-', starting and
/// ending alphanumeric.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The name part of a label or annotation key, or a label value: at most 63 characters,
/// alphanumeric at both ends, '-', '_' and '.' between.
fn is_qualified_part(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A label or annotation key: `name` or `prefix/name`, the prefix a DNS subdomain.
pub fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        None => is_qualified_part(key),
        Some((prefix, name)) => {
            super::is_dns_subdomain(prefix) && is_qualified_part(name) && !name.contains('/')
        }
    }
}

/// Annotations: keys as Kubernetes requires, and all of them within its size limit.
pub fn check_annotations(field: &str, map: &BTreeMap<String, String>) -> Result<(), Invalid> {
    let mut size = 0;
    for (key, value) in map {
        if !is_qualified_name(key) {
            return Err(invalid(
                format!("{field}.{key:?}"),
                "is not an annotation key (`name` or `prefix/name`: at most 63 letters, digits, \
                 '-', '_' and '.', the prefix a DNS name)",
            ));
        }
        size += key.len() + value.len();
    }
    if size > MAX_ANNOTATIONS_BYTES {
        return Err(invalid(
            field,
            format!("holds {size} bytes; Kubernetes allows {MAX_ANNOTATIONS_BYTES}"),
        ));
    }
    Ok(())
}

/// A node selector: label keys and label values.
pub fn check_labels(field: &str, map: &BTreeMap<String, String>) -> Result<(), Invalid> {
    for (key, value) in map {
        if !is_qualified_name(key) {
            return Err(invalid(format!("{field}.{key:?}"), "is not a label key"));
        }
        if !(value.is_empty() || is_qualified_part(value)) {
            return Err(invalid(
                format!("{field}.{key}"),
                format!(
                    "{value:?} is not a label value (at most 63 letters, digits, '-', '_' and '.')"
                ),
            ));
        }
    }
    Ok(())
}
