//! The replication engine: the source side ([`source`]) drives a session
//! against the target side ([`target`], what `snapsync serve` runs) over
//! any byte stream (see the `wire` crate for the protocol).

pub mod cbt_refine;
pub mod early;
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

/// What a [`ChunkReader`] may compute of each block it reads, on the
/// thread that read it while the bytes are still in its cache: one entry
/// per block of a data chunk. A reader with one read in flight computes it
/// only while its consumer falls behind (reading costs less than hashing,
/// so the two threads share the hashing and both cores stay busy); a
/// reader with several, always. The consumer computes what it finds
/// missing.
pub type BlockHash = Arc<dyn Fn(&[u8]) -> Option<blockdiff::Digest> + Send + Sync>;

/// Digests of all-zero blocks under one signer, by length, computed once
/// each (only a volume's last block is short, so a scan needs one or two).
#[derive(Debug, Default)]
pub struct ZeroDigests(Vec<(usize, blockdiff::Digest)>);

impl ZeroDigests {
    /// The digest of `len` zero bytes under `signer`.
    pub fn get(&mut self, signer: &blockdiff::Signer, len: usize) -> blockdiff::Digest {
        if let Some((_, d)) = self.0.iter().find(|(l, _)| *l == len) {
            return *d;
        }
        let d = signer.block_digest(&vec![0u8; len]);
        self.0.push((len, d));
        d
    }
}

/// A run of whole blocks read from a volume.
#[derive(Debug)]
pub struct Chunk {
    pub first_block: u64,
    pub blocks: u64,
    /// The chunk's bytes; empty when `hole`.
    pub data: Vec<u8>,
    /// Known to be all zeros without reading (a hole, or past the end of
    /// what the volume held before it grew). A hole chunk may cover up to
    /// [`HOLE_CHUNK_BLOCKS`] blocks; a data chunk [`blocks_per_chunk`], or
    /// the volume's preferred read.
    pub hole: bool,
    /// The reader's [`BlockHash`] of each block of a data chunk; empty
    /// for a hole, or when the reader left it to the consumer.
    pub digests: Vec<Option<blockdiff::Digest>>,
}

/// A thread reading a volume front to back in [`CHUNK_BYTES`] chunks (or
/// the volume's [`preferred_read`](snapshot::Volume::preferred_read)) ahead
/// of its consumer, so reading and hashing overlap; with as many reads in
/// flight as the volume asks for, delivered in order. Buffers come back
/// through [`ChunkReader::recycle`] so a scan of any size reuses the same
/// few megabytes.
#[derive(Debug)]
pub struct ChunkReader {
    pub chunks: crossbeam_channel::Receiver<Result<Chunk, snapshot::VolumeError>>,
    free: Arc<FreeBuffers>,
    handle: Option<std::thread::JoinHandle<()>>,
    bytes_read: Arc<std::sync::atomic::AtomicU64>,
}

impl ChunkReader {
    /// Reads blocks `start_block..` of a volume of logical size `size`,
    /// of which only the first `readable` bytes exist (past them: zeros),
    /// computing `hash` of each block read.
    pub fn spawn(
        volume: Arc<dyn snapshot::Volume>,
        block: blockdiff::BlockSize,
        size: u64,
        readable: u64,
        start_block: u64,
        cancel: Cancel,
        hash: Option<BlockHash>,
    ) -> Self {
        // Larger reads where the volume asks for them, with as many bytes
        // read ahead as usual (at least two chunks), and as many in flight
        // at once as it wants.
        let per = blocks_per_chunk(block).max(
            volume
                .preferred_read()
                .map_or(0, |n| n as u64 / block.bytes() as u64),
        );
        let workers = volume.reads_in_flight().clamp(1, 64);
        let ahead = (READ_AHEAD * CHUNK_BYTES / (per * block.bytes() as u64) as usize).max(2);
        let (tx, rx) = crossbeam_channel::bounded(ahead);
        let free = Arc::new(FreeBuffers::new(ahead + workers + 2));
        let bytes_read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reading = Reading {
            volume,
            block,
            size,
            readable,
            per,
            free: free.clone(),
            counter: bytes_read.clone(),
            hash,
        };
        let handle = std::thread::Builder::new()
            .name("volume-read".into())
            .spawn(move || {
                if workers == 1 {
                    reading.front_to_back(start_block, &cancel, |plan| {
                        // Hash here too while the consumer has half the
                        // read-ahead still to hash.
                        let hash = tx.len() >= ahead.div_ceil(2);
                        tx.send(reading.read(plan, hash)).is_ok()
                    });
                } else {
                    reading.in_flight(start_block, &cancel, workers, tx);
                }
            })
            .expect("spawn volume reader");
        Self {
            chunks: rx,
            free,
            handle: Some(handle),
            bytes_read,
        }
    }

    /// Hands a chunk's buffer back for reuse.
    pub fn recycle(&self, chunk: Chunk) {
        // A chunk whose data was given back early holds no buffer.
        if !chunk.hole && chunk.data.capacity() > 0 {
            self.recycle_buffer(chunk.data);
        }
    }

    /// Hands a data chunk's buffer back for reuse.
    pub fn recycle_buffer(&self, data: Vec<u8>) {
        self.free.put(data);
    }

    /// Bytes actually read from the volume so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Stops reading; returns the bytes it read in all.
    pub fn stop(self) -> u64 {
        let read = self.bytes_read.clone();
        drop(self);
        read.load(Ordering::Relaxed)
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

/// A reader's spare buffers, the one given back last taken first: it is
/// the one most likely still in a CPU cache, and a scan that copies every
/// byte of a volume into its buffers pays for each cache miss there.
#[derive(Debug)]
struct FreeBuffers {
    stack: std::sync::Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl FreeBuffers {
    fn new(max: usize) -> Self {
        Self {
            stack: std::sync::Mutex::new(Vec::with_capacity(max)),
            max,
        }
    }

    /// The buffer given back last, or a new empty one.
    fn take(&self) -> Vec<u8> {
        let mut s = self.stack.lock().unwrap_or_else(|p| p.into_inner());
        s.pop().unwrap_or_default()
    }

    /// Keeps `buf` for reuse, if there is room.
    fn put(&self, buf: Vec<u8>) {
        let mut s = self.stack.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < self.max {
            s.push(buf);
        }
    }
}

/// What a [`ChunkReader`] reads next: `blocks` blocks from `first_block`,
/// a hole or data.
#[derive(Debug, Clone, Copy)]
struct Plan {
    first_block: u64,
    blocks: u64,
    hole: bool,
}

/// A [`ChunkReader`]'s reading side.
struct Reading {
    volume: Arc<dyn snapshot::Volume>,
    block: blockdiff::BlockSize,
    size: u64,
    readable: u64,
    per: u64,
    free: Arc<FreeBuffers>,
    counter: Arc<std::sync::atomic::AtomicU64>,
    hash: Option<BlockHash>,
}

impl Reading {
    /// Plans the chunks from `start_block` in order, handing each to
    /// `next` until it returns false.
    fn front_to_back(&self, start_block: u64, cancel: &Cancel, mut next: impl FnMut(Plan) -> bool) {
        let (volume, block, size, readable) =
            (self.volume.as_ref(), self.block, self.size, self.readable);
        let total = block.blocks_in(size);
        let mut b = start_block;
        // Data runs up to here without a hole: asked once per extent,
        // not once per chunk.
        let mut data_until = 0;
        while b < total && !cancel.is_cancelled() {
            let offset = block.offset_of(b);
            let in_data = offset < data_until;
            // Whole blocks of hole from here: one SEEK_DATA per hole, not
            // one per chunk (holes are ranges).
            let hole_blocks = if in_data {
                0
            } else {
                hole_blocks_at(volume, block, offset, readable, size)
                    .min(total - b)
                    .min(HOLE_CHUNK_BLOCKS)
            };
            // A data chunk ends where a hole begins (whole blocks):
            // scattered data costs what it holds, not 1 MiB apiece.
            let n = if hole_blocks > 0 {
                hole_blocks
            } else {
                if !in_data {
                    data_until = volume.next_hole(offset);
                }
                let to_hole = data_until
                    .saturating_sub(offset)
                    .div_ceil(block.bytes() as u64);
                self.per.min(total - b).min(to_hole.max(1))
            };
            let len = (size - offset).min(n * block.bytes() as u64);
            let real_end = (offset + len).min(readable);
            let hole = hole_blocks > 0
                || offset >= real_end
                || (!in_data && volume.next_data(offset).is_none_or(|d| d >= real_end));
            let plan = Plan {
                first_block: b,
                blocks: n,
                hole,
            };
            if !next(plan) {
                return;
            }
            b += n;
        }
    }

    /// Reads what `plan` says (nothing for a hole), with its blocks'
    /// [`BlockHash`] if `hash`.
    fn read(&self, plan: Plan, hash: bool) -> Result<Chunk, snapshot::VolumeError> {
        let offset = self.block.offset_of(plan.first_block);
        let len = (self.size - offset).min(plan.blocks * self.block.bytes() as u64) as usize;
        let mut data = Vec::new();
        let mut digests = Vec::new();
        if !plan.hole {
            let real_end = (offset + len as u64).min(self.readable);
            data = self.free.take();
            data.resize(len, 0);
            let n_real = (real_end - offset) as usize;
            self.volume.read_at(&mut data[..n_real], offset)?;
            data[n_real..].fill(0);
            self.counter.fetch_add(n_real as u64, Ordering::Relaxed);
            self.volume.done_with(offset, n_real as u64);
            if let Some(hash) = self.hash.as_ref().filter(|_| hash) {
                let bs = self.block.bytes() as usize;
                digests.extend(data.chunks(bs).map(|b| hash(b)));
            }
        }
        Ok(Chunk {
            first_block: plan.first_block,
            blocks: plan.blocks,
            data,
            hole: plan.hole,
            digests,
        })
    }

    /// Reads the chunks with `workers` reads in flight, delivering them
    /// to `tx` in order. Returns once every thread it started ended.
    fn in_flight(
        &self,
        start_block: u64,
        cancel: &Cancel,
        workers: usize,
        tx: crossbeam_channel::Sender<Result<Chunk, snapshot::VolumeError>>,
    ) {
        type Slot = crossbeam_channel::Receiver<Result<Chunk, snapshot::VolumeError>>;
        let (jobs_tx, jobs_rx) =
            crossbeam_channel::bounded::<(Plan, crossbeam_channel::Sender<_>)>(workers);
        let (order_tx, order_rx) = crossbeam_channel::bounded::<Slot>(workers);
        std::thread::scope(|s| {
            for _ in 0..workers {
                let jobs = jobs_rx.clone();
                s.spawn(move || {
                    for (plan, slot) in jobs {
                        let _ = crossbeam_channel::Sender::send(&slot, self.read(plan, true));
                    }
                });
            }
            drop(jobs_rx);
            // In order: each chunk as soon as it and those before it are in.
            s.spawn(move || {
                for slot in order_rx {
                    let Ok(item) = slot.recv() else { return };
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
            });
            self.front_to_back(start_block, cancel, |plan| {
                let (slot_tx, slot_rx) = crossbeam_channel::bounded(1);
                if order_tx.send(slot_rx).is_err() {
                    return false;
                }
                if plan.hole {
                    return slot_tx.send(self.read(plan, false)).is_ok();
                }
                jobs_tx.send((plan, slot_tx)).is_ok()
            });
            drop(jobs_tx);
            drop(order_tx);
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::{MemVolume, Volume};

    /// The buffer given back last is reused first; no more are kept than
    /// the reader can have out at once.
    #[test]
    fn spare_buffers_are_reused_last_in_first_out() {
        let free = FreeBuffers::new(2);
        let (a, b, c) = (vec![1u8; 8], vec![2u8; 8], vec![3u8; 8]);
        free.put(a);
        free.put(b);
        free.put(c);
        assert_eq!(free.take(), vec![2u8; 8]);
        assert_eq!(free.take(), vec![1u8; 8]);
        assert!(free.take().is_empty());
    }

    /// A volume that asks for several reads in flight, holes where its
    /// bytes are zero in whole 64 KiB pieces, and slower reads early on
    /// (so later reads finish first).
    #[derive(Debug)]
    struct Remote(MemVolume, Vec<u8>);

    impl Volume for Remote {
        fn path(&self) -> &std::path::Path {
            self.0.path()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> snapshot::volume::Result<()> {
            if offset < (4 << 20) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> snapshot::volume::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn zero(&self, offset: u64, len: u64) -> snapshot::volume::Result<()> {
            self.0.zero(offset, len)
        }
        fn sync(&self) -> snapshot::volume::Result<()> {
            Ok(())
        }
        fn set_size(&self, size: u64) -> snapshot::volume::Result<()> {
            self.0.set_size(size)
        }
        fn resizable(&self) -> bool {
            false
        }
        fn preferred_read(&self) -> Option<usize> {
            Some(2 << 20)
        }
        fn reads_in_flight(&self) -> usize {
            4
        }
        fn next_data(&self, offset: u64) -> Option<u64> {
            (offset..self.size())
                .step_by(64 << 10)
                .find(|&o| self.1[(o >> 16) as usize] != 0)
        }
        fn next_hole(&self, offset: u64) -> u64 {
            (offset..self.size())
                .step_by(64 << 10)
                .find(|&o| self.1[(o >> 16) as usize] == 0)
                .unwrap_or(self.size())
        }
    }

    #[test]
    fn reads_in_flight_arrive_in_order_with_holes_between() {
        let size = 19 * CHUNK_BYTES + 4096;
        let mut data: Vec<u8> = (0..size).map(|i| (i / 7) as u8 | 1).collect();
        // Pieces of zeros (holes) in several places.
        let mut mapped = vec![1u8; size.div_ceil(64 << 10)];
        for piece in [3, 4, 5, 40, 100, 101, 200, 201, 202, 203] {
            data[piece << 16..(piece + 1) << 16].fill(0);
            mapped[piece] = 0;
        }
        let v = Arc::new(Remote(MemVolume::new("r", data.clone(), false), mapped));
        let block = blockdiff::BlockSize::new(64 << 10).unwrap();
        let signer = blockdiff::Signer::new(blockdiff::HashKey([3; 32]));
        let hashing = signer.clone();
        let hash: BlockHash = Arc::new(move |b: &[u8]| Some(hashing.block_digest(b)));
        for (start, hash) in [
            (0, None),
            (7, None),
            (0, Some(hash.clone())),
            (7, Some(hash)),
        ] {
            let hashed = hash.is_some();
            let mut hashed_some = false;
            let r = ChunkReader::spawn(
                v.clone(),
                block,
                size as u64,
                size as u64,
                start,
                Cancel::new(),
                hash,
            );
            let mut got = Vec::new();
            let mut next = start;
            for c in r.chunks.iter() {
                let c = c.unwrap();
                assert_eq!(c.first_block, next, "in order");
                next += c.blocks;
                let len = block.offset_of(next).min(size as u64) - block.offset_of(c.first_block);
                assert!(c.hole || c.data.len() as u64 == len);
                if c.hole {
                    got.resize(got.len() + len as usize, 0);
                } else {
                    assert!(c.data.len() <= 2 << 20);
                    got.extend_from_slice(&c.data);
                    // Each block's digest, computed by the reader.
                    let want: Vec<_> = c
                        .data
                        .chunks(64 << 10)
                        .map(|b| Some(signer.block_digest(b)))
                        .collect();
                    // All of them or none (the consumer's to compute).
                    assert!(c.digests == want || c.digests.is_empty());
                    hashed_some |= !c.digests.is_empty();
                }
                r.recycle(c);
            }
            assert_eq!(got, data[(start << 16) as usize..], "start {start}");
            // Four reads in flight: each worker hashes what it reads.
            assert_eq!(hashed_some, hashed);
            assert_eq!(next, block.blocks_in(size as u64));
        }
        // A consumer that stops early: dropping the reader ends its threads.
        let r = ChunkReader::spawn(v, block, size as u64, size as u64, 0, Cancel::new(), None);
        assert!(r.chunks.recv().unwrap().is_ok());
        drop(r);
    }

    #[test]
    fn a_read_error_in_flight_ends_the_chunks() {
        let size = 12 * CHUNK_BYTES;
        let data = vec![1u8; size];
        let v = Arc::new(Remote(
            MemVolume::new("r", data, false)
                .with_fault(snapshot::volume::Fault::Read { at: 6 << 20 }),
            vec![1; size >> 16],
        ));
        let block = blockdiff::BlockSize::new(64 << 10).unwrap();
        let r = ChunkReader::spawn(v, block, size as u64, size as u64, 0, Cancel::new(), None);
        let items: Vec<_> = r.chunks.iter().collect();
        assert!(items.last().unwrap().is_err());
        assert!(items[..items.len() - 1].iter().all(|c| c.is_ok()));
    }
}
