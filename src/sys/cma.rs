//! Cross-memory attach: copying between this process and another one on the same host with
//! `process_vm_writev` / `process_vm_readv`, one kernel copy and no shared mapping. The
//! caller needs ptrace access to the other process (same uid and a permissive
//! `kernel.yama.ptrace_scope`, or `CAP_SYS_PTRACE`); otherwise the calls fail with `EPERM`.

use std::io;
use std::ptr;

/// One piece of a transfer: `len` bytes at `local` in this process and at `remote` in the
/// other process.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    /// Address in this process.
    pub local: u64,
    /// Address in the other process.
    pub remote: u64,
    /// Bytes to copy.
    pub len: usize,
}

/// iovecs per side per system call: well under the kernel's limit (`UIO_MAXIOV`, 1024),
/// small enough to live on the stack (2 × 4 KiB).
const BATCH: usize = 256;

const _: () = assert!(BATCH <= libc::UIO_MAXIOV as usize);

/// Bytes asked for per system call. The kernel silently caps one call at about 2 GiB
/// (`MAX_RW_COUNT`); staying under it keeps every short count meaningful.
const MAX_CALL_BYTES: usize = 1 << 30;

/// Copies every piece from this process into process `pid` (`process_vm_writev`).
///
/// Pieces go in calls of up to 256 iovecs a side. A call that stops short (it reached a
/// remote page that is not mapped or not writable) is continued from where it stopped, so
/// the error is reported by the next call: `EFAULT` for a bad remote (or local) address,
/// `EPERM` when not allowed to access `pid`, `ESRCH` when `pid` does not exist. All bytes
/// before the failing one have been copied. `Ok(())` only when every byte was copied.
///
/// # Safety
///
/// Every `local` range must be valid for reads of `len` bytes for the duration of the call.
pub unsafe fn write_to(pid: i32, pieces: &[Piece]) -> io::Result<()> {
    transfer(pieces, &mut |local, remote| {
        // SAFETY: the iovec arrays are valid for their lengths; the local ranges are valid
        // for reads by this function's contract; remote ranges are checked by the kernel.
        let n = unsafe {
            libc::process_vm_writev(
                pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// Copies every piece from process `pid` into this process (`process_vm_readv`), with the
/// same batching, continuation and errors as [`write_to`].
///
/// # Safety
///
/// Every `local` range must be valid for writes of `len` bytes for the duration of the
/// call, and not accessed through any Rust reference meanwhile.
pub unsafe fn read_from(pid: i32, pieces: &[Piece]) -> io::Result<()> {
    transfer(pieces, &mut |local, remote| {
        // SAFETY: the iovec arrays are valid for their lengths; the local ranges are valid
        // for writes and unaliased by this function's contract; remote ranges are checked
        // by the kernel.
        let n = unsafe {
            libc::process_vm_readv(
                pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// The system call: (local iovecs, remote iovecs) → bytes moved.
type Call<'a> = dyn FnMut(&[libc::iovec], &[libc::iovec]) -> io::Result<usize> + 'a;

fn iovec(addr: u64, offset: usize, len: usize) -> libc::iovec {
    libc::iovec {
        // Only an address handed to the kernel: wrapping keeps a bogus one bogus (EFAULT).
        iov_base: (addr as usize).wrapping_add(offset) as *mut libc::c_void,
        iov_len: len,
    }
}

/// Drives `call` over `pieces`: fills up to `BATCH` iovec pairs from the current position
/// (which may be inside a piece), calls, and advances by what the call moved.
fn transfer(pieces: &[Piece], call: &mut Call<'_>) -> io::Result<()> {
    const EMPTY: libc::iovec = libc::iovec {
        iov_base: ptr::null_mut(),
        iov_len: 0,
    };
    let mut local = [EMPTY; BATCH];
    let mut remote = [EMPTY; BATCH];
    // Position: the first piece not yet fully moved, and how much of it was.
    let mut piece = 0;
    let mut done = 0usize;
    loop {
        while piece < pieces.len() && done >= pieces[piece].len {
            piece += 1;
            done = 0;
        }
        if piece == pieces.len() {
            return Ok(());
        }
        let mut n = 0;
        let mut asked = 0usize;
        let (mut p, mut off) = (piece, done);
        while n < BATCH && p < pieces.len() && asked < MAX_CALL_BYTES {
            let pc = pieces[p];
            let left = pc.len - off;
            let len = left.min(MAX_CALL_BYTES - asked);
            if len > 0 {
                local[n] = iovec(pc.local, off, len);
                remote[n] = iovec(pc.remote, off, len);
                n += 1;
                asked += len;
            }
            if len < left {
                break;
            }
            p += 1;
            off = 0;
        }
        let moved = match call(&local[..n], &remote[..n]) {
            Ok(moved) => moved,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if moved == 0 {
            return Err(io::Error::other("cross-memory copy moved no bytes"));
        }
        if moved > asked {
            return Err(io::Error::other(format!(
                "cross-memory copy reported {moved} bytes of {asked} asked"
            )));
        }
        let mut moved = moved;
        while moved > 0 {
            let left = pieces[piece].len - done;
            if moved >= left {
                moved -= left;
                piece += 1;
                done = 0;
            } else {
                done += moved;
                moved = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::page_size;

    fn me() -> i32 {
        std::process::id() as i32
    }

    /// Source bytes, a zeroed destination, and `count` pieces of varied lengths (0 to 40
    /// bytes) scattered so that destination order is reversed.
    /// (source offset, destination offset, length).
    type Span = (usize, usize, usize);

    fn scattered(count: usize) -> (Vec<u8>, Vec<u8>, Vec<Span>) {
        let lens: Vec<usize> = (0..count).map(|i| (i * 7919) % 41).collect();
        let total: usize = lens.iter().sum();
        let src: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8 + 1).collect();
        let dst = vec![0u8; total];
        let mut spans = Vec::new();
        let mut s = 0;
        let mut d = total;
        for len in lens {
            d -= len;
            spans.push((s, d, len));
            s += len;
        }
        (src, dst, spans)
    }

    fn expected(src: &[u8], spans: &[Span]) -> Vec<u8> {
        let mut out = vec![0u8; src.len()];
        for &(s, d, len) in spans {
            out[d..d + len].copy_from_slice(&src[s..s + len]);
        }
        out
    }

    #[test]
    fn write_to_self_with_many_pieces() {
        let (src, mut dst, spans) = scattered(3000);
        let pieces: Vec<Piece> = spans
            .iter()
            .map(|&(s, d, len)| Piece {
                local: src[s..].as_ptr() as u64,
                remote: dst[d..].as_mut_ptr() as u64,
                len,
            })
            .collect();
        // SAFETY: every local range lies inside `src`, alive and unmodified for the call.
        unsafe { write_to(me(), &pieces) }.unwrap();
        assert_eq!(dst, expected(&src, &spans));
    }

    #[test]
    fn read_from_self_with_many_pieces() {
        let (src, mut dst, spans) = scattered(2500);
        // Local is the destination when reading.
        let pieces: Vec<Piece> = spans
            .iter()
            .map(|&(s, d, len)| Piece {
                local: dst[d..].as_mut_ptr() as u64,
                remote: src[s..].as_ptr() as u64,
                len,
            })
            .collect();
        // SAFETY: every local range lies inside `dst`, which no reference touches during
        // the call.
        unsafe { read_from(me(), &pieces) }.unwrap();
        assert_eq!(dst, expected(&src, &spans));
    }

    #[test]
    fn short_calls_are_continued_mid_piece() {
        let (src, mut dst, spans) = scattered(2000);
        let pieces: Vec<Piece> = spans
            .iter()
            .map(|&(s, d, len)| Piece {
                local: src[s..].as_ptr() as u64,
                remote: dst[d..].as_mut_ptr() as u64,
                len,
            })
            .collect();
        // A real process_vm_writev that moves at most 97 bytes per call, cutting pieces.
        let mut calls = 0;
        let mut short = |local: &[libc::iovec], remote: &[libc::iovec]| {
            calls += 1;
            let mut budget = 97usize;
            let mut l = Vec::new();
            let mut r = Vec::new();
            for (a, b) in local.iter().zip(remote) {
                assert_eq!(a.iov_len, b.iov_len);
                let len = a.iov_len.min(budget);
                l.push(libc::iovec { iov_len: len, ..*a });
                r.push(libc::iovec { iov_len: len, ..*b });
                budget -= len;
                if budget == 0 {
                    break;
                }
            }
            // SAFETY: the local ranges lie inside `src`, the remote ones inside `dst`.
            let n = unsafe {
                libc::process_vm_writev(
                    me(),
                    l.as_ptr(),
                    l.len() as libc::c_ulong,
                    r.as_ptr(),
                    r.len() as libc::c_ulong,
                    0,
                )
            };
            assert!(n >= 0, "{}", io::Error::last_os_error());
            Ok(n as usize)
        };
        transfer(&pieces, &mut short).unwrap();
        let total: usize = spans.iter().map(|s| s.2).sum();
        assert_eq!(calls, total.div_ceil(97));
        assert_eq!(dst, expected(&src, &spans));
    }

    #[test]
    fn a_call_moving_nothing_is_an_error() {
        let data = [1u8; 8];
        let piece = Piece {
            local: data.as_ptr() as u64,
            remote: 0,
            len: 8,
        };
        let err = transfer(&[piece], &mut |_, _| Ok(0)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
        // No pieces, or only empty ones: no call at all.
        let mut never =
            |_: &[libc::iovec], _: &[libc::iovec]| -> io::Result<usize> { panic!("called") };
        transfer(&[], &mut never).unwrap();
        transfer(&[Piece { len: 0, ..piece }; 3], &mut never).unwrap();
    }

    #[test]
    fn a_bad_remote_address_is_efault_after_the_earlier_pieces() {
        let src = vec![9u8; 300];
        let mut dst = vec![0u8; 300];
        let pieces = [
            Piece {
                local: src.as_ptr() as u64,
                remote: dst.as_mut_ptr() as u64,
                len: 100,
            },
            Piece {
                local: src[100..].as_ptr() as u64,
                remote: dst[100..].as_mut_ptr() as u64,
                len: 100,
            },
            Piece {
                local: src[200..].as_ptr() as u64,
                remote: 8,
                len: 50,
            },
            Piece {
                local: src[250..].as_ptr() as u64,
                remote: dst[250..].as_mut_ptr() as u64,
                len: 50,
            },
        ];
        // SAFETY: every local range lies inside `src`.
        let err = unsafe { write_to(me(), &pieces) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        assert_eq!(&dst[..200], &[9u8; 200][..]);
        assert_eq!(&dst[200..], &[0u8; 100][..]);
    }

    #[test]
    fn an_unmapped_remote_page_stops_mid_piece_with_efault() {
        let page = page_size();
        // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        // SAFETY: the second page is ours (just mapped) and nothing refers to it.
        assert_eq!(unsafe { libc::munmap(base.add(page).cast(), page) }, 0);
        let src = [5u8; 200];
        // 100 bytes at the end of the mapped page, 100 in the unmapped one.
        // SAFETY: page - 100 is inside the first (mapped) page.
        let remote = unsafe { base.add(page - 100) } as u64;
        let piece = Piece {
            local: src.as_ptr() as u64,
            remote,
            len: 200,
        };
        // SAFETY: the local range is `src`.
        let err = unsafe { write_to(me(), &[piece]) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        let mut got = [0u8; 100];
        // SAFETY: the first page is still mapped; reading its last 100 bytes.
        unsafe { ptr::copy_nonoverlapping(base.add(page - 100), got.as_mut_ptr(), 100) };
        assert_eq!(got, [5u8; 100]);
        // Reading from the unmapped page fails the same way.
        let mut back = vec![0u8; 200];
        let piece = Piece {
            local: back.as_mut_ptr() as u64,
            remote,
            len: 200,
        };
        // SAFETY: the local range is `back`, untouched during the call.
        let err = unsafe { read_from(me(), &[piece]) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        assert_eq!(&back[..100], &[5u8; 100][..]);
        assert_eq!(&back[100..], &[0u8; 100][..]);
        // SAFETY: unmapping the first page we mapped above; nothing refers to it any more.
        assert_eq!(unsafe { libc::munmap(base.cast(), page) }, 0);
    }

    #[test]
    fn a_missing_process_is_esrch() {
        let src = [1u8; 16];
        let mut dst = [0u8; 16];
        let piece = Piece {
            local: src.as_ptr() as u64,
            remote: dst.as_mut_ptr() as u64,
            len: 16,
        };
        // SAFETY: the local range is `src`.
        let err = unsafe { write_to(i32::MAX, &[piece]) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
        let piece = Piece {
            local: dst.as_mut_ptr() as u64,
            remote: src.as_ptr() as u64,
            len: 16,
        };
        // SAFETY: the local range is `dst`, untouched during the call.
        let err = unsafe { read_from(i32::MAX, &[piece]) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
        assert_eq!(dst, [0u8; 16]);
    }
}
