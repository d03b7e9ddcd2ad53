//! Memory through the driver: device buffers, pinned and registered host memory, CUDA IPC
//! handles and mappings, dma-buf export, synchronous copies.

use std::ffi::{c_char, c_int, c_void};
use std::fmt;
use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::{self, NonNull};

use super::api::*;
use super::driver::{driver, Cuda};
use super::error::CudaError;

/// Logs a failure to release something in a `Drop` (there is no caller to return it to).
fn log_drop_error(what: &str, result: Result<(), CudaError>) {
    if let Err(e) = result {
        log::warn!("releasing {what}: {e}");
    }
}

/// Waits for the legacy default stream of the current context: a synchronous copy from
/// pageable host memory may return once the bytes are staged, before the DMA to their
/// destination is done, and later work on non-blocking streams does not wait for it.
fn wait_default_stream(cuda: &Cuda) -> Result<(), CudaError> {
    // SAFETY: a null stream is the current context's legacy default stream.
    unsafe { cuda.stream_synchronize(ptr::null_mut()) }?.ok()
}

/// Device memory from `cuMemAlloc_v2` on one device, freed (`cuMemFree_v2`) on drop. For
/// tests, benchmarks and staging; KV caches are allocated by the inference framework.
///
/// `Send + Sync`: it is an address and a length; its methods copy synchronously and make
/// no Rust references to device memory.
#[derive(Debug)]
pub struct DeviceBuffer {
    cuda: &'static Cuda,
    device: u32,
    addr: u64,
    len: usize,
}

impl DeviceBuffer {
    /// Allocates `len` bytes (not zeroed) on `device`, under its primary context.
    pub fn alloc(device: u32, len: usize) -> Result<DeviceBuffer, CudaError> {
        let cuda = driver()?;
        if len == 0 {
            return Err(CudaError::invalid(
                "cuMemAlloc_v2",
                "cannot allocate 0 bytes of device memory",
            ));
        }
        let _ctx = cuda.enter(device)?;
        let mut addr: CUdeviceptr = 0;
        // SAFETY: addr is a valid out-pointer; a context is current.
        unsafe { cuda.mem_alloc(&mut addr, len) }?.ok()?;
        Ok(DeviceBuffer {
            cuda,
            device,
            addr,
            len,
        })
    }

    /// The device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device the memory is on.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The device address of `offset`, after checking that `offset..offset + len` is
    /// inside the buffer.
    fn range(&self, call: &'static str, offset: usize, len: usize) -> Result<u64, CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr + offset as u64),
            _ => Err(CudaError::invalid(
                call,
                format!(
                    "bytes {offset}..{offset}+{len} are outside the {}-byte device buffer at \
                     {:#x}",
                    self.len, self.addr
                ),
            )),
        }
    }

    /// Copies `src` to `offset` in the buffer (`cuMemcpyHtoD_v2`); returns when the bytes
    /// are in device memory.
    pub fn copy_from_host(&self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        let dst = self.range("cuMemcpyHtoD_v2", offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let _ctx = self.cuda.enter(self.device)?;
        // SAFETY: dst..dst + len is inside this live allocation (checked above); src is
        // valid for reading src.len() bytes for the whole call (the copy is synchronous
        // with respect to the source).
        unsafe { self.cuda.memcpy_htod(dst, src.as_ptr().cast(), src.len()) }?.ok()?;
        wait_default_stream(self.cuda)
    }

    /// Copies `dst.len()` bytes at `offset` in the buffer into `dst` (`cuMemcpyDtoH_v2`).
    /// Work on other streams that writes the buffer must have completed (synchronize its
    /// stream or event first).
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        let src = self.range("cuMemcpyDtoH_v2", offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let _ctx = self.cuda.enter(self.device)?;
        // SAFETY: src..src + len is inside this live allocation (checked above); dst is
        // valid for writing dst.len() bytes, exclusively borrowed, and the copy to pageable
        // memory has completed when the call returns.
        unsafe {
            self.cuda
                .memcpy_dtoh(dst.as_mut_ptr().cast(), src, dst.len())
        }?
        .ok()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let result = self.cuda.enter(self.device).and_then(|_ctx| {
            // SAFETY: addr came from cuMemAlloc_v2 and is freed once, here.
            unsafe { self.cuda.mem_free(self.addr) }?.ok()
        });
        log_drop_error("device memory", result);
    }
}

/// Page-locked host memory from `cuMemAllocHost_v2`, zeroed, freed (`cuMemFreeHost`) on
/// drop. With unified addressing every device can copy to and from it by its address (the
/// fastest host end of a copy).
pub struct PinnedHost {
    cuda: &'static Cuda,
    ptr: NonNull<u8>,
    len: usize,
    /// The device whose context allocated it (and frees it).
    device: u32,
}

// SAFETY: PinnedHost owns its allocation like a Box<[u8]>: moving it to another thread moves
// the ownership, and the driver may free it from any thread.
unsafe impl Send for PinnedHost {}
// SAFETY: shared access only reads through &self (as_slice); writes need &mut self.
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    /// Allocates `len` zeroed bytes of pinned host memory (under device 0's primary
    /// context; with unified addressing it is pinned for every device).
    pub fn alloc(len: usize) -> Result<PinnedHost, CudaError> {
        Self::alloc_on(0, len)
    }

    /// As [`alloc`](PinnedHost::alloc), under `device`'s primary context: a process that
    /// works on one GPU keeps from creating a context (hundreds of MiB) on GPU 0.
    pub fn alloc_on(device: u32, len: usize) -> Result<PinnedHost, CudaError> {
        let cuda = driver()?;
        if len == 0 {
            return Err(CudaError::invalid(
                "cuMemAllocHost_v2",
                "cannot allocate 0 bytes of pinned memory",
            ));
        }
        let _ctx = cuda.enter(device)?;
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: p is a valid out-pointer; a context is current.
        unsafe { cuda.mem_alloc_host(&mut p, len) }?.ok()?;
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(CudaError::invalid(
                "cuMemAllocHost_v2",
                "the driver returned success and a null pointer",
            ));
        };
        // SAFETY: the driver just allocated len writable bytes at ptr; zeroing them makes
        // every later &[u8] view initialised.
        unsafe { ptr::write_bytes(ptr.as_ptr(), 0, len) };
        Ok(PinnedHost {
            cuda,
            ptr,
            len,
            device,
        })
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The first byte, for writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The address of the first byte, as copies take it.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the memory has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes. Asynchronous copies into them must have completed.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (zeroed at allocation) for as long
        // as self lives; writes need &mut self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, for writing. Asynchronous copies from or into them must have completed.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedHost")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let result = self.cuda.enter(self.device).and_then(|_ctx| {
            // SAFETY: ptr came from cuMemAllocHost_v2 and is freed once, here.
            unsafe { self.cuda.mem_free_host(self.ptr.as_ptr().cast()) }?.ok()
        });
        log_drop_error("pinned host memory", result);
    }
}

/// Host memory page-locked and made known to every device by [`host_register`]; unregistered
/// (`cuMemHostUnregister`) on drop.
#[derive(Debug)]
pub struct HostRegistration {
    cuda: &'static Cuda,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a HostRegistration is a record of a driver registration (the memory is owned by
// the caller); the driver may unregister it from any thread.
unsafe impl Send for HostRegistration {}
// SAFETY: no method dereferences ptr or changes anything.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// The address of the first registered byte.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The registered length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: registrations are at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let result = self.cuda.enter(0).and_then(|_ctx| {
            // SAFETY: ptr was registered by host_register and is unregistered once, here.
            unsafe { self.cuda.mem_host_unregister(self.ptr.cast()) }?.ok()
        });
        log_drop_error("a host memory registration", result);
    }
}

/// `cuMemHostRegister_v2(CU_MEMHOSTREGISTER_PORTABLE)`: page-locks `len` bytes at `ptr` and
/// makes them pinned memory for every device (copies to and from them run at full speed,
/// asynchronously). Fails with `CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED` for memory that
/// is (partly) registered already.
///
/// # Safety
///
/// `ptr..ptr + len` must be mapped host memory that stays mapped until the returned
/// registration is dropped (drop it before freeing or unmapping the memory).
pub unsafe fn host_register(ptr: *mut u8, len: usize) -> Result<HostRegistration, CudaError> {
    let cuda = driver()?;
    if ptr.is_null() || len == 0 {
        return Err(CudaError::invalid(
            "cuMemHostRegister_v2",
            "cannot register a null pointer or 0 bytes",
        ));
    }
    let _ctx = cuda.enter(0)?;
    // SAFETY: the range is mapped memory that outlives the registration (this function's
    // contract); a context is current.
    unsafe { cuda.mem_host_register(ptr.cast(), len, CU_MEMHOSTREGISTER_PORTABLE) }?.ok()?;
    Ok(HostRegistration { cuda, ptr, len })
}

/// A CUDA IPC memory handle (`CUipcMemHandle`): 64 opaque bytes that let another process of
/// the same host map a device allocation with [`ipc_open`]. Send it as it is.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcHandle(pub [u8; CU_IPC_HANDLE_SIZE]);

impl fmt::Debug for IpcHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IpcHandle(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// `cuIpcGetMemHandle`: the IPC handle of the device allocation that starts at `addr`.
///
/// CUDA IPC shares whole allocations made with `cuMemAlloc` (as PyTorch's caching allocator
/// makes them by default): `addr` must be the allocation's base ([`Cuda::device_memory`]
/// tells it); an interior address, host memory, and allocations made with virtual memory
/// management (`cuMemCreate`, PyTorch's `expandable_segments:True`) or from memory pools are
/// refused with an error saying which. Send the offset of a sub-range separately.
pub fn ipc_handle(addr: u64) -> Result<IpcHandle, CudaError> {
    const CALL: &str = "cuIpcGetMemHandle";
    let cuda = driver()?;
    let Some(mem) = cuda.device_memory(addr) else {
        return Err(CudaError::invalid(
            CALL,
            format!(
                "{addr:#x} is not device memory of this process (host, managed and unknown \
                 memory cannot be shared with CUDA IPC)"
            ),
        ));
    };
    if mem.base != addr {
        return Err(CudaError::invalid(
            CALL,
            format!(
                "{addr:#x} is {} bytes into the {}-byte allocation at {:#x} on device {}: CUDA \
                 IPC shares whole allocations; export the base address and send the offset",
                addr - mem.base,
                mem.len,
                mem.base,
                mem.device
            ),
        ));
    }
    if !mem.legacy_ipc {
        return Err(CudaError::invalid(
            CALL,
            format!(
                "the allocation at {addr:#x} on device {} was not made with cuMemAlloc \
                 (virtual memory management or a memory pool, e.g. PyTorch's \
                 expandable_segments): legacy CUDA IPC cannot share it",
                mem.device
            ),
        ));
    }
    let _ctx = cuda.enter(mem.device)?;
    let mut raw = CUipcMemHandle {
        reserved: [0; CU_IPC_HANDLE_SIZE],
    };
    // SAFETY: raw is a valid out-pointer; addr is the base of a live device allocation of
    // this context's device.
    unsafe { cuda.ipc_get_mem_handle(&mut raw, addr) }?.ok()?;
    Ok(IpcHandle(raw.reserved.map(|c| c as u8)))
}

/// Another process's device allocation mapped into this one by [`ipc_open`]; unmapped
/// (`cuIpcCloseMemHandle`) on drop. Copies may use `addr()..addr() + len()` like local device
/// memory; the exporting process must keep the allocation alive while it is mapped.
#[derive(Debug)]
pub struct IpcMapping {
    cuda: &'static Cuda,
    device: u32,
    addr: u64,
    len: u64,
}

impl IpcMapping {
    /// The address of the mapped allocation's first byte in this process.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The size of the mapped allocation in bytes (`cuMemGetAddressRange_v2`).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping has no bytes (never, for a mapping the driver made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device whose context mapped it.
    pub fn device(&self) -> u32 {
        self.device
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let result = self.cuda.enter(self.device).and_then(|_ctx| {
            // SAFETY: addr came from cuIpcOpenMemHandle_v2 in this device's context and is
            // closed once, here.
            unsafe { self.cuda.ipc_close_mem_handle(self.addr) }?.ok()
        });
        log_drop_error("a CUDA IPC mapping", result);
    }
}

/// `cuIpcOpenMemHandle_v2(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)` under `device`'s primary
/// context: maps the allocation another process exported with [`ipc_handle`]. The allocation
/// may live on another device than `device` (peer access is enabled as needed). A process
/// cannot open its own handles (the driver refuses them), and should open each handle once
/// per device and share the mapping.
pub fn ipc_open(device: u32, handle: &IpcHandle) -> Result<IpcMapping, CudaError> {
    let cuda = driver()?;
    let _ctx = cuda.enter(device)?;
    let raw = CUipcMemHandle {
        reserved: handle.0.map(|b| b as c_char),
    };
    let mut addr: CUdeviceptr = 0;
    // SAFETY: addr is a valid out-pointer; the handle is passed by value (the driver
    // validates its bytes); a context is current.
    unsafe { cuda.ipc_open_mem_handle(&mut addr, raw, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) }?
        .ok()?;
    let mut mapping = IpcMapping {
        cuda,
        device,
        addr,
        len: 0,
    };
    let (mut base, mut size): (CUdeviceptr, usize) = (0, 0);
    // SAFETY: base and size are valid out-pointers; addr is mapped in the current context.
    // On error the mapping is closed by its Drop.
    unsafe { cuda.mem_get_address_range(&mut base, &mut size, addr) }?.ok()?;
    mapping.len = size as u64;
    Ok(mapping)
}

/// `cuMemcpy`: copies `len` bytes from `src` to `dst`, any of them host or device memory
/// (unified addressing infers the direction), and returns when the bytes are at `dst`. Runs
/// under the primary context of the device `dst` (else `src`) is on; an end in device memory
/// that runs past its allocation is refused. For tests, setup and small copies: it asks the
/// driver where both ends live first. The data path uses
/// [`Stream::copy_async`](super::Stream::copy_async).
///
/// # Safety
///
/// `src..src + len` and `dst..dst + len` must be valid: memory of this process the driver
/// can reach (device memory, mapped IPC memory, or host memory that is mapped and not
/// concurrently written), `dst` writable and not aliased by any Rust reference during the
/// call. The driver treats an address it does not know as host memory and reads or writes
/// it with the CPU: a bad address can crash the process rather than fail.
pub unsafe fn memcpy(dst: u64, src: u64, len: usize) -> Result<(), CudaError> {
    const CALL: &str = "cuMemcpy";
    let cuda = driver()?;
    if len == 0 {
        return Ok(());
    }
    // Device memory ends are checked against their allocation (host ends cannot be).
    let mut device = None;
    for (what, addr) in [("destination", dst), ("source", src)] {
        if let Some(mem) = cuda.device_memory(addr) {
            if (addr - mem.base)
                .checked_add(len as u64)
                .is_none_or(|end| end > mem.len)
            {
                return Err(CudaError::invalid(
                    CALL,
                    format!(
                        "the {what} {addr:#x}+{len} runs past the end of its {}-byte \
                         allocation at {:#x} on device {}",
                        mem.len, mem.base, mem.device
                    ),
                ));
            }
            device = device.or(Some(mem.device));
        }
    }
    let _ctx = cuda.enter(device.unwrap_or(0))?;
    // SAFETY: both ranges are valid for len bytes (this function's contract).
    unsafe { cuda.memcpy(dst, src, len) }?.ok()?;
    wait_default_stream(cuda)
}

/// `cuMemGetHandleForAddressRange(CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD)`: a dma-buf file
/// descriptor for `len` bytes of device memory at `addr`, which a NIC driver can register
/// for GPUDirect RDMA (`ibv_reg_dmabuf_mr`) without the `nvidia-peermem` module.
///
/// `addr` and `len` must be multiples of the host page size and the range inside one
/// allocation. Needs CUDA 11.7+ (else [`CudaError::MissingSymbol`]), and a driver and
/// kernel that support dma-buf (the open GPU kernel modules on Linux 5.12+); otherwise the
/// driver answers `CUDA_ERROR_NOT_SUPPORTED`.
pub fn dmabuf_fd(addr: u64, len: u64) -> Result<OwnedFd, CudaError> {
    const CALL: &str = "cuMemGetHandleForAddressRange";
    let cuda = driver()?;
    let page = crate::sys::page_size() as u64;
    if len == 0 || addr % page != 0 || len % page != 0 {
        return Err(CudaError::invalid(
            CALL,
            format!(
                "the range {addr:#x}+{len} must be non-empty and start and end on host page \
                 boundaries ({page} bytes)"
            ),
        ));
    }
    let Some(mem) = cuda.device_memory(addr) else {
        return Err(CudaError::invalid(
            CALL,
            format!("{addr:#x} is not device memory of this process"),
        ));
    };
    let end = addr.checked_add(len);
    if end.is_none_or(|end| end > mem.base + mem.len) {
        return Err(CudaError::invalid(
            CALL,
            format!(
                "the range {addr:#x}+{len} runs past the end of its {}-byte allocation at {:#x}",
                mem.len, mem.base
            ),
        ));
    }
    let _ctx = cuda.enter(mem.device)?;
    let mut fd: c_int = -1;
    // SAFETY: for the dma-buf handle type the driver writes an int file descriptor to the
    // handle pointer, which points to fd; the range is inside a live allocation.
    unsafe {
        cuda.mem_get_handle_for_address_range(
            (&mut fd as *mut c_int).cast(),
            addr,
            len as usize,
            CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    }?
    .ok()?;
    if fd < 0 {
        return Err(CudaError::invalid(
            CALL,
            "the driver returned success but no file descriptor",
        ));
    }
    // SAFETY: fd is a new descriptor the driver opened for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
