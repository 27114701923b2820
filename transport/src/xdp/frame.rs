//! Ethernet II + IPv4 + UDP framing for datagrams carried in AF_XDP frames: the same
//! bytes a kernel UDP socket would put on the wire, so an `xdp` peer and a `udp` peer
//! interoperate, and tcpdump decodes both.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Bytes of Ethernet, IPv4 (no options) and UDP headers.
pub(crate) const HEADERS: usize = 14 + 20 + 8;

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// Don't fragment: datagrams are sized to the path MTU.
const IP_DF: u16 = 0x4000;
const TTL: u8 = 64;

/// Where a frame goes: link-layer and IP/UDP endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) src_mac: [u8; 6],
    pub(crate) dst_mac: [u8; 6],
    pub(crate) src: SocketAddrV4,
    pub(crate) dst: SocketAddrV4,
}

/// Why a received frame is not a datagram for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Shorter than its headers say, or than the headers themselves.
    Truncated,
    /// Not IPv4/UDP (the XDP program passes those to the kernel; seeing one is odd).
    NotUdp,
    /// An IPv4 fragment: PacketFS never fragments.
    Fragment,
    /// IPv4 header checksum wrong.
    IpChecksum,
    /// UDP checksum wrong.
    UdpChecksum,
}

/// A received datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Received<'a> {
    pub(crate) src_mac: [u8; 6],
    pub(crate) src: SocketAddrV4,
    pub(crate) dst: SocketAddrV4,
    pub(crate) payload: &'a [u8],
}

/// One's-complement sum of `data` as big-endian 16-bit words, added to `acc`.
fn sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let mut acc = sum(0, &src.octets());
    acc = sum(acc, &dst.octets());
    acc += u64::from(IPPROTO_UDP) + udp.len() as u64;
    acc = sum(acc, udp);
    let c = !fold(acc);
    // A computed zero is sent as all ones (zero means "no checksum").
    if c == 0 { 0xffff } else { c }
}

/// Write the headers for a payload already at `frame[HEADERS..HEADERS + len]`.
/// Returns the frame length. `frame` must hold `HEADERS + len` bytes.
pub(crate) fn write_headers(frame: &mut [u8], r: &Route, len: usize, ip_id: u16) -> usize {
    let total = HEADERS + len;
    let f = &mut frame[..total];
    f[0..6].copy_from_slice(&r.dst_mac);
    f[6..12].copy_from_slice(&r.src_mac);
    f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let ip_len = (20 + 8 + len) as u16;
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[1] = 0;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
        ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
        ip[8] = TTL;
        ip[9] = IPPROTO_UDP;
        ip[10..12].copy_from_slice(&[0, 0]);
        ip[12..16].copy_from_slice(&r.src.ip().octets());
        ip[16..20].copy_from_slice(&r.dst.ip().octets());
        let c = !fold(sum(0, ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let udp_len = (8 + len) as u16;
    {
        let udp = &mut f[34..];
        udp[0..2].copy_from_slice(&r.src.port().to_be_bytes());
        udp[2..4].copy_from_slice(&r.dst.port().to_be_bytes());
        udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
        udp[6..8].copy_from_slice(&[0, 0]);
        let c = udp_checksum(*r.src.ip(), *r.dst.ip(), udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
    }
    total
}

/// Parse and check a received frame.
pub(crate) fn parse(f: &[u8]) -> Result<Received<'_>, Reject> {
    if f.len() < HEADERS {
        return Err(Reject::Truncated);
    }
    if u16::from_be_bytes([f[12], f[13]]) != ETH_P_IP {
        return Err(Reject::NotUdp);
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_UDP {
        return Err(Reject::NotUdp);
    }
    let ip_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip_len < ihl + 8 || ip.len() < ip_len {
        return Err(Reject::Truncated);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(Reject::Fragment);
    }
    if fold(sum(0, &ip[..ihl])) != 0xffff {
        return Err(Reject::IpChecksum);
    }
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let udp = &ip[ihl..ip_len];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < 8 || udp_len > udp.len() {
        return Err(Reject::Truncated);
    }
    let udp = &udp[..udp_len];
    if u16::from_be_bytes([udp[6], udp[7]]) != 0 {
        let mut acc = sum(0, &src_ip.octets());
        acc = sum(acc, &dst_ip.octets());
        acc += u64::from(IPPROTO_UDP) + udp_len as u64;
        if fold(sum(acc, udp)) != 0xffff {
            return Err(Reject::UdpChecksum);
        }
    }
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&f[6..12]);
    Ok(Received {
        src_mac,
        src: SocketAddrV4::new(src_ip, u16::from_be_bytes([udp[0], udp[1]])),
        dst: SocketAddrV4::new(dst_ip, u16::from_be_bytes([udp[2], udp[3]])),
        payload: &udp[8..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: "198.18.0.1:7000".parse().unwrap(),
            dst: "198.18.0.2:40000".parse().unwrap(),
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HEADERS + payload.len()];
        f[HEADERS..].copy_from_slice(payload);
        let n = write_headers(&mut f, &route(), payload.len(), 7);
        assert_eq!(n, f.len());
        f
    }

    #[test]
    fn round_trip_with_valid_checksums() {
        for len in [0usize, 1, 2, 3, 63, 1472] {
            let p: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let f = frame(&p);
            let r = parse(&f).unwrap();
            assert_eq!(r.payload, &p[..]);
            assert_eq!(r.src, route().src);
            assert_eq!(r.dst, route().dst);
            assert_eq!(r.src_mac, route().src_mac);
        }
    }

    #[test]
    fn known_checksums() {
        // Reference values computed independently (RFC 1071 one's-complement sums).
        let f = frame(b"hello");
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 20 + 8 + 5);
        // The IP header sums to 0xffff including its checksum, and so does the UDP
        // pseudo-header + segment.
        assert_eq!(fold(sum(0, &f[14..34])), 0xffff);
        let mut acc = sum(0, &f[26..34]);
        acc += 17 + 13;
        assert_eq!(fold(sum(acc, &f[34..])), 0xffff);
    }

    #[test]
    fn corrupt_frames_are_rejected() {
        let good = frame(b"payload bytes");
        let mut f = good.clone();
        f[HEADERS + 3] ^= 1;
        assert_eq!(parse(&f), Err(Reject::UdpChecksum));
        let mut f = good.clone();
        f[22] ^= 1; // TTL
        assert_eq!(parse(&f), Err(Reject::IpChecksum));
        assert_eq!(parse(&good[..HEADERS - 1]), Err(Reject::Truncated));
        assert_eq!(parse(&good[..good.len() - 1]), Err(Reject::Truncated));
        let mut f = good.clone();
        f[23] = 6; // TCP
        assert_eq!(parse(&f), Err(Reject::NotUdp));
        let mut f = good.clone();
        f[12] = 0x86;
        f[13] = 0xdd; // IPv6
        assert_eq!(parse(&f), Err(Reject::NotUdp));
        let mut f = good;
        f[20] |= 0x20; // more fragments
        assert_eq!(parse(&f), Err(Reject::Fragment));
    }

    #[test]
    fn a_zero_udp_checksum_means_none() {
        let mut f = frame(b"x");
        f[40] = 0;
        f[41] = 0;
        assert!(parse(&f).is_ok());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..200 {
            let mut v = vec![0u8; len];
            for b in &mut v {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if len > 24 {
                v[12] = 8;
                v[13] = 0;
                v[14] = 0x45;
                v[23] = 17;
            }
            let _ = parse(&v);
        }
    }
}
