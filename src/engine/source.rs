//! The source side of a session: reads the source volume, compares it with
//! the target's digests and sends what differs.
//!
//! Threads: a reader fills 1 MiB chunks of the source ahead of the
//! comparer; a receiver checks everything the target sends and queues it
//! in a bounded queue. The receiver may block on that queue, yet the two
//! ends cannot deadlock: an honest target sends at most a credit window of
//! digests and one answer per pending refinement (both bounded), so the
//! comparer always finds what it waits for; a target that sends more is
//! cut off as a protocol violation before it is queued. A writer owns the
//! outgoing stream, compresses data frames and flushes whenever it runs out
//! of work; a heartbeat thread tells the target how far we got. The calling
//! thread compares and decides.
//!
//! `io_timeout` measures time without *progress*: new digests or answers,
//! a frame written, or a heartbeat whose counters advanced. A target that
//! trickles empty or repeated frames is cut off all the same.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blockdiff::{
    changed_runs, decide_digest, decide_holes_known, BlockSize, Decision, Digest, HashKey,
    HoleDecision, Signer, Theirs,
};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use serde::Serialize;
use snapshot::{Volume, VolumeError};
use wire::{
    features, Codec, Committed, Credit, Data, Finish, FrameReader, FrameWriter, Generation,
    Heartbeat, Hello, Mode, Msg, Open, Opened, Refine, RemoteError, WireError, Zero,
};

use super::early::{self, block_hash, EarlyEnd, EarlyResults, EarlyScan};
use super::holes::{Run, TargetRuns};
use super::map::{MapHeader, MapReader, MapSession, MapWriter, SALT_LEN};
use super::{Cancel, Chunk, ChunkReader, Clock, ZeroDigests, MAX_PENDING_REFINES, WINDOW_BLOCKS};
use crate::progress::Progress;

/// Why a session failed, classified for exit codes.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("source: {0}")]
    Source(#[from] VolumeError),
    #[error("target: {}", wire::escape(&.0.message))]
    Remote(RemoteError),
    #[error("transport: {0}")]
    Transport(WireError),
    #[error("interrupted")]
    Interrupted,
}

impl SyncError {
    /// The target made no progress for the session's timeout: it is stuck,
    /// and nothing more is waited for from it.
    pub fn is_stall(&self) -> bool {
        matches!(self, SyncError::Transport(WireError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut)
    }
}

impl From<WireError> for SyncError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Remote(r) => SyncError::Remote(r),
            e => SyncError::Transport(e),
        }
    }
}

/// What the source asks of a session.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub target_path: String,
    pub block_size: BlockSize,
    /// Compression of data frames, if wanted.
    pub compress: Option<Compress>,
    pub mode: Mode,
    pub dry_run: bool,
    pub force: bool,
    pub resume: bool,
    pub journal_max: u64,
    pub source_id: String,
    pub snapshot_id: String,
    pub base: Option<Generation>,
    /// How long the target may make no progress before the session fails.
    pub io_timeout: Duration,
    /// Ask a thin-LV target to snapshot itself instead of journaling.
    pub target_snapshot: bool,
    /// Bytes per second each side may send (0: no limit).
    pub bwlimit: u64,
    /// Bytes of the source that may hold data, when the caller knows
    /// better than the volume (a thin LV's mapped space); else the
    /// volume's allocated extents, if it can tell.
    pub data_bytes: Option<u64>,
    /// Compare against (and keep) the source's digest map, if any.
    pub digest_map: Option<super::map::MapPlan>,
}

impl SessionParams {
    /// A full-scan session with the defaults of `snapsync sync`: resume
    /// on, journal up to 1 GiB, no compression; callers set the rest.
    pub fn new(
        target_path: String,
        block_size: BlockSize,
        source_id: String,
        snapshot_id: String,
        io_timeout: Duration,
    ) -> Self {
        Self {
            target_path,
            block_size,
            compress: None,
            mode: Mode::FullScan,
            dry_run: false,
            force: false,
            resume: true,
            journal_max: 1 << 30,
            source_id,
            snapshot_id,
            base: None,
            io_timeout,
            target_snapshot: false,
            bwlimit: 0,
            data_bytes: None,
            digest_map: None,
        }
    }
}

/// True counts of what a session did; printed by `--json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub volume_bytes: u64,
    pub source_bytes_read: u64,
    pub target_bytes_read: u64,
    pub target_bytes_written: u64,
    pub blocks_total: u64,
    pub blocks_compared: u64,
    pub blocks_changed: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub journal_bytes: u64,
    pub elapsed_seconds: f64,
    /// "full-scan", "delta", "digest-map" or "verify".
    pub mode: String,
    /// How the target applied it: "journal", "in-place", "resumed",
    /// "snapshot", "dry-run", "verify".
    pub apply_mode: String,
    pub start_block: u64,
    pub generation: Option<u64>,
    /// Set when the requested mode was not possible.
    pub fallback: Option<String>,
    /// What the target found when it opened the volume.
    pub recovered: Option<String>,
    /// Byte ranges that differ (verify and dry runs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differing: Vec<(u64, u64)>,
    /// Of `source_bytes_read`, the bytes read from the base snapshot to
    /// refine changed-block tracking's chunks to 4 KiB.
    pub base_bytes_read: u64,
}

/// A session's byte streams and whatever must be waited for at the end.
pub struct Connection {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}

/// A changed range known in advance (changed-block tracking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Data(Range<u64>),
    Zero(Range<u64>),
    /// A changed range already read and refined to 4 KiB against the
    /// base (see [`super::cbt_refine`]): shipped as is.
    Refined(super::cbt_refine::Refined),
}

enum Incoming {
    Hashes(u64, Vec<Digest>),
    Holes(u64, u64),
    Subs(u64, Vec<Digest>),
    Committed(Committed),
    Failed(WireError),
}

/// Frames from the target waiting for the comparer, at most. Each holds at
/// most one frame's digests, and the receiver checks every frame against
/// the credit window and the refinements asked for before queueing it.
const INCOMING_QUEUE: usize = 64;
/// What the source reads after `Committed`, at most, and for how long.
const DRAIN_BYTES: u64 = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// How often each side tells the other its counters.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

fn violation(msg: impl Into<String>) -> SyncError {
    SyncError::Transport(WireError::Protocol(msg.into()))
}

/// What the receiver knows of the session, to check the target's frames.
struct Expect {
    block: BlockSize,
    size: u64,
    total: u64,
    window: u64,
    /// Next block whose digest may arrive (digests come in order).
    next_hash: u64,
    /// Highest credit sent (stored before the `Credit` frame goes out).
    credited: Arc<AtomicU64>,
    /// Refinements asked for, and answered so far.
    refines_sent: Arc<AtomicU64>,
    subs_received: u64,
    clock: Clock,
    /// The target's counters as far as they got.
    heartbeat: Heartbeat,
    /// Bytes received, kept up to date for the report.
    received: Arc<AtomicU64>,
    /// Bytes sent (an upper bound, stored before they go out).
    sent: Arc<AtomicU64>,
}

impl Expect {
    /// Checks a frame of digests: in order, inside the volume and the
    /// window, and the answer to a refinement actually asked for.
    fn check(&mut self, m: &Incoming) -> Result<(), WireError> {
        match m {
            Incoming::Hashes(_, _) | Incoming::Holes(_, _) => {
                let (first, n) = match m {
                    Incoming::Hashes(first, d) => (first, d.len() as u64),
                    Incoming::Holes(first, n) => (first, *n),
                    _ => unreachable!(),
                };
                let limit = self.total.min(
                    self.credited
                        .load(Ordering::SeqCst)
                        .saturating_add(self.window),
                );
                if *first != self.next_hash || n == 0 || first.saturating_add(n) > limit {
                    return Err(WireError::Protocol(format!(
                        "digests of blocks {first}..{} arrived; expected them from block {} and below block {limit}",
                        first.saturating_add(n),
                        self.next_hash
                    )));
                }
                self.next_hash += n;
                self.clock.touch();
            }
            Incoming::Subs(b, d) => {
                self.subs_received += 1;
                if self.subs_received > self.refines_sent.load(Ordering::SeqCst) {
                    return Err(WireError::Protocol(format!(
                        "sub-digests of block {b} that nobody asked for"
                    )));
                }
                let want = if *b < self.total {
                    self.block
                        .len_of(*b, self.size)
                        .div_ceil(blockdiff::SUB_BLOCK) as usize
                } else {
                    0
                };
                if d.len() != want {
                    return Err(WireError::Protocol(format!(
                        "{} sub-digests for block {b}, expected {want}",
                        d.len()
                    )));
                }
                self.clock.touch();
            }
            Incoming::Committed(_) => self.clock.touch(),
            Incoming::Failed(_) => {}
        }
        Ok(())
    }

    /// Counts a heartbeat as progress only when what it claims advanced
    /// and is possible: no more received than we sent, hashed than the
    /// volume has, applied than its size.
    fn heartbeat(&mut self, h: Heartbeat) -> Result<(), WireError> {
        let sent = self.sent.load(Ordering::SeqCst);
        if h.received > sent || h.blocks > self.total || h.applied > self.size {
            return Err(WireError::Protocol(format!(
                "heartbeat claims {} bytes received of {sent} sent, {} blocks of {}, {} bytes applied of {}",
                h.received, h.blocks, self.total, h.applied, self.size
            )));
        }
        let prev = self.heartbeat;
        if h.blocks > prev.blocks || h.received > prev.received || h.applied > prev.applied {
            self.clock.touch();
        }
        self.heartbeat = prev.max(&h);
        Ok(())
    }
}

/// The source's counters, shared with the heartbeat thread.
#[derive(Debug, Default)]
struct Counters {
    blocks: AtomicU64,
    read: AtomicU64,
}

enum Pending {
    Zero {
        offset: u64,
        len: u64,
        end_block: u64,
    },
    Refine {
        block: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// Data against a target hole: these runs of `data` go out as they
    /// are, no refinement needed.
    Runs {
        block: u64,
        offset: u64,
        data: Vec<u8>,
        runs: Vec<(u32, u32)>,
    },
}

impl Pending {
    fn block(&self, bs: BlockSize) -> u64 {
        match self {
            Pending::Zero { offset, .. } => *offset / bs.bytes() as u64,
            Pending::Refine { block, .. } | Pending::Runs { block, .. } => *block,
        }
    }
}

/// What the replica is after a failed session, from what the target
/// reported when it opened the volume (its state then, where it starts,
/// its mode) and whether this side sent it anything to write since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaAfter {
    /// The replica holds no complete generation (a torn in-place copy).
    pub inconsistent: bool,
    /// An interrupted in-place copy waits to be resumed.
    pub resume: bool,
}

impl ReplicaAfter {
    /// `data` and `zeroed`: bytes this side sent the target to write.
    fn after_failure(opened: &Opened, params: &SessionParams, data: u64, zeroed: u64) -> Self {
        let st = &opened.state;
        let writes = !params.dry_run && opened.mode != Mode::Verify;
        let same_source = st.source_id.as_deref() == Some(params.source_id.as_str());
        // How the target applies, as it decides in `target::Session::open`:
        // a thin-LV snapshot, in place, or a journal (which goes on in
        // place once a delta outgrows it).
        let snapshot =
            params.target_snapshot && st.consistent && same_source && opened.start_block == 0;
        let in_place = !snapshot
            && (opened.start_block > 0
                || !st.consistent
                || !same_source
                || params.journal_max == 0
                || data > params.journal_max);
        let wrote = writes && data + zeroed > 0;
        Self {
            inconsistent: !st.consistent || (wrote && (in_place || snapshot)),
            resume: st.resume.is_some() || (wrote && in_place),
        }
    }
}

/// Runs one session against the target behind `conn`. After a failure
/// once the target opened the volume, `after` tells what the replica is.
pub fn run(
    source: Arc<dyn Volume>,
    conn: Connection,
    params: &SessionParams,
    progress: &Progress,
    cancel: &Cancel,
    changes: Option<Box<dyn Iterator<Item = Result<Change, VolumeError>> + Send>>,
    after: &mut Option<ReplicaAfter>,
) -> Result<Report, SyncError> {
    let started = Instant::now();
    let mut random = [0u8; 32 + SALT_LEN];
    getrandom::fill(&mut random)
        .map_err(|e| WireError::Io(std::io::Error::other(e.to_string())))?;
    let (key, salt) = random.split_at(32);
    let salt: [u8; SALT_LEN] = salt.try_into().expect("split at 32");
    let size = source.size();
    let mut mode = if changes.is_some() {
        params.mode
    } else if params.mode == Mode::Verify {
        Mode::Verify
    } else {
        Mode::FullScan
    };
    // A full scan that writes may use (and always renews) the digest map.
    let mut base = params.base.clone();
    let mut map_target = None;
    let mut map = match &params.digest_map {
        Some(plan) if mode == Mode::FullScan && !params.dry_run => {
            let (m, usable) = MapSession::prepare(
                plan.clone(),
                salt,
                &params.source_id,
                params.block_size,
                size,
            );
            if let Some((g, t)) = usable {
                mode = Mode::Mapped;
                base = Some(g);
                map_target = Some(t);
            }
            Some(m)
        }
        _ => None,
    };
    // A session that may make a new map keys its digests as that map's.
    let key = match &map {
        Some(m) => m.session_key(),
        None => HashKey(key.try_into().expect("32 bytes")),
    };
    // The source keys its digests itself, so its scan needs nothing from
    // the target to begin: it starts now, while the connection comes up
    // (against the base's map, or hashing for a full scan).
    let synced_before = map.as_ref().is_none_or(|m| m.found);
    let early = match &mut map {
        Some(m) if mode == Mode::Mapped => m.take_reader().map(|r| {
            EarlyScan::spawn(
                source.clone(),
                params.block_size,
                size,
                Some(r),
                m.signer(),
                cancel.clone(),
            )
        }),
        // A full scan hashes ahead when the target most likely holds most
        // of the source: the blocks that differ are read again. Not for
        // a first sync (a digest map that was never made: every block
        // differs), nor in a fan-out, whose sessions read together (a
        // block read again would be read from the source again).
        _ if matches!(mode, Mode::FullScan | Mode::Verify)
            && synced_before
            && !source.reads_shared() =>
        {
            Some(EarlyScan::spawn(
                source.clone(),
                params.block_size,
                size,
                None,
                Signer::new(key),
                cancel.clone(),
            ))
        }
        _ => None,
    };
    let mut wr = FrameWriter::new(conn.writer);
    let mut rd = FrameReader::new(conn.reader);
    let ack = match hello(&mut wr, &mut rd, key, params) {
        Ok(a) => a,
        Err(e) => {
            // The target never heard of this session: the map still
            // holds for the next one.
            if let Some(m) = &map {
                m.put_back();
            }
            return Err(e);
        }
    };
    let compress = params
        .compress
        .filter(|_| ack.features & features::ZSTD != 0);
    wr.send(
        &Msg::Open(Open {
            path: params.target_path.clone(),
            source_size: size,
            block_size: params.block_size,
            source_id: params.source_id.clone(),
            mode,
            base: base.clone(),
            target_generation: Generation {
                number: 0,
                snapshot: params.snapshot_id.clone(),
            },
            dry_run: params.dry_run || mode == Mode::Verify,
            force: params.force,
            journal_max: params.journal_max,
            resume: params.resume,
            target_snapshot: params.target_snapshot,
            source_data_bytes: params
                .data_bytes
                .or_else(|| source.data_bytes_in(0, size))
                .map(|b| b.min(size)),
            map_target: map_target.clone(),
        }),
        &[],
    )?;
    wr.flush()?;
    let opened = match rd.read()?.0 {
        Msg::Opened(o) => o,
        m => {
            return Err(WireError::Unexpected {
                got: m.kind(),
                want: "Opened",
            }
            .into())
        }
    };

    check_opened(&opened, params.block_size.blocks_in(size), mode)?;
    let mapped = opened.mode == Mode::Mapped;
    if mapped
        && (map_target.as_deref() != Some(&opened.target_identity)
            || !opened.target_strong
            || opened.state.generation != base)
    {
        return Err(violation(
            "the target runs the digest map's mode for another volume or generation",
        ));
    }
    let mut map_old = map
        .as_mut()
        .and_then(|m| m.opened(mapped, opened.unvouched.as_deref()));
    // The new map needs every block: not for a resumed copy, nor for a
    // target that could never vouch for it.
    let map_new = map
        .as_ref()
        .filter(|_| opened.start_block == 0 && opened.target_strong)
        .and_then(|m| m.writer(params.block_size, size));
    // A full scan's map is keyed as the session: one digest per block.
    let map_signer = map.as_ref().map(|m| m.signer());
    // What the early scan did stands when the target compares from the
    // first block: in the map's mode, or in a full scan (the session key
    // is the map's block key, so the digests made against the map are
    // the ones a full scan compares). Otherwise it is dropped here.
    let mut early_results = None;
    let mut read_besides = 0;
    if let Some(scan) = early {
        let full = matches!(opened.mode, Mode::FullScan | Mode::Verify) && opened.start_block == 0;
        if mapped || full {
            let e = scan.finish();
            let blocks = e.chunks.iter().map(|c| c.chunk.blocks).sum::<u64>();
            if mapped {
                tracing::debug!(
                    "compared {blocks} blocks with the digest map before the target answered"
                );
                map_old = e.map;
                early_results = Some((e.chunks, e.end, Some(e.reader)));
            } else {
                tracing::debug!(
                    "hashed {blocks} blocks for the full scan before the target answered"
                );
                let (mut chunks, mut end, mut reader) = early::for_full_scan(e);
                // Past the end of what the target holds (a new target, or
                // one shorter than the source) nothing can match: a new
                // reader reads that part in order, not block by block.
                let held = params.block_size.blocks_in(opened.target_size);
                if early::start_over_past(&mut chunks, held).is_some() {
                    end = None;
                    read_besides = reader.take().map_or(0, ChunkReader::stop);
                }
                early_results = Some((chunks, end, reader));
            }
        }
    }

    let mut report = Report {
        volume_bytes: size,
        blocks_total: params.block_size.blocks_in(size),
        mode: match opened.mode {
            Mode::FullScan => "full-scan",
            Mode::Delta => "delta",
            Mode::Verify => "verify",
            Mode::Mapped => "digest-map",
        }
        .into(),
        start_block: opened.start_block,
        recovered: opened.state.recovered.as_deref().map(wire::escape),
        ..Default::default()
    };
    if mode == Mode::Delta && opened.mode != Mode::Delta {
        report.fallback = Some(match &opened.state.generation {
            Some(g) => format!(
                "target holds generation {} ({}), not the base; full scan instead",
                g.number,
                wire::escape(&g.snapshot)
            ),
            None => "target holds no complete generation; full scan instead".into(),
        });
    }
    if let Some(m) = &map {
        report.fallback = report.fallback.take().or(m.fallback.clone());
    }

    // From here four helper threads run.
    let clock = Clock::new();
    let total = params.block_size.blocks_in(size);
    let sent = Arc::new(AtomicU64::new(wr.bytes()));
    let credited = Arc::new(AtomicU64::new(opened.start_block));
    let refines_sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(rd.bytes()));
    let expect = Expect {
        block: params.block_size,
        size,
        total,
        window: opened.window_blocks,
        // Delta: the target reads nothing, so no digest may come.
        next_hash: if matches!(opened.mode, Mode::Delta | Mode::Mapped) {
            total
        } else {
            opened.start_block
        },
        credited: credited.clone(),
        refines_sent: refines_sent.clone(),
        subs_received: 0,
        clock: clock.clone(),
        heartbeat: Heartbeat::default(),
        received: received.clone(),
        sent: sent.clone(),
    };
    let (in_tx, in_rx) = bounded::<Incoming>(INCOMING_QUEUE);
    let peer_failed = Arc::new(AtomicBool::new(false));
    let recv_failed = peer_failed.clone();
    let receiver = thread::Builder::new()
        .name("sync-recv".into())
        .spawn(move || recv_loop(rd, in_tx, recv_failed, expect))
        .expect("spawn receiver");
    let (out_tx, out_rx) = bounded::<(Msg, Vec<u8>)>(256);
    let write_clock = clock.clone();
    let writer = thread::Builder::new()
        .name("sync-writer".into())
        .spawn(move || write_loop(wr, out_rx, compress, write_clock, sent))
        .expect("spawn writer");
    let counters = Arc::new(Counters::default());
    // Dropping `beat_stop` ends the heartbeat thread at once.
    let (beat_stop, stop) = bounded::<()>(0);
    let beat = {
        let (tx, counters, received) = (out_tx.clone(), counters.clone(), received.clone());
        thread::Builder::new()
            .name("sync-heartbeat".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(HEARTBEAT_EVERY) {
                    let h = Heartbeat {
                        blocks: counters.blocks.load(Ordering::Relaxed),
                        received: received.load(Ordering::Relaxed),
                        journal: 0,
                        applied: counters.read.load(Ordering::Relaxed),
                    };
                    // Never wait: a full queue means frames are going out.
                    if let Err(crossbeam_channel::TrySendError::Disconnected(_)) =
                        tx.try_send((Msg::Heartbeat(h), Vec::new()))
                    {
                        return;
                    }
                }
            })
            .expect("spawn heartbeat")
    };

    let mut cmp = Comparer {
        source: source.clone(),
        block: params.block_size,
        signer: Signer::new(key),
        size,
        out: out_tx,
        incoming: in_rx,
        hashes: TargetRuns::default(),
        zero_digests: ZeroDigests::default(),
        map_zero_digests: ZeroDigests::default(),
        subs: VecDeque::new(),
        pending: VecDeque::new(),
        pending_refines: 0,
        send_ops: !(params.dry_run || opened.mode == Mode::Verify),
        collect_ranges: params.dry_run || opened.mode == Mode::Verify,
        report: &mut report,
        peer_failed,
        clock,
        credited_shared: credited,
        refines_sent,
        counters,
        io_timeout: params.io_timeout,
        progress,
        cancel,
        committed: None,
        credited: opened.start_block,
        // Often enough that the target never waits long for it and its
        // resume marks stay fine-grained: every 64 blocks, or an eighth
        // of a smaller volume (which the window never holds back).
        credit_step: (opened.window_blocks / 4)
            .min(params.block_size.blocks_in(size).div_ceil(8))
            .clamp(1, 64),
        map_old: map_old.take(),
        map_new,
        map_signer,
        early_base: VecDeque::new(),
        read_besides,
    };
    // A file replica longer than the source differs in its tail (a sync
    // truncates it at commit; a verify or dry run must say so).
    if opened.resizable && opened.target_size > size {
        cmp.note_range(size, opened.target_size - size);
    }
    let result = match (opened.mode, changes) {
        (Mode::Delta, Some(changes)) => cmp.run_delta(changes),
        _ => cmp.run_scan(&opened, early_results),
    };
    let result = result.and_then(|()| cmp.finish());
    let result = result.and_then(|()| cmp.check_committed(params, &opened));
    let committed = cmp.committed.take();
    let map_new = cmp.map_new.take();
    if let (Ok(()), Some(m), Some(c)) = (&result, &map, &committed) {
        // Only now may the map claim the generation the target holds.
        let header = c.state.generation.clone().map(|generation| MapHeader {
            salt: m.salt(),
            block_size: params.block_size,
            volume_size: size,
            generation,
            source_id: params.source_id.clone(),
            target_identity: opened.target_identity.clone(),
        });
        m.commit(map_new, header);
    }
    drop(beat_stop);
    let _ = beat.join();
    let Comparer { out, incoming, .. } = cmp;
    if let Err(e) = &result {
        if !matches!(e, SyncError::Transport(_) | SyncError::Remote(_)) {
            let _ = out.send((
                Msg::Error(RemoteError {
                    code: wire::ErrorCode::Interrupted,
                    message: format!("source failed: {e}"),
                }),
                Vec::new(),
            ));
        }
    }
    // Closing our side makes the target finish; then its side closes ours.
    drop(out);
    drop(incoming);
    if let Err(e) = result {
        *after = Some(ReplicaAfter::after_failure(
            &opened,
            params,
            report.data_bytes,
            report.zero_bytes,
        ));
        // A writer stuck on a peer that stopped reading (or a reader on one
        // that stopped writing) ends when the caller kills the peer; don't
        // wait for it here (at all, when the peer is known to be stuck).
        let wait = if e.is_stall() {
            Duration::ZERO
        } else {
            Duration::from_secs(2)
        };
        let deadline = Instant::now() + wait;
        while !(writer.is_finished() && receiver.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        return Err(e);
    }
    let sent = writer.join().expect("writer panicked");
    report.wire_bytes_sent = sent.map_err(SyncError::from)?;
    // What follows `Committed` is drained, but never for long: a target
    // that keeps the stream open is left to the caller to end.
    let deadline = Instant::now() + DRAIN_TIME + Duration::from_millis(500);
    while !receiver.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    report.wire_bytes_received = received.load(Ordering::SeqCst);
    let committed = committed.expect("finish sets committed");
    report.target_bytes_read = committed.target_bytes_read;
    report.target_bytes_written = committed.target_bytes_written;
    report.journal_bytes = committed.journal_bytes;
    report.apply_mode = committed.apply_mode;
    report.generation = committed.state.generation.map(|g| g.number);
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The session's first exchange: our `Hello`, the target's `HelloAck`.
fn hello<W: Write, R: Read>(
    wr: &mut FrameWriter<W>,
    rd: &mut FrameReader<R>,
    key: HashKey,
    params: &SessionParams,
) -> Result<wire::HelloAck, SyncError> {
    let features = if params.compress.is_some() {
        features::ZSTD
    } else {
        0
    };
    wr.write_preamble()?;
    wr.send(
        &Msg::Hello(Hello {
            features,
            key,
            software: crate::VERSION.into(),
            bwlimit: (params.bwlimit > 0).then_some(params.bwlimit),
        }),
        &[],
    )?;
    wr.flush()?;
    rd.read_preamble()?;
    match rd.read()?.0 {
        Msg::HelloAck(a) => Ok(a),
        m => Err(WireError::Unexpected {
            got: m.kind(),
            want: "HelloAck",
        }
        .into()),
    }
}

fn map_error(source: &Arc<dyn Volume>, e: std::io::Error) -> SyncError {
    SyncError::Source(VolumeError::Other {
        op: "reading the digest map of",
        path: source.path().to_owned(),
        source: e,
    })
}

/// Checks the target's answer to `Open` against what we asked.
fn check_opened(o: &Opened, total: u64, asked: Mode) -> Result<(), SyncError> {
    if o.start_block > total {
        return Err(violation(format!(
            "the target starts at block {} of a volume of {total} blocks",
            o.start_block
        )));
    }
    if o.window_blocks == 0 || o.window_blocks > WINDOW_BLOCKS {
        return Err(violation(format!(
            "credit window of {} blocks (allowed: 1..={WINDOW_BLOCKS})",
            o.window_blocks
        )));
    }
    let mode_ok = o.mode == asked
        || (matches!(asked, Mode::Delta | Mode::Mapped) && o.mode == Mode::FullScan);
    if !mode_ok {
        return Err(violation(format!(
            "asked for {asked:?}, the target runs {:?}",
            o.mode
        )));
    }
    if o.start_block > 0 && o.mode != Mode::FullScan {
        return Err(violation("a resume mark outside a full scan"));
    }
    Ok(())
}

fn recv_loop<R: Read>(
    mut rd: FrameReader<R>,
    tx: Sender<Incoming>,
    failed: Arc<AtomicBool>,
    mut expect: Expect,
) {
    loop {
        let item = match rd.read() {
            Ok((Msg::Heartbeat(h), _)) => {
                expect.received.store(rd.bytes(), Ordering::Relaxed);
                match expect.heartbeat(h) {
                    Ok(()) => continue,
                    Err(e) => Incoming::Failed(e),
                }
            }
            Ok((Msg::BlockHashes(h), p)) => {
                let mut d = Vec::new();
                match wire::payload_to_digests(p, &mut d) {
                    Ok(()) => Incoming::Hashes(h.first, d),
                    Err(e) => Incoming::Failed(e),
                }
            }
            Ok((Msg::Holes(h), _)) => Incoming::Holes(h.first, h.count),
            Ok((Msg::SubHashes(s), p)) => {
                let mut d = Vec::new();
                match wire::payload_to_digests(p, &mut d) {
                    Ok(()) => Incoming::Subs(s.block, d),
                    Err(e) => Incoming::Failed(e),
                }
            }
            Ok((Msg::Committed(c), _)) => Incoming::Committed(c),
            Ok((m, _)) => Incoming::Failed(WireError::Unexpected {
                got: m.kind(),
                want: "digests",
            }),
            Err(e) => Incoming::Failed(e),
        };
        expect.received.store(rd.bytes(), Ordering::Relaxed);
        let item = match expect.check(&item) {
            Ok(()) => item,
            Err(e) => Incoming::Failed(e),
        };
        let stop = matches!(item, Incoming::Failed(_) | Incoming::Committed(_));
        if matches!(item, Incoming::Failed(_)) {
            failed.store(true, Ordering::SeqCst);
        }
        // Blocks while the comparer is behind (the queue is bounded); fails
        // once it is gone, and then nothing more is read.
        if tx.send(item).is_err() || !stop {
            if stop {
                return;
            }
            continue;
        }
        // After Committed the target closes: count what still comes, but
        // never more than DRAIN_BYTES (the caller stops waiting after
        // DRAIN_TIME), and keep none of it.
        let mut inner = rd.into_inner().take(DRAIN_BYTES);
        let mut buf = [0u8; 8192];
        let started = Instant::now();
        while started.elapsed() < DRAIN_TIME {
            match inner.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    expect.received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        return;
    }
}

fn write_loop<W: Write>(
    mut wr: FrameWriter<W>,
    rx: Receiver<(Msg, Vec<u8>)>,
    compress: Option<Compress>,
    clock: Clock,
    sent: Arc<AtomicU64>,
) -> Result<u64, WireError> {
    let mut zbuf = Vec::new();
    let mut zstd = compress
        .map(|c| wire::Compressor::new(c.level))
        .transpose()?;
    let mut adapt = compress.filter(|c| c.adaptive).map(|_| Adaptive::new());
    let mut finished = false;
    loop {
        let (msg, payload) = match rx.try_recv() {
            Ok(i) => i,
            Err(_) => {
                wr.flush()?;
                match rx.recv() {
                    Ok(i) => i,
                    Err(_) => return Ok(wr.bytes()),
                }
            }
        };
        let is_beat = matches!(msg, Msg::Heartbeat(_));
        // After Finish the target reads nothing more and may close at
        // once: a late heartbeat must not fail a committed session.
        if is_beat && finished {
            continue;
        }
        finished |= matches!(msg, Msg::Finish(_));
        // Counted before the bytes can reach the target.
        let bound = wr.bytes() + (9 + wire::MAX_HEADER + payload.len()) as u64;
        sent.fetch_max(bound, Ordering::SeqCst);
        let is_data = matches!(msg, Msg::Data(_));
        let started = Instant::now();
        let compressed = match (&msg, zstd.as_mut()) {
            (Msg::Data(_), Some(z)) if adapt.as_ref().is_none_or(|a| a.on) => {
                z.compress(&payload, &mut zbuf)
            }
            _ => false,
        };
        let compressing = started.elapsed();
        let raw = payload.len();
        let out = if compressed { zbuf.len() } else { raw };
        match msg {
            Msg::Data(d) if compressed => {
                wr.send(
                    &Msg::Data(Data {
                        codec: Codec::Zstd,
                        ..d
                    }),
                    &zbuf,
                )?;
            }
            msg => wr.send(&msg, &payload)?,
        }
        if let Some(a) = adapt.as_mut().filter(|_| is_data) {
            a.record(raw, out, compressing, started.elapsed() - compressing);
        }
        // The target takes what we send: that is progress too (heartbeats
        // aside, which go out whatever the target does).
        if !is_beat {
            clock.touch();
        }
    }
}

/// Data-frame compression: zstd at `level`; `adaptive` (what `auto`
/// means for a remote target) compresses only while that makes the
/// session faster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compress {
    pub level: i32,
    pub adaptive: bool,
}

/// Decides, a window of data frames at a time, whether compressing pays,
/// from the writer's own clock: the time it takes to compress, and the
/// time the link takes the bytes (a write blocks while the link is
/// full). Over a fast link (a LAN, loopback) compression only costs CPU
/// on both ends (measured: a first copy over ssh on 127.0.0.1 took 2.1 s
/// compressed against 1.4 s raw); over a slow one it saves more link time
/// than it takes.
#[derive(Debug)]
struct Adaptive {
    on: bool,
    frames: u32,
    raw: u64,
    out: u64,
    compressing: Duration,
    writing: Duration,
    /// Raw bytes per second compressed, and the share of bytes left,
    /// from the last window that compressed.
    speed: f64,
    ratio: f64,
    windows_off: u32,
}

/// Data frames per decision (2 MiB at 64 KiB blocks).
const ADAPT_FRAMES: u32 = 32;
/// Windows without compression before one compressed window measures
/// again what compression would do (the data may have changed).
const ADAPT_REPROBE: u32 = 16;

impl Adaptive {
    fn new() -> Self {
        Self {
            on: true,
            frames: 0,
            raw: 0,
            out: 0,
            compressing: Duration::ZERO,
            writing: Duration::ZERO,
            speed: f64::INFINITY,
            ratio: 1.0,
            windows_off: 0,
        }
    }

    /// One data frame: `raw` payload bytes went out as `out` bytes.
    fn record(&mut self, raw: usize, out: usize, compressing: Duration, writing: Duration) {
        self.frames += 1;
        self.raw += raw as u64;
        self.out += out as u64;
        self.compressing += compressing;
        self.writing += writing;
        if self.frames < ADAPT_FRAMES || self.raw == 0 {
            return;
        }
        let per_sec = |bytes: u64, t: Duration| match t.as_secs_f64() {
            0.0 => f64::INFINITY,
            s => bytes as f64 / s,
        };
        let link = per_sec(self.out, self.writing);
        let was = self.on;
        if self.on {
            self.speed = per_sec(self.raw, self.compressing);
            self.ratio = self.out as f64 / self.raw as f64;
            self.windows_off = 0;
            self.on = compression_pays(link, self.speed, self.ratio);
        } else {
            self.windows_off += 1;
            self.on =
                compression_pays(link, self.speed, self.ratio) || self.windows_off >= ADAPT_REPROBE;
        }
        if self.on != was {
            tracing::debug!(
                "compression {}: link {:.0} MB/s, zstd {:.0} MB/s to {:.0}%",
                if self.on { "on" } else { "off" },
                link / 1e6,
                self.speed / 1e6,
                self.ratio * 100.0
            );
        }
        *self = Self {
            frames: 0,
            raw: 0,
            out: 0,
            compressing: Duration::ZERO,
            writing: Duration::ZERO,
            ..*self
        };
    }
}

/// Compression saves `1 - ratio` of each byte's time on a link of `link`
/// bytes per second and costs `1 / speed` seconds per byte: it pays when
/// it saves more than it costs.
fn compression_pays(link: f64, speed: f64, ratio: f64) -> bool {
    (1.0 - ratio) / link > 1.0 / speed
}

struct Comparer<'a> {
    source: Arc<dyn Volume>,
    block: BlockSize,
    signer: Signer,
    size: u64,
    out: Sender<(Msg, Vec<u8>)>,
    incoming: Receiver<Incoming>,
    /// Target digests and holes received and not yet compared.
    hashes: TargetRuns,
    /// Block digests of zeros, by block length (only the last block is
    /// short).
    zero_digests: ZeroDigests,
    /// The same under the digest map's key.
    map_zero_digests: ZeroDigests,
    subs: VecDeque<(u64, Vec<Digest>)>,
    pending: VecDeque<Pending>,
    pending_refines: usize,
    send_ops: bool,
    collect_ranges: bool,
    report: &'a mut Report,
    /// Set by the receiver when the target's stream failed or ended.
    peer_failed: Arc<AtomicBool>,
    /// When the session last made progress.
    clock: Clock,
    /// The credit as the receiver checks it.
    credited_shared: Arc<AtomicU64>,
    refines_sent: Arc<AtomicU64>,
    counters: Arc<Counters>,
    /// Longest wait for the target before giving up on it.
    io_timeout: Duration,
    progress: &'a Progress,
    cancel: &'a Cancel,
    committed: Option<Committed>,
    /// The last credit sent, and how far it moves before the next.
    credited: u64,
    credit_step: u64,
    /// Digest-map mode: the map of the base, compared instead of the
    /// target's digests.
    map_old: Option<MapReader<std::fs::File>>,
    /// The map of this generation being written, and its signer.
    map_new: Option<MapWriter>,
    map_signer: Option<Signer>,
    /// The base's digests the early scan read for the chunk being
    /// compared, taken before the map's.
    early_base: VecDeque<Digest>,
    /// Bytes read from the source besides what the scan's reader reads:
    /// blocks read again (the early scan gave their data back before
    /// they were found to differ), and what an early scan's reader read
    /// before the scan started over.
    read_besides: u64,
}

impl Comparer<'_> {
    /// Queues a frame for the writer. A writer that cannot get rid of it
    /// for `io_timeout` means the target stopped reading.
    fn send(&self, msg: Msg, payload: Vec<u8>) -> Result<(), SyncError> {
        let mut item = (msg, payload);
        loop {
            match self.out.send_timeout(item, Duration::from_millis(200)) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Disconnected(_)) => return Err(self.peer_gone()),
                Err(SendTimeoutError::Timeout(back)) => item = back,
            }
            if self.cancel.is_cancelled() {
                return Err(SyncError::Interrupted);
            }
            // The target went away while our writer is stuck on it.
            if self.peer_failed.load(Ordering::SeqCst) {
                return Err(self.peer_gone());
            }
            if self.clock.idle() > self.io_timeout {
                return Err(self.stalled());
            }
        }
    }

    fn stalled(&self) -> SyncError {
        SyncError::Transport(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the target made no progress for {} s",
                self.io_timeout.as_secs()
            ),
        )))
    }

    /// The writer thread stopped: the real error comes from the receiver,
    /// possibly behind digests still queued.
    fn peer_gone(&self) -> SyncError {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.incoming.recv_timeout(left) {
                Ok(Incoming::Failed(e)) => return e.into(),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        SyncError::Transport(WireError::Closed)
    }

    /// Waits for the next message from the target, stashing digests.
    fn pump(&mut self) -> Result<(), SyncError> {
        loop {
            if self.cancel.is_cancelled() {
                return Err(SyncError::Interrupted);
            }
            match self.incoming.recv_timeout(Duration::from_millis(200)) {
                Ok(m) => return self.stash(m),
                Err(RecvTimeoutError::Timeout) if self.clock.idle() > self.io_timeout => {
                    return Err(self.stalled())
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SyncError::Transport(WireError::Closed))
                }
            }
        }
    }

    /// The target's view of `block` and the first block past it whose
    /// view may differ; every block before it is compared.
    fn target_view(&mut self, block: u64) -> Result<(Theirs, u64), SyncError> {
        loop {
            if let Some(v) = self
                .hashes
                .view(block)
                .map_err(|e| SyncError::from(WireError::Malformed(e)))?
            {
                return Ok(v);
            }
            // The target may be waiting for credit that only a pending
            // refinement holds back: settle what is ready and grant it.
            // Settling may stash the very digests we wait for: look again
            // before waiting for more.
            while !self.pending.is_empty() && self.resolve_pending(false)? {}
            self.grant_credit(block, 1)?;
            if self.hashes.is_empty() {
                self.pump()?;
            }
        }
    }

    fn zero_digest(&mut self, len: usize) -> Digest {
        self.zero_digests.get(&self.signer, len)
    }

    /// Lets the target scan on: every op below the first unsent block is
    /// sent. Sends only when the credit moves at least `step` blocks.
    fn grant_credit(&mut self, compared: u64, step: u64) -> Result<(), SyncError> {
        let total = self.block.blocks_in(self.size);
        let through = self.first_unsent(compared).min(total);
        if through >= self.credited + step {
            self.credited_shared.fetch_max(through, Ordering::SeqCst);
            self.send(Msg::Credit(Credit { through }), Vec::new())?;
            self.credited = through;
        }
        Ok(())
    }

    /// Compares every block from the target's start: first what the
    /// early scan did, if it ran, then the rest.
    fn run_scan(&mut self, opened: &Opened, early: Option<EarlyResults>) -> Result<(), SyncError> {
        let total = self.block.blocks_in(self.size);
        let (early_chunks, early_end, reader) = early.unwrap_or_default();
        let reader = match reader {
            Some(r) => r,
            None => {
                // The digest of every block read, computed by the readers
                // whenever the comparison falls behind (so every core
                // hashes): the map's in digest-map mode, where it is the
                // whole comparison; else the session's, which is also
                // the new map's.
                let signer = match (&self.map_old, &self.map_signer) {
                    (Some(_), Some(m)) => m.clone(),
                    _ => self.signer.clone(),
                };
                // From the first block the early scan's results (if any)
                // leave to read.
                let from = early_chunks
                    .back()
                    .map_or(opened.start_block, |c| c.chunk.first_block + c.chunk.blocks);
                ChunkReader::spawn(
                    self.source.clone(),
                    self.block,
                    self.size,
                    self.size,
                    from,
                    self.cancel.clone(),
                    Some(block_hash(signer)),
                )
            }
        };
        for e in early_chunks {
            if e.same {
                self.compare_same(&e.chunk);
            } else {
                self.early_base = e.base.into();
                self.compare_chunk(&e.chunk, e.dropped)?;
            }
            self.compared(&reader, e.chunk)?;
        }
        match early_end {
            Some(EarlyEnd::Read(e)) => return Err(e.into()),
            Some(EarlyEnd::Map(e)) => return Err(map_error(&self.source, e)),
            None => {}
        }
        for chunk in reader.chunks.iter() {
            if self.cancel.is_cancelled() {
                return Err(SyncError::Interrupted);
            }
            let chunk = chunk?;
            self.compare_chunk(&chunk, false)?;
            self.compared(&reader, chunk)?;
        }
        if self.cancel.is_cancelled() {
            return Err(SyncError::Interrupted);
        }
        self.report.source_bytes_read = reader.bytes_read() + self.read_besides;
        while !self.pending.is_empty() {
            self.resolve_pending(true)?;
        }
        tracing::debug!("compared {} blocks", total - opened.start_block);
        self.credited_shared.fetch_max(total, Ordering::SeqCst);
        self.send(Msg::Credit(Credit { through: total }), Vec::new())?;
        self.send(
            Msg::Finish(Finish {
                blocks: total - opened.start_block,
            }),
            Vec::new(),
        )
    }

    /// After a chunk's comparison: counters, its buffer back, credit.
    fn compared(&mut self, reader: &ChunkReader, chunk: Chunk) -> Result<(), SyncError> {
        self.report.source_bytes_read = reader.bytes_read() + self.read_besides;
        // The target checks this against the blocks it hashed: none in
        // digest-map mode.
        if self.map_old.is_none() {
            self.counters
                .blocks
                .store(self.report.blocks_compared, Ordering::Relaxed);
        }
        self.counters
            .read
            .store(self.report.source_bytes_read, Ordering::Relaxed);
        let compared = chunk.first_block + chunk.blocks;
        reader.recycle(chunk);
        self.grant_credit(compared, self.credit_step)
    }

    /// A chunk the early scan found equal to the base, block by block:
    /// only its digests go to the new map.
    fn compare_same(&mut self, chunk: &Chunk) {
        for (i, b) in (chunk.first_block..chunk.first_block + chunk.blocks).enumerate() {
            let len = self.block.len_of(b, self.size) as usize;
            self.record_map(None, len, chunk.digests.get(i).copied().flatten());
        }
        self.report.blocks_compared += chunk.blocks;
        self.progress.update(
            self.block
                .offset_of(chunk.first_block + chunk.blocks)
                .min(self.size),
            self.report.data_bytes,
        );
    }

    /// First block with an op not yet sent, given everything before
    /// `scanned` was compared.
    fn first_unsent(&self, scanned: u64) -> u64 {
        self.pending
            .front()
            .map_or(scanned, |p| p.block(self.block))
    }

    /// Compares a chunk's blocks and queues what they need. `dropped`: a
    /// data chunk of the early scan that kept only its digests.
    fn compare_chunk(&mut self, chunk: &Chunk, dropped: bool) -> Result<(), SyncError> {
        // Only a full scan's early chunks come without their data.
        debug_assert!(!dropped || self.map_old.is_none());
        let bs = self.block.bytes() as usize;
        let n = chunk.blocks;
        let end = chunk.first_block + n;
        let mut b = chunk.first_block;
        let mut again = Vec::new();
        while b < end {
            let len = self.block.len_of(b, self.size) as usize;
            let i = (b - chunk.first_block) as usize;
            let mut data = (!chunk.hole && !dropped).then(|| &chunk.data[i * bs..i * bs + len]);
            let mut known = chunk.digests.get(i).copied().flatten();
            let decision = if self.map_old.is_some() {
                // Digest-map mode: the map of the base stands in for the
                // target's digests (the target scans nothing).
                self.map_decision(data, len, known)?
            } else {
                let (theirs, run_end) = self.target_view(b)?;
                if chunk.hole && theirs == Theirs::Hole {
                    // Hole against hole: the whole run costs nothing.
                    let upto = run_end.min(end);
                    self.report.blocks_compared += upto - b;
                    for z in b..upto {
                        let l = self.block.len_of(z, self.size) as usize;
                        self.record_map(None, l, None);
                    }
                    b = upto;
                    continue;
                }
                if dropped {
                    // Equal digests, or zeros against a hole: nothing to
                    // send, and the digest is the map's.
                    let same = match theirs {
                        Theirs::Digest(t) => known == Some(t),
                        Theirs::Hole => known == Some(self.zero_digest(len)),
                    };
                    if same {
                        self.record_map(None, len, known);
                        self.report.blocks_compared += 1;
                        b += 1;
                        continue;
                    }
                    // It differs, and its data was given back: read it
                    // again, and decide on what was read now (a live
                    // source may have changed since it was hashed).
                    again.resize(len, 0);
                    self.source
                        .read_at(&mut again[..len], self.block.offset_of(b))?;
                    self.read_besides += len as u64;
                    data = Some(&again[..len]);
                    known = None;
                }
                let zero_digest = self.zero_digest(len);
                let (d, digest) =
                    decide_holes_known(&self.signer, &zero_digest, data, &theirs, known);
                self.record_map(data, len, digest);
                d
            };
            self.report.blocks_compared += 1;
            let offset = self.block.offset_of(b);
            match decision {
                HoleDecision::Same => {}
                HoleDecision::Zero => {
                    self.report.blocks_changed += 1;
                    self.report.zero_bytes += len as u64;
                    match self.pending.back_mut() {
                        Some(Pending::Zero {
                            offset: o,
                            len: l,
                            end_block,
                        }) if *o + *l == offset => {
                            *l += len as u64;
                            *end_block = b + 1;
                        }
                        _ => self.pending.push_back(Pending::Zero {
                            offset,
                            len: len as u64,
                            end_block: b + 1,
                        }),
                    }
                }
                HoleDecision::SendRuns(runs) => {
                    self.report.blocks_changed += 1;
                    self.pending.push_back(Pending::Runs {
                        block: b,
                        offset,
                        data: data.expect("source data").to_vec(),
                        runs,
                    });
                    // Counted with refinements: it holds a block's data.
                    self.pending_refines += 1;
                }
                HoleDecision::Refine => {
                    self.report.blocks_changed += 1;
                    self.refines_sent.fetch_add(1, Ordering::SeqCst);
                    self.send(Msg::Refine(Refine { block: b }), Vec::new())?;
                    self.pending.push_back(Pending::Refine {
                        block: b,
                        offset,
                        data: data.expect("source data").to_vec(),
                    });
                    self.pending_refines += 1;
                }
            }
            // Keep memory bounded: wait for the oldest refinement.
            while self.pending_refines >= MAX_PENDING_REFINES {
                self.resolve_pending(true)?;
            }
            b += 1;
        }
        self.progress.update(
            self.block.offset_of(chunk.first_block + n).min(self.size),
            self.report.data_bytes,
        );
        // Send what is ready without waiting.
        while !self.pending.is_empty() && self.resolve_pending(false)? {}
        Ok(())
    }

    /// Handles the oldest pending item. Returns false when it is a
    /// refinement whose digests have not arrived and `wait` is false.
    fn resolve_pending(&mut self, wait: bool) -> Result<bool, SyncError> {
        match self.pending.front() {
            None => Ok(false),
            Some(Pending::Zero { .. }) => {
                let Some(Pending::Zero { offset, len, .. }) = self.pending.pop_front() else {
                    unreachable!()
                };
                self.note_range(offset, len);
                if self.send_ops {
                    self.send(Msg::Zero(Zero { offset, len }), Vec::new())?;
                }
                Ok(true)
            }
            Some(Pending::Runs { .. }) => {
                let Some(Pending::Runs {
                    offset, data, runs, ..
                }) = self.pending.pop_front()
                else {
                    unreachable!()
                };
                self.pending_refines -= 1;
                self.send_runs(offset, &data, &runs)?;
                Ok(true)
            }
            Some(Pending::Refine { block, .. }) => {
                let block = *block;
                loop {
                    while let Ok(m) = self.incoming.try_recv() {
                        self.stash(m)?;
                    }
                    if let Some((b, _)) = self.subs.front() {
                        if *b != block {
                            return Err(WireError::Malformed(format!(
                                "sub-digests for block {b} arrived while waiting for {block}"
                            ))
                            .into());
                        }
                        break;
                    }
                    if !wait {
                        return Ok(false);
                    }
                    self.pump()?;
                }
                let (_, theirs) = self.subs.pop_front().expect("checked");
                let Some(Pending::Refine { offset, data, .. }) = self.pending.pop_front() else {
                    unreachable!()
                };
                self.pending_refines -= 1;
                let runs = changed_runs(&self.signer, &data, &theirs);
                self.send_runs(offset, &data, &runs)?;
                Ok(true)
            }
        }
    }

    /// Digest-map mode: what to do with a block, compared against the
    /// base's digest in the map (read in step with the scan).
    /// `digest` is the map's digest of `data` when the reader computed it.
    fn map_decision(
        &mut self,
        data: Option<&[u8]>,
        len: usize,
        digest: Option<Digest>,
    ) -> Result<HoleDecision, SyncError> {
        let theirs = match (self.early_base.pop_front(), &mut self.map_old) {
            (Some(d), _) => d,
            (None, Some(r)) => r.next_digest().map_err(|e| map_error(&self.source, e))?,
            (None, None) => unreachable!("map_decision outside digest-map mode"),
        };
        let Some(data) = data else {
            // A hole of the source reads as zeros.
            let zero = self.map_zero_digest(len);
            self.record_map(None, len, Some(zero));
            return Ok(if theirs == zero {
                HoleDecision::Same
            } else {
                HoleDecision::Zero
            });
        };
        let digest = match digest {
            Some(d) => d,
            None => self
                .map_signer
                .as_ref()
                .expect("digest-map mode has a signer")
                .block_digest(data),
        };
        let d = decide_digest(digest, data, Some(&theirs));
        self.record_map(Some(data), len, Some(digest));
        Ok(match d {
            Decision::Same => HoleDecision::Same,
            Decision::Zero => HoleDecision::Zero,
            Decision::Refine | Decision::SendWhole => HoleDecision::Refine,
        })
    }

    /// The map's digest of an all-zero block of `len` bytes (cached: a
    /// sparse source has many).
    fn map_zero_digest(&mut self, len: usize) -> Digest {
        let ms = self
            .map_signer
            .as_ref()
            .expect("digest-map mode has a signer");
        self.map_zero_digests.get(ms, len)
    }

    /// Appends a block's map digest (`digest` if already computed; a
    /// hole's is the zero block's) to the new map. A map that cannot be
    /// written is dropped, never the session: the next one does a full
    /// scan.
    fn record_map(&mut self, data: Option<&[u8]>, len: usize, digest: Option<Digest>) {
        if self.map_new.is_none() {
            return;
        }
        let d = match (digest, data) {
            (Some(d), _) => d,
            (None, None) => self.map_zero_digest(len),
            (None, Some(data)) => self
                .map_signer
                .as_ref()
                .expect("a map being written has a signer")
                .block_digest(data),
        };
        if let Some(w) = &mut self.map_new {
            if let Err(e) = w.push(&d) {
                tracing::warn!("writing the digest map: {e}; the next sync does a full scan");
                self.map_new = None;
            }
        }
    }

    /// Sends `runs` (offset within the block, length) of a block's `data`.
    fn send_runs(
        &mut self,
        offset: u64,
        data: &[u8],
        runs: &[(u32, u32)],
    ) -> Result<(), SyncError> {
        for &(off, len) in runs {
            let (o, l) = (off as usize, len as usize);
            self.report.data_bytes += len as u64;
            self.note_range(offset + off as u64, len as u64);
            if self.send_ops {
                let d = Data {
                    offset: offset + off as u64,
                    len,
                    codec: Codec::Raw,
                };
                self.send(Msg::Data(d), data[o..o + l].to_vec())?;
            }
        }
        Ok(())
    }

    fn stash(&mut self, m: Incoming) -> Result<(), SyncError> {
        match m {
            Incoming::Hashes(first, d) => self.hashes.push(Run::Digests(first, d)),
            Incoming::Holes(first, n) => self.hashes.push(Run::Holes(first, n)),
            Incoming::Subs(b, d) => self.subs.push_back((b, d)),
            Incoming::Committed(c) => self.committed = Some(c),
            Incoming::Failed(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn note_range(&mut self, offset: u64, len: u64) {
        if !self.collect_ranges {
            return;
        }
        match self.report.differing.last_mut() {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => self.report.differing.push((offset, len)),
        }
    }

    /// Ships ranges known to have changed; the target reads nothing.
    fn run_delta(
        &mut self,
        changes: Box<dyn Iterator<Item = Result<Change, VolumeError>> + Send>,
    ) -> Result<(), SyncError> {
        let bs = self.block.bytes() as u64;
        let mut buf = vec![0u8; bs as usize];
        let mut done = 0;
        for change in changes {
            if self.cancel.is_cancelled() {
                return Err(SyncError::Interrupted);
            }
            let change = change?;
            let r = match &change {
                Change::Zero(r) | Change::Data(r) => r,
                Change::Refined(p) => &p.range,
            };
            // The target takes ops only in increasing offset order.
            if r.start < done && r.start < self.size {
                return Err(SyncError::Source(VolumeError::Other {
                    op: "reading the changed ranges of",
                    path: self.source.path().to_owned(),
                    source: std::io::Error::other(format!(
                        "changed ranges out of order: {}..{} after {done}",
                        r.start, r.end
                    )),
                }));
            }
            match change {
                Change::Zero(r) => {
                    let r = r.start.min(self.size)..r.end.min(self.size);
                    if r.is_empty() {
                        continue;
                    }
                    self.report.zero_bytes += r.end - r.start;
                    self.report.blocks_changed += (r.end - r.start).div_ceil(bs);
                    self.send(
                        Msg::Zero(Zero {
                            offset: r.start,
                            len: r.end - r.start,
                        }),
                        Vec::new(),
                    )?;
                    done = done.max(r.end);
                }
                Change::Refined(p) => {
                    done = done.max(p.range.end);
                    self.send_refined(p)?;
                    self.progress.update(done, self.report.data_bytes);
                }
                Change::Data(r) => {
                    let mut off = r.start.min(self.size);
                    let end = r.end.min(self.size);
                    while off < end {
                        // Stay within one block so frames stay small.
                        let n = (bs - off % bs).min(end - off) as usize;
                        self.source.read_at(&mut buf[..n], off)?;
                        self.report.source_bytes_read += n as u64;
                        self.counters
                            .read
                            .store(self.report.source_bytes_read, Ordering::Relaxed);
                        self.report.blocks_changed += 1;
                        if blockdiff::is_zero(&buf[..n]) {
                            self.report.zero_bytes += n as u64;
                            self.send(
                                Msg::Zero(Zero {
                                    offset: off,
                                    len: n as u64,
                                }),
                                Vec::new(),
                            )?;
                        } else {
                            self.report.data_bytes += n as u64;
                            let d = Data {
                                offset: off,
                                len: n as u32,
                                codec: Codec::Raw,
                            };
                            self.send(Msg::Data(d), buf[..n].to_vec())?;
                        }
                        off += n as u64;
                        done = done.max(off);
                        self.progress.update(done, self.report.data_bytes);
                    }
                }
            }
        }
        self.send(
            Msg::Finish(Finish {
                blocks: self.report.blocks_changed,
            }),
            Vec::new(),
        )
    }

    /// Ships a refined piece's ops and counts what it took.
    fn send_refined(&mut self, p: super::cbt_refine::Refined) -> Result<(), SyncError> {
        use super::cbt_refine::Op;
        self.report.source_bytes_read += p.new_bytes_read + p.base_bytes_read;
        self.report.base_bytes_read += p.base_bytes_read;
        self.report.blocks_changed += p.blocks_changed;
        self.counters
            .read
            .store(self.report.source_bytes_read, Ordering::Relaxed);
        for op in p.ops {
            match op {
                Op::Data { offset, data } => {
                    self.report.data_bytes += data.len() as u64;
                    let d = Data {
                        offset,
                        len: data.len() as u32,
                        codec: Codec::Raw,
                    };
                    self.send(Msg::Data(d), data)?;
                }
                Op::Zero { offset, len } => {
                    self.report.zero_bytes += len;
                    self.send(Msg::Zero(Zero { offset, len }), Vec::new())?;
                }
            }
        }
        Ok(())
    }

    /// Waits for the target's verdict.
    fn finish(&mut self) -> Result<(), SyncError> {
        while self.committed.is_none() {
            self.pump()?;
        }
        Ok(())
    }

    /// The verdict must be about the generation we asked for.
    fn check_committed(&self, params: &SessionParams, opened: &Opened) -> Result<(), SyncError> {
        let c = self.committed.as_ref().expect("finish sets committed");
        // After a consistent generation n comes n + 1; after a torn
        // replica the target alone knows the number.
        let next = |n: u64| match &opened.state.generation {
            Some(g) if opened.state.consistent => n == g.number.saturating_add(1),
            _ => n >= 1,
        };
        let ok = if self.send_ops {
            c.state.consistent
                && c.state
                    .generation
                    .as_ref()
                    .is_some_and(|g| g.snapshot == params.snapshot_id && next(g.number))
        } else {
            // A dry run or a verify commits nothing.
            true
        };
        if !ok {
            return Err(violation(format!(
                "the target committed {:?} (consistent: {}), not the generation of {}",
                c.state
                    .generation
                    .as_ref()
                    .map(|g| (g.number, wire::escape(&g.snapshot))),
                c.state.consistent,
                wire::escape(&params.snapshot_id)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{Generation, ReplicaState};

    /// Feeds one window of frames of 64 KiB each: compressing at
    /// `speed` MB/s to `ratio`, over a link of `link` MB/s.
    fn window(a: &mut Adaptive, speed: f64, ratio: f64, link: f64) {
        for _ in 0..ADAPT_FRAMES {
            let raw = 64 << 10;
            let out = if a.on {
                (raw as f64 * ratio) as usize
            } else {
                raw
            };
            let compressing = if a.on {
                Duration::from_secs_f64(raw as f64 / (speed * 1e6))
            } else {
                Duration::ZERO
            };
            let writing = Duration::from_secs_f64(out as f64 / (link * 1e6));
            a.record(raw, out, compressing, writing);
        }
    }

    #[test]
    fn compression_pays_only_where_the_link_is_slower_than_what_it_saves() {
        // zstd at 400 MB/s leaving 40%: it saves 60% of a byte's link time.
        assert!(compression_pays(100e6, 400e6, 0.4)); // 1 Gbit/s
        assert!(!compression_pays(600e6, 400e6, 0.4)); // ssh on loopback
        assert!(!compression_pays(100e6, 400e6, 1.0)); // random data
        assert!(!compression_pays(f64::INFINITY, 400e6, 0.1));
    }

    #[test]
    fn adaptive_compression_follows_the_link() {
        let mut a = Adaptive::new();
        assert!(a.on, "measures compression first");
        // A fast link: compression is turned off after one window...
        window(&mut a, 400.0, 0.4, 2000.0);
        assert!(!a.on);
        // ...and tried again after ADAPT_REPROBE windows, then off again.
        for _ in 0..ADAPT_REPROBE - 1 {
            window(&mut a, 400.0, 0.4, 2000.0);
            assert!(!a.on);
        }
        window(&mut a, 400.0, 0.4, 2000.0);
        assert!(a.on, "re-measures");
        window(&mut a, 400.0, 0.4, 2000.0);
        assert!(!a.on);
        // The link slows down (a WAN): raw writes block, compression pays.
        window(&mut a, 400.0, 0.4, 50.0);
        assert!(a.on);
        window(&mut a, 400.0, 0.4, 50.0);
        assert!(a.on, "stays on while it pays");
        // Incompressible data: nothing saved, compression stops.
        window(&mut a, 400.0, 1.0, 50.0);
        assert!(!a.on);
    }

    #[test]
    fn the_replica_after_a_failure_follows_what_the_target_reported() {
        let params = SessionParams::new(
            "/dst".into(),
            BlockSize::default(),
            "src".into(),
            "snap".into(),
            Duration::from_secs(1),
        );
        let gen = Generation {
            number: 3,
            snapshot: "s3".into(),
        };
        let opened = |consistent: bool| Opened {
            target_size: 0,
            state: ReplicaState {
                source_id: Some("src".into()),
                generation: consistent.then(|| gen.clone()),
                consistent,
                resume: None,
                recovered: None,
            },
            start_block: 0,
            window_blocks: 64,
            mode: Mode::FullScan,
            resizable: true,
            target_identity: "file:1:2".into(),
            target_strong: true,
            unvouched: None,
        };
        let after = |o: &Opened, p: &SessionParams, data, zeroed| {
            let a = ReplicaAfter::after_failure(o, p, data, zeroed);
            (a.inconsistent, a.resume)
        };
        // A first copy (or a new volume) that failed midway: torn, resumable.
        assert_eq!(after(&opened(false), &params, 1 << 20, 0), (true, true));
        // A consistent replica behind a journal: untouched.
        assert_eq!(after(&opened(true), &params, 1 << 20, 0), (false, false));
        // Without a journal it is written in place, zeroes too.
        let mut no_journal = params.clone();
        no_journal.journal_max = 0;
        assert_eq!(after(&opened(true), &no_journal, 0, 4096), (true, true));
        // Nothing sent yet: as it was.
        assert_eq!(after(&opened(true), &no_journal, 0, 0), (false, false));
        // A thin-LV target with its rollback snapshot: torn until the next
        // open rolls it back, nothing to resume.
        let mut snap = params.clone();
        snap.target_snapshot = true;
        assert_eq!(after(&opened(true), &snap, 4096, 0), (true, false));
        // A dry run changes nothing.
        let mut dry = params.clone();
        dry.dry_run = true;
        assert_eq!(after(&opened(false), &dry, 4096, 0), (true, false));
    }
}
