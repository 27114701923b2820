//! The conformance suite over the `rdma` backend: RC queue pairs between two soft-RoCE
//! devices (rxe0 and rxe1 on the two ends of a veth pair), so every operation crosses a
//! link rather than rxe's loopback path. The devices exist inside the VM of
//! `tools/rdma-vm.sh`, which `cargo xtask test` boots for this binary; anywhere else the
//! binary says so in one line and runs nothing.
#![cfg(feature = "rdma")]

mod conformance;

use std::sync::OnceLock;

use conformance::{Fixture, Mode};

/// The server's address: the second rxe device's (`PFS_RXE_ADDRS`, set inside the VM).
fn server_ip() -> Option<&'static str> {
    static IP: OnceLock<Option<String>> = OnceLock::new();
    IP.get_or_init(|| {
        let addrs = std::env::var("PFS_RXE_ADDRS").ok()?;
        addrs.split_whitespace().nth(1).map(str::to_string)
    })
    .as_deref()
}

fn listen() -> &'static str {
    static L: OnceLock<String> = OnceLock::new();
    L.get_or_init(|| match server_ip() {
        Some(ip) => format!("rdma://{ip}:0"),
        None => {
            eprintln!(
                "SKIPPED: rdma tests need RDMA devices (PFS_RXE_ADDRS is not set); \
                 `cargo xtask test` runs them inside the soft-RoCE VM: \
                 tools/rdma-vm.sh run -- <this test binary>"
            );
            // Run nothing: every conformance function needs the devices.
            std::process::exit(0);
        }
    })
}

fn rdma(mode: Mode) -> Fixture {
    Fixture {
        name: "rdma",
        listen: listen(),
        mode,
        // Sized for soft-RoCE under TCG (tens of MiB/s).
        large: 64 << 20,
        raw_garbage: |_, _| None,
        tweak: |c| c,
        enter: conformance::stay,
        dial: conformance::same_address,
        serial: false,
    }
}

fn rdma_authenticated(mode: Mode) -> Fixture {
    Fixture {
        tweak: |c| {
            c.secret(pfs_transport::Secret::from_bytes(b"conformance-suite-secret").unwrap())
        },
        ..rdma(mode)
    }
}

conformance_suite!(thread_block, super::rdma(super::Mode::ThreadBlock));
conformance_suite!(caller_busy, super::rdma(super::Mode::CallerBusy));
conformance_suite!(
    authenticated_busy,
    super::rdma_authenticated(super::Mode::ThreadBusy)
);
