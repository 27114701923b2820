//! One AF_XDP socket with its own UMEM (xsk-rs over libxdp), behind a safe interface.
//!
//! Every UMEM frame is owned by exactly one party at a time, and this type keeps the
//! books: the free list (ours, for transmit), the fill ring and the receive path
//! (kernel's until it comes back on the RX ring), the TX ring (kernel's until it comes
//! back on the completion ring). A frame is only read or written while it is ours,
//! which is the condition every `unsafe` call below relies on.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// Frames per socket; half are posted for receive, half kept for transmit.
const FRAMES: u32 = 4096;
/// Descriptors per ring.
const RING: u32 = 2048;
/// Bytes per frame (one page). Frames carry at most `FRAME - XDP headroom` bytes.
pub(crate) const FRAME: u32 = 4096;

/// How a socket ended up bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BindMode {
    /// Frames DMA'd straight into the UMEM.
    ZeroCopy,
    /// The kernel copies each frame between its buffers and the UMEM; the reason the
    /// zero-copy bind was refused.
    Copy(String),
}

/// An AF_XDP socket bound to one queue of one interface.
pub(crate) struct Xsk {
    umem: Umem,
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    /// Frames that are ours and free.
    free: Vec<FrameDesc>,
    /// Frames holding a datagram built but not yet on the TX ring.
    pending: Vec<FrameDesc>,
    /// Scratch for ring transfers.
    scratch: Vec<FrameDesc>,
    /// Frames on the TX ring, not yet completed.
    tx_out: usize,
    /// Where each queued packet ends in `pending` (packets may span frames).
    pending_ends: Vec<usize>,
    /// Usable bytes per frame.
    capacity: usize,
    /// Multi-buffer: packets may span several frames (`XDP_PKT_CONTD`).
    sg: bool,
    /// A received packet being gathered from its frames.
    chain: Vec<u8>,
    /// The packet being gathered is too long: drop it when it ends.
    chain_bad: bool,
    /// Largest packet gathered from several frames.
    max_packet: usize,
    pub(crate) mode: BindMode,
}

/// `xdp_desc.options`: more frames of this packet follow.
const XDP_PKT_CONTD: u32 = 1;

impl std::fmt::Debug for Xsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xsk")
            .field("mode", &self.mode)
            .field("free", &self.free.len())
            .finish()
    }
}

fn io_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// An error with its source, on one line.
fn chain(e: &impl std::error::Error) -> String {
    match e.source() {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

fn os_code(e: &impl std::error::Error) -> Option<i32> {
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        src = s.source();
    }
    None
}

impl Xsk {
    /// Create a UMEM and bind a socket on `iface` queue `queue`: zero-copy first, then
    /// copy mode. libxdp loads no program of its own: the caller inserts the socket into
    /// its XSKMAP.
    /// With `sg` (multi-buffer), packets up to `max_packet` bytes may span frames; the
    /// XDP program must then be the `xdp.frags` one.
    pub(crate) fn open(
        iface: &str,
        queue: u32,
        need_wakeup: bool,
        sg: bool,
        max_packet: usize,
    ) -> io::Result<Xsk> {
        let name: Interface = iface
            .parse()
            .map_err(|e| io_err("interface name", format!("{e:?}")))?;
        let ring = QueueSize::new(RING).map_err(|e| io_err("ring size", e))?;
        let ucfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME).map_err(|e| io_err("frame size", e))?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| io_err("UMEM config", e))?;
        let capacity = ucfg.mtu() as usize;
        let frames = NonZeroU32::new(FRAMES).expect("non-zero");
        let mut wake = if need_wakeup {
            BindFlags::XDP_USE_NEED_WAKEUP
        } else {
            BindFlags::empty()
        };
        if sg {
            wake |= BindFlags::XDP_USE_SG;
        }
        let mut zc_refused = String::new();
        for zero_copy in [true, false] {
            let flags = if zero_copy {
                BindFlags::XDP_ZEROCOPY
            } else {
                BindFlags::XDP_COPY
            };
            let (umem, descs) = Umem::new(ucfg, frames, false).map_err(|e| {
                let code = os_code(&e);
                let hint = match code {
                    Some(libc::ENOMEM) | Some(libc::EPERM) | Some(libc::ENOBUFS) => {
                        ": the UMEM counts against the locked-memory limit; raise it \
                         (`ulimit -l unlimited`) or run with CAP_IPC_LOCK"
                    }
                    _ => "",
                };
                io::Error::new(
                    code.map(io::Error::from_raw_os_error)
                        .map(|e| e.kind())
                        .unwrap_or(io::ErrorKind::Other),
                    format!(
                        "creating a {} MiB UMEM: {}{hint}",
                        (FRAMES * FRAME) >> 20,
                        chain(&e)
                    ),
                )
            })?;
            let scfg = SocketConfig::builder()
                .rx_queue_size(ring)
                .tx_queue_size(ring)
                .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                .bind_flags(flags | wake)
                .build();
            // SAFETY: the UMEM is fresh and not shared with any other socket, so the
            // shared-UMEM precondition of `Socket::new` does not apply; the program
            // load is inhibited in any case.
            let made = unsafe { Socket::new(scfg, &umem, &name, queue) };
            match made {
                Ok((tx, rx, Some((fq, cq)))) => {
                    let mode = if zero_copy {
                        BindMode::ZeroCopy
                    } else {
                        BindMode::Copy(zc_refused)
                    };
                    let mut x = Xsk {
                        umem,
                        tx,
                        rx,
                        fq,
                        cq,
                        free: descs,
                        pending: Vec::new(),
                        scratch: Vec::new(),
                        tx_out: 0,
                        pending_ends: Vec::new(),
                        capacity,
                        sg,
                        chain: Vec::new(),
                        chain_bad: false,
                        max_packet,
                        mode,
                    };
                    x.post_receives((FRAMES / 2) as usize);
                    return Ok(x);
                }
                Ok(_) => {
                    return Err(io_err(
                        "AF_XDP bind",
                        "no fill/completion rings for a fresh UMEM",
                    ));
                }
                Err(e) => {
                    let code = os_code(&e);
                    if zero_copy {
                        zc_refused = match code {
                            Some(libc::EOPNOTSUPP) => {
                                "the driver has no zero-copy AF_XDP support (EOPNOTSUPP)".into()
                            }
                            Some(c) => format!(
                                "zero-copy bind failed: {}",
                                io::Error::from_raw_os_error(c)
                            ),
                            None => format!("zero-copy bind failed: {}", chain(&e)),
                        };
                        continue;
                    }
                    let kind = code
                        .map(|c| io::Error::from_raw_os_error(c).kind())
                        .unwrap_or(io::ErrorKind::Other);
                    let hint = match code {
                        Some(libc::EPERM) | Some(libc::EACCES) => {
                            ": AF_XDP needs CAP_NET_ADMIN and CAP_BPF: run as root or use udp://"
                        }
                        Some(libc::EINVAL) => ": does the interface have this queue?",
                        Some(libc::EBUSY) => ": another AF_XDP socket is bound to this queue",
                        _ => "",
                    };
                    return Err(io::Error::new(
                        kind,
                        format!(
                            "AF_XDP socket on {iface} queue {queue}: {}{hint}",
                            chain(&e)
                        ),
                    ));
                }
            }
        }
        unreachable!("the copy-mode attempt returns")
    }

    /// The socket's descriptor (for the XSKMAP and for poll).
    pub(crate) fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Bytes a frame can carry.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Give up to `n` free frames to the fill ring.
    fn post_receives(&mut self, n: usize) {
        // Reserving ring slots is all or nothing: ask only for what fits.
        let room = self.fq.nb_free(n as u32) as usize;
        let n = n.min(self.free.len()).min(room);
        if n == 0 {
            return;
        }
        let at = self.free.len() - n;
        // SAFETY: the frames come from our free list (ours, untouched by the kernel) and
        // belong to this socket's UMEM; once produced they are the kernel's until they
        // come back on the RX ring.
        let done = unsafe { self.fq.produce(&self.free[at..]) };
        self.free.truncate(self.free.len() - done);
    }

    /// Take completed transmissions back into the free list.
    fn reclaim(&mut self) {
        if self.tx_out == 0 {
            return;
        }
        self.scratch.clear();
        self.scratch
            .resize(self.tx_out.min(RING as usize), FrameDesc::default());
        // SAFETY: the completion ring hands back frames of this UMEM that the kernel has
        // finished sending; they are ours again.
        let n = unsafe { self.cq.consume(&mut self.scratch) };
        self.tx_out -= n;
        self.free.extend_from_slice(&self.scratch[..n]);
    }

    /// Build one frame with `f` (given the frame's bytes, returns the length used) and
    /// queue it for [`flush`](Xsk::flush). False when no frame is free (the caller drops
    /// the datagram: the protocol resends it).
    pub(crate) fn push(&mut self, f: impl FnOnce(&mut [u8]) -> usize) -> bool {
        if self.free.is_empty() {
            self.reclaim();
        }
        let Some(mut desc) = self.free.pop() else {
            return false;
        };
        let cap = self.capacity;
        // SAFETY: `desc` is a free frame of this UMEM: neither ring holds it, so nothing
        // else reads or writes it while we fill it.
        let mut data = unsafe { self.umem.data_mut(&mut desc) };
        data.cursor().set_pos(cap);
        let n = f(data.contents_mut()).min(cap);
        data.cursor().set_pos(n);
        desc.set_options(0);
        self.pending.push(desc);
        self.pending_ends.push(self.pending.len());
        true
    }

    /// Queue one packet of `bytes`, over as many frames as it needs (multi-buffer
    /// sockets only for more than one). False when frames are short or the packet does
    /// not fit.
    pub(crate) fn push_bytes(&mut self, bytes: &[u8]) -> bool {
        let frames = bytes.len().div_ceil(self.capacity).max(1);
        if frames > 1 && !self.sg {
            return false;
        }
        if self.free.len() < frames {
            self.reclaim();
            if self.free.len() < frames {
                return false;
            }
        }
        let cap = self.capacity;
        for (i, chunk) in bytes.chunks(cap).enumerate() {
            let Some(mut desc) = self.free.pop() else {
                return false;
            };
            // SAFETY: `desc` is a free frame of this UMEM (see `push`).
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            data.cursor().set_pos(cap);
            data.contents_mut()[..chunk.len()].copy_from_slice(chunk);
            data.cursor().set_pos(chunk.len());
            desc.set_options(if i + 1 < frames { XDP_PKT_CONTD } else { 0 });
            self.pending.push(desc);
        }
        self.pending_ends.push(self.pending.len());
        true
    }

    /// Put queued frames on the TX ring and kick the kernel; collect completions.
    /// Returns how many frames did not fit on the ring (dropped; the protocol resends).
    pub(crate) fn flush(&mut self) -> usize {
        let mut sent = 0;
        let mut dropped = 0;
        if !self.pending.is_empty() {
            // Reserving ring slots is all or nothing: produce only what fits, and only
            // whole packets.
            let room = self.tx.nb_free(self.pending.len() as u32) as usize;
            let whole = self
                .pending_ends
                .iter()
                .take_while(|&&end| end <= room)
                .count();
            let fit = if whole == 0 {
                0
            } else {
                self.pending_ends[whole - 1]
            };
            // SAFETY: pending frames are ours and fully written; once produced they are
            // the kernel's until the completion ring returns them.
            let n = unsafe { self.tx.produce(&self.pending[..fit]) };
            self.tx_out += n;
            sent = n;
            // What the ring had no room for goes back to the free list (dropped).
            dropped = self.pending_ends.len() - whole;
            self.free.extend_from_slice(&self.pending[n..]);
            self.pending.clear();
            self.pending_ends.clear();
        }
        // In copy mode the kernel transmits only inside sendto (at most 32 frames per
        // call), so frames still on the ring need a kick on every flush; in zero-copy
        // mode the driver asks for one through the need-wakeup flag.
        let copy = matches!(self.mode, BindMode::Copy(_));
        if self.tx_out > 0 && (sent > 0 || copy || self.tx.needs_wakeup()) {
            let _ = self.tx.wakeup();
        }
        self.reclaim();
        dropped
    }

    /// Hand each received frame to `f`, then return the frames to the fill ring.
    pub(crate) fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> usize {
        self.scratch.clear();
        self.scratch
            .resize(max.min(RING as usize), FrameDesc::default());
        // SAFETY: frames on the RX ring are this UMEM's and, once consumed, ours.
        let n = unsafe { self.rx.consume(&mut self.scratch) };
        let mut packets = 0;
        for i in 0..n {
            let d = self.scratch[i];
            // SAFETY: `d` was just consumed from the RX ring: the kernel is done with it
            // and nothing else touches it until it is produced to the fill ring below.
            let data = unsafe { self.umem.data(&d) };
            let more = d.options() & XDP_PKT_CONTD != 0;
            if !more && self.chain.is_empty() && !self.chain_bad {
                // The common case: a packet in one frame, handed over in place.
                f(data.contents());
                packets += 1;
                continue;
            }
            if self.chain.len() + data.contents().len() > self.max_packet {
                self.chain_bad = true;
            } else if !self.chain_bad {
                self.chain.extend_from_slice(data.contents());
            }
            if !more {
                if !self.chain_bad {
                    f(&self.chain);
                    packets += 1;
                }
                self.chain.clear();
                self.chain_bad = false;
            }
        }
        self.free.extend_from_slice(&self.scratch[..n]);
        // Keep the fill ring stocked, leaving frames for transmit.
        let keep_for_tx = (FRAMES / 4) as usize;
        if self.free.len() > keep_for_tx {
            let give = self.free.len() - keep_for_tx;
            self.post_receives(give);
        }
        if n == 0 && self.fq.needs_wakeup() {
            // Copy mode needs a syscall to move frames when the kernel asks for one.
            let _ = self.fq.wakeup(self.rx.fd_mut(), 0);
        }
        packets
    }
}
