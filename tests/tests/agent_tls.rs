//! The agent's channel to the controller is TLS: the hub serves a certificate from the
//! controller's CA and takes no plaintext; an agent trusts only the CA bundle it is given,
//! says why it refuses a controller, and keeps retrying until the bundle is right.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use valkey_controller::{
    hub::tls::ServerCert,
    hub::{Hub, StaticToken},
    tls::{CA_LIFETIME, Ca},
};
use valkey_e2e::{
    procs::{Agent, AgentOpts, Valkey},
    wait_for,
};

const T: Duration = Duration::from_secs(15);

/// The real agent hub, served over TLS with a certificate of `ca`.
async fn tls_hub(ca: &Ca) -> (Hub, std::net::SocketAddr) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (hub, _events) = Hub::new(StaticToken("t0ken".into()), Duration::from_millis(500));
    let cert = ServerCert::new(&ca.issue(&["127.0.0.1".into()], CA_LIFETIME).unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = hub.clone();
    tokio::spawn(
        async move { valkey_controller::hub::limits::serve(&served, listener, cert).await },
    );
    (hub, addr)
}

fn agent_to(valkey: &Valkey, url: String, ca_file: Option<&std::path::Path>) -> Agent {
    let mut opts = AgentOpts::for_valkey(valkey, Some(url));
    if let Some(file) = ca_file {
        opts.extra = vec!["--controller-ca-file".into(), file.display().to_string()];
    }
    Agent::start(opts)
}

async fn wait_log(agent: &Agent, what: &str, needles: &[&str]) -> String {
    wait_for(what, T, || async {
        let log = agent.log_text();
        needles.iter().all(|n| log.contains(n)).then_some(log)
    })
    .await
}

#[tokio::test]
async fn an_agent_trusting_the_controllers_ca_attaches_over_tls() {
    let ca = Ca::generate("controller CA", CA_LIFETIME).unwrap();
    let (hub, addr) = tls_hub(&ca).await;
    let valkey = Valkey::start("a");
    let ca_file = valkey.dir.join("controller-ca.crt");
    std::fs::write(&ca_file, &ca.0.cert_pem).unwrap();
    let _agent = agent_to(&valkey, format!("https://{addr}"), Some(&ca_file));
    wait_for("the agent attached", T, || async {
        (hub.connected() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_agent_refuses_a_controller_whose_certificate_does_not_chain_to_its_ca() {
    let ca = Ca::generate("controller CA", CA_LIFETIME).unwrap();
    let impostor = Ca::generate("someone else's CA", CA_LIFETIME).unwrap();
    let (hub, addr) = tls_hub(&impostor).await;
    let valkey = Valkey::start("a");
    let ca_file = valkey.dir.join("controller-ca.crt");
    std::fs::write(&ca_file, &ca.0.cert_pem).unwrap();
    let agent = agent_to(&valkey, format!("https://{addr}"), Some(&ca_file));
    // It says why, more than once: it keeps trying.
    let log = wait_log(
        &agent,
        "the agent saying it refuses the certificate",
        &["not accepted", "UnknownIssuer"],
    )
    .await;
    wait_for("a second refusal", T, || async {
        (agent.log_text().matches("not accepted").count() >= 2).then_some(())
    })
    .await;
    assert!(!log.contains("connected to the controller"), "{log}");
    assert_eq!(hub.connected(), 0);
}

#[tokio::test]
async fn a_missing_or_bad_ca_bundle_is_named_and_retried_until_it_is_fixed() {
    let ca = Ca::generate("controller CA", CA_LIFETIME).unwrap();
    let (hub, addr) = tls_hub(&ca).await;
    let valkey = Valkey::start("a");
    let ca_file = valkey.dir.join("controller-ca.crt");
    let agent = agent_to(&valkey, format!("https://{addr}"), Some(&ca_file));
    let named = format!("--controller-ca-file {}", ca_file.display());
    wait_log(
        &agent,
        "the missing bundle named",
        &[&named, "No such file"],
    )
    .await;
    std::fs::write(&ca_file, "garbage\n").unwrap();
    wait_log(
        &agent,
        "the bad bundle named",
        &["no PEM certificate in it"],
    )
    .await;
    assert_eq!(hub.connected(), 0);
    std::fs::write(&ca_file, &ca.0.cert_pem).unwrap();
    wait_for("the agent attached once the bundle is right", T, || async {
        (hub.connected() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_hub_refuses_plaintext() {
    let ca = Ca::generate("controller CA", CA_LIFETIME).unwrap();
    let (hub, addr) = tls_hub(&ca).await;
    // A plaintext gRPC client gets no channel...
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_err()
        }
    };
    assert!(refused, "a plaintext client was served");
    // ...and a plaintext agent on loopback (which it would allow itself) never attaches.
    let valkey = Valkey::start("a");
    let agent = agent_to(&valkey, format!("http://{addr}"), None);
    wait_for("a few connection attempts", T, || async {
        (agent
            .log_text()
            .matches("the controller refused the stream")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    assert_eq!(hub.connected(), 0);
}
