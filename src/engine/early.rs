//! The source's scan while the connection comes up.
//!
//! A session spends its first fraction of a second reaching the target:
//! ssh's login, the remote shell starting `serve`, the target opening its
//! volume. The source chooses the key its digests are made with, so it
//! does not wait: an [`EarlyScan`] reads and hashes the source from its
//! first block and keeps what the session will need.
//!
//! - With a usable digest map (digest-map mode) it compares each block
//!   with the map of the base and keeps the digests (for the new map) and
//!   the data of chunks where something changed. When the target confirms
//!   the base, the comparer starts with these results and goes on with the
//!   same reader and map; when it does not, they are dropped and the full
//!   scan starts over.
//! - In a full scan it keeps the digests of every block and the data of
//!   the first [`KEEP_MAX`] bytes; past that it gives the data back and
//!   keeps the digests alone. The comparer then needs the data only of
//!   the blocks whose digest differs from the target's, and reads those
//!   again. Over ssh the source has hashed a good part of the volume by
//!   the time the target starts, so the two ends' hashing overlaps less.
//!
//! Memory stays bounded whatever the login's length: the scan stops once
//! it holds [`KEEP_MAX`] bytes of changed chunks (digest-map mode) or has
//! hashed [`EARLY_BLOCKS_MAX`] blocks, and waits there for the session.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blockdiff::{BlockSize, Digest, Signer};
use crossbeam_channel::RecvTimeoutError;
use snapshot::{Volume, VolumeError};

use super::map::MapReader;
use super::{BlockHash, Cancel, Chunk, ChunkReader, ZeroDigests};

/// Most bytes of chunk data held for the session.
pub const KEEP_MAX: usize = 16 << 20;

/// Most blocks hashed ahead of the session (8 GiB at 64 KiB blocks;
/// about 40 bytes each are held).
pub const EARLY_BLOCKS_MAX: u64 = 1 << 17;

/// How often a scan waiting for the reader looks whether it should stop.
const POLL: Duration = Duration::from_millis(5);

/// A chunk hashed before the session began.
#[derive(Debug)]
pub struct EarlyChunk {
    /// Its blocks' digests are all in `chunk.digests` (none for a hole);
    /// its data unless `same` or `dropped`.
    pub chunk: Chunk,
    /// The base's digest of each of its blocks, read from the map
    /// (digest-map mode; empty in a full scan).
    pub base: Vec<Digest>,
    /// Every block equals the base: the data was given back.
    pub same: bool,
    /// A full scan's data chunk whose data was given back to stay within
    /// [`KEEP_MAX`]: the comparer reads again the blocks it must send.
    pub dropped: bool,
}

/// Why the early scan ended before the session took over; the session
/// fails with it when its comparison gets there, as it would have.
#[derive(Debug)]
pub enum EarlyEnd {
    Read(VolumeError),
    Map(std::io::Error),
}

/// What the early scan hands the session: its results, then the reader
/// (and in digest-map mode the map) positioned just past them.
#[derive(Debug)]
pub struct Early {
    pub chunks: VecDeque<EarlyChunk>,
    pub end: Option<EarlyEnd>,
    pub reader: ChunkReader,
    pub map: Option<MapReader<File>>,
}

/// What an early scan hands the comparison: chunks hashed (and in
/// digest-map mode compared), why it stopped short (if it did), and the
/// reader positioned past them (none: the comparison starts one after
/// the last chunk).
pub type EarlyResults = (VecDeque<EarlyChunk>, Option<EarlyEnd>, Option<ChunkReader>);

/// A scan of the source, against the base's map or on its own, running
/// until the session takes it ([`EarlyScan::finish`]) or drops it.
#[derive(Debug)]
pub struct EarlyScan {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Early>>,
    mapped: bool,
}

/// `signer`'s digest of each block a reader reads (the map's, or in a
/// full scan the session's, which is its new map's too).
pub fn block_hash(signer: Signer) -> BlockHash {
    Arc::new(move |b: &[u8]| Some(signer.block_digest(b)))
}

impl EarlyScan {
    /// Starts reading `source` (of `size` bytes) from block 0, hashing
    /// with `signer`: compared with `map` (digest-map mode, `signer` the
    /// map's), or kept for a full scan (`signer` the session's).
    pub fn spawn(
        source: Arc<dyn Volume>,
        block: BlockSize,
        size: u64,
        map: Option<MapReader<File>>,
        signer: Signer,
        cancel: Cancel,
    ) -> Self {
        let reader = ChunkReader::spawn(
            source,
            block,
            size,
            size,
            0,
            cancel,
            Some(block_hash(signer.clone())),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let mapped = map.is_some();
        let handle = std::thread::Builder::new()
            .name("early-scan".into())
            .spawn(move || scan(reader, map, signer, block, size, &stopped))
            .expect("spawn early scan");
        Self {
            stop,
            handle: Some(handle),
            mapped,
        }
    }

    /// Whether it compares with a digest map (else it is a full scan's).
    pub fn mapped(&self) -> bool {
        self.mapped
    }

    /// Stops the scan where it is and hands over what it did.
    pub fn finish(mut self) -> Early {
        self.stop.store(true, Ordering::Release);
        let h = self.handle.take().expect("finished once");
        h.join().expect("early scan panicked")
    }
}

impl Drop for EarlyScan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            // Its reader and map go with it.
            let _ = h.join();
        }
    }
}

fn scan(
    reader: ChunkReader,
    mut map: Option<MapReader<File>>,
    signer: Signer,
    block: BlockSize,
    size: u64,
    stop: &AtomicBool,
) -> Early {
    let mut chunks = VecDeque::new();
    let mut end = None;
    let (mut kept, mut blocks) = (0usize, 0u64);
    let mut zeros = ZeroDigests::default();
    // Digest-map mode stops when the changed data fills its room; a full
    // scan goes on with digests alone.
    while (map.is_none() || kept < KEEP_MAX)
        && blocks < EARLY_BLOCKS_MAX
        && !stop.load(Ordering::Acquire)
    {
        let mut chunk = match reader.chunks.recv_timeout(POLL) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                end = Some(EarlyEnd::Read(e));
                break;
            }
            Err(RecvTimeoutError::Timeout) => continue,
            // The whole volume was read (or the scan cancelled).
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if !chunk.hole {
            // Every digest the reader left to its consumer, here.
            let bs = block.bytes() as usize;
            chunk.digests.resize(chunk.blocks as usize, None);
            for (d, data) in chunk.digests.iter_mut().zip(chunk.data.chunks(bs)) {
                if d.is_none() {
                    *d = Some(signer.block_digest(data));
                }
            }
        }
        let base = match &mut map {
            Some(m) => match (0..chunk.blocks)
                .map(|_| m.next_digest())
                .collect::<std::io::Result<Vec<_>>>()
            {
                Ok(b) => b,
                Err(e) => {
                    end = Some(EarlyEnd::Map(e));
                    break;
                }
            },
            None => Vec::new(),
        };
        let same = map.is_some() && {
            if chunk.hole {
                let lens = (chunk.first_block..chunk.first_block + chunk.blocks)
                    .map(|b| block.len_of(b, size) as usize);
                base.iter()
                    .zip(lens)
                    .all(|(d, len)| *d == zeros.get(&signer, len))
            } else {
                chunk
                    .digests
                    .iter()
                    .zip(&base)
                    .all(|(d, b)| d.as_ref() == Some(b))
            }
        };
        let dropped = !same && !chunk.hole && map.is_none() && kept >= KEEP_MAX;
        if (same || dropped) && !chunk.hole {
            reader.recycle_buffer(std::mem::take(&mut chunk.data));
        } else {
            kept += chunk.data.len();
        }
        blocks += chunk.blocks;
        chunks.push_back(EarlyChunk {
            chunk,
            base,
            same,
            dropped,
        });
    }
    Early {
        chunks,
        end,
        reader,
        map,
    }
}

/// An early scan's results for a full scan: what was compared with a
/// digest map the target then declined is compared with the target's
/// digests instead. Chunks found equal to the base hold digests only
/// (their data was given back), and the map's state no longer matters:
/// a map that could not be read stops the early part, not the scan.
pub fn for_full_scan(e: Early) -> EarlyResults {
    let chunks = e
        .chunks
        .into_iter()
        .map(|c| EarlyChunk {
            dropped: c.dropped || (c.same && !c.chunk.hole),
            same: false,
            base: Vec::new(),
            chunk: c.chunk,
        })
        .collect();
    let end = e.end.filter(|end| matches!(end, EarlyEnd::Read(_)));
    (chunks, end, Some(e.reader))
}

/// Where a full scan should read again rather than take the early scan's
/// results: at the first chunk that kept digests alone and lies wholly
/// past `target_blocks` (the blocks the target holds). Nothing past the
/// target's end can match, so every block of such chunks would be read
/// again one by one; a new reader from there reads them in order. Drops
/// the results from that chunk on and returns its first block.
pub fn start_over_past(early: &mut VecDeque<EarlyChunk>, target_blocks: u64) -> Option<u64> {
    let i = early
        .iter()
        .position(|c| c.dropped && c.chunk.first_block >= target_blocks)?;
    let from = early[i].chunk.first_block;
    early.truncate(i);
    Some(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first_block: u64, dropped: bool) -> EarlyChunk {
        EarlyChunk {
            chunk: Chunk {
                first_block,
                blocks: 16,
                data: if dropped { Vec::new() } else { vec![1; 16] },
                hole: false,
                digests: Vec::new(),
            },
            base: Vec::new(),
            same: false,
            dropped,
        }
    }

    /// Only chunks that kept digests alone, wholly past what the target
    /// holds, are read again; chunks with their data are kept wherever
    /// they lie.
    #[test]
    fn a_full_scan_starts_over_only_past_the_target_s_end() {
        let mut early: VecDeque<_> = [
            chunk(0, false),
            chunk(16, false),
            chunk(32, true),
            chunk(48, true),
        ]
        .into();
        assert_eq!(start_over_past(&mut early, 64), None);
        assert_eq!(early.len(), 4);
        // The target ends inside the third chunk: that chunk's blocks may
        // match, the fourth's cannot.
        assert_eq!(start_over_past(&mut early, 40), Some(48));
        assert_eq!(early.len(), 3);
        // A new target: from the first chunk without data.
        assert_eq!(start_over_past(&mut early, 0), Some(32));
        assert_eq!(early.len(), 2);
        assert_eq!(start_over_past(&mut early, 0), None);
    }
}
