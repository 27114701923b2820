//! A distributed histogram: three node processes on loopback hold a striped array of
//! u64 samples; the built-in histogram task runs at every stripe's owner and the
//! per-stripe counts are added up here, then checked against a local computation.
//!
//! `cargo run --release -p pfs-memshare --example histogram [MiB]` (default 16).

mod common;

use std::time::{Duration, Instant};

use pfs_memshare::builtin::{self, HISTOGRAM_U64};
use pfs_memshare::{Node, NodeConfig};

const BUCKETS: u32 = 16;
const MAX: u64 = 1 << 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::run_node_if_asked();
    let mib: u64 = std::env::args().nth(1).map_or(Ok(16), |s| s.parse())?;
    let procs = common::start_cluster(3)?;
    let client = Node::start(NodeConfig::new("tcp://127.0.0.1:0").seed(procs[0].addr.clone()))?;
    client.wait_for_members(3, Duration::from_secs(20))?;
    let hosts: Vec<u64> = procs.iter().map(|p| p.id).collect();
    let n = mib * (1 << 20) / 8;
    let arr = client.create_striped_on("samples", n * 8, &hosts)?;
    // A lumpy distribution: the sum of two hashes, so the middle buckets fill most.
    let samples: Vec<u64> = (0..n)
        .map(|i| {
            let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((h >> 48) + ((h >> 16) & 0xFFFF)) / 2
        })
        .collect();
    for (k, chunk) in samples.chunks(1 << 20).enumerate() {
        arr.write_u64s(k as u64 * (1 << 20), chunk)?;
    }
    let t = Instant::now();
    let counts = arr.map_reduce(
        HISTOGRAM_U64,
        &builtin::histogram_args(0, MAX, BUCKETS),
        vec![0u64; BUCKETS as usize],
        |mut acc, r| {
            for (a, c) in acc.iter_mut().zip(builtin::decode_u64s(&r)) {
                *a += c;
            }
            acc
        },
    )?;
    println!(
        "histogram of {n} samples over {} nodes in {:?}:",
        arr.stripes().len(),
        t.elapsed()
    );
    let mut local = vec![0u64; BUCKETS as usize];
    let width = MAX / u64::from(BUCKETS);
    for s in &samples {
        local[(*s / width) as usize] += 1;
    }
    let peak = *counts.iter().max().unwrap_or(&1);
    for (b, c) in counts.iter().enumerate() {
        let bar = "#".repeat((c * 50 / peak.max(1)) as usize);
        println!(
            "  [{:>5}, {:>5}) {c:>9} {bar}",
            b as u64 * width,
            (b as u64 + 1) * width
        );
    }
    if counts != local {
        return Err(format!("distributed {counts:?} != local {local:?}").into());
    }
    println!("ok: matches the local computation");
    Ok(())
}
