//! The one way index operations reach the index.
//!
//! A write is never a direct call on the tantivy writer: it becomes a batch of
//! [`IndexOperation`]s with a position in an ordered log, and [`apply_batch`] applies it. Today a
//! standalone node numbers its batches itself ([`LocalWritePath`]); with Raft, the replicated
//! log's state machine calls the same function with the log index. Every tantivy commit records
//! the position it covers ([`IndexCommitMarker`]), so after a restart the node knows exactly which
//! batches the index already holds and applying is idempotent.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::index::{ApplyOutcome, IndexError, IndexOperation, SearchIndex};

/// What every tantivy commit carries as its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IndexCommitMarker {
    /// Position of the last batch whose operations this commit includes.
    pub applied_index: u64,
}

impl IndexCommitMarker {
    pub fn to_payload(self) -> String {
        // Serializing a struct of integers cannot fail.
        serde_json::to_string(&self).unwrap_or_default()
    }

    /// Reads the marker of the index's last commit; `None` for a fresh index.
    pub fn read(index: &SearchIndex) -> Result<Option<IndexCommitMarker>, IndexError> {
        let Some(payload) = index.last_commit_payload()? else {
            return Ok(None);
        };
        match serde_json::from_str(&payload) {
            Ok(marker) => Ok(Some(marker)),
            Err(error) => {
                tracing::warn!(%error, payload, "index commit payload is not a bayard marker; treating the index as empty of batches");
                Ok(None)
            }
        }
    }
}

/// Applies one batch at log position `log_index`. Blocking: call it from a blocking thread.
pub fn apply_batch(
    index: &SearchIndex,
    log_index: u64,
    operations: &[IndexOperation],
) -> Result<ApplyOutcome, IndexError> {
    let marker = IndexCommitMarker { applied_index: log_index };
    index.apply(operations, Some(&marker.to_payload()))
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("index worker failed: {0}")]
    Worker(String),
}

/// The write path of a standalone node: batches are numbered in arrival order and applied one at
/// a time. What this numbering promises is what the Raft log will promise: one total order.
pub struct LocalWritePath {
    index: Arc<SearchIndex>,
    last_applied_index: Mutex<u64>,
}

impl LocalWritePath {
    pub fn new(index: Arc<SearchIndex>, last_applied_index: u64) -> Self {
        LocalWritePath { index, last_applied_index: Mutex::new(last_applied_index) }
    }

    /// Applies `operations` as the next batch; returns its position.
    pub async fn submit(&self, operations: Vec<IndexOperation>) -> Result<(u64, ApplyOutcome), WriteError> {
        let mut last_applied_index = self.last_applied_index.lock().await;
        let log_index = *last_applied_index + 1;
        let index = self.index.clone();
        let outcome = tokio::task::spawn_blocking(move || apply_batch(&index, log_index, &operations))
            .await
            .map_err(|error| WriteError::Worker(error.to_string()))??;
        *last_applied_index = log_index;
        Ok((log_index, outcome))
    }

    pub async fn applied_index(&self) -> u64 {
        *self.last_applied_index.lock().await
    }
}
