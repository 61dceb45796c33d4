//! Membership changes: a node joins (the joining side asks its seeds; the leader adds it as a
//! learner, waits for it to catch up, promotes it) and a member leaves (the leader checks the
//! quorum guard, removes it, tells it). One change at a time.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tokio::sync::watch;

use super::decisions::{self, JoinDecision};
use super::{Cluster, ClusterError, ClusterEvent, ClusterResult};
use crate::protocol::{AdminRequest, AdminResponse, ErrorCode, StreamKind};
use crate::raft::types::MemberNode;

/// How long one probe of a voter waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `leave` keeps probing a voter that does not answer before it counts it as down.
const PROBE_PATIENCE: Duration = Duration::from_secs(3);
/// Pause between two probes of a voter that did not answer.
const PROBE_PAUSE: Duration = Duration::from_millis(200);

type MembershipChangeResult = Result<
    openraft::raft::ClientWriteResponse<crate::raft::types::TypeConfig>,
    RaftError<u64, ClientWriteError<u64, MemberNode>>,
>;

/// Runs a membership change, waiting (bounded) while the previous one is still being committed:
/// a change made right after another (a join after a leave) otherwise fails with "in progress".
async fn retry_while_changing<F, Fut>(mut change: F) -> MembershipChangeResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = MembershipChangeResult>,
{
    let mut attempts = 0;
    loop {
        let result = change().await;
        let in_progress = matches!(
            &result,
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                openraft::error::ChangeMembershipError::InProgress(_)
            )))
        );
        attempts += 1;
        if !in_progress || attempts >= 50 {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    /// Whether the node at `address` answers a status request within [`PROBE_PATIENCE`]. Tried
    /// again until then: a node that restarted at the same address leaves behind a pooled
    /// connection nobody answers on (a failed try drops it, the next one dials afresh), and a
    /// node that is starting up answers a moment later.
    pub(super) async fn answers_probe(&self, address: &str) -> bool {
        let deadline = tokio::time::Instant::now() + PROBE_PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let probe = self
                .inner
                .peers
                .call::<_, AdminResponse>(
                    address,
                    StreamKind::Admin,
                    &AdminRequest::LocalStatus,
                    PROBE_TIMEOUT.min(left),
                )
                .await;
            if probe.is_ok() {
                return true;
            }
            tokio::time::sleep(PROBE_PAUSE.min(left)).await;
        }
    }

    /// Leader side of a join: checks that the node at `address` is who it says, then learner,
    /// caught up, voter (see `decisions::join_decision`). Other nodes forward it to the leader.
    pub async fn handle_join(&self, node_id: u64, address: String, incarnation: u64) -> ClusterResult<AdminResponse> {
        if !self.is_leader() {
            return self.forward_admin_to_leader(&AdminRequest::Join { node_id, address, incarnation }).await;
        }
        let _one_change_at_a_time = self.inner.membership_change.lock().await;
        let membership = self.raft().metrics().borrow().membership_config.membership().clone();
        let is_voter = membership.voter_ids().any(|voter| voter == node_id);
        let joined =
            || AdminResponse::Joined { leader: self.node_id(), cluster_id: self.cluster_id().unwrap_or_default() };
        match decisions::join_decision(node_id, membership.get_node(&node_id), is_voter, &address, incarnation) {
            JoinDecision::Refuse(reason) => return Err(ClusterError::Refused(reason)),
            JoinDecision::AlreadyVoter => return Ok(joined()),
            JoinDecision::Promote => {}
            JoinDecision::AddLearner => {
                self.inner.peers.verify_node_at(node_id, &address).await?;
                tracing::info!(node_id, %address, "adding a learner");
                // Blocks until the learner has caught up with the leader's log (or installed a
                // snapshot).
                let learner = MemberNode::new(address.clone(), incarnation);
                retry_while_changing(|| self.raft().add_learner(node_id, learner.clone(), true)).await.map_err(
                    |error| ClusterError::Unavailable(format!("cannot add node {node_id} as a learner: {error}")),
                )?;
            }
        }
        tracing::info!(node_id, "promoting to voter");
        retry_while_changing(|| {
            self.raft().change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), false)
        })
        .await
        .map_err(|error| ClusterError::Unavailable(format!("cannot promote node {node_id} to voter: {error}")))?;
        Ok(joined())
    }

    /// Which voters answer a direct probe (this node always does), all probed at once. The
    /// exchange notices a dead node only after seconds, and a restarted one may not have reached
    /// it yet: a membership change counts only on nodes that answer.
    async fn answering_voters(&self, voters: &BTreeSet<u64>) -> BTreeSet<u64> {
        let members = self.members();
        let mut probes = tokio::task::JoinSet::new();
        for voter in voters {
            let Some(node) = members.get(voter) else { continue };
            let (cluster, voter, address) = (self.clone(), *voter, node.addr.clone());
            probes.spawn(async move {
                if voter == cluster.node_id() {
                    return Some(voter);
                }
                cluster.answers_probe(&address).await.then_some(voter)
            });
        }
        let mut answering = BTreeSet::new();
        while let Some(probe) = probes.join_next().await {
            if let Ok(Some(voter)) = probe {
                answering.insert(voter);
            }
        }
        answering
    }

    /// Leader side of a leave: refuses to remove a member when the voters that answer would not
    /// be a quorum (`decisions::leave_guard`), unless forced; then removes it and tells it. The
    /// leader may remove itself: it answers first, and stops once the new membership is
    /// committed.
    pub async fn handle_leave(&self, node_id: u64, force: bool) -> ClusterResult<AdminResponse> {
        if !self.is_leader() {
            return self.forward_admin_to_leader(&AdminRequest::Leave { node_id, force }).await;
        }
        let _one_change_at_a_time = self.inner.membership_change.lock().await;
        let membership = self.raft().metrics().borrow().membership_config.membership().clone();
        let Some(node) = membership.get_node(&node_id).cloned() else {
            return Err(ClusterError::Refused(format!("node {node_id} is not a member")));
        };
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if voters.len() == 1 && voters.contains(&node_id) {
            return Err(ClusterError::Refused(format!("node {node_id} is the last voter and cannot leave")));
        }
        if !force {
            let answering = self.answering_voters(&voters).await;
            decisions::leave_guard(&voters, node_id, &answering).map_err(ClusterError::Refused)?;
        }
        let change = if voters.contains(&node_id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        match retry_while_changing(|| self.raft().change_membership(change.clone(), false)).await {
            Ok(_) => {}
            // openraft refused before proposing anything: leadership moved while the voters were
            // probed. Nothing changed, so the new leader may decide (and checks again).
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                drop(_one_change_at_a_time);
                return self.forward_admin_to_leader(&AdminRequest::Leave { node_id, force }).await;
            }
            Err(error) => {
                return Err(ClusterError::Unavailable(format!("cannot remove node {node_id}: {error}")));
            }
        }
        tracing::info!(node_id, "removed a member");
        if node_id != self.node_id() {
            self.inner.table.forget(node_id);
            // Tell the removed node, so it stops instead of campaigning. It checks with the
            // other members before it believes it (and notices by itself when the new
            // membership reaches it).
            let notice = AdminRequest::Removed { node_id, incarnation: node.incarnation };
            if let Err(error) = self
                .inner
                .peers
                .call::<_, AdminResponse>(&node.addr, StreamKind::Admin, &notice, Duration::from_secs(2))
                .await
            {
                tracing::info!(node_id, %error, "could not tell the removed node; it stops when it learns the membership");
            }
        }
        // This node, when it removed itself, stops through the removal watch once the
        // membership without it is committed; the owner lets this answer go out first.
        Ok(AdminResponse::Left { node_id })
    }
}

/// Joining side: learns the members and the leader from the seeds through the membership
/// exchange (any seed will do; dead ones are skipped), then asks the leader — or, failing that,
/// each seed, which forwards — to admit this node. Retries with backoff until it is a voter, the
/// cluster refuses it for good, or `--join-timeout` passes.
pub(super) async fn join_through_seeds(cluster: Cluster, mut shutdown: watch::Receiver<bool>) {
    let config = cluster.inner.config.clone();
    let request = AdminRequest::Join {
        node_id: config.node_id,
        address: config.address.clone(),
        incarnation: config.incarnation,
    };
    let mut backoff = Duration::from_millis(200);
    let started = tokio::time::Instant::now();
    let seeds: Vec<String> = config.seeds.iter().map(|(node_id, address)| format!("{node_id}={address}")).collect();
    let mut last_error = String::from("no seed answered");
    loop {
        if started.elapsed() >= config.join_timeout {
            let reason = format!(
                "gave up after {}s: {last_error}; seeds tried: {}; check --peers, that those nodes run, and that they \
                 share this node's CA (--join-timeout sets how long to try)",
                config.join_timeout.as_secs(),
                seeds.join(", ")
            );
            tracing::error!(%reason, "could not join the cluster");
            cluster.emit(ClusterEvent::JoinFailed { reason });
            return;
        }
        let mut answered = 0;
        for (seed, seed_address) in &config.seeds {
            if cluster.exchange_with(*seed, seed_address).await.is_ok() {
                answered += 1;
            }
        }
        let mut targets: Vec<String> = Vec::new();
        if let Some((_, leader_address)) = cluster.inner.table.leader_hint() {
            targets.push(leader_address);
        }
        targets.extend(config.seeds.iter().map(|(_, address)| address.clone()));
        targets.dedup();
        if answered == 0 {
            tracing::warn!(
                seeds = %seeds.join(", "),
                retry_in_ms = backoff.as_millis() as u64,
                "no seed answered the membership exchange; retrying"
            );
        } else {
            tracing::info!(seeds_answering = answered, targets = %targets.join(", "), "asking to join");
        }
        for target in &targets {
            match cluster
                .inner
                .peers
                .call::<_, AdminResponse>(target, StreamKind::Admin, &request, config.max_request_timeout)
                .await
            {
                Ok(AdminResponse::Joined { leader, cluster_id }) => {
                    cluster.adopt_cluster_id(cluster_id.clone());
                    tracing::info!(
                        leader,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "joined the cluster as a voter"
                    );
                    cluster.emit(ClusterEvent::Joined { cluster_id, leader });
                    return;
                }
                Ok(_) => tracing::warn!(%target, "answered the join with another message"),
                Err(error) if matches!(error.code, ErrorCode::InvalidArgument | ErrorCode::PermissionDenied) => {
                    tracing::error!(%target, error = %error.message, "the cluster refused this node");
                    cluster.emit(ClusterEvent::JoinFailed { reason: error.message });
                    return;
                }
                Err(error) => {
                    tracing::info!(%target, error = %error.message, "could not join through this node yet");
                    last_error = format!("{target}: {}", error.message);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
