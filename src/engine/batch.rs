//! A submitted batch at run time: its slices, the regions it pins, its deadline, and the
//! waiting machinery around the pure [`Progress`] state machine.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::time::Instant;

use super::net::{Inbox, Notification};
use super::progress::{Outcome, Progress, StopReason};
use super::remote::Link;
use super::slicing::Pins;
use super::stats::Counters;
use super::Error;
use crate::transport::{Slice, SliceSource, Transport, TransportError};

/// How long a waiter spins (checking the outcome) before sleeping on the condvar: long
/// enough to catch the tail of an in-process batch or a loopback round trip (waking a
/// sleeping thread costs more), short enough not to steal a core for long.
const SPIN_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(30);

/// Bytes a claimer takes at once, at most (unless one slice is larger).
const CHUNK_BYTES: usize = 2 << 20;

/// How far in the future "no limit" is.
pub(crate) fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(100 * 365 * 24 * 3600)
}

/// A notification to deliver once every byte of the batch has moved.
pub(crate) enum PendingNotify {
    /// To this engine itself (the local peer).
    Local {
        inbox: Arc<Inbox>,
        from: String,
        bytes: Vec<u8>,
    },
    /// To a peer, through its link's notifier thread.
    Remote { link: Arc<Link>, bytes: Vec<u8> },
}

impl std::fmt::Debug for PendingNotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PendingNotify::Local { .. } => "PendingNotify::Local",
            PendingNotify::Remote { .. } => "PendingNotify::Remote",
        })
    }
}

#[derive(Debug)]
pub(crate) struct Batch {
    me: Weak<Batch>,
    notify: Mutex<Option<PendingNotify>>,
    /// Every byte moved; the notification is being delivered.
    notifying: AtomicBool,
    /// The outcome was published (see `publish`).
    published: AtomicBool,
    progress: Progress,
    slices: Vec<Slice>,
    pins: Mutex<Pins>,
    /// Whether a region the batch touches is GPU memory (fixed at creation).
    gpu: bool,
    /// The device of its local GPU memory, if any.
    local_gpu: Option<u32>,
    pub(crate) deadline: Instant,
    error: OnceLock<Error>,
    lock: Mutex<()>,
    ended: Condvar,
    pub(crate) transport: Arc<dyn Transport>,
    /// Bytes of completed slices.
    moved: AtomicU64,
    counters: Arc<Counters>,
}

impl Batch {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        me: Weak<Batch>,
        notify: Option<PendingNotify>,
        slices: Vec<Slice>,
        pins: Pins,
        deadline: Instant,
        transport: Arc<dyn Transport>,
        workers: usize,
        slice_size: usize,
        counters: Arc<Counters>,
    ) -> Self {
        // Hand slices out in chunks so claimers do not fight over the counter for every
        // small slice, while keeping about four chunks per worker for balance and a chunk
        // small enough (about 2 MiB) that a helping waiter soon checks its timeout again.
        let by_bytes = (CHUNK_BYTES / slice_size.max(1)).max(1);
        let chunk = (slices.len() / (4 * (workers + 1)))
            .clamp(1, 32)
            .min(by_bytes);
        let progress = Progress::new(slices.len(), chunk);
        let batch = Batch {
            me,
            notify: Mutex::new(notify),
            notifying: AtomicBool::new(false),
            published: AtomicBool::new(false),
            progress,
            slices,
            gpu: pins.gpu_location().is_some(),
            local_gpu: pins.local_gpu(),
            pins: Mutex::new(pins),
            deadline,
            error: OnceLock::new(),
            lock: Mutex::new(()),
            ended: Condvar::new(),
            transport,
            moved: AtomicU64::new(0),
            counters,
        };
        if batch.progress.outcome().is_some() {
            batch.release_pins();
        }
        batch
    }

    /// The outcome, once the batch has ended.
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        self.progress.outcome()
    }

    /// The first error, for a failed batch.
    pub(crate) fn error(&self) -> Option<&Error> {
        self.error.get()
    }

    /// Stops the batch; slices already being moved still finish.
    pub(crate) fn stop(&self, reason: StopReason) {
        if let Some(outcome) = self.progress.stop(reason) {
            self.end(outcome);
        } else if self.notifying.load(Ordering::Acquire) {
            // Every byte moved and only the notification is outstanding: nothing touches
            // the buffers any more, so a cancel or deadline ends the batch now (the
            // notification may still arrive at the peer).
            match reason {
                StopReason::Cancelled => self.publish(Outcome::Cancelled),
                StopReason::TimedOut => self.publish(Outcome::TimedOut),
                StopReason::Failed => {}
            }
        }
    }

    /// Waits (helping the transport, then spinning, then sleeping) until the batch ends or
    /// `until` passes. Returns the outcome, or `None` if `until` came first.
    pub(crate) fn wait_until(&self, until: Instant) -> Option<Outcome> {
        if let Some(outcome) = self.outcome() {
            return Some(outcome);
        }
        if Instant::now() < until {
            self.transport.progress(self, until);
        }
        let spin_until = Instant::now() + SPIN_BEFORE_SLEEP;
        loop {
            for _ in 0..64 {
                if let Some(outcome) = self.outcome() {
                    return Some(outcome);
                }
                std::hint::spin_loop();
            }
            let now = Instant::now();
            if now >= spin_until || now >= until {
                break;
            }
            // Let the threads that will end the batch run (on a small machine they may
            // need this core).
            std::thread::yield_now();
        }
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = self.outcome() {
                return Some(outcome);
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            guard = self
                .ended
                .wait_timeout(guard, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// End-of-batch work, run once by whoever ended it: release the regions, then make the
    /// outcome visible (so a caller who sees it can unregister at once), then wake waiters.
    fn end(&self, outcome: Outcome) {
        self.release_pins();
        let notifies = self
            .notify
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if outcome == Outcome::Completed && notifies {
            // Cancelled or timed out while the last bytes were moving: the batch ends as
            // it was told to, and its notification is not sent.
            match self.progress.stop_reason() {
                Some(StopReason::Cancelled) => return self.publish(Outcome::Cancelled),
                Some(StopReason::TimedOut) => return self.publish(Outcome::TimedOut),
                _ => {}
            }
            if self.deliver_notification() {
                return;
            }
        }
        self.publish(outcome);
    }

    /// Hands a pending notification on; true if its delivery will publish the outcome.
    fn deliver_notification(&self) -> bool {
        let pending = self
            .notify
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match pending {
            None => false,
            Some(PendingNotify::Local { inbox, from, bytes }) => {
                if let Err(reason) = inbox.push(Notification { from, bytes }) {
                    let _ = self.error.set(Error::Notify(reason));
                    self.publish(Outcome::Failed);
                    return true;
                }
                false
            }
            Some(PendingNotify::Remote { link, bytes }) => match self.me.upgrade() {
                Some(me) => {
                    self.notifying.store(true, Ordering::Release);
                    link.notify_later(me, bytes);
                    true
                }
                None => {
                    // Cannot happen while the engine holds the batch; never report a
                    // notification delivered that was not.
                    let _ = self
                        .error
                        .set(Error::Notify("the batch was dropped".into()));
                    self.publish(Outcome::Failed);
                    true
                }
            },
        }
    }

    /// The notification of a completed batch was delivered (or not): publish the outcome.
    pub(crate) fn notified(&self, result: Result<(), String>) {
        match result {
            Ok(()) => self.publish(Outcome::Completed),
            Err(reason) => {
                let _ = self.error.set(Error::Notify(reason));
                self.publish(Outcome::Failed);
            }
        }
    }

    /// Makes the outcome visible and wakes waiters; only the first call counts (a batch
    /// waiting for its notification can be ended by a cancel or its deadline first).
    fn publish(&self, outcome: Outcome) {
        if self.published.swap(true, Ordering::AcqRel) {
            return;
        }
        self.counters
            .ended(outcome, self.moved.load(Ordering::Acquire));
        self.progress.publish(outcome);
        // Taking the lock orders this notify after any waiter's check of the outcome.
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.ended.notify_all();
    }

    fn release_pins(&self) {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release();
    }
}

impl SliceSource for Batch {
    fn slices(&self) -> &[Slice] {
        &self.slices
    }

    fn claim(&self) -> Option<Range<usize>> {
        if Instant::now() >= self.deadline {
            self.stop(StopReason::TimedOut);
            return None;
        }
        self.progress.claim()
    }

    fn complete(&self, range: Range<usize>, result: Result<(), TransportError>) {
        let failed = match result {
            Ok(()) => {
                let bytes: u64 = self.slices[range.clone()]
                    .iter()
                    .map(|s| u64::from(s.len))
                    .sum();
                self.moved.fetch_add(bytes, Ordering::AcqRel);
                false
            }
            Err(source) => {
                let op = self.slices[range.start].op as usize;
                let _ = self.error.set(Error::Transport { op, source });
                true
            }
        };
        if let Some(outcome) = self.progress.complete(range.len(), failed) {
            self.end(outcome);
        }
    }

    fn is_stopped(&self) -> bool {
        if !self.progress.is_stopped() && Instant::now() >= self.deadline {
            self.stop(StopReason::TimedOut);
        }
        self.progress.is_stopped()
    }

    fn touches_gpu(&self) -> bool {
        self.gpu
    }

    fn local_gpu(&self) -> Option<u32> {
        self.local_gpu
    }
}
