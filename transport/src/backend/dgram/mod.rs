//! Datagram backends: the reliable datagram protocol ([`crate::proto`]) plus the
//! operation layer, over any [`Driver`] — kernel UDP (`udp` backend), AF_XDP (`xdp`),
//! or the simulated link of the tests.
//!
//! The operation layer is the datagram counterpart of the tcp engine: it splits large
//! operations into segments that fit one datagram (generated lazily, so a 1 GiB write
//! queues nothing up front), places every arriving `WRITE` segment and `READ_RESP`
//! segment straight at its offset (segments may arrive in any order; nothing is
//! reassembled except two-sided messages, which are numbered and delivered in order),
//! executes atomics exactly once (the protocol drops duplicate packets), and keeps the
//! same fence, deadline and access-check rules.

mod ops;
#[cfg(test)]
mod sim_tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::addr::{Address, BackendKind};
use crate::backend::{Engine, OpReq};
use crate::endpoint::{ConnShared, Core};
use crate::error::{Error, Result};
use crate::frames::{Driver, Wake};
use crate::idmap::IdMap;
use crate::op::Notify;
use crate::proto::packet::{self, Kind, Packet, ResetReason};
use crate::proto::{self, Conn as PConn};
use crate::stats::C;

use ops::{Ctx, OpLayer};

/// Submissions taken from the queue per progress pass.
const CMD_BUDGET: usize = 1024;

/// The answer to a `connect`, filled in by the engine.
#[derive(Debug, Default)]
pub(crate) struct ConnectSlot {
    result: Mutex<Option<Result<Arc<ConnShared>>>>,
    notify: Notify,
}

impl ConnectSlot {
    fn fill(&self, r: Result<Arc<ConnShared>>) {
        {
            let mut g = self.result.lock().expect("connect slot poisoned");
            if g.is_some() {
                return;
            }
            *g = Some(r);
        }
        self.notify.wake_all();
    }

    pub(crate) fn take(&self) -> Option<Result<Arc<ConnShared>>> {
        self.result.lock().expect("connect slot poisoned").take()
    }
}

enum Ctl {
    Connect(SocketAddr, Arc<ConnectSlot>),
    Close(Arc<ConnShared>),
    Room(Arc<ConnShared>),
}

/// One connection of a datagram engine.
struct DConn {
    peer: SocketAddr,
    proto: PConn,
    ops: OpLayer,
    /// Client side, until HELLO_ACK.
    connect: Option<Arc<ConnectSlot>>,
    /// Target side: the connection must be established (HELLO, and AUTH with a secret)
    /// by then, or it is closed.
    hs_deadline: Option<Instant>,
}

/// Everything but the driver, so that the driver's receive callback can borrow it.
struct World {
    core: Arc<Core>,
    me: Weak<DgramEngine>,
    kind: BackendKind,
    local: SocketAddr,
    listening: bool,
    pcfg: proto::Config,
    conns: IdMap<DConn>,
    /// Established connections by their `ConnShared` id.
    by_shared: IdMap<u32>,
    /// Server connections by (peer address, peer connection id), to recognise a repeated
    /// INIT.
    by_peer: HashMap<(SocketAddr, u32), u32>,
    /// Datagrams to send that belong to no connection (RESETs).
    stray: Vec<(SocketAddr, Vec<u8>)>,
    /// Random numbers drawn from the driver before each receive (connection ids and
    /// first packet numbers for connections accepted inside the receive callback).
    rand: Vec<u32>,
    last_tick: Instant,
}

struct State {
    driver: Box<dyn Driver>,
    w: World,
    buf: Vec<u8>,
}

/// A datagram engine.
pub(crate) struct DgramEngine {
    core: Arc<Core>,
    me: Weak<DgramEngine>,
    kind: BackendKind,
    ops: ArrayQueue<(Arc<ConnShared>, OpReq)>,
    ctl: Mutex<Vec<Ctl>>,
    ctl_pending: AtomicBool,
    state: Mutex<Option<State>>,
    /// The driver, until the thread that drives it takes it (`start`).
    pending: Mutex<Option<Box<dyn Driver>>>,
    waker: Arc<dyn Wake>,
    local: SocketAddr,
    listening: bool,
    /// The interface an xdp engine is bound to.
    iface: Option<String>,
    pcfg: proto::Config,
    dead: Mutex<Option<String>>,
    is_dead: AtomicBool,
    owner: OnceLock<std::thread::ThreadId>,
    setup: Mutex<String>,
}

impl std::fmt::Debug for DgramEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DgramEngine")
            .field("kind", &self.kind)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Protocol settings derived from the endpoint's configuration.
fn proto_config(core: &Core, max_datagram: usize) -> proto::Config {
    let cfg = &core.config;
    let dead = cfg.op_timeout.min(Duration::from_secs(30));
    proto::Config {
        max_datagram,
        dead_after: dead,
        keepalive: (dead / 4).max(Duration::from_millis(10)),
        max_rto: (dead / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        secret: cfg.secret.clone(),
        integrity: cfg.datagram_integrity,
        ..proto::Config::default()
    }
}

impl DgramEngine {
    pub(crate) fn new(
        core: Arc<Core>,
        kind: BackendKind,
        driver: Box<dyn Driver>,
        listening: bool,
        max_datagram: usize,
        iface: Option<String>,
    ) -> Arc<DgramEngine> {
        let local = driver.local_addr();
        let waker = driver.waker();
        let cap = core.config.max_queued_ops;
        let pcfg = proto_config(&core, max_datagram);
        Arc::new_cyclic(|me| DgramEngine {
            me: me.clone(),
            kind,
            ops: ArrayQueue::new(cap),
            ctl: Mutex::new(Vec::new()),
            ctl_pending: AtomicBool::new(false),
            state: Mutex::new(None),
            pending: Mutex::new(Some(driver)),
            waker,
            local,
            listening,
            iface,
            pcfg,
            dead: Mutex::new(None),
            is_dead: AtomicBool::new(false),
            owner: OnceLock::new(),
            setup: Mutex::new(String::new()),
            core,
        })
    }

    /// Take the driver onto the calling thread (`dedicated`: the engine's own progress
    /// thread, which alone will drive it).
    pub(crate) fn start(&self, dedicated: bool) -> Result<()> {
        if dedicated {
            let _ = self.owner.set(std::thread::current().id());
        }
        let mut driver = self
            .pending
            .lock()
            .expect("driver lock")
            .take()
            .ok_or(Error::Closed("engine already started"))?;
        driver.start(dedicated).map_err(|e| Error::Io {
            call: "io_uring_setup",
            source: e,
        })?;
        *self.setup.lock().expect("setup lock") = format!(
            "{}: reliable datagrams over {}, {}",
            self.kind,
            driver.describe(),
            if dedicated {
                "progress thread"
            } else {
                "caller-driven progress"
            }
        );
        let now = driver.now();
        *self.state.lock().expect("state lock") = Some(State {
            driver,
            w: World {
                core: self.core.clone(),
                me: self.me.clone(),
                kind: self.kind,
                local: self.local,
                listening: self.listening,
                pcfg: self.pcfg.clone(),
                conns: IdMap::default(),
                by_shared: IdMap::default(),
                by_peer: HashMap::new(),
                stray: Vec::new(),
                rand: Vec::new(),
                last_tick: now,
            },
            buf: Vec::with_capacity(65536),
        });
        Ok(())
    }

    fn may_drive(&self) -> bool {
        self.owner
            .get()
            .is_none_or(|&t| t == std::thread::current().id())
    }

    fn push_ctl(&self, c: Ctl) {
        self.ctl.lock().expect("ctl lock").push(c);
        self.ctl_pending.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Begin connecting; the slot is filled once the handshake ends.
    pub(crate) fn start_connect(&self, addr: &Address) -> Arc<ConnectSlot> {
        let slot = Arc::new(ConnectSlot::default());
        self.push_ctl(Ctl::Connect(addr.socket_addr(), slot.clone()));
        slot
    }

    /// Take control messages and submissions.
    fn intake(&self, st: &mut State, now: Instant) -> usize {
        let State { driver, w, .. } = st;
        let mut work = 0;
        if self.ctl_pending.swap(false, Ordering::AcqRel) {
            let ctl = std::mem::take(&mut *self.ctl.lock().expect("ctl lock"));
            work += ctl.len();
            for c in ctl {
                w.on_ctl(now, &mut **driver, c);
            }
        }
        let mut n = 0;
        while n < CMD_BUDGET {
            let Some((shared, req)) = self.ops.pop() else {
                break;
            };
            n += 1;
            w.admit(now, &shared, req);
        }
        work + n
    }

    /// A progress pass over a started engine: new requests leave before the pass looks
    /// for input (as in the tcp backend), answers to the input leave at its end.
    fn pass(&self, st: &mut State) -> usize {
        let now = st.driver.now();
        let mut work = self.intake(st, now);
        let State { driver, w, buf } = st;
        if work > 0 {
            w.transmit(now, &mut **driver, buf);
            driver.flush();
        }
        while w.rand.len() < 64 {
            w.rand.push(driver.random_u32());
        }
        work += driver.recv(&mut |from, d| w.on_datagram(now, from, d));
        let (bad, unsent) = driver.take_drops();
        if bad + unsent > 0 {
            w.core.counters.add(C::drops, bad + unsent);
            w.core.counters.add(C::protocol_errors, bad);
        }
        // Answers leave before timers run: the exchange in flight is what waits.
        work += w.transmit(now, &mut **driver, buf);
        driver.flush();
        w.tick(now);
        let fired = w.transmit(now, &mut **driver, buf);
        if fired > 0 {
            driver.flush();
            work += fired;
        }
        w.remove_closed();
        if driver.wants_timer() {
            driver.next_timer(w.next_timer());
        }
        work
    }

    /// Send what was just submitted, from the submitting thread (caller-driven
    /// busy-poll, a connection's only operation): no pass, no poll.
    fn issue_now(&self) {
        let Ok(mut guard) = self.state.try_lock() else {
            return;
        };
        let Some(st) = guard.as_mut() else {
            return;
        };
        let now = st.driver.now();
        if self.intake(st, now) > 0 {
            let State { driver, w, buf } = st;
            w.transmit(now, &mut **driver, buf);
            driver.flush();
        }
    }
}

impl Engine for DgramEngine {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn submit(&self, conn: &Arc<ConnShared>, req: OpReq) -> std::result::Result<(), OpReq> {
        self.ops.push((conn.clone(), req)).map_err(|(_, r)| r)?;
        if self.owner.get().is_none()
            && self.core.config.wait == crate::config::WaitMode::BusyPoll
            && conn.inflight.load(Ordering::Relaxed) <= 1
        {
            self.issue_now();
        } else {
            self.wake();
        }
        Ok(())
    }

    fn close(&self, conn: &Arc<ConnShared>) {
        self.push_ctl(Ctl::Close(conn.clone()));
    }

    fn room_available(&self, conn: &Arc<ConnShared>) {
        self.push_ctl(Ctl::Room(conn.clone()));
    }

    fn progress(&self) -> usize {
        if !self.may_drive() {
            return 0;
        }
        let Ok(mut guard) = self.state.try_lock() else {
            return 0;
        };
        let Some(st) = guard.as_mut() else {
            return 0;
        };
        self.pass(st)
    }

    fn park(&self, max: Duration) {
        if !self.may_drive() {
            std::thread::sleep(max.min(Duration::from_millis(1)));
            return;
        }
        let Ok(mut guard) = self.state.try_lock() else {
            std::thread::yield_now();
            return;
        };
        let Some(st) = guard.as_mut() else {
            return;
        };
        if !self.ops.is_empty() || self.ctl_pending.load(Ordering::SeqCst) {
            return;
        }
        let now = st.driver.now();
        let until = st.w.next_timer().map_or(now + max, |t| t.min(now + max));
        st.driver.wait(Some(until));
    }

    fn wake(&self) {
        self.waker.wake();
    }

    fn connect(&self, addr: &Address) -> Result<Arc<ConnShared>> {
        let slot = self.start_connect(addr);
        let me: Arc<dyn Engine> = self.me.upgrade().ok_or(Error::Closed("endpoint"))?;
        let driver = crate::op::Driver::new(
            Arc::from(vec![me]),
            &self.core.config.progress,
            self.core.config.wait,
        );
        let deadline = Instant::now() + self.core.config.connect_timeout;
        match driver.wait(&slot.notify, Some(deadline), || slot.take())? {
            Some(r) => r,
            None => {
                // Too late: whatever the engine finishes now is closed again.
                slot.fill(Err(Error::Timeout {
                    after: self.core.config.connect_timeout,
                }));
                if let Some(Ok(shared)) = slot.take() {
                    self.close(&shared);
                }
                Err(Error::Timeout {
                    after: self.core.config.connect_timeout,
                })
            }
        }
    }

    fn local_addrs(&self) -> Vec<Address> {
        if !self.listening {
            return Vec::new();
        }
        vec![match (self.kind, &self.iface) {
            (BackendKind::Xdp, Some(iface)) => Address::Xdp {
                iface: iface.clone(),
                addr: self.local,
            },
            (BackendKind::Udp, _) => Address::Udp(self.local),
            (other, _) => Address::Udp(self.local).with_backend(other),
        }]
    }

    fn shutdown(&self) {
        if !self.may_drive() {
            if !self.is_dead.swap(true, Ordering::SeqCst) {
                *self.dead.lock().expect("dead lock") = Some("endpoint closed".into());
            }
            return;
        }
        let mut guard = self.state.lock().expect("state lock");
        if let Some(mut st) = guard.take() {
            let now = st.driver.now();
            for c in st.w.conns.values_mut() {
                c.proto.close("endpoint closed");
                ops::fail_conn(c, "endpoint closed");
            }
            // Tell peers (one RESET each) before the socket goes.
            let State { driver, w, buf } = &mut st;
            w.transmit(now, &mut **driver, buf);
            driver.flush();
            while let Some((shared, req)) = self.ops.pop() {
                shared.finish(&req.done, Err(Error::lost("endpoint closed")));
            }
            for c in std::mem::take(&mut *self.ctl.lock().expect("ctl lock")) {
                if let Ctl::Connect(_, slot) = c {
                    slot.fill(Err(Error::Closed("endpoint closed")));
                }
            }
        }
        if !self.is_dead.swap(true, Ordering::SeqCst) {
            *self.dead.lock().expect("dead lock") = Some("endpoint closed".into());
        }
    }

    fn health(&self) -> Result<()> {
        if !self.is_dead.load(Ordering::Relaxed) {
            return Ok(());
        }
        let why = self
            .dead
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_default();
        Err(Error::lost(why))
    }

    fn describe(&self) -> String {
        self.setup.lock().expect("setup lock").clone()
    }
}

impl World {
    fn fresh_id(&mut self, driver: &mut dyn Driver) -> u32 {
        loop {
            let id = driver.random_u32();
            if id != 0 && !self.conns.contains_key(&u64::from(id)) {
                return id;
            }
        }
    }

    fn on_ctl(&mut self, now: Instant, driver: &mut dyn Driver, c: Ctl) {
        match c {
            Ctl::Connect(addr, slot) => {
                let id = self.fresh_id(driver);
                let first = driver.random_u32();
                let mut proto = PConn::client(self.pcfg.clone(), id, first, now);
                if self.pcfg.integrity {
                    match crate::sys::random_bytes() {
                        Ok(nonce) => proto.request_integrity(nonce),
                        Err(e) => return slot.fill(Err(e)),
                    }
                }
                let conn = DConn {
                    peer: addr,
                    proto,
                    ops: OpLayer::new(),
                    connect: Some(slot),
                    hs_deadline: None,
                };
                self.conns.insert(u64::from(id), conn);
            }
            Ctl::Close(shared) => {
                if let Some(id) = self.by_shared.get(&shared.id).copied()
                    && let Some(c) = self.conns.get_mut(&u64::from(id))
                {
                    c.proto.close("closed locally");
                    ops::fail_conn(c, "closed locally");
                } else {
                    shared.mark_closed("closed locally");
                }
            }
            Ctl::Room(shared) => {
                if let Some(id) = self.by_shared.get(&shared.id).copied()
                    && let Some(c) = self.conns.get_mut(&u64::from(id))
                {
                    c.proto.set_paused(false);
                }
            }
        }
    }

    fn admit(&mut self, now: Instant, shared: &Arc<ConnShared>, req: OpReq) {
        let conn = self
            .by_shared
            .get(&shared.id)
            .and_then(|id| self.conns.get_mut(&u64::from(*id)));
        match conn {
            Some(c) if !c.proto.is_closed() => {
                let deadline = now + self.core.config.op_timeout;
                c.ops.admit(shared, req, deadline, &mut c.proto);
            }
            _ => shared.finish(&req.done, Err(Error::lost(shared.close_reason()))),
        }
    }

    fn reset(&mut self, to: SocketAddr, dst: u32, why: ResetReason) {
        self.send_stray(to, packet::reset(dst, why));
    }

    /// Queue a datagram that belongs to no connection, at most 1024 per poll (so a
    /// flood of strays cannot turn the endpoint into an amplifier).
    fn send_stray(&mut self, to: SocketAddr, d: Vec<u8>) {
        if self.stray.len() < 1024 {
            self.stray.push((to, d));
        }
    }

    fn count(&self, c: C, n: u64) {
        self.core.counters.add(c, n);
    }

    fn on_datagram(&mut self, now: Instant, from: SocketAddr, d: &[u8]) {
        self.count(C::datagrams_received, 1);
        let p = match Packet::decode(d) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%from, "dropping a malformed datagram: {e}");
                self.count(C::protocol_errors, 1);
                self.count(C::drops, 1);
                return;
            }
        };
        if p.kind == Kind::Init {
            return self.on_init(now, from, &p);
        }
        // A RESET for a connection the peer no longer has (it restarted) names the
        // peer's id of it; find ours by that and the peer's address.
        let dst = match (p.dst, p.unknown) {
            (0, Some(theirs)) if p.kind == Kind::Reset => self
                .conns
                .iter()
                .find(|(_, c)| {
                    c.peer == from && c.proto.is_client() && c.proto.remote_id() == theirs
                })
                .map_or(0, |(id, _)| *id as u32),
            _ => p.dst,
        };
        let Some(c) = self.conns.get_mut(&u64::from(dst)) else {
            self.count(C::drops, 1);
            if p.kind != Kind::Reset {
                self.send_stray(from, packet::reset_unknown(p.dst));
            }
            return;
        };
        if c.peer != from {
            // Datagrams for this connection come from its peer only.
            self.core.counters.add(C::drops, 1);
            return;
        }
        let before = c.proto.stats;
        let mut ctx = Ctx {
            core: &self.core,
            me: &self.me,
            peer: c.peer,
            local: self.local,
            client: c.connect.is_some(),
            queued: c.proto.queued(),
            window_bytes: c.proto.receive_window_bytes(),
            new_shared: None,
        };
        c.proto.handle(now, &p, d, &mut c.ops.sink(&mut ctx));
        let after = c.proto.stats;
        let new_shared = ctx.new_shared.take();
        c.ops.after_packet(&mut c.proto);
        if let Some(why) = c.ops.violation.take() {
            tracing::warn!(peer = %c.peer, "closing a {} connection: {why}", self.kind);
            c.proto.close(&why);
            ops::fail_conn(c, &why);
        }
        let shared = c.ops.shared.clone();
        let dropped = after.dropped - before.dropped;
        let malformed = after.malformed - before.malformed;
        let forged = after.integrity_failures - before.integrity_failures;
        self.core.counters.add(C::integrity_failures, forged);
        if let Some(s) = &shared {
            s.count(C::drops, dropped);
            s.count(C::protocol_errors, malformed);
            s.count(C::errors, malformed);
        } else {
            self.core.counters.add(C::drops, dropped);
            self.core.counters.add(C::protocol_errors, malformed);
        }
        if let Some((shared, accepted)) = new_shared {
            let id = c.proto.local_id();
            self.by_shared.insert(shared.id, id);
            if let Some(slot) = c.connect.take() {
                slot.fill(Ok(shared));
            } else if !accepted {
                c.proto.close("too many connections waiting to be accepted");
            }
        }
        if let Some(err) = c.ops.handshake_error.take()
            && let Some(slot) = c.connect.take()
        {
            slot.fill(Err(err));
            c.proto.close("handshake refused");
        }
    }

    fn on_init(&mut self, now: Instant, from: SocketAddr, p: &Packet) {
        let Some(init) = p.init else {
            return;
        };
        if let Some(id) = self.by_peer.get(&(from, init.conn_id)).copied()
            && let Some(c) = self.conns.get_mut(&u64::from(id))
        {
            // Our INIT_ACK was lost: the connection answers again.
            c.proto.handle(now, p, &[], &mut ops::NoSink);
            return;
        }
        if !self.listening {
            self.reset(from, init.conn_id, ResetReason::Unsupported);
            return;
        }
        if let Some(why) = proto::init_refusal(&init) {
            tracing::debug!(%from, "refusing a {} connection: {why}", self.kind);
            self.count(C::protocol_errors, 1);
            self.reset(from, init.conn_id, ResetReason::Unsupported);
            return;
        }
        // One pass: connections open, those accepted from this address, and those of
        // them still in handshake.
        let (mut open, mut from_peer, mut handshaking) = (0, 0, 0);
        for c in self.conns.values().filter(|c| !c.proto.is_closed()) {
            open += 1;
            if c.peer.ip() == from.ip() && !c.proto.is_client() {
                from_peer += 1;
                handshaking += usize::from(c.ops.shared.is_none());
            }
        }
        if open >= self.core.config.max_connections {
            tracing::warn!(%from, "refusing a {} connection: at the limit of {} connections", self.kind, self.core.config.max_connections);
            self.count(C::errors, 1);
            self.reset(from, init.conn_id, ResetReason::Busy);
            return;
        }
        if from_peer >= self.core.config.max_connections_per_peer {
            tracing::debug!(%from, "refusing a {} connection: {from_peer} connections from this address already", self.kind);
            self.count(C::peer_connections_refused, 1);
            self.reset(from, init.conn_id, ResetReason::Busy);
            return;
        }
        if handshaking >= self.core.config.max_handshakes_per_peer {
            tracing::debug!(%from, "refusing a {} connection: {handshaking} handshakes from this address already", self.kind);
            self.count(C::handshakes_refused, 1);
            self.reset(from, init.conn_id, ResetReason::Busy);
            return;
        }
        let mut id = self.rand.pop().unwrap_or(1);
        while id == 0 || self.conns.contains_key(&u64::from(id)) {
            id = self
                .rand
                .pop()
                .unwrap_or(id.wrapping_mul(0x9E37_79B9).wrapping_add(1));
        }
        let first = self.rand.pop().unwrap_or(0);
        let mut proto = PConn::server(self.pcfg.clone(), id, first, &init, now);
        if let Some(theirs) = p.nonce {
            let granted =
                crate::sys::random_bytes().is_ok_and(|ours| proto.grant_integrity(theirs, ours));
            if !granted {
                tracing::debug!(%from, "refusing a {} connection that asks for per-datagram integrity: no cluster secret here", self.kind);
                self.count(C::auth_failures, 1);
                self.reset(from, init.conn_id, ResetReason::Unsupported);
                return;
            }
        } else if self.pcfg.integrity {
            tracing::debug!(%from, "refusing a {} connection without per-datagram integrity", self.kind);
            self.count(C::auth_failures, 1);
            self.reset(from, init.conn_id, ResetReason::IntegrityRequired);
            return;
        }
        let conn = DConn {
            peer: from,
            proto,
            ops: OpLayer::new(),
            connect: None,
            hs_deadline: Some(now + self.core.config.connect_timeout),
        };
        tracing::debug!(%from, conn = id, "{} connection request", self.kind);
        self.by_peer.insert((from, init.conn_id), id);
        self.conns.insert(u64::from(id), conn);
    }

    fn tick(&mut self, now: Instant) {
        for c in self.conns.values_mut() {
            if c.proto.poll_timeout().is_some_and(|t| t <= now) {
                c.proto.handle_timeout(now);
            }
            if c.hs_deadline.is_some_and(|d| now >= d) {
                c.hs_deadline = None;
                if c.ops.shared.is_none() {
                    c.proto.close("handshake timed out");
                }
            }
            if c.proto.is_closed() {
                let why = match c.proto.state() {
                    proto::State::Closed(r) => r.clone(),
                    _ => String::new(),
                };
                if let Some(slot) = c.connect.take() {
                    if c.proto.failed_authentication() {
                        self.core.counters.add(C::auth_failures, 1);
                        slot.fill(Err(Error::AuthFailed(format!("{}: {why}", c.peer))));
                    } else {
                        slot.fill(Err(Error::Io {
                            call: "connect",
                            source: std::io::Error::new(
                                std::io::ErrorKind::ConnectionRefused,
                                format!("{}: {why}", c.peer),
                            ),
                        }));
                    }
                }
                ops::fail_conn(c, &why);
                continue;
            }
            if now.saturating_duration_since(self.last_tick) >= Duration::from_millis(1)
                && let Some(why) = c.ops.expire(now, self.core.config.op_timeout)
            {
                c.proto.close(&why);
                ops::fail_conn(c, &why);
            }
        }
        if now.saturating_duration_since(self.last_tick) >= Duration::from_millis(1) {
            self.last_tick = now;
        }
    }

    fn transmit(&mut self, now: Instant, driver: &mut dyn Driver, buf: &mut Vec<u8>) -> usize {
        let mut n = 0;
        for (to, d) in self.stray.drain(..) {
            driver.send(to, &d);
            n += 1;
        }
        for c in self.conns.values_mut() {
            if c.proto.state() == &proto::State::Established
                && c.ops.needs_hello(c.connect.is_some())
            {
                c.ops.send_hello(&self.core, &mut c.proto);
            }
            c.ops.pump(&mut c.proto);
            let (copied, resent) = (c.proto.stats.bytes_copied, c.proto.stats.retransmits);
            while c.proto.wants_transmit(now) {
                if let Some(mut g) = driver.take_gather() {
                    if !c.proto.poll_transmit(now, &mut g) {
                        driver.return_gather(g);
                        break;
                    }
                    driver.send_gather(c.peer, g);
                } else {
                    let mut b = driver.take_buffer();
                    if !c.proto.poll_transmit(now, &mut b) {
                        *buf = b;
                        break;
                    }
                    driver.send_owned(c.peer, b);
                }
                n += 1;
            }
            let copied = c.proto.stats.bytes_copied - copied;
            let resent = c.proto.stats.retransmits - resent;
            if let Some(s) = &c.ops.shared {
                if copied > 0 {
                    s.count(C::bytes_copied_in_user_space, copied);
                }
                if resent > 0 {
                    s.count(C::retransmissions, resent);
                }
            } else if resent > 0 {
                self.core.counters.add(C::retransmissions, resent);
            }
        }
        if n > 0 {
            self.core.counters.add(C::datagrams_sent, n as u64);
        }
        n
    }

    fn remove_closed(&mut self) {
        if !self.conns.values().any(|c| c.proto.is_closed()) {
            return;
        }
        let dead: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.proto.is_closed() && c.ops.is_failed())
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            if let Some(c) = self.conns.remove(&id) {
                if let Some(s) = &c.ops.shared {
                    self.by_shared.remove(&s.id);
                }
                self.by_peer.retain(|_, v| u64::from(*v) != id);
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        for c in self.conns.values() {
            for x in [c.proto.poll_timeout(), c.ops.next_deadline()]
                .into_iter()
                .flatten()
            {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        }
        t
    }
}
