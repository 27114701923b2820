//! Hot-path micro-benchmarks of the wire format: encoding and decoding the headers every
//! operation carries. `cargo bench -p pfs-transport --bench wire`.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use pfs_transport::wire::{Body, Header, Limits, MAX_HEADER_LEN, Target};

fn target() -> Target {
    Target {
        region: 7,
        offset: 4096,
        token: [0x5a; pfs_transport::wire::TOKEN_LEN],
    }
}

fn headers() -> Vec<(&'static str, Header)> {
    vec![
        (
            "write",
            Header {
                op_id: 42,
                payload_len: 1400,
                body: Body::Write {
                    target: target(),
                    op_len: 1 << 20,
                    op_off: 65536,
                    notify: None,
                },
            },
        ),
        (
            "fetch_add",
            Header {
                op_id: 43,
                payload_len: 0,
                body: Body::Faa {
                    target: target(),
                    add: 1,
                },
            },
        ),
        (
            "read_resp",
            Header {
                op_id: 44,
                payload_len: 1400,
                body: Body::ReadResp {
                    op_len: 1 << 20,
                    op_off: 0,
                },
            },
        ),
    ]
}

fn wire(c: &mut Criterion) {
    let limits = Limits::default();
    for (name, h) in headers() {
        c.bench_function(&format!("encode {name}"), |b| {
            let mut buf = [0u8; MAX_HEADER_LEN];
            b.iter(|| black_box(&h).encode(&mut buf))
        });
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut buf);
        c.bench_function(&format!("decode {name}"), |b| {
            b.iter(|| Header::decode(black_box(&buf[..n]), &limits).unwrap())
        });
    }
}

criterion_group!(benches, wire);
criterion_main!(benches);
