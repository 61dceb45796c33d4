//! Snapshot archives: the committed index files at a log id, in one file.
//!
//! ```text
//! "BAYSNAP1"  u64 big-endian header length  header (JSON)  file bodies, in header order
//! header = {"meta": SnapshotMeta, "files": [{"name": "meta.json", "bytes": N}, …]}
//! ```
//! One plain file is what openraft streams to a follower in chunks (each under the frame limit),
//! and what a follower receives into. Installing extracts the files into a fresh directory,
//! fsyncs them, and only then swaps the directory in (see `state_machine`).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::types::SnapshotMeta;
use crate::index::{CommittedState, META_FILE_NAME};

const MAGIC: &[u8; 8] = b"BAYSNAP1";
/// A header larger than this is not a bayard snapshot (it lists file names, not data).
const MAX_HEADER_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct ArchiveEntry {
    name: String,
    bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ArchiveHeader {
    meta: SnapshotMeta,
    files: Vec<ArchiveEntry>,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// A file name from an archive must name a file directly inside the index directory.
fn check_entry_name(name: &str) -> io::Result<()> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0');
    if plain {
        Ok(())
    } else {
        Err(invalid(format!("snapshot archive names an invalid file `{name}`")))
    }
}

/// Writes the committed index state as an archive at `path` (fsynced).
pub fn write_archive(
    path: &Path,
    meta: &SnapshotMeta,
    index_directory: &Path,
    state: &CommittedState,
) -> io::Result<u64> {
    let mut entries = vec![ArchiveEntry { name: META_FILE_NAME.to_string(), bytes: state.meta_json.len() as u64 }];
    for relative in &state.files {
        let name = relative.to_string_lossy().into_owned();
        check_entry_name(&name)?;
        let bytes = fs::metadata(index_directory.join(relative))?.len();
        entries.push(ArchiveEntry { name, bytes });
    }
    let header = ArchiveHeader { meta: meta.clone(), files: entries };
    let header_json = serde_json::to_vec(&header).map_err(io::Error::other)?;

    let file = File::create(path)?;
    let mut writer = BufWriter::new(file);
    writer.write_all(MAGIC)?;
    writer.write_all(&(header_json.len() as u64).to_be_bytes())?;
    writer.write_all(&header_json)?;
    writer.write_all(&state.meta_json)?;
    for (relative, entry) in state.files.iter().zip(header.files.iter().skip(1)) {
        let mut source = File::open(index_directory.join(relative))?;
        // Copy exactly the announced length: segment files are immutable once committed.
        let copied = io::copy(&mut (&mut source).take(entry.bytes), &mut writer)?;
        if copied != entry.bytes {
            return Err(invalid(format!("{} shrank while it was archived", relative.display())));
        }
    }
    let file = writer.into_inner().map_err(|error| error.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

fn read_header(reader: &mut impl Read) -> io::Result<ArchiveHeader> {
    let mut magic = [0_u8; 8];
    reader.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("not a bayard snapshot archive"));
    }
    let mut length = [0_u8; 8];
    reader.read_exact(&mut length)?;
    let length = u64::from_be_bytes(length);
    if length > MAX_HEADER_BYTES {
        return Err(invalid(format!("snapshot header of {length} bytes is too large")));
    }
    let mut header_json = vec![0_u8; length as usize];
    reader.read_exact(&mut header_json)?;
    serde_json::from_slice(&header_json).map_err(|error| invalid(format!("snapshot header does not parse: {error}")))
}

/// Reads the metadata of the archive at `path`.
pub fn read_meta(path: &Path) -> io::Result<SnapshotMeta> {
    let mut reader = BufReader::new(File::open(path)?);
    Ok(read_header(&mut reader)?.meta)
}

/// Extracts the archive read from `archive` into `target_directory` (which must not exist), with
/// every file and the directory fsynced. Returns the snapshot metadata.
pub fn extract_archive(archive: &mut File, target_directory: &Path) -> io::Result<SnapshotMeta> {
    archive.seek(SeekFrom::Start(0))?;
    let total_bytes = archive.metadata()?.len();
    let mut reader = BufReader::new(&mut *archive);
    let header = read_header(&mut reader)?;
    let announced: u64 = header.files.iter().map(|entry| entry.bytes).sum();
    if announced > total_bytes {
        return Err(invalid("snapshot archive is shorter than its header says"));
    }
    if !header.files.iter().any(|entry| entry.name == META_FILE_NAME) {
        return Err(invalid("snapshot archive has no meta.json"));
    }
    fs::create_dir_all(target_directory)?;
    for entry in &header.files {
        check_entry_name(&entry.name)?;
        let path = target_directory.join(&entry.name);
        let mut output = File::create(&path)?;
        let copied = io::copy(&mut (&mut reader).take(entry.bytes), &mut output)?;
        if copied != entry.bytes {
            return Err(invalid(format!("snapshot archive ends inside {}", entry.name)));
        }
        output.sync_all()?;
    }
    File::open(target_directory)?.sync_all()?;
    Ok(header.meta)
}

/// Path of the archive of `snapshot_id` in `directory`.
pub fn archive_path(directory: &Path, snapshot_id: &str) -> PathBuf {
    directory.join(format!("{snapshot_id}.snap"))
}

/// The newest complete archive in `directory` (by last log id), if any; other archives and
/// leftovers of interrupted transfers are removed.
pub fn newest_archive(directory: &Path) -> io::Result<Option<(SnapshotMeta, PathBuf)>> {
    let mut newest: Option<(SnapshotMeta, PathBuf)> = None;
    let mut others = Vec::new();
    let entries = match fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|extension| extension.to_str()) != Some("snap") {
            others.push(path);
            continue;
        }
        match read_meta(&path) {
            Ok(meta) => {
                let newer = newest.as_ref().is_none_or(|(best, _)| meta.last_log_id > best.last_log_id);
                if newer {
                    if let Some((_, previous)) = newest.take() {
                        others.push(previous);
                    }
                    newest = Some((meta, path));
                } else {
                    others.push(path);
                }
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "removing an unreadable snapshot archive");
                others.push(path);
            }
        }
    }
    for path in others {
        let _ = fs::remove_file(&path);
    }
    Ok(newest)
}
