//! Region keys: capabilities that grant access to a remote region.

use std::fmt;
use std::ops::{BitAnd, BitOr};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Error, Result};
use crate::wire::TOKEN_LEN;

/// Access rights on a region: any combination of read, write and atomic.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

impl Rights {
    /// No access.
    pub const NONE: Rights = Rights(0);
    /// One-sided reads.
    pub const READ: Rights = Rights(1);
    /// One-sided writes (with or without notification).
    pub const WRITE: Rights = Rights(2);
    /// Compare-and-swap and fetch-and-add.
    pub const ATOMIC: Rights = Rights(4);
    /// Read, write and atomic.
    pub const ALL: Rights = Rights(7);

    /// Whether every right in `other` is in `self`.
    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits (read = 1, write = 2, atomic = 4).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// From raw bits; `None` if unknown bits are set.
    pub fn from_bits(b: u8) -> Option<Rights> {
        (b & !7 == 0).then_some(Rights(b))
    }
}

impl BitOr for Rights {
    type Output = Rights;
    fn bitor(self, o: Rights) -> Rights {
        Rights(self.0 | o.0)
    }
}

impl BitAnd for Rights {
    type Output = Rights;
    fn bitand(self, o: Rights) -> Rights {
        Rights(self.0 & o.0)
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        for (bit, name) in [
            (Rights::READ, 'r'),
            (Rights::WRITE, 'w'),
            (Rights::ATOMIC, 'a'),
        ] {
            s.push(if self.contains(bit) { name } else { '-' });
        }
        f.write_str(&s)
    }
}

/// Options for a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOptions {
    /// Rights granted; must be a subset of the region's rights.
    pub rights: Rights,
    /// Lifetime; `None` for a key that lives until revoked or the region is dropped.
    pub expires_in: Option<Duration>,
}

impl KeyOptions {
    /// Options granting `rights`, never expiring.
    pub fn new(rights: Rights) -> Self {
        KeyOptions {
            rights,
            expires_in: None,
        }
    }

    /// Expire after `d`.
    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires_in = Some(d);
        self
    }
}

/// Version of the key encoding.
pub const KEY_VERSION: u8 = 1;
const PREFIX: &str = "pfsk1.";
const FIXED_LEN: usize = 1 + 8 + 8 + 8 + 1 + TOKEN_LEN + 8 + 2;
const MAX_BACKEND: usize = 256;

/// A capability for one remote region: who owns it, which region, how long it is, what
/// it allows, an unguessable token, an optional expiry and an opaque backend part (the
/// rkey and address on RDMA).
///
/// Hand it to peers as a string: `key.to_string()` and `"pfsk1.…".parse::<RegionKey>()`.
/// The target checks every access against its own record of the key (token, rights,
/// revocation, expiry, bounds), so a key that was tampered with grants nothing more.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RegionKey {
    pub(crate) owner: u64,
    pub(crate) region: u64,
    pub(crate) len: u64,
    pub(crate) rights: Rights,
    pub(crate) token: [u8; TOKEN_LEN],
    pub(crate) expires_ms: u64,
    pub(crate) backend: Vec<u8>,
}

impl fmt::Debug for RegionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: never print it.
        f.debug_struct("RegionKey")
            .field("owner", &format_args!("{:016x}", self.owner))
            .field("region", &self.region)
            .field("len", &self.len)
            .field("rights", &self.rights)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

impl RegionKey {
    /// Key format version.
    pub fn version(&self) -> u8 {
        KEY_VERSION
    }
    /// Id of the endpoint that owns the region.
    pub fn owner(&self) -> u64 {
        self.owner
    }
    /// Region id at the owner.
    pub fn region(&self) -> u64 {
        self.region
    }
    /// Length of the region in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the region is empty (never true: regions have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Rights the key grants.
    pub fn rights(&self) -> Rights {
        self.rights
    }
    /// Expiry as a wall-clock time, if any.
    pub fn expires(&self) -> Option<SystemTime> {
        (self.expires_ms != 0).then(|| UNIX_EPOCH + Duration::from_millis(self.expires_ms))
    }
    /// The opaque backend part.
    pub fn backend_data(&self) -> &[u8] {
        &self.backend
    }

    /// The key's binary encoding (what the string form carries).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_LEN + self.backend.len());
        b.push(KEY_VERSION);
        b.extend_from_slice(&self.owner.to_le_bytes());
        b.extend_from_slice(&self.region.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.push(self.rights.bits());
        b.extend_from_slice(&self.token);
        b.extend_from_slice(&self.expires_ms.to_le_bytes());
        b.extend_from_slice(&(self.backend.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.backend);
        b
    }

    /// Decode the binary encoding.
    pub fn from_bytes(b: &[u8]) -> Result<RegionKey> {
        let bad = |reason: String| Error::InvalidKey { reason };
        if b.len() < FIXED_LEN {
            return Err(bad(format!(
                "{} bytes is too short for a key ({FIXED_LEN} at least)",
                b.len()
            )));
        }
        if b[0] != KEY_VERSION {
            return Err(bad(format!(
                "key version {} is not supported (this build reads version {KEY_VERSION})",
                b[0]
            )));
        }
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let owner = u64_at(1);
        let region = u64_at(9);
        let len = u64_at(17);
        let rights = Rights::from_bits(b[25])
            .ok_or_else(|| bad(format!("unknown rights bits {:#x}", b[25])))?;
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&b[26..26 + TOKEN_LEN]);
        let expires_ms = u64_at(26 + TOKEN_LEN);
        let blen = u16::from_le_bytes([b[FIXED_LEN - 2], b[FIXED_LEN - 1]]) as usize;
        if blen > MAX_BACKEND {
            return Err(bad(format!("backend part of {blen} bytes is too long")));
        }
        if b.len() != FIXED_LEN + blen {
            return Err(bad(format!(
                "length {} does not match its backend part ({} expected)",
                b.len(),
                FIXED_LEN + blen
            )));
        }
        if len == 0 {
            return Err(bad("a key for an empty region".into()));
        }
        Ok(RegionKey {
            owner,
            region,
            len,
            rights,
            token,
            expires_ms,
            backend: b[FIXED_LEN..].to_vec(),
        })
    }
}

impl fmt::Display for RegionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl FromStr for RegionKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<RegionKey> {
        let body = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| Error::InvalidKey {
                reason: format!("a key string starts with {PREFIX:?}"),
            })?;
        if body.len() > 4 * (FIXED_LEN + MAX_BACKEND) / 3 + 4 {
            return Err(Error::InvalidKey {
                reason: "key string is too long".into(),
            });
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| Error::InvalidKey {
                reason: format!("not base64url: {e}"),
            })?;
        RegionKey::from_bytes(&bytes)
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh unguessable token from the operating system's CSPRNG.
pub(crate) fn new_token() -> Result<[u8; TOKEN_LEN]> {
    crate::sys::random_bytes()
}

/// Compare tokens in time independent of where they differ.
pub(crate) fn token_eq(a: &[u8; TOKEN_LEN], b: &[u8; TOKEN_LEN]) -> bool {
    let mut d = 0u8;
    for i in 0..TOKEN_LEN {
        d |= a[i] ^ b[i];
    }
    std::hint::black_box(d) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = RegionKey> {
        (
            any::<u64>(),
            any::<u64>(),
            1u64..,
            0u8..8,
            any::<[u8; 16]>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(
                |(owner, region, len, r, token, expires_ms, backend)| RegionKey {
                    owner,
                    region,
                    len,
                    rights: Rights::from_bits(r).unwrap(),
                    token,
                    expires_ms,
                    backend,
                },
            )
    }

    proptest! {
        #[test]
        fn string_round_trips(k in key()) {
            let s = k.to_string();
            prop_assert!(s.starts_with("pfsk1."));
            prop_assert_eq!(s.parse::<RegionKey>().unwrap(), k);
        }

        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = s.parse::<RegionKey>();
            let _ = RegionKey::from_bytes(s.as_bytes());
        }

        #[test]
        fn from_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = RegionKey::from_bytes(&b);
        }
    }

    #[test]
    fn debug_hides_token() {
        let k = RegionKey {
            owner: 1,
            region: 2,
            len: 3,
            rights: Rights::ALL,
            token: [0xab; 16],
            expires_ms: 0,
            backend: vec![],
        };
        assert!(!format!("{k:?}").contains("ab, ab"));
        assert!(!format!("{k:?}").to_lowercase().contains("abab"));
    }

    #[test]
    fn rights_display() {
        assert_eq!(Rights::READ.to_string(), "r--");
        assert_eq!((Rights::WRITE | Rights::ATOMIC).to_string(), "-wa");
        assert!(Rights::ALL.contains(Rights::READ | Rights::WRITE));
        assert!(!Rights::READ.contains(Rights::WRITE));
    }
}
