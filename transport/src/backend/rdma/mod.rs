//! The rdma backend: RC queue pairs over RDMA verbs, connected with rdma_cm.
//!
//! One-sided operations are real RDMA WRITE, READ and atomics: the target's CPU never
//! sees them. What the target's CPU does do is hand out registrations:
//!
//! - **Keys to rkeys.** A key names a region and carries a token; the rkey that lets a
//!   peer's NIC reach the region is not in the key. On a connection's first use of a key
//!   the initiator asks the target (`KEY_REQ`); the target checks the key exactly as
//!   every other backend checks each access (token, revocation, expiry, rights) and
//!   answers with a registration of the whole region made for that grant alone, with the
//!   grant's rights as its access flags (`KEY_ANS`). The initiator caches it per
//!   connection and checks every later access against the target's answer (rights,
//!   bounds, expiry), so refusals stay errors and never reach the NIC: a NIC-level
//!   refusal would move the queue pair to the error state and end the connection.
//! - **Revocation.** `Region::revoke` tells every connection holding the grant
//!   (`REVOKE`), waits for their `REVOKE_ACK` (RC order: every access they issued before
//!   it has executed) for at most a second, and deregisters the grant's registration:
//!   from then on no peer's NIC can reach the region through it. A peer that had not
//!   acknowledged finds the REVOKE in its receive queue before it posts anything new;
//!   an access it had already posted is refused by the NIC and ends its connection.
//!   Expiry and dropping a region do the same without waiting.
//! - **Authentication** rides on rdma_cm: the initiator's nonce in the connect request's
//!   private data, the target's nonce and proof in the accept's, the initiator's proof
//!   as the first SEND. The target answers no key request before that proof.
//!
//! Two-sided messages are SENDs into posted receive buffers, cut into pieces of one
//! buffer. A receiver whose application stops reading stops reposting buffers; the
//! sender's queue pair then waits (receiver-not-ready retries) — flow control without
//! loss. Notifications are a SEND after the WRITE on the same queue pair, so they
//! arrive after the bytes are placed. Fences are software fences: nothing after a fence
//! is posted until everything before it has completed.

mod ctl;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::addr::{Address, BackendKind};
use crate::backend::{Engine, OpKind, OpReq, remote_error};
use crate::endpoint::{ConnShared, Core, Notification};
use crate::error::{Error, Result};
use crate::idmap::IdMap;
use crate::key::{Rights, now_ms};
use crate::op::{Completion, Notify};
use crate::region::GrantWatcher;
use crate::stats::C;
use crate::sys::EventFd;
use crate::sys::mem::{Mem, Slice};
use crate::sys::verbs::{self, CmEvent, CmId, CompChannel, Cq, EventChannel, Mr, Pd, QpCaps};
use crate::wire::{ErrorCode, TOKEN_LEN, Target};

use ctl::{GrantInfo, KeyAnswer};

/// Receive buffers per connection, and their size (also the largest SEND).
const RECV_N: usize = 32;
const BUF: usize = 16 * 1024;
/// Send buffers per connection (for message pieces and control messages).
const SEND_N: usize = 64;
/// Result slots for atomics per connection.
const ATOMIC_N: usize = 64;
/// Control records (key answers, revocation answers) waiting for a send buffer, per
/// connection, before the peer is cut off: each answers a message the peer sent, so a
/// peer that floods them while it stops taking SENDs (its receive queue full, ours
/// retrying forever) would otherwise grow the queue without bound. An honest peer's
/// backlog is its outstanding key requests and revocations: far fewer.
const MAX_CTL_OUT: usize = 4096;
/// Send queue depth asked for, and the inline size.
const SQ_DEPTH: u32 = 256;
const INLINE_WANT: u32 = 128;
/// Largest RDMA WRITE per work request; longer operations are chained.
const CHUNK: u64 = 1 << 20;
/// Largest RDMA READ per work request. Soft-RoCE (rdma_rxe in Linux 6.1) stalls a read
/// whose response runs to 1,024 packets (1 MiB at its usual 1,024-byte path MTU) until
/// the ACK timeout fires, every time, as perftest's `ib_read_bw -s 1048576` shows, and
/// not at 256 KiB. On hardware a quarter of the size costs nothing: the 16 reads a
/// connection keeps outstanding are still 4 MiB in flight.
const READ_CHUNK: u64 = 256 << 10;

/// Bytes of writes, and of reads, a connection keeps posted at once; the rest of its
/// operations wait in its queue. A revocation waits for what a peer has posted under
/// the grant to complete (the target's NIC would refuse the rest, and that ends the
/// connection), so this also bounds how long a revocation waits on a peer: on
/// hardware a fraction of a millisecond. Reads: the 16 a NIC works on at once
/// (`max_rd_atomic`) at [`READ_CHUNK`] each, more posted would only wait in its send
/// queue; under TCG soft-RoCE (15-30 MiB/s) 0.1-0.3 s, inside [`REVOKE_GRACE`].
/// Writes: 128 of 64 KiB, as ib_write_bw keeps in flight, many times the
/// bandwidth-delay product of a data-centre link; under TCG (7-17 MiB/s) 0.5-1.2 s.
const READ_WINDOW: u64 = 16 * READ_CHUNK;
const WRITE_WINDOW: u64 = 8 << 20;

/// How many bytes of the kind (`true`: writes) a connection keeps posted at most.
#[inline(always)]
fn window(is_write: bool) -> u64 {
    if is_write { WRITE_WINDOW } else { READ_WINDOW }
}

/// The largest work request of a write (`true`) or a read.
#[inline(always)]
fn chunk(is_write: bool) -> u64 {
    if is_write { CHUNK } else { READ_CHUNK }
}
/// How long a revocation waits for peers to acknowledge before it withdraws the
/// registration regardless.
const REVOKE_GRACE: Duration = Duration::from_secs(1);
/// rdma_cm address and route resolution limit.
const RESOLVE_MS: i32 = 2000;
/// How often the timers run while anything is under way.
const TICK: Duration = Duration::from_millis(5);
/// Local ACK timeout exponent: 4.096 µs × 2^18 ≈ 1.07 s (NCCL's default too). The timer
/// must outlast the longest stretch in which the requester is busy taking in responses
/// without catching up: soft-RoCE under TCG moves 15–30 MiB/s, so the megabytes of read
/// responses a connection may have outstanding take hundreds of milliseconds. With
/// 67 ms (2^14, perftest's default) 16 outstanding 1 MiB reads retransmitted about
/// 7 times a second for two minutes, each retransmission answered again, until the
/// operations' deadline. Operations keep their own deadlines, so a peer that vanishes
/// still fails them in time; the QP notices after its retries (7 × 1.07 s).
const ACK_TIMEOUT: u8 = 18;

// Work request ids: the kind in the top 3 bits, a buffer slot (+1, 0: none) in bits
// 32..48, an operation id in the low 32 bits.
const K_OP: u64 = 1;
const K_CTL: u64 = 2;
const K_RECV: u64 = 3;

fn wr_id(kind: u64, slot: Option<usize>, op: u32) -> u64 {
    (kind << 61) | ((slot.map_or(0, |s| s as u64 + 1) & 0xffff) << 32) | u64::from(op)
}

fn wr_parts(id: u64) -> (u64, Option<usize>, u32) {
    let slot = ((id >> 32) & 0xffff) as usize;
    (id >> 61, slot.checked_sub(1), id as u32)
}

/// Whether rdma can run here: a device must be present.
pub(crate) fn unavailable_reason() -> Option<String> {
    if verbs::device_names().is_empty() {
        Some(
            "no RDMA device on this machine (`rdma link` lists none): load a driver, e.g. \
             soft-RoCE with `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0`, \
             or use udp:// or tcp://"
                .into(),
        )
    } else {
        None
    }
}

/// The answer to a `connect`.
#[derive(Debug, Default)]
struct Pending {
    result: Mutex<Option<Result<Arc<ConnShared>>>>,
    notify: Notify,
    abandoned: AtomicBool,
}

impl Pending {
    fn set(&self, r: Result<Arc<ConnShared>>) {
        let mut g = self.result.lock().expect("connect result poisoned");
        if g.is_none() {
            *g = Some(r);
            drop(g);
            self.notify.wake_all();
        }
    }
}

/// A revocation someone waits for.
#[derive(Debug, Default)]
struct RevokeWait {
    done: AtomicBool,
    notify: Notify,
}

enum Ctl {
    Connect(
        SocketAddr,
        Arc<Pending>,
        Option<[u8; crate::auth::NONCE_LEN]>,
    ),
    Close(Arc<ConnShared>),
    Room(Arc<ConnShared>),
    Revoke(u64, Option<[u8; TOKEN_LEN]>, Option<Arc<RevokeWait>>),
}

/// Per-device resources.
struct Dev {
    ctx: usize,
    name: String,
    atomics: bool,
    // Field order is drop order: the channel after the CQs (owned by connections, gone
    // before the device), the PD last.
    chan: CompChannel,
    pd: Pd,
}

/// A registration of a region made for one grant and the peers it was handed to.
struct Grant {
    dev: usize,
    region: u64,
    token: [u8; TOKEN_LEN],
    expires_ms: u64,
    holders: HashSet<u64>,
    /// Revocation under way: its deadline and who waits for it.
    revoking: Option<(Instant, Vec<Arc<RevokeWait>>)>,
    mr: Mr,
}

/// What an initiator knows about a key on one connection.
#[derive(Debug, Clone, Copy)]
struct Known {
    info: GrantInfo,
    expires: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    /// Initiator: resolving address and route.
    Resolving,
    /// Connect request sent or received, not established yet.
    Connecting,
    /// Target: established, waiting for the initiator's proof.
    AuthWait,
    Up,
}

impl Inflight {
    /// Nothing posted, counted or failed yet.
    fn new(
        (done, deadline): (Arc<Completion>, Option<Instant>),
        conn: &Arc<ConnShared>,
        local: Option<Slice>,
    ) -> Inflight {
        Inflight {
            done,
            conn: conn.clone(),
            deadline,
            wrs: 0,
            rw_done: 0,
            error: None,
            atomic: None,
            grant: None,
            bytes: 0,
            what: None,
            needs_ack: false,
            timed_out: false,
            _local: local,
        }
    }
}

/// An operation with work requests on the wire.
struct Inflight {
    done: Arc<Completion>,
    conn: Arc<ConnShared>,
    /// Stamped by the first tick that sees the operation (see `tick`).
    deadline: Option<Instant>,
    wrs: u32,
    /// Reads and writes: bytes of its work requests completed so far (they complete in
    /// posting order, a chunk each, so the next one's length follows).
    rw_done: u64,
    /// The first error a work request reported.
    error: Option<Box<Error>>,
    /// Atomics: the result slot.
    atomic: Option<usize>,
    /// The grant its work requests use (reads, writes and atomics).
    grant: Option<u64>,
    /// Bytes to count on success, and as what.
    bytes: u64,
    what: Option<C>,
    /// A message: complete only once the peer has queued it for its application.
    needs_ack: bool,
    /// Failed at its deadline already; kept until its work requests complete, because
    /// the NIC may still write into `_local`.
    timed_out: bool,
    _local: Option<Slice>,
}

/// How far the operation at the head of the queue has been posted.
#[derive(Default)]
struct Head {
    op: Option<u32>,
    posted: u64,
}

struct RConn {
    phase: Phase,
    peer: SocketAddr,
    dev: Option<usize>,
    pending: Option<Arc<Pending>>,
    shared: Option<Arc<ConnShared>>,
    hello: Option<ctl::Hello>,
    /// The peer's NIC performs atomics on big-endian words (from its handshake).
    peer_be_words: bool,
    transcript: Option<crate::auth::Transcript>,
    deadline: Option<Instant>,
    caps: QpCaps,
    // Field order is drop order: the id (and its QP) first, then the CQ, then buffers.
    id: Option<CmId>,
    cq: Option<Cq>,
    recv_mr: Option<Mr>,
    send_mr: Option<Mr>,
    atomic_mr: Option<Mr>,
    send_free: Vec<usize>,
    atomic_free: Vec<usize>,
    sq_used: u32,
    queue: VecDeque<OpReq>,
    head: Head,
    ctl_out: VecDeque<Vec<u8>>,
    /// Operations with work requests out, by their id (`u64::from` the u32 in wr_id).
    ops: IdMap<Inflight>,
    next_op: u32,
    known: HashMap<(u64, [u8; TOKEN_LEN]), Known>,
    last_known: Option<((u64, [u8; TOKEN_LEN]), Known)>,
    asking: HashMap<u32, (u64, [u8; TOKEN_LEN])>,
    next_req: u32,
    partial: Vec<u8>,
    /// Messages sent, oldest first, whose `MSG_ACK` has not come yet.
    unacked: VecDeque<u32>,
    /// Messages queued for the application not acknowledged to the peer yet.
    acks_owed: u32,
    /// Grants the peer revoked whose `REVOKE_ACK` waits for this side's operations on
    /// them to complete (see `release_revoke_acks`).
    revoke_acks_held: Vec<u64>,
    /// Bytes of reads (`[0]`) and writes (`[1]`) posted and not completed (see
    /// [`READ_WINDOW`]).
    posted: [u64; 2],
    held: VecDeque<(usize, usize)>,
    stalled: bool,
}

impl RConn {
    fn new(id: CmId, peer: SocketAddr, phase: Phase) -> RConn {
        RConn {
            phase,
            peer,
            dev: None,
            pending: None,
            shared: None,
            hello: None,
            peer_be_words: false,
            transcript: None,
            deadline: None,
            caps: QpCaps {
                send_wr: 0,
                recv_wr: 0,
                inline: 0,
            },
            id: Some(id),
            cq: None,
            recv_mr: None,
            send_mr: None,
            atomic_mr: None,
            send_free: Vec::new(),
            atomic_free: Vec::new(),
            sq_used: 0,
            queue: VecDeque::new(),
            head: Head::default(),
            ctl_out: VecDeque::new(),
            ops: IdMap::default(),
            next_op: 1,
            known: HashMap::new(),
            last_known: None,
            asking: HashMap::new(),
            next_req: 1,
            partial: Vec::new(),
            revoke_acks_held: Vec::new(),
            posted: [0; 2],
            unacked: VecDeque::new(),
            acks_owed: 0,
            held: VecDeque::new(),
            stalled: false,
        }
    }

    fn id(&self) -> &CmId {
        self.id.as_ref().expect("connection id present while open")
    }

    fn buf_addr(mr: &Option<Mr>, slot: usize, size: usize) -> u64 {
        mr.as_ref().map_or(0, |m| m.addr() + (slot * size) as u64)
    }

    /// Describe the connection for errors: device, QP state.
    fn where_(&self) -> String {
        match &self.id {
            Some(id) => format!("{} QP {}", id.device(), id.qp_state()),
            None => "closed".into(),
        }
    }
}

struct State {
    conns: IdMap<RConn>,
    by_id: HashMap<usize, u64>,
    /// Connections by their handle's id.
    by_shared: IdMap<u64>,
    grants: HashMap<u64, Grant>,
    grant_index: HashMap<(usize, u64, [u8; TOKEN_LEN]), u64>,
    next_grant: u64,
    /// Registrations of local memory, by device and address: the registration cache.
    local: HashMap<(usize, usize, usize), Mr>,
    last_local: Option<((usize, usize, usize), u32)>,
    listener: Option<CmId>,
    devs: Vec<Dev>,
    next_key: u64,
    last_tick: Instant,
    /// Work was done since the last tick (whose release of unused registrations has not
    /// seen its effects yet): a sleeping engine keeps to the tick until one has run.
    active: bool,
    last_cm: Instant,
    /// Connections not up yet (their events are looked for more often).
    setting_up: usize,
    scratch_keys: Vec<u64>,
    /// The clock at the last pass that read it.
    now: Instant,
    passes: u64,
    /// Operations posted by `submit` on the caller's thread (they count towards the
    /// clock reads, as passes do).
    submits: u64,
    wcs: Vec<verbs::Wc>,
    /// Work requests being built for one post (reused: no allocation per post).
    wrs: Vec<verbs::SendWr>,
}

impl State {
    /// The connections' keys, without allocating on every pass.
    fn keys(&mut self) -> Vec<u64> {
        let mut v = std::mem::take(&mut self.scratch_keys);
        v.clear();
        v.extend(self.conns.keys().copied());
        v
    }

    fn give_back_keys(&mut self, v: Vec<u64>) {
        self.scratch_keys = v;
    }
}

/// The rdma engine.
pub(crate) struct RdmaEngine {
    core: Arc<Core>,
    me: Weak<RdmaEngine>,
    ops: ArrayQueue<(Arc<ConnShared>, OpReq)>,
    ctl: Mutex<Vec<Ctl>>,
    ctl_pending: AtomicBool,
    // The channel outlives the state's ids (declared after the state: dropped later).
    state: Mutex<State>,
    chan: EventChannel,
    waker: EventFd,
    local: Option<SocketAddr>,
    dead: Mutex<Option<String>>,
    is_dead: AtomicBool,
    describe: Mutex<String>,
    registrations: AtomicUsize,
    /// A progress thread that sleeps between passes drives the engine.
    sleeps: bool,
    /// The application's threads drive the engine (no progress thread): `submit` posts.
    direct: bool,
}

impl std::fmt::Debug for RdmaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaEngine")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

fn io(call: &'static str, e: std::io::Error) -> Error {
    Error::Io { call, source: e }
}

impl RdmaEngine {
    /// An engine listening on `listen` (if any).
    pub(crate) fn new(core: Arc<Core>, listen: Option<SocketAddr>) -> Result<Arc<RdmaEngine>> {
        if let Some(why) = unavailable_reason() {
            return Err(Error::Unsupported { reason: why });
        }
        let chan = EventChannel::new().map_err(|e| io("rdma_create_event_channel", e))?;
        let mut listener = None;
        let mut local = None;
        if let Some(a) = listen {
            let id = CmId::new(&chan).map_err(|e| io("rdma_create_id", e))?;
            id.bind(&a).map_err(|e| {
                let hint = if a.ip().is_unspecified() {
                    String::new()
                } else {
                    format!(
                        " (no RDMA device has the address {}: `rdma link` shows each \
                         device's netdev; give that netdev this address, or listen on an \
                         address of one)",
                        a.ip()
                    )
                };
                io(
                    "rdma_bind_addr",
                    std::io::Error::new(e.kind(), format!("rdma://{a}: {e}{hint}")),
                )
            })?;
            id.listen(128).map_err(|e| io("rdma_listen", e))?;
            local = Some(id.local_addr().unwrap_or(a));
            listener = Some(id);
        }
        let waker = EventFd::new().map_err(|e| io("eventfd", e))?;
        let cap = core.config.max_queued_ops;
        let eng = Arc::new_cyclic(|me| RdmaEngine {
            me: me.clone(),
            ops: ArrayQueue::new(cap),
            ctl: Mutex::new(Vec::new()),
            ctl_pending: AtomicBool::new(false),
            state: Mutex::new(State {
                conns: IdMap::default(),
                by_id: HashMap::new(),
                by_shared: IdMap::default(),
                grants: HashMap::new(),
                grant_index: HashMap::new(),
                next_grant: 1,
                local: HashMap::new(),
                last_local: None,
                listener,
                devs: Vec::new(),
                next_key: 1,
                last_tick: Instant::now(),
                active: false,
                last_cm: Instant::now(),
                setting_up: 0,
                scratch_keys: Vec::new(),
                now: Instant::now(),
                passes: 0,
                submits: 0,
                wcs: Vec::with_capacity(64),
                wrs: Vec::new(),
            }),
            chan,
            waker,
            local,
            dead: Mutex::new(None),
            is_dead: AtomicBool::new(false),
            describe: Mutex::new(format!(
                "rdma: RC queue pairs via rdma_cm{}, {} completions",
                local
                    .map(|a| format!(", listening on {a}"))
                    .unwrap_or_default(),
                match core.config.wait {
                    crate::config::WaitMode::BusyPoll => "busy-polled",
                    crate::config::WaitMode::Block => "event-driven",
                }
            )),
            registrations: AtomicUsize::new(0),
            direct: core.config.progress == crate::config::Progress::Caller,
            sleeps: core.config.progress != crate::config::Progress::Caller
                && core.config.wait == crate::config::WaitMode::Block,
            core,
        });
        let w: Weak<dyn GrantWatcher> = eng.me.clone();
        eng.core.regions.watch(w);
        Ok(eng)
    }

    fn push_ctl(&self, c: Ctl) {
        self.ctl.lock().expect("ctl lock").push(c);
        self.ctl_pending.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// One pass: control requests, connection events, completions, new operations,
    /// deadlines.
    fn pass(&self, st: &mut State) -> usize {
        let mut work = 0;
        if self.ctl_pending.load(Ordering::Relaxed)
            && self.ctl_pending.swap(false, Ordering::SeqCst)
        {
            let cs = std::mem::take(&mut *self.ctl.lock().expect("ctl lock"));
            work += cs.len();
            for c in cs {
                self.handle_ctl(st, c);
            }
        }
        // A spinning engine reads the clock (a system call where the clocksource has no
        // vDSO path, as under TCG) only every 1024 passes.
        st.passes = st.passes.wrapping_add(1);
        let every = if st.setting_up > 0 { 16 } else { 1024 };
        let timed = self.sleeps || st.passes.is_multiple_of(every);
        if timed {
            st.now = Instant::now();
            work += self.cm_due(st);
        }
        work += self.completions(st);
        work += self.take_new_ops(st);
        let keys = st.keys();
        for &k in &keys {
            work += self.issue(st, k);
        }
        st.give_back_keys(keys);
        st.active |= work > 0;
        if timed {
            self.tick_due(st);
        }
        work
    }

    /// Connection events, if it is time to look (`st.now` just read). They are rare
    /// once connections are up: look every millisecond (a system call each time), or
    /// every time while one is being set up.
    fn cm_due(&self, st: &mut State) -> usize {
        if st.setting_up > 0 || st.now.duration_since(st.last_cm) >= Duration::from_millis(1) {
            st.last_cm = st.now;
            return self.cm_events(st);
        }
        0
    }

    /// The timers (deadlines, expiry, the registration cache), every [`TICK`] (`st.now`
    /// just read).
    fn tick_due(&self, st: &mut State) {
        let now = st.now;
        if now.duration_since(st.last_tick) >= TICK {
            st.last_tick = now;
            st.active = false;
            self.tick(st, now);
        }
    }

    /// The common case on its own short path: a read or write on an idle connection
    /// whose key is known and valid and whose local memory is the last registered one,
    /// in one work request. Anything else (`Err`) goes through the queue and
    /// `issue_head`, which also reports every refusal.
    ///
    /// After the post it reaps. A device that completes within the post (as soft-RoCE
    /// does) has the operation's completion there already: it finishes here and never
    /// enters the in-flight table. Otherwise it goes in, and the completions found are
    /// handled as in a pass.
    fn post_now(
        &self,
        st: &mut State,
        k: u64,
        conn: &Arc<ConnShared>,
        req: OpReq,
    ) -> std::result::Result<(), OpReq> {
        // One lookup of the connection for the checks, the post and the reap.
        let State {
            conns,
            now,
            last_local,
            wcs,
            ..
        } = st;
        let Some(c) = conns.get_mut(&k) else {
            return Err(req);
        };
        let (local, t, is_write, need) = match &req.kind {
            OpKind::Write {
                local,
                target,
                notify: None,
            } => (local, target, true, Rights::WRITE),
            OpKind::Read { local, target } => (local, target, false, Rights::READ),
            _ => return Err(req),
        };
        let len = local.len() as u64;
        let idle = c.phase == Phase::Up
            && c.queue.is_empty()
            && c.ctl_out.is_empty()
            && c.sq_used < c.caps.send_wr;
        let w = usize::from(is_write);
        if !idle || len == 0 || len > chunk(is_write) || c.posted[w] + len > window(is_write) {
            return Err(req);
        }
        let g = match c.last_known {
            Some(((region, token), kn))
                if region == t.region
                    && token == t.token
                    && kn.expires.is_none_or(|e| e > *now) =>
            {
                kn.info
            }
            _ => return Err(req),
        };
        // The queued path reports a refusal; this only declines.
        if refusal(&g, t, need, len, true, String::new).is_some() {
            return Err(req);
        }
        let inline = is_write && len <= u64::from(c.caps.inline);
        let lkey = if inline {
            0
        } else {
            let mem = local.mem();
            match *last_local {
                Some(((d, p, l), lkey))
                    if Some(d) == c.dev && p == mem.ptr_at(0) as usize && l == mem.len() =>
                {
                    lkey
                }
                _ => return Err(req),
            }
        };
        let op = c.next_op;
        let wr = [rw_wr(
            op,
            is_write,
            inline,
            (local.as_ptr() as u64, len as u32, lkey),
            (g.addr + t.offset, g.rkey),
        )];
        if c.id().post_send(&wr).is_err() {
            // The queued path posts it again and ends the connection on the error.
            return Err(req);
        }
        c.next_op = c.next_op.wrapping_add(1).max(1);
        c.sq_used += 1;
        c.posted[w] += len;
        let OpReq {
            kind: OpKind::Write { local, .. } | OpKind::Read { local, .. },
            done,
            deadline,
            ..
        } = req
        else {
            unreachable!("matched above");
        };
        let mut wcs = std::mem::take(wcs);
        wcs.clear();
        if let Some(cq) = &c.cq {
            cq.poll(&mut wcs, 32);
        }
        let id = wr_id(K_OP, None, op);
        let mine = wcs
            .iter()
            .position(|wc| wc.wr_id == id && wc.status == verbs::WC_SUCCESS);
        let what = if is_write {
            C::bytes_written
        } else {
            C::bytes_read
        };
        if mine.is_some() {
            c.sq_used = c.sq_used.saturating_sub(1);
            c.posted[w] -= len;
            conn.count(what, len);
            conn.finish(&done, Ok(0));
        } else {
            c.ops.insert(
                u64::from(op),
                Inflight {
                    wrs: 1,
                    bytes: len,
                    what: Some(what),
                    grant: Some(g.grant),
                    ..Inflight::new((done, deadline), conn, Some(local))
                },
            );
        }
        if wcs.len() > usize::from(mine.is_some()) {
            self.handle_wcs(st, k, &wcs, mine);
        }
        st.wcs = wcs;
        Ok(())
    }

    /// Move submitted operations to their connections' queues, in submission order.
    fn take_new_ops(&self, st: &mut State) -> usize {
        let mut n = 0;
        while let Some((conn, req)) = self.ops.pop() {
            n += 1;
            match key_of(st, &conn) {
                Some(k) => st.conns.get_mut(&k).expect("found").queue.push_back(req),
                None => conn.finish(&req.done, Err(Error::lost(conn.close_reason()))),
            }
        }
        n
    }

    fn handle_ctl(&self, st: &mut State, c: Ctl) {
        match c {
            Ctl::Connect(addr, p, nonce) => self.start_connect(st, addr, p, nonce),
            Ctl::Close(shared) => {
                if let Some(k) = key_of(st, &shared) {
                    self.close_conn(st, k, "closed by this side", true);
                }
            }
            Ctl::Room(shared) => {
                if let Some(k) = key_of(st, &shared) {
                    self.drain_held(st, k);
                }
            }
            Ctl::Revoke(region, token, wait) => {
                let gids: Vec<u64> = st
                    .grants
                    .iter()
                    .filter(|(_, g)| g.region == region && token.is_none_or(|t| t == g.token))
                    .map(|(id, _)| *id)
                    .collect();
                for gid in &gids {
                    self.start_revoke(st, *gid, wait.clone());
                }
                if gids.is_empty()
                    && let Some(w) = wait
                {
                    w.done.store(true, Ordering::SeqCst);
                    w.notify.wake_all();
                }
                // A dropped region (every key ended): release the cached registrations
                // of memory nothing else holds now, its own among them unless an
                // operation still uses it (then the next tick does).
                if token.is_none() {
                    release_unused_registrations(st);
                }
            }
        }
    }

    // ------------------------------------------------------------------ connections

    fn start_connect(
        &self,
        st: &mut State,
        addr: SocketAddr,
        p: Arc<Pending>,
        nonce: Option<[u8; crate::auth::NONCE_LEN]>,
    ) {
        let r = (|| -> Result<CmId> {
            let id = CmId::new(&self.chan).map_err(|e| io("rdma_create_id", e))?;
            let _ = id.set_ack_timeout(ACK_TIMEOUT);
            id.resolve_addr(&addr, RESOLVE_MS)
                .map_err(|e| io("rdma_resolve_addr", e))?;
            Ok(id)
        })();
        match r {
            Ok(id) => {
                let key = st.next_key;
                st.next_key += 1;
                st.by_id.insert(id.key(), key);
                let mut c = RConn::new(id, addr, Phase::Resolving);
                c.pending = Some(p);
                c.hello = Some(ctl::Hello {
                    endpoint: self.core.id,
                    max_payload: self.core.config.max_payload(),
                    nonce,
                    be_words: ctl::HOST_BE_WORDS,
                });
                c.deadline = Some(Instant::now() + self.core.config.connect_timeout);
                st.conns.insert(key, c);
                st.setting_up += 1;
            }
            Err(e) => p.set(Err(e)),
        }
    }

    fn dev_for(&self, st: &mut State, id: &CmId) -> Result<usize> {
        let Some(ctx) = id.device_key() else {
            return Err(Error::Unsupported {
                reason: "rdma_cm bound the connection to no device".into(),
            });
        };
        if let Some(i) = st.devs.iter().position(|d| d.ctx == ctx) {
            return Ok(i);
        }
        let pd = Pd::for_id(id).map_err(|e| io("ibv_alloc_pd", e))?;
        let chan = CompChannel::for_pd(&pd).map_err(|e| io("ibv_create_comp_channel", e))?;
        let atomics = pd.atomics_supported();
        st.devs.push(Dev {
            ctx,
            name: id.device(),
            atomics,
            chan,
            pd,
        });
        let names: Vec<String> = st.devs.iter().map(|d| d.name.clone()).collect();
        let mut d = self.describe.lock().expect("describe lock");
        if let Some(i) = d.find(", devices ") {
            d.truncate(i);
        }
        d.push_str(&format!(", devices {}", names.join(", ")));
        Ok(st.devs.len() - 1)
    }

    /// Queue pair, completion queue and buffers for a connection; receives posted.
    fn setup_qp(&self, st: &mut State, k: u64) -> Result<()> {
        let dev = match st.conns.get(&k).and_then(|c| c.id.as_ref()) {
            Some(id) => id.device_key().unwrap_or(0),
            None => return Err(Error::Closed("connection")),
        };
        let di = match st.devs.iter().position(|d| d.ctx == dev) {
            Some(i) => i,
            None => {
                let c = st.conns.remove(&k).expect("conn");
                let r = self.dev_for(st, c.id());
                st.conns.insert(k, c);
                r?
            }
        };
        let d = &st.devs[di];
        let entries = (SQ_DEPTH as usize + RECV_N + 16) as i32;
        let cq = Cq::new(&d.pd, &d.chan, entries).map_err(|e| io("ibv_create_cq", e))?;
        let recv_mem = Arc::new(Mem::alloc(RECV_N * BUF, false)?);
        let send_mem = Arc::new(Mem::alloc(SEND_N * BUF, false)?);
        let atomic_mem = Arc::new(Mem::alloc(ATOMIC_N * 8, false)?);
        let lw = verbs::access::LOCAL_WRITE;
        let reg = |m: &Arc<Mem>| d.pd.reg(m, 0, m.len(), lw).map_err(|e| io("ibv_reg_mr", e));
        let recv_mr = reg(&recv_mem)?;
        let send_mr = reg(&send_mem)?;
        let atomic_mr = reg(&atomic_mem)?;
        let c = st.conns.get_mut(&k).expect("conn");
        let caps =
            c.id.as_mut()
                .expect("id")
                .create_qp(
                    &st.devs[di].pd,
                    &cq,
                    QpCaps {
                        send_wr: SQ_DEPTH,
                        recv_wr: RECV_N as u32,
                        inline: INLINE_WANT,
                    },
                )
                .map_err(|e| io("rdma_create_qp", e))?;
        c.caps = caps;
        c.dev = Some(di);
        c.cq = Some(cq);
        let bufs: Vec<(u64, u64, u32, u32)> = (0..RECV_N)
            .map(|s| {
                (
                    wr_id(K_RECV, Some(s), 0),
                    recv_mr.addr() + (s * BUF) as u64,
                    BUF as u32,
                    recv_mr.lkey(),
                )
            })
            .collect();
        c.recv_mr = Some(recv_mr);
        c.send_mr = Some(send_mr);
        c.atomic_mr = Some(atomic_mr);
        c.send_free = (0..SEND_N).rev().collect();
        c.atomic_free = (0..ATOMIC_N).rev().collect();
        c.id()
            .post_recv(&bufs)
            .map_err(|e| io("ibv_post_recv", e))?;
        Ok(())
    }

    fn cm_events(&self, st: &mut State) -> usize {
        let mut n = 0;
        loop {
            let ev = match self.chan.next() {
                Ok(Some(ev)) => ev,
                Ok(None) => return n,
                Err(e) => {
                    self.die(&format!("rdma_cm event channel failed: {e}"));
                    return n;
                }
            };
            n += 1;
            self.cm_event(st, ev);
        }
    }

    fn cm_event(&self, st: &mut State, ev: CmEvent) {
        use rdma_sys::rdma_cm_event_type as T;
        if ev.kind == T::RDMA_CM_EVENT_CONNECT_REQUEST {
            self.connect_request(st, ev);
            return;
        }
        let Some(&k) = st.by_id.get(&ev.id) else {
            return;
        };
        match ev.kind {
            T::RDMA_CM_EVENT_ADDR_RESOLVED => {
                let r = st.conns[&k].id().resolve_route(RESOLVE_MS);
                if let Err(e) = r {
                    self.fail_connect(st, k, io("rdma_resolve_route", e));
                }
            }
            T::RDMA_CM_EVENT_ROUTE_RESOLVED => {
                let r = self.setup_qp(st, k).and_then(|_| {
                    let c = &st.conns[&k];
                    let hello = ctl::Hello {
                        endpoint: self.core.id,
                        max_payload: self.core.config.max_payload(),
                        nonce: c.hello.as_ref().and_then(|h| h.nonce),
                        be_words: ctl::HOST_BE_WORDS,
                    };
                    c.id()
                        .connect(&hello.encode())
                        .map_err(|e| io("rdma_connect", e))
                });
                match r {
                    Ok(()) => st.conns.get_mut(&k).expect("conn").phase = Phase::Connecting,
                    Err(e) => self.fail_connect(st, k, e),
                }
            }
            T::RDMA_CM_EVENT_ADDR_ERROR | T::RDMA_CM_EVENT_ROUTE_ERROR => {
                let peer = st.conns[&k].peer;
                self.fail_connect(
                    st,
                    k,
                    Error::Io {
                        call: if ev.kind == T::RDMA_CM_EVENT_ADDR_ERROR {
                            "rdma_resolve_addr"
                        } else {
                            "rdma_resolve_route"
                        },
                        source: std::io::Error::new(
                            std::io::ErrorKind::AddrNotAvailable,
                            format!(
                                "no RDMA path to {peer} (status {}): an RDMA device must \
                                 have an address on a network that reaches the peer \
                                 (`rdma link` lists devices and their netdevs)",
                                ev.status
                            ),
                        ),
                    },
                );
            }
            T::RDMA_CM_EVENT_REJECTED => {
                let peer = st.conns[&k].peer;
                let e = match ctl::decode_reject(&ev.private) {
                    Some((1, why)) => Error::AuthFailed(why),
                    Some((2, why)) => Error::Busy(why),
                    Some((_, why)) => Error::Protocol(format!("the target refused: {why}")),
                    None => Error::Io {
                        call: "rdma_connect",
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            format!(
                                "rdma://{peer} rejected the connection (status {}): is a \
                                 PacketFS rdma endpoint listening there?",
                                ev.status
                            ),
                        ),
                    },
                };
                self.fail_connect(st, k, e);
            }
            T::RDMA_CM_EVENT_CONNECT_ERROR | T::RDMA_CM_EVENT_UNREACHABLE => {
                let peer = st.conns[&k].peer;
                let e = Error::lost(format!(
                    "rdma://{peer} unreachable during connection setup (status {})",
                    ev.status
                ));
                if st.conns[&k].pending.is_some() {
                    self.fail_connect(st, k, e);
                } else {
                    self.close_conn(st, k, &e.to_string(), false);
                }
            }
            T::RDMA_CM_EVENT_ESTABLISHED => self.established(st, k, &ev.private),
            T::RDMA_CM_EVENT_DISCONNECTED | T::RDMA_CM_EVENT_DEVICE_REMOVAL => {
                let why = if ev.kind == T::RDMA_CM_EVENT_DISCONNECTED {
                    "the peer disconnected"
                } else {
                    "the RDMA device was removed"
                };
                if st.conns[&k].pending.is_some() {
                    self.fail_connect(st, k, Error::lost(why));
                } else {
                    self.close_conn(st, k, why, false);
                }
            }
            _ => {}
        }
    }

    fn fail_connect(&self, st: &mut State, k: u64, e: Error) {
        if let Some(c) = st.conns.get_mut(&k)
            && let Some(p) = c.pending.take()
        {
            p.set(Err(e));
        }
        self.close_conn(st, k, "connection setup failed", true);
    }

    fn connect_request(&self, st: &mut State, ev: CmEvent) {
        let Some(id) = ev.new_id else {
            return;
        };
        let peer = id
            .peer_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let cfg = &self.core.config;
        let hello = match ctl::Hello::decode(&ev.private) {
            Ok(h) => h,
            Err(why) => {
                self.core.counters.add(C::handshakes_refused, 1);
                id.reject(&ctl::encode_reject(ctl::RejectCode::Malformed, &why));
                return;
            }
        };
        let reject = |code, why: &str| {
            self.core.counters.add(C::handshakes_refused, 1);
            id.reject(&ctl::encode_reject(code, why));
        };
        let from_peer = st
            .conns
            .values()
            .filter(|c| c.peer.ip() == peer.ip())
            .count();
        if self.core.open_conns.load(Ordering::Relaxed) >= cfg.max_connections {
            return reject(
                ctl::RejectCode::Busy,
                "the target is at its connection limit",
            );
        }
        if from_peer >= cfg.max_connections_per_peer {
            self.core.counters.add(C::peer_connections_refused, 1);
            return reject(
                ctl::RejectCode::Busy,
                "the target is at its connection limit for this address",
            );
        }
        let (welcome_proof, transcript) = match (&cfg.secret, hello.nonce) {
            (Some(_), None) => {
                self.core.counters.add(C::auth_failures, 1);
                return reject(
                    ctl::RejectCode::AuthRequired,
                    "this endpoint accepts only peers holding the cluster secret: configure \
                     the same secret on the connecting side (EndpointConfig::secret)",
                );
            }
            (Some(secret), Some(n)) => {
                match crate::auth::answer_initiator(secret, &n, hello.endpoint, self.core.id) {
                    Ok((t, payload)) => (Some(payload), Some(t)),
                    Err(e) => return reject(ctl::RejectCode::AuthRequired, &e.to_string()),
                }
            }
            // No secret here: accept; an initiator that authenticates sees no proof and
            // refuses by itself.
            (None, _) => (None, None),
        };
        let key = st.next_key;
        st.next_key += 1;
        st.by_id.insert(id.key(), key);
        let mut c = RConn::new(id, peer, Phase::Connecting);
        c.peer_be_words = hello.be_words;
        c.hello = Some(hello);
        c.transcript = transcript;
        c.deadline = Some(Instant::now() + cfg.connect_timeout);
        st.conns.insert(key, c);
        st.setting_up += 1;
        let welcome = ctl::Welcome {
            endpoint: self.core.id,
            max_payload: cfg.max_payload(),
            proof: welcome_proof,
            be_words: ctl::HOST_BE_WORDS,
        };
        let r = self.setup_qp(st, key).and_then(|_| {
            st.conns[&key]
                .id()
                .accept(&welcome.encode())
                .map_err(|e| io("rdma_accept", e))
        });
        if let Err(e) = r {
            tracing::debug!(%peer, "rdma accept failed: {e}");
            if let Some(c) = st.conns.get(&key) {
                c.id()
                    .reject(&ctl::encode_reject(ctl::RejectCode::Busy, &e.to_string()));
            }
            self.close_conn(st, key, "accept failed", false);
        }
    }

    fn established(&self, st: &mut State, k: u64, private: &[u8]) {
        let Some(c) = st.conns.get_mut(&k) else {
            return;
        };
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let engine: Arc<dyn Engine> = me;
        let local = c.id().local_addr().unwrap_or(c.peer);
        if let Some(p) = c.pending.clone() {
            // Initiator: judge the target's answer.
            let Some(w) = ctl::Welcome::decode(private) else {
                return self.fail_connect(
                    st,
                    k,
                    Error::Protocol("the target's accept carries no PacketFS handshake".into()),
                );
            };
            c.peer_be_words = w.be_words;
            let proof = crate::auth::check_target(
                self.core.config.secret.as_ref(),
                c.hello.as_ref().and_then(|h| h.nonce),
                w.proof.is_some(),
                w.proof.as_deref().unwrap_or(&[]),
                self.core.id,
                w.endpoint,
            );
            let proof = match proof {
                Ok(p) => p,
                Err(e) => {
                    self.core.counters.add(C::auth_failures, 1);
                    return self.fail_connect(st, k, e);
                }
            };
            if let Some(proof) = proof {
                let mut m = vec![ctl::AUTH];
                m.extend_from_slice(&proof);
                c.ctl_out.push_back(m);
            }
            let shared = self.handle(engine, c, local, w.endpoint, w.max_payload);
            st.by_shared.insert(shared.id, k);
            c.shared = Some(shared.clone());
            c.phase = Phase::Up;
            st.setting_up -= 1;
            c.pending = None;
            c.deadline = None;
            if p.abandoned.load(Ordering::SeqCst) {
                self.close_conn(st, k, "connect abandoned at its timeout", true);
                return;
            }
            p.set(Ok(shared));
            self.flush_ctl(st, k);
            self.drain_held(st, k);
            return;
        }
        // Target.
        let hello = c.hello.clone().expect("target connections keep the hello");
        let shared = self.handle(engine, c, local, hello.endpoint, hello.max_payload);
        st.by_shared.insert(shared.id, k);
        c.shared = Some(shared);
        if c.transcript.is_some() {
            c.phase = Phase::AuthWait;
        } else {
            self.admit(st, k);
        }
        self.drain_held(st, k);
    }

    /// The application's handle of an established connection.
    fn handle(
        &self,
        engine: Arc<dyn Engine>,
        c: &RConn,
        local: SocketAddr,
        peer_id: u64,
        peer_max_payload: u32,
    ) -> Arc<ConnShared> {
        ConnShared::new(
            self.core.next_conn_id(),
            self.core.clone(),
            engine,
            peer_id,
            Address::Rdma(local),
            Address::Rdma(c.peer),
            peer_max_payload,
        )
    }

    /// Target: the connection is established (and authenticated): offer it to accept.
    fn admit(&self, st: &mut State, k: u64) {
        let Some(c) = st.conns.get_mut(&k) else {
            return;
        };
        if c.phase != Phase::Up {
            st.setting_up -= 1;
        }
        c.phase = Phase::Up;
        c.deadline = None;
        let shared = c.shared.clone().expect("shared set when established");
        if self.core.accepted.push(shared).is_err() {
            self.core.counters.add(C::handshakes_refused, 1);
            self.close_conn(st, k, "the accept queue is full", true);
        }
    }

    /// Close a connection: fail what is pending, tear the queue pair down, forget it.
    fn close_conn(&self, st: &mut State, k: u64, why: &str, disconnect: bool) {
        let Some(mut c) = st.conns.remove(&k) else {
            return;
        };
        if c.phase != Phase::Up {
            st.setting_up -= 1;
        }
        if let Some(id) = &c.id {
            st.by_id.remove(&(id.key()));
            if disconnect {
                id.disconnect();
            }
        }
        if let Some(p) = c.pending.take() {
            p.set(Err(Error::lost(why.to_string())));
        }
        if let Some(s) = &c.shared {
            st.by_shared.remove(&s.id);
        }
        let reason = match &c.shared {
            Some(s) if s.is_closed() => s.close_reason(),
            _ => why.to_string(),
        };
        // The QP goes first: after that no work request can touch any buffer.
        c.id.take();
        if let Some(d) = c.dev.and_then(|d| st.devs.get(d)) {
            d.chan.drain();
        }
        c.cq.take();
        for (_, f) in c.ops.drain() {
            if !f.timed_out {
                f.conn.finish(&f.done, Err(Error::lost(reason.clone())));
            }
        }
        if let Some(s) = &c.shared {
            for r in c.queue.drain(..) {
                s.finish(&r.done, Err(Error::lost(reason.clone())));
            }
            s.mark_closed(&reason);
        }
        // Grants this peer held: nothing to wait for from it any more.
        for g in st.grants.values_mut() {
            g.holders.remove(&k);
        }
        self.finish_revocations(st);
    }

    // ------------------------------------------------------------------ sending

    fn take_send_slot(c: &mut RConn) -> Option<usize> {
        if c.sq_used >= c.caps.send_wr {
            return None;
        }
        c.send_free.pop()
    }

    /// Post queued control messages while send slots last.
    fn flush_ctl(&self, st: &mut State, k: u64) {
        let Some(c) = st.conns.get_mut(&k) else {
            return;
        };
        if c.phase == Phase::Resolving || c.cq.is_none() {
            return;
        }
        let mut err = None;
        while !c.ctl_out.is_empty() {
            let Some(slot) = Self::take_send_slot(c) else {
                break;
            };
            let m = c.ctl_out.pop_front().expect("non-empty");
            if let Err(e) = Self::post_buf(c, slot, &m, wr_id(K_CTL, Some(slot), 0)) {
                err = Some(e);
                break;
            }
        }
        if let Some(e) = err {
            let why = format!("ibv_post_send failed on {}: {e}", c.where_());
            self.close_conn(st, k, &why, true);
        }
    }

    /// Copy `m` into send slot `slot` and post it as a SEND.
    fn post_buf(c: &mut RConn, slot: usize, m: &[u8], id: u64) -> std::io::Result<()> {
        let addr = RConn::buf_addr(&c.send_mr, slot, BUF);
        let mr = c.send_mr.as_ref().expect("send buffers");
        debug_assert!(m.len() <= BUF);
        // The slot is ours until its completion; copy the message in.
        mr.write_at(addr, m);
        let flags = verbs::SIGNALED
            | if m.len() as u32 <= c.caps.inline {
                verbs::INLINE
            } else {
                0
            };
        let wr = [verbs::SendWr {
            wr_id: id,
            opcode: verbs::OP_SEND,
            flags,
            sge: verbs::sge(addr, m.len() as u32, mr.lkey()),
            remote: verbs::Remote::None,
        }];
        c.id()
            .post_send(&wr)
            .inspect_err(|_| c.send_free.push(slot))?;
        c.sq_used += 1;
        Ok(())
    }

    /// Post what the queue allows: the head operation until it is fully posted, then
    /// the next. Returns the number of work requests posted.
    fn issue(&self, st: &mut State, k: u64) -> usize {
        self.flush_ctl(st, k);
        let mut posted = 0;
        loop {
            let Some(c) = st.conns.get_mut(&k) else {
                return posted;
            };
            if c.phase != Phase::Up || c.queue.is_empty() {
                return posted;
            }
            match self.issue_head(st, k) {
                Ok(0) => return posted,
                Ok(n) => posted += n,
                Err(e) => {
                    let why = match st.conns.get(&k) {
                        Some(c) => format!("ibv_post_send failed on {}: {e}", c.where_()),
                        None => e.to_string(),
                    };
                    self.close_conn(st, k, &why, true);
                    return posted;
                }
            }
        }
    }

    /// Make progress on the head operation; `Ok(0)` when it must wait.
    fn issue_head(&self, st: &mut State, k: u64) -> std::io::Result<usize> {
        let dev_atomics = {
            let c = &st.conns[&k];
            c.dev
                .and_then(|d| st.devs.get(d))
                .is_some_and(|d| d.atomics)
        };
        let now = st.now;
        let c = st.conns.get_mut(&k).expect("conn");
        let shared = c.shared.clone().expect("up connections have a handle");
        let head = c.queue.front().expect("non-empty");
        if head.deadline.is_some_and(|d| d <= now) && c.head.op.is_none() {
            let r = c.queue.pop_front().expect("head");
            shared.finish(
                &r.done,
                Err(Error::Timeout {
                    after: self.core.config.op_timeout,
                }),
            );
            return Ok(1);
        }
        // Timed out while partly posted (or while waiting for room in the posting
        // window): its caller has had `Timeout`, so none of the rest goes out; it leaves
        // the in-flight table once what it posted has completed.
        if let Some(op) = c.head.op
            && c.ops.get(&u64::from(op)).is_some_and(|f| f.timed_out)
        {
            c.queue.pop_front();
            c.head = Head::default();
            Self::try_finish(c, op);
            return Ok(1);
        }
        // Which grant the head needs, and for what.
        let (target, need, len) = match head.kind.access() {
            Some((t, need, len)) => (Some(t), need, len),
            None => (None, Rights::NONE, 0),
        };
        let mut grant = None;
        if let Some(t) = target {
            let kk = (t.region, t.token);
            // The key of the last access first: most runs of operations use one key.
            let found = match c.last_known {
                Some((lk, kn)) if lk == kk => Some(kn),
                _ => c.known.get(&kk).copied(),
            };
            if let Some(kn) = found {
                if kn.expires.is_some_and(|e| e <= now) {
                    c.known.remove(&kk);
                    c.last_known = None;
                } else {
                    grant = Some(kn.info);
                    c.last_known = Some((kk, kn));
                }
            }
            let Some(g) = grant else {
                if !c.asking.values().any(|v| *v == kk) {
                    let req = c.next_req;
                    c.next_req = c.next_req.wrapping_add(1);
                    c.asking.insert(req, kk);
                    c.ctl_out
                        .push_back(ctl::key_req(req, t.region, &t.token, need.bits()));
                    self.flush_ctl(st, k);
                }
                return Ok(0);
            };
            // Checked against the target's own answer: never let the NIC refuse.
            if let Some(e) = refusal(&g, &t, need, len, dev_atomics, || c.where_()) {
                Self::fail_head(c, &shared, e);
                return Ok(1);
            }
        }
        let head = c.queue.front().expect("non-empty");
        match &head.kind {
            OpKind::Fence => {
                if c.ops.is_empty() {
                    let r = c.queue.pop_front().expect("head");
                    shared.finish(&r.done, Ok(0));
                    return Ok(1);
                }
                Ok(0)
            }
            OpKind::Send { .. } => self.issue_send(c, &shared),
            OpKind::Cas { .. } | OpKind::Faa { .. } => {
                let g = grant.expect("checked");
                self.issue_atomic(st, k, &shared, g)
            }
            OpKind::Write { .. } | OpKind::Read { .. } => {
                let g = grant.expect("checked");
                self.issue_rw(st, k, &shared, g)
            }
        }
    }

    fn new_inflight(
        c: &mut RConn,
        (done, deadline): (Arc<Completion>, Option<Instant>),
        shared: &Arc<ConnShared>,
        local: Option<Slice>,
    ) -> u32 {
        let id = c.next_op;
        c.next_op = c.next_op.wrapping_add(1).max(1);
        c.ops.insert(
            u64::from(id),
            Inflight::new((done, deadline), shared, local),
        );
        id
    }

    fn issue_send(&self, c: &mut RConn, shared: &Arc<ConnShared>) -> std::io::Result<usize> {
        let mut posted = 0;
        loop {
            let Some(slot) = Self::take_send_slot(c) else {
                return Ok(posted);
            };
            let head = c.queue.front().expect("head");
            let OpKind::Send { data } = &head.kind else {
                unreachable!("issue_send on a send");
            };
            let total = data.len();
            let at = c.head.posted as usize;
            let n = (total - at).min(BUF - 1);
            let last = at + n == total;
            let mut m = Vec::with_capacity(n + 1);
            m.push(if last { ctl::MSG_END } else { ctl::MSG_MORE });
            m.extend_from_slice(&data[at..at + n]);
            let who = (head.done.clone(), head.deadline);
            let op = match c.head.op {
                Some(op) => op,
                None => {
                    let op = Self::new_inflight(c, who, shared, None);
                    let f = c.ops.get_mut(&u64::from(op)).expect("new");
                    f.bytes = total as u64;
                    f.what = Some(C::message_bytes_sent);
                    f.needs_ack = true;
                    c.unacked.push_back(op);
                    c.head = Head {
                        op: Some(op),
                        posted: 0,
                    };
                    op
                }
            };
            Self::post_buf(c, slot, &m, wr_id(K_OP, Some(slot), op))?;
            c.ops.get_mut(&u64::from(op)).expect("op").wrs += 1;
            c.head.posted += n as u64;
            posted += 1;
            if last {
                c.queue.pop_front();
                c.head = Head::default();
                shared.count(C::messages_sent, 1);
                return Ok(posted);
            }
        }
    }

    fn issue_atomic(
        &self,
        st: &mut State,
        k: u64,
        shared: &Arc<ConnShared>,
        g: GrantInfo,
    ) -> std::io::Result<usize> {
        let c = st.conns.get_mut(&k).expect("conn");
        if c.sq_used >= c.caps.send_wr || c.atomic_free.is_empty() {
            return Ok(0);
        }
        let head = &c.queue.front().expect("head").kind;
        if let Some(e) = word_order_refusal(c.peer_be_words, head, || c.where_()) {
            let req = c.queue.pop_front().expect("head");
            shared.finish(&req.done, Err(e));
            return Ok(1);
        }
        let slot = c.atomic_free.pop().expect("non-empty");
        let req = c.queue.pop_front().expect("head");
        let (t, opcode, compare_add, swap) = match req.kind {
            OpKind::Cas {
                target,
                expected,
                new,
            } => {
                let w = |v| peer_word(c.peer_be_words, v);
                (target, verbs::OP_CAS, w(expected), w(new))
            }
            OpKind::Faa { target, add } => (target, verbs::OP_FAA, add, 0),
            _ => unreachable!("issue_atomic on an atomic"),
        };
        let op = Self::new_inflight(c, (req.done.clone(), req.deadline), shared, None);
        let mr = c.atomic_mr.as_ref().expect("atomic buffers");
        let wr = [verbs::SendWr {
            wr_id: wr_id(K_OP, Some(slot), op),
            opcode,
            flags: verbs::SIGNALED,
            sge: verbs::sge(mr.addr() + (slot * 8) as u64, 8, mr.lkey()),
            remote: verbs::Remote::Atomic {
                addr: g.addr + t.offset,
                rkey: g.rkey,
                compare_add,
                swap,
            },
        }];
        if let Err(e) = c.id().post_send(&wr) {
            c.atomic_free.push(slot);
            c.ops.remove(&u64::from(op));
            shared.finish(
                &req.done,
                Err(Error::io(
                    "ibv_post_send",
                    std::io::Error::new(e.kind(), e.to_string()),
                )),
            );
            return Err(e);
        }
        c.sq_used += 1;
        let f = c.ops.get_mut(&u64::from(op)).expect("op");
        f.wrs = 1;
        f.atomic = Some(slot);
        f.grant = Some(g.grant);
        Ok(1)
    }

    fn issue_rw(
        &self,
        st: &mut State,
        k: u64,
        shared: &Arc<ConnShared>,
        g: GrantInfo,
    ) -> std::io::Result<usize> {
        let (local, t, notify, is_write, di, inline_max) = {
            let c = &st.conns[&k];
            let (local, t, notify, is_write) = match &c.queue.front().expect("head").kind {
                OpKind::Write {
                    local,
                    target,
                    notify,
                } => (local.clone(), *target, *notify, true),
                OpKind::Read { local, target } => (local.clone(), *target, None, false),
                _ => unreachable!("issue_rw on a write or read"),
            };
            let di = c.dev.expect("up connections have a device");
            (local, t, notify, is_write, di, c.caps.inline as usize)
        };
        let small_inline = is_write && local.len() <= inline_max;
        // The local registration (cached per device and memory); inline data needs none.
        let lkey = if small_inline || local.len() == 0 {
            0
        } else {
            match self.local_mr(st, di, local.mem()) {
                Ok(l) => l,
                Err(e) => {
                    Self::fail_head(st.conns.get_mut(&k).expect("conn"), shared, e);
                    return Ok(1);
                }
            }
        };
        let mut wrs = std::mem::take(&mut st.wrs);
        wrs.clear();
        let r = Self::post_rw(
            st,
            k,
            shared,
            g,
            (local, t, notify, is_write),
            (lkey, small_inline),
            &mut wrs,
        );
        st.wrs = wrs;
        r
    }

    /// Post as much of the head read or write as the send queue takes, into `wrs`.
    fn post_rw(
        st: &mut State,
        k: u64,
        shared: &Arc<ConnShared>,
        g: GrantInfo,
        (local, t, notify, is_write): (Slice, Target, Option<u32>, bool),
        (lkey, small_inline): (u32, bool),
        wrs: &mut Vec<verbs::SendWr>,
    ) -> std::io::Result<usize> {
        let c = st.conns.get_mut(&k).expect("conn");
        let head = c.queue.front().expect("head");
        let total = local.len() as u64;
        let op = match c.head.op {
            Some(op) => op,
            None => {
                let who = (head.done.clone(), head.deadline);
                let op = Self::new_inflight(c, who, shared, Some(local.clone()));
                let f = c.ops.get_mut(&u64::from(op)).expect("new");
                f.bytes = total;
                f.grant = Some(g.grant);
                f.what = Some(if is_write {
                    C::bytes_written
                } else {
                    C::bytes_read
                });
                c.head = Head {
                    op: Some(op),
                    posted: 0,
                };
                op
            }
        };
        // Chain as many chunks as the send queue takes in one post (plus the
        // notification after the last one).
        let room = c.caps.send_wr.saturating_sub(c.sq_used) as usize;
        let mut at = c.head.posted;
        let need_notify = notify.is_some();
        let w = usize::from(is_write);
        let budget = window(is_write).saturating_sub(c.posted[w]);
        let from = at;
        while wrs.len() < room && (at < total || (total == 0 && wrs.is_empty() && at == 0)) {
            let n = (total - at).min(chunk(is_write));
            if at - from + n > budget {
                break;
            }
            wrs.push(rw_wr(
                op,
                is_write,
                small_inline,
                (local.as_ptr() as u64 + at, n as u32, lkey),
                (g.addr + t.offset + at, g.rkey),
            ));
            at += n;
            if total == 0 {
                break;
            }
        }
        let done_all = at >= total;
        let mut notify_slot = None;
        if done_all && let Some(imm) = notify {
            if wrs.len() >= room || c.send_free.is_empty() {
                // Post the data now; the notification waits for room.
                if wrs.is_empty() {
                    return Ok(0);
                }
            } else {
                let slot = c.send_free.pop().expect("non-empty");
                notify_slot = Some((slot, ctl::notify(t.region, t.offset, total, imm)));
            }
        }
        if wrs.is_empty() && notify_slot.is_none() {
            return Ok(0);
        }
        if let Some((slot, m)) = &notify_slot {
            let addr = RConn::buf_addr(&c.send_mr, *slot, BUF);
            let mr = c.send_mr.as_ref().expect("send buffers");
            mr.write_at(addr, m);
            wrs.push(verbs::SendWr {
                wr_id: wr_id(K_OP, Some(*slot), op),
                opcode: verbs::OP_SEND,
                flags: verbs::SIGNALED
                    | if m.len() as u32 <= c.caps.inline {
                        verbs::INLINE
                    } else {
                        0
                    },
                sge: verbs::sge(addr, m.len() as u32, mr.lkey()),
                remote: verbs::Remote::None,
            });
        }
        if let Err(e) = c.id().post_send(wrs) {
            if let Some((slot, _)) = notify_slot {
                c.send_free.push(slot);
            }
            return Err(e);
        }
        c.sq_used += wrs.len() as u32;
        c.posted[w] += at - from;
        c.ops.get_mut(&u64::from(op)).expect("op").wrs += wrs.len() as u32;
        c.head.posted = at;
        let finished = done_all && (!need_notify || notify_slot.is_some());
        if finished {
            c.queue.pop_front();
            c.head = Head::default();
        }
        Ok(wrs.len())
    }

    /// The lkey of a registration covering `mem` on device `di` (registered on first
    /// use, then cached until the memory is released).
    fn local_mr(&self, st: &mut State, di: usize, mem: &Arc<Mem>) -> Result<u32> {
        let key = (di, mem.ptr_at(0) as usize, mem.len());
        if let Some((k, l)) = st.last_local
            && k == key
        {
            return Ok(l);
        }
        if let Some(m) = st.local.get(&key) {
            st.last_local = Some((key, m.lkey()));
            return Ok(m.lkey());
        }
        let a = verbs::access::LOCAL_WRITE;
        let mr = st.devs[di]
            .pd
            .reg(mem, 0, mem.len(), a)
            .map_err(|e| io("ibv_reg_mr", e))?;
        self.registrations.fetch_add(1, Ordering::Relaxed);
        let l = mr.lkey();
        st.local.insert(key, mr);
        Ok(l)
    }

    // ------------------------------------------------------------------ completions

    fn completions(&self, st: &mut State) -> usize {
        let mut n = 0;
        let keys = st.keys();
        for &k in &keys {
            n += self.completions_of(st, k);
        }
        st.give_back_keys(keys);
        n
    }

    /// Handle the completions of connection `k` that are there.
    #[inline(always)]
    fn completions_of(&self, st: &mut State, k: u64) -> usize {
        let mut wcs = std::mem::take(&mut st.wcs);
        wcs.clear();
        if let Some(cq) = st.conns.get(&k).and_then(|c| c.cq.as_ref()) {
            cq.poll(&mut wcs, 32);
        }
        let n = wcs.len();
        if n > 0 {
            self.handle_wcs(st, k, &wcs, None);
        }
        st.wcs = wcs;
        n
    }

    /// Handle completions of connection `k` in order, but the one at `skip` (handled
    /// already), until one of them ends the connection.
    fn handle_wcs(&self, st: &mut State, k: u64, wcs: &[verbs::Wc], skip: Option<usize>) {
        for (i, wc) in wcs.iter().enumerate() {
            if !st.conns.contains_key(&k) {
                break;
            }
            if Some(i) != skip {
                self.completion(st, k, wc);
            }
        }
    }

    fn completion(&self, st: &mut State, k: u64, wc: &verbs::Wc) {
        let (kind, slot, op) = wr_parts(wc.wr_id);
        if kind == K_RECV {
            return self.received(st, k, slot.unwrap_or(0), wc);
        }
        let c = st.conns.get_mut(&k).expect("conn");
        c.sq_used = c.sq_used.saturating_sub(1);
        let failed = wc.status != verbs::WC_SUCCESS;
        let err = failed.then(|| {
            if wc.status == verbs::WC_REM_ACCESS {
                Error::AccessDenied {
                    reason: format!(
                        "the target's NIC refused the access ({}; vendor error {:#x}): the \
                         registration was withdrawn (key revoked or expired, region dropped)",
                        verbs::wc_status_str(wc.status),
                        wc.vendor_err
                    ),
                }
            } else {
                Error::lost(format!(
                    "work request failed on {}: {} (vendor error {:#x})",
                    c.where_(),
                    verbs::wc_status_str(wc.status),
                    wc.vendor_err
                ))
            }
        });
        if kind == K_CTL {
            if let Some(s) = slot {
                c.send_free.push(s);
            }
        } else if let Some(f) = c.ops.get_mut(&u64::from(op)) {
            f.wrs = f.wrs.saturating_sub(1);
            let rw = match f.what {
                Some(C::bytes_written) => Some(true),
                Some(C::bytes_read) => Some(false),
                _ => None,
            };
            if let (None, Some(is_write)) = (slot, rw) {
                // A chunk of a read or write: its bytes leave the posting window.
                let n = (f.bytes - f.rw_done).min(chunk(is_write));
                f.rw_done += n;
                let p = &mut c.posted[usize::from(is_write)];
                *p = p.saturating_sub(n);
            }
            if let Some(s) = slot {
                if f.atomic == Some(s) {
                    // Freed below with the result.
                } else {
                    c.send_free.push(s);
                }
            }
            if f.error.is_none() {
                f.error = err.as_ref().map(|e| Box::new(clone_err(e)));
            }
            Self::try_finish(c, op);
            if !c.revoke_acks_held.is_empty() {
                self.release_revoke_acks(st, k);
            }
        }
        if failed && wc.status != verbs::WC_FLUSH {
            // The QP is in the error state now: the connection is over.
            let why = err.map(|e| e.to_string()).unwrap_or_default();
            self.close_conn(st, k, &why, true);
        }
    }

    /// Complete operation `op` if nothing of it is outstanding: all of it posted, every
    /// work request completed, and (messages) the peer's acknowledgement in.
    /// Send the `REVOKE_ACK`s held for grants that no operation in flight uses any more.
    fn release_revoke_acks(&self, st: &mut State, k: u64) {
        let Some(c) = st.conns.get_mut(&k) else {
            return;
        };
        let before = c.ctl_out.len();
        let RConn {
            revoke_acks_held,
            ops,
            ctl_out,
            ..
        } = c;
        revoke_acks_held.retain(|&gid| {
            if ops.values().any(|f| f.grant == Some(gid)) {
                return true;
            }
            ctl_out.push_back(ctl::revoke(ctl::REVOKE_ACK, gid));
            false
        });
        if c.ctl_out.len() > before {
            self.flush_ctl(st, k);
        }
    }

    /// Fail the operation at the head of the queue with `e`. One partly posted already
    /// (its grant revoked, expired or refused between its work requests) fails once
    /// the work requests it has out complete, since until then the NIC may still
    /// write into its memory; the queue moves on to the next operation at once.
    fn fail_head(c: &mut RConn, shared: &ConnShared, e: Error) {
        let r = c.queue.pop_front().expect("head");
        let Some(op) = std::mem::take(&mut c.head).op else {
            shared.finish(&r.done, Err(e));
            return;
        };
        if let Some(f) = c.ops.get_mut(&u64::from(op))
            && f.error.is_none()
        {
            f.error = Some(Box::new(e));
        }
        Self::try_finish(c, op);
    }

    fn try_finish(c: &mut RConn, op: u32) {
        let head = c.head.op;
        let std::collections::hash_map::Entry::Occupied(e) = c.ops.entry(u64::from(op)) else {
            return;
        };
        let f = e.get();
        if f.wrs != 0 || f.needs_ack || head == Some(op) {
            return;
        }
        let f = e.remove();
        debug_assert!(
            !c.ops.is_empty() || c.posted == [0; 2],
            "bytes left in the posting window with nothing in flight: {:?}",
            c.posted
        );
        let r = match f.error {
            Some(e) => Err(*e),
            None => {
                if let Some(what) = f.what {
                    f.conn.count(what, f.bytes);
                }
                match f.atomic {
                    Some(s) => Ok(read_atomic_slot(c, s)),
                    None => Ok(0),
                }
            }
        };
        if let Some(s) = f.atomic {
            c.atomic_free.push(s);
        }
        if !f.timed_out {
            f.conn.finish(&f.done, r);
        }
    }

    fn received(&self, st: &mut State, k: u64, slot: usize, wc: &verbs::Wc) {
        if wc.status != verbs::WC_SUCCESS {
            if wc.status != verbs::WC_FLUSH {
                let why = format!(
                    "receive failed: {} (vendor error {:#x})",
                    verbs::wc_status_str(wc.status),
                    wc.vendor_err
                );
                self.close_conn(st, k, &why, true);
            }
            return;
        }
        let c = st.conns.get_mut(&k).expect("conn");
        c.held.push_back((slot, wc.byte_len as usize));
        self.drain_held(st, k);
    }

    /// Handle received buffers in order while the application has room; repost each;
    /// then acknowledge the messages queued.
    fn drain_held(&self, st: &mut State, k: u64) {
        self.drain_held_inner(st, k);
        if let Some(c) = st.conns.get_mut(&k)
            && c.acks_owed > 0
        {
            let n = std::mem::take(&mut c.acks_owed);
            c.ctl_out.push_back(ctl::msg_ack(n));
            self.flush_ctl(st, k);
        }
    }

    fn drain_held_inner(&self, st: &mut State, k: u64) {
        loop {
            let Some(c) = st.conns.get_mut(&k) else {
                return;
            };
            let Some(&(slot, len)) = c.held.front() else {
                c.stalled = false;
                return;
            };
            if c.phase == Phase::Connecting {
                // A SEND can overtake the ESTABLISHED event: keep it until then.
                return;
            }
            let m = read_recv_slot(c, slot, len);
            if let (Some(s), Some(&t)) = (&c.shared, m.first())
                && ((t == ctl::MSG_END && !s.inbox.has_room())
                    || (t == ctl::NOTIFY && !s.notes.has_room()))
            {
                if !c.stalled {
                    c.stalled = true;
                    s.count(C::receive_stalls, 1);
                }
                return;
            }
            c.held.pop_front();
            let repost = (
                wr_id(K_RECV, Some(slot), 0),
                RConn::buf_addr(&c.recv_mr, slot, BUF),
                BUF as u32,
                c.recv_mr.as_ref().map_or(0, |m| m.lkey()),
            );
            if let Err(why) = self.on_message(st, k, &m) {
                self.core.counters.add(C::protocol_errors, 1);
                self.close_conn(st, k, &why, true);
                return;
            }
            let Some(c) = st.conns.get_mut(&k) else {
                return;
            };
            if let Err(e) = c.id().post_recv(&[repost]) {
                let why = format!("ibv_post_recv failed on {}: {e}", c.where_());
                self.close_conn(st, k, &why, true);
                return;
            }
        }
    }

    fn on_message(&self, st: &mut State, k: u64, m: &[u8]) -> std::result::Result<(), String> {
        let c = st.conns.get_mut(&k).expect("conn");
        let Some(&t) = m.first() else {
            return Err("empty message from the peer".into());
        };
        if c.phase == Phase::AuthWait {
            let ok = t == ctl::AUTH
                && m.len() == 1 + crate::auth::PROOF_LEN
                && match (&self.core.config.secret, &c.transcript) {
                    (Some(s), Some(tr)) => s.verify_initiator(tr, &m[1..]),
                    _ => false,
                };
            if !ok {
                self.core.counters.add(C::auth_failures, 1);
                return Err(
                    "the peer's proof does not match this endpoint's cluster secret".into(),
                );
            }
            self.admit(st, k);
            return Ok(());
        }
        let shared = c
            .shared
            .clone()
            .ok_or("message before the connection was up")?;
        match t {
            ctl::MSG_MORE | ctl::MSG_END => {
                let max = self.core.config.max_message_size;
                if c.partial.len() + m.len() - 1 > max {
                    return Err(format!(
                        "the peer sent a message larger than this endpoint's \
                         max_message_size ({max} bytes)"
                    ));
                }
                c.partial.extend_from_slice(&m[1..]);
                if t == ctl::MSG_END {
                    let msg = std::mem::take(&mut c.partial);
                    shared.count(C::messages_received, 1);
                    shared.count(C::message_bytes_received, msg.len() as u64);
                    let n = msg.len();
                    shared.inbox.push_admitted(msg, n);
                    c.acks_owed += 1;
                }
            }
            ctl::NOTIFY => {
                let (region, offset, len, imm) =
                    ctl::parse_notify(m).ok_or("malformed notification")?;
                shared.count(C::notifications, 1);
                // Admitted: `drain_held` checked there was room before taking it.
                shared.notes.push_admitted(
                    Notification {
                        region,
                        offset,
                        len,
                        imm,
                    },
                    0,
                );
            }
            ctl::KEY_REQ => {
                let (req, region, token, need) =
                    ctl::parse_key_req(m).ok_or("malformed key request")?;
                let need = Rights::from_bits(need).ok_or("unknown rights in a key request")?;
                let ans = self.grant_for(st, k, region, token, need);
                let c = st.conns.get_mut(&k).expect("conn");
                c.ctl_out.push_back(ctl::key_ans(req, &ans));
                self.flush_ctl(st, k);
            }
            ctl::KEY_ANS => {
                let (req, ans) = ctl::parse_key_ans(m).ok_or("malformed key answer")?;
                let kk = c
                    .asking
                    .remove(&req)
                    .ok_or("answer to a key request never made")?;
                match ans {
                    KeyAnswer::Granted(g) => {
                        let expires = (g.expires_in_ms > 0)
                            .then(|| Instant::now() + Duration::from_millis(g.expires_in_ms));
                        c.known.insert(kk, Known { info: g, expires });
                    }
                    KeyAnswer::Refused(code, why) => {
                        // Fail every queued operation on this key at the head.
                        while let Some(h) = c.queue.front() {
                            match h.kind.access() {
                                Some((ht, _, len)) if (ht.region, ht.token) == kk => {
                                    let e = match remote_error(
                                        code,
                                        why.clone(),
                                        ht.offset,
                                        len,
                                        h.key_len,
                                    ) {
                                        Error::UnknownRegion { .. } => {
                                            Error::UnknownRegion { region: ht.region }
                                        }
                                        e => e,
                                    };
                                    Self::fail_head(c, &shared, e);
                                }
                                _ => break,
                            }
                        }
                    }
                }
            }
            ctl::MSG_ACK => {
                let n = ctl::parse_msg_ack(m).ok_or("malformed message acknowledgement")?;
                for _ in 0..n {
                    let op = c
                        .unacked
                        .pop_front()
                        .ok_or("acknowledgement of a message never sent")?;
                    if let Some(f) = c.ops.get_mut(&u64::from(op)) {
                        f.needs_ack = false;
                    }
                    Self::try_finish(c, op);
                }
            }
            ctl::REVOKE => {
                let gid = ctl::parse_revoke(m).ok_or("malformed revocation")?;
                c.known.retain(|_, kn| kn.info.grant != gid);
                c.last_known = None;
                // Acknowledged once nothing this side posted under the grant is out: a
                // read posted before the acknowledgement is not done when the target
                // sees it (the target's NIC may still be reading the region for it,
                // and would refuse once the registration is withdrawn).
                // (Sent below, with any freed by a refused key.)
                if !c.revoke_acks_held.contains(&gid) {
                    c.revoke_acks_held.push(gid);
                }
            }
            ctl::REVOKE_ACK => {
                let gid = ctl::parse_revoke(m).ok_or("malformed revocation answer")?;
                if let Some(g) = st.grants.get_mut(&gid) {
                    g.holders.remove(&k);
                }
                self.finish_revocations(st);
            }
            other => return Err(format!("unknown message type {other} from the peer")),
        }
        // A REVOKE holds an acknowledgement, and a refused key fails operations, which
        // may free one.
        if st
            .conns
            .get(&k)
            .is_some_and(|c| !c.revoke_acks_held.is_empty())
        {
            self.release_revoke_acks(st, k);
        }
        st.conns.get(&k).map_or(Ok(()), ctl_backlog)
    }

    // ------------------------------------------------------------------ grants

    /// Target: check a key and hand out (or reuse) its grant's registration on this
    /// connection's device.
    fn grant_for(
        &self,
        st: &mut State,
        k: u64,
        region: u64,
        token: [u8; TOKEN_LEN],
        need: Rights,
    ) -> KeyAnswer {
        let t = Target {
            region,
            offset: 0,
            token,
        };
        let refuse = |code: ErrorCode, why: String| {
            self.core.counters.add(C::remote_ops_refused, 1);
            KeyAnswer::Refused(code, why)
        };
        let view = match self.core.regions.grant(&t, need) {
            Ok(v) => v,
            Err(r) => return refuse(r.code, r.why),
        };
        let di = st.conns[&k].dev.expect("up connections have a device");
        let gid = match st.grant_index.get(&(di, region, token)) {
            Some(&gid) if st.grants.get(&gid).is_some_and(|g| g.revoking.is_none()) => gid,
            _ => {
                let mut a = verbs::access::LOCAL_WRITE;
                if view.rights.contains(Rights::READ) {
                    a |= verbs::access::REMOTE_READ;
                }
                if view.rights.contains(Rights::WRITE) {
                    a |= verbs::access::REMOTE_WRITE;
                }
                if view.rights.contains(Rights::ATOMIC) {
                    a |= verbs::access::REMOTE_ATOMIC;
                }
                let mr = match st.devs[di].pd.reg(&view.mem, 0, view.mem.len(), a) {
                    Ok(mr) => mr,
                    Err(e) => {
                        return refuse(
                            ErrorCode::Other,
                            format!("the target cannot register the region: {e}"),
                        );
                    }
                };
                self.registrations.fetch_add(1, Ordering::Relaxed);
                let gid = st.next_grant;
                st.next_grant += 1;
                st.grants.insert(
                    gid,
                    Grant {
                        dev: di,
                        region,
                        token,
                        expires_ms: view.expires_ms,
                        holders: HashSet::new(),
                        revoking: None,
                        mr,
                    },
                );
                st.grant_index.insert((di, region, token), gid);
                gid
            }
        };
        let g = st.grants.get_mut(&gid).expect("grant");
        g.holders.insert(k);
        if let Some(s) = st.conns.get(&k).and_then(|c| c.shared.as_ref()) {
            s.count(C::remote_ops_served, 1);
        }
        KeyAnswer::Granted(GrantInfo {
            grant: gid,
            addr: g.mr.addr(),
            rkey: g.mr.rkey(),
            len: view.mem.len() as u64,
            rights: view.rights.bits(),
            expires_in_ms: if view.expires_ms == 0 {
                0
            } else {
                view.expires_ms.saturating_sub(now_ms()).max(1)
            },
        })
    }

    fn start_revoke(&self, st: &mut State, gid: u64, wait: Option<Arc<RevokeWait>>) {
        let deadline = Instant::now() + self.core.config.op_timeout.min(REVOKE_GRACE);
        let Some(g) = st.grants.get_mut(&gid) else {
            return;
        };
        let first = g.revoking.is_none();
        let entry = g.revoking.get_or_insert_with(|| (deadline, Vec::new()));
        entry.1.extend(wait);
        st.grant_index.remove(&(g.dev, g.region, g.token));
        if first {
            let holders: Vec<u64> = g.holders.iter().copied().collect();
            for h in holders {
                if let Some(c) = st.conns.get_mut(&h) {
                    c.ctl_out.push_back(ctl::revoke(ctl::REVOKE, gid));
                }
                self.flush_ctl(st, h);
            }
        }
        self.finish_revocations(st);
    }

    /// Deregister every grant under revocation that no peer holds any more.
    fn finish_revocations(&self, st: &mut State) {
        let done: Vec<u64> = st
            .grants
            .iter()
            .filter(|(_, g)| g.revoking.is_some() && g.holders.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for gid in done {
            if let Some(g) = st.grants.remove(&gid) {
                for w in g.revoking.map(|r| r.1).unwrap_or_default() {
                    w.done.store(true, Ordering::SeqCst);
                    w.notify.wake_all();
                }
                // Dropping `g.mr` deregisters: no peer's NIC reaches the region through
                // this grant any more.
            }
        }
    }

    // ------------------------------------------------------------------ timers

    fn tick(&self, st: &mut State, now: Instant) {
        // Connection setup deadlines.
        let late: Vec<u64> = st
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            let t = self.core.config.connect_timeout;
            if st.conns[&k].pending.is_some() {
                self.fail_connect(st, k, Error::Timeout { after: t });
            } else {
                self.close_conn(st, k, "the peer did not finish the handshake in time", true);
            }
        }
        // Operation deadlines.
        // An operation's deadline is stamped at the first tick that sees it (so up to
        // one tick late), which spares every operation a clock read.
        let op_deadline = now + self.core.config.op_timeout;
        for c in st.conns.values_mut() {
            for r in c.queue.iter_mut() {
                r.deadline.get_or_insert(op_deadline);
            }
            for f in c.ops.values_mut() {
                let d = *f.deadline.get_or_insert(op_deadline);
                if !f.timed_out && d <= now {
                    f.timed_out = true;
                    f.conn.finish(
                        &f.done,
                        Err(Error::Timeout {
                            after: self.core.config.op_timeout,
                        }),
                    );
                }
            }
        }
        // Expired grants, and revocations peers did not answer in time.
        let now_wall = now_ms();
        let expired: Vec<u64> = st
            .grants
            .iter()
            .filter(|(_, g)| g.revoking.is_none() && g.expires_ms != 0 && g.expires_ms <= now_wall)
            .map(|(id, _)| *id)
            .collect();
        for gid in expired {
            self.start_revoke(st, gid, None);
        }
        // Peers that did not acknowledge in time (a caller-driven peer that is not
        // driving its engine, a busy or dead one): withdraw the registration anyway.
        // They learn of the revocation from the REVOKE in their receive queue before
        // they post anything new; an access already posted with the old rkey is
        // refused by this side's NIC and ends that peer's connection.
        for g in st.grants.values_mut() {
            if g.revoking.as_ref().is_some_and(|r| r.0 <= now) {
                g.holders.clear();
            }
        }
        self.finish_revocations(st);
        release_unused_registrations(st);
    }

    fn die(&self, why: &str) {
        if !self.is_dead.swap(true, Ordering::SeqCst) {
            *self.dead.lock().expect("dead lock") = Some(why.to_string());
        }
    }
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::AccessDenied { reason } => Error::AccessDenied {
            reason: reason.clone(),
        },
        other => Error::lost(other.to_string()),
    }
}

/// Why the target's answer `g` does not allow this access (`None`: it does), checked
/// before posting so that the NIC never refuses one. `dev` names the device, for the
/// error of an atomic on a device without atomics. Inlined: on the short path, the
/// call would cost more than the check (the errors are built only on a refusal).
#[inline(always)]
fn refusal(
    g: &GrantInfo,
    t: &Target,
    need: Rights,
    len: u64,
    dev_atomics: bool,
    dev: impl FnOnce() -> String,
) -> Option<Error> {
    let granted = Rights::from_bits(g.rights).unwrap_or(Rights::NONE);
    if !granted.contains(need) {
        Some(Error::AccessDenied {
            reason: format!(
                "refused by the target: the key grants {granted}, this access needs {need}"
            ),
        })
    } else if t.offset.checked_add(len).is_none_or(|e| e > g.len) {
        Some(Error::OutOfBounds {
            offset: t.offset,
            len,
            region_len: g.len,
        })
    } else if need == Rights::ATOMIC && !(g.addr + t.offset).is_multiple_of(8) {
        Some(Error::Misaligned { offset: t.offset })
    } else if need == Rights::ATOMIC && !dev_atomics {
        Some(Error::Unsupported {
            reason: format!(
                "the RDMA device {} offers no atomic operations (atomic_cap NONE)",
                dev()
            ),
        })
    } else {
        None
    }
}

/// The work request of one read or write chunk: `len` bytes at `local` to or from the
/// target's `remote` under `rkey`.
fn rw_wr(
    op: u32,
    is_write: bool,
    inline: bool,
    (local, len, lkey): (u64, u32, u32),
    (remote, rkey): (u64, u32),
) -> verbs::SendWr {
    verbs::SendWr {
        wr_id: wr_id(K_OP, None, op),
        opcode: if is_write {
            verbs::OP_WRITE
        } else {
            verbs::OP_READ
        },
        flags: verbs::SIGNALED | if inline { verbs::INLINE } else { 0 },
        sge: verbs::sge(local, len, lkey),
        remote: verbs::Remote::Rdma { addr: remote, rkey },
    }
}

#[inline]
/// Deregister the cached registrations of memory nothing else holds, and forget the
/// last one used (a new region mapped at the same address must not reuse its lkey).
fn release_unused_registrations(st: &mut State) {
    st.local.retain(|_, mr| !mr.only_holder());
    st.last_local = None;
}

/// How long a sleeping engine may wait for an event before its timers need it. While
/// anything is under way (a connection being set up, operations queued or out, control
/// messages or messages not yet acknowledged, a revocation) or work was done since the
/// last tick: the tick. Otherwise nothing but a grant's expiry is due, and an idle
/// engine (a server whose peers access its memory one-sidedly, through its NIC) sleeps
/// until then, or until an event: a completion, a connection event, a submission.
fn sleep_allowance(st: &State) -> Duration {
    let under_way = st.active
        || st.setting_up > 0
        || st.conns.values().any(|c| {
            c.phase != Phase::Up
                || c.deadline.is_some()
                || !c.queue.is_empty()
                || !c.ops.is_empty()
                || !c.ctl_out.is_empty()
                || !c.unacked.is_empty()
        })
        || st.grants.values().any(|g| g.revoking.is_some());
    if under_way {
        return TICK;
    }
    let now = now_ms();
    st.grants
        .values()
        .filter(|g| g.expires_ms != 0)
        .map(|g| Duration::from_millis(g.expires_ms.saturating_sub(now)).max(TICK))
        .min()
        .unwrap_or(Duration::MAX)
}

fn key_of(st: &State, shared: &Arc<ConnShared>) -> Option<u64> {
    st.by_shared
        .get(&shared.id)
        .copied()
        .filter(|k| st.conns.contains_key(k))
}

fn read_recv_slot(c: &RConn, slot: usize, len: usize) -> Vec<u8> {
    let mr = c.recv_mr.as_ref().expect("receive buffers");
    mr.read_at(RConn::buf_addr(&c.recv_mr, slot, BUF), len.min(BUF))
}

fn read_atomic_slot(c: &RConn, slot: usize) -> u64 {
    let mr = c.atomic_mr.as_ref().expect("atomic buffers");
    let b = mr.read_at(mr.addr() + (slot * 8) as u64, 8);
    // The device writes the old value as a host-order integer (see `peer_word`).
    peer_word(
        c.peer_be_words,
        u64::from_ne_bytes(b.try_into().expect("8 bytes")),
    )
}

/// `Err` once the control records waiting for a send buffer pass `MAX_CTL_OUT`.
fn ctl_backlog(c: &RConn) -> std::result::Result<(), String> {
    if c.ctl_out.len() > MAX_CTL_OUT {
        return Err(format!(
            "the peer sent more than {MAX_CTL_OUT} key requests or revocations that wait \
             for answers while it takes no SENDs"
        ));
    }
    Ok(())
}

/// A word between the API and a peer's NIC, either way. The API's values are host-order
/// integers of little-endian memory words; verbs atomics work on words in the byte order
/// of the responder's host (docs/rdma.md, "Atomics"), and return the old word so. For a
/// peer that works on big-endian words a compare-and-swap's operands and its old value
/// are the byte-swapped values: comparing or storing 8 bytes is the same in either
/// order, so the swapped operation is exact. (A fetch-and-add is not: its carries run
/// the other way.)
fn peer_word(peer_be_words: bool, v: u64) -> u64 {
    if peer_be_words { v.swap_bytes() } else { v }
}

/// Why an atomic cannot keep the API's little-endian words on this peer (`None`: it
/// can): a fetch-and-add on a peer whose NIC adds on big-endian words.
fn word_order_refusal(
    peer_be_words: bool,
    op: &OpKind,
    conn: impl FnOnce() -> String,
) -> Option<Error> {
    (peer_be_words && matches!(op, OpKind::Faa { .. })).then(|| Error::Unsupported {
        reason: format!(
            "fetch-and-add on {}: the peer's NIC adds on big-endian words (a big-endian \
             host), which would break the API's little-endian words; use compare-and-swap, \
             which is converted for such peers",
            conn()
        ),
    })
}

impl GrantWatcher for RdmaEngine {
    fn grants_ended(&self, region: u64, token: Option<[u8; TOKEN_LEN]>, wait: bool) {
        let w = wait.then(|| Arc::new(RevokeWait::default()));
        self.push_ctl(Ctl::Revoke(region, token, w.clone()));
        let Some(w) = w else {
            return;
        };
        let deadline = Instant::now() + self.core.config.op_timeout + Duration::from_secs(1);
        let caller = self.core.config.progress == crate::config::Progress::Caller;
        while !w.done.load(Ordering::SeqCst) && Instant::now() < deadline {
            if self.is_dead.load(Ordering::Relaxed) {
                return;
            }
            if caller {
                self.progress();
            } else {
                w.notify.register_thread();
                if !w.done.load(Ordering::SeqCst) {
                    std::thread::park_timeout(Duration::from_millis(1));
                }
            }
        }
    }
}

impl Engine for RdmaEngine {
    fn kind(&self) -> BackendKind {
        BackendKind::Rdma
    }

    fn submit(&self, conn: &Arc<ConnShared>, req: OpReq) -> std::result::Result<(), OpReq> {
        // A caller-driven engine runs on whichever thread holds its state: post at once
        // (behind anything submitted earlier) instead of leaving the operation for the
        // next pass. A small operation is then one post from the call that submits it.
        if self.direct
            && let Ok(mut st) = self.state.try_lock()
        {
            if !self.ops.is_empty() {
                self.take_new_ops(&mut st);
            }
            // What arrived first is handled first, as in a pass: a revocation in the
            // receive queue must be seen before anything is posted with its key.
            let k = key_of(&st, conn);
            if let Some(k) = k {
                self.completions_of(&mut st, k);
            }
            let Some(k) = k.filter(|k| st.conns.contains_key(k)) else {
                conn.finish(&req.done, Err(Error::lost(conn.close_reason())));
                return Ok(());
            };
            match self.post_now(&mut st, k, conn, req) {
                Ok(()) => {}
                Err(req) => {
                    st.conns.get_mut(&k).expect("found").queue.push_back(req);
                    if self.issue(&mut st, k) > 0 {
                        self.completions_of(&mut st, k);
                    }
                }
            }
            // A caller whose operations complete here (or whose waits find them done)
            // may run no pass for a long time: the timers must not depend on passes.
            // Every 256 submissions, read the clock and run what is due.
            st.submits = st.submits.wrapping_add(1);
            if st.submits.is_multiple_of(256) {
                st.now = Instant::now();
                self.cm_due(&mut st);
                self.tick_due(&mut st);
            }
            return Ok(());
        }
        self.ops.push((conn.clone(), req)).map_err(|(_, r)| r)?;
        // Only a progress thread asleep in `park` needs the wake-up (a system call): a
        // caller-driven or spinning engine finds the operation on its next pass.
        if self.sleeps {
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
        let Ok(mut st) = self.state.try_lock() else {
            return 0;
        };
        self.pass(&mut st)
    }

    fn park(&self, max: Duration) {
        let Ok(mut st) = self.state.try_lock() else {
            std::thread::yield_now();
            return;
        };
        if !self.ops.is_empty() || self.ctl_pending.load(Ordering::SeqCst) {
            return;
        }
        for c in st.conns.values() {
            if let Some(cq) = &c.cq {
                cq.arm();
            }
        }
        // Completions that arrived before the CQs were armed raise no event: look once
        // more after arming.
        if self.pass(&mut st) > 0 {
            return;
        }
        let mut fds = vec![
            libc::pollfd {
                fd: self.chan.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.waker.raw(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        for d in &st.devs {
            fds.push(libc::pollfd {
                fd: d.chan.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = max.min(sleep_allowance(&st));
        drop(st);
        let _ = crate::sys::poll_wait(&mut fds, timeout);
        self.waker.drain();
        if let Ok(st) = self.state.try_lock() {
            for d in &st.devs {
                d.chan.drain();
            }
        }
    }

    fn wake(&self) {
        self.waker.signal();
    }

    fn connect(&self, addr: &Address) -> Result<Arc<ConnShared>> {
        let sa = addr.socket_addr();
        let p = Arc::new(Pending::default());
        let nonce = match self.core.config.secret {
            Some(_) => Some(crate::auth::nonce()?),
            None => None,
        };
        self.push_ctl(Ctl::Connect(sa, p.clone(), nonce));
        let me: Arc<dyn Engine> = self.me.upgrade().ok_or(Error::Closed("endpoint"))?;
        let driver = crate::op::Driver::new(
            Arc::from(vec![me]),
            &self.core.config.progress,
            self.core.config.wait,
        );
        let deadline =
            Instant::now() + self.core.config.connect_timeout + Duration::from_millis(200);
        let r = driver.wait(&p.notify, Some(deadline), || {
            p.result.lock().expect("connect result").take()
        })?;
        match r {
            Some(r) => r,
            None => {
                p.abandoned.store(true, Ordering::SeqCst);
                Err(Error::Timeout {
                    after: self.core.config.connect_timeout,
                })
            }
        }
    }

    fn local_addrs(&self) -> Vec<Address> {
        self.local.map(Address::Rdma).into_iter().collect()
    }

    fn shutdown(&self) {
        let mut st = self.state.lock().expect("state lock");
        let keys: Vec<u64> = st.conns.keys().copied().collect();
        for k in keys {
            self.close_conn(&mut st, k, "endpoint closed", true);
        }
        while let Some((conn, req)) = self.ops.pop() {
            conn.finish(&req.done, Err(Error::lost("endpoint closed")));
        }
        for (_, g) in st.grants.drain() {
            for w in g.revoking.map(|r| r.1).unwrap_or_default() {
                w.done.store(true, Ordering::SeqCst);
                w.notify.wake_all();
            }
        }
        st.local.clear();
        st.last_local = None;
        st.listener.take();
        self.die("endpoint closed");
    }

    fn health(&self) -> Result<()> {
        if !self.is_dead.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(Error::lost(
            self.dead
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_default(),
        ))
    }

    fn describe(&self) -> String {
        format!(
            "{}; {} registrations made",
            self.describe.lock().expect("describe lock"),
            self.registrations.load(Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A responder's NIC doing a compare-and-swap on 8 bytes of its memory, reading the
    /// word in its host's byte order, as verbs atomics do.
    fn nic_cas(mem: &mut [u8; 8], be_words: bool, compare: u64, swap: u64) -> u64 {
        let cur = if be_words {
            u64::from_be_bytes(*mem)
        } else {
            u64::from_le_bytes(*mem)
        };
        if cur == compare {
            *mem = if be_words {
                swap.to_be_bytes()
            } else {
                swap.to_le_bytes()
            };
        }
        cur
    }

    #[test]
    fn compare_and_swap_keeps_little_endian_words_on_either_peer() {
        let words = [0, 1, 0x0102_0304_0506_0708, u64::MAX, 0xFF00_0000_0000_0001];
        for be_words in [false, true] {
            for &start in &words {
                for &expected in &words {
                    let new = expected.wrapping_mul(31).wrapping_add(7);
                    let mut mem = start.to_le_bytes();
                    let w = |v| peer_word(be_words, v);
                    let old = w(nic_cas(&mut mem, be_words, w(expected), w(new)));
                    assert_eq!(old, start, "old value, peer be_words={be_words}");
                    let want = if start == expected { new } else { start };
                    assert_eq!(
                        mem,
                        want.to_le_bytes(),
                        "memory after CAS({expected:#x}, {new:#x}) on {start:#x}, \
                         peer be_words={be_words}"
                    );
                }
            }
        }
    }

    #[test]
    fn fetch_and_add_is_refused_only_on_big_endian_words() {
        let target = Target {
            region: 1,
            offset: 8,
            token: [0; TOKEN_LEN],
        };
        let faa = OpKind::Faa { target, add: 1 };
        let cas = OpKind::Cas {
            target,
            expected: 0,
            new: 1,
        };
        let name = || "rxe0 to 10.0.0.2:7000".to_string();
        match word_order_refusal(true, &faa, name) {
            Some(Error::Unsupported { reason }) => {
                assert!(reason.contains("rxe0 to 10.0.0.2:7000"), "{reason}");
                assert!(reason.contains("use compare-and-swap"), "{reason}");
            }
            other => panic!("fetch-and-add on big-endian words: {other:?}"),
        }
        assert!(word_order_refusal(true, &cas, name).is_none());
        assert!(word_order_refusal(false, &faa, name).is_none());
    }

    #[test]
    fn swapped_operands_would_be_wrong_on_a_little_endian_peer() {
        // The conversion is needed only for big-endian peers: applied to a
        // little-endian one it would miss a match (so the flag must be the peer's).
        let mut mem = 5u64.to_le_bytes();
        nic_cas(&mut mem, false, peer_word(true, 5), peer_word(true, 6));
        assert_eq!(mem, 5u64.to_le_bytes());
    }
}
