//! The Kubernetes reconciler against an in-memory API server (kube-fake-client), with the
//! controller's real agent hub and, where status matters, real valkey-server processes and
//! valkey-agents reporting to it: creating a Failover creates its objects, status and role
//! labels follow the agents, deletion goes through the finalizer, pause and resume work, and
//! bad input fails the Failover with a message naming the field, leaving the instance alone.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{
            ConfigMap, PersistentVolumeClaim, Pod, Secret, Service, ServicePort, ServiceSpec,
        },
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use nix::sys::signal::Signal;
use valkey_controller::{
    crd::{Failover, NodeRole, Phase, SentinelInstanceAccess, SentinelSettings, Storage},
    k8s::{ANNOTATION_PAUSED, ANNOTATION_SWITCHOVER, FINALIZER, LABEL_INSTANCE},
};
use valkey_e2e::{
    k8s::{FakeCluster, NS, failover, ordinal, password_secret, ready, three, three_running_nodes},
    procs::Valkey,
    wait_for,
};

const T: Duration = Duration::from_secs(30);

async fn names<K>(api: &Api<K>) -> Vec<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|o| o.name_any())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn creating_a_failover_creates_its_objects_and_a_password_that_is_never_overwritten() {
    let cluster = FakeCluster::start().await;
    let mut spec = three();
    spec.storage = Some(Storage::default());
    spec.exporter = Some(Default::default());
    cluster.create(&failover("demo", spec)).await;
    cluster.reconcile(NS, "demo").await.expect("reconcile");

    let created = cluster.failover(NS, "demo").await;
    assert!(created.finalizers().contains(&FINALIZER.to_owned()));
    assert_eq!(names(&cluster.api::<StatefulSet>(NS)).await, ["demo"]);
    assert_eq!(
        names(&cluster.api::<ConfigMap>(NS)).await,
        ["demo-config", "demo-controller-ca"]
    );
    // Agents verify the hub with the controller's CA, handed to them in a ConfigMap.
    let bundle = cluster
        .api::<ConfigMap>(NS)
        .get("demo-controller-ca")
        .await
        .unwrap();
    assert_eq!(
        bundle.data.unwrap()["ca.crt"],
        cluster.ca.0.cert_pem,
        "the agents' CA bundle is not the controller's CA"
    );
    assert_eq!(
        names(&cluster.api::<PodDisruptionBudget>(NS)).await,
        ["demo"]
    );
    // One NetworkPolicy over every pod of the instance.
    let policy = cluster
        .api::<k8s_openapi::api::networking::v1::NetworkPolicy>(NS)
        .get("demo")
        .await
        .expect("the instance's NetworkPolicy");
    assert_eq!(
        policy
            .spec
            .and_then(|s| s.pod_selector)
            .and_then(|s| s.match_labels)
            .and_then(|l| l.get("app.kubernetes.io/instance").cloned())
            .as_deref(),
        Some("demo")
    );
    assert_eq!(
        names(&cluster.api::<Service>(NS)).await,
        [
            "demo",
            "demo-0",
            "demo-1",
            "demo-2",
            "demo-headless",
            "demo-metrics",
            "demo-read"
        ]
    );
    let sts = cluster
        .api::<StatefulSet>(NS)
        .get("demo")
        .await
        .expect("sts");
    let owner = sts.owner_references();
    assert_eq!(owner.len(), 1);
    assert_eq!(
        (owner[0].kind.as_str(), owner[0].controller),
        ("Failover", Some(true))
    );
    assert_eq!(sts.spec.as_ref().and_then(|s| s.replicas), Some(3));

    let secrets = cluster.api::<Secret>(NS);
    let read = |s: Secret| {
        s.data
            .and_then(|d| {
                d.get("password")
                    .map(|b| String::from_utf8(b.0.clone()).expect("utf8"))
            })
            .or_else(|| s.string_data.and_then(|d| d.get("password").cloned()))
            .expect("a password")
    };
    let password = read(secrets.get("demo-password").await.expect("secret"));
    assert_eq!(password.len(), 32);
    cluster.reconcile(NS, "demo").await.expect("second pass");
    assert_eq!(
        read(secrets.get("demo-password").await.expect("secret")),
        password
    );

    let status = cluster.failover(NS, "demo").await.status.expect("status");
    assert_eq!(status.phase, Phase::Creating);
    assert!(
        status.message.contains("waiting for the agents"),
        "{}",
        status.message
    );

    // A Secret the user made is used as it is.
    cluster
        .api::<Secret>(NS)
        .create(
            &PostParams::default(),
            &password_secret("mine-password", "users-own"),
        )
        .await
        .expect("user's secret");
    cluster.create(&failover("mine", three())).await;
    cluster.reconcile(NS, "mine").await.expect("reconcile");
    assert_eq!(
        read(secrets.get("mine-password").await.expect("secret")),
        "users-own"
    );
}

#[tokio::test]
async fn the_seed_example_gets_its_sentinels() {
    let cluster = FakeCluster::start().await;
    let mut seed: Failover =
        serde_yaml::from_str(include_str!("../../deploy/examples/failover.yaml")).expect("seed");
    seed.metadata.namespace = Some(NS.into());
    cluster.create(&seed).await;
    cluster
        .reconcile(NS, "example-failover")
        .await
        .expect("reconcile");
    assert_eq!(
        names(&cluster.api::<StatefulSet>(NS)).await,
        ["example-failover", "example-failover-sentinel"]
    );
    let services = names(&cluster.api::<Service>(NS)).await;
    assert!(
        services.contains(&"example-failover-sentinel".to_owned()),
        "{services:?}"
    );
    let status = cluster
        .failover(NS, "example-failover")
        .await
        .status
        .expect("status");
    assert_eq!(
        status.monitor.name.as_deref(),
        Some("default.example-failover")
    );
    assert_eq!(status.monitor.nodes.len(), 3);
}

async fn role_labels(cluster: &FakeCluster) -> BTreeMap<String, String> {
    valkey_e2e::k8s::role_labels(&cluster.api(NS), &ListParams::default()).await
}

#[tokio::test]
async fn status_and_routing_follow_the_agents_through_a_failover() {
    let (cluster, nodes) = three_running_nodes().await;

    let up = cluster
        .reconcile_until(NS, "demo", "phase Ready", T, ready)
        .await;
    let status = up.status.expect("status");
    let master = status.master.clone().expect("a master");
    assert_eq!(status.epoch, 1);
    assert_eq!(status.nodes.len(), 3);
    for node in &status.nodes {
        let want = if node.pod_name == master {
            NodeRole::Master
        } else {
            NodeRole::Replica
        };
        assert_eq!(node.role, want, "{node:?}");
        assert!(node.pod_name == master || node.link_up, "{node:?}");
    }
    let labels = role_labels(&cluster).await;
    for (pod, role) in &labels {
        assert_eq!(
            role,
            if *pod == master { "master" } else { "replica" },
            "{labels:?}"
        );
    }
    cluster.event(NS, "Normal", "Ready").await;

    // A planned switchover through the annotation: another node takes over, the annotation
    // is removed and the result recorded.
    cluster
        .api::<Failover>(NS)
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(
                &serde_json::json!({"metadata": {"annotations": {ANNOTATION_SWITCHOVER: "any"}}}),
            ),
        )
        .await
        .expect("annotate");
    let switched = cluster
        .reconcile_until(NS, "demo", "the switchover", T, |f| {
            f.status.as_ref().is_some_and(|s| {
                s.phase == Phase::Ready
                    && s.master.as_ref().is_some_and(|m| *m != master)
                    && s.last_failover_reason.as_deref() == Some("planned switchover")
            })
        })
        .await;
    assert!(!switched.annotations().contains_key(ANNOTATION_SWITCHOVER));
    cluster.event(NS, "Normal", "Switchover").await;
    let status = switched.status.expect("status");
    assert_eq!(status.epoch, 2, "{status:#?}");
    let master = status.master.expect("master");

    // Writes acknowledged by a replica, then kill -9 of the master: a replica is promoted
    // with them, and status and the role label follow.
    nodes.acked_writes(&master, 20).await;
    let index = ordinal(&master);
    nodes.valkeys[index].proc().signal(Signal::SIGKILL);
    let after = cluster
        .reconcile_until(NS, "demo", "a new master", T, |f| {
            f.status
                .as_ref()
                .is_some_and(|s| s.master.as_ref().is_some_and(|m| *m != master) && s.epoch == 3)
        })
        .await;
    let status = after.status.expect("status");
    let new_master = status.master.clone().expect("master");
    assert!(status.last_failover_reason.is_some());
    assert_eq!(status.last_failover_from.as_deref(), Some(master.as_str()));
    // Routing follows on the passes the new master's report triggers.
    let labels = wait_for("the role label to move", T, || async {
        cluster.reconcile(NS, "demo").await.expect("reconcile");
        let labels = role_labels(&cluster).await;
        (labels[&new_master] == "master").then_some(labels)
    })
    .await;
    assert_ne!(labels[&master], "master", "{labels:?}");
    assert!(
        status.phase != Phase::Ready,
        "one node is down: {}",
        status.message
    );
    let new_index = ordinal(&new_master);
    let keys: i64 = redis::cmd("DBSIZE")
        .query_async(&mut nodes.valkeys[new_index].conn().await)
        .await
        .expect("DBSIZE");
    assert_eq!(keys, 20, "acknowledged writes kept");
}

#[tokio::test]
async fn pause_scales_to_zero_keeping_secrets_and_resume_brings_it_back() {
    let cluster = FakeCluster::start().await;
    cluster.create(&failover("demo", three())).await;
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    let api = cluster.api::<Failover>(NS);
    let annotate = |value: Option<&str>| serde_json::json!({"metadata": {"annotations": {ANNOTATION_PAUSED: value}}});
    api.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(&annotate(Some("true"))),
    )
    .await
    .expect("pause");
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    let replicas = || async {
        cluster
            .api::<StatefulSet>(NS)
            .get("demo")
            .await
            .expect("sts")
            .spec
            .and_then(|s| s.replicas)
    };
    assert_eq!(replicas().await, Some(0));
    let paused = cluster.failover(NS, "demo").await.status.expect("status");
    assert_eq!(paused.phase, Phase::Paused);
    assert!(
        cluster
            .api::<Secret>(NS)
            .get_opt("demo-password")
            .await
            .expect("get")
            .is_some()
    );

    api.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(&annotate(None)),
    )
    .await
    .expect("resume");
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    assert_eq!(replicas().await, Some(3));
    let resumed = cluster.failover(NS, "demo").await.status.expect("status");
    assert_eq!(resumed.phase, Phase::Creating);
}

#[tokio::test]
async fn an_invalid_spec_fails_naming_the_field_and_leaves_the_instance_alone() {
    let cluster = FakeCluster::start().await;
    cluster.create(&failover("demo", three())).await;
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    let sts_before = cluster
        .api::<StatefulSet>(NS)
        .get("demo")
        .await
        .expect("sts");
    let config_before = cluster
        .api::<ConfigMap>(NS)
        .get("demo-config")
        .await
        .expect("cm");

    let mut edited = cluster.failover(NS, "demo").await;
    edited
        .spec
        .custom_configs
        .insert("port".into(), "7000".into());
    edited.spec.replicas = 5;
    cluster
        .api::<Failover>(NS)
        .replace("demo", &PostParams::default(), &edited)
        .await
        .expect("edit");
    let action = cluster
        .reconcile(NS, "demo")
        .await
        .expect("handled, not retried");
    assert_eq!(action, kube::runtime::controller::Action::await_change());

    let status = cluster.failover(NS, "demo").await.status.expect("status");
    assert_eq!(status.phase, Phase::Failed);
    assert!(
        status.message.starts_with("spec.customConfigs.port:"),
        "{}",
        status.message
    );
    let events = cluster.events(NS).await;
    assert!(
        events.iter().any(|(t, r, n)| t == "Warning"
            && r == "InvalidSpec"
            && n.contains("spec.customConfigs.port")),
        "{events:?}"
    );
    let sts_after = cluster
        .api::<StatefulSet>(NS)
        .get("demo")
        .await
        .expect("sts");
    assert_eq!(sts_after.resource_version(), sts_before.resource_version());
    assert_eq!(sts_after.spec.and_then(|s| s.replicas), Some(3));
    let config_after = cluster
        .api::<ConfigMap>(NS)
        .get("demo-config")
        .await
        .expect("cm");
    assert_eq!(config_after.data, config_before.data);
}

#[tokio::test]
async fn a_missing_secret_or_a_taken_node_port_is_named() {
    let other = Service {
        metadata: ObjectMeta {
            name: Some("someone-else".into()),
            namespace: Some("other".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            ports: Some(vec![ServicePort {
                port: 80,
                node_port: Some(31001),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let cluster = FakeCluster::start_with(|b| b.with_object(other)).await;
    let mut spec = three();
    spec.access.service_type = valkey_controller::crd::ServiceType::NodePort;
    spec.access.ports = Some("31000-31002".into());
    cluster.create(&failover("demo", spec)).await;
    cluster.reconcile(NS, "demo").await.expect("handled");
    let status = cluster.failover(NS, "demo").await.status.expect("status");
    assert_eq!(status.phase, Phase::Failed);
    assert_eq!(
        status.message,
        "spec.access.ports: NodePort 31001 is already used by Service other/someone-else"
    );
    assert!(
        names(&cluster.api::<StatefulSet>(NS)).await.is_empty(),
        "nothing applied"
    );

    let mut spec = three();
    spec.sentinel = Some(SentinelSettings {
        access: Some(SentinelInstanceAccess {
            default_password_secret: Some("sentinel-pw".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    cluster.create(&failover("guarded", spec)).await;
    cluster.reconcile(NS, "guarded").await.expect("handled");
    let status = cluster
        .failover(NS, "guarded")
        .await
        .status
        .expect("status");
    assert_eq!(status.phase, Phase::Failed);
    assert!(
        status.message.starts_with(
            "spec.sentinel.access.defaultPasswordSecret: Secret \"sentinel-pw\" not found"
        ),
        "{}",
        status.message
    );
    let events = cluster.events(NS).await;
    assert!(
        events.iter().any(|(_, r, _)| r == "MissingSecret"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|(_, r, _)| r == "NodePortInUse"),
        "{events:?}"
    );
}

/// The Failover as the API server holds it after `kubectl delete`: a deletion timestamp, and
/// our finalizer still on it; plus PVCs of its own and of another instance.
async fn deleted(retain: bool) -> FakeCluster {
    let mut spec = three();
    spec.storage = Some(Storage {
        retain_after_deleted: retain,
        ..Storage::default()
    });
    let mut doomed = failover("demo", spec);
    doomed.metadata.finalizers = Some(vec![FINALIZER.into()]);
    doomed.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let pvc = |name: &str, instance: &str| PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some([(LABEL_INSTANCE.to_owned(), instance.to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..PersistentVolumeClaim::default()
    };
    FakeCluster::start_with(|b| {
        b.with_object(doomed)
            .with_object(pvc("data-demo-0", "demo"))
            .with_object(pvc("data-demo-1", "demo"))
            .with_object(pvc("data-other-0", "other"))
    })
    .await
}

#[tokio::test]
async fn deletion_goes_through_the_finalizer_and_honours_retain_after_deleted() {
    for (retain, left) in [
        (false, vec!["data-other-0"]),
        (true, vec!["data-demo-0", "data-demo-1", "data-other-0"]),
    ] {
        let cluster = deleted(retain).await;
        cluster.reconcile(NS, "demo").await.expect("cleanup");
        let gone = cluster
            .api::<Failover>(NS)
            .get_opt("demo")
            .await
            .expect("get");
        assert!(
            gone.is_none(),
            "retain {retain}: the Failover is still there"
        );
        assert_eq!(
            names(&cluster.api::<PersistentVolumeClaim>(NS)).await,
            left,
            "retain {retain}"
        );
    }
}

async fn config_get(valkey: &Valkey, key: &str) -> String {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(key)
        .query_async(&mut valkey.conn().await)
        .await
        .expect("CONFIG GET");
    pair.get(1).cloned().unwrap_or_default()
}

#[tokio::test]
async fn live_settings_apply_at_once_and_a_new_template_rolls_replicas_first_master_last() {
    let (cluster, nodes) = three_running_nodes().await;
    cluster
        .reconcile_until(NS, "demo", "phase Ready", T, ready)
        .await;

    // A setting that applies live reaches every node without a restart.
    let mut edited = cluster.failover(NS, "demo").await;
    edited
        .spec
        .custom_configs
        .insert("maxmemory-policy".into(), "allkeys-lru".into());
    cluster
        .api::<Failover>(NS)
        .replace("demo", &PostParams::default(), &edited)
        .await
        .expect("edit");
    wait_for("CONFIG SET on every node", T, || async {
        cluster.reconcile(NS, "demo").await.expect("reconcile");
        for valkey in &nodes.valkeys {
            if config_get(valkey, "maxmemory-policy").await != "allkeys-lru" {
                return None;
            }
        }
        Some(())
    })
    .await;

    // The StatefulSet now has a new template revision (the StatefulSet watch tells the
    // controller): the pods roll one by one.
    let set = cluster
        .api::<StatefulSet>(NS)
        .patch_status(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"status": {"replicas": 3, "updateRevision": "v2"}})),
        )
        .await
        .expect("new revision");
    let woken = cluster
        .ctx
        .owned_changed("StatefulSet", &set.metadata, Some("v2".into()));
    assert_eq!(woken.map(|k| k.name).as_deref(), Some("demo"));
    let master = cluster
        .failover(NS, "demo")
        .await
        .status
        .and_then(|s| s.master)
        .expect("master");
    let mut restarted = Vec::new();
    while restarted.len() < 3 {
        let gone = wait_for("the next pod to be restarted", T, || async {
            cluster.reconcile(NS, "demo").await.expect("reconcile");
            let present = names(&cluster.api::<Pod>(NS)).await;
            (0..3)
                .map(|i| format!("demo-{i}"))
                .find(|p| !present.contains(p))
        })
        .await;
        // Stand in for the StatefulSet controller: the pod comes back on the new template
        // (its Valkey and agent keep running here).
        let ordinal: i32 = gone
            .rsplit('-')
            .next()
            .and_then(|o| o.parse().ok())
            .expect("ordinal");
        cluster.create_pod(NS, "demo", ordinal, "v2").await;
        restarted.push(gone);
        cluster
            .reconcile_until(NS, "demo", "phase Ready", T, ready)
            .await;
    }
    assert_eq!(
        restarted.last(),
        Some(&master),
        "the master goes last: {restarted:?}"
    );
    let after = cluster.failover(NS, "demo").await.status.expect("status");
    assert_ne!(
        after.master.as_deref(),
        Some(master.as_str()),
        "it was switched over first"
    );
    assert_eq!(
        after.last_failover_reason.as_deref(),
        Some("planned switchover")
    );
    let events = cluster.events(NS).await;
    assert!(
        events.iter().any(|(_, r, _)| r == "RollingRestart"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_tls_failover_gets_a_certificate_from_the_controllers_ca_issued_once() {
    let cluster = FakeCluster::start().await;
    let mut spec = three();
    spec.access.enable_tls = true;
    cluster.create(&failover("demo", spec)).await;
    cluster.reconcile(NS, "demo").await.expect("reconcile");

    let secrets = cluster.api::<Secret>(NS);
    let secret = secrets.get("demo-tls").await.expect("the issued Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.clone().expect("data");
    assert_eq!(data["ca.crt"].0, cluster.ca.0.cert_pem.as_bytes());
    assert!(data.contains_key("tls.key"));
    // The pods mount it, and Valkey serves TLS only.
    let set = cluster
        .api::<StatefulSet>(NS)
        .get("demo")
        .await
        .expect("StatefulSet");
    let volumes = set.spec.unwrap().template.spec.unwrap().volumes.unwrap();
    assert!(volumes.iter().any(|v| {
        v.secret
            .as_ref()
            .is_some_and(|s| s.secret_name.as_deref() == Some("demo-tls"))
    }));
    let conf = cluster
        .api::<ConfigMap>(NS)
        .get("demo-config")
        .await
        .unwrap()
        .data
        .unwrap()["valkey.conf"]
        .clone();
    assert!(conf.contains("port 0\ntls-port 6379\n"), "{conf}");

    // Another pass keeps the certificate: it is not due, its names and CA are the same.
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    let again = secrets.get("demo-tls").await.expect("Secret");
    assert_eq!(again.data.expect("data")["tls.crt"], data["tls.crt"]);
}

#[tokio::test]
async fn a_renewed_certificate_rolls_the_sentinels_and_not_the_data_pods() {
    let cluster = FakeCluster::start().await;
    let mut spec = three();
    spec.access.enable_tls = true;
    spec.sentinel = Some(SentinelSettings::default());
    cluster.create(&failover("demo", spec)).await;
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    let sets = cluster.api::<StatefulSet>(NS);
    let template_annotations = |set: StatefulSet| {
        set.spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .unwrap_or_default()
    };
    let sentinel_before = template_annotations(sets.get("demo-sentinel").await.unwrap());
    let data_before = template_annotations(sets.get("demo").await.unwrap());
    let served = sentinel_before
        .get("valkey.buf.red/tls-cert")
        .cloned()
        .expect("the sentinels' template names their certificate");

    // The certificate must be issued again (here: the names it was issued for changed).
    let secrets = cluster.api::<Secret>(NS);
    let patch =
        serde_json::json!({"metadata": {"annotations": {"valkey.buf.red/tls-names": "old"}}});
    secrets
        .patch("demo-tls", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    cluster.reconcile(NS, "demo").await.expect("reconcile");

    let sentinel_after = template_annotations(sets.get("demo-sentinel").await.unwrap());
    assert_ne!(
        sentinel_after.get("valkey.buf.red/tls-cert"),
        Some(&served),
        "the sentinels were not rolled onto the new certificate"
    );
    assert_eq!(
        template_annotations(sets.get("demo").await.unwrap()),
        data_before,
        "the data pods reload the certificate live: their template must not change"
    );
}

#[tokio::test]
async fn scaling_down_past_the_master_switches_it_over_first_then_removes_its_pod_and_service() {
    let (cluster, mut nodes) = three_running_nodes().await;
    cluster
        .reconcile_until(NS, "demo", "phase Ready", T, ready)
        .await;
    // The master on the pod that will be removed: demo-2.
    let annotate = |value: &str| serde_json::json!({"metadata": {"annotations": {ANNOTATION_SWITCHOVER: value}}});
    cluster
        .api::<Failover>(NS)
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&annotate("demo-2")),
        )
        .await
        .expect("annotate");
    let on_two = cluster
        .reconcile_until(NS, "demo", "demo-2 as master", T, |f| {
            f.status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Ready && s.master.as_deref() == Some("demo-2"))
        })
        .await;
    let epoch = on_two.status.expect("status").epoch;
    nodes.acked_writes("demo-2", 20).await;

    // 3 -> 2: the StatefulSet keeps demo-2 until its role has moved, then drops it. The
    // replicas' agents are frozen first, so that no switchover can finish before we look.
    for agent in &mut nodes.agents[..2] {
        agent.proc_mut().signal(Signal::SIGSTOP);
    }
    cluster
        .api::<Failover>(NS)
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("scale");
    cluster.reconcile(NS, "demo").await.expect("reconcile");
    let sts = |cluster: &FakeCluster| {
        let api = cluster.api::<StatefulSet>(NS);
        async move {
            api.get("demo")
                .await
                .expect("sts")
                .spec
                .and_then(|s| s.replicas)
        }
    };
    let now = cluster.failover(NS, "demo").await;
    assert_eq!(now.status.and_then(|s| s.master).as_deref(), Some("demo-2"));
    assert_eq!(
        sts(&cluster).await,
        Some(3),
        "demo-2's pod removed while master"
    );
    for agent in &mut nodes.agents[..2] {
        agent.proc_mut().signal(Signal::SIGCONT);
    }
    let moved = cluster
        .reconcile_until(NS, "demo", "the master moved off demo-2", T, |f| {
            f.status.as_ref().is_some_and(|s| {
                s.master.as_deref().is_some_and(|m| m != "demo-2")
                    && s.last_failover_reason.as_deref() == Some("planned switchover")
            })
        })
        .await;
    // Planned, not a failover. (An attempt that meets a replica just thawed, whose report is
    // stale, is undone and retried under a new epoch, so the epoch may move by more than one.)
    let status = moved.status.expect("status");
    assert!(status.epoch > epoch);
    assert_eq!(
        status.last_failover_from.as_deref(),
        Some("demo-2"),
        "{status:#?}"
    );
    let services = cluster.api::<Service>(NS);
    wait_for(
        "the StatefulSet at 2 and demo-2's Service gone",
        T,
        || async {
            cluster.reconcile(NS, "demo").await.expect("reconcile");
            let gone = services.get_opt("demo-2").await.expect("get").is_none();
            (sts(&cluster).await == Some(2) && gone).then_some(())
        },
    )
    .await;
    assert!(services.get_opt("demo-1").await.expect("get").is_some());
    // The writes acknowledged on demo-2 are on the new master.
    assert_eq!(
        nodes.keys(status.master.as_deref().expect("master")).await,
        20
    );
}
