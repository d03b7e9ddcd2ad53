//! Finding the CUDA driver at run time — `dlopen("libcuda.so.1")`, one `dlsym` per function,
//! `cuInit(0)` — and the process-wide [`Cuda`] handle: devices, primary contexts, pointer
//! queries.
//!
//! Symbols are looked up by the names `cuda.h` maps its API names to (`cuMemAlloc` is
//! `#define`d to `cuMemAlloc_v2`, and so on; the table below lists the exported names).
//! libcuda.so.1 does not version its symbols, so plain `dlsym` is right. Only `cuInit` and
//! `cuDeviceGetCount` (CUDA 2.0) are required to load; any other function an old driver
//! lacks makes only the operations that need it fail, with a
//! [`CudaError::MissingSymbol`] naming the function and the CUDA version that added it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{OnceLock, PoisonError};

use super::api::*;
use super::error::CudaError;

/// The text of the last `dlerror()`, or `fallback` when there is none.
fn dlerror_text(fallback: &str) -> String {
    // SAFETY: dlerror takes no arguments; glibc keeps its message per thread.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        fallback.to_string()
    } else {
        // SAFETY: a non-null dlerror() result is a NUL-terminated string that stays valid
        // until the next dl* call on this thread; we copy it out at once.
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

/// A `CStr` from a NUL-terminated literal, checked at compile time.
const fn cstr(bytes: &'static [u8]) -> &'static CStr {
    match CStr::from_bytes_with_nul(bytes) {
        Ok(s) => s,
        Err(_) => panic!("symbol literal without a single trailing NUL"),
    }
}

/// The code a driver function returned, with the function's name, to be turned into a
/// `Result` with [`Outcome::ok`] (or inspected, for calls where a non-zero code is not an
/// error, like `cuEventQuery`'s `CUDA_ERROR_NOT_READY`).
#[must_use]
pub(super) struct Outcome<'a> {
    funcs: &'a Functions,
    /// The exported function that was called.
    pub call: &'static str,
    /// Its `CUresult`.
    pub code: CUresult,
}

impl Outcome<'_> {
    /// `Ok` for `CUDA_SUCCESS`, else the error with the driver's name and description.
    pub fn ok(self) -> Result<(), CudaError> {
        if self.code == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(self.into_error())
        }
    }

    /// The error this code stands for (whatever the code).
    pub fn into_error(self) -> CudaError {
        let (name, message) = self.funcs.describe(self.code);
        CudaError::Driver {
            call: self.call,
            code: self.code,
            name,
            message,
        }
    }
}

/// Declares [`Functions`] (one optional pointer per driver function), its resolution, and
/// one method on [`Cuda`] per function that calls it — `Err(MissingSymbol)` when the driver
/// lacks it, else the [`Outcome`] — from one list of
/// `name = "symbol" since "version": fn(args);`. Every function returns `CUresult`.
macro_rules! cuda_functions {
    (
        $( $field:ident = $sym:literal since $since:literal :
            fn($($arg:ident : $argty:ty),* $(,)?) ; )*
    ) => {
        /// The driver functions kvxfer calls; `None` where this driver lacks one.
        struct Functions {
            $( $field: Option<unsafe extern "C" fn($($argty),*) -> CUresult>, )*
        }

        impl Functions {
            /// Every `(symbol, CUDA version that introduced it)` resolved, in order.
            const SYMBOLS: &'static [(&'static str, &'static str)] = &[ $( ($sym, $since), )* ];

            /// Looks every symbol up in `handle`.
            ///
            /// # Safety
            ///
            /// `handle` must be a live `dlopen` handle of NVIDIA's libcuda, whose exported
            /// functions have the C signatures of `cuda.h` declared here.
            unsafe fn resolve(handle: *mut c_void) -> Functions {
                Functions {
                    $( $field: {
                        const NAME: &CStr = cstr(concat!($sym, "\0").as_bytes());
                        // SAFETY: handle is live (this function's contract); NAME is
                        // NUL-terminated.
                        let p = unsafe { libc::dlsym(handle, NAME.as_ptr()) };
                        if p.is_null() {
                            None
                        } else {
                            // SAFETY: p is the address of libcuda's exported C function
                            // $sym, whose cuda.h signature is the one declared here.
                            Some(unsafe {
                                std::mem::transmute::<
                                    *mut c_void,
                                    unsafe extern "C" fn($($argty),*) -> CUresult,
                                >(p)
                            })
                        }
                    }, )*
                }
            }

            /// The symbols this driver lacks.
            fn missing(&self) -> Vec<&'static str> {
                let mut missing = Vec::new();
                $( if self.$field.is_none() { missing.push($sym); } )*
                missing
            }
        }

        #[allow(dead_code)]
        impl Cuda {
            $(
                #[doc = concat!("Calls `", $sym, "` (CUDA ", $since, "+); `Err` only when \
                    this driver does not export it.")]
                ///
                /// # Safety
                ///
                /// The arguments must meet the contract of the C function of that name in
                /// `cuda.h` (valid out-pointers, live handles, memory valid for the sizes
                /// given).
                #[inline]
                pub(super) unsafe fn $field(&self, $($arg: $argty),*)
                    -> Result<Outcome<'_>, CudaError>
                {
                    let f = self.funcs.$field.ok_or_else(|| self.missing_symbol($sym))?;
                    // SAFETY: forwarded to the caller (see # Safety).
                    let code = unsafe { f($($arg),*) };
                    Ok(Outcome { funcs: &self.funcs, call: $sym, code })
                }
            )*
        }
    };
}

cuda_functions! {
    init = "cuInit" since "2.0": fn(flags: c_uint);
    driver_get_version = "cuDriverGetVersion" since "2.2": fn(version: *mut c_int);
    get_error_name = "cuGetErrorName" since "6.0": fn(error: CUresult, pstr: *mut *const c_char);
    get_error_string = "cuGetErrorString" since "6.0":
        fn(error: CUresult, pstr: *mut *const c_char);
    device_get_count = "cuDeviceGetCount" since "2.0": fn(count: *mut c_int);
    device_get = "cuDeviceGet" since "2.0": fn(device: *mut CUdevice, ordinal: c_int);
    device_get_pci_bus_id = "cuDeviceGetPCIBusId" since "4.1":
        fn(pci_bus_id: *mut c_char, len: c_int, dev: CUdevice);
    device_can_access_peer = "cuDeviceCanAccessPeer" since "4.0":
        fn(can_access_peer: *mut c_int, dev: CUdevice, peer_dev: CUdevice);
    device_primary_ctx_retain = "cuDevicePrimaryCtxRetain" since "7.0":
        fn(pctx: *mut CUcontext, dev: CUdevice);
    device_primary_ctx_release = "cuDevicePrimaryCtxRelease_v2" since "11.0": fn(dev: CUdevice);
    ctx_push_current = "cuCtxPushCurrent_v2" since "4.0": fn(ctx: CUcontext);
    ctx_pop_current = "cuCtxPopCurrent_v2" since "4.0": fn(pctx: *mut CUcontext);
    ctx_get_current = "cuCtxGetCurrent" since "4.0": fn(pctx: *mut CUcontext);
    ctx_enable_peer_access = "cuCtxEnablePeerAccess" since "4.0":
        fn(peer_context: CUcontext, flags: c_uint);
    mem_alloc = "cuMemAlloc_v2" since "3.2": fn(dptr: *mut CUdeviceptr, bytesize: usize);
    mem_free = "cuMemFree_v2" since "3.2": fn(dptr: CUdeviceptr);
    mem_alloc_host = "cuMemAllocHost_v2" since "3.2": fn(pp: *mut *mut c_void, bytesize: usize);
    mem_free_host = "cuMemFreeHost" since "2.0": fn(p: *mut c_void);
    mem_host_register = "cuMemHostRegister_v2" since "6.5":
        fn(p: *mut c_void, bytesize: usize, flags: c_uint);
    mem_host_unregister = "cuMemHostUnregister" since "4.0": fn(p: *mut c_void);
    memcpy = "cuMemcpy" since "4.0": fn(dst: CUdeviceptr, src: CUdeviceptr, byte_count: usize);
    memcpy_async = "cuMemcpyAsync" since "4.0":
        fn(dst: CUdeviceptr, src: CUdeviceptr, byte_count: usize, stream: CUstream);
    memcpy_htod = "cuMemcpyHtoD_v2" since "3.2":
        fn(dst_device: CUdeviceptr, src_host: *const c_void, byte_count: usize);
    memcpy_dtoh = "cuMemcpyDtoH_v2" since "3.2":
        fn(dst_host: *mut c_void, src_device: CUdeviceptr, byte_count: usize);
    mem_get_address_range = "cuMemGetAddressRange_v2" since "3.2":
        fn(pbase: *mut CUdeviceptr, psize: *mut usize, dptr: CUdeviceptr);
    mem_get_handle_for_address_range = "cuMemGetHandleForAddressRange" since "11.7":
        fn(handle: *mut c_void, dptr: CUdeviceptr, size: usize,
           handle_type: CUmemRangeHandleType, flags: u64);
    pointer_get_attributes = "cuPointerGetAttributes" since "7.0":
        fn(num_attributes: c_uint, attributes: *mut CUpointer_attribute,
           data: *mut *mut c_void, ptr: CUdeviceptr);
    ipc_get_mem_handle = "cuIpcGetMemHandle" since "4.1":
        fn(handle: *mut CUipcMemHandle, dptr: CUdeviceptr);
    ipc_open_mem_handle = "cuIpcOpenMemHandle_v2" since "11.0":
        fn(pdptr: *mut CUdeviceptr, handle: CUipcMemHandle, flags: c_uint);
    ipc_close_mem_handle = "cuIpcCloseMemHandle" since "4.1": fn(dptr: CUdeviceptr);
    stream_create = "cuStreamCreate" since "2.0": fn(stream: *mut CUstream, flags: c_uint);
    stream_destroy = "cuStreamDestroy_v2" since "4.0": fn(stream: CUstream);
    stream_synchronize = "cuStreamSynchronize" since "2.0": fn(stream: CUstream);
    event_create = "cuEventCreate" since "2.0": fn(event: *mut CUevent, flags: c_uint);
    event_record = "cuEventRecord" since "2.0": fn(event: CUevent, stream: CUstream);
    event_query = "cuEventQuery" since "2.0": fn(event: CUevent);
    event_synchronize = "cuEventSynchronize" since "2.0": fn(event: CUevent);
    event_destroy = "cuEventDestroy_v2" since "4.0": fn(event: CUevent);
}

impl Functions {
    /// The driver's name and description of `code` (`CUDA_ERROR_OUT_OF_MEMORY`, `out of
    /// memory`), or stand-ins when the driver cannot say.
    fn describe(&self, code: CUresult) -> (String, String) {
        let text = |f: Option<unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult>| {
            let f = f?;
            let mut s: *const c_char = ptr::null();
            // SAFETY: s is a valid out-pointer; the driver stores a pointer to a static
            // NUL-terminated string, or leaves it null for a code it does not know.
            let rc = unsafe { f(code, &mut s) };
            if rc != CUDA_SUCCESS || s.is_null() {
                return None;
            }
            // SAFETY: s points to a static NUL-terminated string of the driver.
            Some(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
        };
        let name = text(self.get_error_name).unwrap_or_else(|| format!("CUresult {code}"));
        let message = text(self.get_error_string).unwrap_or_else(|| "unknown error".into());
        (name, message)
    }
}

/// Where an address lives when it is device memory of this process: the allocation that
/// holds it, found with `cuPointerGetAttributes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceMemory {
    /// The device ordinal the memory belongs to (as this process numbers devices, after
    /// `CUDA_VISIBLE_DEVICES`).
    pub device: u32,
    /// The base address of the whole allocation.
    pub base: u64,
    /// The size of the whole allocation in bytes.
    pub len: u64,
    /// Whether legacy CUDA IPC ([`ipc_handle`](super::ipc_handle)) can share the allocation:
    /// true for `cuMemAlloc` memory (what PyTorch's caching allocator uses by default),
    /// false for virtual-memory-management allocations (`cuMemCreate`, e.g. PyTorch's
    /// `expandable_segments:True`) and memory pools.
    pub legacy_ipc: bool,
}

/// The CUDA driver, loaded once per process by [`driver`]. `Send + Sync`: the driver API is
/// thread-safe, and nothing here changes after loading except the per-device table of
/// primary contexts (atomics).
pub struct Cuda {
    library: String,
    version: i32,
    /// The primary context of each device, retained on first use and kept for the life of
    /// the process (null until then).
    contexts: Box<[AtomicPtr<CUctx_st>]>,
    /// Pairs (from, to) of devices whose peer access `enable_peer_access` has settled.
    peers: std::sync::Mutex<std::collections::HashMap<(u32, u32), bool>>,
    funcs: Functions,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("library", &self.library)
            .field("version", &self.version)
            .field("devices", &self.contexts.len())
            .field("missing_symbols", &self.funcs.missing())
            .finish_non_exhaustive()
    }
}

static LOADED: OnceLock<Result<Cuda, CudaError>> = OnceLock::new();

/// The CUDA driver of this process: `libcuda.so.1` opened and `cuInit(0)` called on the
/// first call; later calls return the same result at once, error included (clone it; say it
/// once). Never panics: no driver, no device or a library that is not NVIDIA's is a
/// [`CudaError`] for which [`is_unavailable`](CudaError::is_unavailable) is true.
pub fn driver() -> Result<&'static Cuda, CudaError> {
    LOADED
        .get_or_init(|| Cuda::load_from(LIBRARY))
        .as_ref()
        .map_err(Clone::clone)
}

/// The CUDA driver if this process already uses it (`libcuda.so.1` is loaded: someone in
/// the process initialised CUDA), else `None` without loading anything. Memory can only be
/// device memory in a process that loaded the driver, so location detection asks this
/// rather than [`driver`], which would load and initialise CUDA in every process that
/// registers host memory.
pub fn driver_in_use() -> Option<&'static Cuda> {
    if let Some(loaded) = LOADED.get() {
        return loaded.as_ref().ok();
    }
    let name = CString::new(LIBRARY).ok()?;
    // SAFETY: name is NUL-terminated; RTLD_NOLOAD only looks the library up (it loads
    // nothing and runs no initialiser); the handle's reference is dropped at once.
    let handle = unsafe {
        libc::dlopen(
            name.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NOLOAD,
        )
    };
    if handle.is_null() {
        return None;
    }
    // SAFETY: a handle dlopen just returned; the library stays loaded (someone else holds it).
    unsafe { libc::dlclose(handle) };
    driver().ok()
}

impl Cuda {
    /// Opens `library` (a soname searched on the loader path, or a path), resolves the
    /// driver functions and calls `cuInit(0)`, without caching: for tests and for naming
    /// another library. Objects of this module ([`DeviceBuffer`](super::DeviceBuffer),
    /// [`Stream`](super::Stream), ...) always use [`driver`].
    ///
    /// A library that lacks `cuInit` or `cuDeviceGetCount` is closed again and reported as
    /// [`CudaError::NotDriver`]; once `cuInit` has been called the library stays loaded for
    /// the life of the process. Like any `dlopen`, this runs the library's initialisers:
    /// only name a CUDA driver library.
    pub fn load_from(library: &str) -> Result<Cuda, CudaError> {
        let name = CString::new(library).map_err(|_| CudaError::LibraryNotFound {
            library: library.to_string(),
            reason: "the name contains a NUL byte".into(),
        })?;
        // SAFETY: dlerror takes no arguments; this clears any stale message of this thread.
        unsafe { libc::dlerror() };
        // SAFETY: name is NUL-terminated; the flags are valid dlopen flags.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(CudaError::LibraryNotFound {
                library: library.to_string(),
                reason: dlerror_text("unknown dlopen error"),
            });
        }
        // SAFETY: handle was just returned by dlopen. A library named libcuda.so.1 that
        // exports these symbols is NVIDIA's driver, with cuda.h's signatures.
        let funcs = unsafe { Functions::resolve(handle) };
        for (present, symbol) in [
            (funcs.init.is_some(), "cuInit"),
            (funcs.device_get_count.is_some(), "cuDeviceGetCount"),
        ] {
            if !present {
                // Look the symbol up again for dlerror's text.
                let reason = {
                    let sym = CString::new(symbol).expect("no NUL in a symbol name");
                    // SAFETY: handle is live; sym is NUL-terminated.
                    unsafe { libc::dlsym(handle, sym.as_ptr()) };
                    dlerror_text("not found")
                };
                // SAFETY: handle is live, nothing was called in the library and no pointer
                // resolved from it escapes (funcs is dropped here).
                unsafe { libc::dlclose(handle) };
                return Err(CudaError::NotDriver {
                    library: library.to_string(),
                    symbol,
                    reason,
                });
            }
        }
        let mut cuda = Cuda {
            library: library.to_string(),
            version: 0,
            contexts: Box::new([]),
            peers: std::sync::Mutex::default(),
            funcs,
        };
        // SAFETY: cuInit takes its flags by value; 0 is the only valid value.
        let init = unsafe { cuda.init(0) }?;
        if init.code != CUDA_SUCCESS {
            let (name, message) = cuda.funcs.describe(init.code);
            return Err(CudaError::InitFailed {
                library: library.to_string(),
                code: init.code,
                name,
                message,
            });
        }
        let mut version: c_int = 0;
        // SAFETY: version is a valid out-pointer.
        if let Ok(outcome) = unsafe { cuda.driver_get_version(&mut version) } {
            if outcome.code != CUDA_SUCCESS {
                version = 0;
            }
        }
        cuda.version = version;
        let mut count: c_int = 0;
        // SAFETY: count is a valid out-pointer; the driver is initialised.
        unsafe { cuda.device_get_count(&mut count) }?.ok()?;
        cuda.contexts = (0..count.max(0))
            .map(|_| AtomicPtr::new(ptr::null_mut()))
            .collect();
        Ok(cuda)
    }

    /// The library name or path this was loaded from.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// `cuDriverGetVersion`: the CUDA version the driver supports, as `1000 * major + 10 *
    /// minor` (`12060` for 12.6); 0 if the driver could not say.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// The number of CUDA devices this process sees (`cuDeviceGetCount` at load; the set
    /// cannot change afterwards). Device ordinals are `0..device_count()`, in the driver's
    /// order (`CUDA_DEVICE_ORDER`, `CUDA_VISIBLE_DEVICES`), which need not be PCI order: use
    /// [`pci_bus_id`](Cuda::pci_bus_id) to match them with the topology.
    pub fn device_count(&self) -> u32 {
        self.contexts.len() as u32
    }

    /// The driver functions this driver does not export (empty on any current driver); the
    /// operations needing them return [`CudaError::MissingSymbol`].
    pub fn missing_symbols(&self) -> Vec<&'static str> {
        self.funcs.missing()
    }

    /// The error for a function this driver lacks.
    fn missing_symbol(&self, symbol: &'static str) -> CudaError {
        let since = Functions::SYMBOLS
            .iter()
            .find(|(s, _)| *s == symbol)
            .map_or("?", |(_, v)| v);
        CudaError::MissingSymbol {
            library: self.library.clone(),
            symbol,
            since,
            driver_version: self.version,
        }
    }

    /// The error for a device ordinal past the device count.
    fn no_such_device(&self, call: &'static str, device: u32) -> CudaError {
        CudaError::invalid(
            call,
            format!(
                "device {device} does not exist: this process sees {} CUDA device(s)",
                self.device_count()
            ),
        )
    }

    /// The `CUdevice` of ordinal `device`, refusing ordinals past the device count.
    fn device_handle(&self, call: &'static str, device: u32) -> Result<CUdevice, CudaError> {
        if device >= self.device_count() {
            return Err(self.no_such_device(call, device));
        }
        let mut handle: CUdevice = 0;
        // SAFETY: handle is a valid out-pointer; the ordinal is in range.
        unsafe { self.device_get(&mut handle, device as c_int) }?.ok()?;
        Ok(handle)
    }

    /// `cuDeviceGetPCIBusId`: the PCI address of `device` in the form of
    /// `/sys/bus/pci/devices` names (`0000:3b:00.0`: lower case, a 4-digit domain), to match
    /// CUDA ordinals with the topology's GPUs.
    pub fn pci_bus_id(&self, device: u32) -> Result<String, CudaError> {
        let dev = self.device_handle("cuDeviceGetPCIBusId", device)?;
        let mut buf = [0 as c_char; 64];
        // SAFETY: buf is valid for writing its length; the driver writes a NUL-terminated
        // string of at most len bytes.
        unsafe { self.device_get_pci_bus_id(buf.as_mut_ptr(), buf.len() as c_int, dev) }?.ok()?;
        let last = buf.len() - 1;
        buf[last] = 0;
        // SAFETY: buf is NUL-terminated (its last byte was just set to 0).
        let raw = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        Ok(normalize_pci_bus_id(&raw))
    }

    /// `cuDeviceCanAccessPeer`: whether device `a` can access memory of device `b` directly
    /// (NVLink or PCIe peer-to-peer). True for `a == b`.
    pub fn can_access_peer(&self, a: u32, b: u32) -> Result<bool, CudaError> {
        let da = self.device_handle("cuDeviceCanAccessPeer", a)?;
        let db = self.device_handle("cuDeviceCanAccessPeer", b)?;
        if a == b {
            return Ok(true);
        }
        let mut can: c_int = 0;
        // SAFETY: can is a valid out-pointer; both device handles come from cuDeviceGet.
        unsafe { self.device_can_access_peer(&mut can, da, db) }?.ok()?;
        Ok(can != 0)
    }

    /// Lets `from`'s context access `to`'s memory directly (`cuCtxEnablePeerAccess`), so
    /// that copies between the two GPUs go over NVLink or PCIe peer-to-peer instead of
    /// through host memory. Whether they can (false when the hardware cannot, or for
    /// `from == to`, which needs nothing); asked of the driver once per pair.
    pub fn enable_peer_access(&self, from: u32, to: u32) -> Result<bool, CudaError> {
        if from == to {
            return Ok(false);
        }
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&done) = peers.get(&(from, to)) {
            return Ok(done);
        }
        let enabled = if self.can_access_peer(from, to)? {
            let peer = self.primary_context(to)?;
            let _ctx = self.enter(from)?;
            // SAFETY: peer is a live (retained, never released) primary context; flags 0.
            let outcome = unsafe { self.ctx_enable_peer_access(peer, 0) }?;
            match outcome.code {
                CUDA_SUCCESS | CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => true,
                _ => {
                    // Settled too: asking again on every copy would only fail again.
                    peers.insert((from, to), false);
                    return Err(outcome.into_error());
                }
            }
        } else {
            false
        };
        peers.insert((from, to), enabled);
        Ok(enabled)
    }

    /// The primary context of `device`, retained on first use (one reference per process,
    /// never released: it lives as long as the process, shared with any framework in the
    /// process that uses the same device, as PyTorch does).
    fn primary_context(&self, device: u32) -> Result<CUcontext, CudaError> {
        let Some(slot) = self.contexts.get(device as usize) else {
            return Err(self.no_such_device("cuDevicePrimaryCtxRetain", device));
        };
        let ctx = slot.load(Ordering::Acquire);
        if !ctx.is_null() {
            return Ok(ctx);
        }
        let dev = self.device_handle("cuDevicePrimaryCtxRetain", device)?;
        let mut ctx: CUcontext = ptr::null_mut();
        // SAFETY: ctx is a valid out-pointer; dev comes from cuDeviceGet.
        unsafe { self.device_primary_ctx_retain(&mut ctx, dev) }?.ok()?;
        match slot.compare_exchange(ptr::null_mut(), ctx, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(ctx),
            Err(existing) => {
                // Another thread retained it first (the same context: a device has one
                // primary context): give our extra reference back.
                // SAFETY: we hold one reference of dev's primary context from the retain.
                if let Ok(outcome) = unsafe { self.device_primary_ctx_release(dev) } {
                    let _ = outcome.ok();
                }
                Ok(existing)
            }
        }
    }

    /// Makes the primary context of `device` current on this thread until the guard is
    /// dropped (`cuCtxPushCurrent_v2` / `cuCtxPopCurrent_v2`). Nothing is pushed when it is
    /// current already, so nesting is cheap and a thread that keeps a guard for its life
    /// pays nothing per operation. Drop nested guards in reverse order.
    pub fn enter(&self, device: u32) -> Result<ContextGuard<'_>, CudaError> {
        let ctx = self.primary_context(device)?;
        let mut current: CUcontext = ptr::null_mut();
        // SAFETY: current is a valid out-pointer.
        let already = match unsafe { self.ctx_get_current(&mut current) } {
            Ok(outcome) => outcome.code == CUDA_SUCCESS && current == ctx,
            Err(_) => false,
        };
        if !already {
            // SAFETY: ctx is a live (retained, never released) primary context.
            unsafe { self.ctx_push_current(ctx) }?.ok()?;
        }
        Ok(ContextGuard {
            cuda: self,
            device,
            pushed: !already,
            _not_send: PhantomData,
        })
    }

    /// The allocation holding all of `addr..addr + len`, which must be device memory: an
    /// error saying why not otherwise (not device memory — never was, or freed — or running
    /// past the allocation's end). Before the CPU or a copy touches memory labelled GPU
    /// memory: the driver takes an address it does not know for host memory.
    pub fn device_range(&self, addr: u64, len: u64) -> Result<DeviceMemory, String> {
        let mem = self.device_memory(addr).ok_or_else(|| {
            format!("{addr:#x} is not (or no longer) device memory the CUDA driver knows")
        })?;
        let end = addr.checked_add(len);
        if end.is_none_or(|end| end > mem.base + mem.len) {
            return Err(format!(
                "{addr:#x}+{len} runs past the end of its {}-byte allocation at {:#x} on \
                 device {}",
                mem.len, mem.base, mem.device
            ));
        }
        Ok(mem)
    }

    /// Where `addr` lives: `Some` when it is device memory of this process (allocated with
    /// `cuMemAlloc`, `cuMemCreate`/`cuMemMap`, a memory pool, or mapped from another process
    /// with CUDA IPC), with the allocation that holds it; `None` for host memory (pageable,
    /// pinned or registered), managed (unified) memory — the CPU can access it directly and
    /// CUDA IPC cannot share it — and addresses the driver does not know. Never an error
    /// and never a panic: the driver's refusals are `None`.
    pub fn device_memory(&self, addr: u64) -> Option<DeviceMemory> {
        if addr == 0 {
            return None;
        }
        let query = |with_range: bool| -> Option<Option<DeviceMemory>> {
            match self.pointer_attributes(addr, with_range) {
                Ok(found) => Some(found),
                // No context current on this thread, which some drivers want: ask again
                // under device 0's (the attributes do not depend on it).
                Err(code) if code == CUDA_ERROR_INVALID_CONTEXT => {
                    let _guard = self.enter(0).ok()?;
                    self.pointer_attributes(addr, with_range).ok()
                }
                Err(_) => None,
            }
        };
        // An old driver that does not know one of the newer attributes (range, IPC
        // capability) refuses the whole query: ask for the basic ones and find the range
        // with cuMemGetAddressRange_v2 then.
        match query(true) {
            Some(found) => found,
            None => {
                let mut found = query(false)??;
                let _guard = self.enter(found.device).ok()?;
                let (mut base, mut size): (CUdeviceptr, usize) = (0, 0);
                // SAFETY: base and size are valid out-pointers.
                unsafe { self.mem_get_address_range(&mut base, &mut size, addr) }
                    .ok()?
                    .ok()
                    .ok()?;
                found.base = base;
                found.len = size as u64;
                Some(found)
            }
        }
    }

    /// One `cuPointerGetAttributes` call: `Ok(Some)` for device memory, `Ok(None)` for
    /// anything else, `Err(code)` when the driver refused the query. Without `with_range`,
    /// `base` and `len` are 0 and `legacy_ipc` is true (unknown).
    fn pointer_attributes(
        &self,
        addr: u64,
        with_range: bool,
    ) -> Result<Option<DeviceMemory>, CUresult> {
        let mut memory_type: c_uint = 0;
        let mut ordinal: c_int = -1;
        // Booleans: zeroed `unsigned int`s, so that a driver writing one byte (bool) or four
        // (int) reads the same on little-endian machines.
        let mut managed: c_uint = 0;
        let mut ipc_capable: c_uint = 0;
        let mut start: CUdeviceptr = 0;
        let mut size: usize = 0;
        let mut attributes = [
            CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            CU_POINTER_ATTRIBUTE_IS_MANAGED,
            CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            CU_POINTER_ATTRIBUTE_RANGE_SIZE,
            CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
        ];
        let mut data: [*mut c_void; 6] = [
            (&mut memory_type as *mut c_uint).cast(),
            (&mut ordinal as *mut c_int).cast(),
            (&mut managed as *mut c_uint).cast(),
            (&mut start as *mut CUdeviceptr).cast(),
            (&mut size as *mut usize).cast(),
            (&mut ipc_capable as *mut c_uint).cast(),
        ];
        let count: c_uint = if with_range { 6 } else { 3 };
        // SAFETY: attributes and data hold `count` entries; each data pointer points to a
        // live local of the type (and size) the driver writes for that attribute:
        // CUmemorytype and the booleans as unsigned int, the ordinal as int, the range start
        // as CUdeviceptr, the range size as size_t. A pointer the driver does not know is
        // not an error: it gets default values.
        let outcome = unsafe {
            self.pointer_get_attributes(count, attributes.as_mut_ptr(), data.as_mut_ptr(), addr)
        }
        .map_err(|_| CUDA_ERROR_NOT_FOUND)?;
        if outcome.code != CUDA_SUCCESS {
            return Err(outcome.code);
        }
        if memory_type != CU_MEMORYTYPE_DEVICE || managed != 0 || ordinal < 0 {
            return Ok(None);
        }
        if !with_range {
            return Ok(Some(DeviceMemory {
                device: ordinal as u32,
                base: 0,
                len: 0,
                legacy_ipc: true,
            }));
        }
        let end = start.checked_add(size as u64);
        if start == 0 || size == 0 || addr < start || end.is_none_or(|end| addr >= end) {
            return Ok(None);
        }
        Ok(Some(DeviceMemory {
            device: ordinal as u32,
            base: start,
            len: size as u64,
            legacy_ipc: ipc_capable != 0,
        }))
    }
}

/// `cuDeviceGetPCIBusId`'s string (`0000:3B:00.0`, or `00000000:3B:00.0`) in the form of
/// `/sys/bus/pci/devices` names: lower case, the domain cut to 4 digits when its extra
/// leading digits are zeros.
pub(super) fn normalize_pci_bus_id(raw: &str) -> String {
    let lower = raw.trim().to_ascii_lowercase();
    match lower.split_once(':') {
        Some((domain, rest))
            if domain.len() > 4 && domain[..domain.len() - 4].bytes().all(|b| b == b'0') =>
        {
            format!("{}:{rest}", &domain[domain.len() - 4..])
        }
        _ => lower,
    }
}

/// A device's primary context made current on this thread by [`Cuda::enter`]; the previous
/// one is current again when this is dropped. Not `Send`: the context stack is per thread.
#[must_use = "the context is current only while the guard lives"]
pub struct ContextGuard<'a> {
    cuda: &'a Cuda,
    device: u32,
    pushed: bool,
    _not_send: PhantomData<*mut ()>,
}

impl ContextGuard<'_> {
    /// The device whose primary context is current.
    pub fn device(&self) -> u32 {
        self.device
    }
}

impl std::fmt::Debug for ContextGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextGuard")
            .field("device", &self.device)
            .field("pushed", &self.pushed)
            .finish()
    }
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        if !self.pushed {
            return;
        }
        let mut popped: CUcontext = ptr::null_mut();
        // SAFETY: popped is a valid out-pointer; this guard pushed a context on this thread
        // (the guard is not Send), so the stack is not empty.
        match unsafe { self.cuda.ctx_pop_current(&mut popped) }.map(Outcome::ok) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => log::warn!("leaving device {}'s context: {e}", self.device),
        }
    }
}
