//! The master's write lease through the local runtime, with real processes: a controller
//! outage alone leaves writes flowing (the replicas' acknowledgements keep the lease), while a
//! master that also loses its replicas pauses writes within the lease, long before
//! `min-replicas-max-lag` would refuse them, and writes again once the controller grants it.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeSet, time::Duration};

use nix::sys::signal::Signal;
use redis::AsyncCommands;
use valkey_controller::decide::lease::LEASE_MS;
use valkey_e2e::{
    local::{LocalInstance, assert_every_node_holds, manifest, master_of, signal},
    wait_for,
};

const T: Duration = Duration::from_secs(30);
/// How long one write may take before it counts as blocked (a fence pauses, it does not
/// refuse).
const BLOCKED: Duration = Duration::from_secs(1);

/// Writes key `w<n>`, giving up (Err(Elapsed)) when it is not answered in [`BLOCKED`].
async fn write(
    conn: &mut redis::aio::MultiplexedConnection,
    n: u64,
) -> Result<redis::RedisResult<()>, tokio::time::error::Elapsed> {
    tokio::time::timeout(BLOCKED, conn.set::<_, _, ()>(format!("w{n}"), n)).await
}

#[tokio::test]
async fn a_controller_outage_alone_does_not_stop_writes_and_a_master_cut_off_from_all_fences() {
    let mut instance = LocalInstance::up(&manifest(3));
    let status = instance.wait_healthy(3, T).await;
    let (master, addr, _) = master_of(&status);
    let mut acked = BTreeSet::new();
    let mut next = 0u64;
    let mut conn = instance.conn(&addr).await;

    // The controller stops (as if its node froze): no grant reaches the master for three
    // leases, and every write is still taken at once.
    let controller = instance.proc_mut().expect("controller");
    controller.signal(Signal::SIGSTOP);
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_millis(3 * LEASE_MS) {
        next += 1;
        match write(&mut conn, next).await {
            Ok(Ok(())) => {
                acked.insert(next);
            }
            other => panic!(
                "write {next} during a controller outage, {:?} in: {other:?}",
                outage.elapsed()
            ),
        }
    }

    // Now the replicas stop too: the master has no evidence left that it still holds the role.
    // Its agent pauses writes: the next write blocks instead of being refused (NOREPLICAS,
    // which min-replicas-max-lag would give only after 5 s) or taken.
    let replicas: Vec<u32> = status
        .nodes
        .iter()
        .filter(|n| n.pod != master)
        .filter_map(|n| n.valkey_pid)
        .collect();
    for pid in &replicas {
        signal(*pid, Signal::SIGSTOP);
    }
    loop {
        next += 1;
        match write(&mut conn, next).await {
            Ok(Ok(())) => {
                acked.insert(next);
            }
            Ok(Err(err)) => panic!("write {next} refused instead of paused: {err}"),
            Err(_) => break,
        }
    }

    // The replicas come back: that alone does not lift the fence (one of them could have been
    // told to follow another master meanwhile). The controller's grant does.
    for pid in &replicas {
        signal(*pid, Signal::SIGCONT);
    }
    let controller = instance.proc_mut().expect("controller");
    controller.signal(Signal::SIGCONT);
    instance.wait_healthy(3, T).await;
    // The grant that lifts the fence follows the master's next report: wait for it (a
    // status can be healthy a moment before).
    let status = instance
        .wait_status("the fence lifted", T, |s| s.nodes.iter().all(|n| !n.fenced))
        .await;
    assert_eq!(
        master_of(&status).0,
        master,
        "no failover: the master never went away"
    );
    let mut conn = instance.conn(&addr).await;
    wait_for("a write to be taken again", T, || {
        next += 1;
        let key = next;
        let mut conn = conn.clone();
        async move { matches!(write(&mut conn, key).await, Ok(Ok(()))).then_some(()) }
    })
    .await;
    acked.insert(next);
    let _: i64 = redis::cmd("WAIT")
        .arg(2)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_every_node_holds(&instance, &status, &acked, "after the outage").await;
}

/// Under policy sentinel the controller vouches for the master only while it hears a quorum
/// of sentinels naming it: with every sentinel and both replicas stopped, the master has no
/// evidence left, fences itself, and says so through its agent, which the controller still
/// hears; once the sentinels answer again, the grant lifts the fence.
#[tokio::test]
async fn under_sentinel_a_master_nobody_vouches_for_fences_and_says_so() {
    let manifest = include_str!("../../deploy/examples/failover.yaml");
    let instance = LocalInstance::up(manifest);
    let status = instance
        .wait_status(
            "every sentinel naming the master and knowing both replicas",
            T,
            |s| {
                s.master.is_some()
                    && s.monitor.nodes.len() == 3
                    && s.monitor
                        .nodes
                        .iter()
                        .all(|m| m.connected && m.replicas == Some(2) && m.master == s.master_addr)
            },
        )
        .await;
    let (master, addr, _) = master_of(&status);
    let mut stopped: Vec<u32> = status
        .nodes
        .iter()
        .filter(|n| n.pod != master)
        .filter_map(|n| n.valkey_pid)
        .collect();
    stopped.extend(status.monitor.nodes.iter().filter_map(|m| m.sentinel_pid));
    for pid in &stopped {
        signal(*pid, Signal::SIGSTOP);
    }
    let fenced = instance
        .wait_status("the master to report itself fenced", T, |s| {
            s.nodes
                .iter()
                .any(|n| n.pod == master && n.fenced && n.connected)
        })
        .await;
    assert_eq!(fenced.master.as_deref(), Some(master.as_str()));
    let mut conn = instance.conn(&addr).await;
    assert!(
        write(&mut conn, 1).await.is_err(),
        "a fenced master's writes wait"
    );
    for pid in &stopped {
        signal(*pid, Signal::SIGCONT);
    }
    instance
        .wait_status("the fence lifted by a grant", T, |s| {
            s.nodes
                .iter()
                .any(|n| n.pod == master && !n.fenced && n.role == "master")
        })
        .await;
    let mut conn = instance.conn(&addr).await;
    assert!(matches!(write(&mut conn, 2).await, Ok(Ok(()))));
}
