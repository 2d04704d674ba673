use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use snapsync::cli::Cli;
use snapsync::exit::{classify, Exit};

fn main() -> ExitCode {
    // A panic is a bug: say so in one line, without a backtrace at the user.
    std::panic::set_hook(Box::new(|info| {
        let _ = writeln!(
            std::io::stderr(),
            "snapsync: internal error: {info}; please report this bug"
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    snapsync::cli::init_logging(cli.verbose, cli.quiet_logs());
    match snapsync::commands::dispatch(cli) {
        Ok(code) => code.into(),
        Err(err) => {
            let exit = classify(&err);
            // A closed stdout (e.g. `| head`) is not worth a message.
            let broken_pipe = err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if !broken_pipe || exit != Exit::Internal {
                // One line, whatever a remote said (journald: one event, one line).
                let msg = snapsync::cli::one_line(&describe(&err));
                let _ = writeln!(std::io::stderr(), "snapsync: error: {msg}");
            }
            exit.into()
        }
    }
}

/// The error and its causes, each said once: causes that repeat what an
/// outer message already says (a common shape of wrapped IO errors) are
/// left out.
fn describe(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
