//! Who may send this node Raft messages (and proposals, and removal notices): members only.
//!
//! The rule (`raft::admission::sender_admitted`): the sender's certificate names a node of this
//! node's effective Raft membership — voters and learners, both halves of a joint configuration —
//! or one that a member vouched for within the last [`VOUCH_TTL`].
//!
//! Vouching covers the two cases where a legitimate sender is not yet in the local membership:
//! - a **joining node** has no membership at all; the leader that admits it starts replicating
//!   before the joining node has heard of it. The joining node asks its seeds (the `--peers` the
//!   operator named) whether the sender is in their membership.
//! - a node that was **down while the membership changed** (node 4 joined and became leader
//!   meanwhile) learns of the change only from the new leader. It asks the members it knows.
//!
//! A message from a sender that is not admitted is refused (`permission_denied`, counted in
//! `bayard_refused_raft_messages_total{reason="not_a_member"}`) and, at most once a second per
//! sender, a check is started in the background; the sender's next try (Raft retries every
//! heartbeat) is let through if a voucher confirmed it. A certificate of a node that never joined,
//! or that was removed, is in nobody's membership and is never let through.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Cluster, ClusterError, ClusterResult};
use crate::protocol::{AdminRequest, AdminResponse, StreamKind};
use crate::raft::admission::sender_admitted;

/// How long a vouch is believed.
pub const VOUCH_TTL: Duration = Duration::from_secs(60);
/// Least time between two checks for the same sender.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a voucher has to answer.
const VOUCHER_TIMEOUT: Duration = Duration::from_secs(1);
/// Most senders remembered (vouched or being checked); beyond it nothing new is checked, so a
/// flood of certificates cannot grow the table.
const MAX_TRACKED_SENDERS: usize = 64;

/// Senders that members vouched for, and when each was last checked.
#[derive(Debug, Default)]
pub(crate) struct Vouches {
    inner: Mutex<VouchTable>,
}

#[derive(Debug, Default)]
struct VouchTable {
    /// Sender → when, and the log index of the membership it was vouched for under.
    vouched: HashMap<u64, (Instant, Option<u64>)>,
    /// When the last check of each sender ended (or started, while it runs).
    checked: HashMap<u64, Instant>,
    running: std::collections::HashSet<u64>,
}

impl Vouches {
    /// Senders vouched for within the TTL, under the membership in force now: a membership
    /// change (a removal, say) ends every vouch given before it.
    pub fn current(&self, membership_index: Option<u64>) -> BTreeSet<u64> {
        let table = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        table
            .vouched
            .iter()
            .filter(|(_, (at, under))| at.elapsed() < VOUCH_TTL && *under == membership_index)
            .map(|(sender, _)| *sender)
            .collect()
    }

    /// Whether a check for `sender` may start now (and marks it started).
    fn begin_check(&self, sender: u64) -> bool {
        let mut table = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let VouchTable { vouched, checked, running } = &mut *table;
        checked.retain(|sender, at| running.contains(sender) || at.elapsed() < CHECK_INTERVAL);
        vouched.retain(|_, (at, _)| at.elapsed() < VOUCH_TTL);
        if checked.contains_key(&sender) || checked.len() + vouched.len() >= MAX_TRACKED_SENDERS {
            return false;
        }
        checked.insert(sender, Instant::now());
        running.insert(sender);
        true
    }

    /// A check of `sender` ended: the next may start an interval from now.
    fn end_check(&self, sender: u64) {
        let mut table = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        table.running.remove(&sender);
        table.checked.insert(sender, Instant::now());
    }

    fn vouch(&self, sender: u64, membership_index: Option<u64>) {
        let mut table = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        table.vouched.insert(sender, (Instant::now(), membership_index));
    }
}

impl Cluster {
    /// Ids of the effective membership (voters and learners of every half of a joint
    /// configuration), and the log index of that membership.
    fn member_ids(&self) -> (BTreeSet<u64>, Option<u64>) {
        // Borrowed, not cloned: this runs for every Raft message.
        let metrics = self.raft().metrics();
        let metrics = metrics.borrow();
        let ids = metrics.membership_config.membership().nodes().map(|(node_id, _)| *node_id).collect();
        (ids, metrics.membership_config.log_id().map(|log_id| log_id.index))
    }

    /// Whether `sender` is in the effective membership, without building anything (the common
    /// case of every heartbeat and append).
    pub fn is_member(&self, sender: u64) -> bool {
        self.raft().metrics().borrow().membership_config.membership().get_node(&sender).is_some()
    }

    /// Lets `sender` through, or refuses it and starts a check with the vouchers.
    pub fn admit_raft_sender(&self, sender: u64, what: &str) -> ClusterResult<()> {
        if self.is_member(sender) {
            return Ok(());
        }
        let (members, membership_index) = self.member_ids();
        if sender_admitted(sender, &members, &self.inner.vouches.current(membership_index)) {
            return Ok(());
        }
        crate::telemetry::metrics::record_refused_raft_message("not_a_member");
        if self.inner.vouches.begin_check(sender) {
            tracing::info!(sender, what, "raft message from a node outside this node's membership; asking the members");
            tokio::spawn(check_with_vouchers(self.clone(), sender, members, membership_index));
        }
        Err(ClusterError::PermissionDenied(format!(
            "permission denied: node {sender} is not a member of the cluster as node {} knows it; only members may \
             send {what}",
            self.node_id()
        )))
    }
}

/// Asks the members (or, with none, the seeds) whether `sender` is in their membership.
async fn check_with_vouchers(cluster: Cluster, sender: u64, members: BTreeSet<u64>, membership_index: Option<u64>) {
    let vouched = ask_vouchers(&cluster, sender, &members).await;
    cluster.inner.vouches.end_check(sender);
    if vouched {
        cluster.inner.vouches.vouch(sender, membership_index);
    } else {
        tracing::warn!(sender, "no member vouched for a node that sent raft messages; they stay refused");
    }
}

async fn ask_vouchers(cluster: &Cluster, sender: u64, members: &BTreeSet<u64>) -> bool {
    let known: BTreeMap<u64, String> = cluster.peer_addresses();
    let mut vouchers: Vec<(u64, String)> = known
        .iter()
        .filter(|(node_id, _)| members.contains(node_id) && **node_id != cluster.node_id() && **node_id != sender)
        .map(|(node_id, address)| (*node_id, address.clone()))
        .collect();
    if vouchers.is_empty() && members.is_empty() {
        // A joining node knows no member yet: it believes the seeds the operator named, which
        // may include the sender itself (the seed is often the leader that admits it).
        vouchers = cluster.inner.config.seeds.clone();
    }
    for (voucher, address) in vouchers {
        // Only the node the membership (or the operator) names at that address may vouch.
        if let Err(error) = cluster.inner.peers.verify_node_at(voucher, &address).await {
            tracing::debug!(voucher, %address, error = %error.message, "not asking this voucher");
            continue;
        }
        let answer = cluster
            .inner
            .peers
            .call::<_, AdminResponse>(&address, StreamKind::Admin, &AdminRequest::Peers, VOUCHER_TIMEOUT)
            .await;
        if let Ok(AdminResponse::Peers(their_members)) = answer {
            if their_members.contains_key(&sender) {
                tracing::info!(sender, voucher = %address, "a member vouched for the sender");
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_spaced_and_the_table_is_bounded() {
        let vouches = Vouches::default();
        assert!(vouches.begin_check(7));
        assert!(!vouches.begin_check(7), "a second check waits while one runs");
        vouches.end_check(7);
        assert!(!vouches.begin_check(7), "and for an interval after it ended");
        vouches.vouch(7, Some(12));
        assert_eq!(vouches.current(Some(12)), BTreeSet::from([7]));
        assert!(vouches.current(Some(13)).is_empty(), "a membership change ends the vouch");
        for sender in 100..100 + MAX_TRACKED_SENDERS as u64 {
            vouches.begin_check(sender);
        }
        assert!(!vouches.begin_check(9999), "a full table starts no new check");
    }
}
