//! NUMA queries: which node backs a page, and binding a mapping to a node.

use std::io;

/// `MPOL_PREFERRED` from `<numaif.h>`: allocate on the given node when it has room.
const MPOL_PREFERRED: libc::c_long = 1;

/// The NUMA node holding the page that contains `addr`, or `None` when the kernel cannot
/// say: no NUMA support, the page is not faulted in yet, or the address is not mapped.
///
/// Uses `move_pages(2)` in query mode (no node list), which never moves or allocates a
/// page, so asking has no side effect on the caller's memory.
pub fn node_of_address(addr: u64) -> Option<u32> {
    let page = (addr as usize) & !(super::page_size() - 1);
    let mut pages = [page as *mut libc::c_void];
    let mut status = [i32::MIN];
    // SAFETY: with `nodes == NULL` move_pages only reports the node of each page; `pages`
    // and `status` are arrays of exactly `count == 1` element that outlive the call, and an
    // unmapped address is reported through `status` (-EFAULT), never dereferenced by us.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::pid_t,
            1 as libc::c_ulong,
            pages.as_mut_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    (rc == 0 && status[0] >= 0).then_some(status[0] as u32)
}

/// Asks the kernel to place the pages of `[addr, addr + len)` on `node` when they are
/// first touched (`MPOL_PREFERRED`). `addr` must be page aligned.
///
/// Errors: `EINVAL` when the node does not exist; `ENOSYS` when the kernel has no NUMA
/// support (callers treat that as "nothing to bind").
pub fn prefer_node(addr: *mut u8, len: usize, node: u32) -> io::Result<()> {
    const MASK_BITS: u32 = 1024;
    if node >= MASK_BITS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut mask = [0 as libc::c_ulong; (MASK_BITS / libc::c_ulong::BITS) as usize];
    mask[(node / libc::c_ulong::BITS) as usize] |= 1 << (node % libc::c_ulong::BITS);
    // SAFETY: mbind only changes the placement policy of the given range, which the caller
    // owns (an mmap we made); `mask` holds `MASK_BITS` bits and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as *mut libc::c_void,
            len as libc::c_ulong,
            MPOL_PREFERRED,
            mask.as_ptr(),
            (MASK_BITS + 1) as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_address_has_no_node() {
        assert_eq!(node_of_address(8), None);
    }

    #[test]
    fn touched_heap_page_has_a_node_when_the_kernel_knows_numa() {
        let buf = vec![1u8; 1 << 16];
        let node = node_of_address(buf.as_ptr() as u64);
        let numa = std::path::Path::new("/sys/devices/system/node/node0").exists();
        if numa {
            assert!(
                node.is_some(),
                "kernel has NUMA nodes but move_pages gave none"
            );
        }
    }

    #[test]
    fn binding_to_a_node_that_cannot_exist_is_refused() {
        let map = crate::sys::shm::SharedMapping::create("numa-test", 4096).unwrap();
        assert!(prefer_node(map.as_ptr(), map.mapped_len(), 5000).is_err());
    }
}
