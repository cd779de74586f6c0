//! Everything the operator emits, checked against the Kubernetes OpenAPI schema (strict: no
//! unknown fields) with kubernetes-validate from PyPI: the objects built for each example and
//! for a spec that uses every option, and the install `kubectl kustomize deploy/` renders. The
//! Failover examples are checked against our own CRD's schema. A broken object must fail, so
//! the check itself is known to work.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, process::Command};

use serde::Deserialize;

use valkey_controller::{
    k8s::{Settings, objects::data, objects::tls, render},
    tls::{CA_LIFETIME, Ca},
};
use valkey_e2e::k8s::{everything, example};

const KUBERNETES: &str = "1.33.0";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
}

/// Runs kubernetes-validate (strict) on a multi-document YAML file; Err holds its report.
fn kubernetes_validate(file: &Path) -> Result<(), String> {
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", KUBERNETES])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubernetes-validate cannot run ({e}): `pip install kubernetes-validate` \
                 (CI's .ci/run installs it)"
            )
        });
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && !report.contains("ERROR") {
        Ok(())
    } else {
        Err(report)
    }
}

fn write_yaml(dir: &Path, name: &str, objects: &[serde_json::Value]) -> std::path::PathBuf {
    let text: String = objects
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).expect("yaml")))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn every_generated_object_validates_against_the_kubernetes_schema() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = Settings::default();
    for failover in [
        example("failover.yaml"),
        example("failover-manual.yaml"),
        example("failover-external-sentinel.yaml"),
        example("failover-tls.yaml"),
        everything(),
    ] {
        let name = failover.metadata.name.clone().expect("name");
        let mut objects = render(&failover, &settings).expect("valid");
        // The password Secrets the controller generates: the instance's, and the embedded
        // sentinels' when no Secret is named.
        let names = valkey_controller::k8s::Names::of(&failover);
        for (secret, component) in [
            (names.password(), "data"),
            (names.sentinel_password(), "sentinel"),
        ] {
            objects.push(
                serde_json::to_value(data::generated_secret(&failover, &secret, component))
                    .expect("json"),
            );
        }
        if failover.spec.access.enable_tls {
            // The Secret the controller issues when no certIssuer is named.
            let ca = Ca::generate("schema test CA", CA_LIFETIME).expect("CA");
            let issued = ca.issue(&["localhost".into()], CA_LIFETIME).expect("issue");
            objects.push(
                serde_json::to_value(tls::issued_secret(&failover, &issued, &ca.0.cert_pem))
                    .expect("json"),
            );
        }
        // cert-manager's Certificate is not a Kubernetes kind: tls_objects' tests check it.
        objects.retain(|o| o["kind"] != "Certificate");
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert!(
            kinds.contains(&"StatefulSet") && kinds.contains(&"Service"),
            "{kinds:?}"
        );
        let file = write_yaml(dir.path(), &format!("{name}.yaml"), &objects);
        if let Err(report) = kubernetes_validate(&file) {
            panic!("{name}: generated objects fail the Kubernetes {KUBERNETES} schema:\n{report}");
        }
    }
}

#[test]
fn a_broken_object_fails_the_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut objects = render(&everything(), &Settings::default()).expect("valid");
    let service = objects
        .iter()
        .position(|o| o["kind"] == "Service")
        .expect("a Service");
    objects[service]["spec"]["ports"][0]["port"] = serde_json::json!("not a number");
    objects[service]["spec"]["unknownField"] = serde_json::json!(true);
    objects.retain(|o| o["kind"] != "Certificate");
    let file = write_yaml(dir.path(), "broken.yaml", &objects);
    let report = kubernetes_validate(&file).expect_err("a broken Service must fail");
    assert!(
        report.contains("unknownField") || report.contains("not a number"),
        "{report}"
    );
}

#[test]
fn the_install_kustomize_renders_validates() {
    let rendered = kustomize("deploy");
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Deployment",
        "Service",
    ] {
        assert!(
            rendered.contains(&format!("kind: {kind}\n")),
            "no {kind} in the install"
        );
    }
    validates("the install", &rendered);
}

/// `kubectl kustomize <dir>` of the repository.
fn kustomize(dir: &str) -> String {
    let output = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join(dir))
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl cannot run ({e}): apt-get install kubernetes-client (CI's .ci/run installs it)")
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}/ failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}

fn validates(what: &str, rendered: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("install.yaml");
    std::fs::write(&file, rendered).expect("write");
    if let Err(report) = kubernetes_validate(&file) {
        panic!("{what} fails the Kubernetes {KUBERNETES} schema:\n{report}");
    }
}

#[test]
fn the_namespaced_install_has_no_cluster_wide_rights_but_token_reviews() {
    let rendered = kustomize("deploy/namespaced");
    validates("the namespaced install", &rendered);
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde_yaml::Value::deserialize(d).expect("yaml"))
        .collect();
    let kind = |d: &serde_yaml::Value| d["kind"].as_str().unwrap_or_default().to_owned();
    let cluster_roles: Vec<&serde_yaml::Value> = documents
        .iter()
        .filter(|d| kind(d) == "ClusterRole")
        .collect();
    assert_eq!(cluster_roles.len(), 1, "one ClusterRole");
    let rules = cluster_roles[0]["rules"].as_sequence().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["resources"][0].as_str(), Some("tokenreviews"));
    assert_eq!(rules[0]["verbs"][0].as_str(), Some("create"));
    // Everything else, Secrets included, through a Role of the controller's namespace.
    let role = documents
        .iter()
        .find(|d| kind(d) == "Role" && d["metadata"]["name"].as_str() == Some("valkey-controller"))
        .expect("the Role");
    assert_eq!(
        role["metadata"]["namespace"].as_str(),
        Some("valkey-system")
    );
    let resources: Vec<&str> = role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .flat_map(|r| r["resources"].as_sequence().into_iter().flatten())
        .filter_map(serde_yaml::Value::as_str)
        .collect();
    for needed in [
        "failovers",
        "statefulsets",
        "secrets",
        "pods",
        "networkpolicies",
    ] {
        assert!(resources.contains(&needed), "the Role lacks {needed}");
    }
    // And the controller is told to watch that namespace only.
    assert!(rendered.contains("VALKEY_CONTROLLER_WATCH_NAMESPACE"));
}

/// The multi-namespace install: the namespaced one, plus the same Role in each namespace it
/// manages, bound to the controller's account in its own namespace, and the list given to the
/// controller.
#[test]
fn the_multi_namespace_install_grants_a_role_in_each_namespace_it_lists() {
    let rendered = kustomize("deploy/multi-namespace");
    validates("the multi-namespace install", &rendered);
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde_yaml::Value::deserialize(d).expect("yaml"))
        .collect();
    let named = |kind: &str| -> Vec<&serde_yaml::Value> {
        documents
            .iter()
            .filter(|d| {
                d["kind"].as_str() == Some(kind)
                    && d["metadata"]["name"].as_str() == Some("valkey-controller")
            })
            .collect()
    };
    let namespaces = |docs: &[&serde_yaml::Value]| -> Vec<String> {
        let mut names: Vec<String> = docs
            .iter()
            .filter_map(|d| d["metadata"]["namespace"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    let expected = ["apps", "batch", "valkey-system"];
    assert_eq!(namespaces(&named("Role")), expected);
    let bindings = named("RoleBinding");
    assert_eq!(namespaces(&bindings), expected);
    for binding in bindings {
        assert_eq!(
            binding["subjects"][0]["namespace"].as_str(),
            Some("valkey-system"),
            "{binding:?}"
        );
    }
    assert_eq!(
        documents
            .iter()
            .filter(|d| d["kind"].as_str() == Some("ClusterRole"))
            .count(),
        1,
        "TokenReviews only"
    );
    assert!(
        rendered.contains("value: valkey-system,apps,batch"),
        "{rendered}"
    );
}

/// The CRD's openAPIV3Schema, made strict (no unknown fields where properties are listed, as
/// the API server's pruning would silently drop them), applied to each example with Python's
/// jsonschema (which kubernetes-validate brings).
#[test]
fn the_examples_validate_against_our_crd_schema() {
    let script = r#"
import json, sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
def strict(node):
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
strict(schema)
schema["properties"]["metadata"] = {"type": "object"}
schema["properties"]["apiVersion"] = {"const": "valkey.buf.red/v1alpha1"}
schema["properties"]["kind"] = {"const": "Failover"}
failed = False
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
        for e in errors:
            failed = True
            print(f"{path}: {'.'.join(map(str, e.path))}: {e.message}")
broken = {"apiVersion": "valkey.buf.red/v1alpha1", "kind": "Failover", "metadata": {},
          "spec": {"replicas": 0, "replicaz": 1}}
if not list(jsonschema.Draft7Validator(schema).iter_errors(broken)):
    print("a broken Failover passed")
    failed = True
sys.exit(1 if failed else 0)
"#;
    let examples = repo().join("deploy/examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(repo().join("deploy/base/crd.yaml"))
        .args(&files)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "examples fail the CRD schema:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `valkey-controller render` renders what the controller applies for the manifest, its
/// annotations included: the NetworkPolicy admits the scrapers' namespace it names.
#[test]
fn render_follows_the_manifests_annotations() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("failover.yaml");
    std::fs::write(
        &file,
        "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\n  \
         annotations:\n    valkey.buf.red/metrics-namespaces: monitoring\nspec:\n  replicas: 3\n",
    )
    .expect("manifest");
    let out = std::process::Command::new(valkey_e2e::local::bin("valkey-controller"))
        .arg("render")
        .arg("-f")
        .arg(&file)
        .output()
        .expect("run render");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let policy = text
        .split("---\n")
        .find(|doc| doc.contains("kind: NetworkPolicy"))
        .expect("a NetworkPolicy");
    assert!(policy.contains("- monitoring"), "{policy}");
}
