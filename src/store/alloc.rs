//! The offset allocator of one segment (a memory segment or an SSD file): best fit with
//! coalescing over `[0, capacity)`, every block a multiple of [`GRANULE`].
//!
//! Free blocks are kept twice, by offset (to find the neighbours a freed block merges
//! with) and by `(length, offset)` (to find the smallest block that fits, lowest offset on
//! ties); allocated blocks are kept by offset so that a double free or a free of a block
//! that was never handed out is refused instead of corrupting the free lists. Every
//! operation is O(log n) in the number of blocks and allocates nothing but B-tree nodes.
//!
//! ```
//! use kvxfer::store::alloc::{SegmentAllocator, GRANULE};
//!
//! let mut seg = SegmentAllocator::new(16 * GRANULE);
//! let a = seg.alloc(100).unwrap(); // rounded up to one granule
//! let b = seg.alloc(2 * GRANULE).unwrap();
//! assert_eq!(seg.used(), 3 * GRANULE);
//! assert!(seg.free(a, 100));
//! assert!(!seg.free(a, 100), "a double free is refused");
//! assert!(seg.free(b, 2 * GRANULE));
//! assert_eq!(seg.largest_free(), 16 * GRANULE);
//! ```

use std::collections::{BTreeMap, BTreeSet};

/// Every block offset and length is a multiple of this (O_DIRECT needs 4 KiB alignment).
pub const GRANULE: u64 = 4096;

/// Best-fit, coalescing allocator of offsets in `[0, capacity)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentAllocator {
    capacity: u64,
    used: u64,
    /// Free blocks: offset → length. Two free blocks never touch (they are merged).
    free_by_offset: BTreeMap<u64, u64>,
    /// The same free blocks ordered by `(length, offset)`: the first entry not below
    /// `(len, 0)` is the best fit.
    free_by_len: BTreeSet<(u64, u64)>,
    /// Allocated blocks: offset → rounded length.
    allocated: BTreeMap<u64, u64>,
}

impl SegmentAllocator {
    /// An allocator of `[0, capacity)`, `capacity` rounded down to [`GRANULE`]; all of it
    /// free. A capacity below one granule gives an allocator that never allocates.
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity - capacity % GRANULE;
        let mut seg = SegmentAllocator {
            capacity,
            used: 0,
            free_by_offset: BTreeMap::new(),
            free_by_len: BTreeSet::new(),
            allocated: BTreeMap::new(),
        };
        if capacity > 0 {
            seg.insert_free(0, capacity);
        }
        seg
    }

    /// What `alloc(len)` takes: `len` rounded up to [`GRANULE`] (0 stays 0). Saturates at
    /// `u64::MAX`, which is larger than any capacity, so such a length never allocates.
    pub fn rounded(len: u64) -> u64 {
        len.checked_next_multiple_of(GRANULE).unwrap_or(u64::MAX)
    }

    /// Allocates `len` bytes (rounded up to [`GRANULE`]) and returns the block's offset, or
    /// `None` if `len` is 0 or no free block is large enough. Best fit: the smallest free
    /// block that fits, the lowest offset among equals; the block is cut from its start.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let len = Self::rounded(len);
        let &(block_len, offset) = self.free_by_len.range((len, 0)..).next()?;
        self.remove_free(offset, block_len);
        if block_len > len {
            self.insert_free(offset + len, block_len - len);
        }
        self.allocated.insert(offset, len);
        self.used += len;
        Some(offset)
    }

    /// Frees the block at `offset` that `alloc(len)` returned (`len` as passed to `alloc`,
    /// rounded the same way) and merges it with free neighbours. Returns `false`, changing
    /// nothing, if no block of that offset and rounded length is allocated (a double free,
    /// a wrong length, an offset never handed out).
    pub fn free(&mut self, offset: u64, len: u64) -> bool {
        let len = Self::rounded(len);
        if len == 0 || self.allocated.get(&offset) != Some(&len) {
            return false;
        }
        self.allocated.remove(&offset);
        self.used -= len;
        let mut start = offset;
        let mut block_len = len;
        let before = self
            .free_by_offset
            .range(..offset)
            .next_back()
            .map(|(&o, &l)| (o, l));
        if let Some((prev, prev_len)) = before {
            if prev + prev_len == offset {
                self.remove_free(prev, prev_len);
                start = prev;
                block_len += prev_len;
            }
        }
        let next = offset + len;
        if let Some(&next_len) = self.free_by_offset.get(&next) {
            self.remove_free(next, next_len);
            block_len += next_len;
        }
        self.insert_free(start, block_len);
        true
    }

    /// Bytes managed: the capacity given to [`new`](Self::new), rounded down to [`GRANULE`].
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes allocated (each block counted at its rounded length).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes free: `capacity() - used()`.
    pub fn free_bytes(&self) -> u64 {
        self.capacity - self.used
    }

    /// The length of the largest free block: the largest `alloc` that can succeed now.
    pub fn largest_free(&self) -> u64 {
        self.free_by_len.last().map_or(0, |&(len, _)| len)
    }

    /// Number of allocated blocks.
    pub fn allocations(&self) -> usize {
        self.allocated.len()
    }

    /// Number of free blocks (1 when nothing is allocated; a measure of fragmentation).
    pub fn free_blocks(&self) -> usize {
        self.free_by_offset.len()
    }

    /// The rounded length of the block allocated at `offset`, if one is.
    pub fn allocated_len(&self, offset: u64) -> Option<u64> {
        self.allocated.get(&offset).copied()
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.insert(offset, len);
        self.free_by_len.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.remove(&offset);
        self.free_by_len.remove(&(len, offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    /// Checks every structural invariant of the allocator.
    fn check(seg: &SegmentAllocator) {
        assert_eq!(seg.capacity % GRANULE, 0);
        assert_eq!(seg.used + seg.free_bytes(), seg.capacity);
        assert_eq!(seg.free_by_offset.len(), seg.free_by_len.len());
        for (&o, &l) in &seg.free_by_offset {
            assert!(seg.free_by_len.contains(&(l, o)), "free lists disagree");
        }
        // Free and allocated blocks tile [0, capacity) exactly, with no two free blocks
        // adjacent (they would have been merged).
        let mut blocks: Vec<(u64, u64, bool)> = seg
            .free_by_offset
            .iter()
            .map(|(&o, &l)| (o, l, true))
            .chain(seg.allocated.iter().map(|(&o, &l)| (o, l, false)))
            .collect();
        blocks.sort_unstable();
        let mut at = 0;
        let mut prev_free = false;
        let mut used = 0;
        for (o, l, is_free) in blocks {
            assert_eq!(o, at, "gap or overlap at {o:#x}");
            assert!(l > 0 && l % GRANULE == 0 && o % GRANULE == 0);
            assert!(!(prev_free && is_free), "two free blocks touch at {o:#x}");
            if !is_free {
                used += l;
            }
            prev_free = is_free;
            at = o + l;
        }
        assert_eq!(at, seg.capacity);
        assert_eq!(used, seg.used);
    }

    #[test]
    fn rounding() {
        assert_eq!(SegmentAllocator::rounded(0), 0);
        assert_eq!(SegmentAllocator::rounded(1), GRANULE);
        assert_eq!(SegmentAllocator::rounded(GRANULE), GRANULE);
        assert_eq!(SegmentAllocator::rounded(GRANULE + 1), 2 * GRANULE);
        assert_eq!(SegmentAllocator::rounded(u64::MAX), u64::MAX);
        assert_eq!(
            SegmentAllocator::rounded(u64::MAX - GRANULE),
            u64::MAX - GRANULE + 1
        );
        assert_eq!(
            SegmentAllocator::new(GRANULE * 3 + 17).capacity(),
            3 * GRANULE
        );
        assert_eq!(SegmentAllocator::new(GRANULE - 1).capacity(), 0);
    }

    #[test]
    fn empty_and_tiny_segments_never_allocate() {
        for cap in [0, 1, GRANULE - 1] {
            let mut seg = SegmentAllocator::new(cap);
            assert_eq!(seg.alloc(1), None);
            assert_eq!(seg.largest_free(), 0);
            assert_eq!(seg.free_blocks(), 0);
            assert!(!seg.free(0, 1));
            check(&seg);
        }
    }

    #[test]
    fn zero_and_oversized_requests_fail() {
        let mut seg = SegmentAllocator::new(4 * GRANULE);
        assert_eq!(seg.alloc(0), None);
        assert_eq!(seg.alloc(4 * GRANULE + 1), None);
        assert_eq!(seg.alloc(u64::MAX), None);
        assert_eq!(seg.alloc(u64::MAX - 1), None);
        assert_eq!(seg.used(), 0);
        assert_eq!(seg.alloc(4 * GRANULE), Some(0));
        assert_eq!(seg.alloc(1), None);
        check(&seg);
    }

    #[test]
    fn huge_capacity_does_not_overflow() {
        let mut seg = SegmentAllocator::new(u64::MAX);
        assert_eq!(seg.capacity(), u64::MAX - (GRANULE - 1));
        let a = seg.alloc(u64::MAX - 2 * GRANULE).unwrap();
        assert_eq!(a, 0);
        assert_eq!(seg.free_bytes(), GRANULE);
        assert_eq!(seg.alloc(u64::MAX), None);
        let b = seg.alloc(1).unwrap();
        assert!(!seg.free(u64::MAX, 1));
        assert!(!seg.free(b, u64::MAX));
        assert!(seg.free(b, 1));
        assert!(seg.free(a, u64::MAX - 2 * GRANULE));
        assert_eq!(seg.largest_free(), seg.capacity());
        check(&seg);
    }

    #[test]
    fn coalesces_both_neighbours() {
        let mut seg = SegmentAllocator::new(8 * GRANULE);
        let a = seg.alloc(GRANULE).unwrap();
        let b = seg.alloc(2 * GRANULE).unwrap();
        let c = seg.alloc(GRANULE).unwrap();
        assert_eq!((a, b, c), (0, GRANULE, 3 * GRANULE));
        assert!(seg.free(a, GRANULE));
        assert!(seg.free(c, 1));
        assert_eq!(seg.free_blocks(), 2, "[a] and [c .. end]");
        assert_eq!(seg.largest_free(), 5 * GRANULE);
        assert!(seg.free(b, 2 * GRANULE));
        assert_eq!(seg.free_blocks(), 1);
        assert_eq!(seg.largest_free(), 8 * GRANULE);
        check(&seg);
    }

    #[test]
    fn best_fit_smallest_block_then_lowest_offset() {
        let mut seg = SegmentAllocator::new(32 * GRANULE);
        // Layout: [x:1][hole 3][x:1][hole 2][x:1][hole 2][x:1][rest]
        let mut offs = Vec::new();
        for len in [1, 3, 1, 2, 1, 2, 1] {
            offs.push(seg.alloc(len * GRANULE).unwrap());
        }
        assert!(seg.free(offs[1], 3 * GRANULE));
        assert!(seg.free(offs[3], 2 * GRANULE));
        assert!(seg.free(offs[5], 2 * GRANULE));
        check(&seg);
        // A 2-granule request takes the first 2-granule hole, not the 3 nor the rest.
        assert_eq!(seg.alloc(2 * GRANULE), Some(offs[3]));
        assert_eq!(seg.alloc(2 * GRANULE), Some(offs[5]));
        // Then the 3-granule hole is the best fit for one granule, cut from its start.
        assert_eq!(seg.alloc(GRANULE), Some(offs[1]));
        assert_eq!(seg.alloc(2 * GRANULE), Some(offs[1] + GRANULE));
        check(&seg);
    }

    #[test]
    fn bad_frees_change_nothing() {
        let mut seg = SegmentAllocator::new(16 * GRANULE);
        let a = seg.alloc(3 * GRANULE).unwrap();
        let b = seg.alloc(GRANULE).unwrap();
        let before = seg.clone();
        assert!(!seg.free(a, 2 * GRANULE), "wrong length");
        assert!(!seg.free(a, 4 * GRANULE), "wrong length");
        assert!(!seg.free(a + GRANULE, GRANULE), "inside a block");
        assert!(!seg.free(10 * GRANULE, GRANULE), "a free block");
        assert!(!seg.free(a, 0), "zero length");
        assert!(!seg.free(u64::MAX, u64::MAX));
        assert_eq!(seg, before);
        assert!(
            seg.free(b, 17),
            "any length that rounds the same is accepted"
        );
        let after = seg.clone();
        assert!(!seg.free(b, GRANULE), "double free");
        assert_eq!(seg, after);
        check(&seg);
    }

    /// Tiny deterministic generator for the churn test (no `rand` dependency).
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Mixed 64 KiB / 1 MiB churn near full: allocation keeps succeeding while the
    /// segment is below 90% used, and freeing everything leaves one block.
    #[test]
    fn fragmentation_under_mixed_churn() {
        let capacity = 256 * MIB;
        let mut seg = SegmentAllocator::new(capacity);
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut failures_below_90 = 0u32;
        let mut allocs = 0u32;
        let mut max_free_blocks = 0;
        for _ in 0..200_000 {
            let used_frac = seg.used() as f64 / capacity as f64;
            // Hover around 85-90% full: allocate below, free above.
            let allocate = used_frac < 0.85 || (used_frac < 0.90 && rng.next() % 2 == 0);
            if allocate {
                let len = if rng.next() % 4 == 0 { MIB } else { 64 * KIB };
                match seg.alloc(len) {
                    Some(off) => {
                        live.push((off, len));
                        allocs += 1;
                    }
                    None => {
                        if (seg.used() + len) as f64 <= 0.90 * capacity as f64 {
                            failures_below_90 += 1;
                        }
                    }
                }
            } else if !live.is_empty() {
                let i = (rng.next() % live.len() as u64) as usize;
                let (off, len) = live.swap_remove(i);
                assert!(seg.free(off, len));
            }
            max_free_blocks = max_free_blocks.max(seg.free_blocks());
        }
        check(&seg);
        assert!(allocs > 50_000);
        assert_eq!(
            failures_below_90, 0,
            "allocations failed below 90% used (max free blocks {max_free_blocks})"
        );
        for (off, len) in live.drain(..) {
            assert!(seg.free(off, len));
        }
        assert_eq!(seg.free_blocks(), 1);
        assert_eq!(seg.largest_free(), capacity);
        check(&seg);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(u64),
        Free(usize),
        DoubleFree(usize),
        BadFree(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..=10 * GRANULE).prop_map(Op::Alloc),
            1 => (0u64..=3 * GRANULE).prop_map(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Free),
            1 => any::<usize>().prop_map(Op::DoubleFree),
            1 => (0u64..80 * GRANULE, 0u64..8 * GRANULE).prop_map(|(o, l)| Op::BadFree(o, l)),
        ]
    }

    proptest! {
        /// Random alloc/free sequences: blocks never overlap, stay inside the capacity,
        /// are the best fit, `used + free == capacity`; bad and double frees are refused
        /// and change nothing; freeing everything leaves one block of the whole capacity.
        #[test]
        fn random_sequences_keep_invariants(
            granules in 0u64..64,
            extra in 0u64..GRANULE,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let mut seg = SegmentAllocator::new(granules * GRANULE + extra);
            prop_assert_eq!(seg.capacity(), granules * GRANULE);
            let mut live: Vec<(u64, u64)> = Vec::new();
            let mut freed: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(len) => {
                        // The expected best fit, computed by brute force.
                        let want = SegmentAllocator::rounded(len);
                        let best = seg
                            .free_by_offset
                            .iter()
                            .filter(|&(_, &l)| len > 0 && l >= want)
                            .min_by_key(|&(&o, &l)| (l, o))
                            .map(|(&o, _)| o);
                        let got = seg.alloc(len);
                        prop_assert_eq!(got, best);
                        if let Some(off) = got {
                            prop_assert_eq!(off % GRANULE, 0);
                            prop_assert!(off + want <= seg.capacity());
                            for &(o, l) in &live {
                                let r = SegmentAllocator::rounded(l);
                                prop_assert!(off + want <= o || o + r <= off, "overlap");
                            }
                            live.push((off, len));
                            freed.retain(|&(o, _)| o != off);
                        }
                    }
                    Op::Free(pick) if !live.is_empty() => {
                        let (off, len) = live.swap_remove(pick % live.len());
                        prop_assert!(seg.free(off, len));
                        freed.push((off, len));
                    }
                    Op::DoubleFree(pick) if !freed.is_empty() => {
                        let (off, len) = freed[pick % freed.len()];
                        let before = seg.clone();
                        prop_assert!(!seg.free(off, len));
                        prop_assert_eq!(&seg, &before);
                    }
                    Op::BadFree(off, len) => {
                        let known = live.iter().any(|&(o, l)| {
                            o == off && SegmentAllocator::rounded(l) == SegmentAllocator::rounded(len)
                        });
                        if !known {
                            let before = seg.clone();
                            prop_assert!(!seg.free(off, len));
                            prop_assert_eq!(&seg, &before);
                        }
                    }
                    _ => {}
                }
                check(&seg);
                let used: u64 = live.iter().map(|&(_, l)| SegmentAllocator::rounded(l)).sum();
                prop_assert_eq!(seg.used(), used);
                prop_assert_eq!(seg.used() + seg.free_bytes(), seg.capacity());
                prop_assert_eq!(seg.allocations(), live.len());
                prop_assert!(seg.largest_free() <= seg.free_bytes());
            }
            for (off, len) in live {
                prop_assert!(seg.free(off, len));
            }
            prop_assert_eq!(seg.used(), 0);
            prop_assert_eq!(seg.largest_free(), seg.capacity());
            prop_assert_eq!(seg.free_blocks(), usize::from(seg.capacity() > 0));
            check(&seg);
        }
    }
}
