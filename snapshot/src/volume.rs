//! Reading and writing volumes: regular files and block devices, and an
//! in-memory volume that can inject errors for tests.
//!
//! IO is `pread`/`pwrite` on large buffers. No mmap: an IO error on a mapped
//! device page is a SIGBUS, not an error we can report.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{fadvise, fallocate, Advice, FallocateFlags};

use crate::sys;

/// A failed volume operation, naming the volume and where.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is neither a regular file nor a block device")]
    NotAVolume { path: PathBuf },
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
    /// Next offset at or after `offset` that may hold data (`SEEK_DATA`);
    /// `None` when the rest is a hole. Volumes that cannot tell return
    /// `Some(offset)`.
    fn next_data(&self, offset: u64) -> Option<u64> {
        Some(offset)
    }
}

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
    file: File,
    path: PathBuf,
    kind: VolumeKind,
    size: Mutex<u64>,
    drop_cache: bool,
}

impl FileVolume {
    pub fn open(path: &Path, access: Access) -> Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        if let Access::Write { create } = access {
            opts.write(true).create(create);
        }
        // A block device that is held exclusively (mounted, in use by LVM)
        // should not be written behind the holder's back; O_EXCL on a block
        // device asks the kernel for exactly that check.
        let file = opts
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| VolumeError::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| VolumeError::Open {
            path: path.to_owned(),
            source,
        })?;
        let ft = meta.file_type();
        let (kind, size) = if ft.is_block_device() {
            // The metadata length of a block device is 0: ask the kernel.
            let size =
                sys::block_device_size(file.as_fd()).map_err(|source| VolumeError::Other {
                    op: "BLKGETSIZE64 on",
                    path: path.to_owned(),
                    source,
                })?;
            (VolumeKind::BlockDevice, size)
        } else if ft.is_file() {
            (VolumeKind::File, meta.len())
        } else {
            return Err(VolumeError::NotAVolume {
                path: path.to_owned(),
            });
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            kind,
            size: Mutex::new(size),
            drop_cache: false,
        })
    }

    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    /// Tells the kernel we read front to back, and (with `drop_behind`)
    /// that pages we are done with may leave the page cache, so a scan of a
    /// large volume does not evict everything else.
    pub fn advise_sequential(&mut self, drop_behind: bool) {
        let _ = fadvise(self.file.as_fd(), 0, None, Advice::Sequential);
        self.drop_cache = drop_behind;
    }

    pub fn file(&self) -> &File {
        &self.file
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
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("reading", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("writing", offset, buf.len() as u64, e))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
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
        self.file.sync_all().map_err(|source| VolumeError::Other {
            op: "flushing",
            path: self.path.clone(),
            source,
        })
    }

    fn set_size(&self, size: u64) -> Result<()> {
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

    fn done_with(&self, offset: u64, len: u64) {
        if self.drop_cache {
            let _ = fadvise(
                self.file.as_fd(),
                offset,
                std::num::NonZeroU64::new(len),
                Advice::DontNeed,
            );
        }
    }

    fn next_data(&self, offset: u64) -> Option<u64> {
        if self.kind != VolumeKind::File {
            return Some(offset);
        }
        match rustix::fs::seek(self.file.as_fd(), rustix::fs::SeekFrom::Data(offset)) {
            Ok(pos) => Some(pos),
            // ENXIO: no data at or after offset.
            Err(rustix::io::Errno::NXIO) => None,
            Err(_) => Some(offset),
        }
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
            Err(VolumeError::NotAVolume { .. })
        ));
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
