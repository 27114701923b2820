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

/// A caller-driven endpoint may be driven from threads that come and go: the kernel
/// cancels a thread's pending accept and receives when it exits, and the endpoint arms
/// them again from the next thread that drives it.
#[test]
fn a_caller_driven_endpoint_survives_the_threads_that_drove_it() {
    use pfs_transport::{Endpoint, EndpointConfig, Progress, Rights, WaitMode};
    use std::sync::Arc;
    use std::time::Duration;
    let srv = Arc::new(
        Endpoint::bind(
            EndpointConfig::new()
                .listen("tcp://127.0.0.1:0")
                .unwrap()
                .progress(Progress::Caller)
                .wait_mode(WaitMode::Block),
        )
        .unwrap(),
    );
    let addr = srv.local_addrs()[0].clone();
    let region = srv.alloc_region(4096, Rights::ALL).unwrap();
    let key = region.key(Rights::ALL).unwrap();
    let cli = Endpoint::bind(EndpointConfig::new()).unwrap();
    // Each round: a fresh thread drives the server (accepting and serving), then exits
    // with the server's accept and receives armed.
    let (mut conns, mut accepted) = (Vec::new(), Vec::new());
    for round in 0..3u8 {
        let driver = {
            let srv = srv.clone();
            std::thread::spawn(move || {
                let c = srv
                    .accept_timeout(Duration::from_secs(5))
                    .unwrap()
                    .expect("a connection in this round");
                let deadline = std::time::Instant::now() + Duration::from_millis(500);
                while std::time::Instant::now() < deadline {
                    srv.progress();
                    std::thread::sleep(Duration::from_millis(1));
                }
                c
            })
        };
        conns.push(cli.connect_addr(&addr).unwrap());
        let local = cli.alloc_region(4096, Rights::ALL).unwrap();
        local.fill(0, 4096, round + 1).unwrap();
        // Every connection so far, including those accepted by threads now gone.
        let ops: Vec<_> = conns
            .iter()
            .map(|c| c.write(&local, 0, &key, 0, 4096).unwrap())
            .collect();
        accepted.push(driver.join().unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let serving = std::thread::spawn({
            let (srv, stop) = (srv.clone(), stop.clone());
            move || {
                for _ in 0..10_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    srv.progress();
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        let results: Vec<_> = ops.into_iter().map(|op| op.wait()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        serving.join().unwrap();
        for r in results {
            r.unwrap();
        }
        assert_eq!(region.to_vec(0, 4096).unwrap(), vec![round + 1; 4096]);
    }
}

/// A peer that stops in the middle of the handshake is a lost connection, whether it
/// closes before or after reading the HELLO: not a protocol error, which would say it
/// sent something invalid.
#[test]
fn a_peer_that_stops_during_the_handshake_is_a_lost_connection() {
    use pfs_transport::{Endpoint, EndpointConfig, Error};
    use std::io::Read;
    for read_first in [0usize, 64, 4096] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; read_first];
            let _ = s.read(&mut buf);
        });
        let ep = Endpoint::bind(EndpointConfig::new()).unwrap();
        match ep.connect(&format!("tcp://{addr}")) {
            Err(Error::ConnectionLost { reason }) => {
                assert!(reason.contains("during the handshake"), "{reason}")
            }
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("read {read_first}: expected a lost connection, got {other:?}"),
        }
        peer.join().unwrap();
    }
}

/// `Op::wait_timeout` gives up waiting, not the operation: it returns `None` while the
/// target is not serving, and the same handle completes once it does.
#[test]
fn wait_timeout_returns_without_abandoning_the_operation() {
    use pfs_transport::{Endpoint, EndpointConfig, Progress, Rights};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    // A caller-driven server that nobody drives yet.
    let srv = Arc::new(
        Endpoint::bind(
            EndpointConfig::new()
                .listen("tcp://127.0.0.1:0")
                .unwrap()
                .progress(Progress::Caller),
        )
        .unwrap(),
    );
    let region = srv.alloc_region(4096, Rights::ALL).unwrap();
    let key = region.key(Rights::ALL).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let serve = |srv: Arc<Endpoint>, stop: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                srv.progress();
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    // Serve while the client connects, then stop serving.
    let serving = serve(srv.clone(), stop.clone());
    let cli = Endpoint::bind(EndpointConfig::new()).unwrap();
    let conn = cli.connect_addr(&srv.local_addrs()[0]).unwrap();
    let accepted = srv.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
    stop.store(true, Ordering::Relaxed);
    serving.join().unwrap();
    let local = cli.alloc_region(4096, Rights::ALL).unwrap();
    local.fill(0, 4096, 0x5a).unwrap();
    let mut op = conn.write(&local, 0, &key, 0, 4096).unwrap();
    let started = Instant::now();
    assert!(op.wait_timeout(Duration::from_millis(100)).is_none());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // The target serves again: the same handle completes.
    stop.store(false, Ordering::Relaxed);
    let serving = serve(srv.clone(), stop.clone());
    match op.wait_timeout(Duration::from_secs(10)) {
        Some(r) => r.unwrap(),
        None => panic!("the write did not complete once the target served"),
    }
    assert!(
        op.wait_timeout(Duration::from_millis(1)).is_none(),
        "the result is taken"
    );
    assert_eq!(region.to_vec(0, 4096).unwrap(), vec![0x5a; 4096]);
    stop.store(true, Ordering::Relaxed);
    serving.join().unwrap();
    drop(accepted);
}
