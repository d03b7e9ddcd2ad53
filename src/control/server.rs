//! The control server: one accept thread plus one thread per connection (peers are few).
//!
//! Per connection the first frame must be a Handshake, answered with the handler's
//! descriptor; then DescriptorRequest, Probe and Notify are served until the peer closes.
//! Frames this side cannot make sense of are answered with an Error frame; those after
//! which the stream cannot be trusted (bad magic, oversized or malformed body, unknown
//! version) also close the connection — that connection only.

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::error::ControlError;
use super::frame::{self, encode_frame};
use super::message::{error_code, kind, kind_name, Message, SegmentDescriptor};

/// How long a write to one peer may block before that peer is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection closed after an error waits for the peer to read the Error
/// frame and close its side.
const LINGER: Duration = Duration::from_secs(1);
/// How much a lingering connection reads (and drops) at most.
const LINGER_BYTES: u64 = 1 << 20;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the accept thread does
/// not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// What the control server asks of the engine.
pub trait ControlHandler: Send + Sync + 'static {
    /// This engine's descriptor now.
    fn descriptor(&self) -> SegmentDescriptor;
    /// A peer (named by the descriptor it handshook with) sent a notification. Called on
    /// the connection's thread; the peer gets its NotifyAck when this returns.
    fn notified(&self, from: &SegmentDescriptor, bytes: Vec<u8>);
}

/// The engine's control listener. Dropping it stops accepting, shuts every connection
/// down and joins all its threads.
pub struct ControlServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    handler: Arc<dyn ControlHandler>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<Vec<ConnSlot>>,
    /// The newest descriptor given to `publish`: its (epoch, version) and its Refresh
    /// frame (request id 0).
    latest: Mutex<Option<(Stamp, Arc<Vec<u8>>)>>,
}

struct ConnSlot {
    conn: Arc<Conn>,
    thread: Option<JoinHandle<()>>,
}

/// One peer connection, shared between its thread and `publish`.
struct Conn {
    id: u64,
    peer: SocketAddr,
    /// Writes (replies and pushes) serialized, with what was last sent.
    writer: Mutex<ConnWriter>,
    /// A handle to shut the socket down without taking the writer lock.
    control: TcpStream,
    finished: AtomicBool,
}

struct ConnWriter {
    stream: TcpStream,
    /// Set once the HandshakeReply is written: from then on `publish` pushes Refresh.
    handshaken: bool,
    /// (epoch, version) of the newest descriptor sent to this peer.
    sent: Option<Stamp>,
}

/// A descriptor's (epoch, version).
type Stamp = (u64, u64);

/// Whether a descriptor stamped `new` should follow one stamped `sent`: it is of another
/// epoch (the engine's state was reset), or a newer version.
fn supersedes(new: Stamp, sent: Option<Stamp>) -> bool {
    sent.is_none_or(|(epoch, version)| new.0 != epoch || new.1 > version)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves the data consistent (no invariant
    // spans a lock), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ControlServer {
    /// Starts serving on `listener` (already bound, blocking mode).
    ///
    /// Errors: [`ControlError::Io`] if the listener's address cannot be read or the accept
    /// thread cannot be started.
    pub fn start(
        listener: TcpListener,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<ControlServer, ControlError> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| ControlError::io("reading the listener's address", e))?;
        listener
            .set_nonblocking(false)
            .map_err(|e| ControlError::io("making the listener blocking", e))?;
        let shared = Arc::new(Shared {
            handler,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(Vec::new()),
            latest: Mutex::new(None),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kvx-ctl-accept".into())
                .spawn(move || accept_loop(&shared, listener))
                .map_err(|e| ControlError::io("starting the accept thread", e))?
        };
        log::info!("control server listening on {local_addr}");
        Ok(ControlServer {
            shared,
            local_addr,
            accept: Some(accept),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Pushes `Refresh(descriptor)` to every connected peer that has handshaken and has
    /// not yet been sent this version or a newer one of the same epoch. A peer whose
    /// write fails or times out (1 s) is disconnected. Called from user threads on
    /// register/unregister; it blocks at most 1 s per stuck peer.
    ///
    /// A descriptor that does not validate is not sent (an error is logged). Peers that
    /// handshake concurrently get this descriptor right after their HandshakeReply if
    /// theirs was older.
    pub fn publish(&self, descriptor: &SegmentDescriptor) {
        if let Err(e) = descriptor.validate() {
            log::error!(
                "control server: not publishing descriptor version {}: {e}",
                descriptor.version
            );
            return;
        }
        let frame = match encode_frame(&Message::Refresh(descriptor.clone()), 0) {
            Ok(frame) => Arc::new(frame),
            Err(e) => {
                log::error!(
                    "control server: not publishing descriptor version {}: {e}",
                    descriptor.version
                );
                return;
            }
        };
        let version = descriptor.version;
        let stamp = (descriptor.epoch, version);
        {
            let mut latest = lock(&self.shared.latest);
            if latest
                .as_ref()
                .is_none_or(|(sent, _)| *sent == stamp || supersedes(stamp, Some(*sent)))
            {
                *latest = Some((stamp, Arc::clone(&frame)));
            }
        }
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns)
            .iter()
            .map(|slot| Arc::clone(&slot.conn))
            .collect();
        for conn in conns {
            if conn.finished.load(Ordering::Acquire) {
                continue;
            }
            let mut w = lock(&conn.writer);
            if !w.handshaken || !supersedes(stamp, w.sent) {
                continue;
            }
            match w.stream.write_all(&frame) {
                Ok(()) => w.sent = Some(stamp),
                Err(e) => {
                    drop(w);
                    log::warn!(
                        "control server: disconnecting {} (connection {}): pushing descriptor version {version} failed: {e}",
                        conn.peer,
                        conn.id
                    );
                    let _ = conn.control.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Number of live connections (for tests).
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns)
            .iter()
            .filter(|slot| !slot.conn.finished.load(Ordering::Acquire))
            .count()
    }
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("local_addr", &self.local_addr)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            // Wake the accept thread with a connection of our own.
            let mut wake = self.local_addr;
            if wake.ip().is_unspecified() {
                wake.set_ip(match wake.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                });
            }
            match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
                Ok(_) => {
                    if accept.join().is_err() {
                        log::error!("control server: the accept thread panicked");
                    }
                }
                Err(e) => log::error!(
                    "control server: cannot wake the accept thread at {wake} ({e}); \
                     leaving it to end at its next connection"
                ),
            }
        }
        let slots = std::mem::take(&mut *lock(&self.shared.conns));
        for slot in &slots {
            let _ = slot.conn.control.shutdown(Shutdown::Both);
        }
        for mut slot in slots {
            if let Some(thread) = slot.thread.take() {
                if thread.join().is_err() {
                    log::error!(
                        "control server: the thread of connection {} panicked",
                        slot.conn.id
                    );
                }
            }
        }
        log::info!("control server on {} stopped", self.local_addr);
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = spawn_connection(shared, stream, peer) {
                    log::warn!("control server: dropping connection from {peer}: {e}");
                }
                reap(shared);
            }
            Err(e) => {
                log::warn!("control server: accept failed: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
    log::debug!("control server: accept thread ends");
}

/// Joins the threads of finished connections.
fn reap(shared: &Shared) {
    let done: Vec<ConnSlot> = {
        let mut conns = lock(&shared.conns);
        let (done, live) = std::mem::take(&mut *conns)
            .into_iter()
            .partition(|slot| slot.conn.finished.load(Ordering::Acquire));
        *conns = live;
        done
    };
    for mut slot in done {
        if let Some(thread) = slot.thread.take() {
            let _ = thread.join();
        }
    }
}

fn spawn_connection(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ControlError> {
    stream
        .set_nodelay(true)
        .map_err(|e| ControlError::io("setting TCP_NODELAY", e))?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(|e| ControlError::io("setting the write timeout", e))?;
    let writer = stream
        .try_clone()
        .map_err(|e| ControlError::io("cloning the socket", e))?;
    let control = stream
        .try_clone()
        .map_err(|e| ControlError::io("cloning the socket", e))?;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn {
        id,
        peer,
        writer: Mutex::new(ConnWriter {
            stream: writer,
            handshaken: false,
            sent: None,
        }),
        control,
        finished: AtomicBool::new(false),
    });
    // Registered before the thread starts, so `Drop` always finds it to shut it down.
    let mut conns = lock(&shared.conns);
    let thread = {
        let shared = Arc::clone(shared);
        let conn = Arc::clone(&conn);
        std::thread::Builder::new()
            .name(format!("kvx-ctl-conn-{id}"))
            .spawn(move || serve(&shared, &conn, stream))
            .map_err(|e| ControlError::io("starting a connection thread", e))?
    };
    log::debug!("control server: connection {id} from {peer}");
    conns.push(ConnSlot {
        conn,
        thread: Some(thread),
    });
    Ok(())
}

/// Marks the connection finished and shuts its socket down when the connection's thread
/// ends, however it ends.
struct FinishGuard<'a>(&'a Conn);

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.control.shutdown(Shutdown::Both);
        self.0.finished.store(true, Ordering::Release);
    }
}

/// How a connection ends.
enum End {
    /// The peer closed its side between frames (or the server is stopping).
    Closed,
    /// Something went wrong; an Error frame may have been sent.
    Failed(ControlError),
    /// Something went wrong and an Error frame was sent: wait for the peer to read it
    /// before closing.
    FailedAndAnswered(ControlError),
}

fn serve(shared: &Shared, conn: &Conn, stream: TcpStream) {
    let _guard = FinishGuard(conn);
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    match serve_frames(shared, conn, &mut reader) {
        End::Closed => log::debug!(
            "control server: connection {} from {} closed",
            conn.id,
            conn.peer
        ),
        End::Failed(e) => log_end(shared, conn, &e),
        End::FailedAndAnswered(e) => {
            log_end(shared, conn, &e);
            linger(conn, reader.into_inner());
        }
    }
}

fn log_end(shared: &Shared, conn: &Conn, e: &ControlError) {
    if shared.stopping.load(Ordering::SeqCst) {
        log::debug!(
            "control server: connection {} ends with the server: {e}",
            conn.id
        );
    } else {
        log::warn!(
            "control server: closing connection {} from {}: {e}",
            conn.id,
            conn.peer
        );
    }
}

/// Half-closes and drops what the peer still sends until it closes (bounded in time and
/// bytes), so that the Error frame is not lost to a reset caused by unread data.
fn linger(conn: &Conn, mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    if stream.set_read_timeout(Some(LINGER)).is_ok() {
        let _ = std::io::copy(&mut (&mut stream).take(LINGER_BYTES), &mut std::io::sink());
    }
    log::trace!("control server: connection {} lingered", conn.id);
}

/// Writes one frame under the connection's writer lock.
fn send(conn: &Conn, message: &Message, request_id: u32) -> Result<(), ControlError> {
    let frame = encode_frame(message, request_id)?;
    let mut w = lock(&conn.writer);
    w.stream.write_all(&frame).map_err(|e| {
        ControlError::io(
            format!("writing {} to {}", kind_name(message.kind()), conn.peer),
            e,
        )
    })
}

/// Sends an Error frame; failure to send it is only logged (the connection is already in
/// trouble).
fn send_error(conn: &Conn, request_id: u32, code: u16, message: String) -> bool {
    match send(conn, &Message::error(code, message), request_id) {
        Ok(()) => true,
        Err(e) => {
            log::debug!(
                "control server: connection {}: cannot send an Error frame: {e}",
                conn.id
            );
            false
        }
    }
}

fn fail_answered(conn: &Conn, request_id: u32, code: u16, e: ControlError) -> End {
    if send_error(conn, request_id, code, e.to_string()) {
        End::FailedAndAnswered(e)
    } else {
        End::Failed(e)
    }
}

fn serve_frames<R: Read>(shared: &Shared, conn: &Conn, reader: &mut R) -> End {
    let mut peer: Option<SegmentDescriptor> = None;
    loop {
        let header = match frame::read_header(reader) {
            Ok(Some(header)) => header,
            Ok(None) => return End::Closed,
            Err(e @ (ControlError::BadMagic { .. } | ControlError::BodyTooLong { .. })) => {
                return fail_answered(conn, 0, error_code::MALFORMED, e)
            }
            Err(e) => return End::Failed(e),
        };
        let id = header.request_id;
        if let Err(e) = header.check_version() {
            return fail_answered(conn, id, error_code::UNSUPPORTED_VERSION, e);
        }
        if !kind::is_known(header.kind) {
            if let Err(e) = frame::skip_body(reader, header.len) {
                return End::Failed(e);
            }
            let e = ControlError::UnknownKind { kind: header.kind };
            log::debug!("control server: connection {}: {e}", conn.id);
            if !send_error(conn, id, error_code::UNKNOWN_KIND, e.to_string()) {
                return End::Failed(e);
            }
            continue;
        }
        let body = match frame::read_body(reader, header.len) {
            Ok(body) => body,
            Err(e) => return End::Failed(e),
        };
        let message = match Message::decode(header.kind, &body) {
            Ok(message) => message,
            Err(e) => return fail_answered(conn, id, error_code::MALFORMED, e),
        };
        log::trace!(
            "control server: connection {} received {message} (request {id})",
            conn.id
        );
        let result = match (&peer, message) {
            (None, Message::Handshake(descriptor)) => {
                let own = shared.handler.descriptor();
                if let Err(e) = own.validate() {
                    return internal_error(conn, id, e);
                }
                let result = send_descriptor(conn, Message::HandshakeReply(own), id, Some(shared));
                if result.is_ok() {
                    log::info!(
                        "control server: {} (engine {:#x}, epoch {}) handshook from {}",
                        descriptor.session,
                        descriptor.engine_id,
                        descriptor.epoch,
                        conn.peer
                    );
                    peer = Some(descriptor);
                }
                result
            }
            (None, other) => {
                let e = ControlError::Unexpected {
                    kind: other.kind(),
                    reason: "the first message of a connection must be Handshake".into(),
                };
                return fail_answered(conn, id, error_code::UNEXPECTED, e);
            }
            (Some(_), Message::DescriptorRequest) => {
                let descriptor = shared.handler.descriptor();
                if let Err(e) = descriptor.validate() {
                    return internal_error(conn, id, e);
                }
                send_descriptor(conn, Message::Refresh(descriptor), id, None)
            }
            (Some(_), Message::Probe { nonce }) => send(conn, &Message::ProbeReply { nonce }, id),
            (Some(from), Message::Notify { bytes }) => {
                shared.handler.notified(from, bytes);
                send(conn, &Message::NotifyAck, id)
            }
            (Some(from), Message::Error { code, message }) => {
                log::warn!(
                    "control server: {} sent an Error (request {id}): {} {code}: {message}",
                    from.session,
                    error_code::name(code)
                );
                Ok(())
            }
            (Some(_), other) => {
                let reason = format!(
                    "{} is not a request (or Handshake was already done)",
                    kind_name(other.kind())
                );
                log::debug!("control server: connection {}: {reason}", conn.id);
                send(conn, &Message::error(error_code::UNEXPECTED, reason), id)
            }
        };
        if let Err(e) = result {
            return End::Failed(e);
        }
    }
}

fn internal_error(conn: &Conn, request_id: u32, e: ControlError) -> End {
    log::error!("control server: the engine's descriptor is invalid: {e}");
    fail_answered(conn, request_id, error_code::INTERNAL, e)
}

/// Sends a HandshakeReply or Refresh reply and records its version. For a handshake
/// (`shared` given) the connection becomes a `publish` target under the same lock, and
/// the newest published descriptor follows if it is newer than the reply's.
fn send_descriptor(
    conn: &Conn,
    message: Message,
    request_id: u32,
    shared: Option<&Shared>,
) -> Result<(), ControlError> {
    let stamp = match &message {
        Message::HandshakeReply(d) | Message::Refresh(d) => Some((d.epoch, d.version)),
        _ => None,
    };
    let frame = encode_frame(&message, request_id)?;
    let mut w = lock(&conn.writer);
    let context = |e| {
        ControlError::io(
            format!("writing {} to {}", kind_name(message.kind()), conn.peer),
            e,
        )
    };
    w.stream.write_all(&frame).map_err(context)?;
    if let Some(stamp) = stamp {
        if supersedes(stamp, w.sent) {
            w.sent = Some(stamp);
        }
    }
    if let Some(shared) = shared {
        w.handshaken = true;
        let latest = lock(&shared.latest).clone();
        if let Some((latest, frame)) = latest {
            if supersedes(latest, w.sent) {
                w.stream.write_all(&frame).map_err(context)?;
                w.sent = Some(latest);
            }
        }
    }
    Ok(())
}
