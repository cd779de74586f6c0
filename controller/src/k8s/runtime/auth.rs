//! Agent authentication in a cluster: the agent presents its projected service-account token
//! (audience `valkey-controller`); the controller asks the API server who it is (TokenReview)
//! and accepts it only for a pod of the Failover the agent names, in that pod's namespace.
//! Anything else is refused and counted. An accepted review is reused until the token expires.
//! A token whose pod the pod watch saw deleted is refused at once, by the reuse and even when
//! the API server, which caches its own checks for a few seconds, still passes it.

use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};
use valkey_proto::v1::Hello;

use crate::hub::{AuthFuture, Authenticator};
use crate::k8s::{TOKEN_AUDIENCE, runtime::metrics::Metrics, runtime::token_cache::TokenCache};

/// The TokenReview extra field that names the pod a projected token was issued for.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// ... and that pod's uid.
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

#[derive(Clone)]
pub struct TokenReviewAuth {
    client: Client,
    metrics: Arc<Metrics>,
    /// Accepted reviews, reused until their token expires.
    cache: Arc<TokenCache>,
    /// The pods the pod watch sees, and the ones it saw deleted.
    pods: crate::k8s::runtime::context::PodCache,
}

impl std::fmt::Debug for TokenReviewAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuth").finish_non_exhaustive()
    }
}

impl TokenReviewAuth {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        pods: crate::k8s::runtime::context::PodCache,
    ) -> Self {
        TokenReviewAuth {
            client,
            metrics,
            cache: Arc::default(),
            pods,
        }
    }

    async fn review(&self, hello: &Hello) -> Result<(), String> {
        let now = std::time::SystemTime::now();
        // The cached review is checked against this Hello like a fresh one: a token reused by
        // another pod, or for another Failover, is refused all the same.
        if let Some(status) = self.cache.get(&hello.token, now) {
            if !bound_pod_deleted(&self.pods, &status) {
                return verify(hello, Some(&status));
            }
            self.cache.forget(&hello.token);
            return Err(deleted_pod(hello));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(hello.token.clone()),
                audiences: Some(vec![TOKEN_AUDIENCE.into()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        verify(hello, reviewed.status.as_ref())?;
        // The API server caches its own token checks for a few seconds: a token whose pod
        // this controller already saw deleted is refused even if it still passes there.
        if reviewed
            .status
            .as_ref()
            .is_some_and(|status| bound_pod_deleted(&self.pods, status))
        {
            return Err(deleted_pod(hello));
        }
        if let Some(status) = reviewed.status {
            self.cache.put(&hello.token, status, now);
        }
        Ok(())
    }
}

/// Whether a reviewed token belongs to a pod of the Failover the hello names.
pub fn verify(hello: &Hello, status: Option<&TokenReviewStatus>) -> Result<(), String> {
    let who = format!("{}/{}", hello.namespace, hello.pod_name);
    let status = status.ok_or_else(|| format!("{who}: the TokenReview has no status"))?;
    if status.authenticated != Some(true) {
        return Err(format!(
            "{who}: token not authenticated: {}",
            status.error.as_deref().unwrap_or("no reason given")
        ));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == TOKEN_AUDIENCE))
    {
        return Err(format!("{who}: token not issued for {TOKEN_AUDIENCE}"));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| format!("{who}: no user"))?;
    let namespace = user
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix("system:serviceaccount:"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(ns, _)| ns);
    if namespace != Some(hello.namespace.as_str()) {
        return Err(format!(
            "{who}: token of {:?}, not of a service account in namespace {}",
            user.username, hello.namespace
        ));
    }
    let pod = user
        .extra
        .as_ref()
        .and_then(|e| e.get(POD_NAME_EXTRA))
        .and_then(|v| v.first());
    if pod != Some(&hello.pod_name) {
        return Err(format!("{who}: token of pod {pod:?}"));
    }
    if !belongs(&hello.failover, &hello.pod_name) {
        return Err(format!(
            "{who}: pod is not a pod of Failover {}",
            hello.failover
        ));
    }
    Ok(())
}

/// Whether the pod a reviewed token was bound to (by uid) was seen deleted.
fn bound_pod_deleted(
    pods: &crate::k8s::runtime::context::PodCache,
    status: &TokenReviewStatus,
) -> bool {
    status
        .user
        .as_ref()
        .and_then(|u| u.extra.as_ref())
        .and_then(|e| e.get(POD_UID_EXTRA))
        .and_then(|v| v.first())
        .is_some_and(|uid| pods.was_deleted(uid))
}

fn deleted_pod(hello: &Hello) -> String {
    format!(
        "{}/{}: the pod this token was bound to was deleted",
        hello.namespace, hello.pod_name
    )
}

/// Pods of Failover `f` are `f-N` (data) and `f-sentinel-N`.
fn belongs(failover: &str, pod: &str) -> bool {
    let Some(rest) = pod.strip_prefix(failover).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let ordinal = rest.strip_prefix("sentinel-").unwrap_or(rest);
    !failover.is_empty() && !ordinal.is_empty() && ordinal.chars().all(|c| c.is_ascii_digit())
}

impl Authenticator for TokenReviewAuth {
    fn check<'a>(&'a self, hello: &'a Hello) -> AuthFuture<'a> {
        Box::pin(async move {
            let result = self.review(hello).await;
            if result.is_err() {
                self.metrics.refused_agents.inc();
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn hello(failover: &str, pod: &str) -> Hello {
        Hello {
            namespace: "prod".into(),
            failover: failover.into(),
            pod_name: pod.into(),
            ..Hello::default()
        }
    }

    fn reviewed(namespace: &str, pod: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![TOKEN_AUDIENCE.into()]),
            user: Some(UserInfo {
                username: Some(format!("system:serviceaccount:{namespace}:default")),
                extra: Some([(POD_NAME_EXTRA.to_owned(), vec![pod.to_owned()])].into()),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn only_a_pod_of_the_named_failover_in_its_namespace_is_accepted() {
        assert_eq!(
            verify(&hello("demo", "demo-1"), Some(&reviewed("prod", "demo-1"))),
            Ok(())
        );
        assert_eq!(
            verify(
                &hello("demo", "demo-sentinel-2"),
                Some(&reviewed("prod", "demo-sentinel-2"))
            ),
            Ok(())
        );
        let refused = [
            (hello("demo", "demo-1"), reviewed("dev", "demo-1")),
            (hello("demo", "demo-1"), reviewed("prod", "demo-2")),
            (hello("demo", "other-1"), reviewed("prod", "other-1")),
            (hello("demo", "demo-x"), reviewed("prod", "demo-x")),
            (
                hello("demo", "demo-1"),
                TokenReviewStatus {
                    authenticated: Some(false),
                    ..reviewed("prod", "demo-1")
                },
            ),
            (
                hello("demo", "demo-1"),
                TokenReviewStatus {
                    audiences: Some(vec!["api".into()]),
                    ..reviewed("prod", "demo-1")
                },
            ),
        ];
        for (hello, status) in refused {
            assert!(verify(&hello, Some(&status)).is_err(), "{hello:?} accepted");
        }
        assert!(verify(&hello("demo", "demo-1"), None).is_err());
    }
}
