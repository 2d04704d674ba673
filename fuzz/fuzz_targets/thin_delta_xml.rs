//! `thin_delta` output must be refused cleanly, never panic, and what is
//! accepted must satisfy the parser's guarantees.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::thin_delta::DeltaParser;

fuzz_target!(|data: &[u8]| {
    let Ok(parser) = DeltaParser::new(data) else {
        return;
    };
    let block = parser.data_block_bytes();
    assert!(block >= 512);
    let mut prev_end = 0u64;
    for range in parser {
        let Ok(range) = range else { break };
        assert!(range.length > 0);
        assert!(range.begin >= prev_end, "ascending, no overlap");
        prev_end = range.begin.checked_add(range.length).expect("no overflow");
        let _ = range.byte_range(block);
    }
});
