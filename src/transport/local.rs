//! In-process transport: the engine is its own peer, so a slice is one `memmove` between
//! two registered ranges, done by the engine's copy pool (and by waiting callers, which
//! help instead of sleeping).

use std::sync::Arc;
use std::time::Instant;

use super::copy::{self, CopyPool, Mover};
use super::{OpKind, Slice, SliceSource, Transport, TransportError, TransportKind};

/// The in-process copy transport.
#[derive(Debug)]
pub struct LocalTransport {
    pool: Arc<CopyPool>,
}

/// Copies within this process.
struct Memmove;

impl LocalTransport {
    /// Starts `threads` copy threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        Ok(LocalTransport {
            pool: Arc::new(CopyPool::new(threads)?),
        })
    }

    /// Number of copy threads.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The copy pool, shared with the other transports that move bytes by CPU copies.
    pub fn pool(&self) -> &Arc<CopyPool> {
        &self.pool
    }

    /// Stops and joins the copy threads (idempotent). The engine calls this once every
    /// batch has ended, so no copy thread outlives it; nothing may be posted afterwards.
    pub(crate) fn shutdown(&self) {
        self.pool.shutdown();
    }
}

impl Transport for LocalTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Local
    }

    fn describe(&self) -> String {
        format!("in-process memmove, {} copy threads", self.threads())
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        self.pool.post(work, Arc::new(Memmove));
    }

    fn progress(&self, work: &dyn SliceSource, until: Instant) {
        copy::drain(work, &Memmove, Some(until));
    }
}

impl Mover for Memmove {
    fn kind(&self) -> TransportKind {
        TransportKind::Local
    }

    fn move_slices(&self, slices: &[Slice], gpu: bool) -> Result<(), TransportError> {
        if gpu {
            // The engine sends such batches to the GPU copy transport; never memmove them.
            return Err(TransportError {
                transport: TransportKind::Local,
                reason: "a batch touching GPU memory reached the CPU copy path (a bug)".into(),
            });
        }
        slices.iter().for_each(copy);
        Ok(())
    }
}

fn copy(slice: &Slice) {
    let (src, dst) = match slice.kind {
        OpKind::Write => (slice.local, slice.remote),
        OpKind::Read => (slice.remote, slice.local),
    };
    // SAFETY: before posting, the engine checked that both ranges lie entirely inside
    // registered regions with the rights this direction needs, and pinned those regions
    // for the life of the batch: caller memory cannot be unregistered (Busy) and engine
    // memory stays mapped while the batch holds it, so both ranges are valid for `len`
    // bytes until `complete` is called for this slice. The engine refuses ops whose two
    // ranges overlap in one process; `copy` (memmove) is used anyway so that even such a
    // slice could not be undefined behaviour.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, slice.len as usize) };
}
