//! Engine counters, readable at any time. Updated once per batch (bytes too, when the
//! batch ends): never per slice and never under a lock.

use std::sync::atomic::{AtomicU64, Ordering};

use super::progress::Outcome;

/// What an engine has done since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Batches accepted by `submit`.
    pub batches_submitted: u64,
    /// Submissions refused (bad op, unknown peer, limits): nothing moved for them.
    pub submits_refused: u64,
    /// Batches that moved every byte.
    pub batches_completed: u64,
    /// Batches that ended with a failed slice.
    pub batches_failed: u64,
    /// Batches cancelled before every byte moved.
    pub batches_cancelled: u64,
    /// Batches stopped at their deadline.
    pub batches_timed_out: u64,
    /// Bytes moved by slices that completed, whatever their batch's outcome.
    pub bytes_moved: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    submitted: AtomicU64,
    refused: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    timed_out: AtomicU64,
    bytes_moved: AtomicU64,
}

impl Counters {
    pub fn submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ended(&self, outcome: Outcome, bytes: u64) {
        let counter = match outcome {
            Outcome::Completed => &self.completed,
            Outcome::Failed => &self.failed,
            Outcome::Cancelled => &self.cancelled,
            Outcome::TimedOut => &self.timed_out,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.bytes_moved.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> EngineStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineStats {
            batches_submitted: get(&self.submitted),
            submits_refused: get(&self.refused),
            batches_completed: get(&self.completed),
            batches_failed: get(&self.failed),
            batches_cancelled: get(&self.cancelled),
            batches_timed_out: get(&self.timed_out),
            bytes_moved: get(&self.bytes_moved),
        }
    }
}
