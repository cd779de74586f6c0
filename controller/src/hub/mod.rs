//! The agent hub: the server side of the agent stream. It authenticates agents, keeps each
//! pod's latest report and stream liveness, sends commands and awaits their results with
//! deadlines, and passes on agents' switchover requests.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use valkey_proto::v1::{
    AgentMessage, Command, CommandResult, ControllerMessage, Hello, Lease, NodeKind, ProcessState,
    StateReport, Welcome,
    agent_hub_server::{AgentHub, AgentHubServer},
    agent_message::Msg,
    controller_message,
};

use crate::decide::model::{NodeObs, Observed};

pub mod limits;
pub mod tls;

/// How long a stream has to have its Hello accepted (the token check included).
const HELLO_DEADLINE: Duration = Duration::from_secs(10);

/// Which Failover a pod belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    pub namespace: String,
    pub name: String,
}

/// Decides whether a Hello may open a stream.
pub trait Authenticator: Send + Sync + 'static {
    /// Ok when the agent's hello (its token, pod and instance) is accepted.
    fn check<'a>(&'a self, hello: &'a Hello) -> AuthFuture<'a>;
}

/// What an [`Authenticator`] returns: a check may call out (e.g. a TokenReview).
pub type AuthFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// One shared token (the local runtime's).
#[derive(Clone)]
pub struct StaticToken(pub String);

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticToken(<redacted>)")
    }
}

impl Authenticator for StaticToken {
    fn check<'a>(&'a self, hello: &'a Hello) -> AuthFuture<'a> {
        let result = if hello.token == self.0 {
            Ok(())
        } else {
            Err(format!(
                "wrong token from {}/{}",
                hello.namespace, hello.pod_name
            ))
        };
        Box::pin(std::future::ready(result))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("no agent stream from pod {0}")]
    NotConnected(String),
    #[error("pod {pod} did not answer command {id} within {timeout:?}")]
    Timeout {
        pod: String,
        id: String,
        timeout: Duration,
    },
    #[error("the stream to pod {0} closed before the command was answered")]
    Closed(String),
}

/// Who may answer a command, and who waits for the answer.
#[derive(Debug)]
struct Waiter {
    stream: (InstanceKey, String, u64),
    done: oneshot::Sender<CommandResult>,
}

#[derive(Debug)]
struct Node {
    hello: Hello,
    session: u64,
    tx: Option<mpsc::Sender<Result<ControllerMessage, Status>>>,
    report: Option<StateReport>,
    /// When the node was last seen connected with its Valkey up.
    last_good: Option<Instant>,
    /// When this node was last sent a write lease, and how many it was sent.
    granted_at: Option<Instant>,
    grants: u64,
}

/// Who holds an instance's write lease: the pod, and the epoch it holds it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub pod: String,
    pub epoch: u64,
}

/// Something the hub wants the runtime to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// A master's agent is being terminated and asks for its role to move.
    SwitchoverRequested { instance: InstanceKey, pod: String },
}

#[derive(Debug)]
struct Inner {
    /// Ordered by instance, so that one instance's nodes are a range (observing one is cheap
    /// however many instances the hub serves).
    nodes: Mutex<std::collections::BTreeMap<(InstanceKey, String), Node>>,
    /// Commands awaiting their result, by id: only the stream the command went out on may
    /// answer it.
    pending: Mutex<HashMap<String, Waiter>>,
    /// Hellos being checked (their tokens reviewed) at once.
    checks: tokio::sync::Semaphore,
    /// Refused Hellos, logged at a bounded rate.
    refused: Mutex<valkey_netguard::Throttle>,
    changed: watch::Sender<u64>,
    instances: tokio::sync::broadcast::Sender<InstanceKey>,
    events: mpsc::UnboundedSender<HubEvent>,
    sessions: AtomicU64,
    heartbeat: Duration,
    /// The node of each instance that is granted the write lease (locked after `nodes`).
    leases: Mutex<HashMap<InstanceKey, LeaseHolder>>,
    /// A controller that just started (or just became leader) cannot know what its
    /// predecessor granted: every node counts as granted a lease at this moment.
    started: Mutex<Instant>,
}

/// The hub; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    auth: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn key_of(hello: &Hello) -> (InstanceKey, String) {
    (
        InstanceKey {
            namespace: hello.namespace.clone(),
            name: hello.failover.clone(),
        },
        hello.pod_name.clone(),
    )
}

impl Hub {
    /// A hub and the receiver of its events.
    pub fn new(
        auth: impl Authenticator,
        heartbeat: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<HubEvent>) {
        let (events, events_rx) = mpsc::unbounded_channel();
        let (changed, _) = watch::channel(0);
        let hub = Self {
            inner: Arc::new(Inner {
                nodes: Mutex::default(),
                pending: Mutex::default(),
                checks: tokio::sync::Semaphore::new(limits::Limits::default().concurrent_checks),
                refused: Mutex::default(),
                changed,
                instances: tokio::sync::broadcast::channel(4096).0,
                events,
                sessions: AtomicU64::new(0),
                heartbeat,
                leases: Mutex::default(),
                started: Mutex::new(Instant::now()),
            }),
            auth: Arc::new(auth),
        };
        (hub, events_rx)
    }

    pub fn server(&self) -> AgentHubServer<Self> {
        AgentHubServer::new(self.clone())
    }

    /// Ticks on every report, connect and disconnect.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Wakes whoever drives `instance`, as a report would: after anything that changes what
    /// its next pass may do (a switchover that ended, say).
    pub fn touch(&self, instance: &InstanceKey) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
        // Nobody listening is fine (the local runtime uses the counter only).
        let _ = self.inner.instances.send(instance.clone());
    }

    /// The instance of every report, connect and disconnect, for a controller that reconciles
    /// instances one by one. A slow receiver skips ahead (and should then look at everything).
    pub fn subscribe_instances(&self) -> tokio::sync::broadcast::Receiver<InstanceKey> {
        self.inner.instances.subscribe()
    }

    /// Agents with an open stream.
    pub fn connected(&self) -> usize {
        self.inner
            .nodes
            .lock()
            .map(|nodes| nodes.values().filter(|n| n.tx.is_some()).count())
            .unwrap_or(0)
    }

    /// What the hub knows of one instance's data pods, for the failover core.
    pub fn observe(&self, instance: &InstanceKey) -> Observed {
        Observed {
            nodes: self.observe_kind(instance, NodeKind::Data),
            switchover_in_flight: false,
        }
    }

    /// The pods of one kind of an instance whose agent is connected now.
    pub fn connected_pods(&self, instance: &InstanceKey, kind: NodeKind) -> Vec<String> {
        self.observe_kind(instance, kind)
            .into_iter()
            .filter(|(_, o)| o.connected)
            .map(|(pod, _)| pod)
            .collect()
    }

    /// What the hub knows of one instance's pods of one kind, by pod name.
    pub fn observe_kind(
        &self,
        instance: &InstanceKey,
        kind: NodeKind,
    ) -> std::collections::BTreeMap<String, NodeObs> {
        let now = Instant::now();
        let started = self
            .inner
            .started
            .lock()
            .map_or_else(|_| Instant::now(), |t| *t);
        self.inner
            .nodes
            .lock()
            .map(|nodes| {
                nodes
                    .range((instance.clone(), String::new())..)
                    .take_while(|((key, _), _)| key == instance)
                    .filter(|(_, node)| node.hello.kind() == kind)
                    .map(|((_, pod), node)| {
                        let obs = NodeObs {
                            connected: node.tx.is_some(),
                            unhealthy_ms: node
                                .last_good
                                .map(|t| now.saturating_duration_since(t).as_millis() as u64)
                                .unwrap_or(u64::MAX),
                            report: node.report.clone(),
                            lease_granted_ms: Some(
                                now.saturating_duration_since(
                                    node.granted_at.map_or(started, |t| t.max(started)),
                                )
                                .as_millis() as u64,
                            ),
                            lease_grants: node.grants,
                        };
                        (pod.clone(), obs)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends the stream of `pod`'s agent, if one is open, telling it why: its pod is gone, so
    /// whatever it says is no longer a pod's (it may reconnect: its token is reviewed again).
    pub fn disconnect(&self, instance: &InstanceKey, pod: &str, why: &str) {
        let tx = self.inner.nodes.lock().ok().and_then(|mut nodes| {
            nodes
                .get_mut(&(instance.clone(), pod.to_owned()))?
                .tx
                .take()
        });
        if let Some(tx) = tx {
            info!(pod = %pod, failover = %instance.name, why, "closing an agent's stream");
            let _ = tx.try_send(Err(Status::unauthenticated(why.to_owned())));
            self.touch(instance);
        }
    }

    /// The announced address of a pod, as its agent said hello.
    pub fn hello(&self, instance: &InstanceKey, pod: &str) -> Option<Hello> {
        let nodes = self.inner.nodes.lock().ok()?;
        nodes
            .get(&(instance.clone(), pod.to_owned()))
            .map(|n| n.hello.clone())
    }

    /// Sends a command to a pod and waits for its result.
    pub async fn command(
        &self,
        instance: &InstanceKey,
        pod: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandResult, HubError> {
        let (tx, session) = self
            .inner
            .nodes
            .lock()
            .ok()
            .and_then(|nodes| {
                let node = nodes.get(&(instance.clone(), pod.to_owned()))?;
                Some((node.tx.clone()?, node.session))
            })
            .ok_or_else(|| HubError::NotConnected(pod.to_owned()))?;
        let id = command.id.clone();
        let (done, result) = oneshot::channel();
        if let Ok(mut pending) = self.inner.pending.lock() {
            let stream = (instance.clone(), pod.to_owned(), session);
            pending.insert(id.clone(), Waiter { stream, done });
        }
        let message = ControllerMessage {
            msg: Some(controller_message::Msg::Command(command)),
        };
        if tx.send(Ok(message)).await.is_err() {
            self.forget(&id);
            return Err(HubError::NotConnected(pod.to_owned()));
        }
        match tokio::time::timeout(timeout, result).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(HubError::Closed(pod.to_owned())),
            Err(_) => {
                self.forget(&id);
                Err(HubError::Timeout {
                    pod: pod.to_owned(),
                    id,
                    timeout,
                })
            }
        }
    }

    fn forget(&self, id: &str) {
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.remove(id);
        }
    }

    /// This process now leads: whatever a previous leader granted may still hold, so no
    /// node's lease counts as lapsed before a lease and its margin from now.
    pub fn leading(&self) {
        if let Ok(mut started) = self.inner.started.lock() {
            *started = Instant::now();
        }
    }

    /// Who is granted the write lease of `instance` from now on (None: nobody). A change of
    /// holder takes effect at once: no grant goes to the previous one after this returns.
    pub fn hold_lease(&self, instance: &InstanceKey, holder: Option<LeaseHolder>) {
        if let Ok(mut leases) = self.inner.leases.lock() {
            match holder {
                Some(holder) => {
                    if leases.get(instance) != Some(&holder) {
                        debug!(instance = %instance.name, pod = %holder.pod, epoch = holder.epoch, "write lease holder");
                        leases.insert(instance.clone(), holder);
                    }
                }
                None => {
                    leases.remove(instance);
                }
            }
        }
    }

    /// Takes the write lease away from `pod` before another node is promoted, provided it was
    /// sent no grant since it was observed with `grants_seen` of them; false if it was (the
    /// observation is stale, and the decision must be made again).
    pub fn revoke_lease(&self, instance: &InstanceKey, pod: &str, grants_seen: u64) -> bool {
        let Ok(nodes) = self.inner.nodes.lock() else {
            return false;
        };
        let grants = nodes
            .get(&(instance.clone(), pod.to_owned()))
            .map_or(0, |n| n.grants);
        if grants != grants_seen {
            return false;
        }
        if let Ok(mut leases) = self.inner.leases.lock()
            && leases.get(instance).is_some_and(|h| h.pod == pod)
        {
            leases.remove(instance);
        }
        true
    }

    /// Answers a report's or heartbeat's lease request when its node holds the lease.
    fn grant(&self, key: &(InstanceKey, String), node: &mut Node, request_ms: u64) {
        if request_ms == 0 {
            return;
        }
        let Some(holder) = self
            .inner
            .leases
            .lock()
            .ok()
            .and_then(|l| l.get(&key.0).cloned())
            .filter(|h| h.pod == key.1 && crate::decide::lease::grantable(node.report.as_ref()))
        else {
            return;
        };
        let Some(tx) = &node.tx else { return };
        let lease = ControllerMessage {
            msg: Some(controller_message::Msg::Lease(Lease {
                request_ms,
                lease_ms: crate::decide::lease::LEASE_MS as u32,
                epoch: holder.epoch,
            })),
        };
        // Counted as sent even if the queue is full: the controller's wait must cover it.
        node.granted_at = Some(Instant::now());
        node.grants += 1;
        if tx.try_send(Ok(lease)).is_err() {
            debug!(pod = %key.1, "lease grant not queued (stream full or closing)");
        }
    }

    fn on_message(&self, key: &(InstanceKey, String), session: u64, msg: Msg) {
        match msg {
            Msg::Report(report) => {
                if let Ok(mut nodes) = self.inner.nodes.lock()
                    && let Some(node) = nodes.get_mut(key).filter(|n| n.session == session)
                {
                    if report.process() == ProcessState::Up {
                        node.last_good = Some(Instant::now());
                    }
                    let request = report.lease_request_ms;
                    node.report = Some(report);
                    self.grant(key, node, request);
                }
                self.touch(&key.0);
            }
            Msg::Heartbeat(heartbeat) => {
                if let Ok(mut nodes) = self.inner.nodes.lock()
                    && let Some(node) = nodes.get_mut(key).filter(|n| n.session == session)
                {
                    if node
                        .report
                        .as_ref()
                        .is_some_and(|r| r.process() == ProcessState::Up)
                    {
                        node.last_good = Some(Instant::now());
                    }
                    self.grant(key, node, heartbeat.lease_request_ms);
                }
            }
            Msg::Result(result) => {
                // Only from the stream the command was sent on: another pod, or an older
                // stream of the same one, cannot answer it.
                let waiter = self.inner.pending.lock().ok().and_then(|mut pending| {
                    let from_sender = pending.get(&result.id).is_some_and(|w| {
                        w.stream.0 == key.0 && w.stream.1 == key.1 && w.stream.2 == session
                    });
                    if pending.contains_key(&result.id) && !from_sender {
                        warn!(pod = %key.1, id = %result.id, "ignored a result for a command sent to another stream");
                    }
                    from_sender.then(|| pending.remove(&result.id)).flatten()
                });
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.done.send(result);
                    }
                    None => debug!(id = %result.id, "result for a command nobody waits for"),
                }
            }
            Msg::SwitchoverRequest(request) => {
                info!(pod = %key.1, reason = %request.reason, "agent asks for a switchover");
                let _ = self.inner.events.send(HubEvent::SwitchoverRequested {
                    instance: key.0.clone(),
                    pod: key.1.clone(),
                });
            }
            Msg::Hello(_) => warn!(pod = %key.1, "ignoring a second hello"),
        }
    }
}

impl Hub {
    /// The stream's first message, a Hello whose token is accepted.
    async fn accept_hello(&self, inbound: &mut Streaming<AgentMessage>) -> Result<Hello, Status> {
        let hello = match inbound.message().await? {
            Some(AgentMessage {
                msg: Some(Msg::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
        };
        // Only a Hello that arrived waits for a check: the checks in flight are bounded by
        // how fast they are answered, not by how long a client keeps quiet.
        let checked = match self.inner.checks.acquire().await {
            Ok(_check) => self.auth.check(&hello).await,
            Err(_) => Err("the hub is shutting down".to_owned()),
        };
        if let Err(why) = checked {
            let logged = self.inner.refused.lock().ok().and_then(|mut t| t.hit());
            if let Some(refused) = logged {
                warn!(
                    pod = %valkey_netguard::untrusted(&hello.pod_name),
                    namespace = %valkey_netguard::untrusted(&hello.namespace),
                    refused,
                    "refused an agent: {}", valkey_netguard::untrusted(&why)
                );
            }
            return Err(Status::unauthenticated("the agent's token was refused"));
        }
        Ok(hello)
    }
}

#[tonic::async_trait]
impl AgentHub for Hub {
    type AttachStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let conn = request.extensions().get::<limits::ConnInfo>().cloned();
        let mut inbound = request.into_inner();
        // One stream at a time may say hello on a connection that has not authenticated, for
        // a bounded time; the gate bounds such connections, closing the oldest for new ones.
        let _hello_slot = match &conn {
            Some(conn) => Some(conn.turn().ok_or_else(|| {
                Status::resource_exhausted(
                    "another stream of this connection is saying hello; one at a time",
                )
            })?),
            None => None,
        };
        let hello = tokio::time::timeout(HELLO_DEADLINE, self.accept_hello(&mut inbound))
            .await
            .map_err(|_| Status::deadline_exceeded("no accepted Hello in time"))??;
        if let Some(conn) = conn {
            conn.prove();
        }
        let key = key_of(&hello);
        let session = self.inner.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(64);
        let welcome = ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(Welcome {
                heartbeat_interval_ms: self.inner.heartbeat.as_millis() as u32,
            })),
        };
        let _ = tx.send(Ok(welcome)).await;
        info!(pod = %hello.pod_name, failover = %hello.failover, addr = %format_args!("{}:{}", hello.announce_host, hello.announce_port), "agent connected");
        if let Ok(mut nodes) = self.inner.nodes.lock() {
            let previous = nodes.remove(&key);
            nodes.insert(
                key.clone(),
                Node {
                    hello,
                    session,
                    tx: Some(tx),
                    report: previous.as_ref().and_then(|p| p.report.clone()),
                    last_good: previous.as_ref().and_then(|p| p.last_good),
                    // A new stream does not forget what the previous one was granted.
                    granted_at: previous.as_ref().and_then(|p| p.granted_at),
                    grants: previous.map_or(0, |p| p.grants),
                },
            );
        }
        self.touch(&key.0);
        let hub = self.clone();
        // An agent sends a heartbeat every interval: a stream silent for many is dead or not
        // an agent's.
        let silence = (self.inner.heartbeat * 10).max(Duration::from_secs(15));
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(silence, inbound.message()).await {
                    Ok(Ok(Some(AgentMessage { msg: Some(msg) }))) => {
                        hub.on_message(&key, session, msg)
                    }
                    Ok(Ok(Some(AgentMessage { msg: None }))) => {}
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    Err(_) => {
                        warn!(pod = %key.1, silent_ms = silence.as_millis() as u64, "closing a silent agent stream");
                        break;
                    }
                }
            }
            info!(pod = %key.1, "agent stream closed");
            if let Ok(mut nodes) = hub.inner.nodes.lock()
                && let Some(node) = nodes.get_mut(&key).filter(|n| n.session == session)
            {
                node.tx = None;
            }
            hub.touch(&key.0);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
