//! # pfs-transport
//!
//! Another machine's memory as a buffer: registered regions with capability keys,
//! one-sided `write`/`read`/atomics and two-sided messages, with one API over several
//! backends: `tcp` (TCP streams driven by io_uring, unprivileged, any Linux ≥ 6.1 that
//! allows io_uring), `udp` (reliable datagrams over kernel UDP), `xdp` (the same datagrams
//! over AF_XDP; feature `xdp`) and `rdma` (RC queue pairs over verbs, connected with
//! rdma_cm; feature `rdma`, see `docs/rdma.md`).
//!
//! ```
//! use pfs_transport::{Endpoint, EndpointConfig, Rights};
//!
//! # fn main() -> pfs_transport::Result<()> {
//! // The target exposes a region and hands out a key for it.
//! let server = Endpoint::bind(EndpointConfig::new().listen("tcp://127.0.0.1:0")?)?;
//! let shared = server.alloc_region(1 << 20, Rights::ALL)?;
//! let key = shared.key(Rights::READ | Rights::WRITE | Rights::ATOMIC)?;
//! let key_text = key.to_string(); // travels out of band, or in a message
//!
//! // The initiator connects and works on the remote region.
//! let client = Endpoint::bind(EndpointConfig::new())?;
//! let conn = client.connect(&server.local_addrs()[0].to_string())?;
//! let _peer = server.accept()?;
//! let key: pfs_transport::RegionKey = key_text.parse()?;
//! let local = client.alloc_region(4096, Rights::ALL)?;
//! local.write_at(0, b"hello, remote memory")?;
//!
//! conn.write(&local, 0, &key, 100, 20)?.wait()?; // in place at the target on completion
//! conn.fence()?.wait()?;
//! conn.read(&local, 1000, &key, 100, 20)?.wait()?;
//! assert_eq!(local.to_vec(1000, 20)?, b"hello, remote memory");
//! assert_eq!(shared.to_vec(100, 20)?, b"hello, remote memory");
//!
//! let old = conn.fetch_add(&key, 8, 5)?.wait()?;
//! assert_eq!(old, 0);
//! assert_eq!(shared.load_u64(8)?, 5);
//! # Ok(()) }
//! ```
//!
//! ## The contract (identical on every backend)
//!
//! **Completion means the effect is in place.** A completed write is in the target
//! region; a completed read holds the target's bytes; a completed send is queued at the
//! receiver; a completed atomic has taken effect and yields the old value.
//!
//! **Ordering.** Operations in flight at the same time on one connection may take effect
//! in any order (as UCX puts, or libfabric without ordering flags). [`Connection::fence`]
//! orders: everything submitted before it takes effect before anything submitted after
//! it is issued. Messages ([`Connection::send`]) arrive once each and in the order they
//! were sent. Nothing is ordered across connections.
//!
//! **Atomics** ([`Connection::compare_and_swap`], [`Connection::fetch_add`]) work on
//! 64-bit values at 8-byte-aligned offsets, little-endian in memory, and are atomic with
//! respect to each other and to the owner's atomic accessors ([`Region::fetch_add`], …)
//! — **not** with respect to plain copies ([`Region::write_at`]) by the owner. This is
//! RDMA's atomicity domain, kept on every backend.
//!
//! **Memory model.** Regions are created by an [`Endpoint`] (allocated, on huge pages
//! when possible, or registered from the caller's buffer) and stay alive while any
//! operation uses them: dropping a handle never frees memory an operation still touches.
//! The owner reads and writes its own exposed region only through copying and atomic
//! accessors; there is no `&[u8]` view, because remote writes may change the bytes at any
//! time. A concurrent remote write and owner read see each other's bytes in an
//! unspecified mix: synchronise with a notification ([`Connection::write_with_notify`]),
//! a message, or an atomic.
//!
//! **Capabilities.** A [`RegionKey`] carries owner, region, length, rights (read, write,
//! atomic), an unguessable 128-bit token, an optional expiry and an opaque backend part.
//! The target checks every access against its own record of the key — bounds, rights,
//! revocation, expiry — before touching memory; a refused access is a typed error
//! ([`Error::AccessDenied`], [`Error::OutOfBounds`], [`Error::Revoked`], …) and changes
//! nothing. On `rdma` the target's NIC serves the access: the target checks the key when
//! a connection first uses it and hands out a registration made for that grant alone
//! (the region exactly, the grant's rights), which it withdraws on revocation, expiry
//! and when the region is dropped.
//!
//! **Progress.** Each endpoint is driven by its own progress thread (optionally pinned)
//! or by the caller ([`Progress::Caller`]): then waiting on an operation, a message or an
//! accept runs the engine on the waiting thread, and [`Endpoint::progress`] runs it once
//! — the busy-poll mode for latency. [`WaitMode`] picks spinning or sleeping. Queues are
//! bounded: a full queue is an [`Error::WouldBlock`], never unbounded memory. The
//! library installs no signal handlers.
//!
//! **Failure is an error, never a hang.** Every operation has a deadline
//! ([`EndpointConfig::op_timeout`]); a peer that dies fails every pending operation with
//! [`Error::ConnectionLost`] (or [`Error::Timeout`] if it just stops answering).
//! Malformed input from the network closes the offending connection with a logged reason
//! and never panics the process.
//!
//! Logs go through [`tracing`].

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod auth;
mod backend;
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod bench_internals;
mod config;
mod endpoint;
mod error;
mod frames;
mod idmap;
mod key;
mod op;
mod proto;
#[cfg(feature = "xdp")]
pub mod rawxdp;
mod region;
mod stats;
#[allow(unsafe_code)]
mod sys;
pub mod wire;
#[cfg(feature = "xdp")]
mod xdp;

pub use addr::{Address, BackendKind, Selection, select};
pub use auth::{MIN_SECRET_LEN, Secret};
pub use config::{EndpointConfig, Progress, WaitMode};
pub use endpoint::{Connection, Endpoint, Incoming, Notification};
pub use error::{Error, Result};
pub use key::{KeyOptions, RegionKey, Rights};
pub use op::{Op, OpOutput, wait_all};
pub use region::Region;
pub use stats::Stats;
pub use sys::{io_uring_support, online_cpus, peak_rss_bytes, pin_current_thread};
