//! The newest entries of the Raft log, kept in memory as they were appended.
//!
//! Every entry is read back soon after it is appended: by the state machine to apply it (on
//! every node), and on the leader once per follower to replicate it. Read from redb, each of
//! those reads decoded the whole entry again (a bulk entry is a thousand documents), on a
//! blocking thread the Raft core or the replication task waited for. Kept here, a read is a
//! clone of the entry, whose batch is behind an `Arc`: no copy of the documents at all.
//!
//! The window is a contiguous run of indexes that always ends at the last entry of the log, so
//! that a read of `start..` can be answered from it alone; the owner keeps that true by telling
//! it of every append, truncation and purge (see `raft::log_store`). It holds at most
//! [`RecentEntries::budget`] bytes, counted by [`memory_size`] (an entry's encoded size plus what
//! each of its operations costs in memory beyond its text); older entries fall out first, and an
//! entry larger than the whole budget empties it (reads then go to the file).
//! Decisions only: no I/O, no locking, tested from tables of cases.

use std::collections::VecDeque;

use openraft::EntryPayload;

use super::types::{Entry, GroupedRequest, IndexBatch};
use crate::index::IndexOperation;

/// Bytes of entries kept, at most ([`memory_size`]). Replication and apply lag the append by a
/// few entries; this holds tens of a bulk load's 1,000-document entries, or thousands of group
/// commit's. After a burst the node gives them back once every reader has them
/// ([`read_by_everyone`]).
pub const RECENT_ENTRIES_BYTES: usize = 16 * 1024 * 1024;

/// What an entry costs in memory, about: its encoded size, plus for each operation its place in
/// a list and the allocator's rounding of its two strings. A batch of small deletes takes
/// several times its encoded size; counting only that would let the window hold far more than
/// its budget says.
pub fn memory_size(entry: &Entry, encoded: usize) -> usize {
    const PER_OPERATION: usize = std::mem::size_of::<IndexOperation>() + 32;
    const PER_REQUEST: usize = std::mem::size_of::<GroupedRequest>() + 16;
    match &entry.payload {
        EntryPayload::Normal(batch) => {
            let operations =
                batch.operations.len() + batch.grouped.iter().map(|request| request.operations.len()).sum::<usize>();
            encoded
                .saturating_add(operations.saturating_mul(PER_OPERATION))
                .saturating_add(batch.grouped.len().saturating_mul(PER_REQUEST))
                .saturating_add(std::mem::size_of::<IndexBatch>())
        }
        // A membership is a few maps of a few members (tree nodes of hundreds of bytes each);
        // blanks are nothing.
        EntryPayload::Membership(_) => encoded.saturating_mul(16),
        EntryPayload::Blank => encoded,
    }
    .saturating_add(std::mem::size_of::<Entry>())
}

/// The index through which every reader of this node's log has read the entries (the state
/// machine applied them, and on a leader every follower and learner holds them), so the window
/// can give them back: after a burst of writes it empties within the node's next metrics tick
/// instead of holding its budget until newer entries push them out. `None` while some reader may
/// still need the oldest ones: nothing applied yet, or a target of the leader with nothing
/// matched. A reader that needs a released entry after all (a follower elected leader, a new
/// member) reads it from the file.
pub fn read_by_everyone(last_applied: Option<u64>, matched_by_targets: Option<&[Option<u64>]>) -> Option<u64> {
    let applied = last_applied?;
    match matched_by_targets {
        None => Some(applied),
        Some(matched) => matched.iter().try_fold(applied, |lowest, target| Some(lowest.min((*target)?))),
    }
}

/// What the window knows of the index of the log's last entry: the file's, or above it. Kept even
/// when the window is empty, so that an append can tell whether it makes the end of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEnd {
    /// Not known (a write failed): nothing is kept until the store is opened again.
    Unknown,
    /// The log holds no entry.
    Empty,
    /// The last entry's index is at most this.
    AtMost(u64),
}

/// The newest entries of the log, contiguous, ending at the log's last entry.
#[derive(Debug)]
pub struct RecentEntries {
    /// Entries with their [`memory_size`], in index order without gaps; when not empty, the last
    /// one is the log's last entry.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
    budget: usize,
    end: LogEnd,
}

impl RecentEntries {
    /// An empty window over a log whose last entry is `end`.
    pub fn new(budget: usize, end: LogEnd) -> Self {
        RecentEntries { entries: VecDeque::new(), bytes: 0, budget, end }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// What the window knows of the log's end.
    pub fn end(&self) -> LogEnd {
        self.end
    }

    /// Bytes of the entries kept ([`memory_size`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(entry, _)| entry.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(entry, _)| entry.log_id.index)
    }

    /// Entries just made durable in the log, in index order, each with its [`memory_size`]. They
    /// are kept only when they are certain to end the log: they continue it, start after a gap
    /// (the log continued after a snapshot), or replace its whole tail. openraft truncates a
    /// conflicting tail before it appends, so a run that overwrites part of the tail only is
    /// not expected; it empties the window, and the file answers.
    pub fn appended(&mut self, appended: Vec<(Entry, usize)>) {
        let (Some(first), Some(last)) = (
            appended.first().map(|(entry, _)| entry.log_id.index),
            appended.last().map(|(entry, _)| entry.log_id.index),
        ) else {
            return;
        };
        let contiguous = appended.iter().enumerate().all(|(offset, (entry, _))| {
            u64::try_from(offset).ok().and_then(|offset| first.checked_add(offset)) == Some(entry.log_id.index)
        });
        if !contiguous {
            // Not a run openraft writes: the file's end may be anywhere among them.
            self.entries.clear();
            self.bytes = 0;
            self.end = LogEnd::Unknown;
            return;
        }
        let ends_the_log = match self.end {
            LogEnd::Unknown => false,
            LogEnd::Empty => true,
            LogEnd::AtMost(end) => last >= end,
        };
        let continues_the_window = self.last_index().and_then(|kept| kept.checked_add(1)) == Some(first);
        if !continues_the_window {
            self.entries.clear();
            self.bytes = 0;
        }
        if !ends_the_log {
            // The file keeps entries after these: the window stays empty, the end where it was.
            self.entries.clear();
            self.bytes = 0;
            return;
        }
        self.end = LogEnd::AtMost(last);
        for (entry, size) in appended {
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.bytes > self.budget {
            match self.entries.pop_front() {
                Some((_, size)) => self.bytes = self.bytes.saturating_sub(size),
                None => break,
            }
        }
        // The list's own slots are not counted: after a burst of many small entries it would
        // keep room for all of them. Give it back once it is mostly empty.
        if self.entries.capacity() > 64 && self.entries.len() * 4 < self.entries.capacity() {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }

    /// The log lost every entry from `index` on.
    pub fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes = self.bytes.saturating_sub(size);
            }
        }
        self.end = match (self.end, index.checked_sub(1)) {
            (LogEnd::AtMost(end), Some(before)) if end > before => LogEnd::AtMost(before),
            (LogEnd::AtMost(_), None) => LogEnd::Empty,
            (end, _) => end,
        };
    }

    /// Takes the entries through `index` out of the window (the log purged them, or every
    /// reader has read them and the file keeps them) and hands them to the caller, who frees
    /// them after letting go of the lock: a burst's batches are hundreds of thousands of
    /// strings. The log's end does not move.
    pub fn release_through(&mut self, index: u64) -> Vec<Entry> {
        let count = self.entries.iter().take_while(|(entry, _)| entry.log_id.index <= index).count();
        let mut released = Vec::with_capacity(count);
        for (entry, size) in self.entries.drain(..count) {
            self.bytes = self.bytes.saturating_sub(size);
            released.push(entry);
        }
        released
    }

    /// Forgets everything, the log's end included: a write failed, and the file may hold more
    /// or less than it was told.
    pub fn forget(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.end = LogEnd::Unknown;
    }

    /// The entries of `[start, end)` (`end == None`: to the end of the log), or `None` when the
    /// window does not hold all of them and the file must be read. Because the window ends at
    /// the log's end, a range past it is answered as the file would: with what exists.
    pub fn read(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        let wanted = end.map(|end| end.saturating_sub(start)).unwrap_or(u64::MAX);
        let take = usize::try_from(wanted).unwrap_or(usize::MAX);
        Some(self.entries.iter().skip(skip).take(take).map(|(entry, _)| entry.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::raft::types::LogId;

    fn entry(term: u64, index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
    }

    fn run(term: u64, indexes: std::ops::RangeInclusive<u64>, size: usize) -> Vec<(Entry, usize)> {
        indexes.map(|index| (entry(term, index), size)).collect()
    }

    fn kept(recent: &RecentEntries) -> Vec<(u64, u64)> {
        recent.entries.iter().map(|(entry, _)| (entry.log_id.leader_id.term, entry.log_id.index)).collect()
    }

    fn drop_released(recent: &mut RecentEntries, index: u64) {
        drop(recent.release_through(index));
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|entries| entries.iter().map(|entry| entry.log_id.index).collect())
    }

    /// Each case: what happens to a window holding 5..=9 of term 1 (10 bytes each, budget 100),
    /// then what it holds and what it knows of the log's end.
    #[test]
    fn the_window_follows_the_log() {
        type Step = fn(&mut RecentEntries);
        type Case = (&'static str, Step, Vec<(u64, u64)>, LogEnd);
        let cases: [Case; 12] = [
            (
                "appending the next entries extends it",
                |r| r.appended(run(1, 10..=11, 10)),
                (5..=11).map(|i| (1, i)).collect(),
                LogEnd::AtMost(11),
            ),
            (
                "a new leader's entry after a truncation continues it",
                |r| {
                    r.truncate_from(8);
                    r.appended(run(2, 8..=8, 10))
                },
                vec![(1, 5), (1, 6), (1, 7), (2, 8)],
                LogEnd::AtMost(8),
            ),
            (
                "entries replacing the whole tail start it afresh",
                |r| r.appended(run(2, 8..=10, 10)),
                vec![(2, 8), (2, 9), (2, 10)],
                LogEnd::AtMost(10),
            ),
            (
                "entries overwriting part of the tail empty it: the file still holds the rest",
                |r| r.appended(run(2, 8..=8, 10)),
                vec![],
                LogEnd::AtMost(9),
            ),
            (
                "entries after a gap start it afresh",
                |r| r.appended(run(3, 20..=21, 10)),
                vec![(3, 20), (3, 21)],
                LogEnd::AtMost(21),
            ),
            (
                "past the budget the oldest fall out",
                |r| r.appended(run(1, 10..=14, 12)),
                (6..=14).map(|i| (1, i)).collect(),
                LogEnd::AtMost(14),
            ),
            (
                "an entry larger than the budget empties it, and it refills after",
                |r| {
                    r.appended(run(1, 10..=10, 101));
                    assert_eq!(r.read(10, None).map(|entries| entries.len()), None);
                    r.appended(run(1, 11..=11, 10))
                },
                vec![(1, 11)],
                LogEnd::AtMost(11),
            ),
            (
                "a run with a hole makes the end unknown, and nothing is kept after",
                |r| {
                    r.appended(vec![(entry(1, 10), 1), (entry(1, 12), 1)]);
                    r.appended(run(1, 13..=13, 10))
                },
                vec![],
                LogEnd::Unknown,
            ),
            ("a failed write forgets everything", |r| r.forget(), vec![], LogEnd::Unknown),
            ("truncation drops the tail", |r| r.truncate_from(7), vec![(1, 5), (1, 6)], LogEnd::AtMost(6)),
            (
                "truncation from 0 leaves no entry",
                |r| {
                    r.truncate_from(0);
                    r.appended(run(4, 0..=0, 10))
                },
                vec![(4, 0)],
                LogEnd::AtMost(0),
            ),
            ("a purge drops the head", |r| drop(r.release_through(6)), vec![(1, 7), (1, 8), (1, 9)], LogEnd::AtMost(9)),
        ];
        for (case, step, expected, end) in cases {
            let mut recent = RecentEntries::new(100, LogEnd::AtMost(4));
            recent.appended(run(1, 5..=9, 10));
            step(&mut recent);
            assert_eq!(kept(&recent), expected, "{case}");
            assert_eq!(recent.end, end, "{case}: end");
            let counted: usize = recent.entries.iter().map(|(_, size)| size).sum();
            assert_eq!(recent.bytes(), counted, "{case}: bytes");
            assert!(recent.bytes() <= recent.budget(), "{case}: budget");
        }
    }

    /// Small operations cost far more than their bytes on the wire; documents about what they
    /// weigh encoded.
    #[test]
    fn memory_size_counts_operations_not_only_bytes() {
        let batch = |operations: Vec<IndexOperation>| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(std::sync::Arc::new(IndexBatch::internal(operations))),
        };
        let deletes = batch((0..1000).map(|n| IndexOperation::Delete { id: n.to_string() }).collect());
        let documents = batch(
            (0..1000)
                .map(|n| IndexOperation::Put {
                    id: n.to_string(),
                    document_json: format!("{{\"body\":\"{}\"}}", "w".repeat(300)),
                })
                .collect(),
        );
        for (what, entry, at_least, at_most) in [("deletes", deletes, 10.0, 40.0), ("documents", documents, 1.1, 1.5)] {
            let encoded = postcard::to_stdvec(&entry).unwrap().len();
            let ratio = memory_size(&entry, encoded) as f64 / encoded as f64;
            assert!((at_least..=at_most).contains(&ratio), "{what}: {ratio:.2} times the encoded size");
        }
    }

    /// Each case: the applied index, the leader's targets' matched indexes (`None`: not the
    /// leader), and the index through which the window may give entries back.
    #[test]
    fn entries_are_given_back_once_every_reader_has_them() {
        type Case = (&'static str, Option<u64>, Option<&'static [Option<u64>]>, Option<u64>);
        let cases: [Case; 7] = [
            ("a follower: what it applied", Some(9), None, Some(9)),
            ("nothing applied yet", None, None, None),
            ("a leader whose followers hold more than it applied", Some(9), Some(&[Some(12), Some(11)]), Some(9)),
            ("a leader with a follower behind", Some(9), Some(&[Some(12), Some(4)]), Some(4)),
            ("a target with nothing matched holds everything", Some(9), Some(&[Some(12), None]), None),
            ("a leader alone", Some(9), Some(&[]), Some(9)),
            ("a leader that applied nothing", None, Some(&[Some(3)]), None),
        ];
        for (case, applied, matched, expected) in cases {
            assert_eq!(read_by_everyone(applied, matched), expected, "{case}");
        }
    }

    /// Each case: the window's knowledge of the log's end when the store opened, and whether the
    /// first run appended (7..=8) is kept.
    #[test]
    fn an_empty_window_keeps_only_what_ends_the_log() {
        let cases = [
            (LogEnd::Empty, true),
            (LogEnd::AtMost(6), true),
            (LogEnd::AtMost(3), true),
            (LogEnd::AtMost(8), true),
            (LogEnd::AtMost(9), false),
            (LogEnd::Unknown, false),
        ];
        for (end, kept_it) in cases {
            let mut recent = RecentEntries::new(100, end);
            recent.appended(run(1, 7..=8, 10));
            assert_eq!(!kept(&recent).is_empty(), kept_it, "{end:?}");
        }
    }

    #[test]
    fn purges_and_truncations_past_either_end() {
        let mut recent = RecentEntries::new(100, LogEnd::Empty);
        recent.appended(run(1, 5..=9, 10));
        recent.truncate_from(10);
        drop_released(&mut recent, 4);
        assert_eq!(kept(&recent).len(), 5, "outside the window: nothing to drop");
        drop_released(&mut recent, 9);
        assert_eq!(
            (kept(&recent), recent.bytes(), recent.end),
            (vec![], 0, LogEnd::AtMost(9)),
            "purged through the end"
        );
        recent.appended(run(1, 10..=10, 10));
        recent.truncate_from(0);
        assert_eq!((kept(&recent), recent.bytes(), recent.end), (vec![], 0, LogEnd::Empty), "truncated from 0");
        recent.appended(run(1, u64::MAX - 1..=u64::MAX, 10));
        assert_eq!(kept(&recent), vec![(1, u64::MAX - 1), (1, u64::MAX)], "the last index a log can have");
        recent.truncate_from(3);
        recent.appended(run(1, 3..=3, 10));
        assert_eq!(kept(&recent), vec![(1, 3)]);
    }

    /// Each case: a range read from a window holding 5..=9, and what the file would answer
    /// (`None`: the window cannot tell, the file is read).
    #[test]
    fn reads_are_answered_only_when_the_window_holds_the_range() {
        let mut recent = RecentEntries::new(100, LogEnd::Empty);
        recent.appended(run(1, 5..=9, 10));
        let cases: [(u64, Option<u64>, Option<Vec<u64>>); 9] = [
            (5, None, Some(vec![5, 6, 7, 8, 9])),
            (7, Some(9), Some(vec![7, 8])),
            (9, Some(10), Some(vec![9])),
            (8, Some(30), Some(vec![8, 9])),
            (10, None, Some(vec![])),
            (40, Some(50), Some(vec![])),
            (7, Some(7), Some(vec![])),
            (4, Some(6), None),
            (0, None, None),
        ];
        for (start, end, expected) in cases {
            assert_eq!(indexes(recent.read(start, end)), expected, "{start}..{end:?}");
        }
        assert_eq!(
            indexes(RecentEntries::new(100, LogEnd::Empty).read(5, None)),
            None,
            "an empty window knows nothing"
        );
    }
}
