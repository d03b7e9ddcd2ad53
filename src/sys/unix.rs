//! Unix `SOCK_SEQPACKET` sockets in the Linux abstract namespace, with file descriptors
//! passed alongside messages (`SCM_RIGHTS`).
//!
//! Sequenced packets keep message boundaries (one `send` is one `recv`) and are reliable and
//! ordered, so a control protocol needs no framing. Abstract names (a leading NUL byte in
//! `sun_path`) leave no file behind and vanish when the listener is closed.
//!
//! An empty message without descriptors cannot be told apart from end of stream, so
//! [`SeqPacket::send`] refuses to send one.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::{Duration, Instant};

/// The most file descriptors one message may carry.
pub const MAX_FDS: usize = 4;

/// The longest abstract name: `sun_path` is 108 bytes, one of which is the leading NUL.
const MAX_NAME: usize = 107;

/// The backlog of a listener (capped by the kernel at `net.core.somaxconn`).
const BACKLOG: libc::c_int = 128;

/// Bytes of control buffer: room for the header and up to 12 descriptors, more than any
/// message we build or accept.
const CMSG_BUF_LEN: usize = 64;

/// Control buffer space for exactly `MAX_FDS` descriptors: what `recv` offers the kernel, so
/// that a peer sending more gets its extra descriptors dropped (and `MSG_CTRUNC` set).
// SAFETY: CMSG_SPACE is pure arithmetic on its argument.
const RECV_CMSG_SPACE: usize = unsafe { libc::CMSG_SPACE((MAX_FDS * FD_SIZE) as u32) } as usize;

const FD_SIZE: usize = mem::size_of::<libc::c_int>();

/// A control message buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

const _: () = assert!(RECV_CMSG_SPACE <= CMSG_BUF_LEN);
const _: () = assert!(mem::align_of::<CmsgBuf>() >= mem::align_of::<libc::cmsghdr>());

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The socket address for abstract name `name` and its exact length.
fn abstract_addr(name: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    if name.is_empty() {
        return Err(invalid("empty abstract socket name"));
    }
    if name.len() > MAX_NAME {
        return Err(invalid("abstract socket name longer than 107 bytes"));
    }
    // SAFETY: sockaddr_un is plain old data, for which all zero bytes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // sun_path[0] stays 0: that is what makes the name abstract.
    for (dst, &src) in addr.sun_path[1..].iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    let len = mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len();
    Ok((addr, len as libc::socklen_t))
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket() just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we borrow; no pointers involved.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: F_SETFL with an integer argument on a descriptor we borrow.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// Sets `SO_SNDTIMEO`; `None` (or a zero duration) means no timeout.
fn set_send_timeout(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    let tv = match timeout {
        None => libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        Some(d) => {
            let mut tv = libc::timeval {
                tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_usec: d.subsec_micros() as libc::suseconds_t,
            };
            if tv.tv_sec == 0 && tv.tv_usec == 0 {
                // Zero would mean "forever"; the caller checks for zero before calling.
                tv.tv_usec = 1;
            }
            tv
        }
    };
    // SAFETY: `tv` is a valid timeval and the length passed is its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A poll(2) timeout in milliseconds for `remaining`, rounded up so that a wait never ends
/// before its deadline.
fn poll_ms(remaining: Duration) -> libc::c_int {
    remaining
        .as_nanos()
        .div_ceil(1_000_000)
        .min(libc::c_int::MAX as u128) as libc::c_int
}

/// A listening `SOCK_SEQPACKET` socket bound to an abstract name. Closed (and the name
/// released) on drop.
#[derive(Debug)]
pub struct SeqPacketListener {
    fd: OwnedFd,
    name: Vec<u8>,
}

impl SeqPacketListener {
    /// Creates a socket, binds it to the abstract name `name` (given without the leading
    /// NUL byte) and listens with a backlog of 128. Fails with `InvalidInput` when `name`
    /// is empty or longer than 107 bytes, and with `AddrInUse` when the name is taken.
    pub fn bind_abstract(name: &[u8]) -> io::Result<Self> {
        let (addr, len) = abstract_addr(name)?;
        let fd = new_socket()?;
        // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        // SAFETY: plain syscall on a descriptor we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
        Ok(SeqPacketListener {
            fd,
            name: name.to_vec(),
        })
    }

    /// The abstract name this listener is bound to (without the leading NUL byte).
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Accepts one connection (close-on-exec, blocking whatever this listener's mode).
    /// Blocks until a peer connects unless [`set_nonblocking`](Self::set_nonblocking) was
    /// turned on, in which case it fails with `WouldBlock` when none is pending.
    pub fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            // SAFETY: null address pointers are allowed: we do not ask for the peer address.
            let rc = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if rc >= 0 {
                // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(rc) };
                return Ok(SeqPacket { fd });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Turns `O_NONBLOCK` on or off for [`accept`](Self::accept).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        set_nonblocking(self.fd.as_fd(), on)
    }
}

impl AsRawFd for SeqPacketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for SeqPacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One message received by [`SeqPacket::recv`].
#[derive(Debug)]
pub struct Received {
    /// Bytes written into the caller's buffer. Zero with no `fds` means the peer closed.
    pub len: usize,
    /// Descriptors that came with the message (close-on-exec), closed when dropped.
    pub fds: Vec<OwnedFd>,
    /// The message was longer than the buffer; the kernel discarded the rest.
    pub truncated: bool,
    /// The peer sent more than [`MAX_FDS`] descriptors; the kernel closed the extra ones.
    pub fds_truncated: bool,
}

/// Credentials of the process at the other end of a socket, as of when it connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// A connected `SOCK_SEQPACKET` socket. Closed on drop.
#[derive(Debug)]
pub struct SeqPacket {
    fd: OwnedFd,
}

impl SeqPacket {
    /// Connects to the abstract name `name` (without the leading NUL byte).
    ///
    /// A Unix connect completes or fails at once (`ConnectionRefused` when nobody listens),
    /// except when the listener's backlog is full: then it waits, up to `timeout`, for the
    /// listener to accept, and fails with `TimedOut`. (The wait uses `SO_SNDTIMEO`, with
    /// which the kernel sleeps on the listener's queue; poll(2) cannot be used on an
    /// unconnected seqpacket socket, which always reports `POLLHUP`.) The socket is left
    /// blocking, with no send timeout.
    pub fn connect_abstract(name: &[u8], timeout: Duration) -> io::Result<SeqPacket> {
        let (addr, len) = abstract_addr(name)?;
        let fd = new_socket()?;
        let deadline = Instant::now().checked_add(timeout);
        let mut nonblocking = false;
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining == Some(Duration::ZERO) {
                // Last attempt: one that cannot wait.
                set_nonblocking(fd.as_fd(), true)?;
                nonblocking = true;
            } else {
                set_send_timeout(fd.as_fd(), remaining)?;
            }
            // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    len,
                )
            };
            if rc == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN | libc::EINPROGRESS) if nonblocking => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connect timed out: the listener's backlog stayed full",
                    ));
                }
                // SO_SNDTIMEO ran out: loop for the final non-blocking attempt.
                Some(libc::EAGAIN | libc::EINPROGRESS) => continue,
                _ => return Err(err),
            }
        }
        if nonblocking {
            set_nonblocking(fd.as_fd(), false)?;
        }
        set_send_timeout(fd.as_fd(), None)?;
        Ok(SeqPacket { fd })
    }

    /// A connected pair of sockets (close-on-exec), for tests and in-process use.
    pub fn pair() -> io::Result<(SeqPacket, SeqPacket)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: socketpair just returned these two descriptors; nothing else owns them.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SeqPacket { fd: a }, SeqPacket { fd: b }))
    }

    /// Sends one message: `bytes`, with `fds` attached (as one `SCM_RIGHTS` control
    /// message) when not empty. The message goes whole or not at all. Fails with
    /// `InvalidInput` for more than [`MAX_FDS`] descriptors or for an empty message without
    /// descriptors (which the peer would read as end of stream), `EMSGSIZE` when the
    /// message is larger than the socket buffer, `BrokenPipe` when the peer has closed (no
    /// `SIGPIPE` is raised), and `WouldBlock` when non-blocking and the buffer is full.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(invalid("more than MAX_FDS descriptors in one message"));
        }
        if bytes.is_empty() && fds.is_empty() {
            return Err(invalid(
                "empty message without descriptors (reads as end of stream)",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        self.send_raw(bytes, &raw)
    }

    /// `send` without the descriptor-count limit (up to what fits in `CmsgBuf`).
    fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut cbuf = CmsgBuf([0; CMSG_BUF_LEN]);
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: msghdr is plain old data, for which all zero bytes is a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = (fds.len() * FD_SIZE) as u32;
            // SAFETY: CMSG_SPACE / CMSG_LEN are pure arithmetic.
            let (space, cmsg_len) =
                unsafe { (libc::CMSG_SPACE(data_len), libc::CMSG_LEN(data_len)) };
            if space as usize > CMSG_BUF_LEN {
                return Err(invalid("too many descriptors for the control buffer"));
            }
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points to `space` zeroed bytes of a buffer aligned for
            // cmsghdr, so CMSG_FIRSTHDR returns its start (space >= sizeof(cmsghdr), hence
            // not null), and CMSG_DATA(cmsg) .. + data_len lies inside the buffer by the
            // definition of CMSG_SPACE. The descriptors are written unaligned.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                debug_assert!(!cmsg.is_null());
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = cmsg_len as _;
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for (i, &fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(fd);
                }
            }
        }
        loop {
            // SAFETY: `msg` points at `iov` (describing `bytes`, valid for reads) and at the
            // control buffer, all alive for the duration of the call.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n as usize != bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short send: {n} of {} bytes", bytes.len()),
                ));
            }
            return Ok(());
        }
    }

    /// Receives one message into `buf`, with any descriptors it carries (close-on-exec,
    /// owned by the result). `len == 0` with no descriptors means the peer closed. A message
    /// longer than `buf` is cut (`truncated`); more than [`MAX_FDS`] descriptors are cut
    /// (`fds_truncated`), the extra ones closed by the kernel. Control messages other than
    /// `SCM_RIGHTS` are ignored.
    ///
    /// With `timeout: Some(d)` it fails with `TimedOut` when no message (nor end of stream)
    /// arrives within `d`; with `None` it blocks (or fails with `WouldBlock` when the socket
    /// is non-blocking).
    pub fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Received> {
        // `Some(None)`: a timeout too long to represent, i.e. forever, still polled.
        let deadline = timeout.map(|d| Instant::now().checked_add(d));
        loop {
            let mut flags = libc::MSG_CMSG_CLOEXEC;
            if let Some(deadline) = deadline {
                let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                let revents = poll_readable(&[self.fd.as_raw_fd()], remaining)?;
                if revents[0] == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no message arrived before the timeout",
                    ));
                }
                // Another thread may take the message between poll and recvmsg: never
                // block past the deadline, poll again instead.
                flags |= libc::MSG_DONTWAIT;
            }
            match self.recv_once(buf, flags) {
                Ok(r) => return Ok(r),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && deadline.is_some() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn recv_once(&self, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
        let mut cbuf = CmsgBuf([0; CMSG_BUF_LEN]);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data, for which all zero bytes is a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = RECV_CMSG_SPACE as _;
        // SAFETY: `msg` points at `iov` (describing `buf`, valid for writes and not otherwise
        // borrowed during the call) and at `RECV_CMSG_SPACE` bytes of the control buffer.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, flags) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        // SAFETY: the kernel wrote msg_controllen (<= RECV_CMSG_SPACE) bytes of well-formed
        // control messages into our aligned buffer; CMSG_FIRSTHDR / CMSG_NXTHDR only return
        // headers lying wholly inside those bytes (or null). For SCM_RIGHTS, the data holds
        // (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors just installed in our table for
        // us alone, read unaligned and wrapped in OwnedFd at once.
        unsafe {
            let header = libc::CMSG_LEN(0) as usize;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                let c = &*cmsg;
                if c.cmsg_level == libc::SOL_SOCKET
                    && c.cmsg_type == libc::SCM_RIGHTS
                    && c.cmsg_len as usize >= header
                {
                    let count = (c.cmsg_len as usize - header) / FD_SIZE;
                    let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(Received {
            len: n as usize,
            fds,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        })
    }

    /// The pid, uid and gid of the process at the other end (`SO_PEERCRED`), as of when the
    /// connection (or pair) was made.
    pub fn peer_cred(&self) -> io::Result<PeerCred> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes and `len` is the size of `cred`.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        })?;
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }

    /// Turns `O_NONBLOCK` on or off: when on, `send` and `recv` (without a timeout) fail
    /// with `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        set_nonblocking(self.fd.as_fd(), on)
    }

    /// Shuts both directions down (`SHUT_RDWR`): a thread blocked in `recv` on this socket
    /// wakes up and reads end of stream, and the peer reads end of stream too.
    pub fn shutdown(&self) -> io::Result<()> {
        // SAFETY: plain syscall on a descriptor we own.
        cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) })?;
        Ok(())
    }
}

impl AsRawFd for SeqPacket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until at least one of `fds` is readable (or hung up, or in error), or `timeout`
/// passes (`None`: forever). Returns, for each descriptor in order, its `revents`
/// (`POLLIN`, `POLLHUP`, `POLLERR`, `POLLNVAL` bits); all zero means the timeout passed.
/// Interrupted waits are resumed with the time left.
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let deadline = timeout.and_then(|d| Instant::now().checked_add(d));
    loop {
        let ms = match deadline {
            Some(d) => poll_ms(d.saturating_duration_since(Instant::now())),
            None => -1,
        };
        // SAFETY: `pfds` holds `pfds.len()` initialised pollfd structures, valid for writes.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(pfds.iter().map(|p| p.revents).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shm::SharedMapping;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn unique_name(tag: &str) -> Vec<u8> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("kvxfer-test-{}-{n}-{tag}", std::process::id()).into_bytes()
    }

    fn identity(fd: BorrowedFd<'_>) -> (u64, u64) {
        let meta = File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .unwrap();
        (meta.dev(), meta.ino())
    }

    fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: F_GETFD on a descriptor we borrow; no pointers involved.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert!(flags >= 0);
        flags & libc::FD_CLOEXEC != 0
    }

    fn memfds(n: usize) -> Vec<SharedMapping> {
        (0..n)
            .map(|_| SharedMapping::create("unix-test", 4096).unwrap())
            .collect()
    }

    #[test]
    fn round_trip_with_0_1_2_fds() {
        let (a, b) = SeqPacket::pair().unwrap();
        for n in 0..=2 {
            let files = memfds(n);
            let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.fd()).collect();
            let payload = format!("message with {n} fds");
            a.send(payload.as_bytes(), &fds).unwrap();
            let mut buf = [0u8; 256];
            let got = b.recv(&mut buf, Some(Duration::from_secs(5))).unwrap();
            assert_eq!(&buf[..got.len], payload.as_bytes());
            assert!(!got.truncated && !got.fds_truncated);
            assert_eq!(got.fds.len(), n);
            for (sent, received) in fds.iter().zip(&got.fds) {
                assert_eq!(identity(*sent), identity(received.as_fd()));
                assert_ne!(sent.as_raw_fd(), received.as_raw_fd());
                assert!(is_cloexec(received.as_fd()));
            }
        }
        // And the other direction.
        b.send(b"back", &[]).unwrap();
        let mut buf = [0u8; 8];
        let got = a.recv(&mut buf, None).unwrap();
        assert_eq!(&buf[..got.len], b"back");
    }

    #[test]
    fn empty_message_with_fds_is_delivered_but_empty_without_is_refused() {
        let (a, b) = SeqPacket::pair().unwrap();
        let files = memfds(1);
        a.send(&[], &[files[0].fd()]).unwrap();
        let got = b.recv(&mut [0u8; 8], Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got.len, 0);
        assert_eq!(got.fds.len(), 1);
        assert_eq!(identity(got.fds[0].as_fd()), identity(files[0].fd()));
        let err = a.send(&[], &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn more_than_max_fds_is_refused() {
        let (a, b) = SeqPacket::pair().unwrap();
        let files = memfds(MAX_FDS + 1);
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.fd()).collect();
        let err = a.send(b"x", &fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // Nothing was sent.
        let err = b.recv(&mut [0u8; 8], Some(Duration::ZERO)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Exactly MAX_FDS is fine.
        a.send(b"x", &fds[..MAX_FDS]).unwrap();
        let got = b.recv(&mut [0u8; 8], Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got.fds.len(), MAX_FDS);
        assert!(!got.fds_truncated);
    }

    #[test]
    fn a_peer_sending_too_many_fds_is_cut_to_max_fds() {
        let (a, b) = SeqPacket::pair().unwrap();
        let files = memfds(MAX_FDS + 2);
        let raw: Vec<RawFd> = files.iter().map(|f| f.fd().as_raw_fd()).collect();
        a.send_raw(b"many", &raw).unwrap();
        let mut buf = [0u8; 8];
        let got = b.recv(&mut buf, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(&buf[..got.len], b"many");
        assert!(got.fds_truncated);
        assert_eq!(got.fds.len(), MAX_FDS);
        for (f, received) in files.iter().zip(&got.fds) {
            assert_eq!(identity(f.fd()), identity(received.as_fd()));
        }
    }

    #[test]
    fn eof_after_the_peer_drops() {
        let (a, b) = SeqPacket::pair().unwrap();
        a.send(b"last words", &[]).unwrap();
        drop(a);
        let mut buf = [0u8; 32];
        let got = b.recv(&mut buf, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            &buf[..got.len],
            b"last words",
            "queued data comes before EOF"
        );
        for _ in 0..2 {
            let got = b.recv(&mut buf, Some(Duration::from_secs(5))).unwrap();
            assert_eq!(got.len, 0);
            assert!(got.fds.is_empty());
        }
        let err = b.send(b"anyone?", &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_long_message_is_truncated_and_the_next_is_whole() {
        let (a, b) = SeqPacket::pair().unwrap();
        let long: Vec<u8> = (0..100u8).collect();
        a.send(&long, &[]).unwrap();
        a.send(b"next", &[]).unwrap();
        let mut small = [0u8; 10];
        let got = b.recv(&mut small, None).unwrap();
        assert_eq!(got.len, 10);
        assert!(got.truncated);
        assert_eq!(&small[..], &long[..10]);
        let mut buf = [0u8; 100];
        let got = b.recv(&mut buf, None).unwrap();
        assert!(!got.truncated);
        assert_eq!(&buf[..got.len], b"next");
    }

    #[test]
    fn recv_times_out() {
        let (a, _b) = SeqPacket::pair().unwrap();
        let start = Instant::now();
        let err = a
            .recv(&mut [0u8; 8], Some(Duration::from_millis(30)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(30));
        let err = a.recv(&mut [0u8; 8], Some(Duration::ZERO)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn nonblocking_recv_would_block() {
        let (a, b) = SeqPacket::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let err = a.recv(&mut [0u8; 8], None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        b.send(b"hi", &[]).unwrap();
        assert_eq!(a.recv(&mut [0u8; 8], None).unwrap().len, 2);
        a.set_nonblocking(false).unwrap();
        b.send(b"hey", &[]).unwrap();
        assert_eq!(a.recv(&mut [0u8; 8], None).unwrap().len, 3);
    }

    #[test]
    fn shutdown_wakes_a_blocked_recv() {
        let (a, b) = SeqPacket::pair().unwrap();
        let a = std::sync::Arc::new(a);
        let reader = {
            let a = a.clone();
            std::thread::spawn(move || a.recv(&mut [0u8; 8], None))
        };
        // Whether the reader is already blocked or not, it must read end of stream.
        a.shutdown().unwrap();
        let got = reader.join().unwrap().unwrap();
        assert_eq!(got.len, 0);
        assert!(got.fds.is_empty());
        // The peer sees end of stream too.
        assert_eq!(b.recv(&mut [0u8; 8], None).unwrap().len, 0);
    }

    #[test]
    fn connect_to_an_unused_name_is_refused() {
        let err = SeqPacket::connect_abstract(&unique_name("nobody"), Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn listener_accepts_and_peer_cred_is_ours() {
        let name = unique_name("accept");
        let listener = SeqPacketListener::bind_abstract(&name).unwrap();
        assert_eq!(listener.name(), &name[..]);
        let err = SeqPacketListener::bind_abstract(&name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let client = SeqPacket::connect_abstract(&name, Duration::from_secs(5)).unwrap();
        let server = listener.accept().unwrap();
        // SAFETY: getuid and getgid cannot fail and take no arguments.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let me = PeerCred {
            pid: std::process::id() as i32,
            uid,
            gid,
        };
        assert_eq!(server.peer_cred().unwrap(), me);
        assert_eq!(client.peer_cred().unwrap(), me);
        let files = memfds(1);
        client.send(b"ping", &[files[0].fd()]).unwrap();
        let mut buf = [0u8; 8];
        let got = server.recv(&mut buf, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(&buf[..got.len], b"ping");
        assert_eq!(identity(got.fds[0].as_fd()), identity(files[0].fd()));
        server.send(b"pong", &[]).unwrap();
        let got = client.recv(&mut buf, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(&buf[..got.len], b"pong");
        // The connected socket was left blocking.
        // SAFETY: F_GETFL on a descriptor we borrow; no pointers involved.
        let flags = unsafe { libc::fcntl(client.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn nonblocking_accept_would_block() {
        let listener = SeqPacketListener::bind_abstract(&unique_name("nb")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let err = listener.accept().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let _client = SeqPacket::connect_abstract(listener.name(), Duration::from_secs(5)).unwrap();
        let server = listener.accept().unwrap();
        // SAFETY: F_GETFL on a descriptor we borrow; no pointers involved.
        let flags = unsafe { libc::fcntl(server.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "accepted sockets start blocking"
        );
    }

    #[test]
    fn connect_times_out_while_the_backlog_is_full_and_resumes_after_accept() {
        let listener = SeqPacketListener::bind_abstract(&unique_name("backlog")).unwrap();
        let mut pending = Vec::new();
        let start = Instant::now();
        let full = loop {
            assert!(pending.len() < 5000, "the backlog never filled up");
            match SeqPacket::connect_abstract(listener.name(), Duration::from_millis(20)) {
                Ok(s) => pending.push(s),
                Err(e) => break e,
            }
        };
        assert_eq!(full.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(pending.len() >= BACKLOG as usize);
        // A connect waiting on the full backlog completes once a slot frees up.
        let name = listener.name().to_vec();
        let waiter =
            std::thread::spawn(move || SeqPacket::connect_abstract(&name, Duration::from_secs(30)));
        let _first = listener.accept().unwrap();
        let start = Instant::now();
        waiter.join().unwrap().unwrap();
        assert!(start.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn bad_names_are_refused() {
        let long = vec![b'x'; MAX_NAME + 1];
        let err = SeqPacketListener::bind_abstract(&long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = SeqPacket::connect_abstract(&long, Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = SeqPacketListener::bind_abstract(b"").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // The longest name is fine, and binary bytes are allowed.
        let mut longest = unique_name("longest");
        longest.push(0);
        longest.resize(MAX_NAME, b'y');
        let listener = SeqPacketListener::bind_abstract(&longest).unwrap();
        let _c = SeqPacket::connect_abstract(&longest, Duration::from_secs(5)).unwrap();
        listener.accept().unwrap();
        // A prefix of it is a different name.
        let err = SeqPacket::connect_abstract(&longest[..MAX_NAME - 1], Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn poll_reports_pollin_after_a_send_and_pollhup_after_the_peer_drops() {
        let (a, b) = SeqPacket::pair().unwrap();
        let (c, _d) = SeqPacket::pair().unwrap();
        let fds = [a.as_raw_fd(), c.as_raw_fd()];
        assert_eq!(
            poll_readable(&fds, Some(Duration::ZERO)).unwrap(),
            vec![0, 0]
        );
        b.send(b"x", &[]).unwrap();
        let revents = poll_readable(&fds, Some(Duration::from_secs(5))).unwrap();
        assert_ne!(revents[0] & libc::POLLIN, 0);
        assert_eq!(revents[0] & libc::POLLHUP, 0);
        assert_eq!(revents[1], 0);
        a.recv(&mut [0u8; 8], None).unwrap();
        assert_eq!(
            poll_readable(&fds, Some(Duration::ZERO)).unwrap(),
            vec![0, 0]
        );
        drop(b);
        let revents = poll_readable(&fds, None).unwrap();
        assert_ne!(revents[0] & libc::POLLHUP, 0);
        assert_eq!(revents[1], 0);
    }
}
