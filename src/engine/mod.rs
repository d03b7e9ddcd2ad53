//! The engine: registered memory, peers, transports and batches.

mod batch;
mod config;
mod error;
mod progress;
mod slab;
mod slicing;
mod stats;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

pub use config::{EngineConfig, EngineConfigBuilder, SLICE_SIZE_RANGE};
pub use error::{Error, Result, Side};
pub use progress::Outcome;
pub use slicing::Op;
pub use stats::EngineStats;

use batch::{far_future, Batch};
use progress::StopReason;
use slab::GenSlab;
use slicing::{AddressSpaces, Pins};
use stats::Counters;

use crate::memory::{Access, Buffer, Location, Region, RegionSpec, Registry};
use crate::transport::local::LocalTransport;
use crate::transport::{Transport, TransportInfo, TransportKind};

/// Names a peer of this engine. Ids carry a generation: a closed peer's id stays invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerId(u64);

/// Names a submitted batch. Ids carry a generation: a freed batch's id stays invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchId(u64);

macro_rules! raw_id {
    ($t:ident) => {
        impl $t {
            /// The id as a number (for the C ABI and logs).
            pub fn raw(self) -> u64 {
                self.0
            }

            /// An id from a number. Any number is accepted here; one that was never issued
            /// is refused by the engine call that uses it.
            pub fn from_raw(raw: u64) -> Self {
                $t(raw)
            }
        }
    };
}
raw_id!(PeerId);
raw_id!(BatchId);

/// The state of a batch.
#[derive(Clone, Debug)]
pub enum BatchState {
    /// Still moving bytes.
    InProgress,
    /// Every byte moved.
    Completed,
    /// A slice failed; the first error. Bytes of other ops may or may not have moved.
    Failed(Error),
    /// Cancelled before every byte moved.
    Cancelled,
    /// Its deadline passed before every byte moved.
    TimedOut,
}

impl BatchState {
    /// Whether the batch has ended (anything but `InProgress`). Once ended, no transport
    /// touches the batch's buffers any more.
    pub fn is_finished(&self) -> bool {
        !matches!(self, BatchState::InProgress)
    }

    /// `Ok(true)` when completed, `Ok(false)` while in progress, the error otherwise.
    pub fn into_result(self) -> Result<bool> {
        match self {
            BatchState::InProgress => Ok(false),
            BatchState::Completed => Ok(true),
            BatchState::Failed(e) => Err(e),
            BatchState::Cancelled => Err(Error::Cancelled),
            BatchState::TimedOut => Err(Error::TimedOut),
        }
    }
}

/// What a peer's bytes are reached through.
#[derive(Debug)]
enum Segment {
    /// The engine itself: remote addresses are this engine's own registered regions.
    Loopback,
}

#[derive(Debug)]
struct Peer {
    name: String,
    transport: Arc<dyn Transport>,
    segment: Segment,
}

/// A kvxfer engine. `Send + Sync`: submit, wait and register from any thread.
///
/// ```
/// use kvxfer::{Engine, EngineConfig, Location, Op};
///
/// let engine = Engine::new(EngineConfig::default())?;
/// let src = engine.allocate(1 << 20, Location::Any)?;
/// let dst = engine.allocate(1 << 20, Location::Any)?;
/// src.fill(0, 1 << 20, 0xab)?;
/// engine.transfer_sync(engine.local_peer(), &[Op::write(src.addr(), dst.addr(), 1 << 20)])?;
/// assert!(dst.to_vec().iter().all(|&b| b == 0xab));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    registry: Arc<Registry>,
    local: Arc<LocalTransport>,
    peers: RwLock<GenSlab<Arc<Peer>>>,
    loopback: PeerId,
    batches: Mutex<GenSlab<Arc<Batch>>>,
    counters: Arc<Counters>,
}

impl Engine {
    /// Starts an engine. `KVX_*` environment variables override `config` (see
    /// [`EngineConfig::with_env_overrides`]).
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let config = config.with_env_overrides(|name| std::env::var(name).ok())?;
        config.validate()?;
        let local = Arc::new(
            LocalTransport::new(config.copy_threads)
                .map_err(|e| Error::Start(format!("cannot start copy threads: {e}")))?,
        );
        let mut peers = GenSlab::default();
        let loopback = PeerId(peers.insert(Arc::new(Peer {
            name: "self".into(),
            transport: Arc::clone(&local) as Arc<dyn Transport>,
            segment: Segment::Loopback,
        })));
        log::debug!("engine started: {config:?}");
        Ok(Engine {
            config,
            registry: Arc::new(Registry::new()),
            local,
            peers: RwLock::new(peers),
            loopback,
            batches: Mutex::new(GenSlab::default()),
            counters: Arc::default(),
        })
    }

    /// The configuration in force (after environment overrides).
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Registers `[addr, addr + len)` with `access`. `location: None` detects it (`cpu:N`
    /// from the NUMA node of the first page, `*` when unknown).
    ///
    /// # Safety
    /// The range must be memory of this process, valid for reads and writes, and stay so
    /// until it is unregistered (or the engine is dropped): transfers read and write it
    /// without further checks by Rust. Nothing else may rely on its contents not changing
    /// while a batch that writes it runs.
    pub unsafe fn register(
        &self,
        addr: u64,
        len: u64,
        location: Option<Location>,
        access: Access,
    ) -> Result<()> {
        self.registry
            .register(vec![RegionSpec::caller(addr, len, location, access)])?;
        Ok(())
    }

    /// Registers every region or none (the first bad one is the error).
    ///
    /// # Safety
    /// As for [`Engine::register`], for every region.
    pub unsafe fn register_batch(&self, regions: Vec<RegionSpec>) -> Result<()> {
        self.registry.register(regions)?;
        Ok(())
    }

    /// Unregisters the region starting at `addr`. Fails with `Busy` while an unfinished
    /// batch uses it; after `Ok` the memory may be freed.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        self.registry.unregister(addr)?;
        Ok(())
    }

    /// Allocates `len` bytes of registered host memory on `location` (memfd-backed, every
    /// access right). Dropping the buffer unregisters and unmaps it.
    pub fn allocate(&self, len: usize, location: Location) -> Result<Buffer> {
        self.allocate_with_access(len, location, Access::ALL)
    }

    /// [`Engine::allocate`] with chosen access rights.
    pub fn allocate_with_access(
        &self,
        len: usize,
        location: Location,
        access: Access,
    ) -> Result<Buffer> {
        Ok(Buffer::allocate(&self.registry, len, location, access)?)
    }

    /// The registered region holding `addr`.
    pub fn region(&self, addr: u64) -> Option<Arc<Region>> {
        self.registry.lookup(addr)
    }

    /// The peer that is this engine itself (its remote memory is its own registry).
    pub fn local_peer(&self) -> PeerId {
        self.loopback
    }

    /// The transport batches to `peer` use.
    pub fn peer_transport(&self, peer: PeerId) -> Result<TransportKind> {
        Ok(self.peer(peer)?.transport.kind())
    }

    /// The name of `peer` (`self` for the local peer).
    pub fn peer_name(&self, peer: PeerId) -> Result<String> {
        Ok(self.peer(peer)?.name.clone())
    }

    /// The transports this engine runs.
    pub fn transports(&self) -> Vec<TransportInfo> {
        vec![TransportInfo {
            kind: self.local.kind(),
            detail: self.local.describe(),
        }]
    }

    /// Submits `ops` to `peer` with the default deadline (`batch_timeout` from now).
    pub fn submit(&self, peer: PeerId, ops: &[Op]) -> Result<BatchId> {
        self.submit_with_deadline(peer, ops, deadline_after(self.config.batch_timeout))
    }

    /// Submits `ops` to `peer`; the batch times out at `deadline`. Every op is checked
    /// against both sides' registered regions first: on any violation nothing moves and
    /// the error names the op.
    ///
    /// The ops of a batch move in parallel pieces and in no set order (as RDMA work
    /// requests do): if one op's destination overlaps bytes another op of the same batch
    /// reads or writes, the result there is unspecified. Put dependent copies in separate
    /// batches. On the local peer an op whose own two ranges partly overlap is refused.
    pub fn submit_with_deadline(
        &self,
        peer: PeerId,
        ops: &[Op],
        deadline: Instant,
    ) -> Result<BatchId> {
        let submitted = self.try_submit(peer, ops, deadline);
        if submitted.is_err() {
            self.counters.refused();
        }
        submitted
    }

    fn try_submit(&self, peer: PeerId, ops: &[Op], deadline: Instant) -> Result<BatchId> {
        let peer = self.peer(peer)?;
        let max = self.config.max_slices_per_batch;
        if ops.len() > max {
            return Err(Error::BatchTooLarge {
                slices: ops.len(),
                max,
            });
        }
        let slice_size = self.config.slice_size as u64;
        let mut slices = Vec::with_capacity(ops.len());
        let mut pins = Pins::default();
        {
            let map = self.registry.read();
            let (remote, spaces) = match peer.segment {
                Segment::Loopback => (&*map, AddressSpaces::Same),
            };
            for (i, op) in ops.iter().enumerate() {
                // Refuse before cutting: an op needs at least len / slice_size slices.
                let at_least = (op.len.div_ceil(slice_size) as usize).saturating_add(slices.len());
                if at_least > max {
                    return Err(Error::BatchTooLarge {
                        slices: at_least,
                        max,
                    });
                }
                slicing::slice_op(
                    i,
                    op,
                    slice_size,
                    &*map,
                    remote,
                    spaces,
                    &mut slices,
                    &mut pins,
                )?;
            }
            if slices.len() > max {
                return Err(Error::BatchTooLarge {
                    slices: slices.len(),
                    max,
                });
            }
            pins.pin_all();
        }
        let empty = slices.is_empty();
        let transport = Arc::clone(&peer.transport);
        let batch = Arc::new(Batch::new(
            slices,
            pins,
            deadline,
            transport,
            self.local.threads(),
            self.config.slice_size,
            Arc::clone(&self.counters),
        ));
        let id = {
            let mut batches = self.batches();
            if batches.len() >= self.config.max_batches {
                return Err(Error::TooManyBatches {
                    max: self.config.max_batches,
                });
            }
            batches.insert(Arc::clone(&batch))
        };
        self.counters.submitted();
        if empty {
            // A batch of no ops ends at creation, before anyone could count it.
            self.counters.ended(Outcome::Completed, 0);
        }
        if batch.outcome().is_none() {
            peer.transport.post(batch);
        }
        Ok(BatchId(id))
    }

    /// The state of a batch, in O(1). A batch past its deadline is stopped here (without
    /// blocking): it reports `TimedOut` as soon as slices already being moved finish.
    pub fn status(&self, batch: BatchId) -> Result<BatchState> {
        let batch = self.batch(batch)?;
        if batch.outcome().is_none() && Instant::now() >= batch.deadline {
            batch.stop(StopReason::TimedOut);
        }
        Ok(state_of(&batch))
    }

    /// Waits up to `timeout` for the batch to end and returns its state (`InProgress` if
    /// the wait ran out first). If the batch's own deadline passes during the wait, the
    /// batch is stopped and this returns `TimedOut` once nothing can touch its buffers.
    pub fn wait(&self, batch: BatchId, timeout: Duration) -> Result<BatchState> {
        let batch = self.batch(batch)?;
        let until = deadline_after(timeout).min(batch.deadline);
        if batch.wait_until(until).is_none() && Instant::now() >= batch.deadline {
            batch.stop(StopReason::TimedOut);
            batch.wait_until(far_future());
        }
        Ok(state_of(&batch))
    }

    /// Cancels a batch and returns once no transport can touch its buffers any more. The
    /// returned state is `Cancelled`, or how it ended if it had already ended (or ended
    /// while being cancelled, every byte moved).
    pub fn cancel(&self, batch: BatchId) -> Result<BatchState> {
        let batch = self.batch(batch)?;
        batch.stop(StopReason::Cancelled);
        batch.wait_until(far_future());
        Ok(state_of(&batch))
    }

    /// Forgets an ended batch; its id becomes invalid. A batch still in progress is
    /// refused (`BatchInProgress`): wait for it or cancel it first.
    pub fn free(&self, batch: BatchId) -> Result<()> {
        let mut batches = self.batches();
        let entry = batches.get(batch.0).ok_or(Error::UnknownBatch(batch.0))?;
        if entry.outcome().is_none() {
            return Err(Error::BatchInProgress(batch.0));
        }
        batches.remove(batch.0);
        Ok(())
    }

    /// Submits, waits until the batch ends (at the latest at its deadline) and frees it.
    pub fn transfer_sync(&self, peer: PeerId, ops: &[Op]) -> Result<()> {
        let id = self.submit(peer, ops)?;
        let state = self.wait(id, Duration::MAX)?;
        self.free(id)?;
        state.into_result().map(drop)
    }

    /// What the engine has done since it started.
    pub fn stats(&self) -> EngineStats {
        self.counters.snapshot()
    }

    /// Number of batches submitted and not freed.
    pub fn live_batches(&self) -> usize {
        self.batches().len()
    }

    fn peer(&self, peer: PeerId) -> Result<Arc<Peer>> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers.get(peer.0).cloned().ok_or(Error::UnknownPeer(peer.0))
    }

    fn batch(&self, batch: BatchId) -> Result<Arc<Batch>> {
        self.batches()
            .get(batch.0)
            .cloned()
            .ok_or(Error::UnknownBatch(batch.0))
    }

    fn batches(&self) -> MutexGuard<'_, GenSlab<Arc<Batch>>> {
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Engine {
    /// Cancels every unfinished batch and waits until none can touch memory, so that
    /// dropping the engine never leaves a copy running into freed buffers; then joins the
    /// copy threads.
    fn drop(&mut self) {
        let live: Vec<Arc<Batch>> = self.batches().values().cloned().collect();
        for batch in live {
            batch.stop(StopReason::Cancelled);
            batch.wait_until(far_future());
        }
        // No batch can touch memory any more; stop the copy threads now rather than when
        // the last batch handle goes, so none outlives the engine.
        self.local.shutdown();
    }
}

fn deadline_after(timeout: Duration) -> Instant {
    Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(far_future)
}

fn state_of(batch: &Batch) -> BatchState {
    match batch.outcome() {
        None => BatchState::InProgress,
        Some(Outcome::Completed) => BatchState::Completed,
        Some(Outcome::Cancelled) => BatchState::Cancelled,
        Some(Outcome::TimedOut) => BatchState::TimedOut,
        Some(Outcome::Failed) => BatchState::Failed(
            batch
                .error()
                .cloned()
                .unwrap_or_else(|| Error::Start("batch failed without an error".into())),
        ),
    }
}
