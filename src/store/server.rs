//! The segment server: the memory (and optional SSD file) a process contributes to the
//! store, with its index, answering store requests peers send through the engine's
//! control connections. Clients write and read the bytes one-sided (RDMA, shm or TCP,
//! whatever the engine picks); the server only hands out addresses, leases and commits.
//!
//! A housekeeping thread reclaims reservations never committed and expired leases, and
//! keeps memory below the high watermark (demoting to the SSD tier when there is one).

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::index::{Index, IndexConfig, Lookup, PutOutcome, RemoveError};
use super::ssd::SsdTier;
use super::wire::{
    check_key, error_code, ItemStatus, LookupItem, Reply, Request, ReserveItem, StoreStats,
};
use crate::engine::{Engine, StoreService};
use crate::memory::{Buffer, Location};

/// How much longer than the clients' write window reservations are kept at least.
pub const RESERVE_MARGIN: Duration = Duration::from_secs(1);

/// How often housekeeping runs when nothing wakes it.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_millis(50);

/// What a segment server contributes and how it keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentConfig {
    /// Bytes of memory contributed (allocated from the engine, registered, every access
    /// right: clients write and read objects in it directly).
    pub memory_bytes: u64,
    /// The SSD tier: a directory for the cache file and its size (`None`: no tier).
    pub disk: Option<(PathBuf, u64)>,
    /// Above this fraction of memory used, objects are evicted (demoted or dropped)...
    pub high_watermark: f64,
    /// ...down to this fraction.
    pub low_watermark: f64,
    /// A reservation not committed within this is reclaimed; longer than the clients'
    /// write window ([`WRITE_WINDOW`](super::wire::WRITE_WINDOW)). Default 10 s.
    pub reserve_timeout: Duration,
    /// How long a reader may copy an object it looked up.
    pub lease: Duration,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        let index = IndexConfig::default();
        SegmentConfig {
            memory_bytes: 0,
            disk: None,
            high_watermark: index.high_watermark,
            low_watermark: index.low_watermark,
            reserve_timeout: index.reserve_timeout,
            lease: index.lease,
        }
    }
}

/// A store segment served by one engine.
pub struct SegmentServer {
    segment: Buffer,
    index: Mutex<Index>,
    ssd: Option<SsdTier>,
    lease: Duration,
    /// Stop flag and wake-up of housekeeping (shared with its thread, which must not
    /// hold the server while it waits).
    wake: Arc<(Mutex<bool>, Condvar)>,
    housekeeper: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SegmentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentServer")
            .field("addr", &format_args!("{:#x}", self.segment.addr()))
            .field("len", &self.segment.len())
            .field("ssd", &self.ssd.as_ref().map(|s| s.path().to_path_buf()))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SegmentServer {
    /// Allocates the segment from `engine`, opens the SSD tier if asked, and starts
    /// housekeeping. The caller sets it as the engine's store service.
    pub fn start(engine: &Engine, config: &SegmentConfig) -> Result<Arc<SegmentServer>, String> {
        if config.memory_bytes < super::alloc::GRANULE {
            return Err(format!(
                "a segment of {} bytes is too small (at least {} bytes)",
                config.memory_bytes,
                super::alloc::GRANULE
            ));
        }
        if !(0.0 < config.low_watermark
            && config.low_watermark <= config.high_watermark
            && config.high_watermark <= 1.0)
        {
            return Err(format!(
                "watermarks must satisfy 0 < low ({}) <= high ({}) <= 1",
                config.low_watermark, config.high_watermark
            ));
        }
        if config.reserve_timeout < super::wire::WRITE_WINDOW + RESERVE_MARGIN {
            return Err(format!(
                "reserve_timeout {:?} must be at least the clients' write window {:?} plus \
                 {RESERVE_MARGIN:?} (a margin for bytes in flight when a client gives up)",
                config.reserve_timeout,
                super::wire::WRITE_WINDOW
            ));
        }
        let len = usize::try_from(config.memory_bytes)
            .map_err(|_| format!("{} bytes do not fit this machine", config.memory_bytes))?;
        let segment = engine
            .allocate(len, Location::Any)
            .map_err(|e| format!("cannot allocate the store segment: {e}"))?;
        let ssd = match &config.disk {
            Some((dir, bytes)) => Some(
                SsdTier::open(dir, *bytes, segment.region())
                    .map_err(|e| format!("cannot open the SSD tier in {}: {e}", dir.display()))?,
            ),
            None => None,
        };
        if let Some(ssd) = &ssd {
            log::info!("kvxfer store: {}", ssd.describe());
        }
        let index = Index::new(IndexConfig {
            memory_capacity: config.memory_bytes,
            disk_capacity: ssd.as_ref().map_or(0, |s| s.capacity()),
            high_watermark: config.high_watermark,
            low_watermark: config.low_watermark,
            reserve_timeout: config.reserve_timeout,
            lease: config.lease,
        });
        let server = Arc::new(SegmentServer {
            segment,
            index: Mutex::new(index),
            ssd,
            lease: config.lease,
            wake: Arc::new((Mutex::new(false), Condvar::new())),
            housekeeper: Mutex::new(None),
        });
        let weak = Arc::downgrade(&server);
        let wake = Arc::clone(&server.wake);
        let thread = std::thread::Builder::new()
            .name("kvx-store-keeper".into())
            .spawn(move || housekeeping(weak, wake))
            .map_err(|e| format!("cannot start the store's housekeeping thread: {e}"))?;
        *lock(&server.housekeeper) = Some(thread);
        Ok(server)
    }

    /// Stops housekeeping (also done on drop).
    pub fn stop(&self) {
        *lock(&self.wake.0) = true;
        self.wake.1.notify_all();
        if let Some(t) = lock(&self.housekeeper).take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// The segment's first address and length.
    pub fn segment(&self) -> (u64, usize) {
        (self.segment.addr(), self.segment.len())
    }

    /// This segment's counters.
    pub fn stats(&self) -> StoreStats {
        lock(&self.index).stats()
    }

    /// Answers one request.
    pub fn answer(&self, request: Request) -> Reply {
        let now = Instant::now();
        let base = self.segment.addr();
        match request {
            Request::Reserve { items } => {
                // With an SSD tier, room for the batch is made by demoting, not dropping;
                // only what can fit counts (a len beyond memory is refused anyway).
                let capacity = self.segment.len() as u64;
                let incoming = items
                    .iter()
                    .map(|(_, len)| *len)
                    .filter(|&len| len <= capacity)
                    .fold(0u64, u64::saturating_add);
                self.make_room(incoming);
                let mut index = lock(&self.index);
                let out = items
                    .iter()
                    .map(|(key, len)| {
                        if check_key(key).is_err() || *len == 0 {
                            return ReserveItem::Refused(ItemStatus::Failed);
                        }
                        match index.reserve(key, *len, now) {
                            PutOutcome::Reserved(r) => ReserveItem::Granted {
                                addr: base + r.offset,
                                token: r.token,
                            },
                            PutOutcome::AlreadyExists => {
                                ReserveItem::Refused(ItemStatus::AlreadyExists)
                            }
                            PutOutcome::NoSpace => ReserveItem::Refused(ItemStatus::NoSpace),
                        }
                    })
                    .collect();
                drop(index);
                self.nudge();
                Reply::Reserved(out)
            }
            Request::Commit { items } => {
                let mut index = lock(&self.index);
                Reply::Statuses(
                    items
                        .iter()
                        .map(|(key, token)| match index.commit(key, *token, now) {
                            Ok(()) => ItemStatus::Ok,
                            Err(_) => ItemStatus::UnknownReservation,
                        })
                        .collect(),
                )
            }
            Request::Abort { items } => {
                let mut index = lock(&self.index);
                Reply::Statuses(
                    items
                        .iter()
                        .map(|(key, token)| {
                            if index.abort(key, *token) {
                                ItemStatus::Ok
                            } else {
                                ItemStatus::UnknownReservation
                            }
                        })
                        .collect(),
                )
            }
            Request::Lookup { keys } => {
                let items = keys.iter().map(|key| self.lookup(key)).collect();
                Reply::Found {
                    lease_ms: u32::try_from(self.lease.as_millis()).unwrap_or(u32::MAX),
                    items,
                }
            }
            Request::Release { leases } => {
                let mut index = lock(&self.index);
                for lease in leases {
                    index.release(lease);
                }
                Reply::Done
            }
            Request::Exists { keys } => {
                let mut index = lock(&self.index);
                Reply::Existing(keys.iter().map(|k| index.exists(k, now)).collect())
            }
            Request::Remove { keys } => {
                let mut index = lock(&self.index);
                Reply::Statuses(
                    keys.iter()
                        .map(|k| match index.remove(k, now) {
                            Ok(()) => ItemStatus::Ok,
                            Err(RemoveError::NotFound) => ItemStatus::NotFound,
                            Err(RemoveError::Leased) => ItemStatus::Leased,
                        })
                        .collect(),
                )
            }
            Request::RemoveAll => Reply::RemovedAll(lock(&self.index).remove_all(now)),
            Request::Stats => Reply::Stats(self.stats()),
        }
    }

    /// A lookup under a lease; an object on disk is promoted first (the copy runs without
    /// the index lock).
    fn lookup(&self, key: &[u8]) -> LookupItem {
        let base = self.segment.addr();
        for _ in 0..2 {
            let now = Instant::now();
            let mut index = lock(&self.index);
            match index.lookup(key, now) {
                Lookup::Found(f) => {
                    return LookupItem::Found {
                        addr: base + f.offset,
                        len: f.len,
                        lease: f.lease,
                    }
                }
                Lookup::NotFound => return LookupItem::Missing(ItemStatus::NotFound),
                Lookup::OnDisk { len, .. } => {
                    let Some(ssd) = &self.ssd else {
                        return LookupItem::Missing(ItemStatus::Failed);
                    };
                    drop(index);
                    self.make_room(len);
                    let mut index = lock(&self.index);
                    let Some((offset, disk, len)) = index.promote_begin(key, Instant::now()) else {
                        // No memory for it now, or another reader is promoting it.
                        index.note_miss();
                        return LookupItem::Missing(ItemStatus::NotFound);
                    };
                    drop(index);
                    let ok = ssd
                        .promote(&[(disk, offset, len)])
                        .pop()
                        .is_some_and(|r| match r {
                            Ok(()) => true,
                            Err(e) => {
                                log::warn!(
                                    "kvxfer store: promoting an object from disk failed: {e}"
                                );
                                false
                            }
                        });
                    let mut index = lock(&self.index);
                    index.promote_end(key, ok, Instant::now());
                    if !ok {
                        index.note_miss();
                        return LookupItem::Missing(ItemStatus::Failed);
                    }
                }
            }
        }
        LookupItem::Missing(ItemStatus::NotFound)
    }

    /// With an SSD tier: demotes objects now if `incoming` more bytes would take memory
    /// above the high watermark (the index would otherwise drop objects to make room).
    fn make_room(&self, incoming: u64) {
        if self.ssd.is_none() {
            return;
        }
        let demotions = lock(&self.index).evict_for(incoming, Instant::now());
        self.demote(demotions);
    }

    /// Wakes housekeeping (memory may be above the watermark).
    fn nudge(&self) {
        self.wake.1.notify_one();
    }

    /// One round of housekeeping: reclaim, then evict (demoting with the SSD tier).
    fn keep(&self) {
        let now = Instant::now();
        let demotions = {
            let mut index = lock(&self.index);
            index.reclaim(now);
            index.evict(now)
        };
        self.demote(demotions);
    }

    /// Copies `demotions` to the SSD tier and reports each to the index.
    fn demote(&self, demotions: Vec<super::index::Demotion>) {
        if demotions.is_empty() {
            return;
        }
        let Some(ssd) = &self.ssd else {
            return;
        };
        let items: Vec<(u64, u64, u64)> = demotions
            .iter()
            .map(|d| (d.offset, d.disk_offset, d.len))
            .collect();
        let results = ssd.demote(&items);
        let mut index = lock(&self.index);
        for (d, r) in demotions.iter().zip(results) {
            if let Err(e) = &r {
                log::warn!("kvxfer store: demoting an object to disk failed: {e}");
            }
            index.demoted(&d.key, d.disk_offset, r.is_ok());
        }
    }
}

impl Drop for SegmentServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The housekeeping loop: a round every period or when nudged, until the server is
/// stopped or dropped.
fn housekeeping(server: Weak<SegmentServer>, wake: Arc<(Mutex<bool>, Condvar)>) {
    loop {
        match server.upgrade() {
            Some(s) => s.keep(),
            None => return,
        }
        let stopped = lock(&wake.0);
        if *stopped {
            return;
        }
        let (stopped, _) = wake
            .1
            .wait_timeout(stopped, HOUSEKEEPING_PERIOD)
            .unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return;
        }
    }
}

impl StoreService for SegmentServer {
    fn handle(&self, from: &str, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let reply = match Request::decode(&body) {
            Ok(request) => self.answer(request),
            Err(e) => {
                log::debug!("kvxfer store: a malformed request from {from}: {e}");
                Reply::error(error_code::MALFORMED, e.to_string())
            }
        };
        Ok(reply.encode())
    }
}
