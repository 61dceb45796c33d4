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
    /// A chunk's bytes go as one byte string (`snapshot_chunk`), not as openraft's derive writes
    /// a `Vec<u8>`, a sequence visited one number at a time: postcard writes both as the length
    /// and the bytes, so the wire is the same, but a 4 MiB chunk is measured by its length and
    /// copied whole when it is encoded and decoded.
    InstallSnapshot(#[serde(with = "snapshot_chunk")] openraft::raft::InstallSnapshotRequest<TypeConfig>),
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

/// openraft's `InstallSnapshotRequest`, field for field in its order, with `data` as a byte string.
mod snapshot_chunk {
    use std::fmt;

    use openraft::raft::InstallSnapshotRequest;
    use openraft::{SnapshotMeta, Vote};
    use serde::de::{Deserializer, Visitor};
    use serde::ser::Serializer;
    use serde::{Deserialize, Serialize};

    use crate::raft::types::{MemberNode, NodeId, TypeConfig};

    type Request = InstallSnapshotRequest<TypeConfig>;

    #[derive(Serialize)]
    struct ChunkRef<'a> {
        vote: &'a Vote<NodeId>,
        meta: &'a SnapshotMeta<NodeId, MemberNode>,
        offset: u64,
        data: BytesRef<'a>,
        done: bool,
    }

    #[derive(Deserialize)]
    struct Chunk {
        vote: Vote<NodeId>,
        meta: SnapshotMeta<NodeId, MemberNode>,
        offset: u64,
        data: OwnedBytes,
        done: bool,
    }

    struct BytesRef<'a>(&'a [u8]);

    impl Serialize for BytesRef<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    struct OwnedBytes(Vec<u8>);

    impl<'de> Deserialize<'de> for OwnedBytes {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_byte_buf(BytesVisitor).map(OwnedBytes)
        }
    }

    /// postcard hands a byte string over as one slice of the frame, after checking that the
    /// frame holds that many bytes; nothing else decodes these messages.
    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("the bytes of a snapshot chunk")
        }

        fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(bytes)
        }
    }

    pub(super) fn serialize<S: Serializer>(request: &Request, serializer: S) -> Result<S::Ok, S::Error> {
        ChunkRef {
            vote: &request.vote,
            meta: &request.meta,
            offset: request.offset,
            data: BytesRef(&request.data),
            done: request.done,
        }
        .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Request, D::Error> {
        let chunk = Chunk::deserialize(deserializer)?;
        Ok(InstallSnapshotRequest {
            vote: chunk.vote,
            meta: chunk.meta,
            offset: chunk.offset,
            data: chunk.data.0,
            done: chunk.done,
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, Vote};
    use serde::{Deserialize, Serialize};

    use super::*;

    /// `RaftRequest` as openraft's derives alone write it (what nodes before the byte-string
    /// chunks sent): the same variants in the same order.
    #[derive(Serialize, Deserialize)]
    enum DerivedRaftRequest {
        AppendEntries(openraft::raft::AppendEntriesRequest<TypeConfig>),
        Vote(openraft::raft::VoteRequest<NodeId>),
        InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
        Propose(IndexBatch),
    }

    fn chunk(data: Vec<u8>) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 10)),
                last_membership: StoredMembership::default(),
                snapshot_id: "3-10-00ff00ff".to_string(),
            },
            offset: 8 * 1024 * 1024,
            data,
            done: true,
        }
    }

    /// The byte-string chunk is the bytes openraft's derive wrote, both ways, with length
    /// prefixes of 1, 2, 3 and 4 bytes, up to the 4 MiB a node sends.
    #[test]
    fn a_snapshot_chunk_is_the_bytes_openrafts_derive_wrote() {
        for length in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000, 4 << 20] {
            let data: Vec<u8> = (0..length).map(|number| (number * 7 % 251) as u8).collect();
            let ours = postcard::to_stdvec(&RaftRequest::InstallSnapshot(chunk(data.clone()))).unwrap();
            let derived = postcard::to_stdvec(&DerivedRaftRequest::InstallSnapshot(chunk(data.clone()))).unwrap();
            assert_eq!(ours, derived, "{length} bytes");
            match postcard::from_bytes::<RaftRequest>(&derived).unwrap() {
                RaftRequest::InstallSnapshot(request) => assert_eq!(request, chunk(data), "{length} bytes"),
                other => panic!("decoded as {}", other.name()),
            }
        }
    }

    /// A chunk that says it is longer than its frame is refused as the end of the input: a cut
    /// frame, and a length prefix claiming `u64::MAX` bytes (ten varint bytes), which must not be
    /// taken for an allocation size.
    #[test]
    fn a_chunk_longer_than_its_frame_is_refused() {
        let whole = postcard::to_stdvec(&RaftRequest::InstallSnapshot(chunk(vec![1; 300]))).unwrap();
        let cut = &whole[..whole.len() - 2];
        assert!(matches!(postcard::from_bytes::<RaftRequest>(cut), Err(postcard::Error::DeserializeUnexpectedEnd)));
        // The length varint of a 300-byte chunk is [172, 2], right before the 300 ones.
        let at = whole.len() - 1 - 300 - 2;
        assert_eq!(&whole[at..at + 2], &[172, 2]);
        let mut forged = whole[..at].to_vec();
        forged.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        forged.extend_from_slice(&whole[at + 2..]);
        assert!(matches!(postcard::from_bytes::<RaftRequest>(&forged), Err(postcard::Error::DeserializeUnexpectedEnd)));
    }
}
