//! Every recorded power-cut log in tests/fixtures/powercut/ (`*.log.zst`)
//! is replayed on the host, without the VM, to flush points and a few
//! random cuts, and the replica's guarantees are checked there
//! (scripts/powercut-check). A `*.fail.log.zst` was recorded with an
//! ordering bug put in on purpose: the check must catch it (see the
//! fixtures' README).
//!
//! Needs root (loop mounts, a private mount namespace) and the snapsync
//! binary: `$SNAPSYNC_BIN`, else target/{release,debug}/snapsync. Without
//! them the test is skipped, unless SNAPSYNC_REQUIRE_ROOT_TESTS=1 (CI).

use std::path::{Path, PathBuf};
use std::process::Command;

fn skip(why: &str) {
    if std::env::var("SNAPSYNC_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{why}, and SNAPSYNC_REQUIRE_ROOT_TESTS=1");
    }
    eprintln!("skipped: {why}");
}

fn snapsync_bin(root: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SNAPSYNC_BIN") {
        return Some(p.into());
    }
    ["release", "debug"]
        .iter()
        .map(|p| root.join("target").join(p).join("snapsync"))
        .find(|p| p.exists())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn recorded_power_cuts_replay_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut logs: Vec<PathBuf> = std::fs::read_dir(root.join("tests/fixtures/powercut"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".log.zst"))
        .collect();
    logs.sort();
    assert!(!logs.is_empty(), "no fixtures in tests/fixtures/powercut");
    if !is_root() {
        return skip("power-cut fixtures need root");
    }
    let Some(bin) = snapsync_bin(root) else {
        return skip("no snapsync binary (set SNAPSYNC_BIN)");
    };
    for log in &logs {
        let must_fail = log.to_string_lossy().ends_with(".fail.log.zst");
        // A third of the flush points and 10 cuts (every point: see
        // scripts/powercut); a bad log, half the flush points, which
        // include several its bug tears.
        let (cuts, stride) = if must_fail { ("0", "2") } else { ("10", "3") };
        let out = Command::new(root.join("scripts/powercut-check"))
            .args([log.as_os_str(), cuts.as_ref(), stride.as_ref()])
            .env("SNAPSYNC_BIN", &bin)
            .env("REPLAY_LOG", env!("CARGO_BIN_EXE_replay-log"))
            .env("POWERCUT_SEED", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let why = format!(
            "{}:\n{text}\n{}",
            log.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        if must_fail {
            assert!(!out.status.success(), "the check missed the bug: {why}");
            assert!(text.contains("FAIL entry"), "{why}");
        } else {
            assert!(out.status.success() && text.contains(", 0 failed"), "{why}");
        }
    }
}
