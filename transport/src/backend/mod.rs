//! Backends: the engines that carry operations. Nothing here is public; users see only
//! [`Endpoint`](crate::Endpoint) and [`Connection`](crate::Connection).

pub(crate) mod dgram;
#[cfg(feature = "rdma")]
pub(crate) mod rdma;
pub(crate) mod tcp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::addr::{Address, BackendKind};
use crate::endpoint::ConnShared;
use crate::error::{Error, Result};
use crate::op::Completion;
use crate::sys::mem::Slice;
use crate::wire::ErrorCode;
use crate::wire::Target;

/// What an operation does.
#[derive(Debug)]
pub(crate) enum OpKind {
    /// Write `local` to the target; with `notify`, the target gets an event afterwards.
    Write {
        local: Slice,
        target: Target,
        notify: Option<u32>,
    },
    /// Read from the target into `local`.
    Read { local: Slice, target: Target },
    /// Compare-and-swap at the target.
    Cas {
        target: Target,
        expected: u64,
        new: u64,
    },
    /// Fetch-and-add at the target.
    Faa { target: Target, add: u64 },
    /// A two-sided message.
    Send { data: Vec<u8> },
    /// Everything submitted before completes before anything submitted after is issued.
    Fence,
}

impl OpKind {
    /// The remote access this operation makes: its target, the rights it needs and its
    /// length (`None` for messages and fences). The rdma engine checks a grant with it.
    #[cfg(feature = "rdma")]
    pub(crate) fn access(&self) -> Option<(Target, crate::key::Rights, u64)> {
        use crate::key::Rights;
        match self {
            OpKind::Write { target, local, .. } => {
                Some((*target, Rights::WRITE, local.len() as u64))
            }
            OpKind::Read { target, local } => Some((*target, Rights::READ, local.len() as u64)),
            OpKind::Cas { target, .. } | OpKind::Faa { target, .. } => {
                Some((*target, Rights::ATOMIC, 8))
            }
            OpKind::Send { .. } | OpKind::Fence => None,
        }
    }
}

/// One submitted operation.
#[derive(Debug)]
pub(crate) struct OpReq {
    pub(crate) kind: OpKind,
    pub(crate) done: Arc<Completion>,
    /// When it fails with [`Error::Timeout`](crate::Error::Timeout): `None` from
    /// `submit`, stamped (`op_timeout` from then) by the engine that takes it. Submitting
    /// reads no clock: where the clock has no vDSO path (a VM's emulated HPET) a read
    /// is a measurable share of a small operation.
    pub(crate) deadline: Option<Instant>,
    /// The key's idea of the region length, for error messages.
    pub(crate) key_len: u64,
}

/// A progress engine for one backend.
///
/// All methods take `&self`: engines keep their state behind a lock that the progress
/// thread (or a caller driving progress) holds while working.
pub(crate) trait Engine: Send + Sync + std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Queue an operation for `conn`; gives it back when the submission queue is full.
    fn submit(&self, conn: &Arc<ConnShared>, req: OpReq) -> std::result::Result<(), OpReq>;
    /// Close a connection: pending operations fail, the peer sees the connection end.
    fn close(&self, conn: &Arc<ConnShared>);
    /// Let the engine know a stalled receive queue has room again.
    fn room_available(&self, conn: &Arc<ConnShared>);
    /// One non-blocking pass; returns how much work was done (0: idle).
    fn progress(&self) -> usize;
    /// Sleep until work may be available or `max` passes.
    fn park(&self, max: Duration);
    /// Wake the engine if it is parked.
    fn wake(&self);
    /// Open a connection (blocking up to the connect timeout).
    fn connect(&self, addr: &Address) -> Result<Arc<ConnShared>>;
    /// Addresses actually bound (with real ports when port 0 was asked for).
    fn local_addrs(&self) -> Vec<Address>;
    /// Fail everything pending, close every connection and stop.
    fn shutdown(&self);
    /// `Err` once the engine has stopped (after a fatal error or shutdown).
    fn health(&self) -> Result<()>;
    /// One line about how the engine is set up (for reports).
    fn describe(&self) -> String;
}

/// The error an initiator reports for an `ERROR` answer from the target.
pub(crate) fn remote_error(
    code: ErrorCode,
    text: String,
    remote_off: u64,
    len: u64,
    key_len: u64,
) -> Error {
    let why = if text.is_empty() {
        format!("{code:?}")
    } else {
        text
    };
    match code {
        ErrorCode::AccessDenied | ErrorCode::WrongOwner | ErrorCode::AuthFailed => {
            Error::AccessDenied {
                reason: format!("refused by the target: {why}"),
            }
        }
        ErrorCode::OutOfBounds => Error::OutOfBounds {
            offset: remote_off,
            len,
            region_len: key_len,
        },
        ErrorCode::Revoked => Error::Revoked,
        ErrorCode::Expired => Error::Expired,
        ErrorCode::UnknownRegion => Error::UnknownRegion { region: 0 },
        ErrorCode::Misaligned => Error::Misaligned { offset: remote_off },
        ErrorCode::TooLarge => Error::TooLarge {
            what: "operation (refused by the target)",
            len,
            max: 0,
        },
        ErrorCode::Busy => Error::Busy(why),
        ErrorCode::UnsupportedVersion | ErrorCode::Protocol | ErrorCode::Other => {
            Error::Protocol(format!("the target reported: {why}"))
        }
    }
}
