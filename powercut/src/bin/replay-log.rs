//! replay-log: lists and replays dm-log-writes logs (see the crate docs).
//!
//!     replay-log list LOG
//!         one line per entry: INDEX FLAGS SECTOR NR_SECTORS [MARK]
//!         (FLAGS: F flush, U fua, D discard, M mark, - none)
//!     replay-log size LOG
//!         bytes of LOG in use (the rest of a log device can be cut off)
//!     replay-log replay LOG DEV --from A --to B [--subset SEED]
//!         applies entries A..=B to DEV (a copy of the logged device as it
//!         was at entry A); with --subset, the writes after the last flush
//!         in A..=B are a random subset in random order (seeded)
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: replay-log list LOG | replay-log size LOG | replay-log replay LOG DEV --from A --to B [--subset SEED]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(Some(())) => ExitCode::SUCCESS,
        Ok(None) => usage(),
        Err(e) => {
            eprintln!("replay-log: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<Option<()>, Box<dyn std::error::Error>> {
    let (Some(cmd), Some(log_path)) = (args.first(), args.get(1)) else {
        return Ok(None);
    };
    let mut file = File::open(log_path).map_err(|e| format!("{log_path}: {e}"))?;
    // A log device's metadata says 0 bytes: ask by seeking.
    let len = dev_size(&mut file)?;
    let mut log = BufReader::with_capacity(1 << 20, file);
    let (sup, entries) = powercut::read_index(&mut log, len)?;
    match cmd.as_str() {
        "list" if args.len() == 2 => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for e in &entries {
                write!(
                    out,
                    "{} {} {} {}",
                    e.index,
                    e.flag_letters(),
                    e.sector,
                    e.nr_sectors
                )?;
                if let Some(m) = &e.mark {
                    write!(out, " {}", m.replace(char::is_whitespace, "_"))?;
                }
                writeln!(out)?;
            }
            out.flush()?;
        }
        "size" if args.len() == 2 => println!("{}", powercut::used_len(&sup, &entries)),
        "replay" => {
            let Some(dev_path) = args.get(2) else {
                return Ok(None);
            };
            let (mut from, mut to, mut seed) = (0u64, None, None);
            let mut it = args[3..].iter();
            while let Some(flag) = it.next() {
                let Some(v) = it.next() else { return Ok(None) };
                let v: u64 = v.parse().map_err(|_| format!("{flag} {v}: not a number"))?;
                match flag.as_str() {
                    "--from" => from = v,
                    "--to" => to = Some(v),
                    "--subset" => seed = Some(v),
                    _ => return Ok(None),
                }
            }
            let Some(to) = to else { return Ok(None) };
            if from > to || to >= sup.nr_entries {
                return Err(format!(
                    "entries {from}..={to}: the log has {} entries",
                    sup.nr_entries
                )
                .into());
            }
            let mut dev = OpenOptions::new()
                .write(true)
                .open(dev_path)
                .map_err(|e| format!("{dev_path}: {e}"))?;
            let dev_len = dev_size(&mut dev)?;
            let range = &entries[from as usize..=to as usize];
            for e in powercut::plan(range, seed) {
                powercut::apply(&mut log, &sup, e, &mut dev, dev_len)?;
            }
            dev.sync_all()?;
        }
        _ => return Ok(None),
    }
    Ok(Some(()))
}

/// Length of a file or block device.
fn dev_size(f: &mut File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}
