//! valkey-controller, in floors that only look down: the decisions (`decide/`, pure), the
//! agent hub (`hub/`), the failover driver both runtimes share (`driver/`, with the dispatch in
//! `engine.rs` and the switchover in `switchover.rs`), and the two runtimes: Kubernetes (`k8s/`)
//! and the local one without a cluster (`local/`).

pub mod conf_text;
pub mod crd;
pub mod decide;
pub mod driver;
pub mod engine;
pub mod external;
pub mod files;
pub mod hub;
pub mod k8s;
pub mod local;
pub mod manifest;
pub mod switchover;
pub mod tls;
pub mod validate;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
