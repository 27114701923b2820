//! The errors of the memory-sharing layer.

use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `pfs-memshare`.
///
/// Errors about a buffer name the buffer and the byte range involved; errors about a
/// task name the task and the node that was asked to run it. A refused access (bad
/// range, read-only handle, misaligned atomic) is detected before anything is sent and
/// changes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid (the message names the key, and the line for files).
    #[error("invalid memshare configuration: {0}")]
    Config(String),
    /// An argument is invalid (the message says which and what is valid).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No node of the cluster (as far as this node's replica of the directory knows)
    /// exports a region by this name.
    #[error(
        "no node exports a region named {name:?} (known to this node's directory: {known}); \
         exports reach other nodes within a few gossip rounds"
    )]
    NotFound {
        /// The name asked for.
        name: String,
        /// How many names the local directory holds.
        known: usize,
    },
    /// Another live node already exports this name.
    #[error("the name {name:?} is already exported by node {owner:016x} ({addr})")]
    NameTaken {
        /// The name.
        name: String,
        /// The node that holds it.
        owner: u64,
        /// Its address.
        addr: String,
    },
    /// An access past the end of a buffer (or an overflowing range). Nothing was
    /// transferred.
    #[error(
        "range {offset}..{end} of {name:?} is out of bounds: it holds {size} bytes",
        end = *offset as u128 + *len as u128
    )]
    OutOfRange {
        /// The buffer or striped array.
        name: String,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The buffer's length.
        size: u64,
    },
    /// The handle (or the region's export) does not allow this kind of access.
    #[error("{name:?} is {held}: {op} refused")]
    ReadOnly {
        /// The buffer.
        name: String,
        /// The operation refused (`write`, `compare_and_swap`, …).
        op: &'static str,
        /// What the handle allows, in words.
        held: String,
    },
    /// Atomics need an 8-byte-aligned offset.
    #[error("atomic {op} on {name:?} at offset {offset}: atomics need an 8-byte-aligned offset")]
    Misaligned {
        /// The buffer.
        name: String,
        /// The operation.
        op: &'static str,
        /// The offending offset.
        offset: u64,
    },
    /// The node that owns the region is down (marked so by failure detection), or the
    /// connection to it broke during the operation.
    #[error("the owner of {name:?}, node {owner:016x} at {addr}, is unavailable: {reason}")]
    OwnerDown {
        /// The buffer (or the node's address when no buffer is involved).
        name: String,
        /// The owner's node id.
        owner: u64,
        /// The owner's address.
        addr: String,
        /// What was observed.
        reason: String,
    },
    /// The owner does not have a task registered under this name.
    #[error("task {task:?} is not registered on node {node:016x}; registered there: {registered}")]
    UnknownTask {
        /// The task name.
        task: String,
        /// The node asked to run it.
        node: u64,
        /// The names it does have, comma-separated.
        registered: String,
    },
    /// The task panicked on the owner (the owner caught the panic and stays up).
    #[error("task {task:?} panicked on node {node:016x}: {message}")]
    TaskPanicked {
        /// The task name.
        task: String,
        /// The node that ran it.
        node: u64,
        /// The panic message.
        message: String,
    },
    /// The task returned an error.
    #[error("task {task:?} failed on node {node:016x}: {message}")]
    TaskFailed {
        /// The task name.
        task: String,
        /// The node that ran it.
        node: u64,
        /// The task's error.
        message: String,
    },
    /// No answer within the deadline (the remote side may still finish later).
    #[error("{what} did not complete within {after:?}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// The remote node refused or failed a request (message from the remote side).
    #[error("node {node:016x} refused {what}: {message}")]
    Remote {
        /// The remote node.
        node: u64,
        /// The request.
        what: String,
        /// Its explanation.
        message: String,
    },
    /// The node is shutting down.
    #[error("the node is shut down")]
    Shutdown,
    /// A transport error, with what was being done.
    #[error("{context}: {source}")]
    Transport {
        /// What was being done.
        context: String,
        /// The transport's error.
        #[source]
        source: pfs_transport::Error,
    },
}

impl Error {
    pub(crate) fn transport(context: impl Into<String>, source: pfs_transport::Error) -> Error {
        Error::Transport {
            context: context.into(),
            source,
        }
    }

    /// Refuse `len` bytes at `offset` unless they lie within the `size` bytes of `name`.
    pub(crate) fn check_range(name: &str, offset: u64, len: u64, size: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                name: name.to_string(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    /// Byte offset and length of `count` u64 elements from element `index` of `name`
    /// (`size` bytes long), refused when either overflows.
    pub(crate) fn elem_range(name: &str, index: u64, count: u64, size: u64) -> Result<(u64, u64)> {
        match (index.checked_mul(8), count.checked_mul(8)) {
            (Some(o), Some(l)) => Ok((o, l)),
            _ => Err(Error::OutOfRange {
                name: name.to_string(),
                offset: index.saturating_mul(8),
                len: count.saturating_mul(8),
                size,
            }),
        }
    }
}

/// An error a remote node reports in a response.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum RemoteError {
    UnknownTask { registered: String },
    Panicked(String),
    Failed(String),
    Denied(String),
    NotFound(String),
    NameTaken { owner: u64, addr: String },
    OutOfRange { offset: u64, len: u64, size: u64 },
    Busy(usize),
    Other(String),
}
