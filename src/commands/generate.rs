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
            clap_complete::generate(shell, &mut visible_command(), "snapsync", &mut out);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &out)
                .context("writing the completion script")?;
        }
    }
    Ok(Exit::Ok)
}

/// The command line without its hidden commands: clap_complete's bash
/// script lists hidden subcommands too (4.6), so they are left out here.
fn visible_command() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new("snapsync")
        .version(crate::VERSION)
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    if let Some(a) = full.get_about() {
        cmd = cmd.about(a.clone());
    }
    cmd
}

/// snapsync.1 and snapsync-COMMAND.1 for each visible command.
fn man_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_leave_out_hidden_commands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut visible_command(), "snapsync", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("bwlimit"), "{shell}: {text}");
            assert!(
                !text.contains("generate"),
                "{shell} lists the hidden command"
            );
        }
    }
}
