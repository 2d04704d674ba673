//! Hostile or broken peers against the real binary: a scripted fake target
//! for `snapsync sync`, a scripted fake source for `snapsync serve`, both
//! speaking the real protocol. One test per way a peer used to hurt the
//! other end; each asserts exit code, time (generous slack), peak RSS
//! (exact bound) and the state left behind.

mod common;
mod hostile_support;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use blockdiff::Signer;
use common::*;
use hostile_support::*;
use wire::{
    BlockHashes, Codec, Committed, Credit, Data, Finish, Generation, Heartbeat, Holes, Msg, Opened,
    Refine, RemoteError, ReplicaState, SubHashes, Zero,
};

const BLOCK: u64 = 64 * KIB;
/// How long a hostile-peer session may take before the test calls it hung.
const SLACK_60S: Duration = Duration::from_secs(60);
const SLACK_90S: Duration = Duration::from_secs(90);

/// Digests of every block of `data` under the session's key.
fn digests_of(signer: &Signer, data: &[u8]) -> Vec<u8> {
    let ds: Vec<_> = data
        .chunks(BLOCK as usize)
        .map(|b| signer.block_digest(b))
        .collect();
    let mut p = Vec::new();
    wire::digests_to_payload(&ds, &mut p);
    p
}

fn state_json(state: &Path, volume: &Path) -> serde_json::Value {
    let p = state.join(format!("{}.state.json", state_key(volume)));
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The source the state of `volume` records its replica to be of.
fn recorded_source(state: &Path, volume: &Path) -> String {
    state_json(state, volume)["source_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A replica at generation 1 of `src`, made by a real local sync.
fn replica_gen1(
    dir: &Path,
    size: u64,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let src = dir.join("src.img");
    let dst = dir.join("replica.img");
    let state = dir.join("state");
    write_random_file(&src, size, 1);
    sync_run(&src, s(&dst), &state, &[]).assert_ok();
    assert_eq!(state_json(&state, &dst)["consistent"], true);
    (src, dst, state)
}

// ---------------------------------------------------------------- 1

#[test]
fn source_memory_stays_bounded_while_a_target_floods_answers() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, 4 * MIB, 1);
    let t = FakeTarget::new(dir.path());
    let (m, ()) = t.play(&src, &["--timeout", "20s"], SLACK_90S, |mut p| {
        p.open_and_drain(p.honest_opened());
        // Sub-digests nobody asked for, 4 MiB a frame, as fast as they go
        // (at most 4 GiB): they used to pile up in the source's queue.
        let payload = vec![0u8; wire::MAX_DIGESTS * blockdiff::DIGEST_LEN];
        let mut sent = 0u64;
        while sent < 4 << 30
            && p.send(Msg::SubHashes(SubHashes { block: 0 }), &payload)
                .is_ok()
        {
            sent += payload.len() as u64;
        }
    });
    m.run.assert_code(5);
    m.run.assert_says(
        "nobody asked for",
        "unasked answers are a protocol violation",
    );
    m.assert_rss_below(PEER_RSS_KIB)
        .assert_faster_than(Duration::from_secs(30));
}

#[test]
fn source_drain_after_commit_is_bounded_in_bytes_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, 2 * MIB, 2);
    let data = std::fs::read(&src).unwrap();
    let t = FakeTarget::new(dir.path());
    let (m, flooded) = t.play(
        &src,
        &["--timeout", "20s", "--json"],
        SLACK_90S,
        move |mut p| {
            p.send(Msg::Opened(p.honest_opened()), &[]).unwrap();
            // The replica already equals the source: digests of the same data.
            let signer = Signer::new(p.hello.key);
            let payload = digests_of(&signer, &data);
            p.send(Msg::BlockHashes(BlockHashes { first: 0 }), &payload)
                .unwrap();
            loop {
                match p.read().unwrap() {
                    Msg::Finish(_) => break,
                    Msg::Credit(_) | Msg::Heartbeat(_) => {}
                    m => panic!("unexpected {:?}", m.kind()),
                }
            }
            p.drain_in_background();
            p.send(
                Msg::Committed(Committed {
                    apply_mode: "journal".into(),
                    state: ReplicaState {
                        source_id: Some(p.open.source_id.clone()),
                        generation: Some(Generation {
                            number: 1,
                            snapshot: p.open.target_generation.snapshot.clone(),
                        }),
                        consistent: true,
                        ..Default::default()
                    },
                    ..Default::default()
                }),
                &[],
            )
            .unwrap();
            // Then garbage without end (at most 4 GiB): it used to be read
            // to the end of the stream into memory.
            flood(&mut p.stream, &vec![0xAB; 1 << 20], 4 << 30)
        },
    );
    m.run.assert_ok();
    m.assert_rss_below(PEER_RSS_KIB)
        .assert_faster_than(Duration::from_secs(30));
    assert!(
        flooded < 1 << 30,
        "the source kept reading: {flooded} bytes"
    );
    assert!(m.run.json().u("wire_bytes_received") <= 2 << 20);
}

// ---------------------------------------------------------------- 2

#[test]
fn a_target_trickling_frames_without_progress_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, MIB, 3);
    for empty_hashes in [false, true] {
        let t = FakeTarget::new(dir.path());
        let (m, ()) = t.play(&src, &["--timeout", "3s"], SLACK_90S, move |mut p| {
            p.open_and_drain(p.honest_opened());
            // A frame every 200 ms for at most a minute, none of them
            // progress: the same heartbeat, or an empty digest frame.
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                let m = if empty_hashes {
                    Msg::BlockHashes(BlockHashes { first: 0 })
                } else {
                    Msg::Heartbeat(Heartbeat {
                        blocks: 5,
                        ..Default::default()
                    })
                };
                if p.send(m, &[]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        m.run.assert_code(5);
        m.assert_faster_than(Duration::from_secs(20))
            .assert_rss_below(PEER_RSS_KIB);
        if !empty_hashes {
            assert!(m.run.elapsed >= Duration::from_secs(3), "{}", m.run);
            m.run
                .assert_says("no progress", "the progress timeout fired");
        }
    }
}

/// Hole runs (protocol 3) are checked like digests: an empty one, or one
/// that reaches past the volume or the credit window, is a protocol
/// violation, never a skip of blocks the target did not scan.
#[test]
fn a_target_announcing_holes_out_of_bounds_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, 2 * MIB, 4);
    for count in [0, 33, u64::MAX] {
        let t = FakeTarget::new(dir.path());
        let child = t.spawn_source(&src, &["--timeout", "20s"]);
        let target = thread::spawn(move || {
            let mut p = t.accept();
            let o = p.honest_opened();
            p.send(Msg::Opened(o), &[]).unwrap();
            p.drain_in_background();
            let _ = p.send(Msg::Holes(Holes { first: 0, count }), &[]);
            thread::sleep(Duration::from_secs(2));
        });
        let m = measure(child, Duration::from_secs(60));
        m.run.assert_code(5);
        m.run.assert_says(
            "expected them from block 0",
            "a hole run outside the volume is refused",
        );
        target.join().unwrap();
    }
}

// ---------------------------------------------------------------- 3

/// A session of serve opened on a 2 GiB sparse replica in 4 MiB blocks:
/// each refinement asks for a whole-block read and a large answer.
fn refine_session(dir: &Path) -> (ServePeer, std::path::PathBuf, std::path::PathBuf) {
    let dst = dir.join("replica.img");
    let state = dir.join("state");
    let size = 2u64 << 30;
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
    let mut p = ServePeer::start(s(&dst), &state, &[]);
    p.open(open_msg(&dst, size, 4 * MIB)).unwrap();
    (p, dst, state)
}

#[test]
fn serve_refine_queue_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, dst, state) = refine_session(dir.path());
    // Refinements of 4 MiB blocks, never reading an answer, for at most
    // 20 s: each used to queue a whole-block read without limit.
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(20)
        && p.send(Msg::Refine(Refine { block: i % 512 }), &[]).is_ok()
    {
        i += 1;
    }
    let m = p.finish(Duration::from_secs(60));
    m.run.assert_code(5);
    m.run.assert_says("refine", "the overrun is named");
    m.assert_rss_below(PEER_RSS_KIB)
        .assert_faster_than(Duration::from_secs(30));
    assert!(i < 100_000, "serve kept reading refinements: {i}");
    assert!(lock_is_free(&state, &dst));
}

/// A target that fails while its queue of frames to the source is full
/// (answers the source has not read yet) still tells the source why,
/// once the source reads: its error frame used to be dropped, and the
/// source saw only a closed connection.
#[test]
fn serve_says_why_it_failed_behind_a_full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _, _) = refine_session(dir.path());
    // Refinements in order, no answer read: the answers fill the pipe
    // and the queue behind it, then the refinements overrun their bound.
    for i in 0..300 {
        if p.send(Msg::Refine(Refine { block: i }), &[]).is_err() {
            break;
        }
    }
    // Serve fails meanwhile, with its queue full; the source reads on a
    // moment later (within serve's 2 s).
    thread::sleep(Duration::from_millis(800));
    let last = p.drain_in_background();
    let why = last.join().unwrap();
    assert!(
        matches!(&why, Some(Err(m)) if m.contains("refine")),
        "the source is told why: {why:?}"
    );
    let m = p.finish(Duration::from_secs(60));
    m.run.assert_code(5);
}

// ---------------------------------------------------------------- 4

#[test]
fn serve_refuses_rewrites_and_owns_the_journal_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, dst, state) = replica_gen1(dir.path(), MIB);
    let before = sha256_file(&dst);
    let source_id = recorded_source(&state, &dst);

    // One block written over and over: the second write is refused.
    let mut p = ServePeer::start(s(&dst), &state, &[]);
    let mut open = open_msg(&dst, MIB, BLOCK);
    open.source_id = source_id.clone();
    p.open(open.clone()).unwrap();
    let last = p.drain_in_background();
    let payload = vec![0x55u8; BLOCK as usize];
    for _ in 0..3000 {
        let d = Data {
            offset: 0,
            len: BLOCK as u32,
            codec: Codec::Raw,
        };
        if p.send(Msg::Data(d), &payload).is_err() {
            break;
        }
    }
    let m = p.finish(Duration::from_secs(60));
    m.run.assert_code(5);
    m.run
        .assert_says("increasing offset", "overlap is a protocol error");
    m.assert_rss_below(PEER_RSS_KIB);
    assert!(matches!(last.join().unwrap(), Some(Err(_))));
    assert_unchanged(&dst, &before, "a refused session writes nothing");
    assert!(files_starting(&state, &format!("{}.journal", state_key(&dst))).is_empty());
    assert_eq!(state_json(&state, &dst)["generation"]["number"], 1);
    assert_eq!(state_json(&state, &dst)["consistent"], true);

    // Zero records count against serve's --journal-max, whatever the
    // source asks: 2,000 of them (34 kB of records) overflow 8 KiB and
    // the session goes on in place instead of growing the journal.
    let mut p = ServePeer::start(s(&dst), &state, &["--journal-max", "8KiB"]);
    p.open(open).unwrap();
    let last = p.drain_in_background();
    for i in 0..2_000u64 {
        p.wr.send(&Msg::Zero(Zero { offset: i, len: 1 }), &[])
            .unwrap();
    }
    let total = MIB / BLOCK;
    p.send(Msg::Credit(Credit { through: total }), &[]).unwrap();
    p.send(Msg::Finish(Finish { blocks: total }), &[]).unwrap();
    let m = p.finish(Duration::from_secs(60));
    m.run.assert_ok();
    m.assert_rss_below(PEER_RSS_KIB);
    let Some(Ok(Msg::Committed(c))) = last.join().unwrap() else {
        panic!("no Committed\n{}", m.run)
    };
    assert_eq!(c.apply_mode, "in-place", "{c:?}");
    assert_eq!(read_at(&dst, 0, 2_000), vec![0u8; 2_000]);
    assert_eq!(state_json(&state, &dst)["generation"]["number"], 2);

    // A name that does not exist is not created under /dev (RAM).
    let shm = Path::new("/dev/shm").join(format!("snapsync-hostile-{}", std::process::id()));
    let mut p = ServePeer::start("/dev/shm/snapsync-hostile-*", &state, &[]);
    let err = p.open(open_msg(&shm, 1 << 30, BLOCK)).unwrap_err();
    assert!(err.to_string().contains("not created"), "{err}");
    let m = p.finish(Duration::from_secs(30));
    m.run.assert_code(4);
    assert!(!shm.exists());
}

// ---------------------------------------------------------------- 5

#[test]
fn a_source_size_the_file_system_cannot_hold_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, state) = replica_gen1(dir.path(), MIB);
    let before = sha256_file(&dst);
    let source_id = recorded_source(&state, &dst);
    let mut p = ServePeer::start(s(&dst), &state, &[]);
    let mut open = open_msg(&dst, 1 << 50, BLOCK);
    open.source_id = source_id;
    let err = p.open(open).unwrap_err();
    assert!(err.to_string().contains("cannot hold"), "{err}");
    let m = p.finish(Duration::from_secs(30));
    m.run.assert_code(4);
    assert_unchanged(&dst, &before, "nothing was written");
    assert_eq!(file_len(&dst), MIB);
    assert!(files_starting(&state, &format!("{}.journal", state_key(&dst))).is_empty());
    // No wedge: a verify and a sync go on working.
    run(&["verify", s(&src), s(&dst), "--state-dir", s(&state)]).assert_ok();
    sync_run(&src, s(&dst), &state, &[]).assert_ok();
}

/// A tmpfs of `size` bytes mounted at `dir` (root only), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: u64) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|st| st.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }

    fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.0).unwrap();
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A first copy into a file whose file system cannot take the source's
/// data is refused before anything is written (it used to write until
/// ENOSPC, filling the file system for everything else on it). Counted
/// sparse-aware: a sparse source of the same size but little data fits.
#[test]
fn an_in_place_copy_that_cannot_fit_is_refused_before_filling_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("fs"), 64 * MIB) else {
        return skip_root_test("free space: cannot mount a tmpfs");
    };
    let state = dir.path().join("state");
    let dst = fs.0.join("replica.img");
    let src = dir.path().join("src.img");
    write_random_file(&src, 56 * MIB, 3);
    let free = fs.free();
    sync_run(&src, s(&dst), &state, &[])
        .assert_code(4)
        .assert_says("bytes free", "names the free space");
    assert_eq!(allocated_blocks(&dst), 0, "nothing was written");
    assert_eq!(fs.free(), free, "the file system was not filled");
    // The same nominal size, 8 MiB of data: fits.
    let sparse = dir.path().join("sparse.img");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(56 * MIB)
        .unwrap();
    write_at(&sparse, 8 * MIB, &random_bytes(4, 8 * MIB as usize));
    sync_run(&sparse, s(&dst), &state, &[]).assert_ok();
    assert_same_content(&sparse, &dst);
}

/// Rewriting a replica file that is allocated already takes no space: no
/// margin is asked for, even on a nearly full file system.
#[test]
fn rewriting_an_allocated_replica_needs_no_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("fs"), 64 * MIB) else {
        return skip_root_test("free space: cannot mount a tmpfs");
    };
    let dst = fs.0.join("replica.img");
    write_random_file(&dst, 24 * MIB, 7);
    write_random_file(&fs.0.join("ballast"), fs.free() - 6 * MIB, 8);
    let src = dir.path().join("src.img");
    write_random_file(&src, 24 * MIB, 9);
    sync_run(&src, s(&dst), &dir.path().join("state"), &[]).assert_ok();
    assert_same_content(&src, &dst);
}

/// A source that cannot tell its data (a block device): the copy watches
/// the free space as it writes and stops before the file system is full,
/// resumable.
#[test]
fn an_in_place_copy_stops_before_the_file_system_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("fs"), 64 * MIB) else {
        return skip_root_test("free space: cannot mount a tmpfs");
    };
    let img = dir.path().join("src.img");
    write_random_file(&img, 80 * MIB, 5);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", "-r"])
        .arg(&img)
        .output()
        .unwrap();
    if !out.status.success() {
        return skip_root_test("free space: no loop device");
    }
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let state = dir.path().join("state");
    let dst = fs.0.join("replica.img");
    let r = sync_run(Path::new(&dev), s(&dst), &state, &[]);
    let _ = std::process::Command::new("losetup")
        .args(["-d", &dev])
        .status();
    r.assert_code(4).assert_says("bytes free", "stopped early");
    assert!(fs.free() >= 4 * MIB, "free space left: {}", fs.free());
    let st = state_json(&state, &dst);
    assert!(!st["in_progress"].is_null(), "resumable: {st}");
}

// ---------------------------------------------------------------- 6

#[test]
fn a_corrupt_journal_after_the_apply_began_is_moved_aside_and_rescanned() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, state) = replica_gen1(dir.path(), MIB);
    let key = state_key(&dst);
    let jpath = state.join(format!("{key}.journal"));
    // A sealed journal of generation 2, half applied, then one bit flips.
    let junk = random_bytes(9, 4096);
    let mut j = snapsync::journal::Journal::create(&jpath, 1 << 20).unwrap();
    assert!(!j.append_data(8192, &junk).unwrap());
    let gen2 = Generation {
        number: 2,
        snapshot: "snap-2".into(),
    };
    j.seal(&gen2, &recorded_source(&state, &dst), MIB).unwrap();
    write_at(&dst, 8192, &junk);
    let mut bytes = std::fs::read(&jpath).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&jpath, &bytes).unwrap();
    let spath = state.join(format!("{key}.state.json"));
    let mut st = state_json(&state, &dst);
    st["applying"] = serde_json::to_value(&gen2).unwrap();
    std::fs::write(&spath, serde_json::to_vec(&st).unwrap()).unwrap();

    let r = sync_run(&src, s(&dst), &state, &[]);
    r.assert_ok();
    let rep = r.json();
    let rec = rep.0["recovered"].as_str().unwrap_or_default().to_owned();
    assert!(rec.contains("moved to"), "{rec}");
    assert_eq!(rep.0["apply_mode"], "in-place", "a full copy, not a delta");
    assert_same_content(&src, &dst);
    let aside = files_starting(&state, &format!("{key}.journal.failed-"));
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes, "kept as it was");
    assert!(!jpath.exists());
    let st = state_json(&state, &dst);
    assert_eq!(st["consistent"], true);
    assert!(st["applying"].is_null());
}

// ---------------------------------------------------------------- 7

#[test]
fn the_source_checks_the_targets_answers_and_escapes_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, BLOCK, 4);

    // A resume mark far past the end of a one-block volume.
    let t = FakeTarget::new(dir.path());
    let (m, ()) = t.play(&src, &["--timeout", "20s", "--json"], SLACK_60S, |mut p| {
        p.open_and_drain(Opened {
            start_block: 1 << 63,
            ..p.honest_opened()
        });
        thread::sleep(Duration::from_secs(2));
    });
    m.run.assert_code(5);
    m.run
        .assert_says("starts at block", "the bad field is named");
    m.assert_faster_than(Duration::from_secs(15));

    // Text from the target reaches the terminal escaped.
    let t = FakeTarget::new(dir.path());
    let (m, ()) = t.play(&src, &["--timeout", "20s"], SLACK_60S, |mut p| {
        let e = RemoteError {
            code: wire::ErrorCode::TargetIo,
            message: "\x1b[2J\x1b]0;owned\x07gone".into(),
        };
        p.send(Msg::Error(e), &[]).unwrap();
    });
    m.run.assert_code(4);
    assert!(!m.run.stderr.contains('\x1b'), "{}", m.run);
    m.run
        .assert_says("\\u{1b}[2J", "the escape is shown, not obeyed");
}

// ---------------------------------------------------------------- 8

#[test]
fn serve_gives_up_on_a_stalled_source_and_releases_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, dst, state) = replica_gen1(dir.path(), MIB);
    let mut p = ServePeer::start(s(&dst), &state, &["--timeout", "2s"]);
    let mut open = open_msg(&dst, MIB, BLOCK);
    open.force = true;
    p.open(open).unwrap();
    let _ = p.drain_in_background();
    // Heartbeats that never advance are no progress.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if p.send(Msg::Heartbeat(Heartbeat::default()), &[]).is_err() {
            break;
        }
        if p.child.as_mut().unwrap().try_wait().unwrap().is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let m = p.finish(Duration::from_secs(30));
    m.run.assert_code(5);
    m.run.assert_says("no progress", "the timeout is named");
    assert!(m.run.elapsed >= Duration::from_secs(2), "{}", m.run);
    m.assert_faster_than(Duration::from_secs(20))
        .assert_rss_below(PEER_RSS_KIB);
    assert!(lock_is_free(&state, &dst));
}

// ---------------------------------------------------------------- local

#[test]
fn a_local_sync_runs_both_ends_within_its_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let state = dir.path().join("state");
    write_random_file(&src, 64 * MIB, 5);
    let child = volume_cmd("sync", &src, s(&dst), &state)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let m = measure(child, Duration::from_secs(120));
    m.run.assert_ok();
    m.assert_rss_below(LOCAL_RSS_KIB);
    assert_same_content(&src, &dst);
}

/// Found by fuzzing `serve_session`: a Hello asking for a bwlimit of 32
/// bytes/s (the CLI refuses anything under 512) had the target sleep 16 s
/// before each reply frame, deaf to its own timeout and to signals.
#[test]
fn serve_refuses_a_bwlimit_below_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, dst, state) = replica_gen1(dir.path(), MIB);
    let mut child = snapsync()
        .args(["serve", "--allow", s(&dst), "--state-dir", s(&state)])
        .args(["--timeout", "5s"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut wr = wire::FrameWriter::new(child.stdin.take().unwrap());
    wr.write_preamble().unwrap();
    wr.send(
        &Msg::Hello(wire::Hello {
            features: 0,
            key: blockdiff::HashKey([7; 32]),
            software: "fake-source".into(),
            bwlimit: Some(32),
        }),
        &[],
    )
    .unwrap();
    wr.flush().unwrap();
    let m = measure(child, Duration::from_secs(60));
    m.run.assert_code(5);
    m.run
        .assert_says("bwlimit of 32 bytes/s", "the refused rate is named");
    m.assert_faster_than(Duration::from_secs(10));
    assert!(lock_is_free(&state, &dst));
}

#[test]
fn serve_does_not_take_impossible_heartbeats_as_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, dst, state) = replica_gen1(dir.path(), MIB);
    let mut p = ServePeer::start(s(&dst), &state, &["--timeout", "30s"]);
    let mut open = open_msg(&dst, MIB, BLOCK);
    open.force = true;
    p.open(open).unwrap();
    let _ = p.drain_in_background();
    // Counters that race ahead of anything serve sent: a lie, cut off at
    // once rather than keeping the volume locked for as long as it lasts.
    let _ = p.send(
        Msg::Heartbeat(Heartbeat {
            received: 1 << 40,
            blocks: 1 << 40,
            ..Default::default()
        }),
        &[],
    );
    let m = p.finish(Duration::from_secs(30));
    m.run.assert_code(5);
    m.run.assert_says("heartbeat claims", "the lie is named");
    m.assert_faster_than(Duration::from_secs(15));
    assert!(lock_is_free(&state, &dst));
}

#[test]
fn a_target_that_never_answers_the_handshake_times_out() {
    // A remote shell that connects and then says nothing: before the
    // session's own progress checks begin, only the silence tells.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, MIB, 3);
    let rsh = write_script(&dir.path().join("mute-rsh"), "exec sleep 600");
    let mut c = volume_cmd(
        "sync",
        &src,
        &format!("localhost:{}", s(&dir.path().join("dst.img"))),
        &dir.path().join("state"),
    );
    c.args(["--timeout", "2s", "--rsh", s(&rsh)]);
    let r = run_with_deadline(&mut c, Duration::from_secs(60));
    r.assert_code(5);
    r.assert_says("sent nothing for 2s", "the silence is named");
    assert!(r.elapsed < Duration::from_secs(20), "took {:?}", r.elapsed);
}
