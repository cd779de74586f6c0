//! Outside access for an embedded Sentinel set: with `sentinel.access.serviceType: NodePort`,
//! each sentinel gets a Service of its own on its pool port, announces its node's IP and that
//! port to its peers (forwarders on loopback stand in for kube-proxy), the sentinels find each
//! other there, and the status lists the sentinels at those addresses. (The data nodes' outside
//! access is shown in `k8s_sentinel::node_port_addresses_reach_valkey_sentinel_and_the_status`.)
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::HashMap, time::Duration};

use k8s_openapi::api::core::v1::Service;
use valkey_e2e::{
    k8s::{
        NS, embedded_sentinels_with_password, failover, node_ports, start_nodes,
        start_sentinel_pods, with_demo_password,
    },
    wait_for,
};

const T: Duration = Duration::from_secs(60);
const SP: &str = "sentinel-password";

#[tokio::test]
async fn sentinel_node_ports_are_announced_and_the_sentinels_find_each_other_there() {
    let cluster = with_demo_password().await;
    let _nodes = start_nodes(&cluster);
    let pods = start_sentinel_pods(&cluster, SP);
    cluster.create_sentinel_pods(&pods).await;
    let (forwarders, access) = node_ports(
        pods.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port)),
    )
    .await;
    let ports: Vec<u16> = forwarders.iter().map(|p| p.port).collect();
    let spec = embedded_sentinels_with_password(&cluster, SP, access).await;
    cluster.create(&failover("demo", spec)).await;
    cluster.create_pods(NS, "demo", 3).await;

    // Each sentinel has its own Service on its pool port.
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    for (i, port) in ports.iter().enumerate() {
        let service = cluster
            .api::<Service>(NS)
            .get(&format!("demo-sentinel-{i}"))
            .await
            .expect("a Service per sentinel");
        let spec = service.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(spec.ports.unwrap()[0].node_port, Some(i32::from(*port)));
    }

    // Each announces its outside address, and finds the other two there.
    wait_for(
        "every sentinel announcing its NodePort, its peers found there",
        T,
        || async {
            cluster.reconcile(NS, "demo").await.expect("reconcile");
            cluster.hot_pass(NS, "demo").await.expect("pass");
            for (i, sentinel) in pods.sentinels.iter().enumerate() {
                let mut conn = sentinel
                    .client_with(SP)
                    .get_multiplexed_async_connection()
                    .await
                    .ok()?;
                let mut announce = HashMap::new();
                for key in ["announce-ip", "announce-port"] {
                    let got: HashMap<String, String> = redis::cmd("SENTINEL")
                        .arg("CONFIG")
                        .arg("GET")
                        .arg(key)
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    announce.extend(got);
                }
                if announce.get("announce-ip").map(String::as_str) != Some("127.0.0.1")
                    || announce.get("announce-port") != Some(&ports[i].to_string())
                {
                    return None;
                }
                let peers: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
                    .arg("SENTINELS")
                    .arg("default.demo")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let mut seen: Vec<u16> = peers
                    .iter()
                    .filter(|p| p.get("ip").map(String::as_str) == Some("127.0.0.1"))
                    .filter_map(|p| p.get("port")?.parse().ok())
                    .collect();
                seen.sort_unstable();
                let mut others: Vec<u16> =
                    ports.iter().copied().filter(|p| *p != ports[i]).collect();
                others.sort_unstable();
                if seen != others {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let status = cluster.failover(NS, "demo").await.status.expect("status");
    let listed: Vec<(String, i32)> = status
        .monitor
        .nodes
        .iter()
        .map(|n| (n.ip.clone(), n.port))
        .collect();
    let want: Vec<(String, i32)> = ports
        .iter()
        .map(|p| ("127.0.0.1".to_owned(), i32::from(*p)))
        .collect();
    assert_eq!(listed, want);
}
