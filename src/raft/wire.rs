//! The messages of `Raft` streams: openraft's three RPCs, and `Propose`, which carries a write
//! another node accepted from a client to the leader. They live here, next to the openraft
//! types they wrap; `protocol` re-exports them, and they are versioned with it.

use serde::{Deserialize, Serialize};

use super::types::{BatchOutcome, IndexBatch, NodeId, TypeConfig};

/// Requests on a `Raft` stream (node certificates only). The first three are openraft's RPCs;
/// `Propose` carries a write another node accepted from a client, to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(openraft::raft::AppendEntriesRequest<TypeConfig>),
    Vote(openraft::raft::VoteRequest<NodeId>),
    InstallSnapshot(openraft::raft::InstallSnapshotRequest<TypeConfig>),
    Propose(IndexBatch),
}

impl RaftRequest {
    pub fn name(&self) -> &'static str {
        match self {
            RaftRequest::AppendEntries(_) => "append_entries",
            RaftRequest::Vote(_) => "vote",
            RaftRequest::InstallSnapshot(_) => "install_snapshot",
            RaftRequest::Propose(_) => "propose",
        }
    }

    /// The node the message says it comes from, for the RPCs that name one.
    pub fn claimed_sender(&self) -> Option<NodeId> {
        let vote = match self {
            RaftRequest::AppendEntries(request) => &request.vote,
            RaftRequest::Vote(request) => &request.vote,
            RaftRequest::InstallSnapshot(request) => &request.vote,
            RaftRequest::Propose(_) => return None,
        };
        Some(vote.leader_id().voted_for().unwrap_or_default())
    }
}

/// Answers on a `Raft` stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    AppendEntries(Result<openraft::raft::AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    Vote(Result<openraft::raft::VoteResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    InstallSnapshot(
        Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
    ),
    Proposed(BatchOutcome),
}
