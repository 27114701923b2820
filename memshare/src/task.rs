//! The task layer's view of an owner's memory.

use pfs_transport::Region;

/// A task: reads the owner's region through a [`LocalRegionView`], gets the caller's
/// argument bytes, returns result bytes or an error message.
pub type TaskFn = dyn Fn(&LocalRegionView, &[u8]) -> Result<Vec<u8>, TaskError> + Send + Sync;

/// A task's failure, reported to the caller as
/// [`Error::TaskFailed`](crate::Error::TaskFailed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError(pub String);

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for TaskError {
    fn from(s: String) -> Self {
        TaskError(s)
    }
}

impl From<&str> for TaskError {
    fn from(s: &str) -> Self {
        TaskError(s.to_string())
    }
}

impl From<crate::Error> for TaskError {
    fn from(e: crate::Error) -> Self {
        TaskError(e.to_string())
    }
}

/// How many u64 elements [`LocalRegionView::for_each_u64_chunk`] copies out at once.
const CHUNK_ELEMS: usize = 8192;

/// A task's window onto the owner's region: a range of it, read through the region's
/// copying and atomic accessors (never a plain slice, because remote writes may change
/// the bytes at any time — DESIGN.md decision 3). Offsets are relative to the window.
#[derive(Debug)]
pub struct LocalRegionView {
    name: String,
    region: Region,
    base: u64,
    len: u64,
}

impl LocalRegionView {
    pub(crate) fn new(name: &str, region: Region, base: u64, len: u64) -> Self {
        LocalRegionView {
            name: name.to_string(),
            region,
            base,
            len,
        }
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes in the window.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the window starts in the region.
    pub fn base(&self) -> u64 {
        self.base
    }

    fn check(&self, offset: u64, len: u64) -> crate::Result<usize> {
        crate::Error::check_range(&self.name, offset, len, self.len)?;
        Ok((self.base + offset) as usize)
    }

    /// Copy `buf.len()` bytes at `offset` out of the window.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        let at = self.check(offset, buf.len() as u64)?;
        self.region
            .read_at(at, buf)
            .map_err(|e| crate::Error::transport("reading the local region", e))
    }

    /// Copy `len` bytes at `offset` into a new vector.
    pub fn to_vec(&self, offset: u64, len: u64) -> crate::Result<Vec<u8>> {
        self.check(offset, len)?;
        let mut v = vec![0u8; len as usize];
        self.read(offset, &mut v)?;
        Ok(v)
    }

    /// Copy `count` little-endian u64s starting at element `index` of the window.
    pub fn read_u64s(&self, index: u64, count: usize) -> crate::Result<Vec<u64>> {
        let (offset, len) = (index.saturating_mul(8), (count as u64).saturating_mul(8));
        self.check(offset, len)?;
        let mut bytes = vec![0u8; len as usize];
        self.read(offset, &mut bytes)?;
        Ok(crate::builtin::decode_u64s(&bytes))
    }

    /// Atomically load the u64 at element `index` (the window must start 8-byte
    /// aligned in the region).
    pub fn load_u64(&self, index: u64) -> crate::Result<u64> {
        let at = self.check(index.saturating_mul(8), 8)?;
        self.region
            .load_u64(at)
            .map_err(|e| crate::Error::transport("atomic load", e))
    }

    /// Call `f` on consecutive chunks of the window's u64 elements (copied out a few
    /// thousand at a time); a trailing partial element is ignored.
    pub fn for_each_u64_chunk(&self, mut f: impl FnMut(&[u64])) -> crate::Result<()> {
        let total = (self.len / 8) as usize;
        let mut bytes = vec![0u8; CHUNK_ELEMS.min(total) * 8];
        let mut vals = Vec::with_capacity(CHUNK_ELEMS.min(total));
        let mut i = 0usize;
        while i < total {
            let n = (total - i).min(CHUNK_ELEMS);
            self.read(i as u64 * 8, &mut bytes[..n * 8])?;
            vals.clear();
            vals.extend(crate::builtin::le_u64s(&bytes[..n * 8]));
            f(&vals);
            i += n;
        }
        Ok(())
    }
}
