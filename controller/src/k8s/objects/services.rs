//! Pure builders for the Services of an instance: headless (stable pod names), read-write
//! (selects `valkey.buf.red/role=master`), read-only (`role=replica`), one per pod (with the
//! NodePort pool when given), and the exporter's metrics Service.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::k8s::{
    EXPORTER_PORT, LABEL_ROLE, Names, VALKEY_PORT, objects::data::COMPONENT_DATA, owned_meta,
    selector,
};
use crate::{
    crd::{Failover, InstanceAccess, IpFamily, ServiceType},
    validate::{Invalid, node_port_pool},
};

fn service_port(name: &str, port: i32, node_port: Option<i32>) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        node_port,
        ..ServicePort::default()
    }
}

/// A client-facing Service: the access type, annotations and IP family.
pub fn client_service(
    failover: &Failover,
    access: &InstanceAccess,
    name: String,
    component: &str,
    select: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
) -> Service {
    let mut meta = owned_meta(failover, name, component);
    if !access.annotations.is_empty() {
        meta.annotations = Some(access.annotations.clone());
    }
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(
                match access.service_type {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(select),
            ports: Some(ports),
            ip_families: access.ip_family_prefer.map(|f| {
                vec![
                    match f {
                        IpFamily::IPv4 => "IPv4",
                        IpFamily::IPv6 => "IPv6",
                    }
                    .into(),
                ]
            }),
            ip_family_policy: access.ip_family_prefer.map(|_| "SingleStack".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The headless Service that gives each pod its stable DNS name; not-ready pods are
/// published too, so that replicas can find a master that is still syncing them.
pub fn headless(failover: &Failover, name: String, component: &str, port: ServicePort) -> Service {
    let names = Names::of(failover);
    Service {
        metadata: owned_meta(failover, name, component),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(&names, component)),
            ports: Some(vec![port]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Every Service of the data pods. Fails only on a bad NodePort pool.
pub fn data_services(failover: &Failover) -> Result<Vec<Service>, Invalid> {
    let names = Names::of(failover);
    let spec = &failover.spec;
    let access = &spec.access;
    let pool = node_port_pool(spec)?;
    let with_role = |role: &str| {
        let mut s = selector(&names, COMPONENT_DATA);
        s.insert(LABEL_ROLE.into(), role.into());
        s
    };
    let mut services = vec![
        headless(
            failover,
            names.headless(),
            COMPONENT_DATA,
            service_port("valkey", VALKEY_PORT, None),
        ),
        client_service(
            failover,
            access,
            names.data(),
            COMPONENT_DATA,
            with_role("master"),
            vec![service_port("valkey", VALKEY_PORT, None)],
        ),
        client_service(
            failover,
            access,
            names.read_only(),
            COMPONENT_DATA,
            with_role("replica"),
            vec![service_port("valkey", VALKEY_PORT, None)],
        ),
    ];
    for ordinal in 0..spec.replicas {
        let pod = names.pod(ordinal);
        let mut select = selector(&names, COMPONENT_DATA);
        select.insert("statefulset.kubernetes.io/pod-name".into(), pod.clone());
        services.push(client_service(
            failover,
            access,
            pod,
            COMPONENT_DATA,
            select,
            vec![service_port(
                "valkey",
                VALKEY_PORT,
                pool.get(ordinal as usize).copied(),
            )],
        ));
    }
    if spec.exporter.is_some() {
        services.push(Service {
            metadata: owned_meta(failover, names.metrics(), COMPONENT_DATA),
            spec: Some(ServiceSpec {
                selector: Some(selector(&names, COMPONENT_DATA)),
                ports: Some(vec![service_port("metrics", EXPORTER_PORT, None)]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        });
    }
    Ok(services)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::FailoverSpec;

    fn failover(spec: FailoverSpec) -> Failover {
        let mut failover = Failover::new("demo", spec);
        failover.metadata.namespace = Some("prod".into());
        failover
    }

    fn by_name<'a>(services: &'a [Service], name: &str) -> &'a ServiceSpec {
        services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .and_then(|s| s.spec.as_ref())
            .unwrap_or_else(|| panic!("no Service {name}"))
    }

    #[test]
    fn read_write_follows_the_role_label_and_each_pod_gets_a_pool_port() {
        let mut spec = FailoverSpec {
            replicas: 3,
            ..FailoverSpec::default()
        };
        spec.access.service_type = ServiceType::NodePort;
        spec.access.ports = Some("31000-31002".into());
        spec.access.ip_family_prefer = Some(IpFamily::IPv6);
        let services = data_services(&failover(spec)).expect("services");
        let names: Vec<_> = services
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        assert_eq!(
            names,
            [
                "demo-headless",
                "demo",
                "demo-read",
                "demo-0",
                "demo-1",
                "demo-2"
            ]
        );
        let rw = by_name(&services, "demo");
        assert_eq!(
            rw.selector.as_ref().map(|s| s[LABEL_ROLE].as_str()),
            Some("master")
        );
        assert_eq!(rw.type_.as_deref(), Some("NodePort"));
        assert_eq!(rw.ip_families, Some(vec!["IPv6".to_owned()]));
        let ro = by_name(&services, "demo-read");
        assert_eq!(
            ro.selector.as_ref().map(|s| s[LABEL_ROLE].as_str()),
            Some("replica")
        );
        let node_ports: Vec<Option<i32>> = ["demo-0", "demo-1", "demo-2"]
            .iter()
            .map(|n| {
                by_name(&services, n)
                    .ports
                    .as_ref()
                    .and_then(|p| p[0].node_port)
            })
            .collect();
        assert_eq!(node_ports, [Some(31000), Some(31001), Some(31002)]);
        let headless = by_name(&services, "demo-headless");
        assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
        assert_eq!(headless.publish_not_ready_addresses, Some(true));
    }

    #[test]
    fn a_pool_of_the_wrong_size_is_named() {
        let mut spec = FailoverSpec {
            replicas: 3,
            ..FailoverSpec::default()
        };
        spec.access.service_type = ServiceType::NodePort;
        spec.access.ports = Some("31000,31001".into());
        let err = data_services(&failover(spec)).expect_err("two ports for three pods");
        assert_eq!(err.field, "spec.access.ports");
    }
}
