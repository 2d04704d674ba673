//! Replication cycles of configured volumes: `snapsync run` and `status`.
//!
//! One cycle of a volume: take its lock, clean up leftovers of a crashed
//! run, snapshot the source, find what changed (thin-LVM changed-block
//! tracking when the target holds the base generation, else a full scan),
//! ship it, and keep the new snapshot as the next base (thin) or drop it
//! (thick, reflink). The source side's state per volume lives in the
//! config's `state_dir` as `volume-NAME.json`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use blockdiff::BlockSize;
use serde::{Deserialize, Serialize};
use snapshot::lvm::{LvInfo, LvName, Lvm, SnapshotState};
use snapshot::reflink::ReflinkSnapshot;
use wire::{Generation, Mode};

use crate::cli::{parse_compress, TransferArgs};
use crate::commands::sync::{fan_out, open_source, run_session, Outcome};
use crate::config::{self, SnapshotKind};
use crate::engine::source::ReplicaAfter;
use crate::engine::source::{Report, SessionParams};
use crate::engine::Cancel;
use crate::exit::{classify, Coded, Exit};
use crate::state::{self, VolumeLock};
use crate::transport::Destination;

/// How long a cycle waits for a silent target (`sync --timeout`'s default).
const IO_TIMEOUT: Duration = Duration::from_secs(600);

/// Every snapshot snapsync makes carries this tag, so it can find its own.
pub const TAG: &str = "snapsync";

/// What the source side remembers about a volume between cycles. Fields
/// added later default when an older file lacks them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceState {
    /// The thin snapshot the replica equals, kept for the next delta.
    pub base: Option<Base>,
    pub cycles: u64,
    pub last_attempt: Option<u64>,
    pub last_success: Option<u64>,
    /// When the snapshot of the last successful cycle was taken: the
    /// replica's content is from then.
    pub last_snapshot_time: Option<u64>,
    pub generation: Option<u64>,
    pub last_mode: Option<String>,
    pub last_wire_bytes: Option<u64>,
    pub last_data_bytes: Option<u64>,
    pub last_error: Option<String>,
    pub last_exit: Option<u8>,
    /// Wall time of the last cycle, successful or not.
    pub last_duration_seconds: Option<f64>,
    /// Counts of the last successful cycle, for metrics.
    pub last_source_bytes_read: Option<u64>,
    pub last_target_bytes_read: Option<u64>,
    pub last_wire_bytes_sent: Option<u64>,
    pub last_wire_bytes_received: Option<u64>,
    /// Data plus zeroed bytes.
    pub last_changed_bytes: Option<u64>,
    /// Whether the replica may be torn (an in-place copy not finished),
    /// and whether the next cycle resumes one: false after a success; after
    /// a failure, true when the cycle may have been writing in place.
    pub replica_inconsistent: Option<bool>,
    pub resume_in_progress: Option<bool>,
    pub failures: u64,
    pub wire_bytes_total: u64,
    /// Identity of the source volume (see `sync::source_id`) the replica
    /// and the base belong to.
    #[serde(default)]
    pub source_id: Option<String>,
    /// The target this state is of (absent in files from before targets
    /// could be several: the volume's one target).
    pub target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// `vg/lv` of the kept snapshot.
    pub snapshot: String,
    pub generation: Generation,
    /// The volume's cycle that took it: of several bases kept for targets
    /// at different generations, the newest have the highest.
    #[serde(default)]
    pub cycle: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn state_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("volume-{name}.json"))
}

pub fn load_state(dir: &Path, name: &str) -> Result<SourceState> {
    let p = state_path(dir, name);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("state file {} is corrupt", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SourceState::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Name of the state of a volume's target `i`: the volume's own for the
/// first (as when a volume had one target), `NAME@i` for the others.
pub fn state_name(vol: &config::Volume, i: usize) -> String {
    match i {
        0 => vol.name.clone(),
        i => format!("{}@{i}", vol.name),
    }
}

/// The state of each of a volume's targets. A state recorded for another
/// target (the list was reordered or changed) starts over: its replica,
/// generation and base are not this target's.
pub fn load_targets(dir: &Path, vol: &config::Volume) -> Result<Vec<SourceState>> {
    vol.targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let mut st = load_state(dir, &state_name(vol, i))?;
            if st.target.as_ref().is_some_and(|t| t != target) {
                tracing::warn!(
                    "volume {}: target {i} is now {target} (was {}); its next cycle is a full scan",
                    vol.name,
                    st.target.as_deref().unwrap_or("?")
                );
                st = SourceState {
                    cycles: st.cycles,
                    ..Default::default()
                };
            }
            st.target = Some(target.clone());
            Ok(st)
        })
        .collect()
}

fn save_targets(dir: &Path, vol: &config::Volume, states: &[SourceState]) -> Result<()> {
    for (i, st) in states.iter().enumerate() {
        save_state(dir, &state_name(vol, i), st)?;
    }
    Ok(())
}

fn save_state(dir: &Path, name: &str, s: &SourceState) -> Result<()> {
    state::write_atomic(
        &state_path(dir, name),
        &serde_json::to_vec_pretty(s).expect("serialises"),
    )
}

/// Outcome of one volume's cycle, as `run --json` prints it: the first
/// failing target's exit and error (else success), the first target's
/// report, and every target's own outcome.
#[derive(Debug, Serialize)]
pub struct CycleResult {
    pub volume: String,
    pub ok: bool,
    pub exit: u8,
    pub error: Option<String>,
    pub report: Option<Report>,
    pub targets: Vec<TargetResult>,
    /// Bytes read from the source, once for all targets (several targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_bytes_read: Option<u64>,
}

/// One target's part of a cycle (or of a `sync` to several).
#[derive(Debug, Serialize)]
pub struct TargetResult {
    pub target: String,
    pub ok: bool,
    pub exit: u8,
    pub error: Option<String>,
    pub report: Option<Report>,
    /// Too slow to share the others' read: it read the source on its own.
    pub left_behind: bool,
}

impl TargetResult {
    pub fn of(o: &Outcome) -> Self {
        let r = &o.result;
        Self {
            target: o.target.clone(),
            ok: r.is_ok(),
            exit: r.as_ref().err().map_or(0, |e| classify(e) as u8),
            error: r.as_ref().err().map(|e| format!("{e:#}")),
            report: r.as_ref().ok().cloned(),
            left_behind: o.left_behind,
        }
    }
}

/// Runs one cycle of `vol`, recording each target's outcome in its state.
pub fn cycle(state_dir: &Path, vol: &config::Volume, cancel: &Cancel) -> CycleResult {
    let result = (|| {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let _lock = VolumeLock::acquire(&state_dir.join(format!("volume-{}.lock", vol.name)))
            .with_context(|| format!("volume {}", vol.name))?;
        let mut states = load_targets(state_dir, vol)?;
        for st in &mut states {
            st.last_attempt = Some(now());
            st.cycles += 1;
        }
        save_targets(state_dir, vol, &states)?;
        let started = std::time::Instant::now();
        let outcome = run_cycle(state_dir, vol, &mut states, cancel);
        for (i, st) in states.iter_mut().enumerate() {
            st.last_duration_seconds = Some(started.elapsed().as_secs_f64());
            match &outcome {
                Ok((o, _)) => match &o[i].result {
                    Ok(r) => record_success(st, r),
                    Err(e) => record_failure(st, e, o[i].after, vol.journal_max == 0),
                },
                Err(e) => record_failure(st, e, None, vol.journal_max == 0),
            }
        }
        save_targets(state_dir, vol, &states)?;
        outcome
    })();
    match result {
        Ok((outcomes, read_once)) => {
            let targets: Vec<_> = outcomes.iter().map(TargetResult::of).collect();
            let failed = targets.iter().find(|t| !t.ok);
            CycleResult {
                volume: vol.name.clone(),
                ok: failed.is_none(),
                exit: failed.map_or(0, |t| t.exit),
                error: failed.and_then(|t| t.error.clone()),
                report: targets[0].report.clone(),
                source_bytes_read: read_once,
                targets,
            }
        }
        Err(e) => {
            let targets = vol
                .targets
                .iter()
                .map(|t| TargetResult {
                    target: t.clone(),
                    ok: false,
                    exit: classify(&e) as u8,
                    error: Some(format!("{e:#}")),
                    report: None,
                    left_behind: false,
                })
                .collect();
            CycleResult {
                volume: vol.name.clone(),
                ok: false,
                exit: classify(&e) as u8,
                error: Some(format!("{e:#}")),
                report: None,
                targets,
                source_bytes_read: None,
            }
        }
    }
}

/// Records a successful cycle's outcome (its snapshot is from `last_attempt`).
pub fn record_success(st: &mut SourceState, r: &Report) {
    let wire = r.wire_bytes_sent + r.wire_bytes_received;
    st.last_success = st.last_attempt;
    st.last_snapshot_time = st.last_attempt;
    st.generation = r.generation;
    st.last_mode = Some(r.mode.clone());
    st.last_wire_bytes = Some(wire);
    st.last_data_bytes = Some(r.data_bytes);
    st.last_error = None;
    st.last_exit = Some(0);
    st.last_source_bytes_read = Some(r.source_bytes_read);
    st.last_target_bytes_read = Some(r.target_bytes_read);
    st.last_wire_bytes_sent = Some(r.wire_bytes_sent);
    st.last_wire_bytes_received = Some(r.wire_bytes_received);
    st.last_changed_bytes = Some(r.data_bytes + r.zero_bytes);
    st.replica_inconsistent = Some(false);
    st.resume_in_progress = Some(false);
    st.wire_bytes_total = st.wire_bytes_total.saturating_add(wire);
}

/// Records a failed cycle. The replica's state comes from what the target
/// reported (`after`); a cycle that failed before the target opened the
/// volume leaves it to a guess: the target writes in place (torn until
/// done, resumed next time) when there is no complete generation yet or
/// the journal is off.
pub fn record_failure(
    st: &mut SourceState,
    e: &anyhow::Error,
    after: Option<ReplicaAfter>,
    no_journal: bool,
) {
    st.last_error = Some(format!("{e:#}"));
    st.last_exit = Some(classify(e) as u8);
    st.failures += 1;
    let (inconsistent, resume) = match after {
        Some(a) => (a.inconsistent, a.resume),
        None => {
            let torn = st.generation.is_none() || no_journal;
            (torn, torn)
        }
    };
    st.replica_inconsistent = Some(inconsistent);
    st.resume_in_progress = Some(resume);
}

fn transfer_args(vol: &config::Volume) -> TransferArgs {
    TransferArgs {
        block_size: vol.block_size,
        rsh: vol.rsh.clone(),
        remote_bin: vol.remote_bin.clone(),
        state_dir: vol.target_state_dir.clone(),
        json: false,
        quiet: true,
        keep_cache: false,
        timeout: IO_TIMEOUT,
        bwlimit: Some(vol.bwlimit),
        ceph: crate::cli::CephArgs {
            ceph_conf: vol.ceph_conf.clone(),
            ceph_id: vol.ceph_id.clone(),
            keep_generations: vol.keep_generations,
        },
    }
}

/// Records the source's identity in every target's state. In `run` the
/// configured pairing is the authority: a source recreated under the same
/// name (a new identity) gets a full scan and a notice, not a `--force`
/// refusal, and never a delta against the old source's base. Returns
/// whether the sessions must overwrite replicas of the old identity.
fn bind_source(states: &mut [SourceState], vol: &config::Volume, id: &str) -> bool {
    let old = states
        .iter()
        .find_map(|st| st.source_id.as_deref().filter(|old| *old != id))
        .map(str::to_owned);
    if let Some(old) = &old {
        tracing::warn!(
            "volume {}: the source {} is a new volume ({id}, was {old}); this cycle does a full scan",
            vol.name,
            vol.source,
        );
        let mut removed = std::collections::HashSet::new();
        for b in states.iter_mut().filter_map(|st| st.base.take()) {
            if !removed.insert(b.snapshot.clone()) {
                continue;
            }
            if let Ok(n) = LvName::parse(&b.snapshot) {
                if let Err(e) = Lvm::new().remove(&n) {
                    tracing::warn!("removing the old source's base {}: {e}", b.snapshot);
                }
            }
        }
    }
    for st in states.iter_mut() {
        st.source_id = Some(id.to_owned());
    }
    old.is_some()
}

fn params(
    vol: &config::Volume,
    dest: &Destination,
    source_id: String,
    snapshot_id: String,
) -> Result<SessionParams> {
    let block_size = BlockSize::new(vol.block_size)?;
    let mut p = SessionParams::new(
        dest.target_path()?,
        block_size,
        source_id,
        snapshot_id,
        IO_TIMEOUT,
    );
    p.compress = parse_compress(&vol.compress, matches!(dest, Destination::Remote { .. }))?;
    p.journal_max = vol.journal_max;
    p.target_snapshot = vol.target_snapshot;
    p.bwlimit = vol.bwlimit;
    Ok(p)
}

/// Whether `source` names an LVM volume (as opposed to a file or device path).
fn lvm_source(vol: &config::Volume) -> bool {
    match vol.snapshot {
        SnapshotKind::Lvm => true,
        SnapshotKind::Reflink | SnapshotKind::None => false,
        SnapshotKind::Auto => {
            let s = vol.source.as_str();
            let p = Path::new(s);
            // vg/lv, /dev/vg/lv or /dev/mapper/vg-lv; an image file is not.
            (!s.starts_with('/') && s.matches('/').count() == 1)
                || ((s.starts_with("/dev/mapper/")
                    || s.matches('/').count() == 3 && s.starts_with("/dev/"))
                    && p.exists()
                    && !p.is_file())
        }
    }
}

/// Each target's outcome, and (several targets) what the source read.
type Outcomes = (Vec<Outcome>, Option<u64>);

fn run_cycle(
    state_dir: &Path,
    vol: &config::Volume,
    states: &mut [SourceState],
    cancel: &Cancel,
) -> Result<Outcomes> {
    let dests = vol
        .targets
        .iter()
        .map(|t| Destination::parse(t))
        .collect::<Result<Vec<_>, _>>()?;
    if lvm_source(vol) {
        return lvm_cycle(state_dir, vol, states, &dests, cancel);
    }
    let src = crate::transport::absolute(Path::new(&vol.source))?;
    let source_id = crate::commands::sync::source_id(&src)?;
    let force = bind_source(states, vol, &source_id);
    let t = transfer_args(vol);
    let scrub = scrub_cycle(vol, &states[0]);
    let session = |snapshot_id: &str, v: Arc<dyn snapshot::Volume>, cancel: &Cancel| {
        fan_out(v, &vol.targets, vol.fanout_buffer, |i, v, after| {
            let mut p = params(vol, &dests[i], source_id.clone(), snapshot_id.to_owned())?;
            p.force = force;
            p.digest_map = digest_map(state_dir, vol, &vol.targets[i], scrub);
            run_session(v, &dests[i], &t, &p, cancel, None, after)
        })
    };
    match vol.snapshot {
        SnapshotKind::None => {
            tracing::warn!(
                "volume {}: copying the live source {} without a snapshot; the replica may be inconsistent if it is being written",
                vol.name,
                src.display()
            );
            let file = crate::commands::sync::open_source_file(&src, true)?;
            let v = if scrub {
                file
            } else {
                crate::commands::sync::mapped_source(&file)
            };
            Ok(session(&format!("live:{}", now()), v, cancel))
        }
        _ => {
            let name = src
                .file_name()
                .context("source has no file name")?
                .to_string_lossy()
                .into_owned();
            let cycles = states[0].cycles;
            let snap_path = src.with_file_name(format!(".{name}.snapsync-{cycles}"));
            let _ = std::fs::remove_file(&snap_path); // a leftover of a crashed run
            let snap = ReflinkSnapshot::create(&src, &snap_path).map_err(|e| Coded {
                exit: Exit::Source,
                message: format!("volume {}: {e}", vol.name),
            })?;
            let v = open_source(snap.path(), true)?;
            let r = session(&format!("reflink:{}:{cycles}", now()), v, cancel);
            snap.finish()
                .with_context(|| format!("removing snapshot {}", snap_path.display()))?;
            Ok(r)
        }
    }
}

/// The digest map of a volume's target, for a source without thin
/// changed-block tracking; a `scrub` cycle ignores it (and makes a new one).
fn digest_map(
    state_dir: &Path,
    vol: &config::Volume,
    target: &str,
    scrub: bool,
) -> Option<crate::engine::map::MapPlan> {
    if !vol.digest_map {
        return None;
    }
    let scrub = scrub.then(|| format!("scrub cycle (scrub_every = {})", vol.scrub_every));
    let store = match crate::engine::map::MapStore::open(state_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("volume {}: no digest map: {e:#}", vol.name);
            return None;
        }
    };
    Some(crate::engine::map::MapPlan {
        name: run_map_name(vol, target),
        store,
        scrub,
    })
}

/// Whether this cycle is a scrub: it trusts no record of the source's past
/// or of its metadata (digest map, CBT base, thin mapping), it reads all.
fn scrub_cycle(vol: &config::Volume, st: &SourceState) -> bool {
    vol.scrub_every > 0 && st.cycles.is_multiple_of(vol.scrub_every)
}

fn run_map_name(vol: &config::Volume, target: &str) -> String {
    crate::engine::map::map_name("run", &vol.name, target)
}

/// Removes the digest maps of `run` whose volume or target is no longer
/// configured (or has `digest_map = false`).
fn prune_maps(state_dir: &Path, volumes: &[config::Volume]) {
    let dir = state_dir.join(crate::engine::map::MAP_DIR);
    if !dir.is_dir() {
        return;
    }
    let Ok(store) = crate::engine::map::MapStore::open(state_dir) else {
        return;
    };
    let keep: std::collections::HashSet<String> = volumes
        .iter()
        .filter(|v| v.digest_map)
        .flat_map(|v| v.targets.iter().map(|t| run_map_name(v, t)))
        .collect();
    for name in store.names() {
        if name.starts_with("run-") && !keep.contains(&name) {
            tracing::info!("removing the digest map {name} of a volume no longer configured");
            store.remove(&name);
        }
    }
}

fn lvm_err(vol: &config::Volume, what: &str) -> impl Fn(snapshot::lvm::LvmError) -> anyhow::Error {
    let (what, name) = (what.to_owned(), vol.name.clone());
    move |e| {
        Coded {
            exit: Exit::Source,
            message: format!("volume {name}: {what}: {e}"),
        }
        .into()
    }
}

/// Removes snapsync snapshots of this origin left by a crashed run, except
/// the bases that changed-block tracking still needs.
fn cleanup_stale(lvm: &Lvm, origin: &LvInfo, vol_tag: &str, keep: &[&str]) -> Result<()> {
    for lv in lvm.list_tagged(&origin.vg, TAG)? {
        if !lv.has_tag(vol_tag) {
            continue;
        }
        let name = lv.lv_name().to_string();
        if keep.contains(&name.as_str()) {
            continue;
        }
        tracing::info!("removing leftover snapshot {name}");
        lvm.remove(&lv.lv_name())
            .with_context(|| format!("removing leftover snapshot {name}"))?;
    }
    Ok(())
}

/// The distinct bases the targets' states name, newest first.
fn bases(states: &[SourceState]) -> Vec<Base> {
    let mut b: Vec<Base> = states.iter().filter_map(|st| st.base.clone()).collect();
    b.sort_by(|x, y| y.cycle.cmp(&x.cycle).then(x.snapshot.cmp(&y.snapshot)));
    b.dedup_by(|x, y| x.snapshot == y.snapshot);
    b
}

/// After a thin cycle: each target that got generation `report.generation`
/// of `new` now has it as its base; of the bases still named, the newest
/// `keep_bases` stay (a target on an older one gets a full scan next
/// time). Returns the bases of `before` to remove.
fn advance_bases(
    vol: &config::Volume,
    states: &mut [SourceState],
    before: &[Base],
    outcomes: &[Outcome],
    new: Option<(&LvName, u64)>,
) -> Vec<String> {
    if let Some((new, cycle)) = new {
        for (st, o) in states.iter_mut().zip(outcomes) {
            if let Ok(r) = &o.result {
                st.base = Some(Base {
                    snapshot: new.to_string(),
                    generation: Generation {
                        number: r.generation.unwrap_or(0),
                        snapshot: new.to_string(),
                    },
                    cycle,
                });
            }
        }
    }
    let kept: Vec<String> = bases(states)
        .into_iter()
        .take(vol.keep_bases)
        .map(|b| b.snapshot)
        .collect();
    for (st, target) in states.iter_mut().zip(&vol.targets) {
        if st
            .base
            .as_ref()
            .is_some_and(|b| !kept.contains(&b.snapshot))
        {
            tracing::warn!(
                "volume {}: {target} is more than keep_bases = {} generations behind; its next cycle is a full scan",
                vol.name,
                vol.keep_bases
            );
            st.base = None;
        }
    }
    before
        .iter()
        .filter(|b| !kept.contains(&b.snapshot))
        .map(|b| b.snapshot.clone())
        .collect()
}

fn lvm_cycle(
    state_dir: &Path,
    vol: &config::Volume,
    states: &mut [SourceState],
    dests: &[Destination],
    cancel: &Cancel,
) -> Result<Outcomes> {
    let lvm = Lvm::new();
    let origin = lvm
        .resolve(&vol.source)
        .map_err(lvm_err(vol, "resolving the source"))?;
    let vol_tag = format!("snapsync-volume-{}", vol.name);
    // A base that no longer exists is useless; forget it.
    for st in states.iter_mut() {
        if let Some(b) = &st.base {
            let exists = LvName::parse(&b.snapshot)
                .ok()
                .and_then(|n| lvm.lv(&n).ok())
                .is_some();
            if !exists {
                tracing::warn!(
                    "base snapshot {} is gone; this cycle does a full scan",
                    b.snapshot
                );
                st.base = None;
            }
        }
    }
    // The origin's identity (its dm UUID, from the LV's UUID): a base of
    // an origin since recreated under the same name is never used.
    let dev = origin
        .dm_path
        .clone()
        .or_else(|| origin.path.clone())
        .context("the source LV has no device path")?;
    let source_id = crate::commands::sync::source_id(&dev)?;
    let force = bind_source(states, vol, &source_id);
    let before = bases(states);
    let keep: Vec<&str> = before.iter().map(|b| b.snapshot.as_str()).collect();
    cleanup_stale(&lvm, &origin, &vol_tag, &keep)?;
    // The cycle number keeps the name unique when two cycles start in the
    // same second (or the clock steps back), which would otherwise make
    // lvcreate fail on the name of the base.
    let cycles = states[0].cycles;
    let snap_name = format!("{}.snapsync.{}.{}", origin.name, now(), cycles);
    let tags = [TAG, vol_tag.as_str()];
    let t = transfer_args(vol);

    if origin.is_thin() {
        // Release a metadata snapshot a killed run left held (we hold the
        // volume lock; runs of other volumes of the pool take the pool lock).
        let pool = lvm
            .pool_of(&origin)
            .map_err(lvm_err(vol, "finding the thin pool"))?;
        let pool_lock = acquire_pool_lock(
            &state_dir.join(format!("pool-{}-{}.lock", pool.lv.vg, pool.lv.name)),
            cancel,
        )?;
        if lvm
            .release_stale_metadata_snap(&pool)
            .map_err(lvm_err(vol, "checking the pool"))?
        {
            tracing::warn!("released a metadata snapshot left held by an interrupted run");
        }
        let snap = lvm
            .create_thin_snapshot(&origin.lv_name(), &snap_name, &tags)
            .map_err(lvm_err(vol, "creating a thin snapshot"))?;
        let guard = LvGuard {
            lvm: &lvm,
            lv: Some(snap.lv_name()),
        };
        let scrub = scrub_cycle(vol, &states[0]);
        let v = open_source(
            snap.path
                .as_deref()
                .context("thin snapshot has no device path")?,
            true,
        )?;
        // What changed since each base a target holds, once per base.
        let mut deltas = Vec::new();
        if !scrub {
            for (k, base) in before.iter().enumerate() {
                let base_lv = lvm.lv(&LvName::parse(&base.snapshot)?)?;
                let spill = state_dir.join(format!("volume-{}.delta{}", vol.name, k));
                crate::cbt::compute(&lvm, &base_lv, &snap, &spill)?;
                deltas.push((base.clone(), base_lv, spill));
            }
        }
        // A full scan reads only what the snapshot maps: the rest of a
        // thin volume reads as zeros, like the holes of a sparse file. A
        // scrub trusts no metadata: it reads every block.
        let full_scans = states.iter().any(|st| st.base.is_none() || scrub);
        let v = if full_scans && !scrub {
            crate::cbt::read_mapped(&lvm, &snap, v, crate::cbt::HOLD_WAIT)
        } else {
            v
        };
        drop(pool_lock);
        let snapshot_id = snap.lv_name().to_string();
        let outcomes = fan_out(v, &vol.targets, vol.fanout_buffer, |i, v, after| {
            let mut p = params(vol, &dests[i], source_id.clone(), snapshot_id.clone())?;
            p.force = force;
            // A thin snapshot's mapped space bounds its data (`data_percent`
            // is rounded to 0.01%: one more hundredth of the size as slack).
            p.data_bytes = snap
                .data_percent
                .map(|pct| (snap.size as f64 * pct / 100.0).ceil() as u64 + snap.size / 10_000);
            let delta = states[i]
                .base
                .as_ref()
                .and_then(|b| deltas.iter().find(|(d, ..)| d.snapshot == b.snapshot));
            let mut changes = None;
            if let Some((_, base_lv, spill)) = delta {
                p.mode = Mode::Delta;
                p.base = states[i].base.as_ref().map(|b| b.generation.clone());
                changes = Some(crate::cbt::changes(
                    &lvm,
                    base_lv,
                    v.clone(),
                    p.block_size,
                    spill,
                )?);
            }
            run_session(v, &dests[i], &t, &p, cancel, changes, after)
        });
        for (_, _, spill) in &deltas {
            let _ = std::fs::remove_file(spill);
        }
        // The new snapshot is the next base of every target that got it.
        let new = outcomes
            .0
            .iter()
            .any(|o| o.result.is_ok())
            .then(|| guard.keep());
        let gone = advance_bases(
            vol,
            states,
            &before,
            &outcomes.0,
            new.as_ref().map(|n| (n, cycles)),
        );
        for old in gone {
            if let Err(e) = LvName::parse(&old).map(|n| lvm.remove(&n)) {
                tracing::warn!("removing the old base snapshot {old}: {e}");
            }
        }
        return Ok(outcomes);
    }

    // Thick LVM: a copy-on-write snapshot sized for the cycle's writes.
    let size = vol.snapshot_size.for_origin(origin.size).max(4 << 20);
    let snap = lvm
        .create_thick_snapshot(&origin.lv_name(), &snap_name, size, &tags)
        .map_err(lvm_err(vol, "creating a snapshot"))?;
    let guard = LvGuard {
        lvm: &lvm,
        lv: Some(snap.lv_name()),
    };
    let scrub = scrub_cycle(vol, &states[0]);
    // Watch the snapshot while it is read: once its COW space overflows
    // it is invalid and what we read from it is garbage.
    let session_cancel = Cancel::new();
    let overflowed = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (sc, of, done, name, outer) = (
            session_cancel.clone(),
            overflowed.clone(),
            done.clone(),
            snap.lv_name(),
            cancel.clone(),
        );
        thread::spawn(move || {
            let lvm = Lvm::new();
            while !done.load(Ordering::SeqCst) {
                if outer.is_cancelled() {
                    sc.cancel();
                }
                if matches!(lvm.snapshot_state(&name), Ok(SnapshotState::Invalid)) {
                    of.store(true, Ordering::SeqCst);
                    sc.cancel();
                    return;
                }
                thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let v = open_source(
        snap.path
            .as_deref()
            .context("snapshot has no device path")?,
        true,
    )?;
    let snapshot_id = snap.lv_name().to_string();
    let outcomes = fan_out(v, &vol.targets, vol.fanout_buffer, |i, v, after| {
        let mut p = params(vol, &dests[i], source_id.clone(), snapshot_id.clone())?;
        p.force = force;
        p.digest_map = digest_map(state_dir, vol, &vol.targets[i], scrub);
        run_session(v, &dests[i], &t, &p, &session_cancel, None, after)
    });
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let invalid = overflowed.load(Ordering::SeqCst)
        || matches!(
            lvm.snapshot_state(&snap.lv_name()),
            Ok(SnapshotState::Invalid)
        );
    drop(guard);
    if invalid {
        return Err(Coded {
            exit: Exit::Source,
            message: format!(
                "volume {}: snapshot {} overflowed its {} bytes of copy-on-write space during the cycle; raise snapshot_size",
                vol.name,
                snap.lv_name(),
                size
            ),
        }
        .into());
    }
    Ok(outcomes)
}

/// How long a cycle waits for another volume of the same thin pool to
/// finish its snapshot and changed-block steps.
const POOL_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Takes the per-pool lock, waiting while another volume's cycle holds it:
/// volumes of one pool (e.g. with `parallel` > 1) take turns for the
/// snapshot and `thin_delta` steps, which last seconds; being refused
/// would fail the cycle as busy although nobody runs this volume.
fn acquire_pool_lock(path: &Path, cancel: &Cancel) -> Result<VolumeLock> {
    let deadline = std::time::Instant::now() + POOL_LOCK_WAIT;
    loop {
        match VolumeLock::acquire(path) {
            Err(e)
                if e.downcast_ref::<state::Busy>().is_some()
                    && !cancel.is_cancelled()
                    && std::time::Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Removes a snapshot LV unless kept.
struct LvGuard<'a> {
    lvm: &'a Lvm,
    lv: Option<LvName>,
}

impl LvGuard<'_> {
    fn keep(mut self) -> LvName {
        self.lv.take().expect("kept once")
    }
}

impl Drop for LvGuard<'_> {
    fn drop(&mut self) {
        if let Some(lv) = self.lv.take() {
            if let Err(e) = self.lvm.remove(&lv) {
                tracing::warn!("removing snapshot {lv}: {e}");
            }
        }
    }
}

/// Whether a volume is due: never run, or its interval has (nearly)
/// passed since the last attempt. The 5% slack keeps a timer firing every
/// `interval` from skipping cycles through jitter.
pub fn due(st: &SourceState, interval: Duration, at: u64) -> bool {
    match st.last_attempt {
        None => true,
        Some(t) => at.saturating_sub(t) as f64 >= interval.as_secs_f64() * 0.95,
    }
}

/// `snapsync run`: cycles of due volumes, `parallel` at a time; with
/// `once`, one pass and exit.
pub fn run(
    config_path: &Path,
    once: bool,
    json: bool,
    snapshot_size: Option<&str>,
    cancel: &Cancel,
) -> Result<Exit> {
    let (cfg, mut volumes) = config::load(config_path)?;
    if let Some(text) = snapshot_size {
        let size = config::parse_snapshot_size(text)
            .map_err(|e| crate::exit::UsageError(format!("--snapshot-size: {e:#}")))?;
        for v in &mut volumes {
            v.snapshot_size = size;
        }
    }
    if volumes.is_empty() {
        return Err(crate::exit::UsageError(format!(
            "{}: no [[volume]] configured",
            config_path.display()
        ))
        .into());
    }
    prune_maps(&cfg.state_dir, &volumes);
    let mut worst = Exit::Ok;
    loop {
        let t = now();
        let queue: Vec<_> = volumes
            .iter()
            .filter(|v| {
                load_state(&cfg.state_dir, &v.name)
                    .map(|s| due(&s, v.interval, t))
                    .unwrap_or(true)
            })
            .cloned()
            .collect();
        let results = run_parallel(&cfg.state_dir, queue, cfg.parallel, cancel);
        for r in &results {
            report_cycle(r, json);
            if !r.ok && worst == Exit::Ok {
                worst = exit_from(r.exit);
            }
        }
        if let Some(path) = &cfg.metrics_file {
            if let Err(e) = write_metrics(path, &cfg.state_dir, &volumes) {
                tracing::error!("metrics: {}", crate::cli::one_line(&format!("{e:#}")));
                if worst == Exit::Ok {
                    worst = Exit::Internal;
                }
            }
        }
        if once || cancel.is_cancelled() {
            break;
        }
        // Sleep until the next volume is due, waking for signals.
        let next = volumes
            .iter()
            .map(|v| {
                let last = load_state(&cfg.state_dir, &v.name)
                    .ok()
                    .and_then(|s| s.last_attempt)
                    .unwrap_or(0);
                last + (v.interval.as_secs_f64() * 0.95) as u64
            })
            .min()
            .unwrap_or(t + 60);
        while now() < next && !cancel.is_cancelled() {
            thread::sleep(Duration::from_millis(250));
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    if cancel.is_cancelled() {
        return Ok(Exit::Interrupted);
    }
    Ok(worst)
}

/// Writes the metrics of every configured volume, from their state files.
fn write_metrics(path: &Path, state_dir: &Path, volumes: &[config::Volume]) -> Result<()> {
    let states = volumes
        .iter()
        .map(|v| load_targets(state_dir, v))
        .collect::<Result<Vec<_>>>()?;
    let series: Vec<_> = volumes
        .iter()
        .zip(&states)
        .flat_map(|(v, states)| {
            v.targets
                .iter()
                .zip(states)
                .map(|(target, st)| crate::metrics::VolumeMetrics {
                    volume: &v.name,
                    target,
                    interval: Some(v.interval),
                    state: st,
                })
        })
        .collect();
    crate::metrics::write(path, &crate::metrics::render(&series, now()))
}

fn exit_from(code: u8) -> Exit {
    use Exit::*;
    [
        Internal,
        Usage,
        Source,
        Target,
        Transport,
        Busy,
        Differs,
        Interrupted,
    ]
    .into_iter()
    .find(|e| *e as u8 == code)
    .unwrap_or(Internal)
}

fn run_parallel(
    state_dir: &Path,
    queue: Vec<config::Volume>,
    parallel: usize,
    cancel: &Cancel,
) -> Vec<CycleResult> {
    let queue = Arc::new(Mutex::new(queue.into_iter()));
    let results = Arc::new(Mutex::new(Vec::new()));
    thread::scope(|s| {
        for _ in 0..parallel {
            let (queue, results) = (queue.clone(), results.clone());
            s.spawn(move || loop {
                let next = queue.lock().expect("queue").next();
                let Some(vol) = next else { return };
                if cancel.is_cancelled() {
                    return;
                }
                let r = cycle(state_dir, &vol, cancel);
                results.lock().expect("results").push(r);
            });
        }
    });
    let mut v = std::mem::take(&mut *results.lock().expect("results"));
    v.sort_by(|a, b| a.volume.cmp(&b.volume));
    v
}

fn report_cycle(r: &CycleResult, json: bool) {
    if json {
        crate::cli::print_line(&serde_json::to_string(r).expect("serialises"));
        return;
    }
    for t in &r.targets {
        // One target: the volume's name; several: each target after it.
        let label = match r.targets.len() {
            1 => r.volume.clone(),
            _ => format!("{} → {}", r.volume, t.target),
        };
        match (&t.report, &t.error) {
            (Some(rep), _) => {
                eprintln!(
                    "{label}: generation {} ({}, {}): {} changed, {} on the wire, {:.1}s",
                    rep.generation.unwrap_or(0),
                    rep.mode,
                    rep.apply_mode,
                    crate::cli::iec(rep.data_bytes + rep.zero_bytes),
                    crate::cli::iec(rep.wire_bytes_sent + rep.wire_bytes_received),
                    rep.elapsed_seconds
                );
                if let Some(f) = &rep.fallback {
                    eprintln!("{label}: note: {f}");
                }
            }
            (None, Some(e)) => eprintln!(
                "{label}: failed (exit {}): {}",
                t.exit,
                crate::cli::one_line(e)
            ),
            (None, None) => {}
        }
        if t.left_behind {
            eprintln!(
                "{label}: note: too slow to share the others' read; read the source on its own"
            );
        }
    }
    if let Some(read) = r.source_bytes_read {
        eprintln!(
            "{}: source read once for {} targets: {}",
            r.volume,
            r.targets.len(),
            crate::cli::iec(read)
        );
    }
}

/// One volume's line of `snapsync status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusLine {
    pub volume: String,
    pub source: String,
    pub target: String,
    pub last_success: Option<u64>,
    pub last_attempt: Option<u64>,
    pub last_exit: Option<u8>,
    pub generation: Option<u64>,
    /// Seconds between now and the snapshot the replica holds.
    pub lag_seconds: Option<u64>,
    pub mode: Option<String>,
    pub last_wire_bytes: Option<u64>,
    pub base_snapshot: Option<String>,
    pub last_error: Option<String>,
    /// Whether another run holds the volume now.
    pub running: bool,
    /// Replica or state files readable by other users, states set aside
    /// as stale (local targets).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Each target's own line (the volume's line is its first target's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<StatusLine>,
}

/// What `status` warns about for a local target: a replica or state file
/// readable by other users, and states set aside in `stale/`.
fn target_warnings(v: &config::Volume, target: &str) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut w = Vec::new();
    let Ok(Destination::Local(replica)) = Destination::parse(target) else {
        return w;
    };
    let dir = v
        .target_state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_DIR));
    let open =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o044 != 0);
    if open(&replica) {
        w.push(format!(
            "replica {} is readable by other users",
            replica.display()
        ));
    }
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for p in rd.flatten().map(|e| e.path()) {
            if open(&p) {
                w.push(format!(
                    "state file {} is readable by other users",
                    p.display()
                ));
            }
        }
    }
    for p in state::stale_files(&dir) {
        w.push(format!("stale state set aside: {}", p.display()));
    }
    w
}

pub fn status(config_path: &Path, json: bool) -> Result<Exit> {
    let (cfg, volumes) = config::load(config_path)?;
    let t = now();
    let mut lines = Vec::new();
    for v in &volumes {
        let states = load_targets(&cfg.state_dir, v)?;
        let lock = cfg.state_dir.join(format!("volume-{}.lock", v.name));
        let running = lock.exists() && VolumeLock::acquire(&lock).is_err();
        let mut targets: Vec<_> = v
            .targets
            .iter()
            .zip(&states)
            .map(|(target, st)| StatusLine {
                volume: v.name.clone(),
                source: v.source.clone(),
                target: target.clone(),
                last_success: st.last_success,
                last_attempt: st.last_attempt,
                last_exit: st.last_exit,
                generation: st.generation,
                lag_seconds: st.last_snapshot_time.map(|s| t.saturating_sub(s)),
                mode: st.last_mode.clone(),
                last_wire_bytes: st.last_wire_bytes,
                base_snapshot: st.base.as_ref().map(|b| b.snapshot.clone()),
                last_error: st.last_error.clone(),
                running,
                warnings: target_warnings(v, target),
                targets: Vec::new(),
            })
            .collect();
        let mut line = targets.remove(0);
        if !targets.is_empty() {
            let first = StatusLine {
                targets: Vec::new(),
                ..line.clone()
            };
            targets.insert(0, first);
            // Warnings of every target, on the volume's line.
            line.warnings = targets.iter().flat_map(|l| l.warnings.clone()).collect();
            line.targets = targets;
        }
        lines.push(line);
    }
    if json {
        crate::cli::print_line(&serde_json::to_string_pretty(&lines).expect("serialises"));
        return Ok(Exit::Ok);
    }
    for line in status_table(&lines) {
        crate::cli::print_line(&line);
    }
    for l in &lines {
        for w in &l.warnings {
            crate::cli::print_line(&format!("warning: {}: {w}", l.volume));
        }
    }
    Ok(Exit::Ok)
}

/// A duration as a short readable age: "45s", "12m", "3h05m", "2d04h".
fn short_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `status`'s table: a header and one aligned row per volume.
fn status_table(lines: &[StatusLine]) -> Vec<String> {
    let mut rows = vec![[
        "VOLUME".to_owned(),
        "LAST SUCCESS".into(),
        "LAG".into(),
        "GEN".into(),
        "MODE".into(),
        "WIRE".into(),
        "LAST ERROR".into(),
    ]];
    // A volume with several targets: a row per target.
    let expanded = lines.iter().flat_map(|l| match l.targets.len() {
        0 => vec![(l.volume.clone(), l)],
        _ => l
            .targets
            .iter()
            .map(|t| (format!("{} → {}", l.volume, t.target), t))
            .collect(),
    });
    for (name, l) in expanded {
        let when = l.last_success.map_or("never".into(), |s| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
                .replace('T', " ")
        });
        let mut error = l
            .last_error
            .as_deref()
            .map(crate::cli::one_line)
            .unwrap_or_else(|| "-".into());
        if error.chars().count() > 100 {
            error = error.chars().take(99).chain(['…']).collect();
        }
        if l.running {
            error = format!("(running) {error}");
        }
        rows.push([
            name,
            when,
            l.lag_seconds.map_or("-".into(), short_age),
            l.generation.map_or("-".into(), |g| g.to_string()),
            l.mode.clone().unwrap_or_else(|| "-".into()),
            l.last_wire_bytes.map_or("-".into(), crate::cli::iec),
            error,
        ]);
    }
    let mut width = [0usize; 7];
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            // Text left-aligned, numbers right-aligned; the last column free.
            let cell = |i: usize| {
                let pad = width[i] - r[i].chars().count();
                if matches!(i, 2 | 3 | 5) {
                    format!("{}{}", " ".repeat(pad), r[i])
                } else {
                    format!("{}{}", r[i], " ".repeat(pad))
                }
            };
            let mut line = (0..6).map(cell).collect::<Vec<_>>().join("  ");
            line.push_str("  ");
            line.push_str(&r[6]);
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_rules() {
        let mut st = SourceState::default();
        assert!(due(&st, Duration::from_secs(60), 1000));
        st.last_attempt = Some(1000);
        assert!(!due(&st, Duration::from_secs(60), 1030));
        assert!(due(&st, Duration::from_secs(60), 1058), "5% slack");
    }

    #[test]
    fn status_table_is_aligned_and_iec() {
        let line =
            |volume: &str, gen: Option<u64>, wire: Option<u64>, err: Option<&str>| StatusLine {
                volume: volume.into(),
                source: "s".into(),
                target: "t".into(),
                last_success: gen.map(|_| 1_700_000_000),
                last_attempt: Some(1_700_000_000),
                last_exit: Some(0),
                generation: gen,
                lag_seconds: gen.map(|_| 3725),
                mode: gen.map(|_| "delta".into()),
                last_wire_bytes: wire,
                base_snapshot: None,
                last_error: err.map(Into::into),
                running: false,
                warnings: Vec::new(),
                targets: Vec::new(),
            };
        let t = status_table(&[
            line("data", Some(12), Some(3 << 29), None),
            line(
                "a-much-longer-name",
                None,
                None,
                Some("connection refused\nby peer"),
            ),
        ]);
        assert_eq!(t.len(), 3);
        assert!(
            t[0].starts_with("VOLUME              LAST SUCCESS"),
            "{t:?}"
        );
        assert!(t[1].contains("2023-11-14 22:13:20Z"), "{t:?}");
        assert!(t[1].contains("1h02m"), "{t:?}");
        assert!(t[1].contains("1.50 GiB"), "{t:?}");
        assert!(t[2].contains("never"), "{t:?}");
        assert!(t[2].ends_with("connection refused | by peer"), "{t:?}");
        // Columns line up: LAST SUCCESS starts at the same place in each row.
        let col = t[0].find("LAST SUCCESS").unwrap();
        assert_eq!(t[1].find("2023").unwrap(), col);
        assert_eq!(t[2].find("never").unwrap(), col);
    }

    #[test]
    fn each_target_keeps_its_base_and_only_the_newest_bases_stay() {
        let (_, vols) = config::parse(
            r#"
            [[volume]]
            name = "v"
            source = "vg/lv"
            target = ["/a", "/b", "/c"]
            "#,
        )
        .unwrap();
        let vol = &vols[0];
        let base = |name: &str, cycle| Base {
            snapshot: name.into(),
            generation: Generation {
                number: cycle,
                snapshot: name.into(),
            },
            cycle,
        };
        let outcome = |ok: bool, gen: u64| Outcome {
            target: String::new(),
            result: if ok {
                Ok(Report {
                    generation: Some(gen),
                    ..Default::default()
                })
            } else {
                Err(anyhow::anyhow!("failed"))
            },
            after: None,
            left_behind: false,
        };
        let mut states = vec![SourceState::default(); 3];
        states[0].base = Some(base("vg/s1", 1));
        states[1].base = Some(base("vg/s1", 1));
        // Cycle 2: a and c succeed, b fails and keeps s1.
        let before = bases(&states);
        let s2 = LvName::parse("vg/s2").unwrap();
        let gone = advance_bases(
            vol,
            &mut states,
            &before,
            &[outcome(true, 2), outcome(false, 0), outcome(true, 1)],
            Some((&s2, 2)),
        );
        assert!(gone.is_empty(), "{gone:?}");
        let named = |st: &SourceState| st.base.as_ref().map(|b| b.snapshot.clone());
        assert_eq!(named(&states[0]).as_deref(), Some("vg/s2"));
        assert_eq!(named(&states[1]).as_deref(), Some("vg/s1"));
        assert_eq!(states[2].base.as_ref().unwrap().generation.number, 1);
        // Cycle 3: b fails again; a and c move on to s3. s1 and s3 are the
        // two bases named; s2 is nobody's any more.
        let before = bases(&states);
        let s3 = LvName::parse("vg/s3").unwrap();
        let gone = advance_bases(
            vol,
            &mut states,
            &before,
            &[outcome(true, 3), outcome(false, 0), outcome(true, 2)],
            Some((&s3, 3)),
        );
        assert_eq!(gone, ["vg/s2"]);
        assert_eq!(named(&states[1]).as_deref(), Some("vg/s1"));
        // keep_bases = 1: b's old base goes, and b gets a full scan.
        let mut one = vol.clone();
        one.keep_bases = 1;
        let before = bases(&states);
        let s4 = LvName::parse("vg/s4").unwrap();
        let gone = advance_bases(
            &one,
            &mut states,
            &before,
            &[outcome(true, 4), outcome(false, 0), outcome(true, 3)],
            Some((&s4, 4)),
        );
        assert_eq!(gone, ["vg/s3", "vg/s1"]);
        assert!(states[1].base.is_none());
        // Every target failed: no new base, nothing removed.
        let before = bases(&states);
        let gone = advance_bases(
            vol,
            &mut states,
            &before,
            &[outcome(false, 0), outcome(false, 0), outcome(false, 0)],
            None,
        );
        assert!(gone.is_empty());
        assert_eq!(named(&states[0]).as_deref(), Some("vg/s4"));
    }

    #[test]
    fn old_state_files_load() {
        let old = r#"{"base":null,"cycles":4,"last_attempt":10,"last_success":10,
            "last_snapshot_time":10,"generation":3,"last_mode":"delta",
            "last_wire_bytes":5,"last_data_bytes":4,"last_error":null,"last_exit":0}"#;
        let st: SourceState = serde_json::from_str(old).unwrap();
        assert_eq!(
            (st.cycles, st.failures, st.last_changed_bytes),
            (4, 0, None)
        );
    }

    #[test]
    fn exit_codes_round_trip() {
        for e in [Exit::Busy, Exit::Source, Exit::Interrupted] {
            assert_eq!(exit_from(e as u8), e);
        }
    }
}
