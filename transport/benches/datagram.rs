//! Hot-path micro-benchmarks of the datagram engine, per datagram:
//!
//! - `proto`: the reliable-datagram protocol on its own (two connections back to back in
//!   memory, virtual clock): segmenting, headers, ACKs, loss detection, delivery.
//! - `udp ring` / `udp mmsg`: the UDP frame driver on loopback, a batch of datagrams sent
//!   and received through io_uring (blocking mode) or sendmmsg/recvmmsg (busy-poll).
//!
//! `cargo bench -p pfs-transport --features bench-internals --bench datagram`

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use pfs_transport::bench_internals::{ProtoPair, UdpPair};

/// Messages per measured batch.
const BATCH: usize = 64;

fn proto(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto");
    // One datagram per message at MTU 1500 (1472 B UDP payload), and 64 KiB
    // datagrams as on loopback.
    for (name, max_datagram, len, integrity) in [
        ("1 KiB messages, MTU 1500", 1472, 1024, false),
        ("8 B messages, MTU 1500", 1472, 8, false),
        ("60 KiB messages, 64 KiB datagrams", 65507, 60 << 10, false),
        ("integrity, 1 KiB messages, MTU 1500", 1472, 1024, true),
        (
            "integrity, 60 KiB messages, 64 KiB datagrams",
            65507,
            60 << 10,
            true,
        ),
    ] {
        let mut pair = if integrity {
            ProtoPair::with_integrity(max_datagram)
        } else {
            ProtoPair::new(max_datagram)
        };
        // Datagrams per batch (data and ACKs), measured once: the throughput unit.
        let before = pair.datagrams;
        assert_eq!(pair.transfer(BATCH, len), BATCH);
        let per_batch = pair.datagrams - before;
        g.throughput(Throughput::Elements(per_batch));
        g.bench_function(
            format!("{name} ({per_batch} datagrams per {BATCH} messages)"),
            |b| b.iter(|| black_box(pair.transfer(BATCH, len))),
        );
    }
    g.finish();
}

fn udp(c: &mut Criterion) {
    let mut g = c.benchmark_group("udp driver");
    for ring in [true, false] {
        for len in [64usize, 1472] {
            let mut pair = match UdpPair::new(ring, len) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("SKIPPED udp driver benchmark: cannot bind on 127.0.0.1: {e}");
                    return;
                }
            };
            assert_eq!(pair.round(BATCH), BATCH, "loopback delivers a small batch");
            g.throughput(Throughput::Elements(BATCH as u64));
            let how = if ring {
                "io_uring"
            } else {
                "sendmmsg/recvmmsg"
            };
            g.bench_function(format!("{how}, {len} B datagrams"), |b| {
                b.iter(|| black_box(pair.round(BATCH)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, proto, udp);
criterion_main!(benches);
