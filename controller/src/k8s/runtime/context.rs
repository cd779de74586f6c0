//! What the cold path (objects) and the hot path (failover) of the Kubernetes controller
//! share: the client, the hub, and per instance the last Failover the cold path accepted, the
//! hot path's driver, and what each last wrote, so that neither writes what has not changed.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt};
use tokio::sync::Notify;

use crate::k8s::{
    Names, Settings, objects::status, runtime::events::Recorder, runtime::metrics::Metrics,
};
use crate::{
    crd::{Failover, FailoverStatus},
    driver::Driver,
    hub::{Hub, InstanceKey},
    validate::Valid,
};

/// Everything both paths need; one per controller process.
pub struct Context {
    pub client: Client,
    pub hub: Hub,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub hang_timeout: Duration,
    /// Pods of every instance, as the pod watch (or a test) last saw them.
    pub pods: PodCache,
    /// Each instance gets a hot loop of its own (off in tests that drive passes by hand).
    pub hot_loops: bool,
    /// The controller's CA: it issues the instances' certificates when no cert-manager issuer
    /// is named.
    pub ca: Option<Arc<crate::tls::Ca>>,
    /// What the agents this process runs itself present to its hub (never leaves it).
    pub in_process_token: Arc<String>,
    instances: Mutex<HashMap<InstanceKey, Arc<Instance>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client, hub: Hub, settings: Settings, recorder: Recorder) -> Self {
        Context {
            client,
            hub,
            settings,
            recorder,
            metrics: Arc::default(),
            hang_timeout: Duration::from_secs(5),
            pods: PodCache::default(),
            hot_loops: true,
            ca: None,
            in_process_token: Arc::new(crate::k8s::objects::data::generate_password()),
            instances: Mutex::default(),
        }
    }

    /// The instance's shared state, made on first use.
    pub fn instance(&self, key: &InstanceKey) -> Arc<Instance> {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Instance::new(key.clone())))
            .clone()
    }

    /// The instance, if the cold path has seen it.
    pub fn known(&self, key: &InstanceKey) -> Option<Arc<Instance>> {
        let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances.get(key).cloned()
    }

    /// Whether the instance's hot loop is to be started now (it is not running, and this
    /// context runs hot loops); from now on it counts as running.
    pub fn claim_hot_loop(&self, instance: &Instance) -> bool {
        self.hot_loops && !instance.hot_started.swap(true, Ordering::SeqCst)
    }

    /// Whether `instance` is still the one this context serves under its key.
    pub fn serves(&self, instance: &Arc<Instance>) -> bool {
        self.known(&instance.key)
            .is_some_and(|known| Arc::ptr_eq(&known, instance))
    }

    /// An owned object changed (a watch event): the Failover to reconcile, unless it is the
    /// object as this controller last applied it (then nothing changed). A record whose object
    /// someone else changed is forgotten, so that the next pass applies it again.
    /// `update_revision` is a StatefulSet's; only the data StatefulSet's (named as the
    /// instance) is the revision the data pods roll to: the sentinels' StatefulSet has its own.
    pub fn owned_changed(
        &self,
        kind: &str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        update_revision: Option<String>,
    ) -> Option<InstanceKey> {
        let key = InstanceKey {
            namespace: meta.namespace.clone()?,
            name: meta
                .labels
                .as_ref()?
                .get(crate::k8s::LABEL_INSTANCE)?
                .clone(),
        };
        let Some(instance) = self.known(&key) else {
            return Some(key);
        };
        let mut cold = instance.cold.lock().ok()?;
        let mut changed = false;
        let update_revision = update_revision.filter(|_| meta.name.as_ref() == Some(&key.name));
        if update_revision.is_some() && cold.update_revision != update_revision {
            cold.update_revision = update_revision;
            changed = true;
        }
        let record = format!("{kind}/{}", meta.name.as_deref().unwrap_or_default());
        if cold
            .applied
            .get(&record)
            .is_none_or(|a| a.resource_version != meta.resource_version)
        {
            cold.applied.remove(&record);
            changed = true;
        }
        changed.then_some(key)
    }

    pub fn forget(&self, key: &InstanceKey) {
        if let Ok(mut instances) = self.instances.lock() {
            instances.remove(key);
        }
    }
}

/// One applied object: the hash of what was applied and the resourceVersion it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub hash: String,
    pub resource_version: Option<String>,
}

/// What the cold path last did for an instance.
#[derive(Debug, Default)]
pub struct Cold {
    /// By `kind/name`.
    pub applied: BTreeMap<String, Applied>,
    /// The generation whose NodePorts were checked against every Service.
    pub node_ports_checked: Option<i64>,
    /// The data StatefulSet's update revision, as last applied or watched.
    pub update_revision: Option<String>,
    /// The pod count whose surplus per-pod Services were last deleted.
    pub swept_for: Option<i32>,
    /// The capacity the data PVCs were last brought to.
    pub claims_sized_for: Option<String>,
}

/// What the hot path last wrote for an instance.
#[derive(Debug, Default)]
pub struct Hot {
    /// The status as last written (or read back at start).
    pub status: Option<FailoverStatus>,
    /// customConfigs last applied with CONFIG SET.
    pub live: Option<BTreeMap<String, String>>,
    /// The spec's latest version was refused (the message names the field): the status says
    /// so while the hot path keeps the running instance failing over on the last good one.
    pub rejected: Option<String>,
}

/// One instance, shared by its cold and hot paths.
#[derive(Debug)]
pub struct Instance {
    pub key: InstanceKey,
    /// The last valid, not deleted Failover the cold path accepted; the hot path works from it.
    failover: RwLock<Option<Arc<Failover>>>,
    /// Its spec as validated: what the hot path works from.
    valid: RwLock<Option<Arc<Valid>>>,
    /// The instance's password (the cold path reads it from its Secret).
    password: RwLock<Option<String>>,
    /// The hot path: one pass at a time.
    pub driver: tokio::sync::Mutex<Option<Driver>>,
    pub hot: Mutex<Hot>,
    pub cold: Mutex<Cold>,
    /// Wakes the instance's hot pass.
    woken: Notify,
    /// A decision pass ended: report (role labels, status).
    reports: Notify,
    /// Held while the status is written (the durable write and the reporting's).
    pub status_lock: tokio::sync::Mutex<()>,
    /// Its hot loop runs.
    hot_started: AtomicBool,
    /// The agents run for its external Sentinel set, if it uses one.
    pub external: Mutex<Option<ExternalAgents>>,
    /// Its password rotations, if one runs: the instance's, and its embedded sentinels'.
    rotation: Rotating,
    sentinel_rotation: Rotating,
    /// Its per-pod Services as outside clients reach them (`k8s::outside`), by pod.
    exposed: RwLock<BTreeMap<String, crate::k8s::objects::outside::Exposed>>,
}

/// The agents this controller runs for an instance's external Sentinel set
/// (`cold::external_set`), and a fingerprint of what they were started from.
#[derive(Debug)]
pub struct ExternalAgents {
    pub fingerprint: u64,
    pub agents: crate::external::Agents,
}

/// A password rotation of one instance.
#[derive(Debug, Default)]
pub struct Rotating {
    /// A rotation task runs.
    pub running: AtomicBool,
    /// Both passwords work (the status names the old one) until the rotation ends.
    pub shown: AtomicBool,
}

impl Instance {
    fn new(key: InstanceKey) -> Self {
        Instance {
            key,
            failover: RwLock::default(),
            valid: RwLock::default(),
            password: RwLock::default(),
            driver: tokio::sync::Mutex::default(),
            hot: Mutex::default(),
            cold: Mutex::default(),
            woken: Notify::new(),
            reports: Notify::new(),
            status_lock: tokio::sync::Mutex::new(()),
            hot_started: AtomicBool::new(false),
            external: Mutex::default(),
            rotation: Rotating::default(),
            sentinel_rotation: Rotating::default(),
            exposed: RwLock::default(),
        }
    }

    /// Asks for a hot pass now (a report, an accepted change).
    pub fn wake(&self) {
        self.woken.notify_one();
    }

    /// Waits for a wake, or `most` at the longest; then a pass begins.
    pub async fn woken(&self, most: Duration) {
        let _ = tokio::time::timeout(most, self.woken.notified()).await;
    }

    /// A decision pass ended.
    pub fn request_report(&self) {
        self.reports.notify_one();
    }

    /// Waits until a report is asked for, or `most` at the longest.
    pub async fn report_due(&self, most: Duration) {
        let _ = tokio::time::timeout(most, self.reports.notified()).await;
    }

    pub fn failover(&self) -> Option<Arc<Failover>> {
        self.failover.read().ok()?.clone()
    }

    /// The accepted Failover's spec, as validated.
    pub fn valid(&self) -> Option<Arc<Valid>> {
        self.valid.read().ok()?.clone()
    }

    /// Hands the hot path a (new) accepted Failover; the first one also seeds the driver's
    /// durable state and the status the hot path compares against.
    pub fn accept(&self, failover: Arc<Failover>, valid: Arc<Valid>, password: String) {
        if let Ok(mut hot) = self.hot.lock()
            && hot.status.is_none()
        {
            hot.status = Some(failover.status.clone().unwrap_or_default());
        }
        if let Ok(mut slot) = self.password.write() {
            *slot = Some(password);
        }
        if let Ok(mut slot) = self.valid.write() {
            *slot = Some(valid);
        }
        if let Ok(mut slot) = self.failover.write() {
            *slot = Some(failover);
        }
        self.wake();
    }

    /// The hot path no longer works from a Failover (paused, deleted); the agents of its
    /// external Sentinel set stop.
    pub fn withdraw(&self) {
        if let Ok(mut slot) = self.failover.write() {
            *slot = None;
        }
        self.stop_external();
    }

    /// Stops the agents of its external Sentinel set, if any run.
    pub fn stop_external(&self) {
        let running = self.external.lock().ok().and_then(|mut r| r.take());
        if running.is_some() {
            tracing::info!("stopping the agents for the external Sentinel set");
        }
    }

    /// The per-pod Services as the cold path last read them; a change wakes the hot path.
    pub fn set_exposed(&self, exposed: BTreeMap<String, crate::k8s::objects::outside::Exposed>) {
        let changed = match self.exposed.write() {
            Ok(mut slot) if *slot != exposed => {
                *slot = exposed;
                true
            }
            _ => false,
        };
        if changed {
            self.wake();
        }
    }

    pub fn exposed(&self) -> BTreeMap<String, crate::k8s::objects::outside::Exposed> {
        self.exposed.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// The rotation of `whose` password.
    pub fn rotating(&self, whose: crate::k8s::objects::password::Whose) -> &Rotating {
        match whose {
            crate::k8s::objects::password::Whose::Instance => &self.rotation,
            crate::k8s::objects::password::Whose::Sentinel => &self.sentinel_rotation,
        }
    }

    /// The password in force changed (a rotation committed it).
    pub fn set_password(&self, password: String) {
        if let Ok(mut slot) = self.password.write() {
            *slot = Some(password);
        }
    }

    pub fn password(&self) -> Option<String> {
        self.password.read().ok()?.clone()
    }

    /// The status the hot path last wrote (or read back).
    pub fn status(&self) -> Option<FailoverStatus> {
        self.hot.lock().ok()?.status.clone()
    }

    pub fn remember_status(&self, status: FailoverStatus) {
        if let Ok(mut hot) = self.hot.lock() {
            hot.status = Some(status);
        }
    }

    /// A driver for this instance, seeded from the status, on first use.
    pub fn seeded_driver(&self, slot: &mut Option<Driver>) {
        if slot.is_none() {
            let durable = status::durable_from(self.status().as_ref());
            *slot = Some(Driver::new(self.key.clone(), durable));
        }
    }
}

/// Pods by namespace, instance and name, fed by a watch: the hot path reads role labels and
/// addresses here instead of listing pods on every pass.
#[derive(Debug, Default, Clone)]
pub struct PodCache {
    pods: Arc<RwLock<PodsByInstance>>,
    /// The uids of pods seen deleted lately (at most [`DELETED_KEPT`], none older than
    /// [`DELETED_FOR`]): a token bound to one of them is refused whatever else vouches for it.
    deleted: Arc<Mutex<std::collections::VecDeque<(Instant, String)>>>,
}

/// How many deleted pods are remembered, and for how long (an agent token's review is reused
/// for at most 10 minutes, and the API server's own token cache is shorter).
const DELETED_KEPT: usize = 4096;
const DELETED_FOR: Duration = Duration::from_secs(15 * 60);

/// (namespace, instance label, pod name) -> pod.
type PodsByInstance = BTreeMap<(String, String, String), Arc<Pod>>;

fn cache_key(pod: &Pod) -> (String, String, String) {
    (
        pod.namespace().unwrap_or_default(),
        pod.labels()
            .get(crate::k8s::LABEL_INSTANCE)
            .cloned()
            .unwrap_or_default(),
        pod.name_any(),
    )
}

impl PodCache {
    pub fn apply(&self, pod: Pod) {
        let key = cache_key(&pod);
        if let Ok(mut pods) = self.pods.write() {
            pods.insert(key, Arc::new(pod));
        }
    }

    pub fn delete(&self, namespace: &str, name: &str) {
        let mut gone = Vec::new();
        if let Ok(mut pods) = self.pods.write() {
            pods.retain(|(ns, _, pod), object| {
                let keep = !(ns == namespace && pod == name);
                if !keep {
                    gone.extend(object.metadata.uid.clone());
                }
                keep
            });
        }
        self.remember_deleted(gone);
    }

    /// Remembers pods seen deleted (a watch's Delete event), by uid.
    fn remember_deleted(&self, uids: impl IntoIterator<Item = String>) {
        if let Ok(mut deleted) = self.deleted.lock() {
            let now = Instant::now();
            deleted.extend(uids.into_iter().map(|uid| (now, uid)));
            while deleted
                .front()
                .is_some_and(|(at, _)| deleted.len() > DELETED_KEPT || at.elapsed() > DELETED_FOR)
            {
                deleted.pop_front();
            }
        }
    }

    /// Whether the pod with this uid was seen deleted.
    pub fn was_deleted(&self, uid: &str) -> bool {
        self.deleted.lock().is_ok_and(|d| {
            d.iter()
                .any(|(at, u)| u == uid && at.elapsed() <= DELETED_FOR)
        })
    }

    /// Replaces everything of `scope` (a namespace, or the cluster): its watch restarted with
    /// a fresh list. The pods of other namespaces, watched apart, stay.
    pub fn replace(&self, scope: Option<&str>, all: Vec<Pod>) {
        if let Ok(mut pods) = self.pods.write() {
            pods.retain(|(namespace, _, _), _| scope.is_some_and(|s| s != namespace));
            pods.extend(all.into_iter().map(|pod| (cache_key(&pod), Arc::new(pod))));
        }
    }

    /// The data pods of one instance.
    pub fn data_pods(&self, names: &Names) -> Vec<Pod> {
        self.pods_of(names, crate::k8s::objects::data::COMPONENT_DATA)
    }

    /// The pods of one instance's `component` (data, sentinel).
    pub fn pods_of(&self, names: &Names, component: &str) -> Vec<Pod> {
        let Ok(pods) = self.pods.read() else {
            return Vec::new();
        };
        let instance = (names.namespace.clone(), names.instance.clone());
        pods.range((instance.0.clone(), instance.1.clone(), String::new())..)
            .take_while(|((ns, name, _), _)| *ns == instance.0 && *name == instance.1)
            .map(|(_, pod)| pod)
            .filter(|pod| {
                pod.labels()
                    .get(crate::k8s::LABEL_COMPONENT)
                    .map(String::as_str)
                    == Some(component)
            })
            .map(|pod| (**pod).clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn set(name: &str, version: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("prod".into()),
            resource_version: Some(version.into()),
            labels: Some([(crate::k8s::LABEL_INSTANCE.to_owned(), "demo".to_owned())].into()),
            ..ObjectMeta::default()
        }
    }

    #[tokio::test]
    async fn only_the_data_statefulsets_revision_is_the_one_data_pods_roll_to() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let (hub, _events) = Hub::new(crate::hub::StaticToken("t".into()), Duration::from_secs(1));
        let recorder = crate::k8s::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "test".into(),
                instance: None,
            },
        );
        let ctx = Context::new(client, hub, Settings::default(), recorder);
        let key = InstanceKey {
            namespace: "prod".into(),
            name: "demo".into(),
        };
        let instance = ctx.instance(&key);
        let revision = |i: &Instance| i.cold.lock().ok().and_then(|c| c.update_revision.clone());
        ctx.owned_changed("StatefulSet", &set("demo", "1"), Some("demo-aaa".into()));
        assert_eq!(revision(&instance).as_deref(), Some("demo-aaa"));
        // The sentinels' StatefulSet reports its own revision: the data pods' stays.
        ctx.owned_changed(
            "StatefulSet",
            &set("demo-sentinel", "2"),
            Some("demo-sentinel-bbb".into()),
        );
        assert_eq!(revision(&instance).as_deref(), Some("demo-aaa"));
    }
}
