//! Per-datagram integrity: a keyed BLAKE3 tag on every datagram of a connection after
//! INIT, under session keys derived from the cluster secret and both sides' INIT nonces
//! (`docs/security.md`, `docs/datagram.md`).
//!
//! Each direction has its own key, so a datagram cannot be reflected back to its
//! sender, and each connection its own pair, so a datagram of one connection does not
//! verify on another. A keyed BLAKE3 hash is a PRF: unlike GMAC or Poly1305 it needs no
//! per-datagram nonce, so a retransmission that repacks a packet number with different
//! bytes (a fresher ACK block) is safe. Replays of a whole datagram verify, and are
//! dropped by the packet-number window like any duplicate.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::auth::Secret;

/// Bytes of the tag at the end of every protected datagram.
pub(crate) const TAG_LEN: usize = 16;
/// Bytes of the nonce each side puts in its INIT / INIT_ACK.
pub(crate) const NONCE_LEN: usize = 32;

const I2T: &[u8] = b"PacketFS datagram v1 initiator to target";
const T2I: &[u8] = b"PacketFS datagram v1 target to initiator";

/// What both session keys are bound to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding {
    pub(crate) initiator_nonce: [u8; NONCE_LEN],
    pub(crate) target_nonce: [u8; NONCE_LEN],
    /// Connection ids, as each side announced its own.
    pub(crate) initiator_conn: u32,
    pub(crate) target_conn: u32,
}

/// The session keys of one connection, wiped on drop.
pub(crate) struct Keys {
    send: [u8; 32],
    recv: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.send.zeroize();
        self.recv.zeroize();
    }
}

fn derive_one(secret: &Secret, label: &[u8], b: &Binding) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.bytes()).expect("HMAC takes any key");
    m.update(label);
    m.update(&b.initiator_nonce);
    m.update(&b.target_nonce);
    m.update(&b.initiator_conn.to_le_bytes());
    m.update(&b.target_conn.to_le_bytes());
    m.finalize().into_bytes().into()
}

impl Keys {
    /// The keys of one side: `initiator` says which.
    pub(crate) fn derive(secret: &Secret, b: &Binding, initiator: bool) -> Keys {
        let i2t = derive_one(secret, I2T, b);
        let t2i = derive_one(secret, T2I, b);
        if initiator {
            Keys {
                send: i2t,
                recv: t2i,
            }
        } else {
            Keys {
                send: t2i,
                recv: i2t,
            }
        }
    }

    /// A hasher for a datagram we send: feed it every byte, then [`finish`].
    pub(crate) fn sealer(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.send)
    }

    /// If the last [`TAG_LEN`] bytes of `d` are a valid tag over the rest, the rest.
    pub(crate) fn open<'a>(&self, d: &'a [u8]) -> Option<&'a [u8]> {
        let split = d.len().checked_sub(TAG_LEN)?;
        let (body, tag) = d.split_at(split);
        let mut h = blake3::Hasher::new_keyed(&self.recv);
        h.update(body);
        let want = finish(&h);
        bool::from(want.ct_eq(tag)).then_some(body)
    }
}

/// The tag of everything fed to `h`.
pub(crate) fn finish(h: &blake3::Hasher) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            initiator_nonce: [1; NONCE_LEN],
            target_nonce: [2; NONCE_LEN],
            initiator_conn: 7,
            target_conn: 9,
        }
    }

    fn seal(k: &Keys, body: &[u8]) -> Vec<u8> {
        let mut h = k.sealer();
        h.update(body);
        let mut v = body.to_vec();
        v.extend_from_slice(&finish(&h));
        v
    }

    #[test]
    fn tags_verify_one_way_only_and_with_the_same_secret() {
        let s = Secret::from_bytes(b"0123456789abcdef-secret").unwrap();
        let i = Keys::derive(&s, &binding(), true);
        let t = Keys::derive(&s, &binding(), false);
        let d = seal(&i, b"hello target");
        assert_eq!(t.open(&d), Some(&b"hello target"[..]));
        // Reflected back to the initiator, it does not verify.
        assert_eq!(i.open(&d), None);
        // Any changed bit breaks it.
        for bit in 0..d.len() * 8 {
            let mut x = d.clone();
            x[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(t.open(&x), None, "bit {bit}");
        }
        // Truncated or empty.
        assert_eq!(t.open(&d[..d.len() - 1]), None);
        assert_eq!(t.open(&[]), None);
        // Another secret, or another connection, derives other keys.
        let other = Secret::from_bytes(b"another secret of the cluster").unwrap();
        assert_eq!(Keys::derive(&other, &binding(), false).open(&d), None);
        let mut b2 = binding();
        b2.target_conn = 10;
        assert_eq!(Keys::derive(&s, &b2, false).open(&d), None);
        assert_eq!(format!("{t:?}"), "Keys(..)");
    }
}
