//! Completion handles, bounded mailboxes, and waiting on them.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::backend::Engine;
use crate::config::{Progress, WaitMode};
use crate::error::{Error, Result};

/// Threads and tasks waiting for a state change.
#[derive(Debug, Default)]
pub(crate) struct Notify {
    has_waiters: AtomicBool,
    waiters: Mutex<(Vec<Thread>, Vec<Waker>)>,
}

impl Notify {
    /// Wake everyone registered. Call after publishing the state change.
    #[inline]
    pub(crate) fn wake_all(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.has_waiters.load(Ordering::SeqCst) {
            self.wake_registered();
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_registered(&self) {
        let (threads, wakers) = {
            let mut w = self.waiters.lock().expect("waiter lock poisoned");
            self.has_waiters.store(false, Ordering::SeqCst);
            (std::mem::take(&mut w.0), std::mem::take(&mut w.1))
        };
        for t in threads {
            t.unpark();
        }
        for w in wakers {
            w.wake();
        }
    }

    /// Forget every registration (a recycled completion starts with none).
    #[inline]
    fn clear(&mut self) {
        *self.has_waiters.get_mut() = false;
        let w = self.waiters.get_mut().unwrap_or_else(|p| p.into_inner());
        w.0.clear();
        w.1.clear();
    }

    pub(crate) fn register_thread(&self) {
        let mut w = self.waiters.lock().expect("waiter lock poisoned");
        let me = std::thread::current();
        if !w.0.iter().any(|t| t.id() == me.id()) {
            w.0.push(me);
        }
        self.has_waiters.store(true, Ordering::SeqCst);
    }

    pub(crate) fn register_waker(&self, waker: &Waker) {
        let mut w = self.waiters.lock().expect("waiter lock poisoned");
        if !w.1.iter().any(|x| x.will_wake(waker)) {
            w.1.push(waker.clone());
        }
        self.has_waiters.store(true, Ordering::SeqCst);
    }
}

/// How a waiting thread makes progress: who drives the engine, and spin or sleep. A
/// connection's driver also keeps the completions its operations' handles gave back.
#[derive(Clone)]
pub(crate) struct Driver {
    inner: Arc<DriverInner>,
    pub(crate) caller_drives: bool,
    pub(crate) busy: bool,
}

struct DriverInner {
    engines: Arc<[Arc<dyn Engine>]>,
    /// Completions no handle or engine holds any more, for the next operations: a small
    /// operation then allocates nothing.
    spare: Mutex<Vec<Arc<Completion>>>,
}

/// How many given-back completions a driver keeps.
const SPARE_MAX: usize = 64;

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("caller_drives", &self.caller_drives)
            .field("busy", &self.busy)
            .finish()
    }
}

impl Driver {
    pub(crate) fn new(
        engines: Arc<[Arc<dyn Engine>]>,
        progress: &Progress,
        wait: WaitMode,
    ) -> Driver {
        Driver {
            inner: Arc::new(DriverInner {
                engines,
                spare: Mutex::new(Vec::new()),
            }),
            caller_drives: *progress == Progress::Caller,
            busy: wait == WaitMode::BusyPoll,
        }
    }

    /// The engines this driver runs.
    #[inline]
    pub(crate) fn engines(&self) -> &[Arc<dyn Engine>] {
        &self.inner.engines
    }

    /// A pending completion: a given-back one if there is one (never waiting for the
    /// lock: another thread holding it means a fresh one).
    #[inline(always)]
    pub(crate) fn completion(&self) -> Arc<Completion> {
        self.inner
            .spare
            .try_lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default()
    }

    /// Keep `c` for a later operation if nothing else holds it.
    #[inline(always)]
    fn give_back(&self, c: &mut Arc<Completion>) {
        let Some(m) = Arc::get_mut(c) else {
            return;
        };
        m.reset();
        if let Ok(mut v) = self.inner.spare.try_lock()
            && v.len() < SPARE_MAX
        {
            v.push(Arc::clone(c));
        }
    }

    /// Drive every engine once.
    pub(crate) fn progress(&self) -> usize {
        self.engines().iter().map(|e| e.progress()).sum()
    }

    /// Wait until `ready()` returns `Some`, or `deadline` passes (`None` result).
    ///
    /// A caller-driven endpoint runs the engine from this thread: spinning in busy-poll
    /// mode, sleeping in the kernel between passes in blocking mode. With a progress
    /// thread, a busy-poll wait spins for up to [`SPIN_BEFORE_PARK`] (long enough for
    /// any round trip worth spinning for) and then parks, so that application threads
    /// waiting for rare events (an accept, a message) do not steal the cores the
    /// progress threads spin on; a blocking wait parks at once. The producer unparks.
    pub(crate) fn wait<T>(
        &self,
        notify: &Notify,
        deadline: Option<Instant>,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<Option<T>> {
        // Read lazily: a spinning caller may never need it, and where the clocksource
        // has no vDSO path (a VM's HPET) every read is a system call.
        let mut start = None;
        let mut spins = 0u32;
        loop {
            if let Some(v) = ready() {
                return Ok(Some(v));
            }
            // A caller spinning on its own engine reads the clock only when it must (a
            // deadline, or now and then for the health check): each read is a measurable
            // share of a busy-poll pass.
            spins = spins.wrapping_add(1);
            if self.caller_drives && self.busy && deadline.is_none() && !spins.is_multiple_of(4096)
            {
                self.progress();
                continue;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            for e in self.engines() {
                e.health()?;
            }
            let slice = deadline
                .map(|d| d - now)
                .unwrap_or(Duration::from_millis(100))
                .min(Duration::from_millis(100));
            if self.caller_drives {
                if self.progress() == 0 && !self.busy {
                    if let Some(v) = ready() {
                        return Ok(Some(v));
                    }
                    if let [one] = self.engines() {
                        one.park(slice);
                    } else {
                        std::thread::sleep(slice.min(Duration::from_micros(50)));
                    }
                }
            } else if self.busy && now.duration_since(*start.get_or_insert(now)) < SPIN_BEFORE_PARK
            {
                if spins.is_multiple_of(1024) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                notify.register_thread();
                if let Some(v) = ready() {
                    return Ok(Some(v));
                }
                std::thread::park_timeout(slice);
            }
        }
    }
}

/// How long a busy-poll wait on an endpoint with a progress thread spins before parking.
pub(crate) const SPIN_BEFORE_PARK: Duration = Duration::from_micros(200);

/// The shared state of one operation: the engine completes it, the [`Op`] that owns it
/// takes the result. A success is a value and a state change, no lock; an error goes
/// through a mutex.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    /// `PENDING` → `WRITING` (one completer won) → `OK`/`ERR` → `TAKEN`.
    state: AtomicU8,
    value: AtomicU64,
    error: Mutex<Option<Error>>,
    notify: Notify,
}

const PENDING: u8 = 0;
const WRITING: u8 = 1;
const OK: u8 = 2;
const ERR: u8 = 3;
const TAKEN: u8 = 4;

impl Completion {
    /// Pending again, with no waiters (only its last holder resets it).
    #[inline]
    fn reset(&mut self) {
        *self.state.get_mut() = PENDING;
        *self.error.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        self.notify.clear();
    }

    /// Record the result (first call wins) and wake waiters.
    #[inline(always)]
    pub(crate) fn complete(&self, r: Result<u64>) {
        if self
            .state
            .compare_exchange(PENDING, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let state = match r {
            Ok(v) => {
                self.value.store(v, Ordering::Relaxed);
                OK
            }
            Err(e) => {
                *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                ERR
            }
        };
        self.state.store(state, Ordering::Release);
        self.notify.wake_all();
    }

    #[inline]
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state.load(Ordering::Acquire), OK | ERR | TAKEN)
    }

    /// The result, once: `None` before completion and after it was taken. Only the
    /// owning [`Op`] takes, so no two threads race here.
    #[inline(always)]
    fn take(&self) -> Option<Result<u64>> {
        let r = match self.state.load(Ordering::Acquire) {
            OK => Ok(self.value.load(Ordering::Relaxed)),
            ERR => Err(self
                .error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or(Error::Closed("operation result already taken"))),
            _ => return None,
        };
        self.state.store(TAKEN, Ordering::Relaxed);
        Some(r)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl Sealed for u64 {}
}

/// What an operation yields: `()` for writes, reads, sends and fences, the old value
/// (`u64`) for atomics.
pub trait OpOutput: sealed::Sealed + Sized {
    #[doc(hidden)]
    fn from_raw(v: u64) -> Self;
}
impl OpOutput for () {
    fn from_raw(_: u64) -> Self {}
}
impl OpOutput for u64 {
    fn from_raw(v: u64) -> Self {
        v
    }
}

/// A handle to an operation in flight.
///
/// Wait for it ([`wait`](Op::wait)), poll it ([`poll_result`](Op::poll_result)), or
/// `.await` it from any executor. Dropping the handle does not cancel the operation; its
/// buffers stay alive until it completes. Every operation completes — successfully, with
/// a typed error, or with [`Error::Timeout`] once its deadline passes.
///
/// With [`Progress::Caller`], waiting and polling drive the endpoint's progress engine
/// from the calling thread (and an awaited `Op` re-polls itself: busy-poll).
#[must_use = "an operation's result says whether it took effect"]
pub struct Op<T: OpOutput> {
    c: Arc<Completion>,
    driver: Driver,
    _t: PhantomData<fn() -> T>,
}

impl<T: OpOutput> Drop for Op<T> {
    #[inline]
    fn drop(&mut self) {
        // The engine drops its reference once the operation is over; an operation still
        // in flight keeps its completion (and this handle's is just released).
        self.driver.give_back(&mut self.c);
    }
}

impl<T: OpOutput> std::fmt::Debug for Op<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op")
            .field("done", &self.c.is_done())
            .finish()
    }
}

impl<T: OpOutput> Op<T> {
    pub(crate) fn new(c: Arc<Completion>, driver: Driver) -> Op<T> {
        Op {
            c,
            driver,
            _t: PhantomData,
        }
    }

    /// Whether the operation has completed.
    #[inline]
    pub fn is_done(&self) -> bool {
        self.c.is_done()
    }

    /// The result if the operation has completed (driving progress once first when the
    /// caller drives progress). After it returns `Some`, later calls return `None`.
    pub fn poll_result(&mut self) -> Option<Result<T>> {
        if !self.c.is_done() && self.driver.caller_drives {
            self.driver.progress();
        }
        self.c.take().map(|r| r.map(T::from_raw))
    }

    /// Block until the operation completes and return its result.
    #[inline(always)]
    pub fn wait(self) -> Result<T> {
        // Done already (a device that completes within the post, polled by `submit`).
        if let Some(r) = self.c.take() {
            return r.map(T::from_raw);
        }
        self.wait_pending()
    }

    #[inline(never)]
    fn wait_pending(self) -> Result<T> {
        match self.driver.wait(&self.c.notify, None, || self.c.take())? {
            Some(r) => r.map(T::from_raw),
            None => Err(Error::Closed("operation result already taken")),
        }
    }

    /// Wait at most `timeout` for the operation. `None` if it has not completed by then:
    /// the operation goes on (it still completes by its own deadline, and its buffers
    /// stay alive until it does), and the handle can be waited on again. After it
    /// returns `Some`, later calls return `None`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<T>> {
        let c = self.c.clone();
        let deadline = Instant::now() + timeout;
        match self
            .driver
            .wait(&self.c.notify, Some(deadline), || c.take())
        {
            Ok(r) => r.map(|r| r.map(T::from_raw)),
            Err(e) => Some(Err(e)),
        }
    }
}

impl<T: OpOutput> Future for Op<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        if let Some(r) = this.poll_result() {
            return Poll::Ready(r);
        }
        if this.driver.caller_drives {
            // Nobody else drives progress: ask to be polled again (busy-poll).
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.c.notify.register_waker(cx.waker());
        match this.c.take() {
            Some(r) => Poll::Ready(r.map(T::from_raw)),
            None => Poll::Pending,
        }
    }
}

/// Wait for every operation and return the first error, if any.
pub fn wait_all<T: OpOutput>(ops: impl IntoIterator<Item = Op<T>>) -> Result<()> {
    let mut first = None;
    for op in ops {
        if let Err(e) = op.wait()
            && first.is_none()
        {
            first = Some(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// A bounded queue from the progress engine to the application: at most `cap` items,
/// and room for another only while the items' bytes are below `max_bytes` (so it holds
/// at most `max_bytes` plus one item).
#[derive(Debug)]
pub(crate) struct Mailbox<T> {
    q: Mutex<MailboxState<T>>,
    cap: usize,
    max_bytes: usize,
    pub(crate) notify: Notify,
}

#[derive(Debug)]
struct MailboxState<T> {
    /// Items and their weight in bytes.
    items: VecDeque<(T, usize)>,
    bytes: usize,
    closed: Option<String>,
}

impl<T> MailboxState<T> {
    fn full(&self, cap: usize, max_bytes: usize) -> bool {
        self.items.len() >= cap || self.bytes >= max_bytes
    }
}

impl<T> Mailbox<T> {
    pub(crate) fn new(cap: usize) -> Mailbox<T> {
        Mailbox::with_max_bytes(cap, usize::MAX)
    }

    pub(crate) fn with_max_bytes(cap: usize, max_bytes: usize) -> Mailbox<T> {
        Mailbox {
            q: Mutex::new(MailboxState {
                items: VecDeque::new(),
                bytes: 0,
                closed: None,
            }),
            cap,
            max_bytes,
            notify: Notify::default(),
        }
    }

    /// Whether another item fits.
    pub(crate) fn has_room(&self) -> bool {
        !self
            .q
            .lock()
            .expect("mailbox poisoned")
            .full(self.cap, self.max_bytes)
    }

    /// Whether another item fits with `items` more items of `bytes` more bytes counted
    /// against the limits: what a producer holds for this queue elsewhere.
    pub(crate) fn has_room_with(&self, items: usize, bytes: usize) -> bool {
        let q = self.q.lock().expect("mailbox poisoned");
        q.items.len().saturating_add(items) < self.cap
            && q.bytes.saturating_add(bytes) < self.max_bytes
    }

    /// Push, or give the item back when full.
    pub(crate) fn push(&self, v: T) -> std::result::Result<(), T> {
        {
            let mut q = self.q.lock().expect("mailbox poisoned");
            if q.full(self.cap, self.max_bytes) {
                return Err(v);
            }
            q.items.push_back((v, 0));
        }
        self.notify.wake_all();
        Ok(())
    }

    /// Push an item admitted earlier (its producer checked [`has_room`] before taking
    /// it from the network, and nothing may be lost now), counting `bytes` against the
    /// byte limit. The queue can overshoot its limits by what one admission carried.
    pub(crate) fn push_admitted(&self, v: T, bytes: usize) {
        {
            let mut q = self.q.lock().expect("mailbox poisoned");
            q.items.push_back((v, bytes));
            q.bytes += bytes;
        }
        self.notify.wake_all();
    }

    /// Close: waiters get `reason` once the queue is drained.
    pub(crate) fn close(&self, reason: &str) {
        {
            let mut q = self.q.lock().expect("mailbox poisoned");
            if q.closed.is_none() {
                q.closed = Some(reason.to_string());
            }
        }
        self.notify.wake_all();
    }

    /// Pop one item; `Err` once closed and empty. Returns whether the queue was full
    /// before the pop (so the producer can be told there is room again).
    pub(crate) fn try_pop(&self) -> std::result::Result<Option<(T, bool)>, String> {
        let mut q = self.q.lock().expect("mailbox poisoned");
        let was_full = q.full(self.cap, self.max_bytes);
        match q.items.pop_front() {
            Some((v, bytes)) => {
                q.bytes -= bytes;
                Ok(Some((v, was_full)))
            }
            None => match &q.closed {
                Some(r) => Err(r.clone()),
                None => Ok(None),
            },
        }
    }

    /// Drain everything (on shutdown).
    pub(crate) fn drain(&self) -> Vec<T> {
        self.q
            .lock()
            .expect("mailbox poisoned")
            .items
            .drain(..)
            .map(|(v, _)| v)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_completion_wins_and_the_result_is_taken_once() {
        let c = Arc::new(Completion::default());
        assert!(!c.is_done());
        assert!(c.take().is_none());
        c.complete(Ok(7));
        c.complete(Err(Error::Closed("late")));
        assert!(c.is_done());
        assert!(matches!(c.take(), Some(Ok(7))));
        assert!(c.take().is_none());
        assert!(c.is_done());

        let e = Arc::new(Completion::default());
        e.complete(Err(Error::Timeout {
            after: Duration::from_secs(1),
        }));
        e.complete(Ok(1));
        assert!(matches!(e.take(), Some(Err(Error::Timeout { .. }))));
        assert!(e.take().is_none());
    }

    #[test]
    fn a_given_back_completion_starts_over_and_a_shared_one_is_not_kept() {
        let d = Driver::new(Arc::from(Vec::new()), &Progress::Caller, WaitMode::BusyPoll);
        let mut c = d.completion();
        c.notify.register_thread();
        c.complete(Err(Error::Closed("first use")));
        let held = Arc::clone(&c);
        d.give_back(&mut c);
        assert!(
            d.inner.spare.lock().unwrap().is_empty(),
            "still shared: not kept"
        );
        drop(held);
        let addr = Arc::as_ptr(&c);
        d.give_back(&mut c);
        drop(c);
        let again = d.completion();
        assert_eq!(Arc::as_ptr(&again), addr, "reused");
        assert!(!again.is_done());
        assert!(again.take().is_none());
        assert!(!again.notify.has_waiters.load(Ordering::SeqCst));
        again.complete(Ok(3));
        assert!(matches!(again.take(), Some(Ok(3))));
        // A handle gives its completion back when dropped.
        let op: Op<u64> = Op::new(again, d.clone());
        drop(op);
        assert_eq!(d.inner.spare.lock().unwrap().len(), 1);
    }
}
