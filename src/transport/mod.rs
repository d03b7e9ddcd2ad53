//! Ways bytes move. A transport turns slices into completions; it knows nothing of batches
//! or peers' names. The engine hands it a [`SliceSource`] (the slices of one batch, already
//! checked against both sides' registered regions) and the transport claims ranges of
//! slices, moves them and reports each range complete exactly once.
//!
//! Contract for every transport: after `complete` returns for a range, the transport never
//! touches the memory of those slices again. That is what lets cancel and timeout promise
//! that the caller's buffers are free once the batch has ended.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

pub mod copy;
pub mod cuda;
pub mod local;
pub mod rdma;
pub mod shm;
pub mod staging;
pub mod tcp;

/// Direction of an op, seen from the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Copy remote bytes into local memory.
    Read,
    /// Copy local bytes into remote memory.
    Write,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Read => "READ",
            OpKind::Write => "WRITE",
        })
    }
}

/// The unit a transport moves: a piece of one op that lies inside one local and one remote
/// region and is at most the engine's slice size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Direction.
    pub kind: OpKind,
    /// Index of the op (in its batch) this slice belongs to.
    pub op: u32,
    /// Bytes.
    pub len: u32,
    /// Local address.
    pub local: u64,
    /// Remote (target) address.
    pub remote: u64,
}

/// The work of one batch as a transport sees it.
pub trait SliceSource: Send + Sync {
    /// All slices of the batch; only claimed indices may be moved.
    fn slices(&self) -> &[Slice];
    /// Claims the next range of slices to move; `None` when nothing is left to claim (all
    /// claimed, or the batch was stopped: cancelled, timed out or failed).
    fn claim(&self) -> Option<Range<usize>>;
    /// Reports a claimed range as moved (`Ok`) or failed. Called exactly once per claimed
    /// slice; after it returns the transport must not touch those slices' memory.
    fn complete(&self, range: Range<usize>, result: Result<(), TransportError>);
    /// Whether the batch was stopped (cancelled, failed, or past its deadline, which this
    /// call enforces). Transports that cannot interrupt a slice in flight (a network
    /// request) poll this to decide when to abandon a connection.
    fn is_stopped(&self) -> bool;
    /// Whether the batch touches GPU memory (either side, by the regions' locations): its
    /// bytes must be moved by a GPU, never by CPU copies.
    fn touches_gpu(&self) -> bool {
        false
    }
    /// The device of the batch's local GPU memory (by the regions' locations), if any: a
    /// transport that moves bytes with the CPU stages that end.
    fn local_gpu(&self) -> Option<u32> {
        None
    }
}

/// A way of moving slices.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// One line for `Engine::transports()`: what it runs on and how.
    fn describe(&self) -> String;
    /// Whether it can move batches that touch GPU memory (either end) without the CPU
    /// touching that memory: RDMA (registered on the NIC), the GPU's copy engines, shared
    /// memory (copies by the GPU, the peer's memory through CUDA IPC), and a transport
    /// wrapped in [`staging::StagedTransport`].
    fn reaches_gpu(&self) -> bool {
        false
    }
    /// Hands the batch to the transport's own progress threads; returns at once.
    fn post(&self, work: Arc<dyn SliceSource>);
    /// Lets a waiting caller move slices of `work` itself instead of sleeping, where the
    /// transport can (in-process copies). Returns when nothing is left to claim or, between
    /// two claimed ranges, once `until` has passed.
    fn progress(&self, work: &dyn SliceSource, until: Instant) {
        let _ = (work, until);
    }
}

/// The transports kvxfer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// In-process copies (the engine is its own peer).
    Local,
    /// Same host, another process: copies through shared mappings (memfd) or cross-memory
    /// attach (`process_vm_readv` / `process_vm_writev`).
    Shm,
    /// TCP connections driven by io_uring.
    Tcp,
    /// One-sided RDMA over verbs queue pairs.
    Rdma,
    /// The GPU's copy engines (CUDA), for in-process batches that touch GPU memory.
    Cuda,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Local => "local",
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
            TransportKind::Cuda => "cuda",
        })
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "local" => Ok(TransportKind::Local),
            "shm" => Ok(TransportKind::Shm),
            "tcp" => Ok(TransportKind::Tcp),
            "rdma" => Ok(TransportKind::Rdma),
            "cuda" => Ok(TransportKind::Cuda),
            other => Err(format!(
                "unknown transport {other:?}: expected local, shm, rdma, tcp or cuda"
            )),
        }
    }
}

/// Parses a comma-separated transport list (`"shm,tcp"`): in order, no repeats, not empty.
pub fn parse_transport_list(s: &str) -> Result<Vec<TransportKind>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let kind: TransportKind = part.parse()?;
        if out.contains(&kind) {
            return Err(format!("transport {kind} is listed twice in {s:?}"));
        }
        out.push(kind);
    }
    Ok(out)
}

/// A transport as reported by `Engine::transports()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportInfo {
    /// Which one.
    pub kind: TransportKind,
    /// What it runs on, or why it is not used.
    pub detail: String,
}

/// A slice range that could not be moved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{transport} transport failed: {reason}")]
pub struct TransportError {
    /// Which transport.
    pub transport: TransportKind,
    /// What happened.
    pub reason: String,
}
