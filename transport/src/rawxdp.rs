//! Bare AF_XDP: a sender and a receiver of UDP frames with no protocol at all, nothing
//! but ring work. `pfs-bench` runs them as the ceiling the `xdp` backend is measured
//! against (same interface, same program, same sockets and framing; no reliability, no
//! regions, no copies into user memory beyond building each frame).

use std::io;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use crate::sys::xsk::Xsk;
use crate::xdp::frame::{self, Route};
use crate::xdp::neigh;
use crate::xdp::prog;

/// What a raw run moved.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RawCount {
    /// Frames sent or received.
    pub frames: u64,
    /// UDP payload bytes in those frames.
    pub payload_bytes: u64,
    /// How long the counting window was.
    pub seconds: f64,
}

impl RawCount {
    /// UDP payload carried, in Gbit/s.
    pub fn gbit_per_s(&self) -> f64 {
        self.payload_bytes as f64 * 8.0 / self.seconds.max(1e-9) / 1e9
    }
    /// Frames per second, in millions.
    pub fn mpps(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9) / 1e6
    }
}

fn other(e: String) -> io::Error {
    io::Error::other(e)
}

struct Setup {
    _attach: std::sync::Arc<prog::Attachment>,
    socks: Vec<Xsk>,
    info: crate::sys::ifc::IfaceInfo,
    reserve: std::net::UdpSocket,
}

fn setup(iface: &str, port: u16) -> io::Result<Setup> {
    let info = crate::sys::ifc::iface_info(iface)?;
    let ip = info
        .ipv4
        .ok_or_else(|| other(format!("{iface} has no IPv4 address")))?;
    let reserve = std::net::UdpSocket::bind((ip, port))?;
    let frags = info.mtu > crate::xdp::SINGLE_BUFFER_MTU;
    let (attach, socks) =
        crate::xdp::steer(iface, &info, reserve.local_addr()?.port(), frags, false)?;
    Ok(Setup {
        _attach: attach,
        socks,
        info,
        reserve,
    })
}

/// Count UDP frames for `port` arriving on `iface` (all queues, busy-polling) for
/// `duration` after the first one arrives, or until `idle` passes with none. `ready` is
/// called once the sockets are bound and steered.
pub fn sink(
    iface: &str,
    port: u16,
    duration: Duration,
    idle: Duration,
    ready: impl FnOnce(),
) -> io::Result<RawCount> {
    let mut s = setup(iface, port)?;
    ready();
    let mut c = RawCount::default();
    let mut started: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        let mut n = 0;
        for x in &mut s.socks {
            n += x.recv(64, &mut |f| {
                if started.is_some() {
                    c.frames += 1;
                    c.payload_bytes += f.len().saturating_sub(frame::HEADERS) as u64;
                }
            });
        }
        let now = Instant::now();
        if n > 0 {
            last = now;
            started.get_or_insert(now);
        }
        if let Some(t) = started
            && now.duration_since(t) >= duration
        {
            c.seconds = now.duration_since(t).as_secs_f64();
            return Ok(c);
        }
        if now.duration_since(last) >= idle {
            c.seconds = started.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
            return Ok(c);
        }
    }
}

/// Send UDP frames with `payload` bytes each from `iface` to `dst` for `duration`, as
/// fast as the rings take them (queue 0).
pub fn blast(
    iface: &str,
    dst: SocketAddrV4,
    payload: usize,
    duration: Duration,
) -> io::Result<RawCount> {
    let mut s = setup(iface, 0)?;
    let ip = s.info.ipv4.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let src = SocketAddrV4::new(ip, s.reserve.local_addr()?.port());
    let mut tables = neigh::Tables::open()?;
    let hop = tables.next_hop(iface, *dst.ip());
    let mut mac = None;
    let until = Instant::now() + Duration::from_secs(3);
    while mac.is_none() && Instant::now() < until {
        mac = tables.lookup(iface, hop);
        if mac.is_none() {
            neigh::provoke(&s.reserve, hop);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let dst_mac = mac.ok_or_else(|| other(format!("{hop} did not resolve on {iface}")))?;
    let route = Route {
        src_mac: s.info.mac,
        dst_mac,
        src,
        dst,
    };
    if payload + 28 > s.info.mtu as usize {
        return Err(other(format!(
            "payload {payload} does not fit {iface}'s MTU {}",
            s.info.mtu
        )));
    }
    let one_frame = payload + frame::HEADERS <= s.socks[0].capacity();
    // One frame, built once: a frame that comes back from the completion ring still
    // holds it, so sending again is ring work only (the headers are compared to be sure).
    let mut template = vec![0x5au8; frame::HEADERS + payload];
    let len = frame::write_headers(&mut template, &route, payload, 1);
    let mut c = RawCount::default();
    let t0 = Instant::now();
    let x = &mut s.socks[0];
    while t0.elapsed() < duration {
        let mut queued = 0u64;
        for _ in 0..64 {
            let ok = if one_frame {
                x.push(|f| {
                    if f[..frame::HEADERS] != template[..frame::HEADERS] {
                        f[..len].copy_from_slice(&template);
                    }
                    len
                })
            } else {
                // A chain of frames: copied each time.
                x.push_bytes(&template)
            };
            if !ok {
                break;
            }
            queued += 1;
        }
        let dropped = x.flush() as u64;
        let sent = queued - dropped;
        c.frames += sent;
        c.payload_bytes += sent * payload as u64;
    }
    c.seconds = t0.elapsed().as_secs_f64();
    Ok(c)
}

/// Attach the XDP program to `iface` and bind an AF_XDP socket on each queue (zero-copy
/// first), then undo it all: how the sockets were bound, as a line.
pub fn probe(iface: &str) -> io::Result<String> {
    let s = setup(iface, 0)?;
    let mode = match &s.socks[0].mode {
        crate::sys::xsk::BindMode::ZeroCopy => "zero-copy mode".to_string(),
        crate::sys::xsk::BindMode::Copy(why) => format!("copy mode ({why})"),
    };
    Ok(format!("{mode} on {} queue(s)", s.socks.len()))
}
