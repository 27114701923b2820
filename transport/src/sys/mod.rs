//! Kernel ABIs. Every `unsafe` block of the crate lives under this module.

#[cfg(feature = "xdp")]
pub(crate) mod ifc;
pub(crate) mod mem;
pub(crate) mod net;
pub(crate) mod uring;
#[cfg(feature = "rdma")]
pub(crate) mod verbs;
#[cfg(feature = "xdp")]
pub(crate) mod xsk;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// An eventfd used to wake a progress thread sleeping in `io_uring_enter`.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Reset the counter after a wake-up (poll-based waiting).
    #[cfg(any(feature = "xdp", feature = "rdma"))]
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own non-blocking
        // descriptor; EAGAIN (nothing pending) is fine to ignore.
        let _ = unsafe { libc::read(self.raw(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Add 1 to the counter, waking a reader.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own descriptor. A full counter
        // (EAGAIN) already means a wake-up is pending, so the result can be ignored.
        let _ = unsafe { libc::write(self.raw(), (&one as *const u64).cast(), 8) };
    }
}

/// Pin the calling thread to one CPU (benchmarks pin their busy-polling threads).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} out of range"),
        ));
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET is given an index checked above;
    // sched_setaffinity reads the set we pass and its size.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Number of CPUs online (whatever the calling thread's own affinity).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TCP keepalive probing plus `TCP_USER_TIMEOUT`, so a dead peer surfaces as an error
/// within about `dead_after` even when no data is moving.
pub(crate) fn tcp_dead_peer_detection(fd: RawFd, dead_after: Duration) -> io::Result<()> {
    let secs = dead_after.as_secs().clamp(1, 3600) as libc::c_int;
    let idle = (secs / 3).max(1);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, idle)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    let ms = dead_after.as_millis().clamp(1000, i32::MAX as u128) as libc::c_int;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

/// Socket buffer sizes (best effort: the kernel clamps them to its limits).
pub(crate) fn set_socket_buffers(fd: RawFd, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v);
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v);
}

/// Shut a socket down in both directions, so that operations in flight on it complete.
pub(crate) fn shutdown(fd: RawFd) {
    // SAFETY: shutdown on a descriptor we own; errors (already closed) are harmless.
    let _ = unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Peak resident set size of this process, in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Take ownership of a descriptor the kernel just returned (from `accept`).
///
/// `fd` must be a fresh, open descriptor that nothing else owns; the io_uring accept
/// path is the only caller, and it passes the completion's result straight through.
pub(crate) fn adopt_accepted(fd: i32) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is the result of a successful accept completion: a new descriptor
    // that no other object owns, so wrapping it transfers sole ownership.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `recv(MSG_DONTWAIT)` into `buf`: `Ok(0)` is end of stream, `WouldBlock` means nothing
/// is there yet.
pub(crate) fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow
    // mutably for the duration of the call.
    let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `send(MSG_DONTWAIT | MSG_NOSIGNAL)` of `buf`; may send less than all of it.
pub(crate) fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`, borrowed for the
    // duration of the call.
    let r = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Which of `fds` are ready, without waiting (`poll(2)` with a zero timeout); the
/// result is in each entry's `revents`.
pub(crate) fn poll_now(fds: &mut [libc::pollfd]) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd entries.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Wait up to `timeout` for one of `fds` to be ready (`poll(2)`).
#[cfg(any(feature = "xdp", feature = "rdma"))]
pub(crate) fn poll_wait(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd entries.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        Err(e)
    } else {
        Ok(r as usize)
    }
}

/// Whether the process runs as root (privileged tests probe this and skip loudly).
/// `N` bytes from the operating system's CSPRNG (tokens, nonces, ids).
pub(crate) fn random_bytes<const N: usize>() -> crate::Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| crate::Error::Io {
        call: "getrandom",
        source: io::Error::other(e.to_string()),
    })?;
    Ok(b)
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: served from the vDSO whatever the
/// clocksource (jiffy resolution).
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; the clock id is valid.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The time for operation deadlines: an `Instant` within a few milliseconds of the
/// truth, without a system call. Where the clocksource has no vDSO path (a VM's HPET)
/// `Instant::now()` is a system call and a device read, tens of microseconds under
/// emulation, and operations are submitted at rates where that shows. A thread reads
/// the precise clock once a second and advances it by the coarse clock in between.
pub(crate) fn deadline_now() -> std::time::Instant {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local! {
        static BASE: Cell<Option<(u64, Instant)>> = const { Cell::new(None) };
    }
    let c = coarse_ns();
    BASE.with(|b| match b.get() {
        Some((c0, i0)) if c >= c0 && c - c0 < 1_000_000_000 => i0 + Duration::from_nanos(c - c0),
        _ => {
            let i = Instant::now();
            b.set(Some((c, i)));
            i
        }
    })
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether io_uring can be used here, and the ring features this kernel offers (for
/// `pfs-bench info`). The error names the cause and the fix.
pub fn io_uring_support() -> Result<Vec<&'static str>, String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        && v.trim() != "0"
    {
        let why = if v.trim() == "2" {
            "disabled for everyone"
        } else {
            "disabled for processes outside the io_uring group"
        };
        if v.trim() == "2" || !is_root() {
            return Err(format!(
                "io_uring is {why} (sysctl kernel.io_uring_disabled={}): set it to 0",
                v.trim()
            ));
        }
    }
    let ring = io_uring::IoUring::new(8).map_err(|e| {
        format!("io_uring_setup failed: {e} (a seccomp profile or container may block it)")
    })?;
    let p = ring.params();
    let mut f = Vec::new();
    for (on, name) in [
        (p.is_feature_nodrop(), "NODROP"),
        (p.is_feature_submit_stable(), "SUBMIT_STABLE"),
        (p.is_feature_fast_poll(), "FAST_POLL"),
        (p.is_feature_ext_arg(), "EXT_ARG"),
        (p.is_feature_native_workers(), "NATIVE_WORKERS"),
        (p.is_feature_recvsend_bundle(), "RECVSEND_BUNDLE"),
        (p.is_feature_min_timeout(), "MIN_TIMEOUT"),
    ] {
        if on {
            f.push(name);
        }
    }
    Ok(f)
}
