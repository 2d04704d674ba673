//! Per-volume replica state on the target, kept in the state directory
//! (default `/var/lib/snapsync`), and the per-volume lock.
//!
//! A state file is JSON, written atomically: temporary file, fsync, rename,
//! fsync of the directory. A crash leaves either the old or the new file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};
use wire::Generation;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/snapsync";

/// What the target knows about one replica volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// The source volume this replica copies.
    pub source_id: Option<String>,
    /// The generation the replica fully equals, when `consistent`.
    pub generation: Option<Generation>,
    /// False while an in-place apply is under way: the replica is a mix.
    pub consistent: bool,
    /// Interrupted in-place copy: the generation it goes to and the block
    /// below which all of it is applied and durable.
    pub in_progress: Option<InProgress>,
    /// Block size the progress mark counts in.
    pub block_size: Option<u32>,
    /// Unix seconds of the last commit.
    pub committed_at: Option<u64>,
    /// A thin snapshot (`vg/lv`) of the replica taken before an in-place
    /// apply under `--target-snapshot`: the way back to `generation`.
    #[serde(default)]
    pub rollback: Option<String>,
    /// A sealed journal of this generation is being applied: the volume
    /// may hold part of it until the generation is recorded.
    #[serde(default)]
    pub applying: Option<Generation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    pub generation: Generation,
    pub source_id: String,
    pub block_size: u32,
    pub mark_block: u64,
}

/// The files for one volume in the state directory.
#[derive(Debug, Clone)]
pub struct StatePaths {
    pub state: PathBuf,
    pub lock: PathBuf,
    pub journal: PathBuf,
}

impl StatePaths {
    /// Names derive from the volume's path with `%` and `/` escaped, so
    /// distinct paths never share files.
    pub fn new(state_dir: &Path, volume: &Path) -> Self {
        let mut key = String::new();
        for c in volume.to_string_lossy().chars() {
            match c {
                '%' => key.push_str("%25"),
                '/' => key.push_str("%2F"),
                c => key.push(c),
            }
        }
        Self {
            state: state_dir.join(format!("{key}.state.json")),
            lock: state_dir.join(format!("{key}.lock")),
            journal: state_dir.join(format!("{key}.journal")),
        }
    }
}

/// Reads a state file; a missing file is the empty state.
pub fn load(path: &Path) -> Result<VolumeState> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "state file {} is corrupt; move it away to start over with a full scan",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(VolumeState::default()),
        Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("state path has no directory")?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("flushing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// Makes a rename or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing directory {}", dir.display()))
}

pub fn save(path: &Path, state: &VolumeState) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
    write_atomic(path, &bytes)
}

/// An exclusive per-volume lock, held while the file stays open.
#[derive(Debug)]
pub struct VolumeLock {
    _file: File,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("{path} is locked by another snapsync run; wait for it to finish")]
pub struct Busy {
    pub path: PathBuf,
}

impl VolumeLock {
    /// Takes the lock without waiting; [`Busy`] when another process has it.
    pub fn acquire(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating state directory {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Busy {
                path: path.to_owned(),
            }
            .into()),
            Err(e) => {
                Err(std::io::Error::from(e)).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_do_not_collide() {
        let d = Path::new("/s");
        assert_ne!(
            StatePaths::new(d, Path::new("/a_b")).state,
            StatePaths::new(d, Path::new("/a/b")).state
        );
        assert_ne!(
            StatePaths::new(d, Path::new("/a%2Fb")).state,
            StatePaths::new(d, Path::new("/a/b")).state
        );
    }

    #[test]
    fn save_load_round_trip_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = StatePaths::new(dir.path(), Path::new("/dev/x"));
        assert_eq!(load(&p.state).unwrap(), VolumeState::default());
        let s = VolumeState {
            source_id: Some("a".into()),
            consistent: true,
            ..Default::default()
        };
        save(&p.state, &s).unwrap();
        assert_eq!(load(&p.state).unwrap(), s);
        let _l = VolumeLock::acquire(&p.lock).unwrap();
        let e = VolumeLock::acquire(&p.lock).unwrap_err();
        assert!(e.downcast_ref::<Busy>().is_some());
    }
}
