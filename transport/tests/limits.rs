//! Per-peer limits, over tcp and udp: a peer cannot open more than
//! `max_connections_per_peer` connections, and cannot make the target hold more than
//! `max_incoming_bytes` of unread messages per connection: it is held back by flow
//! control, and nothing it sent is lost or reordered.

use std::time::{Duration, Instant};

use pfs_transport::{Endpoint, EndpointConfig, Error};

const SCHEMES: [&str; 2] = ["tcp", "udp"];

fn server(scheme: &str, tweak: impl FnOnce(&mut EndpointConfig)) -> Endpoint {
    let mut cfg = EndpointConfig::new()
        .listen(&format!("{scheme}://127.0.0.1:0"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    tweak(&mut cfg);
    Endpoint::bind(cfg).unwrap()
}

fn client() -> Endpoint {
    Endpoint::bind(EndpointConfig::new().connect_timeout(Duration::from_secs(2))).unwrap()
}

#[test]
fn connections_beyond_the_per_peer_limit_are_refused_and_counted() {
    for scheme in SCHEMES {
        let srv = server(scheme, |c| c.max_connections_per_peer = 4);
        let addr = &srv.local_addrs()[0];
        let cli = client();
        let (mut conns, mut accepted) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            conns.push(cli.connect_addr(addr).unwrap());
            accepted.push(srv.accept_timeout(Duration::from_secs(2)).unwrap().unwrap());
        }
        // Every connection of this address is in use: the next is refused.
        let started = Instant::now();
        match cli.connect_addr(addr) {
            Err(e) => assert!(
                !matches!(e, Error::AuthFailed(_)),
                "{scheme}: refused for the limit, not authentication: {e}"
            ),
            Ok(c) => {
                // tcp: the kernel completed the handshake before the target refused;
                // the first operation finds the connection closed.
                assert_eq!(scheme, "tcp", "{scheme}: the fifth connection was accepted");
                assert!(c.send(b"x").and_then(|op| op.wait()).is_err());
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{scheme}: refused promptly"
        );
        assert!(
            srv.stats().peer_connections_refused >= 1,
            "{scheme}: {:?}",
            srv.stats()
        );
        assert!(
            srv.accept_timeout(Duration::from_millis(200))
                .unwrap()
                .is_none(),
            "{scheme}: the application never sees it"
        );
        // The four that were admitted still work.
        for (c, a) in conns.iter().zip(&accepted) {
            c.send(b"still here").unwrap().wait().unwrap();
            let m = a.recv_timeout(Duration::from_secs(2)).unwrap();
            assert_eq!(m.as_deref(), Some(&b"still here"[..]), "{scheme}");
        }
    }
}

#[test]
fn unread_messages_hold_the_sender_back_without_losing_any() {
    const MSG: usize = 256 << 10;
    const N: usize = 24;
    for scheme in SCHEMES {
        let srv = server(scheme, |c| c.max_incoming_bytes = 1 << 20);
        let cli = client();
        let conn = cli.connect_addr(&srv.local_addrs()[0]).unwrap();
        let accepted = srv.accept_timeout(Duration::from_secs(2)).unwrap().unwrap();
        let msg = |i: usize| -> Vec<u8> { (0..MSG).map(|k| (k * 13 + i * 7) as u8).collect() };
        let ops: Vec<_> = (0..N).map(|i| conn.send(&msg(i)).unwrap()).collect();
        // The target's application reads nothing for a while: the sends that complete
        // (each is acknowledged once its message is queued at the target) stop at the
        // byte limit.
        std::thread::sleep(Duration::from_millis(500));
        let done = ops.iter().filter(|o| o.is_done()).count();
        assert!(
            done <= (1 << 20) / MSG + 2,
            "{scheme}: {done} messages of 256 KiB queued past a 1 MiB limit"
        );
        assert!(
            srv.stats().receive_stalls >= 1,
            "{scheme}: {:?}",
            srv.stats()
        );
        // Now it reads: every message arrives exactly once, intact, and in the order it
        // was sent, on udp too, although the pause made the sender resend (see
        // "Messages" in docs/datagram.md).
        let mut seen = [false; N];
        for i in 0..N {
            let m = accepted
                .recv_timeout(Duration::from_secs(10))
                .unwrap()
                .unwrap_or_else(|| panic!("{scheme}: message {i} never came"));
            let which = (0..N).find(|&j| m == msg(j));
            let Some(j) = which else {
                panic!(
                    "{scheme}: message {i} ({} bytes) is none of those sent",
                    m.len()
                );
            };
            assert!(!seen[j], "{scheme}: message {j} arrived twice");
            seen[j] = true;
            assert_eq!(j, i, "{scheme}: message {j} arrived in place of {i}");
        }
        assert_eq!(srv.stats().messages_discarded, 0, "{scheme}");
        for o in ops {
            o.wait().unwrap();
        }
    }
}
