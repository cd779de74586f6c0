//! The agent hub over TLS: a listener whose connections are TLS-terminated before tonic sees
//! them (plaintext never reaches the hub), with a certificate that can be replaced while it
//! serves, so that a renewal needs no restart.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use futures::Stream;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::debug;

use crate::tls::{Ca, Issued, Validity};
use valkey_netguard::{Acceptor, Gate, Guarded};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the server certificate does not parse: {0}")]
    Cert(String),
    #[error("the server key does not parse: {0}")]
    Key(String),
    #[error("issuing the server certificate: {0}")]
    Issue(#[from] crate::tls::CaError),
}

/// The certificate the hub serves (and when it is valid), replaceable at any time.
#[derive(Debug)]
pub struct ServerCert(RwLock<(Arc<CertifiedKey>, Option<Validity>)>);

fn certified(issued: &Issued) -> Result<Arc<CertifiedKey>, ServeError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| ServeError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(ServeError::Cert("no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| ServeError::Key(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| ServeError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

impl ServerCert {
    pub fn new(issued: &Issued) -> Result<Arc<Self>, ServeError> {
        let validity = Validity::of_pem(issued.cert_pem.as_bytes());
        Ok(Arc::new(Self(RwLock::new((certified(issued)?, validity)))))
    }

    /// Serves `issued` to every handshake from now on.
    pub fn replace(&self, issued: &Issued) -> Result<(), ServeError> {
        let key = certified(issued)?;
        let validity = Validity::of_pem(issued.cert_pem.as_bytes());
        if let Ok(mut current) = self.0.write() {
            *current = (key, validity);
        }
        Ok(())
    }

    /// Issues a new certificate for `names` from `ca` and serves it, when the one served is
    /// due for renewal (two thirds of its lifetime). True when it was renewed.
    pub fn renew_if_due(
        &self,
        ca: &Ca,
        names: &[String],
        lifetime: Duration,
    ) -> Result<bool, ServeError> {
        let due = self
            .0
            .read()
            .map(|current| current.1.is_none_or(|v| v.renewal_due(SystemTime::now())))
            .unwrap_or(true);
        if !due {
            return Ok(false);
        }
        self.replace(&ca.issue(names, lifetime)?)?;
        Ok(true)
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|current| current.0.clone())
    }
}

/// The TLS connections of `listener`, each admitted by `gate` first (a full hub closes new
/// connections before any handshake; see [`Acceptor`]). Each handshake runs on its own task,
/// bounded by a timeout, so a slow or plaintext client holds up nobody; failed handshakes are
/// dropped.
pub fn incoming(
    listener: TcpListener,
    cert: Arc<ServerCert>,
    gate: Arc<Gate>,
) -> impl Stream<Item = Result<Guarded<TlsStream<TcpStream>>, std::io::Error>> {
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        let mut admitted = Acceptor::new(listener, gate);
        loop {
            let (stream, peer, admission) = admitted.next().await;
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let handshake_end = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                let deadline = admission
                    .deadline()
                    .map_or(handshake_end, |d| d.min(handshake_end));
                let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
                tokio::select! {
                    done = handshake => match done {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(admission.guard(tls))).await;
                        }
                        Ok(Err(err)) => debug!(%peer, error = %err, "TLS handshake refused"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    },
                    () = admission.evicted() => {
                        debug!(%peer, "closed during its handshake for a newer connection")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::CA_LIFETIME;
    use futures::StreamExt;

    async fn handshake(addr: std::net::SocketAddr, trusted: &Ca) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(trusted.0.cert_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        connector
            .connect(name, tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn clients_trusting_the_ca_connect_and_others_are_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = Ca::generate("hub CA", CA_LIFETIME).unwrap();
        let other = Ca::generate("another CA", CA_LIFETIME).unwrap();
        let names = vec!["127.0.0.1".to_owned()];
        let cert = ServerCert::new(&ca.issue(&names, Duration::from_secs(3600)).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate::new(crate::hub::limits::Limits::default().gate());
        let mut accepted = Box::pin(incoming(listener, cert.clone(), gate));
        tokio::spawn(async move { while accepted.next().await.is_some() {} });

        handshake(addr, &ca).await.unwrap();
        let refused = handshake(addr, &other).await.unwrap_err();
        assert!(refused.contains("UnknownIssuer"), "{refused}");

        // A replaced certificate (from the other CA) is served from the next handshake on.
        cert.replace(&other.issue(&names, Duration::from_secs(3600)).unwrap())
            .unwrap();
        handshake(addr, &other).await.unwrap();
        assert!(handshake(addr, &ca).await.is_err());
    }
}
