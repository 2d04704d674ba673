//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::source::Compress;
use crate::exit::UsageError;

#[derive(Debug, Parser)]
#[command(
    name = "snapsync",
    version,
    about = "Keep replicas of block volumes up to date, shipping only changed blocks"
)]
pub struct Cli {
    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Whether the command asked for quiet output.
    pub fn quiet_logs(&self) -> bool {
        match &self.command {
            Command::Sync(a) => a.transfer.quiet,
            Command::Verify(a) => a.transfer.quiet,
            _ => false,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make DST a byte-exact copy of SRC, sending only what differs.
    Sync(SyncArgs),
    /// Compare SRC and DST by hash and report differing ranges; ship nothing.
    Verify(VerifyArgs),
    /// Serve the target side of a session on stdin/stdout (run by ssh).
    Serve(ServeArgs),
    /// Replicate the volumes of a config file, in a loop or once.
    Run(RunArgs),
    /// Show each configured volume's replication state.
    Status(StatusArgs),
    /// Write man pages or shell completions (for packagers).
    #[command(hide = true, subcommand)]
    Generate(GenerateArgs),
}

#[derive(Debug, Subcommand)]
pub enum GenerateArgs {
    /// Write snapsync.1 and one page per command (snapsync-sync.1, ...) into DIR.
    Man { dir: PathBuf },
    /// Print the completion script of SHELL on stdout.
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
}

/// Options shared by everything that opens a session.
#[derive(Debug, Args, Clone)]
pub struct TransferArgs {
    /// Comparison block size (power of two, 4KiB..4MiB).
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub block_size: u64,
    /// Remote shell used to reach HOST in HOST:PATH, split on spaces.
    #[arg(long, default_value = crate::transport::DEFAULT_RSH)]
    pub rsh: String,
    /// Path of snapsync on the remote host.
    #[arg(long, default_value = "snapsync")]
    pub remote_bin: String,
    /// State directory of the target (for a remote target: on that host).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Print one JSON object with the session's counts on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// Keep the volumes' pages in the page cache after reading them
    /// (by default a scan drops the pages it brought in, to spare other
    /// users' cache, and leaves those that were cached before it came).
    #[arg(long)]
    pub keep_cache: bool,
    /// Give up when the other side makes no progress for this long (a hung
    /// remote never hangs the run).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Limit the bytes each side sends per second, in rsync's units: a
    /// bare number is KiB/s; K, M, G suffixes (e.g. 500, 20M). 0: no limit.
    #[arg(long, value_name = "RATE", value_parser = crate::bwlimit::parse_rate)]
    pub bwlimit: Option<u64>,
    #[command(flatten)]
    pub ceph: CephArgs,
}

/// How an `rbd:` target reaches its cluster (`sync`, `verify`, `serve`).
#[derive(Debug, Args, Clone)]
pub struct CephArgs {
    /// ceph.conf of the cluster of an `rbd:` target (default: $CEPH_CONF,
    /// then /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,
    /// cephx id (without `client.`) for an `rbd:` target (default: admin).
    #[arg(long, value_name = "ID")]
    pub ceph_id: Option<String>,
    /// Generation snapshots (`snapsync-N`) an `rbd:` target keeps (default 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_generations: Option<u32>,
}

impl CephArgs {
    pub fn options(&self) -> crate::engine::target::CephOptions {
        crate::engine::target::CephOptions {
            conf: self.ceph_conf.clone(),
            id: self.ceph_id.clone(),
            keep_generations: self.keep_generations,
        }
    }

    /// The same options for `serve` on a gateway (paths and ids as there).
    pub fn forward(&self, args: &mut Vec<String>) {
        if let Some(c) = &self.ceph_conf {
            args.push("--ceph-conf".into());
            args.push(c.to_string_lossy().into_owned());
        }
        if let Some(i) = &self.ceph_id {
            args.extend(["--ceph-id".into(), i.clone()]);
        }
        if let Some(k) = self.keep_generations {
            args.extend(["--keep-generations".into(), k.to_string()]);
        }
    }
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Source volume: image file or block device.
    pub src: PathBuf,
    /// Replica: /path, [user@]host:/path, rbd:POOL[/NAMESPACE]/IMAGE or
    /// host:rbd:POOL/IMAGE (through `serve` on that host). Several: the
    /// source is read once for all of them (fan-out).
    #[arg(required = true, num_args = 1..)]
    pub dst: Vec<String>,
    #[command(flatten)]
    pub transfer: TransferArgs,
    /// Fan-out: what the source's read may hold for the slowest target
    /// before that target is dropped from this sync.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub fanout_buffer: u64,
    /// Data frame compression: auto (zstd for remote targets while the link
    /// is slower than compressing), none, zstd[:LEVEL] (always).
    #[arg(long, default_value = "auto")]
    pub compress: String,
    /// Compare and report what would be sent; write nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Overwrite a replica of another source volume.
    #[arg(long)]
    pub force: bool,
    /// Start over instead of resuming an interrupted copy.
    #[arg(long)]
    pub no_resume: bool,
    /// Deltas up to this size go through the target's write-ahead journal
    /// (the replica is never torn); larger ones are applied in place,
    /// resumably. 0 disables the journal.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub journal_max: u64,
    /// After syncing, compare both ends again by hash.
    #[arg(long)]
    pub verify: bool,
    /// For a thin-LV target: take a thin snapshot of it as the rollback
    /// point and apply in place, instead of the journal's double write.
    #[arg(long)]
    pub target_snapshot: bool,
    /// Write the session's outcome as Prometheus metrics to FILE
    /// (textfile-collector format, replaced atomically).
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Where this host keeps its digest maps of what it sent (for the next
    /// sync of the same source to the same target).
    #[arg(long, value_name = "DIR", default_value = crate::state::DEFAULT_STATE_DIR)]
    pub source_state_dir: PathBuf,
    /// Neither use nor keep a digest map: every sync reads both volumes.
    #[arg(long)]
    pub no_digest_map: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub src: PathBuf,
    pub dst: String,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Path or glob pattern the peer may write (repeatable). Nothing else
    /// is opened for writing.
    #[arg(long = "allow", required = true)]
    pub allow: Vec<String>,
    /// Where per-volume state, locks and journals live.
    #[arg(long, default_value = crate::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Give up (and release the volume's lock) when the source makes no
    /// progress for this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Largest write-ahead journal this server keeps, whatever the source
    /// asks (it may only ask less); a larger delta is applied in place.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub journal_max: u64,
    #[command(flatten)]
    pub ceph: CephArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(long, short)]
    pub config: PathBuf,
    /// Do one due cycle per volume and exit (for cron and systemd timers).
    #[arg(long)]
    pub once: bool,
    #[arg(long)]
    pub json: bool,
    /// Copy-on-write space of thick LVM snapshots, for every volume: bytes
    /// or a percentage of the origin (overrides the config's snapshot_size).
    #[arg(long)]
    pub snapshot_size: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, short)]
    pub config: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// Parses "64KiB", "1M", "4096".
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("bad size {s:?}: {e}"))
}

/// Compression choice: `None` for no compression, else zstd at a level,
/// adaptive for `auto` (see [`crate::engine::source::Compress`]).
pub fn parse_compress(s: &str, remote: bool) -> Result<Option<Compress>, UsageError> {
    let always = |level| {
        Some(Compress {
            level,
            adaptive: false,
        })
    };
    match s {
        "auto" => Ok(remote.then_some(Compress {
            level: 3,
            adaptive: true,
        })),
        "none" => Ok(None),
        "zstd" => Ok(always(3)),
        _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
            Some(Ok(l)) if (1..=19).contains(&l) => Ok(always(l)),
            _ => Err(UsageError(format!(
                "--compress {s:?}: use auto, none, zstd or zstd:LEVEL (1-19)"
            ))),
        },
    }
}

/// Logs go to stderr; `-v` for info, `-vv` for debug, `-vvv` for trace.
/// RUST_LOG overrides. On a terminal lines carry colour and a timestamp;
/// otherwise (journald, a log file) neither: the journal stamps lines
/// itself. Either way one event is one line.
pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (verbose, quiet) {
        (0, true) => "error",
        (0, false) => "warn",
        (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| OneLine(std::io::stderr()))
        .with_ansi(terminal)
        .with_target(false);
    let _ = if terminal {
        builder.try_init()
    } else {
        builder.without_time().try_init()
    };
}

/// Writes each formatted log event as one line: newlines inside a message
/// (e.g. a remote's multi-line stderr) become " | ".
struct OneLine<W>(W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if !body.contains(&b'\n') {
            return self.0.write(buf);
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for (i, part) in body.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                out.extend_from_slice(b" | ");
            }
            out.extend_from_slice(part);
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `text` on one line: line breaks become " | " (for log lines).
pub fn one_line(text: &str) -> String {
    text.trim()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A size as a person reads it: IEC units, as the progress bar shows them
/// ("2.00 GiB", "512 B").
pub fn iec(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// Prints a line on stdout. A closed stdout (`| head`) is not an error
/// worth a panic: the line is dropped.
pub fn print_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_compression() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_compress("auto", false).unwrap(), None);
        let auto = parse_compress("auto", true).unwrap().unwrap();
        assert!(auto.adaptive && auto.level == 3);
        let z9 = parse_compress("zstd:9", false).unwrap().unwrap();
        assert!(!z9.adaptive && z9.level == 9);
        assert!(parse_compress("zstd:99", false).is_err());
        assert!(parse_compress("gzip", false).is_err());
    }

    #[test]
    fn human_sizes_are_iec() {
        assert_eq!(iec(512), "512 B");
        assert_eq!(iec(2 << 30), "2.00 GiB");
        assert_eq!(iec(1536), "1.50 KiB");
        assert_eq!(one_line("a\nb\n"), "a | b");
    }

    #[test]
    fn log_lines_stay_single() {
        use std::io::Write;
        let mut w = OneLine(Vec::new());
        w.write_all(b"WARN remote said: x\ny\n").unwrap();
        w.write_all(b"INFO plain\n").unwrap();
        assert_eq!(w.0, b"WARN remote said: x | y\nINFO plain\n");
    }
}
