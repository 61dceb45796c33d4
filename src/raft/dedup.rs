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
//! **How long "recently" is.** A node works on a write for at most [`LONGEST_WRITE_WAIT_MS`]
//! (`cluster` clamps every write's deadline to it), so a retry after a lost answer comes within
//! about that long, whatever the write rate. So the table is bounded by *log time*, not only by
//! a count: a request is forgotten once it is older than [`REQUEST_RETENTION_MS`] (twice that)
//! of log time. Log time is a [`LogClock`]: the leader stamps every normal entry with its wall
//! clock (`IndexBatch::proposed_at_ms`), and the clock advances by the difference between
//! stamps of the same term (from the largest so far), at most [`MAX_CLOCK_STEP_MS`] per entry. So it depends
//! on no node's absolute time, never runs backwards, and a leader whose clock jumps (or lies)
//! moves it by ten seconds at most. Two bounds frame the retention:
//! - the newest [`MIN_REMEMBERED_REQUESTS`] are kept whatever their age (the rule before log
//!   time, which still holds alone for entries of before stamps);
//! - at most [`MAX_REMEMBERED_REQUESTS`] are kept, so memory and the commit marker stay bounded
//!   at any write rate. So the retention is the shorter of two minutes and 250,000 requests:
//!   above about 2,000 writes a second sustained it is cut short (25 s at the 10,000 puts a
//!   second one node reaches on two cores), and every request dropped before its time is
//!   counted (`bayard_requests_forgotten_early_total`).
//!
//! The table is part of the replicated state: it changes only as entries are applied, and its
//! clock comes from the entries, so every replica holds the same one at the same log position.
//! It is stored with every index commit (in the commit marker, clock included), so it survives
//! restarts (the entries after the commit are replayed onto it) and travels in snapshots. The
//! bounds are constants, not flags: replicas with different bounds would decide differently and
//! diverge.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::types::{BatchOutcome, RequestId};

/// The longest a node works on one write (its deadline is clamped to it), in milliseconds.
pub const LONGEST_WRITE_WAIT_MS: u64 = 60_000;
/// How long (in log time) an applied request is remembered: twice the longest a write is worked
/// on, so that a retry sent when an attempt timed out still finds its first attempt.
pub const REQUEST_RETENTION_MS: u64 = 2 * LONGEST_WRITE_WAIT_MS;
/// The most log time one entry may add: a leader whose clock jumps ahead costs no more.
pub const MAX_CLOCK_STEP_MS: u64 = 10_000;
/// The newest requests kept whatever their age.
pub const MIN_REMEMBERED_REQUESTS: usize = 10_000;
/// The most requests kept: at most about 40 MB of memory and 8 MB in each commit marker when full
/// (two minutes at 2,000 writes a second).
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

/// Log time: milliseconds elapsed as the leaders' stamps tell, counted within each term only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogClock {
    /// Log time so far.
    pub elapsed_ms: u64,
    /// The stamp of the last stamped entry (0: none yet) and its term.
    pub last_stamp_ms: u64,
    pub last_term: u64,
}

impl LogClock {
    /// The clock after an entry of `term` stamped `stamp_ms` (0: unstamped, no change). The first
    /// stamp of a term only sets where the term's count starts: leaders' clocks are never
    /// compared with each other, so the time between two terms is not counted (which keeps
    /// requests longer, never shorter).
    pub fn advanced(self, term: u64, stamp_ms: u64) -> LogClock {
        if stamp_ms == 0 {
            return self;
        }
        if self.last_stamp_ms == 0 || term != self.last_term {
            return LogClock { elapsed_ms: self.elapsed_ms, last_stamp_ms: stamp_ms, last_term: term };
        }
        if stamp_ms < self.last_stamp_ms {
            // Two entries proposed at once may reach the log in either order: a stamp a little
            // behind adds nothing and the count goes on from the largest. One far behind (the
            // leader's clock was set back) becomes where the count goes on from.
            let last_stamp_ms =
                if self.last_stamp_ms - stamp_ms > MAX_CLOCK_STEP_MS { stamp_ms } else { self.last_stamp_ms };
            return LogClock { last_stamp_ms, ..self };
        }
        let step = (stamp_ms - self.last_stamp_ms).min(MAX_CLOCK_STEP_MS);
        LogClock { elapsed_ms: self.elapsed_ms.saturating_add(step), last_stamp_ms: stamp_ms, last_term: term }
    }

    /// Whether any stamped entry was applied (log time exists).
    pub fn started(&self) -> bool {
        self.last_stamp_ms != 0
    }
}

/// The ids of the recently applied requests, oldest first, with their outcomes.
#[derive(Debug, Clone, Default)]
pub struct AppliedRequests {
    /// Every remembered request, oldest first. The outcomes live here rather than in the map so
    /// that a commit writes the table front to back without a hash lookup per request (with
    /// 250,000 random ids those lookups were most of the cost of every commit marker).
    order: VecDeque<Remembered>,
    /// Where each remembered id is: its number among all requests ever remembered, so that
    /// `order[number - forgotten]` holds it.
    positions: HashMap<RequestId, u64>,
    /// How many requests were dropped from the front of `order` so far.
    forgotten: u64,
    clock: LogClock,
}

/// One remembered request: its id, the log time it was recorded at (never decreasing along
/// the table) and what its first application reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Remembered {
    request_id: RequestId,
    recorded_at: u64,
    outcome: RecordedOutcome,
}

/// Two tables are the same state when they remember the same requests in the same order at the
/// same log time; where their counts of forgotten requests started is not part of it.
impl PartialEq for AppliedRequests {
    fn eq(&self, other: &AppliedRequests) -> bool {
        self.clock == other.clock && self.order == other.order
    }
}

impl Eq for AppliedRequests {}

impl AppliedRequests {
    /// The outcome of `request_id`'s first application, when it is still remembered.
    pub fn duplicate_outcome(&self, request_id: RequestId) -> Option<BatchOutcome> {
        self.remembered(request_id).map(|Remembered { outcome: recorded, .. }| BatchOutcome {
            applied_index: recorded.applied_index,
            operations: recorded.operations,
            error: recorded.error.clone(),
            duplicate: true,
            grouped: Vec::new(),
        })
    }

    /// Advances log time by a normal entry of `term` stamped `proposed_at_ms`, and forgets what
    /// that made too old.
    pub fn observe_entry(&mut self, term: u64, proposed_at_ms: u64) {
        let before = self.clock.elapsed_ms;
        self.clock = self.clock.advanced(term, proposed_at_ms);
        if self.clock.elapsed_ms != before {
            self.forget_expired();
        }
    }

    /// Remembers a request, forgetting what the bounds leave out. Recording an id again
    /// replaces its outcome (the state machine records before applying and again after).
    pub fn record(&mut self, request_id: RequestId, mut outcome: RecordedOutcome) {
        if let Some(error) = &mut outcome.error {
            cut_to_char_boundary(error, MAX_KEPT_ERROR_BYTES);
        }
        match self.remembered_mut(request_id) {
            Some(remembered) => remembered.outcome = outcome,
            None => {
                let number = self.forgotten + self.order.len() as u64;
                self.positions.insert(request_id, number);
                self.order.push_back(Remembered { request_id, recorded_at: self.clock.elapsed_ms, outcome });
            }
        }
        // Before log time the rule was the newest 10,000 alone; it stays so for entries of
        // before stamps, so that replicas replaying them from markers of different positions
        // hold the same table.
        let ceiling = if self.clock.started() { MAX_REMEMBERED_REQUESTS } else { MIN_REMEMBERED_REQUESTS };
        while self.order.len() > ceiling {
            let Some(recorded_at) = self.forget_oldest() else { break };
            if self.clock.started() && !self.expired(recorded_at) {
                crate::telemetry::metrics::record_request_forgotten_early();
            }
        }
    }

    /// Where `request_id` is in `order`, when it is remembered.
    fn slot(&self, request_id: RequestId) -> Option<usize> {
        let number = *self.positions.get(&request_id)?;
        usize::try_from(number.checked_sub(self.forgotten)?).ok()
    }

    fn remembered(&self, request_id: RequestId) -> Option<&Remembered> {
        self.order.get(self.slot(request_id)?)
    }

    fn remembered_mut(&mut self, request_id: RequestId) -> Option<&mut Remembered> {
        let slot = self.slot(request_id)?;
        self.order.get_mut(slot)
    }

    /// Drops the oldest request, answering when it was recorded.
    fn forget_oldest(&mut self) -> Option<u64> {
        let oldest = self.order.pop_front()?;
        self.positions.remove(&oldest.request_id);
        self.forgotten += 1;
        Some(oldest.recorded_at)
    }

    fn expired(&self, recorded_at: u64) -> bool {
        recorded_at.saturating_add(REQUEST_RETENTION_MS) < self.clock.elapsed_ms
    }

    fn forget_expired(&mut self) {
        let before = self.order.len();
        while self.order.len() > MIN_REMEMBERED_REQUESTS {
            match self.order.front() {
                Some(oldest) if self.expired(oldest.recorded_at) => {
                    self.forget_oldest();
                }
                _ => break,
            }
        }
        // After a burst, give the memory back (capacity is not part of the state).
        if self.order.len() < before
            && self.positions.capacity() > 4 * self.positions.len().max(MIN_REMEMBERED_REQUESTS)
        {
            self.positions.shrink_to(2 * self.positions.len());
            self.order.shrink_to(2 * self.order.len());
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn clock(&self) -> LogClock {
        self.clock
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

/// How the table is written in a commit marker (JSON): an object with the clock and the records,
/// which are postcard [`StoredRecord`]s back to back, oldest first, in base64. A marker written
/// before log time holds a JSON list of [`ListedRequest`]s instead; both are read.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactTable {
    clock: LogClock,
    records: String,
}

/// One request in the compact form. Its age (log time minus when it was recorded) rather than
/// its time keeps the number small.
#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    id: [u8; 16],
    applied_index: u64,
    operations: u64,
    age_ms: u64,
    #[serde(borrow)]
    error: Option<&'a str>,
}

impl StoredRecord<'_> {
    /// Appends the record's postcard form, written by hand: a full table is serialized on the
    /// apply path at every commit, and postcard's serde encoder took the id through the
    /// serializer byte by byte (`benches/request_table` compares the two). The bytes are postcard's
    /// exactly (a test compares them), so `postcard::take_from_bytes` still reads them and
    /// stays the one decoder of what comes from a file.
    fn encode_into(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(&self.id);
        push_varint(bytes, self.applied_index);
        push_varint(bytes, self.operations);
        push_varint(bytes, self.age_ms);
        match self.error {
            None => bytes.push(0),
            Some(error) => {
                bytes.push(1);
                push_varint(bytes, error.len() as u64);
                bytes.extend_from_slice(error.as_bytes());
            }
        }
    }
}

/// Postcard's unsigned varint: seven bits a byte, least significant first, the high bit set on
/// every byte but the last.
fn push_varint(bytes: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        bytes.push((value as u8) | 0x80);
        value >>= 7;
    }
    bytes.push(value as u8);
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
        for Remembered { request_id, recorded_at, outcome } in &self.order {
            let record = StoredRecord {
                id: request_id.0.to_be_bytes(),
                applied_index: outcome.applied_index,
                operations: outcome.operations,
                age_ms: self.clock.elapsed_ms.saturating_sub(*recorded_at),
                error: outcome.error.as_deref(),
            };
            record.encode_into(&mut bytes);
        }
        let records = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        CompactTable { clock: self.clock, records }.serialize(serializer)
    }
}

impl AppliedRequests {
    /// The table of a compact marker, checked: what this code writes, and nothing else.
    fn from_compact(compact: CompactTable) -> Result<AppliedRequests, String> {
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(compact.records)
            .map_err(|error| format!("request records: {error}"))?;
        let mut table = AppliedRequests { clock: compact.clock, ..Default::default() };
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let (record, after) =
                postcard::take_from_bytes::<StoredRecord>(rest).map_err(|error| format!("request record: {error}"))?;
            rest = after;
            let request_id = RequestId(u128::from_be_bytes(record.id));
            let Some(recorded_at) = compact.clock.elapsed_ms.checked_sub(record.age_ms) else {
                return Err("a request record older than log time".into());
            };
            // Stamps never decrease along the table; a marker that says otherwise is not one
            // this code wrote.
            if table.order.back().is_some_and(|previous| previous.recorded_at > recorded_at) {
                return Err("request records out of order".into());
            }
            let mut error = record.error.map(str::to_string);
            if let Some(error) = &mut error {
                cut_to_char_boundary(error, MAX_KEPT_ERROR_BYTES);
            }
            let outcome = RecordedOutcome { applied_index: record.applied_index, operations: record.operations, error };
            if table.positions.insert(request_id, table.order.len() as u64).is_some() {
                return Err(format!("request {request_id:?} recorded twice"));
            }
            table.order.push_back(Remembered { request_id, recorded_at, outcome });
            if table.order.len() > MAX_REMEMBERED_REQUESTS {
                return Err("more request records than a table holds".into());
            }
        }
        Ok(table)
    }
}

/// Reads either form without buffering the value first (as `serde(untagged)` would).
struct TableVisitor;

impl<'de> serde::de::Visitor<'de> for TableVisitor {
    type Value = AppliedRequests;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a request table: an object with `clock` and `records`, or a list of requests")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut listed: A) -> Result<AppliedRequests, A::Error> {
        use serde::de::Error;
        let mut table = AppliedRequests::default();
        while let Some(request) = listed.next_element::<ListedRequest>()? {
            let id = u128::from_str_radix(&request.id, 16)
                .map_err(|error| A::Error::custom(format!("request id {:?}: {error}", request.id)))?;
            let outcome =
                RecordedOutcome { applied_index: request.index, operations: request.operations, error: request.error };
            table.record(RequestId(id), outcome);
        }
        Ok(table)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<AppliedRequests, A::Error> {
        let compact = CompactTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        AppliedRequests::from_compact(compact).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for AppliedRequests {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TableVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;

    fn outcome(applied_index: u64) -> RecordedOutcome {
        RecordedOutcome { applied_index, operations: 1, error: None }
    }

    /// A table whose log time has started (term 1, stamp `T`), holding `count` requests.
    fn filled(count: usize) -> AppliedRequests {
        let mut table = AppliedRequests::default();
        table.observe_entry(1, T);
        for id in 0..count as u128 {
            table.record(RequestId(id), outcome(id as u64));
        }
        table
    }

    /// Entries of term 1, 5 s apart, until log time has advanced by `by_ms` since stamp `T`.
    fn advance(table: &mut AppliedRequests, by_ms: u64) {
        let mut stamp = T;
        while stamp < T + by_ms {
            stamp = (stamp + 5_000).min(T + by_ms);
            table.observe_entry(1, stamp);
        }
    }

    #[test]
    fn the_hand_written_record_encoding_is_postcards() {
        let long = "é".repeat(70);
        let numbers = [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX - 1, u64::MAX];
        let errors = [None, Some(""), Some("refused"), Some(long.as_str())];
        let mut cases = 0;
        for (position, &number) in numbers.iter().enumerate() {
            for error in errors {
                let record = StoredRecord {
                    id: (u128::MAX / (position as u128 + 1)).to_be_bytes(),
                    applied_index: number,
                    operations: numbers[numbers.len() - 1 - position],
                    age_ms: number / 3,
                    error,
                };
                let mut written = vec![7];
                record.encode_into(&mut written);
                let expected = postcard::to_allocvec(&record).unwrap();
                assert_eq!(written[1..], expected[..], "number {number}, error {error:?}");
                let (read, rest) = postcard::take_from_bytes::<StoredRecord>(&written[1..]).unwrap();
                assert!(rest.is_empty());
                assert_eq!((read.applied_index, read.error), (number, error));
                cases += 1;
            }
        }
        assert_eq!(cases, numbers.len() * errors.len());
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

    #[test]
    fn outcomes_stay_with_their_ids_after_the_oldest_are_forgotten() {
        // Past the count before log time, so the front is dropped as requests come in.
        let mut table = AppliedRequests::default();
        for id in 0..MIN_REMEMBERED_REQUESTS as u128 + 500 {
            table.record(RequestId(id), outcome(id as u64));
        }
        // The same table read back from a marker has forgotten nothing yet: both must find every
        // id where it is and replace the right outcome.
        let mut back: AppliedRequests = serde_json::from_str(&serde_json::to_string(&table).unwrap()).unwrap();
        assert_eq!(back, table);
        for copy in [&mut table, &mut back] {
            assert_eq!(copy.duplicate_outcome(RequestId(499)), None);
            for id in [500, 7_000, MIN_REMEMBERED_REQUESTS as u128 + 499] {
                assert_eq!(copy.duplicate_outcome(RequestId(id)).unwrap().applied_index, id as u64);
            }
            copy.record(RequestId(7_000), RecordedOutcome { applied_index: 1, operations: 2, error: Some("x".into()) });
            copy.record(RequestId(1_000_000), outcome(9));
            assert_eq!(copy.duplicate_outcome(RequestId(7_000)).unwrap().error.as_deref(), Some("x"));
            assert_eq!(copy.duplicate_outcome(RequestId(500)), None, "the newest pushed the oldest out");
            assert_eq!(copy.duplicate_outcome(RequestId(501)).unwrap().applied_index, 501);
            assert_eq!(copy.len(), MIN_REMEMBERED_REQUESTS);
        }
        assert_eq!(back, table);
    }

    #[test]
    fn log_time_counts_stamps_within_a_term_only() {
        let at = |elapsed_ms, last_stamp_ms, last_term| LogClock { elapsed_ms, last_stamp_ms, last_term };
        let running = at(1_000, T, 3);
        let cases: [(&str, LogClock, u64, u64, LogClock); 9] = [
            ("an unstamped entry changes nothing", running, 3, 0, running),
            ("the first stamp ever starts the count", LogClock::default(), 3, T, at(0, T, 3)),
            ("a later stamp of the term adds the difference", running, 3, T + 500, at(1_500, T + 500, 3)),
            ("a stamp a little behind adds nothing", running, 3, T - 500, running),
            ("a stamp far behind is counted from", running, 3, T - 3_600_000, at(1_000, T - 3_600_000, 3)),
            (
                "a jump ahead adds one step at most",
                running,
                3,
                T + 3_600_000,
                at(1_000 + MAX_CLOCK_STEP_MS, T + 3_600_000, 3),
            ),
            (
                "the largest stamp adds one step at most",
                running,
                3,
                u64::MAX,
                at(1_000 + MAX_CLOCK_STEP_MS, u64::MAX, 3),
            ),
            ("a new term's leader is not compared", running, 4, T + 3_600_000, at(1_000, T + 3_600_000, 4)),
            ("nor a new term's slower one", running, 4, T - 3_600_000, at(1_000, T - 3_600_000, 4)),
        ];
        for (case, clock, term, stamp, expected) in cases {
            assert_eq!(clock.advanced(term, stamp), expected, "{case}");
        }
        let saturated = at(u64::MAX - 1, T, 3).advanced(3, T + 5_000);
        assert_eq!(saturated.elapsed_ms, u64::MAX, "saturates rather than overflows");
    }

    #[test]
    fn retention_is_log_time_within_the_bounds() {
        // (case, requests recorded at log time 0, log time passed after, requests remaining)
        let cases: [(&str, usize, u64, usize); 5] = [
            ("young requests stay, however many", 30_000, REQUEST_RETENTION_MS, 30_000),
            ("old ones go, down to the floor", 30_000, REQUEST_RETENTION_MS + 1, MIN_REMEMBERED_REQUESTS),
            ("a few old ones all stay (the floor)", 50, 10 * REQUEST_RETENTION_MS, 50),
            ("no time passing keeps all", 30_000, 0, 30_000),
            ("the ceiling holds whatever the age", MAX_REMEMBERED_REQUESTS + 7, 0, MAX_REMEMBERED_REQUESTS),
        ];
        for (case, count, passed, remaining) in cases {
            let mut table = filled(count);
            advance(&mut table, passed);
            assert_eq!(table.len(), remaining, "{case}");
            assert!(table.duplicate_outcome(RequestId(count as u128 - 1)).is_some(), "{case}: the newest is kept");
            let oldest_kept = (count - remaining) as u128;
            assert!(table.duplicate_outcome(RequestId(oldest_kept)).is_some(), "{case}: kept from the oldest end");
            if oldest_kept > 0 {
                assert!(table.duplicate_outcome(RequestId(oldest_kept - 1)).is_none(), "{case}: forgot the oldest");
            }
        }
    }

    #[test]
    fn a_leader_clock_jump_forgets_nothing_early() {
        let mut table = filled(30_000);
        // A leader an hour ahead, then a new leader a day behind: ten seconds of log time.
        table.observe_entry(1, T + 3_600_000);
        table.observe_entry(2, T - 86_400_000);
        table.observe_entry(2, T - 86_400_000 + 1_000);
        assert_eq!(table.clock().elapsed_ms, MAX_CLOCK_STEP_MS + 1_000);
        assert_eq!(table.len(), 30_000);
    }

    #[test]
    fn before_log_time_the_newest_ten_thousand_are_kept() {
        // Entries of before stamps (replayed from an older log): the rule of before, exactly.
        let mut table = AppliedRequests::default();
        for id in 0..(MIN_REMEMBERED_REQUESTS as u128 + 5) {
            table.record(RequestId(id), outcome(id as u64));
        }
        assert_eq!(table.len(), MIN_REMEMBERED_REQUESTS);
        assert!(table.duplicate_outcome(RequestId(4)).is_none());
        assert!(table.duplicate_outcome(RequestId(5)).is_some());
        // Once log time starts they age from there.
        table.observe_entry(1, T);
        for id in 0..100_u128 {
            table.record(RequestId(1_000_000 + id), outcome(1));
        }
        assert_eq!(table.len(), MIN_REMEMBERED_REQUESTS + 100);
    }

    #[test]
    fn stored_and_read_back_with_the_clock_and_long_errors_cut() {
        let mut table = filled(0);
        table.record(RequestId(u128::MAX), outcome(1));
        advance(&mut table, 1_500);
        table.record(RequestId(3), RecordedOutcome { applied_index: 2, operations: 0, error: Some("é".repeat(300)) });
        let json = serde_json::to_string(&table).unwrap();
        assert!(
            json.starts_with(r#"{"clock":{"elapsed_ms":1500,"last_stamp_ms":1700000001500,"last_term":1},"records":""#),
            "{json}"
        );
        let back: AppliedRequests = serde_json::from_str(&json).unwrap();
        assert_eq!(back, table);
        let order: Vec<_> =
            back.order.iter().map(|remembered| (remembered.request_id, remembered.recorded_at)).collect();
        assert_eq!(order, [(RequestId(u128::MAX), 0), (RequestId(3), 1_500)]);
        assert!(back.duplicate_outcome(RequestId(3)).unwrap().error.unwrap().len() <= MAX_KEPT_ERROR_BYTES);
        // About 32 bytes a request in a marker.
        let full = filled(10_000);
        let json = serde_json::to_string(&full).unwrap();
        assert!(json.len() < 10_000 * 40, "{} bytes for 10,000 requests", json.len());
        assert_eq!(serde_json::from_str::<AppliedRequests>(&json).unwrap(), full);
    }

    #[test]
    fn markers_of_before_log_time_still_read() {
        let listed = r#"[{"id":"ffffffffffffffffffffffffffffffff","index":1,"operations":1},{"id":"3","index":2,"operations":0,"error":"bad"}]"#;
        let table: AppliedRequests = serde_json::from_str(listed).unwrap();
        assert_eq!((table.len(), table.clock()), (2, LogClock::default()));
        assert_eq!(table.duplicate_outcome(RequestId(u128::MAX)).unwrap().applied_index, 1);
        assert_eq!(table.duplicate_outcome(RequestId(3)).unwrap().error.as_deref(), Some("bad"));
        assert_eq!(serde_json::from_str::<AppliedRequests>("[]").unwrap(), AppliedRequests::default());
    }

    fn compact_json(clock_ms: u64, records: &[(u8, u64)]) -> String {
        let mut bytes = Vec::new();
        for &(id, age_ms) in records {
            let record = StoredRecord { id: [id; 16], applied_index: 1, operations: 1, age_ms, error: None };
            bytes = postcard::to_extend(&record, bytes).unwrap();
        }
        let records = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        let clock = LogClock { elapsed_ms: clock_ms, last_stamp_ms: T, last_term: 1 };
        serde_json::to_string(&CompactTable { clock, records }).unwrap()
    }

    #[test]
    fn damaged_markers_are_refused_not_misread() {
        assert!(serde_json::from_str::<AppliedRequests>(&compact_json(100, &[(1, 10), (2, 0)])).is_ok());
        let clock = r#""clock":{"elapsed_ms":5,"last_stamp_ms":1,"last_term":1}"#;
        let bad = [
            ("a bad hex id", r#"[{"id":"zz","index":1,"operations":1}]"#.to_string()),
            ("bad base64", format!(r#"{{{clock},"records":"not base64!"}}"#)),
            ("a cut record", format!(r#"{{{clock},"records":"AAAA"}}"#)),
            ("an unknown field", format!(r#"{{{clock},"records":"","more":1}}"#)),
            ("no clock", r#"{"records":""}"#.to_string()),
            ("a number", "5".to_string()),
            ("out of order", compact_json(100, &[(1, 0), (2, 10)])),
            ("older than log time", compact_json(100, &[(1, 101)])),
            ("an id twice", compact_json(100, &[(1, 10), (1, 0)])),
        ];
        for (case, json) in bad {
            assert!(serde_json::from_str::<AppliedRequests>(&json).is_err(), "{case}: {json}");
        }
    }
}
