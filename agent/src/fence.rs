//! The agent's durable memory in the data dir: the highest authority epoch it has seen (the
//! fence), and what it last knew of its Valkey (run id, whether it held data), so that both the
//! fence and restart detection survive a restart of the agent.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

/// The file's name inside the data dir.
pub const FILE_NAME: &str = "valkey-agent-state.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    /// Highest authority epoch seen.
    pub epoch: u64,
    /// Run id of the Valkey process last seen.
    #[serde(default)]
    pub run_id: String,
    /// Whether the local Valkey has ever held keys.
    #[serde(default)]
    pub had_data: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid agent state file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state lock was poisoned")]
    Poisoned,
}

/// What `advance` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The command's epoch is current (or newer, and now persisted).
    Yes,
    /// The command's epoch is older than the persisted one.
    Stale { current: u64 },
}

/// The durable state, written atomically (temp file, fsync, rename) on every change.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    state: Mutex<Durable>,
}

impl Fence {
    /// Opens (or starts) the state file in `dir`, creating the dir when missing.
    pub fn open(dir: &Path) -> Result<Self, FenceError> {
        let path = dir.join(FILE_NAME);
        std::fs::create_dir_all(dir).map_err(|source| FenceError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| FenceError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Durable::default(),
            Err(source) => return Err(FenceError::Read { path, source }),
        };
        Ok(Self {
            path,
            state: Mutex::new(state),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self) -> Result<Durable, FenceError> {
        Ok(self.state.lock().map_err(|_| FenceError::Poisoned)?.clone())
    }

    pub fn epoch(&self) -> u64 {
        self.state.lock().map(|s| s.epoch).unwrap_or(u64::MAX)
    }

    /// Admits a command issued under `epoch`: refuses an older one, persists a newer one before
    /// returning, so that the fence holds even if the agent dies right after acting.
    pub fn advance(&self, epoch: u64) -> Result<Admit, FenceError> {
        let mut state = self.state.lock().map_err(|_| FenceError::Poisoned)?;
        if epoch < state.epoch {
            return Ok(Admit::Stale {
                current: state.epoch,
            });
        }
        if epoch > state.epoch {
            let next = Durable {
                epoch,
                ..state.clone()
            };
            self.write(&next)?;
            *state = next;
        }
        Ok(Admit::Yes)
    }

    /// Records what was seen of the local Valkey; writes only when it differs.
    pub fn remember(&self, run_id: &str, had_data: bool) -> Result<(), FenceError> {
        let mut state = self.state.lock().map_err(|_| FenceError::Poisoned)?;
        if state.run_id == run_id && state.had_data == had_data {
            return Ok(());
        }
        let next = Durable {
            run_id: run_id.to_owned(),
            had_data,
            ..state.clone()
        };
        self.write(&next)?;
        *state = next;
        Ok(())
    }

    fn write(&self, state: &Durable) -> Result<(), FenceError> {
        let err = |source| FenceError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| err(e.into()))?;
        let mut file = std::fs::File::create(&tmp).map_err(err)?;
        file.write_all(&bytes).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent()
            && let Ok(dir) = std::fs::File::open(dir)
        {
            // Best effort: make the rename itself durable.
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_refuses_older_and_survives_reopen() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let fence = Fence::open(dir.path())?;
        assert_eq!(fence.advance(0)?, Admit::Yes);
        assert_eq!(fence.advance(5)?, Admit::Yes);
        assert_eq!(fence.advance(5)?, Admit::Yes);
        assert_eq!(fence.advance(4)?, Admit::Stale { current: 5 });
        fence.remember("abc", true)?;
        drop(fence);

        let reopened = Fence::open(dir.path())?;
        assert_eq!(reopened.advance(3)?, Admit::Stale { current: 5 });
        assert_eq!(
            reopened.get()?,
            Durable {
                epoch: 5,
                run_id: "abc".into(),
                had_data: true
            }
        );
        Ok(())
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join(FILE_NAME), b"{not json")?;
        let err = Fence::open(dir.path())
            .err()
            .ok_or("corrupt file accepted")?;
        assert!(err.to_string().contains(FILE_NAME), "{err}");
        Ok(())
    }
}
