//! The Raft type configuration of bayard.
//!
//! A log entry carries an [`IndexBatch`]: many index operations at once (a bulk load is one entry
//! per request, never one entry per document). The node type is openraft's `BasicNode`, whose
//! `addr` is the `host:port` other nodes dial. Snapshot data is a file: a snapshot of a large index
//! is streamed to and from disk, never held in memory whole.

use serde::{Deserialize, Serialize};

use crate::index::IndexOperation;

/// The application data of one log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexBatch {
    pub operations: Vec<IndexOperation>,
}

/// What applying one entry reports back to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BatchOutcome {
    /// Log index at which the batch was applied.
    pub applied_index: u64,
    pub operations: u64,
    /// Set when the index refused the batch's content; every replica refuses it the same way.
    pub error: Option<String>,
}

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Types bayard's Raft runs with.
    pub TypeConfig:
        D = IndexBatch,
        R = BatchOutcome,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
