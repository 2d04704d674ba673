//! Prometheus metrics in the textfile-collector format (node_exporter's
//! `--collector.textfile.directory`), written by `run` (config
//! `metrics_file`) and `sync --metrics-file`.
//!
//! The file is replaced atomically (temporary file in the same directory,
//! fsync, rename, fsync of the directory) while holding `FILE.lock`, so a
//! collector never reads a torn file and two runs never interleave. Every
//! configured volume is listed from its state file, also when a pass
//! cycled only the due ones.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::fs::{flock, FlockOperation};

use crate::job::SourceState;

/// One volume's series.
#[derive(Debug, Clone, Copy)]
pub struct VolumeMetrics<'a> {
    pub volume: &'a str,
    pub target: &'a str,
    /// The configured interval (`run`); none for a one-off `sync`.
    pub interval: Option<Duration>,
    pub state: &'a SourceState,
}

type Samples = Vec<(Vec<(&'static str, String)>, f64)>;

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: fn(&VolumeMetrics, u64) -> Samples,
}

fn one(v: Option<f64>) -> Samples {
    v.map(|v| vec![(vec![], v)]).unwrap_or_default()
}

/// One sample per value of `label` whose count is known.
fn per_label(label: &'static str, counts: [(&str, Option<u64>); 2]) -> Samples {
    counts
        .into_iter()
        .filter_map(|(value, n)| n.map(|n| (vec![(label, value.to_owned())], n as f64)))
        .collect()
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

const FAMILIES: &[Family] = &[
    Family {
        name: "snapsync_last_success_timestamp_seconds",
        kind: "gauge",
        help: "Unix time the last successful cycle started (0: never).",
        samples: |v, _| one(Some(v.state.last_success.unwrap_or(0) as f64)),
    },
    Family {
        name: "snapsync_last_attempt_timestamp_seconds",
        kind: "gauge",
        help: "Unix time the last cycle started (0: never).",
        samples: |v, _| one(Some(v.state.last_attempt.unwrap_or(0) as f64)),
    },
    Family {
        name: "snapsync_replica_timestamp_seconds",
        kind: "gauge",
        help: "Unix time of the snapshot the replica holds (0: no complete replica).",
        samples: |v, _| one(Some(v.state.last_snapshot_time.unwrap_or(0) as f64)),
    },
    Family {
        name: "snapsync_replica_lag_seconds",
        kind: "gauge",
        help: "Age of the replica's content when this file was written.",
        samples: |v, now| {
            one(v
                .state
                .last_snapshot_time
                .map(|t| now.saturating_sub(t) as f64))
        },
    },
    Family {
        name: "snapsync_interval_seconds",
        kind: "gauge",
        help: "Configured replication interval.",
        samples: |v, _| one(v.interval.map(|i| i.as_secs_f64())),
    },
    Family {
        name: "snapsync_last_cycle_duration_seconds",
        kind: "gauge",
        help: "Wall time of the last cycle, successful or not.",
        samples: |v, _| one(v.state.last_duration_seconds),
    },
    Family {
        name: "snapsync_last_read_bytes",
        kind: "gauge",
        help: "Bytes read from the volume on each side by the last successful cycle.",
        samples: |v, _| {
            let s = v.state;
            per_label(
                "side",
                [
                    ("source", s.last_source_bytes_read),
                    ("target", s.last_target_bytes_read),
                ],
            )
        },
    },
    Family {
        name: "snapsync_last_wire_bytes",
        kind: "gauge",
        help: "Bytes on the wire in each direction in the last successful cycle.",
        samples: |v, _| {
            let s = v.state;
            per_label(
                "direction",
                [
                    ("sent", s.last_wire_bytes_sent),
                    ("received", s.last_wire_bytes_received),
                ],
            )
        },
    },
    Family {
        name: "snapsync_last_changed_bytes",
        kind: "gauge",
        help: "Bytes that differed (shipped as data or zeroes) in the last successful cycle.",
        samples: |v, _| one(v.state.last_changed_bytes.map(|b| b as f64)),
    },
    Family {
        name: "snapsync_last_mode",
        kind: "gauge",
        help: "Mode of the last successful cycle (full-scan, delta), as a label; the value is 1.",
        samples: |v, _| {
            v.state
                .last_mode
                .iter()
                .map(|m| (vec![("mode", m.clone())], 1.0))
                .collect()
        },
    },
    Family {
        name: "snapsync_last_exit_code",
        kind: "gauge",
        help: "Exit code of the last cycle (0: success; see the README's exit codes).",
        samples: |v, _| one(v.state.last_exit.map(f64::from)),
    },
    Family {
        name: "snapsync_generation",
        kind: "gauge",
        help: "Generation number the replica holds.",
        samples: |v, _| one(v.state.generation.map(|g| g as f64)),
    },
    Family {
        name: "snapsync_replica_inconsistent",
        kind: "gauge",
        help:
            "1 while the replica may be a mix of two generations (an in-place copy not finished).",
        samples: |v, _| one(v.state.replica_inconsistent.map(flag)),
    },
    Family {
        name: "snapsync_resume_in_progress",
        kind: "gauge",
        help: "1 when an interrupted in-place copy waits to be resumed.",
        samples: |v, _| one(v.state.resume_in_progress.map(flag)),
    },
    Family {
        name: "snapsync_cycles_total",
        kind: "counter",
        help: "Cycles started.",
        samples: |v, _| one(Some(v.state.cycles as f64)),
    },
    Family {
        name: "snapsync_cycle_failures_total",
        kind: "counter",
        help: "Cycles that failed.",
        samples: |v, _| one(Some(v.state.failures as f64)),
    },
    Family {
        name: "snapsync_wire_bytes_total",
        kind: "counter",
        help: "Bytes on the wire, both directions, of all successful cycles.",
        samples: |v, _| one(Some(v.state.wire_bytes_total as f64)),
    },
];

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics file's text for `volumes` at Unix time `now`.
pub fn render(volumes: &[VolumeMetrics], now: u64) -> String {
    let mut out = String::new();
    for f in FAMILIES {
        let mut lines = Vec::new();
        for v in volumes {
            for (extra, value) in (f.samples)(v, now) {
                let mut labels = format!(
                    "volume=\"{}\",target=\"{}\"",
                    escape(v.volume),
                    escape(v.target)
                );
                for (k, val) in extra {
                    labels.push_str(&format!(",{k}=\"{}\"", escape(&val)));
                }
                lines.push(format!("{}{{{labels}}} {value}\n", f.name));
            }
        }
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "# HELP {} {}\n# TYPE {} {}\n",
            f.name, f.help, f.name, f.kind
        ));
        out.extend(lines);
    }
    out.push_str(
        "# HELP snapsync_metrics_written_timestamp_seconds Unix time this file was written.\n\
         # TYPE snapsync_metrics_written_timestamp_seconds gauge\n",
    );
    out.push_str(&format!(
        "snapsync_metrics_written_timestamp_seconds {now}\n"
    ));
    out
}

/// Replaces `path` with `text` atomically, under `PATH.lock`.
pub fn write(path: &Path, text: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("metrics file {} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // Waits for another run writing the same file: both write whole files.
    flock(lock.as_fd(), FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    // The temporary name does not end in .prom: the collector skips it.
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = write_replacing(&tmp, path, text.as_bytes(), &dir);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    drop(lock);
    result
}

fn write_replacing(tmp: &Path, path: &Path, bytes: &[u8], dir: &Path) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    crate::state::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_once_with_labels() {
        let done = SourceState {
            cycles: 3,
            last_attempt: Some(1000),
            last_success: Some(1000),
            last_snapshot_time: Some(1000),
            generation: Some(2),
            last_mode: Some("delta".into()),
            last_exit: Some(0),
            last_duration_seconds: Some(1.5),
            last_wire_bytes_sent: Some(10),
            last_wire_bytes_received: Some(20),
            replica_inconsistent: Some(false),
            ..Default::default()
        };
        let never = SourceState::default();
        let text = render(
            &[
                VolumeMetrics {
                    volume: "a",
                    target: "h:/dev/x\"y",
                    interval: Some(Duration::from_secs(900)),
                    state: &done,
                },
                VolumeMetrics {
                    volume: "b",
                    target: "/b",
                    interval: Some(Duration::from_secs(60)),
                    state: &never,
                },
            ],
            1060,
        );
        assert!(text
            .contains("snapsync_replica_lag_seconds{volume=\"a\",target=\"h:/dev/x\\\"y\"} 60\n"));
        assert!(text
            .contains("snapsync_last_success_timestamp_seconds{volume=\"b\",target=\"/b\"} 0\n"));
        assert!(text.contains(
            "snapsync_last_cycle_duration_seconds{volume=\"a\",target=\"h:/dev/x\\\"y\"} 1.5\n"
        ));
        assert!(text.contains(",direction=\"received\"} 20\n"));
        assert!(text.contains(",mode=\"delta\"} 1\n"));
        assert_eq!(
            text.matches("# TYPE snapsync_cycles_total counter").count(),
            1
        );
        assert_eq!(text.matches("snapsync_interval_seconds{").count(), 2);
    }

    #[test]
    fn write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snapsync.prom");
        write(&p, "x 1\n").unwrap();
        write(&p, "x 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x 2\n");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["snapsync.prom", "snapsync.prom.lock"]);
    }
}
