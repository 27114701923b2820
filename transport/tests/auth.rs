//! Peer authentication with the cluster secret, over tcp and udp: peers with the same
//! secret connect and work; a peer without it, with another one, or one that skips its
//! proof is refused with an error naming why, before it reaches any memory.

mod conformance;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pfs_transport::wire::{self, Body, Header, Target};
use pfs_transport::{Endpoint, EndpointConfig, Error, Rights, Secret};

const SCHEMES: [&str; 2] = ["tcp", "udp"];

fn secret(s: &str) -> Secret {
    Secret::from_bytes(s.as_bytes()).unwrap()
}

fn server(scheme: &str, s: Option<Secret>) -> Endpoint {
    let mut cfg = EndpointConfig::new()
        .listen(&format!("{scheme}://127.0.0.1:0"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    if let Some(s) = s {
        cfg = cfg.secret(s);
    }
    Endpoint::bind(cfg).unwrap()
}

fn client(s: Option<Secret>) -> Endpoint {
    let mut cfg = EndpointConfig::new().connect_timeout(Duration::from_secs(5));
    if let Some(s) = s {
        cfg = cfg.secret(s);
    }
    Endpoint::bind(cfg).unwrap()
}

#[test]
fn peers_with_the_same_secret_connect_and_work() {
    for scheme in SCHEMES {
        let k = "the-cluster-secret-of-this-test";
        let srv = server(scheme, Some(secret(k)));
        let region = srv.alloc_region(4096, Rights::ALL).unwrap();
        let key = region.key(Rights::ALL).unwrap();
        let cli = client(Some(secret(k)));
        let conn = cli.connect_addr(&srv.local_addrs()[0]).unwrap();
        let accepted = srv
            .accept_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("the server accepts the authenticated peer");
        let local = cli.alloc_region(4096, Rights::ALL).unwrap();
        local.fill(0, 4096, 0x42).unwrap();
        conn.write(&local, 0, &key, 0, 4096)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(
            region.to_vec(0, 4096).unwrap(),
            vec![0x42; 4096],
            "{scheme}"
        );
        conn.send(b"hello").unwrap().wait().unwrap();
        let m = accepted.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(m.as_deref(), Some(&b"hello"[..]), "{scheme}");
        assert_eq!(srv.stats().auth_failures, 0, "{scheme}");
    }
}

/// Connect and expect an authentication failure whose message contains `hint`. A server
/// with a secret hands nothing to its application; when it is the side that refuses (the
/// client has no secret), it counts the failure. (With different secrets the client
/// refuses first, on the server's proof, and never sends its own.)
fn refused(scheme: &str, srv_secret: Option<&str>, cli_secret: Option<&str>, hint: &str) {
    let srv = server(scheme, srv_secret.map(secret));
    let cli = client(cli_secret.map(secret));
    let r = cli.connect_addr(&srv.local_addrs()[0]);
    match r {
        Err(Error::AuthFailed(why)) => assert!(why.contains(hint), "{scheme}: {why}"),
        Err(e) => panic!("{scheme}: expected an authentication failure, got {e}"),
        Ok(_) => panic!("{scheme}: connected without authenticating"),
    }
    if srv_secret.is_some() {
        assert!(
            srv.accept_timeout(Duration::from_millis(300))
                .unwrap()
                .is_none(),
            "{scheme}: the application never sees the refused peer"
        );
    }
    assert!(cli.stats().auth_failures >= 1, "{scheme}");
    if srv_secret.is_some() && cli_secret.is_none() {
        assert!(srv.stats().auth_failures >= 1, "{scheme}");
    }
}

#[test]
fn a_peer_without_the_secret_is_refused() {
    for scheme in SCHEMES {
        refused(
            scheme,
            Some("the-cluster-secret-of-this-test"),
            None,
            "accepts only peers holding the cluster secret",
        );
    }
}

#[test]
fn a_server_without_a_secret_is_refused_by_a_client_with_one() {
    for scheme in SCHEMES {
        refused(
            scheme,
            None,
            Some("the-cluster-secret-of-this-test"),
            "does not authenticate",
        );
    }
}

#[test]
fn different_secrets_are_refused() {
    for scheme in SCHEMES {
        refused(
            scheme,
            Some("the-cluster-secret-of-this-test"),
            Some("another-secret-altogether-here"),
            "different secrets",
        );
    }
}

/// A raw peer that opens an authenticating HELLO, reads the target's proof, and then
/// sends `next` instead of a valid AUTH: it is refused with an ERROR, and the region it
/// aimed at is untouched.
fn raw_skips_its_proof(next: impl Fn(&Target) -> Vec<u8>) {
    let srv = server("tcp", Some(secret("the-cluster-secret-of-this-test")));
    let region = srv.alloc_region(4096, Rights::ALL).unwrap();
    let key = region.key(Rights::ALL).unwrap();
    let target = conformance::target_of(&key, 0);
    let addr = srv.local_addrs()[0].socket_addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = conformance::encode(&Header {
        op_id: 0,
        payload_len: 32,
        body: Body::Hello {
            min_version: 1,
            max_version: 1,
            endpoint: 77,
            max_payload: 1 << 20,
            features: wire::FEATURE_AUTH,
        },
    });
    hello.extend_from_slice(&[9u8; 32]);
    s.write_all(&hello).unwrap();
    let (h, p) = conformance::read_message(&mut s);
    assert!(
        matches!(h.body, Body::HelloAck { features, .. } if features & wire::FEATURE_AUTH != 0)
    );
    assert_eq!(p.len(), 64, "the target's nonce and proof");
    s.write_all(&next(&target)).unwrap();
    let (h, p) = conformance::read_message(&mut s);
    assert_eq!(
        h.body,
        Body::Error {
            code: wire::ErrorCode::AuthFailed
        },
        "{}",
        String::from_utf8_lossy(&p)
    );
    // The connection is closed after the error.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(region.to_vec(0, 4096).unwrap(), vec![0u8; 4096]);
    assert!(srv.stats().auth_failures >= 1);
    assert!(
        srv.accept_timeout(Duration::from_millis(100))
            .unwrap()
            .is_none()
    );
}

#[test]
fn a_write_in_place_of_the_proof_is_refused_and_touches_nothing() {
    raw_skips_its_proof(|t| {
        let mut m = conformance::encode(&Header {
            op_id: 1,
            payload_len: 16,
            body: Body::Write {
                target: *t,
                op_len: 16,
                op_off: 0,
                notify: None,
            },
        });
        m.extend_from_slice(&[0xee; 16]);
        m
    });
}

#[test]
fn a_wrong_proof_is_refused() {
    raw_skips_its_proof(|_| {
        let mut m = conformance::encode(&Header {
            op_id: 0,
            payload_len: 32,
            body: Body::Auth,
        });
        m.extend_from_slice(&[0u8; 32]);
        m
    });
}

/// A udp endpoint with the secret and per-datagram integrity set as given.
fn udp_endpoint(listen: bool, s: Option<&str>, integrity: bool) -> Endpoint {
    let mut cfg = EndpointConfig::new().connect_timeout(Duration::from_secs(5));
    if listen {
        cfg = cfg.listen("udp://127.0.0.1:0").unwrap();
    }
    if let Some(s) = s {
        cfg = cfg.secret(secret(s));
    }
    Endpoint::bind(cfg.datagram_integrity(integrity)).unwrap()
}

/// Write and read back through `conn`, then exchange a message.
fn works(srv: &Endpoint, cli: &Endpoint) {
    let region = srv.alloc_region(64 << 10, Rights::ALL).unwrap();
    let key = region.key(Rights::ALL).unwrap();
    let conn = cli.connect_addr(&srv.local_addrs()[0]).unwrap();
    let accepted = srv.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
    let local = cli.alloc_region(64 << 10, Rights::ALL).unwrap();
    let data: Vec<u8> = (0..64 << 10).map(|i: u32| (i * 7 + 3) as u8).collect();
    local.write_at(0, &data).unwrap();
    conn.write(&local, 0, &key, 0, 64 << 10)
        .unwrap()
        .wait()
        .unwrap();
    let back = cli.alloc_region(64 << 10, Rights::ALL).unwrap();
    conn.read(&back, 0, &key, 0, 64 << 10)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(back.to_vec(0, 64 << 10).unwrap(), data);
    conn.send(b"tagged").unwrap().wait().unwrap();
    let m = accepted.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(m.as_deref(), Some(&b"tagged"[..]));
}

#[test]
fn datagram_integrity_works_when_both_ends_hold_the_secret() {
    let k = "the-cluster-secret-of-this-test";
    // Both ask for it, or only the initiator does (a target with the secret grants it).
    for srv_integrity in [true, false] {
        let srv = udp_endpoint(true, Some(k), srv_integrity);
        let cli = udp_endpoint(false, Some(k), true);
        works(&srv, &cli);
        let (s, c) = (srv.stats(), cli.stats());
        assert_eq!(s.integrity_failures + c.integrity_failures, 0);
        assert_eq!(s.auth_failures + c.auth_failures, 0);
    }
}

fn integrity_refused(srv: Endpoint, cli: Endpoint, hint: &str) {
    match cli.connect_addr(&srv.local_addrs()[0]) {
        Err(Error::AuthFailed(why)) => assert!(why.contains(hint), "{why}"),
        Err(e) => panic!("expected an authentication failure, got {e}"),
        Ok(_) => panic!("connected although integrity could not be agreed"),
    }
    assert!(cli.stats().auth_failures >= 1);
    assert!(
        srv.accept_timeout(Duration::from_millis(200))
            .unwrap()
            .is_none()
    );
}

#[test]
fn datagram_integrity_that_cannot_be_agreed_is_refused_with_the_reason() {
    let k = "the-cluster-secret-of-this-test";
    // The target requires integrity; the initiator (with the secret) does not ask.
    let srv = udp_endpoint(true, Some(k), true);
    let cli = udp_endpoint(false, Some(k), false);
    integrity_refused(srv, cli, "requires per-datagram integrity");
    // The initiator asks; the target has no secret to derive keys from.
    integrity_refused(
        udp_endpoint(true, None, false),
        udp_endpoint(false, Some(k), true),
        "has no cluster secret",
    );
    // Different secrets: the target's INIT_ACK does not verify.
    integrity_refused(
        udp_endpoint(true, Some("another-secret-altogether-here"), true),
        udp_endpoint(false, Some(k), true),
        "different secrets",
    );
}

#[test]
fn datagram_integrity_without_a_secret_is_a_configuration_error() {
    match Endpoint::bind(EndpointConfig::new().datagram_integrity(true)) {
        Err(Error::InvalidArgument(why)) => {
            assert!(why.contains("needs a cluster secret"), "{why}")
        }
        Err(e) => panic!("expected InvalidArgument, got {e}"),
        Ok(_) => panic!("integrity without a secret was accepted"),
    }
}
