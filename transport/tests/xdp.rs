//! The `xdp` backend between two hosts: network namespaces pfs-a (server, 198.18.0.1 on
//! pfs-a0) and pfs-b (client, 198.18.0.2 on pfs-b0) joined by a veth pair, set up by
//! `tools/topology.sh`. Needs root; without it every test says so and passes.
#![cfg(feature = "xdp")]

mod conformance;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use conformance::{Fixture, Mode, Side};
use pfs_transport::{Address, Endpoint, EndpointConfig, Rights};

const SERVER_IP: &str = "198.18.0.1";

fn topology() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/topology.sh")
}

/// Set up the two hosts once per process; false (after one loud line) when not root.
fn two_hosts() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Past the harness's capture: the caller exits right after.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED: xdp tests need root (network namespaces, XDP, AF_XDP); run as root"
            );
            return false;
        }
        let out = Command::new(topology())
            .args(["up", "--mtu", "1500", "--queues", "2"])
            .output()
            .expect("run tools/topology.sh");
        assert!(
            out.status.success(),
            "tools/topology.sh up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    })
}

/// Move the calling thread into a host's network namespace.
fn enter_ns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).expect("namespace file");
    // SAFETY: setns on a valid namespace descriptor changes only this thread's network
    // namespace; the file stays open for the call.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

fn enter(side: Side) {
    enter_ns(match side {
        Side::Server => "pfs-a",
        Side::Client => "pfs-b",
    });
}

/// The first client speaks xdp from pfs-b0; others at the same time speak udp from the
/// same namespace (one xdp endpoint per interface per process), which also exercises
/// xdp <-> udp interoperability.
fn dial(a: &Address, nth: usize) -> String {
    let port = a.socket_addr().port();
    if nth == 0 {
        format!("xdp://pfs-b0/{SERVER_IP}:{port}")
    } else {
        format!("udp://{SERVER_IP}:{port}")
    }
}

fn init() {
    conformance::init_tracing();
}

fn raw_garbage(addr: &Address, bytes: &[u8]) -> Option<Vec<u8>> {
    enter(Side::Client);
    conformance::udp_garbage("0.0.0.0:0", addr, bytes)
}

fn xdp(mode: Mode) -> Fixture {
    Fixture {
        name: "xdp",
        listen: "xdp://pfs-a0/198.18.0.1:0",
        mode,
        large: if cfg!(debug_assertions) {
            16 << 20
        } else {
            128 << 20
        },
        raw_garbage,
        tweak: |c| c,
        enter,
        dial,
        serial: true,
    }
}

/// The suite, only where the hosts exist.
macro_rules! xdp_suite {
    ($modname:ident, $mode:expr) => {
        fn $modname() -> conformance::Fixture {
            if !two_hosts() {
                // Run nothing: every conformance function needs the hosts.
                std::process::exit(0);
            }
            xdp($mode)
        }
    };
}

xdp_suite!(xdp_thread_block, Mode::ThreadBlock);
xdp_suite!(xdp_caller_busy, Mode::CallerBusy);

conformance_suite!(thread_block, super::xdp_thread_block());
conformance_suite!(caller_busy, super::xdp_caller_busy());

/// A server in pfs-a; the caller's thread ends up in pfs-b.
fn pair_with(
    server_cfg: impl FnOnce(EndpointConfig) -> EndpointConfig,
    client_addr: impl FnOnce(u16) -> String,
) -> (Endpoint, Endpoint, pfs_transport::Connection) {
    init();
    enter(Side::Server);
    let server = Endpoint::bind(server_cfg(
        EndpointConfig::new()
            .listen("xdp://pfs-a0/198.18.0.1:0")
            .unwrap()
            .op_timeout(Duration::from_secs(60)),
    ))
    .expect("xdp server");
    let port = server.local_addrs()[0].socket_addr().port();
    enter(Side::Client);
    let client = Endpoint::bind(EndpointConfig::new().op_timeout(Duration::from_secs(60))).unwrap();
    let conn = client.connect(&client_addr(port)).expect("connect");
    (server, client, conn)
}

fn transfer_byte_exact(
    conn: &pfs_transport::Connection,
    client: &Endpoint,
    server: &Endpoint,
    total: usize,
) {
    let src = client.alloc_region(total, Rights::ALL).unwrap();
    let dst = server.alloc_region(total, Rights::ALL).unwrap();
    let back = client.alloc_region(total, Rights::ALL).unwrap();
    conformance::fill_pattern(&src, 9);
    let key = dst.key(Rights::READ | Rights::WRITE).unwrap();
    let chunk = 4 << 20;
    let mut ops = Vec::new();
    for off in (0..total).step_by(chunk) {
        ops.push(
            conn.write(&src, off as u64, &key, off as u64, chunk as u64)
                .unwrap(),
        );
    }
    if let Err(e) = pfs_transport::wait_all(ops) {
        panic!(
            "writes failed: {e}\nclient: {:?}\nserver: {:?}",
            client
                .stats()
                .fields()
                .into_iter()
                .filter(|f| f.1 > 0)
                .collect::<Vec<_>>(),
            server
                .stats()
                .fields()
                .into_iter()
                .filter(|f| f.1 > 0)
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(conformance::checksum(&dst), conformance::checksum(&src));
    let mut ops = Vec::new();
    for off in (0..total).step_by(chunk) {
        ops.push(
            conn.read(&back, off as u64, &key, off as u64, chunk as u64)
                .unwrap(),
        );
    }
    pfs_transport::wait_all(ops).unwrap();
    assert_eq!(conformance::checksum(&back), conformance::checksum(&src));
}

#[test]
fn bytes_and_messages_arrive_exactly_with_one_and_ten_percent_of_packets_dropped() {
    if !two_hosts() {
        return;
    }
    let _g = conformance::hold(xdp(Mode::ThreadBlock));
    let total = if cfg!(debug_assertions) {
        16 << 20
    } else {
        256 << 20
    };
    for per_million in [10_000u32, 100_000] {
        let (server, client, conn) = pair_with(
            |c| c.fault_drop_per_million(per_million),
            |port| format!("xdp://pfs-b0/{SERVER_IP}:{port}"),
        );
        transfer_byte_exact(&conn, &client, &server, total);
        // Messages through the same loss, some longer than a datagram: each arrives
        // once, intact, in the order sent.
        let peer = server
            .accept_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("the server accepted the connection");
        let msg = |i: usize| -> Vec<u8> {
            (0..[0, 10, 3000, 9000, 1400][i % 5])
                .map(|k| (k + i * 31) as u8)
                .collect()
        };
        let sends: Vec<_> = (0..200).map(|i| conn.send(&msg(i)).unwrap()).collect();
        pfs_transport::wait_all(sends).unwrap();
        for i in 0..200 {
            let m = peer.recv_timeout(Duration::from_secs(20)).unwrap();
            assert!(
                m.as_deref() == Some(&msg(i)[..]),
                "{}% dropped: message {i} is missing, out of order or altered",
                per_million / 10_000
            );
        }
        let s = client.stats();
        eprintln!(
            "{}% dropped: {} MiB each way, {} retransmissions by the client, {} by the server",
            per_million / 10_000,
            total >> 20,
            s.retransmissions,
            server.stats().retransmissions
        );
        assert!(
            s.retransmissions + server.stats().retransmissions > 0,
            "packets were dropped, so something was sent again"
        );
    }
}

/// The cluster secret over xdp, with 10% of the server's packets dropped (so operations
/// may overtake the client's proof): a peer without the secret is refused, one with it
/// moves bytes exactly.
#[test]
fn authentication_and_integrity_hold_over_xdp_under_loss() {
    if !two_hosts() {
        return;
    }
    let _g = conformance::hold(xdp(Mode::ThreadBlock));
    let secret = || pfs_transport::Secret::from_bytes(b"xdp-test-cluster-secret").unwrap();
    init();
    enter(Side::Server);
    let server = Endpoint::bind(
        EndpointConfig::new()
            .listen("xdp://pfs-a0/198.18.0.1:0")
            .unwrap()
            .op_timeout(Duration::from_secs(60))
            .secret(secret())
            .datagram_integrity(true)
            .fault_drop_per_million(100_000),
    )
    .expect("xdp server");
    let port = server.local_addrs()[0].socket_addr().port();
    enter(Side::Client);
    let stranger =
        Endpoint::bind(EndpointConfig::new().connect_timeout(Duration::from_secs(20))).unwrap();
    match stranger.connect(&format!("xdp://pfs-b0/{SERVER_IP}:{port}")) {
        Err(pfs_transport::Error::AuthFailed(why)) => {
            assert!(why.contains("cluster secret"), "{why}")
        }
        Err(e) => panic!("expected an authentication failure, got {e}"),
        Ok(_) => panic!("connected over xdp without the cluster secret"),
    }
    assert!(server.stats().auth_failures >= 1);
    drop(stranger);
    let client = Endpoint::bind(
        EndpointConfig::new()
            .op_timeout(Duration::from_secs(60))
            .secret(secret())
            .datagram_integrity(true),
    )
    .unwrap();
    let conn = client
        .connect(&format!("xdp://pfs-b0/{SERVER_IP}:{port}"))
        .unwrap();
    transfer_byte_exact(&conn, &client, &server, 8 << 20);
    assert_eq!(
        server.stats().integrity_failures + client.stats().integrity_failures,
        0
    );
}

#[test]
fn xdp_and_udp_peers_interoperate() {
    if !two_hosts() {
        return;
    }
    let _g = conformance::hold(xdp(Mode::ThreadBlock));
    // An xdp server, a udp client.
    let (server, client, conn) = pair_with(|c| c, |port| format!("udp://{SERVER_IP}:{port}"));
    transfer_byte_exact(&conn, &client, &server, 8 << 20);
    drop((conn, client, server));
    // A udp server, an xdp client.
    enter(Side::Server);
    let server =
        Endpoint::bind(EndpointConfig::new().listen("udp://198.18.0.1:0").unwrap()).unwrap();
    let port = server.local_addrs()[0].socket_addr().port();
    enter(Side::Client);
    let client = Endpoint::bind(EndpointConfig::new()).unwrap();
    let conn = client
        .connect(&format!("xdp://pfs-b0/{SERVER_IP}:{port}"))
        .unwrap();
    transfer_byte_exact(&conn, &client, &server, 8 << 20);
    conn.send(b"over the same wire").unwrap().wait().unwrap();
}

#[test]
fn ping_and_other_ports_keep_working_while_bound() {
    if !two_hosts() {
        return;
    }
    let _g = conformance::hold(xdp(Mode::ThreadBlock));
    let (server, _client, conn) =
        pair_with(|c| c, |port| format!("xdp://pfs-b0/{SERVER_IP}:{port}"));
    // A kernel UDP socket on another port of the server host.
    enter(Side::Server);
    let echo = UdpSocket::bind("198.18.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = echo.recv_from(&mut buf).unwrap();
        echo.send_to(&buf[..n], from).unwrap();
    });
    enter(Side::Client);
    let s = UdpSocket::bind("198.18.0.2:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(b"kernel path", echo_addr).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = s.recv_from(&mut buf).expect("the kernel socket answers");
    assert_eq!(&buf[..n], b"kernel path");
    t.join().unwrap();
    let ping = Command::new("ping")
        .args(["-c", "2", "-W", "2", "-q", SERVER_IP])
        .output()
        .expect("run ping");
    assert!(
        ping.status.success(),
        "ping failed while the transport is bound"
    );
    // And the transport itself still works.
    conn.send(b"still here").unwrap().wait().unwrap();
    assert!(server.stats().connections_opened >= 1);
}

fn xdp_attached(ns: &str, dev: &str) -> bool {
    let out = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{ns}"),
            "ip",
            "-d",
            "link",
            "show",
            "dev",
            dev,
        ])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

#[test]
fn nothing_stays_attached_after_drop_or_kill() {
    if !two_hosts() {
        return;
    }
    let f = conformance::hold(xdp(Mode::ThreadBlock));
    {
        let (_s, _c, _conn) = pair_with(|c| c, |port| format!("xdp://pfs-b0/{SERVER_IP}:{port}"));
        assert!(xdp_attached("pfs-a", "pfs-a0"));
        assert!(xdp_attached("pfs-b", "pfs-b0"));
    }
    assert!(!xdp_attached("pfs-a", "pfs-a0"), "detached on drop");
    assert!(!xdp_attached("pfs-b", "pfs-b0"), "detached on drop");
    // A server process killed with SIGKILL leaves nothing behind either.
    let (mut child, _addr, _key) =
        conformance::spawn_server_process(&f, "thread_block::serve_helper");
    assert!(xdp_attached("pfs-a", "pfs-a0"));
    child.0.kill().unwrap();
    let _ = child.0.wait();
    let mut gone = false;
    for _ in 0..50 {
        if !xdp_attached("pfs-a", "pfs-a0") {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone, "the XDP program outlived its killed process");
}

#[test]
fn bad_input_gets_clear_errors() {
    if !two_hosts() {
        return;
    }
    let _g = conformance::hold(xdp(Mode::ThreadBlock));
    enter(Side::Server);
    let e = Endpoint::bind(
        EndpointConfig::new()
            .listen("xdp://pfs-nosuch0/198.18.0.1:0")
            .unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no interface"), "{e}");
    let e = Endpoint::bind(
        EndpointConfig::new()
            .listen("xdp://pfs-a0/198.18.0.1:0")
            .unwrap()
            .mtu(9000),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("MTU"), "{e}");
    // A second xdp endpoint on the same interface in this process.
    let first = Endpoint::bind(
        EndpointConfig::new()
            .listen("xdp://pfs-a0/198.18.0.1:0")
            .unwrap(),
    )
    .unwrap();
    let e = Endpoint::bind(
        EndpointConfig::new()
            .listen("xdp://pfs-a0/198.18.0.1:0")
            .unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already carries an xdp endpoint"), "{e}");
    drop(first);
}

/// Puts the topology back at MTU 1500 when dropped, whatever happened.
struct Mtu1500;

impl Drop for Mtu1500 {
    fn drop(&mut self) {
        let _ = Command::new(topology())
            .args(["up", "--mtu", "1500", "--queues", "2"])
            .output();
    }
}

#[test]
fn jumbo_frames_span_several_umem_frames() {
    if !two_hosts() {
        return;
    }
    let _g = conformance::hold(xdp(Mode::ThreadBlock));
    let _restore = Mtu1500;
    let out = Command::new(topology())
        .args(["up", "--mtu", "9000", "--queues", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = if cfg!(debug_assertions) {
        8 << 20
    } else {
        64 << 20
    };
    let jumbo = || {
        EndpointConfig::new()
            .mtu(9000)
            .op_timeout(Duration::from_secs(60))
    };
    init();
    enter(Side::Server);
    let server = Endpoint::bind(jumbo().listen("xdp://pfs-a0/198.18.0.1:0").unwrap()).unwrap();
    let described = server.describe().join(" ");
    assert!(described.contains("multi-buffer"), "{described}");
    let port = server.local_addrs()[0].socket_addr().port();
    enter(Side::Client);
    // xdp <-> xdp: 8972-byte datagrams, three 4 KiB UMEM frames each.
    let client = Endpoint::bind(jumbo()).unwrap();
    let conn = client
        .connect(&format!("xdp://pfs-b0/{SERVER_IP}:{port}"))
        .unwrap();
    transfer_byte_exact(&conn, &client, &server, total);
    drop((conn, client));
    // udp -> xdp at the same MTU: the kernel's 9000-byte frames arrive as chains.
    let client = Endpoint::bind(jumbo()).unwrap();
    let conn = client
        .connect(&format!("udp://{SERVER_IP}:{port}"))
        .unwrap();
    transfer_byte_exact(&conn, &client, &server, total);
}

#[test]
fn tcpdump_decodes_the_frames_with_correct_checksums() {
    if !two_hosts() {
        return;
    }
    let _g = conformance::hold(xdp(Mode::ThreadBlock));
    init();
    // A udp server: pfs-a0 has no XDP program, so the kernel (and tcpdump) sees every
    // frame the xdp client builds.
    enter(Side::Server);
    let server =
        Endpoint::bind(EndpointConfig::new().listen("udp://198.18.0.1:0").unwrap()).unwrap();
    let port = server.local_addrs()[0].socket_addr().port();
    let mut dump = conformance::ChildGuard(
        Command::new("nsenter")
            .args([
                "--net=/run/netns/pfs-a",
                // Never hang the suite: tcpdump stops after 6 frames or 15 s.
                "timeout",
                "15",
                "tcpdump",
                "-i",
                "pfs-a0",
                "-n",
                "-vv",
                "-l",
                "-c",
                "6",
                "udp",
                "and",
                "dst",
                "port",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run tcpdump"),
    );
    // tcpdump says "listening" on stderr once it captures.
    let err = dump.0.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(err));
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("listening"), "{first}");
    enter(Side::Client);
    let client = Endpoint::bind(EndpointConfig::new()).unwrap();
    let conn = client
        .connect(&format!("xdp://pfs-b0/{SERVER_IP}:{port}"))
        .unwrap();
    for _ in 0..6 {
        conn.send(b"decoded by tcpdump").unwrap().wait().unwrap();
    }
    let out = dump.0.wait_with_output_of_stdout();
    assert!(out.matches("udp sum ok").count() >= 6, "{out}");
    assert!(
        out.contains("flags [DF]") && out.contains("198.18.0.2."),
        "{out}"
    );
    assert!(
        !out.contains("bad udp cksum") && !out.contains("bad cksum"),
        "{out}"
    );
}

trait StdoutText {
    fn wait_with_output_of_stdout(&mut self) -> String;
}

impl StdoutText for std::process::Child {
    fn wait_with_output_of_stdout(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut o) = self.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        let _ = self.wait();
        s
    }
}
