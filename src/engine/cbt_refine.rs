//! Exact 4 KiB deltas from thin changed-block tracking.
//!
//! `thin_delta` names changed pool chunks (64 KiB or more): one 4 KiB
//! write makes its whole chunk "different". The base snapshot — exactly
//! what the target holds, since a delta runs only when the target confirms
//! it holds the base generation — is still on the source. So for every
//! changed chunk the source reads it from both the base and the new
//! snapshot, compares the 4 KiB sub-blocks and ships only those that
//! differ. The target reads nothing; the source reads at most twice the
//! changed chunks, and only once a chunk the base does not map (thin
//! reads zeros there, and so does the target).
//!
//! A thread reads and compares up to [`READ_AHEAD`] pieces of at most
//! [`CHUNK_BYTES`] ahead of the session, which sends them while the next
//! are read: memory stays bounded whatever the size of the delta or of the
//! pool's chunk.

use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;

use blockdiff::{is_zero, BlockSize, SUB_BLOCK};
use crossbeam_channel::{bounded, Receiver};
use snapshot::{Volume, VolumeError};

use super::source::Change;
use super::{CHUNK_BYTES, READ_AHEAD};

/// A range `thin_delta` reported, in bytes of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Span {
    /// Mapped in both snapshots, to different pool blocks: compared with
    /// the base.
    Changed(Range<u64>),
    /// Mapped only in the new snapshot: the base (and so the target)
    /// reads zeros there; compared with zeros without reading the base.
    New(Range<u64>),
    /// Mapped only in the base: the new snapshot reads zeros there.
    Zeroed(Range<u64>),
}

/// What the target must do to one refined run of sub-blocks.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    /// Write these bytes at `offset` (never across a block boundary, so
    /// frames stay small).
    Data { offset: u64, data: Vec<u8> },
    /// Make `len` bytes at `offset` read as zeros.
    Zero { offset: u64, len: u64 },
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Data { offset, data } => write!(f, "Data({offset}, {} bytes)", data.len()),
            Op::Zero { offset, len } => write!(f, "Zero({offset}, {len})"),
        }
    }
}

/// One compared piece of a changed range: nothing in `range` outside
/// `ops` differs from the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refined {
    pub range: Range<u64>,
    /// In increasing offset order, inside `range`.
    pub ops: Vec<Op>,
    /// Blocks (of the session's block size) with a changed sub-block that
    /// no earlier piece counted.
    pub blocks_changed: u64,
    /// Bytes read from the new snapshot and from the base for this piece.
    pub new_bytes_read: u64,
    pub base_bytes_read: u64,
}

/// What a piece is compared with.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    /// The base's bytes of the piece.
    Bytes(&'a [u8]),
    /// The base reads zeros there.
    Zeros,
    /// Not known (past the end of a base smaller than the new snapshot):
    /// every sub-block is shipped.
    Unknown,
}

/// Appends to `ops` what turns `base` into `new`, the piece of the volume
/// at `offset`: the differing 4 KiB sub-blocks (aligned to the volume),
/// merged into runs; runs of zeros as [`Op::Zero`], data runs cut at
/// `block` boundaries.
pub fn diff(offset: u64, new: &[u8], base: Base<'_>, block: BlockSize, ops: &mut Vec<Op>) {
    if let Base::Bytes(b) = base {
        assert_eq!(b.len(), new.len(), "base and new pieces differ in length");
    }
    let sub = SUB_BLOCK as u64;
    let bs = block.bytes() as u64;
    let end = offset + new.len() as u64;
    let mut o = offset;
    while o < end {
        let e = ((o / sub + 1) * sub).min(end);
        let (i, j) = ((o - offset) as usize, (e - offset) as usize);
        let n = &new[i..j];
        let differs = match base {
            Base::Bytes(b) => n != &b[i..j],
            Base::Zeros => !is_zero(n),
            Base::Unknown => true,
        };
        if differs {
            let zero = match base {
                Base::Zeros => false,
                _ => is_zero(n),
            };
            push(ops, o, n, zero, bs);
        }
        o = e;
    }
}

fn push(ops: &mut Vec<Op>, o: u64, n: &[u8], zero: bool, bs: u64) {
    match ops.last_mut() {
        Some(Op::Zero { offset, len }) if zero && *offset + *len == o => *len += n.len() as u64,
        Some(Op::Data { offset, data })
            if !zero && *offset + data.len() as u64 == o && !o.is_multiple_of(bs) =>
        {
            data.extend_from_slice(n)
        }
        _ if zero => ops.push(Op::Zero {
            offset: o,
            len: n.len() as u64,
        }),
        _ => {
            let mut data = Vec::with_capacity(bs.min(CHUNK_BYTES as u64) as usize);
            data.extend_from_slice(n);
            ops.push(Op::Data { offset: o, data });
        }
    }
}

/// The refined changes, read and compared by a thread ahead of the
/// session. The thread starts at the first item asked for (a session the
/// target turns into a full scan reads nothing here); dropping the
/// refiner stops and waits for it.
pub struct Refiner {
    start: Option<Worker>,
    spans: Option<Box<dyn Iterator<Item = Result<Span, VolumeError>> + Send>>,
    rx: Receiver<Result<Change, VolumeError>>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Refiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refiner")
    }
}

impl Refiner {
    /// Refines `spans` (in increasing order) of `new` against `base`.
    pub fn spawn(
        base: Arc<dyn Volume>,
        new: Arc<dyn Volume>,
        spans: Box<dyn Iterator<Item = Result<Span, VolumeError>> + Send>,
        block: BlockSize,
    ) -> Self {
        Self {
            start: Some(Worker {
                base,
                new,
                block,
                new_buf: Vec::new(),
                base_buf: Vec::new(),
                counted: None,
            }),
            spans: Some(spans),
            rx: bounded(0).1,
            handle: None,
        }
    }

    fn start(&mut self) {
        let (Some(mut w), Some(spans)) = (self.start.take(), self.spans.take()) else {
            return;
        };
        let (tx, rx) = bounded(READ_AHEAD);
        self.rx = rx;
        let handle = std::thread::Builder::new()
            .name("cbt-refine".into())
            .spawn(move || {
                for span in spans {
                    let r = span.and_then(|s| w.span(s, &mut |c| tx.send(Ok(c)).is_ok()));
                    match r {
                        Ok(true) => {}
                        // The session is gone: stop reading.
                        Ok(false) => return,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            })
            .expect("spawn cbt refiner");
        self.handle = Some(handle);
    }
}

impl Iterator for Refiner {
    type Item = Result<Change, VolumeError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.start();
        self.rx.recv().ok()
    }
}

impl Drop for Refiner {
    fn drop(&mut self) {
        // Its sends fail once the receiver is gone; then it stops.
        self.rx = bounded(0).1;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Worker {
    base: Arc<dyn Volume>,
    new: Arc<dyn Volume>,
    block: BlockSize,
    new_buf: Vec<u8>,
    base_buf: Vec<u8>,
    /// The last block counted as changed.
    counted: Option<u64>,
}

impl Worker {
    /// Emits the refined pieces of one span; false once `emit` fails.
    fn span(
        &mut self,
        span: Span,
        emit: &mut dyn FnMut(Change) -> bool,
    ) -> Result<bool, VolumeError> {
        let (r, known_zero) = match span {
            Span::Zeroed(r) => return Ok(emit(Change::Zero(r))),
            Span::Changed(r) => (r, false),
            Span::New(r) => (r, true),
        };
        let size = self.new.size();
        let base_size = self.base.size();
        let chunk = CHUNK_BYTES as u64;
        let mut off = r.start.min(size);
        let end = r.end.min(size);
        while off < end {
            // Pieces end at CHUNK_BYTES boundaries and at the end of the base.
            let mut e = ((off / chunk + 1) * chunk).min(end);
            if off < base_size {
                e = e.min(base_size);
            }
            let len = (e - off) as usize;
            self.new_buf.resize(len, 0);
            self.new.read_at(&mut self.new_buf, off)?;
            self.new.done_with(off, len as u64);
            let mut base_read = 0;
            let base = if off >= base_size {
                Base::Unknown
            } else if known_zero {
                Base::Zeros
            } else {
                self.base_buf.resize(len, 0);
                self.base.read_at(&mut self.base_buf, off)?;
                self.base.done_with(off, len as u64);
                base_read = len as u64;
                Base::Bytes(&self.base_buf)
            };
            let mut ops = Vec::new();
            diff(off, &self.new_buf, base, self.block, &mut ops);
            let blocks_changed = self.count_blocks(&ops);
            let piece = Refined {
                range: off..e,
                ops,
                blocks_changed,
                new_bytes_read: len as u64,
                base_bytes_read: base_read,
            };
            if !emit(Change::Refined(piece)) {
                return Ok(false);
            }
            off = e;
        }
        Ok(true)
    }

    fn count_blocks(&mut self, ops: &[Op]) -> u64 {
        let bs = self.block.bytes() as u64;
        let mut n = 0;
        for op in ops {
            let (o, l) = match op {
                Op::Data { offset, data } => (*offset, data.len() as u64),
                Op::Zero { offset, len } => (*offset, *len),
            };
            let (first, last) = (o / bs, (o + l - 1) / bs);
            let first = match self.counted {
                Some(c) if c >= first => c + 1,
                _ => first,
            };
            if last >= first {
                n += last - first + 1;
                self.counted = Some(last);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SUB: usize = SUB_BLOCK as usize;

    fn apply(target: &mut [u8], ops: &[Op]) {
        for op in ops {
            match op {
                Op::Data { offset, data } => {
                    let o = *offset as usize;
                    target[o..o + data.len()].copy_from_slice(data);
                }
                Op::Zero { offset, len } => {
                    let o = *offset as usize;
                    target[o..o + *len as usize].fill(0);
                }
            }
        }
    }

    fn bs(n: u64) -> BlockSize {
        BlockSize::new(n).unwrap()
    }

    #[test]
    fn only_differing_sub_blocks_ship() {
        let base = vec![7u8; 64 * 1024];
        let mut new = base.clone();
        new[5 * SUB + 10] = 1; // one byte in sub-block 5
        new[6 * SUB..7 * SUB].fill(2); // and all of sub-block 6
        new[9 * SUB..11 * SUB].fill(0); // two zeroed sub-blocks
        let mut ops = Vec::new();
        diff(1 << 20, &new, Base::Bytes(&base), bs(64 * 1024), &mut ops);
        assert_eq!(
            ops,
            vec![
                Op::Data {
                    offset: (1 << 20) + 5 * SUB as u64,
                    data: new[5 * SUB..7 * SUB].to_vec()
                },
                Op::Zero {
                    offset: (1 << 20) + 9 * SUB as u64,
                    len: 2 * SUB as u64
                },
            ]
        );
    }

    #[test]
    fn data_runs_stop_at_block_boundaries() {
        let base = vec![0u8; 4 * SUB];
        let new = vec![9u8; 4 * SUB];
        let mut ops = Vec::new();
        diff(0, &new, Base::Zeros, bs(2 * SUB as u64), &mut ops);
        let lens: Vec<_> = ops
            .iter()
            .map(|o| match o {
                Op::Data { offset, data } => (*offset, data.len()),
                Op::Zero { .. } => panic!("zero op"),
            })
            .collect();
        assert_eq!(lens, vec![(0, 2 * SUB), (2 * SUB as u64, 2 * SUB)]);
        // Against the same bytes as zeros: nothing differs.
        ops.clear();
        diff(0, &base, Base::Zeros, bs(2 * SUB as u64), &mut ops);
        assert!(ops.is_empty());
        // Unknown base: everything ships, zeros as one Zero op.
        diff(0, &base, Base::Unknown, bs(2 * SUB as u64), &mut ops);
        assert_eq!(
            ops,
            vec![Op::Zero {
                offset: 0,
                len: 4 * SUB as u64
            }]
        );
    }

    #[test]
    fn short_tail_sub_block() {
        let base = vec![1u8; SUB + 100];
        let mut new = base.clone();
        new[SUB + 99] = 0;
        let mut ops = Vec::new();
        diff(0, &new, Base::Bytes(&base), bs(64 * 1024), &mut ops);
        assert_eq!(
            ops,
            vec![Op::Data {
                offset: SUB as u64,
                data: new[SUB..].to_vec()
            }]
        );
    }

    fn image(dir: &std::path::Path, name: &str, data: &[u8]) -> Arc<dyn Volume> {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        Arc::new(snapshot::FileVolume::open(&p, snapshot::Access::Read).unwrap())
    }

    /// Image files as the base and new snapshots: the refiner reads the
    /// base only for `Changed` spans inside it, ships exactly the changed
    /// sub-blocks, and the result applied to the base is the new volume.
    #[test]
    fn refiner_over_image_files() {
        const CH: usize = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        // Base: 40 chunks, the last 8 unmapped (zeros); new: grown by 4.
        let mut base = vec![0u8; 40 * CH];
        for (i, b) in base[..32 * CH].iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        let mut new = base.clone();
        new.resize(44 * CH, 0);
        new[3 * CH + 5 * SUB] ^= 0xff; // chunk 3: one sub-block
        new[10 * CH..10 * CH + 2 * SUB].fill(0); // chunk 10: two zeroed
                                                 // chunk 12: rewritten with the same bytes (thin says different)
        new[20 * CH..24 * CH].fill(0); // chunks 20..24: discarded
        new[33 * CH + 7 * SUB] = 5; // chunk 33: newly mapped, one sub-block
        new[42 * CH + SUB] = 6; // chunk 42: past the base's end
        let spans = vec![
            Span::Changed(3 * CH as u64..4 * CH as u64),
            Span::Changed(10 * CH as u64..11 * CH as u64),
            Span::Changed(12 * CH as u64..13 * CH as u64),
            Span::Zeroed(20 * CH as u64..24 * CH as u64),
            Span::New(33 * CH as u64..34 * CH as u64),
            Span::New(42 * CH as u64..43 * CH as u64),
        ];
        let bv = image(dir.path(), "base", &base);
        let nv = image(dir.path(), "new", &new);
        let it = Refiner::spawn(bv, nv, Box::new(spans.into_iter().map(Ok)), bs(64 * 1024));
        let mut replica = base.clone();
        replica.resize(new.len(), 0);
        // Past the base's end the target's content is not known.
        replica[42 * CH..43 * CH].fill(0xee);
        let (mut new_read, mut base_read, mut data, mut blocks) = (0, 0, 0, 0);
        for c in it {
            match c.unwrap() {
                Change::Refined(p) => {
                    new_read += p.new_bytes_read;
                    base_read += p.base_bytes_read;
                    blocks += p.blocks_changed;
                    for op in &p.ops {
                        if let Op::Data { data: d, .. } = op {
                            data += d.len();
                        }
                    }
                    apply(&mut replica, &p.ops);
                }
                Change::Zero(r) => replica[r.start as usize..r.end as usize].fill(0),
                Change::Data(_) => panic!("unrefined data"),
            }
        }
        assert!(replica == new, "replica differs from the new volume");
        assert_eq!(new_read, 5 * CH as u64);
        assert_eq!(base_read, 3 * CH as u64, "base read only for Changed spans");
        // One sub-block in chunks 3 and 33; chunk 42 ships whole (its
        // base is unknown), except the zeros, as Zero ops.
        assert_eq!(data, 2 * SUB + SUB);
        assert_eq!(blocks, 4);
    }

    #[test]
    fn read_errors_end_the_stream() {
        let base: Arc<dyn Volume> = Arc::new(
            snapshot::MemVolume::new("base", vec![0u8; 1 << 20], false)
                .with_fault(snapshot::Fault::Read { at: 0 }),
        );
        let new: Arc<dyn Volume> =
            Arc::new(snapshot::MemVolume::new("new", vec![1u8; 1 << 20], false));
        let mut it = Refiner::spawn(
            base,
            new,
            Box::new(
                vec![
                    Ok(Span::Changed(0..65536)),
                    Ok(Span::Changed(65536..131072)),
                ]
                .into_iter(),
            ),
            bs(65536),
        );
        assert!(matches!(it.next(), Some(Err(_))));
        assert!(it.next().is_none());
    }

    /// A real delta session against the real target: the replica ends
    /// byte-exact, the target reads nothing, only the changed 4 KiB
    /// sub-blocks travel, and the base is read only for changed chunks.
    #[test]
    fn delta_session_ships_exact_sub_blocks() {
        use crate::engine::source::{self, Connection, SessionParams};
        use crate::engine::Cancel;
        use crate::progress::Progress;
        const CH: usize = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("replica.img");
        let state = dir.path().join("tstate");
        let mut base = vec![0u8; 64 * CH];
        for (i, b) in base[..48 * CH].iter_mut().enumerate() {
            *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1;
        }
        let session = |src: Arc<dyn Volume>,
                       p: &SessionParams,
                       changes: Option<Box<dyn Iterator<Item = _> + Send>>| {
            let cancel = Cancel::new();
            let (conn, peer) =
                crate::transport::local(dst.clone(), state.clone(), cancel.clone()).unwrap();
            let progress = Progress::new(src.size(), "test", true);
            let conn = Connection {
                reader: conn.reader,
                writer: conn.writer,
            };
            let r = source::run(src, conn, p, &progress, &cancel, changes, &mut None).unwrap();
            assert_eq!(peer.finish(), None);
            r
        };
        let params = |snap: &str| {
            SessionParams::new(
                dst.to_string_lossy().into_owned(),
                bs(CH as u64),
                "id:test".into(),
                snap.into(),
                std::time::Duration::from_secs(30),
            )
        };
        let bv = image(dir.path(), "base", &base);
        let first = session(bv.clone(), &params("gen1"), None);
        assert_eq!(first.mode, "full-scan");

        // Scattered 4 KiB writes, a zeroed sub-block, a chunk rewritten
        // with its own bytes, a discarded range, writes into unmapped chunks.
        let mut new = base.clone();
        let mut spans = Vec::new();
        let mut subs_changed = 0;
        for c in (0..40).step_by(5) {
            new[c * CH + (c % 16) * SUB + 3] ^= 0x5a;
            subs_changed += 1;
            spans.push(Span::Changed((c * CH) as u64..((c + 1) * CH) as u64));
        }
        new[41 * CH..41 * CH + SUB].fill(0);
        spans.push(Span::Changed((41 * CH) as u64..(42 * CH) as u64));
        spans.push(Span::Changed((42 * CH) as u64..(43 * CH) as u64));
        new[44 * CH..46 * CH].fill(0);
        spans.push(Span::Zeroed((44 * CH) as u64..(46 * CH) as u64));
        for c in [50usize, 51, 60] {
            new[c * CH + 2 * SUB..c * CH + 3 * SUB].fill(0x77);
            subs_changed += 1;
            spans.push(Span::New((c * CH) as u64..((c + 1) * CH) as u64));
        }
        spans.sort_by_key(|s| match s {
            Span::Changed(r) | Span::New(r) | Span::Zeroed(r) => r.start,
        });
        let nv = image(dir.path(), "new", &new);
        let mut p = params("gen2");
        p.mode = wire::Mode::Delta;
        p.base = Some(wire::Generation {
            number: first.generation.unwrap(),
            snapshot: "gen1".into(),
        });
        let refiner = Refiner::spawn(
            bv,
            nv.clone(),
            Box::new(spans.into_iter().map(Ok)),
            bs(CH as u64),
        );
        let r = session(nv, &p, Some(Box::new(refiner)));
        assert_eq!(r.mode, "delta", "fallback: {:?}", r.fallback);
        assert_eq!(r.target_bytes_read, 0);
        assert_eq!(r.data_bytes, subs_changed * SUB as u64);
        assert_eq!(r.zero_bytes, (SUB + 2 * CH) as u64);
        assert_eq!(r.base_bytes_read, 10 * CH as u64);
        assert_eq!(r.source_bytes_read, (10 + 13) * CH as u64);
        assert!(
            r.wire_bytes_sent < r.data_bytes + r.data_bytes / 10 + 4096,
            "{} bytes sent for {} of data",
            r.wire_bytes_sent,
            r.data_bytes
        );
        assert!(std::fs::read(&dst).unwrap() == new, "replica differs");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Refined ops applied to the base give the new content exactly,
        /// and ship no sub-block that did not change.
        #[test]
        fn refined_ops_rebuild_new(
            subs in 1usize..48,
            tail in 0usize..SUB,
            edits in proptest::collection::vec((0usize..48, 0u8..4, any::<u8>()), 0..24),
            block_shift in 0u32..5,
            base_kind in 0u8..3,
            seed in any::<u64>(),
        ) {
            let len = subs * SUB + if subs > 1 { tail } else { 0 };
            let mut x = seed | 1;
            let mut rnd = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 };
            let base: Vec<u8> = match base_kind {
                0 => (0..len).map(|_| rnd()).collect(),
                _ => vec![0; len],
            };
            let mut new = base.clone();
            let nsubs = len.div_ceil(SUB);
            for (s, kind, v) in edits {
                let s = s % nsubs;
                let r = s * SUB..((s + 1) * SUB).min(len);
                match kind {
                    0 => new[r.start + v as usize % (r.end - r.start)] = v | 1,
                    1 => new[r].fill(0),
                    2 => new[r].fill(v),
                    _ => {} // rewritten with the same bytes
                }
            }
            let offset = (seed % 64) * SUB as u64;
            let block = bs((SUB as u64) << block_shift);
            let b = match base_kind {
                0 | 1 => Base::Bytes(&base),
                _ => Base::Zeros,
            };
            let mut ops = Vec::new();
            diff(offset, &new, b, block, &mut ops);
            let mut got = vec![0xa5u8; offset as usize];
            got.extend_from_slice(&base);
            apply(&mut got, &ops);
            prop_assert!(got[offset as usize..] == new[..]);
            let mut last = offset;
            for op in &ops {
                let (o, l, zero) = match op {
                    Op::Data { offset, data } => (*offset, data.len() as u64, false),
                    Op::Zero { offset, len } => (*offset, *len, true),
                };
                prop_assert!(o >= last && l > 0 && o % SUB as u64 == 0);
                if !zero {
                    let bsz = block.bytes() as u64;
                    prop_assert_eq!(o / bsz, (o + l - 1) / bsz, "data op across a block boundary");
                }
                // Every sub-block shipped differs.
                let mut s = o;
                while s < o + l {
                    let e = (s + SUB as u64).min(o + l);
                    let (i, j) = ((s - offset) as usize, (e - offset) as usize);
                    prop_assert!(new[i..j] != base[i..j]);
                    s = e;
                }
                last = o + l;
            }
        }
    }
}
