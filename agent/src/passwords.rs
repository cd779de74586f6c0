//! Passwords that commands name but never carry: a `PasswordRef` says whose password (the
//! instance's or the sentinels') and which version (in force, or the one a rotation moves to),
//! and the agent reads it from its own files. A plain value for a key that holds a password
//! is refused, so that no password crosses the controller's channel.

use std::{collections::HashMap, path::PathBuf};

use valkey_proto::v1::{PasswordRef, password_ref::Owner};

use crate::{
    actions::{Refusal, failed, invalid},
    config::{Config, Mode, next_password_path},
};

/// Config keys (Valkey and Sentinel) whose value is a password.
pub const PASSWORD_KEYS: &[&str] = &[
    "masterauth",
    "primaryauth",
    "requirepass",
    "auth-pass",
    "sentinel-pass",
];

/// The file `reference` names on this agent's pod.
fn file_of(config: &Config, reference: &PasswordRef) -> Result<PathBuf, Refusal> {
    let in_force = match (reference.owner(), config.mode) {
        (Owner::Instance, Mode::Data) => config.valkey_password_file.clone(),
        (Owner::Instance, Mode::Sentinel) => config.instance_password_file.clone(),
        (Owner::Sentinel, Mode::Sentinel) => config.valkey_password_file.clone(),
        (owner, mode) => {
            return Err(invalid(format!(
                "no {owner:?} password on a {mode:?} agent"
            )));
        }
    }
    .ok_or_else(|| {
        invalid(format!(
            "the {:?} password is named, but this agent has no file for it \
             (--valkey-password-file / --instance-password-file)",
            reference.owner()
        ))
    })?;
    Ok(if reference.next {
        next_password_path(&in_force)
    } else {
        in_force
    })
}

/// The password `reference` names, read now.
pub(crate) fn resolve(config: &Config, reference: &PasswordRef) -> Result<String, Refusal> {
    let file = file_of(config, reference)?;
    let text = std::fs::read_to_string(&file)
        .map_err(|e| failed(format!("reading the password file {}: {e}", file.display())))?;
    let password = text.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err(failed(format!(
            "the password file {} is empty",
            file.display()
        )));
    }
    if !reference.sha256.is_empty()
        && !reference
            .sha256
            .eq_ignore_ascii_case(&sha256_hex(&password))
    {
        return Err(failed(format!(
            "the password file {} does not hold the password named yet (its Secret not synced \
             to this pod yet?)",
            file.display()
        )));
    }
    Ok(password)
}

/// The SHA-256 of a password, hex: how commands name one without carrying it.
pub fn sha256_hex(password: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(password.as_bytes()))
}

/// `params` with every `refs` entry resolved into it. `field` names the command in errors.
pub(crate) fn merged(
    config: &Config,
    field: &str,
    params: &HashMap<String, String>,
    refs: &HashMap<String, PasswordRef>,
) -> Result<HashMap<String, String>, Refusal> {
    if let Some(key) = params
        .keys()
        .find(|k| PASSWORD_KEYS.contains(&k.to_ascii_lowercase().as_str()))
    {
        return Err(invalid(format!(
            "{field}.params[{key}] holds a password: it must come as a password reference \
             ({field}.password_params), never as a value"
        )));
    }
    let mut all = params.clone();
    for (key, reference) in refs {
        all.insert(key.clone(), resolve(config, reference)?);
    }
    Ok(all)
}
