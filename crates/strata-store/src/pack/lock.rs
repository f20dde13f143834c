//! The pack directory's lock file: `flock` through `std::fs::File::lock`.
//!
//! A builder holds the lock exclusively for the whole build; a reader holds it shared while it
//! reads the manifest and opens the data file. The lock belongs to the open file description,
//! so the kernel drops it when the process dies: a killed builder never leaves a stale lock.
//! The lock file itself is never removed (removing it would let two processes lock two
//! different files of the same name).

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;

use crate::{Error, Result};

/// A held lock, released when dropped.
#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
}

impl LockFile {
    /// Waits for the exclusive lock on `path`, creating the file if needed.
    pub(crate) fn exclusive(path: &Path) -> Result<LockFile> {
        let file = open(path)?;
        file.lock().map_err(Error::io("lock", path))?;
        Ok(LockFile { file })
    }

    /// The exclusive lock on `path` if nobody holds any lock on it now.
    pub(crate) fn try_exclusive(path: &Path) -> Result<Option<LockFile>> {
        let file = open(path)?;
        held(file.try_lock(), path).map(|ok| ok.then(|| LockFile { file }))
    }

    /// The shared lock on `path` if nobody holds it exclusively now.
    pub(crate) fn try_shared(path: &Path) -> Result<Option<LockFile>> {
        let file = open(path)?;
        held(file.try_lock_shared(), path).map(|ok| ok.then(|| LockFile { file }))
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Closing the file would release the lock too; unlocking first makes the order explicit.
        // An unlock error leaves nothing to do: the close that follows releases the lock.
        let _ = self.file.unlock();
    }
}

/// Opens (creating if needed) the lock file. A read-only pack directory still has the lock file
/// its builder created, which can be locked through a read-only descriptor.
fn open(path: &Path) -> Result<File> {
    match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path) {
        Ok(f) => Ok(f),
        Err(e) if matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem) => {
            File::open(path).map_err(Error::io("open lock file", path))
        }
        Err(e) => Err(Error::io("open lock file", path)(e)),
    }
}

/// Whether a `try_lock*` call got the lock.
fn held(r: std::result::Result<(), TryLockError>, path: &Path) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", path)(e)),
    }
}
