//! The engine's error type: what every public call returns.

use std::fmt;

use crate::memory::{Access, AddrRange, MemoryError};
use crate::transport::{OpKind, TransportError};

/// Which side of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// This engine's memory.
    Local,
    /// The peer's memory.
    Remote,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

/// Everything that can go wrong in a kvxfer call.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Registering, unregistering or allocating memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// An op asked for zero bytes.
    #[error("op {op}: length is 0")]
    ZeroLengthOp {
        /// Index of the op in the batch.
        op: usize,
    },
    /// An op's address range wraps past the end of the address space.
    #[error(
        "op {op}: {side} address {addr:#x} + {len} bytes wraps past the end of the address space"
    )]
    AddressOverflow {
        /// Index of the op in the batch.
        op: usize,
        /// Which side.
        side: Side,
        /// Start address given.
        addr: u64,
        /// Length given.
        len: u64,
    },
    /// An op's source and destination overlap in the same address space.
    #[error("op {op}: local range {local} and remote range {remote} overlap in this process; an op is copied in parallel pieces, so its ranges must be disjoint")]
    OverlappingOp {
        /// Index of the op in the batch.
        op: usize,
        /// The op's local range.
        local: AddrRange,
        /// The op's remote range.
        remote: AddrRange,
    },
    /// Part of an op's range is not registered.
    #[error("op {op}: {side} range {range} is not registered (no region holds {at:#x})")]
    NotRegistered {
        /// Index of the op in the batch.
        op: usize,
        /// Which side.
        side: Side,
        /// The op's range on that side.
        range: AddrRange,
        /// First address not covered.
        at: u64,
    },
    /// A region lacks the right the op needs.
    #[error("op {op}: a {kind} needs {need} on the {side} range {range}, but region {region} was registered with {granted}")]
    AccessDenied {
        /// Index of the op in the batch.
        op: usize,
        /// Direction of the op.
        kind: OpKind,
        /// Which side.
        side: Side,
        /// The op's range on that side.
        range: AddrRange,
        /// The region that refused.
        region: AddrRange,
        /// The right needed.
        need: Access,
        /// The rights the region has.
        granted: Access,
    },
    /// The batch is larger than the engine allows.
    #[error("batch needs {slices}+ slices, more than max_slices_per_batch ({max}); split it")]
    BatchTooLarge {
        /// Slices needed (at least).
        slices: usize,
        /// The limit.
        max: usize,
    },
    /// Too many batches were submitted and not freed.
    #[error("{max} batches are already unfreed (max_batches); free finished batches")]
    TooManyBatches {
        /// The limit.
        max: usize,
    },
    /// The batch id was never issued, was already freed, or is forged.
    #[error("unknown batch id {0:#x}: never issued, already freed, or forged")]
    UnknownBatch(u64),
    /// The peer id was never issued or was closed.
    #[error("unknown peer id {0:#x}: never opened, or already closed")]
    UnknownPeer(u64),
    /// `free` was called on a batch that has not ended.
    #[error("batch {0:#x} is still in progress; wait for it or cancel it before freeing it")]
    BatchInProgress(u64),
    /// The batch was cancelled before all of it moved.
    #[error("batch cancelled before all of its bytes moved")]
    Cancelled,
    /// The batch reached its deadline before all of it moved.
    #[error("batch timed out: its deadline passed before all of its bytes moved")]
    TimedOut,
    /// A transport failed to move op `op`.
    #[error("op {op}: {source}")]
    Transport {
        /// Index of the first failing op.
        op: usize,
        /// What the transport said.
        #[source]
        source: TransportError,
    },
    /// A configuration value is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A peer could not be reached or answered wrongly.
    #[error("peer {session}: {reason}")]
    Peer {
        /// The peer's session id.
        session: String,
        /// What went wrong and what to check.
        reason: String,
    },
    /// A batch touches GPU memory that the transport chosen cannot reach (it would copy
    /// with the CPU).
    #[error("the batch touches {location} memory, which {transport} cannot reach: it moves bytes with the CPU (GPU memory needs the CUDA driver in this process, or RDMA with the memory registered on the NIC)")]
    GpuUnreachable {
        /// Where the memory is.
        location: crate::memory::Location,
        /// The transport that would have carried the batch.
        transport: crate::transport::TransportKind,
    },
    /// A batch uses a registered GPU region whose memory is no longer allocated (freed
    /// without being unregistered); nothing was submitted.
    #[error("the batch uses {location} memory registered as {range}, which is no longer device memory ({reason}); unregister memory before freeing it. Nothing was submitted")]
    GpuMemoryGone {
        /// The registered region.
        range: crate::memory::AddrRange,
        /// Its location.
        location: crate::memory::Location,
        /// What the driver says.
        reason: String,
    },
    /// A session id is not `host:port`.
    #[error("bad session id {session:?}: {reason}")]
    BadSession {
        /// What was given.
        session: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A notification larger than peers accept; nothing was submitted.
    #[error("a notification of {len} bytes exceeds the limit of {max} bytes; nothing was sent")]
    NotificationTooLarge {
        /// Bytes given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Every byte moved but the notification could not be delivered.
    #[error("the batch's bytes moved but its notification was not delivered: {0}")]
    Notify(String),
    /// The engine runs without a listener (`listen: None`), so it has no remote peers.
    #[error("this engine has no listener (config listen = None): it cannot open remote peers")]
    NoListener,
    /// The engine could not start (threads, sockets).
    #[error("engine start failed: {0}")]
    Start(String),
}

impl Error {
    /// Whether this is a check against the peer's regions failing (which a fresher copy
    /// of its descriptor might pass).
    pub(crate) fn is_remote_miss(&self) -> bool {
        matches!(
            self,
            Error::NotRegistered {
                side: Side::Remote,
                ..
            } | Error::AccessDenied {
                side: Side::Remote,
                ..
            }
        )
    }
}

/// Result of kvxfer calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
