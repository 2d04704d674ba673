//! The source's scan while the connection comes up, in digest-map mode.
//!
//! A session spends its first fraction of a second reaching the target:
//! ssh's login, the remote shell starting `serve`, the target opening its
//! volume. With a usable digest map the source needs nothing from the
//! target to compare, so it does not wait: an [`EarlyScan`] reads and
//! hashes the source from its first block, compares each block with the
//! map of the base, and keeps only what the session will need, the
//! digests (for the new map) and the data of chunks where something
//! changed. When the target confirms the base, the comparer starts with
//! these results and goes on with the same reader and map; when it does
//! not, they are dropped and the full scan starts over.
//!
//! Memory stays bounded whatever the login's length: the scan stops once
//! it holds [`KEEP_MAX`] bytes of changed chunks or has compared
//! [`EARLY_BLOCKS_MAX`] blocks, and waits there for the session.

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

/// Most bytes of changed chunks held for the session.
pub const KEEP_MAX: usize = 16 << 20;

/// Most blocks compared ahead of the session (8 GiB at 64 KiB blocks;
/// about 40 bytes each are held).
pub const EARLY_BLOCKS_MAX: u64 = 1 << 17;

/// How often a scan waiting for the reader looks whether it should stop.
const POLL: Duration = Duration::from_millis(5);

/// A chunk compared before the session began.
#[derive(Debug)]
pub struct EarlyChunk {
    /// Its blocks' map digests are all in `chunk.digests` (none for a
    /// hole); its data only when `!same`.
    pub chunk: Chunk,
    /// The base's digest of each of its blocks, read from the map.
    pub base: Vec<Digest>,
    /// Every block equals the base: the data was given back.
    pub same: bool,
}

/// Why the early scan ended before the session took over; the session
/// fails with it when its comparison gets there, as it would have.
#[derive(Debug)]
pub enum EarlyEnd {
    Read(VolumeError),
    Map(std::io::Error),
}

/// What the early scan hands the session: its results, then the reader
/// and the map positioned just past them.
#[derive(Debug)]
pub struct Early {
    pub chunks: VecDeque<EarlyChunk>,
    pub end: Option<EarlyEnd>,
    pub reader: ChunkReader,
    pub map: MapReader<File>,
}

/// A scan of the source against the base's map, running until the
/// session takes it ([`EarlyScan::finish`]) or drops it.
#[derive(Debug)]
pub struct EarlyScan {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Early>>,
}

/// `signer`'s digest of each block a reader reads (the map's, or in a
/// full scan the session's, which is its new map's too).
pub fn block_hash(signer: Signer) -> BlockHash {
    Arc::new(move |b: &[u8]| Some(signer.block_digest(b)))
}

impl EarlyScan {
    /// Starts reading `source` (of `size` bytes) from block 0, comparing
    /// with `map` under the map's `signer`.
    pub fn spawn(
        source: Arc<dyn Volume>,
        block: BlockSize,
        size: u64,
        map: MapReader<File>,
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
        let handle = std::thread::Builder::new()
            .name("early-scan".into())
            .spawn(move || scan(reader, map, signer, block, size, &stopped))
            .expect("spawn early scan");
        Self {
            stop,
            handle: Some(handle),
        }
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
    mut map: MapReader<File>,
    signer: Signer,
    block: BlockSize,
    size: u64,
    stop: &AtomicBool,
) -> Early {
    let mut chunks = VecDeque::new();
    let mut end = None;
    let (mut kept, mut blocks) = (0usize, 0u64);
    let mut zeros = ZeroDigests::default();
    while kept < KEEP_MAX && blocks < EARLY_BLOCKS_MAX && !stop.load(Ordering::Acquire) {
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
        let base = match (0..chunk.blocks)
            .map(|_| map.next_digest())
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(b) => b,
            Err(e) => {
                end = Some(EarlyEnd::Map(e));
                break;
            }
        };
        let lens = (chunk.first_block..chunk.first_block + chunk.blocks)
            .map(|b| block.len_of(b, size) as usize);
        let same = if chunk.hole {
            base.iter()
                .zip(lens)
                .all(|(d, len)| *d == zeros.get(&signer, len))
        } else {
            // Every digest the reader left to its consumer, here.
            let bs = block.bytes() as usize;
            chunk.digests.resize(chunk.blocks as usize, None);
            for (d, data) in chunk.digests.iter_mut().zip(chunk.data.chunks(bs)) {
                if d.is_none() {
                    *d = Some(signer.block_digest(data));
                }
            }
            chunk
                .digests
                .iter()
                .zip(&base)
                .all(|(d, b)| d.as_ref() == Some(b))
        };
        if same {
            if !chunk.hole {
                reader.recycle_buffer(std::mem::take(&mut chunk.data));
            }
        } else {
            kept += chunk.data.len();
        }
        blocks += chunk.blocks;
        chunks.push_back(EarlyChunk { chunk, base, same });
    }
    Early {
        chunks,
        end,
        reader,
        map,
    }
}
