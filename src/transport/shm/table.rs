//! The pin table one same-host peer connection shares with the engine it reads and writes:
//! a memfd of 16-byte slots, one per attached region. The serving engine writes a slot's
//! `state` (its generation: odd while the region is live, the next even number once it was
//! unregistered); the peer counts its copies in flight in `pins`. Both sides use
//! sequentially consistent atomics in the shared pages, the two halves of Dekker's
//! handshake:
//!
//! - peer: `pins += 1`, then read `state`; go ahead only if it is the generation it was
//!   given, else `pins -= 1` and fail the op (or, while the engine is deciding, wait for
//!   its verdict and try again);
//! - engine, on unregister: write `state = revoking`, then read `pins`; non-zero means a
//!   copy may be running, so it restores `state` and answers `Busy`; zero means none is
//!   and none can start, so it writes `state = dead`.
//!
//! At least one side sees the other's write, so a copy never runs into memory that
//! `unregister` has already given back to the caller. A peer that dies with pins held
//! loses its connection, and with it its table: its pins stop counting.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per slot.
pub const SLOT_BYTES: usize = 16;

#[repr(C, align(16))]
struct Slot {
    state: AtomicU64,
    pins: AtomicU64,
}

/// Waiting in steps: spin, then yield, then sleep briefly (a wait that lasts is a peer in
/// trouble, and must not keep a core busy).
fn back_off(round: &mut u32) {
    *round += 1;
    if *round < 1000 {
        std::hint::spin_loop();
    } else if *round < 1100 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// A pin table mapped in this process.
pub struct PinTable {
    base: *const Slot,
    slots: u32,
    /// Keeps the mapping `base` points into alive.
    _mapping: Box<dyn Any + Send + Sync>,
}

// SAFETY: the table is only accessed through atomics in memory that stays mapped as long
// as the table lives (`_mapping`); the raw pointer is just its address.
unsafe impl Send for PinTable {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for PinTable {}

impl std::fmt::Debug for PinTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinTable")
            .field("slots", &self.slots)
            .finish()
    }
}

/// What a slot's `state` says of a region: live under `gen` (odd).
fn is_live(gen: u64) -> bool {
    gen % 2 == 1 && gen & REVOKING == 0
}

/// Set in `state` (with the live generation) while the engine decides whether an
/// unregister goes through: pinners wait for the verdict rather than fail a copy that a
/// busy unregister would not have stopped.
const REVOKING: u64 = 1 << 63;

/// How long a pinner waits for that verdict (the engine decides in microseconds).
const VERDICT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

impl PinTable {
    /// The table in `mapping`, whose bytes start at `base` and span at least
    /// `slots * SLOT_BYTES` bytes; `None` if `base` is not 16-byte aligned or the length
    /// does not fit.
    ///
    /// # Safety
    /// `base` must point to `len` bytes of shared, readable and writable memory that stay
    /// mapped while `mapping` lives, and nothing may access them other than through this
    /// type's atomics (here or in the peer process).
    pub unsafe fn new(
        base: *mut u8,
        len: usize,
        slots: u32,
        mapping: Box<dyn Any + Send + Sync>,
    ) -> Option<PinTable> {
        let need = (slots as usize).checked_mul(SLOT_BYTES)?;
        if base.is_null() || base as usize % SLOT_BYTES != 0 || need > len {
            return None;
        }
        Some(PinTable {
            base: base.cast(),
            slots,
            _mapping: mapping,
        })
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn slot(&self, index: u32) -> Option<&Slot> {
        if index >= self.slots {
            return None;
        }
        // SAFETY: index < slots, and `new` checked that slots * SLOT_BYTES bytes from the
        // aligned `base` are mapped for as long as `self` (which holds the mapping) lives.
        // `Slot` is two atomics, valid for any bit pattern.
        Some(unsafe { &*self.base.add(index as usize) })
    }

    /// Peer side: counts a copy into or out of the region of `slot` and checks that it is
    /// still live under `gen`. False (nothing counted) when it is not, or `slot` is out of
    /// range; then the region must not be touched.
    pub fn pin(&self, slot: u32, gen: u64) -> bool {
        let Some(s) = self.slot(slot) else {
            return false;
        };
        if !is_live(gen) {
            return false;
        }
        let mut give_up = None;
        loop {
            s.pins.fetch_add(1, Ordering::SeqCst);
            let state = s.state.load(Ordering::SeqCst);
            if state == gen {
                return true;
            }
            s.pins.fetch_sub(1, Ordering::SeqCst);
            if state != gen | REVOKING {
                return false;
            }
            // An unregister is deciding: wait for it to restore the slot (it found the
            // region busy) or to kill it.
            let until = *give_up.get_or_insert_with(|| std::time::Instant::now() + VERDICT_WAIT);
            let mut round = 0u32;
            while s.state.load(Ordering::SeqCst) == gen | REVOKING {
                if std::time::Instant::now() >= until {
                    return false;
                }
                back_off(&mut round);
            }
        }
    }

    /// Whether `slot` is live under `gen` right now (a hint: it can change at once).
    pub fn is_live(&self, slot: u32, gen: u64) -> bool {
        is_live(gen)
            && self.slot(slot).is_some_and(|s| {
                let state = s.state.load(Ordering::SeqCst);
                state == gen || state == gen | REVOKING
            })
    }

    /// Peer side: the copy counted by a successful `pin` is done.
    pub fn unpin(&self, slot: u32) {
        if let Some(s) = self.slot(slot) {
            s.pins.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Engine side: makes `slot` live under `gen` (odd). Pins are left alone: a stale
    /// pinner of an earlier generation may be between its two counts, which balance.
    pub fn open(&self, slot: u32, gen: u64) {
        debug_assert!(is_live(gen));
        if let Some(s) = self.slot(slot) {
            s.state.store(gen, Ordering::SeqCst);
        }
    }

    /// Engine side: waits until no copy is counted in `slot` (after a forced `revoke`, no
    /// new one can start), spinning then yielding, until `until`. False if copies were
    /// still counted then.
    pub fn drain(&self, slot: u32, until: std::time::Instant) -> bool {
        let Some(s) = self.slot(slot) else {
            return true;
        };
        let mut round = 0u32;
        while s.pins.load(Ordering::SeqCst) != 0 {
            if std::time::Instant::now() >= until {
                return false;
            }
            back_off(&mut round);
        }
        true
    }

    /// Engine side, first half of taking `slot` (live under `gen`) away: stops new pins
    /// from going through and returns the copies counted now. Finish with
    /// [`PinTable::finish_revoke`].
    /// Only a live slot moves to revoking (a slot that [`PinTable::kill`] ended stays
    /// dead; it then counts no copies).
    pub fn begin_revoke(&self, slot: u32, gen: u64) -> u64 {
        let Some(s) = self.slot(slot) else {
            return 0;
        };
        let _ = s
            .state
            .compare_exchange(gen, gen | REVOKING, Ordering::SeqCst, Ordering::SeqCst);
        s.pins.load(Ordering::SeqCst)
    }

    /// Engine side, second half: `dead` ends the slot's life under `gen` (pinners waiting
    /// for the verdict fail); otherwise the slot is live again (they go ahead). Only a
    /// slot still revoking changes: one killed meanwhile stays dead.
    pub fn finish_revoke(&self, slot: u32, gen: u64, dead: bool) {
        if let Some(s) = self.slot(slot) {
            let verdict = if dead { gen + 1 } else { gen };
            let _ = s.state.compare_exchange(
                gen | REVOKING,
                verdict,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// Engine side: ends `slot`'s life under `gen` whatever it is doing (a connection
    /// being closed). Returns the copies counted at that moment.
    pub fn kill(&self, slot: u32, gen: u64) -> u64 {
        let Some(s) = self.slot(slot) else {
            return 0;
        };
        s.state.store(gen + 1, Ordering::SeqCst);
        s.pins.load(Ordering::SeqCst)
    }

    /// Copies counted in `slot` now.
    pub fn pins(&self, slot: u32) -> u64 {
        self.slot(slot).map_or(0, |s| s.pins.load(Ordering::SeqCst))
    }

    /// Engine side: both halves for one slot. Returns the copies counted; when that is
    /// non-zero and `force` is false the slot stays live (the caller answers `Busy`). With
    /// `force` the slot ends whatever the count.
    pub fn revoke(&self, slot: u32, gen: u64, force: bool) -> u64 {
        let pins = self.begin_revoke(slot, gen);
        self.finish_revoke(slot, gen, force || pins == 0);
        pins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn table(slots: u32) -> PinTable {
        let mut mem = vec![0u128; slots as usize].into_boxed_slice();
        let base = mem.as_mut_ptr().cast::<u8>();
        let len = slots as usize * SLOT_BYTES;
        // SAFETY: the boxed slice is 16-byte aligned, `len` bytes long and moved into the
        // table, which is the only thing that touches it from now on.
        unsafe { PinTable::new(base, len, slots, Box::new(mem)) }.unwrap()
    }

    #[test]
    fn pin_needs_the_live_generation() {
        let t = table(4);
        assert!(!t.pin(0, 1), "a slot never opened is not live");
        t.open(0, 1);
        assert!(t.pin(0, 1));
        assert!(!t.pin(0, 3), "a stale generation pins nothing");
        assert!(!t.pin(9, 1), "out of range");
        assert_eq!(t.revoke(0, 1, false), 1, "one copy in flight");
        assert!(t.pin(0, 1), "a busy revoke leaves the slot live");
        t.unpin(0);
        t.unpin(0);
        assert_eq!(t.revoke(0, 1, false), 0);
        assert!(!t.pin(0, 1), "revoked");
        t.open(0, 3);
        assert!(!t.pin(0, 1), "the old generation stays dead after reuse");
        assert!(t.pin(0, 3));
        assert_eq!(t.revoke(0, 3, true), 1, "forced: dead even while pinned");
        assert!(!t.pin(0, 3));
    }

    /// A pinner that finds an unregister deciding waits for its verdict: it goes ahead
    /// when the region turned out busy and stays, and fails when it went.
    #[test]
    fn a_pinner_waits_for_the_verdict() {
        let t = Arc::new(table(1));
        t.open(0, 1);
        for dead in [false, true] {
            assert_eq!(t.begin_revoke(0, 1), 0);
            assert!(t.is_live(0, 1), "deciding still counts as live for routing");
            let (tx, rx) = std::sync::mpsc::channel();
            let pinner = {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    tx.send(()).unwrap();
                    let pinned = t.pin(0, 1);
                    if pinned {
                        t.unpin(0);
                    }
                    pinned
                })
            };
            rx.recv().unwrap();
            t.finish_revoke(0, 1, dead);
            assert_eq!(pinner.join().unwrap(), !dead);
        }
        assert!(!t.pin(0, 1));
    }

    /// A busy verdict does not bring back a slot that was killed while it was decided.
    #[test]
    fn a_killed_slot_stays_dead() {
        let t = table(1);
        t.open(0, 1);
        assert!(t.pin(0, 1));
        assert_eq!(t.begin_revoke(0, 1), 1);
        assert_eq!(t.kill(0, 1), 1);
        t.finish_revoke(0, 1, false);
        t.unpin(0);
        assert!(!t.pin(0, 1), "the busy verdict revived a killed slot");
        assert_eq!(t.begin_revoke(0, 1), 0);
        t.finish_revoke(0, 1, false);
        assert!(!t.is_live(0, 1));
    }

    #[test]
    fn misaligned_or_short_memory_is_refused() {
        let mut mem = vec![0u128; 4].into_boxed_slice();
        let base = mem.as_mut_ptr().cast::<u8>();
        // SAFETY: the checks under test refuse before anything is accessed.
        unsafe {
            assert!(PinTable::new(base.add(8), 48, 2, Box::new(())).is_none());
            assert!(PinTable::new(base, 32, 3, Box::new(())).is_none());
            assert!(PinTable::new(std::ptr::null_mut(), 64, 1, Box::new(())).is_none());
        }
        drop(mem);
    }

    /// The handshake under contention: while a revoker succeeds, no pinner is inside.
    #[test]
    fn revoke_and_pin_exclude_each_other() {
        let t = Arc::new(table(1));
        for round in 0..200u64 {
            let gen = 2 * round + 1;
            t.open(0, gen);
            let inside = Arc::new(AtomicU64::new(0));
            let revoked = Arc::new(AtomicBool::new(false));
            let pinner = {
                let (t, inside, revoked) =
                    (Arc::clone(&t), Arc::clone(&inside), Arc::clone(&revoked));
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if t.pin(0, gen) {
                            inside.fetch_add(1, Ordering::SeqCst);
                            assert!(
                                !revoked.load(Ordering::SeqCst),
                                "pinned after a revoke succeeded"
                            );
                            inside.fetch_sub(1, Ordering::SeqCst);
                            t.unpin(0);
                        }
                    }
                })
            };
            loop {
                if t.revoke(0, gen, false) == 0 {
                    revoked.store(true, Ordering::SeqCst);
                    assert_eq!(
                        inside.load(Ordering::SeqCst),
                        0,
                        "a copy ran through a revoke"
                    );
                    break;
                }
                std::hint::spin_loop();
            }
            pinner.join().unwrap();
        }
    }
}
