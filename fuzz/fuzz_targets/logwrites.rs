//! dm-log-writes logs (the power-cut harness's input): indexing and
//! replaying any bytes must end in entries or a clean error, never a panic
//! or a huge allocation.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut log = Cursor::new(data);
    if let Ok((sup, entries)) = powercut::read_index(&mut log, data.len() as u64) {
        let mut dev = Cursor::new(vec![0u8; 64 * 1024]);
        for e in powercut::plan(&entries, Some(data.len() as u64)) {
            let _ = powercut::apply(&mut log, &sup, e, &mut dev, 64 * 1024);
        }
    }
});
