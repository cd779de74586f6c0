//! The data pod's start script, run for real: the script the StatefulSet carries, under `sh`,
//! with its mounts (ConfigMap, Secret, the memory-backed run dir) in a temp dir and a real
//! valkey-server. Sentinel follows each REPLICAOF with CONFIG REWRITE, which rewrites the
//! config file Valkey runs from; a container restarted in the same pod keeps that run dir, so
//! the script must regenerate the file at every start.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{path::Path, process::Command, time::Duration};

use valkey_controller::{
    crd::{Failover, SentinelSettings},
    k8s::{Settings, objects::data, objects::sentinel},
};
use valkey_e2e::{free_port, procs::Proc, wait_for};

const T: Duration = Duration::from_secs(20);

/// The valkey container's start script, with its mount paths moved under `root` and the
/// server told to listen on loopback at `port` with its data in `root/data`.
fn localized_script(failover: &Failover, root: &Path, port: u16) -> String {
    let set = data::statefulset(failover, &Settings::default(), false);
    let container = set
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().find(|c| c.name == "valkey"))
        .expect("valkey container");
    let script = container.command.expect("command")[2].clone();
    let at = |dir: &str| root.join(dir).display().to_string();
    // The Secret's mount first: the ConfigMap's path is a prefix of it.
    let script = script
        .replace("/etc/valkey-secret", &at("secret"))
        .replace("/etc/valkey", &at("config"))
        .replace("/run/valkey", &at("run"));
    let exec = format!("exec valkey-server {}/valkey.conf", at("run"));
    assert!(script.contains(&exec), "{script}");
    script.replace(&exec, &format!("{exec} --port {port} --bind 127.0.0.1"))
}

/// The example Failover's pod: its mounts (the ConfigMap written, the Secret's dir empty)
/// under a temp dir, a free port, and the start script localized to them.
fn pod_mounts() -> (tempfile::TempDir, u16, String) {
    let failover: Failover =
        serde_yaml::from_str(include_str!("../../deploy/examples/failover.yaml")).expect("seed");
    let root = tempfile::tempdir().expect("temp dir");
    for dir in ["secret", "config", "run", "data"] {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    // The data volume's mount, like the others, moves under the temp dir.
    let conf = data::config_map(&failover).data.expect("data")["valkey.conf"].replace(
        "\ndir /data\n",
        &format!("\ndir {}\n", root.path().join("data").display()),
    );
    std::fs::write(root.path().join("config/valkey.conf"), conf).expect("ConfigMap");
    let port = free_port();
    let script = localized_script(&failover, root.path(), port);
    (root, port, script)
}

fn start(script: &str, root: &Path, run: usize) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .env("POD_NAME", "example-failover-0");
    Proc::spawn("valkey pod", &mut cmd, &root.join(format!("pod.{run}.log")))
}

async fn conn(port: u16, password: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection()
        .await
}

/// AUTH with `password` (which may hold what a URL cannot) on a new connection.
async fn auth(port: u16, password: &str) -> redis::RedisResult<()> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd("AUTH").arg(password).query_async(&mut c).await
}

/// ROLE's first three fields: role, master host, master port.
async fn role(port: u16, password: &str) -> (String, String, i64) {
    let mut conn = wait_for("the pod's Valkey to answer", T, || async {
        conn(port, password).await.ok()
    })
    .await;
    let role: redis::Value = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .expect("ROLE");
    let redis::Value::Array(items) = role else {
        panic!("ROLE: {role:?}")
    };
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    };
    let port = match items.get(2) {
        Some(redis::Value::Int(p)) => *p,
        _ => -1,
    };
    (
        text(&items[0]),
        items.get(1).map(text).unwrap_or_default(),
        port,
    )
}

#[tokio::test]
async fn a_data_pod_restarts_from_the_configmap_and_secret_whatever_sentinel_rewrote() {
    let (root, port, script) = pod_mounts();
    std::fs::write(root.path().join("secret/password"), "first-pw").expect("Secret");

    let mut pod = start(&script, root.path(), 0);
    assert_eq!(
        role(port, "first-pw").await,
        ("slave".into(), "127.0.0.1".into(), 1),
        "a pod starts as a replica of nobody"
    );
    // What Sentinel does when it promotes this node: REPLICAOF NO ONE, then CONFIG REWRITE.
    let mut c = conn(port, "first-pw").await.expect("connect");
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut c)
        .await
        .expect("REPLICAOF NO ONE");
    let _: () = redis::cmd("CONFIG")
        .arg("REWRITE")
        .query_async(&mut c)
        .await
        .expect("CONFIG REWRITE");
    let rewritten =
        std::fs::read_to_string(root.path().join("run/valkey.conf")).expect("run config");
    assert!(
        !rewritten.contains("replicaof 127.0.0.1 1"),
        "the rewrite removes the start-as-replica line:\n{rewritten}"
    );

    // The container dies; the Secret changed meanwhile; the run dir (an emptyDir) stays.
    pod.kill9();
    std::fs::write(root.path().join("secret/password"), "second-pw").expect("Secret");
    let _pod = start(&script, root.path(), 1);
    assert_eq!(
        role(port, "second-pw").await,
        ("slave".into(), "127.0.0.1".into(), 1),
        "a restarted pod must not come back as the master Sentinel's rewrite left"
    );
    assert!(
        conn(port, "first-pw").await.is_err(),
        "the password of the rewritten file still works"
    );
}

#[tokio::test]
async fn a_password_that_could_add_directives_is_refused_and_any_other_is_taken_as_is() {
    let (root, port, script) = pod_mounts();
    // A Secret whose password would close the quote and start directives of its own.
    let hostile = "x\"\nrename-command CONFIG \"\"\nenable-debug-command yes\n\"";
    std::fs::write(root.path().join("secret/password"), hostile).expect("Secret");
    let mut pod = start(&script, root.path(), 0);
    let status = wait_for("the script to refuse", T, || {
        let status = pod.exited();
        async move { status }
    })
    .await;
    assert!(!status.success(), "{status}");
    let log = pod.log_text();
    assert!(
        log.contains("holds a quote, a backslash or a control character"),
        "{log}"
    );
    assert!(
        !root.path().join("run/valkey.conf").exists(),
        "nothing was written"
    );
    // Shell and config specials that cannot end the quoted value are kept as they are.
    let odd = "p@ss w$rd!'#;`ls` {}*";
    std::fs::write(root.path().join("secret/password"), odd).expect("Secret");
    let _pod = start(&script, root.path(), 1);
    wait_for("the pod's Valkey to take the password", T, || async {
        auth(port, odd).await.ok()
    })
    .await;
}

#[tokio::test]
async fn a_pod_restarted_mid_rotation_accepts_both_passwords_and_after_it_the_new_one_only() {
    let (root, port, script) = pod_mounts();
    // The controller's copy mid-rotation, as this pod's kubelet has synced it so far: the one
    // in force still the old one, both ends beside it. The new one has a space and specials.
    let (old, new) = ("old-pw", "p@ss w$rd!'#;`ls` {}*");
    let secret = root.path().join("secret");
    std::fs::write(secret.join("password"), format!("{old}\n")).expect("Secret");
    std::fs::write(secret.join("password.old"), old).expect("Secret");
    std::fs::write(secret.join("password.new"), new).expect("Secret");
    let mut pod = start(&script, root.path(), 0);
    role(port, old).await;
    assert!(auth(port, new).await.is_ok(), "the new password is refused");
    let mut c = conn(port, old).await.expect("connect");
    let masterauth: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("masterauth")
        .query_async(&mut c)
        .await
        .expect("CONFIG GET");
    assert_eq!(masterauth[1], old, "it presents the password in force");

    // The rotation ended: only the new one, in force.
    pod.kill9();
    std::fs::write(secret.join("password"), new).expect("Secret");
    std::fs::remove_file(secret.join("password.old")).expect("Secret");
    std::fs::remove_file(secret.join("password.new")).expect("Secret");
    let _pod = start(&script, root.path(), 1);
    wait_for("the pod to take the new password", T, || async {
        auth(port, new).await.ok()
    })
    .await;
    assert!(
        auth(port, old).await.is_err(),
        "the old password still works"
    );
}

/// The seed's example with an embedded Sentinel set and no `access.defaultPasswordSecret`:
/// its sentinels still get a password (the Secret the controller generates, through its copy),
/// and a client without it can neither re-point the monitor, nor touch the sentinels' users,
/// nor shut one down. The sentinel pod's start script runs for real, under `sh`, with its
/// mounts in a temp dir and a real valkey-sentinel.
#[tokio::test]
async fn embedded_sentinels_without_a_named_secret_refuse_clients_without_their_password() {
    let mut failover: Failover =
        serde_yaml::from_str(include_str!("../../deploy/examples/failover.yaml")).expect("seed");
    failover.spec.sentinel = Some(SentinelSettings::default());
    let (configs, sets, _, _) = sentinel::objects(&failover, &Settings::default(), false, None);
    let pod = sets[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod template");
    let secret = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "password")
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.clone());
    assert_eq!(
        secret.as_deref(),
        Some("example-failover-sentinel-password-in-force"),
        "the sentinels mount no password"
    );
    let container = pod
        .containers
        .into_iter()
        .find(|c| c.name == "sentinel")
        .expect("sentinel container");
    let root = tempfile::tempdir().expect("temp dir");
    let at = |dir: &str| root.path().join(dir).display().to_string();
    for dir in ["secret", "config", "data"] {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    let password = "s3ntinel-pw";
    std::fs::write(root.path().join("secret/password"), password).expect("Secret");
    let conf = &configs[0].data.as_ref().expect("data")["sentinel.conf"];
    assert!(conf.contains("protected-mode yes"), "{conf}");
    // The data volume's mount, like the others, moves under the temp dir.
    let conf = conf.replace("\ndir /data\n", &format!("\ndir {}\n", at("data")));
    std::fs::write(root.path().join("config/sentinel.conf"), conf).expect("ConfigMap");
    let port = free_port();
    let script = container.command.expect("command")[2]
        .replace("/etc/valkey-secret", &at("secret"))
        .replace("/etc/sentinel", &at("config"))
        .replace("/data", &at("data"))
        .replace("port 26379\n", &format!("port {port}\nbind 127.0.0.1\n"));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&script)
        .env("POD_NAME", "example-failover-sentinel-0");
    let _sentinel = Proc::spawn("sentinel pod", &mut cmd, &root.path().join("pod.log"));

    let mut with = wait_for("the sentinel to take its password", T, || async {
        conn(port, password).await.ok()
    })
    .await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut with)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    let mut without = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for attack in [
        vec!["SENTINEL", "MONITOR", "evil", "127.0.0.1", "6379", "1"],
        vec!["ACL", "SETUSER", "default", "on", "nopass", "+@all"],
        vec!["SHUTDOWN", "NOSAVE"],
    ] {
        let refused: redis::RedisResult<redis::Value> = redis::cmd(attack[0])
            .arg(&attack[1..])
            .query_async(&mut without)
            .await;
        let err = refused.expect_err(&attack.join(" "));
        assert!(
            err.to_string().contains("NOAUTH"),
            "{}: {err}",
            attack.join(" ")
        );
    }
    let pong: String = redis::cmd("PING")
        .query_async(&mut with)
        .await
        .expect("alive");
    assert_eq!(pong, "PONG");
}
