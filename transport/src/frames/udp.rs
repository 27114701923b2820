//! Kernel UDP: one socket per endpoint, driven by io_uring.
//!
//! Blocking mode keeps a batch of `RECVMSG`s armed on the ring and submits every
//! datagram of a flush as its own `SENDMSG` in one `io_uring_enter`; waiting is one
//! `io_uring_enter` too. Busy-poll mode moves datagrams with batched `recvmmsg` /
//! `sendmmsg` system calls (up to 64 datagrams each, no io_uring round trip), for the
//! same reason as the tcp backend's busy-poll path: a spinning poller pays the cost of
//! every empty poll, and a plain non-blocking call is the cheapest one here.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Driver, Wake};
use crate::sys::uring::{Buf, Cqe, Held, Issuer, Ring};
use crate::sys::{self, EventFd, net};

const K_RECV: u64 = 1;
const K_SEND: u64 = 2;
const K_WAKE: u64 = 3;
/// Receives kept armed in blocking mode.
const ARMED: usize = 64;
/// A datagram at least this large means a bulk transfer: receive the rest in a batch.
const BULK_HINT: usize = 8192;

/// Wakes a driver sleeping on an eventfd, only when it sleeps.
pub(crate) struct EvWake {
    pub(crate) fd: EventFd,
    pub(crate) sleeping: AtomicBool,
}

impl Wake for EvWake {
    fn wake(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.fd.signal();
        }
    }
}

/// The UDP driver.
pub(crate) struct UdpDriver {
    sock: UdpSocket,
    local: SocketAddr,
    busy: bool,
    ring: Option<Ring>,
    max_datagram: usize,
    out: Vec<(SocketAddr, Vec<u8>)>,
    pool: Vec<Vec<u8>>,
    out_g: Vec<(SocketAddr, net::Datagram)>,
    pool_g: Vec<net::Datagram>,
    /// Busy-poll: the buffer of each poll's first receive, and the batch for the rest.
    one: Vec<u8>,
    rx: Option<net::RecvBatch>,
    armed: usize,
    cqes: Vec<Cqe>,
    wake: Arc<EvWake>,
    wake_armed: bool,
    rcvbuf: usize,
    /// Datagrams the kernel refused (socket buffer full) or that arrived truncated.
    pub(crate) dropped: u64,
}

impl std::fmt::Debug for UdpDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpDriver")
            .field("local", &self.local)
            .finish()
    }
}

impl UdpDriver {
    /// Bind a UDP socket at `addr`.
    pub(crate) fn bind(addr: SocketAddr, busy: bool, max_datagram: usize) -> io::Result<UdpDriver> {
        let sock = UdpSocket::bind(addr)?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        let rcvbuf = net::grow_buffers(sock.as_raw_fd(), 16 << 20);
        Ok(UdpDriver {
            sock,
            local,
            busy,
            ring: None,
            max_datagram,
            out: Vec::new(),
            pool: Vec::new(),
            out_g: Vec::new(),
            pool_g: Vec::new(),
            one: Vec::new(),
            rx: None,
            armed: 0,
            cqes: Vec::new(),
            wake: Arc::new(EvWake {
                fd: EventFd::new()?,
                sleeping: AtomicBool::new(false),
            }),
            wake_armed: false,
            rcvbuf,
            dropped: 0,
        })
    }

    /// Create the ring (blocking mode), on the thread that will drive it.
    fn start_ring(&mut self, dedicated: bool) -> io::Result<()> {
        if self.busy || self.ring.is_some() {
            return Ok(());
        }
        let issuer = if dedicated {
            Issuer::Single
        } else {
            Issuer::Shared
        };
        self.ring = Some(Ring::new(512, issuer)?);
        self.arm_receives();
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    fn arm_receives(&mut self) {
        let fd = self.fd();
        while self.armed < ARMED {
            let mut b = self.pool.pop().unwrap_or_default();
            b.clear();
            b.resize(self.max_datagram + 1, 0);
            let Some(ring) = self.ring.as_mut() else {
                return;
            };
            if ring.recvmsg_from(fd, b, K_RECV).is_err() {
                return;
            }
            self.armed += 1;
        }
    }

    fn reap(&mut self, f: &mut dyn FnMut(SocketAddr, &[u8])) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        ring.reap(&mut cqes);
        let mut n = 0;
        for c in cqes.drain(..) {
            match (c.tag, c.held) {
                (K_RECV, Held::Datagram { buf, from }) => {
                    self.armed -= 1;
                    if c.res > 0 && (c.res as usize) <= self.max_datagram {
                        if let Some(from) = from {
                            f(from, &buf[..c.res as usize]);
                            n += 1;
                        }
                    } else if c.res > 0 {
                        self.dropped += 1;
                    }
                    self.pool.push(buf);
                }
                (K_SEND, Held::Buf(Buf::Heap(buf))) => {
                    if c.res < 0 {
                        self.dropped += 1;
                    }
                    self.pool.push(buf);
                }
                (K_WAKE, _) => self.wake_armed = false,
                _ => {}
            }
        }
        self.cqes = cqes;
        self.arm_receives();
        n
    }
}

impl Driver for UdpDriver {
    fn start(&mut self, dedicated: bool) -> io::Result<()> {
        self.start_ring(dedicated)
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        let mut b = self.buffer();
        b.clear();
        b.extend_from_slice(datagram);
        self.out.push((to, b));
    }

    fn take_buffer(&mut self) -> Vec<u8> {
        let mut b = self.buffer();
        b.clear();
        b
    }

    fn send_owned(&mut self, to: SocketAddr, datagram: Vec<u8>) {
        self.out.push((to, datagram));
    }

    fn take_gather(&mut self) -> Option<net::Datagram> {
        // Gathered sends are synchronous (sendmmsg), so the payloads only need to live
        // until the flush: busy-poll mode only.
        self.busy.then(|| self.pool_g.pop().unwrap_or_default())
    }

    fn send_gather(&mut self, to: SocketAddr, datagram: net::Datagram) {
        self.out_g.push((to, datagram));
    }

    fn return_gather(&mut self, mut datagram: net::Datagram) {
        datagram.clear();
        self.pool_g.push(datagram);
    }

    fn flush(&mut self) {
        let fd = self.fd();
        if !self.out_g.is_empty() {
            let sent = net::sendmmsg_gather(fd, &self.out_g).unwrap_or(0);
            self.dropped += (self.out_g.len() - sent) as u64;
            for (_, mut d) in self.out_g.drain(..) {
                d.clear();
                self.pool_g.push(d);
            }
        }
        if self.out.is_empty() {
            return;
        }
        if self.busy || self.ring.is_none() {
            let msgs: Vec<(SocketAddr, &[u8])> =
                self.out.iter().map(|(a, b)| (*a, &b[..])).collect();
            let sent = net::sendmmsg(fd, &msgs).unwrap_or(0);
            // What the socket buffer refused is dropped: the protocol retransmits it.
            self.dropped += (msgs.len() - sent) as u64;
            for (_, b) in self.out.drain(..) {
                self.pool.push(b);
            }
            return;
        }
        let out = std::mem::take(&mut self.out);
        if let Some(ring) = self.ring.as_mut() {
            for (to, b) in out {
                if ring.sendmsg_to(fd, &to, b, K_SEND).is_err() {
                    self.dropped += 1;
                }
            }
            let _ = ring.submit();
        }
    }

    fn recv(&mut self, f: &mut dyn FnMut(SocketAddr, &[u8])) -> usize {
        if !self.busy && self.ring.is_some() {
            if let Some(ring) = self.ring.as_mut() {
                let _ = ring.submit();
            }
            return self.reap(f);
        }
        let max = self.max_datagram;
        let fd = self.sock.as_raw_fd();
        // Polls start with one plain recvfrom: on this kernel it costs two thirds of an
        // empty recvmmsg, and a latency-bound exchange has one datagram to take anyway.
        // A large datagram signals a bulk transfer: then a batch call takes the rest.
        if self.one.len() != max + 1 {
            self.one = vec![0u8; max + 1];
        }
        let first = match net::recv_from(fd, &mut self.one) {
            Ok((len, Some(from))) if len <= max => {
                f(from, &self.one[..len]);
                len
            }
            Ok(_) => {
                self.dropped += 1;
                0
            }
            Err(_) => return 0,
        };
        let mut n = 1;
        if first >= BULK_HINT {
            let rx = self
                .rx
                .get_or_insert_with(|| net::RecvBatch::new(net::MMSG_BATCH, max + 1));
            let got = rx.recv(fd).unwrap_or_default();
            for i in 0..got {
                match rx.get(i) {
                    Some((d, from)) if d.len() <= max => {
                        f(from, d);
                        n += 1;
                    }
                    _ => self.dropped += 1,
                }
            }
        }
        n
    }

    fn wait(&mut self, until: Option<Instant>) {
        if self.busy {
            return;
        }
        let max = super::sleep_budget(until);
        let efd = self.wake.fd.raw();
        let Some(ring) = self.ring.as_mut() else {
            std::thread::sleep(max.min(Duration::from_millis(1)));
            return;
        };
        if !self.wake_armed && ring.read_counter(efd, K_WAKE).is_ok() {
            self.wake_armed = true;
        }
        self.wake.sleeping.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let _ = ring.wait(max);
        self.wake.sleeping.store(false, Ordering::SeqCst);
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake.clone()
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn describe(&self) -> String {
        format!(
            "UDP {} ({}; socket receive buffer {} KiB; datagrams up to {} bytes)",
            self.local,
            if self.busy {
                "busy-poll: recvmmsg/sendmmsg, 64 datagrams per call"
            } else {
                "io_uring: RECVMSG armed, SENDMSG batched per enter"
            },
            self.rcvbuf / 1024,
            self.max_datagram
        )
    }
}

impl Drop for UdpDriver {
    fn drop(&mut self) {
        // Armed receives use our buffers until they complete: shut the socket so they
        // do, and collect them before the ring goes.
        if let Some(ring) = self.ring.as_mut() {
            sys::shutdown(self.sock.as_raw_fd());
            self.wake.fd.signal();
            let until = Instant::now() + Duration::from_secs(1);
            while ring.inflight() > 0 && Instant::now() < until {
                let _ = ring.wait(Duration::from_millis(5));
                let mut c = Vec::new();
                ring.reap(&mut c);
            }
        }
    }
}
