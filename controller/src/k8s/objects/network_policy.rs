//! One NetworkPolicy per instance, over all its pods (data and sentinel): Valkey and Sentinel
//! ports from the clients the user allows, metrics ports from the scrapers the user allows, the
//! agent's gRPC port (health checks) from the controller only. Kubelet probes come from the
//! node, which NetworkPolicy always admits.
//!
//! Which clients: by default every pod of the cluster. The annotation
//! `valkey.buf.red/client-namespaces: "apps,batch"` narrows that to pods of those namespaces
//! (and the instance's own). An instance exposed outside the cluster (a NodePort or
//! LoadBalancer Service, for Valkey or Sentinel) or watched by an external Sentinel set is open
//! to every source on those ports: its clients are not pods.
//!
//! Which scrapers: by default only pods of the instance's own namespace, since metrics show
//! the topology (roles, addresses, offsets). The annotation
//! `valkey.buf.red/metrics-namespaces: "monitoring"` adds the namespaces a Prometheus runs in.

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
        util::intstr::IntOrString,
    },
};
use kube::ResourceExt;

use crate::k8s::{
    AGENT_METRICS_PORT, AGENT_PORT, EXPORTER_PORT, LABEL_INSTANCE, Names, SENTINEL_PORT, Settings,
    VALKEY_PORT, owned_meta,
};
use crate::{
    crd::{Failover, ServiceType},
    validate::{Invalid, is_dns_label},
};

/// Annotation: the namespaces (comma-separated) whose pods may reach the instance.
pub const ANNOTATION_CLIENT_NAMESPACES: &str = "valkey.buf.red/client-namespaces";

/// Annotation: the namespaces (comma-separated) whose pods may scrape the instance's metrics
/// (the agents' and the exporters'), beside its own.
pub const ANNOTATION_METRICS_NAMESPACES: &str = "valkey.buf.red/metrics-namespaces";

/// Who the annotations let in, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Client namespaces; None: every pod of the cluster.
    pub clients: Option<Vec<String>>,
    /// Scraper namespaces beside the instance's own.
    pub metrics: Vec<String>,
}

/// What the annotations allow, or the first that is invalid, named.
pub fn allowed(failover: &Failover) -> Result<Allowed, Invalid> {
    Ok(Allowed {
        clients: namespaces(failover, ANNOTATION_CLIENT_NAMESPACES)?,
        metrics: namespaces(failover, ANNOTATION_METRICS_NAMESPACES)?.unwrap_or_default(),
    })
}

/// The label every namespace carries with its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The label of the controller's pods (`deploy/base/controller.yaml`).
const CONTROLLER_LABEL: (&str, &str) = ("app.kubernetes.io/name", "valkey-controller");

/// The namespaces the annotation `key` names, checked: None when it is absent.
fn namespaces(failover: &Failover, key: &str) -> Result<Option<Vec<String>>, Invalid> {
    let Some(value) = failover.annotations().get(key) else {
        return Ok(None);
    };
    let field = format!("metadata.annotations[{key}]");
    let namespaces: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if namespaces.is_empty() {
        return Err(Invalid {
            field,
            message: "names no namespace; remove it for the default".into(),
        });
    }
    if let Some(bad) = namespaces.iter().find(|n| !is_dns_label(n)) {
        return Err(Invalid {
            field,
            message: format!("{bad:?} is not a namespace name (a DNS label)"),
        });
    }
    Ok(Some(namespaces))
}

/// Whether clients outside the cluster reach the instance directly.
fn exposed(failover: &Failover) -> bool {
    let sentinel = failover.spec.sentinel.as_ref();
    failover.spec.access.service_type != ServiceType::ClusterIP
        || sentinel.is_some_and(|s| s.sentinel_reference.is_some())
        || sentinel
            .and_then(|s| s.access.as_ref())
            .is_some_and(|a| a.access.service_type != ServiceType::ClusterIP)
}

fn ports(numbers: &[i32]) -> Option<Vec<NetworkPolicyPort>> {
    Some(
        numbers
            .iter()
            .map(|p| NetworkPolicyPort {
                port: Some(IntOrString::Int(*p)),
                protocol: Some("TCP".into()),
                ..NetworkPolicyPort::default()
            })
            .collect(),
    )
}

fn namespaces_peer(names: Vec<String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: NAMESPACE_NAME_LABEL.into(),
                operator: "In".into(),
                values: Some(names),
            }]),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// Every pod of the cluster.
fn cluster_peer() -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        ..NetworkPolicyPeer::default()
    }
}

/// The instance's NetworkPolicy, admitting what [`allowed`] returned.
pub fn network_policy(failover: &Failover, settings: &Settings, allowed: Allowed) -> NetworkPolicy {
    let names = Names::of(failover);
    let with_own = |mut namespaces: Vec<String>| {
        namespaces.push(names.namespace.clone());
        namespaces.sort();
        namespaces.dedup();
        vec![namespaces_peer(namespaces)]
    };
    let peers = allowed
        .clients
        .map_or_else(|| vec![cluster_peer()], with_own);
    let scrapers = with_own(allowed.metrics);
    let service_ports: &[i32] = if failover.spec.sentinel.is_some() {
        &[VALKEY_PORT, SENTINEL_PORT]
    } else {
        &[VALKEY_PORT]
    };
    let controller = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(
                [(
                    NAMESPACE_NAME_LABEL.to_owned(),
                    settings.controller_namespace.clone(),
                )]
                .into(),
            ),
            ..LabelSelector::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some([(CONTROLLER_LABEL.0.into(), CONTROLLER_LABEL.1.into())].into()),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let mut metadata = owned_meta(failover, names.instance.clone(), "instance");
    // Not a component of its own: keep only the instance labels.
    if let Some(labels) = metadata.labels.as_mut() {
        labels.remove(crate::k8s::LABEL_COMPONENT);
    }
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some([(LABEL_INSTANCE.to_owned(), names.instance.clone())].into()),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: ports(service_ports),
                    // No peers: every source.
                    from: (!exposed(failover)).then(|| peers.clone()),
                },
                NetworkPolicyIngressRule {
                    ports: ports(&[AGENT_METRICS_PORT, EXPORTER_PORT]),
                    from: Some(scrapers),
                },
                NetworkPolicyIngressRule {
                    ports: ports(&[AGENT_PORT]),
                    from: Some(vec![controller]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failover(yaml: &str) -> Failover {
        let mut f: Failover = serde_yaml::from_str(yaml).unwrap();
        f.metadata.namespace = Some("prod".into());
        f
    }

    const BASE: &str = "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\nspec:\n  replicas: 3\n";

    fn rule_peers(policy: &NetworkPolicy, port: i32) -> Option<Vec<NetworkPolicyPeer>> {
        let rules = policy.spec.as_ref().unwrap().ingress.as_ref().unwrap();
        rules
            .iter()
            .find(|r| {
                r.ports
                    .iter()
                    .flatten()
                    .any(|p| p.port == Some(IntOrString::Int(port)))
            })
            .unwrap_or_else(|| panic!("no rule for port {port}"))
            .from
            .clone()
    }

    #[test]
    fn clients_are_the_clusters_pods_or_the_annotated_namespaces_and_the_agent_port_the_controllers()
     {
        let settings = Settings::default();
        let f = failover(BASE);
        let policy = network_policy(&f, &settings, allowed(&f).unwrap());
        assert_eq!(rule_peers(&policy, VALKEY_PORT), Some(vec![cluster_peer()]));
        // Metrics: the instance's own namespace only, by default.
        for port in [AGENT_METRICS_PORT, EXPORTER_PORT] {
            assert_eq!(
                rule_peers(&policy, port),
                Some(vec![namespaces_peer(vec!["prod".into()])])
            );
        }
        let agent = rule_peers(&policy, AGENT_PORT).unwrap();
        let ns = agent[0].namespace_selector.as_ref().unwrap();
        assert_eq!(
            ns.match_labels.as_ref().unwrap()[NAMESPACE_NAME_LABEL],
            "valkey-system"
        );
        assert!(agent[0].pod_selector.is_some());

        let mut annotated = failover(BASE);
        annotated.metadata.annotations = Some(
            [
                (
                    ANNOTATION_CLIENT_NAMESPACES.to_owned(),
                    "apps, batch".to_owned(),
                ),
                (
                    ANNOTATION_METRICS_NAMESPACES.to_owned(),
                    "monitoring".to_owned(),
                ),
            ]
            .into(),
        );
        let policy = network_policy(&annotated, &settings, allowed(&annotated).unwrap());
        assert_eq!(
            rule_peers(&policy, EXPORTER_PORT),
            Some(vec![namespaces_peer(vec![
                "monitoring".into(),
                "prod".into()
            ])])
        );
        assert_eq!(
            rule_peers(&policy, VALKEY_PORT),
            Some(vec![namespaces_peer(vec![
                "apps".into(),
                "batch".into(),
                "prod".into()
            ])])
        );

        // Exposed outside the cluster: every source on the service ports, not on the agent's.
        let exposed = failover(&format!("{BASE}  access:\n    serviceType: NodePort\n"));
        let policy = network_policy(&exposed, &settings, Allowed::default());
        assert_eq!(rule_peers(&policy, VALKEY_PORT), None);
        assert!(rule_peers(&policy, AGENT_PORT).is_some());

        // A bad annotation names itself.
        for key in [ANNOTATION_CLIENT_NAMESPACES, ANNOTATION_METRICS_NAMESPACES] {
            let mut bad = failover(BASE);
            bad.metadata.annotations = Some([(key.to_owned(), "Apps!".to_owned())].into());
            let err = allowed(&bad).unwrap_err();
            assert!(err.field.contains(key), "{err}");
        }
    }
}
