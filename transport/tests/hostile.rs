//! A server under attack: while raw peers flood it with connection attempts and send
//! forged, truncated, oversized and out-of-bounds messages over tcp and garbage, replayed
//! and mutated datagrams over udp, an honest client keeps writing and reading with every
//! byte verified. Afterwards the region the attackers aimed at and the canary regions
//! allocated around it are unchanged, the refusals are counted, and the server still
//! takes new connections. Nothing panics.

mod conformance;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pfs_transport::wire::{Body, Header, MAX_HEADER_LEN, Target};
use pfs_transport::{Address, Connection, Endpoint, EndpointConfig, Region, RegionKey, Rights};

const ATTACK: Duration = Duration::from_secs(3);

fn hello() -> Vec<u8> {
    conformance::encode(&Header {
        op_id: 0,
        payload_len: 0,
        body: Body::Hello {
            min_version: 1,
            max_version: 1,
            endpoint: 0xbad,
            max_payload: 1 << 20,
            features: 0,
        },
    })
}

use conformance::target_of;

fn write_msg(t: Target, op_id: u64, op_len: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = conformance::encode(&Header {
        op_id,
        payload_len: payload.len() as u32,
        body: Body::Write {
            target: t,
            op_len,
            op_off: 0,
            notify: None,
        },
    });
    m.extend_from_slice(payload);
    m
}

/// Forged and malformed messages on one raw tcp connection, after a valid HELLO.
fn tcp_forgeries(victim: &RegionKey) -> Vec<Vec<u8>> {
    let len = victim.len();
    let good = target_of(victim, 0);
    let mut bad_token = good;
    bad_token.token[3] ^= 0x5a;
    let mut other_region = good;
    other_region.region ^= 0xffff;
    let evil = [0xee_u8; 64];
    vec![
        write_msg(bad_token, 1, 64, &evil),
        write_msg(other_region, 2, 64, &evil),
        write_msg(target_of(victim, len - 8), 3, 64, &evil),
        write_msg(target_of(victim, u64::MAX - 16), 4, 64, &evil),
        write_msg(target_of(victim, len), 5, 1, &evil[..1]),
        conformance::encode(&Header {
            op_id: 6,
            payload_len: 0,
            body: Body::Read {
                target: target_of(victim, len - 1),
                len: 2,
            },
        }),
        conformance::encode(&Header {
            op_id: 7,
            payload_len: 0,
            body: Body::Cas {
                target: target_of(victim, 3),
                expected: 0,
                new: u64::MAX,
            },
        }),
        conformance::encode(&Header {
            op_id: 8,
            payload_len: 0,
            body: Body::Faa {
                target: bad_token,
                add: 1,
            },
        }),
        // Last: a payload far beyond the announced limit (the target closes).
        write_msg(good, 9, 1 << 40, &[])
            .into_iter()
            .take(MAX_HEADER_LEN)
            .collect(),
    ]
}

fn tcp_attacker(addr: std::net::SocketAddr, victim: RegionKey, stop: Arc<AtomicBool>) -> u64 {
    let mut attempts = 0u64;
    // Connections that never say anything (the handshake deadline must reap them).
    let mut silent = Vec::new();
    for _ in 0..32 {
        if let Ok(s) = TcpStream::connect(addr) {
            silent.push(s);
        }
    }
    let forged = tcp_forgeries(&victim);
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        attempts += 1;
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let _ = s.set_nodelay(true);
        match round % 4 {
            // Forgeries after a valid HELLO, then read whatever comes back.
            0 | 1 => {
                let _ = s.write_all(&hello());
                for m in &forged {
                    let _ = s.write_all(m);
                }
            }
            // A truncated header, then close.
            2 => {
                let _ = s.write_all(&hello());
                let _ = s.write_all(&forged[0][..10]);
            }
            // Garbage instead of a HELLO.
            _ => {
                let _ = s.write_all(&[0x42; 300]);
            }
        }
        let mut sink = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_millis(100);
        while Instant::now() < deadline {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    drop(silent);
    attempts
}

/// The INIT a real client sends, captured on a plain UDP socket.
fn capture_init() -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sock.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let ep = Endpoint::bind(EndpointConfig::new().connect_timeout(Duration::from_millis(300)))
            .unwrap();
        let _ = ep.connect(&format!("udp://127.0.0.1:{port}"));
    });
    let mut buf = vec![0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).expect("the client sends an INIT");
    t.join().unwrap();
    buf.truncate(n);
    buf
}

fn udp_attacker(addr: std::net::SocketAddr, init: Vec<u8>, stop: Arc<AtomicBool>) -> u64 {
    let mut sent = 0u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let socks: Vec<UdpSocket> = (0..16)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    while !stop.load(Ordering::Relaxed) {
        for s in &socks {
            // A flood of connection attempts: the captured INIT, replayed from many
            // ports; then mutated, truncated and random datagrams.
            let _ = s.send_to(&init, addr);
            let mut m = init.clone();
            let i = (rnd() as usize) % m.len();
            m[i] ^= (rnd() as u8) | 1;
            let _ = s.send_to(&m, addr);
            let cut = (rnd() as usize) % init.len();
            let _ = s.send_to(&init[..cut], addr);
            let junk: Vec<u8> = (0..(rnd() % 1400) as usize).map(|_| rnd() as u8).collect();
            let _ = s.send_to(&junk, addr);
            sent += 4;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    sent
}

/// Write and read back random chunks of `region` (on the server) until `stop`; every
/// byte is checked. Returns the verified round trips.
fn honest(client: &Endpoint, conn: &Connection, key: &RegionKey, stop: &AtomicBool) -> u64 {
    let local = client.alloc_region(8192, Rights::ALL).unwrap();
    let back = client.alloc_region(8192, Rights::ALL).unwrap();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let data = conformance::pattern(n + 1, 8192);
        local.write_at(0, &data).unwrap();
        let off = (n * 8192) % (key.len() - 8192);
        conn.write(&local, 0, key, off, 8192)
            .and_then(|o| o.wait())
            .unwrap_or_else(|e| panic!("honest write {n} failed during the attack: {e}"));
        conn.read(&back, 0, key, off, 8192)
            .and_then(|o| o.wait())
            .unwrap_or_else(|e| panic!("honest read {n} failed during the attack: {e}"));
        assert_eq!(back.to_vec(0, 8192).unwrap(), data, "round trip {n}");
        n += 1;
    }
    n
}

struct Canaries {
    regions: Vec<(Region, u64)>,
}

impl Canaries {
    /// Regions allocated right before and after the victim, filled with a pattern.
    fn around(server: &Endpoint, victim_len: usize) -> (Canaries, Region) {
        let mk = |seed: u64| {
            let r = server.alloc_region(1 << 20, Rights::ALL).unwrap();
            conformance::fill_pattern(&r, seed);
            let sum = conformance::checksum(&r);
            (r, sum)
        };
        let before = mk(101);
        let victim = server.alloc_region(victim_len, Rights::ALL).unwrap();
        conformance::fill_pattern(&victim, 7);
        let after = mk(202);
        (
            Canaries {
                regions: vec![before, after],
            },
            victim,
        )
    }

    fn check(&self) {
        for (r, sum) in &self.regions {
            assert_eq!(conformance::checksum(r), *sum, "a canary region changed");
        }
    }
}

#[test]
fn an_honest_client_is_served_exactly_while_the_server_is_attacked() {
    let server = Endpoint::bind(
        EndpointConfig::new()
            .listen("tcp://127.0.0.1:0")
            .unwrap()
            .listen("udp://127.0.0.1:0")
            .unwrap()
            .connect_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let addrs = server.local_addrs();
    let tcp = addrs
        .iter()
        .find(|a| a.to_string().starts_with("tcp"))
        .unwrap();
    let udp = addrs
        .iter()
        .find(|a| a.to_string().starts_with("udp"))
        .unwrap();
    let (canaries, victim) = Canaries::around(&server, 64 << 10);
    let victim_sum = conformance::checksum(&victim);
    let victim_key = victim.key(Rights::ALL).unwrap();
    // One region per honest client, so that their round trips never overlap.
    let honest_regions: Vec<Region> = (0..2)
        .map(|_| server.alloc_region(1 << 20, Rights::ALL).unwrap())
        .collect();
    let honest_keys: Vec<RegionKey> = honest_regions
        .iter()
        .map(|r| r.key(Rights::ALL).unwrap())
        .collect();

    // The application keeps accepting (and holding) whatever connects.
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(c)) = server.accept_timeout(Duration::from_millis(20)) {
                    held.push(c);
                }
            }
            held.len()
        })
    };
    let init = capture_init();
    let clients: Vec<(Endpoint, Connection)> = [tcp, udp]
        .iter()
        .map(|a: &&Address| {
            let ep =
                Endpoint::bind(EndpointConfig::new().op_timeout(Duration::from_secs(20))).unwrap();
            let c = ep.connect_addr(a).unwrap();
            (ep, c)
        })
        .collect();

    let attack_stop = Arc::new(AtomicBool::new(false));
    let t_tcp = {
        let (a, k, s) = (tcp.socket_addr(), victim_key.clone(), attack_stop.clone());
        std::thread::spawn(move || tcp_attacker(a, k, s))
    };
    let t_udp = {
        let (a, s) = (udp.socket_addr(), attack_stop.clone());
        std::thread::spawn(move || udp_attacker(a, init, s))
    };
    let honest_stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = clients
        .into_iter()
        .zip(honest_keys.clone())
        .map(|((ep, c), k)| {
            let s = honest_stop.clone();
            std::thread::spawn(move || {
                let n = honest(&ep, &c, &k, &s);
                (c.backend().to_string(), n)
            })
        })
        .collect();
    std::thread::sleep(ATTACK);
    attack_stop.store(true, Ordering::Relaxed);
    honest_stop.store(true, Ordering::Relaxed);
    let tcp_attempts = t_tcp.join().expect("tcp attacker");
    let udp_datagrams = t_udp.join().expect("udp attacker");
    for w in workers {
        let (backend, n) = w.join().expect("an honest client failed");
        eprintln!("{backend}: {n} verified 8 KiB round trips during the attack");
        assert!(
            n > 10,
            "{backend}: the honest client was starved ({n} round trips)"
        );
    }
    eprintln!("attack: {tcp_attempts} hostile tcp connections, {udp_datagrams} hostile datagrams");

    assert_eq!(
        conformance::checksum(&victim),
        victim_sum,
        "the attacked region changed"
    );
    canaries.check();
    let s = server.stats();
    eprintln!(
        "server: {} remote ops refused, {} protocol errors, {} drops, {} handshakes refused",
        s.remote_ops_refused, s.protocol_errors, s.drops, s.handshakes_refused
    );
    assert!(
        s.remote_ops_refused > 0,
        "forged accesses were refused and counted"
    );
    assert!(s.protocol_errors > 0, "malformed input was counted");
    assert!(
        s.handshakes_refused > 0,
        "the connection flood from one address was capped"
    );

    // Still serving: a fresh client on each backend, once the flood's half-open
    // handshakes from this address have passed their deadline (the server's
    // connect_timeout, 500 ms here; they fill its per-address handshake quota until then).
    std::thread::sleep(Duration::from_millis(1500));
    for (i, a) in [tcp, udp].into_iter().enumerate() {
        let ep = Endpoint::bind(EndpointConfig::new()).unwrap();
        let c = ep.connect_addr(a).unwrap();
        let local = ep.alloc_region(64, Rights::ALL).unwrap();
        local.fill(0, 64, 0x77).unwrap();
        c.write(&local, 0, &honest_keys[i], 0, 64)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(honest_regions[i].to_vec(0, 64).unwrap(), vec![0x77; 64]);
    }
    stop.store(true, Ordering::Relaxed);
    acceptor.join().unwrap();
}
