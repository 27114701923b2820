//! Chaos: peers die and packets drop, and still every completed operation is correct.
//!
//! The test runs inside a private network namespace that it creates itself, where an
//! nftables rule drops 5% of all tcp and udp packets at random. Several node processes
//! (this test binary, re-executed in node mode) each listen on `tcp://` and `udp://`,
//! export a region with known initial content and print their addresses and key; the
//! odd nodes hold a cluster secret (every connection authenticates, udp tags every
//! datagram), the even ones are open. Client threads in this process run a verified
//! workload against every node on both backends: writes of random bytes (several in
//! flight, and now and then a whole slot in one operation) read back and compared byte
//! for byte, reads of the untouched initial content, fetch-and-add and compare-and-swap
//! on counters whose values the client knows, a shared counter checked at the end, and
//! messages the node echoes. Half the clients have a short operation deadline, so that
//! loss alone makes operations time out on live nodes. Clients also close healthy
//! connections now and then and make new ones. A controller kills a node with SIGKILL
//! every few seconds (each node in turn, in random order) and restarts it (on the same
//! ports when it can) after a short pause; clients notice, reconnect and carry on with
//! the new incarnation's key.
//!
//! It asserts: every completed operation verified, every failed one an error of an
//! expected kind within its deadline plus a small slack, nothing hung, no panic, the
//! client process's memory flat after a warm-up, enough operations on each backend, and
//! kills that really happened.
//!
//! `#[ignore]`d because it runs for `PFS_CHAOS_SECS` (default 120): `cargo xtask test`
//! runs it, `cargo xtask chaos --seconds N` runs it as long as asked. It needs root (a
//! network namespace, nftables); without, it prints one line saying so and passes, unless
//! `PFS_REQUIRE_ROOT_TESTS=1` (set by `cargo xtask` as root), which makes that a failure.
//!
//! Other knobs: `PFS_CHAOS_SEED` (replays the kill schedule and the random patterns;
//! thread timing still differs), `PFS_CHAOS_NODES` (default 3), `PFS_CHAOS_CLIENTS`
//! (default 2, each an open and an authenticated endpoint), `PFS_CHAOS_LOSS_PERCENT`
//! (default 5).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pfs_transport::{
    Connection, Endpoint, EndpointConfig, Error, Op, Region, RegionKey, Rights, Secret,
};

/// The test's name, for re-executing this binary as a node.
const TEST_NAME: &str = "chaos_with_peer_kills_and_loss";
/// Set (to the node's index) in a node process.
const NODE_ENV: &str = "PFS_CHAOS_NODE";
const NODE_SEED_ENV: &str = "PFS_CHAOS_NODE_SEED";
const NODE_TCP_PORT_ENV: &str = "PFS_CHAOS_NODE_TCP_PORT";
const NODE_UDP_PORT_ENV: &str = "PFS_CHAOS_NODE_UDP_PORT";
/// Prefix of the lines a node prints for the parent.
const NODE_LINE: &str = "PFS-CHAOS-NODE ";

/// Deadline of every operation (`EndpointConfig::op_timeout`) on the nodes and on the
/// even clients.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// The odd clients' deadline: short enough that loss alone makes some operations time
/// out on live nodes, so that timeouts (and what a timed-out operation may still do)
/// happen all the time, not only when a node dies.
const SHORT_OP_TIMEOUT: Duration = Duration::from_millis(400);
/// Deadline of connection setup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How late past its deadline an operation may finish: the engines check deadlines
/// every millisecond, and a loaded two-core machine may not schedule a waiter at once.
const SLACK: Duration = Duration::from_millis(500);
/// Time between kills (uniform in this range), and pause before the restart.
const KILL_EVERY: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(5));
const DOWN_FOR: (Duration, Duration) = (Duration::from_millis(200), Duration::from_millis(2000));
/// How long a restarted node may take to print its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Past the test's duration, the whole test must be over by this much more.
const HARD_GUARD: Duration = Duration::from_secs(90);

// Layout of each node's region: [0, REF_LEN) keeps its initial content and is only
// read; the counters area holds the shared counter (word 0) and each worker's counter
// words; from SLOTS_AT on, each worker owns a slot of chunks it writes and reads back.
const REGION_LEN: usize = 4 << 20;
const REF_LEN: usize = 1 << 20;
const COUNTERS_AT: usize = 1 << 20;
/// Counter words per worker: the first half for fetch-and-add, the second for CAS.
const WORDS_PER_WORKER: usize = 256;
const SLOTS_AT: usize = 2 << 20;
const CHUNK: usize = 16 << 10;
/// Writes (then reads) in flight at once per worker.
const MAX_BATCH: usize = 4;
const REF_READ_MAX: usize = 64 << 10;
const MSG_MAX: usize = 4096;
/// A chunk whose write failed may still be written by that write later (a timed-out
/// operation's bytes can be on the wire); it is rewritten only after this long.
const TAINT: Duration = Duration::from_secs(5);

/// A worker closes a healthy connection after a round with odds 1 in this.
const RECONNECT_ODDS: usize = 50;

// The worker's local region: write sources, read destinations, reference reads.
const LOCAL_WRITE_AT: usize = 0;
const LOCAL_READ_AT: usize = MAX_BATCH * CHUNK;
const LOCAL_REF_AT: usize = 2 * MAX_BATCH * CHUNK;
/// Whole-slot writes and reads (a slot is at most 1 MiB).
const LOCAL_SLOT_AT: usize = LOCAL_REF_AT + REF_READ_MAX;
const LOCAL_LEN: usize = LOCAL_SLOT_AT + (1 << 20);
/// A round also writes and reads back the worker's whole slot with odds 1 in this.
const WHOLE_SLOT_ODDS: usize = 16;
/// What a read destination holds before the read (so a read that wrote nothing shows).
const POISON: u8 = 0xA5;

// ---------------------------------------------------------------------------------------
// Randomness and the known content of regions.
// ---------------------------------------------------------------------------------------

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn between(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        lo + Duration::from_micros(self.next() % (hi - lo).as_micros().max(1) as u64)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let w = self.next().to_le_bytes();
            c.copy_from_slice(&w[..c.len()]);
        }
    }
}

/// The initial content of a node's region: word `i` (little-endian) of incarnation seed
/// `seed`.
fn initial_word(seed: u64, i: u64) -> u64 {
    splitmix(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Initial bytes `[off, off + len)` of a region with this seed.
fn initial_bytes(seed: u64, off: usize, len: usize) -> Vec<u8> {
    let first = off / 8;
    let last = (off + len).div_ceil(8);
    let mut v = Vec::with_capacity((last - first) * 8);
    for i in first..last {
        v.extend_from_slice(&initial_word(seed, i as u64).to_le_bytes());
    }
    let skip = off - first * 8;
    v.drain(..skip);
    v.truncate(len);
    v
}

/// Resident set size of this process, from `/proc/self/statm`.
fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(1) as u64
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------
// Node mode: a separate process serving one region until it is killed.
// ---------------------------------------------------------------------------------------

fn node_config(tcp_port: u16, udp_port: u16, secure: bool) -> EndpointConfig {
    base_config(secure, OP_TIMEOUT)
        .listen(&format!("tcp://127.0.0.1:{tcp_port}"))
        .unwrap()
        .listen(&format!("udp://127.0.0.1:{udp_port}"))
        .unwrap()
}

/// Print one line for the parent; a parent that stopped reading is not an error.
fn tell_parent(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{NODE_LINE}{line}");
    let _ = out.flush();
}

/// Echo every message of one connection back to its sender until the connection ends.
fn echo(conn: Connection) {
    loop {
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(m)) => match conn.send(&m) {
                Ok(op) => {
                    if op.wait().is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            Ok(None) if conn.is_closed() => return,
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

fn node_main(index: &str) -> ! {
    let seed: u64 = env_num(NODE_SEED_ENV, 0);
    let tcp_port: u16 = env_num(NODE_TCP_PORT_ENV, 0);
    let udp_port: u16 = env_num(NODE_UDP_PORT_ENV, 0);
    let secure = secure_node(index.parse().expect("node index"));
    // The parent holds our stdin: when it goes away, so do we.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    // A restart asks for the previous incarnation's ports; a port another socket took
    // meanwhile (a client's ephemeral port) makes it fall back to fresh ones.
    let until = Instant::now() + Duration::from_secs(3);
    let server = loop {
        match Endpoint::bind(node_config(tcp_port, udp_port, secure)) {
            Ok(ep) => break ep,
            Err(e) if Instant::now() < until => {
                eprintln!("node {index}: bind on ports {tcp_port}/{udp_port}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(_) => {
                break Endpoint::bind(node_config(0, 0, secure)).expect("node bind on fresh ports");
            }
        }
    };
    let region = server.alloc_region(REGION_LEN, Rights::ALL).unwrap();
    region
        .write_at(0, &initial_bytes(seed, 0, REGION_LEN))
        .unwrap();
    let key = region.key(Rights::ALL).unwrap();
    let addr = |scheme: &str| {
        server
            .local_addrs()
            .iter()
            .map(|a| a.to_string())
            .find(|a| a.starts_with(scheme))
            .unwrap_or_else(|| panic!("node {index} listens on no {scheme} address"))
    };
    tell_parent(&format!(
        "READY {} {} {} {}",
        addr("tcp://"),
        addr("udp://"),
        key,
        std::process::id()
    ));
    let mut last_report = Instant::now();
    loop {
        match server.accept_timeout(Duration::from_millis(100)) {
            Ok(Some(c)) => {
                std::thread::spawn(move || echo(c));
            }
            Ok(None) => {}
            Err(e) => {
                // The parent counts a node that exits on its own as a failure.
                eprintln!("node {index}: accept failed, the endpoint is broken: {e}");
                std::process::exit(3);
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            tell_parent(&format!(
                "RSS {} {}",
                rss_bytes(),
                server.connection_count()
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared state of the parent: nodes, incarnations, the tally.
// ---------------------------------------------------------------------------------------

/// One run of one node process.
struct Incarnation {
    node: usize,
    number: u64,
    seed: u64,
    tcp: String,
    udp: String,
    key: RegionKey,
    pid: u32,
    /// The node's `epoch` when this incarnation was published.
    epoch: u64,
    /// Sum of the shared-counter adds that completed, and of those that failed (which
    /// may or may not have taken effect).
    shared_ok: AtomicU64,
    shared_unsure: AtomicU64,
    /// RSS reports of the node: (seconds since the test began, bytes, connections).
    rss: Arc<Mutex<Vec<(f64, u64, usize)>>>,
    started: Instant,
    ended: Mutex<Option<Instant>>,
}

/// A node process the controller owns.
struct NodeProc {
    child: Child,
    inc: Arc<Incarnation>,
}

struct NodeSlot {
    /// The live incarnation (None while the node is down).
    current: Mutex<Option<Arc<Incarnation>>>,
    /// Bumped when the node is killed and when a new incarnation is published.
    epoch: AtomicU64,
    proc_: Mutex<Option<NodeProc>>,
    incarnations: Mutex<Vec<Arc<Incarnation>>>,
}

/// How a worker reaches its node: the backend, and whether both ends hold the cluster
/// secret (every connection authenticates, and udp tags every datagram).
#[derive(Debug, Clone, Copy)]
struct Backend {
    udp: bool,
    secure: bool,
}

impl Backend {
    fn name(self) -> &'static str {
        match (self.udp, self.secure) {
            (false, false) => "tcp",
            (true, false) => "udp",
            (false, true) => "tcp+secret",
            (true, true) => "udp+secret+integrity",
        }
    }
}

/// Odd nodes hold the cluster secret, even ones are open: both setups face the chaos.
fn secure_node(node: usize) -> bool {
    node % 2 == 1
}

fn cluster_secret() -> Secret {
    Secret::from_bytes(b"pfs chaos test cluster secret, 32+ bytes").unwrap()
}

fn client_op_timeout(client: usize) -> Duration {
    if client % 2 == 1 {
        SHORT_OP_TIMEOUT
    } else {
        OP_TIMEOUT
    }
}

/// The settings every endpoint of the test shares.
fn base_config(secure: bool, op_timeout: Duration) -> EndpointConfig {
    let c = EndpointConfig::new()
        .op_timeout(op_timeout)
        .connect_timeout(CONNECT_TIMEOUT);
    if secure {
        c.secret(cluster_secret()).datagram_integrity(true)
    } else {
        c
    }
}

#[derive(Default)]
struct Tally {
    /// Verified operations per (backend, op).
    ok: BTreeMap<(&'static str, &'static str), u64>,
    /// Failed operations per (backend, error kind, whether the node had been disturbed
    /// and the deadline).
    failed: BTreeMap<(&'static str, String, String), u64>,
    connects_ok: BTreeMap<&'static str, u64>,
    unexpected: u64,
    unexpected_examples: Vec<String>,
    verify_failures: u64,
    verify_examples: Vec<String>,
    /// Longest operation, longest connect, and the longest time any of them ran past
    /// its deadline, with what they were.
    max_op: (Duration, String),
    max_connect: (Duration, String),
    max_over: (Duration, String),
    /// Operations and connects that ended more than 10, 100 and 250 ms past their
    /// deadline (within the slack, or not).
    over: [u64; 3],
    late: u64,
    late_examples: Vec<String>,
    /// Other failures of the test itself (a node that would not start, a crash).
    problems: Vec<String>,
}

const EXAMPLES: usize = 20;

fn note(list: &mut Vec<String>, what: String) {
    if list.len() < EXAMPLES {
        list.push(what);
    }
}

struct Shared {
    nodes: Vec<NodeSlot>,
    stop: AtomicBool,
    began: Instant,
    tally: Mutex<Tally>,
    kills: AtomicU64,
    restarts: AtomicU64,
    same_port_restarts: AtomicU64,
}

static PANICS: AtomicU64 = AtomicU64::new(0);
static NODE_PANICS: AtomicU64 = AtomicU64::new(0);

/// The kind of a failed operation's error, and whether it is one a dying peer or a lossy
/// network explains.
fn kind_of(e: &Error) -> (String, bool) {
    use std::io::ErrorKind as K;
    match e {
        Error::Timeout { .. } => ("timeout".into(), true),
        Error::ConnectionLost { .. } => ("connection lost".into(), true),
        Error::Io { call, source } => match source.kind() {
            K::ConnectionRefused => ("refused".into(), true),
            K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::NotConnected => (format!("{call}: reset"), true),
            K::TimedOut | K::WouldBlock => (format!("{call}: timed out"), true),
            k => (format!("{call}: {k:?}"), false),
        },
        other => {
            let mut s = format!("{other:?}");
            s.truncate(120);
            (s, false)
        }
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn secs(&self) -> f64 {
        self.began.elapsed().as_secs_f64()
    }

    /// Whether `inc` has been killed (or replaced) since it was published.
    fn disturbed(&self, inc: &Incarnation) -> bool {
        self.nodes[inc.node].epoch.load(Ordering::SeqCst) != inc.epoch
    }

    fn timing(
        &self,
        t: &mut Tally,
        what: impl Fn() -> String,
        took: Duration,
        deadline: Duration,
        connect: bool,
    ) {
        let max = if connect {
            &mut t.max_connect
        } else {
            &mut t.max_op
        };
        if took > max.0 {
            *max = (took, format!("{}, deadline {deadline:?}", what()));
        }
        let over = took.saturating_sub(deadline);
        for (i, ms) in [10, 100, 250].into_iter().enumerate() {
            if over > Duration::from_millis(ms) {
                t.over[i] += 1;
            }
        }
        if over > t.max_over.0 {
            t.max_over = (over, format!("{}, deadline {deadline:?}", what()));
        }
        if took > deadline + SLACK {
            t.late += 1;
            note(
                &mut t.late_examples,
                format!(
                    "{} took {took:?}, past its deadline {deadline:?} + slack {SLACK:?}",
                    what()
                ),
            );
        }
    }

    fn ok(&self, b: Backend, op: &'static str, took: Duration, deadline: Duration) {
        let mut t = self.tally.lock().unwrap();
        *t.ok.entry((b.name(), op)).or_default() += 1;
        self.timing(
            &mut t,
            || format!("{} {op}", b.name()),
            took,
            deadline,
            false,
        );
    }

    fn connected(&self, b: Backend, took: Duration) {
        let mut t = self.tally.lock().unwrap();
        *t.connects_ok.entry(b.name()).or_default() += 1;
        self.timing(
            &mut t,
            || format!("{} connect", b.name()),
            took,
            CONNECT_TIMEOUT,
            true,
        );
    }

    fn failed(
        &self,
        b: Backend,
        op: &'static str,
        inc: &Incarnation,
        e: &Error,
        took: Duration,
        deadline: Duration,
    ) {
        let (kind, expected) = kind_of(e);
        let disturbed = if self.disturbed(inc) {
            "node killed"
        } else {
            "node alive"
        };
        let what = format!(
            "{} {op} on node {}#{} ({disturbed}) at {:.1} s",
            b.name(),
            inc.node,
            inc.number,
            self.secs()
        );
        let mut t = self.tally.lock().unwrap();
        let when = format!("{disturbed}, {deadline:?} deadline");
        *t.failed.entry((b.name(), kind, when)).or_default() += 1;
        if !expected {
            t.unexpected += 1;
            note(&mut t.unexpected_examples, format!("{what}: {e}"));
        }
        self.timing(&mut t, || what.clone(), took, deadline, op == "connect");
    }

    fn mismatch(&self, b: Backend, op: &'static str, inc: &Incarnation, detail: String) {
        let mut t = self.tally.lock().unwrap();
        t.verify_failures += 1;
        let line = format!(
            "{} {op} on node {}#{} at {:.1} s: {detail}",
            b.name(),
            inc.node,
            inc.number,
            self.secs()
        );
        eprintln!("VERIFICATION FAILURE: {line}");
        note(&mut t.verify_examples, line);
    }

    fn problem(&self, what: String) {
        eprintln!("chaos: {what}");
        self.tally.lock().unwrap().problems.push(what);
    }
}

/// Where two byte strings differ, for a verification failure.
fn describe_diff(remote_off: usize, got: &[u8], want: &[u8]) -> String {
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    format!(
        "{n} of {} bytes differ, first at region offset {} (got {:#04x}, want {:#04x})",
        want.len(),
        remote_off + first,
        got.get(first).copied().unwrap_or(0),
        want.get(first).copied().unwrap_or(0)
    )
}

// ---------------------------------------------------------------------------------------
// Node processes: start, read their lines, kill.
// ---------------------------------------------------------------------------------------

fn spawn_node(
    sh: &Arc<Shared>,
    node: usize,
    number: u64,
    seed: u64,
    ports: (u16, u16),
) -> Result<NodeProc, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .args([TEST_NAME, "--exact", "--ignored", "--nocapture"])
        .arg("--test-threads=1")
        .env(NODE_ENV, node.to_string())
        .env(NODE_SEED_ENV, seed.to_string())
        .env(NODE_TCP_PORT_ENV, ports.0.to_string())
        .env(NODE_UDP_PORT_ENV, ports.1.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn node {node}: {e}"))?;
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let rss: Arc<Mutex<Vec<(f64, u64, usize)>>> = Arc::default();
    let (tx, rx) = mpsc::channel::<String>();
    {
        let (rss, sh) = (rss.clone(), sh.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test NAME ... " before the node's first line.
                let Some(at) = line.find(NODE_LINE) else {
                    continue;
                };
                let rest = &line[at + NODE_LINE.len()..];
                if let Some(r) = rest.strip_prefix("RSS ") {
                    let mut it = r.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
                    let (b, c) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
                    let mut v = rss.lock().unwrap();
                    // First and latest report are what the summary shows; keep those.
                    if v.len() >= 2 {
                        v.pop();
                    }
                    v.push((sh.secs(), b, c as usize));
                } else if let Some(r) = rest.strip_prefix("READY ") {
                    let _ = tx.send(r.to_string());
                }
            }
        });
    }
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if line.contains("panicked") {
                NODE_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            eprintln!("[node {node}#{number}] {line}");
        }
    });
    let parsed = rx
        .recv_timeout(START_TIMEOUT)
        .map_err(|_| format!("did not print its addresses within {START_TIMEOUT:?}"))
        .and_then(|ready| {
            let f: Vec<&str> = ready.split_whitespace().collect();
            let [tcp, udp, key, pid] = f[..] else {
                return Err(format!("bad READY line {ready:?}"));
            };
            let key: RegionKey = key.parse().map_err(|e| format!("key {key:?}: {e}"))?;
            Ok((
                tcp.to_string(),
                udp.to_string(),
                key,
                pid.parse().unwrap_or(0),
            ))
        });
    let (tcp, udp, key, pid) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("node {node}#{number}: {e}"));
        }
    };
    let slot = &sh.nodes[node];
    let epoch = slot.epoch.fetch_add(1, Ordering::SeqCst) + 1;
    let inc = Arc::new(Incarnation {
        node,
        number,
        seed,
        tcp,
        udp,
        key,
        pid,
        epoch,
        shared_ok: AtomicU64::new(0),
        shared_unsure: AtomicU64::new(0),
        rss,
        started: Instant::now(),
        ended: Mutex::new(None),
    });
    slot.incarnations.lock().unwrap().push(inc.clone());
    *slot.current.lock().unwrap() = Some(inc.clone());
    Ok(NodeProc { child, inc })
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn node_seed(master: u64, node: usize, number: u64) -> u64 {
    splitmix(master ^ ((node as u64) << 40) ^ number.wrapping_mul(0x1000_0001))
}

/// SIGKILL a node: unannounced, as a real peer death. The epoch moves first, so that
/// every failure the death causes is attributed to it.
fn kill_node(sh: &Shared, node: usize) -> Option<Arc<Incarnation>> {
    let slot = &sh.nodes[node];
    let mut p = slot.proc_.lock().unwrap().take()?;
    slot.epoch.fetch_add(1, Ordering::SeqCst);
    let _ = p.child.kill();
    let _ = p.child.wait();
    *p.inc.ended.lock().unwrap() = Some(Instant::now());
    *slot.current.lock().unwrap() = None;
    Some(p.inc)
}

/// (Re)start node `node` as its next incarnation, on `ports` when they are free.
fn start_node(sh: &Arc<Shared>, master: u64, node: usize, ports: (u16, u16)) -> bool {
    let number = sh.nodes[node].incarnations.lock().unwrap().len() as u64;
    match spawn_node(sh, node, number, node_seed(master, node, number), ports) {
        Ok(p) => {
            if ports.0 != 0 && port_of(&p.inc.tcp) == ports.0 && port_of(&p.inc.udp) == ports.1 {
                sh.same_port_restarts.fetch_add(1, Ordering::SeqCst);
            }
            *sh.nodes[node].proc_.lock().unwrap() = Some(p);
            true
        }
        Err(e) => {
            sh.problem(e);
            false
        }
    }
}

/// Kill a random live node every few seconds and restart it after a short pause, until
/// the test stops; a node that dies on its own is a failure (and is restarted).
fn controller(sh: Arc<Shared>, master: u64) {
    let mut rng = Rng::new(master ^ 0xC0_4E_7A_01);
    let n = sh.nodes.len();
    let mut next_kill = Instant::now() + rng.between(KILL_EVERY);
    let mut killed = vec![0u64; n];
    while !sh.stopping() {
        for node in 0..n {
            let mut g = sh.nodes[node].proc_.lock().unwrap();
            let exited = g.as_mut().and_then(|p| p.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                let p = g.take().unwrap();
                drop(g);
                sh.nodes[node].epoch.fetch_add(1, Ordering::SeqCst);
                *sh.nodes[node].current.lock().unwrap() = None;
                sh.problem(format!(
                    "node {node}#{} exited on its own ({status})",
                    p.inc.number
                ));
                let ports = (port_of(&p.inc.tcp), port_of(&p.inc.udp));
                start_node(&sh, master, node, ports);
            }
        }
        if Instant::now() >= next_kill {
            // A random node among those killed least so far: every node dies in turn.
            let least = killed.iter().copied().min().unwrap_or(0);
            let candidates: Vec<usize> = (0..n).filter(|&i| killed[i] == least).collect();
            let node = candidates[rng.below(candidates.len())];
            killed[node] += 1;
            if let Some(inc) = kill_node(&sh, node) {
                sh.kills.fetch_add(1, Ordering::SeqCst);
                let pause = rng.between(DOWN_FOR);
                println!(
                    "chaos: {:6.1} s  killed node {node}#{} (pid {}), restarting in {} ms",
                    sh.secs(),
                    inc.number,
                    inc.pid,
                    pause.as_millis()
                );
                std::thread::sleep(pause);
                let ports = (port_of(&inc.tcp), port_of(&inc.udp));
                if start_node(&sh, master, node, ports) {
                    sh.restarts.fetch_add(1, Ordering::SeqCst);
                }
            }
            next_kill = Instant::now() + rng.between(KILL_EVERY);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Client workers.
// ---------------------------------------------------------------------------------------

/// What a worker is doing, for the report when something hangs.
type Doing = Mutex<(&'static str, Option<(Instant, usize, u64)>)>;
/// Every worker's name and what it is doing.
type Doings = Mutex<Vec<(String, Arc<Doing>)>>;

/// What a worker knows about the incarnation it talks to.
struct Known {
    inc: Arc<Incarnation>,
    /// Its slot's content as the worker wrote it.
    shadow: Vec<u8>,
    /// Chunks whose content is unknown since a failed write (and since when).
    tainted: Vec<Option<Instant>>,
    faa_word: usize,
    faa_expect: u64,
    cas_word: usize,
    cas_expect: u64,
    /// The least the shared counter can hold now: it only grows.
    shared_floor: u64,
    msg_seq: u64,
}

struct Worker {
    sh: Arc<Shared>,
    ep: Endpoint,
    node: usize,
    backend: Backend,
    /// Its endpoint's operation deadline.
    deadline: Duration,
    /// Index among the workers of this node (picks its slot and counter words).
    wid: usize,
    slot_len: usize,
    local: Region,
    rng: Rng,
    scratch: Vec<u8>,
    doing: Arc<Doing>,
}

/// An operation's result and how long it took from submission.
fn finish<T: pfs_transport::OpOutput>(
    op: Op<T>,
    at: Instant,
) -> (pfs_transport::Result<T>, Duration) {
    let r = op.wait();
    (r, at.elapsed())
}

impl Worker {
    fn slot_at(&self) -> usize {
        SLOTS_AT + self.wid * self.slot_len
    }

    fn word_at(&self, word: usize) -> usize {
        COUNTERS_AT + 8 * (1 + self.wid * WORDS_PER_WORKER + word)
    }

    fn set_doing(&self, what: &'static str, inc: Option<&Incarnation>) {
        *self.doing.lock().unwrap() = (what, inc.map(|i| (Instant::now(), i.node, i.number)));
    }

    fn run(mut self) {
        let mut known: Option<Known> = None;
        while !self.sh.stopping() {
            let current = self.sh.nodes[self.node].current.lock().unwrap().clone();
            let Some(inc) = current else {
                known = None;
                self.set_doing("waiting for the node to restart", None);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            if known.as_ref().is_some_and(|k| !Arc::ptr_eq(&k.inc, &inc)) {
                // A new incarnation: everything known about the old one is void.
                known = None;
            }
            let conn = match self.connect(&inc) {
                Some(c) => c,
                None => {
                    std::thread::sleep(Duration::from_millis(20 + self.rng.below(40) as u64));
                    continue;
                }
            };
            let k = known.get_or_insert_with(|| self.learn(&inc));
            // Rounds on this connection until one fails; then the connection is given
            // up (a tcp timeout closes it anyway) and the next one goes to the same
            // incarnation, with what is known about its region carried over. Now and
            // then a worker also closes a healthy connection and makes a new one, so
            // that connection setup and teardown run all the time, not only after kills.
            while !self.sh.stopping() && !self.sh.disturbed(&k.inc) {
                if self.round(k, &conn).is_err() || self.rng.below(RECONNECT_ODDS) == 0 {
                    break;
                }
            }
        }
        self.set_doing("stopped", None);
    }

    fn connect(&mut self, inc: &Arc<Incarnation>) -> Option<Connection> {
        let addr = if self.backend.udp { &inc.udp } else { &inc.tcp };
        self.set_doing("connect", Some(inc));
        let t = Instant::now();
        let r = self.ep.connect(addr);
        let took = t.elapsed();
        self.set_doing("between operations", None);
        match r {
            Ok(c) if c.peer_id() == inc.key.owner() => {
                self.sh.connected(self.backend, took);
                Some(c)
            }
            Ok(_) => {
                // A restarted node on the same port answered: the incarnation we meant
                // is gone. Not a failure; the next pass picks up the new one.
                self.sh.connected(self.backend, took);
                None
            }
            Err(e) => {
                self.sh
                    .failed(self.backend, "connect", inc, &e, took, CONNECT_TIMEOUT);
                None
            }
        }
    }

    /// What a fresh incarnation's region holds, as far as this worker's parts go.
    fn learn(&self, inc: &Arc<Incarnation>) -> Known {
        let faa_word = 0;
        let cas_word = WORDS_PER_WORKER / 2;
        Known {
            inc: inc.clone(),
            shadow: initial_bytes(inc.seed, self.slot_at(), self.slot_len),
            tainted: vec![None; self.slot_len / CHUNK],
            faa_word,
            faa_expect: initial_word(inc.seed, (self.word_at(faa_word) / 8) as u64),
            cas_word,
            cas_expect: initial_word(inc.seed, (self.word_at(cas_word) / 8) as u64),
            shared_floor: initial_word(inc.seed, (COUNTERS_AT / 8) as u64),
            msg_seq: 0,
        }
    }

    fn round(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        self.writes_and_reads(k, conn)?;
        if self.rng.below(WHOLE_SLOT_ODDS) == 0 {
            self.whole_slot(k, conn)?;
        }
        self.reference_read(k, conn)?;
        self.fence(k, conn)?;
        self.fetch_add(k, conn)?;
        self.shared_add(k, conn)?;
        self.cas(k, conn)?;
        self.message(k, conn)?;
        Ok(())
    }

    fn fail(&self, k: &Known, op: &'static str, e: &Error, took: Duration) {
        self.sh
            .failed(self.backend, op, &k.inc, e, took, self.deadline);
    }

    /// Tallies a finished operation: a failure (`Err`), a verification failure where
    /// `verify` describes one, or a success. `Ok` says whether the result verified.
    fn settle<T>(
        &self,
        k: &mut Known,
        op: &'static str,
        r: pfs_transport::Result<T>,
        took: Duration,
        verify: impl FnOnce(&mut Known, T) -> Option<String>,
    ) -> Result<bool, ()> {
        match r {
            Ok(v) => match verify(k, v) {
                Some(detail) => {
                    self.sh.mismatch(self.backend, op, &k.inc, detail);
                    Ok(false)
                }
                None => {
                    self.sh.ok(self.backend, op, took, self.deadline);
                    Ok(true)
                }
            },
            Err(e) => {
                self.fail(k, op, &e, took);
                Err(())
            }
        }
    }

    /// Writes of random bytes to up to `MAX_BATCH` chunks at once, then the whole chunks
    /// read back and compared with what this worker knows they hold.
    fn writes_and_reads(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        let now = Instant::now();
        let chunks = k.tainted.len();
        // (chunk, offset in chunk, length)
        let mut picks: Vec<(usize, usize, usize)> = Vec::new();
        // Chunks tainted long enough ago are rewritten whole, which makes them known.
        for (c, t) in k.tainted.iter().enumerate() {
            if picks.len() < MAX_BATCH && t.is_some_and(|t| now - t > TAINT) {
                picks.push((c, 0, CHUNK));
            }
        }
        let want = 1 + self.rng.below(MAX_BATCH);
        for _ in 0..16 {
            if picks.len() >= want {
                break;
            }
            let c = self.rng.below(chunks);
            if k.tainted[c].is_some() || picks.iter().any(|p| p.0 == c) {
                continue;
            }
            let (off, len) = if self.rng.below(8) == 0 {
                (0, CHUNK)
            } else {
                let off = self.rng.below(CHUNK);
                (off, 1 + self.rng.below(CHUNK - off))
            };
            picks.push((c, off, len));
        }
        if picks.is_empty() {
            return Ok(());
        }
        let base = self.slot_at();
        let mut data = std::mem::take(&mut self.scratch);
        data.resize(MAX_BATCH * CHUNK, 0);
        self.set_doing("write", Some(&k.inc));
        let mut ops = Vec::new();
        let mut failed = false;
        for (j, &(c, off, len)) in picks.iter().enumerate() {
            let src = &mut data[j * CHUNK..j * CHUNK + len];
            self.rng.fill(src);
            self.local
                .write_at(LOCAL_WRITE_AT + j * CHUNK, src)
                .unwrap();
            let at = Instant::now();
            match conn.write(
                &self.local,
                (LOCAL_WRITE_AT + j * CHUNK) as u64,
                &k.inc.key,
                (base + c * CHUNK + off) as u64,
                len as u64,
            ) {
                Ok(op) => ops.push((op, at)),
                Err(e) => {
                    self.fail(k, "write", &e, at.elapsed());
                    failed = true;
                    break;
                }
            }
        }
        for (op, at) in ops {
            let (r, took) = finish(op, at);
            failed |= self.settle(k, "write", r, took, |_, ()| None).is_err();
        }
        if failed {
            // Any of these writes may still land.
            for &(c, _, _) in &picks {
                k.tainted[c] = Some(Instant::now());
            }
            self.scratch = data;
            return Err(());
        }
        for (j, &(c, off, len)) in picks.iter().enumerate() {
            k.shadow[c * CHUNK + off..c * CHUNK + off + len]
                .copy_from_slice(&data[j * CHUNK..j * CHUNK + len]);
            k.tainted[c] = None;
        }
        self.scratch = data;

        // Read the whole chunks back: the written range and its neighbours.
        self.set_doing("read", Some(&k.inc));
        self.local
            .fill(LOCAL_READ_AT, picks.len() * CHUNK, POISON)
            .unwrap();
        let mut ops = Vec::new();
        for (j, &(c, _, _)) in picks.iter().enumerate() {
            let at = Instant::now();
            match conn.read(
                &self.local,
                (LOCAL_READ_AT + j * CHUNK) as u64,
                &k.inc.key,
                (base + c * CHUNK) as u64,
                CHUNK as u64,
            ) {
                Ok(op) => ops.push((op, at, j, c)),
                Err(e) => {
                    self.fail(k, "read", &e, at.elapsed());
                    failed = true;
                    break;
                }
            }
        }
        let mut got = vec![0u8; CHUNK];
        for (op, at, j, c) in ops {
            let (r, took) = finish(op, at);
            let r = self.settle(k, "read", r, took, |k, ()| {
                self.local
                    .read_at(LOCAL_READ_AT + j * CHUNK, &mut got)
                    .unwrap();
                let want = &k.shadow[c * CHUNK..(c + 1) * CHUNK];
                if got == want {
                    return None;
                }
                let diff = describe_diff(base + c * CHUNK, &got, want);
                k.tainted[c] = Some(Instant::now());
                Some(diff)
            });
            failed |= r.is_err();
        }
        if failed { Err(()) } else { Ok(()) }
    }

    /// The whole slot written in one operation (many datagrams or segments: a kill
    /// often lands in the middle of one), then read back in one and compared.
    fn whole_slot(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        // Only when no chunk can still be written by an earlier, failed write.
        if k.tainted.iter().any(Option::is_some) {
            return Ok(());
        }
        let len = self.slot_len;
        let mut data = std::mem::take(&mut self.scratch);
        data.resize(len, 0);
        self.rng.fill(&mut data);
        self.local.write_at(LOCAL_SLOT_AT, &data).unwrap();
        self.set_doing("whole-slot write", Some(&k.inc));
        let at = Instant::now();
        let r = conn
            .write(
                &self.local,
                LOCAL_SLOT_AT as u64,
                &k.inc.key,
                self.slot_at() as u64,
                len as u64,
            )
            .and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        let r = self.settle(k, "whole-slot write", r, took, |k, ()| {
            k.shadow.copy_from_slice(&data[..len]);
            None
        });
        self.scratch = data;
        if r.is_err() {
            for t in k.tainted.iter_mut() {
                *t = Some(Instant::now());
            }
            return Err(());
        }

        self.set_doing("whole-slot read", Some(&k.inc));
        self.local.fill(LOCAL_SLOT_AT, len, POISON).unwrap();
        let at = Instant::now();
        let r = conn
            .read(
                &self.local,
                LOCAL_SLOT_AT as u64,
                &k.inc.key,
                self.slot_at() as u64,
                len as u64,
            )
            .and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        self.settle(k, "whole-slot read", r, took, |k, ()| {
            let got = self.local.to_vec(LOCAL_SLOT_AT, len).unwrap();
            if got == k.shadow {
                return None;
            }
            for t in k.tainted.iter_mut() {
                *t = Some(Instant::now());
            }
            Some(describe_diff(self.slot_at(), &got, &k.shadow))
        })?;
        Ok(())
    }

    /// A read of the region's untouched part, compared with its initial content.
    fn reference_read(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        let off = self.rng.below(REF_LEN - 1);
        let len = 1 + self.rng.below(REF_READ_MAX.min(REF_LEN - off));
        self.set_doing("reference read", Some(&k.inc));
        self.local.fill(LOCAL_REF_AT, len, POISON).unwrap();
        let at = Instant::now();
        let r = conn
            .read(
                &self.local,
                LOCAL_REF_AT as u64,
                &k.inc.key,
                off as u64,
                len as u64,
            )
            .and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        self.settle(k, "reference read", r, took, |k, ()| {
            let got = self.local.to_vec(LOCAL_REF_AT, len).unwrap();
            let want = initial_bytes(k.inc.seed, off, len);
            (got != want).then(|| describe_diff(off, &got, &want))
        })?;
        Ok(())
    }

    fn fence(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        self.set_doing("fence", Some(&k.inc));
        let at = Instant::now();
        let r = conn.fence().and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        self.settle(k, "fence", r, took, |_, ()| None)?;
        Ok(())
    }

    /// Fetch-and-add on this worker's own counter: the old value must be exactly what
    /// the worker's earlier adds made it. After a failed add the counter is unknown and
    /// the next word is used.
    fn fetch_add(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        if k.faa_word >= WORDS_PER_WORKER / 2 {
            return Ok(());
        }
        let add = 1 + self.rng.below(1 << 20) as u64;
        let off = self.word_at(k.faa_word) as u64;
        self.set_doing("fetch-add", Some(&k.inc));
        let at = Instant::now();
        let r = conn
            .fetch_add(&k.inc.key, off, add)
            .and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        if r.is_err() {
            k.faa_word += 1;
            k.faa_expect = initial_word(k.inc.seed, (self.word_at(k.faa_word) / 8) as u64);
        }
        self.settle(k, "fetch-add", r, took, |k, old| {
            let bad = (old != k.faa_expect)
                .then(|| format!("old value {old:#x} at {off}, want {:#x}", k.faa_expect));
            k.faa_expect = old.wrapping_add(add);
            bad
        })?;
        Ok(())
    }

    /// Fetch-and-add on the node's shared counter (all workers): checked at the end.
    fn shared_add(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        let add = 1 + self.rng.below(1000) as u64;
        self.set_doing("shared fetch-add", Some(&k.inc));
        let at = Instant::now();
        let r = conn
            .fetch_add(&k.inc.key, COUNTERS_AT as u64, add)
            .and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        if r.is_err() {
            k.inc.shared_unsure.fetch_add(add, Ordering::SeqCst);
        }
        let verified = self.settle(k, "shared fetch-add", r, took, |k, old| {
            k.inc.shared_ok.fetch_add(add, Ordering::SeqCst);
            // Other workers add too, but never this much in one test.
            if old.wrapping_sub(k.shared_floor) >= 1 << 40 {
                return Some(format!(
                    "old value {old:#x}, but the counter was at least {:#x} already",
                    k.shared_floor
                ));
            }
            k.shared_floor = old.wrapping_add(add);
            None
        })?;
        if verified { Ok(()) } else { Err(()) }
    }

    /// Compare-and-swap on this worker's own word: a swap with the right expected value
    /// must happen, one with a wrong expected value must not (the next CAS shows which).
    fn cas(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        if k.cas_word >= WORDS_PER_WORKER {
            return Ok(());
        }
        let off = self.word_at(k.cas_word) as u64;
        let new = self.rng.next();
        let wrong = self.rng.below(4) == 0;
        let expected = if wrong {
            k.cas_expect ^ (1 + self.rng.next() % (u64::MAX - 1))
        } else {
            k.cas_expect
        };
        let name = if wrong { "cas (no swap)" } else { "cas" };
        self.set_doing(name, Some(&k.inc));
        let at = Instant::now();
        let r = conn
            .compare_and_swap(&k.inc.key, off, expected, new)
            .and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        // After a failure or a wrong old value the word is unknown: use the next one.
        let next_word = |k: &mut Known| {
            k.cas_word += 1;
            k.cas_expect = initial_word(k.inc.seed, (self.word_at(k.cas_word) / 8) as u64);
        };
        if r.is_err() {
            next_word(k);
        }
        self.settle(k, name, r, took, |k, old| {
            if old != k.cas_expect {
                let bad = format!("old value {old:#x} at {off}, want {:#x}", k.cas_expect);
                next_word(k);
                return Some(bad);
            }
            if !wrong {
                k.cas_expect = new;
            }
            None
        })?;
        Ok(())
    }

    /// A message the node echoes back: the echo must be the same bytes.
    fn message(&mut self, k: &mut Known, conn: &Connection) -> Result<(), ()> {
        k.msg_seq += 1;
        let len = 16 + self.rng.below(MSG_MAX - 16);
        let mut msg = vec![0u8; len];
        msg[..8].copy_from_slice(&(self.wid as u64).to_le_bytes());
        msg[8..16].copy_from_slice(&k.msg_seq.to_le_bytes());
        self.rng.fill(&mut msg[16..]);
        self.set_doing("send", Some(&k.inc));
        let at = Instant::now();
        let r = conn.send(&msg).and_then(|op| finish(op, at).0);
        let took = at.elapsed();
        self.settle(k, "send", r, took, |_, ()| None)?;
        self.set_doing("echo", Some(&k.inc));
        let at = Instant::now();
        let r = conn.recv_timeout(self.deadline).and_then(|echo| {
            echo.ok_or(Error::Timeout {
                after: self.deadline,
            })
        });
        let took = at.elapsed();
        let verified = self.settle(k, "echo", r, took, |k, echo| {
            if echo == msg {
                return None;
            }
            let n = echo.len().min(msg.len());
            Some(format!(
                "echo of message {} ({} bytes) came back as {} bytes: {}",
                k.msg_seq,
                msg.len(),
                echo.len(),
                describe_diff(0, &echo[..n], &msg[..n])
            ))
        })?;
        if verified { Ok(()) } else { Err(()) }
    }
}

// ---------------------------------------------------------------------------------------
// The private, lossy network.
// ---------------------------------------------------------------------------------------

const NFT_TABLE: &str = "pfs_chaos";

fn run_tool(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut c = Command::new(cmd);
    c.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = c.spawn().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .map_err(|e| format!("{cmd}: writing its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Move this thread (and every thread and process it starts from now on) into a new
/// network namespace with `lo` up and an nftables rule dropping `loss` percent of tcp
/// and udp packets at random. Nothing here can reach the host's network.
fn enter_lossy_namespace(loss: u32) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("it needs root (a private network namespace and nftables)".into());
    }
    run_tool("nft", &["--version"], None)
        .map_err(|e| format!("nft is not usable ({e}): install nftables (cargo xtask deps)"))?;
    run_tool("ip", &["-V"], None)
        .map_err(|e| format!("ip is not usable ({e}): install iproute2 (cargo xtask deps)"))?;
    // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread into a new network
    // namespace; it touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    run_tool("ip", &["link", "set", "lo", "up"], None)?;
    let rules = format!(
        "table inet {NFT_TABLE} {{
            chain output {{
                type filter hook output priority 0; policy accept;
                meta l4proto {{ tcp, udp }} counter
                meta l4proto {{ tcp, udp }} numgen random mod 100 < {loss} counter drop
            }}
        }}
        "
    );
    run_tool("nft", &["-f", "-"], Some(&rules))
        .map_err(|e| format!("installing the loss rule: {e}"))?;
    Ok(())
}

/// (tcp and udp packets seen, packets dropped) by the loss rule so far.
fn nft_counters() -> (u64, u64) {
    let text = run_tool("nft", &["list", "table", "inet", NFT_TABLE], None).unwrap_or_default();
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let at = l.find("counter packets ")?;
            l[at + "counter packets ".len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (
        counts.first().copied().unwrap_or(0),
        counts.get(1).copied().unwrap_or(0),
    )
}

// ---------------------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------------------

/// The shared counter of a live incarnation must hold its initial value plus every add
/// that completed plus some of those that failed.
fn check_shared_counter(sh: &Shared, ep: &Endpoint, inc: &Incarnation) -> Result<String, String> {
    let initial = initial_word(inc.seed, (COUNTERS_AT / 8) as u64);
    let ok = inc.shared_ok.load(Ordering::SeqCst);
    let unsure = inc.shared_unsure.load(Ordering::SeqCst);
    let mut last = String::new();
    for attempt in 0..5 {
        let addr = if attempt % 2 == 0 { &inc.tcp } else { &inc.udp };
        let value = ep.connect(addr).and_then(|c| {
            if c.peer_id() != inc.key.owner() {
                return Err(Error::Protocol("another incarnation answered".into()));
            }
            c.fetch_add(&inc.key, COUNTERS_AT as u64, 0)?.wait()
        });
        match value {
            Ok(v) => {
                let extra = v.wrapping_sub(initial).wrapping_sub(ok);
                let line = format!(
                    "node {}#{}: shared counter = initial + {} completed adds + {extra} of {} \
                     failed ones",
                    inc.node, inc.number, ok, unsure
                );
                return if extra <= unsure {
                    Ok(line)
                } else {
                    Err(format!(
                        "node {}#{}: shared counter {v:#x} is off: initial {initial:#x} + \
                         completed adds {ok} + up to {unsure} from failed adds allows at most \
                         {:#x}",
                        inc.node,
                        inc.number,
                        initial.wrapping_add(ok).wrapping_add(unsure)
                    ))
                };
            }
            Err(e) => last = e.to_string(),
        }
        if sh.disturbed(inc) {
            break;
        }
    }
    Err(format!(
        "node {}#{}: could not read the shared counter at the end: {last}",
        inc.node, inc.number
    ))
}

#[test]
#[ignore = "runs for PFS_CHAOS_SECS (120) as root: `cargo xtask test` or `cargo xtask chaos`"]
fn chaos_with_peer_kills_and_loss() {
    if let Ok(index) = std::env::var(NODE_ENV) {
        node_main(&index);
    }
    let secs: u64 = env_num("PFS_CHAOS_SECS", 120);
    let nodes: usize = env_num("PFS_CHAOS_NODES", 3);
    let clients: usize = env_num("PFS_CHAOS_CLIENTS", 2);
    let loss: u32 = env_num("PFS_CHAOS_LOSS_PERCENT", 5);
    assert!(secs >= 10, "PFS_CHAOS_SECS must be at least 10");
    assert!(nodes >= 3, "PFS_CHAOS_NODES must be at least 3");
    assert!(
        (1..=4).contains(&clients),
        "PFS_CHAOS_CLIENTS must be 1..=4"
    );
    assert!(loss <= 50, "PFS_CHAOS_LOSS_PERCENT must be 0..=50");
    let master: u64 = std::env::var("PFS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            splitmix(t.as_nanos() as u64 ^ u64::from(std::process::id()))
        });

    if let Err(why) = enter_lossy_namespace(loss) {
        if std::env::var("PFS_REQUIRE_ROOT_TESTS").ok().as_deref() == Some("1") {
            panic!("the chaos test must run here (PFS_REQUIRE_ROOT_TESTS=1) but cannot: {why}");
        }
        eprintln!("SKIPPED: the chaos test (peer kills and {loss}% loss for {secs} s): {why}");
        return;
    }

    // Count every panic in this process, whichever thread it happens on.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let duration = Duration::from_secs(secs);
    let began = Instant::now();
    let finished = Arc::new(AtomicBool::new(false));
    let sh = Arc::new(Shared {
        nodes: (0..nodes)
            .map(|_| NodeSlot {
                current: Mutex::new(None),
                epoch: AtomicU64::new(0),
                proc_: Mutex::new(None),
                incarnations: Mutex::new(Vec::new()),
            })
            .collect(),
        stop: AtomicBool::new(false),
        began,
        tally: Mutex::new(Tally::default()),
        kills: AtomicU64::new(0),
        restarts: AtomicU64::new(0),
        same_port_restarts: AtomicU64::new(0),
    });
    println!(
        "chaos: {nodes} nodes (the odd ones with the cluster secret and datagram \
         integrity), {clients} clients x tcp+udp x every node, {loss}% of packets dropped, op \
         deadline {OP_TIMEOUT:?} (odd clients {SHORT_OP_TIMEOUT:?}) + {SLACK:?} slack, for \
         {secs} s; PFS_CHAOS_SEED={master}"
    );

    let workers_per_node = clients * 2;
    let slot_len = (REGION_LEN - SLOTS_AT) / workers_per_node;
    let doings: Arc<Doings> = Arc::default();

    // Nothing may hang: past the hard guard, report what each worker was doing and end
    // the process (the nodes follow when their stdin closes).
    {
        let (finished, doings) = (finished.clone(), doings.clone());
        let guard = duration + HARD_GUARD;
        std::thread::spawn(move || {
            while began.elapsed() < guard {
                if finished.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("HANG: the chaos test is still running {guard:?} after it began; workers:");
            for (name, d) in doings.lock().unwrap().iter() {
                let (what, since) = *d.lock().unwrap();
                match since {
                    Some((t, node, number)) => eprintln!(
                        "  {name}: {what} on node {node}#{number} for {:?}",
                        t.elapsed()
                    ),
                    None => eprintln!("  {name}: {what}"),
                }
            }
            std::process::exit(1);
        });
    }

    for node in 0..nodes {
        assert!(
            start_node(&sh, master, node, (0, 0)),
            "node {node} did not start: {:?}",
            sh.tally.lock().unwrap().problems
        );
    }

    // Memory of this process, sampled every second.
    let rss_samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let sampler = {
        let (sh, samples) = (sh.clone(), rss_samples.clone());
        std::thread::spawn(move || {
            while !sh.stopping() {
                samples.lock().unwrap().push((sh.secs(), rss_bytes()));
                for _ in 0..10 {
                    if sh.stopping() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };

    // Each client is two endpoints: an open one for the open nodes, one with the
    // secret for the others. Its workers share them, one per node and backend.
    let endpoints: Vec<[Endpoint; 2]> = (0..clients)
        .map(|c| {
            [false, true].map(|s| {
                Endpoint::bind(base_config(s, client_op_timeout(c))).expect("client endpoint")
            })
        })
        .collect();
    let mut handles: Vec<(String, JoinHandle<()>)> = Vec::new();
    for (c, eps) in endpoints.iter().enumerate() {
        for node in 0..nodes {
            let secure = secure_node(node);
            let ep = &eps[usize::from(secure)];
            for (bi, udp) in [false, true].into_iter().enumerate() {
                let backend = Backend { udp, secure };
                let wid = c * 2 + bi;
                let name = format!("client {c} -> node {node} over {}", backend.name());
                let doing: Arc<Doing> = Arc::new(Mutex::new(("starting", None)));
                doings.lock().unwrap().push((name.clone(), doing.clone()));
                // Touched now, so that the memory samples after the warm-up see all of it.
                let local = ep.alloc_region(LOCAL_LEN, Rights::ALL).unwrap();
                local.fill(0, LOCAL_LEN, POISON).unwrap();
                let w = Worker {
                    sh: sh.clone(),
                    ep: ep.clone(),
                    node,
                    backend,
                    deadline: client_op_timeout(c),
                    wid,
                    slot_len,
                    local,
                    rng: Rng::new(master ^ ((c as u64) << 8) ^ ((node as u64) << 16) ^ bi as u64),
                    scratch: vec![0; slot_len.max(MAX_BATCH * CHUNK)],
                    doing,
                };
                let h = std::thread::Builder::new()
                    .name(format!("chaos-c{c}-n{node}-{}", backend.name()))
                    .spawn(move || w.run())
                    .unwrap();
                handles.push((name, h));
            }
        }
    }
    let ctl = {
        let sh = sh.clone();
        std::thread::spawn(move || controller(sh, master))
    };

    // Progress lines while it runs.
    let mut next_print = Instant::now() + Duration::from_secs(10);
    while began.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() >= next_print {
            next_print += Duration::from_secs(10);
            let t = sh.tally.lock().unwrap();
            let ok: u64 = t.ok.values().sum();
            let failed: u64 = t.failed.values().sum();
            drop(t);
            println!(
                "chaos: {:6.1} s  {ok} ops verified, {failed} failed, {} kills, rss {:.1} MiB",
                sh.secs(),
                sh.kills.load(Ordering::SeqCst),
                mib(rss_bytes())
            );
        }
    }
    sh.stop.store(true, Ordering::SeqCst);
    let stopped = Instant::now();

    // Every worker finishes its round within its deadlines.
    let join_by = stopped + START_TIMEOUT + OP_TIMEOUT * 4 + CONNECT_TIMEOUT + SLACK * 4;
    let mut hung = Vec::new();
    let mut worker_panics = 0;
    for (name, h) in handles {
        while !h.is_finished() && Instant::now() < join_by {
            std::thread::sleep(Duration::from_millis(20));
        }
        if h.is_finished() {
            if h.join().is_err() {
                worker_panics += 1;
            }
        } else {
            hung.push(name);
        }
    }
    while !ctl.is_finished() && Instant::now() < join_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    let controller_ok = ctl.is_finished() && ctl.join().is_ok();
    let _ = sampler.join();
    let wind_down = stopped.elapsed();

    // The live nodes' shared counters, and their memory.
    let mut counter_lines = Vec::new();
    let mut counter_errors = Vec::new();
    for node in 0..nodes {
        let inc = sh.nodes[node].current.lock().unwrap().clone();
        if let Some(inc) = inc {
            let ep = &endpoints[0][usize::from(secure_node(node))];
            match check_shared_counter(&sh, ep, &inc) {
                Ok(l) => counter_lines.push(l),
                Err(e) => counter_errors.push(e),
            }
        }
    }
    let (packets, dropped) = nft_counters();
    for node in 0..nodes {
        kill_node(&sh, node);
    }
    let client_stats: Vec<(String, pfs_transport::Stats)> = endpoints
        .iter()
        .enumerate()
        .flat_map(|(c, eps)| {
            [("open", &eps[0]), ("with the secret", &eps[1])]
                .map(|(what, e)| (format!("client {c} ({what})"), e.stats()))
        })
        .collect();
    drop(endpoints);

    // ---- the summary ----
    let t = sh.tally.lock().unwrap();
    println!("\n===== chaos summary ({secs} s, seed {master}) =====");
    println!(
        "network: {packets} tcp/udp packets sent, {dropped} dropped by the loss rule ({:.2}%)",
        100.0 * dropped as f64 / packets.max(1) as f64
    );
    println!(
        "kills: {} (SIGKILL), restarts: {} ({} on the same ports)",
        sh.kills.load(Ordering::SeqCst),
        sh.restarts.load(Ordering::SeqCst),
        sh.same_port_restarts.load(Ordering::SeqCst)
    );
    let mut per_backend: BTreeMap<&str, u64> = BTreeMap::new();
    println!("verified operations:");
    for ((b, op), n) in &t.ok {
        *per_backend.entry(b).or_default() += n;
        println!("  {b:<20} {op:<18} {n:>9}");
    }
    for (b, n) in &per_backend {
        println!("  {b:<20} {:<18} {n:>9}", "total");
    }
    println!(
        "connections made: {}",
        t.connects_ok
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("failed operations (every one an error):");
    for ((b, kind, when), n) in &t.failed {
        println!("  {b:<20} {kind:<28} {when:<30} {n:>7}");
    }
    println!(
        "longest operation: {:?} ({}); longest connect: {:?} ({})",
        t.max_op.0, t.max_op.1, t.max_connect.0, t.max_connect.1
    );
    println!(
        "furthest past a deadline: {:?} ({}); allowed: {SLACK:?}; past it by more than 10 \
         ms: {}, 100 ms: {}, 250 ms: {}",
        t.max_over.0, t.max_over.1, t.over[0], t.over[1], t.over[2]
    );
    println!("wind-down after the stop: {wind_down:?}");
    for (name, s) in &client_stats {
        println!(
            "{name}: {} ops completed, {} failed ({} timed out), {} retransmissions, {} \
             connections opened, {} closed, {} auth failures, {} integrity failures",
            s.ops_completed,
            s.ops_failed,
            s.ops_timed_out,
            s.retransmissions,
            s.connections_opened,
            s.connections_closed,
            s.auth_failures,
            s.integrity_failures
        );
    }
    for l in &counter_lines {
        println!("{l}");
    }

    // Memory: after the warm-up, the client process must stay flat.
    let samples = rss_samples.lock().unwrap().clone();
    let warmup = (secs as f64 / 4.0).clamp(3.0, 30.0);
    let after: Vec<(f64, u64)> = samples.iter().copied().filter(|s| s.0 >= warmup).collect();
    let base = after.first().map(|s| s.1).unwrap_or(0);
    let last = after.last().map(|s| s.1).unwrap_or(0);
    let peak = after.iter().map(|s| s.1).max().unwrap_or(0);
    // Healthy runs grow by a few MiB, levelling off, whether they make a thousand
    // connections or thirty thousand. A leak of 32 bytes per operation, or of 16 KiB per
    // connection, would pass this bound within the default 120 s.
    let allowed = base + (16 << 20);
    let every = (samples.len() / 12).max(1);
    println!(
        "client rss (MiB, every {every} s): {}",
        samples
            .iter()
            .step_by(every)
            .map(|(s, b)| format!("{s:.0}s:{:.1}", mib(*b)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "client rss after the {warmup:.0} s warm-up: {:.1} MiB, last {:.1} MiB, peak {:.1} MiB \
         (allowed {:.1} MiB)",
        mib(base),
        mib(last),
        mib(peak),
        mib(allowed)
    );
    println!("node rss (first and last report of each incarnation that lived 10 s or more):");
    let mut short_lived = 0;
    for slot in &sh.nodes {
        for inc in slot.incarnations.lock().unwrap().iter() {
            let r = inc.rss.lock().unwrap();
            let life = inc
                .ended
                .lock()
                .unwrap()
                .unwrap_or_else(Instant::now)
                .duration_since(inc.started);
            match (r.first(), r.last()) {
                (Some(a), Some(b)) if life >= Duration::from_secs(10) => println!(
                    "  node {}#{:<3} lived {:5.1} s: {:5.1} MiB at {:5.1} s -> {:5.1} MiB at \
                     {:5.1} s ({} connections)",
                    inc.node,
                    inc.number,
                    life.as_secs_f64(),
                    mib(a.1),
                    a.0,
                    mib(b.1),
                    b.0,
                    b.2
                ),
                _ => short_lived += 1,
            }
        }
    }
    println!("  ({short_lived} shorter-lived incarnations not shown)");
    for (what, list) in [
        ("verification failures", &t.verify_examples),
        ("unexpected errors", &t.unexpected_examples),
        ("operations past their deadline", &t.late_examples),
        ("problems", &t.problems),
        ("shared counters", &counter_errors),
        ("hung workers", &hung),
    ] {
        if !list.is_empty() {
            println!("{what}:");
            for l in list {
                println!("  {l}");
            }
        }
    }
    let panics = PANICS.load(Ordering::SeqCst);
    let node_panics = NODE_PANICS.load(Ordering::SeqCst);
    println!(
        "verification failures: {}, unexpected errors: {}, late operations: {}, panics: {} \
         here + {} in nodes, hung workers: {}",
        t.verify_failures,
        t.unexpected,
        t.late,
        panics,
        node_panics,
        hung.len()
    );
    println!("=====");
    finished.store(true, Ordering::SeqCst);

    assert_eq!(
        t.verify_failures, 0,
        "operations completed with wrong results"
    );
    assert!(hung.is_empty(), "workers hung: {hung:?}");
    assert!(controller_ok, "the controller did not finish");
    assert_eq!(
        panics + node_panics + worker_panics,
        0,
        "something panicked"
    );
    assert_eq!(t.late, 0, "operations finished past their deadline + slack");
    assert_eq!(t.unexpected, 0, "operations failed with unexpected errors");
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    assert!(counter_errors.is_empty(), "{counter_errors:?}");
    assert!(
        last <= allowed && peak <= allowed + (8 << 20),
        "client memory grew after the warm-up: {:.1} MiB -> {:.1} MiB (peak {:.1} MiB)",
        mib(base),
        mib(last),
        mib(peak)
    );
    let min_ops = 20 * secs;
    for b in ["tcp", "udp", "tcp+secret", "udp+secret+integrity"] {
        let n = per_backend.get(b).copied().unwrap_or(0);
        assert!(
            n >= min_ops,
            "only {n} verified operations over {b} (at least {min_ops} expected)"
        );
    }
    let kills = sh.kills.load(Ordering::SeqCst);
    assert!(
        kills >= (secs / 10).max(1),
        "only {kills} kills in {secs} s"
    );
    assert_eq!(
        sh.restarts.load(Ordering::SeqCst),
        kills,
        "every killed node was restarted"
    );
    if loss > 0 {
        assert!(dropped > 0, "the loss rule dropped nothing");
    }
}
