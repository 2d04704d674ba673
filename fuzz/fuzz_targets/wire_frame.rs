//! Frames from the peer: any bytes must decode to a frame or a clean error,
//! and a decoded frame must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, payload)) = wire::decode_frame(data) {
        let mut again = Vec::new();
        if wire::encode_frame(&msg, &data[payload.clone()], &mut again).is_ok() {
            let (back, range) = wire::decode_frame(&again[4..]).expect("re-encoded frame decodes");
            assert_eq!(back, msg);
            assert_eq!(&again[4..][range], &data[payload]);
        }
    }
    // The streaming reader over the same bytes must not panic either.
    let mut r = wire::FrameReader::new(data);
    while r.read().is_ok() {}
});
