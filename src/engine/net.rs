//! The engine's network side: its identity, the control and data listeners, the segment
//! descriptor it publishes, and the notifications it has received.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{EngineConfig, Error, Result};
use crate::control::{
    ControlHandler, ControlServer, RdmaConnectReply, RdmaConnectRequest, RdmaNic, RegionInfo,
    RegionKey, SegmentDescriptor, TransportOffer,
};
use crate::memory::Registry;
use crate::transport::rdma::{Endpoint, PortAddress, Rdma, RemoteQp};
use crate::transport::shm::ShmServer;
use crate::transport::tcp::{IoPool, TcpServer};
use crate::transport::TransportKind;

/// Splits `host:port` (or `[v6]:port`) into its host and port.
pub(crate) fn split_host_port(s: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    let port = port
        .parse()
        .map_err(|_| format!("{s:?}: port {port:?} is not a number in 0..=65535"))?;
    Ok((host.to_string(), port))
}

/// A notification received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sender's session id.
    pub from: String,
    /// What it sent.
    pub bytes: Vec<u8>,
}

/// Notifications queued at most before senders are refused.
const INBOX_MAX: usize = 64 << 10;
/// Bytes of queued notifications at most before senders are refused.
const INBOX_MAX_BYTES: usize = 256 << 20;

/// Received notifications, waiting to be drained.
#[derive(Debug, Default)]
pub(super) struct Inbox {
    queue: Mutex<Queued>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct Queued {
    notes: VecDeque<Notification>,
    bytes: usize,
}

impl Queued {
    fn pop(&mut self) -> Option<Notification> {
        let n = self.notes.pop_front()?;
        self.bytes -= n.bytes.len();
        Some(n)
    }
}

impl Inbox {
    /// Queues `n`, unless the queue is full (the application is not draining it): then
    /// the sender is told so instead of this process running out of memory.
    pub(super) fn push(&self, n: Notification) -> Result<(), String> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.notes.len() >= INBOX_MAX || q.bytes + n.bytes.len() > INBOX_MAX_BYTES {
            return Err(format!(
                "the notification queue is full ({} notifications, {} bytes; at most \
                 {INBOX_MAX} and {INBOX_MAX_BYTES} bytes): the application is not draining it",
                q.notes.len(),
                q.bytes
            ));
        }
        q.bytes += n.bytes.len();
        q.notes.push_back(n);
        drop(q);
        self.arrived.notify_all();
        Ok(())
    }

    pub(super) fn drain(&self) -> Vec<Notification> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.bytes = 0;
        q.notes.drain(..).collect()
    }

    pub(super) fn wait_one(&self, timeout: Duration) -> Option<Notification> {
        let until = Instant::now().checked_add(timeout);
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(n) = q.pop() {
                return Some(n);
            }
            let left = match until {
                Some(until) => until.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            q = self
                .arrived
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// What the control server needs to answer peers.
#[derive(Debug)]
pub(super) struct NetShared {
    pub(super) registry: Arc<Registry>,
    pub(super) session: String,
    pub(super) engine_id: u64,
    pub(super) host: String,
    pub(super) epoch: u64,
    pub(super) offers: Vec<TransportOffer>,
    pub(super) inbox: Arc<Inbox>,
    /// The RDMA NICs and registrations, or why there are none.
    pub(super) rdma: std::result::Result<Arc<Rdma>, String>,
    /// Queue pairs peers connected to ours (they post; we only keep them up).
    pub(super) served_qps: Mutex<Vec<Arc<Endpoint>>>,
    /// The store segment this engine serves, if any.
    pub(super) store: std::sync::RwLock<Option<Arc<dyn StoreService>>>,
}

/// Answers the store requests peers send to this engine (the store layer's segment
/// server plugs in here; the engine carries the bytes and knows nothing of them).
pub trait StoreService: Send + Sync {
    /// Handles one request from the peer at `from` (its session); `Err` refuses the whole
    /// request with a reason the peer sees.
    fn handle(&self, from: &str, body: Vec<u8>) -> std::result::Result<Vec<u8>, String>;
}

impl std::fmt::Debug for dyn StoreService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreService")
    }
}

impl NetShared {
    pub(super) fn descriptor(&self) -> SegmentDescriptor {
        SegmentDescriptor {
            engine_id: self.engine_id,
            session: self.session.clone(),
            host: self.host.clone(),
            epoch: self.epoch,
            version: self.registry.version(),
            regions: region_infos(&self.registry),
            transports: self.offers.clone(),
            rdma_nics: self.rdma_nics(),
            rkeys: self.rkeys(),
        }
    }

    fn rdma_nics(&self) -> Vec<RdmaNic> {
        let Ok(rdma) = &self.rdma else {
            return Vec::new();
        };
        rdma.workers()
            .iter()
            .map(|w| rdma_nic(w.nic().name(), w.nic().address()))
            .collect()
    }

    fn rkeys(&self) -> Vec<RegionKey> {
        let Ok(rdma) = &self.rdma else {
            return Vec::new();
        };
        rdma.mrs()
            .keys()
            .into_iter()
            .map(|k| RegionKey {
                addr: k.addr,
                len: k.len,
                nic: k.nic,
                rkey: k.rkey,
            })
            .collect()
    }
}

/// A NIC as the control plane describes it.
pub(super) fn rdma_nic(name: &str, a: PortAddress) -> RdmaNic {
    RdmaNic {
        name: name.to_string(),
        port: a.port,
        lid: a.lid,
        gid: a.gid,
        gid_index: a.gid_index,
        mtu: crate::sys::verbs::mtu_bytes(a.mtu).unwrap_or(1024),
    }
}

/// The port address a peer's NIC description gives.
pub(super) fn port_address(n: &RdmaNic) -> PortAddress {
    use crate::sys::verbs::bindings::ibv_mtu;
    let mtu = match n.mtu {
        256 => ibv_mtu::IBV_MTU_256,
        512 => ibv_mtu::IBV_MTU_512,
        2048 => ibv_mtu::IBV_MTU_2048,
        4096 => ibv_mtu::IBV_MTU_4096,
        _ => ibv_mtu::IBV_MTU_1024,
    };
    PortAddress {
        port: n.port,
        lid: n.lid,
        gid: n.gid,
        gid_index: n.gid_index,
        mtu,
    }
}

/// The registered regions as a peer sees them.
pub(super) fn region_infos(registry: &Registry) -> Vec<RegionInfo> {
    registry
        .snapshot()
        .iter()
        .map(|r| RegionInfo {
            addr: r.range().start,
            len: r.range().len,
            location: r.location(),
            access: r.access(),
        })
        .collect()
}

impl NetShared {
    /// The store service, if one is set.
    pub(super) fn store_service(&self) -> Option<Arc<dyn StoreService>> {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ControlHandler for NetShared {
    fn descriptor(&self) -> SegmentDescriptor {
        NetShared::descriptor(self)
    }

    fn store(&self, from: &SegmentDescriptor, body: Vec<u8>) -> Result<Vec<u8>, String> {
        match self.store_service() {
            Some(service) => service.handle(&from.session, body),
            None => Err("this engine serves no store segment".into()),
        }
    }

    fn notified(&self, from: &SegmentDescriptor, bytes: Vec<u8>) -> Result<(), String> {
        self.inbox.push(Notification {
            from: from.session.clone(),
            bytes,
        })
    }

    fn rdma_connect(
        &self,
        from: &SegmentDescriptor,
        request: &RdmaConnectRequest,
    ) -> Result<RdmaConnectReply, String> {
        let rdma = self
            .rdma
            .as_ref()
            .map_err(|why| format!("RDMA is not used here: {why}"))?;
        let nic = usize::from(request.target_nic);
        let worker = rdma
            .workers()
            .get(nic)
            .ok_or_else(|| format!("no NIC number {nic} here ({} NICs)", rdma.workers().len()))?;
        // Our side only answers the peer's requests: it posts nothing.
        let ep = Endpoint::create_responder(worker, nic, Arc::clone(rdma.mrs()))?;
        ep.connect(&RemoteQp {
            qpn: request.qpn,
            psn: request.psn,
            address: port_address(&request.initiator),
        })?;
        let reply = RdmaConnectReply {
            qpn: ep.qpn(),
            psn: ep.psn(),
        };
        log::debug!(
            "kvxfer: peer {} connected its QP {} on {} to our QP {} on {}",
            from.session,
            request.qpn,
            request.initiator.name,
            reply.qpn,
            worker.nic().name()
        );
        self.served_qps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(ep));
        Ok(reply)
    }
}

/// The listeners and I/O threads of an engine that listens.
pub(super) struct Net {
    pub(super) shared: Arc<NetShared>,
    pub(super) control: Arc<ControlServer>,
    pub(super) tcp: TcpServer,
    pub(super) pool: Arc<IoPool>,
    /// The same-host listener, or why there is none.
    pub(super) shm: std::result::Result<Arc<ShmServer>, String>,
    /// The RDMA NICs, or why there are none.
    pub(super) rdma: std::result::Result<Arc<Rdma>, String>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("session", &self.shared.session)
            .field("data", &self.tcp.local_addr())
            .field("control_connections", &self.control.connections())
            .finish()
    }
}

impl Net {
    pub(super) fn start(
        config: &EngineConfig,
        listen: &str,
        registry: &Arc<Registry>,
        inbox: &Arc<Inbox>,
    ) -> Result<Net> {
        let (host, _) = split_host_port(listen).map_err(Error::Config)?;
        let start_err =
            |what: &str, e: &dyn std::fmt::Display| Error::Start(format!("{what}: {e}"));
        let control_listener = TcpListener::bind(listen)
            .map_err(|e| start_err(&format!("cannot listen on {listen}"), &e))?;
        let port = control_listener
            .local_addr()
            .map_err(|e| start_err("listener address", &e))?
            .port();
        let data_listener = TcpListener::bind((host.as_str(), 0))
            .map_err(|e| start_err(&format!("cannot open a data listener on {host}"), &e))?;
        let data_port = data_listener
            .local_addr()
            .map_err(|e| start_err("data listener address", &e))?
            .port();
        let pool = Arc::new(
            IoPool::start(config.io_threads)
                .map_err(|e| start_err("cannot start io_uring I/O threads (is io_uring disabled? see /proc/sys/kernel/io_uring_disabled)", &e))?,
        );
        let tcp = TcpServer::start(data_listener, Arc::clone(registry), Arc::clone(&pool))
            .map_err(|e| start_err("cannot start the data listener", &e))?;
        let engine_id = random_u64();
        let shm = start_shm(config, engine_id, registry);
        let rdma = start_rdma(config);
        let mut offers = vec![TransportOffer {
            kind: "tcp".into(),
            params: vec![
                ("port".into(), data_port.to_string()),
                ("lanes".into(), config.tcp_lanes.to_string()),
            ],
        }];
        if let Ok(server) = &shm {
            offers.push(TransportOffer {
                kind: "shm".into(),
                params: vec![("socket".into(), server.name().to_string())],
            });
        }
        let session = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let shared = Arc::new(NetShared {
            registry: Arc::clone(registry),
            session,
            engine_id,
            host: host_identity(),
            epoch: epoch_now(),
            offers,
            inbox: Arc::clone(inbox),
            rdma: rdma.clone(),
            served_qps: Mutex::new(Vec::new()),
            store: std::sync::RwLock::new(None),
        });
        let control = Arc::new(
            ControlServer::start(
                control_listener,
                Arc::clone(&shared) as Arc<dyn ControlHandler>,
            )
            .map_err(|e| start_err("cannot start the control listener", &e))?,
        );
        // Peers learn of every registry change; the observer holds weak references so the
        // registry does not keep the network side alive.
        let (weak_shared, weak_control): (Weak<NetShared>, Weak<ControlServer>) =
            (Arc::downgrade(&shared), Arc::downgrade(&control));
        registry.set_observer(Some(Arc::new(move || {
            if let (Some(shared), Some(control)) = (weak_shared.upgrade(), weak_control.upgrade()) {
                // New regions get their RDMA registrations before peers hear of them.
                if let Ok(rdma) = &shared.rdma {
                    rdma.sync(&shared.registry);
                }
                control.publish(&shared.descriptor());
            }
        })));
        set_revoker(registry, &shm, &rdma);
        Ok(Net {
            shared,
            control,
            tcp,
            pool,
            shm,
            rdma,
        })
    }

    /// Stops listening and closes every connection (in-flight requests fail once the
    /// kernel is done with their buffers).
    pub(super) fn shutdown(&self) {
        self.shared.registry.set_observer(None);
        // Peers lose every region (and finish their copies) before unregistering stops
        // asking: a buffer dropped in between must not go while a peer still copies.
        if let Ok(shm) = &self.shm {
            shm.shutdown();
        }
        self.shared
            .served_qps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        if let Ok(rdma) = &self.rdma {
            rdma.shutdown();
        }
        self.shared.registry.set_revoker(None);
        self.tcp.shutdown();
        self.pool.shutdown();
    }
}

/// Starts the same-host listener when the configuration wants shared memory, and makes
/// unregistering ask it first; otherwise says why there is none.
fn start_shm(
    config: &EngineConfig,
    engine_id: u64,
    registry: &Arc<Registry>,
) -> std::result::Result<Arc<ShmServer>, String> {
    if !config.transports.contains(&TransportKind::Shm) {
        return Err("not used: the configuration's transports leave it out".into());
    }
    let name = format!("kvxfer.{engine_id:016x}.{}", std::process::id());
    let server = match ShmServer::start(&name, engine_id, Arc::clone(registry)) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            let why = format!("not used: cannot listen on the abstract socket @{name}: {e}");
            log::warn!("kvxfer: same-host shared memory {why}; peers on this host use tcp");
            return Err(why);
        }
    };
    Ok(server)
}

/// Opens the RDMA NICs when the configuration wants RDMA; otherwise (or when this host
/// cannot) says why, logged once.
fn start_rdma(config: &EngineConfig) -> std::result::Result<Arc<Rdma>, String> {
    if !config.transports.contains(&TransportKind::Rdma) {
        return Err("not used: the configuration's transports leave it out".into());
    }
    match Rdma::open(
        &config.rdma_devices,
        config.rdma_gid_index,
        config.nic_pause,
    ) {
        Ok(rdma) => {
            log::info!("kvxfer: {}", rdma.describe());
            Ok(Arc::new(rdma))
        }
        Err(why) => {
            log::info!("kvxfer: RDMA not used: {why}; peers use the next transport");
            Err(format!("not used: {why}"))
        }
    }
}

/// Unregistering asks the same-host server (peers copying right now keep the region) and
/// then takes the region's RDMA registrations away, so no NIC touches it afterwards.
fn set_revoker(
    registry: &Arc<Registry>,
    shm: &std::result::Result<Arc<ShmServer>, String>,
    rdma: &std::result::Result<Arc<Rdma>, String>,
) {
    let shm = shm.as_ref().ok().map(|s| s.revoker());
    let rdma = rdma.as_ref().ok().map(Arc::downgrade);
    if shm.is_none() && rdma.is_none() {
        return;
    }
    registry.set_revoker(Some(Arc::new(move |region, force| {
        if let Some(shm) = &shm {
            shm(region, force)?;
        }
        if let Some(rdma) = rdma.as_ref().and_then(Weak::upgrade) {
            rdma.revoke(region);
        }
        Ok(())
    })));
}

/// Epoch of this engine instance: start time in nanoseconds, so a restarted process under
/// the same session id has a different (larger) one.
fn epoch_now() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    // Two engines of one process started within the same nanosecond still differ.
    let prev = LAST.fetch_max(now, Ordering::AcqRel);
    if prev >= now {
        LAST.fetch_add(1, Ordering::AcqRel) + 1
    } else {
        now
    }
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        return epoch_now() ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_ne_bytes(bytes)
}

/// `hostname/boot-id`: equal for two processes exactly when they share a running kernel.
pub(super) fn host_identity() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let name = read("/proc/sys/kernel/hostname").unwrap_or_else(|_| "unknown".into());
    let boot = read("/proc/sys/kernel/random/boot_id").unwrap_or_else(|_| "unknown".into());
    format!("{name}/{boot}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.0.1:80").unwrap(),
            ("127.0.0.1".into(), 80)
        );
        assert_eq!(split_host_port("[::1]:0").unwrap(), ("::1".into(), 0));
        assert_eq!(
            split_host_port("node-3:7000").unwrap(),
            ("node-3".into(), 7000)
        );
        for bad in ["", "host", ":80", "h:99999", "h:x", "h:-1"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    /// A full inbox refuses (the sender is told) instead of growing; draining makes room.
    #[test]
    fn inbox_is_bounded() {
        let inbox = Inbox::default();
        let note = |len| Notification {
            from: "peer:1".into(),
            bytes: vec![0; len],
        };
        for _ in 0..INBOX_MAX {
            inbox.push(note(0)).unwrap();
        }
        let err = inbox.push(note(0)).unwrap_err();
        assert!(err.contains("queue is full"), "{err}");
        assert_eq!(inbox.drain().len(), INBOX_MAX);
        inbox.push(note(INBOX_MAX_BYTES - 10)).unwrap();
        assert!(
            inbox.push(note(11)).is_err(),
            "the byte limit was not enforced"
        );
        assert_eq!(
            inbox.wait_one(Duration::ZERO).unwrap().bytes.len(),
            INBOX_MAX_BYTES - 10
        );
        inbox.push(note(11)).unwrap();
    }

    #[test]
    fn epochs_increase() {
        let a = epoch_now();
        let b = epoch_now();
        assert!(b > a);
    }
}
