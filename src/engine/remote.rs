//! Peers in other processes: the control connection (descriptor, probes, notifications)
//! and the TCP lanes, opened lazily and reopened when the peer went away. A peer that
//! comes back under the same session id with a new epoch is a restarted process: its old
//! descriptor is dropped.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::batch::Batch;
use super::net::{split_host_port, Net};
use super::{EngineConfig, Error, Result};
use crate::control::RdmaConnectRequest;
use crate::control::{ControlClient, ControlError, SegmentDescriptor, SyncControlClient};
use crate::memory::{Access, AddrRange, Backing, Region, RegionLookup};
use crate::transport::copy::CopyPool;
use crate::transport::rdma::{Endpoint, Key, RdmaTransport, RemoteKeys, RemoteQp};
use crate::transport::shm::{ShmLink, ShmTransport};
use crate::transport::staging::StagedTransport;
use crate::transport::tcp::TcpTransport;
use crate::transport::{Slice, Transport, TransportKind};

/// The peer's registered regions, as the slicer looks them up.
pub(super) type RemoteRegions = Arc<BTreeMap<u64, Arc<Region>>>;

/// An open connection to a peer.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) control: ControlClient,
    /// The TCP lanes (unless the configuration leaves TCP out).
    pub(super) tcp: Option<Arc<TcpTransport>>,
    /// The TCP lanes with GPU memory staged through pinned host buffers (made on the first
    /// GPU batch that goes over TCP).
    tcp_staged: OnceLock<Arc<StagedTransport>>,
    /// Same-host shared memory, when proven.
    pub(super) shm: Option<Arc<ShmTransport>>,
    /// RDMA queue pairs to the peer, when both sides have NICs.
    pub(super) rdma: Option<Arc<RdmaTransport>>,
    /// Why RDMA is not used with this peer.
    pub(super) rdma_note: Option<String>,
    /// Why shared memory is not used with this peer (or why its caller-owned memory is
    /// not reachable through it).
    pub(super) shm_note: Option<String>,
    /// Transports in order of preference (the configuration's).
    order: Vec<TransportKind>,
    regions: Mutex<(u64, RemoteRegions)>,
    notifier: Notifier,
    /// A second control connection whose caller reads its own reply (lowest latency for
    /// store requests); opened on first use, reopened after an error. Callers that find
    /// it busy use `control` instead.
    pub(super) fast: Mutex<Option<SyncControlClient>>,
}

impl Link {
    /// Whether the peer went away (control connection or every lane lost).
    /// (A failed RDMA queue pair counts too: reconnecting is how it is replaced.)
    pub(super) fn is_broken(&self) -> bool {
        !self.control.is_alive()
            || self.tcp.as_ref().is_some_and(|t| t.is_broken())
            || self.rdma.as_ref().is_some_and(|r| r.is_broken())
    }

    /// The transport batches prefer: the first of the configured ones this link has.
    pub(super) fn preferred(&self) -> TransportKind {
        self.order
            .iter()
            .copied()
            .find(|k| match k {
                TransportKind::Shm => self.shm.is_some(),
                TransportKind::Rdma => self.rdma.is_some(),
                TransportKind::Tcp => self.tcp.is_some(),
                _ => false,
            })
            .unwrap_or(TransportKind::Tcp)
    }

    /// The first transport, in order of preference, that can carry every slice:
    /// shared memory when it reaches every region the slices touch, else TCP.
    pub(super) fn choose(
        &self,
        session: &str,
        slices: &[Slice],
        gpu: Option<crate::memory::Location>,
        timeout: Duration,
    ) -> Result<Arc<dyn Transport>> {
        let mut why_not = Vec::new();
        for kind in &self.order {
            match kind {
                TransportKind::Shm => match &self.shm {
                    Some(shm) => {
                        let regions = self.regions();
                        let start = |addr| regions.region_at(addr).map(|r| r.range().start);
                        let deadline = Instant::now() + timeout;
                        match shm.link().reach(slices, start, gpu.is_some(), deadline) {
                            Ok(()) => return Ok(Arc::clone(shm) as Arc<dyn Transport>),
                            Err(why) => {
                                log::debug!(
                                    "kvxfer: a batch to {session} cannot go over shm: {why}"
                                );
                                why_not.push(format!("shm: {why}"));
                            }
                        }
                    }
                    None => why_not.push(format!(
                        "shm: {}",
                        self.shm_note.as_deref().unwrap_or("not used")
                    )),
                },
                TransportKind::Rdma => match &self.rdma {
                    Some(rdma) => {
                        self.regions(); // the peer's newest keys
                        if rdma.reaches(slices) {
                            return Ok(Arc::clone(rdma) as Arc<dyn Transport>);
                        }
                        why_not
                            .push("rdma: a region has no memory registration on both sides".into());
                    }
                    None => why_not.push(format!(
                        "rdma: {}",
                        self.rdma_note.as_deref().unwrap_or("not used")
                    )),
                },
                // TCP moves bytes with the CPU: GPU memory goes through pinned host
                // buffers (this side's here, the peer's by its server).
                TransportKind::Tcp => match &self.tcp {
                    Some(tcp) if gpu.is_some() => {
                        let staged = self.tcp_staged.get_or_init(|| {
                            Arc::new(StagedTransport::new(Arc::clone(tcp) as Arc<dyn Transport>))
                        });
                        return Ok(Arc::clone(staged) as Arc<dyn Transport>);
                    }
                    Some(tcp) => return Ok(Arc::clone(tcp) as Arc<dyn Transport>),
                    None => why_not.push("tcp: left out by the configuration".into()),
                },
                _ => {}
            }
        }
        Err(Error::Peer {
            session: session.to_string(),
            reason: format!(
                "no configured transport can carry this batch ({})",
                why_not.join("; ")
            ),
        })
    }

    /// The peer's regions as last published.
    pub(super) fn regions(&self) -> RemoteRegions {
        let descriptor = self.control.descriptor();
        let mut cached = self.regions.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.0 != descriptor.version {
            *cached = (descriptor.version, Arc::new(index(&descriptor)));
            // The peer's registry changed: let go of what it unregistered, use its new keys.
            if let Some(shm) = &self.shm {
                shm.link().sweep();
            }
            if let Some(rdma) = &self.rdma {
                rdma.set_keys(Arc::new(remote_keys(&descriptor)));
            }
        }
        Arc::clone(&cached.1)
    }

    /// Asks the peer for its current descriptor; true if it changed.
    pub(super) fn refresh(&self, timeout: Duration) -> bool {
        let before = self
            .regions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        match self.control.fetch_descriptor(timeout) {
            Ok(d) => d.version != before,
            Err(e) => {
                log::debug!("kvxfer: descriptor refresh failed: {e}");
                false
            }
        }
    }
}

/// Stand-ins for the peer's regions: the slicer checks ops against them and pins them
/// (harmlessly: they are not in any registry). The peer checks every request again.
fn index(descriptor: &SegmentDescriptor) -> BTreeMap<u64, Arc<Region>> {
    descriptor
        .regions
        .iter()
        .map(|r| {
            let region = Region::new(
                AddrRange::new(r.addr, r.len),
                r.location,
                r.access,
                Backing::Caller,
            );
            (r.addr, Arc::new(region))
        })
        .collect()
}

/// The peer's RDMA keys as the transport indexes them.
fn remote_keys(descriptor: &SegmentDescriptor) -> RemoteKeys {
    let keys: Vec<Key> = descriptor
        .rkeys
        .iter()
        .map(|k| Key {
            addr: k.addr,
            len: k.len,
            nic: k.nic,
            rkey: k.rkey,
        })
        .collect();
    RemoteKeys::new(&keys)
}

/// A peer in another process, by session id.
#[derive(Debug)]
pub(super) struct RemotePeer {
    pub(super) session: String,
    link: Mutex<Option<Arc<Link>>>,
    /// Epoch of the process last reached under this session id (0: never reached).
    epoch: AtomicU64,
    /// Set by `close`: a submit that raced with it must not reconnect.
    closed: std::sync::atomic::AtomicBool,
}

impl RemotePeer {
    pub(super) fn new(session: String) -> Self {
        RemotePeer {
            session,
            link: Mutex::new(None),
            epoch: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The open link, reconnecting (and re-handshaking) if the peer went away.
    pub(super) fn link(
        &self,
        net: &Net,
        config: &EngineConfig,
        pool: &Arc<CopyPool>,
    ) -> Result<Arc<Link>> {
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Peer {
                session: self.session.clone(),
                reason: "the peer was closed".into(),
            });
        }
        if let Some(l) = link.as_ref().filter(|l| !l.is_broken()) {
            return Ok(Arc::clone(l));
        }
        if let Some(old) = link.take() {
            let why = old
                .tcp
                .as_ref()
                .and_then(|t| t.last_error())
                .unwrap_or_else(|| "control connection lost".into());
            log::info!("kvxfer: reconnecting to peer {} ({why})", self.session);
            if let Some(tcp) = &old.tcp {
                tcp.close();
            }
            old.control.close();
        }
        let fresh = Arc::new(self.connect(net, config, pool)?);
        *link = Some(Arc::clone(&fresh));
        Ok(fresh)
    }

    fn connect(&self, net: &Net, config: &EngineConfig, pool: &Arc<CopyPool>) -> Result<Link> {
        let peer_err = |reason: String| Error::Peer {
            session: self.session.clone(),
            reason,
        };
        let timeout = config.connect_timeout;
        let deadline = Instant::now() + timeout;
        let control = ControlClient::connect(&self.session, &net.shared.descriptor(), timeout)
            .map_err(|e| peer_err(e.to_string()))?;
        let descriptor = control.descriptor();
        let previous = self.epoch.swap(descriptor.epoch, Ordering::AcqRel);
        if previous != 0 && previous != descriptor.epoch {
            log::warn!(
                "kvxfer: peer {} restarted (epoch {previous} -> {}); its old descriptor was dropped",
                self.session,
                descriptor.epoch
            );
        }
        // TCP first: it is cheap, and attaching a large peer's regions over shm must not
        // take the time it needs.
        let tcp = if config.transports.contains(&TransportKind::Tcp) {
            Some(Arc::new(
                self.open_lanes(net, &descriptor, config.tcp_lanes, deadline)
                    .map_err(peer_err)?,
            ))
        } else {
            None
        };
        let (shm, shm_note) = if config.transports.contains(&TransportKind::Shm) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.prove_same_host(net, &control, &descriptor, left, pool) {
                Ok((shm, cma_note)) => (Some(Arc::new(shm)), cma_note.map(|why| format!("caller-owned memory of the peer is not reachable by cross-memory attach: {why}"))),
                Err(why) => (None, Some(why)),
            }
        } else {
            (None, Some("left out by the configuration".into()))
        };
        if let Some(why) = &shm_note {
            if config.transports.contains(&TransportKind::Shm) {
                let next = if shm.is_some() {
                    "those regions use the next transport"
                } else {
                    "using the next transport"
                };
                log::info!(
                    "kvxfer: peer {}: same-host shared memory: {why}; {next}",
                    self.session
                );
            }
        }
        let (rdma, rdma_note) = if config.transports.contains(&TransportKind::Rdma) {
            match self.connect_rdma(net, &control, &descriptor, deadline) {
                Ok(t) => (Some(Arc::new(t)), None),
                Err(why) => {
                    log::info!("kvxfer: peer {}: RDMA not used: {why}", self.session);
                    (None, Some(why))
                }
            }
        } else {
            (None, Some("left out by the configuration".into()))
        };
        if tcp.is_none() && shm.is_none() && rdma.is_none() {
            return Err(peer_err(format!(
                "no configured transport reaches it (shm: {})",
                shm_note.as_deref().unwrap_or("not used")
            )));
        }
        Ok(Link {
            control,
            tcp,
            tcp_staged: OnceLock::new(),
            shm,
            shm_note,
            rdma,
            rdma_note,
            order: config.transports.clone(),
            regions: Mutex::new((u64::MAX, Arc::default())),
            notifier: Notifier::default(),
            fast: Mutex::new(None),
        })
    }

    /// Same host, proven: the peer's kernel (boot id) is ours, its socket is reachable,
    /// and both sides see each other's writes to a shared page.
    fn prove_same_host(
        &self,
        net: &Net,
        control: &ControlClient,
        descriptor: &SegmentDescriptor,
        timeout: Duration,
        pool: &Arc<CopyPool>,
    ) -> std::result::Result<(ShmTransport, Option<String>), String> {
        let boot = |host: &str| host.rsplit_once('/').map(|(_, boot)| boot.to_string());
        let (ours, theirs) = (boot(&net.shared.host), boot(&descriptor.host));
        if ours.is_none() || ours != theirs {
            return Err(format!(
                "it runs on another host (its identity {:?}, ours {:?})",
                descriptor.host, net.shared.host
            ));
        }
        let offer = descriptor
            .transports
            .iter()
            .find(|t| t.kind == "shm")
            .ok_or("it offers no shared memory (left out of its configuration, or its socket could not be opened)")?;
        let deadline = Instant::now() + timeout;
        let socket = offer
            .param("socket")
            .ok_or("its shm offer names no socket")?;
        let (link, cma_note) = ShmLink::connect(
            &self.session,
            socket,
            descriptor.engine_id,
            net.shared.engine_id,
            timeout,
            control.liveness(),
        )
        .map_err(|e| e.0)?;
        // Attach (and map) what the peer has published now, as part of opening it, so the
        // first batch does not pay for it; regions registered later attach on first use.
        for region in &descriptor.regions {
            if region
                .access
                .intersects(Access::REMOTE_READ | Access::REMOTE_WRITE)
            {
                if Instant::now() >= deadline {
                    log::debug!(
                        "kvxfer: peer {}: out of time attaching its regions; the rest attach on first use",
                        self.session
                    );
                    break;
                }
                if let Err(why) = link.attach(region.addr, deadline) {
                    log::debug!(
                        "kvxfer: peer {}: region {:#x} not attached now ({why}); retried on first use",
                        self.session,
                        region.addr
                    );
                }
            }
        }
        Ok((ShmTransport::new(link, Arc::clone(pool)), cma_note))
    }

    /// One RC queue pair per local NIC, each to the peer's NIC of the same number (modulo
    /// its count), connected through the control connection.
    fn connect_rdma(
        &self,
        net: &Net,
        control: &ControlClient,
        descriptor: &SegmentDescriptor,
        deadline: Instant,
    ) -> std::result::Result<RdmaTransport, String> {
        let rdma = net.shared.rdma.as_ref().map_err(|why| why.clone())?;
        if descriptor.rdma_nics.is_empty() {
            return Err("the peer has no RDMA NIC".into());
        }
        let keys = Arc::new(remote_keys(descriptor));
        let peer_nics: Vec<String> = descriptor
            .rdma_nics
            .iter()
            .map(|n| n.name.clone())
            .collect();
        let mut endpoints = Vec::new();
        for (i, worker) in rdma.workers().iter().enumerate() {
            // Rail affinity: the peer's NIC of the same name, else the same position.
            let j = crate::topology::remote_nic(worker.nic().name(), i, &peer_nics, &peer_nics)
                .and_then(|name| peer_nics.iter().position(|n| n == name))
                .unwrap_or(i % peer_nics.len());
            let ep = Endpoint::create(worker, i, j, Arc::clone(rdma.mrs()), Arc::clone(&keys))?;
            let request = RdmaConnectRequest {
                initiator: super::net::rdma_nic(worker.nic().name(), worker.nic().address()),
                target_nic: j as u16,
                qpn: ep.qpn(),
                psn: ep.psn(),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = control.rdma_connect(&request, left).map_err(|e| {
                format!(
                    "connecting {} to its {}: {e}",
                    worker.nic().name(),
                    descriptor.rdma_nics[j].name
                )
            })?;
            ep.connect(&RemoteQp {
                qpn: reply.qpn,
                psn: reply.psn,
                address: super::net::port_address(&descriptor.rdma_nics[j]),
            })?;
            endpoints.push(Arc::new(ep));
        }
        Ok(RdmaTransport::new(endpoints))
    }

    fn open_lanes(
        &self,
        net: &Net,
        descriptor: &SegmentDescriptor,
        lanes: usize,
        deadline: Instant,
    ) -> std::result::Result<TcpTransport, String> {
        let offer = descriptor
            .transports
            .iter()
            .find(|t| t.kind == "tcp")
            .ok_or("offers no transport this engine speaks (tcp)")?;
        let port: u16 = offer
            .param("port")
            .and_then(|p| p.parse().ok())
            .ok_or("its tcp offer has no valid port")?;
        let addr = data_address(&self.session, port)?;
        let left = deadline.saturating_duration_since(Instant::now());
        TcpTransport::connect(&net.pool, &self.session, addr, lanes, left)
            .map_err(|e| format!("cannot open data lanes to {addr}: {e}"))
    }

    /// The link if one is open (no reconnect).
    pub(super) fn current(&self) -> Option<Arc<Link>> {
        self.link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Closes the link (in-flight requests fail).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(link) = self
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            if let Some(tcp) = &link.tcp {
                tcp.close();
            }
            link.control.close();
        }
    }
}

fn data_address(session: &str, port: u16) -> std::result::Result<SocketAddr, String> {
    let (host, _) = split_host_port(session)?;
    (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

/// A notification to deliver for a batch whose bytes have all moved.
struct Job {
    batch: Arc<Batch>,
    link: Arc<Link>,
    bytes: Vec<u8>,
}

/// Delivers one peer's notifications on a thread of its own (started on first use, ended
/// when the link goes), so I/O threads never wait for a peer and a hung peer delays only
/// its own notifications.
#[derive(Debug, Default)]
pub(super) struct Notifier {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Notifier {
    fn sender(&self) -> std::io::Result<mpsc::Sender<Job>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = jobs.as_ref() {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Job>();
        // The thread holds only the receiver (and each job's link while it runs it), so
        // it ends once the link, which holds the sender, is dropped.
        std::thread::Builder::new()
            .name("kvx-notify".into())
            .spawn(move || {
                for job in rx {
                    let left = job.batch.deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // The batch has timed out (or will be told so): do not send late.
                        job.batch.notified(Err(
                            "the batch's deadline passed before its notification was sent".into(),
                        ));
                        continue;
                    }
                    let timeout = left.min(Duration::from_secs(10));
                    let result = job.link.control.notify(&job.bytes, timeout);
                    if let Err(ControlError::Timeout { .. }) = &result {
                        // A peer that does not answer within the deadline is treated as
                        // gone: the link counts as broken, later notifications fail at
                        // once, and the next submit reconnects.
                        job.link.control.close();
                    }
                    job.batch.notified(result.map_err(|e| e.to_string()));
                }
            })?;
        *jobs = Some(tx.clone());
        Ok(tx)
    }
}

impl Link {
    /// Queues the notification of `batch` (every byte moved) for delivery to this peer.
    pub(super) fn notify_later(self: &Arc<Self>, batch: Arc<Batch>, bytes: Vec<u8>) {
        let job = Job {
            batch,
            link: Arc::clone(self),
            bytes,
        };
        let refused = match self.notifier.sender() {
            Ok(tx) => tx
                .send(job)
                .err()
                .map(|e| (e.0, "the notifier stopped".to_string())),
            Err(e) => Some((job, format!("cannot start a notifier thread: {e}"))),
        };
        if let Some((job, why)) = refused {
            job.batch.notified(Err(why));
        }
    }
}
