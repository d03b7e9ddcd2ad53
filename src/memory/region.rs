//! One registered region.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Access, Location};
use crate::sys::shm::SharedMapping;

/// A half-open address range `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrRange {
    /// First byte.
    pub start: u64,
    /// Number of bytes.
    pub len: u64,
}

impl AddrRange {
    /// The range `[start, start + len)`.
    pub fn new(start: u64, len: u64) -> Self {
        AddrRange { start, len }
    }

    /// One past the last byte, or `None` if that overflows u64.
    pub fn checked_end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }

    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }

    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.start < other.end() && other.start < self.end()
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) ({} bytes)",
            self.start,
            self.end(),
            self.len
        )
    }
}

/// Who owns the bytes of a region.
#[derive(Debug)]
pub(crate) enum Backing {
    /// The caller's memory; the caller keeps it valid until it unregisters.
    Caller,
    /// A memfd mapping the engine made (`Engine::allocate`); it is unmapped only when the
    /// last holder of the region (the buffer, or a batch still using it) lets go.
    Owned(SharedMapping),
}

/// A registered region. Batches hold it (an `Arc`) while they run, which is what makes
/// `unregister` of a busy region fail instead of freeing memory under a transfer.
#[derive(Debug)]
pub struct Region {
    range: AddrRange,
    location: Location,
    access: Access,
    pub(crate) backing: Backing,
    /// Unfinished batches that use this region.
    pins: AtomicUsize,
}

impl Region {
    pub(crate) fn new(
        range: AddrRange,
        location: Location,
        access: Access,
        backing: Backing,
    ) -> Self {
        Region {
            range,
            location,
            access,
            backing,
            pins: AtomicUsize::new(0),
        }
    }

    /// The memfd mapping behind engine-allocated memory (`None` for caller memory).
    pub(crate) fn shared_mapping(&self) -> Option<&SharedMapping> {
        match &self.backing {
            Backing::Owned(mapping) => Some(mapping),
            Backing::Caller => None,
        }
    }

    /// The registered address range.
    pub fn range(&self) -> AddrRange {
        self.range
    }

    /// Where the bytes live.
    pub fn location(&self) -> Location {
        self.location
    }

    /// The rights granted.
    pub fn access(&self) -> Access {
        self.access
    }

    /// How many unfinished batches use the region now.
    pub fn pins(&self) -> usize {
        self.pins.load(Ordering::Acquire)
    }

    /// Marks the region as used by one more unfinished batch. Call with the registry's
    /// read lock held so that `unregister` (write lock) sees a consistent count.
    pub(crate) fn pin(&self) {
        self.pins.fetch_add(1, Ordering::AcqRel);
    }

    /// Undoes one `pin` when the batch ends.
    pub(crate) fn unpin(&self) {
        // Never wrap below zero (that would make the region look busy forever); an unpin
        // without a pin is a bug worth a log line, not a crash in a copy thread.
        let unpinned = self
            .pins
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if unpinned.is_err() {
            log::error!(
                "kvxfer bug: region {} unpinned more often than pinned",
                self.range
            );
        }
    }
}
