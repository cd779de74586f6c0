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

/// The registry file: one for each user of the machine, in a dir of the temp dir only that
/// user can enter, so that nobody else can read it, swap it for a link, or hold its lock.
pub struct Registry {
    path: PathBuf,
    lock_timeout: std::time::Duration,
}

/// How long `local up` waits for another of the user's runtimes to release the registry.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Registry {
    pub fn shared() -> Self {
        let uid = nix::unistd::getuid();
        Self {
            path: std::env::temp_dir()
                .join(format!("valkey-local-{uid}"))
                .join("ports"),
            lock_timeout: LOCK_TIMEOUT,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The registry's dir, made 0700 if missing; one that is a link, or someone else's, or
    /// open to others, is refused rather than used.
    fn private_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let Some(dir) = self.path.parent() else {
            return Ok(());
        };
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = std::fs::symlink_metadata(dir)?;
        let mine = meta.uid() == nix::unistd::getuid().as_raw();
        if !meta.is_dir() || !mine || meta.mode() & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a private dir of this user (a link, another user's, or open to \
                     others); remove it",
                    dir.display()
                ),
            ));
        }
        Ok(())
    }

    /// Takes the registry's lock, waiting at most `lock_timeout` for another runtime.
    fn lock(&self, registry: &std::fs::File) -> std::io::Result<()> {
        let deadline = std::time::Instant::now() + self.lock_timeout;
        loop {
            match registry.try_lock() {
                Ok(()) => return Ok(()),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "{} stayed locked for {:.1} s by another local runtime",
                            self.path.display(),
                            self.lock_timeout.as_secs_f32()
                        ),
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
    }

    /// Runs `change` on the live entries under an exclusive lock, then writes them back.
    fn with_entries<T>(
        &self,
        change: impl FnOnce(&mut Vec<Entry>) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        self.private_dir()?;
        let mut registry = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // A link in its place is not followed.
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&self.path)?;
        self.lock(&registry)?;
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
        let registry = Registry {
            path: tmp.path().join("registry").join("ports"),
            lock_timeout: LOCK_TIMEOUT,
        };
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

    #[test]
    fn a_registry_dir_that_is_not_private_or_a_held_lock_is_a_clear_error() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let owner = tempfile::tempdir().unwrap();
        let registry = |dir: &Path| Registry {
            path: dir.join("ports"),
            lock_timeout: std::time::Duration::from_millis(200),
        };

        // Made by the registry itself: 0700, and usable.
        let fresh = tmp.path().join("fresh");
        registry(&fresh).reserve::<1>(owner.path()).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let file_mode = std::fs::metadata(fresh.join("ports"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);

        // Open to others, or a link to somewhere else: refused, and the message says where.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = registry(&open).reserve::<1>(owner.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(
            err.to_string().contains(&open.display().to_string()),
            "{err}"
        );
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        let err = registry(&link).reserve::<1>(owner.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");

        // A link in place of the file is not followed.
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::remove_file(fresh.join("ports")).unwrap();
        std::os::unix::fs::symlink(&victim, fresh.join("ports")).unwrap();
        assert!(registry(&fresh).reserve::<1>(owner.path()).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_file(fresh.join("ports")).unwrap();

        // Held by another runtime past the timeout: an error that says so, not a hang.
        registry(&fresh).reserve::<1>(owner.path()).unwrap();
        let held = std::fs::File::open(fresh.join("ports")).unwrap();
        held.lock().unwrap();
        let err = registry(&fresh).reserve::<1>(owner.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("stayed locked for 0.2 s"), "{err}");
        held.unlock().unwrap();
        registry(&fresh).reserve::<1>(owner.path()).unwrap();
    }
}
