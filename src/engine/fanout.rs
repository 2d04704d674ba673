//! One read of the source feeding several sessions (fan-out to several
//! targets).
//!
//! Each session reads through its own [`Fanout::handles`] handle. The
//! source is read in [`PAGE`]-sized pages; a page read for one session is
//! kept until every session still reading has read past it, so a volume
//! is read once however many targets there are. What is held is bounded
//! (`limit` bytes): when the fastest session would need more, the slowest
//! is left behind — it no longer holds pages for itself and reads what
//! the others no longer hold from the source on its own — rather than
//! slowing every target to the slowest one. A short stall is forgiven:
//! the others wait for it, up to `grace` in all over the fan-out's life.
//! A session that has not read anything yet (a slow connection or image
//! open) is left behind the same way.
//!
//! [`Fanout::bytes_read`] counts every read of the source, those of the
//! sessions left behind too: it is what the source really read.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use snapshot::{Volume, VolumeError};

/// Bytes per page of the shared read: what is kept and evicted as one.
/// A read loads all the missing pages it covers at once.
pub const PAGE: u64 = 64 << 10;
/// What a fan-out holds for its slowest session, by default.
pub const DEFAULT_LIMIT: u64 = 64 << 20;
/// How long the others may wait for the slowest in all, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// Has read nothing yet: holds every page from 0 (it may need them).
    Waiting,
    /// Holds the pages from the one that contains this offset.
    At(u64),
    /// Left behind by the others: holds nothing, reads for itself.
    Behind,
    /// Finished: holds nothing.
    Gone,
}

impl Reader {
    /// The first offset whose pages are held for this reader, if any.
    fn holds_from(&self) -> Option<u64> {
        match self {
            Reader::Waiting => Some(0),
            Reader::At(o) => Some(*o),
            Reader::Behind | Reader::Gone => None,
        }
    }
}

#[derive(Debug)]
enum Page {
    Loading,
    Ready(Bytes),
}

/// A page's bytes: its part of the one read that loaded it.
#[derive(Debug, Clone)]
struct Bytes {
    data: Arc<[u8]>,
    from: usize,
    len: usize,
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[self.from..self.from + self.len]
    }
}

#[derive(Debug)]
struct Shared {
    pages: BTreeMap<u64, Page>,
    /// Bytes of the pages held or being read.
    held: u64,
    /// How long readers waited for room so far.
    waited: Duration,
    readers: Vec<Reader>,
    /// Which readers were ever left behind.
    behind: Vec<bool>,
}

impl Shared {
    /// The first offset some live reader may still need.
    fn low_water(&self) -> u64 {
        self.readers
            .iter()
            .filter_map(Reader::holds_from)
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// A source read once for several sessions.
#[derive(Debug)]
pub struct Fanout {
    inner: Arc<dyn Volume>,
    shared: Mutex<Shared>,
    changed: Condvar,
    limit: u64,
    grace: Duration,
    read: AtomicU64,
}

impl Fanout {
    /// `n` handles reading `inner`, holding at most `limit` bytes for the
    /// slowest; the others wait for it `grace` in all before the slowest
    /// is left behind at once whenever it holds them up.
    pub fn new(inner: Arc<dyn Volume>, n: usize, limit: u64, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            shared: Mutex::new(Shared {
                pages: BTreeMap::new(),
                held: 0,
                waited: Duration::ZERO,
                readers: vec![Reader::Waiting; n],
                behind: vec![false; n],
            }),
            changed: Condvar::new(),
            // Room for a whole read of a scan, at least.
            limit: limit.max(4 * super::CHUNK_BYTES as u64),
            grace,
            read: AtomicU64::new(0),
        })
    }

    /// One handle per session, in the order of the targets.
    pub fn handles(self: &Arc<Self>) -> Vec<Arc<Handle>> {
        let n = self.lock().readers.len();
        (0..n)
            .map(|id| {
                Arc::new(Handle {
                    fanout: self.clone(),
                    id,
                })
            })
            .collect()
    }

    /// Bytes read from the source so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Whether session `id` was left behind by the others.
    pub fn left_behind(&self, id: usize) -> bool {
        self.lock().behind[id]
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn page_len(&self, page: u64) -> u64 {
        (self.inner.size() - page * PAGE).min(PAGE)
    }

    /// Drops the pages no live reader needs, telling the source they were
    /// read (so a drop-behind source lets them leave the page cache).
    fn evict(&self, s: &mut Shared) {
        let low = s.low_water();
        while let Some(entry) = s.pages.first_entry() {
            let page = *entry.key();
            if (page + 1) * PAGE > low || matches!(entry.get(), Page::Loading) {
                break;
            }
            entry.remove();
            let len = self.page_len(page);
            s.held -= len;
            self.inner.done_with(page * PAGE, len);
        }
        self.changed.notify_all();
    }

    /// Page `page` for reader `id`, read from the source if nobody has
    /// it, with the pages after it up to `last` that nobody has either, in
    /// one read: a scan reads in large IOs, a delta only its changes.
    fn page(&self, id: usize, page: u64, last: u64) -> Result<Bytes, VolumeError> {
        let mut s = self.lock();
        loop {
            match s.pages.get(&page) {
                Some(Page::Ready(d)) => return Ok(d.clone()),
                Some(Page::Loading) => {
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                None => {}
            }
            let mut end = page + 1;
            while end <= last && !s.pages.contains_key(&end) {
                end += 1;
            }
            let len: u64 = (page..end).map(|p| self.page_len(p)).sum();
            // Full: only a reader ahead of another that holds pages waits
            // for it (the slowest itself, or a reader going back, is never
            // held up, nor one the pages are held for by nobody else).
            let behind_us = s.readers.iter().enumerate().any(|(i, r)| {
                i != id
                    && match r {
                        Reader::Waiting => true,
                        r => r.holds_from().is_some_and(|o| o < page * PAGE),
                    }
            });
            if behind_us && s.held + len > self.limit {
                let left = self.grace.saturating_sub(s.waited);
                if !left.is_zero() {
                    let since = Instant::now();
                    s = self
                        .changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    s.waited += since.elapsed();
                    continue;
                }
                self.leave_slowest(&mut s, id);
                continue;
            }
            for p in page..end {
                s.pages.insert(p, Page::Loading);
            }
            s.held += len;
            drop(s);
            let mut data = vec![0u8; len as usize];
            let r = self.inner.read_at(&mut data, page * PAGE);
            self.read.fetch_add(len, Ordering::Relaxed);
            let mut s = self.lock();
            let r = match r {
                Ok(()) => {
                    let data: Arc<[u8]> = data.into();
                    for p in page..end {
                        let from = ((p - page) * PAGE) as usize;
                        let bytes = Bytes {
                            data: data.clone(),
                            from,
                            len: self.page_len(p) as usize,
                        };
                        s.pages.insert(p, Page::Ready(bytes));
                    }
                    match s.pages.get(&page) {
                        Some(Page::Ready(d)) => Ok(d.clone()),
                        _ => unreachable!("just inserted"),
                    }
                }
                Err(e) => {
                    for p in page..end {
                        s.pages.remove(&p);
                    }
                    s.held -= len;
                    Err(e)
                }
            };
            self.changed.notify_all();
            return r;
        }
    }

    /// Lets `id` go on without the slowest of the other readers: from now
    /// on they read for themselves. (Each call leaves at least one behind
    /// while any other still holds pages.)
    fn leave_slowest(&self, s: &mut Shared, id: usize) {
        let low = s
            .readers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != id)
            .filter_map(|(_, r)| r.holds_from())
            .min();
        for i in 0..s.readers.len() {
            if i != id && low.is_some() && s.readers[i].holds_from() == low {
                s.readers[i] = Reader::Behind;
                s.behind[i] = true;
            }
        }
        self.evict(s);
    }
}

/// One session's view of a [`Fanout`]: the source, read through the
/// shared pages. Dropping it lets the others go on without it.
#[derive(Debug)]
pub struct Handle {
    fanout: Arc<Fanout>,
    id: usize,
}

impl Handle {
    /// Whether this session was left behind by the others (and read the
    /// source on its own from then on).
    pub fn left_behind(&self) -> bool {
        self.fanout.left_behind(self.id)
    }

    /// Ends this session's reading: it holds no page any more.
    pub fn finish(&self) {
        let mut s = self.fanout.lock();
        s.readers[self.id] = Reader::Gone;
        self.fanout.evict(&mut s);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.finish();
    }
}

fn read_only(path: &Path, op: &'static str) -> VolumeError {
    VolumeError::Other {
        op,
        path: path.to_owned(),
        source: io::Error::from(io::ErrorKind::PermissionDenied),
    }
}

impl Volume for Handle {
    fn reads_shared(&self) -> bool {
        true
    }

    fn path(&self) -> &Path {
        self.fanout.inner.path()
    }

    fn size(&self) -> u64 {
        self.fanout.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapshot::volume::Result<()> {
        let f = &self.fanout;
        let end = offset + buf.len() as u64;
        if end > f.inner.size() {
            return f.inner.read_at(buf, offset);
        }
        let last = (end.max(offset + 1) - 1) / PAGE;
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let data = f.page(self.id, page, last)?;
            let from = (at - page * PAGE) as usize;
            let n = (data.len() - from).min((end - at) as usize);
            let dst = (at - offset) as usize;
            buf[dst..dst + n].copy_from_slice(&data[from..from + n]);
            at += n as u64;
        }
        let mut s = f.lock();
        match s.readers[self.id] {
            Reader::Behind | Reader::Gone => {}
            Reader::Waiting => s.readers[self.id] = Reader::At(end),
            Reader::At(o) => s.readers[self.id] = Reader::At(o.max(end)),
        }
        f.evict(&mut s);
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64) -> snapshot::volume::Result<()> {
        Err(read_only(self.path(), "writing"))
    }

    fn zero(&self, _: u64, _: u64) -> snapshot::volume::Result<()> {
        Err(read_only(self.path(), "zeroing"))
    }

    fn sync(&self) -> snapshot::volume::Result<()> {
        Ok(())
    }

    fn set_size(&self, _: u64) -> snapshot::volume::Result<()> {
        Err(read_only(self.path(), "resizing"))
    }

    fn resizable(&self) -> bool {
        false
    }

    fn next_data(&self, offset: u64) -> Option<u64> {
        self.fanout.inner.next_data(offset)
    }

    fn next_hole(&self, offset: u64) -> u64 {
        self.fanout.inner.next_hole(offset)
    }

    fn data_bytes_in(&self, from: u64, to: u64) -> Option<u64> {
        self.fanout.inner.data_bytes_in(from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::MemVolume;

    /// Sizes in the readers' chunks (the smallest buffer holds 4).
    const MB: u64 = super::super::CHUNK_BYTES as u64;

    fn source(len: usize) -> (Arc<dyn Volume>, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        (Arc::new(MemVolume::new("src", data.clone(), false)), data)
    }

    fn read_all(h: &Handle, from: u64, chunk: usize) -> Result<Vec<u8>, VolumeError> {
        let mut out = Vec::new();
        let mut at = from;
        while at < h.size() {
            let n = (chunk as u64).min(h.size() - at) as usize;
            let mut buf = vec![0; n];
            h.read_at(&mut buf, at)?;
            out.extend_from_slice(&buf);
            at += n as u64;
        }
        Ok(out)
    }

    #[test]
    fn every_session_sees_the_source_which_is_read_once() {
        let (src, data) = source(9 * MB as usize + 12345);
        // Room for the whole volume: with less, a session the scheduler
        // keeps off the CPU past the grace (or one whose first read has
        // not ended, which still holds every page) is rightly left behind
        // and reads again, as a loaded machine makes happen at random;
        // that has tests of its own below.
        let f = Fanout::new(src, 3, 16 * MB, DEFAULT_GRACE);
        let hs = f.handles();
        // Chunks not aligned to pages, one session starting late in the
        // volume (a resumed copy).
        let got: Vec<_> = std::thread::scope(|s| {
            let t: Vec<_> = hs
                .iter()
                .zip([(0, 1 << 20), (0, 300_001), (3 * MB + 4096, 65536)])
                .map(|(h, (from, chunk))| s.spawn(move || read_all(h, from, chunk).unwrap()))
                .collect();
            t.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(got[0], data);
        assert_eq!(got[1], data);
        assert_eq!(got[2], data[3 * MB as usize + 4096..]);
        assert_eq!(f.bytes_read(), data.len() as u64);
        assert!(hs.iter().all(|h| !h.left_behind()));
    }

    #[test]
    fn a_stalled_session_is_left_behind_and_the_others_finish() {
        let (src, data) = source(16 * MB as usize);
        let f = Fanout::new(src, 2, 4 * MB, Duration::from_millis(100));
        let hs = f.handles();
        // The second reads a little and stalls.
        let mut buf = vec![0; 4096];
        hs[1].read_at(&mut buf, 0).unwrap();
        let started = Instant::now();
        assert_eq!(read_all(&hs[0], 0, 1 << 20).unwrap(), data);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(hs[1].left_behind() && !hs[0].left_behind());
        assert_eq!(f.bytes_read(), data.len() as u64);
        // It goes on at its own pace, reading the source again.
        assert_eq!(read_all(&hs[1], 4096, 300_000).unwrap(), data[4096..]);
        assert!(f.bytes_read() > data.len() as u64);
        assert!(f.lock().held <= 4 * MB);
    }

    #[test]
    fn a_session_slow_to_start_is_left_behind() {
        let (src, data) = source(12 * MB as usize);
        let f = Fanout::new(src, 2, 4 * MB, Duration::from_millis(50));
        let hs = f.handles();
        assert_eq!(read_all(&hs[0], 0, 1 << 20).unwrap(), data);
        assert!(hs[1].left_behind());
        assert_eq!(read_all(&hs[1], 0, 1 << 20).unwrap(), data);
        assert_eq!(f.bytes_read(), 2 * data.len() as u64);
    }

    #[test]
    fn a_finished_session_holds_nothing() {
        let (src, data) = source(12 * MB as usize);
        let f = Fanout::new(src, 2, 4 * MB, Duration::from_secs(600));
        let mut hs = f.handles();
        // Never reads; gone before the other needs room: no wait, no drop.
        drop(hs.pop());
        assert_eq!(read_all(&hs[0], 0, 1 << 20).unwrap(), data);
        assert!(f.lock().held <= 4 * MB);
    }

    #[test]
    fn a_session_behind_the_kept_pages_reads_them_again() {
        let (src, data) = source(12 * MB as usize);
        let f = Fanout::new(src, 2, 4 * MB, Duration::from_secs(600));
        let hs = f.handles();
        let mut buf = vec![0; MB as usize];
        hs[1].read_at(&mut buf, 10 * MB).unwrap();
        assert_eq!(read_all(&hs[0], 0, 1 << 20).unwrap(), data);
        hs[1].read_at(&mut buf, MB).unwrap();
        assert_eq!(buf, data[MB as usize..2 * MB as usize]);
        assert_eq!(f.bytes_read(), 13 * MB);
    }

    #[test]
    fn sparse_reads_load_only_their_pages() {
        // Two deltas against different bases: scattered 64 KiB reads,
        // some shared. The source reads each page once, no more.
        let (src, data) = source(8 * MB as usize);
        let f = Fanout::new(src, 2, 4 * MB, DEFAULT_GRACE);
        let hs = f.handles();
        let one = [3 * PAGE, 40 * PAGE, 41 * PAGE, 100 * PAGE];
        let two = [3 * PAGE, 41 * PAGE, 70 * PAGE];
        std::thread::scope(|s| {
            for (h, reads) in hs.iter().zip([&one[..], &two[..]]) {
                let data = &data;
                s.spawn(move || {
                    for &at in reads {
                        let mut buf = vec![0; PAGE as usize];
                        h.read_at(&mut buf, at).unwrap();
                        assert_eq!(buf, data[at as usize..(at + PAGE) as usize]);
                    }
                });
            }
        });
        assert_eq!(f.bytes_read(), 5 * PAGE);
    }

    #[test]
    fn a_reader_left_alone_jumps_past_pages_it_holds() {
        // The other read far ahead and finished: what it loaded is held for
        // the one left, which then skips ahead (a delta): it must not wait
        // for itself.
        let (src, data) = source(16 * MB as usize);
        let f = Fanout::new(src, 2, 4 * MB, Duration::from_millis(20));
        let hs = f.handles();
        let mut buf = vec![0; 4096];
        hs[0].read_at(&mut buf, 0).unwrap();
        let mut big = vec![0; 4 * MB as usize];
        hs[1].read_at(&mut big, 4096).unwrap();
        hs[1].finish();
        let started = Instant::now();
        let mut far = vec![0; MB as usize];
        hs[0].read_at(&mut far, 12 * MB).unwrap();
        assert_eq!(far, data[12 * MB as usize..13 * MB as usize]);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Any mix of readers (scans from any block, sparse forward
        /// jumps, some stopping early, any read sizes) over any window:
        /// every read returns the source's bytes and nobody hangs.
        #[test]
        fn any_readers_get_the_bytes_and_finish(
            readers in proptest::collection::vec(
                (0u64..8, 1u64..3, proptest::collection::vec(1u64..6, 1..40), 0usize..60),
                1..5,
            ),
            limit_mb in 0u64..8,
        ) {
            let size = 8 * MB;
            let (src, data) = source(size as usize);
            let data = Arc::new(data);
            let f = Fanout::new(src, readers.len(), limit_mb * MB, Duration::from_millis(5));
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            for (h, (start, stride, sizes, stop)) in f.handles().into_iter().zip(readers.clone()) {
                let (data, done_tx) = (data.clone(), done_tx.clone());
                // Not scoped: a reader that hangs fails the test, not the run.
                std::thread::spawn(move || {
                    // Reads of 1-5 pages from START MiB on, jumping STRIDE-1
                    // such reads ahead each time, STOP reads.
                    let mut at = start * MB;
                    for pages in sizes.iter().cycle().take(stop) {
                        let len = (pages * PAGE).min(size.saturating_sub(at));
                        if len == 0 {
                            break;
                        }
                        let mut buf = vec![0; len as usize];
                        let ok = h.read_at(&mut buf, at).is_ok()
                            && buf == data[at as usize..(at + len) as usize];
                        if !ok {
                            let _ = done_tx.send(Err(at));
                            return;
                        }
                        at += len * stride;
                    }
                    h.finish();
                    let _ = done_tx.send(Ok(()));
                });
            }
            for _ in &readers {
                let r = done_rx.recv_timeout(Duration::from_secs(20));
                proptest::prop_assert!(r.is_ok(), "a reader hung");
                proptest::prop_assert_eq!(r.unwrap(), Ok(()), "wrong bytes read at this offset");
            }
        }
    }

    #[test]
    fn a_read_error_reaches_the_session_that_asked() {
        let (_, data) = source(4 * MB as usize);
        let src: Arc<dyn Volume> = Arc::new(
            MemVolume::new("src", data, false).with_fault(snapshot::volume::Fault::Read { at: MB }),
        );
        let f = Fanout::new(src, 1, 4 * MB, DEFAULT_GRACE);
        let hs = f.handles();
        assert!(read_all(&hs[0], 0, 1 << 20).is_err());
    }
}
