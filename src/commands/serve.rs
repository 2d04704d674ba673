//! `snapsync serve`: the target side, on stdin/stdout.

use anyhow::{Context, Result};

use crate::cli::ServeArgs;
use crate::engine::target::{self, ServeConfig};
use crate::exit::{Exit, UsageError};

pub fn serve(args: ServeArgs) -> Result<Exit> {
    let allow = args
        .allow
        .iter()
        .map(|a| glob::Pattern::new(a).map_err(|e| UsageError(format!("--allow {a:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    // The session is crash-consistent, so the default action of SIGTERM
    // (end now) is safe; SIGINT from a terminal is the same.
    let cfg = ServeConfig {
        allow,
        state_dir: args.state_dir,
        cancel: crate::engine::Cancel::new(),
        timeout: Some(args.timeout),
        journal_max: args.journal_max,
        ceph: args.ceph.options(),
    };
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    crate::transport::widen_pipe(&stdin);
    crate::transport::widen_pipe(&stdout);
    match target::serve(stdin, stdout, &cfg) {
        Ok(summary) => {
            tracing::info!(
                "{}: {} ({} bytes written)",
                summary.path,
                summary.committed.apply_mode,
                summary.committed.target_bytes_written
            );
            Ok(Exit::Ok)
        }
        Err(e) => Err(e).context("serving"),
    }
}
