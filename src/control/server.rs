//! The control server: one accept thread, one publisher thread, plus one thread per
//! connection (peers are few; at most [`ServerLimits::max_connections`] at once).
//!
//! Per connection the first frame must be a Handshake (within
//! [`ServerLimits::handshake_timeout`]), answered with the handler's descriptor; then
//! DescriptorRequest, Probe, Notify and RdmaConnect are served until the peer closes. Frames this side
//! cannot make sense of are answered with an Error frame; those after which the stream
//! cannot be trusted (bad magic, oversized or malformed body, unknown version) also close
//! the connection — that connection only. A body longer than its kind allows is refused
//! from the header, before it is read.
//!
//! [`ControlServer::publish`] never writes to a socket: it stores the newest descriptor
//! and wakes the publisher thread, which pushes it to every handshaken peer that has not
//! got it, each frame within a deadline of 1 s (a peer that does not read in time is
//! disconnected).

use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::ControlError;
use super::frame::{self, encode_frame};
use super::message::{
    descriptor_body, error_code, kind, kind_name, max_body, Message, RdmaConnectReply,
    RdmaConnectRequest, SegmentDescriptor,
};

/// Default cap on live connections per server ([`ServerLimits::max_connections`]).
pub const MAX_CONNECTIONS: usize = 1024;
/// Default time a new connection has to complete its Handshake
/// ([`ServerLimits::handshake_timeout`]).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long writing one frame to one peer may take in all before that peer is
/// disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection closed after an error waits (in all) for the peer to read the
/// Error frame and close its side.
const LINGER: Duration = Duration::from_secs(1);
/// How much a lingering connection reads (and drops) at most.
const LINGER_BYTES: u64 = 1 << 20;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the accept thread does
/// not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// How long a connection's thread spins for the next request before it sleeps in read.
const SPIN: Duration = Duration::from_micros(50);

/// What the control server asks of the engine.
pub trait ControlHandler: Send + Sync + 'static {
    /// This engine's descriptor now.
    fn descriptor(&self) -> SegmentDescriptor;
    /// A peer (named by the descriptor it handshook with) sent a notification. Called on
    /// the connection's thread; it must not block for long.
    ///
    /// `Ok(())`: the notification was taken; the peer gets its NotifyAck. `Err(reason)`:
    /// it was refused (e.g. the inbox is full); the peer gets an Error of code
    /// [`error_code::BUSY`](super::error_code::BUSY) with `reason` (its
    /// [`ControlClient::notify`](super::ControlClient::notify) returns
    /// [`ControlError::PeerError`]) and the connection stays up.
    fn notified(&self, from: &SegmentDescriptor, bytes: Vec<u8>) -> Result<(), String>;

    /// A peer (named by the descriptor it handshook with) asks to connect an RDMA queue
    /// pair of this engine, on its NIC number `request.target_nic` (an index into this
    /// engine's [`SegmentDescriptor::rdma_nics`], which the handler must check), to the
    /// peer's queue pair `request.qpn`. Called on the connection's thread; it must not
    /// block for long (creating a QP and moving it to RTS is fine).
    ///
    /// `Ok(reply)`: this engine's queue pair, already in RTR/RTS; the peer gets it (a
    /// reply that does not [validate](RdmaConnectReply::validate) is not sent: the peer
    /// gets an Error of code [`error_code::INTERNAL`](super::error_code::INTERNAL)
    /// instead). `Err(reason)`: refused; the peer gets an Error of code
    /// [`error_code::RDMA_REFUSED`](super::error_code::RDMA_REFUSED) with `reason` (its
    /// [`ControlClient::rdma_connect`](super::ControlClient::rdma_connect) returns
    /// [`ControlError::PeerError`]). Either way the connection stays up.
    ///
    /// The default refuses: "this engine does not serve RDMA".
    fn rdma_connect(
        &self,
        from: &SegmentDescriptor,
        request: &RdmaConnectRequest,
    ) -> Result<RdmaConnectReply, String> {
        let _ = (from, request);
        Err("this engine does not serve RDMA".into())
    }

    /// A peer sent a request to the store segment this engine serves (`body`: the store's
    /// own message, opaque here). Called on the connection's thread.
    ///
    /// `Ok(reply)`: sent back as a StoreReply. `Err(reason)`: the peer gets an Error of
    /// code [`error_code::STORE_REFUSED`](super::error_code::STORE_REFUSED); the connection
    /// stays up.
    ///
    /// The default refuses: "this engine serves no store segment".
    fn store(&self, from: &SegmentDescriptor, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let _ = (from, body);
        Err("this engine serves no store segment".into())
    }
}

/// Limits of a [`ControlServer`] (see [`ControlServer::start_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time a connection has, from its accept, to complete its Handshake; a connection
    /// that has not is closed. Default [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// Most live connections; a connection beyond it is accepted and closed at once.
    /// Default [`MAX_CONNECTIONS`].
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// The engine's control listener. Dropping it stops accepting, shuts every connection
/// down and joins all its threads (bounded: shut-down sockets end every read and write).
pub struct ControlServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    publisher: Option<JoinHandle<()>>,
}

struct Shared {
    handler: Arc<dyn ControlHandler>,
    limits: ServerLimits,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<Vec<ConnSlot>>,
    /// The newest descriptor given to `publish`, with its Refresh frame once encoded.
    latest: Mutex<Option<Latest>>,
    /// Work for the publisher thread.
    publish: Mutex<PublishState>,
    publish_wake: Condvar,
}

struct Latest {
    stamp: Stamp,
    descriptor: Arc<SegmentDescriptor>,
    /// The Refresh frame (request id 0), encoded on first need; `Err` if it cannot be.
    frame: Option<Result<Arc<Vec<u8>>, ()>>,
}

#[derive(Default)]
struct PublishState {
    /// A descriptor was published since the publisher last looked.
    dirty: bool,
    /// The server is being dropped.
    stopping: bool,
}

struct ConnSlot {
    conn: Arc<Conn>,
    thread: Option<JoinHandle<()>>,
}

/// One peer connection, shared between its thread and the publisher thread.
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
    /// Set once the HandshakeReply is written: from then on the publisher pushes Refresh.
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

/// Writes all of `bytes` within `timeout` in all (not per `write` call, so a peer that
/// reads a trickle cannot stretch it). On error part of the frame may have been written:
/// the stream is then out of sync and must be closed.
fn write_frame(stream: &TcpStream, bytes: &[u8], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut written = 0;
    while written < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the peer did not read a {}-byte frame within {timeout:?} ({written} bytes written)",
                    bytes.len()
                ),
            ));
        }
        stream.set_write_timeout(Some(left))?;
        match (&mut &*stream).write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The timeout of this call: loop to report it against the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl ControlServer {
    /// Starts serving on `listener` (already bound, blocking mode) with the default
    /// [`ServerLimits`].
    ///
    /// Errors: [`ControlError::Io`] if the listener's address cannot be read or a thread
    /// cannot be started.
    pub fn start(
        listener: TcpListener,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<ControlServer, ControlError> {
        ControlServer::start_with(listener, handler, ServerLimits::default())
    }

    /// Starts serving on `listener` (already bound, blocking mode) under `limits`.
    ///
    /// Errors: [`ControlError::Io`] if the listener's address cannot be read or a thread
    /// cannot be started.
    pub fn start_with(
        listener: TcpListener,
        handler: Arc<dyn ControlHandler>,
        limits: ServerLimits,
    ) -> Result<ControlServer, ControlError> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| ControlError::io("reading the listener's address", e))?;
        listener
            .set_nonblocking(false)
            .map_err(|e| ControlError::io("making the listener blocking", e))?;
        let shared = Arc::new(Shared {
            handler,
            limits,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(Vec::new()),
            latest: Mutex::new(None),
            publish: Mutex::new(PublishState::default()),
            publish_wake: Condvar::new(),
        });
        let publisher = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kvx-ctl-publish".into())
                .spawn(move || publish_loop(&shared))
                .map_err(|e| ControlError::io("starting the publisher thread", e))?
        };
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kvx-ctl-accept".into())
                .spawn(move || accept_loop(&shared, listener))
        };
        let accept = match accept {
            Ok(accept) => accept,
            Err(e) => {
                stop_publisher(&shared, publisher);
                return Err(ControlError::io("starting the accept thread", e));
            }
        };
        log::info!("control server listening on {local_addr}");
        Ok(ControlServer {
            shared,
            local_addr,
            accept: Some(accept),
            publisher: Some(publisher),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Has `Refresh(descriptor)` pushed to every connected peer that has handshaken and
    /// has not yet been sent this version or a newer one of the same epoch. Never blocks
    /// on the network: it stores the descriptor as the newest and wakes the publisher
    /// thread, which encodes it only if some peer needs it and writes it to each such
    /// peer within 1 s (a peer that does not take it in time is disconnected). Called
    /// from user threads on register/unregister.
    ///
    /// A descriptor that does not validate is not sent (an error is logged); neither is
    /// one older than a descriptor already published. Peers that handshake concurrently
    /// get the newest descriptor right after their HandshakeReply if theirs was older.
    pub fn publish(&self, descriptor: &SegmentDescriptor) {
        if let Err(e) = descriptor.validate() {
            log::error!(
                "control server: not publishing descriptor version {}: {e}",
                descriptor.version
            );
            return;
        }
        let stamp = (descriptor.epoch, descriptor.version);
        {
            let mut latest = lock(&self.shared.latest);
            if latest
                .as_ref()
                .is_some_and(|l| l.stamp != stamp && !supersedes(stamp, Some(l.stamp)))
            {
                log::debug!(
                    "control server: not publishing descriptor version {}: a newer one was",
                    descriptor.version
                );
                return;
            }
            *latest = Some(Latest {
                stamp,
                descriptor: Arc::new(descriptor.clone()),
                frame: None,
            });
        }
        lock(&self.shared.publish).dirty = true;
        self.shared.publish_wake.notify_one();
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
        // No connection is added from here on. Shutting the sockets down ends every
        // blocked read and write (the publisher's included) at once.
        let slots = std::mem::take(&mut *lock(&self.shared.conns));
        for slot in &slots {
            let _ = slot.conn.control.shutdown(Shutdown::Both);
        }
        if let Some(publisher) = self.publisher.take() {
            stop_publisher(&self.shared, publisher);
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

fn stop_publisher(shared: &Shared, publisher: JoinHandle<()>) {
    lock(&shared.publish).stopping = true;
    shared.publish_wake.notify_all();
    if publisher.join().is_err() {
        log::error!("control server: the publisher thread panicked");
    }
}

fn publish_loop(shared: &Shared) {
    loop {
        {
            let mut state = lock(&shared.publish);
            while !state.dirty && !state.stopping {
                state = shared
                    .publish_wake
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if state.stopping {
                break;
            }
            state.dirty = false;
        }
        push_latest(shared);
    }
    log::debug!("control server: publisher thread ends");
}

/// The newest published descriptor's stamp and Refresh frame (request id 0), encoding it
/// if no one has yet. `None` if nothing was published or it cannot be encoded.
fn latest_frame(shared: &Shared) -> Option<(Stamp, Arc<Vec<u8>>)> {
    let (stamp, descriptor) = {
        let latest = lock(&shared.latest);
        let latest = latest.as_ref()?;
        match &latest.frame {
            Some(Ok(frame)) => return Some((latest.stamp, Arc::clone(frame))),
            Some(Err(())) => return None,
            None => (latest.stamp, Arc::clone(&latest.descriptor)),
        }
    };
    // Encoded outside the lock: `publish` never waits for an encoding.
    let encoded = frame::frame_bytes(kind::REFRESH, 0, &descriptor_body(&descriptor))
        .map(Arc::new)
        .map_err(|e| {
            log::error!(
                "control server: cannot push descriptor version {}: {e}",
                descriptor.version
            )
        });
    let mut latest = lock(&shared.latest);
    if let Some(latest) = latest.as_mut().filter(|l| l.stamp == stamp) {
        if Arc::ptr_eq(&latest.descriptor, &descriptor) {
            latest.frame = Some(encoded.clone());
        }
    }
    encoded.ok().map(|frame| (stamp, frame))
}

/// Sends the newest descriptor to every handshaken connection that has not got it (or a
/// newer one), each within [`WRITE_TIMEOUT`]; a connection that fails is shut down.
fn push_latest(shared: &Shared) {
    let Some(mut stamp) = lock(&shared.latest).as_ref().map(|l| l.stamp) else {
        return;
    };
    let conns: Vec<Arc<Conn>> = lock(&shared.conns)
        .iter()
        .map(|slot| Arc::clone(&slot.conn))
        .collect();
    let mut frame: Option<Arc<Vec<u8>>> = None;
    for conn in conns {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if conn.finished.load(Ordering::Acquire) {
            continue;
        }
        let mut w = lock(&conn.writer);
        if !w.handshaken || !supersedes(stamp, w.sent) {
            continue;
        }
        let bytes = match &frame {
            Some(bytes) => Arc::clone(bytes),
            None => {
                // Encoded only once some peer needs it. If a newer descriptor came
                // meanwhile, that one is sent (and the next round finds it sent).
                let Some((newest, bytes)) = latest_frame(shared) else {
                    return;
                };
                stamp = newest;
                frame = Some(Arc::clone(&bytes));
                if !supersedes(stamp, w.sent) {
                    continue;
                }
                bytes
            }
        };
        match write_frame(&w.stream, &bytes, WRITE_TIMEOUT) {
            Ok(()) => w.sent = Some(stamp),
            Err(e) => {
                drop(w);
                log::warn!(
                    "control server: disconnecting {} (connection {}): pushing descriptor version {} failed: {e}",
                    conn.peer,
                    conn.id,
                    stamp.1
                );
                let _ = conn.control.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    // Connections refused since the cap was last reached (logged once per burst).
    let mut refused: u64 = 0;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match accepted {
            Ok((stream, peer)) => {
                reap(shared);
                let live = lock(&shared.conns).len();
                if live >= shared.limits.max_connections {
                    if refused == 0 {
                        log::warn!(
                            "control server: {live} connections, the limit; refusing new ones \
                             (first: {peer}) until some close"
                        );
                    }
                    refused += 1;
                    drop(stream);
                    continue;
                }
                if refused > 0 {
                    log::warn!(
                        "control server: accepting connections again; {refused} were refused \
                         at the limit of {}",
                        shared.limits.max_connections
                    );
                    refused = 0;
                }
                if let Err(e) = spawn_connection(shared, stream, peer) {
                    log::warn!("control server: dropping connection from {peer}: {e}");
                }
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
    // The handshake deadline runs from the accept.
    let reader = ConnReader {
        stream,
        deadline: Some(Instant::now() + shared.limits.handshake_timeout),
        what: "no Handshake arrived in time",
    };
    // Registered before the thread starts, so `Drop` always finds it to shut it down.
    let mut conns = lock(&shared.conns);
    let thread = {
        let shared = Arc::clone(shared);
        let conn = Arc::clone(&conn);
        std::thread::Builder::new()
            .name(format!("kvx-ctl-conn-{id}"))
            .spawn(move || serve(&shared, &conn, reader))
            .map_err(|e| ControlError::io("starting a connection thread", e))?
    };
    log::debug!("control server: connection {id} from {peer}");
    conns.push(ConnSlot {
        conn,
        thread: Some(thread),
    });
    Ok(())
}

/// The reading side of a connection, with an optional overall deadline (until the
/// handshake, and while lingering) enforced through the socket's read timeout.
struct ConnReader {
    stream: TcpStream,
    deadline: Option<Instant>,
    /// What passing the deadline means (the error's text).
    what: &'static str,
}

impl ConnReader {
    /// Sets (or clears) the deadline; clearing it also clears the socket's read timeout.
    fn set_deadline(&mut self, deadline: Option<Instant>, what: &'static str) -> io::Result<()> {
        self.deadline = deadline;
        self.what = what;
        if deadline.is_none() {
            self.stream.set_read_timeout(None)?;
        }
        Ok(())
    }

    fn expired(&self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, self.what)
    }
}

impl Read for ConnReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(deadline) = self.deadline else {
            return self.stream.read(buf);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.expired());
        }
        self.stream.set_read_timeout(Some(left))?;
        match self.stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(self.expired())
            }
            other => other,
        }
    }
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

fn serve(shared: &Shared, conn: &Conn, reader: ConnReader) {
    let _guard = FinishGuard(conn);
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
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

/// Half-closes and drops what the peer still sends until it closes (bounded in time, in
/// all, and bytes), so that the Error frame is not lost to a reset caused by unread data.
fn linger(conn: &Conn, mut reader: ConnReader) {
    let _ = reader.stream.shutdown(Shutdown::Write);
    if reader
        .set_deadline(Some(Instant::now() + LINGER), "lingering ended")
        .is_ok()
    {
        let _ = io::copy(&mut (&mut reader).take(LINGER_BYTES), &mut io::sink());
    }
    log::trace!("control server: connection {} lingered", conn.id);
}

/// Writes one frame under the connection's writer lock, within [`WRITE_TIMEOUT`].
fn send(conn: &Conn, message: &Message, request_id: u32) -> Result<(), ControlError> {
    let frame = encode_frame(message, request_id)?;
    let w = lock(&conn.writer);
    write_frame(&w.stream, &frame, WRITE_TIMEOUT).map_err(|e| {
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

fn serve_frames(shared: &Shared, conn: &Conn, reader: &mut BufReader<ConnReader>) -> End {
    let mut peer: Option<SegmentDescriptor> = None;
    loop {
        if reader.buffer().is_empty() {
            // A peer issuing requests back to back (a prefix-cache lookup per batch) sends
            // the next within microseconds: spin before sleeping in read.
            crate::sys::spin::spin_until_readable(&reader.get_ref().stream, SPIN);
        }
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
        let max = max_body(header.kind);
        if header.len > max {
            let e = ControlError::Malformed {
                kind: header.kind,
                reason: format!(
                    "a body of {} bytes exceeds the limit of {max} bytes for this kind",
                    header.len
                ),
            };
            return fail_answered(conn, id, error_code::MALFORMED, e);
        }
        if peer.is_none() && header.kind != kind::HANDSHAKE {
            // Refused from the header: the body of a frame that cannot be served is not
            // read.
            let e = ControlError::Unexpected {
                kind: header.kind,
                reason: "the first message of a connection must be Handshake".into(),
            };
            return fail_answered(conn, id, error_code::UNEXPECTED, e);
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
                    if let Err(e) = reader.get_mut().set_deadline(None, "") {
                        return End::Failed(ControlError::io("clearing the read timeout", e));
                    }
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
            (Some(_), Message::Quiet) => {
                // No more Refresh pushes here (the client reads only its own replies).
                lock(&conn.writer).handshaken = false;
                Ok(())
            }
            (Some(from), Message::Notify { bytes }) => match shared.handler.notified(from, bytes) {
                Ok(()) => send(conn, &Message::NotifyAck, id),
                Err(reason) => {
                    log::debug!(
                            "control server: connection {}: notification (request {id}) refused: {reason}",
                            conn.id
                        );
                    send(conn, &Message::error(error_code::BUSY, reason), id)
                }
            },
            (Some(from), Message::RdmaConnect(request)) => {
                let answer = match shared.handler.rdma_connect(from, &request) {
                    Ok(reply) => match reply.validate() {
                        Ok(()) => Message::RdmaConnectReply(reply),
                        Err(e) => {
                            log::error!(
                                "control server: connection {}: the engine's answer to \
                                 {} (request {id}) is not sent: {e}",
                                conn.id,
                                Message::RdmaConnect(request)
                            );
                            Message::error(
                                error_code::INTERNAL,
                                format!("the target's RDMA connection reply is invalid: {e}"),
                            )
                        }
                    },
                    Err(reason) => {
                        log::debug!(
                            "control server: connection {}: {} (request {id}) refused: {reason}",
                            conn.id,
                            Message::RdmaConnect(request)
                        );
                        Message::error(error_code::RDMA_REFUSED, reason)
                    }
                };
                send(conn, &answer, id)
            }
            (Some(from), Message::StoreRequest(body)) => {
                let answer = match shared.handler.store(from, body) {
                    Ok(reply) => Message::StoreReply(reply),
                    Err(reason) => Message::error(error_code::STORE_REFUSED, reason),
                };
                send(conn, &answer, id)
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
/// (`shared` given) the connection becomes a publisher target under the same lock, and
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
    write_frame(&w.stream, &frame, WRITE_TIMEOUT).map_err(context)?;
    if let Some(stamp) = stamp {
        if supersedes(stamp, w.sent) {
            w.sent = Some(stamp);
        }
    }
    if let Some(shared) = shared {
        w.handshaken = true;
        let newer = lock(&shared.latest)
            .as_ref()
            .is_some_and(|l| supersedes(l.stamp, w.sent));
        if newer {
            if let Some((latest, frame)) = latest_frame(shared) {
                if supersedes(latest, w.sent) {
                    write_frame(&w.stream, &frame, WRITE_TIMEOUT).map_err(context)?;
                    w.sent = Some(latest);
                }
            }
        }
    }
    Ok(())
}
