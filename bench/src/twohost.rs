//! `pfs-bench compare --two-hosts`: every backend and baseline between two hosts with one
//! NIC each — network namespaces pfs-a (servers, 198.18.0.1 on pfs-a0) and pfs-b (this
//! process and the baseline clients, 198.18.0.2 on pfs-b0) joined by a veth pair at MTU
//! 1500 (`tools/topology.sh up`). Servers run as child processes entered into pfs-a with
//! `nsenter --net` (`ip netns exec` would remount /sys and hide bpffs).

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pfs_transport::Address;

use crate::baseline::{
    CompareArgs, Proc, cpus, iperf3_command, iperf3_gbit, need, parse_sockperf_p50,
    sockperf_command, start_pfs_server,
};
use crate::report::{Comparison, Report};
use crate::scenario::Test;
use crate::{AnyResult, client_measure, units};

const SERVER_NS: &str = "pfs-a";
const CLIENT_NS: &str = "pfs-b";
const SERVER_IF: &str = "pfs-a0";
const CLIENT_IF: &str = "pfs-b0";
const SERVER_IP: &str = "198.18.0.1";

fn mtu() -> usize {
    crate::LINK_MTU.load(std::sync::atomic::Ordering::Relaxed)
}

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// A command run inside a namespace.
fn in_ns(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(ns))).arg(prog);
    c
}

/// Move this process's (single) thread into the client host.
fn enter_client_host() -> AnyResult {
    let f = std::fs::File::open(netns_path(CLIENT_NS))?;
    // SAFETY: setns on a valid namespace descriptor changes only the calling thread's
    // network namespace; the descriptor stays open for the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!("setns {CLIENT_NS}: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Wait until something in the server host is bound to `port`.
fn wait_bound(port: u16, udp: bool) -> AnyResult {
    crate::baseline::wait_bound_with(port, udp, &format!(" in {SERVER_NS}"), |files| {
        in_ns(SERVER_NS, "cat")
            .args(files)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    })
}

/// A port for the next baseline server (runs are sequential; a clash fails loudly).
fn free_port() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    20000 + (t % 20000) as u16
}

/// `pfs-bench server` in the server host; returns the address the client dials.
pub(crate) fn pfs_server(scheme: &str) -> AnyResult<(Proc, Address)> {
    let exe = std::env::current_exe()?;
    let listen = match scheme {
        "xdp" => format!("xdp://{SERVER_IF}/{SERVER_IP}:0"),
        s => format!("{s}://{SERVER_IP}:0"),
    };
    let mut cmd = in_ns(SERVER_NS, &exe.to_string_lossy());
    cmd.args([
        "server",
        "--listen",
        &listen,
        "--cpu",
        cpus(false),
        "--busy-poll",
        "--mtu",
        &mtu().to_string(),
        "--die-with-parent",
    ]);
    let (child, addr) = start_pfs_server(cmd)?;
    let port = addr.socket_addr().port();
    let dial = match scheme {
        "xdp" => format!("xdp://{CLIENT_IF}/{SERVER_IP}:{port}"),
        s => format!("{s}://{SERVER_IP}:{port}"),
    };
    Ok((child, Address::parse(&dial)?))
}

fn iperf3(secs: u64) -> AnyResult<f64> {
    let port = free_port();
    let _server = Proc(
        in_ns(SERVER_NS, "iperf3")
            .args(["-s", "-1", "-p", &port.to_string(), "-A", cpus(false)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_bound(port, false)?;
    let cmd = iperf3_command(SERVER_IP, port, secs);
    iperf3_gbit(&in_ns(CLIENT_NS, &cmd[0]).args(&cmd[1..]).output()?)
}

fn sockperf_udp(secs: u64) -> AnyResult<f64> {
    let port = free_port();
    let _server = Proc(
        in_ns(SERVER_NS, "taskset")
            .args([
                "-c",
                cpus(false),
                "sockperf",
                "server",
                "--nonblocked",
                "-i",
                SERVER_IP,
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_bound(port, true)?;
    let cmd = sockperf_command(SERVER_IP, port, secs, false);
    let out = in_ns(CLIENT_NS, &cmd[0]).args(&cmd[1..]).output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    parse_sockperf_p50(&text).ok_or_else(|| "no median in sockperf's output".into())
}

/// Bare AF_XDP: a sink in the server host, a blaster here; the sink's count.
#[cfg(feature = "xdp")]
fn raw(secs: u64) -> AnyResult<pfs_transport::rawxdp::RawCount> {
    let exe = std::env::current_exe()?;
    let port = free_port();
    let mut sink = Proc(
        in_ns(SERVER_NS, &exe.to_string_lossy())
            .args([
                "raw-sink",
                "--iface",
                SERVER_IF,
                "--port",
                &port.to_string(),
                "--duration",
                &format!("{secs}s"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let out = sink.0.stdout.take().ok_or("no sink stdout")?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    let ready = lines.next().ok_or("raw sink exited")??;
    if !ready.starts_with("ready") {
        return Err(format!("raw sink: {ready}").into());
    }
    let dst = std::net::SocketAddrV4::new(SERVER_IP.parse()?, port);
    pfs_transport::rawxdp::blast(
        CLIENT_IF,
        dst,
        mtu() - 28,
        Duration::from_secs(secs) + Duration::from_millis(500),
    )?;
    let counted = lines.next().ok_or("raw sink printed no count")??;
    let v: serde_json::Value = serde_json::from_str(&counted)?;
    Ok(pfs_transport::rawxdp::RawCount {
        frames: v["frames"].as_u64().unwrap_or(0),
        payload_bytes: v["payload_bytes"].as_u64().unwrap_or(0),
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
    })
}

/// `pfs-bench raw-sink`: count frames, print `ready`, then one JSON line.
#[cfg(feature = "xdp")]
pub(crate) fn raw_sink(iface: &str, port: u16, duration: Duration) -> AnyResult {
    use std::io::Write;
    let c = pfs_transport::rawxdp::sink(iface, port, duration, Duration::from_secs(5), || {
        println!("ready");
        let _ = std::io::stdout().flush();
    })?;
    println!(
        "{{\"frames\":{},\"payload_bytes\":{},\"seconds\":{}}}",
        c.frames, c.payload_bytes, c.seconds
    );
    Ok(())
}

/// Check that the two hosts exist and this process may use them, then move this
/// process's thread into the client host and pin it to CPU 0.
pub(crate) fn prepare(mtu: u32) -> AnyResult {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        return Err("--two-hosts needs root (network namespaces, XDP): run as root".into());
    }
    for ns in [SERVER_NS, CLIENT_NS] {
        if !std::path::Path::new(&netns_path(ns)).exists() {
            return Err(format!(
                "no network namespace {ns}: run `tools/topology.sh up` first (`cargo xtask \
                 bench` does)"
            )
            .into());
        }
    }
    need("nsenter", "util-linux")?;
    crate::LINK_MTU.store(mtu as usize, std::sync::atomic::Ordering::Relaxed);
    enter_client_host()?;
    if pfs_transport::online_cpus() >= 2 {
        pfs_transport::pin_current_thread(0)?;
    }
    Ok(())
}

/// The client host's NIC and the line rate its driver reports.
pub(crate) fn nic() -> (String, Option<f64>) {
    (
        format!("{CLIENT_IF} (veth)"),
        crate::baseline::line_rate(CLIENT_IF),
    )
}

/// One iperf3 TCP stream from the client host to the server host: Gbit/s and the
/// command as run.
pub(crate) fn iperf3_reference(secs: u64) -> AnyResult<(f64, String)> {
    let cmd = iperf3_command(SERVER_IP, 0, secs)
        .join(" ")
        .replace("-p 0", "-p P");
    Ok((
        iperf3(secs)?,
        format!(
            "[{CLIENT_NS}] {cmd} (server in {SERVER_NS}: iperf3 -s -1 -p P -A {})",
            cpus(false)
        ),
    ))
}

pub fn compare(a: &CompareArgs) -> AnyResult {
    need("iperf3", "iperf3")?;
    need("sockperf", "sockperf")?;
    prepare(a.mtu)?;
    let started = Instant::now();
    let secs = a.duration.as_secs().max(1);
    let dur = Duration::from_secs(secs);
    let warm = Duration::from_millis(300);
    let mode = format!(
        "busy-poll; client in pfs-b on CPU 0 drives progress, server in pfs-a on CPU 1 (veth \
         pair, MTU {})",
        a.mtu
    );
    let mode = mode.as_str();
    let m = a.mtu;
    let mut report = Report::new();
    let xdp = cfg!(feature = "xdp");
    println!(
        "pfs-bench compare --two-hosts: {} pairs of {secs} s runs, {CLIENT_NS}/{CLIENT_IF} -> \
         {SERVER_NS}/{SERVER_IF} ({SERVER_IP}), veth at MTU {m}",
        a.pairs
    );
    if !xdp {
        println!("  skipping xdp and bare AF_XDP: this pfs-bench was built without --features xdp");
    }
    let ours = |scheme: &str, rest: &str| {
        let dial = if scheme == "xdp" {
            format!("xdp://{CLIENT_IF}/{SERVER_IP}:P")
        } else {
            format!("{scheme}://{SERVER_IP}:P")
        };
        format!(
            "[{CLIENT_NS}] pfs-bench client {dial} {rest} --duration {secs}s --cpu {} (server in \
             {SERVER_NS}: pfs-bench server --listen {} --cpu {} --busy-poll --mtu {m})",
            cpus(true),
            dial.replace(CLIENT_IF, SERVER_IF),
            cpus(false)
        )
    };
    let write_args = "--test write --size 1M --depth 8";
    let iperf3_cmd = format!(
        "[{CLIENT_NS}] {} (server in {SERVER_NS}: iperf3 -s -1 -p P -A {})",
        iperf3_command(SERVER_IP, 0, secs)
            .join(" ")
            .replace("-p 0", "-p P"),
        cpus(false)
    );

    let mut schemes = vec!["tcp", "udp"];
    if xdp {
        schemes.push("xdp");
    }
    // Only the xdp build fills the last two.
    #[cfg_attr(not(feature = "xdp"), allow(unused_mut))]
    let (mut tcp_iperf, mut udp_iperf, mut xdp_iperf, mut xdp_raw) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.pairs {
        units::progress(&format!("  bandwidth round {}/{} ...", i + 1, a.pairs));
        let mut g = std::collections::HashMap::new();
        for s in &schemes {
            let (server, addr) = pfs_server(s)?;
            let m = client_measure(&addr, Test::Write, 1 << 20, 8, dur, warm, mode, false)?;
            drop(server);
            g.insert(*s, m.gbit_per_s);
            report.results.push(m);
        }
        let theirs = iperf3(secs)?;
        tcp_iperf.push((g["tcp"], theirs));
        udp_iperf.push((g["udp"], theirs));
        #[cfg(feature = "xdp")]
        {
            xdp_iperf.push((g["xdp"], theirs));
            let r = raw(secs)?;
            xdp_raw.push((g["xdp"], r.gbit_per_s()));
        }
    }
    for (name, scheme, pairs, target) in [
        ("tcp", "tcp", tcp_iperf, None),
        ("udp", "udp", udp_iperf, None),
        ("xdp", "xdp", std::mem::take(&mut xdp_iperf), None),
    ] {
        if pairs.is_empty() {
            continue;
        }
        report.comparisons.push(Comparison::new(
            &format!("{name} 1 MiB writes vs iperf3 single TCP stream (veth, MTU {m})"),
            &ours(scheme, write_args),
            &iperf3_cmd,
            "Gbit/s",
            pairs,
            "higher",
            target,
        ));
    }
    if !xdp_raw.is_empty() {
        report.comparisons.push(Comparison::new(
            &format!(
                "xdp 1 MiB write goodput vs bare AF_XDP ({} B UDP payloads, no protocol; veth, \
                 MTU {m})",
                m - 28
            ),
            &ours("xdp", write_args),
            &format!(
                "[{CLIENT_NS}] bare AF_XDP sender on {CLIENT_IF} queue 0 -> [{SERVER_NS}] \
                 `pfs-bench raw-sink --iface {SERVER_IF}` counting UDP payload bytes"
            ),
            "Gbit/s",
            xdp_raw,
            "higher",
            Some(0.9),
        ));
    }

    // Latency: 64 B write round trip vs sockperf UDP ping-pong, both busy-polling.
    let lat_schemes: Vec<&str> = if xdp { vec!["xdp", "udp"] } else { vec!["udp"] };
    for scheme in lat_schemes {
        let mut lat = Vec::new();
        for i in 0..a.pairs {
            units::progress(&format!(
                "  {scheme} latency pair {}/{} ...",
                i + 1,
                a.pairs
            ));
            let (server, addr) = pfs_server(scheme)?;
            let m = client_measure(&addr, Test::Latency, 64, 1, dur, warm, mode, false)?;
            drop(server);
            let ours = m.latency.as_ref().map_or(f64::NAN, |l| l.p50_us);
            lat.push((ours, sockperf_udp(secs)?));
            report.results.push(m);
        }
        report.comparisons.push(Comparison::new(
            &format!(
                "{scheme} 64 B write round trip vs sockperf ping-pong UDP 64 B (median full \
                 RTT, veth, MTU {m})"
            ),
            &ours(scheme, "--test latency --size 64"),
            &format!(
                "[{CLIENT_NS}] {} (server in {SERVER_NS}: taskset -c {} sockperf server --nonblocked -i {SERVER_IP} -p P)",
                sockperf_command(SERVER_IP, 0, secs, false).join(" ").replace("-p 0", "-p P"),
                cpus(false)
            ),
            "µs",
            lat,
            "lower",
            Some(1.0),
        ));
    }
    let nic = Some(nic());
    crate::baseline::finish(
        report,
        started,
        &format!("two hosts: network namespaces joined by a veth pair, MTU {m}"),
        nic,
        a,
    )
}
