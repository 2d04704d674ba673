//! `snapsync sync` and `snapsync verify`: one session from a source volume
//! to a local or remote replica.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use blockdiff::BlockSize;
use snapshot::{Access, FileVolume, Volume};
use wire::Mode;

use crate::cli::{parse_compress, SyncArgs, TransferArgs, VerifyArgs};
use crate::engine::fanout::{self, Fanout};
use crate::engine::source::{self, Change, ReplicaAfter, Report, SessionParams, SyncError};
use crate::engine::Cancel;
use crate::exit::{Coded, Exit, UsageError};
use crate::progress::Progress;
use crate::state::DEFAULT_STATE_DIR;
use crate::transport::{self, Destination};

pub fn sync(a: SyncArgs) -> Result<Exit> {
    let dests = a
        .dst
        .iter()
        .map(|d| Destination::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(d) = a
        .dst
        .iter()
        .enumerate()
        .find_map(|(i, d)| a.dst[..i].contains(d).then_some(d))
    {
        return Err(UsageError(format!("{d} is named twice")).into());
    }
    let cancel = super::cancel_on_signals()?;
    let started = std::time::Instant::now();
    let file = open_source_file(&a.src, !a.transfer.keep_cache);
    let (outcomes, read_once) = match file {
        Err(e) => {
            // Every target failed alike; its metrics say so.
            if let (Some(path), false) = (&a.metrics_file, a.dry_run) {
                let outcomes: Vec<_> = a
                    .dst
                    .iter()
                    .map(|d| {
                        let copy = Coded {
                            exit: crate::exit::classify(&e),
                            message: format!("{e:#}"),
                        };
                        Outcome::of(d, Err(copy.into()), None, false)
                    })
                    .collect();
                if let Err(m) = write_metrics(path, &a, &outcomes, started) {
                    tracing::error!("{}", crate::cli::one_line(&format!("{m:#}")));
                }
            }
            return Err(e);
        }
        Ok(file) => fan_out(
            mapped_source(&file),
            &a.dst,
            a.fanout_buffer,
            |i, source, after| sync_one(&a, &dests[i], source, &cancel, after),
        ),
    };
    if let (Some(path), false) = (&a.metrics_file, a.dry_run) {
        if let Err(e) = write_metrics(path, &a, &outcomes, started) {
            if outcomes.iter().all(|o| o.result.is_ok()) {
                return Err(e);
            }
            // The session's own failure is the one to report.
            tracing::error!("{}", crate::cli::one_line(&format!("{e:#}")));
        }
    }
    let verb = if a.dry_run { "would send" } else { "synced" };
    let Some(read_once) = read_once else {
        let o = outcomes.into_iter().next().expect("one target");
        let report = o.result?;
        print_report(&report, &a.transfer, verb, "");
        if a.verify && !a.dry_run {
            verify_after(&a, &dests[0], &a.dst[0], &cancel)?;
        }
        return Ok(Exit::Ok);
    };
    // Fan-out: a line per target, or one JSON object with all of them.
    let size = outcomes
        .iter()
        .find_map(|o| o.result.as_ref().ok().map(|r| r.volume_bytes));
    if a.transfer.json {
        let targets: Vec<_> = outcomes.iter().map(crate::job::TargetResult::of).collect();
        let doc = serde_json::json!({
            "volume_bytes": size,
            "source_bytes_read": read_once,
            "elapsed_seconds": started.elapsed().as_secs_f64(),
            "targets": targets,
        });
        crate::cli::print_line(&doc.to_string());
    }
    let mut first_failure = None;
    for (o, dest) in outcomes.into_iter().zip(&dests) {
        let label = format!("{}: ", o.target);
        if o.left_behind && !a.transfer.json && !a.transfer.quiet {
            eprintln!(
                "{label}note: too slow to share the others' read; read the source on its own"
            );
        }
        match o.result {
            Ok(report) => {
                if !a.transfer.json {
                    print_report(&report, &a.transfer, verb, &label);
                }
                if a.verify && !a.dry_run {
                    if let Err(e) = verify_after(&a, dest, &o.target, &cancel) {
                        eprintln!("{label}{}", crate::cli::one_line(&format!("{e:#}")));
                        first_failure.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                eprintln!("{label}failed: {}", crate::cli::one_line(&format!("{e:#}")));
                first_failure.get_or_insert(e);
            }
        }
    }
    if !a.transfer.quiet && !a.transfer.json {
        eprintln!(
            "source read once for {} targets: {}",
            dests.len(),
            crate::cli::iec(read_once)
        );
    }
    // Each failure is told above; the exit code is the first one's.
    Ok(first_failure.map_or(Exit::Ok, |e| crate::exit::classify(&e)))
}

/// One target's outcome of a session.
#[derive(Debug)]
pub struct Outcome {
    pub target: String,
    pub result: Result<Report>,
    /// What the replica is after a failure (see [`source::run`]).
    pub after: Option<ReplicaAfter>,
    /// The others went on without it (it was too slow to share their
    /// read) and it read the source on its own.
    pub left_behind: bool,
}

/// One session per target from `source`: with one target, on this
/// thread; with several, at once, reading the source once through a
/// [`Fanout`] holding at most `buffer` bytes for the slowest. `session`
/// runs target `i`'s session from the volume it is given. Returns each
/// target's outcome and, for a fan-out, the bytes the source really read.
pub fn fan_out<F>(
    source: Arc<dyn Volume>,
    targets: &[String],
    buffer: u64,
    session: F,
) -> (Vec<Outcome>, Option<u64>)
where
    F: Fn(usize, Arc<dyn Volume>, &mut Option<ReplicaAfter>) -> Result<Report> + Sync,
{
    if targets.len() == 1 {
        let mut after = None;
        let r = session(0, source, &mut after);
        return (vec![Outcome::of(&targets[0], r, after, false)], None);
    }
    let fan = Fanout::new(source, targets.len(), buffer, fanout::DEFAULT_GRACE);
    let outcomes = std::thread::scope(|s| {
        let threads: Vec<_> = fan
            .handles()
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let session = &session;
                s.spawn(move || {
                    let mut after = None;
                    let r = session(i, h.clone(), &mut after);
                    h.finish();
                    (r, after, h.left_behind())
                })
            })
            .collect();
        threads
            .into_iter()
            .zip(targets)
            .map(|(t, name)| {
                let (r, after, behind) = t.join().expect("a target's session panicked");
                Outcome::of(name, r, after, behind)
            })
            .collect()
    });
    (outcomes, Some(fan.bytes_read()))
}

impl Outcome {
    fn of(
        target: &str,
        result: Result<Report>,
        after: Option<ReplicaAfter>,
        left_behind: bool,
    ) -> Self {
        Self {
            target: target.to_owned(),
            result,
            after,
            left_behind,
        }
    }
}

/// One session of `sync` from `scanned` (the source, or this target's
/// view of a fan-out's read) to `dest`.
fn sync_one(
    a: &SyncArgs,
    dest: &Destination,
    scanned: Arc<dyn Volume>,
    cancel: &Cancel,
    after: &mut Option<ReplicaAfter>,
) -> Result<Report> {
    let mut params = session_params(&a.src, dest, &a.transfer, scanned.as_ref())?;
    params.compress = parse_compress(&a.compress, matches!(dest, Destination::Remote { .. }))?;
    params.dry_run = a.dry_run;
    params.force = a.force;
    params.resume = !a.no_resume;
    params.journal_max = a.journal_max;
    params.target_snapshot = a.target_snapshot;
    if !a.no_digest_map && !a.dry_run {
        params.digest_map = digest_map(&a.source_state_dir, &a.src, dest, None);
    }
    run_session(scanned, dest, &a.transfer, &params, cancel, None, after)
}

/// `sync --verify`: compares the source with `dest` again, reading all of
/// the source.
fn verify_after(a: &SyncArgs, dest: &Destination, name: &str, cancel: &Cancel) -> Result<()> {
    let source = open_source(&a.src, !a.transfer.keep_cache)?;
    let mut params = session_params(&a.src, dest, &a.transfer, source.as_ref())?;
    params.mode = Mode::Verify;
    params.force = a.force;
    let check = run_session(source, dest, &a.transfer, &params, cancel, None, &mut None)?;
    if !check.differing.is_empty() {
        return Err(differs(&check).into());
    }
    if !a.transfer.quiet && !a.transfer.json {
        eprintln!("verified: {} and {name} are identical", a.src.display());
    }
    Ok(())
}

pub fn verify(a: VerifyArgs) -> Result<Exit> {
    let dest = Destination::parse(&a.dst)?;
    let cancel = super::cancel_on_signals()?;
    let source = open_source(&a.src, !a.transfer.keep_cache)?;
    let mut params = session_params(&a.src, &dest, &a.transfer, source.as_ref())?;
    params.mode = Mode::Verify;
    params.force = true;
    let report = run_session(
        source,
        &dest,
        &a.transfer,
        &params,
        &cancel,
        None,
        &mut None,
    )?;
    if a.transfer.json {
        crate::cli::print_line(&serde_json::to_string(&report).expect("report serialises"));
    } else if !a.transfer.quiet {
        for (o, l) in &report.differing {
            crate::cli::print_line(&format!("differs: offset {o} length {l}"));
        }
    }
    if let (Some(rec), false) = (&report.recovered, a.transfer.json) {
        eprintln!("note: target {rec}");
    }
    if report.differing.is_empty() {
        if !a.transfer.quiet && !a.transfer.json {
            eprintln!(
                "identical: {} compared",
                crate::cli::iec(report.volume_bytes)
            );
        }
        Ok(Exit::Ok)
    } else {
        if !a.transfer.quiet && !a.transfer.json {
            eprintln!("{}", differs(&report));
        }
        Ok(Exit::Differs)
    }
}

/// `sync --metrics-file`: each target's outcome as the metrics `run`
/// writes for a volume (labels: volume = SRC, target = DST).
fn write_metrics(
    path: &Path,
    a: &SyncArgs,
    outcomes: &[Outcome],
    started: std::time::Instant,
) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let states: Vec<_> = outcomes
        .iter()
        .map(|o| {
            let mut st = crate::job::SourceState {
                cycles: 1,
                last_attempt: Some(now.saturating_sub(started.elapsed().as_secs())),
                last_duration_seconds: Some(started.elapsed().as_secs_f64()),
                ..Default::default()
            };
            match &o.result {
                Ok(r) => crate::job::record_success(&mut st, r),
                Err(e) => crate::job::record_failure(&mut st, e, o.after, a.journal_max == 0),
            }
            st
        })
        .collect();
    let volume = a.src.display().to_string();
    let series: Vec<_> = outcomes
        .iter()
        .zip(&states)
        .map(|(o, st)| crate::metrics::VolumeMetrics {
            volume: &volume,
            target: &o.target,
            interval: None,
            state: st,
        })
        .collect();
    crate::metrics::write(path, &crate::metrics::render(&series, now))
        .context("writing --metrics-file")
}

fn differs(r: &Report) -> Coded {
    let bytes: u64 = r.differing.iter().map(|(_, l)| l).sum();
    Coded {
        exit: Exit::Differs,
        message: format!(
            "{} ranges ({bytes} bytes) differ between source and replica",
            r.differing.len()
        ),
    }
}

/// The digest map of `src` synced to `dest`, kept in `state_dir`; `None`
/// (with a warning) when the directory cannot be used: the sync then
/// scans both volumes.
pub fn digest_map(
    state_dir: &Path,
    src: &Path,
    dest: &Destination,
    scrub: Option<String>,
) -> Option<crate::engine::map::MapPlan> {
    let store = match crate::engine::map::MapStore::open(state_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no digest map: {e:#}");
            return None;
        }
    };
    let src = transport::absolute(src).unwrap_or_else(|_| src.to_owned());
    let target = match dest {
        Destination::Local(p) => transport::absolute(p)
            .unwrap_or_else(|_| p.clone())
            .to_string_lossy()
            .into_owned(),
        Destination::Remote { host, path } => format!("{host}:{path}"),
        Destination::Rbd(name) => name.clone(),
    };
    Some(crate::engine::map::MapPlan {
        store,
        name: crate::engine::map::map_name("sync", &src.to_string_lossy(), &target),
        scrub,
    })
}

/// Opens a source volume for a sequential scan; `drop_behind` lets the
/// pages it read leave the page cache.
pub fn open_source(path: &Path, drop_behind: bool) -> Result<Arc<dyn Volume>> {
    Ok(open_source_file(path, drop_behind)?)
}

/// [`open_source`], as the file volume it is.
pub fn open_source_file(path: &Path, drop_behind: bool) -> Result<Arc<FileVolume>> {
    let mut v = FileVolume::open(path, Access::Read)
        .map_err(SyncError::Source)
        .context("opening the source")?;
    v.advise_sequential(drop_behind);
    Ok(Arc::new(v))
}

/// `source` to scan for a sync: a thin LV is read only where its pool
/// maps it (see [`crate::cbt::read_mapped`]), what the device maps when
/// the session starts; the rest reads as the zeros it holds then. Any
/// other volume as it is. A check (`verify`, a scrub) reads `source`.
pub fn mapped_source(source: &Arc<FileVolume>) -> Arc<dyn Volume> {
    let volume: Arc<dyn Volume> = source.clone();
    let Some(device) = source.device() else {
        return volume;
    };
    let sys = snapshot::identity::sys_root();
    match snapshot::identity::of_fd(source.file().as_fd(), &sys) {
        Ok(id) => {
            crate::cbt::mapped_if_thin(volume, &id, Some(device), &sys, crate::cbt::HOLD_WAIT)
        }
        Err(_) => volume,
    }
}

/// Identity of the source and of its current content, for the replica's
/// state: a resumed copy must continue the very same content.
fn session_params(
    src: &Path,
    dest: &Destination,
    t: &TransferArgs,
    v: &dyn Volume,
) -> Result<SessionParams> {
    let block_size =
        BlockSize::new(t.block_size).map_err(|e| UsageError(format!("--block-size: {e}")))?;
    let abs = transport::absolute(src)?;
    let meta = std::fs::metadata(&abs).with_context(|| format!("reading {}", abs.display()))?;
    let source_id = source_id(&abs)?;
    let snapshot_id = format!(
        "live:{}:{}:{}:{}",
        meta.dev(),
        meta.ino(),
        v.size(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000
    );
    let mut p = SessionParams::new(
        dest.target_path()?,
        block_size,
        source_id,
        snapshot_id,
        t.timeout,
    );
    p.bwlimit = t.bwlimit.unwrap_or(0);
    Ok(p)
}

/// The source as the replica's state records it: its identity, so a
/// symlink or another name of the same volume is the same source, and a
/// volume recreated under the same name is a new one.
pub fn source_id(path: &Path) -> Result<String> {
    let id = snapshot::identity::of_path(path, &snapshot::identity::sys_root()).map_err(|e| {
        SyncError::Source(snapshot::VolumeError::Other {
            op: "identifying",
            path: path.to_owned(),
            source: e,
        })
    })?;
    Ok(format!("id:{}", id.id()))
}

/// Connects to the destination, runs one session and waits for the peer.
/// After a failure once the target opened the volume, `after` tells what
/// the replica is (see [`source::run`]).
pub fn run_session(
    source: Arc<dyn Volume>,
    dest: &Destination,
    t: &TransferArgs,
    params: &SessionParams,
    cancel: &Cancel,
    changes: Option<Box<dyn Iterator<Item = Result<Change, snapshot::VolumeError>> + Send>>,
    after: &mut Option<ReplicaAfter>,
) -> Result<Report> {
    let (conn, peer) = match dest {
        Destination::Local(p) => {
            let state_dir = t
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
            transport::local(transport::absolute(p)?, state_dir, cancel.clone())?
        }
        Destination::Rbd(name) => transport::local_target(
            name.clone(),
            t.state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            t.ceph.options(),
            cancel.clone(),
        )?,
        Destination::Remote { host, path } => {
            let mut args = vec!["--allow".to_owned(), path.clone()];
            if let Some(d) = &t.state_dir {
                args.push("--state-dir".into());
                args.push(d.to_string_lossy().into_owned());
            }
            // For gw:rbd:POOL/IMAGE: paths and ids as on the gateway.
            t.ceph.forward(&mut args);
            transport::remote(&t.rsh, host, &t.remote_bin, &args).map_err(|e| Coded {
                exit: Exit::Transport,
                message: format!("{e:#}"),
            })?
        }
    };
    // Pace what we send; the target paces itself (the limit travels in
    // the handshake).
    // Whatever the target sends counts as hearing from it: one that sends
    // nothing at all for the timeout (e.g. never answers the handshake,
    // before the session's own progress checks start) is ended.
    let heard = crate::engine::Clock::new();
    let conn = source::Connection {
        writer: Box::new(crate::bwlimit::Limited::new(
            conn.writer,
            crate::bwlimit::Rate::new(params.bwlimit),
        )),
        reader: Box::new(transport::Heard {
            inner: conn.reader,
            clock: heard.clone(),
        }),
    };
    let progress = Progress::new(
        source.size(),
        &source.path().display().to_string(),
        t.quiet || t.json,
    );
    let watcher = peer.kill_on_cancel(cancel, &heard, params.io_timeout);
    let result = source::run(
        source.clone(),
        conn,
        params,
        &progress,
        cancel,
        changes,
        after,
    );
    progress.finish();
    let mut silent = false;
    if let Some((done, quiet)) = watcher {
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        silent = quiet.load(std::sync::atomic::Ordering::SeqCst);
    }
    // A target that went silent or stalled for --timeout is not waited
    // for again: its remote shell may keep the pipes open for good.
    let stalled = silent || result.as_ref().is_err_and(SyncError::is_stall);
    let peer_failure = if stalled {
        peer.finish_within(STALLED_GRACE)
    } else {
        peer.finish()
    };
    // A signal may surface as a dropped connection or a remote error first.
    let result = if cancel.is_cancelled() && result.is_err() {
        Err(SyncError::Interrupted)
    } else {
        result
    };
    match result {
        Ok(r) => Ok(r),
        Err(_) if silent => Err(Coded {
            exit: Exit::Transport,
            message: format!(
                "the target sent nothing for {}; gave up (--timeout)",
                humantime::format_duration(params.io_timeout)
            ),
        }
        .into()),
        // A dropped connection is best explained by how the peer ended.
        Err(SyncError::Transport(e)) => {
            let msg = match peer_failure {
                Some(p) => format!("connection to the target failed ({e}); {p}"),
                None => format!("connection to the target failed: {e}"),
            };
            Err(Coded { exit: Exit::Transport, message: msg }.into())
        }
        Err(SyncError::Interrupted) => Err(Coded {
            exit: Exit::Interrupted,
            message: "interrupted; the replica is still a complete earlier generation, or an in-place copy resumes on the next run".into(),
        }
        .into()),
        Err(e) => Err(e).with_context(|| format!("syncing {} to {}", source.path().display(), params.target_path)),
    }
}

/// How long a target that stalled gets to exit by itself before it is
/// killed (one that is working ends within this of its session).
const STALLED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A session's report on stdout (`--json`) or a line on stderr, each
/// line after `label`.
fn print_report(r: &Report, t: &TransferArgs, verb: &str, label: &str) {
    if t.json {
        crate::cli::print_line(&serde_json::to_string(r).expect("report serialises"));
    } else if !t.quiet {
        let b = crate::cli::iec;
        eprintln!(
            "{label}{verb} {}: {} of {} blocks changed, {} data + {} zeroed, {} on the wire, {:.1}s ({}, {})",
            b(r.volume_bytes),
            r.blocks_changed,
            r.blocks_total,
            b(r.data_bytes),
            b(r.zero_bytes),
            b(r.wire_bytes_sent + r.wire_bytes_received),
            r.elapsed_seconds,
            r.mode,
            r.apply_mode
        );
        if let Some(f) = &r.fallback {
            eprintln!("{label}note: {f}");
        }
        if let Some(rec) = &r.recovered {
            eprintln!("{label}note: target {rec}");
        }
    }
}
