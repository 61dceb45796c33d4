//! Runs openraft's own storage test suite against the redb log store.
//!
//! The suite also needs a state machine; the one here is a minimal in-memory one that only tracks
//! the last applied log id and membership (the suite never applies normal entries because it
//! cannot build a `D`). Its snapshots are real files, as bayard's `SnapshotData` is a file.

use std::io::SeekFrom;
use std::sync::{Arc, Mutex, PoisonError};

use bayard::raft::log_store::LogStore;
use bayard::raft::types::{BatchOutcome, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// What a snapshot of the test state machine contains.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

#[derive(Debug, Default)]
struct Inner {
    applied: Applied,
    snapshot_count: u64,
    /// The current snapshot, kept as bytes; each `get_current_snapshot` hands out a fresh file.
    current: Option<(SnapshotMeta, Vec<u8>)>,
}

#[derive(Debug, Clone, Default)]
struct TestStateMachine {
    inner: Arc<Mutex<Inner>>,
}

impl TestStateMachine {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn snapshot_error(error: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &error).into()
}

/// A file holding `bytes`, positioned at its start, ready to be read.
async fn file_with(bytes: &[u8]) -> Result<tokio::fs::File, StorageError> {
    let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(snapshot_error)?);
    file.write_all(bytes).await.map_err(snapshot_error)?;
    file.flush().await.map_err(snapshot_error)?;
    file.seek(SeekFrom::Start(0)).await.map_err(snapshot_error)?;
    Ok(file)
}

impl RaftSnapshotBuilder<TypeConfig> for TestStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, bytes) = {
            let mut inner = self.lock();
            inner.snapshot_count += 1;
            let applied = inner.applied.clone();
            let bytes = serde_json::to_vec(&applied).map_err(snapshot_error)?;
            let snapshot_id = format!(
                "{}-{}",
                applied.last_applied.map(|log_id| log_id.index.to_string()).unwrap_or_default(),
                inner.snapshot_count
            );
            let meta =
                SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership, snapshot_id };
            inner.current = Some((meta.clone(), bytes.clone()));
            (meta, bytes)
        };
        Ok(Snapshot { meta, snapshot: Box::new(file_with(&bytes).await?) })
    }
}

impl RaftStateMachine<TypeConfig> for TestStateMachine {
    type SnapshotBuilder = TestStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.lock();
        Ok((inner.applied.last_applied, inner.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut outcomes = Vec::new();
        for entry in entries {
            inner.applied.last_applied = Some(entry.log_id);
            let mut outcome = BatchOutcome { applied_index: entry.log_id.index, ..Default::default() };
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => outcome.operations = batch.operations.len() as u64,
                EntryPayload::Membership(membership) => {
                    inner.applied.membership = StoredMembership::new(Some(entry.log_id), membership)
                }
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        Ok(Box::new(file_with(&[]).await?))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let mut bytes = Vec::new();
        snapshot.seek(SeekFrom::Start(0)).await.map_err(snapshot_error)?;
        snapshot.read_to_end(&mut bytes).await.map_err(snapshot_error)?;
        let applied: Applied = serde_json::from_slice(&bytes).map_err(snapshot_error)?;
        let mut inner = self.lock();
        inner.applied = applied;
        inner.current = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.lock().current.clone();
        match current {
            Some((meta, bytes)) => Ok(Some(Snapshot { meta, snapshot: Box::new(file_with(&bytes).await?) })),
            None => Ok(None),
        }
    }
}

/// Builds a log store on a fresh temporary directory for every suite case; the directory lives
/// as long as the returned guard.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, TestStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, TestStateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|error| StorageIOError::write(&error))?;
        let store =
            LogStore::open(&dir.path().join("raft").join("log.redb")).map_err(|error| StorageIOError::write(&error))?;
        Ok((dir, store, TestStateMachine::default()))
    }
}

/// `Suite::test_all` is synchronous: it creates a fresh tokio runtime for every case, so this is
/// a plain `#[test]`.
#[test]
fn openraft_storage_suite() {
    if let Err(error) = Suite::test_all(Builder) {
        panic!("openraft storage suite failed: {error}");
    }
}
