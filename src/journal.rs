//! The write-ahead delta journal: how the target moves from generation n-1
//! to n without ever holding a mix of the two.
//!
//! Ops are appended to a journal file in the state directory while the
//! session runs; the volume is untouched. On commit the journal is *sealed*
//! (a trailer with the generation and a digest of every record, then
//! fsync), the state marked "applying generation n" (fsynced), the journal
//! applied in place, the volume fsynced, the state advanced, and the
//! journal removed. Opening a volume first [`recover`]s: a sealed journal
//! whose digest checks is replayed (applying it twice writes the same
//! bytes). Anything else is discarded if the state says no apply began (the
//! volume was never touched); if one began, the journal is moved aside
//! ([`quarantine`]) and the replica marked inconsistent, so the next
//! session copies it in full. A journal that fails to apply (EIO, EFBIG)
//! is moved aside the same way: it never blocks later sessions.
//!
//! Every record counts against the journal's budget by its size in the
//! journal (a zeroing by its 17-byte record, not the range it zeroes).
//!
//! ```text
//! header:  "SNAPJRN1"
//! record:  kind u8 | offset u64 LE | len u64 LE | payload (Data: len bytes)
//! seal:    kind 0xFF | trailer_len u32 LE | trailer JSON | blake3(every byte before this digest)
//! ```

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use snapshot::Volume;
use wire::Generation;

use crate::state::{self, StatePaths, VolumeState};
use std::os::unix::fs::OpenOptionsExt;

const MAGIC: &[u8; 8] = b"SNAPJRN1";
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_SEAL: u8 = 0xFF;
/// Largest data record: a maximal block.
const MAX_RECORD: u64 = blockdiff::MAX_BLOCK as u64;
const MAX_TRAILER: u32 = 64 * 1024;
/// Bytes of a record before its payload.
pub const RECORD_HEAD: u64 = 17;
/// Journals moved aside are kept for inspection, this many at most per
/// volume (the oldest go first).
pub const KEEP_FAILED: usize = 3;

/// What a sealed journal produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    pub generation: Generation,
    pub source_id: String,
    pub volume_size: u64,
    pub records: u64,
}

/// A journal being written.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    out: BufWriter<Hashing<File>>,
    bytes: u64,
    records: u64,
    max: u64,
    data: u64,
}

/// Hashes every byte written through it. Under a `BufWriter` it sees the
/// journal in large pieces, which BLAKE3 hashes several times faster than
/// record by record.
#[derive(Debug)]
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Journal {
    /// Starts an empty journal at `path` that refuses to grow past `max`
    /// bytes of records.
    pub fn create(path: &Path, max: u64) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Mode 0600, never through a symlink planted in the state dir.
        let file = state::create_private(path)
            .with_context(|| format!("creating journal {}", path.display()))?;
        let mut j = Self {
            path: path.to_owned(),
            out: BufWriter::with_capacity(
                1 << 20,
                Hashing {
                    inner: file,
                    hasher: blake3::Hasher::new(),
                },
            ),
            bytes: 0,
            records: 0,
            max,
            data: 0,
        };
        j.put(MAGIC)?;
        Ok(j)
    }

    /// Bytes of records so far (headers and payloads).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Lowers the budget (never raises it).
    pub fn limit(&mut self, max: u64) {
        self.max = self.max.min(max);
    }

    /// Data bytes so far (what applying will write, zeroings aside).
    pub fn data_bytes(&self) -> u64 {
        self.data
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .with_context(|| format!("writing journal {}", self.path.display()))
    }

    fn record(&mut self, kind: u8, offset: u64, len: u64, payload: &[u8]) -> Result<()> {
        let mut head = [0u8; 17];
        head[0] = kind;
        head[1..9].copy_from_slice(&offset.to_le_bytes());
        head[9..17].copy_from_slice(&len.to_le_bytes());
        self.put(&head)?;
        self.put(payload)?;
        self.records += 1;
        Ok(())
    }

    /// Appends a write. `Ok(false)`: journaled; `Ok(true)`: it would pass
    /// the budget, nothing was written and the caller must go in place.
    pub fn append_data(&mut self, offset: u64, data: &[u8]) -> Result<bool> {
        let size = RECORD_HEAD + data.len() as u64;
        if self.bytes.saturating_add(size) > self.max {
            return Ok(true);
        }
        self.record(KIND_DATA, offset, data.len() as u64, data)?;
        self.bytes += size;
        self.data += data.len() as u64;
        Ok(false)
    }

    /// Appends a zeroing; it costs its record, whatever the range.
    pub fn append_zero(&mut self, offset: u64, len: u64) -> Result<bool> {
        if self.bytes.saturating_add(RECORD_HEAD) > self.max {
            return Ok(true);
        }
        self.record(KIND_ZERO, offset, len, &[])?;
        self.bytes += RECORD_HEAD;
        Ok(false)
    }

    /// Writes the trailer and makes the journal durable: from here on a
    /// crash replays it.
    pub fn seal(
        mut self,
        generation: &Generation,
        source_id: &str,
        volume_size: u64,
    ) -> Result<SealedJournal> {
        let trailer = Trailer {
            generation: generation.clone(),
            source_id: source_id.to_owned(),
            volume_size,
            records: self.records,
        };
        let json = serde_json::to_vec(&trailer).expect("trailer serialises");
        let mut seal = vec![KIND_SEAL];
        seal.extend_from_slice(&(json.len() as u32).to_le_bytes());
        seal.extend_from_slice(&json);
        // The digest covers every byte before it, the trailer included: a
        // corrupt generation or size must not be replayed either.
        self.put(&seal)?;
        let Hashing {
            inner: mut file,
            hasher,
        } = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .context("flushing journal")?;
        file.write_all(hasher.finalize().as_bytes())
            .with_context(|| format!("writing journal {}", self.path.display()))?;
        file.sync_all()
            .with_context(|| format!("flushing journal {}", self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            state::sync_dir(dir)?;
        }
        Ok(SealedJournal {
            path: self.path,
            trailer,
        })
    }

    /// Applies what was journaled so far in place and deletes the journal
    /// (the caller marked the replica inconsistent first). Returns bytes
    /// written.
    pub fn apply_and_discard(self, volume: &dyn Volume) -> Result<u64> {
        let path = self.path.clone();
        self.out
            .into_inner()
            .map_err(|e| e.into_error())
            .context("flushing journal")?;
        let written = replay(&path, volume, None, None)?;
        fs::remove_file(&path).with_context(|| format!("removing journal {}", path.display()))?;
        Ok(written)
    }

    /// Throws an unsealed journal away.
    pub fn discard(self) -> Result<()> {
        drop(self.out);
        fs::remove_file(&self.path)
            .with_context(|| format!("removing journal {}", self.path.display()))
    }
}

/// A complete, durable journal.
#[derive(Debug)]
pub struct SealedJournal {
    path: PathBuf,
    trailer: Trailer,
}

impl SealedJournal {
    /// Applies every record to `volume` and flushes it. Returns bytes written.
    pub fn apply(&self, volume: &dyn Volume) -> Result<u64> {
        self.apply_counting(volume, &AtomicU64::new(0))
    }

    /// [`SealedJournal::apply`], adding bytes written to `applied` as it
    /// goes (for heartbeats during a long apply).
    pub fn apply_counting(&self, volume: &dyn Volume, applied: &AtomicU64) -> Result<u64> {
        if volume.size() < self.trailer.volume_size {
            volume.set_size(self.trailer.volume_size)?;
        }
        let started = std::time::Instant::now();
        let n = replay(&self.path, volume, None, Some(applied))?;
        let replayed = started.elapsed();
        volume.sync()?;
        tracing::debug!(
            "journal replayed in {replayed:.2?}, volume flushed by {:.2?}",
            started.elapsed()
        );
        Ok(n)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn remove(self) -> Result<()> {
        fs::remove_file(&self.path)
            .with_context(|| format!("removing journal {}", self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            state::sync_dir(dir)?;
        }
        Ok(())
    }
}

/// One journal record, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Data { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u64 },
    Seal { trailer: Trailer },
}

/// Parses a journal, calling `f` on each record; bounded (records are at
/// most a block) and safe on arbitrary bytes. Returns `Ok(None)` for a
/// journal cut short (no seal), `Ok(Some(trailer))` for a sealed one whose
/// digest checks. Corrupt content is an error.
pub fn parse(r: impl Read, f: impl FnMut(Record) -> Result<()>) -> Result<Option<Trailer>> {
    parse_records(r, true, f)
}

/// [`parse`], optionally without checking the digest: for a journal this
/// process sealed or already checked, hashing it again is wasted work.
fn parse_records(
    mut r: impl Read,
    verify: bool,
    mut f: impl FnMut(Record) -> Result<()>,
) -> Result<Option<Trailer>> {
    let mut hasher = Digesting {
        hasher: verify.then(blake3::Hasher::new),
    };
    let mut magic = [0u8; 8];
    if !read_full(&mut r, &mut magic)? {
        return Ok(None);
    }
    if &magic != MAGIC {
        bail!("not a snapsync journal (bad magic)");
    }
    hasher.update(&magic);
    let mut data = Vec::new();
    let mut records = 0u64;
    loop {
        let mut kind = [0u8; 1];
        if !read_full(&mut r, &mut kind)? {
            return Ok(None);
        }
        if kind[0] == KIND_SEAL {
            let mut len = [0u8; 4];
            if !read_full(&mut r, &mut len)? {
                return Ok(None);
            }
            let len = u32::from_le_bytes(len);
            if len > MAX_TRAILER {
                bail!("journal trailer of {len} bytes is too large");
            }
            let mut json = vec![0u8; len as usize];
            let mut digest = [0u8; 32];
            if !read_full(&mut r, &mut json)? || !read_full(&mut r, &mut digest)? {
                return Ok(None);
            }
            hasher.update(&kind);
            hasher.update(&(len).to_le_bytes());
            hasher.update(&json);
            if hasher.mismatches(&digest) {
                bail!("journal digest does not match its records");
            }
            let trailer: Trailer =
                serde_json::from_slice(&json).context("journal trailer is corrupt")?;
            if trailer.records != records {
                bail!(
                    "journal trailer counts {} records, found {records}",
                    trailer.records
                );
            }
            let mut rest = [0u8; 1];
            if read_full(&mut r, &mut rest)? {
                bail!("bytes after the journal seal");
            }
            f(Record::Seal {
                trailer: trailer.clone(),
            })?;
            return Ok(Some(trailer));
        }
        let mut head = [0u8; 16];
        if !read_full(&mut r, &mut head)? {
            return Ok(None);
        }
        hasher.update(&kind);
        hasher.update(&head);
        records += 1;
        let offset = u64::from_le_bytes(head[..8].try_into().expect("8"));
        let len = u64::from_le_bytes(head[8..].try_into().expect("8"));
        offset
            .checked_add(len)
            .context("journal record overflows")?;
        match kind[0] {
            KIND_DATA => {
                if len > MAX_RECORD {
                    bail!("journal data record of {len} bytes is too large");
                }
                data.resize(len as usize, 0);
                if !read_full(&mut r, &mut data)? {
                    return Ok(None);
                }
                hasher.update(&data);
                f(Record::Data {
                    offset,
                    data: &data,
                })?;
            }
            KIND_ZERO => f(Record::Zero { offset, len })?,
            k => bail!("unknown journal record kind {k}"),
        }
    }
}

/// A running digest, or none when the caller trusts the journal.
struct Digesting {
    hasher: Option<blake3::Hasher>,
}

impl Digesting {
    fn update(&mut self, b: &[u8]) {
        if let Some(h) = &mut self.hasher {
            h.update(b);
        }
    }

    fn mismatches(&self, digest: &[u8; 32]) -> bool {
        self.hasher
            .as_ref()
            .is_some_and(|h| h.finalize().as_bytes() != digest)
    }
}

/// Fills `buf`; false on a clean or partial end of file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Applies the records of the journal at `path` to `volume`. Callers
/// decide whether it may be applied (sealed, or ours to spill) and have
/// checked its digest, or sealed it themselves. `limit` caps the volume
/// size for checks.
fn replay(
    path: &Path,
    volume: &dyn Volume,
    limit: Option<u64>,
    applied: Option<&AtomicU64>,
) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("opening journal {}", path.display()))?;
    let size = limit.unwrap_or_else(|| volume.size());
    let mut written = 0;
    parse_records(BufReader::with_capacity(1 << 20, file), false, |rec| {
        match rec {
            Record::Data { offset, data } => {
                if offset + data.len() as u64 > size {
                    bail!("journal record at {offset} lies outside the volume");
                }
                volume.write_at(data, offset)?;
                written += data.len() as u64;
                if let Some(a) = applied {
                    a.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Record::Zero { offset, len } => {
                if offset + len > size {
                    bail!("journal record at {offset} lies outside the volume");
                }
                volume.zero(offset, len)?;
                written += len;
                if let Some(a) = applied {
                    a.fetch_add(len, Ordering::Relaxed);
                }
            }
            Record::Seal { .. } => {}
        }
        Ok(())
    })?;
    Ok(written)
}

/// Brings a volume to a complete generation after a crash: replays a
/// sealed journal, discards one that cannot have touched the volume, and
/// moves aside one that did and cannot be replayed. Returns what it did.
pub fn recover(
    paths: &StatePaths,
    state: &mut VolumeState,
    volume: &dyn Volume,
) -> Result<Option<String>> {
    let sealed = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&paths.journal)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context("opening the journal")),
        Ok(file) => parse(BufReader::new(file), |_| Ok(())),
    };
    let applying = state.applying.clone();
    let what = match (sealed, applying) {
        (Ok(Some(trailer)), _) => {
            let sj = SealedJournal {
                path: paths.journal.clone(),
                trailer: trailer.clone(),
            };
            let replayed = sj.apply(volume).and_then(|_| {
                if volume.resizable() && volume.size() > trailer.volume_size {
                    volume.set_size(trailer.volume_size)?;
                    volume.sync()?;
                }
                Ok(())
            });
            if let Err(e) = replayed {
                quarantine(paths, state, &trailer.generation, &e)?
            } else {
                state.source_id = Some(trailer.source_id.clone());
                state.generation = Some(trailer.generation.clone());
                state.consistent = true;
                state.in_progress = None;
                state.applying = None;
                state::save(&paths.state, state)?;
                sj.remove()?;
                format!(
                    "replayed the committed journal of generation {}",
                    trailer.generation.number
                )
            }
        }
        // The apply began: the volume may hold part of it.
        (Ok(None), Some(g)) => quarantine(
            paths,
            state,
            &g,
            &anyhow::anyhow!("the journal is incomplete"),
        )?,
        (Err(e), Some(g)) => quarantine(paths, state, &g, &e)?,
        // No apply began: the volume is untouched, the journal worthless.
        (sealed, None) => {
            if let Err(e) = sealed {
                tracing::warn!(
                    "journal {} is corrupt ({e:#}); discarding it",
                    paths.journal.display()
                );
            }
            fs::remove_file(&paths.journal)
                .with_context(|| format!("removing journal {}", paths.journal.display()))?;
            "discarded an incomplete journal; the replica is the previous generation".to_owned()
        }
    };
    tracing::info!("{}: {what}", paths.journal.display());
    Ok(Some(what))
}

/// A journal whose apply began and cannot be completed: the replica is
/// marked inconsistent (the next session copies it in full) and the
/// journal moved aside for inspection, at most [`KEEP_FAILED`] of them.
/// Returns the message naming it.
pub fn quarantine(
    paths: &StatePaths,
    state: &mut VolumeState,
    generation: &Generation,
    why: &anyhow::Error,
) -> Result<String> {
    state.consistent = false;
    state.in_progress = None;
    state.applying = None;
    state::save(&paths.state, state)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let aside = PathBuf::from(format!("{}.failed-{stamp:024}", paths.journal.display()));
    fs::rename(&paths.journal, &aside).with_context(|| {
        format!(
            "moving journal {} aside to {}",
            paths.journal.display(),
            aside.display()
        )
    })?;
    if let Some(dir) = paths.journal.parent() {
        prune_failed(&paths.journal, KEEP_FAILED);
        state::sync_dir(dir)?;
    }
    Ok(format!(
        "the journal of generation {} could not be applied ({why:#}); it was moved to {} and the \
         replica marked inconsistent: the next session copies it in full",
        generation.number,
        aside.display()
    ))
}

/// Removes the oldest moved-aside journals of `journal` beyond `keep`.
fn prune_failed(journal: &Path, keep: usize) {
    let (Some(dir), Some(name)) = (journal.parent(), journal.file_name()) else {
        return;
    };
    let prefix = format!("{}.failed-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut failed: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    // The stamp is fixed-width: names sort by age.
    failed.sort();
    let excess = failed.len().saturating_sub(keep);
    for old in &failed[..excess] {
        if let Err(e) = fs::remove_file(old) {
            tracing::warn!("removing old journal {}: {e}", old.display());
        }
    }
}

/// Settles a journal left by a version that named state files by path
/// (format 0): such a journal may belong to a volume no longer at that
/// path, so it is applied only when sealed, its digest holds and the
/// volume's size is the one it records (the ordinary upgrade case: an apply
/// interrupted on this very volume); otherwise it is discarded. Either way
/// it is removed, and the caller does a full scan afterwards.
pub fn recover_legacy(journal: &Path, volume: &dyn Volume) -> Result<Option<String>> {
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(journal)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening journal {}", journal.display())),
    };
    let sealed = parse(BufReader::new(file), |_| Ok(())).ok().flatten();
    let what = match sealed {
        Some(t) if t.volume_size == volume.size() => {
            replay(journal, volume, Some(t.volume_size), None)?;
            volume.sync()?;
            format!(
                "applied the sealed journal of generation {} left by an older version; a full scan follows",
                t.generation.number
            )
        }
        Some(t) => format!(
            "discarded a journal left by an older version for a volume of {} bytes (this one has {}): it belongs to another volume",
            t.volume_size,
            volume.size()
        ),
        None => "discarded an incomplete or corrupt journal left by an older version".to_owned(),
    };
    fs::remove_file(journal).with_context(|| format!("removing journal {}", journal.display()))?;
    tracing::info!("{}: {what}", journal.display());
    Ok(Some(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::MemVolume;

    fn gen() -> Generation {
        Generation {
            number: 2,
            snapshot: "s".into(),
        }
    }

    fn build(dir: &Path) -> PathBuf {
        let p = dir.join("j");
        let mut j = Journal::create(&p, 1 << 20).unwrap();
        assert!(!j.append_data(4, &[7; 4]).unwrap());
        assert!(!j.append_zero(0, 2).unwrap());
        j.seal(&gen(), "src", 16).unwrap();
        p
    }

    /// Runs recovery with the journal `journal` (state file in `dir`) on a
    /// volume of 16 bytes of 1; returns the volume, state and what it said.
    fn recover_ones(dir: &Path, journal: &Path) -> (MemVolume, VolumeState, Option<String>) {
        let paths = StatePaths {
            state: dir.join("st"),
            lock: dir.join("l"),
            journal: journal.to_owned(),
        };
        let v = MemVolume::new("v", vec![1; 16], false);
        let mut st = VolumeState::default();
        let said = recover(&paths, &mut st, &v).unwrap();
        (v, st, said)
    }

    #[test]
    fn sealed_journal_replays_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let p = build(dir.path());
        let (v, st, what) = recover_ones(dir.path(), &p);
        let what = what.unwrap();
        assert!(what.contains("replayed"));
        let mut want = vec![1u8; 16];
        want[..2].fill(0);
        want[4..8].fill(7);
        assert_eq!(v.contents(), want);
        assert_eq!(st.generation, Some(gen()));
        assert!(!p.exists());
    }

    #[test]
    fn truncated_journal_is_discarded_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = build(dir.path());
        let full = fs::read(&p).unwrap();
        for cut in 0..full.len() {
            fs::write(&p, &full[..cut]).unwrap();
            let (v, _, what) = recover_ones(dir.path(), &p);
            let what = what.unwrap();
            assert!(what.contains("discarded"), "cut {cut}: {what}");
            assert_eq!(v.contents(), vec![1; 16], "cut {cut} touched the volume");
        }
    }

    #[test]
    fn corrupt_journal_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let p = build(dir.path());
        let mut bytes = fs::read(&p).unwrap();
        bytes[30] ^= 0x40;
        fs::write(&p, &bytes).unwrap();
        let (v, st, _) = recover_ones(dir.path(), &p);
        assert_eq!(v.contents(), vec![1; 16]);
        assert_eq!(st.generation, None);
    }

    #[test]
    fn budget_spills() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(&dir.path().join("j"), RECORD_HEAD + 8).unwrap();
        assert!(!j.append_data(0, &[1; 8]).unwrap());
        assert!(j.append_data(8, &[1]).unwrap());
    }

    #[test]
    fn zero_records_count_against_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(&dir.path().join("j"), 3 * RECORD_HEAD).unwrap();
        for i in 0..3 {
            assert!(!j.append_zero(i << 40, 1 << 40).unwrap());
        }
        assert!(j.append_zero(3 << 40, 1).unwrap());
        assert_eq!(j.bytes(), 3 * RECORD_HEAD);
    }

    #[test]
    fn corrupt_journal_after_the_apply_began_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StatePaths {
            state: dir.path().join("st"),
            lock: dir.path().join("l"),
            journal: dir.path().join("j"),
        };
        for round in 0..KEEP_FAILED + 2 {
            let p = build(dir.path());
            let mut bytes = fs::read(&p).unwrap();
            bytes[30] ^= 0x40;
            fs::write(&p, &bytes).unwrap();
            let v = MemVolume::new("v", vec![1; 16], false);
            let mut st = VolumeState {
                generation: Some(gen()),
                consistent: true,
                applying: Some(gen()),
                ..Default::default()
            };
            let said = recover(&paths, &mut st, &v).unwrap().unwrap();
            assert!(said.contains("moved to"), "{said}");
            assert!(!st.consistent && st.applying.is_none());
            assert_eq!(state::load(&paths.state).unwrap(), st);
            assert!(!p.exists());
            let kept = fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("j.failed-")
                })
                .count();
            assert_eq!(kept, (round + 1).min(KEEP_FAILED));
        }
    }

    #[test]
    fn sealed_journal_that_cannot_be_applied_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = build(dir.path());
        let paths = StatePaths {
            state: dir.path().join("st"),
            lock: dir.path().join("l"),
            journal: p.clone(),
        };
        // 16 bytes needed, a fixed 4-byte volume: the replay fails.
        let v = MemVolume::new("v", vec![1; 4], false);
        let mut st = VolumeState {
            applying: Some(gen()),
            ..Default::default()
        };
        let said = recover(&paths, &mut st, &v).unwrap().unwrap();
        assert!(said.contains("could not be applied"), "{said}");
        assert!(!st.consistent);
        assert!(!p.exists());
    }

    #[test]
    fn parse_never_panics_on_garbage() {
        use proptest::prelude::*;
        proptest!(|(bytes in prop::collection::vec(any::<u8>(), 0..512))| {
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = parse(&bytes[..], |_| Ok(()));
            let _ = parse(&with_magic[..], |_| Ok(()));
        });
    }
}
