//! `node.json` in the data directory: who this directory belongs to.
//!
//! The incarnation is drawn once, when the directory is first used, so a node that lost its data
//! and starts again under the same id is recognisably a different incarnation.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const METADATA_FILE_NAME: &str = "node.json";

/// Format of `node.json` this build writes and reads. A file without the field is format 1 (the
/// field was added after the first release of the file, with no other change).
pub const METADATA_FORMAT_VERSION: u32 = 1;

fn first_format() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMetadata {
    /// [`METADATA_FORMAT_VERSION`] of the build that wrote it.
    #[serde(default = "first_format")]
    pub format_version: u32,
    pub node_id: u64,
    /// The cluster this directory belongs to: set when it bootstraps one or joins one.
    #[serde(default)]
    pub cluster_id: Option<String>,
    pub incarnation: u64,
    /// Set when the cluster removed this node (`bayard leave`): the directory may not serve again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<String>,
    /// How many times the directory has been started (this start included): the generation of
    /// the node's membership digests, so peers tell a restart from the run before. A field that
    /// older files lack (read as 0), so the format is unchanged.
    #[serde(default)]
    pub starts: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("cannot use data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("{path} is of format {found}; this build reads format {METADATA_FORMAT_VERSION}: run the bayard version that wrote it")]
    UnknownFormat { path: PathBuf, found: u32 },
    #[error(
        "data directory {path} belongs to node {found}, not node {expected}; use --data-directory to pick another"
    )]
    WrongNode { path: PathBuf, found: u64, expected: u64 },
}

/// Whether the directory was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectoryState {
    Created,
    Existing,
}

/// Reads `node.json`, or writes a new one (fsynced, with its directory) when there is none.
pub fn load_or_create(data_directory: &Path, node_id: u64) -> Result<(NodeMetadata, DirectoryState), MetadataError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MetadataError::Io { path, source }
    };
    create_private_directory(data_directory).map_err(io_error(data_directory))?;
    let path = data_directory.join(METADATA_FILE_NAME);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let metadata: NodeMetadata = serde_json::from_str(&text)
                .map_err(|error| MetadataError::Damaged { path: path.clone(), reason: error.to_string() })?;
            if metadata.format_version != METADATA_FORMAT_VERSION {
                return Err(MetadataError::UnknownFormat { path: path.clone(), found: metadata.format_version });
            }
            if metadata.node_id != node_id {
                return Err(MetadataError::WrongNode {
                    path: data_directory.to_path_buf(),
                    found: metadata.node_id,
                    expected: node_id,
                });
            }
            Ok((metadata, DirectoryState::Existing))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let metadata = NodeMetadata {
                format_version: METADATA_FORMAT_VERSION,
                node_id,
                cluster_id: None,
                incarnation: rand::random::<u64>() >> 1,
                removed: None,
                starts: 0,
            };
            write_durably(&path, &metadata).map_err(io_error(&path))?;
            Ok((metadata, DirectoryState::Created))
        }
        Err(error) => Err(MetadataError::Io { path, source: error }),
    }
}

/// Creates the data directory (and missing parents) readable by this user only: it holds the
/// index and the log, which other users of the host have no business reading.
fn create_private_directory(directory: &Path) -> std::io::Result<()> {
    if directory.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(directory)
}

/// Replaces `node.json` atomically (temp file, fsync, rename, fsync of the directory).
pub fn store(data_directory: &Path, metadata: &NodeMetadata) -> Result<(), MetadataError> {
    let path = data_directory.join(METADATA_FILE_NAME);
    write_durably(&path, metadata).map_err(|source| MetadataError::Io { path, source })
}

fn write_durably(path: &Path, metadata: &NodeMetadata) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(metadata).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.tmp");
    {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// A random 128-bit id as 32 hex characters.
pub fn random_hex_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_created_once_and_guards_the_node_id() {
        let directory = tempfile::tempdir().unwrap();
        let (first, state) = load_or_create(directory.path(), 3).unwrap();
        assert_eq!(state, DirectoryState::Created);
        let (second, state) = load_or_create(directory.path(), 3).unwrap();
        assert_eq!(state, DirectoryState::Existing);
        assert_eq!(first, second);
        let error = load_or_create(directory.path(), 4).unwrap_err();
        assert!(error.to_string().contains("belongs to node 3, not node 4"), "{error}");
        fs::write(directory.path().join(METADATA_FILE_NAME), "{not json").unwrap();
        assert!(matches!(load_or_create(directory.path(), 3), Err(MetadataError::Damaged { .. })));
    }

    /// Today's `node.json`, pinned; files written before the format field was added still load.
    #[test]
    fn golden_file_and_versions() {
        let metadata = NodeMetadata {
            format_version: METADATA_FORMAT_VERSION,
            node_id: 2,
            cluster_id: Some("c1".into()),
            incarnation: 7,
            removed: None,
            starts: 0,
        };
        let golden =
            "{\n  \"format_version\": 1,\n  \"node_id\": 2,\n  \"cluster_id\": \"c1\",\n  \"incarnation\": 7,\n  \
                      \"starts\": 0\n}";
        assert_eq!(serde_json::to_string_pretty(&metadata).unwrap(), golden);
        let older: NodeMetadata = serde_json::from_str(r#"{"node_id":2,"cluster_id":"c1","incarnation":7}"#).unwrap();
        assert_eq!(older, metadata);
        let directory = tempfile::tempdir().unwrap();
        fs::write(directory.path().join(METADATA_FILE_NAME), r#"{"format_version":9,"node_id":2,"incarnation":7}"#)
            .unwrap();
        let error = load_or_create(directory.path(), 2).unwrap_err().to_string();
        assert!(error.contains("format 9") && error.contains("format 1"), "{error}");
    }

    #[cfg(unix)]
    #[test]
    fn new_data_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().unwrap();
        let data = directory.path().join("a").join("b");
        load_or_create(&data, 1).unwrap();
        for path in [&data, &directory.path().join("a")] {
            assert_eq!(fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o700, "{}", path.display());
        }
    }
}
