//! Policy sentinel in a cluster, with an external Sentinel set (`sentinelReference`): three
//! real valkey-sentinel processes that someone else runs, already watching another
//! application's master. The controller runs their agents in-process; the reconciler (against
//! the in-memory API, real Valkeys and agents) gets the instance monitored through the set,
//! keeps every monitorConfig key in sync live, leaving the other application's monitor
//! alone, and has a killed master failed over through the set.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::HashMap, time::Duration};

use kube::api::{Patch, PatchParams};
use valkey_controller::crd::{
    Failover, FailoverSpec, InstanceAccess, SentinelMonitorNode, SentinelReference,
    SentinelSettings,
};
use valkey_e2e::{
    k8s::{
        FakeCluster, NS, Nodes, failover, node_ports, ordinal, ready, start_nodes, three,
        with_demo_password,
    },
    procs::{Sentinel, Valkey},
    wait_for,
};

const T: Duration = Duration::from_secs(60);
const MONITOR: &str = "default.demo";

/// Every sentinel's view of the masters it watches, by name.
async fn masters(sentinel: &Sentinel) -> Option<HashMap<String, HashMap<String, String>>> {
    let mut conn = sentinel
        .client()
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let masters: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
        .arg("MASTERS")
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(
        masters
            .into_iter()
            .map(|m| (m.get("name").cloned().unwrap_or_default(), m))
            .collect(),
    )
}

/// Reconciles until every sentinel watches `demo` with these settings.
async fn every_sentinel_has(
    cluster: &FakeCluster,
    sentinels: &[Sentinel],
    what: &str,
    want: &[(&str, &str)],
) {
    wait_for(what, T, || async {
        cluster.reconcile(NS, "demo").await.expect("reconcile");
        cluster.hot_pass(NS, "demo").await.expect("pass");
        for sentinel in sentinels {
            let masters = masters(sentinel).await?;
            let demo = masters.get(MONITOR)?;
            if !want
                .iter()
                .all(|(k, v)| demo.get(*k).map(String::as_str) == Some(*v))
            {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// Reconciles until demo is Ready (a quorum of the set knowing its replicas); its master.
async fn ready_master(cluster: &FakeCluster) -> String {
    let up = cluster
        .reconcile_until(NS, "demo", "Ready, monitored through the set", T, |f| {
            ready(f) && f.status.as_ref().is_some_and(|s| s.master.is_some())
        })
        .await;
    up.status.expect("status").master.expect("master")
}

/// Reconciles until another node than `old` is master; checks that it holds the 20
/// acknowledged writes and that every sentinel names it. Returns it.
async fn took_over(
    cluster: &FakeCluster,
    nodes: &Nodes,
    sentinels: &[Sentinel],
    old: &str,
) -> String {
    let after = cluster
        .reconcile_until(NS, "demo", "another master", T, |f| {
            f.status
                .as_ref()
                .and_then(|s| s.master.as_ref())
                .is_some_and(|m| m != old)
        })
        .await;
    let new = after.status.expect("status").master.expect("master");
    assert_eq!(nodes.keys(&new).await, 20, "no acknowledged write lost");
    let port = nodes.valkeys[ordinal(&new)].port.to_string();
    every_sentinel_has(
        cluster,
        sentinels,
        "every sentinel names it",
        &[("port", &port)],
    )
    .await;
    new
}

struct Setup {
    cluster: FakeCluster,
    nodes: Nodes,
    sentinels: Vec<Sentinel>,
    _other: Valkey,
}

/// Another application's master, watched by the three sentinels of the set as `other`; then
/// Failover `demo` (three nodes) referencing the set.
async fn external_set() -> Setup {
    let cluster = with_demo_password().await;
    let nodes = start_nodes(&cluster);
    external_set_on(cluster, nodes, InstanceAccess::default()).await
}

/// The same, with `demo`'s nodes already running and reached through `access`.
async fn external_set_on(cluster: FakeCluster, nodes: Nodes, access: InstanceAccess) -> Setup {
    let other = Valkey::start("other");
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::monitoring("other", other.port, 2, 5000))
        .collect();
    let spec = FailoverSpec {
        access,
        sentinel: Some(SentinelSettings {
            quorum: Some(2),
            monitor_config: [("down-after-milliseconds".to_owned(), "2000".to_owned())].into(),
            sentinel_reference: Some(SentinelReference {
                nodes: sentinels
                    .iter()
                    .map(|s| SentinelMonitorNode {
                        ip: "127.0.0.1".into(),
                        port: i32::from(s.port),
                        flags: None,
                    })
                    .collect(),
                auth: None,
            }),
            ..SentinelSettings::default()
        }),
        ..three()
    };
    cluster.create(&failover("demo", spec)).await;
    cluster.create_pods(NS, "demo", 3).await;
    Setup {
        cluster,
        nodes,
        sentinels,
        _other: other,
    }
}

#[tokio::test]
async fn an_external_sentinel_set_monitors_an_instance_it_shares() {
    let Setup {
        cluster,
        nodes,
        sentinels,
        _other,
    } = external_set().await;
    let master = ready_master(&cluster).await;
    let port = nodes.valkeys[ordinal(&master)].port.to_string();
    every_sentinel_has(
        &cluster,
        &sentinels,
        "every sentinel watching demo's master",
        &[("ip", "127.0.0.1"), ("port", &port), ("quorum", "2")],
    )
    .await;

    // The set is shared: the other application's monitor is untouched.
    for sentinel in &sentinels {
        let masters = masters(sentinel).await.expect("masters");
        let other = masters.get("other").expect("the other monitor is kept");
        assert_eq!(other["port"], _other.port.to_string());
        assert_eq!(other["down-after-milliseconds"], "5000");
    }
}

#[tokio::test]
async fn every_monitor_config_key_and_the_quorum_change_live() {
    let Setup {
        cluster,
        nodes: _nodes,
        sentinels,
        _other,
    } = external_set().await;
    cluster
        .reconcile_until(NS, "demo", "monitored", T, |f| {
            f.status.as_ref().is_some_and(|s| s.master.is_some())
        })
        .await;
    every_sentinel_has(
        &cluster,
        &sentinels,
        "the first settings",
        &[("quorum", "2"), ("down-after-milliseconds", "2000")],
    )
    .await;
    cluster
        .api::<Failover>(NS)
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"sentinel": {
                "quorum": 3,
                "monitorConfig": {
                    "down-after-milliseconds": "3000",
                    "failover-timeout": "45000",
                    "parallel-syncs": "2",
                },
            }}})),
        )
        .await
        .expect("change the settings");
    let want = [
        ("quorum", "3"),
        ("down-after-milliseconds", "3000"),
        ("failover-timeout", "45000"),
        ("parallel-syncs", "2"),
    ];
    every_sentinel_has(&cluster, &sentinels, "every key on every sentinel", &want).await;
    // Nothing failed over: the same epoch.
    let status = cluster.failover(NS, "demo").await.status.expect("status");
    assert_eq!(status.epoch, 1, "{status:#?}");
}

/// Ready under policy sentinel means a quorum of the set knows every replica, so that a master
/// killed from then on is failed over (and not refused with NOGOODSLAVE).
#[tokio::test]
async fn a_shared_external_set_fails_an_instance_over_after_kill_9() {
    let Setup {
        cluster,
        mut nodes,
        sentinels,
        _other,
    } = external_set().await;
    let old = ready_master(&cluster).await;
    let port = nodes.valkeys[ordinal(&old)].port.to_string();
    every_sentinel_has(&cluster, &sentinels, "monitored", &[("port", &port)]).await;
    nodes.acked_writes(&old, 20).await;
    nodes.valkeys[ordinal(&old)].kill9();
    let new = took_over(&cluster, &nodes, &sentinels, &old).await;

    // Healing: the old master comes back with its data and follows the new one.
    nodes.valkeys[ordinal(&old)].restart();
    cluster
        .reconcile_until(
            NS,
            "demo",
            "Ready again, the old master a replica",
            T,
            |f| {
                valkey_e2e::k8s::ready(f)
                    && f.status.as_ref().and_then(|s| s.master.as_ref()) == Some(&new)
            },
        )
        .await;
    assert_eq!(nodes.keys(&old).await, 20);
}

/// With `serviceType: NodePort`, each node is reached at its node's IP and its pool port (here
/// 127.0.0.1 and a forwarder standing in for kube-proxy): it announces that address, replicas
/// follow the master there, Sentinel names it to clients, and the status shows it.
#[tokio::test]
async fn node_port_addresses_reach_valkey_sentinel_and_the_status() {
    let cluster = with_demo_password().await;
    let nodes = start_nodes(&cluster);
    let (forwarders, access) = node_ports(nodes.valkeys.iter().map(|v| v.addr())).await;
    let ports: Vec<u16> = forwarders.iter().map(|p| p.port).collect();
    let Setup {
        cluster,
        nodes,
        sentinels,
        _other,
    } = external_set_on(cluster, nodes, access).await;
    let master = ready_master(&cluster).await;
    let master_port = ports[ordinal(&master)];

    // Sentinel answers clients with the outside address.
    for sentinel in &sentinels {
        let mut conn = sentinel
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MONITOR)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(addr, ["127.0.0.1".to_owned(), master_port.to_string()]);
    }
    let status = cluster.failover(NS, "demo").await.status.expect("status");
    for (i, valkey) in nodes.valkeys.iter().enumerate() {
        let mut conn = valkey.conn().await;
        let announced: HashMap<String, String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("replica-announce-*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            announced["replica-announce-ip"], "127.0.0.1",
            "{}",
            valkey.name
        );
        assert_eq!(announced["replica-announce-port"], ports[i].to_string());
        let node = &status.nodes[i];
        assert_eq!(
            (node.ip.as_str(), node.port),
            ("127.0.0.1", i32::from(ports[i]))
        );
        if i != ordinal(&master) {
            let info = valkey.info("replication").await;
            assert_eq!(
                info["master_port"],
                master_port.to_string(),
                "{}",
                valkey.name
            );
            assert_eq!(info["master_link_status"], "up");
        }
    }
}

/// A planned switchover (the annotation) through the shared set: another node takes over with
/// every acknowledged write, and every sentinel names it.
#[tokio::test]
async fn a_switchover_through_a_shared_external_set_keeps_every_write() {
    let Setup {
        cluster,
        nodes,
        sentinels,
        _other,
    } = external_set().await;
    let old = ready_master(&cluster).await;
    nodes.acked_writes(&old, 20).await;
    cluster
        .api::<Failover>(NS)
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {
                valkey_controller::k8s::ANNOTATION_SWITCHOVER: "any",
            }}})),
        )
        .await
        .expect("annotate");
    took_over(&cluster, &nodes, &sentinels, &old).await;
}
