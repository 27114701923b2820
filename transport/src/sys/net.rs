//! Socket addresses and batched datagram system calls.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// A socket address in the kernel's layout.
#[derive(Clone, Copy)]
pub(crate) struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl std::fmt::Debug for RawAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.socket_addr())
    }
}

impl RawAddr {
    pub(crate) fn empty() -> RawAddr {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid (AF_UNSPEC) value.
        let storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        RawAddr {
            storage,
            len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    pub(crate) fn from_socket_addr(a: &SocketAddr) -> RawAddr {
        let mut r = RawAddr::empty();
        match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe {
                    std::ptr::write((&mut r.storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                r.len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe {
                    std::ptr::write((&mut r.storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                r.len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        r
    }

    pub(crate) fn socket_addr(&self) -> Option<SocketAddr> {
        match i32::from(self.storage.ss_family) {
            libc::AF_INET if self.len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says the storage holds a sockaddr_in, which fits.
                let sin: libc::sockaddr_in = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if self.len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the family says the storage holds a sockaddr_in6, which fits.
                let sin6: libc::sockaddr_in6 = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        (&mut self.storage as *mut libc::sockaddr_storage).cast()
    }

    pub(crate) fn len(&self) -> libc::socklen_t {
        self.len
    }

    pub(crate) fn set_len(&mut self, len: libc::socklen_t) {
        self.len = len.min(std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t);
    }
}

/// Most datagrams one `sendmmsg`/`recvmmsg` moves.
pub(crate) const MMSG_BATCH: usize = 64;

/// Send each `(to, bytes)` with one `sendmmsg` per [`MMSG_BATCH`]; returns how many went
/// out (stops early when the socket buffer is full).
pub(crate) fn sendmmsg(fd: RawFd, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in msgs.chunks(MMSG_BATCH) {
        let mut addrs: Vec<RawAddr> = chunk
            .iter()
            .map(|(a, _)| RawAddr::from_socket_addr(a))
            .collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is valid.
        let mut hdrs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = addrs[i].as_mut_ptr().cast();
            h.msg_hdr.msg_namelen = addrs[i].len();
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at an address and one iovec that live until the call
        // returns; the iovecs point at the callers' slices (read only by the kernel).
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock && sent > 0 {
                return Ok(sent);
            }
            return if sent > 0 { Ok(sent) } else { Err(e) };
        }
        sent += r as usize;
        if (r as usize) < chunk.len() {
            break;
        }
    }
    Ok(sent)
}

/// A reusable batch for `recvmmsg`: buffers, addresses and headers set up once, so a
/// busy-polling receiver allocates and zeroes nothing per call.
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<RawAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    got: usize,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` point into the heap allocations of
// `bufs`, `addrs` and `iovs`, which the batch owns and never reallocates after `new`;
// moving the batch (or sending it to another thread) moves no pointee.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("n", &self.bufs.len())
            .finish()
    }
}

impl RecvBatch {
    /// `n` buffers (at most [`MMSG_BATCH`]) of `size` bytes.
    pub(crate) fn new(n: usize, size: usize) -> RecvBatch {
        let n = n.clamp(1, MMSG_BATCH);
        let mut b = RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; size]).collect(),
            addrs: (0..n).map(|_| RawAddr::empty()).collect(),
            iovs: Vec::with_capacity(n),
            // SAFETY: mmsghdr is plain data; all-zero is valid.
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            got: 0,
        };
        for buf in b.bufs.iter_mut() {
            b.iovs.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            });
        }
        for i in 0..n {
            let name = b.addrs[i].as_mut_ptr();
            let iov: *mut libc::iovec = &mut b.iovs[i];
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = name.cast();
            h.msg_iov = iov;
            h.msg_iovlen = 1;
        }
        b
    }

    /// Receive up to the batch's size without blocking; returns how many arrived.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.got = 0;
        let size = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        for h in self.hdrs.iter_mut() {
            h.msg_hdr.msg_namelen = size;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at one of our buffers (through its iovec) and at an
        // address buffer of the announced size, all owned by `self` and borrowed mutably
        // for the call; the kernel writes at most those sizes.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.got = r as usize;
        for i in 0..self.got {
            let len = self.hdrs[i].msg_hdr.msg_namelen;
            self.addrs[i].set_len(len);
        }
        Ok(self.got)
    }

    /// Datagram `i` of the last receive: its bytes and source, or `None` when it was
    /// truncated (longer than the buffers) or has no IP source.
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.got {
            return None;
        }
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let len = (h.msg_len as usize).min(self.bufs[i].len());
        Some((&self.bufs[i][..len], self.addrs[i].socket_addr()?))
    }
}

/// Ask for big socket buffers: `SO_*BUFFORCE` as root (beyond `net.core.*mem_max`),
/// the plain options otherwise. Best effort; returns the receive buffer obtained.
pub(crate) fn grow_buffers(fd: RawFd, bytes: usize) -> usize {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if super::setsockopt_int(fd, libc::SOL_SOCKET, force, v).is_err() {
            let _ = super::setsockopt_int(fd, libc::SOL_SOCKET, plain, v);
        }
    }
    let mut got: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `got`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut got as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 { got as usize } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for a in [
            "127.0.0.1:7000",
            "[::1]:9",
            "198.18.0.2:65535",
            "[fe80::1%2]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(RawAddr::from_socket_addr(&a).socket_addr(), Some(a));
        }
        assert_eq!(RawAddr::empty().socket_addr(), None);
    }

    #[test]
    fn mmsg_batches_move_datagrams() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 10 + i as usize]).collect();
        let msgs: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, &p[..])).collect();
        use std::os::fd::AsRawFd;
        assert_eq!(sendmmsg(a.as_raw_fd(), &msgs).unwrap(), 100);
        let mut batch = RecvBatch::new(64, 2048);
        let mut got = 0;
        while got < 100 {
            match batch.recv(b.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (d, from) = batch.get(i).unwrap();
                        assert_eq!(from, a.local_addr().unwrap());
                        assert_eq!(d, &payloads[got + i][..]);
                    }
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
    }
}

/// A datagram as a gather list: header bytes in `head`, payloads referenced where they
/// live (region memory, shared buffers), sent without copying them in user space.
#[derive(Debug, Default)]
pub(crate) struct Datagram {
    pub(crate) head: Vec<u8>,
    parts: Vec<Part>,
    mark: usize,
}

#[derive(Debug)]
enum Part {
    Head(std::ops::Range<usize>),
    Region(super::mem::Slice),
    Shared(std::sync::Arc<[u8]>, std::ops::Range<usize>),
}

impl Datagram {
    pub(crate) fn clear(&mut self) {
        self.head.clear();
        self.parts.clear();
        self.mark = 0;
    }

    fn close_head(&mut self) {
        if self.head.len() > self.mark {
            self.parts.push(Part::Head(self.mark..self.head.len()));
            self.mark = self.head.len();
        }
    }

    /// Append a window of region memory.
    pub(crate) fn push_region(&mut self, s: super::mem::Slice) {
        self.close_head();
        if s.len() > 0 {
            self.parts.push(Part::Region(s));
        }
    }

    /// Append a window of a shared buffer (checked against its length).
    pub(crate) fn push_shared(&mut self, b: std::sync::Arc<[u8]>, r: std::ops::Range<usize>) {
        self.close_head();
        if r.start < r.end && r.end <= b.len() {
            self.parts.push(Part::Shared(b, r));
        }
    }

    /// Close the trailing header bytes (call once the datagram is complete).
    pub(crate) fn finish(&mut self) {
        self.close_head();
    }

    /// Total bytes.
    pub(crate) fn len(&self) -> usize {
        self.head.len() - self.mark
            + self
                .parts
                .iter()
                .map(|p| match p {
                    Part::Head(r) | Part::Shared(_, r) => r.len(),
                    Part::Region(s) => s.len(),
                })
                .sum::<usize>()
    }

    /// Hand every byte to `f`, in order, in pieces: header bytes and shared buffers as
    /// they are, region memory through a copy (remote peers may write it concurrently,
    /// so no reference into it is made).
    pub(crate) fn for_each_piece(&self, mut f: impl FnMut(&[u8])) {
        // 16 KiB: a hash such as BLAKE3 works on several of its 1 KiB chunks at once,
        // and needs pieces this large to do so (4 KiB pieces hash at half the speed).
        let mut tmp = [0u8; 16 << 10];
        for p in &self.parts {
            match p {
                Part::Head(r) => f(&self.head[r.clone()]),
                Part::Shared(b, r) => f(&b[r.clone()]),
                Part::Region(s) => {
                    let mut at = 0;
                    while at < s.len() {
                        let n = (s.len() - at).min(tmp.len());
                        // In bounds: the slice was checked against its region when made.
                        let _ = s.mem().copy_out(s.offset() + at, &mut tmp[..n]);
                        f(&tmp[..n]);
                        at += n;
                    }
                }
            }
        }
        f(&self.head[self.mark..]);
    }

    fn piece(&self, p: &Part) -> (*const u8, usize) {
        match p {
            Part::Head(r) => (self.head[r.clone()].as_ptr(), r.len()),
            Part::Shared(b, r) => (b[r.clone()].as_ptr(), r.len()),
            Part::Region(s) => (s.as_ptr().cast_const(), s.len()),
        }
    }

    fn iovecs(&self, out: &mut Vec<libc::iovec>) {
        for p in &self.parts {
            let (ptr, len) = self.piece(p);
            out.push(libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            });
        }
    }
}

/// Send each `(to, datagram)` with gathered iovecs, one `sendmmsg` per [`MMSG_BATCH`];
/// returns how many went out.
pub(crate) fn sendmmsg_gather(fd: RawFd, msgs: &[(SocketAddr, Datagram)]) -> io::Result<usize> {
    if let [(to, d)] = msgs
        && d.parts.len() <= SMALL_IOV
    {
        return send_one_gathered(fd, to, d);
    }
    let mut sent = 0;
    for chunk in msgs.chunks(MMSG_BATCH) {
        let mut addrs: Vec<RawAddr> = chunk
            .iter()
            .map(|(a, _)| RawAddr::from_socket_addr(a))
            .collect();
        let mut iovs: Vec<libc::iovec> = Vec::new();
        let mut spans = Vec::with_capacity(chunk.len());
        for (_, d) in chunk {
            let start = iovs.len();
            d.iovecs(&mut iovs);
            spans.push(start..iovs.len());
        }
        // SAFETY: mmsghdr is plain data; all-zero is valid.
        let mut hdrs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = addrs[i].as_mut_ptr().cast();
            h.msg_hdr.msg_namelen = addrs[i].len();
            h.msg_hdr.msg_iov = iovs[spans[i].clone()].as_mut_ptr();
            h.msg_hdr.msg_iovlen = spans[i].len();
        }
        // SAFETY: every iovec points into a buffer owned by `msgs` (header vectors, shared
        // buffers, region memory kept alive by its slice), borrowed for the whole call;
        // the kernel only reads them. Headers and addresses live until the call returns.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if sent > 0 { Ok(sent) } else { Err(e) };
        }
        sent += r as usize;
        if (r as usize) < chunk.len() {
            break;
        }
    }
    Ok(sent)
}

/// Pieces a single datagram may have to take the allocation-free path.
const SMALL_IOV: usize = 8;

/// One datagram, one `sendmsg`, nothing allocated: the latency-bound case (a request or
/// an answer alone in its flush).
fn send_one_gathered(fd: RawFd, to: &SocketAddr, d: &Datagram) -> io::Result<usize> {
    let mut addr = RawAddr::from_socket_addr(to);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; SMALL_IOV];
    for (slot, p) in iov.iter_mut().zip(&d.parts) {
        let (ptr, len) = d.piece(p);
        *slot = libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        };
    }
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = addr.as_mut_ptr().cast();
    h.msg_namelen = addr.len();
    h.msg_iov = iov.as_mut_ptr();
    h.msg_iovlen = d.parts.len();
    // SAFETY: as in `sendmmsg_gather`: the iovecs point into buffers `d` owns or keeps
    // alive, and the address and iovec array outlive the call; the kernel only reads.
    let r = unsafe { libc::sendmsg(fd, &h, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(1)
    }
}

/// One datagram without blocking (`recvfrom(MSG_DONTWAIT)`): its length (or
/// `usize::MAX` when it was longer than `buf`) and source.
pub(crate) fn recv_from(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>)> {
    let mut addr = RawAddr::empty();
    let mut len = addr.len();
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf` and at most `len`
    // bytes into `addr`, both borrowed mutably for the call.
    let r = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            addr.as_mut_ptr(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    addr.set_len(len);
    let n = r as usize;
    Ok((
        if n > buf.len() { usize::MAX } else { n },
        addr.socket_addr(),
    ))
}
