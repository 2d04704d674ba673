//! Holes as ranges: how a full scan announces blocks that read as zeros
//! without a digest per block, and how the source reads the announcements.
//!
//! The target's scanner feeds every block it scans, in order, to an
//! [`Announcer`]: a block known to read as zeros (a hole of a file, the
//! tail past the volume's old end, or data that is all zeros) joins a run
//! that goes out as one `Holes { first, count }` frame; any other block's
//! digest goes out in `BlockHashes`. A new or empty target thus sends no
//! digests at all, and a sparse one only for the data it holds.
//!
//! The source keeps what arrived in [`TargetRuns`] and asks it for the
//! target's view of each block ([`blockdiff::Theirs`]); a hole run is
//! answered with its end, so the source skips a hole of its own against a
//! hole of the target's in one step, whatever its size. The decisions
//! themselves are [`blockdiff::decide_holes`], pure and property-tested.

use std::collections::VecDeque;

use blockdiff::{Digest, Theirs};
use wire::{BlockHashes, Holes, Msg};

/// Turns a scan's blocks, in block order, into `BlockHashes` and `Holes`
/// frames. Frames are appended to the `out` vector of each call.
#[derive(Debug, Default)]
pub struct Announcer {
    /// Digests of blocks `digests_first..`, not yet sent.
    digests_first: u64,
    digests: Vec<Digest>,
    /// A run of zero blocks (first, count), not yet sent.
    hole: Option<(u64, u64)>,
}

impl Announcer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks `first..first+count` read as zeros.
    pub fn hole(&mut self, first: u64, count: u64, out: &mut Vec<(Msg, Vec<u8>)>) {
        if count == 0 {
            return;
        }
        self.flush_digests(out);
        match &mut self.hole {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => {
                self.flush_hole(out);
                self.hole = Some((first, count));
            }
        }
    }

    /// Block `block` holds data with digest `d`.
    pub fn digest(&mut self, block: u64, d: Digest, out: &mut Vec<(Msg, Vec<u8>)>) {
        self.flush_hole(out);
        if self.digests.is_empty() {
            self.digests_first = block;
        }
        self.digests.push(d);
    }

    /// Sends pending digests; a pending hole run may still grow.
    pub fn flush_digests(&mut self, out: &mut Vec<(Msg, Vec<u8>)>) {
        if self.digests.is_empty() {
            return;
        }
        let mut payload = Vec::new();
        wire::digests_to_payload(&self.digests, &mut payload);
        out.push((
            Msg::BlockHashes(BlockHashes {
                first: self.digests_first,
            }),
            payload,
        ));
        self.digests.clear();
    }

    fn flush_hole(&mut self, out: &mut Vec<(Msg, Vec<u8>)>) {
        if let Some((first, count)) = self.hole.take() {
            out.push((Msg::Holes(Holes { first, count }), Vec::new()));
        }
    }

    /// Blocks in the pending hole run.
    pub fn pending_hole(&self) -> u64 {
        self.hole.map_or(0, |(_, c)| c)
    }

    /// Sends everything pending: before the scanner waits for credit (the
    /// source may be waiting for exactly these blocks) and at the end.
    pub fn flush(&mut self, out: &mut Vec<(Msg, Vec<u8>)>) {
        self.flush_digests(out);
        self.flush_hole(out);
    }
}

/// A run of the target's announcements, as the source received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// Digests of blocks `first..first+len`.
    Digests(u64, Vec<Digest>),
    /// Blocks `first..first+count` read as zeros.
    Holes(u64, u64),
}

/// The target's announcements received and not yet compared, in block
/// order (the receiver checked the order and the window).
#[derive(Debug, Default)]
pub struct TargetRuns {
    runs: VecDeque<Run>,
}

impl TargetRuns {
    pub fn push(&mut self, run: Run) {
        self.runs.push_back(run);
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The target's view of `block`, with the first block past it that
    /// may differ in view (the end of a hole run; `block + 1` for a
    /// digest). `Ok(None)`: not arrived yet. Blocks are asked for in
    /// increasing order; what lies before `block` is dropped.
    pub fn view(&mut self, block: u64) -> Result<Option<(Theirs, u64)>, String> {
        loop {
            match self.runs.front() {
                None => return Ok(None),
                Some(Run::Digests(first, d)) => {
                    if block < *first {
                        return Err(format!("digest for block {block} skipped"));
                    }
                    let i = (block - first) as usize;
                    if i < d.len() {
                        let digest = d[i];
                        if i + 1 == d.len() {
                            self.runs.pop_front();
                        }
                        return Ok(Some((Theirs::Digest(digest), block + 1)));
                    }
                }
                Some(Run::Holes(first, count)) => {
                    if block < *first {
                        return Err(format!("digest for block {block} skipped"));
                    }
                    let end = first.saturating_add(*count);
                    if block < end {
                        return Ok(Some((Theirs::Hole, end)));
                    }
                }
            }
            self.runs.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_to_runs(frames: Vec<(Msg, Vec<u8>)>) -> Vec<Run> {
        frames
            .into_iter()
            .map(|(m, p)| match m {
                Msg::BlockHashes(h) => {
                    let mut d = Vec::new();
                    wire::payload_to_digests(&p, &mut d).unwrap();
                    Run::Digests(h.first, d)
                }
                Msg::Holes(h) => Run::Holes(h.first, h.count),
                m => panic!("{m:?}"),
            })
            .collect()
    }

    #[test]
    fn hole_runs_merge_and_digests_split_them() {
        let mut a = Announcer::new();
        let mut out = Vec::new();
        a.hole(0, 10, &mut out);
        a.hole(10, 6, &mut out);
        assert!(
            out.is_empty(),
            "a hole run grows until something else comes"
        );
        a.digest(16, [1; 16], &mut out);
        a.digest(17, [2; 16], &mut out);
        a.hole(18, 1, &mut out);
        a.flush(&mut out);
        assert_eq!(
            frames_to_runs(out),
            vec![
                Run::Holes(0, 16),
                Run::Digests(16, vec![[1; 16], [2; 16]]),
                Run::Holes(18, 1)
            ]
        );
    }

    #[test]
    fn views_follow_the_runs() {
        let mut t = TargetRuns::default();
        assert_eq!(t.view(0), Ok(None));
        t.push(Run::Holes(0, 100));
        t.push(Run::Digests(100, vec![[3; 16]]));
        assert_eq!(t.view(0), Ok(Some((Theirs::Hole, 100))));
        assert_eq!(t.view(99), Ok(Some((Theirs::Hole, 100))));
        assert_eq!(t.view(100), Ok(Some((Theirs::Digest([3; 16]), 101))));
        assert!(t.is_empty());
        assert_eq!(t.view(101), Ok(None));
        t.push(Run::Holes(105, 1));
        assert!(t.view(101).is_err(), "blocks 101..105 were skipped");
    }
}
