//! Shared memory: anonymous memfd files mapped into this process. Backing regions with a
//! memfd (instead of plain anonymous memory) lets a same-host peer map the very same pages
//! later by receiving the file descriptor.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};

use memmap2::{MmapMut, MmapOptions};

/// A memfd of a fixed size, mapped read/write and shared. Unmapped and closed on drop.
#[derive(Debug)]
pub struct SharedMapping {
    map: MmapMut,
    ptr: *mut u8,
    file: File,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the raw pointer is only an address into it,
// valid for as long as `map` lives, and the type hands out no references into it.
unsafe impl Send for SharedMapping {}
// SAFETY: as above; concurrent reads and writes through `read_at`/`write_at` are copies of
// bytes, the same as DMA from a NIC into registered memory.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Creates a memfd named `name` (visible in /proc/PID/fd, for debugging) holding `len`
    /// bytes (rounded up to whole pages in the mapping) and maps it.
    pub fn create(name: &str, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero-length mapping",
            ));
        }
        let page = super::page_size();
        let mapped = len
            .checked_add(page - 1)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "length overflows"))?
            & !(page - 1);
        let cname = CString::new(format!("kvxfer:{name}"))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name holds a NUL byte"))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(mapped as u64)?;
        // SAFETY: the file is our own memfd, not yet shared with anyone, and its length is
        // never changed while mapped (we never truncate it), so the mapping stays valid.
        let mut map = unsafe { MmapOptions::new().len(mapped).map_mut(&file)? };
        let ptr = map.as_mut_ptr();
        Ok(SharedMapping {
            map,
            ptr,
            file,
            len,
        })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The length asked for at creation.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length mappings cannot be created.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The length actually mapped (whole pages).
    pub fn mapped_len(&self) -> usize {
        self.map.len()
    }

    /// The memfd, for passing to a same-host peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Faults every page in now (after any NUMA binding), so that transfers into fresh
    /// memory do not pay a page fault per 4 KiB. Uses `MADV_POPULATE_WRITE` (Linux 5.14+);
    /// where the kernel or a seccomp filter does not offer it (EINVAL, ENOSYS, EPERM) it
    /// writes one zero byte per page instead. Fails when the kernel cannot provide the
    /// pages (ENOMEM, EFAULT).
    pub fn populate(&self) -> io::Result<()> {
        // The asm-generic value, the same on x86_64 and aarch64 (not in our libc yet).
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: the range is exactly our live mapping; the advice only faults pages in
        // and leaves their (zero) contents unchanged.
        let rc = unsafe { libc::madvise(self.ptr.cast(), self.mapped_len(), MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if !matches!(
            err.raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)
        ) {
            return Err(err);
        }
        for offset in (0..self.mapped_len()).step_by(super::page_size()) {
            // SAFETY: offset < mapped_len, inside the live writable mapping; pages of a
            // fresh memfd are zero, so writing zero changes nothing but residency.
            unsafe { self.ptr.add(offset).write_volatile(0) };
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the mapping; false when the
    /// range does not fit in `len()`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> bool {
        if !self.fits(offset, buf.len()) {
            return false;
        }
        // SAFETY: the range was checked to lie inside the live mapping, and `buf` is a
        // distinct Rust allocation, so the two ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copies `data` into the mapping at `offset`; false when the range does not fit.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> bool {
        if !self.fits(offset, data.len()) {
            return false;
        }
        // SAFETY: the range was checked to lie inside the live, writable mapping, and
        // `data` is a distinct Rust allocation, so the two ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        true
    }

    /// Sets `len` bytes at `offset` to `byte`; false when the range does not fit.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> bool {
        if !self.fits(offset, len) {
            return false;
        }
        // SAFETY: the range was checked to lie inside the live, writable mapping.
        unsafe { std::ptr::write_bytes(self.ptr.add(offset), byte, len) };
        true
    }

    fn fits(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_write_read_round_trip() {
        let m = SharedMapping::create("t", 10_000).unwrap();
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.mapped_len() % crate::sys::page_size(), 0);
        assert!(m.write_at(9_990, b"0123456789"));
        let mut out = [0u8; 10];
        assert!(m.read_at(9_990, &mut out));
        assert_eq!(&out, b"0123456789");
        assert!(
            !m.write_at(9_991, b"0123456789"),
            "write past the end must be refused"
        );
        assert!(
            !m.read_at(usize::MAX, &mut out),
            "overflowing offset must be refused"
        );
        assert!(m.fill(0, 4, 7));
        m.read_at(0, &mut out[..4]);
        assert_eq!(&out[..4], &[7; 4]);
    }

    #[test]
    fn zero_length_is_refused() {
        assert!(SharedMapping::create("t", 0).is_err());
    }

    #[test]
    fn the_memfd_is_a_file_of_the_mapped_size() {
        let m = SharedMapping::create("t", 5000).unwrap();
        let meta = File::from(m.fd().try_clone_to_owned().unwrap())
            .metadata()
            .unwrap();
        assert_eq!(meta.len() as usize, m.mapped_len());
    }
}
