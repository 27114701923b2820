//! The reliable datagram protocol, sans I/O.
//!
//! [`Conn`] turns a stream of wire messages into datagrams and back, reliably: packet
//! numbers (32-bit, wrapping), cumulative plus selective ACKs, retransmission on an
//! RTT-estimated timeout and fast retransmit on SACK evidence, a receive window, window
//! congestion control ([`recovery::Cc`]), keepalives and dead-peer detection. It owns no
//! socket and reads no clock: the caller passes every datagram in, asks for datagrams
//! to send ([`Conn::poll_transmit`]), and passes `now` to everything (the quinn-proto
//! model), so the same code runs over kernel UDP, AF_XDP and the simulated link.
//!
//! Messages are delivered **at most once and possibly out of order**: each DATA packet
//! is processed on arrival (duplicates are recognised by packet number), which is what
//! lets one-sided writes be placed straight at their offset without a reassembly buffer.
//! Ordering, where the API promises it, is the operation layer's business: `fence` on the
//! initiator, and the numbering of two-sided messages (`SEND_SEQ`) on the receiver.

pub(crate) mod mac;
pub(crate) mod packet;
pub(crate) mod recovery;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys::mem::Slice;
use crate::wire::{Body, Header, Limits, MAX_HEADER_LEN};

use packet::{AckBlock, Init, Kind, Packet, ResetReason, SackRange, seq_lt};
use recovery::{Cc, Rtt};

/// Largest receive window (packets beyond the cumulative ACK).
pub(crate) const MAX_WINDOW: u32 = 1 << 14;

/// Tunables of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Largest datagram sent or accepted (the UDP payload; link MTU minus 28 for IPv4).
    pub(crate) max_datagram: usize,
    /// Packets accepted beyond the cumulative ACK.
    pub(crate) window: u32,
    /// Congestion window at the start, in packets.
    pub(crate) initial_cwnd: u32,
    pub(crate) initial_rtt: Duration,
    pub(crate) min_rto: Duration,
    pub(crate) max_rto: Duration,
    /// Longest an ACK is held back hoping to ride on data.
    pub(crate) max_ack_delay: Duration,
    /// Silence after which a PING is sent.
    pub(crate) keepalive: Duration,
    /// Silence after which the peer is declared dead.
    pub(crate) dead_after: Duration,
    /// Messages queued for sending before `can_queue` says no.
    pub(crate) max_queue: usize,
    /// The cluster secret: session keys for per-datagram integrity derive from it.
    pub(crate) secret: Option<crate::auth::Secret>,
    /// Initiator: ask for per-datagram integrity. Target: refuse peers that do not.
    pub(crate) integrity: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_datagram: 1472,
            window: 1024,
            initial_cwnd: 32,
            initial_rtt: Duration::from_millis(1),
            min_rto: Duration::from_millis(2),
            max_rto: Duration::from_secs(1),
            max_ack_delay: Duration::from_micros(200),
            keepalive: Duration::from_secs(1),
            dead_after: Duration::from_secs(10),
            max_queue: 1 << 16,
            secret: None,
            integrity: false,
        }
    }
}

/// Payload bytes of a message to send.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    None,
    /// Bytes of a region (kept alive by the slice).
    Region(Slice),
    /// Bytes of a shared buffer, `range` of it.
    Shared(Arc<[u8]>, std::ops::Range<usize>),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::Region(s) => s.len(),
            Payload::Shared(_, r) => r.len(),
        }
    }

    fn append_to(&self, out: &mut Vec<u8>) {
        match self {
            Payload::None => {}
            Payload::Region(s) => {
                let at = out.len();
                out.resize(at + s.len(), 0);
                // In bounds by construction of the slice; a failure leaves zeros, which
                // cannot happen for a valid slice.
                let _ = s.mem().copy_out(s.offset(), &mut out[at..]);
            }
            Payload::Shared(b, r) => out.extend_from_slice(&b[r.clone()]),
        }
    }
}

/// Where [`Conn::poll_transmit`] writes a datagram: a flat buffer (payloads copied in)
/// or a gather list (payloads referenced where they live).
pub(crate) trait Out {
    /// Header bytes are appended here.
    fn head(&mut self) -> &mut Vec<u8>;
    /// Append a payload; returns how many bytes were copied to do so.
    fn payload(&mut self, p: &Payload) -> usize;
    fn clear(&mut self);
    /// Call once the datagram is complete.
    fn finish(&mut self) {}
    /// Feed every byte written so far to `h`.
    fn hash_into(&self, h: &mut blake3::Hasher);
    fn out_len(&self) -> usize;
}

impl Out for Vec<u8> {
    fn head(&mut self) -> &mut Vec<u8> {
        self
    }
    fn payload(&mut self, p: &Payload) -> usize {
        p.append_to(self);
        p.len()
    }
    fn clear(&mut self) {
        Vec::clear(self);
    }
    fn hash_into(&self, h: &mut blake3::Hasher) {
        h.update(self);
    }
    fn out_len(&self) -> usize {
        self.len()
    }
}

impl Out for crate::sys::net::Datagram {
    fn head(&mut self) -> &mut Vec<u8> {
        &mut self.head
    }
    fn payload(&mut self, p: &Payload) -> usize {
        match p {
            Payload::None => {}
            Payload::Region(s) => self.push_region(s.clone()),
            Payload::Shared(b, r) => self.push_shared(b.clone(), r.clone()),
        }
        0
    }
    fn clear(&mut self) {
        crate::sys::net::Datagram::clear(self);
    }
    fn finish(&mut self) {
        crate::sys::net::Datagram::finish(self);
    }
    fn hash_into(&self, h: &mut blake3::Hasher) {
        self.for_each_piece(|b| {
            h.update(b);
        });
    }
    fn out_len(&self) -> usize {
        self.len()
    }
}

/// A wire message to deliver reliably.
#[derive(Debug, Clone)]
pub(crate) struct OutMsg {
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    payload: Payload,
}

impl OutMsg {
    pub(crate) fn new(h: &Header, payload: Payload) -> OutMsg {
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut hdr);
        debug_assert_eq!(h.payload_len as usize, payload.len());
        OutMsg {
            hdr,
            hdr_len: n as u8,
            payload,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.hdr_len as usize + self.payload.len()
    }
}

/// Where a connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// Client: INIT sent, waiting for INIT_ACK.
    Connecting,
    Established,
    /// Done; the reason says why. Nothing more is sent (except a RESET, once).
    Closed(String),
}

/// Counters of one connection, for reports.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProtoStats {
    pub(crate) packets_sent: u64,
    pub(crate) packets_received: u64,
    pub(crate) retransmits: u64,
    pub(crate) lost: u64,
    pub(crate) timeouts: u64,
    /// Duplicate, out-of-window, refused or malformed datagrams dropped.
    pub(crate) dropped: u64,
    pub(crate) malformed: u64,
    pub(crate) duplicates: u64,
    /// Datagrams whose integrity tag was missing or wrong.
    pub(crate) integrity_failures: u64,
    /// Payload bytes copied into flat datagram buffers.
    pub(crate) bytes_copied: u64,
}

/// What the layer above does with the messages of one DATA packet.
pub(crate) trait Sink {
    /// Whether every message can be taken now (room in queues). If not, the packet is
    /// dropped unacknowledged and the peer will send it again.
    fn can_accept(&mut self, msgs: &[(Header, &[u8])]) -> bool;
    /// Take one message.
    fn deliver(&mut self, h: Header, payload: &[u8]);
}

#[derive(Debug)]
struct Sent {
    seq: u32,
    /// Transmission counter of the latest (re)transmission: unlike the packet number it
    /// never repeats, so loss detection can tell a retransmission from the original.
    order: u64,
    time: Instant,
    msgs: Vec<OutMsg>,
    acked: bool,
    /// Declared lost and waiting in `retx`.
    lost: bool,
    retransmitted: bool,
}

/// Receive-side duplicate filter over `[base, base + window)`.
#[derive(Debug)]
struct RecvWindow {
    base: u32,
    slots: Vec<bool>,
    /// Highest packet number received (for SACK generation).
    highest: u32,
}

impl RecvWindow {
    fn new(first: u32, window: u32) -> RecvWindow {
        // A power of two, so that slot indices stay contiguous across packet-number
        // wraparound.
        let w = window.clamp(2, MAX_WINDOW).next_power_of_two();
        RecvWindow {
            base: first,
            slots: vec![false; w as usize],
            highest: first.wrapping_sub(1),
        }
    }

    fn w(&self) -> u32 {
        self.slots.len() as u32
    }

    fn idx(&self, seq: u32) -> usize {
        (seq % self.w()) as usize
    }

    /// Classify `seq`: `Ok(())` if new and inside the window.
    fn check(&self, seq: u32) -> Result<(), Drop> {
        if seq_lt(seq, self.base) {
            return Err(Drop::Duplicate);
        }
        if seq.wrapping_sub(self.base) >= self.w() {
            return Err(Drop::OutOfWindow);
        }
        if self.slots[self.idx(seq)] {
            return Err(Drop::Duplicate);
        }
        Ok(())
    }

    /// Record `seq` (which passed `check`); returns whether it was in order.
    fn mark(&mut self, seq: u32) -> bool {
        let in_order = seq == self.base;
        let i = self.idx(seq);
        self.slots[i] = true;
        if seq_lt(self.highest, seq) {
            self.highest = seq;
        }
        while self.slots[self.idx(self.base)] {
            let i = self.idx(self.base);
            self.slots[i] = false;
            self.base = self.base.wrapping_add(1);
        }
        in_order
    }

    fn sack(&self) -> Vec<SackRange> {
        let mut ranges = Vec::new();
        if !seq_lt(self.base, self.highest.wrapping_add(1)) {
            return ranges;
        }
        let span = self
            .highest
            .wrapping_sub(self.base)
            .wrapping_add(1)
            .min(self.w());
        let mut prev_end = self.base;
        let mut i = 0;
        while i < span && ranges.len() < packet::MAX_SACK {
            let s = self.base.wrapping_add(i);
            if self.slots[self.idx(s)] {
                let start = s;
                while i < span && self.slots[self.idx(self.base.wrapping_add(i))] {
                    i += 1;
                }
                let len = self.base.wrapping_add(i).wrapping_sub(start);
                ranges.push(SackRange {
                    gap: start.wrapping_sub(prev_end).min(u32::from(u16::MAX)) as u16,
                    len: len.min(u32::from(u16::MAX)) as u16,
                });
                prev_end = start.wrapping_add(len);
            } else {
                i += 1;
            }
        }
        ranges
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    Duplicate,
    OutOfWindow,
}

/// One reliable datagram connection.
#[derive(Debug)]
pub(crate) struct Conn {
    cfg: Config,
    local_id: u32,
    remote_id: u32,
    client: bool,
    state: State,
    /// Our first packet number (sent in INIT / INIT_ACK).
    first_seq: u32,
    max_datagram: usize,
    // send side
    next_seq: u32,
    queue: VecDeque<OutMsg>,
    sent: VecDeque<Sent>,
    retx: VecDeque<u32>,
    /// Packets sent and neither acknowledged nor declared lost.
    inflight: u32,
    rtt: Rtt,
    cc: Cc,
    peer_cum: u32,
    peer_window: u32,
    largest_acked: Option<u32>,
    /// Transmission counter: the next `Sent::order`.
    tx_order: u64,
    /// Highest `order` acknowledged so far.
    largest_acked_order: Option<u64>,
    rto_at: Option<Instant>,
    rto_backoff: u32,
    // receive side
    rx: Option<RecvWindow>,
    ack_pending: u32,
    ack_first: Option<Instant>,
    ack_now: bool,
    paused: bool,
    // liveness
    last_recv: Instant,
    last_ping: Instant,
    handshake_at: Option<Instant>,
    handshake_backoff: u32,
    send_init_ack: bool,
    reset_pending: Option<ResetReason>,
    /// Our integrity nonce, sent in INIT / INIT_ACK (integrity asked for or granted).
    mac_nonce: Option<[u8; mac::NONCE_LEN]>,
    /// Session keys, once both nonces are known.
    keys: Option<mac::Keys>,
    /// Closed because the two ends could not agree on integrity or its keys.
    auth_failed: bool,
    pub(crate) stats: ProtoStats,
    /// Tests: packets the SACK ranges of the ACKs so far made [`Conn::on_ack`] look at.
    #[cfg(test)]
    sack_steps: u64,
}

fn header_overhead() -> usize {
    packet::PREFIX_LEN + packet::MAX_ACK_LEN
}

/// Payload every connection's wire messages have room for: the layer above sends its
/// handshake answer (a nonce and a proof, 64 bytes; checked at compile time there) in
/// one message, and cuts its error texts to fit one.
pub(crate) const MIN_SEGMENT: usize = 64;

/// Smallest `max_datagram` a connection works with: room for the datagram's headers,
/// the integrity tag if it has one, and one wire message with [`MIN_SEGMENT`] bytes of
/// payload.
pub(crate) fn min_datagram(integrity: bool) -> usize {
    let tag = if integrity { mac::TAG_LEN } else { 0 };
    header_overhead() + tag + MAX_HEADER_LEN + MIN_SEGMENT
}

/// Why the parameters of an `INIT` (or `INIT_ACK`) cannot make a connection, if they
/// cannot: a `max_datagram` that leaves no room for a message (and the integrity tag,
/// when the sender asks for it).
pub(crate) fn init_refusal(init: &Init) -> Option<String> {
    let integrity = init.flags & packet::INIT_MAC != 0;
    let min = min_datagram(integrity);
    ((init.max_datagram as usize) < min).then(|| {
        format!(
            "the peer announced a max_datagram of {} bytes, less than the {min} bytes a \
             datagram{} needs for its headers and a message of {MIN_SEGMENT} bytes",
            init.max_datagram,
            if integrity {
                " with per-datagram integrity"
            } else {
                ""
            }
        )
    })
}

/// Why a connection that asked for per-datagram integrity was refused.
const INTEGRITY_REFUSED: &str = "the peer refused per-datagram integrity: it has no \
     cluster secret (configure the same secret on both ends)";
/// Why a connection that did not ask for per-datagram integrity was refused.
const INTEGRITY_REQUIRED: &str = "the peer requires per-datagram integrity: \
     configure the same cluster secret here and turn datagram_integrity on";
/// Why a connection whose INIT_ACK did not verify was abandoned.
const INTEGRITY_MISMATCH: &str = "the peer's INIT_ACK does not verify under this \
     endpoint's cluster secret: the two ends have different secrets (or the datagram was \
     forged)";

impl Conn {
    /// A client connection: sends INIT until INIT_ACK arrives.
    pub(crate) fn client(cfg: Config, local_id: u32, first_seq: u32, now: Instant) -> Conn {
        let mut c = Conn::new(cfg, local_id, 0, true, first_seq, now);
        c.state = State::Connecting;
        c.handshake_at = Some(now);
        c
    }

    /// A server connection answering `init` (from the peer's INIT).
    pub(crate) fn server(
        cfg: Config,
        local_id: u32,
        first_seq: u32,
        init: &Init,
        now: Instant,
    ) -> Conn {
        let mut c = Conn::new(cfg, local_id, init.conn_id, false, first_seq, now);
        c.accept_params(init);
        c.state = State::Established;
        c.send_init_ack = true;
        c
    }

    fn new(
        cfg: Config,
        local_id: u32,
        remote_id: u32,
        client: bool,
        first_seq: u32,
        now: Instant,
    ) -> Conn {
        let window = cfg.window.clamp(1, MAX_WINDOW);
        Conn {
            rtt: Rtt::new(cfg.initial_rtt, cfg.min_rto, cfg.max_rto),
            cc: Cc::new(cfg.initial_cwnd, window),
            max_datagram: cfg.max_datagram,
            local_id,
            remote_id,
            client,
            state: State::Established,
            first_seq,
            next_seq: first_seq,
            queue: VecDeque::new(),
            sent: VecDeque::new(),
            retx: VecDeque::new(),
            inflight: 0,
            peer_cum: first_seq,
            peer_window: 1,
            largest_acked: None,
            tx_order: 0,
            largest_acked_order: None,
            rto_at: None,
            rto_backoff: 0,
            rx: None,
            ack_pending: 0,
            ack_first: None,
            ack_now: false,
            paused: false,
            last_recv: now,
            last_ping: now,
            handshake_at: None,
            handshake_backoff: 0,
            send_init_ack: false,
            reset_pending: None,
            mac_nonce: None,
            keys: None,
            auth_failed: false,
            stats: ProtoStats::default(),
            #[cfg(test)]
            sack_steps: 0,
            cfg: Config { window, ..cfg },
        }
    }

    fn accept_params(&mut self, init: &Init) {
        self.remote_id = init.conn_id;
        self.rx = Some(RecvWindow::new(init.first_seq, self.cfg.window));
        self.peer_window = init.window.clamp(1, MAX_WINDOW);
        // Peers announcing less are refused (`init_refusal`); the floor keeps
        // `max_segment` at `MIN_SEGMENT` or more whatever comes.
        let integrity = init.flags & packet::INIT_MAC != 0 || self.mac_nonce.is_some();
        self.max_datagram = self
            .cfg
            .max_datagram
            .min(init.max_datagram as usize)
            .max(min_datagram(integrity));
    }

    /// Initiator: ask for per-datagram integrity, with our fresh `nonce`. Only before
    /// the INIT goes out.
    pub(crate) fn request_integrity(&mut self, nonce: [u8; mac::NONCE_LEN]) {
        debug_assert!(self.client && self.state == State::Connecting);
        self.mac_nonce = Some(nonce);
    }

    /// Target: grant the integrity the INIT asked for with `their` nonce; `ours` goes
    /// back in INIT_ACK. `false` (and nothing changes) without a secret.
    pub(crate) fn grant_integrity(
        &mut self,
        their: [u8; mac::NONCE_LEN],
        ours: [u8; mac::NONCE_LEN],
    ) -> bool {
        let Some(secret) = &self.cfg.secret else {
            return false;
        };
        let b = mac::Binding {
            initiator_nonce: their,
            target_nonce: ours,
            initiator_conn: self.remote_id,
            target_conn: self.local_id,
        };
        self.keys = Some(mac::Keys::derive(secret, &b, false));
        self.mac_nonce = Some(ours);
        true
    }

    /// Whether datagrams of this connection carry integrity tags (asked for or
    /// granted).
    pub(crate) fn has_integrity(&self) -> bool {
        self.mac_nonce.is_some()
    }

    pub(crate) fn local_id(&self) -> u32 {
        self.local_id
    }

    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Largest message (header plus payload) that fits one datagram.
    pub(crate) fn max_message(&self) -> usize {
        let tag = if self.has_integrity() {
            mac::TAG_LEN
        } else {
            0
        };
        self.max_datagram.saturating_sub(header_overhead() + tag)
    }

    /// Most bytes of wire messages the packets of the receive window can carry: what
    /// this side may have taken from the peer beyond its cumulative ACK.
    pub(crate) fn receive_window_bytes(&self) -> usize {
        self.rx
            .as_ref()
            .map_or(0, |rx| rx.w() as usize * self.max_message())
    }

    /// Largest payload a single wire message can carry.
    pub(crate) fn max_segment(&self) -> usize {
        self.max_message().saturating_sub(MAX_HEADER_LEN)
    }

    /// Whether the send queue has room (the layer above holds back otherwise).
    pub(crate) fn can_queue(&self) -> bool {
        self.queue.len() < self.cfg.max_queue
    }

    /// Messages waiting to be packetised.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queue a message for reliable delivery.
    pub(crate) fn queue(&mut self, m: OutMsg) {
        debug_assert!(m.len() <= self.max_message());
        if !self.is_closed() {
            self.queue.push_back(m);
        }
    }

    /// Stop (or resume) accepting data: the receive window shrinks to 0, so the peer
    /// stops sending until it reopens.
    pub(crate) fn set_paused(&mut self, paused: bool) {
        if self.paused != paused {
            self.paused = paused;
            self.ack_now = true;
        }
    }

    /// The connection's settings.
    #[cfg(feature = "bench-internals")]
    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    /// The peer's id for this connection (0 before it is known).
    pub(crate) fn remote_id(&self) -> u32 {
        self.remote_id
    }

    /// Whether this side opened the connection.
    pub(crate) fn is_client(&self) -> bool {
        self.client
    }

    /// Whether receiving is paused ([`set_paused`](Conn::set_paused)).
    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    /// Close locally: the peer gets a RESET.
    pub(crate) fn close(&mut self, reason: &str) {
        if !self.is_closed() {
            self.state = State::Closed(reason.to_string());
            if self.remote_id != 0 {
                self.reset_pending = Some(ResetReason::Closed);
            }
        }
    }

    /// Fail for want of agreement on integrity: the connection was never usable.
    fn fail_auth(&mut self, reason: &str) {
        if !self.is_closed() {
            self.auth_failed = true;
        }
        self.fail(reason.to_string());
    }

    /// Whether the connection closed because integrity could not be agreed (a refusal
    /// or keys that do not match): an authentication failure, not a network one.
    pub(crate) fn failed_authentication(&self) -> bool {
        self.auth_failed
    }

    fn fail(&mut self, reason: String) {
        if !self.is_closed() {
            tracing::debug!(conn = self.local_id, "datagram connection failed: {reason}");
            self.state = State::Closed(reason);
        }
    }

    // ---- receiving ----

    /// Handle one datagram addressed to this connection.
    pub(crate) fn handle(&mut self, now: Instant, p: &Packet, d: &[u8], sink: &mut dyn Sink) {
        if self.is_closed() {
            return;
        }
        let Some(d) = self.check_integrity(p, d) else {
            return;
        };
        match p.kind {
            Kind::Init => {
                // A repeated INIT: our INIT_ACK was lost.
                if !self.client {
                    self.send_init_ack = true;
                }
                self.last_recv = now;
                return;
            }
            Kind::InitAck => {
                if self.client
                    && self.state == State::Connecting
                    && let Some(init) = &p.init
                {
                    if let Some(why) = init_refusal(init) {
                        self.fail(why);
                        return;
                    }
                    self.accept_params(init);
                    self.state = State::Established;
                    self.handshake_at = None;
                }
                self.last_recv = now;
                return;
            }
            Kind::Reset => {
                let why = match p.reset {
                    Some(ResetReason::Closed) => "the peer closed the connection",
                    Some(ResetReason::Busy) => "the peer is at its connection limit",
                    Some(ResetReason::Unsupported)
                        if self.state == State::Connecting && self.has_integrity() =>
                    {
                        return self.fail_auth(INTEGRITY_REFUSED);
                    }
                    Some(ResetReason::Unsupported) => "the peer does not support our parameters",
                    Some(ResetReason::IntegrityRequired) => {
                        return self.fail_auth(INTEGRITY_REQUIRED);
                    }
                    _ => "the peer does not know this connection (it restarted?)",
                };
                self.fail(why.to_string());
                return;
            }
            Kind::Ack | Kind::Data => {}
        }
        if self.state == State::Connecting {
            // Data before INIT_ACK cannot be from our peer's established side.
            self.stats.dropped += 1;
            return;
        }
        self.last_recv = now;
        if let Some(a) = &p.ack {
            self.on_ack(now, a);
        }
        if p.kind != Kind::Data {
            return;
        }
        self.stats.packets_received += 1;
        let Some(rx) = self.rx.as_ref() else {
            return;
        };
        if let Err(why) = rx.check(p.seq) {
            self.stats.dropped += 1;
            if why == Drop::Duplicate {
                self.stats.duplicates += 1;
            }
            // The peer missed our ACK: say it again.
            self.ack_now = true;
            return;
        }
        if self.paused {
            self.stats.dropped += 1;
            self.ack_now = true;
            return;
        }
        // Decode every message before taking any, so a packet is all or nothing.
        let body = d.get(p.body_at..).unwrap_or(&[]);
        let Some(msgs) = decode_messages(body, self.max_datagram as u32) else {
            self.stats.malformed += 1;
            self.stats.dropped += 1;
            return;
        };
        if !sink.can_accept(&msgs) {
            self.stats.dropped += 1;
            return;
        }
        let in_order = self.rx.as_mut().map(|rx| rx.mark(p.seq)).unwrap_or(true);
        for (h, payload) in msgs {
            sink.deliver(h, payload);
        }
        self.ack_pending += 1;
        self.ack_first.get_or_insert(now);
        if !in_order || self.ack_pending >= 2 {
            self.ack_now = true;
        }
    }

    /// With integrity: the datagram without its tag if the tag verifies, else `None`
    /// (dropped and counted). Without: the datagram, unless it carries a tag.
    fn check_integrity<'a>(&mut self, p: &Packet, d: &'a [u8]) -> Option<&'a [u8]> {
        if p.kind == Kind::Init {
            // Sent before any key exists; it changes nothing on an existing connection.
            return Some(d);
        }
        if self.client && self.state == State::Connecting && p.kind == Kind::InitAck {
            if self.mac_nonce.is_none() {
                if p.mac || p.nonce.is_some() {
                    self.fail(
                        "the peer answered with per-datagram integrity we did not ask for".into(),
                    );
                    return None;
                }
                return Some(d);
            }
            let (Some(theirs), Some(init), Some(secret), Some(ours)) =
                (p.nonce, p.init, &self.cfg.secret, self.mac_nonce)
            else {
                // An INIT_ACK without integrity: the target does not speak it.
                self.fail_auth(INTEGRITY_REFUSED);
                return None;
            };
            let b = mac::Binding {
                initiator_nonce: ours,
                target_nonce: theirs,
                initiator_conn: self.local_id,
                target_conn: init.conn_id,
            };
            let keys = mac::Keys::derive(secret, &b, true);
            let opened = p.mac.then(|| keys.open(d)).flatten();
            if opened.is_none() {
                self.stats.integrity_failures += 1;
                self.stats.dropped += 1;
                self.fail_auth(INTEGRITY_MISMATCH);
                return None;
            }
            self.keys = Some(keys);
            return opened;
        }
        if self.client && self.state == State::Connecting && p.kind == Kind::Reset {
            // Before keys exist a RESET cannot be checked: a refusal during connection
            // setup is taken as it comes.
            return Some(d);
        }
        match (&self.keys, p.mac) {
            (None, false) => Some(d),
            (Some(k), true) => {
                let opened = k.open(d);
                if opened.is_none() {
                    self.stats.integrity_failures += 1;
                    self.stats.dropped += 1;
                }
                opened
            }
            _ => {
                self.stats.integrity_failures += 1;
                self.stats.dropped += 1;
                None
            }
        }
    }

    fn on_ack(&mut self, now: Instant, a: &AckBlock) {
        // An ACK for packets never sent is from a confused or hostile peer: ignore it.
        if seq_lt(self.next_seq, a.cumulative) {
            self.stats.malformed += 1;
            return;
        }
        if seq_lt(self.peer_cum, a.cumulative) {
            self.peer_cum = a.cumulative;
        }
        self.peer_window = a.window.min(MAX_WINDOW);
        let front = match self.sent.front() {
            Some(s) => s.seq,
            None => return,
        };
        let mut newly = 0u32;
        let mut largest_new: Option<u32> = None;
        let inflight = &mut self.inflight;
        let largest_order = &mut self.largest_acked_order;
        let mut mark = |s: &mut Sent, newly: &mut u32, largest: &mut Option<u32>| {
            if !s.acked {
                s.acked = true;
                if !s.lost {
                    *inflight -= 1;
                }
                if largest_order.is_none_or(|o| o < s.order) {
                    *largest_order = Some(s.order);
                }
                *newly += 1;
                if largest.is_none_or(|l| seq_lt(l, s.seq)) {
                    *largest = Some(s.seq);
                }
            }
        };
        for s in self.sent.iter_mut() {
            if seq_lt(s.seq, a.cumulative) {
                mark(s, &mut newly, &mut largest_new);
            } else {
                break;
            }
        }
        // The SACK ranges, as positions in `sent` (which holds `front..next_seq`, one
        // packet each). Only those packets can be newly acknowledged, so each range is
        // clamped to them first: an ACK costs at most one step per packet outstanding,
        // whatever its ranges claim (16 ranges of 65,535 packets from a cumulative ACK far
        // behind would otherwise be a million steps). `cumulative` is at most `next_seq`
        // and less than 2^31 behind it (checked above), so its distance from `front` fits
        // an i32.
        let outstanding = self.sent.len() as i64;
        let mut start = i64::from(a.cumulative.wrapping_sub(front) as i32);
        for r in &a.ranges {
            start += i64::from(r.gap);
            let end = start + i64::from(r.len);
            for idx in start.max(0)..end.min(outstanding) {
                #[cfg(test)]
                {
                    self.sack_steps += 1;
                }
                if let Some(s) = self.sent.get_mut(idx as usize) {
                    mark(s, &mut newly, &mut largest_new);
                }
            }
            start = end;
        }
        if newly == 0 {
            return;
        }
        // One RTT sample per ACK, from the newest packet it acknowledges (Karn: never
        // from a retransmitted one).
        if let Some(l) = largest_new {
            let idx = l.wrapping_sub(front) as usize;
            if let Some(s) = self.sent.get(idx)
                && !s.retransmitted
            {
                let delay = Duration::from_micros(u64::from(a.delay_us));
                let r = now.saturating_duration_since(s.time).saturating_sub(delay);
                self.rtt.sample(r.max(Duration::from_micros(1)));
            }
            if self.largest_acked.is_none_or(|x| seq_lt(x, l)) {
                self.largest_acked = Some(l);
            }
        }
        self.cc.on_ack(newly, self.peer_cum, self.next_seq);
        self.rto_backoff = 0;
        self.detect_losses(now);
        while self.sent.front().is_some_and(|s| s.acked) {
            self.sent.pop_front();
        }
        if self.sent.is_empty() {
            // Everything presumed lost was acknowledged after all (a spurious timeout:
            // the ACKs were late, not lost); nothing is left to resend.
            self.retx.clear();
        }
        self.rto_at = self
            .sent
            .iter()
            .any(|s| !s.acked)
            .then(|| now + self.rtt.rto());
    }

    /// A packet is lost once three packets transmitted after it were acknowledged, or
    /// once one was and it has been out for 9/8 of an RTT (RACK-style). "After" counts
    /// transmissions, not packet numbers: a retransmission is judged only by what was
    /// sent after it.
    fn detect_losses(&mut self, now: Instant) {
        let Some(largest) = self.largest_acked_order else {
            return;
        };
        let thresh = self.rtt.srtt() * 9 / 8;
        let next = self.next_seq;
        let queue = self.rtt.queue_building();
        for s in self.sent.iter_mut() {
            if s.acked || s.lost || s.order >= largest {
                continue;
            }
            let by_count = largest - s.order >= 3;
            let by_time = now.saturating_duration_since(s.time) > thresh;
            if by_count || by_time {
                s.lost = true;
                self.inflight -= 1;
                self.stats.lost += 1;
                self.retx.push_back(s.seq);
                self.cc.on_loss(s.seq, next, queue);
            }
        }
    }

    // ---- timers ----

    /// When [`handle_timeout`](Conn::handle_timeout) must be called next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut min = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        min(self.handshake_at);
        min(self.rto_at);
        min(self.ack_first.map(|f| f + self.cfg.max_ack_delay));
        min(Some(self.last_recv + self.cfg.dead_after));
        if self.state == State::Established {
            min(Some(
                self.last_recv.max(self.last_ping) + self.cfg.keepalive,
            ));
        }
        t
    }

    /// Run what is due at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if now.saturating_duration_since(self.last_recv) >= self.cfg.dead_after {
            let why = if self.state == State::Connecting {
                format!(
                    "no answer to the connection request within {:?}",
                    self.cfg.dead_after
                )
            } else {
                format!("the peer was silent for {:?}", self.cfg.dead_after)
            };
            self.fail(why);
            return;
        }
        if self
            .ack_first
            .is_some_and(|f| now >= f + self.cfg.max_ack_delay)
        {
            self.ack_now = true;
        }
        if let Some(at) = self.rto_at
            && now >= at
        {
            self.on_rto(now);
        }
        if self.state == State::Established
            && now >= self.last_recv.max(self.last_ping) + self.cfg.keepalive
        {
            // An ack-eliciting packet: its ACK proves the peer alive.
            self.last_ping = now;
            self.queue(OutMsg::new(
                &Header {
                    op_id: 0,
                    payload_len: 0,
                    body: Body::Ping,
                },
                Payload::None,
            ));
        }
    }

    fn on_rto(&mut self, now: Instant) {
        self.stats.timeouts += 1;
        let next = self.next_seq;
        // Everything outstanding is presumed lost; send the oldest again first.
        for s in self.sent.iter_mut() {
            if !s.acked && !s.lost {
                s.lost = true;
                self.inflight -= 1;
                self.stats.lost += 1;
                self.retx.push_back(s.seq);
            }
        }
        self.cc.on_timeout(next);
        self.rto_backoff = (self.rto_backoff + 1).min(16);
        let rto = (self.rtt.rto() * (1u32 << self.rto_backoff.min(10))).min(self.rtt.max_rto());
        self.rto_at = Some(now + rto);
        tracing::debug!(
            conn = self.local_id,
            backoff = self.rto_backoff,
            ?rto,
            srtt = ?self.rtt.srtt(),
            resend = self.retx.len(),
            cwnd = self.cc.window(),
            "retransmission timeout"
        );
    }

    // ---- sending ----

    fn ack_block(&mut self, now: Instant) -> Option<AckBlock> {
        let rx = self.rx.as_ref()?;
        let delay = self
            .ack_first
            .map(|f| {
                now.saturating_duration_since(f)
                    .as_micros()
                    .min(u128::from(u16::MAX)) as u16
            })
            .unwrap_or(0);
        Some(AckBlock {
            cumulative: rx.base,
            window: if self.paused { 0 } else { rx.w() },
            delay_us: delay,
            ranges: rx.sack(),
        })
    }

    fn acked_now(&mut self) {
        self.ack_pending = 0;
        self.ack_first = None;
        self.ack_now = false;
    }

    /// Write the next datagram to send into `out` (cleared first). Returns `false` when
    /// there is nothing to send now.
    pub(crate) fn poll_transmit(&mut self, now: Instant, out: &mut impl Out) -> bool {
        out.clear();
        let expected = self.wants_transmit(now);
        let sent = self.transmit(now, out);
        debug_assert!(expected || !sent, "wants_transmit missed a datagram");
        if sent && let Some(k) = &self.keys {
            packet::set_mac_flag(out.head());
            let mut h = k.sealer();
            out.hash_into(&mut h);
            out.head().extend_from_slice(&mac::finish(&h));
        }
        out.finish();
        sent
    }

    /// Whether [`poll_transmit`](Conn::poll_transmit) may produce a datagram now: a
    /// cheap check that lets an idle poll skip preparing an output buffer. Never false
    /// when there is something to send (it may be true when there turns out to be
    /// nothing).
    pub(crate) fn wants_transmit(&self, now: Instant) -> bool {
        if self.reset_pending.is_some() {
            return true;
        }
        if self.is_closed() {
            return false;
        }
        if self.state == State::Connecting {
            return self.handshake_at.is_some_and(|t| now >= t);
        }
        let room = self.inflight < self.cc.window();
        self.send_init_ack
            || (room && !self.retx.is_empty())
            || (room
                && !self.queue.is_empty()
                && seq_lt(self.next_seq, self.peer_cum.wrapping_add(self.peer_window)))
            || self.ack_now
            || self
                .ack_first
                .is_some_and(|f| now >= f + self.cfg.max_ack_delay)
    }

    fn transmit(&mut self, now: Instant, out: &mut impl Out) -> bool {
        if let Some(why) = self.reset_pending.take() {
            out.head()
                .extend_from_slice(&packet::reset(self.remote_id, why));
            return true;
        }
        if self.is_closed() {
            return false;
        }
        if self.state == State::Connecting {
            if self.handshake_at.is_some_and(|t| now >= t) {
                packet::put_prefix(out.head(), Kind::Init, 0, 0, false);
                packet::put_init(out.head(), &self.init_params(), self.mac_nonce.as_ref());
                self.handshake_backoff = (self.handshake_backoff + 1).min(10);
                let wait = (self.cfg.initial_rtt.max(Duration::from_millis(1)) * 4)
                    * (1u32 << self.handshake_backoff.min(8));
                self.handshake_at = Some(now + wait.min(self.cfg.max_rto));
                return true;
            }
            return false;
        }
        if self.send_init_ack {
            self.send_init_ack = false;
            packet::put_prefix(out.head(), Kind::InitAck, self.remote_id, 0, false);
            packet::put_init(out.head(), &self.init_params(), self.mac_nonce.as_ref());
            return true;
        }
        // Lost packets go again first, under the same numbers (within the window too).
        while self.inflight < self.cc.window()
            && let Some(seq) = self.retx.pop_front()
        {
            let Some(front) = self.sent.front().map(|s| s.seq) else {
                // Nothing outstanding: every entry left is stale.
                self.retx.clear();
                break;
            };
            let idx = seq.wrapping_sub(front) as usize;
            let Some(s) = self.sent.get(idx) else {
                continue;
            };
            if s.acked || !s.lost {
                continue;
            }
            let msgs = s.msgs.clone();
            self.build_data(now, seq, &msgs, out);
            let order = self.tx_order;
            self.tx_order += 1;
            if let Some(s) = self.sent.get_mut(idx) {
                s.lost = false;
                s.retransmitted = true;
                s.time = now;
                s.order = order;
                self.inflight += 1;
            }
            self.stats.retransmits += 1;
            self.stats.packets_sent += 1;
            if self.rto_at.is_none() {
                self.rto_at = Some(now + self.rtt.rto());
            }
            return true;
        }
        // New data, within the congestion window and the peer's receive window.
        let window_end = self.peer_cum.wrapping_add(self.peer_window);
        if !self.queue.is_empty()
            && self.retx.is_empty()
            && self.inflight < self.cc.window()
            && seq_lt(self.next_seq, window_end)
        {
            let room = self.max_message();
            let mut msgs = Vec::new();
            let mut size = 0;
            while let Some(m) = self.queue.front() {
                if !msgs.is_empty() && size + m.len() > room {
                    break;
                }
                size += m.len();
                msgs.push(self.queue.pop_front().expect("front exists"));
            }
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            self.build_data(now, seq, &msgs, out);
            let order = self.tx_order;
            self.tx_order += 1;
            self.sent.push_back(Sent {
                seq,
                order,
                time: now,
                msgs,
                acked: false,
                lost: false,
                retransmitted: false,
            });
            self.inflight += 1;
            self.stats.packets_sent += 1;
            if self.rto_at.is_none() {
                self.rto_at = Some(now + self.rtt.rto());
            }
            return true;
        }
        if self.ack_now
            || self
                .ack_first
                .is_some_and(|f| now >= f + self.cfg.max_ack_delay)
        {
            let Some(a) = self.ack_block(now) else {
                return false;
            };
            packet::put_prefix(out.head(), Kind::Ack, self.remote_id, 0, false);
            packet::put_ack(out.head(), &a);
            self.acked_now();
            return true;
        }
        false
    }

    fn build_data(&mut self, now: Instant, seq: u32, msgs: &[OutMsg], out: &mut impl Out) {
        let ack = self.ack_block(now);
        packet::put_prefix(out.head(), Kind::Data, self.remote_id, seq, ack.is_some());
        if let Some(a) = &ack {
            packet::put_ack(out.head(), a);
            self.acked_now();
        }
        for m in msgs {
            out.head().extend_from_slice(&m.hdr[..m.hdr_len as usize]);
            self.stats.bytes_copied += out.payload(&m.payload) as u64;
        }
        debug_assert!(
            out.out_len() <= self.max_datagram,
            "datagram over the limit"
        );
    }

    fn init_params(&self) -> Init {
        Init {
            conn_id: self.local_id,
            first_seq: self.first_seq,
            max_datagram: self.cfg.max_datagram as u32,
            window: self.cfg.window,
            flags: if self.mac_nonce.is_some() {
                packet::INIT_MAC
            } else {
                0
            },
        }
    }

    /// Whether everything queued was sent and acknowledged.
    #[cfg(any(test, feature = "bench-internals"))]
    pub(crate) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.sent.is_empty()
    }

    /// Next packet number (for tests of wraparound).
    #[cfg(test)]
    pub(crate) fn next_seq(&self) -> u32 {
        self.next_seq
    }
}

/// Split the body of a DATA packet into its wire messages; `None` if any is malformed
/// or runs past the end.
pub(crate) fn decode_messages(body: &[u8], max_payload: u32) -> Option<Vec<(Header, &[u8])>> {
    let mut msgs = Vec::new();
    let mut at = 0;
    let limits = Limits { max_payload };
    while at < body.len() {
        let (h, n) = Header::decode(&body[at..], &limits).ok()?;
        let end = at.checked_add(n)?.checked_add(h.payload_len as usize)?;
        msgs.push((h, body.get(at + n..end)?));
        at = end;
    }
    Some(msgs)
}

#[cfg(test)]
mod tests;
