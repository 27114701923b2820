//! `pfs-bench sweep`: perftest's `-a` habit for every backend. Write bandwidth and write
//! latency over message sizes (2 B to 8 MiB, powers of two) on one connection, then
//! write bandwidth over 1 to 64 connections at 64 KiB. Over loopback in this process, or
//! between the two hosts of `tools/topology.sh` (`--two-hosts`, which adds xdp).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;
use pfs_transport::{Address, BackendKind, Connection, Endpoint, RegionKey};

use crate::report::{Reference, Report};
use crate::scenario::{Client, Measurement, Params, PeerCopies, Test, multi_throughput};
use crate::units::{fmt_size, parse_size};
use crate::{AnyResult, Loopback, LoopbackMode, parse_backend, request_copies, request_region};

/// Largest message a sweep point may use: eight of them in flight stay within the
/// 256 MiB region a point writes into.
const MAX_SWEEP_SIZE: u64 = 32 << 20;

#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    /// Backends to sweep (default: every backend available for the chosen path).
    #[arg(long = "backend", value_parser = parse_backend)]
    backends: Vec<BackendKind>,
    /// Between the two hosts of `tools/topology.sh up` (namespaces pfs-a and pfs-b, root)
    /// instead of over loopback in this process; includes xdp when built with it.
    #[arg(long)]
    two_hosts: bool,
    /// Link MTU of a two-host sweep (the veth pair must have it).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(576..=9000))]
    mtu: u32,
    /// Which sweeps to run.
    #[arg(long, value_enum, default_value = "both")]
    sweep: Which,
    /// Smallest message of the size sweep.
    #[arg(long, default_value = "2", value_parser = parse_size)]
    min_size: u64,
    /// Largest message of the size sweep (sizes double from the smallest up to it).
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    max_size: u64,
    /// Largest connection count of the connection sweep (1, 2, 4, … up to it).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=256))]
    max_connections: u32,
    /// Message size of the connection sweep.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    connection_size: u64,
    /// Writes in flight per connection in the connection sweep.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    connection_depth: u32,
    /// Length of each point.
    #[arg(long, default_value = "500ms", value_parser = crate::units::parse_duration)]
    duration: Duration,
    /// Warm-up before each point (excluded from its results).
    #[arg(long, default_value = "100ms", value_parser = crate::parse_warmup)]
    warmup: Duration,
    /// Write the results as JSON to this file (`-` for stdout); `pfs-bench plot` draws it.
    #[arg(long)]
    json: Option<String>,
    /// Write the results as CSV to this file (`-` for stdout).
    #[arg(long)]
    csv: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Size,
    Connections,
    Both,
}

/// `start, 2·start, 4·start, …` up to `end`, and `end` itself.
fn doubling(start: u64, end: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut x = start.max(1);
    while x < end {
        v.push(x);
        x = x.saturating_mul(2);
    }
    v.push(end);
    v
}

/// Writes in flight for a bandwidth point of `size`: 64 for small messages (op-rate
/// bound, like perftest's deep queues), fewer as they grow, so that about 16 MiB is in
/// flight (and never fewer than 2).
fn bandwidth_depth(size: u64) -> usize {
    ((16 << 20) / size.max(1)).clamp(2, 64) as usize
}

/// Check the arguments before anything starts; each error names the fix.
fn validate(a: &SweepArgs) -> AnyResult {
    if a.min_size == 0 {
        return Err("--min-size must be at least 1 byte".into());
    }
    if a.max_size < a.min_size {
        return Err(format!(
            "--max-size ({}) is below --min-size ({}): swap them",
            fmt_size(a.max_size),
            fmt_size(a.min_size)
        )
        .into());
    }
    if a.max_size > MAX_SWEEP_SIZE {
        return Err(format!(
            "--max-size {} is above the sweep's largest message, {}",
            fmt_size(a.max_size),
            fmt_size(MAX_SWEEP_SIZE)
        )
        .into());
    }
    if a.connection_size == 0 || a.connection_size > MAX_SWEEP_SIZE {
        return Err(format!(
            "--connection-size must be 1 B to {}",
            fmt_size(MAX_SWEEP_SIZE)
        )
        .into());
    }
    if a.duration.is_zero() {
        return Err("--duration must be above zero, e.g. 500ms".into());
    }
    Ok(())
}

/// Progress on a terminal: a bar on stderr that redraws itself under the result lines.
/// In a pipe: only the result lines, one per finished point.
struct Bar {
    total: usize,
    done: usize,
    tty: bool,
    started: Instant,
}

impl Bar {
    fn new(total: usize) -> Bar {
        Bar {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    fn clear(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }

    /// Show what runs next.
    fn show(&self, what: &str) {
        if !self.tty {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * self.done / self.total.max(1);
        let left = if self.done > 0 {
            let per = self.started.elapsed().as_secs_f64() / self.done as f64;
            format!(", ~{:.0} s left", per * (self.total - self.done) as f64)
        } else {
            String::new()
        };
        eprint!(
            "\r\x1b[2K[{}{}] {}/{}{left}  {what}",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            self.done,
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    /// A point finished: print its line above the bar.
    fn finish(&mut self, line: &str) {
        self.done += 1;
        self.clear();
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

fn point_line(m: &Measurement) -> String {
    let head = format!(
        "{:<4} {:<12} {:>9}",
        m.backend,
        m.test.name(),
        fmt_size(m.size)
    );
    match &m.latency {
        Some(l) => format!(
            "{head}  {:>3} conn  depth {:<3} p50 {:>9.2} µs  p99 {:>9.2} µs  p99.9 {:>9.2} µs  \
             ({} samples)",
            m.connections, m.depth, l.p50_us, l.p99_us, l.p999_us, l.samples
        ),
        None => format!(
            "{head}  {:>3} conn  depth {:<3} {:>8.3} GB/s  {:>8.2} Gbit/s  {:>8.3} Mops/s",
            m.connections, m.depth, m.gbytes_per_s, m.gbit_per_s, m.mops_per_s
        ),
    }
}

/// Where one backend's sweep sends its operations.
struct Target {
    client: Endpoint,
    addr: Address,
    /// The in-process server (loopback), for its copy counter.
    local_server: Option<Endpoint>,
    /// Whatever must live while the target is measured (server loop or process).
    _keep: Box<dyn std::any::Any>,
}

impl Target {
    fn loopback(kind: BackendKind, lm: &LoopbackMode) -> AnyResult<Target> {
        let Loopback {
            client,
            serving,
            server,
        } = Loopback::start(kind, lm, false)?;
        Ok(Target {
            client,
            addr: server.local_addrs()[0].clone(),
            local_server: Some(server),
            _keep: Box::new(serving),
        })
    }

    fn remote(kind: BackendKind) -> AnyResult<Target> {
        let (server, addr) = crate::twohost::pfs_server(kind.scheme())?;
        let client = Endpoint::bind(crate::client_config(&addr))?;
        Ok(Target {
            client,
            addr,
            local_server: None,
            _keep: Box::new(server),
        })
    }

    fn peer_copies<'a>(&'a self, conn: &'a Connection) -> PeerCopies<'a> {
        match &self.local_server {
            Some(s) => Box::new(move || Some(s.stats().bytes_copied_in_user_space)),
            None => Box::new(move || request_copies(conn)),
        }
    }
}

pub fn sweep(a: &SweepArgs) -> AnyResult {
    validate(a)?;
    let started = Instant::now();
    let sizes = if a.sweep == Which::Connections {
        Vec::new()
    } else {
        doubling(a.min_size, a.max_size)
    };
    let conns = if a.sweep == Which::Size {
        Vec::new()
    } else {
        doubling(1, u64::from(a.max_connections))
    };
    let available = |k: &BackendKind| {
        k.unavailable_reason().is_none() && (a.two_hosts || *k != BackendKind::Xdp)
    };
    let backends: Vec<BackendKind> = if a.backends.is_empty() {
        BackendKind::ALL
            .into_iter()
            .rev()
            .filter(available)
            .collect()
    } else {
        a.backends.clone()
    };
    if let Some(k) = backends
        .iter()
        .find(|k| !a.two_hosts && **k == BackendKind::Xdp)
    {
        return Err(format!(
            "{k} needs a NIC: sweep it between two hosts with `pfs-bench sweep --two-hosts` \
             (root, after `tools/topology.sh up`)"
        )
        .into());
    }
    for k in &backends {
        if let Some(why) = k.unavailable_reason() {
            return Err(format!("backend {k} is not available: {why}").into());
        }
    }
    let (path, mode, lm) = if a.two_hosts {
        crate::twohost::prepare(a.mtu)?;
        (
            format!(
                "two hosts: network namespaces pfs-b -> pfs-a over a veth pair at MTU {}",
                a.mtu
            ),
            format!(
                "busy-poll; client in pfs-b on CPU 0 drives progress, server in pfs-a on CPU \
                 1 (veth pair, MTU {})",
                a.mtu
            ),
            None,
        )
    } else {
        let lm = LoopbackMode::detect();
        (
            "loopback, one process (no NIC involved)".to_string(),
            lm.text.clone(),
            Some(lm),
        )
    };
    println!(
        "pfs-bench sweep {}: {}; backends {}; {} sizes ({} to {}), {} connection counts \
         (1 to {} at {}); {} ms per point after {} ms warm-up",
        env!("CARGO_PKG_VERSION"),
        path,
        backends
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        sizes.len(),
        fmt_size(a.min_size),
        fmt_size(a.max_size),
        conns.len(),
        a.max_connections,
        fmt_size(a.connection_size),
        a.duration.as_millis(),
        a.warmup.as_millis()
    );
    println!("mode: {mode}");
    let mut bar = Bar::new(backends.len() * (2 * sizes.len() + conns.len()));
    let mut report = Report::new();
    for &kind in &backends {
        bar.show(&format!("{kind}: starting"));
        let target = match &lm {
            Some(lm) => Target::loopback(kind, lm)?,
            None => Target::remote(kind)?,
        };
        size_sweep(a, &target, &sizes, &mode, &mut bar, &mut report)?;
        connection_sweep(a, &target, &conns, &mode, &mut bar, &mut report)?;
    }
    bar.clear();
    bar.show("references: memcpy, iperf3");
    report.memcpy = Some(crate::memcpy::measure(Duration::from_secs(1)));
    let nic = if a.two_hosts {
        Some(crate::twohost::nic())
    } else {
        None
    };
    match references(a.two_hosts) {
        Ok(r) => report.references.extend(r),
        Err(e) => {
            bar.clear();
            println!("  no iperf3 reference line: {e}");
        }
    }
    bar.clear();
    report.peak_rss_bytes = pfs_transport::peak_rss_bytes();
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.reality_check_with_nic(&path, nic);
    println!();
    print_summary(&report);
    report.print_reality();
    println!("  sweep time: {:.1} s", report.elapsed_s);
    report.write_outputs(a.json.as_deref(), a.csv.as_deref())?;
    Ok(())
}

fn size_sweep(
    a: &SweepArgs,
    t: &Target,
    sizes: &[u64],
    mode: &str,
    bar: &mut Bar,
    report: &mut Report,
) -> AnyResult {
    if sizes.is_empty() {
        return Ok(());
    }
    let conn = t.client.connect_addr(&t.addr)?;
    let key = request_region(&conn, 256 << 20)?;
    let c = Client {
        ep: &t.client,
        conn: &conn,
        key: &key,
        mode: mode.to_string(),
        peer_copies: Some(t.peer_copies(&conn)),
    };
    let kind = conn.backend();
    for &size in sizes {
        for (test, depth) in [(Test::Write, bandwidth_depth(size)), (Test::Latency, 1)] {
            bar.show(&format!("{kind} {} {}", test.name(), fmt_size(size)));
            let mut m = c.run(&Params {
                test,
                size,
                depth,
                refill: 1,
                duration: a.duration,
                warmup: a.warmup,
            })?;
            m.sweep = Some("size");
            bar.finish(&point_line(&m));
            report.results.push(m);
        }
    }
    Ok(())
}

fn connection_sweep(
    a: &SweepArgs,
    t: &Target,
    counts: &[u64],
    mode: &str,
    bar: &mut Bar,
    report: &mut Report,
) -> AnyResult {
    let depth = a.connection_depth as usize;
    // Each connection writes into its own region, twice its bytes in flight.
    let region = (a.connection_size * depth as u64 * 2).max(1 << 20);
    for &n in counts {
        bar.show(&format!(
            "{} connections of {} ...",
            n,
            fmt_size(a.connection_size)
        ));
        let mut targets: Vec<(Connection, RegionKey)> = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let conn = t.client.connect_addr(&t.addr)?;
            let key = request_region(&conn, region)?;
            targets.push((conn, key));
        }
        let mut m = multi_throughput(
            &t.client,
            &targets,
            &Params {
                test: Test::Write,
                size: a.connection_size,
                depth,
                refill: 1,
                duration: a.duration,
                warmup: a.warmup,
            },
            mode,
        )?;
        m.sweep = Some("connections");
        bar.finish(&point_line(&m));
        report.results.push(m);
    }
    Ok(())
}

/// Reference lines for the plots: one iperf3 TCP stream on the same path.
fn references(two_hosts: bool) -> AnyResult<Vec<Reference>> {
    crate::baseline::need("iperf3", "iperf3")?;
    let (gbit, command) = if two_hosts {
        crate::twohost::iperf3_reference(2)?
    } else {
        crate::baseline::iperf3_reference(2)?
    };
    Ok(vec![Reference {
        name: "iperf3, 1 TCP stream".into(),
        bytes_per_s: gbit * 1e9 / 8.0,
        command,
    }])
}

/// Per backend: the bandwidth peak and where it is reached, n½ (the smallest message
/// reaching half the peak, Hockney's measure of how quickly small messages pay off),
/// the smallest message's latency, and the connection sweep's best.
fn print_summary(r: &Report) {
    let mut kinds: Vec<&str> = r.results.iter().map(|m| m.backend.as_str()).collect();
    kinds.dedup();
    println!(
        "{:<8} {:>11} {:>9} {:>9} {:>16} {:>22}",
        "backend", "peak GB/s", "at", "n½", "smallest p50 µs", "best GB/s, connections"
    );
    for k in kinds {
        let bw: Vec<&Measurement> = r
            .results
            .iter()
            .filter(|m| m.backend == k && m.sweep == Some("size") && m.latency.is_none())
            .collect();
        let peak = bw
            .iter()
            .max_by(|a, b| a.gbytes_per_s.total_cmp(&b.gbytes_per_s));
        let half = peak.and_then(|p| {
            bw.iter()
                .find(|m| m.gbytes_per_s >= p.gbytes_per_s / 2.0)
                .map(|m| fmt_size(m.size))
        });
        let lat = r
            .results
            .iter()
            .find(|m| m.backend == k && m.sweep == Some("size") && m.latency.is_some())
            .and_then(|m| m.latency.as_ref().map(|l| (m.size, l.p50_us)));
        let conns = r
            .results
            .iter()
            .filter(|m| m.backend == k && m.sweep == Some("connections"))
            .max_by(|a, b| a.gbytes_per_s.total_cmp(&b.gbytes_per_s));
        println!(
            "{:<8} {:>11} {:>9} {:>9} {:>16} {:>22}",
            k,
            peak.map_or("-".into(), |p| format!("{:.3}", p.gbytes_per_s)),
            peak.map_or("-".into(), |p| fmt_size(p.size)),
            half.unwrap_or_else(|| "-".into()),
            lat.map_or("-".into(), |(s, p)| format!("{p:.2} ({})", fmt_size(s))),
            conns.map_or("-".into(), |m| format!(
                "{:.3} at {}",
                m.gbytes_per_s, m.connections
            )),
        );
    }
    println!(
        "latency: full round trips (perftest's ib_*_lat report half of one: halve ours to \
         compare); nothing trimmed (perftest drops its largest samples)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_ends_at_the_limit() {
        assert_eq!(doubling(2, 16), vec![2, 4, 8, 16]);
        assert_eq!(doubling(1, 1), vec![1]);
        assert_eq!(doubling(1, 48), vec![1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(doubling(2, 8 << 20).len(), 23);
    }

    #[test]
    fn depth_keeps_bytes_in_flight_bounded() {
        assert_eq!(bandwidth_depth(2), 64);
        assert_eq!(bandwidth_depth(64 << 10), 64);
        assert_eq!(bandwidth_depth(1 << 20), 16);
        assert_eq!(bandwidth_depth(8 << 20), 2);
        assert_eq!(bandwidth_depth(32 << 20), 2);
    }
}
