//! Thin-LVM changed-block tracking: what changed between the base snapshot
//! and the new one, from the pool's metadata, without reading any data.
//!
//! The pool's metadata snapshot is held only while `thin_delta` runs; its
//! ranges go to a spill file in the state directory (merged, 17 bytes a
//! range), so memory stays flat for millions of ranges and the hold does
//! not last as long as the transfer.
//!
//! The changed chunks are then refined to 4 KiB against the base snapshot
//! (see [`crate::engine::cbt_refine`]), unless the hidden environment
//! variable `SNAPSYNC_CBT_CHUNKS=1` asks for whole chunks (for benchmarks).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use snapshot::identity::IdKind;
use snapshot::lvm::{LvInfo, LvName, Lvm, LvmError, MetadataSnapHold, ThinMapping, ThinPool};
use snapshot::thin_delta::DeltaKind;
use snapshot::{MappedVolume, Volume, VolumeError, VolumeIdentity};

use crate::engine::cbt_refine::{Refiner, Span};
use crate::engine::source::Change;

/// Counts of a computed delta.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeltaStats {
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub ranges: u64,
}

/// Mapped in both snapshots, differently (`different`).
const KIND_DATA: u8 = 1;
/// Mapped only in the base (`left_only`).
const KIND_ZERO: u8 = 2;
/// Mapped only in the new snapshot (`right_only`).
const KIND_NEW: u8 = 3;

/// Runs `thin_delta` between `base` and `new` (thin snapshots in the same
/// pool) and writes the changed byte ranges to `spill`.
pub fn compute(lvm: &Lvm, base: &LvInfo, new: &LvInfo, spill: &Path) -> Result<DeltaStats> {
    let left = base.thin_id.context("base snapshot has no thin id")?;
    let right = new.thin_id.context("new snapshot has no thin id")?;
    with_hold(lvm, new, HOLD_WAIT, |hold| {
        write_ranges(lvm, hold, left, right, spill)
    })
}

/// Runs `f` while the metadata snapshot of `lv`'s pool is held, waiting up
/// to `wait` for it.
fn with_hold<T>(
    lvm: &Lvm,
    lv: &LvInfo,
    wait: Duration,
    f: impl FnOnce(&MetadataSnapHold) -> Result<T>,
) -> Result<T> {
    let pool = lvm.pool_of(lv).context("finding the thin pool")?;
    let hold = reserve(lvm, &pool, wait)?;
    let result = f(&hold);
    // Release in every path; report a release failure only if all else worked.
    let released = hold
        .finish()
        .context("releasing the pool's metadata snapshot");
    let value = result?;
    released?;
    Ok(value)
}

/// How long changed-block tracking waits for the pool's metadata snapshot
/// while another process on this host holds it (a target reading its
/// mapping, another volume's cycle): such holds last seconds.
pub const HOLD_WAIT: Duration = Duration::from_secs(60);

/// Most ranges of a thin volume's mapping kept in memory (16 bytes each):
/// past them the rest of the volume counts as data.
const MAX_MAPPED_RANGES: usize = 1 << 20;

/// Reserves `pool`'s metadata snapshot, waiting up to `wait` while another
/// process holds it.
fn reserve(lvm: &Lvm, pool: &ThinPool, wait: Duration) -> Result<MetadataSnapHold> {
    let deadline = Instant::now() + wait;
    loop {
        match lvm.reserve_metadata_snap(pool) {
            Err(LvmError::MetadataSnapBusy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r.context("reserving the pool's metadata snapshot"),
        }
    }
}

/// What the thin volume `lv` maps, from the pool's metadata (see
/// [`snapshot::MappedVolume`]): a full scan of it reads only that. Waits
/// up to `wait` for the pool's metadata snapshot.
pub fn mapping(lvm: &Lvm, lv: &LvInfo, wait: Duration) -> Result<ThinMapping> {
    let dev = lv.thin_id.context("the LV has no thin id")?;
    with_hold(lvm, lv, wait, |hold| {
        Ok(lvm.thin_mapped(hold, dev, MAX_MAPPED_RANGES)?)
    })
}

/// `volume`, the thin LV `lv`, read only where it maps: the rest reads as
/// zeros, like the holes of a sparse file. When the mapping cannot be
/// read (the pool's metadata snapshot busy past `wait`, a tool failing),
/// `volume` itself, read in full, and the log says why.
pub fn read_mapped(
    lvm: &Lvm,
    lv: &LvInfo,
    volume: Arc<dyn Volume>,
    wait: Duration,
) -> Arc<dyn Volume> {
    match mapping(lvm, lv, wait) {
        Ok(m) => {
            let mapped = MappedVolume::new(volume, m.ranges, m.known_until);
            tracing::debug!(
                "{}: maps {} of {} bytes",
                lv.lv_name(),
                mapped.mapped_bytes(),
                mapped.size()
            );
            Arc::new(mapped)
        }
        Err(e) => {
            let busy = matches!(
                e.downcast_ref::<LvmError>(),
                Some(LvmError::MetadataSnapBusy { .. })
            );
            let why = format!(
                "{}: reading its mapping: {e:#}; every block is read",
                lv.lv_name()
            );
            if busy {
                tracing::info!("{why}");
            } else {
                tracing::warn!("{why}");
            }
            volume
        }
    }
}

/// [`read_mapped`] for the volume opened as the block device `device` of
/// `identity` when it is a thin LV; any other volume as it is.
pub fn mapped_if_thin(
    volume: Arc<dyn Volume>,
    identity: &VolumeIdentity,
    device: Option<(u32, u32)>,
    sys: &Path,
    wait: Duration,
) -> Arc<dyn Volume> {
    let lvm = Lvm::new();
    match lv_opened(&lvm, identity, device, sys) {
        Ok(info) if info.is_thin() => read_mapped(&lvm, &info, volume, wait),
        _ => volume,
    }
}

/// Why [`lv_opened`] found no LV.
#[derive(Debug)]
pub enum LvOpened {
    /// Not an LVM logical volume, or LVM cannot say which.
    Not(String),
    /// The LV at the device's name is another volume now: its name and
    /// dm UUID.
    Replaced { lv: LvName, uuid: Option<String> },
}

/// The LV opened as the block device `device` of `identity`, checked to
/// be that very volume (by its dm UUID): an LV replaced at the same name
/// is never taken for it.
pub fn lv_opened(
    lvm: &Lvm,
    identity: &VolumeIdentity,
    device: Option<(u32, u32)>,
    sys: &Path,
) -> Result<LvInfo, LvOpened> {
    let lvm_volume = identity.kind == IdKind::DeviceMapper && identity.key.starts_with("LVM-");
    let Some((major, minor)) = device.filter(|_| lvm_volume) else {
        return Err(LvOpened::Not(format!(
            "not an LVM logical volume (identity {identity})"
        )));
    };
    let name = snapshot::identity::dm_name(major, minor, sys).ok_or_else(|| {
        LvOpened::Not(format!("device {major}:{minor} has no device-mapper name"))
    })?;
    let lv =
        LvName::parse(&format!("/dev/mapper/{name}")).map_err(|e| LvOpened::Not(e.to_string()))?;
    let info = lvm.lv(&lv).map_err(|e| LvOpened::Not(e.to_string()))?;
    if info.dm_uuid().as_deref() != Some(identity.key.as_str()) {
        return Err(LvOpened::Replaced {
            lv: info.lv_name(),
            uuid: info.dm_uuid(),
        });
    }
    Ok(info)
}

fn write_ranges(
    lvm: &Lvm,
    hold: &snapshot::lvm::MetadataSnapHold,
    left: u32,
    right: u32,
    spill: &Path,
) -> Result<DeltaStats> {
    let mut run = lvm.thin_delta(hold, left, right)?;
    let block = run.data_block_bytes();
    let mut out = RangeWriter::create(spill)?;
    for r in run.by_ref() {
        let r = r?;
        if r.kind == DeltaKind::RightOnly {
            out.push(KIND_NEW, r.byte_range(block)?)?;
        } else if r.kind.needs_data() {
            out.push(KIND_DATA, r.byte_range(block)?)?;
        } else if r.kind.is_zeroed() {
            out.push(KIND_ZERO, r.byte_range(block)?)?;
        } else {
            debug_assert_eq!(r.kind, DeltaKind::Same);
        }
    }
    run.finish()?;
    out.finish()
}

/// Writes merged ranges to the spill file.
struct RangeWriter {
    out: BufWriter<File>,
    cur: Option<(u8, std::ops::Range<u64>)>,
    stats: DeltaStats,
}

impl RangeWriter {
    fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(f),
            cur: None,
            stats: DeltaStats::default(),
        })
    }

    fn push(&mut self, kind: u8, r: std::ops::Range<u64>) -> Result<()> {
        if r.is_empty() {
            return Ok(());
        }
        match &mut self.cur {
            Some((k, cur)) if *k == kind && cur.end == r.start => cur.end = r.end,
            _ => {
                if let Some((k, cur)) = self.cur.replace((kind, r)) {
                    self.emit(k, cur)?;
                }
            }
        }
        Ok(())
    }

    fn emit(&mut self, kind: u8, r: std::ops::Range<u64>) -> Result<()> {
        let len = r.end - r.start;
        if kind != KIND_ZERO {
            self.stats.data_bytes += len;
        } else {
            self.stats.zero_bytes += len;
        }
        self.stats.ranges += 1;
        let mut rec = [0u8; 17];
        rec[0] = kind;
        rec[1..9].copy_from_slice(&r.start.to_le_bytes());
        rec[9..].copy_from_slice(&r.end.to_le_bytes());
        self.out.write_all(&rec)?;
        Ok(())
    }

    fn finish(mut self) -> Result<DeltaStats> {
        if let Some((k, cur)) = self.cur.take() {
            self.emit(k, cur)?;
        }
        self.out.flush()?;
        Ok(self.stats)
    }
}

/// Streams the ranges of a spill file as whole changed chunks.
pub fn read_spill(path: &Path) -> Result<impl Iterator<Item = Result<Change, VolumeError>> + Send> {
    Ok(read_spans(path)?.map(|s| {
        s.map(|s| match s {
            Span::Changed(r) | Span::New(r) => Change::Data(r),
            Span::Zeroed(r) => Change::Zero(r),
        })
    }))
}

/// The changes of a spill file for a session reading `new`: refined to
/// 4 KiB against the `base` snapshot, or whole chunks when the base cannot
/// be read or `SNAPSYNC_CBT_CHUNKS=1`.
pub fn changes(
    lvm: &Lvm,
    base: &LvInfo,
    new: std::sync::Arc<dyn snapshot::Volume>,
    block: blockdiff::BlockSize,
    spill: &Path,
) -> Result<Box<dyn Iterator<Item = Result<Change, VolumeError>> + Send>> {
    if std::env::var_os("SNAPSYNC_CBT_CHUNKS").is_some_and(|v| v == "1") {
        return Ok(Box::new(read_spill(spill)?));
    }
    match open_base(lvm, base) {
        Ok(b) => Ok(Box::new(Refiner::spawn(
            b,
            new,
            Box::new(read_spans(spill)?),
            block,
        ))),
        Err(e) => {
            tracing::warn!(
                "cannot read the base snapshot {}, shipping whole changed chunks: {e:#}",
                base.lv_name()
            );
            Ok(Box::new(read_spill(spill)?))
        }
    }
}

/// Opens the base snapshot, activating it first if it is not (thin
/// snapshots skip activation at boot).
fn open_base(lvm: &Lvm, base: &LvInfo) -> Result<std::sync::Arc<dyn snapshot::Volume>> {
    let mut info = base.clone();
    if info.attr.state() != Some('a') {
        lvm.activate(&base.lv_name())
            .context("activating the base snapshot")?;
        info = lvm.lv(&base.lv_name())?;
    }
    let path = info
        .path
        .as_deref()
        .context("the base snapshot has no device path")?;
    crate::commands::sync::open_source(path, true)
}

/// Streams the ranges of a spill file.
pub fn read_spans(path: &Path) -> Result<impl Iterator<Item = Result<Span, VolumeError>> + Send> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::new(f);
    let p = path.to_owned();
    Ok(std::iter::from_fn(move || {
        let mut rec = [0u8; 17];
        match r.read_exact(&mut rec) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => {
                return Some(Err(VolumeError::Other {
                    op: "reading",
                    path: p.clone(),
                    source: e,
                }))
            }
        }
        let start = u64::from_le_bytes(rec[1..9].try_into().expect("8"));
        let end = u64::from_le_bytes(rec[9..].try_into().expect("8"));
        Some(Ok(match rec[0] {
            KIND_DATA => Span::Changed(start..end),
            KIND_NEW => Span::New(start..end),
            _ => Span::Zeroed(start..end),
        }))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_merges_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut w = RangeWriter::create(&p).unwrap();
        w.push(KIND_DATA, 0..10).unwrap();
        w.push(KIND_DATA, 10..20).unwrap();
        w.push(KIND_ZERO, 20..30).unwrap();
        w.push(KIND_DATA, 40..50).unwrap();
        w.push(KIND_NEW, 50..60).unwrap();
        let st = w.finish().unwrap();
        assert_eq!((st.data_bytes, st.zero_bytes, st.ranges), (40, 10, 4));
        let spans: Vec<_> = read_spans(&p).unwrap().map(Result::unwrap).collect();
        assert_eq!(spans[3], Span::New(50..60));
        let got: Vec<_> = read_spill(&p).unwrap().map(Result::unwrap).collect();
        assert_eq!(
            got,
            vec![
                Change::Data(0..20),
                Change::Zero(20..30),
                Change::Data(40..50),
                Change::Data(50..60)
            ]
        );
    }
}
