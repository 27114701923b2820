//! RDMA verbs and the RDMA connection manager (librdmacm), through rdma-sys.
//!
//! Every object here owns one verbs or rdma_cm object and releases it on drop, in the
//! order the verbs require: a queue pair before its completion queue, a memory region
//! before the memory it covers (each [`Mr`] keeps an `Arc` to that memory), a
//! connection id before its event channel. The rdma engine keeps these objects behind
//! one lock; the raw pointers are only touched through the methods below.

use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::os::raw::{c_int, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdma_sys as rs;

use crate::sys::mem::Mem;
use crate::sys::net::RawAddr;

/// rdma_cm option level and name for the local ACK timeout (`rdma_cma.h`).
const RDMA_OPTION_ID: c_int = 0;
const RDMA_OPTION_ID_ACK_TIMEOUT: c_int = 3;

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Names of the RDMA devices present (empty without any).
pub(crate) fn device_names() -> Vec<String> {
    let mut n: c_int = 0;
    // SAFETY: ibv_get_device_list writes the count into a live int and returns a list we
    // free below; a null return means no devices (or no RDMA subsystem).
    let list = unsafe { rs::ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds `n` valid device pointers until it is freed.
        let name = unsafe { rs::ibv_get_device_name(*list.add(i)) };
        if !name.is_null() {
            // SAFETY: ibv_get_device_name returns a NUL-terminated string owned by the
            // device, alive while the list is.
            out.push(
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { rs::ibv_free_device_list(list) };
    out
}

/// The text of a work completion status.
pub(crate) fn wc_status_str(status: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    let p = unsafe { rs::ibv_wc_status_str(status) };
    if p.is_null() {
        return format!("status {status}");
    }
    // SAFETY: a static NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn set_nonblocking(fd: c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with no pointers.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(os_err("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

fn from_sockaddr(p: &libc::sockaddr) -> Option<SocketAddr> {
    let mut r = RawAddr::empty();
    let len = match i32::from(p.sa_family) {
        libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
        _ => return None,
    };
    // SAFETY: rdma_cm keeps each address of an id in a sockaddr_storage, so `len` bytes
    // of the family it names are readable; the destination is our own storage.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (p as *const libc::sockaddr).cast::<u8>(),
            r.as_mut_ptr().cast::<u8>(),
            len,
        )
    };
    r.set_len(len as libc::socklen_t);
    r.socket_addr()
}

/// The rdma_cm event channel of an engine: every connection id reports on it.
#[derive(Debug)]
pub(crate) struct EventChannel(NonNull<rs::rdma_event_channel>);

// SAFETY: the channel is a descriptor plus a heap struct librdmacm never touches behind
// our back; the engine uses it under its lock.
unsafe impl Send for EventChannel {}
// SAFETY: as above; `fd` only reads a field.
unsafe impl Sync for EventChannel {}

/// One connection-manager event, copied out and acknowledged.
#[derive(Debug)]
pub(crate) struct CmEvent {
    pub(crate) kind: u32,
    pub(crate) status: i32,
    /// The id the event is about, as a number to look it up by ([`CmId::key`]).
    pub(crate) id: usize,
    /// For a connect request: the new id, ours from now on.
    pub(crate) new_id: Option<CmId>,
    pub(crate) private: Vec<u8>,
}

impl EventChannel {
    pub(crate) fn new() -> io::Result<EventChannel> {
        // SAFETY: no arguments; the result is checked.
        let ch = unsafe { rs::rdma_create_event_channel() };
        let ch = NonNull::new(ch).ok_or_else(|| {
            let e = io::Error::last_os_error();
            io::Error::new(
                e.kind(),
                format!(
                    "rdma_create_event_channel: {e} (is /dev/infiniband/rdma_cm there? \
                     `modprobe rdma_ucm` creates it)"
                ),
            )
        })?;
        let c = EventChannel(ch);
        set_nonblocking(c.fd())?;
        Ok(c)
    }

    pub(crate) fn fd(&self) -> c_int {
        // SAFETY: a live channel; reading its descriptor field.
        unsafe { (*self.0.as_ptr()).fd }
    }

    /// The next event, if one is waiting. Private data is copied and the event
    /// acknowledged before returning, so ids can be destroyed freely afterwards.
    pub(crate) fn next(&self) -> io::Result<Option<CmEvent>> {
        let mut ev: *mut rs::rdma_cm_event = ptr::null_mut();
        // SAFETY: a live channel and a pointer slot to fill; non-blocking descriptor.
        if unsafe { rs::rdma_get_cm_event(self.0.as_ptr(), &mut ev) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(io::Error::new(e.kind(), format!("rdma_get_cm_event: {e}")));
        }
        // SAFETY: rdma_get_cm_event succeeded, so `ev` points at an event we own until
        // we acknowledge it; the connection parameters are the union member for RC ids.
        let out = unsafe {
            let e = &*ev;
            let conn = &e.param.conn;
            let private = if conn.private_data.is_null() || conn.private_data_len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(
                    conn.private_data.cast::<u8>(),
                    conn.private_data_len as usize,
                )
                .to_vec()
            };
            let new_id = if e.event == rs::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                NonNull::new(e.id).map(|id| CmId { id, has_qp: false })
            } else {
                None
            };
            CmEvent {
                kind: e.event,
                status: e.status,
                id: e.id as usize,
                new_id,
                private,
            }
        };
        // SAFETY: acknowledging the event we got, once.
        unsafe { rs::rdma_ack_cm_event(ev) };
        Ok(Some(out))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel was destroyed before (the engine drops its
        // connections first); the channel is destroyed once.
        unsafe { rs::rdma_destroy_event_channel(self.0.as_ptr()) }
    }
}

/// An rdma_cm connection id, with its queue pair once created.
#[derive(Debug)]
pub(crate) struct CmId {
    id: NonNull<rs::rdma_cm_id>,
    has_qp: bool,
}

// SAFETY: ids are used by one thread at a time (the engine lock); librdmacm allows ids
// to move between threads.
unsafe impl Send for CmId {}

/// What a queue pair was created with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QpCaps {
    pub(crate) send_wr: u32,
    pub(crate) recv_wr: u32,
    pub(crate) inline: u32,
}

impl CmId {
    /// A new RC (RDMA_PS_TCP) id reporting to `ch`.
    pub(crate) fn new(ch: &EventChannel) -> io::Result<CmId> {
        let mut id: *mut rs::rdma_cm_id = ptr::null_mut();
        // SAFETY: a live channel, a slot to fill, no context pointer.
        let r = unsafe {
            rs::rdma_create_id(
                ch.0.as_ptr(),
                &mut id,
                ptr::null_mut(),
                rs::rdma_port_space::RDMA_PS_TCP,
            )
        };
        if r != 0 {
            return Err(os_err("rdma_create_id"));
        }
        Ok(CmId {
            id: NonNull::new(id).ok_or_else(|| io::Error::other("rdma_create_id: null id"))?,
            has_qp: false,
        })
    }

    fn raw(&self) -> *mut rs::rdma_cm_id {
        self.id.as_ptr()
    }

    /// A number naming this id (the one events carry in [`CmEvent::id`]).
    pub(crate) fn key(&self) -> usize {
        self.id.as_ptr() as usize
    }

    pub(crate) fn bind(&self, a: &SocketAddr) -> io::Result<()> {
        let mut ra = RawAddr::from_socket_addr(a);
        // SAFETY: a live id and a sockaddr of the right family in storage we own.
        if unsafe { rs::rdma_bind_addr(self.raw(), ra.as_mut_ptr()) } != 0 {
            return Err(os_err("rdma_bind_addr"));
        }
        Ok(())
    }

    pub(crate) fn listen(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: a live, bound id.
        if unsafe { rs::rdma_listen(self.raw(), backlog) } != 0 {
            return Err(os_err("rdma_listen"));
        }
        Ok(())
    }

    pub(crate) fn resolve_addr(&self, dst: &SocketAddr, timeout_ms: i32) -> io::Result<()> {
        let mut ra = RawAddr::from_socket_addr(dst);
        // SAFETY: a live id; the destination in storage we own (copied by the call).
        let r = unsafe {
            rs::rdma_resolve_addr(self.raw(), ptr::null_mut(), ra.as_mut_ptr(), timeout_ms)
        };
        if r != 0 {
            return Err(os_err("rdma_resolve_addr"));
        }
        Ok(())
    }

    pub(crate) fn resolve_route(&self, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: a live id with a resolved address.
        if unsafe { rs::rdma_resolve_route(self.raw(), timeout_ms) } != 0 {
            return Err(os_err("rdma_resolve_route"));
        }
        Ok(())
    }

    /// Lower the local ACK timeout (4.096 µs × 2^v) so a vanished peer is noticed soon.
    pub(crate) fn set_ack_timeout(&self, v: u8) -> io::Result<()> {
        let mut v = v;
        // SAFETY: a live id; the option value is one byte we own.
        let r = unsafe {
            rs::rdma_set_option(
                self.raw(),
                RDMA_OPTION_ID,
                RDMA_OPTION_ID_ACK_TIMEOUT,
                (&mut v as *mut u8).cast(),
                1,
            )
        };
        if r != 0 {
            return Err(os_err("rdma_set_option(ACK_TIMEOUT)"));
        }
        Ok(())
    }

    fn verbs(&self) -> *mut rs::ibv_context {
        // SAFETY: a live id; reading a field rdma_cm set.
        unsafe { (*self.raw()).verbs }
    }

    /// A number naming the device the id is bound to (`None` before address
    /// resolution).
    pub(crate) fn device_key(&self) -> Option<usize> {
        let v = self.verbs();
        (!v.is_null()).then_some(v as usize)
    }

    /// The device name and port of the id.
    pub(crate) fn device(&self) -> String {
        let ctx = self.verbs();
        if ctx.is_null() {
            return "?".into();
        }
        // SAFETY: a live context from rdma_cm; its device pointer and name live as long.
        let name = unsafe { rs::ibv_get_device_name((*ctx).device) };
        let name = if name.is_null() {
            "?".into()
        } else {
            // SAFETY: a NUL-terminated name owned by the device.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        // SAFETY: a live id.
        format!("{name} port {}", unsafe { (*self.raw()).port_num })
    }

    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: a live id; rdma_get_local_addr returns a reference into it.
        from_sockaddr(unsafe { rs::rdma_get_local_addr(&*self.raw()) })
    }

    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as above.
        from_sockaddr(unsafe { rs::rdma_get_peer_addr(&*self.raw()) })
    }

    /// Create the RC queue pair of this id on `pd`, with `cq` for both directions.
    pub(crate) fn create_qp(&mut self, pd: &Pd, cq: &Cq, want: QpCaps) -> io::Result<QpCaps> {
        // SAFETY: a plain C struct; zero is a valid start for every field.
        let mut attr: rs::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.raw();
        attr.recv_cq = cq.raw();
        attr.qp_type = rs::ibv_qp_type::IBV_QPT_RC;
        attr.cap = rs::ibv_qp_cap {
            max_send_wr: want.send_wr,
            max_recv_wr: want.recv_wr,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: want.inline,
        };
        // SAFETY: a live id whose device is the PD's and CQ's; attr is ours and the call
        // writes the granted capabilities back into it.
        if unsafe { rs::rdma_create_qp(self.raw(), pd.raw(), &mut attr) } != 0 {
            return Err(os_err("rdma_create_qp"));
        }
        self.has_qp = true;
        Ok(QpCaps {
            send_wr: attr.cap.max_send_wr,
            recv_wr: attr.cap.max_recv_wr,
            inline: attr.cap.max_inline_data,
        })
    }

    fn qp(&self) -> *mut rs::ibv_qp {
        // SAFETY: a live id.
        unsafe { (*self.raw()).qp }
    }

    /// The queue pair's state, for error messages.
    pub(crate) fn qp_state(&self) -> &'static str {
        let qp = self.qp();
        if qp.is_null() {
            return "no QP";
        }
        // SAFETY: a live QP; `state` is the last state libibverbs saw.
        match unsafe { (*qp).state } {
            rs::ibv_qp_state::IBV_QPS_RESET => "RESET",
            rs::ibv_qp_state::IBV_QPS_INIT => "INIT",
            rs::ibv_qp_state::IBV_QPS_RTR => "RTR",
            rs::ibv_qp_state::IBV_QPS_RTS => "RTS",
            rs::ibv_qp_state::IBV_QPS_SQD => "SQD",
            rs::ibv_qp_state::IBV_QPS_SQE => "SQE",
            rs::ibv_qp_state::IBV_QPS_ERR => "ERR",
            _ => "unknown",
        }
    }

    fn conn_param(private: &[u8]) -> rs::rdma_conn_param {
        // SAFETY: a plain C struct; zero is valid for every field.
        let mut p: rs::rdma_conn_param = unsafe { std::mem::zeroed() };
        p.private_data = private.as_ptr().cast();
        p.private_data_len = private.len().min(255) as u8;
        p.responder_resources = 16;
        p.initiator_depth = 16;
        p.retry_count = 7;
        // Receiver not ready: retry forever. A receiver out of posted buffers holds the
        // sender back (flow control); a dead peer is found by the ACK timeout instead.
        p.rnr_retry_count = 7;
        p
    }

    pub(crate) fn connect(&self, private: &[u8]) -> io::Result<()> {
        let mut p = Self::conn_param(private);
        // SAFETY: a live id with a QP; the private data outlives the call (copied).
        if unsafe { rs::rdma_connect(self.raw(), &mut p) } != 0 {
            return Err(os_err("rdma_connect"));
        }
        Ok(())
    }

    pub(crate) fn accept(&self, private: &[u8]) -> io::Result<()> {
        let mut p = Self::conn_param(private);
        // SAFETY: as for connect.
        if unsafe { rs::rdma_accept(self.raw(), &mut p) } != 0 {
            return Err(os_err("rdma_accept"));
        }
        Ok(())
    }

    pub(crate) fn reject(&self, private: &[u8]) {
        // SAFETY: a live id of a connect request; the private data is copied.
        unsafe {
            rs::rdma_reject(
                self.raw(),
                private.as_ptr().cast(),
                private.len().min(148) as u8,
            )
        };
    }

    pub(crate) fn disconnect(&self) {
        // SAFETY: a live id; disconnecting twice or before connecting is harmless.
        unsafe { rs::rdma_disconnect(self.raw()) };
    }

    /// Post a chain of send work requests.
    #[inline(always)]
    pub(crate) fn post_send(&self, wrs: &[SendWr]) -> io::Result<()> {
        match wrs {
            [] => Ok(()),
            // The common case of one request, with nothing allocated.
            [one] => {
                let mut sge = raw_sge(one);
                let mut raw = raw_wr(one, &mut sge);
                self.post_raw(&mut raw)
            }
            _ => self.post_chain(wrs),
        }
    }

    /// A chain of two or more: the SGEs and requests in vectors, linked.
    #[inline(never)]
    fn post_chain(&self, wrs: &[SendWr]) -> io::Result<()> {
        let mut sges: Vec<rs::ibv_sge> = wrs.iter().map(raw_sge).collect();
        let mut raw: Vec<rs::ibv_send_wr> = wrs
            .iter()
            .zip(sges.iter_mut())
            .map(|(w, sge)| raw_wr(w, sge))
            .collect();
        for i in 0..raw.len() - 1 {
            let next: *mut rs::ibv_send_wr = &mut raw[i + 1];
            raw[i].next = next;
        }
        self.post_raw(&mut raw[0])
    }

    #[inline(always)]
    fn post_raw(&self, first: &mut rs::ibv_send_wr) -> io::Result<()> {
        let mut bad: *mut rs::ibv_send_wr = ptr::null_mut();
        // SAFETY: a live QP; the chain and its SGEs live until the call returns, which is
        // all the verbs need (inline data is copied, other SGEs name registered memory
        // the engine keeps alive until the completion).
        let r = unsafe { rs::ibv_post_send(self.qp(), first, &mut bad) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    /// Post receive buffers: `(wr_id, addr, len, lkey)` each.
    pub(crate) fn post_recv(&self, bufs: &[(u64, u64, u32, u32)]) -> io::Result<()> {
        if bufs.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<rs::ibv_sge> = bufs
            .iter()
            .map(|&(_, addr, length, lkey)| rs::ibv_sge { addr, length, lkey })
            .collect();
        let mut raw: Vec<rs::ibv_recv_wr> = bufs
            .iter()
            .map(|&(wr_id, ..)| rs::ibv_recv_wr {
                wr_id,
                next: ptr::null_mut(),
                sg_list: ptr::null_mut(),
                num_sge: 1,
            })
            .collect();
        for (i, r) in raw.iter_mut().enumerate() {
            r.sg_list = &mut sges[i];
        }
        for i in 0..raw.len() - 1 {
            let next: *mut rs::ibv_recv_wr = &mut raw[i + 1];
            raw[i].next = next;
        }
        let mut bad: *mut rs::ibv_recv_wr = ptr::null_mut();
        // SAFETY: a live QP; the chain lives through the call; each buffer is registered
        // memory the connection keeps until its QP is destroyed.
        let r = unsafe { rs::ibv_post_recv(self.qp(), raw.as_mut_ptr(), &mut bad) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the QP (if any) and then the id are destroyed once. The engine drops a
        // connection's id before its CQ and its buffers' MRs (field order).
        unsafe {
            if self.has_qp {
                rs::rdma_destroy_qp(self.raw());
            }
            rs::rdma_destroy_id(self.raw());
        }
    }
}

/// Where a send work request goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Remote {
    None,
    Rdma {
        addr: u64,
        rkey: u32,
    },
    Atomic {
        addr: u64,
        rkey: u32,
        compare_add: u64,
        swap: u64,
    },
}

/// One send work request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendWr {
    pub(crate) wr_id: u64,
    pub(crate) opcode: u32,
    pub(crate) flags: u32,
    pub(crate) sge: Sge,
    pub(crate) remote: Remote,
}

/// A local buffer of a work request: address, length, registration key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sge {
    pub(crate) addr: u64,
    pub(crate) length: u32,
    pub(crate) lkey: u32,
}

pub(crate) const OP_WRITE: u32 = rs::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
pub(crate) const OP_READ: u32 = rs::ibv_wr_opcode::IBV_WR_RDMA_READ;
pub(crate) const OP_SEND: u32 = rs::ibv_wr_opcode::IBV_WR_SEND;
pub(crate) const OP_CAS: u32 = rs::ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
pub(crate) const OP_FAA: u32 = rs::ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
pub(crate) const SIGNALED: u32 = rs::ibv_send_flags::IBV_SEND_SIGNALED.0;
pub(crate) const INLINE: u32 = rs::ibv_send_flags::IBV_SEND_INLINE.0;
pub(crate) const WC_SUCCESS: u32 = rs::ibv_wc_status::IBV_WC_SUCCESS;
pub(crate) const WC_FLUSH: u32 = rs::ibv_wc_status::IBV_WC_WR_FLUSH_ERR;
pub(crate) const WC_REM_ACCESS: u32 = rs::ibv_wc_status::IBV_WC_REM_ACCESS_ERR;

fn raw_sge(w: &SendWr) -> rs::ibv_sge {
    rs::ibv_sge {
        addr: w.sge.addr,
        length: w.sge.length,
        lkey: w.sge.lkey,
    }
}

/// The verbs form of `w`, its buffer described by `sge` (which must outlive the post).
fn raw_wr(w: &SendWr, sge: &mut rs::ibv_sge) -> rs::ibv_send_wr {
    // SAFETY: a plain C struct; zero is valid for every field (null pointers, no flags).
    let mut r: rs::ibv_send_wr = unsafe { std::mem::zeroed() };
    r.wr_id = w.wr_id;
    r.opcode = w.opcode;
    r.send_flags = w.flags;
    r.num_sge = i32::from(w.sge.length != 0);
    r.sg_list = sge;
    match w.remote {
        Remote::None => {}
        Remote::Rdma { addr, rkey } => {
            r.wr.rdma = rs::rdma_t {
                remote_addr: addr,
                rkey,
            }
        }
        Remote::Atomic {
            addr,
            rkey,
            compare_add,
            swap,
        } => {
            r.wr.atomic = rs::atomic_t {
                remote_addr: addr,
                compare_add,
                swap,
                rkey,
            }
        }
    }
    r
}

pub(crate) fn sge(addr: u64, length: u32, lkey: u32) -> Sge {
    Sge { addr, length, lkey }
}

/// A work completion, copied out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wc {
    pub(crate) wr_id: u64,
    pub(crate) status: u32,
    pub(crate) byte_len: u32,
    pub(crate) vendor_err: u32,
}

/// Access rights of a registration.
pub(crate) mod access {
    use rdma_sys::ibv_access_flags as f;
    pub(crate) const LOCAL_WRITE: u32 = f::IBV_ACCESS_LOCAL_WRITE.0;
    pub(crate) const REMOTE_WRITE: u32 = f::IBV_ACCESS_REMOTE_WRITE.0;
    pub(crate) const REMOTE_READ: u32 = f::IBV_ACCESS_REMOTE_READ.0;
    pub(crate) const REMOTE_ATOMIC: u32 = f::IBV_ACCESS_REMOTE_ATOMIC.0;
}

/// A device context's per-engine resources: protection domain and completion channel.
#[derive(Debug)]
pub(crate) struct Pd {
    pd: NonNull<rs::ibv_pd>,
    ctx: *mut rs::ibv_context,
}

// SAFETY: verbs objects may be used from any thread; the engine serialises use.
unsafe impl Send for Pd {}

impl Pd {
    /// A protection domain on the device `id` is bound to. rdma_cm keeps the device
    /// open as long as the process has ids, and the engine drops its PDs before its
    /// last id's event channel.
    pub(crate) fn for_id(id: &CmId) -> io::Result<Pd> {
        let ctx = id.verbs();
        if ctx.is_null() {
            return Err(io::Error::other("the rdma_cm id is bound to no device"));
        }
        // SAFETY: a live device context from the id.
        let pd = unsafe { rs::ibv_alloc_pd(ctx) };
        Ok(Pd {
            pd: NonNull::new(pd).ok_or_else(|| os_err("ibv_alloc_pd"))?,
            ctx,
        })
    }

    pub(crate) fn raw(&self) -> *mut rs::ibv_pd {
        self.pd.as_ptr()
    }

    fn ctx(&self) -> *mut rs::ibv_context {
        self.ctx
    }

    /// The device's atomic capability: whether RDMA atomics are offered at all.
    pub(crate) fn atomics_supported(&self) -> bool {
        // SAFETY: a plain C struct filled by the call.
        let mut attr: rs::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a struct we own.
        let r = unsafe { rs::ibv_query_device(self.ctx, &mut attr) };
        r == 0 && attr.atomic_cap != rs::ibv_atomic_cap::IBV_ATOMIC_NONE
    }

    /// Register `len` bytes of `mem` at `off` with `access`. The registration keeps the
    /// memory alive until it is dropped.
    pub(crate) fn reg(
        &self,
        mem: &Arc<Mem>,
        off: usize,
        len: usize,
        access: u32,
    ) -> io::Result<Mr> {
        if len == 0 || off.checked_add(len).is_none_or(|e| e > mem.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "registration outside the memory",
            ));
        }
        let addr = mem.ptr_at(off);
        // SAFETY: a live PD; [addr, addr+len) lies inside `mem`, which the Mr keeps alive
        // (an `Arc`) until it deregisters.
        let mr = unsafe { rs::ibv_reg_mr(self.raw(), addr.cast::<c_void>(), len, access as c_int) };
        match NonNull::new(mr) {
            Some(mr) => Ok(Mr {
                mr,
                _mem: mem.clone(),
            }),
            None => {
                let e = io::Error::last_os_error();
                let hint = if matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EPERM)) {
                    " (the locked-memory limit is too low for this registration: raise it \
                     with `ulimit -l unlimited`, LimitMEMLOCK= in a systemd unit, or \
                     /etc/security/limits.conf)"
                } else {
                    ""
                };
                Err(io::Error::new(
                    e.kind(),
                    format!("ibv_reg_mr of {len} bytes: {e}{hint}"),
                ))
            }
        }
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every QP and MR of the PD is gone (the engine drops them first).
        unsafe { rs::ibv_dealloc_pd(self.raw()) };
    }
}

/// A memory registration.
#[derive(Debug)]
pub(crate) struct Mr {
    mr: NonNull<rs::ibv_mr>,
    _mem: Arc<Mem>,
}

// SAFETY: an MR is an immutable handle once created.
unsafe impl Send for Mr {}

impl Mr {
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: a live MR; reading its key.
        unsafe { (*self.mr.as_ptr()).lkey }
    }
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr.as_ptr()).rkey }
    }
    pub(crate) fn addr(&self) -> u64 {
        // SAFETY: as above.
        unsafe { (*self.mr.as_ptr()).addr as u64 }
    }

    /// Offset in the memory of an address inside the registration.
    fn mem_offset(&self, addr: u64, len: usize) -> usize {
        let base = self._mem.ptr_at(0) as u64;
        let off = addr.wrapping_sub(base) as usize;
        debug_assert!(off + len <= self._mem.len());
        off
    }

    /// Copy `data` into the registered memory at `addr` (a buffer of ours no work
    /// request is using).
    pub(crate) fn write_at(&self, addr: u64, data: &[u8]) {
        let off = self.mem_offset(addr, data.len());
        let _ = self._mem.copy_in(off, data);
    }

    /// Copy `len` bytes out of the registered memory at `addr`.
    pub(crate) fn read_at(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let off = self.mem_offset(addr, len);
        let _ = self._mem.copy_out(off, &mut v);
        v
    }

    /// Whether this registration is the last holder of its memory (a cache entry that
    /// can go).
    pub(crate) fn only_holder(&self) -> bool {
        Arc::strong_count(&self._mem) == 1
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: deregistered once, before `_mem` (a later field) is released.
        unsafe { rs::ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A completion channel (for sleeping until a CQ has work).
#[derive(Debug)]
pub(crate) struct CompChannel(NonNull<rs::ibv_comp_channel>);

// SAFETY: a descriptor and a struct owned by libibverbs; used under the engine lock.
unsafe impl Send for CompChannel {}

impl CompChannel {
    /// A completion channel on the device of `pd`.
    pub(crate) fn for_pd(pd: &Pd) -> io::Result<CompChannel> {
        // SAFETY: the PD's context is live while the PD is.
        let ch = unsafe { rs::ibv_create_comp_channel(pd.ctx()) };
        let ch = CompChannel(NonNull::new(ch).ok_or_else(|| os_err("ibv_create_comp_channel"))?);
        set_nonblocking(ch.fd())?;
        Ok(ch)
    }

    pub(crate) fn fd(&self) -> c_int {
        // SAFETY: a live channel.
        unsafe { (*self.0.as_ptr()).fd }
    }

    /// Consume pending completion events (each names a CQ to acknowledge).
    pub(crate) fn drain(&self) {
        loop {
            let mut cq: *mut rs::ibv_cq = ptr::null_mut();
            let mut ctx: *mut c_void = ptr::null_mut();
            // SAFETY: a live non-blocking channel and slots to fill.
            if unsafe { rs::ibv_get_cq_event(self.0.as_ptr(), &mut cq, &mut ctx) } != 0 {
                return;
            }
            // SAFETY: the event named a live CQ of this channel; acknowledged once.
            unsafe { rs::ibv_ack_cq_events(cq, 1) };
        }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: every CQ on the channel is destroyed first.
        unsafe { rs::ibv_destroy_comp_channel(self.0.as_ptr()) };
    }
}

/// A completion queue.
#[derive(Debug)]
pub(crate) struct Cq(NonNull<rs::ibv_cq>);

// SAFETY: used under the engine lock only.
unsafe impl Send for Cq {}

impl Cq {
    pub(crate) fn new(pd: &Pd, ch: &CompChannel, entries: i32) -> io::Result<Cq> {
        // SAFETY: a live context and channel of the same device.
        let cq = unsafe { rs::ibv_create_cq(pd.ctx(), entries, ptr::null_mut(), ch.0.as_ptr(), 0) };
        Ok(Cq(NonNull::new(cq).ok_or_else(|| os_err("ibv_create_cq"))?))
    }

    fn raw(&self) -> *mut rs::ibv_cq {
        self.0.as_ptr()
    }

    /// Poll up to `max` (at most 32) completions into `out`.
    #[inline(always)]
    pub(crate) fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize {
        let mut wc = std::mem::MaybeUninit::<[rs::ibv_wc; 32]>::uninit();
        let n = max.min(32) as i32;
        // SAFETY: a live CQ and room for `n` completions; the provider writes the first
        // `got` entries whole.
        let got = unsafe { rs::ibv_poll_cq(self.raw(), n, wc.as_mut_ptr().cast()) };
        if got <= 0 {
            return 0;
        }
        // SAFETY: entries 0..got were written by ibv_poll_cq (plain data).
        let wc =
            unsafe { std::slice::from_raw_parts(wc.as_ptr().cast::<rs::ibv_wc>(), got as usize) };
        for w in wc {
            out.push(Wc {
                wr_id: w.wr_id,
                status: w.status,
                byte_len: w.byte_len,
                vendor_err: w.vendor_err,
            });
        }
        got as usize
    }

    /// Ask for an event on the channel at the next completion.
    pub(crate) fn arm(&self) {
        // SAFETY: a live CQ.
        unsafe { rs::ibv_req_notify_cq(self.raw(), 0) };
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: the QP using it was destroyed first; its events were acknowledged by
        // `CompChannel::drain` (unacknowledged ones would make this block).
        unsafe { rs::ibv_destroy_cq(self.raw()) };
    }
}
