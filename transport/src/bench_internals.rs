//! Entry points for the criterion benchmarks in `benches/` and the fuzz targets in
//! `fuzz/` (cargo feature `bench-internals`): the datagram protocol engine and the UDP
//! frame driver, without the rest of the stack. Not part of the API: it may change in
//! any release.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::frames::Driver;
use crate::frames::udp::UdpDriver;
use crate::proto::packet::{Kind, Packet};
use crate::proto::{Config, Conn, OutMsg, Payload, Sink, State};
use crate::wire::{Body, Header};

/// Counts what it is given.
#[derive(Default)]
struct Count {
    messages: usize,
    bytes: usize,
}

impl Sink for Count {
    fn can_accept(&mut self, _: &[(Header, &[u8])]) -> bool {
        true
    }
    fn deliver(&mut self, h: Header, payload: &[u8]) {
        if !matches!(h.body, Body::Ping) {
            self.messages += 1;
            self.bytes += payload.len();
        }
    }
}

/// Two protocol connections wired back to back in memory, on a virtual clock that jumps
/// to the next timer when nothing is in flight: what is measured is the protocol's own
/// work per datagram (segmenting, header encoding, ACK processing, loss detection,
/// delivery), with no socket and no sleeping.
#[allow(missing_debug_implementations)]
pub struct ProtoPair {
    a: Conn,
    b: Conn,
    now: Instant,
    wire: VecDeque<(bool, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
    sink_a: Count,
    sink_b: Count,
    payload: Arc<[u8]>,
    next_op: u64,
    /// Datagrams carried so far, both directions.
    pub datagrams: u64,
    /// The first datagrams carried (handshake, data, ACKs), kept when `recording`.
    recorded: Vec<Vec<u8>>,
    recording: bool,
}

impl ProtoPair {
    /// A connected pair whose datagrams are at most `max_datagram` bytes.
    pub fn new(max_datagram: usize) -> ProtoPair {
        ProtoPair::build(max_datagram, false)
    }

    /// The same, with per-datagram integrity: every datagram tagged and checked.
    pub fn with_integrity(max_datagram: usize) -> ProtoPair {
        ProtoPair::build(max_datagram, true)
    }

    fn build(max_datagram: usize, integrity: bool) -> ProtoPair {
        let cfg = Config {
            max_datagram,
            secret: integrity.then(|| {
                crate::Secret::from_bytes(b"a cluster secret for benchmarks").expect("valid")
            }),
            integrity,
            ..Config::default()
        };
        let now = Instant::now();
        let mut a = Conn::client(cfg.clone(), 1, 1000, now);
        if integrity {
            a.request_integrity([1; crate::proto::mac::NONCE_LEN]);
        }
        let mut buf = Vec::new();
        let mut b = None;
        while a.poll_transmit(now, &mut buf) {
            if let Ok(Packet {
                kind: Kind::Init,
                init: Some(init),
                nonce,
                ..
            }) = Packet::decode(&buf)
            {
                let mut s = Conn::server(cfg.clone(), 2, 5000, &init, now);
                if let Some(n) = nonce {
                    s.grant_integrity(n, [2; crate::proto::mac::NONCE_LEN]);
                }
                b = Some(s);
            }
        }
        let b = b.expect("a new client connection sends INIT");
        let mut pair = ProtoPair {
            a,
            b,
            now,
            wire: VecDeque::new(),
            spare: Vec::new(),
            sink_a: Count::default(),
            sink_b: Count::default(),
            payload: vec![0x5a; 64 << 10].into(),
            next_op: 0,
            datagrams: 0,
            recorded: Vec::new(),
            recording: false,
        };
        pair.pump();
        assert_eq!(
            pair.a.state(),
            &State::Established,
            "the handshake completes"
        );
        pair
    }

    fn transmit(&mut self) {
        let now = self.now;
        for to_b in [true, false] {
            loop {
                let mut buf = self.spare.pop().unwrap_or_default();
                let c = if to_b { &mut self.a } else { &mut self.b };
                if !c.poll_transmit(now, &mut buf) {
                    self.spare.push(buf);
                    break;
                }
                self.wire.push_back((to_b, buf));
            }
        }
    }

    /// Carry datagrams both ways, firing timers on the virtual clock, until nothing is
    /// left to send or deliver and no timer is due.
    fn pump(&mut self) {
        self.pump_at_most(usize::MAX);
    }

    /// [`Self::pump`], for at most `rounds` rounds.
    fn pump_at_most(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.transmit();
            if self.wire.is_empty() {
                // Jump to the earliest timer (a delayed ACK, say) and let it fire.
                let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                match next {
                    Some(t) if !self.a.is_idle() || !self.b.is_idle() => {
                        self.now = self.now.max(t);
                        for c in [&mut self.a, &mut self.b] {
                            if c.poll_timeout().is_some_and(|t| t <= self.now) {
                                c.handle_timeout(self.now);
                            }
                        }
                        continue;
                    }
                    _ => return,
                }
            }
            while let Some((to_b, d)) = self.wire.pop_front() {
                self.datagrams += 1;
                if self.recording && self.recorded.len() < 64 {
                    self.recorded.push(d.clone());
                }
                if let Ok(p) = Packet::decode(&d) {
                    if to_b {
                        self.b.handle(self.now, &p, &d, &mut self.sink_b);
                    } else {
                        self.a.handle(self.now, &p, &d, &mut self.sink_a);
                    }
                }
                self.spare.push(d);
            }
            // A microsecond per round, so RTT samples stay meaningful.
            self.now += Duration::from_micros(1);
        }
    }

    /// Send `n` messages of `len` bytes (at most 64 KiB) from one side to the other and
    /// carry every datagram (data and ACKs) until both sides are idle. Returns the
    /// messages delivered.
    pub fn transfer(&mut self, n: usize, len: usize) -> usize {
        let len = len.min(self.payload.len());
        let before = self.sink_b.messages;
        let mut queued = 0;
        while queued < n {
            while queued < n && self.a.can_queue() {
                // Numbered, as the datagram backends send messages.
                let h = Header {
                    op_id: self.next_op,
                    payload_len: len as u32,
                    body: Body::SendSeq {
                        seq: self.next_op as u32,
                        msg_len: len as u32,
                        msg_off: 0,
                    },
                };
                self.next_op += 1;
                self.a.queue(OutMsg::new(
                    &h,
                    Payload::Shared(self.payload.clone(), 0..len),
                ));
                queued += 1;
            }
            self.pump();
        }
        self.pump();
        self.sink_b.messages - before
    }

    /// Payload bytes delivered so far.
    pub fn delivered_bytes(&self) -> usize {
        self.sink_b.bytes + self.sink_a.bytes
    }
}

/// Fuzzing entry: an established connection pair fed hostile datagrams.
///
/// `input` is a sequence of records `[len_lo, len_hi, bytes…]`: bit 15 of the length
/// picks the side the datagram is delivered to, bit 14 first advances the virtual clock
/// by 50 ms (firing timers), the low 12 bits are the record's length. With bit 13 the
/// record does not hold a datagram but mutates a real one: its first byte picks one of
/// the datagrams the pair exchanged while connecting and moving a few messages (so the
/// fuzzer starts from valid DATA and ACK packets), and its other bytes are XORed into
/// it. An INIT also opens a fresh target connection, as a listener would. Between
/// records, and at the end, both sides exchange what they have to say for a bounded
/// number of rounds. Bit 12 of the first record's length word gives the pair (and the
/// fresh targets) per-datagram integrity. Must never panic, whatever the input.
pub fn proto_receive(input: &[u8]) {
    let integrity = input.get(1).is_some_and(|b| b & 0x10 != 0);
    let mut pair = ProtoPair::build(1472, integrity);
    let fresh_cfg = pair.b.config().clone();
    pair.recording = true;
    pair.transfer(4, 1024);
    pair.transfer(6, 8);
    pair.recording = false;
    let real = std::mem::take(&mut pair.recorded);
    let mut rest = input;
    while rest.len() >= 2 {
        let head = u16::from_le_bytes([rest[0], rest[1]]);
        let len = usize::from(head & 0x0fff).min(rest.len() - 2);
        let record = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let mutated;
        let d = match (head & 0x2000 != 0, record.split_first()) {
            (true, Some((&pick, flips))) if !real.is_empty() => {
                let mut m = real[usize::from(pick) % real.len()].clone();
                for (b, f) in m.iter_mut().zip(flips) {
                    *b ^= f;
                }
                mutated = m;
                &mutated[..]
            }
            _ => record,
        };
        if head & 0x4000 != 0 {
            pair.now += Duration::from_millis(50);
            for c in [&mut pair.a, &mut pair.b] {
                if c.poll_timeout().is_some_and(|t| t <= pair.now) {
                    c.handle_timeout(pair.now);
                }
            }
        }
        let Ok(p) = Packet::decode(d) else {
            continue;
        };
        if let (Kind::Init, Some(init)) = (p.kind, &p.init) {
            let mut fresh = Conn::server(fresh_cfg.clone(), 9, 77, init, pair.now);
            if let Some(n) = p.nonce {
                fresh.grant_integrity(n, [3; crate::proto::mac::NONCE_LEN]);
            }
            let mut out = Vec::new();
            let mut n = 0;
            while n < 64 && fresh.poll_transmit(pair.now, &mut out) {
                n += 1;
            }
        }
        if head & 0x8000 != 0 {
            pair.a.handle(pair.now, &p, d, &mut pair.sink_a);
        } else {
            pair.b.handle(pair.now, &p, d, &mut pair.sink_b);
        }
        pair.pump_at_most(8);
    }
    pair.pump_at_most(64);
}

/// Two UDP frame drivers on loopback: datagrams sent as one batch and received by the
/// other side, through the io_uring ring (`ring`) or recvmmsg/sendmmsg (busy-poll).
#[allow(missing_debug_implementations)]
pub struct UdpPair {
    a: UdpDriver,
    b: UdpDriver,
    to: SocketAddr,
    datagram: Vec<u8>,
}

impl UdpPair {
    /// Bind both drivers on 127.0.0.1; `len` is the datagram size.
    pub fn new(ring: bool, len: usize) -> std::io::Result<UdpPair> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut a = UdpDriver::bind(any, !ring, len)?;
        let mut b = UdpDriver::bind(any, !ring, len)?;
        a.start(true)?;
        b.start(true)?;
        let to = b.local_addr();
        Ok(UdpPair {
            a,
            b,
            to,
            datagram: vec![0xa5; len],
        })
    }

    /// Send `n` datagrams as one batch and receive them on the other side; returns how
    /// many arrived within a second (the kernel may drop some if its buffer is full).
    pub fn round(&mut self, n: usize) -> usize {
        for _ in 0..n {
            self.a.send(self.to, &self.datagram);
        }
        self.a.flush();
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut got = 0;
        while got < n {
            got += self.b.recv(&mut |_, d| {
                std::hint::black_box(d);
            });
            if got < n {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                // Reaps the sender's completions too.
                self.a.recv(&mut |_, _| {});
                self.b.wait(Some(now + Duration::from_millis(1)));
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_pair_delivers_every_message_and_goes_idle() {
        for mut p in [ProtoPair::new(1472), ProtoPair::with_integrity(1472)] {
            p.check_delivers();
        }
    }

    impl ProtoPair {
        fn check_delivers(&mut self) {
            let p = self;
            for _ in 0..3 {
                assert_eq!(p.transfer(100, 1024), 100);
                assert!(p.a.is_idle(), "everything acknowledged");
            }
            assert_eq!(p.delivered_bytes(), 300 * 1024);
            // 1 KiB messages need a datagram each, plus ACKs.
            assert!(p.datagrams > 300, "{}", p.datagrams);
            assert_eq!(
                p.a.stats.integrity_failures + p.b.stats.integrity_failures,
                0
            );
        }
    }

    #[test]
    fn hostile_datagrams_are_survived() {
        // A valid-looking record stream: each datagram delivered to a side, time moving.
        let mut input = Vec::new();
        for (i, d) in [&[0u8; 0][..], &[1, 2, 3], &[0xff; 40], &[0x01; 1500]]
            .iter()
            .enumerate()
        {
            let head = (d.len() as u16) | if i % 2 == 0 { 0x8000 } else { 0x4000 };
            input.extend_from_slice(&head.to_le_bytes());
            input.extend_from_slice(d);
        }
        proto_receive(&input);
        // Real datagrams replayed unchanged and with bits flipped, to both sides.
        // Then the same with per-datagram integrity (bit 12).
        for integrity in [0u16, 0x1000] {
            let mut replay = Vec::new();
            for pick in 0u8..40 {
                for (side, flip) in [(0u16, 0u8), (0x8000, 0x10)] {
                    replay.extend_from_slice(&(0x2000 | integrity | side | 3).to_le_bytes());
                    replay.extend_from_slice(&[pick, 0, flip]);
                }
            }
            proto_receive(&replay);
        }
        proto_receive(&[0xff]);
        proto_receive(&[0xff, 0xff, 1, 2]);
    }

    #[test]
    fn the_udp_pair_carries_a_batch_both_ways_of_driving() {
        for ring in [true, false] {
            let mut u = UdpPair::new(ring, 1472).unwrap();
            assert_eq!(u.round(64), 64, "ring {ring}");
        }
    }
}
