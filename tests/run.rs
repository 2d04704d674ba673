//! `snapsync run` and `status` on image files: reflink snapshots on real
//! btrfs and XFS filesystems (made on loop devices), live copies, the
//! per-volume lock, and config errors. LVM sources are covered in the VM
//! (scripts/vm-test).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A filesystem made on a loop-mounted image, unmounted on drop.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    /// `None` (with a notice) when this machine cannot mount; a hard
    /// failure when SNAPSYNC_REQUIRE_ROOT_TESTS=1 (CI).
    fn new(fs: &str, tmp: &Path) -> Option<Self> {
        let img = tmp.join(format!("{fs}.img"));
        let dir = tmp.join(format!("{fs}-mnt"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(400 * MIB)
            .unwrap();
        let mkfs = Command::new(format!("mkfs.{fs}"))
            .arg("-q")
            .arg(&img)
            .output();
        let mounted = mkfs.is_ok_and(|o| o.status.success())
            && Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
        if !mounted {
            skip_root_test(&format!(
                "cannot make and mount a {fs} filesystem here (root and mkfs.{fs} needed)"
            ));
            return None;
        }
        Some(Self { dir })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Writes `dir/c.toml`; returns its path.
fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("c.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn run_once(config: &Path) -> Run {
    let mut c = snapsync();
    c.args(["run", "--once", "--json", "--config"]).arg(config);
    run_with_deadline(&mut c, DEFAULT_DEADLINE)
}

/// One JSON line per volume.
fn cycles(r: &Run) -> Vec<serde_json::Value> {
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn reflink_cycles(fs: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let Some(m) = Mounted::new(fs, tmp.path()) else {
        return;
    };
    let src = m.dir.join("vm.img");
    write_random_file(&src, 24 * MIB, 1);
    let dst = tmp.path().join("replica.img");
    let cfg = write_config(
        tmp.path(),
        &format!(
            "state_dir = \"{st}\"\n[defaults]\ninterval = \"1s\"\ntarget_state_dir = \"{tst}\"\n\
             [[volume]]\nname = \"vm\"\nsource = \"{src}\"\ntarget = \"{dst}\"\nsnapshot = \"reflink\"\n",
            st = s(&tmp.path().join("st")),
            tst = s(&tmp.path().join("tst")),
            src = s(&src),
            dst = s(&dst),
        ),
    );
    let r = run_once(&cfg);
    r.assert_ok();
    let c = cycles(&r);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0]["ok"], true, "{r}");
    assert_same_content(&src, &dst);
    // The snapshot is gone after the cycle.
    let left: Vec<_> = std::fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "leftover snapshot files: {left:?}");

    // Change the source; the next cycle ships only that, from a snapshot.
    write_at(&src, 5 * MIB, &random_bytes(7, 4096));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = run_once(&cfg);
    r.assert_ok();
    let c = cycles(&r);
    assert_eq!(c[0]["report"]["data_bytes"], 4096, "{r}");
    assert_eq!(c[0]["report"]["generation"], 2, "{r}");
    assert_same_content(&src, &dst);

    // status reports it.
    let st = run(&["status", "--json", "--config", s(&cfg)]);
    st.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v[0]["volume"], "vm");
    assert_eq!(v[0]["generation"], 2);
    assert!(v[0]["last_error"].is_null());
}

#[test]
fn reflink_snapshot_cycles_on_btrfs() {
    reflink_cycles("btrfs");
}

#[test]
fn reflink_snapshot_cycles_on_xfs() {
    reflink_cycles("xfs");
}

#[test]
fn reflink_on_a_filesystem_without_it_fails_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    write_random_file(&src, MIB, 2);
    let cfg = write_config(
        tmp.path(),
        &format!(
            "state_dir = \"{st}\"\n[[volume]]\nname = \"a\"\nsource = \"{src}\"\ntarget = \"{dst}\"\n\
             target_state_dir = \"{st}\"\n",
            st = s(&tmp.path().join("st")),
            src = s(&src),
            dst = s(&tmp.path().join("dst.img")),
        ),
    );
    // The temp dir is on tmpfs or ext4 here: no reflink.
    let fs_has_reflink = Command::new("cp")
        .args(["--reflink=always", s(&src), s(&tmp.path().join("probe"))])
        .status()
        .is_ok_and(|s| s.success());
    if fs_has_reflink {
        eprintln!("skipping: the temp filesystem supports reflink");
        return;
    }
    let r = run_once(&cfg);
    assert_eq!(r.code, Some(3), "{r}");
    let c = cycles(&r);
    let err = c[0]["error"].as_str().unwrap();
    assert!(err.contains("reflink") && err.contains("none"), "{err}");
    // status shows the failure.
    let st = run(&["status", "--config", s(&cfg)]);
    st.assert_ok();
    assert!(st.stdout.contains("reflink"), "{st}");
}

#[test]
fn live_copy_with_snapshot_none_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let dst = tmp.path().join("dst.img");
    write_random_file(&src, 3 * MIB + 5, 3);
    let cfg = write_config(
        tmp.path(),
        &format!(
            "state_dir = \"{st}\"\nparallel = 2\n[defaults]\nsnapshot = \"none\"\ntarget_state_dir = \"{st}\"\n\
             [[volume]]\nname = \"a\"\nsource = \"{src}\"\ntarget = \"{dst}\"\n\
             [[volume]]\nname = \"b\"\nsource = \"{src}\"\ntarget = \"{dst}2\"\n",
            st = s(&tmp.path().join("st")),
            src = s(&src),
            dst = s(&dst),
        ),
    );
    let r = run_once(&cfg);
    r.assert_ok();
    assert!(r.stderr.contains("inconsistent"), "{r}");
    assert_eq!(cycles(&r).len(), 2);
    assert_same_content(&src, &dst);
    assert_same_content(&src, Path::new(&format!("{}2", s(&dst))));
    // Not due again yet (default interval 15m): --once does nothing.
    let r = run_once(&cfg);
    r.assert_ok();
    assert!(cycles(&r).is_empty(), "{r}");
}

#[test]
fn concurrent_run_of_a_volume_is_busy() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    write_random_file(&src, MIB, 4);
    let st = tmp.path().join("st");
    let cfg = write_config(
        tmp.path(),
        &format!(
            "state_dir = \"{st}\"\n[[volume]]\nname = \"a\"\nsource = \"{src}\"\ntarget = \"{dst}\"\n\
             snapshot = \"none\"\ntarget_state_dir = \"{st}\"\n",
            st = s(&st),
            src = s(&src),
            dst = s(&tmp.path().join("dst.img")),
        ),
    );
    std::fs::create_dir_all(&st).unwrap();
    // Hold the volume's lock the way a running cycle does.
    let mut holder = Command::new("flock")
        .arg("-o")
        .arg(st.join("volume-a.lock"))
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = run_once(&cfg);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(r.code, Some(6), "{r}");
    assert!(
        cycles(&r)[0]["error"].as_str().unwrap().contains("locked"),
        "{r}"
    );
}

#[test]
fn bad_config_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "[[volume]]\nname = \"a\"\nsource = \"x\"\n");
    let r = run_once(&cfg);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("target"), "{r}");
    let r = run(&["run", "--once", "--config", "/nonexistent.toml"]);
    assert_eq!(r.code, Some(2), "{r}");
    let good = write_config(
        tmp.path(),
        "[[volume]]\nname = \"a\"\nsource = \"x\"\ntarget = \"y\"\n",
    );
    let r = run(&[
        "run",
        "--once",
        "--snapshot-size",
        "150%",
        "--config",
        s(&good),
    ]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("--snapshot-size"), "{r}");
}

#[test]
fn a_volume_with_several_targets_reads_its_source_once_for_all() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let (a, b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
    let broken = tmp.path().join("no/such/dir/c.img");
    let size = 12 * MIB;
    write_random_file(&src, size, 8);
    let metrics = tmp.path().join("m.prom");
    let config = |targets: &[&Path]| {
        let list: Vec<String> = targets.iter().map(|t| format!("\"{}\"", s(t))).collect();
        write_config(
            tmp.path(),
            &format!(
                "state_dir = \"{st}\"\nmetrics_file = \"{m}\"\n[defaults]\nsnapshot = \"none\"\n\
                 interval = \"1s\"\ntarget_state_dir = \"{st}\"\n\
                 [[volume]]\nname = \"v\"\nsource = \"{src}\"\ntarget = [{list}]\n",
                st = s(&tmp.path().join("st")),
                m = s(&metrics),
                src = s(&src),
                list = list.join(", "),
            ),
        )
    };
    let cfg = config(&[&a, &b]);
    let r = run_once(&cfg);
    r.assert_ok();
    let c = cycles(&r);
    assert_eq!(c.len(), 1, "{r}");
    assert_eq!(c[0]["source_bytes_read"], size, "{r}");
    let t = c[0]["targets"].as_array().unwrap();
    assert_eq!(
        (t[0]["target"].as_str(), t[1]["target"].as_str()),
        (Some(s(&a)), Some(s(&b)))
    );
    assert!(
        t.iter()
            .all(|t| t["ok"] == true && t["report"]["generation"] == 1),
        "{r}"
    );
    // The volume's own fields are its first target's.
    assert_eq!(c[0]["report"]["generation"], 1);
    assert_same_content(&src, &a);
    assert_same_content(&src, &b);

    // A third target that cannot be written: the others go on; the
    // cycle's exit code is the failing target's.
    write_at(&src, 5 * MIB, &random_bytes(9, 100_000));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let cfg = config(&[&a, &broken, &b]);
    let r = run_once(&cfg);
    assert_eq!(r.code, Some(4), "{r}");
    let c = cycles(&r);
    let t = c[0]["targets"].as_array().unwrap();
    assert_eq!(t[1]["ok"], false, "{r}");
    assert_eq!(t[1]["exit"], 4, "{r}");
    assert_eq!(c[0]["exit"], 4);
    assert_eq!(t[0]["report"]["generation"], 2, "{r}");
    // b moved from the second place to the third: its state starts over
    // (a full scan), but its replica's generation goes on.
    assert_eq!(t[2]["report"]["generation"], 2, "{r}");
    assert_same_content(&src, &a);
    assert_same_content(&src, &b);
    assert!(r.stderr.contains("its next cycle is a full scan"), "{r}");

    // status: a line per target in the table, a targets array in JSON.
    let st = run(&["status", "--json", "--config", s(&cfg)]);
    st.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v[0]["target"], s(&a));
    assert_eq!(v[0]["generation"], 2);
    let t = v[0]["targets"].as_array().unwrap();
    assert_eq!(t.len(), 3);
    assert_eq!(t[1]["last_exit"], 4);
    assert_eq!(t[2]["generation"], 2);
    let st = run(&["status", "--config", s(&cfg)]);
    st.assert_ok();
    assert_eq!(
        st.stdout.lines().filter(|l| l.starts_with("v → ")).count(),
        3,
        "{st}"
    );
    // Metrics: a series per target.
    let m = std::fs::read_to_string(&metrics).unwrap();
    for target in [&a, &broken, &b] {
        let series = format!(
            "snapsync_last_exit_code{{volume=\"v\",target=\"{}\"}}",
            s(target)
        );
        assert!(m.contains(&series), "{series} not in {m}");
    }
}
