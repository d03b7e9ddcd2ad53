//! GPU memory over a transport that moves bytes with the CPU (TCP): the GPU end of each
//! slice goes through pinned host bounce buffers ("slots"), with the copies pipelined
//! against the network.
//!
//! A batch whose local end is GPU memory gets a stager thread. It cuts the batch's claimed
//! slices into pieces of at most `PIECE` bytes and fills chunks of up to `SLOT` bytes of
//! GPU data, one bounce slot each, at most `SLOTS` chunks in flight:
//! - WRITE: the GPU piece is copied into the slot (`cuMemcpyAsync` on a stream of the
//!   device), and once the chunk's copies are done the chunk is posted to the inner
//!   transport with the slot as its local end. While the network sends chunk k, the GPU
//!   copies chunk k+1.
//! - READ: the chunk is posted with the slot as its local end; when the inner transport has
//!   landed it, the stager copies the slot into GPU memory, then reports the slices done.
//!
//! Pieces whose local end is host memory go straight through (their local end unchanged).
//! The remote end is the peer's business: its server stages its own GPU memory
//! (`tcp::serve`). A batch with no local GPU end is posted to the inner transport as it is.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, PoisonError};

use super::{OpKind, Slice, SliceSource, Transport, TransportError, TransportKind};
use crate::sys::cuda::{self, Cuda, PinnedHost, Stream};

/// Bytes of GPU data per chunk (one pinned bounce slot).
const SLOT: u64 = 16 << 20;
/// Chunks in flight per batch: one being copied, the rest on the wire.
const SLOTS: usize = 4;
/// Largest piece handed to the inner transport (a TCP request groups a few).
const PIECE: u64 = 1 << 20;
/// Pieces per claim of a chunk.
const CLAIM: usize = 4;
/// Pieces per chunk at most (host pieces take no slot space).
const MAX_PIECES: usize = 1024;
/// Idle slots kept for later batches.
const KEEP_SLOTS: usize = 2 * SLOTS;

/// A transport that stages the local GPU end of its batches through pinned host memory.
pub struct StagedTransport {
    inner: Arc<dyn Transport>,
    shared: Arc<Shared>,
}

/// What the stager threads of one transport share: idle bounce slots and the streams.
#[derive(Default)]
struct Shared {
    slots: Mutex<Vec<PinnedHost>>,
    streams: Mutex<HashMap<u32, Arc<Stream>>>,
}

impl std::fmt::Debug for StagedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedTransport")
            .field("inner", &self.inner)
            .finish()
    }
}

impl StagedTransport {
    /// Wraps `inner` (which must move bytes from and to host memory only).
    pub fn new(inner: Arc<dyn Transport>) -> StagedTransport {
        StagedTransport {
            inner,
            shared: Arc::default(),
        }
    }
}

fn error(transport: TransportKind, reason: impl Into<String>) -> TransportError {
    TransportError {
        transport,
        reason: reason.into(),
    }
}

impl Transport for StagedTransport {
    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        format!(
            "{}; GPU memory staged through pinned host buffers",
            self.inner.describe()
        )
    }

    fn reaches_gpu(&self) -> bool {
        true
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        // The engine's region labels say whether this end is GPU memory (checked live at
        // submit); without the driver in use there is no GPU memory here.
        let (Some(device), Some(cuda)) = (work.local_gpu(), cuda::driver_in_use()) else {
            return self.inner.post(work);
        };
        let stager = Stager {
            work: Arc::clone(&work),
            inner: Arc::clone(&self.inner),
            shared: Arc::clone(&self.shared),
            cuda,
            device,
        };
        let spawned = std::thread::Builder::new()
            .name("kvx-stage".into())
            .spawn(move || stager.run());
        if let Err(e) = spawned {
            let kind = self.inner.kind();
            while let Some(range) = work.claim() {
                let why = format!("cannot start a staging thread: {e}");
                work.complete(range, Err(error(kind, why)));
            }
        }
    }
}

/// A claimed range of the batch and the bytes of it not yet accounted for.
struct Outer {
    range: Range<usize>,
    left: u64,
    error: Option<TransportError>,
}

/// Where staging stands in the claimed slices: outer range, slice index, bytes done.
#[derive(Clone, Copy)]
struct Cursor {
    outer: usize,
    slice: usize,
    offset: u64,
}

/// A chunk in flight: the inner transport's work and what the stager needs afterwards.
struct Chunk {
    work: Arc<ChunkWork>,
    slot: PinnedHost,
    /// Per piece: its outer range and, for a GPU piece, (device, real local address).
    owners: Vec<usize>,
    gpu: Vec<Option<(u32, u64)>>,
}

struct Stager {
    work: Arc<dyn SliceSource>,
    inner: Arc<dyn Transport>,
    shared: Arc<Shared>,
    cuda: &'static Cuda,
    /// The GPU of the batch's local memory: bounce slots are allocated in its context.
    device: u32,
}

impl Stager {
    fn run(self) {
        let (done_tx, done_rx) = channel::<usize>();
        let mut outers: Vec<Outer> = Vec::new();
        let mut cursor: Option<Cursor> = None;
        let mut chunks: HashMap<usize, Chunk> = HashMap::new();
        let mut next_id = 0usize;
        let mut exhausted = false;
        loop {
            while chunks.len() < SLOTS && !exhausted {
                let slot = match self.take_slot() {
                    Ok(slot) => slot,
                    // A chunk in flight gives its slot back soon: wait for it.
                    Err(_) if !chunks.is_empty() => break,
                    Err(why) => {
                        self.fail_rest(&mut outers, &mut cursor, why);
                        exhausted = true;
                        break;
                    }
                };
                match self.build_chunk(slot, &mut outers, &mut cursor, next_id, &done_tx) {
                    Ok(Some(chunk)) => {
                        self.inner
                            .post(Arc::clone(&chunk.work) as Arc<dyn SliceSource>);
                        chunks.insert(next_id, chunk);
                        next_id += 1;
                    }
                    Ok(None) => exhausted = true,
                    Err((pieces, why)) => {
                        // Nothing of this chunk was posted: its pieces fail here.
                        let failure = error(self.inner.kind(), why);
                        for (owner, len) in pieces {
                            self.account(&mut outers, owner, len, Some(&failure));
                        }
                    }
                }
            }
            if chunks.is_empty() {
                break;
            }
            // Every posted chunk reports: the inner transport completes each claimed piece
            // exactly once, and a chunk whose batch stopped completes its unclaimed ones.
            let Ok(id) = done_rx.recv() else { break };
            if let Some(chunk) = chunks.remove(&id) {
                self.finish(chunk, &mut outers);
            }
        }
    }

    /// Without a bounce slot and nothing in flight to free one, the rest of the batch
    /// fails: the remainder of the range being cut and every range not yet claimed.
    fn fail_rest(&self, outers: &mut [Outer], cursor: &mut Option<Cursor>, why: String) {
        let failure = error(self.inner.kind(), why);
        if let Some(c) = cursor.take() {
            let left = unstaged(self.work.slices(), &outers[c.outer], c);
            self.account(outers, c.outer, left, Some(&failure));
        }
        while let Some(range) = self.work.claim() {
            self.work.complete(range, Err(failure.clone()));
        }
    }

    /// Subtracts `len` bytes from outer range `owner` and completes it when none are left.
    fn account(
        &self,
        outers: &mut [Outer],
        owner: usize,
        len: u64,
        failure: Option<&TransportError>,
    ) {
        let outer = &mut outers[owner];
        if let Some(f) = failure {
            outer.error.get_or_insert_with(|| f.clone());
        }
        outer.left -= len;
        if outer.left == 0 {
            let result = outer.error.take().map_or(Ok(()), Err);
            self.work.complete(outer.range.clone(), result);
        }
    }

    fn stream(&self, device: u32) -> Result<Arc<Stream>, String> {
        let mut streams = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = streams.get(&device) {
            return Ok(Arc::clone(s));
        }
        let s = Arc::new(Stream::new(device).map_err(|e| e.to_string())?);
        streams.insert(device, Arc::clone(&s));
        Ok(s)
    }

    fn take_slot(&self) -> Result<PinnedHost, String> {
        let idle = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(slot) => Ok(slot),
            None => PinnedHost::alloc_on(self.device, SLOT as usize)
                .map_err(|e| format!("cannot allocate a pinned staging buffer: {e}")),
        }
    }

    fn give_slot(&self, slot: PinnedHost) {
        let mut idle = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < KEEP_SLOTS {
            idle.push(slot);
        }
    }

    /// Cuts the next chunk into `slot` from the claimed slices (claiming more as needed),
    /// queues the copies of its GPU WRITE pieces and waits for them. `Ok(None)`: nothing
    /// left. On error, the (owner, bytes) of the pieces cut, none of them posted.
    #[allow(clippy::type_complexity)]
    fn build_chunk(
        &self,
        slot: PinnedHost,
        outers: &mut Vec<Outer>,
        cursor: &mut Option<Cursor>,
        id: usize,
        done: &Sender<usize>,
    ) -> Result<Option<Chunk>, (Vec<(usize, u64)>, String)> {
        let slices = self.work.slices();
        let mut pieces = Vec::new();
        let mut owners = Vec::new();
        let mut gpu = Vec::new();
        let mut used = 0u64;
        let mut copies: Vec<(u32, u64, u64, u64)> = Vec::new(); // device, dst, src, len
        let mut device_of_slice: Option<(usize, Option<u32>)> = None;
        // The allocation the last GPU slice was in: its neighbours mostly are too.
        let mut last_alloc: Option<cuda::DeviceMemory> = None;
        while pieces.len() < MAX_PIECES && used < SLOT {
            let c = match *cursor {
                Some(c) => c,
                None => {
                    if self.work.is_stopped() {
                        break;
                    }
                    let Some(range) = self.work.claim() else {
                        break;
                    };
                    let left = bytes(&slices[range.clone()]);
                    let start = range.start;
                    outers.push(Outer {
                        range,
                        left,
                        error: None,
                    });
                    let c = Cursor {
                        outer: outers.len() - 1,
                        slice: start,
                        offset: 0,
                    };
                    *cursor = Some(c);
                    c
                }
            };
            let s = slices[c.slice];
            let device = match device_of_slice {
                Some((i, d)) if i == c.slice => d,
                _ => {
                    let inside =
                        |m: &cuda::DeviceMemory| (m.base..m.base + m.len).contains(&s.local);
                    let mem = last_alloc
                        .filter(inside)
                        .or_else(|| self.cuda.device_memory(s.local));
                    last_alloc = mem.or(last_alloc);
                    let d = mem.map(|m| m.device);
                    device_of_slice = Some((c.slice, d));
                    d
                }
            };
            let mut len = (u64::from(s.len) - c.offset).min(PIECE);
            if device.is_some() {
                len = len.min(SLOT - used);
            }
            let local = s.local + c.offset;
            let piece_local = match device {
                Some(d) => {
                    let at = slot.addr() + used;
                    if s.kind == OpKind::Write {
                        copies.push((d, at, local, len));
                    }
                    used += len;
                    at
                }
                None => local,
            };
            pieces.push(Slice {
                kind: s.kind,
                op: s.op,
                len: len as u32,
                local: piece_local,
                remote: s.remote + c.offset,
            });
            owners.push(c.outer);
            gpu.push(device.map(|d| (d, local)));
            // Advance the cursor.
            let mut next = c;
            next.offset += len;
            if next.offset == u64::from(s.len) {
                next.offset = 0;
                next.slice += 1;
            }
            *cursor = (next.slice < outers[c.outer].range.end).then_some(next);
        }
        if pieces.is_empty() {
            self.give_slot(slot);
            return Ok(None);
        }
        if let Err(why) = self.copy_all(&copies) {
            self.give_slot(slot);
            let cut = owners
                .iter()
                .zip(&pieces)
                .map(|(&o, p)| (o, u64::from(p.len)))
                .collect();
            return Err((cut, format!("staging GPU memory: {why}")));
        }
        let work = Arc::new(ChunkWork {
            outer: Arc::clone(&self.work),
            transport: self.inner.kind(),
            left: AtomicUsize::new(pieces.len()),
            next: AtomicUsize::new(0),
            slices: pieces,
            error: Mutex::new(None),
            done: Mutex::new(Some(done.clone())),
            id,
        });
        Ok(Some(Chunk {
            work,
            slot,
            owners,
            gpu,
        }))
    }

    /// Queues `copies` (device, dst, src, len) on their devices' streams and waits for all.
    fn copy_all(&self, copies: &[(u32, u64, u64, u64)]) -> Result<(), String> {
        let mut devices: Vec<u32> = copies.iter().map(|c| c.0).collect();
        devices.sort_unstable();
        devices.dedup(); // one in practice: the batch's GPU
        for device in devices {
            let stream = self.stream(device)?;
            let mine = copies
                .iter()
                .filter(|c| c.0 == device)
                .map(|&(_, dst, src, len)| (dst, src, len as usize));
            // SAFETY: one end is GPU memory of a region pinned for the batch (its slice
            // is not completed before this returns), the other lies inside a bounce slot
            // this stager owns and no transport uses until the chunk is posted (WRITE) or
            // has completed (READ); copy_all returns once the stream has drained.
            unsafe { stream.copy_all(mine) }.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A chunk came back from the inner transport: land its GPU READ pieces, account its
    /// pieces, and give back the slot.
    fn finish(&self, chunk: Chunk, outers: &mut [Outer]) {
        let mut failure = chunk
            .work
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let slices = &chunk.work.slices;
        if failure.is_none() {
            let copies: Vec<(u32, u64, u64, u64)> = slices
                .iter()
                .zip(&chunk.gpu)
                .filter(|(s, _)| s.kind == OpKind::Read)
                .filter_map(|(s, g)| g.map(|(d, real)| (d, real, s.local, u64::from(s.len))))
                .collect();
            if let Err(why) = self.copy_all(&copies) {
                failure = Some(error(
                    self.inner.kind(),
                    format!("landing in GPU memory: {why}"),
                ));
            }
        }
        for (s, &owner) in slices.iter().zip(&chunk.owners) {
            self.account(outers, owner, u64::from(s.len), failure.as_ref());
        }
        self.give_slot(chunk.slot);
    }
}

/// The bytes of `outer` from the cursor on (not yet cut into pieces).
fn unstaged(slices: &[Slice], outer: &Outer, c: Cursor) -> u64 {
    bytes(&slices[c.slice..outer.range.end]) - c.offset
}

fn bytes(slices: &[Slice]) -> u64 {
    slices.iter().map(|s| u64::from(s.len)).sum()
}

/// One chunk as the inner transport sees it: pieces whose GPU ends are bounce slots.
struct ChunkWork {
    outer: Arc<dyn SliceSource>,
    transport: TransportKind,
    slices: Vec<Slice>,
    next: AtomicUsize,
    left: AtomicUsize,
    error: Mutex<Option<TransportError>>,
    /// Tells the stager once every piece is accounted for (taken by the last one).
    done: Mutex<Option<Sender<usize>>>,
    id: usize,
}

impl SliceSource for ChunkWork {
    fn slices(&self) -> &[Slice] {
        &self.slices
    }

    fn claim(&self) -> Option<Range<usize>> {
        let n = self.slices.len();
        if self.outer.is_stopped() {
            // The stager waits for every piece: the unclaimed ones end here.
            let start = self.next.swap(n, Ordering::AcqRel);
            if start < n {
                let why = "the batch was stopped";
                self.complete(start..n, Err(error(self.transport, why)));
            }
            return None;
        }
        let mut start = self.next.load(Ordering::Acquire);
        loop {
            if start >= n {
                return None;
            }
            let end = (start + CLAIM).min(n);
            match self
                .next
                .compare_exchange(start, end, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(start..end),
                Err(now) => start = now,
            }
        }
    }

    fn complete(&self, range: Range<usize>, result: Result<(), TransportError>) {
        if let Err(e) = result {
            self.error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(e);
        }
        if self.left.fetch_sub(range.len(), Ordering::AcqRel) == range.len() {
            let done = self
                .done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(tx) = done {
                let _ = tx.send(self.id);
            }
        }
    }

    fn is_stopped(&self) -> bool {
        self.outer.is_stopped()
    }
}
