//! Liveness and readiness, decided from the latest observation (pure), and served as
//! grpc.health.v1 for kubelet probes: service "" is liveness, service "readiness" readiness.

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};
use valkey_proto::v1::{DataState, Health, ProcessState, Role};

use crate::snapshot::Snapshot;

/// The grpc.health.v1 service name kubelet's readiness probe asks for.
pub const READINESS_SERVICE: &str = "readiness";

/// Whether the process answers, and whether it serves in its role.
pub fn assess(process: ProcessState, data: Option<&DataState>) -> Health {
    let not_ready = |live: bool, reason: String| Health {
        live,
        ready: false,
        reason,
    };
    match process {
        ProcessState::Down => return not_ready(false, "the local process is down".into()),
        ProcessState::Hung => return not_ready(false, "the local process does not answer".into()),
        ProcessState::Unspecified => return not_ready(false, "not probed yet".into()),
        ProcessState::Loading => return not_ready(true, "loading the dataset".into()),
        ProcessState::Busy => return not_ready(true, "busy running a script".into()),
        ProcessState::AuthFailed => {
            return not_ready(true, "the agent's credentials are refused".into());
        }
        ProcessState::Up => {}
    }
    let Some(data) = data else {
        // A sentinel that answers is serving.
        return Health {
            live: true,
            ready: true,
            reason: String::new(),
        };
    };
    if data.loading {
        return not_ready(true, "loading the dataset".into());
    }
    match data.role() {
        Role::Master => {
            let min = data.min_replicas_to_write as usize;
            let good = data
                .replicas
                .iter()
                .filter(|r| r.state == "online")
                .filter(|r| {
                    data.min_replicas_max_lag == 0
                        || r.lag_s <= i64::from(data.min_replicas_max_lag)
                })
                .count();
            if min > 0 && good < min {
                not_ready(
                    true,
                    format!(
                        "master refuses writes: {good} of the {min} replicas min-replicas-to-write asks for"
                    ),
                )
            } else {
                Health {
                    live: true,
                    ready: true,
                    reason: String::new(),
                }
            }
        }
        Role::Replica if data.master_link_up && !data.master_sync_in_progress => Health {
            live: true,
            ready: true,
            reason: String::new(),
        },
        Role::Replica => not_ready(
            true,
            format!(
                "replica link to {}:{} is down",
                data.master_host, data.master_port
            ),
        ),
        Role::Unspecified | Role::Sentinel => not_ready(true, "unknown role".into()),
    }
}

fn status(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Keeps the grpc.health.v1 statuses in step with the watcher until `stopping` turns true, then
/// reports not ready (the pod is going away).
pub async fn serve_status(
    reporter: HealthReporter,
    mut snapshots: watch::Receiver<std::sync::Arc<Snapshot>>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let health = snapshots
            .borrow_and_update()
            .report
            .health
            .clone()
            .unwrap_or_default();
        let stop = *stopping.borrow_and_update();
        reporter.set_service_status("", status(health.live)).await;
        reporter
            .set_service_status(READINESS_SERVICE, status(health.ready && !stop))
            .await;
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            changed = stopping.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use valkey_proto::v1::ReplicaInfo;

    use super::*;

    fn master(min: u32, replicas: &[(&str, i64)]) -> DataState {
        DataState {
            role: Role::Master.into(),
            min_replicas_to_write: min,
            min_replicas_max_lag: 10,
            replicas: replicas
                .iter()
                .map(|(state, lag)| ReplicaInfo {
                    state: (*state).into(),
                    lag_s: *lag,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        let replica_up = DataState {
            role: Role::Replica.into(),
            master_link_up: true,
            ..Default::default()
        };
        let replica_down = DataState {
            master_link_up: false,
            master_host: "h".into(),
            master_port: 1,
            ..replica_up.clone()
        };
        let loading = DataState {
            loading: true,
            ..replica_up.clone()
        };
        let cases = [
            (ProcessState::Up, Some(master(0, &[])), true, true),
            (
                ProcessState::Up,
                Some(master(1, &[("online", 0)])),
                true,
                true,
            ),
            (
                ProcessState::Up,
                Some(master(1, &[("online", 30)])),
                true,
                false,
            ),
            (
                ProcessState::Up,
                Some(master(2, &[("online", 0), ("wait_bgsave", 0)])),
                true,
                false,
            ),
            (ProcessState::Up, Some(replica_up), true, true),
            (ProcessState::Up, Some(replica_down), true, false),
            (ProcessState::Up, Some(loading), true, false),
            (ProcessState::Loading, None, true, false),
            (ProcessState::Busy, None, true, false),
            (ProcessState::AuthFailed, None, true, false),
            (ProcessState::Hung, None, false, false),
            (ProcessState::Down, None, false, false),
            (ProcessState::Unspecified, None, false, false),
            (ProcessState::Up, None, true, true),
        ];
        for (process, data, live, ready) in cases {
            let health = assess(process, data.as_ref());
            assert_eq!(
                (health.live, health.ready),
                (live, ready),
                "{process:?} {data:?}"
            );
            assert_eq!(health.reason.is_empty(), ready, "{health:?}");
        }
    }
}
