//! Tasks every node can register with one call: sums and histograms over u64 arrays.

use crate::node::Node;
use crate::task::{LocalRegionView, TaskError};

/// Name of the built-in sum task (wrapping sum of the range's u64s; result: one u64).
pub const SUM_U64: &str = "pfs.sum_u64";
/// Name of the built-in histogram task (see [`histogram_args`]).
pub const HISTOGRAM_U64: &str = "pfs.histogram_u64";
/// Name of the task that does nothing and returns nothing (for round-trip timing).
pub const NOOP: &str = "pfs.noop";

/// Register the built-in tasks on `node`.
pub fn register(node: &Node) {
    node.register_task(SUM_U64, sum_u64);
    node.register_task(HISTOGRAM_U64, histogram_u64);
    node.register_task(NOOP, |_, _| Ok(Vec::new()));
}

/// The sum task: wrapping sum of the window's u64s, as 8 little-endian bytes.
pub fn sum_u64(view: &LocalRegionView, _args: &[u8]) -> Result<Vec<u8>, TaskError> {
    let mut s = 0u64;
    view.for_each_u64_chunk(|c| s = c.iter().fold(s, |s, v| s.wrapping_add(*v)))?;
    Ok(s.to_le_bytes().to_vec())
}

/// Arguments of the histogram task: `buckets` equal buckets over `min..max`; values
/// outside are not counted.
pub fn histogram_args(min: u64, max: u64, buckets: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend(min.to_le_bytes());
    v.extend(max.to_le_bytes());
    v.extend(buckets.to_le_bytes());
    v
}

/// The histogram task: counts of the window's u64s per bucket, as little-endian u64s.
pub fn histogram_u64(view: &LocalRegionView, args: &[u8]) -> Result<Vec<u8>, TaskError> {
    if args.len() != 20 {
        return Err(format!(
            "histogram arguments are min (u64), max (u64), buckets (u32): 20 bytes, got {}",
            args.len()
        )
        .into());
    }
    let min = u64::from_le_bytes(args[0..8].try_into().expect("8"));
    let max = u64::from_le_bytes(args[8..16].try_into().expect("8"));
    let buckets = u32::from_le_bytes(args[16..20].try_into().expect("4")) as u64;
    if buckets == 0 || buckets > 1 << 20 || max <= min {
        return Err(format!(
            "histogram needs 1..=1048576 buckets and min < max (got {buckets} over {min}..{max})"
        )
        .into());
    }
    let width = (max - min).div_ceil(buckets);
    let mut counts = vec![0u64; buckets as usize];
    view.for_each_u64_chunk(|c| {
        for &v in c {
            if v >= min && v < max {
                counts[((v - min) / width) as usize] += 1;
            }
        }
    })?;
    Ok(encode_u64s(&counts))
}

/// Decode little-endian u64s (a task result).
pub fn decode_u64s(bytes: &[u8]) -> Vec<u64> {
    le_u64s(bytes).collect()
}

/// The little-endian u64s of `bytes`, in order; a trailing partial element is ignored.
pub(crate) fn le_u64s(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
}

/// Encode u64s little-endian, the inverse of [`decode_u64s`].
pub(crate) fn encode_u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
