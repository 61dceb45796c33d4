//! The Raft type configuration of bayard.
//!
//! A log entry carries an [`IndexBatch`]: many index operations at once (a bulk load is one entry
//! per request, never one entry per document). A member is a [`MemberNode`]: the `host:port` other
//! nodes dial, and the incarnation of the data directory it was admitted with. Snapshot data is a file: a snapshot of a large index
//! is streamed to and from disk, never held in memory whole.

use serde::{Deserialize, Serialize};

use crate::access::KeyChange;
use crate::index::IndexOperation;

/// The application data of one log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexBatch {
    pub operations: Vec<IndexOperation>,
    /// The client request this batch carries out, when it came from one: the state machine
    /// applies each request id at most once (see `raft::dedup`), so a request retried after a
    /// lost answer is not applied twice. Last, so that an entry of log format 1 (which ended with
    /// the operations) is this one with `None` appended.
    pub request_id: Option<RequestId>,
    /// A change to the API keys (`access`), applied with the batch. An entry of log format 2
    /// is this one with `None` appended.
    pub keys: Option<KeyChange>,
    /// More client requests carried by the same log entry (group commit, `cluster::group_commit`),
    /// applied after this one, in order, each with its own request id and outcome. Only plain
    /// requests are grouped (puts and deletes, no key change): a commit inside a group would
    /// record a log id whose later requests it does not contain. Last, so that an entry of log
    /// format 3 is this one with an empty list appended.
    pub grouped: Vec<GroupedRequest>,
    /// When the leader proposed the entry, in Unix milliseconds (0: not stamped, as in entries
    /// of log format 4 and before). The state machine's request table ages by these stamps
    /// (`raft::dedup`), so its clock is part of the log, alike on every replica. Last, so that
    /// an entry of log format 4 is this one with 0 appended.
    pub proposed_at_ms: u64,
}

/// Client requests in one log entry, at most (the entry's own and its grouped ones). The leader
/// groups no more; an entry with more is refused whole, alike on every replica.
pub const MAX_REQUESTS_PER_ENTRY: usize = 1024;

/// A client request riding in another's log entry: puts and deletes only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupedRequest {
    pub operations: Vec<IndexOperation>,
    pub request_id: RequestId,
}

impl IndexBatch {
    /// A batch no client asked for (automatic commits): never deduplicated.
    pub fn internal(operations: Vec<IndexOperation>) -> Self {
        IndexBatch { operations, request_id: None, keys: None, grouped: Vec::new(), proposed_at_ms: 0 }
    }

    /// The operations of one client request, applied at most once.
    pub fn of_request(operations: Vec<IndexOperation>, request_id: RequestId) -> Self {
        IndexBatch { operations, request_id: Some(request_id), keys: None, grouped: Vec::new(), proposed_at_ms: 0 }
    }
}

/// Names one client request across all its retries, to whichever node they go: drawn at random
/// by whoever first sends the request (the client library, or the node a request without one
/// reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u128);

impl RequestId {
    pub fn random() -> Self {
        RequestId(rand::random())
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{:032x}", self.0)
    }
}

/// What applying one entry reports back to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BatchOutcome {
    /// Log index at which the batch was applied.
    pub applied_index: u64,
    pub operations: u64,
    /// Set when the index refused the batch's content; every replica refuses it the same way.
    pub error: Option<String>,
    /// The batch's request id had been applied before (at `applied_index`): this entry changed
    /// nothing, and the outcome is the first one's.
    pub duplicate: bool,
    /// The outcomes of the entry's grouped requests (`IndexBatch::grouped`), in order. Never on
    /// the wire: the leader hands each proposer its own outcome.
    #[serde(skip)]
    pub grouped: Vec<BatchOutcome>,
}

pub type NodeId = u64;

/// A member as the Raft membership records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    /// `host:port` other nodes and clients dial.
    pub addr: String,
    /// The incarnation of the data directory the member joined with: a node that lost its data
    /// comes back with another one, and is not the same member.
    pub incarnation: u64,
}

impl MemberNode {
    pub fn new(addr: impl Into<String>, incarnation: u64) -> Self {
        MemberNode { addr: addr.into(), incarnation }
    }
}

impl std::fmt::Display for MemberNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} (incarnation {:x})", self.addr, self.incarnation)
    }
}

/// A log entry's batch, shared: the log keeps its newest entries in memory
/// (`raft::recent_entries`), and every read of one (to apply it, to send it to each follower) is
/// then a reference count, not a copy of its documents. serde writes an `Arc` as what it holds,
/// so the log and the wire carry the batch's bytes exactly as before.
pub type SharedBatch = std::sync::Arc<IndexBatch>;

openraft::declare_raft_types!(
    /// Types bayard's Raft runs with.
    pub TypeConfig:
        D = SharedBatch,
        R = BatchOutcome,
        NodeId = NodeId,
        Node = MemberNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MemberNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MemberNode>;
pub type StorageError = openraft::StorageError<NodeId>;
