//! Helpers for the crash-consistency tests (`tests/crash.rs`): the binary
//! under test, seeded data, hashing, processes that can be killed for real,
//! and a view of the target's state directory.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use snapsync::journal::Trailer;
use snapsync::state::VolumeState;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Longest a command may run before the test calls it a hang.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The tests of this file measure run times to aim their kills; running
/// them one at a time keeps those measurements meaningful (and the machine
/// has few cores anyway).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The binary under test: `$SNAPSYNC_BIN` if set, else cargo's build.
pub fn bin() -> PathBuf {
    match std::env::var_os("SNAPSYNC_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => assert_cmd::cargo::cargo_bin("snapsync"),
    }
}

/// A `snapsync` command with logging left at its default.
pub fn snapsync() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("RUST_LOG");
    c
}

/// Path as `&str` (test paths are ASCII).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

// ------------------------------------------------------------------ data

/// Deterministic xorshift64* generator: fast, seeded, not cryptographic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

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

/// Creates (or replaces) `path` with `len` pseudo-random bytes.
pub fn write_random_file(path: &Path, len: u64, rng: &mut Rng) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let mut buf = vec![0u8; (4 * MIB).min(len.max(1)) as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// Writes `data` at `offset` of an existing file.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all_at(data, offset).unwrap();
}

pub fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

pub fn file_len(p: &Path) -> u64 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .len()
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// sha256 of the first `len` bytes of a file.
pub fn sha256_prefix(path: &Path, len: u64) -> String {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut r = f.take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
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

pub fn sha256_bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Short form of a digest for messages.
pub fn short(h: &str) -> &str {
    &h[..12.min(h.len())]
}

// ------------------------------------------------------------- state dir

/// The files the target keeps for one volume in its state directory, named
/// as documented: the volume's absolute path with '%' → "%25" and
/// '/' → "%2F". Computed independently of the library on purpose, so the
/// tests also pin the naming.
#[derive(Debug, Clone)]
pub struct StateFiles {
    pub state: PathBuf,
    pub lock: PathBuf,
    pub journal: PathBuf,
}

impl StateFiles {
    pub fn new(state_dir: &Path, volume: &Path) -> Self {
        let mut key = String::new();
        for c in s(volume).chars() {
            match c {
                '%' => key.push_str("%25"),
                '/' => key.push_str("%2F"),
                c => key.push(c),
            }
        }
        Self {
            state: state_dir.join(format!("{key}.state.json")),
            lock: state_dir.join(format!("{key}.lock")),
            journal: state_dir.join(format!("{key}.journal")),
        }
    }

    pub fn load(&self) -> VolumeState {
        snapsync::state::load(&self.state)
            .unwrap_or_else(|e| panic!("reading {}: {e:#}", self.state.display()))
    }

    pub fn journal(&self) -> JournalFile {
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
    files: &StateFiles,
    volume: &Path,
    scratch: &Path,
) -> (String, VolumeState, Option<String>) {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    let vol = scratch.join("volume");
    fs::copy(volume, &vol).unwrap();
    let paths = snapsync::state::StatePaths {
        state: scratch.join("state.json"),
        lock: scratch.join("lock"),
        journal: scratch.join("journal"),
    };
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

/// Writes an executable shell script.
pub fn write_script(path: &Path, body: &str) -> PathBuf {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_owned()
}

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

/// What a finished command did.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The `--json` report on stdout, if any.
    pub fn report(&self) -> Option<Report> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))?;
        serde_json::from_str(line).ok().map(Report)
    }

    /// The report of a run that must have succeeded.
    pub fn ok_report(&self) -> Report {
        assert_eq!(self.code(), Some(0), "expected exit 0\n{self}");
        self.report()
            .unwrap_or_else(|| panic!("no JSON report\n{self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {} after {:.3}s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
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
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if self.started.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "command hung for {deadline:?}; stderr so far:\n{}",
                    fs::read_to_string(&self.err).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(2));
        };
        Run {
            status,
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        }
    }
}

/// Runs `cmd` to the end.
pub fn run(cmd: &mut Command, dir: &Path) -> Run {
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

// ------------------------------------------------------------- reports

/// The `--json` report of a session.
#[derive(Debug, Clone)]
pub struct Report(pub serde_json::Value);

impl Report {
    pub fn u(&self, key: &str) -> u64 {
        self.0
            .get(key)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("report has no integer {key:?}: {}", self.0))
    }

    pub fn str(&self, key: &str) -> String {
        self.0
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("report has no string {key:?}: {}", self.0))
            .to_owned()
    }

    pub fn opt_str(&self, key: &str) -> Option<String> {
        self.0.get(key).and_then(|v| v.as_str()).map(str::to_owned)
    }

    pub fn opt_u(&self, key: &str) -> Option<u64> {
        self.0.get(key).and_then(|v| v.as_u64())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
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
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}"), s(&self.dir)])
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "remount failed: {}",
            String::from_utf8_lossy(&out.stderr)
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
