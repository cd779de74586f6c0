//! Node ports for `local up`, reserved in a registry shared by every local runtime on the
//! machine, so that two working dirs never hold the same port, even while one is stopped.

use std::{
    io::{Read, Seek, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// Where node ports are picked: below Linux's ephemeral range (32768-60999), so that no port
/// the kernel hands out for an outgoing connection or a `:0` listener (the hub's, say) can
/// take a node's stored port.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// One line of the registry: a port and the working dir whose state holds it. A port stays
/// reserved while that dir exists, so a stopped instance keeps its ports for its next start
/// (its state names them) and a deleted one gives them back.
struct Entry {
    port: u16,
    owner: PathBuf,
}

/// The registry file: one for every local runtime of the machine, in the temp dir.
pub struct Registry(PathBuf);

impl Registry {
    pub fn shared() -> Self {
        Self(std::env::temp_dir().join("valkey-local-ports"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Runs `change` on the live entries under an exclusive lock, then writes them back.
    fn with_entries<T>(
        &self,
        change: impl FnOnce(&mut Vec<Entry>) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let mut registry = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Another user's symlink in the shared temp dir is not followed.
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&self.0)?;
        registry.lock()?;
        let mut text = String::new();
        registry.read_to_string(&mut text)?;
        let mut entries: Vec<Entry> = text
            .lines()
            .filter_map(|line| {
                let (port, owner) = line.split_once(' ')?;
                Some(Entry {
                    port: port.parse().ok()?,
                    owner: PathBuf::from(owner),
                })
            })
            .filter(|e| e.owner.is_absolute() && e.owner.is_dir())
            .collect();
        let result = change(&mut entries)?;
        let updated: String = entries
            .iter()
            .map(|e| format!("{} {}\n", e.port, e.owner.display()))
            .collect();
        registry.set_len(0)?;
        registry.rewind()?;
        registry.write_all(updated.as_bytes())?;
        registry.unlock()?;
        Ok(result)
    }

    /// Records that `owner` (a working dir) holds exactly `ports`, from its state, so that no
    /// other instance picks them while it is stopped; entries it no longer holds are released.
    pub fn claim(&self, owner: &Path, ports: &[u16]) -> std::io::Result<()> {
        self.with_entries(|entries| {
            entries.retain(|e| e.owner != owner);
            entries.extend(ports.iter().map(|port| Entry {
                port: *port,
                owner: owner.to_path_buf(),
            }));
            Ok(())
        })
    }

    /// Distinct ports free right now (held open together while they are picked) and reserved
    /// by no working dir, recorded as `owner`'s.
    pub fn reserve<const N: usize>(&self, owner: &Path) -> std::io::Result<[u16; N]> {
        use rand::seq::SliceRandom;
        self.with_entries(|entries| {
            let taken: std::collections::HashSet<u16> = entries.iter().map(|e| e.port).collect();
            let mut candidates: Vec<u16> = PORT_RANGE.filter(|p| !taken.contains(p)).collect();
            candidates.shuffle(&mut rand::rng());
            let listeners: Vec<(u16, std::net::TcpListener)> = candidates
                .into_iter()
                .filter_map(|p| Some((p, std::net::TcpListener::bind(("127.0.0.1", p)).ok()?)))
                .take(N)
                .collect();
            let ports: [u16; N] = listeners
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| {
                    std::io::Error::other(format!(
                        "no free port in {}..{}",
                        PORT_RANGE.start, PORT_RANGE.end
                    ))
                })?;
            entries.extend(ports.iter().map(|port| Entry {
                port: *port,
                owner: owner.to_path_buf(),
            }));
            Ok(ports)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports_of(registry: &Registry, owner: &Path) -> Vec<u16> {
        registry
            .with_entries(|entries| {
                Ok(entries
                    .iter()
                    .filter(|e| e.owner == owner)
                    .map(|e| e.port)
                    .collect())
            })
            .unwrap()
    }

    #[test]
    fn a_stopped_instances_ports_are_not_handed_to_another_until_its_dir_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry(tmp.path().join("registry"));
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        // Instance a, stopped, holds every port of the range but three that are free now.
        let left: Vec<u16> = PORT_RANGE
            .rev()
            .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .take(3)
            .collect();
        let held: Vec<u16> = PORT_RANGE.filter(|p| !left.contains(p)).collect();
        registry.claim(a.path(), &held).unwrap();
        let mut picked: [u16; 3] = registry.reserve(b.path()).unwrap();
        picked.sort_unstable();
        let mut want = left.clone();
        want.sort_unstable();
        assert_eq!(picked.to_vec(), want);
        let err = registry.reserve::<1>(b.path()).unwrap_err();
        assert!(
            err.to_string().contains("no free port in 20000..32000"),
            "{err}"
        );

        // A new claim replaces the owner's set; a deleted working dir gives its ports back.
        registry.claim(b.path(), &picked[..1]).unwrap();
        assert_eq!(ports_of(&registry, b.path()), vec![picked[0]]);
        let a_path = a.path().to_path_buf();
        drop(a);
        assert!(ports_of(&registry, &a_path).is_empty());
        let again: [u16; 2] = registry.reserve(b.path()).unwrap();
        assert!(again.iter().all(|p| *p != picked[0]));
    }
}
