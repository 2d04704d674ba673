//! A replica is bound to the volume itself, not to its name: identities,
//! safe opens, permissions. One test (at least) per problem:
//! a replaced target, a new device at a reused name, aliases, the
//! check-then-open race, mounted devices, modes, odd file types, long
//! paths, option injection through the host. Loop devices need root; those
//! tests skip without it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("snapsync-id-")
        .tempdir()
        .unwrap()
}

/// Tests of this file that attach loop devices run one at a time: one of
/// them detaches a device and attaches another image at the same number,
/// which a concurrent `losetup -f` could take.
static LOOPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn loops() -> std::sync::MutexGuard<'static, ()> {
    LOOPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loop device over `backing`, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn new(backing: &Path) -> Option<Self> {
        Self::attach(&["-f", "--show"], backing)
    }

    fn attach(args: &[&str], backing: &Path) -> Option<Self> {
        let o = Command::new("losetup")
            .args(args)
            .arg(backing)
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!("losetup: {}", String::from_utf8_lossy(&o.stderr).trim());
            return None;
        }
        let out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        Some(Loop(PathBuf::from(if out.is_empty() {
            args.last().unwrap().to_string()
        } else {
            out
        })))
    }

    fn detach(&self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.detach();
    }
}

fn image(p: &Path, size: u64) {
    std::fs::File::create(p).unwrap().set_len(size).unwrap();
}

fn stale(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("stale"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o777
}

// 1. A target replaced at the same name is a new volume: no inherited
// generation, the old state set aside, never trusted.
#[test]
fn replaced_target_file_starts_over() {
    let d = tmp();
    let (src, dst, state) = (d.path().join("a"), d.path().join("t"), d.path().join("st"));
    write_random_file(&src, 2 * MIB, 1);
    sync_json(&src, s(&dst), &state, &[]);
    let r = sync_json(&src, s(&dst), &state, &[]);
    assert_eq!(r.opt_u("generation"), Some(2), "{r}");
    std::fs::remove_file(&dst).unwrap();
    image(&dst, 0);
    let r = sync_run(&src, s(&dst), &state, &[]);
    r.assert_ok();
    let rep = r.json();
    assert_eq!(
        rep.opt_u("generation"),
        Some(1),
        "a new file inherited the old one's state\n{r}"
    );
    assert_eq!(rep.s("mode"), "full-scan", "{r}");
    assert_same_content(&src, &dst);
    assert_eq!(stale(&state).len(), 1, "the old state is set aside\n{r}");
    assert!(r.stderr.contains("new volume"), "a notice names it\n{r}");
}

// 2. A new device at a reused name is a replica of nothing: no --force.
#[test]
fn loop_device_reattached_to_another_image_is_a_new_volume() {
    let _serial = loops();
    let d = tmp();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    image(&a, 4 * MIB);
    image(&b, 4 * MIB);
    let state = d.path().join("st");
    let (s1, s2) = (d.path().join("s1"), d.path().join("s2"));
    write_random_file(&s1, 2 * MIB, 2);
    write_random_file(&s2, 2 * MIB, 3);
    let Some(lo) = Loop::new(&a) else {
        return skip_root_test("loop_device_reattached: no loop device");
    };
    sync_json(&s1, s(&lo.0), &state, &[]);
    lo.detach();
    let dev = lo.0.clone();
    std::mem::forget(lo);
    let Some(lo2) = Loop::attach(&[s(&dev)], &b) else {
        return skip_root_test("loop_device_reattached: cannot reattach");
    };
    let r = sync_run(&s2, s(&lo2.0), &state, &[]);
    r.assert_ok();
    assert_eq!(sha256_prefix(&b, Some(2 * MIB)), sha256_file(&s2));
    assert_eq!(stale(&state).len(), 1, "{r}");
}

/// A loop device's backing file deleted and replaced at the same path:
/// the device still reads the deleted file, so it keeps its identity (from
/// `LOOP_GET_STATUS64`, not from the path sysfs shows), and a device over
/// the new file is another volume with a state of its own.
#[test]
fn loop_backing_file_replaced_at_its_path_keeps_the_device_identity() {
    let _serial = loops();
    let d = tmp();
    let img = d.path().join("disk.img");
    image(&img, 4 * MIB);
    let window = ["-f", "--show", "-o", "4096", "--sizelimit", "2097152"];
    let Some(lo1) = Loop::attach(&window, &img) else {
        return skip_root_test("loop backing file replaced: no loop device");
    };
    let id = |p: &Path| snapshot::identity::of_path(p, Path::new("/sys")).unwrap();
    let before = id(&lo1.0);
    let ino = std::fs::metadata(&img).unwrap().ino();
    assert!(before.strong, "{before}");
    assert!(
        before.key.ends_with(&format!(":{ino}:4096:2097152")),
        "backing inode, offset and size limit: {before}"
    );
    std::fs::remove_file(&img).unwrap();
    image(&img, 4 * MIB);
    assert_eq!(
        id(&lo1.0),
        before,
        "the device still reads the deleted file"
    );
    let Some(lo2) = Loop::new(&img) else {
        return skip_root_test("loop backing file replaced: no second loop device");
    };
    assert_ne!(id(&lo2.0), before, "a device over the new file");
    // End to end: the two devices never share a state, so the second is
    // a replica of nothing (no --force).
    let state = d.path().join("st");
    let (s1, s2) = (d.path().join("s1"), d.path().join("s2"));
    write_random_file(&s1, MIB, 11);
    write_random_file(&s2, MIB, 12);
    sync_json(&s1, s(&lo1.0), &state, &[]);
    let r = sync_run(&s2, s(&lo2.0), &state, &[]);
    r.assert_ok();
    assert_eq!(sha256_prefix(&img, Some(MIB)), sha256_file(&s2));
}

/// A disk swapped at the same name, staged with a sysfs fixture giving the
/// loop device first one WWN, then another.
#[test]
fn swapped_disk_by_wwn_is_a_new_volume() {
    let _serial = loops();
    let d = tmp();
    let backing = d.path().join("disk.img");
    image(&backing, 4 * MIB);
    let Some(lo) = Loop::new(&backing) else {
        return skip_root_test("swapped_disk: no loop device");
    };
    let rdev = std::fs::metadata(&lo.0).unwrap().rdev();
    let (maj, min) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let sys = d.path().join("sys");
    let dev = sys.join(format!("dev/block/{maj}:{min}"));
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(dev.join("wwid"), "naa.disk-one\n").unwrap();
    let state = d.path().join("st");
    let (s1, s2) = (d.path().join("s1"), d.path().join("s2"));
    write_random_file(&s1, MIB, 4);
    write_random_file(&s2, MIB, 5);
    let with_sys = |src: &Path| {
        let mut c = volume_cmd("sync", src, s(&lo.0), &state);
        c.arg("--json").env("SNAPSYNC_SYS_ROOT", &sys);
        run_with_deadline(&mut c, DEFAULT_DEADLINE)
    };
    with_sys(&s1).assert_ok();
    // The same disk: another source is refused, as always.
    with_sys(&s2)
        .assert_code(4)
        .assert_says("--force", "same disk");
    std::fs::write(dev.join("wwid"), "naa.disk-two\n").unwrap();
    let r = with_sys(&s2);
    r.assert_ok();
    assert_eq!(stale(&state).len(), 1, "{r}");
}

// 3. Aliases share one state and one lock.
#[test]
fn hard_link_alias_shares_state_and_lock() {
    let d = tmp();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (real, alias) = (d.path().join("real.img"), d.path().join("alias.img"));
    let state = d.path().join("st");
    write_random_file(&a, MIB, 6);
    write_random_file(&b, MIB, 7);
    sync_json(&a, s(&real), &state, &[]);
    std::fs::hard_link(&real, &alias).unwrap();
    let before = sha256_file(&real);
    sync_run(&b, s(&alias), &state, &[])
        .assert_code(4)
        .assert_says("--force", "an alias is still a replica of a");
    assert_unchanged(&real, &before, "written through an alias");
    // The lock too: hold real's, sync through the alias.
    let lock = lock_path(&state, &real);
    let f = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    sync_run(&a, s(&alias), &state, &[]).assert_code(6);
}

#[test]
fn symlink_alias_of_a_block_device_shares_state() {
    let _serial = loops();
    let d = tmp();
    let backing = d.path().join("disk.img");
    image(&backing, 4 * MIB);
    let Some(lo) = Loop::new(&backing) else {
        return skip_root_test("symlink alias: no loop device");
    };
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&lo.0, &link).unwrap();
    let state = d.path().join("st");
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    write_random_file(&a, MIB, 8);
    write_random_file(&b, MIB, 9);
    sync_json(&a, s(&lo.0), &state, &[]);
    sync_run(&b, s(&link), &state, &[])
        .assert_code(4)
        .assert_says("--force", "the link is the same device");
    // And the source: a symlink to it is the same source.
    let src_link = d.path().join("a-link");
    std::os::unix::fs::symlink(&a, &src_link).unwrap();
    sync_json(&src_link, s(&link), &state, &[]);
}

// 4. Check by name, then open by name: a symlink swapped in between must
// not lead outside. The swap runs in a tight loop for a bounded time.
#[test]
fn symlink_swap_race_never_escapes_the_allow_list() {
    let d = tmp();
    let allowed = d.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let outside = d.path().join("outside");
    std::fs::write(&outside, b"secret").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
    let target = allowed.join("t.img");
    write_random_file(&target, 64 * KIB, 10);
    let decoy = allowed.join(".decoy");
    std::os::unix::fs::symlink(&outside, &decoy).unwrap();
    let planted = allowed.join("new.img");
    let far = d.path().join("created-outside");
    let src = d.path().join("src");
    write_random_file(&src, 64 * KIB, 11);
    let state = d.path().join("st");
    let rsh = forced_rsh(d.path(), &format!("{}/*", s(&allowed)), &state);
    let args = remote_args(&rsh);
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, target, decoy, planted, far) = (
            stop.clone(),
            target.clone(),
            decoy.clone(),
            planted.clone(),
            far.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &target,
                    rustix::fs::CWD,
                    &decoy,
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                let _ = std::os::unix::fs::symlink(&far, &planted);
                let _ = std::fs::remove_file(&planted);
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(4);
    let mut runs = 0;
    while Instant::now() < until {
        for dst in [&target, &planted] {
            let _ = sync_run(&src, &format!("h:{}", s(dst)), &state, &strs(&args));
            runs += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(runs > 4);
    assert_eq!(std::fs::read(&outside).unwrap(), b"secret", "wrote outside");
    assert!(!far.exists(), "created a file outside the allow-list");
}

#[test]
fn symlinked_directory_is_refused() {
    let d = tmp();
    let real = d.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let via = d.path().join("via");
    std::os::unix::fs::symlink(&real, &via).unwrap();
    let src = d.path().join("src");
    write_random_file(&src, 64 * KIB, 12);
    let r = sync_run(&src, s(&via.join("x.img")), &d.path().join("st"), &[]);
    r.assert_code(4).assert_says("symbolic link", "says why");
    assert!(!real.join("x.img").exists());
}

// 5. A mounted block device is refused (exit 4), naming the mount.
#[test]
fn mounted_loop_device_is_refused_and_untouched() {
    let _serial = loops();
    let d = tmp();
    let backing = d.path().join("fs.img");
    image(&backing, 16 * MIB);
    let Some(lo) = Loop::new(&backing) else {
        return skip_root_test("mounted loop: no loop device");
    };
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&lo.0)
        .status();
    if !mkfs.is_ok_and(|s| s.success()) {
        return skip_root_test("mounted loop: no mkfs.ext4");
    }
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if !Command::new("mount")
        .arg(&lo.0)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success())
    {
        return skip_root_test("mounted loop: cannot mount");
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let m = Umount(mnt.clone());
    let src = d.path().join("src");
    write_random_file(&src, 4 * MIB, 13);
    let r = sync_run(&src, s(&lo.0), &d.path().join("st"), &[]);
    r.assert_code(4)
        .assert_says(&format!("mounted at {}", s(&mnt)), "names the holder");
    drop(m);
    // (Mounting and unmounting change the superblock's times: check the
    // file system, and that none of the source reached the device.)
    assert_ne!(read_at(&lo.0, 0, 64 * 1024), read_at(&src, 0, 64 * 1024));
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&lo.0)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the file system was damaged: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

// 6. New replicas, state, lock: 0600; the state dir 0700.
#[test]
fn replica_and_state_files_are_private() {
    let d = tmp();
    let src = d.path().join("src");
    write_random_file(&src, MIB, 14);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (dst, state) = (d.path().join("dst"), d.path().join("st"));
    sync_json(&src, s(&dst), &state, &[]);
    // A second sync goes through the journal.
    write_random_file(&src, MIB, 15);
    sync_json(&src, s(&dst), &state, &[]);
    assert_eq!(mode(&dst), 0o600);
    assert_eq!(mode(&state), 0o700);
    let files: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.path())
        .collect();
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    // An existing state dir that is too open is tightened, with a notice.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = sync_run(&src, s(&dst), &state, &[]);
    r.assert_ok().assert_says("tightened", "notice");
    assert_eq!(mode(&state), 0o700);
}

// 7. FIFOs and char devices are refused before anything opens them.
#[test]
fn fifo_and_char_device_targets_are_refused_without_blocking() {
    let d = tmp();
    let src = d.path().join("src");
    write_random_file(&src, 64 * KIB, 16);
    let fifo = d.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let chr = d.path().join("null");
    let chr_ok = Command::new("mknod")
        .arg(&chr)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    let state = d.path().join("st");
    let mut targets = vec![fifo.clone()];
    if chr_ok {
        targets.push(chr);
    }
    for t in &targets {
        for (what, extra) in [
            ("sync", vec!["--dry-run"]),
            ("sync", vec![]),
            ("verify", vec![]),
        ] {
            let mut c = volume_cmd(what, &src, s(t), &state);
            c.args(&extra);
            let r = run_with_deadline(&mut c, Duration::from_secs(10));
            r.assert_code(4);
            assert!(
                r.stderr.contains("FIFO") || r.stderr.contains("character device"),
                "{r}"
            );
        }
    }
}

// 8. A 253-byte target path works (names no longer grow with the path).
#[test]
fn long_target_path_works() {
    let d = tmp();
    let mut dir = d.path().to_path_buf();
    while s(&dir).len() < 200 {
        dir.push("a".repeat(40));
    }
    std::fs::create_dir_all(&dir).unwrap();
    let name = "b".repeat(253 - s(&dir).len() - 1);
    let dst = dir.join(name);
    assert_eq!(s(&dst).len(), 253);
    let src = d.path().join("src");
    write_random_file(&src, MIB, 17);
    sync_json(&src, s(&dst), &d.path().join("st"), &[]);
    assert_same_content(&src, &dst);
}

// 9. A host that looks like an ssh option is a usage error; nothing runs.
#[test]
fn option_like_host_is_refused_and_nothing_runs() {
    let d = tmp();
    let src = d.path().join("src");
    write_random_file(&src, 64 * KIB, 18);
    // As a user would type it: no '/' before the ':', so it is a host.
    let pwned = d.path().join("pwned");
    let dst = "-oProxyCommand=touch pwned:x".to_owned();
    for what in ["sync", "verify"] {
        let mut c = volume_cmd(what, &src, &dst, &d.path().join("st"));
        c.current_dir(d.path());
        run_with_deadline(&mut c, DEFAULT_DEADLINE).assert_code(2);
    }
    let cfg = d.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[[volume]]\nname = \"v\"\nsource = {:?}\ntarget = {:?}\nsnapshot = \"none\"\n",
            s(&d.path().join("src-state")),
            s(&src),
            dst
        ),
    )
    .unwrap();
    let mut c = snapsync();
    c.args(["run", "--once", "--config", s(&cfg)])
        .current_dir(d.path());
    run_with_deadline(&mut c, DEFAULT_DEADLINE).assert_code(2);
    assert!(!pwned.exists(), "the host ran as an ssh option");
}

// Upgrade: an old path-keyed state is not trusted (no --force needed).
#[test]
fn old_path_keyed_state_is_ignored_with_a_notice() {
    let d = tmp();
    let (src, dst, state) = (d.path().join("a"), d.path().join("t"), d.path().join("st"));
    write_random_file(&src, MIB, 19);
    image(&dst, MIB);
    std::fs::create_dir_all(&state).unwrap();
    let key: String = s(&dst).replace('%', "%25").replace('/', "%2F");
    std::fs::write(
        state.join(format!("{key}.state.json")),
        r#"{"source_id":"path:/other","generation":{"number":7,"snapshot":"x"},"consistent":true,"in_progress":null,"block_size":65536,"committed_at":1}"#,
    )
    .unwrap();
    let r = sync_run(&src, s(&dst), &state, &[]);
    r.assert_ok().assert_says("older version", "notice");
    assert_eq!(r.json().opt_u("generation"), Some(1), "{r}");
    assert_same_content(&src, &dst);
    assert!(!state.join(format!("{key}.state.json")).exists());
}

// A block-device target must exist: nothing is created under /dev.
#[test]
fn no_new_file_under_dev() {
    let d = tmp();
    let src = d.path().join("src");
    write_random_file(&src, 64 * KIB, 20);
    let dst = Path::new("/dev/snapsync-test-no-such-device");
    let r = sync_run(&src, s(dst), &d.path().join("st"), &[]);
    r.assert_code(4)
        .assert_says("must already exist", "says why");
    assert!(!dst.exists());
}

// A file replica's identity belongs to its file system, not to the device
// number it is mounted through: the same ext4 mounted from another loop
// device (a disk moved, a dm device renumbered after a reboot) keeps the
// replica's generation.
#[test]
fn file_replica_keeps_its_state_across_a_remount_from_another_device() {
    let _l = loops();
    let d = tmp();
    let fs_img = d.path().join("fs.img");
    image(&fs_img, 64 * MIB);
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&fs_img)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_root_test("mkfs.ext4 failed");
        return;
    }
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (src, state) = (d.path().join("src"), d.path().join("st"));
    write_random_file(&src, MIB, 31);
    let dst = mnt.join("replica.img");
    let mount = |dev: &Path| {
        assert!(Command::new("mount")
            .arg(dev)
            .arg(&mnt)
            .status()
            .unwrap()
            .success());
    };
    let umount = || assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    // Two loop devices, attached at once so their numbers differ.
    let (Some(first), Some(second)) = (Loop::new(&fs_img), Loop::new(&fs_img)) else {
        skip_root_test("no loop devices");
        return;
    };
    mount(&first.0);
    sync_json(&src, s(&dst), &state, &[]);
    let dev_before = std::fs::metadata(&dst).unwrap().dev();
    umount();
    mount(&second.0);
    assert_ne!(std::fs::metadata(&dst).unwrap().dev(), dev_before);
    let r = sync_json(&src, s(&dst), &state, &[]);
    umount();
    assert_eq!(r.opt_u("generation"), Some(2), "{r}");
    assert!(stale(&state).is_empty(), "nothing set aside");
}

// Upgrade: a sealed journal left by the path-keyed version on this very
// volume (its apply interrupted) is applied, then the replica gets a full
// scan; one recording another volume's size is discarded, never applied.
#[test]
fn old_sealed_journal_is_applied_only_on_a_volume_of_its_size() {
    use snapsync::journal::Journal;
    use snapsync::state::StatePaths;
    let d = tmp();
    let (src, dst, state) = (d.path().join("a"), d.path().join("t"), d.path().join("st"));
    write_random_file(&src, MIB, 41);
    std::fs::copy(&src, &dst).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let gen = wire::Generation {
        number: 7,
        snapshot: "old".into(),
    };
    let legacy = StatePaths::new(&state, &dst);
    let seal = |size: u64, byte: u8| {
        let mut j = Journal::create(&legacy.journal, 1 << 30).unwrap();
        assert!(!j.append_data(0, &[byte; 4096]).unwrap());
        j.seal(&gen, "path:/old/source", size).unwrap();
    };

    // Its size: applied (the replica's first 4 KiB become 0xAB), then the
    // full scan of the same session makes the replica equal the source.
    seal(MIB, 0xAB);
    let r = sync_json(&src, s(&dst), &state, &[]);
    let rec = r.opt_s("recovered").unwrap_or_default();
    assert!(
        rec.contains("applied the sealed journal of generation 7"),
        "{r}"
    );
    assert_eq!(r.s("mode"), "full-scan", "{r}");
    assert!(
        r.u("data_bytes") >= 4096,
        "the applied bytes were shipped back: {r}"
    );
    assert!(!legacy.journal.exists());
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());

    // Another size: another volume's journal, discarded untouched.
    seal(2 * MIB, 0xCD);
    let r = sync_json(&src, s(&dst), &state, &[]);
    let rec = r.opt_s("recovered").unwrap_or_default();
    assert!(
        rec.contains("discarded a journal left by an older version"),
        "{r}"
    );
    assert_eq!(r.u("data_bytes"), 0, "nothing was applied: {r}");
    assert!(!legacy.journal.exists());
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
}
