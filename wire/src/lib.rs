//! The snapsync protocol: handshake, framed messages and compression.
//!
//! # Model
//!
//! One connection carries one session between a *source* (the side that
//! reads the volume to copy, and drives) and a *target* (`snapsync serve`,
//! which owns the replica). The byte stream is:
//!
//! ```text
//! preamble: MAGIC (8 bytes) + protocol version (u32 LE)      both ways
//! frames:   len: u32 LE | kind: u8 | header_len: u32 LE | header | payload
//! ```
//!
//! `len` counts everything after itself and is checked against
//! [`MAX_FRAME`] *before* anything is allocated; `header` is the postcard
//! encoding of the message named by `kind`; `payload` is raw bytes (block
//! data, digests). [`FrameReader::read`] is the only decoder of outside
//! input, bounded and fuzzable through [`decode_frame`].
//!
//! # Order of a session
//!
//! 1. source → `Hello` (features, per-session hash key, the target's send
//!    rate limit); target → `HelloAck`.
//! 2. source → `Open` (path, sizes, block size, source identity, mode);
//!    target → `Opened` (its size and replica state) or `Error`.
//! 3. In [`Mode::FullScan`] and [`Mode::Verify`] the target streams
//!    `BlockHashes` of its volume, at most a credit window ahead of the
//!    source's `Credit`, and `Holes` for runs of blocks that read as zeros
//!    (no digest needed: a hole meets a hole for free, source data meets
//!    a target hole without a refinement); the source answers differing blocks with `Refine`
//!    and gets `SubHashes`. Data, zero and copy ops flow source → target in
//!    volume order. In [`Mode::Delta`] the target reads nothing and only
//!    receives ops.
//! 4. source → `Finish`; target commits and answers `Committed`.
//!
//! Either side may send `Heartbeat` at any time: its counters only grow,
//! and the receiver counts it as progress only when one of them advanced
//! (a side busy without sending data still shows it is working).
//!
//! Either side may send `Error` at any time and then close; an unexpected
//! end of stream is [`WireError::Closed`].

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};

use blockdiff::{BlockSize, Digest, HashKey, DIGEST_LEN};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// First bytes each side sends.
pub const MAGIC: [u8; 8] = *b"SNAPSYNC";
/// Bumped on any incompatible change of frames or their meaning.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest header accepted (a batch of digests travels as payload).
pub const MAX_HEADER: usize = 64 * 1024;
/// Largest payload: a whole maximal block plus compression slack.
pub const MAX_PAYLOAD: usize = blockdiff::MAX_BLOCK as usize + 64 * 1024;
/// Largest frame after its length field.
pub const MAX_FRAME: usize = 1 + 4 + MAX_HEADER + MAX_PAYLOAD;
/// Most digests in one `BlockHashes` or `SubHashes` payload.
pub const MAX_DIGESTS: usize = MAX_PAYLOAD / DIGEST_LEN;

/// Feature bits negotiated in the handshake.
pub mod features {
    /// Data payloads may be zstd-compressed.
    pub const ZSTD: u32 = 1 << 0;
    /// Everything this build understands.
    pub const ALL: u32 = ZSTD;
}

/// Errors of the wire layer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the other side")]
    Closed,
    #[error("transport I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("the other side is not snapsync (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("protocol version mismatch: we speak {ours}, the other side {theirs}; install the same snapsync version on both hosts")]
    Version { ours: u32, theirs: u32 },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unexpected {got:?} frame while waiting for {want}")]
    Unexpected { got: Kind, want: &'static str },
    #[error("the other side reported: {}", escape(&.0.message))]
    Remote(RemoteError),
    #[error("protocol violation by the other side: {0}")]
    Protocol(String),
}

/// An error carried across the wire in an `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

/// Classes of failure, so the source can pick the documented exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Bad request: option or argument the target cannot honour.
    Usage,
    /// The target path is not on the `--allow` list.
    NotAllowed,
    /// Reading or writing the target volume failed.
    TargetIo,
    /// The target is too small and cannot grow.
    TooSmall,
    /// Another run holds the volume's lock.
    Busy,
    /// The replica belongs to another source volume.
    Mismatch,
    /// The peer violated the protocol.
    Protocol,
    /// The serving side was interrupted.
    Interrupted,
    /// Anything else.
    Internal,
}

/// Frame kinds, numbered: the numbers are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Open = 3,
    Opened = 4,
    BlockHashes = 5,
    Credit = 6,
    Refine = 7,
    SubHashes = 8,
    Data = 9,
    Zero = 10,
    Copy = 11,
    Finish = 12,
    Committed = 13,
    Error = 14,
    Heartbeat = 15,
    Holes = 16,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Open,
            4 => Opened,
            5 => BlockHashes,
            6 => Credit,
            7 => Refine,
            8 => SubHashes,
            9 => Data,
            10 => Zero,
            11 => Copy,
            12 => Finish,
            13 => Committed,
            14 => Error,
            15 => Heartbeat,
            16 => Holes,
            _ => return None,
        })
    }
}

/// How the target should treat the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Target streams its signatures; source sends what differs.
    FullScan,
    /// Source already knows what changed (thin changed-block tracking);
    /// valid only if the target holds `Open::base`.
    Delta,
    /// Compare only; the target writes nothing.
    Verify,
    /// The source compares against its digest map of `Open::base`; the
    /// target streams no digests and answers `Refine` only for the blocks
    /// the source asks about (protocol 3). Valid only if the target holds
    /// the base and vouches that nothing wrote the replica since.
    Mapped,
}

/// Identity of a generation: which source volume, which snapshot of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Counter, 1 for the first complete copy.
    pub number: u64,
    /// Identifier of the source snapshot the replica equals.
    pub snapshot: String,
}

/// source → target: handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub features: u32,
    pub key: HashKey,
    /// The source's program version, for messages.
    pub software: String,
    /// Bytes per second the target may send (`--bwlimit`); `None`: no limit.
    pub bwlimit: Option<u64>,
}

/// target → source: handshake answer with the features both understand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub features: u32,
    pub software: String,
}

/// source → target: which volume, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub path: String,
    pub source_size: u64,
    pub block_size: BlockSize,
    /// Stable identity of the source volume (e.g. VG/LV uuid or path).
    pub source_id: String,
    pub mode: Mode,
    /// The generation the source diffs against in [`Mode::Delta`].
    pub base: Option<Generation>,
    /// The generation this session produces.
    pub target_generation: Generation,
    /// Compare and report, write nothing.
    pub dry_run: bool,
    /// Accept a replica of another source volume.
    pub force: bool,
    /// Deltas up to this many bytes go through the write-ahead journal.
    pub journal_max: u64,
    /// Resume an interrupted in-place copy of the same snapshot, if any.
    pub resume: bool,
    /// A thin-LV target snapshots itself as the rollback point and applies
    /// in place, instead of journaling (no double write).
    pub target_snapshot: bool,
    /// How many bytes of the source may hold data (a sparse file's
    /// allocated extents, a thin LV's mapped space); `None`: not known. A
    /// file target checks its free space against it before writing in
    /// place (protocol 3).
    pub source_data_bytes: Option<u64>,
    /// [`Mode::Mapped`]: the target identity the source's digest map was
    /// made against; the target runs the mode only if it is its own
    /// (protocol 3).
    pub map_target: Option<String>,
}

/// What the target knows about its replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub source_id: Option<String>,
    /// Last complete generation, if the replica is consistent.
    pub generation: Option<Generation>,
    pub consistent: bool,
    /// An interrupted in-place copy: toward which generation, and the
    /// block below which everything is already applied.
    pub resume: Option<(Generation, u64)>,
    /// What opening the volume found and did (journal replayed, ...).
    pub recovered: Option<String>,
}

/// target → source: the volume is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// Target size before this session (it grows to the source size).
    pub target_size: u64,
    pub state: ReplicaState,
    /// First block the session covers: 0, or the resume mark.
    pub start_block: u64,
    /// The target scans at most this many blocks ahead of the last credit.
    pub window_blocks: u64,
    /// The mode the target runs: a requested [`Mode::Delta`] becomes
    /// [`Mode::FullScan`] when the target does not hold the base.
    pub mode: Mode,
    /// The target is a file: its size follows the source's (a block
    /// device keeps a longer tail).
    pub resizable: bool,
    /// The identity of the volume opened (`kind:key`), which its state
    /// belongs to (protocol 2).
    pub target_identity: String,
    /// Whether that identity is strong (unique and persistent); a weak
    /// one never gets a delta.
    pub target_strong: bool,
    /// Why a requested [`Mode::Mapped`] became a full scan: the target
    /// does not hold the base, or cannot vouch that nothing wrote the
    /// replica since (protocol 3).
    pub unvouched: Option<String>,
}

/// target → source: digests of blocks `first..first+n`, n digests in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHashes {
    pub first: u64,
}

/// source → target: every op for blocks below `through` has been sent,
/// and the target may scan on to `through + window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub through: u64,
}

/// target → source, in place of `BlockHashes`: blocks `first..first+count`
/// read as zeros on the target (a hole, past its old end, or zeros found
/// while reading), so they cost no digests (protocol 3). Like digests they
/// come in block order, within the credit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holes {
    pub first: u64,
    pub count: u64,
}

/// source → target: send sub-block digests of `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refine {
    pub block: u64,
}

/// target → source: sub-digests of `block` in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubHashes {
    pub block: u64,
}

/// Payload encodings of data frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    Raw,
    Zstd,
}

/// source → target: write `len` bytes at `offset`; the payload holds them,
/// encoded by `codec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data {
    pub offset: u64,
    pub len: u32,
    pub codec: Codec,
}

/// source → target: zero `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zero {
    pub offset: u64,
    pub len: u64,
}

/// source → target: copy `len` bytes within the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copy {
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

/// source → target: all ops sent; commit the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finish {
    /// Blocks the source compared in this session (consistency check).
    pub blocks: u64,
}

/// target → source: the session's outcome as the target saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub target_bytes_read: u64,
    pub target_bytes_written: u64,
    pub journal_bytes: u64,
    /// "journal", "in-place", "resumed", "dry-run", "verify".
    pub apply_mode: String,
    pub state: ReplicaState,
}

/// Either way: the sender's progress counters, each monotonically
/// increasing over a session. A receiver resets its progress clock only
/// when one of them advanced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Blocks compared (source) or hashed (target).
    pub blocks: u64,
    /// Bytes received from the peer.
    pub received: u64,
    /// Bytes written to the journal.
    pub journal: u64,
    /// Bytes written to the volume (target) or read from it (source).
    pub applied: u64,
}

impl Heartbeat {
    /// True when any counter of `self` is past the one in `prev`.
    pub fn advances(&self, prev: &Heartbeat) -> bool {
        self.blocks > prev.blocks
            || self.received > prev.received
            || self.journal > prev.journal
            || self.applied > prev.applied
    }

    /// The counter-wise maximum of both.
    pub fn max(&self, other: &Heartbeat) -> Heartbeat {
        Heartbeat {
            blocks: self.blocks.max(other.blocks),
            received: self.received.max(other.received),
            journal: self.journal.max(other.journal),
            applied: self.applied.max(other.applied),
        }
    }
}

/// A decoded frame. Payload-carrying kinds borrow nothing: the payload is
/// returned alongside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    HelloAck(HelloAck),
    Open(Open),
    Opened(Opened),
    BlockHashes(BlockHashes),
    Credit(Credit),
    Refine(Refine),
    SubHashes(SubHashes),
    Data(Data),
    Zero(Zero),
    Copy(Copy),
    Finish(Finish),
    Committed(Committed),
    Error(RemoteError),
    Heartbeat(Heartbeat),
    Holes(Holes),
}

impl Msg {
    pub fn kind(&self) -> Kind {
        match self {
            Msg::Hello(_) => Kind::Hello,
            Msg::HelloAck(_) => Kind::HelloAck,
            Msg::Open(_) => Kind::Open,
            Msg::Opened(_) => Kind::Opened,
            Msg::BlockHashes(_) => Kind::BlockHashes,
            Msg::Credit(_) => Kind::Credit,
            Msg::Refine(_) => Kind::Refine,
            Msg::SubHashes(_) => Kind::SubHashes,
            Msg::Data(_) => Kind::Data,
            Msg::Zero(_) => Kind::Zero,
            Msg::Copy(_) => Kind::Copy,
            Msg::Finish(_) => Kind::Finish,
            Msg::Committed(_) => Kind::Committed,
            Msg::Error(_) => Kind::Error,
            Msg::Heartbeat(_) => Kind::Heartbeat,
            Msg::Holes(_) => Kind::Holes,
        }
    }

    fn encode_header(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        fn enc<T: Serialize>(v: &T, out: &mut Vec<u8>) -> Result<(), WireError> {
            let bytes = postcard::to_stdvec(v).map_err(|e| WireError::Malformed(e.to_string()))?;
            out.extend_from_slice(&bytes);
            Ok(())
        }
        match self {
            Msg::Hello(m) => enc(m, out),
            Msg::HelloAck(m) => enc(m, out),
            Msg::Open(m) => enc(m, out),
            Msg::Opened(m) => enc(m, out),
            Msg::BlockHashes(m) => enc(m, out),
            Msg::Credit(m) => enc(m, out),
            Msg::Refine(m) => enc(m, out),
            Msg::SubHashes(m) => enc(m, out),
            Msg::Data(m) => enc(m, out),
            Msg::Zero(m) => enc(m, out),
            Msg::Copy(m) => enc(m, out),
            Msg::Finish(m) => enc(m, out),
            Msg::Committed(m) => enc(m, out),
            Msg::Error(m) => enc(m, out),
            Msg::Heartbeat(m) => enc(m, out),
            Msg::Holes(m) => enc(m, out),
        }
    }

    fn decode(kind: Kind, header: &[u8]) -> Result<Msg, WireError> {
        fn dec<T: DeserializeOwned>(h: &[u8]) -> Result<T, WireError> {
            let (v, rest) =
                postcard::take_from_bytes(h).map_err(|e| WireError::Malformed(e.to_string()))?;
            if !rest.is_empty() {
                return Err(WireError::Malformed(format!(
                    "{} trailing header bytes",
                    rest.len()
                )));
            }
            Ok(v)
        }
        Ok(match kind {
            Kind::Hello => Msg::Hello(dec(header)?),
            Kind::HelloAck => Msg::HelloAck(dec(header)?),
            Kind::Open => Msg::Open(dec(header)?),
            Kind::Opened => Msg::Opened(dec(header)?),
            Kind::BlockHashes => Msg::BlockHashes(dec(header)?),
            Kind::Credit => Msg::Credit(dec(header)?),
            Kind::Refine => Msg::Refine(dec(header)?),
            Kind::SubHashes => Msg::SubHashes(dec(header)?),
            Kind::Data => Msg::Data(dec(header)?),
            Kind::Zero => Msg::Zero(dec(header)?),
            Kind::Copy => Msg::Copy(dec(header)?),
            Kind::Finish => Msg::Finish(dec(header)?),
            Kind::Committed => Msg::Committed(dec(header)?),
            Kind::Error => Msg::Error(dec(header)?),
            Kind::Heartbeat => Msg::Heartbeat(dec(header)?),
            Kind::Holes => Msg::Holes(dec(header)?),
        })
    }
}

/// Encodes one frame into `out` (appending).
pub fn encode_frame(msg: &Msg, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(msg.kind() as u8);
    out.extend_from_slice(&[0; 4]);
    let h_start = out.len();
    msg.encode_header(out)?;
    let h_len = out.len() - h_start;
    if h_len > MAX_HEADER || payload.len() > MAX_PAYLOAD {
        out.truncate(start);
        return Err(WireError::TooLarge {
            len: h_len + payload.len(),
            max: MAX_FRAME,
        });
    }
    out.extend_from_slice(payload);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 5..start + 9].copy_from_slice(&(h_len as u32).to_le_bytes());
    Ok(())
}

/// Decodes one frame body (everything after the length field). The
/// payload is the returned range of `body`.
pub fn decode_frame(body: &[u8]) -> Result<(Msg, std::ops::Range<usize>), WireError> {
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    if body.len() < 5 {
        return Err(WireError::Malformed(format!(
            "frame of {} bytes is too short",
            body.len()
        )));
    }
    let kind = Kind::from_u8(body[0])
        .ok_or_else(|| WireError::Malformed(format!("unknown frame kind {}", body[0])))?;
    let h_len = u32::from_le_bytes(body[1..5].try_into().expect("4 bytes")) as usize;
    if h_len > MAX_HEADER || h_len > body.len() - 5 {
        return Err(WireError::Malformed(format!(
            "header length {h_len} does not fit the frame"
        )));
    }
    let msg = Msg::decode(kind, &body[5..5 + h_len])?;
    let payload = 5 + h_len..body.len();
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::TooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    let allows_payload = matches!(kind, Kind::BlockHashes | Kind::SubHashes | Kind::Data);
    if !allows_payload && !payload.is_empty() {
        return Err(WireError::Malformed(format!(
            "{kind:?} frame carries an unexpected payload"
        )));
    }
    Ok((msg, payload))
}

/// Writes the preamble.
pub fn write_preamble(w: &mut impl Write) -> Result<(), WireError> {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    w.write_all(&p)?;
    w.flush()?;
    Ok(())
}

/// Reads and checks the peer's preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<(), WireError> {
    let mut p = [0u8; 12];
    read_exact_or_closed(r, &mut p)?;
    let magic: [u8; 8] = p[..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let theirs = u32::from_le_bytes(p[8..].try_into().expect("4 bytes"));
    if theirs != PROTOCOL_VERSION {
        return Err(WireError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

fn read_exact_or_closed(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => WireError::Closed,
        _ => WireError::Io(e),
    })
}

/// Reads frames from a byte stream, reusing one buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far, preamble and frame headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn read_preamble(&mut self) -> Result<(), WireError> {
        read_preamble(&mut self.inner)?;
        self.bytes += 12;
        Ok(())
    }

    /// Reads the next frame. An `Error` frame from the peer is returned as
    /// [`WireError::Remote`].
    pub fn read(&mut self) -> Result<(Msg, &[u8]), WireError> {
        let mut len = [0u8; 4];
        read_exact_or_closed(&mut self.inner, &mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        self.buf.resize(len, 0);
        read_exact_or_closed(&mut self.inner, &mut self.buf)?;
        self.bytes += 4 + len as u64;
        let (msg, payload) = decode_frame(&self.buf)?;
        if let Msg::Error(e) = msg {
            return Err(WireError::Remote(e));
        }
        Ok((msg, &self.buf[payload]))
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes frames to a byte stream, counting bytes.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: io::BufWriter<W>,
    scratch: Vec<u8>,
    bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner: io::BufWriter::with_capacity(256 * 1024, inner),
            scratch: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes written so far, preamble and frame headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn write_preamble(&mut self) -> Result<(), WireError> {
        write_preamble(&mut self.inner)?;
        self.bytes += 12;
        Ok(())
    }

    /// Queues a frame; call [`FrameWriter::flush`] when the peer must see it.
    pub fn send(&mut self, msg: &Msg, payload: &[u8]) -> Result<(), WireError> {
        self.scratch.clear();
        encode_frame(msg, &[], &mut self.scratch)?;
        // Patch the length to include the payload, written separately to
        // avoid copying block data into the scratch buffer.
        let total = self.scratch.len() - 4 + payload.len();
        if payload.len() > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        self.scratch[..4].copy_from_slice(&(total as u32).to_le_bytes());
        self.inner
            .write_all(&self.scratch)
            .map_err(closed_on_pipe)?;
        self.inner.write_all(payload).map_err(closed_on_pipe)?;
        self.bytes += (self.scratch.len() + payload.len()) as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().map_err(closed_on_pipe)
    }
}

fn closed_on_pipe(e: io::Error) -> WireError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => WireError::Closed,
        _ => WireError::Io(e),
    }
}

/// Peer-supplied text made safe for a terminal or a log: control
/// characters (ANSI escapes, newlines, ...) are shown escaped, and the text
/// is cut at 1000 characters.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(1024));
    for (i, c) in s.chars().enumerate() {
        if i == 1000 {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Packs digests into a payload.
pub fn digests_to_payload(digests: &[Digest], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(digests.len() * DIGEST_LEN);
    for d in digests {
        out.extend_from_slice(d);
    }
}

/// Unpacks a digest payload, refusing a length that is not a multiple of
/// the digest size.
pub fn payload_to_digests(payload: &[u8], out: &mut Vec<Digest>) -> Result<(), WireError> {
    if !payload.len().is_multiple_of(DIGEST_LEN) {
        return Err(WireError::Malformed(format!(
            "digest payload of {} bytes",
            payload.len()
        )));
    }
    out.clear();
    out.extend(
        payload
            .chunks_exact(DIGEST_LEN)
            .map(|c| <Digest>::try_from(c).expect("16 bytes")),
    );
    Ok(())
}

/// Compresses `data` with zstd at `level` into `out`. Returns false (and
/// leaves `out` unspecified) when compression would not save at least 1/16
/// of the bytes, so incompressible data travels raw and never grows.
pub fn compress(data: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
    out.resize(zstd::zstd_safe::compress_bound(data.len()), 0);
    match zstd::bulk::compress_to_buffer(data, &mut out[..], level) {
        Ok(n) => {
            out.truncate(n);
            n < data.len() - data.len() / 16
        }
        Err(_) => false,
    }
}

/// Payloads at least this long are probed before being compressed.
const PROBE_MIN: usize = 16 * 1024;
/// Bytes of each of the [`PROBE_SLICES`] slices a probe compresses.
const PROBE_SLICE: usize = 1024;
const PROBE_SLICES: usize = 4;

/// A zstd compressor for data frames that keeps its context between
/// frames (a fresh context per 64 KiB frame cost a fifth of the
/// compression time in table setup) and does not try to compress what
/// will not compress: before a large payload it compresses four 1 KiB
/// slices spread over it at zstd's fastest level, and sends the payload
/// raw when they do not shrink by 1/16. Random or already compressed data
/// then costs 1/16 of a compression instead of a whole one that fails;
/// a payload with any sizeable compressible part still gets compressed.
pub struct Compressor {
    ctx: zstd::bulk::Compressor<'static>,
    probe_ctx: zstd::bulk::Compressor<'static>,
    sample: Vec<u8>,
    probe_out: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    pub fn new(level: i32) -> Result<Self, WireError> {
        Ok(Self {
            ctx: zstd::bulk::Compressor::new(level)?,
            probe_ctx: zstd::bulk::Compressor::new(1)?,
            sample: Vec::with_capacity(PROBE_SLICE * PROBE_SLICES),
            probe_out: Vec::new(),
        })
    }

    /// Like [`compress`]: true when `out` holds a zstd frame of `data` at
    /// least 1/16 smaller, false when `data` should travel raw.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        if data.len() >= PROBE_MIN && !self.looks_compressible(data) {
            return false;
        }
        out.resize(zstd::zstd_safe::compress_bound(data.len()), 0);
        match self.ctx.compress_to_buffer(data, &mut out[..]) {
            Ok(n) => {
                out.truncate(n);
                n < data.len() - data.len() / 16
            }
            Err(_) => false,
        }
    }

    /// Compresses evenly spread slices of `data`: does a sample shrink?
    fn looks_compressible(&mut self, data: &[u8]) -> bool {
        self.sample.clear();
        let stride = data.len() / PROBE_SLICES;
        for i in 0..PROBE_SLICES {
            let at = i * stride + (stride - PROBE_SLICE) / 2;
            self.sample.extend_from_slice(&data[at..at + PROBE_SLICE]);
        }
        self.probe_out
            .resize(zstd::zstd_safe::compress_bound(self.sample.len()), 0);
        match self
            .probe_ctx
            .compress_to_buffer(&self.sample[..], &mut self.probe_out[..])
        {
            Ok(n) => n < self.sample.len() - self.sample.len() / 16,
            Err(_) => true,
        }
    }
}

/// Decompresses data frames with one context for the whole session.
pub struct Decompressor(zstd::bulk::Decompressor<'static>);

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    pub fn new() -> Result<Self, WireError> {
        Ok(Self(zstd::bulk::Decompressor::new()?))
    }

    /// Decompresses a zstd payload that must expand to exactly `len` bytes
    /// (`len` is bounded by the caller to the block size).
    pub fn decompress(
        &mut self,
        payload: &[u8],
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        out.resize(len, 0);
        let n = self
            .0
            .decompress_to_buffer(payload, &mut out[..])
            .map_err(|e| WireError::Malformed(format!("zstd payload: {e}")))?;
        if n != len {
            return Err(WireError::Malformed(format!(
                "zstd payload expanded to {n} bytes, expected {len}"
            )));
        }
        Ok(())
    }
}

/// Decompresses a zstd payload that must expand to exactly `len` bytes
/// (`len` is bounded by the caller to the block size).
pub fn decompress(payload: &[u8], len: usize, out: &mut Vec<u8>) -> Result<(), WireError> {
    Decompressor::new()?.decompress(payload, len, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(msg: Msg, payload: &[u8]) {
        let mut buf = Vec::new();
        encode_frame(&msg, payload, &mut buf).unwrap();
        let (got, range) = decode_frame(&buf[4..]).unwrap();
        assert_eq!(got, msg);
        assert_eq!(&buf[4..][range], payload);
        // The streaming writer and reader agree with the one-shot codec.
        let mut w = FrameWriter::new(Vec::new());
        w.send(&msg, payload).unwrap();
        w.flush().unwrap();
        let bytes = w.inner.into_inner().unwrap();
        assert_eq!(bytes, buf);
        let mut r = FrameReader::new(&bytes[..]);
        match r.read() {
            Ok((m, p)) => {
                assert_eq!(m, msg);
                assert_eq!(p, payload);
            }
            Err(WireError::Remote(e)) => assert_eq!(Msg::Error(e), msg),
            Err(e) => panic!("{e}"),
        }
    }

    fn gen() -> Generation {
        Generation {
            number: 3,
            snapshot: "vg0/data-snapsync-3".into(),
        }
    }

    fn all_messages() -> Vec<(Msg, Vec<u8>)> {
        vec![
            (
                Msg::Hello(Hello {
                    features: 1,
                    key: HashKey([9; 32]),
                    software: "0.1".into(),
                    bwlimit: Some(1 << 20),
                }),
                vec![],
            ),
            (
                Msg::HelloAck(HelloAck {
                    features: 1,
                    software: "0.1".into(),
                }),
                vec![],
            ),
            (
                Msg::Open(Open {
                    path: "/dev/x".into(),
                    source_size: 1 << 40,
                    block_size: BlockSize::default(),
                    source_id: "id".into(),
                    mode: Mode::Delta,
                    base: Some(gen()),
                    target_generation: gen(),
                    dry_run: false,
                    force: true,
                    journal_max: 77,
                    resume: true,
                    target_snapshot: true,
                    source_data_bytes: Some(1 << 20),
                    map_target: Some("file:1:2".into()),
                }),
                vec![],
            ),
            (
                Msg::Opened(Opened {
                    target_size: 5,
                    state: ReplicaState {
                        source_id: Some("x".into()),
                        generation: Some(gen()),
                        consistent: true,
                        resume: Some((gen(), 4)),
                        recovered: None,
                    },
                    start_block: 4,
                    window_blocks: 1024,
                    mode: Mode::FullScan,
                    resizable: true,
                    target_identity: "file:1:2".into(),
                    target_strong: true,
                    unvouched: Some("changed".into()),
                }),
                vec![],
            ),
            (Msg::BlockHashes(BlockHashes { first: 12 }), vec![1; 32]),
            (Msg::Credit(Credit { through: u64::MAX }), vec![]),
            (
                Msg::Holes(Holes {
                    first: 7,
                    count: u64::MAX,
                }),
                vec![],
            ),
            (Msg::Refine(Refine { block: 3 }), vec![]),
            (Msg::SubHashes(SubHashes { block: 3 }), vec![2; 256]),
            (
                Msg::Data(Data {
                    offset: 4096,
                    len: 3,
                    codec: Codec::Raw,
                }),
                vec![1, 2, 3],
            ),
            (
                Msg::Zero(Zero {
                    offset: 0,
                    len: 1 << 50,
                }),
                vec![],
            ),
            (
                Msg::Copy(Copy {
                    from: 1,
                    to: 2,
                    len: 3,
                }),
                vec![],
            ),
            (Msg::Finish(Finish { blocks: 9 }), vec![]),
            (
                Msg::Committed(Committed {
                    target_bytes_read: 1,
                    apply_mode: "journal".into(),
                    ..Default::default()
                }),
                vec![],
            ),
            (
                Msg::Error(RemoteError {
                    code: ErrorCode::NotAllowed,
                    message: "no".into(),
                }),
                vec![],
            ),
            (
                Msg::Heartbeat(Heartbeat {
                    blocks: 1,
                    received: 2,
                    journal: 3,
                    applied: u64::MAX,
                }),
                vec![],
            ),
        ]
    }

    #[test]
    fn escape_shows_control_characters() {
        assert_eq!(escape("a\x1b[31mb\n"), "a\\u{1b}[31mb\\n");
        assert_eq!(escape("plain é"), "plain é");
        assert_eq!(escape(&"x".repeat(2000)).len(), 1003);
    }

    #[test]
    fn every_kind_round_trips() {
        for (m, p) in all_messages() {
            round_trip(m, &p);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let bytes = (u32::MAX).to_le_bytes();
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(r.read(), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn truncated_stream_is_closed() {
        let mut buf = Vec::new();
        encode_frame(&Msg::Credit(Credit { through: 1 }), &[], &mut buf).unwrap();
        buf.pop();
        let mut r = FrameReader::new(&buf[..]);
        assert!(matches!(r.read(), Err(WireError::Closed)));
    }

    #[test]
    fn bad_magic_and_version() {
        assert!(matches!(
            read_preamble(&mut &b"SSH-2.0-OpenSSH"[..]),
            Err(WireError::BadMagic(_))
        ));
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            read_preamble(&mut &p[..]),
            Err(WireError::Version { theirs: 99, .. })
        ));
    }

    #[test]
    fn payload_on_a_control_frame_is_malformed() {
        let mut buf = Vec::new();
        encode_frame(&Msg::Credit(Credit { through: 1 }), &[1], &mut buf).unwrap();
        assert!(matches!(
            decode_frame(&buf[4..]),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn the_reusable_compressor_probes_and_round_trips() {
        let mut c = Compressor::new(3).unwrap();
        let mut d = Decompressor::new().unwrap();
        let mut out = Vec::new();
        let mut back = Vec::new();
        // Pseudo-random bytes: the probe says raw.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!c.compress(&random, &mut out));
        // Text, and a block half random, half text: compressed, exactly
        // restored, over and over with the same contexts.
        let text: Vec<u8> = b"a line of log text, id 42, status ok\n"
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        let mut half = random[..32768].to_vec();
        half.extend_from_slice(&text[..32768]);
        for _ in 0..3 {
            for data in [&text, &half] {
                assert!(c.compress(data, &mut out));
                assert!(out.len() < data.len() - data.len() / 16);
                d.decompress(&out, data.len(), &mut back).unwrap();
                assert_eq!(&back, data);
            }
            // Small payloads are not probed: a short random one stays raw
            // because zstd finds nothing, not because of a sample.
            assert!(!c.compress(&random[..4096], &mut out));
            assert!(c.compress(&text[..4096], &mut out));
        }
        // A wrong length is an error, as with the one-shot function.
        assert!(c.compress(&text, &mut out));
        assert!(d.decompress(&out, 65535, &mut back).is_err());
    }

    #[test]
    fn incompressible_data_stays_raw() {
        let mut x: u64 = 88172645463325252;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = Vec::new();
        assert!(!compress(&data, 3, &mut out));
        assert!(compress(&[7u8; 65536], 3, &mut out));
        let mut back = Vec::new();
        decompress(&out, 65536, &mut back).unwrap();
        assert_eq!(back, vec![7u8; 65536]);
        assert!(decompress(&out, 100, &mut back).is_err());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_frame(&body);
        }

        #[test]
        fn data_frames_round_trip(offset in any::<u64>(), payload in prop::collection::vec(any::<u8>(), 0..5000)) {
            round_trip(Msg::Data(Data { offset, len: payload.len() as u32, codec: Codec::Raw }), &payload);
        }

        #[test]
        fn digest_payloads_round_trip(ds in prop::collection::vec(any::<[u8; 16]>(), 0..100)) {
            let mut p = Vec::new();
            digests_to_payload(&ds, &mut p);
            let mut back = Vec::new();
            payload_to_digests(&p, &mut back).unwrap();
            prop_assert_eq!(back, ds);
        }
    }
}
