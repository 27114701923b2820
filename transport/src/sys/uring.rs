//! A safe wrapper around one io_uring instance for socket I/O.
//!
//! The kernel reads and writes an operation's buffers until its completion arrives. Here
//! that rule is expressed by ownership: every buffer is *moved into* the ring when an
//! operation is pushed and *handed back* with its completion ([`Cqe::held`]). A buffer is
//! either a heap `Vec<u8>` or a bounds-checked [`Slice`] of region memory (which keeps the
//! region alive), so the kernel never touches memory that could be freed or reused while
//! it works. Lengths are checked against the buffers before any entry is pushed.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};

use super::mem::Slice;

/// A buffer the kernel may use while an operation is in flight.
#[derive(Debug)]
pub(crate) enum Buf {
    /// Heap bytes; the kernel sees `0..vec.len()`.
    Heap(Vec<u8>),
    /// A window of region memory.
    Region(Slice),
}

impl Buf {
    pub(crate) fn len(&self) -> usize {
        match self {
            Buf::Heap(v) => v.len(),
            Buf::Region(s) => s.len(),
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match self {
            Buf::Heap(v) => v.as_mut_ptr(),
            Buf::Region(s) => s.as_ptr(),
        }
    }
}

/// A gathered send: buffers, and the byte ranges of them to send in order.
///
/// Several segments may refer to one buffer (message headers packed into one arena).
#[derive(Debug, Default)]
pub(crate) struct Gather {
    /// The buffers.
    pub(crate) bufs: Vec<Buf>,
    /// What to send, in order.
    pub(crate) segs: Vec<Seg>,
}

/// `len` bytes of `bufs[buf]` from `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg {
    pub(crate) buf: u32,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl Gather {
    /// Total bytes of all segments.
    pub(crate) fn total(&self) -> usize {
        self.segs.iter().map(|s| s.len).sum()
    }
}

/// Buffers handed back with a completion.
#[derive(Debug)]
pub(crate) enum Held {
    /// Nothing (accept), or — for a zero-copy send's first completion — nothing *yet*:
    /// the kernel keeps the buffers until the notification that follows.
    None,
    /// The buffer of a recv.
    Buf(Buf),
    /// The gather list of a sendmsg.
    Gather(Gather),
    /// An eventfd read (its counter value is not needed).
    Counter,
    /// A received datagram: the buffer (the result says how much of it) and its source.
    Datagram {
        buf: Vec<u8>,
        from: Option<std::net::SocketAddr>,
    },
}

/// A completion: the caller's tag, the kernel's result and the buffers back.
#[derive(Debug)]
pub(crate) struct Cqe {
    pub(crate) tag: u64,
    pub(crate) res: i32,
    pub(crate) held: Held,
    /// A zero-copy send's result, arriving before its notification: the buffers come
    /// back with a later completion whose `zc_notif` is set.
    pub(crate) zc_more: bool,
    /// The notification of a zero-copy send whose result came earlier (`zc_more`): the
    /// buffers are back, and `res` repeats that send's result.
    pub(crate) zc_notif: bool,
    /// For a completion that includes a zero-copy notification (`zc_notif`, or a plain
    /// completion whose notification came first): whether the kernel copied the data.
    pub(crate) zc_copied: Option<bool>,
}

/// Bit of a zero-copy notification's result: the kernel copied the data.
const ZC_COPIED: i32 = i32::MIN;
/// `IORING_SEND_ZC_REPORT_USAGE`: ask the notification to say whether data was copied.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;

/// Where a zero-copy send stands (its two completions may come in either order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zc {
    /// Not a zero-copy send, or nothing arrived yet.
    Waiting,
    /// The result arrived (and was reported); the notification has not.
    ResultSeen(i32),
    /// The notification arrived first (with this copied flag); the result has not.
    NotifSeen(bool),
}

/// What the kernel may be using for one in-flight operation.
enum Slot {
    Free,
    Recv {
        tag: u64,
        buf: Buf,
    },
    Send {
        tag: u64,
        gather: Gather,
        _iov: Box<[libc::iovec]>,
        _msg: Option<Box<libc::msghdr>>,
        zc: Zc,
    },
    Accept {
        tag: u64,
    },
    RecvFrom {
        tag: u64,
        buf: Vec<u8>,
        _iov: Box<libc::iovec>,
        msg: Box<libc::msghdr>,
        addr: Box<super::net::RawAddr>,
    },
    SendTo {
        tag: u64,
        buf: Vec<u8>,
        _iov: Box<libc::iovec>,
        _msg: Box<libc::msghdr>,
        _addr: Box<super::net::RawAddr>,
    },
    // The kernel writes the counter into `_val` until the read completes.
    Counter {
        tag: u64,
        _val: Box<u64>,
    },
}

// SAFETY: the raw pointers inside `iovec`/`msghdr` point into buffers owned by the same
// slot (heap `Vec`s, region memory kept alive by `Arc`), which are themselves `Send`.
unsafe impl Send for Slot {}

/// Most iovecs one sendmsg carries (the kernel's `UIO_MAXIOV`).
pub(crate) const MAX_IOV: usize = 1024;

/// How the ring is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Issuer {
    /// Only the creating thread will ever submit (dedicated progress thread): task work is
    /// deferred to our own `io_uring_enter`, so a busy-polling thread is never interrupted.
    Single,
    /// Any thread may submit (caller-driven progress, under a lock).
    Shared,
}

/// One io_uring instance plus the buffers of its in-flight operations.
pub(crate) struct Ring {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    inflight: usize,
    /// Setup flags that were accepted, for `pfs-bench info`.
    pub(crate) features: &'static str,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("inflight", &self.inflight)
            .field("features", &self.features)
            .finish()
    }
}

impl Ring {
    /// Create a ring with `entries` submission entries, trying the best setup flags for
    /// `issuer` first and falling back for older kernels.
    pub(crate) fn new(entries: u32, issuer: Issuer) -> io::Result<Ring> {
        type Setup = fn(&mut io_uring::Builder);
        let attempts: &[(&'static str, Setup)] = match issuer {
            Issuer::Single => &[
                ("single-issuer, defer-taskrun", |b| {
                    b.setup_single_issuer()
                        .setup_defer_taskrun()
                        .setup_taskrun_flag();
                }),
                ("coop-taskrun", |b| {
                    b.setup_coop_taskrun().setup_taskrun_flag();
                }),
                ("plain", |_| {}),
            ],
            Issuer::Shared => &[
                ("coop-taskrun", |b| {
                    b.setup_coop_taskrun().setup_taskrun_flag();
                }),
                ("plain", |_| {}),
            ],
        };
        let mut last = None;
        for (name, setup) in attempts {
            let mut b = IoUring::builder();
            b.setup_cqsize(entries * 4).setup_submit_all();
            setup(&mut b);
            match b.build(entries) {
                Ok(ring) => {
                    return Ok(Ring {
                        ring,
                        slots: Vec::new(),
                        free: Vec::new(),
                        inflight: 0,
                        features: name,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
    }

    /// Operations pushed and not yet completed.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight
    }

    fn alloc(&mut self, slot: Slot) -> u32 {
        self.inflight += 1;
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = slot;
            i
        } else {
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        }
    }

    /// Make room for one entry, submitting queued entries if the queue is full.
    fn room(&mut self) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        if self.ring.submission().is_full() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: `room()` guaranteed a free entry. Every buffer the entry points to is
        // owned by the slot whose index is the entry's user_data, and stays there until
        // that entry's completion is reaped (`reap` frees the slot only then).
        let r = unsafe { self.ring.submission().push(&entry) };
        debug_assert!(r.is_ok());
    }

    /// Receive into `buf[start..start+len]` with `recv(2)` flags: `MSG_WAITALL` keeps
    /// receiving until `len` bytes arrived or the stream ends; `MSG_DONTWAIT` completes at
    /// once with `-EAGAIN` when nothing is there (a poll, for busy-polling).
    pub(crate) fn recv(
        &mut self,
        fd: RawFd,
        mut buf: Buf,
        start: usize,
        len: usize,
        flags: i32,
        tag: u64,
    ) -> io::Result<()> {
        if start.checked_add(len).is_none_or(|e| e > buf.len()) || len > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "recv range outside its buffer",
            ));
        }
        self.room()?;
        // `start <= buf.len()` was checked, so the pointer stays inside the buffer.
        let ptr = buf.ptr().wrapping_add(start);
        let idx = self.alloc(Slot::Recv { tag, buf });
        let e = opcode::Recv::new(types::Fd(fd), ptr, len as u32)
            .flags(flags)
            .build()
            .user_data(u64::from(idx));
        self.push(e);
        Ok(())
    }

    /// Gather-send `gather`, skipping its first `skip` bytes (already sent). At most
    /// [`MAX_IOV`] segments go out in one call; the result says how many bytes left.
    ///
    /// With `zero_copy`, the kernel sends from the buffers themselves
    /// (`IORING_OP_SENDMSG_ZC`) and keeps them until a notification; the completion
    /// comes in two parts (see [`Cqe::zc_more`]).
    pub(crate) fn sendmsg(
        &mut self,
        fd: RawFd,
        mut gather: Gather,
        skip: usize,
        zero_copy: bool,
        tag: u64,
    ) -> io::Result<()> {
        let mut iov = Vec::with_capacity(gather.segs.len().min(MAX_IOV));
        let mut skip = skip;
        for s in &gather.segs {
            let Some(b) = gather.bufs.get_mut(s.buf as usize) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "send segment names a missing buffer",
                ));
            };
            if s.start.checked_add(s.len).is_none_or(|e| e > b.len()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "send segment outside its buffer",
                ));
            }
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            if iov.len() == MAX_IOV {
                break;
            }
            // In bounds: start + skip < start + len <= buf.len().
            iov.push(libc::iovec {
                iov_base: b.ptr().wrapping_add(s.start + skip).cast(),
                iov_len: s.len - skip,
            });
            skip = 0;
        }
        if iov.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nothing left to send",
            ));
        }
        self.room()?;
        if let [one] = iov[..]
            && one.iov_len <= u32::MAX as usize
            && !zero_copy
        {
            // A single contiguous range: plain send, no msghdr for the kernel to copy.
            let idx = self.alloc(Slot::Send {
                tag,
                gather,
                _iov: Box::new([]),
                _msg: None,
                zc: Zc::Waiting,
            });
            let e = opcode::Send::new(types::Fd(fd), one.iov_base.cast(), one.iov_len as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(u64::from(idx));
            self.push(e);
            return Ok(());
        }
        let iov = iov.into_boxed_slice();
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        let msg_ptr: *const libc::msghdr = &*msg;
        let idx = self.alloc(Slot::Send {
            tag,
            gather,
            _iov: iov,
            _msg: Some(msg),
            zc: Zc::Waiting,
        });
        let e = if zero_copy {
            // MSG_WAITALL: io_uring retries short sends itself, so a zero-copy send
            // completes once, whole (or with an error), and is never resumed by hand
            // while the kernel still holds the buffers.
            opcode::SendMsgZc::new(types::Fd(fd), msg_ptr)
                .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
                .ioprio(SEND_ZC_REPORT_USAGE)
                .build()
        } else {
            opcode::SendMsg::new(types::Fd(fd), msg_ptr)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        self.push(e.user_data(u64::from(idx)));
        Ok(())
    }

    /// Receive one datagram into `buf` (all of it), with its source address.
    pub(crate) fn recvmsg_from(&mut self, fd: RawFd, mut buf: Vec<u8>, tag: u64) -> io::Result<()> {
        self.room()?;
        let mut addr = Box::new(super::net::RawAddr::empty());
        let mut iov = Box::new(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_name = addr.as_mut_ptr().cast();
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut *iov;
        msg.msg_iovlen = 1;
        let msg_ptr: *mut libc::msghdr = &mut *msg;
        let idx = self.alloc(Slot::RecvFrom {
            tag,
            buf,
            _iov: iov,
            msg,
            addr,
        });
        let e = opcode::RecvMsg::new(types::Fd(fd), msg_ptr)
            .build()
            .user_data(u64::from(idx));
        self.push(e);
        Ok(())
    }

    /// Send `buf` as one datagram to `to`.
    pub(crate) fn sendmsg_to(
        &mut self,
        fd: RawFd,
        to: &std::net::SocketAddr,
        buf: Vec<u8>,
        tag: u64,
    ) -> io::Result<()> {
        self.room()?;
        let mut addr = Box::new(super::net::RawAddr::from_socket_addr(to));
        let mut iov = Box::new(libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        });
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_name = addr.as_mut_ptr().cast();
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut *iov;
        msg.msg_iovlen = 1;
        let msg_ptr: *const libc::msghdr = &*msg;
        let idx = self.alloc(Slot::SendTo {
            tag,
            buf,
            _iov: iov,
            _msg: msg,
            _addr: addr,
        });
        let e = opcode::SendMsg::new(types::Fd(fd), msg_ptr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(u64::from(idx));
        self.push(e);
        Ok(())
    }

    /// Accept one connection on a listening socket.
    pub(crate) fn accept(&mut self, fd: RawFd, tag: u64) -> io::Result<()> {
        self.room()?;
        let idx = self.alloc(Slot::Accept { tag });
        let e = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(u64::from(idx));
        self.push(e);
        Ok(())
    }

    /// Read the 8-byte counter of an eventfd (used to wake a sleeping progress thread).
    pub(crate) fn read_counter(&mut self, fd: RawFd, tag: u64) -> io::Result<()> {
        self.room()?;
        let mut val = Box::new(0u64);
        let ptr: *mut u64 = &mut *val;
        let idx = self.alloc(Slot::Counter { tag, _val: val });
        let e = opcode::Read::new(types::Fd(fd), ptr.cast(), 8)
            .build()
            .user_data(u64::from(idx));
        self.push(e);
        Ok(())
    }

    /// Submit queued entries and run deferred task work, without waiting. Enters the
    /// kernel only when there is something to do, so an idle busy-poll loop makes no
    /// system calls.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        let need = {
            let mut sq = self.ring.submission();
            sq.sync();
            !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
        };
        if need {
            match self.ring.submitter().submit_and_wait(0) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Submit, then sleep until at least one completion arrives or `timeout` passes.
    pub(crate) fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Move every available completion into `out`, with its buffers.
    pub(crate) fn reap(&mut self, out: &mut Vec<Cqe>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for c in &mut cq {
            let idx = c.user_data() as usize;
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            let flags = c.flags();
            let is_notif = io_uring::cqueue::notif(flags);
            let more = io_uring::cqueue::more(flags) && !is_notif;
            let mut zc_copied = None;
            let mut zc_notif = false;
            let mut saved = 0;
            if let Slot::Send { tag, zc, .. } = slot {
                match (*zc, is_notif, more) {
                    (Zc::Waiting, false, true) => {
                        // The result, with the notification still to come: report it; the
                        // buffers stay with the kernel and in the slot.
                        *zc = Zc::ResultSeen(c.result());
                        out.push(Cqe {
                            tag: *tag,
                            res: c.result(),
                            held: Held::None,
                            zc_more: true,
                            zc_notif: false,
                            zc_copied: None,
                        });
                        continue;
                    }
                    (Zc::Waiting, true, _) => {
                        // The notification came first: wait for the result.
                        *zc = Zc::NotifSeen(c.result() & ZC_COPIED != 0);
                        continue;
                    }
                    (Zc::ResultSeen(res), true, _) => {
                        zc_notif = true;
                        zc_copied = Some(c.result() & ZC_COPIED != 0);
                        saved = res;
                    }
                    (Zc::NotifSeen(copied), false, _) => zc_copied = Some(copied),
                    _ => {}
                }
            }
            let res = if zc_notif { saved } else { c.result() };
            let slot = std::mem::replace(slot, Slot::Free);
            let (tag, held) = match slot {
                Slot::Free => continue,
                Slot::Recv { tag, buf } => (tag, Held::Buf(buf)),
                Slot::Send { tag, gather, .. } => (tag, Held::Gather(gather)),
                Slot::Accept { tag } => (tag, Held::None),
                Slot::RecvFrom {
                    tag,
                    buf,
                    msg,
                    mut addr,
                    ..
                } => {
                    addr.set_len(msg.msg_namelen);
                    (
                        tag,
                        Held::Datagram {
                            buf,
                            from: addr.socket_addr(),
                        },
                    )
                }
                Slot::SendTo { tag, buf, .. } => (tag, Held::Buf(Buf::Heap(buf))),
                Slot::Counter { tag, .. } => (tag, Held::Counter),
            };
            self.free.push(idx as u32);
            self.inflight -= 1;
            out.push(Cqe {
                tag,
                res,
                held,
                zc_more: false,
                zc_notif,
                zc_copied,
            });
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Buffers of operations still in flight must not be freed while the kernel may
        // use them. Closing the ring cancels and waits for its requests, but only once
        // the ring's file is released; so leak what is still referenced rather than risk
        // a use-after-free. Callers drain the ring before dropping it, so this is rare.
        if self.inflight > 0 {
            let slots = std::mem::take(&mut self.slots);
            std::mem::forget(slots);
        }
    }
}
