//! The source side of a session against a scripted target: flow-control
//! cases that timing never reliably produces against the real one.

mod common;
mod hostile_support;

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blockdiff::{BlockSize, Signer};
use hostile_support::{first_scan_opened, target_handshake};
use snapshot::volume::Fault;
use snapshot::{MemVolume, Volume};
use snapsync::engine::map::{self, MapHeader, MapPlan, MapStore, SALT_LEN};
use snapsync::engine::source::{self, Connection, SessionParams, SyncError};
use snapsync::engine::Cancel;
use snapsync::progress::Progress;
use wire::{
    BlockHashes, Committed, FrameReader, FrameWriter, Generation, Mode, Msg, Opened, ReplicaState,
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
    let (hello, open) = target_handshake(&mut rd, &mut wr, "scripted");
    assert_eq!(open.path, "/dst");
    // A window far shorter than the volume, as a target may choose.
    let window = 256;
    wr.send(
        &Msg::Opened(first_scan_opened(data.len() as u64, window)),
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
            // Heartbeats come every few seconds: a slow run sees them.
            Msg::Data(_) | Msg::Zero(_) | Msg::Heartbeat(_) => {}
            Msg::Finish(_) => break,
            m => panic!("unexpected {:?}", m.kind()),
        }
    }
    // The generation asked for: the source checks it.
    let state = ReplicaState {
        source_id: Some(open.source_id.clone()),
        generation: Some(wire::Generation {
            number: 1,
            snapshot: open.target_generation.snapshot.clone(),
        }),
        consistent: true,
        ..Default::default()
    };
    send_committed(&mut wr, state);
    reader.join().unwrap();
    credits_seen
}

/// A scripted target's `Committed`, for `state`.
fn send_committed(wr: &mut FrameWriter<UnixStream>, state: ReplicaState) {
    let committed = Committed {
        target_bytes_read: 0,
        target_bytes_written: 0,
        journal_bytes: 0,
        apply_mode: "scripted".into(),
        state,
    };
    wr.send(&Msg::Committed(committed), &[]).unwrap();
    wr.flush().unwrap();
}

/// The parameters of a session to "/dst" in 64 KiB blocks.
fn session_params() -> SessionParams {
    SessionParams::new(
        "/dst".into(),
        BlockSize::new(BLOCK).unwrap(),
        "test-source".into(),
        "snap".into(),
        // A stall fails the test in seconds instead of hanging it.
        Duration::from_secs(10),
    )
}

/// Runs the source side of a session over `stream`.
fn run_source(
    source: Arc<dyn Volume>,
    stream: UnixStream,
    params: &SessionParams,
) -> Result<source::Report, SyncError> {
    let conn = Connection {
        reader: Box::new(stream.try_clone().unwrap()),
        writer: Box::new(stream),
    };
    let progress = Progress::hidden();
    source::run(
        source,
        conn,
        params,
        &progress,
        &Cancel::new(),
        None,
        &mut None,
    )
}

#[test]
fn a_late_refinement_does_not_stall_the_credit() {
    let target_data: Vec<u8> = (0..BLOCKS * BLOCK).map(|i| (i % 251) as u8).collect();
    let mut source_data = target_data.clone();
    source_data[100] ^= 0xFF; // block 0 differs, in one sub-block
    let (ours, theirs) = UnixStream::pair().unwrap();
    let target = thread::spawn(move || late_refine_target(theirs, target_data));

    let source = Arc::new(MemVolume::new("/src", source_data, false));
    let params = session_params();
    let report = run_source(source, ours, &params).expect("the session completes");
    assert!(target.join().unwrap() > 0);
    assert_eq!(report.blocks_changed, 1);
    assert_eq!(report.data_bytes, 4096);
}

// ------------------------------------------------- the digest map's early scan

/// A source volume that counts the bytes read from it.
#[derive(Debug)]
struct Counted {
    inner: MemVolume,
    read: AtomicU64,
}

impl Volume for Counted {
    fn path(&self) -> &std::path::Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapshot::volume::Result<()> {
        self.inner.read_at(buf, offset)?;
        self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> snapshot::volume::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> snapshot::volume::Result<()> {
        self.inner.zero(offset, len)
    }
    fn sync(&self) -> snapshot::volume::Result<()> {
        self.inner.sync()
    }
    fn set_size(&self, size: u64) -> snapshot::volume::Result<()> {
        self.inner.set_size(size)
    }
    fn resizable(&self) -> bool {
        false
    }
}

/// The map of generation `base` of `old`, as a previous session left it.
fn map_of(dir: &std::path::Path, old: &[u8], base: &Generation) -> MapPlan {
    let store = MapStore::open(&dir.join("maps")).unwrap();
    let bs = BlockSize::new(BLOCK).unwrap();
    let salt = [3; SALT_LEN];
    let mut w = store.writer("m", bs, old.len() as u64, &salt).unwrap();
    let signer = store.key().signer(&salt);
    for b in old.chunks(BLOCK as usize) {
        w.push(&signer.block_digest(b)).unwrap();
    }
    let header = MapHeader {
        salt,
        block_size: bs,
        volume_size: old.len() as u64,
        generation: base.clone(),
        source_id: "test-source".into(),
        target_identity: "file:1:2".into(),
    };
    w.commit(&header).unwrap();
    MapPlan {
        store,
        name: "m".into(),
        scrub: None,
    }
}

/// A target holding generation `base` (`replica`) behind a slow login: it
/// answers only once `ready` says so (or after 10 s), then runs the digest
/// map's mode. Returns its replica with the session's ops applied, or
/// `None` when the session ended without `Finish`.
fn mapped_target(
    stream: UnixStream,
    mut replica: Vec<u8>,
    base: Generation,
    ready: impl Fn() -> bool,
) -> Option<Vec<u8>> {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !ready() && std::time::Instant::now() < until {
        thread::sleep(Duration::from_millis(5));
    }
    let mut rd = FrameReader::new(stream.try_clone().unwrap());
    let mut wr = FrameWriter::new(stream);
    let (hello, open) = target_handshake(&mut rd, &mut wr, "scripted");
    assert_eq!(open.mode, Mode::Mapped);
    assert_eq!(open.base.as_ref(), Some(&base));
    let state = |generation| ReplicaState {
        source_id: Some(open.source_id.clone()),
        generation: Some(generation),
        consistent: true,
        ..Default::default()
    };
    let opened = Opened {
        mode: Mode::Mapped,
        state: state(base.clone()),
        ..first_scan_opened(replica.len() as u64, 1 << 16)
    };
    wr.send(&Msg::Opened(opened), &[]).unwrap();
    wr.flush().unwrap();
    if !serve_until_finish(&mut rd, &mut wr, &Signer::new(hello.key), &mut replica) {
        return None;
    }
    let next = Generation {
        number: base.number + 1,
        snapshot: open.target_generation.snapshot.clone(),
    };
    send_committed(&mut wr, state(next));
    Some(replica)
}

/// Serves a session's frames as an honest target would, until `Finish`:
/// refinements answered from `replica` (digests under `signer`), ops
/// applied to it. `false` when the session ended or failed first.
fn serve_until_finish(
    rd: &mut FrameReader<UnixStream>,
    wr: &mut FrameWriter<UnixStream>,
    signer: &Signer,
    replica: &mut [u8],
) -> bool {
    let (mut subs, mut payload) = (Vec::new(), Vec::new());
    loop {
        let Ok((msg, data)) = rd.read() else {
            return false;
        };
        match msg {
            Msg::Refine(r) => {
                let o = (r.block * BLOCK) as usize;
                let end = (o + BLOCK as usize).min(replica.len());
                subs.clear();
                signer.sub_digests(&replica[o..end], &mut subs);
                wire::digests_to_payload(&subs, &mut payload);
                wr.send(&Msg::SubHashes(SubHashes { block: r.block }), &payload)
                    .unwrap();
                wr.flush().unwrap();
            }
            Msg::Data(d) => replica[d.offset as usize..][..d.len as usize].copy_from_slice(data),
            Msg::Zero(z) => replica[z.offset as usize..][..z.len as usize].fill(0),
            Msg::Credit(_) | Msg::Heartbeat(_) => {}
            Msg::Finish(_) => return true,
            Msg::Error(_) => return false,
            m => panic!("unexpected {:?}", m.kind()),
        }
    }
}

fn mapped_params(plan: MapPlan) -> SessionParams {
    let mut params = session_params();
    params.digest_map = Some(plan);
    params
}

/// With the base's map the source needs nothing from the target to
/// compare: it reads and compares the whole volume while the target has
/// not even answered its hello (a slow ssh login), and what it found
/// then is exactly what the target must write; the new map holds the
/// new data's digests.
#[test]
fn the_source_compares_with_its_map_before_the_target_answers() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * BLOCK + 1000;
    let old: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let mut new = old.clone();
    new[(3 * BLOCK + 5) as usize] ^= 1;
    new[(17 * BLOCK) as usize..(18 * BLOCK) as usize].fill(0);
    new[(size - 10) as usize] ^= 0x80;
    let base = Generation {
        number: 6,
        snapshot: "g6".into(),
    };
    let plan = map_of(dir.path(), &old, &base);
    let source = Arc::new(Counted {
        inner: MemVolume::new("/src", new.clone(), false),
        read: AtomicU64::new(0),
    });
    let (ours, theirs) = UnixStream::pair().unwrap();
    let read_before = Arc::new(AtomicU64::new(0));
    let target = {
        let (source, read_before, base) = (source.clone(), read_before.clone(), base.clone());
        thread::spawn(move || {
            mapped_target(theirs, old, base, || {
                let n = source.read.load(Ordering::SeqCst);
                read_before.store(n, Ordering::SeqCst);
                n >= size
            })
        })
    };
    let params = mapped_params(plan);
    let report = run_source(source.clone(), ours, &params).expect("the session completes");
    let replica = target.join().unwrap().expect("the target committed");
    assert_eq!(
        read_before.load(Ordering::SeqCst),
        size,
        "the whole source was compared before the target answered"
    );
    assert!(replica == new, "the replica equals the source");
    assert_eq!(report.mode, "digest-map");
    assert_eq!(report.blocks_changed, 3);
    assert_eq!(report.data_bytes, 4096 + 1000);
    assert_eq!(report.zero_bytes, BLOCK);
    assert_eq!(report.source_bytes_read, size, "each block read once");
    // The new map: the new data's digests, of the generation committed.
    let store = &params.digest_map.as_ref().unwrap().store;
    let bytes = std::fs::read(store.dir().join("m.map")).unwrap();
    let (header, digests) = map::decode(&bytes, store.key()).unwrap();
    assert_eq!(header.generation.number, 7);
    assert_eq!(header.salt, [3; SALT_LEN], "the base's salt carries over");
    let signer = store.key().signer(&header.salt);
    let want: Vec<_> = new
        .chunks(BLOCK as usize)
        .map(|b| signer.block_digest(b))
        .collect();
    assert!(digests == want, "the new map holds the new data");
}

/// A read error the early scan met fails the session as the same error
/// met later would: the source's I/O error, nothing committed.
#[test]
fn a_read_error_met_before_the_target_answered_fails_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * BLOCK;
    let old: Vec<u8> = (0..size).map(|i| (i % 249) as u8).collect();
    let base = Generation {
        number: 2,
        snapshot: "g2".into(),
    };
    let plan = map_of(dir.path(), &old, &base);
    let source = Arc::new(
        MemVolume::new("/src", old.clone(), false).with_fault(Fault::Read { at: 20 * BLOCK }),
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    let started = std::time::Instant::now();
    let target = thread::spawn(move || {
        mapped_target(theirs, old, base, || {
            started.elapsed() > Duration::from_millis(500)
        })
    });
    let params = mapped_params(plan);
    let err = run_source(source, ours, &params).expect_err("the read error fails the session");
    assert!(matches!(err, SyncError::Source(_)), "{err}");
    assert!(target.join().unwrap().is_none(), "nothing committed");
}

// --------------------------------------- a full scan that renews the map

/// A target that runs a full scan of `replica` (its digests keyed with the
/// session's key, every block at once) and commits generation 1. Returns
/// the session's key and the replica with the ops applied.
fn full_scan_target(stream: UnixStream, mut replica: Vec<u8>) -> (blockdiff::HashKey, Vec<u8>) {
    let mut rd = FrameReader::new(stream.try_clone().unwrap());
    let mut wr = FrameWriter::new(stream);
    let (hello, open) = target_handshake(&mut rd, &mut wr, "scripted");
    assert_eq!(open.mode, Mode::FullScan);
    let opened = first_scan_opened(replica.len() as u64, 1 << 16);
    wr.send(&Msg::Opened(opened), &[]).unwrap();
    let signer = Signer::new(hello.key);
    let mut payload = Vec::new();
    let digests: Vec<_> = replica
        .chunks(BLOCK as usize)
        .map(|b| signer.block_digest(b))
        .collect();
    wire::digests_to_payload(&digests, &mut payload);
    wr.send(&Msg::BlockHashes(BlockHashes { first: 0 }), &payload)
        .unwrap();
    wr.flush().unwrap();
    assert!(serve_until_finish(&mut rd, &mut wr, &signer, &mut replica));
    let state = ReplicaState {
        source_id: Some(open.source_id.clone()),
        generation: Some(Generation {
            number: 1,
            snapshot: open.target_generation.snapshot.clone(),
        }),
        consistent: true,
        ..Default::default()
    };
    send_committed(&mut wr, state);
    (hello.key, replica)
}

/// A full scan with the digest map on makes the next cycle's map. It
/// hashes each block once: the digests it compares with the target's are
/// the new map's (its session key is the map's block key), where it used
/// to hash every block a second time under the map's own key.
#[test]
fn a_full_scan_makes_its_map_from_the_digests_it_compared() {
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * BLOCK;
    let new: Vec<u8> = (0..size).map(|i| (i % 247) as u8).collect();
    let mut old = new.clone();
    for b in [3u64, 17, 40] {
        old[(b * BLOCK + 5000) as usize] ^= 0x5A;
    }
    let store = MapStore::open(&dir.path().join("maps")).unwrap();
    let params = mapped_params(MapPlan {
        store: store.clone(),
        name: "m".into(),
        scrub: None,
    });
    let (ours, theirs) = UnixStream::pair().unwrap();
    let target = thread::spawn(move || full_scan_target(theirs, old));
    let source = Arc::new(MemVolume::new("/src", new.clone(), false));
    let report = run_source(source, ours, &params).expect("the session completes");
    let (key, replica) = target.join().unwrap();
    assert!(replica == new, "the replica is the source");
    assert_eq!(report.blocks_changed, 3);
    assert_eq!(report.data_bytes, 3 * 4096);
    let bytes = std::fs::read(store.dir().join("m.map")).unwrap();
    let (header, digests) = map::decode(&bytes, store.key()).unwrap();
    assert_eq!(header.generation.number, 1);
    let session = Signer::new(key);
    let compared: Vec<_> = new
        .chunks(BLOCK as usize)
        .map(|b| session.block_digest(b))
        .collect();
    assert!(digests == compared, "the map holds the digests compared");
    assert_eq!(
        store
            .key()
            .signer(&header.salt)
            .block_digest(&new[..BLOCK as usize]),
        compared[0],
        "and the source can key them again from the map's salt alone"
    );
}
