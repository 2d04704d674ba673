//! Helpers for the crash-consistency tests (`tests/crash.rs`), on top of
//! those all the integration tests share (`tests/common`): seeds,
//! processes that can be killed for real, and a view of the target's state
//! directory.

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use snapsync::journal::Trailer;
use snapsync::state::{StatePaths, VolumeState};

use crate::common::{
    bin, run_helper, s, sha256_file, state_key, wait_or_kill, write_script, Run, MIB,
};

/// Longest a command may run before the test calls it a hang.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The tests of this file measure run times to aim their kills; running
/// them one at a time keeps those measurements meaningful (and the machine
/// has few cores anyway).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------------ data

/// A seed from `$SNAPSYNC_CRASH_SEED`, else from the clock (printed by the
/// callers so a failure can be replayed).
pub fn seed() -> u64 {
    match std::env::var("SNAPSYNC_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => s,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// Whether every byte of the file from `offset` on is zero.
pub fn is_zero_from(path: &Path, offset: u64) -> bool {
    let mut f = File::open(path).unwrap();
    io::Seek::seek(&mut f, io::SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return true;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return false;
        }
    }
}

// ------------------------------------------------------------- state dir

/// The files the target keeps for one volume in its state directory, as
/// the library names them, checked against the documented naming
/// ([`state_key`], computed independently) so the tests also pin it.
pub fn state_files(state_dir: &Path, volume: &Path) -> StatePaths {
    let id = snapshot::identity::of_path(volume, Path::new("/sys")).unwrap();
    let paths = StatePaths::for_identity(state_dir, &id);
    let key = state_key(volume);
    for (path, suffix) in [
        (&paths.state, "state.json"),
        (&paths.lock, "lock"),
        (&paths.journal, "journal"),
    ] {
        assert_eq!(
            *path,
            state_dir.join(format!("{key}.{suffix}")),
            "the {suffix} file of {} is not named as documented",
            volume.display()
        );
    }
    paths
}

/// Short fixed names in `dir`, for running the library's recovery outside
/// a state directory.
pub fn scratch_paths(dir: &Path) -> StatePaths {
    StatePaths {
        state: dir.join("st"),
        lock: dir.join("lock"),
        journal: dir.join("j"),
    }
}

/// What the tests read through a volume's files.
pub trait StateFilesExt {
    /// The state file (a missing one is the empty state).
    fn load(&self) -> VolumeState;
    /// What the journal file holds.
    fn journal(&self) -> JournalFile;
}

impl StateFilesExt for StatePaths {
    fn load(&self) -> VolumeState {
        snapsync::state::load(&self.state)
            .unwrap_or_else(|e| panic!("reading {}: {e:#}", self.state.display()))
    }

    fn journal(&self) -> JournalFile {
        journal_status(&self.journal)
    }
}

/// What a journal file holds, as recovery will judge it.
#[derive(Debug, Clone)]
pub enum JournalFile {
    Absent,
    /// Cut short: recovery discards it.
    Unsealed,
    /// Complete: recovery replays it.
    Sealed(Trailer),
    /// Unparseable: recovery discards it.
    Corrupt(String),
}

impl JournalFile {
    pub fn exists(&self) -> bool {
        !matches!(self, JournalFile::Absent)
    }
    pub fn sealed(&self) -> bool {
        matches!(self, JournalFile::Sealed(_))
    }
    /// One word for messages and statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            JournalFile::Absent => "none",
            JournalFile::Unsealed => "unsealed",
            JournalFile::Sealed(_) => "sealed",
            JournalFile::Corrupt(_) => "corrupt",
        }
    }
}

pub fn journal_status(path: &Path) -> JournalFile {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return JournalFile::Absent,
        Err(e) => panic!("opening {}: {e}", path.display()),
    };
    match snapsync::journal::parse(BufReader::new(f), |_| Ok(())) {
        Ok(None) => JournalFile::Unsealed,
        Ok(Some(t)) => JournalFile::Sealed(t),
        Err(e) => JournalFile::Corrupt(format!("{e:#}")),
    }
}

/// Runs the target's own recovery (`snapsync::journal::recover`, which the
/// target calls first thing when it opens a volume) on COPIES of the
/// volume, state file and journal in `scratch`, and returns what the
/// replica is after it: (sha256 of the volume, state, what recovery said).
/// The originals are left exactly as the crash left them, for the binary.
pub fn recover_copy(
    files: &StatePaths,
    volume: &Path,
    scratch: &Path,
) -> (String, VolumeState, Option<String>) {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    let vol = scratch.join("volume");
    fs::copy(volume, &vol).unwrap();
    let paths = scratch_paths(scratch);
    if files.state.exists() {
        fs::copy(&files.state, &paths.state).unwrap();
    }
    if files.journal.exists() {
        fs::copy(&files.journal, &paths.journal).unwrap();
    }
    let mut st = snapsync::state::load(&paths.state).unwrap();
    let v = snapshot::FileVolume::open(&vol, snapshot::Access::Write { create: false }).unwrap();
    let said = snapsync::journal::recover(&paths, &mut st, &v)
        .unwrap_or_else(|e| panic!("recovery failed: {e:#}"));
    drop(v);
    let h = sha256_file(&vol);
    let _ = fs::remove_dir_all(scratch);
    (h, st, said)
}

// ------------------------------------------------------------- processes

/// A "remote shell" that records its PID (which `exec` hands on to
/// `snapsync serve`) in `pidfile`, drops the host and runs the command.
pub fn pid_rsh(dir: &Path, pidfile: &Path) -> PathBuf {
    let body = format!("echo $$ > '{}'\nshift\nexec \"$@\"", s(pidfile));
    write_script(&dir.join("pid-rsh"), &body)
}

/// Whether `strace` can run a program with a delay injected after a
/// syscall (needs strace ≥ 4.22 and ptrace permission).
pub fn strace_usable() -> bool {
    Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=ftruncate",
            "-e",
            "inject=ftruncate:delay_exit=1",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Rewrites the remote shell at `rsh` so that the command runs under
/// strace with every `ftruncate` delayed by `delay_us` after it took
/// effect: a window in which a kill lands right after a resize.
pub fn traced_rsh(rsh: &Path, pidfile: &Path, delay_us: u64) {
    let body = format!(
        "echo $$ > '{}'\nshift\nexec strace -f -qq -o /dev/null -e trace=ftruncate -e inject=ftruncate:delay_exit={delay_us} \"$@\"",
        s(pidfile)
    );
    write_script(rsh, &body);
}

/// Rewrites the remote shell at `rsh` so that the command runs under
/// strace, which SIGKILLs it on entry to its `n`th `syscall` (counted per
/// thread; only calls on `path` when given): a crash exactly before that
/// call takes effect.
pub fn kill_at_syscall_rsh(rsh: &Path, pidfile: &Path, syscall: &str, path: Option<&Path>, n: u32) {
    let filter = path.map(|p| format!("-P '{}' ", s(p))).unwrap_or_default();
    let body = format!(
        "echo $$ > '{}'\nshift\nexec strace -f -qq -o /dev/null {filter}-e trace={syscall} -e inject={syscall}:signal=KILL:when={n} \"$@\"",
        s(pidfile)
    );
    write_script(rsh, &body);
}

/// The `snapsync serve` process of a session (found by `marker`, by its
/// first two arguments: whatever runs it, strace included, is skipped).
pub fn find_serve(marker: &str) -> Option<i32> {
    processes_with_marker(marker).into_iter().find(|pid| {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let argv0 = args.next().unwrap_or_default();
        args.next() == Some(b"serve")
            && Path::new(&*String::from_utf8_lossy(argv0)).file_name() == bin().file_name()
    })
}

/// A started command whose output goes to files.
#[derive(Debug)]
pub struct Started {
    pub child: Child,
    pub started: Instant,
    out: PathBuf,
    err: PathBuf,
}

/// Starts `cmd` with stdin closed and output captured in `dir`.
pub fn start(cmd: &mut Command, dir: &Path) -> Started {
    let out = dir.join("cmd.stdout");
    let err = dir.join("cmd.stderr");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    Started {
        child,
        started: Instant::now(),
        out,
        err,
    }
}

impl Started {
    /// Whether it has exited (without reaping anything but our own child).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits, killing it and panicking as a hang after `deadline`.
    pub fn wait(mut self, deadline: Duration) -> Run {
        let status = wait_or_kill(
            &mut self.child,
            self.started,
            deadline,
            Duration::from_millis(2),
            || {},
        );
        let stderr = fs::read_to_string(&self.err).unwrap_or_default();
        if status.is_none() {
            panic!("command hung for {deadline:?}; stderr so far:\n{stderr}");
        }
        Run::new(
            status,
            fs::read_to_string(&self.out).unwrap_or_default(),
            stderr,
            self.started.elapsed(),
        )
    }
}

/// Runs `cmd` to the end, its output captured in `dir`.
pub fn run_in(cmd: &mut Command, dir: &Path) -> Run {
    start(cmd, dir).wait(DEADLINE)
}

/// The PID the remote shell wrote, once it is there.
pub fn read_pid(pidfile: &Path) -> Option<i32> {
    fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Sends SIGKILL to `pid` if it is still one of ours (its command line
/// mentions `marker`). Returns whether a live process was signalled.
pub fn kill_marked(pid: i32, marker: &str) -> bool {
    if !alive_with_marker(pid, marker) {
        return false;
    }
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok()
}

/// A process that exists, is not a zombie and whose command line contains
/// `marker` (so a recycled PID is never mistaken for ours).
pub fn alive_with_marker(pid: i32, marker: &str) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    if state == "Z" || state == "X" {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    String::from_utf8_lossy(&cmdline).contains(marker)
}

/// Live processes whose command line contains `marker`.
pub fn processes_with_marker(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if pid != std::process::id() as i32 && alive_with_marker(pid, marker) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// Waits until no process mentions `marker` (orphaned `serve` processes
/// included: they are not our children, so they are watched through
/// /proc). Returns false if some are still there after `deadline`.
pub fn wait_marker_gone(marker: &str, deadline: Duration) -> bool {
    let t = Instant::now();
    loop {
        if processes_with_marker(marker).is_empty() {
            // A forked child may not show up yet: look once more.
            thread::sleep(Duration::from_millis(5));
            if processes_with_marker(marker).is_empty() {
                return true;
            }
        }
        if t.elapsed() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

// ------------------------------------------------------------- tmpfs

/// A tmpfs mounted for the duration of a test; unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "2M") on `dir`; `Err` with the reason
    /// when this machine does not allow it (not root, no mount).
    pub fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
                s(dir),
            ])
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Changes the size limit, keeping the contents.
    pub fn resize(&self, size: &str) {
        run_helper(
            Command::new("mount").args(["-o", &format!("remount,size={size}"), s(&self.dir)]),
            "remount failed",
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
