//! The replication engine: the source side ([`source`]) drives a session
//! against the target side ([`target`], what `snapsync serve` runs) over
//! any byte stream (see the `wire` crate for the protocol).

pub mod source;
pub mod target;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How many blocks the target may hash ahead of the source's credit. At
/// 64 KiB blocks that is 512 MiB of volume but only 128 KiB of digests in
/// flight.
pub const WINDOW_BLOCKS: u64 = 8192;
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
