//! pfs-bench: what PacketFS really achieves, next to what the machine can do and what the
//! manifesto claims.

mod baseline;
mod info;
#[cfg(feature = "rdma")]
mod kstat;
mod memcpy;
mod plot;
#[cfg(feature = "rdma")]
mod rdma;
mod report;
mod scenario;
mod signals;
mod sweep;
mod task;
mod twohost;
mod units;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use pfs_transport::{
    Address, BackendKind, Connection, Endpoint, EndpointConfig, Progress, RegionKey, Rights,
    WaitMode,
};

use report::Report;
use scenario::{Client, Params, Test};

#[derive(Parser, Debug)]
#[command(
    name = "pfs-bench",
    version,
    about = "Measure PacketFS for real: bandwidth, op rate and latency per backend, \
             next to local memcpy and the 4 PB/s claim",
    after_help = "With no subcommand: a self-contained run over loopback for every backend \
                  available in this process (needs no external tool, under a minute)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The self-contained loopback run (the default).
    Run(RunArgs),
    /// Serve regions to `pfs-bench client` on another host (or process).
    Server(ServerArgs),
    /// Measure against a `pfs-bench server`.
    Client(ClientArgs),
    /// Interleaved A/B runs against the baseline tools (iperf3, sockperf), ending with
    /// the reality check.
    Compare(baseline::CompareArgs),
    /// Sweeps, perftest's `-a` style: write bandwidth and latency over message sizes (2 B
    /// to 8 MiB) on one connection, and write bandwidth over 1 to 64 connections at 64
    /// KiB, for every backend; over loopback, or between two hosts with --two-hosts.
    Sweep(sweep::SweepArgs),
    /// Send algorithms, not data: reduce a remote region (256 MiB by default) by pulling
    /// it versus dispatching the reduction to its owner (pfs-memshare), interleaved, for
    /// every backend available; time, bytes moved, the ratio, and the empty task's round
    /// trip next to the small-message round trip.
    Task(task::TaskArgs),
    /// The rdma backend against perftest on the same soft-RoCE devices, in one VM run
    /// (`tools/rdma-vm.sh run -- target/release/pfs-bench rdma`): 64 KiB write
    /// bandwidth against ib_write_bw, 2-byte read latency against ib_read_lat, ratios,
    /// and the registration cost per GiB.
    #[cfg(feature = "rdma")]
    Rdma(rdma::RdmaArgs),
    /// Draw a JSON result document (from sweep, run, compare or client --json) as an
    /// SVG or PNG: bandwidth and latency over message size, latency CDFs, bandwidth over
    /// connections, with memcpy, iperf3 and line-rate reference lines.
    Plot(PlotArgs),
    /// What this machine offers: CPUs, NUMA, huge pages, io_uring, NICs (driver, line
    /// rate, MTU, queues, XDP, AF_XDP zero-copy, NUMA node), RDMA devices, and whether
    /// each backend can run here (and if not, why and the fix).
    Info(InfoArgs),
    /// Bare AF_XDP receiver for `compare --two-hosts` (no protocol): count UDP frames for
    /// a port, print one JSON line.
    #[cfg(feature = "xdp")]
    #[command(hide = true)]
    RawSink(RawSinkArgs),
}

#[cfg(feature = "xdp")]
#[derive(Args, Debug, Clone)]
struct RawSinkArgs {
    #[arg(long)]
    iface: String,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "3s", value_parser = units::parse_duration)]
    duration: Duration,
}

#[derive(Args, Debug, Clone)]
struct PlotArgs {
    /// A JSON document written by --json.
    input: String,
    /// The image to write: .svg or .png.
    #[arg(short, long)]
    output: String,
}

#[derive(Args, Debug, Clone)]
struct InfoArgs {
    /// Attach the XDP program to this interface and bind AF_XDP sockets (zero-copy
    /// first), report the mode, and undo it (root; briefly changes the interface).
    #[arg(long)]
    probe: Option<String>,
    /// Also write the findings as JSON to this file (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Backends to measure (default: every backend available here).
    #[arg(long = "backend", value_parser = parse_backend)]
    backends: Vec<BackendKind>,
    /// Length of each measurement.
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    duration: Duration,
    /// Write the results as JSON to this file (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
    /// Write the results as CSV to this file (`-` for stdout), one row per measurement.
    #[arg(long)]
    csv: Option<String>,
    /// Measure each datagram backend a second time with per-datagram integrity (a
    /// random cluster secret for this run; rows `udp+mac`), and print its cost.
    #[arg(long)]
    integrity: bool,
}

#[derive(Args, Debug, Clone)]
struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "tcp://127.0.0.1:7000", value_parser = parse_addr)]
    listen: Address,
    /// Backend, when the listen address has no scheme.
    #[arg(long, value_parser = parse_backend)]
    backend: Option<BackendKind>,
    /// Pin the progress thread to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Spin instead of sleeping (lowest latency, one busy core).
    #[arg(long)]
    busy_poll: bool,
    /// Largest region a client may ask for.
    #[arg(long, default_value = "1G", value_parser = units::parse_size)]
    max_region: u64,
    /// Link MTU for the datagram backends (default: 65535 on loopback, 1500 otherwise).
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=65535))]
    mtu: Option<u32>,
    /// Exit when the parent process does (servers started by `compare`).
    #[arg(long, hide = true)]
    die_with_parent: bool,
    /// Accept only clients holding the cluster secret in this file (mode 600).
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// Per-datagram integrity on udp/xdp: accept only clients that tag every datagram
    /// (needs --secret-file).
    #[arg(long, requires = "secret_file")]
    integrity: bool,
}

#[derive(Args, Debug, Clone)]
struct ClientArgs {
    /// Server address, e.g. tcp://127.0.0.1:7000.
    #[arg(value_parser = parse_addr)]
    addr: Address,
    /// Backend, overriding the address's scheme.
    #[arg(long, value_parser = parse_backend)]
    backend: Option<BackendKind>,
    /// What to measure.
    #[arg(long, value_enum, default_value = "write")]
    test: Test,
    /// Bytes per operation.
    #[arg(long, default_value = "1M", value_parser = units::parse_size)]
    size: u64,
    /// Operations in flight (default: 8 for bandwidth, 64 for atomics, 1 for latency).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    depth: Option<u32>,
    /// Length of the measurement.
    #[arg(long, default_value = "3s", value_parser = units::parse_duration)]
    duration: Duration,
    /// Warm-up before measuring (excluded from the results).
    #[arg(long, default_value = "300ms", value_parser = parse_warmup)]
    warmup: Duration,
    /// Pin this thread to a CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Send payloads of 64 KiB and more with zero-copy sends (IORING_OP_SENDMSG_ZC).
    #[arg(long)]
    zero_copy_send: bool,
    /// Write the results as JSON to this file (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
    /// Write the results as CSV to this file (`-` for stdout).
    #[arg(long)]
    csv: Option<String>,
    /// Authenticate with the cluster secret in this file (mode 600).
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// Per-datagram integrity on udp/xdp: tag every datagram (needs --secret-file).
    #[arg(long, requires = "secret_file")]
    integrity: bool,
}

/// The cluster secret `server` and `client` authenticate with, if one was given.
static SECRET: std::sync::OnceLock<pfs_transport::Secret> = std::sync::OnceLock::new();

/// Whether `server` and `client` tag every datagram (`--integrity`).
static INTEGRITY: AtomicBool = AtomicBool::new(false);

fn load_secret(path: Option<&std::path::Path>, integrity: bool) -> AnyResult {
    if let Some(p) = path {
        let _ = SECRET.set(pfs_transport::Secret::from_file(p)?);
    }
    INTEGRITY.store(integrity, Ordering::Relaxed);
    Ok(())
}

/// `cfg` with the cluster secret and per-datagram integrity, when they were asked for.
fn with_secret(cfg: EndpointConfig) -> EndpointConfig {
    match SECRET.get() {
        Some(s) => cfg
            .secret(s.clone())
            .datagram_integrity(INTEGRITY.load(Ordering::Relaxed)),
        None => cfg,
    }
}

pub(crate) fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse::<BackendKind>().map_err(|e| e.to_string())
}

fn parse_addr(s: &str) -> Result<Address, String> {
    let s = if s.contains("://") {
        s.to_string()
    } else {
        format!("tcp://{s}")
    };
    Address::parse(&s).map_err(|e| e.to_string())
}

pub(crate) fn parse_warmup(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    units::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: what was wrong and the valid form; details are in --help.
            eprintln!("{} (see pfs-bench --help)", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PFS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    signals::install();
    let r = match cli.cmd {
        None => default_run(&cli.run),
        Some(Cmd::Run(a)) => default_run(&a),
        Some(Cmd::Server(a)) => server(&a),
        Some(Cmd::Client(a)) => client(&a),
        Some(Cmd::Compare(a)) => baseline::compare(&a),
        Some(Cmd::Sweep(a)) => sweep::sweep(&a),
        Some(Cmd::Task(a)) => task::task(&a),
        #[cfg(feature = "rdma")]
        Some(Cmd::Rdma(a)) => rdma::rdma(&a),
        Some(Cmd::Plot(a)) => plot::plot(&a.input, &a.output),
        Some(Cmd::Info(a)) => info::info(a.probe.as_deref(), a.json.as_deref()),
        #[cfg(feature = "xdp")]
        Some(Cmd::RawSink(a)) => {
            signals::die_with_parent();
            twohost::raw_sink(&a.iface, a.port, a.duration)
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pfs-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A clap error on one line: its message and the valid values, without usage blocks.
fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The MTU of the loopback interface: datagram backends send 64 KiB datagrams there.
pub(crate) const LOOPBACK_MTU: usize = 65535;

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// A server endpoint that hands out region keys on request and drains messages, until
/// the returned handle is dropped.
pub(crate) struct ServerLoop {
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ServerLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn spawn_server(ep: &Endpoint, max_region: u64) -> ServerLoop {
    let ep = ep.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let accept = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            match ep.accept_timeout(Duration::from_millis(50)) {
                Ok(Some(conn)) => {
                    let ep = ep.clone();
                    std::thread::spawn(move || serve_conn(&ep, conn, max_region));
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
    });
    ServerLoop {
        stop,
        accept: Some(accept),
    }
}

/// Protocol: the client sends `region <bytes>`, the server answers with a key string
/// (or `error <text>`); every later message is received and dropped (the `send` test).
fn serve_conn(ep: &Endpoint, conn: Connection, max_region: u64) {
    let mut regions = Vec::new();
    while let Ok(m) = conn.recv() {
        let text = String::from_utf8_lossy(&m);
        if text == "copies" {
            let reply = format!("copies {}", ep.stats().bytes_copied_in_user_space);
            if conn.send(reply.as_bytes()).and_then(|o| o.wait()).is_err() {
                return;
            }
            continue;
        }
        let Some(n) = text.strip_prefix("region ") else {
            continue;
        };
        let reply = match n.trim().parse::<u64>() {
            Ok(n) if n > 0 && n <= max_region => match ep.alloc_region(n as usize, Rights::ALL) {
                Ok(r) => {
                    let k = r.key(Rights::ALL).map(|k| k.to_string());
                    regions.push(r);
                    k.unwrap_or_else(|e| format!("error {e}"))
                }
                Err(e) => format!("error {e}"),
            },
            _ => format!("error region size must be 1..={max_region}"),
        };
        if conn.send(reply.as_bytes()).and_then(|o| o.wait()).is_err() {
            return;
        }
    }
}

/// Ask a `pfs-bench server` how many payload bytes it copied in user space so far.
pub(crate) fn request_copies(conn: &Connection) -> Option<u64> {
    conn.send(b"copies").ok()?.wait().ok()?;
    let reply = conn.recv_timeout(Duration::from_secs(10)).ok()??;
    String::from_utf8_lossy(&reply)
        .strip_prefix("copies ")?
        .trim()
        .parse()
        .ok()
}

pub(crate) fn request_region(conn: &Connection, bytes: u64) -> AnyResult<RegionKey> {
    conn.send(format!("region {bytes}").as_bytes())?.wait()?;
    let reply = conn
        .recv_timeout(Duration::from_secs(30))?
        .ok_or("the server did not answer the region request")?;
    let text = String::from_utf8_lossy(&reply).to_string();
    if let Some(e) = text.strip_prefix("error ") {
        return Err(format!("the server refused the region: {e}").into());
    }
    Ok(text.parse::<RegionKey>()?)
}

fn default_depth(t: Test) -> usize {
    match t {
        Test::Latency | Test::ReadLatency => 1,
        Test::Atomic => 64,
        _ => 8,
    }
}

/// How loopback runs are driven on this machine.
pub(crate) struct LoopbackMode {
    server_progress: Progress,
    server_wait: WaitMode,
    /// For the report.
    pub(crate) text: String,
}

impl LoopbackMode {
    /// Busy-poll and pin when there are two cores: the server's progress thread on CPU
    /// 1, the client (driving its own progress, on the calling thread, pinned here) on
    /// CPU 0. Waking a thread on the other core costs tens of microseconds on small VMs,
    /// which would otherwise dominate latency.
    pub(crate) fn detect() -> LoopbackMode {
        if pfs_transport::online_cpus() >= 2 {
            let _ = pfs_transport::pin_current_thread(0);
            LoopbackMode {
                server_progress: Progress::Thread { cpu: Some(1) },
                server_wait: WaitMode::BusyPoll,
                text: "busy-poll; client drives progress on CPU 0, server progress thread on CPU 1"
                    .into(),
            }
        } else {
            LoopbackMode {
                server_progress: Progress::Thread { cpu: None },
                server_wait: WaitMode::Block,
                text: "1 CPU: server progress thread blocks, client drives progress".into(),
            }
        }
    }
}

/// A serving endpoint and a caller-driven client endpoint of one backend, both on
/// loopback in this process. Fields drop in order: client, server loop, server.
pub(crate) struct Loopback {
    pub(crate) client: Endpoint,
    pub(crate) serving: ServerLoop,
    pub(crate) server: Endpoint,
}

impl Loopback {
    /// With `integrity`, both ends hold a random cluster secret made for this run and
    /// tag every datagram.
    pub(crate) fn start(
        kind: BackendKind,
        m: &LoopbackMode,
        integrity: bool,
    ) -> AnyResult<Loopback> {
        if let Some(why) = kind.unavailable_reason() {
            return Err(format!("backend {kind} is not available: {why}").into());
        }
        let listen = format!("{}://127.0.0.1:0", kind.scheme());
        let secret = if integrity {
            let mut key = [0u8; 32];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
            Some(pfs_transport::Secret::from_bytes(&key)?)
        } else {
            None
        };
        let both = |cfg: EndpointConfig| match &secret {
            Some(s) => cfg.secret(s.clone()).datagram_integrity(true),
            None => cfg,
        };
        // Loopback carries 64 KiB datagrams: the datagram backends use them.
        let server = Endpoint::bind(both(
            EndpointConfig::new()
                .listen(&listen)?
                .progress(m.server_progress.clone())
                .wait_mode(m.server_wait)
                .mtu(LOOPBACK_MTU),
        ))?;
        let serving = spawn_server(&server, 1 << 30);
        let client = Endpoint::bind(both(client_config(&server.local_addrs()[0])))?;
        Ok(Loopback {
            client,
            serving,
            server,
        })
    }
}

/// The self-contained run: server and client in this process over loopback.
fn default_run(a: &RunArgs) -> AnyResult {
    let started = Instant::now();
    let mut report = Report::new();
    let cpus = pfs_transport::online_cpus();
    // xdp needs a NIC (AF_XDP and an XDP program on an interface): it is measured
    // between two hosts, not over loopback.
    let loopback_only = |k: &BackendKind| *k != BackendKind::Xdp;
    if let Some(k) = a.backends.iter().find(|k| !loopback_only(k)) {
        return Err(format!(
            "{k} is measured between two hosts, not over loopback: run `pfs-bench compare \
             --two-hosts` as root after `tools/topology.sh up` (cargo xtask bench does both)"
        )
        .into());
    }
    let backends: Vec<BackendKind> = if a.backends.is_empty() {
        BackendKind::ALL
            .into_iter()
            .filter(|k| k.unavailable_reason().is_none() && loopback_only(k))
            .collect()
    } else {
        a.backends.clone()
    };
    println!(
        "pfs-bench {}: loopback, server and client in one process, {} CPUs",
        env!("CARGO_PKG_VERSION"),
        cpus
    );
    for k in BackendKind::ALL {
        if let Some(why) = k.unavailable_reason() {
            println!("  skipping {k}: {why}");
        } else if !loopback_only(&k) {
            println!("  skipping {k} here: it needs a NIC; see pfs-bench compare --two-hosts");
        }
    }
    let lm = LoopbackMode::detect();
    let mode = lm.text.clone();
    let datagram = |k: &BackendKind| matches!(k, BackendKind::Udp | BackendKind::Xdp);
    let variants: Vec<(BackendKind, bool)> = backends
        .iter()
        .flat_map(|k| {
            let with = a.integrity && datagram(k);
            [(*k, false)].into_iter().chain(with.then_some((*k, true)))
        })
        .collect();
    if a.integrity && !backends.iter().any(datagram) {
        return Err("--integrity measures the datagram backends (udp): add --backend udp".into());
    }
    for (kind, integrity) in variants {
        let label = if integrity {
            format!("{kind}+mac")
        } else {
            kind.to_string()
        };
        let Loopback {
            client,
            serving,
            server,
        } = Loopback::start(kind, &lm, integrity)?;
        let conn = client.connect_addr(&server.local_addrs()[0])?;
        for (side, ep) in [("server", &server), ("client", &client)] {
            for d in ep.describe() {
                println!("  {side} engine: {d}");
            }
        }
        let key = request_region(&conn, 256 << 20)?;
        let c = Client {
            ep: &client,
            conn: &conn,
            key: &key,
            mode: mode.clone(),
            peer_copies: Some(Box::new(|| Some(server.stats().bytes_copied_in_user_space))),
        };
        let plan = [
            (Test::Write, 1 << 20, 8),
            (Test::Read, 1 << 20, 8),
            (Test::Write, 64, 64),
            (Test::Atomic, 8, 64),
            (Test::Latency, 64, 1),
            (Test::ReadLatency, 64, 1),
        ];
        for (test, size, depth) in plan {
            let p = Params {
                test,
                size,
                depth,
                refill: 1,
                duration: a.duration,
                warmup: Duration::from_millis(300),
            };
            units::progress(&format!(
                "  {label} {} {} ...",
                test.name(),
                units::fmt_size(size)
            ));
            let mut m = c.run(&p)?;
            m.backend = label.clone();
            report.results.push(m);
        }
        // Stop this backend's server (and its spinning progress thread) before the next.
        drop(c);
        drop(conn);
        drop(serving);
        units::progress_done();
    }
    report.memcpy = Some(memcpy::measure(a.duration.min(Duration::from_secs(2))));
    report.peak_rss_bytes = pfs_transport::peak_rss_bytes();
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.reality_check_with_nic("loopback, one process (no NIC involved)", None);
    println!();
    report.print_results();
    report.print_integrity_cost();
    report.print_reality();
    println!("  run time: {:.1} s", report.elapsed_s);
    report.write_outputs(a.json.as_deref(), a.csv.as_deref())?;
    Ok(())
}

fn with_backend(addr: &Address, b: Option<BackendKind>) -> Address {
    match b {
        Some(k) => addr.with_backend(k),
        None => addr.clone(),
    }
}

fn server(a: &ServerArgs) -> AnyResult {
    if a.die_with_parent {
        signals::die_with_parent();
    }
    load_secret(a.secret_file.as_deref(), a.integrity)?;
    let listen = with_backend(&a.listen, a.backend);
    let cfg = EndpointConfig::new()
        .listen(&listen.to_string())?
        .mtu(a.mtu.map_or_else(|| mtu_for(&listen), |m| m as usize))
        .progress(Progress::Thread { cpu: a.cpu })
        .wait_mode(if a.busy_poll {
            WaitMode::BusyPoll
        } else {
            WaitMode::Block
        });
    let ep = Endpoint::bind(with_secret(cfg))?;
    // Whoever started the server may stop reading its output after the first line: a
    // closed stdout must not stop the server (println! would panic on EPIPE).
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for addr in ep.local_addrs() {
        let _ = writeln!(out, "pfs-bench server listening on {addr}");
    }
    if SECRET.get().is_some() {
        let _ = writeln!(
            out,
            "pfs-bench server: clients must hold the cluster secret"
        );
    }
    let _ = out.flush();
    drop(out);
    let _serving = spawn_server(&ep, a.max_region);
    loop {
        std::thread::park();
    }
}

/// The link MTU of the network a run measures, when it is known (two-host runs).
pub(crate) static LINK_MTU: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The MTU to use towards `addr`: 64 KiB datagrams on loopback, the measured link's MTU
/// when known, Ethernet's 1500 else.
pub(crate) fn mtu_for(addr: &Address) -> usize {
    let link = LINK_MTU.load(Ordering::Relaxed);
    if link > 0 {
        return link;
    }
    if addr.socket_addr().ip().is_loopback() {
        LOOPBACK_MTU
    } else {
        1500
    }
}

/// A measuring client towards `addr`: it drives its own progress, busy-polling, at the
/// path's MTU, with the cluster secret when one was given.
pub(crate) fn client_config(addr: &Address) -> EndpointConfig {
    with_secret(
        EndpointConfig::new()
            .progress(Progress::Caller)
            .wait_mode(WaitMode::BusyPoll)
            .mtu(mtu_for(addr)),
    )
}

/// Run one measurement as a client of a `pfs-bench server` (used by `client` and by
/// `compare`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn client_measure(
    addr: &Address,
    test: Test,
    size: u64,
    depth: usize,
    duration: Duration,
    warmup: Duration,
    mode: &str,
    zero_copy_send: bool,
) -> AnyResult<scenario::Measurement> {
    let mut cfg = client_config(addr);
    if zero_copy_send {
        cfg = cfg.zero_copy_send(64 << 10);
    }
    let ep = Endpoint::bind(cfg)?;
    let conn = ep.connect_addr(addr)?;
    let region = match test {
        Test::Latency | Test::ReadLatency | Test::Atomic => (1 << 20).max(size),
        _ => (size * depth as u64 * 2)
            .clamp(16 << 20, 256 << 20)
            .max(size),
    };
    let key = request_region(&conn, region)?;
    let c = Client {
        ep: &ep,
        conn: &conn,
        key: &key,
        mode: mode.to_string(),
        peer_copies: Some(Box::new(|| request_copies(&conn))),
    };
    Ok(c.run(&Params {
        test,
        size,
        depth,
        refill: 1,
        duration,
        warmup,
    })?)
}

fn client(a: &ClientArgs) -> AnyResult {
    load_secret(a.secret_file.as_deref(), a.integrity)?;
    let addr = with_backend(&a.addr, a.backend);
    if let Some(c) = a.cpu {
        pfs_transport::pin_current_thread(c).map_err(|e| format!("cannot pin to cpu {c}: {e}"))?;
    }
    let depth = a.depth.map_or(default_depth(a.test), |d| d as usize);
    let mode = format!(
        "busy-poll, client drives progress{}{}",
        a.cpu
            .map_or(String::new(), |c| format!(", pinned to CPU {c}")),
        if a.zero_copy_send {
            ", zero-copy sends from 64 KiB"
        } else {
            ""
        }
    );
    let m = client_measure(
        &addr,
        a.test,
        a.size,
        depth,
        a.duration,
        a.warmup,
        &mode,
        a.zero_copy_send,
    )?;
    let mut report = Report::new();
    report.results.push(m);
    report.peak_rss_bytes = pfs_transport::peak_rss_bytes();
    report.print_results();
    report.write_outputs(a.json.as_deref(), a.csv.as_deref())?;
    Ok(())
}
