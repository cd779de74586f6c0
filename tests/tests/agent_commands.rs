//! The agent carries out the controller's commands on real Valkey and Sentinel processes:
//! idempotently, behind the epoch fence (also across its own restarts), with typed results.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::HashMap, time::Duration};

use redis::AsyncCommands;
use sha2::Digest;
use valkey_e2e::{
    hub::{TestHub, command},
    procs::{Agent, AgentOpts, PASSWORD, Sentinel, Valkey},
};
use valkey_proto::v1::{
    AclSetUser, CatchUp, ConfigSet, Outcome, PasswordRef, PauseWrites, Promote, ReplicaOf, Role,
    SentinelConfigSet, SentinelFailover, SentinelMonitor, SentinelReset, SentinelSet,
    UnpauseWrites, command::Action, password_ref,
};

const T: Duration = Duration::from_secs(15);

fn replica_of(valkey: &Valkey) -> Action {
    Action::ReplicaOf(ReplicaOf {
        host: valkey.host(),
        port: u32::from(valkey.port),
    })
}

async fn role_of(valkey: &Valkey) -> (String, String) {
    let info = valkey.info("replication").await;
    (
        info["role"].clone(),
        info.get("master_port").cloned().unwrap_or_default(),
    )
}

#[tokio::test]
async fn replicaof_promote_and_switchover_work_and_are_idempotent() {
    let mut hub = TestHub::start("t0ken").await;
    let a = Valkey::start("a");
    let b = Valkey::start("b");
    let _aa = Agent::start(AgentOpts::for_valkey(&a, Some(hub.url())));
    let _ab = Agent::start(AgentOpts::for_valkey(&b, Some(hub.url())));
    hub.wait_hello("a", 0, T).await;
    hub.wait_hello("b", 0, T).await;

    let _: () = a.conn().await.set("before", "1").await.expect("SET");
    let first = command(1, replica_of(&a));
    let result = hub.command("b", first.clone(), T).await;
    assert_eq!(result.outcome(), Outcome::Ok, "{result:?}");
    assert_eq!(result.epoch, 1);
    let again = hub.command("b", command(1, replica_of(&a)), T).await;
    assert_eq!(again.outcome(), Outcome::Already, "{again:?}");
    // The same id again: the first answer, without acting again.
    let repeated = hub.command("b", first, T).await;
    assert_eq!(repeated, result);

    hub.wait_report("b", T, |r| {
        r.data.as_ref().is_some_and(|d| d.master_link_up)
    })
    .await;
    assert_eq!(role_of(&b).await, ("slave".into(), a.port.to_string()));
    let value: Option<String> = b.conn().await.get("before").await.expect("GET");
    assert_eq!(value.as_deref(), Some("1"));

    // A coordinated switchover a -> b: pause writes, let b catch up, promote b, make a follow.
    let _: () = a.conn().await.set("during", "2").await.expect("SET");
    let paused = hub
        .command(
            "a",
            command(1, Action::PauseWrites(PauseWrites { pause_ms: 5000 })),
            T,
        )
        .await;
    assert_eq!(paused.outcome(), Outcome::Ok, "{paused:?}");
    let master_offset: i64 = a.info("replication").await["master_repl_offset"]
        .parse()
        .expect("offset");
    assert_eq!(paused.offset, master_offset, "{paused:?}");
    let caught_up = hub
        .command(
            "b",
            command(
                1,
                Action::CatchUp(CatchUp {
                    host: a.host(),
                    port: u32::from(a.port),
                    offset: paused.offset,
                }),
            ),
            T,
        )
        .await;
    assert_eq!(caught_up.outcome(), Outcome::Ok, "{caught_up:?}");
    assert!(caught_up.offset > 0 && caught_up.offset >= paused.offset);
    let promoted = hub
        .command("b", command(1, Action::Promote(Promote {})), T)
        .await;
    assert_eq!(promoted.outcome(), Outcome::Ok, "{promoted:?}");
    let handed = hub.command("a", command(1, replica_of(&b)), T).await;
    assert_eq!(handed.outcome(), Outcome::Ok, "{handed:?}");
    assert_eq!(role_of(&a).await, ("slave".into(), b.port.to_string()));
    assert_eq!(role_of(&b).await.0, "master");
    let handed_again = hub.command("a", command(1, replica_of(&b)), T).await;
    assert_eq!(handed_again.outcome(), Outcome::Already, "{handed_again:?}");
    let unpaused = hub
        .command("a", command(1, Action::UnpauseWrites(UnpauseWrites {})), T)
        .await;
    assert_eq!(unpaused.outcome(), Outcome::Ok);
    let value: Option<String> = b.conn().await.get("during").await.expect("GET");
    assert_eq!(
        value.as_deref(),
        Some("2"),
        "the write before the pause survived the handover"
    );

    // Promotion, twice.
    let promoted = hub
        .command("a", command(2, Action::Promote(Promote {})), T)
        .await;
    assert_eq!(promoted.outcome(), Outcome::Ok, "{promoted:?}");
    assert_eq!(role_of(&a).await.0, "master");
    let promoted_again = hub
        .command("a", command(2, Action::Promote(Promote {})), T)
        .await;
    assert_eq!(promoted_again.outcome(), Outcome::Already);
    hub.wait_report("a", T, |r| {
        r.data.as_ref().is_some_and(|d| d.role() == Role::Master)
    })
    .await;
}

#[tokio::test]
async fn stale_epoch_commands_are_refused_also_after_the_agent_restarts() {
    let mut hub = TestHub::start("t0ken").await;
    let a = Valkey::start("a");
    let b = Valkey::start("b");
    let mut agent = Agent::start(AgentOpts::for_valkey(&b, Some(hub.url())));
    hub.wait_hello("b", 0, T).await;

    let ok = hub.command("b", command(5, replica_of(&a)), T).await;
    assert_eq!((ok.outcome(), ok.epoch), (Outcome::Ok, 5));
    let stale = hub
        .command("b", command(3, Action::Promote(Promote {})), T)
        .await;
    assert_eq!(stale.outcome(), Outcome::StaleEpoch, "{stale:?}");
    assert!(
        stale.message.contains("3") && stale.message.contains("5"),
        "{}",
        stale.message
    );
    assert_eq!(
        role_of(&b).await.0,
        "slave",
        "the stale promotion did nothing"
    );
    let metrics = agent.metrics_text().await;
    assert!(
        metrics
            .contains(r#"valkey_agent_commands_total{command="promote",outcome="stale_epoch"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("valkey_agent_repl_offset "),
        "the replication offset is exported: {metrics}"
    );

    let from = hub.events().len();
    agent.restart();
    let hello = hub.wait_hello("b", from, T).await;
    assert_eq!(hello.epoch, 5);
    let stale = hub
        .command("b", command(4, Action::Promote(Promote {})), T)
        .await;
    assert_eq!(stale.outcome(), Outcome::StaleEpoch, "{stale:?}");
    assert_eq!(role_of(&b).await.0, "slave");
    // Waits are fenced too: a node that has seen a newer epoch takes no part in an older
    // switchover.
    let read = hub
        .command(
            "b",
            command(
                0,
                Action::CatchUp(CatchUp {
                    host: a.host(),
                    port: u32::from(a.port),
                    offset: 0,
                }),
            ),
            T,
        )
        .await;
    assert_eq!(read.outcome(), Outcome::StaleEpoch, "{read:?}");
    let newer = hub
        .command("b", command(6, Action::Promote(Promote {})), T)
        .await;
    assert_eq!((newer.outcome(), newer.epoch), (Outcome::Ok, 6));
    assert_eq!(role_of(&b).await.0, "master");
}

#[tokio::test]
async fn config_set_and_acl_set_user() {
    let mut hub = TestHub::start("t0ken").await;
    let a = Valkey::start("a");
    let _agent = Agent::start(AgentOpts::for_valkey(&a, Some(hub.url())));
    hub.wait_hello("a", 0, T).await;

    let fencing = HashMap::from([
        ("min-replicas-to-write".to_owned(), "1".to_owned()),
        ("min-replicas-max-lag".to_owned(), "10".to_owned()),
    ]);
    let set = |params: HashMap<String, String>| {
        Action::ConfigSet(ConfigSet {
            params,
            rewrite: true,
            ..ConfigSet::default()
        })
    };
    let result = hub.command("a", command(1, set(fencing.clone())), T).await;
    assert_eq!(result.outcome(), Outcome::Ok, "{result:?}");
    assert!(
        result.message.contains("no config file"),
        "{}",
        result.message
    );
    let report = hub
        .wait_report("a", T, |r| {
            r.data
                .as_ref()
                .is_some_and(|d| d.min_replicas_to_write == 1)
        })
        .await;
    let health = report.health.expect("health");
    assert!(
        !health.ready && health.reason.contains("refuses writes"),
        "{health:?}"
    );
    let write: redis::RedisResult<()> = a.conn().await.set("x", 1).await;
    assert!(
        write.is_err(),
        "a master without its replica refuses writes"
    );
    let again = hub.command("a", command(1, set(fencing)), T).await;
    assert_eq!(again.outcome(), Outcome::Already, "{again:?}");
    let bad = hub
        .command(
            "a",
            command(
                1,
                set(HashMap::from([(
                    "no-such-setting".to_owned(),
                    "1".to_owned(),
                )])),
            ),
            T,
        )
        .await;
    assert_eq!(bad.outcome(), Outcome::Invalid, "{bad:?}");
    assert!(bad.message.contains("no-such-setting"), "{}", bad.message);

    let hash = hex::encode(sha2::Sha256::digest(b"operator-pw"));
    let acl = |rules: Vec<&str>| {
        Action::AclSetUser(AclSetUser {
            username: "operator".into(),
            enabled: true,
            password_sha256: vec![hash.clone()],
            rules: rules.into_iter().map(str::to_owned).collect(),
        })
    };
    let result = hub
        .command("a", command(1, acl(vec!["~*", "&*", "+@all"])), T)
        .await;
    assert_eq!(result.outcome(), Outcome::Ok, "{result:?}");
    let client = redis::Client::open(format!(
        "redis://operator:operator-pw@127.0.0.1:{}/",
        a.port
    ))
    .expect("client");
    let pong: String = redis::cmd("PING")
        .query_async(
            &mut client
                .get_multiplexed_async_connection()
                .await
                .expect("login as operator"),
        )
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    let plain = hub
        .command("a", command(1, acl(vec![">plaintext"])), T)
        .await;
    assert_eq!(plain.outcome(), Outcome::Invalid);
    assert!(
        plain.message.contains("password_sha256"),
        "{}",
        plain.message
    );
}

// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn sentinel_commands() {
    let mut hub = TestHub::start("t0ken").await;
    let master = Valkey::start("m");
    let sentinel = Sentinel::start();
    let token_file = sentinel.dir.join("token");
    std::fs::write(&token_file, "t0ken").expect("token");
    // The instance's password, as the sentinel's pod has it mounted: commands only name it.
    let instance_password = sentinel.dir.join("instance-password");
    std::fs::write(&instance_password, format!("{PASSWORD}\n")).expect("password file");
    let _agent = Agent::start(AgentOpts {
        sentinel: true,
        valkey_port: sentinel.port,
        password_file: None,
        controller: Some(hub.url()),
        token_file: Some(token_file),
        data_dir: sentinel.dir.join("agent"),
        failover: "demo".into(),
        pod: "s0".into(),
        probe_interval_ms: 50,
        heartbeat_interval_ms: 500,
        extra: vec![
            "--instance-password-file".into(),
            instance_password.display().to_string(),
        ],
    });
    hub.wait_hello("s0", 0, T).await;
    let instance_ref = PasswordRef {
        owner: password_ref::Owner::Instance as i32,
        next: false,
        ..PasswordRef::default()
    };

    let monitor = Action::SentinelMonitor(SentinelMonitor {
        name: "default.demo".into(),
        host: master.host(),
        port: u32::from(master.port),
        quorum: 1,
        auth_user: String::new(),
        auth_pass_ref: Some(instance_ref.clone()),
    });
    let result = hub.command("s0", command(1, monitor.clone()), T).await;
    assert_eq!(result.outcome(), Outcome::Ok, "{result:?}");
    let again = hub.command("s0", command(1, monitor), T).await;
    assert_eq!(again.outcome(), Outcome::Already, "{again:?}");
    let report = hub
        .wait_report("s0", T, |r| {
            r.sentinel
                .as_ref()
                .is_some_and(|s| s.masters.iter().any(|m| m.name == "default.demo"))
        })
        .await;
    let watched = &report.sentinel.expect("sentinel").masters[0];
    assert_eq!((watched.port, watched.quorum), (u32::from(master.port), 1));
    assert!(
        watched.flags.contains(&"master".to_owned()),
        "{:?}",
        watched.flags
    );

    let set = hub
        .command(
            "s0",
            command(
                1,
                Action::SentinelSet(SentinelSet {
                    name: "default.demo".into(),
                    params: HashMap::from([(
                        "down-after-milliseconds".to_owned(),
                        "5000".to_owned(),
                    )]),
                    ..SentinelSet::default()
                }),
            ),
            T,
        )
        .await;
    assert_eq!(set.outcome(), Outcome::Ok, "{set:?}");
    hub.wait_report("s0", T, |r| {
        r.sentinel
            .as_ref()
            .is_some_and(|s| s.masters.iter().any(|m| m.down_after_ms == 5000))
    })
    .await;
    let bad_set = hub
        .command(
            "s0",
            command(
                1,
                Action::SentinelSet(SentinelSet {
                    name: "default.demo".into(),
                    params: HashMap::from([("no-such-option".to_owned(), "1".to_owned())]),
                    ..SentinelSet::default()
                }),
            ),
            T,
        )
        .await;
    assert_eq!(bad_set.outcome(), Outcome::Invalid, "{bad_set:?}");
    // Sentinel's own settings (the peer password of a rotation goes this way). A password
    // sent as a value is refused: it must be named, and the agent reads it from its file.
    let plain = hub
        .command(
            "s0",
            command(
                1,
                Action::SentinelConfigSet(SentinelConfigSet {
                    params: HashMap::from([("sentinel-pass".to_owned(), "peer-pw".to_owned())]),
                    ..SentinelConfigSet::default()
                }),
            ),
            T,
        )
        .await;
    assert_eq!(plain.outcome(), Outcome::Invalid, "{plain:?}");
    assert!(
        plain.message.contains("password_params"),
        "{}",
        plain.message
    );
    let config = hub
        .command(
            "s0",
            command(
                1,
                Action::SentinelConfigSet(SentinelConfigSet {
                    password_params: HashMap::from([("sentinel-pass".to_owned(), instance_ref)]),
                    ..SentinelConfigSet::default()
                }),
            ),
            T,
        )
        .await;
    assert_eq!(config.outcome(), Outcome::Ok, "{config:?}");
    assert!(!config.message.contains(PASSWORD), "{}", config.message);
    let pass: HashMap<String, String> = redis::cmd("SENTINEL")
        .arg("CONFIG")
        .arg("GET")
        .arg("sentinel-pass")
        .query_async(
            &mut sentinel
                .client()
                .get_multiplexed_async_connection()
                .await
                .expect("sentinel"),
        )
        .await
        .expect("SENTINEL CONFIG GET");
    assert_eq!(
        pass.get("sentinel-pass").map(String::as_str),
        Some(PASSWORD)
    );
    let empty = hub
        .command(
            "s0",
            command(1, Action::SentinelConfigSet(SentinelConfigSet::default())),
            T,
        )
        .await;
    assert_eq!(
        (empty.outcome(), empty.message.as_str()),
        (Outcome::Invalid, "sentinel_config_set.params is empty")
    );
    let reset = hub
        .command(
            "s0",
            command(
                1,
                Action::SentinelReset(SentinelReset {
                    pattern: "default.demo".into(),
                }),
            ),
            T,
        )
        .await;
    assert_eq!(
        (reset.outcome(), reset.message.as_str()),
        (Outcome::Ok, "reset 1 master(s)")
    );
    // No replica to promote: Sentinel says so, and the agent reports a failure.
    let failover = hub
        .command(
            "s0",
            command(
                1,
                Action::SentinelFailover(SentinelFailover {
                    name: "default.demo".into(),
                }),
            ),
            T,
        )
        .await;
    assert_eq!(failover.outcome(), Outcome::Failed, "{failover:?}");
    let wrong_kind = hub.command("s0", command(1, replica_of(&master)), T).await;
    assert_eq!(wrong_kind.outcome(), Outcome::Invalid);
    assert!(
        wrong_kind.message.contains("replica_of"),
        "{}",
        wrong_kind.message
    );
}
