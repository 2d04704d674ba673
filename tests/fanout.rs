//! Fan-out with the real binary: `sync SRC DST1 DST2 …` reads the source
//! once for every target, each target gets its own delta against its own
//! generation, and a target that fails or falls behind is dropped from
//! the sync (its replica stays a complete generation) while the others
//! finish; the exit code is the first failing target's.

mod common;

use std::path::{Path, PathBuf};

use common::*;

struct Fixture {
    dir: tempfile::TempDir,
    src: PathBuf,
    state: PathBuf,
}

impl Fixture {
    fn new(size: u64, seed: u64) -> Self {
        let (dir, src) = scratch_with_source("snapsync-fanout-", size, seed);
        Fixture {
            src,
            state: dir.path().join("state"),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `sync --json SRC DSTS…`, any exit.
    fn sync(&self, dsts: &[&str], extra: &[&str]) -> Run {
        let mut c = volume_cmd("sync", &self.src, dsts[0], &self.state);
        c.args(&dsts[1..]).arg("--json").args(extra);
        run_with_deadline(&mut c, DEFAULT_DEADLINE)
    }
}

/// The fan-out's JSON: its own fields and one entry per target.
fn targets(r: &Run) -> (Report, Vec<Report>) {
    let doc = r.json();
    let t = doc.0["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("no targets array: {}", doc.0))
        .iter()
        .map(|t| Report(t.clone()))
        .collect();
    (doc, t)
}

fn report(t: &Report) -> Report {
    Report(t.0["report"].clone())
}

#[test]
fn the_source_is_read_once_and_each_target_gets_its_own_delta() {
    let size = 24 * MIB + 5000;
    let f = Fixture::new(size, 1);
    let (a, b) = (f.path("a.img"), f.path("b.img"));
    let rsh = local_rsh(f.dir.path());
    let remote = format!("localhost:{}", s(&b));
    let args = remote_args(&rsh);
    let mut extra = strs(&args);
    extra.extend(["--fanout-buffer", "4MiB"]);

    // First copies: both targets, the source read once.
    let r = f.sync(&[s(&a), &remote], &extra);
    r.assert_ok();
    let (doc, t) = targets(&r);
    assert_eq!(doc.u("source_bytes_read"), size, "{}", doc.0);
    assert_eq!(doc.u("volume_bytes"), size);
    assert_eq!(t.len(), 2);
    for (t, dst) in t.iter().zip([s(&a), &remote]) {
        assert_eq!(t.s("target"), dst);
        assert!(t.0["ok"].as_bool().unwrap(), "{}", t.0);
        assert_eq!(report(t).u("data_bytes"), size);
    }
    assert_same_content(&f.src, &a);
    assert_same_content(&f.src, &b);

    // The second target misses a sync: each then gets its own delta
    // against the generation it holds.
    write_at(&f.src, 3 * MIB, &random_bytes(2, 100_000));
    sync_json(&f.src, s(&a), &f.state, &[]);
    write_at(&f.src, 17 * MIB, &random_bytes(3, 70_000));
    let r = f.sync(&[s(&a), &remote], &extra);
    r.assert_ok();
    let (doc, t) = targets(&r);
    assert_eq!(doc.u("source_bytes_read"), size, "{}", doc.0);
    let (ra, rb) = (report(&t[0]), report(&t[1]));
    assert_eq!(ra.s("mode"), "digest-map");
    assert_eq!(rb.s("mode"), "digest-map");
    assert_eq!(ra.u("generation"), 3);
    assert_eq!(rb.u("generation"), 2);
    // a: only the second write; b: both.
    assert!(ra.u("data_bytes") <= 2 * 65536 && ra.u("data_bytes") >= 70_000);
    assert!(rb.u("data_bytes") >= 170_000, "{}", rb.0);
    // Each target reads only the changed blocks it refines.
    assert!(ra.u("target_bytes_read") <= 2 * 65536, "{}", ra.0);
    assert!(rb.u("target_bytes_read") <= 4 * 65536, "{}", rb.0);
    assert_same_content(&f.src, &a);
    assert_same_content(&f.src, &b);
}

#[test]
fn a_failing_target_does_not_stop_the_others_and_sets_the_exit_code() {
    let f = Fixture::new(6 * MIB, 4);
    let a = f.path("a.img");
    let missing = f.path("no/such/dir/b.img");
    let r = f.sync(&[s(&missing), s(&a)], &[]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    let (_, t) = targets(&r);
    assert!(!t[0].0["ok"].as_bool().unwrap());
    assert_eq!(t[0].u("exit"), 4);
    assert!(t[0].s("error").contains("no/such/dir"), "{}", t[0].0);
    assert!(t[1].0["ok"].as_bool().unwrap());
    assert_same_content(&f.src, &a);
    // Without --json, a line per target on stderr.
    let mut c = volume_cmd("sync", &f.src, s(&missing), &f.state);
    let r = run_with_deadline(c.arg(&a), DEFAULT_DEADLINE);
    assert_eq!(r.code, Some(4));
    assert!(
        r.stderr.contains(&format!("{}: failed", s(&missing))),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("{}: synced", s(&a))),
        "{}",
        r.stderr
    );
}

#[test]
fn a_target_named_twice_is_refused() {
    let f = Fixture::new(MIB, 5);
    let a = f.path("a.img");
    let r = f.sync(&[s(&a), s(&a)], &[]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("named twice"), "{}", r.stderr);
    assert!(!a.exists());
}

/// A remote shell whose link to the target passes 64 KiB every `pause`
/// seconds, and after `limit` bytes nothing more (keeping it open).
fn link_rsh(dir: &Path, name: &str, pause: f64, limit: u64) -> PathBuf {
    write_script(
        &dir.join(name),
        &format!(
            r#"shift
python3 -c '
import sys, time
i, o = sys.stdin.buffer.raw, sys.stdout.buffer
n = 0
while n < {limit}:
    b = i.read(65536)
    if not b: break
    o.write(b); o.flush(); n += len(b); time.sleep({pause})
else:
    time.sleep(600)
' | "$@""#
        ),
    )
}

/// About 8 MiB/s.
fn slow_rsh(dir: &Path) -> PathBuf {
    link_rsh(dir, "slow-rsh", 0.008, u64::MAX >> 1)
}

/// The first 256 KiB, then nothing.
fn stalling_rsh(dir: &Path) -> PathBuf {
    link_rsh(dir, "stalling-rsh", 0.0, 256 << 10)
}

#[test]
fn a_slow_target_is_left_behind_and_still_completes() {
    let size = 24 * MIB;
    let f = Fixture::new(size, 6);
    let (a, b) = (f.path("a.img"), f.path("b.img"));
    f.sync(&[s(&a), s(&b)], &[]).assert_ok();
    // A change the slow link takes a few seconds to carry: the fast
    // target does not wait for it.
    write_random_file(&f.src, size, 7);
    let rsh = slow_rsh(f.dir.path());
    let remote = format!("localhost:{}", s(&b));
    let args = remote_args(&rsh);
    let mut extra = strs(&args);
    extra.extend(["--fanout-buffer", "4MiB", "--compress", "none"]);
    let r = f.sync(&[s(&a), &remote], &extra);
    r.assert_ok();
    let (doc, t) = targets(&r);
    let (fast, slow) = (report(&t[0]), report(&t[1]));
    assert_eq!((fast.u("generation"), slow.u("generation")), (2, 2));
    assert_eq!(t[1].0["left_behind"], true, "{}", t[1].0);
    assert_eq!(t[0].0["left_behind"], false, "{}", t[0].0);
    let (tf, ts) = (
        fast.0["elapsed_seconds"].as_f64().unwrap(),
        slow.0["elapsed_seconds"].as_f64().unwrap(),
    );
    assert!(
        tf * 2.0 < ts,
        "the fast target took {tf} s beside the slow one's {ts} s"
    );
    // The slow one read what the others no longer held again.
    assert!(doc.u("source_bytes_read") > size, "{}", doc.0);
    assert_same_content(&f.src, &a);
    assert_same_content(&f.src, &b);
}

/// A target that stops answering mid-session is given up at `--timeout`,
/// and its remote shell (which keeps the pipes open) is not waited out
/// as well: it used to cost another 10 s.
#[test]
fn a_stalled_target_is_given_up_at_its_timeout() {
    let size = 8 * MIB;
    let f = Fixture::new(size, 10);
    let b = f.path("b.img");
    let rsh = stalling_rsh(f.dir.path());
    let remote = format!("localhost:{}", s(&b));
    let args = remote_args(&rsh);
    let mut extra = strs(&args);
    extra.extend(["--compress", "none", "--timeout", "2s"]);
    let started = std::time::Instant::now();
    let r = f.sync(&[&remote], &extra);
    let took = started.elapsed();
    assert_eq!(r.code, Some(5), "{}", r.stderr);
    assert!(
        took < std::time::Duration::from_secs(6),
        "took {took:?}\n{}",
        r.stderr
    );
}

#[test]
fn a_stalled_target_fails_alone_and_keeps_its_generation() {
    let size = 8 * MIB;
    let f = Fixture::new(size, 8);
    let (a, b) = (f.path("a.img"), f.path("b.img"));
    f.sync(&[s(&a), s(&b)], &[]).assert_ok();
    let before = sha256_file(&b);
    write_random_file(&f.src, size, 9);
    let rsh = stalling_rsh(f.dir.path());
    let remote = format!("localhost:{}", s(&b));
    let args = remote_args(&rsh);
    let mut extra = strs(&args);
    extra.extend(["--compress", "none", "--timeout", "2s"]);
    let r = f.sync(&[s(&a), &remote], &extra);
    assert_eq!(r.code, Some(5), "{}", r.stderr);
    let (_, t) = targets(&r);
    assert_eq!(report(&t[0]).u("generation"), 2);
    assert!(
        report(&t[0]).0["elapsed_seconds"].as_f64().unwrap() < 2.0,
        "{}",
        t[0].0
    );
    assert_same_content(&f.src, &a);
    assert_eq!(t[1].u("exit"), 5, "{}", t[1].0);
    // b was written through its journal: still generation 1, whole.
    assert_unchanged(&b, &before, "a failed target keeps its generation");
    // Retried alone, it catches up.
    let r = sync_json(&f.src, s(&b), &f.state, &[]);
    assert_eq!(r.u("generation"), 2);
    assert_same_content(&f.src, &b);
}
