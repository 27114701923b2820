//! Peer authentication with a cluster secret: a mutual HMAC-SHA256 challenge-response
//! at connection setup.
//!
//! Both sides send a fresh 32-byte nonce. The target proves it holds the secret over
//! both nonces and both endpoint ids; the initiator checks that proof and answers with
//! its own, under a different label, before the target hands the connection to the
//! application. Neither proof can be replayed (the other side's nonce is fresh) or
//! reflected (the labels differ). The secret never crosses the wire. The exchange is
//! specified in `docs/security.md`.

use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Bytes of a challenge nonce.
pub(crate) const NONCE_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA256 tag).
pub(crate) const PROOF_LEN: usize = 32;
/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest secret accepted.
const MAX_SECRET_LEN: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// The cluster secret: every endpoint configured with it accepts only peers that prove
/// they hold the same one, and proves it to them in turn.
///
/// Read it from a file ([`Secret::from_file`]) or an environment variable
/// ([`Secret::from_env`]), never from a command line (other users can read those in
/// `/proc`). The bytes are wiped from memory when the last copy is dropped, and never
/// printed.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret of at least 16 bytes (use 32 random bytes, e.g. `head -c 32
    /// /dev/urandom | base64`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(Error::InvalidArgument(format!(
                "the cluster secret has {} bytes; it needs at least {MIN_SECRET_LEN} (use 32 \
                 random bytes, e.g. `head -c 32 /dev/urandom | base64 > secret`)",
                bytes.len()
            )));
        }
        if bytes.len() > MAX_SECRET_LEN {
            return Err(Error::InvalidArgument(format!(
                "the cluster secret has {} bytes; at most {MAX_SECRET_LEN} are accepted",
                bytes.len()
            )));
        }
        Ok(Secret(Arc::new(Zeroizing::new(bytes.to_vec()))))
    }

    /// The contents of `path`, without one trailing newline. The file must not be
    /// readable by group or others (`chmod 600`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Secret> {
        use std::os::unix::fs::PermissionsExt;
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot read the cluster secret file {}: {e}",
                path.display()
            ))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::InvalidArgument(format!(
                "the cluster secret file {} is readable by group or others (mode {:o}): \
                 `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot read the cluster secret file {}: {e}",
                path.display()
            ))
        })?);
        let mut s: &[u8] = &bytes;
        if let Some(t) = s.strip_suffix(b"\n") {
            s = t.strip_suffix(b"\r").unwrap_or(t);
        }
        Secret::from_bytes(s)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
    }

    /// The value of the environment variable `var`.
    pub fn from_env(var: &str) -> Result<Secret> {
        let v = std::env::var_os(var).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the environment variable {var} that should hold the cluster secret is not set"
            ))
        })?;
        let v = Zeroizing::new(v.into_encoded_bytes());
        Secret::from_bytes(&v).map_err(|e| Error::InvalidArgument(format!("{var}: {e}")))
    }

    /// The secret's bytes, for key derivation.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, label: &[u8], t: &Transcript) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(label);
        m.update(&t.initiator_nonce);
        m.update(&t.target_nonce);
        m.update(&t.initiator.to_le_bytes());
        m.update(&t.target.to_le_bytes());
        m
    }

    /// The target's proof over the transcript.
    pub(crate) fn target_proof(&self, t: &Transcript) -> [u8; PROOF_LEN] {
        self.mac(TARGET_LABEL, t).finalize().into_bytes().into()
    }

    /// The initiator's proof over the transcript.
    pub(crate) fn initiator_proof(&self, t: &Transcript) -> [u8; PROOF_LEN] {
        self.mac(INITIATOR_LABEL, t).finalize().into_bytes().into()
    }

    /// Check the target's proof (constant time).
    pub(crate) fn verify_target(&self, t: &Transcript, proof: &[u8]) -> bool {
        self.mac(TARGET_LABEL, t).verify_slice(proof).is_ok()
    }

    /// Check the initiator's proof (constant time).
    pub(crate) fn verify_initiator(&self, t: &Transcript, proof: &[u8]) -> bool {
        self.mac(INITIATOR_LABEL, t).verify_slice(proof).is_ok()
    }
}

const TARGET_LABEL: &[u8] = b"PacketFS auth v1 target";
const INITIATOR_LABEL: &[u8] = b"PacketFS auth v1 initiator";

/// What both proofs cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transcript {
    pub(crate) initiator_nonce: [u8; NONCE_LEN],
    pub(crate) target_nonce: [u8; NONCE_LEN],
    /// Endpoint ids, as each side announced its own.
    pub(crate) initiator: u64,
    pub(crate) target: u64,
}

/// Initiator: judge the target's HELLO_ACK. `proves` is its feature bit, `payload` what
/// it carried. Returns the proof to send in AUTH, `None` when neither side
/// authenticates, or why the connection must be refused.
pub(crate) fn check_target(
    secret: Option<&Secret>,
    our_nonce: Option<[u8; NONCE_LEN]>,
    proves: bool,
    payload: &[u8],
    initiator: u64,
    target: u64,
) -> Result<Option<[u8; PROOF_LEN]>> {
    let fail = |why: &str| Err(Error::AuthFailed(why.to_string()));
    match (secret, our_nonce, proves) {
        (None, _, false) => Ok(None),
        (None, _, true) => {
            fail("the peer authenticated although this endpoint has no cluster secret")
        }
        (Some(_), None, _) | (Some(_), _, false) => fail(
            "the peer does not authenticate (it has no cluster secret): configure the same \
             secret on both ends",
        ),
        (Some(secret), Some(initiator_nonce), true) => {
            if payload.len() != NONCE_LEN + PROOF_LEN {
                return fail("the peer's HELLO_ACK carries malformed authentication data");
            }
            let mut target_nonce = [0u8; NONCE_LEN];
            target_nonce.copy_from_slice(&payload[..NONCE_LEN]);
            let t = Transcript {
                initiator_nonce,
                target_nonce,
                initiator,
                target,
            };
            if !secret.verify_target(&t, &payload[NONCE_LEN..]) {
                return fail(
                    "the peer's proof does not match this endpoint's cluster secret: the two \
                     ends have different secrets",
                );
            }
            Ok(Some(secret.initiator_proof(&t)))
        }
    }
}

/// A fresh random nonce.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN]> {
    crate::sys::random_bytes()
}

/// Target: answer an authenticating HELLO that carried `initiator_nonce`. Returns the
/// transcript the initiator's proof must cover, and the HELLO_ACK payload (our nonce
/// and our proof).
pub(crate) fn answer_initiator(
    secret: &Secret,
    initiator_nonce: &[u8],
    initiator: u64,
    target: u64,
) -> Result<(Transcript, Vec<u8>)> {
    let initiator_nonce: [u8; NONCE_LEN] = initiator_nonce
        .try_into()
        .map_err(|_| Error::AuthFailed("the peer's nonce has the wrong length".into()))?;
    let target_nonce = nonce()?;
    let t = Transcript {
        initiator_nonce,
        target_nonce,
        initiator,
        target,
    };
    let mut payload = target_nonce.to_vec();
    payload.extend_from_slice(&secret.target_proof(&t));
    Ok((t, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Transcript {
        Transcript {
            initiator_nonce: [1; NONCE_LEN],
            target_nonce: [2; NONCE_LEN],
            initiator: 10,
            target: 20,
        }
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_transcript() {
        let a = Secret::from_bytes(b"0123456789abcdef-cluster").unwrap();
        let b = Secret::from_bytes(b"0123456789abcdef-another").unwrap();
        let p = a.target_proof(&t());
        assert!(a.verify_target(&t(), &p));
        assert!(!b.verify_target(&t(), &p), "another secret");
        // A target proof is not an initiator proof (no reflection).
        assert!(!a.verify_initiator(&t(), &p));
        for change in 0..4 {
            let mut u = t();
            match change {
                0 => u.initiator_nonce[0] ^= 1,
                1 => u.target_nonce[31] ^= 1,
                2 => u.initiator += 1,
                _ => u.target += 1,
            }
            assert!(!a.verify_target(&u, &p), "transcript change {change}");
        }
        assert!(!a.verify_target(&t(), &p[..31]), "a truncated proof");
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        let e = Secret::from_bytes(b"short").unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        let s = Secret::from_bytes(b"0123456789abcdef").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(16 bytes)");
        let e = Secret::from_env("PFS_TEST_SURELY_UNSET_VARIABLE")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not set"), "{e}");
    }

    #[test]
    fn secret_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pfs-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, b"0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secret::from_file(&f).unwrap();
        // The trailing newline is not part of the secret.
        assert_eq!(
            s.target_proof(&t()),
            Secret::from_bytes(b"0123456789abcdef0123")
                .unwrap()
                .target_proof(&t())
        );
        let e = Secret::from_file(dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
