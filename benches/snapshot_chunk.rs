//! A snapshot chunk through the frame codec: what a leader pays to send each 4 MiB piece of a
//! snapshot to a follower that fell behind, and the follower to read it.
//!
//! `cargo bench --bench snapshot_chunk` (part of `just bench`). Times, over the same 4 MiB chunk
//! in the same run, rounds interleaved, `encode_frame` (postcard measures the value, then writes
//! it into one buffer of that size) and decoding the frame back, for `RaftRequest` as it is (the
//! chunk's bytes are one byte string) and, as the baseline, for the same enum with openraft's
//! derives alone (the bytes a sequence of numbers, visited one at a time), which writes the same
//! bytes: the ratio is what the byte string saves.

mod common;

use std::time::Instant;

use common::{median, milliseconds};

use bayard::protocol::RaftRequest;
use bayard::raft::network::SNAPSHOT_CHUNK_BYTES;
use bayard::raft::types::{IndexBatch, NodeId, TypeConfig};
use bayard::transport::frame::{encode_frame, DEFAULT_MAX_FRAME_BYTES, FRAME_PREFIX_BYTES};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, Vote};
use serde::{Deserialize, Serialize};

const ROUNDS: usize = 9;
/// The chunk size a node sends under the default frame limit.
const CHUNK_BYTES: usize = SNAPSHOT_CHUNK_BYTES;

/// `RaftRequest` with openraft's derives alone, variants in the same order.
#[derive(Serialize, Deserialize)]
enum DerivedRaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    Propose(IndexBatch),
}

fn main() {
    // A snapshot archive is compressed segment files: bytes with no pattern to them.
    let data: Vec<u8> = (0..CHUNK_BYTES).map(|_| rand::random::<u8>()).collect();
    let chunk = InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(7, 1),
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(7, 1), 1_200_000)),
            last_membership: StoredMembership::default(),
            snapshot_id: "7-1200000-00ff00ff".to_string(),
        },
        offset: 96 * CHUNK_BYTES as u64,
        data,
        done: false,
    };
    let ours = RaftRequest::InstallSnapshot(chunk.clone());
    let derived = DerivedRaftRequest::InstallSnapshot(chunk.clone());

    let (mut encode_ours, mut decode_ours, mut encode_derived, mut decode_derived) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always meets a warm cache or allocator.
        for ours_now in [round % 2 == 0, round % 2 == 1] {
            let started = Instant::now();
            let frame = if ours_now {
                encode_frame(&ours, DEFAULT_MAX_FRAME_BYTES)
            } else {
                encode_frame(&derived, DEFAULT_MAX_FRAME_BYTES)
            }
            .expect("a 4 MiB chunk fits a frame");
            let encoded = started.elapsed();
            let body = &frame[FRAME_PREFIX_BYTES..];
            let started = Instant::now();
            let data = if ours_now {
                match postcard::from_bytes::<RaftRequest>(body) {
                    Ok(RaftRequest::InstallSnapshot(request)) => request.data,
                    _ => panic!("the frame decodes as the chunk it was"),
                }
            } else {
                match postcard::from_bytes::<DerivedRaftRequest>(body) {
                    Ok(DerivedRaftRequest::InstallSnapshot(request)) => request.data,
                    _ => panic!("the frame decodes as the chunk it was"),
                }
            };
            let decoded = started.elapsed();
            assert!(data == chunk.data, "the chunk's bytes came back");
            if ours_now {
                encode_ours.push(encoded);
                decode_ours.push(decoded);
            } else {
                encode_derived.push(encoded);
                decode_derived.push(decoded);
            }
        }
    }
    let frame = encode_frame(&ours, DEFAULT_MAX_FRAME_BYTES).expect("it encoded before");
    assert!(encode_frame(&derived, DEFAULT_MAX_FRAME_BYTES).ok().as_ref() == Some(&frame), "both write the same frame");
    let frame_bytes = frame.len();
    let rows = [
        ("encode_frame", median(encode_derived), median(encode_ours)),
        ("decode", median(decode_derived), median(decode_ours)),
    ];
    println!(
        "a {:.1} MB snapshot chunk frame (the same bytes both ways); medians of {ROUNDS} rounds",
        frame_bytes as f64 / 1e6
    );
    println!("| step | openraft's derive (baseline) ms | byte string ms | / baseline |");
    println!("|---|---|---|---|");
    for (step, baseline, ours) in rows {
        println!(
            "| {step} | {:.2} | {:.2} | {:.2} |",
            milliseconds(baseline),
            milliseconds(ours),
            milliseconds(ours) / milliseconds(baseline)
        );
    }
}
