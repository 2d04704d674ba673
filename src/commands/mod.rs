//! One module per command: parse and validate, then call the engine.

pub mod generate;
pub mod serve;
pub mod sync;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::exit::Exit;

pub fn dispatch(cli: Cli) -> Result<Exit> {
    match cli.command {
        Command::Sync(a) => sync::sync(a),
        Command::Verify(a) => sync::verify(a),
        Command::Serve(a) => serve::serve(a),
        Command::Run(a) => crate::job::run(
            &a.config,
            a.once,
            a.json,
            a.snapshot_size.as_deref(),
            &cancel_on_signals()?,
        ),
        Command::Status(a) => crate::job::status(&a.config, a.json),
        Command::Generate(a) => generate::generate(a),
    }
}

/// Installs SIGINT/SIGTERM handlers that set the returned flag; a second
/// signal ends the process at once.
pub fn cancel_on_signals() -> Result<crate::engine::Cancel> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let cancel = crate::engine::Cancel::new();
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(
            sig,
            Exit::Interrupted as i32,
            cancel.flag(),
        )?;
        signal_hook::flag::register(sig, cancel.flag())?;
    }
    Ok(cancel)
}
