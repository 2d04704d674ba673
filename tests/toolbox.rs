//! The operator's toolbox: `--bwlimit` through a remote shell, Prometheus
//! metrics of `run` and `sync --metrics-file` (parsed, and checked by
//! `promtool check metrics`), man pages and completions generated from the
//! clap definitions and installed by `scripts/install-snapsync`, IEC
//! sizes, `status`'s table and log lines fit for journald.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use tempfile::TempDir;

fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("snapsync-toolbox-")
        .tempdir()
        .unwrap()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------ bwlimit

/// A session through the local remote shell with `--bwlimit`; returns its
/// report.
fn limited(what: &str, dir: &Path, src: &Path, dst: &Path, extra: &[&str]) -> Report {
    let rsh = local_rsh(dir);
    let mut c = volume_cmd(
        what,
        src,
        &format!("localhost:{}", s(dst)),
        &dir.join("state"),
    );
    c.arg("--json").args(strs(&remote_args(&rsh))).args(extra);
    let r = run_with_deadline(&mut c, DEFAULT_DEADLINE);
    assert!(matches!(r.code, Some(0)), "{r}");
    r.json()
}

fn assert_rate(bytes: u64, secs: f64, limit: f64, what: &str) {
    let rate = bytes as f64 / secs;
    assert!(
        rate <= limit * 1.05,
        "{what}: {bytes} bytes in {secs:.2}s = {rate:.0} B/s, above the limit {limit} B/s + 5%"
    );
    assert!(
        rate >= limit / 2.0,
        "{what}: {bytes} bytes in {secs:.2}s = {rate:.0} B/s, below half the limit {limit} B/s"
    );
}

#[test]
fn bwlimit_paces_what_the_source_sends() {
    let d = tmp();
    let (src, dst) = (d.path().join("src.img"), d.path().join("dst.img"));
    write_random_file(&src, 3 * MIB, 41);
    // 1M = 1 MiB/s; about three seconds of data.
    let r = limited(
        "sync",
        d.path(),
        &src,
        &dst,
        &["--bwlimit", "1M", "--compress", "none"],
    );
    assert_same_content(&src, &dst);
    assert!(r.u("wire_bytes_sent") >= 3 * MIB, "{r}");
    assert_rate(
        r.u("wire_bytes_sent"),
        r.0["elapsed_seconds"].as_f64().unwrap(),
        MIB as f64,
        "sync --bwlimit 1M",
    );
}

#[test]
fn bwlimit_reaches_the_target_through_the_handshake() {
    let d = tmp();
    let (src, dst) = (d.path().join("src.img"), d.path().join("dst.img"));
    write_random_file(&src, 8 * MIB, 42);
    std::fs::copy(&src, &dst).unwrap();
    // verify: the target sends 2048 digests of 16 bytes (32 KiB and some
    // framing); a bare 16 is 16 KiB/s, so about two seconds.
    let r = limited(
        "verify",
        d.path(),
        &src,
        &dst,
        &["--bwlimit", "16", "--block-size", "4KiB"],
    );
    assert!(r.u("wire_bytes_received") >= 32 * KIB, "{r}");
    assert_rate(
        r.u("wire_bytes_received"),
        r.0["elapsed_seconds"].as_f64().unwrap(),
        16.0 * KIB as f64,
        "verify --bwlimit 16",
    );
}

#[test]
fn bad_bwlimit_is_a_usage_error() {
    let d = tmp();
    let src = d.path().join("src.img");
    write_random_file(&src, 4096, 1);
    let r = sync_run(
        &src,
        s(&d.path().join("dst.img")),
        &d.path().join("st"),
        &["--bwlimit", "fast"],
    );
    r.assert_code(2)
        .assert_says("bad rate", "names the problem");
}

// ------------------------------------------------------------ metrics

/// Parses the text format: series (name with labels) → value; checks
/// every series has HELP and TYPE and every family is contiguous.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut typed = Vec::<String>::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            assert!(
                !typed.contains(&name),
                "family {name} appears twice:\n{text}"
            );
            typed.push(name);
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert_eq!(
            typed.last().map(String::as_str),
            Some(name),
            "{line} outside its family"
        );
        assert!(name.starts_with("snapsync_"), "{line}");
        assert!(out
            .insert(series.to_owned(), value.parse::<f64>().unwrap())
            .is_none());
    }
    out
}

/// `promtool check metrics` on `text`, when promtool is installed (CI
/// installs it; a hard failure there).
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        skip_root_test("promtool (Debian package prometheus) is not installed");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(m: &BTreeMap<String, f64>, name: &str, labels: &str) -> f64 {
    let key = format!("{name}{{{labels}}}");
    *m.get(&key)
        .unwrap_or_else(|| panic!("no series {key} in {m:#?}"))
}

/// A config for `run` in `dir` writing metrics to `prom`: state in
/// `dir/state`, no snapshots, target state in `dir/tstate`, then `more`
/// (defaults and volumes, with `{d}` for `dir`).
fn metrics_config(dir: &Path, prom: &Path, more: &str) -> PathBuf {
    let config = dir.join("c.toml");
    let text = format!(
        "state_dir = \"{d}/state\"\nmetrics_file = \"{m}\"\n[defaults]\nsnapshot = \"none\"\ntarget_state_dir = \"{d}/tstate\"\n{more}",
        d = dir.display(),
        m = prom.display(),
        more = more.replace("{d}", s(dir)),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// `run --once --config CONFIG`, which must exit with `code`; the metrics
/// file `prom` it wrote, checked by promtool and parsed.
fn run_once_metrics(config: &Path, prom: &Path, code: i32) -> BTreeMap<String, f64> {
    run_with_deadline(
        snapsync().args(["run", "--once", "--config", s(config)]),
        DEFAULT_DEADLINE,
    )
    .assert_code(code);
    let text = std::fs::read_to_string(prom).unwrap();
    promtool_check(&text);
    parse_metrics(&text)
}

#[test]
fn run_writes_metrics_of_every_configured_volume() {
    let d = tmp();
    let dir = d.path();
    write_random_file(&dir.join("a.img"), 2 * MIB, 5);
    let prom = dir.join("textfile").join("snapsync.prom");
    std::fs::create_dir_all(prom.parent().unwrap()).unwrap();
    let config = metrics_config(
        dir,
        &prom,
        r#"
[[volume]]
name = "a"
source = "{d}/a.img"
target = "{d}/a.replica"
interval = "1h"
[[volume]]
name = "missing"
source = "{d}/no-such.img"
target = "{d}/m.replica"
interval = "30m"
"#,
    );
    // The missing source fails the first pass.
    let m = run_once_metrics(&config, &prom, 3);
    let a = "volume=\"a\",target=\"".to_owned() + s(&dir.join("a.replica")) + "\"";
    let x = "volume=\"missing\",target=\"".to_owned() + s(&dir.join("m.replica")) + "\"";
    assert_eq!(get(&m, "snapsync_last_exit_code", &a), 0.0);
    assert_eq!(get(&m, "snapsync_last_exit_code", &x), 3.0);
    assert_eq!(get(&m, "snapsync_generation", &a), 1.0);
    assert_eq!(get(&m, "snapsync_interval_seconds", &a), 3600.0);
    assert_eq!(get(&m, "snapsync_interval_seconds", &x), 1800.0);
    assert_eq!(get(&m, "snapsync_last_changed_bytes", &a), (2 * MIB) as f64);
    assert_eq!(
        get(
            &m,
            "snapsync_last_read_bytes",
            &format!("{a},side=\"source\"")
        ),
        (2 * MIB) as f64
    );
    assert!(
        get(
            &m,
            "snapsync_last_wire_bytes",
            &format!("{a},direction=\"sent\"")
        ) >= (2 * MIB) as f64
    );
    assert_eq!(
        get(&m, "snapsync_last_mode", &format!("{a},mode=\"full-scan\"")),
        1.0
    );
    assert_eq!(get(&m, "snapsync_replica_inconsistent", &a), 0.0);
    assert_eq!(
        get(&m, "snapsync_replica_inconsistent", &x),
        1.0,
        "never completed"
    );
    assert_eq!(get(&m, "snapsync_resume_in_progress", &a), 0.0);
    assert_eq!(get(&m, "snapsync_last_success_timestamp_seconds", &x), 0.0);
    assert!(get(&m, "snapsync_last_success_timestamp_seconds", &a) > 1.6e9);
    assert!(get(&m, "snapsync_last_cycle_duration_seconds", &a) > 0.0);
    assert!(get(&m, "snapsync_replica_lag_seconds", &a) < 60.0);
    assert_eq!(get(&m, "snapsync_cycles_total", &a), 1.0);
    assert_eq!(get(&m, "snapsync_cycle_failures_total", &x), 1.0);

    // A second pass: "a" is not due (1h), "missing" neither; both stay listed.
    let m2 = run_once_metrics(&config, &prom, 0);
    assert_eq!(
        get(&m2, "snapsync_cycles_total", &a),
        1.0,
        "a was not cycled again"
    );
    assert_eq!(get(&m2, "snapsync_generation", &a), 1.0);
    assert_eq!(get(&m2, "snapsync_cycle_failures_total", &x), 1.0);
    // Only the file and its lock: no temporary file is left for the collector.
    let mut names: Vec<_> = std::fs::read_dir(prom.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["snapsync.prom", "snapsync.prom.lock"]);
}

/// The replica's state in the metrics is what the target reported, not a
/// guess from the source's history: after a successful cycle the replica
/// is replaced by a new volume, whose first copy then fails midway (the
/// remote shell cuts the stream). The replica is torn and resumable; it
/// used to show 0 and 0, since the source had a generation.
#[test]
fn a_cycle_failing_mid_first_copy_reports_a_torn_resumable_replica() {
    let d = tmp();
    let dir = d.path();
    write_random_file(&dir.join("a.img"), 8 * MIB, 6);
    let replica = dir.join("a.replica");
    let prom = dir.join("snapsync.prom");
    let cut = dir.join("cut");
    // dd passes what it reads at once (head -c holds it back in a buffer).
    let rsh = write_script(
        &dir.join("rsh"),
        &format!(
            "shift\nif [ -e {} ]; then dd iflag=count_bytes count=3000000 bs=64K status=none | \"$@\"; else exec \"$@\"; fi",
            sh_quote(s(&cut))
        ),
    );
    let config = metrics_config(
        dir,
        &prom,
        &format!(
            "rsh = \"{}\"\nremote_bin = \"{}\"\n[[volume]]\nname = \"a\"\nsource = \"{{d}}/a.img\"\ntarget = \"localhost:{}\"\ninterval = \"1s\"\n",
            s(&rsh),
            s(&bin()),
            s(&replica)
        ),
    );
    let run = |code: i32| run_once_metrics(&config, &prom, code);
    let a = format!("volume=\"a\",target=\"localhost:{}\"", s(&replica));
    let m = run(0);
    assert_eq!(get(&m, "snapsync_generation", &a), 1.0);
    assert_eq!(get(&m, "snapsync_replica_inconsistent", &a), 0.0);
    // A new volume at the replica's name, and a cut on the way.
    std::fs::remove_file(&replica).unwrap();
    std::fs::File::create(&replica).unwrap();
    std::fs::write(&cut, "").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let m = run(5);
    assert_eq!(get(&m, "snapsync_last_exit_code", &a), 5.0);
    assert_eq!(get(&m, "snapsync_replica_inconsistent", &a), 1.0);
    assert_eq!(get(&m, "snapsync_resume_in_progress", &a), 1.0);
}

#[test]
fn concurrent_metric_writers_never_interleave() {
    let d = tmp();
    let src = d.path().join("src.img");
    write_random_file(&src, 256 * KIB, 9);
    let prom = d.path().join("sync.prom");
    // Eight syncs writing the same file at once: it always parses whole.
    let children: Vec<_> = (0..8)
        .map(|i| {
            let mut c = volume_cmd(
                "sync",
                &src,
                s(&d.path().join(format!("dst{i}.img"))),
                &d.path().join("state"),
            );
            c.args(["-q", "--metrics-file", s(&prom)])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&prom).unwrap();
        let m = parse_metrics(&text);
        assert_eq!(
            m.keys()
                .filter(|k| k.starts_with("snapsync_generation{"))
                .count(),
            1,
            "{text}"
        );
    }
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_check(&text);
    let m = parse_metrics(&text);
    let series = m
        .keys()
        .find(|k| k.starts_with("snapsync_last_exit_code{"))
        .unwrap();
    assert!(
        series.contains(&format!("volume=\"{}\"", s(&src))),
        "{series}"
    );
    assert_eq!(m[series], 0.0);
}

#[test]
fn sync_metrics_record_a_failure() {
    let d = tmp();
    let prom = d.path().join("sync.prom");
    let r = sync_run(
        &d.path().join("missing.img"),
        s(&d.path().join("dst.img")),
        &d.path().join("state"),
        &["--metrics-file", s(&prom)],
    );
    r.assert_code(3);
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_check(&text);
    let m = parse_metrics(&text);
    let code = m
        .iter()
        .find(|(k, _)| k.starts_with("snapsync_last_exit_code{"))
        .unwrap();
    assert_eq!(*code.1, 3.0);
}

// ------------------------------------------------------------ man, completions

#[test]
fn man_pages_and_completions_install_and_work() {
    let d = tmp();
    let prefix = d.path().join("prefix");
    let out = Command::new(repo().join("scripts/install-snapsync"))
        .args(["--prefix", s(&prefix), "--bin", s(&bin())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let man1 = prefix.join("share/man/man1");
    for page in [
        "snapsync",
        "snapsync-sync",
        "snapsync-verify",
        "snapsync-serve",
        "snapsync-run",
        "snapsync-status",
    ] {
        assert!(man1.join(format!("{page}.1")).exists(), "{page}.1");
    }
    assert!(
        !man1.join("snapsync-generate.1").exists(),
        "the hidden command has no page"
    );
    // `man snapsync-sync` finds and renders the installed page.
    let man = Command::new("man")
        .args(["-P", "cat", "snapsync-sync"])
        .env("MANPATH", prefix.join("share/man"))
        .env("MANWIDTH", "100")
        .output();
    match man {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains("--bwlimit"), "{text}");
            assert!(text.contains("--metrics-file"), "{text}");
        }
        other => skip_root_test(&format!("man does not work here: {other:?}")),
    }
    let bash = prefix.join("share/bash-completion/completions/snapsync");
    let check = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p snapsync && COMP_WORDS=(snapsync sync --bw); COMP_CWORD=2; _snapsync snapsync --bw sync && echo \"${{COMPREPLY[@]}}\"",
            s(&bash)
        ))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(said.contains("--bwlimit"), "{said}");
    let bash_text = std::fs::read_to_string(&bash).unwrap();
    assert!(
        !bash_text.contains("generate"),
        "the hidden command is completed"
    );
    let zsh = std::fs::read_to_string(prefix.join("share/zsh/site-functions/_snapsync")).unwrap();
    assert!(zsh.starts_with("#compdef snapsync"), "{zsh}");
    let fish =
        std::fs::read_to_string(prefix.join("share/fish/vendor_completions.d/snapsync.fish"))
            .unwrap();
    assert!(fish.contains("-l bwlimit"), "{fish}");
}

// ------------------------------------------------------------ units, status, logs

#[test]
fn summary_speaks_iec() {
    let d = tmp();
    let src = d.path().join("src.img");
    write_random_file(&src, 3 * MIB / 2, 3);
    let mut c = volume_cmd(
        "sync",
        &src,
        s(&d.path().join("dst.img")),
        &d.path().join("st"),
    );
    let r = run_with_deadline(&mut c, DEFAULT_DEADLINE);
    r.assert_ok();
    assert!(r.stderr.contains("synced 1.50 MiB"), "{r}");
    assert!(
        !r.stderr.contains(" MB") && !r.stderr.contains(" KB"),
        "{r}"
    );
}

#[test]
fn status_prints_a_table() {
    let d = tmp();
    let dir = d.path();
    write_random_file(&dir.join("v.img"), MIB, 8);
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{d}/state\"\n[defaults]\nsnapshot = \"none\"\ntarget_state_dir = \"{d}/t\"\n\
             [[volume]]\nname = \"vol\"\nsource = \"{d}/v.img\"\ntarget = \"{d}/v.replica\"\n\
             [[volume]]\nname = \"other\"\nsource = \"{d}/none.img\"\ntarget = \"{d}/o.replica\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    run_with_deadline(
        snapsync().args(["run", "--once", "--config", s(&config)]),
        DEFAULT_DEADLINE,
    )
    .assert_code(3);
    let r = run_with_deadline(
        snapsync().args(["status", "--config", s(&config)]),
        DEFAULT_DEADLINE,
    );
    r.assert_ok();
    let lines: Vec<_> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{r}");
    for col in [
        "VOLUME",
        "LAST SUCCESS",
        "LAG",
        "GEN",
        "MODE",
        "WIRE",
        "LAST ERROR",
    ] {
        assert!(lines[0].contains(col), "{r}");
    }
    let vol = lines.iter().find(|l| l.starts_with("vol ")).unwrap();
    assert!(vol.contains("full-scan") && vol.contains(" MiB"), "{r}");
    let other = lines.iter().find(|l| l.starts_with("other ")).unwrap();
    assert!(other.contains("never"), "{r}");
    // --json keeps its fields (additions only).
    let j = run_with_deadline(
        snapsync().args(["status", "--json", "--config", s(&config)]),
        DEFAULT_DEADLINE,
    );
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    for key in [
        "volume",
        "source",
        "target",
        "last_success",
        "generation",
        "lag_seconds",
        "mode",
        "last_wire_bytes",
        "base_snapshot",
        "last_error",
        "running",
    ] {
        assert!(v[0].get(key).is_some(), "status --json lost {key}: {v}");
    }
}

#[test]
fn logs_without_a_terminal_are_plain_single_lines() {
    let d = tmp();
    let src = d.path().join("src.img");
    write_random_file(&src, 4 * MIB, 4);
    // A remote shell that says two lines and fails.
    let rsh = write_script(
        &d.path().join("bad-rsh"),
        "echo 'first line' >&2\necho 'second line' >&2\nexit 3",
    );
    let mut c = volume_cmd("sync", &src, "localhost:/x", &d.path().join("st"));
    c.args(["-vv", "--rsh", s(&rsh)]);
    let r = run_with_deadline(&mut c, DEFAULT_DEADLINE);
    r.assert_code(5);
    assert!(!r.stderr.contains('\x1b'), "no colour: {r}");
    assert!(!r.stderr.contains('\r'), "no progress bar: {r}");
    let error: Vec<_> = r
        .stderr
        .lines()
        .filter(|l| l.contains("snapsync: error:"))
        .collect();
    assert_eq!(error.len(), 1, "{r}");
    assert!(error[0].contains("first line | second line"), "{r}");
    // A good sync at -v: every line is a whole event, without a timestamp
    // (journald stamps lines itself).
    let mut c = volume_cmd(
        "sync",
        &src,
        s(&d.path().join("dst.img")),
        &d.path().join("st"),
    );
    c.arg("-v");
    let r = run_with_deadline(&mut c, DEFAULT_DEADLINE);
    r.assert_ok();
    assert!(
        !r.stderr.contains('\x1b') && !r.stderr.contains('\r'),
        "{r}"
    );
    for line in r.stderr.lines() {
        assert!(!line.starts_with("20"), "no timestamp: {line}");
    }
}
