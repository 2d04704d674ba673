//! The digest map end to end, with the real binary: repeated syncs that
//! read only the source, every fallback to a full scan and why, what the
//! target vouches for (a file: unchanged since its commit; a block
//! device: trusted, the scrub and `verify` are the net), and kill -9 at
//! random moments never leaving a map that claims a generation the target
//! does not hold.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use snapsync::engine::map::{MapKey, MapReader};

const BLOCK: u64 = 64 * KIB;

struct Fixture {
    dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    state: PathBuf,
}

impl Fixture {
    fn new(size: u64, seed: u64) -> Self {
        let (dir, src) = scratch_with_source("snapsync-map-", size, seed);
        Fixture {
            src,
            dst: dir.path().join("dst.img"),
            state: dir.path().join("state"),
            dir,
        }
    }

    fn sync(&self, extra: &[&str]) -> Report {
        let r = sync_json(&self.src, s(&self.dst), &self.state, extra);
        assert_same_content(&self.src, &self.dst);
        r
    }

    fn maps(&self) -> PathBuf {
        self.state.join("source/digest-maps")
    }

    /// The one map file of this fixture (`.map`), if any.
    fn map_file(&self) -> Option<PathBuf> {
        std::fs::read_dir(self.maps())
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "map"))
    }

    /// Every map file of this fixture.
    fn map_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.maps())
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "map"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The map of local syncs from `src` to `dst`, if any.
    fn local_map(&self) -> Option<PathBuf> {
        let name = snapsync::engine::map::map_name("sync", s(&self.src), s(&self.dst));
        let p = self.maps().join(format!("{name}.map"));
        p.exists().then_some(p)
    }
}

fn fallback(r: &Report) -> String {
    r.opt_s("fallback").unwrap_or_default()
}

/// The generation a map claims, checked with its key as the source would.
fn map_generation(map: &Path, key_file: &Path) -> u64 {
    let key: [u8; 32] = std::fs::read(key_file).unwrap().try_into().unwrap();
    let f = std::fs::File::open(map).unwrap();
    let (h, _) =
        MapReader::new(f, &MapKey::new(key)).unwrap_or_else(|e| panic!("{}: {e}", map.display()));
    h.generation.number
}

/// The generation the target's state says its replica holds, if complete.
fn target_generation(state: &Path) -> Option<u64> {
    for e in std::fs::read_dir(state).ok()?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("vol-") && n.ends_with(".state.json") {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            if v["consistent"] != serde_json::Value::Bool(true) {
                return None;
            }
            return v["generation"]["number"].as_u64();
        }
    }
    None
}

#[test]
fn repeated_syncs_with_random_changes_read_only_the_source() {
    let size = 24 * MIB + 5000;
    let f = Fixture::new(size, 1);
    let first = f.sync(&[]);
    assert_eq!(first.s("mode"), "full-scan", "{first}");
    assert!(
        first.is_null("fallback"),
        "a first copy has no map to miss: {first}"
    );

    // Nothing changed: the target reads nothing, nothing is sent.
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    assert_eq!(r.u("target_bytes_read"), 0, "{r}");
    assert_eq!(r.u("blocks_changed"), 0, "{r}");
    assert_eq!(r.u("data_bytes") + r.u("zero_bytes"), 0, "{r}");
    assert_eq!(r.u("source_bytes_read"), size, "{r}");
    assert_eq!(r.opt_u("generation"), Some(2), "{r}");

    let mut rng = Rng::new(7);
    for cycle in 0..6u64 {
        let mut ranges = Vec::new();
        match cycle % 3 {
            // Scattered 4 KiB writes.
            0 => ranges = scatter_writes(&f.src, size, 100 + cycle, 1000 * cycle),
            // A region, unaligned.
            1 => {
                let off = rng.below(size - MIB);
                let len = rng.range(1, MIB);
                write_at(&f.src, off, &random_bytes(cycle, len as usize));
                ranges.push((off, len));
            }
            // A zeroed region and one changed byte in the short last block.
            _ => {
                let off = rng.below(size / BLOCK - 4) * BLOCK;
                write_at(&f.src, off, &vec![0u8; 3 * BLOCK as usize]);
                write_at(&f.src, size - 1, &[cycle as u8 ^ 0x5a]);
                ranges.push((off, 3 * BLOCK));
                ranges.push((size - 1, 1));
            }
        }
        let r = f.sync(&[]);
        assert_eq!(r.s("mode"), "digest-map", "cycle {cycle}: {r}");
        assert!(r.is_null("fallback"), "{r}");
        let touched = blocks_touched(&ranges, BLOCK);
        assert!(r.u("blocks_changed") <= touched, "cycle {cycle}: {r}");
        // The target reads only the blocks it is asked to refine.
        assert!(
            r.u("target_bytes_read") <= r.u("blocks_changed") * BLOCK,
            "cycle {cycle}: {r}"
        );
        if cycle % 3 == 0 {
            // Exactly the 4 KiB blocks written, nothing around them.
            assert_eq!(r.u("data_bytes"), 20 * 4 * KIB, "{r}");
            assert_eq!(r.u("blocks_changed"), touched, "{r}");
        }
    }
}

/// Regression: the target answered a refinement of a block that is a
/// hole in its file with the sub-digests of the block it refined before
/// (its buffer was not cleared), so whole blocks of data went out for one
/// changed sub-block; had the stale bytes equalled the source's, a
/// change would have been missed.
#[test]
fn refine_of_a_hole_block_hashes_zeros_not_the_previous_block() {
    for extra in [&["--no-digest-map"][..], &[][..]] {
        let size = 4 * MIB;
        let f = Fixture::new(size, 12);
        // Blocks 10..20 zero: the target punches them.
        write_at(&f.src, 10 * BLOCK, &vec![0u8; 10 * BLOCK as usize]);
        f.sync(extra);
        f.sync(extra);
        // Block 5 changes in one sub-block, then block 12 (a hole on the
        // target) gets one sub-block of data.
        write_at(&f.src, 5 * BLOCK, &random_bytes(77, 4096));
        write_at(&f.src, 12 * BLOCK + 8192, &random_bytes(78, 4096));
        let r = f.sync(extra);
        assert_eq!(r.u("data_bytes"), 8192, "{extra:?}: {r}");
    }
}

#[test]
fn every_reason_not_to_trust_the_map_falls_back_and_says_why() {
    let size = 4 * MIB;
    let f = Fixture::new(size, 2);
    f.sync(&[]);
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");
    let key = f.maps().join("key");

    // Corrupt: one flipped bit.
    let map = f.map_file().expect("a map after a sync");
    let mut bytes = std::fs::read(&map).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&map, &bytes).unwrap();
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("corrupt"), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // Truncated.
    let map = f.map_file().unwrap();
    let len = file_len(&map);
    set_len(&map, len - 7);
    let r = f.sync(&[]);
    assert!(fallback(&r).contains("corrupt"), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // A map of the format before the salted block key (as an older
    // snapsync left it): named, and renewed by one full scan.
    let map = f.map_file().unwrap();
    let mut bytes = std::fs::read(&map).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&map, &bytes).unwrap();
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("format 1"), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // Another key.
    std::fs::write(&key, [3u8; 32]).unwrap();
    let r = f.sync(&[]);
    assert!(fallback(&r).contains("another key"), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // Stale: a sync without the map moved the target on.
    f.sync(&["--no-digest-map"]);
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("the target holds generation"), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // A cycle that fails after taking the map (here: the target is
    // busy) leaves none: the next one scans in full and says why.
    {
        let _held = snapsync::state::VolumeLock::acquire(&lock_path(&f.state, &f.dst)).unwrap();
        sync_run(&f.src, s(&f.dst), &f.state, &[]).assert_code(6);
    }
    assert!(f.map_file().is_none());
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("failed or was interrupted"), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // The source changed size.
    append_random(&f.src, 100, 3);
    let r = f.sync(&[]);
    assert!(fallback(&r).contains("a volume of"), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // The replica replaced by a copy of itself (another inode: another
    // target volume).
    let copy = f.dir.path().join("copy.img");
    std::fs::copy(&f.dst, &copy).unwrap();
    std::fs::rename(&copy, &f.dst).unwrap();
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(!fallback(&r).is_empty(), "{r}");
    assert_eq!(f.sync(&[]).s("mode"), "digest-map");

    // --no-digest-map neither uses nor keeps one.
    let r = f.sync(&["--no-digest-map"]);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(r.is_null("fallback"), "{r}");
}

#[test]
fn a_file_replica_written_out_of_band_is_not_vouched_for() {
    let size = 4 * MIB;
    let f = Fixture::new(size, 4);
    f.sync(&[]);
    // Same size, one byte, as an editor or dd would.
    let old = read_at(&f.dst, 70_000, 1);
    write_at(&f.dst, 70_000, &[old[0] ^ 0xff]);
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("changed since its commit"), "{r}");
    assert!(r.u("data_bytes") >= 1, "the byte was put back: {r}");

    // Written and its times put back: ctime still tells.
    let r = f.sync(&[]);
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    let mtime = std::fs::metadata(&f.dst).unwrap().modified().unwrap();
    write_at(&f.dst, 0, &[0]);
    std::fs::File::options()
        .write(true)
        .open(&f.dst)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let r = f.sync(&[]);
    assert!(fallback(&r).contains("changed since its commit"), "{r}");
}

#[test]
fn remote_target_vouches_through_the_protocol() {
    let size = 8 * MIB;
    let f = Fixture::new(size, 5);
    let rsh = local_rsh(f.dir.path());
    let args = remote_args(&rsh);
    let dst = format!("localhost:{}", s(&f.dst));
    let sync = |extra: &[&str]| {
        let mut a = strs(&args);
        a.extend_from_slice(extra);
        let r = sync_json(&f.src, &dst, &f.state, &a);
        assert_same_content(&f.src, &f.dst);
        r
    };
    sync(&[]);
    let changed = scatter_writes(&f.src, size, 11, 12);
    let r = sync(&[]);
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    assert_scattered_delta(&r, size, &changed);
    assert!(
        r.u("target_bytes_read") <= r.u("blocks_changed") * BLOCK,
        "{r}"
    );
}

/// Behind a slow login the source compares with its map before the
/// target answers. What it finds then must be exactly what a comparison
/// after the answer finds: with a change in every chunk (more than the
/// early scan may hold), with nothing changed, and when the target no
/// longer vouches for the replica (the early results dropped, a full scan
/// instead).
#[test]
fn a_comparison_made_during_a_slow_login_is_exact() {
    let size = 40 * MIB + 5000;
    let f = Fixture::new(size, 12);
    let rsh = write_script(
        &f.dir.path().join("slow-rsh"),
        "sleep 1\nshift\nexec \"$@\"",
    );
    let args = remote_args(&rsh);
    let dst = format!("localhost:{}", s(&f.dst));
    let all = size.div_ceil(BLOCK);
    let sync_with = |what: &str| {
        let mut a = strs(&args);
        a.push("-vv");
        let r = sync_run(&f.src, &dst, &f.state, &a);
        r.assert_ok();
        assert_same_content(&f.src, &f.dst);
        let early = r
            .stderr
            .lines()
            .find(|l| l.contains(what))
            .map(str::to_owned);
        (r.json(), early)
    };
    let sync = |_: &[&str]| sync_with("with the digest map before the target answered");

    // No map yet, so a first sync: every block differs, and a full scan
    // that hashed ahead during the login would read them again. It waits.
    let (r, early) = sync_with("for the full scan before the target answered");
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert_eq!(early, None, "{r}");
    assert_eq!(r.u("source_bytes_read"), size, "{r}");

    // A 4 KiB change in every MiB: every chunk differs.
    let mut changed = Vec::new();
    for mib in 0..40 {
        let o = mib * MIB + (mib * 37 % 240) * 4 * KIB;
        write_at(&f.src, o, &random_bytes(900 + mib, 4096));
        changed.push((o, 4 * KIB));
    }
    let (r, early) = sync(&[]);
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    let early = early.unwrap_or_else(|| panic!("no early comparison: {r}"));
    assert!(!early.contains("compared 0 blocks"), "{early}");
    assert_scattered_delta(&r, size, &changed);
    assert_eq!(r.u("source_bytes_read"), size, "each block read once: {r}");
    assert!(r.u("target_bytes_read") <= 40 * BLOCK, "{r}");

    // Nothing changed: the whole volume compared before the answer.
    let (r, early) = sync(&[]);
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    assert_eq!(r.u("blocks_changed"), 0, "{r}");
    assert_eq!(r.u("data_bytes") + r.u("zero_bytes"), 0, "{r}");
    assert_eq!(r.u("source_bytes_read"), size, "{r}");
    assert!(
        early
            .as_deref()
            .is_some_and(|l| l.contains(&format!("compared {all} blocks"))),
        "{early:?}"
    );

    // The replica written behind snapsync's back: the target declines
    // the map, and the full scan compares the digests made against it
    // (the session key is the map's): only the block that differs is
    // read again, and the byte is put back.
    let old = read_at(&f.dst, 3 * MIB + 77, 1);
    write_at(&f.dst, 3 * MIB + 77, &[old[0] ^ 0x5a]);
    let (r, early) = sync_with("for the full scan before the target answered");
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("changed since its commit"), "{r}");
    assert_eq!(r.u("data_bytes"), 4 * KIB, "{r}");
    assert!(
        early
            .as_deref()
            .is_some_and(|l| l.contains(&format!("hashed {all} blocks"))),
        "{early:?}"
    );
    assert_eq!(r.u("source_bytes_read"), size + BLOCK, "{r}");
    // And the map that full scan wrote holds.
    let (r, _) = sync(&[]);
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    assert_eq!(r.u("blocks_changed"), 0, "{r}");
}

/// Without a digest map a full scan hashes during the login too: only
/// the blocks that differ are read again, and past the end of what the
/// target holds (here a new one) the scan reads on in order instead.
#[test]
fn a_full_scan_without_a_map_hashes_during_the_login() {
    let size = 40 * MIB + 5000;
    let f = Fixture::new(size, 14);
    let rsh = write_script(
        &f.dir.path().join("slow-rsh"),
        "sleep 1\nshift\nexec \"$@\"",
    );
    // A MiB of written zeros: the new target keeps a hole there, and
    // zeros against a hole need not be read again.
    write_at(&f.src, 24 * MIB, &vec![0u8; MIB as usize]);
    let mut args = remote_args(&rsh);
    args.extend(["--no-digest-map".into(), "-vv".into()]);
    let dst = format!("localhost:{}", s(&f.dst));
    let all = size.div_ceil(BLOCK);
    let sync = || {
        let r = sync_run(&f.src, &dst, &f.state, &strs(&args));
        r.assert_ok();
        assert_same_content(&f.src, &f.dst);
        let hashed = format!("hashed {all} blocks for the full scan before the target answered");
        assert!(r.stderr.contains(&hashed), "{}", r.stderr);
        r.json()
    };
    let r = sync();
    assert_eq!(r.u("data_bytes"), size - MIB, "{r}");
    let kept = snapsync::engine::early::KEEP_MAX as u64;
    assert_eq!(r.u("source_bytes_read"), 2 * size - kept, "{r}");

    // One change among the chunks kept whole, three among those whose
    // data was given back: those three are read again (the last block is
    // 5000 bytes long).
    let changed: Vec<(u64, u64)> = [MIB, 20 * MIB + 4 * KIB, 31 * MIB, 40 * MIB]
        .iter()
        .map(|&o| (o, 4 * KIB))
        .collect();
    for (i, &(o, _)) in changed.iter().enumerate() {
        write_at(&f.src, o, &random_bytes(300 + i as u64, 4096));
    }
    let r = sync();
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert_scattered_delta(&r, size, &changed);
    assert_eq!(r.u("source_bytes_read"), size + 2 * BLOCK + 5000, "{r}");
}

/// A full scan that hashed a block during the login, gave its data back
/// and then found it differs reads it again, and decides and maps on
/// what it read then: a live source may have changed in between, and a
/// map holding the older digest would later leave the replica wrong.
#[test]
fn a_block_read_again_is_sent_and_mapped_as_read_again() {
    let size = 40 * MIB + 5000;
    let f = Fixture::new(size, 31);
    let at = 30 * MIB + 8 * KIB;
    let before = read_at(&f.src, at, 4096);
    let newer = f.dir.path().join("newer");
    std::fs::write(&newer, random_bytes(77, 4096)).unwrap();
    let fast = remote_args(&local_rsh(f.dir.path()));
    // The source changes at `at` while ssh logs in, after the early scan
    // hashed it.
    let slow = remote_args(&write_script(
        &f.dir.path().join("slow-rsh"),
        &format!(
            "sleep 1\ndd if={} of={} bs=4096 seek={} conv=notrunc status=none\n\
             sleep 0.5\nshift\nexec \"$@\"",
            s(&newer),
            s(&f.src),
            at / 4096
        ),
    ));
    let dst = format!("localhost:{}", s(&f.dst));
    let sync = |args: &[String]| {
        let r = sync_run(&f.src, &dst, &f.state, &strs(args));
        r.assert_ok();
        assert_same_content(&f.src, &f.dst);
        r.json()
    };
    let r = sync(&fast);
    assert_eq!(r.s("mode"), "full-scan", "{r}");

    // The replica written behind snapsync's back at `at`: a full scan.
    write_at(&f.dst, at, &random_bytes(78, 4096));
    let r = sync(&slow);
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("changed since its commit"), "{r}");
    assert_eq!(r.u("data_bytes"), 4 * KIB, "{r}");
    assert_eq!(r.u("source_bytes_read"), size + BLOCK, "read again: {r}");

    // The source goes back to what the early scan hashed: the map must
    // know the replica holds the newer bytes.
    write_at(&f.src, at, &before);
    let r = sync(&fast);
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    assert_eq!(r.u("blocks_changed"), 1, "{r}");
    assert_eq!(r.u("data_bytes"), 4 * KIB, "{r}");
}

/// The map is taken before the session reaches the target (the early
/// scan needs it); a login that fails puts it back: the target never
/// heard of that session, so the next one still uses it.
#[test]
fn a_failed_login_keeps_the_map() {
    let size = 4 * MIB;
    let f = Fixture::new(size, 13);
    let rsh = local_rsh(f.dir.path());
    let refused = write_script(
        &f.dir.path().join("refused-rsh"),
        "echo 'ssh: connect to host localhost port 22: Connection refused' >&2\nexit 255",
    );
    let dst = format!("localhost:{}", s(&f.dst));
    let sync = |rsh: &Path| sync_run(&f.src, &dst, &f.state, &strs(&remote_args(rsh)));
    sync(&rsh).assert_ok();
    let r = sync(&refused);
    assert_ne!(r.code, Some(0), "{r}");
    let r = sync(&rsh);
    r.assert_ok();
    let r = r.json();
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    assert!(fallback(&r).is_empty(), "{r}");
}

/// A loop device over a file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn new(backing: &Path) -> Option<Self> {
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        o.status.success().then(|| {
            LoopDevice(PathBuf::from(
                String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            ))
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// The one thing a map cannot see, like changed-block tracking: a block
/// device written behind snapsync's back. `verify` sees it, and so does
/// `run`'s next scrub cycle, which repairs it.
#[test]
fn a_block_device_written_out_of_band_is_caught_by_verify_and_the_scrub() {
    let size = 8 * MIB;
    let f = Fixture::new(size, 6);
    let backing = f.dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(size)
        .unwrap();
    let Some(lo) = LoopDevice::new(&backing) else {
        skip_root_test("no loop device here (root needed)");
        return;
    };
    let cfg = f.dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[[volume]]\nname = \"v\"\nsource = {:?}\ntarget = {:?}\nsnapshot = \"none\"\ninterval = \"1s\"\nscrub_every = 3\ntarget_state_dir = {:?}\n",
            s(&f.state.join("run")),
            s(&f.src),
            s(&lo.0),
            s(&f.state),
        ),
    )
    .unwrap();
    let cycle = || {
        let mut c = snapsync();
        c.args(["run", "--once", "--json", "--config"]).arg(&cfg);
        let r = run_with_deadline(&mut c, DEFAULT_DEADLINE);
        r.assert_ok();
        let line: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        Report(line["report"].clone())
    };
    let verify = || {
        let mut c = volume_cmd("verify", &f.src, s(&lo.0), &f.state);
        run_with_deadline(&mut c, DEFAULT_DEADLINE)
    };
    let first = cycle();
    assert_eq!(first.s("mode"), "full-scan", "{first}");
    let r = cycle();
    assert_eq!(r.s("mode"), "digest-map", "{r}");
    assert_eq!(r.u("target_bytes_read"), 0, "{r}");
    verify().assert_ok();

    // Behind snapsync's back.
    write_at(&lo.0, 3 * MIB + 5, b"out of band");
    verify().assert_code(7);
    // Cycle 3 is a scrub: a full scan, which repairs the replica.
    let r = cycle();
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(fallback(&r).contains("scrub cycle"), "{r}");
    assert!(r.u("data_bytes") >= 11, "{r}");
    verify().assert_ok();
    let r = cycle();
    assert_eq!(r.s("mode"), "digest-map", "{r}");

    // A volume no longer configured loses its map.
    let maps = f.state.join("run/digest-maps");
    let count = |ext: &str| {
        std::fs::read_dir(&maps)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|e| e == ext))
            .count()
    };
    assert_eq!(count("map"), 1);
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[[volume]]\nname = \"w\"\nsource = {:?}\ntarget = {:?}\nsnapshot = \"none\"\ndigest_map = false\ntarget_state_dir = {:?}\n",
            s(&f.state.join("run")),
            s(&f.src),
            s(&lo.0),
            s(&f.state),
        ),
    )
    .unwrap();
    let r = cycle();
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert_eq!(count("map"), 0, "the map of volume v is gone");
}

/// kill -9 of the syncing process (source and, for a local target, the
/// target with it) at random moments: a map is either absent or claims
/// exactly the generation the target holds; the next sync is exact.
#[test]
fn kill_9_never_leaves_a_map_claiming_a_generation_the_target_lacks() {
    let size = 24 * MIB;
    let f = Fixture::new(size, 8);
    let rsh = local_rsh(f.dir.path());
    let remote = remote_args(&rsh);
    f.sync(&[]);
    let key = f.maps().join("key");
    let mut rng = Rng::new(99);
    for trial in 0..12u64 {
        let _ = scatter_writes(&f.src, size, 500 + trial, 600 + trial);
        if trial % 4 == 1 {
            write_at(
                &f.src,
                rng.below(size - 2 * MIB),
                &random_bytes(trial, 2 * MIB as usize),
            );
        }
        // Half the trials through a separate serving process.
        let dst = if trial % 2 == 0 {
            s(&f.dst).to_owned()
        } else {
            format!("localhost:{}", s(&f.dst))
        };
        let mut c = volume_cmd("sync", &f.src, &dst, &f.state);
        c.arg("--json");
        if trial % 2 == 1 {
            c.args(&remote);
        }
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.range(0, 600)));
        let _ = child.kill();
        let _ = child.wait();
        // A remote target may still be finishing: wait for its lock.
        let lock = lock_path(&f.state, &f.dst);
        for _ in 0..200 {
            if snapsync::state::VolumeLock::acquire(&lock).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The local and the remote route are two destinations with a map
        // each: none may claim more than the target holds.
        let held = target_generation(&f.state);
        for map in f.map_files() {
            let claimed = map_generation(&map, &key);
            assert!(
                held.is_some_and(|h| h >= claimed),
                "trial {trial}: {} claims generation {claimed}, the target holds {held:?}",
                map.display()
            );
        }
        // Held may be ahead of the local route's map (killed between the
        // target's commit and the map's rename, or the remote route
        // synced since): then the next local sync scans in full.
        if let Some(map) = f.local_map() {
            let claimed = map_generation(&map, &key);
            if held != Some(claimed) {
                let r = f.sync(&[]);
                assert_eq!(
                    r.s("mode"),
                    "full-scan",
                    "trial {trial} claimed {claimed} held {held:?}: {r}"
                );
                continue;
            }
        }
        let r = f.sync(&[]);
        assert!(
            ["full-scan", "digest-map"].contains(&r.s("mode").as_str()),
            "{r}"
        );
    }
    assert!(f.local_map().is_some(), "the last local sync keeps its map");
}
