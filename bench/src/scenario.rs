//! The measurements: bandwidth, operation rate and latency over one connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pfs_transport::{Connection, Endpoint, Op, RegionKey, Rights};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Test {
    /// One-sided write bandwidth.
    Write,
    /// One-sided read bandwidth.
    Read,
    /// 64-bit fetch-and-add rate.
    Atomic,
    /// Two-sided message bandwidth.
    Send,
    /// Round-trip latency of one write at a time.
    Latency,
    /// Round-trip latency of one read at a time.
    ReadLatency,
}

impl Test {
    pub fn name(self) -> &'static str {
        match self {
            Test::Write => "write",
            Test::Read => "read",
            Test::Atomic => "atomic",
            Test::Send => "send",
            Test::Latency => "latency",
            Test::ReadLatency => "read-latency",
        }
    }
}

/// How to run one measurement.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub test: Test,
    /// Bytes per operation (ignored by `atomic`).
    pub size: u64,
    /// Operations kept in flight (1 for latency tests).
    pub depth: usize,
    /// Throughput tests: how many operations complete before the window is topped up
    /// to `depth` again. 1 keeps `depth` in flight; perftest's `ib_write_bw` signals one
    /// work request in `--cq-mod` (100) and refills after each such completion, so its
    /// window swings between `depth - 100` and `depth`.
    pub refill: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

/// Latency percentiles of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// What one sample is.
    pub quantity: &'static str,
    /// Samples after warm-up.
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// The distribution as `[quantile, µs]` points for CDF plots: every 5% up to 0.95,
    /// then quarter-nine steps (0.944, 0.968, 0.982, 0.99, … 0.9999), then 1 (the maximum).
    pub cdf: Vec<[f64; 2]>,
}

impl Latency {
    fn from_hist(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            quantity: "full round trip (submit to completion)",
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
            cdf: cdf_points(h),
        }
    }
}

/// Quantiles at which a CDF is sampled: dense in the body, then ever closer to 1
/// (each step a quarter of the way in "nines"), ending at the maximum.
fn cdf_points(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut qs: Vec<f64> = (0..20).map(|i| f64::from(i) / 20.0).collect();
    // 0.944 … 0.9999 in quarter-nine steps: 1 - 10^-(1.25, 1.5, …, 4).
    qs.extend((5..=16).map(|i| 1.0 - 10f64.powf(-f64::from(i) / 4.0)));
    let mut out: Vec<[f64; 2]> = qs
        .into_iter()
        .map(|q| [q, h.value_at_quantile(q) as f64 / 1000.0])
        .collect();
    out.push([1.0, h.max() as f64 / 1000.0]);
    out
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub backend: String,
    pub test: Test,
    pub size: u64,
    pub depth: usize,
    /// Operations completed before the window is topped up again (1: `depth` kept in
    /// flight; [`Params::refill`]).
    pub refill: usize,
    pub seconds: f64,
    pub ops: u64,
    pub bytes: u64,
    pub gbytes_per_s: f64,
    pub gbit_per_s: f64,
    pub mops_per_s: f64,
    pub latency: Option<Latency>,
    /// Copies of each payload byte end to end: the kernel's send and receive copies plus
    /// the share copied in user space on either side (`None` when the target's count
    /// is not available).
    pub copies_per_byte: Option<f64>,
    /// How the run was driven (progress, pinning).
    pub mode: String,
    /// Connections the operations were spread over (each with `depth` in flight).
    pub connections: usize,
    /// The sweep this point belongs to: `size` or `connections` (absent outside sweeps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<&'static str>,
    /// Zero-copy sends completed, and how many of them the kernel copied after all
    /// (both 0 unless the client asked for zero-copy sends).
    pub zero_copy_sends: u64,
    pub zero_copy_sends_copied: u64,
    /// The client endpoint's transport counters over the run, warm-up included.
    pub transport: TransportCounters,
    /// How long the run's first operation took, before the warm-up and the clock
    /// started: the source region's first use, which pays its registration where the
    /// backend registers memory (rdma). 0 where the run makes no such operation.
    pub first_op_seconds: f64,
}

impl Measurement {
    /// `ops` operations of `p.size` bytes in `secs` seconds, on one connection, with
    /// no latency, copy or zero-copy figures (callers add what they measured).
    fn rates(
        backend: String,
        p: Params,
        ops: u64,
        secs: f64,
        mode: &str,
        transport: TransportCounters,
    ) -> Measurement {
        let bytes = ops * p.size;
        let bps = bytes as f64 / secs;
        Measurement {
            backend,
            test: p.test,
            size: p.size,
            depth: p.depth,
            refill: p.refill,
            seconds: secs,
            ops,
            bytes,
            gbytes_per_s: bps / 1e9,
            gbit_per_s: bps * 8.0 / 1e9,
            mops_per_s: ops as f64 / secs / 1e6,
            latency: None,
            copies_per_byte: None,
            mode: mode.to_string(),
            connections: 1,
            sweep: None,
            zero_copy_sends: 0,
            zero_copy_sends_copied: 0,
            transport,
            first_op_seconds: 0.0,
        }
    }
}

/// What the transport did besides moving payload: nonzero retransmissions or drops on
/// loopback mean the run was limited by queues overflowing, not by the wire.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TransportCounters {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub retransmissions: u64,
    pub drops: u64,
    pub protocol_errors: u64,
}

impl TransportCounters {
    fn between(a: &pfs_transport::Stats, b: &pfs_transport::Stats) -> TransportCounters {
        TransportCounters {
            datagrams_sent: b.datagrams_sent - a.datagrams_sent,
            datagrams_received: b.datagrams_received - a.datagrams_received,
            retransmissions: b.retransmissions - a.retransmissions,
            drops: b.drops - a.drops,
            protocol_errors: b.protocol_errors - a.protocol_errors,
        }
    }
}

/// Reads the target's count of bytes copied in user space (`None` if unknown).
pub type PeerCopies<'a> = Box<dyn Fn() -> Option<u64> + 'a>;

/// Everything a run needs on the initiator side.
pub struct Client<'a> {
    pub ep: &'a Endpoint,
    pub conn: &'a Connection,
    pub key: &'a RegionKey,
    pub mode: String,
    /// The target's user-space copy counter, for copies per byte.
    pub peer_copies: Option<PeerCopies<'a>>,
}

impl Client<'_> {
    pub fn run(&self, p: &Params) -> pfs_transport::Result<Measurement> {
        match p.test {
            Test::Latency | Test::ReadLatency => self.latency(p),
            _ => self.throughput(p),
        }
    }

    fn submit(
        &self,
        p: &Params,
        local: &pfs_transport::Region,
        i: u64,
        span: u64,
    ) -> pfs_transport::Result<Op<()>> {
        let size = p.size;
        let slots = (span / size).max(1);
        let off = (i % slots) * size;
        match p.test {
            Test::Write | Test::Latency => self.conn.write(local, off, self.key, off, size),
            Test::Read | Test::ReadLatency => self.conn.read(local, off, self.key, off, size),
            Test::Send => self.conn.send(&vec![0x5a; size as usize]),
            Test::Atomic => unreachable!(),
        }
    }

    fn throughput(&self, p: &Params) -> pfs_transport::Result<Measurement> {
        let span = self.key.len().min(256 << 20);
        let local = self
            .ep
            .alloc_region(span.max(p.size) as usize, Rights::ALL)?;
        let before = self.ep.stats();
        let peer_before = self.peer_copies.as_ref().map(|f| f());
        // Operations that complete before the window is topped up (at most the window).
        let refill = p.refill.clamp(1, p.depth.max(1));
        let mut inflight: VecDeque<(Instant, Op<()>)> = VecDeque::new();
        let mut atomics: VecDeque<Op<u64>> = VecDeque::new();
        // The source region's first use before anything is timed: on rdma it registers
        // the whole region (0.4-1.7 s for 64 MiB under TCG, which had overrun a 1.5 s
        // warm-up). A message would count at the receiver: sends skip it.
        let first = Instant::now();
        if matches!(p.test, Test::Write | Test::Read) {
            self.submit(p, &local, 0, span)?.wait()?;
        }
        let first_op = first.elapsed();
        let start = Instant::now();
        let measure_from = start + p.warmup;
        let end = measure_from + p.duration;
        let (mut ops, mut i) = (0u64, 0u64);
        let mut t0 = None;
        loop {
            let now = Instant::now();
            if now >= measure_from && t0.is_none() {
                t0 = Some(now);
                ops = 0;
            }
            if now >= end {
                break;
            }
            if p.test == Test::Atomic {
                while atomics.len() < p.depth {
                    atomics.push_back(self.conn.fetch_add(self.key, (i % 64) * 8, 1)?);
                    i += 1;
                }
                atomics.pop_front().expect("non-empty").wait()?;
            } else {
                if inflight.len() + refill <= p.depth {
                    while inflight.len() < p.depth {
                        inflight.push_back((Instant::now(), self.submit(p, &local, i, span)?));
                        i += 1;
                    }
                }
                inflight.pop_front().expect("non-empty").1.wait()?;
            }
            ops += 1;
        }
        let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
        for (_, op) in inflight {
            op.wait()?;
        }
        for op in atomics {
            op.wait()?;
        }
        let after = self.ep.stats();
        let peer_after = self.peer_copies.as_ref().map(|f| f());
        let size = if p.test == Test::Atomic { 8 } else { p.size };
        let copies = match p.test {
            Test::Atomic => None,
            _ => {
                let moved = (after.bytes_written - before.bytes_written)
                    + (after.bytes_read - before.bytes_read)
                    + (after.message_bytes_sent - before.message_bytes_sent);
                // Copies in user space on both sides (small payloads staged or packed,
                // datagram payloads placed), plus the kernel's two (send and receive).
                let peer = match (peer_before, peer_after) {
                    (Some(Some(a)), Some(Some(b))) => Some(b.saturating_sub(a)),
                    _ => None,
                };
                let user = after.bytes_copied_in_user_space - before.bytes_copied_in_user_space;
                peer.map(|peer| {
                    2.0 + if moved > 0 {
                        (user + peer) as f64 / moved as f64
                    } else {
                        0.0
                    }
                })
            }
        };
        let mut m = Measurement::rates(
            self.conn.backend().to_string(),
            Params { size, ..*p },
            ops,
            secs,
            &self.mode,
            TransportCounters::between(&before, &after),
        );
        m.copies_per_byte = copies;
        m.zero_copy_sends = after.zero_copy_sends - before.zero_copy_sends;
        m.zero_copy_sends_copied = after.zero_copy_sends_copied - before.zero_copy_sends_copied;
        m.first_op_seconds = first_op.as_secs_f64();
        Ok(m)
    }

    fn latency(&self, p: &Params) -> pfs_transport::Result<Measurement> {
        let span = self.key.len().min(1 << 20);
        let local = self
            .ep
            .alloc_region(span.max(p.size) as usize, Rights::ALL)?;
        let before = self.ep.stats();
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
            .expect("valid histogram bounds");
        let start = Instant::now();
        let measure_from = start + p.warmup;
        let end = measure_from + p.duration;
        let mut i = 0u64;
        let mut t0 = None;
        loop {
            let t = Instant::now();
            if t >= end {
                break;
            }
            self.submit(p, &local, i, span)?.wait()?;
            let ns = t.elapsed().as_nanos() as u64;
            i += 1;
            if t >= measure_from {
                t0.get_or_insert(t);
                let _ = hist.record(ns.max(1));
            }
        }
        let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let ops = hist.len();
        let mut m = Measurement::rates(
            self.conn.backend().to_string(),
            Params { depth: 1, ..*p },
            ops,
            secs,
            &self.mode,
            TransportCounters::between(&before, &self.ep.stats()),
        );
        m.latency = Some(Latency::from_hist(&hist));
        Ok(m)
    }
}

/// Write (or read) bandwidth over several connections of one endpoint at once, each
/// keeping `p.depth` operations in flight on its own region: perftest's `-q N`. One
/// thread drives them all (the endpoint's progress is caller-driven), completing
/// operations in submission order and refilling the connection that finished.
pub fn multi_throughput(
    ep: &Endpoint,
    targets: &[(Connection, RegionKey)],
    p: &Params,
    mode: &str,
) -> pfs_transport::Result<Measurement> {
    let span = targets
        .iter()
        .map(|(_, k)| k.len())
        .min()
        .unwrap_or(0)
        .min(256 << 20);
    let slots = (span / p.size).max(1);
    let local = ep.alloc_region((span.max(p.size)) as usize, Rights::ALL)?;
    let before = ep.stats();
    let submit = |c: usize, i: u64| {
        let (conn, key) = &targets[c];
        let off = (i % slots) * p.size;
        match p.test {
            Test::Read | Test::ReadLatency => conn.read(&local, off, key, off, p.size),
            _ => conn.write(&local, off, key, off, p.size),
        }
    };
    let mut inflight: VecDeque<(usize, Op<()>)> = VecDeque::new();
    let mut next = vec![0u64; targets.len()];
    for _ in 0..p.depth {
        for (c, n) in next.iter_mut().enumerate() {
            inflight.push_back((c, submit(c, *n)?));
            *n += 1;
        }
    }
    let start = Instant::now();
    let measure_from = start + p.warmup;
    let end = measure_from + p.duration;
    let mut ops = 0u64;
    let mut t0 = None;
    while let Some((c, op)) = inflight.pop_front() {
        op.wait()?;
        let now = Instant::now();
        if now >= measure_from && t0.is_none() {
            t0 = Some(now);
            ops = 0;
        }
        ops += 1;
        if now < end {
            inflight.push_back((c, submit(c, next[c])?));
            next[c] += 1;
        } else {
            break;
        }
    }
    let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
    for (_, op) in inflight {
        op.wait()?;
    }
    let mut m = Measurement::rates(
        targets
            .first()
            .map_or(String::new(), |(c, _)| c.backend().to_string()),
        *p,
        ops,
        secs,
        mode,
        TransportCounters::between(&before, &ep.stats()),
    );
    m.connections = targets.len();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pfs_transport::EndpointConfig;

    /// A window topped up in batches (as `pfs-bench rdma` writes) still counts every
    /// completed write and moves the bytes; a batch larger than the window is the window.
    #[test]
    fn writes_topped_up_in_batches_are_all_counted() {
        let server =
            Endpoint::bind(EndpointConfig::new().listen("tcp://127.0.0.1:0").unwrap()).unwrap();
        let target = server.alloc_region(64 << 10, Rights::ALL).unwrap();
        let key = target.key(Rights::WRITE).unwrap();
        let client = Endpoint::bind(EndpointConfig::new()).unwrap();
        let conn = client.connect_addr(&server.local_addrs()[0]).unwrap();
        let c = Client {
            ep: &client,
            conn: &conn,
            key: &key,
            mode: String::new(),
            peer_copies: None,
        };
        for refill in [1, 3, 8, 100] {
            let m = c
                .run(&Params {
                    test: Test::Write,
                    size: 4 << 10,
                    depth: 8,
                    refill,
                    duration: Duration::from_millis(100),
                    warmup: Duration::from_millis(20),
                })
                .unwrap();
            assert!(m.ops > 0, "refill {refill}: no writes completed");
            assert_eq!(m.bytes, m.ops * (4 << 10));
            assert_eq!(m.refill, refill);
        }
    }
}
