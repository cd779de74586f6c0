//! The metrics exporter the data pods run: the real redis_exporter, built from its Go module at
//! the version the default image pins (tests/exporter/build.sh), with the environment and the
//! password map the controller renders, against a real Valkey. It scrapes its own Valkey, and
//! nothing asked of its HTTP port sends the instance's password anywhere else, with its
//! `/scrape` endpoint off (as rendered) or on (an older image, which ignores that setting).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::AsyncReadExt;
use valkey_controller::{
    crd::{Exporter, Failover},
    k8s::{Settings, objects::data, objects::password},
};
use valkey_e2e::{
    free_port, http_get,
    procs::{PASSWORD, Proc, Valkey},
    wait_for,
};

const T: Duration = Duration::from_secs(20);

/// The exporter binary: named by VALKEY_TEST_EXPORTER_BIN (scripts/test.sh), or built now.
fn exporter_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("VALKEY_TEST_EXPORTER_BIN") {
        return bin.into();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/exporter/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "building redis_exporter: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("redis_exporter")
}

/// A TCP listener standing in for a host an attacker names as a scrape target: what a
/// client sends first on each connection (AUTH, when it has a password) is kept, and the
/// connection closed.
async fn recording_target() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let r = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if let Ok(n @ 1..) = stream.read(&mut buf).await {
                    r.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (port, received)
}

#[tokio::test]
async fn the_exporter_scrapes_its_own_valkey_and_sends_the_password_nowhere_else() {
    let bin = exporter_bin();
    let valkey = Valkey::start("a");
    let mut failover: Failover =
        serde_yaml::from_str(include_str!("../../deploy/examples/failover.yaml")).expect("seed");
    failover.spec.exporter = Some(Exporter::default());
    let set = data::statefulset(&failover, &Settings::default(), false);
    let container = set
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().find(|c| c.name == "exporter"))
        .expect("exporter container");
    let env: Vec<(String, String)> = container
        .env
        .into_iter()
        .flatten()
        .map(|e| {
            let value = e
                .value
                .unwrap_or_else(|| panic!("{} is not a plain value: {:?}", e.name, e.value_from));
            (e.name, value)
        })
        .collect();
    assert!(
        env.iter().all(|(name, _)| name != "REDIS_PASSWORD"),
        "the password is in the exporter's environment"
    );
    // The controller's copy of the password, as the pod mounts it, moved under a temp dir,
    // with the pod's Valkey port moved to the test's.
    let copy = data::password_in_force_secret(
        &failover,
        "example-failover-password-in-force",
        password::Whose::Instance,
        PASSWORD,
    );
    let map = copy.string_data.expect("data")[password::EXPORTER_KEY]
        .replace(":6379", &format!(":{}", valkey.port));
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::write(root.path().join(password::EXPORTER_KEY), map).expect("map");
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(name, value)| {
            let value = value
                .replace(":6379", &format!(":{}", valkey.port))
                .replace("/etc/valkey-secret", &root.path().display().to_string());
            (name, value)
        })
        .collect();

    for scrape_endpoint_off in [true, false] {
        let web = free_port();
        let mut cmd = Command::new(&bin);
        cmd.env_clear().env(
            "REDIS_EXPORTER_WEB_LISTEN_ADDRESS",
            format!("127.0.0.1:{web}"),
        );
        for (name, value) in &env {
            if scrape_endpoint_off || name != "REDIS_EXPORTER_DISABLE_SCRAPE_ENDPOINT" {
                cmd.env(name, value);
            }
        }
        let log = root
            .path()
            .join(format!("exporter.{scrape_endpoint_off}.log"));
        let _exporter = Proc::spawn("redis_exporter", &mut cmd, &log);
        let web_addr = std::net::SocketAddr::from(([127, 0, 0, 1], web));
        wait_for("the exporter to scrape its Valkey", T, || async {
            let metrics = http_get(web_addr, "/metrics").await.ok()?;
            metrics.lines().any(|l| l == "redis_up 1").then_some(())
        })
        .await;

        let (target, received) = recording_target().await;
        let scrape = format!("/scrape?target=redis://127.0.0.1:{target}");
        let answer = http_get(web_addr, &scrape).await.unwrap_or_default();
        if !scrape_endpoint_off {
            // The older image scrapes the target it is given, without the password.
            wait_for("the exporter to reach the target", T, || async {
                (!received.lock().unwrap().is_empty()).then_some(())
            })
            .await;
        } else {
            assert!(!answer.contains("redis_up"), "{answer}");
        }
        let sent = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
        assert!(
            !sent.contains(PASSWORD),
            "the password went to another host: {sent:?}"
        );
    }
}
