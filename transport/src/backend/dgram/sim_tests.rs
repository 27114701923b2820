//! The datagram backend through the public API on a simulated network, in virtual time:
//! deterministic (one seed, one trace), fast, and with loss, duplication, reordering,
//! silent and frozen peers that a real loopback cannot produce on demand.

use std::net::SocketAddr;
use std::time::Duration;

use crate::frames::sim::{Fate, LinkConfig, SimNet};
use crate::{Connection, Endpoint, EndpointConfig, Error, Op, OpOutput, Region, RegionKey, Rights};

const SERVER: &str = "198.18.0.1:7000";
const CLIENT: &str = "198.18.0.2:7000";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct World {
    net: SimNet,
    server: Endpoint,
    client: Endpoint,
}

impl World {
    fn new(link: LinkConfig, cfg: impl Fn() -> EndpointConfig) -> World {
        let net = SimNet::new(link);
        let server = Endpoint::bind_sim(cfg(), &net, sa(SERVER)).unwrap();
        let client = Endpoint::bind_sim(cfg(), &net, sa(CLIENT)).unwrap();
        World {
            net,
            server,
            client,
        }
    }

    /// One step of the world: both endpoints make progress; if neither had anything to
    /// do, virtual time jumps to the next event.
    fn step(&self) {
        let work = self.server.progress() + self.client.progress();
        if work == 0 && !self.net.advance() {
            panic!("the simulated world has nothing left to do");
        }
    }

    fn until<T>(&self, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let end = self.net.elapsed() + limit;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                self.net.elapsed() <= end,
                "nothing happened within {limit:?} of virtual time"
            );
            self.step();
        }
    }

    fn wait<T: OpOutput>(&self, mut op: Op<T>) -> crate::Result<T> {
        self.until(Duration::from_secs(600), || op.poll_result())
    }

    fn connect(&self) -> (Connection, Connection) {
        let conn = self
            .client
            .connect_sim(&format!("udp://{SERVER}"), || self.step())
            .unwrap();
        let peer = self.until(Duration::from_secs(10), || self.server.try_accept());
        (conn, peer)
    }
}

fn cfg(mtu: usize) -> impl Fn() -> EndpointConfig {
    move || {
        EndpointConfig::new()
            .mtu(mtu)
            .op_timeout(Duration::from_secs(5))
            .max_ops_in_flight(256)
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// 64 MiB of writes, reads, atomics and messages through a misbehaving link.
fn mixed_ops(link: LinkConfig, mtu: usize) -> World {
    let w = World::new(link, cfg(mtu));
    let (conn, peer) = w.connect();
    let total = 64usize << 20;
    let target = w.server.alloc_region(total, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let src = w.client.alloc_region(total, Rights::ALL).unwrap();
    let back = w.client.alloc_region(total, Rights::ALL).unwrap();
    let chunk = 1usize << 20;
    for i in 0..total / chunk {
        src.write_at(i * chunk, &pattern(i as u64, chunk)).unwrap();
    }
    // Writes of different sizes, 16 in flight, with an atomic and a message between.
    let mut ops: Vec<Op<()>> = Vec::new();
    let mut atomics = Vec::new();
    let mut off = 0usize;
    let mut k = 0u64;
    while off < total {
        let n = [chunk, 4096, 100_000, 1, chunk * 3 / 2][k as usize % 5].min(total - off);
        ops.push(
            conn.write(&src, off as u64, &key, off as u64, n as u64)
                .unwrap(),
        );
        if k.is_multiple_of(7) {
            atomics.push(conn.fetch_add(&key, 0, 1).unwrap());
        }
        if k.is_multiple_of(11) {
            ops.push(conn.send(&pattern(k, 3000)).unwrap());
        }
        if ops.len() >= 16 {
            for op in ops.drain(..) {
                w.wait(op).unwrap();
            }
        }
        off += n;
        k += 1;
    }
    for op in ops.drain(..) {
        w.wait(op).unwrap();
    }
    let adds = atomics.len() as u64;
    let olds: Vec<u64> = atomics.into_iter().map(|a| w.wait(a).unwrap()).collect();
    // Atomics happened exactly once each, whatever the link duplicated.
    let mut sorted = olds.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len() as u64,
        adds,
        "an atomic ran twice or not at all"
    );
    // The counter at offset 0 was overwritten by writes at offset 0 at times: check the
    // bytes after the first 8 only, against the source.
    let mut a = vec![0u8; chunk];
    let mut b = vec![0u8; chunk];
    for i in 0..total / chunk {
        target.read_at(i * chunk, &mut a).unwrap();
        src.read_at(i * chunk, &mut b).unwrap();
        let skip = if i == 0 { 8 } else { 0 };
        assert!(a[skip..] == b[skip..], "chunk {i} differs after the writes");
    }
    // And everything read back, byte-exact.
    let mut off = 0usize;
    while off < total {
        let n = (4 * chunk).min(total - off);
        ops.push(
            conn.read(&back, off as u64, &key, off as u64, n as u64)
                .unwrap(),
        );
        off += n;
    }
    for op in ops.drain(..) {
        w.wait(op).unwrap();
    }
    for i in 0..total / chunk {
        back.read_at(i * chunk, &mut a).unwrap();
        target.read_at(i * chunk, &mut b).unwrap();
        assert!(a == b, "chunk {i} read back differs");
    }
    // Messages arrived, each once.
    let mut got = 0;
    while let Ok(Some(_)) = peer.try_recv() {
        got += 1;
    }
    assert_eq!(got as u64, peer.stats().messages_received);
    assert!(got > 0);
    drop((conn, peer));
    w
}

fn lossy(seed: u64, loss: f64) -> LinkConfig {
    LinkConfig {
        seed,
        loss,
        duplicate: 0.01,
        reorder: 0.05,
        jitter: Duration::from_micros(5),
        ..LinkConfig::default()
    }
}

#[test]
fn mixed_ops_arrive_byte_exact_without_loss() {
    mixed_ops(lossy(1, 0.0), 9000);
}

#[test]
fn mixed_ops_arrive_byte_exact_at_one_percent_loss() {
    mixed_ops(lossy(2, 0.01), 9000);
}

#[test]
fn mixed_ops_arrive_byte_exact_at_five_percent_loss() {
    mixed_ops(lossy(3, 0.05), 9000);
}

#[test]
fn mixed_ops_arrive_byte_exact_at_twenty_percent_loss() {
    let w = mixed_ops(lossy(4, 0.20), 9000);
    let lost = w
        .net
        .with_link(|l| l.trace.iter().filter(|e| e.fate == Fate::Lost).count());
    assert!(lost > 1000, "the link should have lost plenty: {lost}");
}

#[test]
fn standard_mtu_works_too() {
    let w = World::new(lossy(5, 0.02), cfg(1500));
    let (conn, _peer) = w.connect();
    let target = w.server.alloc_region(4 << 20, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let src = w.client.alloc_region(4 << 20, Rights::ALL).unwrap();
    src.write_at(0, &pattern(9, 4 << 20)).unwrap();
    w.wait(conn.write(&src, 0, &key, 0, 4 << 20).unwrap())
        .unwrap();
    assert_eq!(target.to_vec(0, 4 << 20).unwrap(), pattern(9, 4 << 20));
}

#[test]
fn overlapping_writes_around_a_fence_land_in_order_under_loss() {
    let w = World::new(lossy(6, 0.10), cfg(1500));
    let (conn, _peer) = w.connect();
    let len = 256 << 10;
    let target = w.server.alloc_region(len, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let a = w.client.alloc_region(len, Rights::ALL).unwrap();
    let b = w.client.alloc_region(len, Rights::ALL).unwrap();
    a.fill(0, len, 0xAA).unwrap();
    b.fill(0, len, 0xBB).unwrap();
    for round in 0..10 {
        let big = conn.write(&a, 0, &key, 0, len as u64).unwrap();
        let fence = conn.fence().unwrap();
        let small = conn.write(&b, 0, &key, 0, 4096).unwrap();
        w.wait(small).unwrap();
        w.wait(fence).unwrap();
        w.wait(big).unwrap();
        let v = target.to_vec(0, 8192).unwrap();
        assert!(
            v[..4096].iter().all(|&x| x == 0xBB),
            "round {round}: the fenced write lost"
        );
        assert!(v[4096..].iter().all(|&x| x == 0xAA));
    }
}

#[test]
fn a_silent_peer_fails_every_pending_op_within_the_deadline() {
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (conn, _peer) = w.connect();
    let target = w.server.alloc_region(1 << 20, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let src = w.client.alloc_region(1 << 20, Rights::ALL).unwrap();
    w.net.with_link(|l| l.freeze(sa(SERVER)));
    let t0 = w.net.elapsed();
    let ops: Vec<Op<()>> = (0..20)
        .map(|i| conn.write(&src, 0, &key, i * 4096, 4096).unwrap())
        .collect();
    let atomic = conn.fetch_add(&key, 0, 1).unwrap();
    for op in ops {
        let e = w.wait(op).unwrap_err();
        assert!(
            matches!(e, Error::Timeout { .. } | Error::ConnectionLost { .. }),
            "{e:?}"
        );
    }
    assert!(w.wait(atomic).is_err());
    let took = w.net.elapsed() - t0;
    assert!(
        took <= Duration::from_secs(5) + Duration::from_millis(100),
        "failed after {took:?}"
    );
    assert!(conn.is_closed());
}

#[test]
fn a_frozen_peer_that_resumes_in_time_recovers() {
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (conn, _peer) = w.connect();
    let target = w.server.alloc_region(1 << 20, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let src = w.client.alloc_region(1 << 20, Rights::ALL).unwrap();
    src.write_at(0, &pattern(3, 1 << 20)).unwrap();
    w.net.with_link(|l| l.freeze(sa(SERVER)));
    let op = conn.write(&src, 0, &key, 0, 1 << 20).unwrap();
    let t0 = w.net.elapsed();
    w.until(Duration::from_secs(3), || {
        (w.net.elapsed() - t0 >= Duration::from_secs(1)).then_some(())
    });
    w.net.with_link(|l| l.thaw(sa(SERVER)));
    w.wait(op).unwrap();
    assert_eq!(target.to_vec(0, 1 << 20).unwrap(), pattern(3, 1 << 20));
    assert!(!conn.is_closed());
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let run = || {
        let w = World::new(lossy(42, 0.05), cfg(1500));
        let (conn, _peer) = w.connect();
        let target = w.server.alloc_region(1 << 20, Rights::ALL).unwrap();
        let key: RegionKey = target.key(Rights::ALL).unwrap();
        let src: Region = w.client.alloc_region(1 << 20, Rights::ALL).unwrap();
        for i in 0..8u64 {
            w.wait(conn.write(&src, 0, &key, i * 65536, 65536).unwrap())
                .unwrap();
            w.wait(conn.fetch_add(&key, 8, 1).unwrap()).unwrap();
        }
        w.net.with_link(|l| {
            l.trace
                .iter()
                .map(|e| (e.at, e.len, e.fate))
                .collect::<Vec<_>>()
        })
    };
    let a = run();
    let b = run();
    assert!(a.len() > 100);
    assert_eq!(a, b, "two runs with one seed diverged");
}

/// Size of message `i` in the order tests: empty, small, and several datagrams long at
/// MTU 1500 (so that both whole messages and reassembled ones overtake each other).
fn msg_len(i: usize) -> usize {
    [0, 1, 700, 3000, 1400, 20_000, 64, 9000][i % 8]
}

/// Send `n` messages, `in_flight` at a time, and check that the peer receives them in
/// the order they were sent, each once and intact. The receiver takes what has arrived
/// every `read_every` of virtual time (a slow receiver), or at every step.
fn messages_in_order(w: &World, n: usize, in_flight: usize, read_every: Duration) {
    let (conn, peer) = w.connect();
    let mut ops: std::collections::VecDeque<Op<()>> = Default::default();
    let (mut sent, mut got) = (0, 0);
    let mut last_read = w.net.elapsed();
    while got < n {
        while sent < n && ops.len() < in_flight {
            ops.push_back(conn.send(&pattern(sent as u64, msg_len(sent))).unwrap());
            sent += 1;
        }
        if w.net.elapsed() - last_read >= read_every {
            last_read = w.net.elapsed();
            while let Some(m) = peer.try_recv().unwrap() {
                assert!(got < n, "more messages than were sent");
                assert_eq!(m.len(), msg_len(got), "message {got}: wrong length");
                assert!(
                    m == pattern(got as u64, msg_len(got)),
                    "message {got} is not the one sent {got}th (messages out of order)"
                );
                got += 1;
            }
        }
        while ops.front_mut().is_some_and(|o| o.is_done()) {
            w.wait(ops.pop_front().unwrap()).unwrap();
        }
        w.step();
        assert!(
            w.net.elapsed() < Duration::from_secs(600),
            "stuck at {got} of {n} messages"
        );
    }
    for op in ops {
        w.wait(op).unwrap();
    }
    assert_eq!(peer.try_recv().unwrap(), None, "a message came twice");
    assert_eq!(peer.stats().messages_received, n as u64);
    assert_eq!(peer.stats().messages_discarded, 0);
}

#[test]
fn messages_arrive_in_order_through_loss_and_reordering() {
    let link = LinkConfig {
        seed: 7,
        loss: 0.05,
        duplicate: 0.02,
        reorder: 0.10,
        reorder_by: Duration::from_micros(200),
        jitter: Duration::from_micros(20),
        ..LinkConfig::default()
    };
    let w = World::new(link, cfg(1500));
    messages_in_order(&w, 3000, 64, Duration::ZERO);
    let reordered = w.net.with_link(|l| {
        l.trace
            .iter()
            .filter(|e| matches!(e.fate, Fate::Lost | Fate::Reordered))
            .count()
    });
    assert!(
        reordered > 100,
        "the link should have misbehaved: {reordered}"
    );
}

#[test]
fn messages_stay_in_order_while_a_slow_receiver_holds_the_sender_back() {
    let w = World::new(lossy(8, 0.03), move || {
        let mut c = cfg(1500)();
        c.max_incoming_bytes = 48 << 10;
        c.max_incoming = 16;
        c
    });
    messages_in_order(&w, 1500, 128, Duration::from_millis(2));
    assert!(
        w.server.stats().receive_stalls > 0,
        "{:?}",
        w.server.stats()
    );
}

/// Calls `f` with every wire message of a DATA datagram from the client (header and
/// the message's offset in the datagram); true if any call does.
fn client_messages(
    from: SocketAddr,
    d: &mut [u8],
    f: impl FnMut(&crate::wire::Header, usize, &mut [u8]) -> bool,
) -> bool {
    from == sa(CLIENT) && data_messages(d, f)
}

/// Calls `f` with every wire message of a DATA datagram without integrity (header and
/// the message's offset in the datagram); true if any call does.
fn data_messages(
    d: &mut [u8],
    mut f: impl FnMut(&crate::wire::Header, usize, &mut [u8]) -> bool,
) -> bool {
    use crate::proto::packet::{Kind, Packet};
    use crate::wire::{Header, Limits};
    let Ok(p) = Packet::decode(d) else {
        return false;
    };
    if p.kind != Kind::Data || p.mac {
        return false;
    }
    let (mut at, mut any) = (p.body_at, false);
    while let Ok((h, n)) = Header::decode(&d[at..], &Limits::default()) {
        any |= f(&h, at, d);
        at += n + h.payload_len as usize;
    }
    any
}

/// An on-path rewrite (no integrity) of the client's `SEND_SEQ` segments: `f(seq,
/// msg_len, msg_off)` gives the values each segment goes on with.
fn rewrite_client_send_seqs(
    w: &World,
    f: impl Fn(u32, u32, u32) -> (u32, u32, u32) + Send + 'static,
) {
    use crate::wire::Body;
    w.net.with_link(|l| {
        l.tamper(Box::new(move |from, _, d| {
            client_messages(from, d, |h, at, d| {
                if let Body::SendSeq {
                    seq,
                    msg_len,
                    msg_off,
                } = h.body
                {
                    let (seq, msg_len, msg_off) = f(seq, msg_len, msg_off);
                    let body = at + crate::wire::PREFIX_LEN;
                    for (i, v) in [seq, msg_len, msg_off].into_iter().enumerate() {
                        d[body + 4 * i..body + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
                false
            });
            false
        }))
    });
}

/// Drops the client's datagrams that carry part of message number `seq`.
fn drop_message(seq: u32) -> crate::frames::sim::Tamper {
    use crate::wire::Body;
    Box::new(move |from, _, d| {
        client_messages(
            from,
            d,
            |h, _, _| matches!(h.body, Body::SendSeq { seq: s, .. } if s == seq),
        )
    })
}

/// Messages 1..=5 arrive, message 0 does not: nothing may be delivered.
fn hold_five(w: &World) -> (Connection, Connection, Vec<Op<()>>) {
    let (conn, peer) = w.connect();
    w.net.with_link(|l| l.tamper(drop_message(0)));
    let ops: Vec<Op<()>> = (0..6)
        .map(|i| conn.send(&pattern(i, msg_len(i as usize + 2))).unwrap())
        .collect();
    let t0 = w.net.elapsed();
    w.until(Duration::from_secs(1), || {
        (w.net.elapsed() - t0 >= Duration::from_millis(200)).then_some(())
    });
    assert_eq!(
        peer.try_recv().unwrap(),
        None,
        "delivered ahead of message 0"
    );
    assert!(
        ops.iter().all(|o| !o.is_done()),
        "a held message was acknowledged"
    );
    (conn, peer, ops)
}

#[test]
fn a_lost_message_holds_back_later_ones_until_it_arrives() {
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (_conn, peer, ops) = hold_five(&w);
    w.net.with_link(|l| l.clear_tamper());
    for op in ops {
        w.wait(op).unwrap();
    }
    for i in 0..6 {
        let m = peer.try_recv().unwrap().expect("every message came");
        assert!(m == pattern(i, msg_len(i as usize + 2)), "message {i}");
    }
    assert_eq!(peer.try_recv().unwrap(), None);
}

/// One side closes while messages 1..=5 wait for message 0: none of them is delivered,
/// the receiver counts them, and their sends fail.
fn close_with_held_messages(receiver_closes: bool) {
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (conn, peer, ops) = hold_five(&w);
    if receiver_closes {
        peer.close();
    } else {
        conn.close();
    }
    for op in ops {
        let e = w.wait(op).unwrap_err();
        assert!(matches!(e, Error::ConnectionLost { .. }), "{e:?}");
    }
    w.until(Duration::from_secs(1), || {
        (conn.is_closed() && peer.is_closed()).then_some(())
    });
    // Nothing was delivered, and never will be: the receiver's queue is closed and empty.
    assert!(peer.try_recv().is_err());
    assert_eq!(peer.stats().messages_received, 0);
    assert_eq!(peer.stats().messages_discarded, 5);
}

#[test]
fn held_messages_are_discarded_and_counted_when_the_receiver_closes() {
    close_with_held_messages(true);
}

#[test]
fn held_messages_are_discarded_and_counted_when_the_sender_resets() {
    close_with_held_messages(false);
}

#[test]
fn an_initiator_that_does_not_number_messages_still_exchanges_them() {
    // An older initiator announces no FEATURE_MSG_SEQ: the connection falls back to
    // unnumbered SENDs both ways (delivered as they complete).
    super::ops::LEGACY_HELLO.set(true);
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (conn, peer) = w.connect();
    super::ops::LEGACY_HELLO.set(false);
    for (from, to) in [(&conn, &peer), (&peer, &conn)] {
        let ops: Vec<Op<()>> = (0..20)
            .map(|i| from.send(&pattern(i, msg_len(i as usize))).unwrap())
            .collect();
        for op in ops {
            w.wait(op).unwrap();
        }
        for i in 0..20 {
            let m = to.try_recv().unwrap().expect("every message came");
            assert!(m == pattern(i, msg_len(i as usize)), "message {i}");
        }
    }
    assert_eq!(
        peer.stats().protocol_errors + conn.stats().protocol_errors,
        0
    );
}

#[test]
fn messages_that_overtake_the_hello_ack_are_not_lost() {
    use crate::proto::packet::{Kind, Packet};
    use crate::wire::Body;
    let w = World::new(LinkConfig::default(), cfg(1500));
    // The target's first HELLO_ACK is lost; the messages it sends as soon as it has
    // accepted the connection reach the initiator before the HELLO_ACK does.
    let mut dropped = false;
    w.net.with_link(|l| {
        l.tamper(Box::new(move |from, _, d| {
            let hello_ack = from == sa(SERVER)
                && Packet::decode(d).is_ok_and(|p| {
                    p.kind == Kind::Data
                        && crate::proto::decode_messages(&d[p.body_at..], u32::MAX).is_some_and(
                            |m| {
                                m.iter()
                                    .any(|(h, _)| matches!(h.body, Body::HelloAck { .. }))
                            },
                        )
                });
            let drop = hello_ack && !dropped;
            dropped |= drop;
            drop
        }))
    });
    let mut peer = None;
    let mut sends = Vec::new();
    let conn = w
        .client
        .connect_sim(&format!("udp://{SERVER}"), || {
            w.step();
            if peer.is_none()
                && let Some(p) = w.server.try_accept()
            {
                sends = (0..3u64)
                    .map(|i| p.send(&pattern(i, 100)).unwrap())
                    .collect();
                peer = Some(p);
            }
        })
        .unwrap();
    assert!(
        peer.is_some(),
        "the target accepted before the initiator connected"
    );
    for op in sends {
        w.wait(op).unwrap();
    }
    for i in 0..3 {
        let m = conn.try_recv().unwrap().expect("every message came");
        assert!(m == pattern(i, 100), "message {i}");
    }
}

#[test]
fn a_peer_that_numbers_messages_it_never_sends_is_cut_off() {
    // An on-path attacker (no integrity) adds 1 to every message number from the
    // client: message 0 never comes, and everything the client sends is held for it.
    // With limits too large to stop it, the receive window bound does.
    let w = World::new(LinkConfig::default(), move || {
        let mut c = cfg(1500)().max_ops_in_flight(4096);
        c.max_incoming = 1 << 20;
        c.max_incoming_bytes = 1 << 30;
        c
    });
    let (conn, peer) = w.connect();
    rewrite_client_send_seqs(&w, |seq, len, off| (seq.wrapping_add(1), len, off));
    let ops: Vec<Op<()>> = (0..3000)
        .map(|i| conn.send(&pattern(i, 1000)).unwrap())
        .collect();
    w.until(Duration::from_secs(10), || peer.is_closed().then_some(()));
    for op in ops {
        assert!(w.wait(op).is_err(), "a held message was acknowledged");
    }
    let s = peer.stats();
    assert_eq!(s.messages_received, 0, "{s:?}");
    assert!(s.protocol_errors >= 1, "{s:?}");
    // Cut off once the held messages passed one receive window of datagrams: 1024
    // datagrams at MTU 1500 carry about 1,380 of these messages.
    assert!(
        (1000..1500).contains(&s.messages_discarded),
        "{} messages held before the connection was closed",
        s.messages_discarded
    );
}

#[test]
fn a_peer_that_changes_a_messages_length_midway_is_cut_off() {
    // An on-path attacker (no integrity) rewrites the length that every segment of
    // message 0 but the first announces, to 1 GiB: the receiver, which sized the
    // message's buffer (and checked the limit) by the first segment, must neither
    // follow it nor wait for bytes that never come.
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (conn, peer) = w.connect();
    rewrite_client_send_seqs(&w, |seq, len, off| {
        (seq, if off > 0 { 1 << 30 } else { len }, off)
    });
    let op = conn.send(&pattern(0, 5000)).unwrap();
    w.until(Duration::from_secs(10), || peer.is_closed().then_some(()));
    assert!(w.wait(op).is_err(), "the mangled message was acknowledged");
    let s = peer.stats();
    assert_eq!(s.messages_received, 0, "{s:?}");
    assert!(s.protocol_errors >= 1, "{s:?}");
}

#[test]
fn a_peer_that_begins_messages_it_never_finishes_is_cut_off() {
    // An on-path attacker (no integrity) rewrites the length every message from the
    // client announces to 64 KiB, the receiver's limit: each message (1,000 bytes, one
    // segment) makes the receiver set 64 KiB aside for the rest, which never comes. Past
    // what the receive window and two messages can leave unfinished, the peer is cut
    // off, long before its sends time out.
    const MAX: u32 = 64 << 10;
    let w = World::new(LinkConfig::default(), || {
        cfg(1500)().max_message_size(MAX as usize)
    });
    let (conn, peer) = w.connect();
    rewrite_client_send_seqs(&w, |seq, _, off| (seq, MAX, off));
    let ops: Vec<Op<()>> = (0..200)
        .map(|i| conn.send(&pattern(i, 1000)).unwrap())
        .collect();
    w.until(Duration::from_secs(1), || peer.is_closed().then_some(()));
    for op in ops {
        assert!(
            w.wait(op).is_err(),
            "an unfinished message was acknowledged"
        );
    }
    let s = peer.stats();
    assert_eq!(s.messages_received, 0, "{s:?}");
    assert!(s.protocol_errors >= 1, "{s:?}");
    let why = peer.send(b"x").unwrap_err().to_string();
    assert!(
        why.contains("receive window") && why.contains("65536 bytes each"),
        "{why}"
    );
}

#[test]
fn messages_of_the_largest_size_in_flight_are_not_taken_for_unfinished_ones() {
    // The bound on unfinished messages (the receive window plus two messages) does not
    // cut off an honest sender: 128 messages of the largest size, sent at once, through
    // loss, duplication and reordering.
    let link = LinkConfig {
        seed: 12,
        loss: 0.05,
        duplicate: 0.02,
        reorder: 0.10,
        reorder_by: Duration::from_micros(200),
        jitter: Duration::from_micros(20),
        ..LinkConfig::default()
    };
    let len = 64usize << 10;
    let w = World::new(link, move || cfg(1500)().max_message_size(len));
    let (conn, peer) = w.connect();
    let ops: Vec<Op<()>> = (0..128)
        .map(|i| conn.send(&pattern(i, len)).unwrap())
        .collect();
    for op in ops {
        w.wait(op).unwrap();
    }
    for i in 0..128 {
        let m = peer.try_recv().unwrap().expect("every message came");
        assert!(m == pattern(i, len), "message {i}");
    }
    let s = peer.stats();
    assert_eq!(s.protocol_errors, 0, "{s:?}");
    assert!(!peer.is_closed());
}

#[test]
fn an_init_without_room_for_the_integrity_tag_is_refused() {
    use crate::proto::packet::{Kind, Packet};
    // An INIT asking for integrity whose max_datagram leaves no room for a message and
    // the tag (240 bytes at least): an on-path rewrite of the initiator's (an INIT
    // carries no tag). The target refuses it (RESET unsupported) instead of deriving
    // segment sizes from it.
    for max_datagram in [0u32, 100, 176, 239] {
        let w = World::new(LinkConfig::default(), || {
            cfg(1500)()
                .secret(crate::Secret::from_bytes(b"a cluster secret of the tests").unwrap())
                .datagram_integrity(true)
        });
        w.net.with_link(|l| {
            l.tamper(Box::new(move |from, _, d| {
                if from == sa(CLIENT) && Packet::decode(d).is_ok_and(|p| p.kind == Kind::Init) {
                    // After the prefix: conn_id, first_seq, then max_datagram.
                    d[20..24].copy_from_slice(&max_datagram.to_le_bytes());
                }
                false
            }))
        });
        let r = w
            .client
            .connect_sim(&format!("udp://{SERVER}"), || w.step());
        assert!(r.is_err(), "{max_datagram}: connected");
        let s = w.server.stats();
        assert!(s.protocol_errors >= 1, "{max_datagram}: {s:?}");
        assert_eq!(w.server.connection_count(), 0, "{max_datagram}");
    }
}

/// How the tamper of [`inconsistent_write_segments`] changes every segment of a write
/// but the first.
#[derive(Debug, Clone, Copy)]
enum Disagree {
    /// Another region (with that region's token: every segment is authorized).
    Region,
    /// Another start of the write (its offset moved, its position in the write not).
    Base,
    /// Another notification value.
    Notify,
}

fn inconsistent_write_segments(how: Disagree) {
    use crate::wire::Body;
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (conn, peer) = w.connect();
    let a = w.server.alloc_region(64 << 10, Rights::ALL).unwrap();
    let b = w.server.alloc_region(64 << 10, Rights::ALL).unwrap();
    let ka = a.key(Rights::ALL).unwrap();
    let kb = b.key(Rights::ALL).unwrap();
    let src = w.client.alloc_region(4000, Rights::ALL).unwrap();
    src.write_at(0, &pattern(1, 4000)).unwrap();
    let (region, token) = (kb.region, kb.token);
    w.net.with_link(|l| {
        l.tamper(Box::new(move |from, _, d| {
            client_messages(from, d, |h, at, d| {
                if let Body::Write { op_off, .. } = h.body
                    && op_off > 0
                {
                    // The WRITE body: region, offset, token, op_len, op_off, notify.
                    let body = at + crate::wire::PREFIX_LEN;
                    match how {
                        Disagree::Region => {
                            d[body..body + 8].copy_from_slice(&region.to_le_bytes());
                            d[body + 16..body + 32].copy_from_slice(&token);
                        }
                        Disagree::Base => {
                            let f = body + 8..body + 16;
                            let off = u64::from_le_bytes(d[f.clone()].try_into().unwrap());
                            d[f].copy_from_slice(&(off + 10_000).to_le_bytes());
                        }
                        Disagree::Notify => {
                            d[body + 48..body + 52].copy_from_slice(&8u32.to_le_bytes());
                        }
                    }
                }
                false
            });
            false
        }))
    });
    let op = conn.write_with_notify(&src, 0, &ka, 0, 4000, 7).unwrap();
    w.until(Duration::from_secs(1), || peer.is_closed().then_some(()));
    assert!(w.wait(op).is_err(), "{how:?}: the write completed");
    assert!(
        !matches!(peer.try_notification(), Ok(Some(_))),
        "{how:?}: a notification came"
    );
    let s = peer.stats();
    assert!(s.protocol_errors >= 1, "{how:?}: {s:?}");
    let why = peer.send(b"x").unwrap_err().to_string();
    assert!(
        why.contains("inconsistent WRITE segments"),
        "{how:?}: {why}"
    );
}

#[test]
fn write_segments_that_disagree_on_the_region_are_cut_off() {
    inconsistent_write_segments(Disagree::Region);
}

#[test]
fn write_segments_that_disagree_on_where_the_write_starts_are_cut_off() {
    inconsistent_write_segments(Disagree::Base);
}

#[test]
fn write_segments_that_disagree_on_the_notification_are_cut_off() {
    inconsistent_write_segments(Disagree::Notify);
}

#[test]
fn a_write_acknowledged_early_sends_no_more_of_the_callers_memory() {
    use crate::wire::Body;
    use std::sync::{Arc, Mutex};
    // A misbehaving target acknowledges a 4 MiB write after its first segments (an
    // on-path rewrite renumbers the ACK of a small write to it). The write completes,
    // and the rest of it is not sent: its source region is the caller's again.
    let w = World::new(LinkConfig::default(), cfg(1500));
    let (conn, _peer) = w.connect();
    let len = 4u64 << 20;
    let target = w.server.alloc_region(len as usize, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let src = w.client.alloc_region(len as usize, Rights::ALL).unwrap();
    // The small write's op id, the large one's, and the offsets of the large one's
    // segments sent.
    type Seen = (Option<u64>, Option<u64>, std::collections::BTreeSet<u64>);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s2 = seen.clone();
    w.net.with_link(|l| {
        l.tamper(Box::new(move |from, _, d| {
            let mut s = s2.lock().unwrap();
            data_messages(d, |h, at, d| {
                match h.body {
                    Body::Write { op_len, op_off, .. } if from == sa(CLIENT) => {
                        if op_len == len {
                            s.1 = Some(h.op_id);
                            s.2.insert(op_off);
                        } else {
                            s.0 = Some(h.op_id);
                        }
                    }
                    Body::Ack if from == sa(SERVER) && Some(h.op_id) == s.0 => {
                        if let Some(big) = s.1 {
                            d[at + 8..at + 16].copy_from_slice(&big.to_le_bytes());
                        }
                    }
                    _ => {}
                }
                false
            });
            false
        }))
    });
    let _small = conn.write(&src, 0, &key, 0, 100).unwrap();
    let big = conn.write(&src, 0, &key, 0, len).unwrap();
    w.wait(big).unwrap();
    let t0 = w.net.elapsed();
    w.until(Duration::from_secs(1), || {
        (w.net.elapsed() - t0 >= Duration::from_millis(100)).then_some(())
    });
    let sent = seen.lock().unwrap().2.len() as u64;
    let segments = len.div_ceil(1472 - 88 - crate::wire::MAX_HEADER_LEN as u64);
    assert!(
        sent < segments / 4,
        "{sent} of the {segments} segments sent, most after the write completed"
    );
}
