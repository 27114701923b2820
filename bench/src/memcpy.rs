//! Local memory bandwidth: the ceiling any "faster than local RAM" claim is measured
//! against.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Result of the local copy test.
#[derive(Debug, Clone, Serialize)]
pub struct Memcpy {
    /// Bytes per copy.
    pub buffer: u64,
    /// Copies timed.
    pub copies: u64,
    /// Bytes copied per second (each byte counted once).
    pub gbytes_per_s: f64,
    pub threads: usize,
}

/// Copy a buffer far larger than the caches with `copy_from_slice` (libc memcpy) on one
/// thread, for about `duration`.
pub fn measure(duration: Duration) -> Memcpy {
    let len = 256usize << 20;
    let src = vec![0xA5u8; len];
    let mut dst = vec![0u8; len];
    // Touch both once so page faults are not timed.
    dst.copy_from_slice(&src);
    let start = Instant::now();
    let mut copies = 0u64;
    while start.elapsed() < duration || copies < 2 {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        copies += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Memcpy {
        buffer: len as u64,
        copies,
        gbytes_per_s: (copies * len as u64) as f64 / secs / 1e9,
        threads: 1,
    }
}
