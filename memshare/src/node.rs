//! A node: one transport endpoint, cluster membership, the directory replica, the
//! regions this node exports, and the requests other nodes make of it.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pfs_transport::{Connection, Endpoint, EndpointConfig, Region, RegionKey, Rights};

use crate::buffer::SharedBuffer;
use crate::config::NodeConfig;
use crate::error::{Error, RemoteError, Result};
use crate::link::{Link, Slot, poll_here};
use crate::membership::{self, Event, State};
use crate::pool::Pool;
use crate::striped::StripedArray;
use crate::task::{LocalRegionView, TaskError, TaskFn};
use crate::wire::{self, DirEntry, Msg, Request, StripeInfo};

/// Longest region name.
pub const MAX_NAME_LEN: usize = 256;
/// Membership datagrams waiting for the sender thread; more are dropped (SWIM
/// tolerates loss).
const OUTBOX: usize = 4096;
/// Membership events (datagrams received, announcements) waiting for the membership
/// thread.
const EVENTS: usize = 4096;
/// How long a failed connection attempt to an address keeps membership traffic from
/// trying again.
const CONNECT_BACKOFF: Duration = Duration::from_millis(300);
/// How often blocked threads look at the stop flag.
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// How long shutdown waits for the node's threads.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);
/// Largest single one-sided operation a copy issues.
pub(crate) const CHUNK: u64 = 1 << 20;
/// Bytes of a third-party copy in flight at once; each such round has the operation
/// deadline.
pub(crate) const COPY_WINDOW: u64 = 64 << 20;

/// A region this node exports.
#[derive(Debug, Clone)]
pub(crate) struct Export {
    pub region: Region,
    pub entry: DirEntry,
}

/// A member of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Node id.
    pub id: u64,
    /// Listen address.
    pub addr: String,
    /// Whether failure detection considers it up.
    pub up: bool,
}

pub(crate) struct Inner {
    pub cfg: NodeConfig,
    pub ep: Endpoint,
    pub id: u64,
    pub addr: String,
    pub started_ms: u64,
    pub state: Arc<Mutex<State>>,
    pub exports: Mutex<HashMap<String, Export>>,
    pub tasks: RwLock<HashMap<String, Arc<TaskFn>>>,
    /// Small staging regions for remote reads and writes, reused.
    pub staging: Mutex<Vec<Region>>,
    /// Connections this node opened, by peer address.
    conns: Mutex<HashMap<String, Arc<Link>>>,
    /// Serialises connection set-up per address.
    connecting: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Connections peers opened to this node, by connection id.
    incoming: Mutex<HashMap<u64, Arc<Link>>>,
    /// Callers waiting for answers, by request id.
    pending: Mutex<HashMap<u64, Arc<Slot>>>,
    next_req: AtomicU64,
    pub running: AtomicUsize,
    pub(crate) pool: Pool,
    pub stop: AtomicBool,
    events: SyncSender<Event>,
    outbox: SyncSender<Out>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &format_args!("{:016x}", self.id))
            .field("addr", &self.addr)
            .finish()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Inner {
    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state lock poisoned")
    }

    /// Queue a message for `addr` on the membership sender thread (dropped if the
    /// queue is full).
    pub(crate) fn post(&self, addr: &str, msg: Vec<u8>) {
        if let Err(TrySendError::Full(_)) = self.outbox.try_send(Out::Send(addr.to_string(), msg)) {
            tracing::debug!("membership outbox full: datagram to {addr} dropped");
        }
    }

    fn event(&self, e: Event) {
        match e {
            // Membership datagrams are dropped when the membership thread is behind
            // (SWIM tolerates loss); announcements and the stop wait for room.
            Event::Gossip(_) => {
                let _ = self.events.try_send(e);
            }
            _ => {
                let _ = self.events.send(e);
            }
        }
    }

    /// Close and forget the connection to `addr` if it reaches node `id` (now down):
    /// operations still in flight on it fail at once instead of at their deadline.
    pub(crate) fn drop_connection(&self, addr: &str, id: u64) {
        let gone = {
            let mut m = self.conns.lock().expect("conns lock poisoned");
            if m.get(addr)
                .is_some_and(|l| l.conn.peer_id() == id || l.conn.is_closed())
            {
                m.remove(addr)
            } else {
                None
            }
        };
        if let Some(l) = gone {
            l.conn.close();
        }
    }

    /// The connection to `addr` (node `owner`, or any node if `owner` is 0), opened if
    /// needed. `name` is what errors mention.
    pub(crate) fn connection(
        self: &Arc<Self>,
        addr: &str,
        owner: u64,
        name: &str,
    ) -> Result<Arc<Connection>> {
        self.link(addr, owner, name).map(|l| l.conn.clone())
    }

    /// [`connection`](Inner::connection), with who reads it.
    fn link(self: &Arc<Self>, addr: &str, owner: u64, name: &str) -> Result<Arc<Link>> {
        let down = |reason: String| Error::OwnerDown {
            name: name.to_string(),
            owner,
            addr: addr.to_string(),
            reason,
        };
        if self.stop.load(Ordering::Relaxed) {
            return Err(Error::Shutdown);
        }
        if owner != 0 && self.lock_state().is_down(owner) {
            return Err(down("failure detection marked it down".into()));
        }
        if let Some(c) = self.cached(addr) {
            return check_peer(c, owner).map_err(down);
        }
        let lock = self
            .connecting
            .lock()
            .expect("connecting lock poisoned")
            .entry(addr.to_string())
            .or_default()
            .clone();
        let _g = lock.lock().expect("connect lock poisoned");
        if let Some(c) = self.cached(addr) {
            return check_peer(c, owner).map_err(down);
        }
        let conn = self
            .ep
            .connect(addr)
            .map_err(|e| down(format!("cannot connect: {e}")))?;
        let link = Link::new(self, Arc::new(conn), false);
        self.conns
            .lock()
            .expect("conns lock poisoned")
            .insert(addr.to_string(), link.clone());
        self.start_reader(link.clone(), 0, None);
        check_peer(link, owner).map_err(down)
    }

    fn cached(&self, addr: &str) -> Option<Arc<Link>> {
        let mut m = self.conns.lock().expect("conns lock poisoned");
        match m.get(addr) {
            Some(l) if !l.conn.is_closed() => Some(l.clone()),
            Some(_) => {
                m.remove(addr);
                None
            }
            None => None,
        }
    }

    /// Forget a connection whose reader saw it close.
    pub(crate) fn forget_link(&self, link: &Arc<Link>) {
        if link.incoming {
            let mut m = self.incoming.lock().expect("incoming lock poisoned");
            if m.get(&link.conn.id()).is_some_and(|l| Arc::ptr_eq(l, link)) {
                m.remove(&link.conn.id());
            }
        } else {
            self.conns
                .lock()
                .expect("conns lock poisoned")
                .retain(|_, l| !Arc::ptr_eq(l, link));
        }
    }

    pub(crate) fn keep(&self, h: JoinHandle<()>) {
        let mut t = self.threads.lock().expect("threads lock poisoned");
        t.retain(|h| !h.is_finished());
        t.push(h);
    }

    /// Send a request to node `owner` at `addr` and wait for its answer.
    ///
    /// While it waits, the caller reads the connection itself (unless another caller
    /// on the same connection already does): the answer then wakes this thread
    /// directly, with no hand-off through the connection's reader.
    pub(crate) fn request(
        self: &Arc<Self>,
        addr: &str,
        owner: u64,
        name: &str,
        req: Request,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let link = self.link(addr, owner, name)?;
        let conn = &link.conn;
        let node = conn.peer_id();
        let what = req.what();
        let task = match &req {
            Request::Task { task, .. } => task.clone(),
            _ => String::new(),
        };
        let id = self.next_req.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::new());
        self.pending
            .lock()
            .expect("pending lock poisoned")
            .insert(id, slot.clone());
        let _forget = Forget(self, id);
        let down = |reason: String| Error::OwnerDown {
            name: name.to_string(),
            owner: node,
            addr: addr.to_string(),
            reason,
        };
        let deadline = Instant::now() + timeout;
        let send_error = |e: pfs_transport::Error| match e {
            pfs_transport::Error::ConnectionLost { .. } => down(e.to_string()),
            e => Error::transport(format!("sending the request for {what}"), e),
        };
        // The answer is not held back for the send's completion (the peer queued it);
        // the completion, or its failure, is noticed while waiting for the answer.
        let mut sent = Some(
            conn.send(&wire::encode(&Msg::Request { id, req }))
                .map_err(send_error)?,
        );
        let mut lead = None;
        let mut parked = false;
        loop {
            if let Some(r) = slot.take() {
                return r.map_err(|e| remote_error(e, node, name, &what, &task));
            }
            if lead.is_none() {
                lead = link.lead(self);
            }
            if let Some(l) = &lead {
                match l.poll() {
                    Poll::Ready(Ok(m)) => {
                        self.handle(&link, &m, None);
                        continue;
                    }
                    Poll::Ready(Err(_)) => {
                        return Err(down("the connection closed before the answer came".into()));
                    }
                    Poll::Pending => {}
                }
            }
            if let Some(op) = sent.as_mut()
                && let Poll::Ready(r) = poll_here(op)
            {
                sent = None;
                r.map_err(send_error)?;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!("{what} at node {node:016x}"),
                    after: timeout,
                });
            }
            if parked {
                if conn.is_closed() {
                    return Err(down("the connection closed before the answer came".into()));
                }
                if self.lock_state().is_down(node) {
                    return Err(down("failure detection marked it down".into()));
                }
                if self.stop.load(Ordering::Relaxed) {
                    return Err(Error::Shutdown);
                }
            }
            // Woken by the answer, the send's completion, or a message to read.
            std::thread::park_timeout((deadline - now).min(POLL));
            parked = true;
        }
    }

    /// Allocate, export and announce a region.
    pub(crate) fn export(
        self: &Arc<Self>,
        name: &str,
        size: u64,
        rights: Rights,
        stripe: Option<StripeInfo>,
    ) -> Result<DirEntry> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "region names are 1 to {MAX_NAME_LEN} bytes; {name:?} has {}",
                name.len()
            )));
        }
        if size == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot export {name:?} with size 0: regions hold at least one byte"
            )));
        }
        if rights == Rights::NONE {
            return Err(Error::InvalidArgument(format!(
                "cannot export {name:?} with no rights: grant read, write and/or atomic"
            )));
        }
        let mut exports = self.exports.lock().expect("exports lock poisoned");
        {
            let st = self.lock_state();
            if let Some(x) = st.dir.get(name)
                && !x.removed
                && !st.is_down(x.owner)
            {
                return Err(Error::NameTaken {
                    name: name.into(),
                    owner: x.owner,
                    addr: x.addr.clone(),
                });
            }
        }
        let len = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("size {size} does not fit in memory")))?;
        let region = self
            .ep
            .alloc_region(len, rights)
            .map_err(|e| Error::transport(format!("allocating {size} bytes for {name:?}"), e))?;
        let key = region
            .key(rights)
            .map_err(|e| Error::transport(format!("issuing a key for {name:?}"), e))?;
        let entry = DirEntry {
            name: name.into(),
            owner: self.id,
            addr: self.addr.clone(),
            key: key.to_string(),
            size,
            rights: rights.bits(),
            created_ms: now_ms(),
            removed: false,
            stripe,
        };
        self.lock_state().merge(entry.clone());
        exports.insert(
            name.into(),
            Export {
                region,
                entry: entry.clone(),
            },
        );
        drop(exports);
        self.event(Event::Broadcast(wire::to_bytes(&entry)));
        Ok(entry)
    }

    /// Answer a request from another node.
    pub(crate) fn serve(
        self: &Arc<Self>,
        req: Request,
    ) -> std::result::Result<Vec<u8>, RemoteError> {
        match req {
            Request::Task {
                name,
                key,
                offset,
                len,
                task,
                args,
            } => {
                let region = self.authorised(&name, &key, offset, len, Rights::NONE)?;
                run_task(self, &name, region, offset, len, &task, &args)
            }
            Request::Copy {
                name,
                key,
                offset,
                len,
                dst_addr,
                dst_key,
                dst_offset,
            } => {
                let region = self.authorised(&name, &key, offset, len, Rights::READ)?;
                self.copy_out_pub(&region, offset, len, &dst_addr, &dst_key, dst_offset)
                    .map(|()| Vec::new())
                    .map_err(|e| RemoteError::Other(e.to_string()))
            }
            Request::Export {
                name,
                size,
                rights,
                stripe,
            } => {
                if !self.cfg.allow_remote_export {
                    return Err(RemoteError::Denied(
                        "this node does not export regions for other nodes \
                         (allow_remote_export = false)"
                            .into(),
                    ));
                }
                if size > self.cfg.max_remote_export {
                    return Err(RemoteError::Denied(format!(
                        "{size} bytes is more than this node exports for others \
                         (max_remote_export = {})",
                        self.cfg.max_remote_export
                    )));
                }
                let rights = Rights::from_bits(rights)
                    .ok_or_else(|| RemoteError::Denied(format!("unknown rights bits {rights}")))?;
                match self.export(&name, size, rights, stripe) {
                    Ok(e) => Ok(wire::to_bytes(&e)),
                    Err(Error::NameTaken { owner, addr, .. }) => {
                        Err(RemoteError::NameTaken { owner, addr })
                    }
                    Err(e) => Err(RemoteError::Other(e.to_string())),
                }
            }
        }
    }

    /// The local region exported as `name`, if `key` is the key announced for it, it
    /// grants `need`, and the range fits.
    fn authorised(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        len: u64,
        need: Rights,
    ) -> std::result::Result<Region, RemoteError> {
        let ex = self
            .exports
            .lock()
            .expect("exports lock poisoned")
            .get(name)
            .cloned()
            .ok_or_else(|| RemoteError::NotFound(name.to_string()))?;
        if ex.entry.key != key {
            return Err(RemoteError::Denied(format!(
                "the key presented for {name:?} is not the one this node issued"
            )));
        }
        // As strict as the transport's own check of one-sided operations: a key
        // revoked or expired since it was announced no longer authorises anything.
        let parsed: RegionKey = key.parse().map_err(|e| {
            RemoteError::Denied(format!(
                "the key presented for {name:?} does not decode: {e}"
            ))
        })?;
        if let Err(e) = self.ep.check_key(&parsed, need, offset, len) {
            return Err(match e {
                pfs_transport::Error::OutOfBounds { .. } => RemoteError::OutOfRange {
                    offset,
                    len,
                    size: ex.entry.size,
                },
                e => RemoteError::Denied(format!("{name:?}: {e}")),
            });
        }
        if !Rights::from_bits(ex.entry.rights).is_some_and(|r| r.contains(need)) {
            return Err(RemoteError::Denied(format!(
                "{name:?} does not grant {need}"
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > ex.entry.size) {
            return Err(RemoteError::OutOfRange {
                offset,
                len,
                size: ex.entry.size,
            });
        }
        Ok(ex.region)
    }

    /// Write `len` bytes of local `region` at `offset` into the region of `dst_key`.
    pub(crate) fn copy_out_pub(
        self: &Arc<Self>,
        region: &Region,
        offset: u64,
        len: u64,
        dst_addr: &str,
        dst_key: &str,
        dst_offset: u64,
    ) -> Result<()> {
        let key: RegionKey = dst_key
            .parse()
            .map_err(|e| Error::transport("decoding the destination key", e))?;
        Error::check_range("copy destination", dst_offset, len, key.len())?;
        if key.owner() == self.id {
            let dst = self
                .exports
                .lock()
                .expect("exports lock poisoned")
                .values()
                .find(|e| e.entry.key == dst_key)
                .filter(|e| {
                    Rights::from_bits(e.entry.rights).is_some_and(|r| r.contains(Rights::WRITE))
                })
                .map(|e| e.region.clone())
                .ok_or_else(|| {
                    Error::InvalidArgument(
                        "the destination key is not a writable export of this node".into(),
                    )
                })?;
            let mut buf = vec![0u8; CHUNK.min(len) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                let rd = |e| Error::transport("local copy", e);
                region
                    .read_at((offset + done) as usize, &mut buf[..n])
                    .map_err(rd)?;
                dst.write_at((dst_offset + done) as usize, &buf[..n])
                    .map_err(rd)?;
                done += n as u64;
            }
            return Ok(());
        }
        let conn = self.connection(dst_addr, key.owner(), "copy destination")?;
        // Rounds of COPY_WINDOW bytes in flight, each its own deadline.
        let mut done = 0u64;
        while done < len {
            let round_end = (done + COPY_WINDOW).min(len);
            let mut ops = Vec::new();
            while done < round_end {
                let n = (round_end - done).min(CHUNK);
                ops.push(
                    conn.write(region, offset + done, &key, dst_offset + done, n)
                        .map_err(|e| Error::transport("copy write", e))?,
                );
                done += n;
            }
            pfs_transport::wait_all(ops).map_err(|e| Error::transport("copy write", e))?;
        }
        Ok(())
    }
}

/// Removes a pending request when the waiter leaves.
struct Forget<'a>(&'a Inner, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0
            .pending
            .lock()
            .expect("pending lock poisoned")
            .remove(&self.1);
    }
}

fn check_peer(l: Arc<Link>, owner: u64) -> std::result::Result<Arc<Link>, String> {
    if owner != 0 && l.conn.peer_id() != owner {
        return Err(format!(
            "a different node ({:016x}) now listens at its address",
            l.conn.peer_id()
        ));
    }
    Ok(l)
}

pub(crate) fn remote_error(e: RemoteError, node: u64, name: &str, what: &str, task: &str) -> Error {
    let task = task.to_string();
    match e {
        RemoteError::UnknownTask { registered } => Error::UnknownTask {
            task,
            node,
            registered,
        },
        RemoteError::Panicked(message) => Error::TaskPanicked {
            task,
            node,
            message,
        },
        RemoteError::Failed(message) => Error::TaskFailed {
            task,
            node,
            message,
        },
        RemoteError::NotFound(n) => Error::Remote {
            node,
            what: what.into(),
            message: format!("it does not export {n:?} (any more)"),
        },
        RemoteError::NameTaken { owner, addr } => Error::NameTaken {
            name: name.into(),
            owner,
            addr,
        },
        RemoteError::OutOfRange { offset, len, size } => Error::OutOfRange {
            name: name.into(),
            offset,
            len,
            size,
        },
        RemoteError::Busy(limit) => Error::Remote {
            node,
            what: what.into(),
            message: format!("busy: it runs {limit} requests at once; retry later"),
        },
        RemoteError::Denied(m) | RemoteError::Other(m) => Error::Remote {
            node,
            what: what.into(),
            message: m,
        },
    }
}

/// Run a task on `len` bytes of `region` at `offset`, catching a panic.
pub(crate) fn run_task(
    inner: &Inner,
    name: &str,
    region: Region,
    offset: u64,
    len: u64,
    task: &str,
    args: &[u8],
) -> std::result::Result<Vec<u8>, RemoteError> {
    let f = {
        let t = inner.tasks.read().expect("tasks lock poisoned");
        match t.get(task) {
            Some(f) => f.clone(),
            None => {
                let mut names: Vec<&str> = t.keys().map(String::as_str).collect();
                names.sort_unstable();
                return Err(RemoteError::UnknownTask {
                    registered: if names.is_empty() {
                        "(none)".into()
                    } else {
                        names.join(", ")
                    },
                });
            }
        }
    };
    let view = LocalRegionView::new(name, region, offset, len);
    match catch_unwind(AssertUnwindSafe(|| f(&view, args))) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(TaskError(m))) => Err(RemoteError::Failed(m)),
        Err(p) => {
            let m = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with a non-string payload".into());
            Err(RemoteError::Panicked(m))
        }
    }
}

impl Inner {
    /// Handle a message that arrived on `link`. `reader` is the reader generation of
    /// the calling thread when it is the connection's reader (which runs requests
    /// itself); `None` for a caller reading while it waits (which hands them to a
    /// worker). Returns whether the caller still reads the connection.
    pub(crate) fn handle(
        self: &Arc<Self>,
        link: &Arc<Link>,
        data: &[u8],
        reader: Option<u64>,
    ) -> bool {
        let conn = &link.conn;
        let Some(msg) = wire::decode(data) else {
            tracing::debug!("undecodable message from {} ignored", conn.peer_addr());
            return true;
        };
        match msg {
            Msg::Gossip(d) => self.event(Event::Gossip(d)),
            Msg::Directory(entries) => {
                let mut st = self.lock_state();
                for e in entries {
                    st.merge(e);
                }
            }
            Msg::Response { id, result } => {
                let slot = self
                    .pending
                    .lock()
                    .expect("pending lock poisoned")
                    .get(&id)
                    .cloned();
                if let Some(slot) = slot {
                    slot.put(result);
                }
            }
            Msg::Request { id, req } => {
                let limit = self.cfg.max_concurrent_tasks;
                if self.running.fetch_add(1, Ordering::AcqRel) >= limit {
                    self.running.fetch_sub(1, Ordering::AcqRel);
                    respond(conn, id, Err(RemoteError::Busy(limit)));
                    return true;
                }
                if let Some(generation) = reader {
                    return self.serve_inline(link, generation, id, req);
                }
                let (i, c) = (self.clone(), conn.clone());
                let job = Box::new(move || {
                    let r = i.serve(req);
                    i.running.fetch_sub(1, Ordering::AcqRel);
                    respond(&c, id, r);
                });
                if let Err(e) = self.run_job(job) {
                    self.running.fetch_sub(1, Ordering::AcqRel);
                    respond(conn, id, Err(RemoteError::Other(e.to_string())));
                }
            }
        }
        true
    }
}

pub(crate) fn respond(
    conn: &Connection,
    id: u64,
    result: std::result::Result<Vec<u8>, RemoteError>,
) {
    let msg = wire::encode(&Msg::Response { id, result });
    if let Err(e) = conn.send(&msg) {
        tracing::debug!("answer to {} lost: {e}", conn.peer_addr());
    }
}

fn acceptor(inner: Arc<Inner>) {
    while !inner.stop.load(Ordering::Relaxed) {
        match inner.ep.accept_timeout(POLL) {
            Ok(Some(c)) => {
                let link = Link::new(&inner, Arc::new(c), true);
                inner
                    .incoming
                    .lock()
                    .expect("incoming lock poisoned")
                    .insert(link.conn.id(), link.clone());
                inner.start_reader(link, 0, None);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// What the membership sender thread handles.
pub(crate) enum Out {
    /// Send a message to an address.
    Send(String, Vec<u8>),
    /// A connection attempt to an address finished (whether it succeeded).
    Connected(String, bool),
}

/// Messages held for one address while its connection is being set up.
const HELD_PER_ADDR: usize = 256;

/// Sends membership traffic. Never blocks on a connection set-up (a dead peer on a
/// datagram backend takes `connect_timeout` to give up): connections are made on a
/// helper thread, and messages for the address wait for it, up to a bound.
fn sender(inner: Arc<Inner>, rx: Receiver<Out>) {
    let mut held: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut failed: HashMap<String, Instant> = HashMap::new();
    let send = |conn: &Connection, addr: &str, msg: &[u8]| {
        // Completion is not awaited: membership tolerates loss.
        if let Err(e) = conn.send(msg) {
            tracing::trace!("membership message to {addr} not sent: {e}");
        }
    };
    while !inner.stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(POLL) {
            Ok(Out::Send(addr, msg)) => {
                if let Some(l) = inner.cached(&addr) {
                    send(&l.conn, &addr, &msg);
                    continue;
                }
                if failed
                    .get(&addr)
                    .is_some_and(|t| t.elapsed() < CONNECT_BACKOFF)
                {
                    continue;
                }
                let q = held.entry(addr.clone()).or_default();
                let first = q.is_empty();
                if q.len() >= HELD_PER_ADDR {
                    q.remove(0);
                }
                q.push(msg);
                if first {
                    let (i, a) = (inner.clone(), addr.clone());
                    let spawned = std::thread::Builder::new()
                        .name("pfs-ms-connect".into())
                        .spawn(move || {
                            let ok = match i.connection(&a, 0, &a) {
                                Ok(_) => true,
                                Err(e) => {
                                    tracing::trace!("membership: {e}");
                                    false
                                }
                            };
                            let _ = i.outbox.try_send(Out::Connected(a, ok));
                        });
                    if spawned.is_err() {
                        held.remove(&addr);
                    }
                }
            }
            Ok(Out::Connected(addr, ok)) => {
                let msgs = held.remove(&addr).unwrap_or_default();
                match (ok, inner.cached(&addr)) {
                    (true, Some(l)) => {
                        failed.remove(&addr);
                        for m in msgs {
                            send(&l.conn, &addr, &m);
                        }
                    }
                    _ => {
                        failed.insert(addr, Instant::now());
                    }
                }
            }
            Err(_) => {}
        }
    }
}

/// A member of a PacketFS memory-sharing cluster: one transport endpoint, membership
/// with failure detection, a replica of the region directory, the regions it exports
/// and the tasks it runs for others.
///
/// Dropping the node leaves the cluster and stops its threads; its regions become
/// unavailable to the other nodes.
#[derive(Debug)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

impl Node {
    /// Start a node: bind the listen address and join the cluster through the seeds
    /// (joining goes on in the background; see [`Node::wait_for_members`]).
    pub fn start(cfg: NodeConfig) -> Result<Node> {
        cfg.validate()?;
        let mut ec = EndpointConfig::new()
            .listen(&cfg.listen)
            .map_err(|e| Error::Config(format!("listen = {:?}: {e}", cfg.listen)))?
            .op_timeout(cfg.op_timeout)
            .connect_timeout(cfg.connect_timeout);
        if let Some(s) = &cfg.secret {
            ec = ec.secret(s.clone());
        }
        let ep = Endpoint::bind(ec)
            .map_err(|e| Error::transport(format!("starting the endpoint on {}", cfg.listen), e))?;
        let addr = ep
            .local_addrs()
            .first()
            .map(|a| a.to_string())
            .ok_or_else(|| Error::Config(format!("{} gave no listen address", cfg.listen)))?;
        let (etx, erx) = mpsc::sync_channel(EVENTS);
        let (otx, orx) = mpsc::sync_channel(OUTBOX);
        let inner = Arc::new(Inner {
            id: ep.id(),
            addr,
            started_ms: now_ms(),
            cfg,
            ep,
            state: Arc::new(Mutex::new(State::default())),
            exports: Mutex::new(HashMap::new()),
            tasks: RwLock::new(HashMap::new()),
            staging: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            running: AtomicUsize::new(0),
            pool: Pool::new(),
            stop: AtomicBool::new(false),
            events: etx,
            outbox: otx,
            threads: Mutex::new(Vec::new()),
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| Error::InvalidArgument(format!("cannot start thread {name}: {e}")))
        };
        let i = inner.clone();
        inner.keep(spawn("pfs-ms-accept", Box::new(move || acceptor(i)))?);
        let i = inner.clone();
        inner.keep(spawn("pfs-ms-send", Box::new(move || sender(i, orx)))?);
        let i = inner.clone();
        inner.keep(spawn(
            "pfs-ms-members",
            Box::new(move || membership::run(i, erx)),
        )?);
        tracing::info!(
            node = %format_args!("{:016x}", inner.id),
            addr = %inner.addr,
            "memshare node up"
        );
        Ok(Node { inner })
    }

    /// This node's id (its endpoint's id; the `owner` of its regions).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The address other nodes reach this node at (with the real port).
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.cfg
    }

    /// The transport endpoint (for statistics).
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.ep
    }

    /// The other members failure detection considers up, sorted by id.
    pub fn members(&self) -> Vec<MemberStatus> {
        let st = self.inner.lock_state();
        let mut v: Vec<MemberStatus> = st
            .up
            .iter()
            .map(|(id, (addr, _))| MemberStatus {
                id: *id,
                addr: addr.clone(),
                up: true,
            })
            .collect();
        v.sort_by_key(|m| m.id);
        v
    }

    /// Whether failure detection has declared node `id` down.
    pub fn is_down(&self, id: u64) -> bool {
        self.inner.lock_state().is_down(id)
    }

    /// Wait until at least `n` other members are up.
    pub fn wait_for_members(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.inner.lock_state().up.len();
            if have >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("joining: {have} of {n} other members seen"),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Register a task under `name`: other nodes' [`SharedBuffer::dispatch`] runs it
    /// here against the local region, through a [`LocalRegionView`].
    pub fn register_task<F>(&self, name: &str, f: F)
    where
        F: Fn(&LocalRegionView, &[u8]) -> std::result::Result<Vec<u8>, TaskError>
            + Send
            + Sync
            + 'static,
    {
        self.inner
            .tasks
            .write()
            .expect("tasks lock poisoned")
            .insert(name.to_string(), Arc::new(f));
    }

    /// Allocate a zeroed region of `size` bytes on this node, export it under `name`
    /// with `rights`, and announce it to the cluster.
    pub fn export(&self, name: &str, size: u64, rights: Rights) -> Result<SharedBuffer> {
        let e = self.inner.export(name, size, rights, None)?;
        SharedBuffer::new(self.inner.clone(), e)
    }

    /// Withdraw an export: the name disappears from every replica and remote accesses
    /// fail (the memory is freed once operations still using it complete).
    pub fn unexport(&self, name: &str) -> Result<()> {
        let ex = self
            .inner
            .exports
            .lock()
            .expect("exports lock poisoned")
            .remove(name)
            .ok_or_else(|| Error::InvalidArgument(format!("this node does not export {name:?}")))?;
        ex.region.revoke_all();
        let mut e = ex.entry;
        e.removed = true;
        e.created_ms = e.created_ms.max(now_ms());
        self.inner.lock_state().merge(e.clone());
        self.inner.event(Event::Broadcast(wire::to_bytes(&e)));
        Ok(())
    }

    /// Names in this node's directory replica (live exports only), sorted.
    pub fn names(&self) -> Vec<String> {
        let st = self.inner.lock_state();
        let mut v: Vec<String> = st
            .dir
            .values()
            .filter(|e| !e.removed)
            .map(|e| e.name.clone())
            .collect();
        v.sort();
        v
    }

    /// Open the region exported as `name` (on any node) with the rights its export
    /// grants.
    pub fn open(&self, name: &str) -> Result<SharedBuffer> {
        let e = {
            let st = self.inner.lock_state();
            match st.dir.get(name) {
                Some(e) if !e.removed => e.clone(),
                _ => {
                    return Err(Error::NotFound {
                        name: name.into(),
                        known: st.dir.values().filter(|e| !e.removed).count(),
                    });
                }
            }
        };
        SharedBuffer::new(self.inner.clone(), e)
    }

    /// [`open`](Node::open), waiting up to `timeout` for the name to reach this node's
    /// replica.
    pub fn open_timeout(&self, name: &str, timeout: Duration) -> Result<SharedBuffer> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.open(name) {
                Err(Error::NotFound { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// Create a striped array of `len` bytes over `nodes` nodes (this one and the
    /// others that are up, by id): stripe `i` is a region named `name#i` on the `i`th
    /// node. Stripes are multiples of 8 bytes.
    pub fn create_striped(&self, name: &str, len: u64, nodes: usize) -> Result<StripedArray> {
        StripedArray::create(self, name, len, nodes)
    }

    /// Create a striped array of `len` bytes with one stripe on each of `hosts` (node
    /// ids: this node's or members that are up), in that order.
    pub fn create_striped_on(&self, name: &str, len: u64, hosts: &[u64]) -> Result<StripedArray> {
        StripedArray::create_on(self, name, len, hosts)
    }

    /// Open a striped array by name (from this node's directory replica).
    pub fn open_striped(&self, name: &str) -> Result<StripedArray> {
        StripedArray::open(self, name)
    }

    /// Leave the cluster and stop (also done on drop).
    pub fn shutdown(&self) {
        if self.inner.stop.load(Ordering::Relaxed) {
            return;
        }
        self.inner.event(Event::Stop);
        // Give the leave announcement a moment to go out.
        std::thread::sleep(Duration::from_millis(50));
        self.inner.stop.store(true, Ordering::Relaxed);
        let mut threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.inner.threads.lock().expect("threads lock poisoned"));
        // Every thread looks at the stop flag at least every 100 ms, except a worker in
        // the middle of a task: that one is left to finish on its own.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !threads.is_empty() && Instant::now() < deadline {
            let (done, rest): (Vec<_>, Vec<_>) = threads.into_iter().partition(|h| h.is_finished());
            for h in done {
                let _ = h.join();
            }
            threads = rest;
            if !threads.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if !threads.is_empty() {
            tracing::warn!(
                "node {:016x} shut down with {} task(s) still running",
                self.inner.id,
                threads.len()
            );
        }
        self.inner
            .conns
            .lock()
            .expect("conns lock poisoned")
            .clear();
        self.inner
            .incoming
            .lock()
            .expect("incoming lock poisoned")
            .clear();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}
