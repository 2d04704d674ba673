//! The replication engine: the source side ([`source`]) drives a session
//! against the target side ([`target`], what `snapsync serve` runs) over
//! any byte stream (see the `wire` crate for the protocol).

pub mod cbt_refine;
pub mod fanout;
pub mod holes;
pub mod map;
pub mod source;
pub mod target;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How many blocks the target may hash ahead of the source's credit. At
/// 64 KiB blocks that is 512 MiB of volume but only 128 KiB of digests in
/// flight.
pub const WINDOW_BLOCKS: u64 = 1 << 16;
/// Bytes read from a volume per IO: large sequential reads keep a disk busy.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Differing blocks awaiting their sub-block digests, at most.
pub const MAX_PENDING_REFINES: usize = 128;

/// A cancellation flag shared with signal handlers.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Blocks per IO chunk for a block size.
pub fn blocks_per_chunk(block: blockdiff::BlockSize) -> u64 {
    (CHUNK_BYTES as u64 / block.bytes() as u64).max(1)
}

/// Most blocks one hole chunk covers: a hole of any size costs one
/// `SEEK_DATA` and a chunk per this many blocks (4 GiB at 64 KiB blocks),
/// and fits the target's credit window whole.
pub const HOLE_CHUNK_BLOCKS: u64 = WINDOW_BLOCKS;

/// Chunks a reader may hold ready ahead of its consumer.
pub const READ_AHEAD: usize = 8;

/// A run of whole blocks read from a volume.
#[derive(Debug)]
pub struct Chunk {
    pub first_block: u64,
    pub blocks: u64,
    /// The chunk's bytes; empty when `hole`.
    pub data: Vec<u8>,
    /// Known to be all zeros without reading (a hole, or past the end of
    /// what the volume held before it grew). A hole chunk may cover up to
    /// [`HOLE_CHUNK_BLOCKS`] blocks; a data chunk [`blocks_per_chunk`].
    pub hole: bool,
}

/// A thread reading a volume front to back in [`CHUNK_BYTES`] chunks ahead
/// of its consumer, so reading and hashing overlap. Buffers come back
/// through [`ChunkReader::recycle`] so a scan of any size reuses the same
/// few megabytes.
#[derive(Debug)]
pub struct ChunkReader {
    pub chunks: crossbeam_channel::Receiver<Result<Chunk, snapshot::VolumeError>>,
    free: crossbeam_channel::Sender<Vec<u8>>,
    handle: Option<std::thread::JoinHandle<()>>,
    bytes_read: Arc<std::sync::atomic::AtomicU64>,
}

impl ChunkReader {
    /// Reads blocks `start_block..` of a volume of logical size `size`,
    /// of which only the first `readable` bytes exist (past them: zeros).
    pub fn spawn(
        volume: Arc<dyn snapshot::Volume>,
        block: blockdiff::BlockSize,
        size: u64,
        readable: u64,
        start_block: u64,
        cancel: Cancel,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(READ_AHEAD);
        let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(READ_AHEAD + 2);
        let bytes_read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = bytes_read.clone();
        let handle = std::thread::Builder::new()
            .name("volume-read".into())
            .spawn(move || {
                let total = block.blocks_in(size);
                let per = blocks_per_chunk(block);
                let mut b = start_block;
                while b < total && !cancel.is_cancelled() {
                    let offset = block.offset_of(b);
                    // Whole blocks of hole from here: one SEEK_DATA per
                    // hole, not one per chunk (holes are ranges).
                    let hole_blocks =
                        hole_blocks_at(volume.as_ref(), block, offset, readable, size)
                            .min(total - b)
                            .min(HOLE_CHUNK_BLOCKS);
                    // A data chunk ends where a hole begins (whole blocks):
                    // scattered data costs what it holds, not 1 MiB apiece.
                    let n = if hole_blocks > 0 {
                        hole_blocks
                    } else {
                        let to_hole = volume
                            .next_hole(offset)
                            .saturating_sub(offset)
                            .div_ceil(block.bytes() as u64);
                        per.min(total - b).min(to_hole.max(1))
                    };
                    let len = (size - offset).min(n * block.bytes() as u64) as usize;
                    let real_end = (offset + len as u64).min(readable);
                    let hole = hole_blocks > 0
                        || offset >= real_end
                        || volume.next_data(offset).is_none_or(|d| d >= real_end);
                    let mut data = Vec::new();
                    let mut r = Ok(());
                    if !hole {
                        data = free_rx.try_recv().unwrap_or_default();
                        data.resize(len, 0);
                        let n_real = (real_end - offset) as usize;
                        r = volume.read_at(&mut data[..n_real], offset);
                        data[n_real..].fill(0);
                        counter.fetch_add(n_real as u64, Ordering::Relaxed);
                        volume.done_with(offset, n_real as u64);
                    }
                    let failed = r.is_err();
                    let item = r.map(|()| Chunk {
                        first_block: b,
                        blocks: n,
                        data,
                        hole,
                    });
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                    b += n;
                }
            })
            .expect("spawn volume reader");
        Self {
            chunks: rx,
            free: free_tx,
            handle: Some(handle),
            bytes_read,
        }
    }

    /// Hands a chunk's buffer back for reuse.
    pub fn recycle(&self, chunk: Chunk) {
        if !chunk.hole {
            let _ = self.free.try_send(chunk.data);
        }
    }

    /// Bytes actually read from the volume so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

impl Drop for ChunkReader {
    fn drop(&mut self) {
        // Unblock the thread (its sends fail once the receiver is gone) and
        // wait for it, so no read outlives the session.
        let (_, dead) = crossbeam_channel::bounded(0);
        self.chunks = dead;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// How many whole blocks from `offset` (a block boundary) are known to
/// read as zeros: a hole up to the next data (`SEEK_DATA`), or anything
/// past `readable`. The last block of the volume counts whole when the
/// hole reaches the volume's end.
fn hole_blocks_at(
    volume: &dyn snapshot::Volume,
    block: blockdiff::BlockSize,
    offset: u64,
    readable: u64,
    size: u64,
) -> u64 {
    let zeros_until = if offset >= readable {
        size
    } else {
        match volume.next_data(offset) {
            None => size,
            Some(d) if d >= readable => size,
            Some(d) => d.min(size),
        }
    };
    if zeros_until <= offset {
        return 0;
    }
    let bs = block.bytes() as u64;
    if zeros_until >= size {
        block.blocks_in(size) - offset / bs
    } else {
        (zeros_until - offset) / bs
    }
}

/// When a session last made progress, shared by its threads. Only real
/// progress touches it (new data, counters that advanced), never a frame
/// that merely arrived, so a trickling peer cannot keep a session alive.
#[derive(Debug, Clone)]
pub struct Clock {
    start: std::time::Instant,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            last_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Progress now.
    pub fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Time since the last progress.
    pub fn idle(&self) -> std::time::Duration {
        let now = self.start.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}
