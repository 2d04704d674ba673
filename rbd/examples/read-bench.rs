//! Reading an RBD image through the bindings vs `rbd export`, in one run.
//!
//!   CEPH_CONF=.../ceph.conf cargo run --release -p rbd --example read-bench [MiB] [POOL]
//!
//! Creates `read-bench` (default 256 MiB) filled with data, then times
//! `rbd export IMAGE - > /dev/null`, a one-request-at-a-time read (4 MiB
//! requests) and reads with 2, 4 and 8 requests in flight (threads on one
//! open image), and prints MiB/s for each. Removes the image at the end.

use std::process::{Command, Stdio};
use std::time::Instant;

use rbd::{Cluster, ConnectOptions};

const MIB: u64 = 1 << 20;
const REQ: u64 = 4 * MIB;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(256, |a| a.parse().expect("size in MiB"));
    let pool_name = args.next().unwrap_or_else(|| "snapsync".into());
    let size = mib * MIB;
    let cluster = Cluster::connect(&ConnectOptions::default()).expect("connect");
    let pool = cluster.pool(&pool_name, None).expect("pool");
    let name = "read-bench";
    if pool.open(name).unwrap().is_some() {
        pool.remove(name).unwrap();
    }
    pool.create(name, size).unwrap();
    let img = pool.open(name).unwrap().unwrap();
    let buf: Vec<u8> = (0..REQ).map(|i| (i * 7 + i / 4093) as u8).collect();
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        img.write_all_at(&buf, off).unwrap();
        off += REQ;
    }
    img.flush().unwrap();
    report("write, 1 in flight", size, t);
    drop(img);

    let t = Instant::now();
    let st = Command::new("rbd")
        .args([
            "export",
            "--no-progress",
            &format!("{pool_name}/{name}"),
            "-",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    report("rbd export", size, t);

    let img = pool.open_read_only(name).unwrap().unwrap();
    for threads in [1u64, 2, 4, 8] {
        let t = Instant::now();
        std::thread::scope(|s| {
            for k in 0..threads {
                let img = &img;
                s.spawn(move || {
                    let mut b = vec![0u8; REQ as usize];
                    let mut off = k * REQ;
                    while off < size {
                        let len = REQ.min(size - off) as usize;
                        img.read_exact_at(&mut b[..len], off).unwrap();
                        off += threads * REQ;
                    }
                });
            }
        });
        report(&format!("librbd read, {threads} in flight"), size, t);
    }
    drop(img);
    pool.remove(name).unwrap();
}

fn report(what: &str, bytes: u64, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "{what:28} {:7.2} s {:8.1} MiB/s",
        s,
        bytes as f64 / MIB as f64 / s
    );
}
