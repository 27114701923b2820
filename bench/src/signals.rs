//! pfs-bench's own signal handling (the library installs none): SIGINT and SIGTERM end
//! the process at once with a line saying so. Everything it set up goes with it: the
//! kernel closes the BPF links (detaching XDP programs) and the sockets, and the servers
//! that `compare` started die with their parent.

/// Exit status after SIGINT/SIGTERM: 128 + the signal, as shells report it.
extern "C" fn on_signal(sig: libc::c_int) {
    let msg: &[u8] = if sig == libc::SIGINT {
        b"\npfs-bench: interrupted (SIGINT); stopping\n"
    } else {
        b"\npfs-bench: terminated (SIGTERM); stopping\n"
    };
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is a static buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(128 + sig);
    }
}

/// Install the handlers for SIGINT and SIGTERM.
pub(crate) fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is given a zero-initialised struct with a valid handler of
        // the right signature; no other code of this process installs handlers.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Receive SIGTERM when the parent process ends (however it ends).
pub(crate) fn die_with_parent() {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
    }
}
