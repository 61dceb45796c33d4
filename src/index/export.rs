//! The committed state of an index as a set of files, and a handle whose index can be swapped.
//!
//! A replica that fell too far behind receives another replica's *committed* index files and
//! opens them in place of its own. [`SearchIndex::committed_state`] lists those files; tantivy's
//! garbage collector keeps every file of a segment whose metadata is alive, so the files stay on
//! disk for as long as the returned [`CommittedState`] lives, whatever merges happen meanwhile.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::{IndexError, SearchIndex};

/// Name of tantivy's metadata file inside an index directory.
pub const META_FILE_NAME: &str = "meta.json";

/// The files of the last commit.
pub struct CommittedState {
    /// The content to write as `meta.json`: the commit's segments, schema, opstamp and payload.
    pub meta_json: Vec<u8>,
    /// Segment files, relative to the index directory, that exist on disk.
    pub files: Vec<PathBuf>,
    /// The commit's payload.
    pub payload: Option<String>,
    // Holding the metadata keeps its segments' files from being garbage collected.
    _metas: tantivy::IndexMeta,
}

impl SearchIndex {
    /// The committed state: what a fresh copy of this index needs, as of the last commit.
    pub fn committed_state(&self) -> Result<CommittedState, IndexError> {
        let metas = self.index.load_metas()?;
        let meta_json = serde_json::to_vec_pretty(&metas)
            .map_err(|error| IndexError::Internal(format!("cannot serialize the index metadata: {error}")))?;
        let mut files: Vec<PathBuf> = metas
            .list_segment_files()
            .into_iter()
            // Not every component exists for every segment (no positions, no deletes, …).
            .filter(|relative| self.index_directory.join(relative).is_file())
            .collect();
        files.sort();
        Ok(CommittedState { meta_json, files, payload: metas.payload.clone(), _metas: metas })
    }
}

/// A shared pointer to the index in use. Readers take the current index for the duration of one
/// operation; installing a replica's files swaps in a new one without stopping them.
#[derive(Clone, Debug)]
pub struct SharedIndex {
    current: Arc<RwLock<Arc<SearchIndex>>>,
}

impl SharedIndex {
    pub fn new(index: SearchIndex) -> Self {
        SharedIndex { current: Arc::new(RwLock::new(Arc::new(index))) }
    }

    /// The index in use now.
    pub fn current(&self) -> Arc<SearchIndex> {
        let guard = self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.clone()
    }

    /// Puts `index` in use and returns the one it replaces.
    pub fn replace(&self, index: SearchIndex) -> Arc<SearchIndex> {
        let mut guard = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::replace(&mut *guard, Arc::new(index))
    }
}
