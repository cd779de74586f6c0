//! valkey-agent: the sidecar in every Valkey and Sentinel pod. It watches its local process,
//! reports role and health to the controller over one gRPC stream, carries out the controller's
//! commands behind an epoch fence, and serves grpc.health.v1 for kubelet probes.

pub mod actions;
pub mod clients;
pub mod config;
pub mod executor;
pub mod fence;
pub mod health;
pub mod info;
pub mod lease;
pub mod link;
pub mod listen;
pub mod metrics;
pub mod passwords;
pub mod query;
pub mod snapshot;
pub mod tls;
pub mod valkey;
pub mod vigil;
pub mod watcher;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::Context;
use tokio::sync::watch;
use tracing::{info, warn};
use valkey_proto::v1::agent_state_server::AgentStateServer;

pub use config::{Args, Config};

/// Runs the agent until `shutdown` resolves (SIGTERM in production), then shuts down in order:
/// not ready, switchover if master, drain the controller stream, stop serving.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let fence = Arc::new(fence::Fence::open(&config.data_dir).with_context(|| {
        format!(
            "--data-dir {}: cannot open the agent state",
            config.data_dir.display()
        )
    })?);
    let metrics = metrics::Metrics::new();
    let shared = Arc::new(snapshot::Shared::default());
    let seq = Arc::new(AtomicU64::new(0));

    let (listener, metrics_listener) = bind(&config).await?;
    let grpc_addr = listener.local_addr()?;
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (mut watcher, snapshots) = watcher::Watcher::new(
        config.clone(),
        fence.clone(),
        shared.clone(),
        metrics.clone(),
    )
    .context("--valkey-addr: cannot set up the local client")?;
    let executor = Arc::new(
        executor::Executor::new(
            config.clone(),
            fence.clone(),
            shared.clone(),
            metrics.clone(),
        )
        .context("--valkey-addr: cannot set up the local client")?,
    );
    // One probe before anything reports, so the first report says something.
    watcher.probe_once().await;
    let mut background = vec![tokio::spawn(watcher.run())];
    background.extend(spawn_local_work(&config, &shared, &snapshots, &metrics));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(health::serve_status(
        reporter,
        snapshots.clone(),
        stop_rx.clone(),
    ));
    let metrics_task = metrics_listener.map(|l| tokio::spawn(metrics::serve(l, metrics.clone())));

    let (server_stop_tx, mut server_stop_rx) = watch::channel(false);
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(AgentStateServer::new(query::StateService {
            snapshots: snapshots.clone(),
            seq: seq.clone(),
            fence: fence.clone(),
        }))
        .serve_with_incoming_shutdown(
            listen::gated(listener, listen::GRPC_CONNECTIONS),
            async move {
                let _ = server_stop_rx.wait_for(|stop| *stop).await;
            },
        );
    let server_task = tokio::spawn(server);

    let link_task = config.controller.clone().map(|controller| {
        let link = link::Link::new(link::LinkParts {
            config: config.clone(),
            controller,
            snapshots: snapshots.clone(),
            executor: executor.clone(),
            fence: fence.clone(),
            metrics: metrics.clone(),
            seq: seq.clone(),
            agent_address: grpc_addr.to_string(),
            shared: shared.clone(),
        });
        tokio::spawn(link.run(stop_rx.clone()))
    });
    info!(
        grpc = %grpc_addr,
        metrics = ?metrics_addr,
        mode = ?config.mode,
        valkey = %format_args!("{}:{}", config.valkey_host, config.valkey_port),
        controller = config.controller.as_ref().map(|c| c.addr.as_str()).unwrap_or("none"),
        epoch = fence.epoch(),
        "valkey-agent started"
    );

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(link) = link_task {
        let bound = config.shutdown_switchover_timeout + Duration::from_secs(5);
        if tokio::time::timeout(bound, link).await.is_err() {
            warn!("the controller stream did not drain in time");
        }
    }
    let _ = server_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), server_task).await;
    background.push(health_task);
    if let Some(task) = metrics_task {
        task.abort();
    }
    for task in background {
        task.abort();
    }
    info!("stopped");
    Ok(())
}

/// The tasks that look after the local process, aborted at shutdown: moving clients off a
/// demoted master, the write lease and the vigils (data nodes), the certificates' reload.
fn spawn_local_work(
    config: &Arc<Config>,
    shared: &Arc<snapshot::Shared>,
    snapshots: &watch::Receiver<Arc<snapshot::Snapshot>>,
    metrics: &metrics::Metrics,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(clients::run(config.clone(), shared.clone())),
        tokio::spawn(tls::watch(config.clone(), metrics.clone())),
    ];
    if config.mode == config::Mode::Data {
        let retry = config.probe_interval;
        let host = config.valkey_host.clone();
        tasks.extend([
            tokio::spawn(lease::run(
                config.clone(),
                shared.clone(),
                snapshots.clone(),
            )),
            tokio::spawn(vigil::local(
                shared.clone(),
                retry,
                host,
                config.valkey_port,
            )),
            tokio::spawn(vigil::master(shared.clone(), retry, snapshots.clone())),
        ]);
    }
    tasks
}

/// The gRPC listener, and the metrics one when asked for.
async fn bind(
    config: &Config,
) -> anyhow::Result<(tokio::net::TcpListener, Option<tokio::net::TcpListener>)> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen", config.listen))?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .with_context(|| format!("--metrics-listen {addr}: cannot listen"))?,
        ),
        None => None,
    };
    Ok((listener, metrics_listener))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
