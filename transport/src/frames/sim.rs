//! An in-memory link with seeded loss, duplication, reordering, delay, a bandwidth cap
//! and an MTU, in virtual time. The same seed and the same sends give the same trace.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A small, fast, seedable generator (SplitMix64): reproducible across platforms.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Uniform in `0..=max`.
    pub(crate) fn upto(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % (max.as_nanos() as u64 + 1))
    }
}

/// How the simulated link misbehaves.
#[derive(Debug, Clone)]
pub(crate) struct LinkConfig {
    pub(crate) seed: u64,
    /// Probability that a datagram is dropped.
    pub(crate) loss: f64,
    /// Probability that a datagram is delivered twice.
    pub(crate) duplicate: f64,
    /// Probability that a datagram is held back by up to `reorder_by` (overtaken by
    /// later ones).
    pub(crate) reorder: f64,
    pub(crate) reorder_by: Duration,
    /// One-way propagation delay.
    pub(crate) delay: Duration,
    /// Extra random delay, uniform in `0..=jitter`.
    pub(crate) jitter: Duration,
    /// Bytes per second each direction carries (`None`: unlimited).
    pub(crate) bandwidth: Option<u64>,
    /// Datagrams queued at a link's bottleneck before tail drop.
    pub(crate) queue_limit: usize,
    /// Largest datagram carried; longer ones are dropped.
    pub(crate) mtu: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            seed: 1,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_by: Duration::from_micros(50),
            delay: Duration::from_micros(10),
            jitter: Duration::ZERO,
            bandwidth: Some(1_250_000_000),
            queue_limit: 1024,
            mtu: 65_507,
        }
    }
}

/// What happened to a datagram (the trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Delivered,
    Lost,
    Duplicated,
    Reordered,
    TooBig,
    QueueFull,
}

/// One line of the trace: virtual time (since the start), sizes, fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceEvent {
    pub(crate) at: Duration,
    pub(crate) from: SocketAddr,
    pub(crate) to: SocketAddr,
    pub(crate) len: usize,
    pub(crate) fate: Fate,
}

struct InFlight {
    at: Instant,
    order: u64,
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// A rule for [`SimLink::tamper`].
pub(crate) type Tamper = Box<dyn FnMut(SocketAddr, SocketAddr, &mut [u8]) -> bool + Send>;

/// The link: datagrams between any addresses, with one bottleneck per direction pair.
pub(crate) struct SimLink {
    cfg: LinkConfig,
    rng: Rng,
    start: Instant,
    now: Instant,
    heap: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    /// When each (from, to) bottleneck is free again, and how many wait for it.
    busy: Vec<((SocketAddr, SocketAddr), Instant)>,
    /// Addresses whose traffic is dropped (a frozen peer).
    frozen: Vec<SocketAddr>,
    /// Sees every datagram `(from, to, bytes)` first: may change its bytes (an on-path
    /// attacker), and drops it by returning true (targeted loss).
    tamper: Option<Tamper>,
    pub(crate) trace: Vec<TraceEvent>,
    pub(crate) keep_trace: bool,
}

impl std::fmt::Debug for SimLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimLink")
            .field("now", &(self.now - self.start))
            .field("in_flight", &self.heap.len())
            .finish()
    }
}

impl SimLink {
    pub(crate) fn new(cfg: LinkConfig) -> SimLink {
        let now = Instant::now();
        SimLink {
            rng: Rng::new(cfg.seed),
            cfg,
            start: now,
            now,
            heap: BinaryHeap::new(),
            order: 0,
            busy: Vec::new(),
            frozen: Vec::new(),
            tamper: None,
            trace: Vec::new(),
            keep_trace: true,
        }
    }

    /// Virtual now.
    pub(crate) fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Move virtual time forward (never backward).
    pub(crate) fn advance_to(&mut self, t: Instant) {
        if t > self.now {
            self.now = t;
        }
    }

    /// Change the loss rate (e.g. to cut a link).
    pub(crate) fn set_loss(&mut self, loss: f64) {
        self.cfg.loss = loss;
    }

    /// Drop everything to and from `addr` until `thaw` (a peer that freezes).
    pub(crate) fn freeze(&mut self, addr: SocketAddr) {
        if !self.frozen.contains(&addr) {
            self.frozen.push(addr);
        }
    }

    pub(crate) fn thaw(&mut self, addr: SocketAddr) {
        self.frozen.retain(|a| *a != addr);
    }

    /// Pass every datagram through `rule(from, to, bytes)` before it goes on the link,
    /// until [`clear_tamper`](SimLink::clear_tamper): the rule may change the bytes, and
    /// drops the datagram by returning true (on top of the random loss).
    pub(crate) fn tamper(&mut self, rule: Tamper) {
        self.tamper = Some(rule);
    }

    pub(crate) fn clear_tamper(&mut self) {
        self.tamper = None;
    }

    fn record(&mut self, from: SocketAddr, to: SocketAddr, len: usize, fate: Fate) {
        if self.keep_trace {
            self.trace.push(TraceEvent {
                at: self.now - self.start,
                from,
                to,
                len,
                fate,
            });
        }
    }

    /// Put a datagram on the link.
    pub(crate) fn send(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        if data.len() > self.cfg.mtu {
            self.record(from, to, data.len(), Fate::TooBig);
            return;
        }
        if self.frozen.contains(&from) || self.frozen.contains(&to) {
            self.record(from, to, data.len(), Fate::Lost);
            return;
        }
        let tampered;
        let data = match self.tamper.as_mut() {
            Some(f) => {
                let mut v = data.to_vec();
                if f(from, to, &mut v) {
                    self.record(from, to, data.len(), Fate::Lost);
                    return;
                }
                tampered = v;
                &tampered[..]
            }
            None => data,
        };
        if self.rng.chance(self.cfg.loss) {
            self.record(from, to, data.len(), Fate::Lost);
            return;
        }
        // Serialisation at the bottleneck.
        let key = (from, to);
        let free = self
            .busy
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, t)| *t)
            .unwrap_or(self.now)
            .max(self.now);
        let tx = match self.cfg.bandwidth {
            Some(bps) if bps > 0 => {
                Duration::from_nanos((data.len() as u64 * 1_000_000_000).div_ceil(bps))
            }
            _ => Duration::ZERO,
        };
        if let Some(bps) = self.cfg.bandwidth
            && bps > 0
        {
            let backlog =
                free.saturating_duration_since(self.now).as_nanos() as u64 * bps / 1_000_000_000;
            let queued = backlog as usize / data.len().max(1);
            if queued >= self.cfg.queue_limit {
                self.record(from, to, data.len(), Fate::QueueFull);
                return;
            }
        }
        let departs = free + tx;
        match self.busy.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = departs,
            None => self.busy.push((key, departs)),
        }
        let mut at = departs + self.cfg.delay + self.rng.upto(self.cfg.jitter);
        let mut fate = Fate::Delivered;
        if self.rng.chance(self.cfg.reorder) {
            at += self.rng.upto(self.cfg.reorder_by);
            fate = Fate::Reordered;
        }
        self.push(at, from, to, data.to_vec());
        if self.rng.chance(self.cfg.duplicate) {
            let again = at + self.rng.upto(self.cfg.reorder_by);
            self.push(again, from, to, data.to_vec());
            fate = Fate::Duplicated;
        }
        self.record(from, to, data.len(), fate);
    }

    fn push(&mut self, at: Instant, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        self.order += 1;
        self.heap.push(Reverse(InFlight {
            at,
            order: self.order,
            from,
            to,
            data,
        }));
    }

    /// When the next datagram arrives somewhere.
    pub(crate) fn next_arrival(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(f)| f.at)
    }

    /// Take every datagram that has arrived by now: `(to, from, bytes)`.
    pub(crate) fn take_arrived(&mut self, out: &mut Vec<(SocketAddr, SocketAddr, Vec<u8>)>) {
        while self.heap.peek().is_some_and(|Reverse(f)| f.at <= self.now) {
            let Reverse(f) = self.heap.pop().expect("peeked");
            if self.frozen.contains(&f.to) {
                continue;
            }
            out.push((f.to, f.from, f.data));
        }
    }
}

/// A simulated network shared by several endpoints in one process, driven in virtual
/// time by the test that owns it (see [`SimNet::advance`]).
#[derive(Clone)]
pub(crate) struct SimNet {
    inner: std::sync::Arc<std::sync::Mutex<NetState>>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet").finish_non_exhaustive()
    }
}

/// Datagrams waiting at a host: (source, bytes).
type Inbox = std::collections::VecDeque<(SocketAddr, Vec<u8>)>;

struct NetState {
    link: SimLink,
    inbox: Vec<(SocketAddr, Inbox)>,
    timers: Vec<(SocketAddr, Option<Instant>)>,
    rng: Rng,
}

impl NetState {
    fn pump(&mut self) {
        let mut arrived = Vec::new();
        self.link.take_arrived(&mut arrived);
        for (to, from, d) in arrived {
            if let Some((_, q)) = self.inbox.iter_mut().find(|(a, _)| *a == to) {
                q.push_back((from, d));
            }
        }
    }
}

impl SimNet {
    pub(crate) fn new(cfg: LinkConfig) -> SimNet {
        let seed = cfg.seed;
        SimNet {
            inner: std::sync::Arc::new(std::sync::Mutex::new(NetState {
                link: SimLink::new(cfg),
                inbox: Vec::new(),
                timers: Vec::new(),
                rng: Rng::new(seed ^ 0x5eed),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.inner.lock().expect("sim net poisoned")
    }

    /// A driver for a host at `addr`.
    pub(crate) fn driver(&self, addr: SocketAddr) -> SimDriver {
        let mut n = self.lock();
        if !n.inbox.iter().any(|(a, _)| *a == addr) {
            n.inbox.push((addr, std::collections::VecDeque::new()));
            n.timers.push((addr, None));
        }
        SimDriver {
            net: self.clone(),
            addr,
        }
    }

    /// Virtual now.
    pub(crate) fn now(&self) -> Instant {
        self.lock().link.now()
    }

    /// Virtual time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.lock().link.elapsed()
    }

    /// Move virtual time to the next event (a datagram arriving, or a host's timer).
    /// Returns false when nothing is scheduled at all.
    pub(crate) fn advance(&self) -> bool {
        let mut n = self.lock();
        let mut next = n.link.next_arrival();
        for (_, t) in &n.timers {
            if let Some(t) = t {
                next = Some(next.map_or(*t, |x| x.min(*t)));
            }
        }
        match next {
            Some(t) => {
                n.link.advance_to(t);
                n.pump();
                true
            }
            None => false,
        }
    }

    /// Work on the link (loss rate, freezing hosts, the trace).
    pub(crate) fn with_link<R>(&self, f: impl FnOnce(&mut SimLink) -> R) -> R {
        f(&mut self.lock().link)
    }
}

/// One host's view of a [`SimNet`].
#[derive(Debug)]
pub(crate) struct SimDriver {
    net: SimNet,
    addr: SocketAddr,
}

struct NoWake;
impl super::Wake for NoWake {
    fn wake(&self) {}
}

impl super::Driver for SimDriver {
    fn now(&self) -> Instant {
        self.net.now()
    }

    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.net.lock().link.send(self.addr, to, datagram);
    }

    fn flush(&mut self) {}

    fn recv(&mut self, f: &mut dyn FnMut(SocketAddr, &[u8])) -> usize {
        let batch: Vec<(SocketAddr, Vec<u8>)> = {
            let mut n = self.net.lock();
            n.pump();
            match n.inbox.iter_mut().find(|(a, _)| *a == self.addr) {
                Some((_, q)) => q.drain(..).collect(),
                None => Vec::new(),
            }
        };
        for (from, d) in &batch {
            f(*from, d);
        }
        batch.len()
    }

    fn wait(&mut self, _until: Option<Instant>) {
        // Virtual time moves only in `SimNet::advance`, called by the test's world loop.
    }

    fn wants_timer(&self) -> bool {
        true
    }

    fn next_timer(&mut self, at: Option<Instant>) {
        let mut n = self.net.lock();
        if let Some((_, t)) = n.timers.iter_mut().find(|(a, _)| *a == self.addr) {
            *t = at;
        }
    }

    fn waker(&self) -> std::sync::Arc<dyn super::Wake> {
        std::sync::Arc::new(NoWake)
    }

    fn random_u32(&mut self) -> u32 {
        self.net.lock().rng.next_u64() as u32
    }

    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn describe(&self) -> String {
        "simulated link (virtual time)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 1], p))
    }

    #[test]
    fn same_seed_same_trace() {
        let run = |seed| {
            let mut l = SimLink::new(LinkConfig {
                seed,
                loss: 0.2,
                duplicate: 0.1,
                reorder: 0.2,
                jitter: Duration::from_micros(5),
                ..LinkConfig::default()
            });
            for i in 0..500usize {
                l.send(addr(1), addr(2), &vec![0u8; 100 + i % 900]);
            }
            l.trace.iter().map(|e| (e.len, e.fate)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn bandwidth_and_delay_are_respected() {
        let mut l = SimLink::new(LinkConfig {
            bandwidth: Some(1_000_000),
            delay: Duration::from_millis(1),
            ..LinkConfig::default()
        });
        for _ in 0..10 {
            l.send(addr(1), addr(2), &[0u8; 1000]);
        }
        // 10 kB at 1 MB/s is 10 ms on the wire, plus 1 ms of propagation.
        let last = {
            let mut t = l.now();
            while let Some(n) = l.next_arrival() {
                l.advance_to(n);
                let mut v = Vec::new();
                l.take_arrived(&mut v);
                t = n;
            }
            t
        };
        assert_eq!(l.elapsed(), Duration::from_millis(11));
        let _ = last;
    }

    #[test]
    fn mtu_drops_big_datagrams() {
        let mut l = SimLink::new(LinkConfig {
            mtu: 1500,
            ..LinkConfig::default()
        });
        l.send(addr(1), addr(2), &[0u8; 1501]);
        assert_eq!(l.trace[0].fate, Fate::TooBig);
        assert_eq!(l.next_arrival(), None);
    }
}
