//! An RBD image's `snapsync.state` image-meta value (anyone with write
//! access to the pool can set it): any text is a state or a clean error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = snapsync::engine::target::decode_rbd_state(text);
    }
});
