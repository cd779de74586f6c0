//! What the local runtime keeps in its working dir: the state file (the durable failover state
//! and every node's ports, kept across runs; the local [`DurableStore`]), and secret files.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{LocalError, io};
use crate::{
    decide::model::Durable,
    driver::{DurableStore, StoreError},
    files::write_atomic,
};

/// Ports of one node, kept across runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePorts {
    pub valkey: u16,
    pub agent: u16,
    pub metrics: u16,
}

/// The working dir's durable state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub namespace: String,
    pub name: String,
    pub durable: Durable,
    pub ports: BTreeMap<String, NodePorts>,
    /// Embedded sentinels' ports (policy sentinel), kept across runs.
    #[serde(default)]
    pub sentinels: BTreeMap<String, NodePorts>,
}

impl LocalState {
    pub(super) fn load(path: &Path) -> Result<Option<Self>, LocalError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| LocalError::BadState {
                        path: path.to_owned(),
                        source,
                    })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LocalError::Io {
                what: "reading",
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub(super) fn save(&self, path: &Path) -> Result<(), LocalError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| LocalError::BadState {
            path: path.to_owned(),
            source,
        })?;
        write_atomic(path, &bytes).map_err(io("writing", path))
    }
}

/// The local [`DurableStore`]: the state file, rewritten whole (atomically) with the new
/// durable state.
pub(super) struct StateFile<'a> {
    pub(super) path: &'a Path,
    pub(super) state: &'a LocalState,
}

impl DurableStore for StateFile<'_> {
    async fn save(&self, durable: &Durable) -> Result<(), StoreError> {
        let state = LocalState {
            durable: durable.clone(),
            ..self.state.clone()
        };
        state.save(self.path).map_err(StoreError::new)
    }
}

/// The default working dir of an instance.
pub fn default_dir(namespace: &str, name: &str) -> PathBuf {
    PathBuf::from(".valkey-local").join(format!("{namespace}-{name}"))
}

pub(super) fn pod_name(name: &str, ordinal: u32) -> String {
    format!("{name}-{ordinal}")
}

pub(super) fn random_secret() -> String {
    use rand::RngExt;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Reads a secret file, creating it (mode 0600) when missing.
pub(super) fn secret_file(path: &Path) -> Result<String, LocalError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_secret();
            write_atomic(path, secret.as_bytes()).map_err(io("writing", path))?;
            Ok(secret)
        }
        Err(source) => Err(LocalError::Io {
            what: "reading",
            path: path.to_owned(),
            source,
        }),
    }
}
