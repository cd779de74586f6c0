//! The agent's one stream to the controller: dials it, says hello, sends reports at once on
//! every significant change and heartbeats otherwise, hands commands to the executor and sends
//! back their results (also those finished while the stream was down), and reconnects with
//! backoff and jitter when the controller is away. On shutdown a master first asks for a
//! switchover and waits, bounded, for its role to move.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};
use valkey_proto::v1::{
    AgentMessage, CommandResult, ControllerMessage, Heartbeat, Hello, NodeKind, ProcessState, Role,
    StateReport, SwitchoverRequest, agent_hub_client::AgentHubClient, agent_message::Msg,
    controller_message,
};

use crate::{
    config::{Config, ControllerConfig, Mode},
    executor::Executor,
    fence::Fence,
    metrics::Metrics,
    snapshot::{Shared, Snapshot, now_ms},
};

/// Bumped if the meaning of v1 messages ever changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;
/// Results kept for delivery while the controller is away.
const UNDELIVERED_LIMIT: usize = 256;

/// How a session with the controller ended.
enum End {
    /// The stream was lost (or never came up); try again.
    Lost { established: bool },
    /// The agent is shutting down.
    Stopped,
}

/// What the link works with: the agent's settings, the controller's address, the watcher's
/// snapshots, the executor, the fence, the metrics, the report sequence, the address its gRPC
/// server is reached at, and the state it shares with the watcher.
#[derive(Debug)]
pub struct LinkParts {
    pub config: Arc<Config>,
    pub controller: ControllerConfig,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub executor: Arc<Executor>,
    pub fence: Arc<Fence>,
    pub metrics: Metrics,
    pub seq: Arc<AtomicU64>,
    pub agent_address: String,
    pub shared: Arc<Shared>,
}

#[derive(Debug)]
pub struct Link {
    config: Arc<Config>,
    controller: ControllerConfig,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    executor: Arc<Executor>,
    fence: Arc<Fence>,
    metrics: Metrics,
    seq: Arc<AtomicU64>,
    results_tx: mpsc::Sender<CommandResult>,
    results_rx: mpsc::Receiver<CommandResult>,
    undelivered: VecDeque<CommandResult>,
    agent_address: String,
    shared: Arc<Shared>,
}

fn is_master(snapshot: &Snapshot) -> bool {
    let report = &snapshot.report;
    report.process() != ProcessState::Down
        && report
            .data
            .as_ref()
            .is_some_and(|d| d.role() == Role::Master)
}

impl Link {
    pub fn new(parts: LinkParts) -> Self {
        let LinkParts {
            config,
            controller,
            snapshots,
            executor,
            fence,
            metrics,
            seq,
            agent_address,
            shared,
        } = parts;
        let (results_tx, results_rx) = mpsc::channel(64);
        Self {
            config,
            controller,
            snapshots,
            executor,
            fence,
            metrics,
            seq,
            results_tx,
            results_rx,
            undelivered: VecDeque::new(),
            agent_address,
            shared,
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(self.controller.reconnect_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Runs until `stopping` turns true (and a master's switchover is settled).
    pub async fn run(mut self, mut stopping: watch::Receiver<bool>) {
        let mut backoff = self.backoff();
        loop {
            if *stopping.borrow() {
                return;
            }
            match self.session(&mut stopping).await {
                End::Stopped => return,
                End::Lost { established } => {
                    self.metrics.controller_connected.set(0);
                    if established {
                        backoff = self.backoff();
                    }
                }
            }
            let delay = backoff.next().unwrap_or(self.controller.reconnect_max);
            debug!(?delay, "reconnecting to the controller");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopping.changed() => return,
            }
        }
    }

    fn hello(&self, token: String) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            namespace: self.config.namespace.clone(),
            failover: self.config.failover.clone(),
            pod_name: self.config.pod_name.clone(),
            kind: match self.config.mode {
                Mode::Data => NodeKind::Data,
                Mode::Sentinel => NodeKind::Sentinel,
            }
            .into(),
            announce_host: self.config.announce_host.clone(),
            announce_port: u32::from(self.config.announce_port),
            token,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            epoch: self.fence.epoch(),
            agent_address: self.agent_address.clone(),
        }
    }

    fn numbered(&self, mut report: StateReport) -> StateReport {
        report.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        report.epoch = self.fence.epoch();
        report.lease_request_ms = self.shared.lease.request_stamp();
        report
    }

    /// A channel to the controller, over TLS when a CA is given.
    async fn connect(&self) -> Option<tonic::transport::Channel> {
        let endpoint = match Endpoint::from_shared(self.controller.addr.clone()) {
            Ok(endpoint) => endpoint
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true),
            Err(err) => {
                warn!(addr = %self.controller.addr, error = %err, "bad controller address");
                return None;
            }
        };
        let endpoint = match &self.controller.ca_file {
            None => endpoint,
            Some(ca_file) => match controller_tls(ca_file).and_then(|tls| {
                endpoint
                    .tls_config(tls)
                    .map_err(|e| format!("TLS settings: {e}"))
            }) {
                Ok(endpoint) => endpoint,
                Err(why) => {
                    warn!(error = %why, "cannot set up TLS to the controller; retrying");
                    return None;
                }
            },
        };
        match endpoint.connect().await {
            Ok(channel) => Some(channel),
            Err(err) => {
                let why = error_chain(&err);
                if is_tls_failure(&err) {
                    warn!(addr = %self.controller.addr, error = %why, "the controller's TLS certificate is not accepted (checked against --controller-ca-file); not connecting");
                } else {
                    debug!(addr = %self.controller.addr, error = %why, "controller unreachable");
                }
                None
            }
        }
    }

    /// The stream to the controller, opened with a Hello bearing `token`.
    async fn open(
        &self,
        channel: tonic::transport::Channel,
        token: String,
    ) -> Option<(
        mpsc::Sender<AgentMessage>,
        tonic::Streaming<ControllerMessage>,
    )> {
        let (tx, rx) = mpsc::channel::<AgentMessage>(64);
        let hello = AgentMessage {
            msg: Some(Msg::Hello(self.hello(token))),
        };
        tx.send(hello).await.ok()?;
        match AgentHubClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await
        {
            Ok(response) => Some((tx, response.into_inner())),
            Err(status) => {
                warn!(code = ?status.code(), message = status.message(), "the controller refused the stream");
                None
            }
        }
    }

    /// A message from the controller: commands run in a task of their own (their results
    /// come back through `results_rx`), a welcome sets the heartbeat, a lease is taken.
    fn on_message(
        &self,
        message: Result<Option<ControllerMessage>, tonic::Status>,
        beat: &mut Beat,
    ) -> Option<End> {
        match message {
            Ok(Some(ControllerMessage {
                msg: Some(controller_message::Msg::Command(command)),
            })) => {
                let executor = self.executor.clone();
                let results = self.results_tx.clone();
                tokio::spawn(async move {
                    let result = executor.execute(command).await;
                    // The link owns the receiver for the agent's whole life.
                    let _ = results.send(result).await;
                });
            }
            Ok(Some(ControllerMessage {
                msg: Some(controller_message::Msg::Welcome(welcome)),
            })) => {
                if welcome.heartbeat_interval_ms >= 50 {
                    *beat = Beat::every(Duration::from_millis(u64::from(
                        welcome.heartbeat_interval_ms,
                    )));
                }
                debug!(heartbeat_every = ?beat.every, "welcomed by the controller");
            }
            Ok(Some(ControllerMessage {
                msg: Some(controller_message::Msg::Lease(lease)),
            })) => {
                self.shared.lease.grant(lease.request_ms, lease.lease_ms);
            }
            Ok(Some(ControllerMessage { msg: None })) => {
                warn!("ignoring an empty or unknown message from the controller");
            }
            Ok(None) => {
                info!("the controller closed the stream");
                return Some(End::Lost { established: true });
            }
            Err(status) => {
                warn!(code = ?status.code(), message = status.message(), "stream to the controller broke");
                return Some(End::Lost { established: true });
            }
        }
        None
    }

    /// The stream ends: a last report, then our half closed, and the controller's awaited.
    async fn drain(
        &self,
        tx: mpsc::Sender<AgentMessage>,
        mut inbound: tonic::Streaming<ControllerMessage>,
    ) {
        let snapshot = self.snapshots.borrow().clone();
        let report = Msg::Report(self.numbered(snapshot.report.clone()));
        let _ = tx.send(AgentMessage { msg: Some(report) }).await;
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        self.metrics.controller_connected.set(0);
    }

    async fn session(&mut self, stopping: &mut watch::Receiver<bool>) -> End {
        let token = match self.controller.token.read() {
            Ok(token) if !token.is_empty() => token,
            Ok(_) => {
                warn!("the controller token is empty; not connecting");
                return End::Lost { established: false };
            }
            Err(err) => {
                warn!(error = %err, "cannot read the controller token");
                return End::Lost { established: false };
            }
        };
        let opened = match self.connect().await {
            Some(channel) => self.open(channel, token).await,
            None => None,
        };
        let Some((tx, mut inbound)) = opened else {
            return End::Lost { established: false };
        };
        info!(addr = %self.controller.addr, "connected to the controller");
        self.metrics.controller_connected.set(1);

        let send = |msg: Msg| {
            let tx = tx.clone();
            async move { tx.send(AgentMessage { msg: Some(msg) }).await.is_ok() }
        };
        // What the controller missed while away.
        while let Some(result) = self.undelivered.pop_front() {
            if !send(Msg::Result(result.clone())).await {
                self.undelivered.push_front(result);
                return End::Lost { established: true };
            }
            self.metrics.sent("result");
        }
        let mut beat = Beat::every(self.config.heartbeat_interval);
        let mut last_significant = None;
        let mut last_revision = None;
        let mut switchover_deadline: Option<tokio::time::Instant> = None;
        let mut report_now = true;

        let end = loop {
            if report_now {
                report_now = false;
                let snapshot = self.snapshots.borrow_and_update().clone();
                last_significant = Some(snapshot.significant);
                last_revision = Some(snapshot.revision);
                if !send(Msg::Report(self.numbered(snapshot.report.clone()))).await {
                    break End::Lost { established: true };
                }
                self.metrics.sent("report");
                beat.interval.reset();
                if switchover_deadline.is_some() && !is_master(&snapshot) {
                    info!("no longer master; shutting down");
                    break End::Stopped;
                }
            }
            let deadline = switchover_deadline;
            let stop_wait = async move {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = inbound.message() => {
                    if let Some(end) = self.on_message(message, &mut beat) {
                        break end;
                    }
                }
                Some(result) = self.results_rx.recv() => {
                    if !send(Msg::Result(result.clone())).await {
                        self.undelivered.push_back(result);
                        break End::Lost { established: true };
                    }
                    self.metrics.sent("result");
                }
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        break End::Stopped;
                    }
                    let snapshot = self.snapshots.borrow().clone();
                    report_now = last_significant != Some(snapshot.significant)
                        || (switchover_deadline.is_some() && !is_master(&snapshot));
                }
                _ = beat.interval.tick() => {
                    let revision = self.snapshots.borrow().revision;
                    if last_revision != Some(revision) {
                        report_now = true;
                    } else {
                        let last_seq = self.seq.load(Ordering::Relaxed);
                        if !send(Msg::Heartbeat(Heartbeat { last_seq, sent_at_ms: now_ms(), lease_request_ms: self.shared.lease.request_stamp() })).await {
                            break End::Lost { established: true };
                        }
                        self.metrics.sent("heartbeat");
                    }
                }
                _ = stopping.changed(), if switchover_deadline.is_none() => {
                    let snapshot = self.snapshots.borrow().clone();
                    if self.config.mode == Mode::Data && is_master(&snapshot) && !self.config.shutdown_switchover_timeout.is_zero() {
                        info!(timeout = ?self.config.shutdown_switchover_timeout, "terminating as master: asking the controller for a switchover");
                        if !send(Msg::SwitchoverRequest(SwitchoverRequest { reason: "agent received SIGTERM".into() })).await {
                            break End::Stopped;
                        }
                        self.metrics.sent("switchover_request");
                        switchover_deadline = Some(tokio::time::Instant::now() + self.config.shutdown_switchover_timeout);
                    } else {
                        break End::Stopped;
                    }
                }
                _ = stop_wait => {
                    warn!("no switchover within the shutdown timeout; shutting down as master");
                    break End::Stopped;
                }
            }
        };
        if matches!(end, End::Stopped) {
            self.drain(tx, inbound).await;
        }
        while self.undelivered.len() > UNDELIVERED_LIMIT {
            self.undelivered.pop_front();
        }
        end
    }
}

/// How often the agent says it is alive when it has nothing new to report.
struct Beat {
    every: Duration,
    interval: tokio::time::Interval,
}

impl Beat {
    fn every(every: Duration) -> Self {
        let mut interval = tokio::time::interval(every);
        interval.reset();
        Beat { every, interval }
    }
}

/// TLS to the controller, verified against the CA bundle in `ca_file` (read anew each time).
fn controller_tls(ca_file: &std::path::Path) -> Result<ClientTlsConfig, String> {
    let pem = crate::tls::read_bundle(ca_file).map_err(|e| format!("--controller-ca-file {e}"))?;
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
}

/// An error and its causes, on one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether a connect failed in the TLS handshake (an untrusted or wrong certificate), rather
/// than on the network.
fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if cause.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        source = cause.source();
    }
    false
}
