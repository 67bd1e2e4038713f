//! The gRPC `AgentService`.
//!
//! The listener is bound and served from the first release so that agents and
//! load balancers can reach it; enrollment and the session protocol are built
//! on top of the ingest, correlate and push modules.

use std::pin::Pin;

use fleetban_proto::v1::agent_service_server::AgentService;
use fleetban_proto::v1::{AgentFrame, EnrollRequest, EnrollResponse, ServerFrame};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct Service {
    pool: sqlx::PgPool,
}

impl Service {
    /// A service backed by `pool`.
    pub fn new(pool: sqlx::PgPool) -> Self {
        Service { pool }
    }

    /// The database pool.
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for Service {
    async fn enroll(&self, _request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        Err(Status::unimplemented("enrollment is not available in this server version"))
    }

    type ConnectStream = FrameStream;

    async fn connect(&self, _request: Request<Streaming<AgentFrame>>) -> Result<Response<Self::ConnectStream>, Status> {
        Err(Status::unimplemented("agent sessions are not available in this server version"))
    }
}
