//! Which Raft messages a node lets reach openraft: decisions as pure functions, tested from
//! tables of cases.
//!
//! Two checks, both before openraft sees a message:
//! - **The sender must be a member** ([`sender_admitted`]): a node of this node's effective
//!   membership (voters and learners, both halves of a joint configuration), or one that a member
//!   vouched for (see `cluster::raft_admission`). A certificate of a node that never joined, or was
//!   removed, can neither vote, nor replicate, nor install a snapshot, nor propose.
//! - **The content must be plausible** ([`check_append_entries`], [`check_vote`],
//!   [`check_install_snapshot`]): terms and indexes far from overflow, entries that follow each
//!   other, snapshot ids that are plain file names. openraft asserts such things (and a term of
//!   `u64::MAX` once made it panic in an election); a member that is broken must not be able to
//!   make another node panic.

use std::collections::BTreeSet;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

use super::types::{LogId, NodeId, TypeConfig, Vote};

/// Terms and log indexes at or above this are refused: far beyond anything real (a term a second
/// for 10^11 years), far below where `+ 1` overflows.
pub const MAX_PLAUSIBLE: u64 = 1 << 62;

/// How far a message's term may be ahead of this node's. A node cut off for a long time comes
/// back with a term a few thousand ahead at most; 2^32 elections never happen.
pub const MAX_TERM_JUMP: u64 = 1 << 32;

/// Longest snapshot id (it names a file).
pub const MAX_SNAPSHOT_ID_BYTES: usize = 128;

/// Highest byte offset of a snapshot chunk: 1 TiB.
pub const MAX_SNAPSHOT_OFFSET: u64 = 1 << 40;

/// Whether `sender` may send Raft messages to a node whose membership lists `members`, given the
/// nodes that members vouched for.
pub fn sender_admitted(sender: NodeId, members: &BTreeSet<NodeId>, vouched: &BTreeSet<NodeId>) -> bool {
    members.contains(&sender) || vouched.contains(&sender)
}

/// A snapshot id is a plain file name: 1 to 128 of `[A-Za-z0-9_-]`, so that it can never name a
/// path outside the snapshot directory.
pub fn valid_snapshot_id(snapshot_id: &str) -> bool {
    !snapshot_id.is_empty()
        && snapshot_id.len() <= MAX_SNAPSHOT_ID_BYTES
        && snapshot_id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

fn check_vote_term(vote: &Vote, current_term: u64) -> Result<(), String> {
    let term = vote.leader_id().term;
    if term >= MAX_PLAUSIBLE || term > current_term.saturating_add(MAX_TERM_JUMP) {
        return Err(format!("term {term} is implausible (this node is at term {current_term})"));
    }
    Ok(())
}

fn check_log_id(what: &str, log_id: Option<&LogId>) -> Result<(), String> {
    if let Some(log_id) = log_id {
        if log_id.index >= MAX_PLAUSIBLE || log_id.leader_id.term >= MAX_PLAUSIBLE {
            return Err(format!("{what} {log_id} is implausible"));
        }
    }
    Ok(())
}

pub fn check_vote(request: &VoteRequest<NodeId>, current_term: u64) -> Result<(), String> {
    check_vote_term(&request.vote, current_term)?;
    check_log_id("last log id", request.last_log_id.as_ref())
}

pub fn check_append_entries(request: &AppendEntriesRequest<TypeConfig>, current_term: u64) -> Result<(), String> {
    check_vote_term(&request.vote, current_term)?;
    check_log_id("previous log id", request.prev_log_id.as_ref())?;
    check_log_id("leader commit", request.leader_commit.as_ref())?;
    let vote_term = request.vote.leader_id().term;
    let first_index = request.prev_log_id.map_or(0, |log_id| log_id.index + 1);
    let mut previous_term = request.prev_log_id.map_or(0, |log_id| log_id.leader_id.term);
    for (expected_index, entry) in (first_index..).zip(&request.entries) {
        check_log_id("entry", Some(&entry.log_id))?;
        if entry.log_id.index != expected_index {
            return Err(format!("entry {} does not follow at index {expected_index}", entry.log_id));
        }
        let term = entry.log_id.leader_id.term;
        if term < previous_term || term > vote_term {
            return Err(format!("entry {} has a term out of order (sender's term {vote_term})", entry.log_id));
        }
        previous_term = term;
    }
    Ok(())
}

pub fn check_install_snapshot(request: &InstallSnapshotRequest<TypeConfig>, current_term: u64) -> Result<(), String> {
    check_vote_term(&request.vote, current_term)?;
    check_log_id("snapshot last log id", request.meta.last_log_id.as_ref())?;
    if !valid_snapshot_id(&request.meta.snapshot_id) {
        return Err(format!(
            "snapshot id {:?} is not a plain name of at most {MAX_SNAPSHOT_ID_BYTES} letters, digits, `-` or `_`",
            request.meta.snapshot_id
        ));
    }
    if request.offset > MAX_SNAPSHOT_OFFSET {
        return Err(format!("snapshot chunk offset {} is implausible", request.offset));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::raft::types::{Entry, SnapshotMeta, StoredMembership};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
    }

    fn append(term: u64, previous: Option<(u64, u64)>, entries: &[(u64, u64)]) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: previous.map(|(term, index)| log_id(term, index)),
            entries: entries.iter().map(|(term, index)| entry(*term, *index)).collect(),
            leader_commit: None,
        }
    }

    #[test]
    fn senders_from_a_table() {
        let members: BTreeSet<u64> = [1, 2, 3].into();
        let vouched: BTreeSet<u64> = [4].into();
        let cases = [(1, true), (3, true), (4, true), (99, false), (0, false)];
        for (sender, admitted) in cases {
            assert_eq!(sender_admitted(sender, &members, &vouched), admitted, "sender {sender}");
        }
        assert!(!sender_admitted(1, &BTreeSet::new(), &BTreeSet::new()), "an empty membership admits no one");
    }

    #[test]
    fn snapshot_ids_from_a_table() {
        let cases = [
            ("3-120-0a1b2c3d", true),
            ("0-0-deadbeef", true),
            ("", false),
            ("../../../tmp/pwned", false),
            ("a/b", false),
            ("a\\b", false),
            ("..", false),
            ("name.snap", false),
            ("nul\0", false),
        ];
        for (snapshot_id, valid) in cases {
            assert_eq!(valid_snapshot_id(snapshot_id), valid, "{snapshot_id:?}");
        }
        assert!(valid_snapshot_id(&"a".repeat(MAX_SNAPSHOT_ID_BYTES)));
        assert!(!valid_snapshot_id(&"a".repeat(MAX_SNAPSHOT_ID_BYTES + 1)));
    }

    #[test]
    fn votes_from_a_table() {
        let cases: [(u64, u64, bool); 6] = [
            (5, 4, true),
            (5, 5000, true),
            (u64::MAX, 4, false),
            (MAX_PLAUSIBLE, 4, false),
            (4 + MAX_TERM_JUMP, 4, true),
            (5 + MAX_TERM_JUMP, 4, false),
        ];
        for (term, current, plausible) in cases {
            let request = VoteRequest { vote: Vote::new(term, 1), last_log_id: None };
            assert_eq!(check_vote(&request, current).is_ok(), plausible, "term {term} at {current}");
        }
        let far_log = VoteRequest { vote: Vote::new(5, 1), last_log_id: Some(log_id(5, u64::MAX)) };
        assert!(check_vote(&far_log, 4).is_err());
    }

    #[test]
    fn appends_from_a_table() {
        let cases: Vec<(AppendEntriesRequest<TypeConfig>, bool)> = vec![
            (append(3, None, &[]), true),
            (append(3, None, &[(1, 0), (1, 1), (3, 2)]), true),
            (append(3, Some((2, 9)), &[(2, 10), (3, 11)]), true),
            (append(3, Some((2, 9)), &[(2, 11)]), false),
            (append(3, Some((2, 9)), &[(2, 10), (2, 10)]), false),
            (append(3, Some((2, 9)), &[(4, 10)]), false),
            (append(3, Some((2, 9)), &[(1, 10)]), false),
            (append(3, Some((2, u64::MAX)), &[]), false),
            (append(u64::MAX, None, &[]), false),
        ];
        for (request, plausible) in cases {
            assert_eq!(check_append_entries(&request, 3).is_ok(), plausible, "{request:?}");
        }
        let mut commit_far = append(3, None, &[]);
        commit_far.leader_commit = Some(log_id(3, MAX_PLAUSIBLE));
        assert!(check_append_entries(&commit_far, 3).is_err());
    }

    #[test]
    fn snapshot_chunks_from_a_table() {
        let request = |snapshot_id: &str, offset: u64| InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(3, 10)),
                last_membership: StoredMembership::default(),
                snapshot_id: snapshot_id.to_string(),
            },
            offset,
            data: Vec::new(),
            done: false,
        };
        assert!(check_install_snapshot(&request("3-10-00ff00ff", 0), 3).is_ok());
        let error = check_install_snapshot(&request("../../pwned", 0), 3).unwrap_err();
        assert!(error.contains("snapshot id"), "{error}");
        assert!(check_install_snapshot(&request("3-10-00ff00ff", MAX_SNAPSHOT_OFFSET + 1), 3).is_err());
    }
}
