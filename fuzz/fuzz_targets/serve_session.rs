//! A whole `serve` session fed arbitrary bytes after a valid preamble:
//! whatever a source sends must end in a clean error or a commit, never a
//! panic, a hang or a huge allocation. The one allowed target is a small
//! file in a scratch directory that lives across runs (its state, lock
//! and journal too, so recovery paths get exercised).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use snapsync::engine::target::{self, ServeConfig};
use snapsync::engine::Cancel;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("snapsync-fuzz-serve");
        std::fs::create_dir_all(dir.join("state")).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let vol = dir.join("vol");
    // A fresh 256 KiB volume each run (the session may have resized it).
    std::fs::write(&vol, vec![0x5A; 256 * 1024]).unwrap();
    let cfg = ServeConfig {
        allow: vec![glob::Pattern::new(&vol.to_string_lossy()).unwrap()],
        state_dir: dir.join("state"),
        cancel: Cancel::new(),
        timeout: Some(Duration::from_secs(2)),
        journal_max: 1 << 20,
        ceph: Default::default(),
    };
    let mut input = wire::MAGIC.to_vec();
    input.extend_from_slice(&wire::PROTOCOL_VERSION.to_le_bytes());
    input.extend_from_slice(data);
    let _ = target::serve(std::io::Cursor::new(input), std::io::sink(), &cfg);
});
