//! Reading connections: who reads each connection, and where requests run.
//!
//! A thread hand-off costs a wake-up of another thread, tens of microseconds on a busy
//! machine, so the request path avoids them:
//!
//! * **Owner side.** Each connection has one reader at a time, a pool worker running
//!   [`read_loop`]. A request is run by the reader that received it, on the spot.
//!   Before it starts, the connection is armed: the next message to arrive hands the
//!   reading over to another worker (leader/follower), so a long task never holds up
//!   the messages behind it (other requests, membership traffic). When no message comes
//!   in meanwhile, nothing else happens, and the reader goes back to reading.
//! * **Caller side.** A caller waiting for an answer reads the connection itself (one
//!   caller per connection at a time; the others get theirs through it or the reader),
//!   so the answer wakes the caller directly. The connection's reader is not woken for
//!   what the caller reads.
//!
//! Both rest on one waker per connection registered with the connection's inbox
//! ([`Link::on_message`]), called by the transport when a message arrives.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use pfs_transport::Connection;

use crate::error::RemoteError;
use crate::node::{Inner, POLL};

/// What a request yields, as the remote node reported it.
pub(crate) type Answer = std::result::Result<Vec<u8>, RemoteError>;

/// A connection of this node (opened by it, or accepted) and who reads it.
pub(crate) struct Link {
    pub(crate) conn: Arc<Connection>,
    /// Accepted from a peer (else opened by this node).
    pub(crate) incoming: bool,
    /// A caller waiting for an answer is reading the connection.
    leader: AtomicBool,
    reader: Mutex<Reader>,
    /// Registered with the connection's inbox by whoever reads it on the reader's
    /// behalf; calls [`Link::on_message`].
    waker: Waker,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("conn", &self.conn.id())
            .field("incoming", &self.incoming)
            .finish()
    }
}

/// The connection's reader.
struct Reader {
    /// Bumped at every hand-over: a reader of an older generation has been replaced.
    generation: u64,
    /// The reader's thread (while it reads).
    thread: Option<Thread>,
    /// The reader is running a request: the next message hands the reading over.
    busy: bool,
}

impl Reader {
    /// Start a new generation of reader; returns it.
    fn hand_over(&mut self) -> u64 {
        self.busy = false;
        self.thread = None;
        self.generation += 1;
        self.generation
    }
}

struct LinkWaker {
    link: Weak<Link>,
    inner: Weak<Inner>,
}

impl Wake for LinkWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(link) = self.link.upgrade() {
            link.on_message(&self.inner);
        }
    }
}

/// Wakes the thread that made it.
struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    /// This thread's waker (one per thread, so that registering it again replaces it).
    static THREAD_WAKER: Waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
}

impl Link {
    pub(crate) fn new(inner: &Arc<Inner>, conn: Arc<Connection>, incoming: bool) -> Arc<Link> {
        let inner = Arc::downgrade(inner);
        Arc::new_cyclic(|link| Link {
            conn,
            incoming,
            leader: AtomicBool::new(false),
            reader: Mutex::new(Reader {
                generation: 0,
                thread: None,
                busy: false,
            }),
            waker: Waker::from(Arc::new(LinkWaker {
                link: link.clone(),
                inner,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Reader> {
        self.reader.lock().expect("reader lock poisoned")
    }

    /// The next message if one is queued; otherwise `waker` is registered to be woken
    /// when one comes.
    fn poll(&self, waker: &Waker) -> Poll<pfs_transport::Result<Vec<u8>>> {
        let mut cx = Context::from_waker(waker);
        let mut next = self.conn.recv_async();
        Pin::new(&mut next).poll(&mut cx)
    }

    /// A message arrived (called by the transport, on its progress thread: keep it
    /// short). A leading caller was woken itself; otherwise wake the reader, or, if the
    /// reader is running a request, hand the reading over to another worker.
    fn on_message(self: &Arc<Self>, inner: &Weak<Inner>) {
        if self.leader.load(Ordering::SeqCst) {
            return;
        }
        let mut r = self.lock();
        if r.busy {
            let generation = r.hand_over();
            drop(r);
            if let Some(inner) = inner.upgrade() {
                inner.start_reader(self.clone(), generation, None);
            }
        } else if let Some(t) = r.thread.clone() {
            drop(r);
            t.unpark();
        }
    }

    /// The reader of `generation` is about to run a request: arm the hand-over (and
    /// hand over at once if a message is already waiting).
    fn begin_request(self: &Arc<Self>, inner: &Arc<Inner>, generation: u64) {
        {
            let mut r = self.lock();
            if r.generation != generation {
                return;
            }
            r.busy = true;
        }
        // Register the waker (a message that arrives from now on hands over), and look
        // for one that came before.
        if let Poll::Ready(Ok(m)) = self.poll(&self.waker) {
            let mut r = self.lock();
            if r.generation == generation && r.busy {
                let g = r.hand_over();
                drop(r);
                inner.start_reader(self.clone(), g, Some(m));
            } else {
                // Handed over already: whoever reads now did not get this one.
                drop(r);
                let (i, link) = (inner.clone(), self.clone());
                if let Err(e) = inner.run_now(Box::new(move || {
                    i.handle(&link, &m, None);
                })) {
                    tracing::warn!("a message from {} dropped: {e}", self.conn.peer_addr());
                }
            }
        }
    }

    /// The reader of `generation` finished its request: whether it still reads the
    /// connection (no message came in meanwhile).
    fn end_request(&self, generation: u64) -> bool {
        let mut r = self.lock();
        if r.generation == generation {
            r.busy = false;
            true
        } else {
            false
        }
    }

    /// Become the reader of this connection while waiting for an answer, if no other
    /// caller is.
    pub(crate) fn lead<'a>(self: &'a Arc<Self>, inner: &'a Arc<Inner>) -> Option<Lead<'a>> {
        self.leader
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Lead { link: self, inner })
    }
}

/// A caller reading its connection while it waits; dropping it gives the reading
/// back to the connection's reader.
pub(crate) struct Lead<'a> {
    link: &'a Arc<Link>,
    inner: &'a Arc<Inner>,
}

impl Lead<'_> {
    /// The next message, or `Pending` with this thread registered to be unparked when
    /// one comes.
    pub(crate) fn poll(&self) -> Poll<pfs_transport::Result<Vec<u8>>> {
        THREAD_WAKER.with(|w| self.link.poll(w))
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let link = self.link;
        link.leader.store(false, Ordering::SeqCst);
        // From now on, messages wake the reader; one that came in between is handled
        // here.
        loop {
            match link.poll(&link.waker) {
                Poll::Ready(Ok(m)) => {
                    self.inner.handle(link, &m, None);
                }
                Poll::Ready(Err(_)) => {
                    // Closed: let the reader see it and clean up.
                    let reader = link.lock().thread.clone();
                    if let Some(t) = reader {
                        t.unpark();
                    }
                    break;
                }
                Poll::Pending => break,
            }
        }
    }
}

/// Poll `f` with the current thread's waker: `Pending` leaves the thread registered to
/// be unparked when `f` can make progress.
pub(crate) fn poll_here<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    THREAD_WAKER.with(|w| Pin::new(f).poll(&mut Context::from_waker(w)))
}

/// Where a caller's answer is put, by whichever thread reads it.
pub(crate) struct Slot {
    answer: Mutex<Option<Answer>>,
    thread: Thread,
}

impl Slot {
    /// A slot for the current thread.
    pub(crate) fn new() -> Slot {
        Slot {
            answer: Mutex::new(None),
            thread: std::thread::current(),
        }
    }

    /// The answer, if it came.
    pub(crate) fn take(&self) -> Option<Answer> {
        self.answer.lock().expect("slot lock poisoned").take()
    }

    /// Deliver the answer (the first one counts) and wake its caller.
    pub(crate) fn put(&self, a: Answer) {
        {
            let mut g = self.answer.lock().expect("slot lock poisoned");
            if g.is_none() {
                *g = Some(a);
            }
        }
        if self.thread.id() != std::thread::current().id() {
            self.thread.unpark();
        }
    }
}

impl Inner {
    /// Start a reader of generation `generation` for `link`, first handling `first`.
    pub(crate) fn start_reader(
        self: &Arc<Self>,
        link: Arc<Link>,
        generation: u64,
        first: Option<Vec<u8>>,
    ) {
        let (inner, l) = (self.clone(), link.clone());
        let started = self.run_now(Box::new(move || read_loop(inner, l, generation, first)));
        if let Err(e) = started
            && !self.stop.load(Ordering::Relaxed)
        {
            // Nobody could read it: better an error for the peer than a hang.
            tracing::error!(
                "closing the connection to {}: no thread to read it: {e}",
                link.conn.peer_addr()
            );
            link.conn.close();
        }
    }

    /// Run a request received by the reader of `generation` here and now (see the
    /// module's documentation). Returns whether this thread still reads the connection.
    pub(crate) fn serve_inline(
        self: &Arc<Self>,
        link: &Arc<Link>,
        generation: u64,
        id: u64,
        req: crate::wire::Request,
    ) -> bool {
        link.begin_request(self, generation);
        let r = self.serve(req);
        self.running.fetch_sub(1, Ordering::AcqRel);
        crate::node::respond(&link.conn, id, r);
        link.end_request(generation)
    }
}

/// Counts a worker as reading a connection while it lives.
struct Reading<'a>(&'a Inner);

impl<'a> Reading<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.pool.readers.fetch_add(1, Ordering::AcqRel);
        Reading(inner)
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.pool.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Read `link` as its reader of generation `generation` until the connection closes,
/// the node stops, or the reading is handed over.
fn read_loop(inner: Arc<Inner>, link: Arc<Link>, generation: u64, first: Option<Vec<u8>>) {
    {
        let mut r = link.lock();
        if r.generation != generation {
            return;
        }
        r.thread = Some(std::thread::current());
    }
    let _counted = Reading::new(&inner);
    if let Some(m) = first
        && !inner.handle(&link, &m, Some(generation))
    {
        return;
    }
    while !inner.stop.load(Ordering::Relaxed) {
        match link.poll(&link.waker) {
            Poll::Ready(Ok(m)) => {
                if !inner.handle(&link, &m, Some(generation)) {
                    return;
                }
            }
            Poll::Ready(Err(_)) => break,
            Poll::Pending => std::thread::park_timeout(POLL),
        }
    }
    {
        let mut r = link.lock();
        if r.generation == generation {
            r.thread = None;
        }
    }
    inner.forget_link(&link);
}
