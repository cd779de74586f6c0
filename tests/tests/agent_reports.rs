//! The agent reports the truth about its local valkey-server: replication state, death,
//! restarts (empty or not), and health for kubelet probes.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use redis::AsyncCommands;
use tonic_health::pb::health_check_response::ServingStatus;
use valkey_e2e::{
    hub::{Event, TestHub},
    procs::{Agent, AgentOpts, Valkey},
    wait_for,
};
use valkey_proto::v1::{NodeKind, ProcessState, Role};

const T: Duration = Duration::from_secs(15);

async fn write_keys(valkey: &Valkey, prefix: &str, n: usize) {
    let mut conn = valkey.conn().await;
    for i in 0..n {
        let _: () = conn.set(format!("{prefix}{i}"), i).await.expect("SET");
    }
}

async fn health_is(agent: &Agent, service: &str, want: ServingStatus) {
    wait_for(&format!("health {service:?} to be {want:?}"), T, || async {
        (agent.health(service).await == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn reports_match_info_replication() {
    let mut hub = TestHub::start("t0ken").await;
    let master = Valkey::start("m");
    let replica = Valkey::start_with("r", &["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let _am = Agent::start(AgentOpts::for_valkey(&master, Some(hub.url())));
    let _ar = Agent::start(AgentOpts::for_valkey(&replica, Some(hub.url())));

    let hello = hub.wait_hello("r", 0, T).await;
    assert_eq!(hello.kind(), NodeKind::Data);
    assert_eq!(
        (hello.namespace.as_str(), hello.failover.as_str()),
        ("default", "demo")
    );
    assert_eq!(
        (hello.announce_host.as_str(), hello.announce_port),
        ("127.0.0.1", u32::from(replica.port))
    );

    write_keys(&master, "k", 100).await;
    let mut conn = master.conn().await;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1);
    let offset: i64 = master.info("replication").await["master_repl_offset"]
        .parse()
        .expect("offset");

    let report = hub
        .wait_report("r", T, |r| {
            r.data
                .as_ref()
                .is_some_and(|d| d.master_link_up && d.repl_offset >= offset && d.key_count == 100)
        })
        .await;
    let info = replica.info("replication").await;
    let server = replica.info("server").await;
    assert_eq!(report.process(), ProcessState::Up);
    let data = report.data.clone().expect("data");
    assert_eq!(data.role(), Role::Replica);
    assert_eq!(info["role"], "slave");
    assert_eq!(data.master_host, info["master_host"]);
    assert_eq!(data.master_port.to_string(), info["master_port"]);
    assert_eq!(info["master_link_status"], "up");
    assert_eq!(data.run_id, server["run_id"]);
    assert_eq!(data.replid, info["master_replid"]);
    let now_offset: i64 = info["slave_repl_offset"].parse().expect("offset");
    assert!(
        data.repl_offset <= now_offset,
        "{} > {now_offset}",
        data.repl_offset
    );
    assert!(!data.restarted && !data.restarted_empty && !data.never_synced);
    assert!(report.health.expect("health").ready);

    let report = hub
        .wait_report("m", T, |r| {
            r.data.as_ref().is_some_and(|d| {
                d.replicas
                    .iter()
                    .any(|x| x.state == "online" && x.offset >= offset)
            })
        })
        .await;
    let info = master.info("replication").await;
    let data = report.data.expect("data");
    assert_eq!(data.role(), Role::Master);
    assert_eq!(info["role"], "master");
    assert_eq!(data.key_count, 100);
    assert_eq!(data.replicas.len().to_string(), info["connected_slaves"]);
    assert_eq!(data.replicas[0].port, u32::from(replica.port));
    assert!(info["slave0"].contains(&format!("port={}", replica.port)));
    assert_eq!(data.version.split('.').next(), Some("8"));
    assert!(data.master_host.is_empty() && !data.master_link_up);

    // Every report carries the next sequence number.
    let seqs: Vec<u64> = hub
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Report { pod, report } if pod == "m" => Some(report.seq),
            _ => None,
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

#[tokio::test]
async fn kill9_of_valkey_is_reported_down_quickly() {
    let mut hub = TestHub::start("t0ken").await;
    let mut valkey = Valkey::start("m");
    let agent = Agent::start(AgentOpts::for_valkey(&valkey, Some(hub.url())));
    hub.wait_report("m", T, |r| {
        r.process() == ProcessState::Up && r.data.is_some()
    })
    .await;

    let from = hub.events().len();
    let killed = Instant::now();
    valkey.kill9();
    let report = hub
        .wait_event("a DOWN report", from, T, |e| match e {
            Event::Report { pod, report }
                if pod == "m" && report.process() == ProcessState::Down =>
            {
                Some(report.clone())
            }
            _ => None,
        })
        .await;
    let took = killed.elapsed();
    eprintln!("kill -9 reported as down after {took:?}");
    // A generous bound; the real figure is measured by the benchmark.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(!report.process_error.is_empty());
    assert!(!report.health.expect("health").live);
    // The last known role stays in the report, so the controller knows a master died.
    assert_eq!(report.data.expect("data").role(), Role::Master);
    health_is(&agent, "", ServingStatus::NotServing).await;

    valkey.restart();
    let report = hub
        .wait_report("m", T, |r| r.process() == ProcessState::Up)
        .await;
    assert_eq!(report.data.expect("data").restarts_seen, 1);
    health_is(&agent, "", ServingStatus::Serving).await;
}

#[tokio::test]
async fn master_restarted_empty_is_flagged_and_a_restart_with_data_is_not() {
    let mut hub = TestHub::start("t0ken").await;
    let mut valkey = Valkey::start_with("m", &["--dbfilename", "dump.rdb"]);
    let mut agent = Agent::start(AgentOpts::for_valkey(&valkey, Some(hub.url())));
    write_keys(&valkey, "k", 10).await;
    hub.wait_report("m", T, |r| {
        r.data.as_ref().is_some_and(|d| d.key_count == 10)
    })
    .await;

    // kill -9 with nothing persisted: it comes back an empty master.
    valkey.restart();
    let report = hub
        .wait_report("m", T, |r| {
            r.data
                .as_ref()
                .is_some_and(|d| d.restarts_seen == 1 && r.process() == ProcessState::Up)
        })
        .await;
    let data = report.data.expect("data");
    assert_eq!((data.role(), data.key_count), (Role::Master, 0));
    assert!(data.restarted && data.restarted_empty, "{data:?}");

    // With an RDB on disk it comes back with its data: restarted, not empty.
    write_keys(&valkey, "j", 5).await;
    let _: () = redis::cmd("SAVE")
        .query_async(&mut valkey.conn().await)
        .await
        .expect("SAVE");
    valkey.restart();
    let report = hub
        .wait_report("m", T, |r| {
            r.data
                .as_ref()
                .is_some_and(|d| d.restarts_seen == 2 && r.process() == ProcessState::Up)
        })
        .await;
    let data = report.data.expect("data");
    assert_eq!(data.key_count, 5);
    assert!(data.restarted && !data.restarted_empty, "{data:?}");

    // Agent and Valkey both restart (a pod restart): the agent's memory on disk still knows.
    agent.kill9();
    std::fs::remove_file(valkey.dir.join("dump.rdb")).expect("remove rdb");
    valkey.restart();
    let from = hub.events().len();
    agent.restart();
    hub.wait_hello("m", from, T).await;
    let report = hub
        .wait_report_from("m", from, T, |r| {
            r.process() == ProcessState::Up && r.data.as_ref().is_some_and(|d| d.restarted)
        })
        .await;
    let data = report.data.expect("data");
    assert_eq!(data.key_count, 0);
    assert!(data.restarted_empty, "{data:?}");
}

#[tokio::test]
async fn health_follows_master_replica_hung_and_dead() {
    let mut master = Valkey::start("m");
    let replica = Valkey::start_with("r", &["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let am = Agent::start(AgentOpts::for_valkey(&master, None));
    let ar = Agent::start(AgentOpts::for_valkey(&replica, None));
    for agent in [&am, &ar] {
        health_is(agent, "", ServingStatus::Serving).await;
        health_is(agent, "readiness", ServingStatus::Serving).await;
    }

    // Hung: stopped, it still accepts TCP but never answers.
    master.proc().signal(Signal::SIGSTOP);
    health_is(&am, "", ServingStatus::NotServing).await;
    health_is(&am, "readiness", ServingStatus::NotServing).await;
    let state = am.state().await.expect("state");
    assert_eq!(state.process(), ProcessState::Hung);
    master.proc().signal(Signal::SIGCONT);
    health_is(&am, "", ServingStatus::Serving).await;
    health_is(&am, "readiness", ServingStatus::Serving).await;

    // Dead master: its agent is not live; the replica's link drops, so it is not ready.
    master.kill9();
    health_is(&am, "", ServingStatus::NotServing).await;
    health_is(&ar, "readiness", ServingStatus::NotServing).await;
    health_is(&ar, "", ServingStatus::Serving).await;
    let state = ar.state().await.expect("state");
    assert!(state.health.expect("health").reason.contains("link"));
}

#[tokio::test]
async fn health_while_loading_is_live_but_not_ready() {
    let mut valkey = Valkey::start_with("l", &["--dbfilename", "dump.rdb"]);
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        pipe.set(format!("k{i}"), i).ignore();
    }
    let _: () = pipe
        .query_async(&mut valkey.conn().await)
        .await
        .expect("fill");
    let _: () = redis::cmd("SAVE")
        .query_async(&mut valkey.conn().await)
        .await
        .expect("SAVE");
    // 2 ms per key: about 4 s of loading, with events served every KiB.
    valkey.restart_with(&[
        "--dbfilename",
        "dump.rdb",
        "--key-load-delay",
        "2000",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    let agent = Agent::start(AgentOpts::for_valkey(&valkey, None));
    let state = wait_for("a loading report", T, || async {
        agent
            .state()
            .await
            .filter(|s| s.data.as_ref().is_some_and(|d| d.loading))
    })
    .await;
    let health = state.health.expect("health");
    assert!(health.live && !health.ready, "{health:?}");
    assert!(health.reason.contains("loading"));
    health_is(&agent, "readiness", ServingStatus::NotServing).await;
    health_is(&agent, "", ServingStatus::Serving).await;
    // Once loaded it is a ready master with all its keys.
    health_is(&agent, "readiness", ServingStatus::Serving).await;
    let state = agent.state().await.expect("state");
    assert_eq!(state.data.expect("data").key_count, 2000);
}

/// A kill -9 is heard at once, not at the next probe: with probes a minute apart, the
/// master's agent reports its Valkey gone and the replica's agent reports its link down (so
/// its offset is final) as soon as the process dies, because the kernel closes every
/// connection to it and each agent holds one idle connection to the process it depends on.
#[tokio::test]
async fn a_killed_master_is_reported_gone_by_both_agents_without_waiting_for_a_probe() {
    let mut hub = TestHub::start("t0ken").await;
    let mut master = Valkey::start("m");
    let replica = Valkey::start_with("r", &["--replicaof", "127.0.0.1", &master.port.to_string()]);
    wait_for("the replica to link", T, || async {
        (replica.info("replication").await["master_link_status"] == "up").then_some(())
    })
    .await;
    let slow = |valkey: &Valkey| AgentOpts {
        probe_interval_ms: 60_000,
        ..AgentOpts::for_valkey(valkey, Some(hub.url()))
    };
    let _am = Agent::start(slow(&master));
    let _ar = Agent::start(slow(&replica));
    hub.wait_report("m", T, |r| r.process() == ProcessState::Up)
        .await;
    hub.wait_report("r", T, |r| {
        r.data.as_ref().is_some_and(|d| d.master_link_up)
    })
    .await;
    // The agents' first probes are behind them; the next are a minute away.
    let from = hub.events().len();
    master.kill9();
    hub.wait_report_from("m", from, T, |r| r.process() == ProcessState::Down)
        .await;
    // Its link down, and marked as heard from the master's side: its offset is final.
    hub.wait_report_from("r", from, T, |r| {
        r.data
            .as_ref()
            .is_some_and(|d| !d.master_link_up && d.master_close_heard)
    })
    .await;
}
