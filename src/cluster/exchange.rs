//! The membership exchange, both sides: every interval this node bumps its own digest and
//! swaps digests with a few random known nodes. Only a node speaks for itself
//! (`membership::admissible_digests`): each side sends its own digest only, and merges only the
//! other's own digest (for a member, at the incarnation Raft records). So an exchange hands no
//! other node's incarnation or address to whoever asks.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;

use super::membership::{self, Liveness, MembershipDigest, EXCHANGE_INTERVAL, FANOUT};
use super::{Cluster, ClusterError, ClusterResult};
use crate::protocol::StreamKind;

/// How long one exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(1);

impl Cluster {
    fn own_message(&self) -> MembershipDigest {
        MembershipDigest {
            sender: self.node_id(),
            cluster_id: self.cluster_id(),
            members: self.inner.table.own().into_iter().collect(),
        }
    }

    /// Refuses digests of another cluster (a node that has joined none yet is of any).
    fn check_same_cluster(&self, sender: u64, theirs: Option<&str>) -> ClusterResult<()> {
        match (self.cluster_id(), theirs) {
            (Some(ours), Some(theirs)) if ours != theirs => Err(ClusterError::PermissionDenied(format!(
                "node {sender} belongs to cluster {theirs}; this is cluster {ours}"
            ))),
            _ => Ok(()),
        }
    }

    /// One exchange with node `node_id` at `address`: send our digest, merge its own. The node
    /// there must present `node_id`'s certificate and answer as `node_id`.
    pub(super) async fn exchange_with(&self, node_id: u64, address: &str) -> ClusterResult<()> {
        let answer: MembershipDigest = self
            .inner
            .peers
            .call_node(node_id, address, StreamKind::Membership, &self.own_message(), EXCHANGE_TIMEOUT)
            .await?;
        if answer.sender != node_id {
            return Err(ClusterError::PermissionDenied(format!(
                "node {node_id} at {address} answered the exchange as node {}",
                answer.sender
            )));
        }
        self.check_same_cluster(node_id, answer.cluster_id.as_deref())?;
        // A joining node (no members yet) takes the seed's own digest; so does a member.
        let digests = membership::admissible_digests(answer.sender, &self.member_incarnations(), answer.members);
        self.inner.table.merge(&digests);
        Ok(())
    }

    /// Server side of an exchange: the sender must be the node its certificate names and of
    /// this cluster (or of none yet, when it is joining).
    pub fn handle_exchange(
        &self,
        sender_certificate_id: u64,
        message: MembershipDigest,
    ) -> ClusterResult<MembershipDigest> {
        if message.sender != sender_certificate_id {
            return Err(ClusterError::PermissionDenied(format!(
                "permission denied: node {sender_certificate_id} may not send membership digests as node {}",
                message.sender
            )));
        }
        self.check_same_cluster(message.sender, message.cluster_id.as_deref())?;
        let members =
            membership::admissible_digests(sender_certificate_id, &self.member_incarnations(), message.members);
        self.inner.table.merge(&members);
        Ok(self.own_message())
    }
}

/// Every interval: refresh this node's digest, forget silent non-members, and exchange with a
/// few random known nodes.
pub(super) async fn exchange_rounds(cluster: Cluster, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(EXCHANGE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (role, applied_index, leader, members) = {
            let metrics = cluster.raft().metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let role = if membership.voter_ids().any(|voter| voter == cluster.node_id()) {
                "voter"
            } else if membership.get_node(&cluster.node_id()).is_some() {
                "learner"
            } else {
                "joining"
            };
            let members: BTreeMap<u64, String> =
                membership.nodes().map(|(node_id, node)| (*node_id, node.addr.clone())).collect();
            (role, metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0), metrics.current_leader, members)
        };
        cluster.inner.table.beat(|own| {
            own.role = role.to_string();
            own.applied_index = applied_index;
            own.leader = leader;
        });
        cluster.inner.table.forget_silent_non_members(&cluster.member_incarnations());
        // Candidates: Raft members, nodes heard of, seeds; never this node.
        let mut candidates = members;
        for (digest, liveness) in cluster.inner.table.snapshot() {
            if liveness != Liveness::Down {
                candidates.entry(digest.node_id).or_insert(digest.address);
            }
        }
        for (node_id, address) in &cluster.inner.config.seeds {
            candidates.entry(*node_id).or_insert_with(|| address.clone());
        }
        candidates.remove(&cluster.node_id());
        let mut candidates: Vec<(u64, String)> = candidates.into_iter().collect();
        let chosen: Vec<(u64, String)> = {
            use rand::seq::SliceRandom;
            candidates.shuffle(&mut rand::rng());
            candidates.into_iter().take(FANOUT).collect()
        };
        let mut exchanges = tokio::task::JoinSet::new();
        for (node_id, address) in chosen {
            let cluster = cluster.clone();
            exchanges.spawn(async move {
                if let Err(error) = cluster.exchange_with(node_id, &address).await {
                    tracing::debug!(%address, %error, "membership exchange failed");
                }
            });
        }
        while exchanges.join_next().await.is_some() {}
    }
}
