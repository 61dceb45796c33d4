//! Membership and everything that crosses nodes: forwarding writes and reads to the leader,
//! joining through seeds, leaving with a quorum guard, cluster status, leader-driven commits.
//!
//! Raft membership is the source of truth for who votes, where each member is reached and which
//! incarnation it joined with ([`MemberNode`]); the membership exchange ([`membership`]) carries
//! liveness, leaders and applied indexes between nodes.

pub mod admission;
pub mod membership;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument;

use crate::index::IndexOperation;
use crate::node::{NodeError, NodeState};
use crate::protocol::{
    AdminRequest, AdminResponse, ClientRequest, ClientResponse, ErrorCode, MemberStatus, NodeStatus, RaftRequest,
    RaftResponse, StreamKind, WireError,
};
use crate::raft::network::RAFT_FRAME_OVERHEAD_BYTES;
use crate::raft::types::{BatchOutcome, IndexBatch, MemberNode};
use crate::transport;
use membership::{Liveness, MembershipDigest, EXCHANGE_INTERVAL, FANOUT};

/// How long a write waits for a leader to appear before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(5);
/// How long `status` waits for each member.
const MEMBER_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

fn unavailable(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::Unavailable, message)
}

/// The leader this node knows of, with its address.
pub(crate) fn known_leader(state: &NodeState) -> Option<(u64, String)> {
    let metrics = state.raft.metrics().borrow().clone();
    let leader = metrics.current_leader?;
    let address = metrics.membership_config.membership().get_node(&leader)?.addr.clone();
    Some((leader, address))
}

pub(crate) fn is_leader(state: &NodeState) -> bool {
    state.raft.metrics().borrow().state == ServerState::Leader
}

/// Waits (bounded) until some leader is known.
async fn wait_for_leader(state: &NodeState, limit: Duration) -> Option<(u64, String)> {
    let mut metrics = state.raft.metrics();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(leader) = known_leader(state) {
            return Some(leader);
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => continue,
            _ => return None,
        }
    }
}

/// Completes when this node's Raft no longer names `leader` as the leader.
async fn leader_changes_from(state: &NodeState, leader: u64) {
    let mut metrics = state.raft.metrics();
    loop {
        if metrics.borrow_and_update().current_leader != Some(leader) {
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// One request/answer on a stream to another node, with this node's certificate.
pub(crate) async fn call_node<Request: Serialize, Response: DeserializeOwned>(
    state: &NodeState,
    address: &str,
    kind: StreamKind,
    request: &Request,
    timeout: Duration,
) -> Result<Response, WireError> {
    let connection =
        state.pool.get(address).await.map_err(|error| unavailable(format!("cannot reach {address}: {error}")))?;
    let frame_limit = state.config.max_frame_bytes + RAFT_FRAME_OVERHEAD_BYTES;
    let trace_context = crate::telemetry::current_traceparent();
    match transport::call::<Request, Response>(&connection, kind, trace_context, request, timeout, frame_limit).await {
        Ok(answer) => answer,
        Err(error) => {
            state.pool.forget(address);
            Err(unavailable(format!("{address} did not answer: {error}")))
        }
    }
}

fn outcome_to_result(outcome: BatchOutcome) -> Result<BatchOutcome, WireError> {
    match &outcome.error {
        Some(message) => Err(WireError::new(ErrorCode::InvalidArgument, message.clone())),
        None => Ok(outcome),
    }
}

/// Appends a batch through this node's Raft, which must be the leader. Returns once the entry is
/// committed and applied here.
pub(crate) async fn propose_as_leader(state: &NodeState, batch: IndexBatch) -> Result<BatchOutcome, WireError> {
    let span = tracing::info_span!("bayard.raft_write", operations = batch.operations.len());
    match state.raft.client_write(batch).instrument(span).await {
        Ok(response) => outcome_to_result(response.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            Err(unavailable(format!("node {} is not the leader", state.node_id())))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
            Err(WireError::new(ErrorCode::Internal, error.to_string()))
        }
        Err(RaftError::Fatal(fatal)) => Err(unavailable(format!("raft stopped on node {}: {fatal}", state.node_id()))),
    }
}

/// A leader cut off from its quorum keeps believing it leads until it hears of a newer term; its
/// writes could never commit. Refuse them at once instead of letting them hang until the deadline.
fn check_leader_quorum(state: &NodeState) -> Result<(), WireError> {
    let metrics = state.raft.metrics().borrow().clone();
    let limit = state.config.raft.election_timeout_max * 2;
    match metrics.millis_since_quorum_ack {
        Some(silence) if Duration::from_millis(silence) > limit => Err(unavailable(format!(
            "node {} leads no quorum: no majority has answered for {silence} ms; writes go to the majority's leader",
            state.node_id()
        ))),
        _ => Ok(()),
    }
}

/// Appends a batch to the replicated log from any node: locally when this node leads, else
/// forwarded to the leader. Leadership changes in between are retried, a bounded number of times.
pub(crate) async fn propose(state: &NodeState, batch: IndexBatch) -> Result<BatchOutcome, WireError> {
    let mut last_error = unavailable("no leader is known; the cluster may be electing one or have lost its quorum");
    for _attempt in 0..4 {
        if is_leader(state) {
            check_leader_quorum(state)?;
            match propose_as_leader(state, batch.clone()).await {
                Err(error) if error.code == ErrorCode::Unavailable => last_error = error,
                other => return other,
            }
        } else if let Some((leader, address)) = wait_for_leader(state, LEADER_WAIT).await {
            if leader == state.node_id() {
                continue;
            }
            let request = RaftRequest::Propose(batch.clone());
            let forward_span =
                tracing::info_span!("bayard.forward_to_leader", leader, operations = batch.operations.len());
            let forwarded = call_node::<_, RaftResponse>(
                state,
                &address,
                StreamKind::Raft,
                &request,
                state.config.max_request_timeout,
            )
            .instrument(forward_span);
            // A leader that died does not answer; as soon as Raft names another one, go there.
            // Re-proposing is safe: puts and deletes are idempotent.
            let answer = tokio::select! {
                answer = forwarded => answer,
                () = leader_changes_from(state, leader) => Err(unavailable(format!("leader {leader} was replaced"))),
            };
            match answer {
                Ok(RaftResponse::Proposed(outcome)) => return outcome_to_result(outcome),
                Ok(_) => {
                    return Err(WireError::new(ErrorCode::Internal, "the leader answered a write with another message"))
                }
                Err(error) if error.code == ErrorCode::Unavailable => last_error = error,
                Err(error) => return Err(error),
            }
        }
        // Give an election a moment before the next try.
        let _ = wait_for_leader(state, Duration::from_millis(300)).await;
    }
    Err(last_error)
}

/// Sends a client request (a read that must be served by the leader) to the leader.
pub(crate) async fn forward_to_leader(state: &NodeState, request: &ClientRequest) -> Result<ClientResponse, WireError> {
    let Some((leader, address)) = wait_for_leader(state, LEADER_WAIT).await else {
        return Err(unavailable("no leader is known; the cluster may be electing one or have lost its quorum"));
    };
    if leader == state.node_id() {
        return Err(unavailable("this node just became the leader; retry"));
    }
    call_node(state, &address, StreamKind::Client, request, state.config.max_request_timeout).await
}

/// Sends an admin request to the leader (join, leave).
async fn forward_admin_to_leader(state: &NodeState, request: &AdminRequest) -> Result<AdminResponse, WireError> {
    let Some((leader, address)) = wait_for_leader(state, LEADER_WAIT).await else {
        return Err(unavailable("no leader is known; the cluster may be electing one or have lost its quorum"));
    };
    if leader == state.node_id() {
        return Err(unavailable("this node just became the leader; retry"));
    }
    call_node(state, &address, StreamKind::Admin, request, state.config.max_request_timeout).await
}

/// Member id → address, from the Raft membership.
pub(crate) fn peers(state: &NodeState) -> BTreeMap<u64, String> {
    let metrics = state.raft.metrics().borrow().clone();
    metrics.membership_config.membership().nodes().map(|(id, node)| (*id, node.addr.clone())).collect()
}

fn server_state_name(server_state: ServerState) -> &'static str {
    match server_state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// This node's own state.
pub(crate) fn local_status(state: &NodeState) -> NodeStatus {
    let metrics = state.raft.metrics().borrow().clone();
    let index = state.index.current();
    NodeStatus {
        node_id: state.node_id(),
        cluster_id: state.cluster_id(),
        address: state.address.clone(),
        role: server_state_name(metrics.state).to_string(),
        leader: metrics.current_leader,
        term: metrics.current_term,
        applied_index: metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0),
        document_count: index.document_count(),
        segment_count: index.segment_count() as u64,
        version: env!("CARGO_PKG_VERSION").to_string(),
        members: Vec::new(),
    }
}

/// Every member of the Raft membership with its liveness, applied index and lag as the
/// membership exchange reports them.
fn member_states(state: &NodeState) -> Vec<MemberStatus> {
    let metrics = state.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let own_applied = metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0);
    let mut members: Vec<MemberStatus> = membership
        .nodes()
        .map(|(node_id, node)| {
            let (applied_index, liveness) = if *node_id == state.node_id() {
                (own_applied, Liveness::Alive)
            } else {
                match state.membership.get(*node_id) {
                    Some((digest, liveness)) => (digest.applied_index, liveness),
                    // Not heard of since this node started: suspect while the exchange has had
                    // time to reach it, down after that.
                    None if state.started.elapsed() < membership::DOWN_AFTER => (0, Liveness::Suspect),
                    None => (0, Liveness::Down),
                }
            };
            MemberStatus {
                node_id: *node_id,
                address: node.addr.clone(),
                role: if voters.contains(node_id) { "voter" } else { "learner" }.to_string(),
                applied_index,
                lag: 0,
                state: liveness.name().to_string(),
            }
        })
        .collect();
    let highest = members.iter().map(|member| member.applied_index).max().unwrap_or(0);
    for member in &mut members {
        member.lag = highest - member.applied_index;
    }
    members
}

/// This node's state plus every member's.
pub(crate) async fn cluster_status(state: &Arc<NodeState>) -> NodeStatus {
    let mut status = local_status(state);
    status.members = member_states(state);
    status
}

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

/// Leader side of a join: checks that the node at `address` is who it says, then learner, caught
/// up, voter; one change at a time. A repeated join of the same incarnation is a no-op; another
/// incarnation of a current member (it lost its data) is refused until the member leaves.
pub(crate) async fn handle_join(
    state: &Arc<NodeState>,
    node_id: u64,
    address: String,
    incarnation: u64,
) -> Result<AdminResponse, WireError> {
    if !is_leader(state) {
        return forward_admin_to_leader(state, &AdminRequest::Join { node_id, address, incarnation }).await;
    }
    let refuse = |message: String| WireError::new(ErrorCode::InvalidArgument, message);
    let _one_change_at_a_time = state.membership_change.lock().await;
    let membership = state.raft.metrics().borrow().membership_config.membership().clone();
    let is_voter = membership.voter_ids().any(|voter| voter == node_id);
    let joined =
        || AdminResponse::Joined { leader: state.node_id(), cluster_id: state.cluster_id().unwrap_or_default() };
    if let Some(existing) = membership.get_node(&node_id) {
        if existing.incarnation != incarnation {
            return Err(refuse(format!(
                "node {node_id} is still a member with other data; run `bayard leave --id {node_id}` first"
            )));
        }
        if existing.addr != address {
            return Err(refuse(format!(
                "node {node_id} is a member at {}, not {address}; run `bayard leave --id {node_id}` first",
                existing.addr
            )));
        }
        if is_voter {
            return Ok(joined());
        }
    } else {
        verify_node_at(state, node_id, &address).await?;
        tracing::info!(node_id, %address, "adding a learner");
        // Blocks until the learner has caught up with the leader's log (or installed a snapshot).
        let learner = MemberNode::new(address.clone(), incarnation);
        retry_while_changing(|| state.raft.add_learner(node_id, learner.clone(), true))
            .await
            .map_err(|error| unavailable(format!("cannot add node {node_id} as a learner: {error}")))?;
    }
    tracing::info!(node_id, "promoting to voter");
    retry_while_changing(|| state.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), false))
        .await
        .map_err(|error| unavailable(format!("cannot promote node {node_id} to voter: {error}")))?;
    Ok(joined())
}

/// Dials `address` and checks that the node there presents the certificate of `node_id`: a
/// request forwarded by a member must not admit an impostor.
pub(crate) async fn verify_node_at(state: &NodeState, node_id: u64, address: &str) -> Result<(), WireError> {
    let connection =
        state.pool.get(address).await.map_err(|error| unavailable(format!("cannot reach node {node_id}: {error}")))?;
    let peer = transport::identity::peer_of_connection(&connection, &state.config.trust_domain)
        .map_err(|error| WireError::new(ErrorCode::PermissionDenied, error.to_string()))?;
    if peer.role != (transport::Role::Node { node_id }) {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: the node at {address} presents the certificate of {}, not node/{node_id}",
                peer.role
            ),
        ));
    }
    Ok(())
}

/// Leader side of a leave: refuses to remove a member when the remaining voters that answer are
/// not a majority of the remaining voters, unless forced; then removes it and tells it.
pub(crate) async fn handle_leave(
    state: &Arc<NodeState>,
    node_id: u64,
    force: bool,
) -> Result<AdminResponse, WireError> {
    if !is_leader(state) {
        return forward_admin_to_leader(state, &AdminRequest::Leave { node_id, force }).await;
    }
    let _one_change_at_a_time = state.membership_change.lock().await;
    let membership = state.raft.metrics().borrow().membership_config.membership().clone();
    let Some(node) = membership.get_node(&node_id).cloned() else {
        return Err(WireError::new(ErrorCode::InvalidArgument, format!("node {node_id} is not a member")));
    };
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let remaining: BTreeSet<u64> = voters.iter().copied().filter(|voter| *voter != node_id).collect();
    if remaining.is_empty() {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("node {node_id} is the last voter and cannot leave"),
        ));
    }
    if !force {
        // The exchange notices a dead node only after a few seconds; a membership change that
        // counts on a node that just died would hang. So a voter counts as answering only if the
        // exchange says alive and it answers a direct probe now.
        let members = member_states(state);
        let mut probes = tokio::task::JoinSet::new();
        for member in members.iter().filter(|member| member.state == "alive") {
            let (state, node_id, address) = (state.clone(), member.node_id, member.address.clone());
            probes.spawn(async move {
                if node_id == state.node_id() {
                    return Some(node_id);
                }
                call_node::<_, AdminResponse>(
                    &state,
                    &address,
                    StreamKind::Admin,
                    &AdminRequest::LocalStatus,
                    MEMBER_STATUS_TIMEOUT,
                )
                .await
                .ok()
                .map(|_| node_id)
            });
        }
        let mut answering = BTreeSet::new();
        while let Some(probe) = probes.join_next().await {
            if let Ok(Some(node_id)) = probe {
                answering.insert(node_id);
            }
        }
        let alive_among = |voters: &BTreeSet<u64>| voters.intersection(&answering).count();
        // The change goes through a joint configuration: it needs a majority of the current
        // voters as well as of the remaining ones.
        let (alive_now, quorum_now) = (alive_among(&voters), voters.len() / 2 + 1);
        if alive_now < quorum_now {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "only {alive_now} of {} voters answer, fewer than the {quorum_now} a membership change needs; use --force to try anyway",
                    voters.len()
                ),
            ));
        }
        let alive = alive_among(&remaining);
        let quorum = remaining.len() / 2 + 1;
        if alive < quorum {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "removing node {node_id} would leave {alive} of {} remaining voters reachable, fewer than the {quorum} a quorum needs; use --force to remove it anyway",
                    remaining.len()
                ),
            ));
        }
    }
    let change = if voters.contains(&node_id) {
        ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
    };
    retry_while_changing(|| state.raft.change_membership(change.clone(), false))
        .await
        .map_err(|error| unavailable(format!("cannot remove node {node_id}: {error}")))?;
    tracing::info!(node_id, "removed a member");
    // Tell the removed node, so it stops instead of campaigning; it also notices by itself when
    // the new membership reaches it.
    if node_id == state.node_id() {
        mark_removed(state, "removed by `bayard leave`".to_string()).await;
    } else {
        state.membership.forget(node_id);
        let notice = AdminRequest::Removed { node_id, incarnation: node.incarnation };
        if let Err(error) =
            call_node::<_, AdminResponse>(state, &node.addr, StreamKind::Admin, &notice, Duration::from_secs(2)).await
        {
            tracing::warn!(node_id, %error, "could not tell the removed node; it stops when it learns the membership");
        }
    }
    Ok(AdminResponse::Left { node_id })
}

/// Records in `node.json` that this node was removed, then stops it.
pub(crate) async fn mark_removed(state: &Arc<NodeState>, reason: String) {
    let recorded = reason.clone();
    if let Err(error) = state.update_metadata(|metadata| metadata.removed = Some(recorded)).await {
        tracing::error!(%error, "could not record the removal in node.json");
    }
    tracing::warn!(node_id = state.node_id(), %reason, "this node is no longer a member of the cluster; stopping");
    state.stop_because(NodeError::Removed { node_id: state.node_id(), reason });
}

/// Stops the node once it is no longer a member. It notices in two ways: the membership it
/// replicates stops listing it, or (when it was down while removed, so nothing reaches it any
/// more and it finds no leader) the leader its former peers name does not list it.
pub(crate) async fn watch_for_removal(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = state.raft.metrics();
    let mut was_member = false;
    let mut ask_peers = tokio::time::interval(Duration::from_secs(3));
    ask_peers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (is_member, has_leader) = {
            let current = metrics.borrow();
            let is_member = current.membership_config.membership().get_node(&state.node_id()).is_some();
            (is_member, current.current_leader.is_some())
        };
        if is_member {
            was_member = true;
        } else if was_member {
            mark_removed(&state, "the cluster membership no longer lists it".to_string()).await;
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = ask_peers.tick(), if was_member && !has_leader => {
                if leader_says_not_a_member(&state).await {
                    mark_removed(&state, "the leader's membership no longer lists it".to_string()).await;
                    return;
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Asks the other members this node knows for the leader, and the leader for its membership.
async fn leader_says_not_a_member(state: &Arc<NodeState>) -> bool {
    let known = peers(state);
    for (node_id, address) in &known {
        if *node_id == state.node_id() {
            continue;
        }
        let Ok(AdminResponse::Status(status)) = call_node::<_, AdminResponse>(
            state,
            address,
            StreamKind::Admin,
            &AdminRequest::LocalStatus,
            MEMBER_STATUS_TIMEOUT,
        )
        .await
        else {
            continue;
        };
        if status.role != "leader" {
            continue;
        }
        if let Ok(AdminResponse::Peers(members)) = call_node::<_, AdminResponse>(
            state,
            address,
            StreamKind::Admin,
            &AdminRequest::Peers,
            MEMBER_STATUS_TIMEOUT,
        )
        .await
        {
            return !members.contains_key(&state.node_id());
        }
    }
    false
}

/// Joining side: learns the members and the leader from the seeds through the membership
/// exchange (any seed will do; dead ones are skipped), then asks the leader — or, failing that,
/// each seed, which forwards — to admit this node. Retries with backoff until it is a voter or
/// the cluster refuses it for good.
pub(crate) async fn join_through_seeds(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let request = AdminRequest::Join {
        node_id: state.node_id(),
        address: state.address.clone(),
        incarnation: state.incarnation(),
    };
    let mut backoff = Duration::from_millis(200);
    let started = tokio::time::Instant::now();
    let seeds: Vec<String> =
        state.config.peers.iter().map(|(node_id, address)| format!("{node_id}={address}")).collect();
    let mut last_error = String::from("no seed answered");
    loop {
        if started.elapsed() >= state.config.join_timeout {
            let reason = format!(
                "gave up after {}s: {last_error}; seeds tried: {}; check --peers, that those nodes run, and that they \
                 share this node's CA (--join-timeout sets how long to try)",
                state.config.join_timeout.as_secs(),
                seeds.join(", ")
            );
            tracing::error!(%reason, "could not join the cluster");
            state.stop_because(NodeError::Join(reason));
            return;
        }
        let mut answered = 0;
        for (_, seed_address) in &state.config.peers {
            if exchange_with(&state, seed_address).await.is_ok() {
                answered += 1;
            }
        }
        let mut targets: Vec<String> = Vec::new();
        if let Some((_, leader_address)) = state.membership.leader_hint() {
            targets.push(leader_address);
        }
        targets.extend(state.config.peers.iter().map(|(_, address)| address.clone()));
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
            match call_node::<_, AdminResponse>(
                &state,
                target,
                StreamKind::Admin,
                &request,
                state.config.max_request_timeout,
            )
            .await
            {
                Ok(AdminResponse::Joined { leader, cluster_id }) => {
                    if let Err(error) = state.update_metadata(|metadata| metadata.cluster_id = Some(cluster_id)).await {
                        tracing::error!(%error, "could not record the cluster id");
                    }
                    tracing::info!(
                        leader,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "joined the cluster as a voter"
                    );
                    return;
                }
                Ok(_) => tracing::warn!(%target, "answered the join with another message"),
                Err(error) if matches!(error.code, ErrorCode::InvalidArgument | ErrorCode::PermissionDenied) => {
                    tracing::error!(%target, error = %error.message, "the cluster refused this node");
                    state.stop_because(NodeError::Join(error.message));
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

/// One exchange with the node at `address`: send our digests, merge theirs.
async fn exchange_with(state: &NodeState, address: &str) -> Result<(), WireError> {
    let message = MembershipDigest {
        sender: state.node_id(),
        cluster_id: state.cluster_id(),
        members: state.membership.digests(),
    };
    let answer: MembershipDigest =
        call_node(state, address, StreamKind::Membership, &message, Duration::from_secs(1)).await?;
    if let (Some(ours), Some(theirs)) = (state.cluster_id(), &answer.cluster_id) {
        if &ours != theirs {
            return Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!("{address} belongs to cluster {theirs}, not {ours}"),
            ));
        }
    }
    // A joining node has no members yet and believes its seeds; a member believes members.
    let known = member_incarnations(state);
    let digests = if known.is_empty() {
        answer.members
    } else {
        membership::admissible_digests(answer.sender, &known, answer.members)
    };
    state.membership.merge(&digests);
    Ok(())
}

/// Raft members and the incarnation each joined with.
fn member_incarnations(state: &NodeState) -> BTreeMap<u64, u64> {
    let metrics = state.raft.metrics().borrow().clone();
    metrics.membership_config.membership().nodes().map(|(node_id, node)| (*node_id, node.incarnation)).collect()
}

/// Server side of an exchange: the sender must be the node its certificate names and of this
/// cluster (or of none yet, when it is joining).
pub(crate) fn handle_exchange(
    state: &NodeState,
    sender_certificate_id: u64,
    message: MembershipDigest,
) -> Result<MembershipDigest, WireError> {
    if message.sender != sender_certificate_id {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: node {sender_certificate_id} may not send membership digests as node {}",
                message.sender
            ),
        ));
    }
    if let (Some(ours), Some(theirs)) = (state.cluster_id(), &message.cluster_id) {
        if &ours != theirs {
            return Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!("node {} belongs to cluster {theirs}; this is cluster {ours}", message.sender),
            ));
        }
    }
    let members = membership::admissible_digests(sender_certificate_id, &member_incarnations(state), message.members);
    state.membership.merge(&members);
    Ok(MembershipDigest {
        sender: state.node_id(),
        cluster_id: state.cluster_id(),
        members: state.membership.digests(),
    })
}

/// Every interval: refresh this node's digest and exchange it with a few random known nodes.
pub(crate) async fn exchange_membership(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(EXCHANGE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let metrics = state.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let role = if membership.voter_ids().any(|voter| voter == state.node_id()) {
            "voter"
        } else if membership.get_node(&state.node_id()).is_some() {
            "learner"
        } else {
            "joining"
        };
        state.membership.beat(|own| {
            own.role = role.to_string();
            own.applied_index = metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0);
            own.leader = metrics.current_leader;
        });
        // Candidates: Raft members, nodes heard of, seeds; never this node.
        let mut candidates: BTreeMap<u64, String> =
            membership.nodes().map(|(node_id, node)| (*node_id, node.addr.clone())).collect();
        for (digest, liveness) in state.membership.snapshot() {
            if liveness != Liveness::Down {
                candidates.entry(digest.node_id).or_insert(digest.address);
            }
        }
        for (node_id, address) in &state.config.peers {
            candidates.entry(*node_id).or_insert_with(|| address.clone());
        }
        candidates.remove(&state.node_id());
        let mut candidates: Vec<String> = candidates.into_values().collect();
        let chosen: Vec<String> = {
            use rand::seq::SliceRandom;
            candidates.shuffle(&mut rand::rng());
            candidates.into_iter().take(FANOUT).collect()
        };
        let mut exchanges = tokio::task::JoinSet::new();
        for address in chosen {
            let state = state.clone();
            exchanges.spawn(async move {
                if let Err(error) = exchange_with(&state, &address).await {
                    tracing::debug!(%address, error = %error.message, "membership exchange failed");
                }
            });
        }
        while exchanges.join_next().await.is_some() {}
    }
}

/// Optional (`--remove-down-after`): on the leader, removes a member whose heartbeat has not
/// advanced for `after`, one at a time, through the same quorum guard as `bayard leave`. Only
/// members this node has heard from count, and only once this node has run for `after` itself,
/// so a freshly started leader never mistakes "not heard of yet" for "down".
pub(crate) async fn remove_down_members(state: Arc<NodeState>, after: Duration, mut shutdown: watch::Receiver<bool>) {
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if started.elapsed() < after || !is_leader(&state) {
            continue;
        }
        let members: Vec<u64> = peers(&state).into_keys().filter(|node_id| *node_id != state.node_id()).collect();
        let Some(down) = members
            .into_iter()
            .find(|node_id| state.membership.silence(*node_id).is_some_and(|silence| silence >= after))
        else {
            continue;
        };
        match handle_leave(&state, down, false).await {
            Ok(_) => tracing::warn!(node_id = down, after_seconds = after.as_secs(), "removed a member that was down"),
            Err(error) => tracing::warn!(node_id = down, error = %error.message, "not removing a down member"),
        }
    }
}

/// On the leader, proposes a `Commit` entry whenever the index has uncommitted writes, every
/// commit interval. Commits are log entries so that every replica commits at the same positions:
/// that is what makes a replayed log and a rollback give the same index everywhere.
pub(crate) async fn auto_commit(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(state.config.commit_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !is_leader(&state) || !state.index.current().has_uncommitted_changes() {
            continue;
        }
        let batch = IndexBatch { operations: vec![IndexOperation::Commit] };
        if let Err(error) = propose_as_leader(&state, batch).await {
            tracing::warn!(error = %error.message, "automatic commit failed");
        }
    }
}
