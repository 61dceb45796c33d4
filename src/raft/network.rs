//! openraft's network over the node's QUIC endpoint: each RPC is one `Raft` stream on the pooled
//! connection to the target.

use super::election::{ElectionAssist, Hint};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::types::{MemberNode, NodeId, TypeConfig};
use super::wire::{RaftRequest, RaftResponse};
use crate::transport::frame::FrameError;
use crate::transport::stream::{ErrorCode, StreamKind};
use crate::transport::{self, CallError, ConnectionPool};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

/// Frames on `Raft` streams may exceed the client frame limit by this much: a log entry holds a
/// client request (at most one frame) plus its envelope.
pub const RAFT_FRAME_OVERHEAD_BYTES: usize = 1024 * 1024;

/// The most snapshot bytes one `InstallSnapshot` message carries, under the default frame limit.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// The snapshot bytes per `InstallSnapshot` message under this frame limit (`--max-frame-bytes`):
/// a chunk of at most the frame limit, with its envelope (vote, snapshot id and membership) in
/// the overhead Raft frames have beyond it. A fixed 4 MiB chunk was refused by the sender's
/// encoder under a limit below about 3 MiB, so a node that needed a snapshot never caught up.
pub fn snapshot_chunk_bytes(max_frame_bytes: usize) -> u64 {
    SNAPSHOT_CHUNK_BYTES.min(max_frame_bytes).max(1) as u64
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportFailure(String);

/// Which peers the last RPCs failed to reach, since when and how many times: a peer that is
/// down is logged once when it goes (WARN) and once when it answers again (INFO, with the count),
/// not once per RPC (openraft retries every heartbeat).
#[derive(Debug, Default)]
struct PeerHealth {
    failing: Mutex<HashMap<NodeId, (Instant, u64)>>,
}

impl PeerHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, (Instant, u64)>> {
        self.failing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn failed(&self, target: NodeId, address: &str, reason: &str) {
        let mut failing = self.lock();
        match failing.get_mut(&target) {
            Some((_, count)) => *count += 1,
            None => {
                tracing::warn!(
                    target_node = target,
                    %address,
                    %reason,
                    "cannot reach a member; raft keeps retrying and logs again when it answers"
                );
                failing.insert(target, (Instant::now(), 1));
            }
        }
    }

    fn answered(&self, target: NodeId) {
        let recovered = self.lock().remove(&target);
        if let Some((since, failed_rpcs)) = recovered {
            tracing::info!(
                target_node = target,
                failed_rpcs,
                unreachable_ms = since.elapsed().as_millis() as u64,
                "a member answers again"
            );
        }
    }
}

/// Makes a connection object per target; all of them share the node's connection pool.
#[derive(Clone)]
pub struct Network {
    pool: Arc<ConnectionPool>,
    raft_frame_bytes: usize,
    health: Arc<PeerHealth>,
    election: ElectionAssist,
}

impl Network {
    /// Vote answers are reported to `election`.
    pub fn new(pool: Arc<ConnectionPool>, max_frame_bytes: usize, election: ElectionAssist) -> Self {
        Network {
            pool,
            raft_frame_bytes: max_frame_bytes + RAFT_FRAME_OVERHEAD_BYTES,
            health: Default::default(),
            election,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> PeerConnection {
        PeerConnection {
            target,
            address: node.addr.clone(),
            pool: self.pool.clone(),
            raft_frame_bytes: self.raft_frame_bytes,
            health: self.health.clone(),
            election: self.election.clone(),
        }
    }
}

pub struct PeerConnection {
    target: NodeId,
    address: String,
    pool: Arc<ConnectionPool>,
    raft_frame_bytes: usize,
    health: Arc<PeerHealth>,
    election: ElectionAssist,
}

/// How one RPC failed, before it is shaped into the error type of that RPC.
enum Failure {
    Unreachable(String),
    Network(String),
    TooLarge,
    Remote(String),
}

impl PeerConnection {
    async fn send(&self, request: &RaftRequest, timeout: Duration) -> Result<RaftResponse, Failure> {
        let result = self.send_once(request, timeout).await;
        match &result {
            Ok(_) | Err(Failure::Remote(_) | Failure::TooLarge) => self.health.answered(self.target),
            Err(Failure::Unreachable(reason) | Failure::Network(reason)) => {
                self.health.failed(self.target, &self.address, reason)
            }
        }
        result
    }

    async fn send_once(&self, request: &RaftRequest, timeout: Duration) -> Result<RaftResponse, Failure> {
        let connection = match request {
            RaftRequest::Vote(_) => self.pool.get_now(&self.address).await,
            _ => self.pool.get(&self.address).await,
        }
        .map_err(|error| Failure::Unreachable(error.to_string()))?;
        let answer = transport::call::<_, RaftResponse>(
            &connection,
            StreamKind::Raft,
            crate::telemetry::current_traceparent(),
            request,
            timeout,
            self.raft_frame_bytes,
        )
        .await;
        match answer {
            Ok(Ok(response)) => Ok(response),
            // A refusal (not a member yet, disk full, busy) will not change at once: back off, as
            // for an unreachable node, rather than retrying in a tight loop.
            Ok(Err(wire_error))
                if matches!(wire_error.code, ErrorCode::PermissionDenied | ErrorCode::ResourceExhausted) =>
            {
                Err(Failure::Unreachable(format!("node {} refused: {}", self.target, wire_error.message)))
            }
            Ok(Err(wire_error)) => Err(Failure::Remote(wire_error.message)),
            Err(CallError::Frame(FrameError::TooLarge { .. })) => Err(Failure::TooLarge),
            // A connection that ended or went silent is dropped, so the next RPC dials afresh (a
            // node restarted at the same address answers a new connection at once).
            Err(error @ (CallError::Connection(_) | CallError::PeerSilent(_))) => {
                self.pool.forget(&self.address);
                Err(Failure::Unreachable(error.to_string()))
            }
            Err(error @ CallError::TimedOut(_)) => {
                self.pool.forget(&self.address);
                Err(Failure::Network(error.to_string()))
            }
            Err(error) => Err(Failure::Network(error.to_string())),
        }
    }

    fn rpc_error<E: std::error::Error>(&self, failure: Failure, entries: usize) -> RPCError<NodeId, MemberNode, E> {
        match failure {
            Failure::Unreachable(message) => RPCError::Unreachable(Unreachable::new(&TransportFailure(message))),
            Failure::Network(message) | Failure::Remote(message) => {
                RPCError::Network(NetworkError::new(&TransportFailure(format!("node {}: {message}", self.target))))
            }
            // Ask openraft to send fewer entries per message; one entry always fits.
            Failure::TooLarge => {
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint((entries as u64 / 2).max(1)))
            }
        }
    }

    fn unexpected<E: std::error::Error>(&self, what: &str) -> RPCError<NodeId, MemberNode, E> {
        RPCError::Network(NetworkError::new(&TransportFailure(format!(
            "node {} answered {what} with another kind of response",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        match self.send(&RaftRequest::AppendEntries(rpc), option.hard_ttl()).await {
            Ok(RaftResponse::AppendEntries(Ok(response))) => Ok(response),
            Ok(RaftResponse::AppendEntries(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(_) => Err(self.unexpected("append_entries")),
            Err(failure) => Err(self.rpc_error(failure, entries)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.send(&RaftRequest::InstallSnapshot(rpc), option.hard_ttl()).await {
            Ok(RaftResponse::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(RaftResponse::InstallSnapshot(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(_) => Err(self.unexpected("install_snapshot")),
            Err(failure) => Err(self.rpc_error(failure, 1)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        let request = rpc.clone();
        match self.send(&RaftRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(RaftResponse::Vote(Ok(response))) => {
                self.election.report(Hint::Asked { request, response: response.clone() });
                Ok(response)
            }
            Ok(RaftResponse::Vote(Err(error))) => Err(RPCError::RemoteError(RemoteError::new(self.target, error))),
            Ok(_) => Err(self.unexpected("vote")),
            Err(failure) => Err(self.rpc_error(failure, 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunks_fit_the_frame_limit() {
        for (max_frame_bytes, chunk) in [
            (crate::transport::DEFAULT_MAX_FRAME_BYTES, SNAPSHOT_CHUNK_BYTES as u64),
            (SNAPSHOT_CHUNK_BYTES, SNAPSHOT_CHUNK_BYTES as u64),
            (1024 * 1024, 1024 * 1024),
            (65_536, 65_536),
            (0, 1),
        ] {
            assert_eq!(snapshot_chunk_bytes(max_frame_bytes), chunk, "--max-frame-bytes {max_frame_bytes}");
        }
    }
}
