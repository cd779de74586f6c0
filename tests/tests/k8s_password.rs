//! Password rotation in a cluster: the user changes the instance's password Secret, and the
//! controller rotates it in with nothing restarted, through the copy the pods mount (the
//! kubelet's stand-in syncs it into each pod's files, one pod lagging as a kubelet may), while
//! a writer that opens a new connection for every write (a churning pool) keeps writing: it
//! moves to the new password when the status names the old one (both work then), and no
//! write of it is refused. An embedded Sentinel set's own password Secret is rotated the same
//! way on real sentinels.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{Patch, PatchParams};
use redis::aio::MultiplexedConnection;
use valkey_controller::crd::Failover;
use valkey_e2e::{
    k8s::{
        FakeCluster, NS, embedded_sentinels_with_password, failover, ordinal, ready, start_nodes,
        start_sentinel_pods, three_running_nodes, with_demo_password,
    },
    procs::{PASSWORD, Sentinel},
    wait_for,
};

const T: Duration = Duration::from_secs(90);
const NEW: &str = "the-new-instance-password-42";

/// Writes unique keys on `port`, a new connection for each, with the old password until
/// `switched`, then the new one.
struct Writer {
    acked: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<Vec<String>>>,
    switched: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(port: u16) -> Self {
        let acked: Arc<Mutex<Vec<String>>> = Arc::default();
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let (switched, stop) = (Arc::<AtomicBool>::default(), Arc::<AtomicBool>::default());
        let task = {
            let (acked, refused, switched, stop) = (
                acked.clone(),
                refused.clone(),
                switched.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let password = if switched.load(Ordering::SeqCst) {
                        NEW
                    } else {
                        PASSWORD
                    };
                    let key = format!("w{i}");
                    let client =
                        redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}/"))
                            .expect("client");
                    let written = match client.get_multiplexed_async_connection().await {
                        Ok(mut conn) => redis::cmd("SET")
                            .arg(&key)
                            .arg(i)
                            .query_async::<()>(&mut conn)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match written {
                        Ok(()) => acked.lock().unwrap().push(key),
                        Err(e) => refused.lock().unwrap().push(format!("{key}: {e}")),
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Writer {
            acked,
            refused,
            switched,
            stop,
            task,
        }
    }

    async fn stop(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("writer");
        let acked = self.acked.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        (acked, refused)
    }
}

fn old_password_secret(f: &Failover) -> Option<String> {
    f.status.as_ref()?.monitor.old_password_secret.clone()
}

async fn auth(port: u16, password: &str) -> Result<(), String> {
    let client =
        redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}/")).expect("client");
    client
        .get_multiplexed_async_connection()
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Changes the password in the user's Secret `name`.
async fn change_secret(cluster: &FakeCluster, name: &str, password: &str) {
    cluster
        .api::<Secret>(NS)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "data": {"password": ByteString(password.as_bytes().to_vec())},
            })),
        )
        .await
        .expect("change the password Secret");
}

/// The controller's copy `name` holds `password` in force, and no rotation.
async fn copy_holds(cluster: &FakeCluster, name: &str, password: &str) {
    let copy = cluster
        .api::<Secret>(NS)
        .get(name)
        .await
        .expect("the controller's copy");
    let data = copy.data.expect("data");
    assert_eq!(data["password"].0, password.as_bytes());
    assert!(!data.contains_key("password.old") && !data.contains_key("password.new"));
    // The instance's copy also holds the exporter's map, with the same password.
    let exporter = data.get(valkey_controller::k8s::objects::password::EXPORTER_KEY);
    if name == "demo-password-in-force" {
        let map = exporter.map(|m| String::from_utf8_lossy(&m.0).into_owned());
        assert_eq!(
            map,
            Some(valkey_controller::k8s::objects::password::exporter_map(
                password
            ))
        );
    } else {
        assert!(
            exporter.is_none(),
            "the sentinels' copy holds an exporter map"
        );
    }
}

async fn sentinel_conn(sentinel: &Sentinel, password: &str) -> MultiplexedConnection {
    sentinel
        .client_with(password)
        .get_multiplexed_async_connection()
        .await
        .expect("connect with the password")
}

/// The process's run id (a restart changes it).
async fn run_id(conn: &mut MultiplexedConnection) -> String {
    let info: redis::InfoDict = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .expect("INFO");
    info.get("run_id").expect("run_id")
}

#[tokio::test]
async fn a_changed_instance_secret_is_rotated_with_a_writer_running_and_no_write_refused() {
    let (cluster, nodes) = three_running_nodes().await;
    // demo-2's kubelet syncs the Secret volume only every 2 s.
    let _kubelet = cluster.mount_secret(
        "demo-password-in-force",
        nodes
            .valkeys
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let period = if i == 2 { 2000 } else { 100 };
                (v.dir.clone(), Duration::from_millis(period))
            })
            .collect(),
    );
    let up = cluster.reconcile_until(NS, "demo", "Ready", T, ready).await;
    let master = up.status.expect("status").master.expect("master");
    let master_port = nodes.valkeys[ordinal(&master)].port;
    let mut run_ids = Vec::new();
    for valkey in &nodes.valkeys {
        run_ids.push(valkey.info("server").await["run_id"].clone());
    }
    let writer = Writer::start(master_port);

    change_secret(&cluster, "demo-password", NEW).await;
    let rotating = cluster
        .reconcile_until(NS, "demo", "the status naming the old password", T, |f| {
            old_password_secret(f).is_some()
        })
        .await;
    assert_eq!(
        old_password_secret(&rotating).as_deref(),
        Some("demo-password-in-force")
    );
    // Both work now: the application moves to the new password.
    for valkey in &nodes.valkeys {
        auth(valkey.port, PASSWORD).await.expect("the old one");
        auth(valkey.port, NEW).await.expect("the new one");
    }
    writer.switched.store(true, Ordering::SeqCst);
    cluster
        .reconcile_until(NS, "demo", "the rotation done, Ready", T, |f| {
            old_password_secret(f).is_none() && ready(f)
        })
        .await;
    let (acked, refused) = writer.stop().await;
    assert!(refused.is_empty(), "writes refused: {refused:?}");
    assert!(acked.len() > 20, "the writer wrote: {}", acked.len());

    copy_holds(&cluster, "demo-password-in-force", NEW).await;
    for (i, valkey) in nodes.valkeys.iter().enumerate() {
        let refused = auth(valkey.port, PASSWORD).await;
        assert!(
            refused.is_err(),
            "{}: the old password still works",
            valkey.name
        );
        auth(valkey.port, NEW).await.expect("the new password");
        let client =
            redis::Client::open(format!("redis://:{NEW}@127.0.0.1:{}/", valkey.port)).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        assert_eq!(
            run_id(&mut conn).await,
            run_ids[i],
            "{}: restarted",
            valkey.name
        );
        let masterauth: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("masterauth")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(masterauth[1], NEW, "{}", valkey.name);
        // Every acknowledged write is on every node (the replicas' links work with it).
        let last = acked.last().expect("a write").clone();
        wait_for("the last acknowledged write on every node", T, || {
            let (mut conn, last) = (conn.clone(), last.clone());
            async move {
                let exists: i64 = redis::cmd("EXISTS")
                    .arg(&last)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                (exists == 1).then_some(())
            }
        })
        .await;
        let keys: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert_eq!(keys, acked.len() as i64, "{}", valkey.name);
    }
}

#[tokio::test]
async fn a_changed_sentinel_secret_is_rotated_on_every_sentinel_with_none_restarted() {
    const OLD_SP: &str = "sentinel-password-one";
    const NEW_SP: &str = "sentinel-password-two";
    let cluster = with_demo_password().await;
    let spec = embedded_sentinels_with_password(&cluster, OLD_SP, Default::default()).await;
    cluster.create(&failover("demo", spec)).await;
    cluster.create_pods(NS, "demo", 3).await;
    let nodes = start_nodes(&cluster);
    let pods = start_sentinel_pods(&cluster, OLD_SP);
    // The two copies the sentinel pods mount; demo-sentinel-1's kubelet lags.
    let _own = cluster.mount_secret(
        "demo-sentinel-password-in-force",
        pods.sentinels
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let period = if i == 1 { 2000 } else { 100 };
                (s.dir.clone(), Duration::from_millis(period))
            })
            .collect(),
    );
    let _instance = cluster.mount_secret(
        "demo-password-in-force",
        nodes
            .valkeys
            .iter()
            .map(|v| v.dir.clone())
            .chain(pods.sentinels.iter().map(|s| s.dir.join("instance")))
            .map(|dir| (dir, Duration::from_millis(100)))
            .collect(),
    );
    cluster
        .reconcile_until(NS, "demo", "a master", T, |f| {
            f.status.as_ref().is_some_and(|s| s.master.is_some())
        })
        .await;
    let mut run_ids = Vec::new();
    for sentinel in &pods.sentinels {
        run_ids.push(run_id(&mut sentinel_conn(sentinel, OLD_SP).await).await);
    }

    change_secret(&cluster, "sentinel-pw", NEW_SP).await;
    cluster
        .reconcile_until(NS, "demo", "the status naming the old password", T, |f| {
            old_password_secret(f).as_deref() == Some("demo-sentinel-password-in-force")
        })
        .await;
    for sentinel in &pods.sentinels {
        for password in [OLD_SP, NEW_SP] {
            auth(sentinel.port, password).await.expect("both work");
        }
    }
    cluster
        .reconcile_until(NS, "demo", "the rotation done", T, |f| {
            old_password_secret(f).is_none()
        })
        .await;
    copy_holds(&cluster, "demo-sentinel-password-in-force", NEW_SP).await;
    for (i, sentinel) in pods.sentinels.iter().enumerate() {
        assert!(
            auth(sentinel.port, OLD_SP).await.is_err(),
            "the old one works"
        );
        let mut conn = sentinel_conn(sentinel, NEW_SP).await;
        assert_eq!(
            run_id(&mut conn).await,
            run_ids[i],
            "sentinel {i} restarted"
        );
        // It presents the new one to its peers.
        let pass: Vec<String> = redis::cmd("SENTINEL")
            .arg("CONFIG")
            .arg("GET")
            .arg("sentinel-pass")
            .query_async(&mut conn)
            .await
            .expect("SENTINEL CONFIG GET");
        assert_eq!(
            pass.get(1).map(String::as_str),
            Some(NEW_SP),
            "sentinel {i}"
        );
    }
}
