//! Calls from this node to other nodes, with the node's own certificate, over its connection
//! pool: one request and one answer per stream.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{ErrorCode, StreamKind, WireError};
use crate::raft::network::RAFT_FRAME_OVERHEAD_BYTES;
use crate::transport::{self, ConnectionPool};

fn unavailable(message: String) -> WireError {
    WireError::new(ErrorCode::Unavailable, message)
}

/// The node's way of calling its peers.
#[derive(Clone)]
pub struct PeerClient {
    pool: Arc<ConnectionPool>,
    frame_limit: usize,
    trust_domain: String,
}

impl PeerClient {
    pub fn new(pool: Arc<ConnectionPool>, max_frame_bytes: usize, trust_domain: String) -> Self {
        PeerClient { pool, frame_limit: max_frame_bytes + RAFT_FRAME_OVERHEAD_BYTES, trust_domain }
    }

    /// One request/answer on a stream of `kind` to the node at `address`. A transport failure is
    /// `unavailable` (and the pooled connection is dropped, so the next call dials again).
    pub async fn call<Request: Serialize, Response: DeserializeOwned>(
        &self,
        address: &str,
        kind: StreamKind,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, WireError> {
        let connection = self.connection(address).await?;
        self.send(&connection, address, kind, request, timeout).await
    }

    /// Like [`PeerClient::call`], bounded by `deadline` rather than a duration: the time left is
    /// measured once the connection is there, so a slow dial does not stretch the call past the
    /// deadline (the peer gets what is left, in the stream header).
    pub async fn call_until<Request: Serialize, Response: DeserializeOwned>(
        &self,
        address: &str,
        kind: StreamKind,
        request: &Request,
        deadline: std::time::Instant,
    ) -> Result<Response, WireError> {
        let connection = self.connection(address).await?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(WireError::new(
                ErrorCode::DeadlineExceeded,
                "the request's deadline passed before it was sent",
            ));
        }
        self.send(&connection, address, kind, request, left).await
    }

    async fn connection(&self, address: &str) -> Result<quinn::Connection, WireError> {
        self.pool.get(address).await.map_err(|error| unavailable(format!("cannot reach {address}: {error}")))
    }

    async fn send<Request: Serialize, Response: DeserializeOwned>(
        &self,
        connection: &quinn::Connection,
        address: &str,
        kind: StreamKind,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, WireError> {
        let trace_context = crate::telemetry::current_traceparent();
        match transport::call::<Request, Response>(connection, kind, trace_context, request, timeout, self.frame_limit)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                self.pool.forget(address);
                Err(unavailable(format!("{address} did not answer: {error}")))
            }
        }
    }

    /// Like [`PeerClient::call`], to the node that must be `node_id`: the answer is only taken
    /// from a peer whose certificate names that node (an answer speaks for its sender).
    pub async fn call_node<Request: Serialize, Response: DeserializeOwned>(
        &self,
        node_id: u64,
        address: &str,
        kind: StreamKind,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, WireError> {
        // The answer comes over the very connection whose certificate was checked.
        let connection = self.verified_connection(node_id, address).await?;
        self.send(&connection, address, kind, request, timeout).await
    }

    /// Dials `address` and checks that the node there presents the certificate of `node_id`:
    /// a request forwarded by a member must not admit an impostor, and only the node the
    /// membership names may vouch.
    pub async fn verify_node_at(&self, node_id: u64, address: &str) -> Result<(), WireError> {
        self.verified_connection(node_id, address).await.map(|_| ())
    }

    async fn verified_connection(&self, node_id: u64, address: &str) -> Result<quinn::Connection, WireError> {
        let connection = self
            .pool
            .get(address)
            .await
            .map_err(|error| unavailable(format!("cannot reach node {node_id}: {error}")))?;
        let peer = transport::identity::peer_of_connection(&connection, &self.trust_domain)
            .map_err(|error| WireError::new(ErrorCode::PermissionDenied, error.to_string()))?;
        if peer.role != (transport::Role::Node { node_id }) {
            return Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "permission denied: the node at {address} presents the certificate of {}, not node/{node_id}",
                    peer.role
                ),
            ));
        }
        Ok(connection)
    }
}
