//! AF_XDP: datagrams in raw Ethernet frames, one AF_XDP socket per receive queue of the
//! interface, steered there by the XDP program (`ebpf/pfs_xdp.bpf.c`).
//!
//! The driver builds Ethernet/IPv4/UDP headers itself (the bytes a kernel UDP socket
//! would send, so `udp` peers interoperate), learns each peer's MAC from the frames it
//! receives, and otherwise asks the kernel's neighbour table. A kernel UDP socket is
//! bound to the same address and port so that nothing else on the host takes the port.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::udp::EvWake;
use super::{Driver, Wake};
use crate::sys::ifc::IfaceInfo;
use crate::sys::xsk::{BindMode, Xsk};
use crate::sys::{self, EventFd};
use crate::xdp::frame::{self, Reject, Route};
use crate::xdp::neigh;
use crate::xdp::prog::Attachment;
use crate::xdp::{SINGLE_BUFFER_MTU, steer};

/// Frames taken from each socket per receive call.
const RX_BATCH: usize = 64;
/// How often an unresolved neighbour is asked for again.
const RESOLVE_EVERY: Duration = Duration::from_millis(20);
/// Source addresses whose MAC the driver learns from the frames they send. Frames come
/// before any authentication, so a sender that varies its source address would
/// otherwise grow the table without bound; past this, replies to new addresses find
/// their MAC through the kernel's neighbour table as outgoing traffic does.
const MAX_LEARNED_MACS: usize = 4096;

/// Remember that frames from `ip` came from `mac` (the first MAC seen stays), while
/// the table has room.
fn learn_mac(macs: &mut HashMap<Ipv4Addr, [u8; 6]>, ip: Ipv4Addr, mac: [u8; 6]) {
    if macs.len() < MAX_LEARNED_MACS || macs.contains_key(&ip) {
        macs.entry(ip).or_insert(mac);
    }
}

/// What a driver counted that the protocol never saw.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct XdpDrops {
    /// Frames that were not valid datagrams for us (bad checksum, truncated, …).
    pub(crate) rejected: u64,
    /// Datagrams not sent: no free frame, or no MAC for the next hop yet.
    pub(crate) not_sent: u64,
}

/// The AF_XDP driver of one endpoint.
pub(crate) struct XdpDriver {
    iface: String,
    info: IfaceInfo,
    local: SocketAddrV4,
    attach: Arc<Attachment>,
    socks: Vec<Xsk>,
    reserve: UdpSocket,
    busy: bool,
    frags: bool,
    max_datagram: usize,
    tables: neigh::Tables,
    macs: HashMap<Ipv4Addr, [u8; 6]>,
    asked: HashMap<Ipv4Addr, Instant>,
    ip_id: u16,
    /// A frame too large for one UMEM frame is built here, then spread over several.
    big: Vec<u8>,
    wake: Arc<EvWake>,
    pollfds: Vec<libc::pollfd>,
    drops: XdpDrops,
}

impl std::fmt::Debug for XdpDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpDriver")
            .field("iface", &self.iface)
            .field("local", &self.local)
            .finish()
    }
}

fn err(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, msg)
}

impl XdpDriver {
    /// Attach to `iface` and bind AF_XDP sockets on all its queues, for datagrams to and
    /// from `addr` (port 0: any free port). `mtu` is the link MTU the datagrams are sized
    /// for.
    pub(crate) fn bind(
        iface: &str,
        addr: SocketAddr,
        busy: bool,
        mtu: usize,
    ) -> io::Result<XdpDriver> {
        if !sys::is_root() {
            // Not strictly root: CAP_NET_ADMIN + CAP_BPF + CAP_NET_RAW would do, but the
            // checks below fail with less clear errors.
            tracing::debug!("not root: the AF_XDP bind may be refused");
        }
        let info = sys::ifc::iface_info(iface)?;
        let SocketAddr::V4(want) = addr else {
            return Err(err(
                io::ErrorKind::Unsupported,
                format!("xdp://{iface}/{addr}: the xdp backend speaks IPv4 only"),
            ));
        };
        let ip = if want.ip().is_unspecified() {
            info.ipv4.ok_or_else(|| {
                err(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{iface} has no IPv4 address: add one (ip addr add …) or name it"),
                )
            })?
        } else {
            *want.ip()
        };
        // Above 3506 bytes a frame no longer fits one buffer on veth (and one 4 KiB UMEM
        // frame here): the multi-buffer program and sockets are needed, and an interface
        // with such an MTU refuses a single-buffer program anyway.
        let frags = mtu as u32 > SINGLE_BUFFER_MTU || info.mtu > SINGLE_BUFFER_MTU;
        if mtu as u32 > info.mtu {
            return Err(err(
                io::ErrorKind::InvalidInput,
                format!(
                    "mtu {mtu} is above {iface}'s MTU {}: raise it (ip link set dev {iface} mtu \
                     {mtu}) or lower the endpoint's mtu",
                    info.mtu
                ),
            ));
        }
        // Hold the port in the kernel, so no kernel socket takes it from under us.
        let reserve = UdpSocket::bind(SocketAddr::from((ip, want.port()))).map_err(|e| {
            err(
                e.kind(),
                format!("reserving UDP port {} on {ip}: {e}", want.port()),
            )
        })?;
        let local = match reserve.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        let (attach, socks) = steer(iface, &info, local.port(), frags, !busy)?;
        let max_datagram = if frags {
            mtu - 28
        } else {
            (mtu - 28).min(socks[0].capacity() - frame::HEADERS)
        };
        let wake = Arc::new(EvWake {
            fd: EventFd::new()?,
            sleeping: AtomicBool::new(false),
        });
        // What blocking mode waits on: every socket, then the waker.
        let pollfds = socks
            .iter()
            .map(|s| s.fd())
            .chain([wake.fd.raw()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        Ok(XdpDriver {
            iface: iface.to_string(),
            info,
            local,
            attach,
            socks,
            reserve,
            busy,
            frags,
            max_datagram,
            tables: neigh::Tables::open()?,
            macs: HashMap::new(),
            asked: HashMap::new(),
            ip_id: 0,
            big: Vec::new(),
            wake,
            pollfds,
            drops: XdpDrops::default(),
        })
    }

    /// Largest datagram (UDP payload) this driver carries.
    pub(crate) fn max_datagram(&self) -> usize {
        self.max_datagram
    }

    /// How the sockets are bound: zero-copy, or copy mode with the reason.
    pub(crate) fn mode(&self) -> &BindMode {
        &self.socks[0].mode
    }

    /// Drop `n` per million of the steered packets arriving on this interface.
    pub(crate) fn set_drop_per_million(&self, n: u32) -> io::Result<()> {
        self.attach
            .prog
            .set_drop_per_million(n)
            .map_err(|e| err(io::ErrorKind::Other, e))
    }

    /// The MAC for `dst`'s next hop, asking the kernel to resolve it when unknown.
    fn mac_for(&mut self, dst: Ipv4Addr) -> Option<[u8; 6]> {
        if let Some(m) = self.macs.get(&dst) {
            return Some(*m);
        }
        let hop = self.tables.next_hop(&self.iface, dst);
        if let Some(m) = self.tables.lookup(&self.iface, hop) {
            self.macs.insert(dst, m);
            return Some(m);
        }
        let now = Instant::now();
        if self
            .asked
            .get(&hop)
            .is_none_or(|t| now.duration_since(*t) >= RESOLVE_EVERY)
        {
            self.asked.insert(hop, now);
            neigh::provoke(&self.reserve, hop);
        }
        None
    }

    fn sock_for(&self, dst: &SocketAddrV4) -> usize {
        (dst.port() as usize ^ u32::from(*dst.ip()) as usize) % self.socks.len()
    }
}

impl Drop for XdpDriver {
    fn drop(&mut self) {
        self.attach.prog.remove_port(self.local.port());
    }
}

impl Driver for XdpDriver {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        let SocketAddr::V4(dst) = to else {
            self.drops.not_sent += 1;
            return;
        };
        if datagram.len() > self.max_datagram {
            self.drops.not_sent += 1;
            return;
        }
        let Some(dst_mac) = self.mac_for(*dst.ip()) else {
            // Not resolved yet: the protocol sends it again.
            self.drops.not_sent += 1;
            return;
        };
        let route = Route {
            src_mac: self.info.mac,
            dst_mac,
            src: self.local,
            dst,
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        let id = self.ip_id;
        let i = self.sock_for(&dst);
        let n = datagram.len();
        let ok = if frame::HEADERS + n <= self.socks[i].capacity() {
            self.socks[i].push(|f| {
                f[frame::HEADERS..frame::HEADERS + n].copy_from_slice(datagram);
                frame::write_headers(f, &route, n, id)
            })
        } else {
            self.big.clear();
            self.big.resize(frame::HEADERS + n, 0);
            self.big[frame::HEADERS..].copy_from_slice(datagram);
            frame::write_headers(&mut self.big, &route, n, id);
            self.socks[i].push_bytes(&self.big)
        };
        if !ok {
            self.drops.not_sent += 1;
        }
    }

    fn flush(&mut self) {
        for s in &mut self.socks {
            self.drops.not_sent += s.flush() as u64;
        }
    }

    fn recv(&mut self, f: &mut dyn FnMut(SocketAddr, &[u8])) -> usize {
        let mut n = 0;
        let local = self.local;
        let macs = &mut self.macs;
        let drops = &mut self.drops;
        for s in &mut self.socks {
            n += s.recv(RX_BATCH, &mut |bytes| match frame::parse(bytes) {
                Ok(r) if r.dst.port() == local.port() && r.dst.ip() == local.ip() => {
                    // Replies go back the way requests came.
                    learn_mac(macs, *r.src.ip(), r.src_mac);
                    f(SocketAddr::V4(r.src), r.payload);
                }
                Ok(_) => drops.rejected += 1,
                Err(Reject::Truncated)
                | Err(Reject::NotUdp)
                | Err(Reject::Fragment)
                | Err(Reject::IpChecksum)
                | Err(Reject::UdpChecksum) => drops.rejected += 1,
            });
        }
        n
    }

    fn wait(&mut self, until: Option<Instant>) {
        if self.busy {
            return;
        }
        let max = super::sleep_budget(until);
        for p in &mut self.pollfds {
            p.revents = 0;
        }
        self.wake.sleeping.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let _ = sys::poll_wait(&mut self.pollfds, max);
        self.wake.sleeping.store(false, Ordering::SeqCst);
        if self.pollfds.last().is_some_and(|p| p.revents != 0) {
            self.wake.fd.drain();
        }
    }

    fn take_drops(&mut self) -> (u64, u64) {
        let d = std::mem::take(&mut self.drops);
        (d.rejected, d.not_sent)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake.clone()
    }

    fn local_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.local)
    }

    fn describe(&self) -> String {
        let mode = match self.mode() {
            BindMode::ZeroCopy => "zero-copy".to_string(),
            BindMode::Copy(why) => format!("copy mode ({why})"),
        };
        format!(
            "AF_XDP on {} ({} queue{}, {mode}{}, {}; datagrams up to {} bytes)",
            self.iface,
            self.socks.len(),
            if self.socks.len() == 1 { "" } else { "s" },
            if self.frags { ", multi-buffer" } else { "" },
            if self.busy {
                "busy-poll"
            } else {
                "poll(2) wakeups"
            },
            self.max_datagram
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learned_mac_table_stops_growing_at_its_limit() {
        let mut macs = HashMap::new();
        for i in 0..(MAX_LEARNED_MACS as u32 + 1000) {
            learn_mac(
                &mut macs,
                Ipv4Addr::from(0x0A00_0000 + i),
                [2, 0, 0, 0, 0, 1],
            );
        }
        assert_eq!(macs.len(), MAX_LEARNED_MACS);
        // An address already known keeps its first MAC, full table or not.
        let first = Ipv4Addr::from(0x0A00_0000);
        learn_mac(&mut macs, first, [2, 0, 0, 0, 0, 9]);
        assert_eq!(macs[&first], [2, 0, 0, 0, 0, 1]);
    }
}
