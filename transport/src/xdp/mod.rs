//! The `xdp` backend's pieces: the steering program, Ethernet/IPv4/UDP framing, and
//! next-hop resolution. The frame driver is `frames::xdp`.

pub(crate) mod frame;
pub(crate) mod neigh;
pub(crate) mod prog;

use std::io;
use std::sync::Arc;

use crate::sys::ifc::IfaceInfo;
use crate::sys::xsk::Xsk;

/// The largest MTU whose frames fit one buffer (veth's limit for a single-buffer XDP
/// program; one 4 KiB UMEM frame holds 3840 bytes). Above it the `xdp.frags` program
/// and multi-buffer sockets are needed.
pub(crate) const SINGLE_BUFFER_MTU: u32 = 3506;

/// Attach the program to `iface` (the `xdp.frags` one when `frags`), bind an AF_XDP
/// socket on each of its queues into the program's XSKMAP, and steer UDP `port` to them.
pub(crate) fn steer(
    iface: &str,
    info: &IfaceInfo,
    port: u16,
    frags: bool,
    need_wakeup: bool,
) -> io::Result<(Arc<prog::Attachment>, Vec<Xsk>)> {
    let attach = prog::attach(iface, info.index, frags).map_err(io::Error::other)?;
    let mut socks = Vec::new();
    for q in 0..info.queues {
        let x = Xsk::open(iface, q, need_wakeup, frags, info.mtu as usize + 14)?;
        attach
            .prog
            .set_socket(q, x.fd())
            .map_err(io::Error::other)?;
        socks.push(x);
    }
    attach.prog.add_port(port).map_err(io::Error::other)?;
    Ok((attach, socks))
}
