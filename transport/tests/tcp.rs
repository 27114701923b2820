//! The conformance suite over the `tcp` backend, in every progress mode, plus checks
//! that only make sense on a byte stream.

mod conformance;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use conformance::{Fixture, Mode};
use pfs_transport::Address;

/// Connect a raw TCP socket, send `bytes`, and collect what comes back until the
/// server closes the connection.
fn raw_garbage(addr: &Address, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr.socket_addr()).expect("raw connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    Some(reply)
}

/// 1 GiB moves in release builds (the test command); debug builds move less.
fn large() -> usize {
    if cfg!(debug_assertions) {
        64 << 20
    } else {
        1 << 30
    }
}

fn tcp(mode: Mode) -> Fixture {
    Fixture {
        name: "tcp",
        listen: "tcp://127.0.0.1:0",
        mode,
        large: large(),
        raw_garbage,
        tweak: |c| c,
        enter: conformance::stay,
        dial: conformance::same_address,
        serial: false,
    }
}

/// Zero-copy sends for every payload of 4 KiB and more, on both sides.
fn tcp_zero_copy(mode: Mode) -> Fixture {
    Fixture {
        tweak: |c| c.zero_copy_send(4096),
        ..tcp(mode)
    }
}

/// Both sides hold the cluster secret: every connection authenticates first.
fn tcp_authenticated(mode: Mode) -> Fixture {
    Fixture {
        tweak: |c| {
            c.secret(pfs_transport::Secret::from_bytes(b"conformance-suite-secret").unwrap())
        },
        ..tcp(mode)
    }
}

conformance_suite!(thread_block, super::tcp(super::Mode::ThreadBlock));
conformance_suite!(
    authenticated_caller,
    super::tcp_authenticated(super::Mode::CallerBusy)
);
conformance_suite!(caller_busy, super::tcp(super::Mode::CallerBusy));
conformance_suite!(thread_busy, super::tcp(super::Mode::ThreadBusy));
conformance_suite!(
    zero_copy_thread,
    super::tcp_zero_copy(super::Mode::ThreadBlock)
);
conformance_suite!(
    zero_copy_caller,
    super::tcp_zero_copy(super::Mode::CallerBusy)
);
