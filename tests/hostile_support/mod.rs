//! A hostile-peer kit: scripted fake targets and fake sources speaking the
//! real protocol (through the `wire` crate) against the real binary, and
//! the measurements the tests assert: exit code, time, peak RSS (VmHWM of
//! the snapsync process) and what is left on disk.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blockdiff::{BlockSize, HashKey};
use wire::{
    FrameReader, FrameWriter, Generation, Hello, HelloAck, Mode, Msg, Open, Opened, ReplicaState,
};

use crate::common::*;

/// Peak RSS allowed of `snapsync sync` (source) and `snapsync serve`, and
/// of a local sync running both ends in one process (64 KiB blocks).
pub const PEER_RSS_KIB: u64 = 64 * 1024;
pub const LOCAL_RSS_KIB: u64 = 128 * 1024;

/// Peak resident memory of a process so far, in KiB.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples the VmHWM of `pid` every 5 ms in a thread, as long as the
/// process has memory (a zombie has none); the peak so far is in the
/// returned counter.
pub fn sample_hwm(pid: u32) -> Arc<AtomicU64> {
    let peak = Arc::new(AtomicU64::new(0));
    let p = peak.clone();
    thread::spawn(move || {
        while let Some(v) = vm_hwm(pid) {
            p.fetch_max(v, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(5));
        }
    });
    peak
}

/// A finished snapsync process and its peak RSS.
pub struct Measured {
    pub run: Run,
    pub hwm_kib: u64,
}

impl Measured {
    pub fn assert_rss_below(&self, kib: u64) -> &Self {
        eprintln!(
            "measured: peak RSS {} KiB (bound {kib}), {:.2} s, exit {:?}",
            self.hwm_kib,
            self.run.elapsed.as_secs_f64(),
            self.run.code
        );
        assert!(
            self.hwm_kib > 0 && self.hwm_kib <= kib,
            "peak RSS {} KiB, bound {kib} KiB\n{}",
            self.hwm_kib,
            self.run
        );
        self
    }

    pub fn assert_faster_than(&self, limit: Duration) -> &Self {
        assert!(
            self.run.elapsed < limit,
            "took {:?}, bound {limit:?}\n{}",
            self.run.elapsed,
            self.run
        );
        self
    }
}

/// Waits for `child` (stdout and stderr piped) up to `deadline`, sampling
/// its VmHWM (a high-water mark: the last sample is the peak but for the
/// final few milliseconds).
pub fn measure(child: Child, deadline: Duration) -> Measured {
    let peak = sample_hwm(child.id());
    let run = wait_with_deadline(child, deadline, || {});
    Measured {
        run,
        hwm_kib: peak.load(Ordering::Relaxed),
    }
}

// ------------------------------------------------------------ fake target

/// A fake target: `snapsync sync SRC fake:/dst --rsh SCRIPT` reaches a TCP
/// listener of this test through a remote shell script (bash's /dev/tcp).
pub struct FakeTarget {
    listener: TcpListener,
    pub rsh: PathBuf,
}

/// A connected source, handshake done.
pub struct SourcePeer {
    /// The raw connection, for bytes that are no frame.
    pub stream: TcpStream,
    pub rd: Option<FrameReader<TcpStream>>,
    pub wr: FrameWriter<TcpStream>,
    pub hello: Hello,
    pub open: Open,
}

impl FakeTarget {
    pub fn new(dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let path = dir.join("fake-rsh");
        std::fs::write(
            &path,
            format!(
                "#!/bin/bash\n# fake remote shell: the connection goes to the test's fake target\n\
                 exec 3<>/dev/tcp/127.0.0.1/{port}\ncat <&3 &\nexec cat >&3\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Self {
            listener,
            rsh: path,
        }
    }

    /// Starts `snapsync sync SRC fake:/dst` (plus `extra`) against us.
    pub fn spawn_source(&self, src: &Path, extra: &[&str]) -> Child {
        snapsync()
            .args([
                "sync",
                s(src),
                "fake:/dst",
                "--rsh",
                s(&self.rsh),
                "--block-size",
                "64KiB",
            ])
            .args(["--compress", "none", "--quiet"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Accepts the source and answers its `Hello`; returns after `Open`.
    pub fn accept(&self) -> SourcePeer {
        let (stream, _) = self.listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut rd = FrameReader::new(stream.try_clone().unwrap());
        let raw = stream.try_clone().unwrap();
        let mut wr = FrameWriter::new(stream);
        let (hello, open) = target_handshake(&mut rd, &mut wr, "fake-target");
        SourcePeer {
            stream: raw,
            rd: Some(rd),
            wr,
            hello,
            open,
        }
    }

    /// Starts `snapsync sync SRC` against this target with `extra` options,
    /// plays `script` as the target once the source connected, and
    /// measures the source until it ends (at most `deadline`); returns
    /// what the script returned too.
    pub fn play<T: Send + 'static>(
        self,
        src: &Path,
        extra: &[&str],
        deadline: Duration,
        script: impl FnOnce(SourcePeer) -> T + Send + 'static,
    ) -> (Measured, T) {
        let child = self.spawn_source(src, extra);
        let target = thread::spawn(move || script(self.accept()));
        let m = measure(child, deadline);
        (m, target.join().unwrap())
    }
}

/// The target's side of the handshake: preambles, the source's `Hello`
/// answered with a `HelloAck` of no features, then the source's `Open`.
pub fn target_handshake<R: Read, W: Write>(
    rd: &mut FrameReader<R>,
    wr: &mut FrameWriter<W>,
    software: &str,
) -> (Hello, Open) {
    wr.write_preamble().unwrap();
    rd.read_preamble().unwrap();
    let Msg::Hello(hello) = rd.read().unwrap().0 else {
        panic!("expected Hello")
    };
    wr.send(
        &Msg::HelloAck(HelloAck {
            features: 0,
            software: software.into(),
        }),
        &[],
    )
    .unwrap();
    wr.flush().unwrap();
    let Msg::Open(open) = rd.read().unwrap().0 else {
        panic!("expected Open")
    };
    (hello, open)
}

/// The answer an honest target gives a first full scan of a file.
pub fn first_scan_opened(target_size: u64, window_blocks: u64) -> Opened {
    Opened {
        target_size,
        state: ReplicaState::default(),
        start_block: 0,
        window_blocks,
        mode: Mode::FullScan,
        resizable: true,
        target_identity: "file:1:2".into(),
        target_strong: true,
        unvouched: None,
    }
}

impl SourcePeer {
    /// The answer an honest target would give a first full scan.
    pub fn honest_opened(&self) -> Opened {
        first_scan_opened(0, 1 << 16)
    }

    /// Sends `opened`, then reads and drops what the source sends.
    pub fn open_and_drain(&mut self, opened: Opened) {
        self.send(Msg::Opened(opened), &[]).unwrap();
        self.drain_in_background();
    }

    pub fn send(&mut self, msg: Msg, payload: &[u8]) -> Result<(), wire::WireError> {
        self.wr.send(&msg, payload)?;
        self.wr.flush()
    }

    /// Reads and drops what the source sends, in a thread, until it
    /// closes; returns the count of frames seen so far.
    pub fn drain_in_background(&mut self) -> Arc<AtomicU64> {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let mut rd = self.rd.take().expect("not drained yet");
        thread::spawn(move || {
            while rd.read().is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        seen
    }

    pub fn read(&mut self) -> Result<Msg, wire::WireError> {
        Ok(self.rd.as_mut().expect("not drained").read()?.0)
    }
}

// ------------------------------------------------------------ fake source

/// `snapsync serve` started by a fake source that speaks to it on pipes.
pub struct ServePeer {
    pub child: Option<Child>,
    pub wr: FrameWriter<ChildStdin>,
    pub rd: Option<FrameReader<ChildStdout>>,
    pub key: HashKey,
    started: Instant,
    hwm: Arc<AtomicU64>,
}

impl ServePeer {
    /// Starts `snapsync serve --allow ALLOW --state-dir STATE EXTRA…` and
    /// does the handshake.
    pub fn start(allow: &str, state: &Path, extra: &[&str]) -> Self {
        let mut child = snapsync()
            .args(["serve", "--allow", allow, "--state-dir", s(state)])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let hwm = sample_hwm(child.id());
        let mut wr = FrameWriter::new(child.stdin.take().unwrap());
        let mut rd = FrameReader::new(child.stdout.take().unwrap());
        let key = HashKey([7; 32]);
        wr.write_preamble().unwrap();
        wr.send(
            &Msg::Hello(Hello {
                features: 0,
                key,
                software: "fake-source".into(),
                bwlimit: None,
            }),
            &[],
        )
        .unwrap();
        wr.flush().unwrap();
        rd.read_preamble().unwrap();
        let Msg::HelloAck(_) = rd.read().unwrap().0 else {
            panic!("expected HelloAck")
        };
        Self {
            child: Some(child),
            wr,
            rd: Some(rd),
            key,
            started: Instant::now(),
            hwm,
        }
    }

    pub fn send(&mut self, msg: Msg, payload: &[u8]) -> Result<(), wire::WireError> {
        self.wr.send(&msg, payload)?;
        self.wr.flush()
    }

    /// Sends `Open` and returns the answer (`Opened`, or the error).
    pub fn open(&mut self, open: Open) -> Result<Opened, wire::WireError> {
        self.send(Msg::Open(open), &[])?;
        match self.rd.as_mut().unwrap().read()?.0 {
            Msg::Opened(o) => Ok(o),
            m => panic!("expected Opened, got {:?}", m.kind()),
        }
    }

    /// Reads and drops what serve sends, in a thread; the last frame that
    /// is not a heartbeat or digests is returned by the handle.
    pub fn drain_in_background(&mut self) -> thread::JoinHandle<Option<Result<Msg, String>>> {
        let mut rd = self.rd.take().unwrap();
        thread::spawn(move || {
            let mut last = None;
            loop {
                match rd.read() {
                    Ok((
                        Msg::Heartbeat(_) | Msg::BlockHashes(_) | Msg::Holes(_) | Msg::SubHashes(_),
                        _,
                    )) => {}
                    Ok((m, _)) => last = Some(Ok(m)),
                    Err(wire::WireError::Remote(e)) => return Some(Err(e.message)),
                    Err(_) => return last,
                }
            }
        })
    }

    /// Closes our side and waits for serve to end, measuring it.
    pub fn finish(mut self, deadline: Duration) -> Measured {
        let mut child = self.child.take().unwrap();
        drop(self.wr);
        // Its stdout is ours (or the drain thread's): nothing more is read.
        drop(self.rd.take());
        let err_t = read_all_in_thread(child.stderr.take().unwrap());
        let status = wait_or_kill(
            &mut child,
            self.started,
            self.started.elapsed() + deadline,
            Duration::from_millis(10),
            || {},
        );
        let elapsed = self.started.elapsed();
        let stderr = err_t.join().unwrap_or_default();
        let run = Run::new(status, String::new(), stderr, elapsed);
        assert!(status.is_some(), "serve did not finish in time\n{run}");
        Measured {
            run,
            hwm_kib: self.hwm.load(Ordering::Relaxed),
        }
    }
}

/// An `Open` for a session of `path`, a full scan toward a snapshot "snap".
pub fn open_msg(path: &Path, size: u64, block: u64) -> Open {
    Open {
        path: s(path).into(),
        source_size: size,
        block_size: BlockSize::new(block).unwrap(),
        source_id: "hostile-source".into(),
        mode: Mode::FullScan,
        base: None,
        target_generation: Generation {
            number: 0,
            snapshot: "snap".into(),
        },
        dry_run: false,
        force: false,
        journal_max: 1 << 40,
        resume: false,
        target_snapshot: false,
        source_data_bytes: None,
        map_target: None,
    }
}

/// Whether another process may take the volume's lock now.
pub fn lock_is_free(state: &Path, volume: &Path) -> bool {
    if !lock_path(state, volume).exists() {
        return true;
    }
    // flock(1) from util-linux, non-blocking.
    Command::new("flock")
        .args(["-n", s(&lock_path(state, volume)), "true"])
        .status()
        .is_ok_and(|st| st.success())
}

/// Files in `dir` whose names start with `prefix`.
pub fn files_starting(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Reads everything from `r` in a thread (so a peer never blocks on us).
pub fn sink(mut r: impl Read + Send + 'static) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
    });
}

/// Writes `bytes` repeatedly to `w` for at most `limit` bytes or until
/// the other side closes; returns what was written.
pub fn flood(w: &mut impl Write, bytes: &[u8], limit: u64) -> u64 {
    let mut sent = 0;
    while sent < limit {
        if w.write_all(bytes).is_err() {
            break;
        }
        sent += bytes.len() as u64;
    }
    sent
}
