//! The reliable-datagram protocol fed arbitrary datagrams: an established connection
//! (and a listener answering INITs) must never panic, whatever arrives and in whatever
//! order, and its answers stay bounded.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        pfs_transport::bench_internals::proto_receive(data);
    });
}
