//! What a volume *is*, as opposed to what it is called: replica state, its
//! lock and its journal belong to the identity, so an alias (symlink, hard
//! link, `/dev/mapper/VG-LV` for `/dev/VG/LV`) shares them and a new volume
//! at a reused name does not inherit them.
//!
//! Sources, strongest first:
//! - device-mapper (LVM) volumes: the dm UUID (`/sys/dev/block/M:m/dm/uuid`);
//! - loop devices: the backing file's device and inode, plus offset and
//!   size limit;
//! - partitions: their disk's identity plus the partition number;
//! - other disks: the WWN (`wwid`), else the serial (weak: serials need not
//!   be unique, virtio's are whatever the VM was given), else device number
//!   and size (weak);
//! - regular files: device, inode and birth time (`statx`).
//!
//! A *strong* identity is unique and persistent; a weak one may be shared by
//! another volume, so a weak target never gets a delta.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, StatxFlags};

/// What kind of thing an identity names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    File,
    DeviceMapper,
    Loop,
    Disk,
    Partition,
    /// A block device known only by number and size.
    Device,
}

impl IdKind {
    fn tag(self) -> &'static str {
        match self {
            IdKind::File => "file",
            IdKind::DeviceMapper => "dm",
            IdKind::Loop => "loop",
            IdKind::Disk => "disk",
            IdKind::Partition => "part",
            IdKind::Device => "dev",
        }
    }
}

/// The identity of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeIdentity {
    pub kind: IdKind,
    /// Unique within `kind` (for strong identities).
    pub key: String,
    /// Unique and persistent: safe to trust a recorded state for deltas.
    pub strong: bool,
}

impl VolumeIdentity {
    /// `kind:key`, as recorded in state files.
    pub fn id(&self) -> String {
        format!("{}:{}", self.kind.tag(), self.key)
    }

    /// A short fixed-length name for files derived from this identity
    /// (24 hex digits of a BLAKE3 hash of [`VolumeIdentity::id`]).
    pub fn hash(&self) -> String {
        let h = blake3::hash(self.id().as_bytes());
        h.to_hex()[..24].to_owned()
    }
}

impl fmt::Display for VolumeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.id(),
            if self.strong { "strong" } else { "weak" }
        )
    }
}

/// Where sysfs is: `/sys`, or `SNAPSYNC_SYS_ROOT` when set (the tests
/// point it at a fixture tree to stage a swapped disk). It changes only
/// how volumes are identified, and the environment of snapsync is its
/// operator's.
pub fn sys_root() -> PathBuf {
    std::env::var_os("SNAPSYNC_SYS_ROOT")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/sys"), PathBuf::from)
}

fn read_trim(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The identity of the file or block device open at `fd` (an `O_PATH`
/// descriptor is enough).
pub fn of_fd(fd: BorrowedFd<'_>, sys: &Path) -> io::Result<VolumeIdentity> {
    let st = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )?;
    let ft = FileType::from_raw_mode(st.stx_mode.into());
    match ft {
        FileType::RegularFile => {
            // The file system by its id where it has one that outlives the
            // mount (ext4 and btrfs derive it from their UUID), so a disk
            // mounted through another device (moved to another host, a
            // renumbered dm device) keeps its replicas' state; else the
            // device number.
            let fs = match rustix::fs::fstatvfs(fd) {
                Ok(v) if v.f_fsid != 0 => format!("fs{:016x}", v.f_fsid),
                _ => rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor).to_string(),
            };
            let mut key = format!("{fs}:{}", st.stx_ino);
            if st.stx_mask & StatxFlags::BTIME.bits() != 0 {
                key.push_str(&format!(
                    ":{}.{:09}",
                    st.stx_btime.tv_sec, st.stx_btime.tv_nsec
                ));
            }
            Ok(VolumeIdentity {
                kind: IdKind::File,
                key,
                strong: true,
            })
        }
        FileType::BlockDevice => Ok(of_block_at(
            st.stx_rdev_major,
            st.stx_rdev_minor,
            sys,
            Some(fd),
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a regular file nor a block device",
        )),
    }
}

/// The identity of what `path` names, following symlinks (for sources: an
/// operator's own path).
pub fn of_path(path: &Path, sys: &Path) -> io::Result<VolumeIdentity> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())?;
    of_fd(std::os::fd::AsFd::as_fd(&fd), sys)
}

/// The identity of block device `major:minor`, from sysfs under `sys`.
pub fn of_block(major: u32, minor: u32, sys: &Path) -> VolumeIdentity {
    of_block_at(major, minor, sys, None)
}

/// The backing file of the loop device open at `fd` (`O_PATH` is enough),
/// asked of the kernel: reopened read-only through `/proc/self/fd`, which
/// a loop device allows without side effects.
fn loop_status(fd: BorrowedFd<'_>) -> Option<crate::sys::LoopStatus> {
    use rustix::fs::{Mode, OFlags};
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let dev = rustix::fs::open(
        proc.as_str(),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    crate::sys::loop_status(std::os::fd::AsFd::as_fd(&dev)).ok()
}

/// [`of_block`], with the device open at `fd` when there is one: a loop
/// device's backing file then comes from `LOOP_GET_STATUS64` (device and
/// inode of the very file the kernel reads), not from the path sysfs
/// shows, which may name another file by now.
fn of_block_at(major: u32, minor: u32, sys: &Path, fd: Option<BorrowedFd<'_>>) -> VolumeIdentity {
    let base = sys.join(format!("dev/block/{major}:{minor}"));
    if let Some(uuid) = read_trim(&base.join("dm/uuid")) {
        return VolumeIdentity {
            kind: IdKind::DeviceMapper,
            key: uuid,
            strong: true,
        };
    }
    if let Some(backing) = read_trim(&base.join("loop/backing_file")) {
        let offset = read_trim(&base.join("loop/offset")).unwrap_or_else(|| "0".into());
        let limit = read_trim(&base.join("loop/sizelimit")).unwrap_or_else(|| "0".into());
        if let Some(ls) = fd.and_then(loop_status) {
            return VolumeIdentity {
                kind: IdKind::Loop,
                key: format!(
                    "{}:{}:{}:{}",
                    ls.backing_dev, ls.backing_inode, ls.offset, ls.size_limit
                ),
                strong: true,
            };
        }
        // No descriptor (a fixture): the path. A deleted backing file's
        // path may name another file by now: weak.
        let deleted = backing.ends_with(" (deleted)");
        let backing = backing.trim_end_matches(" (deleted)");
        return match std::fs::metadata(backing) {
            Ok(m) if !deleted => {
                use std::os::unix::fs::MetadataExt;
                VolumeIdentity {
                    kind: IdKind::Loop,
                    key: format!("{}:{}:{offset}:{limit}", m.dev(), m.ino()),
                    strong: true,
                }
            }
            _ => VolumeIdentity {
                kind: IdKind::Loop,
                key: format!("{backing}:{offset}:{limit}:{major}:{minor}"),
                strong: false,
            },
        };
    }
    if let Some(part) = read_trim(&base.join("partition")) {
        let disk = std::fs::canonicalize(&base)
            .ok()
            .and_then(|real| real.parent().map(|p| p.join("dev")))
            .and_then(|p| read_trim(&p))
            .and_then(|d| {
                let (a, b) = d.split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            });
        if let Some((dmaj, dmin)) = disk {
            if (dmaj, dmin) != (major, minor) {
                let d = of_block(dmaj, dmin, sys);
                return VolumeIdentity {
                    kind: IdKind::Partition,
                    key: format!("{}#{part}", d.id()),
                    strong: d.strong,
                };
            }
        }
    }
    let size = read_trim(&base.join("size")).unwrap_or_else(|| "?".into());
    for f in ["wwid", "device/wwid"] {
        if let Some(w) = read_trim(&base.join(f)) {
            return VolumeIdentity {
                kind: IdKind::Disk,
                key: format!("wwn:{w}"),
                strong: true,
            };
        }
    }
    for f in ["serial", "device/serial"] {
        if let Some(s) = read_trim(&base.join(f)) {
            return VolumeIdentity {
                kind: IdKind::Disk,
                key: format!("serial:{s}:{size}"),
                strong: false,
            };
        }
    }
    VolumeIdentity {
        kind: IdKind::Device,
        key: format!("{major}:{minor}:{size}"),
        strong: false,
    }
}

/// The device-mapper name of block device `major:minor` (`vg-lv` for an
/// LVM volume), from sysfs under `sys`.
pub fn dm_name(major: u32, minor: u32, sys: &Path) -> Option<String> {
    read_trim(&sys.join(format!("dev/block/{major}:{minor}/dm/name")))
}

/// Who holds block device `major:minor`, for an error message: mount
/// points from `/proc/self/mountinfo` and holders from sysfs.
pub fn holders(major: u32, minor: u32, sys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let want = format!("{major}:{minor}");
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mi.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() > 4 && f[2] == want {
                out.push(format!("mounted at {}", f[4]));
            }
        }
    }
    let dir = sys.join(format!("dev/block/{want}/holders"));
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match read_trim(&e.path().join("dm/name")) {
                Some(dm) => out.push(format!("held by {name} ({dm})")),
                None => out.push(format!("held by {name}")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn sysfs_identities() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        put(&s.join("dev/block/253:1/dm/uuid"), "LVM-abc\n");
        let dm = of_block(253, 1, s);
        assert_eq!((dm.id(), dm.strong), ("dm:LVM-abc".into(), true));
        put(&s.join("devices/sda/dev"), "8:0\n");
        put(&s.join("devices/sda/wwid"), "naa.5000\n");
        put(&s.join("devices/sda/sda2/partition"), "2\n");
        std::fs::create_dir_all(s.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(s.join("devices/sda"), s.join("dev/block/8:0")).unwrap();
        std::os::unix::fs::symlink(s.join("devices/sda/sda2"), s.join("dev/block/8:2")).unwrap();
        let p = of_block(8, 2, s);
        assert_eq!(p.id(), "part:disk:wwn:naa.5000#2");
        assert!(p.strong);
        put(&s.join("dev/block/252:0/serial"), "virt0\n");
        put(&s.join("dev/block/252:0/size"), "100\n");
        assert!(!of_block(252, 0, s).strong);
        let weak = of_block(9, 9, s);
        assert_eq!((weak.id(), weak.strong), ("dev:9:9:?".into(), false));
        assert_eq!(weak.hash().len(), 24);
        assert_ne!(weak.hash(), dm.hash());
    }

    #[test]
    fn files_by_inode() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        std::fs::hard_link(&a, d.path().join("b")).unwrap();
        let id = |p: &Path| {
            let f = std::fs::File::open(p).unwrap();
            of_fd(std::os::fd::AsFd::as_fd(&f), Path::new("/sys")).unwrap()
        };
        let ia = id(&a);
        assert!(ia.strong);
        assert_eq!(ia, id(&d.path().join("b")), "hard links are one volume");
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(d.path().join("b")).unwrap();
        std::fs::write(&a, b"x").unwrap();
        // A recreated file may reuse the inode number, but not the birth time.
        let again = id(&a);
        if again.key.split(':').count() > 2 {
            assert_ne!(ia, again);
        }
    }
}
