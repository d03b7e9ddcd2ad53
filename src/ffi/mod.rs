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
mod store;

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use status::*;
pub use store::*;

use crate::engine::{BatchId, BatchState, Engine, EngineConfig, Notification, Op, PeerId};
use crate::memory::{Access, Buffer, Location, RegionSpec};
use crate::transport::{OpKind, TransportKind};

/// Major version of the C ABI: changes when an existing declaration changes incompatibly.
/// 1: `kvx_config` grew (network settings) and its `reserved` field became `struct_size`.
pub const KVX_ABI_VERSION_MAJOR: u32 = 1;
/// Minor version of the C ABI: changes when declarations are added.
/// 1: `kvx_config.transports`, `kvx_peer_transport`, `kvx_batch_transport`, `KVX_TRANSPORT_*`.
/// 2: the L3 store: `kvx_store_*`, `kvx_store_config`, `kvx_store_stats`,
/// `KVX_STORE_KEY_MAX`, and the status codes `KVX_ERR_BAD_KEY` .. `KVX_ERR_UNAVAILABLE`.
pub const KVX_ABI_VERSION_MINOR: u32 = 2;

/// Transport: in-process copies (the engine is its own peer).
pub const KVX_TRANSPORT_LOCAL: u32 = 1;
/// Transport: same host, another process (shared memory, cross-memory attach).
pub const KVX_TRANSPORT_SHM: u32 = 2;
/// Transport: TCP over io_uring.
pub const KVX_TRANSPORT_TCP: u32 = 3;
/// Transport: one-sided RDMA (verbs).
pub const KVX_TRANSPORT_RDMA: u32 = 4;
/// Transport: the GPU's copy engines (in-process batches touching GPU memory).
pub const KVX_TRANSPORT_CUDA: u32 = 5;

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

/// Location kind of a `kvx_region_info`: unknown or anywhere (`"*"`); the index is 0.
pub const KVX_LOCATION_ANY: u32 = 0;
/// Location kind of a `kvx_region_info`: host memory on NUMA node `location_index`
/// (`"cpu:N"`).
pub const KVX_LOCATION_CPU: u32 = 1;
/// Location kind of a `kvx_region_info`: memory of CUDA device `location_index`
/// (`"cuda:N"`).
pub const KVX_LOCATION_CUDA: u32 = 2;

/// Longest session id (`host:port`) in bytes, without the terminating NUL: a buffer of
/// `KVX_SESSION_ID_MAX + 1` bytes holds any session id, this engine's or a peer's.
pub const KVX_SESSION_ID_MAX: usize = 4096;
const _: () = assert!(KVX_SESSION_ID_MAX == crate::control::MAX_STRING);

/// Largest notification payload of `kvx_submit_with_notify`, in bytes (1 MiB).
pub const KVX_NOTIFY_MAX: usize = 1 << 20;
const _: () = assert!(KVX_NOTIFY_MAX == crate::control::MAX_NOTIFY);

/// Names a batch; 0 is never a valid id.
pub type kvx_batch_id = u64;
/// Names a peer; 0 is never a valid id.
pub type kvx_peer_id = u64;

/// An engine (opaque). Create with `kvx_engine_new`, destroy with `kvx_engine_free`.
/// Every call but `kvx_engine_free` may be made from many threads at once.
pub struct kvx_engine {
    /// Shared with the stores set up on this engine (`kvx_store_setup`), which keep it
    /// running after `kvx_engine_free` until the last of them is freed.
    engine: Arc<Engine>,
    /// Notifications taken from the engine that `kvx_poll_notification` could not hand
    /// over (the caller's buffer was too small), oldest first; handed out before any newer
    /// one.
    pending: Mutex<VecDeque<Notification>>,
}

/// Engine-owned registered memory (opaque). Create with `kvx_allocate`, destroy with
/// `kvx_buffer_free`; it may outlive the engine that made it.
pub struct kvx_buffer {
    buffer: Buffer,
}

/// Engine settings; fill with `kvx_config_init`, then change what you need. Every field
/// is taken as it is (0 is not "default": `kvx_config_init` writes the defaults, and a 0
/// where a count or time must be positive is `KVX_ERR_CONFIG`), except `listen`, where
/// NULL means the default.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvx_config {
    /// Largest piece moved at once, bytes (512 .. 1 GiB). Default 65536.
    pub slice_size: u64,
    /// Copy threads of the in-process transport (1 .. 256).
    pub copy_threads: u32,
    /// `sizeof(kvx_config)` as the caller's header declares it; set by `kvx_config_init`,
    /// do not change it. It lets a later library, whose `kvx_config` has more fields at the
    /// end, read only what this caller's struct has. 0 (the field was `reserved` in ABI 0)
    /// or a size this library does not know is `KVX_ERR_INVALID_ARGUMENT`.
    pub struct_size: u32,
    /// Default batch deadline after submission, milliseconds (> 0).
    pub batch_timeout_ms: u64,
    /// Largest batch, in slices.
    pub max_slices_per_batch: u64,
    /// Most batches submitted and not freed at once.
    pub max_batches: u64,
    /// How long opening a peer (connect and handshake) may take, milliseconds (> 0).
    /// Default 5000.
    pub connect_timeout_ms: u64,
    /// `"host:port"` the engine listens on for peers; it is also the engine's session id
    /// (`kvx_engine_session_id`), and port 0 picks a free port. NULL: the default,
    /// `"127.0.0.1:0"`. `""` (empty string): no listener, so only the local peer works and
    /// `kvx_engine_session_id` / `kvx_open_peer` return `KVX_ERR_CONFIG`. Read only during
    /// `kvx_engine_new`. The environment variable `KVX_LISTEN` overrides it (`none` = no
    /// listener).
    pub listen: *const c_char,
    /// I/O threads serving TCP connections (1 .. 64). Default 1.
    pub io_threads: u32,
    /// TCP connections ("lanes") opened to each peer (1 .. 64). Default 2.
    pub tcp_lanes: u32,
    /// Transports to other processes in order of preference, comma-separated: `"shm,tcp"`
    /// (the default, also for NULL), `"tcp"`, `"shm"`, `"tcp,shm"`. A batch goes over the
    /// first that can carry it. Read only during `kvx_engine_new`; the environment
    /// variable `KVX_TRANSPORTS` overrides it. (ABI 1.1; a caller built against 1.0 has a
    /// shorter struct and gets the default.)
    pub transports: *const c_char,
}

/// One region a peer has registered (see `kvx_peer_regions`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvx_region_info {
    /// Start address, in the peer's address space (a `remote_addr` for `kvx_op`).
    pub addr: u64,
    /// Bytes.
    pub len: u64,
    /// `KVX_ACCESS_*` bits.
    pub access: u32,
    /// `KVX_LOCATION_ANY`, `KVX_LOCATION_CPU` or `KVX_LOCATION_CUDA`.
    pub location_kind: u32,
    /// NUMA node (`KVX_LOCATION_CPU`) or CUDA device (`KVX_LOCATION_CUDA`); 0 for
    /// `KVX_LOCATION_ANY`.
    pub location_index: u32,
    /// Always 0.
    pub reserved: u32,
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

/// Fills `config` with the defaults (`listen` = NULL, the default address) and sets its
/// `struct_size`. NULL is ignored.
#[no_mangle]
pub extern "C" fn kvx_config_init(config: *mut kvx_config) {
    let d = EngineConfig::default();
    if config.is_null() {
        return;
    }
    let value = kvx_config {
        slice_size: d.slice_size as u64,
        copy_threads: d.copy_threads as u32,
        struct_size: CONFIG_SIZE,
        batch_timeout_ms: d.batch_timeout.as_millis() as u64,
        max_slices_per_batch: d.max_slices_per_batch as u64,
        max_batches: d.max_batches as u64,
        connect_timeout_ms: d.connect_timeout.as_millis() as u64,
        // NULL stands for the default listen address (EngineConfig's).
        listen: std::ptr::null(),
        io_threads: d.io_threads as u32,
        tcp_lanes: d.tcp_lanes as u32,
        transports: std::ptr::null(),
    };
    // SAFETY: non-NULL was checked; the caller promises it points to a writable
    // kvx_config. `write` does not read the (possibly uninitialised) old value.
    unsafe { config.write(value) };
}

/// Starts an engine with `config` (NULL = defaults; `KVX_*` environment variables
/// override either) and stores it in `*out`. `config` must have been filled by
/// `kvx_config_init` (its `struct_size` is checked: `KVX_ERR_INVALID_ARGUMENT` otherwise);
/// an unusable value is `KVX_ERR_CONFIG` naming it. By default the engine listens for peers
/// on a free port of `127.0.0.1` (`config.listen`).
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
            config_from_c(config)?
        };
        let engine = Engine::new(config)?;
        let handle = Box::into_raw(Box::new(kvx_engine {
            engine: Arc::new(engine),
            pending: Mutex::new(VecDeque::new()),
        }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(KVX_OK)
    })
}

/// Stops an engine: cancels its unfinished batches (waiting until none can touch memory)
/// and frees it. NULL is ignored. The handle is invalid afterwards.
///
/// A store set up on the engine (`kvx_store_setup`) holds it too: while one is alive the
/// engine keeps running (serving peers, its registered memory still registered) and stops
/// when the last store is freed. Memory registered with `kvx_register` must stay valid
/// until the engine stops, so free the stores first, or unregister that memory, before
/// freeing it.
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

/// The transport batches to `peer` prefer (`KVX_TRANSPORT_*`) goes to `*out`: local for
/// the engine itself, shm for a peer proven to share this host's memory, else tcp.
#[no_mangle]
pub extern "C" fn kvx_peer_transport(
    engine: *const kvx_engine,
    peer: kvx_peer_id,
    out: *mut u32,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let out = non_null(out, "out")?;
        let kind = engine.peer_transport(PeerId::from_raw(peer))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(transport_code(kind)) };
        Ok(KVX_OK)
    })
}

/// The transport that moves (or moved) `batch` (`KVX_TRANSPORT_*`) goes to `*out`.
#[no_mangle]
pub extern "C" fn kvx_batch_transport(
    engine: *const kvx_engine,
    batch: kvx_batch_id,
    out: *mut u32,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let out = non_null(out, "out")?;
        let kind = engine.batch_transport(BatchId::from_raw(batch))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(transport_code(kind)) };
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

/// Copies this engine's session id (the `"host:port"` its listener is bound to, which
/// peers pass to `kvx_open_peer`) with a terminating NUL into `buf` of `cap` bytes.
///
/// `*needed` (if `needed` is not NULL) is set to the bytes the id takes with its NUL, also
/// when `buf` is too small, which is `KVX_ERR_INVALID_ARGUMENT` (`buf` = NULL with `cap` = 0
/// asks just for the size; `KVX_SESSION_ID_MAX + 1` bytes always suffice). An engine
/// without a listener (`config.listen = ""`) returns `KVX_ERR_CONFIG` and `*needed` = 0.
/// The id does not change during the engine's life.
///
/// # Safety
/// `engine` is NULL or a live handle; `buf` is NULL or valid for `cap` bytes of writes;
/// `needed` is NULL or valid for one write.
#[no_mangle]
pub extern "C" fn kvx_engine_session_id(
    engine: *const kvx_engine,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        buffer_arg(buf, cap, "buf")?;
        let set_needed = |n: usize| {
            if !needed.is_null() {
                // SAFETY: non-NULL; the caller promises it is writable.
                unsafe { needed.write(n) };
            }
        };
        set_needed(0);
        let session = engine.session_id().ok_or(crate::Error::NoListener)?;
        let need = session.len() + 1;
        set_needed(need);
        if need > cap {
            return Err(FfiError::Invalid(format!(
                "buf of {cap} bytes is too small for session id {session:?} (needs {need})"
            )));
        }
        // SAFETY: `buf` is non-NULL (cap >= need > 0 and buffer_arg) and the caller promises
        // `cap` >= `need` writable bytes.
        unsafe { write_c_string(session, buf) };
        Ok(KVX_OK)
    })
}

/// Opens the peer engine whose session id (`"host:port"`, from its
/// `kvx_engine_session_id`) is `session`: connects, exchanges registered regions and opens
/// its TCP lanes, taking at most `config.connect_timeout_ms`. The peer's id goes to
/// `*peer_out`. Opening an open session again gives the same id; opening this engine's own
/// session gives `kvx_local_peer`'s id.
///
/// `KVX_ERR_INVALID_ARGUMENT` if `session` is not `host:port`; `KVX_ERR_PEER` if the peer
/// cannot be reached or answers wrongly (`kvx_last_error()` says why); `KVX_ERR_CONFIG` if
/// this engine has no listener.
///
/// # Safety
/// `engine` is NULL or a live handle; `session` is NULL or a NUL-terminated string;
/// `peer_out` is NULL or valid for one write.
#[no_mangle]
pub extern "C" fn kvx_open_peer(
    engine: *const kvx_engine,
    session: *const c_char,
    peer_out: *mut kvx_peer_id,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let peer_out = non_null(peer_out, "peer_out")?;
        let session = str_from_c(session, "session")?;
        let peer = engine.open_peer(session)?;
        // SAFETY: `peer_out` is non-NULL and the caller promises it is writable.
        unsafe { peer_out.write(peer.raw()) };
        Ok(KVX_OK)
    })
}

/// Closes a peer opened with `kvx_open_peer`: its connections close, its unfinished
/// batches fail, and its id becomes invalid (`KVX_ERR_UNKNOWN_PEER` afterwards). Closing
/// the local peer does nothing.
///
/// # Safety
/// `engine` is NULL or a live handle.
#[no_mangle]
pub extern "C" fn kvx_close_peer(engine: *const kvx_engine, peer: kvx_peer_id) -> kvx_status {
    guard(|| {
        engine_ref(engine)?.close_peer(PeerId::from_raw(peer))?;
        Ok(KVX_OK)
    })
}

/// Checks that `peer` answers (reconnecting if it went away) and stores the round trip in
/// nanoseconds in `*rtt_ns_out` (0 for the local peer). `KVX_ERR_PEER` if it does not
/// answer within `config.connect_timeout_ms`.
///
/// # Safety
/// `engine` is NULL or a live handle; `rtt_ns_out` is NULL or valid for one write.
#[no_mangle]
pub extern "C" fn kvx_probe_peer(
    engine: *const kvx_engine,
    peer: kvx_peer_id,
    rtt_ns_out: *mut u64,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let rtt_ns_out = non_null(rtt_ns_out, "rtt_ns_out")?;
        let rtt = engine.probe_peer(PeerId::from_raw(peer))?;
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: `rtt_ns_out` is non-NULL and the caller promises it is writable.
        unsafe { rtt_ns_out.write(ns) };
        Ok(KVX_OK)
    })
}

/// Lists the regions `peer` has registered, as it last published them (for the local
/// peer: this engine's own regions), in address order. `*count_out` is set to how many
/// there are; the first `min(count, cap)` are written to `out`. A `*count_out` larger than
/// `cap` is not an error: call again with a larger array (the peer may have registered
/// more meanwhile). `out` = NULL with `cap` = 0 asks just for the count. For a remote peer
/// this may reconnect, taking at most `config.connect_timeout_ms`.
///
/// # Safety
/// `engine` is NULL or a live handle; `out` is NULL or valid for `cap` elements of
/// writes; `count_out` is NULL or valid for one write.
#[no_mangle]
pub extern "C" fn kvx_peer_regions(
    engine: *const kvx_engine,
    peer: kvx_peer_id,
    out: *mut kvx_region_info,
    cap: usize,
    count_out: *mut usize,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let count_out = non_null(count_out, "count_out")?;
        buffer_arg(out, cap, "out")?;
        // SAFETY: `count_out` is non-NULL and the caller promises it is writable.
        unsafe { count_out.write(0) };
        let regions = engine.peer_regions(PeerId::from_raw(peer))?;
        for (i, r) in regions.iter().take(cap).enumerate() {
            // SAFETY: i < cap, so `out` is non-NULL (buffer_arg) and the caller promises
            // `cap` writable elements.
            unsafe { out.add(i).write(region_info_to_c(r)) };
        }
        // SAFETY: as above.
        unsafe { count_out.write(regions.len()) };
        Ok(KVX_OK)
    })
}

/// Submits `count` ops to `peer` as `kvx_submit` does and, once every byte is visible at
/// the peer, delivers the `msg_len` bytes at `msg` to it (its `kvx_poll_notification`).
/// The batch completes (`KVX_OK` from `kvx_wait`) only after the peer has queued the
/// message; if the bytes moved but the message was not delivered the batch ends with
/// `KVX_ERR_NOTIFY`. `msg` may be NULL when `msg_len` is 0; at most `KVX_NOTIFY_MAX`
/// bytes. The message is copied: `msg` may be reused when this returns.
///
/// # Safety
/// `engine` is NULL or a live handle; `ops` is NULL or valid for `count` elements of
/// reads; `msg` is NULL or valid for `msg_len` bytes of reads; `out` is NULL or valid for
/// one write.
#[no_mangle]
pub extern "C" fn kvx_submit_with_notify(
    engine: *const kvx_engine,
    peer: kvx_peer_id,
    ops: *const kvx_op,
    count: usize,
    msg: *const u8,
    msg_len: usize,
    out: *mut kvx_batch_id,
) -> kvx_status {
    guard(|| {
        let engine = engine_ref(engine)?;
        let out = non_null(out, "out")?;
        let ops = ops_from_c(ops, count)?;
        let msg = slice_from_c(msg, msg_len, "msg")?;
        let id = engine.submit_with_notify(PeerId::from_raw(peer), &ops, msg)?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(id.raw()) };
        Ok(KVX_OK)
    })
}

/// Takes the oldest notification peers have sent this engine (`kvx_submit_with_notify`
/// there), waiting up to `timeout_ms` milliseconds (0: do not wait) for one to arrive.
///
/// - `KVX_OK`: its bytes are in `buf`, their number in `*len_out`, and, if `from_buf` is not
///   NULL, the sender's session id with a NUL in `from_buf` (`"self"` or this engine's
///   own session id for a notification from this engine to itself).
/// - `KVX_IN_PROGRESS`: none arrived within the timeout; `*len_out` = 0.
/// - `KVX_ERR_INVALID_ARGUMENT` with `*len_out` = the message's length: it does not fit in
///   `buf` of `cap` bytes, or its sender's id with NUL does not fit in `from_buf` of
///   `from_cap` bytes (`KVX_SESSION_ID_MAX + 1` always do; `kvx_last_error()` gives both
///   sizes). The notification is not lost: it stays first in line and the next call returns
///   it (with a large enough buffer).
///
/// `buf` may be NULL when `cap` is 0, `from_buf` when `from_cap` is 0 (then the sender is
/// not returned). With several threads polling one engine, each notification goes to
/// exactly one of them.
///
/// # Safety
/// `engine` is NULL or a live handle; `buf` is NULL or valid for `cap` bytes of writes;
/// `len_out` is NULL or valid for one write; `from_buf` is NULL or valid for `from_cap`
/// bytes of writes.
#[no_mangle]
pub extern "C" fn kvx_poll_notification(
    engine: *const kvx_engine,
    timeout_ms: u32,
    buf: *mut u8,
    cap: usize,
    len_out: *mut usize,
    from_buf: *mut c_char,
    from_cap: usize,
) -> kvx_status {
    guard(|| {
        let handle = handle_ref(engine)?;
        let len_out = non_null(len_out, "len_out")?;
        buffer_arg(buf, cap, "buf")?;
        buffer_arg(from_buf, from_cap, "from_buf")?;
        // SAFETY: `len_out` is non-NULL and the caller promises it is writable.
        unsafe { len_out.write(0) };
        let pending = || {
            handle
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        // An earlier notification that did not fit comes first. The pending lock is not
        // held while waiting, so that other threads' polls are not held up by this one.
        let first = pending().pop_front();
        let n = match first {
            Some(n) => n,
            None => {
                let timeout = Duration::from_millis(u64::from(timeout_ms));
                let Some(n) = handle.engine.wait_notification(timeout) else {
                    return Ok(KVX_IN_PROGRESS);
                };
                // Another thread may have set one aside meanwhile; it is older than `n`.
                let mut queue = pending();
                match queue.pop_front() {
                    Some(older) => {
                        queue.push_back(n);
                        older
                    }
                    None => n,
                }
            }
        };
        let len = n.bytes.len();
        let from_need = n.from.len() + 1;
        if len > cap || (!from_buf.is_null() && from_need > from_cap) {
            let from_part = if from_buf.is_null() {
                String::new()
            } else {
                format!(", from_buf has {from_cap} (needs {from_need})")
            };
            let text = format!(
                "notification of {len} bytes from {:?} does not fit: buf has {cap} bytes \
                 (needs {len}){from_part}; it stays queued for the next call",
                n.from
            );
            pending().push_front(n);
            // SAFETY: as above.
            unsafe { len_out.write(len) };
            return Err(FfiError::Invalid(text));
        }
        // Even a copy of 0 bytes needs a non-NULL pointer, and `buf` may be NULL when cap is 0.
        if len > 0 {
            // SAFETY: 0 < len <= cap, so `buf` is non-NULL (buffer_arg) and the caller
            // promises `cap` writable bytes; the notification's bytes are Rust memory.
            unsafe { std::ptr::copy_nonoverlapping(n.bytes.as_ptr(), buf, len) };
        }
        if !from_buf.is_null() {
            // SAFETY: non-NULL, and from_need <= from_cap writable bytes (checked above).
            unsafe { write_c_string(&n.from, from_buf) };
        }
        // SAFETY: as above.
        unsafe { len_out.write(len) };
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
    handle_ref(engine).map(|h| &*h.engine)
}

fn handle_ref<'a>(engine: *const kvx_engine) -> Result<&'a kvx_engine, FfiError> {
    // SAFETY: NULL is refused; otherwise the caller promises a live handle from
    // kvx_engine_new, which stays valid until kvx_engine_free (not concurrent with calls).
    unsafe { engine.as_ref() }.ok_or_else(|| FfiError::Invalid("engine is NULL".into()))
}

/// Refuses a NULL `buf` with a non-zero `cap` (NULL with 0 is a size query).
fn buffer_arg<T>(buf: *mut T, cap: usize, name: &str) -> Result<(), FfiError> {
    if buf.is_null() && cap != 0 {
        return Err(FfiError::Invalid(format!(
            "{name} is NULL but its capacity is {cap}"
        )));
    }
    Ok(())
}

/// Copies `text` and a NUL into `buf`.
///
/// # Safety
/// `buf` must be valid for `text.len() + 1` bytes of writes, which the caller has checked
/// against the buffer's capacity.
unsafe fn write_c_string(text: &str, buf: *mut c_char) {
    // SAFETY: per this function's contract; `text` is Rust memory, so no overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        buf.add(text.len()).write(0);
    }
}

fn region_info_to_c(r: &crate::RegionInfo) -> kvx_region_info {
    let (location_kind, location_index) = match r.location {
        Location::Any => (KVX_LOCATION_ANY, 0),
        Location::Cpu(n) => (KVX_LOCATION_CPU, n),
        Location::Cuda(n) => (KVX_LOCATION_CUDA, n),
    };
    kvx_region_info {
        addr: r.addr,
        len: r.len,
        access: r.access.bits(),
        location_kind,
        location_index,
        reserved: 0,
    }
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

fn str_from_c<'a>(text: *const c_char, name: &str) -> Result<&'a str, FfiError> {
    if text.is_null() {
        return Err(FfiError::Invalid(format!("{name} is NULL")));
    }
    // SAFETY: non-NULL; the caller promises a NUL-terminated string that stays unchanged
    // during the call.
    unsafe { CStr::from_ptr(text) }
        .to_str()
        .map_err(|_| FfiError::Invalid(format!("{name} is not UTF-8")))
}

fn access_from_c(bits: u32) -> Result<Access, FfiError> {
    Access::from_bits(bits).ok_or_else(|| {
        FfiError::Invalid(format!(
            "access {bits:#x} has bits outside KVX_ACCESS_ALL (0xf)"
        ))
    })
}

/// `sizeof(kvx_config)` in this library.
const CONFIG_SIZE: u32 = std::mem::size_of::<kvx_config>() as u32;
/// `sizeof(kvx_config)` of ABI 1.0, which ended before `transports`.
const CONFIG_SIZE_1_0: u32 = std::mem::offset_of!(kvx_config, transports) as u32;

/// Reads a caller's config: `struct_size` first (every layout has it at the same place),
/// and the rest only if the caller's struct is as large as ours.
fn config_from_c(config: *const kvx_config) -> Result<EngineConfig, FfiError> {
    // SAFETY: `config` is non-NULL (checked by the caller) and points to a kvx_config of
    // some ABI version; every version has `struct_size` at this offset (it was `reserved`
    // in ABI 0). We read just that field, not the whole struct, which may be shorter.
    let struct_size = unsafe { std::ptr::addr_of!((*config).struct_size).read_unaligned() };
    if struct_size != CONFIG_SIZE && struct_size != CONFIG_SIZE_1_0 {
        return Err(FfiError::Invalid(if struct_size == 0 {
            "config.struct_size is 0: fill the config with kvx_config_init() first (a program \
             built against kvxfer ABI 0 must be rebuilt against this header)"
                .into()
        } else {
            format!(
                "config.struct_size {struct_size} is not sizeof(kvx_config) {CONFIG_SIZE} of \
                 this library: the program was built against a different kvxfer header"
            )
        }));
    }
    // SAFETY: the caller's struct is at least CONFIG_SIZE_1_0 bytes (struct_size), so
    // every field before `transports` is there; the caller promises it is initialised and
    // unchanged during the call. We copy those fields out one by one (no reference to the
    // whole struct, which may be shorter than ours).
    let c = unsafe { read_config_prefix(config) };
    let transports = if struct_size == CONFIG_SIZE {
        // SAFETY: the caller's struct is as large as ours, so it has this field.
        let t = unsafe { std::ptr::addr_of!((*config).transports).read_unaligned() };
        if t.is_null() {
            None
        } else {
            let text = str_from_c(t, "config.transports")?;
            Some(
                crate::transport::parse_transport_list(text)
                    .map_err(|e| crate::Error::Config(format!("config.transports: {e}")))?,
            )
        }
    } else {
        None
    };
    let size = |v: u64, name: &str| {
        usize::try_from(v).map_err(|_| FfiError::Invalid(format!("config.{name} {v} is too large")))
    };
    let listen = if c.listen.is_null() {
        EngineConfig::default().listen
    } else {
        let text = str_from_c(c.listen, "config.listen")?;
        (!text.is_empty()).then(|| text.to_string())
    };
    Ok(EngineConfig::builder()
        .slice_size(size(c.slice_size, "slice_size")?)
        .copy_threads(c.copy_threads as usize)
        .batch_timeout(Duration::from_millis(c.batch_timeout_ms))
        .max_slices_per_batch(size(c.max_slices_per_batch, "max_slices_per_batch")?)
        .max_batches(size(c.max_batches, "max_batches")?)
        .connect_timeout(Duration::from_millis(c.connect_timeout_ms))
        .listen(listen.as_deref())
        .io_threads(c.io_threads as usize)
        .tcp_lanes(c.tcp_lanes as usize)
        .transports(&transports.unwrap_or_else(|| EngineConfig::default().transports))
        .build()?)
}

/// The ABI 1.0 fields of a caller's config (every field before `transports`).
///
/// # Safety
/// `config` must point to at least `CONFIG_SIZE_1_0` initialised bytes of a `kvx_config`.
unsafe fn read_config_prefix(config: *const kvx_config) -> kvx_config {
    macro_rules! field {
        ($name:ident) => {
            // SAFETY: the field lies inside the caller's CONFIG_SIZE_1_0 bytes (the
            // function's contract); read_unaligned needs no alignment.
            unsafe { std::ptr::addr_of!((*config).$name).read_unaligned() }
        };
    }
    kvx_config {
        slice_size: field!(slice_size),
        copy_threads: field!(copy_threads),
        struct_size: field!(struct_size),
        batch_timeout_ms: field!(batch_timeout_ms),
        max_slices_per_batch: field!(max_slices_per_batch),
        max_batches: field!(max_batches),
        connect_timeout_ms: field!(connect_timeout_ms),
        listen: field!(listen),
        io_threads: field!(io_threads),
        tcp_lanes: field!(tcp_lanes),
        transports: std::ptr::null(),
    }
}

fn transport_code(kind: TransportKind) -> u32 {
    match kind {
        TransportKind::Local => KVX_TRANSPORT_LOCAL,
        TransportKind::Shm => KVX_TRANSPORT_SHM,
        TransportKind::Rdma => KVX_TRANSPORT_RDMA,
        TransportKind::Cuda => KVX_TRANSPORT_CUDA,
        _ => KVX_TRANSPORT_TCP,
    }
}

fn batch_state(state: BatchState) -> Result<kvx_status, FfiError> {
    let finished = state.into_result()?;
    Ok(if finished { KVX_OK } else { KVX_IN_PROGRESS })
}
