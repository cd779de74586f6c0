//! A test's cluster on the real control plane ([`crate::apiserver`]): a namespace of its own,
//! the controller (the real `valkey-controller run` binary) on its own service account with the
//! RBAC the install renders, and the stand-in for the StatefulSet controller and the kubelet
//! ([`Kubelet`]) that runs the pods.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use valkey_controller::{
    crd::Failover,
    k8s::{LABEL_COMPONENT, LABEL_INSTANCE, LABEL_ROLE},
};

use crate::{
    apiserver::{self, ControlPlane},
    free_port,
    procs::{PASSWORD, Proc},
};

pub use crate::kubelet::{Kubelet, RunningPod, pod_from_template};

/// Which install's RBAC the controller runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// `deploy/`: the ClusterRole, bound to the controller's account in the test namespace.
    ClusterWide,
    /// `deploy/namespaced/`: a Role in the test namespace, and a ClusterRole for TokenReviews.
    Namespaced,
    /// `deploy/multi-namespace/`: the namespaced install, and its Role in two more namespaces
    /// (`<test namespace>-apps` and `-batch`, made here), which the controller also watches.
    MultiNamespace,
}

impl Install {
    /// The namespaces the controller manages beside its own, for a test namespace `ns`.
    pub fn managed(self, ns: &str) -> Vec<String> {
        match self {
            Install::MultiNamespace => vec![format!("{ns}-apps"), format!("{ns}-batch")],
            _ => Vec::new(),
        }
    }
}

/// One test's view of the control plane.
#[allow(missing_debug_implementations)]
pub struct Cluster {
    pub plane: ControlPlane,
    /// The harness's admin client (its requests are not the controller's).
    pub admin: Client,
    /// The test's namespace: the Failovers, the controller's Lease and CA, and the pods.
    pub ns: String,
    /// The controller processes (the first one leads unless a test says otherwise).
    pub controllers: Vec<ControllerProc>,
    pub kubelet: Kubelet,
    /// Where the agents reach the leading controller's hub: a proxy that follows the Lease, as
    /// the controller's Service follows the leader label.
    pub hub: crate::proxy::RoleProxy,
    /// Each controller process's hub address, by its Lease identity.
    hubs: Arc<Mutex<BTreeMap<String, String>>>,
    /// The namespaces the controller watches (the test namespace first).
    pub watched: Vec<String>,
    work: tempfile::TempDir,
}

impl Cluster {
    /// A namespace labelled `labels`, the controller's RBAC from `install` in it, and no
    /// controller yet ([`Cluster::start_controller`]).
    pub async fn new(install: Install, labels: &[(&str, &str)]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let plane = ControlPlane::get();
        let admin = plane.admin().await;
        let ns = apiserver::test_namespace(&admin, "t", labels).await;
        let work = tempfile::Builder::new()
            .prefix("cluster-")
            .tempdir()
            .expect("temp dir");
        for managed in install.managed(&ns) {
            apiserver::create_namespace(&admin, &managed, labels).await;
        }
        let rbac = rbac_for(&plane, install, &ns);
        plane
            .kubectl_with_input(&["apply", "-f", "-"], Some(&rbac))
            .unwrap_or_else(|e| panic!("the install's RBAC, in {ns}, was refused: {e}"));
        let hubs: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(admin.clone(), &ns);
        let routes = hubs.clone();
        let hub = crate::proxy::RoleProxy::follow(
            move || {
                let (leases, hubs) = (leases.clone(), routes.clone());
                async move {
                    let lease = leases.get_opt("valkey-controller").await.ok()??;
                    let holder = lease.spec?.holder_identity?;
                    hubs.lock().ok()?.get(&holder).cloned()
                }
            },
            Duration::from_millis(200),
        )
        .await;
        let kubelet = Kubelet::start(&admin, &ns, format!("https://127.0.0.1:{}", hub.port));
        Cluster {
            plane,
            admin,
            controllers: Vec::new(),
            kubelet,
            hub,
            hubs,
            watched: std::iter::once(ns.clone())
                .chain(install.managed(&ns))
                .collect(),
            ns,
            work,
        }
    }

    /// A cluster-wide install's namespace with a controller running.
    pub async fn start() -> Self {
        Self::start_with(Install::ClusterWide, &[]).await
    }

    pub async fn start_with(install: Install, labels: &[(&str, &str)]) -> Self {
        let mut cluster = Self::new(install, labels).await;
        cluster.start_controller("controller-0").await;
        cluster
    }

    /// Starts a controller process named `pod` (its Lease identity) on the controller account's
    /// token, watching the test namespace (as every test shares the control plane).
    pub async fn start_controller(&mut self, pod: &str) {
        let account_ns = &self.ns;
        let token = apiserver::request_token(
            &self.admin,
            account_ns,
            apiserver::CONTROLLER_ACCOUNT,
            None,
            None,
        )
        .await;
        let dir = self.work.path().join(pod);
        std::fs::create_dir_all(&dir).expect("controller dir");
        let kubeconfig = dir.join("kubeconfig");
        self.plane.kubeconfig_with_token(&token, &kubeconfig);
        let hub_port = free_port();
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(crate::local::bin("valkey-controller"));
        cmd.env_clear()
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("CLUSTER_LOG")
                    .unwrap_or_else(|_| "info,valkey_controller=debug".into()),
            )
            .args(["run", "--hub-listen"])
            .arg(format!("127.0.0.1:{hub_port}"))
            .arg("--http-listen")
            .arg(http.to_string())
            .arg("--agent-controller-addr")
            .arg(format!("https://127.0.0.1:{}", self.hub.port))
            .args(["--pod-name", pod, "--pod-namespace", &self.ns])
            .arg("--watch-namespace")
            .arg(self.watched.join(","))
            .args(["--hang-timeout-ms", "2000"])
            .arg("--work-dir")
            .arg(dir.join("work"));
        let proc = Proc::spawn(
            &format!("valkey-controller {pod}"),
            &mut cmd,
            &dir.join("controller.log"),
        );
        self.hubs
            .lock()
            .expect("hubs")
            .insert(pod.to_owned(), format!("127.0.0.1:{hub_port}"));
        self.controllers.push(ControllerProc {
            pod: pod.to_owned(),
            http,
            proc,
        });
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// Creates the Failover in the test namespace.
    pub async fn create(&self, mut failover: Failover) {
        failover.metadata.namespace = Some(self.ns.clone());
        self.api::<Failover>()
            .create(&PostParams::default(), &failover)
            .await
            .unwrap_or_else(|e| panic!("create the Failover: {e}"));
    }

    /// The password Secret `<name>-password` holding the test Valkeys' password, so that the
    /// controller adopts it instead of generating one.
    pub async fn with_password(&self, name: &str) {
        let mut secret = crate::k8s::password_secret(&format!("{name}-password"), PASSWORD);
        secret.metadata.namespace = Some(self.ns.clone());
        self.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .unwrap_or_else(|e| panic!("create the password Secret: {e}"));
    }

    pub async fn failover(&self, name: &str) -> Failover {
        self.api::<Failover>()
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get Failover {name}: {e}"))
    }

    /// Waits until the Failover satisfies `check`; panics with its status and the Events.
    pub async fn wait(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Failover) -> bool,
    ) -> Failover {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let failover = self.failover(name).await;
            if check(&failover) {
                return failover;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; status: {:#?}\nevents: {:#?}",
                    failover.status,
                    self.events().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Events of the test namespace: (type, reason, note).
    pub async fn events(&self) -> Vec<(String, String, String)> {
        crate::k8s::events_in(&self.api()).await
    }

    /// Sets an annotation of Failover `name` (as a user would, with a merge patch).
    pub async fn annotate(&self, name: &str, key: &str, value: &str) {
        let patch = serde_json::json!({ "metadata": { "annotations": { key: value } } });
        self.api::<Failover>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("annotate Failover {name}: {e}"));
    }

    /// The leading controller's API requests so far, by (verb, resource), from its /metrics.
    pub async fn requests(&self, controller: usize) -> BTreeMap<(String, String), u64> {
        let text = crate::http_get(self.controllers[controller].http, "/metrics")
            .await
            .expect("controller /metrics");
        parse_requests(&text)
    }

    /// Pod name -> its `valkey.buf.red/role` label, for the data pods of Failover `name`.
    pub async fn role_labels(&self, name: &str) -> BTreeMap<String, String> {
        let selector = format!("{LABEL_INSTANCE}={name},{LABEL_COMPONENT}=data");
        crate::k8s::role_labels(&self.api(), &ListParams::default().labels(&selector)).await
    }

    /// A client that writes through the read-write Service, as an application does: each
    /// (re)connect goes to the pod labelled `role=master`.
    pub fn writer(&self, name: &str, wait_replicas: i64) -> crate::local::Writer {
        let pods: Api<Pod> = self.api();
        let running = self.kubelet.pods.clone();
        let selector = format!("{LABEL_INSTANCE}={name},{LABEL_ROLE}=master");
        crate::local::Writer::following(
            move || {
                let (pods, running, selector) = (pods.clone(), running.clone(), selector.clone());
                async move {
                    let listed = pods
                        .list(&ListParams::default().labels(&selector))
                        .await
                        .ok()?;
                    let [pod] = listed.items.as_slice() else {
                        return None;
                    };
                    let port = running
                        .lock()
                        .ok()?
                        .get(&pod.name_any())?
                        .valkey
                        .as_ref()?
                        .port;
                    redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{port}/")).ok()
                }
            },
            "w",
            wait_replicas,
            Duration::from_millis(2),
        )
    }

    /// Keys `w<n>` of `acked` that the pod's Valkey does not hold.
    pub async fn missing(&self, pod: &str, acked: &std::collections::BTreeSet<u64>) -> Vec<String> {
        let port = self.kubelet.valkey_port(pod);
        let client =
            redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{port}/")).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to {pod}: {e}"));
        let keys: Vec<String> = acked.iter().map(|i| format!("w{i}")).collect();
        crate::local::missing_keys(&mut conn, &keys).await
    }

    /// The pod that the Failover's status names master.
    pub async fn master(&self, name: &str) -> Option<String> {
        self.failover(name).await.status?.master
    }
}

/// `valkey_controller_kube_api_requests_total{verb="..",resource=".."} N` lines.
fn parse_requests(text: &str) -> BTreeMap<(String, String), u64> {
    let label = |line: &str, key: &str| {
        let start = line.find(&format!("{key}=\""))? + key.len() + 2;
        let end = start + line[start..].find('"')?;
        Some(line[start..end].to_owned())
    };
    text.lines()
        .filter(|l| l.starts_with("valkey_controller_kube_api_requests"))
        .filter_map(|l| {
            let n = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some(((label(l, "verb")?, label(l, "resource")?), n))
        })
        .collect()
}

/// A running `valkey-controller run`.
#[derive(Debug)]
pub struct ControllerProc {
    pub pod: String,
    pub http: SocketAddr,
    pub proc: Proc,
}

/// The install's RBAC (rendered by kustomize from `deploy/` or `deploy/namespaced/`) moved to
/// the test namespace: the controller's account, Roles and RoleBindings there, and a binding of
/// the cluster-wide roles to that account, named after the namespace so tests do not share it.
fn rbac_for(plane: &ControlPlane, install: Install, ns: &str) -> String {
    let dir = match install {
        Install::ClusterWide => "deploy",
        Install::Namespaced => "deploy/namespaced",
        Install::MultiNamespace => "deploy/multi-namespace",
    };
    // The install's namespaces, moved to the test's.
    let moved = |from: &str| match from {
        "apps" => format!("{ns}-apps"),
        "batch" => format!("{ns}-batch"),
        _ => ns.to_owned(),
    };
    let rendered = plane
        .kubectl(&[
            "kustomize",
            &apiserver::repo().join(dir).display().to_string(),
        ])
        .unwrap_or_else(|e| panic!("kubectl kustomize {dir}: {e}"));
    let mut out = String::new();
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let mut object: serde_json::Value =
            serde::Deserialize::deserialize(doc).expect("rendered YAML");
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "ServiceAccount" | "Role" | "RoleBinding" => {
                let to = moved(object["metadata"]["namespace"].as_str().unwrap_or_default());
                object["metadata"]["namespace"] = to.into();
            }
            "ClusterRole" => {}
            "ClusterRoleBinding" => {
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                object["metadata"]["name"] = format!("{name}-{ns}").into();
            }
            _ => continue,
        }
        if let Some(subjects) = object["subjects"].as_array_mut() {
            for subject in subjects {
                subject["namespace"] = ns.into();
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object).expect("yaml"));
    }
    out
}
