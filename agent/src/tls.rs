//! TLS material the agent reads: CA bundles (to verify its local Valkey and the controller),
//! certificate validity (for the expiry metric and renewal), and the watch that hands a
//! renewed certificate to the local process without restarting it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::{CertificateDer, pem::PemObject};

/// Why a certificate file could not be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a certificate X.509 can read: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// A PEM CA bundle (or chain), read once and checked to hold at least one certificate that
/// parses; its bytes, as TLS libraries take them.
pub fn read_bundle(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let pem = std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    certificates(&pem)
        .map(|_| pem)
        .map_err(|reason| match reason {
            None => TlsFileError::NoCertificate {
                path: path.to_owned(),
            },
            Some(reason) => TlsFileError::Parse {
                path: path.to_owned(),
                reason,
            },
        })
}

/// The certificates of PEM text; `Err(None)` when there is none, `Err(Some(why))` when one
/// does not parse.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Option<String>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Some(e.to_string()))?;
    if certs.is_empty() {
        return Err(None);
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|e| Some(e.to_string()))?;
    }
    Ok(certs)
}

/// When a certificate starts and stops being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Of the first certificate of PEM text.
    pub fn of_pem(pem: &[u8]) -> Option<Self> {
        let cert = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).ok()?;
        let at = |t: x509_parser::time::ASN1Time| {
            let secs = u64::try_from(t.timestamp()).unwrap_or_default();
            UNIX_EPOCH + Duration::from_secs(secs)
        };
        Some(Self {
            not_before: at(parsed.validity().not_before),
            not_after: at(parsed.validity().not_after),
        })
    }

    /// Renewal is due at two thirds of the lifetime (and past it).
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        now >= self.not_before + lifetime * 2 / 3
    }

    /// Seconds since the Unix epoch at which the certificate expires.
    pub fn expiry_unix(&self) -> i64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default()
    }
}

/// How often the served certificate files are read for a change.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Hands a renewed certificate to the local process without restarting it: whenever the
/// served certificate, its key or the CA bundle changes (and once at start), the process is
/// told to re-read them (`CONFIG SET tls-cert-file ...`, which reloads Valkey's TLS context
/// for new connections; open ones keep theirs). Also keeps the expiry metric.
pub async fn watch(
    config: std::sync::Arc<crate::config::Config>,
    metrics: crate::metrics::Metrics,
) {
    use sha2::Digest;
    let Some(tls) = &config.valkey_tls else {
        return;
    };
    let Some((cert, key)) = tls.served.clone() else {
        return;
    };
    let mut local = match crate::valkey::Valkey::new(&config, config.probe_timeout) {
        Ok(local) => local,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch the TLS files");
            return;
        }
    };
    let mut applied: Option<Vec<u8>> = None;
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    loop {
        ticker.tick().await;
        let mut digest = sha2::Sha256::new();
        let mut cert_pem = Vec::new();
        let mut readable = true;
        for path in [&cert, &key, &tls.ca_file] {
            match std::fs::read(path) {
                Ok(bytes) => {
                    digest.update(&bytes);
                    if path == &cert {
                        cert_pem = bytes;
                    }
                }
                Err(_) => readable = false,
            }
        }
        if let Some(validity) = Validity::of_pem(&cert_pem) {
            metrics.tls_cert_expiry.set(validity.expiry_unix());
        }
        // Sentinel has no CONFIG command: its renewed certificate takes a restart, which the
        // controller rolls one sentinel at a time.
        if config.mode == crate::config::Mode::Sentinel {
            continue;
        }
        let hash = digest.finalize().to_vec();
        // A renewal is written file by file: wait until all three are there and parse.
        if !readable || applied.as_ref() == Some(&hash) || Validity::of_pem(&cert_pem).is_none() {
            continue;
        }
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET")
            .arg("tls-cert-file")
            .arg(cert.as_os_str().as_encoded_bytes())
            .arg("tls-key-file")
            .arg(key.as_os_str().as_encoded_bytes())
            .arg("tls-ca-cert-file")
            .arg(tls.ca_file.as_os_str().as_encoded_bytes());
        match local.query::<()>(&cmd).await {
            Ok(()) => {
                if applied.is_some() {
                    tracing::info!(cert = %cert.display(), "renewed TLS certificate loaded");
                    metrics.tls_reloads.inc();
                }
                applied = Some(hash);
            }
            Err(err) => tracing::debug!(error = %err, "TLS reload not taken yet; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, "not a certificate\n").unwrap_or_else(|e| panic!("{e}"));
        let err = read_bundle(&path).err().map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!("{}: no PEM certificate in it", path.display()))
        );
        let missing = dir.path().join("missing.crt");
        let err = read_bundle(&missing).err().map(|e| e.to_string());
        assert!(
            err.is_some_and(|e| e.starts_with(&missing.display().to_string())),
            "the path is named"
        );
    }
}
