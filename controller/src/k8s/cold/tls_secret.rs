//! The instance's TLS Secret when no cert-manager issuer is named: issued from the
//! controller's CA, and issued again when it is due (two thirds of its lifetime), when the
//! names it must cover changed, or when the CA changed. Agents hand the renewed files to
//! Valkey without a restart (Kubernetes updates mounted Secrets in place).

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tracing::info;

use crate::k8s::{Names, error::Error, objects::tls, runtime::context::Context};
use crate::{
    crd::Failover,
    tls::{CERT_LIFETIME, Validity},
};

/// Annotation on the issued Secret: a hash of the names its certificate covers.
pub const ANNOTATION_NAMES: &str = "valkey.buf.red/tls-names";

fn names_hash(names: &[String]) -> String {
    valkey_agent::passwords::sha256_hex(&names.join(","))[..16].to_owned()
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Whether `secret` still serves: issued by `ca_pem`, for `hash`'s names, not due.
fn still_good(secret: &Secret, ca_pem: &str, hash: &str) -> bool {
    let named = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_NAMES))
        .is_some_and(|h| h == hash);
    let same_ca = text(secret, "ca.crt").is_some_and(|ca| ca == ca_pem);
    let fresh = text(secret, "tls.crt")
        .and_then(|pem| Validity::of_pem(pem.as_bytes()))
        .is_some_and(|v| !v.renewal_due(std::time::SystemTime::now()));
    named && same_ca && fresh
}

/// A short hash of a certificate (PEM), to notice that it changed.
pub fn cert_hash(cert_pem: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(cert_pem)[..8])
}

/// The hash of `tls.crt` in the Secret `name`, if it exists and holds one.
pub async fn served_cert(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets.get_opt(name).await.map_err(|source| Error::Read {
        what: format!("Secret {name}"),
        source,
    })?;
    Ok(secret
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get("tls.crt"))
        .map(|pem| cert_hash(&pem.0)))
}

/// Makes sure the issued Secret exists and is fresh; the hash of the certificate it holds.
pub async fn ensure(ctx: &Context, failover: &Failover) -> Result<String, Error> {
    let names = Names::of(failover);
    let name = names.tls();
    let Some(ca) = &ctx.ca else {
        return Err(Error::Tls(
            "the controller has no CA to issue the instance's certificate from".into(),
        ));
    };
    let mut wanted = tls::dns_names(failover);
    wanted.extend(tls::IP_ADDRESSES.iter().map(|s| (*s).to_owned()));
    let hash = names_hash(&wanted);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let existing = secrets.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("Secret {name}"),
        source,
    })?;
    if let Some(secret) = existing
        .as_ref()
        .filter(|s| still_good(s, &ca.0.cert_pem, &hash))
    {
        return Ok(
            text(secret, "tls.crt").map_or_else(String::new, |pem| cert_hash(pem.as_bytes()))
        );
    }
    let issued = ca
        .issue(&wanted, CERT_LIFETIME)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut secret = tls::issued_secret(failover, &issued, &ca.0.cert_pem);
    secret
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(ANNOTATION_NAMES.into(), hash);
    crate::k8s::runtime::apply::apply(&ctx.client, &names.namespace, &secret)
        .await
        .map_err(|source| Error::Apply {
            kind: "Secret".into(),
            name: name.clone(),
            source,
        })?;
    info!(secret = %name, "issued the instance's TLS certificate");
    Ok(cert_hash(issued.cert_pem.as_bytes()))
}
