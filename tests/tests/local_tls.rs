//! `enableTLS: true` in `local up`: every data and sentinel port speaks TLS only, with
//! certificates from the working dir's CA (`<dir>/tls/ca.crt`); failover and switchover lose
//! nothing over TLS; a renewed certificate is served without restarting Valkey.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use nix::sys::signal::Signal;
use valkey_controller::{
    local::control::Status,
    tls::{CA_LIFETIME, CERT_LIFETIME, Ca},
};
use valkey_e2e::{
    local::{
        LocalInstance, Writer, assert_every_node_holds, master_of, signal, switchover_when_ready,
        tls_client, write_n,
    },
    procs::Sentinel,
    soak::healthy,
    wait_for,
};

const T: Duration = Duration::from_secs(30);

fn tls_manifest(sentinel: bool) -> String {
    let sentinel = if sentinel {
        "  sentinel:\n    replicas: 3\n    monitorConfig:\n      down-after-milliseconds: \"5000\"\n"
    } else {
        ""
    };
    format!(
        "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\n  namespace: e2e\n\
         spec:\n  replicas: 3\n  access:\n    enableTLS: true\n{sentinel}"
    )
}

async fn healthy_over_tls(instance: &LocalInstance, sentinel: bool) -> Status {
    instance
        .wait_status("a healthy instance", T, |s| healthy(s, sentinel))
        .await
}

/// Whether `client` connects and gets an answer to PING.
async fn answers(client: redis::Client) -> bool {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    match client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Err(_) => false,
        Ok(mut conn) => redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok(),
    }
}

/// Whether a plaintext client gets an answer from `addr`.
async fn plaintext_answers(addr: &str) -> bool {
    answers(redis::Client::open(format!("redis://{addr}/")).expect("client")).await
}

/// Whether a TLS client trusting only `ca_file` can ping `addr`.
async fn tls_answers(ca_file: &std::path::Path, addr: &str, password: Option<&str>) -> bool {
    answers(tls_client(ca_file, addr, password)).await
}

/// The certificate `addr` serves (DER), read from a TLS handshake; None while nothing serves.
async fn try_served_certificate(ca_file: &std::path::Path, addr: &str) -> Option<Vec<u8>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_file).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls::pki_types::CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
}

async fn served_certificate(ca_file: &std::path::Path, addr: &str) -> Vec<u8> {
    try_served_certificate(ca_file, addr)
        .await
        .unwrap_or_else(|| panic!("{addr} serves no certificate"))
}

async fn run_id(instance: &LocalInstance, addr: &str) -> String {
    let mut conn = instance.conn(addr).await;
    let info: redis::InfoDict = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.get("run_id").unwrap()
}

#[tokio::test]
async fn a_tls_instance_serves_tls_only_and_replicates_over_tls() {
    let instance = LocalInstance::up(&tls_manifest(false));
    let status = healthy_over_tls(&instance, false).await;
    let ca_file = instance.dir.join("tls").join("ca.crt");
    let password = instance.password();
    for node in &status.nodes {
        assert!(
            !plaintext_answers(&node.addr).await,
            "{} answered plaintext",
            node.pod
        );
        assert!(
            tls_answers(&ca_file, &node.addr, Some(&password)).await,
            "{}",
            node.pod
        );
        let mut conn = instance.conn(&node.addr).await;
        let port: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("port")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            port,
            ["port", "0"],
            "{}: a plaintext port is open",
            node.pod
        );
    }
    // A client that trusts another CA is refused: the nodes' certificates chain to ours only.
    let other = Ca::generate("another CA", CA_LIFETIME).unwrap();
    let other_file = instance.dir.join("other-ca.crt");
    std::fs::write(&other_file, &other.0.cert_pem).unwrap();
    let (_, addr, _) = master_of(&status);
    assert!(!tls_answers(&other_file, &addr, Some(&password)).await);

    // Writes reach every replica, over TLS replication (there is no other port).
    let keys = write_n(&instance, &addr, 30, 2).await;
    assert_every_node_holds(&instance, &status, &keys, "over TLS").await;
}

#[tokio::test]
async fn over_tls_a_kill_9_failover_and_a_switchover_lose_no_wait_acknowledged_write() {
    let instance = LocalInstance::up(&tls_manifest(false));
    let status = healthy_over_tls(&instance, false).await;
    let writer = Writer::start(instance.dir.clone(), 1);
    writer.wait_more(50).await;

    let (old, _, pid) = master_of(&status);
    signal(pid, Signal::SIGKILL);
    let after = instance
        .wait_status("a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    writer.wait_more(50).await;
    let healed = healthy_over_tls(&instance, false).await;
    let (new, _, _) = master_of(&after);
    let target = healed
        .nodes
        .iter()
        .find(|n| n.pod != new)
        .map(|n| n.pod.clone())
        .unwrap();
    switchover_when_ready(&instance, &target).await;
    instance
        .wait_status("the switchover done", T, |s| {
            s.master.as_deref() == Some(target.as_str()) && s.switchover.is_none()
        })
        .await;
    writer.wait_more(50).await;
    let acked: BTreeSet<u64> = writer.finish().await;
    let last = healthy_over_tls(&instance, false).await;
    assert_every_node_holds(&instance, &last, &acked, "after kill -9 and switchover").await;
}

#[tokio::test]
async fn policy_sentinel_over_tls_fails_over_a_killed_master_and_loses_no_wait_acknowledged_write()
{
    let instance = LocalInstance::up(&tls_manifest(true));
    let status = healthy_over_tls(&instance, true).await;
    let ca_file = instance.dir.join("tls").join("ca.crt");
    for sentinel in &status.monitor.nodes {
        assert!(
            !plaintext_answers(&sentinel.addr).await,
            "{} answered plaintext",
            sentinel.pod
        );
        assert!(
            tls_answers(
                &ca_file,
                &sentinel.addr,
                instance.sentinel_password().as_deref()
            )
            .await,
            "{}",
            sentinel.pod
        );
    }
    // Every replica must hold a write for it to survive Sentinel's choice (docs/failover.md).
    let writer = Writer::start(instance.dir.clone(), 2);
    writer.wait_more(50).await;
    let (old, _, pid) = master_of(&status);
    signal(pid, Signal::SIGKILL);
    instance
        .wait_status("Sentinel to name a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    writer.wait_more(50).await;
    let acked = writer.finish().await;
    let healed = healthy_over_tls(&instance, true).await;
    assert_every_node_holds(
        &instance,
        &healed,
        &acked,
        "after a Sentinel failover over TLS",
    )
    .await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart_and_loses_nothing() {
    // Certificates of 12 s are renewed every 8 s.
    let instance = LocalInstance::up_with(&tls_manifest(false), &["--cert-lifetime-secs", "12"]);
    let status = healthy_over_tls(&instance, false).await;
    let ca_file = instance.dir.join("tls").join("ca.crt");
    let mut before = Vec::new();
    for node in &status.nodes {
        before.push((
            served_certificate(&ca_file, &node.addr).await,
            run_id(&instance, &node.addr).await,
        ));
    }
    let writer = Writer::start(instance.dir.clone(), 1);
    writer.wait_more(20).await;
    for (node, (cert, run)) in status.nodes.iter().zip(&before) {
        wait_for(
            &format!("{} to serve a renewed certificate", node.pod),
            T,
            || async { (served_certificate(&ca_file, &node.addr).await != *cert).then_some(()) },
        )
        .await;
        assert_eq!(
            &run_id(&instance, &node.addr).await,
            run,
            "{} restarted",
            node.pod
        );
        // A new client is served with the new certificate.
        let mut conn = instance.conn(&node.addr).await;
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!(pong, "PONG");
    }
    writer.wait_more(20).await;
    let acked = writer.finish().await;
    let last = healthy_over_tls(&instance, false).await;
    assert_eq!(last.epoch, status.epoch, "a renewal caused a failover");
    assert_every_node_holds(&instance, &last, &acked, "across a renewal").await;
}

#[tokio::test]
async fn a_renewal_restarts_the_sentinels_one_at_a_time_and_causes_no_failover() {
    // Certificates of 15 s are renewed after 10 s; Sentinel cannot reload one, so each sentinel
    // is restarted in turn.
    let instance = LocalInstance::up_with(&tls_manifest(true), &["--cert-lifetime-secs", "15"]);
    let status = healthy_over_tls(&instance, true).await;
    let ca_file = instance.dir.join("tls").join("ca.crt");
    let mut before = Vec::new();
    for sentinel in &status.monitor.nodes {
        // On a loaded machine the first renewal may already be restarting this sentinel: wait
        // for it to serve (the renewal after this one is then the one waited for below).
        before.push(
            wait_for(&format!("{} to serve", sentinel.pod), T, || {
                try_served_certificate(&ca_file, &sentinel.addr)
            })
            .await,
        );
    }
    for (sentinel, cert) in status.monitor.nodes.iter().zip(&before) {
        wait_for(
            &format!("{} to serve a renewed certificate", sentinel.pod),
            T,
            || async {
                try_served_certificate(&ca_file, &sentinel.addr)
                    .await
                    .filter(|served| served != cert)
            },
        )
        .await;
        let now = instance.try_status().await.unwrap();
        let pid = now
            .monitor
            .nodes
            .iter()
            .find(|s| s.pod == sentinel.pod)
            .and_then(|s| s.sentinel_pid);
        assert_ne!(
            pid, sentinel.sentinel_pid,
            "{} was not restarted",
            sentinel.pod
        );
    }
    let after = healthy_over_tls(&instance, true).await;
    assert_eq!(after.epoch, status.epoch, "the roll caused a failover");
    assert_eq!(after.master, status.master);
}

#[tokio::test]
async fn an_external_tls_sentinel_set_is_reached_with_its_ca_and_client_certificate() {
    // Someone else's Sentinel set: its own CA, TLS only, a client certificate required. It
    // trusts our data nodes' CA too, to watch them over TLS.
    let theirs = Ca::generate("the external sentinels' CA", CA_LIFETIME).unwrap();
    let ours = Ca::generate("valkey-controller local CA", CA_LIFETIME).unwrap();
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let served = theirs
        .issue(&["127.0.0.1".into(), "localhost".into()], CERT_LIFETIME)
        .unwrap();
    let cert = write("sentinel.crt", &served.cert_pem);
    let key = write("sentinel.key", &served.key_pem);
    let trust = write(
        "trust.crt",
        &format!("{}{}", theirs.0.cert_pem, ours.0.cert_pem),
    );
    let their_ca = write("their-ca.crt", &theirs.0.cert_pem);
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start_tls(&cert, &key, &trust))
        .collect();
    for sentinel in &sentinels {
        let addr = format!("127.0.0.1:{}", sentinel.port);
        assert!(!plaintext_answers(&addr).await, "{addr} answered plaintext");
        assert!(
            !tls_answers(&their_ca, &addr, None).await,
            "{addr} answered a client without a certificate"
        );
    }
    let client_cert = theirs
        .issue(&["valkey-operator".into()], CERT_LIFETIME)
        .unwrap();
    let nodes: String = sentinels
        .iter()
        .map(|s| format!("        - ip: 127.0.0.1\n          port: {}\n", s.port))
        .collect();
    let manifest = format!(
        "apiVersion: valkey.buf.red/v1alpha1\nkind: Failover\nmetadata:\n  name: demo\n  namespace: e2e\n\
         spec:\n  replicas: 3\n  access:\n    enableTLS: true\n  sentinel:\n    quorum: 2\n    \
         monitorConfig:\n      down-after-milliseconds: \"5000\"\n    sentinelReference:\n      \
         auth:\n        tlsSecret: ext-tls\n      nodes:\n{nodes}"
    );
    let instance = LocalInstance::up_with_files(
        &manifest,
        &[
            ("tls/ca.crt", &ours.0.cert_pem),
            ("tls/ca.key", &ours.0.key_pem),
            ("secrets/ext-tls/ca.crt", &theirs.0.cert_pem),
            ("secrets/ext-tls/tls.crt", &client_cert.cert_pem),
            ("secrets/ext-tls/tls.key", &client_cert.key_pem),
        ],
    );
    // Every sentinel monitors the instance, which only the CA and the client certificate of
    // the Secret let the controller set up.
    let status = healthy_over_tls(&instance, true).await;
    assert_eq!(status.monitor.name.as_deref(), Some("e2e.demo"));
    let writer = Writer::start(instance.dir.clone(), 2);
    writer.wait_more(50).await;
    let (old, _, pid) = master_of(&status);
    signal(pid, Signal::SIGKILL);
    instance
        .wait_status("the external set to name a new master", T, |s| {
            s.master.as_ref().is_some_and(|m| *m != old)
        })
        .await;
    writer.wait_more(50).await;
    let acked = writer.finish().await;
    let healed = healthy_over_tls(&instance, true).await;
    assert_every_node_holds(
        &instance,
        &healed,
        &acked,
        "after a failover by an external TLS Sentinel set",
    )
    .await;
}
