//! Streaming parser for the XML that `thin_delta` prints.
//!
//! `thin_delta -m --snap1 A --snap2 B <tmeta>` (thin-provisioning-tools
//! 0.9.0) compares the block mappings of two thin devices of one pool and
//! prints, in ascending order of virtual block:
//!
//! ```text
//! <superblock uuid="" time="3" transaction="4" data_block_size="128" nr_data_blocks="0">
//!   <diff left="2" right="3">
//!     <same begin="0" length="2"/>
//!     <different begin="2" length="1"/>
//!     <left_only begin="5" length="1"/>
//!     <right_only begin="16" length="16"/>
//!   </diff>
//! </superblock>
//! ```
//!
//! Blocks are pool data blocks of `data_block_size` 512-byte sectors.
//! Blocks mapped in neither device are not mentioned. With `--verbose` the
//! ranges are grouped instead (`<same><range begin= data_begin=
//! length=/></same>`); both forms are accepted and yield the same
//! [`DeltaRange`]s. (`-m` selects the reserved metadata snapshot; it does
//! not change the format.)
//!
//! [`DeltaParser`] reads from any [`BufRead`] one element at a time, so
//! memory stays bounded (by [`MAX_ELEMENT_BYTES`] plus the reader's
//! buffer) however many ranges there are. Output that is malformed,
//! out of order or cut short is an error, never a panic and never a
//! silently shorter list: the list drives which blocks get replicated.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, Read};
use std::ops::Range;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Longest single XML event (tag or text) accepted, in bytes. Real
/// elements are under 200 bytes; the limit keeps a hostile or broken
/// producer from making the reader buffer grow without end.
pub const MAX_ELEMENT_BYTES: usize = 64 << 10;

/// Size of a sector, the unit of `data_block_size`.
pub const SECTOR_BYTES: u64 = 512;

/// dm-thin data blocks are 64 KiB to 1 GiB (kernel thin-provisioning.rst):
/// 128 to 2 097 152 sectors. Anything outside is not real output.
const MAX_DATA_BLOCK_SECTORS: u64 = 2 * 1024 * 1024;

/// How a range of blocks compares between the left (older) and right
/// (newer) device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeltaKind {
    /// Both map the blocks to the same data: unchanged, skip.
    Same,
    /// Both map them, to different data: changed, send.
    Different,
    /// Only the left maps them: the right reads zeros there (discarded).
    LeftOnly,
    /// Only the right maps them: newly written, send.
    RightOnly,
}

impl DeltaKind {
    /// The XML element name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaKind::Same => "same",
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left_only",
            DeltaKind::RightOnly => "right_only",
        }
    }

    fn from_name(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"same" => DeltaKind::Same,
            b"different" => DeltaKind::Different,
            b"left_only" => DeltaKind::LeftOnly,
            b"right_only" => DeltaKind::RightOnly,
            _ => return None,
        })
    }

    /// The newer device's data must be sent for these blocks.
    pub fn needs_data(self) -> bool {
        matches!(self, DeltaKind::Different | DeltaKind::RightOnly)
    }

    /// The newer device reads as zeros in these blocks.
    pub fn is_zeroed(self) -> bool {
        self == DeltaKind::LeftOnly
    }
}

/// A run of `length` data blocks starting at virtual block `begin`.
/// The parser guarantees `length > 0` and that `begin + length` fits in
/// a `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaRange {
    /// How the blocks compare.
    pub kind: DeltaKind,
    /// First block (in data blocks from the start of the thin device).
    pub begin: u64,
    /// Number of blocks.
    pub length: u64,
}

impl DeltaRange {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.begin.saturating_add(self.length)
    }

    /// The range in bytes, for data blocks of `data_block_bytes` (see
    /// [`DeltaParser::data_block_bytes`]). Fails rather than wraps when the
    /// byte offsets do not fit in a `u64`.
    ///
    /// The range may reach past the end of the volume: `thin_delta` has
    /// been seen reporting `left_only` blocks past the end of a shrunk
    /// volume (wyng-backup issue 56), so callers clip to the volume size.
    pub fn byte_range(&self, data_block_bytes: u64) -> Result<Range<u64>, ThinDeltaError> {
        let overflow = || ThinDeltaError::ByteOverflow {
            begin: self.begin,
            length: self.length,
            data_block_bytes,
        };
        let start = self
            .begin
            .checked_mul(data_block_bytes)
            .ok_or_else(overflow)?;
        let len = self
            .length
            .checked_mul(data_block_bytes)
            .ok_or_else(overflow)?;
        let end = start.checked_add(len).ok_or_else(overflow)?;
        Ok(start..end)
    }
}

/// The `<superblock>` attributes of the pool metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    /// Pool UUID (empty as printed by thin_delta 0.9.0).
    pub uuid: String,
    /// Metadata time stamp (counts snapshots).
    pub time: u64,
    /// Transaction id (LVM's `transaction_id`).
    pub transaction: u64,
    /// Data block size in 512-byte sectors (128 = 64 KiB).
    pub data_block_size: u64,
    /// Pool size in data blocks; thin_delta 0.9.0 prints 0 when reading a
    /// metadata snapshot (`-m`), so do not rely on it.
    pub nr_data_blocks: u64,
    /// Location of the held metadata snapshot, when printed.
    pub metadata_snap: Option<u64>,
}

impl Superblock {
    /// Data block size in bytes.
    pub fn data_block_bytes(&self) -> u64 {
        // Bounded by MAX_DATA_BLOCK_SECTORS when parsed: cannot overflow.
        self.data_block_size.saturating_mul(SECTOR_BYTES)
    }
}

/// Why `thin_delta` output was refused.
#[derive(Debug, thiserror::Error)]
pub enum ThinDeltaError {
    /// Reading the input failed.
    #[error("reading thin_delta output")]
    Io(#[source] io::Error),
    /// Not well-formed XML.
    #[error("thin_delta output is not well-formed XML near byte {position}")]
    Xml {
        /// Byte offset in the input.
        position: u64,
        /// The XML parser's complaint.
        #[source]
        source: quick_xml::Error,
    },
    /// One tag or text run is longer than [`MAX_ELEMENT_BYTES`].
    #[error("thin_delta output has an element longer than {limit} bytes near byte {position}")]
    ElementTooLong {
        /// Byte offset in the input.
        position: u64,
        /// The limit.
        limit: usize,
    },
    /// An element that does not belong where it is (or at all).
    #[error("thin_delta output has unexpected <{element}> {context} near byte {position}")]
    UnexpectedElement {
        /// Element name (lossy).
        element: String,
        /// Where it was found.
        context: &'static str,
        /// Byte offset in the input.
        position: u64,
    },
    /// Text, CDATA or a DOCTYPE where only elements belong.
    #[error("thin_delta output has unexpected {what} near byte {position}")]
    UnexpectedContent {
        /// What was found.
        what: &'static str,
        /// Byte offset in the input.
        position: u64,
    },
    /// A required attribute is absent.
    #[error("thin_delta output: <{element}> lacks the {attribute} attribute near byte {position}")]
    MissingAttribute {
        /// Element name.
        element: &'static str,
        /// Attribute name.
        attribute: &'static str,
        /// Byte offset in the input.
        position: u64,
    },
    /// An attribute that must be a decimal number is not one (or does not
    /// fit in a `u64`).
    #[error(
        "thin_delta output: <{element} {attribute}={value:?}> is not a number near byte {position}"
    )]
    BadNumber {
        /// Element name.
        element: &'static str,
        /// Attribute name.
        attribute: &'static str,
        /// The value (lossy).
        value: String,
        /// Byte offset in the input.
        position: u64,
    },
    /// `data_block_size` outside dm-thin's 128..=2097152 sectors.
    #[error("thin_delta output: data_block_size={0} sectors is impossible for dm-thin")]
    BadBlockSize(u64),
    /// A range whose end does not fit in a `u64`.
    #[error(
        "thin_delta output: range begin={begin} length={length} overflows near byte {position}"
    )]
    RangeOverflow {
        /// First block.
        begin: u64,
        /// Number of blocks.
        length: u64,
        /// Byte offset in the input.
        position: u64,
    },
    /// A range of no blocks.
    #[error("thin_delta output: empty range at block {begin} near byte {position}")]
    EmptyRange {
        /// First block.
        begin: u64,
        /// Byte offset in the input.
        position: u64,
    },
    /// A range starting before the previous one ended: thin_delta prints
    /// ranges in ascending order without overlap.
    #[error("thin_delta output: range at block {begin} overlaps or precedes the previous range ending at {prev_end} near byte {position}")]
    OutOfOrder {
        /// First block of this range.
        begin: u64,
        /// End of the previous range.
        prev_end: u64,
        /// Byte offset in the input.
        position: u64,
    },
    /// The input ended before `</diff></superblock>`: the producer died or
    /// was cut off, so the range list is incomplete.
    #[error("thin_delta output ends early ({context}): incomplete")]
    Truncated {
        /// What was still expected.
        context: &'static str,
    },
    /// Something after the closing `</superblock>`.
    #[error("thin_delta output continues after </superblock> near byte {position}")]
    TrailingData {
        /// Byte offset in the input.
        position: u64,
    },
    /// A range's byte offsets do not fit in a `u64`.
    #[error("range of {length} blocks at block {begin} overflows u64 bytes with {data_block_bytes}-byte blocks")]
    ByteOverflow {
        /// First block.
        begin: u64,
        /// Number of blocks.
        length: u64,
        /// Block size used.
        data_block_bytes: u64,
    },
}

/// Counts the bytes consumed since the last reset and refuses to hand out
/// more once a single event exceeds [`MAX_ELEMENT_BYTES`]: quick-xml
/// buffers a whole tag before returning it.
#[derive(Debug)]
struct EventLimit<R> {
    inner: R,
    since_reset: usize,
    exceeded: bool,
}

impl<R: BufRead> Read for EventLimit<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = {
            let avail = self.fill_buf()?;
            let n = avail.len().min(out.len());
            out[..n].copy_from_slice(&avail[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for EventLimit<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.since_reset > MAX_ELEMENT_BYTES {
            self.exceeded = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "XML element too long",
            ));
        }
        // Hand out no more than one byte past the limit, so an inner
        // reader with a huge buffer (a slice) cannot slip a whole
        // oversized element through in one call.
        let allowed = MAX_ELEMENT_BYTES + 1 - self.since_reset;
        let avail = self.inner.fill_buf()?;
        Ok(&avail[..avail.len().min(allowed)])
    }

    fn consume(&mut self, amt: usize) {
        self.since_reset = self.since_reset.saturating_add(amt);
        self.inner.consume(amt);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside `<diff>`, expecting ranges, groups or `</diff>`.
    Diff,
    /// Inside a verbose group such as `<same>`, expecting `<range/>`.
    Group(DeltaKind),
    /// After `</diff>`, expecting `</superblock>`.
    AfterDiff,
    /// After `</superblock>`, expecting the end of input.
    AfterSuperblock,
    /// Finished, or failed: the iterator yields nothing more.
    Done,
}

/// One parsed event, owned so the read buffer can be reused at once.
enum Item {
    Start(Vec<u8>, Attrs),
    Empty(Vec<u8>, Attrs),
    End(Vec<u8>),
    Eof,
}

/// Numeric attributes of interest, read while the event is borrowed.
#[derive(Default)]
struct Attrs {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Attrs {
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// Streaming reader of `thin_delta` output: construct it with
/// [`DeltaParser::new`] (which reads up to `<diff>`), then iterate the
/// ranges. After the last range the iterator checks that the document is
/// complete; after an error it yields nothing more.
#[derive(Debug)]
pub struct DeltaParser<R> {
    reader: Reader<EventLimit<R>>,
    buf: Vec<u8>,
    superblock: Superblock,
    left: u64,
    right: u64,
    state: State,
    prev_end: u64,
}

/// A decimal `u64` from ASCII digits; no sign, no spaces, no empty string.
fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

impl<R: BufRead> DeltaParser<R> {
    /// Reads the `<superblock>` and `<diff>` start tags; ranges follow
    /// through the iterator.
    pub fn new(input: R) -> Result<Self, ThinDeltaError> {
        let mut reader = Reader::from_reader(EventLimit {
            inner: input,
            since_reset: 0,
            exceeded: false,
        });
        reader.config_mut().trim_text(true);
        let mut p = DeltaParser {
            reader,
            buf: Vec::with_capacity(256),
            superblock: Superblock::default(),
            left: 0,
            right: 0,
            state: State::Done,
            prev_end: 0,
        };
        // Prolog: the superblock start tag, then the diff start tag.
        match p.read()? {
            Item::Start(name, attrs) if name == b"superblock" => {
                p.superblock = p.parse_superblock(&attrs)?;
            }
            Item::Eof => {
                return Err(ThinDeltaError::Truncated {
                    context: "no <superblock>",
                })
            }
            other => return Err(p.unexpected(&other, "before <superblock>")),
        }
        match p.read()? {
            Item::Start(name, attrs) if name == b"diff" => {
                p.left = p.number(&attrs, "diff", "left")?;
                p.right = p.number(&attrs, "diff", "right")?;
                p.state = State::Diff;
            }
            // An empty diff element: no ranges at all.
            Item::Empty(name, attrs) if name == b"diff" => {
                p.left = p.number(&attrs, "diff", "left")?;
                p.right = p.number(&attrs, "diff", "right")?;
                p.state = State::AfterDiff;
            }
            Item::Eof => {
                return Err(ThinDeltaError::Truncated {
                    context: "no <diff>",
                })
            }
            other => return Err(p.unexpected(&other, "where <diff> belongs")),
        }
        Ok(p)
    }

    /// The pool's superblock line.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Size of a data block in bytes (`data_block_size` × 512).
    pub fn data_block_bytes(&self) -> u64 {
        self.superblock.data_block_bytes()
    }

    /// Thin device id of the left (older) side, `--snap1`.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Thin device id of the right (newer) side, `--snap2`.
    pub fn right(&self) -> u64 {
        self.right
    }

    /// The underlying reader, e.g. to drain what is left.
    pub fn into_inner(self) -> R {
        self.reader.into_inner().inner
    }

    fn offset(&self) -> u64 {
        self.reader.buffer_position()
    }

    /// Next structural event, skipping declarations, comments and
    /// processing instructions.
    fn read(&mut self) -> Result<Item, ThinDeltaError> {
        loop {
            self.reader.get_mut().since_reset = 0;
            self.buf.clear();
            let position = self.reader.buffer_position();
            let event = match self.reader.read_event_into(&mut self.buf) {
                Ok(e) => e,
                Err(e) => {
                    if self.reader.get_ref().exceeded {
                        return Err(ThinDeltaError::ElementTooLong {
                            position,
                            limit: MAX_ELEMENT_BYTES,
                        });
                    }
                    return Err(match e {
                        quick_xml::Error::Io(io) => {
                            ThinDeltaError::Io(io::Error::new(io.kind(), io.to_string()))
                        }
                        source => ThinDeltaError::Xml { position, source },
                    });
                }
            };
            let attrs = |e: &BytesStart<'_>| -> Result<Attrs, ThinDeltaError> {
                let mut pairs = Vec::new();
                for a in e.attributes() {
                    let a = a.map_err(|err| ThinDeltaError::Xml {
                        position,
                        source: err.into(),
                    })?;
                    pairs.push((a.key.as_ref().to_vec(), a.value.into_owned()));
                }
                Ok(Attrs { pairs })
            };
            return Ok(match event {
                Event::Start(e) => Item::Start(e.name().as_ref().to_vec(), attrs(&e)?),
                Event::Empty(e) => Item::Empty(e.name().as_ref().to_vec(), attrs(&e)?),
                Event::End(e) => Item::End(e.name().as_ref().to_vec()),
                Event::Eof => Item::Eof,
                Event::Decl(_) | Event::Comment(_) | Event::PI(_) => continue,
                Event::Text(_) => {
                    return Err(ThinDeltaError::UnexpectedContent {
                        what: "text",
                        position,
                    })
                }
                Event::CData(_) => {
                    return Err(ThinDeltaError::UnexpectedContent {
                        what: "CDATA",
                        position,
                    })
                }
                Event::DocType(_) => {
                    return Err(ThinDeltaError::UnexpectedContent {
                        what: "DOCTYPE",
                        position,
                    })
                }
            });
        }
    }

    fn unexpected(&self, item: &Item, context: &'static str) -> ThinDeltaError {
        let position = self.offset();
        let element = match item {
            Item::Start(n, _) | Item::Empty(n, _) => String::from_utf8_lossy(n).into_owned(),
            Item::End(n) => format!("/{}", String::from_utf8_lossy(n)),
            Item::Eof => {
                return ThinDeltaError::Truncated { context };
            }
        };
        ThinDeltaError::UnexpectedElement {
            element,
            context,
            position,
        }
    }

    fn number(
        &self,
        attrs: &Attrs,
        element: &'static str,
        attribute: &'static str,
    ) -> Result<u64, ThinDeltaError> {
        let raw = attrs
            .get(attribute.as_bytes())
            .ok_or(ThinDeltaError::MissingAttribute {
                element,
                attribute,
                position: self.offset(),
            })?;
        parse_u64(raw).ok_or_else(|| ThinDeltaError::BadNumber {
            element,
            attribute,
            value: String::from_utf8_lossy(raw).chars().take(64).collect(),
            position: self.offset(),
        })
    }

    fn parse_superblock(&self, attrs: &Attrs) -> Result<Superblock, ThinDeltaError> {
        let data_block_size = self.number(attrs, "superblock", "data_block_size")?;
        if !(1..=MAX_DATA_BLOCK_SECTORS).contains(&data_block_size) {
            return Err(ThinDeltaError::BadBlockSize(data_block_size));
        }
        // The rest is informational: tolerate its absence.
        let optional = |name: &'static str| -> Result<Option<u64>, ThinDeltaError> {
            match attrs.get(name.as_bytes()) {
                None => Ok(None),
                Some(_) => self.number(attrs, "superblock", name).map(Some),
            }
        };
        Ok(Superblock {
            uuid: attrs
                .get(b"uuid")
                .map(|u| String::from_utf8_lossy(u).into_owned())
                .unwrap_or_default(),
            time: optional("time")?.unwrap_or(0),
            transaction: optional("transaction")?.unwrap_or(0),
            data_block_size,
            nr_data_blocks: optional("nr_data_blocks")?.unwrap_or(0),
            metadata_snap: optional("metadata_snap")?,
        })
    }

    fn range(&mut self, kind: DeltaKind, attrs: &Attrs) -> Result<DeltaRange, ThinDeltaError> {
        let element = if matches!(self.state, State::Group(_)) {
            "range"
        } else {
            kind.as_str()
        };
        let begin = self.number(attrs, element, "begin")?;
        let length = self.number(attrs, element, "length")?;
        let position = self.offset();
        let end = begin
            .checked_add(length)
            .ok_or(ThinDeltaError::RangeOverflow {
                begin,
                length,
                position,
            })?;
        if length == 0 {
            return Err(ThinDeltaError::EmptyRange { begin, position });
        }
        if begin < self.prev_end {
            return Err(ThinDeltaError::OutOfOrder {
                begin,
                prev_end: self.prev_end,
                position,
            });
        }
        self.prev_end = end;
        Ok(DeltaRange {
            kind,
            begin,
            length,
        })
    }

    /// One step of the state machine: `Ok(Some)` a range, `Ok(None)` the
    /// document ended properly.
    fn step(&mut self) -> Result<Option<DeltaRange>, ThinDeltaError> {
        loop {
            let item = match self.read() {
                Err(ThinDeltaError::UnexpectedContent { position, .. })
                    if self.state == State::AfterSuperblock =>
                {
                    return Err(ThinDeltaError::TrailingData { position })
                }
                other => other?,
            };
            match (self.state, item) {
                (State::Diff, Item::Empty(name, attrs)) => match DeltaKind::from_name(&name) {
                    Some(kind) => return self.range(kind, &attrs).map(Some),
                    None => return Err(self.unexpected(&Item::Empty(name, attrs), "inside <diff>")),
                },
                (State::Diff, Item::Start(name, attrs)) => match DeltaKind::from_name(&name) {
                    Some(kind) => self.state = State::Group(kind),
                    None => return Err(self.unexpected(&Item::Start(name, attrs), "inside <diff>")),
                },
                (State::Diff, Item::End(name)) if name == b"diff" => self.state = State::AfterDiff,
                (State::Diff, other) => return Err(self.unexpected(&other, "inside <diff>")),
                (State::Group(kind), Item::Empty(name, attrs)) if name == b"range" => {
                    return self.range(kind, &attrs).map(Some)
                }
                (State::Group(kind), Item::End(name)) if name == kind.as_str().as_bytes() => {
                    self.state = State::Diff
                }
                (State::Group(_), other) => {
                    return Err(self.unexpected(&other, "inside a verbose range group"))
                }
                (State::AfterDiff, Item::End(name)) if name == b"superblock" => {
                    self.state = State::AfterSuperblock
                }
                (State::AfterDiff, other) => return Err(self.unexpected(&other, "after </diff>")),
                (State::AfterSuperblock, Item::Eof) => {
                    self.state = State::Done;
                    return Ok(None);
                }
                (State::AfterSuperblock, _) => {
                    return Err(ThinDeltaError::TrailingData {
                        position: self.offset(),
                    })
                }
                (State::Done, _) => return Ok(None),
            }
        }
    }
}

impl<R: BufRead> Iterator for DeltaParser<R> {
    type Item = Result<DeltaRange, ThinDeltaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.state == State::Done {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => None,
            Err(e) => {
                self.state = State::Done;
                Some(Err(e))
            }
        }
    }
}

/// Parses a whole document held in memory: the superblock and every
/// range. For tests and small inputs; stream with [`DeltaParser`] otherwise.
pub fn parse_all(input: &[u8]) -> Result<(Superblock, Vec<DeltaRange>), ThinDeltaError> {
    let parser = DeltaParser::new(input)?;
    let sb = parser.superblock().clone();
    let ranges = parser.collect::<Result<Vec<_>, _>>()?;
    Ok((sb, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use DeltaKind::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_bytes!(concat!("../tests/fixtures/", $name)).as_slice()
        };
    }

    fn r(kind: DeltaKind, begin: u64, length: u64) -> DeltaRange {
        DeltaRange {
            kind,
            begin,
            length,
        }
    }

    /// Scenario of capture.sh: snap1 (id 2) has blocks 0..16 written;
    /// then blocks 16..32 appended, block 2 rewritten and block 5
    /// discarded before snap2 (id 3).
    fn snap1_to_snap2() -> Vec<DeltaRange> {
        vec![
            r(Same, 0, 2),
            r(Different, 2, 1),
            r(Same, 3, 2),
            r(LeftOnly, 5, 1),
            r(Same, 6, 10),
            r(RightOnly, 16, 16),
        ]
    }

    #[test]
    fn real_thin_delta_output() {
        let (sb, ranges) = parse_all(fixture!("thin-delta-1-2.xml")).unwrap();
        assert_eq!(sb.data_block_size, 128);
        assert_eq!(sb.data_block_bytes(), 64 << 10);
        // thin_delta 0.9.0 prints nr_data_blocks="0" with -m.
        assert_eq!(sb.nr_data_blocks, 0);
        assert_eq!((sb.time, sb.transaction), (3, 4));
        assert_eq!(sb.uuid, "");
        assert_eq!(sb.metadata_snap, None);
        assert_eq!(ranges, snap1_to_snap2());

        let p = DeltaParser::new(fixture!("thin-delta-1-2.xml")).unwrap();
        assert_eq!((p.left(), p.right()), (2, 3));
    }

    #[test]
    fn appended_blocks_past_the_last_shared_run_are_reported() {
        // snap3 (id 4) = snap2 plus blocks 32..36. Older thin_delta
        // releases dropped the tail of a run once the other side ran out
        // of mappings; 0.9.0 reports it.
        let (_, ranges) = parse_all(fixture!("thin-delta-2-4.xml")).unwrap();
        assert_eq!(ranges, [r(Same, 0, 5), r(Same, 6, 26), r(RightOnly, 32, 4)]);
        let (_, ranges) = parse_all(fixture!("thin-delta-1-4.xml")).unwrap();
        let mut expect = snap1_to_snap2();
        expect[5].length = 20;
        assert_eq!(ranges, expect);
    }

    #[test]
    fn verbose_form_gives_the_same_ranges() {
        let (sb, ranges) = parse_all(fixture!("thin-delta-verbose-1-2.xml")).unwrap();
        assert_eq!(sb.data_block_size, 128);
        assert_eq!(ranges, snap1_to_snap2());
    }

    #[test]
    fn device_against_itself_is_all_same() {
        let (_, ranges) = parse_all(fixture!("thin-delta-same.xml")).unwrap();
        assert_eq!(ranges, [r(Same, 0, 16)]);
    }

    #[test]
    fn byte_ranges() {
        let bs = 64 << 10;
        assert_eq!(
            r(RightOnly, 16, 16).byte_range(bs).unwrap(),
            (1 << 20)..(2 << 20)
        );
        assert!(r(Same, u64::MAX / 2, 1).byte_range(bs).is_err());
        assert!(r(Same, 1, u64::MAX / 2).byte_range(bs).is_err());
        assert!(r(Same, (u64::MAX - 1) / bs, 1).byte_range(bs).is_err());
        assert!(RightOnly.needs_data() && Different.needs_data());
        assert!(!Same.needs_data() && !LeftOnly.needs_data() && LeftOnly.is_zeroed());
    }

    const HEAD: &str = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0"><diff left="1" right="2">"#;
    const TAIL: &str = "</diff></superblock>";

    fn body(inner: &str) -> String {
        format!("{HEAD}{inner}{TAIL}")
    }

    fn err_of(doc: &str) -> ThinDeltaError {
        match parse_all(doc.as_bytes()) {
            Err(e) => e,
            Ok(v) => panic!(
                "accepted {:?}: {v:?}",
                doc.chars().take(300).collect::<String>()
            ),
        }
    }

    #[test]
    fn empty_diff_and_prolog_noise() {
        assert_eq!(parse_all(body("").as_bytes()).unwrap().1, []);
        let doc = format!(
            "<?xml version=\"1.0\"?>\n<!-- c -->\n{}\n<!-- end -->\n",
            body("\n  <same begin=\"0\" length=\"1\"/>\n")
        );
        assert_eq!(parse_all(doc.as_bytes()).unwrap().1, [r(Same, 0, 1)]);
        let empty_diff =
            r#"<superblock data_block_size="256"><diff left="1" right="2"/></superblock>"#;
        let (sb, ranges) = parse_all(empty_diff.as_bytes()).unwrap();
        assert_eq!((sb.data_block_bytes(), ranges.len()), (128 << 10, 0));
    }

    #[test]
    fn rejects_malformed_documents() {
        use ThinDeltaError as E;
        type Check = fn(&ThinDeltaError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            ("".into(), |e| matches!(e, E::Truncated { .. })),
            ("   ".into(), |e| matches!(e, E::Truncated { .. })),
            (HEAD.into(), |e| matches!(e, E::Truncated { .. })),
            (format!("{HEAD}<same begin=\"0\" length=\"1\"/>"), |e| {
                matches!(e, E::Truncated { .. })
            }),
            (format!("{HEAD}</diff>"), |e| {
                matches!(e, E::Truncated { .. })
            }),
            ("<diff left=\"1\" right=\"2\"></diff>".into(), |e| {
                matches!(e, E::UnexpectedElement { .. })
            }),
            (
                r#"<superblock><diff left="1" right="2"></diff></superblock>"#.into(),
                |e| {
                    matches!(
                        e,
                        E::MissingAttribute {
                            attribute: "data_block_size",
                            ..
                        }
                    )
                },
            ),
            (
                r#"<superblock data_block_size="0"><diff left="1" right="2"></diff></superblock>"#
                    .into(),
                |e| matches!(e, E::BadBlockSize(0)),
            ),
            (
                r#"<superblock data_block_size="128"><diff right="2"></diff></superblock>"#.into(),
                |e| {
                    matches!(
                        e,
                        E::MissingAttribute {
                            attribute: "left",
                            ..
                        }
                    )
                },
            ),
            (body(r#"<moved begin="0" length="1"/>"#), |e| {
                matches!(e, E::UnexpectedElement { .. })
            }),
            (body(r#"<same length="1"/>"#), |e| {
                matches!(
                    e,
                    E::MissingAttribute {
                        attribute: "begin",
                        ..
                    }
                )
            }),
            (body(r#"<same begin="0"/>"#), |e| {
                matches!(
                    e,
                    E::MissingAttribute {
                        attribute: "length",
                        ..
                    }
                )
            }),
            (body(r#"<same begin="x" length="1"/>"#), |e| {
                matches!(e, E::BadNumber { .. })
            }),
            (body(r#"<same begin="-1" length="1"/>"#), |e| {
                matches!(e, E::BadNumber { .. })
            }),
            (body(r#"<same begin=" 1" length="1"/>"#), |e| {
                matches!(e, E::BadNumber { .. })
            }),
            (
                body(r#"<same begin="18446744073709551616" length="1"/>"#),
                |e| matches!(e, E::BadNumber { .. }),
            ),
            (
                body(r#"<same begin="18446744073709551615" length="1"/>"#),
                |e| matches!(e, E::RangeOverflow { .. }),
            ),
            (body(r#"<same begin="0" length="0"/>"#), |e| {
                matches!(e, E::EmptyRange { .. })
            }),
            (
                body(r#"<same begin="5" length="2"/><different begin="6" length="1"/>"#),
                |e| {
                    matches!(
                        e,
                        E::OutOfOrder {
                            begin: 6,
                            prev_end: 7,
                            ..
                        }
                    )
                },
            ),
            (body("text"), |e| matches!(e, E::UnexpectedContent { .. })),
            (body("<![CDATA[x]]>"), |e| {
                matches!(e, E::UnexpectedContent { .. })
            }),
            (body(r#"<same><same begin="0" length="1"/></same>"#), |e| {
                matches!(e, E::UnexpectedElement { .. })
            }),
            (body(r#"<range begin="0" length="1"/>"#), |e| {
                matches!(e, E::UnexpectedElement { .. })
            }),
            (
                body(r#"<same><range begin="0" length="1"/></different>"#),
                |e| matches!(e, E::Xml { .. }),
            ),
            (format!("{}<superblock/>", body("")), |e| {
                matches!(e, E::TrailingData { .. })
            }),
            (format!("{}trailing", body("")), |e| {
                matches!(e, E::TrailingData { .. })
            }),
            (body(r#"<same begin="0" begin="1" length="1"/>"#), |e| {
                matches!(e, E::Xml { .. })
            }),
            (body("<same begin=\"0\" length=\"1\"></diff>"), |e| {
                matches!(e, E::Xml { .. } | E::UnexpectedElement { .. })
            }),
        ];
        for (doc, ok) in cases {
            let e = err_of(&doc);
            assert!(ok(&e), "{doc:?} gave {e:?}");
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn iterator_stops_after_an_error() {
        let doc = body(r#"<same begin="0" length="1"/><bogus/><same begin="5" length="1"/>"#);
        let mut p = DeltaParser::new(doc.as_bytes()).unwrap();
        assert!(matches!(p.next(), Some(Ok(_))));
        assert!(matches!(p.next(), Some(Err(_))));
        assert!(p.next().is_none());
        assert!(p.next().is_none());
    }

    #[test]
    fn huge_element_is_refused_without_buffering_it() {
        let doc = format!(
            "{HEAD}<same begin=\"0\" length=\"1\" pad=\"{}\"/>{TAIL}",
            "x".repeat(MAX_ELEMENT_BYTES * 4)
        );
        let e = err_of(&doc);
        assert!(matches!(e, ThinDeltaError::ElementTooLong { .. }), "{e:?}");
        // Long runs of whitespace are one event too.
        let doc = format!("{HEAD}{}{TAIL}", " ".repeat(MAX_ELEMENT_BYTES * 2));
        assert!(matches!(
            err_of(&doc),
            ThinDeltaError::ElementTooLong { .. }
        ));
    }

    #[test]
    fn io_errors_surface() {
        #[derive(Debug)]
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let e = DeltaParser::new(io::BufReader::new(Failing)).unwrap_err();
        assert!(matches!(e, ThinDeltaError::Io(_)), "{e:?}");
    }

    /// A reader that hands out at most `n` bytes per call, to move the
    /// buffer boundaries through every position of the document.
    struct Trickle<'a> {
        data: &'a [u8],
        n: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let k = self.n.min(out.len()).min(self.data.len());
            out[..k].copy_from_slice(&self.data[..k]);
            self.data = &self.data[k..];
            Ok(k)
        }
    }

    #[test]
    fn streams_many_ranges_in_bounded_memory() {
        // 2 million ranges (~80 MB of XML) generated on the fly.
        struct Gen {
            next: u64,
            total: u64,
            pending: Vec<u8>,
            pos: usize,
            done: bool,
        }
        impl Read for Gen {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.pos == self.pending.len() {
                    self.pending.clear();
                    self.pos = 0;
                    if self.next == 0 {
                        self.pending.extend_from_slice(HEAD.as_bytes());
                    }
                    while self.pending.len() < 8192 && self.next < self.total {
                        let kind = ["same", "different", "left_only", "right_only"]
                            [(self.next % 4) as usize];
                        self.pending.extend_from_slice(
                            format!("<{kind} begin=\"{}\" length=\"1\"/>\n", self.next * 2)
                                .as_bytes(),
                        );
                        self.next += 1;
                    }
                    if self.next == self.total && !self.done {
                        self.pending.extend_from_slice(TAIL.as_bytes());
                        self.done = true;
                    }
                }
                let k = out.len().min(self.pending.len() - self.pos);
                out[..k].copy_from_slice(&self.pending[self.pos..self.pos + k]);
                self.pos += k;
                Ok(k)
            }
        }
        let total = 2_000_000;
        let parser = DeltaParser::new(io::BufReader::new(Gen {
            next: 0,
            total,
            pending: Vec::new(),
            pos: 0,
            done: false,
        }))
        .unwrap();
        let mut count = 0u64;
        for range in parser {
            let range = range.unwrap();
            assert_eq!(range.begin, count * 2);
            count += 1;
        }
        assert_eq!(count, total);
    }

    fn render(ranges: &[DeltaRange], verbose: bool) -> String {
        let mut s = String::from(HEAD);
        for r in ranges {
            if verbose {
                s += &format!(
                    "<{k}>\n<range begin=\"{}\" data_begin=\"7\" length=\"{}\"/>\n</{k}>\n",
                    r.begin,
                    r.length,
                    k = r.kind.as_str()
                );
            } else {
                s += &format!(
                    "<{} begin=\"{}\" length=\"{}\"/>\n",
                    r.kind.as_str(),
                    r.begin,
                    r.length
                );
            }
        }
        s + TAIL
    }

    fn ranges_strategy() -> impl Strategy<Value = Vec<DeltaRange>> {
        proptest::collection::vec((0u8..4, 0u64..1000, 1u64..1000), 0..50).prop_map(|v| {
            let mut at = 0u64;
            v.into_iter()
                .map(|(k, gap, length)| {
                    let begin = at + gap;
                    at = begin + length;
                    let kind = [Same, Different, LeftOnly, RightOnly][k as usize];
                    DeltaRange {
                        kind,
                        begin,
                        length,
                    }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(p) = DeltaParser::new(bytes.as_slice()) {
                // Stops at the first error: the iterator is fused then.
                for r in p.flatten() {
                    let _ = r.byte_range(65536);
                }
            }
        }

        #[test]
        fn mutated_real_output_never_panics(
            pos in 0usize..700,
            byte in any::<u8>(),
            cut in 0usize..700,
        ) {
            let mut doc = fixture!("thin-delta-verbose-1-2.xml").to_vec();
            let n = doc.len();
            doc[pos % n] = byte;
            doc.truncate(cut.max(pos % n + 1));
            let _ = parse_all(&doc);
        }

        #[test]
        fn rendered_ranges_parse_back(ranges in ranges_strategy(), verbose in any::<bool>(), chunk in 1usize..64) {
            let doc = render(&ranges, verbose);
            let reader = io::BufReader::with_capacity(chunk, Trickle { data: doc.as_bytes(), n: chunk });
            let parsed: Vec<_> = DeltaParser::new(reader).unwrap().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(parsed, ranges);
        }

        #[test]
        fn truncated_output_is_never_accepted(ranges in ranges_strategy(), cut in any::<prop::sample::Index>()) {
            let doc = render(&ranges, false);
            // Dropping at least the final '>' must fail, wherever the cut.
            let at = cut.index(doc.len());
            prop_assert!(parse_all(&doc.as_bytes()[..at]).is_err());
        }
    }
}
