//! The `tcp` backend: wire messages over TCP streams, driven by one io_uring per endpoint.
//!
//! Each connection has at most one `recv` and one `sendmsg` in flight (a stream must
//! stay in order). Received bytes land in a small staging buffer until a header is
//! decoded; a large payload is then received **directly into its destination** (the
//! target region for a write, the local region for a read response) with
//! `MSG_WAITALL`, so bulk data crosses exactly one copy (the kernel's) on each side.
//! Outgoing messages are batched: every header queued on a connection is packed into one
//! arena and sent with the payloads (region memory, by pointer) in one gathered
//! `sendmsg`.
//!
//! One-sided operations execute at the target inside this engine: the access is checked
//! against the region table (token, rights, revocation, expiry, bounds, alignment)
//! before a byte is placed or read; refused write payloads are drained and discarded.

use std::collections::VecDeque;

use crate::idmap::IdMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::addr::{Address, BackendKind};
use crate::auth;
use crate::backend::{Engine, OpKind, OpReq, remote_error};
use crate::endpoint::{ConnShared, Core, Notification};
use crate::error::{Error, Result};
use crate::key::Rights;
use crate::op::Completion;
use crate::region::{cas, faa};
use crate::stats::C;
use crate::sys::mem::Slice;
use crate::sys::uring::{Buf, Cqe, Gather, Held, Issuer, MAX_IOV, Ring, Seg};
use crate::sys::{self, EventFd};
use crate::wire::{
    self, Body, DecodeError, ErrorCode, Header, Limits, MAX_ERROR_PAYLOAD, MAX_HEADER_LEN,
    MAX_HELLO_PAYLOAD, Target,
};

/// Staging buffer per connection.
const STAGE_LEN: usize = 32 << 10;
/// Payload remainders at least this large are received straight into their destination.
const DIRECT_MIN: usize = 4 << 10;
/// Messages queued for one peer before its input is no longer decoded (a peer that
/// sends requests but does not read the answers is slowed down by TCP, not buffered
/// without bound).
const TXQ_MAX: usize = 4096;
/// Busy-poll mode: with more idle connections than this, one poll(2) finds the ready
/// ones before any recv.
const POLL_BATCH_MIN: usize = 4;
/// Payloads up to this size are copied into the send arena next to their header.
const INLINE_MAX: usize = 512;
/// Messages packed into one sendmsg (two iovecs each at most).
const MAX_BATCH: usize = MAX_IOV / 2;
/// Submissions taken from the queue per progress pass.
const CMD_BUDGET: usize = 1024;
/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(1);

const K_RECV: u64 = 0;
const K_SEND: u64 = 1;
const K_ACCEPT: u64 = 2;
const K_WAKE: u64 = 3;

fn tag(id: u64, kind: u64) -> u64 {
    (id << 3) | kind
}

/// Control messages from application threads to the engine.
enum Ctl {
    Adopt(Arc<ConnShared>, TcpStream),
    Close(Arc<ConnShared>),
    Room(Arc<ConnShared>),
}

/// The tcp engine.
pub(crate) struct TcpEngine {
    core: Arc<Core>,
    me: Weak<TcpEngine>,
    ops: ArrayQueue<(Arc<ConnShared>, OpReq)>,
    ctl: Mutex<Vec<Ctl>>,
    /// Set when `ctl` may hold something, so that idle passes skip the lock.
    ctl_pending: AtomicBool,
    state: Mutex<Option<State>>,
    listeners: Mutex<Vec<TcpListener>>,
    addrs: Vec<SocketAddr>,
    sleeping: AtomicBool,
    wake_fd: EventFd,
    dead: Mutex<Option<String>>,
    is_dead: AtomicBool,
    setup: Mutex<String>,
    /// With a dedicated progress thread, only that thread may touch the ring (it was set
    /// up single-issuer); calls from other threads are no-ops.
    owner: std::sync::OnceLock<std::thread::ThreadId>,
}

impl std::fmt::Debug for TcpEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpEngine")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl TcpEngine {
    /// Bind the listeners (so address errors surface at once); the ring comes later,
    /// from the thread that will drive it ([`TcpEngine::init_ring`]).
    pub(crate) fn new(core: Arc<Core>, listen: &[SocketAddr]) -> Result<Arc<TcpEngine>> {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for a in listen {
            let l = TcpListener::bind(a).map_err(|e| Error::Io {
                call: "bind",
                source: std::io::Error::new(e.kind(), format!("tcp://{a}: {e}")),
            })?;
            addrs.push(l.local_addr().map_err(|e| Error::io("getsockname", e))?);
            listeners.push(l);
        }
        let wake_fd = EventFd::new().map_err(|e| Error::io("eventfd", e))?;
        let cap = core.config.max_queued_ops;
        Ok(Arc::new_cyclic(|me| TcpEngine {
            core,
            me: me.clone(),
            ops: ArrayQueue::new(cap),
            ctl: Mutex::new(Vec::new()),
            ctl_pending: AtomicBool::new(false),
            state: Mutex::new(None),
            listeners: Mutex::new(listeners),
            addrs,
            sleeping: AtomicBool::new(false),
            wake_fd,
            dead: Mutex::new(None),
            is_dead: AtomicBool::new(false),
            setup: Mutex::new(String::new()),
            owner: std::sync::OnceLock::new(),
        }))
    }

    /// Create the io_uring. `dedicated`: called on the progress thread that alone will
    /// submit (enables single-issuer, deferred task work).
    pub(crate) fn init_ring(&self, dedicated: bool) -> Result<()> {
        if dedicated {
            let _ = self.owner.set(std::thread::current().id());
        }
        let issuer = if dedicated {
            Issuer::Single
        } else {
            Issuer::Shared
        };
        let ring = Ring::new(1024, issuer).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) => {
                    " (io_uring is disabled: check sysctl kernel.io_uring_disabled \
                     or the container's seccomp profile)"
                }
                Some(libc::ENOMEM) => " (locked-memory limit too small: raise ulimit -l)",
                Some(libc::ENOSYS) => {
                    " (this kernel has no io_uring; Linux 6.1 or newer is needed)"
                }
                _ => "",
            };
            Error::Io {
                call: "io_uring_setup",
                source: std::io::Error::new(e.kind(), format!("{e}{hint}")),
            }
        })?;
        *self.setup.lock().expect("setup lock") = format!(
            "tcp: io_uring ({}), {}, {}",
            ring.features,
            if dedicated {
                "progress thread"
            } else {
                "caller-driven progress"
            },
            match self.core.config.wait {
                crate::config::WaitMode::BusyPoll => {
                    "busy-poll (idle sockets polled with non-blocking recv)"
                }
                crate::config::WaitMode::Block => "blocking waits in io_uring_enter",
            }
        );
        let listeners = std::mem::take(&mut *self.listeners.lock().expect("listener lock"));
        let limits = Limits {
            max_payload: self.core.config.max_payload(),
        };
        let mut st = State {
            ctx: Ctx {
                ring,
                core: self.core.clone(),
                me: self.me.clone(),
                limits,
                next_op: 1,
                dirty: Vec::new(),
                closing: Vec::new(),
                listeners: listeners
                    .into_iter()
                    .map(|sock| Listener { sock, armed: false })
                    .collect(),
                wake_armed: false,
                last_tick: Instant::now(),
                rearm_accept: true,
                accept_retry_at: None,
                accept_warned: None,
                poll: self.core.config.wait == crate::config::WaitMode::BusyPoll,
                to_arm: Vec::new(),
                pollers: Vec::new(),
                pollfds: Vec::new(),
                ready: Vec::new(),
                passes: 0,
            },
            conns: IdMap::default(),
            cqes: Vec::with_capacity(256),
        };
        st.arm_listeners();
        *self.state.lock().expect("state lock") = Some(st);
        Ok(())
    }

    /// Whether the calling thread may drive the ring.
    fn may_drive(&self) -> bool {
        self.owner
            .get()
            .is_none_or(|&t| t == std::thread::current().id())
    }

    fn die(&self, reason: String) {
        tracing::error!("tcp engine stopped: {reason}");
        *self.dead.lock().expect("dead lock") = Some(reason);
        self.is_dead.store(true, Ordering::SeqCst);
    }

    fn push_ctl(&self, c: Ctl) {
        self.ctl.lock().expect("ctl lock").push(c);
        self.ctl_pending.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Issue queued operations and send them, without polling or reaping (the fast path
    /// of a submission on a caller-driven, busy-polling endpoint).
    fn issue_now(&self) {
        let Ok(mut guard) = self.state.try_lock() else {
            return;
        };
        let Some(st) = guard.as_mut() else {
            return;
        };
        self.drain_ctl(st);
        let mut n = 0;
        while n < CMD_BUDGET {
            let Some((shared, req)) = self.ops.pop() else {
                break;
            };
            n += 1;
            if !st.conns.contains_key(&shared.id) {
                self.drain_ctl(st);
            }
            st.admit(&shared, req);
        }
        if n > 0 {
            st.flush_dirty();
            st.arm_pending();
            if let Err(e) = st.ctx.ring.submit() {
                self.die(format!("io_uring_enter failed: {e}"));
                st.fail_all("the tcp engine stopped");
            }
        }
    }

    fn drain_ctl(&self, st: &mut State) -> usize {
        if !self.ctl_pending.swap(false, Ordering::AcqRel) {
            return 0;
        }
        let ctl = std::mem::take(&mut *self.ctl.lock().expect("ctl lock"));
        let n = ctl.len();
        for c in ctl {
            match c {
                Ctl::Adopt(shared, sock) => st.adopt(shared, sock),
                Ctl::Close(shared) => {
                    if let Some(conn) = st.conns.get_mut(&shared.id) {
                        st.ctx.fail_conn(conn, "closed locally".into(), false);
                    } else {
                        shared.mark_closed("closed locally");
                    }
                }
                Ctl::Room(shared) => {
                    if let Some(conn) = st.conns.get_mut(&shared.id)
                        && conn.rx_stalled
                    {
                        conn.rx_stalled = false;
                        st.ctx.pump_rx(conn);
                    }
                }
            }
        }
        n
    }
}

impl Engine for TcpEngine {
    fn kind(&self) -> BackendKind {
        BackendKind::Tcp
    }

    fn submit(&self, conn: &Arc<ConnShared>, req: OpReq) -> std::result::Result<(), OpReq> {
        self.ops.push((conn.clone(), req)).map_err(|(_, r)| r)?;
        if self.owner.get().is_none()
            && self.core.config.wait == crate::config::WaitMode::BusyPoll
            && conn.inflight.load(Ordering::Relaxed) <= 1
        {
            // Caller-driven busy-poll, and this is the connection's only operation: the
            // submitting thread is the engine, so the request leaves now rather than on
            // the next pass of a wait. (With more in flight, requests wait for the next
            // pass and leave together, in one system call.)
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
        let mut work = st.reap();
        work += self.drain_ctl(st);
        let mut n = 0;
        while n < CMD_BUDGET {
            let Some((shared, req)) = self.ops.pop() else {
                break;
            };
            n += 1;
            if !st.conns.contains_key(&shared.id) {
                // The connection may have been adopted after the control queue was read.
                self.drain_ctl(st);
            }
            st.admit(&shared, req);
        }
        work += n;
        // New requests leave before this pass polls for input (a poll is a system call
        // on the request's critical path otherwise); answers to what the poll brings
        // leave with the flush below.
        if n > 0 {
            st.flush_dirty();
        }
        work += st.poll_sockets();
        st.maybe_tick();
        // Sends first, then receives: one enter submits both, answers leave first.
        st.flush_dirty();
        st.arm_pending();
        if let Err(e) = st.ctx.ring.submit() {
            self.die(format!("io_uring_enter failed: {e}"));
            st.fail_all("the tcp engine stopped");
            return work;
        }
        work += st.reap();
        // Answers go out at once; in busy-poll mode a receive alone is not worth another
        // enter here (it is pushed with the next pass), so the waiter sees completions
        // one system call sooner.
        if !st.ctx.dirty.is_empty() || (!st.ctx.poll && !st.ctx.to_arm.is_empty()) {
            st.flush_dirty();
            st.arm_pending();
            let _ = st.ctx.ring.submit();
        }
        work
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
            drop(guard);
            std::thread::sleep(max.min(Duration::from_millis(10)));
            return;
        };
        self.sleeping.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.ops.is_empty() || self.ctl_pending.load(Ordering::SeqCst) {
            self.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        if !st.ctx.wake_armed {
            if st
                .ctx
                .ring
                .read_counter(self.wake_fd.raw(), tag(0, K_WAKE))
                .is_ok()
            {
                st.ctx.wake_armed = true;
            } else {
                self.sleeping.store(false, Ordering::SeqCst);
                return;
            }
        }
        st.flush_dirty();
        st.arm_pending();
        let timeout = max.min(Duration::from_millis(50));
        if let Err(e) = st.ctx.ring.wait(timeout) {
            self.die(format!("io_uring_enter (wait) failed: {e}"));
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }

    fn wake(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake_fd.signal();
        }
    }

    fn connect(&self, addr: &Address) -> Result<Arc<ConnShared>> {
        let sa = addr.socket_addr();
        let cfg = &self.core.config;
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut s =
            TcpStream::connect_timeout(&sa, cfg.connect_timeout).map_err(|e| Error::Io {
                call: "connect",
                source: std::io::Error::new(e.kind(), format!("{addr}: {e}")),
            })?;
        let _ = s.set_nodelay(true);
        let hs = handshake(&mut s, &self.core, deadline).map_err(|e| match e {
            Error::Io { call, source } => Error::Io {
                call,
                source: std::io::Error::new(
                    source.kind(),
                    format!("handshake with {addr}: {source}"),
                ),
            },
            // The deadline that passed is the connect deadline.
            Error::Timeout { .. } => Error::Timeout {
                after: cfg.connect_timeout,
            },
            other => other,
        })?;
        let _ = s.set_read_timeout(None);
        let _ = s.set_write_timeout(None);
        configure_socket(&s, &self.core);
        let local = s
            .local_addr()
            .map(Address::Tcp)
            .unwrap_or_else(|_| addr.clone());
        let me: Arc<dyn Engine> = self.me.upgrade().ok_or(Error::Closed("endpoint"))?;
        let shared = ConnShared::new(
            self.core.next_conn_id(),
            self.core.clone(),
            me,
            hs.peer,
            local,
            Address::Tcp(sa),
            hs.max_payload,
        );
        self.push_ctl(Ctl::Adopt(shared.clone(), s));
        tracing::debug!(peer = %addr, conn = shared.id, "connected");
        Ok(shared)
    }

    fn local_addrs(&self) -> Vec<Address> {
        self.addrs.iter().map(|a| Address::Tcp(*a)).collect()
    }

    fn shutdown(&self) {
        if !self.may_drive() {
            // The progress thread tears the ring down itself when it stops; from here,
            // only make sure waiters learn the engine is gone.
            if !self.is_dead.swap(true, Ordering::SeqCst) {
                *self.dead.lock().expect("dead lock") = Some("endpoint closed".into());
            }
            return;
        }
        let mut guard = self.state.lock().expect("state lock");
        if let Some(mut st) = guard.take() {
            st.fail_all("endpoint closed");
            while let Some((shared, req)) = self.ops.pop() {
                shared.finish(&req.done, Err(Error::lost("endpoint closed")));
            }
            for c in std::mem::take(&mut *self.ctl.lock().expect("ctl lock")) {
                if let Ctl::Adopt(shared, _) = c {
                    shared.mark_closed("endpoint closed");
                }
            }
            for l in &st.ctx.listeners {
                sys::shutdown(l.sock.as_raw_fd());
            }
            self.wake_fd.signal();
            // Let every operation in flight complete before the ring and its buffers go.
            let until = Instant::now() + Duration::from_secs(2);
            while st.ctx.ring.inflight() > 0 && Instant::now() < until {
                let _ = st.ctx.ring.wait(Duration::from_millis(10));
                st.cqes.clear();
                st.ctx.ring.reap(&mut st.cqes);
            }
            for conn in st.conns.values_mut() {
                conn.finish_dying();
            }
        }
        if !self.is_dead.load(Ordering::SeqCst) {
            *self.dead.lock().expect("dead lock") = Some("endpoint closed".into());
            self.is_dead.store(true, Ordering::SeqCst);
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

/// Socket options for an established connection.
fn configure_socket(s: &TcpStream, core: &Core) {
    let _ = s.set_nodelay(true);
    let fd = s.as_raw_fd();
    if let Err(e) = sys::tcp_dead_peer_detection(fd, core.config.op_timeout) {
        tracing::debug!("keepalive setup failed: {e}");
    }
    if core.config.socket_buffer > 0 {
        sys::set_socket_buffers(fd, core.config.socket_buffer);
    }
}

struct HandshakeResult {
    peer: u64,
    max_payload: u32,
}

/// Fill `buf` from `s` by `deadline`. The time left is set again before every read: a
/// peer that trickles its answer a byte at a time cannot stretch the handshake past the
/// deadline (a read timeout alone bounds each read, not the whole).
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                after: Duration::ZERO,
            });
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf[got..]) {
            // A peer that dies mid-handshake and one that is not a PacketFS endpoint
            // look the same from here; neither sent anything invalid.
            Ok(0) => return Err(handshake_closed()),
            Ok(n) => got += n,
            Err(e) => match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                    return Err(handshake_closed());
                }
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    return Err(Error::Timeout {
                        after: Duration::ZERO,
                    });
                }
                _ => return Err(Error::io("recv", e)),
            },
        }
    }
    Ok(())
}

fn handshake_closed() -> Error {
    Error::ConnectionLost {
        reason: "the peer closed the connection during the handshake (it stopped, or it is \
                 not a PacketFS endpoint)"
            .into(),
    }
}

/// Client side of connection setup: HELLO out, HELLO_ACK (or ERROR) back; with a cluster
/// secret, our nonce rides on the HELLO, the target's nonce and proof on the HELLO_ACK,
/// and our proof goes out in an AUTH (see `docs/security.md`).
fn handshake(s: &mut TcpStream, core: &Core, deadline: Instant) -> Result<HandshakeResult> {
    let secret = core.config.secret.clone();
    let our_nonce = secret.as_ref().map(|_| auth::nonce()).transpose()?;
    let hello = Header {
        op_id: 0,
        payload_len: our_nonce.map_or(0, |n| n.len() as u32),
        body: Body::Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::MAX_VERSION,
            endpoint: core.id,
            max_payload: core.config.max_payload(),
            features: if secret.is_some() {
                wire::FEATURE_AUTH
            } else {
                0
            },
        },
    };
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + auth::NONCE_LEN);
    hello.encode_to(&mut out);
    if let Some(n) = &our_nonce {
        out.extend_from_slice(n);
    }
    let _ = s.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now())));
    s.write_all(&out).map_err(|e| Error::io("send", e))?;
    let (h, payload) = read_setup_message(s, deadline)?;
    match h.body {
        Body::HelloAck {
            version,
            endpoint,
            max_payload,
            features,
        } => {
            if !(wire::MIN_VERSION..=wire::MAX_VERSION).contains(&version) {
                return Err(Error::VersionMismatch {
                    ours_min: wire::MIN_VERSION,
                    ours_max: wire::MAX_VERSION,
                    theirs_min: version,
                    theirs_max: version,
                });
            }
            let proof = auth::check_target(
                secret.as_ref(),
                our_nonce,
                features & wire::FEATURE_AUTH != 0,
                &payload,
                core.id,
                endpoint,
            )
            .inspect_err(|_| core.counters.add(C::auth_failures, 1))?;
            if let Some(proof) = proof {
                let h = Header {
                    op_id: 0,
                    payload_len: proof.len() as u32,
                    body: Body::Auth,
                };
                let mut out = Vec::with_capacity(MAX_HEADER_LEN + proof.len());
                h.encode_to(&mut out);
                out.extend_from_slice(&proof);
                s.write_all(&out).map_err(|e| Error::io("send", e))?;
            }
            Ok(HandshakeResult {
                peer: endpoint,
                max_payload,
            })
        }
        Body::Error { code } => {
            let text = String::from_utf8_lossy(&payload).into_owned();
            Err(match code {
                ErrorCode::Busy => Error::Busy(text),
                ErrorCode::AuthFailed => {
                    core.counters.add(C::auth_failures, 1);
                    Error::AuthFailed(format!("the peer refused us: {text}"))
                }
                ErrorCode::UnsupportedVersion => {
                    Error::Protocol(format!("the peer refused our wire version: {text}"))
                }
                _ => Error::Protocol(format!("the peer refused the connection: {text}")),
            })
        }
        other => Err(Error::Protocol(format!(
            "expected HELLO_ACK, got {:?}",
            other.opcode()
        ))),
    }
}

/// Read one setup message (HELLO_ACK or ERROR, payload at most 1 KiB) and its payload,
/// refusing any longer payload before allocating for it.
fn read_setup_message(s: &mut TcpStream, deadline: Instant) -> Result<(Header, Vec<u8>)> {
    let mut buf = vec![0u8; wire::PREFIX_LEN];
    read_exact_by(s, &mut buf, deadline)?;
    let limits = Limits {
        max_payload: MAX_HELLO_PAYLOAD,
    };
    let h = loop {
        match Header::decode(&buf, &limits) {
            Ok((h, _)) => break h,
            Err(DecodeError::Incomplete { need }) if need > buf.len() => {
                let have = buf.len();
                buf.resize(need, 0);
                read_exact_by(s, &mut buf[have..], deadline)?;
            }
            Err(e) => {
                return Err(Error::Protocol(format!(
                    "the peer answered with something that is not a PacketFS handshake: {e}"
                )));
            }
        }
    };
    let mut payload = vec![0u8; h.payload_len as usize];
    read_exact_by(s, &mut payload, deadline)?;
    Ok((h, payload))
}

struct Listener {
    sock: TcpListener,
    armed: bool,
}

/// An operation waiting for the target's answer.
struct Pending {
    done: Arc<Completion>,
    kind: PKind,
    remote_off: u64,
    len: u64,
    key_len: u64,
}

enum PKind {
    Write,
    Read(Slice),
    Atomic,
    Send,
}

/// Where payload bytes go.
enum Dst {
    Region(Slice),
    Heap(Option<Vec<u8>>),
    Discard,
}

/// What to do once a payload is complete.
enum Then {
    /// A remote write placed `bytes`; `last` when the whole op is in.
    Placed {
        op_id: u64,
        last: bool,
        notify: Option<Notification>,
        bytes: u64,
    },
    /// Data for our read `op_id`.
    ReadData { op_id: u64, last: bool },
    /// A message for the application.
    Message { op_id: u64 },
    /// The explanation of an `ERROR`.
    ErrorText { op_id: u64, code: ErrorCode },
    /// Bytes to discard (refused write, late read response).
    Dropped,
    /// The payload of a HELLO from a peer that does not authenticate to an endpoint
    /// without a secret (discarded).
    HelloPayload,
    /// The initiator's nonce (authenticating HELLO).
    AuthNonce,
    /// The initiator's proof (AUTH).
    AuthProof,
}

/// What a connection's target side knows of the peer before it is established.
#[derive(Clone, Copy)]
struct PeerHello {
    endpoint: u64,
    max_payload: u32,
    version: u8,
}

/// Where the target side stands in the authentication exchange.
enum SrvAuth {
    /// Nothing to prove (no secret), or proven.
    Open,
    /// An authenticating HELLO was read; its nonce follows.
    Nonce(PeerHello),
    /// HELLO_ACK with our nonce and proof sent; the initiator's AUTH must come next.
    Proof(PeerHello, crate::auth::Transcript),
}

enum Rx {
    Header,
    Payload {
        dst: Dst,
        len: usize,
        got: usize,
        then: Then,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RecvInto {
    Stage,
    Direct,
}

/// A recv waiting to be pushed to the ring.
struct RecvReq {
    buf: Buf,
    start: usize,
    len: usize,
    flags: i32,
}

struct Tx {
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    payload: Option<Buf>,
}

struct Conn {
    id: u64,
    sock: TcpStream,
    shared: Option<Arc<ConnShared>>,
    peer: SocketAddr,
    /// Accepted from a listener (not connected out).
    accepted: bool,
    hs_deadline: Option<Instant>,
    hs_version: u8,
    /// Target side of the authentication exchange (cluster secret).
    auth: SrvAuth,
    stage: Option<Vec<u8>>,
    lo: usize,
    hi: usize,
    rx: Rx,
    /// A recv is in flight, or prepared in `recv_req` and about to be.
    recv_busy: bool,
    recv_into: RecvInto,
    /// A recv prepared during this pass, pushed after the pass's sends.
    recv_req: Option<RecvReq>,
    /// Busy-poll mode: waiting for bytes, polled every pass (see `State::poll_sockets`).
    polling: bool,
    /// Waiting for room in the application's receive queues (resumed when it drains).
    rx_stalled: bool,
    /// Too much output queued for a peer that does not read: stop decoding its input
    /// until the backlog halves (TCP flow control then slows the peer down).
    rx_tx_blocked: bool,
    /// No more input will be decoded (protocol error or refused handshake); the
    /// connection closes once its last message is out.
    rx_closed: bool,
    txq: VecDeque<Tx>,
    tx_busy: bool,
    tx_sent: usize,
    /// The batch in flight goes out with zero-copy sends.
    tx_zc: bool,
    /// Bytes in the batch in flight.
    tx_total: usize,
    spare: Option<Gather>,
    arena: Vec<u8>,
    in_dirty: bool,
    pending: IdMap<Pending>,
    timeouts: VecDeque<(Instant, u64)>,
    fence: Option<OpReq>,
    held: VecDeque<OpReq>,
    closing: Option<String>,
    /// Operations of a closing connection, failed once nothing is in flight on it.
    dying: Vec<(Arc<Completion>, Error)>,
    /// Close once the queued output (an error for the peer) has been sent.
    close_after_flush: Option<String>,
    /// ... or at this time, whichever comes first.
    close_by: Option<Instant>,
}

impl Conn {
    /// Report the failures of a closed connection's operations.
    fn finish_dying(&mut self) {
        if let Some(s) = &self.shared {
            for (done, e) in self.dying.drain(..) {
                s.finish(&done, Err(e));
            }
        }
    }

    fn new(id: u64, sock: TcpStream, shared: Option<Arc<ConnShared>>, peer: SocketAddr) -> Conn {
        Conn {
            id,
            sock,
            shared,
            peer,
            accepted: false,
            hs_deadline: None,
            hs_version: 0,
            auth: SrvAuth::Open,
            stage: Some(vec![0u8; STAGE_LEN]),
            lo: 0,
            hi: 0,
            rx: Rx::Header,
            recv_busy: false,
            recv_into: RecvInto::Stage,
            recv_req: None,
            polling: false,
            rx_stalled: false,
            rx_tx_blocked: false,
            rx_closed: false,
            txq: VecDeque::new(),
            tx_busy: false,
            tx_sent: 0,
            tx_zc: false,
            tx_total: 0,
            spare: None,
            arena: Vec::new(),
            in_dirty: false,
            pending: IdMap::default(),
            timeouts: VecDeque::new(),
            fence: None,
            held: VecDeque::new(),
            closing: None,
            dying: Vec::new(),
            close_after_flush: None,
            close_by: None,
        }
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

struct Ctx {
    ring: Ring,
    core: Arc<Core>,
    me: Weak<TcpEngine>,
    limits: Limits,
    next_op: u64,
    dirty: Vec<u64>,
    closing: Vec<u64>,
    listeners: Vec<Listener>,
    wake_armed: bool,
    last_tick: Instant,
    rearm_accept: bool,
    /// After an accept error: not before this time.
    accept_retry_at: Option<Instant>,
    /// When the last accept error was logged.
    accept_warned: Option<Instant>,
    /// Busy-poll mode: see [`State::poll_sockets`].
    poll: bool,
    /// Passes since start (busy-poll mode), to space out clock reads.
    passes: u32,
    /// Connections with a prepared recv to push after this pass's sends.
    to_arm: Vec<u64>,
    /// Busy-poll mode: connections waiting for bytes into their staging buffer.
    pollers: Vec<u64>,
    /// Scratch for `poll_sockets`: poll(2) entries and their readiness.
    pollfds: Vec<libc::pollfd>,
    ready: Vec<bool>,
}

struct State {
    ctx: Ctx,
    conns: IdMap<Conn>,
    cqes: Vec<Cqe>,
}

impl State {
    fn arm_listeners(&mut self) {
        for (i, l) in self.ctx.listeners.iter_mut().enumerate() {
            if !l.armed
                && self
                    .ctx
                    .ring
                    .accept(l.sock.as_raw_fd(), tag(i as u64, K_ACCEPT))
                    .is_ok()
            {
                l.armed = true;
            }
        }
    }

    fn adopt(&mut self, shared: Arc<ConnShared>, sock: TcpStream) {
        if shared.is_closed() {
            return;
        }
        let peer = sock
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let id = shared.id;
        let mut conn = Conn::new(id, sock, Some(shared), peer);
        self.ctx.pump_rx(&mut conn);
        self.conns.insert(id, conn);
    }

    fn admit(&mut self, shared: &Arc<ConnShared>, req: OpReq) {
        match self.conns.get_mut(&shared.id) {
            Some(conn) if conn.closing.is_none() => self.ctx.admit(conn, req),
            _ => shared.finish(&req.done, Err(Error::lost(shared.close_reason()))),
        }
    }

    /// Push the receives prepared during this pass.
    fn arm_pending(&mut self) {
        let mut ids = std::mem::take(&mut self.ctx.to_arm);
        for id in ids.drain(..) {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            let Some(r) = conn.recv_req.take() else {
                continue;
            };
            if conn.closing.is_some() {
                conn.recv_busy = false;
                if let Buf::Heap(v) = r.buf
                    && conn.recv_into == RecvInto::Stage
                {
                    conn.stage = Some(v);
                }
                continue;
            }
            let fd = conn.fd();
            if let Err(e) = self
                .ctx
                .ring
                .recv(fd, r.buf, r.start, r.len, r.flags, tag(id, K_RECV))
            {
                conn.recv_busy = false;
                self.ctx
                    .fail_conn(conn, format!("cannot queue recv: {e}"), false);
            }
        }
        if self.ctx.to_arm.is_empty() {
            self.ctx.to_arm = ids;
        }
    }

    /// Busy-poll mode: read every waiting connection with a non-blocking `recv`.
    ///
    /// Measured on this project's reference machine (Linux 6.18, a 2-vCPU VM), a
    /// `recv(MSG_DONTWAIT)` that finds nothing costs about 0.5 µs, the same receive
    /// through `io_uring_enter` about 1.2 µs; a spinning poller pays that cost on every
    /// pass, and half of it on average before it notices data. So in busy-poll mode
    /// small receives and single-range sends use direct non-blocking system calls, while
    /// bulk payloads (received straight into regions with `MSG_WAITALL`), gathered sends
    /// and every wait in blocking mode stay on io_uring.
    fn poll_sockets(&mut self) -> usize {
        if self.ctx.pollers.is_empty() {
            return 0;
        }
        let mut work = 0;
        let mut ids = std::mem::take(&mut self.ctx.pollers);
        // Many idle connections: one poll(2) (lockless on TCP sockets) says which have
        // bytes, instead of one recv per connection per pass.
        let mut ready = std::mem::take(&mut self.ctx.ready);
        ready.clear();
        if ids.len() > POLL_BATCH_MIN {
            let mut fds = std::mem::take(&mut self.ctx.pollfds);
            fds.clear();
            for id in &ids {
                let fd = self.conns.get(id).map_or(-1, |c| c.sock.as_raw_fd());
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if sys::poll_now(&mut fds).is_ok() {
                ready.extend(fds.iter().map(|p| p.revents != 0));
            }
            self.ctx.pollfds = fds;
        }
        let mut i = 0;
        ids.retain(|id| {
            let idx = i;
            i += 1;
            let Some(conn) = self.conns.get_mut(id) else {
                return false;
            };
            if !conn.polling || conn.closing.is_some() {
                conn.polling = false;
                return false;
            }
            if ready.get(idx) == Some(&false) {
                return true;
            }
            let Some(stage) = conn.stage.as_mut() else {
                return true;
            };
            match sys::recv_nonblocking(conn.sock.as_raw_fd(), &mut stage[conn.hi..]) {
                Ok(0) => {
                    conn.polling = false;
                    let why = "the peer closed the connection".to_string();
                    self.ctx.fail_conn(conn, why, false);
                    false
                }
                Ok(n) => {
                    conn.polling = false;
                    conn.hi += n;
                    work += 1;
                    self.ctx.pump_rx(conn);
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
                Err(e) => {
                    conn.polling = false;
                    self.ctx.fail_conn(conn, format!("recv failed: {e}"), false);
                    false
                }
            }
        });
        // Connections that started polling during this pass were added meanwhile.
        ids.append(&mut self.ctx.pollers);
        self.ctx.pollers = ids;
        self.ctx.ready = ready;
        work
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.ctx.dirty);
        for id in &dirty {
            if let Some(conn) = self.conns.get_mut(id) {
                conn.in_dirty = false;
                self.ctx.flush_tx(conn);
            }
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.ctx.dirty.is_empty() {
            self.ctx.dirty = dirty;
        }
    }

    /// Handle every completion available; returns how many.
    fn reap(&mut self) -> usize {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        self.ctx.ring.reap(&mut cqes);
        let got = cqes.len();
        let mut n = 0;
        for c in cqes.drain(..) {
            // An empty busy-poll receive is not work.
            if c.res != -libc::EAGAIN {
                n += 1;
            }
            self.on_cqe(c);
        }
        self.cqes = cqes;
        if got > 0 {
            self.remove_closed();
        }
        n
    }

    fn on_cqe(&mut self, c: Cqe) {
        let id = c.tag >> 3;
        match c.tag & 7 {
            K_ACCEPT => self.on_accept(id as usize, c.res),
            K_WAKE => self.ctx.wake_armed = false,
            K_RECV => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    self.ctx.on_recv(conn, c.res, c.held);
                }
            }
            K_SEND => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    if let (Some(copied), Some(s)) = (c.zc_copied, &conn.shared) {
                        s.count(C::zero_copy_sends, 1);
                        if copied {
                            s.count(C::zero_copy_sends_copied, 1);
                        }
                    }
                    if c.zc_more {
                        self.ctx.on_zc_sent(conn, c.res);
                    } else if c.zc_notif {
                        self.ctx.on_zc_notif(conn, c.res, c.held);
                    } else {
                        self.ctx.on_send(conn, c.res, c.held);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_accept(&mut self, idx: usize, res: i32) {
        if let Some(l) = self.ctx.listeners.get_mut(idx) {
            l.armed = false;
        }
        if res == -libc::ECANCELED {
            // The thread that armed it exited (caller-driven endpoints); shutdown takes
            // the listeners down with EINVAL instead. Arm it again from this thread.
            self.ctx.rearm_accept = true;
            return;
        }
        let Some(fd) = sys::adopt_accepted(res) else {
            let err = std::io::Error::from_raw_os_error(-res);
            if res != -libc::EINVAL {
                // Out of descriptors or memory: back off, and say so at most every 5 s.
                let now = Instant::now();
                if self
                    .ctx
                    .accept_warned
                    .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
                {
                    tracing::warn!("accept failed: {err}; retrying every 100 ms");
                    self.ctx.accept_warned = Some(now);
                }
                self.ctx.accept_retry_at = Some(now + Duration::from_millis(100));
                self.ctx.rearm_accept = true;
            }
            return;
        };
        self.ctx.rearm_accept = true;
        let sock = TcpStream::from(fd);
        let peer = sock
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let core = &self.ctx.core;
        if core.open_conns.load(Ordering::Relaxed) + self.handshaking()
            >= core.config.max_connections
        {
            tracing::warn!(%peer, "refusing connection: at the limit of {} connections", core.config.max_connections);
            core.counters.add(C::errors, 1);
            return;
        }
        let (mut from_peer, mut handshaking) = (0, 0);
        for c in self.conns.values() {
            if c.accepted && c.closing.is_none() && c.peer.ip() == peer.ip() {
                from_peer += 1;
                handshaking += usize::from(c.shared.is_none());
            }
        }
        if from_peer >= core.config.max_connections_per_peer {
            tracing::debug!(%peer, "refusing connection: {from_peer} connections from this address already");
            core.counters.add(C::peer_connections_refused, 1);
            return;
        }
        if handshaking >= core.config.max_handshakes_per_peer {
            tracing::debug!(%peer, "refusing connection: {handshaking} handshakes from this address already");
            core.counters.add(C::handshakes_refused, 1);
            return;
        }
        configure_socket(&sock, core);
        let id = core.next_conn_id();
        let mut conn = Conn::new(id, sock, None, peer);
        conn.accepted = true;
        conn.hs_deadline = Some(Instant::now() + core.config.connect_timeout);
        self.ctx.pump_rx(&mut conn);
        self.conns.insert(id, conn);
        self.arm_listeners();
    }

    fn handshaking(&self) -> usize {
        self.conns.values().filter(|c| c.shared.is_none()).count()
    }

    /// Drop connections that are closed and have nothing in flight.
    fn remove_closed(&mut self) {
        if self.ctx.closing.is_empty() {
            return;
        }
        let conns = &mut self.conns;
        self.ctx.closing.retain(|id| match conns.get_mut(id) {
            Some(c) if c.recv_busy || c.tx_busy => true,
            Some(c) => {
                c.finish_dying();
                conns.remove(id);
                false
            }
            None => false,
        });
    }

    fn maybe_tick(&mut self) {
        // A busy-polling engine makes hundreds of thousands of passes a second: look at
        // the clock on every 16th only (timeouts have millisecond granularity anyway).
        if self.ctx.poll {
            self.ctx.passes = self.ctx.passes.wrapping_add(1);
            if !self.ctx.passes.is_multiple_of(16) {
                return;
            }
        }
        let now = Instant::now();
        if now.duration_since(self.ctx.last_tick) < TICK {
            return;
        }
        self.ctx.last_tick = now;
        if self.ctx.rearm_accept && self.ctx.accept_retry_at.is_none_or(|t| now >= t) {
            self.ctx.rearm_accept = false;
            self.ctx.accept_retry_at = None;
            self.arm_listeners();
        }
        let ctx = &mut self.ctx;
        for conn in self.conns.values_mut() {
            if conn.closing.is_some() {
                continue;
            }
            if let Some(d) = conn.hs_deadline
                && conn.shared.is_none()
                && now >= d
                && conn.close_after_flush.is_none()
            {
                ctx.fail_conn(conn, "handshake timed out".into(), true);
                continue;
            }
            if conn.close_by.is_some_and(|d| now >= d)
                && let Some(why) = conn.close_after_flush.take()
            {
                ctx.fail_conn(conn, why, true);
                continue;
            }
            ctx.expire(conn, now);
            if conn.rx_stalled && ctx.has_room(conn) {
                conn.rx_stalled = false;
                ctx.pump_rx(conn);
            }
        }
        self.remove_closed();
    }

    fn fail_all(&mut self, reason: &str) {
        for conn in self.conns.values_mut() {
            self.ctx.fail_conn(conn, reason.to_string(), false);
        }
    }
}

impl Ctx {
    fn has_room(&self, conn: &Conn) -> bool {
        conn.shared
            .as_ref()
            .is_none_or(|s| s.inbox.has_room() && s.notes.has_room())
    }

    fn mark_dirty(&mut self, conn: &mut Conn) {
        if !conn.in_dirty {
            conn.in_dirty = true;
            self.dirty.push(conn.id);
        }
    }

    fn queue(&mut self, conn: &mut Conn, h: Header, payload: Option<Buf>) {
        if conn.closing.is_some() {
            return;
        }
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut hdr);
        conn.txq.push_back(Tx {
            hdr,
            hdr_len: n as u8,
            payload,
        });
        self.mark_dirty(conn);
    }

    fn queue_error(&mut self, conn: &mut Conn, op_id: u64, code: ErrorCode, why: &str) {
        let mut text = why.as_bytes().to_vec();
        text.truncate(MAX_ERROR_PAYLOAD as usize);
        let h = Header {
            op_id,
            payload_len: text.len() as u32,
            body: Body::Error { code },
        };
        let payload = (!text.is_empty()).then_some(Buf::Heap(text));
        self.queue(conn, h, payload);
    }

    // ---- initiator side ----

    fn admit(&mut self, conn: &mut Conn, req: OpReq) {
        if conn.fence.is_some() || !conn.held.is_empty() {
            conn.held.push_back(req);
            return;
        }
        if matches!(req.kind, OpKind::Fence) {
            if conn.pending.is_empty() {
                if let Some(s) = &conn.shared {
                    s.finish(&req.done, Ok(0));
                }
            } else {
                conn.fence = Some(req);
            }
            return;
        }
        self.issue(conn, req);
    }

    fn issue(&mut self, conn: &mut Conn, req: OpReq) {
        let op_id = self.next_op;
        self.next_op += 1;
        let OpReq {
            kind,
            done,
            deadline,
            key_len,
        } = req;
        let deadline =
            deadline.unwrap_or_else(|| crate::sys::deadline_now() + self.core.config.op_timeout);
        let (h, payload, pk, remote_off, len) = match kind {
            OpKind::Write {
                local,
                target,
                notify,
            } => {
                let len = local.len() as u64;
                (
                    Header {
                        op_id,
                        payload_len: len as u32,
                        body: Body::Write {
                            target,
                            op_len: len,
                            op_off: 0,
                            notify,
                        },
                    },
                    (len > 0).then_some(Buf::Region(local)),
                    PKind::Write,
                    target.offset,
                    len,
                )
            }
            OpKind::Read { local, target } => {
                let len = local.len() as u64;
                (
                    Header {
                        op_id,
                        payload_len: 0,
                        body: Body::Read { target, len },
                    },
                    None,
                    PKind::Read(local),
                    target.offset,
                    len,
                )
            }
            OpKind::Cas {
                target,
                expected,
                new,
            } => (
                Header {
                    op_id,
                    payload_len: 0,
                    body: Body::Cas {
                        target,
                        expected,
                        new,
                    },
                },
                None,
                PKind::Atomic,
                target.offset,
                8,
            ),
            OpKind::Faa { target, add } => (
                Header {
                    op_id,
                    payload_len: 0,
                    body: Body::Faa { target, add },
                },
                None,
                PKind::Atomic,
                target.offset,
                8,
            ),
            OpKind::Send { data } => {
                let len = data.len() as u64;
                (
                    Header {
                        op_id,
                        payload_len: len as u32,
                        body: Body::Send {
                            msg_len: len,
                            msg_off: 0,
                        },
                    },
                    (len > 0).then_some(Buf::Heap(data)),
                    PKind::Send,
                    0,
                    len,
                )
            }
            OpKind::Fence => unreachable!("fences are handled in admit"),
        };
        self.queue(conn, h, payload);
        conn.pending.insert(
            op_id,
            Pending {
                done,
                kind: pk,
                remote_off,
                len,
                key_len,
            },
        );
        conn.timeouts.push_back((deadline, op_id));
    }

    fn complete(&mut self, conn: &mut Conn, op_id: u64, r: Result<u64>) -> bool {
        let Some(p) = conn.pending.remove(&op_id) else {
            return false;
        };
        if let Some(s) = &conn.shared {
            if r.is_ok() {
                match p.kind {
                    PKind::Write => s.count(C::bytes_written, p.len),
                    PKind::Read(_) => s.count(C::bytes_read, p.len),
                    PKind::Send => {
                        s.count(C::messages_sent, 1);
                        s.count(C::message_bytes_sent, p.len);
                    }
                    PKind::Atomic => {}
                }
            }
            s.finish(&p.done, r);
        }
        self.release_fence(conn);
        true
    }

    /// Once everything before an active fence is done, complete it and issue what it held.
    fn release_fence(&mut self, conn: &mut Conn) {
        while conn.fence.is_some() && conn.pending.is_empty() {
            if let (Some(f), Some(s)) = (conn.fence.take(), &conn.shared) {
                s.finish(&f.done, Ok(0));
            }
            while let Some(r) = conn.held.pop_front() {
                if matches!(r.kind, OpKind::Fence) {
                    if conn.pending.is_empty() {
                        if let Some(s) = &conn.shared {
                            s.finish(&r.done, Ok(0));
                        }
                        continue;
                    }
                    conn.fence = Some(r);
                    break;
                }
                self.issue(conn, r);
            }
        }
    }

    fn expire(&mut self, conn: &mut Conn, now: Instant) {
        let after = self.core.config.op_timeout;
        while let Some(&(d, op_id)) = conn.timeouts.front() {
            if d > now {
                break;
            }
            conn.timeouts.pop_front();
            if let Some(p) = conn.pending.remove(&op_id) {
                tracing::debug!(
                    conn = conn.id,
                    op_id,
                    pending = conn.pending.len(),
                    tx_queued = conn.txq.len(),
                    tx_busy = conn.tx_busy,
                    recv_busy = conn.recv_busy,
                    "operation timed out"
                );
                // The operation may still be in flight (its payload queued, or its answer
                // half received into the caller's region): like an RDMA queue pair going
                // to the error state, the connection closes, and the timeout is reported
                // only once nothing can touch the operation's memory any more.
                conn.dying.push((p.done, Error::Timeout { after }));
                let why = format!(
                    "an operation timed out after {after:?}; the connection was closed so \
                     that nothing still in flight touches memory after its deadline"
                );
                self.fail_conn(conn, why, false);
                return;
            }
        }
        // Deadlines grow with submission order, so ops held behind a fence (and the
        // fence itself) can only expire after everything before them has completed or
        // expired, which releases them; nothing else needs checking here.
    }

    // ---- receive path ----

    fn arm_recv_stage(&mut self, conn: &mut Conn) {
        let Some(mut stage) = conn.stage.take() else {
            return;
        };
        if conn.lo == conn.hi {
            conn.lo = 0;
            conn.hi = 0;
        } else if conn.hi == STAGE_LEN || conn.lo + MAX_HEADER_LEN > STAGE_LEN {
            stage.copy_within(conn.lo..conn.hi, 0);
            conn.hi -= conn.lo;
            conn.lo = 0;
        }
        if self.poll {
            conn.stage = Some(stage);
            if !conn.polling {
                conn.polling = true;
                self.pollers.push(conn.id);
            }
            return;
        }
        let (start, len) = (conn.hi, STAGE_LEN - conn.hi);
        self.prepare_recv(conn, Buf::Heap(stage), start, len, 0, RecvInto::Stage);
    }

    fn arm_recv_direct(&mut self, conn: &mut Conn, buf: Buf, start: usize, len: usize) {
        self.prepare_recv(conn, buf, start, len, libc::MSG_WAITALL, RecvInto::Direct);
    }

    /// Prepare a recv; it is pushed by [`State::arm_pending`] after the pass's sends, so
    /// that answers leave before the kernel spends time arming the next receive.
    fn prepare_recv(
        &mut self,
        conn: &mut Conn,
        buf: Buf,
        start: usize,
        len: usize,
        flags: i32,
        into: RecvInto,
    ) {
        conn.recv_req = Some(RecvReq {
            buf,
            start,
            len,
            flags,
        });
        conn.recv_busy = true;
        conn.recv_into = into;
        self.to_arm.push(conn.id);
    }

    fn on_recv(&mut self, conn: &mut Conn, res: i32, held: Held) {
        conn.recv_busy = false;
        let n = match res {
            r if r > 0 => r as usize,
            0 => {
                let why = if conn.pending.is_empty() && matches!(conn.rx, Rx::Header) {
                    "the peer closed the connection".to_string()
                } else {
                    "the peer closed the connection with operations in flight".to_string()
                };
                if let Held::Buf(Buf::Heap(v)) = held
                    && conn.recv_into == RecvInto::Stage
                {
                    conn.stage = Some(v);
                }
                self.fail_conn(conn, why, false);
                return;
            }
            r if r == -libc::ECANCELED && conn.closing.is_none() => {
                // Canceled because the thread that armed it exited (a caller-driven
                // endpoint driven from short-lived threads): put the buffer back and
                // arm again from this thread.
                match (conn.recv_into, held) {
                    (RecvInto::Stage, Held::Buf(Buf::Heap(v))) => conn.stage = Some(v),
                    (RecvInto::Direct, Held::Buf(Buf::Heap(v))) => {
                        if let Rx::Payload {
                            dst: Dst::Heap(slot),
                            ..
                        } = &mut conn.rx
                        {
                            *slot = Some(v);
                        }
                    }
                    _ => {}
                }
                self.pump_rx(conn);
                return;
            }
            r => {
                let e = std::io::Error::from_raw_os_error(-r);
                self.fail_conn(conn, format!("recv failed: {e}"), false);
                return;
            }
        };
        match (conn.recv_into, held) {
            (RecvInto::Stage, Held::Buf(Buf::Heap(v))) => {
                conn.stage = Some(v);
                conn.hi += n;
            }
            (RecvInto::Direct, Held::Buf(b)) => {
                if let Rx::Payload { dst, got, .. } = &mut conn.rx {
                    *got += n;
                    if let (Dst::Heap(slot), Buf::Heap(v)) = (dst, b) {
                        *slot = Some(v);
                    }
                }
            }
            _ => {
                self.fail_conn(conn, "internal: unexpected recv completion".into(), false);
                return;
            }
        }
        if conn.closing.is_none() {
            self.pump_rx(conn);
        }
    }

    /// Decode and execute everything the staging buffer holds, then arm the next recv.
    fn pump_rx(&mut self, conn: &mut Conn) {
        loop {
            if conn.closing.is_some()
                || conn.recv_busy
                || conn.rx_stalled
                || conn.rx_tx_blocked
                || conn.rx_closed
                || conn.polling
            {
                return;
            }
            match &mut conn.rx {
                Rx::Header => {
                    if conn.txq.len() >= TXQ_MAX {
                        conn.rx_tx_blocked = true;
                        return;
                    }
                    let Some(stage) = conn.stage.as_ref() else {
                        return;
                    };
                    let r = Header::decode(&stage[conn.lo..conn.hi], &self.limits);
                    match r {
                        Ok((h, n)) => {
                            if self.needs_room(&h) && !self.has_room(conn) {
                                conn.rx_stalled = true;
                                if let Some(s) = &conn.shared {
                                    s.count(C::receive_stalls, 1);
                                }
                                return;
                            }
                            conn.lo += n;
                            self.on_header(conn, h);
                        }
                        Err(e) if e.is_incomplete() => {
                            self.arm_recv_stage(conn);
                            return;
                        }
                        Err(e) => {
                            self.protocol_error(conn, format!("malformed message: {e}"));
                            return;
                        }
                    }
                }
                Rx::Payload { dst, len, got, .. } => {
                    let avail = conn.hi - conn.lo;
                    let take = avail.min(*len - *got);
                    if take > 0 {
                        if let Some(s) = &conn.shared
                            && !matches!(dst, Dst::Discard)
                        {
                            s.count(C::bytes_copied_in_user_space, take as u64);
                        }
                        if let Some(stage) = conn.stage.as_ref() {
                            let src = &stage[conn.lo..conn.lo + take];
                            match dst {
                                Dst::Region(s) => {
                                    let _ = s.copy_in(*got, src);
                                }
                                Dst::Heap(Some(v)) => v[*got..*got + take].copy_from_slice(src),
                                Dst::Heap(None) | Dst::Discard => {}
                            }
                        }
                        conn.lo += take;
                        *got += take;
                    }
                    if *got == *len {
                        let Rx::Payload { dst, then, .. } =
                            std::mem::replace(&mut conn.rx, Rx::Header)
                        else {
                            unreachable!()
                        };
                        self.on_payload(conn, dst, then);
                        continue;
                    }
                    let remaining = *len - *got;
                    let start = *got;
                    if remaining >= DIRECT_MIN {
                        match dst {
                            Dst::Region(s) => {
                                let buf = Buf::Region(s.clone());
                                let end = start + remaining;
                                self.arm_recv_direct(conn, buf, start, end - start);
                                return;
                            }
                            Dst::Heap(v) => {
                                if let Some(v) = v.take() {
                                    self.arm_recv_direct(conn, Buf::Heap(v), start, remaining);
                                    return;
                                }
                            }
                            Dst::Discard => {}
                        }
                    }
                    self.arm_recv_stage(conn);
                    return;
                }
            }
        }
    }

    /// Whether handling this header needs room in an application queue.
    fn needs_room(&self, h: &Header) -> bool {
        matches!(
            h.body,
            Body::Send { .. }
                | Body::Write {
                    notify: Some(_),
                    ..
                }
        )
    }

    fn expect_payload(conn: &mut Conn, h: &Header, dst: Dst, then: Then) {
        conn.rx = Rx::Payload {
            dst,
            len: h.payload_len as usize,
            got: 0,
            then,
        };
    }

    /// Stop reading `conn`, send what is queued (an error for the peer), then close —
    /// at the latest after a second, even if the peer does not read.
    fn close_soon(&mut self, conn: &mut Conn, why: String) {
        conn.rx_closed = true;
        conn.close_after_flush = Some(why);
        conn.close_by = Some(Instant::now() + Duration::from_secs(1));
    }

    fn protocol_error(&mut self, conn: &mut Conn, why: String) {
        tracing::warn!(peer = %conn.peer, conn = conn.id, "closing connection: {why}");
        if let Some(s) = &conn.shared {
            s.count(C::protocol_errors, 1);
            s.count(C::errors, 1);
        } else {
            self.core.counters.add(C::protocol_errors, 1);
            self.core.counters.add(C::errors, 1);
        }
        self.queue_error(conn, 0, ErrorCode::Protocol, &why);
        self.close_soon(conn, why.clone());
        self.flush_tx(conn);
        if !conn.tx_busy && conn.txq.is_empty() {
            self.fail_conn(conn, why, true);
        }
    }

    fn on_header(&mut self, conn: &mut Conn, h: Header) {
        let Some(shared) = conn.shared.clone() else {
            return self.on_handshake(conn, h);
        };
        let op_id = h.op_id;
        match h.body {
            Body::Hello { .. } | Body::HelloAck { .. } | Body::Auth => {
                self.protocol_error(conn, "HELLO or AUTH on an established connection".into())
            }
            Body::Write {
                target,
                op_len,
                op_off,
                notify,
            } => {
                let plen = u64::from(h.payload_len);
                let last = op_off + plen == op_len;
                if op_len != plen || op_off != 0 {
                    return self
                        .protocol_error(conn, "segmented WRITE on a stream connection".into());
                }
                match self
                    .core
                    .regions
                    .authorize(&target, Rights::WRITE, plen, false)
                {
                    Ok(slice) => {
                        let notify = notify.map(|imm| Notification {
                            region: target.region,
                            offset: target.offset,
                            len: op_len,
                            imm,
                        });
                        Self::expect_payload(
                            conn,
                            &h,
                            Dst::Region(slice),
                            Then::Placed {
                                op_id,
                                last,
                                notify,
                                bytes: plen,
                            },
                        );
                    }
                    Err(refusal) => {
                        shared.count(C::remote_ops_refused, 1);
                        tracing::debug!(conn = conn.id, "refused write: {}", refusal.why);
                        self.queue_error(conn, op_id, refusal.code, &refusal.why);
                        Self::expect_payload(conn, &h, Dst::Discard, Then::Dropped);
                    }
                }
            }
            Body::Read { target, len } => {
                if len > u64::from(self.limits.max_payload) {
                    shared.count(C::remote_ops_refused, 1);
                    let why = format!(
                        "read of {len} bytes exceeds this endpoint's limit of {}",
                        self.limits.max_payload
                    );
                    return self.queue_error(conn, op_id, ErrorCode::TooLarge, &why);
                }
                match self
                    .core
                    .regions
                    .authorize(&target, Rights::READ, len, false)
                {
                    Ok(slice) => {
                        shared.count(C::remote_ops_served, 1);
                        shared.count(C::bytes_served, len);
                        let resp = Header {
                            op_id,
                            payload_len: len as u32,
                            body: Body::ReadResp {
                                op_len: len,
                                op_off: 0,
                            },
                        };
                        self.queue(conn, resp, (len > 0).then_some(Buf::Region(slice)));
                    }
                    Err(refusal) => {
                        shared.count(C::remote_ops_refused, 1);
                        self.queue_error(conn, op_id, refusal.code, &refusal.why);
                    }
                }
            }
            Body::ReadResp { op_len, op_off } => {
                let plen = u64::from(h.payload_len);
                let dst = match conn.pending.get(&op_id) {
                    Some(Pending {
                        kind: PKind::Read(local),
                        len,
                        ..
                    }) if *len == op_len => local.sub(op_off, plen),
                    Some(_) => {
                        return self.protocol_error(
                            conn,
                            format!("READ_RESP for op {op_id} does not match the read"),
                        );
                    }
                    None => None,
                };
                match dst {
                    Some(s) => Self::expect_payload(
                        conn,
                        &h,
                        Dst::Region(s),
                        Then::ReadData {
                            op_id,
                            last: op_off + plen == op_len,
                        },
                    ),
                    None => {
                        // A late answer to a read that already timed out: discard.
                        Self::expect_payload(conn, &h, Dst::Discard, Then::Dropped)
                    }
                }
            }
            Body::Cas {
                target,
                expected,
                new,
            } => self.atomic(conn, &shared, op_id, &target, |a| cas(a, expected, new)),
            Body::Faa { target, add } => {
                self.atomic(conn, &shared, op_id, &target, |a| faa(a, add))
            }
            Body::AtomicResp { old } => match conn.pending.get(&op_id).map(|p| &p.kind) {
                Some(PKind::Atomic) => {
                    self.complete(conn, op_id, Ok(old));
                }
                Some(_) => self.protocol_error(
                    conn,
                    format!("ATOMIC_RESP for op {op_id}, which is not an atomic"),
                ),
                None => shared.count(C::drops, 1),
            },
            Body::Send { msg_len, msg_off } => {
                let plen = h.payload_len as usize;
                if msg_off != 0 || msg_len != plen as u64 {
                    return self
                        .protocol_error(conn, "segmented SEND on a stream connection".into());
                }
                if plen > self.core.config.max_message_size {
                    let why = format!(
                        "message of {plen} bytes exceeds the limit of {}",
                        self.core.config.max_message_size
                    );
                    self.queue_error(conn, op_id, ErrorCode::TooLarge, &why);
                    return Self::expect_payload(conn, &h, Dst::Discard, Then::Dropped);
                }
                Self::expect_payload(
                    conn,
                    &h,
                    Dst::Heap(Some(vec![0u8; plen])),
                    Then::Message { op_id },
                );
            }
            Body::SendSeq { .. } => {
                // Numbered messages are for datagram connections that agreed on them
                // (FEATURE_MSG_SEQ); a stream keeps messages in order by itself.
                self.protocol_error(conn, "SEND_SEQ on a stream connection".into())
            }
            Body::Ack => match conn.pending.get(&op_id).map(|p| &p.kind) {
                Some(PKind::Write) | Some(PKind::Send) => {
                    self.complete(conn, op_id, Ok(0));
                }
                Some(_) => {
                    self.protocol_error(conn, format!("ACK for op {op_id}, which expects data"))
                }
                None => shared.count(C::drops, 1),
            },
            Body::Error { code } => {
                let then = Then::ErrorText { op_id, code };
                if h.payload_len == 0 {
                    self.on_payload(conn, Dst::Heap(Some(Vec::new())), then);
                } else {
                    let v = vec![0u8; h.payload_len as usize];
                    Self::expect_payload(conn, &h, Dst::Heap(Some(v)), then);
                }
            }
            Body::Ping => {
                let pong = Header {
                    op_id,
                    payload_len: 0,
                    body: Body::Pong,
                };
                self.queue(conn, pong, None);
            }
            Body::Pong => {}
            Body::Goodbye { .. } => {
                self.fail_conn(conn, "the peer closed the connection".into(), false)
            }
        }
    }

    fn atomic(
        &mut self,
        conn: &mut Conn,
        shared: &ConnShared,
        op_id: u64,
        target: &Target,
        f: impl FnOnce(&std::sync::atomic::AtomicU64) -> u64,
    ) {
        match self.core.regions.authorize(target, Rights::ATOMIC, 8, true) {
            Ok(slice) => match slice.mem().atomic_u64(slice.offset() as u64) {
                Ok(a) => {
                    let old = f(a);
                    shared.count(C::remote_ops_served, 1);
                    let h = Header {
                        op_id,
                        payload_len: 0,
                        body: Body::AtomicResp { old },
                    };
                    self.queue(conn, h, None);
                }
                Err(e) => {
                    shared.count(C::remote_ops_refused, 1);
                    self.queue_error(conn, op_id, ErrorCode::Misaligned, &e.to_string());
                }
            },
            Err(refusal) => {
                shared.count(C::remote_ops_refused, 1);
                self.queue_error(conn, op_id, refusal.code, &refusal.why);
            }
        }
    }

    fn on_handshake(&mut self, conn: &mut Conn, h: Header) {
        if matches!(conn.auth, SrvAuth::Proof(..)) {
            if h.body != Body::Auth || h.payload_len as usize != auth::PROOF_LEN {
                let why = format!(
                    "expected the initiator's AUTH proof, got {:?}",
                    h.body.opcode()
                );
                return self.refuse_auth(conn, why);
            }
            let buf = vec![0u8; auth::PROOF_LEN];
            return Self::expect_payload(conn, &h, Dst::Heap(Some(buf)), Then::AuthProof);
        }
        let Body::Hello {
            min_version,
            max_version,
            endpoint,
            max_payload,
            features,
        } = h.body
        else {
            return self.protocol_error(conn, format!("expected HELLO, got {:?}", h.body.opcode()));
        };
        let version = max_version.min(wire::MAX_VERSION);
        if version < min_version.max(wire::MIN_VERSION) {
            let why = format!(
                "no common wire version: the peer speaks {min_version}..={max_version}, \
                 this endpoint {}..={}",
                wire::MIN_VERSION,
                wire::MAX_VERSION
            );
            tracing::warn!(peer = %conn.peer, "{why}");
            self.queue_error(conn, 0, ErrorCode::UnsupportedVersion, &why);
            self.close_soon(conn, why);
            return;
        }
        debug_assert!(h.payload_len <= MAX_HELLO_PAYLOAD);
        let hello = PeerHello {
            endpoint,
            max_payload,
            version,
        };
        let asks = features & wire::FEATURE_AUTH != 0;
        if self.core.config.secret.is_some() {
            if !asks || h.payload_len as usize != auth::NONCE_LEN {
                return self.refuse_auth(
                    conn,
                    "this endpoint accepts only peers holding the cluster secret: configure \
                     the same secret on the connecting side (EndpointConfig::secret)"
                        .into(),
                );
            }
            conn.auth = SrvAuth::Nonce(hello);
            let buf = vec![0u8; auth::NONCE_LEN];
            return Self::expect_payload(conn, &h, Dst::Heap(Some(buf)), Then::AuthNonce);
        }
        // No secret here: accept. An initiator that asked to authenticate gets a
        // HELLO_ACK without the feature bit and refuses the connection itself.
        if self.establish(conn, hello) {
            self.queue_hello_ack(conn, version, 0, None);
        }
        if h.payload_len > 0 {
            Self::expect_payload(conn, &h, Dst::Discard, Then::HelloPayload);
        }
    }

    fn queue_hello_ack(
        &mut self,
        conn: &mut Conn,
        version: u8,
        features: u32,
        payload: Option<Vec<u8>>,
    ) {
        let ack = Header {
            op_id: 0,
            payload_len: payload.as_ref().map_or(0, |p| p.len() as u32),
            body: Body::HelloAck {
                version,
                endpoint: self.core.id,
                max_payload: self.limits.max_payload,
                features,
            },
        };
        self.queue(conn, ack, payload.map(Buf::Heap));
    }

    /// Hand the connection to the application (it is authenticated, or nothing needed
    /// proving); false if it was refused for want of room.
    fn establish(&mut self, conn: &mut Conn, p: PeerHello) -> bool {
        let Some(me) = self.me.upgrade() else {
            return false;
        };
        let engine: Arc<dyn Engine> = me;
        let local = conn
            .sock
            .local_addr()
            .map(Address::Tcp)
            .unwrap_or_else(|_| Address::Tcp(conn.peer));
        let shared = ConnShared::new(
            conn.id,
            self.core.clone(),
            engine,
            p.endpoint,
            local,
            Address::Tcp(conn.peer),
            p.max_payload,
        );
        conn.hs_version = p.version;
        conn.shared = Some(shared.clone());
        conn.hs_deadline = None;
        if let Err(shared) = self.core.accepted.push(shared) {
            let why = "too many connections waiting to be accepted".to_string();
            conn.shared = None;
            shared.mark_closed(&why);
            tracing::warn!(peer = %conn.peer, "refusing connection: {why}");
            self.queue_error(conn, 0, ErrorCode::Busy, &why);
            self.close_soon(conn, why);
            return false;
        }
        tracing::debug!(peer = %conn.peer, conn = conn.id, "accepted");
        true
    }

    /// Refuse a peer that failed to authenticate: an ERROR naming why, then close. It
    /// never reached a region.
    fn refuse_auth(&mut self, conn: &mut Conn, why: String) {
        tracing::warn!(peer = %conn.peer, "refusing connection: {why}");
        self.core.counters.add(C::auth_failures, 1);
        self.core.counters.add(C::errors, 1);
        conn.auth = SrvAuth::Open;
        self.queue_error(conn, 0, ErrorCode::AuthFailed, &why);
        self.close_soon(conn, why);
    }

    /// The initiator's nonce: answer with ours and our proof.
    fn on_auth_nonce(&mut self, conn: &mut Conn, dst: Dst) {
        let (SrvAuth::Nonce(hello), Dst::Heap(Some(theirs)), Some(secret)) =
            (&conn.auth, dst, self.core.config.secret.clone())
        else {
            return self.refuse_auth(conn, "authentication out of order".into());
        };
        let hello = *hello;
        let (t, payload) =
            match auth::answer_initiator(&secret, &theirs, hello.endpoint, self.core.id) {
                Ok(a) => a,
                Err(e) => return self.refuse_auth(conn, e.to_string()),
            };
        self.queue_hello_ack(conn, hello.version, wire::FEATURE_AUTH, Some(payload));
        conn.auth = SrvAuth::Proof(hello, t);
    }

    /// The initiator's proof: establish the connection if it holds the secret.
    fn on_auth_proof(&mut self, conn: &mut Conn, dst: Dst) {
        let (SrvAuth::Proof(hello, t), Dst::Heap(Some(proof)), Some(secret)) =
            (&conn.auth, dst, self.core.config.secret.clone())
        else {
            return self.refuse_auth(conn, "authentication out of order".into());
        };
        let (hello, t) = (*hello, *t);
        if !secret.verify_initiator(&t, &proof) {
            return self.refuse_auth(
                conn,
                "the peer's proof does not match this endpoint's cluster secret: the two \
                 ends have different secrets"
                    .into(),
            );
        }
        conn.auth = SrvAuth::Open;
        self.establish(conn, hello);
    }

    fn on_payload(&mut self, conn: &mut Conn, dst: Dst, then: Then) {
        match then {
            Then::AuthNonce => return self.on_auth_nonce(conn, dst),
            Then::AuthProof => return self.on_auth_proof(conn, dst),
            _ => {}
        }
        let Some(shared) = conn.shared.clone() else {
            return;
        };
        match then {
            Then::Placed {
                op_id,
                last,
                notify,
                bytes,
            } => {
                shared.count(C::bytes_placed, bytes);
                if last {
                    shared.count(C::remote_ops_served, 1);
                    if let Some(n) = notify {
                        // Room was checked before the header was consumed.
                        let _ = shared.notes.push(n);
                        shared.count(C::notifications, 1);
                    }
                    let ack = Header {
                        op_id,
                        payload_len: 0,
                        body: Body::Ack,
                    };
                    self.queue(conn, ack, None);
                }
            }
            Then::ReadData { op_id, last } => {
                if last {
                    self.complete(conn, op_id, Ok(0));
                }
            }
            Then::Message { op_id } => {
                let Dst::Heap(Some(v)) = dst else {
                    return;
                };
                shared.count(C::messages_received, 1);
                shared.count(C::message_bytes_received, v.len() as u64);
                let n = v.len();
                shared.inbox.push_admitted(v, n);
                let ack = Header {
                    op_id,
                    payload_len: 0,
                    body: Body::Ack,
                };
                self.queue(conn, ack, None);
            }
            Then::ErrorText { op_id, code } => {
                let text = match dst {
                    Dst::Heap(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
                    _ => String::new(),
                };
                if op_id == 0 {
                    let why = format!("the peer closed the connection: {code:?}: {text}");
                    return self.fail_conn(conn, why, true);
                }
                let err = match conn.pending.get(&op_id) {
                    Some(p) => remote_error(code, text, p.remote_off, p.len, p.key_len),
                    None => {
                        shared.count(C::drops, 1);
                        return;
                    }
                };
                self.complete(conn, op_id, Err(err));
            }
            Then::Dropped => shared.count(C::drops, 1),
            Then::HelloPayload | Then::AuthNonce | Then::AuthProof => {}
        }
    }

    // ---- send path ----

    fn flush_tx(&mut self, conn: &mut Conn) {
        if conn.tx_busy || conn.txq.is_empty() || conn.closing.is_some() {
            return;
        }
        let mut g = conn.spare.take().unwrap_or_default();
        g.bufs.clear();
        g.segs.clear();
        let mut arena = std::mem::take(&mut conn.arena);
        arena.clear();
        // Headers go into the arena (buffer 0); payloads follow as their own buffers.
        g.bufs.push(Buf::Heap(Vec::new()));
        let mut n = 0;
        while n < MAX_BATCH {
            let Some(tx) = conn.txq.pop_front() else {
                break;
            };
            n += 1;
            let start = arena.len();
            arena.extend_from_slice(&tx.hdr[..tx.hdr_len as usize]);
            // Small payloads are copied next to their header, so that a batch of small
            // messages is one contiguous range (one plain send); large ones go by pointer.
            let inline = match tx.payload {
                Some(Buf::Heap(v)) if v.len() <= INLINE_MAX => {
                    arena.extend_from_slice(&v);
                    None
                }
                Some(Buf::Region(r)) if r.len() <= INLINE_MAX => {
                    let at = arena.len();
                    arena.resize(at + r.len(), 0);
                    if r.mem().copy_out(r.offset(), &mut arena[at..]).is_err() {
                        arena.truncate(at);
                    }
                    if let Some(s) = &conn.shared {
                        s.count(C::bytes_copied_in_user_space, r.len() as u64);
                    }
                    None
                }
                other => other,
            };
            let len = arena.len() - start;
            match g.segs.last_mut() {
                Some(last) if last.buf == 0 && last.start + last.len == start => last.len += len,
                _ => g.segs.push(Seg { buf: 0, start, len }),
            }
            if let Some(p) = inline {
                let len = p.len();
                g.bufs.push(p);
                g.segs.push(Seg {
                    buf: (g.bufs.len() - 1) as u32,
                    start: 0,
                    len,
                });
            }
        }
        let zc_min = self.core.config.zero_copy_send;
        let zc = zc_min.is_some_and(|m| g.bufs.iter().skip(1).any(|b| b.len() >= m));
        let mut sent = 0;
        if self.poll && g.segs.len() == 1 && !zc {
            // Busy-poll mode: one contiguous range goes out with a direct non-blocking
            // send (see `State::poll_sockets` for why); what does not fit the socket
            // buffer continues through the ring.
            match sys::send_nonblocking(conn.fd(), &arena) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail_conn(conn, format!("send failed: {e}"), false),
            }
            if sent == arena.len() {
                g.bufs.clear();
                g.bufs.push(Buf::Heap(arena));
                return self.sent_all(conn, g);
            }
        }
        g.bufs[0] = Buf::Heap(arena);
        conn.tx_sent = sent;
        conn.tx_zc = zc;
        conn.tx_total = g.total();
        match self
            .ring
            .sendmsg(conn.fd(), g, sent, zc, tag(conn.id, K_SEND))
        {
            Ok(()) => conn.tx_busy = true,
            Err(e) => self.fail_conn(conn, format!("cannot queue sendmsg: {e}"), false),
        }
    }

    /// First completion of a zero-copy send. When it sent everything, the next batch
    /// may go at once (the stream order is kept); the kernel returns this batch's buffers
    /// with the notification. Otherwise (an error: zero-copy sends use `MSG_WAITALL`,
    /// so io_uring itself retries short sends) the notification ends the connection.
    fn on_zc_sent(&mut self, conn: &mut Conn, res: i32) {
        if res >= 0 && res as usize == conn.tx_total {
            conn.tx_busy = false;
            self.after_sent(conn);
        }
    }

    /// Notification of a zero-copy send whose result came first: its buffers are back.
    /// Zero-copy sends always start at the batch's first byte and are never resumed, so
    /// the send was whole exactly when `res` equals the batch's length.
    fn on_zc_notif(&mut self, conn: &mut Conn, res: i32, held: Held) {
        let Held::Gather(mut g) = held else {
            return;
        };
        if res < 0 || res as usize != g.total() {
            conn.tx_busy = false;
            if conn.closing.is_none() {
                let why = if res < 0 {
                    format!("send failed: {}", std::io::Error::from_raw_os_error(-res))
                } else {
                    format!("zero-copy send stopped after {res} of {} bytes", g.total())
                };
                drop(g);
                self.fail_conn(conn, why, false);
            }
            return;
        }
        if conn.spare.is_none() {
            g.bufs.clear();
            g.segs.clear();
            conn.spare = Some(g);
        }
    }

    /// Everything in `g` went out: recycle the arena and the lists, release the
    /// payloads, and go on with what is queued.
    fn sent_all(&mut self, conn: &mut Conn, mut g: Gather) {
        if let Some(Buf::Heap(a)) = g.bufs.drain(..).next() {
            conn.arena = a;
        }
        g.segs.clear();
        conn.spare = Some(g);
        self.after_sent(conn);
    }

    fn after_sent(&mut self, conn: &mut Conn) {
        if let Some(why) = conn.close_after_flush.take() {
            self.fail_conn(conn, why, true);
            return;
        }
        if !conn.txq.is_empty() {
            self.mark_dirty(conn);
        }
        if conn.rx_tx_blocked && conn.txq.len() < TXQ_MAX / 2 {
            conn.rx_tx_blocked = false;
            self.pump_rx(conn);
        }
    }

    fn on_send(&mut self, conn: &mut Conn, res: i32, held: Held) {
        conn.tx_busy = false;
        let Held::Gather(g) = held else {
            return;
        };
        // The kernel cancels a thread's pending requests when that thread exits, and a
        // caller-driven endpoint may be driven by short-lived threads: send the rest
        // again (a zero-copy send is never resumed by hand, see below).
        let canceled = res == -libc::ECANCELED && !conn.tx_zc;
        if res <= 0 && !canceled {
            if conn.closing.is_none() {
                let why = if res == 0 {
                    "send made no progress".to_string()
                } else {
                    format!("send failed: {}", std::io::Error::from_raw_os_error(-res))
                };
                self.fail_conn(conn, why, false);
            }
            return;
        }
        conn.tx_sent += res.max(0) as usize;
        if conn.tx_zc && conn.tx_sent < g.total() {
            // A zero-copy send is never resumed by hand (see `on_zc_sent`).
            let why = format!(
                "zero-copy send stopped after {} of {} bytes",
                conn.tx_sent,
                g.total()
            );
            drop(g);
            self.fail_conn(conn, why, false);
            return;
        }
        if conn.tx_sent < g.total() && conn.closing.is_none() {
            let sent = conn.tx_sent;
            match self
                .ring
                .sendmsg(conn.fd(), g, sent, conn.tx_zc, tag(conn.id, K_SEND))
            {
                Ok(()) => conn.tx_busy = true,
                Err(e) => self.fail_conn(conn, format!("cannot queue sendmsg: {e}"), false),
            }
            return;
        }
        self.sent_all(conn, g);
    }

    // ---- teardown ----

    /// Close a connection: fail everything pending on it with `reason`, shut the socket
    /// so operations in flight finish, and let `remove_closed` drop it.
    fn fail_conn(&mut self, conn: &mut Conn, reason: String, logged: bool) {
        if conn.closing.is_some() {
            return;
        }
        if !logged {
            let rx = match &conn.rx {
                Rx::Header => "header".to_string(),
                Rx::Payload { len, got, .. } => format!("payload {got}/{len}"),
            };
            tracing::debug!(
                peer = %conn.peer,
                conn = conn.id,
                rx,
                stage = conn.hi - conn.lo,
                recv_busy = conn.recv_busy,
                pending = conn.pending.len(),
                "connection closed: {reason}"
            );
        }
        conn.closing = Some(reason.clone());
        if let Some(s) = conn.shared.clone() {
            s.mark_closed(&reason);
            // Pending operations fail once the receive and send in flight have ended (see
            // `State::remove_closed`): a read's region may be the target of a recv.
            let err = || Error::lost(reason.clone());
            for (_, p) in conn.pending.drain() {
                conn.dying.push((p.done, err()));
            }
            if let Some(f) = conn.fence.take() {
                conn.dying.push((f.done, err()));
            }
            for r in conn.held.drain(..) {
                conn.dying.push((r.done, err()));
            }
        }
        conn.timeouts.clear();
        conn.txq.clear();
        sys::shutdown(conn.fd());
        self.closing.push(conn.id);
    }
}
