//! A volume whose data is known to lie only in some ranges: a thin LV,
//! whose unmapped blocks read as zeros, with its mapping read from the
//! pool's metadata ([`crate::lvm::Lvm::thin_mapped`]). Reads and writes go
//! to the volume itself; only [`Volume::next_data`] and
//! [`Volume::data_bytes_in`] answer from the mapping, so a full scan
//! skips what is unmapped as it skips the holes of a sparse file.
//!
//! The mapping must stay true while it is used: take it of a snapshot
//! nobody writes (a source), or of a volume only the session holding its
//! lock writes, and only ahead of that session's own writes (a target's
//! scan).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::volume::{Result, Volume};

/// See the module documentation.
#[derive(Debug)]
pub struct MappedVolume {
    inner: Arc<dyn Volume>,
    /// Sorted, disjoint, non-empty, within the volume.
    ranges: Vec<Range<u64>>,
    /// Past this offset nothing is known: it may all be data.
    known_until: u64,
}

impl MappedVolume {
    /// `ranges` in order and disjoint, as [`crate::lvm::ThinMapping`]
    /// gives them; clipped to the volume's size.
    pub fn new(inner: Arc<dyn Volume>, ranges: Vec<Range<u64>>, known_until: u64) -> Self {
        let size = inner.size();
        let ranges = ranges
            .into_iter()
            .map(|r| r.start.min(size)..r.end.min(size))
            .filter(|r| !r.is_empty())
            .collect();
        Self {
            inner,
            ranges,
            known_until: known_until.min(size),
        }
    }

    /// Bytes mapped, as far as known.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Index of the first range ending after `offset`.
    fn first_after(&self, offset: u64) -> usize {
        self.ranges.partition_point(|r| r.end <= offset)
    }
}

impl Volume for MappedVolume {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.zero(offset, len)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.inner.set_size(size)
    }
    fn resizable(&self) -> bool {
        self.inner.resizable()
    }
    fn done_with(&self, offset: u64, len: u64) {
        self.inner.done_with(offset, len)
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.inner.will_need(offset, len)
    }
    fn free_space(&self) -> Option<u64> {
        self.inner.free_space()
    }

    fn next_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.known_until {
            return Some(offset);
        }
        match self.ranges.get(self.first_after(offset)) {
            Some(r) if r.start < self.known_until => Some(r.start.max(offset)),
            _ if self.known_until < self.size() => Some(self.known_until),
            _ => None,
        }
    }

    fn next_hole(&self, offset: u64) -> u64 {
        let size = self.size();
        if offset >= self.known_until.min(size) {
            return size;
        }
        match self.ranges.get(self.first_after(offset)) {
            Some(r) if r.start <= offset && r.end >= self.known_until => size,
            Some(r) if r.start <= offset => r.end.min(size),
            _ => offset,
        }
    }

    fn data_bytes_in(&self, from: u64, to: u64) -> Option<u64> {
        let mut bytes = to.saturating_sub(self.known_until.max(from));
        let known_to = to.min(self.known_until);
        if from < known_to {
            for r in &self.ranges[self.first_after(from)..] {
                if r.start >= known_to {
                    break;
                }
                bytes += r.end.min(known_to) - r.start.max(from);
            }
        }
        Some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemVolume;
    use proptest::prelude::*;

    fn vol(size: u64, ranges: &[(u64, u64)], known_until: u64) -> MappedVolume {
        MappedVolume::new(
            Arc::new(MemVolume::new("thin", vec![0; size as usize], false)),
            ranges.iter().map(|&(a, b)| a..b).collect(),
            known_until,
        )
    }

    #[test]
    fn next_data_answers_from_the_mapping() {
        let v = vol(100, &[(10, 20), (40, 50)], u64::MAX);
        assert_eq!(v.next_data(0), Some(10));
        assert_eq!(v.next_data(15), Some(15));
        assert_eq!(v.next_data(20), Some(40));
        assert_eq!(v.next_data(49), Some(49));
        assert_eq!(v.next_data(50), None);
        assert_eq!(v.data_bytes_in(0, 100), Some(20));
        assert_eq!(v.data_bytes_in(15, 45), Some(10));
        assert_eq!(v.mapped_bytes(), 20);
    }

    #[test]
    fn past_what_is_known_everything_may_be_data() {
        let v = vol(100, &[(10, 20)], 30);
        assert_eq!(v.next_data(20), Some(30));
        assert_eq!(v.next_data(35), Some(35));
        assert_eq!(v.data_bytes_in(0, 100), Some(10 + 70));
        // Ranges past the end of the volume are clipped.
        let v = vol(100, &[(90, 200)], u64::MAX);
        assert_eq!(v.next_data(95), Some(95));
        assert_eq!(v.data_bytes_in(0, 100), Some(10));
    }

    proptest! {
        /// Against a byte-by-byte model of which bytes may hold data.
        #[test]
        fn matches_a_byte_model(
            cuts in proptest::collection::btree_set(0u64..200, 0..12),
            known in prop_oneof![Just(u64::MAX), 0u64..220],
            probe in 0u64..200,
            to in 0u64..200,
        ) {
            let size = 200;
            let cuts: Vec<u64> = cuts.into_iter().collect();
            let ranges: Vec<(u64, u64)> = cuts.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0], c[1])).collect();
            let v = vol(size, &ranges, known);
            let data = |b: u64| b >= known || ranges.iter().any(|&(s, e)| s <= b && b < e);
            let expect = (probe..size).find(|&b| data(b));
            prop_assert_eq!(v.next_data(probe), expect);
            let hole = (probe..size).find(|&b| !data(b)).unwrap_or(size);
            prop_assert_eq!(v.next_hole(probe), hole);
            let count = (probe..to.max(probe)).filter(|&b| data(b)).count() as u64;
            prop_assert_eq!(v.data_bytes_in(probe, to.max(probe)), Some(count));
        }
    }
}
