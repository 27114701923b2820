//! Maps keyed by locally generated u64 ids (connections, operations, regions).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for ids this process generates itself (sequential counters): one multiply
/// spreads them over the table. Not for keys an attacker chooses — ids from the network
/// are only ever looked up, and a miss is cheap.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A `HashMap` keyed by u64 ids.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
