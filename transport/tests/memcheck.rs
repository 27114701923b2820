//! Small, deterministic exercises of every path that runs `unsafe` code — region memory,
//! io_uring rings and the buffers they lend the kernel, batched datagram system calls,
//! AF_XDP UMEM and rings — meant to run under valgrind memcheck, and quick as plain
//! tests too:
//!
//! ```text
//! cargo test --release -p pfs-transport --all-features --test memcheck --no-run
//! valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
//!     --track-origins=yes target/release/deps/memcheck-<hash> --test-threads=1
//! ```
//!
//! The xdp test needs root (it sets up `tools/topology.sh`); without root it says so and
//! passes.
//!
//! Memcheck sees every access the process makes and the buffers of the system calls it
//! knows (`sendmsg`, `recvmmsg`, `ioctl`, `setsockopt`, …), but not what the kernel
//! reads and writes through an io_uring submission: those buffers are only checked by
//! the data each test reads back.
//!
//! Valgrind runs one thread of a process at a time, and valgrind 3.19 treats
//! `io_uring_enter` as a call that never blocks: a thread waiting in it keeps every other
//! thread of the process from running until the wait ends. So these tests drive both
//! ends of a connection from the test thread (`Progress::Caller`) and poll rather than
//! wait whenever the other end has to run to answer; only `connect`, which blocks until
//! the server answers, runs on a helper thread (its client side never waits in
//! `io_uring_enter`: busy-polling, or blocked in `read` or `poll`, which let the test
//! thread drive the server). Waits in `io_uring_enter` happen only where nothing else
//! needs to run (an idle receive with a timeout). Sizes are small and every wait is
//! bounded by a deadline sized for a process running 30–50 times slower than native.

use std::time::{Duration, Instant};

use pfs_transport::{
    Connection, Endpoint, EndpointConfig, Error, KeyOptions, Op, OpOutput, Progress, Region,
    RegionKey, Rights, WaitMode,
};

/// Deadline of every wait, operation and connection setup.
const LIMIT: Duration = Duration::from_secs(120);

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PFS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A caller-driven endpoint configuration.
fn caller(wait: WaitMode) -> EndpointConfig {
    EndpointConfig::new()
        .progress(Progress::Caller)
        .wait_mode(wait)
        .op_timeout(LIMIT)
        .connect_timeout(LIMIT)
        .max_message_size(256 << 10)
}

/// Deterministic pseudo-random bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// Drive `eps` from this thread until `ready` yields something.
fn drive<T>(eps: &[&Endpoint], what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: nothing after {LIMIT:?}");
        let work: usize = eps.iter().map(|e| e.progress()).sum();
        if work == 0 {
            std::thread::yield_now();
        }
    }
}

/// Drive `eps` until `op` completes; its result.
fn finish<T: OpOutput>(
    eps: &[&Endpoint],
    op: pfs_transport::Result<Op<T>>,
) -> pfs_transport::Result<T> {
    let mut op = op?;
    drive(eps, "operation", || op.poll_result())
}

/// Both ends of one connection.
struct Pair {
    server: Endpoint,
    client: Endpoint,
    /// The client's side.
    conn: Connection,
    /// The server's side.
    peer: Connection,
}

impl Pair {
    fn eps(&self) -> [&Endpoint; 2] {
        [&self.client, &self.server]
    }
}

/// Run `connect` on a helper thread while this thread drives `server`, and return what
/// it returned. The server's rings get their requests from this thread only: io_uring
/// cancels a thread's requests when the thread exits.
fn connecting<T: Send>(server: &Endpoint, connect: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(connect);
        let deadline = Instant::now() + LIMIT;
        while !h.is_finished() {
            assert!(
                Instant::now() < deadline,
                "connect: nothing after {LIMIT:?}"
            );
            if server.progress() == 0 {
                std::thread::yield_now();
            }
        }
        h.join().expect("connecting thread")
    })
}

/// Connect `client` to `addr` (served by `server`), then accept from this thread.
fn dial(server: &Endpoint, client: &Endpoint, addr: &str) -> (Connection, Connection) {
    let conn = connecting(server, || client.connect(addr))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let peer = drive(&[client, server], "accept", || server.try_accept());
    assert_eq!(conn.peer_id(), server.id());
    assert_eq!(peer.peer_id(), client.id());
    (conn, peer)
}

/// [`dial`], keeping both endpoints in the pair.
fn connect(server: Endpoint, client: Endpoint, addr: &str) -> Pair {
    let (conn, peer) = dial(&server, &client, addr);
    Pair {
        server,
        client,
        conn,
        peer,
    }
}

/// A listening server and a client, each caller-driven with its own wait mode.
fn pair(listen: &str, server: EndpointConfig, client: EndpointConfig) -> Pair {
    init();
    let server = Endpoint::bind(server.listen(listen).unwrap()).expect("server bind");
    let client = Endpoint::bind(client).expect("client bind");
    let addr = server.local_addrs()[0].to_string();
    connect(server, client, &addr)
}

/// Writes and reads (small ones copied next to their header, large ones straight from
/// region memory; unaligned offsets; the last byte of a region whose length is not a
/// multiple of the page size), several operations in flight, a fence, atomics, a write
/// with notification, messages both ways, and a write whose local region handle is
/// dropped while it is in flight.
fn one_sided_and_messages(p: &Pair, big: usize) {
    let eps = p.eps();
    let len = big + 4096 + 13;
    let target = p.server.alloc_region(len, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let local = p.client.alloc_region(len, Rights::ALL).unwrap();
    let data = pattern(1, len);
    local.write_at(0, &data).unwrap();

    finish(&eps, p.conn.write(&local, 3, &key, 5, 100)).unwrap();
    assert_eq!(target.to_vec(5, 100).unwrap(), &data[3..103]);
    finish(&eps, p.conn.write(&local, 0, &key, 4099, big as u64)).unwrap();
    assert_eq!(target.to_vec(4099, big).unwrap(), &data[..big]);
    let last = len as u64 - 1;
    finish(&eps, p.conn.write(&local, last, &key, last, 1)).unwrap();
    assert_eq!(target.to_vec(len - 1, 1).unwrap(), [data[len - 1]]);

    let back = p.client.alloc_region(len, Rights::ALL).unwrap();
    finish(&eps, p.conn.read(&back, 1, &key, 4099, big as u64)).unwrap();
    assert_eq!(back.to_vec(1, big).unwrap(), &data[..big]);
    finish(&eps, p.conn.read(&back, 2, &key, 5, 100)).unwrap();
    assert_eq!(back.to_vec(2, 100).unwrap(), &data[3..103]);
    finish(&eps, p.conn.read(&back, last, &key, last, 1)).unwrap();
    assert_eq!(back.to_vec(len - 1, 1).unwrap(), [data[len - 1]]);

    // Several in flight at once, then a fence behind them.
    let ops: Vec<Op<()>> = (0..8u64)
        .map(|i| {
            p.conn
                .write(&local, i * 600, &key, i * 600 + 1, 600)
                .unwrap()
        })
        .collect();
    for op in ops {
        finish(&eps, Ok(op)).unwrap();
    }
    finish(&eps, p.conn.fence()).unwrap();
    assert_eq!(target.to_vec(1, 4800).unwrap(), &data[..4800]);

    let at = (len - 8) & !7;
    target.store_u64(at, 41).unwrap();
    let at = at as u64;
    assert_eq!(
        finish(&eps, p.conn.compare_and_swap(&key, at, 41, 42)).unwrap(),
        41
    );
    assert_eq!(
        finish(&eps, p.conn.compare_and_swap(&key, at, 41, 43)).unwrap(),
        42
    );
    assert_eq!(finish(&eps, p.conn.fetch_add(&key, at, 8)).unwrap(), 42);
    assert_eq!(target.load_u64(at as usize).unwrap(), 50);

    finish(&eps, p.conn.write_with_notify(&local, 0, &key, 0, 64, 7)).unwrap();
    let note = drive(&eps, "notification", || p.peer.try_notification().unwrap());
    assert_eq!(
        (note.region, note.offset, note.len, note.imm),
        (key.region(), 0, 64, 7)
    );

    for m in [b"ping".to_vec(), pattern(2, 5000)] {
        finish(&eps, p.conn.send(&m)).unwrap();
        assert_eq!(drive(&eps, "message", || p.peer.try_recv().unwrap()), m);
        finish(&eps, p.peer.send(&m)).unwrap();
        assert_eq!(drive(&eps, "message", || p.conn.try_recv().unwrap()), m);
    }

    // The operation keeps the memory of a dropped region alive until it completes.
    let temp = p.client.alloc_region(2 * 4096 + 1, Rights::ALL).unwrap();
    temp.fill(0, temp.len(), 0xab).unwrap();
    let n = temp.len();
    let op = p.conn.write(&temp, 0, &key, 0, n as u64);
    drop(temp);
    finish(&eps, op).unwrap();
    assert!(target.to_vec(0, n).unwrap().iter().all(|&b| b == 0xab));
}

/// Sum of a region's bytes, to see that a refused access changed nothing.
fn sum(r: &Region) -> u64 {
    r.to_vec(0, r.len())
        .unwrap()
        .iter()
        .fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

/// A key with one field changed, to get past the initiator's checks.
fn forge(key: &RegionKey, f: impl FnOnce(&mut Vec<u8>)) -> RegionKey {
    let mut b = key.to_bytes();
    f(&mut b);
    RegionKey::from_bytes(&b).unwrap()
}

/// Accesses refused by the initiator and by the target; the target's memory stays as
/// it was.
fn refusals(p: &Pair) {
    let eps = p.eps();
    let target = p.server.alloc_region(4096, Rights::ALL).unwrap();
    target.write_at(0, &pattern(5, 4096)).unwrap();
    let before = sum(&target);
    let local = p.client.alloc_region(4096, Rights::ALL).unwrap();
    let rw = target.key(Rights::READ | Rights::WRITE).unwrap();
    let all = target.key(Rights::ALL).unwrap();

    // Refused before anything is sent.
    assert!(matches!(
        p.conn.write(&local, 0, &rw, 4000, 200),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        p.conn.write(&local, 4000, &rw, 0, 200),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        p.conn.read(&local, 0, &rw, u64::MAX, 2),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        p.conn.fetch_add(&all, 4, 1),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        p.conn.compare_and_swap(&rw, 0, 0, 1),
        Err(Error::AccessDenied { .. })
    ));
    let foreign = p.client.alloc_region(64, Rights::ALL).unwrap();
    let foreign = foreign.key(Rights::ALL).unwrap();
    assert!(matches!(
        p.conn.write(&local, 0, &foreign, 0, 8),
        Err(Error::AccessDenied { .. })
    ));

    // Refused by the target: the forged keys pass the initiator's own checks.
    let longer = forge(&rw, |b| {
        b[17..25].copy_from_slice(&(1u64 << 20).to_le_bytes())
    });
    let r = finish(&eps, p.conn.write(&local, 0, &longer, 8192, 100));
    assert!(matches!(r, Err(Error::OutOfBounds { .. })), "{r:?}");
    let r = finish(&eps, p.conn.read(&local, 0, &longer, 4090, 100));
    assert!(matches!(r, Err(Error::OutOfBounds { .. })), "{r:?}");
    let wrong_token = forge(&rw, |b| b[26] ^= 1);
    let r = finish(&eps, p.conn.write(&local, 0, &wrong_token, 0, 100));
    assert!(matches!(r, Err(Error::AccessDenied { .. })), "{r:?}");
    let more_rights = forge(&rw, |b| b[25] = Rights::ALL.bits());
    let r = finish(&eps, p.conn.fetch_add(&more_rights, 0, 1));
    assert!(matches!(r, Err(Error::AccessDenied { .. })), "{r:?}");
    let no_region = forge(&rw, |b| b[9..17].copy_from_slice(&9999u64.to_le_bytes()));
    let r = finish(&eps, p.conn.write(&local, 0, &no_region, 0, 100));
    assert!(matches!(r, Err(Error::UnknownRegion { .. })), "{r:?}");
    let revoked = target.key(Rights::READ | Rights::WRITE).unwrap();
    target.revoke(&revoked).unwrap();
    let r = finish(&eps, p.conn.write(&local, 0, &revoked, 0, 100));
    assert!(matches!(r, Err(Error::Revoked)), "{r:?}");
    let expired = target
        .key_with(KeyOptions::new(Rights::WRITE).expires_in(Duration::from_millis(1)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let r = finish(&eps, p.conn.write(&local, 0, &expired, 0, 100));
    assert!(matches!(r, Err(Error::Expired)), "{r:?}");
    let gone = p.server.alloc_region(64, Rights::ALL).unwrap();
    let gone_key = gone.key(Rights::ALL).unwrap();
    drop(gone);
    let r = finish(&eps, p.conn.write(&local, 0, &gone_key, 0, 8));
    assert!(matches!(r, Err(Error::UnknownRegion { .. })), "{r:?}");
    assert_eq!(sum(&target), before, "a refused access changed the target");

    let huge = vec![0u8; (256 << 10) + 1];
    assert!(matches!(p.conn.send(&huge), Err(Error::TooLarge { .. })));

    // The connection still works after all that.
    finish(&eps, p.conn.read(&local, 0, &rw, 0, 4096)).unwrap();
    assert_eq!(local.to_vec(0, 4096).unwrap(), pattern(5, 4096));
}

/// Nothing to receive on `c`: a receive with a short timeout returns nothing.
fn nothing_to_receive(c: &Connection) {
    assert_eq!(c.recv_timeout(Duration::from_millis(30)).unwrap(), None);
}

/// Close with an operation in flight; everything after fails, on both sides.
fn closing(p: Pair) {
    let eps = p.eps();
    let target = p.server.alloc_region(64 << 10, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let local = p.client.alloc_region(64 << 10, Rights::ALL).unwrap();
    let mut pending = p.conn.read(&local, 0, &key, 0, 64 << 10).unwrap();
    p.conn.close();
    // It completes either way: with the bytes, or failed by the close.
    let r = drive(&eps, "operation pending at close", || pending.poll_result());
    assert!(
        r.is_ok() || matches!(r, Err(Error::ConnectionLost { .. })),
        "{r:?}"
    );
    drive(&eps, "local close", || p.conn.is_closed().then_some(()));
    assert!(matches!(
        p.conn.write(&local, 0, &key, 0, 8),
        Err(Error::ConnectionLost { .. })
    ));
    assert!(p.conn.send(b"after close").is_err());
    assert!(p.conn.try_recv().is_err());
    drive(&eps, "the peer sees the close", || {
        p.peer.is_closed().then_some(())
    });
    let r = finish(&eps, p.peer.send(b"to a closed peer"));
    assert!(r.is_err(), "{r:?}");
    drop(p.conn);
    drop(p.peer);
    drop(p.client);
    drop(p.server);
}

#[test]
fn regions_allocate_register_and_free() {
    init();
    for huge in [true, false] {
        let mut cfg = caller(WaitMode::Block);
        cfg.huge_pages = huge;
        let ep = Endpoint::bind(cfg).unwrap();
        for len in [
            1usize,
            7,
            4095,
            4096,
            4097,
            (64 << 10) + 3,
            2 << 20,
            (2 << 20) + 1,
            4 << 20,
        ] {
            let r = ep.alloc_region(len, Rights::ALL).unwrap();
            assert_eq!(r.len(), len);
            if huge && len.is_multiple_of(2 << 20) {
                eprintln!(
                    "region of {len} bytes: {}",
                    if r.is_huge_pages() {
                        "huge pages"
                    } else {
                        "ordinary pages (no huge pages free)"
                    }
                );
            } else {
                assert!(!r.is_huge_pages());
            }
            assert!(r.to_vec(0, len).unwrap() == vec![0u8; len], "zeroed");
            let head = pattern(len as u64, len.min(33));
            r.write_at(0, &head).unwrap();
            r.write_at(len - head.len(), &head).unwrap();
            assert_eq!(r.to_vec(len - head.len(), head.len()).unwrap(), head);
            // Byte-wise: the tail only, so that it stays quick under valgrind.
            let tail = len.min(4097);
            r.fill(len - tail, tail, 0x5a).unwrap();
            assert_eq!(r.to_vec(len - 1, 1).unwrap(), [0x5a]);
            assert!(matches!(
                r.write_at(len, &[1]),
                Err(Error::OutOfBounds { .. })
            ));
            assert!(matches!(
                r.to_vec(len - 1, 2),
                Err(Error::OutOfBounds { .. })
            ));
            assert!(matches!(r.fill(1, len, 0), Err(Error::OutOfBounds { .. })));
            assert!(r.read_at(usize::MAX, &mut [0u8; 2]).is_err());
            if len >= 8 {
                let at = (len - 8) & !7;
                r.store_u64(at, 5).unwrap();
                assert_eq!(r.compare_and_swap(at, 5, 6).unwrap(), 5);
                assert_eq!(r.fetch_add(at, u64::MAX).unwrap(), 6);
                assert_eq!(r.load_u64(at).unwrap(), 5);
                assert!(matches!(r.load_u64(at + 8), Err(Error::OutOfBounds { .. })));
                assert!(matches!(
                    r.load_u64(at + 1),
                    Err(Error::Misaligned { .. }) | Err(Error::OutOfBounds { .. })
                ));
            } else {
                assert!(r.load_u64(0).is_err());
            }
            // Clones share the memory; it goes with the last handle.
            let r2 = r.clone();
            drop(r);
            assert_eq!(r2.len(), len);
            assert_eq!(r2.to_vec(len / 2, 1).unwrap().len(), 1);
        }
        assert!(matches!(
            ep.alloc_region(0, Rights::ALL),
            Err(Error::InvalidArgument(_))
        ));
        assert!(ep.alloc_region(usize::MAX, Rights::ALL).is_err());
    }

    // Registered memory: a vector whose capacity exceeds its length, and one of odd
    // length; it is freed as the vector it was.
    let ep = Endpoint::bind(caller(WaitMode::Block)).unwrap();
    let mut v = Vec::with_capacity(1000);
    v.extend_from_slice(&pattern(3, 333));
    match ep.register_region(v, Rights::ALL) {
        Ok(r) => {
            assert_eq!(r.len(), 333);
            assert_eq!(r.to_vec(0, 333).unwrap(), pattern(3, 333));
            r.write_at(330, &[1, 2, 3]).unwrap();
            assert!(r.write_at(331, &[1, 2, 3]).is_err());
            assert_eq!(
                r.fetch_add(320, 1).unwrap(),
                u64::from_le_bytes(pattern(3, 333)[320..328].try_into().unwrap())
            );
        }
        // The allocator may hand out memory that is not 8-byte aligned.
        Err(e) => assert!(matches!(e, Error::InvalidArgument(_)), "{e}"),
    }
    let r = ep.register_region(pattern(4, 4097), Rights::READ).unwrap();
    assert_eq!(r.to_vec(4090, 7).unwrap(), &pattern(4, 4097)[4090..]);
    assert!(r.key(Rights::WRITE).is_err());
    drop(r);
    assert!(matches!(
        ep.register_region(Vec::new(), Rights::ALL),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn keys_encode_and_parse() {
    init();
    let ep = Endpoint::bind(caller(WaitMode::Block)).unwrap();
    let r = ep.alloc_region(100, Rights::READ | Rights::WRITE).unwrap();
    assert!(matches!(r.key(Rights::ALL), Err(Error::InvalidArgument(_))));
    let k = r
        .key_with(KeyOptions::new(Rights::READ).expires_in(Duration::from_secs(600)))
        .unwrap();
    assert!(k.expires().is_some());
    let text = k.to_string();
    let back: RegionKey = text.parse().unwrap();
    assert_eq!(back, k);
    assert_eq!(format!(" {text}\n").parse::<RegionKey>().unwrap(), k);
    let b = k.to_bytes();
    assert_eq!(RegionKey::from_bytes(&b).unwrap(), k);
    for n in 0..b.len() {
        assert!(RegionKey::from_bytes(&b[..n]).is_err(), "{n} bytes");
    }
    let mut longer = b.clone();
    longer.push(0);
    assert!(RegionKey::from_bytes(&longer).is_err());
    // A backend part as long as allowed, and one byte longer.
    for (blen, ok) in [(256usize, true), (257, false)] {
        let mut m = b.clone();
        let at = m.len() - 2;
        m[at..].copy_from_slice(&(blen as u16).to_le_bytes());
        m.extend(std::iter::repeat_n(7u8, blen));
        assert_eq!(RegionKey::from_bytes(&m).is_ok(), ok, "backend part {blen}");
    }
    // Any single byte changed: decoded or refused, never a crash.
    for i in 0..b.len() {
        for x in [0x00u8, 0x80, 0xff] {
            let mut m = b.clone();
            m[i] = x;
            let _ = RegionKey::from_bytes(&m);
        }
    }
    for bad in [
        "",
        "pfsk1.",
        "pfsk1.!!!!",
        "pfsk2.AAAA",
        "not a key",
        &format!("pfsk1.{}", "A".repeat(10_000)),
        &text[..text.len() - 1],
    ] {
        assert!(
            matches!(bad.parse::<RegionKey>(), Err(Error::InvalidKey { .. })),
            "{bad:?}"
        );
    }
    let other = ep.alloc_region(8, Rights::ALL).unwrap();
    assert!(other.revoke(&k).is_err());
    r.revoke(&k).unwrap();
    r.revoke_all();
}

/// tcp: the server on blocking rings (io_uring accept, recv into region memory,
/// gathered sendmsg), the client busy-polling (non-blocking send and recv, poll).
#[test]
fn tcp_blocking_rings_with_busy_peer() {
    let p = pair(
        "tcp://127.0.0.1:0",
        caller(WaitMode::Block),
        caller(WaitMode::BusyPoll),
    );
    one_sided_and_messages(&p, 64 << 10);
    // More idle connections than the busy client polls one by one: it asks poll(2)
    // which have bytes.
    let addr = p.server.local_addrs()[0].to_string();
    let more: Vec<(Connection, Connection)> =
        (0..5).map(|_| dial(&p.server, &p.client, &addr)).collect();
    let target = p.server.alloc_region(64, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let ops: Vec<Op<u64>> = more
        .iter()
        .map(|(c, _)| c.fetch_add(&key, 0, 1).unwrap())
        .collect();
    for op in ops {
        finish(&p.eps(), Ok(op)).unwrap();
    }
    assert_eq!(target.load_u64(0).unwrap(), 5);
    for (c, peer) in &more {
        finish(&p.eps(), peer.send(b"to every client")).unwrap();
        assert_eq!(
            drive(&p.eps(), "message", || c.try_recv().unwrap()),
            b"to every client"
        );
    }
    drop(more);
    refusals(&p);
    closing(p);
    let client = Endpoint::bind(caller(WaitMode::Block)).unwrap();
    assert!(client.connect("tcp://127.0.0.1:1").is_err());
}

/// tcp: both sides on blocking rings with zero-copy sends (`IORING_OP_SENDMSG_ZC`,
/// buffers held until the kernel's notification), and idle waits in `io_uring_enter`.
#[test]
fn tcp_zero_copy_sends() {
    let zc = |c: EndpointConfig| c.zero_copy_send(4096);
    let p = pair(
        "tcp://127.0.0.1:0",
        zc(caller(WaitMode::Block)),
        zc(caller(WaitMode::Block)),
    );
    one_sided_and_messages(&p, 64 << 10);
    assert!(
        p.client.stats().zero_copy_sends > 0,
        "{:?}",
        p.client.stats()
    );
    assert!(
        p.server.stats().zero_copy_sends > 0,
        "{:?}",
        p.server.stats()
    );
    // Nothing to receive: both wait in the kernel (the eventfd read armed) and time out.
    nothing_to_receive(&p.conn);
    nothing_to_receive(&p.peer);
    refusals(&p);
    closing(p);
}

/// tcp with progress threads (single-issuer rings, torn down by their threads). They
/// busy-poll: a progress thread that slept in `io_uring_enter` would stop every other
/// thread under valgrind.
#[test]
fn tcp_progress_threads() {
    init();
    let cfg = || {
        EndpointConfig::new()
            .wait_mode(WaitMode::BusyPoll)
            .op_timeout(LIMIT)
            .connect_timeout(LIMIT)
    };
    let server = Endpoint::bind(cfg().listen("tcp://127.0.0.1:0").unwrap()).unwrap();
    let client = Endpoint::bind(cfg().progress(Progress::Thread { cpu: Some(0) })).unwrap();
    let conn = client
        .connect(&server.local_addrs()[0].to_string())
        .unwrap();
    let peer = server.accept_timeout(LIMIT).unwrap().expect("accept");
    let target = server.alloc_region(8192 + 5, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let local = client.alloc_region(8192 + 5, Rights::ALL).unwrap();
    local.write_at(0, &pattern(6, 8192 + 5)).unwrap();
    conn.write(&local, 0, &key, 0, 8192 + 5)
        .unwrap()
        .wait()
        .unwrap();
    conn.read(&local, 1, &key, 0, 8192).unwrap().wait().unwrap();
    assert_eq!(
        local.to_vec(1, 8192).unwrap(),
        &pattern(6, 8192 + 5)[..8192]
    );
    assert_eq!(
        conn.fetch_add(&key, 8, 1).unwrap().wait().unwrap(),
        u64::from_le_bytes(pattern(6, 16)[8..16].try_into().unwrap())
    );
    conn.send(b"threads").unwrap().wait().unwrap();
    assert_eq!(
        peer.recv_timeout(LIMIT).unwrap().as_deref(),
        Some(&b"threads"[..])
    );
    drop(conn);
    drop(client);
    drop(peer);
    drop(server);
}

/// udp: the server on a blocking ring (armed RECVMSGs, SENDMSG per datagram), the client
/// busy-polling (recvfrom, sendmmsg, gathered sends from region memory); operations and
/// messages span several datagrams.
#[test]
fn udp_blocking_ring_with_busy_peer() {
    let p = pair(
        "udp://127.0.0.1:0",
        caller(WaitMode::Block),
        caller(WaitMode::BusyPoll),
    );
    one_sided_and_messages(&p, 20_000);
    // A connection attempt to the client, which does not listen: it answers with a
    // RESET (sent with sendmmsg), and the attempt fails.
    let port = p.conn.local_addr().socket_addr().port();
    let stranger = Endpoint::bind(caller(WaitMode::BusyPoll)).unwrap();
    let r = connecting(&p.client, || {
        stranger.connect(&format!("udp://127.0.0.1:{port}"))
    });
    assert!(r.is_err(), "{r:?}");
    drop(stranger);
    // Nothing to receive: the server waits in `io_uring_enter` and times out.
    nothing_to_receive(&p.peer);
    refusals(&p);
    closing(p);
}

/// udp with 64 KiB datagrams on loopback: bulk receives take the `recvmmsg` batch path.
#[test]
fn udp_jumbo_datagrams() {
    let jumbo = |c: EndpointConfig| c.mtu(65535);
    let p = pair(
        "udp://127.0.0.1:0",
        jumbo(caller(WaitMode::Block)),
        jumbo(caller(WaitMode::BusyPoll)),
    );
    one_sided_and_messages(&p, 200_000);
    closing(p);
}

/// udp over IPv6 loopback: socket addresses in their IPv6 layout, both drivers.
#[test]
fn udp_over_ipv6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: udp_over_ipv6 needs IPv6 loopback ([::1]), which this host lacks");
        return;
    }
    let p = pair(
        "udp://[::1]:0",
        caller(WaitMode::Block),
        caller(WaitMode::BusyPoll),
    );
    assert!(p.conn.peer_addr().socket_addr().is_ipv6());
    let target = p.server.alloc_region(3000, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let local = p.client.alloc_region(3000, Rights::ALL).unwrap();
    local.write_at(0, &pattern(7, 3000)).unwrap();
    let eps = p.eps();
    finish(&eps, p.conn.write(&local, 0, &key, 0, 3000)).unwrap();
    finish(&eps, p.conn.read(&local, 0, &key, 1, 2999)).unwrap();
    assert_eq!(local.to_vec(0, 2999).unwrap(), &pattern(7, 3000)[1..]);
    finish(&eps, p.peer.send(b"over IPv6")).unwrap();
    assert_eq!(
        drive(&eps, "message", || p.conn.try_recv().unwrap()),
        b"over IPv6"
    );
    closing(p);
}

#[cfg(feature = "xdp")]
mod xdp {
    //! The xdp backend between the two hosts of `tools/topology.sh` (namespaces pfs-a and
    //! pfs-b joined by a veth pair): UMEM frames, fill/RX/TX/completion rings, frames
    //! spanning several datagrams. Needs root; without it the test says so and passes.

    use std::os::fd::AsRawFd;
    use std::process::Command;

    use super::*;

    const SERVER_IP: &str = "198.18.0.1";

    fn two_hosts() -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "SKIPPED: the xdp memcheck test needs root (network namespaces, XDP, \
                 AF_XDP); run as root"
            );
            return false;
        }
        topology(1500);
        true
    }

    /// Move the calling thread into a network namespace.
    fn enter(path: &str) {
        let f = std::fs::File::open(path).expect("namespace file");
        // SAFETY: setns on a valid namespace descriptor changes only this thread's
        // network namespace; the file stays open for the call.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }

    /// Puts the thread back into the namespace it started in.
    struct Home(std::fs::File);

    impl Drop for Home {
        fn drop(&mut self) {
            // SAFETY: as in `enter`.
            unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
        }
    }

    /// Runs `tools/topology.sh up` with this MTU.
    fn topology(mtu: u32) {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/topology.sh");
        let out = Command::new(script)
            .args(["up", "--mtu", &mtu.to_string(), "--queues", "2"])
            .output()
            .expect("run tools/topology.sh");
        assert!(
            out.status.success(),
            "tools/topology.sh up --mtu {mtu} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Puts the topology back at MTU 1500 when dropped, whatever happened.
    struct Mtu1500;

    impl Drop for Mtu1500 {
        fn drop(&mut self) {
            topology(1500);
        }
    }

    /// An xdp server in pfs-a and an xdp client in pfs-b (this thread ends up there),
    /// both caller-driven and sleeping in poll(2) when they wait.
    fn xdp_pair(mtu: usize) -> Pair {
        enter("/run/netns/pfs-a");
        let server = Endpoint::bind(
            caller(WaitMode::Block)
                .mtu(mtu)
                .listen("xdp://pfs-a0/198.18.0.1:0")
                .unwrap(),
        )
        .expect("xdp server");
        let port = server.local_addrs()[0].socket_addr().port();
        enter("/run/netns/pfs-b");
        // Listening, so that its engine starts here, inside pfs-b.
        let client = Endpoint::bind(
            caller(WaitMode::Block)
                .mtu(mtu)
                .listen("xdp://pfs-b0/198.18.0.2:0")
                .unwrap(),
        )
        .expect("xdp client");
        connect(server, client, &format!("xdp://pfs-b0/{SERVER_IP}:{port}"))
    }

    #[test]
    fn xdp_umem_and_rings() {
        if !two_hosts() {
            return;
        }
        init();
        let _home = Home(std::fs::File::open("/proc/thread-self/ns/net").unwrap());
        let p = xdp_pair(1500);
        one_sided_and_messages(&p, 10_000);
        refusals(&p);
        // A submission from another thread wakes the client sleeping in poll(2) (its
        // eventfd is read back).
        let op = std::thread::scope(|s| {
            let h = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                p.conn.send(b"woken")
            });
            assert_eq!(
                p.conn.recv_timeout(Duration::from_millis(300)).unwrap(),
                None
            );
            h.join().expect("submitting thread")
        });
        finish(&p.eps(), op).unwrap();
        assert_eq!(
            drive(&p.eps(), "message", || p.peer.try_recv().unwrap()),
            b"woken"
        );
        closing(p);

        // Jumbo frames: each datagram spans three UMEM frames, sent and received as
        // chains.
        let _restore = Mtu1500;
        topology(9000);
        let p = xdp_pair(9000);
        assert!(
            p.server.describe().join(" ").contains("multi-buffer"),
            "{:?}",
            p.server.describe()
        );
        one_sided_and_messages(&p, 30_000);
        closing(p);
    }
}
