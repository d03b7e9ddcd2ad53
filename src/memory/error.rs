//! Errors of memory registration.

use std::sync::Arc;

use super::{AddrRange, Location, LocationParseError};

/// What went wrong registering, unregistering or allocating memory.
#[derive(Clone, Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region (or buffer) of zero bytes was asked for.
    #[error("cannot register or allocate {range}: zero length")]
    ZeroLength {
        /// The empty range.
        range: AddrRange,
    },
    /// Address 0 (NULL) was given.
    #[error("cannot register {len} bytes at address 0 (NULL)")]
    NullAddress {
        /// Length given.
        len: u64,
    },
    /// `addr + len` does not fit in the address space.
    #[error("cannot register {len} bytes at {addr:#x}: the range wraps past the end of the address space")]
    AddressOverflow {
        /// Start address given.
        addr: u64,
        /// Length given.
        len: u64,
    },
    /// The new region overlaps one that is registered (or another in the same batch).
    #[error("cannot register {range}: it overlaps the registered region {existing}; unregister that first")]
    Overlap {
        /// The range being registered.
        range: AddrRange,
        /// The region already there.
        existing: AddrRange,
    },
    /// Two regions of one registration call overlap each other.
    #[error("cannot register {range}: it overlaps {other}, another region of the same call")]
    OverlapInRequest {
        /// One of the two.
        range: AddrRange,
        /// The other.
        other: AddrRange,
    },
    /// Unregister was given an address that starts no registered region.
    #[error("cannot unregister {addr:#x}: no registered region starts there")]
    NotRegistered {
        /// The address given.
        addr: u64,
    },
    /// The region was made by `Engine::allocate`; it goes away when its buffer is dropped.
    #[error("cannot unregister {range}: it is an engine-allocated buffer; drop the buffer (kvx_buffer_free) instead")]
    OwnedByBuffer {
        /// The buffer's range.
        range: AddrRange,
    },
    /// The region is still used by unfinished batches.
    #[error("cannot unregister {range}: {batches} unfinished batch(es) still use it; wait for or cancel them first")]
    Busy {
        /// The region.
        range: AddrRange,
        /// How many batches hold it.
        batches: usize,
    },
    /// A same-host peer is copying into or out of the region right now.
    #[error("cannot unregister {range}: a same-host peer is copying into or out of it right now ({copies} copies); retry once its transfer is done")]
    PeerBusy {
        /// The region.
        range: AddrRange,
        /// Copies in flight.
        copies: u64,
    },
    /// A location string could not be parsed.
    #[error(transparent)]
    BadLocation(#[from] LocationParseError),
    /// The location cannot be used for this operation.
    #[error("location {location} is not supported here: {reason}")]
    UnsupportedLocation {
        /// The location asked for.
        location: Location,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// Memory labelled (or detected as) GPU memory that is not device memory the CUDA
    /// driver knows, or not all of one allocation.
    #[error("cannot register {range} as {location} memory: {reason}")]
    NotGpuMemory {
        /// What was asked for.
        range: AddrRange,
        /// The GPU location given or detected.
        location: Location,
        /// What the driver says.
        reason: String,
    },
    /// The operating system refused to create the memory.
    #[error("cannot allocate {len} bytes at {location}: {source}")]
    AllocationFailed {
        /// Bytes asked for.
        len: usize,
        /// Location asked for.
        location: Location,
        /// What the OS said.
        #[source]
        source: Arc<std::io::Error>,
    },
}
