//! The control client: one connection to a peer's control server, with a reader thread
//! that matches replies to waiting callers by request id and applies pushed descriptors.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::ControlError;
use super::frame::{self, encode_frame};
use super::message::{
    kind, kind_name, max_body, Message, RdmaConnectReply, RdmaConnectRequest, SegmentDescriptor,
    MAX_NOTIFY,
};

/// Longest wait honoured; larger timeouts are cut to this.
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// The request id of the handshake; later requests count up from the next one.
const HANDSHAKE_ID: u32 = 1;

/// A connection to a peer engine's control server. `Send + Sync`: requests may be made
/// from many threads at once; each waits for its own reply.
pub struct ControlClient {
    inner: Arc<Inner>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    session: String,
    /// The epoch of the peer's handshake; a Refresh of another epoch ends the connection.
    epoch: u64,
    writer: Mutex<TcpStream>,
    /// A handle to shut the socket down without taking the writer lock.
    control: TcpStream,
    state: Mutex<State>,
    replies: Condvar,
    descriptor: Mutex<Arc<SegmentDescriptor>>,
    alive: AtomicBool,
}

struct State {
    next_id: u32,
    /// Requests waiting for a reply, and the reply once it came.
    pending: HashMap<u32, Option<Reply>>,
    /// Why the connection ended, once it has.
    dead: Option<String>,
}

enum Reply {
    /// A reply message (ProbeReply, NotifyAck, RdmaConnectReply, StoreReply or Error).
    Message(Message),
    /// A Refresh answered a DescriptorRequest and was applied to the stored descriptor.
    Descriptor,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No invariant spans these locks, so a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout.min(MAX_WAIT)).unwrap_or(now)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn is_io_timeout(e: &ControlError) -> bool {
    matches!(e, ControlError::Io { source, .. } if is_timeout(source))
}

impl ControlClient {
    /// Connects to `session` (`"host:port"`, resolved with `ToSocketAddrs`), sends
    /// `Handshake(own)` and waits for the HandshakeReply, all within `timeout`.
    ///
    /// Errors, each naming the session: [`ControlError::BadAddress`] (does not resolve),
    /// [`ControlError::Refused`] (nothing listens), [`ControlError::Connect`] (other
    /// connect failures), [`ControlError::Timeout`], [`ControlError::PeerError`] (the peer
    /// answered with an Error), [`ControlError::MalformedReply`],
    /// [`ControlError::Disconnected`] (the peer closed during the handshake). Also
    /// [`ControlError::InvalidDescriptor`] if `own` does not validate.
    pub fn connect(
        session: &str,
        own: &SegmentDescriptor,
        timeout: Duration,
    ) -> Result<ControlClient, ControlError> {
        let (stream, reader, peer) = handshake(session, own, timeout, |s| s)?;
        let io = |what: &str, e: std::io::Error| ControlError::Disconnected {
            session: session.to_owned(),
            reason: format!("{what}: {e}"),
        };
        // From here on reads block without a timeout (peers may be idle for hours); each
        // request sets the write timeout it needs.
        stream
            .set_read_timeout(None)
            .map_err(|e| io("clearing the read timeout", e))?;
        let control = stream
            .try_clone()
            .map_err(|e| io("cloning the socket", e))?;
        log::info!(
            "control client: connected to {session} (engine {:#x}, epoch {}, version {})",
            peer.engine_id,
            peer.epoch,
            peer.version
        );
        let inner = Arc::new(Inner {
            session: session.to_owned(),
            epoch: peer.epoch,
            writer: Mutex::new(stream),
            control,
            state: Mutex::new(State {
                next_id: HANDSHAKE_ID.wrapping_add(1),
                pending: HashMap::new(),
                dead: None,
            }),
            replies: Condvar::new(),
            descriptor: Mutex::new(Arc::new(peer)),
            alive: AtomicBool::new(true),
        });
        let reader_thread = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("kvx-ctl-client".into())
                .spawn(move || read_loop(&inner, reader))
                .map_err(|e| ControlError::io("starting the control client's reader thread", e))?
        };
        Ok(ControlClient {
            inner,
            reader: Mutex::new(Some(reader_thread)),
        })
    }

    /// The session (`"host:port"`) this client connected to.
    pub fn session(&self) -> &str {
        &self.inner.session
    }

    /// The peer's descriptor as last received (handshake, pushed Refresh, or fetch).
    pub fn descriptor(&self) -> Arc<SegmentDescriptor> {
        Arc::clone(&lock(&self.inner.descriptor))
    }

    /// Asks for the current descriptor (DescriptorRequest round trip), stores and returns
    /// it. If a newer one was pushed meanwhile, that one is returned.
    ///
    /// Errors: [`ControlError::Timeout`], [`ControlError::Disconnected`] (also when the
    /// peer answers with another epoch: it restarted), [`ControlError::PeerError`],
    /// [`ControlError::MalformedReply`].
    pub fn fetch_descriptor(
        &self,
        timeout: Duration,
    ) -> Result<Arc<SegmentDescriptor>, ControlError> {
        match self.request(&Message::DescriptorRequest, timeout, "a DescriptorRequest")? {
            Reply::Descriptor => Ok(self.descriptor()),
            Reply::Message(other) => Err(self.unexpected(other, "Refresh")),
        }
    }

    /// Probe round trip; returns the round-trip time.
    ///
    /// Errors: [`ControlError::Timeout`], [`ControlError::Disconnected`],
    /// [`ControlError::PeerError`], [`ControlError::MalformedReply`].
    pub fn probe(&self, timeout: Duration) -> Result<Duration, ControlError> {
        let nonce = RandomState::new().hash_one(Instant::now());
        let start = Instant::now();
        match self.request(&Message::Probe { nonce }, timeout, "a Probe")? {
            Reply::Message(Message::ProbeReply { nonce: echoed }) if echoed == nonce => {
                Ok(start.elapsed())
            }
            Reply::Message(Message::ProbeReply { nonce: echoed }) => {
                Err(ControlError::MalformedReply {
                    session: self.inner.session.clone(),
                    reason: format!(
                        "ProbeReply carries nonce {echoed:#x}, the Probe sent {nonce:#x}"
                    ),
                })
            }
            Reply::Message(other) => Err(self.unexpected(other, "ProbeReply")),
            Reply::Descriptor => Err(self.unexpected(Message::DescriptorRequest, "ProbeReply")),
        }
    }

    /// Sends a notification (at most [`MAX_NOTIFY`] bytes) and waits for the NotifyAck,
    /// which the peer sends once its handler has taken the notification.
    ///
    /// Errors: [`ControlError::NotifyTooLarge`], [`ControlError::Timeout`],
    /// [`ControlError::Disconnected`], [`ControlError::PeerError`] (code
    /// [`error_code::BUSY`](super::error_code::BUSY) when the peer's handler refused the
    /// notification, e.g. its inbox is full: the connection stays up, retry later),
    /// [`ControlError::MalformedReply`].
    pub fn notify(&self, bytes: &[u8], timeout: Duration) -> Result<(), ControlError> {
        if bytes.len() > MAX_NOTIFY {
            return Err(ControlError::NotifyTooLarge {
                len: bytes.len(),
                max: MAX_NOTIFY,
            });
        }
        let message = Message::Notify {
            bytes: bytes.to_vec(),
        };
        match self.request(&message, timeout, "a Notify")? {
            Reply::Message(Message::NotifyAck) => Ok(()),
            Reply::Message(other) => Err(self.unexpected(other, "NotifyAck")),
            Reply::Descriptor => Err(self.unexpected(Message::DescriptorRequest, "NotifyAck")),
        }
    }

    /// Asks the peer to connect one of its RDMA queue pairs, on its NIC
    /// `request.target_nic`, to this engine's queue pair `request.qpn`, and returns the
    /// peer's queue pair (already in RTR/RTS on the peer's side).
    ///
    /// Errors: [`ControlError::InvalidMessage`] if `request` does not
    /// [validate](RdmaConnectRequest::validate) (nothing is sent), [`ControlError::Timeout`],
    /// [`ControlError::Disconnected`], [`ControlError::PeerError`] (code
    /// [`error_code::RDMA_REFUSED`](super::error_code::RDMA_REFUSED) with the peer's reason
    /// when its handler refused, e.g. it serves no RDMA or has no such NIC; code
    /// [`error_code::INTERNAL`](super::error_code::INTERNAL) when its handler's answer was
    /// invalid; the connection stays up either way), [`ControlError::MalformedReply`].
    pub fn rdma_connect(
        &self,
        request: &RdmaConnectRequest,
        timeout: Duration,
    ) -> Result<RdmaConnectReply, ControlError> {
        request.validate()?;
        let message = Message::RdmaConnect(request.clone());
        match self.request(&message, timeout, "an RdmaConnect")? {
            Reply::Message(Message::RdmaConnectReply(reply)) => Ok(reply),
            Reply::Message(other) => Err(self.unexpected(other, "RdmaConnectReply")),
            Reply::Descriptor => {
                Err(self.unexpected(Message::DescriptorRequest, "RdmaConnectReply"))
            }
        }
    }

    /// Sends a request to the peer's store segment (`body`: the store's own message) and
    /// returns the reply's body.
    ///
    /// Errors: [`ControlError::Timeout`], [`ControlError::Disconnected`],
    /// [`ControlError::PeerError`] (code
    /// [`error_code::STORE_REFUSED`](super::error_code::STORE_REFUSED) when the peer serves
    /// no store; the connection stays up), [`ControlError::MalformedReply`].
    pub fn store(&self, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, ControlError> {
        match self.request(&Message::StoreRequest(body), timeout, "a StoreRequest")? {
            Reply::Message(Message::StoreReply(reply)) => Ok(reply),
            Reply::Message(other) => Err(self.unexpected(other, "StoreReply")),
            Reply::Descriptor => Err(self.unexpected(Message::DescriptorRequest, "StoreReply")),
        }
    }

    /// False once the connection broke (peer gone, malformed frame, peer restarted) or
    /// was closed.
    pub fn is_alive(&self) -> bool {
        self.inner.alive.load(Ordering::Acquire)
    }

    /// A cheap check of [`ControlClient::is_alive`] that can be kept apart from the client
    /// (by a transport that must notice the peer going away).
    pub fn liveness(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let inner = Arc::clone(&self.inner);
        Arc::new(move || inner.alive.load(Ordering::Acquire))
    }

    /// Closes the connection and joins the reader thread (also done on drop). Waiting
    /// callers get [`ControlError::Disconnected`].
    pub fn close(&self) {
        self.inner.kill("closed by this side".into());
        let mut reader = lock(&self.reader);
        if let Some(thread) = reader.take() {
            if thread.join().is_err() {
                log::error!(
                    "control client: the reader thread for {} panicked",
                    self.inner.session
                );
            }
        }
    }

    /// The error for a reply of the wrong kind (an Error reply becomes `PeerError`).
    fn unexpected(&self, reply: Message, expected: &str) -> ControlError {
        match reply {
            Message::Error { code, message } => ControlError::PeerError {
                session: self.inner.session.clone(),
                code,
                message,
            },
            other => ControlError::MalformedReply {
                session: self.inner.session.clone(),
                reason: format!("expected {expected}, got {}", kind_name(other.kind())),
            },
        }
    }

    /// Sends `message` as a request and waits for its reply.
    fn request(
        &self,
        message: &Message,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, ControlError> {
        let inner = &self.inner;
        let deadline = deadline_after(timeout);
        let timed_out = || ControlError::Timeout {
            session: inner.session.clone(),
            what,
            timeout,
        };
        let (kind, body) = message.encode();
        let id = inner.register()?;
        let frame = match frame::frame_bytes(kind, id, &body) {
            Ok(frame) => frame,
            Err(e) => {
                inner.unregister(id);
                return Err(e);
            }
        };
        drop(body);
        {
            let writer = lock(&inner.writer);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                drop(writer);
                inner.unregister(id);
                return Err(timed_out());
            }
            let written = writer
                .set_write_timeout(Some(remaining))
                .and_then(|()| (&*writer).write_all(&frame));
            drop(writer);
            if let Err(e) = written {
                inner.unregister(id);
                if is_timeout(&e) {
                    inner.kill(format!("sending {what} timed out midway"));
                    return Err(timed_out());
                }
                inner.kill(format!("sending {what} failed: {e}"));
                return Err(inner.disconnected());
            }
        }
        log::trace!(
            "control client: sent {message} to {} (request {id})",
            inner.session
        );

        let mut state = lock(&inner.state);
        loop {
            if let Some(reply) = state.pending.get_mut(&id).and_then(Option::take) {
                state.pending.remove(&id);
                return Ok(reply);
            }
            if let Some(reason) = &state.dead {
                let reason = reason.clone();
                state.pending.remove(&id);
                return Err(ControlError::Disconnected {
                    session: inner.session.clone(),
                    reason,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                state.pending.remove(&id);
                return Err(timed_out());
            }
            state = inner
                .replies
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.close();
    }
}

impl fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlClient")
            .field("session", &self.inner.session)
            .field("alive", &self.is_alive())
            .finish_non_exhaustive()
    }
}

/// Connects to the first address that accepts; otherwise the last address's error.
fn connect_any(
    session: &str,
    addrs: &[SocketAddr],
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, ControlError> {
    let mut last = None;
    for addr in addrs {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(addr, remaining) {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                log::debug!("control client: connecting to {session} at {addr}: {e}");
                last = Some(match e.kind() {
                    ErrorKind::ConnectionRefused => ControlError::Refused {
                        session: session.to_owned(),
                    },
                    _ if is_timeout(&e) => ControlError::Timeout {
                        session: session.to_owned(),
                        what: "the connection",
                        timeout,
                    },
                    _ => ControlError::Connect {
                        session: session.to_owned(),
                        source: Arc::new(e),
                    },
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| ControlError::Timeout {
        session: session.to_owned(),
        what: "the connection",
        timeout,
    }))
}

impl Inner {
    /// A fresh request id (counting up, wrapping, never 0 nor one in use).
    fn register(&self) -> Result<u32, ControlError> {
        let mut state = lock(&self.state);
        if let Some(reason) = &state.dead {
            return Err(ControlError::Disconnected {
                session: self.session.clone(),
                reason: reason.clone(),
            });
        }
        loop {
            let id = state.next_id;
            state.next_id = state.next_id.wrapping_add(1);
            if id != 0 && !state.pending.contains_key(&id) {
                state.pending.insert(id, None);
                return Ok(id);
            }
        }
    }

    fn unregister(&self, id: u32) {
        lock(&self.state).pending.remove(&id);
    }

    fn disconnected(&self) -> ControlError {
        let reason = lock(&self.state)
            .dead
            .clone()
            .unwrap_or_else(|| "the connection ended".into());
        ControlError::Disconnected {
            session: self.session.clone(),
            reason,
        }
    }

    /// Ends the connection: waiting callers are woken with the reason, the socket is shut
    /// down (which also ends the reader thread).
    fn kill(&self, reason: String) {
        {
            let mut state = lock(&self.state);
            if state.dead.is_none() {
                if reason == "closed by this side" {
                    log::debug!("control client: connection to {} closed", self.session);
                } else {
                    log::warn!(
                        "control client: connection to {} is down: {reason}",
                        self.session
                    );
                }
                state.dead = Some(reason);
            }
            self.alive.store(false, Ordering::Release);
            self.replies.notify_all();
        }
        let _ = self.control.shutdown(Shutdown::Both);
    }

    fn deliver(&self, id: u32, reply: Reply) {
        let mut state = lock(&self.state);
        match state.pending.get_mut(&id) {
            Some(slot) => {
                *slot = Some(reply);
                self.replies.notify_all();
            }
            None => log::debug!(
                "control client: {} answered request {id}, which no longer waits (timed out)",
                self.session
            ),
        }
    }

    /// Applies a Refresh of the handshake's epoch: stored if newer than what is stored.
    fn refresh(&self, descriptor: SegmentDescriptor) {
        let mut stored = lock(&self.descriptor);
        if descriptor.version > stored.version {
            log::debug!(
                "control client: {} descriptor version {} → {}",
                self.session,
                stored.version,
                descriptor.version
            );
            *stored = Arc::new(descriptor);
        }
    }
}

/// How long a [`SyncControlClient`] spins for its reply before it sleeps in read.
const SYNC_SPIN: Duration = Duration::from_micros(100);

/// A socket whose reads end by a deadline (each read gets the time left as its timeout),
/// so a peer that sends a reply a byte at a time cannot stretch a call past it.
struct DeadlineStream {
    stream: TcpStream,
    deadline: Option<Instant>,
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// A control connection for one request at a time, whose caller reads the reply itself,
/// spinning briefly before it sleeps: a round trip costs no thread hand-off and, on a busy
/// connection, no wake-up. For latency-bound request/reply traffic (store lookups); it
/// has no reader thread, so it notices nothing while idle (unsolicited frames are skipped
/// when the next reply is read). A failure of the connection (not a refusal by the peer)
/// leaves it dead; open a new one.
pub struct SyncControlClient {
    session: String,
    stream: TcpStream,
    reader: BufReader<DeadlineStream>,
    next_id: u32,
    dead: Option<String>,
    /// Whether the last call's request was written whole (the peer may have acted on it).
    sent: bool,
}

impl std::fmt::Debug for SyncControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncControlClient")
            .field("session", &self.session)
            .field("dead", &self.dead)
            .finish()
    }
}

impl SyncControlClient {
    /// Connects and handshakes as [`ControlClient::connect`] does (same errors).
    pub fn connect(
        session: &str,
        own: &SegmentDescriptor,
        timeout: Duration,
    ) -> Result<SyncControlClient, ControlError> {
        let (stream, reader, _peer) = handshake(session, own, timeout, |stream| DeadlineStream {
            stream,
            deadline: None,
        })?;
        // Nobody reads this connection between calls: descriptor pushes would pile up
        // until the server gave up on it. (One pushed before this arrives is skipped.)
        let quiet = encode_frame(&Message::Quiet, 0)?;
        (&stream)
            .write_all(&quiet)
            .map_err(|e| ControlError::Disconnected {
                session: session.to_owned(),
                reason: format!("sending Quiet: {e}"),
            })?;
        Ok(SyncControlClient {
            session: session.to_owned(),
            stream,
            reader,
            next_id: HANDSHAKE_ID.wrapping_add(1),
            dead: None,
            sent: false,
        })
    }

    /// Whether an earlier error ended the connection.
    pub fn is_dead(&self) -> bool {
        self.dead.is_some()
    }

    /// Whether the last call's request reached the socket whole: if it failed after that,
    /// the peer may have carried it out, so it must not be sent again blindly.
    pub fn last_request_sent(&self) -> bool {
        self.sent
    }

    /// Sends a store request and returns the reply's body (as [`ControlClient::store`]).
    pub fn store(&mut self, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, ControlError> {
        match self.call(&Message::StoreRequest(body), timeout, "a StoreRequest")? {
            Message::StoreReply(reply) => Ok(reply),
            Message::Error { code, message } => Err(ControlError::PeerError {
                session: self.session.clone(),
                code,
                message,
            }),
            other => Err(ControlError::MalformedReply {
                session: self.session.clone(),
                reason: format!("expected StoreReply, got {}", kind_name(other.kind())),
            }),
        }
    }

    /// Sends `message` and reads frames until its reply; any failure kills the connection.
    fn call(
        &mut self,
        message: &Message,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Message, ControlError> {
        let pending = self.send(message, timeout, what)?;
        self.receive(pending)
    }

    /// Sends a store request without waiting for its reply (collect it with
    /// [`SyncControlClient::receive_store`]): requests to several peers then run at once.
    pub fn send_store(
        &mut self,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<PendingReply, ControlError> {
        self.send(&Message::StoreRequest(body), timeout, "a StoreRequest")
    }

    /// The reply to a request [`SyncControlClient::send_store`] sent (as
    /// [`SyncControlClient::store`] answers).
    pub fn receive_store(&mut self, pending: PendingReply) -> Result<Vec<u8>, ControlError> {
        match self.receive(pending)? {
            Message::StoreReply(reply) => Ok(reply),
            Message::Error { code, message } => Err(ControlError::PeerError {
                session: self.session.clone(),
                code,
                message,
            }),
            other => Err(ControlError::MalformedReply {
                session: self.session.clone(),
                reason: format!("expected StoreReply, got {}", kind_name(other.kind())),
            }),
        }
    }

    fn send(
        &mut self,
        message: &Message,
        timeout: Duration,
        what: &'static str,
    ) -> Result<PendingReply, ControlError> {
        if let Some(reason) = &self.dead {
            return Err(ControlError::Disconnected {
                session: self.session.clone(),
                reason: reason.clone(),
            });
        }
        let result = self.write_request(message, timeout, what);
        if let Err(e) = &result {
            self.dead = Some(e.to_string());
        }
        result
    }

    fn receive(&mut self, pending: PendingReply) -> Result<Message, ControlError> {
        if let Some(reason) = &self.dead {
            return Err(ControlError::Disconnected {
                session: self.session.clone(),
                reason: reason.clone(),
            });
        }
        let result = self.read_reply(&pending);
        if let Err(e) = &result {
            self.dead = Some(e.to_string());
        }
        result
    }

    /// The error of an I/O failure during `what`.
    fn io_error(&self, what: &'static str, timeout: Duration, e: std::io::Error) -> ControlError {
        if is_timeout(&e) {
            self.timed_out(what, timeout)
        } else {
            ControlError::Disconnected {
                session: self.session.clone(),
                reason: format!("{what}: {e}"),
            }
        }
    }

    fn timed_out(&self, what: &'static str, timeout: Duration) -> ControlError {
        ControlError::Timeout {
            session: self.session.clone(),
            what,
            timeout,
        }
    }

    /// The error of a failed frame read during `what`.
    fn read_error(&self, what: &'static str, timeout: Duration, e: ControlError) -> ControlError {
        match e {
            e if is_io_timeout(&e) => self.timed_out(what, timeout),
            ControlError::Io { .. } => ControlError::Disconnected {
                session: self.session.clone(),
                reason: e.to_string(),
            },
            e => e,
        }
    }

    fn closed(&self) -> ControlError {
        ControlError::Disconnected {
            session: self.session.clone(),
            reason: "the peer closed the connection".into(),
        }
    }

    fn write_request(
        &mut self,
        message: &Message,
        timeout: Duration,
        what: &'static str,
    ) -> Result<PendingReply, ControlError> {
        let deadline = deadline_after(timeout);
        let id = self.next_id;
        self.next_id = self
            .next_id
            .wrapping_add(1)
            .max(HANDSHAKE_ID.wrapping_add(1));
        let frame = encode_frame(message, id)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out(what, timeout));
        }
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| self.io_error(what, timeout, e))?;
        self.sent = false;
        // Whatever waits before the request is sent is unsolicited (a Refresh pushed before
        // the server saw Quiet) or the end of the connection: read it now, so that a
        // connection the peer closed is found dead before anything is sent on it.
        self.reader.get_mut().deadline = Some(deadline);
        while !self.reader.buffer().is_empty() || crate::sys::spin::readable_now(&self.stream) {
            let header = frame::read_header(&mut self.reader)
                .map_err(|e| self.read_error(what, timeout, e))?
                .ok_or_else(|| self.closed())?;
            frame::skip_body(&mut self.reader, header.len)
                .map_err(|e| self.read_error(what, timeout, e))?;
        }
        (&self.stream)
            .write_all(&frame)
            .map_err(|e| self.io_error(what, timeout, e))?;
        self.sent = true;
        Ok(PendingReply {
            id,
            deadline,
            timeout,
            what,
        })
    }

    fn read_reply(&mut self, pending: &PendingReply) -> Result<Message, ControlError> {
        let PendingReply {
            id,
            deadline,
            timeout,
            what,
        } = *pending;
        loop {
            if self.reader.buffer().is_empty() {
                crate::sys::spin::spin_until_readable(&self.stream, SYNC_SPIN);
            }
            // Every read of the reply (header, body, skipped frames) ends by the deadline.
            self.reader.get_mut().deadline = Some(deadline);
            let header = frame::read_header(&mut self.reader)
                .map_err(|e| self.read_error(what, timeout, e))?
                .ok_or_else(|| self.closed())?;
            header.check_version()?;
            if !kind::is_known(header.kind) || header.request_id != id {
                // Unsolicited (a Refresh) or of a kind this build does not know: skipped.
                frame::skip_body(&mut self.reader, header.len)
                    .map_err(|e| self.read_error(what, timeout, e))?;
                continue;
            }
            if header.len > max_body(header.kind) {
                return Err(ControlError::MalformedReply {
                    session: self.session.clone(),
                    reason: format!(
                        "a {} of {} bytes exceeds the limit for its kind",
                        kind_name(header.kind),
                        header.len
                    ),
                });
            }
            let body = frame::read_body(&mut self.reader, header.len)
                .map_err(|e| self.read_error(what, timeout, e))?;
            return Message::decode(header.kind, &body).map_err(|e| ControlError::MalformedReply {
                session: self.session.clone(),
                reason: e.to_string(),
            });
        }
    }
}

/// A request a [`SyncControlClient`] sent and whose reply is still to be read.
#[derive(Clone, Copy, Debug)]
pub struct PendingReply {
    id: u32,
    deadline: Instant,
    timeout: Duration,
    what: &'static str,
}

/// Connects to `session`, sends `Handshake(own)` and reads the HandshakeReply, all within
/// `timeout`: the socket (read timeout still set), a reader over it and the peer's
/// descriptor. Errors as [`ControlClient::connect`].
fn handshake<R: Read>(
    session: &str,
    own: &SegmentDescriptor,
    timeout: Duration,
    wrap: impl FnOnce(TcpStream) -> R,
) -> Result<(TcpStream, BufReader<R>, SegmentDescriptor), ControlError> {
    own.validate()?;
    let handshake = encode_frame(&Message::Handshake(own.clone()), HANDSHAKE_ID)?;
    let deadline = deadline_after(timeout);
    let timed_out = || ControlError::Timeout {
        session: session.to_owned(),
        what: "the handshake",
        timeout,
    };
    let remaining =
        || Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero());
    let disconnected = |reason: String| ControlError::Disconnected {
        session: session.to_owned(),
        reason,
    };
    let malformed = |reason: String| ControlError::MalformedReply {
        session: session.to_owned(),
        reason,
    };
    let io = |what: &str, e: std::io::Error| {
        if is_timeout(&e) {
            timed_out()
        } else {
            disconnected(format!("{what}: {e}"))
        }
    };

    let addrs: Vec<SocketAddr> = session
        .to_socket_addrs()
        .map_err(|e| ControlError::BadAddress {
            session: session.to_owned(),
            reason: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ControlError::BadAddress {
            session: session.to_owned(),
            reason: "it resolves to no address".into(),
        });
    }
    let stream = connect_any(session, &addrs, deadline, timeout)?;
    stream
        .set_nodelay(true)
        .map_err(|e| io("setting TCP_NODELAY", e))?;

    stream
        .set_write_timeout(Some(remaining().ok_or_else(timed_out)?))
        .map_err(|e| io("setting the write timeout", e))?;
    (&stream)
        .write_all(&handshake)
        .map_err(|e| io("sending the handshake", e))?;

    stream
        .set_read_timeout(Some(remaining().ok_or_else(timed_out)?))
        .map_err(|e| io("setting the read timeout", e))?;
    let read_clone = stream
        .try_clone()
        .map_err(|e| io("cloning the socket", e))?;
    let mut reader = BufReader::with_capacity(64 * 1024, wrap(read_clone));
    let read_failed = |e: ControlError| {
        if is_io_timeout(&e) {
            timed_out()
        } else if matches!(
            e,
            ControlError::BadMagic { .. } | ControlError::BodyTooLong { .. }
        ) {
            malformed(e.to_string())
        } else {
            disconnected(format!("during the handshake: {e}"))
        }
    };
    let header = frame::read_header(&mut reader)
        .map_err(read_failed)?
        .ok_or_else(|| {
            disconnected("the peer closed the connection during the handshake".into())
        })?;
    if let Err(e) = header.check_version() {
        return Err(malformed(e.to_string()));
    }
    if header.len > max_body(header.kind) {
        return Err(malformed(format!(
            "a {} of {} bytes answered the Handshake (at most {} bytes)",
            kind_name(header.kind),
            header.len,
            max_body(header.kind)
        )));
    }
    let body = frame::read_body(&mut reader, header.len).map_err(read_failed)?;
    if header.request_id != HANDSHAKE_ID {
        return Err(malformed(format!(
            "the first frame has request id {} (a {}), not the handshake's {HANDSHAKE_ID}",
            header.request_id,
            kind_name(header.kind)
        )));
    }
    let peer = match Message::decode(header.kind, &body).map_err(|e| malformed(e.to_string()))? {
        Message::HandshakeReply(descriptor) => descriptor,
        Message::Error { code, message } => {
            return Err(ControlError::PeerError {
                session: session.to_owned(),
                code,
                message,
            })
        }
        other => {
            return Err(malformed(format!(
                "a {} answered the Handshake",
                kind_name(other.kind())
            )))
        }
    };
    Ok((stream, reader, peer))
}

fn read_loop(inner: &Inner, mut reader: BufReader<TcpStream>) {
    let reason = loop {
        match read_one(inner, &mut reader) {
            Ok(true) => {}
            Ok(false) => break "the peer closed the connection".to_string(),
            Err(reason) => break reason,
        }
    };
    inner.kill(reason);
}

/// Reads and handles one frame. `Ok(false)` at a clean end of stream; `Err(reason)` when
/// the connection cannot go on.
fn read_one(inner: &Inner, reader: &mut BufReader<TcpStream>) -> Result<bool, String> {
    let header = match frame::read_header(reader).map_err(|e| e.to_string())? {
        Some(header) => header,
        None => return Ok(false),
    };
    header.check_version().map_err(|e| e.to_string())?;
    let id = header.request_id;
    if !kind::is_known(header.kind) {
        frame::skip_body(reader, header.len).map_err(|e| e.to_string())?;
        log::warn!(
            "control client: {} sent a frame of unknown kind {} (request {id}); skipped",
            inner.session,
            header.kind
        );
        return Ok(true);
    }
    let max = max_body(header.kind);
    if header.len > max {
        return Err(format!(
            "a {} of {} bytes (request {id}) exceeds the limit of {max} bytes for its kind",
            kind_name(header.kind),
            header.len
        ));
    }
    let body = frame::read_body(reader, header.len).map_err(|e| e.to_string())?;
    let message = Message::decode(header.kind, &body).map_err(|e| e.to_string())?;
    log::trace!(
        "control client: {} sent {message} (request {id})",
        inner.session
    );
    match message {
        Message::Refresh(descriptor) => {
            if descriptor.epoch != inner.epoch {
                return Err(format!(
                    "the peer restarted (descriptor epoch {} → {})",
                    inner.epoch, descriptor.epoch
                ));
            }
            inner.refresh(descriptor);
            if id != 0 {
                inner.deliver(id, Reply::Descriptor);
            }
        }
        Message::ProbeReply { .. }
        | Message::NotifyAck
        | Message::RdmaConnectReply(_)
        | Message::StoreReply(_)
        | Message::Error { .. }
            if id != 0 =>
        {
            inner.deliver(id, Reply::Message(message));
        }
        Message::Error { code, message } => log::warn!(
            "control client: {} sent an unsolicited Error: {} {code}: {message}",
            inner.session,
            super::message::error_code::name(code)
        ),
        other => log::warn!(
            "control client: {} sent an unexpected {} (request {id}); ignored",
            inner.session,
            kind_name(other.kind())
        ),
    }
    Ok(true)
}
