//! LVM driven through its command line.
//!
//! liblvm2app was removed in LVM 2.03 and liblvm2cmd only runs command
//! strings, so this module runs `lvm` and `dmsetup` as child processes and
//! reads `lvs --reportformat json` reports. Every command runs with
//! `LC_ALL=C` (stable messages and number formats) and
//! `LVM_SUPPRESS_FD_WARNINGS=1` (LVM otherwise complains about every
//! inherited descriptor), with stdin closed and stdout bounded.
//!
//! The parsing is kept apart from the running so it can be unit-tested on
//! real captured output (`tests/fixtures/`) and fuzzed:
//! [`parse_lvs_report`], [`parse_thin_pool_status`], [`split_dm_name`],
//! [`LvName::parse`].
//!
//! Order of calls for one changed-block-tracking cycle on thin LVM:
//!
//! 1. [`Lvm::resolve`] the source volume; [`Lvm::pool_of`] its pool;
//!    [`Lvm::release_stale_metadata_snap`] left over by a crashed run.
//! 2. [`Lvm::create_thin_snapshot`] for generation n.
//! 3. [`Lvm::reserve_metadata_snap`] → a [`MetadataSnapHold`];
//!    [`Lvm::thin_delta`] between the thin ids of generations n-1 and n;
//!    consume the ranges; [`ThinDeltaRun::finish`];
//!    [`MetadataSnapHold::finish`].
//! 4. After the target committed generation n, [`Lvm::remove`] n-1.
#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use serde::{Deserialize, Deserializer};

use crate::thin_delta::{DeltaParser, DeltaRange, ThinDeltaError};

/// Largest `lvs` report (or other command output) accepted, in bytes.
///
/// A report row is about 500 bytes, so this allows ~100 000 LVs while
/// keeping a runaway or hostile command from exhausting memory.
pub const MAX_REPORT_BYTES: usize = 64 << 20;

/// At most this much of a command's stderr is kept for error messages.
const MAX_STDERR_BYTES: usize = 64 << 10;

/// The `lvs -o` field list [`parse_lvs_report`] understands.
pub const LVS_FIELDS: &str = "lv_name,vg_name,lv_path,lv_dm_path,lv_attr,lv_size,pool_lv,origin,\
thin_id,chunk_size,lv_tags,data_percent,snap_percent,lv_active,metadata_lv";

/// The tag this crate's callers put on snapshots they create, so leftovers
/// of a crashed run can be found with [`Lvm::list_tagged`].
pub const DEFAULT_TAG: &str = "snapsync";

// ------------------------------------------------------------------ names

/// Why a volume name or spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The spec is not `vg/lv`, `/dev/vg/lv` or `/dev/mapper/vg-lv`.
    #[error("{spec:?} is not a logical volume (expected vg/lv, /dev/vg/lv or /dev/mapper/vg-lv)")]
    Form {
        /// The spec as given.
        spec: String,
    },
    /// A VG or LV name breaks LVM's naming rules.
    #[error("{name:?} is not a valid LVM name: {reason}")]
    Name {
        /// The offending name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A device-mapper name that names an internal layer (`-tpool`,
    /// `-real`, `-cow`, ...) rather than a logical volume.
    #[error("{spec:?} is the internal {layer:?} layer of an LV, not an LV")]
    Layer {
        /// The spec as given.
        spec: String,
        /// The layer suffix.
        layer: String,
    },
    /// A tag breaks LVM's tag rules.
    #[error("{tag:?} is not a valid LVM tag: {reason}")]
    Tag {
        /// The offending tag.
        tag: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
}

/// A logical volume named by volume group and LV name, both checked
/// against LVM's naming rules (so neither can be mistaken for an option).
///
/// Displays as `vg/lv`, the form every LVM command accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LvName {
    vg: String,
    lv: String,
}

impl LvName {
    /// Checks both names. Hidden LVs (`pool_tmeta`) are accepted; creating
    /// LVs goes through the stricter [`validate_new_lv_name`].
    pub fn new(vg: &str, lv: &str) -> Result<Self, SpecError> {
        validate_name(vg)?;
        validate_name(lv)?;
        Ok(LvName {
            vg: vg.to_owned(),
            lv: lv.to_owned(),
        })
    }

    /// Parses `vg/lv`, `/dev/vg/lv` or `/dev/mapper/vg-lv` (device-mapper
    /// escaping: a `-` inside a name is doubled). The spec is taken as
    /// text; whether the LV exists is for [`Lvm::resolve`] to find out.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let form = || SpecError::Form {
            spec: spec.to_owned(),
        };
        if let Some(dm) = spec.strip_prefix("/dev/mapper/") {
            let parts = split_dm_name(dm).map_err(|_| form())?;
            if let Some(layer) = parts.layer {
                return Err(SpecError::Layer {
                    spec: spec.to_owned(),
                    layer,
                });
            }
            return LvName::new(&parts.vg, &parts.lv);
        }
        let rest = spec.strip_prefix("/dev/").unwrap_or(spec);
        let (vg, lv) = rest.split_once('/').ok_or_else(form)?;
        if vg.is_empty() || lv.is_empty() || lv.contains('/') {
            return Err(form());
        }
        LvName::new(vg, lv)
    }

    /// The volume group.
    pub fn vg(&self) -> &str {
        &self.vg
    }

    /// The logical volume's name within its group.
    pub fn lv(&self) -> &str {
        &self.lv
    }

    /// The device-mapper name of this LV, or of one of its internal layers
    /// (`Some("tpool")`): `my-vg/data` → `my--vg-data`.
    pub fn dm_name(&self, layer: Option<&str>) -> String {
        dm_name(&self.vg, &self.lv, layer)
    }
}

impl fmt::Display for LvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vg, self.lv)
    }
}

/// Checks a VG or LV name against LVM's rules (lvm(8) "VALID NAMES"):
/// 1–127 characters from `a-z A-Z 0-9 + _ . -`, not starting with `-`,
/// not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let bad = |reason| {
        Err(SpecError::Name {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 127 {
        return bad("longer than 127 characters");
    }
    if name.starts_with('-') {
        return bad("starts with '-'");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'_' | b'.' | b'-'))
    {
        return bad("only a-z A-Z 0-9 + _ . - are allowed");
    }
    Ok(())
}

/// [`validate_name`] plus the rules LVM applies to names of new LVs: no
/// `snapshot`/`pvmove` prefix and none of the suffixes LVM uses for
/// internal volumes (lvm(8)).
pub fn validate_new_lv_name(name: &str) -> Result<(), SpecError> {
    validate_name(name)?;
    const RESERVED: &[&str] = &[
        "_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage",
        "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
    ];
    if name.starts_with("snapshot") || name.starts_with("pvmove") {
        return Err(SpecError::Name {
            name: name.to_owned(),
            reason: "names starting with 'snapshot' or 'pvmove' are reserved",
        });
    }
    if RESERVED.iter().any(|r| name.contains(r)) {
        return Err(SpecError::Name {
            name: name.to_owned(),
            reason: "contains a suffix LVM reserves for internal volumes",
        });
    }
    Ok(())
}

/// Checks a tag against LVM's rules (lvm(8) "TAGS"): 1–1024 characters
/// from `a-z A-Z 0-9 _ + . - / = ! : # &`, not starting with `-`.
pub fn validate_tag(tag: &str) -> Result<(), SpecError> {
    let bad = |reason| {
        Err(SpecError::Tag {
            tag: tag.to_owned(),
            reason,
        })
    };
    if tag.is_empty() {
        return bad("empty");
    }
    if tag.len() > 1024 {
        return bad("longer than 1024 characters");
    }
    if tag.starts_with('-') {
        return bad("starts with '-'");
    }
    if !tag.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'_' | b'+' | b'.' | b'-' | b'/' | b'=' | b'!' | b':' | b'#' | b'&'
            )
    }) {
        return bad("only a-z A-Z 0-9 _ + . - / = ! : # & are allowed");
    }
    Ok(())
}

/// Builds a device-mapper name the way LVM does (libdm
/// `dm_build_dm_name`): every `-` inside the VG and LV names is doubled and
/// the parts are joined with single `-`.
pub fn dm_name(vg: &str, lv: &str, layer: Option<&str>) -> String {
    fn push_escaped(out: &mut String, s: &str) {
        for c in s.chars() {
            if c == '-' {
                out.push('-');
            }
            out.push(c);
        }
    }
    let mut out = String::with_capacity(vg.len() + lv.len() + 8);
    push_escaped(&mut out, vg);
    out.push('-');
    push_escaped(&mut out, lv);
    if let Some(layer) = layer {
        out.push('-');
        out.push_str(layer);
    }
    out
}

/// A device-mapper name split back into LVM names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmNameParts {
    /// Volume group.
    pub vg: String,
    /// Logical volume.
    pub lv: String,
    /// Internal layer suffix such as `tpool`, `real`, `cow`.
    pub layer: Option<String>,
}

/// Splits a device-mapper name made by LVM (`my--vg-thin--pool-tpool`)
/// into VG, LV and optional layer, undoing the `-` doubling (as libdm
/// `dm_split_lvm_name` does). Fails unless there are two or three parts.
pub fn split_dm_name(name: &str) -> Result<DmNameParts, SpecError> {
    let mut parts: Vec<String> = vec![String::new()];
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '-' {
            if chars.peek() == Some(&'-') {
                chars.next();
                parts.last_mut().expect("parts is never empty").push('-');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("parts is never empty").push(c);
        }
    }
    let form = || SpecError::Form {
        spec: name.to_owned(),
    };
    if parts.iter().any(String::is_empty) {
        return Err(form());
    }
    let mut it = parts.into_iter();
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(vg), Some(lv), layer, None) => Ok(DmNameParts { vg, lv, layer }),
        _ => Err(form()),
    }
}

// ------------------------------------------------------------------ lvs report

/// Why an `lvs` JSON report was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The report exceeds [`MAX_REPORT_BYTES`].
    #[error("lvs report is {len} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// Size of the report.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or not shaped like an `lvs` report.
    #[error("lvs report is not the expected JSON")]
    Json(#[source] serde_json::Error),
    /// A row lacks a field that identifies the LV.
    #[error("lvs report row {row} has no {field}")]
    Missing {
        /// Index of the row in the report.
        row: usize,
        /// The missing field.
        field: &'static str,
    },
    /// A field's value cannot be interpreted.
    #[error("lvs report row {row} ({lv}): {field}={value:?}: {reason}")]
    Field {
        /// Index of the row in the report.
        row: usize,
        /// LV name of the row.
        lv: String,
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The 10-character `lv_attr` string of an LV (lvs(8) "NOTES").
///
/// Kept as text: the accessors below read the positions this crate needs
/// and treat a short or missing string as "unknown" rather than failing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LvAttr(String);

impl LvAttr {
    /// Wraps an attribute string as reported.
    pub fn new(attr: impl Into<String>) -> Self {
        LvAttr(attr.into())
    }

    /// The attribute string as reported.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn at(&self, i: usize) -> Option<u8> {
        self.0.as_bytes().get(i).copied()
    }

    /// Position 1, volume type: `V` thin volume, `t` thin pool, `s`/`S`
    /// (merging) snapshot, `o`/`O` origin, `-` plain, ...
    pub fn volume_type(&self) -> Option<char> {
        self.at(0).map(char::from)
    }

    /// Position 5, state: `a` active, `I` invalid snapshot, `S` invalid
    /// suspended snapshot, `m`/`M` snapshot merge failed, `-` inactive, ...
    pub fn state(&self) -> Option<char> {
        self.at(4).map(char::from)
    }

    /// Position 10 is `k`: the LV is skipped by plain activation (the
    /// default for thin snapshots; `lvchange -ay -K` overrides it).
    pub fn skip_activation(&self) -> bool {
        self.at(9) == Some(b'k')
    }
}

/// One logical volume as reported by `lvs` with [`LVS_FIELDS`].
///
/// Empty report fields become `None` (or 0 for sizes, empty for tags).
#[derive(Debug, Clone, PartialEq)]
pub struct LvInfo {
    /// LV name, without the brackets LVM puts around hidden LVs.
    pub name: String,
    /// Volume group.
    pub vg: String,
    /// Reported as `[name]`: an internal LV (pool data/metadata, spare).
    pub hidden: bool,
    /// `/dev/vg/lv`; `None` for hidden LVs and thin pools.
    pub path: Option<PathBuf>,
    /// `/dev/mapper/vg-lv`, also reported for hidden and inactive LVs.
    pub dm_path: Option<PathBuf>,
    /// The `lv_attr` string.
    pub attr: LvAttr,
    /// Size in bytes.
    pub size: u64,
    /// The thin pool a thin volume lives in.
    pub pool: Option<String>,
    /// The origin of a (thin or thick) snapshot.
    pub origin: Option<String>,
    /// Device id of a thin volume inside its pool (what `thin_delta`
    /// takes as `--snap1`/`--snap2`).
    pub thin_id: Option<u32>,
    /// Chunk size in bytes: the allocation unit of a thin pool or the
    /// copy-on-write unit of a thick snapshot; 0 otherwise.
    pub chunk_size: u64,
    /// Tags.
    pub tags: Vec<String>,
    /// Percentage of a pool's data space, a thin volume's size or a thick
    /// snapshot's COW space in use; only for active LVs.
    pub data_percent: Option<f64>,
    /// Same as `data_percent` for snapshots (LVM 2.03 reports both).
    pub snap_percent: Option<f64>,
    /// The LV is active on this host.
    pub active: bool,
    /// For a thin pool: its metadata LV (hidden, e.g. `pool_tmeta`).
    pub metadata_lv: Option<String>,
}

/// How a thick (copy-on-write) snapshot is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SnapshotState {
    /// Active and usable; its COW space is this full (0–100).
    Active {
        /// Percentage of the COW space in use.
        fill_percent: f64,
    },
    /// The COW space overflowed: the snapshot's contents are lost. LVM
    /// reports attr state `I` and 100% full.
    Invalid,
    /// Merging it back into its origin failed (attr state `m`/`M`).
    MergeFailed,
    /// Not active, so LVM cannot tell how full it is.
    Inactive,
}

impl LvInfo {
    /// `vg/lv` of this LV.
    pub fn lv_name(&self) -> LvName {
        LvName {
            vg: self.vg.clone(),
            lv: self.name.clone(),
        }
    }

    /// A thin volume (including thin snapshots).
    pub fn is_thin(&self) -> bool {
        self.attr.volume_type() == Some('V') || (self.pool.is_some() && self.thin_id.is_some())
    }

    /// A thin pool.
    pub fn is_thin_pool(&self) -> bool {
        self.attr.volume_type() == Some('t')
    }

    /// An old-style copy-on-write snapshot (`lvcreate -s -L`).
    pub fn is_thick_snapshot(&self) -> bool {
        matches!(self.attr.volume_type(), Some('s' | 'S'))
    }

    /// Carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// The state of a thick snapshot; `None` for other LVs.
    pub fn snapshot_state(&self) -> Option<SnapshotState> {
        if !self.is_thick_snapshot() {
            return None;
        }
        Some(match self.attr.state() {
            Some('I' | 'S') => SnapshotState::Invalid,
            Some('m' | 'M') => SnapshotState::MergeFailed,
            _ if !self.active => SnapshotState::Inactive,
            _ => match self.snap_percent.or(self.data_percent) {
                Some(fill_percent) => SnapshotState::Active { fill_percent },
                None => SnapshotState::Inactive,
            },
        })
    }
}

/// `lvs --reportformat json`: `{"report": [{"lv": [{...}, ...]}], "log": ...}`.
#[derive(Deserialize)]
struct RawReport {
    report: Vec<RawReportSection>,
}

#[derive(Deserialize)]
struct RawReportSection {
    #[serde(default)]
    lv: Vec<RawLv>,
}

/// One row; every field optional, unknown fields ignored, so other LVM
/// versions' extra or missing columns do not break parsing.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawLv {
    #[serde(deserialize_with = "lenient")]
    lv_name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    vg_name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    lv_path: Option<String>,
    #[serde(deserialize_with = "lenient")]
    lv_dm_path: Option<String>,
    #[serde(deserialize_with = "lenient")]
    lv_attr: Option<String>,
    #[serde(deserialize_with = "lenient")]
    lv_size: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pool_lv: Option<String>,
    #[serde(deserialize_with = "lenient")]
    origin: Option<String>,
    #[serde(deserialize_with = "lenient")]
    thin_id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    chunk_size: Option<String>,
    #[serde(deserialize_with = "lenient")]
    lv_tags: Option<String>,
    #[serde(deserialize_with = "lenient")]
    data_percent: Option<String>,
    #[serde(deserialize_with = "lenient")]
    snap_percent: Option<String>,
    #[serde(deserialize_with = "lenient")]
    lv_active: Option<String>,
    #[serde(deserialize_with = "lenient")]
    metadata_lv: Option<String>,
}

/// LVM 2.03 prints every field as a JSON string; later versions can print
/// numbers as numbers (`--reportformat json_std`). Accept both, and null;
/// an empty string means "no value".
fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Option::<Scalar>::deserialize(d)? {
        None => None,
        Some(Scalar::S(s)) if s.is_empty() => None,
        Some(Scalar::S(s)) => Some(s),
        Some(Scalar::U(n)) => Some(n.to_string()),
        Some(Scalar::F(n)) => Some(n.to_string()),
        Some(Scalar::B(b)) => Some(b.to_string()),
    })
}

/// Parses the JSON printed by `lvs --reportformat json --units b
/// --nosuffix -o` [`LVS_FIELDS`] (other field lists work too: missing
/// fields read as empty). Refuses input over [`MAX_REPORT_BYTES`].
pub fn parse_lvs_report(json: &[u8]) -> Result<Vec<LvInfo>, ReportError> {
    if json.len() > MAX_REPORT_BYTES {
        return Err(ReportError::TooLarge {
            len: json.len(),
            limit: MAX_REPORT_BYTES,
        });
    }
    let raw: RawReport = serde_json::from_slice(json).map_err(ReportError::Json)?;
    raw.report
        .into_iter()
        .flat_map(|section| section.lv)
        .enumerate()
        .map(|(row, lv)| convert_row(row, lv))
        .collect()
}

fn convert_row(row: usize, raw: RawLv) -> Result<LvInfo, ReportError> {
    let full_name = raw.lv_name.ok_or(ReportError::Missing {
        row,
        field: "lv_name",
    })?;
    let vg = raw.vg_name.ok_or(ReportError::Missing {
        row,
        field: "vg_name",
    })?;
    let (name, hidden) = strip_brackets(&full_name);
    let name = name.to_owned();
    let field_err = |field: &'static str, value: &str, reason: &'static str| ReportError::Field {
        row,
        lv: full_name.clone(),
        field,
        value: value.to_owned(),
        reason,
    };
    let bytes = |field: &'static str, v: Option<String>| -> Result<u64, ReportError> {
        match v {
            None => Ok(0),
            Some(s) => parse_bytes(&s).ok_or_else(|| {
                field_err(field, &s, "not a byte count (lvs needs --units b --nosuffix)")
            }),
        }
    };
    let percent = |field: &'static str, v: Option<String>| -> Result<Option<f64>, ReportError> {
        match v {
            None => Ok(None),
            Some(s) => match s.trim().parse::<f64>() {
                Ok(p) if p.is_finite() && p >= 0.0 => Ok(Some(p)),
                _ => Err(field_err(field, &s, "not a percentage")),
            },
        }
    };
    let size = bytes("lv_size", raw.lv_size)?;
    let chunk_size = bytes("chunk_size", raw.chunk_size)?;
    let thin_id = match raw.thin_id {
        None => None,
        Some(s) => Some(
            s.parse::<u32>()
                .map_err(|_| field_err("thin_id", &s, "not a thin device id"))?,
        ),
    };
    let data_percent = percent("data_percent", raw.data_percent)?;
    let snap_percent = percent("snap_percent", raw.snap_percent)?;
    let tags = raw
        .lv_tags
        .map(|t| {
            t.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let attr = LvAttr(raw.lv_attr.unwrap_or_default());
    // lv_active is "active" (or "local exclusive" etc. in shared VGs) and
    // empty when inactive; fall back to the attr state if it is missing.
    let active = match raw.lv_active.as_deref() {
        Some(s) => !s.contains("inactive"),
        None => attr.state() == Some('a'),
    };
    Ok(LvInfo {
        name,
        vg,
        hidden,
        path: raw.lv_path.map(PathBuf::from),
        dm_path: raw.lv_dm_path.map(PathBuf::from),
        attr,
        size,
        pool: raw.pool_lv.map(|p| strip_brackets(&p).0.to_owned()),
        origin: raw.origin.map(|o| strip_brackets(&o).0.to_owned()),
        thin_id,
        chunk_size,
        tags,
        data_percent,
        snap_percent,
        active,
        metadata_lv: raw.metadata_lv.map(|m| strip_brackets(&m).0.to_owned()),
    })
}

fn strip_brackets(name: &str) -> (&str, bool) {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(inner) => (inner, true),
        None => (name, false),
    }
}

/// A byte count as printed with `--units b --nosuffix`; a `B` suffix (if
/// `--nosuffix` was forgotten) is tolerated.
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_suffix('B').unwrap_or(s);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

// ------------------------------------------------------------------ dmsetup status

/// Why a `dmsetup status` line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    /// Not `<start> <length> <target> <params...>` on exactly one line.
    #[error("device-mapper status {0:?} is not one target line")]
    Form(String),
    /// The device's target is not the expected one.
    #[error("device-mapper target is {found:?}, expected {expected:?}")]
    Target {
        /// Target type found.
        found: String,
        /// Target type expected.
        expected: &'static str,
    },
    /// The kernel reports the pool as failed (`Fail`) or errored.
    #[error("thin pool is in {0:?} state")]
    Failed(String),
    /// A field of the thin-pool status cannot be read.
    #[error("thin-pool status field {field} = {value:?} is invalid")]
    Field {
        /// Name of the field (kernel thin-provisioning.rst).
        field: &'static str,
        /// Its value.
        value: String,
    },
}

/// One target line of `dmsetup status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmStatusLine<'a> {
    /// Start sector of the target.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// Target type (`thin-pool`, `linear`, `snapshot`, ...).
    pub target: &'a str,
    /// Target-specific parameters, whitespace-separated.
    pub params: Vec<&'a str>,
}

/// Splits the output of `dmsetup status NAME` for a single-target device.
pub fn parse_dm_status_line(text: &str) -> Result<DmStatusLine<'_>, StatusError> {
    let form = || StatusError::Form(text.chars().take(200).collect());
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let line = lines.next().ok_or_else(form)?;
    if lines.next().is_some() {
        return Err(form());
    }
    let mut words = line.split_ascii_whitespace();
    let start = words.next().and_then(|w| w.parse().ok()).ok_or_else(form)?;
    let length = words.next().and_then(|w| w.parse().ok()).ok_or_else(form)?;
    let target = words.next().ok_or_else(form)?;
    Ok(DmStatusLine {
        start,
        length,
        target,
        params: words.collect(),
    })
}

/// How the pool accepts writes (the kernel's `ro|rw|out_of_data_space`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolMode {
    /// Normal.
    ReadWrite,
    /// Metadata is read-only (after an error or when full).
    ReadOnly,
    /// Data space is exhausted; writes to unprovisioned blocks fail or queue.
    OutOfDataSpace,
    /// Something a newer kernel added.
    Other(String),
}

/// Status of a thin pool's `thin-pool` target (kernel
/// Documentation/admin-guide/device-mapper/thin-provisioning.rst):
/// `<transaction id> <used meta>/<total meta> <used data>/<total data>
/// <held metadata root> ro|rw|out_of_data_space [no_]discard_passdown
/// error|queue_if_no_space needs_check|- <metadata low watermark>`.
/// Metadata blocks are 4 KiB; data blocks are the pool's chunk size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPoolStatus {
    /// Transaction id LVM stores with each metadata change.
    pub transaction_id: u64,
    /// Used metadata blocks.
    pub used_metadata_blocks: u64,
    /// Total metadata blocks.
    pub total_metadata_blocks: u64,
    /// Used data blocks.
    pub used_data_blocks: u64,
    /// Total data blocks.
    pub total_data_blocks: u64,
    /// Block of the reserved metadata snapshot (`reserve_metadata_snap`),
    /// `None` when no snapshot is held (the kernel prints `-`).
    pub held_metadata_root: Option<u64>,
    /// Write mode.
    pub mode: PoolMode,
    /// The kernel asks for `thin_check` before the pool is used again.
    pub needs_check: bool,
}

/// Parses `dmsetup status` of a thin pool's `-tpool` device (or of an
/// unused pool's own device). Seen in a VM with Linux 6.1:
/// `0 131072 thin-pool 4 115/1024 37/1024 70 rw discard_passdown
/// queue_if_no_space - 256` (held root 70), `... 37/1024 - rw ...` (none).
pub fn parse_thin_pool_status(text: &str) -> Result<ThinPoolStatus, StatusError> {
    let line = parse_dm_status_line(text)?;
    if line.target != "thin-pool" {
        return Err(StatusError::Target {
            found: line.target.to_owned(),
            expected: "thin-pool",
        });
    }
    let p = &line.params;
    // A pool in failed mode reports just "Fail"; "Error" when the status
    // could not be read.
    if let Some(&first) = p.first() {
        if first == "Fail" || first == "Error" {
            return Err(StatusError::Failed(first.to_owned()));
        }
    }
    let field = |i: usize, name: &'static str| -> Result<&str, StatusError> {
        p.get(i).copied().ok_or(StatusError::Field {
            field: name,
            value: String::new(),
        })
    };
    let num = |s: &str, name: &'static str| -> Result<u64, StatusError> {
        s.parse().map_err(|_| StatusError::Field {
            field: name,
            value: s.to_owned(),
        })
    };
    let ratio = |s: &str, name: &'static str| -> Result<(u64, u64), StatusError> {
        let (a, b) = s.split_once('/').ok_or(StatusError::Field {
            field: name,
            value: s.to_owned(),
        })?;
        Ok((num(a, name)?, num(b, name)?))
    };
    let transaction_id = num(field(0, "transaction id")?, "transaction id")?;
    let (used_metadata_blocks, total_metadata_blocks) =
        ratio(field(1, "metadata blocks")?, "metadata blocks")?;
    let (used_data_blocks, total_data_blocks) = ratio(field(2, "data blocks")?, "data blocks")?;
    let held = field(3, "held metadata root")?;
    let held_metadata_root = match held {
        "-" => None,
        s => Some(num(s, "held metadata root")?),
    };
    let mode = match field(4, "mode")? {
        "rw" => PoolMode::ReadWrite,
        "ro" => PoolMode::ReadOnly,
        "out_of_data_space" => PoolMode::OutOfDataSpace,
        other => PoolMode::Other(other.to_owned()),
    };
    // Fields after the mode appeared over kernel versions; read
    // needs_check by value rather than by position.
    let needs_check = p.iter().skip(5).any(|&w| w == "needs_check");
    Ok(ThinPoolStatus {
        transaction_id,
        used_metadata_blocks,
        total_metadata_blocks,
        used_data_blocks,
        total_data_blocks,
        held_metadata_root,
        mode,
        needs_check,
    })
}

// ------------------------------------------------------------------ running commands

/// Failure of an LVM, device-mapper or thin-provisioning-tools operation.
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    /// The program could not be started (not installed? not root?).
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the command's output or waiting for it failed.
    #[error("reading the output of `{command}`")]
    Io {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr (trimmed, at most 64 KiB).
        stderr: String,
    },
    /// The command printed more than [`MAX_REPORT_BYTES`]; it was killed.
    #[error("`{command}` printed more than {limit} bytes; stopped it")]
    OutputTooLarge {
        /// The command line.
        command: String,
        /// The limit.
        limit: usize,
    },
    /// The `lvs` report could not be parsed.
    #[error("unexpected report from `{command}`")]
    Report {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: ReportError,
    },
    /// The `dmsetup status` output could not be parsed.
    #[error("unexpected status of device-mapper device {device}")]
    Status {
        /// Device-mapper name.
        device: String,
        /// Why.
        #[source]
        source: StatusError,
    },
    /// A bad volume spec, LV name or tag.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The LV does not exist.
    #[error("logical volume {lv} not found")]
    NotFound {
        /// `vg/lv`.
        lv: String,
    },
    /// The LV is not of the kind the operation needs.
    #[error("logical volume {lv} is not {expected}")]
    WrongKind {
        /// `vg/lv`.
        lv: String,
        /// What it should have been ("a thin volume", "a thick snapshot", ...).
        expected: &'static str,
    },
    /// The thick snapshot overflowed and is unusable: the cycle must fail
    /// and the snapshot be removed; a larger snapshot size (or a thin
    /// pool) avoids it next time.
    #[error("snapshot {lv} is invalid: its copy-on-write space filled up; remove it and retry with a larger snapshot size")]
    InvalidSnapshot {
        /// `vg/lv`.
        lv: String,
    },
    /// The thick snapshot is inactive, so its fill level is unknown.
    #[error("snapshot {lv} is not active")]
    InactiveSnapshot {
        /// `vg/lv`.
        lv: String,
    },
    /// Merging the snapshot into its origin failed.
    #[error("snapshot {lv} failed to merge into its origin")]
    MergeFailed {
        /// `vg/lv`.
        lv: String,
    },
    /// The pool already holds a metadata snapshot (kernel EBUSY). Either
    /// another process is reading it, or a crashed run left it:
    /// [`Lvm::release_stale_metadata_snap`] clears the latter.
    #[error("thin pool {pool} already holds a metadata snapshot (another snapsync running, or a stale hold: release it with `dmsetup message {dm_name} 0 release_metadata_snap`)")]
    MetadataSnapBusy {
        /// `vg/pool`.
        pool: String,
        /// Device-mapper name messages go to.
        dm_name: String,
    },
    /// `thin_delta` printed something this crate cannot parse.
    #[error("unexpected output from `{command}`")]
    ThinDelta {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: ThinDeltaError,
    },
    /// An argument is out of range (e.g. a zero snapshot size).
    #[error("invalid argument: {0}")]
    Argument(String),
}

/// What a successful command printed.
#[derive(Debug)]
struct Captured {
    stdout: Vec<u8>,
    #[allow(dead_code)] // kept for debugging and future warnings logging
    stderr: String,
}

/// Renders a command line for messages (arguments with spaces quoted).
fn render_command(program: &Path, args: &[OsString]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        let a = a.to_string_lossy();
        s.push(' ');
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Reads `r` to the end, keeping at most `cap` bytes: the child must be
/// able to write all of its stderr without blocking on a full pipe.
fn read_capped(mut r: impl Read, cap: usize) -> String {
    let mut kept = Vec::new();
    let _ = r.by_ref().take(cap as u64).read_to_end(&mut kept);
    let _ = io::copy(&mut r, &mut io::sink());
    String::from_utf8_lossy(&kept).trim().to_owned()
}

fn spawn_stderr_reader(child: &mut Child) -> Option<JoinHandle<String>> {
    child
        .stderr
        .take()
        .map(|e| std::thread::spawn(move || read_capped(e, MAX_STDERR_BYTES)))
}

fn join_stderr(h: Option<JoinHandle<String>>) -> String {
    h.and_then(|h| h.join().ok()).unwrap_or_default()
}

/// Runs LVM, device-mapper and thin-provisioning-tools commands.
///
/// Cheap to clone. The program paths default to `lvm`, `dmsetup` and
/// `thin_delta` looked up in `PATH`; tests can point them at fakes.
#[derive(Debug, Clone)]
pub struct Lvm {
    lvm: PathBuf,
    dmsetup: PathBuf,
    thin_delta: PathBuf,
}

impl Default for Lvm {
    fn default() -> Self {
        Lvm::new()
    }
}

/// The pieces of a thin pool that changed-block tracking needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ThinPool {
    /// The pool LV.
    pub lv: LvInfo,
    /// Device-mapper name of the `thin-pool` target: `vg-pool-tpool` while
    /// thin volumes use the pool, `vg-pool` for an unused pool (seen with
    /// LVM 2.03.16). Messages such as `reserve_metadata_snap` go here.
    pub dm_name: String,
    /// The pool's metadata device (`/dev/mapper/vg-pool_tmeta`), which
    /// `thin_delta -m` reads.
    pub tmeta_path: PathBuf,
}

impl ThinPool {
    /// `vg/pool`.
    pub fn lv_name(&self) -> LvName {
        self.lv.lv_name()
    }
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

impl Lvm {
    /// Uses `lvm`, `dmsetup` and `thin_delta` from `PATH`.
    pub fn new() -> Self {
        Lvm {
            lvm: "lvm".into(),
            dmsetup: "dmsetup".into(),
            thin_delta: "thin_delta".into(),
        }
    }

    /// Uses the given programs (e.g. absolute paths, or fakes in tests).
    /// `lvm` is called as `lvm lvs ...`, `lvm lvcreate ...`.
    pub fn with_programs(
        lvm: impl Into<PathBuf>,
        dmsetup: impl Into<PathBuf>,
        thin_delta: impl Into<PathBuf>,
    ) -> Self {
        Lvm {
            lvm: lvm.into(),
            dmsetup: dmsetup.into(),
            thin_delta: thin_delta.into(),
        }
    }

    fn command(program: &Path, args: &[OsString]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a command to completion; stdout bounded by
    /// [`MAX_REPORT_BYTES`].
    fn run(&self, program: &Path, args: &[OsString]) -> Result<Captured, LvmError> {
        let command = render_command(program, args);
        let mut child = Self::command(program, args)
            .spawn()
            .map_err(|source| LvmError::Spawn {
                command: command.clone(),
                source,
            })?;
        let stderr = spawn_stderr_reader(&mut child);
        let mut stdout = Vec::new();
        let read = child
            .stdout
            .take()
            .expect("stdout is piped")
            .take(MAX_REPORT_BYTES as u64 + 1)
            .read_to_end(&mut stdout);
        if stdout.len() > MAX_REPORT_BYTES {
            // Our own child: stop it rather than wait for it to finish.
            let _ = child.kill();
            let _ = child.wait();
            join_stderr(stderr);
            return Err(LvmError::OutputTooLarge {
                command,
                limit: MAX_REPORT_BYTES,
            });
        }
        let status = child.wait();
        let stderr = join_stderr(stderr);
        let status = status.map_err(|source| LvmError::Io {
            command: command.clone(),
            source,
        })?;
        read.map_err(|source| LvmError::Io {
            command: command.clone(),
            source,
        })?;
        if !status.success() {
            return Err(LvmError::Failed {
                command,
                status,
                stderr,
            });
        }
        Ok(Captured { stdout, stderr })
    }

    fn run_lvm(&self, args: Vec<OsString>) -> Result<Captured, LvmError> {
        self.run(&self.lvm, &args)
    }

    fn run_dmsetup(&self, args: Vec<OsString>) -> Result<Captured, LvmError> {
        self.run(&self.dmsetup, &args)
    }

    /// `lvm lvs` with the JSON options and [`LVS_FIELDS`]; `all` adds `-a`
    /// (hidden LVs).
    fn lvs(&self, all: bool, targets: &[String]) -> Result<Vec<LvInfo>, LvmError> {
        let mut args: Vec<OsString> = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix"]
            .iter()
            .map(os)
            .collect();
        args.push(os("-o"));
        args.push(os(LVS_FIELDS));
        if all {
            args.push(os("-a"));
        }
        // "--" so that no target can be taken as an option (names are
        // validated too; this is the second fence).
        args.push(os("--"));
        args.extend(targets.iter().map(os));
        let command = render_command(&self.lvm, &args);
        let out = self.run_lvm(args)?;
        parse_lvs_report(&out.stdout).map_err(|source| LvmError::Report { command, source })
    }

    /// Looks up one LV by name. Hidden LVs (`pool_tmeta`) are found too.
    pub fn lv(&self, name: &LvName) -> Result<LvInfo, LvmError> {
        let rows = match self.lvs(true, &[name.to_string()]) {
            Ok(rows) => rows,
            // lvs exits 5 with this message (LVM 2.03.16, LC_ALL=C); the
            // VG-missing case says 'Volume group "x" not found'.
            Err(LvmError::Failed { stderr, .. })
                if stderr.contains("Failed to find logical volume")
                    || (stderr.contains("Volume group") && stderr.contains("not found")) =>
            {
                return Err(LvmError::NotFound {
                    lv: name.to_string(),
                })
            }
            Err(e) => return Err(e),
        };
        rows.into_iter()
            .find(|r| r.vg == name.vg && r.name == name.lv)
            .ok_or_else(|| LvmError::NotFound {
                lv: name.to_string(),
            })
    }

    /// Resolves `vg/lv`, `/dev/vg/lv` or `/dev/mapper/vg-lv` to the LV's
    /// current report.
    pub fn resolve(&self, spec: &str) -> Result<LvInfo, LvmError> {
        self.lv(&LvName::parse(spec)?)
    }

    /// Every visible LV of `vg` carrying `tag` (e.g. this tool's
    /// snapshots, to clean up leftovers at start).
    pub fn list_tagged(&self, vg: &str, tag: &str) -> Result<Vec<LvInfo>, LvmError> {
        validate_name(vg)?;
        validate_tag(tag)?;
        // Filtering here rather than with `-S lv_tags=...` keeps LVM's
        // selection syntax (and its quoting) out of the picture.
        let mut rows = self.lvs(false, &[vg.to_owned()])?;
        rows.retain(|r| r.vg == vg && r.has_tag(tag));
        Ok(rows)
    }

    fn check_new(origin: &LvName, name: &str, tags: &[&str]) -> Result<LvName, LvmError> {
        validate_new_lv_name(name)?;
        for t in tags {
            validate_tag(t)?;
        }
        Ok(LvName::new(origin.vg(), name)?)
    }

    fn lvcreate_snapshot(
        &self,
        origin: &LvName,
        name: &str,
        size_bytes: Option<u64>,
        tags: &[&str],
    ) -> Result<(), LvmError> {
        let mut args = vec![os("lvcreate"), os("-s"), os("-n"), os(name)];
        if let Some(size) = size_bytes {
            args.push(os("-L"));
            args.push(os(format!("{size}b")));
        }
        for t in tags {
            args.push(os("--addtag"));
            args.push(os(t));
        }
        args.push(os("--"));
        args.push(os(origin.to_string()));
        self.run_lvm(args).map(drop)
    }

    /// Creates and activates a thin snapshot `name` of the thin volume
    /// `origin`, with `tags`.
    ///
    /// Thin snapshots are created with the activation-skip flag, and a
    /// plain `lvchange -ay` then silently does nothing (exit 0, still
    /// inactive; seen with LVM 2.03.16), hence `lvchange -ay -K`. If
    /// activation fails the new snapshot is removed again.
    pub fn create_thin_snapshot(
        &self,
        origin: &LvName,
        name: &str,
        tags: &[&str],
    ) -> Result<LvInfo, LvmError> {
        let snap = Self::check_new(origin, name, tags)?;
        let info = self.lv(origin)?;
        if !info.is_thin() {
            return Err(LvmError::WrongKind {
                lv: origin.to_string(),
                expected: "a thin volume",
            });
        }
        self.lvcreate_snapshot(origin, name, None, tags)?;
        let activate = vec![
            os("lvchange"),
            os("-ay"),
            os("-K"),
            os("--"),
            os(snap.to_string()),
        ];
        if let Err(e) = self.run_lvm(activate) {
            let _ = self.remove(&snap);
            return Err(e);
        }
        self.lv(&snap)
    }

    /// Creates a thick (copy-on-write) snapshot `name` of `origin` with
    /// `size_bytes` of COW space (LVM rounds it up to whole extents).
    /// Watch it with [`Lvm::snapshot_fill_percent`]: once full it becomes
    /// invalid.
    pub fn create_thick_snapshot(
        &self,
        origin: &LvName,
        name: &str,
        size_bytes: u64,
        tags: &[&str],
    ) -> Result<LvInfo, LvmError> {
        let snap = Self::check_new(origin, name, tags)?;
        if size_bytes == 0 {
            return Err(LvmError::Argument(
                "a thick snapshot needs a non-zero size".into(),
            ));
        }
        self.lvcreate_snapshot(origin, name, Some(size_bytes), tags)?;
        self.lv(&snap)
    }

    /// Removes an LV (`lvremove -f`). Taking an [`LvName`] rather than a
    /// string means a bare VG name, which would remove every LV in it,
    /// cannot get here.
    pub fn remove(&self, lv: &LvName) -> Result<(), LvmError> {
        self.run_lvm(vec![
            os("lvremove"),
            os("-f"),
            os("--"),
            os(lv.to_string()),
        ])
        .map(drop)
    }

    /// State of the thick snapshot `lv`.
    pub fn snapshot_state(&self, lv: &LvName) -> Result<SnapshotState, LvmError> {
        self.lv(lv)?
            .snapshot_state()
            .ok_or_else(|| LvmError::WrongKind {
                lv: lv.to_string(),
                expected: "a thick snapshot",
            })
    }

    /// How full (0–100) the COW space of the thick snapshot `lv` is. An
    /// invalid (overflowed) snapshot is an error
    /// ([`LvmError::InvalidSnapshot`]), as is an inactive one.
    pub fn snapshot_fill_percent(&self, lv: &LvName) -> Result<f64, LvmError> {
        match self.snapshot_state(lv)? {
            SnapshotState::Active { fill_percent } => Ok(fill_percent),
            SnapshotState::Invalid => Err(LvmError::InvalidSnapshot { lv: lv.to_string() }),
            SnapshotState::MergeFailed => Err(LvmError::MergeFailed { lv: lv.to_string() }),
            SnapshotState::Inactive => Err(LvmError::InactiveSnapshot { lv: lv.to_string() }),
        }
    }

    /// The pool of the thin volume `thin`, with its metadata device and
    /// the device-mapper name of its `thin-pool` target. The pool must be
    /// active.
    pub fn pool_of(&self, thin: &LvInfo) -> Result<ThinPool, LvmError> {
        let not_thin = || LvmError::WrongKind {
            lv: format!("{}/{}", thin.vg, thin.name),
            expected: "a thin volume",
        };
        let pool_name = thin.pool.as_deref().ok_or_else(not_thin)?;
        if !thin.is_thin() {
            return Err(not_thin());
        }
        let pool_lv = LvName::new(&thin.vg, pool_name)?;
        // One report of the whole VG gives the pool and its hidden
        // metadata LV together.
        let rows = self.lvs(true, &[thin.vg.clone()])?;
        let pool = rows
            .iter()
            .find(|r| r.vg == thin.vg && r.name == pool_name)
            .cloned()
            .ok_or_else(|| LvmError::NotFound {
                lv: pool_lv.to_string(),
            })?;
        if !pool.is_thin_pool() {
            return Err(LvmError::WrongKind {
                lv: pool_lv.to_string(),
                expected: "a thin pool",
            });
        }
        let meta_name = pool
            .metadata_lv
            .clone()
            .unwrap_or_else(|| format!("{pool_name}_tmeta"));
        let tmeta_path = rows
            .iter()
            .find(|r| r.vg == thin.vg && r.name == meta_name)
            .and_then(|r| r.dm_path.clone())
            .unwrap_or_else(|| {
                PathBuf::from("/dev/mapper").join(dm_name(&thin.vg, &meta_name, None))
            });
        let dm_name = self.pool_target_name(&pool_lv)?;
        Ok(ThinPool {
            lv: pool,
            dm_name,
            tmeta_path,
        })
    }

    /// LVM stacks a used pool as `vg-pool` (linear) over `vg-pool-tpool`
    /// (thin-pool) but activates an unused pool as `vg-pool` (thin-pool)
    /// alone; ask the kernel which one it is.
    fn pool_target_name(&self, pool: &LvName) -> Result<String, LvmError> {
        let top = pool.dm_name(None);
        let out = self.run_dmsetup(vec![os("status"), os("--"), os(&top)])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = parse_dm_status_line(&text).map_err(|source| LvmError::Status {
            device: top.clone(),
            source,
        })?;
        Ok(if line.target == "thin-pool" {
            top
        } else {
            pool.dm_name(Some("tpool"))
        })
    }

    /// Kernel status of the pool's `thin-pool` target.
    pub fn pool_status(&self, pool: &ThinPool) -> Result<ThinPoolStatus, LvmError> {
        let out = self.run_dmsetup(vec![os("status"), os("--"), os(&pool.dm_name)])?;
        parse_thin_pool_status(&String::from_utf8_lossy(&out.stdout)).map_err(|source| {
            LvmError::Status {
                device: pool.dm_name.clone(),
                source,
            }
        })
    }

    fn pool_message(&self, pool: &ThinPool, message: &str) -> Result<(), LvmError> {
        self.run_dmsetup(vec![
            os("message"),
            os("--"),
            os(&pool.dm_name),
            os("0"),
            os(message),
        ])
        .map(drop)
    }

    /// Reserves a metadata snapshot of the pool (`dmsetup message
    /// <pool>-tpool 0 reserve_metadata_snap`) so `thin_delta -m` can read a
    /// consistent copy of the live metadata. Only one can be held per pool;
    /// the kernel answers EBUSY otherwise ([`LvmError::MetadataSnapBusy`]).
    ///
    /// A held snapshot pins metadata blocks and must be released: use the
    /// returned guard's [`MetadataSnapHold::finish`].
    pub fn reserve_metadata_snap(&self, pool: &ThinPool) -> Result<MetadataSnapHold, LvmError> {
        match self.pool_message(pool, "reserve_metadata_snap") {
            Ok(()) => Ok(MetadataSnapHold {
                lvm: self.clone(),
                pool: pool.clone(),
                released: false,
            }),
            // "device-mapper: message ioctl on vg0-pool-tpool  failed:
            // Device or resource busy" (dmsetup 1.02.185).
            Err(LvmError::Failed { stderr, .. }) if stderr.contains("busy") => {
                Err(LvmError::MetadataSnapBusy {
                    pool: pool.lv_name().to_string(),
                    dm_name: pool.dm_name.clone(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Releases the pool's metadata snapshot. Fails (EINVAL, "Invalid
    /// argument") when none is held. Prefer [`MetadataSnapHold::finish`].
    pub fn release_metadata_snap(&self, pool: &ThinPool) -> Result<(), LvmError> {
        self.pool_message(pool, "release_metadata_snap")
    }

    /// Releases a metadata snapshot left held by a crashed run; returns
    /// whether there was one. The caller must know that no other process
    /// is using the pool's metadata snapshot right now (e.g. it holds the
    /// per-pool lock), since the kernel cannot say who reserved it.
    pub fn release_stale_metadata_snap(&self, pool: &ThinPool) -> Result<bool, LvmError> {
        if self.pool_status(pool)?.held_metadata_root.is_none() {
            return Ok(false);
        }
        self.release_metadata_snap(pool)?;
        Ok(true)
    }

    /// Starts `thin_delta -m --snap1 LEFT --snap2 RIGHT <tmeta>`, which
    /// reads the metadata snapshot `hold` keeps reserved (the borrow makes
    /// sure it stays reserved while the output is read). `left`/`right`
    /// are [`LvInfo::thin_id`]s. The ranges stream out of the returned
    /// [`ThinDeltaRun`].
    pub fn thin_delta<'h>(
        &self,
        hold: &'h MetadataSnapHold,
        left: u32,
        right: u32,
    ) -> Result<ThinDeltaRun<'h>, LvmError> {
        let args = vec![
            os("-m"),
            os("--snap1"),
            os(left.to_string()),
            os("--snap2"),
            os(right.to_string()),
            os(&hold.pool.tmeta_path),
        ];
        let command = render_command(&self.thin_delta, &args);
        let mut child = Self::command(&self.thin_delta, &args)
            .spawn()
            .map_err(|source| LvmError::Spawn {
                command: command.clone(),
                source,
            })?;
        let stderr = spawn_stderr_reader(&mut child);
        let stdout = BufReader::with_capacity(
            1 << 16,
            child.stdout.take().expect("stdout is piped"),
        );
        let mut run = ThinDeltaRun {
            command,
            child: Some(child),
            stderr,
            parser: None,
            _hold: hold,
        };
        match DeltaParser::new(stdout) {
            Ok(p) => {
                run.parser = Some(p);
                Ok(run)
            }
            // thin_delta prints nothing when it fails ("no current
            // metadata snap", "Unable to find mapping tree for snap2"):
            // its exit status and stderr say more than "truncated".
            Err(e) => Err(run.fail(e)),
        }
    }
}

/// A reserved metadata snapshot of a thin pool.
///
/// Call [`finish`](Self::finish) to release it and learn whether that
/// worked. Dropping it unfinished releases it on a best-effort basis
/// (errors are lost), which covers early returns and panics; a crash or
/// kill leaves it held, which [`Lvm::release_stale_metadata_snap`] clears.
#[derive(Debug)]
#[must_use = "a metadata snapshot stays reserved until released with finish()"]
pub struct MetadataSnapHold {
    lvm: Lvm,
    pool: ThinPool,
    released: bool,
}

impl MetadataSnapHold {
    /// The pool whose metadata snapshot is held.
    pub fn pool(&self) -> &ThinPool {
        &self.pool
    }

    /// The metadata device to pass to `thin_delta -m`.
    pub fn tmeta_path(&self) -> &Path {
        &self.pool.tmeta_path
    }

    /// Releases the metadata snapshot.
    pub fn finish(mut self) -> Result<(), LvmError> {
        self.released = true;
        self.lvm.release_metadata_snap(&self.pool)
    }
}

impl Drop for MetadataSnapHold {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.lvm.release_metadata_snap(&self.pool);
        }
    }
}

/// A running `thin_delta`, yielding its ranges as they are printed.
///
/// Iterate it to the end, then call [`finish`](Self::finish) to check the
/// exit status: a range list is complete only if both succeed. Dropping
/// it early kills the process.
#[derive(Debug)]
pub struct ThinDeltaRun<'h> {
    command: String,
    child: Option<Child>,
    stderr: Option<JoinHandle<String>>,
    parser: Option<DeltaParser<BufReader<ChildStdout>>>,
    _hold: &'h MetadataSnapHold,
}

impl ThinDeltaRun<'_> {
    /// Size of a data block (the pool's chunk) in bytes, from the
    /// superblock line; ranges count in these blocks.
    pub fn data_block_bytes(&self) -> u64 {
        self.parser
            .as_ref()
            .map(DeltaParser::data_block_bytes)
            .unwrap_or(0)
    }

    /// The parser, for the superblock and diff header.
    pub fn parser(&self) -> Option<&DeltaParser<BufReader<ChildStdout>>> {
        self.parser.as_ref()
    }

    /// Waits for `thin_delta` and reports a failure exit. Call after the
    /// iterator returned `None`.
    pub fn finish(mut self) -> Result<(), LvmError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // Drain anything left so the child can exit; the parser already
        // consumed everything up to EOF when iterated to the end.
        if let Some(p) = self.parser.take() {
            let _ = io::copy(&mut p.into_inner(), &mut io::sink());
        }
        let status = child.wait().map_err(|source| LvmError::Io {
            command: self.command.clone(),
            source,
        })?;
        let stderr = join_stderr(self.stderr.take());
        if status.success() {
            Ok(())
        } else {
            Err(LvmError::Failed {
                command: self.command.clone(),
                status,
                stderr,
            })
        }
    }

    /// Turns a parse error into the command's own failure when it has one.
    fn fail(&mut self, err: ThinDeltaError) -> LvmError {
        self.parser = None;
        if let Some(mut child) = self.child.take() {
            // Output that ended early means thin_delta closed its stdout,
            // i.e. is exiting: its status and stderr ("no current metadata
            // snap", "Unable to find mapping tree for snap2 (99)") explain
            // more than "truncated". Anything else: stop reading, stop it.
            let status = if matches!(err, ThinDeltaError::Truncated { .. }) {
                child.wait().ok()
            } else {
                let _ = child.kill();
                let _ = child.wait();
                None
            };
            let stderr = join_stderr(self.stderr.take());
            if let Some(status) = status.filter(|s| !s.success()) {
                return LvmError::Failed {
                    command: self.command.clone(),
                    status,
                    stderr,
                };
            }
        }
        LvmError::ThinDelta {
            command: self.command.clone(),
            source: err,
        }
    }
}

impl Iterator for ThinDeltaRun<'_> {
    type Item = Result<DeltaRange, LvmError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.parser.as_mut()?.next()? {
            Ok(r) => Some(Ok(r)),
            Err(e) => Some(Err(self.fail(e))),
        }
    }
}

impl Drop for ThinDeltaRun<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        join_stderr(self.stderr.take());
    }
}

#[cfg(test)]
mod tests {}
