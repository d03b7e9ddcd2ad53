//! Shared memory: anonymous memfd files mapped into this process. Backing regions with a
//! memfd (instead of plain anonymous memory) lets a same-host peer map the very same pages
//! later by receiving the file descriptor.
//!
//! Our memfds are sealed against resizing (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), so
//! that a peer mapping one can never be hit by `SIGBUS` from a truncation; [`PeerMapping`]
//! refuses to map a peer's memfd that does not carry at least `F_SEAL_SHRINK`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use memmap2::{Mmap, MmapMut, MmapOptions};

/// The seals every memfd of ours carries: its size can never change again.
const OUR_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// The seals (`F_SEAL_*` bits) of a memfd, from `fcntl(F_GET_SEALS)`. Fails with `EINVAL`
/// for a file that does not support sealing.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: F_GET_SEALS on a descriptor we borrow; no pointers involved.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A memfd of a fixed size (sealed: it can never be resized), mapped read/write and shared.
/// Unmapped and closed on drop.
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
    /// bytes (rounded up to whole pages in the mapping), seals its size
    /// (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and maps it.
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
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(mapped as u64)?;
        // SAFETY: F_ADD_SEALS with an integer argument on the memfd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, OUR_SEALS) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the file is our own memfd, sealed so that its length can never change, so
        // the mapping stays valid for as long as it lives.
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

    /// The memfd, for passing to a same-host peer (who may map it read/write).
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

/// Part of a memfd received from a same-host peer, mapped shared into this process
/// (read-only, or read/write). Unmapped on drop; the descriptor is not kept (the mapping
/// keeps the file alive).
#[derive(Debug)]
pub struct PeerMapping {
    map: PeerMap,
    ptr: *mut u8,
    len: usize,
}

#[derive(Debug)]
enum PeerMap {
    // The mappings are only held to be unmapped on drop.
    #[allow(dead_code)]
    ReadOnly(Mmap),
    #[allow(dead_code)]
    ReadWrite(MmapMut),
}

// SAFETY: the mapping is plain shared memory; the raw pointer is only an address into it,
// valid for as long as `map` lives, and the type hands out no references into it.
unsafe impl Send for PeerMapping {}
// SAFETY: as above; the type has no interior state, only the address and the mapping.
unsafe impl Sync for PeerMapping {}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl PeerMapping {
    /// Maps `len` bytes at `offset` of a memfd `fd` received from a peer, shared, readable
    /// and, when `writable`, writable.
    ///
    /// Fails with `InvalidInput` when `len` is zero or `offset` is not a multiple of the
    /// page size, and with `InvalidData` when the file is not a regular file, is not sealed
    /// against shrinking (`F_SEAL_SHRINK`: the peer could then truncate it and fault us
    /// with `SIGBUS`), or is smaller than `offset + len`. A `writable` mapping of a
    /// read-only descriptor fails with `EACCES` (`PermissionDenied`).
    pub fn map(fd: OwnedFd, offset: u64, len: usize, writable: bool) -> io::Result<PeerMapping> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero-length peer mapping",
            ));
        }
        if offset % super::page_size() as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("peer mapping offset {offset} is not a multiple of the page size"),
            ));
        }
        let file = File::from(fd);
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(invalid_data(format!(
                "peer descriptor is not a regular file ({:?})",
                meta.file_type()
            )));
        }
        let file_seals = seals(file.as_fd()).map_err(|e| {
            invalid_data(format!(
                "cannot read the seals of the peer's file (not a memfd?): {e}"
            ))
        })?;
        if file_seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid_data(
                "peer memfd is not sealed against shrinking (F_SEAL_SHRINK)".to_string(),
            ));
        }
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| invalid_data(format!("offset {offset} + length {len} overflows")))?;
        if end > meta.len() {
            return Err(invalid_data(format!(
                "peer memfd holds {} bytes, fewer than offset {offset} + length {len}",
                meta.len()
            )));
        }
        let mut options = MmapOptions::new();
        // Populated: the peer's pages exist already, and faulting in our page-table entries
        // one 4 KiB page at a time during the first transfer would cost more than the copy.
        options.offset(offset).len(len).populate();
        let (map, ptr) = if writable {
            // SAFETY: the file is sealed against shrinking and holds offset + len bytes, so
            // every mapped page stays backed for the life of the mapping (no SIGBUS). Its
            // contents may change under us (shared memory); we hand out no references.
            let mut map = unsafe { options.map_mut(&file)? };
            let ptr = map.as_mut_ptr();
            (PeerMap::ReadWrite(map), ptr)
        } else {
            // SAFETY: as above.
            let map = unsafe { options.map(&file)? };
            let ptr = map.as_ptr().cast_mut();
            (PeerMap::ReadOnly(map), ptr)
        };
        Ok(PeerMapping { map, ptr, len })
    }

    /// Start of the mapping (writable only when [`is_writable`](Self::is_writable)).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The length mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length mappings are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping was made writable.
    pub fn is_writable(&self) -> bool {
        matches!(self.map, PeerMap::ReadWrite(_))
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

    fn page() -> usize {
        crate::sys::page_size()
    }

    #[test]
    fn create_seals_the_size() {
        let m = SharedMapping::create("t", 5000).unwrap();
        let s = seals(m.fd()).unwrap();
        assert_eq!(s & OUR_SEALS, OUR_SEALS);
        assert_eq!(s & libc::F_SEAL_WRITE, 0, "must stay writable");
        let file = File::from(m.fd().try_clone_to_owned().unwrap());
        for len in [0, m.mapped_len() as u64 - 1, m.mapped_len() as u64 * 2] {
            let err = file.set_len(len).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({len})");
        }
        // SAFETY: F_ADD_SEALS with an integer argument on a descriptor we own.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(rc, -1, "F_SEAL_SEAL must forbid further seals");
        assert!(m.write_at(0, b"still writable"));
    }

    #[test]
    fn a_peer_mapping_shares_the_pages() {
        let m = SharedMapping::create("t", 3 * page()).unwrap();
        assert!(m.write_at(page() + 10, b"from owner"));
        let fd = m.fd().try_clone_to_owned().unwrap();
        let peer = PeerMapping::map(fd, page() as u64, 2 * page(), true).unwrap();
        assert_eq!(peer.len(), 2 * page());
        assert!(!peer.is_empty());
        assert!(peer.is_writable());
        let mut got = [0u8; 10];
        // SAFETY: 10..20 lies inside the peer mapping; `got` is a distinct allocation.
        unsafe { std::ptr::copy_nonoverlapping(peer.as_ptr().add(10), got.as_mut_ptr(), 10) };
        assert_eq!(&got, b"from owner");
        // SAFETY: the last 9 bytes of the writable peer mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b"from peer".as_ptr(),
                peer.as_ptr().add(2 * page() - 9),
                9,
            )
        };
        let mut back = [0u8; 9];
        assert!(m.read_at(3 * page() - 9, &mut back));
        assert_eq!(&back, b"from peer");
        // The mapping outlives the owner's mapping and descriptor.
        drop(m);
        // SAFETY: as above, still inside the live peer mapping.
        unsafe { std::ptr::copy_nonoverlapping(peer.as_ptr().add(10), got.as_mut_ptr(), 10) };
        assert_eq!(&got, b"from owner");
    }

    #[test]
    fn a_peer_mapping_refuses_an_unsealed_memfd() {
        let name = CString::new("kvxfer:unsealed").unwrap();
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(page() as u64).unwrap();
        let err = PeerMapping::map(file.into(), 0, page(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
    }

    #[test]
    fn a_peer_mapping_refuses_other_files() {
        let err = PeerMapping::map(File::open("/proc/self/exe").unwrap().into(), 0, 1, false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("seals"), "{err}");
        let err = PeerMapping::map(File::open("/").unwrap().into(), 0, 1, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("regular file"), "{err}");
    }

    #[test]
    fn a_peer_mapping_refuses_bad_ranges() {
        let m = SharedMapping::create("t", 2 * page()).unwrap();
        let fd = || m.fd().try_clone_to_owned().unwrap();
        let p = page() as u64;
        for (offset, len) in [
            (0, 2 * page() + 1),
            (p, page() + 1),
            (2 * p, 1),
            (p, usize::MAX),
        ] {
            let err = PeerMapping::map(fd(), offset, len, false).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{offset} + {len}");
        }
        let err = PeerMapping::map(fd(), u64::MAX - p + 1, page(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = PeerMapping::map(fd(), 100, 10, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = PeerMapping::map(fd(), 0, 0, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // The exact end is fine.
        let peer = PeerMapping::map(fd(), p, page(), false).unwrap();
        assert!(!peer.is_writable());
    }
}
