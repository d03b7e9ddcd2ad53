//! The serving side of the same-host transport: a Unix seqpacket socket in the abstract
//! namespace, served by one thread that polls every connection. A peer proves it shares
//! this host's memory (a nonce round trip through a memfd page), then attaches regions one
//! at a time: it gets a pin-table slot per region and, for engine-allocated (memfd) memory,
//! the file descriptor to map. Every attach is checked against the registry: only
//! registered regions with a `REMOTE_*` right are handed out, and read-only ones only as a
//! read-only file.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::table::{PinTable, SLOT_BYTES};
use super::wire::{
    self, code, Attachment, CudaAttachment, MapKind, Message, ShmWireError, NONCE_LEN,
};
use crate::memory::{Access, Location, Region, Registry};
use crate::sys::shm::SharedMapping;
use crate::sys::unix::{poll_readable, SeqPacket, SeqPacketListener};

/// Pin-table slots per connection: regions one peer can have attached at once.
pub const TABLE_SLOTS: u32 = 1 << 16;
/// Bytes of the proof page.
const PROOF_LEN: usize = 4096;
/// Connections served at once, at most.
const MAX_CONNECTIONS: usize = 1024;
/// A connection must complete the same-host proof within this time.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// How long taking a region away waits for a peer's copies in flight to finish (a copy is
/// one claimed range, a few MiB at most by default: microseconds to milliseconds).
const DRAIN: Duration = Duration::from_secs(2);

/// The same-host listener of one engine.
pub struct ShmServer {
    inner: Arc<Inner>,
    name: String,
    waker: SeqPacket,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ShmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmServer")
            .field("name", &self.name)
            .field("connections", &self.connections())
            .finish()
    }
}

struct Inner {
    registry: Arc<Registry>,
    engine_id: u64,
    stop: AtomicBool,
    /// Every live connection, for `revoke`.
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Closed connections with copies still counted.
    retired: Mutex<Vec<Retired>>,
}

struct Conn {
    sock: SeqPacket,
    opened: Instant,
    phase: Mutex<Phase>,
    slots: Mutex<Slots>,
}

impl Conn {
    fn proven(&self) -> bool {
        matches!(*lock(&self.phase), Phase::Proven { .. })
    }

    /// Takes every region away from this connection before it is closed: afterwards the
    /// peer cannot start a copy through it, even though its copy of the pin table lives
    /// on. Copies already counted are not waited for here (a peer killed mid-copy leaves
    /// its count behind); they are returned, to be watched until they drain.
    fn retire(&self) -> Option<Retired> {
        let table = match &*lock(&self.phase) {
            Phase::Proven { table, .. } => Arc::clone(table),
            _ => return None,
        };
        let attached = std::mem::take(&mut lock(&self.slots).by_addr);
        let busy: Vec<(u64, u32, Weak<Region>)> = attached
            .into_iter()
            .filter(|(_, a)| table.kill(a.slot, a.gen) != 0)
            .map(|(addr, a)| (addr, a.slot, a.region))
            .collect();
        (!busy.is_empty()).then(|| Retired {
            table,
            slots: busy,
            since: Instant::now(),
        })
    }
}

/// A closed connection whose peer still counted copies when it was closed: unregistering
/// those regions waits for (or, unforced, is refused by) these counts too, until they
/// drain or `GIVE_UP` passes.
struct Retired {
    table: Arc<PinTable>,
    slots: Vec<(u64, u32, Weak<Region>)>,
    since: Instant,
}

impl Retired {
    fn pins_of(&self, region: &Arc<Region>) -> impl Iterator<Item = (u32, u64)> + '_ {
        let start = region.range().start;
        let weak = Arc::downgrade(region);
        self.slots
            .iter()
            .filter(move |(addr, _, r)| *addr == start && Weak::ptr_eq(r, &weak))
            .map(|&(_, slot, _)| (slot, self.table.pins(slot)))
    }

    fn drained(&self) -> bool {
        self.slots
            .iter()
            .all(|&(_, slot, _)| self.table.pins(slot) == 0)
    }
}

/// How long a closed connection's leftover copy counts are watched: a copy takes
/// milliseconds, so counts still there after this belong to a peer that died mid-copy.
const GIVE_UP: Duration = Duration::from_secs(10);

/// Waits, until `until`, for the copies counted in `slots` (all dead) to finish; logs if
/// some do not.
fn drain(slots: &[(&PinTable, u32)], until: Instant) {
    let stuck = slots
        .iter()
        .filter(|(table, slot)| !table.drain(*slot, until))
        .count();
    if stuck != 0 {
        log::error!(
            "kvxfer: a same-host peer still counts copies in {stuck} revoked region(s) after {DRAIN:?}; going on"
        );
    }
}

enum Phase {
    /// Waiting for Hello.
    New,
    /// HelloReply sent; waiting for the peer to confirm the nonce.
    Proving {
        proof: SharedMapping,
        table: Arc<PinTable>,
        server_nonce: [u8; NONCE_LEN],
        client_nonce: [u8; NONCE_LEN],
    },
    /// The peer shares our memory; it may attach regions.
    Proven {
        /// Kept mapped: the peer reads the nonce again through cross-memory attach.
        _proof: SharedMapping,
        table: Arc<PinTable>,
    },
}

/// Which slot each attached region has, and the generations of the slots.
#[derive(Default)]
struct Slots {
    by_addr: HashMap<u64, Attached>,
    free: Vec<u32>,
    /// Last generation used per slot (0: never used).
    gens: Vec<u64>,
}

struct Attached {
    slot: u32,
    gen: u64,
    region: Weak<Region>,
}

impl ShmServer {
    /// Listens on the abstract socket `name` and serves peers of the engine `engine_id`.
    pub fn start(name: &str, engine_id: u64, registry: Arc<Registry>) -> io::Result<ShmServer> {
        let listener = SeqPacketListener::bind_abstract(name.as_bytes())?;
        listener.set_nonblocking(true)?;
        let (waker, wake_rx) = SeqPacket::pair()?;
        let inner = Arc::new(Inner {
            registry,
            engine_id,
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
        });
        let served = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("kvx-shm-server".into())
            .spawn(move || served.run(&listener, &wake_rx))?;
        Ok(ShmServer {
            inner,
            name: name.to_string(),
            waker,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The abstract socket name peers connect to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections being served.
    pub fn connections(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Takes `region` away from every peer before it leaves the registry (call with the
    /// registry's write lock held, so no attach can race). With `force` (engine-owned
    /// memory, whose pages stay valid for whoever mapped them) it always succeeds; otherwise
    /// `Err(copies)` when peers are copying into or out of it right now, and then nothing
    /// changed.
    pub fn revoke(&self, region: &Arc<Region>, force: bool) -> Result<(), u64> {
        self.inner.revoke(region, force)
    }

    /// [`ShmServer::revoke`] as a registry revoker that does not keep the server alive.
    pub fn revoker(&self) -> crate::memory::Revoker {
        let inner = Arc::downgrade(&self.inner);
        Arc::new(move |region, force| {
            inner
                .upgrade()
                .map_or(Ok(()), |inner| inner.revoke(region, force))
        })
    }

    /// Stops serving: closes the listener and every connection, joins the thread, and
    /// waits (bounded) for the copies peers had counted, since the caller may free the
    /// memory once this returns.
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Release);
        let _ = self.waker.send(&[0], &[]);
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
        self.inner.retire_all();
        let retired = std::mem::take(&mut *lock(&self.inner.retired));
        let slots: Vec<(&PinTable, u32)> = retired
            .iter()
            .flat_map(|r| r.slots.iter().map(move |&(_, slot, _)| (&*r.table, slot)))
            .collect();
        drain(&slots, Instant::now() + DRAIN);
    }
}

impl Drop for ShmServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a connection is closed.
struct Close(String);

impl Inner {
    fn run(&self, listener: &SeqPacketListener, wake: &SeqPacket) {
        let mut conns: Vec<Arc<Conn>> = Vec::new();
        // Set while accepting is paused (out of file descriptors).
        let mut paused: Option<Instant> = None;
        loop {
            if paused.is_some_and(|until| Instant::now() >= until) {
                paused = None;
            }
            // A negative fd is ignored by poll: the listener rests while paused.
            let listen_fd = if paused.is_some() {
                -1
            } else {
                listener.as_raw_fd()
            };
            let mut fds: Vec<RawFd> = vec![listen_fd, wake.as_raw_fd()];
            fds.extend(conns.iter().map(|c| c.sock.as_raw_fd()));
            // Wake up now and then only while something is waited for: a connection yet
            // to prove itself, closed connections' copies, a paused listener.
            let tick = if paused.is_some() || !lock(&self.retired).is_empty() {
                Some(Duration::from_millis(10))
            } else {
                conns
                    .iter()
                    .any(|c| !c.proven())
                    .then_some(Duration::from_secs(1))
            };
            let revents = match poll_readable(&fds, tick) {
                Ok(r) => r,
                Err(e) => {
                    log::error!("kvxfer: shm server cannot poll ({e}); same-host peers are no longer served");
                    break;
                }
            };
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let mut gone = Vec::new();
            for (i, conn) in conns.iter().enumerate() {
                if revents[i + 2] == 0 {
                    if !conn.proven() && conn.opened.elapsed() > HANDSHAKE {
                        log::debug!("kvxfer: shm connection closed: no same-host proof within {HANDSHAKE:?}");
                        gone.push(i);
                    }
                    continue;
                }
                if let Err(Close(why)) = self.serve_one(conn) {
                    log::debug!("kvxfer: shm connection closed: {why}");
                    gone.push(i);
                }
            }
            for i in gone.into_iter().rev() {
                let conn = conns.swap_remove(i);
                lock(&self.conns).retain(|c| !Arc::ptr_eq(c, &conn));
                self.retire(&conn);
            }
            lock(&self.retired).retain(|r| {
                let keep = !r.drained() && r.since.elapsed() < GIVE_UP;
                if !keep && !r.drained() {
                    log::error!("kvxfer: a closed same-host peer still counts copies after {GIVE_UP:?}: it died mid-copy; forgetting them");
                }
                keep
            });
            if revents[0] != 0 && !self.accept_all(listener, &mut conns) {
                paused = Some(Instant::now() + Duration::from_millis(100));
            }
        }
        self.retire_all();
    }

    /// Retires `conn`, keeping its leftover copy counts in view.
    fn retire(&self, conn: &Conn) {
        if let Some(r) = conn.retire() {
            lock(&self.retired).push(r);
        }
    }

    /// Retires and forgets every connection (at shutdown).
    fn retire_all(&self) {
        let conns = std::mem::take(&mut *lock(&self.conns));
        for conn in conns {
            self.retire(&conn);
        }
    }

    /// Accepts every waiting connection; false when out of file descriptors (the caller
    /// pauses accepting instead of spinning on a listener that stays readable).
    fn accept_all(&self, listener: &SeqPacketListener, conns: &mut Vec<Arc<Conn>>) -> bool {
        loop {
            match listener.accept() {
                Ok(sock) => {
                    if let Err(why) = authorised(&sock) {
                        log::warn!("kvxfer: refusing a same-host peer: {why}");
                        let reply = Message::Refused {
                            code: code::PROTOCOL,
                            reason: why,
                        };
                        let _ = sock.send(&reply.encode(0), &[]);
                        continue;
                    }
                    if conns.len() >= MAX_CONNECTIONS {
                        log::warn!("kvxfer: refusing a same-host peer: {MAX_CONNECTIONS} connections already");
                        let reply = Message::Refused {
                            code: code::INTERNAL,
                            reason: format!(
                                "this engine serves at most {MAX_CONNECTIONS} same-host peers"
                            ),
                        };
                        let _ = sock.send(&reply.encode(0), &[]);
                        continue;
                    }
                    if sock.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let conn = Arc::new(Conn {
                        sock,
                        opened: Instant::now(),
                        phase: Mutex::new(Phase::New),
                        slots: Mutex::new(Slots::default()),
                    });
                    lock(&self.conns).push(Arc::clone(&conn));
                    conns.push(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    log::warn!(
                        "kvxfer: shm accept failed: {e}; pausing new same-host peers for 100 ms"
                    );
                    return false;
                }
                Err(e) => {
                    log::warn!("kvxfer: shm accept failed: {e}");
                    return true;
                }
            }
        }
    }

    /// Reads and answers one message; `Err` closes the connection.
    fn serve_one(&self, conn: &Conn) -> Result<(), Close> {
        let mut buf = [0u8; wire::MAX_MESSAGE];
        let got = match conn.sock.recv(&mut buf, None) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(Close(format!("receive failed: {e}"))),
        };
        if got.len == 0 && got.fds.is_empty() {
            return Err(Close("the peer closed the connection".into()));
        }
        if got.truncated || !got.fds.is_empty() {
            return self.refuse(
                conn,
                0,
                code::PROTOCOL,
                "a request must be one short message without file descriptors",
            );
        }
        let (req, msg) = match wire::decode(&buf[..got.len]) {
            Ok(m) => m,
            Err(e @ ShmWireError::Version(_)) => {
                return self.refuse(conn, 0, code::UNSUPPORTED_VERSION, &e.to_string())
            }
            Err(e) => return self.refuse(conn, 0, code::PROTOCOL, &e.to_string()),
        };
        match msg {
            Message::Hello {
                target_engine,
                client_nonce,
                ..
            } => self.hello(conn, req, target_engine, client_nonce),
            Message::Confirm { server_nonce } => self.confirm(conn, req, server_nonce),
            Message::Attach { addr } => self.attach(conn, req, addr),
            other => self.refuse(
                conn,
                req,
                code::PROTOCOL,
                &format!("{} is not a request", other.kind_name()),
            ),
        }
    }

    fn refuse(&self, conn: &Conn, req: u64, code: u32, reason: &str) -> Result<(), Close> {
        let reply = Message::Refused {
            code,
            reason: reason.to_string(),
        };
        let _ = conn.sock.send(&reply.encode(req), &[]);
        Err(Close(format!("refused ({}): {reason}", code::name(code))))
    }

    fn send(
        &self,
        conn: &Conn,
        req: u64,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Close> {
        // The socket does not block: a peer that does not read its replies (it only ever
        // has one request outstanding) is dropped rather than stalling every peer.
        conn.sock
            .send(&msg.encode(req), fds)
            .map_err(|e| Close(format!("cannot send {}: {e}", msg.kind_name())))
    }

    fn hello(
        &self,
        conn: &Conn,
        req: u64,
        target: u64,
        client_nonce: [u8; NONCE_LEN],
    ) -> Result<(), Close> {
        let mut phase = lock(&conn.phase);
        if !matches!(*phase, Phase::New) {
            return self.refuse(conn, req, code::PROTOCOL, "a second Hello");
        }
        if target != self.engine_id {
            return self.refuse(
                conn,
                req,
                code::WRONG_ENGINE,
                &format!(
                    "this socket serves engine {:016x}, not {target:016x}",
                    self.engine_id
                ),
            );
        }
        let made = (|| {
            let proof = SharedMapping::create("shm-proof", PROOF_LEN)?;
            let table = SharedMapping::create("shm-pins", TABLE_SLOTS as usize * SLOT_BYTES)?;
            Ok::<_, io::Error>((proof, table))
        })();
        let (proof, table_map) = match made {
            Ok(m) => m,
            Err(e) => {
                return self.refuse(
                    conn,
                    req,
                    code::INTERNAL,
                    &format!("cannot create shared pages: {e}"),
                )
            }
        };
        let server_nonce = super::random_nonce();
        proof.write_at(0, &server_nonce);
        let reply = Message::HelloReply {
            engine_id: self.engine_id,
            proof_addr: proof.as_ptr() as u64,
            pid: std::process::id(),
            proof_len: PROOF_LEN as u32,
            table_slots: TABLE_SLOTS,
        };
        let fds = [proof.fd(), table_map.fd()];
        self.send(conn, req, &reply, &fds)?;
        let (base, len) = (table_map.as_ptr(), table_map.mapped_len());
        // SAFETY: `base` is the start of our own fresh shared mapping of `len` bytes, kept
        // alive by the table (it owns `table_map`), and only ever accessed through the
        // table's atomics, here and in the peer.
        let table = unsafe { PinTable::new(base, len, TABLE_SLOTS, Box::new(table_map)) };
        let Some(table) = table else {
            return self.refuse(conn, req, code::INTERNAL, "the pin table is misaligned");
        };
        *phase = Phase::Proving {
            proof,
            table: Arc::new(table),
            server_nonce,
            client_nonce,
        };
        Ok(())
    }

    fn confirm(&self, conn: &Conn, req: u64, echoed: [u8; NONCE_LEN]) -> Result<(), Close> {
        let mut phase = lock(&conn.phase);
        let Phase::Proving {
            proof,
            table,
            server_nonce,
            client_nonce,
        } = std::mem::replace(&mut *phase, Phase::New)
        else {
            return self.refuse(conn, req, code::PROTOCOL, "Confirm before Hello, or twice");
        };
        let mut written = [0u8; NONCE_LEN];
        proof.read_at(NONCE_LEN, &mut written);
        if echoed != server_nonce {
            return self.refuse(conn, req, code::BAD_PROOF, "the nonce sent back is not the one in the shared page: the peer does not see our memory");
        }
        if written != client_nonce {
            return self.refuse(conn, req, code::BAD_PROOF, "the peer's nonce did not appear in our copy of the shared page: we do not see its writes");
        }
        self.send(conn, req, &Message::Proven, &[])?;
        *phase = Phase::Proven {
            _proof: proof,
            table,
        };
        Ok(())
    }

    fn attach(&self, conn: &Conn, req: u64, addr: u64) -> Result<(), Close> {
        let table = match &*lock(&conn.phase) {
            Phase::Proven { table, .. } => Arc::clone(table),
            _ => {
                return self.refuse(
                    conn,
                    req,
                    code::PROTOCOL,
                    "Attach before the same-host proof",
                )
            }
        };
        // Under the registry's read lock, so that no unregister (which revokes under the
        // write lock) can slip between the check and the slot being opened.
        let map = self.registry.read();
        let Some(region) = map.get(&addr).cloned() else {
            drop(map);
            let reply = Message::Refused {
                code: code::NOT_REGISTERED,
                reason: format!("no region registered at {addr:#x}"),
            };
            return self.send(conn, req, &reply, &[]);
        };
        let access = region.access();
        if !access.intersects(Access::REMOTE_READ | Access::REMOTE_WRITE) {
            drop(map);
            let reply = Message::Refused {
                code: code::NO_REMOTE_ACCESS,
                reason: format!(
                    "region {} grants peers no access ({access})",
                    region.range()
                ),
            };
            return self.send(conn, req, &reply, &[]);
        }
        // GPU memory travels as its CUDA IPC handle: found before a slot is opened, so that
        // a region that cannot be shared leaves no slot behind.
        let gpu = match region.location() {
            Location::Cuda(_) => match cuda_ipc(&region) {
                Ok(ipc) => Some(ipc),
                Err(reason) => {
                    drop(map);
                    let reply = Message::Refused {
                        code: code::INTERNAL,
                        reason: format!("GPU region {} cannot be shared: {reason}", region.range()),
                    };
                    return self.send(conn, req, &reply, &[]);
                }
            },
            _ => None,
        };
        let opened = lock(&conn.slots).open(&region, &table);
        drop(map);
        let Some((slot, gen)) = opened else {
            let reply = Message::Refused {
                code: code::TABLE_FULL,
                reason: format!("this peer already has {TABLE_SLOTS} regions attached"),
            };
            return self.send(conn, req, &reply, &[]);
        };
        if let Some(ipc) = gpu {
            let reply = Message::AttachedCuda(CudaAttachment {
                addr,
                len: region.range().len,
                gen,
                offset: ipc.offset,
                access: access.bits(),
                slot,
                pci_bus_id: ipc.pci_bus_id,
                handle: ipc.handle,
            });
            return self.send(conn, req, &reply, &[]);
        }
        let (map_kind, fd) = share(&region);
        let reply = Message::Attached(Attachment {
            addr,
            len: region.range().len,
            gen,
            access: access.bits(),
            slot,
            map: map_kind,
        });
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
        self.send(conn, req, &reply, &fds)
    }

    fn revoke(&self, region: &Arc<Region>, force: bool) -> Result<(), u64> {
        let conns = lock(&self.conns).clone();
        let mut busy = 0;
        let mut held = Vec::new();
        // First every peer's slot stops taking new copies (pinners wait for the verdict),
        // and their copies in flight are counted; then all slots live on (busy) or all end.
        for conn in &conns {
            let table = match &*lock(&conn.phase) {
                Phase::Proven { table, .. } => Arc::clone(table),
                _ => continue,
            };
            let slots = lock(&conn.slots);
            let Some(a) = slots.by_addr.get(&region.range().start) else {
                continue;
            };
            if !Weak::ptr_eq(&a.region, &Arc::downgrade(region)) {
                continue;
            }
            busy += table.begin_revoke(a.slot, a.gen);
            held.push((Arc::clone(conn), table, a.slot, a.gen));
        }
        // Closed connections' copies still running into this region count as well.
        let retired = lock(&self.retired);
        let leftover: Vec<(&PinTable, u32)> = retired
            .iter()
            .flat_map(|r| r.pins_of(region).map(move |(slot, _)| (&*r.table, slot)))
            .collect();
        busy += leftover.iter().map(|(t, slot)| t.pins(*slot)).sum::<u64>();
        if busy != 0 && !force {
            for (_, table, slot, gen) in &held {
                table.finish_revoke(*slot, *gen, false);
            }
            return Err(busy);
        }
        for (_, table, slot, gen) in &held {
            table.finish_revoke(*slot, *gen, true);
        }
        if force {
            // Engine-owned memory may be reached by cross-memory attach too (when its file
            // could not be shared): the pages go back to the kernel once we return, so no
            // copy may still be running into them. One deadline for all of them.
            let mut slots = leftover;
            slots.extend(held.iter().map(|(_, table, slot, _)| (&**table, *slot)));
            drain(&slots, Instant::now() + DRAIN);
        }
        drop(retired);
        for (conn, _, _, _) in held {
            lock(&conn.slots).close(region.range().start);
        }
        Ok(())
    }
}

/// Whether the process behind `sock` may use our memory: our own user, or root (which
/// could read and write it anyway). Others are refused: they could not ptrace us either.
fn authorised(sock: &SeqPacket) -> Result<(), String> {
    let cred = sock
        .peer_cred()
        .map_err(|e| format!("cannot read its credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid == me || cred.uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "pid {} runs as uid {}, this engine as uid {me}: only the same user (or root) may share its memory",
            cred.pid, cred.uid
        ))
    }
}

impl Slots {
    /// The slot and generation of `region` for this peer, opening a slot if needed;
    /// `None` when the table is full.
    fn open(&mut self, region: &Arc<Region>, table: &PinTable) -> Option<(u32, u64)> {
        let addr = region.range().start;
        if let Some(a) = self.by_addr.get(&addr) {
            if Weak::ptr_eq(&a.region, &Arc::downgrade(region)) {
                return Some((a.slot, a.gen));
            }
            // A region registered again at the same address: the old slot is stale.
            let stale = a.slot;
            table.revoke(stale, a.gen, true);
            self.close(addr);
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if (self.gens.len() as u32) < table.slots() => {
                self.gens.push(0);
                self.gens.len() as u32 - 1
            }
            None => return None,
        };
        // Odd generations are live; each use of a slot gets a new one.
        let gen = self.gens[slot as usize] + 1;
        self.gens[slot as usize] = gen;
        table.open(slot, gen);
        self.by_addr.insert(
            addr,
            Attached {
                slot,
                gen,
                region: Arc::downgrade(region),
            },
        );
        Some((slot, gen))
    }

    /// Forgets the region at `addr`; its slot can be reused (with a new generation).
    fn close(&mut self, addr: u64) {
        if let Some(a) = self.by_addr.remove(&addr) {
            // The dead state written by revoke is gen + 1 (even); the next use adds one.
            self.gens[a.slot as usize] = a.gen + 1;
            self.free.push(a.slot);
        }
    }
}

/// What a peer needs to map a region in GPU memory: the CUDA IPC handle of the allocation
/// that holds it, where the region starts in it, and the GPU's PCI bus id.
struct CudaIpc {
    offset: u64,
    pci_bus_id: [u8; wire::PCI_BUS_ID_LEN],
    handle: [u8; wire::CUDA_IPC_HANDLE_LEN],
}

fn cuda_ipc(region: &Region) -> Result<CudaIpc, String> {
    let cuda =
        crate::sys::cuda::driver_in_use().ok_or("this process does not use the CUDA driver")?;
    let start = region.range().start;
    let device = cuda
        .device_memory(start)
        .ok_or_else(|| format!("{start:#x} is not GPU memory the CUDA driver knows"))?;
    if region.range().end() > device.base.saturating_add(device.len) {
        return Err(format!(
            "it runs past the end of its GPU allocation ({} bytes at {:#x})",
            device.len, device.base
        ));
    }
    let handle = crate::sys::cuda::ipc_handle(device.base).map_err(|e| e.to_string())?;
    let pci = cuda.pci_bus_id(device.device).map_err(|e| e.to_string())?;
    let pci_bus_id = CudaAttachment::with_pci_bus_id(&pci)
        .ok_or_else(|| format!("PCI bus id {pci:?} does not fit the message"))?;
    Ok(CudaIpc {
        offset: start - device.base,
        pci_bus_id,
        handle: handle.0,
    })
}

/// How a peer may reach `region`'s bytes: engine-allocated memory that peers may read and
/// write as its memfd; everything else only by cross-memory attach. (A read-only file descriptor of
/// a memfd would not do for read-only regions: the peer could open it again read-write
/// through /proc, memfds being mode 0777.)
fn share(region: &Region) -> (MapKind, Option<OwnedFd>) {
    let Some(mapping) = region.shared_mapping() else {
        return (MapKind::None, None);
    };
    // A shared file gives both rights: only regions that grant both are passed as one.
    if !region
        .access()
        .contains(Access::REMOTE_READ | Access::REMOTE_WRITE)
    {
        return (MapKind::None, None);
    }
    match mapping.fd().try_clone_to_owned() {
        Ok(fd) => (
            MapKind::ReadWrite {
                offset: 0,
                file_len: mapping.mapped_len() as u64,
            },
            Some(fd),
        ),
        Err(e) => {
            log::debug!(
                "kvxfer: cannot duplicate a memfd ({e}); peers use cross-memory attach for it"
            );
            (MapKind::None, None)
        }
    }
}
