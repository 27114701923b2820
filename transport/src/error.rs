//! The one error type of the transport.

use std::io;
use std::time::Duration;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, on any backend.
///
/// Errors that come back from the target of a one-sided operation (`AccessDenied`,
/// `OutOfBounds`, `Revoked`, `Expired`, `UnknownRegion`, `Misaligned`) mean the target
/// refused the access and **did not touch its memory**.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key does not grant this access (wrong rights, wrong token, wrong owner).
    #[error("access denied: {reason}")]
    AccessDenied {
        /// Why the access was refused.
        reason: String,
    },
    /// `offset + len` is past the end of the region (or overflows).
    #[error(
        "out of bounds: offset {offset} + length {len} does not fit a region of {region_len} bytes"
    )]
    OutOfBounds {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Length of the region, as far as the side reporting the error knows it.
        region_len: u64,
    },
    /// The key was revoked by the region's owner.
    #[error("region key revoked by its owner: ask the owner for a new key")]
    Revoked,
    /// The key's lifetime has passed.
    #[error("region key expired: ask the owner for a new key")]
    Expired,
    /// The target has no region with this id (never existed, or dropped by its owner).
    #[error(
        "the target has no region {region} (dropped by its owner, or a key for another endpoint)"
    )]
    UnknownRegion {
        /// The region id from the key.
        region: u64,
    },
    /// Atomic operations need an 8-byte-aligned offset.
    #[error("atomic operation at offset {offset}: atomics need an 8-byte-aligned offset")]
    Misaligned {
        /// The offending offset.
        offset: u64,
    },
    /// The operation did not complete within its deadline.
    #[error(
        "operation timed out after {after:?} (raise EndpointConfig::op_timeout if the peer is just slow)"
    )]
    Timeout {
        /// The deadline that passed.
        after: Duration,
    },
    /// The connection is gone; every operation pending on it fails with this.
    #[error("connection lost: {reason}")]
    ConnectionLost {
        /// What ended the connection.
        reason: String,
    },
    /// A bounded queue is full: retry after some operations complete.
    #[error(
        "would block: {what} is full ({limit}); wait for pending operations or raise the limit"
    )]
    WouldBlock {
        /// Which queue is full.
        what: &'static str,
        /// Its configured limit.
        limit: usize,
    },
    /// The backend or this machine cannot do what was asked.
    #[error("unsupported: {reason}")]
    Unsupported {
        /// Why, and what to do instead.
        reason: String,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Io {
        /// The failing call, e.g. `io_uring_setup` or `connect`.
        call: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An argument is invalid (the message says which and what is valid).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An address string could not be parsed or resolved.
    #[error("invalid address {input:?}: {reason}")]
    InvalidAddress {
        /// What was given.
        input: String,
        /// What is wrong, and the valid form.
        reason: String,
    },
    /// A region key string could not be parsed.
    #[error("invalid region key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
    /// A payload or message is larger than allowed.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The peer speaks an incompatible wire version.
    #[error(
        "wire version mismatch: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}; upgrade the older side"
    )]
    VersionMismatch {
        /// Lowest version we speak.
        ours_min: u8,
        /// Highest version we speak.
        ours_max: u8,
        /// Lowest version the peer speaks.
        theirs_min: u8,
        /// Highest version the peer speaks.
        theirs_max: u8,
    },
    /// The peer violated the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The target is at a limit (connections, queued messages) and refused.
    #[error("peer busy: {0}")]
    Busy(String),
    /// The endpoint or connection was closed locally.
    #[error("closed: {0}")]
    Closed(&'static str),
    /// Peer authentication failed: a missing or different cluster secret on one side, or
    /// a peer that does not authenticate.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
}

impl Error {
    pub(crate) fn io(call: &'static str, source: io::Error) -> Self {
        Error::Io { call, source }
    }

    pub(crate) fn last_os(call: &'static str) -> Self {
        Error::Io {
            call,
            source: io::Error::last_os_error(),
        }
    }

    pub(crate) fn lost(reason: impl Into<String>) -> Self {
        Error::ConnectionLost {
            reason: reason.into(),
        }
    }

    /// A copy of this error for fanning one failure out to many operations.
    ///
    /// `io::Error` is not `Clone`, so `Io` errors keep their kind and message.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::AccessDenied { reason } => Error::AccessDenied {
                reason: reason.clone(),
            },
            Error::OutOfBounds {
                offset,
                len,
                region_len,
            } => Error::OutOfBounds {
                offset: *offset,
                len: *len,
                region_len: *region_len,
            },
            Error::Revoked => Error::Revoked,
            Error::AuthFailed(s) => Error::AuthFailed(s.clone()),
            Error::Expired => Error::Expired,
            Error::UnknownRegion { region } => Error::UnknownRegion { region: *region },
            Error::Misaligned { offset } => Error::Misaligned { offset: *offset },
            Error::Timeout { after } => Error::Timeout { after: *after },
            Error::ConnectionLost { reason } => Error::ConnectionLost {
                reason: reason.clone(),
            },
            Error::WouldBlock { what, limit } => Error::WouldBlock {
                what,
                limit: *limit,
            },
            Error::Unsupported { reason } => Error::Unsupported {
                reason: reason.clone(),
            },
            Error::Io { call, source } => Error::Io {
                call,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
            Error::InvalidAddress { input, reason } => Error::InvalidAddress {
                input: input.clone(),
                reason: reason.clone(),
            },
            Error::InvalidKey { reason } => Error::InvalidKey {
                reason: reason.clone(),
            },
            Error::TooLarge { what, len, max } => Error::TooLarge {
                what,
                len: *len,
                max: *max,
            },
            Error::VersionMismatch {
                ours_min,
                ours_max,
                theirs_min,
                theirs_max,
            } => Error::VersionMismatch {
                ours_min: *ours_min,
                ours_max: *ours_max,
                theirs_min: *theirs_min,
                theirs_max: *theirs_max,
            },
            Error::Protocol(s) => Error::Protocol(s.clone()),
            Error::Busy(s) => Error::Busy(s.clone()),
            Error::Closed(s) => Error::Closed(s),
        }
    }
}
