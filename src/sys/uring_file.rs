//! Files read and written with io_uring, for the store's SSD tier.
//!
//! * [`UringFile`]: a preallocated cache file (`O_DIRECT` where the filesystem allows it)
//!   read and written at 4096-aligned offsets from raw memory, optionally through fixed
//!   (registered) buffers. Its transfers are `unsafe fn`s: the caller vouches for the
//!   memory.
//! * [`SegmentFile`]: a `UringFile` tied to one memory segment, whose transfers are safe:
//!   they take segment offsets and check them against the segment and the file.
//!
//! One ring per file, behind a mutex: a call submits all of its requests (split into
//! pieces of at most 8 MiB, up to 64 in flight) and waits for every completion before it
//! returns, so no request outlives the call that made it. Calls from several threads on
//! one file take turns; the kernel still sees up to 64 requests at once from each call.
//! A tier that wants more parallelism opens more files.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use io_uring::{opcode, squeue, types, IoUring};

use super::shm::SharedMapping;

/// The alignment of every file offset, length and memory address a transfer accepts
/// (whether the file is opened `O_DIRECT` or not, so behaviour does not depend on the
/// filesystem).
pub const ALIGN: usize = 4096;
/// The largest single request; bigger transfers are split and the pieces submitted
/// together.
const CHUNK: usize = 8 << 20;
/// The kernel's limit on one fixed buffer.
const PIECE: usize = 1 << 30;
/// The kernel's limit on the number of fixed buffers of one ring.
const MAX_PIECES: usize = 1 << 14;
/// Submission queue size: the most requests one call keeps in flight.
const RING_ENTRIES: u32 = 64;
/// How often one request is reissued after `EINTR` / `EAGAIN` before it counts as failed.
const MAX_RETRIES: u32 = 16;

/// Which way bytes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Memory to file.
    Write,
    /// File to memory.
    Read,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Write => "write",
            Dir::Read => "read",
        }
    }
}

/// The memory registered as fixed buffers: `[base, base + len)`, cut into buffers of
/// `piece` bytes (the last one shorter), buffer `i` starting at `base + i * piece`.
#[derive(Clone, Copy, Debug)]
struct Fixed {
    base: usize,
    len: usize,
    piece: usize,
}

/// The ring and what is registered with it (guarded by the file's mutex).
struct Ring {
    /// `None` once the ring had to be dropped after a failure (see [`UringFile::run`]).
    uring: Option<IoUring>,
    fixed: Option<Fixed>,
    why_not_fixed: Option<String>,
    /// Why the ring was dropped.
    dead: Option<String>,
}

/// A cache file of a fixed length, read and written with io_uring. Deleted on drop, and
/// never synced: a transfer is done when the device (`O_DIRECT`) or the page cache has the
/// bytes, which is all a cache needs.
///
/// `Send + Sync`: one ring behind a mutex (see the module documentation); every call
/// waits for all of its requests, so the kernel touches a caller's memory only while the
/// call that was handed it runs.
pub struct UringFile {
    file: File,
    path: PathBuf,
    len: u64,
    why_not_direct: Option<String>,
    ring: Mutex<Ring>,
}

impl fmt::Debug for UringFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("why_not_direct", &self.why_not_direct)
            .field("why_not_fixed", &self.why_not_fixed())
            .finish_non_exhaustive()
    }
}

/// A 4096-aligned block of zeros, for the `O_DIRECT` probe write.
#[repr(C, align(4096))]
struct Block([u8; ALIGN]);

impl UringFile {
    /// Creates (or truncates) `path` with `len` bytes (`fallocate`, or `ftruncate` where
    /// the filesystem cannot preallocate), opened `O_DIRECT` when the filesystem supports
    /// it. If `O_DIRECT` is refused (`EINVAL` at open or at a first aligned write, e.g. on
    /// some tmpfs and overlay filesystems) the file is opened for buffered I/O instead:
    /// [`direct`](Self::direct) is then false and [`why_not_direct`](Self::why_not_direct)
    /// says why, for the caller to log once.
    ///
    /// Fails if `len` is 0 or not a multiple of [`ALIGN`] (`InvalidInput`), if the file
    /// cannot be created or preallocated (e.g. `ENOSPC`), or if io_uring is unavailable
    /// (`Unsupported`, with a message naming the cause: no kernel support (`ENOSYS`) or
    /// forbidden (`EPERM`: the `kernel.io_uring_disabled` sysctl, seccomp, a container
    /// runtime)).
    pub fn create(path: &Path, len: u64) -> io::Result<UringFile> {
        Self::create_with(path, len, true)
    }

    /// [`create`](Self::create), trying `O_DIRECT` only if `try_direct`.
    fn create_with(path: &Path, len: u64, try_direct: bool) -> io::Result<UringFile> {
        if len == 0 || len % ALIGN as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: a cache file of {len} bytes: the length must be a non-zero multiple of {ALIGN}",
                    path.display()
                ),
            ));
        }
        // The ring first: if io_uring is unavailable, no file is left behind.
        let uring = new_ring()?;
        let (file, why_not_direct) = open_file(path, len, try_direct).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create the cache file {}: {e}", path.display()),
            )
        })?;
        Ok(UringFile {
            file,
            path: path.to_owned(),
            len,
            why_not_direct,
            ring: Mutex::new(Ring {
                uring: Some(uring),
                fixed: None,
                why_not_fixed: None,
                dead: None,
            }),
        })
    }

    /// Whether the file is opened `O_DIRECT` (bypassing the page cache).
    pub fn direct(&self) -> bool {
        self.why_not_direct.is_none()
    }

    /// Why the file uses buffered I/O, when it does.
    pub fn why_not_direct(&self) -> Option<&str> {
        self.why_not_direct.as_deref()
    }

    /// The length of the file in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a cache file has at least [`ALIGN`] bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether memory is registered as fixed buffers (transfers inside it then use
    /// `READ_FIXED` / `WRITE_FIXED`).
    pub fn fixed_buffers(&self) -> bool {
        self.lock().fixed.is_some()
    }

    /// Why the last [`register_memory`](Self::register_memory) did not register the memory
    /// (transfers then use plain `READ` / `WRITE`); `None` if it did, or if none was asked.
    pub fn why_not_fixed(&self) -> Option<String> {
        self.lock().why_not_fixed.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `[base, base + len)` as fixed buffers (`io_uring_register_buffers`, split
    /// into buffers of at most 1 GiB, the kernel's limit per buffer; at most 16 TiB in all),
    /// replacing any earlier registration. Transfers whose memory lies inside it then use
    /// `READ_FIXED` / `WRITE_FIXED`, others plain `READ` / `WRITE`.
    ///
    /// Registration is an optimisation: if the kernel refuses it (`RLIMIT_MEMLOCK` too low,
    /// memory it cannot pin) this still returns `Ok`, transfers use plain requests and
    /// [`why_not_fixed`](Self::why_not_fixed) says why. Fails (`InvalidInput`) only for a
    /// null `base`, a zero `len` or a range that wraps around or exceeds 16 TiB.
    ///
    /// # Safety
    /// The memory must stay mapped (valid for reads and writes) until
    /// [`unregister_memory`](Self::unregister_memory), a later `register_memory`, or the
    /// drop of this file: the kernel pins its pages and keeps referring to them.
    pub unsafe fn register_memory(&self, base: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.register_pieces(base, len, PIECE) }
    }

    /// [`register_memory`](Self::register_memory) with fixed buffers of `piece` bytes (a
    /// multiple of [`ALIGN`], at most 1 GiB); tests use small pieces.
    ///
    /// # Safety
    /// As for [`register_memory`](Self::register_memory).
    unsafe fn register_pieces(&self, base: *mut u8, len: usize, piece: usize) -> io::Result<()> {
        debug_assert!(piece > 0 && piece <= PIECE && piece % ALIGN == 0);
        let invalid = |why: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot register {len} bytes at {base:p} as fixed buffers: {why}"),
            ))
        };
        if base.is_null() {
            return invalid("null address");
        }
        if len == 0 {
            return invalid("zero length");
        }
        if base.addr().checked_add(len).is_none() {
            return invalid("the range wraps around the address space");
        }
        let count = len.div_ceil(piece);
        if count > MAX_PIECES {
            return invalid("more than the kernel's 16384 fixed buffers of 1 GiB");
        }
        let iovecs: Vec<libc::iovec> = (0..count)
            .map(|i| libc::iovec {
                iov_base: base.wrapping_add(i * piece).cast(),
                iov_len: piece.min(len - i * piece),
            })
            .collect();
        let mut guard = self.lock();
        let ring = &mut *guard;
        drop_fixed(ring);
        let Some(uring) = ring.uring.as_ref() else {
            ring.why_not_fixed = ring.dead.clone();
            return Ok(());
        };
        // SAFETY: the iovecs describe `[base, base + len)`, which the caller keeps mapped
        // until it is unregistered (unregister_memory, a new registration or drop).
        match unsafe { uring.submitter().register_buffers(&iovecs) } {
            Ok(()) => {
                ring.fixed = Some(Fixed {
                    base: base.addr(),
                    len,
                    piece,
                });
                ring.why_not_fixed = None;
            }
            Err(e) => {
                let why = match e.raw_os_error() {
                    Some(libc::ENOMEM) => format!(
                        "{e}: the locked-memory limit (RLIMIT_MEMLOCK, `ulimit -l`) is too low \
                         to pin {len} bytes; raise it or grant CAP_IPC_LOCK"
                    ),
                    Some(libc::EOPNOTSUPP | libc::EFAULT) => format!(
                        "{e}: the kernel cannot pin this kind of memory for io_uring \
                         (file-backed memory on older kernels)"
                    ),
                    _ => format!("{e}"),
                };
                let why = format!("io_uring fixed buffers refused ({why}); using plain READ/WRITE");
                log::debug!("kvxfer: {}: {why}", self.path.display());
                ring.why_not_fixed = Some(why);
            }
        }
        Ok(())
    }

    /// Unregisters the fixed buffers, if any: later transfers use plain `READ` / `WRITE`,
    /// and the registered memory may then be unmapped.
    pub fn unregister_memory(&self) {
        let mut ring = self.lock();
        drop_fixed(&mut ring);
        ring.why_not_fixed = None;
    }

    /// Writes `len` bytes from memory at `src` to file offset `offset` and waits until
    /// they are written; short writes are continued, transfers over 8 MiB are split into
    /// requests submitted together.
    ///
    /// `offset`, `len` and `src` must be multiples of [`ALIGN`], `src` not null and the
    /// range inside [`len`](Self::len): otherwise `InvalidInput` and nothing is written.
    ///
    /// # Safety
    /// `src..src + len` must be readable for the duration of the call.
    pub unsafe fn write_at(&self, offset: u64, src: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's contract, forwarded.
        let mut results = unsafe { self.run(Dir::Write, 1, |_| (offset, src.cast_mut(), len)) };
        results.pop().unwrap_or(Ok(()))
    }

    /// Reads `len` bytes at file offset `offset` into memory at `dst` and waits until they
    /// are read; as [`write_at`](Self::write_at) otherwise. A read that returns 0 bytes
    /// (the file was truncated behind our back) fails with `UnexpectedEof`.
    ///
    /// # Safety
    /// `dst..dst + len` must be writable for the duration of the call and not accessed by
    /// anyone else meanwhile.
    pub unsafe fn read_at(&self, offset: u64, dst: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's contract, forwarded.
        let mut results = unsafe { self.run(Dir::Read, 1, |_| (offset, dst, len)) };
        results.pop().unwrap_or(Ok(()))
    }

    /// Several [`write_at`](Self::write_at)s in one submission, each `(file offset, memory,
    /// length)`; returns one result per item, in order. An invalid item fails alone.
    ///
    /// # Safety
    /// Every item's memory must be readable for the duration of the call.
    pub unsafe fn write_many(&self, items: &[(u64, *const u8, usize)]) -> Vec<io::Result<()>> {
        // SAFETY: the caller's contract, forwarded.
        unsafe {
            self.run(Dir::Write, items.len(), |i| {
                let (offset, src, len) = items[i];
                (offset, src.cast_mut(), len)
            })
        }
    }

    /// Several [`read_at`](Self::read_at)s in one submission, each `(file offset, memory,
    /// length)`; returns one result per item, in order. An invalid item fails alone.
    ///
    /// # Safety
    /// Every item's memory must be writable for the duration of the call and not accessed
    /// by anyone else meanwhile (items must not overlap one another either).
    pub unsafe fn read_many(&self, items: &[(u64, *mut u8, usize)]) -> Vec<io::Result<()>> {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.run(Dir::Read, items.len(), |i| items[i]) }
    }

    /// Checks one transfer: `InvalidInput` naming what is wrong, or `Ok`.
    fn check(&self, dir: Dir, offset: u64, ptr: *mut u8, len: usize) -> io::Result<()> {
        let fail = |why: String| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} of {len} bytes at offset {offset} of {} (memory {ptr:p}): {why}",
                    dir.name(),
                    self.path.display()
                ),
            ))
        };
        if offset % ALIGN as u64 != 0 || len % ALIGN != 0 || ptr.addr() % ALIGN != 0 {
            return fail(format!(
                "the file offset, the length and the memory address must be multiples of {ALIGN}"
            ));
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return fail(format!("beyond the end of the {}-byte file", self.len));
        }
        if len > 0 && ptr.is_null() {
            return fail("null memory address".into());
        }
        if ptr.addr().checked_add(len).is_none() {
            return fail("the memory range wraps around the address space".into());
        }
        Ok(())
    }

    /// Runs `count` transfers (`item(i)` = file offset, memory, length), all submitted
    /// through the ring, at most [`RING_ENTRIES`] requests in flight, and returns only once
    /// the kernel has finished every request it was handed.
    ///
    /// # Safety
    /// Every item's memory must be valid for `dir` (readable for writes; writable and not
    /// accessed by others for reads) for the duration of the call.
    unsafe fn run(
        &self,
        dir: Dir,
        count: usize,
        item: impl Fn(usize) -> (u64, *mut u8, usize),
    ) -> Vec<io::Result<()>> {
        let mut errors: Vec<Option<io::Error>> = (0..count)
            .map(|i| {
                let (offset, ptr, len) = item(i);
                self.check(dir, offset, ptr, len).err()
            })
            .collect();
        // Bytes each item still has to move.
        let mut left: Vec<usize> = (0..count)
            .map(|i| if errors[i].is_some() { 0 } else { item(i).2 })
            .collect();
        let mut guard = self.lock();
        let ring = &mut *guard;
        let fd = types::Fd(self.file.as_raw_fd());
        let fixed = ring.fixed;
        let mut slots: Vec<Option<Chunk>> = (0..RING_ENTRIES).map(|_| None).collect();
        let mut free: Vec<usize> = (0..slots.len()).rev().collect();
        let mut cursor = Cursor::default();
        // Remainders of short transfers and requests to reissue.
        let mut again: Vec<Chunk> = Vec::new();
        // Set when io_uring_enter itself failed: nothing new is queued after that.
        let mut broken: Option<String> = ring.dead.clone();
        loop {
            if let (None, Some(uring)) = (&broken, ring.uring.as_mut()) {
                while let Some(slot) = free.pop() {
                    let next = again
                        .pop()
                        .or_else(|| cursor.next(&item, count, &errors, fixed));
                    let Some(chunk) = next else {
                        free.push(slot);
                        break;
                    };
                    if errors[chunk.item].is_some() {
                        free.push(slot);
                        continue;
                    }
                    let entry = chunk.entry(dir, fd).user_data(slot as u64);
                    // SAFETY: the chunk lies inside an item's memory, valid for `dir` for
                    // the duration of this call (the caller's contract), and this call does
                    // not return before the kernel completed the request (below); a fixed
                    // index names a buffer that contains the chunk (`split`).
                    if unsafe { uring.submission().push(&entry) }.is_err() {
                        // Cannot happen (never more in flight than entries); retried.
                        again.push(chunk);
                        free.push(slot);
                        break;
                    }
                    slots[slot] = Some(chunk);
                }
            }
            let in_flight = slots.len() - free.len();
            if in_flight == 0 {
                break;
            }
            let Some(uring) = ring.uring.as_mut() else {
                break; // unreachable: requests are only queued on a live ring
            };
            match uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    if broken.is_none() {
                        log::error!(
                            "kvxfer: io_uring_enter failed on {}: {e}",
                            self.path.display()
                        );
                        broken = Some(format!("io_uring_enter failed: {e}"));
                    }
                    if uring.submission().len() == in_flight {
                        // The kernel holds none of our requests; they are all still queued.
                        // They must never be submitted later (their memory is the caller's
                        // only until we return), so the ring goes, and with it the queue.
                        let why = format!("the io_uring was dropped after a failure ({e})");
                        ring.uring = None;
                        ring.fixed = None;
                        ring.why_not_fixed = Some(why.clone());
                        ring.dead = Some(why);
                        for slot in &mut slots {
                            if let Some(chunk) = slot.take() {
                                errors[chunk.item].get_or_insert_with(|| {
                                    self.failed(dir, &item(chunk.item), format!("{e}"))
                                });
                            }
                        }
                        break;
                    }
                    // Some requests are in the kernel: wait for them, however long.
                    std::thread::yield_now();
                }
            }
            let Some(uring) = ring.uring.as_mut() else {
                break;
            };
            for cqe in uring.completion() {
                let slot = cqe.user_data() as usize;
                let Some(mut chunk) = slots.get_mut(slot).and_then(Option::take) else {
                    continue;
                };
                free.push(slot);
                let res = cqe.result();
                if res > 0 {
                    let n = (res as usize).min(chunk.len);
                    left[chunk.item] -= n;
                    if n < chunk.len {
                        chunk.advance(n);
                        again.push(chunk);
                    }
                } else if res == 0 {
                    let (kind, what) = match dir {
                        Dir::Write => (io::ErrorKind::WriteZero, "wrote"),
                        Dir::Read => (io::ErrorKind::UnexpectedEof, "read"),
                    };
                    errors[chunk.item].get_or_insert_with(|| {
                        let msg = self.message(
                            dir,
                            &item(chunk.item),
                            format!(
                                "{what} 0 of {} bytes at offset {} (was the file truncated?)",
                                chunk.len, chunk.offset
                            ),
                        );
                        io::Error::new(kind, msg)
                    });
                } else if matches!(-res, libc::EINTR | libc::EAGAIN) && chunk.retries < MAX_RETRIES
                {
                    chunk.retries += 1;
                    again.push(chunk);
                } else {
                    let e = io::Error::from_raw_os_error(-res);
                    errors[chunk.item].get_or_insert_with(|| {
                        let msg = self.message(
                            dir,
                            &item(chunk.item),
                            format!("{} bytes at offset {}: {e}", chunk.len, chunk.offset),
                        );
                        io::Error::new(e.kind(), msg)
                    });
                }
            }
        }
        drop(guard);
        errors
            .into_iter()
            .enumerate()
            .map(|(i, error)| match error {
                Some(e) => Err(e),
                None if left[i] == 0 => Ok(()),
                None => Err(self.failed(
                    dir,
                    &item(i),
                    broken.clone().unwrap_or_else(|| "not transferred".into()),
                )),
            })
            .collect()
    }

    /// The message of a failed transfer.
    fn message(
        &self,
        dir: Dir,
        &(offset, ptr, len): &(u64, *mut u8, usize),
        why: String,
    ) -> String {
        format!(
            "{} of {len} bytes at offset {offset} of {} (memory {ptr:p}) failed: {why}",
            dir.name(),
            self.path.display()
        )
    }

    /// An error (`Other`) for a failed transfer.
    fn failed(&self, dir: Dir, item: &(u64, *mut u8, usize), why: String) -> io::Error {
        io::Error::other(self.message(dir, item, why))
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        // The ring (and with it the fixed buffers) goes with the struct; no request is in
        // flight outside a call. The file is a cache: delete it.
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!(
                    "kvxfer: cannot delete the cache file {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// Unregisters the fixed buffers of `ring`, if any.
fn drop_fixed(ring: &mut Ring) {
    if ring.fixed.take().is_some() {
        if let Some(uring) = &ring.uring {
            if let Err(e) = uring.submitter().unregister_buffers() {
                log::debug!("kvxfer: io_uring unregister_buffers: {e}");
            }
        }
    }
}

/// A new ring, or an error that says clearly why io_uring is unavailable.
fn new_ring() -> io::Result<IoUring> {
    IoUring::new(RING_ENTRIES).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring is unavailable: this kernel has no io_uring support \
             (io_uring_setup: ENOSYS); the SSD tier needs it",
        ),
        Some(libc::EPERM) => io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring is unavailable: io_uring_setup is not permitted (EPERM): the \
             kernel.io_uring_disabled sysctl, a seccomp filter or the container runtime \
             forbids it; the SSD tier needs it",
        ),
        _ => io::Error::new(e.kind(), format!("cannot set up an io_uring: {e}")),
    })
}

/// Opens (creating or truncating) and preallocates the file: `O_DIRECT` if `try_direct`
/// and the filesystem accepts it, else buffered with the reason. The file is removed
/// again if anything fails after it was created.
fn open_file(path: &Path, len: u64, try_direct: bool) -> io::Result<(File, Option<String>)> {
    let open = |direct: bool| {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(true);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        options.open(path)
    };
    let created = |result: io::Result<File>| {
        result.inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    };
    let why = if try_direct {
        match open(true) {
            Ok(file) => {
                let file = created(preallocate(file, len))?;
                // Some filesystems accept O_DIRECT at open and refuse it at the first
                // request: try one aligned block (the file reads as zeros anyway).
                let block = Box::new(Block([0; ALIGN]));
                match file.write_all_at(&block.0, 0) {
                    Ok(()) => return Ok((file, None)),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => format!(
                        "the filesystem accepts O_DIRECT at open but refuses an aligned \
                         {ALIGN}-byte direct write ({e})"
                    ),
                    Err(e) => return created(Err(e)).map(|f| (f, None)),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                format!("the filesystem refuses O_DIRECT ({e})")
            }
            Err(e) => return Err(e),
        }
    } else {
        "O_DIRECT was not requested".into()
    };
    let file = created(open(false).and_then(|f| preallocate(f, len)))?;
    Ok((file, Some(why)))
}

/// Reserves `len` bytes for `file` (`fallocate`; `ftruncate` where the filesystem cannot).
fn preallocate(file: File, len: u64) -> io::Result<File> {
    let Ok(size) = libc::off_t::try_from(len) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes is too large for a file"),
        ));
    };
    // SAFETY: fallocate on a descriptor we own; no pointers involved.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size) };
    if rc == 0 {
        return Ok(file);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => {
            file.set_len(len)?;
            Ok(file)
        }
        _ => Err(io::Error::new(
            e.kind(),
            format!("cannot preallocate {len} bytes: {e}"),
        )),
    }
}

/// One request: `len` bytes between file offset `offset` and memory at `ptr`, part of
/// transfer `item`; `fixed` is the index of the fixed buffer holding it.
#[derive(Debug)]
struct Chunk {
    item: usize,
    offset: u64,
    ptr: *mut u8,
    len: usize,
    fixed: Option<u16>,
    retries: u32,
}

impl Chunk {
    fn entry(&self, dir: Dir, fd: types::Fd) -> squeue::Entry {
        // At most CHUNK bytes: fits u32.
        let len = self.len as u32;
        match (dir, self.fixed) {
            (Dir::Write, Some(index)) => opcode::WriteFixed::new(fd, self.ptr, len, index)
                .offset(self.offset)
                .build(),
            (Dir::Write, None) => opcode::Write::new(fd, self.ptr, len)
                .offset(self.offset)
                .build(),
            (Dir::Read, Some(index)) => opcode::ReadFixed::new(fd, self.ptr, len, index)
                .offset(self.offset)
                .build(),
            (Dir::Read, None) => opcode::Read::new(fd, self.ptr, len)
                .offset(self.offset)
                .build(),
        }
    }

    /// Skips the first `n` bytes (moved by a short transfer); the rest is in the same
    /// fixed buffer.
    fn advance(&mut self, n: usize) {
        self.ptr = self.ptr.wrapping_add(n);
        self.offset += n as u64;
        self.len -= n;
        self.retries = 0;
    }
}

/// Where the cutting of transfers into requests stands.
#[derive(Default)]
struct Cursor {
    item: usize,
    done: usize,
}

impl Cursor {
    /// The next request of a transfer that has not failed.
    fn next(
        &mut self,
        item: &impl Fn(usize) -> (u64, *mut u8, usize),
        count: usize,
        errors: &[Option<io::Error>],
        fixed: Option<Fixed>,
    ) -> Option<Chunk> {
        while self.item < count {
            let (offset, ptr, len) = item(self.item);
            if errors[self.item].is_some() || self.done >= len {
                self.item += 1;
                self.done = 0;
                continue;
            }
            let ptr = ptr.wrapping_add(self.done);
            let (n, index) = split(ptr.addr(), len - self.done, fixed);
            let chunk = Chunk {
                item: self.item,
                offset: offset + self.done as u64,
                ptr,
                len: n,
                fixed: index,
                retries: 0,
            };
            self.done += n;
            return Some(chunk);
        }
        None
    }
}

/// The length of the next request at `addr` with `rest` bytes to go (at most [`CHUNK`],
/// never crossing a fixed buffer's end), and the fixed buffer holding it, if any.
fn split(addr: usize, rest: usize, fixed: Option<Fixed>) -> (usize, Option<u16>) {
    let n = rest.min(CHUNK);
    if let Some(f) = fixed {
        if addr >= f.base && addr - f.base < f.len {
            let rel = addr - f.base;
            let index = rel / f.piece;
            let end = ((index + 1) * f.piece).min(f.len);
            // index < MAX_PIECES (checked at registration): fits u16.
            return (n.min(end - rel), Some(index as u16));
        }
    }
    (n, None)
}

/// A [`UringFile`] tied to one memory segment: transfers name segment offsets, are checked
/// against the segment and the file, and are safe. The segment is registered as fixed
/// buffers (where the kernel allows it) for as long as this lives.
///
/// `Send + Sync` like the file.
pub struct SegmentFile {
    // Dropped before `_owner`: the ring lets go of the registered pages first.
    file: UringFile,
    /// The segment's start address.
    base: usize,
    len: u64,
    /// What keeps the segment mapped, when given (`over_mapping`).
    _owner: Option<Arc<dyn Send + Sync>>,
}

impl fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentFile")
            .field("file", &self.file)
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl SegmentFile {
    /// Ties `file` to the segment `[base, base + len)` and registers the segment as fixed
    /// buffers (see [`UringFile::register_memory`]). Fails (`InvalidInput`) if `base` is
    /// null or not [`ALIGN`]-aligned, or `len` is 0 or wraps around.
    ///
    /// # Safety
    /// `[base, base + len)` must stay mapped, readable and writable, for as long as the
    /// returned value lives. Its methods copy bytes in and out of any part of the segment
    /// they are asked to (like a NIC's DMA into registered memory): no Rust reference
    /// (`&` / `&mut`) to bytes being transferred may be in use while a transfer runs.
    pub unsafe fn new(file: UringFile, base: *mut u8, len: usize) -> io::Result<SegmentFile> {
        if base.is_null() || base.addr() % ALIGN != 0 || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a segment of {len} bytes at {base:p}: it must be non-empty and start at a \
                     multiple of {ALIGN}"
                ),
            ));
        }
        // SAFETY: the caller keeps the segment mapped for as long as the returned value,
        // which owns the file (and drops the registration with it).
        unsafe { file.register_memory(base, len) }?;
        Ok(SegmentFile {
            file,
            base: base.addr(),
            len: len as u64,
            _owner: None,
        })
    }

    /// [`new`](Self::new) over the shared mapping that `mapping` finds in `owner` (e.g. an
    /// engine-allocated region): safe, because the returned value keeps `owner` alive, and
    /// with it the mapping, and a [`SharedMapping`] hands out no references into its
    /// bytes. Fails (`InvalidInput`) if `mapping` finds none.
    pub fn over_mapping<T: Send + Sync + 'static>(
        file: UringFile,
        owner: Arc<T>,
        mapping: fn(&T) -> Option<&SharedMapping>,
    ) -> io::Result<SegmentFile> {
        let Some(map) = mapping(&owner) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the segment has no shared mapping (it is not engine-allocated memory)",
            ));
        };
        // SAFETY: the mapping lives as long as `owner` (it is reached through a shared
        // borrow of it and cannot be replaced without `&mut`), and the returned value owns
        // `owner`; the mapping's own API copies bytes and never lends references.
        let mut segment = unsafe { SegmentFile::new(file, map.as_ptr(), map.len()) }?;
        segment._owner = Some(owner);
        Ok(segment)
    }

    /// The file.
    pub fn file(&self) -> &UringFile {
        &self.file
    }

    /// The segment's length in bytes.
    pub fn segment_len(&self) -> u64 {
        self.len
    }

    /// Copies `len` bytes at `segment_offset` of the segment to `file_offset` of the file.
    /// Offsets and length must be multiples of [`ALIGN`] and both ranges inside their
    /// segment / file, else `InvalidInput` and nothing is written.
    pub fn write_from_segment(
        &self,
        segment_offset: u64,
        file_offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let ptr = self.check(Dir::Write, file_offset, segment_offset, len)?;
        // SAFETY: `check` put the range inside the segment, which `new`'s contract keeps
        // mapped and readable.
        unsafe { self.file.write_at(file_offset, ptr, len as usize) }
    }

    /// Copies `len` bytes at `file_offset` of the file to `segment_offset` of the segment;
    /// checked as [`write_from_segment`](Self::write_from_segment).
    pub fn read_into_segment(
        &self,
        file_offset: u64,
        segment_offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let ptr = self.check(Dir::Read, file_offset, segment_offset, len)?;
        // SAFETY: `check` put the range inside the segment, which `new`'s contract keeps
        // mapped and writable, with no references into bytes being transferred.
        unsafe { self.file.read_at(file_offset, ptr, len as usize) }
    }

    /// Several [`write_from_segment`](Self::write_from_segment)s in one submission, each
    /// `(segment offset, file offset, length)`; one result per item, in order.
    pub fn write_many_from_segment(&self, items: &[(u64, u64, u64)]) -> Vec<io::Result<()>> {
        let checked: Vec<io::Result<(u64, *const u8, usize)>> = items
            .iter()
            .map(|&(segment_offset, file_offset, len)| {
                let ptr = self.check(Dir::Write, file_offset, segment_offset, len)?;
                Ok((file_offset, ptr.cast_const(), len as usize))
            })
            .collect();
        let valid: Vec<(u64, *const u8, usize)> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().copied())
            .collect();
        // SAFETY: every item was checked to lie inside the segment, which `new`'s contract
        // keeps mapped and readable.
        let done = unsafe { self.file.write_many(&valid) };
        merge(checked, done)
    }

    /// Several [`read_into_segment`](Self::read_into_segment)s in one submission, each
    /// `(file offset, segment offset, length)`; one result per item, in order. Items whose
    /// segment ranges overlap an earlier item's fail (`InvalidInput`).
    pub fn read_many_into_segment(&self, items: &[(u64, u64, u64)]) -> Vec<io::Result<()>> {
        let mut checked: Vec<io::Result<(u64, *mut u8, usize)>> = items
            .iter()
            .map(|&(file_offset, segment_offset, len)| {
                let ptr = self.check(Dir::Read, file_offset, segment_offset, len)?;
                Ok((file_offset, ptr, len as usize))
            })
            .collect();
        // Two reads into the same bytes would race in the kernel: refuse the later one.
        let mut taken: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for (i, c) in checked.iter_mut().enumerate() {
            let Ok((_, ptr, len)) = *c else { continue };
            if len == 0 {
                continue;
            }
            let (start, end) = (ptr.addr(), ptr.addr() + len);
            // Accepted ranges are disjoint: only the last one starting before `end` can
            // reach past `start`.
            let before = taken.range(..end).next_back();
            if let Some((_, &(_, prev))) = before.filter(|&(_, &(e, _))| e > start) {
                *c = Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("read into the segment overlaps item {prev} of the same batch"),
                ));
                continue;
            }
            taken.insert(start, (end, i));
        }
        let valid: Vec<(u64, *mut u8, usize)> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().copied())
            .collect();
        // SAFETY: every item was checked to lie inside the segment, which `new`'s contract
        // keeps mapped and writable with no references into bytes being transferred, and
        // the items do not overlap one another.
        let done = unsafe { self.file.read_many(&valid) };
        merge(checked, done)
    }

    /// The segment address of a checked transfer, or `InvalidInput`.
    fn check(
        &self,
        dir: Dir,
        file_offset: u64,
        segment_offset: u64,
        len: u64,
    ) -> io::Result<*mut u8> {
        check_ranges(self.file.len, self.len, file_offset, segment_offset, len).map_err(|why| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} of {len} bytes between offset {file_offset} of {} and offset \
                     {segment_offset} of the {}-byte segment: {why}",
                    dir.name(),
                    self.file.path.display(),
                    self.len
                ),
            )
        })?;
        // In range (checked), so within usize.
        Ok((self.base + segment_offset as usize) as *mut u8)
    }
}

impl Drop for SegmentFile {
    fn drop(&mut self) {
        self.file.unregister_memory();
    }
}

/// Whether a transfer of `len` bytes at `file_offset` of a `file_len`-byte file and
/// `segment_offset` of a `segment_len`-byte segment is aligned and inside both; why not.
fn check_ranges(
    file_len: u64,
    segment_len: u64,
    file_offset: u64,
    segment_offset: u64,
    len: u64,
) -> Result<(), String> {
    let align = ALIGN as u64;
    if file_offset % align != 0 || segment_offset % align != 0 || len % align != 0 {
        return Err(format!("offsets and length must be multiples of {ALIGN}"));
    }
    if file_offset
        .checked_add(len)
        .is_none_or(|end| end > file_len)
    {
        return Err("beyond the end of the file".into());
    }
    if segment_offset
        .checked_add(len)
        .is_none_or(|end| end > segment_len)
    {
        return Err("beyond the end of the segment".into());
    }
    Ok(())
}

/// Per item: the check's error, or the transfer's result (`done` holds one per `Ok`).
fn merge<T>(checked: Vec<io::Result<T>>, done: Vec<io::Result<()>>) -> Vec<io::Result<()>> {
    let mut done = done.into_iter();
    checked
        .into_iter()
        .map(|c| match c {
            Err(e) => Err(e),
            Ok(_) => done
                .next()
                .unwrap_or_else(|| Err(io::Error::other("kvxfer bug: a transfer lost its result"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use memmap2::MmapMut;
    use proptest::prelude::*;

    use super::*;

    const MIB: usize = 1 << 20;

    /// Where a test file lives.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Place {
        /// `std::env::temp_dir()` (often tmpfs).
        Tmp,
        /// Under `target/` (usually a real disk).
        Target,
        /// `/dev/shm` (tmpfs).
        Shm,
    }

    /// Test directories in use, by path: the last user removes its directory.
    static DIRS: Mutex<Option<HashMap<PathBuf, usize>>> = Mutex::new(None);
    static NAMES: AtomicUsize = AtomicUsize::new(0);

    /// A per-process test directory, removed when the last test using it is done.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(place: Place) -> Option<TestDir> {
            let pid = std::process::id();
            let dir = match place {
                Place::Tmp => std::env::temp_dir().join(format!("kvxfer-uring-file-test-{pid}")),
                Place::Target => Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target")
                    .join(format!("uring-file-test-{pid}")),
                Place::Shm => {
                    if !Path::new("/dev/shm").is_dir() {
                        println!("skipped: no /dev/shm");
                        return None;
                    }
                    PathBuf::from(format!("/dev/shm/kvxfer-uring-file-test-{pid}"))
                }
            };
            let mut dirs = DIRS.lock().unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            *dirs
                .get_or_insert_with(HashMap::new)
                .entry(dir.clone())
                .or_default() += 1;
            Some(TestDir(dir))
        }

        /// A path no other test uses.
        fn file(&self, name: &str) -> PathBuf {
            let n = NAMES.fetch_add(1, Ordering::Relaxed);
            self.0.join(format!("{name}-{n}"))
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let mut dirs = DIRS.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(users) = dirs.as_mut().and_then(|d| d.get_mut(&self.0)) {
                *users -= 1;
                if *users == 0 {
                    let _ = std::fs::remove_dir(&self.0);
                }
            }
        }
    }

    /// Creates a file, or `None` (printing why) when io_uring is unavailable here.
    fn create(path: &Path, len: u64, try_direct: bool) -> Option<UringFile> {
        match UringFile::create_with(path, len, try_direct) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                println!("skipped: {e}");
                None
            }
            Err(e) => panic!("cannot create {}: {e}", path.display()),
        }
    }

    /// Page-aligned anonymous memory of `len` bytes, zeroed.
    fn memory(len: usize) -> MmapMut {
        MmapMut::map_anon(len).unwrap()
    }

    /// Fills `buf` with a pattern that differs per `seed` and per 8-byte word.
    fn pattern(seed: u64, buf: &mut [u8]) {
        for (i, word) in buf.chunks_mut(8).enumerate() {
            let mut x = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64)
                .wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 31;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }

    /// Panics at the first differing byte (without printing megabytes).
    fn assert_same(got: &[u8], want: &[u8], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths differ");
        if got == want {
            return;
        }
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
                got[i], want[i]
            );
        }
    }

    fn invalid(result: &io::Result<()>) -> bool {
        matches!(result, Err(e) if e.kind() == io::ErrorKind::InvalidInput)
    }

    /// Writes 24 MiB (three and more requests of 8 MiB) from `mem[at..]` to file offset
    /// 4096, checks the file's bytes, reads them back into `mem[back..]` and compares.
    fn round_trip(file: &UringFile, mem: &mut MmapMut, at: usize, back: usize, seed: u64) {
        let len = 24 * MIB + 3 * ALIGN;
        pattern(seed, &mut mem[at..at + len]);
        mem[back..back + len].fill(0);
        let base = mem.as_mut_ptr();
        // SAFETY: `[at, at + len)` lies inside `mem`, alive and unborrowed during the call.
        unsafe { file.write_at(4096, base.wrapping_add(at), len) }.unwrap();
        let on_disk = std::fs::read(file.path()).unwrap();
        assert_eq!(on_disk.len() as u64, file.len());
        assert_same(
            &on_disk[4096..4096 + len],
            &mem[at..at + len],
            "file after write_at",
        );
        // SAFETY: `[back, back + len)` lies inside `mem` and does not overlap `[at, ..)`.
        unsafe { file.read_at(4096, base.wrapping_add(back), len) }.unwrap();
        assert_same(
            &mem[back..back + len],
            &mem[at..at + len],
            "memory after read_at",
        );
    }

    /// Round trips unregistered, registered in 1 GiB buffers and in 4 MiB buffers (so
    /// requests cross buffer boundaries), then unregistered again.
    fn exercise(file: &UringFile) {
        let mut mem = memory(80 * MIB);
        round_trip(file, &mut mem, 0, 32 * MIB, 1);
        assert!(!file.fixed_buffers());
        // SAFETY: `mem` outlives every use: unregistered below before it is dropped.
        unsafe { file.register_memory(mem.as_mut_ptr(), mem.len()) }.unwrap();
        if let Some(why) = file.why_not_fixed() {
            println!("fixed buffers not available here: {why}");
        }
        round_trip(file, &mut mem, 4096, 33 * MIB, 2);
        // SAFETY: as above.
        unsafe { file.register_pieces(mem.as_mut_ptr(), mem.len(), 4 * MIB) }.unwrap();
        round_trip(file, &mut mem, 3 * 4096, 40 * MIB - 4096, 3);
        file.unregister_memory();
        assert!(!file.fixed_buffers());
        assert_eq!(file.why_not_fixed(), None);
        round_trip(file, &mut mem, 8192, 32 * MIB + 8192, 4);
    }

    fn exercise_in(place: Place, try_direct: bool) {
        let Some(dir) = TestDir::new(place) else {
            return;
        };
        let path = dir.file("round-trip");
        let Some(file) = create(&path, 32 * MIB as u64, try_direct) else {
            return;
        };
        println!(
            "{place:?} ({}): O_DIRECT {}",
            dir.0.display(),
            match file.why_not_direct() {
                None => "works".to_owned(),
                Some(why) => format!("not used: {why}"),
            }
        );
        assert_eq!(file.direct(), file.why_not_direct().is_none());
        if !try_direct {
            assert!(!file.direct());
        }
        exercise(&file);
        drop(file);
        assert!(!path.exists(), "the file is deleted on drop");
    }

    #[test]
    fn round_trip_in_temp_dir() {
        exercise_in(Place::Tmp, true);
    }

    #[test]
    fn round_trip_under_target() {
        exercise_in(Place::Target, true);
    }

    #[test]
    fn round_trip_on_tmpfs() {
        exercise_in(Place::Shm, true);
    }

    #[test]
    fn round_trip_buffered() {
        exercise_in(Place::Target, false);
    }

    /// Items of many sizes (one over the request size, one empty) in one submission, laid
    /// out in the file in another order than in memory.
    fn batch(file: &UringFile, seed: u64) {
        let mut sizes: Vec<usize> = (0..150).map(|i| ALIGN * (1 + (i * 37) % 97)).collect();
        sizes.push(9 * MIB + ALIGN);
        sizes.push(0);
        sizes.push(3 * MIB);
        let total: usize = sizes.iter().sum();
        // Memory: items back to back; file: in reverse order, after a gap.
        let mut mem_at = Vec::new();
        let mut at = 0;
        for &s in &sizes {
            mem_at.push(at);
            at += s;
        }
        let mut file_at = vec![0u64; sizes.len()];
        let mut off = 16 * ALIGN as u64;
        for i in (0..sizes.len()).rev() {
            file_at[i] = off;
            off += sizes[i] as u64;
        }
        assert!(off <= file.len());
        let mut src = memory(total);
        let mut dst = memory(total);
        pattern(seed, &mut src);
        let s = src.as_mut_ptr();
        let d = dst.as_mut_ptr();
        let writes: Vec<(u64, *const u8, usize)> = (0..sizes.len())
            .map(|i| (file_at[i], s.wrapping_add(mem_at[i]).cast_const(), sizes[i]))
            .collect();
        // SAFETY: every item lies inside `src`, alive during the call.
        let results = unsafe { file.write_many(&writes) };
        assert_eq!(results.len(), sizes.len());
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let on_disk = std::fs::read(file.path()).unwrap();
        for i in 0..sizes.len() {
            let f = file_at[i] as usize;
            assert_same(
                &on_disk[f..f + sizes[i]],
                &src[mem_at[i]..mem_at[i] + sizes[i]],
                &format!("file bytes of item {i}"),
            );
        }
        let reads: Vec<(u64, *mut u8, usize)> = (0..sizes.len())
            .map(|i| (file_at[i], d.wrapping_add(mem_at[i]), sizes[i]))
            .collect();
        // SAFETY: every item lies inside `dst`, alive and unborrowed, items disjoint.
        let results = unsafe { file.read_many(&reads) };
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_same(&dst, &src, "memory after read_many");
    }

    #[test]
    fn many_items_in_one_submission() {
        let Some(dir) = TestDir::new(Place::Target) else {
            return;
        };
        let Some(file) = create(&dir.file("batch"), 64 * MIB as u64, true) else {
            return;
        };
        batch(&file, 10);
        let mut mem = memory(64 * MIB);
        // SAFETY: `mem` stays mapped until after `unregister_memory` below.
        unsafe { file.register_pieces(mem.as_mut_ptr(), mem.len(), 4 * MIB) }.unwrap();
        // The batch's memory is outside the registered range: plain requests still work.
        batch(&file, 11);
        file.unregister_memory();
        drop(mem);
    }

    #[test]
    fn bad_requests_are_refused_and_touch_nothing() {
        // Buffered too: there the kernel would accept misaligned requests.
        refuse_bad_requests(true);
        refuse_bad_requests(false);
    }

    fn refuse_bad_requests(try_direct: bool) {
        let Some(dir) = TestDir::new(Place::Target) else {
            return;
        };
        let len = 16 * ALIGN;
        let Some(file) = create(&dir.file("refuse"), len as u64, try_direct) else {
            return;
        };
        let mut mem = memory(2 * len);
        pattern(20, &mut mem[..len]);
        let p = mem.as_mut_ptr();
        // SAFETY: inside `mem`.
        unsafe { file.write_at(0, p, len) }.unwrap();
        let before = std::fs::read(file.path()).unwrap();
        pattern(21, &mut mem[..len]);
        let q = p.wrapping_add(len); // the second half of `mem`: zeros
        let bad_at = |b: *mut u8| -> Vec<(u64, *mut u8, usize)> {
            vec![
                (1, b, ALIGN),                                  // offset not aligned
                (0, b, 100),                                    // length not aligned
                (0, b.wrapping_add(512), ALIGN),                // memory not aligned
                (len as u64, b, ALIGN),                         // starts at the end
                (len as u64 - ALIGN as u64, b, 2 * ALIGN),      // ends past the end
                (u64::MAX - 4095, b, ALIGN),                    // offset + length overflows
                (0, std::ptr::null_mut(), ALIGN),               // null memory
                (0, (usize::MAX - 4095) as *mut u8, 2 * ALIGN), // memory wraps around
            ]
        };
        let bad = bad_at(p);
        for (&(offset, ptr, n), &(_, into, _)) in bad.iter().zip(&bad_at(q)) {
            // SAFETY: refused before any I/O (and otherwise inside `mem`).
            let w = unsafe { file.write_at(offset, ptr, n) };
            assert!(invalid(&w), "write ({offset}, {ptr:p}, {n}): {w:?}");
            // SAFETY: as above (reads would land in the zeroed second half of `mem`).
            let r = unsafe { file.read_at(offset, into, n) };
            assert!(invalid(&r), "read ({offset}, {into:p}, {n}): {r:?}");
        }
        assert_same(
            &std::fs::read(file.path()).unwrap(),
            &before,
            "file after refusals",
        );
        assert!(
            mem[len..].iter().all(|&b| b == 0),
            "memory after refused reads"
        );
        // A batch mixing good and bad items: the good ones are done, the bad ones refused.
        let mut items: Vec<(u64, *const u8, usize)> = bad
            .iter()
            .map(|&(o, ptr, n)| (o, ptr.cast_const(), n))
            .collect();
        items.insert(3, (ALIGN as u64, p.wrapping_add(ALIGN).cast_const(), ALIGN));
        items.push((
            8 * ALIGN as u64,
            p.wrapping_add(8 * ALIGN).cast_const(),
            2 * ALIGN,
        ));
        // SAFETY: the valid items lie inside `mem`.
        let results = unsafe { file.write_many(&items) };
        let mut want = before.clone();
        want[ALIGN..2 * ALIGN].copy_from_slice(&mem[ALIGN..2 * ALIGN]);
        want[8 * ALIGN..10 * ALIGN].copy_from_slice(&mem[8 * ALIGN..10 * ALIGN]);
        for (i, r) in results.iter().enumerate() {
            if i == 3 || i == items.len() - 1 {
                assert!(r.is_ok(), "item {i}: {r:?}");
            } else {
                assert!(invalid(r), "item {i}: {r:?}");
            }
        }
        assert_same(
            &std::fs::read(file.path()).unwrap(),
            &want,
            "file after the batch",
        );
    }

    #[test]
    fn a_read_of_zero_bytes_is_an_error() {
        let Some(dir) = TestDir::new(Place::Target) else {
            return;
        };
        let Some(file) = create(&dir.file("eof"), 16 * ALIGN as u64, true) else {
            return;
        };
        // Someone truncates the file behind our back.
        OpenOptions::new()
            .write(true)
            .open(file.path())
            .unwrap()
            .set_len(2 * ALIGN as u64)
            .unwrap();
        let mut mem = memory(4 * ALIGN);
        // SAFETY: inside `mem`.
        let r = unsafe { file.read_at(8 * ALIGN as u64, mem.as_mut_ptr(), 2 * ALIGN) };
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{r:?}"
        );
        // A read that straddles the new end gets the bytes that exist, then fails.
        // SAFETY: inside `mem`.
        let r = unsafe { file.read_at(0, mem.as_mut_ptr(), 4 * ALIGN) };
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{r:?}"
        );
        // SAFETY: inside `mem`.
        unsafe { file.read_at(0, mem.as_mut_ptr(), 2 * ALIGN) }.unwrap();
    }

    #[test]
    fn threads_share_one_file() {
        let Some(dir) = TestDir::new(Place::Target) else {
            return;
        };
        let Some(file) = create(&dir.file("threads"), 8 * MIB as u64, true) else {
            return;
        };
        let file = Arc::new(file);
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let file = Arc::clone(&file);
                std::thread::spawn(move || {
                    let len = MIB;
                    let mut src = memory(len);
                    let mut dst = memory(len);
                    for round in 0..10 {
                        pattern(t * 100 + round, &mut src);
                        // SAFETY: inside `src` / `dst`, alive during the calls; each thread
                        // has its own file range.
                        unsafe { file.write_at(t * len as u64, src.as_ptr(), len) }.unwrap();
                        // SAFETY: as above.
                        unsafe { file.read_at(t * len as u64, dst.as_mut_ptr(), len) }.unwrap();
                        assert_same(&dst, &src, &format!("thread {t} round {round}"));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn create_checks_and_cleans_up() {
        let Some(dir) = TestDir::new(Place::Target) else {
            return;
        };
        let path = dir.file("create");
        for len in [0, 4095, 4097] {
            match UringFile::create(&path, len) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    println!("skipped: {e}");
                    return;
                }
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{len}: {e}"),
                Ok(_) => panic!("a {len}-byte file was accepted"),
            }
            assert!(!path.exists());
        }
        let missing = dir.0.join("no-such-dir").join("file");
        match UringFile::create(&missing, 4096) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => return,
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}"),
            Ok(_) => panic!("created a file in a missing directory"),
        }
        // An existing file is truncated and preallocated: it reads as zeros.
        std::fs::write(&path, vec![0xAB; 3 * ALIGN]).unwrap();
        let Some(file) = create(&path, 8 * ALIGN as u64, true) else {
            return;
        };
        assert_eq!(file.len(), 8 * ALIGN as u64);
        assert!(!file.is_empty());
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 8 * ALIGN);
        assert!(on_disk.iter().all(|&b| b == 0));
        assert!(format!("{file:?}").contains("UringFile"));
        // Registration arguments are checked.
        let mut mem = memory(ALIGN);
        // SAFETY: refused before anything is registered.
        let r = unsafe { file.register_memory(std::ptr::null_mut(), ALIGN) };
        assert!(invalid(&r), "{r:?}");
        // SAFETY: as above.
        let r = unsafe { file.register_memory(mem.as_mut_ptr(), 0) };
        assert!(invalid(&r), "{r:?}");
        assert!(!file.fixed_buffers());
        drop(file);
        assert!(!path.exists(), "the file is deleted on drop");
    }

    fn whole(m: &SharedMapping) -> Option<&SharedMapping> {
        Some(m)
    }

    fn nothing(_: &SharedMapping) -> Option<&SharedMapping> {
        None
    }

    #[test]
    fn segment_file_over_a_shared_mapping() {
        let Some(dir) = TestDir::new(Place::Target) else {
            return;
        };
        let Some(file) = create(&dir.file("segment"), 32 * MIB as u64, true) else {
            return;
        };
        let seg_len = 20 * MIB;
        let segment = Arc::new(SharedMapping::create("uring-file-test", seg_len).unwrap());
        let sf = SegmentFile::over_mapping(file, Arc::clone(&segment), whole).unwrap();
        assert_eq!(sf.segment_len(), seg_len as u64);
        if let Some(why) = sf.file().why_not_fixed() {
            println!("memfd segment not registered: {why}");
        }
        let mut want = vec![0u8; seg_len];
        pattern(30, &mut want);
        assert!(segment.write_at(0, &want));
        // Demote: a big object (over the request size), small ones, one empty.
        let items = [
            (0u64, 0u64, 9 * MIB as u64 + 4096),
            (10 * MIB as u64, 12 * MIB as u64, 4096),
            (11 * MIB as u64, 20 * MIB as u64, 3 * MIB as u64),
            (19 * MIB as u64, 31 * MIB as u64, 0),
        ];
        let results = sf.write_many_from_segment(&items);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        sf.write_from_segment(14 * MIB as u64, 24 * MIB as u64, MIB as u64)
            .unwrap();
        assert!(segment.fill(0, seg_len, 0));
        let back: Vec<(u64, u64, u64)> = items.iter().map(|&(s, f, l)| (f, s, l)).collect();
        let results = sf.read_many_into_segment(&back);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        sf.read_into_segment(24 * MIB as u64, 14 * MIB as u64, MIB as u64)
            .unwrap();
        let mut got = vec![0u8; seg_len];
        assert!(segment.read_at(0, &mut got));
        for &(s, _, l) in items.iter().chain([&(14 * MIB as u64, 0, MIB as u64)]) {
            let (s, l) = (s as usize, l as usize);
            assert_same(&got[s..s + l], &want[s..s + l], "promoted bytes");
        }
        // Overlapping reads into the segment: the later one is refused, the other done.
        let results = sf.read_many_into_segment(&[
            (0, 0, 2 * ALIGN as u64),
            (0, 8 * ALIGN as u64, ALIGN as u64),
            (0, ALIGN as u64, ALIGN as u64),
            (0, 4 * ALIGN as u64, 8 * ALIGN as u64),
        ]);
        assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
        assert!(invalid(&results[2]) && invalid(&results[3]), "{results:?}");
        drop(sf);
        assert_eq!(Arc::strong_count(&segment), 1, "the owner is released");

        let Some(file) = create(&dir.file("segment-none"), 4096, true) else {
            return;
        };
        let r = SegmentFile::over_mapping(file, segment, nothing);
        assert!(matches!(&r, Err(e) if e.kind() == io::ErrorKind::InvalidInput));
    }

    /// Whether a transfer should be accepted, computed without the code under test.
    fn expect_ok(file_len: u64, seg_len: u64, fo: u64, so: u64, len: u64) -> bool {
        let a = ALIGN as u128;
        let (fo, so, len) = (fo as u128, so as u128, len as u128);
        fo % a == 0
            && so % a == 0
            && len % a == 0
            && fo + len <= file_len as u128
            && so + len <= seg_len as u128
    }

    fn offset() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0..20u64).prop_map(|k| k * ALIGN as u64),
            0..100_000u64,
            any::<u64>(),
            (0..4u64).prop_map(|k| u64::MAX - k * ALIGN as u64 - (ALIGN as u64 - 1)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Transfers of a segment file are accepted iff aligned and inside both the file and
        /// the segment; refused ones change neither; accepted ones move exactly their bytes.
        #[test]
        fn segment_bounds(ops in proptest::collection::vec(
            (any::<bool>(), offset(), offset(), offset()), 1..12,
        )) {
            const FILE: usize = 16 * ALIGN;
            const SEG: usize = 12 * ALIGN;
            let Some(dir) = TestDir::new(Place::Target) else { return Ok(()) };
            let Some(file) = create(&dir.file("bounds"), FILE as u64, true) else {
                return Ok(());
            };
            let mut seg = memory(SEG);
            let mut seg_model = vec![0u8; SEG];
            pattern(40, &mut seg_model);
            seg.copy_from_slice(&seg_model);
            let mut file_model = vec![0u8; FILE];
            // SAFETY: `seg` outlives `sf` (dropped at the end of this block, before `seg`),
            // and no reference into it is held during a transfer.
            let sf = unsafe { SegmentFile::new(file, seg.as_mut_ptr(), SEG) }.unwrap();
            for (write, fo, so, len) in ops {
                let want = expect_ok(FILE as u64, SEG as u64, fo, so, len);
                prop_assert_eq!(check_ranges(FILE as u64, SEG as u64, fo, so, len).is_ok(), want);
                let r = if write {
                    sf.write_from_segment(so, fo, len)
                } else {
                    sf.read_into_segment(fo, so, len)
                };
                if want {
                    prop_assert!(r.is_ok(), "{:?}", r);
                    let (fo, so, len) = (fo as usize, so as usize, len as usize);
                    if write {
                        file_model[fo..fo + len].copy_from_slice(&seg_model[so..so + len]);
                    } else {
                        seg_model[so..so + len].copy_from_slice(&file_model[fo..fo + len]);
                    }
                } else {
                    prop_assert!(invalid(&r), "{:?}", r);
                }
                prop_assert!(std::fs::read(sf.file().path()).unwrap() == file_model);
                prop_assert!(seg[..] == seg_model[..]);
            }
            drop(sf);
        }
    }
}
