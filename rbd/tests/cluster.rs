//! Against a live Ceph cluster: runs when `CEPH_CONF` names one (as
//! `scripts/ceph-cluster up` prints), else each test prints a skip notice.
//! `SNAPSYNC_REQUIRE_CEPH=1` (set by `scripts/test`) turns a missing
//! cluster into a failure. The pool is `$SNAPSYNC_CEPH_POOL` (default
//! `snapsync`). Results are checked against the `rbd` CLI, which shares no
//! code with this crate's bindings.

use std::process::{Command, Stdio};

use rbd::{Cluster, ConnectOptions, Image, Pool, RbdSpec, RbdVolume};
use snapshot::Volume;

const MIB: u64 = 1 << 20;

fn pool_name() -> String {
    std::env::var("SNAPSYNC_CEPH_POOL").unwrap_or_else(|_| "snapsync".into())
}

/// The cluster and pool, or `None` (with a notice) when there is none.
fn cluster(test: &str) -> Option<(Cluster, Pool)> {
    let conf = std::env::var_os("CEPH_CONF").filter(|c| std::path::Path::new(c).exists());
    if conf.is_none() {
        if std::env::var("SNAPSYNC_REQUIRE_CEPH").as_deref() == Ok("1") {
            panic!("SNAPSYNC_REQUIRE_CEPH=1 but CEPH_CONF does not name a cluster's ceph.conf");
        }
        eprintln!("skipping {test}: no Ceph cluster (set CEPH_CONF; scripts/ceph-cluster up DIR)");
        return None;
    }
    let c = Cluster::connect(&ConnectOptions::default()).expect("connecting");
    let p = c.pool(&pool_name(), None).expect("opening pool");
    Some((c, p))
}

/// A fresh image name per test and process; removes a leftover of that name.
fn fresh(pool: &Pool, test: &str) -> String {
    let name = format!("t-{}-{}", test, std::process::id());
    if let Some(img) = pool.open(&name).unwrap() {
        remove_all(pool, &name, img);
    }
    name
}

/// A fresh image of `size` bytes for `test`, created and opened (with the
/// cluster and pool it lives in), or `None` (with a notice) without a
/// cluster.
fn fresh_image(test: &str, size: u64) -> Option<(Cluster, Pool, String, Image)> {
    let (c, pool) = cluster(test)?;
    let name = fresh(&pool, test);
    pool.create(&name, size).unwrap();
    let img = pool.open(&name).unwrap().unwrap();
    Some((c, pool, name, img))
}

/// `POOL/NAME`, as the `rbd` CLI takes it.
fn pool_spec(name: &str) -> String {
    format!("{}/{name}", pool_name())
}

fn rbd_cli(args: &[&str]) -> Vec<u8> {
    let out = Command::new("rbd")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("running rbd");
    assert!(out.status.success(), "rbd {args:?} failed");
    out.stdout
}

/// `rbd export POOL/IMAGE[@SNAP] -`.
fn export(spec: &str) -> Vec<u8> {
    rbd_cli(&["export", "--no-progress", spec, "-"])
}

/// Deterministic, non-repeating bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The image's snapshots by name, in creation order.
fn snapshot_names(img: &Image) -> Vec<String> {
    img.snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

fn remove_all(pool: &Pool, name: &str, img: Image) {
    for s in img.snapshots().unwrap() {
        img.snap_remove(&s.name).unwrap();
    }
    drop(img);
    pool.remove(name).unwrap();
}

#[test]
fn write_read_zero_round_trip_matches_rbd_export() {
    let size = 12 * MIB;
    let Some((_c, pool, name, img)) = fresh_image("round_trip", size) else {
        return;
    };
    let vol = RbdVolume::new(img).unwrap();
    assert_eq!(vol.size(), size);
    assert!(vol.resizable());
    let mut model = vec![0u8; size as usize];
    // Writes across an object boundary (objects are 4 MiB), at odd offsets.
    for (off, len, seed) in [
        (0u64, MIB as usize, 1u64),
        (4 * MIB - 1000, 5000, 2),
        (7 * MIB + 13, 3 * MIB as usize, 3),
        (size - 4096, 4096, 4),
    ] {
        let data = pattern(len, seed);
        vol.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    // Zero a range that covers a whole object and parts of two others.
    vol.zero(3 * MIB + 512, 6 * MIB).unwrap();
    model[(3 * MIB + 512) as usize..(9 * MIB + 512) as usize].fill(0);
    vol.sync().unwrap();

    let mut back = vec![0u8; size as usize];
    vol.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read back differs from what was written");
    let mut part = vec![0u8; 10_000];
    vol.read_at(&mut part, 4 * MIB - 5000).unwrap();
    assert_eq!(part, model[(4 * MIB - 5000) as usize..][..10_000]);
    // Reading past the end is an error, as for a device.
    assert!(vol.read_at(&mut part, size - 10).is_err());

    let exported = export(&pool_spec(&name));
    assert!(
        exported == model,
        "rbd export differs from what was written"
    );

    // Grows; never shrinks.
    vol.set_size(size + 4 * MIB).unwrap();
    assert_eq!(vol.size(), size + 4 * MIB);
    assert_eq!(vol.image().size().unwrap(), size + 4 * MIB);
    let err = vol.set_size(MIB).unwrap_err();
    assert!(err.to_string().contains("never shrunk"), "{err}");
    assert_eq!(vol.image().size().unwrap(), size + 4 * MIB);

    drop(vol);
    let img = pool.open(&name).unwrap().unwrap();
    remove_all(&pool, &name, img);
    assert!(pool.open(&name).unwrap().is_none());
}

#[test]
fn snapshots_diff_and_rollback() {
    let size = 20 * MIB;
    let Some((_c, pool, name, img)) = fresh_image("snapshots", size) else {
        return;
    };
    assert!(img.snapshots().unwrap().is_empty());
    // Generation 1: every object written, so each has a clone at the
    // snapshot and later diffs are exact, not whole objects.
    let gen1 = pattern(size as usize, 10);
    img.write_all_at(&gen1, 0).unwrap();
    img.flush().unwrap();
    img.snap_create("snapsync-1").unwrap();
    assert!(img.diff(Some("snapsync-1")).unwrap().is_empty());

    // Changes since generation 1.
    let mut model = gen1.clone();
    let writes = [
        (100 * 1024u64, 8192usize),
        (5 * MIB, 65536),
        (12 * MIB + 4096, 4096),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(len, 20 + i as u64);
        img.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    // A discard inside an object zeroes data the object still holds (the
    // diff lists it as existing); one of a whole object deallocates it.
    img.discard(9 * MIB, MIB).unwrap();
    model[(9 * MIB) as usize..(10 * MIB) as usize].fill(0);
    img.discard(16 * MIB, 4 * MIB).unwrap();
    model[(16 * MIB) as usize..(20 * MIB) as usize].fill(0);
    img.flush().unwrap();

    let diff = img.diff(Some("snapsync-1")).unwrap();
    let got: Vec<(u64, u64, bool)> = diff.iter().map(|e| (e.offset, e.len, e.exists)).collect();
    let mut want: Vec<(u64, u64, bool)> =
        writes.iter().map(|&(o, l)| (o, l as u64, true)).collect();
    want.push((9 * MIB, MIB, true));
    want.push((16 * MIB, 4 * MIB, false));
    want.sort();
    assert_eq!(got, want, "diff since snapsync-1 is not what was written");
    // The rbd CLI agrees.
    let cli = String::from_utf8(rbd_cli(&[
        "diff",
        "--from-snap",
        "snapsync-1",
        "--format",
        "json",
        &pool_spec(&name),
    ]))
    .unwrap();
    for (o, l, exists) in &want {
        let needle = format!(
            "{{\"offset\":{o},\"length\":{l},\"exists\":\"{}\"}}",
            if *exists { "true" } else { "false" }
        );
        assert!(cli.contains(&needle), "rbd diff lacks {needle}: {cli}");
    }

    // Generation 2, then the snapshot list in creation order.
    img.snap_create("snapsync-2").unwrap();
    img.snap_create("operator-snap").unwrap();
    let names = snapshot_names(&img);
    assert_eq!(names, ["snapsync-1", "snapsync-2", "operator-snap"]);
    assert!(img.snapshots().unwrap().iter().all(|s| s.size == size));
    // Each snapshot reads as it was, through the API and the CLI.
    let s1 = pool.open_snapshot(&name, "snapsync-1").unwrap().unwrap();
    let mut buf = vec![0u8; size as usize];
    s1.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == gen1);
    drop(s1);
    assert!(export(&format!("{}@snapsync-2", pool_spec(&name))) == model);
    assert!(pool.open_snapshot(&name, "snapsync-9").unwrap().is_none());

    // An interrupted apply: the head moves on, then is rolled back.
    img.write_all_at(&pattern(MIB as usize, 99), 2 * MIB)
        .unwrap();
    img.flush().unwrap();
    assert!(!img.diff(Some("snapsync-2")).unwrap().is_empty());
    img.snap_rollback("snapsync-2").unwrap();
    // Rollback restores the bytes but the rewritten range still shows in
    // the diff (measured: exactly the range written after the snapshot),
    // so an empty diff cannot vouch for a generation after a rollback.
    let after = img.diff(Some("snapsync-2")).unwrap();
    assert!(!after.is_empty());
    assert!(
        after
            .iter()
            .all(|e| e.offset >= 2 * MIB && e.offset + e.len <= 3 * MIB),
        "diff after rollback reaches outside the rolled-back range: {after:?}"
    );
    img.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == model, "head after rollback differs from snapsync-2");

    img.snap_remove("snapsync-1").unwrap();
    let names = snapshot_names(&img);
    assert_eq!(names, ["snapsync-2", "operator-snap"]);
    let err = img.snap_remove("snapsync-1").unwrap_err();
    assert_eq!(err.errno(), Some(2), "{err}");
    remove_all(&pool, &name, img);
}

#[test]
fn image_meta_round_trip() {
    let Some((_c, pool, name, img)) = fresh_image("image_meta", MIB) else {
        return;
    };
    assert_eq!(img.meta_get("snapsync.generation").unwrap(), None);
    img.meta_set("snapsync.generation", "7").unwrap();
    // Longer than the first buffer the binding tries.
    let long = "r".repeat(5000);
    img.meta_set("snapsync.resume", &long).unwrap();
    assert_eq!(
        img.meta_get("snapsync.generation").unwrap().as_deref(),
        Some("7")
    );
    assert_eq!(
        img.meta_get("snapsync.resume").unwrap().as_deref(),
        Some(long.as_str())
    );
    let cli = rbd_cli(&[
        "image-meta",
        "get",
        &pool_spec(&name),
        "snapsync.generation",
    ]);
    assert_eq!(String::from_utf8(cli).unwrap().trim(), "7");
    img.meta_remove("snapsync.generation").unwrap();
    img.meta_remove("snapsync.generation").unwrap();
    assert_eq!(img.meta_get("snapsync.generation").unwrap(), None);
    remove_all(&pool, &name, img);
}

#[test]
fn recreated_image_has_a_new_id() {
    let Some((_c, pool, name, img)) = fresh_image("image_id", MIB) else {
        return;
    };
    let id1 = img.id().unwrap();
    assert!(!id1.is_empty());
    assert_eq!(
        pool.open_read_only(&name).unwrap().unwrap().id().unwrap(),
        id1
    );
    let info =
        String::from_utf8(rbd_cli(&["info", "--format", "json", &pool_spec(&name)])).unwrap();
    assert!(info.contains(&format!("\"id\":\"{id1}\"")), "{info}");
    remove_all(&pool, &name, img);
    pool.create(&name, MIB).unwrap();
    let img = pool.open(&name).unwrap().unwrap();
    let id2 = img.id().unwrap();
    assert_ne!(id1, id2, "a recreated image must not keep the old id");
    remove_all(&pool, &name, img);
}

#[test]
fn watchers_and_lock_owner_of_another_client_are_seen() {
    let Some((_c, pool, name, ours)) = fresh_image("watchers", 8 * MIB) else {
        return;
    };
    // Only our own watch so far, and nobody holds the lock.
    assert_eq!(ours.watchers().unwrap().len(), 1);
    assert!(ours.lock_owners().unwrap().is_empty());

    // Another client (its own connection) opens the image and writes: it
    // watches the header and takes the exclusive lock.
    let other_cluster = Cluster::connect(&ConnectOptions::default()).unwrap();
    let other_pool = other_cluster.pool(&pool_name(), None).unwrap();
    let other = other_pool.open(&name).unwrap().unwrap();
    other.write_all_at(&[1u8; 4096], 0).unwrap();
    other.flush().unwrap();
    assert_eq!(ours.watchers().unwrap().len(), 2);
    assert_eq!(ours.lock_owners().unwrap().len(), 1);
    drop(other);
    drop(other_pool);
    drop(other_cluster);
    assert_eq!(ours.watchers().unwrap().len(), 1);
    assert!(ours.lock_owners().unwrap().is_empty());

    // A separate process (`rbd bench`) holding the image is seen too.
    let image = pool_spec(&name);
    let mut bench = Command::new("rbd")
        .args([
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4096",
            "--io-total",
            "100G",
            &image,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = (0, 0);
    for _ in 0..100 {
        seen = (
            ours.watchers().unwrap().len(),
            ours.lock_owners().unwrap().len(),
        );
        if seen == (2, 1) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SIGTERM: rbd closes the image and unwatches (a SIGKILLed client's
    // watch lingers until the OSD times it out, 30 s).
    let term = Command::new("kill")
        .args(["-TERM", &bench.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    bench.wait().unwrap();
    assert_eq!(seen, (2, 1), "(watchers, lock owners) while rbd bench runs");
    assert_eq!(ours.watchers().unwrap().len(), 1);
    remove_all(&pool, &name, ours);
}

#[test]
fn namespace_images_are_apart_from_the_pool_s() {
    let Some((c, pool)) = cluster("namespace") else {
        return;
    };
    let ns = format!("ns{}", std::process::id());
    rbd_cli(&["namespace", "create", &pool_spec(&ns)]);
    let spec = RbdSpec::parse(&format!("rbd:{}/{ns}/img", pool_name())).unwrap();
    let nspool = c.pool(&spec.pool, spec.namespace.as_deref()).unwrap();
    nspool.create(&spec.image, MIB).unwrap();
    let img = nspool.open(&spec.image).unwrap().unwrap();
    assert_eq!(img.name(), spec.to_string());
    let data = pattern(MIB as usize, 5);
    img.write_all_at(&data, 0).unwrap();
    img.flush().unwrap();
    assert!(export(&pool_spec(&format!("{ns}/img"))) == data);
    // Not visible in the pool's default namespace.
    assert!(pool.open(&spec.image).unwrap().is_none());
    remove_all(&nspool, &spec.image, img);
    rbd_cli(&["namespace", "remove", &pool_spec(&ns)]);
}

#[test]
fn missing_pool_and_bad_conf_are_clear_errors() {
    let Some((c, _pool)) = cluster("errors") else {
        return;
    };
    let err = c.pool("no-such-pool-snapsync", None).unwrap_err();
    assert_eq!(err.errno(), Some(2), "{err}");
    assert!(err.to_string().contains("no-such-pool-snapsync"), "{err}");
    let err = Cluster::connect(&ConnectOptions {
        conf: Some("/nonexistent/ceph.conf".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot connect to the Ceph cluster"),
        "{err}"
    );
}

/// `next_data` knows the image's holes (its allocated extents, from the
/// object map) and what was written through the volume since, so a scan
/// of a new image reads nothing from the cluster.
#[test]
fn volume_knows_holes_and_what_it_wrote() {
    let Some((_c, pool)) = cluster("holes") else {
        return;
    };
    let name = fresh(&pool, "holes");
    pool.create(&name, 16 * MIB).unwrap();
    let vol = RbdVolume::new(pool.open(&name).unwrap().unwrap()).unwrap();
    assert_eq!(vol.next_data(0), None, "a new image is all hole");
    vol.write_at(&pattern(4096, 9), 8 * MIB).unwrap();
    assert_eq!(vol.next_data(0), Some(8 * MIB), "a write is data at once");
    assert_eq!(vol.next_data(8 * MIB + 100), Some(8 * MIB + 100));
    assert_eq!(vol.next_data(8 * MIB + 4096), None);
    vol.sync().unwrap();
    drop(vol);
    // Opened again: the cluster's own view.
    let vol = RbdVolume::new(pool.open(&name).unwrap().unwrap()).unwrap();
    let first = vol.next_data(0).expect("data is found");
    assert!(first <= 8 * MIB, "{first}");
    assert_eq!(vol.next_data(12 * MIB), None);
    let img = pool.open(&name).unwrap().unwrap();
    drop(vol);
    remove_all(&pool, &name, img);
}

/// An exclusive lock taken with `lock_exclusive` shows as owned to other
/// clients and stays with its holder until the image is closed.
#[test]
fn exclusive_lock_is_held_until_close() {
    let Some((_c, pool)) = cluster("exclusive") else {
        return;
    };
    let name = fresh(&pool, "exclusive");
    pool.create(&name, MIB).unwrap();
    let holder = pool.open(&name).unwrap().unwrap();
    holder.lock_exclusive().unwrap();
    let other = pool.open(&name).unwrap().unwrap();
    assert_eq!(other.lock_owners().unwrap().len(), 1);
    drop(holder);
    assert!(other.lock_owners().unwrap().is_empty());
    remove_all(&pool, &name, other);
}
