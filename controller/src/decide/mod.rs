//! The decision floor: pure functions from what the agents and sentinels report (and the
//! durable state) to a plan. Both runtimes' drivers call it; it imports nothing above it (no
//! hub, engine, driver, Kubernetes, local runtime or CRD types), which `tests/tests/layers.rs`
//! checks.

pub mod cause;
pub mod credentials;
pub mod lease;
pub mod manual;
pub mod model;
pub mod sentinel;
pub mod switchover;

pub use cause::Cause;
