//! In-process transport: the engine is its own peer, so a slice is one `memmove` between
//! two registered ranges, done by a small pool of copy threads (and by waiting callers,
//! which help instead of sleeping).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Instant;

use super::{OpKind, Slice, SliceSource, Transport, TransportKind};

/// Batches of at most this many bytes are copied by the submitting thread inside `post`:
/// waking a copy thread costs microseconds, more than copying them.
const INLINE_BYTES: u64 = 64 << 10;

fn is_small(slices: &[Slice]) -> bool {
    slices.len() <= 16 && slices.iter().map(|s| u64::from(s.len)).sum::<u64>() <= INLINE_BYTES
}

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
                    stop_pool(&pool, &mut handles, None);
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
        if helpers == 0 {
            return;
        }
        let mut queue = self
            .pool
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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
        let mut threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        // The last reference to the transport can be dropped by a copy thread (through the
        // batch it just finished); that thread must not join itself.
        let me = thread::current().id();
        let own = self.thread_ids.contains(&me).then_some(me);
        stop_pool(&self.pool, &mut threads, own);
    }
}

fn stop_pool(pool: &Pool, threads: &mut Vec<JoinHandle<()>>, skip: Option<ThreadId>) {
    {
        let mut queue = pool.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.shutdown = true;
        queue.jobs.clear();
    }
    pool.ready.notify_all();
    for handle in threads.drain(..) {
        if Some(handle.thread().id()) != skip {
            // A copy thread cannot panic (it runs no user code), so join only fails if
            // something is badly wrong; there is nothing better to do than go on.
            let _ = handle.join();
        }
    }
}

impl Pool {
    fn run_worker(&self) {
        loop {
            let job = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if queue.shutdown {
                        return;
                    }
                    if let Some(job) = queue.jobs.pop_front() {
                        break job;
                    }
                    queue = self
                        .ready
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            drain(&*job, None);
        }
    }
}

/// Claims and copies slices of `work` until none are left to claim, or (for a helping
/// caller) until `until` has passed.
fn drain(work: &dyn SliceSource, until: Option<Instant>) {
    while let Some(range) = work.claim() {
        for slice in &work.slices()[range.clone()] {
            copy(slice);
        }
        work.complete(range, Ok(()));
        if until.is_some_and(|until| Instant::now() >= until) {
            return;
        }
    }
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
    // bytes until `complete` is called for this slice. `copy` (memmove) allows the two
    // ranges to overlap, which a caller may legitimately ask for within one region.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, slice.len as usize) };
}
