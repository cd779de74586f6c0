//! Agents authenticate with real tokens: from the TokenRequest API, bound to their pod, for
//! the audience `valkey-controller`, reviewed by the real API server's TokenReview. A token for
//! another audience is refused, and so is a token whose pod was deleted, even one the
//! controller accepted (and remembers) before.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use k8s_openapi::api::{apps::v1::StatefulSet, core::v1::Pod};
use kube::{
    ResourceExt,
    api::{DeleteParams, PostParams},
};
use valkey_controller::{
    crd::{Failover, Phase},
    k8s::TOKEN_AUDIENCE,
};
use valkey_e2e::{
    apiserver,
    cluster::{Cluster, pod_from_template},
    k8s::{failover, three},
    procs::{Agent, AgentOpts, Valkey},
    wait_for,
};

fn ready(f: &Failover) -> bool {
    f.status.as_ref().is_some_and(|s| s.phase == Phase::Ready)
}

/// A metric of the controller's /metrics.
async fn metric(cluster: &Cluster, name: &str) -> f64 {
    let text = valkey_e2e::http_get(cluster.controllers[0].http, "/metrics")
        .await
        .expect("/metrics");
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A pod `name` of the instance (from its StatefulSet's current template, owned by nobody, so
/// that the StatefulSet's stand-in leaves it alone), and its uid.
async fn stray_pod(cluster: &Cluster, name: &str) -> String {
    let set = cluster
        .api::<StatefulSet>()
        .get("demo")
        .await
        .expect("StatefulSet");
    let revision = set
        .status
        .as_ref()
        .and_then(|s| s.update_revision.clone())
        .expect("the StatefulSet's revision");
    let mut pod = pod_from_template(&set, name, &revision, false).expect("pod");
    pod.metadata.owner_references = None;
    let created = cluster
        .api::<Pod>()
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    created.uid().expect("uid")
}

/// An agent of pod `name` (with a Valkey of its own) presenting `token` to the hub.
fn agent(cluster: &Cluster, valkey: &Valkey, name: &str, token: &str) -> Agent {
    let mut opts = AgentOpts::for_valkey(
        valkey,
        Some(format!("https://127.0.0.1:{}", cluster.hub.port)),
    );
    std::fs::write(opts.token_file.as_ref().expect("token file"), token).expect("token");
    let ca = valkey.dir.join("controller-ca.crt");
    let controller_ca = std::fs::read_to_string(
        cluster
            .kubelet
            .with_pod("demo-0", |p| p.agent.opts.extra.clone())
            .and_then(|extra| {
                let at = extra.iter().position(|a| a == "--controller-ca-file")?;
                extra.get(at + 1).cloned()
            })
            .expect("the controller CA a running pod mounts"),
    )
    .expect("controller CA");
    std::fs::write(&ca, controller_ca).expect("CA");
    opts.pod = name.into();
    opts.extra = vec![
        "--namespace".into(),
        cluster.ns.clone(),
        "--controller-ca-file".into(),
        ca.display().to_string(),
    ];
    Agent::start(opts)
}

#[tokio::test]
async fn agent_tokens_are_reviewed_by_the_api_server_and_a_deleted_pods_token_is_refused() {
    let cluster = Cluster::start().await;
    cluster.with_password("demo").await;
    cluster.create(failover("demo", three())).await;
    cluster
        .wait("demo", "Ready", Duration::from_secs(60), ready)
        .await;
    // Every running agent got in with its pod-bound token.
    assert_eq!(
        metric(&cluster, "valkey_controller_connected_agents").await,
        3.0
    );
    let refused = metric(&cluster, "valkey_controller_refused_agents_total").await;

    // A pod of the instance the StatefulSet does not run: its agent, with a token bound to it
    // for the controller's audience, gets in.
    let uid = stray_pod(&cluster, "demo-7").await;
    let token = apiserver::request_token(
        &cluster.admin,
        &cluster.ns,
        "default",
        Some(TOKEN_AUDIENCE),
        Some(("demo-7", &uid)),
    )
    .await;
    let valkey = Valkey::start("demo-7");
    let stray = agent(&cluster, &valkey, "demo-7", &token);
    wait_for(
        "the pod-bound token to be accepted",
        Duration::from_secs(10),
        || async {
            (metric(&cluster, "valkey_controller_connected_agents").await == 4.0).then_some(())
        },
    )
    .await;

    // The pod is deleted: its agent's stream ends, and when it comes back with the same
    // token it is refused, though the controller accepted that token a moment ago.
    cluster
        .api::<Pod>()
        .delete("demo-7", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the pod");
    wait_for(
        "the deleted pod's agent to be let go and its token refused",
        Duration::from_secs(10),
        || async {
            let now = metric(&cluster, "valkey_controller_refused_agents_total").await;
            let connected = metric(&cluster, "valkey_controller_connected_agents").await;
            (now > refused && connected == 3.0).then_some(())
        },
    )
    .await;
    drop(stray);

    // A token for another audience, bound to a pod that exists: refused.
    let refused = metric(&cluster, "valkey_controller_refused_agents_total").await;
    let uid = stray_pod(&cluster, "demo-8").await;
    let foreign = apiserver::request_token(
        &cluster.admin,
        &cluster.ns,
        "default",
        Some("some-other-service"),
        Some(("demo-8", &uid)),
    )
    .await;
    let other = Valkey::start("demo-8");
    let _foreign = agent(&cluster, &other, "demo-8", &foreign);
    wait_for(
        "the foreign audience's token to be refused",
        Duration::from_secs(10),
        || async {
            let now = metric(&cluster, "valkey_controller_refused_agents_total").await;
            (now > refused).then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(&cluster, "valkey_controller_connected_agents").await,
        3.0
    );
    let after = cluster.failover("demo").await;
    assert!(
        ready(&after),
        "the instance kept running: {:?}",
        after.status
    );
}
