//! `snapsync generate`: man pages and shell completions from the clap
//! definitions, so they never drift from `--help`. Hidden: packagers and
//! `scripts/install` run it.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, GenerateArgs};
use crate::exit::Exit;

pub fn generate(a: GenerateArgs) -> Result<Exit> {
    match a {
        GenerateArgs::Man { dir } => man_pages(&dir)?,
        GenerateArgs::Completions { shell } => {
            let shell = match shell.as_str() {
                "bash" => clap_complete::Shell::Bash,
                "zsh" => clap_complete::Shell::Zsh,
                _ => clap_complete::Shell::Fish,
            };
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "snapsync", &mut out);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &out)
                .context("writing the completion script")?;
        }
    }
    Ok(Exit::Ok)
}

/// snapsync.1 and snapsync-COMMAND.1 for each visible command.
fn man_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))
}
