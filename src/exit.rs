//! Exit codes: the contract with cron, systemd and scripts. Documented in
//! the README; never renumber.

use std::process::ExitCode;

use crate::engine::source::SyncError;
use crate::engine::target::TargetError;
use crate::state::Busy;
use wire::ErrorCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// A bug or an unclassified failure.
    Internal = 1,
    /// Bad arguments or configuration.
    Usage = 2,
    /// Reading the source (or snapshotting it) failed.
    Source = 3,
    /// Opening or writing the target failed, it is too small, not allowed,
    /// or a replica of another volume.
    Target = 4,
    /// The remote shell, the connection or the protocol failed.
    Transport = 5,
    /// Another run holds the volume's lock.
    Busy = 6,
    /// `verify` (or `--verify`) found differences.
    Differs = 7,
    /// Stopped by SIGINT or SIGTERM.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// A usage error detected after argument parsing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// An error that already knows its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub exit: Exit,
    pub message: String,
}

fn from_code(code: ErrorCode) -> Exit {
    match code {
        ErrorCode::Usage => Exit::Usage,
        ErrorCode::NotAllowed | ErrorCode::TargetIo | ErrorCode::TooSmall | ErrorCode::Mismatch => {
            Exit::Target
        }
        ErrorCode::Busy => Exit::Busy,
        ErrorCode::Interrupted => Exit::Interrupted,
        ErrorCode::Protocol | ErrorCode::Internal => Exit::Transport,
    }
}

/// Picks the exit code for an error from the first classified cause.
pub fn classify(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.exit;
        }
        if cause.downcast_ref::<UsageError>().is_some() {
            return Exit::Usage;
        }
        if cause.downcast_ref::<Busy>().is_some() {
            return Exit::Busy;
        }
        if let Some(e) = cause.downcast_ref::<SyncError>() {
            return match e {
                SyncError::Source(_) => Exit::Source,
                SyncError::Remote(r) => from_code(r.code),
                SyncError::Transport(_) => Exit::Transport,
                SyncError::Interrupted => Exit::Interrupted,
            };
        }
        if let Some(e) = cause.downcast_ref::<TargetError>() {
            return from_code(e.code);
        }
    }
    Exit::Internal
}
