//! The `xdp` backend's pieces: the steering program, Ethernet/IPv4/UDP framing, and
//! next-hop resolution. The frame driver is `frames::xdp`.

pub(crate) mod frame;
pub(crate) mod neigh;
pub(crate) mod prog;
