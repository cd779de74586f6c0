//! The agent hub facing clients that are not well-behaved agents: connections that never
//! authenticate, oversized Hellos, a hub full of them, and a pod answering a command sent to
//! another; and the write lease's grants. The real hub, served over TLS on loopback, and raw
//! gRPC clients.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{io::AsyncReadExt, net::TcpStream, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use valkey_controller::{
    hub::tls::ServerCert,
    hub::{
        Hub, InstanceKey, LeaseHolder, StaticToken,
        limits::{Gate, Limits},
    },
    tls::{CA_LIFETIME, Ca},
};
use valkey_e2e::{
    flood::{Flood, connect_from, hub_channel},
    wait_for,
};
use valkey_proto::v1::{
    AgentMessage, Command, CommandResult, ControllerMessage, DataState, Hello, Lease, NodeKind,
    ProcessState, Promote, Role, StateReport, agent_hub_client::AgentHubClient, agent_message::Msg,
    command::Action, controller_message,
};

const T: Duration = Duration::from_secs(15);
const TOKEN: &str = "t0ken";

struct Served {
    hub: Hub,
    gate: Arc<Gate>,
    addr: std::net::SocketAddr,
    ca: Ca,
}

async fn serve(limits: Limits) -> Served {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::generate("hub CA", CA_LIFETIME).unwrap();
    let (hub, _events) = Hub::new(StaticToken(TOKEN.into()), Duration::from_millis(500));
    let cert = ServerCert::new(&ca.issue(&["127.0.0.1".into()], CA_LIFETIME).unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Gate::new(limits.gate());
    let (served, g) = (hub.clone(), gate.clone());
    tokio::spawn(async move {
        valkey_controller::hub::limits::serve_gated(&served, listener, cert, &limits, g).await
    });
    Served {
        hub,
        gate,
        addr,
        ca,
    }
}

fn hello(pod: &str, token: &str) -> Hello {
    Hello {
        protocol_version: 1,
        namespace: "ns".into(),
        failover: "demo".into(),
        pod_name: pod.into(),
        kind: NodeKind::Data as i32,
        announce_host: "127.0.0.1".into(),
        announce_port: 6379,
        token: token.into(),
        agent_version: "test".into(),
        ..Hello::default()
    }
}

type Attached = (
    mpsc::Sender<AgentMessage>,
    tonic::Streaming<ControllerMessage>,
);

/// A gRPC client that says `hello` and returns its outbound side and the hub's replies.
async fn attach(served: &Served, hello: Hello) -> Result<Attached, tonic::Status> {
    let channel = hub_channel(served.addr, &served.ca.0.cert_pem)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    attach_on(channel, hello).await
}

/// Says `hello` on a stream of `channel`.
async fn attach_on(
    channel: tonic::transport::Channel,
    hello: Hello,
) -> Result<Attached, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentMessage {
        msg: Some(Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let inbound = AgentHubClient::new(channel)
        .attach(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// Whether the hub closes a plain TCP connection that sends nothing (EOF or reset).
async fn closed_by_hub(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(T, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn demo() -> InstanceKey {
    InstanceKey {
        namespace: "ns".into(),
        name: "demo".into(),
    }
}

#[tokio::test]
async fn when_unauthenticated_connections_fill_the_hub_the_oldest_make_room_for_an_agent() {
    let served = serve(Limits {
        max_unauthenticated: 8,
        auth_deadline: Duration::from_secs(120),
        ..Limits::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(served.addr).await.unwrap());
    }
    wait_for("eight unauthenticated connections", T, || async {
        (served.gate.unproven() == 8).then_some(())
    })
    .await;
    // A ninth: the oldest is closed for it, and no more than eight are held.
    idle.push(TcpStream::connect(served.addr).await.unwrap());
    assert!(closed_by_hub(&mut idle[0]).await, "the oldest was kept");
    wait_for("the oldest's slot given back", T, || async {
        (served.gate.open() == 8 && served.gate.unproven() == 8).then_some(())
    })
    .await;

    // An agent (re)starting now gets in, although the deadline of the idle ones is far.
    let (_tx, _inbound) = attach(&served, hello("demo-0", TOKEN))
        .await
        .expect("an agent while the hub is full");
    wait_for("the agent to be known", T, || async {
        served
            .hub
            .observe(&demo())
            .nodes
            .contains_key("demo-0")
            .then_some(())
    })
    .await;
    assert!(
        closed_by_hub(&mut idle[1]).await,
        "the next oldest was kept"
    );
    // Authenticated, it holds no unauthenticated slot: 7 idle ones are left beside it.
    wait_for("7 idle connections and the agent", T, || async {
        (served.gate.unproven() == 7 && served.gate.open() == 8).then_some(())
    })
    .await;
}

/// The probe's attack: 16 TLS connections, each with the 4 streams the hub allows, none of
/// which ever says hello. Each connection holds one Hello slot, not four, and an agent says
/// hello beside them.
#[tokio::test]
async fn streams_that_never_say_hello_hold_one_slot_per_connection_and_an_agent_gets_in() {
    let served = serve(Limits::default()).await;
    let flood = Flood::silent(served.addr, served.ca.0.cert_pem.clone(), 16, None);
    wait_for(
        "3 of each connection's 4 silent streams refused",
        T,
        || async { (flood.counts.refused.load(Ordering::Relaxed) >= 48).then_some(()) },
    )
    .await;
    assert_eq!(served.gate.unproven(), 16, "one slot per connection");
    for pod in ["demo-0", "demo-1"] {
        let attached = attach(&served, hello(pod, TOKEN)).await;
        assert!(attached.is_ok(), "{pod} refused: {:?}", attached.err());
    }
    wait_for("both agents known", T, || async {
        (served.hub.observe(&demo()).nodes.len() == 2).then_some(())
    })
    .await;
}

/// A flood of connections from one address, far beyond the cap, closes only its own: an
/// agent from another address that connected before it says hello on its connection after.
#[tokio::test]
async fn a_flood_from_one_address_closes_only_its_own_connections() {
    let served = serve(Limits {
        max_unauthenticated: 8,
        auth_deadline: Duration::from_secs(120),
        ..Limits::default()
    })
    .await;
    // The agent goes through a proxy that counts its connections: a channel whose connection
    // is closed opens another, and only the count tells.
    let (proxy, connections) = counting_proxy(served.addr).await;
    let channel = hub_channel(proxy, &served.ca.0.cert_pem)
        .await
        .expect("TLS and HTTP/2");
    let intruder: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(connect_from(served.addr, intruder).await.unwrap());
    }
    assert!(
        closed_by_hub(&mut flood[0]).await,
        "the flood kept its oldest"
    );
    wait_for("the cap held", T, || async {
        (served.gate.unproven() == 8).then_some(())
    })
    .await;
    let attached = attach_on(channel, hello("demo-0", TOKEN)).await;
    assert!(attached.is_ok(), "{:?}", attached.err());
    assert_eq!(
        connections.load(Ordering::Relaxed),
        1,
        "the agent's first connection was closed for the flood"
    );
}

/// A TCP proxy to `to` on a free loopback port, and how many connections it has accepted.
async fn counting_proxy(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn connections_that_never_authenticate_are_closed_at_the_deadline() {
    let served = serve(Limits {
        auth_deadline: Duration::from_millis(800),
        ..Limits::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(served.addr).await.unwrap());
    }
    // One that completes TLS and HTTP/2 but never opens a stream is closed too.
    let _channel = hub_channel(served.addr, &served.ca.0.cert_pem)
        .await
        .expect("TLS and HTTP/2");
    for stream in &mut idle {
        assert!(closed_by_hub(stream).await, "an idle connection was kept");
    }
    wait_for("every slot free", T, || async {
        (served.gate.open() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_hello_larger_than_the_budget_or_with_a_wrong_token_gets_nothing() {
    let served = serve(Limits::default()).await;
    // A Hello of 512 KiB, under the message limit and with the right token: cut at the
    // budget of bytes a connection may send before it is authenticated.
    let huge = Hello {
        agent_version: "x".repeat(512 * 1024),
        ..hello("demo-0", TOKEN)
    };
    assert!(
        attach(&served, huge).await.is_err(),
        "a 512 KiB Hello was taken"
    );
    let Err(wrong) = attach(&served, hello("demo-0", "guess")).await else {
        panic!("a wrong token was taken");
    };
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong}");
    wait_for("nothing left open", T, || async {
        (served.gate.open() == 0).then_some(())
    })
    .await;
    // Neither reached the hub's view of the instance.
    assert!(served.hub.observe(&demo()).nodes.is_empty());
}

/// The next command the hub sends on `inbound`.
async fn next_command(inbound: &mut tonic::Streaming<ControllerMessage>) -> Command {
    loop {
        let message = tokio::time::timeout(T, inbound.message())
            .await
            .expect("a command in time")
            .expect("stream")
            .expect("open");
        if let Some(controller_message::Msg::Command(command)) = message.msg {
            return command;
        }
    }
}

#[tokio::test]
async fn a_result_from_another_pod_does_not_answer_a_command() {
    let served = serve(Limits::default()).await;
    let (a_tx, mut a_in) = attach(&served, hello("demo-0", TOKEN)).await.unwrap();
    let (b_tx, _b_in) = attach(&served, hello("demo-1", TOKEN)).await.unwrap();
    let key = demo();
    wait_for("both agents known", T, || async {
        (served.hub.observe(&key).nodes.len() == 2).then_some(())
    })
    .await;

    // A command for demo-0; demo-1 answers it first, with the right id.
    let hub = served.hub.clone();
    let (k, id) = (key.clone(), "cmd-1".to_owned());
    let sent = tokio::spawn(async move {
        let command = Command {
            id,
            epoch: 1,
            action: Some(Action::Promote(Promote {})),
            ..Command::default()
        };
        hub.command(&k, "demo-0", command, Duration::from_secs(10))
            .await
    });
    let command = next_command(&mut a_in).await;
    let answer = |message: &str| AgentMessage {
        msg: Some(Msg::Result(CommandResult {
            id: command.id.clone(),
            epoch: 1,
            message: message.into(),
            ..CommandResult::default()
        })),
    };
    b_tx.send(answer("forged by demo-1")).await.unwrap();
    // demo-0's own answer, after the forged one on the same hub, is the one taken.
    a_tx.send(answer("done by demo-0")).await.unwrap();
    let result = sent.await.unwrap().expect("demo-0's result");
    assert_eq!(result.message, "done by demo-0");
}

/// A report from a data node: `process` and role master, asking for the lease with `stamp`.
fn lease_request(stamp: u64, process: ProcessState) -> AgentMessage {
    AgentMessage {
        msg: Some(Msg::Report(StateReport {
            process: process as i32,
            lease_request_ms: stamp,
            data: Some(DataState {
                role: Role::Master as i32,
                ..DataState::default()
            }),
            ..StateReport::default()
        })),
    }
}

/// The next write lease the hub sends, skipping its Welcome.
async fn next_lease(inbound: &mut tonic::Streaming<ControllerMessage>) -> Lease {
    loop {
        let message = tokio::time::timeout(T, inbound.message())
            .await
            .expect("a message in time")
            .expect("the stream")
            .expect("a message");
        if let Some(controller_message::Msg::Lease(lease)) = message.msg {
            return lease;
        }
    }
}

/// The write lease goes only to the holder, and only while it reports its Valkey up as master;
/// a revocation based on a view older than the last grant is refused.
#[tokio::test]
async fn the_write_lease_goes_only_to_its_holder_and_a_stale_revocation_is_refused() {
    let served = serve(Limits::default()).await;
    let (tx, mut inbound) = attach(&served, hello("demo-0", TOKEN)).await.unwrap();
    let hub = &served.hub;
    let grants = || {
        hub.observe(&demo())
            .nodes
            .get("demo-0")
            .map_or(0, |o| o.lease_grants)
    };
    // Not the holder yet: request 1 gets nothing. Then it is: request 2 is answered, echoing
    // the agent's own stamp, and the first lease to arrive is that one.
    tx.send(lease_request(1, ProcessState::Up)).await.unwrap();
    wait_for("the first report", T, || async {
        hub.observe(&demo())
            .nodes
            .get("demo-0")
            .and_then(|o| o.report.as_ref())
            .map(|_| ())
    })
    .await;
    let holder = LeaseHolder {
        pod: "demo-0".into(),
        epoch: 3,
    };
    hub.hold_lease(&demo(), Some(holder.clone()));
    tx.send(lease_request(2, ProcessState::Up)).await.unwrap();
    let lease = next_lease(&mut inbound).await;
    assert_eq!((lease.request_ms, lease.epoch), (2, 3));
    assert_eq!(
        u64::from(lease.lease_ms),
        valkey_controller::decide::lease::LEASE_MS
    );
    // A hung Valkey is granted nothing: the next lease answers the request after it.
    tx.send(lease_request(3, ProcessState::Hung)).await.unwrap();
    tx.send(lease_request(4, ProcessState::Up)).await.unwrap();
    assert_eq!(next_lease(&mut inbound).await.request_ms, 4);
    // Seen with 2 grants: a revocation that saw fewer is refused, one that saw both is done,
    // and no grant follows it.
    wait_for("two grants counted", T, || async {
        (grants() == 2).then_some(())
    })
    .await;
    assert!(!hub.revoke_lease(&demo(), "demo-0", 1));
    assert!(hub.revoke_lease(&demo(), "demo-0", 2));
    tx.send(lease_request(5, ProcessState::Up)).await.unwrap();
    wait_for("request 5 to be read", T, || async {
        hub.observe(&demo())
            .nodes
            .get("demo-0")
            .and_then(|o| o.report.as_ref())
            .filter(|r| r.lease_request_ms == 5)
            .map(|_| ())
    })
    .await;
    hub.hold_lease(&demo(), Some(holder));
    tx.send(lease_request(6, ProcessState::Up)).await.unwrap();
    assert_eq!(next_lease(&mut inbound).await.request_ms, 6);
}
