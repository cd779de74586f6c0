//! Rolling restarts, driven by the controller rather than the StatefulSet (whose update
//! strategy is OnDelete): when the pod template changes (image, resources, or a setting that
//! only a restart applies), pods are restarted one at a time, replicas first, and the master
//! last, after a switchover has made it a replica. Nothing is restarted unless the instance is
//! whole (Ready) at that moment.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The label the StatefulSet controller puts on each pod: the template revision it runs.
pub const REVISION_LABEL: &str = "controller-revision-hash";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Everything runs the current template (or it is not the time).
    Nothing,
    /// Delete this replica pod; the StatefulSet recreates it from the new template.
    Restart(String),
    /// Only the master is left: move its role first.
    SwitchoverFirst(String),
}

fn ordinal(name: &str) -> i64 {
    name.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

/// What to do now, from the pods, the StatefulSet's update revision and the master.
pub fn next_step(
    pods: &[Pod],
    update_revision: Option<&str>,
    master: Option<&str>,
    ready: bool,
) -> Step {
    let Some(revision) = update_revision.filter(|r| !r.is_empty()) else {
        return Step::Nothing;
    };
    if !ready || pods.iter().any(|p| p.metadata.deletion_timestamp.is_some()) {
        return Step::Nothing;
    }
    let mut stale: Vec<String> = pods
        .iter()
        .filter(|p| p.labels().get(REVISION_LABEL).map(String::as_str) != Some(revision))
        .map(|p| p.name_any())
        .collect();
    stale.sort_by_key(|name| std::cmp::Reverse(ordinal(name)));
    if let Some(replica) = stale.iter().find(|p| Some(p.as_str()) != master) {
        return Step::Restart(replica.clone());
    }
    match stale.first() {
        Some(master) => Step::SwitchoverFirst(master.clone()),
        None => Step::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, revision: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(REVISION_LABEL.to_owned(), revision.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn replicas_first_highest_ordinal_then_the_master_after_a_switchover() {
        let pods = [
            pod("demo-0", "v1"),
            pod("demo-1", "v1"),
            pod("demo-2", "v2"),
        ];
        let master = Some("demo-1");
        assert_eq!(
            next_step(&pods, Some("v2"), master, true),
            Step::Restart("demo-0".into())
        );
        let pods = [
            pod("demo-0", "v2"),
            pod("demo-1", "v1"),
            pod("demo-2", "v2"),
        ];
        assert_eq!(
            next_step(&pods, Some("v2"), master, true),
            Step::SwitchoverFirst("demo-1".into())
        );
        assert_eq!(
            next_step(&pods, Some("v2"), Some("demo-0"), true),
            Step::Restart("demo-1".into())
        );
        let done = [pod("demo-0", "v2"), pod("demo-1", "v2")];
        assert_eq!(next_step(&done, Some("v2"), master, true), Step::Nothing);
    }

    #[test]
    fn nothing_while_the_instance_is_not_whole() {
        let pods = [pod("demo-0", "v1"), pod("demo-1", "v1")];
        assert_eq!(
            next_step(&pods, Some("v2"), Some("demo-0"), false),
            Step::Nothing
        );
        assert_eq!(next_step(&pods, None, Some("demo-0"), true), Step::Nothing);
        let mut going = pod("demo-1", "v1");
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(
            next_step(
                &[pod("demo-0", "v1"), going],
                Some("v2"),
                Some("demo-0"),
                true
            ),
            Step::Nothing
        );
    }
}
