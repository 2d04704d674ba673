//! The TOML configuration of `snapsync run` and `snapsync status`.
//!
//! ```toml
//! state_dir = "/var/lib/snapsync"     # source-side state: bases, last results
//! parallel = 2                        # volumes replicated at once
//!
//! [defaults]                          # any volume key may be set here
//! interval = "15m"
//! compress = "zstd:3"
//!
//! [[volume]]
//! name = "data"                       # unique; names state files and snapshots
//! source = "vg0/data"                 # LVM vg/lv, /dev/vg/lv, a device or an image file
//! target = "backup.example:/dev/vg1/data"
//! snapshot = "auto"                   # auto | lvm | reflink | none
//!
//! [[volume]]
//! name = "db"                         # several targets: the source is read once
//! source = "vg0/db"
//! target = ["b1:/dev/vg1/db", "rbd:backup/db"]
//! keep_bases = 2                      # thin CBT bases kept for targets behind
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::exit::UsageError;

/// Largest config file read: a config is small; refuse anything else.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    #[serde(default)]
    pub defaults: VolumeDefaults,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Prometheus textfile-collector file `run` rewrites after each pass.
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(crate::state::DEFAULT_STATE_DIR)
}

fn default_parallel() -> usize {
    2
}

/// Settings a volume inherits unless it sets its own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDefaults {
    pub interval: Option<String>,
    pub compress: Option<String>,
    pub block_size: Option<String>,
    pub scrub_every: Option<u64>,
    pub rsh: Option<String>,
    pub remote_bin: Option<String>,
    pub journal_max: Option<String>,
    pub snapshot: Option<String>,
    pub snapshot_size: Option<String>,
    pub target_state_dir: Option<PathBuf>,
    pub target_snapshot: Option<bool>,
    /// Bytes per second each side may send, rsync's units ("20M", "500").
    pub bwlimit: Option<String>,
    /// Keep a digest map of what was sent and compare against it (default
    /// true; volumes with thin changed-block tracking do not use it).
    pub digest_map: Option<bool>,
    /// ceph.conf and cephx id for `rbd:` targets (on the gateway for
    /// `host:rbd:…`), and the generation snapshots they keep.
    pub ceph_conf: Option<PathBuf>,
    pub ceph_id: Option<String>,
    pub keep_generations: Option<u32>,
    /// Fan-out: thin snapshots kept as changed-block bases for targets
    /// that hold different generations (default 2).
    pub keep_bases: Option<u32>,
    /// Fan-out: what the shared read holds for the slowest target before
    /// it is dropped from the cycle (default 64MiB).
    pub fanout_buffer: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    pub source: String,
    pub target: Targets,
    #[serde(flatten)]
    pub settings: VolumeDefaults,
}

/// `target = "…"` or `target = ["…", "…"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    One(String),
    Many(Vec<String>),
}

/// How the source is frozen for a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// LVM for LVM volumes, reflink for image files.
    Auto,
    Lvm,
    Reflink,
    /// Read the live source (the copy may be inconsistent if it is written).
    None,
}

/// A volume's settings with defaults applied and values parsed.
#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    pub source: String,
    /// One or more, distinct; the first is the volume's primary target
    /// (its state file is the volume's own, as with one target).
    pub targets: Vec<String>,
    pub interval: Duration,
    pub compress: String,
    pub block_size: u64,
    /// Every Nth cycle is a full scan even when changed-block tracking
    /// could be used (0: never).
    pub scrub_every: u64,
    pub rsh: String,
    pub remote_bin: String,
    pub journal_max: u64,
    pub snapshot: SnapshotKind,
    /// Size of a thick LVM snapshot: bytes, or a percentage of the origin.
    pub snapshot_size: SnapshotSize,
    pub target_state_dir: Option<PathBuf>,
    /// Thin-LV target: snapshot it as the rollback point instead of journaling.
    pub target_snapshot: bool,
    /// Bytes per second each side may send (0: no limit).
    pub bwlimit: u64,
    /// Use the source's digest map (see `engine::map`).
    pub digest_map: bool,
    pub ceph_conf: Option<PathBuf>,
    pub ceph_id: Option<String>,
    pub keep_generations: Option<u32>,
    pub keep_bases: usize,
    pub fanout_buffer: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SnapshotSize {
    Bytes(u64),
    Percent(f64),
}

impl SnapshotSize {
    pub fn for_origin(self, origin: u64) -> u64 {
        match self {
            SnapshotSize::Bytes(b) => b,
            SnapshotSize::Percent(p) => ((origin as f64) * p / 100.0).ceil() as u64,
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<(Config, Vec<Volume>)> {
    let unreadable =
        |e: std::io::Error| UsageError(format!("reading config {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(UsageError(format!("config {} is larger than 1 MiB", path.display())).into());
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    parse(&text).map_err(|e| UsageError(format!("config {}: {e:#}", path.display())).into())
}

/// Parses config text; every error names the volume and key.
pub fn parse(text: &str) -> Result<(Config, Vec<Volume>)> {
    let cfg: Config = toml::from_str(text)?;
    if cfg.parallel == 0 {
        anyhow::bail!("parallel must be at least 1");
    }
    let mut seen = HashSet::new();
    let mut volumes = Vec::new();
    for v in &cfg.volumes {
        if !seen.insert(v.name.clone()) {
            anyhow::bail!("volume name {:?} appears twice", v.name);
        }
        if v.name.is_empty()
            || !v
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b))
        {
            anyhow::bail!(
                "volume name {:?}: use letters, digits, '_', '.', '+', '-'",
                v.name
            );
        }
        volumes.push(resolve(v, &cfg.defaults).with_context(|| format!("volume {:?}", v.name))?);
    }
    Ok((cfg, volumes))
}

/// "20%" (of the origin's size) or a size such as "8GiB".
pub fn parse_snapshot_size(text: &str) -> Result<SnapshotSize> {
    Ok(match text.strip_suffix('%') {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(p) if p > 0.0 && p <= 100.0 => SnapshotSize::Percent(p),
            _ => anyhow::bail!("snapshot_size {text:?}: a percentage must be in (0, 100]"),
        },
        None => SnapshotSize::Bytes(
            crate::cli::parse_size(text).map_err(|e| anyhow::anyhow!("snapshot_size: {e}"))?,
        ),
    })
}

fn resolve(v: &VolumeConfig, d: &VolumeDefaults) -> Result<Volume> {
    let s = &v.settings;
    let pick = |a: &Option<String>, b: &Option<String>, dflt: &str| {
        a.clone().or(b.clone()).unwrap_or(dflt.into())
    };
    let interval = pick(&s.interval, &d.interval, "15m");
    let interval =
        humantime::parse_duration(&interval).with_context(|| format!("interval {interval:?}"))?;
    let size = |key: &str, val: String| {
        crate::cli::parse_size(&val).map_err(|e| anyhow::anyhow!("{key}: {e}"))
    };
    let snapshot = match pick(&s.snapshot, &d.snapshot, "auto").as_str() {
        "auto" => SnapshotKind::Auto,
        "lvm" => SnapshotKind::Lvm,
        "reflink" => SnapshotKind::Reflink,
        "none" => SnapshotKind::None,
        other => anyhow::bail!("snapshot {other:?}: use auto, lvm, reflink or none"),
    };
    let snapshot_size = parse_snapshot_size(&pick(&s.snapshot_size, &d.snapshot_size, "20%"))?;
    let compress = pick(&s.compress, &d.compress, "auto");
    crate::cli::parse_compress(&compress, true)?;
    let block_size = size("block_size", pick(&s.block_size, &d.block_size, "64KiB"))?;
    blockdiff::BlockSize::new(block_size)?;
    let targets = match &v.target {
        Targets::One(t) => vec![t.clone()],
        Targets::Many(t) => t.clone(),
    };
    if targets.is_empty() {
        anyhow::bail!("target: name at least one");
    }
    for (i, t) in targets.iter().enumerate() {
        crate::transport::Destination::parse(t)?;
        if targets[..i].contains(t) {
            anyhow::bail!("target {t:?} appears twice");
        }
    }
    Ok(Volume {
        name: v.name.clone(),
        source: v.source.clone(),
        targets,
        interval,
        compress,
        block_size,
        scrub_every: s.scrub_every.or(d.scrub_every).unwrap_or(0),
        rsh: pick(&s.rsh, &d.rsh, crate::transport::DEFAULT_RSH),
        remote_bin: pick(&s.remote_bin, &d.remote_bin, "snapsync"),
        journal_max: size("journal_max", pick(&s.journal_max, &d.journal_max, "1GiB"))?,
        snapshot,
        snapshot_size,
        target_state_dir: s.target_state_dir.clone().or(d.target_state_dir.clone()),
        target_snapshot: s.target_snapshot.or(d.target_snapshot).unwrap_or(false),
        bwlimit: crate::bwlimit::parse_rate(&pick(&s.bwlimit, &d.bwlimit, "0"))
            .map_err(|e| anyhow::anyhow!("bwlimit: {e}"))?,
        digest_map: s.digest_map.or(d.digest_map).unwrap_or(true),
        ceph_conf: s.ceph_conf.clone().or(d.ceph_conf.clone()),
        ceph_id: s.ceph_id.clone().or(d.ceph_id.clone()),
        keep_generations: match s.keep_generations.or(d.keep_generations) {
            Some(0) => anyhow::bail!("keep_generations must be at least 1"),
            k => k,
        },
        keep_bases: match s.keep_bases.or(d.keep_bases).unwrap_or(2) {
            0 => anyhow::bail!("keep_bases must be at least 1"),
            k => k as usize,
        },
        fanout_buffer: size(
            "fanout_buffer",
            pick(&s.fanout_buffer, &d.fanout_buffer, "64MiB"),
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_target_or_several() {
        let (_, vols) = parse(
            r#"
            [[volume]]
            name = "a"
            source = "/img/a"
            target = "/r/a"
            [[volume]]
            name = "b"
            source = "/img/b"
            target = ["h:/dev/vg/b", "rbd:backup/b"]
            keep_bases = 3
            fanout_buffer = "256MiB"
            "#,
        )
        .unwrap();
        assert_eq!(vols[0].targets, ["/r/a"]);
        assert_eq!((vols[0].keep_bases, vols[0].fanout_buffer), (2, 64 << 20));
        assert_eq!(vols[1].targets, ["h:/dev/vg/b", "rbd:backup/b"]);
        assert_eq!((vols[1].keep_bases, vols[1].fanout_buffer), (3, 256 << 20));
        let bad = |targets: &str| {
            let text = format!("[[volume]]\nname = \"v\"\nsource = \"/s\"\ntarget = {targets}\n");
            format!("{:#}", parse(&text).unwrap_err())
        };
        assert!(bad("[]").contains("at least one"), "{}", bad("[]"));
        assert!(bad(r#"["/a", "/a"]"#).contains("twice"));
        assert!(
            bad(r#"["/a", "rbd:"]"#).contains("rbd"),
            "{}",
            bad(r#"["/a", "rbd:"]"#)
        );
        let text = "[[volume]]\nname = \"v\"\nsource = \"/s\"\ntarget = \"/t\"\nkeep_bases = 0\n";
        assert!(format!("{:#}", parse(text).unwrap_err()).contains("keep_bases"));
    }

    #[test]
    fn rbd_targets_and_their_ceph_keys() {
        let (_, vols) = parse(
            r#"
            [defaults]
            ceph_conf = "/etc/ceph/backup.conf"
            ceph_id = "snapsync"
            [[volume]]
            name = "a"
            source = "/img/a"
            target = "rbd:backup/a"
            keep_generations = 3
            [[volume]]
            name = "b"
            source = "/img/b"
            target = "gw:rbd:backup/ns/b"
            "#,
        )
        .unwrap();
        assert_eq!(
            vols[0].ceph_conf.as_deref(),
            Some(Path::new("/etc/ceph/backup.conf"))
        );
        assert_eq!(vols[0].ceph_id.as_deref(), Some("snapsync"));
        assert_eq!(vols[0].keep_generations, Some(3));
        assert_eq!(vols[1].keep_generations, None);
        for bad in [
            "target = \"rbd:backup\"",
            "target = \"rbd:b/a\"\nkeep_generations = 0",
        ] {
            let text = format!("[[volume]]\nname = \"a\"\nsource = \"/a\"\n{bad}\n");
            assert!(parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_apply_and_volumes_override() {
        let (cfg, vols) = parse(
            r#"
            state_dir = "/tmp/s"
            [defaults]
            interval = "5m"
            compress = "zstd:5"
            [[volume]]
            name = "a"
            source = "vg0/a"
            target = "h:/dev/vg1/a"
            [[volume]]
            name = "b"
            source = "/img/b"
            target = "/backup/b"
            interval = "1h"
            snapshot = "none"
            snapshot_size = "1GiB"
            bwlimit = "20M"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.state_dir, Path::new("/tmp/s"));
        assert_eq!(vols[0].interval, Duration::from_secs(300));
        assert_eq!(vols[0].compress, "zstd:5");
        assert_eq!(vols[0].snapshot_size, SnapshotSize::Percent(20.0));
        assert_eq!(vols[1].interval, Duration::from_secs(3600));
        assert_eq!(vols[1].snapshot, SnapshotKind::None);
        assert_eq!(vols[1].snapshot_size.for_origin(5), 1 << 30);
        assert_eq!(vols[0].bwlimit, 0);
        assert_eq!(vols[1].bwlimit, 20 << 20);
        assert!(
            parse("bwlimit = \"1M\"").is_err(),
            "a volume key, not a top-level one"
        );
        let (cfg, _) = parse("metrics_file = \"/m/snapsync.prom\"").unwrap();
        assert_eq!(
            cfg.metrics_file.as_deref(),
            Some(Path::new("/m/snapsync.prom"))
        );
    }

    #[test]
    fn errors_name_the_volume_and_key() {
        let e = parse("[[volume]]\nname=\"x\"\nsource=\"a\"\ntarget=\"b\"\ninterval=\"soon\"")
            .unwrap_err();
        assert!(format!("{e:#}").contains("volume \"x\""), "{e:#}");
        assert!(format!("{e:#}").contains("interval"), "{e:#}");
        assert!(parse("bogus = 1").is_err());
        let dup = "[[volume]]\nname=\"x\"\nsource=\"a\"\ntarget=\"b\"\n[[volume]]\nname=\"x\"\nsource=\"a\"\ntarget=\"b\"";
        assert!(format!("{:#}", parse(dup).unwrap_err()).contains("twice"));
        assert!(parse("[[volume]]\nname=\"../x\"\nsource=\"a\"\ntarget=\"b\"").is_err());
    }

    #[test]
    fn snapshot_sizes() {
        assert_eq!(
            parse_snapshot_size("20%").unwrap(),
            SnapshotSize::Percent(20.0)
        );
        assert_eq!(
            parse_snapshot_size("8MiB").unwrap(),
            SnapshotSize::Bytes(8 << 20)
        );
        assert!(parse_snapshot_size("0%").is_err());
        assert!(parse_snapshot_size("150%").is_err());
        assert!(parse_snapshot_size("lots").is_err());
    }

    #[test]
    fn parse_never_panics() {
        use proptest::prelude::*;
        proptest!(|(s in ".{0,300}")| {
            let _ = parse(&s);
        });
    }
}
