//! The C ABI. Conventions (after rustls-ffi): opaque handles, stable numeric status codes
//! (`KVX_OK` 0, `KVX_IN_PROGRESS` 1, negative errors), the text of the last error per
//! thread in `kvx_last_error()`, a NULL check on every pointer and a panic guard on every
//! export, so that no Rust panic ever unwinds into the caller.
//!
//! `include/kvxfer.h` is generated from this module by cbindgen (`cbindgen.toml`); the
//! test `tests/header.rs` fails when the checked-in header is stale.

#![allow(non_camel_case_types)]
// These functions are called from C, where every pointer argument's contract (NULL or a
// live handle / valid memory) is stated in the header; marking them `unsafe fn` would change
// nothing for C callers and only hide the per-block SAFETY reasoning below.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod status;

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

pub use status::*;

use crate::engine::{BatchId, BatchState, Engine, EngineConfig, Op, PeerId};
use crate::memory::{Access, Buffer, Location, RegionSpec};
use crate::transport::OpKind;

/// Major version of the C ABI: changes when an existing declaration changes incompatibly.
pub const KVX_ABI_VERSION_MAJOR: u32 = 0;
/// Minor version of the C ABI: changes when declarations are added.
pub const KVX_ABI_VERSION_MINOR: u32 = 1;

/// Access right: this engine may read the region (source of a WRITE).
pub const KVX_ACCESS_LOCAL_READ: u32 = 1;
/// Access right: this engine may write the region (destination of a READ).
pub const KVX_ACCESS_LOCAL_WRITE: u32 = 2;
/// Access right: peers may read the region.
pub const KVX_ACCESS_REMOTE_READ: u32 = 4;
/// Access right: peers may write the region.
pub const KVX_ACCESS_REMOTE_WRITE: u32 = 8;
/// Every access right.
pub const KVX_ACCESS_ALL: u32 = 15;

/// Op kind: copy the peer's bytes at `remote_addr` into `local_addr`.
pub const KVX_OP_READ: u32 = 0;
/// Op kind: copy the bytes at `local_addr` into the peer's `remote_addr`.
pub const KVX_OP_WRITE: u32 = 1;

/// `kvx_wait` timeout meaning "until the batch's own deadline".
pub const KVX_WAIT_FOREVER: u64 = u64::MAX;

/// Names a batch; 0 is never a valid id.
pub type kvx_batch_id = u64;
/// Names a peer; 0 is never a valid id.
pub type kvx_peer_id = u64;

/// An engine (opaque). Create with `kvx_engine_new`, destroy with `kvx_engine_free`.
pub struct kvx_engine {
    engine: Engine,
}

/// Engine-owned registered memory (opaque). Create with `kvx_allocate`, destroy with
/// `kvx_buffer_free`; it may outlive the engine that made it.
pub struct kvx_buffer {
    buffer: Buffer,
}

/// Engine settings; fill with `kvx_config_init`, then change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvx_config {
    /// Largest piece moved at once, bytes (512 .. 1 GiB). Default 65536.
    pub slice_size: u64,
    /// Copy threads of the in-process transport (1 .. 256).
    pub copy_threads: u32,
    /// Reserved, must be 0.
    pub reserved: u32,
    /// Default batch deadline after submission, milliseconds (> 0).
    pub batch_timeout_ms: u64,
    /// Largest batch, in slices.
    pub max_slices_per_batch: u64,
    /// Most batches submitted and not freed at once.
    pub max_batches: u64,
}

/// One region for `kvx_register_batch`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvx_region {
    /// Start of the memory.
    pub addr: *mut c_void,
    /// Bytes.
    pub len: usize,
    /// "cpu:N", "cuda:N", "*", or NULL to detect.
    pub location: *const c_char,
    /// `KVX_ACCESS_*` bits.
    pub access: u32,
}

/// One transfer request.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvx_op {
    /// `KVX_OP_READ` or `KVX_OP_WRITE`.
    pub kind: u32,
    /// Reserved, must be 0.
    pub reserved: u32,
    /// Address in this engine's registered memory.
    pub local_addr: u64,
    /// Address in the peer's registered memory.
    pub remote_addr: u64,
    /// Bytes.
    pub len: u64,
}

/// Counters of an engine since it started (see `kvx_engine_stats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvx_stats {
    /// Batches accepted by `kvx_submit`.
    pub batches_submitted: u64,
    /// Submissions refused (bad op, unknown peer, limits): nothing moved for them.
    pub submits_refused: u64,
    /// Batches that moved every byte.
    pub batches_completed: u64,
    /// Batches that ended with a failed slice.
    pub batches_failed: u64,
    /// Batches cancelled before every byte moved.
    pub batches_cancelled: u64,
    /// Batches stopped at their deadline.
    pub batches_timed_out: u64,
    /// Bytes moved by slices that completed, whatever their batch's outcome.
    pub bytes_moved: u64,
}

/// The library version, e.g. "0.1.0" (static string).
#[no_mangle]
pub extern "C" fn kvx_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version of the library: `KVX_ABI_VERSION_MAJOR << 16 | KVX_ABI_VERSION_MINOR`.
/// Compare the major part with the header's macro before using anything else.
#[no_mangle]
pub extern "C" fn kvx_abi_version() -> u32 {
    (KVX_ABI_VERSION_MAJOR << 16) | KVX_ABI_VERSION_MINOR
}

/// Fills `config` with the defaults. NULL is ignored.
#[no_mangle]
pub extern "C" fn kvx_config_init(config: *mut kvx_config) {
    let d = EngineConfig::default();
    if config.is_null() {
        return;
    }
    let value = kvx_config {
        slice_size: d.slice_size as u64,
        copy_threads: d.copy_threads as u32,
        reserved: 0,
        batch_timeout_ms: d.batch_timeout.as_millis() as u64,
        max_slices_per_batch: d.max_slices_per_batch as u64,
        max_batches: d.max_batches as u64,
    };
    // SAFETY: non-NULL was checked; the caller promises it points to a writable
    // kvx_config. `write` does not read the (possibly uninitialised) old value.
    unsafe { config.write(value) };
}

/// Starts an engine with `config` (NULL = defaults; `KVX_*` environment variables
/// override either) and stores it in `*out`.
#[no_mangle]
pub extern "C" fn kvx_engine_new(
    config: *const kvx_config,
    out: *mut *mut kvx_engine,
) -> kvx_status {
    guard(|| {
        let out = non_null(out, "out")?;
        let config = if config.is_null() {
            EngineConfig::default()
        } else {
            // SAFETY: non-NULL was checked; the caller promises a valid kvx_config.
            config_from_c(unsafe { &*config })?
        };
        let engine = Engine::new(config)?;
        let handle = Box::into_raw(Box::new(kvx_engine { engine }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(KVX_OK)
    })
}

/// Stops an engine: cancels its unfinished batches (waiting until none can touch memory)
/// and frees it. NULL is ignored. The handle is invalid afterwards.
#[no_mangle]
pub extern "C" fn kvx_engine_free(engine: *mut kvx_engine) {
    if engine.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller passes a handle from kvx_engine_new, not freed before; we
        // take back the Box made there, exactly once.
        drop(unsafe { Box::from_raw(engine) });
    }));
}

/// Registers `[addr, addr + len)` with `access` (`KVX_ACCESS_*` bits) at `location`
/// ("cpu:N", "cuda:N", "*", or NULL to detect). The memory must stay valid until
/// `kvx_unregister` returns `KVX_OK` for it.
#[no_mangle]
pub extern "C" fn kvx_register(
    engine: *const kvx_engine,
    addr: *mut c_void,
    len: usize,
    location: *const c_char,
    access: u32,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let location = location_from_c(location)?;
        let access = access_from_c(access)?;
        // SAFETY: the C contract of this function makes the caller promise that the
        // range stays valid memory until it is unregistered.
        unsafe { engine.register(addr as u64, len as u64, location, access)? };
        Ok(KVX_OK)
    })
}

/// Registers `count` regions, all or none.
#[no_mangle]
pub extern "C" fn kvx_register_batch(
    engine: *const kvx_engine,
    regions: *const kvx_region,
    count: usize,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let regions = slice_from_c(regions, count, "regions")?;
        let specs = regions
            .iter()
            .map(|r| {
                Ok(RegionSpec::caller(
                    r.addr as u64,
                    r.len as u64,
                    location_from_c(r.location)?,
                    access_from_c(r.access)?,
                ))
            })
            .collect::<Result<Vec<_>, FfiError>>()?;
        // SAFETY: as for kvx_register, for every region.
        unsafe { engine.register_batch(specs)? };
        Ok(KVX_OK)
    })
}

/// Unregisters the region starting at `addr`. `KVX_ERR_BUSY` while an unfinished batch
/// uses it.
#[no_mangle]
pub extern "C" fn kvx_unregister(engine: *const kvx_engine, addr: *mut c_void) -> kvx_status {
    guard(|| {
        engine_ref(engine)?.unregister(addr as u64)?;
        Ok(KVX_OK)
    })
}

/// Writes the location of the region holding `addr` ("cpu:0", "*", ...) as a
/// NUL-terminated string into `buf` of `buf_len` bytes. `KVX_ERR_INVALID_ARGUMENT` if it
/// does not fit (16 bytes always do).
#[no_mangle]
pub extern "C" fn kvx_region_location(
    engine: *const kvx_engine,
    addr: *const c_void,
    buf: *mut c_char,
    buf_len: usize,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let buf = non_null(buf, "buf")?;
        let region = engine
            .region(addr as u64)
            .ok_or(crate::memory::MemoryError::NotRegistered { addr: addr as u64 })
            .map_err(crate::Error::from)?;
        let text = region.location().to_string();
        if text.len() + 1 > buf_len {
            return Err(FfiError::Invalid(format!(
                "buf_len {buf_len} is too small for location {text:?} (needs {})",
                text.len() + 1
            )));
        }
        // SAFETY: `buf` is non-NULL and the caller promises `buf_len` writable bytes;
        // we write text.len() + 1 <= buf_len bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
            buf.add(text.len()).write(0);
        }
        Ok(KVX_OK)
    })
}

/// Allocates `len` bytes of registered host memory (memfd-backed, every access right) at
/// `location` ("cpu:N" or "*"; NULL = "*") and stores the handle in `*out`.
#[no_mangle]
pub extern "C" fn kvx_allocate(
    engine: *const kvx_engine,
    len: usize,
    location: *const c_char,
    out: *mut *mut kvx_buffer,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let out = non_null(out, "out")?;
        let location = location_from_c(location)?.unwrap_or(Location::Any);
        let buffer = engine.allocate(len, location)?;
        let handle = Box::into_raw(Box::new(kvx_buffer { buffer }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(KVX_OK)
    })
}

/// Start address of a buffer (NULL for a NULL handle).
#[no_mangle]
pub extern "C" fn kvx_buffer_addr(buffer: *const kvx_buffer) -> *mut c_void {
    // SAFETY: NULL or a live handle from kvx_allocate, per the C contract.
    unsafe { buffer.as_ref() }.map_or(std::ptr::null_mut(), |b| b.buffer.addr() as *mut c_void)
}

/// Length of a buffer in bytes (0 for a NULL handle).
#[no_mangle]
pub extern "C" fn kvx_buffer_len(buffer: *const kvx_buffer) -> usize {
    // SAFETY: NULL or a live handle from kvx_allocate, per the C contract.
    unsafe { buffer.as_ref() }.map_or(0, |b| b.buffer.len())
}

/// Unregisters and frees a buffer (its pages go once no unfinished batch uses them).
/// NULL is ignored.
#[no_mangle]
pub extern "C" fn kvx_buffer_free(buffer: *mut kvx_buffer) {
    if buffer.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller passes a handle from kvx_allocate, not freed before.
        drop(unsafe { Box::from_raw(buffer) });
    }));
}

/// The id of the engine's own peer (its remote memory is its own registry).
#[no_mangle]
pub extern "C" fn kvx_local_peer(engine: *const kvx_engine, out: *mut kvx_peer_id) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let out = non_null(out, "out")?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(engine.local_peer().raw()) };
        Ok(KVX_OK)
    })
}

/// Submits `count` ops to `peer`; the batch id goes to `*out`. Every op is checked first:
/// on any bad op nothing moves, the status names the error and `kvx_last_error()` the op.
#[no_mangle]
pub extern "C" fn kvx_submit(
    engine: *const kvx_engine,
    peer: kvx_peer_id,
    ops: *const kvx_op,
    count: usize,
    out: *mut kvx_batch_id,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let out = non_null(out, "out")?;
        let ops = ops_from_c(ops, count)?;
        let id = engine.submit(PeerId::from_raw(peer), &ops)?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(id.raw()) };
        Ok(KVX_OK)
    })
}

/// The state of a batch: `KVX_OK` (completed), `KVX_IN_PROGRESS`, or the error it ended
/// with (`KVX_ERR_CANCELLED`, `KVX_ERR_TIMED_OUT`, a transport error, ...).
#[no_mangle]
pub extern "C" fn kvx_batch_status(engine: *const kvx_engine, batch: kvx_batch_id) -> kvx_status {
    guard(|| batch_state(engine_ref(engine)?.status(BatchId::from_raw(batch))?))
}

/// Waits up to `timeout_us` microseconds (`KVX_WAIT_FOREVER`: until the batch's
/// deadline) and returns the batch's state as `kvx_batch_status` does.
#[no_mangle]
pub extern "C" fn kvx_wait(
    engine: *const kvx_engine,
    batch: kvx_batch_id,
    timeout_us: u64,
) -> kvx_status {
    guard(|| {
        let timeout = match timeout_us {
            KVX_WAIT_FOREVER => Duration::MAX,
            us => Duration::from_micros(us),
        };
        batch_state(engine_ref(engine)?.wait(BatchId::from_raw(batch), timeout)?)
    })
}

/// Cancels a batch; returns once nothing can touch its buffers, with its final state
/// (`KVX_ERR_CANCELLED`, or `KVX_OK` if every byte had moved).
#[no_mangle]
pub extern "C" fn kvx_cancel(engine: *const kvx_engine, batch: kvx_batch_id) -> kvx_status {
    guard(|| batch_state(engine_ref(engine)?.cancel(BatchId::from_raw(batch))?))
}

/// Frees an ended batch; its id becomes invalid. `KVX_ERR_BATCH_IN_PROGRESS` if it has
/// not ended.
#[no_mangle]
pub extern "C" fn kvx_free_batch(engine: *const kvx_engine, batch: kvx_batch_id) -> kvx_status {
    guard(|| {
        engine_ref(engine)?.free(BatchId::from_raw(batch))?;
        Ok(KVX_OK)
    })
}

/// Copies the engine's counters into `*out`.
#[no_mangle]
pub extern "C" fn kvx_engine_stats(engine: *const kvx_engine, out: *mut kvx_stats) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let out = non_null(out, "out")?;
        let s = engine.stats();
        let stats = kvx_stats {
            batches_submitted: s.batches_submitted,
            submits_refused: s.submits_refused,
            batches_completed: s.batches_completed,
            batches_failed: s.batches_failed,
            batches_cancelled: s.batches_cancelled,
            batches_timed_out: s.batches_timed_out,
            bytes_moved: s.bytes_moved,
        };
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(stats) };
        Ok(KVX_OK)
    })
}

/// Submits, waits for the end and frees: `KVX_OK` when every byte moved.
#[no_mangle]
pub extern "C" fn kvx_transfer_sync(
    engine: *const kvx_engine,
    peer: kvx_peer_id,
    ops: *const kvx_op,
    count: usize,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let ops = ops_from_c(ops, count)?;
        engine.transfer_sync(PeerId::from_raw(peer), &ops)?;
        Ok(KVX_OK)
    })
}

/// Errors made at the C boundary itself, besides the engine's.
enum FfiError {
    Engine(crate::Error),
    Invalid(String),
}

impl From<crate::Error> for FfiError {
    fn from(e: crate::Error) -> Self {
        FfiError::Engine(e)
    }
}

/// Runs `f`, turning errors into status codes (text kept for `kvx_last_error`) and a
/// panic into `KVX_ERR_INTERNAL`.
fn guard(f: impl FnOnce() -> Result<kvx_status, FfiError>) -> kvx_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => status,
        Ok(Err(FfiError::Engine(e))) => {
            set_last_error(e.to_string());
            status_of(&e)
        }
        Ok(Err(FfiError::Invalid(text))) => {
            set_last_error(text);
            KVX_ERR_INVALID_ARGUMENT
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!(
                "internal error (a bug in kvxfer, please report): {what}"
            ));
            KVX_ERR_INTERNAL
        }
    }
}

fn non_null<T>(ptr: *mut T, name: &str) -> Result<*mut T, FfiError> {
    if ptr.is_null() {
        Err(FfiError::Invalid(format!("{name} is NULL")))
    } else {
        Ok(ptr)
    }
}

fn engine_ref<'a>(engine: *const kvx_engine) -> Result<&'a Engine, FfiError> {
    // SAFETY: NULL is refused; otherwise the caller promises a live handle from
    // kvx_engine_new, which stays valid until kvx_engine_free (not concurrent with calls).
    unsafe { engine.as_ref() }
        .map(|e| &e.engine)
        .ok_or_else(|| FfiError::Invalid("engine is NULL".into()))
}

fn slice_from_c<'a, T>(ptr: *const T, count: usize, name: &str) -> Result<&'a [T], FfiError> {
    if count == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(FfiError::Invalid(format!(
            "{name} is NULL but count is {count}"
        )));
    }
    if count
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(FfiError::Invalid(format!(
            "{name} count {count} is impossibly large"
        )));
    }
    // SAFETY: non-NULL, size checked against isize::MAX; the caller promises `count`
    // initialised elements that stay unchanged during the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, count) })
}

fn ops_from_c(ops: *const kvx_op, count: usize) -> Result<Vec<Op>, FfiError> {
    slice_from_c(ops, count, "ops")?
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let kind = match op.kind {
                KVX_OP_READ => OpKind::Read,
                KVX_OP_WRITE => OpKind::Write,
                other => {
                    return Err(FfiError::Invalid(format!(
                        "op {i}: kind {other} is neither KVX_OP_READ (0) nor KVX_OP_WRITE (1)"
                    )))
                }
            };
            if op.reserved != 0 {
                return Err(FfiError::Invalid(format!(
                    "op {i}: reserved field is {} (must be 0)",
                    op.reserved
                )));
            }
            Ok(Op {
                kind,
                local_addr: op.local_addr,
                remote_addr: op.remote_addr,
                len: op.len,
            })
        })
        .collect()
}

fn location_from_c(location: *const c_char) -> Result<Option<Location>, FfiError> {
    if location.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL; the caller promises a NUL-terminated string.
    let text = unsafe { CStr::from_ptr(location) }
        .to_str()
        .map_err(|_| FfiError::Invalid("location is not UTF-8".into()))?;
    let location = text
        .parse::<Location>()
        .map_err(|e| crate::Error::from(crate::MemoryError::from(e)))?;
    Ok(Some(location))
}

fn access_from_c(bits: u32) -> Result<Access, FfiError> {
    Access::from_bits(bits).ok_or_else(|| {
        FfiError::Invalid(format!(
            "access {bits:#x} has bits outside KVX_ACCESS_ALL (0xf)"
        ))
    })
}

fn config_from_c(c: &kvx_config) -> Result<EngineConfig, FfiError> {
    if c.reserved != 0 {
        return Err(FfiError::Invalid("config.reserved must be 0".into()));
    }
    let size = |v: u64, name: &str| {
        usize::try_from(v).map_err(|_| FfiError::Invalid(format!("config.{name} {v} is too large")))
    };
    Ok(EngineConfig::builder()
        .slice_size(size(c.slice_size, "slice_size")?)
        .copy_threads(c.copy_threads as usize)
        .batch_timeout(Duration::from_millis(c.batch_timeout_ms))
        .max_slices_per_batch(size(c.max_slices_per_batch, "max_slices_per_batch")?)
        .max_batches(size(c.max_batches, "max_batches")?)
        .build()?)
}

fn batch_state(state: BatchState) -> Result<kvx_status, FfiError> {
    let finished = state.into_result()?;
    Ok(if finished { KVX_OK } else { KVX_IN_PROGRESS })
}
