//! The CUDA driver API, found at run time: `dlopen("libcuda.so.1")`, nothing needed to
//! build (no toolkit, no `cuda.h`, no link-time dependency).
//!
//! * [`driver()`]: the process's [`Cuda`], loaded and initialised (`cuInit(0)`) once. A
//!   machine without an NVIDIA driver or GPU gets a [`CudaError`] saying why
//!   ([`CudaError::is_unavailable`]), never a link failure, panic or abort; the error is
//!   cached, so say it once. A driver too old for one function (e.g.
//!   `cuMemGetHandleForAddressRange`, CUDA 11.7) fails only the operations that need it.
//! * [`Cuda`]: devices ([`Cuda::device_count`], [`Cuda::pci_bus_id`],
//!   [`Cuda::can_access_peer`]), where an address lives ([`Cuda::device_memory`]) and
//!   contexts ([`Cuda::enter`]).
//! * Memory: [`DeviceBuffer`] (for tests and benchmarks), [`PinnedHost`], [`host_register`],
//!   CUDA IPC ([`ipc_handle`], [`ipc_open`]), dma-buf export ([`dmabuf_fd`]) and
//!   synchronous copies ([`memcpy`]).
//! * Asynchronous copies: [`Stream`] and [`Event`].
//!
//! **Contexts.** Everything uses each device's *primary* context — the one the CUDA runtime
//! and PyTorch use — retained once per process and kept. Every operation makes the right
//! device's context current for its duration ([`Cuda::enter`], which pushes nothing when it
//! is current already), so callers never manage contexts; a thread that does a lot of work
//! on one device may hold a [`ContextGuard`] to make that free.
//!
//! **Threads.** [`Cuda`], [`DeviceBuffer`], [`PinnedHost`], [`HostRegistration`],
//! [`IpcMapping`], [`Stream`] and [`Event`] are `Send + Sync` (the driver API is
//! thread-safe); [`ContextGuard`] is neither (the context stack is per thread).
//!
//! **Addresses** are `u64` (`CUdeviceptr`): with unified addressing, host and device memory
//! share one address space and copies infer their direction from the addresses.
//!
//! Constants and types come from `cuda.h` of CUDA 12.6, written by hand (see `api.rs`).

// Hand-written types and constants of cuda.h. In their own module because cbindgen, which
// writes include/kvxfer.h, exports every `pub const` it finds, and these are not kvxfer's C
// API.
/// cbindgen:ignore
mod api;
mod driver;
mod error;
mod memory;
mod stream;
#[cfg(test)]
mod tests;

pub use api::*;
pub use driver::{driver, driver_in_use, ContextGuard, Cuda, DeviceMemory};
pub use error::CudaError;
pub use memory::{
    dmabuf_fd, host_register, ipc_handle, ipc_open, memcpy, DeviceBuffer, HostRegistration,
    IpcHandle, IpcMapping, PinnedHost,
};
pub use stream::{Event, Stream};
