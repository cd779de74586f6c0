//! End-to-end through the local runtime (`valkey-controller local up`), with real valkey-server
//! and valkey-agent processes: bootstrap, crash and hang failover, planned switchover, empty
//! restarts, lost agents, controller restarts and scaling.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use nix::sys::signal::Signal;
use redis::AsyncCommands;
use valkey_e2e::{
    local::{
        LocalInstance, Writer, alive, assert_every_node_holds, manifest, master_of, missing_on,
        node, signal, switchover_when_ready, write_n,
    },
    wait_for,
};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn bootstrap_of_three_nodes_gives_one_master_and_two_replicas_in_sync() {
    let instance = LocalInstance::up(&manifest(3));
    let status = instance.wait_healthy(3, T).await;
    assert_eq!(status.epoch, 1);
    assert_eq!(status.instance, "e2e/demo");
    let (master, addr, _) = master_of(&status);
    assert_eq!(master, "demo-0", "all empty: the lowest ordinal");
    let keys = write_n(&instance, &addr, 100, 2).await;
    for replica in status.nodes.iter().filter(|n| n.pod != master) {
        assert_eq!(
            missing_on(&instance, &replica.addr, &keys).await,
            Vec::<u64>::new()
        );
        let mut conn = instance.conn(&replica.addr).await;
        let write: redis::RedisResult<()> = conn.set("x", 1).await;
        assert!(
            write.is_err_and(|e| e.code() == Some("READONLY")),
            "a replica refuses writes"
        );
    }
    // The password file opens the master, as the README says.
    let pong: String = redis::cmd("PING")
        .query_async(&mut instance.conn(&addr).await)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn kill9_of_the_master_fails_over_and_loses_no_write_acknowledged_by_a_replica() {
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (old, _, pid) = master_of(&before);
    let writer = Writer::start(instance.dir.clone(), 1);
    writer.wait_more(200).await;

    signal(pid, Signal::SIGKILL);
    let after = instance
        .wait_status("a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    assert_eq!(after.epoch, before.epoch + 1);
    let record = after.last_failover.clone().expect("failover record");
    assert!(record.reason.contains("gone"), "{}", record.reason);
    writer.wait_more(100).await;

    // The old master comes back (restarted like a kubelet would) as a replica.
    let healed = instance.wait_healthy(3, T).await;
    assert_eq!(node(&healed, &old).role, "replica");
    let (new_master, addr, _) = master_of(&healed);
    assert_eq!(Some(&new_master), after.master.as_ref());
    let acked = writer.finish().await;
    assert!(acked.len() >= 300);
    assert_eq!(
        missing_on(&instance, &addr, &acked).await,
        Vec::<u64>::new(),
        "acknowledged writes lost"
    );
}

#[tokio::test]
async fn a_planned_switchover_under_a_continuous_writer_loses_no_acknowledged_write() {
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (old, _, _) = master_of(&before);
    // Plain SET replies count: a planned switchover must not lose even those.
    let writer = Writer::start(instance.dir.clone(), 0);
    writer.wait_more(500).await;

    switchover_when_ready(&instance, "demo-2").await;
    let after = instance
        .wait_status("demo-2 as master", T, |s| {
            s.master.as_deref() == Some("demo-2") && s.switchover.is_none()
        })
        .await;
    assert_eq!(after.epoch, before.epoch + 1);
    assert_eq!(
        after.last_failover.as_ref().map(|f| f.reason.as_str()),
        Some("planned switchover")
    );
    writer.wait_more(500).await;
    let healed = instance.wait_healthy(3, T).await;
    assert_eq!(node(&healed, &old).role, "replica");
    let acked = writer.finish().await;
    let (_, addr, _) = master_of(&healed);
    assert_eq!(
        missing_on(&instance, &addr, &acked).await,
        Vec::<u64>::new(),
        "acknowledged writes lost"
    );

    // Asking for the current master, or a node that does not exist, is refused clearly.
    let same = instance.switchover(Some("demo-2")).await;
    assert!(
        !same.ok && same.message.contains("already the master"),
        "{}",
        same.message
    );
    let unknown = instance.switchover(Some("demo-9")).await;
    assert!(
        !unknown.ok && unknown.message.contains("demo-9"),
        "{}",
        unknown.message
    );
}

#[tokio::test]
async fn a_master_restarted_empty_never_becomes_the_sync_source() {
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (old, addr, _) = master_of(&before);
    let keys = write_n(&instance, &addr, 50, 2).await;

    instance.kill_and_wipe(node(&before, &old));

    let after = instance
        .wait_status("a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let reason = after.last_failover.clone().expect("record").reason;
    assert!(reason.contains(&old), "{reason}");
    let healed = instance.wait_healthy(3, T).await;
    assert_ne!(healed.master.as_deref(), Some(old.as_str()));
    assert_every_node_holds(&instance, &healed, &keys, "after the empty restart").await;
}

#[tokio::test]
async fn sigstop_of_the_master_fails_over_after_the_hang_timeout_and_sigcont_leaves_one_master() {
    let instance = LocalInstance::up_with(&manifest(3), &["--hang-timeout-ms", "2000"]);
    let before = instance.wait_healthy(3, T).await;
    let (old, _, pid) = master_of(&before);
    signal(pid, Signal::SIGSTOP);
    let after = instance
        .wait_status("a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    let reason = after.last_failover.clone().expect("record").reason;
    assert!(reason.contains("unresponsive"), "{reason}");
    signal(pid, Signal::SIGCONT);
    let healed = instance.wait_healthy(3, T).await;
    assert_eq!(
        healed.nodes.iter().filter(|n| n.role == "master").count(),
        1
    );
    assert_eq!(node(&healed, &old).role, "replica");
    assert_eq!(healed.master, after.master);
}

#[tokio::test]
async fn killing_a_replicas_agent_causes_no_failover() {
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let replica = before
        .nodes
        .iter()
        .find(|n| n.role == "replica")
        .expect("a replica")
        .clone();
    signal(replica.agent_pid.expect("agent pid"), Signal::SIGKILL);
    instance
        .wait_status("the agent to drop", T, |s| !node(s, &replica.pod).connected)
        .await;
    let after = instance
        .wait_status("the agent back", T, |s| {
            let n = node(s, &replica.pod);
            n.connected && n.agent_pid != replica.agent_pid
        })
        .await;
    assert_eq!((after.epoch, &after.master), (before.epoch, &before.master));
    assert!(after.last_failover.is_none());
}

#[tokio::test]
async fn restarting_the_controller_causes_no_spurious_failover_and_resumes_the_state() {
    let mut instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (master, addr, _) = master_of(&before);
    let keys = write_n(&instance, &addr, 20, 2).await;

    // Killed hard: its processes die with it, no orphan stays.
    instance.kill9();
    let pids: Vec<u32> = before
        .nodes
        .iter()
        .flat_map(|n| [n.valkey_pid, n.agent_pid])
        .flatten()
        .collect();
    wait_for("every child to be gone", T, || async {
        pids.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;

    instance.start();
    let after = instance.wait_healthy(3, T).await;
    assert_eq!(
        (after.epoch, after.master.as_deref()),
        (before.epoch, Some(master.as_str()))
    );
    assert!(after.last_failover.is_none());
    let (_, addr, _) = master_of(&after);
    assert_eq!(missing_on(&instance, &addr, &keys).await, Vec::<u64>::new());

    // Ctrl-C stops everything cleanly.
    instance.stop().await;
    let pids: Vec<u32> = after
        .nodes
        .iter()
        .flat_map(|n| [n.valkey_pid, n.agent_pid])
        .flatten()
        .collect();
    assert!(pids.iter().all(|p| !alive(*p)), "orphans left: {pids:?}");
}

#[tokio::test]
async fn scaling_3_to_5_to_2_moves_the_master_first() {
    let mut instance = LocalInstance::up(&manifest(3));
    let status = instance.wait_healthy(3, T).await;
    let (_, addr, _) = master_of(&status);
    let keys = write_n(&instance, &addr, 30, 2).await;

    instance.stop().await;
    instance.set_manifest(&manifest(5));
    instance.start();
    let five = instance.wait_healthy(5, T).await;
    assert_eq!(five.epoch, status.epoch);
    switchover_when_ready(&instance, "demo-4").await;
    instance
        .wait_status("demo-4 as master", T, |s| {
            s.master.as_deref() == Some("demo-4") && s.switchover.is_none()
        })
        .await;

    instance.stop().await;
    instance.set_manifest(&manifest(2));
    instance.start();
    let two = instance
        .wait_status("two nodes, master among them", T, |s| {
            s.nodes.len() == 2
                && s.master
                    .as_deref()
                    .is_some_and(|m| m == "demo-0" || m == "demo-1")
        })
        .await;
    assert!(two.nodes.iter().all(|n| !n.retiring));
    let two = instance.wait_healthy(2, T).await;
    assert_every_node_holds(&instance, &two, &keys, "after scaling to 2").await;
}

#[tokio::test]
async fn a_single_node_instance_comes_back_with_its_data_after_a_crash() {
    let instance = LocalInstance::up(&manifest(1));
    let before = instance.wait_healthy(1, T).await;
    let (master, addr, pid) = master_of(&before);
    let keys = write_n(&instance, &addr, 10, 0).await;
    // One node has no replica to hold its writes: they survive a crash once they are on disk.
    // Under `appendfsync everysec` that is within a second or two of the acknowledgement (on a
    // busy disk Valkey holds the AOF write back while the last fsync runs), so the client asks
    // for it, as an application that needs it would: WAITAOF 1 0.
    let mut conn = instance.conn(&addr).await;
    let synced: (i64, i64) = redis::cmd("WAITAOF")
        .arg(1)
        .arg(0)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAITAOF");
    assert_eq!(synced, (1, 0), "the writes reached the AOF on disk");
    signal(pid, Signal::SIGKILL);
    // No candidate: nothing to fail over to. The node is restarted, comes back a replica of
    // nobody with its data, and is promoted back in the same epoch.
    let after = instance
        .wait_status("the node back as master", T, |s| {
            let n = &s.nodes[0];
            n.valkey_pid.is_some_and(|p| p != pid) && n.process == "up" && n.role == "master"
        })
        .await;
    assert_eq!(
        (after.epoch, after.master.as_deref()),
        (before.epoch, Some(master.as_str()))
    );
    assert_eq!(missing_on(&instance, &addr, &keys).await, Vec::<u64>::new());
}

#[tokio::test]
async fn a_password_rotation_keeps_replication_and_restarted_nodes_working() {
    let instance = LocalInstance::up(&manifest(3));
    let before = instance.wait_healthy(3, T).await;
    let (_, addr, _) = master_of(&before);
    let keys = write_n(&instance, &addr, 20, 2).await;
    let old = instance.password();

    instance.rotate_password().await;
    let new = instance.password();
    let refused = redis::Client::open(format!("redis://:{old}@{addr}/"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await;
    assert!(
        refused.is_err(),
        "the old password still works after the rotation"
    );
    let pong: String = redis::cmd("PING")
        .query_async(&mut instance.conn(&addr).await)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    assert_ne!(new, old);

    // A replica restarted after the rotation authenticates to the master with the new password.
    let status = instance.wait_healthy(3, T).await;
    let replica = status
        .nodes
        .iter()
        .find(|n| n.role == "replica")
        .expect("a replica")
        .clone();
    signal(replica.valkey_pid.expect("pid"), Signal::SIGKILL);
    let healed = instance
        .wait_replica_back(&replica, "the replica back and in sync")
        .await;
    assert_eq!(healed.master, before.master);
    let healthy = instance.wait_healthy(3, T).await;
    assert_every_node_holds(&instance, &healthy, &keys, "after the rotation").await;
}

#[tokio::test]
async fn a_replica_refusing_the_instance_password_is_restarted_with_it() {
    let instance = LocalInstance::up(&manifest(3));
    let status = instance.wait_healthy(3, T).await;
    let replica = status
        .nodes
        .iter()
        .find(|n| n.role == "replica")
        .expect("a replica")
        .clone();
    // Someone changes the password of this one node by hand, and its clients (the agent among
    // them) must log in again.
    let mut conn = instance.conn(&replica.addr).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("resetpass")
        .arg(">not-the-instance-password")
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    let _: redis::RedisResult<()> = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut conn)
        .await;

    instance
        .wait_status("the node to be reported refusing the password", T, |s| {
            node(s, &replica.pod).process == "auth-failed"
        })
        .await;
    let healed = instance
        .wait_replica_back(&replica, "the node restarted on the instance password")
        .await;
    assert_eq!(healed.master, status.master, "no failover for a replica");
    let pong: String = redis::cmd("PING")
        .query_async(&mut instance.conn(&replica.addr).await)
        .await
        .expect("PING with the instance password");
    assert_eq!(pong, "PONG");
}
