//! The kernel interfaces that need `unsafe`: block-device ioctls, the
//! `cachestat` system call and one signal disposition set in a child
//! between fork and exec. Every other module of the workspace is free of
//! unsafe code.
//!
//! Numbers are from `<linux/fs.h>`: `BLKGETSIZE64 = _IOR(0x12, 114, size_t)`,
//! `BLKSSZGET = _IO(0x12, 104)`, `BLKZEROOUT = _IO(0x12, 127)` taking a
//! `uint64_t[2]` of (start, length) in bytes. `LOOP_GET_STATUS64 = 0x4C05`
//! and `struct loop_info64` are from `<linux/loop.h>`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `cachestat(2)` (Linux 6.5): one number on every architecture, as are
/// all system calls added since 5.1. `struct cachestat_range` and `struct
/// cachestat` are from `<linux/mman.h>`.
const SYS_CACHESTAT: libc::c_long = 451;

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Pages of `[offset, offset+len)` of the file or block device open at
/// `fd` that are in the page cache; an error where the kernel has no
/// `cachestat` (before 6.5: `ENOSYS`).
pub fn cached_pages(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<u64> {
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads one cachestat_range through the second
    // pointer and writes one struct cachestat through the third; both
    // point to live, aligned, repr(C) values on our stack of exactly those
    // layouts (five u64 counters; an offset and a length). The fd is
    // borrowed and open; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.nr_cache)
}

/// Size in bytes of the block device open at `fd`.
pub fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live, aligned u64 on our stack; the fd is borrowed and open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical sector size of the block device open at `fd`.
pub fn logical_block_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to
    // a live, aligned c_int on our stack; the fd is borrowed and open.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BLKSSZGET as _,
            &mut size as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size as u32)
}

/// Zeroes `len` bytes at `offset` of the block device open at `fd`; the
/// kernel uses WRITE ZEROES when the device offers it. Both values must be
/// multiples of the logical block size.
pub fn block_zero_out(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads a u64[2] through the pointer, which points to
    // a live array on our stack; the fd is borrowed and open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` of `<linux/loop.h>` (232 bytes on every ABI: all
/// fields are fixed-size and naturally aligned).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// What the kernel holds for a bound loop device: the backing file's
/// device (`st_dev` encoding) and inode, and the window into it. Taken
/// from the open file itself, so a backing file deleted and replaced at
/// the same path does not change it (sysfs only has the path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopStatus {
    pub backing_dev: u64,
    pub backing_inode: u64,
    pub offset: u64,
    pub size_limit: u64,
}

/// `LOOP_GET_STATUS64` on the loop device open at `fd` (not `O_PATH`: the
/// ioctl needs a real open). ENXIO: no file is bound.
pub fn loop_status(fd: BorrowedFd<'_>) -> io::Result<LoopStatus> {
    // SAFETY: LoopInfo64 is plain old data (integers and byte arrays), for
    // which all-zero bytes are a valid value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one struct loop_info64 through the
    // pointer, which points to a live LoopInfo64 of that exact layout
    // (repr(C), same field order and sizes) on our stack; the fd is
    // borrowed and open. On a device that is not a loop device the kernel
    // fails the ioctl (ENOTTY) without writing.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            LOOP_GET_STATUS64 as _,
            &mut info as *mut LoopInfo64,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(LoopStatus {
        backing_dev: info.lo_device,
        backing_inode: info.lo_inode,
        offset: info.lo_offset,
        size_limit: info.lo_sizelimit,
    })
}

/// Makes `cmd`'s child ignore `SIGPIPE`, so that a child still writing
/// a message when its reader is gone (snapsync killed) gets `EPIPE` and
/// goes on rather than dying mid-way. Used with a process group of its
/// own for the LVM commands that change metadata.
pub fn ignore_sigpipe_in_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: signal(2) is one, and the
    // closure touches no memory of the parent's (no allocation, no lock).
    // SIG_IGN survives exec, which is the point.
    unsafe {
        cmd.pre_exec(|| {
            if libc::signal(libc::SIGPIPE, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loop_info64_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<super::LoopInfo64>(), 232);
    }
}
