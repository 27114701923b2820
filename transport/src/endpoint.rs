//! Endpoints and connections: the public face of the transport.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::addr::{Address, BackendKind};
use crate::backend::{Engine, OpKind, OpReq, dgram::DgramEngine, tcp::TcpEngine};
use crate::config::{EndpointConfig, Progress};
use crate::error::{Error, Result};
use crate::key::{RegionKey, Rights};
use crate::op::{Completion, Driver, Mailbox, Op};
use crate::region::{Region, RegionTable};
use crate::stats::{C, Counters, Stats};
use crate::sys::mem::Mem;
use crate::wire::Target;

/// State shared by an endpoint, its engines and its connections.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) id: u64,
    pub(crate) config: EndpointConfig,
    pub(crate) regions: Arc<RegionTable>,
    pub(crate) counters: Counters,
    pub(crate) accepted: Mailbox<Arc<ConnShared>>,
    next_conn: AtomicU64,
    pub(crate) open_conns: AtomicUsize,
}

impl Core {
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// A write notification: the target's side of `write_with_notify`, delivered after the
/// written bytes are in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The region written.
    pub region: u64,
    /// Where the write started.
    pub offset: u64,
    /// How many bytes it placed.
    pub len: u64,
    /// The value the writer attached.
    pub imm: u32,
}

/// State of one connection shared by its handle and its engine.
#[derive(Debug)]
pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) core: Arc<Core>,
    pub(crate) driver: Driver,
    pub(crate) backend: BackendKind,
    pub(crate) peer_id: u64,
    pub(crate) local_addr: Address,
    pub(crate) peer_addr: Address,
    /// Largest payload the peer accepts in one message.
    pub(crate) peer_max_payload: u32,
    pub(crate) inflight: AtomicUsize,
    pub(crate) counters: Counters,
    pub(crate) inbox: Mailbox<Vec<u8>>,
    pub(crate) notes: Mailbox<Notification>,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
}

impl ConnShared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        core: Arc<Core>,
        engine: Arc<dyn Engine>,
        peer_id: u64,
        local_addr: Address,
        peer_addr: Address,
        peer_max_payload: u32,
    ) -> Arc<ConnShared> {
        let cap = core.config.max_incoming;
        let driver = Driver::new(
            Arc::from(vec![engine.clone()]),
            &core.config.progress,
            core.config.wait,
        );
        let c = Arc::new(ConnShared {
            id,
            backend: engine.kind(),
            driver,
            peer_id,
            local_addr,
            peer_addr,
            peer_max_payload,
            inflight: AtomicUsize::new(0),
            counters: Counters::default(),
            inbox: Mailbox::with_max_bytes(cap, core.config.max_incoming_bytes),
            notes: Mailbox::new(cap),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            core,
        });
        c.count(C::connections_opened, 1);
        c.core.open_conns.fetch_add(1, Ordering::Relaxed);
        c
    }

    /// Add to a counter of this connection and of its endpoint.
    #[inline]
    pub(crate) fn count(&self, c: C, n: u64) {
        self.counters.add(c, n);
        self.core.counters.add(c, n);
    }

    pub(crate) fn engine(&self) -> &Arc<dyn Engine> {
        &self.driver.engines()[0]
    }

    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn close_reason(&self) -> String {
        self.close_reason
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| "connection closed".into())
    }

    /// Mark closed (first reason wins) and close the mailboxes. Returns whether this call
    /// closed it.
    pub(crate) fn mark_closed(&self, reason: &str) -> bool {
        {
            let mut g = self.close_reason.lock().expect("close lock poisoned");
            if g.is_some() {
                return false;
            }
            *g = Some(reason.to_string());
        }
        self.closed.store(true, Ordering::Release);
        self.inbox.close(reason);
        self.notes.close(reason);
        self.count(C::connections_closed, 1);
        self.core.open_conns.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Complete an operation and account for it.
    #[inline(always)]
    pub(crate) fn finish(&self, done: &Completion, r: Result<u64>) {
        match &r {
            Ok(_) => self.count(C::ops_completed, 1),
            Err(e) => {
                self.count(C::ops_failed, 1);
                self.count(C::errors, 1);
                if matches!(e, Error::Timeout { .. }) {
                    self.count(C::ops_timed_out, 1);
                }
            }
        }
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        done.complete(r);
    }
}

struct EndpointInner {
    core: Arc<Core>,
    engines: RwLock<Vec<Arc<dyn Engine>>>,
    driver: RwLock<Driver>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises the creation of engines started on first use.
    adding: Mutex<()>,
    /// Engines on a simulated network (tests).
    #[cfg(test)]
    sim_engines: Mutex<Vec<Arc<DgramEngine>>>,
}

/// Starts an engine on the thread that will drive it (`true`: a dedicated progress
/// thread; `false`: caller-driven).
type Start = Box<dyn FnOnce(bool) -> Result<()> + Send>;

impl EndpointInner {
    fn engines(&self) -> Vec<Arc<dyn Engine>> {
        self.engines.read().expect("engine list poisoned").clone()
    }

    fn driver(&self) -> Driver {
        self.driver.read().expect("driver poisoned").clone()
    }

    fn engine(&self, kind: BackendKind) -> Option<Arc<dyn Engine>> {
        self.engines().into_iter().find(|e| e.kind() == kind)
    }

    /// Start `e` (its own progress thread, or here) and add it to the endpoint.
    fn add_engine(&self, e: Arc<dyn Engine>, start: Start) -> Result<()> {
        let cfg = &self.core.config;
        match cfg.progress.clone() {
            Progress::Caller => start(false)?,
            Progress::Thread { cpu } => {
                let h = spawn_progress(
                    e.clone(),
                    start,
                    self.stop.clone(),
                    cpu,
                    cfg.wait == crate::config::WaitMode::BusyPoll,
                )?;
                self.threads.lock().expect("thread list poisoned").push(h);
            }
        }
        let mut v = self.engines.write().expect("engine list poisoned");
        v.push(e);
        *self.driver.write().expect("driver poisoned") =
            Driver::new(Arc::from(v.clone()), &cfg.progress, cfg.wait);
        Ok(())
    }

    fn add_tcp(&self, listen: &[std::net::SocketAddr]) -> Result<Arc<dyn Engine>> {
        let tcp = TcpEngine::new(self.core.clone(), listen)?;
        let t = tcp.clone();
        self.add_engine(
            tcp.clone(),
            Box::new(move |dedicated| t.init_ring(dedicated)),
        )?;
        Ok(tcp)
    }

    fn add_udp(&self, bind: std::net::SocketAddr, listening: bool) -> Result<Arc<dyn Engine>> {
        let cfg = &self.core.config;
        let max = cfg.max_datagram(bind.is_ipv6());
        let driver = crate::frames::udp::UdpDriver::bind(
            bind,
            cfg.wait == crate::config::WaitMode::BusyPoll,
            max,
        )
        .map_err(|e| Error::Io {
            call: "bind",
            source: std::io::Error::new(e.kind(), format!("udp://{bind}: {e}")),
        })?;
        self.add_dgram(BackendKind::Udp, Box::new(driver), listening, max, None)
    }

    /// Run the datagram protocol over `driver` as the endpoint's `kind` engine.
    fn add_dgram(
        &self,
        kind: BackendKind,
        driver: Box<dyn crate::frames::Driver>,
        listening: bool,
        max_datagram: usize,
        iface: Option<String>,
    ) -> Result<Arc<dyn Engine>> {
        let eng = DgramEngine::new(
            self.core.clone(),
            kind,
            driver,
            listening,
            max_datagram,
            iface,
        );
        let e = eng.clone();
        self.add_engine(eng.clone(), Box::new(move |dedicated| e.start(dedicated)))?;
        Ok(eng)
    }

    #[cfg(feature = "xdp")]
    fn add_xdp(
        &self,
        iface: &str,
        bind: std::net::SocketAddr,
        listening: bool,
    ) -> Result<Arc<dyn Engine>> {
        let cfg = &self.core.config;
        let driver = crate::frames::xdp::XdpDriver::bind(
            iface,
            bind,
            cfg.wait == crate::config::WaitMode::BusyPoll,
            cfg.mtu,
        )
        .map_err(|e| Error::Io {
            call: "AF_XDP setup",
            source: std::io::Error::new(e.kind(), format!("xdp://{iface}/{bind}: {e}")),
        })?;
        if cfg.fault_drop_per_million > 0 {
            driver
                .set_drop_per_million(cfg.fault_drop_per_million)
                .map_err(|e| Error::Io {
                    call: "bpf_map_update_elem",
                    source: e,
                })?;
        }
        let max = driver.max_datagram();
        tracing::debug!("{}", crate::frames::Driver::describe(&driver));
        self.add_dgram(
            BackendKind::Xdp,
            Box::new(driver),
            listening,
            max,
            Some(iface.to_string()),
        )
    }

    #[cfg(feature = "rdma")]
    fn add_rdma(&self, listen: Option<std::net::SocketAddr>) -> Result<Arc<dyn Engine>> {
        let eng = crate::backend::rdma::RdmaEngine::new(self.core.clone(), listen)?;
        self.add_engine(eng.clone(), Box::new(|_| Ok(())))?;
        Ok(eng)
    }

    /// The engine for `kind`, started on first use.
    fn engine_for(&self, kind: BackendKind, peer: &Address) -> Result<Arc<dyn Engine>> {
        if let Some(e) = self.engine(kind) {
            return Ok(e);
        }
        let _g = self.adding.lock().expect("engine creation poisoned");
        if let Some(e) = self.engine(kind) {
            return Ok(e);
        }
        match kind {
            BackendKind::Tcp => self.add_tcp(&[]),
            BackendKind::Udp => {
                let any = if peer.socket_addr().is_ipv6() {
                    std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
                } else {
                    std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
                };
                self.add_udp(any, false)
            }
            #[cfg(feature = "xdp")]
            BackendKind::Xdp => match peer {
                Address::Xdp { iface, .. } if !iface.is_empty() => self.add_xdp(
                    iface,
                    std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
                    false,
                ),
                _ => Err(Error::InvalidArgument(
                    "xdp addresses name the local interface: xdp://IFACE/HOST:PORT".into(),
                )),
            },
            #[cfg(feature = "rdma")]
            BackendKind::Rdma => self.add_rdma(None),
            #[allow(unreachable_patterns)]
            other => Err(Error::Unsupported {
                reason: format!("no {other} engine in this endpoint"),
            }),
        }
    }
}

impl Drop for EndpointInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let engines = self.engines();
        for e in &engines {
            e.wake();
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("thread list poisoned"));
        for t in threads {
            let _ = t.join();
        }
        for e in &engines {
            e.shutdown();
        }
        for c in self.core.accepted.drain() {
            c.mark_closed("endpoint closed");
        }
    }
}

/// A PacketFS endpoint: listens and connects, owns registered regions, and runs the
/// progress engine of each backend.
///
/// Endpoints are cheap to clone. When the last handle and the last [`Connection`] are
/// gone, the endpoint shuts down: progress threads stop and anything still pending fails
/// with `ConnectionLost`.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EndpointInner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &format_args!("{:016x}", self.inner.core.id))
            .field("addrs", &self.local_addrs())
            .finish()
    }
}

fn new_core(config: EndpointConfig) -> Result<Arc<Core>> {
    config.validate()?;
    let id = u64::from_le_bytes(crate::sys::random_bytes()?) | 1;
    Ok(Arc::new(Core {
        id,
        regions: RegionTable::new(id),
        counters: Counters::default(),
        accepted: Mailbox::new(config.max_pending_accepts),
        next_conn: AtomicU64::new(1),
        open_conns: AtomicUsize::new(0),
        config,
    }))
}

impl Endpoint {
    fn from_core(core: Arc<Core>) -> Endpoint {
        let driver = Driver::new(
            Arc::from(Vec::new()),
            &core.config.progress,
            core.config.wait,
        );
        Endpoint {
            inner: Arc::new(EndpointInner {
                core,
                engines: RwLock::new(Vec::new()),
                driver: RwLock::new(driver),
                stop: Arc::new(AtomicBool::new(false)),
                threads: Mutex::new(Vec::new()),
                adding: Mutex::new(()),
                #[cfg(test)]
                sim_engines: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Start an endpoint: bind its listen addresses and start its progress engines.
    /// Engines for backends it does not listen on start on the first `connect`.
    pub fn bind(config: EndpointConfig) -> Result<Endpoint> {
        let mut tcp_listen = Vec::new();
        let mut udp_listen = Vec::new();
        let mut xdp_listen = Vec::new();
        let mut rdma_listen = Vec::new();
        for a in &config.listen {
            let sel = crate::addr::select(a);
            match (sel.chosen, a) {
                (Some(BackendKind::Tcp), _) => tcp_listen.push(a.socket_addr()),
                (Some(BackendKind::Udp), _) => udp_listen.push(a.socket_addr()),
                (Some(BackendKind::Xdp), Address::Xdp { iface, addr }) => {
                    xdp_listen.push((iface.clone(), *addr))
                }
                (Some(BackendKind::Rdma), _) => rdma_listen.push(a.socket_addr()),
                _ => {
                    return Err(Error::Unsupported {
                        reason: format!("cannot listen on {a}: {sel}"),
                    });
                }
            }
        }
        if xdp_listen.len() > 1 {
            return Err(Error::InvalidArgument(
                "one xdp:// listen address per endpoint (its sockets own the interface)".into(),
            ));
        }
        if rdma_listen.len() > 1 {
            return Err(Error::InvalidArgument(
                "one rdma:// listen address per endpoint (bind several endpoints for more)".into(),
            ));
        }
        if udp_listen.len() > 1 {
            return Err(Error::InvalidArgument(
                "one udp:// listen address per endpoint (bind several endpoints for more)".into(),
            ));
        }
        let ep = Endpoint::from_core(new_core(config)?);
        if !tcp_listen.is_empty() {
            ep.inner.add_tcp(&tcp_listen)?;
        }
        if let Some(a) = udp_listen.first() {
            ep.inner.add_udp(*a, true)?;
        }
        #[cfg(feature = "xdp")]
        if let Some((iface, a)) = xdp_listen.first() {
            ep.inner.add_xdp(iface, *a, true)?;
        }
        #[cfg(not(feature = "xdp"))]
        let _ = xdp_listen;
        #[cfg(feature = "rdma")]
        if let Some(a) = rdma_listen.first() {
            ep.inner.add_rdma(Some(*a))?;
        }
        #[cfg(not(feature = "rdma"))]
        let _ = rdma_listen;
        tracing::debug!(endpoint = %format_args!("{:016x}", ep.id()), "endpoint up");
        Ok(ep)
    }

    /// An endpoint on a simulated network, driven by the caller in virtual time (tests).
    #[cfg(test)]
    pub(crate) fn bind_sim(
        config: EndpointConfig,
        net: &crate::frames::sim::SimNet,
        addr: std::net::SocketAddr,
    ) -> Result<Endpoint> {
        let config = config.progress(Progress::Caller);
        let max = config.max_datagram(false);
        let ep = Endpoint::from_core(new_core(config)?);
        let eng = DgramEngine::new(
            ep.inner.core.clone(),
            BackendKind::Udp,
            Box::new(net.driver(addr)),
            true,
            max,
            None,
        );
        let e = eng.clone();
        ep.inner
            .sim_engines
            .lock()
            .expect("sim engines")
            .push(eng.clone());
        ep.inner.add_engine(eng, Box::new(move |d| e.start(d)))?;
        Ok(ep)
    }

    /// Connect on a simulated network: `drive` runs the world between checks.
    #[cfg(test)]
    pub(crate) fn connect_sim(&self, addr: &str, mut drive: impl FnMut()) -> Result<Connection> {
        let addr = Address::parse(addr)?;
        let dg = self
            .inner
            .sim_engines
            .lock()
            .expect("sim engines")
            .first()
            .cloned()
            .ok_or_else(|| Error::Unsupported {
                reason: "not a simulated endpoint".into(),
            })?;
        let slot = dg.start_connect(&addr);
        for _ in 0..10_000_000 {
            if let Some(r) = slot.take() {
                return r.map(|s| self.wrap(s));
            }
            drive();
        }
        Err(Error::Closed("the simulated connect never finished"))
    }

    /// This endpoint's id (random, printed in hex in logs; the `owner` of its keys).
    pub fn id(&self) -> u64 {
        self.inner.core.id
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EndpointConfig {
        &self.inner.core.config
    }

    /// Addresses it listens on, with the real ports.
    pub fn local_addrs(&self) -> Vec<Address> {
        self.inner
            .engines()
            .iter()
            .flat_map(|e| e.local_addrs())
            .collect()
    }

    /// One line per engine on how it is set up (io_uring flags, threads).
    pub fn describe(&self) -> Vec<String> {
        self.inner.engines().iter().map(|e| e.describe()).collect()
    }

    /// Connect to a peer: `tcp://host:port`, or `auto://host:port` to let the transport
    /// choose (see [`select`](crate::select)).
    pub fn connect(&self, addr: &str) -> Result<Connection> {
        self.connect_addr(&Address::parse(addr)?)
    }

    /// [`connect`](Endpoint::connect) with a parsed address.
    pub fn connect_addr(&self, addr: &Address) -> Result<Connection> {
        let sel = crate::addr::select(addr);
        let kind = sel.chosen.ok_or_else(|| Error::Unsupported {
            reason: format!("cannot connect to {addr}: {sel}"),
        })?;
        if addr.backend().is_none() {
            tracing::debug!(%addr, "{sel}");
        }
        let engine = self.inner.engine_for(kind, addr)?;
        if self.inner.core.open_conns.load(Ordering::Relaxed)
            >= self.inner.core.config.max_connections
        {
            return Err(Error::WouldBlock {
                what: "connections of this endpoint",
                limit: self.inner.core.config.max_connections,
            });
        }
        let shared = engine.connect(&addr.with_backend(kind))?;
        Ok(self.wrap(shared))
    }

    fn wrap(&self, shared: Arc<ConnShared>) -> Connection {
        Connection {
            shared,
            _endpoint: self.inner.clone(),
        }
    }

    /// Wait for the next incoming connection.
    pub fn accept(&self) -> Result<Connection> {
        loop {
            if let Some(c) = self.accept_timeout(Duration::from_secs(3600))? {
                return Ok(c);
            }
        }
    }

    /// Wait up to `timeout` for an incoming connection.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Connection>> {
        let q = &self.inner.core.accepted;
        let r = self
            .inner
            .driver()
            .wait(&q.notify, Some(Instant::now() + timeout), || {
                match q.try_pop() {
                    Ok(Some((c, _))) => Some(Ok(c)),
                    Ok(None) => None,
                    Err(reason) => Some(Err(reason)),
                }
            })?;
        match r {
            None => Ok(None),
            Some(Ok(c)) => Ok(Some(self.wrap(c))),
            Some(Err(reason)) => Err(Error::lost(reason)),
        }
    }

    /// An incoming connection if one is waiting (drives progress once in caller mode).
    pub fn try_accept(&self) -> Option<Connection> {
        if self.inner.core.config.progress == Progress::Caller {
            self.progress();
        }
        match self.inner.core.accepted.try_pop() {
            Ok(Some((c, _))) => Some(self.wrap(c)),
            _ => None,
        }
    }

    /// Allocate a zeroed region of `len` bytes that keys may grant `rights` on (huge
    /// pages when configured, available, and `len` is a multiple of 2 MiB).
    pub fn alloc_region(&self, len: usize, rights: Rights) -> Result<Region> {
        let mem = Mem::alloc(len, self.inner.core.config.huge_pages)?;
        Ok(self.inner.core.regions.insert(mem, rights))
    }

    /// Register memory the caller allocated (it must start 8-byte aligned). The region
    /// owns it from now on.
    pub fn register_region(&self, memory: Vec<u8>, rights: Rights) -> Result<Region> {
        let mem = Mem::from_vec(memory)?;
        Ok(self.inner.core.regions.insert(mem, rights))
    }

    /// Check, as this endpoint's target side would for a one-sided operation, that `key`
    /// grants `need` on `[offset, offset + len)` of one of this endpoint's regions: the
    /// key names this endpoint, its region exists, its token is one this endpoint issued
    /// and has not revoked, it has not expired, its rights cover `need`, and the range is
    /// inside the region. For layers above that take keys in requests of their own (a
    /// task to run on a region, a copy to make from it) and must authorize them as
    /// strictly as the transport does.
    pub fn check_key(&self, key: &RegionKey, need: Rights, offset: u64, len: u64) -> Result<()> {
        let core = &self.inner.core;
        if key.owner != core.id {
            return Err(Error::AccessDenied {
                reason: format!(
                    "the key belongs to endpoint {:016x}, not to this one ({:016x})",
                    key.owner, core.id
                ),
            });
        }
        let target = Target {
            region: key.region,
            offset,
            token: key.token,
        };
        match core.regions.authorize(&target, need, len, false) {
            Ok(_) => Ok(()),
            Err(r) => Err(
                match crate::backend::remote_error(r.code, r.why, offset, len, key.len) {
                    Error::UnknownRegion { .. } => Error::UnknownRegion { region: key.region },
                    e => e,
                },
            ),
        }
    }

    /// Drive every engine once without blocking; returns how much work was done.
    /// Needed only with [`Progress::Caller`] (it is harmless otherwise).
    pub fn progress(&self) -> usize {
        self.inner.engines().iter().map(|e| e.progress()).sum()
    }

    /// Counters over all of this endpoint's connections.
    pub fn stats(&self) -> Stats {
        self.inner.core.counters.snapshot()
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.inner.core.open_conns.load(Ordering::Relaxed)
    }
}

fn spawn_progress(
    engine: Arc<dyn Engine>,
    start: Start,
    stop: Arc<AtomicBool>,
    cpu: Option<usize>,
    busy: bool,
) -> Result<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    let name = format!("pfs-{}", engine.kind());
    let h = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Some(c) = cpu
                && let Err(e) = crate::sys::pin_current_thread(c)
            {
                tracing::warn!("could not pin the progress thread to cpu {c}: {e}");
            }
            if let Err(e) = start(true) {
                let _ = tx.send(Err(e));
                return;
            }
            let _ = tx.send(Ok(()));
            let mut idle = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if engine.progress() > 0 {
                    idle = 0;
                    continue;
                }
                if busy {
                    idle = idle.wrapping_add(1);
                    if idle.is_multiple_of(4096) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                } else {
                    engine.park(Duration::from_millis(50));
                }
            }
            // The engine may only be driven by this thread (single issuer): tear down here.
            engine.shutdown();
        })
        .map_err(|e| Error::io("spawn progress thread", e))?;
    match rx.recv() {
        Ok(Ok(())) => Ok(h),
        Ok(Err(e)) => {
            let _ = h.join();
            Err(e)
        }
        Err(_) => Err(Error::Closed("progress thread died during start-up")),
    }
}

/// A connection to one peer. Operations are submitted without blocking and complete
/// through their [`Op`] handles. Dropping the connection closes it.
///
/// A connection keeps its endpoint running: the endpoint shuts down when its last
/// handle and its last connection are gone.
pub struct Connection {
    shared: Arc<ConnShared>,
    _endpoint: Arc<EndpointInner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.shared.id)
            .field("backend", &self.shared.backend)
            .field("peer", &self.shared.peer_addr)
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.shared.is_closed() {
            self.shared.engine().close(&self.shared);
        }
    }
}

impl Connection {
    /// Connection id (unique within the endpoint).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The peer's endpoint id (compare with [`RegionKey::owner`]).
    pub fn peer_id(&self) -> u64 {
        self.shared.peer_id
    }

    /// The backend carrying this connection.
    pub fn backend(&self) -> BackendKind {
        self.shared.backend
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> &Address {
        &self.shared.peer_addr
    }

    /// Our address on this connection.
    pub fn local_addr(&self) -> &Address {
        &self.shared.local_addr
    }

    /// Counters of this connection.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Whether the connection has closed (locally, by the peer, or by an error).
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Close now: pending operations fail with `ConnectionLost`.
    pub fn close(&self) {
        self.shared.engine().close(&self.shared);
    }

    #[inline]
    fn remote(&self, key: &RegionKey, offset: u64, len: u64, need: Rights) -> Result<Target> {
        if key.owner != self.shared.peer_id {
            return Err(Error::AccessDenied {
                reason: format!(
                    "the key belongs to endpoint {:016x}, this connection reaches {:016x}",
                    key.owner, self.shared.peer_id
                ),
            });
        }
        if !key.rights.contains(need) {
            return Err(Error::AccessDenied {
                reason: format!("the key grants {}, this access needs {need}", key.rights),
            });
        }
        if offset.checked_add(len).is_none_or(|e| e > key.len) {
            return Err(Error::OutOfBounds {
                offset,
                len,
                region_len: key.len,
            });
        }
        Ok(Target {
            region: key.region,
            offset,
            token: key.token,
        })
    }

    #[inline]
    fn local(&self, region: &Region, offset: u64, len: u64) -> Result<crate::sys::mem::Slice> {
        if region.owner() != self.shared.core.id {
            return Err(Error::InvalidArgument(
                "the local region belongs to another endpoint; register it with this one".into(),
            ));
        }
        let max = self
            .shared
            .core
            .config
            .max_op_size
            .min(u64::from(self.shared.peer_max_payload));
        if len > max {
            return Err(Error::TooLarge {
                what: "operation",
                len,
                max,
            });
        }
        region.slice(offset, len)
    }

    #[inline(always)]
    fn submit<T: crate::op::OpOutput>(&self, kind: OpKind, key_len: u64) -> Result<Op<T>> {
        let s = &self.shared;
        if s.is_closed() {
            return Err(Error::lost(s.close_reason()));
        }
        let max = s.core.config.max_ops_in_flight;
        if s.inflight.fetch_add(1, Ordering::AcqRel) >= max {
            s.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::WouldBlock {
                what: "operations in flight on this connection",
                limit: max,
            });
        }
        let done = s.driver.completion();
        let req = OpReq {
            kind,
            done: done.clone(),
            deadline: None,
            key_len,
        };
        if s.engine().submit(s, req).is_err() {
            s.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::WouldBlock {
                what: "the endpoint's submission queue",
                limit: s.core.config.max_queued_ops,
            });
        }
        s.count(C::ops_submitted, 1);
        Ok(Op::new(done, s.driver.clone()))
    }

    /// Write `len` bytes of `local` at `local_offset` into the remote region of `key` at
    /// `remote_offset`. Completes once the bytes are in the target region.
    #[inline(always)]
    pub fn write(
        &self,
        local: &Region,
        local_offset: u64,
        key: &RegionKey,
        remote_offset: u64,
        len: u64,
    ) -> Result<Op<()>> {
        self.write_op(local, local_offset, key, remote_offset, len, None)
    }

    /// Like [`write`](Connection::write), and the target receives a [`Notification`]
    /// carrying `imm` once the bytes are in place.
    pub fn write_with_notify(
        &self,
        local: &Region,
        local_offset: u64,
        key: &RegionKey,
        remote_offset: u64,
        len: u64,
        imm: u32,
    ) -> Result<Op<()>> {
        self.write_op(local, local_offset, key, remote_offset, len, Some(imm))
    }

    fn write_op(
        &self,
        local: &Region,
        local_offset: u64,
        key: &RegionKey,
        remote_offset: u64,
        len: u64,
        notify: Option<u32>,
    ) -> Result<Op<()>> {
        let target = self.remote(key, remote_offset, len, Rights::WRITE)?;
        let local = self.local(local, local_offset, len)?;
        self.submit(
            OpKind::Write {
                local,
                target,
                notify,
            },
            key.len,
        )
    }

    /// Read `len` bytes of the remote region of `key` at `remote_offset` into `local` at
    /// `local_offset`. Completes once the bytes are in `local`.
    #[inline(always)]
    pub fn read(
        &self,
        local: &Region,
        local_offset: u64,
        key: &RegionKey,
        remote_offset: u64,
        len: u64,
    ) -> Result<Op<()>> {
        let target = self.remote(key, remote_offset, len, Rights::READ)?;
        let local = self.local(local, local_offset, len)?;
        self.submit(OpKind::Read { local, target }, key.len)
    }

    fn atomic_target(&self, key: &RegionKey, offset: u64) -> Result<Target> {
        if !offset.is_multiple_of(8) {
            return Err(Error::Misaligned { offset });
        }
        self.remote(key, offset, 8, Rights::ATOMIC)
    }

    /// Atomically replace the little-endian u64 at `offset` with `new` if it equals
    /// `expected`. Yields the old value (the swap happened if it equals `expected`).
    pub fn compare_and_swap(
        &self,
        key: &RegionKey,
        offset: u64,
        expected: u64,
        new: u64,
    ) -> Result<Op<u64>> {
        let target = self.atomic_target(key, offset)?;
        self.submit(
            OpKind::Cas {
                target,
                expected,
                new,
            },
            key.len,
        )
    }

    /// Atomically add `add` (wrapping) to the little-endian u64 at `offset`. Yields the
    /// old value.
    pub fn fetch_add(&self, key: &RegionKey, offset: u64, add: u64) -> Result<Op<u64>> {
        let target = self.atomic_target(key, offset)?;
        self.submit(OpKind::Faa { target, add }, key.len)
    }

    /// Order operations: everything submitted before the fence takes effect before
    /// anything submitted after it is issued. The returned handle completes when
    /// everything before the fence has completed.
    pub fn fence(&self) -> Result<Op<()>> {
        self.submit(OpKind::Fence, 0)
    }

    /// Send a message; it completes once the peer has queued it for [`recv`].
    ///
    /// [`recv`]: Connection::recv
    pub fn send(&self, data: &[u8]) -> Result<Op<()>> {
        let max = (self.shared.core.config.max_message_size as u64)
            .min(u64::from(self.shared.peer_max_payload));
        if data.len() as u64 > max {
            return Err(Error::TooLarge {
                what: "message",
                len: data.len() as u64,
                max,
            });
        }
        self.submit(
            OpKind::Send {
                data: data.to_vec(),
            },
            0,
        )
    }

    fn pop<T>(&self, q: &Mailbox<T>) -> Option<Result<T>> {
        match q.try_pop() {
            Ok(Some((v, was_full))) => {
                if was_full {
                    self.shared.engine().room_available(&self.shared);
                }
                Some(Ok(v))
            }
            Ok(None) => None,
            Err(reason) => Some(Err(Error::lost(reason))),
        }
    }

    fn wait_on<T>(&self, q: &Mailbox<T>, timeout: Option<Duration>) -> Result<Option<T>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        match self
            .shared
            .driver
            .wait(&q.notify, deadline, || self.pop(q))?
        {
            None => Ok(None),
            Some(r) => r.map(Some),
        }
    }

    /// Wait for the next message.
    ///
    /// Received messages wait in a bounded queue (`EndpointConfig::max_incoming`); when
    /// it is full the connection stops reading from the network, which slows the
    /// sender down — and also holds back the answers to this side's own operations on
    /// the same connection. Drain messages (and notifications) as they come.
    pub fn recv(&self) -> Result<Vec<u8>> {
        loop {
            if let Some(m) = self.wait_on(&self.shared.inbox, Some(Duration::from_secs(3600)))? {
                return Ok(m);
            }
        }
    }

    /// Wait up to `timeout` for the next message.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.wait_on(&self.shared.inbox, Some(timeout))
    }

    /// The next message if one is queued.
    pub fn try_recv(&self) -> Result<Option<Vec<u8>>> {
        if self.shared.driver.caller_drives {
            self.shared.engine().progress();
        }
        self.pop(&self.shared.inbox).transpose()
    }

    /// The next message, as a future.
    pub fn recv_async(&self) -> Incoming<'_, Vec<u8>> {
        Incoming {
            conn: self,
            q: &self.shared.inbox,
        }
    }

    /// Wait up to `timeout` for the next write notification.
    pub fn notification_timeout(&self, timeout: Duration) -> Result<Option<Notification>> {
        self.wait_on(&self.shared.notes, Some(timeout))
    }

    /// The next write notification if one is queued.
    pub fn try_notification(&self) -> Result<Option<Notification>> {
        if self.shared.driver.caller_drives {
            self.shared.engine().progress();
        }
        self.pop(&self.shared.notes).transpose()
    }

    /// The next write notification, as a future.
    pub fn notification_async(&self) -> Incoming<'_, Notification> {
        Incoming {
            conn: self,
            q: &self.shared.notes,
        }
    }
}

/// A future for the next message (`Vec<u8>`) or [`Notification`] of a connection.
#[must_use = "futures do nothing unless polled"]
pub struct Incoming<'a, T> {
    conn: &'a Connection,
    q: &'a Mailbox<T>,
}

impl<T> std::fmt::Debug for Incoming<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("conn", &self.conn.id())
            .finish()
    }
}

impl<T> Future for Incoming<'_, T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let (conn, q) = (self.conn, self.q);
        if conn.shared.driver.caller_drives {
            conn.shared.driver.progress();
        }
        if let Some(r) = conn.pop(q) {
            return Poll::Ready(r);
        }
        if conn.shared.driver.caller_drives {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        q.notify.register_waker(cx.waker());
        match conn.pop(q) {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}
