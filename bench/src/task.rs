//! `pfs-bench task`: "send algorithms, not data", measured. A reduction (sum of u64s)
//! over a remote region, done by pulling the region to the caller versus dispatching the
//! reduction to the region's owner, interleaved in one run (pull, ship, local, pull,
//! ship, local, …), for each backend available here; with the owner's local compute
//! time, the bytes each way moves, an empty task's round trip next to the backend's
//! small-message round trip, and the targets.

use std::time::{Duration, Instant};

use clap::Args;
use pfs_memshare::builtin::{self, NOOP, SUM_U64};
use pfs_memshare::{Node, NodeConfig, Rights, SharedBuffer};
use pfs_transport::{BackendKind, Endpoint, EndpointConfig};

use crate::units;

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

#[derive(Args, Debug, Clone)]
pub struct TaskArgs {
    /// Backends to measure (default: every loopback backend available here).
    #[arg(long = "backend", value_parser = crate::parse_backend)]
    backends: Vec<BackendKind>,
    /// Size of the remote region reduced.
    #[arg(long, default_value = "256M", value_parser = units::parse_size)]
    size: u64,
    /// Pull/ship pairs, interleaved (at least 3 for a median worth quoting).
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Round trips timed for the empty task and the small message.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
    /// Write the results as JSON to this file (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    backend: String,
    bytes: u64,
    local_compute_s: f64,
    ship_s: Vec<f64>,
    pull_s: Vec<f64>,
    ship_bytes_moved: u64,
    pull_bytes_moved: u64,
    pull_over_ship_median: f64,
    pull_over_ship_min: f64,
    pull_over_ship_max: f64,
    empty_task_rtt_us: f64,
    message_rtt_us: f64,
    target_empty_task_met: bool,
    target_dispatch_met: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn task(a: &TaskArgs) -> AnyResult {
    if a.size < 8 || !a.size.is_multiple_of(8) {
        return Err(format!("--size {} must be a positive multiple of 8 bytes", a.size).into());
    }
    if a.pairs == 0 || a.round_trips == 0 {
        return Err("--pairs and --round-trips must be at least 1".into());
    }
    let backends: Vec<BackendKind> = if a.backends.is_empty() {
        BackendKind::ALL
            .into_iter()
            .filter(|k| k.unavailable_reason().is_none() && *k != BackendKind::Xdp)
            .collect()
    } else {
        a.backends.clone()
    };
    println!(
        "pfs-bench task: reduce a {} remote region, pulling it vs dispatching the sum to its \
         owner; owner and caller are two nodes in this process over loopback; {} interleaved \
         pairs (pull, ship, pull, ship, …)",
        units::fmt_size(a.size),
        a.pairs
    );
    for k in BackendKind::ALL {
        if let Some(why) = k.unavailable_reason() {
            println!("  skipping {k}: {why}");
        }
    }
    let mut rows = Vec::new();
    for k in backends {
        if k == BackendKind::Xdp {
            return Err("xdp needs a NIC: it is not measured over loopback".into());
        }
        if let Some(why) = k.unavailable_reason() {
            return Err(format!("backend {k} is not available: {why}").into());
        }
        rows.push(measure(k, a)?);
    }
    units::progress_done();
    println!();
    println!(
        "{:<6} {:>11} {:>11} {:>11} {:>20} {:>12} {:>12} {:>11} {:>11}",
        "backend",
        "local",
        "ship",
        "pull",
        "pull/ship [min-max]",
        "ship bytes",
        "pull bytes",
        "empty task",
        "msg RTT"
    );
    for r in &rows {
        let mut s = r.ship_s.clone();
        let mut p = r.pull_s.clone();
        println!(
            "{:<6} {:>9.2}ms {:>9.2}ms {:>9.2}ms {:>8.1}x [{:.1}-{:.1}] {:>12} {:>12} {:>9.1}us {:>9.1}us",
            r.backend,
            r.local_compute_s * 1e3,
            median(&mut s) * 1e3,
            median(&mut p) * 1e3,
            r.pull_over_ship_median,
            r.pull_over_ship_min,
            r.pull_over_ship_max,
            r.ship_bytes_moved,
            r.pull_bytes_moved,
            r.empty_task_rtt_us,
            r.message_rtt_us,
        );
    }
    println!();
    println!("times are medians; round trips are full round trips (request and answer)");
    println!(
        "empty task: pfs.noop on 8 bytes, dispatched between the two nodes; msg RTT: 16 B \
         echoed between two more endpoints of the same backend by a thread reading the \
         connection; both with a blocking progress thread per endpoint, both waiting for \
         their send to complete and for the answer; {} of each after {WARM_UP} untimed, \
         timed alternately in {} blocks",
        a.round_trips,
        BLOCKS.min(a.round_trips)
    );
    for r in &rows {
        println!(
            "{}: empty task round trip ≤ 2 × message round trip: {}; dispatched reduction ≤ \
             1.2 × local compute + 2 message round trips: {}",
            r.backend,
            if r.target_empty_task_met {
                "met"
            } else {
                "NOT met"
            },
            if r.target_dispatch_met {
                "met"
            } else {
                "NOT met"
            },
        );
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({ "scenario": "task", "results": rows });
        let text = serde_json::to_string_pretty(&doc)?;
        if path == "-" {
            println!("{text}");
        } else {
            std::fs::write(path, text + "\n")?;
        }
    }
    Ok(())
}

fn measure(k: BackendKind, a: &TaskArgs) -> AnyResult<Row> {
    units::progress(&format!("{k}: starting two nodes"));
    let listen = format!("{}://127.0.0.1:0", k.scheme());
    let timeouts = |c: NodeConfig| {
        c.op_timeout(Duration::from_secs(30))
            .task_timeout(Duration::from_secs(120))
    };
    let owner = Node::start(timeouts(NodeConfig::new(listen.clone())))?;
    let caller = Node::start(timeouts(NodeConfig::new(listen.clone()).seed(owner.addr())))?;
    for n in [&owner, &caller] {
        builtin::register(n);
        n.wait_for_members(1, Duration::from_secs(20))?;
    }
    units::progress(&format!("{k}: filling {}", units::fmt_size(a.size)));
    let local = owner.export("pfs-bench.task", a.size, Rights::ALL)?;
    let n = a.size / 8;
    let mut expect = 0u64;
    let mut i = 0u64;
    while i < n {
        let c = (n - i).min(1 << 20);
        let vals: Vec<u64> = (i..i + c).map(|x| x.wrapping_mul(0x9E37_79B9)).collect();
        expect = vals.iter().fold(expect, |s, v| s.wrapping_add(*v));
        local.write_u64s(i, &vals)?;
        i += c;
    }
    let remote = caller.open_timeout("pfs-bench.task", Duration::from_secs(20))?;

    // The owner's local compute time, through the same accessors a task uses; one
    // untimed pass first so that every measurement finds the region warm.
    let local_sum = || -> AnyResult<f64> {
        let t = Instant::now();
        let got = builtin::decode_u64s(&local.dispatch(SUM_U64, &[])?)[0];
        if got != expect {
            return Err(format!("{k}: local sum {got} != {expect}").into());
        }
        Ok(t.elapsed().as_secs_f64())
    };
    local_sum()?;
    let mut locals = Vec::new();

    let moved = |ep: &Endpoint| {
        let s = ep.stats();
        s.bytes_read + s.bytes_written + s.message_bytes_sent + s.message_bytes_received
    };
    let (mut ship, mut pull) = (Vec::new(), Vec::new());
    let (mut ship_bytes, mut pull_bytes) = (0, 0);
    for pair in 0..a.pairs {
        units::progress(&format!("{k}: pair {}/{}: pull", pair + 1, a.pairs));
        let before = moved(caller.endpoint());
        let t = Instant::now();
        let mut s = 0u64;
        let mut i = 0u64;
        while i < n {
            let c = (n - i).min(2 << 20) as usize;
            s = remote
                .read_u64s(i, c)?
                .iter()
                .fold(s, |s, v| s.wrapping_add(*v));
            i += c as u64;
        }
        pull.push(t.elapsed().as_secs_f64());
        pull_bytes = moved(caller.endpoint()) - before;
        if s != expect {
            return Err(format!("{k}: pulled sum {s} != {expect}").into());
        }
        units::progress(&format!("{k}: pair {}/{}: ship", pair + 1, a.pairs));
        let before = moved(caller.endpoint());
        let t = Instant::now();
        let s = builtin::decode_u64s(&remote.dispatch(SUM_U64, &[])?)[0];
        ship.push(t.elapsed().as_secs_f64());
        ship_bytes = moved(caller.endpoint()) - before;
        if s != expect {
            return Err(format!("{k}: shipped sum {s} != {expect}").into());
        }
        locals.push(local_sum()?);
    }
    let local_compute = median(&mut locals);
    let mut ratios: Vec<f64> = pull.iter().zip(&ship).map(|(p, s)| p / s).collect();
    let ratio_min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let ratio_max = ratios.iter().copied().fold(0.0, f64::max);
    let ratio = median(&mut ratios);

    units::progress(&format!("{k}: round trips"));
    let (empty_rtt, msg_rtt) = round_trips(&remote, &listen, a.round_trips)?;
    let ship_median = median(&mut ship.clone());
    Ok(Row {
        backend: k.to_string(),
        bytes: a.size,
        local_compute_s: local_compute,
        ship_s: ship,
        pull_s: pull,
        ship_bytes_moved: ship_bytes,
        pull_bytes_moved: pull_bytes,
        pull_over_ship_median: ratio,
        pull_over_ship_min: ratio_min,
        pull_over_ship_max: ratio_max,
        empty_task_rtt_us: empty_rtt * 1e6,
        message_rtt_us: msg_rtt * 1e6,
        target_empty_task_met: empty_rtt <= 2.0 * msg_rtt,
        target_dispatch_met: ship_median <= 1.2 * local_compute + 2.0 * msg_rtt,
    })
}

/// Round trips timed alternately in this many blocks (A B A B …), so that a change in
/// the machine's load affects both kinds alike.
const BLOCKS: usize = 10;
/// Untimed round trips of each kind first.
const WARM_UP: usize = 10;

/// Median round trips of an empty task (`pfs.noop` on 8 bytes of `remote`) and of a
/// 16-byte message echoed by a peer endpoint (same backend, same progress mode as the
/// nodes: a progress thread each, blocking waits), `n` of each, interleaved in blocks.
/// Both wait the same way: the message's sender waits for its send to complete, then
/// for the echo; a dispatching caller is woken by its request's send completing and by
/// the answer. The echo is sent by the thread reading the connection, as a task is run
/// by the owner's thread that read the request.
fn round_trips(remote: &SharedBuffer, listen: &str, n: usize) -> AnyResult<(f64, f64)> {
    let server = Endpoint::bind(EndpointConfig::new().listen(listen)?)?;
    let client = Endpoint::bind(EndpointConfig::new())?;
    let conn = client.connect(&server.local_addrs()[0].to_string())?;
    let peer = server
        .accept_timeout(Duration::from_secs(10))?
        .ok_or("the echo peer never accepted")?;
    const PING: [u8; 16] = [7u8; 16];
    const END: &[u8] = b"end";
    // Echo every message; the last one is END.
    let echo = std::thread::spawn(move || -> pfs_transport::Result<()> {
        while let Some(m) = peer.recv_timeout(Duration::from_secs(10))? {
            peer.send(&m)?.wait()?;
            if m == END {
                break;
            }
        }
        Ok(())
    });
    let message = || -> AnyResult<f64> {
        let t = Instant::now();
        conn.send(&PING)?.wait()?;
        conn.recv_timeout(Duration::from_secs(10))?
            .ok_or("no echo within 10 s")?;
        Ok(t.elapsed().as_secs_f64())
    };
    let task = || -> AnyResult<f64> {
        let t = Instant::now();
        remote.dispatch_range(0..8, NOOP, &[])?;
        Ok(t.elapsed().as_secs_f64())
    };
    for _ in 0..WARM_UP {
        task()?;
        message()?;
    }
    let (mut empty, mut msgs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let blocks = BLOCKS.min(n);
    for b in 0..blocks {
        let len = n * (b + 1) / blocks - n * b / blocks;
        for _ in 0..len {
            empty.push(task()?);
        }
        for _ in 0..len {
            msgs.push(message()?);
        }
    }
    // Closing only once the echo has answered everything, so that no send of either
    // side is still in flight.
    conn.send(END)?.wait()?;
    conn.recv_timeout(Duration::from_secs(10))?
        .ok_or("the echo did not answer the end")?;
    echo.join().map_err(|_| "echo thread panicked")??;
    Ok((median(&mut empty), median(&mut msgs)))
}
