//! The engine: registered memory, peers, transports and batches.

mod batch;
mod config;
mod error;
mod net;
mod progress;
mod remote;
mod slab;
mod slicing;
mod stats;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

pub use config::{EngineConfig, EngineConfigBuilder, SLICE_SIZE_RANGE};
pub use error::{Error, Result, Side};
pub(crate) use net::split_host_port as split_session;
pub use net::{Notification, StoreService};
pub use progress::Outcome;
pub use slicing::Op;
pub use stats::EngineStats;

use batch::{far_future, Batch, PendingNotify};
use net::{Inbox, Net};
use progress::StopReason;
use remote::RemotePeer;
use slab::GenSlab;
use slicing::{AddressSpaces, Pins};
use stats::Counters;

use crate::control::RegionInfo;
use crate::memory::{Access, Buffer, Location, Region, RegionLookup, RegionSpec, Registry};
use crate::transport::local::LocalTransport;
use crate::transport::{Slice, Transport, TransportInfo, TransportKind};

/// Names a peer of this engine. Ids carry a generation: a closed peer's id stays invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerId(u64);

/// Names a submitted batch. Ids carry a generation: a freed batch's id stays invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchId(u64);

macro_rules! raw_id {
    ($t:ident) => {
        impl $t {
            /// The id as a number (for the C ABI and logs).
            pub fn raw(self) -> u64 {
                self.0
            }

            /// An id from a number. Any number is accepted here; one that was never issued
            /// is refused by the engine call that uses it.
            pub fn from_raw(raw: u64) -> Self {
                $t(raw)
            }
        }
    };
}
raw_id!(PeerId);
raw_id!(BatchId);

/// The state of a batch.
#[derive(Clone, Debug)]
pub enum BatchState {
    /// Still moving bytes.
    InProgress,
    /// Every byte moved.
    Completed,
    /// A slice failed; the first error. Bytes of other ops may or may not have moved.
    Failed(Error),
    /// Cancelled before every byte moved.
    Cancelled,
    /// Its deadline passed before every byte moved.
    TimedOut,
}

impl BatchState {
    /// Whether the batch has ended (anything but `InProgress`). Once ended, no transport
    /// touches the batch's buffers any more.
    pub fn is_finished(&self) -> bool {
        !matches!(self, BatchState::InProgress)
    }

    /// `Ok(true)` when completed, `Ok(false)` while in progress, the error otherwise.
    pub fn into_result(self) -> Result<bool> {
        match self {
            BatchState::InProgress => Ok(false),
            BatchState::Completed => Ok(true),
            BatchState::Failed(e) => Err(e),
            BatchState::Cancelled => Err(Error::Cancelled),
            BatchState::TimedOut => Err(Error::TimedOut),
        }
    }
}

/// What a peer's bytes are reached through.
#[derive(Debug)]
enum Segment {
    /// The engine itself: remote addresses are this engine's own registered regions.
    Loopback,
    /// Another process, through the control plane and TCP lanes.
    Remote(RemotePeer),
}

#[derive(Debug)]
struct Peer {
    name: String,
    segment: Segment,
}

/// A kvxfer engine. `Send + Sync`: submit, wait and register from any thread.
///
/// ```
/// use kvxfer::{Engine, EngineConfig, Location, Op};
///
/// let engine = Engine::new(EngineConfig::default())?;
/// let src = engine.allocate(1 << 20, Location::Any)?;
/// let dst = engine.allocate(1 << 20, Location::Any)?;
/// src.fill(0, 1 << 20, 0xab)?;
/// engine.transfer_sync(engine.local_peer(), &[Op::write(src.addr(), dst.addr(), 1 << 20)])?;
/// assert!(dst.to_vec().iter().all(|&b| b == 0xab));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    registry: Arc<Registry>,
    local: Arc<LocalTransport>,
    /// GPU copies for in-process batches touching GPU memory; started on first need (when
    /// the process uses the CUDA driver).
    cuda: std::sync::OnceLock<Arc<crate::transport::cuda::CudaTransport>>,
    peers: RwLock<GenSlab<Arc<Peer>>>,
    loopback: PeerId,
    batches: Mutex<GenSlab<Arc<Batch>>>,
    counters: Arc<Counters>,
    net: Option<Net>,
    inbox: Arc<Inbox>,
    /// Open remote peers by session id.
    sessions: Mutex<HashMap<String, PeerId>>,
    /// One lock per session being opened: opening one peer (connect, handshake, which may
    /// take up to `connect_timeout`) never holds up opening another.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl Engine {
    /// Starts an engine. `KVX_*` environment variables override `config` (see
    /// [`EngineConfig::with_env_overrides`]).
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let config = config.with_env_overrides(|name| std::env::var(name).ok())?;
        config.validate()?;
        let local = Arc::new(
            LocalTransport::new(config.copy_threads)
                .map_err(|e| Error::Start(format!("cannot start copy threads: {e}")))?,
        );
        let mut peers = GenSlab::default();
        let loopback = PeerId(peers.insert(Arc::new(Peer {
            name: "self".into(),
            segment: Segment::Loopback,
        })));
        let registry = Arc::new(Registry::new());
        let inbox = Arc::new(Inbox::default());
        let net = match &config.listen {
            Some(listen) => Some(Net::start(&config, listen, &registry, &inbox)?),
            None => None,
        };
        log::debug!("engine started: {config:?}");
        Ok(Engine {
            config,
            registry,
            local,
            cuda: std::sync::OnceLock::new(),
            peers: RwLock::new(peers),
            loopback,
            batches: Mutex::new(GenSlab::default()),
            counters: Arc::default(),
            net,
            inbox,
            sessions: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
        })
    }

    /// This engine's session id (`host:port` of its listener), which peers open it by.
    /// `None` when it does not listen.
    pub fn session_id(&self) -> Option<&str> {
        self.net.as_ref().map(|n| n.shared.session.as_str())
    }

    /// Opens the peer listening at `session` (`host:port`): connects, exchanges
    /// descriptors and opens TCP lanes. Opening the same session again returns the same
    /// id; opening this engine's own session returns [`Engine::local_peer`].
    pub fn open_peer(&self, session: &str) -> Result<PeerId> {
        let net = self.net.as_ref().ok_or(Error::NoListener)?;
        net::split_host_port(session).map_err(|reason| Error::BadSession {
            session: session.to_string(),
            reason,
        })?;
        if session == net.shared.session {
            return Ok(self.loopback);
        }
        let known = |engine: &Engine| {
            engine
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(session)
                .copied()
        };
        if let Some(id) = known(self) {
            return Ok(id);
        }
        // Opening the same session twice at once: the second waits for the first. Each
        // session keeps its gate (one small entry per session ever opened), so every opener
        // of a session, even after a failed open, queues on the same one.
        let gate = Arc::clone(
            self.opening
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(session.to_string())
                .or_default(),
        );
        let _opening = gate.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = known(self) {
            return Ok(id);
        }
        let remote = RemotePeer::new(session.to_string());
        let linked = remote.link(net, &self.config, self.local.pool());
        linked?;
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let id = PeerId(self.peers_mut().insert(Arc::new(Peer {
            name: session.to_string(),
            segment: Segment::Remote(remote),
        })));
        sessions.insert(session.to_string(), id);
        Ok(id)
    }

    /// Closes a peer opened with [`Engine::open_peer`]: its connections close and its
    /// requests still in flight fail; the id becomes invalid.
    pub fn close_peer(&self, peer: PeerId) -> Result<()> {
        // Sessions first (the order open_peer takes them in), so that no open_peer can
        // hand out this id while it is being closed.
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = {
            let mut peers = self.peers_mut();
            let p = peers.get(peer.0).ok_or(Error::UnknownPeer(peer.0))?;
            if matches!(p.segment, Segment::Loopback) {
                return Ok(());
            }
            peers.remove(peer.0)
        };
        if let Some(p) = closed {
            if let Segment::Remote(r) = &p.segment {
                // Only this peer's mapping (the session may have been opened again since).
                if sessions.get(&r.session) == Some(&peer) {
                    sessions.remove(&r.session);
                }
                drop(sessions);
                r.close();
            }
        }
        Ok(())
    }

    /// Checks that `peer` answers (reconnecting if it went away); returns the round trip.
    pub fn probe_peer(&self, peer: PeerId) -> Result<Duration> {
        let p = self.peer(peer)?;
        match &p.segment {
            Segment::Loopback => Ok(Duration::ZERO),
            Segment::Remote(r) => {
                let link = self.link(r)?;
                link.control
                    .probe(self.config.connect_timeout)
                    .map_err(|e| Error::Peer {
                        session: r.session.clone(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Serves store requests from peers with `service` (`None`: stop serving; peers then
    /// get "this engine serves no store segment").
    pub fn set_store_service(&self, service: Option<Arc<dyn StoreService>>) -> Result<()> {
        let net = self.net.as_ref().ok_or(Error::NoListener)?;
        *net.shared
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner) = service;
        Ok(())
    }

    /// Serves store requests with `service` unless one is served already; `Ok(false)`
    /// then (the check and the change are one step).
    pub fn set_store_service_if_none(&self, service: Arc<dyn StoreService>) -> Result<bool> {
        let net = self.net.as_ref().ok_or(Error::NoListener)?;
        let mut current = net
            .shared
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.is_some() {
            return Ok(false);
        }
        *current = Some(service);
        Ok(true)
    }

    /// The store service this engine serves, if any.
    pub fn store_service(&self) -> Option<Arc<dyn StoreService>> {
        self.net.as_ref().and_then(|n| n.shared.store_service())
    }

    /// Sends a store request to `peer` and returns its reply (the loopback peer is this
    /// engine's own service, called directly).
    ///
    /// Errors: [`Error::Peer`] when the peer is gone, does not answer within `timeout`, or
    /// refuses (it serves no store); [`Error::UnknownPeer`].
    pub fn store_call(&self, peer: PeerId, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
        let p = self.peer(peer)?;
        match &p.segment {
            Segment::Loopback => {
                let session = self.session_id().unwrap_or("local").to_string();
                let service = self
                    .net
                    .as_ref()
                    .and_then(|n| n.shared.store_service())
                    .ok_or_else(|| Error::Peer {
                        session: session.clone(),
                        reason: "this engine serves no store segment".into(),
                    })?;
                service
                    .handle(&session, body)
                    .map_err(|reason| Error::Peer { session, reason })
            }
            Segment::Remote(r) => {
                let link = self.link(r)?;
                let failed = |e: crate::control::ControlError| Error::Peer {
                    session: r.session.clone(),
                    reason: e.to_string(),
                };
                // The fast connection when free (opened on first use), else the shared one;
                // a request a broken fast connection could not even send (an idle one the
                // peer dropped, say) goes over the shared one.
                if let Ok(mut fast) = link.fast.try_lock() {
                    if fast.as_ref().is_none_or(|f| f.is_dead()) {
                        let net = self.net.as_ref().ok_or(Error::NoListener)?;
                        *fast = crate::control::SyncControlClient::connect(
                            &r.session,
                            &net.shared.descriptor(),
                            self.config.connect_timeout,
                        )
                        .inspect_err(|e| log::debug!("kvxfer: no fast store connection: {e}"))
                        .ok();
                    }
                    if let Some(f) = fast.as_mut() {
                        use crate::control::ControlError as C;
                        match f.store(body.clone(), timeout) {
                            Ok(reply) => return Ok(reply),
                            Err(e @ (C::Timeout { .. } | C::PeerError { .. })) => {
                                return Err(failed(e))
                            }
                            // Sent and then lost: the peer may have carried it out (a
                            // Commit, say); sending it again could answer wrongly.
                            Err(e) if f.last_request_sent() => return Err(failed(e)),
                            Err(e) => log::debug!("kvxfer: fast store connection broke: {e}"),
                        }
                    }
                }
                link.control.store(body, timeout).map_err(failed)
            }
        }
    }

    /// Store requests to several peers at once: each is sent on its peer's fast
    /// connection before any reply is read, so the peers work in parallel and the calls
    /// take about as long as the slowest one. A call whose fast connection is busy or
    /// unusable (or to the loopback peer) goes through [`Engine::store_call`] afterwards.
    /// One result per call, in order.
    pub fn store_call_many(
        &self,
        calls: Vec<(PeerId, Vec<u8>)>,
        timeout: Duration,
    ) -> Vec<Result<Vec<u8>>> {
        let mut results: Vec<Option<Result<Vec<u8>>>> = (0..calls.len()).map(|_| None).collect();
        let mut later = Vec::new();
        let links: Vec<Option<(String, Arc<remote::Link>)>> = calls
            .iter()
            .map(|(peer, _)| match self.peer(*peer).ok()?.segment {
                Segment::Remote(ref r) => Some((r.session.clone(), self.link(r).ok()?)),
                Segment::Loopback => None,
            })
            .collect();
        // Fast connections held from their send to their reply (declared after `links`,
        // which they borrow).
        let mut in_flight = Vec::new();
        for (i, (peer, body)) in calls.into_iter().enumerate() {
            let Some((session, link)) = &links[i] else {
                later.push((i, peer, body));
                continue;
            };
            let Ok(mut fast) = link.fast.try_lock() else {
                later.push((i, peer, body));
                continue;
            };
            let usable = fast.as_ref().is_some_and(|f| !f.is_dead());
            if !usable {
                drop(fast);
                later.push((i, peer, body));
                continue;
            }
            let conn = fast.as_mut().expect("checked above");
            match conn.send_store(body.clone(), timeout) {
                Ok(pending) => in_flight.push((i, session.clone(), fast, pending)),
                Err(e) if conn.last_request_sent() => {
                    results[i] = Some(Err(Error::Peer {
                        session: session.clone(),
                        reason: e.to_string(),
                    }))
                }
                Err(_) => {
                    drop(fast);
                    later.push((i, peer, body));
                }
            }
        }
        for (i, session, mut fast, pending) in in_flight {
            let reply = fast
                .as_mut()
                .expect("held since the send")
                .receive_store(pending)
                .map_err(|e| Error::Peer {
                    session,
                    reason: e.to_string(),
                });
            results[i] = Some(reply);
        }
        for (i, peer, body) in later {
            results[i] = Some(self.store_call(peer, body, timeout));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::NoListener)))
            .collect()
    }

    /// The regions `peer` has registered, as it last published them.
    pub fn peer_regions(&self, peer: PeerId) -> Result<Vec<RegionInfo>> {
        let p = self.peer(peer)?;
        match &p.segment {
            Segment::Loopback => Ok(net::region_infos(&self.registry)),
            Segment::Remote(r) => Ok(self.link(r)?.control.descriptor().regions.clone()),
        }
    }

    /// Notifications received from peers since the last call, oldest first.
    pub fn notifications(&self) -> Vec<Notification> {
        self.inbox.drain()
    }

    /// Waits up to `timeout` for the next notification.
    pub fn wait_notification(&self, timeout: Duration) -> Option<Notification> {
        self.inbox.wait_one(timeout)
    }

    fn link(&self, remote: &RemotePeer) -> Result<Arc<remote::Link>> {
        let net = self.net.as_ref().ok_or(Error::NoListener)?;
        remote.link(net, &self.config, self.local.pool())
    }

    /// The configuration in force (after environment overrides).
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Registers `[addr, addr + len)` with `access`. `location: None` detects it (`cpu:N`
    /// from the NUMA node of the first page, `*` when unknown).
    ///
    /// # Safety
    /// The range must be memory of this process, valid for reads and writes, and stay so
    /// until it is unregistered (or the engine is dropped): transfers read and write it
    /// without further checks by Rust. Nothing else may rely on its contents not changing
    /// while a batch that writes it runs.
    pub unsafe fn register(
        &self,
        addr: u64,
        len: u64,
        location: Option<Location>,
        access: Access,
    ) -> Result<()> {
        self.registry
            .register(vec![RegionSpec::caller(addr, len, location, access)])?;
        Ok(())
    }

    /// Registers every region or none (the first bad one is the error).
    ///
    /// # Safety
    /// As for [`Engine::register`], for every region.
    pub unsafe fn register_batch(&self, regions: Vec<RegionSpec>) -> Result<()> {
        self.registry.register(regions)?;
        Ok(())
    }

    /// Unregisters the region starting at `addr`. Fails with `Busy` while an unfinished
    /// batch uses it; after `Ok` the memory may be freed.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        self.registry.unregister(addr)?;
        Ok(())
    }

    /// Whether `[addr, addr + len)` lies inside one registered region that grants
    /// `access` (a caller's check before it names the range in a batch).
    pub fn is_registered(&self, addr: u64, len: u64, access: Access) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.registry
            .lookup(addr)
            .is_some_and(|r| end <= r.range().end() && r.access().contains(access))
    }

    /// Allocates `len` bytes of registered host memory on `location` (memfd-backed, every
    /// access right). Dropping the buffer unregisters and unmaps it.
    pub fn allocate(&self, len: usize, location: Location) -> Result<Buffer> {
        self.allocate_with_access(len, location, Access::ALL)
    }

    /// [`Engine::allocate`] with chosen access rights.
    pub fn allocate_with_access(
        &self,
        len: usize,
        location: Location,
        access: Access,
    ) -> Result<Buffer> {
        Ok(Buffer::allocate(&self.registry, len, location, access)?)
    }

    /// The registered region holding `addr`.
    pub fn region(&self, addr: u64) -> Option<Arc<Region>> {
        self.registry.lookup(addr)
    }

    /// The peer that is this engine itself (its remote memory is its own registry).
    pub fn local_peer(&self) -> PeerId {
        self.loopback
    }

    /// The transport batches to `peer` prefer: `Local` for this engine itself, `Shm` for a
    /// peer proven to share this host's memory, else `Tcp`. A batch touching memory the
    /// preferred transport cannot reach goes over the next one
    /// ([`Engine::batch_transport`] tells which).
    pub fn peer_transport(&self, peer: PeerId) -> Result<TransportKind> {
        let p = self.peer(peer)?;
        Ok(match &p.segment {
            Segment::Loopback => TransportKind::Local,
            Segment::Remote(r) => self.link(r)?.preferred(),
        })
    }

    /// Why `peer` does not use same-host shared memory, or not for all of its memory
    /// (`None` when it does, and for the local peer).
    pub fn peer_shm_note(&self, peer: PeerId) -> Result<Option<String>> {
        let p = self.peer(peer)?;
        Ok(match &p.segment {
            Segment::Loopback => None,
            Segment::Remote(r) => {
                let link = self.link(r)?;
                link.shm_note.clone().or_else(|| {
                    link.shm.as_ref().filter(|s| !s.link().cma()).map(|_| {
                        "caller-owned memory of the peer is no longer reachable by cross-memory \
                         attach: the kernel refused it after the same-host proof"
                            .to_string()
                    })
                })
            }
        })
    }

    /// Per RDMA NIC in use: its name, the slices posted on it and the chains of requests
    /// that failed on it, since the engine started (empty without RDMA).
    pub fn rdma_nic_counters(&self) -> Vec<(String, u64, u64)> {
        match self.net.as_ref().map(|n| &n.rdma) {
            Some(Ok(rdma)) => rdma
                .workers()
                .iter()
                .map(|w| {
                    let (slices, failures) = w.counters();
                    (w.nic().name().to_string(), slices, failures)
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The transport that moves (or moved) `batch`.
    pub fn batch_transport(&self, batch: BatchId) -> Result<TransportKind> {
        Ok(self.batch(batch)?.transport.kind())
    }

    /// The name of `peer` (`self` for the local peer).
    pub fn peer_name(&self, peer: PeerId) -> Result<String> {
        Ok(self.peer(peer)?.name.clone())
    }

    /// The transports this engine runs.
    pub fn transports(&self) -> Vec<TransportInfo> {
        let mut out = vec![TransportInfo {
            kind: self.local.kind(),
            detail: self.local.describe(),
        }];
        out.push(TransportInfo {
            kind: TransportKind::Shm,
            detail: match self.net.as_ref().map(|n| &n.shm) {
                Some(Ok(server)) => {
                    let (mut using, mut notes) = (0, Vec::new());
                    for (name, link) in self.open_links() {
                        match (&link.shm, &link.shm_note) {
                            (Some(_), None) => using += 1,
                            (Some(_), Some(note)) => {
                                using += 1;
                                notes.push(format!("{name}: {note}"));
                            }
                            (None, note) => notes.push(format!(
                                "{name}: not used: {}",
                                note.as_deref().unwrap_or("unknown")
                            )),
                        }
                    }
                    let mut detail = format!(
                        "same-host memfd mappings and cross-memory attach: serving @{} ({} peers attached); used with {using} open peers",
                        server.name(),
                        server.connections()
                    );
                    for note in notes {
                        detail.push_str("; ");
                        detail.push_str(&note);
                    }
                    detail
                }
                Some(Err(why)) => why.clone(),
                None => "not used: the engine does not listen (config listen = None)".into(),
            },
        });
        out.push(TransportInfo {
            kind: TransportKind::Rdma,
            detail: match self.net.as_ref().map(|n| &n.rdma) {
                Some(Ok(rdma)) => {
                    let mut detail = rdma.describe();
                    for (name, link) in self.open_links() {
                        if let Some(note) = &link.rdma_note {
                            detail.push_str(&format!("; {name}: not used: {note}"));
                        }
                    }
                    detail
                }
                Some(Err(why)) => why.clone(),
                None => "not used: the engine does not listen (config listen = None)".into(),
            },
        });
        out.push(TransportInfo {
            kind: TransportKind::Tcp,
            detail: match &self.net {
                Some(net) => format!(
                    "TCP over io_uring: session {}, data port {}, {} I/O threads, {} lanes per peer",
                    net.shared.session,
                    net.tcp.local_addr().port(),
                    net.pool.len(),
                    self.config.tcp_lanes
                ),
                None => "not used: the engine does not listen (config listen = None)".into(),
            },
        });
        out
    }

    /// Open links to remote peers (without reconnecting), with their session ids.
    fn open_links(&self) -> Vec<(String, Arc<remote::Link>)> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers
            .values()
            .filter_map(|p| match &p.segment {
                Segment::Remote(r) => r.current().map(|l| (r.session.clone(), l)),
                Segment::Loopback => None,
            })
            .collect()
    }

    /// Submits `ops` to `peer` with the default deadline (`batch_timeout` from now).
    pub fn submit(&self, peer: PeerId, ops: &[Op]) -> Result<BatchId> {
        self.submit_with_deadline(peer, ops, deadline_after(self.config.batch_timeout))
    }

    /// Submits `ops` to `peer`; the batch times out at `deadline`. Every op is checked
    /// against both sides' registered regions first: on any violation nothing moves and
    /// the error names the op.
    ///
    /// The ops of a batch move in parallel pieces and in no set order (as RDMA work
    /// requests do): if one op's destination overlaps bytes another op of the same batch
    /// reads or writes, the result there is unspecified. Put dependent copies in separate
    /// batches. On the local peer an op whose own two ranges partly overlap is refused.
    pub fn submit_with_deadline(
        &self,
        peer: PeerId,
        ops: &[Op],
        deadline: Instant,
    ) -> Result<BatchId> {
        let submitted = self.try_submit(peer, ops, deadline, None);
        if submitted.is_err() {
            self.counters.refused();
        }
        submitted
    }

    /// Submits `ops` to `peer` (default deadline) and, once every byte is visible at the
    /// peer, delivers `notification` to it ([`Engine::notifications`] there). The batch
    /// reports `Completed` only after the peer has queued the notification; if the bytes
    /// moved but the notification could not be delivered it fails with `Notify`.
    pub fn submit_with_notify(
        &self,
        peer: PeerId,
        ops: &[Op],
        notification: &[u8],
    ) -> Result<BatchId> {
        if notification.len() > crate::control::MAX_NOTIFY {
            self.counters.refused();
            return Err(Error::NotificationTooLarge {
                len: notification.len(),
                max: crate::control::MAX_NOTIFY,
            });
        }
        let deadline = deadline_after(self.config.batch_timeout);
        let submitted = self.try_submit(peer, ops, deadline, Some(notification));
        if submitted.is_err() {
            self.counters.refused();
        }
        submitted
    }

    fn try_submit(
        &self,
        peer: PeerId,
        ops: &[Op],
        deadline: Instant,
        notification: Option<&[u8]>,
    ) -> Result<BatchId> {
        let peer = self.peer(peer)?;
        let link = match &peer.segment {
            Segment::Loopback => None,
            Segment::Remote(r) => Some(self.link(r)?),
        };
        match self.prepare(ops, link.as_deref()) {
            Err(e)
                if e.is_remote_miss()
                    && link
                        .as_ref()
                        .is_some_and(|l| l.refresh(self.config.connect_timeout)) =>
            {
                // The peer may have registered the memory after its last refresh reached us.
                let (slices, pins) = self.prepare(ops, link.as_deref())?;
                self.route(&peer, slices, pins, deadline, link, notification)
            }
            Err(e) => Err(e),
            Ok((slices, pins)) => self.route(&peer, slices, pins, deadline, link, notification),
        }
    }

    /// The GPU copy transport, if this process uses the CUDA driver (started on the first
    /// GPU batch that finds the driver in use; asked again until then).
    fn cuda_transport(&self) -> Option<Arc<crate::transport::cuda::CudaTransport>> {
        if let Some(cuda) = self.cuda.get() {
            return Some(Arc::clone(cuda));
        }
        crate::sys::cuda::driver_in_use()?;
        let started = crate::transport::cuda::CudaTransport::new()
            .inspect_err(|e| log::warn!("kvxfer: cannot start the GPU copy thread: {e}"))
            .ok()?;
        // Two first batches at once: one transport is kept, the other stops on drop.
        Some(Arc::clone(self.cuda.get_or_init(|| Arc::new(started))))
    }

    /// Picks the transport for checked slices and starts the batch.
    fn route(
        &self,
        peer: &Peer,
        slices: Vec<Slice>,
        mut pins: Pins,
        deadline: Instant,
        link: Option<Arc<remote::Link>>,
        notification: Option<&[u8]>,
    ) -> Result<BatchId> {
        if pins.gpu_location().is_some() {
            let local_gpu = self.check_gpu_alive(&slices, link.is_none())?;
            pins.set_local_gpu(local_gpu);
        }
        let transport = match (&link, pins.gpu_location()) {
            (None, None) => Arc::clone(&self.local) as Arc<dyn Transport>,
            (None, Some(location)) => match self.cuda_transport() {
                Some(cuda) => cuda as Arc<dyn Transport>,
                None => {
                    return Err(Error::GpuUnreachable {
                        location,
                        transport: TransportKind::Local,
                    })
                }
            },
            (Some(l), gpu) => l.choose(&peer.name, &slices, gpu, self.config.connect_timeout)?,
        };
        // CPU copies must never touch GPU memory: the process would fault.
        if let Some(location) = pins.gpu_location() {
            if !transport.reaches_gpu() {
                return Err(Error::GpuUnreachable {
                    location,
                    transport: transport.kind(),
                });
            }
        }
        self.start_batch(slices, pins, deadline, transport, link, notification)
    }

    /// Every GPU region of this process the slices use (local ends; remote ends too when the
    /// peer is this engine) is still allocated: the driver takes the address of freed
    /// device memory for host memory, and a copy would fault instead of failing.
    /// Returns the device of the first local GPU region.
    fn check_gpu_alive(&self, slices: &[Slice], loopback: bool) -> Result<Option<u32>> {
        let Some(cuda) = crate::sys::cuda::driver_in_use() else {
            return Ok(None); // no driver: no device memory, the labels only keep CPU copies away
        };
        let mut local_gpu = None;
        let map = self.registry.read();
        let mut checked: Vec<u64> = Vec::new();
        let mut last: Option<crate::memory::AddrRange> = None;
        let ends = slices.iter().flat_map(|s| {
            let remote = loopback.then_some(s.remote);
            std::iter::once((s.local, true)).chain(remote.map(|r| (r, false)))
        });
        for (addr, local) in ends {
            if last.is_some_and(|r| r.contains(addr)) {
                continue; // consecutive slices mostly share a region
            }
            let Some(region) = map.region_at(addr) else {
                continue;
            };
            let range = region.range();
            last = Some(range);
            if !matches!(region.location(), Location::Cuda(_)) || checked.contains(&range.start) {
                continue;
            }
            let mem = cuda
                .device_range(range.start, range.len)
                .map_err(|reason| Error::GpuMemoryGone {
                    range,
                    location: region.location(),
                    reason,
                })?;
            if local {
                local_gpu.get_or_insert(mem.device);
            }
            checked.push(range.start);
        }
        Ok(local_gpu)
    }

    /// Whether the first op's local or remote end is registered GPU memory.
    fn first_op_touches_gpu(
        &self,
        ops: &[Op],
        remote: Option<&BTreeMap<u64, Arc<Region>>>,
    ) -> bool {
        let Some(op) = ops.first() else { return false };
        let gpu =
            |r: Option<Arc<Region>>| r.is_some_and(|r| matches!(r.location(), Location::Cuda(_)));
        let remote_region = match remote {
            Some(map) => map.region_at(op.remote_addr).cloned(),
            None => self.registry.lookup(op.remote_addr),
        };
        gpu(self.registry.lookup(op.local_addr)) || gpu(remote_region)
    }

    /// Checks `ops` against both sides and cuts them into slices.
    fn prepare(&self, ops: &[Op], link: Option<&remote::Link>) -> Result<(Vec<Slice>, Pins)> {
        let max = self.config.max_slices_per_batch;
        if ops.len() > max {
            return Err(Error::BatchTooLarge {
                slices: ops.len(),
                max,
            });
        }
        let mut slice_size = self.config.slice_size as u64;
        let remote_regions = link.map(remote::Link::regions);
        if self.first_op_touches_gpu(ops, remote_regions.as_deref()) {
            // GPU copies (in-process, or to a peer's GPU memory over CUDA IPC) go best as
            // few large copies; RDMA takes large work requests as well. Small slices would
            // only cost bookkeeping and a copy call each (a 4 GiB batch is 65536 of 64 KiB).
            slice_size = slice_size.max(GPU_SLICE);
        }
        let mut slices = Vec::with_capacity(ops.len());
        let mut pins = Pins::default();
        {
            let map = self.registry.read();
            let (remote, spaces) = match &remote_regions {
                None => (&*map, AddressSpaces::Same),
                Some(regions) => (&**regions, AddressSpaces::Distinct),
            };
            for (i, op) in ops.iter().enumerate() {
                // Refuse before cutting: an op needs at least len / slice_size slices.
                let at_least = (op.len.div_ceil(slice_size) as usize).saturating_add(slices.len());
                if at_least > max {
                    return Err(Error::BatchTooLarge {
                        slices: at_least,
                        max,
                    });
                }
                slicing::slice_op(
                    i,
                    op,
                    slice_size,
                    &*map,
                    remote,
                    spaces,
                    &mut slices,
                    &mut pins,
                )?;
            }
            if slices.len() > max {
                return Err(Error::BatchTooLarge {
                    slices: slices.len(),
                    max,
                });
            }
            pins.pin_all();
        }
        Ok((slices, pins))
    }

    fn start_batch(
        &self,
        slices: Vec<Slice>,
        pins: Pins,
        deadline: Instant,
        transport: Arc<dyn Transport>,
        link: Option<Arc<remote::Link>>,
        notification: Option<&[u8]>,
    ) -> Result<BatchId> {
        let empty = slices.is_empty();
        if self.batches().len() >= self.config.max_batches {
            // Checked before a notification of an empty batch is delivered below.
            return Err(Error::TooManyBatches {
                max: self.config.max_batches,
            });
        }
        let from = self.session_id().unwrap_or("self").to_string();
        let notify = match (notification, &link) {
            (None, _) => None,
            (Some(bytes), None) => Some(PendingNotify::Local {
                inbox: Arc::clone(&self.inbox),
                from,
                bytes: bytes.to_vec(),
            }),
            (Some(bytes), Some(link)) if empty => {
                // Nothing to move: deliver now, so the batch can complete at creation.
                link.control
                    .notify(bytes, self.config.connect_timeout)
                    .map_err(|e| Error::Notify(e.to_string()))?;
                None
            }
            (Some(bytes), Some(link)) => Some(PendingNotify::Remote {
                link: Arc::clone(link),
                bytes: bytes.to_vec(),
            }),
        };
        let notify = match notify {
            Some(PendingNotify::Local { inbox, from, bytes }) if empty => {
                inbox
                    .push(Notification { from, bytes })
                    .map_err(Error::Notify)?;
                None
            }
            other => other,
        };
        // The slices' size as cut (larger than configured for GPU batches), for claim
        // chunks of a bounded number of bytes.
        let slice_size = slices
            .first()
            .map_or(0, |s| s.len as usize)
            .max(self.config.slice_size);
        let batch = Arc::new_cyclic(|me| {
            Batch::new(
                me.clone(),
                notify,
                slices,
                pins,
                deadline,
                Arc::clone(&transport),
                self.local.threads(),
                slice_size,
                Arc::clone(&self.counters),
            )
        });
        let id = {
            let mut batches = self.batches();
            if batches.len() >= self.config.max_batches {
                return Err(Error::TooManyBatches {
                    max: self.config.max_batches,
                });
            }
            batches.insert(Arc::clone(&batch))
        };
        self.counters.submitted();
        if empty {
            // A batch of no ops ends at creation, before anyone could count it.
            self.counters.ended(Outcome::Completed, 0);
        }
        if batch.outcome().is_none() {
            transport.post(batch);
        }
        Ok(BatchId(id))
    }

    /// The state of a batch, in O(1). A batch past its deadline is stopped here (without
    /// blocking): it reports `TimedOut` as soon as slices already being moved finish.
    pub fn status(&self, batch: BatchId) -> Result<BatchState> {
        let batch = self.batch(batch)?;
        if batch.outcome().is_none() && Instant::now() >= batch.deadline {
            batch.stop(StopReason::TimedOut);
        }
        Ok(state_of(&batch))
    }

    /// Waits up to `timeout` for the batch to end and returns its state (`InProgress` if
    /// the wait ran out first). If the batch's own deadline passes during the wait, the
    /// batch is stopped and this returns `TimedOut` once nothing can touch its buffers.
    pub fn wait(&self, batch: BatchId, timeout: Duration) -> Result<BatchState> {
        let batch = self.batch(batch)?;
        let until = deadline_after(timeout).min(batch.deadline);
        if batch.wait_until(until).is_none() && Instant::now() >= batch.deadline {
            batch.stop(StopReason::TimedOut);
            batch.wait_until(far_future());
        }
        Ok(state_of(&batch))
    }

    /// Cancels a batch and returns once no transport can touch its buffers any more. The
    /// returned state is `Cancelled`, or how it ended if it had already ended (or ended
    /// while being cancelled, every byte moved).
    pub fn cancel(&self, batch: BatchId) -> Result<BatchState> {
        let batch = self.batch(batch)?;
        batch.stop(StopReason::Cancelled);
        batch.wait_until(far_future());
        Ok(state_of(&batch))
    }

    /// Forgets an ended batch; its id becomes invalid. A batch still in progress is
    /// refused (`BatchInProgress`): wait for it or cancel it first.
    pub fn free(&self, batch: BatchId) -> Result<()> {
        let mut batches = self.batches();
        let entry = batches.get(batch.0).ok_or(Error::UnknownBatch(batch.0))?;
        if entry.outcome().is_none() {
            return Err(Error::BatchInProgress(batch.0));
        }
        batches.remove(batch.0);
        Ok(())
    }

    /// Submits, waits until the batch ends (at the latest at its deadline) and frees it.
    pub fn transfer_sync(&self, peer: PeerId, ops: &[Op]) -> Result<()> {
        let id = self.submit(peer, ops)?;
        let state = self.wait(id, Duration::MAX)?;
        self.free(id)?;
        state.into_result().map(drop)
    }

    /// What the engine has done since it started.
    pub fn stats(&self) -> EngineStats {
        self.counters.snapshot()
    }

    /// Number of batches submitted and not freed.
    pub fn live_batches(&self) -> usize {
        self.batches().len()
    }

    fn peers_mut(&self) -> std::sync::RwLockWriteGuard<'_, GenSlab<Arc<Peer>>> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn peer(&self, peer: PeerId) -> Result<Arc<Peer>> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers.get(peer.0).cloned().ok_or(Error::UnknownPeer(peer.0))
    }

    fn batch(&self, batch: BatchId) -> Result<Arc<Batch>> {
        self.batches()
            .get(batch.0)
            .cloned()
            .ok_or(Error::UnknownBatch(batch.0))
    }

    fn batches(&self) -> MutexGuard<'_, GenSlab<Arc<Batch>>> {
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Engine {
    /// Cancels every unfinished batch and waits until none can touch memory, so that
    /// dropping the engine never leaves a copy running into freed buffers; then joins the
    /// copy threads.
    fn drop(&mut self) {
        let live: Vec<Arc<Batch>> = self.batches().values().cloned().collect();
        for batch in live {
            batch.stop(StopReason::Cancelled);
            batch.wait_until(far_future());
        }
        if let Some(net) = &self.net {
            net.shutdown();
        }
        // No batch can touch memory any more; stop the copy threads now rather than when
        // the last batch handle goes, so none outlives the engine.
        self.local.shutdown();
        if let Some(cuda) = self.cuda.get() {
            cuda.shutdown();
        }
    }
}

/// The slice size of in-process batches that touch GPU memory.
const GPU_SLICE: u64 = 64 << 20;

fn deadline_after(timeout: Duration) -> Instant {
    Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(far_future)
}

fn state_of(batch: &Batch) -> BatchState {
    match batch.outcome() {
        None => BatchState::InProgress,
        Some(Outcome::Completed) => BatchState::Completed,
        Some(Outcome::Cancelled) => BatchState::Cancelled,
        Some(Outcome::TimedOut) => BatchState::TimedOut,
        Some(Outcome::Failed) => BatchState::Failed(
            batch
                .error()
                .cloned()
                .unwrap_or_else(|| Error::Start("batch failed without an error".into())),
        ),
    }
}
