//! The durable Raft log: entries, vote, committed and last purged log ids in one redb file.
//!
//! Layout of the file (usually `<data>/raft/log.redb`):
//!
//! Every value starts with one byte, [`LOG_FORMAT_VERSION`], then postcard bytes:
//! - table `raft_log_entries`: `u64` log index -> postcard bytes of `(LogId, EntryPayload)`, which
//!   is exactly how postcard encodes an `Entry` (a struct is its fields in order, without names).
//!   Because the log id comes first, the log id of an entry can be decoded without decoding its
//!   payload, which may be a bulk batch of many megabytes.
//! - table `raft_log_meta`: `"vote"`, `"committed"` and `"last_purged"`, each a postcard value.
//!
//! Every write (append, vote, truncate, purge) is one redb write transaction committed with
//! immediate durability, i.e. fsynced before the call returns: Raft's safety depends on a node
//! never forgetting a vote it cast or an entry it acknowledged. The committed log id is the one
//! exception: it is a hint openraft may lose (see `save_committed`), written without an fsync and
//! made durable by the next durable transaction. redb calls block, so each one
//! runs on tokio's blocking pool and the async methods only await its result.

use std::fmt;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::recent_entries::{LogEnd, RecentEntries, RECENT_ENTRIES_BYTES};
use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// Log entries by index.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log_entries");
/// Vote, committed and last purged log ids.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_log_meta");

const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const LAST_PURGED_KEY: &str = "last_purged";
/// Bytes of the log file redb keeps cached in memory.
pub const LOG_CACHE_BYTES: usize = 96 * 1024 * 1024;

/// The format of every value in the file ([`LOG_FORMAT_VERSION`]), one byte.
const FORMAT_KEY: &str = "format";

/// Records the format of a new file, and brings a file written before formats existed (values
/// without the format byte, no `format` key) up to the current one, in one transaction: a
/// value's first byte is then never mistaken for a format it is not.
fn settle_format(db: &Database) -> Result<(), Failure> {
    write_txn(db, |txn| {
        let mut meta = txn.open_table(META)?;
        let recorded = meta.get(FORMAT_KEY)?.map(|value| value.value().to_vec());
        match recorded.as_deref() {
            Some([LOG_FORMAT_VERSION]) => return Ok(()),
            // Formats 1 to 3 differ only in their `Normal` entries, which `decode_entry` still
            // reads: new values are written in the new format next to the old ones.
            Some(
                [FORMAT_WITHOUT_REQUEST_IDS | FORMAT_WITHOUT_KEYS | FORMAT_WITHOUT_GROUPS | FORMAT_WITHOUT_STAMPS],
            ) => {
                meta.insert(FORMAT_KEY, [LOG_FORMAT_VERSION].as_slice())?;
                return Ok(());
            }
            Some(other) => {
                return Err(Failure::UnknownFormat {
                    what: "the raft log".to_string(),
                    found: other.first().copied().unwrap_or(0),
                })
            }
            None => {}
        }
        // Unversioned values (of before format 1): prefix each with format 1's byte, which the
        // decoders read.
        let meta_values: Vec<(String, Vec<u8>)> = meta
            .iter()?
            .map(|item| item.map(|(key, value)| (key.value().to_string(), value.value().to_vec())))
            .collect::<Result<_, _>>()?;
        for (key, value) in meta_values {
            let mut prefixed = vec![FORMAT_WITHOUT_REQUEST_IDS];
            prefixed.extend_from_slice(&value);
            meta.insert(key.as_str(), prefixed.as_slice())?;
        }
        meta.insert(FORMAT_KEY, [LOG_FORMAT_VERSION].as_slice())?;
        let mut entries = txn.open_table(ENTRIES)?;
        let keys: Vec<u64> = entries.iter()?.map(|item| item.map(|(key, _)| key.value())).collect::<Result<_, _>>()?;
        if !keys.is_empty() {
            tracing::info!(entries = keys.len(), "raft log written before formats existed: adding format bytes");
        }
        for key in keys {
            let value = entries.get(key)?.map(|value| value.value().to_vec()).unwrap_or_default();
            let mut prefixed = vec![FORMAT_WITHOUT_REQUEST_IDS];
            prefixed.extend_from_slice(&value);
            entries.insert(key, prefixed.as_slice())?;
        }
        Ok(())
    })
}

/// Why the log file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The directory that should hold the log file cannot be created.
    #[error("cannot open raft log at {path}: cannot create directory {dir}: {source}")]
    CreateDir {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },

    /// redb refuses the file: unreadable, corrupt, or already open (by this or another process).
    #[error("cannot open raft log at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },

    /// The file's format cannot be established or brought up to date.
    #[error("cannot open raft log at {path}: {reason}")]
    Format { path: PathBuf, reason: String },

    /// The file opened but its tables cannot be created.
    #[error("cannot open raft log at {path}: cannot create tables: {source}")]
    Init {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
}

/// What went wrong inside one blocking storage task; turned into openraft's `StorageError` (with
/// the subject and verb of the operation) at the async boundary.
#[derive(Debug, thiserror::Error)]
enum Failure {
    // Boxed: redb's error is large and this travels through every `Result` of the module.
    #[error("redb: {0}")]
    Db(Box<redb::Error>),

    #[error("cannot encode {what}: {error}")]
    Encode { what: String, error: postcard::Error },

    #[error("corrupt {what}: {error}")]
    Decode { what: String, error: postcard::Error },

    /// A value of a format this build does not know (a newer bayard wrote it, or it is damaged).
    #[error(
        "{what} is stored in log format {found}; this build reads format {LOG_FORMAT_VERSION}: run the bayard \
         version that wrote it"
    )]
    UnknownFormat { what: String, found: u8 },

    /// The key and the log id inside the value disagree: the table was damaged or written by
    /// something else. Returning such an entry would silently corrupt replication.
    #[error("corrupt log entry at index {key}: it carries log id {found}")]
    Misplaced { key: u64, found: LogId },

    #[error("raft log task did not complete: {0}")]
    Task(tokio::task::JoinError),
}

// Each redb operation has its own error type; all of them convert into `redb::Error`, so `?` can
// be used on any of them inside a task.
macro_rules! failure_from_redb {
    ($($error:ty),* $(,)?) => {
        $(impl From<$error> for Failure {
            fn from(error: $error) -> Self {
                Failure::Db(Box::new(error.into()))
            }
        })*
    };
}
failure_from_redb!(redb::Error, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl Failure {
    fn into_storage_error(self, subject: ErrorSubject<NodeId>, verb: ErrorVerb) -> StorageError {
        // The message already carries the causes; `AnyError::new` would prefix the type name and
        // repeat each source.
        StorageIOError::new(subject, verb, AnyError::error(self.to_string())).into()
    }
}

/// The Raft log store on redb. Cloning is cheap and shares the open database; a clone is the
/// `LogReader` handed to replication tasks.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    path: Arc<Path>,
    /// The newest entries, as appended (`raft::recent_entries`), shared by clones: reads they
    /// hold are answered from memory. Told of every append, truncation and purge; emptied when a
    /// write fails. The lock is held for bookkeeping and `Arc` clones only, never across I/O.
    recent: Arc<std::sync::Mutex<RecentEntries>>,
    /// The last committed index openraft saved, plus one (0: none); shared by clones, read by
    /// the node's readiness check.
    committed_index: Arc<std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the log file at `path`, creating it (and its parent directories) when missing.
    ///
    /// Blocking: call it at startup, or from a blocking thread.
    pub fn open(path: &Path) -> Result<LogStore, LogStoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LogStoreError::CreateDir {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        // redb caches pages of the file in memory, 1 GiB by default: a node's memory could grow
        // with its log until a snapshot purges it. A tenth of the cache is redb's write buffer,
        // so this keeps a whole grouped entry (at most half the frame limit) in it.
        let db = redb::Builder::new()
            .set_cache_size(LOG_CACHE_BYTES)
            .create(path)
            .map_err(|source| LogStoreError::Open { path: path.to_path_buf(), source: Box::new(source) })?;

        // Create both tables up front so that read transactions never meet a missing table.
        create_tables(&db).map_err(|source| LogStoreError::Init { path: path.to_path_buf(), source })?;
        settle_format(&db)
            .map_err(|failure| LogStoreError::Format { path: path.to_path_buf(), reason: failure.to_string() })?;

        let committed: Option<LogId> = get_meta(&db, COMMITTED_KEY).unwrap_or(None);
        // Where the log ends, so that the first entries appended know they end it; unreadable,
        // nothing is kept in memory and every read goes to the file.
        let end = match read_log_state(&db) {
            Ok(LogState { last_log_id: Some(last), .. }) => LogEnd::AtMost(last.index),
            Ok(LogState { last_log_id: None, .. }) => LogEnd::Empty,
            Err(_) => LogEnd::Unknown,
        };
        let committed_index =
            Arc::new(std::sync::atomic::AtomicU64::new(committed.map(|log_id| log_id.index + 1).unwrap_or(0)));
        Ok(LogStore {
            db: Arc::new(db),
            path: Arc::from(path),
            recent: Arc::new(std::sync::Mutex::new(RecentEntries::new(RECENT_ENTRIES_BYTES, end))),
            committed_index,
        })
    }

    /// The index of the last entry known committed, as last saved by Raft.
    pub fn committed_index(&self) -> Option<u64> {
        self.committed_index.load(std::sync::atomic::Ordering::Acquire).checked_sub(1)
    }

    /// Gives back the entries through `index` kept in memory: every reader has read them
    /// (`recent_entries::read_by_everyone`). A later read of one goes to the file.
    pub fn release_entries_through(&self, index: u64) {
        // Freed here, after the lock is let go: readers on the Raft core wait for that lock.
        let released = self.recent_entries().release_through(index);
        drop(released);
    }

    /// Bytes of entries kept in memory (`recent_entries::memory_size`).
    pub fn entries_in_memory_bytes(&self) -> usize {
        self.recent_entries().bytes()
    }

    /// The file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Index of the last entry, or of the last purged entry when the log is empty; `None` when
    /// nothing was ever appended.
    pub async fn last_log_index(&self) -> Result<Option<u64>, StorageError> {
        let state = self.run(ErrorSubject::Logs, ErrorVerb::Read, read_log_state).await?;
        Ok(state.last_log_id.map(|log_id| log_id.index))
    }

    /// Whether this log has never been used: no vote, no entry and nothing purged. A node uses it
    /// to tell a brand new data directory from one that already belongs to a cluster.
    pub async fn is_empty(&self) -> Result<bool, StorageError> {
        self.run(ErrorSubject::Store, ErrorVerb::Read, |db| {
            read_txn(db, |txn| {
                let meta = txn.open_table(META)?;
                let entries = txn.open_table(ENTRIES)?;
                Ok(meta.get(VOTE_KEY)?.is_none() && meta.get(LAST_PURGED_KEY)?.is_none() && entries.first()?.is_none())
            })
        })
        .await
    }

    /// Writes `entries` in one durable transaction. Returns once they are on disk, and readable
    /// from memory.
    async fn append_entries(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let recent = Arc::clone(&self.recent);
        self.run(ErrorSubject::Logs, ErrorVerb::Write, move |db| {
            let written = write_txn(db, |txn| {
                let mut table = txn.open_table(ENTRIES)?;
                let mut written = Vec::with_capacity(entries.len());
                for entry in entries {
                    let bytes = encode_entry(&entry)?;
                    table.insert(entry.log_id.index, bytes.as_slice())?;
                    let size = super::recent_entries::memory_size(&entry, bytes.len());
                    written.push((entry, size));
                }
                Ok(written)
            });
            // Kept only once durable, so a read from memory never returns what the file may
            // lack; and told here, on the blocking thread, which runs to the end even when the
            // caller stops waiting, so that the window and the file never part.
            let mut window = lock_window(&recent);
            match written {
                Ok(written) => {
                    window.appended(written);
                    Ok(())
                }
                Err(failure) => {
                    window.forget();
                    Err(failure)
                }
            }
        })
        .await
        .inspect_err(|_| self.recent_entries().forget())
    }

    fn recent_entries(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        lock_window(&self.recent)
    }

    /// Runs blocking redb work on tokio's blocking pool, so that a slow fsync never stalls the
    /// runtime, and maps any failure to a `StorageError` about `subject`.
    async fn run<T, F>(&self, subject: ErrorSubject<NodeId>, verb: ErrorVerb, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, Failure> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let outcome = tokio::task::spawn_blocking(move || work(&db)).await.map_err(Failure::Task);
        match outcome.and_then(|result| result) {
            Ok(value) => Ok(value),
            Err(failure) => {
                tracing::error!(path = %self.path.display(), error = %failure, "raft log storage failure");
                Err(failure.into_storage_error(subject, verb))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let Some((start, end)) = index_bounds(&range) else {
            return Ok(Vec::new());
        };
        let from_memory = self.recent_entries().read(start, end);
        crate::telemetry::metrics::record_log_read(from_memory.is_some());
        if let Some(entries) = from_memory {
            return Ok(entries);
        }
        self.run(ErrorSubject::Logs, ErrorVerb::Read, move |db| read_file_entries(db, start, end)).await
    }
}

/// The entries of `[start, end)` as the file holds them, decoded.
fn read_file_entries(db: &Database, start: u64, end: Option<u64>) -> Result<Vec<Entry>, Failure> {
    read_txn(db, |txn| {
        let table = txn.open_table(ENTRIES)?;
        let end = end.map_or(Bound::Unbounded, Bound::Excluded);
        let mut entries = Vec::new();
        for item in table.range::<u64>((Bound::Included(start), end))? {
            let (key, value) = item?;
            entries.push(decode_entry(key.value(), value.value())?);
        }
        Ok(entries)
    })
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.run(ErrorSubject::Logs, ErrorVerb::Read, read_log_state).await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes =
            encode(vote, "vote").map_err(|failure| failure.into_storage_error(ErrorSubject::Vote, ErrorVerb::Write))?;
        self.run(ErrorSubject::Vote, ErrorVerb::Write, move |db| put_meta(db, VOTE_KEY, Some(bytes))).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.run(ErrorSubject::Vote, ErrorVerb::Read, |db| get_meta(db, VOTE_KEY)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = committed
            .map(|log_id| encode(&log_id, "committed log id"))
            .transpose()
            .map_err(|failure| failure.into_storage_error(ErrorSubject::Store, ErrorVerb::Write))?;
        // Not fsynced: it reaches the disk with the next append (or vote, truncate, purge), whose
        // durable commit carries every earlier one. Losing the last few to a crash is harmless:
        // openraft treats the committed id as a hint, re-learns it from the leader (or, alone, by
        // committing again) and re-applies nothing the index already holds. Each commit of an
        // entry cost a second fsync before, as much as the append itself.
        self.run(ErrorSubject::Store, ErrorVerb::Write, move |db| {
            put_meta_with(db, Durability::None, COMMITTED_KEY, bytes)
        })
        .await?;
        let stored = committed.map(|log_id| log_id.index + 1).unwrap_or(0);
        self.committed_index.store(stored, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.run(ErrorSubject::Store, ErrorVerb::Read, |db| get_meta(db, COMMITTED_KEY)).await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The entries are flushed before this returns, so they are readable on return and the
        // callback can be completed right away.
        match self.append_entries(entries.into_iter().collect()).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(io::Error::other(error.to_string())));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(since = %log_id, "truncating raft log");
        let recent = Arc::clone(&self.recent);
        self.run(ErrorSubject::Logs, ErrorVerb::Delete, move |db| {
            // Out of memory first: while the file still holds the tail, a read sees the log as
            // it will be, never a tail the file no longer has.
            lock_window(&recent).truncate_from(log_id.index);
            write_txn(db, |txn| {
                // One transaction deletes the whole tail, so a crash cannot leave a hole.
                txn.open_table(ENTRIES)?.retain_in(log_id.index.., |_, _| false)?;
                Ok(())
            })
            .inspect_err(|_| lock_window(&recent).forget())
        })
        .await
        .inspect_err(|_| self.recent_entries().forget())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(upto = %log_id, "purging raft log");
        let bytes = encode(&log_id, "last purged log id")
            .map_err(|failure| failure.into_storage_error(ErrorSubject::Logs, ErrorVerb::Delete))?;
        let recent = Arc::clone(&self.recent);
        self.run(ErrorSubject::Logs, ErrorVerb::Delete, move |db| {
            let released = lock_window(&recent).release_through(log_id.index);
            drop(released);
            write_txn(db, |txn| {
                // The purge mark and the deletion commit together: after a crash either both
                // happened or neither did, and `get_log_state` stays consistent.
                txn.open_table(META)?.insert(LAST_PURGED_KEY, bytes.as_slice())?;
                txn.open_table(ENTRIES)?.retain_in(..=log_id.index, |_, _| false)?;
                Ok(())
            })
            .inspect_err(|_| lock_window(&recent).forget())
        })
        .await
        .inspect_err(|_| self.recent_entries().forget())
    }
}

/// The window's lock. Only bookkeeping happens under it, never I/O or an await; should a panic
/// have poisoned it, the window is emptied and its end forgotten, which every read tolerates.
fn lock_window(recent: &std::sync::Mutex<RecentEntries>) -> std::sync::MutexGuard<'_, RecentEntries> {
    recent.lock().unwrap_or_else(|poisoned| {
        let mut window = poisoned.into_inner();
        window.forget();
        window
    })
}

fn create_tables(db: &Database) -> Result<(), Box<redb::Error>> {
    fn boxed(error: impl Into<redb::Error>) -> Box<redb::Error> {
        Box::new(error.into())
    }
    let mut txn = db.begin_write().map_err(boxed)?;
    txn.set_durability(Durability::Immediate);
    txn.open_table(ENTRIES).map_err(boxed)?;
    txn.open_table(META).map_err(boxed)?;
    txn.commit().map_err(boxed)
}

/// Runs `work` in a write transaction committed with immediate durability (fsync on commit).
/// When `work` fails the transaction is dropped, which aborts it.
fn write_txn<T>(db: &Database, work: impl FnOnce(&WriteTransaction) -> Result<T, Failure>) -> Result<T, Failure> {
    // Immediate is redb's default today; set it anyway because correctness depends on it.
    write_txn_with(db, Durability::Immediate, work)
}

fn write_txn_with<T>(
    db: &Database,
    durability: Durability,
    work: impl FnOnce(&WriteTransaction) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability);
    let value = work(&txn)?;
    txn.commit()?;
    Ok(value)
}

fn read_txn<T>(db: &Database, work: impl FnOnce(&ReadTransaction) -> Result<T, Failure>) -> Result<T, Failure> {
    let txn = db.begin_read()?;
    work(&txn)
}

/// Last purged and last log id, read in one transaction so the two are consistent.
fn read_log_state(db: &Database) -> Result<LogState<TypeConfig>, Failure> {
    read_txn(db, |txn| {
        let meta = txn.open_table(META)?;
        let last_purged_log_id: Option<LogId> = match meta.get(LAST_PURGED_KEY)? {
            Some(value) => Some(decode(value.value(), "last purged log id")?),
            None => None,
        };
        let entries = txn.open_table(ENTRIES)?;
        let last_entry_log_id = match entries.last()? {
            Some((key, value)) => Some(decode_log_id(key.value(), value.value())?),
            None => None,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last_entry_log_id.or(last_purged_log_id) })
    })
}

fn get_meta<T: DeserializeOwned>(db: &Database, key: &'static str) -> Result<Option<T>, Failure> {
    read_txn(db, |txn| {
        let meta = txn.open_table(META)?;
        let value = meta.get(key)?;
        value.map(|value| decode(value.value(), key)).transpose()
    })
}

/// Stores `bytes` under `key` durably, or removes `key` when `bytes` is `None`.
fn put_meta(db: &Database, key: &'static str, bytes: Option<Vec<u8>>) -> Result<(), Failure> {
    put_meta_with(db, Durability::Immediate, key, bytes)
}

fn put_meta_with(
    db: &Database,
    durability: Durability,
    key: &'static str,
    bytes: Option<Vec<u8>>,
) -> Result<(), Failure> {
    write_txn_with(db, durability, |txn| {
        let mut meta = txn.open_table(META)?;
        match bytes {
            Some(bytes) => meta.insert(key, bytes.as_slice())?,
            None => meta.remove(key)?,
        };
        Ok(())
    })
}

/// Format of every value this file stores, written as its first byte. A build that meets a
/// byte it does not know refuses the value by name rather than misreading it. Bump it with any
/// change to the encoding of entries (`IndexBatch`, `IndexOperation`, openraft's types) or of
/// the meta values, and keep a decoder for the old one.
///
/// - 1: the first format.
/// - 2: `IndexBatch` ends with its request id. A format-1 `Normal` entry reads as format 2 with
///   `None` appended; every other value is unchanged.
/// - 3: `IndexBatch` ends with its key change (API keys). A format-2 `Normal` entry reads as
///   format 3 with `None` appended (a format-1 one with two); every other value is unchanged.
/// - 4: `IndexBatch` ends with its grouped requests (group commit). A format-3 `Normal` entry
///   reads as format 4 with an empty list appended (postcard writes an empty list as one zero
///   byte, like `None`); every other value is unchanged.
/// - 5: `IndexBatch` ends with the leader's stamp (`proposed_at_ms`, the clock of the request
///   table). A format-4 `Normal` entry reads as format 5 with 0 appended (postcard writes 0 as
///   one zero byte); every other value is unchanged.
pub const LOG_FORMAT_VERSION: u8 = 5;

/// Format 1, still read.
const FORMAT_WITHOUT_REQUEST_IDS: u8 = 1;
/// Format 2, still read.
const FORMAT_WITHOUT_KEYS: u8 = 2;
/// Format 3, still read.
const FORMAT_WITHOUT_GROUPS: u8 = 3;
/// Format 4, still read.
const FORMAT_WITHOUT_STAMPS: u8 = 4;

/// The zero bytes (`None`, empty list, 0) a `Normal` entry of `format` lacks at its end,
/// compared with today's format.
fn missing_trailing_fields(format: u8) -> usize {
    match format {
        FORMAT_WITHOUT_REQUEST_IDS => 4,
        FORMAT_WITHOUT_KEYS => 3,
        FORMAT_WITHOUT_GROUPS => 2,
        FORMAT_WITHOUT_STAMPS => 1,
        _ => 0,
    }
}

/// postcard's variant index of `EntryPayload::Normal` (after `Blank`).
const NORMAL_PAYLOAD_VARIANT: u32 = 1;

/// Encodes after the format byte, in one buffer reserved at the value's measured size (a bulk
/// entry of 300 KB grown while written was copied a dozen times onto fresh pages).
fn versioned<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let mut bytes = Vec::with_capacity(1 + postcard::experimental::serialized_size(value)?);
    bytes.push(LOG_FORMAT_VERSION);
    postcard::to_extend(value, bytes)
}

/// The format byte and the bytes after it, or `UnknownFormat`.
fn split_format<'a>(bytes: &'a [u8], what: &dyn Fn() -> String) -> Result<(u8, &'a [u8]), Failure> {
    match bytes.split_first() {
        Some((
            &format @ (LOG_FORMAT_VERSION
            | FORMAT_WITHOUT_STAMPS
            | FORMAT_WITHOUT_GROUPS
            | FORMAT_WITHOUT_KEYS
            | FORMAT_WITHOUT_REQUEST_IDS),
            rest,
        )) => Ok((format, rest)),
        Some((&found, _)) => Err(Failure::UnknownFormat { what: what(), found }),
        None => Err(Failure::UnknownFormat { what: what(), found: 0 }),
    }
}

/// The bytes after the format byte of a value whose encoding both formats share.
fn unversioned<'a>(bytes: &'a [u8], what: &dyn Fn() -> String) -> Result<&'a [u8], Failure> {
    split_format(bytes, what).map(|(_, rest)| rest)
}

fn encode<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>, Failure> {
    versioned(value).map_err(|error| Failure::Encode { what: what.to_string(), error })
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Failure> {
    let body = unversioned(bytes, &|| what.to_string())?;
    postcard::from_bytes(body).map_err(|error| Failure::Decode { what: what.to_string(), error })
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, Failure> {
    // A tuple rather than the `Entry` itself: the byte layout is the same, but spelling it out
    // here makes "the log id comes first" a property of this file, not of openraft's field order.
    versioned(&(&entry.log_id, &entry.payload))
        .map_err(|error| Failure::Encode { what: format!("log entry {}", entry.log_id), error })
}

fn decode_entry(key: u64, bytes: &[u8]) -> Result<Entry, Failure> {
    let what = || format!("log entry at index {key}");
    let (format, body) = split_format(bytes, &what)?;
    let decode_error = |error| Failure::Decode { what: what(), error };
    let upgraded;
    let missing = missing_trailing_fields(format);
    let body = if missing > 0 && is_normal_payload(body) {
        // The batch is the last thing in the entry: append the `None`s of the fields it lacks.
        let mut completed = body.to_vec();
        completed.extend(std::iter::repeat_n(0, missing));
        upgraded = completed;
        upgraded.as_slice()
    } else {
        body
    };
    let (log_id, payload): (LogId, EntryPayload<TypeConfig>) = postcard::from_bytes(body).map_err(decode_error)?;
    check_index(key, log_id)?;
    Ok(Entry { log_id, payload })
}

/// Whether the entry bytes (after the format byte) hold a `Normal` payload.
fn is_normal_payload(body: &[u8]) -> bool {
    let Ok((_, rest)) = postcard::take_from_bytes::<LogId>(body) else {
        return false;
    };
    matches!(postcard::take_from_bytes::<u32>(rest), Ok((NORMAL_PAYLOAD_VARIANT, _)))
}

/// Decodes only the log id at the front of an entry, skipping its (possibly large) payload.
fn decode_log_id(key: u64, bytes: &[u8]) -> Result<LogId, Failure> {
    let body = unversioned(bytes, &|| format!("log entry at index {key}"))?;
    let (log_id, _payload) = postcard::take_from_bytes::<LogId>(body)
        .map_err(|error| Failure::Decode { what: format!("log entry at index {key}"), error })?;
    check_index(key, log_id)
}

fn check_index(key: u64, log_id: LogId) -> Result<LogId, Failure> {
    if log_id.index == key {
        Ok(log_id)
    } else {
        Err(Failure::Misplaced { key, found: log_id })
    }
}

/// Converts any range of indexes into `[start, end)` (`end == None`: unbounded), or `None` when
/// the range is empty. Normalizing here keeps odd ranges (reversed, or ending past `u64::MAX`)
/// away from redb.
fn index_bounds(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&end) => end.checked_add(1),
        Bound::Excluded(&end) => Some(end),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if end <= start => None,
        _ => Some((start, end)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, Membership};

    use crate::raft::types::MemberNode;

    use super::*;
    use crate::index::IndexOperation;
    use crate::raft::types::IndexBatch;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn normal(term: u64, index: u64) -> Entry {
        let batch = IndexBatch {
            operations: vec![
                IndexOperation::Put {
                    id: format!("doc-{index}"),
                    document_json: format!(r#"{{"_id":"doc-{index}"}}"#),
                },
                IndexOperation::Delete { id: "gone".to_string() },
                IndexOperation::Commit,
            ],
            request_id: None,
            keys: None,
            grouped: Vec::new(),
            proposed_at_ms: 0,
        };
        Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(Arc::new(batch)) }
    }

    fn membership(term: u64, index: u64) -> Entry {
        let nodes: BTreeMap<NodeId, MemberNode> =
            [(1, MemberNode::new("127.0.0.1:7001", 1)), (2, MemberNode::new("127.0.0.1:7002", 2))]
                .into_iter()
                .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], nodes);
        Entry { log_id: log_id(term, index), payload: EntryPayload::Membership(membership) }
    }

    fn blank(term: u64, index: u64) -> Entry {
        Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
    }

    fn open(dir: &tempfile::TempDir) -> LogStore {
        LogStore::open(&dir.path().join("raft").join("log.redb")).expect("open log store")
    }

    fn ids(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|entry| entry.log_id.index).collect()
    }

    #[test]
    fn postcard_layout_starts_with_the_log_id() {
        // `decode_log_id` relies on it, and the layout equals postcard's encoding of `Entry`.
        for entry in [normal(3, 7), membership(2, 5), blank(1, 1)] {
            let bytes = encode_entry(&entry).unwrap();
            assert_eq!(bytes[0], LOG_FORMAT_VERSION);
            assert_eq!(&bytes[1..], postcard::to_stdvec(&entry).unwrap());
            assert_eq!(decode_log_id(entry.log_id.index, &bytes).unwrap(), entry.log_id);
            let decoded = decode_entry(entry.log_id.index, &bytes).unwrap();
            assert_eq!(decoded.log_id, entry.log_id);
            assert!(decoded.payload == entry.payload);
        }
    }

    /// Format 5; term 1, leader 1, index 1; `Blank`.
    const GOLDEN_BLANK: [u8; 5] = [5, 1, 1, 1, 0];
    /// Format 5; term 3, leader 1, index 7; `Normal`; three operations: `Put` ("doc-7",
    /// `{"_id":"doc-7"}`), `Delete` ("gone"), `Commit`; no request id; no key change; no
    /// grouped requests; not stamped.
    const GOLDEN_NORMAL: [u8; 40] = [
        5, 3, 1, 7, 1, 3, 0, 5, 100, 111, 99, 45, 55, 15, 123, 34, 95, 105, 100, 34, 58, 34, 100, 111, 99, 45, 55, 34,
        125, 1, 4, 103, 111, 110, 101, 2, 0, 0, 0, 0,
    ];
    /// The same entry as format 4 wrote it: no stamp at the end.
    const GOLDEN_NORMAL_FORMAT_4: [u8; 39] = [
        4, 3, 1, 7, 1, 3, 0, 5, 100, 111, 99, 45, 55, 15, 123, 34, 95, 105, 100, 34, 58, 34, 100, 111, 99, 45, 55, 34,
        125, 1, 4, 103, 111, 110, 101, 2, 0, 0, 0,
    ];
    /// The same entry as format 3 wrote it: no grouped requests at the end.
    const GOLDEN_NORMAL_FORMAT_3: [u8; 38] = [
        3, 3, 1, 7, 1, 3, 0, 5, 100, 111, 99, 45, 55, 15, 123, 34, 95, 105, 100, 34, 58, 34, 100, 111, 99, 45, 55, 34,
        125, 1, 4, 103, 111, 110, 101, 2, 0, 0,
    ];
    /// The same entry as format 2 wrote it: no key change at the end.
    const GOLDEN_NORMAL_FORMAT_2: [u8; 37] = [
        2, 3, 1, 7, 1, 3, 0, 5, 100, 111, 99, 45, 55, 15, 123, 34, 95, 105, 100, 34, 58, 34, 100, 111, 99, 45, 55, 34,
        125, 1, 4, 103, 111, 110, 101, 2, 0,
    ];
    /// The same entry as format 1 wrote it: no request id at the end.
    const GOLDEN_NORMAL_FORMAT_1: [u8; 36] = [
        1, 3, 1, 7, 1, 3, 0, 5, 100, 111, 99, 45, 55, 15, 123, 34, 95, 105, 100, 34, 58, 34, 100, 111, 99, 45, 55, 34,
        125, 1, 4, 103, 111, 110, 101, 2,
    ];

    /// Today's bytes, pinned: a change of the entry encoding must bump `LOG_FORMAT_VERSION` (and
    /// keep a decoder for the formats before), or old logs stop decoding.
    #[test]
    fn golden_entry_bytes() {
        let cases: [(Entry, &[u8]); 2] = [(blank(1, 1), &GOLDEN_BLANK), (normal(3, 7), &GOLDEN_NORMAL)];
        for (entry, golden) in cases {
            assert_eq!(encode_entry(&entry).unwrap(), golden, "entry {}", entry.log_id);
            assert_eq!(decode_entry(entry.log_id.index, golden).unwrap().log_id, entry.log_id);
        }
        // Formats 1 to 4 still read, as the same entry.
        assert!(decode_entry(7, &GOLDEN_NORMAL_FORMAT_4).unwrap().payload == normal(3, 7).payload);
        assert!(decode_entry(1, &[4, 1, 1, 1, 0]).unwrap().payload == EntryPayload::Blank);
        assert!(decode_entry(7, &GOLDEN_NORMAL_FORMAT_1).unwrap().payload == normal(3, 7).payload);
        assert!(decode_entry(7, &GOLDEN_NORMAL_FORMAT_3).unwrap().payload == normal(3, 7).payload);
        assert!(decode_entry(1, &[3, 1, 1, 1, 0]).unwrap().payload == EntryPayload::Blank);
        assert!(decode_entry(7, &GOLDEN_NORMAL_FORMAT_2).unwrap().payload == normal(3, 7).payload);
        assert!(decode_entry(1, &[1, 1, 1, 1, 0]).unwrap().payload == EntryPayload::Blank);
        assert!(decode_entry(1, &[2, 1, 1, 1, 0]).unwrap().payload == EntryPayload::Blank);
        // With a request id, it is the last thing in the entry.
        let mut with_id = normal(3, 7);
        if let EntryPayload::Normal(batch) = &mut with_id.payload {
            Arc::make_mut(batch).request_id = Some(crate::raft::types::RequestId(5));
        }
        let bytes = encode_entry(&with_id).unwrap();
        assert_eq!(&bytes[..36], &GOLDEN_NORMAL[..36]);
        assert_eq!(&bytes[36..], &[1, 5, 0, 0, 0]);
        // Grouped requests come after it.
        if let EntryPayload::Normal(batch) = &mut with_id.payload {
            Arc::make_mut(batch).grouped = vec![crate::raft::types::GroupedRequest {
                operations: vec![IndexOperation::Delete { id: "x".to_string() }],
                request_id: crate::raft::types::RequestId(6),
            }];
        }
        // And the leader's stamp after them (postcard varint of 1,700,000,000,000 ms).
        if let EntryPayload::Normal(batch) = &mut with_id.payload {
            Arc::make_mut(batch).proposed_at_ms = 1_700_000_000_000;
        }
        let bytes = encode_entry(&with_id).unwrap();
        assert_eq!(&bytes[36..], &[1, 5, 0, 1, 1, 1, 1, b'x', 6, 128, 208, 149, 255, 188, 49]);
        assert!(decode_entry(7, &bytes).unwrap().payload == with_id.payload);
        let error = decode_entry(1, &[9, 1, 1, 1, 0]).unwrap_err().to_string();
        assert!(error.contains("log format 9") && error.contains("format 5"), "{error}");
    }

    /// A log written before formats existed (no format key, no format bytes) opens, with its
    /// entries and vote intact.
    #[tokio::test]
    async fn unversioned_logs_are_brought_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        {
            let db = Database::create(&path).unwrap();
            create_tables(&db).unwrap();
            write_txn(&db, |txn| {
                let mut entries = txn.open_table(ENTRIES)?;
                for index in 1..=3 {
                    // As bayard wrote them then: without the request id and key change at the end.
                    let mut bytes = postcard::to_stdvec(&normal(1, index)).unwrap();
                    bytes.truncate(bytes.len() - 2);
                    entries.insert(index, bytes.as_slice())?;
                }
                let vote = postcard::to_stdvec(&Vote::new_committed(1, 1)).unwrap();
                txn.open_table(META)?.insert(VOTE_KEY, vote.as_slice())?;
                Ok(())
            })
            .unwrap();
        }
        let mut store = LogStore::open(&path).unwrap();
        assert_eq!(ids(&store.try_get_log_entries(..).await.unwrap()), vec![1, 2, 3]);
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new_committed(1, 1)));
        drop(store);
        // Opening again changes nothing.
        let mut store = LogStore::open(&path).unwrap();
        assert_eq!(ids(&store.try_get_log_entries(..).await.unwrap()), vec![1, 2, 3]);
        // A format from the future is refused by name.
        let db = store.db.clone();
        drop(store);
        write_txn(&db, |txn| {
            txn.open_table(META)?.insert(FORMAT_KEY, [9_u8].as_slice())?;
            Ok(())
        })
        .unwrap();
        drop(db);
        let error = match LogStore::open(&path) {
            Ok(_) => panic!("a log of an unknown format was opened"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("log format 9"), "{error}");
    }

    #[test]
    fn index_bounds_normalizes() {
        assert_eq!(index_bounds(&(3..7)), Some((3, Some(7))));
        assert_eq!(index_bounds(&(3..=7)), Some((3, Some(8))));
        assert_eq!(index_bounds(&(3..)), Some((3, None)));
        assert_eq!(index_bounds(&..), Some((0, None)));
        assert_eq!(index_bounds(&(5..5)), None);
        assert_eq!(index_bounds(&(Bound::Excluded(4), Bound::Excluded(5))), None);
        assert_eq!(index_bounds(&(0..=u64::MAX)), Some((0, None)));
        assert_eq!(index_bounds(&(Bound::Excluded(u64::MAX), Bound::Unbounded)), None);
    }

    #[tokio::test]
    async fn append_read_truncate_purge() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        assert!(store.is_empty().await.unwrap());
        assert_eq!(store.last_log_index().await.unwrap(), None);
        assert_eq!(store.get_log_state().await.unwrap(), LogState::default());

        store.blocking_append([blank(1, 0), membership(1, 1)]).await.unwrap();
        store.blocking_append((2..=9).map(|index| normal(1, index))).await.unwrap();
        assert!(!store.is_empty().await.unwrap());

        let all = store.try_get_log_entries(..).await.unwrap();
        assert_eq!(ids(&all), (0..=9).collect::<Vec<_>>());
        assert!(all[4].payload == normal(1, 4).payload);
        assert!(all[1].payload == membership(1, 1).payload);
        assert_eq!(ids(&store.try_get_log_entries(3..6).await.unwrap()), vec![3, 4, 5]);
        assert_eq!(ids(&store.try_get_log_entries(8..=20).await.unwrap()), vec![8, 9]);
        assert!(store.try_get_log_entries(20..30).await.unwrap().is_empty());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = store.try_get_log_entries(6..3).await.unwrap();
        assert!(reversed.is_empty());

        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, None);
        assert_eq!(state.last_log_id, Some(log_id(1, 9)));

        // A conflicting tail from a new leader replaces the old one.
        store.truncate(log_id(1, 7)).await.unwrap();
        assert_eq!(store.last_log_index().await.unwrap(), Some(6));
        store.blocking_append([normal(2, 7)]).await.unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2, 7)));

        // The reader shares the database: it sees writes made through the store afterwards.
        let mut reader = store.get_log_reader().await;
        store.purge(log_id(1, 4)).await.unwrap();
        assert_eq!(ids(&reader.try_get_log_entries(..).await.unwrap()), vec![5, 6, 7]);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(2, 7)));

        // Purging everything leaves the purge mark as the last log id.
        store.purge(log_id(2, 7)).await.unwrap();
        assert!(store.try_get_log_entries(..).await.unwrap().is_empty());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(2, 7)));
        assert_eq!(state.last_log_id, Some(log_id(2, 7)));
        assert_eq!(store.last_log_index().await.unwrap(), Some(7));
        assert!(!store.is_empty().await.unwrap(), "a purged log is not a fresh log");
    }

    #[tokio::test]
    async fn everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new_committed(3, 2);
        {
            let mut store = open(&dir);
            store.save_vote(&Vote::new(2, 1)).await.unwrap();
            store.save_vote(&vote).await.unwrap();
            store.blocking_append((1..=5).map(|index| normal(3, index))).await.unwrap();
            store.save_committed(Some(log_id(3, 4))).await.unwrap();
            store.purge(log_id(3, 2)).await.unwrap();
        }
        {
            let mut store = open(&dir);
            assert_eq!(store.read_vote().await.unwrap(), Some(vote));
            assert_eq!(store.read_committed().await.unwrap(), Some(log_id(3, 4)));
            let state = store.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(3, 2)));
            assert_eq!(state.last_log_id, Some(log_id(3, 5)));
            assert_eq!(ids(&store.try_get_log_entries(..).await.unwrap()), vec![3, 4, 5]);

            store.save_committed(None).await.unwrap();
        }
        let mut store = open(&dir);
        assert_eq!(store.read_committed().await.unwrap(), None);
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
    }

    #[tokio::test]
    async fn vote_alone_makes_the_log_non_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        assert_eq!(store.read_vote().await.unwrap(), None);
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(!store.is_empty().await.unwrap());
    }

    #[tokio::test]
    async fn corrupt_values_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.blocking_append((1..=3).map(|index| normal(1, index))).await.unwrap();
        // What a store appended it answers from memory; the file is read after a restart.
        store.recent_entries().forget();

        // Garbage bytes under index 2, written behind the store's back.
        write_txn(&store.db, |txn| {
            txn.open_table(ENTRIES)?.insert(2, [LOG_FORMAT_VERSION, 0xff, 0xff, 0xff, 0xff, 0xff].as_slice())?;
            Ok(())
        })
        .unwrap();
        let error = store.try_get_log_entries(..).await.unwrap_err();
        assert!(error.to_string().contains("corrupt log entry at index 2"), "{error}");
        // Entries around it are still readable.
        assert_eq!(ids(&store.try_get_log_entries(3..).await.unwrap()), vec![3]);

        // A well-formed entry stored under the wrong index is caught too.
        let misplaced = encode_entry(&normal(1, 9)).unwrap();
        write_txn(&store.db, |txn| {
            txn.open_table(ENTRIES)?.insert(3, misplaced.as_slice())?;
            Ok(())
        })
        .unwrap();
        let error = store.get_log_state().await.unwrap_err();
        assert!(error.to_string().contains("corrupt log entry at index 3"), "{error}");

        // Same for the metadata.
        write_txn(&store.db, |txn| {
            txn.open_table(META)?.insert(VOTE_KEY, [LOG_FORMAT_VERSION, 0xff].as_slice())?;
            Ok(())
        })
        .unwrap();
        let error = store.read_vote().await.unwrap_err();
        assert!(error.to_string().contains("corrupt vote"), "{error}");
    }

    #[test]
    fn open_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the directory should be.
        let blocker = dir.path().join("raft");
        std::fs::write(&blocker, b"not a directory").unwrap();
        let path = blocker.join("log.redb");
        let error = LogStore::open(&path).unwrap_err();
        assert!(error.to_string().starts_with(&format!("cannot open raft log at {}", path.display())), "{error}");

        // A file that is not a redb database.
        let junk = dir.path().join("junk.redb");
        std::fs::write(&junk, vec![0x5a_u8; 8192]).unwrap();
        let error = LogStore::open(&junk).unwrap_err();
        assert!(error.to_string().starts_with(&format!("cannot open raft log at {}", junk.display())), "{error}");
    }

    /// One step of a log's history, as openraft drives it (appends at the end, truncations of a
    /// conflicting tail, purges after a snapshot), plus a restart.
    #[derive(Debug, Clone)]
    enum Step {
        /// `count` entries after the last, of the current term or a new one, each with a
        /// document of `size` bytes.
        Append {
            count: u64,
            new_term: bool,
            size: usize,
        },
        /// Truncate the last `back` entries, then append `count` of a new term (a new leader's).
        Replace {
            back: u64,
            count: u64,
        },
        Purge {
            ahead: u64,
        },
        /// A snapshot installed: everything through `first + ahead` purged, past the log's end
        /// when `ahead` reaches it, and the log continues after the snapshot.
        InstallSnapshot {
            ahead: u64,
        },
        /// Entries through `first + ahead` given back from memory (every reader has them); the
        /// file keeps them.
        Release {
            ahead: u64,
        },
        Reopen,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1..6_u64, any::<bool>(), 0..3000_usize)
                .prop_map(|(count, new_term, size)| Step::Append { count, new_term, size }),
            2 => (0..8_u64, 0..4_u64).prop_map(|(back, count)| Step::Replace { back, count }),
            1 => (0..8_u64).prop_map(|ahead| Step::Purge { ahead }),
            1 => (0..12_u64).prop_map(|ahead| Step::InstallSnapshot { ahead }),
            1 => (0..12_u64).prop_map(|ahead| Step::Release { ahead }),
            1 => Just(Step::Reopen),
        ]
    }

    fn sized(term: u64, index: u64, size: usize) -> Entry {
        let mut entry = normal(term, index);
        if let EntryPayload::Normal(batch) = &mut entry.payload {
            Arc::make_mut(batch).operations.push(IndexOperation::Delete { id: "x".repeat(size) });
        }
        entry
    }

    /// Whatever the history, a read answers what the file holds: from memory or not, every
    /// range, entry for entry (the window is 8 KiB here, so entries also fall out of it).
    #[test]
    fn reads_from_memory_are_what_the_file_holds() {
        use proptest::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let config = ProptestConfig { cases: 64, ..ProptestConfig::default() };
        let (answered_from_memory, reads) = (AtomicUsize::new(0), AtomicUsize::new(0));
        proptest!(config, |(steps in proptest::collection::vec(step(), 1..40))| {
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let reopen = |store: Option<LogStore>| {
                    drop(store);
                    let store = open(&dir);
                    let end = store.recent_entries().end();
                    *store.recent_entries() = RecentEntries::new(8 * 1024, end);
                    store
                };
                let mut store = reopen(None);
                let (mut term, mut first, mut next) = (1_u64, 0_u64, 0_u64);
                for step in steps {
                    match step {
                        Step::Append { count, new_term, size } => {
                            term += u64::from(new_term);
                            store.blocking_append((next..next + count).map(|index| sized(term, index, size))).await.unwrap();
                            next += count;
                        }
                        Step::Replace { back, count } => {
                            let from = next.saturating_sub(back).max(first);
                            if from < next {
                                store.truncate(log_id(term, from)).await.unwrap();
                                next = from;
                            }
                            term += 1;
                            store.blocking_append((next..next + count).map(|index| sized(term, index, 10))).await.unwrap();
                            next += count;
                        }
                        Step::Purge { ahead } => {
                            let through = (first + ahead).min(next.saturating_sub(1));
                            if next > first {
                                let entries = store.try_get_log_entries(through..=through).await.unwrap();
                                store.purge(entries[0].log_id).await.unwrap();
                                first = through + 1;
                            }
                        }
                        Step::InstallSnapshot { ahead } => {
                            let through = first + ahead;
                            store.purge(log_id(term, through)).await.unwrap();
                            first = through + 1;
                            next = next.max(first);
                        }
                        Step::Release { ahead } => store.release_entries_through(first + ahead),
                        Step::Reopen => store = reopen(Some(store)),
                    }
                    let db = Arc::clone(&store.db);
                    for start in first.saturating_sub(1)..=next + 1 {
                        for end in [None, Some(start + 1), Some(start + 3), Some(next + 2)] {
                            reads.fetch_add(1, Ordering::Relaxed);
                            if store.recent_entries().read(start, end).is_some() {
                                answered_from_memory.fetch_add(1, Ordering::Relaxed);
                            }
                            let read = store.try_get_log_entries((Bound::Included(start), end.map_or(Bound::Unbounded, Bound::Excluded))).await.unwrap();
                            let file = read_file_entries(&db, start, end).unwrap();
                            prop_assert_eq!(ids(&read), ids(&file), "{}..{:?}", start, end);
                            for (read, file) in read.iter().zip(&file) {
                                prop_assert!(read.log_id == file.log_id && read.payload == file.payload, "entry {}", read.log_id);
                            }
                        }
                    }
                }
                Ok(())
            })?;
        });
        // Not a test of the file alone: most reads were answered from memory.
        let (memory, all) = (answered_from_memory.load(Ordering::Relaxed), reads.load(Ordering::Relaxed));
        eprintln!("{memory} of {all} reads answered from memory");
        assert!(memory * 8 > all, "{memory} of {all} reads answered from memory");
    }

    #[tokio::test]
    async fn second_open_of_the_same_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let _store = open(&dir);
        let error = LogStore::open(&dir.path().join("raft").join("log.redb")).unwrap_err();
        assert!(matches!(error, LogStoreError::Open { .. }), "{error}");
    }
}
