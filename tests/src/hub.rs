//! A minimal controller side of the agent stream, for testing the agent before (and apart
//! from) the real hub: it checks the token, records everything agents send, and lets a test
//! send commands, await results and cut streams.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use valkey_proto::v1::{
    AgentMessage, Command, CommandResult, ControllerMessage, Hello, StateReport,
    agent_hub_server::{AgentHub, AgentHubServer},
    agent_message::Msg,
    command::Action,
    controller_message,
};

/// Something an agent did, in arrival order.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Event {
    Hello(Hello),
    Report { pod: String, report: StateReport },
    Heartbeat { pod: String },
    Result { pod: String, result: CommandResult },
    SwitchoverRequest { pod: String },
    Rejected { reason: String },
    Closed { pod: String },
}

type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;

#[derive(Debug, Default)]
struct State {
    events: Vec<Event>,
    /// The live stream to each pod.
    sessions: Vec<(String, Outbound)>,
}

#[derive(Debug, Clone)]
struct Service {
    token: Arc<Mutex<String>>,
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Service {
    fn record(&self, event: Event) {
        self.state.lock().expect("hub state").events.push(event);
        self.changed.send_modify(|n| *n += 1);
    }
}

#[tonic::async_trait]
impl AgentHub for Service {
    type AttachStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(AgentMessage {
                msg: Some(Msg::Hello(hello)),
            }) => hello,
            _ => {
                self.record(Event::Rejected {
                    reason: "no hello".into(),
                });
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
        };
        if hello.token != *self.token.lock().expect("token") {
            self.record(Event::Rejected {
                reason: format!("bad token from {}", hello.pod_name),
            });
            return Err(Status::unauthenticated("bad token"));
        }
        let pod = hello.pod_name.clone();
        self.record(Event::Hello(hello));
        let (tx, rx) = mpsc::channel(64);
        let tx_for_reader = tx.downgrade();
        {
            let mut state = self.state.lock().expect("hub state");
            state.sessions.retain(|(p, _)| *p != pod);
            state.sessions.push((pod.clone(), tx));
        }
        let service = self.clone();
        let own = tx_for_reader;
        tokio::spawn(async move {
            loop {
                let event = match inbound.message().await {
                    Ok(Some(AgentMessage { msg: Some(msg) })) => match msg {
                        Msg::Report(report) => Event::Report {
                            pod: pod.clone(),
                            report,
                        },
                        Msg::Heartbeat(_) => Event::Heartbeat { pod: pod.clone() },
                        Msg::Result(result) => Event::Result {
                            pod: pod.clone(),
                            result,
                        },
                        Msg::SwitchoverRequest(_) => Event::SwitchoverRequest { pod: pod.clone() },
                        Msg::Hello(_) => continue,
                    },
                    Ok(Some(AgentMessage { msg: None })) => continue,
                    Ok(None) | Err(_) => {
                        // Close our half too, unless a newer stream from the pod replaced this one.
                        if let Some(own) = own.upgrade() {
                            service
                                .state
                                .lock()
                                .expect("hub state")
                                .sessions
                                .retain(|(p, tx)| p != &pod || !tx.same_channel(&own));
                        }
                        service.record(Event::Closed { pod: pod.clone() });
                        return;
                    }
                };
                service.record(event);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The hub, serving on a loopback port until dropped.
#[derive(Debug)]
pub struct TestHub {
    pub addr: SocketAddr,
    tls: bool,
    service: Service,
    changed: watch::Receiver<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestHub {
    /// Starts a hub that accepts agents presenting `token`.
    pub async fn start(token: &str) -> Self {
        Self::start_at(token, 0).await
    }

    /// Starts a hub on a given port (0: any).
    pub async fn start_at(token: &str, port: u16) -> Self {
        Self::serve(token, port, None).await
    }

    /// Starts a hub that serves TLS only, with `cert` (as the controller's hub does).
    pub async fn start_tls(
        token: &str,
        cert: Arc<valkey_controller::hub::tls::ServerCert>,
    ) -> Self {
        Self::serve(token, 0, Some(cert)).await
    }

    async fn serve(
        token: &str,
        port: u16,
        tls: Option<Arc<valkey_controller::hub::tls::ServerCert>>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind hub");
        let addr = listener.local_addr().expect("hub addr");
        let (changed_tx, changed) = watch::channel(0);
        let service = Service {
            token: Arc::new(Mutex::new(token.to_owned())),
            state: Arc::default(),
            changed: Arc::new(changed_tx),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router =
            tonic::transport::Server::builder().add_service(AgentHubServer::new(service.clone()));
        let stopped = async {
            let _ = stopped.await;
        };
        let tls_on = tls.is_some();
        match tls {
            None => {
                tokio::spawn(
                    router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped),
                );
            }
            Some(cert) => {
                let gate = valkey_controller::hub::limits::Gate::new(
                    valkey_controller::hub::limits::Limits::default().gate(),
                );
                let incoming = valkey_controller::hub::tls::incoming(listener, cert, gate);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped));
            }
        }
        Self {
            addr,
            tls: tls_on,
            service,
            changed,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn events(&self) -> Vec<Event> {
        self.service.state.lock().expect("hub state").events.clone()
    }

    /// Waits until some recorded event passes `pick`, and returns what it picked. Events before
    /// index `from` are ignored.
    pub async fn wait_event<T>(
        &mut self,
        what: &str,
        from: usize,
        timeout: Duration,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let state = self.service.state.lock().expect("hub state");
                if let Some(found) = state.events.iter().skip(from).find_map(&mut pick) {
                    return found;
                }
            }
            let _ = self.changed.borrow_and_update();
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                panic!(
                    "hub: timed out after {timeout:?} waiting for {what}; events: {:#?}",
                    self.summary()
                );
            }
        }
    }

    /// The newest report from `pod` that satisfies `check`, waiting for one.
    pub async fn wait_report(
        &mut self,
        pod: &str,
        timeout: Duration,
        check: impl Fn(&StateReport) -> bool,
    ) -> StateReport {
        let from = self.events().len();
        // A report already received counts if it is the latest from that pod.
        if let Some(latest) = self.latest_report(pod)
            && check(&latest)
        {
            return latest;
        }
        self.wait_report_from(pod, from, timeout, check).await
    }

    /// The first report from `pod` at or after event index `from` that satisfies `check`.
    pub async fn wait_report_from(
        &mut self,
        pod: &str,
        from: usize,
        timeout: Duration,
        check: impl Fn(&StateReport) -> bool,
    ) -> StateReport {
        self.wait_event(
            &format!("a matching report from {pod}"),
            from,
            timeout,
            |e| match e {
                Event::Report { pod: p, report } if p == pod && check(report) => {
                    Some(report.clone())
                }
                _ => None,
            },
        )
        .await
    }

    pub fn latest_report(&self, pod: &str) -> Option<StateReport> {
        self.events().into_iter().rev().find_map(|e| match e {
            Event::Report { pod: p, report } if p == pod => Some(report),
            _ => None,
        })
    }

    pub async fn wait_hello(&mut self, pod: &str, from: usize, timeout: Duration) -> Hello {
        self.wait_event(&format!("hello from {pod}"), from, timeout, |e| match e {
            Event::Hello(h) if h.pod_name == pod => Some(h.clone()),
            _ => None,
        })
        .await
    }

    /// Sends a command down `pod`'s stream; false when there is no stream.
    pub async fn send(&self, pod: &str, command: Command) -> bool {
        let tx = {
            let state = self.service.state.lock().expect("hub state");
            state
                .sessions
                .iter()
                .find(|(p, _)| p == pod)
                .map(|(_, tx)| tx.clone())
        };
        match tx {
            Some(tx) => tx
                .send(Ok(ControllerMessage {
                    msg: Some(controller_message::Msg::Command(command)),
                }))
                .await
                .is_ok(),
            None => false,
        }
    }

    /// Sends a command and waits for its result.
    pub async fn command(
        &mut self,
        pod: &str,
        command: Command,
        timeout: Duration,
    ) -> CommandResult {
        let from = self.events().len();
        let id = command.id.clone();
        assert!(self.send(pod, command).await, "no stream to {pod}");
        self.wait_result(pod, &id, from, timeout).await
    }

    pub async fn wait_result(
        &mut self,
        pod: &str,
        id: &str,
        from: usize,
        timeout: Duration,
    ) -> CommandResult {
        self.wait_event(
            &format!("result {id} from {pod}"),
            from,
            timeout,
            |e| match e {
                Event::Result { pod: p, result } if p == pod && result.id == id => {
                    Some(result.clone())
                }
                _ => None,
            },
        )
        .await
    }

    /// Ends the stream to `pod` from the controller's side.
    pub fn cut(&self, pod: &str) {
        let mut state = self.service.state.lock().expect("hub state");
        state.sessions.retain(|(p, _)| p != pod);
    }

    pub fn set_token(&self, token: &str) {
        *self.service.token.lock().expect("token") = token.to_owned();
    }

    fn summary(&self) -> Vec<String> {
        self.events()
            .iter()
            .rev()
            .take(30)
            .map(|e| match e {
                Event::Report { pod, report } => format!(
                    "report {pod} seq={} process={:?} role={:?}",
                    report.seq,
                    report.process(),
                    report.data.as_ref().map(|d| d.role())
                ),
                other => format!("{other:?}").chars().take(200).collect(),
            })
            .collect()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A command with a fresh id.
pub fn command(epoch: u64, action: Action) -> Command {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Command {
        id: format!("cmd-{n}"),
        epoch,
        deadline_ms: 0,
        action: Some(action),
    }
}
