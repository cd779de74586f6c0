//! Wires the Kubernetes controller: the agent hub (TokenReview auth) on its gRPC port, metrics
//! and health on HTTP, Lease leader election, the cold path (kube-runtime's Controller for
//! Failover, woken by spec changes, by changes to what it owns that it did not make, and by
//! pods) and the hot path (a failover loop per instance, woken by its agents' reports).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, Secret, Service},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        events::Reporter,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use tracing::{error, info, warn};

use crate::k8s::{
    LABEL_INSTANCE, Settings,
    cold::{cold_trigger, error_policy, reconcile},
    runtime::auth::TokenReviewAuth,
    runtime::context::{Context, PodCache},
    runtime::leader::Elector,
    runtime::metrics::Metrics,
};
use crate::{
    crd::Failover,
    hub::{Hub, HubEvent, InstanceKey},
};

/// Label on the controller pod that leads: the hub's Service selects it, so agents always
/// reach the replica that decides.
pub const LABEL_LEADER: &str = "valkey.buf.red/leader";

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub hub_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub settings: Settings,
    /// This replica's pod name and namespace (the Lease lives there).
    pub pod_name: String,
    pub pod_namespace: String,
    pub hang_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("no Kubernetes client configuration (in-cluster or kubeconfig): {0}")]
    Client(#[source] kube::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("leader election: {0}")]
    Lease(#[source] kube::Error),
    #[error("leadership lost; exiting so that a fresh start competes again")]
    LostLease,
    #[error("the hub's TLS: {0}")]
    Tls(#[from] crate::k8s::runtime::hub_tls::HubTlsError),
}

pub async fn run(
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let client = crate::k8s::runtime::requests::counting(
        Client::try_default().await.map_err(RunError::Client)?,
        metrics.clone(),
    );
    // The agents this process runs itself (an external Sentinel set's) present their own
    // token; every other agent is reviewed by the API server.
    let in_process_token = Arc::new(crate::k8s::objects::data::generate_password());
    // The pod watch's cache, shared with the authenticator: a token bound to a pod the watch
    // saw deleted is refused.
    let pods = PodCache::default();
    let (hub, hub_events) = Hub::new(
        crate::external::InProcessToken::new(
            in_process_token.clone(),
            TokenReviewAuth::new(client.clone(), metrics.clone(), pods.clone()),
        ),
        Duration::from_millis(500),
    );

    serve_metrics(&options, &metrics, &hub).await?;
    // Lead first: only the leader serves agents and writes.
    let elector = lead(&client, &options, &hub).await?;
    let ca = serve_hub(&client, &options, &hub).await?;

    let reporter = Reporter {
        controller: "valkey-operator".into(),
        instance: Some(options.pod_name.clone()),
    };
    let mut settings = options.settings.clone();
    settings.controller_ca = ca.0.cert_pem.clone();
    let mut context = Context::new(
        client.clone(),
        hub.clone(),
        settings,
        crate::k8s::runtime::events::Recorder::new(client.clone(), reporter),
    );
    context.ca = Some(ca);
    context.pods = pods;
    context.in_process_token = in_process_token;
    context.metrics = metrics;
    context.hang_timeout = options.hang_timeout;
    let context = Arc::new(context);

    move_terminating_masters(context.clone(), hub_events);
    crate::k8s::hot::wake_on_reports(context.clone());
    // One cold Controller per namespace watched (or one for the cluster), sharing the hub,
    // the instances and the pod cache.
    let shutdown = shutdown.shared();
    let controllers = crate::k8s::scopes(&context.settings)
        .into_iter()
        .map(|scope| {
            cold_controller(&client, &context, scope.as_deref())
                .graceful_shutdown_on(shutdown.clone())
                .run(reconcile, error_policy, context.clone())
                .for_each(|result| async move {
                    if let Err(err) = result {
                        warn!(error = %err, "reconcile");
                    }
                })
        });
    let controller = futures::future::join_all(controllers);

    // Renew the lease while the controller runs; losing it ends the process.
    let renew = async {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            match elector.try_acquire_or_renew().await {
                Ok(true) => {}
                Ok(false) => return RunError::LostLease,
                Err(err) => warn!(error = %err, "renewing the lease failed; retrying"),
            }
        }
    };
    let outcome = tokio::select! {
        _ = controller => Ok(()),
        err = renew => Err(err),
    };
    set_leader_label(&client, &options, false).await;
    if let Err(err) = elector.release().await {
        warn!(error = %err, "could not release the lease");
    }
    outcome
}

/// The metrics and health endpoint, served whether leading or not.
async fn serve_metrics(
    options: &RunOptions,
    metrics: &Arc<Metrics>,
    hub: &Hub,
) -> Result<(), RunError> {
    let http = tokio::net::TcpListener::bind(options.http_listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: options.http_listen,
            source,
        })?;
    let (metrics, hub) = (metrics.clone(), hub.clone());
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, hub) = (metrics.clone(), hub.clone());
                async move {
                    metrics.connected_agents.set(hub.connected() as i64);
                    metrics.render()
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move {
        if let Err(err) = axum::serve(http, app).await {
            error!(error = %err, "the metrics server stopped");
        }
    });
    Ok(())
}

/// Waits until this replica holds the leader lease; then it serves agents and writes.
async fn lead(client: &Client, options: &RunOptions, hub: &Hub) -> Result<Elector, RunError> {
    let elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &options.pod_namespace),
        "valkey-controller",
        &options.pod_name,
        Duration::from_secs(15),
    );
    info!(identity = %options.pod_name, "waiting to lead");
    while !elector
        .try_acquire_or_renew()
        .await
        .map_err(RunError::Lease)?
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    info!("leading");
    hub.leading();
    set_leader_label(client, options, true).await;
    Ok(elector)
}

/// Serves the agent hub. It speaks TLS only, with a certificate from the controller's CA
/// (returned); agents get the CA's certificate through a ConfigMap of their instance.
async fn serve_hub(
    client: &Client,
    options: &RunOptions,
    hub: &Hub,
) -> Result<Arc<crate::tls::Ca>, RunError> {
    let hub_listener = tokio::net::TcpListener::bind(options.hub_listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: options.hub_listen,
            source,
        })?;
    let ca = Arc::new(
        crate::k8s::runtime::hub_tls::load_or_create_ca(client, &options.pod_namespace).await?,
    );
    let hub_cert =
        crate::k8s::runtime::hub_tls::serve_cert(ca.clone(), &options.settings.controller_addr)?;
    let server = hub.clone();
    tokio::spawn(async move {
        let served = crate::hub::limits::serve(&server, hub_listener, hub_cert).await;
        if let Err(err) = served {
            error!(error = %err, "the agent hub stopped");
        }
    });
    Ok(ca)
}

/// A terminating master's agent asks for its role to move: its instance's driver does it.
fn move_terminating_masters(
    context: Arc<Context>,
    mut hub_events: tokio::sync::mpsc::UnboundedReceiver<HubEvent>,
) {
    tokio::spawn(async move {
        while let Some(event) = hub_events.recv().await {
            match event {
                HubEvent::SwitchoverRequested { instance, pod } => {
                    info!(failover = %instance.name, pod = %pod, "the master is terminating: switching over");
                    if let Some(known) = context.known(&instance) {
                        if let Some(driver) = known.driver.lock().await.as_mut() {
                            driver.move_master_off(pod);
                        }
                        known.wake();
                    }
                }
            }
        }
    });
}

async fn set_leader_label(client: &Client, options: &RunOptions, leading: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &options.pod_namespace);
    let value = if leading { "true" } else { "false" };
    let patch = serde_json::json!({ "metadata": { "labels": { LABEL_LEADER: value } } });
    if let Err(err) = pods
        .patch(
            &options.pod_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        warn!(error = %err, "could not label this pod as leader={value}");
    }
}

/// The cold path's Controller over `scope` (a namespace, or the cluster): Failovers whose
/// spec, annotations, finalizers or deletion changed (not their status), owned objects changed
/// by someone else, and pods (which also feed the pod cache the hot path reads).
fn cold_controller(
    client: &Client,
    context: &Arc<Context>,
    scope: Option<&str>,
) -> Controller<Failover> {
    let (reader, writer) = reflector::store();
    let failovers = watcher(
        crate::k8s::scoped_api::<Failover>(client, scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(cold_trigger, Default::default());
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=valkey-operator");
    let to_ref = |key: InstanceKey| ObjectRef::<Failover>::new(&key.name).within(&key.namespace);
    let mut controller = Controller::for_stream(failovers, reader);
    macro_rules! watch_owned {
        ($kind:ty, $revision:expr) => {{
            let context = context.clone();
            controller = controller.watches(
                crate::k8s::scoped_api::<$kind>(client, scope),
                owned.clone(),
                move |object: $kind| {
                    let revision: Option<String> = $revision(&object);
                    context
                        .owned_changed(
                            <$kind as kube::Resource>::kind(&()).as_ref(),
                            &object.metadata,
                            revision,
                        )
                        .map(to_ref)
                },
            );
        }};
    }
    watch_owned!(StatefulSet, |s: &StatefulSet| s
        .status
        .as_ref()
        .and_then(|s| s.update_revision.clone()));
    watch_owned!(Service, |_: &Service| None);
    watch_owned!(ConfigMap, |_: &ConfigMap| None);
    watch_owned!(Secret, |_: &Secret| None);
    watch_owned!(PodDisruptionBudget, |_: &PodDisruptionBudget| None);
    watch_owned!(NetworkPolicy, |_: &NetworkPolicy| None);
    let pods = watcher(
        crate::k8s::scoped_api::<Pod>(client, scope),
        watcher::Config::default().labels(LABEL_INSTANCE),
    )
    .default_backoff()
    .map(cache_pods(
        context.pods.clone(),
        context.clone(),
        scope.map(str::to_owned),
    ))
    .touched_objects();
    controller.watches_stream(pods, |pod: Pod| {
        let namespace = pod.namespace();
        pod.labels().get(LABEL_INSTANCE).map(|name| {
            ObjectRef::<Failover>::new(name).within(namespace.as_deref().unwrap_or("default"))
        })
    })
}

/// Keeps the pod cache in step with the pod watch of `scope`, and wakes the hot pass of a
/// pod's instance (its address or readiness may be in the status).
fn cache_pods(
    cache: PodCache,
    context: Arc<Context>,
    scope: Option<String>,
) -> impl FnMut(Result<watcher::Event<Pod>, watcher::Error>) -> Result<watcher::Event<Pod>, watcher::Error>
{
    let mut listing: Vec<Pod> = Vec::new();
    move |event| {
        if let Ok(event) = &event {
            let touched = match event {
                watcher::Event::Apply(pod) => {
                    cache.apply(pod.clone());
                    Some(pod)
                }
                watcher::Event::Delete(pod) => {
                    cache.delete(&pod.namespace().unwrap_or_default(), &pod.name_any());
                    Some(pod)
                }
                watcher::Event::Init => {
                    listing.clear();
                    None
                }
                watcher::Event::InitApply(pod) => {
                    listing.push(pod.clone());
                    None
                }
                watcher::Event::InitDone => {
                    cache.replace(scope.as_deref(), std::mem::take(&mut listing));
                    None
                }
            };
            if let Some((pod, key)) = touched.and_then(|pod| {
                let key = InstanceKey {
                    namespace: pod.namespace()?,
                    name: pod.labels().get(LABEL_INSTANCE)?.clone(),
                };
                Some((pod, key))
            }) {
                if matches!(event, watcher::Event::Delete(_)) {
                    // A deleted pod's agent speaks for no pod: its stream ends, and its token
                    // (bound to the deleted pod) is refused when it comes back.
                    context
                        .hub
                        .disconnect(&key, &pod.name_any(), "its pod was deleted");
                }
                if let Some(instance) = context.known(&key) {
                    instance.wake();
                }
            }
        }
        event
    }
}
