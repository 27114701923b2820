//! An on-path attacker between a udp client and server: a relay that forwards every
//! datagram, and also duplicates, replays old datagrams with valid connection ids and
//! packet numbers, reorders, and (with per-datagram integrity on) alters and forges
//! them. Every byte the client writes and reads back must be right, every message must
//! arrive once, intact and in order, and the attacks must be seen and dropped by the
//! protocol (duplicates, integrity failures).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pfs_transport::{Endpoint, EndpointConfig, Rights, Secret};

#[derive(Default)]
struct Tally {
    forwarded: AtomicU64,
    duplicated: AtomicU64,
    replayed: AtomicU64,
    reordered: AtomicU64,
    altered: AtomicU64,
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }
}

/// Relay between the client (whoever writes to the relay first) and `server`, until
/// `stop`. `alter`: also flip bits in DATA datagrams and send altered copies.
fn relay(
    server: SocketAddr,
    alter: bool,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut client: Option<SocketAddr> = None;
        let mut history: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut held: Option<(SocketAddr, Vec<u8>)> = None;
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let to = if from == server {
                match client {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                client = Some(from);
                server
            };
            let d = buf[..n].to_vec();
            let send = |d: &[u8]| {
                let _ = sock.send_to(d, to);
            };
            // Reorder: hold this one back until after the next.
            if held.is_none() && rng.chance(30) {
                held = Some((to, d.clone()));
                t.reordered.fetch_add(1, Ordering::Relaxed);
            } else {
                send(&d);
                t.forwarded.fetch_add(1, Ordering::Relaxed);
                if let Some((hto, hd)) = held.take() {
                    let _ = sock.send_to(&hd, hto);
                }
            }
            if rng.chance(30) {
                send(&d);
                t.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            // Replay a datagram seen earlier, to the side it was meant for.
            if !history.is_empty() && rng.chance(30) {
                let (rto, rd) = &history[rng.next() as usize % history.len()];
                let _ = sock.send_to(rd, *rto);
                t.replayed.fetch_add(1, Ordering::Relaxed);
            }
            // A DATA datagram (type 3) with one bit changed past its 12-byte prefix.
            if alter && d.len() > 16 && d[1] == 3 && rng.chance(50) {
                let mut x = d.clone();
                let at = 12 + rng.next() as usize % (x.len() - 12);
                x[at] ^= 1 << (rng.next() % 8);
                send(&x);
                t.altered.fetch_add(1, Ordering::Relaxed);
            }
            if history.len() < 256 {
                history.push((to, d));
            } else {
                let i = rng.next() as usize % history.len();
                history[i] = (to, d);
            }
        }
    });
    (addr, h)
}

fn attacked_run(integrity: bool) -> (pfs_transport::Stats, Arc<Tally>) {
    let secret = || Secret::from_bytes(b"on-path-test-cluster-secret").unwrap();
    let base = |c: EndpointConfig| {
        if integrity {
            c.secret(secret()).datagram_integrity(true)
        } else {
            c
        }
    };
    let srv = Endpoint::bind(base(
        EndpointConfig::new()
            .listen("udp://127.0.0.1:0")
            .unwrap()
            .op_timeout(Duration::from_secs(20)),
    ))
    .unwrap();
    let region = srv.alloc_region(1 << 20, Rights::ALL).unwrap();
    let key = region.key(Rights::ALL).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let (via, relay_thread) = relay(
        srv.local_addrs()[0].socket_addr(),
        integrity,
        stop.clone(),
        tally.clone(),
    );
    let cli = Endpoint::bind(base(
        EndpointConfig::new()
            .op_timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(10)),
    ))
    .unwrap();
    let conn = cli.connect(&format!("udp://{via}")).unwrap();
    let accepted = srv
        .accept_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let local = cli.alloc_region(1 << 20, Rights::ALL).unwrap();
    let back = cli.alloc_region(1 << 20, Rights::ALL).unwrap();
    let mut rng = Rng(42);
    for round in 0..12u64 {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        local.write_at(0, &data).unwrap();
        conn.write(&local, 0, &key, 0, 1 << 20)
            .unwrap()
            .wait()
            .unwrap();
        conn.read(&back, 0, &key, 0, 1 << 20)
            .unwrap()
            .wait()
            .unwrap();
        assert!(
            back.to_vec(0, 1 << 20).unwrap() == data,
            "round {round}: the bytes read back differ from those written"
        );
        assert!(region.to_vec(0, 1 << 20).unwrap() == data, "round {round}");
        // A burst of messages, some longer than a datagram: each arrives once, intact,
        // in the order sent, however the relay duplicates, replays and reorders them.
        let msg = |i: usize| -> Vec<u8> {
            let mut m = format!("round {round} message {i} ").into_bytes();
            m.resize(m.len() + [0, 100, 3000, 9000][i % 4], i as u8);
            m
        };
        let sends: Vec<_> = (0..16).map(|i| conn.send(&msg(i)).unwrap()).collect();
        for s in sends {
            s.wait().unwrap();
        }
        for i in 0..16 {
            let got = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(
                got.as_deref() == Some(&msg(i)[..]),
                "round {round}: message {i} is missing, out of order or altered"
            );
        }
    }
    assert_eq!(
        accepted.try_recv().unwrap(),
        None,
        "a message arrived twice"
    );
    stop.store(true, Ordering::Relaxed);
    relay_thread.join().unwrap();
    let mut s = srv.stats();
    let c = cli.stats();
    s.drops += c.drops;
    s.integrity_failures += c.integrity_failures;
    (s, tally)
}

fn print(what: &str, s: &pfs_transport::Stats, t: &Tally) {
    println!(
        "{what}: relayed {} datagrams, duplicated {}, replayed {}, reordered {}, altered {}; \
         dropped {}, integrity failures {}",
        t.forwarded.load(Ordering::Relaxed),
        t.duplicated.load(Ordering::Relaxed),
        t.replayed.load(Ordering::Relaxed),
        t.reordered.load(Ordering::Relaxed),
        t.altered.load(Ordering::Relaxed),
        s.drops,
        s.integrity_failures
    );
}

#[test]
fn replayed_duplicated_and_reordered_datagrams_change_nothing() {
    let (s, t) = attacked_run(false);
    print("without integrity", &s, &t);
    assert!(t.replayed.load(Ordering::Relaxed) > 100);
    assert!(t.reordered.load(Ordering::Relaxed) > 100);
    assert!(s.drops > 100, "the replays were seen and dropped");
}

#[test]
fn with_integrity_altered_datagrams_are_dropped_too() {
    let (s, t) = attacked_run(true);
    print("with integrity", &s, &t);
    assert!(t.altered.load(Ordering::Relaxed) > 100);
    assert!(
        s.integrity_failures >= t.altered.load(Ordering::Relaxed) / 2,
        "altered datagrams fail their tag"
    );
}
