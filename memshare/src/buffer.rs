//! Handles on named regions, wherever they live.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pfs_transport::{Connection, Op, Region, RegionKey, Rights};

use crate::builtin;
use crate::error::{Error, Result};
use crate::node::{CHUNK, Inner};
use crate::wire::{DirEntry, Request};

/// Largest staging region a remote read or write allocates; longer transfers go in
/// rounds.
const STAGING: u64 = 16 << 20;
/// Size of the pooled staging regions that small transfers reuse.
const SMALL_STAGING: u64 = 256 << 10;
/// How many small staging regions a node keeps.
const STAGING_POOL: usize = 16;

/// A one-sided operation between a local region and a remote one, as
/// [`Connection::read`] and [`Connection::write`] start it: local region and offset,
/// remote key and offset, length.
type StartOp = fn(&Connection, &Region, u64, &RegionKey, u64, u64) -> pfs_transport::Result<Op<()>>;

/// A handle on a named region of the cluster: bounds-checked reads and writes, u64
/// views, atomics, third-party copies and task dispatch. On the owner it works on the
/// region through its accessors; elsewhere through one-sided transport operations.
///
/// Every access is checked against the region's length and the handle's rights before
/// anything is sent: a refused access is an error naming the buffer and the range, and
/// writes nothing. Cloning gives another handle to the same region.
#[derive(Clone)]
pub struct SharedBuffer {
    node: Arc<Inner>,
    entry: DirEntry,
    key: RegionKey,
    rights: Rights,
    local: Option<Region>,
}

impl std::fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuffer")
            .field("name", &self.entry.name)
            .field("owner", &format_args!("{:016x}", self.entry.owner))
            .field("len", &self.entry.size)
            .field("rights", &self.rights)
            .finish()
    }
}

impl SharedBuffer {
    pub(crate) fn new(node: Arc<Inner>, entry: DirEntry) -> Result<SharedBuffer> {
        let key: RegionKey = entry.key.parse().map_err(|e| {
            Error::transport(format!("the directory's key for {:?}", entry.name), e)
        })?;
        let local = if entry.owner == node.id {
            node.exports
                .lock()
                .expect("exports lock poisoned")
                .get(&entry.name)
                .filter(|x| x.entry.key == entry.key)
                .map(|x| x.region.clone())
        } else {
            None
        };
        let rights = Rights::from_bits(entry.rights).unwrap_or(Rights::NONE);
        Ok(SharedBuffer {
            node,
            entry,
            key,
            rights,
            local,
        })
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.entry.size
    }

    /// Whether the buffer is empty (never: regions hold at least one byte).
    pub fn is_empty(&self) -> bool {
        self.entry.size == 0
    }

    /// The owner's node id.
    pub fn owner(&self) -> u64 {
        self.entry.owner
    }

    /// The owner's address.
    pub fn owner_addr(&self) -> &str {
        &self.entry.addr
    }

    /// What this handle may do.
    pub fn rights(&self) -> Rights {
        self.rights
    }

    /// Whether the region lives on this node.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// A handle on the same region that may only read.
    pub fn read_only(&self) -> SharedBuffer {
        let mut b = self.clone();
        b.rights =
            Rights::from_bits(self.rights.bits() & Rights::READ.bits()).unwrap_or(Rights::NONE);
        b
    }

    pub(crate) fn entry(&self) -> &DirEntry {
        &self.entry
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        Error::check_range(&self.entry.name, offset, len, self.entry.size)
    }

    fn need(&self, r: Rights, op: &'static str) -> Result<()> {
        if self.rights.contains(r) {
            return Ok(());
        }
        let held = if self.rights == Rights::NONE {
            "not accessible through this handle".to_string()
        } else if self.rights == Rights::READ {
            "read-only".to_string()
        } else {
            format!("limited to {}", self.rights)
        };
        Err(Error::ReadOnly {
            name: self.entry.name.clone(),
            op,
            held,
        })
    }

    fn down(&self, reason: String) -> Error {
        Error::OwnerDown {
            name: self.entry.name.clone(),
            owner: self.entry.owner,
            addr: self.entry.addr.clone(),
            reason,
        }
    }

    /// Turn a transport error of `op` into this layer's error.
    fn op_error(&self, op: &str, offset: u64, len: u64, e: pfs_transport::Error) -> Error {
        if self.node.lock_state().is_down(self.entry.owner) {
            return self.down(format!("failure detection marked it down ({e})"));
        }
        match e {
            pfs_transport::Error::ConnectionLost { .. } | pfs_transport::Error::Closed(_) => {
                self.down(e.to_string())
            }
            pfs_transport::Error::Timeout { .. } => Error::Timeout {
                what: format!(
                    "{op} of {:?} bytes {offset}..{}",
                    self.entry.name,
                    offset + len
                ),
                after: self.node.cfg.op_timeout,
            },
            e => Error::transport(
                format!(
                    "{op} of {:?} bytes {offset}..{}",
                    self.entry.name,
                    offset + len
                ),
                e,
            ),
        }
    }

    fn conn(&self) -> Result<Arc<pfs_transport::Connection>> {
        self.node
            .connection(&self.entry.addr, self.entry.owner, &self.entry.name)
    }

    /// Copy `buf.len()` bytes at `offset` out of the buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.need(Rights::READ, "read")?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(r) = &self.local {
            return r
                .read_at(offset as usize, buf)
                .map_err(|e| self.op_error("read", offset, len, e));
        }
        let conn = self.conn()?;
        let staging = self.staging(len)?;
        let mut done = 0u64;
        while done < len {
            let round = (len - done).min(STAGING);
            self.transfer_round(
                &conn,
                &staging,
                offset + done,
                round,
                Connection::read,
                |e| self.op_error("read", offset, len, e),
            )?;
            let dst = &mut buf[done as usize..(done + round) as usize];
            staging
                .read_at(0, dst)
                .map_err(|e| self.op_error("read", offset, len, e))?;
            done += round;
        }
        self.recycle(staging);
        Ok(())
    }

    /// Copy `len` bytes at `offset` into a new vector.
    pub fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        let mut v = vec![0u8; len as usize];
        self.read(offset, &mut v)?;
        Ok(v)
    }

    /// Write `data` into the buffer at `offset`. Complete when the bytes are in the
    /// owner's region.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.need(Rights::WRITE, "write")?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(r) = &self.local {
            return r
                .write_at(offset as usize, data)
                .map_err(|e| self.op_error("write", offset, len, e));
        }
        let conn = self.conn()?;
        let staging = self.staging(len)?;
        let mut done = 0u64;
        while done < len {
            let round = (len - done).min(STAGING);
            staging
                .write_at(0, &data[done as usize..(done + round) as usize])
                .map_err(|e| self.op_error("write", offset, len, e))?;
            self.transfer_round(
                &conn,
                &staging,
                offset + done,
                round,
                Connection::write,
                |e| self.op_error("write", offset, len, e),
            )?;
            done += round;
        }
        self.recycle(staging);
        Ok(())
    }

    /// Move `round` bytes between the start of `staging` and the region at `remote` with
    /// `start` (a read or a write), in operations of at most `CHUNK` bytes, and wait
    /// for all of them.
    fn transfer_round(
        &self,
        conn: &Connection,
        staging: &Region,
        remote: u64,
        round: u64,
        start: StartOp,
        err: impl Fn(pfs_transport::Error) -> Error,
    ) -> Result<()> {
        let mut ops = Vec::new();
        let mut at = 0u64;
        while at < round {
            let n = (round - at).min(CHUNK);
            ops.push(start(conn, staging, at, &self.key, remote + at, n).map_err(&err)?);
            at += n;
        }
        pfs_transport::wait_all(ops).map_err(err)
    }

    /// A staging region for `len` bytes: a pooled small one, or a new one.
    fn staging(&self, len: u64) -> Result<Region> {
        if len <= SMALL_STAGING
            && let Some(r) = self
                .node
                .staging
                .lock()
                .expect("staging lock poisoned")
                .pop()
        {
            return Ok(r);
        }
        let size = if len <= SMALL_STAGING {
            SMALL_STAGING
        } else {
            len.min(STAGING)
        };
        self.node
            .ep
            .alloc_region(size as usize, Rights::ALL)
            .map_err(|e| Error::transport("allocating a staging buffer", e))
    }

    /// Give a staging region back to the pool. Only after every operation on it
    /// completed: one that timed out may still land in it later.
    fn recycle(&self, r: Region) {
        if r.len() as u64 == SMALL_STAGING {
            let mut pool = self.node.staging.lock().expect("staging lock poisoned");
            if pool.len() < STAGING_POOL {
                pool.push(r);
            }
        }
    }

    /// Read `count` little-endian u64s starting at element `index`.
    pub fn read_u64s(&self, index: u64, count: usize) -> Result<Vec<u64>> {
        let (offset, len) = self.elems(index, count as u64)?;
        let bytes = self.read_vec(offset, len)?;
        Ok(builtin::decode_u64s(&bytes))
    }

    /// Write `values` as little-endian u64s starting at element `index`.
    pub fn write_u64s(&self, index: u64, values: &[u64]) -> Result<()> {
        let (offset, _) = self.elems(index, values.len() as u64)?;
        self.write(offset, &builtin::encode_u64s(values))
    }

    /// Number of whole u64 elements.
    pub fn len_u64(&self) -> u64 {
        self.entry.size / 8
    }

    fn elems(&self, index: u64, count: u64) -> Result<(u64, u64)> {
        Error::elem_range(&self.entry.name, index, count, self.entry.size)
    }

    fn atomic_check(&self, offset: u64, op: &'static str) -> Result<()> {
        self.need(Rights::ATOMIC, op)?;
        self.check_range(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(Error::Misaligned {
                name: self.entry.name.clone(),
                op,
                offset,
            });
        }
        Ok(())
    }

    /// Atomically replace the u64 at byte `offset` (8-byte aligned) with `new` if it
    /// equals `expected`; returns the old value.
    pub fn compare_and_swap(&self, offset: u64, expected: u64, new: u64) -> Result<u64> {
        self.atomic_check(offset, "compare_and_swap")?;
        if let Some(r) = &self.local {
            return r
                .compare_and_swap(offset as usize, expected, new)
                .map_err(|e| self.op_error("compare_and_swap", offset, 8, e));
        }
        let conn = self.conn()?;
        conn.compare_and_swap(&self.key, offset, expected, new)
            .and_then(|op| op.wait())
            .map_err(|e| self.op_error("compare_and_swap", offset, 8, e))
    }

    /// Atomically add `add` (wrapping) to the u64 at byte `offset` (8-byte aligned);
    /// returns the old value.
    pub fn fetch_add(&self, offset: u64, add: u64) -> Result<u64> {
        self.atomic_check(offset, "fetch_add")?;
        if let Some(r) = &self.local {
            return r
                .fetch_add(offset as usize, add)
                .map_err(|e| self.op_error("fetch_add", offset, 8, e));
        }
        let conn = self.conn()?;
        conn.fetch_add(&self.key, offset, add)
            .and_then(|op| op.wait())
            .map_err(|e| self.op_error("fetch_add", offset, 8, e))
    }

    /// Third-party copy: ask this buffer's owner to write `len` bytes at `offset` of its
    /// region into `dst` at `dst_offset`, directly (owner to owner; the bytes never pass
    /// through this node unless it owns one of the two). Needs read on this handle and
    /// write on `dst`; both ranges are checked before anything is sent.
    pub fn copy_to(
        &self,
        offset: u64,
        dst: &SharedBuffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<()> {
        self.need(Rights::READ, "copy_to (source)")?;
        dst.need(Rights::WRITE, "copy_to (destination)")?;
        self.check_range(offset, len)?;
        dst.check_range(dst_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let req = Request::Copy {
            name: self.entry.name.clone(),
            key: self.entry.key.clone(),
            offset,
            len,
            dst_addr: dst.entry.addr.clone(),
            dst_key: dst.entry.key.clone(),
            dst_offset,
        };
        if self.is_local() {
            // The owner is this node: it writes straight from its region.
            let region = self.local.clone().expect("local");
            return self
                .node
                .copy_local_out(&region, offset, len, dst, dst_offset);
        }
        // The owner has one operation deadline per round of COPY_WINDOW bytes.
        let rounds = len
            .div_ceil(crate::node::COPY_WINDOW)
            .min(u64::from(u32::MAX)) as u32;
        let timeout = self.node.cfg.op_timeout * (rounds + 1);
        self.node
            .request(
                &self.entry.addr,
                self.entry.owner,
                &self.entry.name,
                req,
                timeout,
            )
            .map(|_| ())
    }

    /// Run the task registered as `task` at the owner over the whole buffer, with
    /// `args`; returns its result bytes.
    pub fn dispatch(&self, task: &str, args: &[u8]) -> Result<Vec<u8>> {
        self.dispatch_range(0..self.entry.size, task, args)
    }

    /// Run the task registered as `task` at the owner over bytes `range` of the buffer.
    ///
    /// Errors: [`Error::UnknownTask`], [`Error::TaskPanicked`], [`Error::TaskFailed`],
    /// [`Error::Timeout`] (the node's `task_timeout`), [`Error::OwnerDown`].
    pub fn dispatch_range(&self, range: Range<u64>, task: &str, args: &[u8]) -> Result<Vec<u8>> {
        let len = range
            .end
            .checked_sub(range.start)
            .ok_or_else(|| Error::OutOfRange {
                name: self.entry.name.clone(),
                offset: range.start,
                len: 0,
                size: self.entry.size,
            })?;
        self.check_range(range.start, len)?;
        let timeout = self.node.cfg.task_timeout;
        if let Some(region) = &self.local {
            return self.run_here(region.clone(), range.start, len, task, args, timeout);
        }
        let req = Request::Task {
            name: self.entry.name.clone(),
            key: self.entry.key.clone(),
            offset: range.start,
            len,
            task: task.into(),
            args: args.to_vec(),
        };
        self.node.request(
            &self.entry.addr,
            self.entry.owner,
            &self.entry.name,
            req,
            timeout,
        )
    }

    /// Run a task on this node's own region, in a worker thread with the same deadline
    /// and panic handling as a remote dispatch.
    fn run_here(
        &self,
        region: Region,
        offset: u64,
        len: u64,
        task: &str,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let node = self.node.clone();
        let (name, t, a) = (self.entry.name.clone(), task.to_string(), args.to_vec());
        let inner = node.clone();
        inner.run_job(Box::new(move || {
            let r = crate::node::run_task(&node, &name, region, offset, len, &t, &a);
            let _ = tx.send(r);
        }))?;
        let start = Instant::now();
        match rx.recv_timeout(timeout) {
            Ok(r) => r.map_err(|e| {
                crate::node::remote_error(
                    e,
                    self.node.id,
                    &self.entry.name,
                    &format!("task {task:?} on {:?}", self.entry.name),
                    task,
                )
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Error::Shutdown),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout {
                what: format!(
                    "task {task:?} on {:?} at node {:016x} (local)",
                    self.entry.name, self.node.id
                ),
                after: start.elapsed().max(timeout),
            }),
        }
    }
}

impl Inner {
    /// Copy from a region this node owns into `dst`, wherever it is.
    pub(crate) fn copy_local_out(
        self: &Arc<Self>,
        region: &Region,
        offset: u64,
        len: u64,
        dst: &SharedBuffer,
        dst_offset: u64,
    ) -> Result<()> {
        let e = dst.entry();
        self.copy_out_pub(region, offset, len, &e.addr, &e.key, dst_offset)
            .map_err(|err| match err {
                Error::Transport { source, .. } => dst.op_error("copy_to", dst_offset, len, source),
                other => other,
            })
    }
}
