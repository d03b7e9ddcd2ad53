//! A client lane: one connection to a peer's data listener. It claims slice ranges from
//! the batches posted to it, sends them as requests (many in flight, many per send), and
//! completes each range when its response has arrived and its send has finished.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::io::{
    outcome, token, Command, Driven, IoThread, IoVecs, Outcome, Submit, OP_RECV, OP_SEND,
};
use super::wire::{Code, Entry, Header, Kind, ENTRY_LEN, HEADER_LEN, MAX_ENTRIES};
use crate::transport::{OpKind, Slice, SliceSource, TransportError, TransportKind};

/// Bytes of requests a lane keeps in flight, at most (one group may exceed it).
const WINDOW_BYTES: u64 = 16 << 20;
/// Requests a lane keeps in flight, at most.
const WINDOW_GROUPS: usize = 64;
/// Payload bytes per request, at most (unless one slice is larger).
const GROUP_BYTES: u64 = 4 << 20;
/// Bytes one send carries, at most (unless one request is larger).
const SEND_BYTES: usize = 8 << 20;
/// Bytes in flight at or below which a lane's traffic counts as request/reply exchanges
/// worth polling for (see `io::SPIN`).
pub(super) const SMALL_TRAFFIC: u64 = 256 << 10;
/// How long a request of a stopped batch may stay unanswered before the lane is dropped
/// (which is what frees the batch's buffers when the peer hangs).
const ABORT_GRACE: Duration = Duration::from_millis(300);

/// What the peer's lanes share: how many are alive, for failing work nobody can move.
#[derive(Debug)]
pub(crate) struct PeerLanes {
    pub(super) name: String,
    pub(super) alive: AtomicUsize,
    pub(super) last_error: Mutex<Option<String>>,
}

#[derive(Default)]
struct Queue {
    works: VecDeque<Arc<dyn SliceSource>>,
    dead: bool,
}

/// The half of a lane that other threads see.
pub(crate) struct LaneShared {
    queue: Mutex<Queue>,
    /// Whoever holds this may write to the socket: the I/O thread for a send in flight, or
    /// a submitting thread sending a small batch itself ([`LaneShared::try_direct`]).
    /// Taken for good by `finish`, so no thread writes after the socket is closed.
    send_lock: AtomicBool,
    /// The I/O thread found the send lock taken and wants a kick when it is free.
    send_waiting: AtomicBool,
    /// A direct send failed part-way: the stream is out of step and must be closed.
    broken: AtomicBool,
    /// Requests sent directly, in wire order, not yet taken into the I/O thread's list.
    presend: Mutex<VecDeque<Group>>,
    /// Length of `presend`, readable without its lock (the I/O thread ticks while > 0).
    presend_len: AtomicUsize,
    /// Id of the request a submitting thread is sending now (0: none); its reply is not
    /// acted on until the send has returned, whatever a peer answers early.
    direct_sending: std::sync::atomic::AtomicU64,
    next_id: std::sync::atomic::AtomicU64,
    fd: std::sync::atomic::AtomicI32,
    slot: AtomicUsize,
    close_requested: AtomicBool,
    thread: Arc<IoThread>,
    peer: Arc<PeerLanes>,
}

impl std::fmt::Debug for LaneShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneShared")
            .field("slot", &self.slot)
            .field("peer", &self.peer.name)
            .finish()
    }
}

impl LaneShared {
    pub(super) fn new(thread: Arc<IoThread>, peer: Arc<PeerLanes>) -> Self {
        LaneShared {
            queue: Mutex::new(Queue::default()),
            send_lock: AtomicBool::new(false),
            send_waiting: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            presend: Mutex::new(VecDeque::new()),
            presend_len: AtomicUsize::new(0),
            direct_sending: std::sync::atomic::AtomicU64::new(0),
            next_id: std::sync::atomic::AtomicU64::new(1),
            fd: std::sync::atomic::AtomicI32::new(-1),
            slot: AtomicUsize::new(usize::MAX),
            close_requested: AtomicBool::new(false),
            thread,
            peer,
        }
    }

    /// Hands the connection to its I/O thread.
    pub(super) fn start(self: &Arc<Self>, stream: TcpStream) {
        self.fd.store(stream.as_raw_fd(), Ordering::Release);
        self.thread.send(Command::Lane(Arc::clone(self), stream));
    }

    fn try_lock_send(&self) -> bool {
        self.send_lock
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn unlock_send(&self) {
        // SeqCst with the waiter's store-then-retry, so one of the two always sees the other.
        self.send_lock.store(false, Ordering::SeqCst);
        if self.send_waiting.swap(false, Ordering::SeqCst) {
            self.kick();
        }
    }

    /// Sends a small batch from the submitting thread itself when the lane is idle: one
    /// `sendmsg` instead of a hand-off to the I/O thread, which only handles the reply.
    /// Returns `Some(all)` if it sent (all: nothing of `work` is left to claim), `None` if
    /// the lane was busy (nothing was claimed).
    pub(super) fn try_direct(&self, work: &Arc<dyn SliceSource>) -> Option<bool> {
        if self.broken.load(Ordering::Acquire) || !self.try_lock_send() {
            return None;
        }
        let idle = {
            let q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            !q.dead && q.works.is_empty()
        };
        if !idle {
            self.unlock_send();
            return None;
        }
        let slices = work.slices();
        if slices.windows(2).any(|w| w[0].kind != w[1].kind) {
            // One request has one direction; mixed batches go through the I/O thread.
            self.unlock_send();
            return None;
        }
        let Some(range) = work.claim() else {
            self.unlock_send();
            return Some(true);
        };
        let all = range.end == work.slices().len();
        let slices = &work.slices()[range.clone()];
        let kind = slices[0].kind;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut head = Vec::with_capacity(HEADER_LEN + slices.len() * ENTRY_LEN);
        encode_request(kind, id, slices, &mut head);
        let mut iov = Vec::with_capacity(1 + slices.len());
        iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        let mut bytes = 0u64;
        for s in slices {
            bytes += u64::from(s.len);
            if kind == OpKind::Write {
                iov.push(libc::iovec {
                    iov_base: s.local as *mut libc::c_void,
                    iov_len: s.len as usize,
                });
            }
        }
        // Listed before its bytes hit the wire, so the reply always finds it.
        self.direct_sending.store(id, Ordering::SeqCst);
        self.presend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Group {
                work: Arc::clone(work),
                range,
                kind,
                id,
                bytes,
                sent: true,
                result: None,
                started: Instant::now(),
            });
        self.presend_len.fetch_add(1, Ordering::SeqCst);
        let sent = send_all(self.fd.load(Ordering::Acquire), &mut iov);
        self.direct_sending.store(0, Ordering::SeqCst);
        if let Err(e) = sent {
            log::debug!("kvxfer: direct send to {} failed: {e}", self.peer.name);
            self.broken.store(true, Ordering::Release);
            self.send_waiting.store(true, Ordering::SeqCst);
        }
        self.unlock_send();
        // A sleeping I/O thread must start ticking: the peer may never answer.
        self.thread.wake_if_untimed();
        Some(all)
    }

    /// Called by the I/O thread once the lane has a slot.
    pub(super) fn attach(&self, slot: usize) {
        self.slot.store(slot, Ordering::SeqCst);
    }

    /// Queues `work` on this lane; false if the lane is dead.
    pub(super) fn post(&self, work: &Arc<dyn SliceSource>) -> bool {
        {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if q.dead {
                return false;
            }
            q.works.push_back(Arc::clone(work));
        }
        self.kick();
        true
    }

    /// Asks the I/O thread to close the lane.
    pub(super) fn request_close(&self) {
        self.close_requested.store(true, Ordering::Release);
        self.kick();
    }

    fn kick(&self) {
        // A lane not attached yet is pumped as soon as it is (SeqCst orders this load
        // after the queue push against the attach store).
        let slot = self.slot.load(Ordering::SeqCst);
        if slot != usize::MAX {
            self.thread.send(Command::Kick(slot));
        }
    }

    fn front(&self) -> Option<Arc<dyn SliceSource>> {
        let q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.works.front().cloned()
    }

    fn pop_if_front(&self, work: &Arc<dyn SliceSource>) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.works.front().is_some_and(|w| Arc::ptr_eq(w, work)) {
            q.works.pop_front();
        }
    }
}

/// Claims every remaining slice of `work` and fails it: nobody is left to move it.
pub(super) fn fail_all(work: &dyn SliceSource, reason: &str) {
    while let Some(range) = work.claim() {
        work.complete(range, Err(tcp_error(reason.to_string())));
    }
}

/// Appends the header and entries of a request for `slices` (all of direction `kind`).
fn encode_request(kind: OpKind, id: u64, slices: &[Slice], out: &mut Vec<u8>) {
    let kind = match kind {
        OpKind::Write => Kind::Write,
        OpKind::Read => Kind::Read,
    };
    let header = Header {
        kind,
        count: slices.len() as u32,
        status: 0,
        id,
    };
    out.extend_from_slice(&header.encode());
    for s in slices {
        Entry {
            addr: s.remote,
            len: s.len,
        }
        .encode_into(out);
    }
}

/// Writes every byte of `iov` to `fd` with blocking `sendmsg` calls (the lane sockets
/// have a send timeout, so a peer that stops reading cannot hold the caller for long).
fn send_all(fd: i32, iov: &mut [libc::iovec]) -> std::io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        let rest = &mut iov[first..];
        // SAFETY: an all-zero msghdr is valid; it then points at `rest`, live for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = rest.as_mut_ptr();
        msg.msg_iovlen = rest.len().min(1024) as _;
        // SAFETY: `fd` is the lane's socket, kept open while the send lock is held (the I/O
        // thread takes the lock for good before closing it); the iovecs point at the
        // caller's header bytes and at claimed slices' registered memory.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn tcp_error(reason: String) -> TransportError {
    TransportError {
        transport: TransportKind::Tcp,
        reason,
    }
}

struct Group {
    work: Arc<dyn SliceSource>,
    range: Range<usize>,
    kind: OpKind,
    id: u64,
    bytes: u64,
    sent: bool,
    result: Option<Result<(), String>>,
    started: Instant,
}

enum Rx {
    Header,
    Message(Header),
    Data,
}

/// The I/O thread's half of a lane.
pub(super) struct ClientLane {
    shared: Arc<LaneShared>,
    stream: TcpStream,
    fd: i32,
    inflight: VecDeque<Group>,
    /// Groups at the front of `inflight` that have their response.
    responded: usize,
    /// Groups at the front of `inflight` included in a send (finished or in flight).
    queued: usize,
    inflight_bytes: u64,
    send: IoVecs,
    send_bytes: Vec<u8>,
    /// Reused between sends: (own bytes?, offset or address, length).
    pieces: Vec<(bool, usize, usize)>,
    send_pending: bool,
    /// Groups (from the front) whose bytes are all in a finished send.
    sent: usize,
    /// `queued` when the send in flight was built.
    send_end: usize,
    recv: IoVecs,
    recv_pending: bool,
    rx: Rx,
    hdr: Box<[u8; HEADER_LEN]>,
    message: Vec<u8>,
    closing: Option<String>,
    shut: bool,
    /// Whether this thread holds the lane's send lock (from building a send until it
    /// has all gone out).
    holds_send_lock: bool,
}

impl ClientLane {
    pub(super) fn new(shared: Arc<LaneShared>, stream: TcpStream) -> Self {
        let fd = stream.as_raw_fd();
        ClientLane {
            shared,
            stream,
            fd,
            inflight: VecDeque::new(),
            responded: 0,
            queued: 0,
            inflight_bytes: 0,
            send: IoVecs::new(),
            send_bytes: Vec::new(),
            pieces: Vec::new(),
            send_pending: false,
            sent: 0,
            send_end: 0,
            recv: IoVecs::new(),
            recv_pending: false,
            rx: Rx::Header,
            hdr: Box::new([0; HEADER_LEN]),
            message: Vec::new(),
            closing: None,
            shut: false,
            holds_send_lock: false,
        }
    }

    /// Claims new groups while the window has room.
    fn fill(&mut self) {
        while self.inflight.len() < WINDOW_GROUPS && self.inflight_bytes < WINDOW_BYTES {
            let Some(work) = self.shared.front() else {
                return;
            };
            match work.claim() {
                Some(range) => self.add_groups(&work, range),
                None => self.shared.pop_if_front(&work),
            }
        }
    }

    /// Cuts a claimed range into requests within the entry and byte limits.
    fn add_groups(&mut self, work: &Arc<dyn SliceSource>, range: Range<usize>) {
        let slices = work.slices();
        let mut start = range.start;
        // Claims come in chunks sized for copy threads; consecutive chunks of one batch
        // join the last request not yet sent, so small ops travel as few frames.
        let unsent = self.queued < self.inflight.len();
        if let Some(last) = self.inflight.back_mut().filter(|_| unsent) {
            if Arc::ptr_eq(&last.work, work) && last.range.end == start {
                while start < range.end
                    && last.range.len() < MAX_ENTRIES as usize
                    && slices[start].kind == last.kind
                    && last.bytes + u64::from(slices[start].len) <= GROUP_BYTES
                {
                    last.bytes += u64::from(slices[start].len);
                    self.inflight_bytes += u64::from(slices[start].len);
                    last.range.end += 1;
                    start += 1;
                }
            }
        }
        while start < range.end {
            let kind = slices[start].kind;
            let mut end = start;
            let mut bytes = 0u64;
            while end < range.end
                && (end - start) < MAX_ENTRIES as usize
                && slices[end].kind == kind
                && (end == start || bytes + u64::from(slices[end].len) <= GROUP_BYTES)
            {
                bytes += u64::from(slices[end].len);
                end += 1;
            }
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            self.inflight_bytes += bytes;
            self.inflight.push_back(Group {
                work: Arc::clone(work),
                range: start..end,
                kind,
                id,
                bytes,
                sent: false,
                result: None,
                started: Instant::now(),
            });
            start = end;
        }
    }

    /// Takes directly sent requests into the list, in wire order: they went out after every
    /// queued group (a direct send needs the send lock, which the I/O thread holds from
    /// building a send until it completes, and building drains this first) and before
    /// every group not yet queued.
    fn drain_presend(&mut self) {
        let mut presend = self
            .shared
            .presend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if presend.is_empty() {
            return;
        }
        self.shared
            .presend_len
            .fetch_sub(presend.len(), Ordering::SeqCst);
        for g in presend.drain(..) {
            self.inflight_bytes += g.bytes;
            self.inflight.insert(self.queued, g);
            self.queued += 1;
            self.sent += 1;
        }
        self.send_end = self.queued;
    }

    /// Builds one send from the groups not yet queued.
    fn build_send(&mut self) {
        self.drain_presend();
        self.send_bytes.clear();
        // (own bytes?, offset or address, length) — own offsets become pointers once
        // `send_bytes` is complete and can no longer move.
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        let mut total = 0usize;
        let mut end = self.queued;
        while end < self.inflight.len() && (end == self.queued || total < SEND_BYTES) {
            let g = &self.inflight[end];
            let slices = &g.work.slices()[g.range.clone()];
            if end > self.queued && pieces.len() + 1 + slices.len() > 1024 {
                break;
            }
            let start = self.send_bytes.len();
            encode_request(g.kind, g.id, slices, &mut self.send_bytes);
            pieces.push((true, start, self.send_bytes.len() - start));
            total += self.send_bytes.len() - start;
            if g.kind == OpKind::Write {
                for s in slices {
                    pieces.push((false, s.local as usize, s.len as usize));
                    total += s.len as usize;
                }
            }
            end += 1;
        }
        self.send.set_pieces(self.send_bytes.as_ptr(), &pieces);
        self.pieces = pieces;
        self.queued = end;
        self.send_end = end;
    }

    /// Takes the send lock for a new send; if a submitting thread holds it, asks to be
    /// kicked when it is free.
    fn lock_send(&mut self) -> bool {
        if !self.shared.try_lock_send() {
            self.shared.send_waiting.store(true, Ordering::SeqCst);
            // It may have been freed between the two lines.
            if !self.shared.try_lock_send() {
                return false;
            }
        }
        self.holds_send_lock = true;
        true
    }

    /// Pops finished groups from the front and completes them.
    fn sweep(&mut self) {
        while self.responded > 0 && self.sent > 0 {
            let front = self.inflight.front().expect("counted groups exist").id;
            // Answered while its sender's `sendmsg` has not returned yet: on loopback the
            // reply can beat the return by a few microseconds, and only then may the range
            // be completed (a peer that answers early and stops reading holds this for at
            // most the socket's send timeout).
            while front == self.shared.direct_sending.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            let g = self.inflight.pop_front().expect("counted groups exist");
            self.responded -= 1;
            self.sent -= 1;
            self.queued -= 1;
            self.send_end = self.send_end.saturating_sub(1);
            self.inflight_bytes -= g.bytes;
            let result = g.result.unwrap_or(Ok(())).map_err(tcp_error);
            g.work.complete(g.range, result);
        }
    }

    fn on_header(&mut self) -> Result<(), String> {
        let header = Header::decode(&self.hdr).map_err(|e| format!("malformed response: {e}"))?;
        if self.responded >= self.queued {
            self.drain_presend();
        }
        if self.responded >= self.queued {
            return Err(format!("response {} to no request sent", header.kind));
        }
        let g = &mut self.inflight[self.responded];
        if header.id != g.id {
            return Err(format!(
                "response for request {} arrived while {} was due",
                header.id, g.id
            ));
        }
        match (header.kind, g.kind) {
            (Kind::Ack, OpKind::Write) => {
                g.result = Some(Ok(()));
                self.responded += 1;
            }
            (Kind::ReadData, OpKind::Read) => {
                self.recv.clear();
                for s in &g.work.slices()[g.range.clone()] {
                    self.recv.push(s.local as *const u8, s.len as usize);
                }
                self.rx = Rx::Data;
            }
            (Kind::Error, _) if header.count > 0 => {
                self.message.clear();
                self.message.resize(header.count as usize, 0);
                self.recv.clear();
                self.recv.push(self.message.as_ptr(), self.message.len());
                self.rx = Rx::Message(header);
            }
            (Kind::Error, _) => {
                g.result = Some(Err(refusal(header.status, "")));
                self.responded += 1;
            }
            (kind, op) => return Err(format!("{kind} response to a {op} request")),
        }
        Ok(())
    }

    fn on_received(&mut self) -> Result<(), String> {
        match std::mem::replace(&mut self.rx, Rx::Header) {
            Rx::Header => self.on_header()?,
            Rx::Message(header) => {
                let text = String::from_utf8_lossy(&self.message).into_owned();
                let g = &mut self.inflight[self.responded];
                g.result = Some(Err(refusal(header.status, &text)));
                self.responded += 1;
            }
            Rx::Data => {
                self.inflight[self.responded].result = Some(Ok(()));
                self.responded += 1;
            }
        }
        self.sweep();
        Ok(())
    }
}

fn refusal(status: u32, text: &str) -> String {
    let what = match Code::from_status(status) {
        Code::NotRegistered => "outside the memory the peer registered",
        Code::AccessDenied => "not allowed by the region's access rights",
        Code::Malformed => "malformed",
        Code::Device => "its GPU could not copy the bytes",
    };
    format!("the peer refused the request ({what}): {text}")
}

impl Driven for ClientLane {
    fn pump(&mut self, slot: usize, sq: &mut Submit<'_>) {
        if self.closing.is_none() && self.shared.close_requested.load(Ordering::Acquire) {
            self.close("the peer was closed".into());
        }
        if self.closing.is_none() && self.shared.broken.load(Ordering::Acquire) {
            self.close("a send from the submitting thread failed part-way".into());
        }
        if self.closing.is_some() {
            if !self.shut {
                self.shut = true;
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            return;
        }
        self.sweep();
        self.fill();
        if !self.send_pending
            && (self.send.left() > 0 || self.queued < self.inflight.len())
            && (self.send.left() > 0 || self.lock_send())
        {
            if self.send.left() == 0 {
                self.build_send();
            }
            let entry = self.send.send(self.fd, token(slot, OP_SEND));
            // SAFETY: the iovecs point at `send_bytes` (not touched until this send
            // completes) and at claimed slices' local memory, which the batch keeps
            // registered until the range is completed, after this send's completion.
            unsafe { sq.push(&entry) };
            self.send_pending = true;
        }
        if !self.recv_pending {
            if self.recv.left() == 0 {
                self.recv.clear();
                self.recv.push(self.hdr.as_ptr(), HEADER_LEN);
            }
            let entry = self.recv.recv(self.fd, token(slot, OP_RECV));
            // SAFETY: the iovecs point at the boxed header, the message buffer (not resized
            // while receiving) or claimed slices' local memory, kept registered until the
            // range completes, which happens only after this receive completes.
            unsafe { sq.push(&entry) };
            self.recv_pending = true;
        }
    }

    fn on_complete(&mut self, op: u64, res: i32) {
        if op == OP_SEND {
            self.send_pending = false;
        } else {
            self.recv_pending = false;
        }
        let n = match outcome(res) {
            Outcome::Moved(n) if self.closing.is_none() => n,
            Outcome::Broken(why) => return self.close(why),
            _ => return,
        };
        if op == OP_SEND {
            if self.send.advance(n) {
                for g in self.inflight.range_mut(self.sent..self.send_end) {
                    g.sent = true;
                }
                self.sent = self.send_end;
                self.holds_send_lock = false;
                self.shared.unlock_send();
                self.sweep();
            }
        } else if self.recv.advance(n) {
            if let Err(reason) = self.on_received() {
                self.close(reason);
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        // Directly sent requests are watched like the others (safe here: the list only
        // fills while no send of this thread is in flight).
        self.drain_presend();
        let hung = self
            .inflight
            .iter()
            .skip(self.responded)
            .any(|g| g.work.is_stopped() && now.duration_since(g.started) > ABORT_GRACE);
        if hung {
            self.close(
                "a stopped batch's request went unanswered; the connection was dropped to free its buffers"
                    .into(),
            );
        }
    }

    fn busy(&self) -> bool {
        !self.inflight.is_empty() || self.shared.presend_len.load(Ordering::SeqCst) > 0
    }

    fn latency_sensitive(&self) -> bool {
        self.inflight_bytes <= SMALL_TRAFFIC
    }

    fn ops_in_flight(&self) -> usize {
        usize::from(self.send_pending) + usize::from(self.recv_pending)
    }

    fn close(&mut self, reason: String) {
        if self.closing.is_none() {
            log::debug!(
                "kvxfer: lane to {} closing: {reason}",
                self.shared.peer.name
            );
            self.closing = Some(reason);
        }
    }

    fn closing(&self) -> bool {
        self.closing.is_some()
    }

    fn finish(&mut self) {
        let reason = self.closing.clone().unwrap_or_default();
        let reason = format!("connection to {} lost: {reason}", self.shared.peer.name);
        *self
            .shared
            .peer
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        // Marked dead and counted out under one lock, so that work posted to the other
        // lanes meanwhile is failed by whichever lane dies last.
        let (orphans, last) = {
            let mut q = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            q.dead = true;
            let last = self.shared.peer.alive.fetch_sub(1, Ordering::AcqRel) == 1;
            (std::mem::take(&mut q.works), last)
        };
        // Take the send lock for good (a direct send in progress ends within the socket's
        // send timeout), so no thread writes to the socket once it is closed.
        if !self.holds_send_lock {
            while !self.shared.try_lock_send() {
                std::thread::yield_now();
            }
            self.holds_send_lock = true;
        }
        self.drain_presend();
        for g in self.inflight.drain(..) {
            g.work.complete(g.range, Err(tcp_error(reason.clone())));
        }
        if last {
            for work in orphans {
                fail_all(&*work, &reason);
            }
        }
    }
}
