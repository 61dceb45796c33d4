//! At-most-once application of client requests.
//!
//! A write whose answer was lost (the leader died after committing it, a connection dropped) is
//! retried, by the node that forwarded it or by the client, and may then reach the log twice.
//! Puts and deletes are not idempotent once anything else happened in between (a resent put of
//! `x` landing after a newer put of `x` reverts it), and a resent `Rollback` would discard writes
//! acknowledged meanwhile. So every client request carries a [`RequestId`], and the state machine
//! remembers the ids of the requests it applied recently: an entry with a known id changes
//! nothing and answers with the first outcome.
//!
//! **How long "recently" is.** A retry comes within its client's request timeout (30 s by
//! default) of the first attempt, whatever the write rate. So the table is bounded by *log
//! time*, not by a count: the leader stamps every entry with its wall clock
//! (`IndexBatch::proposed_at_ms`), the table's clock is the largest stamp applied so far (so it
//! never runs backwards, whichever leader stamped), and a request is forgotten once it is older
//! than [`REQUEST_RETENTION_MS`] on that clock. Two bounds frame it:
//! - the last [`MIN_REMEMBERED_REQUESTS`] are kept whatever their age, so a leader whose clock
//!   jumps ahead forgets no more than the newest thousand would have kept;
//! - at most [`MAX_REMEMBERED_REQUESTS`] are kept, whatever their age, so memory and the commit
//!   marker stay bounded at any write rate. Above about 4,000 writes a second sustained, this
//!   cuts the retention short; every request forgotten early is counted
//!   (`bayard_requests_forgotten_early_total`), so an operator sees it happen.
//!
//! The table is part of the replicated state: it changes only as entries are applied, and its
//! clock comes from the entries, so every replica holds the same one at the same log position.
//! It is stored with every index commit (in the commit marker, clock included), so it survives
//! restarts (the entries after the commit are replayed onto it) and travels in snapshots. The
//! bounds are constants, not flags: replicas with different bounds would decide differently and
//! diverge.

use std::collections::{HashMap, VecDeque};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::types::{BatchOutcome, RequestId};

/// How long (in log time) an applied request is remembered: twice the client's default request
/// timeout, which bounds its retries, leaving room for the clocks of two leaders to differ.
pub const REQUEST_RETENTION_MS: u64 = 60_000;
/// The most recent requests kept whatever their age.
pub const MIN_REMEMBERED_REQUESTS: usize = 1_000;
/// The most requests kept: about 40 MB of memory and 8 MB in each commit marker when full
/// (a minute at 4,000 writes a second).
pub const MAX_REMEMBERED_REQUESTS: usize = 250_000;

/// Longest refusal message kept with a request (the rest is cut).
const MAX_KEPT_ERROR_BYTES: usize = 128;

/// What the first application of a request reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedOutcome {
    pub applied_index: u64,
    pub operations: u64,
    pub error: Option<String>,
}

/// The ids of the recently applied requests, oldest first, with their outcomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedRequests {
    /// Every remembered id with the clock when it was recorded (never decreasing along it).
    order: VecDeque<(RequestId, u64)>,
    outcomes: HashMap<RequestId, RecordedOutcome>,
    /// The largest entry stamp applied so far, in Unix milliseconds; 0 before any.
    clock_ms: u64,
}

impl AppliedRequests {
    /// The outcome of `request_id`'s first application, when it is still remembered.
    pub fn duplicate_outcome(&self, request_id: RequestId) -> Option<BatchOutcome> {
        self.outcomes.get(&request_id).map(|recorded| BatchOutcome {
            applied_index: recorded.applied_index,
            operations: recorded.operations,
            error: recorded.error.clone(),
            duplicate: true,
            grouped: Vec::new(),
        })
    }

    /// Moves the clock to an entry's stamp (never back) and forgets what it made too old.
    /// Entries of before stamps (0) leave it where it is.
    pub fn observe_clock(&mut self, proposed_at_ms: u64) {
        if proposed_at_ms <= self.clock_ms {
            return;
        }
        if self.clock_ms == 0 {
            // The first stamp ever (a table of before stamps): what was recorded without a
            // clock is as old as this entry, not fifty years.
            for (_, recorded_at) in self.order.iter_mut() {
                *recorded_at = proposed_at_ms;
            }
        }
        self.clock_ms = proposed_at_ms;
        self.forget_expired();
    }

    /// Remembers a request, forgetting what the bounds leave out. Recording an id again
    /// replaces its outcome (the state machine records before applying and again after).
    pub fn record(&mut self, request_id: RequestId, mut outcome: RecordedOutcome) {
        if let Some(error) = &mut outcome.error {
            cut_to_char_boundary(error, MAX_KEPT_ERROR_BYTES);
        }
        if self.outcomes.insert(request_id, outcome).is_none() {
            self.order.push_back((request_id, self.clock_ms));
        }
        while self.order.len() > MAX_REMEMBERED_REQUESTS {
            let Some((oldest, recorded_at)) = self.order.pop_front() else { break };
            self.outcomes.remove(&oldest);
            if !self.expired(recorded_at) {
                crate::telemetry::metrics::record_request_forgotten_early();
            }
        }
    }

    fn expired(&self, recorded_at: u64) -> bool {
        recorded_at.saturating_add(REQUEST_RETENTION_MS) < self.clock_ms
    }

    fn forget_expired(&mut self) {
        let before = self.order.len();
        while self.order.len() > MIN_REMEMBERED_REQUESTS {
            match self.order.front() {
                Some(&(oldest, recorded_at)) if self.expired(recorded_at) => {
                    self.order.pop_front();
                    self.outcomes.remove(&oldest);
                }
                _ => break,
            }
        }
        // After a burst, give the memory back (capacity is not part of the state).
        if self.order.len() < before && self.outcomes.capacity() > 4 * self.outcomes.len().max(MIN_REMEMBERED_REQUESTS)
        {
            self.outcomes.shrink_to(2 * self.outcomes.len());
            self.order.shrink_to(2 * self.order.len());
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The table's clock (Unix milliseconds; 0 before any stamped entry).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }
}

fn cut_to_char_boundary(text: &mut String, max_bytes: usize) {
    if text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// How the table is written in a commit marker (JSON): `{"clock_ms": …, "records": "<base64>"}`,
/// the records being postcard [`StoredRecord`]s back to back, oldest first. A marker written
/// before log time holds a JSON list of [`ListedRequest`]s instead; both are read.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredTable {
    Compact { clock_ms: u64, records: String },
    Listed(Vec<ListedRequest>),
}

/// One request in the compact form. Its age (clock minus when it was recorded) rather than its
/// time keeps the number small.
#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    id: [u8; 16],
    applied_index: u64,
    operations: u64,
    age_ms: u64,
    #[serde(borrow)]
    error: Option<&'a str>,
}

/// One request as markers of before log time list it (ids in hex: JSON numbers do not hold
/// 128 bits everywhere).
#[derive(Serialize, Deserialize)]
struct ListedRequest {
    id: String,
    index: u64,
    operations: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Serialize for AppliedRequests {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(self.order.len() * 24);
        for (request_id, recorded_at) in &self.order {
            if let Some(outcome) = self.outcomes.get(request_id) {
                let record = StoredRecord {
                    id: request_id.0.to_be_bytes(),
                    applied_index: outcome.applied_index,
                    operations: outcome.operations,
                    age_ms: self.clock_ms.saturating_sub(*recorded_at),
                    error: outcome.error.as_deref(),
                };
                bytes = postcard::to_extend(&record, bytes).map_err(serde::ser::Error::custom)?;
            }
        }
        let records = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        StoredTable::Compact { clock_ms: self.clock_ms, records }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for AppliedRequests {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = AppliedRequests::default();
        match StoredTable::deserialize(deserializer)? {
            StoredTable::Listed(listed) => {
                for request in listed {
                    let id = u128::from_str_radix(&request.id, 16)
                        .map_err(|error| D::Error::custom(format!("request id {:?}: {error}", request.id)))?;
                    let outcome = RecordedOutcome {
                        applied_index: request.index,
                        operations: request.operations,
                        error: request.error,
                    };
                    table.record(RequestId(id), outcome);
                }
            }
            StoredTable::Compact { clock_ms, records } => {
                let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(records)
                    .map_err(|error| D::Error::custom(format!("request records: {error}")))?;
                table.clock_ms = clock_ms;
                let mut rest = bytes.as_slice();
                while !rest.is_empty() {
                    let (record, after) = postcard::take_from_bytes::<StoredRecord>(rest)
                        .map_err(|error| D::Error::custom(format!("request record: {error}")))?;
                    rest = after;
                    let request_id = RequestId(u128::from_be_bytes(record.id));
                    let outcome = RecordedOutcome {
                        applied_index: record.applied_index,
                        operations: record.operations,
                        error: record.error.map(str::to_string),
                    };
                    let recorded_at = clock_ms.saturating_sub(record.age_ms);
                    // Stamps never decrease along the table; a marker that says otherwise is
                    // not one this code wrote.
                    if table.order.back().is_some_and(|&(_, previous)| previous > recorded_at) {
                        return Err(D::Error::custom("request records out of order"));
                    }
                    if table.outcomes.insert(request_id, outcome).is_none() {
                        table.order.push_back((request_id, recorded_at));
                    }
                    if table.order.len() > MAX_REMEMBERED_REQUESTS {
                        return Err(D::Error::custom("more request records than a table holds"));
                    }
                }
            }
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(applied_index: u64) -> RecordedOutcome {
        RecordedOutcome { applied_index, operations: 1, error: None }
    }

    /// A table holding `count` requests, ids from `first`, recorded at `at_ms`.
    fn filled(first: u128, count: usize, at_ms: u64) -> AppliedRequests {
        let mut table = AppliedRequests::default();
        table.observe_clock(at_ms);
        for id in first..first + count as u128 {
            table.record(RequestId(id), outcome(id as u64));
        }
        table
    }

    #[test]
    fn a_known_request_answers_with_its_first_outcome() {
        let mut table = AppliedRequests::default();
        assert_eq!(table.duplicate_outcome(RequestId(7)), None);
        table.record(RequestId(7), outcome(12));
        let again = table.duplicate_outcome(RequestId(7)).unwrap();
        assert_eq!((again.applied_index, again.duplicate), (12, true));
        // Recorded again after applying (with what the index said): replaced, not added.
        table.record(RequestId(7), RecordedOutcome { applied_index: 12, operations: 1, error: Some("bad".into()) });
        assert_eq!(table.len(), 1);
        assert_eq!(table.duplicate_outcome(RequestId(7)).unwrap().error.as_deref(), Some("bad"));
    }

    /// What is remembered after recording `count` requests at `recorded_at`, then applying an
    /// entry stamped `later`: (how many remain, whether the oldest and newest are known).
    #[test]
    fn retention_is_log_time_within_the_bounds() {
        const T: u64 = 1_700_000_000_000;
        let cases: [(&str, usize, u64, u64, usize); 7] = [
            ("young requests stay, however many", 20_000, T, T + REQUEST_RETENTION_MS, 20_000),
            ("old ones go, down to the floor", 20_000, T, T + REQUEST_RETENTION_MS + 1, MIN_REMEMBERED_REQUESTS),
            ("a few old ones all stay (the floor)", 10, T, T + 10 * REQUEST_RETENTION_MS, 10),
            ("a clock jump forgets no more than the floor", 5_000, T, u64::MAX, MIN_REMEMBERED_REQUESTS),
            ("an older stamp moves nothing", 20_000, T, T - 5 * REQUEST_RETENTION_MS, 20_000),
            ("an unstamped entry moves nothing", 20_000, T, 0, 20_000),
            ("the ceiling holds whatever the age", MAX_REMEMBERED_REQUESTS + 7, T, T, MAX_REMEMBERED_REQUESTS),
        ];
        for (case, count, recorded_at, later, remaining) in cases {
            let mut table = filled(0, count, recorded_at);
            table.observe_clock(later);
            assert_eq!(table.len(), remaining, "{case}");
            let newest = RequestId(count as u128 - 1);
            assert!(table.duplicate_outcome(newest).is_some(), "{case}: the newest is kept");
            let oldest_kept = RequestId((count - remaining) as u128);
            assert!(table.duplicate_outcome(oldest_kept).is_some(), "{case}: kept from the oldest end");
            if remaining < count {
                assert!(table.duplicate_outcome(RequestId(oldest_kept.0 - 1)).is_none(), "{case}: forgot the oldest");
            }
        }
    }

    #[test]
    fn the_clock_never_runs_back_and_later_requests_age_from_it() {
        const T: u64 = 1_700_000_000_000;
        let mut table = filled(0, 2_000, T);
        // A new leader whose clock is a minute behind: stamps of its entries change nothing,
        // and what it applies is recorded at the table's clock, not its own.
        table.observe_clock(T - 60_000);
        assert_eq!(table.clock_ms(), T);
        table.record(RequestId(10_000), outcome(1));
        table.observe_clock(T + REQUEST_RETENTION_MS + 1);
        assert_eq!(table.len(), MIN_REMEMBERED_REQUESTS);
        assert!(table.duplicate_outcome(RequestId(10_000)).is_some());
    }

    #[test]
    fn requests_of_before_stamps_age_from_the_first_stamp() {
        // Recorded with no clock (replayed entries of an older log, or an old marker).
        let mut table = filled(0, 5_000, 0);
        const T: u64 = 1_700_000_000_000;
        table.observe_clock(T);
        assert_eq!(table.len(), 5_000, "not fifty years old");
        table.observe_clock(T + REQUEST_RETENTION_MS + 1);
        assert_eq!(table.len(), MIN_REMEMBERED_REQUESTS);
    }

    #[test]
    fn stored_and_read_back_in_order_with_long_errors_cut() {
        const T: u64 = 1_700_000_000_000;
        let mut table = AppliedRequests::default();
        table.observe_clock(T);
        table.record(RequestId(u128::MAX), outcome(1));
        table.observe_clock(T + 1_500);
        table.record(RequestId(3), RecordedOutcome { applied_index: 2, operations: 0, error: Some("é".repeat(300)) });
        let json = serde_json::to_string(&table).unwrap();
        assert!(json.starts_with(&format!(r#"{{"clock_ms":{},"records":""#, T + 1_500)), "{json}");
        let back: AppliedRequests = serde_json::from_str(&json).unwrap();
        assert_eq!(back, table);
        assert!(back.duplicate_outcome(RequestId(3)).unwrap().error.unwrap().len() <= MAX_KEPT_ERROR_BYTES);
        // Stamps survive: the first request is 1.5 s older than the second.
        assert_eq!(back.order, VecDeque::from([(RequestId(u128::MAX), T), (RequestId(3), T + 1_500)]));
        // A full table stays well under the frame of a marker: about 32 bytes a request.
        let full = filled(1 << 100, 10_000, T);
        let bytes = serde_json::to_string(&full).unwrap().len();
        assert!(bytes < 10_000 * 40, "{bytes} bytes for 10,000 requests");
        assert_eq!(serde_json::from_str::<AppliedRequests>(&serde_json::to_string(&full).unwrap()).unwrap(), full);
    }

    #[test]
    fn markers_of_before_log_time_still_read() {
        let listed = r#"[{"id":"ffffffffffffffffffffffffffffffff","index":1,"operations":1},{"id":"3","index":2,"operations":0,"error":"bad"}]"#;
        let table: AppliedRequests = serde_json::from_str(listed).unwrap();
        assert_eq!((table.len(), table.clock_ms()), (2, 0));
        assert_eq!(table.duplicate_outcome(RequestId(u128::MAX)).unwrap().applied_index, 1);
        assert_eq!(table.duplicate_outcome(RequestId(3)).unwrap().error.as_deref(), Some("bad"));
    }

    #[test]
    fn damaged_markers_are_refused_not_misread() {
        let bad = [
            r#"[{"id":"zz","index":1,"operations":1}]"#,
            r#"{"clock_ms":5,"records":"not base64!"}"#,
            r#"{"clock_ms":5,"records":"AAAA"}"#,
        ];
        for json in bad {
            assert!(serde_json::from_str::<AppliedRequests>(json).is_err(), "{json}");
        }
        // Out of order: the second record is older than the first.
        let mut bytes = Vec::new();
        for age_ms in [0u64, 10] {
            let record = StoredRecord { id: [age_ms as u8; 16], applied_index: 1, operations: 1, age_ms, error: None };
            bytes = postcard::to_extend(&record, bytes).unwrap();
        }
        let records = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        let json = serde_json::to_string(&StoredTable::Compact { clock_ms: 100, records }).unwrap();
        assert!(serde_json::from_str::<AppliedRequests>(&json).is_err());
    }
}
