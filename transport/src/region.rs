//! Registered memory regions, their keys, and the target-side access check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::error::{Error, Result};
use crate::key::{KeyOptions, RegionKey, Rights, new_token, now_ms, token_eq};
use crate::sys::mem::{Mem, Slice};
use crate::wire::{ErrorCode, TOKEN_LEN, Target};

#[derive(Debug)]
struct Grant {
    token: [u8; TOKEN_LEN],
    rights: Rights,
    expires_ms: u64,
    revoked: bool,
}

#[derive(Debug)]
pub(crate) struct RegionInner {
    id: u64,
    owner: u64,
    mem: Arc<Mem>,
    rights: Rights,
    grants: Mutex<Vec<Grant>>,
    table: Weak<RegionTable>,
}

impl Drop for RegionInner {
    fn drop(&mut self) {
        if let Some(t) = self.table.upgrade() {
            t.remove(self.id);
        }
    }
}

/// A registered memory region that remote peers can access with its keys.
///
/// The owner reads and writes the region through copying accessors ([`read_at`],
/// [`write_at`]) and atomic ones ([`load_u64`], [`compare_and_swap`], …); there is no
/// `&[u8]` view, because remote writes may change the bytes at any moment. Dropping every
/// handle unexports the region (remote accesses then fail with `UnknownRegion`); its
/// memory lives on until operations still using it complete.
///
/// Cloning a `Region` gives another handle to the same region.
///
/// [`read_at`]: Region::read_at
/// [`write_at`]: Region::write_at
/// [`load_u64`]: Region::load_u64
/// [`compare_and_swap`]: Region::compare_and_swap
#[derive(Debug, Clone)]
pub struct Region {
    pub(crate) inner: Arc<RegionInner>,
}

impl Region {
    /// Region id (unique within its endpoint).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.mem.len()
    }

    /// Whether the region is empty (never: regions have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most a key to this region may grant.
    pub fn rights(&self) -> Rights {
        self.inner.rights
    }

    /// Whether the memory sits on huge pages.
    pub fn is_huge_pages(&self) -> bool {
        self.inner.mem.is_huge()
    }

    /// A new key granting `rights` (a subset of the region's), never expiring.
    pub fn key(&self, rights: Rights) -> Result<RegionKey> {
        self.key_with(KeyOptions::new(rights))
    }

    /// A new key with options (rights, expiry).
    pub fn key_with(&self, opts: KeyOptions) -> Result<RegionKey> {
        if !self.inner.rights.contains(opts.rights) {
            return Err(Error::InvalidArgument(format!(
                "a key cannot grant {} on a region created with {}",
                opts.rights, self.inner.rights
            )));
        }
        let expires_ms = match opts.expires_in {
            None => 0,
            Some(d) => now_ms().saturating_add(d.as_millis().max(1) as u64),
        };
        let token = new_token()?;
        self.inner
            .grants
            .lock()
            .expect("grant lock poisoned")
            .push(Grant {
                token,
                rights: opts.rights,
                expires_ms,
                revoked: false,
            });
        Ok(RegionKey {
            owner: self.inner.owner,
            region: self.inner.id,
            len: self.len() as u64,
            rights: opts.rights,
            token,
            expires_ms,
            backend: Vec::new(),
        })
    }

    /// Revoke one key: later accesses with it fail with [`Error::Revoked`]. Operations
    /// already executing at the moment of revocation may still complete.
    pub fn revoke(&self, key: &RegionKey) -> Result<()> {
        if key.region != self.inner.id || key.owner != self.inner.owner {
            return Err(Error::InvalidArgument(
                "this key belongs to another region".into(),
            ));
        }
        let mut g = self.inner.grants.lock().expect("grant lock poisoned");
        match g.iter_mut().find(|g| token_eq(&g.token, &key.token)) {
            Some(grant) => {
                grant.revoked = true;
                drop(g);
                if let Some(t) = self.inner.table.upgrade() {
                    t.grants_ended(self.inner.id, Some(key.token), true);
                }
                Ok(())
            }
            None => Err(Error::InvalidArgument(
                "this key was not issued for this region".into(),
            )),
        }
    }

    /// Revoke every key issued so far.
    pub fn revoke_all(&self) {
        for g in self
            .inner
            .grants
            .lock()
            .expect("grant lock poisoned")
            .iter_mut()
        {
            g.revoked = true;
        }
        if let Some(t) = self.inner.table.upgrade() {
            t.grants_ended(self.inner.id, None, true);
        }
    }

    /// Copy `buf.len()` bytes at `offset` out of the region.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.inner.mem.copy_out(offset, buf)
    }

    /// Copy `len` bytes at `offset` into a new vector.
    pub fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v)?;
        Ok(v)
    }

    /// Copy `data` into the region at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.inner.mem.copy_in(offset, data)
    }

    /// Set `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.inner.mem.fill(offset, len, byte)
    }

    /// Atomically load the little-endian u64 at `offset` (8-byte aligned).
    pub fn load_u64(&self, offset: usize) -> Result<u64> {
        Ok(u64::from_le(
            self.inner
                .mem
                .atomic_u64(offset as u64)?
                .load(Ordering::SeqCst),
        ))
    }

    /// Atomically store a little-endian u64 at `offset` (8-byte aligned).
    pub fn store_u64(&self, offset: usize, v: u64) -> Result<()> {
        self.inner
            .mem
            .atomic_u64(offset as u64)?
            .store(v.to_le(), Ordering::SeqCst);
        Ok(())
    }

    /// Atomic compare-and-swap of the u64 at `offset`, in the same atomicity domain as
    /// remote atomics. Returns the old value.
    pub fn compare_and_swap(&self, offset: usize, expected: u64, new: u64) -> Result<u64> {
        Ok(cas(
            self.inner.mem.atomic_u64(offset as u64)?,
            expected,
            new,
        ))
    }

    /// Atomic wrapping fetch-and-add of the u64 at `offset`, in the same atomicity domain
    /// as remote atomics. Returns the old value.
    pub fn fetch_add(&self, offset: usize, add: u64) -> Result<u64> {
        Ok(faa(self.inner.mem.atomic_u64(offset as u64)?, add))
    }

    /// A slice for operations, checked against the region's bounds.
    #[inline]
    pub(crate) fn slice(&self, offset: u64, len: u64) -> Result<Slice> {
        Slice::new(self.inner.mem.clone(), offset, len).ok_or_else(|| Error::OutOfBounds {
            offset,
            len,
            region_len: self.len() as u64,
        })
    }

    /// Whether this region belongs to the endpoint with id `owner`.
    pub(crate) fn owner(&self) -> u64 {
        self.inner.owner
    }
}

/// Compare-and-swap on a little-endian u64 in memory.
pub(crate) fn cas(a: &AtomicU64, expected: u64, new: u64) -> u64 {
    match a.compare_exchange(
        expected.to_le(),
        new.to_le(),
        Ordering::SeqCst,
        Ordering::SeqCst,
    ) {
        Ok(v) | Err(v) => u64::from_le(v),
    }
}

/// Wrapping fetch-and-add on a little-endian u64 in memory.
pub(crate) fn faa(a: &AtomicU64, add: u64) -> u64 {
    if cfg!(target_endian = "little") {
        a.fetch_add(add, Ordering::SeqCst)
    } else {
        let mut cur = a.load(Ordering::SeqCst);
        loop {
            let new = u64::from_le(cur).wrapping_add(add).to_le();
            match a.compare_exchange_weak(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) => return u64::from_le(v),
                Err(v) => cur = v,
            }
        }
    }
}

/// Told when grants end, by backends that hand grants to peers' hardware (rdma: an
/// rkey per grant), so that they can withdraw them there too.
pub(crate) trait GrantWatcher: Send + Sync + std::fmt::Debug {
    /// The grant with `token` of `region` was revoked (`None`: every grant of the region,
    /// after `revoke_all` or when the region is dropped). With `wait`, return only once
    /// no peer can start an access with it any more.
    fn grants_ended(&self, region: u64, token: Option<[u8; TOKEN_LEN]>, wait: bool);
}

/// The regions an endpoint exports, looked up by id for every remote access.
#[derive(Debug)]
pub(crate) struct RegionTable {
    owner: u64,
    next: AtomicU64,
    map: RwLock<crate::idmap::IdMap<Weak<RegionInner>>>,
    watchers: RwLock<Vec<Weak<dyn GrantWatcher>>>,
}

/// A live grant, as a backend registering it for a peer's hardware needs it.
#[derive(Debug)]
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) struct GrantView {
    pub(crate) mem: Arc<Mem>,
    pub(crate) rights: Rights,
    /// Milliseconds since the epoch; 0: never.
    pub(crate) expires_ms: u64,
}

/// A refused access: the wire code and a human explanation for the initiator.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) why: String,
}

impl RegionTable {
    pub(crate) fn new(owner: u64) -> Arc<RegionTable> {
        Arc::new(RegionTable {
            owner,
            next: AtomicU64::new(1),
            map: RwLock::new(crate::idmap::IdMap::default()),
            watchers: RwLock::new(Vec::new()),
        })
    }

    /// Tell `w` about every grant that ends from now on.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn watch(&self, w: Weak<dyn GrantWatcher>) {
        if let Ok(mut v) = self.watchers.write() {
            v.retain(|x| x.strong_count() > 0);
            v.push(w);
        }
    }

    fn grants_ended(&self, region: u64, token: Option<[u8; TOKEN_LEN]>, wait: bool) {
        let ws: Vec<_> = match self.watchers.read() {
            Ok(v) => v.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        for w in ws {
            w.grants_ended(region, token, wait);
        }
    }

    pub(crate) fn insert(self: &Arc<Self>, mem: Mem, rights: Rights) -> Region {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(RegionInner {
            id,
            owner: self.owner,
            mem: Arc::new(mem),
            rights,
            grants: Mutex::new(Vec::new()),
            table: Arc::downgrade(self),
        });
        self.map
            .write()
            .expect("region table poisoned")
            .insert(id, Arc::downgrade(&inner));
        Region { inner }
    }

    fn remove(&self, id: u64) {
        if let Ok(mut m) = self.map.write() {
            m.remove(&id);
        }
        self.grants_ended(id, None, false);
    }

    /// Number of regions exported.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Check an access from the network and return the memory it may touch.
    ///
    /// The order of checks decides which error a bad access gets: unknown region,
    /// unknown token, revoked, expired, rights, bounds, alignment.
    pub(crate) fn authorize(
        &self,
        t: &Target,
        need: Rights,
        len: u64,
        atomic: bool,
    ) -> std::result::Result<Slice, Refusal> {
        let (inner, _) = self.check_grant(t, need)?;
        let region_len = inner.mem.len() as u64;
        let slice = Slice::new(inner.mem.clone(), t.offset, len).ok_or_else(|| Refusal {
            code: ErrorCode::OutOfBounds,
            why: format!(
                "offset {} + length {len} does not fit the region's {region_len} bytes",
                t.offset
            ),
        })?;
        if atomic && !(slice.as_ptr() as usize).is_multiple_of(8) {
            return Err(Refusal {
                code: ErrorCode::Misaligned,
                why: format!("offset {} is not 8-byte aligned", t.offset),
            });
        }
        Ok(slice)
    }

    /// The grant behind `t`'s token, checked for `need` (rights, revocation, expiry),
    /// without an access range: for backends that register the whole region for a peer.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn grant(
        &self,
        t: &Target,
        need: Rights,
    ) -> std::result::Result<GrantView, Refusal> {
        let (inner, (rights, expires_ms)) = self.check_grant(t, need)?;
        Ok(GrantView {
            mem: inner.mem.clone(),
            rights,
            expires_ms,
        })
    }

    fn check_grant(
        &self,
        t: &Target,
        need: Rights,
    ) -> std::result::Result<(Arc<RegionInner>, (Rights, u64)), Refusal> {
        let inner = self
            .map
            .read()
            .ok()
            .and_then(|m| m.get(&t.region).and_then(Weak::upgrade))
            .ok_or_else(|| Refusal {
                code: ErrorCode::UnknownRegion,
                why: format!("no region {} here", t.region),
            })?;
        {
            let grants = inner.grants.lock().map_err(|_| Refusal {
                code: ErrorCode::Other,
                why: "grant table unavailable".into(),
            })?;
            let g = grants
                .iter()
                .find(|g| token_eq(&g.token, &t.token))
                .ok_or_else(|| Refusal {
                    code: ErrorCode::AccessDenied,
                    why: "the key's token is not valid for this region".into(),
                })?;
            if g.revoked {
                return Err(Refusal {
                    code: ErrorCode::Revoked,
                    why: "key revoked".into(),
                });
            }
            if g.expires_ms != 0 && now_ms() >= g.expires_ms {
                return Err(Refusal {
                    code: ErrorCode::Expired,
                    why: "key expired".into(),
                });
            }
            if !g.rights.contains(need) {
                return Err(Refusal {
                    code: ErrorCode::AccessDenied,
                    why: format!("the key grants {}, this access needs {}", g.rights, need),
                });
            }
            let found = (g.rights, g.expires_ms);
            drop(grants);
            Ok((inner, found))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn target(r: &Region, k: &RegionKey, offset: u64) -> Target {
        Target {
            region: r.id(),
            offset,
            token: k.token,
        }
    }

    #[test]
    fn authorize_checks_in_order() {
        let t = RegionTable::new(7);
        let r = t.insert(Mem::alloc(64, false).unwrap(), Rights::ALL);
        let k = r.key(Rights::READ).unwrap();
        assert!(
            t.authorize(&target(&r, &k, 0), Rights::READ, 64, false)
                .is_ok()
        );
        let e = t
            .authorize(&target(&r, &k, 0), Rights::WRITE, 1, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessDenied);
        let e = t
            .authorize(&target(&r, &k, 60), Rights::READ, 5, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfBounds);
        let e = t
            .authorize(&target(&r, &k, u64::MAX), Rights::READ, 2, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfBounds);
        let mut forged = target(&r, &k, 0);
        forged.token[0] ^= 1;
        let e = t.authorize(&forged, Rights::READ, 1, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessDenied);
        r.revoke(&k).unwrap();
        let e = t
            .authorize(&target(&r, &k, 0), Rights::READ, 1, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Revoked);
    }

    #[test]
    fn expiry_and_alignment() {
        let t = RegionTable::new(7);
        let r = t.insert(Mem::alloc(64, false).unwrap(), Rights::ALL);
        let k = r
            .key_with(KeyOptions::new(Rights::ATOMIC).expires_in(Duration::from_millis(1)))
            .unwrap();
        let k2 = r.key(Rights::ATOMIC).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let e = t
            .authorize(&target(&r, &k, 0), Rights::ATOMIC, 8, true)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Expired);
        let e = t
            .authorize(&target(&r, &k2, 4), Rights::ATOMIC, 8, true)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Misaligned);
    }

    #[test]
    fn dropping_unexports() {
        let t = RegionTable::new(7);
        let r = t.insert(Mem::alloc(64, false).unwrap(), Rights::ALL);
        let k = r.key(Rights::READ).unwrap();
        let tg = target(&r, &k, 0);
        drop(r);
        assert_eq!(t.len(), 0);
        let e = t.authorize(&tg, Rights::READ, 1, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownRegion);
    }

    #[test]
    fn key_rights_must_be_subset() {
        let t = RegionTable::new(7);
        let r = t.insert(Mem::alloc(64, false).unwrap(), Rights::READ);
        assert!(r.key(Rights::WRITE).is_err());
    }

    #[test]
    fn owner_atomics() {
        let t = RegionTable::new(7);
        let r = t.insert(Mem::alloc(64, false).unwrap(), Rights::ALL);
        assert_eq!(r.fetch_add(8, 5).unwrap(), 0);
        assert_eq!(r.compare_and_swap(8, 5, 9).unwrap(), 5);
        assert_eq!(r.load_u64(8).unwrap(), 9);
        let mut b = [0u8; 8];
        r.read_at(8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 9);
    }
}
