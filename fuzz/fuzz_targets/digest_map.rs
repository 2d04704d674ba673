//! A digest map file left on the source's disk (corrupted, truncated or
//! planted): checking it must end in a map or a clean refusal, never a
//! panic or an allocation beyond the input's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapsync::engine::map::{decode, MapKey};

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, &MapKey::new([7; 32]));
});
