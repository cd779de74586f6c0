//! A test's cluster on the real control plane ([`crate::apiserver`]): a namespace of its own,
//! the controller (the real `valkey-controller run` binary) on its own service account with the
//! RBAC the install renders, and a stand-in for the StatefulSet controller and the kubelet
//! ([`Kubelet`]) that makes pods from the StatefulSets' templates through the API server and
//! runs their real `valkey-server` / `valkey-sentinel` and `valkey-agent` processes on loopback,
//! each agent presenting a token from the TokenRequest API bound to its pod.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{
            ConfigMap, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, Secret,
            Volume,
        },
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use nix::sys::signal::Signal;
use valkey_controller::{
    crd::Failover,
    k8s::{LABEL_COMPONENT, LABEL_INSTANCE, LABEL_ROLE, TOKEN_AUDIENCE},
};

use crate::{
    apiserver::{self, ControlPlane},
    free_port,
    procs::{Agent, AgentOpts, PASSWORD, Proc, Sentinel, Valkey},
};

/// Which install's RBAC the controller runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// `deploy/`: the ClusterRole, bound to the controller's account in the test namespace.
    ClusterWide,
    /// `deploy/namespaced/`: a Role in the test namespace, and a ClusterRole for TokenReviews.
    Namespaced,
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
    install: Install,
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
            ns,
            controllers: Vec::new(),
            kubelet,
            hub,
            hubs,
            install,
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
            .args(["--watch-namespace", &self.ns])
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

    /// Which install the controller's rights come from.
    pub fn install(&self) -> Install {
        self.install
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
                object["metadata"]["namespace"] = ns.into();
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

/// What runs for one pod.
#[derive(Debug)]
pub struct RunningPod {
    pub uid: String,
    // First: dropped before the Valkey or sentinel whose dir holds its log.
    pub agent: Agent,
    pub valkey: Option<Valkey>,
    pub sentinel: Option<Sentinel>,
}

/// The StatefulSet controller and the kubelet, for the test namespace: every 100 ms it makes
/// the pods the StatefulSets ask for from their templates (with their PVCs), reports them
/// running on 127.0.0.1 with the ports their processes really listen on, starts those processes
/// once what they mount exists, and stops the processes of pods that were deleted.
#[allow(missing_debug_implementations)]
pub struct Kubelet {
    pub pods: Arc<Mutex<BTreeMap<String, RunningPod>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    fn start(admin: &Client, ns: &str, hub_url: String) -> Self {
        let pods: Arc<Mutex<BTreeMap<String, RunningPod>>> = Arc::default();
        let task = {
            let (admin, ns, pods) = (admin.clone(), ns.to_owned(), pods.clone());
            tokio::spawn(async move {
                let work = tempfile::Builder::new()
                    .prefix("kubelet-")
                    .tempdir()
                    .expect("temp dir");
                loop {
                    sync(&admin, &ns, &hub_url, &pods, work.path()).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Kubelet { pods, task }
    }

    /// Runs `f` on the running pod `name`; None when it does not run.
    pub fn with_pod<T>(&self, name: &str, f: impl FnOnce(&mut RunningPod) -> T) -> Option<T> {
        self.pods.lock().ok()?.get_mut(name).map(f)
    }

    /// kill -9 of the pod's Valkey (its container's process dies; the pod stays).
    pub fn kill_valkey(&self, pod: &str) {
        self.with_pod(pod, |p| p.valkey.as_mut().map(Valkey::kill9))
            .flatten()
            .unwrap_or_else(|| panic!("pod {pod} runs no Valkey"));
    }

    /// Sends `signal` to the pod's agent.
    pub fn signal_agent(&self, pod: &str, signal: Signal) {
        self.with_pod(pod, |p| p.agent.proc_mut().signal(signal))
            .unwrap_or_else(|| panic!("pod {pod} does not run"));
    }

    /// The port the pod's Valkey listens on.
    pub fn valkey_port(&self, pod: &str) -> u16 {
        self.with_pod(pod, |p| p.valkey.as_ref().map(|v| v.port))
            .flatten()
            .unwrap_or_else(|| panic!("pod {pod} runs no Valkey"))
    }
}

async fn sync(
    admin: &Client,
    ns: &str,
    hub_url: &str,
    running: &Arc<Mutex<BTreeMap<String, RunningPod>>>,
    work: &std::path::Path,
) {
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let (Ok(sets), Ok(listed)) = (
        statefulsets.list(&ListParams::default()).await,
        pods.list(&ListParams::default().labels(LABEL_INSTANCE))
            .await,
    ) else {
        return;
    };
    let existing: BTreeMap<String, Pod> = listed
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p))
        .collect();
    // Processes of pods that are gone (or were made anew) stop; a container whose process
    // died starts again (restartPolicy Always), on the same port and data dir.
    if let Ok(mut running) = running.lock() {
        running
            .retain(|name, pod| existing.get(name).and_then(|p| p.uid()) == Some(pod.uid.clone()));
        for pod in running.values_mut() {
            if let Some(valkey) = pod.valkey.as_mut()
                && !valkey.running()
            {
                valkey.restart();
            }
        }
    }
    let mut wanted = Vec::new();
    for set in &sets.items {
        if set.metadata.deletion_timestamp.is_some() {
            orphan(&statefulsets, &pods, set, &existing).await;
            continue;
        }
        let replicas = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let revision = revision(set);
        for ordinal in 0..replicas {
            let name = format!("{}-{ordinal}", set.name_any());
            wanted.push(name.clone());
            let pod = match existing.get(&name) {
                Some(pod) if pod.owner_references().is_empty() => adopt(&pods, set, pod).await,
                Some(pod) => pod.clone(),
                None => match create_pod(admin, ns, set, &name, &revision).await {
                    Some(pod) => pod,
                    None => continue,
                },
            };
            let started = running.lock().is_ok_and(|r| r.contains_key(&name));
            if !started && let Some(pod) = start_pod(admin, ns, hub_url, &pod, work).await {
                if let Ok(mut running) = running.lock() {
                    running.insert(name.clone(), pod);
                }
                report_running(&pods, &name).await;
            }
        }
        let ready = running
            .lock()
            .map(|r| {
                r.keys()
                    .filter(|n| {
                        n.strip_prefix(&format!("{}-", set.name_any()))
                            .is_some_and(|o| o.chars().all(|c| c.is_ascii_digit()))
                    })
                    .count()
            })
            .unwrap_or(0);
        report_set(&statefulsets, set, &revision, ready as i32).await;
    }
    // Pods past a StatefulSet's replicas (a scale-down) are deleted, as its controller does.
    let live: Vec<String> = sets
        .items
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter_map(|s| s.uid())
        .collect();
    for (name, pod) in &existing {
        let owned_by_live_set = pod
            .owner_references()
            .iter()
            .any(|o| o.kind == "StatefulSet" && live.contains(&o.uid));
        if owned_by_live_set && !wanted.contains(name) {
            let _ = pods.delete(name, &DeleteParams::default()).await;
        }
    }
}

/// The garbage collector's part in an orphaning deletion: the set's pods lose their owner
/// reference, then its `orphan` finalizer goes and the API server removes it.
async fn orphan(
    sets: &Api<StatefulSet>,
    pods: &Api<Pod>,
    set: &StatefulSet,
    existing: &BTreeMap<String, Pod>,
) {
    if !set.finalizers().iter().any(|f| f == "orphan") {
        return;
    }
    let uid = set.uid();
    for pod in existing.values() {
        if pod
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref())
        {
            let patch = serde_json::json!({ "metadata": { "ownerReferences": null } });
            let _ = pods
                .patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await;
        }
    }
    let kept: Vec<&String> = set.finalizers().iter().filter(|f| *f != "orphan").collect();
    let patch = serde_json::json!({ "metadata": { "finalizers": kept } });
    let _ = sets
        .patch(
            &set.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await;
}

/// The StatefulSet controller adopts a pod of its name that nobody owns.
async fn adopt(pods: &Api<Pod>, set: &StatefulSet, pod: &Pod) -> Pod {
    let owner = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "StatefulSet".into(),
        name: set.name_any(),
        uid: set.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let patch = serde_json::json!({ "metadata": { "ownerReferences": [owner] } });
    pods.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap_or_else(|_| pod.clone())
}

/// The StatefulSet's revision: a hash of its pod template, as `controller-revision-hash`.
fn revision(set: &StatefulSet) -> String {
    use sha2::Digest;
    let template = serde_json::to_vec(&set.spec.as_ref().map(|s| &s.template)).unwrap_or_default();
    let hash = hex::encode(&sha2::Sha256::digest(&template)[..5]);
    format!("{}-{hash}", set.name_any())
}

/// The pod `name` of `set`, from its template, as the StatefulSet controller makes it: its
/// labels, its owner, its hostname, and a volume per claim template (`<claim>-<pod>`). With
/// `free_ports`, each port its containers declare is a free one of this machine instead (the
/// processes that run it here share loopback), which the controller then reads.
pub fn pod_from_template(
    set: &StatefulSet,
    name: &str,
    revision: &str,
    free_ports: bool,
) -> Option<Pod> {
    let spec = set.spec.as_ref()?;
    let template = &spec.template;
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = Some(name.to_owned());
    meta.namespace = set.namespace();
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert("controller-revision-hash".into(), revision.to_owned());
    labels.insert("statefulset.kubernetes.io/pod-name".into(), name.to_owned());
    meta.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "StatefulSet".into(),
        name: set.name_any(),
        uid: set.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    let mut pod_spec = template.spec.clone()?;
    pod_spec.hostname = Some(name.to_owned());
    pod_spec.subdomain = spec.service_name.clone();
    if free_ports {
        for container in &mut pod_spec.containers {
            for port in container.ports.iter_mut().flatten() {
                port.container_port = i32::from(free_port());
            }
        }
    }
    for claim in spec.volume_claim_templates.iter().flatten() {
        pod_spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: claim.name_any(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: format!("{}-{name}", claim.name_any()),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    Some(Pod {
        metadata: meta,
        spec: Some(pod_spec),
        status: None,
    })
}

/// Creates pod `name` of `set` through the API server (admission and Pod Security included),
/// and its PVCs from the claim templates.
async fn create_pod(
    admin: &Client,
    ns: &str,
    set: &StatefulSet,
    name: &str,
    revision: &str,
) -> Option<Pod> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), ns);
    for claim in set.spec.as_ref()?.volume_claim_templates.iter().flatten() {
        let claim_name = format!("{}-{name}", claim.name_any());
        if pvcs.get_opt(&claim_name).await.ok()?.is_none() {
            let mut pvc = claim.clone();
            pvc.metadata.name = Some(claim_name.clone());
            pvc.metadata.namespace = Some(ns.to_owned());
            pvcs.create(&PostParams::default(), &pvc)
                .await
                .unwrap_or_else(|e| panic!("create PVC {claim_name} from its template: {e}"));
        }
    }
    let pod = pod_from_template(set, name, revision, true)?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    Some(
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("the API server refused pod {name} from its template: {e}")),
    )
}

/// The port a container of `pod` declares under `port_name`.
fn declared_port(pod: &Pod, container: &str, port_name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port_name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// What a Secret or ConfigMap volume of `pod` would hold: its keys, or None while it does not
/// exist (the kubelet waits for it).
async fn volume_files(
    admin: &Client,
    ns: &str,
    pod: &Pod,
    volume: &str,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let source = pod
        .spec
        .as_ref()?
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)?;
    if let Some(secret) = &source.secret {
        let api: Api<Secret> = Api::namespaced(admin.clone(), ns);
        let found = api.get_opt(secret.secret_name.as_deref()?).await.ok()??;
        return Some(
            found
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        );
    }
    if let Some(config_map) = &source.config_map {
        let api: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
        let found = api.get_opt(&config_map.name).await.ok()??;
        return Some(
            found
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect(),
        );
    }
    None
}

/// Starts the pod's processes, once the controller CA's ConfigMap and its Secrets exist.
async fn start_pod(
    admin: &Client,
    ns: &str,
    hub_url: &str,
    pod: &Pod,
    work: &std::path::Path,
) -> Option<RunningPod> {
    let name = pod.name_any();
    let uid = pod.uid()?;
    let component = pod.labels().get(LABEL_COMPONENT)?.clone();
    let failover = pod.labels().get(LABEL_INSTANCE)?.clone();
    let ca = volume_files(admin, ns, pod, "controller-ca").await?;
    let token = apiserver::request_token(
        admin,
        ns,
        pod.spec
            .as_ref()?
            .service_account_name
            .as_deref()
            .unwrap_or("default"),
        Some(TOKEN_AUDIENCE),
        Some((&name, &uid)),
    )
    .await;
    let dir = work.join(format!("{name}-{uid}"));
    std::fs::create_dir_all(&dir).expect("pod dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).expect("token");
    let ca_file = dir.join("controller-ca.crt");
    std::fs::write(&ca_file, ca.get("ca.crt")?).expect("controller CA");
    let agent_ports = (
        declared_port(pod, "agent", "agent-grpc")?,
        declared_port(pod, "agent", "agent-metrics")?,
    );
    let base = |valkey_port: u16, data_dir: PathBuf| AgentOpts {
        sentinel: component == "sentinel",
        valkey_port,
        password_file: None,
        controller: Some(hub_url.to_owned()),
        token_file: Some(token_file.clone()),
        data_dir,
        failover: failover.clone(),
        pod: name.clone(),
        probe_interval_ms: 50,
        heartbeat_interval_ms: 500,
        extra: vec![
            "--namespace".into(),
            ns.into(),
            "--controller-ca-file".into(),
            ca_file.display().to_string(),
        ],
    };
    if component == "sentinel" {
        let port = declared_port(pod, "sentinel", "sentinel")?;
        let password = volume_files(admin, ns, pod, "password")
            .await
            .and_then(|f| f.get("password").cloned())
            .map(|p| String::from_utf8_lossy(&p).into_owned());
        let sentinel = match &password {
            Some(password) => Sentinel::with_password_at(port, password),
            None => Sentinel::start_at(port),
        };
        let instance = dir.join("instance");
        std::fs::create_dir_all(&instance).expect("mkdir");
        std::fs::write(instance.join("password"), PASSWORD).expect("instance password");
        let mut opts = base(port, dir.join("agent"));
        if let Some(password) = &password {
            std::fs::write(dir.join("password"), password).expect("sentinel password");
            opts.password_file = Some(dir.join("password"));
        }
        opts.extra.extend([
            "--instance-password-file".into(),
            instance.join("password").display().to_string(),
        ]);
        let agent = Agent::start_at(opts, agent_ports);
        return Some(RunningPod {
            uid,
            valkey: None,
            sentinel: Some(sentinel),
            agent,
        });
    }
    // The pod's password volume (the controller's copy of the instance's Secret) must exist.
    volume_files(admin, ns, pod, "password").await?;
    // Its valkey.conf, as the ConfigMap holds it (every node starts as a replica of nobody):
    // the harness's arguments override the port, the address and persistence (a restart
    // comes back empty, the harshest case).
    let config = volume_files(admin, ns, pod, "config").await?;
    // The data volume is the Valkey's own dir here (`--dir`).
    let conf: String = String::from_utf8_lossy(config.get("valkey.conf")?)
        .lines()
        .filter(|l| !l.starts_with("dir "))
        .map(|l| format!("{l}\n"))
        .collect();
    let port = declared_port(pod, "valkey", "valkey")?;
    let valkey = Valkey::start_with_conf(&name, port, &conf);
    let mut opts = base(port, valkey.dir.join("agent"));
    opts.password_file = Some(valkey.password_file());
    let agent = Agent::start_at(opts, agent_ports);
    Some(RunningPod {
        uid,
        valkey: Some(valkey),
        sentinel: None,
        agent,
    })
}

/// The pod runs: phase Running, ready, on 127.0.0.1 (its node is this machine too).
async fn report_running(pods: &Api<Pod>, name: &str) {
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_default()
        .to_string();
    let status = serde_json::json!({ "status": {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "podIPs": [{ "ip": "127.0.0.1" }],
        "hostIP": "127.0.0.1",
        "hostIPs": [{ "ip": "127.0.0.1" }],
        "startTime": now,
        "conditions": [
            { "type": "PodScheduled", "status": "True", "lastTransitionTime": now },
            { "type": "Initialized", "status": "True", "lastTransitionTime": now },
            { "type": "ContainersReady", "status": "True", "lastTransitionTime": now },
            { "type": "Ready", "status": "True", "lastTransitionTime": now },
        ],
    }});
    if let Err(e) = pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        eprintln!("kubelet stand-in: status of pod {name}: {e}");
    }
}

/// The StatefulSet's status, as its controller reports it.
async fn report_set(sets: &Api<StatefulSet>, set: &StatefulSet, revision: &str, ready: i32) {
    let replicas = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = serde_json::json!({ "status": {
        "observedGeneration": set.metadata.generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "currentReplicas": replicas,
        "updatedReplicas": replicas,
        "currentRevision": revision,
        "updateRevision": revision,
    }});
    let current = serde_json::to_value(&set.status).unwrap_or_default();
    let unchanged = [
        "readyReplicas",
        "replicas",
        "updateRevision",
        "observedGeneration",
    ]
    .iter()
    .all(|k| current.get(k) == status["status"].get(k));
    if unchanged {
        return;
    }
    if let Err(e) = sets
        .patch_status(
            &set.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
    {
        eprintln!("StatefulSet stand-in: status of {}: {e}", set.name_any());
    }
}
