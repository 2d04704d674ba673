//! Micro-benchmarks of the hot paths: block hashing, sub-block hashing,
//! zero detection and the frame codec. `cargo bench` prints throughput.

use blockdiff::{is_zero, HashKey, Signer};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use wire::{decode_frame, encode_frame, Codec, Data, Msg};

fn data(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hashing(c: &mut Criterion) {
    let s = Signer::new(HashKey([3; 32]));
    let block = data(64 * 1024);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(block.len() as u64));
    g.bench_function("block_digest_64k", |b| {
        b.iter(|| s.block_digest(black_box(&block)))
    });
    let mut out = Vec::with_capacity(16);
    g.bench_function("sub_digests_64k", |b| {
        b.iter(|| {
            out.clear();
            s.sub_digests(black_box(&block), &mut out);
        })
    });
    let zeros = vec![0u8; 64 * 1024];
    g.bench_function("is_zero_64k", |b| b.iter(|| is_zero(black_box(&zeros))));
    g.finish();
}

fn frames(c: &mut Criterion) {
    let payload = data(64 * 1024);
    let msg = Msg::Data(Data {
        offset: 1 << 30,
        len: payload.len() as u32,
        codec: Codec::Raw,
    });
    let mut buf = Vec::new();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("encode_data_64k", |b| {
        b.iter(|| {
            buf.clear();
            encode_frame(&msg, black_box(&payload), &mut buf).unwrap();
        })
    });
    buf.clear();
    encode_frame(&msg, &payload, &mut buf).unwrap();
    g.bench_function("decode_data_64k", |b| {
        b.iter(|| decode_frame(black_box(&buf[4..])).unwrap())
    });
    g.finish();
}

criterion_group!(benches, hashing, frames);
criterion_main!(benches);
