//! The hub's TLS in a cluster: the controller's CA, kept in a Secret of its own namespace
//! (made by the first leader, read by every later one), and the hub's certificate issued from
//! it for the names agents dial, renewed in memory at two thirds of its lifetime.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tracing::{info, warn};

use crate::{
    hub::tls::ServerCert,
    tls::{CA_LIFETIME, CERT_LIFETIME, Ca, CaError, Issued},
};

/// The Secret holding the controller's CA (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "valkey-controller-ca";

#[derive(Debug, thiserror::Error)]
pub enum HubTlsError {
    #[error("reading or creating Secret {CA_SECRET}: {0}")]
    Api(#[source] kube::Error),
    #[error("Secret {CA_SECRET} has no usable ca.crt and ca.key")]
    Incomplete,
    #[error("the controller's CA: {0}")]
    Ca(#[from] CaError),
    #[error("the hub's certificate: {0}")]
    Serve(#[from] crate::hub::tls::ServeError),
}

fn field(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The controller's CA: read from its Secret, or made and stored there. Two leaders racing
/// to create it both end up with the one the API server kept.
pub async fn load_or_create_ca(client: &Client, namespace: &str) -> Result<Ca, HubTlsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(CA_SECRET).await.map_err(HubTlsError::Api)? {
            let (Some(cert_pem), Some(key_pem)) =
                (field(&secret, "ca.crt"), field(&secret, "ca.key"))
            else {
                return Err(HubTlsError::Incomplete);
            };
            return Ok(Ca(Issued { cert_pem, key_pem }));
        }
        let ca = Ca::generate("valkey-controller CA", CA_LIFETIME)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(namespace.into()),
                labels: Some(
                    [(
                        "app.kubernetes.io/name".to_owned(),
                        "valkey-controller".to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                [
                    (
                        "ca.crt".to_owned(),
                        ByteString(ca.0.cert_pem.clone().into_bytes()),
                    ),
                    (
                        "ca.key".to_owned(),
                        ByteString(ca.0.key_pem.clone().into_bytes()),
                    ),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = CA_SECRET, "created the controller's CA");
                return Ok(ca);
            }
            // Another replica made it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(err) => return Err(HubTlsError::Api(err)),
        }
    }
    Err(HubTlsError::Incomplete)
}

/// The names agents dial the hub by: the host of `agent_addr` (a Service's
/// `name.namespace.svc`), with its longer and shorter forms.
pub fn hub_names(agent_addr: &str) -> Vec<String> {
    let rest = agent_addr
        .split_once("://")
        .map_or(agent_addr, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = valkey_agent::config::split_host_port(authority)
        .map(|(host, _)| host)
        .unwrap_or_else(|| authority.to_owned());
    let mut names = vec![host.clone()];
    if let Some(service) = host.strip_suffix(".svc") {
        names.push(format!("{host}.cluster.local"));
        names.push(service.to_owned());
        if let Some((name, _)) = service.split_once('.') {
            names.push(name.to_owned());
        }
    }
    names
}

/// Issues the hub's certificate; then keeps renewing it while the controller runs.
pub fn serve_cert(ca: Arc<Ca>, agent_addr: &str) -> Result<Arc<ServerCert>, HubTlsError> {
    let mut names = hub_names(agent_addr);
    // The agents this process runs itself dial it on loopback.
    names.push("127.0.0.1".into());
    let cert = ServerCert::new(&ca.issue(&names, CERT_LIFETIME)?)?;
    let renewing = cert.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(600)).await;
            match renewing.renew_if_due(&ca, &names, CERT_LIFETIME) {
                Ok(true) => info!("renewed the hub's certificate"),
                Ok(false) => {}
                Err(err) => warn!(error = %err, "renewing the hub's certificate; retrying"),
            }
        }
    });
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_certificate_covers_every_form_of_the_service_name() {
        assert_eq!(
            hub_names("https://valkey-controller.valkey-system.svc:7070"),
            [
                "valkey-controller.valkey-system.svc",
                "valkey-controller.valkey-system.svc.cluster.local",
                "valkey-controller.valkey-system",
                "valkey-controller",
            ]
        );
        assert_eq!(hub_names("https://10.0.0.7:7070"), ["10.0.0.7"]);
    }
}
