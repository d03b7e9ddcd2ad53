//! The I/O threads: a fixed pool, each with its own io_uring, serving every data-lane
//! connection (client lanes and served lanes) assigned to it. Each connection keeps at
//! most one receive and one send in flight; a send carries many frames (headers,
//! entries, and payload iovecs pointing straight at registered memory).

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::lane::{ClientLane, LaneShared};
use super::serve::ServerConn;
use crate::memory::Registry;

/// How long an I/O thread that just served small request/reply traffic polls its
/// completion queue before sleeping in the kernel. Waking a sleeping thread costs about 25 us on a loopback round trip here
/// (a blocking ping-pong takes 55 us, a polling one 8 us), while the next completion of a
/// busy connection usually comes sooner. The poll yields the CPU between checks, so other
/// threads (the peer's, on a small machine) still run; an idle thread sleeps after this.
const SPIN: Duration = Duration::from_micros(100);
/// How often connections with requests in flight are checked for stopped batches.
const TICK: Duration = Duration::from_millis(20);
const RING_ENTRIES: u32 = 256;
const EVENTFD_TOKEN: u64 = u64::MAX;
pub(super) const OP_RECV: u64 = 1;
pub(super) const OP_SEND: u64 = 2;

/// Work handed to an I/O thread.
pub(super) enum Command {
    /// Serve an accepted data-lane connection.
    Serve(TcpStream, Arc<Registry>),
    /// Drive a client lane.
    Lane(Arc<LaneShared>, TcpStream),
    /// A lane at this slot has new work.
    Kick(usize),
}

/// One I/O thread as seen from outside: its inbox and the eventfd that wakes it.
#[derive(Debug)]
pub(super) struct IoThread {
    inbox: Mutex<Vec<Command>>,
    wake_pending: AtomicBool,
    /// Set while the thread polls (see [`SPIN`]): it will see `wake_pending` without an
    /// eventfd write.
    polling: AtomicBool,
    /// Set while the thread sleeps without a timeout (nothing in flight that needs ticks);
    /// a submitting thread that sends directly wakes it so the request gets watched.
    untimed: AtomicBool,
    eventfd: OwnedFd,
    stop: AtomicBool,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Serve(..) => "Serve",
            Command::Lane(..) => "Lane",
            Command::Kick(_) => "Kick",
        })
    }
}

impl IoThread {
    /// Queues `command` and wakes the thread (one eventfd write per burst of commands).
    pub(super) fn send(&self, command: Command) {
        self.inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(command);
        self.wake();
    }

    /// Wakes the thread if it sleeps without a timeout (so it re-evaluates its ticks).
    pub(super) fn wake_if_untimed(&self) {
        if self.untimed.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    fn wake(&self) {
        // SeqCst pairs with the poller's `polling` store and `wake_pending` load: either it
        // is seen polling (and will see `wake_pending`), or the eventfd is written.
        if !self.wake_pending.swap(true, Ordering::SeqCst) && !self.polling.load(Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local array to an eventfd this struct owns.
            let n = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
            if n != 8 {
                log::error!(
                    "kvxfer: cannot wake an I/O thread: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// The pool of I/O threads.
#[derive(Debug)]
pub(crate) struct IoPool {
    threads: Vec<Arc<IoThread>>,
    joins: Mutex<Vec<JoinHandle<()>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl IoPool {
    /// Starts `threads` I/O threads, each with its own ring.
    pub(crate) fn start(threads: usize) -> io::Result<IoPool> {
        let mut handles = Vec::new();
        let mut joins = Vec::new();
        for i in 0..threads.max(1) {
            let ring = IoUring::new(RING_ENTRIES)?;
            // SAFETY: eventfd takes no pointers; the result is checked before use.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
            let thread = Arc::new(IoThread {
                inbox: Mutex::new(Vec::new()),
                wake_pending: AtomicBool::new(false),
                polling: AtomicBool::new(false),
                untimed: AtomicBool::new(false),
                eventfd,
                stop: AtomicBool::new(false),
            });
            let me = Arc::clone(&thread);
            let join = std::thread::Builder::new()
                .name(format!("kvx-io-{i}"))
                .spawn(move || EventLoop::new(ring, me).run())?;
            handles.push(thread);
            joins.push(join);
        }
        Ok(IoPool {
            threads: handles,
            joins: Mutex::new(joins),
            next: Default::default(),
        })
    }

    /// The next thread, round robin.
    pub(super) fn pick(&self) -> Arc<IoThread> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        Arc::clone(&self.threads[i])
    }

    /// Number of threads.
    pub(crate) fn len(&self) -> usize {
        self.threads.len()
    }

    /// Closes every connection (failing what is in flight once the kernel is done with
    /// it) and joins the threads. Later calls do nothing.
    pub(crate) fn shutdown(&self) {
        for t in &self.threads {
            t.stop.store(true, Ordering::Release);
            t.wake_pending.store(false, Ordering::Release);
            t.wake();
        }
        let joins = std::mem::take(&mut *self.joins.lock().unwrap_or_else(PoisonError::into_inner));
        for j in joins {
            if j.join().is_err() {
                log::error!("kvxfer bug: an I/O thread panicked");
            }
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A connection served by an I/O thread.
pub(super) enum Conn {
    Lane(ClientLane),
    Serve(ServerConn),
}

/// What every connection kind does for the event loop.
pub(super) trait Driven {
    /// Queues whatever receive or send can start now.
    fn pump(&mut self, slot: usize, sq: &mut Submit<'_>);
    /// A receive or send finished with `res` (bytes, or a negative errno).
    fn on_complete(&mut self, op: u64, res: i32);
    /// Periodic check while requests are in flight; may start closing.
    fn tick(&mut self, now: Instant);
    /// Whether this connection wants ticks.
    fn busy(&self) -> bool;
    /// Whether its traffic is small request/reply exchanges, whose next event is worth
    /// polling for (see [`SPIN`]); streams of large requests are not.
    fn latency_sensitive(&self) -> bool;
    /// Receives and sends in flight in the kernel.
    fn ops_in_flight(&self) -> usize;
    /// Starts closing (shutdown of the socket wakes the operations in flight).
    fn close(&mut self, reason: String);
    /// Whether it is closing.
    fn closing(&self) -> bool;
    /// Called once nothing is in flight any more after `close`: fail and release all.
    fn finish(&mut self);
}

impl Conn {
    fn driven(&mut self) -> &mut dyn Driven {
        match self {
            Conn::Lane(l) => l,
            Conn::Serve(s) => s,
        }
    }
}

/// Pushes submission entries, submitting first when the queue is full.
pub(super) struct Submit<'a> {
    ring: &'a mut IoUring,
    /// Completions reaped early to make room (see `push`), handled in the next round.
    reaped: &'a mut Vec<(u64, i32)>,
}

impl Submit<'_> {
    /// Queues `entry`.
    ///
    /// # Safety
    /// Every buffer, iovec and msghdr the entry points to must stay valid and unmoved
    /// until its completion is reaped.
    pub(super) unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: the caller keeps the entry's buffers alive until its completion.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            match self.ring.submit() {
                Ok(_) => {}
                // The completion queue is full: move completions aside so the kernel can
                // post more, else this loop would never end.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self
                    .reaped
                    .extend(self.ring.completion().map(|c| (c.user_data(), c.result()))),
                Err(e) => log::error!("kvxfer: io_uring submit failed: {e}"),
            }
        }
    }
}

struct EventLoop {
    ring: IoUring,
    me: Arc<IoThread>,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    dirty: VecDeque<usize>,
    /// Leaked on purpose: the kernel may finish the last eventfd read while tearing the
    /// ring down after this loop is gone, so the 8 bytes must never be freed.
    eventfd_buf: &'static mut [u8; 8],
    eventfd_armed: bool,
    last_tick: Instant,
    /// Whether the last round reaped completions (then `wait` polls briefly first).
    active: bool,
    /// Completions reaped while submitting, not yet handled.
    reaped: Vec<(u64, i32)>,
}

impl EventLoop {
    fn new(ring: IoUring, me: Arc<IoThread>) -> Self {
        EventLoop {
            ring,
            me,
            conns: Vec::new(),
            free: Vec::new(),
            dirty: VecDeque::new(),
            eventfd_buf: Box::leak(Box::new([0; 8])),
            eventfd_armed: false,
            last_tick: Instant::now(),
            active: false,
            reaped: Vec::new(),
        }
    }

    fn run(mut self) {
        loop {
            let stopping = self.me.stop.load(Ordering::Acquire);
            self.take_commands(stopping);
            if stopping {
                let open: Vec<usize> = (0..self.conns.len()).collect();
                for slot in open {
                    self.close(slot, "the engine is shutting down".into());
                }
                if self.conns.iter().all(Option::is_none) {
                    return;
                }
            }
            self.arm_eventfd();
            while let Some(slot) = self.dirty.pop_front() {
                if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                    let mut sq = Submit {
                        ring: &mut self.ring,
                        reaped: &mut self.reaped,
                    };
                    conn.driven().pump(slot, &mut sq);
                }
                self.reap_if_done(slot);
            }
            if stopping && self.conns.iter().all(Option::is_none) {
                return;
            }
            self.wait();
            self.completions();
            self.tick();
        }
    }

    fn take_commands(&mut self, stopping: bool) {
        self.me.wake_pending.store(false, Ordering::Release);
        let commands =
            std::mem::take(&mut *self.me.inbox.lock().unwrap_or_else(PoisonError::into_inner));
        for command in commands {
            match command {
                Command::Serve(stream, registry) => {
                    if !stopping {
                        self.add(Conn::Serve(ServerConn::new(stream, registry)));
                    }
                }
                Command::Lane(shared, stream) => {
                    let slot = self.add_slot();
                    shared.attach(slot);
                    self.conns[slot] = Some(Box::new(Conn::Lane(ClientLane::new(shared, stream))));
                    self.dirty.push_back(slot);
                    if stopping {
                        self.close(slot, "the engine is shutting down".into());
                    }
                }
                Command::Kick(slot) => self.dirty.push_back(slot),
            }
        }
    }

    fn add_slot(&mut self) -> usize {
        match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        }
    }

    fn add(&mut self, conn: Conn) {
        let slot = self.add_slot();
        self.conns[slot] = Some(Box::new(conn));
        self.dirty.push_back(slot);
    }

    fn close(&mut self, slot: usize, reason: String) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            let d = conn.driven();
            if !d.closing() {
                d.close(reason);
            }
            self.dirty.push_back(slot);
        }
    }

    /// Frees a closing connection's slot once the kernel holds none of its buffers.
    fn reap_if_done(&mut self, slot: usize) {
        let done = self
            .conns
            .get_mut(slot)
            .and_then(Option::as_mut)
            .is_some_and(|c| {
                let d = c.driven();
                d.closing() && d.ops_in_flight() == 0
            });
        if done {
            if let Some(mut conn) = self.conns[slot].take() {
                conn.driven().finish();
            }
            self.free.push(slot);
        }
    }

    fn arm_eventfd(&mut self) {
        if self.eventfd_armed {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.me.eventfd.as_raw_fd()),
            self.eventfd_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        let mut sq = Submit {
            ring: &mut self.ring,
            reaped: &mut self.reaped,
        };
        // SAFETY: the 8-byte buffer is leaked, so it outlives any completion.
        unsafe { sq.push(&entry) };
        self.eventfd_armed = true;
    }

    fn wait(&mut self) {
        if !self.reaped.is_empty() {
            // Completions moved aside while submitting are waiting to be handled.
            if let Err(e) = self.ring.submit() {
                log::error!("kvxfer: io_uring submit failed: {e}");
            }
            return;
        }
        if self.active && self.poll_briefly() {
            return;
        }
        let busy = |conns: &Vec<Option<Box<Conn>>>| {
            conns.iter().flatten().any(|c| match &**c {
                Conn::Lane(l) => l.busy(),
                Conn::Serve(s) => s.busy(),
            })
        };
        let mut timed = busy(&self.conns);
        if !timed {
            // Announce the untimed sleep, then look again: a direct send either sees the
            // flag (and wakes us) or is seen here (SeqCst on both sides).
            self.me.untimed.store(true, Ordering::SeqCst);
            timed = busy(&self.conns);
        }
        let result = if timed {
            let ts = types::Timespec::from(TICK);
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        } else {
            self.ring.submit_and_wait(1)
        };
        self.me.untimed.store(false, Ordering::SeqCst);
        match result {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => log::error!("kvxfer: io_uring wait failed: {e}"),
        }
    }

    /// Submits what is queued, then polls for up to [`SPIN`] for a completion or a
    /// command; true if one came.
    fn poll_briefly(&mut self) -> bool {
        if let Err(e) = self.ring.submit() {
            log::error!("kvxfer: io_uring submit failed: {e}");
        }
        let start = Instant::now();
        self.me.polling.store(true, Ordering::SeqCst);
        let came = loop {
            if !self.ring.completion().is_empty() || self.me.wake_pending.load(Ordering::SeqCst) {
                break true;
            }
            if start.elapsed() >= SPIN {
                break false;
            }
            std::thread::yield_now();
        };
        self.me.polling.store(false, Ordering::SeqCst);
        // A command posted while the flag was still set wrote no eventfd: look once more.
        came || self.me.wake_pending.load(Ordering::SeqCst)
    }

    fn completions(&mut self) {
        let mut done = std::mem::take(&mut self.reaped);
        done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.active = false;
        for (token, res) in done {
            if token == EVENTFD_TOKEN {
                self.eventfd_armed = false;
                continue;
            }
            let slot = (token >> 8) as usize;
            let op = token & 0xff;
            if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                let d = conn.driven();
                d.on_complete(op, res);
                self.active |= d.latency_sensitive();
                self.dirty.push_back(slot);
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_tick) < TICK {
            return;
        }
        self.last_tick = now;
        for slot in 0..self.conns.len() {
            if let Some(conn) = self.conns[slot].as_mut() {
                let d = conn.driven();
                if d.busy() {
                    d.tick(now);
                    self.dirty.push_back(slot);
                }
            }
        }
    }
}

/// A scatter/gather list for one receive or send, advanced over partial transfers.
pub(super) struct IoVecs {
    iov: Vec<libc::iovec>,
    first: usize,
    msg: libc::msghdr,
    left: usize,
}

impl IoVecs {
    pub(super) fn new() -> Self {
        IoVecs {
            iov: Vec::new(),
            first: 0,
            // SAFETY: an all-zero msghdr is valid (null name, no iovecs, no control data).
            msg: unsafe { std::mem::zeroed() },
            left: 0,
        }
    }

    /// Starts a new list (only while no operation uses this one).
    pub(super) fn clear(&mut self) {
        self.iov.clear();
        self.first = 0;
        self.left = 0;
    }

    /// Appends `len` bytes at `addr`, merging with the previous piece when contiguous.
    pub(super) fn push(&mut self, addr: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.iov.last_mut() {
            if (last.iov_base as usize).wrapping_add(last.iov_len) == addr as usize {
                last.iov_len += len;
                self.left += len;
                return;
            }
        }
        self.iov.push(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        });
        self.left += len;
    }

    /// Starts a new list from `pieces`: `(true, offset, len)` is a range of `base` (the
    /// owner's frame bytes, complete and no longer growing), `(false, addr, len)` memory
    /// at `addr`.
    pub(super) fn set_pieces(&mut self, base: *const u8, pieces: &[(bool, usize, usize)]) {
        self.clear();
        for &(own, at, len) in pieces {
            let ptr = if own {
                base.wrapping_add(at)
            } else {
                at as *const u8
            };
            self.push(ptr, len);
        }
    }

    /// Bytes not yet moved.
    pub(super) fn left(&self) -> usize {
        self.left
    }

    /// Accounts `n` bytes moved; returns whether everything has been.
    pub(super) fn advance(&mut self, mut n: usize) -> bool {
        self.left = self.left.saturating_sub(n);
        while n > 0 && self.first < self.iov.len() {
            let v = &mut self.iov[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.first += 1;
            } else {
                v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
        self.left == 0
    }

    fn prepare(&mut self) -> *mut libc::msghdr {
        let rest = &mut self.iov[self.first..];
        // Linux caps one call at UIO_MAXIOV (1024) iovecs; the rest goes next time.
        self.msg.msg_iov = rest.as_mut_ptr();
        self.msg.msg_iovlen = rest.len().min(1024) as _;
        &mut self.msg
    }

    /// A RECVMSG entry filling the remaining pieces.
    pub(super) fn recv(&mut self, fd: i32, token: u64) -> squeue::Entry {
        self.recv_some(fd, token, true)
    }

    /// A RECVMSG entry that completes once all pieces are filled (`all`) or as soon as
    /// any bytes arrived.
    pub(super) fn recv_some(&mut self, fd: i32, token: u64, all: bool) -> squeue::Entry {
        let msg = self.prepare();
        let flags = if all { libc::MSG_WAITALL as u32 } else { 0 };
        opcode::RecvMsg::new(types::Fd(fd), msg)
            .flags(flags)
            .build()
            .user_data(token)
    }

    /// A SENDMSG entry sending the remaining pieces.
    pub(super) fn send(&mut self, fd: i32, token: u64) -> squeue::Entry {
        let msg = self.prepare();
        opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(token)
    }
}

/// The token of operation `op` of the connection in `slot`.
pub(super) fn token(slot: usize, op: u64) -> u64 {
    ((slot as u64) << 8) | op
}

/// What the result of a receive or send means for its connection.
pub(super) enum Outcome {
    /// This many bytes moved.
    Moved(usize),
    /// Nothing moved and nothing is wrong (interrupted, try again).
    Retry,
    /// The connection is finished: closed by the peer, or an error.
    Broken(String),
}

/// Classifies a completion's result.
pub(super) fn outcome(res: i32) -> Outcome {
    match res {
        n if n > 0 => Outcome::Moved(n as usize),
        n if n == -libc::EAGAIN || n == -libc::EINTR => Outcome::Retry,
        n => Outcome::Broken(describe(n)),
    }
}

/// Text for a failed receive or send.
pub(super) fn describe(res: i32) -> String {
    if res == 0 {
        "the peer closed the connection".into()
    } else {
        format!("{}", io::Error::from_raw_os_error(-res))
    }
}
