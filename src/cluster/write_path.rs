//! The write path: a write is proposed on the leader (here, or forwarded to it), committed by a
//! quorum and applied; reads that must be served by the leader are forwarded the same way.
//! Automatic commits are proposed by the leader, so that every replica commits at the same log
//! positions.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{Cluster, ClusterError, ClusterResult};
use crate::index::IndexOperation;
use crate::protocol::{
    AdminRequest, AdminResponse, ClientRequest, ClientResponse, ErrorCode, LeaderHint, RaftRequest, RaftResponse,
    StreamKind,
};
use crate::raft::types::{BatchOutcome, IndexBatch};

/// How long a write waits for a leader to appear before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(5);
/// Tries of a write across leadership changes, at most (the deadline ends them sooner).
const PROPOSE_ATTEMPTS: usize = 64;
/// The pause between two tries of a write while the leader stays the same. Tries go on until
/// the deadline, so a leader whose dial failed is dialled again once the pool's one-second
/// memory of that failure has passed.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

fn outcome_to_result(outcome: BatchOutcome) -> ClusterResult<BatchOutcome> {
    match &outcome.error {
        Some(message) => Err(ClusterError::Refused(message.clone())),
        None => Ok(outcome),
    }
}

impl Cluster {
    /// This node as a leader hint.
    fn own_hint(&self) -> LeaderHint {
        LeaderHint { node_id: self.node_id(), address: self.inner.config.address.clone() }
    }

    /// A leader cut off from its quorum keeps believing it leads until it hears of a newer term;
    /// its writes could never commit. Refuse them at once instead of letting them hang.
    fn check_leader_quorum(&self) -> ClusterResult<()> {
        let silence = self.raft().metrics().borrow().millis_since_quorum_ack;
        // At least a second: with LAN timings a short stall of the leader must not refuse writes.
        let limit = (self.inner.config.election_timeout_max * 2).max(Duration::from_secs(1));
        match silence {
            Some(silence) if Duration::from_millis(silence) > limit => {
                Err(ClusterError::NoQuorum { node_id: self.node_id(), silence_millis: silence })
            }
            _ => Ok(()),
        }
    }

    /// Appends a batch through this node's Raft, which must be the leader and lead a quorum
    /// (forwarded proposals are checked like local ones). Returns once the entry is committed
    /// and applied here. Nothing is appended once `deadline` has passed: the caller has given up.
    pub async fn propose_as_leader(&self, batch: IndexBatch, deadline: Instant) -> ClusterResult<BatchOutcome> {
        let deadline = clamp_write_deadline(deadline);
        if Instant::now() >= deadline {
            return Err(ClusterError::DeadlinePassed);
        }
        if !self.is_leader() {
            return Err(ClusterError::NotLeader { node_id: self.node_id(), leader: self.known_leader() });
        }
        self.check_leader_quorum()?;
        // Groups are made here, by the leader; a forwarded write is one request.
        if !batch.grouped.is_empty() {
            return Err(ClusterError::Refused("a proposed write must carry one request, not a group".into()));
        }
        // Through the group commit: concurrent writes share one entry and one fsync.
        match self.inner.group_commit.propose(batch, deadline).await {
            Ok(outcome) => outcome_to_result(outcome),
            Err(ClusterError::NotLeader { .. }) => {
                Err(ClusterError::NotLeader { node_id: self.node_id(), leader: self.known_leader() })
            }
            Err(ClusterError::Unavailable(message)) => {
                Err(ClusterError::Unavailable(format!("on node {}: {message}", self.node_id())))
            }
            Err(error) => Err(error),
        }
    }

    /// Appends a batch to the replicated log from any node: locally when this node leads, else
    /// forwarded to the leader. Returns the outcome and the leader that committed it.
    ///
    /// Leadership changes in between are retried a bounded number of times. That is safe because
    /// the batch carries its request id through every retry: if an attempt whose answer was lost
    /// did commit, the state machine applies the retry as a duplicate (nothing changes) and
    /// answers with the first outcome.
    ///
    /// No attempt starts after `deadline`, the caller's: a write its client gave up on (and so
    /// reported as failed) must not be proposed later, when a leader turns up.
    pub async fn propose(&self, batch: IndexBatch, deadline: Instant) -> ClusterResult<(BatchOutcome, LeaderHint)> {
        let deadline = clamp_write_deadline(deadline);
        let mut last_error = ClusterError::NoLeader;
        // Whether an attempt reached a leader: at the deadline, such a write may still be
        // applied, and must not be reported as never proposed.
        let mut proposed = false;
        for _attempt in 0..PROPOSE_ATTEMPTS {
            let tried = self.known_leader().map(|leader| leader.node_id);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::info!(
                    request_id = ?batch.request_id.map(|id| id.0),
                    error = %last_error,
                    proposed,
                    "write abandoned at its deadline, never proposed after it"
                );
                if proposed {
                    return Err(ClusterError::Unavailable(format!(
                        "the write was not known to be committed before its deadline (at most {} s): it may still \
                         be applied, and a retry under the same request id is applied at most once ({last_error})",
                        crate::raft::dedup::LONGEST_WRITE_WAIT_MS / 1000
                    )));
                }
                return Err(ClusterError::DeadlinePassed);
            }
            if self.is_leader() {
                proposed = true;
                match self.propose_as_leader(batch.clone(), deadline).await {
                    Err(error) if error.is_retryable() && !matches!(error, ClusterError::NoQuorum { .. }) => {
                        last_error = error
                    }
                    Err(error) => return Err(error),
                    Ok(outcome) => return Ok((outcome, self.own_hint())),
                }
            } else if let Some(leader) = self.wait_for_leader(LEADER_WAIT.min(left)).await {
                if leader.node_id == self.node_id() {
                    continue;
                }
                proposed = true;
                let request = RaftRequest::Propose(batch.clone());
                let forward_span = tracing::info_span!(
                    "bayard.forward_to_leader",
                    leader = leader.node_id,
                    operations = batch.operations.len()
                );
                let forwarded = self
                    .inner
                    .peers
                    .call_until::<_, RaftResponse>(&leader.address, StreamKind::Raft, &request, deadline)
                    .instrument(forward_span);
                // A leader that died does not answer; as soon as Raft names another one, go there.
                let answer = tokio::select! {
                    answer = forwarded => answer.map_err(ClusterError::from),
                    () = self.leader_changes_from(leader.node_id) => {
                        Err(ClusterError::Unavailable(format!("leader {} was replaced", leader.node_id)))
                    }
                };
                match answer {
                    Ok(RaftResponse::Proposed(outcome)) => return outcome_to_result(outcome).map(|ok| (ok, leader)),
                    Ok(_) => {
                        return Err(ClusterError::Internal("the leader answered a write with another message".into()))
                    }
                    Err(error) if error.is_retryable() => last_error = error,
                    Err(error) => return Err(error),
                }
            }
            // Give an election (or a restarting leader) a moment before the next try: a new
            // leader ends the pause at once, the same one is tried again after it.
            let pause = RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()));
            match tried {
                Some(leader) => {
                    let _ = tokio::time::timeout(pause, self.leader_changes_from(leader)).await;
                }
                None => {
                    let _ = self.wait_for_leader(pause).await;
                }
            }
        }
        Err(last_error)
    }

    /// Sends a client request (a read that must be served by the leader) to the leader.
    pub async fn forward_to_leader(&self, request: &ClientRequest) -> ClusterResult<ClientResponse> {
        let leader = self.wait_for_leader(LEADER_WAIT).await.ok_or(ClusterError::NoLeader)?;
        if leader.node_id == self.node_id() {
            return Err(ClusterError::Unavailable("this node just became the leader; retry".into()));
        }
        self.inner
            .peers
            .call(&leader.address, StreamKind::Client, request, self.inner.config.max_request_timeout)
            .await
            .map_err(|error| match error.code {
                // The leader's own hint (a newer leader) is better than the one forwarded to.
                ErrorCode::Unavailable if error.leader.is_none() => {
                    ClusterError::Remote(error.with_leader(Some(leader.clone())))
                }
                _ => ClusterError::Remote(error),
            })
    }

    /// Sends an admin request (join, leave) to the leader.
    pub(super) async fn forward_admin_to_leader(&self, request: &AdminRequest) -> ClusterResult<AdminResponse> {
        let leader = self.wait_for_leader(LEADER_WAIT).await.ok_or(ClusterError::NoLeader)?;
        if leader.node_id == self.node_id() {
            return Err(ClusterError::Unavailable("this node just became the leader; retry".into()));
        }
        Ok(self
            .inner
            .peers
            .call(&leader.address, StreamKind::Admin, request, self.inner.config.max_request_timeout)
            .await?)
    }
}

/// On the leader, proposes a `Commit` entry whenever the index has uncommitted writes, every
/// commit interval. Commits are log entries so that every replica commits at the same positions:
/// that is what makes a replayed log and a rollback give the same index everywhere.
pub(super) async fn auto_commit(cluster: Cluster, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(cluster.inner.config.commit_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !cluster.is_leader() || !cluster.inner.index.current().has_uncommitted_changes() {
            continue;
        }
        let batch = IndexBatch::internal(vec![IndexOperation::Commit]);
        let deadline = Instant::now() + cluster.inner.config.max_request_timeout;
        if let Err(error) = cluster.propose_as_leader(batch, deadline).await {
            tracing::warn!(%error, "automatic commit failed");
        }
    }
}

/// A write is worked on for at most `LONGEST_WRITE_WAIT_MS`, whatever deadline its caller sent:
/// a retry after its answer was lost then comes while the state machine still remembers its
/// request id (`raft::dedup` keeps ids twice that long).
fn clamp_write_deadline(deadline: Instant) -> Instant {
    let longest = Instant::now() + Duration::from_millis(crate::raft::dedup::LONGEST_WRITE_WAIT_MS);
    deadline.min(longest)
}
