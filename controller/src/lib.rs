//! valkey-controller, in floors that only look down: the decisions (`decide/`, pure) and the
//! spec they are made from (`crd`, `validate`, `desired`), the agent hub (`hub/`), the
//! failover driver both runtimes share (`driver/`: observe once, plan, persist, dispatch,
//! switch over), and the two runtimes: Kubernetes (`k8s/`) and the local one without a
//! cluster (`local/`).

pub mod conf_text;
pub mod crd;
pub mod decide;
pub mod desired;
pub mod driver;
pub mod external;
pub mod files;
pub mod hub;
pub mod k8s;
pub mod local;
pub mod manifest;
pub mod tls;
pub mod validate;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
