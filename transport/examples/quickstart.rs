//! Two endpoints in one process over loopback: expose a region, hand out a key,
//! then write, fence, read, use atomics and exchange messages through it.
//!
//! ```text
//! cargo run -p pfs-transport --example quickstart
//! ```

use std::time::Instant;

use pfs_transport::{Endpoint, EndpointConfig, KeyOptions, Rights};

fn main() -> pfs_transport::Result<()> {
    // The target: listens, owns a 64 MiB region, grants read+write+atomic on it for a
    // minute.
    let target = Endpoint::bind(EndpointConfig::new().listen("tcp://127.0.0.1:0")?)?;
    let region = target.alloc_region(64 << 20, Rights::ALL)?;
    let key = region
        .key_with(KeyOptions::new(Rights::ALL).expires_in(std::time::Duration::from_secs(60)))?;
    println!("target listens on {}", target.local_addrs()[0]);
    // The key is a capability: whoever holds its string gets its rights until it
    // expires or is revoked. Real applications hand it only to the peer that needs it.
    println!("key {key}");

    // The initiator: connects and gets the key as a message.
    let initiator = Endpoint::bind(EndpointConfig::new())?;
    let conn = initiator.connect(&target.local_addrs()[0].to_string())?;
    let peer = target.accept()?;
    peer.send(key.to_string().as_bytes())?.wait()?;
    let key: pfs_transport::RegionKey = String::from_utf8_lossy(&conn.recv()?).parse()?;

    // One-sided writes: 16 MiB in 1 MiB pieces, all in flight at once.
    let local = initiator.alloc_region(16 << 20, Rights::ALL)?;
    local.fill(0, 16 << 20, 0xAB)?;
    let t = Instant::now();
    let ops: Vec<_> = (0..16u64)
        .map(|i| conn.write(&local, i << 20, &key, i << 20, 1 << 20))
        .collect::<Result<_, _>>()?;
    pfs_transport::wait_all(ops)?;
    println!("wrote 16 MiB in {:?}", t.elapsed());

    // Everything before the fence is in place before the read after it runs.
    conn.fence()?.wait()?;
    conn.read(&local, 0, &key, (16 << 20) - 4, 4)?.wait()?;
    assert_eq!(local.to_vec(0, 4)?, [0xAB; 4]);

    // Atomics: a counter in the remote region.
    for _ in 0..10 {
        conn.fetch_add(&key, 32 << 20, 1)?.wait()?;
    }
    let old = conn.compare_and_swap(&key, 32 << 20, 10, 100)?.wait()?;
    println!("counter was {old}, now {}", region.load_u64(32 << 20)?);

    // A write that tells the target it landed.
    local.write_at(0, b"done")?;
    conn.write_with_notify(&local, 0, &key, 40 << 20, 4, 7)?
        .wait()?;
    let n = peer
        .notification_timeout(std::time::Duration::from_secs(5))?
        .expect("notification");
    println!(
        "target notified: {} bytes at {} (imm {}): {:?}",
        n.len,
        n.offset,
        n.imm,
        String::from_utf8_lossy(&region.to_vec(n.offset as usize, n.len as usize)?)
    );

    // Revoked keys stop working.
    region.revoke(&key)?;
    let err = conn.read(&local, 0, &key, 0, 8)?.wait().unwrap_err();
    println!("after revocation: {err}");
    println!("initiator counters: {:?}", conn.stats());
    Ok(())
}
