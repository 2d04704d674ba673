//! Integration tests of the `snapsync` binary: local and `--rsh` targets,
//! byte-exact replicas and the true counts of `--json`, exit codes.
//!
//! Every test uses its own temporary directory and state directory.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("snapsync-cli-")
        .tempdir()
        .unwrap()
}

/// A test directory with a source, a target and a state directory.
struct Fixture {
    dir: TempDir,
    src: PathBuf,
    dst: PathBuf,
    state: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tmp();
        let src = dir.path().join("src.img");
        let dst = dir.path().join("dst.img");
        let state = dir.path().join("state");
        Fixture {
            dir,
            src,
            dst,
            state,
        }
    }

    /// A fixture whose target already replicates a source of `size`
    /// random bytes from `seed` (one sync done).
    fn replica(size: u64, seed: u64) -> Self {
        let f = Fixture::new();
        write_random_file(&f.src, size, seed);
        f.sync(&[]);
        f
    }

    fn dst_str(&self) -> &str {
        s(&self.dst)
    }

    /// Local sync; expects exit 0. These are the full-scan engine's tests:
    /// no digest map (tests/digest_map.rs covers that mode).
    fn sync(&self, extra: &[&str]) -> Report {
        sync_json(&self.src, self.dst_str(), &self.state, &full_scan(extra))
    }

    /// Local sync, any exit.
    fn sync_run(&self, extra: &[&str]) -> Run {
        sync_run(&self.src, self.dst_str(), &self.state, &full_scan(extra))
    }

    /// The options that reach a remote target through the local remote
    /// shell.
    fn local_rsh_args(&self) -> Vec<String> {
        remote_args(&local_rsh(self.dir.path()))
    }

    /// The options that reach a remote target through a remote shell
    /// forcing `serve --allow ALLOW` with this fixture's state directory.
    fn forced_rsh_args(&self, allow: &str) -> Vec<String> {
        remote_args(&forced_rsh(self.dir.path(), allow, &self.state))
    }

    /// `localhost:DST` through the local remote shell.
    fn remote_dst(&self) -> String {
        format!("localhost:{}", self.dst_str())
    }

    fn assert_exact(&self) {
        assert_same_content(&self.src, &self.dst);
    }
}

fn full_scan<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--no-digest-map"];
    v.extend_from_slice(extra);
    v
}

/// The counts every successful full scan must get right.
fn assert_scan_counts(r: &Report, size: u64, block: u64) {
    assert_eq!(r.u("volume_bytes"), size, "{r}");
    assert_eq!(r.u("blocks_total"), size.div_ceil(block), "{r}");
    assert_eq!(
        r.u("source_bytes_read"),
        size,
        "a full scan reads the whole source: {r}"
    );
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(r.u("blocks_changed") <= r.u("blocks_total"), "{r}");
    assert!(r.is_null("fallback"), "{r}");
}

// ------------------------------------------------------------ basic cases

#[test]
fn identical_volumes_send_nothing() {
    let f = Fixture::new();
    let size = 8 * MIB;
    write_random_file(&f.src, size, 1);
    std::fs::copy(&f.src, &f.dst).unwrap();

    let r = f.sync(&[]);
    f.assert_exact();
    assert_scan_counts(&r, size, 64 * KIB);
    assert_eq!(r.u("data_bytes"), 0, "{r}");
    assert_eq!(r.u("zero_bytes"), 0, "{r}");
    assert_eq!(r.u("blocks_changed"), 0, "{r}");
    assert_eq!(
        r.u("target_bytes_read"),
        size,
        "the target reads its whole copy: {r}"
    );
    assert_eq!(r.u("target_bytes_written"), 0, "{r}");
    assert!(
        r.wire_total() < size / 100,
        "wire traffic {} is over 1% of the volume: {r}",
        r.wire_total()
    );

    // And again now that the target is a known replica.
    let r = f.sync(&[]);
    f.assert_exact();
    assert_eq!(r.u("data_bytes"), 0, "{r}");
    assert_eq!(r.u("blocks_changed"), 0, "{r}");
    assert_eq!(r.u("target_bytes_written"), 0, "{r}");
    assert!(r.wire_total() < size / 100, "{r}");
}

/// First copy, then 20 scattered 4 KiB changes; `extra` selects the target.
fn scattered_case(f: &Fixture, dst: &str, extra: &[&str]) {
    let extra = &full_scan(extra)[..];
    let size = 16 * MIB;
    write_random_file(&f.src, size, 2);

    let first = sync_json(&f.src, dst, &f.state, extra);
    f.assert_exact();
    assert_scan_counts(&first, size, 64 * KIB);
    assert_eq!(
        first.s("apply_mode"),
        "in-place",
        "a first copy goes in place: {first}"
    );
    assert_eq!(first.opt_u("generation"), Some(1), "{first}");
    assert_eq!(first.u("data_bytes"), size, "{first}");

    let changed = scatter_writes(&f.src, size, 3, 3000);
    let r = sync_json(&f.src, dst, &f.state, extra);
    f.assert_exact();
    assert_scan_counts(&r, size, 64 * KIB);
    assert_scattered_delta(&r, size, &changed);
    // The target reads its whole copy, plus (at most) the changed blocks
    // again for their sub-block digests.
    let tread = r.u("target_bytes_read");
    assert!(
        (size..=size + r.u("blocks_changed") * 64 * KIB).contains(&tread),
        "target read {tread}: {r}"
    );
    // Digests back: one per block plus one per sub-block of changed blocks.
    let recv_limit = size / 1000 + r.u("blocks_changed") * 16 * 32 + 16 * KIB;
    assert!(
        r.u("wire_bytes_received") < recv_limit,
        "received {}: {r}",
        r.u("wire_bytes_received")
    );
}

#[test]
fn scattered_4k_changes_ship_only_those() {
    let f = Fixture::new();
    scattered_case(&f, f.dst_str(), &[]);
}

#[test]
fn large_unaligned_change() {
    let size = 16 * MIB;
    let f = Fixture::replica(size, 4);
    f.assert_exact();

    let (off, len) = (MIB + 1000, 3 * MIB);
    write_at(&f.src, off, &random_bytes(5, len as usize));
    let r = f.sync(&[]);
    f.assert_exact();
    assert_scan_counts(&r, size, 64 * KIB);
    let data = r.u("data_bytes");
    assert!(
        (len..=len + 8 * KIB).contains(&data),
        "data_bytes {data} not within 3 MiB + 8 KiB: {r}"
    );
    // 4 KiB sub-blocks are the unit of transfer: exactly those touched.
    let subs = (off + len).div_ceil(4 * KIB) - off / (4 * KIB);
    assert_eq!(data, subs * 4 * KIB, "{r}");
    assert_eq!(
        r.u("blocks_changed"),
        blocks_touched(&[(off, len)], 64 * KIB),
        "{r}"
    );
    assert_eq!(r.u("zero_bytes"), 0, "{r}");
    assert_eq!(r.u("target_bytes_written"), data, "{r}");
}

#[test]
fn zeroed_region_travels_as_zeros_and_punches_the_target() {
    let size = 8 * MIB;
    let f = Fixture::replica(size, 6);
    f.assert_exact();
    let before = allocated_blocks(&f.dst);
    assert!(
        before >= size / 512,
        "the first copy of random data is fully allocated ({before} sectors)"
    );

    write_at(&f.src, 2 * MIB, &vec![0u8; MIB as usize]);
    let r = f.sync(&[]);
    f.assert_exact();
    assert_scan_counts(&r, size, 64 * KIB);
    assert!(r.u("zero_bytes") >= MIB, "{r}");
    assert_eq!(
        r.u("zero_bytes"),
        MIB,
        "the zeroed range is block-aligned: {r}"
    );
    assert_eq!(r.u("data_bytes"), 0, "{r}");
    assert_eq!(r.u("blocks_changed"), MIB / (64 * KIB), "{r}");
    assert!(
        r.u("wire_bytes_sent") < 64 * KIB,
        "zeros travel as ops, not data: {r}"
    );
    let after = allocated_blocks(&f.dst);
    assert!(
        after + MIB / 512 <= before,
        "the target stays sparse: st_blocks {before} -> {after}, expected a drop of at least {}",
        MIB / 512
    );
}

#[test]
fn sparse_source_gives_sparse_replica() {
    let f = Fixture::new();
    let size = 16 * MIB;
    std::fs::File::create(&f.src)
        .unwrap()
        .set_len(size)
        .unwrap();
    write_at(&f.src, 0, &random_bytes(7, MIB as usize));
    write_at(&f.src, 12 * MIB, &random_bytes(8, MIB as usize));

    let r = f.sync(&[]);
    f.assert_exact();
    assert_eq!(
        r.u("data_bytes"),
        2 * MIB,
        "holes of a new target already read as zeros: {r}"
    );
    assert_eq!(r.u("volume_bytes"), size, "{r}");
    let (src_blocks, dst_blocks) = (allocated_blocks(&f.src), allocated_blocks(&f.dst));
    assert!(
        dst_blocks <= src_blocks + 256,
        "replica allocates {dst_blocks} sectors for a source of {src_blocks} (holes filled in)"
    );
}

fn odd_size_case(block: &str, block_bytes: u64) {
    let f = Fixture::new();
    let size = 5 * MIB + 1234;
    write_random_file(&f.src, size, 9);
    let r = f.sync(&["--block-size", block]);
    f.assert_exact();
    assert_scan_counts(&r, size, block_bytes);
    assert_eq!(r.u("data_bytes"), size, "{r}");

    // Change only the short tail.
    write_at(&f.src, size - 100, &random_bytes(10, 100));
    let r = f.sync(&["--block-size", block]);
    f.assert_exact();
    assert_scan_counts(&r, size, block_bytes);
    assert_eq!(r.u("blocks_changed"), 1, "{r}");
    assert_eq!(
        r.u("data_bytes"),
        1234,
        "the last (short) sub-block only: {r}"
    );

    // And a change in the first block.
    write_at(&f.src, 10, &random_bytes(11, 10));
    let r = f.sync(&["--block-size", block]);
    f.assert_exact();
    assert_eq!(r.u("data_bytes"), 4 * KIB, "{r}");
}

#[test]
fn size_not_multiple_of_block_4k() {
    odd_size_case("4KiB", 4 * KIB);
}

#[test]
fn size_not_multiple_of_block_1m() {
    odd_size_case("1MiB", MIB);
}

#[test]
fn grown_source_grows_the_target() {
    // A replica whose source grew.
    let f = Fixture::replica(4 * MIB, 12);
    append_random(&f.src, 2 * MIB + 100, 13);
    let r = f.sync(&[]);
    f.assert_exact();
    assert_scan_counts(&r, 6 * MIB + 100, 64 * KIB);
    assert_eq!(
        r.u("data_bytes"),
        2 * MIB + 100,
        "only the new tail travels: {r}"
    );
    assert!(
        r.u("target_bytes_read") <= 4 * MIB,
        "nothing to read past the old end: {r}"
    );

    // An existing, smaller file that is not a replica yet.
    let other = f.dir.path().join("smaller.img");
    write_random_file(&other, MIB, 14);
    let r = sync_json(&f.src, s(&other), &f.state, &[]);
    assert_same_content(&f.src, &other);
    assert_eq!(r.u("volume_bytes"), 6 * MIB + 100, "{r}");
}

#[test]
fn shrunk_source_truncates_the_target() {
    let f = Fixture::replica(6 * MIB, 15);
    set_len(&f.src, 3 * MIB + 10);
    let r = f.sync(&[]);
    f.assert_exact();
    assert_eq!(file_len(&f.dst), 3 * MIB + 10);
    assert_scan_counts(&r, 3 * MIB + 10, 64 * KIB);
    assert_eq!(r.u("data_bytes"), 0, "the kept prefix is unchanged: {r}");
    assert_eq!(r.u("blocks_changed"), 0, "{r}");

    // An existing, larger file that is not a replica yet.
    let other = f.dir.path().join("larger.img");
    write_random_file(&other, 8 * MIB, 16);
    sync_json(&f.src, s(&other), &f.state, &[]);
    assert_same_content(&f.src, &other);
}

#[test]
fn missing_target_is_created() {
    let f = Fixture::new();
    write_random_file(&f.src, 3 * MIB + 7, 17);
    assert!(!f.dst.exists());
    let r = f.sync(&[]);
    f.assert_exact();
    assert_scan_counts(&r, 3 * MIB + 7, 64 * KIB);
    assert_eq!(r.u("data_bytes"), 3 * MIB + 7, "{r}");
    assert_eq!(r.u("target_bytes_written"), 3 * MIB + 7, "{r}");
    assert_eq!(r.u("target_bytes_read"), 0, "{r}");
    assert_eq!(r.s("apply_mode"), "in-place", "{r}");
}

#[test]
fn target_in_missing_directory_fails_cleanly() {
    let f = Fixture::new();
    write_random_file(&f.src, MIB, 18);
    let dst = f.dir.path().join("no-such-dir").join("dst.img");
    let r = sync_run(&f.src, s(&dst), &f.state, &[]);
    r.assert_code(4)
        .assert_says(s(&dst), "the message names the target");
    assert!(!dst.exists());
}

#[test]
fn empty_source() {
    let f = Fixture::new();
    std::fs::File::create(&f.src).unwrap();
    let r = f.sync(&[]);
    assert!(f.dst.exists(), "the empty replica is created");
    assert_eq!(file_len(&f.dst), 0);
    assert_eq!(r.u("volume_bytes"), 0, "{r}");
    assert_eq!(r.u("blocks_total"), 0, "{r}");
    assert_eq!(r.u("data_bytes"), 0, "{r}");

    // An existing non-empty file is truncated to nothing.
    let other = f.dir.path().join("other.img");
    write_random_file(&other, MIB, 19);
    sync_json(&f.src, s(&other), &f.state, &[]);
    assert_eq!(file_len(&other), 0);
}

#[test]
fn missing_source_is_a_source_error() {
    let f = Fixture::new();
    let missing = f.dir.path().join("no-such-source.img");
    let r = sync_run(&missing, f.dst_str(), &f.state, &[]);
    r.assert_code(3)
        .assert_says(s(&missing), "the message names the source path");
    assert!(
        r.stdout.trim().is_empty(),
        "no report for a failed run\n{r}"
    );
    assert!(!f.dst.exists(), "nothing is created on a source error");
}

#[test]
fn directory_source_is_a_source_error() {
    let f = Fixture::new();
    let r = sync_run(f.dir.path(), f.dst_str(), &f.state, &[]);
    r.assert_code(3)
        .assert_says(s(f.dir.path()), "the message names the source path");
    assert!(!f.dst.exists());
}

#[test]
fn dry_run_reports_and_writes_nothing() {
    let f = Fixture::new();
    let size = 8 * MIB;
    write_random_file(&f.src, size, 20);

    // Missing target: not created.
    let r = f.sync(&["--dry-run"]);
    assert_eq!(r.u("data_bytes"), size, "{r}");
    assert_eq!(r.s("apply_mode"), "dry-run", "{r}");
    assert!(!f.dst.exists(), "a dry run creates no target");

    f.sync(&[]);
    let changed = [
        (MIB, 4 * KIB),
        (3 * MIB + 8 * KIB, 4 * KIB),
        (7 * MIB, 4 * KIB),
    ];
    for (i, &(o, l)) in changed.iter().enumerate() {
        write_at(&f.src, o, &random_bytes(21 + i as u64, l as usize));
    }
    let before = sha256_file(&f.dst);
    let mtime = std::fs::metadata(&f.dst).unwrap().modified().unwrap();
    let r = f.sync(&["--dry-run"]);
    assert_eq!(r.s("apply_mode"), "dry-run", "{r}");
    assert_eq!(r.u("data_bytes"), 3 * 4 * KIB, "{r}");
    assert_eq!(r.u("blocks_changed"), 3, "{r}");
    assert_eq!(r.u("target_bytes_written"), 0, "{r}");
    assert_eq!(
        r.opt_u("generation"),
        Some(1),
        "a dry run does not advance the generation: {r}"
    );
    assert_eq!(sha256_file(&f.dst), before, "a dry run changed the target");
    assert_eq!(
        std::fs::metadata(&f.dst).unwrap().modified().unwrap(),
        mtime,
        "a dry run touched the target"
    );

    // The real run afterwards is generation 2 and ships the same.
    let r = f.sync(&[]);
    f.assert_exact();
    assert_eq!(r.u("data_bytes"), 3 * 4 * KIB, "{r}");
    assert_eq!(r.opt_u("generation"), Some(2), "{r}");
}

#[test]
fn compression_zstd_and_none_over_rsh() {
    let f = Fixture::new();
    let size = 8 * MIB;
    write_text_file(&f.src, size, 22);
    let mut args = f.local_rsh_args();
    args.extend(["--compress".into(), "zstd".into()]);
    let args = strs(&args);
    let dst = f.remote_dst();

    let r = sync_json(&f.src, &dst, &f.state, &args);
    f.assert_exact();
    assert_eq!(r.u("data_bytes"), size, "{r}");
    assert!(
        r.u("wire_bytes_sent") < r.u("data_bytes") / 3,
        "zstd should shrink text a lot: sent {} for {} data bytes: {r}",
        r.u("wire_bytes_sent"),
        r.u("data_bytes")
    );

    // Same volume, uncompressed, into a second target.
    let dst2 = f.dir.path().join("dst2.img");
    let mut args = f.local_rsh_args();
    args.extend(["--compress".into(), "none".into()]);
    let args = strs(&args);
    let r = sync_json(&f.src, &format!("localhost:{}", s(&dst2)), &f.state, &args);
    assert_same_content(&f.src, &dst2);
    assert_eq!(r.u("data_bytes"), size, "{r}");
    assert!(
        r.u("wire_bytes_sent") >= size,
        "uncompressed data cannot be smaller on the wire: {r}"
    );
    assert!(r.u("wire_bytes_sent") < size + size / 100 + 16 * KIB, "{r}");

    // A bad level is a usage error.
    let r = f.sync_run(&["--compress", "zstd:99"]);
    r.assert_code(2);
    let r = f.sync_run(&["--compress", "gzip"]);
    r.assert_code(2);
}

#[test]
fn verify_reports_differing_ranges() {
    let size = 8 * MIB;
    let f = Fixture::replica(size, 23);

    let verify = |json: bool| {
        let mut c = volume_cmd("verify", &f.src, f.dst_str(), &f.state);
        if json {
            c.arg("--json");
        }
        run_with_deadline(&mut c, DEFAULT_DEADLINE)
    };
    let r = verify(false);
    r.assert_ok();
    assert!(!r.stdout.contains("differs"), "{r}");

    let off = 5 * MIB + 8 * KIB;
    write_at(&f.dst, off, &random_bytes(24, 4096));
    let before = sha256_file(&f.dst);
    let r = verify(false);
    r.assert_code(7);
    assert!(
        r.stdout
            .contains(&format!("differs: offset {off} length 4096")),
        "verify lists the differing range {off}+4096\n{r}"
    );
    assert_eq!(
        r.stdout.matches("differs:").count(),
        1,
        "exactly one range differs\n{r}"
    );
    assert_unchanged(
        &f.dst,
        &before,
        "verify must not repair or touch the target",
    );

    let r = verify(true);
    r.assert_code(7);
    let j = r.json();
    let ranges =
        j.0.get("differing")
            .and_then(|v| v.as_array())
            .unwrap_or_else(|| panic!("no differing: {j}"));
    assert_eq!(ranges.len(), 1, "{j}");
    assert_eq!(ranges[0][0].as_u64(), Some(off), "{j}");
    assert_eq!(ranges[0][1].as_u64(), Some(4096), "{j}");

    // A sync repairs it, and verify agrees again.
    let r = f.sync(&[]);
    assert_eq!(r.u("data_bytes"), 4096, "{r}");
    f.assert_exact();
    verify(false).assert_ok();
}

#[test]
fn sync_with_verify_flag() {
    let f = Fixture::new();
    write_random_file(&f.src, 4 * MIB, 25);
    let r = f.sync_run(&["--verify"]);
    r.assert_ok();
    f.assert_exact();
}

#[test]
fn invalid_block_size_is_usage_error() {
    let f = Fixture::new();
    write_random_file(&f.src, MIB, 26);
    for bad in ["3000", "2KiB", "8MiB", "lots", "0"] {
        let r = f.sync_run(&["--block-size", bad]);
        r.assert_code(2);
        assert!(
            r.stderr.to_lowercase().contains("block"),
            "--block-size {bad}: the message says what is wrong\n{r}"
        );
        assert!(
            !f.dst.exists(),
            "--block-size {bad}: nothing is created on a usage error"
        );
    }
    run(&["sync"]).assert_code(2);
    run(&["sync", "--no-such-flag", "a", "b"]).assert_code(2);
}

#[test]
fn first_sync_in_place_then_journal_generations() {
    let f = Fixture::new();
    write_random_file(&f.src, 4 * MIB, 27);
    let r = f.sync(&[]);
    assert_eq!(r.s("apply_mode"), "in-place", "{r}");
    assert_eq!(r.opt_u("generation"), Some(1), "{r}");
    assert_eq!(r.u("journal_bytes"), 0, "{r}");

    write_at(&f.src, 12345, &random_bytes(28, 5000));
    let r = f.sync(&[]);
    f.assert_exact();
    assert_eq!(r.s("apply_mode"), "journal", "{r}");
    assert_eq!(r.opt_u("generation"), Some(2), "{r}");
    assert!(
        r.u("journal_bytes") >= r.u("data_bytes"),
        "the delta went through the journal: {r}"
    );

    let r = f.sync(&[]);
    assert_eq!(r.s("apply_mode"), "journal", "{r}");
    assert_eq!(r.opt_u("generation"), Some(3), "{r}");
    assert_eq!(r.u("data_bytes"), 0, "{r}");

    // --journal-max 0 applies in place.
    write_at(&f.src, 0, &random_bytes(29, 100));
    let r = f.sync(&["--journal-max", "0"]);
    f.assert_exact();
    assert_eq!(r.s("apply_mode"), "in-place", "{r}");
    assert_eq!(r.opt_u("generation"), Some(4), "{r}");
}

#[test]
fn replica_of_another_source_needs_force() {
    let f = Fixture::replica(2 * MIB, 30);
    let other = f.dir.path().join("other-src.img");
    write_random_file(&other, 2 * MIB, 31);
    let before = sha256_file(&f.dst);

    let r = sync_run(&other, f.dst_str(), &f.state, &[]);
    r.assert_code(4)
        .assert_says("--force", "the message tells how to overwrite");
    assert_unchanged(&f.dst, &before, "a refused sync wrote to the target");

    let r = sync_run(&other, f.dst_str(), &f.state, &["--force"]);
    r.assert_ok();
    assert_same_content(&other, &f.dst);
    // Now it is the other source's replica.
    f.sync_run(&[]).assert_code(4);
}

// ------------------------------------------------------------ block devices

/// A loop device over a temporary file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    fn new(backing: &Path) -> Option<Self> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let dev = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                Some(LoopDevice {
                    dev: PathBuf::from(dev),
                })
            }
            Ok(o) => {
                eprintln!(
                    "losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("losetup failed: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn file_to_loop_device() {
    let f = Fixture::new();
    let backing = f.dir.path().join("loop-backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let Some(lo) = LoopDevice::new(&backing) else {
        skip_root_test("file_to_loop_device: cannot create a loop device (needs root)");
        return;
    };
    let dev = s(&lo.dev).to_owned();

    write_random_file(&f.src, 10 * MIB, 32);
    let r = sync_json(&f.src, &dev, &f.state, &[]);
    assert_eq!(
        sha256_prefix(&lo.dev, Some(10 * MIB)),
        sha256_file(&f.src),
        "device differs from the source"
    );
    assert_eq!(r.u("volume_bytes"), 10 * MIB, "{r}");
    assert_eq!(r.u("data_bytes"), 10 * MIB, "{r}");
    assert_eq!(r.opt_u("generation"), Some(1), "{r}");

    // A delta to the device.
    let changed = scatter_writes(&f.src, 10 * MIB, 33, 33000);
    let r = sync_json(&f.src, &dev, &f.state, &[]);
    assert_eq!(
        sha256_prefix(&lo.dev, Some(10 * MIB)),
        sha256_file(&f.src),
        "device differs from the source"
    );
    assert_eq!(r.u("data_bytes"), 20 * 4 * KIB, "{r}");
    assert_eq!(
        r.u("blocks_changed"),
        blocks_touched(&changed, 64 * KIB),
        "{r}"
    );
    assert_eq!(r.s("apply_mode"), "journal", "{r}");

    // verify works on devices too (compares the source's length).
    let r = run_with_deadline(
        &mut volume_cmd("verify", &f.src, &dev, &f.state),
        DEFAULT_DEADLINE,
    );
    r.assert_ok();

    // A source larger than the device: refused, nothing written.
    let big = f.dir.path().join("big.img");
    write_random_file(&big, 20 * MIB, 34);
    let before = sha256_file(&lo.dev);
    let state2 = f.dir.path().join("state2");
    let r = sync_run(&big, &dev, &state2, &[]);
    r.assert_code(4)
        .assert_says("smaller", "the message says the device is too small");
    assert_unchanged(&lo.dev, &before, "a refused sync wrote to the device");
}

// ------------------------------------------------------------ remote shell

#[test]
fn remote_via_local_rsh_scattered_changes() {
    let f = Fixture::new();
    scattered_case(&f, &f.remote_dst(), &strs(&f.local_rsh_args()));
}

#[test]
fn forced_command_allows_only_its_pattern() {
    let f = Fixture::new();
    write_random_file(&f.src, 2 * MIB, 35);
    let allowed_dir = f.dir.path().join("allowed");
    std::fs::create_dir(&allowed_dir).unwrap();

    // Refused: the target is outside the forced --allow pattern.
    let args = f.forced_rsh_args("/some/other/dir/*");
    let r = sync_run(&f.src, &f.remote_dst(), &f.state, &strs(&args));
    r.assert_code(4)
        .assert_says("allow", "the message names the --allow list");
    assert!(!f.dst.exists(), "a refused target was created");

    // Allowed: a target inside the pattern.
    let pattern = format!("{}/*", s(&allowed_dir));
    let args = f.forced_rsh_args(&pattern);
    let args = strs(&args);
    let inside = allowed_dir.join("dst.img");
    let r = sync_run(&f.src, &format!("h:{}", s(&inside)), &f.state, &args);
    r.assert_ok();
    assert_same_content(&f.src, &inside);

    // '..' cannot escape the pattern.
    let escape = format!("h:{}/../dst.img", s(&allowed_dir));
    let r = sync_run(&f.src, &escape, &f.state, &args);
    r.assert_code(4);
    assert!(!f.dst.exists(), "'..' escaped the --allow pattern");

    // Nor can a symlink inside the allowed directory to a file outside.
    let outside = f.dir.path().join("outside.img");
    write_random_file(&outside, MIB, 42);
    let before = sha256_file(&outside);
    let r = sync_to_link(&f, &allowed_dir.join("link.img"), &outside, &args);
    r.assert_code(4);
    assert!(r.stderr.contains("allow"), "{r}");
    assert_unchanged(&outside, &before, "a symlink escaped the --allow pattern");
}

/// Makes `link` a symlink to `target` and syncs to `h:LINK` with `args`.
fn sync_to_link(f: &Fixture, link: &Path, target: &Path, args: &[&str]) -> Run {
    std::os::unix::fs::symlink(target, link).unwrap();
    sync_run(&f.src, &format!("h:{}", s(link)), &f.state, args)
}

#[test]
fn forced_command_refuses_dangling_symlink_out_of_allowed_dir() {
    let f = Fixture::new();
    write_random_file(&f.src, MIB, 43);
    let allowed_dir = f.dir.path().join("allowed");
    std::fs::create_dir(&allowed_dir).unwrap();
    let pattern = format!("{}/*", s(&allowed_dir));
    let args = f.forced_rsh_args(&pattern);
    let args = strs(&args);
    // The link's target does not exist yet: creating it would write
    // outside the allowed directory.
    let outside = f.dir.path().join("outside-new.img");
    let r = sync_to_link(&f, &allowed_dir.join("dangling.img"), &outside, &args);
    assert!(
        !outside.exists(),
        "a dangling symlink let serve create {} outside --allow\n{r}",
        outside.display()
    );
    r.assert_code(4);
}

/// A sync through the remote shell `rsh` (script `body`) that loses its
/// connection: a transport error, exit 5, reported promptly.
fn connection_lost_case(f: &Fixture, rsh: &str, body: &str, extra: &[&str]) -> Run {
    let rsh = write_script(&f.dir.path().join(rsh), body);
    let mut args = remote_args(&rsh);
    args.extend(extra.iter().map(|a| a.to_string()));
    let started = Instant::now();
    let r = sync_run(&f.src, &f.remote_dst(), &f.state, &strs(&args));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}\n{r}",
        started.elapsed()
    );
    r.assert_code(5);
    assert!(
        r.stderr.to_lowercase().contains("connection"),
        "the message mentions the connection\n{r}"
    );
    r
}

#[test]
fn remote_closing_mid_stream_is_a_transport_error() {
    let f = Fixture::new();
    write_random_file(&f.src, 16 * MIB, 36);
    // The remote side sees only the first 1 MB of what the source sends.
    // (dd, not head: head buffers its output and would stall the handshake.)
    connection_lost_case(
        &f,
        "cut-rsh",
        "shift\ndd bs=64k iflag=count_bytes count=1000000 status=none | \"$@\"",
        &[],
    );
}

#[test]
fn remote_killed_mid_stream_is_a_transport_error() {
    let f = Fixture::new();
    write_random_file(&f.src, 256 * MIB, 37);
    // Limited to 128 MiB/s, the copy takes 2 s: the kill at 0.3 s is
    // mid-stream however fast the machine (unlimited, it finished first).
    let r = connection_lost_case(
        &f,
        "kill-rsh",
        "shift\nexec timeout -s KILL 0.3 \"$@\"",
        &["--bwlimit", "128M"],
    );
    assert!(!r.stderr.contains("panicked"), "{r}");
}

/// The target fails to write mid-stream (EFBIG from a file size limit on
/// the remote side): a target error, exit 4, whatever the timing.
#[test]
fn remote_write_failure_mid_stream_is_a_target_error() {
    let f = Fixture::new();
    let size = 16 * MIB;
    write_random_file(&f.src, size, 44);
    // SIGXFSZ ignored: writes past the limit fail with EFBIG instead.
    let rsh = write_script(
        &f.dir.path().join("fsize-rsh"),
        "shift\ntrap '' XFSZ\nulimit -f 8192\nexec \"$@\"",
    );
    let args = remote_args(&rsh);
    let args = strs(&args);
    let mut codes = Vec::new();
    for attempt in 0..8 {
        // A full-size, different file: nothing to resize, the writes fail.
        write_random_file(&f.dst, size, 45 + attempt);
        let state = f.dir.path().join(format!("state-{attempt}"));
        let r = sync_run(&f.src, &f.remote_dst(), &state, &args);
        assert!(
            r.stderr.contains("File too large"),
            "attempt {attempt}: the remote's error is shown\n{r}"
        );
        codes.push((r.code, r.stderr.lines().last().unwrap_or("").to_owned()));
    }
    assert!(
        codes.iter().all(|(c, _)| *c == Some(4)),
        "a target write error must exit 4 every time; got:\n{}",
        codes
            .iter()
            .map(|(c, m)| format!("{c:?}: {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn missing_remote_shell_is_a_transport_error() {
    let f = Fixture::new();
    write_random_file(&f.src, MIB, 38);
    let missing = f.dir.path().join("no-such-rsh");
    let r = sync_run(
        &f.src,
        &f.remote_dst(),
        &f.state,
        &["--rsh", s(&missing), "--remote-bin", s(&bin())],
    );
    r.assert_code(5);
    assert!(r.stderr.contains("no-such-rsh"), "{r}");
}

#[test]
fn missing_remote_binary_is_a_transport_error() {
    let f = Fixture::new();
    write_random_file(&f.src, MIB, 39);
    let rsh = local_rsh(f.dir.path());
    let r = sync_run(
        &f.src,
        &f.remote_dst(),
        &f.state,
        &["--rsh", s(&rsh), "--remote-bin", "/no/such/snapsync"],
    );
    r.assert_code(5).assert_says(
        "/no/such/snapsync",
        "the message shows what the remote said",
    );
}

// ------------------------------------------------------------ lock and signals

#[test]
fn locked_volume_is_busy() {
    let f = Fixture::new();
    write_random_file(&f.src, MIB, 40);
    std::fs::create_dir_all(&f.state).unwrap();
    // The lock belongs to the volume's identity: the target must exist.
    std::fs::File::create(&f.dst).unwrap();
    let lock = lock_path(&f.state, &f.dst);
    // Blocking flock (a probe below may hold the lock for a moment); -o:
    // only flock holds the lock, not its `sleep`, so once flock is reaped
    // the lock is free. Own process group: the drop guard ends both.
    let holder = Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("running flock");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let group = format!("-{}", self.0.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = self.0.wait();
        }
    }
    let mut holder = Kill(holder);
    // Wait until flock holds it: a second non-blocking flock then fails.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(holder.0.try_wait().unwrap().is_none(), "flock exited early");
        let probe = Command::new("flock")
            .arg("-n")
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap();
        if !probe.success() {
            break;
        }
        assert!(
            Instant::now() < until,
            "flock never took {}",
            lock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let r = f.sync_run(&[]);
    r.assert_code(6);
    assert!(r.stderr.contains("lock"), "{r}");
    assert!(
        !f.dst.exists() || file_len(&f.dst) == 0,
        "a busy run wrote to the target"
    );

    drop(holder);
    f.sync(&[]);
    f.assert_exact();
}

/// Interrupts a sync of `size` random bytes with SIGINT (sent to snapsync
/// only) `delay` after the target file appears; expects exit 130.
fn interrupt_once(f: &Fixture, dst: &Path, dst_arg: &str, extra: &[&str], delay: Duration) {
    let child = volume_cmd("sync", &f.src, dst_arg, &f.state)
        .arg("--json")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    let mut sent: Option<Instant> = None;
    let mut dst_seen: Option<Instant> = None;
    let r = wait_with_deadline(child, Duration::from_secs(30), || {
        if sent.is_some() {
            return;
        }
        if dst_seen.is_none() && dst.exists() {
            dst_seen = Some(Instant::now());
        }
        let due = dst_seen.is_some_and(|t| t.elapsed() >= delay)
            || started.elapsed() >= Duration::from_millis(1500);
        if due {
            let ok = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -INT failed");
            sent = Some(Instant::now());
        }
    });
    let sent = sent.expect("the sync ended before SIGINT was sent; make the volume bigger");
    let stopped_after = r.elapsed.saturating_sub(sent.duration_since(started));
    assert!(
        stopped_after < Duration::from_secs(10),
        "took {stopped_after:?} to stop after SIGINT\n{r}"
    );
    assert_eq!(
        r.code,
        Some(130),
        "SIGINT {delay:?} into the copy: expected exit 130 (interrupted)\n{r}"
    );
    assert!(r.stderr.contains("interrupted"), "{r}");
    assert!(!r.stderr.contains("panicked"), "{r}");
}

/// Several interrupted runs (the outcome can depend on timing), each into
/// a fresh target; then the last target's next run completes the copy.
fn sigint_case(f: &Fixture, remote: Option<&[&str]>) {
    let size = 512 * MIB;
    write_random_file(&f.src, size, 41);
    let dst_arg = |p: &Path| match remote {
        Some(_) => format!("localhost:{}", s(p)),
        None => s(p).to_owned(),
    };
    let extra = remote.unwrap_or(&[]);
    // At most 256 MiB/s, the copy takes 2 s: each signal lands in it
    // however fast the machine (unlimited, a copy finished in 0.33 s,
    // before the 300 ms signal).
    let limited = [extra, &["--bwlimit", "256M"]].concat();
    let delays = [50, 120, 200, 300, 30, 250];
    for (i, ms) in delays.iter().enumerate() {
        let dst = f.dir.path().join(format!("attempt-{i}.img"));
        interrupt_once(
            f,
            &dst,
            &dst_arg(&dst),
            &limited,
            Duration::from_millis(*ms),
        );
    }

    // The next run resumes (or restarts) the in-place copy and completes it.
    let last = f
        .dir
        .path()
        .join(format!("attempt-{}.img", delays.len() - 1));
    let r = sync_json(&f.src, &dst_arg(&last), &f.state, extra);
    assert_same_content(&f.src, &last);
    assert!(
        ["resumed", "in-place"].contains(&r.s("apply_mode").as_str()),
        "{r}"
    );
    if r.u("start_block") > 0 {
        assert_eq!(r.s("apply_mode"), "resumed", "{r}");
        assert!(
            r.u("source_bytes_read") < size,
            "a resumed copy does not rescan from the start: {r}"
        );
    }
    assert_eq!(r.opt_u("generation"), Some(1), "{r}");
}

#[test]
fn sigint_interrupts_local_sync_and_next_run_resumes() {
    let f = Fixture::new();
    sigint_case(&f, None);
}

#[test]
fn sigint_interrupts_remote_sync_and_next_run_resumes() {
    let f = Fixture::new();
    sigint_case(&f, Some(&strs(&f.local_rsh_args())));
}

// ------------------------------------------- blocks of zeros on the target

/// Over a target block of zeros (a new target, or a hole) the source ships
/// its non-zero 4 KiB sub-blocks without hashing and without asking the
/// target for sub-digests: a first copy receives only block digests.
#[test]
fn first_copy_asks_no_sub_digests_of_a_new_target() {
    let f = Fixture::new();
    let (size, block) = (8 * MIB, 64 * KIB);
    write_random_file(&f.src, size, 700);
    // Zero sub-blocks inside data blocks, and one whole block of zeros.
    for off in [0, 3 * 4096, block + 15 * 4096, 5 * block + 7 * 4096] {
        write_at(&f.src, off, &[0u8; 4096]);
    }
    write_at(&f.src, 9 * block, &vec![0u8; block as usize]);
    for extra in [&[][..], &strs(&f.local_rsh_args())[..]] {
        let _ = std::fs::remove_file(&f.dst);
        let _ = std::fs::remove_dir_all(&f.state);
        let dst = if extra.is_empty() {
            f.dst_str().to_owned()
        } else {
            f.remote_dst()
        };
        let r = sync_json(&f.src, &dst, &f.state, extra);
        f.assert_exact();
        assert_scan_counts(&r, size, block);
        assert_eq!(r.u("data_bytes"), size - 4 * 4096 - block, "{r}");
        assert_eq!(r.u("blocks_changed"), size / block - 1, "{r}");
        let blocks = size / block;
        // Block digests (16 bytes a block) and framing; sub-digests would
        // add 256 bytes a block.
        assert!(
            r.u("wire_bytes_received") < blocks * 16 + 8 * KIB,
            "the target was asked for sub-digests of its zeros: {r}"
        );
    }
}

/// Blocks of zeros on the target between blocks that need refining: the
/// data for the zeros waits behind the pending refinements, ops stay in
/// volume order, and the replica is exact.
#[test]
fn zero_target_blocks_between_refined_blocks() {
    let (size, block) = (4 * MIB, 64 * KIB);
    let f = Fixture::replica(size, 710);
    let mut expect = 0;
    for b in 0..size / block {
        if b % 2 == 0 {
            write_at(&f.dst, b * block + 4096, &random_bytes(711 + b, 4096));
            expect += 4096;
        } else {
            write_at(&f.dst, b * block, &vec![0u8; block as usize]);
            expect += block;
        }
    }
    let r = f.sync(&[]);
    f.assert_exact();
    assert_scan_counts(&r, size, block);
    assert_eq!(r.u("data_bytes"), expect, "{r}");
    assert_eq!(r.u("blocks_changed"), size / block, "{r}");
    assert_eq!(r.s("apply_mode"), "journal", "{r}");
}
