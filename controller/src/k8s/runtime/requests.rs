//! Counts every request this controller makes to the Kubernetes API server, by verb and
//! resource, on `/metrics` (`valkey_controller_kube_api_requests`): each one costs the user's
//! API server, and the steady state should cost next to nothing.

use std::{
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures::future::BoxFuture;
use http::{Request, Response};
use kube::{Client, client::Body};

use crate::k8s::runtime::metrics::Metrics;

/// A client that counts its requests in `metrics`, then sends them through `client`.
pub fn counting(client: Client, metrics: Arc<Metrics>) -> Client {
    let namespace = client.default_namespace().to_owned();
    Client::new(Counting { client, metrics }, namespace)
}

#[derive(Clone)]
struct Counting {
    client: Client,
    metrics: Arc<Metrics>,
}

impl tower::Service<Request<Body>> for Counting {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, kube::Error>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (verb, resource) = classify(
            request.method().as_str(),
            request.uri().path(),
            request.uri().query().unwrap_or_default(),
        );
        self.metrics.api_request(verb, resource);
        let client = self.client.clone();
        Box::pin(async move { client.send(request).await })
    }
}

/// The verb and resource of a request, from its method and path: `GET .../pods` is a list,
/// `GET .../pods/x` a get, `GET ...?watch=true` a watch; a subresource is kept
/// (`failovers/status`).
pub fn classify(method: &str, path: &str, query: &str) -> (&'static str, String) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/group/version/...
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [] => ("", false),
        [resource] => (*resource, false),
        [resource, _name] => (*resource, true),
        [resource, _name, sub, ..] => {
            return (verb(method, true, query), format!("{resource}/{sub}"));
        }
    };
    (verb(method, named, query), resource.to_owned())
}

fn verb(method: &str, named: bool, query: &str) -> &'static str {
    match method {
        "GET"
            if query
                .split('&')
                .any(|p| p == "watch=true" || p == "watch=1") =>
        {
            "watch"
        }
        "GET" if named => "get",
        "GET" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn requests_are_named_by_verb_and_resource() {
        let cases = [
            (
                "GET",
                "/api/v1/namespaces/ns/pods",
                "labelSelector=a",
                ("list", "pods"),
            ),
            ("GET", "/api/v1/namespaces/ns/pods/p-0", "", ("get", "pods")),
            (
                "GET",
                "/api/v1/pods",
                "watch=true&resourceVersion=1",
                ("watch", "pods"),
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/ns/statefulsets/s",
                "fieldManager=x",
                ("patch", "statefulsets"),
            ),
            (
                "PATCH",
                "/apis/valkey.buf.red/v1alpha1/namespaces/ns/failovers/f/status",
                "",
                ("patch", "failovers/status"),
            ),
            (
                "POST",
                "/api/v1/namespaces/ns/secrets",
                "",
                ("create", "secrets"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ns/pods/p-1",
                "",
                ("delete", "pods"),
            ),
            ("GET", "/api/v1/services", "", ("list", "services")),
        ];
        for (method, path, query, (verb, resource)) in cases {
            assert_eq!(
                classify(method, path, query),
                (verb, resource.to_owned()),
                "{method} {path}"
            );
        }
    }
}
