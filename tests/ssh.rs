//! `snapsync sync` through a real OpenSSH server on 127.0.0.1, with
//! throwaway host and user keys. The sshd runs as the current user (root in
//! CI) with its own config, and is killed when the test ends.
//!
//! When sshd is not installed the tests fail, unless
//! SNAPSYNC_ALLOW_SKIP_SSH=1 (`scripts/install-deps` installs it).

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

/// A running sshd with its keys, killed on drop.
struct Sshd {
    child: Child,
    dir: TempDir,
    port: u16,
    user: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    for c in candidates {
        let p = Path::new(c);
        if p.is_absolute() {
            if p.exists() {
                return Some(p.to_owned());
            }
        } else if let Some(paths) = std::env::var_os("PATH") {
            if let Some(found) = std::env::split_paths(&paths)
                .map(|d| d.join(c))
                .find(|f| f.exists())
            {
                return Some(found);
            }
        }
    }
    None
}

/// sshd, or `None` when it is missing and skipping is allowed.
fn sshd_binary() -> Option<PathBuf> {
    let sshd = find_program(&["/usr/sbin/sshd", "/usr/local/sbin/sshd", "sshd"]);
    let clients = find_program(&["ssh"]).is_some() && find_program(&["ssh-keygen"]).is_some();
    match sshd {
        Some(p) if clients => Some(p),
        _ => {
            if std::env::var("SNAPSYNC_ALLOW_SKIP_SSH").as_deref() == Ok("1") {
                eprintln!(
                    "NOTICE: skipping the ssh test: sshd, ssh or ssh-keygen is not installed"
                );
                None
            } else {
                panic!(
                    "sshd, ssh and ssh-keygen are needed for the ssh tests (scripts/install-deps installs \
                     openssh-server); set SNAPSYNC_ALLOW_SKIP_SSH=1 to skip them"
                );
            }
        }
    }
}

/// Makes a key pair at `path` (and `path`.pub); returns `path`.
fn keygen(path: PathBuf) -> PathBuf {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "snapsync-test", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .status()
        .expect("running ssh-keygen");
    assert!(st.success(), "ssh-keygen failed for {}", path.display());
    path
}

fn pubkey(key: &Path) -> String {
    std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_owned()
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("running id");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    /// Starts sshd with `authorized_keys` lines (one per entry).
    fn start(sshd: &Path, authorized: &[String]) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("snapsync-ssh-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        keygen(d.join("host_key"));
        std::fs::write(d.join("authorized_keys"), authorized.join("\n") + "\n").unwrap();
        // Privilege separation needs this directory (not created by the
        // package in containers). Harmless when not root.
        let _ = std::fs::create_dir_all("/run/sshd");

        let mut last_log = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let config = d.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress 127.0.0.1\n\
                     HostKey {host}\n\
                     AuthorizedKeysFile {auth}\n\
                     PidFile {pid}\n\
                     UsePAM no\n\
                     StrictModes no\n\
                     PermitRootLogin yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PubkeyAuthentication yes\n\
                     AllowTcpForwarding no\n\
                     X11Forwarding no\n\
                     LogLevel VERBOSE\n",
                    host = s(&d.join("host_key")),
                    auth = s(&d.join("authorized_keys")),
                    pid = s(&d.join("sshd.pid")),
                ),
            )
            .unwrap();
            run_helper(
                Command::new(sshd).arg("-t").arg("-f").arg(&config),
                "sshd -t rejects the test config",
            );
            let log = d.join("sshd.log");
            let mut child = Command::new(sshd)
                .arg("-D")
                .arg("-f")
                .arg(&config)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting sshd");
            match wait_listening(&mut child, port) {
                Ok(()) => {
                    return Sshd {
                        child,
                        dir,
                        port,
                        user: current_user(),
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = format!(
                        "{why}\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    eprintln!("sshd on port {port} failed; retrying on another port\n{last_log}");
                }
            }
        }
        panic!("sshd would not start\n{last_log}")
    }

    /// The `--rsh` command for a key: real ssh, no host key checks, no
    /// user config.
    fn rsh(&self, key: &Path) -> String {
        format!(
            "ssh -T -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o LogLevel=ERROR -o IdentitiesOnly=yes -o ConnectTimeout=10 -i {} -p {}",
            s(key),
            self.port
        )
    }

    fn remote(&self, path: &Path) -> String {
        format!("{}@127.0.0.1:{}", self.user, s(path))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Asserts the exit status of a session through this sshd, showing
    /// its log on failure.
    fn assert_code(&self, r: &Run, code: i32, what: &str) {
        assert_eq!(
            r.code,
            Some(code),
            "{what}\n{r}\n--- sshd log ---\n{}",
            self.log()
        );
    }
}

/// Waits until sshd accepts connections on `port`.
fn wait_listening(child: &mut Child, port: u16) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("sshd exited with {status}"));
        }
        if Instant::now() > until {
            return Err(format!(
                "sshd did not accept connections on port {port} within 10s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// sshd and a test directory; `None` when the test is skipped.
fn setup() -> Option<(PathBuf, TempDir)> {
    let sshd = sshd_binary()?;
    let dir = tempfile::Builder::new()
        .prefix("snapsync-ssh-test-")
        .tempdir()
        .unwrap();
    Some((sshd, dir))
}

/// `snapsync WHAT SRC DST --state-dir STATE` through `rsh`.
fn over(what: &str, src: &Path, dst: &str, state: &Path, rsh: &str) -> Command {
    let mut c = volume_cmd(what, src, dst, state);
    c.arg("--rsh").arg(rsh).arg("--remote-bin").arg(bin());
    c
}

/// Runs a sync through `rsh`; any exit.
fn sync_over(src: &Path, dst: &str, state: &Path, rsh: &str, extra: &[&str]) -> Run {
    run_with_deadline(
        over("sync", src, dst, state, rsh).arg("--json").args(extra),
        DEFAULT_DEADLINE,
    )
}

#[test]
fn scattered_changes_over_ssh_with_zstd() {
    let Some((sshd_bin, dir)) = setup() else {
        return;
    };
    let key = keygen(dir.path().join("user_key"));
    let sshd = Sshd::start(&sshd_bin, &[pubkey(&key)]);
    let rsh = sshd.rsh(&key);
    let (src, dst, state) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("state"),
    );
    // A zstd sync over ssh that must succeed and leave an exact replica.
    let sync = |from: &Path, to: &Path, what: &str| {
        let r = sync_over(
            from,
            &sshd.remote(to),
            &state,
            &rsh,
            &["--compress", "zstd"],
        );
        sshd.assert_code(&r, 0, what);
        assert_same_content(from, to);
        r.json()
    };
    let size = 16 * MIB;
    write_random_file(&src, size, 100);

    let j = sync(&src, &dst, "first copy over ssh failed");
    assert_eq!(j.u("data_bytes"), size, "{j}");
    assert_eq!(j.s("apply_mode"), "in-place", "{j}");
    assert_eq!(j.opt_u("generation"), Some(1), "{j}");
    // Random data does not compress: it must not grow much either.
    assert!(j.u("wire_bytes_sent") < size + size / 100 + 16 * KIB, "{j}");

    let changed = scatter_writes(&src, size, 101, 200);
    let j = sync(&src, &dst, "the delta over ssh failed");
    assert_scattered_delta(&j, size, &changed);
    assert_eq!(j.u("source_bytes_read"), size, "{j}");

    // Compressible data does shrink on the wire.
    let text = dir.path().join("text.img");
    write_text_file(&text, 4 * MIB, 102);
    let dst2 = dir.path().join("dst2.img");
    let j = sync(&text, &dst2, "the text over ssh failed");
    assert!(
        j.u("wire_bytes_sent") < j.u("data_bytes") / 3,
        "zstd did not compress text: {j}"
    );

    // verify over ssh: identical, then a damaged replica.
    let verify = || {
        run_with_deadline(
            &mut over("verify", &src, &sshd.remote(&dst), &state, &rsh),
            DEFAULT_DEADLINE,
        )
    };
    verify().assert_ok();
    write_at(&dst, 8 * MIB, &random_bytes(103, 4096));
    let r = verify();
    r.assert_code(7);
    assert!(
        r.stdout
            .contains(&format!("offset {} length 4096", 8 * MIB)),
        "{r}"
    );
}

#[test]
fn forced_command_refuses_paths_outside_its_allow_list() {
    let Some((sshd_bin, dir)) = setup() else {
        return;
    };
    let allowed = dir.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let state = dir.path().join("state");
    let key = keygen(dir.path().join("forced_key"));
    let forced = format!(
        "command=\"{} serve --allow {}/* --state-dir {}\",no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding {}",
        s(&bin()),
        s(&allowed),
        s(&state),
        pubkey(&key)
    );
    let sshd = Sshd::start(&sshd_bin, &[forced]);
    let rsh = sshd.rsh(&key);
    let src = dir.path().join("src.img");
    write_random_file(&src, 2 * MIB, 110);

    // Outside the allowed directory: refused by the server.
    let outside = dir.path().join("outside.img");
    let r = sync_over(&src, &sshd.remote(&outside), &state, &rsh, &[]);
    sshd.assert_code(&r, 4, "");
    r.assert_says("allow", "the message names the --allow list");
    assert!(!outside.exists(), "a refused target was created");

    // Inside it: the forced command serves it.
    let inside = allowed.join("dst.img");
    let r = sync_over(&src, &sshd.remote(&inside), &state, &rsh, &[]);
    sshd.assert_code(&r, 0, "");
    assert_same_content(&src, &inside);
}
