//! A Kubernetes stand-in for reconciler tests: kube-fake-client's in-memory API server behind
//! `kube::Api`, with a latency and faults that a test can inject per request ([`ApiFaults`]),
//! the controller's real agent hub on loopback (static token), and helpers to run reconcile
//! passes and read back objects and Events. Pods are created by the test, standing in for the
//! StatefulSet controller and the kubelet; a poller stands in for the pod watch (the fake has
//! no watches). The controller's client counts its requests; the test's own do not count.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use crate::procs::{Agent, AgentOpts, PASSWORD, Sentinel, Valkey};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Affinity, NodeAffinity, NodeSelector, ResourceRequirements},
    api::{
        core::v1::{Pod, Secret},
        events::v1::Event,
    },
    apimachinery::pkg::api::resource::Quantity,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
    runtime::{controller::Action, events::Reporter},
};
use kube_fake_client::ClientBuilder;
use valkey_controller::{
    crd::{
        Exporter, Failover, FailoverSpec, IpFamily, Phase, SentinelInstanceAccess,
        SentinelSettings, ServiceType, Storage, ValkeyModule,
    },
    hub::tls::ServerCert,
    hub::{Hub, StaticToken},
    k8s::{
        LABEL_COMPONENT, LABEL_INSTANCE, Settings, cold::reconcile, error::Error, hot,
        runtime::context::Context, runtime::requests,
    },
    tls::{CA_LIFETIME, Ca},
};

pub const TOKEN: &str = "t0ken";

/// Faults injected into the API server's answers: a latency on every request, and an error
/// for requests that match.
#[derive(Debug, Default)]
pub struct ApiFaults {
    delay: Mutex<Duration>,
    /// Requests answered with an error instead.
    failing: Mutex<Vec<Refusal>>,
}

#[derive(Debug, Clone)]
struct Refusal {
    method: String,
    path_part: String,
    code: u16,
    reason: String,
    message: String,
}

impl ApiFaults {
    pub fn set_delay(&self, delay: Duration) {
        if let Ok(mut d) = self.delay.lock() {
            *d = delay;
        }
    }

    /// Answers `method` requests whose path contains `path_part` with a 500 from now on.
    pub fn fail(&self, method: &str, path_part: &str) {
        self.refuse(method, path_part, 500, "InternalError", "injected fault");
    }

    /// Answers `method` requests whose path contains `path_part` with this error from now on
    /// (as the API server would for a request it will not carry out).
    pub fn refuse(&self, method: &str, path_part: &str, code: u16, reason: &str, message: &str) {
        if let Ok(mut f) = self.failing.lock() {
            f.push(Refusal {
                method: method.to_owned(),
                path_part: path_part.to_owned(),
                code,
                reason: reason.to_owned(),
                message: message.to_owned(),
            });
        }
    }

    pub fn heal(&self) {
        if let Ok(mut f) = self.failing.lock() {
            f.clear();
        }
    }

    fn refusal(&self, method: &str, path: &str) -> Option<Refusal> {
        self.failing.lock().ok().and_then(|f| {
            f.iter()
                .find(|r| r.method == method && path.contains(r.path_part.as_str()))
                .cloned()
        })
    }
}

/// The in-memory API server behind the faults.
#[derive(Clone)]
struct Interposed {
    client: Client,
    faults: Arc<ApiFaults>,
}

impl tower::Service<http::Request<kube::client::Body>> for Interposed {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, kube::Error>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let (client, faults) = (self.client.clone(), self.faults.clone());
        Box::pin(async move {
            let delay = faults.delay.lock().map(|d| *d).unwrap_or_default();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(refusal) = faults.refusal(request.method().as_str(), request.uri().path()) {
                let body = serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": refusal.message, "reason": refusal.reason, "code": refusal.code,
                });
                let mut response = http::Response::new(kube::client::Body::from(
                    serde_json::to_vec(&body).unwrap_or_default(),
                ));
                *response.status_mut() = http::StatusCode::from_u16(refusal.code)
                    .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                return Ok(response);
            }
            client.send(request).await
        })
    }
}

/// A client of `fake` through `faults`.
pub fn interposed(fake: Client, faults: Arc<ApiFaults>) -> Client {
    Client::new(
        Interposed {
            client: fake,
            faults,
        },
        "default",
    )
}

#[allow(missing_debug_implementations)]
pub struct FakeCluster {
    /// The test's own client (its requests are not counted, and see no faults).
    pub client: Client,
    /// Faults for the controller's requests.
    pub faults: Arc<ApiFaults>,
    pub hub: Hub,
    /// Where agents reach the hub (https://: it serves TLS, as in a cluster).
    pub hub_url: String,
    /// The controller's CA: it signed the hub's certificate.
    pub ca: valkey_controller::tls::Ca,
    pub ctx: Arc<Context>,
    /// Where each pod's Valkey listens on loopback: the pod watch's stand-in gives the pod
    /// IP 127.0.0.1 and declares this port, as a kubelet and a pod template would.
    pub valkey_ports: Arc<Mutex<BTreeMap<String, u16>>>,
    /// The controller's work dir.
    pub work: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
    pod_sync: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.server.abort();
        self.pod_sync.abort();
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
            .with_interceptor_funcs(
                kube_fake_client::interceptor::Funcs::new().patch(fixed_statefulset_fields),
            )
            .with_resource::<Failover>()
            .with_status_subresource::<Failover>()
            .with_status_subresource::<k8s_openapi::api::apps::v1::StatefulSet>();
        let client = seed(builder).build().await.expect("fake API server");
        let (hub, _events) = Hub::new(StaticToken(TOKEN.into()), Duration::from_millis(500));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("hub listener");
        let hub_url = format!("https://{}", listener.local_addr().expect("addr"));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = Ca::generate("test controller CA", CA_LIFETIME).expect("CA");
        let hub_cert =
            ServerCert::new(&ca.issue(&["127.0.0.1".into()], CA_LIFETIME).expect("issue"))
                .expect("hub certificate");
        let served = hub.clone();
        let server = tokio::spawn(async move {
            let _ = valkey_controller::hub::limits::serve(&served, listener, hub_cert).await;
        });
        let faults = Arc::new(ApiFaults::default());
        let work = tempfile::tempdir().expect("work dir");
        let metrics = Arc::new(valkey_controller::k8s::runtime::metrics::Metrics::default());
        let controller_client =
            requests::counting(interposed(client.clone(), faults.clone()), metrics.clone());
        let recorder = valkey_controller::k8s::runtime::events::Recorder::new(
            controller_client.clone(),
            Reporter {
                controller: "valkey-operator".into(),
                instance: None,
            },
        );
        let mut ctx = Context::new(
            controller_client,
            hub.clone(),
            Settings {
                controller_addr: hub_url.clone(),
                controller_ca: ca.0.cert_pem.clone(),
                work_dir: work.path().to_owned(),
                in_process_hub: hub_url.clone(),
                ..Settings::default()
            },
            recorder,
        );
        ctx.ca = Some(Arc::new(ca.clone()));
        // The hub's one token stands in for the in-process one too.
        ctx.in_process_token = Arc::new(TOKEN.into());
        ctx.hang_timeout = Duration::from_secs(2);
        ctx.metrics = metrics;
        let ctx = Arc::new(ctx);
        // The pod watch's stand-in.
        let valkey_ports: Arc<Mutex<BTreeMap<String, u16>>> = Arc::default();
        let pod_sync = {
            let (client, cache) = (client.clone(), ctx.pods.clone());
            let ports = valkey_ports.clone();
            tokio::spawn(async move {
                let pods: Api<Pod> = Api::all(client);
                loop {
                    if let Ok(list) = pods.list(&ListParams::default()).await {
                        let ports = ports.lock().map(|p| p.clone()).unwrap_or_default();
                        cache.replace(
                            None,
                            list.items
                                .into_iter()
                                .map(|p| on_loopback(p, &ports))
                                .collect(),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        FakeCluster {
            client,
            faults,
            hub,
            hub_url,
            ca,
            ctx,
            valkey_ports,
            work,
            server,
            pod_sync,
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

    /// One hot (failover) pass, as the hub's reports run it.
    pub async fn hot_pass(&self, namespace: &str, name: &str) -> Result<(), hot::HotError> {
        let key = valkey_controller::hub::InstanceKey {
            namespace: namespace.into(),
            name: name.into(),
        };
        match self.ctx.known(&key) {
            Some(instance) => hot::pass(&self.ctx, &instance).await,
            None => Ok(()),
        }
    }

    /// API requests the controller made so far, by verb and resource.
    pub fn requests(&self) -> std::collections::BTreeMap<(String, String), u64> {
        self.ctx
            .metrics
            .requests()
            .into_iter()
            .map(|(label, n)| ((label.verb.to_owned(), label.resource), n))
            .collect()
    }

    /// Writes (anything but get, list, watch) the controller made so far.
    pub fn writes(&self) -> u64 {
        writes(&self.requests())
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
            if let Err(err) = self.hot_pass(namespace, name).await {
                panic!("failover pass failed while waiting for {what}: {err}");
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

    /// Waits for an Event of this type and reason (the failover path records them without
    /// waiting); returns its note.
    pub async fn event(&self, namespace: &str, type_: &str, reason: &str) -> String {
        crate::wait_for(
            &format!("a {type_} Event {reason}"),
            Duration::from_secs(10),
            || async {
                self.events(namespace)
                    .await
                    .into_iter()
                    .find(|(t, r, _)| t == type_ && r == reason)
                    .map(|(_, _, note)| note)
            },
        )
        .await
    }

    /// Events recorded in a namespace: (type, reason, note).
    pub async fn events(&self, namespace: &str) -> Vec<(String, String, String)> {
        events_in(&self.api(namespace)).await
    }
}

/// The Events `api` lists: (type, reason, note).
pub async fn events_in(api: &Api<Event>) -> Vec<(String, String, String)> {
    api.list(&ListParams::default())
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

/// Pod name -> its `valkey.buf.red/role` label, for the pods `api` lists with `params`.
pub async fn role_labels(api: &Api<Pod>, params: &ListParams) -> BTreeMap<String, String> {
    use kube::ResourceExt;
    api.list(params)
        .await
        .expect("pods")
        .items
        .into_iter()
        .map(|p| {
            let role = p
                .labels()
                .get(valkey_controller::k8s::LABEL_ROLE)
                .cloned()
                .unwrap_or_default();
            (p.name_any(), role)
        })
        .collect()
}

/// Writes (anything but get, list and watch) among requests counted by (verb, resource).
pub fn writes(requests: &BTreeMap<(String, String), u64>) -> u64 {
    requests
        .iter()
        .filter(|((verb, _), _)| !matches!(verb.as_str(), "get" | "list" | "watch"))
        .map(|(_, n)| n)
        .sum()
}

/// What the API server answers an update of a StatefulSet field it keeps fixed.
pub const STATEFULSET_FORBIDDEN: &str = "spec: Forbidden: updates to statefulset spec for \
    fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', \
    'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden";

/// The API server's rule the fake lacks: an apply that would change a StatefulSet's selector,
/// service name, pod management policy or volume claim templates is refused (422).
fn fixed_statefulset_fields(
    ctx: kube_fake_client::interceptor::PatchContext,
) -> kube_fake_client::Result<Option<serde_json::Value>> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use serde_json::Value;
    if ctx.patch.get("kind").and_then(Value::as_str) != Some("StatefulSet") {
        return Ok(None);
    }
    let Ok(existing) = ctx.client.get::<StatefulSet>(ctx.namespace, ctx.name) else {
        return Ok(None);
    };
    let old = serde_json::to_value(existing.spec)?;
    // Absent, null and empty are the same value.
    let field = |spec: &Value, key: &str| match spec.get(key) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(a)) if a.is_empty() => Value::Null,
        Some(v) => v.clone(),
    };
    let new = ctx.patch.get("spec").cloned().unwrap_or(Value::Null);
    let changed = [
        "selector",
        "serviceName",
        "podManagementPolicy",
        "volumeClaimTemplates",
    ]
    .iter()
    .any(|key| field(&old, key) != field(&new, key));
    if changed {
        return Err(kube_fake_client::Error::ImmutableField {
            field: STATEFULSET_FORBIDDEN.into(),
        });
    }
    Ok(None)
}

// ---------------------------------------------------------------- shared fixtures

pub const NS: &str = "default";

pub fn failover(name: &str, spec: FailoverSpec) -> Failover {
    let mut failover = Failover::new(name, spec);
    failover.metadata.namespace = Some(NS.into());
    failover
}

pub fn three() -> FailoverSpec {
    FailoverSpec {
        replicas: 3,
        ..FailoverSpec::default()
    }
}

pub fn password_secret(name: &str, password: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        data: Some(
            [(
                "password".to_owned(),
                ByteString(password.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Secret::default()
    }
}

/// Three real Valkeys with agents reporting to the cluster's hub as pods demo-0..2.
#[derive(Debug)]
pub struct Nodes {
    pub valkeys: Vec<Valkey>,
    pub agents: Vec<Agent>,
}

/// The ordinal of a pod name (`demo-2` -> 2).
pub fn ordinal(pod: &str) -> usize {
    pod.rsplit('-')
        .next()
        .and_then(|i| i.parse().ok())
        .expect("ordinal")
}

impl Nodes {
    /// How many keys the Valkey of pod `demo-<i>` holds.
    pub async fn keys(&self, pod: &str) -> i64 {
        redis::cmd("DBSIZE")
            .query_async(&mut self.valkeys[ordinal(pod)].conn().await)
            .await
            .expect("DBSIZE")
    }

    /// `n` writes on the master pod (`demo-<i>`) that both replicas acknowledged: they are in
    /// sync and can take over.
    pub async fn acked_writes(&self, master: &str, n: usize) {
        let index = ordinal(master);
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        let mut conn = self.valkeys[index]
            .client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect");
        for i in 0..n {
            let _: () = redis::cmd("SET")
                .arg(format!("k{i}"))
                .arg(i)
                .query_async(&mut conn)
                .await
                .expect("SET");
        }
        let acked: i64 = redis::cmd("WAIT")
            .arg(2)
            .arg(5000)
            .query_async(&mut conn)
            .await
            .expect("WAIT");
        assert_eq!(acked, 2);
    }
}

/// A pod as the controller sees it once it runs here: IP 127.0.0.1, its Valkey container
/// declaring the port its Valkey listens on.
fn on_loopback(mut pod: Pod, ports: &BTreeMap<String, u16>) -> Pod {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, PodStatus};
    let Some(port) = pod.metadata.name.as_ref().and_then(|n| ports.get(n)) else {
        return pod;
    };
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.pod_ip = Some("127.0.0.1".into());
    // Its node is this machine too (a NodePort is reached on the node's IP).
    status.host_ip = Some("127.0.0.1".into());
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    if !spec.containers.iter().any(|c| c.name == "valkey") {
        spec.containers.push(Container {
            name: "valkey".into(),
            ..Container::default()
        });
    }
    for container in spec.containers.iter_mut().filter(|c| c.name == "valkey") {
        container.ports = Some(vec![ContainerPort {
            name: Some("valkey".into()),
            container_port: i32::from(*port),
            ..ContainerPort::default()
        }]);
    }
    pod
}

pub fn start_nodes(cluster: &FakeCluster) -> Nodes {
    let valkeys: Vec<Valkey> = (0..3)
        .map(|i| Valkey::start(&format!("demo-{i}")))
        .collect();
    if let Ok(mut ports) = cluster.valkey_ports.lock() {
        for (i, valkey) in valkeys.iter().enumerate() {
            ports.insert(format!("demo-{i}"), valkey.port);
        }
    }
    let agents = valkeys
        .iter()
        .map(|v| {
            let mut opts = AgentOpts::for_valkey(v, Some(cluster.hub_url.clone()));
            std::fs::write(opts.token_file.as_ref().expect("token file"), TOKEN).expect("token");
            let ca_file = v.dir.join("controller-ca.crt");
            std::fs::write(&ca_file, &cluster.ca.0.cert_pem).expect("controller CA");
            opts.extra = vec!["--controller-ca-file".into(), ca_file.display().to_string()];
            opts.failover = "demo".into();
            Agent::start(opts)
        })
        .collect();
    Nodes { valkeys, agents }
}

/// An embedded Sentinel set's pods as they run here: three real sentinels requiring
/// `password`, each with an agent reporting as `demo-sentinel-<i>`, reading its own password
/// from `<dir>/password` and the instance's from `<dir>/instance/password` (the two Secret
/// volumes, which [`FakeCluster::mount_secret`] keeps in sync).
#[derive(Debug)]
pub struct SentinelPods {
    pub sentinels: Vec<Sentinel>,
    pub agents: Vec<Agent>,
}

pub fn start_sentinel_pods(cluster: &FakeCluster, password: &str) -> SentinelPods {
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::with_password(password)).collect();
    let agents = sentinels
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let instance = s.dir.join("instance");
            std::fs::create_dir_all(&instance).expect("mkdir");
            std::fs::write(instance.join("password"), PASSWORD).expect("instance password");
            std::fs::write(s.dir.join("password"), password).expect("sentinel password");
            let token_file = s.dir.join("agent-token");
            std::fs::write(&token_file, TOKEN).expect("token");
            let ca_file = s.dir.join("controller-ca.crt");
            std::fs::write(&ca_file, &cluster.ca.0.cert_pem).expect("controller CA");
            Agent::start(AgentOpts {
                sentinel: true,
                valkey_port: s.port,
                password_file: Some(s.dir.join("password")),
                controller: Some(cluster.hub_url.clone()),
                token_file: Some(token_file),
                data_dir: s.dir.join("agent"),
                failover: "demo".into(),
                pod: format!("demo-sentinel-{i}"),
                probe_interval_ms: 50,
                heartbeat_interval_ms: 500,
                extra: vec![
                    "--instance-password-file".into(),
                    instance.join("password").display().to_string(),
                    "--controller-ca-file".into(),
                    ca_file.display().to_string(),
                ],
            })
        })
        .collect();
    SentinelPods { sentinels, agents }
}

impl FakeCluster {
    /// The Pod objects of `demo`'s embedded sentinels as the StatefulSet would make them, on
    /// this machine (pod and node IP 127.0.0.1).
    pub async fn create_sentinel_pods(&self, pods: &SentinelPods) {
        for (i, sentinel) in pods.sentinels.iter().enumerate() {
            let name = format!("demo-sentinel-{i}");
            if let Ok(mut ports) = self.valkey_ports.lock() {
                ports.insert(name.clone(), sentinel.port);
            }
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(NS.into()),
                    labels: Some(
                        [
                            (LABEL_INSTANCE.to_owned(), "demo".to_owned()),
                            (LABEL_COMPONENT.to_owned(), "sentinel".to_owned()),
                        ]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                ..Pod::default()
            };
            self.api::<Pod>(NS)
                .create(&PostParams::default(), &pod)
                .await
                .expect("create a sentinel pod");
        }
    }
}

/// An empty cluster with `demo`'s password Secret (the password the test Valkeys use).
pub async fn with_demo_password() -> FakeCluster {
    let cluster = FakeCluster::start().await;
    cluster
        .api::<Secret>(NS)
        .create(
            &PostParams::default(),
            &password_secret("demo-password", PASSWORD),
        )
        .await
        .expect("secret");
    cluster
}

/// Failover `demo` (with a password Secret the Valkeys use), its three pods, and three real
/// Valkeys with agents reporting to the cluster's hub.
pub async fn three_running_nodes() -> (FakeCluster, Nodes) {
    let cluster = with_demo_password().await;
    cluster.create(&failover("demo", three())).await;
    cluster.create_pods(NS, "demo", 3).await;
    let nodes = start_nodes(&cluster);
    (cluster, nodes)
}

pub fn ready(f: &Failover) -> bool {
    f.status.as_ref().is_some_and(|s| s.phase == Phase::Ready)
}

/// The kubelet's stand-in for a Secret mounted whole into each pod: every `period` of its pod,
/// the Secret's keys are written as files into `dir` (keys gone are removed), as the kubelet's
/// periodic sync does; a long period is a pod whose kubelet lags. Stops when dropped.
#[derive(Debug)]
pub struct SecretMount(Vec<tokio::task::JoinHandle<()>>);

impl Drop for SecretMount {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl FakeCluster {
    pub fn mount_secret(
        &self,
        secret: &str,
        pods: Vec<(std::path::PathBuf, Duration)>,
    ) -> SecretMount {
        let tasks = pods
            .into_iter()
            .map(|(dir, period)| {
                let api: Api<Secret> = self.api(NS);
                let secret = secret.to_owned();
                tokio::spawn(async move {
                    let mut written: Vec<String> = Vec::new();
                    loop {
                        if let Ok(found) = api.get(&secret).await {
                            let mut keys: BTreeMap<String, Vec<u8>> = found
                                .string_data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.into_bytes()))
                                .collect();
                            for (k, v) in found.data.unwrap_or_default() {
                                keys.insert(k, v.0);
                            }
                            for gone in written.iter().filter(|k| !keys.contains_key(*k)) {
                                let _ = std::fs::remove_file(dir.join(gone));
                            }
                            for (key, value) in &keys {
                                let path = dir.join(key);
                                if std::fs::read(&path).ok().as_ref() != Some(value) {
                                    let tmp = dir.join(format!(".{key}.tmp"));
                                    std::fs::write(&tmp, value).expect("write");
                                    std::fs::rename(&tmp, &path).expect("rename");
                                }
                            }
                            written = keys.into_keys().collect();
                        }
                        tokio::time::sleep(period).await;
                    }
                })
            })
            .collect();
        SecretMount(tasks)
    }
}

/// NodePorts on this machine: a forwarder per address (standing in for kube-proxy), and the
/// `serviceType: NodePort` access whose pool is their ports, in order.
pub async fn node_ports(
    addrs: impl IntoIterator<Item = String>,
) -> (
    Vec<crate::proxy::RoleProxy>,
    valkey_controller::crd::InstanceAccess,
) {
    let mut forwarders = Vec::new();
    for addr in addrs {
        forwarders.push(
            crate::proxy::RoleProxy::start(move || std::future::ready(Some(addr.clone()))).await,
        );
    }
    let pool: Vec<String> = forwarders.iter().map(|p| p.port.to_string()).collect();
    let access = valkey_controller::crd::InstanceAccess {
        service_type: valkey_controller::crd::ServiceType::NodePort,
        ports: Some(pool.join(",")),
        ..Default::default()
    };
    (forwarders, access)
}

/// `demo`'s spec for three nodes and an embedded Sentinel set reached through `access`, whose
/// own password is the Secret `sentinel-pw`, created here holding `password`.
pub async fn embedded_sentinels_with_password(
    cluster: &FakeCluster,
    password: &str,
    access: valkey_controller::crd::InstanceAccess,
) -> FailoverSpec {
    cluster
        .api::<Secret>(NS)
        .create(
            &PostParams::default(),
            &password_secret("sentinel-pw", password),
        )
        .await
        .expect("the sentinels' password Secret");
    FailoverSpec {
        sentinel: Some(valkey_controller::crd::SentinelSettings {
            access: Some(valkey_controller::crd::SentinelInstanceAccess {
                access,
                default_password_secret: Some("sentinel-pw".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..three()
    }
}

/// An example of `deploy/examples/`, as a Failover (with a uid, as the API server gives it).
pub fn example(file: &str) -> Failover {
    let text = std::fs::read_to_string(crate::apiserver::repo().join("deploy/examples").join(file))
        .expect(file);
    let mut failover: Failover = serde_yaml::from_str(&text).expect(file);
    failover.metadata.uid = Some("0b5e8c1e-0000-4000-8000-000000000001".into());
    failover
}

/// A spec that uses every option the builders read.
pub fn everything() -> Failover {
    let memory = |q: &str| [("memory".to_owned(), Quantity(q.into()))].into();
    let mut spec = FailoverSpec {
        replicas: 3,
        resources: Some(ResourceRequirements {
            requests: Some(memory("512Mi")),
            limits: Some(memory("1Gi")),
            ..Default::default()
        }),
        storage: Some(Storage {
            storage_class_name: Some("fast".into()),
            annotations: [("backup".to_owned(), "daily".to_owned())].into(),
            ..Storage::default()
        }),
        exporter: Some(Exporter::default()),
        modules: vec![ValkeyModule {
            path: "valkey-json".into(),
            args: vec![],
        }],
        affinity: Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![Default::default()],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        pod_annotations: [("team".to_owned(), "cache".to_owned())].into(),
        node_selector: [("disk".to_owned(), "ssd".to_owned())].into(),
        sentinel: Some(SentinelSettings {
            replicas: Some(5),
            access: Some(SentinelInstanceAccess {
                default_password_secret: Some("sentinel-pw".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..FailoverSpec::default()
    };
    spec.access.service_type = ServiceType::NodePort;
    spec.access.ports = Some("31000-31002".into());
    spec.access.ip_family_prefer = Some(IpFamily::IPv6);
    spec.access.annotations = [("lb".to_owned(), "internal".to_owned())].into();
    spec.access.enable_tls = true;
    spec.access.cert_issuer = Some("letsencrypt".into());
    spec.custom_configs
        .insert("maxmemory-policy".into(), "allkeys-lru".into());
    let mut failover = Failover::new("everything", spec);
    failover.metadata.namespace = Some("prod".into());
    failover.metadata.uid = Some("0b5e8c1e-0000-4000-8000-000000000002".into());
    failover
}
