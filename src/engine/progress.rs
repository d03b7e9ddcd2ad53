//! The bookkeeping of one batch's slices, as a pure state machine: no I/O, no clocks, no
//! locks, only atomics, so it can be tested exhaustively without moving a byte.
//!
//! Every slice is accounted exactly once: moved (completed), failed, or skipped because the
//! batch was stopped (cancel, timeout, or a failure elsewhere) before anyone claimed it.
//! The batch ends when nothing is outstanding; whoever brings the count to zero is told so
//! (and nobody else), runs the end-of-batch work, then publishes the outcome.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// How a batch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// Every slice moved.
    Completed = 1,
    /// At least one slice failed.
    Failed = 2,
    /// Stopped by cancel before every slice moved.
    Cancelled = 3,
    /// Stopped at its deadline before every slice moved.
    TimedOut = 4,
}

/// Why a batch is being stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// The caller cancelled.
    Cancelled = 1,
    /// The deadline passed.
    TimedOut = 2,
    /// A slice failed: the rest need not move.
    Failed = 3,
}

const RUNNING: u8 = 0;

/// Slice accounting of one batch.
#[derive(Debug)]
pub struct Progress {
    total: usize,
    chunk: usize,
    /// Next slice index to hand out; may run past `total`.
    next: AtomicUsize,
    /// Slices not yet accounted (unclaimed, or claimed and not completed).
    outstanding: AtomicUsize,
    skipped: AtomicUsize,
    stop: AtomicU8,
    failed: AtomicBool,
    outcome: AtomicU8,
}

impl Progress {
    /// A batch of `total` slices handed out `chunk` at a time. A batch of no slices has
    /// already completed.
    pub fn new(total: usize, chunk: usize) -> Self {
        Progress {
            total,
            chunk: chunk.max(1),
            next: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(total),
            skipped: AtomicUsize::new(0),
            stop: AtomicU8::new(RUNNING),
            failed: AtomicBool::new(false),
            outcome: AtomicU8::new(if total == 0 {
                Outcome::Completed as u8
            } else {
                RUNNING
            }),
        }
    }

    /// Hands out the next range of at most `chunk` slices, or `None` when all are claimed
    /// or the batch was stopped.
    pub fn claim(&self) -> Option<Range<usize>> {
        if self.stop.load(Ordering::Acquire) != RUNNING {
            return None;
        }
        let start = self.next.fetch_add(self.chunk, Ordering::AcqRel);
        (start < self.total).then(|| start..(start + self.chunk).min(self.total))
    }

    /// Accounts `n` claimed slices as done; `failed` stops the rest of the batch. Returns
    /// the outcome iff this call ended the batch; the caller must then `publish` it.
    #[must_use]
    pub fn complete(&self, n: usize, failed: bool) -> Option<Outcome> {
        let mut accounted = n;
        if failed {
            let stop = self.stop.load(Ordering::Acquire);
            if stop == StopReason::Cancelled as u8 || stop == StopReason::TimedOut as u8 {
                // Stopped first: a transport that aborts a stopped batch's requests (a
                // lane dropped, a queue pair flushed) fails them; they did not move
                // because of the stop, and the batch ends as it was told to.
                self.skipped.fetch_add(n, Ordering::AcqRel);
            } else {
                self.failed.store(true, Ordering::Release);
                accounted += self.skip_unclaimed(StopReason::Failed);
            }
        }
        self.account(accounted)
    }

    /// Stops the batch: no more slices are handed out, unclaimed ones are skipped. Slices
    /// already claimed still complete. Returns the outcome iff this call ended the batch.
    #[must_use]
    pub fn stop(&self, reason: StopReason) -> Option<Outcome> {
        let skipped = self.skip_unclaimed(reason);
        self.account(skipped)
    }

    /// Whether the batch was stopped (cancel, timeout or a failure): nothing more is
    /// handed out, though claimed slices may still be moving.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire) != RUNNING
    }

    /// Why the batch was stopped, if it was.
    pub fn stop_reason(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::Acquire) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::TimedOut),
            3 => Some(StopReason::Failed),
            _ => None,
        }
    }

    /// The outcome once published; `None` while the batch runs.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.outcome.load(Ordering::Acquire) {
            1 => Some(Outcome::Completed),
            2 => Some(Outcome::Failed),
            3 => Some(Outcome::Cancelled),
            4 => Some(Outcome::TimedOut),
            _ => None,
        }
    }

    /// Makes the outcome visible to `outcome()` readers. Called once, by whoever was given
    /// the outcome, after its end-of-batch work (so readers see that work done).
    pub fn publish(&self, outcome: Outcome) {
        self.outcome.store(outcome as u8, Ordering::Release);
    }

    /// Sets the stop reason (the first one wins) and takes every unclaimed slice away from
    /// claimers; returns how many were taken.
    fn skip_unclaimed(&self, reason: StopReason) -> usize {
        let _ =
            self.stop
                .compare_exchange(RUNNING, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        let claimed = self.next.swap(self.total, Ordering::AcqRel).min(self.total);
        let skipped = self.total - claimed;
        self.skipped.fetch_add(skipped, Ordering::AcqRel);
        skipped
    }

    fn account(&self, n: usize) -> Option<Outcome> {
        if n == 0 {
            return None;
        }
        let before = self.outstanding.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "more slices accounted than exist");
        (before == n).then(|| self.final_outcome())
    }

    fn final_outcome(&self) -> Outcome {
        if self.failed.load(Ordering::Acquire) {
            Outcome::Failed
        } else if self.skipped.load(Ordering::Acquire) == 0 {
            Outcome::Completed
        } else if self.stop.load(Ordering::Acquire) == StopReason::TimedOut as u8 {
            Outcome::TimedOut
        } else {
            Outcome::Cancelled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_batch_is_complete_at_once() {
        let p = Progress::new(0, 4);
        assert_eq!(p.outcome(), Some(Outcome::Completed));
        assert_eq!(p.claim(), None);
        assert_eq!(p.stop(StopReason::Cancelled), None);
    }

    #[test]
    fn all_moved_is_completed_even_if_stopped_late() {
        let p = Progress::new(3, 2);
        assert_eq!(p.claim(), Some(0..2));
        assert_eq!(p.claim(), Some(2..3));
        assert_eq!(p.stop(StopReason::Cancelled), None, "nothing left to skip");
        assert_eq!(p.complete(2, false), None);
        assert_eq!(p.complete(1, false), Some(Outcome::Completed));
    }

    #[test]
    fn cancel_before_any_claim_ends_the_batch_in_the_cancel_call() {
        let p = Progress::new(5, 1);
        assert_eq!(p.stop(StopReason::Cancelled), Some(Outcome::Cancelled));
        assert_eq!(p.claim(), None);
    }

    #[test]
    fn failure_skips_the_rest_and_wins_over_a_later_cancel() {
        let p = Progress::new(10, 2);
        let (a, b) = (p.claim().unwrap(), p.claim().unwrap());
        assert_eq!(p.complete(a.len(), true), None);
        assert_eq!(p.claim(), None, "a failure skips the rest");
        assert_eq!(p.stop(StopReason::Cancelled), None);
        assert_eq!(p.complete(b.len(), false), Some(Outcome::Failed));
    }

    /// A range failing after a cancel or timeout (a transport aborting the stopped
    /// batch's requests) does not turn the batch into a failure: it ends as it was told to.
    #[test]
    fn failure_after_a_stop_reports_the_stop() {
        for (reason, outcome) in [
            (StopReason::Cancelled, Outcome::Cancelled),
            (StopReason::TimedOut, Outcome::TimedOut),
        ] {
            let p = Progress::new(10, 2);
            let r = p.claim().unwrap();
            assert_eq!(p.stop(reason), None);
            assert_eq!(p.complete(r.len(), true), Some(outcome));
        }
    }

    #[test]
    fn timeout_reports_timed_out() {
        let p = Progress::new(4, 1);
        let r = p.claim().unwrap();
        assert_eq!(p.stop(StopReason::TimedOut), None);
        assert_eq!(p.complete(r.len(), false), Some(Outcome::TimedOut));
    }

    #[derive(Clone, Debug)]
    enum Action {
        /// Worker w claims a range.
        Claim(usize),
        /// Worker w completes its oldest held range (ok or failed).
        Complete(usize, bool),
        Stop(StopReason),
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            6 => (0usize..3).prop_map(Action::Claim),
            6 => (0usize..3, proptest::bool::weighted(0.1)).prop_map(|(w, f)| Action::Complete(w, f)),
            1 => prop_oneof![
                Just(StopReason::Cancelled),
                Just(StopReason::TimedOut),
            ].prop_map(Action::Stop),
        ]
    }

    proptest! {
        /// Under any interleaving of three workers and stops: ranges never overlap, every
        /// slice is accounted once, exactly one call ends the batch, and the outcome follows
        /// the rules (failure > skipped-by-stop > completed; a range failing after a cancel
        /// or timeout counts as stopped).
        #[test]
        fn every_slice_is_accounted_once(
            total in 0usize..40,
            chunk in 1usize..6,
            actions in proptest::collection::vec(action(), 0..120),
        ) {
            let p = Progress::new(total, chunk);
            let mut held: Vec<Vec<Range<usize>>> = vec![Vec::new(); 3];
            let mut seen = vec![false; total];
            let mut ends = Vec::new();
            let (mut any_failed, mut any_stop) = (false, None);
            // Failures of ranges completed after a cancel or timeout: the stop explains them.
            let mut failed_after_stop = false;
            let finish = |o: Option<Outcome>, ends: &mut Vec<Outcome>| if let Some(o) = o {
                p.publish(o);
                ends.push(o);
            };
            for a in actions {
                match a {
                    Action::Claim(w) => if let Some(r) = p.claim() {
                        prop_assert!(r.end <= total && !r.is_empty() && r.len() <= chunk);
                        for i in r.clone() {
                            prop_assert!(!seen[i], "slice {} handed out twice", i);
                            seen[i] = true;
                        }
                        held[w].push(r);
                    },
                    Action::Complete(w, failed) => if !held[w].is_empty() {
                        let r = held[w].remove(0);
                        if failed {
                            if any_stop.is_some() && !any_failed {
                                failed_after_stop = true;
                            } else {
                                any_failed = true;
                            }
                        }
                        finish(p.complete(r.len(), failed), &mut ends);
                    },
                    Action::Stop(reason) => {
                        any_stop.get_or_insert(reason);
                        finish(p.stop(reason), &mut ends);
                    }
                }
                prop_assert_eq!(p.outcome().is_some(), !ends.is_empty() || total == 0);
            }
            // Afterwards the workers finish what they hold and claim the rest, as the copy
            // threads do; the batch must then have ended.
            for r in held.into_iter().flatten() {
                finish(p.complete(r.len(), false), &mut ends);
            }
            while let Some(r) = p.claim() {
                r.clone().for_each(|i| seen[i] = true);
                finish(p.complete(r.len(), false), &mut ends);
            }
            if total > 0 {
                prop_assert_eq!(ends.len(), 1, "the batch must end exactly once");
                let skipped = seen.iter().filter(|s| !**s).count();
                let want = if any_failed {
                    Outcome::Failed
                } else if skipped == 0 && !failed_after_stop {
                    Outcome::Completed
                } else if any_stop == Some(StopReason::TimedOut) {
                    Outcome::TimedOut
                } else {
                    Outcome::Cancelled
                };
                prop_assert_eq!(ends[0], want);
                if skipped > 0 {
                    prop_assert!(any_stop.is_some() || any_failed, "slices skipped without a stop");
                }
            }
        }
    }
}
