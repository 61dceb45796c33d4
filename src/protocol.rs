//! The messages that travel on a stream, shared by the node and the client library.
//!
//! Every request is one bidirectional QUIC stream: the opener writes a [`StreamHeader`] frame,
//! then one request frame whose type depends on the header's kind ([`ClientRequest`] for
//! `Client`, [`AdminRequest`] for `Admin`, …). The acceptor answers with one
//! `Result<Response, WireError>` frame and finishes the stream. Refusals that happen before the
//! body is read (unknown kind, malformed header, permission denied) are sent as
//! `Result::<(), WireError>::Err`, which postcard encodes exactly like the `Err` of any other
//! response type, so the opener always decodes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::access::{ApiKeyInfo, ApiKeyRecord, KeyRole};
use crate::index::{SearchRequest, SearchResponse, StoredDocument};
pub use crate::raft::types::RequestId;
/// The Raft stream's messages belong to `raft` (which knows openraft's types); they are part of
/// the protocol all the same, and versioned with it.
pub use crate::raft::wire::{RaftRequest, RaftResponse};
pub use crate::transport::stream::{ErrorCode, LeaderHint, StreamHeader, StreamKind, WireError};

/// A document to put. `id: None` means the document carries its own `_id` (bulk NDJSON lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentInput {
    pub id: Option<String>,
    pub document_json: String,
}

/// How fresh a search must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Consistency {
    /// This node's committed index.
    #[default]
    Local,
    /// The leader's committed index.
    Leader,
    /// The leader's index after a read-index check: never older than a write acknowledged before
    /// the search began.
    Linearizable,
}

/// Most operations one write request may carry (also the bound its decoding enforces); larger
/// loads are split by the client.
pub const MAX_OPERATIONS_PER_REQUEST: usize = 100_000;

/// Requests on a `Client` stream. Every write carries a [`RequestId`] the caller draws once and
/// sends again with every retry: the cluster applies each id at most once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    Put {
        #[serde(deserialize_with = "crate::bounded::vec_of_at_most::<_, _, MAX_OPERATIONS_PER_REQUEST>")]
        documents: Vec<DocumentInput>,
        request_id: RequestId,
    },
    Delete {
        #[serde(deserialize_with = "crate::bounded::vec_of_at_most::<_, _, MAX_OPERATIONS_PER_REQUEST>")]
        ids: Vec<String>,
        request_id: RequestId,
    },
    Get {
        id: String,
    },
    Commit {
        request_id: RequestId,
    },
    Rollback {
        request_id: RequestId,
    },
    Merge {
        request_id: RequestId,
    },
    Search {
        request: SearchRequest,
        consistency: Consistency,
    },
    Schema,
    /// A search in the JSON query language (`index::JsonSearchRequest`: Elasticsearch's request
    /// body), as JSON text: the language is JSON, and postcard cannot carry arbitrary JSON
    /// values.
    SearchJson {
        body_json: String,
        consistency: Consistency,
    },
    /// How many documents match a JSON query (`None`: all).
    CountJson {
        query_json: Option<String>,
        consistency: Consistency,
    },
}

impl ClientRequest {
    pub fn name(&self) -> &'static str {
        match self {
            ClientRequest::Put { .. } => "put",
            ClientRequest::Delete { .. } => "delete",
            ClientRequest::Get { .. } => "get",
            ClientRequest::Commit { .. } => "commit",
            ClientRequest::Rollback { .. } => "rollback",
            ClientRequest::Merge { .. } => "merge",
            ClientRequest::Search { .. } => "search",
            ClientRequest::Schema => "schema",
            ClientRequest::SearchJson { .. } => "search_json",
            ClientRequest::CountJson { .. } => "count_json",
        }
    }

    /// Whether the request goes through the replicated log.
    pub fn is_write(&self) -> bool {
        self.request_id().is_some()
    }

    /// The request id of a write; `None` for reads.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            ClientRequest::Put { request_id, .. }
            | ClientRequest::Delete { request_id, .. }
            | ClientRequest::Commit { request_id }
            | ClientRequest::Rollback { request_id }
            | ClientRequest::Merge { request_id } => Some(*request_id),
            ClientRequest::Get { .. }
            | ClientRequest::Search { .. }
            | ClientRequest::Schema
            | ClientRequest::SearchJson { .. }
            | ClientRequest::CountJson { .. } => None,
        }
    }
}

/// Answers on a `Client` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// A write was applied (and, in a cluster, committed to the log).
    Written {
        operations: u64,
        applied_index: u64,
        /// The request had been applied before (an earlier attempt's answer was lost); this is
        /// its first outcome.
        duplicate: bool,
        /// The leader that committed it: the caller's next write goes straight there.
        leader: Option<LeaderHint>,
    },
    Document {
        document: Option<StoredDocument>,
    },
    Search {
        response: SearchResponse,
        node_id: u64,
        applied_index: u64,
    },
    Schema {
        schema_json: String,
    },
    /// The answer to `SearchJson`: `index::JsonSearchResponse` as JSON text.
    SearchJson {
        response_json: String,
        node_id: u64,
        applied_index: u64,
    },
    Count {
        count: u64,
        node_id: u64,
        applied_index: u64,
    },
}

/// Requests on an `Admin` stream. `Status` and `Peers` are read-only and open to client
/// certificates; the others need a node or admin certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// This node's view of the cluster, with every member asked for its own state.
    Status,
    /// This node's own state only (what `Status` asks each member).
    LocalStatus,
    Peers,
    /// A new node asks to join (node certificates only, for their own id, or a member forwarding).
    Join {
        node_id: u64,
        address: String,
        incarnation: u64,
    },
    /// Remove a member (admin or node certificates).
    Leave {
        node_id: u64,
        force: bool,
    },
    /// The leader tells a removed node that it is no longer a member (node certificates only).
    Removed {
        node_id: u64,
        incarnation: u64,
    },
    /// Adds an API key (admin certificates or admin keys only). The caller makes the key and
    /// keeps its secret: only the record, with the secret's digest, travels and is stored, and
    /// a retry under the same request id adds the same key once.
    CreateKey {
        record: ApiKeyRecord,
        request_id: RequestId,
    },
    /// The keys, without their digests (admin only).
    ListKeys,
    /// Revokes a key on every node (admin only).
    RevokeKey {
        id: String,
        request_id: RequestId,
    },
    /// Answers once this node has applied the log up to `index` (node certificates of members
    /// only): how a `refresh` makes a write visible on every member before it is acknowledged.
    WaitApplied {
        index: u64,
    },
}

impl AdminRequest {
    pub fn name(&self) -> &'static str {
        match self {
            AdminRequest::Status => "status",
            AdminRequest::LocalStatus => "local_status",
            AdminRequest::Peers => "peers",
            AdminRequest::Join { .. } => "join",
            AdminRequest::Leave { .. } => "leave",
            AdminRequest::Removed { .. } => "removed",
            AdminRequest::CreateKey { .. } => "create_key",
            AdminRequest::ListKeys => "list_keys",
            AdminRequest::RevokeKey { .. } => "revoke_key",
            AdminRequest::WaitApplied { .. } => "wait_applied",
        }
    }

    pub fn is_read_only(&self) -> bool {
        matches!(self, AdminRequest::Status | AdminRequest::LocalStatus | AdminRequest::Peers)
    }

    /// Requests only admins may make (not even a node certificate: a node never needs them, and
    /// the threat model counts node certificates of non-members among the hostile).
    pub fn is_key_management(&self) -> bool {
        matches!(self, AdminRequest::CreateKey { .. } | AdminRequest::ListKeys | AdminRequest::RevokeKey { .. })
    }
}

/// One member as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub node_id: u64,
    pub address: String,
    /// `voter` or `learner`.
    pub role: String,
    pub applied_index: u64,
    /// How many entries it is behind the highest applied index known.
    pub lag: u64,
    /// Liveness from the membership exchange: `alive`, `suspect` or `down`.
    pub state: String,
}

/// What `bayard status` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub cluster_id: Option<String>,
    pub address: String,
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub applied_index: u64,
    pub document_count: u64,
    pub segment_count: u64,
    pub version: String,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    Status(NodeStatus),
    Peers(BTreeMap<u64, String>),
    /// The node is a voter; `leader` is who admitted it, into cluster `cluster_id`.
    Joined {
        leader: u64,
        cluster_id: String,
    },
    /// The node was removed from the membership.
    Left {
        node_id: u64,
    },
    Acknowledged,
    /// A key was added or revoked, at this log index; `duplicate`: by an earlier attempt of
    /// this request (whose answer was lost).
    KeyChanged {
        applied_index: u64,
        duplicate: bool,
    },
    Keys(Vec<ApiKeyInfo>),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Today's request bytes, pinned: postcard is positional, so a new field anywhere in these
    /// types changes them. Such a change must bump `PROTOCOL_VERSION` (see docs/architecture.md).
    #[test]
    fn golden_request_bytes() {
        let search = ClientRequest::Search {
            request: SearchRequest {
                query: "title:x".into(),
                from: 2,
                limit: 10,
                exclude_count: false,
                exclude_docs: true,
                facets: vec![crate::index::FacetRequest { field: "category".into(), prefixes: vec!["/a".into()] }],
                sort: Some(crate::index::SortSpec { field: "year".into(), descending: true }),
            },
            consistency: Consistency::Linearizable,
        };
        let put = ClientRequest::Put {
            documents: vec![DocumentInput { id: Some("1".into()), document_json: "{}".into() }],
            request_id: RequestId(0x0102),
        };
        let answer: Result<ClientResponse, WireError> = Err(WireError::new(ErrorCode::ResourceExhausted, "busy"));
        assert_eq!(postcard::to_allocvec(&search).unwrap(), GOLDEN_SEARCH);
        assert_eq!(postcard::to_allocvec(&put).unwrap(), GOLDEN_PUT);
        assert_eq!(postcard::to_allocvec(&answer).unwrap(), GOLDEN_ERROR);
        assert_eq!(postcard::from_bytes::<ClientRequest>(&GOLDEN_SEARCH).unwrap(), search);
    }

    const GOLDEN_SEARCH: [u8; 35] = [
        6, 7, 116, 105, 116, 108, 101, 58, 120, 2, 10, 0, 1, 1, 8, 99, 97, 116, 101, 103, 111, 114, 121, 1, 2, 47, 97,
        1, 4, 121, 101, 97, 114, 1, 2,
    ];
    /// `Put`, one document ("1", `{}`), request id 0x0102 (a varint).
    const GOLDEN_PUT: [u8; 10] = [0, 1, 1, 1, 49, 2, 123, 125, 130, 2];
    /// `Err`, code 9 (`resource_exhausted`), "busy", no leader hint.
    const GOLDEN_ERROR: [u8; 8] = [1, 9, 4, 98, 117, 115, 121, 0];
}
