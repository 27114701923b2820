//! Two connections over the simulated link, in virtual time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::packet::{Kind, Packet};
use super::*;
use crate::frames::sim::{LinkConfig, SimLink};
use crate::wire::{Body, Header};

fn addr(p: u16) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 1], p))
}

#[derive(Default)]
struct Collect {
    got: Vec<(u64, Vec<u8>)>,
    refuse: bool,
}

impl Sink for Collect {
    fn can_accept(&mut self, _: &[(Header, &[u8])]) -> bool {
        !self.refuse
    }
    fn deliver(&mut self, h: Header, payload: &[u8]) {
        if !matches!(h.body, Body::Ping) {
            self.got.push((h.op_id, payload.to_vec()));
        }
    }
}

struct Net {
    link: SimLink,
    a: Conn,
    b: Option<Conn>,
    a_sink: Collect,
    b_sink: Collect,
    b_cfg: Config,
    b_first: u32,
    buf: Vec<u8>,
}

const A: u16 = 1;
const B: u16 = 2;

impl Net {
    fn new(link: LinkConfig, cfg: Config, a_first: u32, b_first: u32) -> Net {
        let link = SimLink::new(link);
        let now = link.now();
        let mut a = Conn::client(cfg.clone(), 11, a_first, now);
        if cfg.integrity {
            a.request_integrity([5; mac::NONCE_LEN]);
        }
        Net {
            a,
            link,
            b: None,
            a_sink: Collect::default(),
            b_sink: Collect::default(),
            b_cfg: cfg,
            b_first,
            buf: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.link.now()
    }

    fn transmit(&mut self) {
        let now = self.now();
        while self.a.poll_transmit(now, &mut self.buf) {
            self.link.send(addr(A), addr(B), &self.buf);
        }
        if let Some(b) = self.b.as_mut() {
            while b.poll_transmit(now, &mut self.buf) {
                self.link.send(addr(B), addr(A), &self.buf);
            }
        }
    }

    /// One step: timers, sends, deliveries, sends.
    fn step(&mut self) {
        let now = self.now();
        for c in [Some(&mut self.a), self.b.as_mut()].into_iter().flatten() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
        self.transmit();
        let mut arrived = Vec::new();
        self.link.take_arrived(&mut arrived);
        for (to, _from, d) in arrived {
            let Ok(p) = Packet::decode(&d) else {
                continue;
            };
            if to == addr(B) {
                if self.b.is_none() && p.kind == Kind::Init {
                    if let Some(init) = &p.init {
                        let mut b = Conn::server(self.b_cfg.clone(), 22, self.b_first, init, now);
                        if let Some(theirs) = p.nonce {
                            assert!(b.grant_integrity(theirs, [6; mac::NONCE_LEN]));
                        }
                        self.b = Some(b);
                    }
                    continue;
                }
                if let Some(b) = self.b.as_mut() {
                    b.handle(now, &p, &d, &mut self.b_sink);
                }
            } else {
                self.a.handle(now, &p, &d, &mut self.a_sink);
            }
        }
        self.transmit();
    }

    /// Move virtual time to the next event; false when nothing will ever happen again.
    fn advance(&mut self) -> bool {
        let mut next = self.link.next_arrival();
        for c in [Some(&self.a), self.b.as_ref()].into_iter().flatten() {
            if let Some(t) = c.poll_timeout() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        match next {
            Some(t) => {
                self.link.advance_to(t);
                true
            }
            None => false,
        }
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Net) -> bool) -> bool {
        while self.link.elapsed() < limit {
            if done(self) {
                return true;
            }
            self.step();
            if done(self) {
                return true;
            }
            if !self.advance() {
                return false;
            }
        }
        done(self)
    }

    fn queue_all(&mut self, n: u64, len: usize) {
        for i in 0..n {
            self.a.queue(msg(i, len));
        }
    }
}

fn msg(i: u64, len: usize) -> OutMsg {
    let data: Arc<[u8]> = (0..len).map(|k| (k as u64 * 31 + i) as u8).collect();
    OutMsg::new(
        &Header {
            op_id: i,
            payload_len: len as u32,
            body: Body::Send {
                msg_len: len as u64,
                msg_off: 0,
            },
        },
        Payload::Shared(data, 0..len),
    )
}

fn check_exactly_once(got: &[(u64, Vec<u8>)], n: u64, len: usize) {
    let mut ids: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..n).collect::<Vec<_>>(),
        "every message exactly once"
    );
    for (i, p) in got {
        assert_eq!(p.len(), len);
        assert!(
            p.iter()
                .enumerate()
                .all(|(k, &b)| b == (k as u64 * 31 + i) as u8)
        );
    }
}

/// Drive a one-way transfer of `n` messages and return the virtual time it took.
fn one_way(link: LinkConfig, cfg: Config, n: u64, len: usize, a_first: u32) -> (Net, Duration) {
    let mut net = Net::new(link, cfg, a_first, 7);
    assert!(net.run_until(Duration::from_secs(5), |n| n.a.state()
        == &State::Established));
    let t0 = net.link.elapsed();
    net.queue_all(n, len);
    let ok = net.run_until(Duration::from_secs(3600), |net| {
        net.b_sink.got.len() as u64 >= n && net.a.is_idle()
    });
    assert!(
        ok,
        "transfer did not finish: {} of {n} delivered, state {:?}",
        net.b_sink.got.len(),
        net.a.state()
    );
    let took = net.link.elapsed() - t0;
    check_exactly_once(&net.b_sink.got, n, len);
    (net, took)
}

fn cfg() -> Config {
    Config {
        max_datagram: 1472,
        ..Config::default()
    }
}

#[test]
fn delivers_everything_exactly_once_through_loss_duplication_and_reordering() {
    for (seed, loss) in [(1, 0.0), (2, 0.01), (3, 0.05), (4, 0.20)] {
        let link = LinkConfig {
            seed,
            loss,
            duplicate: 0.02,
            reorder: 0.05,
            jitter: Duration::from_micros(5),
            ..LinkConfig::default()
        };
        let (net, took) = one_way(link, cfg(), 3000, 1000, 100);
        assert!(took < Duration::from_secs(60), "loss {loss}: took {took:?}");
        if loss > 0.0 {
            assert!(net.a.stats.retransmits > 0);
        }
        assert!(net.b.as_ref().unwrap().stats.duplicates > 0 || loss == 0.0);
    }
}

#[test]
fn packet_numbers_wrap_around() {
    let (net, _) = one_way(LinkConfig::default(), cfg(), 5000, 200, u32::MAX - 200);
    assert!(seq_lt(u32::MAX - 200, net.a.next_seq()));
    assert!(
        net.a.next_seq() < 10_000,
        "the sender's numbers wrapped: {}",
        net.a.next_seq()
    );
}

#[test]
fn goodput_at_one_percent_loss_is_at_least_half_of_lossless() {
    let base = LinkConfig {
        delay: Duration::from_micros(25),
        bandwidth: Some(1_250_000_000),
        ..LinkConfig::default()
    };
    let (_, clean) = one_way(base.clone(), cfg(), 20_000, 1300, 5);
    let (_, lossy) = one_way(
        LinkConfig {
            seed: 99,
            loss: 0.01,
            ..base
        },
        cfg(),
        20_000,
        1300,
        5,
    );
    eprintln!("goodput: lossless {clean:?}, 1% loss {lossy:?}");
    assert!(
        lossy.as_secs_f64() <= 2.0 * clean.as_secs_f64(),
        "lossless {clean:?}, 1% loss {lossy:?}"
    );
}

#[test]
fn a_congested_bottleneck_is_shared_not_flooded() {
    // A slow link with a short queue: the sender must back off instead of losing most of
    // what it sends, and still keep the link busy.
    let link = LinkConfig {
        bandwidth: Some(100_000_000),
        queue_limit: 32,
        delay: Duration::from_micros(50),
        ..LinkConfig::default()
    };
    let (net, took) = one_way(link, cfg(), 5000, 1300, 3);
    let bytes = 5000.0 * 1316.0;
    let rate = bytes / took.as_secs_f64();
    let overflow = net
        .link
        .trace
        .iter()
        .filter(|e| e.fate == crate::frames::sim::Fate::QueueFull)
        .count();
    let loss = overflow as f64 / net.a.stats.packets_sent as f64;
    assert!(
        rate > 0.7 * 100e6,
        "goodput {rate:.0} B/s on a 100 MB/s link"
    );
    assert!(
        loss < 0.05,
        "{overflow} of {} packets dropped at the queue",
        net.a.stats.packets_sent
    );
    assert!(
        overflow > 0,
        "the queue should overflow at least once (slow start)"
    );
}

#[test]
fn a_silent_peer_is_declared_dead_within_the_bound() {
    let c = Config {
        dead_after: Duration::from_millis(200),
        keepalive: Duration::from_millis(50),
        ..cfg()
    };
    let mut net = Net::new(LinkConfig::default(), c, 1, 2);
    assert!(net.run_until(Duration::from_secs(1), |n| n.b.is_some()
        && n.a.state() == &State::Established));
    net.queue_all(10, 100);
    net.link.set_loss(1.0);
    let t0 = net.link.elapsed();
    assert!(net.run_until(Duration::from_secs(5), |n| n.a.is_closed()));
    let took = net.link.elapsed() - t0;
    assert!(
        took <= Duration::from_millis(250),
        "declared dead after {took:?}"
    );
    assert!(matches!(net.a.state(), State::Closed(r) if r.contains("silent")));
}

#[test]
fn a_frozen_peer_that_resumes_recovers() {
    let c = Config {
        dead_after: Duration::from_secs(2),
        ..cfg()
    };
    let mut net = Net::new(LinkConfig::default(), c, 1, 2);
    assert!(net.run_until(Duration::from_secs(1), |n| n.a.state()
        == &State::Established
        && n.b.is_some()));
    net.queue_all(500, 800);
    net.run_until(Duration::from_millis(1), |_| false);
    net.link.freeze(addr(B));
    let t = net.link.elapsed();
    net.run_until(t + Duration::from_millis(500), |_| false);
    net.link.thaw(addr(B));
    assert!(
        net.run_until(Duration::from_secs(30), |n| n.b_sink.got.len() == 500
            && n.a.is_idle())
    );
    assert!(!net.a.is_closed());
    check_exactly_once(&net.b_sink.got, 500, 800);
    assert!(
        net.a.stats.timeouts > 0,
        "the freeze should have cost timeouts"
    );
}

#[test]
fn a_paused_receiver_holds_the_sender_without_losing_anything() {
    let mut net = Net::new(LinkConfig::default(), cfg(), 1, 2);
    assert!(net.run_until(Duration::from_secs(1), |n| n.b.is_some()
        && n.a.state() == &State::Established));
    net.b.as_mut().unwrap().set_paused(true);
    net.b_sink.refuse = true;
    net.queue_all(200, 500);
    let t = net.link.elapsed();
    net.run_until(t + Duration::from_millis(100), |_| false);
    assert!(net.b_sink.got.is_empty());
    assert!(!net.a.is_closed());
    net.b.as_mut().unwrap().set_paused(false);
    net.b_sink.refuse = false;
    assert!(
        net.run_until(Duration::from_secs(30), |n| n.b_sink.got.len() == 200
            && n.a.is_idle())
    );
    check_exactly_once(&net.b_sink.got, 200, 500);
}

#[test]
fn garbage_datagrams_are_dropped_and_counted() {
    let mut net = Net::new(LinkConfig::default(), cfg(), 1, 2);
    assert!(net.run_until(Duration::from_secs(1), |n| n.b.is_some()
        && n.a.state() == &State::Established));
    let now = net.now();
    let b = net.b.as_mut().unwrap();
    // A DATA packet whose message runs past the end of the datagram.
    let mut d = Vec::new();
    packet::put_prefix(&mut d, Kind::Data, 22, 2, false);
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = Header {
        op_id: 1,
        payload_len: 500,
        body: Body::Send {
            msg_len: 500,
            msg_off: 0,
        },
    }
    .encode(&mut h);
    d.extend_from_slice(&h[..n]);
    d.extend_from_slice(&[0u8; 10]);
    let p = Packet::decode(&d).unwrap();
    b.handle(now, &p, &d, &mut net.b_sink);
    assert_eq!(b.stats.malformed, 1);
    assert!(net.b_sink.got.is_empty());
    // An ACK for packets never sent is ignored.
    let mut d = Vec::new();
    packet::put_prefix(&mut d, Kind::Ack, 11, 0, false);
    packet::put_ack(
        &mut d,
        &packet::AckBlock {
            cumulative: 1_000_000,
            window: 10,
            delay_us: 0,
            ranges: vec![],
        },
    );
    let p = Packet::decode(&d).unwrap();
    net.a.handle(now, &p, &d, &mut net.a_sink);
    assert_eq!(net.a.stats.malformed, 1);
    // The connection still works.
    net.queue_all(10, 100);
    assert!(net.run_until(Duration::from_secs(5), |n| n.b_sink.got.len() == 10));
}

proptest::proptest! {
    #[test]
    fn random_datagrams_never_panic(d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        let link = SimLink::new(LinkConfig::default());
        let now = link.now();
        let mut c = Conn::server(cfg(), 5, 0, &packet::Init { conn_id: 6, first_seq: 0, max_datagram: 1472, window: 64, flags: 0 }, now);
        let mut sink = Collect::default();
        if let Ok(p) = Packet::decode(&d) {
            c.handle(now, &p, &d, &mut sink);
        }
        let mut out = Vec::new();
        while c.poll_transmit(now, &mut out) {}
    }
}

#[test]
fn late_acks_after_a_timeout_leave_nothing_to_resend() {
    // The receiver stalls for longer than the retransmission timeout (a descheduled
    // thread): its ACKs arrive after the sender presumed everything lost. Once they do,
    // new data must leave at once, not wait behind the stale resend queue.
    let mut net = Net::new(LinkConfig::default(), cfg(), 5, 7);
    assert!(net.run_until(Duration::from_secs(5), |n| n.a.state()
        == &State::Established));
    net.queue_all(20, 1000);
    let now = net.now();
    let mut data = Vec::new();
    while net.a.poll_transmit(now, &mut net.buf) {
        data.push(net.buf.clone());
    }
    assert_eq!(data.len(), 20);
    let b = net.b.as_mut().expect("server side");
    for d in &data {
        b.handle(now, &Packet::decode(d).unwrap(), d, &mut net.b_sink);
    }
    let mut acks = Vec::new();
    while b.poll_transmit(now, &mut net.buf) {
        acks.push(net.buf.clone());
    }
    assert!(!acks.is_empty());
    // The ACKs are late: the timeout fires first and everything goes to the resend queue.
    let rto = net.a.rto_at.expect("a retransmission timer runs");
    net.link.advance_to(rto);
    let later = net.now();
    net.a.handle_timeout(later);
    assert_eq!(net.a.retx.len(), 20);
    for d in &acks {
        net.a
            .handle(later, &Packet::decode(d).unwrap(), d, &mut net.a_sink);
    }
    assert!(net.a.retx.is_empty(), "acknowledged packets are not resent");
    net.a.queue(msg(20, 1000));
    let mut sent = 0;
    while net.a.poll_transmit(later, &mut net.buf) {
        if Packet::decode(&net.buf).unwrap().kind == Kind::Data {
            sent += 1;
        }
    }
    assert_eq!(sent, 1, "the new message leaves in the same poll");
    assert_eq!(net.a.stats.retransmits, 0);
}

fn integrity_cfg() -> Config {
    Config {
        secret: Some(crate::Secret::from_bytes(b"a cluster secret of the tests").unwrap()),
        integrity: true,
        ..cfg()
    }
}

#[test]
fn integrity_delivers_exactly_once_through_loss_duplication_and_reordering() {
    let link = LinkConfig {
        seed: 7,
        loss: 0.05,
        duplicate: 0.02,
        reorder: 0.05,
        jitter: Duration::from_micros(5),
        ..LinkConfig::default()
    };
    let (net, _) = one_way(link, integrity_cfg(), 2000, 1000, 100);
    let b = net.b.as_ref().unwrap();
    assert!(net.a.has_integrity() && b.has_integrity());
    assert_eq!(
        net.a.stats.integrity_failures + b.stats.integrity_failures,
        0
    );
    assert!(
        b.stats.duplicates > 0,
        "replayed datagrams were seen and dropped"
    );
    // Room for the tag: a full datagram still fits.
    assert_eq!(
        net.a.max_message() + mac::TAG_LEN,
        cfg().max_datagram - header_overhead()
    );
}

/// Established connections and one DATA datagram from `a` carrying message 0.
fn captured_data(cfg: Config) -> (Net, Vec<u8>) {
    let mut net = Net::new(LinkConfig::default(), cfg, 1, 2);
    assert!(net.run_until(Duration::from_secs(1), |n| n.b.is_some()
        && n.a.state() == &State::Established
        && n.b.as_ref().unwrap().state() == &State::Established));
    net.a.queue(msg(0, 300));
    let mut d = Vec::new();
    assert!(net.a.poll_transmit(net.now(), &mut d));
    assert_eq!(Packet::decode(&d).unwrap().kind, Kind::Data);
    (net, d)
}

fn feed_b(net: &mut Net, d: &[u8]) {
    let now = net.now();
    if let Ok(p) = Packet::decode(d) {
        net.b.as_mut().unwrap().handle(now, &p, d, &mut net.b_sink);
    }
}

#[test]
fn integrity_drops_altered_forged_and_stripped_datagrams() {
    let (mut net, genuine) = captured_data(integrity_cfg());
    let p = Packet::decode(&genuine).unwrap();
    assert!(p.mac);
    // Every single-bit change of the payload, the header or the tag is refused.
    let mut tries = 0;
    for at in (0..genuine.len()).step_by(7) {
        let mut x = genuine.clone();
        x[at] ^= 0x10;
        feed_b(&mut net, &x);
        tries += 1;
    }
    // The same datagram with its tag cut off and the flag cleared, as an attacker
    // without the keys would send it.
    let mut stripped = genuine[..genuine.len() - mac::TAG_LEN].to_vec();
    stripped[2] &= !(packet::FLAG_MAC as u8);
    feed_b(&mut net, &stripped);
    // A forged RESET after establishment does not close the connection.
    feed_b(&mut net, &packet::reset(22, packet::ResetReason::Closed));
    let b = net.b.as_ref().unwrap();
    assert!(net.b_sink.got.is_empty(), "nothing forged was delivered");
    assert!(!b.is_closed());
    // Decodable alterations count as integrity failures; the rest never parse.
    assert!(b.stats.integrity_failures >= 2 && b.stats.integrity_failures <= tries + 2);
    // The genuine datagram, then its replay: delivered once.
    feed_b(&mut net, &genuine);
    feed_b(&mut net, &genuine);
    assert_eq!(net.b_sink.got.len(), 1);
    check_exactly_once(&net.b_sink.got, 1, 300);
    assert_eq!(net.b.as_ref().unwrap().stats.duplicates, 1);
    // And the connection carries on.
    net.queue_all(20, 100);
    assert!(net.run_until(Duration::from_secs(5), |n| n.b_sink.got.len() == 21));
}

#[test]
fn without_integrity_an_altered_payload_gets_through() {
    // What integrity buys: the same single-bit change is accepted when it is off.
    let (mut net, genuine) = captured_data(cfg());
    let mut x = genuine.clone();
    let last = x.len() - 1;
    x[last] ^= 0x10;
    feed_b(&mut net, &x);
    assert_eq!(net.b_sink.got.len(), 1);
    assert_ne!(net.b_sink.got[0].1, msg_bytes(0, 300));
}

fn msg_bytes(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k as u64 * 31 + i) as u8).collect()
}

#[test]
fn an_initiator_asking_for_integrity_refuses_a_target_without_it() {
    let mut net = Net::new(LinkConfig::default(), integrity_cfg(), 1, 2);
    net.b_cfg = cfg();
    // The target below ignores the nonce (no secret to grant it with).
    let now = net.now();
    let mut d = Vec::new();
    assert!(net.a.poll_transmit(now, &mut d));
    let p = Packet::decode(&d).unwrap();
    assert!(p.nonce.is_some() && !p.mac);
    let mut b = Conn::server(cfg(), 22, 2, p.init.as_ref().unwrap(), now);
    assert!(!b.grant_integrity(p.nonce.unwrap(), [6; mac::NONCE_LEN]));
    assert!(b.poll_transmit(now, &mut d));
    let p = Packet::decode(&d).unwrap();
    net.a.handle(now, &p, &d, &mut net.a_sink);
    assert_eq!(net.a.state(), &State::Closed(INTEGRITY_REFUSED.into()));
}

#[test]
fn an_init_ack_with_a_wrong_tag_fails_the_connection() {
    let mut net = Net::new(LinkConfig::default(), integrity_cfg(), 1, 2);
    let now = net.now();
    let mut d = Vec::new();
    assert!(net.a.poll_transmit(now, &mut d));
    let p = Packet::decode(&d).unwrap();
    // A target holding another secret.
    let other = Config {
        secret: Some(crate::Secret::from_bytes(b"not the cluster secret").unwrap()),
        ..integrity_cfg()
    };
    let mut b = Conn::server(other, 22, 2, p.init.as_ref().unwrap(), now);
    assert!(b.grant_integrity(p.nonce.unwrap(), [6; mac::NONCE_LEN]));
    assert!(b.poll_transmit(now, &mut d));
    let p = Packet::decode(&d).unwrap();
    assert!(p.mac && p.nonce.is_some());
    net.a.handle(now, &p, &d, &mut net.a_sink);
    assert_eq!(net.a.state(), &State::Closed(INTEGRITY_MISMATCH.into()));
    assert_eq!(net.a.stats.integrity_failures, 1);
}

#[test]
fn an_init_without_room_for_a_message_and_the_integrity_tag_is_refused() {
    // The floor: prefix, the largest ACK block, the tag when asked for, one wire header
    // and 64 bytes of payload (a handshake answer).
    assert_eq!(min_datagram(false), 224);
    assert_eq!(min_datagram(true), 240);
    let now = SimLink::new(LinkConfig::default()).now();
    for integrity in [false, true] {
        for max_datagram in (0..=260).chain([u32::MAX]) {
            let init = packet::Init {
                conn_id: 6,
                first_seq: 0,
                max_datagram,
                window: 64,
                flags: if integrity { packet::INIT_MAC } else { 0 },
            };
            let floor = min_datagram(integrity) as u32;
            let refusal = init_refusal(&init);
            assert_eq!(refusal.is_some(), max_datagram < floor, "{max_datagram}");
            if let Some(why) = refusal {
                assert!(
                    why.contains(&format!("max_datagram of {max_datagram} bytes"))
                        && why.contains(&floor.to_string()),
                    "{why}"
                );
            }
            // Whatever an INIT says, the sizes derived from it stay sane.
            let c = if integrity {
                let mut c = Conn::server(integrity_cfg(), 5, 0, &init, now);
                assert!(c.grant_integrity([1; mac::NONCE_LEN], [2; mac::NONCE_LEN]));
                c
            } else {
                Conn::server(cfg(), 5, 0, &init, now)
            };
            let tag = if integrity { mac::TAG_LEN } else { 0 };
            assert!(c.max_segment() >= MIN_SEGMENT, "{max_datagram}");
            assert_eq!(
                c.max_message() + header_overhead() + tag,
                (max_datagram as usize).clamp(floor as usize, cfg().max_datagram)
            );
        }
    }
}

#[test]
fn an_init_ack_without_room_for_a_message_and_the_tag_fails_the_connection() {
    // A target (holding the secret: its INIT_ACK verifies) that accepts datagrams too
    // small for a message and the tag.
    let mut net = Net::new(LinkConfig::default(), integrity_cfg(), 1, 2);
    net.b_cfg.max_datagram = 170;
    assert!(net.run_until(Duration::from_secs(1), |n| n.a.is_closed()));
    match net.a.state() {
        State::Closed(why) => assert!(
            why.contains("max_datagram of 170 bytes") && why.contains("240"),
            "{why}"
        ),
        s => panic!("{s:?}"),
    }
}

/// An ACK datagram for `a` (connection id 11).
fn ack_datagram(cumulative: u32, ranges: &[(u16, u16)]) -> Vec<u8> {
    let mut d = Vec::new();
    packet::put_prefix(&mut d, Kind::Ack, 11, 0, false);
    packet::put_ack(
        &mut d,
        &packet::AckBlock {
            cumulative,
            window: 1024,
            delay_us: 0,
            ranges: ranges
                .iter()
                .map(|&(gap, len)| packet::SackRange { gap, len })
                .collect(),
        },
    );
    d
}

#[test]
fn an_ack_costs_at_most_one_step_per_packet_outstanding() {
    let mut net = Net::new(LinkConfig::default(), cfg(), 5, 7);
    assert!(net.run_until(Duration::from_secs(5), |n| n.a.state()
        == &State::Established));
    net.queue_all(20, 1000);
    let now = net.now();
    let mut sent = 0;
    while net.a.poll_transmit(now, &mut net.buf) {
        sent += 1;
    }
    assert_eq!(sent, 20, "20 DATA packets, none delivered");
    let first = net.a.next_seq().wrapping_sub(20);
    let feed = |net: &mut Net, d: &[u8]| {
        let before = net.a.sack_steps;
        net.a
            .handle(now, &Packet::decode(d).unwrap(), d, &mut net.a_sink);
        net.a.sack_steps - before
    };
    // An honest SACK: packets 2, 3, 4 and 6 of the 20 arrived.
    let steps = feed(&mut net, &ack_datagram(first, &[(2, 3), (1, 1)]));
    assert_eq!(steps, 4);
    let acked: Vec<usize> = (0..20).filter(|&i| net.a.sent[i].acked).collect();
    assert_eq!(acked, [2, 3, 4, 6]);
    // Ranges behind everything outstanding acknowledge nothing, at no cost.
    let far = first.wrapping_sub(1_000_000);
    let steps = feed(&mut net, &ack_datagram(far, &[(0, 1000), (500, 1000)]));
    assert_eq!(steps, 0);
    assert_eq!(net.a.sent.iter().filter(|s| s.acked).count(), 4);
    // 16 ranges of 65,535 packets from a cumulative ACK a million packets behind: they
    // cover the 20 outstanding, and cost a step for each of those, not a million.
    let steps = feed(&mut net, &ack_datagram(far, &[(0, u16::MAX); 16]));
    assert!(steps <= 20, "{steps} steps for 20 packets outstanding");
    assert!(net.a.is_idle(), "every packet acknowledged");
    assert_eq!(net.a.inflight, 0);
    assert!(net.a.retx.is_empty());
    assert!(!net.a.is_closed());
}
