//! A distributed sum: three node processes on loopback hold a striped array of u64s;
//! this process joins as a client, fills it, and sums it by running the built-in sum
//! task at every stripe's owner (map_reduce), then checks the result against a local
//! computation and compares with pulling the whole array over the network.
//!
//! `cargo run --release -p pfs-memshare --example distributed_sum [MiB]` (default 64).

mod common;

use std::time::{Duration, Instant};

use pfs_memshare::builtin::{self, SUM_U64};
use pfs_memshare::{Node, NodeConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::run_node_if_asked();
    let mib: u64 = std::env::args().nth(1).map_or(Ok(64), |s| s.parse())?;
    let procs = common::start_cluster(3)?;
    let client = Node::start(NodeConfig::new("tcp://127.0.0.1:0").seed(procs[0].addr.clone()))?;
    client.wait_for_members(3, Duration::from_secs(20))?;
    let hosts: Vec<u64> = procs.iter().map(|p| p.id).collect();
    let n = mib * (1 << 20) / 8;
    let arr = client.create_striped_on("numbers", n * 8, &hosts)?;
    println!(
        "striped array {:?}: {n} u64s ({mib} MiB) over {} nodes, {} bytes per stripe",
        arr.name(),
        arr.stripes().len(),
        arr.stripe_len()
    );
    let values: Vec<u64> = (0..n)
        .map(|i| i.wrapping_mul(2_654_435_761) % 1_000_003)
        .collect();
    let t = Instant::now();
    for (k, chunk) in values.chunks(1 << 20).enumerate() {
        arr.write_u64s(k as u64 * (1 << 20), chunk)?;
    }
    println!("filled in {:?}", t.elapsed());

    let t = Instant::now();
    let shipped = arr.map_reduce(SUM_U64, &[], 0u64, |acc, r| {
        acc.wrapping_add(builtin::decode_u64s(&r)[0])
    })?;
    let ship_time = t.elapsed();

    let t = Instant::now();
    let mut pulled = 0u64;
    let mut i = 0u64;
    while i < n {
        let k = (n - i).min(1 << 20) as usize;
        pulled = arr
            .read_u64s(i, k)?
            .iter()
            .fold(pulled, |a, v| a.wrapping_add(*v));
        i += k as u64;
    }
    let pull_time = t.elapsed();

    let local = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
    println!(
        "sum by map_reduce (task at each owner): {shipped} in {ship_time:?}, 8 result bytes per stripe moved"
    );
    println!(
        "sum by pulling the data here:           {pulled} in {pull_time:?}, {} bytes moved",
        n * 8
    );
    println!("local computation:                      {local}");
    if shipped != local || pulled != local {
        return Err("the sums disagree".into());
    }
    println!("ok: all three agree");
    Ok(())
}
