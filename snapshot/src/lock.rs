//! Host-wide locks (`flock`) taken without waiting for another holder.

use std::fs::File;
use std::os::fd::AsFd;

use rustix::fs::{flock, FlockOperation};

/// An exclusive `flock`, given up when dropped.
///
/// A child that another thread of this process is spawning holds a copy
/// of every descriptor, a lock's too, from its fork until its exec closes
/// them; closing our descriptor would leave the lock held by that copy
/// for a moment, and a lock given up would look taken to its own process.
/// So the lock is given up explicitly (`LOCK_UN` releases it for every
/// copy of the open file) before the file is closed.
#[derive(Debug)]
pub struct Held(File);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = flock(&self.0, FlockOperation::Unlock);
    }
}

/// Takes an exclusive `flock` on `file`; `None` while another open of the
/// file (another process, or another lock of this one) holds it.
pub fn try_exclusive(file: File) -> std::io::Result<Option<Held>> {
    match flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(Held(file))),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
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
                .filter(|_| try_exclusive(open(&path)).unwrap().is_none())
                .count()
        });
        assert_eq!(busy, 0, "a free lock looked taken {busy} times in {tries}");
    }

    #[test]
    fn a_held_lock_is_held() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("l.lock");
        let first = try_exclusive(open(&path)).unwrap().expect("free");
        assert!(try_exclusive(open(&path)).unwrap().is_none());
        drop(first);
        assert!(try_exclusive(open(&path)).unwrap().is_some());
    }
}
