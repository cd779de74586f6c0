//! `local up` refuses bad input before starting anything, with an error that names the field,
//! flag or file to fix, and leaves the working dir as it was.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, process::Command};

fn controller() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_valkey-controller"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

const GOOD: &str = "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\nspec:\n  replicas: 3\n";

fn up(dir: &Path, manifest: &str, path: Option<&str>) -> (i32, String) {
    let file = dir.join("failover.yaml");
    std::fs::write(&file, manifest).unwrap();
    let mut cmd = controller();
    cmd.args(["local", "up", "-f"])
        .arg(&file)
        .arg("--dir")
        .arg(dir.join("instance"));
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("run valkey-controller");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_malformed_manifest_names_the_field_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (GOOD.replace("replicas: 3", "replicas: 12"), "spec.replicas"),
        (
            GOOD.replace("replicas: 3", "replicas: [3]"),
            "spec.replicas",
        ),
        (
            format!("{GOOD}  customConfigs:\n    requirepass: x\n"),
            "spec.customConfigs.requirepass",
        ),
        (GOOD.replace("kind: Failover", "kind: Redis"), "kind"),
        ("not: [valid".to_owned(), "failover.yaml"),
    ];
    for (manifest, field) in cases {
        let (code, stderr) = up(dir.path(), &manifest, None);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(field), "{field} not named: {stderr}");
        assert!(
            !dir.path().join("instance").exists(),
            "nothing is created for a bad manifest"
        );
    }
    let out = controller()
        .args(["local", "up", "-f", "/nonexistent/failover.yaml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("-f /nonexistent/failover.yaml"));
}

#[test]
fn a_missing_valkey_server_is_named_with_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = up(dir.path(), GOOD, Some("/nonexistent"));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("valkey-server not found") && stderr.contains("apt-get install"),
        "{stderr}"
    );
}

#[test]
fn a_working_dir_of_another_instance_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let instance = dir.path().join("instance");
    std::fs::create_dir_all(&instance).unwrap();
    let other = r#"{"namespace":"prod","name":"cache","durable":{"epoch":7,"master":"cache-1"},"ports":{}}"#;
    std::fs::write(instance.join("state.json"), other).unwrap();
    let (code, stderr) = up(dir.path(), GOOD, None);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--dir") && stderr.contains("prod/cache"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(instance.join("state.json")).unwrap(),
        other,
        "state untouched"
    );
}

#[test]
fn a_port_in_use_is_named_with_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let instance = dir.path().join("instance");
    std::fs::create_dir_all(&instance).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let state = format!(
        r#"{{"namespace":"default","name":"demo","durable":{{"epoch":0,"master":null}},"ports":{{"demo-0":{{"valkey":{port},"agent":1,"metrics":2}}}}}}"#
    );
    std::fs::write(instance.join("state.json"), &state).unwrap();
    let (code, stderr) = up(dir.path(), GOOD, None);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("port {port}")) && stderr.contains("demo-0"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(instance.join("state.json")).unwrap(),
        state
    );
    assert!(!instance.join("nodes").exists(), "no node was started");
}

#[test]
fn a_missing_password_secret_is_named_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!("{GOOD}  sentinel:\n    access:\n      defaultPasswordSecret: nope\n");
    let (code, stderr) = up(dir.path(), &manifest, None);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("spec.sentinel.access.defaultPasswordSecret")
            && stderr.contains("\"nope\""),
        "{stderr}"
    );
    assert!(
        !dir.path().join("instance").join("nodes").exists(),
        "no node was started"
    );
    let external = format!(
        "{GOOD}  sentinel:\n    sentinelReference:\n      nodes:\n        - {{ip: 127.0.0.1, port: 1}}\n        - {{ip: 127.0.0.1, port: 2}}\n        - {{ip: 127.0.0.1, port: 3}}\n      auth:\n        passwordSecret: gone\n"
    );
    let (code, stderr) = up(dir.path(), &external, None);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("spec.sentinel.sentinelReference.auth.passwordSecret"),
        "{stderr}"
    );
}
