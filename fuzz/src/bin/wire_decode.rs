//! The wire decoder on arbitrary bytes: it must never panic, and whatever it accepts must
//! encode back to the same header.

use pfs_transport::wire::{Header, Limits, MAX_HEADER_LEN};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        for limits in [Limits::default(), Limits { max_payload: 4096 }] {
            if let Ok((h, used)) = Header::decode(data, &limits) {
                assert!(used <= data.len());
                let mut buf = [0u8; MAX_HEADER_LEN];
                let n = h.encode(&mut buf);
                let (again, _) = Header::decode(&buf[..n], &limits).expect("re-decodes");
                assert_eq!(again, h);
            }
        }
    });
}
