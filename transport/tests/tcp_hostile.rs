//! Peers that misbehave on a byte stream: answers that stall half way, clients that never
//! read, garbage behind a full send queue, absurd handshake answers. Each test states
//! what the endpoint must do instead of hanging, growing or corrupting memory.

mod conformance;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pfs_transport::wire::{Body, Header};
use pfs_transport::{Endpoint, EndpointConfig, Error, RegionKey, Rights};

fn hello(endpoint: u64) -> Vec<u8> {
    conformance::encode(&Header {
        op_id: 0,
        payload_len: 0,
        body: Body::Hello {
            min_version: 1,
            max_version: 1,
            endpoint,
            max_payload: u32::MAX,
            features: 0,
        },
    })
}

fn hello_ack(endpoint: u64) -> Vec<u8> {
    conformance::encode(&Header {
        op_id: 0,
        payload_len: 0,
        body: Body::HelloAck {
            version: 1,
            endpoint,
            max_payload: u32::MAX,
            features: 0,
        },
    })
}

/// A key naming a fake peer (only owner, region, length and rights matter locally).
fn key_for(owner: u64, region: u64, len: u64) -> RegionKey {
    let mut b = vec![1u8];
    b.extend(owner.to_le_bytes());
    b.extend(region.to_le_bytes());
    b.extend(len.to_le_bytes());
    b.push(Rights::ALL.bits());
    b.extend([0u8; 16]);
    b.extend(0u64.to_le_bytes());
    b.extend(0u16.to_le_bytes());
    RegionKey::from_bytes(&b).unwrap()
}

/// Read one header (and discard its payload) from a raw stream.
fn read_header(s: &mut TcpStream) -> Header {
    conformance::read_message(s).0
}

#[test]
fn a_timed_out_read_never_writes_its_region_afterwards() {
    // The peer starts answering a read, then stalls past the deadline, then sends the
    // rest. Once the read has failed, the application owns its buffer again.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        read_header(&mut s);
        s.write_all(&hello_ack(7)).unwrap();
        let h = read_header(&mut s);
        let Body::Read { len, .. } = h.body else {
            panic!("expected READ")
        };
        s.write_all(&conformance::encode(&Header {
            op_id: h.op_id,
            payload_len: len as u32,
            body: Body::ReadResp {
                op_len: len,
                op_off: 0,
            },
        }))
        .unwrap();
        s.write_all(&[0x55]).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        let _ = s.write_all(&vec![0x55u8; len as usize - 1]);
        std::thread::sleep(Duration::from_millis(300));
    });
    let ep = Endpoint::bind(EndpointConfig::new().op_timeout(Duration::from_millis(300))).unwrap();
    let c = ep.connect(&format!("tcp://{a}")).unwrap();
    let local = ep.alloc_region(65536, Rights::ALL).unwrap();
    let key = key_for(7, 1, 65536);
    let r = c.read(&local, 0, &key, 0, 65536).unwrap().wait();
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    local.fill(0, 65536, 0xAA).unwrap();
    peer.join().unwrap();
    let v = local.to_vec(0, 65536).unwrap();
    assert!(
        v.iter().all(|&b| b == 0xAA),
        "{} bytes landed after the read timed out",
        v.iter().filter(|&&b| b != 0xAA).count()
    );
    assert!(c.is_closed(), "a timeout closes the connection");
}

#[test]
fn a_peer_that_never_reads_is_slowed_down_not_buffered() {
    // PINGs whose PONGs are never read: the endpoint must stop reading this peer (TCP
    // then pushes back) instead of queueing answers without bound.
    let server =
        Endpoint::bind(EndpointConfig::new().listen("tcp://127.0.0.1:0").unwrap()).unwrap();
    let addr = server.local_addrs()[0].socket_addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello(99)).unwrap();
    let _peer = server
        .accept_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    s.set_nonblocking(true).unwrap();
    let ping: Vec<u8> = (0..4096u64)
        .flat_map(|i| {
            conformance::encode(&Header {
                op_id: i,
                payload_len: 0,
                body: Body::Ping,
            })
        })
        .collect();
    let limit = 256usize << 20;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0usize;
    let mut blocked_since: Option<Instant> = None;
    while sent < limit && Instant::now() < deadline {
        match s.write(&ping) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Blocked for a while: the endpoint has stopped reading us.
                let t = *blocked_since.get_or_insert_with(Instant::now);
                if t.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        sent < 64 << 20,
        "the endpoint kept reading {} MiB of requests whose answers nobody reads",
        sent >> 20
    );
}

#[test]
fn garbage_behind_a_full_send_queue_closes_the_connection_once() {
    // A client asks for lots of data it never reads, then sends garbage: the endpoint
    // reports one protocol error and closes, instead of re-reading the garbage forever.
    let server =
        Endpoint::bind(EndpointConfig::new().listen("tcp://127.0.0.1:0").unwrap()).unwrap();
    let region = server.alloc_region(4 << 20, Rights::ALL).unwrap();
    let key = region.key(Rights::READ).unwrap();
    let addr = server.local_addrs()[0].socket_addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello(99)).unwrap();
    let _peer = server
        .accept_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    for i in 0..64u64 {
        let token: [u8; 16] = key.to_bytes()[26..42].try_into().unwrap();
        s.write_all(&conformance::encode(&Header {
            op_id: i + 1,
            payload_len: 0,
            body: Body::Read {
                target: pfs_transport::wire::Target {
                    region: key.region(),
                    offset: 0,
                    token,
                },
                len: 4 << 20,
            },
        }))
        .unwrap();
    }
    s.write_all(&[0xEE; 16]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.connection_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.connection_count(), 0, "the connection stayed open");
    let errors = server.stats().protocol_errors;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(errors, 1, "the garbage was reported more than once");
    assert_eq!(server.stats().protocol_errors, errors);
}

#[test]
fn an_absurd_handshake_answer_is_refused_before_allocating() {
    // A "server" answers HELLO with a header announcing 4 GiB of payload.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        read_header(&mut s);
        let _ = s.write_all(&conformance::encode(&Header {
            op_id: 0,
            payload_len: u32::MAX,
            body: Body::Send {
                msg_len: u64::from(u32::MAX),
                msg_off: 0,
            },
        }));
        std::thread::sleep(Duration::from_millis(200));
    });
    let ep = Endpoint::bind(EndpointConfig::new()).unwrap();
    let t = Instant::now();
    let r = ep.connect(&format!("tcp://{a}"));
    assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    peer.join().unwrap();
}

#[test]
fn a_handshake_answer_trickled_a_byte_at_a_time_ends_at_the_deadline() {
    // A "server" sends a valid HELLO_ACK one byte every 500 ms: each read returns within
    // the time left, but the whole answer takes many times the connect timeout.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        read_header(&mut s);
        for b in hello_ack(9) {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let ep = Endpoint::bind(EndpointConfig::new().connect_timeout(Duration::from_secs(1))).unwrap();
    let t = Instant::now();
    let r = ep.connect(&format!("tcp://{a}"));
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "connect took {:?} against a 1 s connect timeout",
        t.elapsed()
    );
    drop(ep);
    peer.join().unwrap();
}
