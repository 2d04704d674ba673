//! The source side of a session against a scripted target: flow-control
//! cases that timing never reliably produces against the real one.

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blockdiff::{BlockSize, Signer};
use snapshot::MemVolume;
use snapsync::engine::source::{self, Connection, SessionParams};
use snapsync::engine::Cancel;
use snapsync::progress::Progress;
use wire::{
    BlockHashes, Committed, FrameReader, FrameWriter, HelloAck, Mode, Msg, Opened, ReplicaState,
    SubHashes,
};

const BLOCK: u64 = 64 * 1024;
const BLOCKS: u64 = 1024;

/// A target that hashes only as far as the credit lets it, and answers the
/// refinement of block 0 late: only after it has hashed everything the
/// credit allowed and the source had time to run out of digests. The credit
/// cannot move past block 0 until that refinement is settled, so a source
/// that waits for digests without settling what it can would wait forever.
fn late_refine_target(stream: UnixStream, data: Vec<u8>) -> u64 {
    let mut rd = FrameReader::new(stream.try_clone().unwrap());
    let mut wr = FrameWriter::new(stream);
    wr.write_preamble().unwrap();
    rd.read_preamble().unwrap();
    let Msg::Hello(hello) = rd.read().unwrap().0 else {
        panic!("expected Hello")
    };
    wr.send(
        &Msg::HelloAck(HelloAck {
            features: 0,
            software: "scripted".into(),
        }),
        &[],
    )
    .unwrap();
    wr.flush().unwrap();
    let Msg::Open(open) = rd.read().unwrap().0 else {
        panic!("expected Open")
    };
    assert_eq!(open.path, "/dst");
    // A window far shorter than the volume, as a target may choose.
    let window = 256;
    wr.send(
        &Msg::Opened(Opened {
            target_size: data.len() as u64,
            state: ReplicaState::default(),
            start_block: 0,
            window_blocks: window,
            mode: Mode::FullScan,
            resizable: true,
            target_identity: "file:1:2".into(),
            target_strong: true,
            unvouched: None,
        }),
        &[],
    )
    .unwrap();
    wr.flush().unwrap();

    // Frames from the source arrive on a channel so we can wait with a timeout.
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || loop {
        match rd.read() {
            Ok((msg, _)) => {
                let last = matches!(msg, Msg::Finish(_));
                if tx.send(msg).is_err() || last {
                    return;
                }
            }
            Err(_) => return,
        }
    });
    let signer = Signer::new(hello.key);
    let block = |b: u64| &data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
    let (mut credit, mut hashed, mut refine_zero_pending) = (0u64, 0u64, false);
    let mut credits_seen = 0;
    let mut payload = Vec::new();
    loop {
        while hashed < BLOCKS.min(credit + window) {
            wire::digests_to_payload(&[signer.block_digest(block(hashed))], &mut payload);
            wr.send(&Msg::BlockHashes(BlockHashes { first: hashed }), &payload)
                .unwrap();
            hashed += 1;
        }
        wr.flush().unwrap();
        let msg = match rx.recv_timeout(Duration::from_millis(300)) {
            Ok(m) => m,
            Err(_) if refine_zero_pending => {
                // Everything the credit allows is hashed and the source went
                // quiet: only now answer block 0.
                let mut subs = Vec::new();
                signer.sub_digests(block(0), &mut subs);
                wire::digests_to_payload(&subs, &mut payload);
                wr.send(&Msg::SubHashes(SubHashes { block: 0 }), &payload)
                    .unwrap();
                wr.flush().unwrap();
                refine_zero_pending = false;
                continue;
            }
            Err(_) => panic!("the source went quiet with nothing left to wait for"),
        };
        match msg {
            Msg::Credit(c) => {
                credit = credit.max(c.through);
                credits_seen += 1;
            }
            Msg::Refine(r) if r.block == 0 => refine_zero_pending = true,
            Msg::Refine(r) => {
                let mut subs = Vec::new();
                signer.sub_digests(block(r.block), &mut subs);
                wire::digests_to_payload(&subs, &mut payload);
                wr.send(&Msg::SubHashes(SubHashes { block: r.block }), &payload)
                    .unwrap();
            }
            Msg::Data(_) | Msg::Zero(_) => {}
            Msg::Finish(_) => break,
            m => panic!("unexpected {:?}", m.kind()),
        }
    }
    wr.send(
        &Msg::Committed(Committed {
            target_bytes_read: 0,
            target_bytes_written: 0,
            journal_bytes: 0,
            apply_mode: "scripted".into(),
            // The generation asked for: the source checks it.
            state: ReplicaState {
                source_id: Some(open.source_id.clone()),
                generation: Some(wire::Generation {
                    number: 1,
                    snapshot: open.target_generation.snapshot.clone(),
                }),
                consistent: true,
                ..Default::default()
            },
        }),
        &[],
    )
    .unwrap();
    wr.flush().unwrap();
    reader.join().unwrap();
    credits_seen
}

#[test]
fn a_late_refinement_does_not_stall_the_credit() {
    let target_data: Vec<u8> = (0..BLOCKS * BLOCK).map(|i| (i % 251) as u8).collect();
    let mut source_data = target_data.clone();
    source_data[100] ^= 0xFF; // block 0 differs, in one sub-block
    let (ours, theirs) = UnixStream::pair().unwrap();
    let target = thread::spawn(move || late_refine_target(theirs, target_data));

    let source = Arc::new(MemVolume::new("/src", source_data, false));
    let params = SessionParams::new(
        "/dst".into(),
        BlockSize::new(BLOCK).unwrap(),
        "test-source".into(),
        "snap".into(),
        // A stall fails the test in seconds instead of hanging it.
        Duration::from_secs(10),
    );
    let conn = Connection {
        reader: Box::new(ours.try_clone().unwrap()),
        writer: Box::new(ours),
    };
    let report = source::run(
        source,
        conn,
        &params,
        &Progress::hidden(),
        &Cancel::new(),
        None,
    )
    .expect("the session completes");
    assert!(target.join().unwrap() > 0);
    assert_eq!(report.blocks_changed, 1);
    assert_eq!(report.data_bytes, 4096);
}
