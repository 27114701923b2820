//! The operation layer of the datagram backends: initiator and target logic over a
//! reliable, unordered message transport. Two-sided messages are numbered and handed to
//! the application in order ([`MsgOrder`]).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{DConn, DgramEngine};
use crate::addr::Address;
use crate::auth;
use crate::backend::{Engine, OpKind, OpReq, remote_error};
use crate::endpoint::{ConnShared, Core, Notification};
use crate::error::Error;
use crate::idmap::IdMap;
use crate::key::Rights;
use crate::op::Completion;
use crate::proto::{Conn as PConn, OutMsg, Payload, Sink};
use crate::region::{cas, faa};
use crate::stats::C;
use crate::sys::mem::Slice;
use crate::wire::{self, Body, ErrorCode, Header, MAX_ERROR_PAYLOAD, Target};

/// The handshake's messages go unsegmented, each in one wire message, and the largest,
/// the HELLO_ACK's answer (our nonce and proof), must fit what every connection carries.
const _: () = assert!(auth::NONCE_LEN + auth::PROOF_LEN <= crate::proto::MIN_SEGMENT);

/// Segments generated ahead into the protocol's queue (the rest wait, unsegmented).
const PUMP_AHEAD: usize = 256;
/// Answers waiting to be sent before a connection stops accepting requests.
const MAX_BACKLOG: usize = 1 << 15;
/// Incoming writes and messages tracked at once per connection.
const MAX_TRACKED: usize = 1 << 14;

/// An operation waiting for its answer.
struct Pending {
    done: Arc<Completion>,
    kind: PKind,
    remote_off: u64,
    len: u64,
    key_len: u64,
    /// A write whose segments are still being generated (its [`Stream`] is queued).
    streaming: bool,
}

enum PKind {
    Write,
    /// Bytes of the read received so far.
    Read(Slice, u64),
    Atomic,
    Send,
}

/// An outgoing byte stream, segmented as the protocol has room.
enum Stream {
    Write {
        op_id: u64,
        target: Target,
        local: Slice,
        notify: Option<u32>,
        off: u64,
    },
    ReadResp {
        op_id: u64,
        data: Slice,
        off: u64,
    },
    Send {
        op_id: u64,
        data: Arc<[u8]>,
        off: usize,
        /// The message's number (`SEND_SEQ`), on a connection that numbers messages.
        seq: Option<u32>,
    },
}

/// Progress of an incoming multi-segment write. Its first segment says what the write
/// is (length, region, where it starts, notification); every segment must say the same.
struct InWrite {
    got: u64,
    len: u64,
    region: u64,
    /// Target offset of the write's first byte (`None`: a segment's offset lies before
    /// its position in the write, refused).
    base: Option<u64>,
    notify: Option<u32>,
    refused: bool,
}

impl InWrite {
    fn describe(len: u64, region: u64, base: Option<u64>, notify: Option<u32>) -> String {
        let at = base.map_or_else(
            || "before offset 0".to_string(),
            |b| format!("at offset {b}"),
        );
        let note = notify.map_or_else(
            || "without notification".to_string(),
            |i| format!("notifying {i}"),
        );
        format!("{len} bytes {at} of region {region}, {note}")
    }
}

/// Reassembly of an incoming message.
struct InSend {
    buf: Vec<u8>,
    /// The length its first segment announced; every segment must announce the same.
    len: u64,
    got: u64,
    refused: bool,
    /// Its number, if it came as `SEND_SEQ`.
    seq: Option<u32>,
}

/// Bytes of a `SEND_SEQ` header: what each segment of a numbered message costs on the
/// wire besides its payload.
const SEND_SEQ_HEADER: usize = wire::PREFIX_LEN + 12;

/// Per-connection message order (`docs/datagram.md`, "Message order"). When both sides
/// announced [`wire::FEATURE_MSG_SEQ`], each numbers the messages it sends 0, 1, 2, …
/// (`SEND_SEQ`), and hands the peer's messages to the application strictly in the order
/// of their numbers: a message that completes before an earlier one waits here.
#[derive(Default)]
struct MsgOrder {
    /// Both sides number their messages.
    numbered: bool,
    /// Number of the next message this side sends.
    send_next: u32,
    /// Number of the next message to hand to the application.
    recv_next: u32,
    /// Complete messages waiting for an earlier one, by number.
    held: BTreeMap<u32, HeldMsg>,
    /// Payload bytes in `held`.
    held_bytes: usize,
    /// What the messages in `held` took on the wire, at least (one `SEND_SEQ` header
    /// and the payload each): an honest peer cannot exceed its receive window with it.
    held_wire: usize,
}

/// A complete message waiting for an earlier one.
struct HeldMsg {
    op_id: u64,
    /// `None` for a refused message (too large): it was answered with an ERROR when it
    /// began; its turn only moves the order on.
    msg: Option<Vec<u8>>,
}

impl MsgOrder {
    /// Whether message `seq` was already delivered or is held: a message number that
    /// comes again.
    fn is_taken(&self, seq: u32) -> bool {
        seq.wrapping_sub(self.recv_next) >= 1 << 31 || self.held.contains_key(&seq)
    }
}

/// Per-connection operation state.
pub(super) struct OpLayer {
    pub(super) shared: Option<Arc<ConnShared>>,
    hello_sent: bool,
    /// Initiator: the nonce our HELLO carried (authenticating connections).
    our_nonce: Option<[u8; auth::NONCE_LEN]>,
    /// Target: where the authentication exchange stands.
    srv_auth: SrvAuth,
    pub(super) handshake_error: Option<Error>,
    next_op: u64,
    pending: IdMap<Pending>,
    timeouts: VecDeque<(Instant, u64)>,
    fence: Option<OpReq>,
    held: VecDeque<(OpReq, Instant)>,
    streams: VecDeque<Stream>,
    /// Messages produced while handling input or admitting ops, queued to the protocol
    /// afterwards.
    outbox: Vec<OutMsg>,
    /// ERRORs to send, likewise: (op id, code, text). Their text is cut to what one
    /// wire message of the connection carries when they are queued (`flush_outbox`).
    errors_out: Vec<(u64, ErrorCode, String)>,
    writes_in: IdMap<InWrite>,
    sends_in: IdMap<InSend>,
    /// Bytes the reassembly buffers of `sends_in` take (the lengths of the messages
    /// begun and not refused).
    sends_reserved: u64,
    order: MsgOrder,
    /// Pause the protocol's receiving (application queues full).
    want_pause: bool,
    /// The peer broke the protocol in a way that ends the connection: why.
    pub(super) violation: Option<String>,
    failed: bool,
}

/// What the engine lends the operation layer while a packet is handled.
pub(super) struct Ctx<'a> {
    pub(super) core: &'a Arc<Core>,
    pub(super) me: &'a Weak<DgramEngine>,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) client: bool,
    pub(super) queued: usize,
    /// Most wire-message bytes the connection's receive window can hold
    /// ([`PConn::receive_window_bytes`]).
    pub(super) window_bytes: usize,
    /// A connection that became established: (its shared state, whether the accept
    /// queue took it).
    pub(super) new_shared: Option<(Arc<ConnShared>, bool)>,
}

fn msg(op_id: u64, body: Body, payload: Payload, len: usize) -> OutMsg {
    OutMsg::new(
        &Header {
            op_id,
            payload_len: len as u32,
            body,
        },
        payload,
    )
}

#[cfg(test)]
thread_local! {
    /// Tests: this thread's initiators leave [`wire::FEATURE_MSG_SEQ`] out of their
    /// HELLO, as a build from before message numbering does.
    pub(super) static LEGACY_HELLO: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What an initiator's HELLO announces besides authentication.
fn msg_seq_feature() -> u32 {
    #[cfg(test)]
    if LEGACY_HELLO.get() {
        return 0;
    }
    wire::FEATURE_MSG_SEQ
}

/// Target side of the authentication exchange.
enum SrvAuth {
    /// Nothing to prove (no secret), or proven.
    Open,
    /// HELLO_ACK with our nonce and proof sent; the initiator's AUTH must come next.
    Proof {
        endpoint: u64,
        max_payload: u32,
        t: auth::Transcript,
    },
    /// Authentication failed: the ERROR is on its way, everything else is dropped.
    Refused,
}

/// A message whose payload is `bytes`.
fn with_bytes(op_id: u64, body: Body, bytes: Vec<u8>) -> OutMsg {
    let n = bytes.len();
    let data: Arc<[u8]> = bytes.into();
    msg(op_id, body, Payload::Shared(data, 0..n), n)
}

fn small(op_id: u64, body: Body) -> OutMsg {
    msg(op_id, body, Payload::None, 0)
}

/// An ERROR whose text is cut to `room` bytes (and to [`MAX_ERROR_PAYLOAD`]): it goes
/// unsegmented, in one wire message.
fn error_msg(op_id: u64, code: ErrorCode, why: &str, room: usize) -> OutMsg {
    let mut t = why.as_bytes().to_vec();
    t.truncate(room.min(MAX_ERROR_PAYLOAD as usize));
    with_bytes(op_id, Body::Error { code }, t)
}

impl OpLayer {
    pub(super) fn new() -> OpLayer {
        OpLayer {
            shared: None,
            hello_sent: false,
            our_nonce: None,
            srv_auth: SrvAuth::Open,
            handshake_error: None,
            next_op: 1,
            pending: IdMap::default(),
            timeouts: VecDeque::new(),
            fence: None,
            held: VecDeque::new(),
            streams: VecDeque::new(),
            outbox: Vec::new(),
            errors_out: Vec::new(),
            writes_in: IdMap::default(),
            sends_in: IdMap::default(),
            sends_reserved: 0,
            order: MsgOrder::default(),
            want_pause: false,
            violation: None,
            failed: false,
        }
    }

    /// [`wire::FEATURE_MSG_SEQ`] if this connection numbers its messages.
    fn seq_feature(&self) -> u32 {
        if self.order.numbered {
            wire::FEATURE_MSG_SEQ
        } else {
            0
        }
    }

    pub(super) fn needs_hello(&self, client: bool) -> bool {
        client && !self.hello_sent
    }

    /// The client's HELLO, once the datagram handshake is done; with a cluster secret
    /// it carries our nonce (see `docs/security.md`).
    pub(super) fn send_hello(&mut self, core: &Core, proto: &mut PConn) {
        self.hello_sent = true;
        let hello = |features| Body::Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::MAX_VERSION,
            endpoint: core.id,
            max_payload: core.config.max_payload(),
            features,
        };
        if core.config.secret.is_none() {
            return proto.queue(small(0, hello(msg_seq_feature())));
        }
        match auth::nonce() {
            Ok(n) => {
                self.our_nonce = Some(n);
                let features = wire::FEATURE_AUTH | msg_seq_feature();
                proto.queue(with_bytes(0, hello(features), n.to_vec()));
            }
            Err(e) => self.handshake_error = Some(e),
        }
    }

    pub(super) fn is_failed(&self) -> bool {
        self.failed || self.shared.is_none()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timeouts.front().map(|(d, _)| *d)
    }

    pub(super) fn sink<'a, 'b>(&'a mut self, ctx: &'a mut Ctx<'b>) -> OpSink<'a, 'b> {
        OpSink { ops: self, ctx }
    }

    /// After a packet: queue what it produced; pause receiving if the application's
    /// queues are full.
    pub(super) fn after_packet(&mut self, proto: &mut PConn) {
        self.flush_outbox(proto);
        if self.want_pause {
            self.want_pause = false;
            if !proto.is_paused()
                && let Some(s) = &self.shared
            {
                s.count(C::receive_stalls, 1);
            }
            proto.set_paused(true);
        }
    }

    fn flush_outbox(&mut self, proto: &mut PConn) {
        for m in self.outbox.drain(..) {
            proto.queue(m);
        }
        let room = proto.max_segment();
        for (op_id, code, why) in self.errors_out.drain(..) {
            proto.queue(error_msg(op_id, code, &why, room));
        }
    }

    /// Answer op `op_id` (0: the connection) with an ERROR.
    fn push_error(&mut self, op_id: u64, code: ErrorCode, why: &str) {
        self.errors_out.push((op_id, code, why.to_string()));
    }

    // ---- initiator ----

    pub(super) fn admit(
        &mut self,
        shared: &Arc<ConnShared>,
        req: OpReq,
        deadline: Instant,
        proto: &mut PConn,
    ) {
        if self.fence.is_some() || !self.held.is_empty() {
            self.held.push_back((req, deadline));
        } else if matches!(req.kind, OpKind::Fence) {
            if self.pending.is_empty() {
                shared.finish(&req.done, Ok(0));
            } else {
                self.fence = Some(req);
            }
        } else {
            self.issue(req, deadline);
        }
        self.flush_outbox(proto);
    }

    fn issue(&mut self, req: OpReq, deadline: Instant) {
        let op_id = self.next_op;
        self.next_op += 1;
        let OpReq {
            kind,
            done,
            key_len,
            ..
        } = req;
        let (pk, remote_off, len) = match kind {
            OpKind::Write {
                local,
                target,
                notify,
            } => {
                let len = local.len() as u64;
                self.streams.push_back(Stream::Write {
                    op_id,
                    target,
                    local,
                    notify,
                    off: 0,
                });
                (PKind::Write, target.offset, len)
            }
            OpKind::Read { local, target } => {
                let len = local.len() as u64;
                self.outbox.push(small(op_id, Body::Read { target, len }));
                (PKind::Read(local, 0), target.offset, len)
            }
            OpKind::Cas {
                target,
                expected,
                new,
            } => {
                self.outbox.push(small(
                    op_id,
                    Body::Cas {
                        target,
                        expected,
                        new,
                    },
                ));
                (PKind::Atomic, target.offset, 8)
            }
            OpKind::Faa { target, add } => {
                self.outbox.push(small(op_id, Body::Faa { target, add }));
                (PKind::Atomic, target.offset, 8)
            }
            OpKind::Send { data } => {
                let len = data.len() as u64;
                let o = &mut self.order;
                let seq = o.numbered.then(|| {
                    let s = o.send_next;
                    o.send_next = s.wrapping_add(1);
                    s
                });
                self.streams.push_back(Stream::Send {
                    op_id,
                    data: data.into(),
                    off: 0,
                    seq,
                });
                (PKind::Send, 0, len)
            }
            OpKind::Fence => unreachable!("fences are handled in admit"),
        };
        self.pending.insert(
            op_id,
            Pending {
                streaming: matches!(pk, PKind::Write),
                done,
                kind: pk,
                remote_off,
                len,
                key_len,
            },
        );
        self.timeouts.push_back((deadline, op_id));
    }

    fn complete(&mut self, op_id: u64, r: crate::error::Result<u64>) {
        let Some(p) = self.pending.remove(&op_id) else {
            return;
        };
        if p.streaming && r.is_ok() {
            // Acknowledged before every segment was sent (only a misbehaving target
            // does that): send no more of it from the caller's memory. After an ERROR the
            // rest still goes: the target tracks the write until all its bytes came, and
            // forgets it only then.
            self.streams
                .retain(|s| !matches!(s, Stream::Write { op_id: id, .. } if *id == op_id));
        }
        if let Some(s) = &self.shared {
            if r.is_ok() {
                match p.kind {
                    PKind::Write => s.count(C::bytes_written, p.len),
                    PKind::Read(..) => s.count(C::bytes_read, p.len),
                    PKind::Send => {
                        s.count(C::messages_sent, 1);
                        s.count(C::message_bytes_sent, p.len);
                    }
                    PKind::Atomic => {}
                }
            }
            s.finish(&p.done, r);
        }
        self.release_fence();
    }

    fn release_fence(&mut self) {
        while self.fence.is_some() && self.pending.is_empty() {
            if let (Some(f), Some(s)) = (self.fence.take(), &self.shared) {
                s.finish(&f.done, Ok(0));
            }
            while let Some((r, deadline)) = self.held.pop_front() {
                if matches!(r.kind, OpKind::Fence) {
                    if self.pending.is_empty() {
                        if let Some(s) = &self.shared {
                            s.finish(&r.done, Ok(0));
                        }
                        continue;
                    }
                    self.fence = Some(r);
                    break;
                }
                self.issue(r, deadline);
            }
        }
    }

    /// The first operation past its deadline, if any, as the reason to close the
    /// connection (the same rule as the tcp backend: a timed-out operation may still be
    /// in flight, so its connection goes).
    pub(super) fn expire(&mut self, now: Instant, after: Duration) -> Option<String> {
        while let Some(&(d, op_id)) = self.timeouts.front() {
            if d > now {
                return None;
            }
            self.timeouts.pop_front();
            if let Some(p) = self.pending.remove(&op_id) {
                if let Some(s) = &self.shared {
                    s.finish(&p.done, Err(Error::Timeout { after }));
                }
                return Some(format!(
                    "an operation timed out after {after:?}; the connection was closed so \
                     that nothing still in flight touches memory after its deadline"
                ));
            }
        }
        None
    }

    /// Generate segments of the outgoing streams while the protocol has room.
    pub(super) fn pump(&mut self, proto: &mut PConn) {
        self.flush_outbox(proto);
        let seg = proto.max_segment() as u64;
        while proto.queued() < PUMP_AHEAD && proto.can_queue() {
            let Some(s) = self.streams.front_mut() else {
                break;
            };
            let done = match s {
                Stream::Write {
                    op_id,
                    target,
                    local,
                    notify,
                    off,
                } => {
                    let total = local.len() as u64;
                    let n = seg.min(total - *off);
                    let part = local.sub(*off, n).expect("segment inside the source");
                    proto.queue(msg(
                        *op_id,
                        Body::Write {
                            target: Target {
                                region: target.region,
                                offset: target.offset + *off,
                                token: target.token,
                            },
                            op_len: total,
                            op_off: *off,
                            notify: *notify,
                        },
                        if n > 0 {
                            Payload::Region(part)
                        } else {
                            Payload::None
                        },
                        n as usize,
                    ));
                    *off += n;
                    *off >= total
                }
                Stream::ReadResp { op_id, data, off } => {
                    let total = data.len() as u64;
                    let n = seg.min(total - *off);
                    let part = data.sub(*off, n).expect("segment inside the region");
                    proto.queue(msg(
                        *op_id,
                        Body::ReadResp {
                            op_len: total,
                            op_off: *off,
                        },
                        if n > 0 {
                            Payload::Region(part)
                        } else {
                            Payload::None
                        },
                        n as usize,
                    ));
                    *off += n;
                    *off >= total
                }
                Stream::Send {
                    op_id,
                    data,
                    off,
                    seq,
                } => {
                    let total = data.len();
                    let n = (seg as usize).min(total - *off);
                    let body = match *seq {
                        // A message is at most the peer's max_payload, a u32.
                        Some(seq) => Body::SendSeq {
                            seq,
                            msg_len: total as u32,
                            msg_off: *off as u32,
                        },
                        None => Body::Send {
                            msg_len: total as u64,
                            msg_off: *off as u64,
                        },
                    };
                    proto.queue(msg(
                        *op_id,
                        body,
                        if n > 0 {
                            Payload::Shared(data.clone(), *off..*off + n)
                        } else {
                            Payload::None
                        },
                        n,
                    ));
                    *off += n;
                    *off >= total
                }
            };
            if done
                && let Some(Stream::Write { op_id, .. }) = self.streams.pop_front()
                && let Some(p) = self.pending.get_mut(&op_id)
            {
                p.streaming = false;
            }
        }
    }
}

/// Fail everything pending on a closing connection.
pub(super) fn fail_conn(c: &mut DConn, reason: &str) {
    let ops = &mut c.ops;
    if ops.failed {
        return;
    }
    ops.failed = true;
    if let Some(s) = ops.shared.clone() {
        s.mark_closed(reason);
        let err = || Error::lost(reason.to_string());
        for (_, p) in ops.pending.drain() {
            s.finish(&p.done, Err(err()));
        }
        if let Some(f) = ops.fence.take() {
            s.finish(&f.done, Err(err()));
        }
        for (r, _) in ops.held.drain(..) {
            s.finish(&r.done, Err(err()));
        }
    }
    ops.timeouts.clear();
    ops.streams.clear();
    ops.outbox.clear();
    ops.errors_out.clear();
    ops.writes_in.clear();
    ops.sends_in.clear();
    ops.sends_reserved = 0;
    // Messages held back for an earlier one are never delivered: the application would
    // see a gap in the order. Messages already delivered stay readable.
    let held = std::mem::take(&mut ops.order.held);
    let discarded = held.values().filter(|h| h.msg.is_some()).count();
    if discarded > 0
        && let Some(s) = &ops.shared
    {
        tracing::debug!(
            "discarding {discarded} messages held for an earlier one that never came: {reason}"
        );
        s.count(C::messages_discarded, discarded as u64);
    }
    ops.order.held_bytes = 0;
    ops.order.held_wire = 0;
}

/// A sink that takes nothing (for repeated INITs).
pub(super) struct NoSink;

impl Sink for NoSink {
    fn can_accept(&mut self, _: &[(Header, &[u8])]) -> bool {
        false
    }
    fn deliver(&mut self, _: Header, _: &[u8]) {}
}

/// Whether a packet the initiator receives before the target's HELLO_ACK carries
/// something other than keepalives ahead of the HELLO_ACK (or a refusal).
fn overtakes_hello_ack(msgs: &[(Header, &[u8])]) -> bool {
    for (h, _) in msgs {
        match h.body {
            Body::HelloAck { .. } | Body::Error { .. } => return false,
            Body::Ping => {}
            _ => return true,
        }
    }
    false
}

/// The operation layer seen as the protocol's sink for one packet.
pub(super) struct OpSink<'a, 'b> {
    ops: &'a mut OpLayer,
    ctx: &'a mut Ctx<'b>,
}

impl Sink for OpSink<'_, '_> {
    fn can_accept(&mut self, msgs: &[(Header, &[u8])]) -> bool {
        let o = &mut *self.ops;
        // Before the initiator's proof, hold back (unacknowledged, so the peer sends
        // them again) operations that overtook it; a packet that opens with the proof
        // is taken whole.
        if matches!(o.srv_auth, SrvAuth::Proof { .. })
            && msgs.first().is_some_and(|(h, _)| h.body != Body::Auth)
            && msgs.iter().any(|(h, _)| h.body != Body::Ping)
        {
            return false;
        }
        if self.ctx.queued + o.outbox.len() + o.errors_out.len() + o.streams.len() > MAX_BACKLOG {
            return false;
        }
        if o.writes_in.len() >= MAX_TRACKED || o.sends_in.len() >= MAX_TRACKED {
            return false;
        }
        // Before its HELLO_ACK, the initiator holds back (unacknowledged) whatever
        // overtook it: the target's first messages would otherwise be taken and lost.
        if o.shared.is_none() && self.ctx.client && overtakes_hello_ack(msgs) {
            return false;
        }
        if let Some(s) = &o.shared {
            let wants_room = msgs.iter().any(|(h, _)| {
                matches!(
                    h.body,
                    Body::Send { .. }
                        | Body::SendSeq { .. }
                        | Body::Write {
                            notify: Some(_),
                            ..
                        }
                )
            });
            if wants_room && !(s.inbox.has_room() && s.notes.has_room()) {
                // The application is behind: pause until it takes something.
                o.want_pause = true;
                return false;
            }
            // Messages held back for an earlier one count against the same limits. Past
            // them, only a packet that carries part of the message everything waits for
            // is taken (so the gap closes; pausing would wait for the application, which
            // has nothing to read); the others come again later.
            let ord = &o.order;
            if wants_room
                && !ord.held.is_empty()
                && !s.inbox.has_room_with(ord.held.len(), ord.held_bytes)
                && !msgs.iter().any(
                    |(h, _)| matches!(h.body, Body::SendSeq { seq, .. } if seq == ord.recv_next),
                )
            {
                return false;
            }
        }
        true
    }

    fn deliver(&mut self, h: Header, payload: &[u8]) {
        let Some(shared) = self.ops.shared.clone() else {
            return self.handshake(h, payload);
        };
        let o = &mut *self.ops;
        if o.violation.is_some() {
            // The connection closes after this packet: nothing more of it is taken.
            shared.count(C::drops, 1);
            return;
        }
        let core = self.ctx.core;
        let op_id = h.op_id;
        match h.body {
            Body::Hello { .. } | Body::HelloAck { .. } | Body::Auth => shared.count(C::drops, 1),
            Body::Write {
                target,
                op_len,
                op_off,
                notify,
            } => {
                let plen = payload.len() as u64;
                let base = target.offset.checked_sub(op_off);
                let e = o.writes_in.entry(op_id).or_insert_with(|| InWrite {
                    got: 0,
                    len: op_len,
                    region: target.region,
                    base,
                    notify,
                    refused: false,
                });
                if (e.len, e.region, e.base, e.notify) != (op_len, target.region, base, notify) {
                    // Each segment is authorized on its own, and the notification names
                    // the write the first segment described: segments that describe
                    // another one would complete a write whose notification names bytes
                    // never written. The peer is cut off, never followed.
                    shared.count(C::drops, 1);
                    shared.count(C::protocol_errors, 1);
                    shared.count(C::errors, 1);
                    o.violation = Some(format!(
                        "inconsistent WRITE segments: operation {op_id} began as {}, then a \
                         segment described {}",
                        InWrite::describe(e.len, e.region, e.base, e.notify),
                        InWrite::describe(op_len, target.region, base, notify)
                    ));
                    return;
                }
                let mut refusal = None;
                if base.is_none() {
                    refusal = Some((
                        ErrorCode::Protocol,
                        format!(
                            "inconsistent WRITE segment: bytes from {op_off} of the write \
                             at offset {}",
                            target.offset
                        ),
                    ));
                } else if op_len > core.config.max_op_size {
                    refusal = Some((
                        ErrorCode::TooLarge,
                        format!(
                            "write of {op_len} bytes exceeds this endpoint's limit of {}",
                            core.config.max_op_size
                        ),
                    ));
                } else {
                    match core.regions.authorize(&target, Rights::WRITE, plen, false) {
                        Ok(slice) => {
                            let _ = slice.copy_in(0, payload);
                            shared.count(C::bytes_placed, plen);
                            shared.count(C::bytes_copied_in_user_space, plen);
                        }
                        Err(r) => refusal = Some((r.code, r.why)),
                    }
                }
                if let Some((code, why)) = refusal
                    && !e.refused
                {
                    e.refused = true;
                    shared.count(C::remote_ops_refused, 1);
                    // (The field itself: `e` borrows the in-flight writes.)
                    o.errors_out.push((op_id, code, why));
                }
                e.got = e.got.saturating_add(plen);
                if e.got >= e.len {
                    let e = o.writes_in.remove(&op_id).expect("entry exists");
                    if !e.refused {
                        shared.count(C::remote_ops_served, 1);
                        if let (Some(imm), Some(offset)) = (e.notify, e.base) {
                            let _ = shared.notes.push(Notification {
                                region: e.region,
                                offset,
                                len: e.len,
                                imm,
                            });
                            shared.count(C::notifications, 1);
                        }
                        o.outbox.push(small(op_id, Body::Ack));
                    }
                }
            }
            Body::Read { target, len } => {
                if len > core.config.max_op_size {
                    shared.count(C::remote_ops_refused, 1);
                    let why = format!(
                        "read of {len} bytes exceeds this endpoint's limit of {}",
                        core.config.max_op_size
                    );
                    o.push_error(op_id, ErrorCode::TooLarge, &why);
                    return;
                }
                match core.regions.authorize(&target, Rights::READ, len, false) {
                    Ok(slice) => {
                        shared.count(C::remote_ops_served, 1);
                        shared.count(C::bytes_served, len);
                        o.streams.push_back(Stream::ReadResp {
                            op_id,
                            data: slice,
                            off: 0,
                        });
                    }
                    Err(r) => {
                        shared.count(C::remote_ops_refused, 1);
                        o.push_error(op_id, r.code, &r.why);
                    }
                }
            }
            Body::ReadResp { op_len, op_off } => {
                let done = match o.pending.get_mut(&op_id) {
                    Some(Pending {
                        kind: PKind::Read(local, got),
                        len,
                        ..
                    }) if *len == op_len => match local.sub(op_off, payload.len() as u64) {
                        Some(dst) => {
                            let _ = dst.copy_in(0, payload);
                            shared.count(C::bytes_copied_in_user_space, payload.len() as u64);
                            *got += payload.len() as u64;
                            *got >= *len
                        }
                        None => {
                            shared.count(C::protocol_errors, 1);
                            false
                        }
                    },
                    Some(_) => {
                        shared.count(C::protocol_errors, 1);
                        false
                    }
                    None => {
                        // A late answer to an operation that already failed.
                        shared.count(C::drops, 1);
                        false
                    }
                };
                if done {
                    o.complete(op_id, Ok(0));
                }
            }
            Body::Cas {
                target,
                expected,
                new,
            } => atomic(o, &shared, core, op_id, &target, |a| cas(a, expected, new)),
            Body::Faa { target, add } => atomic(o, &shared, core, op_id, &target, |a| faa(a, add)),
            Body::AtomicResp { old } => match o.pending.get(&op_id).map(|p| &p.kind) {
                Some(PKind::Atomic) => o.complete(op_id, Ok(old)),
                _ => shared.count(C::drops, 1),
            },
            Body::Send { msg_len, msg_off } => {
                if o.order.numbered {
                    return o.refuse_message(&shared, op_id, "a SEND without its number");
                }
                let window = self.ctx.window_bytes;
                o.message_segment(
                    &shared, core, window, op_id, None, msg_len, msg_off, payload,
                );
            }
            Body::SendSeq {
                seq,
                msg_len,
                msg_off,
            } => {
                if !o.order.numbered {
                    return o.refuse_message(&shared, op_id, "SEND_SEQ, which was not agreed on");
                }
                if o.order.is_taken(seq) {
                    // Only a peer that numbers two messages alike gets here: duplicate
                    // datagrams never reach the operation layer.
                    tracing::debug!(
                        peer = %self.ctx.peer,
                        "dropping a segment of message {seq}, which was already delivered or is held"
                    );
                    shared.count(C::drops, 1);
                    shared.count(C::protocol_errors, 1);
                    return;
                }
                let (len, off) = (u64::from(msg_len), u64::from(msg_off));
                let window = self.ctx.window_bytes;
                if let Some(done) =
                    o.message_segment(&shared, core, window, op_id, Some(seq), len, off, payload)
                {
                    o.in_order(&shared, seq, done, window);
                }
            }
            Body::Ack => match o.pending.get(&op_id).map(|p| &p.kind) {
                Some(PKind::Write) | Some(PKind::Send) => o.complete(op_id, Ok(0)),
                _ => shared.count(C::drops, 1),
            },
            Body::Error { code } => {
                let text = String::from_utf8_lossy(payload).into_owned();
                if op_id == 0 {
                    o.handshake_error = Some(Error::Protocol(format!(
                        "the peer reported: {code:?}: {text}"
                    )));
                    return;
                }
                let err = match o.pending.get(&op_id) {
                    Some(p) => remote_error(code, text, p.remote_off, p.len, p.key_len),
                    None => {
                        shared.count(C::drops, 1);
                        return;
                    }
                };
                o.complete(op_id, Err(err));
            }
            Body::Ping | Body::Pong | Body::Goodbye { .. } => {}
        }
    }
}

impl OpLayer {
    /// Take one segment of an incoming message. Returns the message once complete if it
    /// is numbered (`None` inside: refused); an unnumbered one is delivered at once.
    /// `window_bytes`: what the receive window carries ([`Ctx::window_bytes`]).
    #[allow(clippy::too_many_arguments)]
    fn message_segment(
        &mut self,
        shared: &ConnShared,
        core: &Core,
        window_bytes: usize,
        op_id: u64,
        seq: Option<u32>,
        msg_len: u64,
        msg_off: u64,
        payload: &[u8],
    ) -> Option<HeldMsg> {
        let max = core.config.max_message_size as u64;
        let e = match self.sends_in.entry(op_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let refused = msg_len > max;
                if !refused {
                    // The first segment sizes the message's buffer. An honest sender
                    // segments its messages in order, and what it has in flight fits the
                    // receive window, so the messages begun and unfinished at once span
                    // at most the window plus one message at either end of it.
                    let limit = (window_bytes as u64).saturating_add(2 * max);
                    let reserved = self.sends_reserved.saturating_add(msg_len);
                    if reserved > limit {
                        shared.count(C::drops, 1);
                        shared.count(C::protocol_errors, 1);
                        shared.count(C::errors, 1);
                        self.violation = Some(format!(
                            "the peer began messages it has not finished that would take \
                             {reserved} bytes to reassemble (message {op_id} of {msg_len} \
                             bytes the latest), more than its receive window ({window_bytes} \
                             bytes) and two messages of the largest size ({max} bytes each) \
                             can hold"
                        ));
                        return None;
                    }
                    self.sends_reserved = reserved;
                }
                v.insert(InSend {
                    buf: Vec::new(),
                    len: msg_len,
                    got: 0,
                    refused,
                    seq,
                })
            }
        };
        if e.seq != seq {
            shared.count(C::drops, 1);
            shared.count(C::protocol_errors, 1);
            return None;
        }
        if e.len != msg_len {
            // The buffer was sized (and the limit checked) by the first segment: a
            // peer that changes the length mid-message is cut off, never followed.
            let first = e.len;
            shared.count(C::drops, 1);
            shared.count(C::protocol_errors, 1);
            shared.count(C::errors, 1);
            self.violation = Some(format!(
                "the peer announced message segments of operation {op_id} as parts of \
                 {first} bytes, then of {msg_len}"
            ));
            return None;
        }
        if e.refused {
            if e.got == 0 {
                let why = format!("message of {msg_len} bytes exceeds the limit of {max}");
                // (The field itself: `e` borrows the incoming messages.)
                self.errors_out.push((op_id, ErrorCode::TooLarge, why));
            }
        } else {
            if e.buf.len() as u64 != msg_len {
                e.buf.resize(msg_len as usize, 0);
            }
            let at = msg_off as usize;
            e.buf[at..at + payload.len()].copy_from_slice(payload);
        }
        e.got = e.got.saturating_add(payload.len() as u64).max(1);
        if e.got < msg_len {
            return None;
        }
        let e = self.sends_in.remove(&op_id).expect("entry exists");
        if !e.refused {
            self.sends_reserved -= e.len;
        }
        let done = HeldMsg {
            op_id,
            msg: (!e.refused).then_some(e.buf),
        };
        if seq.is_some() {
            return Some(done);
        }
        self.hand_over(shared, done);
        None
    }

    /// Numbered message `seq` is complete: deliver it if it is next, with the held
    /// messages that follow it; else hold it until the earlier ones are in.
    fn in_order(&mut self, shared: &ConnShared, seq: u32, m: HeldMsg, window_bytes: usize) {
        let o = &mut self.order;
        if o.is_taken(seq) {
            // Two messages under one number, the first delivered or held meanwhile.
            shared.count(C::drops, 1);
            shared.count(C::protocol_errors, 1);
            return;
        }
        if seq != o.recv_next {
            let bytes = m.msg.as_ref().map_or(0, Vec::len);
            o.held_bytes += bytes;
            o.held_wire += SEND_SEQ_HEADER + bytes;
            o.held.insert(seq, m);
            if o.held_wire > window_bytes {
                // Everything held arrived in packets of the receive window (the
                // message they wait for is in a packet not yet received, and an honest
                // sender segments messages in order), so it cannot take more than the
                // window: the peer numbers messages it never sends.
                shared.count(C::protocol_errors, 1);
                shared.count(C::errors, 1);
                self.violation = Some(format!(
                    "the peer made this side hold {} messages ({} bytes) for message {}, \
                     more than its receive window carries",
                    o.held.len(),
                    o.held_wire,
                    o.recv_next
                ));
            }
            return;
        }
        o.recv_next = o.recv_next.wrapping_add(1);
        self.hand_over(shared, m);
        while !self.order.held.is_empty() {
            let o = &mut self.order;
            let Some(m) = o.held.remove(&o.recv_next) else {
                break;
            };
            let bytes = m.msg.as_ref().map_or(0, Vec::len);
            o.held_bytes -= bytes;
            o.held_wire -= SEND_SEQ_HEADER + bytes;
            o.recv_next = o.recv_next.wrapping_add(1);
            self.hand_over(shared, m);
        }
    }

    /// Queue a complete message for the application and acknowledge it (its sender's
    /// `send` completes). A refused one was answered when it began.
    fn hand_over(&mut self, shared: &ConnShared, m: HeldMsg) {
        if let Some(buf) = m.msg {
            let n = buf.len();
            shared.count(C::messages_received, 1);
            shared.count(C::message_bytes_received, n as u64);
            shared.inbox.push_admitted(buf, n);
            self.outbox.push(small(m.op_id, Body::Ack));
        }
    }

    /// Refuse a message segment that breaks what the two sides agreed on at setup.
    fn refuse_message(&mut self, shared: &ConnShared, op_id: u64, what: &str) {
        shared.count(C::protocol_errors, 1);
        shared.count(C::remote_ops_refused, 1);
        let why = if self.order.numbered {
            format!("{what} on a connection that numbers its messages")
        } else {
            format!("{what}: this connection does not number its messages")
        };
        self.push_error(op_id, ErrorCode::Protocol, &why);
    }
}

fn atomic(
    o: &mut OpLayer,
    shared: &ConnShared,
    core: &Core,
    op_id: u64,
    target: &Target,
    f: impl FnOnce(&std::sync::atomic::AtomicU64) -> u64,
) {
    match core.regions.authorize(target, Rights::ATOMIC, 8, true) {
        Ok(slice) => match slice.mem().atomic_u64(slice.offset() as u64) {
            Ok(a) => {
                let old = f(a);
                shared.count(C::remote_ops_served, 1);
                o.outbox.push(small(op_id, Body::AtomicResp { old }));
            }
            Err(e) => {
                shared.count(C::remote_ops_refused, 1);
                o.push_error(op_id, ErrorCode::Misaligned, &e.to_string());
            }
        },
        Err(r) => {
            shared.count(C::remote_ops_refused, 1);
            o.push_error(op_id, r.code, &r.why);
        }
    }
}

impl OpSink<'_, '_> {
    /// Messages before the connection is established: HELLO and AUTH (target), HELLO_ACK
    /// or ERROR (initiator).
    fn handshake(&mut self, h: Header, payload: &[u8]) {
        let core = self.ctx.core;
        match h.body {
            _ if matches!(self.ops.srv_auth, SrvAuth::Refused) => {
                core.counters.add(C::drops, 1);
            }
            Body::Auth if !self.ctx.client => self.on_auth(payload),
            Body::Hello {
                min_version,
                max_version,
                endpoint,
                max_payload,
                features,
            } if !self.ctx.client && matches!(self.ops.srv_auth, SrvAuth::Open) => {
                self.ops.order.numbered = features & wire::FEATURE_MSG_SEQ != 0;
                let version = max_version.min(wire::MAX_VERSION);
                if version < min_version.max(wire::MIN_VERSION) {
                    let why = format!(
                        "no common wire version: the peer speaks {min_version}..={max_version}, \
                         this endpoint {}..={}",
                        wire::MIN_VERSION,
                        wire::MAX_VERSION
                    );
                    tracing::warn!(peer = %self.ctx.peer, "{why}");
                    self.ops.push_error(0, ErrorCode::UnsupportedVersion, &why);
                    return;
                }
                let Some(secret) = core.config.secret.clone() else {
                    // No secret here: accept (an initiator that asked to authenticate
                    // gets no proof back and refuses the connection itself).
                    return self.establish(endpoint, max_payload, Some(version));
                };
                if features & wire::FEATURE_AUTH == 0 || payload.len() != auth::NONCE_LEN {
                    return self.refuse(
                        "this endpoint accepts only peers holding the cluster secret: \
                         configure the same secret on the connecting side \
                         (EndpointConfig::secret)",
                    );
                }
                let (t, answer) = match auth::answer_initiator(&secret, payload, endpoint, core.id)
                {
                    Ok(a) => a,
                    Err(e) => return self.refuse(&e.to_string()),
                };
                self.ops.outbox.push(with_bytes(
                    0,
                    Body::HelloAck {
                        version,
                        endpoint: core.id,
                        max_payload: core.config.max_payload(),
                        features: wire::FEATURE_AUTH | self.ops.seq_feature(),
                    },
                    answer,
                ));
                self.ops.srv_auth = SrvAuth::Proof {
                    endpoint,
                    max_payload,
                    t,
                };
            }
            Body::HelloAck {
                version,
                endpoint,
                max_payload,
                features,
            } if self.ctx.client => {
                let o = &mut *self.ops;
                if !(wire::MIN_VERSION..=wire::MAX_VERSION).contains(&version) {
                    o.handshake_error = Some(Error::VersionMismatch {
                        ours_min: wire::MIN_VERSION,
                        ours_max: wire::MAX_VERSION,
                        theirs_min: version,
                        theirs_max: version,
                    });
                    return;
                }
                match auth::check_target(
                    core.config.secret.as_ref(),
                    o.our_nonce,
                    features & wire::FEATURE_AUTH != 0,
                    payload,
                    core.id,
                    endpoint,
                ) {
                    Ok(Some(proof)) => o.outbox.push(with_bytes(0, Body::Auth, proof.to_vec())),
                    Ok(None) => {}
                    Err(e) => {
                        core.counters.add(C::auth_failures, 1);
                        o.handshake_error = Some(e);
                        return;
                    }
                }
                // Our HELLO asked for numbered messages; the answer says whether the
                // target numbers them too (one that does not know the bit leaves it out).
                o.order.numbered = features & wire::FEATURE_MSG_SEQ != 0;
                self.establish(endpoint, max_payload, None);
            }
            Body::Error { code } if h.op_id == 0 => {
                let text = String::from_utf8_lossy(payload).into_owned();
                if code == ErrorCode::AuthFailed {
                    core.counters.add(C::auth_failures, 1);
                }
                self.ops.handshake_error = Some(match code {
                    ErrorCode::Busy => Error::Busy(text),
                    ErrorCode::AuthFailed => {
                        Error::AuthFailed(format!("the peer refused us: {text}"))
                    }
                    _ => Error::Protocol(format!("the peer refused the connection: {text}")),
                });
            }
            Body::Ping => {}
            other => {
                tracing::debug!(
                    peer = %self.ctx.peer,
                    "dropping {:?} before the connection is established",
                    other.opcode()
                );
                core.counters.add(C::protocol_errors, 1);
            }
        }
    }

    /// Target: the initiator's proof.
    fn on_auth(&mut self, proof: &[u8]) {
        let SrvAuth::Proof {
            endpoint,
            max_payload,
            t,
        } = self.ops.srv_auth
        else {
            return self.refuse("AUTH without an authenticating HELLO");
        };
        let ok = self
            .ctx
            .core
            .config
            .secret
            .as_ref()
            .is_some_and(|s| s.verify_initiator(&t, proof));
        if !ok {
            return self.refuse(
                "the peer's proof does not match this endpoint's cluster secret: the two \
                 ends have different secrets",
            );
        }
        self.ops.srv_auth = SrvAuth::Open;
        self.establish(endpoint, max_payload, None);
    }

    /// Target: refuse a peer that did not authenticate. It never reaches a region; it
    /// gets an ERROR naming why, and the connection closes when it resets it (or falls
    /// silent).
    fn refuse(&mut self, why: &str) {
        tracing::warn!(peer = %self.ctx.peer, "refusing connection: {why}");
        self.ctx.core.counters.add(C::auth_failures, 1);
        self.ctx.core.counters.add(C::errors, 1);
        self.ops.srv_auth = SrvAuth::Refused;
        self.ops.push_error(0, ErrorCode::AuthFailed, why);
    }

    /// The connection is established (authenticated, or nothing needed proving). On
    /// the target it joins the accept queue; `ack` is the version to answer a HELLO with
    /// (none when the HELLO_ACK already went out with our proof).
    fn establish(&mut self, endpoint: u64, max_payload: u32, ack: Option<u8>) {
        let core = self.ctx.core;
        let Some(me) = self.ctx.me.upgrade() else {
            return;
        };
        let engine: Arc<dyn Engine> = me;
        let kind = engine.kind();
        let shared = ConnShared::new(
            core.next_conn_id(),
            core.clone(),
            engine,
            endpoint,
            Address::Udp(self.ctx.local).with_backend(kind),
            Address::Udp(self.ctx.peer).with_backend(kind),
            max_payload,
        );
        let o = &mut *self.ops;
        if self.ctx.client {
            o.shared = Some(shared.clone());
            self.ctx.new_shared = Some((shared, true));
            return;
        }
        let accepted = core.accepted.push(shared.clone()).is_ok();
        if accepted {
            if let Some(version) = ack {
                let features = o.seq_feature();
                o.outbox.push(small(
                    0,
                    Body::HelloAck {
                        version,
                        endpoint: core.id,
                        max_payload: core.config.max_payload(),
                        features,
                    },
                ));
            }
            tracing::debug!(peer = %self.ctx.peer, "accepted");
            o.shared = Some(shared.clone());
        } else {
            let why = "too many connections waiting to be accepted";
            shared.mark_closed(why);
            tracing::warn!(peer = %self.ctx.peer, "refusing connection: {why}");
            o.push_error(0, ErrorCode::Busy, why);
        }
        self.ctx.new_shared = Some((shared, accepted));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_text_is_cut_to_what_one_wire_message_carries() {
        // A peer that accepts only the smallest datagram a connection works with: an
        // ERROR with a long text still goes, cut, in one datagram of that size.
        let small = crate::proto::min_datagram(false);
        let init = crate::proto::packet::Init {
            conn_id: 3,
            first_seq: 0,
            max_datagram: small as u32,
            window: 64,
            flags: 0,
        };
        let cfg = crate::proto::Config {
            max_datagram: 1472,
            ..crate::proto::Config::default()
        };
        let now = Instant::now();
        let mut proto = PConn::server(cfg, 5, 0, &init, now);
        let mut o = OpLayer::new();
        o.push_error(7, ErrorCode::Protocol, &"x".repeat(600));
        o.flush_outbox(&mut proto);
        assert_eq!(proto.queued(), 1);
        let mut sizes = Vec::new();
        let mut d = Vec::new();
        while proto.poll_transmit(now, &mut d) {
            sizes.push(d.len());
        }
        assert!(sizes.len() >= 2, "the INIT_ACK and the ERROR: {sizes:?}");
        assert!(
            sizes.iter().all(|&n| n <= small),
            "{sizes:?} against {small}"
        );
    }

    #[test]
    fn message_numbers_wrap_around() {
        let mut o = MsgOrder {
            recv_next: u32::MAX - 1,
            ..MsgOrder::default()
        };
        assert!(!o.is_taken(u32::MAX - 1), "the next one");
        assert!(!o.is_taken(u32::MAX));
        assert!(!o.is_taken(3), "ahead, past the wrap");
        assert!(o.is_taken(u32::MAX - 2), "delivered");
        assert!(
            o.is_taken(u32::MAX / 2),
            "too far ahead to tell from delivered"
        );
        o.held.insert(
            3,
            HeldMsg {
                op_id: 9,
                msg: None,
            },
        );
        assert!(o.is_taken(3), "held");
    }
}
