//! The shape of the password Secrets the pods mount: their keys, whose password a copy holds,
//! and the exporter's password map. The cold path (`cold::password`) keeps them.

use crate::k8s::Names;

pub const KEY: &str = "password";
pub const OLD_KEY: &str = "password.old";
pub const NEW_KEY: &str = "password.new";
/// The exporter's password map (redis_exporter's `REDIS_PASSWORD_FILE`), in the instance's
/// copy only.
pub const EXPORTER_KEY: &str = "exporter.json";

/// The exporter's password map: the password for the pod's own Valkey and nothing else, so
/// that a scrape of any other target is sent no password.
pub fn exporter_map(password: &str) -> String {
    let local = |scheme: &str| format!("{scheme}://127.0.0.1:{}", crate::k8s::VALKEY_PORT);
    serde_json::json!({ local("redis"): password, local("rediss"): password }).to_string()
}

/// Whose password: the instance's (data nodes check it, replicas and Sentinel present it), or
/// an embedded Sentinel set's own (the sentinels check it and present it to each other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    Instance,
    Sentinel,
}

impl Whose {
    /// The controller's copy that the pods mount.
    pub fn in_force(self, names: &Names) -> String {
        match self {
            Whose::Instance => names.password_in_force(),
            Whose::Sentinel => format!("{}-password-in-force", names.sentinel()),
        }
    }

    pub fn field(self) -> &'static str {
        match self {
            Whose::Instance => "status.passwordSecret",
            Whose::Sentinel => "spec.sentinel.access.defaultPasswordSecret",
        }
    }
}
