//! The target side of a session: what `snapsync serve` runs.
//!
//! Threads: a reader decodes frames into a small bounded queue; the
//! caller's thread takes them and applies ops; a scanner hashes the volume
//! front to back (at most a credit window ahead of the source); a refiner
//! answers sub-block digest requests (at most [`MAX_PENDING_REFINES`]
//! queued: a source that asks more without reading the answers is a
//! protocol violation); a writer owns the outgoing stream and flushes
//! whenever it runs out of work; a heartbeat thread sends our counters, so
//! a long apply and fsync still shows progress.
//!
//! The target owns its limits: the journal budget is `serve --journal-max`
//! (the source may only lower it), ops arrive in strictly increasing
//! offset order, and `--timeout` cuts off a source that makes no progress
//! (then the lock is released).

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockdiff::{BlockSize, HashKey, Signer};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use snapshot::lvm::{LvName, Lvm, LvmError};
use snapshot::{Volume, VolumeError};
use wire::{
    features, Codec, Committed, ErrorCode, FrameReader, FrameWriter, Generation, Heartbeat,
    HelloAck, Mode, Msg, Open, Opened, RemoteError, ReplicaState, SubHashes, WireError,
};

use super::holes::Announcer;
use super::{Cancel, ChunkReader, Clock, MAX_PENDING_REFINES, WINDOW_BLOCKS};
use crate::journal::{self, Journal};
use crate::state::{self, InProgress, StatePaths, VolumeLock, VolumeState};

/// Bytes an in-place apply writes between two durable marks (and at
/// least one mark every 5 s): 256 MiB, or the hidden environment variable
/// `SNAPSYNC_MARK_BYTES` (a byte count), with which the power-cut harness
/// puts marks into copies of a few MiB.
fn mark_bytes() -> u64 {
    static BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("SNAPSYNC_MARK_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&b| b > 0)
            .unwrap_or(256 << 20)
    })
}

/// How `serve` is configured by its operator (not by the peer).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Paths (or glob patterns) the peer may write. Empty: nothing.
    pub allow: Vec<glob::Pattern>,
    pub state_dir: PathBuf,
    pub cancel: Cancel,
    /// Longest time without progress from the source; `None`: no limit
    /// (an in-process target, whose source has its own).
    pub timeout: Option<Duration>,
    /// Largest journal, in bytes of records; the source may only lower it.
    pub journal_max: u64,
    /// How `rbd:` targets reach their cluster.
    pub ceph: CephOptions,
}

#[path = "rbd_target.rs"]
mod rbd_target;
pub use rbd_target::{decode_state as decode_rbd_state, CephOptions, DEFAULT_KEEP_GENERATIONS};

/// Default of `serve --timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Frames decoded ahead of the session, at most.
const INBOX_FRAMES: usize = 4;
/// Free space kept on a file target's file system beyond what a journal
/// apply writes.
pub const FREE_MARGIN: u64 = 16 << 20;

/// A thin target's rollback snapshot is the volume's name and this.
const ROLLBACK_SUFFIX: &str = ".snapsync-rollback";

/// A failure to report to the peer and to our own operator.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    pub code: ErrorCode,
    pub message: String,
}

impl TargetError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

fn protocol(msg: impl Into<String>) -> TargetError {
    TargetError::new(ErrorCode::Protocol, msg)
}

fn volume_err(e: VolumeError) -> TargetError {
    let code = match e {
        VolumeError::TooSmall { .. } => ErrorCode::TooSmall,
        _ => ErrorCode::TargetIo,
    };
    TargetError::new(code, e.to_string())
}

impl From<WireError> for TargetError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Remote(r) => {
                TargetError::new(r.code, format!("source reported: {}", r.message))
            }
            WireError::Closed => TargetError::new(
                ErrorCode::Protocol,
                "the source closed the connection mid-session",
            ),
            e => TargetError::new(ErrorCode::Protocol, e.to_string()),
        }
    }
}

/// What a finished session did, for the serving side's log.
#[derive(Debug, Clone)]
pub struct ServeSummary {
    pub path: String,
    pub committed: Committed,
}

enum Out {
    Frame(Msg, Vec<u8>),
}

/// Frames from the source, decoded by a thread of their own into a bounded
/// queue, so the session can give up on a source that makes no progress
/// even while a read blocks.
struct Inbox {
    rx: Receiver<Result<(Msg, Vec<u8>), WireError>>,
    bytes: Arc<AtomicU64>,
    clock: Clock,
    timeout: Option<Duration>,
    cancel: Cancel,
    heartbeat: Heartbeat,
    /// Bytes we sent (an upper bound, stored before they go out) and, once
    /// the session runs, the blocks we hashed: the source cannot have
    /// received or compared more, so its heartbeats cannot claim progress
    /// we did not make possible.
    sent: Arc<AtomicU64>,
    shared: Option<Arc<Shared>>,
}

impl Inbox {
    fn spawn<R: Read + Send + 'static>(reader: R, cfg: &ServeConfig) -> Self {
        let (tx, rx) = bounded(INBOX_FRAMES);
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        thread::Builder::new()
            .name("serve-read".into())
            .spawn(move || {
                let mut rd = FrameReader::new(reader);
                if let Err(e) = rd.read_preamble() {
                    let _ = tx.send(Err(e));
                    return;
                }
                loop {
                    let item = rd.read().map(|(m, p)| (m, p.to_vec()));
                    counter.store(rd.bytes(), Ordering::Relaxed);
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawn reader");
        Self {
            rx,
            bytes,
            clock: Clock::new(),
            timeout: cfg.timeout,
            cancel: cfg.cancel.clone(),
            heartbeat: Heartbeat::default(),
            sent: Arc::new(AtomicU64::new(0)),
            shared: None,
        }
    }

    /// Counts a heartbeat as progress only when what it claims advanced
    /// and is possible.
    fn heartbeat(&mut self, h: Heartbeat) -> Result<(), TargetError> {
        let sent = self.sent.load(Ordering::SeqCst);
        let hashed = self
            .shared
            .as_ref()
            .map_or(0, |s| s.hashed.load(Ordering::SeqCst));
        if h.received > sent || h.blocks > hashed {
            return Err(protocol(format!(
                "heartbeat claims {} bytes received of {sent} sent and {} blocks compared of {hashed} hashed",
                h.received, h.blocks
            )));
        }
        if h.blocks > self.heartbeat.blocks || h.received > self.heartbeat.received {
            self.clock.touch();
        }
        self.heartbeat = self.heartbeat.max(&h);
        Ok(())
    }

    /// The next frame other than a heartbeat. Fails when the source made
    /// no progress for the timeout (only real progress touches the clock:
    /// see [`Session::receive`]) or we are interrupted.
    fn read(&mut self) -> Result<(Msg, Vec<u8>), TargetError> {
        loop {
            if self.cancel.is_cancelled() {
                return Err(TargetError::new(
                    ErrorCode::Interrupted,
                    "the target was interrupted by a signal",
                ));
            }
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok((Msg::Heartbeat(h), _))) => self.heartbeat(h)?,
                Ok(Ok(frame)) => return Ok(frame),
                Ok(Err(e)) => return Err(e.into()),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(t) = self.timeout {
                        if self.clock.idle() > t {
                            return Err(TargetError::new(
                                ErrorCode::Protocol,
                                format!(
                                    "the source made no progress for {} s (serve --timeout); giving up",
                                    t.as_secs()
                                ),
                            ));
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(WireError::Closed.into()),
            }
        }
    }
}

/// Serves one session on `reader`/`writer`. On failure an `Error` frame is
/// sent to the peer (best effort) before returning the error.
pub fn serve<R: Read + Send + 'static, W: Write + Send + 'static>(
    reader: R,
    writer: W,
    cfg: &ServeConfig,
) -> Result<ServeSummary, TargetError> {
    let rate = crate::bwlimit::Rate::default();
    let mut wr = FrameWriter::new(crate::bwlimit::Limited::new(writer, rate.clone()));
    // Our preamble goes first so a wrong peer learns at once what we are.
    wr.write_preamble()?;
    let mut rd = Inbox::spawn(reader, cfg);
    let hello = match rd.read()?.0 {
        Msg::Hello(h) => h,
        m => return Err(protocol(format!("expected Hello, got {:?}", m.kind()))),
    };
    // A source's --bwlimit is never below the floor: a lower one would
    // have the target sleep through its own timeout on every reply.
    match hello.bwlimit {
        Some(r) if r > 0 && r < crate::bwlimit::MIN_RATE => {
            return Err(protocol(format!(
                "the source asks for a bwlimit of {r} bytes/s, below the least of {} bytes/s",
                crate::bwlimit::MIN_RATE
            )))
        }
        r => rate.set(r.unwrap_or(0)),
    }
    let feats = hello.features & features::ALL;
    wr.send(
        &Msg::HelloAck(HelloAck {
            features: feats,
            software: crate::VERSION.into(),
        }),
        &[],
    )?;
    wr.flush()?;
    rd.sent.store(wr.bytes(), Ordering::SeqCst);
    rd.clock.touch();
    let open = match rd.read()?.0 {
        Msg::Open(o) => o,
        m => return Err(protocol(format!("expected Open, got {:?}", m.kind()))),
    };
    rd.clock.touch();
    match Session::open(open, hello.key, feats, cfg) {
        Ok((session, opened)) => {
            // The volume lock outlives the session: a failed
            // snapshot-protected apply is rolled back under it, so a new
            // session cannot race it.
            let rollback = matches!(session.applier, Applier::Snapshot { .. }).then(|| {
                (
                    session.paths.clone(),
                    PathBuf::from(&session.open.path),
                    session._lock.clone(),
                )
            });
            let result = session.run(rd, wr, opened, cfg);
            // The session and its handle on the volume are gone: roll a
            // failed snapshot-protected apply back now.
            if let (Err(_), Some((paths, path, Some(lock)))) = (&result, rollback) {
                if let Err(e) = rollback_pending(&lock, &paths, &path) {
                    tracing::warn!("{e}");
                }
            }
            result
        }
        Err(e) => {
            let _ = send_error(&mut wr, &e);
            Err(e)
        }
    }
}

fn send_error<W: Write>(wr: &mut FrameWriter<W>, e: &TargetError) -> Result<(), WireError> {
    wr.send(
        &Msg::Error(RemoteError {
            code: e.code,
            message: e.message.clone(),
        }),
        &[],
    )?;
    wr.flush()
}

/// Lexically normalised absolute path; `..` is refused outright.
fn checked_path(p: &str) -> Result<PathBuf, TargetError> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(TargetError::new(
            ErrorCode::Usage,
            format!("target path {p:?} must be absolute"),
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(TargetError::new(
            ErrorCode::NotAllowed,
            format!("target path {p:?} contains '..'"),
        ));
    }
    Ok(path.components().collect())
}

/// Whether the name the peer gave matches the allow-list. What the name
/// resolves to is checked when it is opened, once ([`snapshot::locate`]):
/// no symlinked directories, and a final symlink only when root owns it and
/// it points at a block device (LVM's `/dev/VG/LV` names).
fn allowed(cfg: &ServeConfig, path: &Path) -> bool {
    let opts = glob::MatchOptions {
        require_literal_separator: true,
        ..Default::default()
    };
    cfg.allow
        .iter()
        .any(|pat| pat.matches_path_with(path, opts))
}

/// Shared state of a session's threads.
struct Shared {
    volume: Arc<dyn Volume>,
    /// Size before this session: bytes past it read as zeros.
    old_size: u64,
    new_size: u64,
    block: BlockSize,
    signer: Signer,
    credit: Mutex<u64>,
    credit_cv: Condvar,
    /// Bytes read outside the scan (refinements, copies).
    bytes_read: AtomicU64,
    /// Bytes the scan read.
    scan_bytes: AtomicU64,
    /// Blocks the scan hashed, bytes journaled and bytes applied: the
    /// counters our heartbeats carry.
    hashed: AtomicU64,
    journal_bytes: AtomicU64,
    applied: AtomicU64,
    cancel: Cancel,
}

impl Shared {
    /// A session's shared half, its credit at `start_block`.
    pub(super) fn new(
        volume: Arc<dyn Volume>,
        old_size: u64,
        new_size: u64,
        block: BlockSize,
        key: HashKey,
        start_block: u64,
    ) -> Self {
        Shared {
            volume,
            old_size,
            new_size,
            block,
            signer: Signer::new(key),
            credit: Mutex::new(start_block),
            credit_cv: Condvar::new(),
            bytes_read: AtomicU64::new(0),
            scan_bytes: AtomicU64::new(0),
            hashed: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            cancel: Cancel::new(),
        }
    }

    /// Reads `buf.len()` bytes at `offset` as the volume will be after
    /// growing: zeros past the old end, holes not read at all. Returns
    /// whether the whole range is known to be zero without reading.
    fn read_virtual(&self, buf: &mut [u8], offset: u64) -> Result<bool, VolumeError> {
        let end = offset + buf.len() as u64;
        let real_end = end.min(self.old_size);
        if offset >= real_end || self.volume.next_data(offset).is_none_or(|d| d >= real_end) {
            return Ok(true);
        }
        let n = (real_end - offset) as usize;
        self.volume.read_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(false)
    }

    /// Whether `block` is inside the credit window now.
    fn has_credit(&self, block: u64) -> bool {
        block
            < self
                .credit
                .lock()
                .expect("credit lock")
                .saturating_add(WINDOW_BLOCKS)
    }

    fn wait_credit(&self, block: u64) -> bool {
        let mut c = self.credit.lock().expect("credit lock");
        while block >= c.saturating_add(WINDOW_BLOCKS) {
            if self.cancel.is_cancelled() {
                return false;
            }
            c = self
                .credit_cv
                .wait_timeout(c, Duration::from_millis(200))
                .expect("credit lock")
                .0;
        }
        !self.cancel.is_cancelled()
    }
}

/// How ops reach the volume.
enum Applier {
    DryRun,
    /// Ops go to the write-ahead journal, applied on commit.
    Journal(Box<Journal>),
    /// Ops go straight to the volume; the replica is inconsistent until
    /// commit and a durable progress mark allows resuming.
    InPlace {
        last_mark: Instant,
        dirty: u64,
    },
    /// A thin-LV replica: snapshot it before the first write (the rollback
    /// point), write in place, drop the snapshot on commit.
    Snapshot {
        origin: LvName,
        taken: bool,
    },
}

struct Session {
    shared: Arc<Shared>,
    paths: StatePaths,
    state: VolumeState,
    open: Open,
    features: u32,
    start_block: u64,
    mode: Mode,
    next_generation: Generation,
    _lock: Option<Arc<VolumeLock>>,
    applier: Applier,
    bytes_written: u64,
    /// Bytes written in place since free space was last looked at, and
    /// what it was then.
    unchecked_room: u64,
    last_free: Option<u64>,
    recovered: Option<String>,
    /// An `rbd:` target: its state is image-meta, its generations snapshots.
    rbd: Option<Box<rbd_target::Replica>>,
}

impl Session {
    fn open(
        open: Open,
        key: HashKey,
        feats: u32,
        cfg: &ServeConfig,
    ) -> Result<(Self, Opened), TargetError> {
        if rbd::RbdSpec::is_rbd(&open.path) {
            return rbd_target::open(open, key, feats, cfg);
        }
        let path = checked_path(&open.path)?;
        if !allowed(cfg, &path) {
            return Err(TargetError::new(
                ErrorCode::NotAllowed,
                format!(
                    "target {} is not on this server's --allow list",
                    path.display()
                ),
            ));
        }
        let io = |e: anyhow::Error| TargetError::new(ErrorCode::TargetIo, format!("{e:#}"));
        // A rollback cut short is settled before anything looks at the
        // volume, for a dry run or a verify too (as a journal is, below).
        let finished = finish_cut_rollback(&cfg.state_dir, &path)?;
        // Resolve the name once; its type is checked on the O_PATH
        // descriptor before anything opens it (a FIFO, a char device or a
        // socket is refused here, also for a dry run or a verify).
        let located = snapshot::locate(&path).map_err(volume_err)?;
        let mut notices: Vec<String> = Vec::new();
        let dir_ok = match state::ensure_dir(&cfg.state_dir) {
            Ok(n) => {
                notices.extend(n);
                true
            }
            Err(e) if open.dry_run && e.downcast_ref::<state::UnsafeStateDir>().is_none() => {
                tracing::debug!("no state directory for a dry run: {e:#}");
                false
            }
            Err(e) => return Err(io(e)),
        };
        let sys = snapshot::identity::sys_root();
        let (mut resolved, mut created, mut identity) = match located {
            snapshot::Located::Existing(r) => {
                let id = r.identity(&sys).map_err(volume_err)?;
                (Some(r), None, id)
            }
            snapshot::Located::Missing(m) if open.dry_run => (
                None,
                None,
                snapshot::VolumeIdentity {
                    kind: snapshot::identity::IdKind::File,
                    key: format!("new:{}", m.path().display()),
                    strong: false,
                },
            ),
            snapshot::Located::Missing(m) => {
                // A peer's name never creates anything under /dev: device
                // targets must exist, and /dev's file systems (devtmpfs,
                // /dev/shm) are memory.
                if path.starts_with("/dev") || m.dir_on_filesystem_of(Path::new("/dev")) {
                    return Err(TargetError::new(
                        ErrorCode::NotAllowed,
                        format!(
                            "target {} does not exist and is not created: a block device target must already exist, and no file is created under /dev",
                            path.display()
                        ),
                    ));
                }
                // O_CREAT|O_EXCL|O_NOFOLLOW in the checked directory, 0600.
                let (v, id) = m.create().map_err(volume_err)?;
                (None, Some(v), id)
            }
        };
        let mut paths = StatePaths::for_identity(&cfg.state_dir, &identity);
        let missing_dry = resolved.is_none() && created.is_none();
        let mut lock = if missing_dry || !dir_ok {
            None
        } else {
            match VolumeLock::acquire(&paths.lock) {
                Ok(l) => Some(Arc::new(l)),
                Err(e) if e.downcast_ref::<state::Busy>().is_some() => {
                    return Err(TargetError::new(
                        ErrorCode::Busy,
                        format!("target {}: {e:#}", path.display()),
                    ))
                }
                Err(e) if open.dry_run => {
                    tracing::debug!("no lock for a dry run: {e:#}");
                    None
                }
                Err(e) => return Err(io(e)),
            }
        };
        // Like a journal, an interrupted snapshot-protected apply is
        // settled before anything (a verify too) looks at the volume, and
        // under the lock. The restored volume is another LV: the state
        // moves to its identity, and the name is resolved again.
        let mut recovered = finished;
        if let Some(l) = &lock {
            if let Some(rb) = rollback_pending(l, &paths, &path)? {
                recovered = Some(rb.what);
                if let Some((new_paths, new_lock)) = rb.rebound {
                    paths = new_paths;
                    lock = Some(Arc::new(new_lock));
                }
                if let snapshot::Located::Existing(r) =
                    snapshot::locate(&path).map_err(volume_err)?
                {
                    identity = r.identity(&sys).map_err(volume_err)?;
                    resolved = Some(r);
                    created = None;
                }
            }
        }
        // The LV snapshotted is the one opened, by its identity.
        let thin_origin = if open.target_snapshot && !open.dry_run && open.mode != Mode::Verify {
            let device = resolved.as_ref().and_then(|r| r.device());
            Some(thin_target(&Lvm::new(), &path, &identity, device, &sys)?)
        } else {
            None
        };
        let id = identity.id();
        if !identity.strong && !missing_dry {
            notices.push(format!(
                "the identity of {} is weak ({identity}): it may be another volume than the one last replicated, so it never gets a delta",
                path.display()
            ));
        }
        // Old path-keyed state cannot be trusted: it is named after a path
        // whose volume may have been replaced. Ignored (a full scan
        // follows); an old sealed journal may still be applied below.
        let legacy = StatePaths::new(&cfg.state_dir, &path);
        let writes = lock.is_some() && !open.dry_run;
        if lock.is_some() && legacy.state.exists() {
            if writes {
                let to = state::set_aside(&legacy.state).map_err(io)?;
                notices.push(format!(
                    "ignored state of an older version kept by path (moved to {}); a full scan follows",
                    to.display()
                ));
            } else {
                notices.push("ignoring state of an older version kept by path".into());
            }
        }
        if writes {
            let _ = std::fs::remove_file(&legacy.lock);
            // States of other volumes once at this name: that volume is
            // gone from here, so they are set aside, never applied here.
            for other in state::others_at_path(&cfg.state_dir, &path, &id) {
                let theirs = StatePaths::of_state_file(&other);
                let Ok(_their_lock) = VolumeLock::acquire(&theirs.lock) else {
                    continue;
                };
                if theirs.journal.exists() {
                    let _ = std::fs::remove_file(&theirs.journal);
                    notices.push(format!(
                        "discarded the journal of a volume no longer at {}",
                        path.display()
                    ));
                }
                let to = state::set_aside(&other).map_err(io)?;
                notices.push(format!(
                    "{} is a new volume ({identity}); the state of the volume that was there moved to {}",
                    path.display(),
                    to.display()
                ));
            }
        }
        // A journal left by a crash must be settled before anything looks
        // at the volume, even a dry run or a verify: they too must see a
        // complete generation.
        let pending_journal = lock.is_some() && (paths.journal.exists() || legacy.journal.exists());
        let volume: Arc<dyn Volume> = match (created, &resolved) {
            (Some(mut v), _) => {
                v.advise_sequential(false);
                Arc::new(v)
            }
            (None, Some(r)) => {
                let write = !open.dry_run || pending_journal;
                // Exclusive (O_EXCL) for a block device we write: a mounted
                // or otherwise held device is refused, naming the holder.
                let mut v = r.open(write, write).map_err(volume_err)?;
                // Sequential readahead for the scan. No drop-behind: refining a
                // block re-reads it soon after the scan passed it.
                v.advise_sequential(false);
                Arc::new(v)
            }
            (None, None) => Arc::new(snapshot::MemVolume::new(&open.path, Vec::new(), true)),
        };
        let mut state = state::load(&paths.state).map_err(io)?;
        if state.identity.as_deref().is_some_and(|i| i != id) {
            // Same file name, other volume (a hash collision or a copied
            // state dir): never trust it.
            state = VolumeState::default();
            if writes {
                let to = state::set_aside(&paths.state).map_err(io)?;
                notices.push(format!(
                    "state recorded for another volume moved to {}",
                    to.display()
                ));
            }
        }
        state.format = state::STATE_FORMAT;
        state.identity = Some(id.clone());
        state.path = Some(path.to_string_lossy().into_owned());

        // A complete journal is replayed (the replica becomes generation
        // n), an incomplete one discarded (it stays n-1).
        if lock.is_some() && recovered.is_none() {
            recovered = journal::recover(&paths, &mut state, volume.as_ref()).map_err(io)?;
        }
        if lock.is_some() && legacy.journal.exists() {
            if let Some(what) =
                journal::recover_legacy(&legacy.journal, volume.as_ref()).map_err(io)?
            {
                notices.push(what);
            }
        }
        if !notices.is_empty() {
            for n in &notices {
                tracing::warn!("{}: {n}", path.display());
            }
            let mut all = recovered.into_iter().collect::<Vec<_>>();
            all.extend(notices);
            recovered = Some(all.join("; "));
        }

        if let Some(theirs) = &state.source_id {
            if *theirs != open.source_id && !open.force {
                return Err(TargetError::new(
                    ErrorCode::Mismatch,
                    format!(
                        "target {} is a replica of {theirs}, not of {}; pass --force to overwrite it",
                        path.display(),
                        open.source_id
                    ),
                ));
            }
        }
        let old_size = volume.size();
        let new_size = open.source_size;
        if new_size > old_size && !volume.resizable() {
            return Err(volume_err(VolumeError::TooSmall {
                path: path.clone(),
                have: old_size,
                need: new_size,
            }));
        }
        let block = open.block_size;
        let same_source = state.source_id.as_deref() == Some(open.source_id.as_str());

        // A weak identity may be another volume than the one the state was
        // recorded for: never a blind delta onto it, never a map vouched.
        let file = identity.kind == snapshot::identity::IdKind::File;
        let Usable {
            mode,
            unvouched,
            start_block,
        } = usable(&open, &state, identity.strong, new_size, || {
            vouch(&open, &state, &identity, &id, file, &path)
        });
        let number = state.generation.as_ref().map_or(0, |g| g.number) + 1;
        let next_generation = Generation {
            number,
            snapshot: open.target_generation.snapshot.clone(),
        };

        let applier = if open.dry_run || mode == Mode::Verify {
            Applier::DryRun
        } else if let Some(origin) = thin_origin.filter(|_| state.consistent && start_block == 0) {
            // A consistent replica is protected whatever it replicates: a
            // forced copy from another source that fails rolls back to it.
            Applier::Snapshot {
                origin,
                taken: false,
            }
        } else if start_block > 0 || !state.consistent || !same_source || open.journal_max == 0 {
            // Nothing consistent to protect (first copy, resumed copy, or an
            // already torn replica): write in place, with progress marks.
            Applier::InPlace {
                last_mark: Instant::now(),
                dirty: 0,
            }
        } else {
            Applier::Journal(Box::new(
                Journal::create(&paths.journal, open.journal_max)
                    .map_err(|e| TargetError::new(ErrorCode::TargetIo, format!("{e:#}")))?,
            ))
        };

        if !matches!(applier, Applier::DryRun) {
            // Long runs of data (a first copy, a large changed region) are
            // written around the page cache: see `snapshot::direct`.
            volume.write_runs_direct();
        }
        let opened = Opened {
            target_size: old_size,
            state: ReplicaState {
                source_id: state.source_id.clone(),
                generation: state.generation.clone().filter(|_| state.consistent),
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
            resizable: volume.resizable(),
            target_identity: id,
            target_strong: identity.strong,
            unvouched,
        };
        let volume = if mode == Mode::FullScan {
            let device = resolved.as_ref().and_then(|r| r.device());
            // The pool's metadata is taken now: the session holds the
            // volume's lock and writes only blocks its scan has passed. A
            // busy pool (a source on it, on this host) is not waited for.
            crate::cbt::mapped_if_thin(volume, &identity, device, &sys, Duration::ZERO)
        } else {
            volume
        };
        let shared = Arc::new(Shared::new(
            volume,
            old_size,
            new_size,
            block,
            key,
            start_block,
        ));
        let session = Session {
            shared,
            paths,
            state,
            open,
            features: feats,
            start_block,
            mode,
            next_generation,
            _lock: lock,
            applier,
            bytes_written: 0,
            unchecked_room: 0,
            last_free: None,
            recovered,
            rbd: None,
        };
        Ok((session, opened))
    }

    fn run<W: Write + Send + 'static>(
        mut self,
        mut rd: Inbox,
        mut wr: FrameWriter<W>,
        opened: Opened,
        cfg: &ServeConfig,
    ) -> Result<ServeSummary, TargetError> {
        if let Applier::Journal(j) = &mut self.applier {
            j.limit(cfg.journal_max);
        }
        if let Err(e) = self.check_fits().and_then(|()| self.check_room()) {
            let _ = send_error(&mut wr, &e);
            self.abort();
            return Err(e);
        }
        rd.sent
            .store(wr.bytes() + FRAME_SLACK as u64, Ordering::SeqCst);
        wr.send(&Msg::Opened(opened), &[])?;
        wr.flush()?;
        let (out_tx, out_rx) = bounded::<Out>(64);
        let sent = rd.sent.clone();
        let writer = thread::Builder::new()
            .name("serve-writer".into())
            .spawn(move || write_loop(wr, out_rx, &sent))
            .expect("spawn writer");
        let shared = self.shared.clone();
        rd.shared = Some(shared.clone());

        let scanner = (!matches!(self.mode, Mode::Delta | Mode::Mapped)).then(|| {
            let (s, tx, start) = (shared.clone(), out_tx.clone(), self.start_block);
            thread::Builder::new()
                .name("serve-scan".into())
                .spawn(move || report_failure(scan_loop(&s, &tx, start), &tx))
                .expect("spawn")
        });
        // An honest source has at most MAX_PENDING_REFINES unanswered.
        let (refine_tx, refine_rx) = bounded::<u64>(MAX_PENDING_REFINES);
        let refiner = {
            let (s, tx) = (shared.clone(), out_tx.clone());
            thread::Builder::new()
                .name("serve-refine".into())
                .spawn(move || report_failure(refine_loop(&s, &tx, refine_rx), &tx))
                .expect("spawn")
        };
        // Dropping `beat_stop` ends the heartbeat thread at once.
        let (beat_stop, stop) = bounded::<()>(0);
        let beat = {
            let (s, tx, received) = (shared.clone(), out_tx.clone(), rd.bytes.clone());
            thread::Builder::new()
                .name("serve-heartbeat".into())
                .spawn(move || heartbeat_loop(&s, &tx, &stop, &received))
                .expect("spawn")
        };

        let result = self.receive(&mut rd, &refine_tx);
        drop(refine_tx);
        shared.cancel.cancel();
        shared.credit_cv.notify_all();
        let scan_result = scanner
            .map(|h| h.join().expect("scanner panicked"))
            .unwrap_or(Ok(()));
        let refine_result = refiner.join().expect("refiner panicked");
        let result = result.and_then(|f| {
            scan_result?;
            refine_result?;
            Ok(f)
        });
        // Heartbeats go on through a long apply and fsync.
        let outcome = match result {
            Ok(()) => self.commit(),
            Err(e) => Err(e),
        };
        drop(beat_stop);
        let _ = beat.join();
        match outcome {
            Ok(committed) => {
                let _ = out_tx.send(Out::Frame(Msg::Committed(committed.clone()), Vec::new()));
                drop(out_tx);
                writer.join().expect("writer panicked")?;
                Ok(ServeSummary {
                    path: self.open.path.clone(),
                    committed,
                })
            }
            Err(e) => {
                self.abort();
                let msg = Msg::Error(RemoteError {
                    code: e.code,
                    message: e.message.clone(),
                });
                // Behind what is queued (digests may fill the queue), but
                // never waiting long: the source may not read.
                let deadline = Instant::now() + Duration::from_secs(2);
                let _ = out_tx.send_deadline(Out::Frame(msg, Vec::new()), deadline);
                drop(out_tx);
                while !writer.is_finished() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e)
            }
        }
    }

    /// Before an in-place copy into a file (a first copy, a resumed one, a
    /// torn replica): its file system must have room for what the copy
    /// may still allocate, plus [`FREE_MARGIN`]. Sparse-aware on both
    /// sides: at most the source's data (when the source can tell), and
    /// only where the file has holes now. Nothing was written yet, so a
    /// refused copy stays resumable from its last mark.
    fn check_room(&self) -> Result<(), TargetError> {
        if !matches!(self.applier, Applier::InPlace { .. }) {
            return Ok(());
        }
        let v = self.shared.volume.as_ref();
        let Some(free) = v.free_space() else {
            return Ok(());
        };
        let size = self.shared.new_size;
        let from = self
            .start_block
            .saturating_mul(self.shared.block.bytes() as u64)
            .min(size);
        let holes = (size - from).saturating_sub(v.data_bytes_in(from, size).unwrap_or(0));
        // Unknown source data: the margin alone here; the copy watches the
        // free space as it writes (see `watch_room`). Nothing to allocate
        // (no holes, or no data for them): no margin needed either.
        let need = self
            .open
            .source_data_bytes
            .map_or(holes.min(1), |d| d.min(holes));
        if need > 0 && free < need.saturating_add(FREE_MARGIN) {
            return Err(TargetError::new(
                ErrorCode::TargetIo,
                format!(
                    "the file system of target {} has {free} bytes free; this copy may allocate {need} more, plus a margin of {FREE_MARGIN}; make room and run again (an interrupted copy resumes where it stopped)",
                    self.open.path
                ),
            ));
        }
        Ok(())
    }

    /// While writing in place: stop before the file system of a file
    /// target runs out (below half the margin while our writes take
    /// space), rather than fill it for everything else on it. The copy
    /// keeps its last mark (resumable).
    fn watch_room(&mut self, written: u64) -> Result<(), TargetError> {
        self.unchecked_room += written;
        if self.unchecked_room < FREE_MARGIN / 4 {
            return Ok(());
        }
        self.unchecked_room = 0;
        let free = self.shared.volume.free_space();
        let shrinking = matches!((free, self.last_free), (Some(f), Some(l)) if f < l);
        self.last_free = free;
        match free {
            Some(free) if shrinking && free < FREE_MARGIN / 2 => Err(TargetError::new(
                ErrorCode::TargetIo,
                format!(
                    "the file system of target {} is down to {free} bytes free; stopped before filling it; make room and run again (the copy resumes from its last mark)",
                    self.open.path
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Before sealing: a file target's file system must have room for the
    /// journal's data plus a margin (a full one would fail the apply).
    fn check_free_space(&self, data_bytes: u64) -> Result<(), TargetError> {
        let Some(free) = self.shared.volume.free_space() else {
            return Ok(());
        };
        let need = data_bytes.saturating_add(FREE_MARGIN);
        if free < need {
            return Err(TargetError::new(
                ErrorCode::TargetIo,
                format!(
                    "the file system of target {} has {free} bytes free, the delta needs {need} (with a margin); the replica stays at its previous generation",
                    self.open.path
                ),
            ));
        }
        Ok(())
    }

    /// Before anything is written: a file target must be able to reach the
    /// source's size on its file system. Probed without touching the file
    /// (a crash must never leave it resized): seeking past the file
    /// system's largest file size fails (EINVAL).
    fn check_fits(&self) -> Result<(), TargetError> {
        use std::io::{Seek, SeekFrom};
        let v = &self.shared.volume;
        let new = self.shared.new_size;
        if matches!(self.applier, Applier::DryRun)
            || !v.resizable()
            || new <= v.size()
            || self.rbd.is_some()
        {
            return Ok(());
        }
        let probe = std::fs::File::open(&self.open.path)
            .and_then(|mut f| f.seek(SeekFrom::Start(new)).map(|_| ()));
        probe.map_err(|e| {
            TargetError::new(
                ErrorCode::TargetIo,
                format!(
                    "the file system of target {} cannot hold a file of {new} bytes (the source's size): {e}",
                    self.open.path
                ),
            )
        })
    }

    /// Reads frames until `Finish`, applying ops as they come. Ops must come
    /// in strictly increasing offset order, refinements in increasing block
    /// order: a session writes each byte at most once and its frames are
    /// bounded by the volume's size.
    fn receive(&mut self, rd: &mut Inbox, refine_tx: &Sender<u64>) -> Result<(), TargetError> {
        let total_blocks = self.shared.block.blocks_in(self.shared.new_size);
        let mut scratch = Vec::new();
        let mut zstd: Option<wire::Decompressor> = None;
        let mut next_offset = 0u64;
        let mut next_refine = 0u64;
        let mut credit = self.start_block;
        loop {
            let (msg, payload) = rd.read()?;
            let payload = &payload[..];
            // Only what moves the session on counts as progress.
            let mut progress = true;
            if let Some((offset, len)) = match &msg {
                Msg::Data(d) => Some((d.offset, d.len as u64)),
                Msg::Zero(z) => Some((z.offset, z.len)),
                Msg::Copy(c) => Some((c.to, c.len)),
                _ => None,
            } {
                if len == 0 || offset < next_offset {
                    return Err(protocol(format!(
                        "{:?} op at offset {offset} ({len} bytes): ops must be non-empty and in increasing offset order (next allowed: {next_offset})",
                        msg.kind()
                    )));
                }
                self.check_extent(offset, len)?;
                next_offset = offset + len;
            }
            match msg {
                Msg::Credit(c) => {
                    if c.through > total_blocks {
                        return Err(protocol(format!(
                            "credit past the last block ({} > {total_blocks})",
                            c.through
                        )));
                    }
                    progress = c.through > credit;
                    credit = credit.max(c.through);
                    {
                        let mut cur = self.shared.credit.lock().expect("credit lock");
                        *cur = (*cur).max(c.through);
                    }
                    self.shared.credit_cv.notify_all();
                    self.checkpoint(c.through)?;
                }
                Msg::Refine(r) => {
                    if self.mode == Mode::Delta || r.block >= total_blocks || r.block < next_refine
                    {
                        return Err(protocol(format!(
                            "refine of block {} is out of range or order",
                            r.block
                        )));
                    }
                    next_refine = r.block + 1;
                    if refine_tx.try_send(r.block).is_err() {
                        return Err(protocol(format!(
                            "more than {MAX_PENDING_REFINES} refinements asked for and not read"
                        )));
                    }
                }
                Msg::Data(d) => {
                    if d.len > self.shared.block.bytes() {
                        return Err(protocol(format!(
                            "data op of {} bytes exceeds the block size",
                            d.len
                        )));
                    }
                    let data = match d.codec {
                        Codec::Raw if payload.len() == d.len as usize => payload,
                        Codec::Raw => {
                            return Err(protocol("data payload length does not match its header"))
                        }
                        Codec::Zstd if self.features & features::ZSTD != 0 => {
                            let z = match &mut zstd {
                                Some(z) => z,
                                None => zstd.insert(wire::Decompressor::new()?),
                            };
                            z.decompress(payload, d.len as usize, &mut scratch)?;
                            &scratch[..]
                        }
                        Codec::Zstd => {
                            return Err(protocol("zstd data frame without negotiating zstd"))
                        }
                    };
                    self.apply(Op::Data(d.offset, data))?;
                }
                Msg::Zero(z) => {
                    self.apply(Op::Zero(z.offset, z.len))?;
                }
                Msg::Copy(c) => {
                    self.check_extent(c.from, c.len)?;
                    if c.len > self.shared.block.bytes() as u64 {
                        return Err(protocol("copy op larger than a block"));
                    }
                    let mut buf = vec![0u8; c.len as usize];
                    self.shared
                        .read_virtual(&mut buf, c.from)
                        .map_err(volume_err)?;
                    self.apply(Op::Data(c.to, &buf))?;
                }
                Msg::Finish(f) => {
                    let expect = total_blocks - self.start_block;
                    if self.mode != Mode::Delta && f.blocks != expect {
                        return Err(protocol(format!(
                            "source compared {} blocks, expected {expect}",
                            f.blocks
                        )));
                    }
                    return Ok(());
                }
                m => return Err(protocol(format!("unexpected {:?} frame", m.kind()))),
            }
            if progress {
                rd.clock.touch();
            }
        }
    }

    fn check_extent(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.shared.new_size => Ok(()),
            _ => Err(protocol(format!(
                "op at offset {offset} ({len} bytes) lies outside the volume of {} bytes",
                self.shared.new_size
            ))),
        }
    }

    fn apply(&mut self, op: Op<'_>) -> Result<(), TargetError> {
        let len = match op {
            Op::Data(_, d) => d.len() as u64,
            Op::Zero(_, l) => l,
        };
        match &mut self.applier {
            Applier::DryRun => return Ok(()),
            Applier::Journal(j) => {
                let spilled = match op {
                    Op::Data(o, d) => j.append_data(o, d),
                    Op::Zero(o, l) => j.append_zero(o, l),
                }
                .map_err(|e| TargetError::new(ErrorCode::TargetIo, format!("{e:#}")))?;
                self.shared
                    .journal_bytes
                    .store(j.bytes(), Ordering::Relaxed);
                if !spilled {
                    return Ok(());
                }
                // The delta outgrew the journal budget: apply what is in the
                // journal in place and go on in place (resumable), rather
                // than fail a large but valid delta.
                tracing::info!("delta exceeds --journal-max; applying in place from here on");
                self.begin_in_place(self.start_block)?;
                let Applier::Journal(j) = std::mem::replace(
                    &mut self.applier,
                    Applier::InPlace {
                        last_mark: Instant::now(),
                        dirty: 0,
                    },
                ) else {
                    unreachable!()
                };
                self.bytes_written += j
                    .apply_and_discard(self.shared.volume.as_ref())
                    .map_err(|e| TargetError::new(ErrorCode::TargetIo, format!("{e:#}")))?;
                return self.apply(op);
            }
            Applier::InPlace { dirty, .. } => {
                *dirty += len;
                if self.state.in_progress.is_none() {
                    self.begin_in_place(self.start_block)?;
                }
                if matches!(op, Op::Data(..)) {
                    self.watch_room(len)?;
                }
            }
            Applier::Snapshot { origin, taken } => {
                if !*taken {
                    let origin = origin.clone();
                    *taken = true;
                    self.take_rollback_snapshot(&origin)?;
                }
            }
        }
        self.grow()?;
        let v = self.shared.volume.as_ref();
        match op {
            Op::Data(o, d) => v.write_at(d, o).map_err(volume_err)?,
            Op::Zero(o, l) => v.zero(o, l).map_err(volume_err)?,
        }
        self.bytes_written += len;
        self.shared.applied.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn grow(&self) -> Result<(), TargetError> {
        let v = &self.shared.volume;
        if v.size() < self.shared.new_size {
            v.set_size(self.shared.new_size).map_err(volume_err)?;
        }
        Ok(())
    }

    /// Marks the replica inconsistent, durably, before its first in-place write.
    fn begin_in_place(&mut self, mark_block: u64) -> Result<(), TargetError> {
        self.state.consistent = false;
        self.state.source_id = Some(self.open.source_id.clone());
        self.state.in_progress = Some(InProgress {
            generation: self.next_generation.clone(),
            source_id: self.open.source_id.clone(),
            block_size: self.shared.block.bytes(),
            mark_block,
        });
        if self.rbd.is_some() {
            // Its snapshot existing after a crash means it committed.
            self.state.applying = Some(self.next_generation.clone());
        }
        self.save_state()
    }

    /// Snapshots the thin target before its first in-place write and
    /// records it durably: from here a failure rolls back to it.
    fn take_rollback_snapshot(&mut self, origin: &LvName) -> Result<(), TargetError> {
        let name = format!("{}{ROLLBACK_SUFFIX}", origin.lv());
        let lvm = Lvm::new();
        // The state records no rollback (the open settled any it did): a
        // snapshot of this name was made by a session killed before it
        // recorded it, and the replica was not written after it.
        let stale = lvm
            .remove_unrecorded_snapshot(origin, &name, "snapsync-rollback")
            .map_err(|e| {
                TargetError::new(
                    ErrorCode::TargetIo,
                    format!("clearing the way for the rollback snapshot of {origin}: {e}"),
                )
            })?;
        if stale {
            tracing::warn!(
                "{origin}: removed {name}, left unrecorded by a session killed while taking it"
            );
        }
        let snap = lvm
            .create_thin_snapshot(origin, &name, &["snapsync", "snapsync-rollback"])
            .map_err(|e| {
                TargetError::new(
                    ErrorCode::TargetIo,
                    format!("snapshotting target {origin}: {e}"),
                )
            })?;
        self.state.rollback = Some(snap.lv_name().to_string());
        self.state.rollback_uuid = snap.uuid.clone();
        self.state.consistent = false;
        self.save_state()
    }

    fn save_state(&self) -> Result<(), TargetError> {
        if let Some(r) = &self.rbd {
            return r.save(&self.state);
        }
        state::save(&self.paths.state, &self.state)
            .map_err(|e| TargetError::new(ErrorCode::TargetIo, format!("{e:#}")))
    }

    /// Every op for blocks below `through` has been received: for an
    /// in-place apply, make that durable now and then, so a rerun resumes.
    fn checkpoint(&mut self, through: u64) -> Result<(), TargetError> {
        const MARK_EVERY: Duration = Duration::from_secs(5);
        if let Applier::InPlace { last_mark, dirty } = &mut self.applier {
            if self.state.in_progress.is_none()
                || (*dirty < mark_bytes() && last_mark.elapsed() < MARK_EVERY)
            {
                return Ok(());
            }
            *dirty = 0;
            *last_mark = Instant::now();
            self.shared.volume.sync().map_err(volume_err)?;
            if let Some(ip) = &mut self.state.in_progress {
                ip.mark_block = ip.mark_block.max(through);
            }
            self.save_state()?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<Committed, TargetError> {
        let dry = matches!(self.applier, Applier::DryRun);
        let mut journal_bytes = 0;
        let apply_mode = match std::mem::replace(&mut self.applier, Applier::DryRun) {
            Applier::DryRun if self.mode == Mode::Verify => "verify",
            Applier::DryRun => "dry-run",
            Applier::Journal(j) => {
                journal_bytes = j.bytes();
                // A journal the volume cannot take is never sealed: the
                // replica stays generation n-1.
                if let Err(e) = self.check_free_space(j.data_bytes()) {
                    if let Err(d) = j.discard() {
                        tracing::warn!("discarding the journal: {d:#}");
                    }
                    return Err(e);
                }
                // Sealing makes the journal complete and durable: from here
                // a crash replays it, so the volume ends at generation n.
                let sealed = j
                    .seal(
                        &self.next_generation,
                        &self.open.source_id,
                        self.shared.new_size,
                    )
                    .map_err(|e| TargetError::new(ErrorCode::TargetIo, format!("{e:#}")))?;
                // Durably: from here the volume may hold part of generation n.
                self.state.applying = Some(self.next_generation.clone());
                self.save_state()?;
                let applied =
                    sealed.apply_counting(self.shared.volume.as_ref(), &self.shared.applied);
                match applied {
                    Ok(n) => self.bytes_written += n,
                    Err(e) => {
                        // Never a wedge: the journal goes aside, the replica
                        // is marked inconsistent, the next session scans.
                        let gen = self.next_generation.clone();
                        let msg = journal::quarantine(&self.paths, &mut self.state, &gen, &e)
                            .unwrap_or_else(|q| {
                                format!("{e:#}; moving the journal aside failed too: {q:#}")
                            });
                        return Err(TargetError::new(ErrorCode::TargetIo, msg));
                    }
                }
                self.finish_generation()?;
                sealed
                    .remove()
                    .map_err(|e| TargetError::new(ErrorCode::TargetIo, format!("{e:#}")))?;
                "journal"
            }
            Applier::Snapshot { .. } => {
                self.grow()?;
                let snap = self.state.rollback.take();
                self.state.rollback_uuid = None;
                self.finish_generation()?;
                if let Some(snap) = snap {
                    // The generation is recorded: the rollback point goes.
                    // A failure here only leaves a snapshot that the next
                    // open removes.
                    if let Err(e) = LvName::parse(&snap)
                        .map_err(|e| e.to_string())
                        .and_then(|lv| Lvm::new().remove(&lv).map_err(|e| e.to_string()))
                    {
                        tracing::warn!("removing rollback snapshot {snap}: {e}");
                    }
                }
                "snapshot"
            }
            Applier::InPlace { .. } => {
                self.grow()?;
                self.finish_generation()?;
                if self.start_block > 0 {
                    "resumed"
                } else {
                    "in-place"
                }
            }
        };
        let generation = if dry {
            self.state.generation.clone()
        } else {
            Some(self.next_generation.clone())
        };
        Ok(Committed {
            target_bytes_read: self.shared.bytes_read.load(Ordering::Relaxed)
                + self.shared.scan_bytes.load(Ordering::Relaxed),
            target_bytes_written: self.bytes_written,
            journal_bytes,
            apply_mode: apply_mode.into(),
            state: ReplicaState {
                source_id: self.state.source_id.clone(),
                generation,
                consistent: self.state.consistent,
                resume: None,
                recovered: self.recovered.clone(),
            },
        })
    }

    /// The volume holds generation n: shrink a longer file, flush, record.
    fn finish_generation(&mut self) -> Result<(), TargetError> {
        let v = self.shared.volume.as_ref();
        if v.resizable() && v.size() > self.shared.new_size && self.rbd.is_none() {
            v.set_size(self.shared.new_size).map_err(volume_err)?;
        }
        v.sync().map_err(volume_err)?;
        // Stamped after the last write: any later write changes it.
        self.state.stamp = if v.resizable() {
            state::FileStamp::of(Path::new(&self.open.path)).ok()
        } else {
            None
        };
        if let Some(r) = &self.rbd {
            // The generation is complete once its snapshot exists.
            r.snapshot_generation(&self.next_generation, self.shared.new_size)?;
        }
        self.state.source_id = Some(self.open.source_id.clone());
        self.state.generation = Some(self.next_generation.clone());
        self.state.consistent = true;
        self.state.in_progress = None;
        self.state.applying = None;
        self.state.block_size = Some(self.shared.block.bytes());
        self.state.committed_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        self.save_state()?;
        if let Some(r) = &self.rbd {
            r.prune();
        }
        Ok(())
    }

    /// Session failed: an unsealed journal is thrown away (the replica is
    /// still generation n-1); an in-place copy keeps its last mark.
    fn abort(&mut self) {
        if let Applier::Journal(j) = std::mem::replace(&mut self.applier, Applier::DryRun) {
            if let Err(e) = j.discard() {
                tracing::warn!("discarding the journal: {e:#}");
            }
        }
    }
}

/// How a session may use the replica it opened.
pub(super) struct Usable {
    pub mode: Mode,
    /// Why a digest-map session became a full scan.
    pub unvouched: Option<String>,
    /// Where an interrupted in-place copy of the same snapshot resumes.
    pub start_block: u64,
}

/// The mode a session runs in on a replica in `state`: a delta only onto
/// a replica that holds exactly the base and whose identity is
/// `trusted`; a digest-map session only when `vouch` says the replica
/// holds the map's generation with nothing written since; otherwise a
/// full scan, which resumes an interrupted in-place copy of the very same
/// snapshot.
pub(super) fn usable(
    open: &Open,
    state: &VolumeState,
    trusted: bool,
    new_size: u64,
    vouch: impl FnOnce() -> Result<(), String>,
) -> Usable {
    let mut mode = open.mode;
    if mode == Mode::Delta && !(trusted && holds_base(open, state)) {
        mode = Mode::FullScan;
    }
    let mut unvouched = None;
    if mode == Mode::Mapped {
        if let Err(why) = vouch() {
            unvouched = Some(why);
            mode = Mode::FullScan;
        }
    }
    let block = open.block_size;
    let mut start_block = 0;
    if let Some(ip) = &state.in_progress {
        if open.resume
            && mode == Mode::FullScan
            && ip.source_id == open.source_id
            && ip.generation.snapshot == open.target_generation.snapshot
            && ip.block_size == block.bytes()
        {
            start_block = ip.mark_block.min(block.blocks_in(new_size));
        }
    }
    Usable {
        mode,
        unvouched,
        start_block,
    }
}

/// Whether the replica is a complete copy of exactly the generation the
/// source's session starts from (`open.base`), as its state says.
fn holds_base(open: &Open, state: &VolumeState) -> bool {
    state.source_id.as_deref() == Some(open.source_id.as_str())
        && state.consistent
        && open.base.is_some()
        && state.generation == open.base
}

/// Whether the source's digest map fits the replica: made against this
/// target volume (`id`), of the generation the replica holds.
pub(super) fn map_fits(open: &Open, state: &VolumeState, id: &str) -> Result<(), String> {
    if open.map_target.as_deref() != Some(id) {
        return Err(format!(
            "the map was made against another target volume ({}), this one is {id}",
            wire::escape(open.map_target.as_deref().unwrap_or("none"))
        ));
    }
    if !holds_base(open, state) {
        let same_source = state.source_id.as_deref() == Some(open.source_id.as_str());
        return Err(format!(
            "the map is of generation {}, the target holds {}",
            open.base.as_ref().map_or(0, |g| g.number),
            match (&state.generation, state.consistent && same_source) {
                (Some(g), true) => format!("generation {}", g.number),
                _ => "no complete generation of this source".into(),
            }
        ));
    }
    Ok(())
}

/// Whether this target vouches for the map's generation: a strong
/// identity, the map fits, and for a file nothing wrote it since its
/// commit as far as (inode, size, mtime, ctime) tell.
fn vouch(
    open: &Open,
    state: &VolumeState,
    identity: &snapshot::VolumeIdentity,
    id: &str,
    file: bool,
    path: &Path,
) -> Result<(), String> {
    if !identity.strong {
        return Err(format!(
            "the target's identity is weak ({identity}): it is never vouched for"
        ));
    }
    map_fits(open, state, id)?;
    if file {
        // A block device: nothing cheap tells whether something wrote it;
        // trusted like changed-block tracking, the scrub is the net.
        let now = state::FileStamp::of(path).ok();
        match state.stamp {
            None => return Err("no record of the replica file at its commit".into()),
            Some(s) if Some(s) != now => {
                return Err(
                    "the replica file changed since its commit (inode, size, mtime or ctime)"
                        .into(),
                )
            }
            Some(_) => {}
        }
    }
    Ok(())
}

enum Op<'a> {
    Data(u64, &'a [u8]),
    Zero(u64, u64),
}

/// The thin LV that was opened, for `--target-snapshot`: named by the
/// opened device's dm name (sysfs of its device number, not the path the
/// peer gave) and checked against the opened volume's identity (its dm
/// UUID), so an LV replaced at the same name is never the one
/// snapshotted.
fn thin_target(
    lvm: &Lvm,
    path: &Path,
    identity: &snapshot::VolumeIdentity,
    device: Option<(u32, u32)>,
    sys: &Path,
) -> Result<LvName, TargetError> {
    let usage = |why: String| {
        TargetError::new(
            ErrorCode::Usage,
            format!(
                "--target-snapshot needs a thin LVM volume as target; {}: {why}",
                path.display()
            ),
        )
    };
    let info = match crate::cbt::lv_opened(lvm, identity, device, sys) {
        Ok(info) => info,
        Err(crate::cbt::LvOpened::Replaced { lv, uuid }) => {
            return Err(TargetError::new(
                ErrorCode::TargetIo,
                format!(
                    "target {}: the LV {lv} is no longer the volume opened (dm UUID {}, the LV's {}); it was replaced meanwhile, run again",
                    path.display(),
                    identity.key,
                    uuid.as_deref().unwrap_or("unknown")
                ),
            ))
        }
        Err(crate::cbt::LvOpened::Not(why)) => return Err(usage(why)),
    };
    if !info.is_thin() {
        return Err(usage("not a thin logical volume".into()));
    }
    Ok(info.lv_name())
}

/// A rollback cut short between its lvm steps (a crash, a power cut) can
/// leave the volume at `path` gone or renamed from the snapshot (another
/// identity): its state is then no longer found by the volume's identity.
/// It is found by the path it records, and the rollback finished under its
/// lock before the volume is looked up. Returns what was done.
fn finish_cut_rollback(state_dir: &Path, path: &Path) -> Result<Option<String>, TargetError> {
    let mut pending = state::at_path(state_dir, path)
        .into_iter()
        .filter(|(_, s)| s.rollback.is_some())
        .peekable();
    if pending.peek().is_none() {
        return Ok(None);
    }
    let here = match snapshot::locate(path) {
        Ok(snapshot::Located::Existing(r)) => r
            .identity(&snapshot::identity::sys_root())
            .ok()
            .map(|i| i.id()),
        _ => None,
    };
    for (file, st) in pending {
        if here.is_some() && st.identity == here {
            // Not cut: the open settles it the usual way.
            continue;
        }
        let paths = StatePaths::of_state_file(&file);
        let lock = VolumeLock::acquire(&paths.lock)
            .map_err(|e| TargetError::new(ErrorCode::Busy, format!("{}: {e:#}", path.display())))?;
        match rollback_pending(&lock, &paths, path) {
            Ok(Some(rb)) => return Ok(Some(rb.what)),
            Ok(None) => {}
            // Something else is at the path now (e.g. a volume made
            // there since): it opens as the new volume it is.
            Err(e) if here.is_some() => tracing::warn!("{}: {}", path.display(), e.message),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// What [`rollback_pending`] did.
struct Rollback {
    what: String,
    /// After restoring a snapshot (another LV, another identity): the
    /// state's new files and the lock of the restored volume.
    rebound: Option<(StatePaths, VolumeLock)>,
}

/// Settles a `--target-snapshot` session that did not commit: the replica
/// is put back to the snapshot taken before it was written. A snapshot
/// left after a commit is just removed. Runs only under the volume's lock
/// (`lock` must be the lock of `paths`).
fn rollback_pending(
    lock: &VolumeLock,
    paths: &StatePaths,
    path: &Path,
) -> Result<Option<Rollback>, TargetError> {
    let io = |e: String| TargetError::new(ErrorCode::TargetIo, e);
    if lock.path() != paths.lock {
        return Err(TargetError::new(
            ErrorCode::Internal,
            format!(
                "rollback of {} attempted without its volume lock",
                path.display()
            ),
        ));
    }
    let mut state = state::load(&paths.state).map_err(|e| io(format!("{e:#}")))?;
    let Some(snap) = state.rollback.clone() else {
        return Ok(None);
    };
    let lvm = Lvm::new();
    let snap_lv = LvName::parse(&snap).map_err(|e| io(e.to_string()))?;
    let mut rebound = None;
    let what = if state.consistent {
        match lvm.remove(&snap_lv) {
            Ok(()) | Err(LvmError::NotFound { .. }) => {}
            Err(e) => return Err(io(format!("removing rollback snapshot {snap}: {e}"))),
        }
        format!("removed the rollback snapshot {snap} of a committed generation")
    } else {
        // The origin by the snapshot's name, not by the path: a rollback
        // cut short may have removed it already.
        let origin = snap_lv
            .lv()
            .strip_suffix(ROLLBACK_SUFFIX)
            .and_then(|o| LvName::new(snap_lv.vg(), o).ok())
            .ok_or_else(|| io(format!("{snap} is not named as a rollback snapshot")))?;
        lvm.restore_snapshot(&origin, &snap_lv, state.rollback_uuid.as_deref())
            .map_err(|e| {
            io(format!(
                "rolling back {origin} to {snap}: {e}; the previous generation is intact in {snap} (or, if that is gone, already in {origin})"
            ))
        })?;
        state.consistent = state.generation.is_some();
        // The restored volume is the snapshot LV under the old name: bind
        // the state to its identity, under its lock too.
        if let Ok(snapshot::Located::Existing(r)) = snapshot::locate(path) {
            let id = r
                .identity(&snapshot::identity::sys_root())
                .map_err(|e| io(e.to_string()))?;
            let dir = paths.state.parent().unwrap_or(Path::new("."));
            let np = StatePaths::for_identity(dir, &id);
            if np.state != paths.state {
                let nl = VolumeLock::acquire(&np.lock).map_err(|e| {
                    TargetError::new(ErrorCode::Busy, format!("{}: {e:#}", path.display()))
                })?;
                state.identity = Some(id.id());
                rebound = Some((np, nl));
            }
        }
        format!(
            "rolled an interrupted apply back to generation {}",
            state.generation.as_ref().map_or(0, |g| g.number)
        )
    };
    state.rollback = None;
    state.rollback_uuid = None;
    match &rebound {
        Some((np, _)) => {
            state::save(&np.state, &state).map_err(|e| io(format!("{e:#}")))?;
            let _ = std::fs::remove_file(&paths.state);
        }
        None => state::save(&paths.state, &state).map_err(|e| io(format!("{e:#}")))?,
    }
    tracing::info!("{}: {what}", path.display());
    Ok(Some(Rollback { what, rebound }))
}

/// A helper thread failed: tell the source now. It is waiting for what
/// the thread would have sent, and our main thread for the source.
fn report_failure(result: Result<(), TargetError>, tx: &Sender<Out>) -> Result<(), TargetError> {
    if let Err(e) = &result {
        let msg = Msg::Error(RemoteError {
            code: e.code,
            message: e.message.clone(),
        });
        let _ = tx.send(Out::Frame(msg, Vec::new()));
    }
    result
}

/// Sends our counters every [`super::source::HEARTBEAT_EVERY`] until
/// `stop`, never waiting on a full queue (frames are going out then).
fn heartbeat_loop(s: &Shared, tx: &Sender<Out>, stop: &Receiver<()>, received: &AtomicU64) {
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(super::source::HEARTBEAT_EVERY) {
        let h = Heartbeat {
            blocks: s.hashed.load(Ordering::Relaxed),
            received: received.load(Ordering::Relaxed),
            journal: s.journal_bytes.load(Ordering::Relaxed),
            applied: s.applied.load(Ordering::Relaxed),
        };
        if let Err(crossbeam_channel::TrySendError::Disconnected(_)) =
            tx.try_send(Out::Frame(Msg::Heartbeat(h), Vec::new()))
        {
            return;
        }
    }
}

/// Queues a frame for the writer, giving up when the session is cancelled
/// (a source that stopped reading must not hold our threads forever).
fn send_out(s: &Shared, tx: &Sender<Out>, mut item: Out) -> bool {
    loop {
        match tx.send_timeout(item, Duration::from_millis(200)) {
            Ok(()) => return true,
            Err(SendTimeoutError::Disconnected(_)) => return false,
            Err(SendTimeoutError::Timeout(back)) if !s.cancel.is_cancelled() => item = back,
            Err(SendTimeoutError::Timeout(_)) => return false,
        }
    }
}

/// More than any frame's bytes beyond its payload.
pub(crate) const FRAME_SLACK: usize = 9 + wire::MAX_HEADER;

fn write_loop<W: Write>(
    mut wr: FrameWriter<W>,
    rx: Receiver<Out>,
    sent: &AtomicU64,
) -> Result<(), TargetError> {
    loop {
        let item = match rx.try_recv() {
            Ok(i) => i,
            Err(_) => {
                wr.flush()?;
                match rx.recv() {
                    Ok(i) => i,
                    Err(_) => return Ok(()),
                }
            }
        };
        let Out::Frame(msg, payload) = item;
        // Counted before the bytes can reach the source.
        let bound = wr.bytes() + (FRAME_SLACK + payload.len()) as u64;
        sent.fetch_max(bound, Ordering::SeqCst);
        wr.send(&msg, &payload)?;
    }
}

/// Hashes the volume front to back, announcing runs of zero blocks as
/// holes (no digest) and the rest as digests (see [`super::holes`]).
fn scan_loop(s: &Shared, tx: &Sender<Out>, start: u64) -> Result<(), TargetError> {
    let signer = s.signer.clone();
    // Zeros cost no digest: they go out as a hole.
    let hash: super::BlockHash =
        Arc::new(move |b: &[u8]| (!blockdiff::is_zero(b)).then(|| signer.block_digest(b)));
    let reader = ChunkReader::spawn(
        s.volume.clone(),
        s.block,
        s.new_size,
        s.old_size,
        start,
        s.cancel.clone(),
        Some(hash.clone()),
    );
    let mut announcer = Announcer::new();
    let mut frames = Vec::new();
    for chunk in reader.chunks.iter() {
        let chunk = chunk.map_err(volume_err)?;
        let last = chunk.first_block + chunk.blocks - 1;
        if !s.has_credit(last) {
            // The source may wait for exactly what is pending.
            announcer.flush(&mut frames);
            if !send_all(s, tx, &mut frames) {
                return Ok(());
            }
        }
        if !s.wait_credit(last) {
            return Ok(());
        }
        if chunk.hole {
            announcer.hole(chunk.first_block, chunk.blocks, &mut frames);
        } else {
            // The chunk's blocks, the last one short at the volume's end;
            // their digests from the reader, or computed here.
            let blocks = chunk.data.chunks(s.block.bytes() as usize);
            for ((i, data), b) in blocks.enumerate().zip(chunk.first_block..) {
                let digest = chunk.digests.get(i).copied().unwrap_or_else(|| hash(data));
                match digest {
                    Some(d) => announcer.digest(b, d, &mut frames),
                    None => announcer.hole(b, 1, &mut frames),
                }
            }
            announcer.flush_digests(&mut frames);
        }
        // A long run of zeros goes out now and then, so the source
        // compares behind us instead of waiting for the run's end.
        if announcer.pending_hole() >= HOLE_FLUSH_BLOCKS {
            announcer.flush(&mut frames);
        }
        s.scan_bytes.store(reader.bytes_read(), Ordering::Relaxed);
        s.hashed.fetch_add(chunk.blocks, Ordering::Relaxed);
        reader.recycle(chunk);
        if !send_all(s, tx, &mut frames) {
            return Ok(());
        }
    }
    announcer.flush(&mut frames);
    if !send_all(s, tx, &mut frames) {
        return Ok(());
    }
    s.scan_bytes.store(reader.bytes_read(), Ordering::Relaxed);
    Ok(())
}

/// A pending run of zero blocks this long is announced without waiting
/// for its end: 16 MiB at 64 KiB blocks, so a volume of allocated zeros
/// costs one 14-byte frame per 16 MiB and the source lags little.
const HOLE_FLUSH_BLOCKS: u64 = 256;

/// Queues `frames` for the writer (see [`send_out`]), emptying it.
fn send_all(s: &Shared, tx: &Sender<Out>, frames: &mut Vec<(Msg, Vec<u8>)>) -> bool {
    frames
        .drain(..)
        .all(|(m, p)| send_out(s, tx, Out::Frame(m, p)))
}

fn refine_loop(s: &Shared, tx: &Sender<Out>, rx: Receiver<u64>) -> Result<(), TargetError> {
    let mut buf = vec![0u8; s.block.bytes() as usize];
    let mut subs = Vec::new();
    let mut payload = Vec::new();
    let mut batch = Vec::with_capacity(MAX_PENDING_REFINES);
    // A volume that serves reads over the network (RBD) would make each
    // refinement wait a round trip: it gets as many in flight as it asks
    // for its scan.
    let in_flight = s.volume.reads_in_flight().clamp(1, MAX_PENDING_REFINES);
    while let Ok(first) = rx.recv() {
        // Every refinement already asked for is announced to the volume
        // first: cold random reads then run together, not one by one.
        batch.clear();
        batch.push(first);
        batch.extend(rx.try_iter().take(MAX_PENDING_REFINES - 1));
        if batch.len() > 1 && in_flight > 1 {
            for (&block, subs) in batch
                .iter()
                .zip(sub_digests_in_flight(s, &batch, in_flight)?)
            {
                if !send_sub_digests(s, tx, block, &subs, &mut payload) {
                    return Ok(());
                }
            }
            continue;
        }
        if batch.len() > 1 {
            for &block in &batch {
                let len = s.block.len_of(block, s.new_size);
                s.volume.will_need(s.block.offset_of(block), u64::from(len));
            }
        }
        for &block in &batch {
            sub_digests_of(s, block, &mut buf, &mut subs)?;
            if !send_sub_digests(s, tx, block, &subs, &mut payload) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The sub-block digests of each of `blocks`, in order, read with up to
/// `in_flight` reads at once.
fn sub_digests_in_flight(
    s: &Shared,
    blocks: &[u64],
    in_flight: usize,
) -> Result<Vec<Vec<blockdiff::Digest>>, TargetError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let read = || -> Result<Vec<(usize, Vec<blockdiff::Digest>)>, TargetError> {
        let mut buf = vec![0u8; s.block.bytes() as usize];
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&block) = blocks.get(i) else {
                return Ok(done);
            };
            let mut subs = Vec::new();
            if let Err(e) = sub_digests_of(s, block, &mut buf, &mut subs) {
                // The others stop at their next block.
                next.store(blocks.len(), Ordering::Relaxed);
                return Err(e);
            }
            done.push((i, subs));
        }
    };
    let parts: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..in_flight.min(blocks.len()))
            .map(|_| scope.spawn(read))
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("refine reader panicked"))
            .collect()
    });
    let mut out = vec![Vec::new(); blocks.len()];
    for part in parts {
        for (i, subs) in part? {
            out[i] = subs;
        }
    }
    Ok(out)
}

/// Reads `block` (a hole is not read) into `buf` and puts its sub-block
/// digests in `subs`.
fn sub_digests_of(
    s: &Shared,
    block: u64,
    buf: &mut [u8],
    subs: &mut Vec<blockdiff::Digest>,
) -> Result<(), TargetError> {
    let len = s.block.len_of(block, s.new_size) as usize;
    if s.read_virtual(&mut buf[..len], s.block.offset_of(block))
        .map_err(volume_err)?
    {
        buf[..len].fill(0);
    }
    subs.clear();
    s.signer.sub_digests(&buf[..len], subs);
    Ok(())
}

/// Sends `block`'s sub-block digests; `false` once the session's sender
/// is gone.
fn send_sub_digests(
    s: &Shared,
    tx: &Sender<Out>,
    block: u64,
    subs: &[blockdiff::Digest],
    payload: &mut Vec<u8>,
) -> bool {
    wire::digests_to_payload(subs, payload);
    let frame = Out::Frame(Msg::SubHashes(SubHashes { block }), payload.clone());
    send_out(s, tx, frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A volume whose reads each take a while and that asks for several
    /// in flight, counting how many ran at once.
    #[derive(Debug)]
    struct Networked {
        inner: snapshot::MemVolume,
        running: AtomicU64,
        most: AtomicU64,
    }

    impl Volume for Networked {
        fn path(&self) -> &Path {
            self.inner.path()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> snapshot::volume::Result<()> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(20));
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> snapshot::volume::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn zero(&self, offset: u64, len: u64) -> snapshot::volume::Result<()> {
            self.inner.zero(offset, len)
        }
        fn sync(&self) -> snapshot::volume::Result<()> {
            Ok(())
        }
        fn set_size(&self, size: u64) -> snapshot::volume::Result<()> {
            self.inner.set_size(size)
        }
        fn resizable(&self) -> bool {
            false
        }
        fn reads_in_flight(&self) -> usize {
            8
        }
    }

    /// Refinements asked for together are read together on a volume that
    /// wants reads in flight (RBD: one at a time, each waited a round
    /// trip), and still answered in the order asked, each right.
    #[test]
    fn refinements_are_read_in_flight_and_answered_in_order() {
        let block = BlockSize::new(64 << 10).unwrap();
        let blocks = 24u64;
        let size = blocks * (64 << 10);
        let data: Vec<u8> = (0..size).map(|i| (i * 31 / 4093) as u8).collect();
        let volume = Arc::new(Networked {
            inner: snapshot::MemVolume::new("net", data.clone(), false),
            running: AtomicU64::new(0),
            most: AtomicU64::new(0),
        });
        let s = Shared::new(volume.clone(), size, size, block, HashKey([5; 32]), 0);
        let signer = s.signer.clone();
        let asked: Vec<u64> = (1..blocks).step_by(2).collect();
        let (req_tx, req_rx) = bounded(MAX_PENDING_REFINES);
        for &b in &asked {
            req_tx.send(b).unwrap();
        }
        drop(req_tx);
        let (tx, rx) = bounded(MAX_PENDING_REFINES);
        refine_loop(&s, &tx, req_rx).unwrap();
        drop(tx);
        let answered: Vec<(u64, Vec<u8>)> = rx
            .iter()
            .map(|Out::Frame(m, p)| match m {
                Msg::SubHashes(h) => (h.block, p),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(answered.iter().map(|a| a.0).collect::<Vec<_>>(), asked);
        for (b, payload) in &answered {
            let at = (*b * (64 << 10)) as usize;
            let mut want = Vec::new();
            signer.sub_digests(&data[at..at + (64 << 10)], &mut want);
            let mut expect = Vec::new();
            wire::digests_to_payload(&want, &mut expect);
            assert_eq!(payload, &expect, "block {b}");
        }
        let most = volume.most.load(Ordering::SeqCst);
        assert!(
            most > 1,
            "refinements read one at a time (at most {most} at once)"
        );
        assert_eq!(
            s.bytes_read.load(Ordering::Relaxed),
            asked.len() as u64 * (64 << 10)
        );
    }

    /// A read that fails among refinements read in flight fails the
    /// refiner with the volume's error, and nothing of its batch is sent.
    #[test]
    fn a_failed_refinement_read_in_flight_fails_the_refiner() {
        let block = BlockSize::new(64 << 10).unwrap();
        let size = 16u64 * (64 << 10);
        let inner = snapshot::MemVolume::new("net", vec![1u8; size as usize], false)
            .with_fault(snapshot::volume::Fault::Read { at: 9 * (64 << 10) });
        let volume = Arc::new(Networked {
            inner,
            running: AtomicU64::new(0),
            most: AtomicU64::new(0),
        });
        let s = Shared::new(volume, size, size, block, HashKey([5; 32]), 0);
        let (req_tx, req_rx) = bounded(MAX_PENDING_REFINES);
        for b in 0..16 {
            req_tx.send(b).unwrap();
        }
        drop(req_tx);
        let (tx, rx) = bounded(MAX_PENDING_REFINES);
        let e = refine_loop(&s, &tx, req_rx).expect_err("the read at block 9 fails");
        assert!(e.to_string().contains("read"), "{e}");
        drop(tx);
        assert_eq!(rx.iter().count(), 0, "no answer from a failed batch");
    }

    /// A rollback changes the volume and its state: it must run under that
    /// volume's lock, never after the session let it go.
    #[test]
    fn rollback_runs_only_under_the_volumes_lock() {
        let dir = tempfile::tempdir().unwrap();
        let a = StatePaths::new(dir.path(), Path::new("/dev/a"));
        let b = StatePaths::new(dir.path(), Path::new("/dev/b"));
        let pending = VolumeState {
            rollback: Some("vg/snap".into()),
            ..Default::default()
        };
        state::save(&a.state, &pending).unwrap();
        let other = VolumeLock::acquire(&b.lock).unwrap();
        let e = rollback_pending(&other, &a, Path::new("/dev/a"))
            .err()
            .expect("refused without the lock");
        assert!(e.message.contains("without its volume lock"), "{e}");
        assert_eq!(state::load(&a.state).unwrap(), pending, "state untouched");
        // Under its own lock, with nothing pending, nothing happens.
        state::save(&a.state, &VolumeState::default()).unwrap();
        let own = VolumeLock::acquire(&a.lock).unwrap();
        assert!(rollback_pending(&own, &a, Path::new("/dev/a"))
            .unwrap()
            .is_none());
    }

    /// `--target-snapshot` snapshots the LV that was opened: found by the
    /// opened device's dm name, checked by its dm UUID. An LV replaced at
    /// the same name (another UUID) is refused, never snapshotted.
    #[test]
    fn target_snapshot_checks_the_opened_volume_not_the_name() {
        use snapshot::identity::IdKind;
        use snapshot::VolumeIdentity;
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let dm = sys.join("dev/block/253:7/dm");
        std::fs::create_dir_all(&dm).unwrap();
        std::fs::write(dm.join("name"), "vg0-thin\n").unwrap();
        // A fake `lvm` answering `lvs` with vg0/thin of the given attr.
        let lvm_bin = d.path().join("lvm");
        let report = d.path().join("report.json");
        std::fs::write(&lvm_bin, format!("#!/bin/sh\ncat {}\n", report.display())).unwrap();
        std::fs::set_permissions(&lvm_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lvm = Lvm::with_programs(&lvm_bin, "/bin/false", "/bin/false");
        let answer = |attr: &str, pool: &str| {
            std::fs::write(
                &report,
                format!(
                    r#"{{"report":[{{"lv":[{{"lv_name":"thin","vg_name":"vg0","lv_attr":"{attr}",
                    {pool}
                    "lv_uuid":"LvLvLv-0000-0000-0000-0000-0000-000001",
                    "vg_uuid":"VgVgVg-0000-0000-0000-0000-0000-000002"}}]}}]}}"#
                ),
            )
            .unwrap();
        };
        let uuid = "LVM-VgVgVg00000000000000000000000002LvLvLv00000000000000000000000001";
        let id = |key: &str| VolumeIdentity {
            kind: IdKind::DeviceMapper,
            key: key.into(),
            strong: true,
        };
        // The peer's name is any alias: the LV comes from the device.
        let path = Path::new("/srv/replica");
        answer("Vwi-a-tz--", r#""pool_lv":"pool","thin_id":"1","#);
        let lv = thin_target(&lvm, path, &id(uuid), Some((253, 7)), &sys).unwrap();
        assert_eq!(lv.to_string(), "vg0/thin");
        // The LV now at that name is another volume than the one opened.
        let replaced = uuid.replace("000001", "000009");
        let e = thin_target(&lvm, path, &id(&replaced), Some((253, 7)), &sys).unwrap_err();
        assert_eq!(e.code, ErrorCode::TargetIo, "{e}");
        assert!(e.message.contains("no longer the volume opened"), "{e}");
        // Not an LVM volume at all (a file, a loop device).
        let file = VolumeIdentity {
            kind: IdKind::File,
            key: "fs1:2".into(),
            strong: true,
        };
        let e = thin_target(&lvm, path, &file, None, &sys).unwrap_err();
        assert_eq!(e.code, ErrorCode::Usage, "{e}");
        // The opened LV, but thick.
        answer("-wi-a-----", "");
        let e = thin_target(&lvm, path, &id(uuid), Some((253, 7)), &sys).unwrap_err();
        assert!(e.message.contains("not a thin logical volume"), "{e}");
    }
}
