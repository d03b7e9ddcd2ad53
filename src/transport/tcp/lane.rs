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

use super::io::{describe, token, Command, Driven, IoThread, IoVecs, Submit, OP_RECV, OP_SEND};
use super::wire::{Code, Entry, Header, Kind, HEADER_LEN, MAX_ENTRIES};
use crate::transport::{OpKind, SliceSource, TransportError, TransportKind};

/// Bytes of requests a lane keeps in flight, at most (one group may exceed it).
const WINDOW_BYTES: u64 = 16 << 20;
/// Requests a lane keeps in flight, at most.
const WINDOW_GROUPS: usize = 64;
/// Payload bytes per request, at most (unless one slice is larger).
const GROUP_BYTES: u64 = 4 << 20;
/// Bytes one send carries, at most (unless one request is larger).
const SEND_BYTES: usize = 8 << 20;
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
            slot: AtomicUsize::new(usize::MAX),
            close_requested: AtomicBool::new(false),
            thread,
            peer,
        }
    }

    /// Hands the connection to its I/O thread.
    pub(super) fn start(self: &Arc<Self>, stream: TcpStream) {
        self.thread.send(Command::Lane(Arc::clone(self), stream));
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
    next_id: u64,
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
            next_id: 1,
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
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
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

    /// Builds one send from the groups not yet queued.
    fn build_send(&mut self) {
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
            let header = Header {
                kind: match g.kind {
                    OpKind::Write => Kind::Write,
                    OpKind::Read => Kind::Read,
                },
                count: slices.len() as u32,
                status: 0,
                id: g.id,
            };
            self.send_bytes.extend_from_slice(&header.encode());
            for s in slices {
                Entry {
                    addr: s.remote,
                    len: s.len,
                }
                .encode_into(&mut self.send_bytes);
            }
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
        self.send.clear();
        let base = self.send_bytes.as_ptr();
        for &(own, at, len) in &pieces {
            let ptr = if own {
                base.wrapping_add(at)
            } else {
                at as *const u8
            };
            self.send.push(ptr, len);
        }
        self.pieces = pieces;
        self.queued = end;
        self.send_end = end;
    }

    /// Pops finished groups from the front and completes them.
    fn sweep(&mut self) {
        while self.responded > 0 && self.sent > 0 {
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
        let Some(g) = self.inflight.get_mut(self.responded) else {
            return Err(format!("response {} to no request", header.kind));
        };
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
    };
    format!("the peer refused the request ({what}): {text}")
}

impl Driven for ClientLane {
    fn pump(&mut self, slot: usize, sq: &mut Submit<'_>) {
        if self.closing.is_none() && self.shared.close_requested.load(Ordering::Acquire) {
            self.close("the peer was closed".into());
        }
        if self.closing.is_some() {
            if !self.shut {
                self.shut = true;
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            return;
        }
        self.fill();
        if !self.send_pending && (self.send.left() > 0 || self.queued < self.inflight.len()) {
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
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return;
        }
        if res <= 0 {
            if self.closing.is_none() {
                self.close(describe(res));
            }
            return;
        }
        if self.closing.is_some() {
            return;
        }
        if op == OP_SEND {
            if self.send.advance(res as usize) {
                for g in self.inflight.range_mut(self.sent..self.send_end) {
                    g.sent = true;
                }
                self.sent = self.send_end;
                self.sweep();
            }
        } else if self.recv.advance(res as usize) {
            if let Err(reason) = self.on_received() {
                self.close(reason);
            }
        }
    }

    fn tick(&mut self, now: Instant) {
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
        !self.inflight.is_empty()
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
        for g in self.inflight.drain(..) {
            g.work.complete(g.range, Err(tcp_error(reason.clone())));
        }
        let orphans = {
            let mut q = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            q.dead = true;
            std::mem::take(&mut q.works)
        };
        *self
            .shared
            .peer
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        if self.shared.peer.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            for work in orphans {
                fail_all(&*work, &reason);
            }
        }
    }
}
