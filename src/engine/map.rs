//! The digest map ("software changed-block tracking"): what the source
//! sent in the last committed generation, as one keyed digest per block,
//! kept in the source's state directory.
//!
//! # Model
//!
//! After generation N commits, the replica equals what the source read
//! during that session, block for block. The source keeps a 16-byte keyed
//! BLAKE3 digest of every block of it (256 KiB per GiB at 64 KiB blocks).
//! The next session, if the target confirms it still holds exactly
//! generation N and vouches that nothing wrote it since, the source hashes
//! only itself, compares with the map, and asks the target to refine only
//! the blocks whose digest changed: the target reads those blocks and
//! nothing else.
//!
//! The map key is the source's own secret ([`MapStore`]'s `key`, 0600,
//! never sent anywhere): a peer that does not know it cannot make a map
//! the source accepts. The digests are keyed by a block key derived from
//! it and the map's salt ([`MapKey::block_key`]), and a full scan that
//! makes a new map uses that block key as its session key: the digests it
//! compares with the target's are the new map's, so no block is hashed
//! twice. The target of that session learns the block key (it hashes its
//! replica with it), never the map key; a digest-map session keeps the
//! base's salt and sends a session key of its own.
//!
//! # File (`digest-maps/NAME.map`, little-endian)
//!
//! ```text
//! "SNAPSMAP" | format u32 | block size u32 | volume size u64 | key id [16]
//!            | salt [16]
//! digests: blocks_in(volume size) x 16 bytes, block 0 first
//! trailer: generation u64 | snapshot | source id | target identity
//!          (each: u16 length + UTF-8, at most MAX_TEXT bytes)
//! trailer length u32 | MAC [32]
//! ```
//!
//! MAC = keyed BLAKE3 (the map key) over the fixed header, the BLAKE3 hash
//! of the digest section, the trailer and its length. Readers check the
//! whole file (size, header, trailer, MAC) before trusting one digest, in
//! one streaming pass; [`MapReader`] then streams the digests in order.
//! Nothing is ever held whole: a map of a 64 GiB volume is 16 MiB on disk
//! and a few hundred KiB in memory.
//!
//! # Life cycle of one session
//!
//! 1. [`MapStore::take`] validates `NAME.map` and renames it `NAME.inuse`
//!    before the target is asked anything: a session that then fails or is
//!    killed leaves no `NAME.map`, so the next one does a full scan
//!    ("the previous cycle failed or was interrupted").
//! 2. [`MapWriter`] streams the new digests to `NAME.tmp` during the session.
//! 3. Only after the target's `Committed`, [`MapWriter::commit`] writes the
//!    trailer, fsyncs, renames it to `NAME.map` and fsyncs the directory;
//!    then `NAME.inuse` goes. A crash between the target's commit and that
//!    rename leaves a map of N-1 (or none) while the target holds N: a
//!    full scan follows, which is safe. No map ever names a generation
//!    the target does not hold.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blockdiff::{BlockSize, Digest, DIGEST_LEN};
use wire::Generation;

use crate::state;

const MAGIC: [u8; 8] = *b"SNAPSMAP";
/// Version of the map file format (2: digests keyed by a salted block
/// key; format 1 keyed them by the map key itself).
pub const MAP_FORMAT: u32 = 2;
const FIXED: usize = 8 + 4 + 4 + 8 + 16 + SALT_LEN;
/// Bytes of a map's salt.
pub const SALT_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// Longest text field of the trailer.
pub const MAX_TEXT: usize = 4096;
const MAX_TRAILER: usize = 8 + 3 * (2 + MAX_TEXT);
/// Subdirectory of the state directory holding maps and their key.
pub const MAP_DIR: &str = "digest-maps";
const KEY_FILE: &str = "key";

/// The map key: 32 random bytes, created once per state directory.
#[derive(Clone)]
pub struct MapKey([u8; 32]);

impl std::fmt::Debug for MapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapKey(..)")
    }
}

impl MapKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Names the key without revealing it, so a map made with another key
    /// is told apart from a corrupt one.
    pub fn id(&self) -> [u8; 16] {
        let h = blake3::keyed_hash(&self.0, b"snapsync digest map key id");
        h.as_bytes()[..16].try_into().expect("16 bytes")
    }

    /// The key of the block digests of a map with `salt`
    /// (domain-separated from anything else the key is used for).
    pub fn block_key(&self, salt: &[u8; SALT_LEN]) -> blockdiff::HashKey {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"snapsync digest map block key");
        h.update(salt);
        blockdiff::HashKey(*h.finalize().as_bytes())
    }

    /// The block signer of a map with `salt`.
    pub fn signer(&self, salt: &[u8; SALT_LEN]) -> blockdiff::Signer {
        blockdiff::Signer::new(self.block_key(salt))
    }

    fn mac_key(&self) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, b"snapsync digest map mac key").as_bytes()
    }
}

/// What a map is bound to, besides its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHeader {
    /// Salt of the digests' key ([`MapKey::block_key`]).
    pub salt: [u8; SALT_LEN],
    pub block_size: BlockSize,
    pub volume_size: u64,
    pub generation: Generation,
    pub source_id: String,
    pub target_identity: String,
}

/// Why a map cannot be used. Every case means: full scan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("no digest map yet")]
    Missing,
    #[error("the previous cycle failed or was interrupted")]
    Interrupted,
    #[error("the digest map was made with another key")]
    KeyChanged,
    #[error("the digest map is of format {0}, made by an older snapsync")]
    OldFormat(u32),
    #[error("the digest map is corrupt ({0})")]
    Corrupt(String),
    #[error("the digest map is of {0}")]
    Mismatch(String),
    #[error("cannot read the digest map: {0}")]
    Io(String),
}

fn corrupt(why: impl Into<String>) -> Unusable {
    Unusable::Corrupt(why.into())
}

/// The digest-map directory of a state directory and its key.
#[derive(Debug, Clone)]
pub struct MapStore {
    dir: PathBuf,
    key: MapKey,
}

impl MapStore {
    /// Opens (creating 0700, refusing one that is not ours or a symlink)
    /// `STATE_DIR/digest-maps` and its key, made on first use.
    pub fn open(state_dir: &Path) -> Result<Self> {
        if let Some(n) = state::ensure_dir(state_dir)? {
            tracing::warn!("{n}");
        }
        let dir = state_dir.join(MAP_DIR);
        if let Some(n) = state::ensure_dir(&dir)? {
            tracing::warn!("{n}");
        }
        let key = load_or_create_key(&dir.join(KEY_FILE))?;
        Ok(Self { dir, key })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key(&self) -> &MapKey {
        &self.key
    }

    fn file(&self, name: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{name}.{ext}"))
    }

    /// Validates the map `name` and moves it aside as in use: from here
    /// until [`MapWriter::commit`], a failure leaves no map.
    pub fn take(&self, name: &str) -> Result<(MapHeader, MapReader<File>), Unusable> {
        let map = self.file(name, "map");
        let inuse = self.file(name, "inuse");
        let f = match open_nofollow(&map) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A leftover of a session that did not commit.
                return Err(match fs::remove_file(&inuse) {
                    Ok(()) => Unusable::Interrupted,
                    Err(_) => Unusable::Missing,
                });
            }
            Err(e) => return Err(Unusable::Io(e.to_string())),
        };
        let r = MapReader::new(f, &self.key);
        let _ = fs::remove_file(&inuse);
        let moved =
            fs::rename(&map, &inuse).map_err(|e| Unusable::Io(format!("{}: {e}", map.display())));
        match r {
            Ok((h, r)) => {
                moved?;
                state::sync_dir(&self.dir).map_err(|e| Unusable::Io(format!("{e:#}")))?;
                Ok((h, r))
            }
            Err(e) => {
                let _ = fs::remove_file(&inuse);
                Err(e)
            }
        }
    }

    /// Makes a taken map current again, for a session that ended before
    /// the target heard of it (best effort: failing, the next session
    /// does a full scan).
    pub fn put_back(&self, name: &str) {
        let (map, inuse) = (self.file(name, "map"), self.file(name, "inuse"));
        if !map.exists() && fs::rename(&inuse, &map).is_ok() {
            let _ = state::sync_dir(&self.dir);
        }
    }

    /// Removes what a committed session leaves behind of the old map.
    pub fn release(&self, name: &str) {
        let _ = fs::remove_file(self.file(name, "inuse"));
    }

    /// Removes every file of map `name`.
    pub fn remove(&self, name: &str) {
        for ext in ["map", "inuse", "tmp"] {
            let _ = fs::remove_file(self.file(name, ext));
        }
    }

    /// Names of the maps (any state) in the store.
    pub fn names(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let (stem, ext) = n.rsplit_once('.')?;
                matches!(ext, "map" | "inuse" | "tmp").then(|| stem.to_owned())
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Starts the map of this session's generation, as `name.tmp`, its
    /// digests keyed with `salt`.
    pub fn writer(
        &self,
        name: &str,
        block_size: BlockSize,
        volume_size: u64,
        salt: &[u8; SALT_LEN],
    ) -> Result<MapWriter> {
        let tmp = self.file(name, "tmp");
        let f =
            state::create_private(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut fixed = Vec::with_capacity(FIXED);
        fixed.extend_from_slice(&MAGIC);
        fixed.extend_from_slice(&MAP_FORMAT.to_le_bytes());
        fixed.extend_from_slice(&block_size.bytes().to_le_bytes());
        fixed.extend_from_slice(&volume_size.to_le_bytes());
        fixed.extend_from_slice(&self.key.id());
        fixed.extend_from_slice(salt);
        let mut out = BufWriter::with_capacity(256 * 1024, f);
        out.write_all(&fixed)
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(MapWriter {
            out,
            fixed,
            digests: blake3::Hasher::new(),
            written: 0,
            expected: block_size.blocks_in(volume_size),
            tmp,
            path: self.file(name, "map"),
            dir: self.dir.clone(),
            mac_key: self.key.mac_key(),
            salt: *salt,
        })
    }
}

fn open_nofollow(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
}

fn load_or_create_key(path: &Path) -> Result<MapKey> {
    let read = |p: &Path| -> io::Result<MapKey> {
        let mut f = open_nofollow(p)?;
        let mut k = [0u8; 32];
        f.read_exact(&mut k)?;
        let mut rest = [0u8; 1];
        if f.read(&mut rest)? != 0 {
            return Err(io::Error::other("longer than 32 bytes"));
        }
        Ok(MapKey(k))
    };
    match read(path) {
        Ok(k) => return Ok(k),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                "reading digest map key {}; remove it to start over (the next syncs do full scans)",
                path.display()
            )
            })
        }
    }
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
    // Written aside and linked in place: of two runs (or two sessions of a
    // fan-out) making a key at once, one wins and both use its key.
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}.{n}", std::process::id()));
    let mut f =
        state::create_private(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&k)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            state::sync_dir(path.parent().context("key path has no directory")?)?;
            Ok(MapKey(k))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read(path).with_context(|| format!("reading digest map key {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Streams a map's digests in block order, after checking all of it.
#[derive(Debug)]
pub struct MapReader<R> {
    inner: BufReader<R>,
    left: u64,
}

impl<R: Read + Seek> MapReader<R> {
    /// Checks the whole map (bounded: sizes are checked against the
    /// file's length before anything is allocated) and positions at the
    /// first digest.
    pub fn new(mut inner: R, key: &MapKey) -> Result<(MapHeader, Self), Unusable> {
        let io_err = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => corrupt("truncated"),
            _ => Unusable::Io(e.to_string()),
        };
        let len = inner.seek(SeekFrom::End(0)).map_err(io_err)?;
        if len < (FIXED + 4 + MAC_LEN) as u64 {
            return Err(corrupt(format!("{len} bytes")));
        }
        inner.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let mut fixed = [0u8; FIXED];
        inner.read_exact(&mut fixed).map_err(io_err)?;
        if fixed[..8] != MAGIC {
            return Err(corrupt("not a digest map"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(fixed[o..o + 4].try_into().expect("4"));
        let format = u32_at(8);
        if format < MAP_FORMAT {
            return Err(Unusable::OldFormat(format));
        }
        if format != MAP_FORMAT {
            return Err(corrupt(format!(
                "format {format}, this build reads {MAP_FORMAT}"
            )));
        }
        let block_size =
            BlockSize::new(u32_at(12) as u64).map_err(|e| corrupt(format!("block size: {e}")))?;
        let volume_size = u64::from_le_bytes(fixed[16..24].try_into().expect("8"));
        if fixed[24..40] != key.id() {
            return Err(Unusable::KeyChanged);
        }
        let digest_bytes = block_size
            .blocks_in(volume_size)
            .checked_mul(DIGEST_LEN as u64)
            .ok_or_else(|| corrupt("volume size"))?;
        let tail = len
            .checked_sub(FIXED as u64 + digest_bytes + 4 + MAC_LEN as u64)
            .ok_or_else(|| corrupt(format!("{len} bytes for a volume of {volume_size}")))?;
        if tail > MAX_TRAILER as u64 {
            return Err(corrupt(format!("trailer of {tail} bytes")));
        }
        // The digest section, hashed in one streaming pass.
        let mut inner = BufReader::with_capacity(64 * 1024, inner);
        let mut h = blake3::Hasher::new();
        io::copy(&mut (&mut inner).take(digest_bytes), &mut h).map_err(io_err)?;
        let mut trailer = vec![0u8; tail as usize + 4 + MAC_LEN];
        inner.read_exact(&mut trailer).map_err(io_err)?;
        let (body, mac) = trailer.split_at(tail as usize + 4);
        let stated = u32::from_le_bytes(body[tail as usize..].try_into().expect("4"));
        if stated as u64 != tail {
            return Err(corrupt("trailer length"));
        }
        let mut m = blake3::Hasher::new_keyed(&key.mac_key());
        m.update(&fixed);
        m.update(h.finalize().as_bytes());
        m.update(body);
        let want: [u8; MAC_LEN] = mac.try_into().expect("32");
        if m.finalize() != blake3::Hash::from(want) {
            return Err(corrupt("checksum mismatch"));
        }
        let t = parse_trailer(&body[..tail as usize])?;
        let header = MapHeader {
            salt: fixed[40..40 + SALT_LEN].try_into().expect("16"),
            block_size,
            volume_size,
            generation: t.0,
            source_id: t.1,
            target_identity: t.2,
        };
        inner.seek(SeekFrom::Start(FIXED as u64)).map_err(io_err)?;
        Ok((
            header,
            Self {
                inner,
                left: digest_bytes / DIGEST_LEN as u64,
            },
        ))
    }

    /// The next block's digest.
    pub fn next_digest(&mut self) -> io::Result<Digest> {
        if self.left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the digest map's last block",
            ));
        }
        let mut d = [0u8; DIGEST_LEN];
        self.inner.read_exact(&mut d)?;
        self.left -= 1;
        Ok(d)
    }
}

fn parse_trailer(mut t: &[u8]) -> Result<(Generation, String, String), Unusable> {
    if t.len() < 8 {
        return Err(corrupt("trailer"));
    }
    let number = u64::from_le_bytes(t[..8].try_into().expect("8"));
    t = &t[8..];
    let mut text = || -> Result<String, Unusable> {
        if t.len() < 2 {
            return Err(corrupt("trailer"));
        }
        let n = u16::from_le_bytes([t[0], t[1]]) as usize;
        if n > MAX_TEXT || t.len() < 2 + n {
            return Err(corrupt("trailer text"));
        }
        let s = std::str::from_utf8(&t[2..2 + n])
            .map_err(|_| corrupt("trailer text"))?
            .to_owned();
        t = &t[2 + n..];
        Ok(s)
    };
    let snapshot = text()?;
    let source = text()?;
    let target = text()?;
    if !t.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok((Generation { number, snapshot }, source, target))
}

/// The map of the generation a session is making, streamed to a
/// temporary file; it becomes the map only by [`MapWriter::commit`].
#[derive(Debug)]
pub struct MapWriter {
    out: BufWriter<File>,
    fixed: Vec<u8>,
    digests: blake3::Hasher,
    written: u64,
    expected: u64,
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    mac_key: [u8; 32],
    salt: [u8; SALT_LEN],
}

impl MapWriter {
    /// Appends the next block's digest.
    pub fn push(&mut self, d: &Digest) -> io::Result<()> {
        self.digests.update(d);
        self.written += 1;
        self.out.write_all(d)
    }

    /// Makes the map durable and current: trailer, fsync, rename, fsync
    /// of the directory. Call only once the target has committed.
    pub fn commit(mut self, header: &MapHeader) -> Result<()> {
        anyhow::ensure!(
            header.salt == self.salt,
            "digest map header of another salt"
        );
        anyhow::ensure!(
            self.written == self.expected,
            "digest map of {} blocks has {}",
            self.expected,
            self.written
        );
        let mut body = Vec::new();
        body.extend_from_slice(&header.generation.number.to_le_bytes());
        for s in [
            &header.generation.snapshot,
            &header.source_id,
            &header.target_identity,
        ] {
            anyhow::ensure!(s.len() <= MAX_TEXT, "digest map text of {} bytes", s.len());
            body.extend_from_slice(&(s.len() as u16).to_le_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        body.extend_from_slice(&((body.len()) as u32).to_le_bytes());
        let mut m = blake3::Hasher::new_keyed(&self.mac_key);
        m.update(&self.fixed);
        m.update(self.digests.finalize().as_bytes());
        m.update(&body);
        let ctx = |what: &str| format!("{what} {}", self.tmp.display());
        self.out.write_all(&body).with_context(|| ctx("writing"))?;
        self.out
            .write_all(m.finalize().as_bytes())
            .with_context(|| ctx("writing"))?;
        let f = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| ctx("writing"))?;
        f.sync_all().with_context(|| ctx("flushing"))?;
        fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        state::sync_dir(&self.dir)
    }
}

/// For the fuzz target and tests: checks and reads a whole map from
/// memory (bounded by the input's length).
pub fn decode(bytes: &[u8], key: &MapKey) -> Result<(MapHeader, Vec<Digest>), Unusable> {
    let (h, mut r) = MapReader::new(io::Cursor::new(bytes), key)?;
    let mut v = Vec::new();
    while r.left > 0 {
        v.push(r.next_digest().map_err(|e| Unusable::Io(e.to_string()))?);
    }
    Ok((h, v))
}

/// What a session asks of the digest map (`SessionParams::digest_map`).
#[derive(Debug, Clone)]
pub struct MapPlan {
    pub store: MapStore,
    /// The map's file name in the store (without extension).
    pub name: String,
    /// Do a full scan whatever the map says, and why (a scrub cycle).
    pub scrub: Option<String>,
}

/// A session's use of the digest map, from before `Open` to after
/// `Committed`.
#[derive(Debug)]
pub struct MapSession {
    plan: MapPlan,
    /// A map of the base was validated and taken.
    usable: bool,
    /// The salt of the taken map, if usable.
    base_salt: Option<[u8; SALT_LEN]>,
    /// This session's own salt, for a new map when no base was taken.
    salt: [u8; SALT_LEN],
    /// Its reader, until the comparison takes it.
    old: Option<MapReader<File>>,
    /// Why the map is not used, for the report (`None` for a first copy).
    pub fallback: Option<String>,
    /// A map of this pair was there, usable or not: the pair was synced
    /// before, so its target most likely holds most of the source.
    pub found: bool,
}

impl MapSession {
    /// Looks at the map before the session opens: a usable one (of this
    /// source, block and volume size) is taken and its base returned
    /// with the target identity the target must have. `salt` (random) is
    /// this session's, for a new map made by a full scan.
    pub fn prepare(
        plan: MapPlan,
        salt: [u8; SALT_LEN],
        source_id: &str,
        block: BlockSize,
        size: u64,
    ) -> (Self, Option<(Generation, String)>) {
        let mut s = Self {
            plan,
            usable: false,
            base_salt: None,
            salt,
            old: None,
            fallback: None,
            found: false,
        };
        let taken = s.plan.store.take(&s.plan.name);
        s.found = !matches!(taken, Err(Unusable::Missing));
        let why = match taken {
            Ok((h, r)) => {
                if let Some(why) = &s.plan.scrub {
                    Some(why.clone())
                } else if h.source_id != source_id {
                    Some(
                        Unusable::Mismatch(format!("another source ({})", h.source_id)).to_string(),
                    )
                } else if h.block_size != block {
                    Some(
                        Unusable::Mismatch(format!("block size {}", h.block_size.bytes()))
                            .to_string(),
                    )
                } else if h.volume_size != size {
                    Some(
                        Unusable::Mismatch(format!(
                            "a volume of {} bytes (now {size})",
                            h.volume_size
                        ))
                        .to_string(),
                    )
                } else {
                    s.usable = true;
                    s.base_salt = Some(h.salt);
                    s.old = Some(r);
                    return (s, Some((h.generation, h.target_identity)));
                }
            }
            Err(Unusable::Missing) => None,
            Err(e) => Some(e.to_string()),
        };
        s.fallback = why.map(|w| format!("digest map not used: {w}; full scan"));
        (s, None)
    }

    /// The target's answer: its refusal becomes the report's reason, and
    /// the taken map is then of no use. Returns the reader to compare
    /// against when the target runs the map's mode.
    pub fn opened(&mut self, mapped: bool, unvouched: Option<&str>) -> Option<MapReader<File>> {
        let old = self.old.take();
        if mapped {
            return old;
        }
        if std::mem::take(&mut self.usable) {
            self.fallback = Some(format!(
                "digest map not used: {}; full scan",
                unvouched.map_or_else(|| "the target refused it".into(), wire::escape)
            ));
        }
        None
    }

    /// The base's reader, for a comparison that starts before the target
    /// answers ([`super::early`]); [`MapSession::opened`] then returns
    /// none, and still records a refusal.
    pub fn take_reader(&mut self) -> Option<MapReader<File>> {
        self.old.take()
    }

    /// The salt of the session's key and of its new map: the base's when
    /// a map of the base was taken (its digests carry over, and a full
    /// scan the target asks for instead compares the digests the source
    /// already made), else this session's own.
    pub fn salt(&self) -> [u8; SALT_LEN] {
        self.base_salt.unwrap_or(self.salt)
    }

    /// The session key: the block key of [`MapSession::salt`], so that
    /// the digests a full scan compares are its new map's.
    pub fn session_key(&self) -> blockdiff::HashKey {
        self.plan.store.key().block_key(&self.salt())
    }

    /// The writer of the new map, for a session that sees every block.
    pub fn writer(&self, block: BlockSize, size: u64) -> Option<MapWriter> {
        match self
            .plan
            .store
            .writer(&self.plan.name, block, size, &self.salt())
        {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("no digest map this time: {e:#}");
                None
            }
        }
    }

    /// After the target committed: the new map becomes current.
    pub fn commit(&self, writer: Option<MapWriter>, header: Option<MapHeader>) {
        if let (Some(w), Some(h)) = (writer, header) {
            if let Err(e) = w.commit(&h) {
                tracing::warn!("saving the digest map: {e:#}; the next sync does a full scan");
                self.plan.store.remove(&self.plan.name);
                return;
            }
        }
        self.plan.store.release(&self.plan.name);
    }

    /// The session ended before the target heard of it: the taken map
    /// stays current.
    pub fn put_back(&self) {
        if self.usable {
            self.plan.store.put_back(&self.plan.name);
        }
    }

    /// The block signer of the session, of the base's map and of the new
    /// map (see [`MapSession::salt`]).
    pub fn signer(&self) -> blockdiff::Signer {
        self.plan.store.key().signer(&self.salt())
    }
}

/// File name of a map: `KIND-HASH` of what it pairs (`sync`: source path
/// and destination; `run`: volume name and target), fixed length whatever
/// the names. The map's trailer binds the real identities.
pub fn map_name(kind: &str, a: &str, b: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(kind.as_bytes());
    h.update(&[0]);
    h.update(a.as_bytes());
    h.update(&[0]);
    h.update(b.as_bytes());
    let hex: String = h.finalize().as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{kind}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdiff::{decide, Decision, HashKey, Signer};
    use proptest::prelude::*;

    const BS: u32 = 4096;
    const SALT: [u8; SALT_LEN] = [6; SALT_LEN];

    fn header(size: u64) -> MapHeader {
        MapHeader {
            salt: SALT,
            block_size: BlockSize::new(BS as u64).unwrap(),
            volume_size: size,
            generation: Generation {
                number: 7,
                snapshot: "live:1".into(),
            },
            source_id: "id:file:1:2".into(),
            target_identity: "file:3:4".into(),
        }
    }

    /// Writes the map of `data` and returns its bytes.
    fn make(store: &MapStore, data: &[u8]) -> Vec<u8> {
        let h = header(data.len() as u64);
        let mut w = store
            .writer("m", h.block_size, h.volume_size, &SALT)
            .unwrap();
        let signer = store.key().signer(&SALT);
        for b in data.chunks(BS as usize) {
            w.push(&signer.block_digest(b)).unwrap();
        }
        w.commit(&h).unwrap();
        fs::read(store.dir().join("m.map")).unwrap()
    }

    fn store() -> (tempfile::TempDir, MapStore) {
        let d = tempfile::tempdir().unwrap();
        let s = MapStore::open(&d.path().join("state")).unwrap();
        (d, s)
    }

    /// Blocks a full scan against a target holding `old` finds changed.
    fn full_scan_plan(old: &[u8], new: &[u8]) -> Vec<(usize, Decision)> {
        let s = Signer::new(HashKey([5; 32]));
        old.chunks(BS as usize)
            .zip(new.chunks(BS as usize))
            .enumerate()
            .map(|(i, (o, n))| (i, decide(&s, n, Some(&s.block_digest(o))).0))
            .filter(|(_, d)| *d != Decision::Same)
            .collect()
    }

    /// The same, from the map of `old` alone.
    fn map_plan(store: &MapStore, map: &[u8], new: &[u8]) -> Vec<(usize, Decision)> {
        let (_, digests) = decode(map, store.key()).unwrap();
        let s = store.key().signer(&SALT);
        new.chunks(BS as usize)
            .zip(digests)
            .enumerate()
            .map(|(i, (n, d))| (i, decide(&s, n, Some(&d)).0))
            .filter(|(_, d)| *d != Decision::Same)
            .collect()
    }

    fn volume() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (1usize..40, any::<u64>()).prop_flat_map(|(blocks, _)| {
            let len = blocks * BS as usize - 100;
            (
                prop::collection::vec(any::<u8>(), len),
                prop::collection::vec((0..len, any::<u8>(), 0usize..3), 0..12),
            )
                .prop_map(|(old, edits)| {
                    let mut new = old.clone();
                    for (at, byte, kind) in edits {
                        match kind {
                            0 => new[at] = byte,
                            // A zeroed block: the plan says Zero.
                            1 => {
                                let b = at / BS as usize * BS as usize;
                                let e = (b + BS as usize).min(new.len());
                                new[b..e].fill(0);
                            }
                            _ => new[at] = new[at].wrapping_add(1),
                        }
                    }
                    (old, new)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn map_planning_equals_full_scan_planning((old, new) in volume()) {
            let (_d, store) = store();
            let map = make(&store, &old);
            prop_assert_eq!(map_plan(&store, &map, &new), full_scan_plan(&old, &new));
        }

        #[test]
        fn any_damage_is_refused(seed in prop::collection::vec(any::<u8>(), 1..9000), at in any::<usize>(), flip in 1u8..=255, cut in any::<usize>()) {
            let (_d, store) = store();
            let map = make(&store, &seed);
            prop_assert!(decode(&map, store.key()).is_ok());
            let mut bad = map.clone();
            let i = at % bad.len();
            bad[i] ^= flip;
            prop_assert!(decode(&bad, store.key()).is_err(), "flipped byte {}", i);
            let short = &map[..cut % map.len()];
            prop_assert!(decode(short, store.key()).is_err());
        }

        #[test]
        fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, &MapKey([1; 32]));
        }
    }

    #[test]
    fn header_round_trips_and_another_key_is_named() {
        let (_d, store) = store();
        let data = vec![3u8; 5 * BS as usize + 1];
        let map = make(&store, &data);
        let (h, digests) = decode(&map, store.key()).unwrap();
        assert_eq!(h, header(data.len() as u64));
        assert_eq!(digests.len(), 6);
        assert_eq!(decode(&map, &MapKey([9; 32])), Err(Unusable::KeyChanged));
        // A map is bound to its key: the same bytes under another key's id
        // fail the checksum.
        let mut forged = map.clone();
        forged[24..40].copy_from_slice(&MapKey([9; 32]).id());
        assert_eq!(
            decode(&forged, &MapKey([9; 32])),
            Err(Unusable::Corrupt("checksum mismatch".into()))
        );
    }

    /// A map of the format before (digests under the map key itself) is
    /// named as such, for the report's fallback: one full scan renews it.
    #[test]
    fn a_map_of_an_older_format_is_named() {
        let (_d, store) = store();
        let mut map = make(&store, &[4u8; 3 * BS as usize]);
        map[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = decode(&map, store.key()).unwrap_err();
        assert_eq!(e, Unusable::OldFormat(1));
        assert_eq!(
            e.to_string(),
            "the digest map is of format 1, made by an older snapsync"
        );
        map[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            decode(&map, store.key()),
            Err(Unusable::Corrupt(_))
        ));
    }

    /// The salt selects the digests' key: the same key with another salt
    /// keys them differently.
    #[test]
    fn the_salt_is_kept_and_keys_the_digests() {
        let (_d, store) = store();
        let data = vec![9u8; 2 * BS as usize];
        let (h, digests) = decode(&make(&store, &data), store.key()).unwrap();
        assert_eq!(h.salt, SALT);
        let other = store.key().signer(&[7; SALT_LEN]);
        assert_ne!(digests[0], other.block_digest(&data[..BS as usize]));
        assert_eq!(
            digests[0],
            store.key().signer(&SALT).block_digest(&data[..BS as usize])
        );
    }

    #[test]
    fn take_moves_the_map_aside_until_commit() {
        let (_d, store) = store();
        let data = vec![1u8; 3 * BS as usize];
        make(&store, &data);
        let (h, _) = store.take("m").unwrap();
        assert_eq!(h.generation.number, 7);
        assert!(!store.dir().join("m.map").exists());
        // A session that never commits leaves no map: the next one knows.
        assert_eq!(store.take("m").unwrap_err(), Unusable::Interrupted);
        assert_eq!(store.take("m").unwrap_err(), Unusable::Missing);
        // An uncommitted writer leaves only its temporary file.
        let w = store
            .writer("m", h.block_size, h.volume_size, &SALT)
            .unwrap();
        drop(w);
        assert_eq!(store.take("m").unwrap_err(), Unusable::Missing);
        assert_eq!(store.names(), vec!["m".to_string()]);
        store.remove("m");
        assert!(store.names().is_empty());
    }

    #[test]
    fn sessions_making_the_key_at_once_share_one() {
        // The sessions of a fan-out open a new store together.
        for _ in 0..20 {
            let d = tempfile::tempdir().unwrap();
            let dir = d.path().join("s");
            let ids: Vec<_> = std::thread::scope(|s| {
                let t: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| MapStore::open(&dir).map(|m| m.key().id())))
                    .collect();
                t.into_iter().map(|t| t.join().unwrap().unwrap()).collect()
            });
            assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
        }
    }

    #[test]
    fn files_are_private_and_the_key_is_kept() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let a = MapStore::open(&d.path().join("s")).unwrap();
        let b = MapStore::open(&d.path().join("s")).unwrap();
        assert_eq!(a.key().id(), b.key().id());
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(a.dir()), 0o700);
        assert_eq!(mode(&a.dir().join(KEY_FILE)), 0o600);
        make(&a, &[1; 100]);
        assert_eq!(mode(&a.dir().join("m.map")), 0o600);
        // A symlink planted as the map is never followed.
        let outside = d.path().join("outside");
        fs::write(&outside, b"x").unwrap();
        fs::remove_file(a.dir().join("m.map")).unwrap();
        std::os::unix::fs::symlink(&outside, a.dir().join("m.map")).unwrap();
        assert!(matches!(a.take("m"), Err(Unusable::Io(_))));
        std::os::unix::fs::symlink(&outside, a.dir().join("m.tmp")).unwrap();
        make(&a, &[1; 100]);
        assert_eq!(fs::read(&outside).unwrap(), b"x");
    }
}
