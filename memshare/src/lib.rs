//! # pfs-memshare
//!
//! Shared buffers across the nodes of a cluster, on top of `pfs-transport`, and a task
//! layer that runs work where the memory lives.
//!
//! * A [`Node`] per process owns one transport endpoint (any backend: the listen
//!   address's scheme picks it), joins a cluster from seed addresses, and runs SWIM
//!   membership with failure detection ([foca]); the membership datagrams travel as
//!   transport messages, so they are authenticated like everything else when a cluster
//!   secret is set.
//! * [`Node::export`] allocates a region and announces it (name → owner, address,
//!   key, size, rights) through membership broadcasts: every node holds a replica of
//!   the directory, and [`Node::open`] resolves names locally.
//! * A [`SharedBuffer`] reads and writes at offsets, views u64 arrays, does atomics,
//!   and asks an owner to copy a range straight into another node's region.
//! * Tasks registered by name on every node ([`Node::register_task`]) run at a region's
//!   owner against its local memory, read through a [`LocalRegionView`]
//!   ([`SharedBuffer::dispatch`]).
//! * A [`StripedArray`] spreads one logical buffer over several nodes, with global
//!   addressing and [`StripedArray::map_reduce`].
//!
//! ```
//! use pfs_memshare::{Node, NodeConfig, Rights};
//! # fn main() -> pfs_memshare::Result<()> {
//! let a = Node::start(NodeConfig::new("tcp://127.0.0.1:0"))?;
//! let b = Node::start(NodeConfig::new("tcp://127.0.0.1:0").seed(a.addr()))?;
//! for n in [&a, &b] {
//!     n.register_task("sum", |view, _args| {
//!         let mut s = 0u64;
//!         view.for_each_u64_chunk(|c| s = c.iter().fold(s, |s, v| s.wrapping_add(*v)))?;
//!         Ok(s.to_le_bytes().to_vec())
//!     });
//! }
//! let buf = a.export("numbers", 1 << 20, Rights::ALL)?;
//! buf.write_u64s(0, &[1, 2, 3])?;
//! let remote = b.open_timeout("numbers", std::time::Duration::from_secs(5))?;
//! let sum = remote.dispatch("sum", &[])?; // runs on node a
//! assert_eq!(u64::from_le_bytes(sum.try_into().unwrap()), 6);
//! # Ok(()) }
//! ```
//!
//! Design, consistency and limits: `docs/memshare.md`.
//!
//! [foca]: https://docs.rs/foca

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod buffer;
pub mod builtin;
mod config;
mod error;
mod link;
mod membership;
mod node;
mod pool;
mod striped;
mod task;
mod wire;

pub use buffer::SharedBuffer;
pub use config::{FailureDetection, NodeConfig};
pub use error::{Error, Result};
pub use node::{MAX_NAME_LEN, MemberStatus, Node};
pub use pfs_transport::{Rights, Secret};
pub use striped::StripedArray;
pub use task::{LocalRegionView, TaskError, TaskFn};
