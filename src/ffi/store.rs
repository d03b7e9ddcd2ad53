//! The C ABI of the L3 store (`kvx_store_*`): a store handle made on an engine, batched
//! put-if-absent / get-into / exists / remove over caller memory registered with that
//! engine, and the members' counters.
//!
//! Results come per key: a batch call returns `KVX_OK` once it has been carried out, and
//! each key's outcome is in the caller's results array (`KVX_OK` or a negative status; for
//! a get, the bytes read). A whole call fails (a negative status and `kvx_last_error()`
//! text, no per-key result written) only when its arguments are unusable: a NULL handle, a
//! NULL array with `n > 0`.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{
    guard, handle_ref, kvx_engine, kvx_status, non_null, set_last_error, slice_from_c, status_of,
    str_from_c, FfiError, KVX_ERR_ALREADY_EXISTS, KVX_ERR_BAD_KEY, KVX_ERR_BUSY, KVX_ERR_CONFIG,
    KVX_ERR_INVALID_ARGUMENT, KVX_ERR_LEASE_EXPIRED, KVX_ERR_NOT_FOUND, KVX_ERR_NOT_REGISTERED,
    KVX_ERR_NO_SPACE, KVX_ERR_PEER, KVX_ERR_SIZE_MISMATCH, KVX_ERR_UNAVAILABLE,
    KVX_ERR_ZERO_LENGTH, KVX_OK,
};
use crate::store::wire::{StoreWireError, MAX_KEY};
use crate::store::{ItemError, SegmentConfig, Store, StoreConfig, StoreError, StoreStats};

/// Longest store key in bytes (keys are 1 to `KVX_STORE_KEY_MAX` bytes, any bytes).
pub const KVX_STORE_KEY_MAX: usize = 256;
const _: () = assert!(KVX_STORE_KEY_MAX == MAX_KEY);

/// A store client (opaque), and a member of the store if it contributes memory. Create
/// with `kvx_store_setup`, destroy with `kvx_store_free`. Every call but `kvx_store_free`
/// may be made from many threads at once.
///
/// The store holds its engine: stores and their engine may be freed in either order (the
/// engine stops when the last of its handle and its stores is freed; see
/// `kvx_engine_free`).
pub struct kvx_store {
    store: Store,
}

// Many threads may call one store at once.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
};

/// Store settings; fill with `kvx_store_config_init`, then change what you need. Unlike
/// `kvx_config`, a 0 in `replicas`, a time or a watermark means its default.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvx_store_config {
    /// `sizeof(kvx_store_config)` as the caller's header declares it; set by
    /// `kvx_store_config_init`, do not change it. A later library whose struct has more
    /// fields at the end reads only what this caller's struct has. Any other value is
    /// `KVX_ERR_INVALID_ARGUMENT`.
    pub struct_size: u32,
    /// Copies of each object, on the first `replicas` owners of its key. 0: 1.
    pub replicas: u32,
    /// The members' sessions (`"host:port"` of their engines, `kvx_engine_session_id`),
    /// comma-separated (spaces around a session are ignored). NULL or `""`: none, which is
    /// allowed only when this store contributes memory (its own engine is always a member
    /// then). Every client of one store should list the same members.
    pub members: *const c_char,
    /// Bytes of memory this process contributes to the store (allocated from the engine).
    /// 0: a pure client.
    pub contributed_bytes: u64,
    /// Directory of the SSD tier's cache file, for a contributing store. NULL or `""`: no
    /// SSD tier.
    pub disk_dir: *const c_char,
    /// Bytes of the SSD tier (> 0 when `disk_dir` is set, 0 when not).
    pub disk_bytes: u64,
    /// How long one request or transfer to a member may take, milliseconds. 0: 10000.
    pub timeout_ms: u64,
    /// How long a member that could not be reached is skipped, milliseconds. 0: 2000.
    pub member_retry_ms: u64,
    /// Contributing store: how long a reader may copy an object it looked up,
    /// milliseconds. 0: 5000.
    pub lease_ms: u64,
    /// Contributing store: a put reservation not committed within this is reclaimed,
    /// milliseconds (at least 6000: the clients' write window of 5 s plus a margin). 0:
    /// 10000.
    pub reserve_timeout_ms: u64,
    /// Contributing store: above this fraction of the contributed memory in use, objects
    /// are evicted (moved to the SSD tier, or dropped)... 0: 0.9.
    pub high_watermark: f64,
    /// ...down to this fraction (0 < low <= high <= 1). 0: 0.8.
    pub low_watermark: f64,
}

/// The counters of a store's members, summed (see `kvx_store_get_stats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvx_store_stats {
    /// Bytes of memory the members hold objects in.
    pub memory_capacity: u64,
    /// Bytes of that memory in use (objects and reservations).
    pub memory_used: u64,
    /// Bytes of the SSD tiers (0 without one).
    pub disk_capacity: u64,
    /// Bytes of the SSD tiers in use.
    pub disk_used: u64,
    /// Objects in memory.
    pub objects_in_memory: u64,
    /// Objects on an SSD tier only.
    pub objects_on_disk: u64,
    /// Put reservations not yet committed or aborted.
    pub reservations: u64,
    /// Read leases not yet released or expired.
    pub leases: u64,
    /// Objects committed, ever.
    pub puts: u64,
    /// Keys looked up and found, ever.
    pub hits: u64,
    /// Keys looked up and not found, ever.
    pub misses: u64,
    /// Objects evicted (dropped) to make room, ever.
    pub evictions: u64,
    /// Objects moved from memory to an SSD tier, ever.
    pub demotions: u64,
    /// Objects moved from an SSD tier back to memory, ever.
    pub promotions: u64,
    /// Reservations dropped because they expired uncommitted, ever.
    pub reclaimed_reservations: u64,
    /// Leases dropped because they expired unreleased, ever.
    pub expired_leases: u64,
}

/// `sizeof(kvx_store_config)` in this library.
const STORE_CONFIG_SIZE: u32 = std::mem::size_of::<kvx_store_config>() as u32;

/// Fills `config` with the defaults (a pure client with no members: set `members`, or
/// `contributed_bytes`) and sets its `struct_size`. NULL is ignored.
///
/// # Safety
/// `config` is NULL or valid for one write of a `kvx_store_config`.
#[no_mangle]
pub extern "C" fn kvx_store_config_init(config: *mut kvx_store_config) {
    if config.is_null() {
        return;
    }
    let d = StoreConfig::default();
    let s = SegmentConfig::default();
    let value = kvx_store_config {
        struct_size: STORE_CONFIG_SIZE,
        replicas: u32::try_from(d.replicas).unwrap_or(1),
        members: std::ptr::null(),
        contributed_bytes: 0,
        disk_dir: std::ptr::null(),
        disk_bytes: 0,
        timeout_ms: millis(d.timeout),
        member_retry_ms: millis(d.member_retry),
        lease_ms: millis(s.lease),
        reserve_timeout_ms: millis(s.reserve_timeout),
        high_watermark: s.high_watermark,
        low_watermark: s.low_watermark,
    };
    // SAFETY: non-NULL was checked; the caller promises it points to a writable
    // kvx_store_config. `write` does not read the (possibly uninitialised) old value.
    unsafe { config.write(value) };
}

/// Joins the store through `engine` with `config` and stores the handle in `*out` (left
/// as it was on an error). With `contributed_bytes > 0` the engine serves a segment of that
/// much memory (and the SSD tier, if `disk_dir` is set) to the members from now on, until
/// the store is freed; an engine serves one segment, so a second contributing store on it is
/// `KVX_ERR_CONFIG` while the first lives (pure clients are not limited). The engine needs
/// a listener (`kvx_config.listen` not `""`), also for a pure client: members are reached
/// through its peers. Members are not
/// contacted here: each is opened on first use, and one that cannot be reached is skipped
/// (its keys go to the next owner) for `member_retry_ms`.
///
/// `KVX_ERR_INVALID_ARGUMENT`: a NULL argument, or `config` not filled by
/// `kvx_store_config_init` (`struct_size`). `KVX_ERR_CONFIG`: no members and nothing
/// contributed, a member that is not `host:port` or is listed twice, a segment that cannot
/// be set up (too small, bad watermarks, an SSD directory that cannot be used, the
/// memory not available, a `reserve_timeout_ms` under the clients' 5 s write window plus
/// 1 s), a second contributing store on the engine, or an engine without a listener;
/// `kvx_last_error()` names the value.
///
/// The store keeps `engine` running: free stores and the engine in either order.
///
/// # Safety
/// `engine` is NULL or a live handle; `config` is NULL or points to a `kvx_store_config`
/// whose strings are NULL or NUL-terminated (read only during this call); `out` is NULL or
/// valid for one write.
#[no_mangle]
pub extern "C" fn kvx_store_setup(
    engine: *const kvx_engine,
    config: *const kvx_store_config,
    out: *mut *mut kvx_store,
) -> kvx_status {
    store_guard(|| {
        let engine = Arc::clone(&handle_ref(engine)?.engine);
        let config = non_null(config.cast_mut(), "config")?;
        let out = non_null(out, "out")?;
        let config = store_config_from_c(config)?;
        let store = Store::setup(engine, config)?;
        let handle = Box::into_raw(Box::new(kvx_store { store }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(KVX_OK)
    })
}

/// Leaves the store and frees the handle: a contributing store's segment stops being
/// served (its objects are gone; members then miss its keys). Waits for no call: none may
/// be running on this handle. Its engine stops here if its handle was freed already and
/// this was its last store. NULL is ignored.
///
/// # Safety
/// `store` is NULL or a handle from `kvx_store_setup`, not freed before.
#[no_mangle]
pub extern "C" fn kvx_store_free(store: *mut kvx_store) {
    if store.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller passes a handle from kvx_store_setup, not freed before; we
        // take back the Box made there, exactly once.
        drop(unsafe { Box::from_raw(store) });
    }));
}

/// Puts `n` objects if their keys do not exist yet: key `i` (`key_lens[i]` bytes at
/// `keys[i]`) gets the `sizes[i]` bytes at `ptrs[i]`, which must lie inside one region
/// registered with the store's engine with `KVX_ACCESS_LOCAL_READ` (the engine moves them
/// to the key's owner without a copy). Returns when every key is done.
///
/// `results[i]` is `KVX_OK` (stored), or why not: `KVX_ERR_ALREADY_EXISTS` (the object is
/// there, unchanged: objects are immutable), `KVX_ERR_NO_SPACE`, `KVX_ERR_BAD_KEY`,
/// `KVX_ERR_ZERO_LENGTH` (size 0), `KVX_ERR_NOT_REGISTERED`, `KVX_ERR_UNAVAILABLE`,
/// `KVX_ERR_PEER` (the owner refused, or the transfer failed). The call returns `KVX_OK`
/// whatever the keys' results; if any key failed, `kvx_last_error()` names the first ("key
/// 3 of 64: ...") and how many failed. A whole-call error (`KVX_ERR_INVALID_ARGUMENT`: NULL
/// `store`, or a NULL array with `n > 0`) writes no result. The bytes may be reused once
/// this returns.
///
/// # Safety
/// `store` is NULL or a live handle; `keys`, `key_lens`, `ptrs`, `sizes` are NULL or
/// valid for `n` reads each; each `keys[i]` is NULL or valid for `key_lens[i]` reads when
/// `key_lens[i] <= KVX_STORE_KEY_MAX` (a longer key is refused unread); `results` is NULL
/// or valid for `n` writes.
#[no_mangle]
pub extern "C" fn kvx_store_batch_put_from(
    store: *const kvx_store,
    keys: *const *const u8,
    key_lens: *const usize,
    ptrs: *const *mut c_void,
    sizes: *const u64,
    n: usize,
    results: *mut i32,
) -> kvx_status {
    store_guard(|| {
        let store = store_ref(store)?;
        let (keys, bad) = keys_from_c(keys, key_lens, n)?;
        let ptrs = addrs_from_c(ptrs, n)?;
        let sizes = slice_from_c(sizes, n, "sizes")?;
        let results = out_array(results, n, "results")?;
        let done = store.batch_put_from(&keys, &ptrs, sizes)?;
        let done = merge(bad, done);
        report_items(done.iter().map(|r| r.as_ref().err()), n);
        for (i, r) in done.iter().enumerate() {
            let status = match r {
                Ok(()) => KVX_OK,
                Err(e) => item_status(e),
            };
            // SAFETY: i < n, and `results` is valid for `n` writes (out_array).
            unsafe { results.add(i).write(status) };
        }
        Ok(KVX_OK)
    })
}

/// Reads `n` objects: key `i`'s object goes into the buffer of `sizes[i]` bytes at
/// `ptrs[i]`, which must lie inside one region registered with the store's engine with
/// `KVX_ACCESS_LOCAL_WRITE` (the engine moves the bytes there without a copy). Returns
/// when every key is done.
///
/// `results[i]` is the object's size in bytes (> 0; the bytes after it in the buffer are
/// untouched), or a negative status: `KVX_ERR_NOT_FOUND`, `KVX_ERR_SIZE_MISMATCH` (the
/// object is larger than the buffer; nothing was read), `KVX_ERR_LEASE_EXPIRED` (the
/// buffer may hold torn bytes; read again), `KVX_ERR_BAD_KEY`, `KVX_ERR_ZERO_LENGTH`,
/// `KVX_ERR_NOT_REGISTERED`, `KVX_ERR_UNAVAILABLE`, `KVX_ERR_PEER`. The buffer of a key
/// that failed may have been written in part. The call returns `KVX_OK` whatever the keys'
/// results, and sets `kvx_last_error()` as `kvx_store_batch_put_from` does.
///
/// # Safety
/// As for `kvx_store_batch_put_from`.
#[no_mangle]
pub extern "C" fn kvx_store_batch_get_into(
    store: *const kvx_store,
    keys: *const *const u8,
    key_lens: *const usize,
    ptrs: *const *mut c_void,
    sizes: *const u64,
    n: usize,
    results: *mut i64,
) -> kvx_status {
    store_guard(|| {
        let store = store_ref(store)?;
        let (keys, bad) = keys_from_c(keys, key_lens, n)?;
        let ptrs = addrs_from_c(ptrs, n)?;
        let sizes = slice_from_c(sizes, n, "sizes")?;
        let results = out_array(results, n, "results")?;
        let done = store.batch_get_into(&keys, &ptrs, sizes)?;
        let done = merge(bad, done);
        report_items(done.iter().map(|r| r.as_ref().err()), n);
        for (i, r) in done.iter().enumerate() {
            let value = match r {
                // An object is never near 2^63 bytes (it lies in a segment's memory).
                Ok(len) => i64::try_from(*len).unwrap_or(i64::MAX),
                Err(e) => i64::from(item_status(e)),
            };
            // SAFETY: i < n, and `results` is valid for `n` writes (out_array).
            unsafe { results.add(i).write(value) };
        }
        Ok(KVX_OK)
    })
}

/// Which of `n` keys exist: `found[i]` is 1 if key `i`'s object exists, else 0, and
/// `*prefix` the number of keys that lead the list without a gap (keys `0 .. prefix - 1`
/// exist, key `prefix` does not): the pages a prefix cache can read back in order. A bad
/// key, or one whose owners cannot be reached, counts as missing (`kvx_last_error()` then
/// names the first such bad key). `found` and `prefix` may each be NULL.
///
/// # Safety
/// `store` is NULL or a live handle; `keys` and `key_lens` are NULL or valid for `n` reads;
/// each key as for `kvx_store_batch_put_from`; `found` is NULL or valid for `n` writes;
/// `prefix` is NULL or valid for one write.
#[no_mangle]
pub extern "C" fn kvx_store_batch_exists(
    store: *const kvx_store,
    keys: *const *const u8,
    key_lens: *const usize,
    n: usize,
    found: *mut u8,
    prefix: *mut usize,
) -> kvx_status {
    store_guard(|| {
        let store = store_ref(store)?;
        let (keys, bad) = keys_from_c(keys, key_lens, n)?;
        let found_out = if found.is_null() {
            None
        } else {
            Some(out_array(found, n, "found")?)
        };
        let existence = store.batch_exists(&keys)?;
        report_items(bad.iter().map(Option::as_ref), n);
        if let Some(out) = found_out {
            for (i, &f) in existence.found.iter().enumerate().take(n) {
                // SAFETY: i < n, and `out` is valid for `n` writes (out_array).
                unsafe { out.add(i).write(u8::from(f)) };
            }
        }
        if !prefix.is_null() {
            // SAFETY: non-NULL; the caller promises it is writable.
            unsafe { prefix.write(existence.prefix) };
        }
        Ok(KVX_OK)
    })
}

/// Removes `n` objects. `results[i]` is `KVX_OK` (removed), `KVX_ERR_NOT_FOUND`,
/// `KVX_ERR_BUSY` (someone is reading it: remove it later), `KVX_ERR_BAD_KEY`,
/// `KVX_ERR_UNAVAILABLE` or `KVX_ERR_PEER`. The call returns `KVX_OK` whatever the keys'
/// results, and sets `kvx_last_error()` as `kvx_store_batch_put_from` does.
///
/// # Safety
/// `store` is NULL or a live handle; `keys` and `key_lens` are NULL or valid for `n` reads;
/// each key as for `kvx_store_batch_put_from`; `results` is NULL or valid for `n` writes.
#[no_mangle]
pub extern "C" fn kvx_store_remove(
    store: *const kvx_store,
    keys: *const *const u8,
    key_lens: *const usize,
    n: usize,
    results: *mut i32,
) -> kvx_status {
    store_guard(|| {
        let store = store_ref(store)?;
        let (keys, bad) = keys_from_c(keys, key_lens, n)?;
        let results = out_array(results, n, "results")?;
        let done = merge(bad, store.remove(&keys)?);
        report_items(done.iter().map(|r| r.as_ref().err()), n);
        for (i, r) in done.iter().enumerate() {
            let status = match r {
                Ok(()) => KVX_OK,
                Err(e) => item_status(e),
            };
            // SAFETY: i < n, and `results` is valid for `n` writes (out_array).
            unsafe { results.add(i).write(status) };
        }
        Ok(KVX_OK)
    })
}

/// Removes every object no one is reading, on every member, and stores how many in
/// `*removed` (if `removed` is not NULL). `KVX_ERR_PEER` if a member could not be reached
/// or answered wrongly (`kvx_last_error()` names each); the others were still emptied and
/// `*removed` counts theirs.
///
/// # Safety
/// `store` is NULL or a live handle; `removed` is NULL or valid for one write.
#[no_mangle]
pub extern "C" fn kvx_store_remove_all(store: *const kvx_store, removed: *mut u64) -> kvx_status {
    store_guard(|| {
        let store = store_ref(store)?;
        let (count, failed) = store.remove_all();
        if !removed.is_null() {
            // SAFETY: non-NULL; the caller promises it is writable.
            unsafe { removed.write(count) };
        }
        members_failed("remove_all", &failed)
    })
}

/// Asks every member for its counters and stores their sums in `*out`. `KVX_ERR_PEER` if
/// a member could not be asked (`kvx_last_error()` names each); `*out` then holds the sums
/// of the members that answered.
///
/// # Safety
/// `store` is NULL or a live handle; `out` is NULL or valid for one write.
#[no_mangle]
pub extern "C" fn kvx_store_get_stats(
    store: *const kvx_store,
    out: *mut kvx_store_stats,
) -> kvx_status {
    store_guard(|| {
        let store = store_ref(store)?;
        let out = non_null(out, "out")?;
        let mut total = StoreStats::default();
        let mut failed = Vec::new();
        for (member, s) in store.member_stats() {
            match s {
                Ok(s) => total.add(&s),
                Err(why) => failed.push((member, why)),
            }
        }
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(stats_to_c(&total)) };
        members_failed("stats", &failed)
    })
}

/// A whole-call error: its status and its text for `kvx_last_error`.
struct Failure {
    status: kvx_status,
    text: String,
}

impl From<FfiError> for Failure {
    fn from(e: FfiError) -> Self {
        match e {
            FfiError::Engine(e) => Failure {
                status: status_of(&e),
                text: e.to_string(),
            },
            FfiError::Invalid(text) => Failure {
                status: KVX_ERR_INVALID_ARGUMENT,
                text,
            },
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Engine(engine) => status_of(engine),
            StoreError::LengthMismatch { .. } => KVX_ERR_INVALID_ARGUMENT,
            StoreError::NoMembers
            | StoreError::BadMember { .. }
            | StoreError::BadConfig(_)
            | StoreError::Segment(_) => KVX_ERR_CONFIG,
        };
        Failure {
            status,
            text: e.to_string(),
        }
    }
}

fn config_error(text: String) -> Failure {
    Failure {
        status: KVX_ERR_CONFIG,
        text,
    }
}

/// [`guard`] for calls whose errors carry their own status.
fn store_guard(f: impl FnOnce() -> Result<kvx_status, Failure>) -> kvx_status {
    guard(|| match f() {
        Ok(status) => Ok(status),
        Err(Failure { status, text }) => {
            set_last_error(text);
            Ok(status)
        }
    })
}

fn store_ref<'a>(store: *const kvx_store) -> Result<&'a Store, Failure> {
    // SAFETY: NULL is refused; otherwise the caller promises a live handle from
    // kvx_store_setup, which stays valid until kvx_store_free (not concurrent with calls).
    let handle = unsafe { store.as_ref() }.ok_or_else(|| Failure {
        status: KVX_ERR_INVALID_ARGUMENT,
        text: "store is NULL".into(),
    })?;
    Ok(&handle.store)
}

/// The per-status code of one key's error.
fn item_status(e: &ItemError) -> kvx_status {
    match e {
        ItemError::BadKey(_) => KVX_ERR_BAD_KEY,
        ItemError::ZeroSize => KVX_ERR_ZERO_LENGTH,
        ItemError::NotRegistered { .. } => KVX_ERR_NOT_REGISTERED,
        ItemError::AlreadyExists => KVX_ERR_ALREADY_EXISTS,
        ItemError::NoSpace { .. } => KVX_ERR_NO_SPACE,
        ItemError::NotFound => KVX_ERR_NOT_FOUND,
        ItemError::SizeMismatch { .. } => KVX_ERR_SIZE_MISMATCH,
        ItemError::LeaseExpired { .. } => KVX_ERR_LEASE_EXPIRED,
        ItemError::Busy => KVX_ERR_BUSY,
        ItemError::Unavailable(_) => KVX_ERR_UNAVAILABLE,
        ItemError::Failed(_) => KVX_ERR_PEER,
    }
}

/// The caller's keys, and the error of each one that is refused before the store sees it
/// (NULL, empty or too long: passed on as an empty key, which the store refuses too).
type CKeys<'a> = (Vec<&'a [u8]>, Vec<Option<ItemError>>);

fn keys_from_c<'a>(
    keys: *const *const u8,
    key_lens: *const usize,
    n: usize,
) -> Result<CKeys<'a>, Failure> {
    let ptrs = slice_from_c(keys, n, "keys")?;
    let lens = slice_from_c(key_lens, n, "key_lens")?;
    let mut out = Vec::with_capacity(n);
    let mut bad = Vec::with_capacity(n);
    for (&ptr, &len) in ptrs.iter().zip(lens) {
        if len == 0 || len > MAX_KEY {
            out.push(&[][..]);
            bad.push(Some(ItemError::BadKey(
                StoreWireError::BadKey { item: None, len }.to_string(),
            )));
        } else if ptr.is_null() {
            out.push(&[][..]);
            bad.push(Some(ItemError::BadKey(format!(
                "the key pointer is NULL but its length is {len}"
            ))));
        } else {
            // SAFETY: non-NULL, 1 <= len <= MAX_KEY; the caller promises `len` readable
            // bytes that stay unchanged during the call.
            out.push(unsafe { std::slice::from_raw_parts(ptr, len) });
            bad.push(None);
        }
    }
    Ok((out, bad))
}

fn addrs_from_c(ptrs: *const *mut c_void, n: usize) -> Result<Vec<u64>, Failure> {
    Ok(slice_from_c(ptrs, n, "ptrs")?
        .iter()
        .map(|&p| p as u64)
        .collect())
}

/// Checks an output array of `n` elements: non-NULL when `n > 0`, and not impossibly
/// large. The elements are written through the pointer (they may be uninitialised).
fn out_array<T>(ptr: *mut T, n: usize, name: &str) -> Result<*mut T, Failure> {
    if n == 0 {
        return Ok(ptr);
    }
    if ptr.is_null() {
        return Err(FfiError::Invalid(format!("{name} is NULL but n is {n}")).into());
    }
    if n.checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(FfiError::Invalid(format!("{name} count {n} is impossibly large")).into());
    }
    Ok(ptr)
}

/// The store's per-key results, with the keys refused at the boundary put back.
fn merge<T>(
    bad: Vec<Option<ItemError>>,
    done: Vec<Result<T, ItemError>>,
) -> Vec<Result<T, ItemError>> {
    done.into_iter()
        .zip(bad)
        .map(|(r, b)| match b {
            Some(e) => Err(e),
            None => r,
        })
        .collect()
}

/// Sets `kvx_last_error` to the first failed key's error and how many failed (if any).
fn report_items<'e>(errors: impl Iterator<Item = Option<&'e ItemError>>, n: usize) {
    let mut first = None;
    let mut failed = 0usize;
    for (i, e) in errors.enumerate() {
        if let Some(e) = e {
            failed += 1;
            first.get_or_insert((i, e));
        }
    }
    if let Some((i, e)) = first {
        let others = match failed {
            1 => String::new(),
            f => format!(" ({f} keys failed)"),
        };
        set_last_error(format!("key {i} of {n}: {e}{others}"));
    }
}

/// `KVX_OK`, or `KVX_ERR_PEER` naming the members of `failed`.
fn members_failed(what: &str, failed: &[(String, String)]) -> Result<kvx_status, Failure> {
    if failed.is_empty() {
        return Ok(KVX_OK);
    }
    let list: Vec<String> = failed
        .iter()
        .map(|(m, why)| format!("{m}: {why}"))
        .collect();
    Err(Failure {
        status: KVX_ERR_PEER,
        text: format!(
            "{what}: {} member(s) could not be asked: {}",
            failed.len(),
            list.join("; ")
        ),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads a caller's store config.
fn store_config_from_c(config: *const kvx_store_config) -> Result<StoreConfig, Failure> {
    // SAFETY: `config` is non-NULL (checked by the caller) and points to a
    // kvx_store_config of some ABI version; `struct_size` is its first field in every one.
    let struct_size = unsafe { std::ptr::addr_of!((*config).struct_size).read_unaligned() };
    if struct_size != STORE_CONFIG_SIZE {
        return Err(FfiError::Invalid(if struct_size == 0 {
            "config.struct_size is 0: fill the store config with kvx_store_config_init() first"
                .into()
        } else {
            format!(
                "config.struct_size {struct_size} is not sizeof(kvx_store_config) \
                 {STORE_CONFIG_SIZE} of this library: the program was built against a \
                 different kvxfer header"
            )
        })
        .into());
    }
    // SAFETY: the caller's struct is as large as ours (struct_size); the caller promises
    // it is initialised and unchanged during the call.
    let c = unsafe { config.read_unaligned() };
    let members: Vec<String> = if c.members.is_null() {
        Vec::new()
    } else {
        str_from_c(c.members, "config.members")?
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect()
    };
    let disk_dir = if c.disk_dir.is_null() {
        None
    } else {
        let dir = str_from_c(c.disk_dir, "config.disk_dir")?;
        (!dir.is_empty()).then(|| PathBuf::from(dir))
    };
    let disk = match (disk_dir, c.disk_bytes) {
        (None, 0) => None,
        (None, bytes) => {
            return Err(config_error(format!(
                "config.disk_bytes is {bytes} but config.disk_dir is not set: name the SSD \
                 tier's directory, or set disk_bytes to 0"
            )))
        }
        (Some(dir), 0) => {
            return Err(config_error(format!(
                "config.disk_dir is {} but config.disk_bytes is 0: give the SSD tier a size",
                dir.display()
            )))
        }
        (Some(dir), bytes) => Some((dir, bytes)),
    };
    if disk.is_some() && c.contributed_bytes == 0 {
        return Err(config_error(
            "config.disk_dir is set but config.contributed_bytes is 0: only a store that \
             contributes memory has an SSD tier"
                .into(),
        ));
    }
    let d = StoreConfig::default();
    let s = SegmentConfig::default();
    let ms = |v: u64, default: Duration| {
        if v == 0 {
            default
        } else {
            Duration::from_millis(v)
        }
    };
    let fraction = |v: f64, default: f64| if v == 0.0 { default } else { v };
    let segment = (c.contributed_bytes > 0).then(|| SegmentConfig {
        memory_bytes: c.contributed_bytes,
        disk,
        high_watermark: fraction(c.high_watermark, s.high_watermark),
        low_watermark: fraction(c.low_watermark, s.low_watermark),
        reserve_timeout: ms(c.reserve_timeout_ms, s.reserve_timeout),
        lease: ms(c.lease_ms, s.lease),
    });
    Ok(StoreConfig {
        members,
        segment,
        replicas: if c.replicas == 0 {
            d.replicas
        } else {
            c.replicas as usize
        },
        timeout: ms(c.timeout_ms, d.timeout),
        member_retry: ms(c.member_retry_ms, d.member_retry),
    })
}

fn stats_to_c(s: &StoreStats) -> kvx_store_stats {
    kvx_store_stats {
        memory_capacity: s.memory_capacity,
        memory_used: s.memory_used,
        disk_capacity: s.disk_capacity,
        disk_used: s.disk_used,
        objects_in_memory: s.objects_in_memory,
        objects_on_disk: s.objects_on_disk,
        reservations: s.reservations,
        leases: s.leases,
        puts: s.puts,
        hits: s.hits,
        misses: s.misses,
        evictions: s.evictions,
        demotions: s.demotions,
        promotions: s.promotions,
        reclaimed_reservations: s.reclaimed_reservations,
        expired_leases: s.expired_leases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_keys_are_refused_unread() {
        // A dangling pointer with a huge length, and NULL with a length: neither is read.
        let dangling = std::ptr::NonNull::<u8>::dangling().as_ptr().cast_const();
        let good = b"page-1";
        let ptrs = [dangling, std::ptr::null(), good.as_ptr(), dangling];
        let lens = [usize::MAX, 5, good.len(), 0];
        let (keys, bad) = keys_from_c(ptrs.as_ptr(), lens.as_ptr(), 4).ok().unwrap();
        assert_eq!(keys, [&b""[..], b"", good, b""]);
        assert!(
            matches!(&bad[0], Some(ItemError::BadKey(t)) if t.contains("18446744073709551615"))
        );
        assert!(matches!(&bad[1], Some(ItemError::BadKey(t)) if t.contains("NULL")));
        assert!(bad[2].is_none());
        assert!(matches!(&bad[3], Some(ItemError::BadKey(t)) if t.contains("key of 0 bytes")));
    }

    #[test]
    fn output_arrays_are_checked() {
        assert!(out_array(std::ptr::null_mut::<i32>(), 0, "results").is_ok());
        let e = out_array(std::ptr::null_mut::<i32>(), 3, "results")
            .err()
            .unwrap();
        assert_eq!(e.status, KVX_ERR_INVALID_ARGUMENT);
        assert!(e.text.contains("results is NULL"));
        let mut one = 0i64;
        let e = out_array(&mut one, usize::MAX, "results").err().unwrap();
        assert!(e.text.contains("impossibly large"), "{}", e.text);
    }

    #[test]
    fn zero_fields_mean_defaults() {
        let mut c = std::mem::MaybeUninit::<kvx_store_config>::uninit();
        kvx_store_config_init(c.as_mut_ptr());
        // SAFETY: kvx_store_config_init wrote the whole struct.
        let mut c = unsafe { c.assume_init() };
        c.replicas = 0;
        c.timeout_ms = 0;
        c.lease_ms = 0;
        c.high_watermark = 0.0;
        c.contributed_bytes = 1 << 20;
        c.members = c" a:1 ,, b:2,".as_ptr();
        let config = store_config_from_c(&c).ok().unwrap();
        assert_eq!(config.members, ["a:1", "b:2"]);
        assert_eq!(config.replicas, 1);
        assert_eq!(config.timeout, StoreConfig::default().timeout);
        let segment = config.segment.unwrap();
        assert_eq!(segment.memory_bytes, 1 << 20);
        assert_eq!(segment.lease, SegmentConfig::default().lease);
        assert_eq!(
            segment.high_watermark,
            SegmentConfig::default().high_watermark
        );
        assert_eq!(segment.disk, None);
    }

    #[test]
    fn every_item_error_has_a_store_status() {
        let errors = [
            ItemError::BadKey(String::new()),
            ItemError::ZeroSize,
            ItemError::NotRegistered {
                addr: 0,
                len: 1,
                need: "",
            },
            ItemError::AlreadyExists,
            ItemError::NoSpace {
                owner: String::new(),
            },
            ItemError::NotFound,
            ItemError::SizeMismatch {
                stored: 2,
                buffer: 1,
            },
            ItemError::LeaseExpired { lease_ms: 1 },
            ItemError::Busy,
            ItemError::Unavailable(String::new()),
            ItemError::Failed(String::new()),
        ];
        let codes: std::collections::HashSet<kvx_status> = errors.iter().map(item_status).collect();
        assert_eq!(codes.len(), errors.len(), "two item errors share a status");
        assert!(codes.iter().all(|&c| c < 0));
    }
}
