//! Outside access. With `access.serviceType` NodePort or LoadBalancer, each data node announces
//! the address clients outside the cluster reach it at, not its pod DNS name: its node's IP
//! and its per-pod Service's NodePort, or that Service's load-balancer address and 6379. The
//! failover core then points replicas, Sentinel (whose `get-master-addr-by-name` answers with
//! it) and the status at that address, and keeps `replica-announce-ip`/`-port` on each node.
//! Here, purely: what a per-pod Service exposes, and each pod's outside address from it. The
//! cold path reads the Services (`cold::outside`), the hot path computes the addresses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;

use crate::crd::{Failover, ServiceType};

/// What a per-pod Service (named as its pod) gives outside clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exposed {
    pub node_port: Option<u16>,
    /// The load balancer's IP or hostname, once it has one.
    pub ingress: Option<String>,
}

/// Whether the instance's data nodes are reached from outside the cluster.
pub fn is_outside(failover: &Failover) -> bool {
    failover.spec.access.service_type != ServiceType::ClusterIP
}

/// How an embedded Sentinel set's sentinels are reached (`sentinel.access.serviceType`).
pub fn sentinel_kind(failover: &Failover) -> ServiceType {
    crate::k8s::objects::sentinel::embedded(failover)
        .and_then(|s| s.access.as_ref())
        .map_or(ServiceType::ClusterIP, |a| a.access.service_type)
}

pub fn exposed(service: &Service) -> Exposed {
    let node_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref()?.first()?.node_port)
        .and_then(|p| u16::try_from(p).ok());
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref()?.first().cloned())
        .and_then(|i| i.ip.or(i.hostname));
    Exposed { node_port, ingress }
}

/// Pure: each pod's outside address, where it is known yet (a NodePort needs the pod's node,
/// a LoadBalancer its address).
pub fn addresses(
    kind: ServiceType,
    pods: &[Pod],
    services: &BTreeMap<String, Exposed>,
    port: i32,
) -> BTreeMap<String, (String, u16)> {
    services
        .iter()
        .filter_map(|(pod, exposed)| {
            let address = match kind {
                ServiceType::ClusterIP => None,
                ServiceType::NodePort => {
                    let node_ip = pods
                        .iter()
                        .find(|p| p.name_any() == *pod)
                        .and_then(|p| p.status.as_ref()?.host_ip.clone())?;
                    Some((node_ip, exposed.node_port?))
                }
                ServiceType::LoadBalancer => Some((exposed.ingress.clone()?, port as u16)),
            };
            address.map(|a| (pod.clone(), a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodStatus;

    use super::*;

    fn pod(name: &str, host_ip: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.status = Some(PodStatus {
            host_ip: host_ip.map(str::to_owned),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn a_node_port_is_announced_on_its_pods_node_and_a_load_balancer_at_its_address() {
        let services = BTreeMap::from([
            (
                "demo-0".to_owned(),
                Exposed {
                    node_port: Some(30001),
                    ingress: Some("203.0.113.7".into()),
                },
            ),
            (
                "demo-1".to_owned(),
                Exposed {
                    node_port: Some(30002),
                    ingress: None,
                },
            ),
        ]);
        let pods = [pod("demo-0", Some("10.0.0.5")), pod("demo-1", None)];
        assert_eq!(
            addresses(ServiceType::NodePort, &pods, &services, 6379),
            BTreeMap::from([("demo-0".to_owned(), ("10.0.0.5".to_owned(), 30001))]),
            "a pod not scheduled yet has no node IP: not announced yet"
        );
        assert_eq!(
            addresses(ServiceType::LoadBalancer, &pods, &services, 6379),
            BTreeMap::from([("demo-0".to_owned(), ("203.0.113.7".to_owned(), 6379))]),
        );
        assert!(addresses(ServiceType::ClusterIP, &pods, &services, 6379).is_empty());
    }
}
