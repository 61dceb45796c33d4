//! Group commit: concurrent client writes on the leader share one Raft entry, so one log append
//! and one fsync carry all of them (as etcd and every serious log do).
//!
//! openraft 0.9 appends (and so fsyncs) once per `client_write`. Without grouping, 64 clients
//! each putting one document cost 64 appends where one would do. Here every write the leader
//! takes goes through one queue; a single task takes what is waiting, up to [`GroupLimits`],
//! and proposes it as one entry while at most [`GROUPS_IN_FLIGHT`] entries are on their way. It
//! never waits for company: a lone write is proposed at once (no timer, so c=1 pays nothing);
//! writes group exactly when the ones before them keep the log busy.
//!
//! What may be grouped is decided by [`groupable`]: requests of plain puts and deletes, with a
//! request id. Commits, rollbacks, merges, key changes and internal batches always go alone.
//! The state machine applies each grouped request on its own (own request id, own outcome, own
//! refusal), and refuses a grouped request that is not plain, alike on every replica.

use std::sync::Arc;
use std::time::Instant;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::Instrument;

use super::{ClusterError, ClusterResult};
use crate::index::IndexOperation;
use crate::raft::state_machine::groupable_operations;
use crate::raft::types::{BatchOutcome, GroupedRequest, IndexBatch, Raft, MAX_REQUESTS_PER_ENTRY};

/// Entries proposed and not yet applied, at most. Two keep the log busy (one being appended
/// while the one before is applied) without letting a burst split into many small entries.
pub const GROUPS_IN_FLIGHT: usize = 2;
/// Writes waiting for the group task, at most; senders wait beyond it. The node's write
/// limits (`--max-concurrent-writes`) keep it far from full.
const QUEUE_CAPACITY: usize = 4096;

/// How large one grouped entry may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Requests in one entry.
    pub max_requests: usize,
    /// Operations in one entry.
    pub max_operations: usize,
    /// Estimated bytes of one entry: kept at the largest request a client may send, so that a
    /// grouped entry crosses to the followers like any single request does.
    pub max_bytes: usize,
}

impl GroupLimits {
    pub fn for_frame_limit(max_frame_bytes: usize) -> GroupLimits {
        GroupLimits { max_requests: MAX_REQUESTS_PER_ENTRY, max_operations: 10_000, max_bytes: max_frame_bytes / 2 }
    }
}

/// Whether a batch may share an entry with others (see the module's comment).
pub fn groupable(batch: &IndexBatch) -> bool {
    batch.request_id.is_some()
        && batch.keys.is_none()
        && batch.grouped.is_empty()
        && groupable_operations(&batch.operations)
}

/// The estimated encoded size of a batch's operations.
pub fn batch_bytes(batch: &IndexBatch) -> usize {
    batch
        .operations
        .iter()
        .map(|operation| match operation {
            IndexOperation::Put { id, document_json } => id.len() + document_json.len() + 8,
            IndexOperation::Delete { id } => id.len() + 8,
            _ => 8,
        })
        .sum::<usize>()
        + 24
}

/// What a group holds so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupSize {
    pub requests: usize,
    pub operations: usize,
    pub bytes: usize,
}

impl GroupSize {
    fn add(&mut self, operations: usize, bytes: usize) {
        self.requests += 1;
        self.operations += operations;
        self.bytes += bytes;
    }
}

/// Whether a request of `operations` and `bytes` joins a group of `size`. A group always takes
/// its first request, whatever its size (it was admitted as a request on its own).
pub fn joins(size: GroupSize, operations: usize, bytes: usize, limits: GroupLimits) -> bool {
    size.requests == 0
        || (size.requests < limits.max_requests
            && size.operations + operations <= limits.max_operations
            && size.bytes + bytes <= limits.max_bytes)
}

/// A write waiting for its entry.
struct Pending {
    batch: IndexBatch,
    deadline: Instant,
    answer: oneshot::Sender<ClusterResult<BatchOutcome>>,
}

/// The leader's queue of writes; clones share it. The task behind it ends when the last clone
/// is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the group task on the current runtime.
    pub fn start(raft: Raft, limits: GroupLimits) -> GroupCommit {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(group_task(raft, receiver, limits));
        GroupCommit { queue }
    }

    /// Proposes `batch` (alone or with others) and waits until its entry is applied here.
    pub async fn propose(&self, batch: IndexBatch, deadline: Instant) -> ClusterResult<BatchOutcome> {
        let (answer, outcome) = oneshot::channel();
        self.queue
            .send(Pending { batch, deadline, answer })
            .await
            .map_err(|_| ClusterError::Unavailable("the node is shutting down".into()))?;
        outcome.await.map_err(|_| ClusterError::Unavailable("the write's group was dropped (raft stopped)".into()))?
    }
}

async fn group_task(raft: Raft, mut receiver: mpsc::Receiver<Pending>, limits: GroupLimits) {
    let in_flight = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        // Wait for room first: the writes that arrive meanwhile are the group.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { return };
        let first = match carried.take() {
            Some(pending) => pending,
            None => match receiver.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let mut group = Vec::new();
        let mut size = GroupSize::default();
        if groupable(&first.batch) {
            size.add(first.batch.operations.len(), batch_bytes(&first.batch));
            group.push(first);
            while let Ok(next) = receiver.try_recv() {
                let (operations, bytes) = (next.batch.operations.len(), batch_bytes(&next.batch));
                if !groupable(&next.batch) || !joins(size, operations, bytes, limits) {
                    carried = Some(next);
                    break;
                }
                size.add(operations, bytes);
                group.push(next);
            }
        } else {
            group.push(first);
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            propose_group(&raft, group).await;
            drop(permit);
        });
    }
}

/// Proposes one entry for `group` and hands every member its own outcome. Writes whose caller
/// gave up (deadline passed) are left out: nothing is appended after a caller's deadline.
async fn propose_group(raft: &Raft, group: Vec<Pending>) {
    let now = Instant::now();
    let (live, expired): (Vec<Pending>, Vec<Pending>) = group.into_iter().partition(|pending| pending.deadline > now);
    for pending in expired {
        let _ = pending.answer.send(Err(ClusterError::DeadlinePassed));
    }
    // The group waits for its entry no longer than its most patient member: a leader cut off
    // from its quorum would otherwise hold this slot (and the queue behind it) until it hears of
    // a newer term.
    let Some(latest_deadline) = live.iter().map(|pending| pending.deadline).max() else { return };
    let mut live = live.into_iter();
    let Some(head) = live.next() else { return };
    let rest: Vec<Pending> = live.collect();
    let mut batch = head.batch;
    let mut answers = vec![head.answer];
    for pending in rest {
        let Some(request_id) = pending.batch.request_id else {
            let _ = pending.answer.send(Err(ClusterError::Internal("a grouped write has no request id".into())));
            continue;
        };
        batch.grouped.push(GroupedRequest { operations: pending.batch.operations, request_id });
        answers.push(pending.answer);
    }
    // Stamped here, by the leader, whatever a forwarding member sent: the request table ages by
    // these stamps (`raft::dedup`).
    batch.proposed_at_ms = unix_ms_now();
    crate::telemetry::metrics::record_write_group(answers.len());
    let operations =
        batch.operations.len() + batch.grouped.iter().map(|request| request.operations.len()).sum::<usize>();
    let span = tracing::info_span!("bayard.raft_write", requests = answers.len(), operations);
    let write = raft.client_write(std::sync::Arc::new(batch)).instrument(span);
    let Ok(result) = tokio::time::timeout_at(latest_deadline.into(), write).await else {
        // Proposed, not known committed: it may still be applied. Its request ids make a retry
        // apply at most once.
        for answer in answers {
            let _ = answer.send(Err(ClusterError::Unavailable(
                "the write was proposed but not committed before its deadline; it may still be applied, and a \
                 retry under the same request id is applied at most once"
                    .into(),
            )));
        }
        return;
    };
    match result {
        Ok(response) => {
            let mut outcome = response.data;
            let grouped = std::mem::take(&mut outcome.grouped);
            if grouped.len() + 1 != answers.len() {
                let message = format!("an entry of {} requests answered {} outcomes", answers.len(), grouped.len() + 1);
                for answer in answers {
                    let _ = answer.send(Err(ClusterError::Internal(message.clone())));
                }
                return;
            }
            for (answer, outcome) in answers.into_iter().zip(std::iter::once(outcome).chain(grouped)) {
                let _ = answer.send(Ok(outcome));
            }
        }
        Err(error) => {
            let error = match error {
                // The caller names this node and the leader it knows of (`propose_as_leader`).
                RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                    ClusterError::NotLeader { node_id: 0, leader: None }
                }
                RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
                    ClusterError::Internal(error.to_string())
                }
                RaftError::Fatal(fatal) => ClusterError::Unavailable(format!("raft stopped: {fatal}")),
            };
            for answer in answers {
                let _ = answer.send(Err(error.clone()));
            }
        }
    }
}

/// The wall clock in Unix milliseconds (0 if it reads before 1970, which the table ignores).
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::KeyChange;
    use crate::raft::types::RequestId;

    fn put(id: &str) -> IndexOperation {
        IndexOperation::Put { id: id.into(), document_json: format!(r#"{{"_id":"{id}"}}"#) }
    }

    #[test]
    fn only_plain_client_requests_are_grouped() {
        let request = RequestId(1);
        let with_keys = IndexBatch {
            keys: Some(KeyChange::Revoke { id: "k".into() }),
            ..IndexBatch::of_request(Vec::new(), request)
        };
        let already_grouped = IndexBatch {
            grouped: vec![GroupedRequest { operations: vec![put("b")], request_id: RequestId(2) }],
            ..IndexBatch::of_request(vec![put("a")], request)
        };
        let cases: Vec<(&str, IndexBatch, bool)> = vec![
            ("one put", IndexBatch::of_request(vec![put("a")], request), true),
            (
                "puts and deletes",
                IndexBatch::of_request(vec![put("a"), IndexOperation::Delete { id: "b".into() }], request),
                true,
            ),
            ("no operations", IndexBatch::of_request(Vec::new(), request), true),
            ("a commit", IndexBatch::of_request(vec![IndexOperation::Commit], request), false),
            ("a put then a commit", IndexBatch::of_request(vec![put("a"), IndexOperation::Commit], request), false),
            ("a rollback", IndexBatch::of_request(vec![IndexOperation::Rollback], request), false),
            ("a merge", IndexBatch::of_request(vec![IndexOperation::Merge], request), false),
            ("internal (no request id)", IndexBatch::internal(vec![put("a")]), false),
            ("a key change", with_keys, false),
            ("already a group", already_grouped, false),
        ];
        for (name, batch, expected) in cases {
            assert_eq!(groupable(&batch), expected, "{name}");
        }
    }

    #[test]
    fn groups_stop_at_their_limits() {
        let limits = GroupLimits { max_requests: 3, max_operations: 100, max_bytes: 1000 };
        let size = |requests, operations, bytes| GroupSize { requests, operations, bytes };
        let cases = [
            ("an empty group takes anything", size(0, 0, 0), 5000, 50_000, true),
            ("room left", size(1, 10, 100), 10, 100, true),
            ("exactly at the operation limit", size(1, 90, 100), 10, 100, true),
            ("over the operation limit", size(1, 91, 100), 10, 100, false),
            ("exactly at the byte limit", size(2, 2, 900), 1, 100, true),
            ("over the byte limit", size(2, 2, 901), 1, 100, false),
            ("at the request limit", size(3, 3, 30), 1, 10, false),
        ];
        for (name, group, operations, bytes, expected) in cases {
            assert_eq!(joins(group, operations, bytes, limits), expected, "{name}");
        }
    }

    #[test]
    fn sizes_count_what_is_sent() {
        let small = IndexBatch::of_request(vec![IndexOperation::Delete { id: "abc".into() }], RequestId(1));
        let large = IndexBatch::of_request(vec![put(&"x".repeat(1000))], RequestId(1));
        assert!(batch_bytes(&small) < 64);
        assert!(batch_bytes(&large) > 2000);
        let limits = GroupLimits::for_frame_limit(16 * 1024 * 1024);
        assert_eq!(limits.max_bytes, 8 * 1024 * 1024);
    }
}
