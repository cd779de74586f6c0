//! The agent's local, read-only state query (AgentState.GetState): the latest report.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use valkey_proto::v1::{GetStateRequest, StateReport, agent_state_server::AgentState};

use crate::{fence::Fence, snapshot::Snapshot};

#[derive(Debug)]
pub struct StateService {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub seq: Arc<AtomicU64>,
    pub fence: Arc<Fence>,
}

#[tonic::async_trait]
impl AgentState for StateService {
    async fn get_state(
        &self,
        _request: Request<GetStateRequest>,
    ) -> Result<Response<StateReport>, Status> {
        let mut report = self.snapshots.borrow().report.clone();
        report.seq = self.seq.load(Ordering::Relaxed);
        report.epoch = self.fence.epoch();
        Ok(Response::new(report))
    }
}
