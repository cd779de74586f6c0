//! Policy sentinel through the local runtime, with real valkey-sentinel processes: the seed's
//! example bootstraps with three sentinels; a killed master is failed over at once although
//! down-after-milliseconds is 30 s; a planned switchover through Sentinel loses nothing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use valkey_controller::local::control::Status;
use valkey_e2e::{
    local::{
        LocalInstance, Writer, assert_every_node_holds, master_of, missing_on, node, signal,
        switchover_when_ready, write_n,
    },
    wait_for,
};

const T: Duration = Duration::from_secs(30);
const SEED: &str = include_str!("../../deploy/examples/failover.yaml");
const MONITOR: &str = "valkey-system.example-failover";

/// Every sentinel connected and naming the controller's master.
fn sentinels_agree(status: &Status) -> bool {
    let master = status.master_addr.as_deref();
    status.monitor.policy == "sentinel"
        && status.monitor.nodes.len() == 3
        && status
            .monitor
            .nodes
            .iter()
            .all(|s| s.connected && s.master.as_deref() == master && master.is_some())
}

async fn sentinel_master_info(instance: &LocalInstance, addr: &str) -> HashMap<String, String> {
    let client = instance.sentinel_client(addr);
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("sentinel");
    redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(MONITOR)
        .query_async(&mut conn)
        .await
        .expect("SENTINEL MASTER")
}

/// Sentinel must know the replicas (it reads them from the master every 10 s) before it can
/// promote one.
async fn sentinels_know_both_replicas(instance: &LocalInstance, status: &Status) {
    for sentinel in &status.monitor.nodes {
        wait_for("the sentinel to know both replicas", T, || async {
            (sentinel_master_info(instance, &sentinel.addr)
                .await
                .get("num-slaves")
                .map(String::as_str)
                == Some("2"))
            .then_some(())
        })
        .await;
    }
}

async fn up_and_ready() -> (LocalInstance, Status) {
    let instance = LocalInstance::up(SEED);
    instance.wait_healthy(3, T).await;
    let status = instance
        .wait_status("every sentinel to name the master", T, sentinels_agree)
        .await;
    (instance, status)
}

#[tokio::test]
async fn the_seed_example_bootstraps_with_three_sentinels() {
    let (instance, status) = up_and_ready().await;
    assert_eq!(status.monitor.name.as_deref(), Some(MONITOR));
    assert_eq!(status.monitor.quorum, Some(2));
    // No Secret named for the sentinels: they still have a password, made by `local up`, so
    // that no other local user can run SENTINEL FAILOVER.
    let generated = instance.dir.join("sentinel-password");
    assert_eq!(
        status.monitor.password_secret,
        Some(generated.display().to_string())
    );
    for sentinel in &status.monitor.nodes {
        let refused: redis::RedisResult<Vec<HashMap<String, String>>> =
            sentinel_query(&sentinel.addr, None, &["MASTERS"]).await;
        assert!(
            refused.is_err_and(|e| e.code() == Some("NOAUTH")),
            "{} answered without a password",
            sentinel.pod
        );
    }
    // Each sentinel has the example's settings and finds the others and both replicas.
    for sentinel in &status.monitor.nodes {
        let info = wait_for("the sentinel to know its peers", T, || async {
            let info = sentinel_master_info(&instance, &sentinel.addr).await;
            (info.get("num-other-sentinels").map(String::as_str) == Some("2")
                && info.get("num-slaves").map(String::as_str) == Some("2"))
            .then_some(info)
        })
        .await;
        assert_eq!(info["quorum"], "2");
        assert_eq!(info["down-after-milliseconds"], "30000");
        assert_eq!(info["failover-timeout"], "180000");
        assert_eq!(info["parallel-syncs"], "1");
        assert_eq!(
            Some(format!("{}:{}", info["ip"], info["port"])),
            status.master_addr
        );
    }
}

#[tokio::test]
async fn a_killed_master_is_failed_over_at_once_despite_down_after_30s() {
    let (instance, status) = up_and_ready().await;
    let (old, addr, pid) = master_of(&status);
    let keys = write_n(&instance, &addr, 50, 2).await;
    sentinels_know_both_replicas(&instance, &status).await;

    let killed = Instant::now();
    signal(pid, Signal::SIGKILL);
    let after = instance
        .wait_status("Sentinel to name a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let took = killed.elapsed();
    eprintln!(
        "kill -9 to a new master named by Sentinel: {took:?} (down-after-milliseconds is 30000)"
    );
    assert!(took < Duration::from_secs(15), "not accelerated: {took:?}");
    let reason = after.last_failover.clone().expect("record").reason;
    assert!(reason.contains("Sentinel"), "{reason}");
    let healed = instance.wait_healthy(3, T).await;
    assert_eq!(node(&healed, &old).role, "replica");
    let (_, new_addr, _) = master_of(&healed);
    assert_eq!(
        missing_on(&instance, &new_addr, &keys).await,
        Vec::<u64>::new()
    );
    instance
        .wait_status("every sentinel to follow", T, sentinels_agree)
        .await;
}

/// The bootstrap window: the master is killed within 100 ms of the controller choosing it,
/// before the sentinels have read its INFO (they learn replicas from it) or just after. A
/// new master is elected either way (by the controller, which hands it to the sentinels, or
/// by Sentinel steered to the controller's choice), holding every write a replica
/// acknowledged before the kill.
#[tokio::test]
async fn a_master_killed_right_after_bootstrap_is_failed_over_with_every_acknowledged_write() {
    let instance = LocalInstance::up(SEED);
    let status = loop {
        if let Some(status) = instance.try_status().await
            && status.master.is_some()
            && status.nodes.iter().all(|n| n.valkey_pid.is_some())
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let bootstrapped = Instant::now();
    let (old, addr, pid) = master_of(&status);
    // Writes until about 60 ms after the bootstrap, each kept only once a replica has it,
    // and at least until one is (a master killed before it took a write has nothing to lose).
    let mut conn = instance.conn(&addr).await;
    let mut acked = Vec::new();
    for i in 0u64.. {
        if bootstrapped.elapsed() > Duration::from_millis(60) && !acked.is_empty() {
            break;
        }
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("w{i}"))
            .arg(i)
            .query_async(&mut conn)
            .await;
        let waited: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(1)
            .arg(10)
            .query_async(&mut conn)
            .await;
        if set.is_ok() && waited == Ok(1) {
            acked.push(i);
        }
    }
    signal(pid, Signal::SIGKILL);
    let killed_after = bootstrapped.elapsed();
    let after = instance
        .wait_status("a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let reason = after.last_failover.clone().expect("record").reason;
    eprintln!(
        "killed {killed_after:?} after the bootstrap with {} acknowledged writes; {reason}",
        acked.len()
    );
    let status = instance
        .wait_status("every sentinel to name the new master", T, sentinels_agree)
        .await;
    let (new, new_addr, _) = master_of(&status);
    assert_ne!(new, old);
    let keys: std::collections::BTreeSet<u64> = acked.into_iter().collect();
    let mut conn = instance.conn(&new_addr).await;
    let mut missing = Vec::new();
    for key in &keys {
        let value: Option<u64> = redis::cmd("GET")
            .arg(format!("w{key}"))
            .query_async(&mut conn)
            .await
            .expect("GET");
        if value != Some(*key) {
            missing.push(*key);
        }
    }
    assert_eq!(missing, Vec::<u64>::new(), "acknowledged writes lost");
    instance.wait_healthy(3, T).await;
}

#[tokio::test]
async fn a_planned_switchover_through_sentinel_loses_no_acknowledged_write() {
    let (instance, status) = up_and_ready().await;
    let (old, _, _) = master_of(&status);
    let target = status
        .nodes
        .iter()
        .find(|n| n.pod != old)
        .expect("a replica")
        .pod
        .clone();
    // Plain SET replies count as acknowledgements.
    let writer = Writer::start(instance.dir.clone(), 0);
    writer.wait_more(300).await;
    switchover_when_ready(&instance, &target).await;
    instance
        // Sentinel reads replica priorities every 10 s: steering it can take that long.
        .wait_status("the target as master", 2 * T, |s| {
            s.master.as_deref() == Some(target.as_str())
        })
        .await;
    writer.wait_more(300).await;
    let healed = instance.wait_healthy(3, T).await;
    assert_eq!(node(&healed, &old).role, "replica");
    let acked = writer.finish().await;
    let (_, addr, _) = master_of(&healed);
    assert_eq!(
        missing_on(&instance, &addr, &acked).await,
        Vec::<u64>::new(),
        "acknowledged writes lost"
    );
    instance
        .wait_status("every sentinel to follow", T, sentinels_agree)
        .await;
}

#[tokio::test]
async fn a_hung_master_is_left_to_sentinels_own_timing() {
    let manifest = SEED.replace(
        "down-after-milliseconds: \"30000\"",
        "down-after-milliseconds: \"2000\"",
    );
    let instance = LocalInstance::up(&manifest);
    instance.wait_healthy(3, T).await;
    let status = instance
        .wait_status("every sentinel to name the master", T, sentinels_agree)
        .await;
    let (old, _, pid) = master_of(&status);
    sentinels_know_both_replicas(&instance, &status).await;
    let stopped = Instant::now();
    signal(pid, Signal::SIGSTOP);
    let after = instance
        .wait_status("Sentinel to name a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    // A hang gives no definite signal: no acceleration, Sentinel decides on its own timing.
    assert!(
        stopped.elapsed() >= Duration::from_millis(2000),
        "failed over before down-after"
    );
    assert!(
        after
            .last_failover
            .expect("record")
            .reason
            .contains("Sentinel")
    );
    signal(pid, Signal::SIGCONT);
    let healed = instance.wait_healthy(3, T).await;
    assert_eq!(
        healed.nodes.iter().filter(|n| n.role == "master").count(),
        1
    );
    assert_eq!(node(&healed, &old).role, "replica");
    instance
        .wait_status("every sentinel to follow", T, sentinels_agree)
        .await;
}

#[tokio::test]
async fn a_restarted_sentinel_comes_back_knowing_the_master() {
    let (instance, status) = up_and_ready().await;
    let victim = status.monitor.nodes[0].clone();
    let conf = std::fs::read_to_string(instance.node_dir(&victim.pod).join("sentinel.conf"))
        .expect("conf");
    assert!(
        conf.contains(&format!("sentinel monitor {MONITOR}")),
        "Sentinel persisted its monitor:\n{conf}"
    );
    signal(victim.sentinel_pid.expect("pid"), Signal::SIGKILL);
    let after = instance
        .wait_status("the sentinel back, naming the master", T, |s| {
            let n = &s.monitor.nodes[0];
            n.sentinel_pid != victim.sentinel_pid && n.connected && sentinels_agree(s)
        })
        .await;
    assert_eq!(after.master, status.master);
    assert_eq!(after.epoch, status.epoch, "no failover");
}

#[tokio::test]
async fn an_external_sentinel_set_is_shared_by_two_instances() {
    let sentinels: Vec<valkey_e2e::procs::Sentinel> = (0..3)
        .map(|_| valkey_e2e::procs::Sentinel::start())
        .collect();
    let nodes: String = sentinels
        .iter()
        .map(|s| format!("        - ip: 127.0.0.1\n          port: {}\n", s.port))
        .collect();
    let manifest = |name: &str| {
        format!(
            "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: {name}\n  namespace: shared\nspec:\n  replicas: 2\n  sentinel:\n    quorum: 2\n    monitorConfig:\n      down-after-milliseconds: \"5000\"\n    sentinelReference:\n      nodes:\n{nodes}"
        )
    };
    let a = LocalInstance::up(&manifest("a"));
    let b = LocalInstance::up(&manifest("b"));
    let agree = |s: &Status| {
        s.monitor.nodes.len() == 3
            && s.monitor
                .nodes
                .iter()
                .all(|n| n.connected && n.master.is_some() && n.master == s.master_addr)
    };
    let sa = a
        .wait_status("instance a monitored by every sentinel", T, agree)
        .await;
    let sb = b
        .wait_status("instance b monitored by every sentinel", T, agree)
        .await;
    assert_eq!(sa.monitor.name.as_deref(), Some("shared.a"));
    assert_eq!(sb.monitor.name.as_deref(), Some("shared.b"));
    assert_ne!(sa.master_addr, sb.master_addr);
    // One sentinel, both monitors, each with its own master and settings.
    let client = sentinels[0].client();
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("sentinel");
    // The monitor comes first, its settings right after: wait for both monitors' settings.
    let masters: Vec<HashMap<String, String>> = wait_for("both monitors configured", T, || {
        let mut conn = conn.clone();
        async move {
            let masters: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
                .arg("MASTERS")
                .query_async(&mut conn)
                .await
                .ok()?;
            (masters.len() == 2
                && masters
                    .iter()
                    .all(|m| m.get("down-after-milliseconds").map(String::as_str) == Some("5000")))
            .then_some(masters)
        }
    })
    .await;
    let by_name: HashMap<&str, &HashMap<String, String>> =
        masters.iter().map(|m| (m["name"].as_str(), m)).collect();
    for status in [&sa, &sb] {
        let name = status.monitor.name.as_deref().expect("name");
        let m = by_name
            .get(name)
            .unwrap_or_else(|| panic!("{name} not monitored: {masters:?}"));
        assert_eq!(
            Some(format!("{}:{}", m["ip"], m["port"])),
            status.master_addr
        );
        assert_eq!(
            (m["quorum"].as_str(), m["down-after-milliseconds"].as_str()),
            ("2", "5000")
        );
    }
    a.wait_healthy(2, T).await;
    b.wait_healthy(2, T).await;
}

#[tokio::test]
async fn a_sentinel_back_on_a_new_port_is_found_and_the_old_address_forgotten() {
    let (mut instance, status) = up_and_ready().await;
    let moved = status.monitor.nodes[0].clone();
    let witness = status.monitor.nodes[1].addr.clone();
    // Every sentinel has met the one that will move.
    wait_for("the sentinels to know each other", T, || async {
        (sentinel_master_info(&instance, &witness)
            .await
            .get("num-other-sentinels")
            .map(String::as_str)
            == Some("2"))
        .then_some(())
    })
    .await;
    instance.stop().await;
    let state_path = instance.dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).expect("state")).expect("json");
    let new_port = valkey_e2e::free_port();
    state["sentinels"][&moved.pod]["valkey"] = new_port.into();
    std::fs::write(&state_path, serde_json::to_string(&state).expect("json")).expect("write state");
    instance.start();

    let old_port = moved.addr.rsplit_once(':').expect("addr").1.to_owned();
    let healed = wait_for(
        "the old sentinel address to be forgotten",
        2 * T,
        || async {
            let status = instance.try_status().await?;
            if !sentinels_agree(&status)
                || status.monitor.nodes[0].addr != format!("127.0.0.1:{new_port}")
            {
                return None;
            }
            let client = instance.sentinel_client(&witness);
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let peers: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
                .arg("SENTINELS")
                .arg(MONITOR)
                .query_async(&mut conn)
                .await
                .ok()?;
            let ports: Vec<&str> = peers
                .iter()
                .filter_map(|p| p.get("port").map(String::as_str))
                .collect();
            (ports.contains(&new_port.to_string().as_str()) && !ports.contains(&old_port.as_str()))
                .then_some(status)
        },
    )
    .await;
    assert_eq!(healed.master, status.master, "no failover");
}

#[tokio::test]
async fn after_a_password_rotation_sentinel_still_fails_over() {
    let (instance, status) = up_and_ready().await;
    let (old_master, addr, pid) = master_of(&status);
    let keys = write_n(&instance, &addr, 20, 2).await;
    let rotated = instance.rotate_password().await;
    assert!(rotated.monitor.password_secret.is_some());
    sentinels_know_both_replicas(&instance, &status).await;
    signal(pid, Signal::SIGKILL);
    instance
        .wait_status("Sentinel to name a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old_master)
        })
        .await;
    let healed = instance.wait_healthy(3, T).await;
    let (_, new_addr, _) = master_of(&healed);
    assert_eq!(
        missing_on(&instance, &new_addr, &keys).await,
        Vec::<u64>::new()
    );
    instance
        .wait_status("every sentinel to follow", T, sentinels_agree)
        .await;
}

/// The seed's example with the sentinels' own password in Secret `sentinel-pw`.
fn with_sentinel_password() -> LocalInstance {
    let manifest = SEED.replace(
        "  sentinel:\n    replicas: 3\n",
        "  sentinel:\n    replicas: 3\n    access:\n      defaultPasswordSecret: sentinel-pw\n",
    );
    assert_ne!(manifest, SEED);
    LocalInstance::up_with_files(
        &manifest,
        &[("secrets/sentinel-pw/password", "s3ntinel-pw\n")],
    )
}

/// `SENTINEL <args>` on a sentinel, with `password` (or none).
async fn sentinel_query<T: redis::FromRedisValue>(
    addr: &str,
    password: Option<&str>,
    args: &[&str],
) -> redis::RedisResult<T> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = redis::Client::open(format!("redis://{auth}{addr}/"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("SENTINEL")
        .arg(args)
        .query_async(&mut conn)
        .await
}

#[tokio::test]
async fn sentinels_with_a_password_secret_require_it_and_the_agents_use_it() {
    let instance = with_sentinel_password();
    instance.wait_healthy(3, T).await;
    let status = instance
        .wait_status("every sentinel to name the master", T, sentinels_agree)
        .await;
    assert_eq!(
        status.monitor.password_secret.as_deref(),
        Some("sentinel-pw")
    );
    let addr = &status.monitor.nodes[0].addr;
    let refused: redis::RedisResult<Vec<HashMap<String, String>>> =
        sentinel_query(addr, None, &["MASTERS"]).await;
    assert!(
        refused.is_err_and(|e| e.code() == Some("NOAUTH")),
        "a sentinel answered without its password"
    );
    let masters: Vec<HashMap<String, String>> =
        sentinel_query(addr, Some("s3ntinel-pw"), &["MASTERS"])
            .await
            .expect("MASTERS with the password");
    assert_eq!(masters.len(), 1);
}

#[tokio::test]
async fn a_changed_sentinel_secret_is_rolled_out_without_cutting_anyone_off() {
    let instance = with_sentinel_password();
    instance.wait_healthy(3, T).await;
    let before = instance
        .wait_status("every sentinel to name the master", T, sentinels_agree)
        .await;
    std::fs::write(
        instance.dir.join("secrets/sentinel-pw/password"),
        "n3w-sentinel-pw\n",
    )
    .expect("update the Secret");
    let rotated = instance
        .wait_status("the sentinels to take the new password", T, |s| {
            sentinels_agree(s)
                && s.monitor.old_password_secret.is_none()
                && std::fs::read_to_string(instance.dir.join("sentinel-password"))
                    .is_ok_and(|p| p.trim() == "n3w-sentinel-pw")
        })
        .await;
    let done = Instant::now();
    for sentinel in &rotated.monitor.nodes {
        let old: redis::RedisResult<Vec<HashMap<String, String>>> =
            sentinel_query(&sentinel.addr, Some("s3ntinel-pw"), &["MASTERS"]).await;
        assert!(
            old.is_err(),
            "{} still takes the old password",
            sentinel.pod
        );
        // Peers authenticate with the new password: each peer's latest ping reply, received
        // after the rotation ended, was a good one.
        wait_for(
            "every peer to answer pings with the new password",
            T,
            || async {
                let peers: Vec<HashMap<String, String>> = sentinel_query(
                    &sentinel.addr,
                    Some("n3w-sentinel-pw"),
                    &["SENTINELS", MONITOR],
                )
                .await
                .ok()?;
                let fresh = |p: &HashMap<String, String>| {
                    let ms = |k: &str| p.get(k).and_then(|v| v.parse::<u128>().ok());
                    ms("last-ping-reply").is_some_and(|r| r < done.elapsed().as_millis())
                        && ms("last-ping-reply") == ms("last-ok-ping-reply")
                };
                (peers.len() == 2 && peers.iter().all(fresh)).then_some(())
            },
        )
        .await;
    }
    // A sentinel restarted after the rotation comes back with the new password only.
    let first = &rotated.monitor.nodes[0];
    signal(first.sentinel_pid.expect("pid"), Signal::SIGKILL);
    let back = instance
        .wait_status("the sentinel to come back", T, |s| {
            sentinels_agree(s) && s.monitor.nodes[0].sentinel_pid != first.sentinel_pid
        })
        .await;
    let addr = &back.monitor.nodes[0].addr;
    let masters = wait_for("the restarted sentinel to answer", T, || async {
        sentinel_query::<Vec<HashMap<String, String>>>(addr, Some("n3w-sentinel-pw"), &["MASTERS"])
            .await
            .ok()
    })
    .await;
    assert_eq!(masters.len(), 1);
    let old: redis::RedisResult<Vec<HashMap<String, String>>> =
        sentinel_query(addr, Some("s3ntinel-pw"), &["MASTERS"]).await;
    assert!(old.is_err(), "the old password works again after a restart");
    assert_eq!(back.master, before.master, "no failover");
}

/// Polls every node but `skip` for its key count every 10 ms, and remembers the lowest count
/// each showed: a node that held the data and then shows fewer keys synced from an empty one.
fn lowest_key_counts(
    instance: &LocalInstance,
    status: &Status,
    skip: &str,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<HashMap<String, u64>>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let nodes: Vec<(String, redis::Client)> = status
        .nodes
        .iter()
        .filter(|n| n.pod != skip)
        .map(|n| (n.pod.clone(), instance.client(&n.addr)))
        .collect();
    let task = tokio::spawn(async move {
        let mut lowest: HashMap<String, u64> = HashMap::new();
        let mut conns = HashMap::new();
        while !*stopped.borrow() {
            for (pod, client) in &nodes {
                if !conns.contains_key(pod)
                    && let Ok(conn) = client.get_multiplexed_async_connection().await
                {
                    conns.insert(pod.clone(), conn);
                }
                let Some(conn) = conns.get_mut(pod) else {
                    continue;
                };
                // LOADING (a sync being loaded) and a restarting node answer with errors.
                match redis::cmd("DBSIZE").query_async::<u64>(conn).await {
                    Ok(keys) => {
                        let low = lowest.entry(pod.clone()).or_insert(keys);
                        *low = (*low).min(keys);
                    }
                    Err(_) => {
                        conns.remove(pod);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lowest
    });
    (stop, task)
}

#[tokio::test]
async fn a_master_wiped_and_killed_three_times_loses_no_acknowledged_key() {
    let (instance, status) = up_and_ready().await;
    let (_, addr, _) = master_of(&status);
    let keys = write_n(&instance, &addr, 2000, 2).await;
    for round in 1..=3 {
        let status = instance.wait_healthy(3, T).await;
        let status = instance
            .wait_status("every sentinel to name the master", T, |s| {
                sentinels_agree(s) && s.master == status.master
            })
            .await;
        sentinels_know_both_replicas(&instance, &status).await;
        let (old, _, _) = master_of(&status);
        let (stop, watch) = lowest_key_counts(&instance, &status, &old);

        // The whole pod dies and its data is gone: it restarts from its config, empty. After
        // round 1 that config is one Sentinel rewrote when it promoted this node.
        instance.kill_and_wipe(node(&status, &old));

        instance
            .wait_status("Sentinel to name a new master", T, |s| {
                s.master.as_ref().is_some_and(|m| *m != old)
            })
            .await;
        let healed = instance.wait_healthy(3, T).await;
        assert_eq!(
            node(&healed, &old).role,
            "replica",
            "round {round}: the wiped node must come back as a replica"
        );
        let _ = stop.send(true);
        let lowest = watch.await.expect("watcher");
        for (pod, low) in &lowest {
            assert!(
                *low >= keys.len() as u64,
                "round {round}: {pod} went down to {low} keys: it synced from an empty node"
            );
        }
        assert_every_node_holds(&instance, &healed, &keys, &format!("round {round}")).await;
    }
}

#[tokio::test]
async fn after_a_switchover_and_a_rotation_a_killed_replica_relinks_on_the_new_password() {
    let (instance, status) = up_and_ready().await;
    sentinels_know_both_replicas(&instance, &status).await;
    let (old, _, _) = master_of(&status);
    let target = status
        .nodes
        .iter()
        .find(|n| n.pod != old)
        .expect("a replica")
        .pod
        .clone();
    // Sentinel's switchover rewrites every node's config (CONFIG REWRITE after REPLICAOF).
    switchover_when_ready(&instance, &target).await;
    instance
        .wait_status("the switchover to finish", T, |s| {
            s.master.as_deref() == Some(target.as_str()) && sentinels_agree(s)
        })
        .await;
    let old_password = instance.password();
    instance.rotate_password().await;
    assert_ne!(instance.password(), old_password);

    let status = instance.wait_healthy(3, T).await;
    let replica = status
        .nodes
        .iter()
        .find(|n| n.role == "replica")
        .expect("a replica")
        .clone();
    signal(replica.valkey_pid.expect("pid"), Signal::SIGKILL);
    let healed = instance
        .wait_replica_back(&replica, "the replica back and linked")
        .await;
    // It takes the new password, and the master counts both replicas again.
    let mut conn = instance.conn(&node(&healed, &replica.pod).addr).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    let (_, master_addr, _) = master_of(&healed);
    let mut conn = instance.conn(&master_addr).await;
    let _: () = redis::cmd("SET")
        .arg("after-rotation")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("SET");
    let acks: i64 = redis::cmd("WAIT")
        .arg(2)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(acks, 2, "WAIT 2 after the replica came back");
}
