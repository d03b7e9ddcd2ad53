//! Peers in other processes: the control connection (descriptor, probes, notifications)
//! and the TCP lanes, opened lazily and reopened when the peer went away. A peer that
//! comes back under the same session id with a new epoch is a restarted process: its old
//! descriptor is dropped.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::batch::Batch;
use super::net::{split_host_port, Net};
use super::{Error, Result};
use crate::control::{ControlClient, ControlError, SegmentDescriptor};
use crate::memory::{AddrRange, Backing, Region};
use crate::transport::tcp::TcpTransport;

/// The peer's registered regions, as the slicer looks them up.
pub(super) type RemoteRegions = Arc<BTreeMap<u64, Arc<Region>>>;

/// An open connection to a peer.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) control: ControlClient,
    pub(super) tcp: Arc<TcpTransport>,
    regions: Mutex<(u64, RemoteRegions)>,
    notifier: Notifier,
}

impl Link {
    /// Whether the peer went away (control connection or every lane lost).
    pub(super) fn is_broken(&self) -> bool {
        !self.control.is_alive() || self.tcp.is_broken()
    }

    /// The peer's regions as last published.
    pub(super) fn regions(&self) -> RemoteRegions {
        let descriptor = self.control.descriptor();
        let mut cached = self.regions.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.0 != descriptor.version {
            *cached = (descriptor.version, Arc::new(index(&descriptor)));
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
    pub(super) fn link(&self, net: &Net, lanes: usize, timeout: Duration) -> Result<Arc<Link>> {
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
                .last_error()
                .unwrap_or_else(|| "control connection lost".into());
            log::info!("kvxfer: reconnecting to peer {} ({why})", self.session);
            old.tcp.close();
            old.control.close();
        }
        let fresh = Arc::new(self.connect(net, lanes, timeout)?);
        *link = Some(Arc::clone(&fresh));
        Ok(fresh)
    }

    fn connect(&self, net: &Net, lanes: usize, timeout: Duration) -> Result<Link> {
        let peer_err = |reason: String| Error::Peer {
            session: self.session.clone(),
            reason,
        };
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
        let offer = descriptor
            .transports
            .iter()
            .find(|t| t.kind == "tcp")
            .ok_or_else(|| peer_err("offers no transport this engine speaks (tcp)".into()))?;
        let port: u16 = offer
            .param("port")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| peer_err("its tcp offer has no valid port".into()))?;
        let addr = data_address(&self.session, port).map_err(peer_err)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let tcp = TcpTransport::connect(&net.pool, &self.session, addr, lanes, left)
            .map_err(|e| peer_err(format!("cannot open data lanes to {addr}: {e}")))?;
        Ok(Link {
            control,
            tcp: Arc::new(tcp),
            regions: Mutex::new((u64::MAX, Arc::default())),
            notifier: Notifier::default(),
        })
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
            link.tcp.close();
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
