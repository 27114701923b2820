//! The backend conformance suite: one set of semantic tests, run against every backend.
//!
//! A backend provides a [`Fixture`] (how to make endpoints, how to send raw garbage to a
//! listener, how large a "large" transfer is) and stamps the suite out with
//! [`conformance_suite!`]. Every test states one clause of the contract in
//! `pfs_transport`'s crate docs.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pfs_transport::{
    Connection, Endpoint, EndpointConfig, Error, KeyOptions, Progress, Region, RegionKey, Rights,
    WaitMode,
};

/// A header's wire bytes, for raw peers.
pub fn encode(h: &pfs_transport::wire::Header) -> Vec<u8> {
    let mut b = [0u8; pfs_transport::wire::MAX_HEADER_LEN];
    let n = h.encode(&mut b);
    b[..n].to_vec()
}

/// Read one message (header and payload) from a raw stream.
pub fn read_message(s: &mut std::net::TcpStream) -> (pfs_transport::wire::Header, Vec<u8>) {
    use pfs_transport::wire::{DecodeError, Header, Limits, PREFIX_LEN};
    use std::io::Read;
    let mut b = vec![0u8; PREFIX_LEN];
    s.read_exact(&mut b).unwrap();
    loop {
        match Header::decode(&b, &Limits::default()) {
            Ok((h, _)) => {
                let mut p = vec![0u8; h.payload_len as usize];
                s.read_exact(&mut p).unwrap();
                return (h, p);
            }
            Err(DecodeError::Incomplete { need }) => {
                let have = b.len();
                b.resize(need, 0);
                s.read_exact(&mut b[have..]).unwrap();
            }
            Err(e) => panic!("bad header from the endpoint: {e}"),
        }
    }
}

/// How the endpoints of a test are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Both sides: progress thread, sleeping waits.
    ThreadBlock,
    /// Client: caller-driven busy-poll; server: progress thread.
    CallerBusy,
    /// Both sides: spinning progress threads.
    ThreadBusy,
}

/// What a backend provides to the suite.
pub struct Fixture {
    /// Backend name for messages.
    pub name: &'static str,
    /// Listen address for servers (port 0).
    pub listen: &'static str,
    /// Progress mode.
    pub mode: Mode,
    /// Bytes moved by the large-transfer test.
    pub large: usize,
    /// Send raw bytes to a listening address (garbage test); returns what came back
    /// before the peer closed, or `None` if the backend has no such notion.
    pub raw_garbage: fn(&pfs_transport::Address, &[u8]) -> Option<Vec<u8>>,
    /// Extra settings for both sides (e.g. zero-copy sends).
    pub tweak: fn(EndpointConfig) -> EndpointConfig,
    /// Called on the test thread before a server or client endpoint is created, so it
    /// can enter that side's network namespace (two-host tests).
    pub enter: fn(Side),
    /// The address a client connects to for a server address: the first client of a
    /// test (`0`), or another one at the same time (`1`; AF_XDP allows one xdp endpoint
    /// per interface per process, so those come over udp).
    pub dial: fn(&pfs_transport::Address, usize) -> String,
    /// Tests of this fixture share something (an interface) and run one at a time.
    pub serial: bool,
}

/// A fixture for the length of one test, holding the lock of serial fixtures.
pub struct Held {
    f: Fixture,
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

impl std::ops::Deref for Held {
    type Target = Fixture;
    fn deref(&self) -> &Fixture {
        &self.f
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn hold(f: Fixture) -> Held {
    let g = f
        .serial
        .then(|| SERIAL.lock().unwrap_or_else(|e| e.into_inner()));
    Held { f, _serial: g }
}

/// Which host a two-host test is about to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// `dial` for single-host backends: the server's own address.
pub fn same_address(a: &pfs_transport::Address, _: usize) -> String {
    a.to_string()
}

/// `enter` for single-host backends.
pub fn stay(_: Side) {}

/// `raw_garbage` for the datagram backends: one raw datagram from a kernel UDP socket
/// bound to `bind`, and whatever comes back for a moment. Datagram backends answer
/// garbage with silence (or a RESET, reported as nothing), never text.
pub fn udp_garbage(bind: &str, addr: &pfs_transport::Address, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = std::net::UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let n = bytes.len().min(1400);
    s.send_to(&bytes[..n], addr.socket_addr()).unwrap();
    let mut buf = vec![0u8; 2048];
    let reply = match s.recv_from(&mut buf) {
        Ok((k, _)) => buf[..k].to_vec(),
        Err(_) => Vec::new(),
    };
    Some(if reply.first() == Some(&1) {
        Vec::new()
    } else {
        reply
    })
}

/// A connected pair of endpoints.
pub struct Pair {
    pub server: Endpoint,
    pub client: Endpoint,
    /// Client side of the connection.
    pub conn: Connection,
    /// Server side of the connection.
    pub peer: Connection,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PFS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Fixture {
    pub fn server_config(&self) -> EndpointConfig {
        let c = EndpointConfig::new()
            .listen(self.listen)
            .unwrap()
            .op_timeout(Duration::from_secs(20));
        let c = match self.mode {
            Mode::ThreadBusy => c.wait_mode(WaitMode::BusyPoll),
            _ => c,
        };
        (self.tweak)(c)
    }

    pub fn client_config(&self) -> EndpointConfig {
        let c = EndpointConfig::new().op_timeout(Duration::from_secs(20));
        let c = match self.mode {
            Mode::ThreadBlock => c,
            Mode::CallerBusy => c.progress(Progress::Caller).wait_mode(WaitMode::BusyPoll),
            Mode::ThreadBusy => c.wait_mode(WaitMode::BusyPoll),
        };
        (self.tweak)(c)
    }

    pub fn server(&self) -> Endpoint {
        init_tracing();
        (self.enter)(Side::Server);
        Endpoint::bind(self.server_config()).expect("server bind")
    }

    pub fn client(&self) -> Endpoint {
        (self.enter)(Side::Client);
        Endpoint::bind(self.client_config()).expect("client bind")
    }

    pub fn connect(&self, server: &Endpoint, client: &Endpoint) -> (Connection, Connection) {
        self.connect_nth(server, client, 0)
    }

    /// Connect the `nth` client endpoint alive at the same time (see [`Fixture::dial`]).
    pub fn connect_nth(
        &self,
        server: &Endpoint,
        client: &Endpoint,
        nth: usize,
    ) -> (Connection, Connection) {
        (self.enter)(Side::Client);
        let addr = (self.dial)(&server.local_addrs()[0], nth);
        let conn = client.connect(&addr).expect("connect");
        let peer = server
            .accept_timeout(Duration::from_secs(10))
            .expect("accept")
            .expect("accept timed out");
        assert_eq!(conn.peer_id(), server.id());
        assert_eq!(peer.peer_id(), client.id());
        (conn, peer)
    }

    pub fn pair(&self) -> Pair {
        self.pair_with(|c| c)
    }

    /// A pair whose configurations pass through `f` first.
    pub fn pair_with(&self, f: impl Fn(EndpointConfig) -> EndpointConfig) -> Pair {
        init_tracing();
        (self.enter)(Side::Server);
        let server = Endpoint::bind(f(self.server_config())).expect("server bind");
        (self.enter)(Side::Client);
        let client = Endpoint::bind(f(self.client_config())).expect("client bind");
        let (conn, peer) = self.connect(&server, &client);
        Pair {
            server,
            client,
            conn,
            peer,
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Fill a region with `pattern(seed)` in chunks.
pub fn fill_pattern(r: &Region, seed: u64) {
    let chunk = 16 << 20;
    let mut off = 0;
    while off < r.len() {
        let n = chunk.min(r.len() - off);
        r.write_at(off, &pattern(seed.wrapping_add(off as u64), n))
            .unwrap();
        off += n;
    }
}

/// FNV-1a over 8-byte words (fast enough for a GiB in release builds).
pub fn checksum(r: &Region) -> u64 {
    let chunk = 16 << 20;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; chunk];
    let mut off = 0;
    while off < r.len() {
        let n = chunk.min(r.len() - off);
        r.read_at(off, &mut buf[..n]).unwrap();
        for w in buf[..n].chunks(8) {
            let mut a = [0u8; 8];
            a[..w.len()].copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(a)).wrapping_mul(0x100_0000_01b3);
        }
        off += n;
    }
    h
}

/// A key with one field changed, to get past the initiator's own checks and prove the
/// target checks too.
pub fn forge(key: &RegionKey, f: impl FnOnce(&mut Vec<u8>)) -> RegionKey {
    let mut b = key.to_bytes();
    f(&mut b);
    RegionKey::from_bytes(&b).unwrap()
}

/// Byte offsets in the key encoding (see `RegionKey::to_bytes`).
pub const KEY_LEN_AT: usize = 17;
pub const KEY_RIGHTS_AT: usize = 25;
pub const KEY_TOKEN_AT: usize = 26;

/// Where `key` points at `offset`, as the wire names it (raw peers forge with it).
pub fn target_of(key: &RegionKey, offset: u64) -> pfs_transport::wire::Target {
    let mut token = [0u8; pfs_transport::wire::TOKEN_LEN];
    let at = KEY_TOKEN_AT;
    token.copy_from_slice(&key.to_bytes()[at..at + pfs_transport::wire::TOKEN_LEN]);
    pfs_transport::wire::Target {
        region: key.region(),
        offset,
        token,
    }
}

// ---------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------

pub fn write_read_at_offsets(f: &Fixture) {
    let p = f.pair();
    let len = 64 << 10;
    let target = p.server.alloc_region(len, Rights::ALL).unwrap();
    let key = target.key(Rights::READ | Rights::WRITE).unwrap();
    let local = p.client.alloc_region(len, Rights::ALL).unwrap();
    let data = pattern(1, len);
    local.write_at(0, &data).unwrap();
    // First byte, last byte, a middle range, the whole region.
    for (off, n) in [
        (0u64, 1u64),
        (len as u64 - 1, 1),
        (1000, 3000),
        (0, len as u64),
    ] {
        target.fill(0, len, 0).unwrap();
        p.conn
            .write(&local, off, &key, off, n)
            .unwrap()
            .wait()
            .unwrap();
        let got = target.to_vec(off as usize, n as usize).unwrap();
        assert_eq!(
            got,
            &data[off as usize..(off + n) as usize],
            "write at {off}+{n}"
        );
        // Nothing outside the range was touched.
        if off > 0 {
            assert_eq!(target.to_vec(off as usize - 1, 1).unwrap(), [0]);
        }
        if off + n < len as u64 {
            assert_eq!(target.to_vec((off + n) as usize, 1).unwrap(), [0]);
        }
        let back = p.client.alloc_region(len, Rights::ALL).unwrap();
        p.conn
            .read(&back, off, &key, off, n)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(
            back.to_vec(off as usize, n as usize).unwrap(),
            &data[off as usize..(off + n) as usize],
            "read at {off}+{n}"
        );
    }
    // Source and destination offsets differ.
    target.fill(0, len, 0).unwrap();
    p.conn
        .write(&local, 7, &key, 4093, 100)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(target.to_vec(4093, 100).unwrap(), &data[7..107]);
    let s = p.conn.stats();
    assert!(
        s.ops_completed >= 9 && s.bytes_written > 0 && s.bytes_read > 0,
        "{s:?}"
    );
    if p.conn.backend() == pfs_transport::BackendKind::Rdma {
        // One-sided for real: the target's CPU placed nothing, its NIC did.
        assert_eq!(p.server.stats().bytes_placed, 0);
    } else {
        assert!(p.server.stats().bytes_placed > 0);
    }
}

/// Run `op` expecting `check(err)`, and verify the target region is unchanged.
fn refused(
    target: &Region,
    what: &str,
    r: pfs_transport::Result<()>,
    check: impl Fn(&Error) -> bool,
) {
    let before = checksum(target);
    match r {
        Ok(()) => panic!("{what}: succeeded but must be refused"),
        Err(e) => assert!(check(&e), "{what}: wrong error {e:?}"),
    }
    assert_eq!(checksum(target), before, "{what}: target memory changed");
}

pub fn bad_accesses_are_refused(f: &Fixture) {
    let p = f.pair();
    let len = 4096;
    let target = p.server.alloc_region(len, Rights::ALL).unwrap();
    fill_pattern(&target, 9);
    let rw = target.key(Rights::READ | Rights::WRITE).unwrap();
    let ro = target.key(Rights::READ).unwrap();
    let local = p.client.alloc_region(len, Rights::ALL).unwrap();
    fill_pattern(&local, 10);
    let c = &p.conn;
    let wr = |k: &RegionKey, off: u64, n: u64| c.write(&local, 0, k, off, n).and_then(|o| o.wait());
    let rd = |k: &RegionKey, off: u64, n: u64| c.read(&local, 0, k, off, n).and_then(|o| o.wait());
    let oob = |e: &Error| matches!(e, Error::OutOfBounds { .. });
    let denied = |e: &Error| matches!(e, Error::AccessDenied { .. });

    // Checked by the initiator already.
    refused(&target, "write past the end", wr(&rw, 4000, 97), oob);
    refused(
        &target,
        "offset+len overflow",
        wr(&rw, u64::MAX - 1, 4),
        oob,
    );
    refused(&target, "read past the end", rd(&rw, 4096, 1), oob);
    refused(&target, "write with a read-only key", wr(&ro, 0, 8), denied);

    // Forged keys get past the initiator: the target must refuse them.
    let long = forge(&rw, |b| {
        b[KEY_LEN_AT..KEY_LEN_AT + 8].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    refused(
        &target,
        "forged length, write past the end",
        wr(&long, 4000, 200),
        oob,
    );
    refused(
        &target,
        "forged length, overflowing offset",
        wr(&long, u64::MAX - 100, 50),
        |e| matches!(e, Error::OutOfBounds { .. }),
    );
    refused(
        &target,
        "forged length, read past the end",
        rd(&long, 4095, 2),
        oob,
    );
    let escalated = forge(&ro, |b| b[KEY_RIGHTS_AT] = Rights::ALL.bits());
    refused(
        &target,
        "forged rights, write",
        wr(&escalated, 0, 16),
        denied,
    );
    refused(
        &target,
        "forged rights, atomic",
        c.fetch_add(&escalated, 0, 1)
            .and_then(|o| o.wait())
            .map(|_| ()),
        denied,
    );
    let bad_token = forge(&rw, |b| b[KEY_TOKEN_AT] ^= 0x55);
    refused(&target, "wrong token, write", wr(&bad_token, 0, 16), denied);
    refused(&target, "wrong token, read", rd(&bad_token, 0, 16), denied);

    // Revocation.
    let victim = target.key(Rights::READ | Rights::WRITE).unwrap();
    wr(&victim, 0, 8).expect("a fresh key works");
    fill_pattern(&target, 9);
    target.revoke(&victim).unwrap();
    refused(&target, "revoked key, write", wr(&victim, 0, 8), |e| {
        matches!(e, Error::Revoked)
    });
    refused(&target, "revoked key, read", rd(&victim, 0, 8), |e| {
        matches!(e, Error::Revoked)
    });
    // Other keys keep working.
    rd(&rw, 0, 8).expect("an unrevoked key still works");

    // Expiry.
    let short = target
        .key_with(KeyOptions::new(Rights::WRITE).expires_in(Duration::from_millis(50)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(120));
    refused(&target, "expired key", wr(&short, 0, 8), |e| {
        matches!(e, Error::Expired)
    });

    // Atomics: alignment and rights.
    let atomic = target.key(Rights::ATOMIC).unwrap();
    refused(
        &target,
        "misaligned atomic",
        c.fetch_add(&atomic, 4, 1)
            .and_then(|o| o.wait())
            .map(|_| ()),
        |e| matches!(e, Error::Misaligned { offset: 4 }),
    );
    refused(
        &target,
        "atomic past the end",
        c.compare_and_swap(&atomic, 4096, 0, 1)
            .and_then(|o| o.wait())
            .map(|_| ()),
        oob,
    );
    refused(
        &target,
        "atomic without the atomic right",
        c.fetch_add(&rw, 0, 1).and_then(|o| o.wait()).map(|_| ()),
        denied,
    );

    // A dropped region is gone for remote peers.
    let gone = p.server.alloc_region(64, Rights::ALL).unwrap();
    let gone_key = gone.key(Rights::WRITE).unwrap();
    drop(gone);
    match wr(&gone_key, 0, 8) {
        Err(Error::UnknownRegion { .. }) => {}
        other => panic!("write to a dropped region: {other:?}"),
    }

    // A key of another endpoint is refused locally.
    let other = Endpoint::bind(EndpointConfig::new()).unwrap();
    let foreign = other
        .alloc_region(64, Rights::ALL)
        .unwrap()
        .key(Rights::ALL)
        .unwrap();
    refused(
        &target,
        "key of another endpoint",
        wr(&foreign, 0, 8),
        denied,
    );

    // The connection survived every refusal.
    wr(&rw, 0, 8).expect("connection still works after refusals");
    // On rdma the target's CPU sees key requests, not accesses: once it has answered
    // for a key, the initiator refuses what that answer does not allow (bounds) itself.
    let min_refused = if c.backend() == pfs_transport::BackendKind::Rdma {
        8
    } else {
        10
    };
    assert!(p.server.stats().remote_ops_refused >= min_refused);
}

pub fn concurrent_fetch_add_sums_exactly(f: &Fixture) {
    let server = f.server();
    let target = server.alloc_region(4096, Rights::ALL).unwrap();
    let key = target.key(Rights::ATOMIC).unwrap();
    let per_client = 2000u64;
    let clients = 2;
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let key = key.clone();
            let client = f.client();
            let (conn, _peer) = f.connect_nth(&server, &client, i as usize);
            std::thread::spawn(move || {
                let mut olds = Vec::new();
                // Some in flight at once, some one by one.
                for chunk in 0..(per_client / 100) {
                    let ops: Vec<_> = (0..100)
                        .map(|_| conn.fetch_add(&key, 64, i + 1).unwrap())
                        .collect();
                    for o in ops {
                        olds.push(o.wait().unwrap());
                    }
                    let _ = chunk;
                }
                drop(_peer);
                olds
            })
        })
        .collect();
    let mut olds: Vec<u64> = Vec::new();
    for t in threads {
        olds.extend(t.join().unwrap());
    }
    let expected: u64 = (1..=clients).map(|i| i * per_client).sum();
    assert_eq!(target.load_u64(64).unwrap(), expected);
    // Every old value is distinct: no two adds saw the same state.
    olds.sort_unstable();
    olds.dedup();
    assert_eq!(olds.len() as u64, per_client * clients);
}

pub fn many_connections_at_once(f: &Fixture) {
    // One target, many initiators, each with its own stripe of the region.
    let server = f.server();
    let conns = 12usize;
    let stripe = 64 << 10;
    let target = server.alloc_region(conns * stripe, Rights::ALL).unwrap();
    let key = target.key(Rights::READ | Rights::WRITE).unwrap();
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let key = key.clone();
            let client = f.client();
            let (conn, peer) = f.connect_nth(&server, &client, i);
            std::thread::spawn(move || {
                let local = client.alloc_region(stripe, Rights::ALL).unwrap();
                let back = client.alloc_region(stripe, Rights::ALL).unwrap();
                let off = (i * stripe) as u64;
                for round in 0..20u64 {
                    let data = pattern(round * 100 + i as u64, stripe);
                    local.write_at(0, &data).unwrap();
                    conn.write(&local, 0, &key, off, stripe as u64)
                        .unwrap()
                        .wait()
                        .unwrap();
                    conn.read(&back, 0, &key, off, stripe as u64)
                        .unwrap()
                        .wait()
                        .unwrap();
                    assert_eq!(
                        back.to_vec(0, stripe).unwrap(),
                        data,
                        "conn {i} round {round}"
                    );
                }
                drop(peer);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(server.stats().connections_opened >= conns as u64);
}

pub fn cas_lock_excludes(f: &Fixture) {
    let server = f.server();
    let target = server.alloc_region(4096, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let rounds = 150;
    let clients = 2u64;
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let key = key.clone();
            let client = f.client();
            let (conn, peer) = f.connect_nth(&server, &client, i as usize);
            std::thread::spawn(move || {
                let buf = client.alloc_region(8, Rights::ALL).unwrap();
                let me = i + 1;
                for _ in 0..rounds {
                    // Acquire: CAS 0 -> me at offset 0.
                    while conn
                        .compare_and_swap(&key, 0, 0, me)
                        .unwrap()
                        .wait()
                        .unwrap()
                        != 0
                    {
                        std::thread::yield_now();
                    }
                    // Critical section: a non-atomic read-modify-write of offset 8.
                    conn.read(&buf, 0, &key, 8, 8).unwrap().wait().unwrap();
                    let v = u64::from_le_bytes(buf.to_vec(0, 8).unwrap().try_into().unwrap());
                    buf.write_at(0, &(v + 1).to_le_bytes()).unwrap();
                    conn.write(&buf, 0, &key, 8, 8).unwrap().wait().unwrap();
                    // Release.
                    let prev = conn
                        .compare_and_swap(&key, 0, me, 0)
                        .unwrap()
                        .wait()
                        .unwrap();
                    assert_eq!(
                        prev, me,
                        "lock held by someone else inside the critical section"
                    );
                }
                drop(peer);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(target.load_u64(0).unwrap(), 0);
    assert_eq!(target.load_u64(8).unwrap(), rounds * clients);
}

pub fn fence_orders(f: &Fixture) {
    let p = f.pair();
    let len = 1 << 20;
    let target = p.server.alloc_region(len, Rights::ALL).unwrap();
    let key = target.key(Rights::READ | Rights::WRITE).unwrap();
    let a = p.client.alloc_region(len, Rights::ALL).unwrap();
    let b = p.client.alloc_region(len, Rights::ALL).unwrap();
    let back = p.client.alloc_region(len, Rights::ALL).unwrap();
    a.fill(0, len, 0xAA).unwrap();
    b.fill(0, len, 0xBB).unwrap();
    for round in 0..20u64 {
        // Many writes, a fence, a read: the read sees every write.
        let ops: Vec<_> = (0..16u64)
            .map(|i| {
                let src = if (i + round) % 2 == 0 { &a } else { &b };
                p.conn.write(src, 0, &key, i * 4096, 4096).unwrap()
            })
            .collect();
        let fence = p.conn.fence().unwrap();
        let read = p.conn.read(&back, 0, &key, 0, 16 * 4096).unwrap();
        read.wait().unwrap();
        assert!(
            fence.is_done(),
            "a read issued after a fence completed before the fence"
        );
        for i in 0..16u64 {
            let want = if (i + round) % 2 == 0 { 0xAA } else { 0xBB };
            let got = back.to_vec((i * 4096) as usize, 4096).unwrap();
            assert!(
                got.iter().all(|&x| x == want),
                "round {round}: page {i} not written before the fenced read"
            );
        }
        for o in ops {
            o.wait().unwrap();
        }
        // Overlapping writes on either side of a fence land in order: a large write of A,
        // a fence, a small write of B over the same bytes. B must win.
        let big = p.conn.write(&a, 0, &key, 0, len as u64).unwrap();
        let _f = p.conn.fence().unwrap();
        let small = p.conn.write(&b, 0, &key, 0, 4096).unwrap();
        small.wait().unwrap();
        assert!(big.is_done());
        assert!(
            target.to_vec(0, 4096).unwrap().iter().all(|&x| x == 0xBB),
            "round {round}: write before the fence landed last"
        );
        assert!(
            target
                .to_vec(4096, 4096)
                .unwrap()
                .iter()
                .all(|&x| x == 0xAA)
        );
    }
}

pub fn notify_after_data(f: &Fixture) {
    let p = f.pair();
    let len = 256 << 10;
    let target = p.server.alloc_region(len, Rights::ALL).unwrap();
    let key = target.key(Rights::WRITE).unwrap();
    let local = p.client.alloc_region(len, Rights::ALL).unwrap();
    for i in 0..32u32 {
        let data = pattern(u64::from(i) + 100, len);
        local.write_at(0, &data).unwrap();
        let n = 1000 + (i as u64) * 7000;
        let op = p.conn.write_with_notify(&local, 0, &key, 0, n, i).unwrap();
        // Wait on the target side only; with caller-driven progress the client must
        // keep driving its engine meanwhile, as an application would.
        let until = Instant::now() + Duration::from_secs(10);
        let note = loop {
            p.client.progress();
            if let Some(n) = p
                .peer
                .notification_timeout(Duration::from_millis(1))
                .unwrap()
            {
                break n;
            }
            assert!(Instant::now() < until, "no notification");
        };
        // The data is in place when the event arrives.
        assert_eq!(note.imm, i);
        assert_eq!(note.len, n);
        assert_eq!(note.offset, 0);
        assert_eq!(note.region, target.id());
        assert_eq!(target.to_vec(0, n as usize).unwrap(), &data[..n as usize]);
        op.wait().unwrap();
    }
    // Plain writes carry no notification.
    p.conn.write(&local, 0, &key, 0, 8).unwrap().wait().unwrap();
    assert!(p.peer.try_notification().unwrap().is_none());
    assert_eq!(p.server.stats().notifications, 32);
}

pub fn messages_round_trip(f: &Fixture) {
    let p = f.pair();
    let sizes = [0usize, 1, 64, 4095, 4096, 100_000, 1 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let m = pattern(i as u64, n);
        p.conn.send(&m).unwrap().wait().unwrap();
        let got = p
            .peer
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("message");
        assert_eq!(got, m, "message of {n} bytes");
    }
    // Both directions, many in flight, order of delivery preserved per connection.
    let ops: Vec<_> = (0..100u32)
        .map(|i| p.peer.send(&i.to_le_bytes()).unwrap())
        .collect();
    for i in 0..100u32 {
        let m = p
            .conn
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("message");
        assert_eq!(m, i.to_le_bytes());
    }
    // The server's sends complete once the client acknowledges them; a caller-driven
    // client acknowledges only while its caller makes progress, so keep it going.
    let until = Instant::now() + Duration::from_secs(20);
    while !ops.iter().all(|o| o.is_done()) {
        p.client.progress();
        assert!(
            Instant::now() < until,
            "the server's sends were never acknowledged"
        );
        std::thread::yield_now();
    }
    pfs_transport::wait_all(ops).unwrap();
    // Too large is refused before anything is sent.
    let big = vec![0u8; p.client.config().max_message_size + 1];
    assert!(matches!(p.conn.send(&big), Err(Error::TooLarge { .. })));
    assert_eq!(p.server.stats().messages_received, sizes.len() as u64);
}

pub fn many_in_flight_and_backpressure(f: &Fixture) {
    // A target whose application does not drain its messages: with room for one queued
    // message, the second one stalls the connection (receive backpressure), so nothing
    // after it completes and the initiator's in-flight limit must refuse the 65th op.
    let mut scfg = f.server_config();
    scfg.max_incoming = 1;
    init_tracing();
    (f.enter)(Side::Server);
    let server = Endpoint::bind(scfg).unwrap();
    (f.enter)(Side::Client);
    let client = Endpoint::bind(f.client_config().max_ops_in_flight(64)).unwrap();
    let (conn, peer) = f.connect(&server, &client);
    let target = server.alloc_region(1 << 20, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let local = client.alloc_region(1 << 20, Rights::ALL).unwrap();
    fill_pattern(&local, 3);
    conn.send(b"first").unwrap().wait().unwrap();
    let second = conn.send(b"second").unwrap();
    // One-sided operations on rdma never pass through the target's receive path (its
    // NIC serves them), so nothing queues behind a stalled message there: fill the
    // in-flight window with messages instead, which wait for the application.
    let one_sided_bypass = conn.backend() == pfs_transport::BackendKind::Rdma;
    let mut ops = Vec::new();
    let mut refused = None;
    for i in 0..200u64 {
        let r = if one_sided_bypass {
            conn.send(&i.to_le_bytes())
        } else {
            conn.write(&local, i * 4096, &key, i * 4096, 4096)
        };
        match r {
            Ok(op) => ops.push(op),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        client.progress();
    }
    assert!(
        matches!(refused, Some(Error::WouldBlock { limit: 64, .. })),
        "the in-flight limit was not enforced: {refused:?}"
    );
    assert_eq!(ops.len(), 63);
    std::thread::sleep(Duration::from_millis(50));
    client.progress();
    assert!(
        ops.iter().all(|o| !o.is_done()),
        "ops completed behind a stalled message"
    );
    // Draining the target's queue releases everything, in order. (A caller-driven
    // client must keep driving its engine meanwhile: a datagram backend retransmits what
    // the paused target dropped.)
    let next = || loop {
        client.progress();
        if let Some(m) = peer.recv_timeout(Duration::from_millis(1)).unwrap() {
            return m;
        }
    };
    assert_eq!(next(), b"first");
    assert_eq!(next(), b"second");
    second.wait().unwrap();
    if one_sided_bypass {
        for i in 0..63u64 {
            assert_eq!(next(), i.to_le_bytes());
        }
    }
    pfs_transport::wait_all(ops).unwrap();
    if !one_sided_bypass {
        assert_eq!(
            target.to_vec(0, 63 * 4096).unwrap(),
            local.to_vec(0, 63 * 4096).unwrap()
        );
    }
    // After completions, submission works again.
    conn.write(&local, 0, &key, 0, 8).unwrap().wait().unwrap();
}

pub fn large_transfer_byte_exact(f: &Fixture) {
    // This test checks bytes, not speed (pfs-bench measures that): the deadline only has
    // to catch a transfer that stopped, even on a loaded two-core machine.
    let p = f.pair_with(|c| c.op_timeout(Duration::from_secs(120)));
    let total = f.large;
    let src = p.client.alloc_region(total, Rights::ALL).unwrap();
    let dst = p.server.alloc_region(total, Rights::ALL).unwrap();
    let back = p.client.alloc_region(total, Rights::ALL).unwrap();
    fill_pattern(&src, 77);
    let want = checksum(&src);
    let key = dst.key(Rights::READ | Rights::WRITE).unwrap();
    // 8 MiB operations, up to 16 in flight, over the whole region.
    let chunked = |op: &dyn Fn(u64, u64) -> pfs_transport::Result<pfs_transport::Op<()>>| {
        let chunk = (8 << 20).min(total);
        let mut ops = Vec::new();
        let mut off = 0;
        while off < total {
            let n = chunk.min(total - off);
            ops.push(op(off as u64, n as u64).unwrap());
            if ops.len() >= 16 {
                pfs_transport::wait_all(ops.drain(..)).unwrap();
            }
            off += n;
        }
        pfs_transport::wait_all(ops).unwrap();
    };
    chunked(&|off, n| p.conn.write(&src, off, &key, off, n));
    assert_eq!(checksum(&dst), want, "written bytes differ");
    chunked(&|off, n| p.conn.read(&back, off, &key, off, n));
    assert_eq!(checksum(&back), want, "read bytes differ");
}

pub fn revoking_under_a_large_read_lets_the_connection_go_on(f: &Fixture) {
    // A read of many work requests (rdma: 128 of 256 KiB, 16 of them posted at a
    // time), its key revoked while it is under way: the read completes or fails as
    // revoked, and what was queued behind it on the connection (a message, a read with
    // another key) still goes through. On rdma the peer stops posting under the grant,
    // acknowledges the revocation once the reads it posted are done (4 MiB at most, a
    // fraction of a second even under TCG), and the target withdraws the registration
    // only then (or after a second); the read, partly posted, fails.
    let p = f.pair_with(|c| c.op_timeout(Duration::from_secs(60)));
    let total = f.large.min(32 << 20);
    let target = p.server.alloc_region(total, Rights::ALL).unwrap();
    let other = p.server.alloc_region(4096, Rights::ALL).unwrap();
    fill_pattern(&other, 5);
    let back = p.client.alloc_region(total, Rights::ALL).unwrap();
    let key = target.key(Rights::READ).unwrap();
    let other_key = other.key(Rights::READ).unwrap();
    p.conn.read(&back, 0, &key, 0, 8).unwrap().wait().unwrap();
    let big = p.conn.read(&back, 0, &key, 0, total as u64).unwrap();
    let msg = p.conn.send(b"after the read").unwrap();
    let small = p.conn.read(&back, 0, &other_key, 0, 64).unwrap();
    // Revoked from another thread: the caller-driven client must keep making progress
    // (here, in `wait`) to acknowledge the revocation.
    std::thread::scope(|s| {
        s.spawn(|| target.revoke(&key).unwrap());
        match big.wait() {
            Ok(()) | Err(Error::Revoked) => {}
            Err(e) => panic!("the read under a revoked key failed with {e:?}"),
        }
        msg.wait().expect("the message queued behind the read");
        small.wait().expect("the read with another key");
    });
    let mut want = vec![0u8; 64];
    other.read_at(0, &mut want).unwrap();
    let mut got = vec![0u8; 64];
    back.read_at(0, &mut got).unwrap();
    assert_eq!(got, want, "the read with another key");
    let m = p
        .peer
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("message");
    assert_eq!(m, b"after the read");
    p.conn
        .read(&back, 0, &other_key, 0, 8)
        .unwrap()
        .wait()
        .expect("the connection goes on");
}

pub fn async_ops_from_any_executor(f: &Fixture) {
    let p = f.pair();
    let target = p.server.alloc_region(4096, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let local = p.client.alloc_region(4096, Rights::ALL).unwrap();
    local.write_at(0, b"async").unwrap();
    let r = block_on(async {
        p.conn.write(&local, 0, &key, 10, 5)?.await?;
        let old = p.conn.fetch_add(&key, 64, 2)?.await?;
        p.conn.send(b"ping")?.await?;
        let msg = p.peer.recv_async().await?;
        Ok::<_, Error>((old, msg))
    })
    .unwrap();
    assert_eq!(r, (0, b"ping".to_vec()));
    assert_eq!(target.to_vec(10, 5).unwrap(), b"async");
}

pub fn garbage_closes_only_that_connection(f: &Fixture) {
    let p = f.pair();
    let target = p.server.alloc_region(4096, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let local = p.client.alloc_region(4096, Rights::ALL).unwrap();
    let addr = p.server.local_addrs()[0].clone();
    let stop = Arc::new(AtomicBool::new(false));
    // An honest client keeps working throughout.
    let honest = {
        let stop = stop.clone();
        let conn = p.conn;
        let key = key.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 50 {
                local.write_at(0, &n.to_le_bytes()).unwrap();
                conn.write(&local, 0, &key, 0, 8).unwrap().wait().unwrap();
                conn.read(&local, 8, &key, 0, 8).unwrap().wait().unwrap();
                assert_eq!(local.to_vec(8, 8).unwrap(), n.to_le_bytes());
                n += 1;
            }
            (n, conn)
        })
    };
    let before = p.server.stats().protocol_errors;
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0u8; 64],
        vec![0xff; 300],
        pattern(5, 4096),
        // A valid prefix announcing an absurd payload.
        {
            let mut v = vec![1u8, 0x16, 0, 0];
            v.extend_from_slice(&u32::MAX.to_le_bytes());
            v.extend_from_slice(&[0u8; 24]);
            v
        },
    ];
    let mut tried = 0;
    for g in &garbage {
        if let Some(reply) = (f.raw_garbage)(&addr, g) {
            tried += 1;
            // The peer learns why before the connection closes.
            let text = String::from_utf8_lossy(&reply).to_string();
            assert!(
                text.contains("malformed") || text.contains("expected HELLO") || reply.is_empty(),
                "unexpected reply to garbage: {text:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (n, _conn) = honest
        .join()
        .expect("the honest client failed during the attack");
    assert!(n >= 50);
    if tried > 0 {
        assert!(
            p.server.stats().protocol_errors >= before + tried,
            "each garbage connection is counted as a protocol error"
        );
    }
    assert_eq!(
        p.server.connection_count(),
        1,
        "garbage connections are closed"
    );
}

// ---- a peer killed mid-transfer ----

/// Environment variable that turns the test binary into a server for the kill test.
pub const SERVE_ENV: &str = "PFS_CONFORMANCE_SERVE";

/// Body of the helper "test" that the kill test re-executes: serve one region and print
/// its key and address, then wait to be killed.
pub fn serve_if_asked(f: &Fixture) {
    if std::env::var(SERVE_ENV).ok().as_deref() != Some(f.name) {
        return;
    }
    let server = f.server();
    let region = server.alloc_region(64 << 20, Rights::ALL).unwrap();
    let key = region.key(Rights::ALL).unwrap();
    println!("PFS-SERVE {} {}", server.local_addrs()[0], key);
    let mut conns = Vec::new();
    loop {
        if let Ok(Some(c)) = server.accept_timeout(Duration::from_millis(100)) {
            conns.push(c);
        }
    }
}

/// A child process that is killed and reaped when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_server_process(f: &Fixture, test_name: &str) -> (ChildGuard, String, RegionKey) {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    let mut child = ChildGuard(
        Command::new(exe)
            .args([
                test_name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SERVE_ENV, f.name)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server process"),
    );
    let out = child.0.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "server process did not start");
        let line = lines.next().expect("server process exited").unwrap();
        // libtest prints "test NAME ... " without a newline before the test's output.
        if let Some(at) = line.find("PFS-SERVE ") {
            let rest = &line[at + "PFS-SERVE ".len()..];
            let mut it = rest.split_whitespace();
            let addr = it.next().unwrap().to_string();
            let key: RegionKey = it.next().unwrap().parse().unwrap();
            // Keep draining its output so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (child, addr, key);
        }
    }
}

pub fn peer_killed_fails_pending_ops(f: &Fixture, helper_test: &str) {
    init_tracing();
    let (mut child, addr, key) = spawn_server_process(f, helper_test);
    let client = f.client();
    let addr: pfs_transport::Address = addr.parse().unwrap();
    let conn = client.connect(&(f.dial)(&addr, 0)).unwrap();
    let src = client.alloc_region(64 << 20, Rights::ALL).unwrap();
    // A transfer in progress: many large writes in flight.
    let mut ops = Vec::new();
    for i in 0..64u64 {
        ops.push(conn.write(&src, 0, &key, 0, 64 << 20).unwrap());
        if i == 8 {
            std::thread::sleep(Duration::from_millis(5));
            child.0.kill().unwrap();
        }
    }
    let killed = Instant::now();
    let deadline = client.config().op_timeout;
    let mut failed = 0;
    for op in ops {
        match op.wait() {
            Ok(()) => {}
            Err(Error::ConnectionLost { .. }) | Err(Error::Timeout { .. }) => failed += 1,
            Err(e) => panic!("unexpected error after the peer died: {e:?}"),
        }
    }
    let took = killed.elapsed();
    let _ = child.0.wait();
    assert!(
        failed > 0,
        "no operation failed although the peer was killed"
    );
    assert!(
        took <= deadline + Duration::from_secs(2),
        "pending ops took {took:?} to fail"
    );
    // The connection is known dead, and new operations fail at once.
    assert!(conn.is_closed());
    assert!(matches!(
        conn.write(&src, 0, &key, 0, 8),
        Err(Error::ConnectionLost { .. })
    ));
}

// ---- a minimal executor, to show ops are plain futures ----

pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Stamp out the suite for one fixture.
#[macro_export]
macro_rules! conformance_suite {
    ($modname:ident, $fixture:expr) => {
        mod $modname {
            use super::conformance as c;
            fn fx() -> c::Held {
                c::hold($fixture)
            }
            #[test]
            fn write_read_at_offsets() {
                c::write_read_at_offsets(&fx())
            }
            #[test]
            fn bad_accesses_are_refused() {
                c::bad_accesses_are_refused(&fx())
            }
            #[test]
            fn concurrent_fetch_add_sums_exactly() {
                c::concurrent_fetch_add_sums_exactly(&fx())
            }
            #[test]
            fn many_connections_at_once() {
                c::many_connections_at_once(&fx())
            }
            #[test]
            fn cas_lock_excludes() {
                c::cas_lock_excludes(&fx())
            }
            #[test]
            fn fence_orders() {
                c::fence_orders(&fx())
            }
            #[test]
            fn notify_after_data() {
                c::notify_after_data(&fx())
            }
            #[test]
            fn messages_round_trip() {
                c::messages_round_trip(&fx())
            }
            #[test]
            fn many_in_flight_and_backpressure() {
                c::many_in_flight_and_backpressure(&fx())
            }
            #[test]
            fn large_transfer_byte_exact() {
                c::large_transfer_byte_exact(&fx())
            }
            #[test]
            fn revoking_under_a_large_read_lets_the_connection_go_on() {
                c::revoking_under_a_large_read_lets_the_connection_go_on(&fx())
            }
            #[test]
            fn async_ops_from_any_executor() {
                c::async_ops_from_any_executor(&fx())
            }
            #[test]
            fn garbage_closes_only_that_connection() {
                c::garbage_closes_only_that_connection(&fx())
            }
            #[test]
            fn peer_killed_fails_pending_ops() {
                c::peer_killed_fails_pending_ops(
                    &fx(),
                    concat!(stringify!($modname), "::serve_helper"),
                )
            }
            /// Not a test: the server process of `peer_killed_fails_pending_ops`.
            #[test]
            #[ignore]
            fn serve_helper() {
                c::serve_if_asked(&fx())
            }
        }
    };
}
