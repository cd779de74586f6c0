//! The local runtime's agents share one token, a file in its working dir. It admits only the
//! agents of the pods this runtime runs, for its own instance: a client that read the token
//! cannot make the hub keep pods that do not exist (2,000 made-up pods once took it from 17 to
//! 122 MB, never freed).

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
};

use valkey_proto::v1::Hello;

use crate::hub::{AuthFuture, Authenticator, InstanceKey};

/// The pods whose agents may attach: the runtime's nodes (those retiring included) and the
/// agents it runs for an external Sentinel set.
#[derive(Debug, Clone, Default)]
pub(super) struct Pods(Arc<RwLock<BTreeSet<String>>>);

impl Pods {
    pub(super) fn set(&self, pods: impl IntoIterator<Item = String>) {
        if let Ok(mut current) = self.0.write() {
            *current = pods.into_iter().collect();
        }
    }

    fn contains(&self, pod: &str) -> bool {
        self.0.read().is_ok_and(|p| p.contains(pod))
    }
}

/// The token, for the runtime's own pods only.
pub(super) struct LocalAuth {
    token: String,
    key: InstanceKey,
    pods: Pods,
}

impl std::fmt::Debug for LocalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAuth")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl LocalAuth {
    pub(super) fn new(token: String, key: InstanceKey, pods: Pods) -> Self {
        Self { token, key, pods }
    }

    fn admit(&self, hello: &Hello) -> Result<(), String> {
        if !crate::external::same(&hello.token, &self.token) {
            return Err("wrong token".into());
        }
        if hello.namespace != self.key.namespace || hello.failover != self.key.name {
            return Err("the token is for another instance".into());
        }
        if !self.pods.contains(&hello.pod_name) {
            return Err("no such pod runs here".into());
        }
        Ok(())
    }
}

impl Authenticator for LocalAuth {
    fn check<'a>(&'a self, hello: &'a Hello) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.admit(hello)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_runtimes_own_pods_of_its_instance_with_the_token_are_admitted() {
        let key = InstanceKey {
            namespace: "default".into(),
            name: "demo".into(),
        };
        let pods = Pods::default();
        pods.set(["demo-0".to_owned(), "demo-1".to_owned()]);
        let auth = LocalAuth::new("t0ken".into(), key, pods.clone());
        let hello = |ns: &str, failover: &str, pod: &str, token: &str| Hello {
            namespace: ns.into(),
            failover: failover.into(),
            pod_name: pod.into(),
            token: token.into(),
            ..Hello::default()
        };
        assert!(
            auth.admit(&hello("default", "demo", "demo-0", "t0ken"))
                .is_ok()
        );
        assert!(
            auth.admit(&hello("default", "demo", "demo-0", "guess"))
                .is_err()
        );
        assert!(
            auth.admit(&hello("default", "demo", "demo-7", "t0ken"))
                .is_err()
        );
        assert!(
            auth.admit(&hello("default", "other", "demo-0", "t0ken"))
                .is_err()
        );
        assert!(
            auth.admit(&hello("prod", "demo", "demo-0", "t0ken"))
                .is_err()
        );
        // Scaled away: no longer admitted.
        pods.set(["demo-0".to_owned()]);
        assert!(
            auth.admit(&hello("default", "demo", "demo-1", "t0ken"))
                .is_err()
        );
    }
}
