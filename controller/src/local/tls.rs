//! The local runtime's certificates, in `<dir>/tls/`: a CA of its own (`ca.crt`, `ca.key`),
//! the instance's certificate when the spec asks for TLS (`tls.crt`, `tls.key`, the layout
//! of a Kubernetes TLS Secret), and the hub's certificate, which lives in memory only. Both
//! issued certificates are renewed at two thirds of their lifetime while the runtime runs.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::info;

use super::{LocalError, io, write_atomic};
use crate::{
    hub::tls::ServerCert,
    tls::{CA_LIFETIME, Ca, Issued, TlsFiles, Validity},
};
use valkey_agent::config::ValkeyTls;

/// Every name a local process is reached by: loopback, and the addresses of `--netns`.
fn local_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["127.0.0.1".into(), "localhost".into()];
    names.extend(extra.iter().cloned());
    names
}

#[derive(Debug)]
pub struct LocalTls {
    ca: Ca,
    /// `<dir>/tls/ca.crt`: what agents and clients verify against.
    pub ca_file: PathBuf,
    /// The files Valkey and Sentinel serve, when the spec asks for TLS.
    pub instance: Option<TlsFiles>,
    pub hub: Arc<ServerCert>,
    lifetime: Duration,
    last_check: std::time::Instant,
    /// Addresses beside loopback that the certificates name.
    names: Vec<String>,
}

fn bad_cert(path: &Path, why: impl std::fmt::Display) -> LocalError {
    LocalError::Io {
        what: "reading the certificate",
        path: path.to_owned(),
        source: std::io::Error::other(why.to_string()),
    }
}

fn issue(ca: &Ca, names: &[String], lifetime: Duration, path: &Path) -> Result<Issued, LocalError> {
    ca.issue(&local_names(names), lifetime)
        .map_err(|e| bad_cert(path, e))
}

impl LocalTls {
    /// Loads or makes the CA, issues the hub's certificate, and (with `instance_tls`) makes
    /// sure the instance's certificate is there and not due for renewal.
    pub fn prepare(
        dir: &Path,
        instance_tls: bool,
        lifetime: Duration,
        names: Vec<String>,
    ) -> Result<Self, LocalError> {
        use std::os::unix::fs::PermissionsExt;
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir).map_err(io("creating", &tls_dir))?;
        std::fs::set_permissions(&tls_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restricting", &tls_dir))?;
        let (ca_file, ca_key) = (tls_dir.join("ca.crt"), tls_dir.join("ca.key"));
        let ca = match (
            std::fs::read_to_string(&ca_file),
            std::fs::read_to_string(&ca_key),
        ) {
            (Ok(cert_pem), Ok(key_pem)) => Ca(Issued { cert_pem, key_pem }),
            _ => {
                let ca = Ca::generate("valkey-controller local CA", CA_LIFETIME)
                    .map_err(|e| bad_cert(&ca_file, e))?;
                write_atomic(&ca_key, ca.0.key_pem.as_bytes()).map_err(io("writing", &ca_key))?;
                write_atomic(&ca_file, ca.0.cert_pem.as_bytes())
                    .map_err(io("writing", &ca_file))?;
                ca
            }
        };
        let hub = issue(&ca, &names, lifetime, &ca_file)?;
        let tls = Self {
            hub: ServerCert::new(&hub).map_err(|e| bad_cert(&ca_file, e))?,
            instance: instance_tls.then(|| TlsFiles::in_dir(&tls_dir.display().to_string())),
            ca,
            ca_file,
            lifetime,
            last_check: std::time::Instant::now(),
            names,
        };
        if instance_tls {
            tls.renew_instance(false)?;
        } else {
            // TLS turned off: no stale certificate suggests otherwise to a reader of the dir.
            for file in ["tls.crt", "tls.key"] {
                let _ = std::fs::remove_file(tls_dir.join(file));
            }
        }
        Ok(tls)
    }

    /// Issues the instance's certificate anew when it is missing, unreadable or due (or when
    /// `force`). True when it was renewed.
    fn renew_instance(&self, force: bool) -> Result<bool, LocalError> {
        let Some(files) = &self.instance else {
            return Ok(false);
        };
        let cert = Path::new(&files.cert);
        let current = std::fs::read(cert).ok();
        let due = current
            .as_deref()
            .and_then(Validity::of_pem)
            .is_none_or(|v| v.renewal_due(SystemTime::now()));
        let key_missing = !Path::new(&files.key).exists();
        if !(force || due || key_missing) {
            return Ok(false);
        }
        let issued = issue(&self.ca, &self.names, self.lifetime, cert)?;
        let key = Path::new(&files.key);
        write_atomic(key, issued.key_pem.as_bytes()).map_err(io("writing", key))?;
        write_atomic(cert, issued.cert_pem.as_bytes()).map_err(io("writing", cert))?;
        Ok(true)
    }

    /// Renews whatever is due: the instance's files (agents hand them to Valkey; true when
    /// they were renewed) and the hub's certificate (served to new connections at once).
    pub fn renew_due(&mut self) -> Result<bool, LocalError> {
        if self.last_check.elapsed() < Duration::from_secs(1) {
            return Ok(false);
        }
        self.last_check = std::time::Instant::now();
        let renewed = self.renew_instance(false)?;
        if renewed {
            info!("renewed the instance's TLS certificate");
        }
        if self
            .hub
            .renew_if_due(&self.ca, &local_names(&self.names), self.lifetime)
            .map_err(|e| bad_cert(&self.ca_file, e))?
        {
            info!("renewed the hub's TLS certificate");
        }
        Ok(renewed)
    }
}

/// How the agents of an external Sentinel set reach it over TLS: the Secret named by
/// `sentinelReference.auth.tlsSecret`, read as the local runtime reads Secrets, from
/// `<dir>/secrets/<name>/`: `ca.crt` (required: what the sentinels' certificates must chain
/// to) and, for a set that requires client certificates, `tls.crt` and `tls.key`. The files
/// are re-read at every new connection, so a renewed Secret needs no restart.
pub fn external_sentinel_tls(dir: &Path, name: &str) -> Result<ValkeyTls, LocalError> {
    crate::external::tls_from_dir(&dir.join("secrets").join(name)).map_err(|message| {
        LocalError::Manifest(crate::manifest::ManifestError::Invalid {
            field: "spec.sentinel.sentinelReference.auth.tlsSecret".into(),
            message: format!("Secret {name:?}: {message}"),
        })
    })
}

/// Sentinel has no CONFIG command, so a renewed certificate reaches a sentinel only through a
/// restart: one sentinel at a time, the next once the last is back and reporting, so that the
/// others keep their quorum. The old certificate stays valid for a third of its lifetime, so
/// there is no hurry.
#[derive(Debug, Default)]
pub struct SentinelRoll {
    queue: std::collections::VecDeque<String>,
    /// The sentinel restarting: its pid before, and when a new process was first seen.
    current: Option<(String, Option<u32>, Option<std::time::Instant>)>,
}

/// What the roll wants done now.
#[derive(Debug, PartialEq, Eq)]
pub enum RollStep {
    Wait,
    Restart(String),
}

impl SentinelRoll {
    /// Nothing to restart, nothing restarting.
    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.queue.is_empty()
    }

    pub fn request(&mut self, pods: impl IntoIterator<Item = String>) {
        for pod in pods {
            let current = self.current.as_ref().is_some_and(|(p, ..)| *p == pod);
            if !current && !self.queue.contains(&pod) {
                self.queue.push_back(pod);
            }
        }
    }

    /// One step, given the pid of each sentinel process now and whether its agent reports it
    /// up: finishes the restart under way once a new process has been reporting for a second,
    /// then names the next sentinel to restart.
    pub fn step(
        &mut self,
        pid_of: impl Fn(&str) -> Option<u32>,
        reporting: impl Fn(&str) -> bool,
    ) -> RollStep {
        if let Some((pod, before, seen)) = &mut self.current {
            let pid = pid_of(pod);
            if pid.is_none() || pid == *before {
                return RollStep::Wait;
            }
            let seen = *seen.get_or_insert_with(std::time::Instant::now);
            if seen.elapsed() < Duration::from_secs(1) || !reporting(pod) {
                return RollStep::Wait;
            }
            info!(pod = %pod, "sentinel restarted with the renewed certificate");
            self.current = None;
        }
        match self.queue.pop_front() {
            None => RollStep::Wait,
            Some(pod) => {
                self.current = Some((pod.clone(), pid_of(&pod), None));
                RollStep::Restart(pod)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, collections::BTreeMap};

    #[test]
    fn an_external_sets_tls_secret_needs_its_ca_and_a_whole_client_certificate() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = dir.path().join("secrets").join("ext");
        std::fs::create_dir_all(&secret).unwrap_or_else(|e| panic!("{e}"));
        let error = |dir: &Path| match external_sentinel_tls(dir, "ext") {
            Err(LocalError::Manifest(crate::manifest::ManifestError::Invalid {
                field,
                message,
            })) => format!("{field}: {message}"),
            other => panic!("not refused: {other:?}"),
        };
        let field = "spec.sentinel.sentinelReference.auth.tlsSecret: Secret \"ext\"";
        let missing = error(dir.path());
        assert!(
            missing.starts_with(field) && missing.contains("ca.crt"),
            "{missing}"
        );
        let ca = Ca::generate("theirs", CA_LIFETIME).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(secret.join("ca.crt"), &ca.0.cert_pem).unwrap_or_else(|e| panic!("{e}"));
        // The CA alone: their certificates are verified, none is presented.
        let tls = external_sentinel_tls(dir.path(), "ext").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tls.ca_file, secret.join("ca.crt"));
        assert!(tls.client.is_none() && tls.served.is_none());
        // Half a client certificate is refused, naming the missing file.
        let issued =
            issue(&ca, &[], CERT_LIFETIME_FOR_TESTS, &secret).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(secret.join("tls.crt"), &issued.cert_pem).unwrap_or_else(|e| panic!("{e}"));
        let half = error(dir.path());
        assert!(
            half.starts_with(field) && half.contains("tls.key"),
            "{half}"
        );
        std::fs::write(secret.join("tls.key"), &issued.key_pem).unwrap_or_else(|e| panic!("{e}"));
        let tls = external_sentinel_tls(dir.path(), "ext").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tls.client,
            Some((secret.join("tls.crt"), secret.join("tls.key")))
        );
    }

    const CERT_LIFETIME_FOR_TESTS: Duration = Duration::from_secs(3600);

    #[test]
    fn sentinels_restart_one_at_a_time_each_once_the_last_is_back() {
        let pids = RefCell::new(BTreeMap::from([("s-0", 10), ("s-1", 11), ("s-2", 12)]));
        let reporting = RefCell::new(true);
        let mut roll = SentinelRoll::default();
        assert!(roll.is_idle());
        roll.request(["s-0".to_owned(), "s-1".to_owned()]);
        assert!(!roll.is_idle());
        roll.request(["s-0".to_owned(), "s-2".to_owned()]);
        let step = |roll: &mut SentinelRoll| {
            roll.step(
                |pod| pids.borrow().get(pod).copied(),
                |_| *reporting.borrow(),
            )
        };
        assert_eq!(step(&mut roll), RollStep::Restart("s-0".into()));
        // Same pid, then no process, then a new one not reporting yet: wait.
        assert_eq!(step(&mut roll), RollStep::Wait);
        pids.borrow_mut().remove("s-0");
        assert_eq!(step(&mut roll), RollStep::Wait);
        pids.borrow_mut().insert("s-0", 20);
        *reporting.borrow_mut() = false;
        assert_eq!(step(&mut roll), RollStep::Wait);
        *reporting.borrow_mut() = true;
        // Back and reporting, but for less than a second.
        assert_eq!(step(&mut roll), RollStep::Wait);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(step(&mut roll), RollStep::Restart("s-1".into()));
        pids.borrow_mut().insert("s-1", 21);
        assert_eq!(step(&mut roll), RollStep::Wait);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(step(&mut roll), RollStep::Restart("s-2".into()));
        pids.borrow_mut().insert("s-2", 22);
        assert_eq!(step(&mut roll), RollStep::Wait);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(step(&mut roll), RollStep::Wait);
        assert_eq!(step(&mut roll), RollStep::Wait);
        assert!(roll.is_idle());
    }
}
