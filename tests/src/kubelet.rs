//! The StatefulSet controller, the kubelet and the garbage collector, as far as the cluster
//! tests need them on the real API server (no controller manager or kubelet runs there): pods
//! made from the StatefulSets' templates through the API server (admission included), reported
//! running on 127.0.0.1 with the ports their processes listen on, and their real
//! `valkey-server` / `valkey-sentinel` and `valkey-agent` processes, each agent presenting a
//! token from the TokenRequest API bound to its pod.

use std::{
    collections::BTreeMap,
    path::PathBuf,
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
use valkey_controller::k8s::{LABEL_COMPONENT, LABEL_INSTANCE, TOKEN_AUDIENCE};

use crate::{
    apiserver, free_port,
    procs::{Agent, AgentOpts, PASSWORD, Sentinel, Valkey},
};

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
    /// Runs the pods of namespace `ns`, their agents dialing `hub_url`.
    pub fn start(admin: &Client, ns: &str, hub_url: String) -> Self {
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
            let owners = serde_json::json!({ "ownerReferences": null });
            let _ = merge_metadata(pods, &pod.name_any(), owners).await;
        }
    }
    let kept: Vec<&String> = set.finalizers().iter().filter(|f| *f != "orphan").collect();
    let _ = merge_metadata(
        sets,
        &set.name_any(),
        serde_json::json!({ "finalizers": kept }),
    )
    .await;
}

/// A merge patch of an object's metadata, as the controllers it stands in for make them.
async fn merge_metadata<K>(api: &Api<K>, name: &str, metadata: serde_json::Value) -> kube::Result<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({ "metadata": metadata });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

/// The owner reference a StatefulSet's controller puts on its pods.
fn owned_by(set: &StatefulSet) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "StatefulSet".into(),
        name: set.name_any(),
        uid: set.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The StatefulSet controller adopts a pod of its name that nobody owns.
async fn adopt(pods: &Api<Pod>, set: &StatefulSet, pod: &Pod) -> Pod {
    let owners = serde_json::json!({ "ownerReferences": [owned_by(set)] });
    merge_metadata(pods, &pod.name_any(), owners)
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
    meta.owner_references = Some(vec![owned_by(set)]);
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
