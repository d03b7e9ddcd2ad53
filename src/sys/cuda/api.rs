//! The few types and constants of the CUDA driver API (`cuda.h`) that kvxfer uses, written
//! by hand so that building needs no CUDA toolkit.
//!
//! Every value was checked against `include/cuda.h` of CUDA 12.6 (`#define CUDA_VERSION
//! 12060`; the copy in the public repository `zspace/system.cuda-12.6`), and the version in
//! which each function appeared (the `since` column of the loader) against the
//! `PFN_<name>_v<version>` typedefs of that toolkit's `include/cudaTypedefs.h`. These values
//! are ABI: NVIDIA never renumbers them, it only adds new ones.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint};

/// The file name `dlopen` looks for: the driver library's soname. It is installed by the
/// NVIDIA driver (not by the CUDA toolkit), so a machine with a GPU driver has it even
/// without any toolkit.
pub const LIBRARY: &str = "libcuda.so.1";

/// `CUresult`: what every driver call returns (a C enum, `int`-sized).
pub type CUresult = c_int;
/// `CUdevice`: a device handle, as returned by `cuDeviceGet` for an ordinal.
pub type CUdevice = c_int;
/// `CUdeviceptr`: a device address (`unsigned long long` on 64-bit platforms). With unified
/// addressing it is also the address of host memory the driver knows.
pub type CUdeviceptr = u64;

/// The opaque `struct CUctx_st`.
#[repr(C)]
pub struct CUctx_st {
    _opaque: [u8; 0],
}
/// The opaque `struct CUstream_st`.
#[repr(C)]
pub struct CUstream_st {
    _opaque: [u8; 0],
}
/// The opaque `struct CUevent_st`.
#[repr(C)]
pub struct CUevent_st {
    _opaque: [u8; 0],
}
/// `CUcontext`: a context handle.
pub type CUcontext = *mut CUctx_st;
/// `CUstream`: a stream handle (null: the context's default, "legacy" stream).
pub type CUstream = *mut CUstream_st;
/// `CUevent`: an event handle.
pub type CUevent = *mut CUevent_st;

/// `CU_IPC_HANDLE_SIZE`: the bytes of an IPC memory handle.
pub const CU_IPC_HANDLE_SIZE: usize = 64;

/// `CUipcMemHandle`: `struct CUipcMemHandle_st { char reserved[CU_IPC_HANDLE_SIZE]; }`,
/// passed by value to `cuIpcOpenMemHandle_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CUipcMemHandle {
    /// The opaque bytes.
    pub reserved: [c_char; CU_IPC_HANDLE_SIZE],
}

/// `CUpointer_attribute` (a C enum).
pub type CUpointer_attribute = c_uint;
/// `CU_POINTER_ATTRIBUTE_CONTEXT`: the `CUcontext` the memory belongs to.
pub const CU_POINTER_ATTRIBUTE_CONTEXT: CUpointer_attribute = 1;
/// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`: a `CUmemorytype` (`unsigned int`); 0 for memory the
/// driver does not know.
pub const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: CUpointer_attribute = 2;
/// `CU_POINTER_ATTRIBUTE_IS_MANAGED`: whether the memory is managed (unified) memory.
pub const CU_POINTER_ATTRIBUTE_IS_MANAGED: CUpointer_attribute = 8;
/// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`: the ordinal (`int`) of the device the memory was
/// allocated or registered on.
pub const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: CUpointer_attribute = 9;
/// `CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE`: whether `cuIpcGetMemHandle` accepts
/// the allocation.
pub const CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE: CUpointer_attribute = 10;
/// `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`: the base (`CUdeviceptr`) of the allocation
/// (newer than the attributes above).
pub const CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: CUpointer_attribute = 11;
/// `CU_POINTER_ATTRIBUTE_RANGE_SIZE`: the size (`size_t`) of the allocation (newer than the
/// attributes above).
pub const CU_POINTER_ATTRIBUTE_RANGE_SIZE: CUpointer_attribute = 12;
/// `CU_POINTER_ATTRIBUTE_MAPPED`: whether the address is mapped to a backing allocation.
pub const CU_POINTER_ATTRIBUTE_MAPPED: CUpointer_attribute = 13;

/// `CUmemorytype` (a C enum).
pub type CUmemorytype = c_uint;
/// `CU_MEMORYTYPE_HOST`: host memory (pinned or registered).
pub const CU_MEMORYTYPE_HOST: CUmemorytype = 1;
/// `CU_MEMORYTYPE_DEVICE`: device memory.
pub const CU_MEMORYTYPE_DEVICE: CUmemorytype = 2;
/// `CU_MEMORYTYPE_ARRAY`: a CUDA array.
pub const CU_MEMORYTYPE_ARRAY: CUmemorytype = 3;
/// `CU_MEMORYTYPE_UNIFIED`: unified device or host memory.
pub const CU_MEMORYTYPE_UNIFIED: CUmemorytype = 4;

/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS` (`CUipcMem_flags`): enable peer access between the
/// opening device and the allocation's device as needed.
pub const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;

/// `CUmemRangeHandleType` (a C enum).
pub type CUmemRangeHandleType = c_uint;
/// `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`: `cuMemGetHandleForAddressRange` returns a dma-buf
/// file descriptor (an `int`).
pub const CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD: CUmemRangeHandleType = 1;

/// `CU_STREAM_NON_BLOCKING` (`CUstream_flags`): the stream does not synchronize with the
/// legacy default stream.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_EVENT_DISABLE_TIMING` (`CUevent_flags`): the event records no timestamp (cheaper).
pub const CU_EVENT_DISABLE_TIMING: c_uint = 2;
/// `CU_MEMHOSTREGISTER_PORTABLE`: registered host memory counts as pinned in every context.
pub const CU_MEMHOSTREGISTER_PORTABLE: c_uint = 1;

/// `CUDA_SUCCESS`.
pub const CUDA_SUCCESS: CUresult = 0;
/// `CUDA_ERROR_INVALID_VALUE`.
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
/// `CUDA_ERROR_NOT_INITIALIZED`.
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
/// `CUDA_ERROR_DEINITIALIZED`: the driver is shutting down (calls made during process exit).
pub const CUDA_ERROR_DEINITIALIZED: CUresult = 4;
/// `CUDA_ERROR_STUB_LIBRARY`: the libcuda.so.1 found is the toolkit's stub, not a driver.
pub const CUDA_ERROR_STUB_LIBRARY: CUresult = 34;
/// `CUDA_ERROR_NO_DEVICE`: the driver sees no CUDA device.
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
/// `CUDA_ERROR_INVALID_DEVICE`.
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
/// `CUDA_ERROR_INVALID_CONTEXT`: no (or an invalid) context is current.
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
/// `CUDA_ERROR_INVALID_HANDLE`.
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
/// `CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED`.
pub const CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED: CUresult = 704;
/// `CUDA_ERROR_NOT_FOUND`.
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
/// `CUDA_ERROR_NOT_READY`: asynchronous work is not finished (`cuEventQuery`); not an error.
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
/// `CUDA_ERROR_ILLEGAL_ADDRESS`: the device faulted on an address (sticky: the context is
/// unusable afterwards).
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CUresult = 700;
/// `CUDA_ERROR_PEER_ACCESS_UNSUPPORTED`.
pub const CUDA_ERROR_PEER_ACCESS_UNSUPPORTED: CUresult = 217;
/// `CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`.
pub const CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED: CUresult = 712;
/// `CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED`.
pub const CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED: CUresult = 713;
/// `CUDA_ERROR_NOT_PERMITTED`.
pub const CUDA_ERROR_NOT_PERMITTED: CUresult = 800;
/// `CUDA_ERROR_NOT_SUPPORTED`: e.g. dma-buf export on a driver or kernel module without it.
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
/// `CUDA_ERROR_UNKNOWN`.
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;
