//! Per-volume replica state on the target, kept in the state directory
//! (default `/var/lib/snapsync`), and the per-volume lock.
//!
//! A state file is JSON, written atomically: temporary file, fsync, rename,
//! fsync of the directory. A crash leaves either the old or the new file.
//!
//! Files are named after the volume's identity (a hash of it, see
//! [`snapshot::identity`]), not its path, so aliases share them and a new
//! volume at an old name does not inherit them. Every file here is opened
//! without following symlinks and created mode 0600; the directory is 0700
//! and ours.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use wire::Generation;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/snapsync";

/// Version of the state file format. 0 (absent): path-keyed, before
/// identities; 2: identity-keyed.
pub const STATE_FORMAT: u32 = 2;

/// Set-aside states older than this are removed.
pub const STALE_DAYS: u64 = 30;

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
    /// The rollback snapshot's LV UUID: after a rollback cut short between
    /// its lvm steps, how the next open knows the origin already is it.
    #[serde(default)]
    pub rollback_uuid: Option<String>,
    /// A sealed journal of this generation is being applied: the volume
    /// may hold part of it until the generation is recorded.
    #[serde(default)]
    pub applying: Option<Generation>,
    /// [`STATE_FORMAT`] of the file (0 for an old path-keyed one).
    #[serde(default)]
    pub format: u32,
    /// The volume's identity (`kind:key`) this state belongs to.
    #[serde(default)]
    pub identity: Option<String>,
    /// The path last used for the volume, for people reading the file.
    #[serde(default)]
    pub path: Option<String>,
    /// A file replica as it was when `generation` was committed: while it
    /// is unchanged the target vouches that nothing wrote the replica
    /// since (a source's digest map may then be trusted).
    #[serde(default)]
    pub stamp: Option<FileStamp>,
}

/// What changes whenever anything writes a file: `cp` over it, an
/// editor, `dd`, a truncation (each changes ctime), or a replacement
/// (the inode). Times in nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let m = fs::metadata(path)?;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Ok(Self {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
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
    /// Names derive from a hash of the volume's identity: fixed length
    /// whatever the path, one set of files for all aliases.
    pub fn for_identity(state_dir: &Path, id: &snapshot::VolumeIdentity) -> Self {
        let key = format!("vol-{}", id.hash());
        Self {
            state: state_dir.join(format!("{key}.state.json")),
            lock: state_dir.join(format!("{key}.lock")),
            journal: state_dir.join(format!("{key}.journal")),
        }
    }

    /// The other files of the volume whose state file is `state`.
    pub fn of_state_file(state: &Path) -> Self {
        let stem = state.with_extension("").with_extension("");
        Self {
            state: state.to_path_buf(),
            lock: stem.with_extension("lock"),
            journal: stem.with_extension("journal"),
        }
    }

    /// The names of format 0 (before identities): the path with `%` and `/`
    /// escaped. Only read, to upgrade.
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
    match read_nofollow(path) {
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

fn read_nofollow(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Creates `path` anew (mode 0600, never through a symlink): a file of
/// that name, whatever it is, is removed first.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("state path has no directory")?;
    let tmp = path.with_extension("tmp");
    let mut f = create_private(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
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

/// A state directory that is not safe to use.
#[derive(Debug, thiserror::Error)]
#[error("state directory {path}: {why}")]
pub struct UnsafeStateDir {
    pub path: PathBuf,
    pub why: String,
}

/// Creates the state directory 0700, or checks an existing one: ours and
/// too open is tightened to 0700 (returned as a notice); another user's is
/// refused. Not a symlink.
pub fn ensure_dir(dir: &Path) -> Result<Option<String>> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating state directory {}", dir.display()))?;
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("reading state directory {}", dir.display())),
        Ok(m) => {
            let refuse = |why: &str| {
                anyhow::Error::from(UnsafeStateDir {
                    path: dir.to_owned(),
                    why: why.to_owned(),
                })
            };
            if m.file_type().is_symlink() {
                return Err(refuse("is a symbolic link; give the real directory"));
            }
            if !m.is_dir() {
                return Err(refuse("is not a directory"));
            }
            let me = rustix::process::geteuid().as_raw();
            if m.uid() != me {
                return Err(refuse(&format!(
                    "is owned by uid {}, not by us (uid {me}); refused",
                    m.uid()
                )));
            }
            if m.mode() & 0o077 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("tightening {}", dir.display()))?;
                return Ok(Some(format!(
                    "state directory {} was mode {:o}; tightened to 700",
                    dir.display(),
                    m.mode() & 0o7777
                )));
            }
            Ok(None)
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Moves `file` into `stale/` of its directory, named with the time, and
/// returns its new path. Removes set-aside files older than
/// [`STALE_DAYS`].
pub fn set_aside(file: &Path) -> Result<PathBuf> {
    let dir = file.parent().context("state path has no directory")?;
    let stale = dir.join("stale");
    if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&stale) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e).with_context(|| format!("creating {}", stale.display()));
        }
    }
    prune_stale(&stale);
    let name = file.file_name().context("state file has no name")?;
    let to = stale.join(format!("{}-{}", now(), name.to_string_lossy()));
    fs::rename(file, &to)
        .with_context(|| format!("moving {} to {}", file.display(), to.display()))?;
    sync_dir(dir)?;
    Ok(to)
}

/// Set-aside files in `state_dir/stale`, for `status`.
pub fn stale_files(state_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(state_dir.join("stale"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn prune_stale(stale: &Path) {
    let limit = now().saturating_sub(STALE_DAYS * 86_400);
    for p in stale_files(stale.parent().unwrap_or(stale)) {
        let t = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('-').next())
            .and_then(|t| t.parse::<u64>().ok());
        if t.is_some_and(|t| t < limit) {
            let _ = fs::remove_file(&p);
        }
    }
}

/// Identity-keyed states in `state_dir` that record `path`, loaded.
pub fn at_path(state_dir: &Path, path: &Path) -> Vec<(PathBuf, VolumeState)> {
    let want = path.to_string_lossy();
    let Ok(rd) = fs::read_dir(state_dir) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vol-") && n.ends_with(".state.json"))
        })
        .filter_map(|p| load(&p).ok().map(|s| (p, s)))
        .filter(|(_, s)| s.path.as_deref() == Some(&*want))
        .collect()
}

/// Identity-keyed states in `state_dir` that record `path` under another
/// identity than `id`: the volume they belong to is no longer at that
/// name (removed, recreated, swapped), so they are stale.
pub fn others_at_path(state_dir: &Path, path: &Path, id: &str) -> Vec<PathBuf> {
    at_path(state_dir, path)
        .into_iter()
        .filter(|(_, s)| s.identity.as_deref() != Some(id))
        .map(|(p, _)| p)
        .collect()
}

/// An exclusive per-volume lock, held while the file stays open.
#[derive(Debug)]
pub struct VolumeLock {
    _held: snapshot::lock::Held,
    path: PathBuf,
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
            if !dir.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("creating state directory {}", dir.display()))?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match snapshot::lock::try_exclusive(file) {
            Ok(Some(held)) => Ok(Self {
                _held: held,
                path: path.to_owned(),
            }),
            Ok(None) => Err(Busy {
                path: path.to_owned(),
            }
            .into()),
            Err(e) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

impl VolumeLock {
    /// The lock file: whose volume this lock is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        assert_eq!(ensure_dir(&d).unwrap(), None);
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(ensure_dir(&d).unwrap().unwrap().contains("tightened"));
        assert_eq!(mode(&d), 0o700);
        let p = StatePaths::new(&d, Path::new("/dev/x"));
        save(&p.state, &VolumeState::default()).unwrap();
        let _l = VolumeLock::acquire(&p.lock).unwrap();
        assert_eq!(mode(&p.state), 0o600);
        assert_eq!(mode(&p.lock), 0o600);
        // A symlink planted as the lock or state is not followed.
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        let q = StatePaths::new(&d, Path::new("/dev/y"));
        std::os::unix::fs::symlink(&outside, &q.lock).unwrap();
        std::os::unix::fs::symlink(&outside, &q.state).unwrap();
        assert!(VolumeLock::acquire(&q.lock).is_err());
        assert!(load(&q.state).is_err());
        std::os::unix::fs::symlink(&outside, q.state.with_extension("tmp")).unwrap();
        save(&q.state, &VolumeState::default()).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(ensure_dir(&link).is_err());
    }

    #[test]
    fn stale_states_are_found_and_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let st = |id: &str| VolumeState {
            identity: Some(id.into()),
            path: Some("/dev/vg/lv".into()),
            format: STATE_FORMAT,
            ..Default::default()
        };
        save(&d.join("vol-a.state.json"), &st("dm:A")).unwrap();
        save(&d.join("vol-b.state.json"), &st("dm:B")).unwrap();
        let o = others_at_path(d, Path::new("/dev/vg/lv"), "dm:B");
        assert_eq!(o, vec![d.join("vol-a.state.json")]);
        let to = set_aside(&o[0]).unwrap();
        assert!(to.starts_with(d.join("stale")));
        assert_eq!(stale_files(d), vec![to]);
        // Old ones go after 30 days.
        fs::write(d.join("stale/1000-vol-x.state.json"), b"{}").unwrap();
        set_aside(&d.join("vol-b.state.json")).unwrap();
        assert_eq!(stale_files(d).len(), 2);
    }

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

    /// A `run` of several volumes takes each volume's lock again every
    /// cycle while other threads spawn lvm and ssh: a lock given up must
    /// not look busy to its own process (a child being spawned holds a
    /// copy of its descriptor until exec). Before: about 1 in 2000 did.
    #[test]
    fn a_volume_lock_given_up_is_free_while_other_threads_spawn() {
        let dir = tempfile::tempdir().unwrap();
        let p = StatePaths::new(dir.path(), Path::new("/dev/x"));
        let tries = 5000;
        let busy = snapshot::lock::while_spawning(|| {
            (0..tries)
                .filter(|_| VolumeLock::acquire(&p.lock).is_err())
                .count()
        });
        assert_eq!(busy, 0, "a free lock looked busy {busy} times in {tries}");
    }
}
