//! Datagram headers of the reliable datagram protocol (`docs/datagram.md`).
//!
//! Every datagram starts with a 12-byte prefix:
//!
//! ```text
//! 0       1       2               4                               8
//! +-------+-------+---------------+-------------------------------+
//! |version| type  |     flags     |          dst conn id          |
//! +-------+-------+---------------+-------------------------------+
//! |      packet number (DATA) or 0 (other types)                  |
//! +---------------------------------------------------------------+
//! ```
//!
//! followed by, depending on the type and flags: an INIT body, an ACK block, wire
//! messages (DATA), or a RESET reason, and, on a connection with per-datagram
//! integrity, a 16-byte tag at the very end (flag `MAC`). All integers are
//! little-endian.

/// Version of the datagram format.
pub const VERSION: u8 = 1;
/// Length of the common prefix.
pub const PREFIX_LEN: usize = 12;
/// Most SACK ranges one ACK block carries.
pub const MAX_SACK: usize = 16;
/// Largest ACK block.
pub const MAX_ACK_LEN: usize = 12 + 4 * MAX_SACK;

/// Flag: an ACK block follows the prefix.
const FLAG_ACK: u16 = 1;
/// Flag: the datagram ends in an integrity tag (`proto::mac`).
pub const FLAG_MAC: u16 = 2;
/// INIT / INIT_ACK flag: the sender uses per-datagram integrity; its nonce follows the
/// body.
pub const INIT_MAC: u32 = 1;

/// Datagram types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Opens a connection (initiator → target).
    Init = 1,
    /// Accepts it (target → initiator).
    InitAck = 2,
    /// Carries wire messages; has a packet number and is acknowledged.
    Data = 3,
    /// Only an ACK block; never acknowledged.
    Ack = 4,
    /// The connection is refused or gone.
    Reset = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Init,
            2 => Kind::InitAck,
            3 => Kind::Data,
            4 => Kind::Ack,
            5 => Kind::Reset,
            _ => return None,
        })
    }
}

/// Connection parameters exchanged in INIT / INIT_ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    /// The sender's connection id: the `dst` of every datagram sent to it.
    pub conn_id: u32,
    /// The sender's first packet number.
    pub first_seq: u32,
    /// Largest datagram the sender accepts (UDP payload bytes).
    pub max_datagram: u32,
    /// Packets the sender can take beyond its cumulative ACK.
    pub window: u32,
    /// [`INIT_MAC`] or zero; other bits are reserved.
    pub flags: u32,
}

/// A SACK range: `len` packets starting `gap` packets after the end of the previous
/// range (or after the cumulative ACK for the first range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SackRange {
    pub gap: u16,
    pub len: u16,
}

/// Acknowledgement state: everything before `cumulative` arrived, plus the SACK ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckBlock {
    /// The next packet number expected: all earlier ones arrived.
    pub cumulative: u32,
    /// Packets the receiver accepts from `cumulative` on (0 pauses the sender).
    pub window: u32,
    /// How long the receiver held this ACK back, in microseconds (for RTT estimates).
    pub delay_us: u16,
    /// Arrived packets above `cumulative`, in increasing order.
    pub ranges: Vec<SackRange>,
}

/// Reasons in a RESET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ResetReason {
    /// No connection with this id (stale or forged).
    UnknownConnection = 1,
    /// The endpoint is at its connection limit.
    Busy = 2,
    /// The peer closed the connection.
    Closed = 3,
    /// Unsupported datagram version or parameters.
    Unsupported = 4,
    /// The target requires per-datagram integrity and the INIT did not ask for it.
    IntegrityRequired = 5,
}

impl ResetReason {
    fn from_u16(v: u16) -> Option<ResetReason> {
        Some(match v {
            1 => ResetReason::UnknownConnection,
            2 => ResetReason::Busy,
            3 => ResetReason::Closed,
            4 => ResetReason::Unsupported,
            5 => ResetReason::IntegrityRequired,
            _ => return None,
        })
    }
}

/// A decoded datagram header. For DATA, the wire messages start at `body_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub kind: Kind,
    pub dst: u32,
    pub seq: u32,
    pub ack: Option<AckBlock>,
    pub init: Option<Init>,
    pub reset: Option<ResetReason>,
    /// A RESET answering a datagram for an unknown connection: the connection id that
    /// datagram named (its sender's peer id for the connection).
    pub unknown: Option<u32>,
    /// The INIT / INIT_ACK sender's integrity nonce ([`INIT_MAC`]).
    pub nonce: Option<[u8; super::mac::NONCE_LEN]>,
    /// The datagram ends in an integrity tag ([`FLAG_MAC`]); the messages of a DATA
    /// packet stop before it.
    pub mac: bool,
    /// Offset of the DATA messages in the datagram.
    pub body_at: usize,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("datagram shorter than its header")]
    Truncated,
    #[error("unsupported datagram version {0}")]
    Version(u8),
    #[error("unknown datagram type {0}")]
    Kind(u8),
    #[error("reserved bits set")]
    Reserved,
    #[error("too many SACK ranges ({0})")]
    TooManyRanges(u8),
    #[error("unknown reset reason {0}")]
    Reason(u16),
}

struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl Rd<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], PacketError> {
        let s = self
            .b
            .get(self.at..self.at + N)
            .ok_or(PacketError::Truncated)?;
        self.at += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, PacketError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, PacketError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
}

impl Packet {
    /// Decode the header of `b`.
    pub fn decode(b: &[u8]) -> Result<Packet, PacketError> {
        let mut r = Rd { b, at: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(PacketError::Version(version));
        }
        let kb = r.u8()?;
        let kind = Kind::from_u8(kb).ok_or(PacketError::Kind(kb))?;
        let flags = r.u16()?;
        if flags & !(FLAG_ACK | FLAG_MAC) != 0 || (kind == Kind::Init && flags & FLAG_MAC != 0) {
            return Err(PacketError::Reserved);
        }
        let dst = r.u32()?;
        let seq = r.u32()?;
        if kind != Kind::Data && seq != 0 {
            return Err(PacketError::Reserved);
        }
        let mut p = Packet {
            kind,
            dst,
            seq,
            ack: None,
            init: None,
            reset: None,
            unknown: None,
            nonce: None,
            mac: flags & FLAG_MAC != 0,
            body_at: 0,
        };
        match kind {
            Kind::Init | Kind::InitAck => {
                if flags & FLAG_ACK != 0 {
                    return Err(PacketError::Reserved);
                }
                let init = Init {
                    conn_id: r.u32()?,
                    first_seq: r.u32()?,
                    max_datagram: r.u32()?,
                    window: r.u32()?,
                    flags: r.u32()?,
                };
                if init.flags & !INIT_MAC != 0 {
                    return Err(PacketError::Reserved);
                }
                if init.flags & INIT_MAC != 0 {
                    p.nonce = Some(r.take()?);
                }
                p.init = Some(init);
            }
            Kind::Reset => {
                if flags & FLAG_ACK != 0 {
                    return Err(PacketError::Reserved);
                }
                let v = r.u16()?;
                p.reset = Some(ResetReason::from_u16(v).ok_or(PacketError::Reason(v))?);
                let tag = if p.mac { super::mac::TAG_LEN } else { 0 };
                if p.reset == Some(ResetReason::UnknownConnection) && b.len() >= r.at + 4 + tag {
                    p.unknown = Some(r.u32()?);
                }
            }
            Kind::Ack | Kind::Data => {
                if flags & FLAG_ACK != 0 || kind == Kind::Ack {
                    let cumulative = r.u32()?;
                    let window = r.u32()?;
                    let delay_us = r.u16()?;
                    let n = r.u8()?;
                    if n as usize > MAX_SACK {
                        return Err(PacketError::TooManyRanges(n));
                    }
                    if r.u8()? != 0 {
                        return Err(PacketError::Reserved);
                    }
                    let mut ranges = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        ranges.push(SackRange {
                            gap: r.u16()?,
                            len: r.u16()?,
                        });
                    }
                    p.ack = Some(AckBlock {
                        cumulative,
                        window,
                        delay_us,
                        ranges,
                    });
                }
            }
        }
        p.body_at = r.at;
        if p.mac && b.len() < r.at + super::mac::TAG_LEN {
            return Err(PacketError::Truncated);
        }
        Ok(p)
    }
}

/// Append a datagram prefix to `out`.
pub fn put_prefix(out: &mut Vec<u8>, kind: Kind, dst: u32, seq: u32, with_ack: bool) {
    out.push(VERSION);
    out.push(kind as u8);
    let flags = if with_ack && kind == Kind::Data {
        FLAG_ACK
    } else {
        0
    };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&dst.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
}

/// Append an ACK block.
pub fn put_ack(out: &mut Vec<u8>, a: &AckBlock) {
    out.extend_from_slice(&a.cumulative.to_le_bytes());
    out.extend_from_slice(&a.window.to_le_bytes());
    out.extend_from_slice(&a.delay_us.to_le_bytes());
    let n = a.ranges.len().min(MAX_SACK);
    out.push(n as u8);
    out.push(0);
    for r in &a.ranges[..n] {
        out.extend_from_slice(&r.gap.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
    }
}

/// Append an INIT / INIT_ACK body, and the integrity nonce if `i.flags` has
/// [`INIT_MAC`] (`nonce` must then be given).
pub fn put_init(out: &mut Vec<u8>, i: &Init, nonce: Option<&[u8; super::mac::NONCE_LEN]>) {
    for v in [i.conn_id, i.first_seq, i.max_datagram, i.window, i.flags] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert_eq!(i.flags & INIT_MAC != 0, nonce.is_some());
    if let Some(n) = nonce {
        out.extend_from_slice(n);
    }
}

/// Mark the datagram whose prefix starts `head` as ending in an integrity tag.
pub fn set_mac_flag(head: &mut [u8]) {
    if let Some(f) = head.get_mut(2) {
        *f |= FLAG_MAC as u8;
    }
}

/// Encode a whole RESET datagram.
pub fn reset(dst: u32, why: ResetReason) -> Vec<u8> {
    let mut v = Vec::with_capacity(PREFIX_LEN + 2);
    put_prefix(&mut v, Kind::Reset, dst, 0, false);
    v.extend_from_slice(&(why as u16).to_le_bytes());
    v
}

/// Encode a RESET answering a datagram addressed to `unknown`, a connection this side
/// does not have (`dst` 0: the datagram did not say who sent it).
pub fn reset_unknown(unknown: u32) -> Vec<u8> {
    let mut v = reset(0, ResetReason::UnknownConnection);
    v.extend_from_slice(&unknown.to_le_bytes());
    v
}

/// Serial-number comparison of packet numbers (RFC 1982): `a` comes before `b`.
pub fn seq_lt(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// `a` comes before or is `b`.
pub fn seq_le(a: u32, b: u32) -> bool {
    a == b || seq_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_ack_block_is_max_ack_len_bytes() {
        let a = AckBlock {
            cumulative: u32::MAX,
            window: u32::MAX,
            delay_us: u16::MAX,
            ranges: vec![SackRange { gap: 1, len: 1 }; MAX_SACK + 3],
        };
        let mut out = Vec::new();
        put_ack(&mut out, &a);
        assert_eq!(out.len(), MAX_ACK_LEN);
    }
    use proptest::prelude::*;

    fn ack() -> impl Strategy<Value = AckBlock> {
        (
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            proptest::collection::vec((any::<u16>(), any::<u16>()), 0..=MAX_SACK),
        )
            .prop_map(|(cumulative, window, delay_us, r)| AckBlock {
                cumulative,
                window,
                delay_us,
                ranges: r
                    .into_iter()
                    .map(|(gap, len)| SackRange { gap, len })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn data_round_trips(dst in any::<u32>(), seq in any::<u32>(), a in proptest::option::of(ack()), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut v = Vec::new();
            put_prefix(&mut v, Kind::Data, dst, seq, a.is_some());
            if let Some(a) = &a { put_ack(&mut v, a); }
            let at = v.len();
            v.extend_from_slice(&body);
            let p = Packet::decode(&v).unwrap();
            prop_assert_eq!(p.kind, Kind::Data);
            prop_assert_eq!(p.dst, dst);
            prop_assert_eq!(p.seq, seq);
            prop_assert_eq!(p.ack, a);
            prop_assert_eq!(p.body_at, at);
        }

        #[test]
        fn init_round_trips(kind in prop_oneof![Just(Kind::Init), Just(Kind::InitAck)], dst in any::<u32>(), i in (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>())) {
            let init = Init { conn_id: i.0, first_seq: i.1, max_datagram: i.2, window: i.3, flags: 0 };
            let mut v = Vec::new();
            put_prefix(&mut v, kind, dst, 0, false);
            put_init(&mut v, &init, None);
            let p = Packet::decode(&v).unwrap();
            prop_assert_eq!(p.init, Some(init));
            prop_assert_eq!(p.body_at, v.len());
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Packet::decode(&b);
        }
    }

    #[test]
    fn serial_numbers_wrap() {
        assert!(seq_lt(u32::MAX, 0));
        assert!(seq_lt(u32::MAX - 5, 3));
        assert!(!seq_lt(3, u32::MAX - 5));
        assert!(seq_le(7, 7));
        assert!(seq_lt(0, 0x7fff_ffff));
    }

    #[test]
    fn reset_decodes() {
        let v = reset(9, ResetReason::Busy);
        let p = Packet::decode(&v).unwrap();
        assert_eq!(p.kind, Kind::Reset);
        assert_eq!(p.reset, Some(ResetReason::Busy));
        assert_eq!(Packet::decode(&v[..5]), Err(PacketError::Truncated));
    }
}
