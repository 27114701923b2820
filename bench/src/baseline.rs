//! Side-by-side runs against the fixed baseline commands (DESIGN.md, "Measuring"):
//! iperf3 for bandwidth, sockperf for latency, interleaved A B A B … with the same CPU
//! placement on both sides, quoted as the median ratio with its min–max.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use pfs_transport::Address;

use crate::report::{Comparison, Report};
use crate::scenario::Test;
use crate::{AnyResult, client_measure, memcpy, units};

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// A/B pairs per comparison (at least 3 for a median worth quoting).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub(crate) pairs: u32,
    /// Length of each run.
    #[arg(long, default_value = "3s", value_parser = units::parse_duration)]
    pub(crate) duration: Duration,
    /// Write the results as JSON to this file (`-` for stdout).
    #[arg(long)]
    pub(crate) json: Option<String>,
    /// Write the results as CSV to this file (`-` for stdout).
    #[arg(long)]
    pub(crate) csv: Option<String>,
    /// Between two hosts instead of over loopback: network namespaces pfs-a (servers)
    /// and pfs-b (clients) joined by veth, as `tools/topology.sh up` makes them (root).
    #[arg(long)]
    pub(crate) two_hosts: bool,
    /// Link MTU of the two-host run (the veth pair must have it: `tools/topology.sh up
    /// --mtu N`); above 3506 the xdp backend uses multi-buffer frames.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(576..=9000))]
    pub(crate) mtu: u32,
}

/// A child process killed and reaped on drop.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn need(tool: &str, package: &str) -> AnyResult {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(format!(
            "{tool} not found: install it (apt-get install {package}) or run `cargo xtask bench`, \
             which installs the baselines"
        )
        .into())
    }
}

fn free_tcp_port() -> AnyResult<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> AnyResult<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether the kernel's socket tables (`/proc/net/tcp{,6}` for listening TCP sockets,
/// `/proc/net/udp{,6}` for UDP; `text` is their contents) list a socket bound to `port`.
/// Looking there instead of connecting matters: a probe connection would be taken by a
/// one-shot server (`iperf3 -s -1`) as its client.
fn listed(text: &str, port: u16, udp: bool) -> bool {
    let state = if udp { "07" } else { "0A" };
    let hex = format!(":{port:04X}");
    text.lines().any(|l| {
        let mut it = l.split_whitespace();
        let local = it.nth(1).unwrap_or("");
        let st = it.nth(1).unwrap_or("");
        local.ends_with(&hex) && st == state
    })
}

/// Wait up to 10 s until `port` is bound in the socket tables that `read` returns (given
/// their paths); `place` says where, for the error.
pub(crate) fn wait_bound_with(
    port: u16,
    udp: bool,
    place: &str,
    read: impl Fn(&[&str]) -> String,
) -> AnyResult {
    let files: &[&str] = if udp {
        &["/proc/net/udp", "/proc/net/udp6"]
    } else {
        &["/proc/net/tcp", "/proc/net/tcp6"]
    };
    let until = Instant::now() + Duration::from_secs(10);
    while !listed(&read(files), port, udp) {
        if Instant::now() > until {
            return Err(format!("nothing bound port {port}{place} within 10 s").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn wait_bound(port: u16, udp: bool) -> AnyResult {
    wait_bound_with(port, udp, "", |files| {
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .collect()
    })
}

pub(crate) fn cpus(client: bool) -> &'static str {
    if client || pfs_transport::online_cpus() < 2 {
        "0"
    } else {
        "1"
    }
}

/// Start `pfs-bench server` (this executable) for `scheme` on loopback, pinned like the
/// baseline servers.
fn pfs_server(scheme: &str) -> AnyResult<(Proc, Address)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "server",
        "--listen",
        &format!("{scheme}://127.0.0.1:0"),
        "--cpu",
        cpus(false),
        "--busy-poll",
        "--die-with-parent",
    ]);
    start_pfs_server(cmd)
}

/// Run `cmd` (a `pfs-bench server` command line) and read the address it listens on
/// from its first line of output. The process is killed when the `Proc` is dropped.
pub(crate) fn start_pfs_server(mut cmd: Command) -> AnyResult<(Proc, Address)> {
    let mut child = Proc(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let out = child.0.stdout.take().ok_or("no server stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|a| !a.is_empty())
        .ok_or("the server printed no address (its errors are above)")?;
    Ok((child, Address::parse(addr)?))
}

fn iperf3_server(port: u16) -> AnyResult<Proc> {
    let p = Proc(
        Command::new("iperf3")
            .args(["-s", "-1", "-p", &port.to_string(), "-A", cpus(false)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_bound(port, false)?;
    Ok(p)
}

/// The iperf3 client command against `server`.
pub(crate) fn iperf3_command(server: &str, port: u16, secs: u64) -> Vec<String> {
    [
        "iperf3",
        "-c",
        server,
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-A",
        cpus(true),
        "-J",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One iperf3 run: Gbit/s received.
fn iperf3(secs: u64) -> AnyResult<f64> {
    let port = free_tcp_port()?;
    let _server = iperf3_server(port)?;
    let cmd = iperf3_command("127.0.0.1", port, secs);
    iperf3_gbit(&Command::new(&cmd[0]).args(&cmd[1..]).output()?)
}

/// One iperf3 TCP stream over loopback: Gbit/s and the command as run.
pub(crate) fn iperf3_reference(secs: u64) -> AnyResult<(f64, String)> {
    let cmd = iperf3_command("127.0.0.1", 0, secs)
        .join(" ")
        .replace("-p 0", "-p P");
    Ok((
        iperf3(secs)?,
        format!("{cmd} (server: iperf3 -s -1 -p P -A {})", cpus(false)),
    ))
}

/// Gbit/s received, from the output of `iperf3 -J`.
pub(crate) fn iperf3_gbit(out: &std::process::Output) -> AnyResult<f64> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "iperf3 printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error") {
        return Err(format!("iperf3: {e}").into());
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// The sockperf ping-pong client command against `server`.
pub(crate) fn sockperf_command(server: &str, port: u16, secs: u64, tcp: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "taskset",
        "-c",
        cpus(true),
        "sockperf",
        "ping-pong",
        "--nonblocked",
        "--full-rtt",
        "-i",
        server,
        "-p",
        &port.to_string(),
        "-m",
        "64",
        "-t",
        &secs.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if tcp {
        v.push("--tcp".into());
    }
    v
}

/// One sockperf ping-pong run: median full round trip in µs.
fn sockperf(secs: u64, tcp: bool) -> AnyResult<f64> {
    let port = if tcp {
        free_tcp_port()?
    } else {
        free_udp_port()?
    };
    let mut sargs: Vec<String> = [
        "-c",
        cpus(false),
        "sockperf",
        "server",
        "--nonblocked",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if tcp {
        sargs.push("--tcp".into());
    }
    let _server = Proc(
        Command::new("taskset")
            .args(&sargs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_bound(port, !tcp)?;
    let cmd = sockperf_command("127.0.0.1", port, secs, tcp);
    let out = Command::new(&cmd[0]).args(&cmd[1..]).output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    parse_sockperf_p50(&text).ok_or_else(|| {
        format!(
            "could not find the median in sockperf's output: {}",
            text.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        )
        .into()
    })
}

/// `sockperf: ---> percentile 50.000 =    7.372` → 7.372
pub(crate) fn parse_sockperf_p50(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.contains("percentile 50.000"))
        .and_then(|l| l.rsplit('=').next())
        .and_then(|v| v.trim().parse().ok())
}

pub fn compare(a: &CompareArgs) -> AnyResult {
    if a.two_hosts {
        return crate::twohost::compare(a);
    }
    need("iperf3", "iperf3")?;
    need("sockperf", "sockperf")?;
    need("taskset", "util-linux")?;
    let started = Instant::now();
    let secs = a.duration.as_secs().max(1);
    let dur = Duration::from_secs(secs);
    let warm = Duration::from_millis(300);
    let pinned = pfs_transport::online_cpus() >= 2;
    if pinned {
        pfs_transport::pin_current_thread(0)?;
    }
    let mode = if pinned {
        "busy-poll; client on CPU 0 drives progress, server progress thread on CPU 1 (separate processes)"
    } else {
        "busy-poll; 1 CPU (separate processes)"
    };
    let mut report = Report::new();
    println!(
        "pfs-bench compare: {} pairs of {secs} s runs per comparison, loopback, client CPU {} / server CPU {}",
        a.pairs,
        cpus(true),
        cpus(false)
    );

    let ours = |scheme: &str, rest: &str| {
        format!(
            "pfs-bench client {scheme}://127.0.0.1:P {rest} --duration {secs}s --cpu {} \
             (server: pfs-bench server --listen {scheme}://127.0.0.1:P --cpu {} --busy-poll)",
            cpus(true),
            cpus(false)
        )
    };

    // Bandwidth, 1 MiB writes: tcp backend vs iperf3 single TCP stream, udp backend
    // (64 KiB datagrams) vs tcp backend; the three interleaved in each round.
    let (mut tcp_iperf, mut udp_tcp) = (Vec::new(), Vec::new());
    for i in 0..a.pairs {
        units::progress(&format!("  bandwidth round {}/{} ...", i + 1, a.pairs));
        let mut gbit = |scheme: &str| -> AnyResult<f64> {
            let (server, addr) = pfs_server(scheme)?;
            let m = client_measure(&addr, Test::Write, 1 << 20, 8, dur, warm, mode, false)?;
            drop(server);
            let g = m.gbit_per_s;
            report.results.push(m);
            Ok(g)
        };
        let tcp = gbit("tcp")?;
        let udp = gbit("udp")?;
        let theirs = iperf3(secs)?;
        tcp_iperf.push((tcp, theirs));
        udp_tcp.push((udp, tcp));
    }
    let write_args = "--test write --size 1M --depth 8";
    report.comparisons.push(Comparison::new(
        "tcp 1 MiB writes vs iperf3 single TCP stream (loopback)",
        &ours("tcp", write_args),
        &format!(
            "{} (server: iperf3 -s -1 -p P -A {})",
            iperf3_command("127.0.0.1", 0, secs)
                .join(" ")
                .replace("-p 0", "-p P"),
            cpus(false)
        ),
        "Gbit/s",
        tcp_iperf,
        "higher",
        Some(0.9),
    ));
    report.comparisons.push(Comparison::new(
        "udp 1 MiB writes (64 KiB datagrams) vs tcp 1 MiB writes (loopback)",
        &ours("udp", write_args),
        &ours("tcp", write_args),
        "Gbit/s",
        udp_tcp,
        "higher",
        Some(0.8),
    ));

    // Latency: 64 B write round trip vs sockperf ping-pong over the same transport
    // protocol, both full round trips, both busy-polling (sockperf --nonblocked).
    for (scheme, tcp) in [("udp", false), ("tcp", true)] {
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
            let theirs = sockperf(secs, tcp)?;
            lat.push((ours, theirs));
            report.results.push(m);
        }
        let proto = if tcp { "TCP" } else { "UDP" };
        report.comparisons.push(Comparison::new(
            &format!(
                "{scheme} 64 B write round trip vs sockperf ping-pong {proto} 64 B (median full RTT)"
            ),
            &ours(scheme, "--test latency --size 64"),
            &format!(
                "{} (server: taskset -c {} sockperf server --nonblocked -i 127.0.0.1 -p P{})",
                sockperf_command("127.0.0.1", 0, secs, tcp).join(" ").replace("-p 0", "-p P"),
                cpus(false),
                if tcp { " --tcp" } else { "" }
            ),
            "µs",
            lat,
            "lower",
            Some(1.0),
        ));
    }
    finish(
        report,
        started,
        "loopback between two processes (no NIC involved)",
        None,
        a,
    )
}

/// The line rate `ethtool IFACE` reports, in bytes/s (`None` when it reports none).
pub(crate) fn line_rate(iface: &str) -> Option<f64> {
    let out = Command::new("ethtool").arg(iface).output().ok()?;
    parse_ethtool_speed(&String::from_utf8_lossy(&out.stdout))
}

/// `\tSpeed: 10000Mb/s` → 1.25e9 bytes/s.
fn parse_ethtool_speed(text: &str) -> Option<f64> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Speed:"))?
        .trim()
        .strip_suffix("Mb/s")?
        .trim()
        .parse::<f64>()
        .ok()?;
    (v > 0.0).then_some(v * 1e6 / 8.0)
}

/// End a comparison run: memcpy, the reality check, the tables, the JSON.
pub(crate) fn finish(
    mut report: Report,
    started: Instant,
    path: &str,
    nic: Option<(String, Option<f64>)>,
    a: &CompareArgs,
) -> AnyResult {
    units::progress_done();
    report.memcpy = Some(memcpy::measure(Duration::from_secs(2)));
    report.peak_rss_bytes = pfs_transport::peak_rss_bytes();
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.reality_check_with_nic(path, nic);
    report.print_results();
    report.print_comparisons();
    report.print_reality();
    println!("  run time: {:.1} s", report.elapsed_s);
    report.write_outputs(a.json.as_deref(), a.csv.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf() {
        let out = "sockperf: ====> avg-rtt=8.192 (std-dev=15.994)\n\
                   sockperf: ---> percentile 99.000 =   13.844\n\
                   sockperf: ---> percentile 50.000 =    7.372\n";
        assert_eq!(parse_sockperf_p50(out), Some(7.372));
        assert_eq!(parse_sockperf_p50("nothing"), None);
    }

    #[test]
    fn finds_listening_sockets_in_the_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue\n\
                   0: 0100007F:1B58 00000000:0000 0A 00000000:00000000\n\
                   1: 0100007F:1B59 0100007F:9C40 01 00000000:00000000\n";
        assert!(listed(tcp, 7000, false));
        assert!(!listed(tcp, 7001, false), "established, not listening");
        assert!(
            !listed(tcp, 7000, true),
            "a TCP listener is not a bound UDP socket"
        );
        let udp = "  sl  local_address rem_address   st\n 5: 00000000:1B58 00000000:0000 07\n";
        assert!(listed(udp, 7000, true));
    }

    #[test]
    fn parses_ethtool_speed() {
        let out = "Settings for pfs-b0:\n\tSpeed: 10000Mb/s\n\tDuplex: Full\n";
        assert_eq!(parse_ethtool_speed(out), Some(1.25e9));
        assert_eq!(parse_ethtool_speed("\tSpeed: Unknown!\n"), None);
        assert_eq!(parse_ethtool_speed(""), None);
    }
}
