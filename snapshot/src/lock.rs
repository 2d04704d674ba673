//! Host-wide locks (`flock`) taken without waiting for another holder.

use std::os::fd::AsFd;
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};

/// How often a lock is tried before it counts as held: about 50 ms in all.
const TRIES: u32 = 25;

/// Takes an exclusive `flock` on `file`; `Ok(false)` while another open
/// of the file (another process) holds it.
///
/// A child that another thread of this process is spawning holds a copy
/// of every descriptor, a lock's too, from its fork until its exec closes
/// them: a lock given up a moment ago can still look taken to its own
/// process. That window is short, so the lock is tried for about 50 ms
/// before it counts as held; another holder's hold lasts longer.
pub fn try_exclusive(file: &impl AsFd) -> std::io::Result<bool> {
    for _ in 0..TRIES {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Runs `f` while another thread spawns processes back to back: what made
/// a lock given up look taken (see [`try_exclusive`]). For tests.
#[doc(hidden)]
pub fn while_spawning<T>(f: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let spawner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::process::Command::new("true").status();
            }
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    spawner.join().expect("the spawning thread");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_lock_given_up_is_free_while_other_threads_spawn() {
        // Before: a child spawned by another thread between one open's
        // unlock and the next open's lock still had the first open's
        // descriptor, and the lock looked taken to its own process (CI
        // saw a pool's metadata snapshot "busy" so).
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("l.lock");
        let tries = 5000;
        let busy = while_spawning(|| {
            (0..tries)
                .filter(|_| !try_exclusive(&open(&path)).unwrap())
                .count()
        });
        assert_eq!(busy, 0, "a free lock looked taken {busy} times in {tries}");
    }

    #[test]
    fn a_held_lock_is_held() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("l.lock");
        let first = open(&path);
        assert!(try_exclusive(&first).unwrap());
        assert!(!try_exclusive(&open(&path)).unwrap());
        drop(first);
        assert!(try_exclusive(&open(&path)).unwrap());
    }
}
