//! Noticing that this node was removed, and removing members that stay down.
//!
//! A node believes it was removed only when the committed membership it replicates no longer
//! lists it, or when a majority of the other voters of the last membership it knows say so
//! (`decisions::removal_confirmed`): a removal notice, or one peer's answer, only starts that
//! check. So no single certificate, member or not, can stop a node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::watch;

use super::{decisions, Cluster, ClusterError, ClusterEvent, ClusterResult};
use crate::protocol::{AdminRequest, AdminResponse, StreamKind};

/// How long each voter has to answer a removal check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a member that knows no leader asks the others whether it is still a member.
const ASK_INTERVAL: Duration = Duration::from_secs(3);

impl Cluster {
    /// Asks the other voters of the last membership this node knows whether their membership
    /// lists it; true when a majority of them say it does not.
    async fn voters_confirm_removal(&self) -> bool {
        let (voters, members) = {
            let metrics = self.raft().metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
            let members: BTreeMap<u64, String> =
                membership.nodes().map(|(node_id, node)| (*node_id, node.addr.clone())).collect();
            (voters, members)
        };
        let mut asks = tokio::task::JoinSet::new();
        for voter in voters.iter().filter(|voter| **voter != self.node_id()) {
            let Some(address) = members.get(voter).cloned() else { continue };
            let (cluster, voter) = (self.clone(), *voter);
            asks.spawn(async move {
                // Only the voter itself (its certificate checked) answers for it, and only with a
                // membership it is in: a wiped node at a voter's address knows no members, and
                // its "not listed" proves nothing.
                let answer = cluster
                    .inner
                    .peers
                    .call_node::<_, AdminResponse>(
                        voter,
                        &address,
                        StreamKind::Admin,
                        &AdminRequest::Peers,
                        CHECK_TIMEOUT,
                    )
                    .await;
                match answer {
                    Ok(AdminResponse::Peers(their_members)) if their_members.contains_key(&voter) => {
                        Some((voter, their_members.contains_key(&cluster.node_id())))
                    }
                    _ => None,
                }
            });
        }
        let mut answers = BTreeMap::new();
        while let Some(answer) = asks.join_next().await {
            if let Ok(Some((voter, lists_us))) = answer {
                answers.insert(voter, lists_us);
            }
        }
        decisions::removal_confirmed(self.node_id(), &voters, &answers)
    }

    /// A removal notice arrived (from a member): believed only if the other voters confirm it
    /// (asked now, bounded by a second each); otherwise refused, and this node stays.
    pub async fn removal_reported(&self, sender: u64) -> ClusterResult<()> {
        if self.voters_confirm_removal().await {
            self.emit(ClusterEvent::Removed {
                reason: format!("node {sender} reported the removal and the other voters confirmed it"),
            });
            return Ok(());
        }
        tracing::warn!(sender, "a removal notice that the other voters do not confirm; staying");
        Err(ClusterError::PermissionDenied(format!(
            "permission denied: node {sender} reports that node {} was removed, but a majority of the other voters \
             still list it",
            self.node_id()
        )))
    }
}

/// Emits `Removed` once this node is no longer a member. It notices in two ways: the committed
/// membership it replicates stops listing it, or (when it was down while removed, so nothing
/// reaches it any more and it finds no leader) the other voters say so.
pub(super) async fn watch_for_removal(cluster: Cluster, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = cluster.raft().metrics();
    let mut was_member = false;
    let mut ask_peers = tokio::time::interval(ASK_INTERVAL);
    ask_peers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (removed, is_member, has_leader) = {
            let current = metrics.borrow_and_update();
            let membership = &current.membership_config;
            // This node as it is now: a node that rejoined under the same id replays memberships
            // of its previous incarnation (listed, then removed), which say nothing about it.
            let own_incarnation = cluster.inner.config.incarnation;
            let is_member = membership
                .membership()
                .get_node(&cluster.node_id())
                .is_some_and(|node| node.incarnation == own_incarnation);
            let removed = decisions::membership_says_removed(
                was_member,
                is_member,
                membership.log_id().map(|log_id| log_id.index),
                current.last_applied.map(|log_id| log_id.index),
            );
            (removed, is_member, current.current_leader.is_some())
        };
        was_member |= is_member;
        if removed {
            cluster.emit(ClusterEvent::Removed {
                reason: "the cluster's committed membership no longer lists it (`bayard leave`, or \
                         --remove-down-after on the leader)"
                    .to_string(),
            });
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = ask_peers.tick(), if was_member && !has_leader => {
                if cluster.voters_confirm_removal().await {
                    cluster.emit(ClusterEvent::Removed {
                        reason: "the other voters' membership no longer lists it".to_string(),
                    });
                    return;
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Optional (`--remove-down-after`): on the leader, removes a member whose heartbeat has not
/// advanced for `after` (`decisions::down_members`) and that does not answer a direct probe
/// either, one at a time, through the same quorum guard as `bayard leave`.
pub(super) async fn remove_down_members(cluster: Cluster, after: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !cluster.is_leader() {
            continue;
        }
        let silences: BTreeMap<u64, Option<Duration>> =
            cluster.members().keys().map(|node_id| (*node_id, cluster.inner.table.silence(*node_id))).collect();
        let candidates = decisions::down_members(cluster.node_id(), &silences, after, cluster.inner.started.elapsed());
        for down in candidates {
            let address = match cluster.members().get(&down) {
                Some(node) => node.addr.clone(),
                None => continue,
            };
            if cluster.answers_probe(&address).await {
                tracing::info!(node_id = down, "a member the exchange has not heard from answers directly; keeping it");
                continue;
            }
            match cluster.handle_leave(down, false).await {
                Ok(_) => {
                    tracing::warn!(node_id = down, after_seconds = after.as_secs(), "removed a member that was down")
                }
                Err(error) => tracing::warn!(node_id = down, %error, "not removing a down member"),
            }
            break;
        }
    }
}
