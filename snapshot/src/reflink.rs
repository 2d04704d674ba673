//! Reflink snapshots of image files (btrfs, XFS): `FICLONE` makes a
//! copy-on-write clone in constant time, a frozen view of the file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A reflink clone of a file that is deleted on [`ReflinkSnapshot::finish`]
/// (or, best effort, on drop).
#[derive(Debug)]
pub struct ReflinkSnapshot {
    path: PathBuf,
    removed: bool,
}

/// Why a reflink snapshot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReflinkError {
    #[error("{path}: the filesystem cannot reflink (FICLONE: {source}); use a btrfs or XFS (reflink=1) filesystem, or `snapshot = \"none\"` to copy the live file")]
    Unsupported { path: PathBuf, source: io::Error },
    #[error("creating reflink snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl ReflinkSnapshot {
    /// Clones `source` to `dest` (which must not exist).
    pub fn create(source: &Path, dest: &Path) -> Result<Self, ReflinkError> {
        let io_err = |source| ReflinkError::Io {
            path: dest.to_owned(),
            source,
        };
        let src = File::open(source).map_err(|e| ReflinkError::Io {
            path: source.to_owned(),
            source: e,
        })?;
        let dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(io_err)?;
        let snap = Self {
            path: dest.to_owned(),
            removed: false,
        };
        match rustix::fs::ioctl_ficlone(&dst, &src) {
            Ok(()) => {
                dst.sync_all().map_err(io_err)?;
                Ok(snap)
            }
            Err(e) => Err(ReflinkError::Unsupported {
                path: source.to_owned(),
                source: e.into(),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the clone.
    pub fn finish(mut self) -> io::Result<()> {
        self.removed = true;
        std::fs::remove_file(&self.path)
    }
}

impl Drop for ReflinkSnapshot {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
