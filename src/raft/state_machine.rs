//! The Raft state machine: applies log entries to the index, builds and installs snapshots.
//!
//! The index is the state machine's durable state. Every tantivy commit carries an
//! [`IndexCommitMarker`]: the log id of the last entry the commit includes and the membership at
//! that point. After a crash, the node reports that log id as "applied" and openraft replays the
//! log from there; replaying puts and deletes on top of the last commit yields exactly the state
//! the other replicas have, because commits (explicit or automatic) are log entries themselves and
//! happen at the same log positions on every node.
//!
//! A snapshot is the committed index (never uncommitted writes): the files of the last commit and
//! a `meta.json` listing them, at the commit's log id. Entries after it stay in the log.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::dedup::{AppliedRequests, RecordedOutcome};
use super::snapshot;
use super::types::{BatchOutcome, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::access::{ApiKeyTable, KeyRing};
use crate::index::{AnalyzerConfig, IndexError, IndexOperation, SearchIndex, SharedIndex};

/// A log id for a log line: `T3-N1-120` (term, leader, index), or `none`.
pub fn describe_log_id(log_id: Option<LogId>) -> String {
    log_id.map_or_else(|| "none".to_string(), |log_id| log_id.to_string())
}

/// What every tantivy commit records, as its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexCommitMarker {
    /// The last log entry the commit includes.
    pub log_id: Option<LogId>,
    /// The membership as of that entry.
    pub membership: StoredMembership,
    /// The most recent client requests applied up to that entry (see `raft::dedup`). Absent in
    /// markers of before request ids: none were known then.
    #[serde(default)]
    pub requests: AppliedRequests,
    /// The API keys as of that entry (`access`). Absent in markers of before keys.
    #[serde(default)]
    pub keys: ApiKeyTable,
}

/// The same fields as [`IndexCommitMarker`], borrowed: a commit writes its marker without
/// copying the request table.
#[derive(Serialize)]
struct MarkerView<'a> {
    log_id: Option<LogId>,
    membership: &'a StoredMembership,
    requests: &'a AppliedRequests,
    keys: &'a ApiKeyTable,
}

impl MarkerView<'_> {
    /// The marker as the commit's payload. An error here fails the apply: a commit with an
    /// empty or partial marker would not open again as this node's index.
    fn to_payload(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

impl IndexCommitMarker {
    /// The marker of the index's last commit; the default (nothing applied) for a new index.
    pub fn read(index: &SearchIndex) -> Result<IndexCommitMarker, IndexError> {
        let Some(payload) = index.last_commit_payload()? else {
            return Ok(IndexCommitMarker::default());
        };
        serde_json::from_str(&payload).map_err(|error| {
            IndexError::Internal(format!("the index's commit payload is not a bayard commit marker: {error}"))
        })
    }
}

/// Where the state machine keeps its files, inside the data directory.
#[derive(Debug, Clone)]
pub struct StateMachinePaths {
    /// The live index: `<data>/index`.
    pub index: PathBuf,
    /// A snapshot being installed: `<data>/index.incoming`.
    pub incoming: PathBuf,
    /// The index being replaced: `<data>/index.old`.
    pub replaced: PathBuf,
    /// Snapshot archives: `<data>/raft/snapshots`.
    pub snapshots: PathBuf,
}

impl StateMachinePaths {
    pub fn in_data_directory(data_directory: &Path) -> Self {
        StateMachinePaths {
            index: data_directory.join("index"),
            incoming: data_directory.join("index.incoming"),
            replaced: data_directory.join("index.old"),
            snapshots: data_directory.join("raft").join("snapshots"),
        }
    }
}

/// How long a snapshot install waits for a running merge to end before it gives up (the leader
/// sends the snapshot again).
const MERGE_WAIT_BEFORE_INSTALL: std::time::Duration = std::time::Duration::from_secs(120);

/// Marks an extracted snapshot as complete, so a crash between the directory renames is
/// recoverable.
const COMPLETE_MARKER: &str = ".bayard-complete";

/// Finishes or undoes a snapshot installation that a crash interrupted. Runs before the index is
/// opened.
pub fn recover_interrupted_install(paths: &StateMachinePaths) -> io::Result<()> {
    if !paths.index.exists() {
        if paths.incoming.join(COMPLETE_MARKER).exists() {
            tracing::warn!("finishing a snapshot installation interrupted by a crash");
            fs::rename(&paths.incoming, &paths.index)?;
        } else if paths.replaced.exists() {
            tracing::warn!("undoing a snapshot installation interrupted by a crash");
            fs::rename(&paths.replaced, &paths.index)?;
        }
    }
    for leftover in [&paths.incoming, &paths.replaced] {
        if leftover.exists() {
            fs::remove_dir_all(leftover)?;
        }
    }
    Ok(())
}

/// How to (re)open the index, for installs.
#[derive(Clone)]
pub struct IndexOpener {
    pub schema: tantivy::schema::Schema,
    pub analyzers: AnalyzerConfig,
    pub writer_memory_bytes: usize,
    /// Fields (and boosts) searched by query terms that name none; `None`: every text field.
    pub default_search_fields: Option<Vec<(String, f32)>>,
}

impl IndexOpener {
    pub fn open(&self, directory: &Path) -> Result<SearchIndex, IndexError> {
        let mut index =
            SearchIndex::open_or_create(directory, self.schema.clone(), &self.analyzers, self.writer_memory_bytes)?;
        if let Some(fields) = &self.default_search_fields {
            index.set_default_search_fields(fields)?;
        }
        Ok(index)
    }
}

#[derive(Debug, Clone, Default)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    requests: AppliedRequests,
    keys: ApiKeyTable,
}

struct Shared {
    index: SharedIndex,
    opener: IndexOpener,
    paths: StateMachinePaths,
    /// Held while entries are applied, snapshots installed or the committed state read, so
    /// each sees one consistent position.
    applied: Mutex<AppliedState>,
    /// The newest snapshot archive.
    current_snapshot: std::sync::Mutex<Option<(SnapshotMeta, PathBuf)>>,
    /// The file the snapshot being received is written to; it becomes the current archive once
    /// installed.
    receiving: std::sync::Mutex<Option<PathBuf>>,
    /// The API keys as applied, for the front doors.
    key_ring: Arc<KeyRing>,
}

/// The state machine handed to openraft; clones share everything.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

fn blocking_failure(error: tokio::task::JoinError) -> StorageError {
    StorageIOError::write_state_machine(&io::Error::other(error.to_string())).into()
}

impl StateMachineStore {
    /// Wraps an opened index whose last commit is where applying resumes.
    pub fn new(
        index: SharedIndex,
        opener: IndexOpener,
        paths: StateMachinePaths,
    ) -> Result<StateMachineStore, IndexError> {
        let marker = IndexCommitMarker::read(&index.current())?;
        fs::create_dir_all(&paths.snapshots).map_err(|source| IndexError::Io {
            context: format!("cannot create {}", paths.snapshots.display()),
            source,
        })?;
        let current_snapshot = snapshot::newest_archive(&paths.snapshots).map_err(|source| IndexError::Io {
            context: format!("cannot read snapshots in {}", paths.snapshots.display()),
            source,
        })?;
        tracing::info!(last_applied = %describe_log_id(marker.log_id), "state machine resumes from the index's last commit");
        let key_ring = Arc::new(KeyRing::default());
        key_ring.publish(marker.keys.clone());
        crate::telemetry::metrics::set_remembered_requests(marker.requests.len());
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                index,
                opener,
                paths,
                applied: Mutex::new(AppliedState {
                    last_applied: marker.log_id,
                    membership: marker.membership,
                    requests: marker.requests,
                    keys: marker.keys,
                }),
                current_snapshot: std::sync::Mutex::new(current_snapshot),
                receiving: std::sync::Mutex::new(None),
                key_ring,
            }),
        })
    }

    pub fn index(&self) -> &SharedIndex {
        &self.shared.index
    }

    /// The API keys as applied so far, replaced as entries change them.
    pub fn key_ring(&self) -> Arc<KeyRing> {
        self.shared.key_ring.clone()
    }

    /// The log id of the last applied entry.
    pub async fn last_applied(&self) -> Option<LogId> {
        self.shared.applied.lock().await.last_applied
    }

    fn current_snapshot(&self) -> Option<(SnapshotMeta, PathBuf)> {
        self.shared.current_snapshot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn set_current_snapshot(&self, meta: SnapshotMeta, path: PathBuf) {
        let previous = {
            let mut current = self.shared.current_snapshot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            current.replace((meta, path.clone()))
        };
        // An archive being streamed to a follower stays readable through its open handle.
        if let Some((_, previous_path)) = previous {
            if previous_path != path {
                let _ = fs::remove_file(previous_path);
            }
        }
    }

    async fn open_snapshot(meta: SnapshotMeta, path: &Path) -> Result<Snapshot<TypeConfig>, StorageError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &error)))?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

/// Applies entries on a blocking thread. A batch whose content the index refuses (which
/// validation before replication should have made impossible) is reported in its outcome and
/// skipped the same way on every replica; an I/O or tantivy failure stops the state machine, since
/// continuing would let this replica diverge.
fn apply_entries(
    index: &SearchIndex,
    mut state: AppliedState,
    entries: Vec<Entry>,
) -> Result<(AppliedState, Vec<BatchOutcome>, bool), Box<StorageError>> {
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut keys_changed = false;
    for entry in entries {
        let log_id = entry.log_id;
        if let EntryPayload::Normal(batch) = &entry.payload {
            // The request table's clock is the log's: the leader's stamp (see `raft::dedup`).
            state.requests.observe_entry(log_id.leader_id.term, batch.proposed_at_ms);
        }
        match entry.payload {
            EntryPayload::Blank => outcomes.push(BatchOutcome { applied_index: log_id.index, ..Default::default() }),
            EntryPayload::Membership(membership) => {
                state.membership = StoredMembership::new(Some(log_id), membership);
                outcomes.push(BatchOutcome { applied_index: log_id.index, ..Default::default() });
            }
            EntryPayload::Normal(batch) if batch.grouped.len() >= crate::raft::types::MAX_REQUESTS_PER_ENTRY => {
                // No leader of ours makes such an entry; refused whole, alike on every replica.
                tracing::error!(
                    log_index = log_id.index,
                    requests = batch.grouped.len() + 1,
                    "skipped an oversized group"
                );
                outcomes.push(BatchOutcome {
                    applied_index: log_id.index,
                    error: Some(format!(
                        "an entry may carry at most {} requests",
                        crate::raft::types::MAX_REQUESTS_PER_ENTRY
                    )),
                    ..Default::default()
                });
            }
            EntryPayload::Normal(batch) => {
                let grouped = !batch.grouped.is_empty();
                let head =
                    Request { operations: &batch.operations, request_id: batch.request_id, keys: batch.keys.as_ref() };
                let mut outcome = apply_request(index, &mut state, log_id, head, grouped, &mut keys_changed)?;
                for request in &batch.grouped {
                    let request =
                        Request { operations: &request.operations, request_id: Some(request.request_id), keys: None };
                    let grouped_outcome = apply_request(index, &mut state, log_id, request, true, &mut keys_changed)?;
                    outcome.grouped.push(grouped_outcome);
                }
                outcomes.push(outcome);
            }
        }
        state.last_applied = Some(log_id);
    }
    Ok((state, outcomes, keys_changed))
}

/// One client request of a log entry: the entry's own, or one grouped with it. Borrowed: the
/// entry's batch is shared with the log's newest entries.
struct Request<'a> {
    operations: &'a [IndexOperation],
    request_id: Option<crate::raft::types::RequestId>,
    keys: Option<&'a crate::access::KeyChange>,
}

/// Whether a request may share its log entry with others: puts and deletes only, no key change.
/// A commit (or rollback, merge) inside a group would record the entry's log id in its marker
/// while the requests after it are not yet applied, and a restart would then skip them.
pub fn groupable_operations(operations: &[IndexOperation]) -> bool {
    operations.iter().all(|operation| matches!(operation, IndexOperation::Put { .. } | IndexOperation::Delete { .. }))
}

/// Applies one request of the entry at `log_id`: at most once per request id, its key change
/// first, then its operations. In a group (`grouped`), a request that is not plain is refused,
/// alike on every replica (the leader never groups one).
fn apply_request(
    index: &SearchIndex,
    state: &mut AppliedState,
    log_id: LogId,
    request: Request<'_>,
    grouped: bool,
    keys_changed: &mut bool,
) -> Result<BatchOutcome, Box<StorageError>> {
    if let Some(first) = request.request_id.and_then(|id| state.requests.duplicate_outcome(id)) {
        // A retried request that was applied before: it changes nothing.
        tracing::info!(
            log_index = log_id.index,
            first_index = first.applied_index,
            "skipped a retried request applied before"
        );
        crate::telemetry::metrics::record_duplicate_request();
        return Ok(first);
    }
    let operations = request.operations.len() as u64;
    let recorded = |error: Option<String>| RecordedOutcome { applied_index: log_id.index, operations, error };
    if grouped && (request.keys.is_some() || !groupable_operations(request.operations)) {
        let message = "a request grouped with others may only put and delete documents".to_string();
        if let Some(request_id) = request.request_id {
            state.requests.record(request_id, recorded(Some(message.clone())));
        }
        return Ok(BatchOutcome {
            applied_index: log_id.index,
            operations,
            error: Some(message),
            ..Default::default()
        });
    }
    // Recorded before applying, so that a commit inside this request stores it too.
    if let Some(request_id) = request.request_id {
        state.requests.record(request_id, recorded(None));
    }
    // A key change is applied before the operations, for the same reason. A refused one
    // (unknown id, table full) is refused alike on every replica.
    let key_error = match request.keys {
        Some(change) => match state.keys.apply(change) {
            Ok(()) => {
                *keys_changed = true;
                None
            }
            Err(message) => Some(message),
        },
        None => None,
    };
    // The marker (with the request table) is serialized only for requests that commit.
    let commits = request.operations.iter().any(|operation| matches!(operation, IndexOperation::Commit));
    let payload = commits
        .then(|| {
            MarkerView {
                log_id: Some(log_id),
                membership: &state.membership,
                requests: &state.requests,
                keys: &state.keys,
            }
            .to_payload()
        })
        .transpose()
        .map_err(|error| Box::new(StorageIOError::apply(log_id, &error).into()))?;
    let _span = tracing::info_span!("bayard.apply", log_index = log_id.index, operations).entered();
    let started = std::time::Instant::now();
    let error = match index.apply(request.operations, payload.as_deref()) {
        Ok(outcome) => {
            if outcome.committed {
                crate::telemetry::metrics::record_index_commit(started.elapsed());
            }
            None
        }
        Err(IndexError::InvalidDocument(message) | IndexError::InvalidRequest(message)) => {
            tracing::error!(log_index = log_id.index, %message, "skipped a request the index refused");
            Some(message)
        }
        Err(error) => return Err(Box::new(StorageIOError::apply(log_id, &error).into())),
    };
    let error = error.or(key_error);
    if let (Some(request_id), Some(message)) = (request.request_id, &error) {
        state.requests.record(request_id, recorded(Some(message.clone())));
    }
    Ok(BatchOutcome { applied_index: log_id.index, operations, error, duplicate: false, grouped: Vec::new() })
}

/// Extracts a received archive into `directory` and checks it is the index the metadata says:
/// the archive's own metadata matches, and the extracted index opens with its last commit at the
/// snapshot's log id.
fn stage_snapshot(
    opener: &IndexOpener,
    archive: &mut fs::File,
    directory: &Path,
    meta: &SnapshotMeta,
) -> io::Result<IndexCommitMarker> {
    let archived_meta = snapshot::extract_archive(archive, directory)?;
    if archived_meta.last_log_id != meta.last_log_id || archived_meta.snapshot_id != meta.snapshot_id {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot archive does not match its metadata"));
    }
    let staged = opener.open(directory).map_err(|error| {
        io::Error::new(io::ErrorKind::InvalidData, format!("snapshot does not open as an index: {error}"))
    })?;
    let marker = IndexCommitMarker::read(&staged).map_err(io::Error::other)?;
    if marker.log_id != meta.last_log_id {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "snapshot index is committed at {:?}, not at the snapshot's log id {:?}",
                marker.log_id, meta.last_log_id
            ),
        ));
    }
    Ok(marker)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = self.shared.applied.lock().await;
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut state = self.shared.applied.lock().await;
        let index = self.shared.index.current();
        // Taken, not cloned (the request table is large); a failure here stops the state machine.
        let before = std::mem::take(&mut *state);
        let (after, outcomes, keys_changed) =
            tokio::task::spawn_blocking(move || apply_entries(&index, before, entries))
                .await
                .map_err(blocking_failure)?
                .map_err(|error| *error)?;
        if keys_changed {
            self.shared.key_ring.publish(after.keys.clone());
        }
        crate::telemetry::metrics::set_remembered_requests(after.requests.len());
        *state = after;
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.shared.paths.snapshots.join(format!("receiving-{:016x}.part", rand::random::<u64>()));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|error| StorageError::from(StorageIOError::write_snapshot(None, &error)))?;
        *self.shared.receiving.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let mut state = self.shared.applied.lock().await;
        let shared = self.shared.clone();
        let signature = meta.signature();
        let meta = meta.clone();
        let mut archive = snapshot.into_std().await;
        let received_path = self.shared.receiving.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let write_error =
            move |error: io::Error| StorageError::from(StorageIOError::write_snapshot(Some(signature.clone()), &error));
        let (installed_meta, archive_path, marker) =
            tokio::task::spawn_blocking(move || -> Result<(SnapshotMeta, PathBuf, IndexCommitMarker), io::Error> {
                let paths = &shared.paths;
                // The id names the archive file: it must be a plain name (the Raft door checks
                // it too; this is the last line before the file system).
                if !super::admission::valid_snapshot_id(&meta.snapshot_id) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("snapshot id {:?} is not a plain file name", meta.snapshot_id),
                    ));
                }
                let archive_path = snapshot::archive_path(&paths.snapshots, &meta.snapshot_id);
                let Some(received_path) = received_path else {
                    return Err(io::Error::other("installed a snapshot that was not received into a known file"));
                };
                if paths.incoming.exists() {
                    fs::remove_dir_all(&paths.incoming)?;
                }
                // Stage and verify completely before anything is swapped: extracted, fsynced,
                // opened as an index whose last commit is at the snapshot's log id. Any failure
                // leaves the current index as it was.
                let staged = stage_snapshot(&shared.opener, &mut archive, &paths.incoming, &meta);
                drop(archive);
                let marker = match staged {
                    Ok(marker) => marker,
                    Err(error) => {
                        let _ = fs::remove_dir_all(&paths.incoming);
                        return Err(error);
                    }
                };
                fs::write(paths.incoming.join(COMPLETE_MARKER), b"")?;
                // No merge of ours may still write into the directory being swapped out.
                if !shared.index.current().wait_for_merge(MERGE_WAIT_BEFORE_INSTALL) {
                    let _ = fs::remove_dir_all(&paths.incoming);
                    return Err(io::Error::other("a merge is still running; the snapshot is installed after it"));
                }
                // Swap the directories: after the second rename the new index is the one on disk,
                // and a crash in between is finished by `recover_interrupted_install`.
                if paths.replaced.exists() {
                    fs::remove_dir_all(&paths.replaced)?;
                }
                fs::rename(&paths.index, &paths.replaced)?;
                fs::rename(&paths.incoming, &paths.index)?;
                let _ = fs::remove_file(paths.index.join(COMPLETE_MARKER));
                if let Some(parent) = paths.index.parent() {
                    fs::File::open(parent)?.sync_all()?;
                }
                let index = shared.opener.open(&paths.index).map_err(io::Error::other)?;
                let replaced = shared.index.replace(index);
                drop(replaced);
                if let Err(error) = fs::remove_dir_all(&paths.replaced) {
                    tracing::warn!(%error, "could not remove the replaced index; it is removed at the next start");
                }
                // Keep the received archive as this node's current snapshot, once the index it
                // describes is the one in place (its path was checked above).
                fs::rename(&received_path, &archive_path)?;
                Ok((meta, archive_path, marker))
            })
            .await
            .map_err(blocking_failure)?
            .map_err(write_error.clone())?;
        crate::telemetry::metrics::set_remembered_requests(marker.requests.len());
        *state = AppliedState {
            last_applied: installed_meta.last_log_id,
            membership: installed_meta.last_membership.clone(),
            requests: marker.requests,
            keys: marker.keys.clone(),
        };
        self.shared.key_ring.publish(marker.keys);
        drop(state);
        tracing::info!(last_log_id = %describe_log_id(installed_meta.last_log_id), "installed a snapshot");
        self.set_current_snapshot(installed_meta, archive_path);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some((meta, path)) = self.current_snapshot() else {
            return Ok(None);
        };
        Ok(Some(Self::open_snapshot(meta, &path).await?))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state = self.shared.applied.lock().await;
        let index = self.shared.index.current();
        let committed = tokio::task::spawn_blocking(move || -> Result<_, IndexError> {
            let committed = index.committed_state()?;
            let marker = match &committed.payload {
                Some(payload) => serde_json::from_str::<IndexCommitMarker>(payload)
                    .map_err(|error| IndexError::Internal(format!("commit payload does not parse: {error}")))?,
                None => IndexCommitMarker::default(),
            };
            Ok((committed, marker, index))
        })
        .await
        .map_err(blocking_failure)?
        .map_err(|error| StorageError::from(StorageIOError::read_state_machine(&error)))?;
        drop(state);
        let (committed, marker, index) = committed;

        // Nothing committed since the current snapshot: it still describes the committed index.
        if let Some((meta, path)) = self.current_snapshot() {
            if meta.last_log_id == marker.log_id {
                return Self::open_snapshot(meta, &path).await;
            }
        }
        let snapshot_id = match marker.log_id {
            Some(log_id) => format!("{}-{}-{:08x}", log_id.leader_id.term, log_id.index, rand::random::<u32>()),
            None => format!("0-0-{:08x}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta { last_log_id: marker.log_id, last_membership: marker.membership.clone(), snapshot_id };
        let directory = self.shared.paths.snapshots.clone();
        let build_meta = meta.clone();
        let path = tokio::task::spawn_blocking(move || -> io::Result<PathBuf> {
            let final_path = snapshot::archive_path(&directory, &build_meta.snapshot_id);
            let temporary = final_path.with_extension("building");
            let bytes = snapshot::write_archive(&temporary, &build_meta, index.index_directory(), &committed)?;
            fs::rename(&temporary, &final_path)?;
            fs::File::open(&directory)?.sync_all()?;
            tracing::info!(last_log_id = %describe_log_id(build_meta.last_log_id), bytes, files = committed.files.len(), "built a snapshot");
            Ok(final_path)
        })
        .await
        .map_err(blocking_failure)?
        .map_err(|error| StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &error)))?;
        self.set_current_snapshot(meta.clone(), path.clone());
        Self::open_snapshot(meta, &path).await
    }
}
