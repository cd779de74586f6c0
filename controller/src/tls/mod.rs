//! Certificates when no cert-manager Issuer is named: a CA of our own (rcgen) that issues the
//! server certificates of Valkey, Sentinel and the agent hub, and the config lines that make
//! Valkey and Sentinel speak TLS only.

use std::{net::IpAddr, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

pub use valkey_agent::tls::Validity;

/// Lifetime of the CA when the controller makes one.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of an issued certificate; renewed at two thirds of it.
pub const CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating a key: {0}")]
    Key(rcgen::Error),
    #[error("the CA key does not parse: {0}")]
    CaKey(rcgen::Error),
    #[error("the CA certificate does not parse: {0}")]
    CaCert(rcgen::Error),
    #[error("signing: {0}")]
    Sign(rcgen::Error),
    #[error("subject alternative name {name:?}: {source}")]
    San { name: String, source: rcgen::Error },
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

/// Our CA: its certificate (what peers trust) and its key (what signs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ca(pub Issued);

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    // Some slack for clocks a little behind: a minute, or a tenth of a short lifetime.
    let now = time::OffsetDateTime::now_utc();
    let slack = (lifetime / 10).min(Duration::from_secs(60));
    params.not_before = now - time::Duration::seconds(slack.as_secs() as i64);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
}

impl Ca {
    /// A new CA named `name`, valid for `lifetime`.
    pub fn generate(name: &str, lifetime: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Key)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "valkey-operator");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, lifetime);
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok(Self(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }))
    }

    /// A certificate for `names` (DNS names or IP addresses), usable by servers and by clients
    /// (replicas and sentinels connect to their peers), valid for `lifetime`.
    pub fn issue(&self, names: &[String], lifetime: Duration) -> Result<Issued, CaError> {
        let ca_key = KeyPair::from_pem(&self.0.key_pem).map_err(CaError::CaKey)?;
        let issuer = Issuer::from_ca_cert_pem(&self.0.cert_pem, ca_key).map_err(CaError::CaCert)?;
        let key = KeyPair::generate().map_err(CaError::Key)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("valkey"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name
                    .as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|source| CaError::San {
                        name: name.clone(),
                        source,
                    }),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lifetime);
        let cert = params.signed_by(&key, &issuer).map_err(CaError::Sign)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Where a TLS-only process finds its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl TlsFiles {
    /// The files of a Kubernetes TLS Secret mounted at `dir` (`tls.crt`, `tls.key`, `ca.crt`),
    /// which is also the local runtime's layout.
    pub fn in_dir(dir: &str) -> Self {
        let dir = dir.trim_end_matches('/');
        Self {
            cert: format!("{dir}/tls.crt"),
            key: format!("{dir}/tls.key"),
            ca: format!("{dir}/ca.crt"),
        }
    }

    /// The config lines of a process serving TLS only on `port`: no plaintext port, TLS to its
    /// master (replicas) or to the nodes and peers it watches (sentinels, which follow
    /// `tls-replication` for every outgoing link). Clients are not asked for a certificate:
    /// they authenticate with the password, over a channel whose server they verified.
    pub fn config_lines(&self, port: u16) -> String {
        format!(
            "port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\n\
             tls-ca-cert-file {ca}\ntls-replication yes\ntls-auth-clients no\n",
            cert = crate::conf_text::quote(&self.cert),
            key = crate::conf_text::quote(&self.key),
            ca = crate::conf_text::quote(&self.ca),
        )
    }
}

/// The subject alternative names of a PEM certificate, as x509-parser prints them.
#[cfg(test)]
pub(crate) fn subject_alt_names(cert_pem: &str) -> Vec<String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .unwrap_or_else(|e| panic!("not a PEM certificate: {e}"));
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .unwrap_or_else(|e| panic!("not a certificate: {e}"));
    parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::time::SystemTime;

    #[test]
    fn an_issued_certificate_chains_to_the_ca_and_names_every_san() {
        let ca = Ca::generate("test CA", CA_LIFETIME).unwrap();
        let names = vec![
            "demo-0.demo-headless.ns.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let leaf = ca.issue(&names, Duration::from_secs(3600)).unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = subject_alt_names(&leaf.cert_pem);
        assert_eq!(
            sans,
            [
                "DNSName(demo-0.demo-headless.ns.svc)",
                "IPAddress(7f:00:00:01)"
            ]
        );
        let ca_der =
            rustls::pki_types::CertificateDer::from_pem_slice(ca.0.cert_pem.as_bytes()).unwrap();
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(parsed.issuer(), ca_parsed.subject());

        let validity = Validity::of_pem(leaf.cert_pem.as_bytes()).unwrap();
        assert!(!validity.renewal_due(SystemTime::now()));
        assert!(validity.renewal_due(SystemTime::now() + Duration::from_secs(2400)));
    }

    #[test]
    fn a_bad_name_is_refused_and_named() {
        let ca = Ca::generate("test CA", CA_LIFETIME).unwrap();
        let err = ca
            .issue(&["nöde.example".to_owned()], CERT_LIFETIME)
            .unwrap_err();
        assert!(err.to_string().contains("nöde.example"), "{err}");
    }
}
