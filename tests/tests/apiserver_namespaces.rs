//! A controller scoped to a list of namespaces, on the real API server with the RBAC that
//! `deploy/multi-namespace/` renders (moved to the test's namespaces): it runs the Failovers of
//! each namespace it is given, and touches nothing in one it was not given (it has no right
//! there either).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use k8s_openapi::api::{apps::v1::StatefulSet, core::v1::Secret};
use kube::{Api, api::PostParams};
use valkey_controller::crd::{Failover, FailoverSpec, Phase};
use valkey_e2e::{
    apiserver,
    cluster::{Cluster, Install, Kubelet},
    k8s::{failover, password_secret},
    procs::PASSWORD,
    wait_for,
};

const T: Duration = Duration::from_secs(60);

async fn create_in(admin: &kube::Client, ns: &str) {
    let mut secret = password_secret("demo-password", PASSWORD);
    secret.metadata.namespace = Some(ns.to_owned());
    Api::<Secret>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("the password Secret in {ns}: {e}"));
    let mut demo = failover(
        "demo",
        FailoverSpec {
            replicas: 1,
            ..FailoverSpec::default()
        },
    );
    demo.metadata.namespace = Some(ns.to_owned());
    Api::<Failover>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &demo)
        .await
        .unwrap_or_else(|e| panic!("the Failover in {ns}: {e}"));
}

#[tokio::test]
async fn a_controller_given_several_namespaces_runs_the_failovers_of_each_and_no_other() {
    let cluster = Cluster::start_with(Install::MultiNamespace, &[]).await;
    let admin = cluster.admin.clone();
    let hub = format!("https://127.0.0.1:{}", cluster.hub.port);
    // The pods of each namespace it manages run (the test namespace has its own stand-in).
    let _kubelets: Vec<Kubelet> = cluster.watched[1..]
        .iter()
        .map(|ns| Kubelet::start(&admin, ns, hub.clone()))
        .collect();
    let outside = apiserver::test_namespace(&admin, "outside", &[]).await;
    for ns in cluster.watched.iter().chain([&outside]) {
        create_in(&admin, ns).await;
    }
    for ns in &cluster.watched {
        let api: Api<Failover> = Api::namespaced(admin.clone(), ns);
        wait_for(&format!("demo in {ns} Ready"), T, || async {
            let f = api.get("demo").await.ok()?;
            f.status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Ready)
                .then_some(())
        })
        .await;
    }
    // By now the controller has been through every Failover it can see: the one outside has
    // neither status nor objects.
    let unseen: Failover = Api::namespaced(admin.clone(), &outside)
        .get("demo")
        .await
        .unwrap();
    assert!(unseen.status.is_none(), "{:?}", unseen.status);
    let sets: Api<StatefulSet> = Api::namespaced(admin.clone(), &outside);
    assert!(sets.get_opt("demo").await.unwrap().is_none());
    assert!(unseen.metadata.finalizers.is_none_or(|f| f.is_empty()));
}
