//! Helpers shared by the integration tests: the binary under test, test
//! data, hashing, running a command with a deadline and parsing `--json`.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Longest any single command may run before the test calls it a hang.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

/// The binary under test: `$SNAPSYNC_BIN` if set (CI points it at the
/// release build), else the one cargo built for this test run.
pub fn bin() -> PathBuf {
    match std::env::var_os("SNAPSYNC_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => assert_cmd::cargo::cargo_bin("snapsync"),
    }
}

/// A `snapsync` command with a clean environment for logging.
pub fn snapsync() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("RUST_LOG");
    c
}

// ---------------------------------------------------------------- data

/// Deterministic xorshift64* generator: fast, seeded, not cryptographic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Never zero; mix the seed so small seeds differ a lot.
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

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
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

    /// The next `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Creates (or replaces) `path` with `len` pseudo-random bytes from `seed`.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    write_random_file_with(path, len, &mut Rng::new(seed));
}

/// Creates (or replaces) `path` with the next `len` bytes of `rng`.
pub fn write_random_file_with(path: &Path, len: u64, rng: &mut Rng) {
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

/// Creates (or replaces) `path` with `len` bytes of compressible text.
pub fn write_text_file(path: &Path, len: u64, seed: u64) {
    let words = [
        "block ",
        "volume ",
        "replica ",
        "snapshot ",
        "journal ",
        "generation ",
        "\n",
        "zstd ",
    ];
    let mut rng = Rng::new(seed);
    let mut data = Vec::with_capacity(len as usize + 16);
    while (data.len() as u64) < len {
        data.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
    }
    data.truncate(len as usize);
    std::fs::write(path, data).unwrap();
}

/// Writes `data` at `offset` of an existing file (extending it if needed).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Sets the length of an existing file.
pub fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Appends `len` pseudo-random bytes to `path`.
pub fn append_random(path: &Path, len: u64, seed: u64) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(&random_bytes(seed, len as usize)).unwrap();
    f.sync_all().unwrap();
}

/// Reads `len` bytes at `offset` of a file or device.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// SHA-256 of the first `limit` bytes (all of it when `None`) of a file or
/// device, as hex.
pub fn sha256_prefix(path: &Path, limit: Option<u64>) -> String {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut r: Box<dyn Read> = match limit {
        Some(n) => Box::new(f.take(n)),
        None => Box::new(f),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

pub fn sha256_file(path: &Path) -> String {
    sha256_prefix(path, None)
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Panics with the first differing offset unless both files have the same
/// length and content.
pub fn assert_same_content(a: &Path, b: &Path) {
    let (la, lb) = (file_len(a), file_len(b));
    assert_eq!(
        la,
        lb,
        "{} is {la} bytes, {} is {lb} bytes",
        a.display(),
        b.display()
    );
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at offset {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// Asserts that `path` still hashes to `before` (a [`sha256_file`]).
pub fn assert_unchanged(path: &Path, before: &str, why: &str) {
    assert_eq!(sha256_file(path), before, "{why}");
}

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .len()
}

/// Allocated 512-byte blocks of a file (`st_blocks`).
pub fn allocated_blocks(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks()
}

// ---------------------------------------------------------------- running

/// What a finished command did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// `status` is `None` for a command killed at its deadline.
    pub fn new(
        status: Option<ExitStatus>,
        stdout: String,
        stderr: String,
        elapsed: Duration,
    ) -> Self {
        Run {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout,
            stderr,
            elapsed,
        }
    }

    /// The `--json` object on stdout (the last one), if any.
    pub fn report(&self) -> Option<Report> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))?;
        serde_json::from_str(line).ok().map(Report)
    }

    /// The parsed `--json` object on stdout (panics with the output if none).
    pub fn json(&self) -> Report {
        self.report()
            .unwrap_or_else(|| panic!("no JSON object on stdout\n{self}"))
    }

    pub fn assert_code(&self, want: i32) -> &Self {
        assert_eq!(self.code, Some(want), "unexpected exit status\n{self}");
        self
    }

    pub fn assert_ok(&self) -> &Self {
        self.assert_code(0)
    }

    /// Asserts that stderr mentions `text`; `why` says what that shows.
    pub fn assert_says(&self, text: &str, why: &str) -> &Self {
        assert!(self.stderr.contains(text), "{why}\n{self}");
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit: {:?}{} after {:.3}s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.signal
                .map(|sig| format!(" (signal {sig})"))
                .unwrap_or_default(),
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

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

    pub fn s(&self, key: &str) -> String {
        self.0
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("report has no string {key:?}: {}", self.0))
            .to_owned()
    }

    pub fn opt_u(&self, key: &str) -> Option<u64> {
        self.0.get(key).and_then(|v| v.as_u64())
    }

    pub fn opt_s(&self, key: &str) -> Option<String> {
        self.0.get(key).and_then(|v| v.as_str()).map(str::to_owned)
    }

    pub fn is_null(&self, key: &str) -> bool {
        self.0.get(key).is_none_or(|v| v.is_null())
    }

    pub fn wire_total(&self) -> u64 {
        self.u("wire_bytes_sent") + self.u("wire_bytes_received")
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Runs `cmd` to completion (stdin closed) with a deadline; a command still
/// running at the deadline is killed and the test fails as a hang.
pub fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> Run {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    wait_with_deadline(child, deadline, || {})
}

/// Waits for a started child (stdout and stderr piped), calling `tick`
/// while it runs; kills it and panics at the deadline.
pub fn wait_with_deadline(mut child: Child, deadline: Duration, tick: impl FnMut()) -> Run {
    let started = Instant::now();
    let out = child.stdout.take().expect("stdout piped");
    let err = child.stderr.take().expect("stderr piped");
    let out_t = read_all_in_thread(out);
    let err_t = read_all_in_thread(err);
    let status = wait_or_kill(
        &mut child,
        started,
        deadline,
        Duration::from_millis(10),
        tick,
    );
    let elapsed = started.elapsed();
    // A grandchild holding the pipes must not hang the test either.
    let stdout = join_or_empty(out_t, Duration::from_secs(15));
    let stderr = join_or_empty(err_t, Duration::from_secs(15));
    let run = Run::new(status, stdout, stderr, elapsed);
    if status.is_none() {
        panic!("command did not finish within {deadline:?}; killed it\n{run}");
    }
    run
}

/// Polls `child` every `poll`, calling `tick` while it runs, until it
/// exits; `None` when it was still running `deadline` after `started`
/// (it is then killed and reaped).
pub fn wait_or_kill(
    child: &mut Child,
    started: Instant,
    deadline: Duration,
    poll: Duration,
    mut tick: impl FnMut(),
) -> Option<ExitStatus> {
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tick();
        thread::sleep(poll);
    }
}

fn join_or_empty(h: thread::JoinHandle<String>, wait: Duration) -> String {
    let until = Instant::now() + wait;
    while !h.is_finished() && Instant::now() < until {
        thread::sleep(Duration::from_millis(10));
    }
    if h.is_finished() {
        h.join().unwrap_or_default()
    } else {
        "<output pipe still held open by another process>".into()
    }
}

/// Reads `r` to its end in a thread; the text, lossily decoded.
pub fn read_all_in_thread<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Says on stderr that a test is skipped because this machine cannot run
/// it (`why`); with SNAPSYNC_REQUIRE_ROOT_TESTS=1 (CI) that is a failure.
pub fn skip_root_test(why: &str) {
    if std::env::var("SNAPSYNC_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{why}, and SNAPSYNC_REQUIRE_ROOT_TESTS=1");
    }
    eprintln!("NOTICE: skipping: {why}");
}

/// Runs a helper program (not the binary under test) to the end; panics
/// with `what` and its stderr unless it succeeds.
pub fn run_helper(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `snapsync ARGS…` with the default deadline.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run_with_deadline(snapsync().args(args), DEFAULT_DEADLINE)
}

/// `snapsync sync SRC DST --state-dir STATE --json EXTRA…`; expects exit 0
/// and returns the report.
pub fn sync_json(src: &Path, dst: &str, state: &Path, extra: &[&str]) -> Report {
    let r = sync_run(src, dst, state, extra);
    r.assert_ok();
    r.json()
}

/// `snapsync sync SRC DST --state-dir STATE --json EXTRA…`, any exit.
pub fn sync_run(src: &Path, dst: &str, state: &Path, extra: &[&str]) -> Run {
    let mut c = volume_cmd("sync", src, dst, state);
    c.arg("--json").args(extra);
    run_with_deadline(&mut c, DEFAULT_DEADLINE)
}

/// `snapsync WHAT SRC DST --state-dir STATE` (`sync` or `verify`), for the
/// caller to add options to.
pub fn volume_cmd(what: &str, src: &Path, dst: &str, state: &Path) -> Command {
    let mut c = snapsync();
    c.arg(what).arg(src).arg(dst).arg("--state-dir").arg(state);
    if what == "sync" {
        // This host's digest maps stay with the test, not in /var/lib.
        c.arg("--source-state-dir").arg(state.join("source"));
    }
    c
}

/// A scratch directory (`PREFIX…` under the temp dir) holding `src.img`
/// of `size` random bytes.
pub fn scratch_with_source(prefix: &str, size: u64, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, size, seed);
    (dir, src)
}

/// Path as a `&str` (test paths are ASCII).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Borrows owned arguments as the `&[&str]` the helpers take.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------- rsh

/// Writes an executable shell script.
pub fn write_script(path: &Path, body: &str) -> PathBuf {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_owned()
}

/// A "remote shell" that drops the host and runs the rest locally, like
/// `ssh HOST CMD…` to localhost would.
pub fn local_rsh(dir: &Path) -> PathBuf {
    write_script(&dir.join("local-rsh"), "shift\nexec \"$@\"")
}

/// A remote shell that ignores the requested command and always runs
/// `snapsync serve --allow PATTERN --state-dir STATE`, like an
/// authorized_keys forced command.
pub fn forced_rsh(dir: &Path, allow: &str, state: &Path) -> PathBuf {
    let body = format!(
        "# forced command: the requested command is ignored\nexec {} serve --allow {} --state-dir {}",
        sh_quote(s(&bin())),
        sh_quote(allow),
        sh_quote(s(state))
    );
    write_script(&dir.join("forced-rsh"), &body)
}

/// Quotes a word for /bin/sh.
pub fn sh_quote(w: &str) -> String {
    format!("'{}'", w.replace('\'', "'\\''"))
}

/// The arguments that reach a remote target through `rsh`.
pub fn remote_args(rsh: &Path) -> Vec<String> {
    vec![
        "--rsh".into(),
        s(rsh).into(),
        "--remote-bin".into(),
        s(&bin()).into(),
    ]
}

/// The documented stem of a volume's files in a state directory: "vol-"
/// and the first 24 hex digits of the BLAKE3 hash of the volume's
/// identity (`kind:key`). The hash is computed here independently of the
/// library, so the tests also pin the naming. The volume must exist.
pub fn state_key(volume: &Path) -> String {
    let id = snapshot::identity::of_path(volume, Path::new("/sys"))
        .unwrap_or_else(|e| panic!("identity of {}: {e}", volume.display()));
    let h = blake3::hash(id.id().as_bytes()).to_hex();
    format!("vol-{}", &h[..24])
}

/// Name of the per-volume lock file in a state directory.
pub fn lock_path(state: &Path, volume: &Path) -> PathBuf {
    state.join(format!("{}.lock", state_key(volume)))
}

/// Writes 20 blocks of 4 KiB at distinct aligned offsets (picked with
/// `seed`), the `i`th of `random_bytes(data_seed + i)`; returns the ranges.
pub fn scatter_writes(path: &Path, size: u64, seed: u64, data_seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Rng::new(seed);
    let offsets = distinct_aligned_offsets(&mut rng, size, 4 * KIB, 20);
    for (i, &o) in offsets.iter().enumerate() {
        write_at(path, o, &random_bytes(data_seed + i as u64, 4096));
    }
    offsets.into_iter().map(|o| (o, 4 * KIB)).collect()
}

/// Number of distinct `block`-sized blocks the byte ranges touch.
pub fn blocks_touched(ranges: &[(u64, u64)], block: u64) -> u64 {
    let mut blocks: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| o / block..(o + l).div_ceil(block))
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks.len() as u64
}

/// What the journaled second sync of a `size`-byte volume (64 KiB blocks)
/// reports after [`scatter_writes`] changed the ranges `changed`: only
/// those travel and are written, with little overhead on the wire.
pub fn assert_scattered_delta(r: &Report, size: u64, changed: &[(u64, u64)]) {
    let want: u64 = changed.iter().map(|&(_, l)| l).sum();
    assert_eq!(
        r.u("data_bytes"),
        want,
        "only the changed sub-blocks travel: {r}"
    );
    assert_eq!(r.u("zero_bytes"), 0, "{r}");
    assert_eq!(
        r.u("blocks_changed"),
        blocks_touched(changed, 64 * KIB),
        "{r}"
    );
    assert_eq!(r.u("target_bytes_written"), want, "{r}");
    assert_eq!(r.s("apply_mode"), "journal", "{r}");
    assert_eq!(r.opt_u("generation"), Some(2), "{r}");
    let limit = want * 11 / 10 + size / 1000 + 16 * KIB;
    assert!(
        r.u("wire_bytes_sent") < limit,
        "sent {} bytes, limit {limit}: {r}",
        r.u("wire_bytes_sent")
    );
}

/// Distinct 4 KiB-aligned offsets in `0..size`, in random order.
pub fn distinct_aligned_offsets(rng: &mut Rng, size: u64, align: u64, n: usize) -> Vec<u64> {
    let slots = size / align;
    assert!(slots >= n as u64);
    let mut out: Vec<u64> = Vec::with_capacity(n);
    while out.len() < n {
        let o = rng.below(slots) * align;
        if !out.contains(&o) {
            out.push(o);
        }
    }
    out
}
