//! Streams and events: asynchronous copies and knowing when they are done.

use std::ptr;

use super::api::*;
use super::driver::{driver, Cuda};
use super::error::CudaError;

/// A non-blocking stream (`cuStreamCreate(CU_STREAM_NON_BLOCKING)`) of one device: copies
/// queued on it run in order, concurrently with other streams, and do not wait for the
/// legacy default stream. Dropping it waits for its queued work (so no copy outlives it)
/// and destroys it.
///
/// `Send + Sync`: the driver API is thread-safe and a stream may be used from several
/// threads (their operations are queued in the order the driver receives them).
#[derive(Debug)]
pub struct Stream {
    cuda: &'static Cuda,
    device: u32,
    raw: CUstream,
}

// SAFETY: raw is a driver handle, usable from any thread (the driver API is thread-safe);
// Stream owns it and destroys it once.
unsafe impl Send for Stream {}
// SAFETY: every method passes the handle to thread-safe driver calls; nothing in Stream is
// mutated after creation.
unsafe impl Sync for Stream {}

impl Stream {
    /// Creates a non-blocking stream on `device`.
    pub fn new(device: u32) -> Result<Stream, CudaError> {
        let cuda = driver()?;
        let _ctx = cuda.enter(device)?;
        let mut raw: CUstream = ptr::null_mut();
        // SAFETY: raw is a valid out-pointer; a context is current.
        unsafe { cuda.stream_create(&mut raw, CU_STREAM_NON_BLOCKING) }?.ok()?;
        Ok(Stream { cuda, device, raw })
    }

    /// The device the stream belongs to.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// `cuMemcpyAsync`: queues a copy of `len` bytes from `src` to `dst`, any of them device
    /// memory (of any device: peer copies go over NVLink or PCIe), mapped IPC memory, or
    /// host memory (unified addressing infers the direction; pinned or registered host
    /// memory is copied asynchronously by DMA, pageable memory is staged and may make the
    /// call wait). Returns once queued; [`record`](Stream::record) an event or
    /// [`synchronize`](Stream::synchronize) to know it is done.
    ///
    /// # Safety
    ///
    /// `src..src + len` and `dst..dst + len` must be memory the driver can reach (device,
    /// mapped IPC, or mapped host memory) and stay valid until the copy has completed (an
    /// event recorded after it reports done, the stream is synchronized, or the stream is
    /// dropped); nothing else may write `dst` (or write `src`) meanwhile. An address the
    /// driver does not know is taken as host memory: a bad address can crash the process
    /// or fault the device (which makes the context unusable) rather than fail.
    pub unsafe fn copy_async(&self, dst: u64, src: u64, len: usize) -> Result<(), CudaError> {
        if len == 0 {
            return Ok(());
        }
        let _ctx = self.cuda.enter(self.device)?;
        // SAFETY: the ranges are valid until the copy completes (this function's
        // contract); raw is a live stream of the current context.
        unsafe { self.cuda.memcpy_async(dst, src, len, self.raw) }?.ok()
    }

    /// Queues every copy `(dst, src, len)` and waits until the stream has drained, also
    /// when queueing one failed (then the rest is not queued): once this returns, no copy it
    /// queued still touches memory. The first error, if any.
    ///
    /// # Safety
    ///
    /// As [`copy_async`](Stream::copy_async) for every copy (validity until this returns).
    pub unsafe fn copy_all(
        &self,
        copies: impl IntoIterator<Item = (u64, u64, usize)>,
    ) -> Result<(), CudaError> {
        let mut queued = Ok(());
        for (dst, src, len) in copies {
            // SAFETY: forwarded to the caller (see # Safety); waited for below.
            queued = unsafe { self.copy_async(dst, src, len) };
            if queued.is_err() {
                break;
            }
        }
        let waited = self.synchronize();
        queued.and(waited)
    }

    /// Records a new event after the work queued so far (`cuEventCreate` +
    /// `cuEventRecord`). To avoid creating one per batch, keep an [`Event`] and use
    /// [`record_event`](Stream::record_event).
    pub fn record(&self) -> Result<Event, CudaError> {
        let event = Event::new(self.device)?;
        self.record_event(&event)?;
        Ok(event)
    }

    /// `cuEventRecord`: `event` completes when the work queued on this stream so far has.
    /// Recording again moves it to the newer point. The event must be of this stream's
    /// device.
    pub fn record_event(&self, event: &Event) -> Result<(), CudaError> {
        if event.device != self.device {
            return Err(CudaError::invalid(
                "cuEventRecord",
                format!(
                    "the event is of device {} and the stream of device {}: both must be of \
                     one device",
                    event.device, self.device
                ),
            ));
        }
        let _ctx = self.cuda.enter(self.device)?;
        // SAFETY: both handles are live and of the current context.
        unsafe { self.cuda.event_record(event.raw, self.raw) }?.ok()
    }

    /// `cuStreamSynchronize`: waits until every copy queued on the stream has completed;
    /// the error of a copy that failed, if any.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        let _ctx = self.cuda.enter(self.device)?;
        // SAFETY: raw is a live stream.
        unsafe { self.cuda.stream_synchronize(self.raw) }?.ok()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let result = self.cuda.enter(self.device).and_then(|_ctx| {
            // SAFETY: raw is a live stream; waiting first means no copy queued on it can
            // still touch memory after the stream is gone.
            let synced = unsafe { self.cuda.stream_synchronize(self.raw) }.and_then(|o| o.ok());
            // SAFETY: raw is live and destroyed once, here.
            let destroyed = unsafe { self.cuda.stream_destroy(self.raw) }?.ok();
            synced.and(destroyed)
        });
        if let Err(e) = result {
            log::warn!("destroying a CUDA stream of device {}: {e}", self.device);
        }
    }
}

/// An event (`cuEventCreate(CU_EVENT_DISABLE_TIMING)`) of one device, recorded on a
/// [`Stream`] to learn when the work queued before it has completed. Destroyed on drop.
#[derive(Debug)]
pub struct Event {
    cuda: &'static Cuda,
    device: u32,
    raw: CUevent,
}

// SAFETY: raw is a driver handle, usable from any thread; Event owns it and destroys it once.
unsafe impl Send for Event {}
// SAFETY: every method passes the handle to thread-safe driver calls.
unsafe impl Sync for Event {}

impl Event {
    /// Creates an event on `device` (it counts as completed until first recorded).
    pub fn new(device: u32) -> Result<Event, CudaError> {
        let cuda = driver()?;
        let _ctx = cuda.enter(device)?;
        let mut raw: CUevent = ptr::null_mut();
        // SAFETY: raw is a valid out-pointer; a context is current.
        unsafe { cuda.event_create(&mut raw, CU_EVENT_DISABLE_TIMING) }?.ok()?;
        Ok(Event { cuda, device, raw })
    }

    /// The device the event belongs to.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// `cuEventQuery`: whether the work before the recording has completed, without
    /// waiting (no allocation while not done).
    pub fn query(&self) -> Result<bool, CudaError> {
        let _ctx = self.cuda.enter(self.device)?;
        // SAFETY: raw is a live event.
        let outcome = unsafe { self.cuda.event_query(self.raw) }?;
        match outcome.code {
            CUDA_SUCCESS => Ok(true),
            CUDA_ERROR_NOT_READY => Ok(false),
            _ => Err(outcome.into_error()),
        }
    }

    /// `cuEventSynchronize`: waits until the work before the recording has completed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        let _ctx = self.cuda.enter(self.device)?;
        // SAFETY: raw is a live event.
        unsafe { self.cuda.event_synchronize(self.raw) }?.ok()
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let result = self.cuda.enter(self.device).and_then(|_ctx| {
            // SAFETY: raw is live and destroyed once, here.
            unsafe { self.cuda.event_destroy(self.raw) }?.ok()
        });
        if let Err(e) = result {
            log::warn!("destroying a CUDA event of device {}: {e}", self.device);
        }
    }
}
