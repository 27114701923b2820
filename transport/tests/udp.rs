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

/// A target that lost its state (a crash and restart behind the same address, here a
/// forwarder switched to a fresh endpoint) answers the old connection's datagrams with a
/// RESET naming it: the initiator's operations fail at once with the reason, not after
/// the dead-peer timeout.
#[test]
fn a_target_that_lost_its_state_fails_the_old_connection_at_once() {
    use pfs_transport::{Endpoint, EndpointConfig, Rights};
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let listen = || {
        Endpoint::bind(
            EndpointConfig::new()
                .listen("udp://127.0.0.1:0")
                .unwrap()
                .op_timeout(Duration::from_secs(20)),
        )
        .unwrap()
    };
    let first = listen();
    let target = Arc::new(Mutex::new(first.local_addrs()[0].socket_addr()));
    // The forwarder: the client's peer address, whichever endpoint is behind it.
    let fwd = UdpSocket::bind("127.0.0.1:0").unwrap();
    fwd.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let via = fwd.local_addr().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forwarding = {
        let (target, stop) = (target.clone(), stop.clone());
        let old = first.local_addrs()[0].socket_addr();
        std::thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                let Ok((n, from)) = fwd.recv_from(&mut buf) else {
                    continue;
                };
                let server = *target.lock().unwrap();
                let to = if from == server {
                    client
                } else if from == old {
                    None // the endpoint that "crashed": silent from now on
                } else {
                    client = Some(from);
                    Some(server)
                };
                if let Some(to) = to {
                    let _ = fwd.send_to(&buf[..n], to);
                }
            }
        })
    };
    let region = first.alloc_region(4096, Rights::ALL).unwrap();
    let key = region.key(Rights::ALL).unwrap();
    let cli = Endpoint::bind(EndpointConfig::new().op_timeout(Duration::from_secs(20))).unwrap();
    let conn = cli.connect(&format!("udp://{via}")).unwrap();
    let local = cli.alloc_region(4096, Rights::ALL).unwrap();
    conn.write(&local, 0, &key, 0, 4096)
        .unwrap()
        .wait()
        .unwrap();
    // "Restart": a fresh endpoint behind the same address, knowing nothing.
    let second = listen();
    *target.lock().unwrap() = second.local_addrs()[0].socket_addr();
    let started = Instant::now();
    let r = conn
        .write(&local, 0, &key, 0, 4096)
        .and_then(|op| op.wait());
    let e = r.expect_err("the fresh target does not know the connection");
    assert!(
        e.to_string().contains("does not know this connection"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "failed after {:?}, not at once",
        started.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    forwarding.join().unwrap();
    drop((first, second));
}
