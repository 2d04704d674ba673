//! The kernel interfaces that need `unsafe`: block-device ioctls. Every
//! other module of the workspace is free of unsafe code.
//!
//! Numbers are from `<linux/fs.h>`: `BLKGETSIZE64 = _IOR(0x12, 114, size_t)`,
//! `BLKSSZGET = _IO(0x12, 104)`, `BLKZEROOUT = _IO(0x12, 127)` taking a
//! `uint64_t[2]` of (start, length) in bytes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

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
