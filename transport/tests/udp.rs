//! The conformance suite over the `udp` backend (reliable datagrams over kernel UDP).

mod conformance;

use conformance::{Fixture, Mode};
use pfs_transport::Address;

/// Send one raw datagram to a listener and collect whatever comes back for a moment.
fn raw_garbage(addr: &Address, bytes: &[u8]) -> Option<Vec<u8>> {
    conformance::udp_garbage("127.0.0.1:0", addr, bytes)
}

fn large() -> usize {
    if cfg!(debug_assertions) {
        32 << 20
    } else {
        1 << 30
    }
}

fn udp(mode: Mode) -> Fixture {
    Fixture {
        name: "udp",
        listen: "udp://127.0.0.1:0",
        mode,
        large: large(),
        raw_garbage,
        tweak: |c| c,
        enter: conformance::stay,
        dial: conformance::same_address,
        serial: false,
    }
}

/// Loopback: 64 KiB datagrams.
fn udp_jumbo(mode: Mode) -> Fixture {
    Fixture {
        tweak: |c| c.mtu(65535),
        ..udp(mode)
    }
}

/// Both sides hold the cluster secret: every connection authenticates first.
fn udp_authenticated(mode: Mode) -> Fixture {
    Fixture {
        tweak: |c| {
            c.secret(pfs_transport::Secret::from_bytes(b"conformance-suite-secret").unwrap())
        },
        ..udp(mode)
    }
}

/// The secret and per-datagram integrity: every datagram after INIT carries a tag.
fn udp_integrity(mode: Mode) -> Fixture {
    Fixture {
        tweak: |c| {
            c.secret(pfs_transport::Secret::from_bytes(b"conformance-suite-secret").unwrap())
                .datagram_integrity(true)
        },
        ..udp(mode)
    }
}

conformance_suite!(thread_block, super::udp(super::Mode::ThreadBlock));
conformance_suite!(
    integrity_thread,
    super::udp_integrity(super::Mode::ThreadBlock)
);
conformance_suite!(
    authenticated_thread,
    super::udp_authenticated(super::Mode::ThreadBlock)
);
conformance_suite!(caller_busy, super::udp(super::Mode::CallerBusy));
conformance_suite!(
    jumbo_thread_block,
    super::udp_jumbo(super::Mode::ThreadBlock)
);
