//! A Ceph RBD image as the target: `rbd:POOL/IMAGE` or
//! `rbd:POOL/NAMESPACE/IMAGE`.
//!
//! Generations are RBD snapshots: a delta is written to the image in place,
//! flushed, and then the snapshot `snapsync-GEN` is created; the newest one
//! is the replica's complete generation. The replica's state lives in the
//! image itself (image-meta key [`STATE_KEY`], one JSON value, so one
//! update is atomic), so any gateway can serve it; no state directory and
//! no write-ahead journal are used (the snapshot is the rollback point).
//!
//! Opening settles what a crash left:
//! - `applying` is generation N and `snapsync-N` exists: the commit got as
//!   far as the snapshot; it is recorded now;
//! - not consistent and `snapsync-N` of the recorded generation exists: the
//!   extents that differ from it (the diff since the snapshot, read from the
//!   object map with fast-diff) are rewritten from the snapshot, the head is
//!   resized to its size, and the snapshot is taken again so that the diff
//!   since it is empty once more;
//! - not consistent and no generation (a first copy): the progress mark
//!   resumes it.
//!
//! An empty diff since `snapsync-N` is how the target vouches that it still
//! holds generation N: a written-to image gets a full scan instead of a
//! delta. The image id is its identity: an image removed and created again
//! has a new id (and no image-meta), so it is a new target and gets a full
//! copy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdiff::HashKey;
use rbd::{Cluster, ConnectOptions, Image, Pool, RbdSpec, RbdVolume};
use snapshot::Volume;
use wire::{ErrorCode, Generation, Mode, Open, Opened, ReplicaState};

use super::{map_fits, usable, Applier, ServeConfig, Session, Shared, TargetError, Usable};
use crate::engine::WINDOW_BLOCKS;
use crate::state::{self, StatePaths, VolumeState};

/// Image-meta key holding the replica's state (JSON of [`VolumeState`]).
pub const STATE_KEY: &str = "snapsync.state";
/// Generation snapshots are named `snapsync-GEN`; only these are pruned.
pub const SNAP_PREFIX: &str = "snapsync-";
/// Generation snapshots kept by default.
pub const DEFAULT_KEEP_GENERATIONS: u32 = 2;
/// Largest image-meta state value read back (it is a few hundred bytes).
const MAX_STATE_LEN: usize = 64 << 10;
const EINVAL: i32 = 22;
/// Bytes copied per request when rolling back.
const ROLLBACK_CHUNK: usize = 4 << 20;

/// How the target reaches the cluster (operator's settings: `--ceph-conf`,
/// `--ceph-id`, `--keep-generations` or the matching config keys).
#[derive(Debug, Clone, Default)]
pub struct CephOptions {
    /// ceph.conf; `None`: `$CEPH_CONF`, then librados's default search.
    pub conf: Option<PathBuf>,
    /// cephx id without `client.`; `None`: `admin`.
    pub id: Option<String>,
    /// Generation snapshots kept (at least 1); `None`: 2.
    pub keep_generations: Option<u32>,
}

impl CephOptions {
    fn keep(&self) -> usize {
        self.keep_generations
            .unwrap_or(DEFAULT_KEEP_GENERATIONS)
            .max(1) as usize
    }
}

/// The name of generation `n`'s snapshot.
pub fn snap_name(n: u64) -> String {
    format!("{SNAP_PREFIX}{n}")
}

/// The generation number of a `snapsync-N` snapshot name.
pub fn snap_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SNAP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

/// The open image of a session, beside its [`RbdVolume`].
pub(super) struct Replica {
    volume: Arc<RbdVolume>,
    spec: RbdSpec,
    keep: usize,
}

fn io(e: impl std::fmt::Display) -> TargetError {
    TargetError::new(ErrorCode::TargetIo, e.to_string())
}

impl Replica {
    fn image(&self) -> &Image {
        self.volume.image()
    }

    /// Writes the state to image-meta (one key: atomic).
    pub(super) fn save(&self, st: &VolumeState) -> Result<(), TargetError> {
        let json = serde_json::to_string(st).map_err(io)?;
        self.image().meta_set(STATE_KEY, &json).map_err(io)
    }

    /// The data of generation `g` is written and flushed: the head is cut
    /// to the source's size and the generation snapshot taken. From here
    /// the generation is complete (opening records it if we crash now).
    pub(super) fn snapshot_generation(&self, g: &Generation, size: u64) -> Result<(), TargetError> {
        let img = self.image();
        if img.size().map_err(io)? > size {
            img.resize(size).map_err(io)?;
        }
        img.flush().map_err(io)?;
        img.snap_create(&snap_name(g.number)).map_err(io)
    }

    /// Removes all but the newest `keep` generation snapshots (never a
    /// snapshot not named `snapsync-N`). Failures only warn: a snapshot
    /// left over is removed next time.
    pub(super) fn prune(&self) {
        let img = self.image();
        let Ok(snaps) = generation_snaps(img) else {
            return;
        };
        let extra = snaps.len().saturating_sub(self.keep);
        for (n, _) in snaps.into_iter().take(extra) {
            if let Err(e) = img.snap_remove(&snap_name(n)) {
                tracing::warn!("{}: removing {}: {e}", self.spec, snap_name(n));
            }
        }
    }
}

/// `snapsync-N` snapshots, oldest first: (N, size).
fn generation_snaps(img: &Image) -> Result<Vec<(u64, u64)>, TargetError> {
    let mut v: Vec<(u64, u64)> = img
        .snapshots()
        .map_err(io)?
        .into_iter()
        .filter_map(|s| snap_number(&s.name).map(|n| (n, s.size)))
        .collect();
    v.sort();
    Ok(v)
}

/// Puts the head back to snapshot `snapsync-n` by rewriting the extents
/// that differ from it, then takes the snapshot again so the diff since
/// it is empty. Returns the bytes rewritten.
fn roll_back(
    pool: &Pool,
    spec: &RbdSpec,
    img: &Image,
    n: u64,
    snap_size: u64,
) -> Result<u64, TargetError> {
    let snap = snap_name(n);
    let extents = img.diff(Some(&snap)).map_err(io)?;
    if img.size().map_err(io)? != snap_size {
        img.resize(snap_size).map_err(io)?;
    }
    let mut written = 0u64;
    {
        let from = pool
            .open_snapshot(&spec.image, &snap)
            .map_err(io)?
            .ok_or_else(|| io(format!("{spec}@{snap} vanished during the rollback")))?;
        let mut buf = vec![0u8; ROLLBACK_CHUNK];
        for e in extents {
            let end = (e.offset + e.len).min(snap_size);
            let mut off = e.offset;
            while off < end {
                let n = ((end - off) as usize).min(ROLLBACK_CHUNK);
                from.read_exact_at(&mut buf[..n], off).map_err(io)?;
                if buf[..n].iter().all(|&b| b == 0) {
                    img.write_zeroes(off, n as u64).map_err(io)?;
                } else {
                    img.write_all_at(&buf[..n], off).map_err(io)?;
                }
                written += n as u64;
                off += n as u64;
            }
        }
    }
    img.flush().map_err(io)?;
    // The head equals the snapshot again; taken anew, the diff since it
    // is empty and the target vouches for the generation again. (A crash
    // between the two leaves no snapshot: the next session scans.)
    img.snap_remove(&snap).map_err(io)?;
    img.snap_create(&snap).map_err(io)?;
    Ok(written)
}

/// How long an image found in use is watched before it is refused: a
/// passing `rbd info` or `rbd status` holds a watch for a moment only.
const IN_USE_GRACE: Duration = Duration::from_secs(3);
const IN_USE_POLL: Duration = Duration::from_millis(250);

/// Polls `probe` (who else has the image open, if anyone) until nobody
/// does or `grace` has passed; returns the last users seen, `None` once
/// the image is free.
fn wait_unused(
    mut probe: impl FnMut() -> Result<Option<String>, TargetError>,
    grace: Duration,
    poll: Duration,
) -> Result<Option<String>, TargetError> {
    let start = Instant::now();
    loop {
        let users = probe()?;
        if users.is_none() || start.elapsed() >= grace {
            return Ok(users);
        }
        std::thread::sleep(poll);
    }
}

/// Whether the name the peer gave matches an `rbd:` allow pattern
/// (`rbd:pool/*` matches the images of a pool, not of its namespaces).
fn allowed(cfg: &ServeConfig, name: &str) -> bool {
    let opts = glob::MatchOptions {
        require_literal_separator: true,
        ..Default::default()
    };
    cfg.allow.iter().any(|p| p.matches_with(name, opts))
}

/// Decodes the replica state an image's [`STATE_KEY`] holds (text anyone
/// with access to the pool may have written): bounded, and any text is
/// either a state or an error.
pub fn decode_state(text: &str) -> Result<VolumeState, String> {
    if text.len() > MAX_STATE_LEN {
        return Err(format!("it is oversized ({} bytes)", text.len()));
    }
    serde_json::from_str(text).map_err(|e| e.to_string())
}

fn load_state(img: &Image, notices: &mut Vec<String>) -> Result<VolumeState, TargetError> {
    let Some(text) = img.meta_get(STATE_KEY).map_err(io)? else {
        return Ok(VolumeState::default());
    };
    decode_state(&text).or_else(|e| {
        notices.push(format!("ignored {STATE_KEY}: {e}; a full scan follows"));
        Ok(VolumeState::default())
    })
}

/// [`Session::open`] for an `rbd:` target.
pub(super) fn open(
    open: Open,
    key: HashKey,
    feats: u32,
    cfg: &ServeConfig,
) -> Result<(Session, Opened), TargetError> {
    let spec = RbdSpec::parse(&open.path)
        .map_err(|e| TargetError::new(ErrorCode::Usage, e.to_string()))?;
    if !allowed(cfg, &open.path) {
        return Err(TargetError::new(
            ErrorCode::NotAllowed,
            format!("target {spec} is not on this server's --allow list"),
        ));
    }
    if open.target_snapshot {
        return Err(TargetError::new(
            ErrorCode::Usage,
            format!("--target-snapshot is for thin LVM targets; {spec} always keeps its generations as RBD snapshots"),
        ));
    }
    let cluster = Cluster::connect(&ConnectOptions {
        conf: cfg.ceph.conf.clone(),
        id: cfg.ceph.id.clone(),
        // librbd's cache stays write-through until the first flush (a
        // guard for guests that never flush): snapsync flushes before
        // every generation snapshot and state change that needs it, so
        // writes may be acknowledged from the cache at once.
        options: vec![("rbd_cache_writethrough_until_flush".into(), "false".into())],
        ..Default::default()
    })
    .map_err(io)?;
    let pool = cluster
        .pool(&spec.pool, spec.namespace.as_deref())
        .map_err(io)?;
    let reads_only = open.dry_run || open.mode == Mode::Verify;
    let mut notices = Vec::new();
    let image = match pool.open(&spec.image).map_err(io)? {
        Some(i) => Some(i),
        None if reads_only => None,
        None => {
            // The one target created when missing: at the source's size.
            pool.create(&spec.image, open.source_size).map_err(io)?;
            notices.push(format!("created {spec} ({} bytes)", open.source_size));
            Some(
                pool.open(&spec.image)
                    .map_err(io)?
                    .ok_or_else(|| io(format!("{spec} vanished after it was created")))?,
            )
        }
    };
    let Some(image) = image else {
        return Ok(missing_for_reading(open, key, feats, spec));
    };
    // Like a mounted device: an image someone else has open (mapped,
    // attached to a VM, another session) is never written under them.
    let probe = || -> Result<Option<String>, TargetError> {
        let watchers = image.watchers().map_err(io)?;
        let owners = image.lock_owners().map_err(io)?;
        Ok((watchers.len() > 1 || !owners.is_empty()).then(|| {
            format!(
                "watchers: {}; exclusive-lock owners: {}",
                watchers.len().saturating_sub(1),
                if owners.is_empty() {
                    "none".into()
                } else {
                    owners.join(", ")
                }
            )
        }))
    };
    if let Some(users) = wait_unused(probe, IN_USE_GRACE, IN_USE_POLL)? {
        return Err(TargetError::new(
            ErrorCode::TargetIo,
            format!("target {spec} is in use ({users}): it is mapped or open elsewhere; refused"),
        ));
    }
    // Held for the session: no other client gets the lock handed over
    // while we write (an image without the exclusive-lock feature cannot
    // be locked; the watcher check above is then all there is).
    if let Err(e) = image.lock_exclusive() {
        if e.errno() == Some(EINVAL) {
            notices.push(format!(
                "{spec} has no exclusive-lock feature: it is not locked while written"
            ));
        } else {
            return Err(TargetError::new(
                ErrorCode::TargetIo,
                format!("target {spec}: {e}; refused"),
            ));
        }
    }
    let image_id = image.id().map_err(io)?;
    let id = format!("rbd:{}:{image_id}", spec_pool(&spec));
    let mut state = load_state(&image, &mut notices)?;
    if state.identity.as_deref().is_some_and(|i| i != id) {
        // Image-meta copied along with the data (`rbd cp`, a clone): it
        // describes another image.
        notices.push(format!(
            "{STATE_KEY} was recorded for another image ({}); ignored, a full scan follows",
            state.identity.as_deref().unwrap_or("")
        ));
        state = VolumeState::default();
    }
    state.format = state::STATE_FORMAT;
    state.identity = Some(id.clone());
    state.path = Some(spec.to_string());

    let volume = Arc::new(RbdVolume::new(image).map_err(io)?);
    let replica = Replica {
        volume: volume.clone(),
        spec: spec.clone(),
        keep: cfg.ceph.keep(),
    };
    let img = replica.image();
    let mut recovered: Vec<String> = Vec::new();
    let snaps = generation_snaps(img)?;
    let has = |n: u64| snaps.iter().find(|s| s.0 == n).map(|s| s.1);
    // Settle what a crash left (also before a verify: it must see a
    // complete generation).
    if let Some(g) = state.applying.clone() {
        if has(g.number).is_some() {
            state.generation = Some(g.clone());
            state.consistent = true;
            state.in_progress = None;
            state.applying = None;
            state.committed_at = None;
            replica.save(&state)?;
            recovered.push(format!(
                "recorded generation {} whose snapshot was taken before an interruption",
                g.number
            ));
        }
    }
    if !state.consistent {
        if let Some(g) = state.generation.clone() {
            if let Some(size) = has(g.number) {
                let bytes = roll_back(&pool, &spec, img, g.number, size)?;
                state.consistent = true;
                state.in_progress = None;
                state.applying = None;
                replica.save(&state)?;
                recovered.push(format!(
                    "rolled an interrupted apply back to generation {} ({bytes} bytes rewritten from {})",
                    g.number,
                    snap_name(g.number)
                ));
            }
        }
    }
    // Snapshots past the recorded generation are leftovers of a commit
    // that never got recorded.
    let newest = state.generation.as_ref().map_or(0, |g| g.number);
    for (n, _) in generation_snaps(img)? {
        if n > newest {
            img.snap_remove(&snap_name(n)).map_err(io)?;
        }
    }
    // The target vouches for generation N only while nothing changed
    // since snapsync-N.
    let vouched = match &state.generation {
        Some(g) if state.consistent => {
            let snap = snap_name(g.number);
            let held = generation_snaps(img)?.iter().any(|s| s.0 == g.number)
                && img.diff(Some(&snap)).map_err(io)?.is_empty();
            if !held {
                notices.push(format!(
                    "{spec} changed since {snap} (or it is gone): a full scan follows"
                ));
            }
            held
        }
        _ => false,
    };
    recovered.extend(notices.iter().cloned());
    for n in &notices {
        tracing::warn!("{spec}: {n}");
    }
    let recovered = (!recovered.is_empty()).then(|| recovered.join("; "));

    if let Some(theirs) = &state.source_id {
        if *theirs != open.source_id && !open.force {
            return Err(TargetError::new(
                ErrorCode::Mismatch,
                format!(
                    "target {spec} is a replica of {theirs}, not of {}; pass --force to overwrite it",
                    open.source_id
                ),
            ));
        }
    }
    let old_size = volume.size();
    let new_size = open.source_size;
    let block = open.block_size;
    let Usable {
        mode,
        unvouched,
        start_block,
    } = usable(&open, &state, vouched, new_size, || {
        map_fits(&open, &state, &id)?;
        if vouched {
            Ok(())
        } else {
            Err("the image was written since its generation snapshot".into())
        }
    });
    let number = state.generation.as_ref().map_or(0, |g| g.number) + 1;
    let next_generation = Generation {
        number,
        snapshot: open.target_generation.snapshot.clone(),
    };
    // In place: the generation snapshot is the way back.
    let applier = if reads_only {
        Applier::DryRun
    } else {
        Applier::InPlace {
            last_mark: Instant::now(),
            dirty: 0,
        }
    };
    let opened = Opened {
        target_size: old_size,
        state: ReplicaState {
            source_id: state.source_id.clone(),
            generation: state.generation.clone().filter(|_| vouched),
            consistent: state.consistent,
            resume: state
                .in_progress
                .as_ref()
                .map(|ip| (ip.generation.clone(), ip.mark_block)),
            recovered: recovered.clone(),
        },
        start_block,
        window_blocks: WINDOW_BLOCKS,
        mode,
        resizable: true,
        target_identity: id,
        target_strong: true,
        unvouched,
    };
    let volume: Arc<dyn Volume> = volume;
    let session = Session {
        shared: Arc::new(Shared::new(
            volume,
            old_size,
            new_size,
            block,
            key,
            start_block,
        )),
        paths: no_paths(),
        state,
        open,
        features: feats,
        start_block,
        mode,
        next_generation,
        _lock: None,
        applier,
        bytes_written: 0,
        unchecked_room: 0,
        last_free: None,
        recovered,
        rbd: Some(Box::new(replica)),
    };
    Ok((session, opened))
}

fn spec_pool(spec: &RbdSpec) -> String {
    match &spec.namespace {
        Some(ns) => format!("{}/{ns}", spec.pool),
        None => spec.pool.clone(),
    }
}

/// An RBD session keeps no files: its state is image-meta.
fn no_paths() -> StatePaths {
    StatePaths {
        state: PathBuf::new(),
        lock: PathBuf::new(),
        journal: PathBuf::new(),
    }
}

/// A dry run or verify of an image that does not exist: it compares
/// against nothing (all zeros), creating nothing.
fn missing_for_reading(open: Open, key: HashKey, feats: u32, spec: RbdSpec) -> (Session, Opened) {
    let volume: Arc<dyn Volume> = Arc::new(snapshot::MemVolume::new(
        &spec.to_string(),
        Vec::new(),
        true,
    ));
    let mode = if matches!(open.mode, Mode::Delta | Mode::Mapped) {
        Mode::FullScan
    } else {
        open.mode
    };
    let next_generation = Generation {
        number: 1,
        snapshot: open.target_generation.snapshot.clone(),
    };
    let opened = Opened {
        target_size: 0,
        state: ReplicaState {
            source_id: None,
            generation: None,
            consistent: false,
            resume: None,
            recovered: None,
        },
        start_block: 0,
        window_blocks: WINDOW_BLOCKS,
        mode,
        resizable: true,
        target_identity: format!("rbd:new:{spec}"),
        target_strong: false,
        unvouched: (open.mode == Mode::Mapped).then(|| "the image is new".to_string()),
    };
    let session = Session {
        shared: Arc::new(Shared::new(
            volume,
            0,
            open.source_size,
            open.block_size,
            key,
            0,
        )),
        paths: no_paths(),
        state: VolumeState::default(),
        open,
        features: feats,
        start_block: 0,
        mode,
        next_generation,
        _lock: None,
        applier: Applier::DryRun,
        bytes_written: 0,
        unchecked_room: 0,
        last_free: None,
        recovered: None,
        rbd: None,
    };
    (session, opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user that goes within the grace (a passing `rbd info`) is waited
    /// out; one that stays is reported; a failing probe is an error.
    #[test]
    fn an_image_in_use_is_watched_for_a_grace_before_it_is_refused() {
        let poll = Duration::from_millis(1);
        let mut seen = 0;
        let busy_twice = || {
            seen += 1;
            Ok((seen <= 2).then(|| "watchers: 1".to_string()))
        };
        assert_eq!(
            wait_unused(busy_twice, Duration::from_secs(60), poll).unwrap(),
            None
        );
        assert_eq!(seen, 3);

        let start = Instant::now();
        let grace = Duration::from_millis(50);
        let always = || Ok(Some("watchers: 1".to_string()));
        assert_eq!(
            wait_unused(always, grace, poll).unwrap().as_deref(),
            Some("watchers: 1")
        );
        assert!(start.elapsed() >= grace);

        let failing = || Err(io("no cluster"));
        assert!(wait_unused(failing, grace, poll).is_err());
    }

    #[test]
    fn generation_snapshot_names() {
        assert_eq!(snap_name(7), "snapsync-7");
        assert_eq!(snap_number("snapsync-7"), Some(7));
        assert_eq!(snap_number("snapsync-12345"), Some(12345));
        for other in [
            "snapsync-",
            "snapsync-07",
            "snapsync-1a",
            "snapsync-+1",
            "nightly",
            "snapsync-99999999999999999999999",
        ] {
            assert_eq!(snap_number(other), None, "{other:?}");
        }
    }

    #[test]
    fn image_meta_state_is_decoded_within_bounds() {
        let st = VolumeState {
            consistent: true,
            source_id: Some("id:x".into()),
            ..Default::default()
        };
        let text = serde_json::to_string(&st).unwrap();
        assert_eq!(decode_state(&text).unwrap(), st);
        assert!(decode_state("{").is_err());
        assert!(decode_state("[]").is_err());
        let huge = format!("{{\"path\":\"{}\"}}", "x".repeat(MAX_STATE_LEN));
        assert!(decode_state(&huge).unwrap_err().contains("oversized"));
    }

    #[test]
    fn allow_patterns_match_rbd_names() {
        let cfg = ServeConfig {
            allow: vec![glob::Pattern::new("rbd:backup/*").unwrap()],
            state_dir: PathBuf::from("/nonexistent"),
            cancel: crate::engine::Cancel::new(),
            timeout: None,
            journal_max: 0,
            ceph: CephOptions::default(),
        };
        assert!(allowed(&cfg, "rbd:backup/data"));
        assert!(!allowed(&cfg, "rbd:backup/ns/data"));
        assert!(!allowed(&cfg, "rbd:other/data"));
    }
}
