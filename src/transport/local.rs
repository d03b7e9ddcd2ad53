//! In-process transport: the engine is its own peer, so a slice is one `memmove` between
//! two registered ranges, done by a small pool of copy threads (and by waiting callers,
//! which help instead of sleeping). Batches of at most 256 KiB are copied at once by the
//! submitting thread: waking a copy thread would cost more than the copy.

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Instant;

use super::{OpKind, Slice, SliceSource, Transport, TransportError, TransportKind};

/// Batches of at most this many bytes are copied by the submitting thread inside `post`.
const INLINE_BYTES: u64 = 256 << 10;

/// A copy thread working on one batch lets other queued batches have a turn after copying
/// this many bytes of it, so a small batch is not stuck behind a huge one.
const TURN_BYTES: u64 = 16 << 20;

/// The in-process copy transport.
#[derive(Debug)]
pub struct LocalTransport {
    pool: Arc<Pool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    thread_ids: Vec<ThreadId>,
}

#[derive(Default)]
struct Pool {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

#[derive(Default)]
struct Queue {
    /// One entry per worker asked to help with a batch; a batch posted to k workers
    /// appears k times, and each worker claims slices until none are left.
    jobs: VecDeque<Arc<dyn SliceSource>>,
    shutdown: bool,
}

impl LocalTransport {
    /// Starts `threads` copy threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let pool = Arc::new(Pool::default());
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let worker_pool = Arc::clone(&pool);
            let handle = thread::Builder::new()
                .name(format!("kvx-copy-{i}"))
                .spawn(move || worker_pool.run_worker());
            match handle {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    pool.stop(&mut handles, None);
                    return Err(e);
                }
            }
        }
        let thread_ids = handles.iter().map(|h| h.thread().id()).collect();
        Ok(LocalTransport {
            pool,
            threads: Mutex::new(handles),
            thread_ids,
        })
    }

    /// Number of copy threads.
    pub fn threads(&self) -> usize {
        self.thread_ids.len()
    }

    /// Stops and joins the copy threads (idempotent). The engine calls this once every
    /// batch has ended, so no copy thread outlives it; nothing may be posted afterwards.
    pub(crate) fn shutdown(&self) {
        let mut threads = std::mem::take(&mut *lock(&self.threads));
        // The last reference to the transport can be dropped by a copy thread (through the
        // batch it just finished); that thread must not join itself.
        let me = thread::current().id();
        let own = self.thread_ids.contains(&me).then_some(me);
        self.pool.stop(&mut threads, own);
    }
}

impl Transport for LocalTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Local
    }

    fn describe(&self) -> String {
        format!("in-process memmove, {} copy threads", self.threads())
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        if is_small(work.slices()) {
            drain(&*work, None);
            return;
        }
        let helpers = self.threads().min(work.slices().len());
        let mut queue = lock(&self.pool.queue);
        for _ in 0..helpers {
            queue.jobs.push_back(Arc::clone(&work));
        }
        drop(queue);
        for _ in 0..helpers {
            self.pool.ready.notify_one();
        }
    }

    fn progress(&self, work: &dyn SliceSource, until: Instant) {
        drain(work, Some(until));
    }
}

impl Drop for LocalTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Pool {
    fn run_worker(&self) {
        while let Some(job) = self.next_job() {
            let mut copied = 0;
            while let Some(range) = job.claim() {
                copied += copy_range(&*job, range);
                if copied >= TURN_BYTES {
                    if self.requeue_if_others_wait(&job) {
                        break;
                    }
                    copied = 0;
                }
            }
        }
    }

    /// The next job, or `None` once the pool is shut down.
    fn next_job(&self) -> Option<Arc<dyn SliceSource>> {
        let mut queue = lock(&self.queue);
        loop {
            if queue.shutdown {
                return None;
            }
            if let Some(job) = queue.jobs.pop_front() {
                return Some(job);
            }
            queue = self
                .ready
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Puts `job` back at the end of the queue if other jobs are waiting; true if it did.
    fn requeue_if_others_wait(&self, job: &Arc<dyn SliceSource>) -> bool {
        let mut queue = lock(&self.queue);
        if queue.jobs.is_empty() {
            return false;
        }
        queue.jobs.push_back(Arc::clone(job));
        true
    }

    fn stop(&self, threads: &mut Vec<JoinHandle<()>>, skip: Option<ThreadId>) {
        {
            let mut queue = lock(&self.queue);
            queue.shutdown = true;
            queue.jobs.clear();
        }
        self.ready.notify_all();
        for handle in threads.drain(..) {
            if Some(handle.thread().id()) != skip {
                // Copy threads catch panics per chunk, so join cannot fail in practice;
                // if it does there is nothing better to do than go on.
                let _ = handle.join();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_small(slices: &[Slice]) -> bool {
    slices.len() <= 64 && slices.iter().map(|s| u64::from(s.len)).sum::<u64>() <= INLINE_BYTES
}

/// Claims and copies slices of `work` until none are left to claim, or (for a helping
/// caller) until `until` has passed.
fn drain(work: &dyn SliceSource, until: Option<Instant>) {
    while let Some(range) = work.claim() {
        copy_range(work, range);
        if until.is_some_and(|until| Instant::now() >= until) {
            return;
        }
    }
}

/// Copies a claimed range and reports it; returns the bytes it covered. A panic (a bug:
/// copying cannot fail) fails the range instead of leaving it claimed forever, so the
/// batch still ends.
fn copy_range(work: &dyn SliceSource, range: Range<usize>) -> u64 {
    let slices = &work.slices()[range.clone()];
    let bytes = slices.iter().map(|s| u64::from(s.len)).sum();
    let copied = catch_unwind(AssertUnwindSafe(|| slices.iter().for_each(copy)));
    let result = copied.map_err(|_| TransportError {
        transport: TransportKind::Local,
        reason: "a copy thread panicked (a bug in kvxfer; please report it)".into(),
    });
    work.complete(range, result);
    bytes
}

fn copy(slice: &Slice) {
    let (src, dst) = match slice.kind {
        OpKind::Write => (slice.local, slice.remote),
        OpKind::Read => (slice.remote, slice.local),
    };
    // SAFETY: before posting, the engine checked that both ranges lie entirely inside
    // registered regions with the rights this direction needs, and pinned those regions
    // for the life of the batch: caller memory cannot be unregistered (Busy) and engine
    // memory stays mapped while the batch holds it, so both ranges are valid for `len`
    // bytes until `complete` is called for this slice. The engine refuses ops whose two
    // ranges overlap in one process; `copy` (memmove) is used anyway so that even such a
    // slice could not be undefined behaviour.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, slice.len as usize) };
}
