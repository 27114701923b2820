//! Memory that remote peers may read and write: allocation, bounds and access.
//!
//! Region memory is written by the kernel (a `recv` placing payload at its offset), by
//! the progress engine (small payloads copied from a staging buffer, atomics) and read
//! by the kernel (a `send` of read data), all while its owner may be reading it. No Rust
//! reference (`&[u8]`, `&mut [u8]`) to region memory ever exists; everything here works
//! on raw pointers, and every access a thread makes is an atomic access (word-wise
//! `Relaxed` for bulk copies, `SeqCst` for the u64 atomics), so concurrent access from
//! threads is a race on values, never undefined behaviour. Kernel access is like DMA:
//! outside the language's model, ordered by the system calls that start and complete it.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// How the memory was obtained, so that it is released the same way.
#[derive(Debug)]
enum Backing {
    /// `mmap` of `map_len` bytes (page-rounded).
    Mmap { map_len: usize, huge: bool },
    /// A `Vec<u8>` taken from the caller, turned into raw parts.
    Vec { cap: usize },
}

/// A block of region memory. Freed when the last `Arc<Mem>` goes, which is after every
/// operation that touches it has completed (operations hold a clone).
#[derive(Debug)]
pub(crate) struct Mem {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: `Mem` owns its allocation exclusively and exposes it only through raw-pointer
// accessors that use atomic operations (see the module docs), so sharing and sending it
// between threads cannot create data races.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

const HUGE_PAGE: usize = 2 << 20;

impl Mem {
    /// Allocate `len` zeroed bytes with `mmap`, using 2 MiB huge pages when `huge` is asked
    /// for, the length is a multiple of 2 MiB and the system has huge pages free; otherwise
    /// ordinary pages. Page-aligned either way.
    pub(crate) fn alloc(len: usize, try_huge: bool) -> Result<Mem> {
        if len == 0 {
            return Err(Error::InvalidArgument(
                "a region needs at least 1 byte".into(),
            ));
        }
        let page = page_size();
        let map_len = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::InvalidArgument(format!("region length {len} is too large")))?;
        if try_huge
            && map_len % HUGE_PAGE == 0
            && let Some(ptr) = mmap_anon(map_len, libc::MAP_HUGETLB)
        {
            return Ok(Mem {
                ptr,
                len,
                backing: Backing::Mmap {
                    map_len,
                    huge: true,
                },
            });
        }
        let ptr = mmap_anon(map_len, 0).ok_or_else(|| Error::last_os("mmap"))?;
        Ok(Mem {
            ptr,
            len,
            backing: Backing::Mmap {
                map_len,
                huge: false,
            },
        })
    }

    /// Take ownership of a caller's buffer. Its start must be 8-byte aligned so that the
    /// u64 atomics at 8-byte-aligned offsets are aligned in memory.
    pub(crate) fn from_vec(v: Vec<u8>) -> Result<Mem> {
        if v.is_empty() {
            return Err(Error::InvalidArgument(
                "a region needs at least 1 byte".into(),
            ));
        }
        if !(v.as_ptr() as usize).is_multiple_of(8) {
            return Err(Error::InvalidArgument(
                "registered memory must start 8-byte aligned (for the u64 atomics); \
                 use Endpoint::alloc_region instead"
                    .into(),
            ));
        }
        let mut v = std::mem::ManuallyDrop::new(v);
        let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
        Ok(Mem {
            ptr: NonNull::new(ptr).expect("Vec pointer is never null"),
            len,
            backing: Backing::Vec { cap },
        })
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the memory sits on huge pages.
    pub(crate) fn is_huge(&self) -> bool {
        matches!(self.backing, Backing::Mmap { huge: true, .. })
    }

    /// `off..off+len` as `usize` bounds, if it lies inside the memory.
    #[inline]
    pub(crate) fn range(&self, off: u64, len: u64) -> Option<(usize, usize)> {
        let end = off.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        Some((off as usize, len as usize))
    }

    /// Raw pointer to byte `off`, for handing to the kernel. `off <= len` is required and
    /// checked; callers pair it with a length checked through [`Mem::range`].
    #[inline]
    pub(crate) fn ptr_at(&self, off: usize) -> *mut u8 {
        if off > self.len {
            beyond(off, self.len);
        }
        // SAFETY: `off <= len`, so the result stays within (or one past) the allocation.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// Copy `dst.len()` bytes starting at `off` out of the memory.
    pub(crate) fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.check(off, dst.len())?;
        // SAFETY: the range was checked to lie inside the allocation, which lives as long
        // as `&self`; every thread access to region memory is atomic (module docs).
        unsafe { copy_from_shared(self.ptr_at(off), dst) };
        Ok(())
    }

    /// Copy `src` into the memory at `off`.
    pub(crate) fn copy_in(&self, off: usize, src: &[u8]) -> Result<()> {
        self.check(off, src.len())?;
        // SAFETY: as in `copy_out`, with the roles swapped.
        unsafe { copy_to_shared(src, self.ptr_at(off)) };
        Ok(())
    }

    /// Set `len` bytes at `off` to `byte`.
    pub(crate) fn fill(&self, off: usize, len: usize, byte: u8) -> Result<()> {
        self.check(off, len)?;
        let base = self.ptr_at(off);
        for i in 0..len {
            // SAFETY: `i < len` and the range was checked; AtomicU8 has alignment 1.
            unsafe { AtomicU8::from_ptr(base.add(i)) }.store(byte, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The u64 at `off` as an atomic. `off` must be 8-byte aligned in memory and in bounds.
    pub(crate) fn atomic_u64(&self, off: u64) -> Result<&AtomicU64> {
        let (o, _) = self.range(off, 8).ok_or(Error::OutOfBounds {
            offset: off,
            len: 8,
            region_len: self.len as u64,
        })?;
        let p = self.ptr_at(o);
        if !(p as usize).is_multiple_of(8) {
            return Err(Error::Misaligned { offset: off });
        }
        // SAFETY: `p` is in bounds for 8 bytes, 8-byte aligned, and lives as long as
        // `&self` (the allocation is freed only when `Mem` drops). All thread accesses to
        // region memory are atomic (module docs), so this atomic view is sound.
        Ok(unsafe { AtomicU64::from_ptr(p.cast::<u64>()) })
    }

    fn check(&self, off: usize, len: usize) -> Result<()> {
        self.range(off as u64, len as u64)
            .map(|_| ())
            .ok_or(Error::OutOfBounds {
                offset: off as u64,
                len: len as u64,
                region_len: self.len as u64,
            })
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        match self.backing {
            Backing::Mmap { map_len, .. } => {
                // SAFETY: `ptr`/`map_len` are exactly what `mmap` returned, and no operation
                // can still use the memory: each holds an `Arc<Mem>`.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), map_len) };
            }
            Backing::Vec { cap } => {
                // SAFETY: the parts come from a `Vec<u8>` we took apart in `from_vec`.
                drop(unsafe { Vec::from_raw_parts(self.ptr.as_ptr(), self.len, cap) });
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

fn mmap_anon(len: usize, extra: libc::c_int) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no address hint has no preconditions;
    // the result is checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(p.cast())
    }
}

/// Copy `dst.len()` bytes out of shared memory at `src`: atomic (`Relaxed`) loads on the
/// shared side, word-sized where aligned; plain stores into the caller's buffer.
///
/// # Safety
/// `src..src+dst.len()` must be valid for reads for the duration of the call, and any
/// concurrent thread access to it must be atomic.
unsafe fn copy_from_shared(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let mut i = 0;
    let head = ((8 - (src as usize) % 8) % 8).min(n);
    while i < head {
        // SAFETY: `i < n`; the caller guarantees `src..src+n` is readable; alignment 1.
        dst[i] = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: `src+i` is 8-byte aligned (the head was skipped) and `i+8 <= n`.
        let v = unsafe { AtomicU64::from_ptr(src.add(i).cast_mut().cast::<u64>()) }
            .load(Ordering::Relaxed);
        dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: as for the head.
        dst[i] = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
        i += 1;
    }
}

/// Copy `src` into shared memory at `dst`: plain loads from the caller's buffer, atomic
/// (`Relaxed`) stores on the shared side, word-sized where aligned.
///
/// # Safety
/// `dst..dst+src.len()` must be valid for writes for the duration of the call, and any
/// concurrent thread access to it must be atomic.
unsafe fn copy_to_shared(src: &[u8], dst: *mut u8) {
    let n = src.len();
    let mut i = 0;
    let head = ((8 - (dst as usize) % 8) % 8).min(n);
    while i < head {
        // SAFETY: `i < n`; the caller guarantees `dst..dst+n` is writable; alignment 1.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        // SAFETY: `dst+i` is 8-byte aligned (the head was skipped) and `i+8 <= n`.
        unsafe { AtomicU64::from_ptr(dst.add(i).cast::<u64>()) }
            .store(u64::from_ne_bytes(w), Ordering::Relaxed);
        i += 8;
    }
    while i < n {
        // SAFETY: as for the head.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_at_every_alignment() {
        let m = Mem::alloc(256, false).unwrap();
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in 0..9 {
            for start in 0..9 {
                let n = 200 - start.max(off);
                m.fill(0, 256, 0).unwrap();
                m.copy_in(off, &src[start..start + n]).unwrap();
                let mut out = vec![0u8; n];
                m.copy_out(off, &mut out).unwrap();
                assert_eq!(out, &src[start..start + n]);
            }
        }
    }

    #[test]
    fn bounds_are_checked() {
        let m = Mem::alloc(100, false).unwrap();
        assert!(m.copy_in(99, &[1]).is_ok());
        assert!(matches!(
            m.copy_in(99, &[1, 2]),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(m.range(u64::MAX, 2).is_none());
        assert!(matches!(m.atomic_u64(96), Err(Error::OutOfBounds { .. })));
        assert!(matches!(m.atomic_u64(4), Err(Error::Misaligned { .. })));
        assert_eq!(m.atomic_u64(88).unwrap().load(Ordering::SeqCst), 0);
    }

    #[test]
    fn vec_backing_round_trips() {
        let v = vec![5u8; 64];
        if (v.as_ptr() as usize).is_multiple_of(8) {
            let m = Mem::from_vec(v).unwrap();
            let mut out = [0u8; 4];
            m.copy_out(60, &mut out).unwrap();
            assert_eq!(out, [5; 4]);
        }
    }
}

/// A bounds-checked window of region memory that keeps the memory alive.
#[derive(Debug, Clone)]
pub(crate) struct Slice {
    mem: std::sync::Arc<Mem>,
    off: usize,
    len: usize,
}

impl Slice {
    /// `off..off+len` of `mem`, or `None` if it does not fit.
    #[inline]
    pub(crate) fn new(mem: std::sync::Arc<Mem>, off: u64, len: u64) -> Option<Slice> {
        let (off, len) = mem.range(off, len)?;
        Some(Slice { mem, off, len })
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The memory this slice is part of.
    #[inline]
    pub(crate) fn mem(&self) -> &std::sync::Arc<Mem> {
        &self.mem
    }

    /// Offset of the slice in its memory.
    pub(crate) fn offset(&self) -> usize {
        self.off
    }

    /// Start pointer, valid for `len` bytes while the slice lives.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.mem.ptr_at(self.off)
    }

    /// Copy `src` into the slice at `at`.
    pub(crate) fn copy_in(&self, at: usize, src: &[u8]) -> Result<()> {
        if at.checked_add(src.len()).is_none_or(|e| e > self.len) {
            return Err(Error::OutOfBounds {
                offset: at as u64,
                len: src.len() as u64,
                region_len: self.len as u64,
            });
        }
        self.mem.copy_in(self.off + at, src)
    }
}

impl Slice {
    /// A sub-window `at..at+len` of this slice.
    pub(crate) fn sub(&self, at: u64, len: u64) -> Option<Slice> {
        let end = at.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        Some(Slice {
            mem: self.mem.clone(),
            off: self.off + at as usize,
            len: len as usize,
        })
    }
}

/// The panic of [`Mem::ptr_at`], out of line: the check is on every operation's path.
#[cold]
#[inline(never)]
fn beyond(off: usize, len: usize) -> ! {
    panic!("offset {off} beyond memory of {len}")
}
