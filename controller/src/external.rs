//! Agents the controller runs itself, one for each sentinel of an external Sentinel set
//! (`sentinelReference`). That set is someone else's and runs no agents of ours; with these,
//! the hub and the Sentinel core see it as they see an embedded set, so failover, healing and
//! switchover work through it. Both runtimes use this: `local up`, and the Kubernetes
//! controller, where they log in to the hub with a token that never leaves the process
//! ([`InProcessToken`]).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tracing::warn;
use valkey_agent::config::ValkeyTls;
use valkey_proto::v1::Hello;

use crate::{
    crd::SentinelReference,
    hub::{AuthFuture, Authenticator, InstanceKey},
    tls::Validity,
};

/// One sentinel of the set, and the pod name its agent reports as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExternalNode {
    pub pod: String,
    pub host: String,
    pub port: u16,
}

/// The pod name the agent for the external set's `ordinal`-th sentinel reports as.
pub fn pod_name(instance: &str, ordinal: usize) -> String {
    format!("{instance}-external-sentinel-{ordinal}")
}

/// Whether `pod` names an external sentinel's agent of `instance`.
pub fn is_pod_of(instance: &str, pod: &str) -> bool {
    pod.strip_prefix(instance)
        .and_then(|rest| rest.strip_prefix("-external-sentinel-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The set's sentinels, in the order the reference lists them.
pub fn nodes(instance: &str, reference: &SentinelReference) -> Vec<ExternalNode> {
    reference
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| ExternalNode {
            pod: pod_name(instance, i),
            host: n.ip.clone(),
            // Validated: 1..=65535.
            port: u16::try_from(n.port).unwrap_or_default(),
        })
        .collect()
}

/// Everything the agents need.
#[derive(Debug, Clone)]
pub struct Setup {
    pub key: InstanceKey,
    pub nodes: Vec<ExternalNode>,
    /// `sentinelReference.auth.username`.
    pub username: Option<String>,
    /// The sentinels' password (`<file>.new` during a rotation), when they have one.
    pub sentinel_password_file: Option<PathBuf>,
    /// The instance's password: SENTINEL MONITOR's auth-pass is resolved from it.
    pub instance_password_file: PathBuf,
    /// `sentinelReference.auth.tlsSecret`, as files.
    pub tls: Option<ValkeyTls>,
    /// Where the hub listens (https).
    pub hub_addr: String,
    pub token: String,
    /// What the hub's certificate chains to.
    pub hub_ca_file: PathBuf,
    /// Each agent's dir is `<data_dir>/<pod>`.
    pub data_dir: PathBuf,
    pub probe_interval: Duration,
}

/// The running agents; dropping them stops them.
#[derive(Debug)]
pub struct Agents {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agents {
    pub fn start(setup: &Setup) -> Agents {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = setup
            .nodes
            .iter()
            .map(|node| {
                let config = agent_config(setup, node);
                let mut stopped = stopped.clone();
                let pod = node.pod.clone();
                tokio::spawn(async move {
                    // A dropped sender ends the wait too.
                    let shutdown = async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    };
                    if let Err(err) = valkey_agent::run(config, shutdown).await {
                        warn!(pod = %pod, error = %err, "the agent for an external sentinel stopped");
                    }
                })
            })
            .collect();
        Agents { stop, tasks }
    }

    /// Stops them and waits until they have, `within` at most each.
    pub async fn stop(self, within: Duration) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(within, task).await;
        }
    }
}

fn agent_config(setup: &Setup, node: &ExternalNode) -> valkey_agent::Config {
    valkey_agent::Config {
        mode: valkey_agent::config::Mode::Sentinel,
        valkey_host: node.host.clone(),
        valkey_port: node.port,
        valkey_username: setup.username.clone(),
        valkey_password: setup
            .sentinel_password_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|p| p.trim().to_owned()),
        valkey_password_file: setup.sentinel_password_file.clone(),
        instance_password_file: Some(setup.instance_password_file.clone()),
        valkey_tls: setup.tls.clone(),
        controller: Some(valkey_agent::config::ControllerConfig {
            addr: setup.hub_addr.clone(),
            token: valkey_agent::config::TokenSource::Inline(setup.token.clone()),
            reconnect_max: Duration::from_secs(1),
            ca_file: Some(setup.hub_ca_file.clone()),
        }),
        namespace: setup.key.namespace.clone(),
        failover: setup.key.name.clone(),
        pod_name: node.pod.clone(),
        announce_host: node.host.clone(),
        announce_port: node.port,
        data_dir: setup.data_dir.join(&node.pod),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        probe_interval: setup.probe_interval,
        probe_timeout: Duration::from_secs(1),
        heartbeat_interval: Duration::from_secs(1),
        // The set is the user's, possibly shared with other applications: its settings stay
        // as they are.
        sentinel_info_period: None,
        command_deadline: Duration::from_secs(10),
        shutdown_switchover_timeout: Duration::ZERO,
        stale_client_window: Duration::ZERO,
    }
}

/// How the agents reach the set over TLS, from a dir laid out as a TLS Secret: `ca.crt`
/// (required: what the sentinels' certificates must chain to) and, for a set that requires
/// client certificates, `tls.crt` and `tls.key`. The files are re-read at every new
/// connection, so a renewed Secret needs no restart. The error says what is wrong with which
/// file.
pub fn tls_from_dir(secret: &Path) -> Result<ValkeyTls, String> {
    let ca_file = secret.join("ca.crt");
    valkey_agent::tls::read_bundle(&ca_file).map_err(|e| e.to_string())?;
    let (cert, key) = (secret.join("tls.crt"), secret.join("tls.key"));
    let client = match (cert.exists(), key.exists()) {
        (false, false) => None,
        (true, true) => {
            let pem = std::fs::read(&cert).map_err(|e| format!("{}: {e}", cert.display()))?;
            Validity::of_pem(&pem)
                .ok_or_else(|| format!("{}: no PEM certificate in it", cert.display()))?;
            Some((cert, key))
        }
        (has_cert, _) => {
            let (there, missing) = if has_cert {
                (&cert, &key)
            } else {
                (&key, &cert)
            };
            return Err(format!(
                "{} without {} (a client certificate needs both)",
                there.display(),
                missing.display()
            ));
        }
    };
    Ok(ValkeyTls {
        ca_file,
        served: None,
        client,
    })
}

/// Accepts the controller's own agents (those for an external set's sentinels), which present
/// a random token that never leaves the process, for an external sentinel's pod name only;
/// every other agent is checked by `outer`.
pub struct InProcessToken<A> {
    token: Arc<String>,
    outer: A,
}

impl<A> std::fmt::Debug for InProcessToken<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcessToken(<redacted>)")
    }
}

impl<A: Authenticator> InProcessToken<A> {
    pub fn new(token: Arc<String>, outer: A) -> Self {
        InProcessToken { token, outer }
    }
}

/// Equal in time independent of where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl<A: Authenticator> Authenticator for InProcessToken<A> {
    fn check<'a>(&'a self, hello: &'a Hello) -> AuthFuture<'a> {
        if !same(&hello.token, &self.token) {
            return self.outer.check(hello);
        }
        let result = if is_pod_of(&hello.failover, &hello.pod_name) {
            Ok(())
        } else {
            Err(format!(
                "the in-process token is for external sentinels' agents, not {}/{}",
                hello.namespace, hello.pod_name
            ))
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::StaticToken;

    #[test]
    fn external_pod_names_are_recognised_exactly() {
        assert!(is_pod_of("demo", &pod_name("demo", 0)));
        assert!(is_pod_of("demo", "demo-external-sentinel-12"));
        assert!(!is_pod_of("demo", "demo-0"));
        assert!(!is_pod_of("demo", "demo-sentinel-0"));
        assert!(!is_pod_of("demo", "demo-external-sentinel-"));
        assert!(!is_pod_of("demo", "demo-external-sentinel-0x"));
        assert!(!is_pod_of("other", "demo-external-sentinel-0"));
    }

    #[tokio::test]
    async fn the_in_process_token_admits_external_sentinel_agents_only() {
        let auth = InProcessToken::new(
            Arc::new(crate::k8s::objects::data::generate_password()),
            StaticToken("outer".into()),
        );
        let hello = |token: &str, pod: &str| Hello {
            token: token.into(),
            namespace: "ns".into(),
            failover: "demo".into(),
            pod_name: pod.into(),
            ..Hello::default()
        };
        let inner = auth.token.to_string();
        assert!(
            auth.check(&hello(&inner, "demo-external-sentinel-1"))
                .await
                .is_ok()
        );
        // Not a data pod, not another instance's sentinel.
        assert!(auth.check(&hello(&inner, "demo-0")).await.is_err());
        // Everyone else goes to the outer check.
        assert!(auth.check(&hello("outer", "demo-0")).await.is_ok());
        assert!(
            auth.check(&hello("guess", "demo-external-sentinel-1"))
                .await
                .is_err()
        );
        assert_ne!(
            crate::k8s::objects::data::generate_password(),
            crate::k8s::objects::data::generate_password()
        );
    }
}
