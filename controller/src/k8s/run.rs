//! Wires the Kubernetes controller: the agent hub (TokenReview auth) on its gRPC port, metrics
//! and health on HTTP, Lease leader election, and kube-runtime's Controller for Failover,
//! woken by changes to what it owns, to its pods, and by the agents' reports.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, Secret, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        events::{Recorder, Reporter},
        reflector::ObjectRef,
        watcher,
    },
};
use tokio_stream::wrappers::{BroadcastStream, TcpListenerStream};
use tracing::{error, info, warn};

use super::{
    LABEL_INSTANCE, Settings,
    auth::TokenReviewAuth,
    leader::Elector,
    metrics::Metrics,
    reconcile::{Context, error_policy, reconcile},
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
}

pub async fn run(
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let metrics = Arc::new(Metrics::default());
    let (hub, mut hub_events) = Hub::new(
        TokenReviewAuth::new(client.clone(), metrics.clone()),
        Duration::from_millis(500),
    );

    let http = tokio::net::TcpListener::bind(options.http_listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: options.http_listen,
            source,
        })?;
    let app = {
        let metrics = metrics.clone();
        let hub = hub.clone();
        axum::Router::new()
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
            .route("/healthz", axum::routing::get(|| async { "ok" }))
    };
    tokio::spawn(async move {
        if let Err(err) = axum::serve(http, app).await {
            error!(error = %err, "the metrics server stopped");
        }
    });

    // Lead first: only the leader serves agents and writes.
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
    set_leader_label(&client, &options, true).await;

    let hub_listener = tokio::net::TcpListener::bind(options.hub_listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: options.hub_listen,
            source,
        })?;
    let server = hub.server();
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(TcpListenerStream::new(hub_listener))
            .await;
        if let Err(err) = served {
            error!(error = %err, "the agent hub stopped");
        }
    });

    let reporter = Reporter {
        controller: "valkey-operator".into(),
        instance: Some(options.pod_name.clone()),
    };
    let mut context = Context::new(
        client.clone(),
        hub.clone(),
        options.settings.clone(),
        Recorder::new(client.clone(), reporter),
    );
    context.metrics = metrics;
    context.hang_timeout = options.hang_timeout;
    let context = Arc::new(context);

    // A terminating master's agent asks for its role to move: note it, and wake its Failover.
    let (wake, woken) = tokio::sync::mpsc::unbounded_channel::<InstanceKey>();
    {
        let context = context.clone();
        tokio::spawn(async move {
            while let Some(event) = hub_events.recv().await {
                match event {
                    HubEvent::SwitchoverRequested { instance, pod } => {
                        info!(failover = %instance.name, pod = %pod, "the master is terminating: switching over");
                        context.request_switchover(instance.clone(), pod);
                        let _ = wake.send(instance);
                    }
                }
            }
        });
    }
    let reported =
        BroadcastStream::new(hub.subscribe_instances()).filter_map(|key| async move { key.ok() });
    let reports = futures::stream::select(
        reported,
        tokio_stream::wrappers::UnboundedReceiverStream::new(woken),
    )
    .map(|key| ObjectRef::<Failover>::new(&key.name).within(&key.namespace));
    let by_instance_label = |pod: Pod| {
        let namespace = pod.namespace();
        pod.labels().get(LABEL_INSTANCE).map(|name| {
            ObjectRef::<Failover>::new(name).within(namespace.as_deref().unwrap_or("default"))
        })
    };
    let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=valkey-operator");
    let controller = Controller::new(
        Api::<Failover>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<StatefulSet>::all(client.clone()), config.clone())
    .owns(Api::<Service>::all(client.clone()), config.clone())
    .owns(Api::<ConfigMap>::all(client.clone()), config.clone())
    .owns(Api::<Secret>::all(client.clone()), config.clone())
    .owns(Api::<PodDisruptionBudget>::all(client.clone()), config)
    .watches(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(LABEL_INSTANCE),
        by_instance_label,
    )
    .reconcile_on(reports)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, context)
    .for_each(|result| async move {
        if let Err(err) = result {
            warn!(error = %err, "reconcile");
        }
    });

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
        () = controller => Ok(()),
        err = renew => Err(err),
    };
    set_leader_label(&client, &options, false).await;
    if let Err(err) = elector.release().await {
        warn!(error = %err, "could not release the lease");
    }
    outcome
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
