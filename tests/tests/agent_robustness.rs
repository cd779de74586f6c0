//! Bad input and bad weather: the agent answers clearly and keeps running, loses no result,
//! and on SIGTERM a master asks for its role to be moved first.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use redis::AsyncCommands;
use tonic_health::pb::health_check_response::ServingStatus;
use valkey_e2e::{
    flood::connect_from,
    free_port,
    hub::{Event, TestHub, command},
    procs::{Agent, AgentOpts, Valkey},
    wait_for,
};
use valkey_proto::v1::{
    CatchUp, Command, Outcome, ProcessState, Promote, ReplicaOf, Role, command::Action,
};

const T: Duration = Duration::from_secs(15);

#[tokio::test]
async fn malformed_and_unknown_commands_get_clear_errors_and_the_agent_keeps_running() {
    let mut hub = TestHub::start("t0ken").await;
    let a = Valkey::start("a");
    let mut agent = Agent::start(AgentOpts::for_valkey(&a, Some(hub.url())));
    hub.wait_hello("a", 0, T).await;

    let cases = [
        (
            Command {
                id: "no-action".into(),
                epoch: 1,
                deadline_ms: 0,
                action: None,
            },
            "no action",
        ),
        (
            command(
                1,
                Action::ReplicaOf(ReplicaOf {
                    host: "127.0.0.1".into(),
                    port: 0,
                }),
            ),
            "replica_of.port",
        ),
        (
            command(
                1,
                Action::ReplicaOf(ReplicaOf {
                    host: "bad host".into(),
                    port: 7,
                }),
            ),
            "replica_of.host",
        ),
        (
            command(
                1,
                Action::ReplicaOf(ReplicaOf {
                    host: a.host(),
                    port: u32::from(a.port),
                }),
            ),
            "itself",
        ),
        (
            command(
                1,
                Action::CatchUp(CatchUp {
                    host: a.host(),
                    port: 0,
                    offset: 1,
                }),
            ),
            "catch_up.port",
        ),
        (
            command(
                1,
                Action::CatchUp(CatchUp {
                    host: String::new(),
                    port: 1,
                    offset: 1,
                }),
            ),
            "catch_up.host",
        ),
    ];
    for (cmd, expected) in cases {
        let result = hub.command("a", cmd, T).await;
        assert_eq!(result.outcome(), Outcome::Invalid, "{result:?}");
        assert!(
            result.message.contains(expected),
            "{expected:?} not in {:?}",
            result.message
        );
    }
    let from = hub.events().len();
    assert!(
        hub.send(
            "a",
            Command {
                id: String::new(),
                epoch: 1,
                deadline_ms: 0,
                action: Some(Action::Promote(Promote {}))
            }
        )
        .await
    );
    let result = hub.wait_result("a", "", from, T).await;
    assert_eq!(result.outcome(), Outcome::Invalid);
    assert!(result.message.contains("command.id"), "{}", result.message);

    // A command that cannot finish in its deadline is answered TIMEOUT: a replica of `a` asked
    // to catch up with an offset `a` will not reach.
    let b = Valkey::start_with("b", &["--replicaof", "127.0.0.1", &a.port.to_string()]);
    let _agent_b = Agent::start(AgentOpts::for_valkey(&b, Some(hub.url())));
    hub.wait_report("b", T, |r| {
        r.data.as_ref().is_some_and(|d| d.master_link_up)
    })
    .await;
    let mut slow = command(
        1,
        Action::CatchUp(CatchUp {
            host: a.host(),
            port: u32::from(a.port),
            offset: i64::MAX,
        }),
    );
    slow.deadline_ms = 300;
    let result = hub.command("b", slow, T).await;
    assert_eq!(result.outcome(), Outcome::Timeout, "{result:?}");
    let a_addr = format!("{}:{}", a.host(), a.port);
    assert!(result.message.contains(&a_addr), "{}", result.message);

    // Still running, and still acting.
    assert!(agent.proc_mut().exited().is_none());
    let result = hub
        .command("a", command(1, Action::Promote(Promote {})), T)
        .await;
    assert_eq!(result.outcome(), Outcome::Already);
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_the_agent_retries_until_it_is_accepted() {
    let mut hub = TestHub::start("another-token").await;
    let a = Valkey::start("a");
    let mut agent = Agent::start(AgentOpts::for_valkey(&a, Some(hub.url())));
    hub.wait_event("a rejection", 0, T, |e| {
        matches!(e, Event::Rejected { .. }).then_some(())
    })
    .await;
    // Refused twice: the agent keeps trying, and keeps serving health meanwhile.
    hub.wait_event("a second rejection", 0, T, {
        let mut n = 0;
        move |e| {
            n += usize::from(matches!(e, Event::Rejected { .. }));
            (n >= 2).then_some(())
        }
    })
    .await;
    assert_eq!(agent.health("").await, Some(ServingStatus::Serving));
    assert!(agent.proc_mut().exited().is_none());
    assert!(
        !agent.log_text().contains("t0ken"),
        "the token must never be logged"
    );
    hub.set_token("t0ken");
    let hello = hub.wait_hello("a", 0, T).await;
    assert_eq!(hello.token, "t0ken");
    hub.wait_report("a", T, |r| r.process() == ProcessState::Up)
        .await;
}

#[tokio::test]
async fn valkey_and_controller_unreachable_at_start() {
    let valkey_port = free_port();
    let hub_port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken").expect("token");
    let agent = Agent::start(AgentOpts {
        sentinel: false,
        valkey_port,
        password_file: None,
        controller: Some(format!("http://127.0.0.1:{hub_port}")),
        token_file: Some(token_file),
        data_dir: dir.path().join("agent"),
        failover: "demo".into(),
        pod: "late".into(),
        probe_interval_ms: 50,
        heartbeat_interval_ms: 500,
        extra: Vec::new(),
    });
    let state = wait_for("a probe", T, || async {
        agent
            .state()
            .await
            .filter(|s| s.process() != ProcessState::Unspecified)
    })
    .await;
    assert_eq!(state.process(), ProcessState::Down, "{state:?}");
    assert_eq!(agent.health("").await, Some(ServingStatus::NotServing));

    let valkey = Valkey::start_at("late", valkey_port, &["--requirepass", ""]);
    let mut hub = TestHub::start_at("t0ken", hub_port).await;
    hub.wait_hello("late", 0, T).await;
    let report = hub
        .wait_report("late", T, |r| r.process() == ProcessState::Up)
        .await;
    assert_eq!(report.data.expect("data").role(), Role::Master);
    assert_eq!(agent.health("").await, Some(ServingStatus::Serving));
    drop(valkey);
}

#[tokio::test]
async fn a_stream_cut_mid_command_loses_no_result() {
    let mut hub = TestHub::start("t0ken").await;
    let master = Valkey::start("m");
    let replica = Valkey::start_with("r", &["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let _agent = Agent::start(AgentOpts::for_valkey(&replica, Some(hub.url())));
    hub.wait_report("r", T, |r| {
        r.data.as_ref().is_some_and(|d| d.master_link_up)
    })
    .await;

    // The replica is asked to catch up with an offset the master has not reached yet, so the
    // command cannot finish while the stream is cut.
    let offset: i64 = master.info("replication").await["master_repl_offset"]
        .parse()
        .expect("offset");
    let mut wait = command(
        1,
        Action::CatchUp(CatchUp {
            host: master.host(),
            port: u32::from(master.port),
            offset: offset + 1000,
        }),
    );
    wait.deadline_ms = 20_000;
    let from = hub.events().len();
    assert!(hub.send("r", wait.clone()).await);
    hub.cut("r");
    hub.wait_event("the stream to close", from, T, |e| {
        matches!(e, Event::Closed { pod } if pod == "r").then_some(())
    })
    .await;
    // The master moves on past it.
    let _: () = master
        .conn()
        .await
        .set("k", "v".repeat(4096))
        .await
        .expect("SET");
    hub.wait_hello("r", from, T).await;

    // The result arrives on the new stream by itself, or when the controller asks again.
    let result = match tokio::time::timeout(
        Duration::from_secs(3),
        hub.wait_result("r", &wait.id, from, T),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => {
            let again = hub.events().len();
            assert!(hub.send("r", wait.clone()).await);
            hub.wait_result("r", &wait.id, again, T).await
        }
    };
    assert_eq!(result.outcome(), Outcome::Ok, "{result:?}");
    assert!(result.offset > 0);
}

#[tokio::test]
async fn sigterm_on_a_master_asks_for_a_switchover_and_waits_for_it() {
    let mut hub = TestHub::start("t0ken").await;
    let a = Valkey::start("a");
    let b = Valkey::start_with("b", &["--replicaof", "127.0.0.1", &a.port.to_string()]);
    let mut agent_a = Agent::start(AgentOpts::for_valkey(&a, Some(hub.url())));
    let mut agent_b = Agent::start(AgentOpts::for_valkey(&b, Some(hub.url())));
    hub.wait_report("a", T, |r| {
        r.data
            .as_ref()
            .is_some_and(|d| d.replicas.iter().any(|x| x.state == "online"))
    })
    .await;
    hub.wait_hello("b", 0, T).await;

    let from = hub.events().len();
    agent_a.terminate();
    hub.wait_event("a switchover request", from, T, |e| {
        matches!(e, Event::SwitchoverRequest { pod } if pod == "a").then_some(())
    })
    .await;
    assert!(
        agent_a.proc_mut().exited().is_none(),
        "the master's agent waits for the switchover"
    );
    assert_eq!(
        agent_a.health("readiness").await,
        Some(ServingStatus::NotServing)
    );
    // The controller's switchover, reduced to its last two steps: promote b, make a follow it.
    let promoted = hub
        .command("b", command(1, Action::Promote(Promote {})), T)
        .await;
    assert_eq!(promoted.outcome(), Outcome::Ok, "{promoted:?}");
    let handed = hub
        .command(
            "a",
            command(
                1,
                Action::ReplicaOf(ReplicaOf {
                    host: b.host(),
                    port: u32::from(b.port),
                }),
            ),
            T,
        )
        .await;
    assert_eq!(handed.outcome(), Outcome::Ok, "{handed:?}");
    let status = agent_a
        .proc_mut()
        .wait_exit(T)
        .await
        .expect("the agent exits once it is a replica");
    assert!(status.success(), "{status:?}");
    assert_eq!(b.info("replication").await["role"], "master");

    // A replica's agent (a's, now that a follows b) does not ask; it just goes.
    let from = hub.events().len();
    agent_a.restart();
    hub.wait_report_from("a", from, T, |r| {
        r.data.as_ref().is_some_and(|d| d.role() == Role::Replica)
    })
    .await;
    agent_a.terminate();
    let status = agent_a
        .proc_mut()
        .wait_exit(T)
        .await
        .expect("the replica's agent exits");
    assert!(status.success());
    let asked = hub.events()[from..]
        .iter()
        .any(|e| matches!(e, Event::SwitchoverRequest { .. }));
    assert!(!asked);
    assert!(agent_b.proc_mut().exited().is_none());
}

#[tokio::test]
async fn a_rotated_password_is_picked_up_from_the_password_file() {
    let mut hub = TestHub::start("t0ken").await;
    let a = Valkey::start("a");
    let agent = Agent::start(AgentOpts::for_valkey(&a, Some(hub.url())));
    hub.wait_report("a", T, |r| r.process() == ProcessState::Up)
        .await;

    // The password changes on the server; the agent's connections are cut.
    let mut conn = a.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("rotated-pw-2")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut conn)
        .await
        .unwrap_or(0);
    // Until the file changes, the agent says its credentials are refused (and stays live).
    let report = hub
        .wait_report("a", T, |r| r.process() == ProcessState::AuthFailed)
        .await;
    assert!(report.health.expect("health").live);
    std::fs::write(a.password_file(), "rotated-pw-2\n").expect("rotate the file");
    hub.wait_report("a", T, |r| r.process() == ProcessState::Up)
        .await;
    assert!(agent.log_text().contains("password file changed"));
    assert!(
        !agent.log_text().contains("rotated-pw-2"),
        "the password must never be logged"
    );
}

#[tokio::test]
async fn a_missing_password_is_reported_as_refused_credentials_not_as_serving() {
    let mut hub = TestHub::start("t0ken").await;
    let a = Valkey::start("a");
    let mut opts = AgentOpts::for_valkey(&a, Some(hub.url()));
    opts.password_file = None;
    let agent = Agent::start(opts);
    let report = hub
        .wait_report("a", T, |r| r.process() != ProcessState::Unspecified)
        .await;
    assert_eq!(report.process(), ProcessState::AuthFailed, "{report:?}");
    let health = report.health.expect("health");
    assert!(health.live && !health.ready, "{health:?}");
    assert_eq!(
        agent.health("readiness").await,
        Some(ServingStatus::NotServing)
    );
}

/// Descriptors `pid` holds open.
fn open_fds(pid: nix::unistd::Pid) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A flood of idle connections to both of the agent's ports, from another address: the agent
/// holds a bounded number of them (a descriptor limit of 1,024 is never reached), and its
/// probes and scrapes still answer.
#[tokio::test]
async fn a_flood_of_idle_connections_to_the_agent_ports_is_capped_and_probes_still_answer() {
    let a = Valkey::start("a");
    let mut agent = Agent::start(AgentOpts::for_valkey(&a, None));
    wait_for("the agent serving", T, || async {
        (agent.health("").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    let pid = agent.proc_mut().pid();
    let before = open_fds(pid);
    let intruder: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut flood = Vec::new();
    for target in [agent.grpc, agent.metrics] {
        for _ in 0..600 {
            flood.push(connect_from(target, intruder).await.expect("connect"));
        }
    }
    // 1,200 connections made; the agent keeps at most its caps (64 and 16) of them, and the
    // closed ones' slots until they close.
    let cap = before + 2 * (64 + 16);
    wait_for("the agent's descriptors back under its caps", T, || async {
        (open_fds(pid) <= cap).then_some(())
    })
    .await;
    assert_eq!(agent.health("").await, Some(ServingStatus::Serving));
    assert!(
        agent.metrics_text().await.contains("valkey_agent"),
        "no scrape under the flood"
    );
    drop(flood);
}
