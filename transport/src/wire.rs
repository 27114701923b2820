//! Op messages on the wire: encode and decode, no I/O.
//!
//! Every backend that is not RDMA carries these messages: the `tcp` backend as a byte
//! stream, the datagram backends inside their reliable-datagram frames. The layout is
//! specified in `docs/wire.md`; this module is the reference implementation.
//!
//! A message is a 16-byte prefix, a fixed-size body chosen by the op code, and
//! `payload_len` bytes of payload (data for `WRITE`, `READ_RESP`, `SEND` and `SEND_SEQ`).
//! All integers are little-endian.
//!
//! ```text
//! 0       1       2               4                               8
//! +-------+-------+---------------+-------------------------------+
//! |version|opcode |     flags     |          payload_len          |
//! +-------+-------+---------------+-------------------------------+
//! |                             op_id                             |
//! +---------------------------------------------------------------+
//! |                body (size fixed by the opcode)                |
//! +---------------------------------------------------------------+
//! |                    payload (payload_len bytes)                |
//! ```
//!
//! [`Header::decode`] never panics and never reads past the slice it is given, whatever
//! the input (property-tested and fuzzed); reserved fields must be zero so that future
//! versions can use them.

/// The wire version this build speaks. Every message carries it in its first byte.
pub const VERSION: u8 = 1;
/// Lowest wire version this build accepts.
pub const MIN_VERSION: u8 = 1;
/// Highest wire version this build accepts.
pub const MAX_VERSION: u8 = 1;
/// Length of the common prefix.
pub const PREFIX_LEN: usize = 16;
/// Length of the largest header (prefix + body).
pub const MAX_HEADER_LEN: usize = PREFIX_LEN + 56;
/// Magic bytes opening the body of `HELLO` and `HELLO_ACK`.
pub const MAGIC: [u8; 4] = *b"PKFS";
/// Largest payload of a `HELLO`/`HELLO_ACK` (room for an authentication exchange).
pub const MAX_HELLO_PAYLOAD: u32 = 1024;
/// `HELLO`/`HELLO_ACK` feature bit: mutual authentication with the cluster secret
/// (see `docs/security.md`).
pub const FEATURE_AUTH: u32 = 1;
/// `HELLO`/`HELLO_ACK` feature bit: the sender numbers its messages (`SEND_SEQ`) and
/// delivers the peer's in the order of their numbers. Only the datagram backends announce
/// it; a connection uses it when both sides did (see `docs/datagram.md`).
pub const FEATURE_MSG_SEQ: u32 = 2;
/// Largest payload of an `ERROR` (a UTF-8 explanation).
pub const MAX_ERROR_PAYLOAD: u32 = 512;
/// Length of a region key's token.
pub const TOKEN_LEN: usize = 16;

const FLAG_NOTIFY: u16 = 1;

/// Op codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum OpCode {
    /// Connection setup, initiator to target.
    Hello = 0x01,
    /// Connection setup answer.
    HelloAck = 0x02,
    /// The initiator's proof that it holds the cluster secret (third setup message).
    Auth = 0x03,
    /// One-sided write (optionally with a notification).
    Write = 0x10,
    /// One-sided read request.
    Read = 0x11,
    /// Data answering a read.
    ReadResp = 0x12,
    /// Compare-and-swap on a u64.
    Cas = 0x13,
    /// Fetch-and-add on a u64.
    Faa = 0x14,
    /// Old value answering an atomic.
    AtomicResp = 0x15,
    /// Two-sided message.
    Send = 0x16,
    /// Two-sided message with its per-connection sequence number (datagram backends).
    SendSeq = 0x19,
    /// Positive completion of a write or send.
    Ack = 0x17,
    /// Negative completion of any op, or a connection-level error (op_id 0).
    Error = 0x18,
    /// Keepalive probe.
    Ping = 0x20,
    /// Keepalive answer.
    Pong = 0x21,
    /// Orderly close.
    Goodbye = 0x22,
}

impl OpCode {
    /// Parse an op code byte.
    pub fn from_u8(b: u8) -> Option<OpCode> {
        Some(match b {
            0x01 => OpCode::Hello,
            0x02 => OpCode::HelloAck,
            0x03 => OpCode::Auth,
            0x10 => OpCode::Write,
            0x11 => OpCode::Read,
            0x12 => OpCode::ReadResp,
            0x13 => OpCode::Cas,
            0x14 => OpCode::Faa,
            0x15 => OpCode::AtomicResp,
            0x16 => OpCode::Send,
            0x19 => OpCode::SendSeq,
            0x17 => OpCode::Ack,
            0x18 => OpCode::Error,
            0x20 => OpCode::Ping,
            0x21 => OpCode::Pong,
            0x22 => OpCode::Goodbye,
            _ => return None,
        })
    }

    /// Size of the body that follows the prefix.
    pub fn body_len(self) -> usize {
        match self {
            OpCode::Hello | OpCode::HelloAck => 24,
            OpCode::Write => 56,
            OpCode::Read => 40,
            OpCode::ReadResp => 16,
            OpCode::Cas => 48,
            OpCode::Faa => 40,
            OpCode::AtomicResp => 8,
            OpCode::Send => 16,
            OpCode::SendSeq => 12,
            OpCode::Ack | OpCode::Ping | OpCode::Pong | OpCode::Auth => 0,
            OpCode::Error | OpCode::Goodbye => 8,
        }
    }
}

/// Where a one-sided op lands at the target: region, offset and the key's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Region id at the target.
    pub region: u64,
    /// Byte offset in the region.
    pub offset: u64,
    /// The capability token of the key used.
    pub token: [u8; TOKEN_LEN],
}

/// Error codes carried by `ERROR` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Rights or token do not allow the access.
    AccessDenied = 1,
    /// Offset and length exceed the region.
    OutOfBounds = 2,
    /// The key was revoked.
    Revoked = 3,
    /// The key expired.
    Expired = 4,
    /// No such region.
    UnknownRegion = 5,
    /// Atomic at an unaligned offset.
    Misaligned = 6,
    /// Length beyond the target's limits.
    TooLarge = 7,
    /// The target is at a limit.
    Busy = 8,
    /// No common wire version.
    UnsupportedVersion = 9,
    /// The peer broke the protocol; the connection closes.
    Protocol = 10,
    /// The key names another endpoint.
    WrongOwner = 11,
    /// Authentication failed.
    AuthFailed = 12,
    /// An error with no more specific code.
    Other = 0xffff,
}

impl ErrorCode {
    /// Parse a code; values this version does not define are `None`.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::AccessDenied,
            2 => ErrorCode::OutOfBounds,
            3 => ErrorCode::Revoked,
            4 => ErrorCode::Expired,
            5 => ErrorCode::UnknownRegion,
            6 => ErrorCode::Misaligned,
            7 => ErrorCode::TooLarge,
            8 => ErrorCode::Busy,
            9 => ErrorCode::UnsupportedVersion,
            10 => ErrorCode::Protocol,
            11 => ErrorCode::WrongOwner,
            12 => ErrorCode::AuthFailed,
            0xffff => ErrorCode::Other,
            _ => return None,
        })
    }
}

/// The fixed part of a message, by op code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Opens a connection.
    Hello {
        /// Lowest version the sender speaks.
        min_version: u8,
        /// Highest version the sender speaks.
        max_version: u8,
        /// The sender's endpoint id.
        endpoint: u64,
        /// Largest data payload the sender accepts in one message.
        max_payload: u32,
        /// Feature bits: [`FEATURE_AUTH`] (the payload is a challenge nonce),
        /// [`FEATURE_MSG_SEQ`].
        features: u32,
    },
    /// Accepts a connection.
    HelloAck {
        /// The version both sides now speak.
        version: u8,
        /// The sender's endpoint id.
        endpoint: u64,
        /// Largest data payload the sender accepts in one message.
        max_payload: u32,
        /// Feature bits: [`FEATURE_AUTH`] (the payload is a nonce and a proof),
        /// [`FEATURE_MSG_SEQ`].
        features: u32,
    },
    /// The initiator's proof of the cluster secret; the payload is the proof.
    Auth,
    /// Place `payload_len` bytes at `target.offset`; this message is bytes
    /// `op_off..op_off+payload_len` of an op of `op_len` bytes.
    Write {
        /// Where the bytes go.
        target: Target,
        /// Length of the whole op.
        op_len: u64,
        /// Position of this payload in the op.
        op_off: u64,
        /// Notification value delivered to the target once the whole op is placed.
        notify: Option<u32>,
    },
    /// Read `len` bytes at `target.offset`.
    Read {
        /// Where to read.
        target: Target,
        /// How many bytes.
        len: u64,
    },
    /// Data for a read: bytes `op_off..op_off+payload_len` of `op_len`.
    ReadResp {
        /// Length of the whole read.
        op_len: u64,
        /// Position of this payload in the read.
        op_off: u64,
    },
    /// Compare-and-swap the u64 at `target.offset`.
    Cas {
        /// Where.
        target: Target,
        /// Expected old value.
        expected: u64,
        /// New value if the old one matched.
        new: u64,
    },
    /// Fetch-and-add on the u64 at `target.offset` (wrapping).
    Faa {
        /// Where.
        target: Target,
        /// Addend.
        add: u64,
    },
    /// The value before an atomic took effect.
    AtomicResp {
        /// Old value.
        old: u64,
    },
    /// Bytes `msg_off..msg_off+payload_len` of a message of `msg_len` bytes.
    Send {
        /// Length of the whole message.
        msg_len: u64,
        /// Position of this payload in the message.
        msg_off: u64,
    },
    /// Bytes `msg_off..msg_off+payload_len` of message number `seq`, of `msg_len`
    /// bytes: a [`Body::Send`] that also carries the message's place in the sender's
    /// sequence, so that the receiver can deliver messages in order.
    SendSeq {
        /// The message's number: the sender numbers the messages of a connection 0, 1,
        /// 2, … (wrapping).
        seq: u32,
        /// Length of the whole message.
        msg_len: u32,
        /// Position of this payload in the message.
        msg_off: u32,
    },
    /// The op `op_id` took effect.
    Ack,
    /// The op `op_id` failed (or, with op_id 0, the connection is being refused/closed).
    Error {
        /// Why.
        code: ErrorCode,
    },
    /// Keepalive probe; `op_id` is echoed.
    Ping,
    /// Keepalive answer.
    Pong,
    /// Orderly close.
    Goodbye {
        /// Reason (an [`ErrorCode`] value, 0 for a normal close).
        code: u16,
    },
}

impl Body {
    /// The op code of this body.
    pub fn opcode(&self) -> OpCode {
        match self {
            Body::Hello { .. } => OpCode::Hello,
            Body::HelloAck { .. } => OpCode::HelloAck,
            Body::Write { .. } => OpCode::Write,
            Body::Read { .. } => OpCode::Read,
            Body::ReadResp { .. } => OpCode::ReadResp,
            Body::Cas { .. } => OpCode::Cas,
            Body::Faa { .. } => OpCode::Faa,
            Body::AtomicResp { .. } => OpCode::AtomicResp,
            Body::Send { .. } => OpCode::Send,
            Body::SendSeq { .. } => OpCode::SendSeq,
            Body::Ack => OpCode::Ack,
            Body::Error { .. } => OpCode::Error,
            Body::Ping => OpCode::Ping,
            Body::Auth => OpCode::Auth,
            Body::Pong => OpCode::Pong,
            Body::Goodbye { .. } => OpCode::Goodbye,
        }
    }
}

/// A decoded message header: everything but the payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The initiator's id for the op this message belongs to.
    pub op_id: u64,
    /// Number of payload bytes following the header.
    pub payload_len: u32,
    /// The op-specific part.
    pub body: Body,
}

/// Limits a decoder enforces on lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest data payload (`WRITE`, `READ_RESP`, `SEND`, `SEND_SEQ`) in one message.
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: u32::MAX,
        }
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not enough bytes yet; `need` is the total header length required.
    #[error("incomplete header: need {need} bytes")]
    Incomplete {
        /// Bytes needed for the whole header.
        need: usize,
    },
    /// The version byte is not one this build speaks.
    #[error("unsupported wire version {0} (this build speaks {MIN_VERSION}..={MAX_VERSION})")]
    UnsupportedVersion(u8),
    /// Unknown op code.
    #[error("unknown op code {0:#04x}")]
    UnknownOpcode(u8),
    /// A reserved field or flag bit is not zero.
    #[error("reserved {0} is not zero")]
    Reserved(&'static str),
    /// `HELLO`/`HELLO_ACK` without the magic bytes.
    #[error("bad magic (not a PacketFS peer)")]
    BadMagic,
    /// A payload length this op may not carry.
    #[error("{op:?} may not carry {len} payload bytes (limit {max})")]
    PayloadLength {
        /// Op code.
        op: OpCode,
        /// Length found.
        len: u32,
        /// Limit for this op.
        max: u32,
    },
    /// An `ERROR` with a code this version does not define.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
    /// Offsets or lengths inside the body contradict each other.
    #[error("inconsistent lengths in {0:?}")]
    Inconsistent(OpCode),
}

impl DecodeError {
    /// Whether more bytes could make this decode succeed.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

/// A bounds-checked little-endian reader over a header's bytes.
struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl Rd<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        // `decode` checks the total length before constructing the reader, so this range
        // exists; `get` keeps the reader panic-free even if that ever changes.
        if let Some(s) = self.b.get(self.at..self.at + N) {
            out.copy_from_slice(s);
        }
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn target(&mut self) -> Target {
        Target {
            region: self.u64(),
            offset: self.u64(),
            token: self.take(),
        }
    }
}

struct Wr<'a> {
    b: &'a mut [u8; MAX_HEADER_LEN],
    at: usize,
}

impl Wr<'_> {
    fn put(&mut self, s: &[u8]) {
        self.b[self.at..self.at + s.len()].copy_from_slice(s);
        self.at += s.len();
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn target(&mut self, t: &Target) {
        self.u64(t.region);
        self.u64(t.offset);
        self.put(&t.token);
    }
}

fn check_payload(op: OpCode, len: u32, max: u32) -> Result<(), DecodeError> {
    if len > max {
        Err(DecodeError::PayloadLength { op, len, max })
    } else {
        Ok(())
    }
}

/// `off + len <= total` without overflow.
fn fits(off: u64, len: u32, total: u64) -> bool {
    off.checked_add(u64::from(len))
        .is_some_and(|end| end <= total)
}

impl Header {
    /// Length of this header when encoded (prefix + body).
    pub fn encoded_len(&self) -> usize {
        PREFIX_LEN + self.body.opcode().body_len()
    }

    /// Encode into `out`, returning the number of bytes written.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        let op = self.body.opcode();
        let flags = match self.body {
            Body::Write {
                notify: Some(_), ..
            } => FLAG_NOTIFY,
            _ => 0,
        };
        let mut w = Wr { b: out, at: 0 };
        w.u8(VERSION);
        w.u8(op as u8);
        w.u16(flags);
        w.u32(self.payload_len);
        w.u64(self.op_id);
        match &self.body {
            Body::Hello {
                min_version,
                max_version,
                endpoint,
                max_payload,
                features,
            } => {
                w.put(&MAGIC);
                w.u8(*min_version);
                w.u8(*max_version);
                w.u16(0);
                w.u64(*endpoint);
                w.u32(*max_payload);
                w.u32(*features);
            }
            Body::HelloAck {
                version,
                endpoint,
                max_payload,
                features,
            } => {
                w.put(&MAGIC);
                w.u8(*version);
                w.put(&[0, 0, 0]);
                w.u64(*endpoint);
                w.u32(*max_payload);
                w.u32(*features);
            }
            Body::Write {
                target,
                op_len,
                op_off,
                notify,
            } => {
                w.target(target);
                w.u64(*op_len);
                w.u64(*op_off);
                w.u32(notify.unwrap_or(0));
                w.u32(0);
            }
            Body::Read { target, len } => {
                w.target(target);
                w.u64(*len);
            }
            Body::ReadResp { op_len, op_off } => {
                w.u64(*op_len);
                w.u64(*op_off);
            }
            Body::Cas {
                target,
                expected,
                new,
            } => {
                w.target(target);
                w.u64(*expected);
                w.u64(*new);
            }
            Body::Faa { target, add } => {
                w.target(target);
                w.u64(*add);
            }
            Body::AtomicResp { old } => w.u64(*old),
            Body::Send { msg_len, msg_off } => {
                w.u64(*msg_len);
                w.u64(*msg_off);
            }
            Body::SendSeq {
                seq,
                msg_len,
                msg_off,
            } => {
                w.u32(*seq);
                w.u32(*msg_len);
                w.u32(*msg_off);
            }
            Body::Ack | Body::Ping | Body::Pong | Body::Auth => {}
            Body::Error { code } => {
                w.u16(*code as u16);
                w.u16(0);
                w.u32(0);
            }
            Body::Goodbye { code } => {
                w.u16(*code);
                w.u16(0);
                w.u32(0);
            }
        }
        debug_assert_eq!(w.at, self.encoded_len());
        w.at
    }

    /// Encode and append to `out`.
    pub fn encode_to(&self, out: &mut Vec<u8>) {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = self.encode(&mut buf);
        out.extend_from_slice(&buf[..n]);
    }

    /// Decode a header from the start of `buf`.
    ///
    /// Returns the header and its encoded length; the payload (if any) follows. Returns
    /// [`DecodeError::Incomplete`] when `buf` is a valid but short prefix of a header.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<(Header, usize), DecodeError> {
        if buf.len() < PREFIX_LEN {
            // Fail early on a bad version or op code even before the prefix is complete,
            // so garbage is rejected at its first byte.
            if let Some(&v) = buf.first()
                && !(MIN_VERSION..=MAX_VERSION).contains(&v)
            {
                return Err(DecodeError::UnsupportedVersion(v));
            }
            if let Some(&o) = buf.get(1)
                && OpCode::from_u8(o).is_none()
            {
                return Err(DecodeError::UnknownOpcode(o));
            }
            return Err(DecodeError::Incomplete { need: PREFIX_LEN });
        }
        let mut r = Rd { b: buf, at: 0 };
        let version = r.u8();
        if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let opb = r.u8();
        let op = OpCode::from_u8(opb).ok_or(DecodeError::UnknownOpcode(opb))?;
        let flags = r.u16();
        let payload_len = r.u32();
        let op_id = r.u64();
        let total = PREFIX_LEN + op.body_len();
        if buf.len() < total {
            return Err(DecodeError::Incomplete { need: total });
        }
        if flags & !FLAG_NOTIFY != 0 || (flags != 0 && op != OpCode::Write) {
            return Err(DecodeError::Reserved("flag bits"));
        }
        let max = limits.max_payload;
        let body = match op {
            OpCode::Hello | OpCode::HelloAck => {
                if r.take::<4>() != MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                check_payload(op, payload_len, MAX_HELLO_PAYLOAD)?;
                if op == OpCode::Hello {
                    let min_version = r.u8();
                    let max_version = r.u8();
                    if r.u16() != 0 {
                        return Err(DecodeError::Reserved("HELLO padding"));
                    }
                    if min_version > max_version {
                        return Err(DecodeError::Inconsistent(op));
                    }
                    Body::Hello {
                        min_version,
                        max_version,
                        endpoint: r.u64(),
                        max_payload: r.u32(),
                        features: r.u32(),
                    }
                } else {
                    let version = r.u8();
                    if r.take::<3>() != [0; 3] {
                        return Err(DecodeError::Reserved("HELLO_ACK padding"));
                    }
                    Body::HelloAck {
                        version,
                        endpoint: r.u64(),
                        max_payload: r.u32(),
                        features: r.u32(),
                    }
                }
            }
            OpCode::Write => {
                check_payload(op, payload_len, max)?;
                let target = r.target();
                let op_len = r.u64();
                let op_off = r.u64();
                let imm = r.u32();
                if r.u32() != 0 {
                    return Err(DecodeError::Reserved("WRITE padding"));
                }
                if !fits(op_off, payload_len, op_len) {
                    return Err(DecodeError::Inconsistent(op));
                }
                let notify = if flags & FLAG_NOTIFY != 0 {
                    Some(imm)
                } else if imm != 0 {
                    return Err(DecodeError::Reserved("WRITE immediate without NOTIFY"));
                } else {
                    None
                };
                Body::Write {
                    target,
                    op_len,
                    op_off,
                    notify,
                }
            }
            OpCode::Read => {
                check_payload(op, payload_len, 0)?;
                Body::Read {
                    target: r.target(),
                    len: r.u64(),
                }
            }
            OpCode::ReadResp => {
                check_payload(op, payload_len, max)?;
                let op_len = r.u64();
                let op_off = r.u64();
                if !fits(op_off, payload_len, op_len) {
                    return Err(DecodeError::Inconsistent(op));
                }
                Body::ReadResp { op_len, op_off }
            }
            OpCode::Cas => {
                check_payload(op, payload_len, 0)?;
                Body::Cas {
                    target: r.target(),
                    expected: r.u64(),
                    new: r.u64(),
                }
            }
            OpCode::Faa => {
                check_payload(op, payload_len, 0)?;
                Body::Faa {
                    target: r.target(),
                    add: r.u64(),
                }
            }
            OpCode::AtomicResp => {
                check_payload(op, payload_len, 0)?;
                Body::AtomicResp { old: r.u64() }
            }
            OpCode::Send => {
                check_payload(op, payload_len, max)?;
                let msg_len = r.u64();
                let msg_off = r.u64();
                if !fits(msg_off, payload_len, msg_len) {
                    return Err(DecodeError::Inconsistent(op));
                }
                Body::Send { msg_len, msg_off }
            }
            OpCode::SendSeq => {
                check_payload(op, payload_len, max)?;
                let seq = r.u32();
                let msg_len = r.u32();
                let msg_off = r.u32();
                if !fits(u64::from(msg_off), payload_len, u64::from(msg_len)) {
                    return Err(DecodeError::Inconsistent(op));
                }
                Body::SendSeq {
                    seq,
                    msg_len,
                    msg_off,
                }
            }
            OpCode::Auth => {
                check_payload(op, payload_len, MAX_HELLO_PAYLOAD)?;
                Body::Auth
            }
            OpCode::Ack | OpCode::Ping | OpCode::Pong => {
                check_payload(op, payload_len, 0)?;
                match op {
                    OpCode::Ack => Body::Ack,
                    OpCode::Ping => Body::Ping,
                    _ => Body::Pong,
                }
            }
            OpCode::Error | OpCode::Goodbye => {
                let limit = if op == OpCode::Error {
                    MAX_ERROR_PAYLOAD
                } else {
                    0
                };
                check_payload(op, payload_len, limit)?;
                let code = r.u16();
                if r.u16() != 0 || r.u32() != 0 {
                    return Err(DecodeError::Reserved("ERROR/GOODBYE padding"));
                }
                if op == OpCode::Error {
                    Body::Error {
                        code: ErrorCode::from_u16(code)
                            .ok_or(DecodeError::UnknownErrorCode(code))?,
                    }
                } else {
                    Body::Goodbye { code }
                }
            }
        };
        Ok((
            Header {
                op_id,
                payload_len,
                body,
            },
            total,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn target() -> impl Strategy<Value = Target> {
        (any::<u64>(), any::<u64>(), any::<[u8; TOKEN_LEN]>()).prop_map(
            |(region, offset, token)| Target {
                region,
                offset,
                token,
            },
        )
    }

    fn known_code() -> impl Strategy<Value = ErrorCode> {
        prop_oneof![
            Just(ErrorCode::AccessDenied),
            Just(ErrorCode::OutOfBounds),
            Just(ErrorCode::Revoked),
            Just(ErrorCode::Expired),
            Just(ErrorCode::UnknownRegion),
            Just(ErrorCode::Misaligned),
            Just(ErrorCode::TooLarge),
            Just(ErrorCode::Busy),
            Just(ErrorCode::UnsupportedVersion),
            Just(ErrorCode::Protocol),
            Just(ErrorCode::WrongOwner),
            Just(ErrorCode::AuthFailed),
            Just(ErrorCode::Other),
        ]
    }

    /// Any header that is valid to encode.
    fn header() -> impl Strategy<Value = Header> {
        let body = prop_oneof![
            (any::<u8>(), any::<u8>(), any::<u64>(), any::<u32>()).prop_map(|(a, b, e, m)| {
                Body::Hello {
                    min_version: a.min(b),
                    max_version: a.max(b),
                    endpoint: e,
                    max_payload: m,
                    features: 0,
                }
            }),
            (any::<u8>(), any::<u64>(), any::<u32>()).prop_map(|(v, e, m)| Body::HelloAck {
                version: v,
                endpoint: e,
                max_payload: m,
                features: 0,
            }),
            (target(), any::<u64>(), any::<u64>(), any::<Option<u32>>()).prop_map(
                |(t, l, o, n)| Body::Write {
                    target: t,
                    op_len: l.max(o),
                    op_off: o.min(l),
                    notify: n,
                }
            ),
            (target(), any::<u64>()).prop_map(|(t, l)| Body::Read { target: t, len: l }),
            (any::<u64>(), any::<u64>()).prop_map(|(l, o)| Body::ReadResp {
                op_len: l.max(o),
                op_off: o.min(l)
            }),
            (target(), any::<u64>(), any::<u64>()).prop_map(|(t, e, n)| Body::Cas {
                target: t,
                expected: e,
                new: n
            }),
            (target(), any::<u64>()).prop_map(|(t, a)| Body::Faa { target: t, add: a }),
            any::<u64>().prop_map(|old| Body::AtomicResp { old }),
            (any::<u64>(), any::<u64>()).prop_map(|(l, o)| Body::Send {
                msg_len: l.max(o),
                msg_off: o.min(l)
            }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(s, l, o)| Body::SendSeq {
                seq: s,
                msg_len: l.max(o),
                msg_off: o.min(l)
            }),
            Just(Body::Ack),
            known_code().prop_map(|code| Body::Error { code }),
            Just(Body::Ping),
            Just(Body::Pong),
            Just(Body::Auth),
            any::<u16>().prop_map(|code| Body::Goodbye { code }),
        ];
        (any::<u64>(), body).prop_map(|(op_id, body)| {
            // Give data messages a payload that fits their lengths.
            let payload_len = match body {
                Body::Write { op_len, op_off, .. }
                | Body::ReadResp { op_len, op_off }
                | Body::Send {
                    msg_len: op_len,
                    msg_off: op_off,
                } => (op_len - op_off).min(1 << 20) as u32,
                Body::SendSeq {
                    msg_len, msg_off, ..
                } => (msg_len - msg_off).min(1 << 20),
                Body::Hello { .. } | Body::HelloAck { .. } => 7,
                Body::Auth => 32,
                Body::Error { .. } => 3,
                _ => 0,
            };
            Header {
                op_id,
                payload_len,
                body,
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, .. ProptestConfig::default() })]

        #[test]
        fn encode_decode_round_trips(h in header()) {
            let mut buf = [0u8; MAX_HEADER_LEN];
            let n = h.encode(&mut buf);
            prop_assert_eq!(n, h.encoded_len());
            let (d, used) = Header::decode(&buf[..n], &Limits::default()).unwrap();
            prop_assert_eq!(used, n);
            prop_assert_eq!(d, h);
            // Every strict prefix is reported as incomplete, never as a header.
            for cut in 0..n {
                let e = Header::decode(&buf[..cut], &Limits::default()).unwrap_err();
                prop_assert!(e.is_incomplete(), "cut {} gave {:?}", cut, e);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Header::decode(&bytes, &Limits { max_payload: 1 << 20 });
        }

        #[test]
        fn decode_of_mutated_valid_header_never_panics(h in header(), pos in 0usize..MAX_HEADER_LEN, b in any::<u8>()) {
            let mut buf = [0u8; MAX_HEADER_LEN];
            let n = h.encode(&mut buf);
            buf[pos % n] = b;
            if let Ok((d, used)) = Header::decode(&buf[..n], &Limits::default()) {
                // Whatever decodes must re-encode to the same bytes (no two encodings).
                let mut again = [0u8; MAX_HEADER_LEN];
                let m = d.encode(&mut again);
                prop_assert_eq!(&again[..m], &buf[..used]);
            }
        }
    }

    #[test]
    fn rejects_garbage_early() {
        assert_eq!(
            Header::decode(b"G", &Limits::default()),
            Err(DecodeError::UnsupportedVersion(b'G'))
        );
        assert_eq!(
            Header::decode(&[1, 0x99], &Limits::default()),
            Err(DecodeError::UnknownOpcode(0x99))
        );
    }

    #[test]
    fn enforces_payload_limit() {
        let h = Header {
            op_id: 1,
            payload_len: 4096,
            body: Body::Send {
                msg_len: 4096,
                msg_off: 0,
            },
        };
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut buf);
        let e = Header::decode(&buf[..n], &Limits { max_payload: 1024 }).unwrap_err();
        assert!(matches!(e, DecodeError::PayloadLength { len: 4096, .. }));
    }

    #[test]
    fn inconsistent_offsets_rejected() {
        let h = Header {
            op_id: 1,
            payload_len: 10,
            body: Body::ReadResp {
                op_len: 15,
                op_off: 10,
            },
        };
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut buf);
        assert_eq!(
            Header::decode(&buf[..n], &Limits::default()),
            Err(DecodeError::Inconsistent(OpCode::ReadResp))
        );
        // Offset overflow.
        let h = Header {
            op_id: 1,
            payload_len: 10,
            body: Body::Send {
                msg_len: u64::MAX,
                msg_off: u64::MAX - 3,
            },
        };
        let n = h.encode(&mut buf);
        assert_eq!(
            Header::decode(&buf[..n], &Limits::default()),
            Err(DecodeError::Inconsistent(OpCode::Send))
        );
        // A numbered segment past the end of its message.
        let h = Header {
            op_id: 1,
            payload_len: 10,
            body: Body::SendSeq {
                seq: 7,
                msg_len: 15,
                msg_off: 10,
            },
        };
        let n = h.encode(&mut buf);
        assert_eq!(n, PREFIX_LEN + 12);
        assert_eq!(
            Header::decode(&buf[..n], &Limits::default()),
            Err(DecodeError::Inconsistent(OpCode::SendSeq))
        );
    }
}
