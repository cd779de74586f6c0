//! Where the hot path keeps the durable state (epoch, master, last failover, a pending
//! switchover): a file locally, one status patch in Kubernetes. It is written before any
//! command that depends on it is sent, and only when it changed.

use std::future::Future;

use crate::decide::model::Durable;

/// The durable state could not be written: nothing that depends on it is sent, and the next
/// pass tries again.
#[derive(Debug, thiserror::Error)]
#[error("persisting the failover state: {0}")]
pub struct StoreError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    pub fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError(Box::new(err))
    }
}

/// The durable state's home. Loading happens once, when the instance's driver is made.
pub trait DurableStore {
    /// Writes `durable`; returns once it is durable.
    fn save(&self, durable: &Durable) -> impl Future<Output = Result<(), StoreError>> + Send;
}
