//! At-most-once application of client requests.
//!
//! A write whose answer was lost (the leader died after committing it, a connection dropped) is
//! retried, by the node that forwarded it or by the client, and may then reach the log twice.
//! Puts and deletes are not idempotent once anything else happened in between (a resent put of
//! `x` landing after a newer put of `x` reverts it), and a resent `Rollback` would discard writes
//! acknowledged meanwhile. So every client request carries a [`RequestId`], and the state machine
//! remembers the ids of the last [`REQUEST_WINDOW`] requests it applied: an entry with a known id
//! changes nothing and answers with the first outcome.
//!
//! The table is part of the replicated state: it changes only as entries are applied, so every
//! replica holds the same one at the same log position. It is stored with every index commit
//! (in the commit marker), so it survives restarts (the entries after the commit are replayed
//! onto it) and travels in snapshots. The window is a constant, not a flag: replicas with
//! different windows would decide differently and diverge.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::types::{BatchOutcome, RequestId};

/// How many of the most recent request ids the state machine remembers. A retry arrives within
/// seconds of its first attempt; ten thousand requests cover that at the write rates this node
/// sustains, and cost about 0.8 MB of JSON in every commit marker once full.
pub const REQUEST_WINDOW: usize = 10_000;

/// Longest refusal message kept with a request (the rest is cut).
const MAX_KEPT_ERROR_BYTES: usize = 256;

/// What the first application of a request reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedOutcome {
    pub applied_index: u64,
    pub operations: u64,
    pub error: Option<String>,
}

/// The ids of the most recently applied requests, oldest first, with their outcomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedRequests {
    order: VecDeque<RequestId>,
    outcomes: HashMap<RequestId, RecordedOutcome>,
}

impl AppliedRequests {
    /// The outcome of `request_id`'s first application, when it is within the window.
    pub fn duplicate_outcome(&self, request_id: RequestId) -> Option<BatchOutcome> {
        self.outcomes.get(&request_id).map(|recorded| BatchOutcome {
            applied_index: recorded.applied_index,
            operations: recorded.operations,
            error: recorded.error.clone(),
            duplicate: true,
            grouped: Vec::new(),
        })
    }

    /// Remembers a request, forgetting the oldest beyond the window. Recording an id again
    /// replaces its outcome (the state machine records before applying and again after).
    pub fn record(&mut self, request_id: RequestId, mut outcome: RecordedOutcome) {
        if let Some(error) = &mut outcome.error {
            if error.len() > MAX_KEPT_ERROR_BYTES {
                let mut end = MAX_KEPT_ERROR_BYTES;
                while !error.is_char_boundary(end) {
                    end -= 1;
                }
                error.truncate(end);
            }
        }
        if self.outcomes.insert(request_id, outcome).is_none() {
            self.order.push_back(request_id);
        }
        while self.order.len() > REQUEST_WINDOW {
            if let Some(oldest) = self.order.pop_front() {
                self.outcomes.remove(&oldest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// How the table is written in a commit marker: a list, oldest first, ids in hex (JSON numbers
/// do not hold 128 bits everywhere).
#[derive(Serialize, Deserialize)]
struct StoredRequest {
    id: String,
    index: u64,
    operations: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Serialize for AppliedRequests {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut sequence = serializer.serialize_seq(Some(self.order.len()))?;
        for request_id in &self.order {
            if let Some(outcome) = self.outcomes.get(request_id) {
                sequence.serialize_element(&StoredRequest {
                    id: request_id.to_string(),
                    index: outcome.applied_index,
                    operations: outcome.operations,
                    error: outcome.error.clone(),
                })?;
            }
        }
        sequence.end()
    }
}

impl<'de> Deserialize<'de> for AppliedRequests {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = Vec::<StoredRequest>::deserialize(deserializer)?;
        let mut table = AppliedRequests::default();
        for request in stored {
            let id = u128::from_str_radix(&request.id, 16)
                .map_err(|error| serde::de::Error::custom(format!("request id {:?}: {error}", request.id)))?;
            table.record(
                RequestId(id),
                RecordedOutcome { applied_index: request.index, operations: request.operations, error: request.error },
            );
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
    fn the_window_forgets_the_oldest() {
        let mut table = AppliedRequests::default();
        for id in 0..(REQUEST_WINDOW as u128 + 5) {
            table.record(RequestId(id), outcome(id as u64));
        }
        assert_eq!(table.len(), REQUEST_WINDOW);
        assert!(table.duplicate_outcome(RequestId(4)).is_none());
        assert!(table.duplicate_outcome(RequestId(5)).is_some());
    }

    #[test]
    fn stored_and_read_back_in_order_with_long_errors_cut() {
        let mut table = AppliedRequests::default();
        table.record(RequestId(u128::MAX), outcome(1));
        table.record(RequestId(3), RecordedOutcome { applied_index: 2, operations: 0, error: Some("é".repeat(300)) });
        let json = serde_json::to_string(&table).unwrap();
        assert!(json.starts_with(r#"[{"id":"ffffffffffffffffffffffffffffffff","index":1,"operations":1}"#), "{json}");
        let back: AppliedRequests = serde_json::from_str(&json).unwrap();
        assert_eq!(back, table);
        assert!(back.duplicate_outcome(RequestId(3)).unwrap().error.unwrap().len() <= MAX_KEPT_ERROR_BYTES);
        assert!(serde_json::from_str::<AppliedRequests>(r#"[{"id":"zz","index":1,"operations":1}]"#).is_err());
    }
}
