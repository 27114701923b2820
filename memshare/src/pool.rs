//! Worker threads of a node: started on demand and kept for the next job. They read
//! connections (see `link.rs`), run the requests they receive, and run dispatches to
//! the node's own regions.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::node::{Inner, POLL};

/// A job for the worker pool.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Worker threads and the jobs waiting for them.
pub(crate) struct Pool {
    st: Mutex<PoolState>,
    cv: Condvar,
    /// Workers reading a connection (see `link.rs`); they do not count against the
    /// limit on workers, which is for the work itself.
    pub(crate) readers: AtomicUsize,
}

struct PoolState {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers started and not yet stopped.
    workers: usize,
}

impl Pool {
    pub(crate) fn new() -> Pool {
        Pool {
            st: Mutex::new(PoolState {
                jobs: VecDeque::new(),
                idle: 0,
                workers: 0,
            }),
            cv: Condvar::new(),
            readers: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.st.lock().expect("pool lock poisoned")
    }
}

impl Inner {
    /// Run `job` on a worker: an idle one, else a new one while fewer than twice
    /// `max_concurrent_tasks` are busy with something else than reading a connection,
    /// else the next one to become free.
    pub(crate) fn run_job(self: &Arc<Self>, job: Job) -> Result<()> {
        let readers = self.pool.readers.load(Ordering::Acquire);
        self.submit(job, Some(2 * self.cfg.max_concurrent_tasks + readers))
    }

    /// Run `job` now: on an idle worker, else on a new thread whatever the number of
    /// workers. For reading connections, which must never wait behind tasks; their
    /// number is bounded by the connections and the requests running.
    pub(crate) fn run_now(self: &Arc<Self>, job: Job) -> Result<()> {
        self.submit(job, None)
    }

    fn submit(self: &Arc<Self>, job: Job, cap: Option<usize>) -> Result<()> {
        let p = &self.pool;
        {
            let mut st = p.lock();
            if self.stop.load(Ordering::Relaxed) {
                return Err(Error::Shutdown);
            }
            if st.idle > st.jobs.len() {
                st.jobs.push_back(job);
                p.cv.notify_one();
                return Ok(());
            }
            if cap.is_some_and(|c| st.workers >= c) {
                st.jobs.push_back(job);
                return Ok(());
            }
            st.workers += 1;
        }
        // The new thread runs this job first, then serves the queue.
        let cell = Arc::new(Mutex::new(Some(job)));
        let (inner, first) = (self.clone(), cell.clone());
        let spawned = std::thread::Builder::new()
            .name("pfs-ms-worker".into())
            .spawn(move || {
                let job = first.lock().expect("job lock poisoned").take();
                if let Some(job) = job {
                    run(job);
                }
                worker(inner);
            });
        match spawned {
            Ok(h) => {
                self.keep(h);
                Ok(())
            }
            Err(e) => {
                let job = cell.lock().expect("job lock poisoned").take();
                let mut st = p.lock();
                st.workers -= 1;
                if st.workers == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "cannot start a worker thread: {e}"
                    )));
                }
                // Another worker takes it when it is free.
                tracing::warn!("cannot start a worker thread ({e}): the job waits for one");
                if let Some(job) = job {
                    st.jobs.push_back(job);
                    p.cv.notify_one();
                }
                Ok(())
            }
        }
    }
}

/// Run a job; a panic (a bug: tasks' own panics are caught where they run) costs the
/// job, not the worker.
fn run(job: Job) {
    if catch_unwind(AssertUnwindSafe(job)).is_err() {
        tracing::error!("a memshare worker job panicked");
    }
}

fn worker(inner: Arc<Inner>) {
    let p = &inner.pool;
    let mut st = p.lock();
    while !inner.stop.load(Ordering::Relaxed) {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            run(job);
            st = p.lock();
            continue;
        }
        st.idle += 1;
        st = p.cv.wait_timeout(st, POLL).expect("pool lock poisoned").0;
        st.idle -= 1;
    }
    st.workers -= 1;
}
