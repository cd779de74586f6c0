//! valkey-controller: the failover core (pure decisions), the agent hub (gRPC), and the local
//! runtime that wires them to real processes without a cluster.

pub mod conf_text;
pub mod core;
pub mod crd;
pub mod credentials;
pub mod driver;
pub mod engine;
pub mod external;
pub mod hub;
pub mod k8s;
pub mod lease;
pub mod local;
pub mod manifest;
pub mod sentinel;
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
