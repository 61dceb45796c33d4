//! The membership exchange: what Raft does not carry — liveness, the current leader, incarnation,
//! version, applied index — spread by periodic digests between a few random members.
//!
//! Every node keeps a table of digests, one per node it has heard of. Once per interval it bumps
//! its own heartbeat and exchanges its own digest with up to [`FANOUT`] peers over `Membership`
//! streams (only a node speaks for itself); both sides merge, and for each node the newer digest
//! wins (`decisions::supersedes`): the generation counts the starts of the node's data directory, so
//! a restarted node, whose heartbeat starts again from 0, is alive at its first beat. A node whose
//! heartbeat has not advanced for [`SUSPECT_AFTER`] is `suspect`, after [`DOWN_AFTER`] `down`.
//! Entries of nodes that are not members and have been silent for [`FORGET_AFTER`] are dropped. Messages carry the cluster id; another cluster's are refused. A
//! joining node uses the same exchange to find the members and the leader from its seeds before it
//! asks to join.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Exchange period.
pub const EXCHANGE_INTERVAL: Duration = Duration::from_secs(1);
/// Peers contacted per round.
pub const FANOUT: usize = 8;
pub use super::decisions::{DOWN_AFTER, SUSPECT_AFTER};
/// Silence after which the entry of a node that is not a member is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Most nodes the table holds: digests about further nodes are dropped, so no message can grow
/// it without bound.
pub const MAX_TABLE_ENTRIES: usize = 1024;

/// Which digests of a message from `sender` may be merged, given the Raft members (id →
/// incarnation): only the sender's own, and for a member only at the incarnation the membership
/// records. Only a node speaks for itself: nobody can make up nodes, keep a dead member looking
/// alive, or bury a live one under a digest it never sent. (Each node exchanges with up to
/// [`FANOUT`] others every interval, so in clusters of up to `FANOUT + 1` nodes everyone hears
/// from everyone directly each round.)
pub fn admissible_digests(sender: u64, members: &BTreeMap<u64, u64>, digests: Vec<MemberDigest>) -> Vec<MemberDigest> {
    digests
        .into_iter()
        .filter(|digest| digest.node_id == sender)
        .filter(|digest| members.get(&sender).is_none_or(|incarnation| *incarnation == digest.incarnation))
        .take(1)
        .collect()
}

/// What one node says about one node (itself or another it heard of).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberDigest {
    pub node_id: u64,
    pub address: String,
    /// Drawn when the node's data directory was created: a wiped node has a new one.
    pub incarnation: u64,
    /// How many times the node's data directory has been started: a restart outranks every
    /// heartbeat of the run before.
    pub generation: u64,
    /// Bumped by the node itself every interval; starts again from 0 with each generation.
    pub heartbeat: u64,
    /// `voter`, `learner` or `joining`, as the node itself sees it.
    pub role: String,
    pub applied_index: u64,
    pub version: String,
    /// The leader the node knows of.
    pub leader: Option<u64>,
}

impl MemberDigest {
    fn is_newer_than(&self, other: &MemberDigest) -> bool {
        super::decisions::supersedes(
            (self.incarnation, self.generation, self.heartbeat),
            (other.incarnation, other.generation, other.heartbeat),
        )
    }
}

/// One exchange message, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipDigest {
    /// The node sending it; must be the node its certificate names.
    pub sender: u64,
    /// The sender's cluster; `None` while it has not joined one yet.
    pub cluster_id: Option<String>,
    #[serde(deserialize_with = "crate::bounded::vec_of_at_most::<_, _, MAX_TABLE_ENTRIES>")]
    pub members: Vec<MemberDigest>,
}

/// Liveness as seen from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Suspect,
    Down,
}

impl Liveness {
    pub fn name(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Down => "down",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    digest: MemberDigest,
    /// When this node last saw the entry's heartbeat advance.
    refreshed: Instant,
}

/// The table of digests. Thread-safe; every operation is short.
#[derive(Debug)]
pub struct MembershipTable {
    own_node_id: u64,
    entries: Mutex<BTreeMap<u64, Entry>>,
}

impl MembershipTable {
    pub fn new(own: MemberDigest) -> Self {
        let own_node_id = own.node_id;
        let entries = BTreeMap::from([(own_node_id, Entry { digest: own, refreshed: Instant::now() })]);
        MembershipTable { own_node_id, entries: Mutex::new(entries) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Updates this node's own digest (role, applied index, leader) and bumps its heartbeat.
    pub fn beat(&self, update: impl FnOnce(&mut MemberDigest)) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(&self.own_node_id) {
            update(&mut entry.digest);
            entry.digest.heartbeat += 1;
            entry.refreshed = Instant::now();
        }
    }

    /// Merges digests heard from a peer (`decisions::supersedes` decides which is kept).
    /// Nothing anyone says about this node replaces what it says itself.
    pub fn merge(&self, digests: &[MemberDigest]) {
        let mut entries = self.lock();
        let now = Instant::now();
        for digest in digests {
            if digest.node_id == self.own_node_id {
                continue;
            }
            let full = entries.len() >= MAX_TABLE_ENTRIES;
            match entries.get_mut(&digest.node_id) {
                Some(entry) if digest.is_newer_than(&entry.digest) => {
                    entry.digest = digest.clone();
                    entry.refreshed = now;
                }
                Some(_) => {}
                None if full => {}
                None => {
                    entries.insert(digest.node_id, Entry { digest: digest.clone(), refreshed: now });
                }
            }
        }
    }

    /// Every digest, for sending.
    pub fn digests(&self) -> Vec<MemberDigest> {
        self.lock().values().map(|entry| entry.digest.clone()).collect()
    }

    pub fn own(&self) -> Option<MemberDigest> {
        self.lock().get(&self.own_node_id).map(|entry| entry.digest.clone())
    }

    /// The digest of `node_id` and its liveness.
    pub fn get(&self, node_id: u64) -> Option<(MemberDigest, Liveness)> {
        let entries = self.lock();
        entries.get(&node_id).map(|entry| (entry.digest.clone(), self.liveness_of(entry)))
    }

    fn liveness_of(&self, entry: &Entry) -> Liveness {
        if entry.digest.node_id == self.own_node_id {
            return Liveness::Alive;
        }
        super::decisions::liveness(Some(entry.refreshed.elapsed()), Duration::MAX)
    }

    /// Drops the entries of nodes that are not `members` and have been silent for
    /// [`FORGET_AFTER`]: a node that left, or a certificate that spoke once, does not stay.
    pub fn forget_silent_non_members(&self, members: &BTreeMap<u64, u64>) {
        let own = self.own_node_id;
        self.lock().retain(|node_id, entry| {
            *node_id == own || members.contains_key(node_id) || entry.refreshed.elapsed() < FORGET_AFTER
        });
    }

    /// Every known node with its liveness.
    pub fn snapshot(&self) -> Vec<(MemberDigest, Liveness)> {
        let entries = self.lock();
        entries.values().map(|entry| (entry.digest.clone(), self.liveness_of(entry))).collect()
    }

    /// How long since `node_id`'s heartbeat last advanced, for nodes heard of at all.
    pub fn silence(&self, node_id: u64) -> Option<Duration> {
        self.lock().get(&node_id).map(|entry| entry.refreshed.elapsed())
    }

    /// Forgets a node (after it left), so stale entries do not linger.
    pub fn forget(&self, node_id: u64) {
        if node_id != self.own_node_id {
            self.lock().remove(&node_id);
        }
    }

    /// The leader most nodes name, as heard (used by a joining node).
    pub fn leader_hint(&self) -> Option<(u64, String)> {
        let entries = self.lock();
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for entry in entries.values() {
            if let Some(leader) = entry.digest.leader {
                *votes.entry(leader).or_default() += 1;
            }
        }
        let (leader, _) = votes.into_iter().max_by_key(|(_, count)| *count)?;
        let address = entries.get(&leader)?.digest.address.clone();
        Some((leader, address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(node_id: u64, incarnation: u64, heartbeat: u64) -> MemberDigest {
        MemberDigest {
            node_id,
            address: format!("10.0.0.{node_id}:5001"),
            incarnation,
            generation: 1,
            heartbeat,
            role: "voter".into(),
            applied_index: 0,
            version: "test".into(),
            leader: Some(1),
        }
    }

    #[test]
    fn admissible_digests_from_a_table() {
        let members = BTreeMap::from([(1, 10), (2, 20), (3, 30)]);
        let all = vec![digest(1, 10, 5), digest(2, 20, 5), digest(2, 99, 5), digest(3, 30, 5), digest(99, 1, 5)];
        let kept = |sender: u64, digests: &[MemberDigest]| -> Vec<(u64, u64)> {
            admissible_digests(sender, &members, digests.to_vec()).iter().map(|d| (d.node_id, d.incarnation)).collect()
        };
        // A member speaks only for itself, at its recorded incarnation.
        assert_eq!(kept(1, &all), vec![(1, 10)]);
        assert_eq!(kept(2, &all), vec![(2, 20)], "not the incarnation the membership does not record");
        assert_eq!(kept(2, &[digest(2, 99, 5)]), Vec::<(u64, u64)>::new());
        // So does a non-member.
        assert_eq!(kept(99, &all), vec![(99, 1)]);
        assert_eq!(kept(42, &all), Vec::<(u64, u64)>::new());
        // One digest per message, however many it repeats.
        assert_eq!(kept(3, &[digest(3, 30, 5), digest(3, 30, 9)]), vec![(3, 30)]);
    }

    #[test]
    fn the_table_is_bounded() {
        let table = MembershipTable::new(digest(1, 1, 0));
        let flood: Vec<MemberDigest> = (2..5_000).map(|node_id| digest(node_id, 1, 1)).collect();
        table.merge(&flood);
        assert_eq!(table.digests().len(), MAX_TABLE_ENTRIES);
    }

    #[test]
    fn newer_incarnation_and_heartbeat_win_and_own_entry_is_never_overwritten() {
        let table = MembershipTable::new(digest(1, 10, 0));
        table.merge(&[digest(2, 5, 3)]);
        table.merge(&[digest(2, 5, 2)]);
        assert_eq!(table.get(2).unwrap().0.heartbeat, 3, "an older heartbeat does not win");
        table.merge(&[digest(2, 6, 0)]);
        assert_eq!(table.get(2).unwrap().0.incarnation, 6, "a new incarnation wins over any heartbeat");
        table.merge(&[digest(1, 99, 99)]);
        assert_eq!(table.own().unwrap().incarnation, 10, "nobody speaks for this node");
        table.beat(|own| own.applied_index = 7);
        let own = table.own().unwrap();
        assert_eq!((own.heartbeat, own.applied_index), (1, 7));
        assert_eq!(table.get(2).unwrap().1, Liveness::Alive);
        assert_eq!(table.leader_hint(), Some((1, "10.0.0.1:5001".to_string())));
        table.forget(2);
        assert!(table.get(2).is_none());
    }

    #[test]
    fn a_restarted_node_is_believed_at_its_first_beat() {
        let table = MembershipTable::new(digest(1, 10, 0));
        table.merge(&[digest(2, 5, 300)]);
        let restarted = MemberDigest { generation: 2, heartbeat: 0, ..digest(2, 5, 0) };
        table.merge(&[restarted]);
        let (known, _) = table.get(2).unwrap();
        assert_eq!((known.generation, known.heartbeat), (2, 0), "the new run wins over the old heartbeat");
        // The old run's digests, still travelling, do not bring it back.
        table.merge(&[digest(2, 5, 301)]);
        assert_eq!(table.get(2).unwrap().0.generation, 2);
    }

    #[test]
    fn silent_non_members_are_forgotten_members_kept() {
        let table = MembershipTable::new(digest(1, 10, 0));
        table.merge(&[digest(2, 5, 1), digest(3, 6, 1)]);
        // Age the entries as if FORGET_AFTER had passed.
        for entry in table.lock().values_mut() {
            entry.refreshed = Instant::now().checked_sub(FORGET_AFTER).expect("the clock runs for more than a minute");
        }
        table.forget_silent_non_members(&BTreeMap::from([(1, 10), (2, 5)]));
        let known: Vec<u64> = table.digests().iter().map(|digest| digest.node_id).collect();
        assert_eq!(known, vec![1, 2]);
    }
}
