//! The `snapsync` binary against a live Ceph cluster with `rbd:` targets:
//! runs when `CEPH_CONF` names one (as `scripts/ceph-cluster up` prints),
//! else each test prints a skip notice; `SNAPSYNC_REQUIRE_CEPH=1` (set by
//! `scripts/test`'s Ceph step) makes a missing cluster a failure. The pool
//! is `$SNAPSYNC_CEPH_POOL` (default `snapsync`). Results are checked with
//! the `rbd` CLI, which shares no code with snapsync.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn pool() -> String {
    std::env::var("SNAPSYNC_CEPH_POOL").unwrap_or_else(|_| "snapsync".into())
}

/// Whether a cluster is there (else a skip notice, or a failure when one
/// is required).
fn have_cluster(test: &str) -> bool {
    let conf = std::env::var_os("CEPH_CONF").filter(|c| Path::new(c).exists());
    if conf.is_none() {
        if std::env::var("SNAPSYNC_REQUIRE_CEPH").as_deref() == Ok("1") {
            panic!("SNAPSYNC_REQUIRE_CEPH=1 but CEPH_CONF does not name a cluster's ceph.conf");
        }
        eprintln!("skipping {test}: no Ceph cluster (set CEPH_CONF; scripts/ceph-cluster up DIR)");
        return false;
    }
    true
}

fn rbd_out(args: &[&str]) -> std::process::Output {
    Command::new("rbd")
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .expect("running rbd")
}

fn rbd(args: &[&str]) -> Vec<u8> {
    let out = rbd_out(args);
    assert!(
        out.status.success(),
        "rbd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The image's `snapsync.state`, read while a sync runs. Not with `rbd
/// image-meta get`: that opens the image and so holds a watch, which a
/// sync opening the image at that moment rightly refuses as another user.
/// `rados` reads the header object's omap and opens no image.
struct StateProbe {
    header: String,
}

impl StateProbe {
    /// Looks the image's id up (before the sync starts).
    fn new(image: &str) -> StateProbe {
        let info: serde_json::Value =
            serde_json::from_slice(&rbd(&["info", "--format", "json", image])).unwrap();
        let id = info["id"].as_str().expect("rbd info gives the image id");
        StateProbe {
            header: format!("rbd_header.{id}"),
        }
    }

    fn read(&self) -> String {
        let out = Command::new("rados")
            .args(["-p", &pool(), "getomapval", &self.header])
            .args(["metadata_snapsync.state", "/dev/stdout"])
            .stderr(Stdio::null())
            .output()
            .expect("running rados");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `rbd export POOL/IMAGE[@SNAP] -`.
fn export(spec: &str) -> Vec<u8> {
    rbd(&["export", "--no-progress", spec, "-"])
}

/// Names of the image's snapshots.
fn snaps(image: &str) -> Vec<String> {
    let out = rbd(&["snap", "ls", "--format", "json", image]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Removes the image and all its snapshots, if it exists.
fn remove_image(image: &str) {
    if rbd_out(&["info", image]).status.success() {
        rbd(&["snap", "purge", "--no-progress", image]);
        rbd(&["rm", "--no-progress", image]);
    }
}

/// A test's image (`POOL/t-TEST-PID`, none left from before) and scratch dir.
struct Fix {
    dir: tempfile::TempDir,
    image: String,
    src: std::path::PathBuf,
    state: std::path::PathBuf,
}

impl Fix {
    fn new(test: &str) -> Fix {
        let image = format!("{}/s-{test}-{}", pool(), std::process::id());
        remove_image(&image);
        let dir = tempfile::Builder::new()
            .prefix("snapsync-rbd-")
            .tempdir()
            .unwrap();
        let src = dir.path().join("src.img");
        let state = dir.path().join("state");
        Fix {
            dir,
            image,
            src,
            state,
        }
    }

    fn dst(&self) -> String {
        format!("rbd:{}", self.image)
    }

    fn sync(&self, extra: &[&str]) -> Run {
        sync_run(&self.src, &self.dst(), &self.state, extra)
    }

    fn head(&self) -> Vec<u8> {
        export(&self.image)
    }

    fn generation(&self, n: u64) -> Vec<u8> {
        export(&format!("{}@snapsync-{n}", self.image))
    }
}

impl Drop for Fix {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            remove_image(&self.image);
        }
    }
}

#[test]
fn first_copy_and_five_delta_cycles_are_byte_exact_generations() {
    if !have_cluster("rbd cycles") {
        return;
    }
    let f = Fix::new("cycles");
    write_random_file(&f.src, 8 * MIB, 1);
    let r = f.sync(&[]).assert_ok().json();
    assert_eq!(r.u("generation"), 1, "{r}");
    assert!(
        r.opt_s("recovered").unwrap_or_default().contains("created"),
        "{r}"
    );
    assert_eq!(f.generation(1), std::fs::read(&f.src).unwrap());
    assert_eq!(snaps(&f.image), ["snapsync-1"]);
    // A snapshot of the operator's own is never pruned.
    rbd(&["snap", "create", &format!("{}@mine", f.image)]);

    let mut rng = Rng::new(7);
    let mut expected = vec![std::fs::read(&f.src).unwrap()];
    for cycle in 2..=6u64 {
        // Scattered writes, and in one cycle the source grows.
        for _ in 0..8 {
            let len = rng.range(1, 200_000);
            let off = rng.below(file_len(&f.src) - len);
            write_at(&f.src, off, &rng.bytes(len as usize));
        }
        if cycle == 4 {
            append_random(&f.src, 3 * MIB + 4096, 99);
        }
        let r = f.sync(&[]).assert_ok().json();
        assert_eq!(r.u("generation"), cycle, "{r}");
        assert!(
            r.u("target_bytes_written") < 5 * MIB,
            "only the change is written: {r}"
        );
        let want = std::fs::read(&f.src).unwrap();
        assert!(f.generation(cycle) == want, "snapsync-{cycle} differs");
        assert!(f.head() == want, "head differs after cycle {cycle}");
        expected.push(want);
        // keep_generations = 2: the newest two, and the operator's own.
        let mut s = snaps(&f.image);
        s.sort();
        let mut want_snaps = vec![
            "mine".to_owned(),
            format!("snapsync-{}", cycle - 1),
            format!("snapsync-{cycle}"),
        ];
        want_snaps.sort();
        assert_eq!(s, want_snaps);
    }
    // The kept previous generation is still exactly what it was.
    assert!(f.generation(5) == expected[4]);
    let meta = rbd(&["image-meta", "get", &f.image, "snapsync.state"]);
    let st: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(st["generation"]["number"], 6, "{st}");
    assert_eq!(st["consistent"], true, "{st}");

    // verify agrees, also with --ceph-conf given explicitly.
    run(&[
        "verify",
        s(&f.src),
        &f.dst(),
        "--state-dir",
        s(&f.state),
        "--ceph-conf",
        &std::env::var("CEPH_CONF").unwrap(),
    ])
    .assert_ok();
}

#[test]
fn a_write_behind_snapsyncs_back_is_found_by_verify_and_repaired_by_a_full_scan() {
    if !have_cluster("rbd verify") {
        return;
    }
    let f = Fix::new("verify");
    write_random_file(&f.src, 4 * MIB, 2);
    f.sync(&[]).assert_ok();
    run(&["verify", s(&f.src), &f.dst(), "--state-dir", s(&f.state)]).assert_ok();
    // `rbd bench` writes a pattern into the head.
    rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4096",
        "--io-total",
        "8192",
        &f.image,
    ]);
    let v = run(&["verify", s(&f.src), &f.dst(), "--state-dir", s(&f.state)]);
    v.assert_code(7);
    let r = f.sync(&[]).assert_ok().json();
    assert!(
        r.opt_s("recovered")
            .unwrap_or_default()
            .contains("changed since snapsync-1"),
        "{r}"
    );
    assert_eq!(r.u("generation"), 2, "{r}");
    assert!(f.generation(2) == std::fs::read(&f.src).unwrap());
}

/// A replica marked mid-apply (its state says inconsistent, its head holds
/// part of the next generation) is put back to the newest snapsync-N when
/// it is next opened, before anything else looks at it.
#[test]
fn an_interrupted_apply_is_rolled_back_to_the_previous_generation() {
    if !have_cluster("rbd rollback") {
        return;
    }
    let f = Fix::new("rollback");
    write_random_file(&f.src, 16 * MIB, 3);
    f.sync(&[]).assert_ok();
    let gen1 = std::fs::read(&f.src).unwrap();
    // The whole source changes; a slow session is interrupted mid-apply.
    write_random_file(&f.src, 16 * MIB, 4);
    let probe = StateProbe::new(&f.image);
    let mut child = snapsync()
        .args(["sync", s(&f.src), &f.dst(), "--state-dir", s(&f.state)])
        .args(["--json", "--bwlimit", "2M", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the apply has begun (the state says inconsistent), then
    // interrupt it.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if probe.read().contains("\"consistent\":false") {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the sync ended before its apply began: {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the apply never began");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // SIGTERM: the client closes the image (a SIGKILLed one keeps its
    // watch for 30 s, and the image would be refused as in use).
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "interrupted");
    assert!(
        f.head() != gen1,
        "the interrupted apply wrote part of gen 2"
    );

    // The next open (here a dry run) rolls it back first.
    let r = f.sync(&["--dry-run"]).assert_ok().json();
    assert!(
        r.opt_s("recovered")
            .unwrap_or_default()
            .contains("rolled an interrupted apply back to generation 1"),
        "{r}"
    );
    assert!(f.head() == gen1, "head rolled back to generation 1");
    assert!(f.generation(1) == gen1);
    // And the target vouches for generation 1 again: nothing since it.
    let diff = rbd(&[
        "diff",
        "--from-snap",
        "snapsync-1",
        "--format",
        "json",
        &f.image,
    ]);
    assert_eq!(String::from_utf8_lossy(&diff).trim(), "[]");
    let r = f.sync(&[]).assert_ok().json();
    assert_eq!(r.u("generation"), 2, "{r}");
    assert!(f.generation(2) == std::fs::read(&f.src).unwrap());
}

#[test]
fn a_recreated_image_is_a_new_target() {
    if !have_cluster("rbd recreated") {
        return;
    }
    let f = Fix::new("recreated");
    write_random_file(&f.src, 4 * MIB, 5);
    f.sync(&[]).assert_ok();
    f.sync(&[]).assert_ok();
    assert_eq!(snaps(&f.image), ["snapsync-1", "snapsync-2"]);
    // Removed and created again under the same name (a new image id).
    remove_image(&f.image);
    rbd(&["create", "--size", "4M", &f.image]);
    let r = f.sync(&[]).assert_ok().json();
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert_eq!(r.u("generation"), 1, "a new target starts over: {r}");
    assert_eq!(r.u("target_bytes_written"), 4 * MIB, "{r}");
    assert!(f.generation(1) == std::fs::read(&f.src).unwrap());
}

#[test]
fn an_image_in_use_elsewhere_is_refused() {
    if !have_cluster("rbd in use") {
        return;
    }
    let f = Fix::new("inuse");
    write_random_file(&f.src, 4 * MIB, 6);
    f.sync(&[]).assert_ok();
    let mut bench = Command::new("rbd")
        .args(["bench", "--io-type", "write", "--io-size", "4096"])
        .args(["--io-total", "100G", &f.image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Until rbd bench has opened it.
    std::thread::sleep(Duration::from_secs(2));
    let r = f.sync(&[]);
    let _ = Command::new("kill")
        .args(["-TERM", &bench.id().to_string()])
        .status();
    bench.wait().unwrap();
    r.assert_code(4)
        .assert_says("is in use", "watchers refuse it");
    // Nothing was recorded: the next run (image free) goes on from gen 1.
    let r = f.sync(&[]).assert_ok().json();
    assert_eq!(r.u("generation"), 2, "{r}");
}

#[test]
fn a_gateway_serves_rbd_targets_its_allow_list_permits() {
    if !have_cluster("rbd gateway") {
        return;
    }
    let f = Fix::new("gw");
    write_random_file(&f.src, 4 * MIB, 8);
    // A forced command allowing the pool's images.
    let allow = format!("rbd:{}/*", pool());
    let rsh = forced_rsh(f.dir.path(), &allow, &f.state);
    let dst = format!("gw:rbd:{}", f.image);
    let mut args = remote_args(&rsh);
    args.push("--json".into());
    let r = run(&[
        vec!["sync".into(), s(&f.src).into(), dst.clone()],
        args.clone(),
    ]
    .concat());
    r.assert_ok();
    assert_eq!(r.json().u("generation"), 1);
    assert!(f.generation(1) == std::fs::read(&f.src).unwrap());
    // verify through the gateway too.
    let v = run(&[
        vec!["verify".into(), s(&f.src).into(), dst],
        remote_args(&rsh),
    ]
    .concat());
    v.assert_ok();
    // An image of a namespace is not matched by `rbd:POOL/*`.
    let other = format!("gw:rbd:{}/ns/x", pool());
    let r = run(&[vec!["sync".into(), s(&f.src).into(), other], args].concat());
    r.assert_code(4)
        .assert_says("allow", "not on the allow list");
}

#[test]
fn rbd_names_are_checked_before_anything_connects() {
    // No cluster needed: a malformed name is a usage error.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_random_file(&src, MIB, 1);
    let r = sync_run(&src, "rbd:pool-only", &dir.path().join("state"), &[]);
    r.assert_code(2)
        .assert_says("rbd:POOL/IMAGE", "names the form");
}

/// The caps the README lists are enough: `mon 'profile rbd'` and
/// `osd 'profile rbd pool=POOL'`, given by `--ceph-id` and `--ceph-conf`.
#[test]
fn a_least_privilege_cephx_user_is_enough() {
    if !have_cluster("rbd caps") {
        return;
    }
    let f = Fix::new("caps");
    let user = format!("snapsync-t{}", std::process::id());
    let keyring = f.dir.path().join("keyring");
    let ok = Command::new("ceph")
        .args(["auth", "get-or-create", &format!("client.{user}")])
        .args([
            "mon",
            "profile rbd",
            "osd",
            &format!("profile rbd pool={}", pool()),
        ])
        .arg("-o")
        .arg(&keyring)
        .status()
        .unwrap();
    assert!(ok.success());
    let conf = f.dir.path().join("ceph.conf");
    let mut text = std::fs::read_to_string(std::env::var("CEPH_CONF").unwrap()).unwrap();
    text.push_str(&format!("\n[client.{user}]\nkeyring = {}\n", s(&keyring)));
    std::fs::write(&conf, text).unwrap();
    write_random_file(&f.src, 4 * MIB, 10);
    let args = ["--ceph-conf", s(&conf), "--ceph-id", &user];
    f.sync(&args).assert_ok();
    write_at(&f.src, MIB, &random_bytes(11, 5000));
    let r = f.sync(&args).assert_ok().json();
    assert_eq!(r.u("generation"), 2, "{r}");
    assert!(f.generation(2) == std::fs::read(&f.src).unwrap());
    let _ = Command::new("ceph")
        .args(["auth", "del", &format!("client.{user}")])
        .status();
}

/// Through a gateway, the source is killed (SIGKILL) mid-apply: `serve`
/// there sees the connection end, closes the image, and the next session
/// rolls the replica back to the previous generation before it goes on.
#[test]
fn a_killed_source_leaves_a_gateway_replica_that_rolls_back() {
    if !have_cluster("rbd killed") {
        return;
    }
    let f = Fix::new("killed");
    let rsh = forced_rsh(f.dir.path(), &format!("rbd:{}/*", pool()), &f.state);
    let dst = format!("gw:rbd:{}", f.image);
    let sync = |extra: &[&str]| {
        let mut args: Vec<String> = vec!["sync".into(), s(&f.src).into(), dst.clone()];
        args.extend(remote_args(&rsh));
        args.push("--json".into());
        args.extend(extra.iter().map(|a| a.to_string()));
        run(&args)
    };
    write_random_file(&f.src, 16 * MIB, 12);
    sync(&[]).assert_ok();
    let gen1 = std::fs::read(&f.src).unwrap();
    write_random_file(&f.src, 16 * MIB, 13);
    let probe = StateProbe::new(&f.image);
    let mut child = snapsync()
        // Slow enough that the apply stays under way for half a minute:
        // the `rbd` polls below are slow on a loaded machine.
        .args(["sync", s(&f.src), &dst, "--quiet", "--bwlimit", "512"])
        .args(remote_args(&rsh))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if probe.read().contains("\"consistent\":false") {
            break;
        }
        assert!(Instant::now() < deadline, "the apply never began");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    // serve on the gateway ends on its own and lets the image go.
    let deadline = Instant::now() + Duration::from_secs(20);
    while String::from_utf8_lossy(&rbd(&["status", "--format", "json", &f.image]))
        .contains("\"address\"")
    {
        assert!(Instant::now() < deadline, "serve kept the image open");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(f.head() != gen1, "the killed apply wrote part of gen 2");
    let r = sync(&[]);
    r.assert_ok();
    let r = r.json();
    assert!(
        r.opt_s("recovered")
            .unwrap_or_default()
            .contains("rolled an interrupted apply back to generation 1"),
        "{r}"
    );
    assert_eq!(r.u("generation"), 2, "{r}");
    assert!(f.generation(1) == gen1, "generation 1 kept");
    assert!(f.generation(2) == std::fs::read(&f.src).unwrap());
}

#[test]
fn fan_out_to_a_file_and_an_image_reads_the_source_once() {
    if !have_cluster("rbd fan-out") {
        return;
    }
    let f = Fix::new("fanout");
    let size = 12 * MIB;
    write_random_file(&f.src, size, 11);
    let file = f.dir.path().join("replica.img");
    let fan = |extra: &[&str]| -> serde_json::Value {
        let mut c = volume_cmd("sync", &f.src, s(&file), &f.state);
        c.arg(f.dst()).arg("--json").args(extra);
        let r = run_with_deadline(&mut c, DEFAULT_DEADLINE);
        r.assert_ok();
        r.json().0
    };
    for cycle in 1..=3u64 {
        if cycle > 1 {
            write_at(&f.src, cycle * MIB + 777, &random_bytes(cycle, 300_000));
        }
        let doc = fan(&[]);
        assert_eq!(doc["source_bytes_read"], size, "{doc}");
        let t = doc["targets"].as_array().unwrap();
        assert_eq!(t[0]["target"], s(&file));
        assert_eq!(t[1]["target"], f.dst().as_str());
        for t in t {
            assert_eq!(t["ok"], true, "{t}");
            assert_eq!(t["report"]["generation"], cycle, "{t}");
        }
        let want = std::fs::read(&f.src).unwrap();
        assert!(std::fs::read(&file).unwrap() == want, "file, cycle {cycle}");
        assert!(f.generation(cycle) == want, "snapsync-{cycle} differs");
    }
}
