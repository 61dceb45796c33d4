//! The request-id table's cost in a commit marker: every commit writes the whole table on the
//! apply path (`raft::dedup`), and nothing is applied meanwhile.
//!
//! `cargo bench --bench request_table` (part of `just bench`). Fills a table to its ceiling
//! (`MAX_REMEMBERED_REQUESTS` random ids, as a node holds after two minutes above 2,000 writes a
//! second), then times, five rounds each, writing it as JSON (what a commit does), reading it
//! back (what a start or a snapshot install does), and as the baseline in the same run postcard's
//! own serde encoder over the same records held in a plain list (no table, no lookups), base64
//! and JSON included: the ratio says what the table's writer costs against that.

mod common;

use std::time::Instant;

use common::{median, milliseconds};

use base64::Engine;
use bayard::raft::dedup::{AppliedRequests, RecordedOutcome, MAX_REMEMBERED_REQUESTS};
use bayard::raft::types::RequestId;
use serde::Serialize;

const ROUNDS: usize = 5;

/// The fields of a stored record, as the baseline encodes them with postcard's serde encoder.
#[derive(Serialize)]
struct Record<'a> {
    id: [u8; 16],
    applied_index: u64,
    operations: u64,
    age_ms: u64,
    error: Option<&'a str>,
}

fn main() {
    let started_at_ms = 1_700_000_000_000;
    let mut table = AppliedRequests::default();
    table.observe_entry(1, started_at_ms);
    let mut records = Vec::with_capacity(MAX_REMEMBERED_REQUESTS);
    for number in 0..MAX_REMEMBERED_REQUESTS as u64 {
        let request_id = RequestId(rand::random());
        // One request in a hundred was refused, as a real table holds some errors.
        let error = (number % 100 == 0).then(|| "invalid document: field `year` is not a number".to_string());
        table.record(request_id, RecordedOutcome { applied_index: 1_000_000 + number, operations: 1, error });
        records.push((request_id, number));
        if number % 1_000 == 999 {
            table.observe_entry(1, started_at_ms + number / 10);
        }
    }
    assert_eq!(table.len(), MAX_REMEMBERED_REQUESTS, "the table holds what was recorded");

    let (mut writes, mut reads, mut baselines) = (Vec::new(), Vec::new(), Vec::new());
    let mut marker_bytes = 0;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let marker = serde_json::to_string(&table).expect("a table serializes");
        writes.push(started.elapsed());
        marker_bytes = marker.len();

        let started = Instant::now();
        let back: AppliedRequests = serde_json::from_str(&marker).expect("the marker reads back");
        reads.push(started.elapsed());
        assert_eq!(back, table, "the marker holds the table");

        let started = Instant::now();
        let mut bytes = Vec::with_capacity(records.len() * 24);
        for &(request_id, number) in &records {
            let record = Record {
                id: request_id.0.to_be_bytes(),
                applied_index: 1_000_000 + number,
                operations: 1,
                age_ms: 25_000 - number / 10,
                error: (number % 100 == 0).then_some("invalid document: field `year` is not a number"),
            };
            bytes = postcard::to_extend(&record, bytes).expect("a record encodes");
        }
        let text = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        let baseline = serde_json::to_string(&text).expect("a string serializes");
        baselines.push(started.elapsed());
        assert!(baseline.len() > marker_bytes / 2, "the baseline wrote the same records");
    }
    let (write, read, baseline) = (median(writes), median(reads), median(baselines));
    println!(
        "request table of {MAX_REMEMBERED_REQUESTS} requests, a {:.1} MB marker; medians of {ROUNDS} rounds",
        marker_bytes as f64 / 1e6
    );
    println!("| step | ms | / postcard serde baseline |");
    println!("|---|---|---|");
    println!(
        "| postcard's serde encoder over the same records, a plain list (baseline) | {:.1} | 1.00 |",
        milliseconds(baseline)
    );
    println!(
        "| the marker written (every commit, on the apply path) | {:.1} | {:.2} |",
        milliseconds(write),
        milliseconds(write) / milliseconds(baseline)
    );
    println!(
        "| the marker read back (start, snapshot install) | {:.1} | {:.2} |",
        milliseconds(read),
        milliseconds(read) / milliseconds(baseline)
    );
}
