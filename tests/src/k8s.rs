//! A Kubernetes stand-in for reconciler tests: kube-fake-client's in-memory API server behind
//! `kube::Api`, the controller's real agent hub on loopback (static token), and helpers to run
//! reconcile passes and read back objects and Events. Pods are created by the test, standing
//! in for the StatefulSet controller and the kubelet.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{core::v1::Pod, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
    runtime::{
        controller::Action,
        events::{Recorder, Reporter},
    },
};
use kube_fake_client::ClientBuilder;
use tokio_stream::wrappers::TcpListenerStream;
use valkey_controller::{
    crd::Failover,
    hub::{Hub, StaticToken},
    k8s::{
        LABEL_COMPONENT, LABEL_INSTANCE, Settings,
        reconcile::{Context, Error, reconcile},
    },
};

pub const TOKEN: &str = "t0ken";

#[allow(missing_debug_implementations)]
pub struct FakeCluster {
    pub client: Client,
    pub hub: Hub,
    /// Where agents reach the hub.
    pub hub_url: String,
    pub ctx: Arc<Context>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeCluster {
    /// An empty API server with the Failover CRD (and its status subresource) registered.
    pub async fn start() -> Self {
        Self::start_with(|builder| builder).await
    }

    /// The same, with objects already in it (`builder.with_object(...)`).
    pub async fn start_with(seed: impl FnOnce(ClientBuilder) -> ClientBuilder) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The controller's logs go to the test's output (shown when it fails).
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,valkey_controller=debug")
            .with_test_writer()
            .try_init();
        let builder = ClientBuilder::new()
            .with_resource::<Failover>()
            .with_status_subresource::<Failover>()
            .with_status_subresource::<k8s_openapi::api::apps::v1::StatefulSet>();
        let client = seed(builder).build().await.expect("fake API server");
        let (hub, _events) = Hub::new(StaticToken(TOKEN.into()), Duration::from_millis(500));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("hub listener");
        let hub_url = format!("http://{}", listener.local_addr().expect("addr"));
        let service = hub.server();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "valkey-operator".into(),
                instance: None,
            },
        );
        let mut ctx = Context::new(
            client.clone(),
            hub.clone(),
            Settings {
                controller_addr: hub_url.clone(),
                ..Settings::default()
            },
            recorder,
        );
        ctx.hang_timeout = Duration::from_secs(2);
        FakeCluster {
            client,
            hub,
            hub_url,
            ctx: Arc::new(ctx),
            server,
        }
    }

    pub fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    pub async fn create(&self, failover: &Failover) {
        let namespace = failover.metadata.namespace.as_deref().unwrap_or("default");
        self.api::<Failover>(namespace)
            .create(&PostParams::default(), failover)
            .await
            .expect("create the Failover");
    }

    pub async fn failover(&self, namespace: &str, name: &str) -> Failover {
        self.api::<Failover>(namespace)
            .get(name)
            .await
            .expect("get the Failover")
    }

    /// One reconcile pass on the Failover as the API server has it now.
    pub async fn reconcile(&self, namespace: &str, name: &str) -> Result<Action, Error> {
        let failover = self.failover(namespace, name).await;
        reconcile(Arc::new(failover), self.ctx.clone()).await
    }

    /// Reconcile passes (as the controller runs them on every report) until `check` holds.
    pub async fn reconcile_until(
        &self,
        namespace: &str,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Failover) -> bool,
    ) -> Failover {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Err(err) = self.reconcile(namespace, name).await {
                panic!("reconcile failed while waiting for {what}: {err}");
            }
            let failover = self.failover(namespace, name).await;
            if check(&failover) {
                return failover;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; status: {:#?}\nevents: {:#?}",
                    failover.status,
                    self.events(namespace).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Data pods `name-0..n` with the labels the StatefulSet gives them.
    pub async fn create_pods(&self, namespace: &str, name: &str, n: i32) {
        for ordinal in 0..n {
            self.create_pod(namespace, name, ordinal, "v1").await;
        }
    }

    /// One data pod, running template `revision` (as the StatefulSet controller would make it).
    pub async fn create_pod(&self, namespace: &str, name: &str, ordinal: i32, revision: &str) {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{ordinal}")),
                namespace: Some(namespace.into()),
                labels: Some(
                    [
                        (LABEL_INSTANCE.to_owned(), name.to_owned()),
                        (LABEL_COMPONENT.to_owned(), "data".to_owned()),
                        ("controller-revision-hash".to_owned(), revision.to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        self.api::<Pod>(namespace)
            .create(&PostParams::default(), &pod)
            .await
            .expect("create a pod");
    }

    /// Events recorded in a namespace: (type, reason, note).
    pub async fn events(&self, namespace: &str) -> Vec<(String, String, String)> {
        self.api::<Event>(namespace)
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }
}
