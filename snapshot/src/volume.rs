//! Reading and writing volumes: regular files and block devices, and an
//! in-memory volume that can inject errors for tests.
//!
//! IO is `pread`/`pwrite` on large buffers. No mmap: an IO error on a mapped
//! device page is a SIGBUS, not an error we can report.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use rustix::fs::{
    fadvise, fallocate, fstat, openat, openat2, Advice, FallocateFlags, FileType, Mode, OFlags,
    ResolveFlags, CWD,
};

use crate::direct::{DirectWrites, Failure};
use crate::identity::{self, VolumeIdentity};

use crate::sys;

/// A failed volume operation, naming the volume and where.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is neither a regular file nor a block device")]
    NotAVolume { path: PathBuf },
    #[error("{path} is a {what}, not a regular file or block device; refused")]
    WrongType { path: PathBuf, what: &'static str },
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: String },
    #[error("{path} is in use ({holders}); refusing to write to it")]
    Held { path: PathBuf, holders: String },
    #[error("{op} {path} at offset {offset} ({len} bytes) failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("{path} is a block device of {have} bytes, smaller than the source's {need} bytes; use a device at least that large")]
    TooSmall { path: PathBuf, have: u64, need: u64 },
    #[error("{op} {path} failed: {source}")]
    Other {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl VolumeError {
    /// The underlying OS error, if any (e.g. to tell ENOSPC apart).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            VolumeError::Open { source, .. }
            | VolumeError::Io { source, .. }
            | VolumeError::Other { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Something with a size that can be read and written at offsets.
pub trait Volume: Send + Sync + std::fmt::Debug {
    /// Name for messages.
    fn path(&self) -> &Path;
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes `len` bytes at `offset` read as zeros, deallocating where the
    /// volume can (a sparse image stays sparse).
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<()>;
    /// Changes the size of a resizable volume (regular file).
    fn set_size(&self, size: u64) -> Result<()>;
    /// Whether [`Volume::set_size`] can grow it.
    fn resizable(&self) -> bool;
    /// Hint: `[offset, offset+len)` was consumed and need not stay cached.
    fn done_with(&self, _offset: u64, _len: u64) {}
    /// Hint: `[offset, offset+len)` will be read soon; the kernel may
    /// start reading it now, beside other such ranges (random reads in
    /// flight together rather than one after the other).
    fn will_need(&self, _offset: u64, _len: u64) {}
    /// Next offset at or after `offset` that may hold data (`SEEK_DATA`);
    /// `None` when the rest is a hole. Volumes that cannot tell return
    /// `Some(offset)`.
    fn next_data(&self, offset: u64) -> Option<u64> {
        Some(offset)
    }
    /// Next offset at or after `offset` known to hold no data (the start
    /// of a hole, `SEEK_HOLE`); the volume's size when it cannot tell or
    /// there is none. A scan reads data up to here in one piece, not past.
    fn next_hole(&self, _offset: u64) -> u64 {
        self.size()
    }
    /// Whether several sessions share this volume's reads (a fan-out): a
    /// session that reads ahead on its own, or reads a range again, costs
    /// a read of the source that the others do not share.
    fn reads_shared(&self) -> bool {
        false
    }
    /// Bytes a sequential scan should read at once, when more than its
    /// usual chunk pays (a network store keeping many requests in flight).
    fn preferred_read(&self) -> Option<usize> {
        None
    }
    /// How many reads of a sequential scan should be in flight at once
    /// (a network store answers many requests together).
    fn reads_in_flight(&self) -> usize {
        1
    }
    /// Bytes of `[from, to)` that may hold data (allocated extents of a
    /// sparse file, found with `SEEK_DATA`/`SEEK_HOLE`); `None` when the
    /// volume cannot tell.
    fn data_bytes_in(&self, _from: u64, _to: u64) -> Option<u64> {
        None
    }
    /// Bytes an unprivileged writer may still allocate on the file system
    /// of a file volume (`fstatvfs`); `None` for others.
    fn free_space(&self) -> Option<u64> {
        None
    }
    /// Asks the volume to write long runs of data around the page cache
    /// from now on (a replica is written once and not read back soon);
    /// whether it will. Writes are then durable, and visible to other
    /// openers, after [`Volume::sync`], as before.
    fn write_runs_direct(&self) -> bool {
        false
    }
}

/// After this many extents, [`Volume::data_bytes_in`] counts the rest of
/// a very fragmented file as data (an upper bound, in bounded time).
const MAX_EXTENTS_WALKED: u32 = 1 << 20;

/// Free space below which [`Volume::free_space`] first waits for the
/// direct writes not made yet.
const LOW_SPACE: u64 = 64 << 20;

/// Whether the path is a block device or a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    File,
    BlockDevice,
}

/// How to open a [`FileVolume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write { create: bool },
}

/// A regular file or block device.
#[derive(Debug)]
pub struct FileVolume {
    /// Long runs of writes around the page cache, once asked for: see
    /// [`Volume::write_runs_direct`]. Holds no writes when unset. First,
    /// so that it is dropped (its writes made) while `file` still holds
    /// the volume (a block device's `O_EXCL` claim).
    direct: OnceLock<Option<Mutex<DirectWrites>>>,
    file: File,
    path: PathBuf,
    kind: VolumeKind,
    size: Mutex<u64>,
    /// Pages read and done with, not yet handed back to the kernel: see
    /// [`FileVolume::advise_sequential`]. `None` keeps the cache.
    drop_behind: Option<Mutex<DropBehind>>,
}

/// A run of bytes a scan is done with, waiting to be dropped from the
/// page cache in one aligned piece, and the reads that found their bytes
/// cached already: those stay (a scan leaves the cache as it found it).
#[derive(Debug, Default)]
struct DropBehind {
    start: u64,
    end: u64,
    /// Ranges found cached before the scan came near them.
    kept: std::collections::VecDeque<(u64, u64)>,
    /// How far ahead of the reader the cache was looked at.
    looked_until: u64,
}

/// Ranges found cached remembered at once, at most (the oldest is
/// forgotten, and dropped with the rest).
const KEPT_RANGES: usize = 64;

/// How far ahead of its reads a scan looks at what is cached: beyond the
/// readahead the kernel does for it (`read_ahead_kb`, doubled for
/// sequential reads; 8 MiB on this project's test machines).
const LOOK_AHEAD: u64 = 64 << 20;

/// Page-cache folios are up to this large and aligned to their size; the
/// kernel drops only folios wholly inside an advised range, so a range
/// that does not start and end on this boundary keeps the folios at its
/// edges (measured: dropping 1 MiB pieces just read left every page
/// cached).
const FOLIO_ALIGN: u64 = 2 << 20;

/// Bytes dropped at once: one call per this many bytes read, not one per
/// chunk (each call drains the per-CPU LRU lists: measured 17 µs apiece).
const DROP_BATCH: u64 = 8 << 20;

impl FileVolume {
    /// Opens an operator-given path (a source, a test image). Symlinks are
    /// followed; the file type is checked on an `O_PATH` descriptor before
    /// the real open, so a FIFO or a char device is never opened.
    pub fn open(path: &Path, access: Access) -> Result<Self> {
        let open_err = |source: io::Error| VolumeError::Open {
            path: path.to_owned(),
            source,
        };
        match rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => {
                let r = Resolved::new(fd, path)?;
                r.open(access != Access::Read, false)
            }
            Err(rustix::io::Errno::NOENT) if access == (Access::Write { create: true }) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(open_err)?;
                Self::from_file(file, path)
            }
            Err(e) => Err(open_err(e.into())),
        }
    }

    fn from_file(file: File, path: &Path) -> Result<Self> {
        let meta = file.metadata().map_err(|source| VolumeError::Open {
            path: path.to_owned(),
            source,
        })?;
        let (kind, size) = match kind_of(&file, path)? {
            VolumeKind::BlockDevice => {
                // The metadata length of a block device is 0: ask the kernel.
                let size =
                    sys::block_device_size(file.as_fd()).map_err(|source| VolumeError::Other {
                        op: "BLKGETSIZE64 on",
                        path: path.to_owned(),
                        source,
                    })?;
                (VolumeKind::BlockDevice, size)
            }
            VolumeKind::File => (VolumeKind::File, meta.len()),
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            kind,
            size: Mutex::new(size),
            drop_behind: None,
            direct: OnceLock::new(),
        })
    }

    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    /// The direct writer, if one was asked for and could be made.
    fn direct(&self) -> Option<MutexGuard<'_, DirectWrites>> {
        let d = self.direct.get()?.as_ref()?;
        Some(d.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits for every write handed to the direct writer.
    fn drain_direct(&self) -> Result<()> {
        match self.direct() {
            Some(mut d) => d.drain().map_err(|f| self.failed_write(f)),
            None => Ok(()),
        }
    }

    /// Before asking the file system where data lies in
    /// `[offset, offset+len)`: writes to it are made first. A failure is
    /// kept for the next write or sync to report.
    fn settle(&self, offset: u64, len: u64) {
        if let Some(mut d) = self.direct() {
            if d.overlaps(offset, len) {
                let _ = d.drain();
            }
        }
    }

    fn failed_write(&self, f: Failure) -> VolumeError {
        self.io_err("writing", f.offset, f.len, f.error)
    }

    /// Tells the kernel we read front to back, and (with `drop_behind`)
    /// that pages we are done with may leave the page cache, so a scan of a
    /// large volume does not evict everything else.
    pub fn advise_sequential(&mut self, drop_behind: bool) {
        let _ = fadvise(self.file.as_fd(), 0, None, Advice::Sequential);
        self.drop_behind = drop_behind.then(Default::default);
    }

    /// Notes which pieces of `[offset, end + LOOK_AHEAD)` not looked at
    /// yet are cached already, to leave them cached after the scan. Only
    /// pieces beyond our own readahead tell whose they are: a piece just
    /// ahead of the reader is cached because the kernel read it ahead for
    /// us.
    fn note_cached(&self, run: &mut DropBehind, offset: u64, end: u64) {
        let fd = self.file.as_fd();
        let page = rustix::param::page_size() as u64;
        let to = (end + LOOK_AHEAD).min(self.size());
        let mut at = run.looked_until.max(offset);
        while at < to {
            let len = (to - at).min(1 << 20);
            if sys::cached_pages(fd, at, len).is_ok_and(|n| n >= len.div_ceil(page)) {
                match run.kept.back_mut() {
                    Some((_, e)) if *e == at => *e += len,
                    _ => {
                        if run.kept.len() == KEPT_RANGES {
                            run.kept.pop_front();
                        }
                        run.kept.push_back((at, at + len));
                    }
                }
            }
            at += len;
        }
        run.looked_until = run.looked_until.max(to);
    }

    /// Drops the whole folios of `[start, end)` from the page cache (to
    /// the end of the file when `end` reaches `size`); returns where the
    /// bytes not dropped begin.
    fn drop_pages(&self, start: u64, end: u64, size: u64) -> u64 {
        let from = start.next_multiple_of(FOLIO_ALIGN);
        let to = if end >= size {
            u64::MAX
        } else {
            end / FOLIO_ALIGN * FOLIO_ALIGN
        };
        if to <= from {
            return start;
        }
        // Length 0: to the end of the file.
        let len = if to == u64::MAX { 0 } else { to - from };
        self.advise(from, len, Advice::DontNeed);
        to.min(end)
    }

    /// A page-cache hint for `[offset, offset+len)`; a hint the kernel
    /// refuses changes nothing.
    fn advise(&self, offset: u64, len: u64, advice: Advice) {
        let _ = fadvise(
            self.file.as_fd(),
            offset,
            std::num::NonZeroU64::new(len),
            advice,
        );
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The device number (major, minor) of a block device.
    pub fn device(&self) -> Option<(u32, u32)> {
        device_number(self.file.as_fd(), self.kind)
    }

    fn io_err(&self, op: &'static str, offset: u64, len: u64, source: io::Error) -> VolumeError {
        VolumeError::Io {
            op,
            path: self.path.clone(),
            offset,
            len,
            source,
        }
    }

    fn zero_by_writing(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

impl Volume for FileVolume {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        *self.size.lock().expect("size lock")
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(behind) = &self.drop_behind {
            let mut run = behind.lock().unwrap_or_else(|p| p.into_inner());
            self.note_cached(&mut run, offset, offset + buf.len() as u64);
        }
        if let Some(mut d) = self.direct() {
            if d.overlaps(offset, buf.len() as u64) {
                d.drain().map_err(|f| self.failed_write(f))?;
            }
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("reading", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(mut d) = self.direct() {
            if d.write(buf, offset).map_err(|f| self.failed_write(f))? {
                return Ok(());
            }
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("writing", offset, buf.len() as u64, e))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.drain_direct()?;
        let fd = self.file.as_fd();
        // Fallbacks in order of preference (see DESIGN.md, Volume IO).
        // Never BLKDISCARD: discarded blocks need not read back as zeros.
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if fallocate(fd, punch, offset, len).is_ok() {
            return Ok(());
        }
        if fallocate(
            fd,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .is_ok()
        {
            return Ok(());
        }
        if self.kind == VolumeKind::BlockDevice {
            let sector = sys::logical_block_size(fd).unwrap_or(512) as u64;
            if offset.is_multiple_of(sector)
                && len.is_multiple_of(sector)
                && sys::block_zero_out(fd, offset, len).is_ok()
            {
                return Ok(());
            }
        }
        self.zero_by_writing(offset, len)
    }

    fn sync(&self) -> Result<()> {
        self.drain_direct()?;
        self.file.sync_all().map_err(|source| VolumeError::Other {
            op: "flushing",
            path: self.path.clone(),
            source,
        })
    }

    fn set_size(&self, size: u64) -> Result<()> {
        self.drain_direct()?;
        let mut cur = self.size.lock().expect("size lock");
        match self.kind {
            VolumeKind::File => {
                self.file
                    .set_len(size)
                    .map_err(|e| self.io_err("resizing", size, 0, e))?;
                *cur = size;
                Ok(())
            }
            VolumeKind::BlockDevice if size <= *cur => Ok(()),
            VolumeKind::BlockDevice => Err(VolumeError::TooSmall {
                path: self.path.clone(),
                have: *cur,
                need: size,
            }),
        }
    }

    fn resizable(&self) -> bool {
        self.kind == VolumeKind::File
    }

    fn write_runs_direct(&self) -> bool {
        self.direct
            .get_or_init(|| DirectWrites::new(&self.file).map(Mutex::new))
            .is_some()
    }

    fn will_need(&self, offset: u64, len: u64) {
        self.advise(offset, len, Advice::WillNeed);
    }

    fn done_with(&self, offset: u64, len: u64) {
        let Some(behind) = &self.drop_behind else {
            return;
        };
        let mut run = behind.lock().unwrap_or_else(|p| p.into_inner());
        let size = self.size();
        let end = offset + len;
        while run.kept.front().is_some_and(|&(_, e)| e <= offset) {
            run.kept.pop_front();
        }
        if run
            .kept
            .front()
            .is_some_and(|&(s, e)| s <= offset && end <= e)
        {
            // Found cached: it stays, and so what came before it goes.
            self.drop_pages(run.start, run.end, size);
            run.start = end;
            run.end = end;
            return;
        }
        if offset != run.end {
            // Not where the last read ended: what waits goes now.
            self.drop_pages(run.start, run.end, size);
            run.start = offset;
            run.end = offset;
        }
        run.end = end;
        if run.end - run.start >= DROP_BATCH || run.end >= size {
            run.start = self.drop_pages(run.start, run.end, size);
        }
    }

    fn data_bytes_in(&self, from: u64, to: u64) -> Option<u64> {
        use rustix::fs::{seek, SeekFrom};
        if self.kind != VolumeKind::File {
            return None;
        }
        let to = to.min(self.size());
        self.settle(from, to.saturating_sub(from));
        let fd = self.file.as_fd();
        let (mut pos, mut data) = (from, 0u64);
        for _ in 0..MAX_EXTENTS_WALKED {
            if pos >= to {
                return Some(data);
            }
            let start = match seek(fd, SeekFrom::Data(pos)) {
                Ok(p) => p,
                // ENXIO: no data at or after pos.
                Err(rustix::io::Errno::NXIO) => return Some(data),
                Err(_) => return Some(data + (to - pos)),
            };
            if start >= to {
                return Some(data);
            }
            let end = seek(fd, SeekFrom::Hole(start)).map_or(to, |e| e.min(to));
            data += end - start;
            pos = end;
        }
        Some(data + to.saturating_sub(pos))
    }

    fn free_space(&self) -> Option<u64> {
        if self.kind != VolumeKind::File {
            return None;
        }
        let free = || {
            let st = rustix::fs::fstatvfs(self.file.as_fd()).ok()?;
            Some(st.f_bavail.saturating_mul(st.f_frsize))
        };
        let now = free()?;
        // Writes not made yet may still take space: near full, they are
        // made first, so that a caller watching the space sees it exactly.
        if let Some(mut d) = self.direct() {
            if now < d.pending_bytes().saturating_add(LOW_SPACE) {
                let _ = d.drain();
                drop(d);
                return free();
            }
        }
        Some(now)
    }

    fn next_data(&self, offset: u64) -> Option<u64> {
        if self.kind != VolumeKind::File {
            return Some(offset);
        }
        self.settle(offset, u64::MAX - offset);
        match rustix::fs::seek(self.file.as_fd(), rustix::fs::SeekFrom::Data(offset)) {
            Ok(pos) => Some(pos),
            // ENXIO: no data at or after offset.
            Err(rustix::io::Errno::NXIO) => None,
            Err(_) => Some(offset),
        }
    }

    fn next_hole(&self, offset: u64) -> u64 {
        let size = self.size();
        if self.kind != VolumeKind::File || offset >= size {
            return size;
        }
        self.settle(offset, u64::MAX - offset);
        // Every file ends in a (virtual) hole: at worst its size.
        match rustix::fs::seek(self.file.as_fd(), rustix::fs::SeekFrom::Hole(offset)) {
            Ok(pos) => pos.min(size),
            Err(_) => size,
        }
    }
}

fn type_name(ft: FileType) -> &'static str {
    match ft {
        FileType::Fifo => "FIFO",
        FileType::CharacterDevice => "character device",
        FileType::Socket => "socket",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::RegularFile => "regular file",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of unknown type",
    }
}

fn kind_of(fd: impl AsFd, path: &Path) -> Result<VolumeKind> {
    let st = fstat(fd).map_err(|e| VolumeError::Open {
        path: path.to_owned(),
        source: e.into(),
    })?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => Ok(VolumeKind::File),
        FileType::BlockDevice => Ok(VolumeKind::BlockDevice),
        ft => Err(VolumeError::WrongType {
            path: path.to_owned(),
            what: type_name(ft),
        }),
    }
}

/// A volume name resolved once to an `O_PATH` descriptor whose type was
/// checked (regular file or block device). Everything after (identity,
/// the read or write open) goes through the descriptor, never the name.
#[derive(Debug)]
pub struct Resolved {
    fd: OwnedFd,
    path: PathBuf,
    kind: VolumeKind,
}

/// A name that does not exist yet: its directory (resolved without
/// following symlinks) and the file name to create in it.
#[derive(Debug)]
pub struct Missing {
    dir: OwnedFd,
    name: OsString,
    path: PathBuf,
}

/// What [`locate`] found.
#[derive(Debug)]
pub enum Located {
    Existing(Resolved),
    Missing(Missing),
}

/// Resolves a target name once, under the symlink rule: no directory on
/// the way may be a symlink, and the last component may be one only if
/// root owns it and it points (directly) at a block device, as
/// `/dev/VG/LV` and `/dev/mapper/VG-LV` do. A dangling link is refused,
/// never followed to create a file. Magic links (`/proc/…/fd`) are never
/// followed. FIFOs, char devices, sockets and directories are refused
/// here, before anything opens them for reading or writing.
pub fn locate(path: &Path) -> Result<Located> {
    let refused = |why: String| VolumeError::Refused {
        path: path.to_owned(),
        why,
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(refused("not a file name".into()));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let no_links = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let dir = openat2(
        CWD,
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        no_links,
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => refused(format!(
            "a directory on the way ({}) is or goes through a symbolic link; give the real path",
            parent.display()
        )),
        e => VolumeError::Open {
            path: path.to_owned(),
            source: e.into(),
        },
    })?;
    let fd = match openat(
        &dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => {
            return Ok(Located::Missing(Missing {
                dir,
                name: name.to_owned(),
                path: path.to_owned(),
            }))
        }
        Err(e) => {
            return Err(VolumeError::Open {
                path: path.to_owned(),
                source: e.into(),
            })
        }
    };
    let st = fstat(&fd).map_err(|e| VolumeError::Open {
        path: path.to_owned(),
        source: e.into(),
    })?;
    let fd = if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        if st.st_uid != 0 {
            return Err(refused(
                "is a symbolic link not owned by root: not allowed (only root's links to block devices are followed)".into(),
            ));
        }
        let target =
            rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(|e| VolumeError::Open {
                path: path.to_owned(),
                source: e.into(),
            })?;
        let t = openat2(
            &dir,
            target.as_c_str(),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            no_links,
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOENT => refused("is a dangling symbolic link: not allowed".into()),
            rustix::io::Errno::LOOP => {
                refused("is a symbolic link to another symbolic link; not followed".into())
            }
            e => VolumeError::Open {
                path: path.to_owned(),
                source: e.into(),
            },
        })?;
        let tst = fstat(&t).map_err(|e| VolumeError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        if FileType::from_raw_mode(tst.st_mode) != FileType::BlockDevice {
            return Err(refused(format!(
                "is a symbolic link to a {}: not allowed (only root's links to block devices are followed)",
                type_name(FileType::from_raw_mode(tst.st_mode))
            )));
        }
        t
    } else {
        fd
    };
    Ok(Located::Existing(Resolved::new(fd, path)?))
}

/// The device number (major, minor) of `fd`, a volume of `kind`, when it
/// is a block device.
fn device_number(fd: std::os::fd::BorrowedFd<'_>, kind: VolumeKind) -> Option<(u32, u32)> {
    let st = fstat(fd).ok()?;
    (kind == VolumeKind::BlockDevice)
        .then(|| (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev)))
}

impl Resolved {
    fn new(fd: OwnedFd, path: &Path) -> Result<Self> {
        let kind = kind_of(&fd, path)?;
        Ok(Self {
            fd,
            path: path.to_owned(),
            kind,
        })
    }

    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number (major, minor) of a resolved block device.
    pub fn device(&self) -> Option<(u32, u32)> {
        device_number(self.fd.as_fd(), self.kind)
    }

    /// The identity of what was resolved (sysfs under `sys`).
    pub fn identity(&self, sys: &Path) -> Result<VolumeIdentity> {
        identity::of_fd(self.fd.as_fd(), sys).map_err(|source| VolumeError::Other {
            op: "identifying",
            path: self.path.clone(),
            source,
        })
    }

    /// Opens what was resolved, through `/proc/self/fd` (the descriptor,
    /// not the name). With `exclusive`, a block device is opened `O_EXCL`:
    /// the kernel refuses it while mounted or held (LVM, md, another
    /// `O_EXCL` opener), and the error names the holders it can find.
    pub fn open(&self, write: bool, exclusive: bool) -> Result<FileVolume> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(write);
        let mut flags = libc::O_CLOEXEC;
        if exclusive && self.kind == VolumeKind::BlockDevice {
            flags |= libc::O_EXCL;
        }
        let proc = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        let file = match opts.custom_flags(flags).open(&proc) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let st = fstat(&self.fd).map_err(|e| VolumeError::Open {
                    path: self.path.clone(),
                    source: e.into(),
                })?;
                let (maj, min) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
                let h = identity::holders(maj, min, &identity::sys_root());
                let holders = if h.is_empty() {
                    format!("device {maj}:{min} is held by another opener")
                } else {
                    h.join(", ")
                };
                return Err(VolumeError::Held {
                    path: self.path.clone(),
                    holders,
                });
            }
            Err(source) => {
                return Err(VolumeError::Open {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        // The reopen must be the very object resolved.
        let (a, b) = (fstat(&self.fd), fstat(&file));
        match (a, b) {
            (Ok(a), Ok(b)) if a.st_dev == b.st_dev && a.st_ino == b.st_ino => {}
            _ => {
                return Err(VolumeError::Refused {
                    path: self.path.clone(),
                    why: "changed while being opened".into(),
                })
            }
        }
        FileVolume::from_file(file, &self.path)
    }
}

impl Missing {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory to create in is on the file system of `other`
    /// (e.g. `/dev`'s devtmpfs, where no replica file belongs; `/dev/shm`
    /// is a file system of its own).
    pub fn dir_on_filesystem_of(&self, other: &Path) -> bool {
        match (fstat(&self.dir), rustix::fs::stat(other)) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev,
            _ => false,
        }
    }

    /// Creates the file `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600, in the
    /// directory resolved by [`locate`]; an existing name (a symlink
    /// planted meanwhile) fails instead of being followed.
    pub fn create(&self) -> Result<(FileVolume, VolumeIdentity)> {
        let fd = openat(
            &self.dir,
            self.name.as_os_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| VolumeError::Open {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let id = identity::of_fd(fd.as_fd(), &identity::sys_root()).map_err(|source| {
            VolumeError::Other {
                op: "identifying",
                path: self.path.clone(),
                source,
            }
        })?;
        Ok((FileVolume::from_file(File::from(fd), &self.path)?, id))
    }
}

/// Which operation of a [`MemVolume`] fails, and from which offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Read {
        at: u64,
    },
    Write {
        at: u64,
    },
    Sync,
    /// Writes fail with ENOSPC once this many bytes were written.
    FullAfter {
        bytes: u64,
    },
}

/// An in-memory volume for tests, with optional injected faults.
#[derive(Debug)]
pub struct MemVolume {
    path: PathBuf,
    data: Mutex<Vec<u8>>,
    written: Mutex<u64>,
    fault: Option<Fault>,
    resizable: bool,
}

impl MemVolume {
    pub fn new(name: &str, data: Vec<u8>, resizable: bool) -> Self {
        Self {
            path: PathBuf::from(name),
            data: Mutex::new(data),
            written: Mutex::new(0),
            fault: None,
            resizable,
        }
    }

    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().expect("mem lock").clone()
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, kind: io::Error) -> VolumeError {
        VolumeError::Io {
            op,
            path: self.path.clone(),
            offset,
            len,
            source: kind,
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        match self.fault {
            Some(Fault::Write { at }) if offset + len > at => {
                return Err(self.err(
                    "writing",
                    offset,
                    len,
                    io::Error::from_raw_os_error(libc::EIO),
                ))
            }
            Some(Fault::FullAfter { bytes }) => {
                let mut w = self.written.lock().expect("mem lock");
                if *w + len > bytes {
                    return Err(self.err(
                        "writing",
                        offset,
                        len,
                        io::Error::from_raw_os_error(libc::ENOSPC),
                    ));
                }
                *w += len;
            }
            _ => {}
        }
        Ok(())
    }
}

impl Volume for MemVolume {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.data.lock().expect("mem lock").len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(Fault::Read { at }) = self.fault {
            if offset + buf.len() as u64 > at {
                return Err(self.err(
                    "reading",
                    offset,
                    buf.len() as u64,
                    io::Error::from_raw_os_error(libc::EIO),
                ));
            }
        }
        let d = self.data.lock().expect("mem lock");
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= d.len() as u64);
        let Some(end) = end else {
            return Err(self.err(
                "reading",
                offset,
                buf.len() as u64,
                io::ErrorKind::UnexpectedEof.into(),
            ));
        };
        buf.copy_from_slice(&d[offset as usize..end as usize]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        let mut d = self.data.lock().expect("mem lock");
        let end = offset as usize + buf.len();
        if end > d.len() {
            return Err(self.err(
                "writing",
                offset,
                buf.len() as u64,
                io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        let mut d = self.data.lock().expect("mem lock");
        let end = (offset + len) as usize;
        if end > d.len() {
            return Err(self.err(
                "zeroing",
                offset,
                len,
                io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        d[offset as usize..end].fill(0);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        if self.fault == Some(Fault::Sync) {
            return Err(VolumeError::Other {
                op: "flushing",
                path: self.path.clone(),
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }

    fn set_size(&self, size: u64) -> Result<()> {
        let mut d = self.data.lock().expect("mem lock");
        if !self.resizable && size > d.len() as u64 {
            return Err(VolumeError::TooSmall {
                path: self.path.clone(),
                have: d.len() as u64,
                need: size,
            });
        }
        if self.resizable {
            d.resize(size as usize, 0);
        }
        Ok(())
    }

    fn resizable(&self) -> bool {
        self.resizable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of `path` in the page cache, as `fincore` (util-linux)
    /// counts them.
    fn cached_bytes(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    #[test]
    fn a_scan_that_drops_behind_leaves_the_cache_as_it_found_it() {
        // On disk, not tmpfs: the page cache of a tmpfs file is the file.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("img");
        let size = 48u64 << 20;
        let mut data = vec![0u8; size as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096) as u8 | 1;
        }
        std::fs::write(&p, &data).unwrap();
        let file = File::open(&p).unwrap();
        file.sync_all().unwrap();
        let mut v = FileVolume::open(&p, Access::Read).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let read = |v: &FileVolume, buf: &mut [u8], range: std::ops::Range<u64>| {
            for off in range.step_by(buf.len()) {
                v.read_at(buf, off).unwrap();
                v.done_with(off, buf.len() as u64);
            }
        };
        // Nothing cached; then the first 16 MiB read without drop-behind.
        fadvise(file.as_fd(), 0, None, Advice::DontNeed).unwrap();
        assert_eq!(cached_bytes(&p), 0);
        // No readahead past what is read.
        fadvise(v.file.as_fd(), 0, None, Advice::Random).unwrap();
        read(&v, &mut buf, 0..16 << 20);
        assert_eq!(cached_bytes(&p), 16 << 20);
        // A scan with drop-behind hands back every page it brought in and
        // leaves those it found cached (where the kernel can tell).
        v.advise_sequential(true);
        read(&v, &mut buf, 0..size);
        let kept = if sys::cached_pages(file.as_fd(), 0, size).is_ok() {
            16 << 20
        } else {
            0
        };
        assert_eq!(cached_bytes(&p), kept, "pages cached after the scan");
    }

    #[test]
    fn file_volume_round_trip_and_sparse_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let v = FileVolume::open(&p, Access::Write { create: true }).unwrap();
        assert_eq!(v.size(), 0);
        v.set_size(1 << 20).unwrap();
        v.write_at(&[1; 8192], 4096).unwrap();
        let mut b = [0u8; 8192];
        v.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [1; 8192]);
        v.zero(4096, 8192).unwrap();
        v.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0; 8192]);
        assert_eq!(v.next_data(0), None, "punched file has no data left");
        v.write_at(&[1; 4096], 65536).unwrap();
        v.write_at(&[1; 4096], 1 << 19).unwrap();
        assert_eq!(v.data_bytes_in(0, 1 << 20), Some(8192), "two extents");
        assert_eq!(
            v.data_bytes_in(1 << 18, 1 << 20),
            Some(4096),
            "one past 256 KiB"
        );
        assert!(v.free_space().is_some());
        let err = v.read_at(&mut b, (1 << 20) - 10).unwrap_err();
        assert!(err.to_string().contains("offset 1048566"), "{err}");
    }

    #[test]
    fn missing_file_names_path() {
        let err = FileVolume::open(Path::new("/nonexistent/x"), Access::Read).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"));
    }

    #[test]
    fn directory_is_not_a_volume() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileVolume::open(dir.path(), Access::Read),
            Err(VolumeError::WrongType { .. })
        ));
    }

    #[test]
    fn locate_refuses_odd_types_and_links() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fifo = d.join("fifo");
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        for p in [fifo.as_path(), Path::new("/dev/null"), d] {
            assert!(
                matches!(locate(p), Err(VolumeError::WrongType { .. })),
                "{p:?}"
            );
        }
        // The same check protects the plain open: a FIFO never blocks it.
        assert!(FileVolume::open(&fifo, Access::Read).is_err());
        std::fs::write(d.join("secret"), b"s").unwrap();
        symlink(d.join("secret"), d.join("link")).unwrap();
        symlink(d.join("nowhere"), d.join("dangling")).unwrap();
        symlink(d, d.join("dirlink")).unwrap();
        for (p, why) in [
            ("link", "symbolic link to a regular file"),
            ("dangling", "dangling"),
            ("dirlink/secret", "directory on the way"),
        ] {
            let e = locate(&d.join(p)).unwrap_err().to_string();
            assert!(e.contains(why), "{p}: {e}");
        }
        assert!(!d.join("nowhere").exists());
        let Located::Missing(m) = locate(&d.join("new")).unwrap() else {
            panic!("new file exists")
        };
        let (v, id) = m.create().unwrap();
        assert!(id.strong);
        assert_eq!(v.size(), 0);
        let mode = std::fs::metadata(d.join("new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let Located::Existing(r) = locate(&d.join("new")).unwrap() else {
            panic!("created file missing")
        };
        assert_eq!(r.identity(Path::new("/sys")).unwrap(), id);
        r.open(true, true).unwrap().write_at(b"x", 0).unwrap();
    }

    #[test]
    fn mem_volume_faults() {
        let v = MemVolume::new("m", vec![0; 100], false).with_fault(Fault::FullAfter { bytes: 10 });
        v.write_at(&[1; 10], 0).unwrap();
        let e = v.write_at(&[1], 50).unwrap_err();
        assert_eq!(e.io_error().unwrap().raw_os_error(), Some(libc::ENOSPC));
        assert!(matches!(v.set_size(200), Err(VolumeError::TooSmall { .. })));
    }
}
