//! In-process batches that touch GPU memory: the GPU's copy engines move the bytes
//! (`cuMemcpyAsync` on a stream per device, unified addressing: host↔device and
//! device↔device alike), never the CPU.
//!
//! A worker thread takes posted batches in order, claims every range, turns each run of
//! contiguous slices of one op into one copy (a 256 MiB op is one copy, not 4096), queues
//! them all on the device's stream, and completes the ranges once the stream has drained.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::{OpKind, Slice, SliceSource, Transport, TransportError, TransportKind};
use crate::sys::cuda::{self, Stream};

/// The device copy transport.
pub struct CudaTransport {
    jobs: Mutex<Option<Sender<Arc<dyn SliceSource>>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CudaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaTransport")
    }
}

fn error(reason: String) -> TransportError {
    TransportError {
        transport: TransportKind::Cuda,
        reason,
    }
}

impl CudaTransport {
    /// Starts the worker (the CUDA driver must be in use in this process).
    pub fn new() -> std::io::Result<CudaTransport> {
        let (tx, rx) = channel();
        let worker = std::thread::Builder::new()
            .name("kvx-cuda-copy".into())
            .spawn(move || run(rx))?;
        Ok(CudaTransport {
            jobs: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Stops the worker once the batches posted so far are done (idempotent).
    pub(crate) fn shutdown(&self) {
        drop(
            self.jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(w) = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = w.join();
        }
    }
}

impl Drop for CudaTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Transport for CudaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Cuda
    }

    fn reaches_gpu(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        "GPU copy engines (cuMemcpyAsync on a stream per device)".into()
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let refused = match jobs.as_ref() {
            Some(tx) => tx.send(Arc::clone(&work)).is_err(),
            None => true,
        };
        drop(jobs);
        if refused {
            while let Some(range) = work.claim() {
                work.complete(range, Err(error("the engine is shutting down".into())));
            }
        }
    }
}

fn run(jobs: Receiver<Arc<dyn SliceSource>>) {
    let mut streams: HashMap<u32, Stream> = HashMap::new();
    while let Ok(work) = jobs.recv() {
        move_batch(&*work, &mut streams);
    }
}

/// The device a batch's copies run on: that of the first GPU end among its ops (unified
/// addressing lets one stream copy to and from any device's memory).
fn device_of(slices: &[Slice]) -> Result<u32, String> {
    let cuda = cuda::driver().map_err(|e| e.to_string())?;
    let mut last_op = None;
    for s in slices {
        if last_op == Some(s.op) {
            continue; // one lookup per op
        }
        last_op = Some(s.op);
        if let Some(m) = cuda
            .device_memory(s.local)
            .or_else(|| cuda.device_memory(s.remote))
        {
            return Ok(m.device);
        }
    }
    Err("no op of the batch touches GPU memory the driver knows".into())
}

fn move_batch(work: &dyn SliceSource, streams: &mut HashMap<u32, Stream>) {
    let mut claimed: Vec<Range<usize>> = Vec::new();
    while let Some(range) = work.claim() {
        claimed.push(range);
    }
    // Claims come in small consecutive ranges: join them, so that a copy can span a whole
    // op (a copy per 1 MiB claim costs a GPU-to-GPU batch two thirds of its speed).
    let mut runs: Vec<Range<usize>> = Vec::with_capacity(claimed.len());
    for range in &claimed {
        match runs.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => runs.push(range.clone()),
        }
    }
    if claimed.is_empty() {
        return;
    }
    let result = copy_all(work, &runs, streams);
    for range in claimed {
        work.complete(range, result.clone().map_err(error));
    }
}

/// Queues one copy per run of contiguous slices of one op, then waits for all of them.
fn copy_all(
    work: &dyn SliceSource,
    claimed: &[Range<usize>],
    streams: &mut HashMap<u32, Stream>,
) -> Result<(), String> {
    let slices = work.slices();
    let device = device_of(slices)?;
    let stream = match streams.entry(device) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(Stream::new(device).map_err(|e| e.to_string())?)
        }
    };
    let queued = queue_copies(stream, slices, claimed);
    // Whether or not every copy was queued, none may still run once the batch completes
    // (its memory is the caller's again): wait for the stream either way.
    let waited = stream.synchronize().map_err(|e| e.to_string());
    queued.and(waited)
}

/// Queues one copy per run of contiguous slices of one op on `stream`.
fn queue_copies(stream: &Stream, slices: &[Slice], claimed: &[Range<usize>]) -> Result<(), String> {
    for range in claimed {
        let mut i = range.start;
        while i < range.end {
            let first = &slices[i];
            let (mut local_end, mut remote_end) = (
                first.local + u64::from(first.len),
                first.remote + u64::from(first.len),
            );
            let mut j = i + 1;
            while j < range.end
                && slices[j].op == first.op
                && slices[j].local == local_end
                && slices[j].remote == remote_end
            {
                local_end += u64::from(slices[j].len);
                remote_end += u64::from(slices[j].len);
                j += 1;
            }
            let len = (local_end - first.local) as usize;
            let (dst, src) = match first.kind {
                OpKind::Write => (first.remote, first.local),
                OpKind::Read => (first.local, first.remote),
            };
            // SAFETY: both ranges were checked against registered regions of this process
            // and are pinned until the batch completes, which is after the event below has
            // passed: the memory stays valid for the whole copy.
            unsafe { stream.copy_async(dst, src, len) }.map_err(|e| e.to_string())?;
            i = j;
        }
    }
    Ok(())
}
