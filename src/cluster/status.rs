//! What `status` and `peers` report: this node's own state, and every member's liveness,
//! applied index and lag as the membership exchange reports them. No network call.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use openraft::ServerState;

use super::decisions;
use super::membership::Liveness;
use super::Cluster;
use crate::protocol::{MemberStatus, NodeStatus};

fn server_state_name(server_state: ServerState) -> &'static str {
    match server_state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Cluster {
    /// Member id → address, from the Raft membership.
    pub fn peer_addresses(&self) -> BTreeMap<u64, String> {
        self.members().into_iter().map(|(node_id, node)| (node_id, node.addr)).collect()
    }

    /// This node's own state.
    pub fn local_status(&self) -> NodeStatus {
        let metrics = self.raft().metrics().borrow().clone();
        let index = self.inner.index.current();
        NodeStatus {
            node_id: self.node_id(),
            cluster_id: self.cluster_id(),
            address: self.inner.config.address.clone(),
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

    /// Asks every other member to answer once it has applied the log up to `index` (each under
    /// `deadline`); the number of members, this one included, that have. Nothing waits past the
    /// deadline: a member that is down simply does not count.
    pub async fn members_applied(&self, index: u64, deadline: Instant) -> usize {
        let own = usize::from(self.raft().metrics().borrow().last_applied.map_or(0, |log_id| log_id.index) >= index);
        let calls = self.members().into_iter().filter(|(node_id, _)| *node_id != self.node_id()).map(|(_, node)| {
            let peers = self.inner.peers.clone();
            async move {
                let request = crate::protocol::AdminRequest::WaitApplied { index };
                let answer: Result<crate::protocol::AdminResponse, _> =
                    peers.call_until(&node.addr, crate::protocol::StreamKind::Admin, &request, deadline).await;
                answer.is_ok()
            }
        });
        own + futures_count(calls).await
    }

    /// This node's state plus every member's.
    pub fn status(&self) -> NodeStatus {
        let mut status = self.local_status();
        status.members = self.member_states();
        status
    }

    /// Every member of the Raft membership with its liveness, applied index and lag.
    pub(super) fn member_states(&self) -> Vec<MemberStatus> {
        let metrics = self.raft().metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let own_applied = metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0);
        let uptime = self.inner.started.elapsed();
        let mut members: Vec<MemberStatus> = membership
            .nodes()
            .map(|(node_id, node)| {
                let (applied_index, liveness) = if *node_id == self.node_id() {
                    (own_applied, Liveness::Alive)
                } else {
                    match self.inner.table.get(*node_id) {
                        Some((digest, liveness)) => (digest.applied_index, liveness),
                        None => (0, decisions::liveness(None, uptime)),
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
}

/// How many of the calls answer `true`, all run at once.
async fn futures_count(calls: impl Iterator<Item = impl std::future::Future<Output = bool> + Send + 'static>) -> usize {
    let mut running = tokio::task::JoinSet::new();
    for call in calls {
        running.spawn(call);
    }
    let mut count = 0;
    while let Some(answered) = running.join_next().await {
        count += usize::from(answered.unwrap_or(false));
    }
    count
}
