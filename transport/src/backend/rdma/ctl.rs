//! What the rdma engine carries in SEND messages and in rdma_cm private data.
//!
//! Every SEND starts with a type byte. Two-sided application messages are cut into
//! `MSG_MORE` pieces ended by a `MSG_END` piece (RC delivers SENDs in order, so pieces
//! need no numbers). The rest are the engine's own control messages, all fixed-size
//! little-endian records. Anything malformed closes the connection that sent it.

use crate::auth::{NONCE_LEN, PROOF_LEN};
use crate::wire::{ErrorCode, TOKEN_LEN};

pub(crate) const MSG_MORE: u8 = 1;
pub(crate) const MSG_END: u8 = 2;
pub(crate) const KEY_REQ: u8 = 3;
pub(crate) const KEY_ANS: u8 = 4;
pub(crate) const REVOKE: u8 = 5;
pub(crate) const REVOKE_ACK: u8 = 6;
pub(crate) const NOTIFY: u8 = 7;
pub(crate) const AUTH: u8 = 8;
pub(crate) const MSG_ACK: u8 = 9;

/// Magic and version at the start of connect and accept private data.
pub(crate) const MAGIC: [u8; 4] = *b"PFSR";
pub(crate) const VERSION: u8 = 1;

/// Flags, the byte after the version: authentication data follows (a nonce in the
/// hello, a proof in the welcome).
const F_AUTH: u8 = 1;
/// Flags: the sender's NIC performs atomics on big-endian 8-byte words. Verbs atomics
/// work in the byte order of the responder's host (a device that cannot offers no
/// atomics, `atomic_cap` NONE), so this is set by big-endian hosts.
const F_BE_WORDS: u8 = 2;

/// Whether this host's NIC performs atomics on big-endian words (see `F_BE_WORDS`).
pub(crate) const HOST_BE_WORDS: bool = cfg!(target_endian = "big");

/// The initiator's private data on `rdma_connect` (at most 56 bytes on RC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) endpoint: u64,
    pub(crate) max_payload: u32,
    /// Present when the initiator authenticates.
    pub(crate) nonce: Option<[u8; NONCE_LEN]>,
    /// The initiator's NIC performs atomics on big-endian words.
    pub(crate) be_words: bool,
}

fn flags(auth: bool, be_words: bool) -> u8 {
    (if auth { F_AUTH } else { 0 }) | (if be_words { F_BE_WORDS } else { 0 })
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(18 + NONCE_LEN);
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.push(flags(self.nonce.is_some(), self.be_words));
        b.extend_from_slice(&self.endpoint.to_le_bytes());
        b.extend_from_slice(&self.max_payload.to_le_bytes());
        if let Some(n) = &self.nonce {
            b.extend_from_slice(n);
        }
        b
    }

    /// `Err` names what is wrong (for the rejection the peer gets).
    pub(crate) fn decode(b: &[u8]) -> Result<Hello, String> {
        if b.len() < 18 || b[..4] != MAGIC {
            return Err("not a PacketFS rdma connection request".into());
        }
        if b[4] != VERSION {
            return Err(format!(
                "rdma handshake version {} (this endpoint speaks {VERSION})",
                b[4]
            ));
        }
        let endpoint = u64::from_le_bytes(b[6..14].try_into().expect("8 bytes"));
        let max_payload = u32::from_le_bytes(b[14..18].try_into().expect("4 bytes"));
        if b[5] & !(F_AUTH | F_BE_WORDS) != 0 {
            return Err(format!(
                "unknown flags {:#04x} in the connection request",
                b[5]
            ));
        }
        let nonce = match b[5] & F_AUTH {
            0 => None,
            _ if b.len() >= 18 + NONCE_LEN => {
                Some(b[18..18 + NONCE_LEN].try_into().expect("nonce length"))
            }
            _ => return Err("malformed authentication data in the connection request".into()),
        };
        Ok(Hello {
            endpoint,
            max_payload,
            nonce,
            be_words: b[5] & F_BE_WORDS != 0,
        })
    }
}

/// The target's private data on `rdma_accept`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Welcome {
    pub(crate) endpoint: u64,
    pub(crate) max_payload: u32,
    /// The target's nonce and proof, when it authenticates.
    pub(crate) proof: Option<Vec<u8>>,
    /// The target's NIC performs atomics on big-endian words.
    pub(crate) be_words: bool,
}

impl Welcome {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(18 + NONCE_LEN + PROOF_LEN);
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.push(flags(self.proof.is_some(), self.be_words));
        b.extend_from_slice(&self.endpoint.to_le_bytes());
        b.extend_from_slice(&self.max_payload.to_le_bytes());
        if let Some(p) = &self.proof {
            b.extend_from_slice(p);
        }
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Welcome> {
        if b.len() < 18 || b[..4] != MAGIC || b[4] != VERSION {
            return None;
        }
        if b[5] & !(F_AUTH | F_BE_WORDS) != 0 {
            return None;
        }
        let proof = match b[5] & F_AUTH {
            0 => None,
            _ if b.len() >= 18 + NONCE_LEN + PROOF_LEN => {
                Some(b[18..18 + NONCE_LEN + PROOF_LEN].to_vec())
            }
            _ => return None,
        };
        Some(Welcome {
            endpoint: u64::from_le_bytes(b[6..14].try_into().ok()?),
            max_payload: u32::from_le_bytes(b[14..18].try_into().ok()?),
            proof,
            be_words: b[5] & F_BE_WORDS != 0,
        })
    }
}

/// Why a target rejected a connection request (private data of `rdma_reject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RejectCode {
    AuthRequired = 1,
    Busy = 2,
    Malformed = 3,
}

pub(crate) fn encode_reject(code: RejectCode, why: &str) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.push(code as u8);
    let text = why.as_bytes();
    b.extend_from_slice(&text[..text.len().min(140)]);
    b
}

pub(crate) fn decode_reject(b: &[u8]) -> Option<(u8, String)> {
    if b.len() < 5 || b[..4] != MAGIC {
        return None;
    }
    Some((b[4], String::from_utf8_lossy(&b[5..]).into_owned()))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A request for the registration behind a key: `region`, `token`, and the rights the
/// access at hand needs (the target refuses a grant without them).
pub(crate) fn key_req(req: u32, region: u64, token: &[u8; TOKEN_LEN], need: u8) -> Vec<u8> {
    let mut b = vec![KEY_REQ];
    b.extend_from_slice(&req.to_le_bytes());
    b.extend_from_slice(&region.to_le_bytes());
    b.extend_from_slice(token);
    b.push(need);
    b
}

pub(crate) fn parse_key_req(b: &[u8]) -> Option<(u32, u64, [u8; TOKEN_LEN], u8)> {
    if b.len() != 1 + 4 + 8 + TOKEN_LEN + 1 {
        return None;
    }
    Some((
        u32_at(b, 1)?,
        u64_at(b, 5)?,
        b[13..13 + TOKEN_LEN].try_into().ok()?,
        b[13 + TOKEN_LEN],
    ))
}

/// `n` more messages were queued for the receiving application, oldest first.
pub(crate) fn msg_ack(n: u32) -> Vec<u8> {
    let mut b = vec![MSG_ACK];
    b.extend_from_slice(&n.to_le_bytes());
    b
}

pub(crate) fn parse_msg_ack(b: &[u8]) -> Option<u32> {
    if b.len() != 5 {
        return None;
    }
    u32_at(b, 1)
}

/// What a target grants for a key: where the region is, under which rkey, with which
/// rights and length, until when (ms from now, 0: no expiry), and the grant's id for
/// revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrantInfo {
    pub(crate) grant: u64,
    pub(crate) addr: u64,
    pub(crate) rkey: u32,
    pub(crate) len: u64,
    pub(crate) rights: u8,
    pub(crate) expires_in_ms: u64,
}

/// The answer to a key request: a grant, or a refusal with its code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyAnswer {
    Granted(GrantInfo),
    Refused(ErrorCode, String),
}

pub(crate) fn key_ans(req: u32, a: &KeyAnswer) -> Vec<u8> {
    let mut b = vec![KEY_ANS];
    b.extend_from_slice(&req.to_le_bytes());
    match a {
        KeyAnswer::Granted(g) => {
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&g.grant.to_le_bytes());
            b.extend_from_slice(&g.addr.to_le_bytes());
            b.extend_from_slice(&g.rkey.to_le_bytes());
            b.extend_from_slice(&g.len.to_le_bytes());
            b.push(g.rights);
            b.extend_from_slice(&g.expires_in_ms.to_le_bytes());
        }
        KeyAnswer::Refused(code, why) => {
            b.extend_from_slice(&(*code as u16).to_le_bytes());
            let t = why.as_bytes();
            b.extend_from_slice(&t[..t.len().min(512)]);
        }
    }
    b
}

pub(crate) fn parse_key_ans(b: &[u8]) -> Option<(u32, KeyAnswer)> {
    let req = u32_at(b, 1)?;
    let code = u16::from_le_bytes(b.get(5..7)?.try_into().ok()?);
    if code == 0 {
        if b.len() != 7 + 8 + 8 + 4 + 8 + 1 + 8 {
            return None;
        }
        let g = GrantInfo {
            grant: u64_at(b, 7)?,
            addr: u64_at(b, 15)?,
            rkey: u32_at(b, 23)?,
            len: u64_at(b, 27)?,
            rights: b[35],
            expires_in_ms: u64_at(b, 36)?,
        };
        // A registration ends inside the address space: every remote address computed
        // from a checked offset (`offset + len <= g.len`) then fits a u64.
        g.addr.checked_add(g.len)?;
        return Some((req, KeyAnswer::Granted(g)));
    }
    let code = ErrorCode::from_u16(code)?;
    Some((
        req,
        KeyAnswer::Refused(code, String::from_utf8_lossy(&b[7..]).into_owned()),
    ))
}

/// `REVOKE` / `REVOKE_ACK` of one grant.
pub(crate) fn revoke(kind: u8, grant: u64) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&grant.to_le_bytes());
    b
}

pub(crate) fn parse_revoke(b: &[u8]) -> Option<u64> {
    if b.len() != 9 {
        return None;
    }
    u64_at(b, 1)
}

/// A write notification: sent after the write on the same queue pair, so it arrives
/// after the bytes are placed.
pub(crate) fn notify(region: u64, offset: u64, len: u64, imm: u32) -> Vec<u8> {
    let mut b = vec![NOTIFY];
    b.extend_from_slice(&region.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&imm.to_le_bytes());
    b
}

pub(crate) fn parse_notify(b: &[u8]) -> Option<(u64, u64, u64, u32)> {
    if b.len() != 29 {
        return None;
    }
    Some((u64_at(b, 1)?, u64_at(b, 9)?, u64_at(b, 17)?, u32_at(b, 25)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let h = Hello {
            endpoint: 7,
            max_payload: 1 << 20,
            nonce: Some([3; NONCE_LEN]),
            be_words: false,
        };
        let e = h.encode();
        assert!(e.len() <= 56, "REQ private data is limited to 56 bytes");
        assert_eq!(Hello::decode(&e).unwrap(), h);
        assert!(Hello::decode(&e[..10]).is_err());
        let mut bad = e.clone();
        bad[4] = 9;
        assert!(Hello::decode(&bad).unwrap_err().contains("version 9"));
        let w = Welcome {
            endpoint: 9,
            max_payload: 5,
            proof: Some(vec![1; NONCE_LEN + PROOF_LEN]),
            be_words: false,
        };
        assert_eq!(Welcome::decode(&w.encode()).unwrap(), w);
        let g = KeyAnswer::Granted(GrantInfo {
            grant: 1,
            addr: 2,
            rkey: 3,
            len: 4,
            rights: 5,
            expires_in_ms: 6,
        });
        assert_eq!(parse_key_ans(&key_ans(11, &g)).unwrap(), (11, g));
        let r = KeyAnswer::Refused(ErrorCode::Revoked, "key revoked".into());
        assert_eq!(parse_key_ans(&key_ans(12, &r)).unwrap(), (12, r));
        assert!(parse_key_ans(&[KEY_ANS, 1, 2]).is_none());
        let wraps = KeyAnswer::Granted(GrantInfo {
            grant: 1,
            addr: u64::MAX - 3,
            rkey: 3,
            len: 4096,
            rights: 5,
            expires_in_ms: 0,
        });
        assert!(parse_key_ans(&key_ans(13, &wraps)).is_none());
        assert_eq!(
            parse_key_req(&key_req(1, 2, &[9; TOKEN_LEN], 3)),
            Some((1, 2, [9; TOKEN_LEN], 3))
        );
        assert_eq!(parse_msg_ack(&msg_ack(5)), Some(5));
        assert!(parse_key_req(&[KEY_REQ; 5]).is_none());
        assert_eq!(parse_notify(&notify(1, 2, 3, 4)), Some((1, 2, 3, 4)));
        assert_eq!(parse_revoke(&revoke(REVOKE, 77)), Some(77));
        assert_eq!(
            decode_reject(&encode_reject(RejectCode::Busy, "full")),
            Some((2, "full".into()))
        );
    }

    #[test]
    fn the_word_order_flag_rides_with_the_auth_flag() {
        for (nonce, be_words) in [(None, false), (None, true), (Some([4; NONCE_LEN]), true)] {
            let h = Hello {
                endpoint: 1,
                max_payload: 2,
                nonce,
                be_words,
            };
            assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
            let w = Welcome {
                endpoint: 3,
                max_payload: 4,
                proof: nonce.map(|_| vec![2; NONCE_LEN + PROOF_LEN]),
                be_words,
            };
            assert_eq!(Welcome::decode(&w.encode()).unwrap(), w);
        }
        // A flag this version does not know is refused, not ignored.
        let mut h = Hello {
            endpoint: 1,
            max_payload: 2,
            nonce: None,
            be_words: false,
        }
        .encode();
        h[5] = 4;
        assert!(
            Hello::decode(&h)
                .unwrap_err()
                .contains("unknown flags 0x04")
        );
        let mut w = Welcome {
            endpoint: 1,
            max_payload: 2,
            proof: None,
            be_words: false,
        }
        .encode();
        w[5] = 0x80;
        assert!(Welcome::decode(&w).is_none());
    }
}
