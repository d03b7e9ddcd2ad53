//! A pool of copy threads shared by the transports whose bytes move by CPU copies in this
//! process (`local`, `shm`): each posted batch comes with a [`Mover`] that knows how to move
//! one claimed range of its slices. Waiting callers help instead of sleeping, and batches of
//! at most 256 KiB are moved at once by the submitting thread: waking a copy thread would
//! cost more than the copy.

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Instant;

use super::{Slice, SliceSource, TransportError, TransportKind};

/// Batches of at most this many bytes (and 64 slices) are moved by the submitting thread.
const INLINE_BYTES: u64 = 256 << 10;

/// A copy thread working on one batch lets other queued batches have a turn after moving
/// this many bytes of it, so a small batch is not stuck behind a huge one.
const TURN_BYTES: u64 = 16 << 20;

/// Moves claimed ranges of slices for one transport (or one peer of it).
pub trait Mover: Send + Sync {
    /// Which transport this mover belongs to (for errors).
    fn kind(&self) -> TransportKind;
    /// Moves every slice of `slices` (of a batch that touches GPU memory when `gpu`); an
    /// error fails the whole range.
    fn move_slices(&self, slices: &[Slice], gpu: bool) -> Result<(), TransportError>;
}

/// A batch and the mover that moves its slices.
#[derive(Clone)]
struct Job {
    work: Arc<dyn SliceSource>,
    mover: Arc<dyn Mover>,
}

/// The copy threads and their queue.
pub struct CopyPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    thread_ids: Vec<ThreadId>,
}

impl std::fmt::Debug for CopyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyPool")
            .field("threads", &self.thread_ids.len())
            .finish()
    }
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    /// One entry per worker asked to help with a batch; a batch posted to k workers
    /// appears k times, and each worker claims slices until none are left.
    jobs: VecDeque<Job>,
    shutdown: bool,
}

impl CopyPool {
    /// Starts `threads` copy threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let worker = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name(format!("kvx-copy-{i}"))
                .spawn(move || worker.run_worker());
            match handle {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    shared.stop(&mut handles, None);
                    return Err(e);
                }
            }
        }
        let thread_ids = handles.iter().map(|h| h.thread().id()).collect();
        Ok(CopyPool {
            shared,
            threads: Mutex::new(handles),
            thread_ids,
        })
    }

    /// Number of copy threads.
    pub fn threads(&self) -> usize {
        self.thread_ids.len()
    }

    /// Moves `work` with `mover`: at once on this thread when it is small, otherwise by the
    /// copy threads (returns at once).
    pub fn post(&self, work: Arc<dyn SliceSource>, mover: Arc<dyn Mover>) {
        if is_small(work.slices()) {
            drain(&*work, &*mover, None);
            return;
        }
        let helpers = self.threads().min(work.slices().len());
        let mut queue = lock(&self.shared.queue);
        for _ in 0..helpers {
            queue.jobs.push_back(Job {
                work: Arc::clone(&work),
                mover: Arc::clone(&mover),
            });
        }
        drop(queue);
        for _ in 0..helpers {
            self.shared.ready.notify_one();
        }
    }

    /// Stops and joins the copy threads (idempotent). The engine calls this once every
    /// batch has ended, so no copy thread outlives it; nothing may be posted afterwards.
    pub(crate) fn shutdown(&self) {
        let mut threads = std::mem::take(&mut *lock(&self.threads));
        // The last reference to the pool can be dropped by a copy thread (through the
        // batch it just finished); that thread must not join itself.
        let me = thread::current().id();
        let own = self.thread_ids.contains(&me).then_some(me);
        self.shared.stop(&mut threads, own);
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn run_worker(&self) {
        while let Some(job) = self.next_job() {
            let mut moved = 0;
            while let Some(range) = job.work.claim() {
                moved += move_range(&*job.work, &*job.mover, range);
                if moved >= TURN_BYTES {
                    if self.requeue_if_others_wait(&job) {
                        break;
                    }
                    moved = 0;
                }
            }
        }
    }

    /// The next job, or `None` once the pool is shut down.
    fn next_job(&self) -> Option<Job> {
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
    fn requeue_if_others_wait(&self, job: &Job) -> bool {
        let mut queue = lock(&self.queue);
        if queue.jobs.is_empty() {
            return false;
        }
        queue.jobs.push_back(job.clone());
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
                // Copy threads catch panics per range, so join cannot fail in practice;
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

/// Claims and moves slices of `work` until none are left to claim, or (for a helping
/// caller) until `until` has passed.
pub(crate) fn drain(work: &dyn SliceSource, mover: &dyn Mover, until: Option<Instant>) {
    while let Some(range) = work.claim() {
        move_range(work, mover, range);
        if until.is_some_and(|until| Instant::now() >= until) {
            return;
        }
    }
}

/// Moves a claimed range and reports it; returns the bytes it covered. A panic (a bug)
/// fails the range instead of leaving it claimed forever, so the batch still ends.
fn move_range(work: &dyn SliceSource, mover: &dyn Mover, range: Range<usize>) -> u64 {
    let slices = &work.slices()[range.clone()];
    let bytes = slices.iter().map(|s| u64::from(s.len)).sum();
    let result = catch_unwind(AssertUnwindSafe(|| {
        mover.move_slices(slices, work.touches_gpu())
    }))
    .unwrap_or_else(|_| {
        Err(TransportError {
            transport: mover.kind(),
            reason: "a copy thread panicked (a bug in kvxfer; please report it)".into(),
        })
    });
    work.complete(range, result);
    bytes
}
