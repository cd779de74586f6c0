//! Failover as an application sees it: one pooled client (the redis crate's connection
//! manager) behind a role-following proxy (the read-write Service), never recreated, keeps
//! writing across a planned switchover, a kill -9 failover and the return of a hung old
//! master; and a switchover whose target fails midway is undone without losing a write.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use nix::sys::signal::Signal;
use redis::{
    AsyncCommands,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use valkey_e2e::{
    local::{
        LocalInstance, Writer, manifest, master_of, missing_on, node, signal, switchover_when_ready,
    },
    proxy::RoleProxy,
    wait_for,
};

const T: Duration = Duration::from_secs(30);

/// The application's pool: connects through the proxy and reconnects on its own.
async fn pooled(instance: &LocalInstance, proxy: &RoleProxy) -> ConnectionManager {
    let client = instance.client(&proxy.addr());
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_min_delay(Duration::from_millis(2))
        .set_max_delay(Duration::from_millis(100));
    ConnectionManager::new_with_config(client, config)
        .await
        .expect("pooled client")
}

/// Writes through the pool until a write succeeds, then checks that it landed on `master`
/// (the node the controller names), not on a demoted one. The key written.
async fn writes_land_on(
    conn: &mut ConnectionManager,
    instance: &LocalInstance,
    master: &str,
    what: &str,
) -> String {
    let mut n = 0u64;
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let key = wait_for(what, T, || {
        n += 1;
        let key = format!("{what}-{n}");
        let (mut conn, last_error) = (conn.clone(), last_error.clone());
        async move {
            match conn.set::<_, _, ()>(&key, n).await {
                Ok(()) => Some(key),
                Err(err) => {
                    *last_error.lock().unwrap() = err.to_string();
                    None
                }
            }
        }
    })
    .await;
    let last_error = last_error.lock().unwrap().clone();
    let mut direct = instance.conn(master).await;
    let found: Option<u64> = direct.get(&key).await.expect("GET on the master");
    assert!(
        found.is_some(),
        "{key} acknowledged but not on the master {master}"
    );
    // And it keeps working: no READONLY left behind.
    for i in 0..20 {
        let set: redis::RedisResult<()> = conn.set(format!("{key}-then-{i}"), i).await;
        set.unwrap_or_else(|e| panic!("write {i} after {key}: {e} (before: {last_error})"));
    }
    key
}

async fn up() -> (LocalInstance, RoleProxy, ConnectionManager) {
    let instance = LocalInstance::up(&manifest(3));
    instance.wait_healthy(3, T).await;
    let proxy = RoleProxy::for_local(instance.dir.clone()).await;
    let mut conn = pooled(&instance, &proxy).await;
    let _: () = conn.set("before", 1).await.expect("a first write");
    // On every replica, as their agents report: a failover needs a replica the controller
    // knows has data (with every node empty, a crashed master is promoted back, being all
    // there is).
    instance
        .wait_status("every node to report the first write", T, |s| {
            s.nodes.iter().all(|n| n.keys >= 1)
        })
        .await;
    (instance, proxy, conn)
}

#[tokio::test]
async fn a_pooled_client_writes_to_the_new_master_after_a_planned_switchover() {
    let (instance, _proxy, mut conn) = up().await;
    let status = instance.wait_healthy(3, T).await;
    let (old, _, _) = master_of(&status);
    let to = status
        .nodes
        .iter()
        .find(|n| n.pod != old)
        .unwrap()
        .pod
        .clone();
    switchover_when_ready(&instance, &to).await;
    let status = instance
        .wait_status("the target to be master", T, |s| {
            s.master.as_deref() == Some(to.as_str())
        })
        .await;
    let (_, addr, _) = master_of(&status);
    writes_land_on(&mut conn, &instance, &addr, "after-switchover").await;
}

#[tokio::test]
async fn a_pooled_client_writes_to_the_new_master_after_a_kill_9_failover() {
    let (instance, _proxy, mut conn) = up().await;
    let status = instance.wait_healthy(3, T).await;
    let (old, _, _) = master_of(&status);
    signal(node(&status, &old).valkey_pid.unwrap(), Signal::SIGKILL);
    let status = instance
        .wait_status("another master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let (_, addr, _) = master_of(&status);
    writes_land_on(&mut conn, &instance, &addr, "after-kill").await;
}

#[tokio::test]
async fn a_pooled_client_left_on_a_hung_old_master_moves_when_it_returns_and_is_demoted() {
    let (instance, _proxy, mut conn) = up().await;
    let status = instance.wait_healthy(3, T).await;
    let (old, _, _) = master_of(&status);
    let hung = node(&status, &old).clone();
    signal(hung.valkey_pid.unwrap(), Signal::SIGSTOP);
    let status = instance
        .wait_status("another master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let (_, addr, _) = master_of(&status);
    // The pool's connection still points at the hung node; it comes back as a master with
    // that connection open, and is demoted.
    signal(hung.valkey_pid.unwrap(), Signal::SIGCONT);
    instance
        .wait_status("the old master back as a replica", T, |s| {
            s.nodes
                .iter()
                .any(|n| n.pod == old && n.role == "replica" && n.link == "up")
        })
        .await;
    writes_land_on(&mut conn, &instance, &addr, "after-return").await;
}

#[tokio::test]
async fn a_switchover_whose_target_hangs_midway_is_undone_and_loses_no_write() {
    let (instance, _proxy, mut conn) = up().await;
    let status = instance.wait_healthy(3, T).await;
    let (old, old_addr, _) = master_of(&status);
    let writer = Writer::start(instance.dir.clone(), 1);
    writer.wait_more(50).await;
    let target = status.nodes.iter().find(|n| n.pod != old).unwrap().clone();
    // The target stops answering just as the switchover starts: its catch-up cannot finish.
    // When its agent reports the hang before the request arrives (a loaded machine), the
    // request is refused instead; then the target resumes and it is tried again.
    let master = instance.conn(&old_addr).await;
    let port = target.addr.rsplit_once(':').unwrap().1.to_owned();
    let mut attempts = 0;
    loop {
        attempts += 1;
        // The master counts the target online (after a full sync it waits for its first
        // ack): otherwise the switchover would be refused rather than started.
        wait_for("the master to count the target online", T, || {
            let (mut master, port) = (master.clone(), &port);
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut master)
                    .await
                    .ok()?;
                info.contains(&format!("port={port},state=online"))
                    .then_some(())
            }
        })
        .await;
        signal(target.valkey_pid.unwrap(), Signal::SIGSTOP);
        let reply = instance.switchover(Some(&target.pod)).await;
        if reply.ok {
            break;
        }
        assert!(
            attempts < 10 && reply.message.contains("not an in-sync replica"),
            "{}",
            reply.message
        );
        signal(target.valkey_pid.unwrap(), Signal::SIGCONT);
        instance.wait_healthy(3, T).await;
    }
    let status = instance
        .wait_status("the switchover to be dropped", T, |s| {
            s.switchover.is_none() && s.epoch > status.epoch
        })
        .await;
    assert_eq!(
        status.master.as_deref(),
        Some(old.as_str()),
        "the old master stays"
    );
    let count = writer.count();
    writer.wait_more(50).await;
    assert!(
        writer.count() >= count + 50,
        "writes resume on the old master"
    );
    writes_land_on(&mut conn, &instance, &old_addr, "after-undo").await;
    signal(target.valkey_pid.unwrap(), Signal::SIGCONT);
    let acked = writer.finish().await;
    assert_eq!(
        missing_on(&instance, &old_addr, &acked).await,
        Vec::<u64>::new()
    );
}

#[tokio::test]
async fn a_pooled_client_that_drops_a_timed_out_connection_reaches_the_new_master_after_a_hang() {
    let (instance, proxy, mut conn) = up().await;
    let status = instance.wait_healthy(3, T).await;
    let (old, _, _) = master_of(&status);
    let hung = node(&status, &old).clone();
    signal(hung.valkey_pid.unwrap(), Signal::SIGSTOP);
    let write: redis::RedisResult<()> = conn.set("during-hang", 1).await;
    assert!(
        write.is_err_and(|e| e.is_timeout()),
        "the hung master does not answer"
    );
    let status = instance
        .wait_status("another master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let (_, addr, _) = master_of(&status);
    // As pools that discard a timed-out connection do: a fresh one, through the same route.
    let mut fresh = pooled(&instance, &proxy).await;
    writes_land_on(&mut fresh, &instance, &addr, "after-hang").await;
    signal(hung.valkey_pid.unwrap(), Signal::SIGCONT);
}
