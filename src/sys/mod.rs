//! Thin FFI to the operating system. Every `unsafe` call the crate makes into libc lives
//! here (or in a transport / `ffi`), behind safe functions whose contracts are checked.
//!
//! `verbs` is libibverbs resolved with `dlopen` at run time; a later issue adds `cuda` (the
//! driver API, the same way).

pub mod cma;
pub mod cuda;
pub mod meminfo;
pub mod numa;
pub mod shm;
pub mod spin;
pub mod unix;
pub mod uring_file;
pub mod verbs;

/// The size of a virtual memory page on this machine.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}
