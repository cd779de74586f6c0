//! The install, the CRD's validation and what the controller generates, as the real API server
//! (etcd and kube-apiserver built from Go modules) takes them: `kubectl apply -k` of both
//! installs, every example, each CEL rule refused with its message, every object rendered for
//! each example applied (server-side dry run: validation and admission, nothing kept), and the
//! pods of every template admitted under Pod Security `restricted`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use k8s_openapi::api::apps::v1::StatefulSet;
use valkey_controller::{
    crd::Failover,
    k8s::{Settings, render},
};
use valkey_e2e::{
    apiserver::{self, ControlPlane},
    cluster::pod_from_template,
    k8s::{everything, example},
};

const EXAMPLES: [&str; 4] = [
    "failover.yaml",
    "failover-manual.yaml",
    "failover-external-sentinel.yaml",
    "failover-tls.yaml",
];

fn yaml_of(objects: &[serde_json::Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).expect("yaml")))
        .collect()
}

#[tokio::test]
async fn both_installs_and_every_example_are_accepted_and_the_crd_is_established() {
    let plane = ControlPlane::get();
    let admin = plane.admin().await;
    // The multi-namespace install's example namespaces.
    for ns in ["apps", "batch"] {
        let _ = plane.kubectl(&["create", "namespace", ns]);
    }
    for dir in ["deploy", "deploy/namespaced", "deploy/multi-namespace"] {
        let path = apiserver::repo().join(dir).display().to_string();
        plane
            .kubectl(&["apply", "-k", &path])
            .unwrap_or_else(|e| panic!("kubectl apply -k {dir} was refused:\n{e}"));
    }
    assert!(apiserver::crd_established(&admin).await);
    let ns = apiserver::test_namespace(&admin, "examples", &[]).await;
    for file in EXAMPLES {
        let mut failover = example(file);
        failover.metadata.uid = None;
        failover.metadata.namespace = Some(ns.clone());
        let yaml = yaml_of(&[serde_json::to_value(&failover).expect("json")]);
        plane
            .kubectl_with_input(&["apply", "-f", "-"], Some(&yaml))
            .unwrap_or_else(|e| panic!("deploy/examples/{file} was refused:\n{e}"));
        let name = failover.metadata.name.clone().expect("name");
        let stored: Failover = kube::Api::namespaced(admin.clone(), &ns)
            .get(&name)
            .await
            .expect("the example as stored");
        // Nothing the example says was pruned as unknown by the structural schema.
        assert_eq!(
            serde_json::to_value(&stored.spec).expect("json"),
            serde_json::to_value(&failover.spec).expect("json"),
            "{file}: the API server kept a different spec"
        );
    }
}

/// `kubectl create` of Failover `name` with three nodes and `spec` (flow-style YAML fields).
fn create_failover(
    plane: &ControlPlane,
    ns: &str,
    name: &str,
    spec: &str,
) -> Result<String, String> {
    let yaml = format!(
        "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{replicas: 3, {spec}}}\n"
    );
    plane.kubectl_with_input(&["create", "-f", "-"], Some(&yaml))
}

/// Each `x-kubernetes-validations` rule of the CRD, broken once: the API server refuses the
/// Failover with the rule's message.
#[tokio::test]
async fn the_api_server_refuses_a_spec_that_breaks_each_cel_rule_with_its_message() {
    let plane = ControlPlane::get();
    let admin = plane.admin().await;
    let ns = apiserver::test_namespace(&admin, "cel", &[]).await;
    let crd = std::fs::read_to_string(apiserver::repo().join("deploy/base/crd.yaml")).expect("crd");
    let cases = [
        (
            "sentinel: {monitorConfig: {down-after-milliseconds: '5000', quorum: '2'}}",
            "spec.sentinel.monitorConfig accepts down-after-milliseconds, failover-timeout and parallel-syncs",
        ),
        (
            "sentinel: {replicas: 4}",
            "spec.sentinel.replicas must be odd and at least 3",
        ),
        (
            "sentinel: {replicas: 1}",
            "spec.sentinel.replicas must be odd and at least 3",
        ),
        (
            "sentinel: {replicas: 3, quorum: 4}",
            "spec.sentinel.quorum must be at most the number of sentinels",
        ),
        (
            "sentinel: {quorum: 4}",
            "spec.sentinel.quorum must be at most the number of sentinels",
        ),
    ];
    // Every rule of the CRD is broken by a case here.
    let rules = crd.matches("rule:").count();
    let messages: std::collections::BTreeSet<&str> = cases.iter().map(|(_, m)| *m).collect();
    assert_eq!(messages.len(), rules, "a CEL rule of the CRD has no case");
    for (i, (spec, message)) in cases.iter().enumerate() {
        let refusal = create_failover(&plane, &ns, &format!("cel-{i}"), spec)
            .expect_err(&format!("the API server took {spec}"));
        assert!(
            refusal.contains(message),
            "{spec}: refused without the rule's message {message:?}:\n{refusal}"
        );
    }
    // The schema's bounds: at most 9 sentinels, embedded or referenced.
    let nodes: Vec<String> = (0..10)
        .map(|i| format!("{{ip: 10.0.0.{i}, port: 26379}}"))
        .collect();
    for (i, (spec, field)) in [
        (
            "sentinel: {replicas: 11}".to_owned(),
            "spec.sentinel.replicas",
        ),
        (
            format!(
                "sentinel: {{sentinelReference: {{nodes: [{}]}}}}",
                nodes.join(", ")
            ),
            "spec.sentinel.sentinelReference.nodes",
        ),
    ]
    .iter()
    .enumerate()
    {
        let refusal = create_failover(&plane, &ns, &format!("bound-{i}"), spec)
            .expect_err(&format!("the API server took {spec}"));
        assert!(
            refusal.contains(field),
            "{spec}: refused without naming {field}:\n{refusal}"
        );
    }
    // And the same spec within the rules is taken.
    let valid =
        "sentinel: {replicas: 5, quorum: 3, monitorConfig: {down-after-milliseconds: '5000'}}";
    create_failover(&plane, &ns, "cel-ok", valid)
        .unwrap_or_else(|e| panic!("a valid spec was refused:\n{e}"));
}

/// Everything the controller would apply for each example and for a spec that uses every
/// option passes the API server's validation and admission (a server-side dry run), and a pod
/// of each StatefulSet's template is admitted in a namespace that enforces Pod Security
/// `restricted`.
#[tokio::test]
async fn every_generated_object_is_accepted_and_every_pod_is_admitted_as_restricted() {
    let plane = ControlPlane::get();
    let admin = plane.admin().await;
    let ns = apiserver::test_namespace(
        &admin,
        "restricted",
        &[
            ("pod-security.kubernetes.io/enforce", "restricted"),
            ("pod-security.kubernetes.io/enforce-version", "latest"),
        ],
    )
    .await;
    let settings = Settings::default();
    // This control plane is single-stack IPv4: a Service that names IPv6 is refused there, as
    // in any IPv4-only cluster ("not configured on this cluster"), so `everything` prefers IPv4.
    let mut all = everything();
    all.spec.access.ip_family_prefer = Some(valkey_controller::crd::IpFamily::IPv4);
    let failovers: Vec<Failover> = EXAMPLES.iter().map(|f| example(f)).chain([all]).collect();
    let mut pods = 0;
    for mut failover in failovers {
        failover.metadata.namespace = Some(ns.clone());
        let name = failover.metadata.name.clone().expect("name");
        let mut objects = render(&failover, &settings).expect("valid");
        // cert-manager's Certificate needs cert-manager's CRD, which this server does not have.
        objects.retain(|o| o["kind"] != "Certificate");
        let yaml = yaml_of(&objects);
        plane
            .kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], Some(&yaml))
            .unwrap_or_else(|e| panic!("{name}: the API server refused a generated object:\n{e}"));
        for set in objects.iter().filter(|o| o["kind"] == "StatefulSet") {
            let mut set: StatefulSet = serde_json::from_value(set.clone()).expect("StatefulSet");
            set.metadata.uid = Some("0b5e8c1e-0000-4000-8000-000000000003".into());
            let pod_name = format!("{}-0", set.metadata.name.as_deref().expect("name"));
            let pod = pod_from_template(&set, &pod_name, "r1", false).expect("a pod");
            let yaml = yaml_of(&[serde_json::to_value(&pod).expect("json")]);
            plane
                .kubectl_with_input(&["create", "--dry-run=server", "-f", "-"], Some(&yaml))
                .unwrap_or_else(|e| {
                    panic!("{name}: pod {pod_name} from its template was not admitted:\n{e}")
                });
            pods += 1;
        }
    }
    // Two StatefulSets (data, sentinels) for each embedded set, one for the others.
    assert!(pods >= 7, "only {pods} pod templates were checked");
    // The check can fail: a template asking for root is refused under `restricted`.
    let mut root = example("failover.yaml");
    root.metadata.namespace = Some(ns.clone());
    let objects = render(&root, &settings).expect("valid");
    let set = objects
        .iter()
        .find(|o| o["kind"] == "StatefulSet")
        .expect("a StatefulSet");
    let mut set: StatefulSet = serde_json::from_value(set.clone()).expect("StatefulSet");
    set.metadata.uid = Some("0b5e8c1e-0000-4000-8000-000000000004".into());
    let mut pod = pod_from_template(&set, "root-0", "r1", false).expect("a pod");
    let spec = pod.spec.as_mut().expect("spec");
    spec.security_context
        .get_or_insert_with(Default::default)
        .run_as_non_root = Some(false);
    let yaml = yaml_of(&[serde_json::to_value(&pod).expect("json")]);
    let refusal = plane
        .kubectl_with_input(&["create", "--dry-run=server", "-f", "-"], Some(&yaml))
        .expect_err("a pod that may run as root was admitted under restricted");
    assert!(refusal.contains("violates PodSecurity"), "{refusal}");
}
