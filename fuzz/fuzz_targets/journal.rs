//! Journal files left on disk by a crash (or corrupted): parsing must end
//! in records, "incomplete" or a clean error, never a panic or a huge
//! allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = snapsync::journal::parse(data, |_| Ok(()));
});
