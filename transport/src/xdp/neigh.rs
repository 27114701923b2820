//! Where to send a frame: the next hop for an IPv4 destination and its MAC address,
//! from the kernel's routing and neighbour tables.
//!
//! The tables are opened once, from the thread that binds the endpoint: a `/proc/net`
//! file shows the network namespace of the opener (`thread-self`: this thread, not the
//! process's main thread) for as long as it stays open, whichever thread reads it later.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

/// The routing and neighbour tables of one network namespace.
#[derive(Debug)]
pub(crate) struct Tables {
    route: File,
    arp: File,
    buf: String,
}

impl Tables {
    /// Open the tables of the calling thread's namespace.
    pub(crate) fn open() -> std::io::Result<Tables> {
        Ok(Tables {
            route: File::open("/proc/thread-self/net/route")?,
            arp: File::open("/proc/thread-self/net/arp")?,
            buf: String::new(),
        })
    }

    fn read(f: &mut File, buf: &mut String) -> bool {
        buf.clear();
        f.seek(SeekFrom::Start(0)).is_ok() && f.read_to_string(buf).is_ok()
    }

    /// The gateway to use for `dst` through `iface`, or `dst` itself when on-link.
    pub(crate) fn next_hop(&mut self, iface: &str, dst: Ipv4Addr) -> Ipv4Addr {
        if !Self::read(&mut self.route, &mut self.buf) {
            return dst;
        }
        next_hop_in(&self.buf, iface, dst)
    }

    /// The MAC address the kernel has resolved for `ip` on `iface`, if complete.
    pub(crate) fn lookup(&mut self, iface: &str, ip: Ipv4Addr) -> Option<[u8; 6]> {
        if !Self::read(&mut self.arp, &mut self.buf) {
            return None;
        }
        lookup_in(&self.buf, iface, ip)
    }
}

/// Make the kernel resolve `ip`: an empty datagram from `sock` (a kernel UDP socket in
/// the endpoint's namespace) to the discard port (9) of the peer. The kernel sends ARP
/// first; the datagram itself is passed by the peer's XDP program (not a PacketFS port)
/// and discarded by its kernel.
pub(crate) fn provoke(sock: &UdpSocket, ip: Ipv4Addr) {
    let _ = sock.send_to(&[], SocketAddr::from((ip, 9)));
}

fn hex_ip(s: &str) -> Option<Ipv4Addr> {
    // The table prints addresses as the hex of a little-endian u32.
    u32::from_str_radix(s, 16)
        .ok()
        .map(|v| Ipv4Addr::from(v.to_le_bytes()))
}

fn next_hop_in(table: &str, iface: &str, dst: Ipv4Addr) -> Ipv4Addr {
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != iface {
            continue;
        }
        let (Some(net), Some(gw), Some(mask)) = (hex_ip(f[1]), hex_ip(f[2]), hex_ip(f[7])) else {
            continue;
        };
        let m = u32::from(mask);
        if u32::from(dst) & m != u32::from(net) & m {
            continue;
        }
        let prefix = m.count_ones();
        if best.is_none_or(|(p, _)| prefix > p) {
            best = Some((prefix, if gw.is_unspecified() { dst } else { gw }));
        }
    }
    best.map_or(dst, |(_, hop)| hop)
}

fn lookup_in(table: &str, iface: &str, ip: Ipv4Addr) -> Option<[u8; 6]> {
    const ATF_COM: u32 = 0x2;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[5] != iface || f[0].parse::<Ipv4Addr>().ok() != Some(ip) {
            continue;
        }
        let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
        if flags & ATF_COM == 0 {
            return None;
        }
        let mut mac = [0u8; 6];
        let mut parts = f[3].split(':');
        for b in &mut mac {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        return Some(mac);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0
pfs0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FEFF\t0\t0\t0
pfs0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0
";

    const ARP: &str =
        "IP address       HW type     Flags       HW address            Mask     Device
198.18.0.2       0x1         0x2         0a:1b:2c:3d:4e:5f     *        pfs0
198.18.0.3       0x1         0x0         00:00:00:00:00:00     *        pfs0
198.18.0.2       0x1         0x2         11:11:11:11:11:11     *        eth0
";

    #[test]
    fn routes_pick_the_longest_prefix_on_the_interface() {
        let on_link: Ipv4Addr = "198.18.0.2".parse().unwrap();
        assert_eq!(next_hop_in(ROUTE, "pfs0", on_link), on_link);
        let far: Ipv4Addr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            next_hop_in(ROUTE, "pfs0", far),
            "198.18.0.1".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(next_hop_in(ROUTE, "other", far), far);
        assert_eq!(next_hop_in("", "pfs0", far), far);
    }

    #[test]
    fn neighbours_are_complete_entries_on_the_interface() {
        let ip: Ipv4Addr = "198.18.0.2".parse().unwrap();
        assert_eq!(
            lookup_in(ARP, "pfs0", ip),
            Some([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f])
        );
        assert_eq!(lookup_in(ARP, "eth0", ip), Some([0x11; 6]));
        assert_eq!(lookup_in(ARP, "pfs0", "198.18.0.3".parse().unwrap()), None);
        assert_eq!(lookup_in(ARP, "pfs0", "198.18.0.9".parse().unwrap()), None);
        assert_eq!(lookup_in("garbage\nx y z", "pfs0", ip), None);
    }
}
