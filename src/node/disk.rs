//! Free space in the data directory, watched so that a full disk refuses writes with a clear
//! error instead of stopping Raft.
//!
//! When the file system holding the data directory has less free space than
//! `--min-free-disk-mb`, the node refuses client writes (`resource_exhausted`, "disk full on node
//! N"), refuses replicated entries from the leader (which retries them), reports not ready on
//! `/readyz` and sets `bayard_disk_full` to 1. Reads are served throughout. Once space is free
//! again, all of it ends by itself within a second. The margin is there so that the Raft log and
//! tantivy never meet ENOSPC themselves; if they do anyway (the margin set to 0, another process
//! filling the disk at once), Raft stops and the node exits with the reason, for its supervisor
//! to restart it once space is back.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `stats` points to
    // writable memory of the size statvfs expects; it is read only after statvfs reported success.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the structure.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

/// Whether a file system with `available` bytes free is too full for writes.
pub fn too_full(available: u64, minimum: u64) -> bool {
    available < minimum
}

/// The last reading, shared by the write path, readiness and metrics.
#[derive(Debug, Default)]
pub(crate) struct DiskGuard {
    full: AtomicBool,
    available: AtomicU64,
}

impl DiskGuard {
    /// Takes a reading; returns whether the disk is too full now. A failed reading keeps the
    /// previous state (an unreadable file system will fail the writes by itself).
    pub fn refresh(&self, data_directory: &Path, minimum: u64) -> bool {
        match available_bytes(data_directory) {
            Ok(available) => {
                self.available.store(available, Ordering::SeqCst);
                let full = too_full(available, minimum);
                let was_full = self.full.swap(full, Ordering::SeqCst);
                if full && !was_full {
                    tracing::error!(
                        data_directory = %data_directory.display(),
                        available_mib = available / (1024 * 1024),
                        minimum_mib = minimum / (1024 * 1024),
                        "disk full: writes are refused until space is freed; reads are served"
                    );
                } else if was_full && !full {
                    tracing::warn!(
                        available_mib = available / (1024 * 1024),
                        "disk space is back: writes accepted again"
                    );
                }
                crate::telemetry::metrics::set_disk_full(full);
                full
            }
            Err(error) => {
                tracing::debug!(%error, "cannot read free disk space");
                self.full.load(Ordering::SeqCst)
            }
        }
    }

    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::SeqCst)
    }

    pub fn available(&self) -> u64 {
        self.available.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fullness_from_a_table() {
        let cases = [(0, 1, true), (10, 10, false), (9, 10, true), (u64::MAX, 0, false), (0, 0, false)];
        for (available, minimum, full) in cases {
            assert_eq!(too_full(available, minimum), full, "{available} free, {minimum} needed");
        }
    }

    #[test]
    fn readings_of_a_real_directory() {
        let directory = tempfile::tempdir().unwrap();
        assert!(available_bytes(directory.path()).unwrap() > 0);
        let guard = DiskGuard::default();
        assert!(!guard.refresh(directory.path(), 0));
        assert!(guard.refresh(directory.path(), u64::MAX));
        assert!(guard.is_full());
        assert!(!guard.refresh(directory.path(), 0));
        assert!(available_bytes(Path::new("/no/such/directory/at/all")).is_err());
    }
}
