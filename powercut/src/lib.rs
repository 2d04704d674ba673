//! The dm-log-writes log format (Linux
//! `Documentation/admin-guide/device-mapper/log-writes.rst`), read and
//! replayed: the power-cut harness records every write the target side
//! makes to its disk, then rebuilds the disk as a power cut at any point
//! could have left it.
//!
//! ```text
//! sector 0:   super:  magic u64 | version u64 | nr_entries u64 | sectorsize u32   (LE)
//! sector 1..: entry:  sector u64 | nr_sectors u64 | flags u64 | data_len u64     (LE)
//!                     a MARK's name follows in the same sector (data_len bytes)
//!             then nr_sectors sectors of data (none for DISCARD and MARK)
//! ```
//!
//! Sectors are `sectorsize` bytes (the logged device's logical block
//! size). Entries are in completion order: every write before a FLUSH
//! entry was complete when the flush was issued, so it is durable from
//! that entry on; a FUA write is durable once logged; any other write after
//! the last flush may or may not have reached the disk, in any order.
//!
//! Parsing is bounded by the log's length: a corrupt or truncated log is a
//! clean error, never a huge allocation or a panic.

use std::io::{self, Read, Seek, SeekFrom, Write};

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
pub const FLUSH: u64 = 1;
pub const FUA: u64 = 2;
pub const DISCARD: u64 = 4;
pub const MARK: u64 = 8;
/// Newer kernels tag metadata writes; it changes nothing for replay.
pub const METADATA: u64 = 16;
const ENTRY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a dm-log-writes log: {0}")]
    Format(String),
    #[error("log entry {index}: {why}")]
    Entry { index: u64, why: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The log's super block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Super {
    pub nr_entries: u64,
    pub sectorsize: u32,
}

/// One logged write, flush, discard or mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    /// First sector written (in `sectorsize` units).
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// A MARK's name.
    pub mark: Option<String>,
    /// Byte offset of the data in the log.
    pub data_offset: u64,
}

impl Entry {
    pub fn is_flush(&self) -> bool {
        self.flags & FLUSH != 0
    }
    pub fn is_fua(&self) -> bool {
        self.flags & FUA != 0
    }
    pub fn is_discard(&self) -> bool {
        self.flags & DISCARD != 0
    }
    pub fn is_mark(&self) -> bool {
        self.flags & MARK != 0
    }
    /// Writes data (or zeros, for a discard) to the device.
    pub fn writes(&self) -> bool {
        !self.is_mark() && self.nr_sectors > 0
    }
    /// Flags as letters: F(lush) U (fUa) D(iscard) M(ark), `-` for none.
    pub fn flag_letters(&self) -> String {
        let mut s = String::new();
        for (bit, c) in [(FLUSH, 'F'), (FUA, 'U'), (DISCARD, 'D'), (MARK, 'M')] {
            if self.flags & bit != 0 {
                s.push(c);
            }
        }
        if s.is_empty() {
            s.push('-');
        }
        s
    }
}

/// Moves `r` to byte `pos` with a relative seek: a `BufReader` keeps its
/// buffer when `pos` lies in it, where an absolute seek always drops it
/// (and each entry would then cost a buffer's read of the log).
fn seek_to<R: Seek>(r: &mut R, pos: u64) -> std::io::Result<()> {
    let cur = r.stream_position()?;
    let delta = i64::try_from(i128::from(pos) - i128::from(cur))
        .map_err(|_| std::io::Error::other(format!("seek to byte {pos} out of range")))?;
    r.seek_relative(delta)
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Reads the super block and the index of every entry (data is skipped,
/// not read). `log_len` is the log's length in bytes.
pub fn read_index<R: Read + Seek>(log: &mut R, log_len: u64) -> Result<(Super, Vec<Entry>)> {
    let mut head = [0u8; 28];
    log.seek(SeekFrom::Start(0))?;
    log.read_exact(&mut head)
        .map_err(|e| Error::Format(format!("reading the super block: {e}")))?;
    if le64(&head[0..]) != MAGIC {
        return Err(Error::Format("bad magic".into()));
    }
    let version = le64(&head[8..]);
    if version != VERSION {
        return Err(Error::Format(format!(
            "version {version}, expected {VERSION}"
        )));
    }
    let nr_entries = le64(&head[16..]);
    let sectorsize = u32::from_le_bytes(head[24..28].try_into().expect("4 bytes"));
    if !(512..=65536).contains(&sectorsize) || !sectorsize.is_power_of_two() {
        return Err(Error::Format(format!("sector size {sectorsize}")));
    }
    let ss = u64::from(sectorsize);
    // Every entry takes at least one sector after the super block.
    if nr_entries > log_len / ss {
        return Err(Error::Format(format!(
            "{nr_entries} entries cannot fit in a log of {log_len} bytes"
        )));
    }
    let sup = Super {
        nr_entries,
        sectorsize,
    };
    let mut entries = Vec::with_capacity(nr_entries as usize);
    let mut sector_buf = vec![0u8; sectorsize as usize];
    let mut pos = ss;
    for index in 0..nr_entries {
        let bad = |why: String| Error::Entry { index, why };
        if pos.checked_add(ss).is_none_or(|end| end > log_len) {
            return Err(bad(format!("entry at byte {pos} lies past the log's end")));
        }
        seek_to(log, pos)?;
        log.read_exact(&mut sector_buf)?;
        let sector = le64(&sector_buf[0..]);
        let nr_sectors = le64(&sector_buf[8..]);
        let flags = le64(&sector_buf[16..]);
        let data_len = le64(&sector_buf[24..]);
        pos += ss;
        let mut mark = None;
        let data_offset = pos;
        if flags & MARK != 0 {
            if data_len > ss - ENTRY_LEN as u64 {
                return Err(bad(format!("mark of {data_len} bytes")));
            }
            let name = &sector_buf[ENTRY_LEN..ENTRY_LEN + data_len as usize];
            mark = Some(String::from_utf8_lossy(name).into_owned());
        } else {
            if flags & DISCARD == 0 {
                let len = nr_sectors
                    .checked_mul(ss)
                    .filter(|l| pos.checked_add(*l).is_some_and(|end| end <= log_len))
                    .ok_or_else(|| {
                        bad(format!("{nr_sectors} sectors of data past the log's end"))
                    })?;
                pos += len;
            }
            sector
                .checked_add(nr_sectors)
                .and_then(|s| s.checked_mul(ss))
                .ok_or_else(|| bad(format!("write at sector {sector} overflows")))?;
        }
        entries.push(Entry {
            index,
            sector,
            nr_sectors,
            flags,
            mark,
            data_offset,
        });
    }
    Ok((sup, entries))
}

/// Bytes of the log in use: the super block and every entry with its data
/// (the rest of the log device is unused and can be cut off).
pub fn used_len(sup: &Super, entries: &[Entry]) -> u64 {
    let ss = u64::from(sup.sectorsize);
    entries.last().map_or(ss, |e| {
        if e.is_mark() || e.is_discard() {
            e.data_offset
        } else {
            e.data_offset + e.nr_sectors * ss
        }
    })
}

/// Where the device must be written to apply `e`: (byte offset, length).
pub fn extent(sup: &Super, e: &Entry) -> (u64, u64) {
    let ss = u64::from(sup.sectorsize);
    (e.sector * ss, e.nr_sectors * ss)
}

/// Applies one entry to `dev` (a copy of the logged device): its data, or
/// zeros for a discard. Marks and bare flushes write nothing. `dev_len`
/// bounds the writes.
pub fn apply<R: Read + Seek, W: Write + Seek>(
    log: &mut R,
    sup: &Super,
    e: &Entry,
    dev: &mut W,
    dev_len: u64,
) -> Result<()> {
    if !e.writes() {
        return Ok(());
    }
    let (off, len) = extent(sup, e);
    if off.checked_add(len).is_none_or(|end| end > dev_len) {
        return Err(Error::Entry {
            index: e.index,
            why: format!("write of {len} bytes at {off} past the device's {dev_len} bytes"),
        });
    }
    dev.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut left = len;
    if !e.is_discard() {
        seek_to(log, e.data_offset)?;
    }
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if e.is_discard() {
            buf[..n].fill(0);
        } else {
            log.read_exact(&mut buf[..n])?;
        }
        dev.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A small seeded generator (splitmix64): replays must be reproducible
/// from the seed a failure prints.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Which entries of `range` reach the disk, in which order, when the power
/// is cut right after its last entry. Without a seed: all of them, in log
/// order. With one: everything up to the range's last FLUSH in order, then
/// a random subset of the later plain writes in random order, then the
/// later FUA writes (durable as soon as logged) in order.
pub fn plan(range: &[Entry], seed: Option<u64>) -> Vec<&Entry> {
    let Some(seed) = seed else {
        return range.iter().collect();
    };
    let last_flush = range.iter().rposition(Entry::is_flush);
    let (durable, tail) = match last_flush {
        Some(i) => range.split_at(i + 1),
        None => range.split_at(0),
    };
    let mut rng = Rng::new(seed);
    let mut out: Vec<&Entry> = durable.iter().collect();
    let mut maybe: Vec<&Entry> = tail
        .iter()
        .filter(|e| !e.is_fua() && rng.below(2) == 0)
        .collect();
    for i in (1..maybe.len()).rev() {
        maybe.swap(i, rng.below(i as u64 + 1) as usize);
    }
    out.extend(maybe);
    out.extend(tail.iter().filter(|e| e.is_fua()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SS: usize = 512;

    /// Builds a log the way the kernel lays it out.
    struct LogBuilder {
        buf: Vec<u8>,
        n: u64,
    }

    impl LogBuilder {
        fn new() -> Self {
            Self {
                buf: vec![0; SS],
                n: 0,
            }
        }
        fn entry(&mut self, sector: u64, nr: u64, flags: u64, inline: &[u8], data: &[u8]) {
            let mut s = vec![0u8; SS];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..16].copy_from_slice(&nr.to_le_bytes());
            s[16..24].copy_from_slice(&flags.to_le_bytes());
            s[24..32].copy_from_slice(&(inline.len() as u64).to_le_bytes());
            s[32..32 + inline.len()].copy_from_slice(inline);
            self.buf.extend_from_slice(&s);
            self.buf.extend_from_slice(data);
            self.n += 1;
        }
        fn write(&mut self, sector: u64, fill: u8, nr: u64, flags: u64) {
            self.entry(sector, nr, flags, &[], &vec![fill; nr as usize * SS]);
        }
        fn finish(mut self) -> Vec<u8> {
            self.buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            self.buf[8..16].copy_from_slice(&VERSION.to_le_bytes());
            self.buf[16..24].copy_from_slice(&self.n.to_le_bytes());
            self.buf[24..28].copy_from_slice(&(SS as u32).to_le_bytes());
            self.buf
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = LogBuilder::new();
        b.write(0, 1, 2, 0); // 0
        b.entry(0, 0, FLUSH, &[], &[]); // 1
        b.entry(0, 0, MARK, b"after-flush", &[]); // 2
        b.write(1, 2, 1, 0); // 3
        b.write(3, 3, 1, FUA); // 4
        b.entry(2, 2, DISCARD, &[], &[]); // 5
        b.write(2, 4, 1, 0); // 6
        b.finish()
    }

    fn replay(log: &[u8], upto: usize, seed: Option<u64>) -> Vec<u8> {
        let mut cur = Cursor::new(log);
        let (sup, entries) = read_index(&mut cur, log.len() as u64).unwrap();
        let mut dev = Cursor::new(vec![0xEEu8; 4 * SS]);
        for e in plan(&entries[..=upto], seed) {
            apply(&mut cur, &sup, e, &mut dev, 4 * SS as u64).unwrap();
        }
        dev.into_inner()
    }

    fn sectors(dev: &[u8]) -> Vec<u8> {
        dev.chunks(SS).map(|c| c[0]).collect()
    }

    #[test]
    fn index_lists_every_kind() {
        let log = sample();
        let (sup, e) = read_index(&mut Cursor::new(&log), log.len() as u64).unwrap();
        assert_eq!(sup.nr_entries, 7);
        assert_eq!(sup.sectorsize, 512);
        let letters: Vec<String> = e.iter().map(Entry::flag_letters).collect();
        assert_eq!(letters, ["-", "F", "M", "-", "U", "D", "-"]);
        assert_eq!(e[2].mark.as_deref(), Some("after-flush"));
        assert_eq!(e[0].data_offset, 1024);
        assert_eq!(e[1].data_offset, 1024 + 3 * 512);
        assert_eq!(used_len(&sup, &e), log.len() as u64);
    }

    #[test]
    fn replays_in_order_up_to_any_entry() {
        let log = sample();
        assert_eq!(sectors(&replay(&log, 0, None)), [1, 1, 0xEE, 0xEE]);
        assert_eq!(sectors(&replay(&log, 4, None)), [1, 2, 0xEE, 3]);
        assert_eq!(sectors(&replay(&log, 5, None)), [1, 2, 0, 0]);
        assert_eq!(sectors(&replay(&log, 6, None)), [1, 2, 4, 0]);
    }

    #[test]
    fn subsets_keep_flushed_and_fua_writes() {
        let log = sample();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let s = sectors(&replay(&log, 6, Some(seed)));
            // Flushed before entry 1, and the FUA write (applied after
            // the optional discard): always there.
            assert_eq!(s[0], 1);
            assert!(s[1] == 1 || s[1] == 2, "{s:?}");
            assert!([0xEE, 0, 4].contains(&s[2]), "{s:?}");
            assert_eq!(s[3], 3);
            seen.insert(s);
        }
        // Different seeds give different subsets and orders.
        assert!(seen.len() > 3, "{seen:?}");
        // The same seed, the same result.
        assert_eq!(replay(&log, 6, Some(9)), replay(&log, 6, Some(9)));
    }

    #[test]
    fn rejects_garbage_cleanly() {
        let log = sample();
        let parse = |b: &[u8]| read_index(&mut Cursor::new(b), b.len() as u64);
        assert!(parse(&[]).is_err());
        assert!(parse(&log[..600]).is_err());
        let mut bad = log.clone();
        bad[0] ^= 1;
        assert!(parse(&bad).is_err());
        let mut huge = log.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
        let mut long_write = log.clone();
        long_write[512 + 8..512 + 16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(parse(&long_write).is_err());
        // Every truncation and every single-byte corruption: no panic.
        for cut in 0..log.len() {
            let _ = parse(&log[..cut]);
        }
        for i in 0..log.len() {
            let mut b = log.clone();
            b[i] = b[i].wrapping_add(0x80);
            let _ = parse(&b);
        }
    }

    #[test]
    fn writes_past_the_device_are_refused() {
        let log = sample();
        let mut cur = Cursor::new(&log);
        let (sup, e) = read_index(&mut cur, log.len() as u64).unwrap();
        let mut dev = Cursor::new(vec![0u8; SS]);
        assert!(apply(&mut cur, &sup, &e[0], &mut dev, SS as u64).is_err());
    }
}
