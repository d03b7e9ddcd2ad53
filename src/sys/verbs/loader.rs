//! Finding libibverbs at run time: `dlopen("libibverbs.so.1")`, then one `dlvsym` per
//! exported function we call.
//!
//! Symbols are looked up with their version (`ibv_open_device@IBVERBS_1.1`, ...), not
//! with plain `dlsym`: libibverbs still exports the `IBVERBS_1.0` versions of most
//! functions, which take the pre-2006 structure layouts, and naming the version states
//! which ABI these bindings were written for. (On C libraries without `dlvsym` — not glibc —
//! plain `dlsym` is used, which also returns the default, newest version.)
//!
//! Two exported functions are not what the header's names expand to:
//!
//! * `ibv_query_port` is a macro over the static inline `___ibv_query_port`, which calls
//!   the provider's extended `query_port` op through `struct verbs_context` (with
//!   `sizeof(struct ibv_port_attr)`) and falls back to the exported
//!   `ibv_query_port@IBVERBS_1.1` with a zeroed `struct ibv_port_attr` cast to
//!   `struct _compat_ibv_port_attr`. We always take that fallback path: it needs no binding
//!   of `struct verbs_context` (whose layout is private and grows at the front), and in
//!   rdma-core (checked in 44, Debian 12) the exported function fills every field up to and
//!   including `flags` — it queries into a full-size temporary and copies the compat
//!   prefix. Only `port_cap_flags2` (and `active_speed_ex`, in headers newer than 44)
//!   stay 0; kvxfer uses neither.
//! * `ibv_reg_mr` is a macro over the inline `__ibv_reg_mr`, which calls the exported
//!   `ibv_reg_mr@IBVERBS_1.1` unless the access flags contain one of the optional bits
//!   (`IBV_ACCESS_OPTIONAL_RANGE`, e.g. `IBV_ACCESS_RELAXED_ORDERING`), in which case it
//!   calls `ibv_reg_mr_iova2` (`IBVERBS_1.8`, rdma-core 22+) with `iova = addr`, which drops
//!   optional bits the kernel does not know. [`Verbs::reg_mr`] makes the same choice at run
//!   time; `ibv_reg_mr_iova2` is optional, and without it optional bits are dropped before
//!   calling `ibv_reg_mr` (they are hints, never required for correctness).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::OnceLock;

use super::bindings::{
    ibv_comp_channel, ibv_context, ibv_cq, ibv_device, ibv_device_attr, ibv_gid, ibv_mr, ibv_pd,
    ibv_port_attr, ibv_qp, ibv_qp_attr, ibv_qp_init_attr,
};
use super::IBV_ACCESS_OPTIONAL_RANGE;

/// The file name `dlopen` looks for: the library's soname, stable since 2006.
pub const LIBRARY: &str = "libibverbs.so.1";

/// Why libibverbs cannot be used. Never fatal: the engine logs it and uses another
/// transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerbsUnavailable {
    /// `dlopen` failed: rdma-core's libibverbs is not installed (or not on the loader path).
    #[error(
        "libibverbs not found: dlopen(\"{library}\") failed: {reason}; install rdma-core's \
         libibverbs1 (Debian/Ubuntu) or libibverbs (RHEL) to use RDMA"
    )]
    LibraryNotFound {
        /// The name or path given to `dlopen`.
        library: String,
        /// `dlerror()`'s text.
        reason: String,
    },
    /// The library loaded but lacks a function we need: it is not rdma-core's libibverbs, or
    /// it is too old.
    #[error(
        "{library} has no symbol {symbol}@{version} ({reason}); it is not rdma-core's \
         libibverbs or it is too old"
    )]
    MissingSymbol {
        /// The library that was opened.
        library: String,
        /// The function's name.
        symbol: &'static str,
        /// The symbol version asked for.
        version: &'static str,
        /// `dlerror()`'s text.
        reason: String,
    },
}

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

/// Looks up `name@version` in `handle`; null when absent.
///
/// # Safety
///
/// `handle` must be a live handle returned by `dlopen`.
unsafe fn lookup(handle: *mut c_void, name: &CStr, version: &CStr) -> *mut c_void {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: handle is live (caller's contract); both strings are NUL-terminated.
        unsafe { libc::dlvsym(handle, name.as_ptr(), version.as_ptr()) }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = version;
        // SAFETY: handle is live (caller's contract); name is NUL-terminated.
        unsafe { libc::dlsym(handle, name.as_ptr()) }
    }
}

/// Declares the function pointers of [`Verbs`], the code that resolves them and
/// [`Verbs::SYMBOLS`], from one list of `name = "symbol" @ "version": fn(..) -> ..`.
macro_rules! verbs_functions {
    (
        required { $( $field:ident = $sym:literal @ $ver:literal :
            fn($($arg:ident : $argty:ty),* $(,)?) $(-> $ret:ty)? ; )* }
        optional { $( $ofield:ident = $osym:literal @ $over:literal :
            fn($($oarg:ident : $oargty:ty),* $(,)?) $(-> $oret:ty)? ; )* }
    ) => {
        /// The libibverbs functions kvxfer calls, resolved once at run time (see the module
        /// documentation of [`crate::sys::verbs`]). Get it with [`Verbs::load`].
        ///
        /// Every method is the C function of the same name with `ibv_` dropped and follows
        /// its contract (`man ibv_open_device`, ...); the `# Safety` sections name what the
        /// caller must guarantee.
        pub struct Verbs {
            library: String,
            $( $field: unsafe extern "C" fn($($argty),*) $(-> $ret)?, )*
            $( $ofield: Option<unsafe extern "C" fn($($oargty),*) $(-> $oret)?>, )*
        }

        impl Verbs {
            /// Every `(symbol, version, required)` this type resolves, in order.
            pub const SYMBOLS: &'static [(&'static str, &'static str, bool)] = &[
                $( ($sym, $ver, true), )*
                $( ($osym, $over, false), )*
            ];

            /// Resolves every symbol in `handle`.
            ///
            /// # Safety
            ///
            /// `handle` must be a live `dlopen` handle of a libibverbs whose functions have
            /// the C signatures of rdma-core's `<infiniband/verbs.h>` for these versions.
            unsafe fn resolve(handle: *mut c_void, library: &str)
                -> Result<Verbs, VerbsUnavailable>
            {
                Ok(Verbs {
                    library: library.to_string(),
                    $( $field: {
                        const NAME: &CStr = cstr(concat!($sym, "\0").as_bytes());
                        const VERSION: &CStr = cstr(concat!($ver, "\0").as_bytes());
                        // SAFETY: handle is live (this function's contract).
                        let p = unsafe { lookup(handle, NAME, VERSION) };
                        if p.is_null() {
                            return Err(VerbsUnavailable::MissingSymbol {
                                library: library.to_string(),
                                symbol: $sym,
                                version: $ver,
                                reason: dlerror_text("not found"),
                            });
                        }
                        // SAFETY: p is the address of the exported C function $sym@$ver,
                        // whose C signature is the one declared here (tests/verbs_layout.rs
                        // checks these declarations against verbs.h).
                        unsafe {
                            std::mem::transmute::<
                                *mut c_void,
                                unsafe extern "C" fn($($argty),*) $(-> $ret)?,
                            >(p)
                        }
                    }, )*
                    $( $ofield: {
                        const NAME: &CStr = cstr(concat!($osym, "\0").as_bytes());
                        const VERSION: &CStr = cstr(concat!($over, "\0").as_bytes());
                        // SAFETY: handle is live (this function's contract).
                        let p = unsafe { lookup(handle, NAME, VERSION) };
                        if p.is_null() {
                            None
                        } else {
                            // SAFETY: as for the required symbols above.
                            Some(unsafe {
                                std::mem::transmute::<
                                    *mut c_void,
                                    unsafe extern "C" fn($($oargty),*) $(-> $oret)?,
                                >(p)
                            })
                        }
                    }, )*
                })
            }
        }
    };
}

verbs_functions! {
    required {
        get_device_list_fn = "ibv_get_device_list" @ "IBVERBS_1.1":
            fn(num_devices: *mut c_int) -> *mut *mut ibv_device;
        free_device_list_fn = "ibv_free_device_list" @ "IBVERBS_1.1":
            fn(list: *mut *mut ibv_device);
        get_device_name_fn = "ibv_get_device_name" @ "IBVERBS_1.1":
            fn(device: *mut ibv_device) -> *const c_char;
        open_device_fn = "ibv_open_device" @ "IBVERBS_1.1":
            fn(device: *mut ibv_device) -> *mut ibv_context;
        close_device_fn = "ibv_close_device" @ "IBVERBS_1.1":
            fn(context: *mut ibv_context) -> c_int;
        query_device_fn = "ibv_query_device" @ "IBVERBS_1.1":
            fn(context: *mut ibv_context, attr: *mut ibv_device_attr) -> c_int;
        query_port_fn = "ibv_query_port" @ "IBVERBS_1.1":
            fn(context: *mut ibv_context, port_num: u8, attr: *mut ibv_port_attr) -> c_int;
        query_gid_fn = "ibv_query_gid" @ "IBVERBS_1.1":
            fn(context: *mut ibv_context, port_num: u8, index: c_int, gid: *mut ibv_gid) -> c_int;
        alloc_pd_fn = "ibv_alloc_pd" @ "IBVERBS_1.1":
            fn(context: *mut ibv_context) -> *mut ibv_pd;
        dealloc_pd_fn = "ibv_dealloc_pd" @ "IBVERBS_1.1":
            fn(pd: *mut ibv_pd) -> c_int;
        reg_mr_fn = "ibv_reg_mr" @ "IBVERBS_1.1":
            fn(pd: *mut ibv_pd, addr: *mut c_void, length: usize, access: c_int) -> *mut ibv_mr;
        dereg_mr_fn = "ibv_dereg_mr" @ "IBVERBS_1.1":
            fn(mr: *mut ibv_mr) -> c_int;
        create_comp_channel_fn = "ibv_create_comp_channel" @ "IBVERBS_1.0":
            fn(context: *mut ibv_context) -> *mut ibv_comp_channel;
        destroy_comp_channel_fn = "ibv_destroy_comp_channel" @ "IBVERBS_1.0":
            fn(channel: *mut ibv_comp_channel) -> c_int;
        create_cq_fn = "ibv_create_cq" @ "IBVERBS_1.1":
            fn(context: *mut ibv_context, cqe: c_int, cq_context: *mut c_void,
               channel: *mut ibv_comp_channel, comp_vector: c_int) -> *mut ibv_cq;
        destroy_cq_fn = "ibv_destroy_cq" @ "IBVERBS_1.1":
            fn(cq: *mut ibv_cq) -> c_int;
        get_cq_event_fn = "ibv_get_cq_event" @ "IBVERBS_1.1":
            fn(channel: *mut ibv_comp_channel, cq: *mut *mut ibv_cq,
               cq_context: *mut *mut c_void) -> c_int;
        ack_cq_events_fn = "ibv_ack_cq_events" @ "IBVERBS_1.1":
            fn(cq: *mut ibv_cq, nevents: c_uint);
        create_qp_fn = "ibv_create_qp" @ "IBVERBS_1.1":
            fn(pd: *mut ibv_pd, init_attr: *mut ibv_qp_init_attr) -> *mut ibv_qp;
        modify_qp_fn = "ibv_modify_qp" @ "IBVERBS_1.1":
            fn(qp: *mut ibv_qp, attr: *mut ibv_qp_attr, attr_mask: c_int) -> c_int;
        destroy_qp_fn = "ibv_destroy_qp" @ "IBVERBS_1.1":
            fn(qp: *mut ibv_qp) -> c_int;
        query_qp_fn = "ibv_query_qp" @ "IBVERBS_1.1":
            fn(qp: *mut ibv_qp, attr: *mut ibv_qp_attr, attr_mask: c_int,
               init_attr: *mut ibv_qp_init_attr) -> c_int;
    }
    optional {
        reg_mr_iova2_fn = "ibv_reg_mr_iova2" @ "IBVERBS_1.8":
            fn(pd: *mut ibv_pd, addr: *mut c_void, length: usize, iova: u64,
               access: c_uint) -> *mut ibv_mr;
        reg_dmabuf_mr_fn = "ibv_reg_dmabuf_mr" @ "IBVERBS_1.12":
            fn(pd: *mut ibv_pd, offset: u64, length: usize, iova: u64, fd: c_int,
               access: c_int) -> *mut ibv_mr;
    }
}

// SAFETY: Verbs holds only the library name and pointers to functions of a library that
// is never unloaded; libibverbs' functions may be called from any thread (the library is
// thread-safe by specification; objects' own rules are the callers' business).
unsafe impl Send for Verbs {}
// SAFETY: as for Send: nothing in Verbs is mutated after it is built.
unsafe impl Sync for Verbs {}

impl std::fmt::Debug for Verbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verbs")
            .field("library", &self.library)
            .field("reg_mr_iova2", &self.reg_mr_iova2_fn.is_some())
            .field("reg_dmabuf_mr", &self.reg_dmabuf_mr_fn.is_some())
            .finish_non_exhaustive()
    }
}

static LOADED: OnceLock<Result<Verbs, VerbsUnavailable>> = OnceLock::new();

impl Verbs {
    /// libibverbs, opened on the first call (`dlopen("libibverbs.so.1", RTLD_NOW |
    /// RTLD_LOCAL)`) and kept for the life of the process; later calls return the same
    /// result at once, error included. Never panics: a missing library or symbol is a
    /// [`VerbsUnavailable`] saying which.
    pub fn load() -> Result<&'static Verbs, VerbsUnavailable> {
        LOADED
            .get_or_init(|| Verbs::load_from(LIBRARY))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Opens `library` (a soname searched on the loader path, or a path) and resolves every
    /// symbol, without caching: for tests and for overriding the library. A library that
    /// loads is never unloaded, so the function pointers stay valid for the life of the
    /// process; one that lacks a symbol is closed again.
    ///
    /// Like any `dlopen`, this runs the library's initialisers: only name a libibverbs.
    pub fn load_from(library: &str) -> Result<Verbs, VerbsUnavailable> {
        let not_found = |reason: String| VerbsUnavailable::LibraryNotFound {
            library: library.to_string(),
            reason,
        };
        let name =
            CString::new(library).map_err(|_| not_found("the name contains a NUL byte".into()))?;
        // SAFETY: dlerror takes no arguments; this clears any stale message of this thread.
        unsafe { libc::dlerror() };
        // SAFETY: name is NUL-terminated; the flags are valid dlopen flags.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(not_found(dlerror_text("unknown dlopen error")));
        }
        // SAFETY: handle was just returned by dlopen. A library named libibverbs.so.1 that
        // exports these versioned symbols is rdma-core's, with verbs.h's signatures.
        match unsafe { Verbs::resolve(handle, library) } {
            Ok(verbs) => Ok(verbs),
            Err(e) => {
                // SAFETY: handle is live and nothing resolved from it escapes (resolve
                // failed, so no Verbs holds its pointers).
                unsafe { libc::dlclose(handle) };
                Err(e)
            }
        }
    }

    /// The library name or path this was loaded from.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// `ibv_get_device_list`: a NULL-terminated array of the RDMA devices, its length
    /// stored in `*num_devices` when that is not null. NULL with `errno` set on failure
    /// (`ENOSYS`: the kernel has no RDMA user-verbs support).
    ///
    /// # Safety
    ///
    /// `num_devices` must be null or valid for writing one `c_int`. A non-null result must
    /// be given to [`Verbs::free_device_list`] exactly once, after which its devices may no
    /// longer be used (contexts opened from them stay valid).
    pub unsafe fn get_device_list(&self, num_devices: *mut c_int) -> *mut *mut ibv_device {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.get_device_list_fn)(num_devices) }
    }

    /// `ibv_free_device_list`.
    ///
    /// # Safety
    ///
    /// `list` must come from [`Verbs::get_device_list`] of this library and not have been
    /// freed; no device pointer taken from it may be used afterwards.
    pub unsafe fn free_device_list(&self, list: *mut *mut ibv_device) {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.free_device_list_fn)(list) }
    }

    /// `ibv_get_device_name`: the device's kernel name (`mlx5_0`, `rxe0`), a NUL-terminated
    /// string owned by the device.
    ///
    /// # Safety
    ///
    /// `device` must be an element of a device list that has not been freed; the string
    /// lives as long as that list.
    pub unsafe fn get_device_name(&self, device: *mut ibv_device) -> *const c_char {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.get_device_name_fn)(device) }
    }

    /// `ibv_open_device`: a context for `device`, or NULL with `errno` set.
    ///
    /// # Safety
    ///
    /// `device` must be an element of a device list that has not been freed. A non-null
    /// result must be closed exactly once with [`Verbs::close_device`], after every object
    /// created on it has been destroyed.
    pub unsafe fn open_device(&self, device: *mut ibv_device) -> *mut ibv_context {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.open_device_fn)(device) }
    }

    /// `ibv_close_device`: 0, or -1 with `errno` set.
    ///
    /// # Safety
    ///
    /// `context` must be open, with no PD, CQ, QP or completion channel of it left; it is
    /// invalid afterwards.
    pub unsafe fn close_device(&self, context: *mut ibv_context) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.close_device_fn)(context) }
    }

    /// `ibv_query_device`: fills `*attr`; 0, or an `errno` value.
    ///
    /// # Safety
    ///
    /// `context` must be open; `attr` valid for writing one `ibv_device_attr`.
    pub unsafe fn query_device(
        &self,
        context: *mut ibv_context,
        attr: *mut ibv_device_attr,
    ) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.query_device_fn)(context, attr) }
    }

    /// `ibv_query_port`, as the header's inline does when it falls back to the exported
    /// function: `*attr` is zeroed, then every field up to `flags` is filled (see the module
    /// documentation: `port_cap_flags2` stays 0). 0, or an `errno` value.
    ///
    /// # Safety
    ///
    /// `context` must be open; `attr` valid for writing one `ibv_port_attr`.
    pub unsafe fn query_port(
        &self,
        context: *mut ibv_context,
        port_num: u8,
        attr: *mut ibv_port_attr,
    ) -> c_int {
        // SAFETY: attr is valid for writing one ibv_port_attr (caller's contract), and all
        // zero bytes are a valid ibv_port_attr (integers and integer newtypes).
        unsafe { std::ptr::write_bytes(attr, 0, 1) };
        // SAFETY: forwarded to the caller; the exported function writes a prefix of the
        // structure (the compat layout), which attr has room for.
        unsafe { (self.query_port_fn)(context, port_num, attr) }
    }

    /// `ibv_query_gid`: fills `*gid` with entry `index` of the port's GID table; 0, or -1
    /// with `errno` set (for example for an index past the table).
    ///
    /// # Safety
    ///
    /// `context` must be open; `gid` valid for writing one `ibv_gid`.
    pub unsafe fn query_gid(
        &self,
        context: *mut ibv_context,
        port_num: u8,
        index: c_int,
        gid: *mut ibv_gid,
    ) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.query_gid_fn)(context, port_num, index, gid) }
    }

    /// `ibv_alloc_pd`: a protection domain, or NULL with `errno` set.
    ///
    /// # Safety
    ///
    /// `context` must be open. A non-null result must be freed with
    /// [`Verbs::dealloc_pd`] before the context is closed.
    pub unsafe fn alloc_pd(&self, context: *mut ibv_context) -> *mut ibv_pd {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.alloc_pd_fn)(context) }
    }

    /// `ibv_dealloc_pd`: 0, or an `errno` value (`EBUSY` while MRs or QPs use it).
    ///
    /// # Safety
    ///
    /// `pd` must be live; it is invalid after a 0 return.
    pub unsafe fn dealloc_pd(&self, pd: *mut ibv_pd) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.dealloc_pd_fn)(pd) }
    }

    /// `ibv_reg_mr`: registers `length` bytes at `addr` with the access flags `access`
    /// (`ibv_access_flags` bits); the MR, or NULL with `errno` set. Like the header's
    /// macro, flags in [`IBV_ACCESS_OPTIONAL_RANGE`] go through `ibv_reg_mr_iova2` (with
    /// `iova = addr`), which drops the ones the kernel does not support; when the library
    /// is too old to have it, they are dropped here.
    ///
    /// # Safety
    ///
    /// `pd` must be live. The memory must stay mapped until the MR is deregistered with
    /// [`Verbs::dereg_mr`] (the device may access it at any time through the MR's keys),
    /// and the MR must be deregistered before the PD is freed.
    pub unsafe fn reg_mr(
        &self,
        pd: *mut ibv_pd,
        addr: *mut c_void,
        length: usize,
        access: c_uint,
    ) -> *mut ibv_mr {
        let optional = access & IBV_ACCESS_OPTIONAL_RANGE;
        match self.reg_mr_iova2_fn {
            Some(reg_mr_iova2) if optional != 0 => {
                // SAFETY: forwarded to the caller (see # Safety).
                unsafe { reg_mr_iova2(pd, addr, length, addr as u64, access) }
            }
            // SAFETY: forwarded to the caller (see # Safety). The remaining bits fit in an
            // int: every defined access flag is below bit 31.
            _ => unsafe { (self.reg_mr_fn)(pd, addr, length, (access & !optional) as c_int) },
        }
    }

    /// `ibv_reg_dmabuf_mr` (rdma-core 34+): registers `length` bytes at `offset` of the
    /// dma-buf `fd` (GPU memory exported by its driver), addressed by peers as `iova`;
    /// the MR, or NULL with `errno` set. `None` when the library is too old to have it.
    ///
    /// # Safety
    ///
    /// `pd` must be live, `fd` a dma-buf covering `offset..offset + length`; the memory
    /// behind it must stay allocated until the MR is deregistered with
    /// [`Verbs::dereg_mr`], before the PD is freed. (The fd may be closed after the call.)
    pub unsafe fn reg_dmabuf_mr(
        &self,
        pd: *mut ibv_pd,
        offset: u64,
        length: usize,
        iova: u64,
        fd: c_int,
        access: c_uint,
    ) -> Option<*mut ibv_mr> {
        let reg = self.reg_dmabuf_mr_fn?;
        // Optional access bits are hints some kernels refuse here: drop them.
        let access = (access & !IBV_ACCESS_OPTIONAL_RANGE) as c_int;
        // SAFETY: forwarded to the caller (see # Safety).
        Some(unsafe { reg(pd, offset, length, iova, fd, access) })
    }

    /// `ibv_dereg_mr`: 0, or an `errno` value.
    ///
    /// # Safety
    ///
    /// `mr` must be live and no work request still in flight may use its keys; it is
    /// invalid after a 0 return.
    pub unsafe fn dereg_mr(&self, mr: *mut ibv_mr) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.dereg_mr_fn)(mr) }
    }

    /// `ibv_create_comp_channel`: a completion event channel (a file descriptor to wait
    /// on), or NULL with `errno` set.
    ///
    /// # Safety
    ///
    /// `context` must be open. A non-null result must be destroyed with
    /// [`Verbs::destroy_comp_channel`] after every CQ using it.
    pub unsafe fn create_comp_channel(&self, context: *mut ibv_context) -> *mut ibv_comp_channel {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.create_comp_channel_fn)(context) }
    }

    /// `ibv_destroy_comp_channel`: 0, or an `errno` value (`EBUSY` while a CQ uses it).
    ///
    /// # Safety
    ///
    /// `channel` must be live; it is invalid after a 0 return.
    pub unsafe fn destroy_comp_channel(&self, channel: *mut ibv_comp_channel) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.destroy_comp_channel_fn)(channel) }
    }

    /// `ibv_create_cq`: a completion queue of at least `cqe` entries, reporting events to
    /// `channel` (may be null) on vector `comp_vector`; NULL with `errno` set on failure.
    ///
    /// # Safety
    ///
    /// `context` must be open and `channel` null or live on the same context. A non-null
    /// result must be destroyed with [`Verbs::destroy_cq`] after every QP using it.
    pub unsafe fn create_cq(
        &self,
        context: *mut ibv_context,
        cqe: c_int,
        cq_context: *mut c_void,
        channel: *mut ibv_comp_channel,
        comp_vector: c_int,
    ) -> *mut ibv_cq {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.create_cq_fn)(context, cqe, cq_context, channel, comp_vector) }
    }

    /// `ibv_destroy_cq`: 0, or an `errno` value.
    ///
    /// # Safety
    ///
    /// `cq` must be live, no QP may use it, and every event got from it must have been
    /// acknowledged ([`Verbs::ack_cq_events`]) or this blocks; it is invalid after a 0 return.
    pub unsafe fn destroy_cq(&self, cq: *mut ibv_cq) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.destroy_cq_fn)(cq) }
    }

    /// `ibv_get_cq_event`: waits (unless the channel's fd is non-blocking) for a completion
    /// event and stores its CQ and that CQ's context; 0, or -1 with `errno` set.
    ///
    /// # Safety
    ///
    /// `channel` must be live; `cq` and `cq_context` valid for one write each. Every event
    /// got must be acknowledged with [`Verbs::ack_cq_events`].
    pub unsafe fn get_cq_event(
        &self,
        channel: *mut ibv_comp_channel,
        cq: *mut *mut ibv_cq,
        cq_context: *mut *mut c_void,
    ) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.get_cq_event_fn)(channel, cq, cq_context) }
    }

    /// `ibv_ack_cq_events`: acknowledges `nevents` events got from `cq`.
    ///
    /// # Safety
    ///
    /// `cq` must be live.
    pub unsafe fn ack_cq_events(&self, cq: *mut ibv_cq, nevents: c_uint) {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.ack_cq_events_fn)(cq, nevents) }
    }

    /// `ibv_create_qp`: a queue pair, or NULL with `errno` set; on success
    /// `init_attr.cap` holds the capacities actually granted.
    ///
    /// # Safety
    ///
    /// `pd` must be live; `init_attr` valid for reads and writes, its CQs live on the same
    /// context. A non-null result must be destroyed with [`Verbs::destroy_qp`].
    pub unsafe fn create_qp(
        &self,
        pd: *mut ibv_pd,
        init_attr: *mut ibv_qp_init_attr,
    ) -> *mut ibv_qp {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.create_qp_fn)(pd, init_attr) }
    }

    /// `ibv_modify_qp`: applies the fields of `*attr` selected by `attr_mask`
    /// (`ibv_qp_attr_mask` bits); 0, or an `errno` value.
    ///
    /// # Safety
    ///
    /// `qp` must be live; `attr` valid for reads.
    pub unsafe fn modify_qp(
        &self,
        qp: *mut ibv_qp,
        attr: *mut ibv_qp_attr,
        attr_mask: c_int,
    ) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.modify_qp_fn)(qp, attr, attr_mask) }
    }

    /// `ibv_destroy_qp`: 0, or an `errno` value.
    ///
    /// # Safety
    ///
    /// `qp` must be live; it is invalid after a 0 return. Memory that work requests still
    /// in flight on it used must not be freed before (the QP's completions, or its
    /// destruction, tell that the device is done with it).
    pub unsafe fn destroy_qp(&self, qp: *mut ibv_qp) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.destroy_qp_fn)(qp) }
    }

    /// `ibv_query_qp`: fills the fields of `*attr` selected by `attr_mask`, and
    /// `*init_attr`; 0, or an `errno` value.
    ///
    /// # Safety
    ///
    /// `qp` must be live; `attr` and `init_attr` valid for writes.
    pub unsafe fn query_qp(
        &self,
        qp: *mut ibv_qp,
        attr: *mut ibv_qp_attr,
        attr_mask: c_int,
        init_attr: *mut ibv_qp_init_attr,
    ) -> c_int {
        // SAFETY: forwarded to the caller (see # Safety).
        unsafe { (self.query_qp_fn)(qp, attr, attr_mask, init_attr) }
    }
}
