//! Connecting to a target: an in-process `serve` over pipes for a local
//! replica, or `snapsync serve` on another host through a remote shell.
//! Either way the session speaks the same protocol.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::engine::source::Connection;
use crate::engine::target::{self, ServeConfig, ServeSummary, TargetError};
use crate::engine::{Cancel, Clock};
use crate::exit::UsageError;

/// The remote shell unless `--rsh` says otherwise. Keepalives make a dead
/// network path fail the session in about a minute instead of never.
/// AES-GCM first: with AES instructions (x86-64 since 2010, ARMv8) ssh
/// spends about a quarter less CPU than with OpenSSH's default
/// chacha20-poly1305 (512 MiB through ssh on 127.0.0.1: 3.6 against 4.9
/// CPU-s, both ends), and on a 2-core host ssh's cipher competes with
/// hashing and zstd. The rest of the list keeps every server that lacks it
/// reachable.
pub const DEFAULT_RSH: &str = "ssh -T -o BatchMode=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4 \
     -c aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr";

/// Where the replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Local(PathBuf),
    /// `rbd:POOL[/NAMESPACE]/IMAGE`: an RBD image this host reaches.
    Rbd(String),
    Remote {
        host: String,
        path: String,
    },
}

impl Destination {
    /// The replica's path as the target will see it: absolute for a local
    /// one, as given for a remote one (resolved on that host).
    pub fn target_path(&self) -> Result<String> {
        Ok(match self {
            Destination::Local(p) => absolute(p)?.to_string_lossy().into_owned(),
            Destination::Rbd(name) => name.clone(),
            Destination::Remote { path, .. } => path.clone(),
        })
    }

    /// `[user@]host:/path` is remote (a ':' before the first '/'), like rsync.
    /// A host that could pass for an option of the remote shell (leading
    /// '-') or that holds whitespace or control characters is a usage error.
    /// `rbd:` is a reserved prefix: never a host named `rbd` (write
    /// `user@rbd:` or `rbd.:` for that host).
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        if rbd::RbdSpec::is_rbd(s) {
            rbd::RbdSpec::parse(s).map_err(|e| UsageError(e.to_string()))?;
            return Ok(Destination::Rbd(s.to_owned()));
        }
        Ok(match s.split_once(':') {
            Some((host, path)) if !host.is_empty() && !host.contains('/') => {
                check_host(host)?;
                Destination::Remote {
                    host: host.to_owned(),
                    path: path.to_owned(),
                }
            }
            _ => Destination::Local(PathBuf::from(s)),
        })
    }
}

/// Refuses a `[user@]host` the remote shell could take for an option or
/// split into words.
pub fn check_host(host: &str) -> Result<(), UsageError> {
    let bad = |why: &str| UsageError(format!("host {host:?} {why}; refused"));
    let name = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.starts_with('-') || name.starts_with('-') {
        return Err(bad("starts with '-' (it would be taken as an option)"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace or control characters"));
    }
    Ok(())
}

/// The other end of a connection, to wait for at the end.
#[derive(Debug)]
pub enum Peer {
    Thread(JoinHandle<Result<ServeSummary, TargetError>>),
    Child {
        child: Child,
        stderr: JoinHandle<String>,
        what: String,
    },
}

/// Serves `path` in a thread of this process.
pub fn local(path: PathBuf, state_dir: PathBuf, cancel: Cancel) -> Result<(Connection, Peer)> {
    let name = absolute(&path)?.to_string_lossy().into_owned();
    local_target(name, state_dir, Default::default(), cancel)
}

/// Serves the target `name` (an absolute path or an `rbd:` name) in a
/// thread of this process.
pub fn local_target(
    name: String,
    state_dir: PathBuf,
    ceph: target::CephOptions,
    cancel: Cancel,
) -> Result<(Connection, Peer)> {
    let (to_target_r, to_target_w) = std::io::pipe().context("creating a pipe")?;
    let (to_source_r, to_source_w) = std::io::pipe().context("creating a pipe")?;
    let pattern = glob::Pattern::new(&glob::Pattern::escape(&name))?;
    let cfg = ServeConfig {
        allow: vec![pattern],
        state_dir,
        cancel,
        timeout: None,
        journal_max: u64::MAX,
        ceph,
    };
    let handle = thread::Builder::new()
        .name("local-target".into())
        .spawn(move || target::serve(to_target_r, to_source_w, &cfg))
        .context("starting the local target")?;
    Ok((
        Connection {
            reader: Box::new(to_source_r),
            writer: Box::new(to_target_w),
        },
        Peer::Thread(handle),
    ))
}

/// Absolute form of a local path, without resolving symlinks.
pub fn absolute(p: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Quotes one word for the remote shell that ssh hands the command to.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs `RSH HOST REMOTE_BIN serve ARGS…` with its stdin/stdout as the
/// connection. `rsh` is split on whitespace, like rsync's `-e`.
pub fn remote(
    rsh: &str,
    host: &str,
    remote_bin: &str,
    serve_args: &[String],
) -> Result<(Connection, Peer)> {
    let mut words = rsh.split_whitespace();
    let program = words.next().context("--rsh is empty")?;
    check_host(host)?;
    let mut cmd = Command::new(program);
    cmd.args(words);
    // ssh takes options up to the host: `--` ends them, whatever the host.
    if Path::new(program).file_name().is_some_and(|n| n == "ssh") {
        cmd.arg("--");
    }
    cmd.arg(host).arg(shell_quote(remote_bin)).arg("serve");
    cmd.args(serve_args.iter().map(|a| shell_quote(a)));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group: a terminal's Ctrl-C reaches only us (we stop
    // the session cleanly), and ending the peer ends everything it started.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let what = format!("{program} {host} {remote_bin} serve");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting remote shell `{program}`"))?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    widen_pipe(&stdin);
    widen_pipe(&stdout);
    let mut err = child.stderr.take().expect("piped");
    // Keep the last 16 KiB the remote side says, for error messages.
    let stderr = thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 16 * 1024 {
                kept.drain(..kept.len() - 16 * 1024);
            }
        }
        String::from_utf8_lossy(&kept).trim().to_owned()
    });
    Ok((
        Connection {
            reader: Box::new(stdout),
            writer: Box::new(stdin),
        },
        Peer::Child {
            child,
            stderr,
            what,
        },
    ))
}

/// Pipes hold 64 KiB by default: a 1 MiB data frame then takes sixteen
/// round trips of wake-ups between us and the remote shell. A wider pipe
/// (1 MiB, the unprivileged limit) lets each side run longer between
/// them. Best effort: a pipe that stays narrow only costs time.
pub fn widen_pipe(fd: impl std::os::fd::AsFd) {
    let _ = rustix::pipe::fcntl_setpipe_size(fd, PIPE_BYTES);
}

const PIPE_BYTES: usize = 1 << 20;

impl Peer {
    /// Waits for the peer to end. For a child: a bounded wait, then kill,
    /// so a hung remote never hangs us. Returns a description of a failure.
    pub fn finish(self) -> Option<String> {
        self.finish_within(Duration::from_secs(10))
    }

    /// [`Peer::finish`], giving a child `grace` to exit by itself.
    pub fn finish_within(self, grace: Duration) -> Option<String> {
        match self {
            Peer::Thread(h) => match h.join() {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.message),
                Err(_) => Some("the local target thread panicked".into()),
            },
            Peer::Child {
                mut child,
                stderr,
                what,
            } => {
                let deadline = Instant::now() + grace;
                let status = loop {
                    match child.try_wait() {
                        Ok(Some(s)) => break Some(s),
                        Ok(None) if Instant::now() < deadline => {
                            thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            kill_group(&child);
                            let _ = child.wait();
                            break None;
                        }
                    }
                };
                // Whatever the remote shell left running (it may hold our
                // pipes open) goes with it; then its stderr ends.
                kill_group(&child);
                let deadline = Instant::now() + Duration::from_secs(2);
                while !stderr.is_finished() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(10));
                }
                let said = if stderr.is_finished() {
                    stderr.join().unwrap_or_default()
                } else {
                    String::new()
                };
                match status {
                    Some(s) if s.success() => {
                        if !said.is_empty() {
                            tracing::debug!("remote said: {said}");
                        }
                        None
                    }
                    Some(s) => Some(format!("`{what}` exited with {s}{}", describe(&said))),
                    None => Some(format!(
                        "`{what}` did not exit and was killed{}",
                        describe(&said)
                    )),
                }
            }
        }
    }
}

/// Kills the peer's whole process group (the remote shell and anything it
/// started, which may hold our pipes).
fn kill_group(child: &Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

impl Peer {
    /// Ends the peer at once when `cancel` is set (a signal), or when it
    /// has sent nothing at all for `silence` (as `heard` tells: a peer that
    /// never answers the handshake, which no session timer covers yet),
    /// so a session blocked on a silent remote stops promptly. Returns the
    /// flag that stops the watcher and the one it sets when the silence
    /// ended the peer.
    pub fn kill_on_cancel(
        &self,
        cancel: &Cancel,
        heard: &Clock,
        silence: Duration,
    ) -> Option<(Arc<AtomicBool>, Arc<AtomicBool>)> {
        let Peer::Child { child, .. } = self else {
            return None;
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32)?;
        let done = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let (flag, cancel, heard, timed_out) =
            (done.clone(), cancel.clone(), heard.clone(), silent.clone());
        thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let quiet = heard.idle() > silence;
                if cancel.is_cancelled() || quiet {
                    timed_out.store(quiet, Ordering::SeqCst);
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        Some((done, silent))
    }
}

/// A reader that tells `clock` whenever bytes arrive.
pub struct Heard<R> {
    pub inner: R,
    pub clock: Clock,
}

impl<R> std::fmt::Debug for Heard<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Heard")
    }
}

impl<R: Read> Read for Heard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.clock.touch();
        }
        Ok(n)
    }
}

fn describe(said: &str) -> String {
    if said.is_empty() {
        String::new()
    } else {
        let lines: Vec<String> = said.lines().map(wire::escape).collect();
        format!(": {}", lines.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("/a/b").unwrap(),
            Destination::Local("/a/b".into())
        );
        assert_eq!(
            Destination::parse("./x:y").unwrap(),
            Destination::Local("./x:y".into())
        );
        assert_eq!(
            Destination::parse("root@h:/dev/vg/x").unwrap(),
            Destination::Remote {
                host: "root@h".into(),
                path: "/dev/vg/x".into()
            }
        );
    }

    #[test]
    fn rbd_is_a_reserved_prefix() {
        assert_eq!(
            Destination::parse("rbd:backup/data").unwrap(),
            Destination::Rbd("rbd:backup/data".into())
        );
        assert!(Destination::parse("rbd:backup").is_err());
        // The host named rbd is reached as user@rbd: or rbd.:
        for (d, host) in [("root@rbd:/dev/x", "root@rbd"), ("rbd.:/dev/x", "rbd.")] {
            assert_eq!(
                Destination::parse(d).unwrap(),
                Destination::Remote {
                    host: host.into(),
                    path: "/dev/x".into()
                }
            );
        }
        // Through a gateway, the rbd: name is the path serve opens there.
        assert_eq!(
            Destination::parse("gw:rbd:backup/ns/data").unwrap(),
            Destination::Remote {
                host: "gw".into(),
                path: "rbd:backup/ns/data".into()
            }
        );
    }

    #[test]
    fn option_like_hosts_are_refused() {
        for d in [
            "-oProxyCommand=touch pwned:x",
            "-oProxyCommand=x:y",
            "user@-oFoo:x",
            "h b:/x",
            "h\tb:/x",
            "h\nb:/x",
        ] {
            assert!(Destination::parse(d).is_err(), "{d:?}");
        }
        assert!(remote("ssh", "-oProxyCommand=true", "snapsync", &[]).is_err());
    }

    #[test]
    fn ssh_gets_a_double_dash_before_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path().join("ssh");
        let log = dir.path().join("args");
        std::fs::write(
            &ssh,
            format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let rsh = format!("{} -T", ssh.display());
        let (_conn, peer) = remote(&rsh, "host", "snapsync", &[]).unwrap();
        let _ = peer.finish();
        let args = std::fs::read_to_string(&log).unwrap();
        assert!(args.starts_with("-T\n--\nhost\n"), "{args:?}");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/dev/vg0/data"), "/dev/vg0/data");
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
        assert_eq!(shell_quote(""), "''");
    }
}
