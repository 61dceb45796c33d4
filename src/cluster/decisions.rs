//! The cluster's rules as pure functions: no clock, no network, no Raft handle. The modules
//! around them gather the facts (silences, probes, memberships) and act on the answer; the
//! tables of cases below pin each rule in milliseconds, so the real-cluster tests only have to
//! prove the wiring.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::membership::Liveness;
use crate::raft::types::MemberNode;

/// Silence after which a node is suspect.
pub const SUSPECT_AFTER: Duration = Duration::from_secs(3);
/// Silence after which a node is down.
pub const DOWN_AFTER: Duration = Duration::from_secs(10);

/// Whether a digest a node sent about itself replaces the one kept, each as (incarnation,
/// generation, heartbeat). Another incarnation (the data directory was made again; incarnations
/// are random, so not ordered) replaces whatever was kept: only the node itself speaks, and for
/// a member only at the incarnation the membership records. Within an incarnation a new
/// generation (a restart) beats any heartbeat of the run before, and within a run the higher
/// heartbeat wins.
pub fn supersedes(new: (u64, u64, u64), old: (u64, u64, u64)) -> bool {
    let ((new_incarnation, new_generation, new_heartbeat), (old_incarnation, old_generation, old_heartbeat)) =
        (new, old);
    new_incarnation != old_incarnation || (new_generation, new_heartbeat) > (old_generation, old_heartbeat)
}

/// A member's liveness from how long its heartbeat has not advanced here (`None`: not heard of
/// since this node started, `uptime` ago). Not heard of is suspect while the exchange has had
/// no time to reach it, and down after that.
pub fn liveness(silence: Option<Duration>, uptime: Duration) -> Liveness {
    let silence = match silence {
        Some(silence) => silence,
        None if uptime < DOWN_AFTER => return Liveness::Suspect,
        None => return Liveness::Down,
    };
    if silence >= DOWN_AFTER {
        Liveness::Down
    } else if silence >= SUSPECT_AFTER {
        Liveness::Suspect
    } else {
        Liveness::Alive
    }
}

/// What the leader does with a join request, given what the membership says of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinDecision {
    /// A voter with this incarnation at this address already: nothing to do (a repeated join).
    AlreadyVoter,
    /// A learner of this incarnation: promote it.
    Promote,
    /// Not a member: check it is who it says, add it as a learner, then promote it.
    AddLearner,
    Refuse(String),
}

pub fn join_decision(
    node_id: u64,
    existing: Option<&MemberNode>,
    is_voter: bool,
    address: &str,
    incarnation: u64,
) -> JoinDecision {
    let Some(existing) = existing else {
        return JoinDecision::AddLearner;
    };
    if existing.incarnation != incarnation {
        return JoinDecision::Refuse(format!(
            "node {node_id} is still a member with other data; run `bayard leave --id {node_id}` first"
        ));
    }
    if existing.addr != address {
        return JoinDecision::Refuse(format!(
            "node {node_id} is a member at {}, not {address}; run `bayard leave --id {node_id}` first",
            existing.addr
        ));
    }
    if is_voter {
        JoinDecision::AlreadyVoter
    } else {
        JoinDecision::Promote
    }
}

/// Whether removing `leaving` from `voters` is safe, given which voters answered a direct probe
/// just now. The change goes through a joint configuration, so it needs a majority of the
/// current voters as well as of the remaining ones. Learners may always be removed.
pub fn leave_guard(voters: &BTreeSet<u64>, leaving: u64, answering: &BTreeSet<u64>) -> Result<(), String> {
    let remaining: BTreeSet<u64> = voters.iter().copied().filter(|voter| *voter != leaving).collect();
    if voters.contains(&leaving) && remaining.is_empty() {
        return Err(format!("node {leaving} is the last voter and cannot leave"));
    }
    if !voters.contains(&leaving) {
        return Ok(());
    }
    let alive_now = voters.intersection(answering).count();
    let quorum_now = voters.len() / 2 + 1;
    if alive_now < quorum_now {
        return Err(format!(
            "only {alive_now} of {} voters answer, fewer than the {quorum_now} a membership change needs; use \
             --force to try anyway",
            voters.len()
        ));
    }
    let alive = remaining.intersection(answering).count();
    let quorum = remaining.len() / 2 + 1;
    if alive < quorum {
        return Err(format!(
            "removing node {leaving} would leave {alive} of {} remaining voters reachable, fewer than the {quorum} a \
             quorum needs; use --force to remove it anyway",
            remaining.len()
        ));
    }
    Ok(())
}

/// Members the exchange has not heard from for `after`, in id order: the candidates for removal
/// by `--remove-down-after` (each is probed directly before it is removed). Nothing while this
/// node has itself run for less than `after`: a freshly started leader has heard from nobody yet.
pub fn down_members(
    own: u64,
    silences: &BTreeMap<u64, Option<Duration>>,
    after: Duration,
    uptime: Duration,
) -> Vec<u64> {
    if uptime < after {
        return Vec::new();
    }
    silences
        .iter()
        .filter(|(node_id, silence)| **node_id != own && silence.is_none_or(|silence| silence >= after))
        .map(|(node_id, _)| *node_id)
        .collect()
}

/// Whether the membership this node replicates says it was removed: it no longer lists the
/// node, after having listed it, and it is committed (applied here). An appended but
/// uncommitted membership may still be replaced, so it proves nothing.
pub fn membership_says_removed(
    was_member: bool,
    lists_own: bool,
    membership_index: Option<u64>,
    applied_index: Option<u64>,
) -> bool {
    if !was_member || lists_own {
        return false;
    }
    match (membership_index, applied_index) {
        (Some(membership), Some(applied)) => membership <= applied,
        _ => false,
    }
}

/// Whether the other voters confirm that this node was removed: a majority of the voters (other
/// than this node) of the last membership it knows answered, and said their membership does not
/// list it. One peer's word (a removal notice, one answer) is never enough when others vote.
/// `answers`: voter → whether its membership lists this node.
pub fn removal_confirmed(own: u64, voters: &BTreeSet<u64>, answers: &BTreeMap<u64, bool>) -> bool {
    let others: BTreeSet<u64> = voters.iter().copied().filter(|voter| *voter != own).collect();
    if others.is_empty() {
        return false;
    }
    let saying_removed = answers.iter().filter(|(voter, lists_own)| others.contains(voter) && !**lists_own).count();
    saying_removed > others.len() / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_restart_outranks_the_previous_run() {
        // (incarnation, generation, heartbeat)
        let cases = [
            ((1, 2, 0), (1, 1, 500), true, "a restarted node's first beat beats its old run"),
            ((1, 1, 501), (1, 1, 500), true, "a later beat of the same run"),
            ((1, 1, 500), (1, 1, 500), false, "the same digest"),
            ((1, 1, 499), (1, 1, 500), false, "an older beat"),
            ((1, 1, 900), (1, 2, 0), false, "the previous run never comes back"),
            ((2, 1, 0), (1, 9, 900), true, "a new data directory beats any run of the old one"),
            ((1, 1, 0), (2, 9, 900), true, "incarnations are random: a smaller new one wins too"),
        ];
        for (new, old, expected, why) in cases {
            assert_eq!(supersedes(new, old), expected, "{why}");
        }
    }

    #[test]
    fn liveness_from_silence() {
        let seconds = Duration::from_secs;
        let cases = [
            (Some(seconds(0)), seconds(100), Liveness::Alive),
            (Some(Duration::from_millis(2_999)), seconds(100), Liveness::Alive),
            (Some(SUSPECT_AFTER), seconds(100), Liveness::Suspect),
            (Some(DOWN_AFTER), seconds(100), Liveness::Down),
            (None, seconds(1), Liveness::Suspect),
            (None, DOWN_AFTER, Liveness::Down),
        ];
        for (silence, uptime, expected) in cases {
            assert_eq!(liveness(silence, uptime), expected, "silence {silence:?}, uptime {uptime:?}");
        }
    }

    #[test]
    fn join_decisions() {
        let member = MemberNode::new("10.0.0.2:5001", 7);
        let cases: [(Option<&MemberNode>, bool, &str, u64, JoinDecision); 5] = [
            (None, false, "10.0.0.2:5001", 7, JoinDecision::AddLearner),
            (Some(&member), true, "10.0.0.2:5001", 7, JoinDecision::AlreadyVoter),
            (Some(&member), false, "10.0.0.2:5001", 7, JoinDecision::Promote),
            (
                Some(&member),
                true,
                "10.0.0.2:5001",
                8,
                JoinDecision::Refuse(
                    "node 2 is still a member with other data; run `bayard leave --id 2` first".to_string(),
                ),
            ),
            (
                Some(&member),
                true,
                "10.0.0.9:5001",
                7,
                JoinDecision::Refuse(
                    "node 2 is a member at 10.0.0.2:5001, not 10.0.0.9:5001; run `bayard leave --id 2` first"
                        .to_string(),
                ),
            ),
        ];
        for (existing, is_voter, address, incarnation, expected) in cases {
            assert_eq!(join_decision(2, existing, is_voter, address, incarnation), expected);
        }
    }

    #[test]
    fn the_leave_guard() {
        // (voters, leaving, answering, allowed)
        let cases: [(&[u64], u64, &[u64], bool); 10] = [
            (&[1, 2, 3], 3, &[1, 2, 3], true),
            (&[1, 2, 3], 3, &[1, 2], true), // the leaving node is down: the other two are a quorum
            (&[1, 2, 3], 3, &[1, 3], false), // the one left would be alone of two
            (&[1, 2, 3], 1, &[1, 2, 3], true), // the leader may remove itself
            (&[1, 2, 3], 3, &[1], false),   // no majority answers at all
            (&[1, 2], 2, &[1], false),      // two voters, one down: the joint change needs both
            (&[1, 2], 2, &[1, 2], true),
            (&[1], 1, &[1], false), // the last voter
            (&[1, 2, 3, 4, 5], 5, &[1, 2, 3], true),
            (&[1, 2, 3], 9, &[1], true), // a learner (not a voter) may always go
        ];
        for (voters, leaving, answering, allowed) in cases {
            let result = leave_guard(&set(voters), leaving, &set(answering));
            assert_eq!(
                result.is_ok(),
                allowed,
                "voters {voters:?}, leaving {leaving}, answering {answering:?}: {result:?}"
            );
        }
        let refusal = leave_guard(&set(&[1, 2, 3]), 3, &set(&[1, 3])).unwrap_err();
        assert!(refusal.contains("would leave 1 of 2 remaining voters reachable"), "{refusal}");
    }

    #[test]
    fn down_members_are_those_silent_long_enough() {
        let seconds = Duration::from_secs;
        let silences =
            BTreeMap::from([(1, Some(seconds(0))), (2, Some(seconds(20))), (3, Some(seconds(14))), (4, None)]);
        assert_eq!(down_members(1, &silences, seconds(15), seconds(60)), vec![2, 4]);
        assert_eq!(down_members(1, &silences, seconds(15), seconds(10)), Vec::<u64>::new(), "too soon after start");
        assert_eq!(down_members(2, &silences, seconds(15), seconds(60)), vec![4], "never itself");
    }

    #[test]
    fn only_a_committed_membership_says_removed() {
        // (was member, lists own, membership index, applied index, removed)
        let cases = [
            (true, false, Some(10), Some(10), true),
            (true, false, Some(10), Some(12), true),
            (true, false, Some(10), Some(9), false), // appended, not committed: may be replaced
            (true, true, Some(10), Some(10), false),
            (false, false, Some(10), Some(10), false), // a joining node is not in it yet
            (true, false, None, Some(3), false),
        ];
        for (was_member, lists_own, membership, applied, expected) in cases {
            assert_eq!(membership_says_removed(was_member, lists_own, membership, applied), expected);
        }
    }

    #[test]
    fn removal_needs_a_majority_of_the_other_voters() {
        let voters = set(&[1, 2, 3]);
        let answers = |pairs: &[(u64, bool)]| pairs.iter().copied().collect::<BTreeMap<u64, bool>>();
        // Node 3 asks: both others say it is gone.
        assert!(removal_confirmed(3, &voters, &answers(&[(1, false), (2, false)])));
        // One peer's word is not enough.
        assert!(!removal_confirmed(3, &voters, &answers(&[(1, false)])));
        assert!(!removal_confirmed(3, &voters, &answers(&[(1, false), (2, true)])));
        // Answers of non-voters (a hostile certificate) do not count, nor does its own.
        assert!(!removal_confirmed(3, &voters, &answers(&[(9, false), (3, false), (1, false)])));
        // Two voters: the other one decides.
        assert!(removal_confirmed(2, &set(&[1, 2]), &answers(&[(1, false)])));
        assert!(!removal_confirmed(1, &set(&[1]), &answers(&[])));
    }
}
