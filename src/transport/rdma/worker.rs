//! The completion side of a NIC: chains in flight (by work-request id) and the poller
//! thread that turns their completions into completed slice ranges.

use std::ffi::{c_int, c_void};
use std::ops::Range;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::endpoint::Endpoint;
use super::nic::Nic;
use crate::sys::verbs::bindings::{ibv_cq, ibv_wc, ibv_wc_status};
use crate::sys::verbs::{poll_cq, req_notify_cq};
use crate::topology::{NicId, NicSelector};
use crate::transport::{SliceSource, TransportError, TransportKind};

/// How long the poller keeps polling after a completion before it sleeps on the channel
/// (a waking thread costs tens of microseconds; small requests come back faster).
const SPIN: Duration = Duration::from_micros(50);
/// How long a stopped batch's chains may stay uncompleted before their queue pair is
/// moved to the error state (flushing them).
const ABORT_GRACE: Duration = Duration::from_millis(300);
/// How long a stopping poller waits for chains in flight.
const GIVE_UP: Duration = Duration::from_secs(10);
/// How often a sleeping poller checks for shutdown.
const TICK_MS: c_int = 100;

/// A chain posted on an endpoint, until its completion.
pub(super) struct Posted {
    pub(super) work: Arc<dyn SliceSource>,
    pub(super) range: Range<usize>,
    pub(super) endpoint: Arc<Endpoint>,
    pub(super) wrs: u32,
    pub(super) posted_at: Instant,
}

/// In-flight chains by id: a slot index with a generation, so a stale completion (a
/// flushed request of a chain already failed) never matches a newer chain.
#[derive(Default)]
struct Slab {
    slots: Vec<(u32, Option<Posted>)>,
    free: Vec<u32>,
}

impl Slab {
    fn insert(&mut self, p: Posted) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push((0, None));
                self.slots.len() as u32 - 1
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.0 = slot.0.wrapping_add(1);
        slot.1 = Some(p);
        (u64::from(slot.0) << 32) | u64::from(index)
    }

    fn take(&mut self, id: u64) -> Option<Posted> {
        let (gen, index) = ((id >> 32) as u32, id as u32);
        let slot = self.slots.get_mut(index as usize)?;
        if slot.0 != gen || slot.1.is_none() {
            return None;
        }
        self.free.push(index);
        slot.1.take()
    }
}

/// A NIC with its poller.
pub struct NicWorker {
    nic: Arc<Nic>,
    /// Slices posted on this NIC, and chains it failed (its counters).
    slices: std::sync::atomic::AtomicU64,
    failures: std::sync::atomic::AtomicU64,
    inflight: Mutex<Slab>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The engine's NIC selector and this NIC's id in it: failures are reported there,
    /// and a NIC that keeps failing is paused (set once, by `Rdma::open`).
    health: std::sync::OnceLock<(Arc<NicSelector>, NicId)>,
}

impl std::fmt::Debug for NicWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("NicWorker").field(&self.nic.name()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NicWorker {
    /// Starts the poller of `nic`.
    pub fn start(nic: Arc<Nic>) -> std::io::Result<Arc<NicWorker>> {
        let worker = Arc::new(NicWorker {
            nic,
            slices: std::sync::atomic::AtomicU64::new(0),
            failures: std::sync::atomic::AtomicU64::new(0),
            inflight: Mutex::new(Slab::default()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            health: std::sync::OnceLock::new(),
        });
        let polled = Arc::clone(&worker);
        let handle = std::thread::Builder::new()
            .name(format!("kvx-rdma-{}", worker.nic.name()))
            .spawn(move || polled.run())?;
        *lock(&worker.thread) = Some(handle);
        Ok(worker)
    }

    /// The NIC.
    pub fn nic(&self) -> &Nic {
        &self.nic
    }

    /// The NIC, shared.
    pub fn nic_arc(&self) -> Arc<Nic> {
        Arc::clone(&self.nic)
    }

    /// Slices posted on this NIC so far, and chains that failed on it.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.slices.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// Reports this NIC's failures to `selector` (as NIC `id`), which pauses it by its
    /// policy. Only the first call counts.
    pub fn set_health(&self, selector: Arc<NicSelector>, id: NicId) {
        let _ = self.health.set((selector, id));
    }

    /// The selector and this NIC's id in it, if set.
    pub fn health(&self) -> Option<(&NicSelector, NicId)> {
        self.health.get().map(|(s, id)| (s.as_ref(), *id))
    }

    /// Whether the selector paused this NIC (it kept failing).
    pub fn is_paused(&self) -> bool {
        self.health()
            .is_some_and(|(s, id)| s.is_paused(id, Instant::now()))
    }

    pub(super) fn count_posted(&self, slices: u64) {
        self.slices.fetch_add(slices, Ordering::Relaxed);
    }

    pub(super) fn track(&self, p: Posted) -> u64 {
        lock(&self.inflight).insert(p)
    }

    pub(super) fn untrack(&self, id: u64) {
        lock(&self.inflight).take(id);
    }

    /// Takes a chain out of the in-flight set (the poller will not complete it).
    pub(super) fn take(&self, id: u64) -> Option<Posted> {
        lock(&self.inflight).take(id)
    }

    /// Stops the poller once nothing is in flight, and joins it; after `GIVE_UP` it stops
    /// waiting for chains that never complete (logged) rather than hang.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    fn run(&self) {
        let cq = self.nic.cq();
        let mut wcs = [ibv_wc::default(); 64];
        let mut last_busy = Instant::now();
        let mut stop_seen: Option<Instant> = None;
        loop {
            let n = self.poll(cq, &mut wcs);
            if n > 0 {
                last_busy = Instant::now();
                continue;
            }
            if last_busy.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                let stopping = *stop_seen.get_or_insert_with(Instant::now);
                if lock(&self.inflight).slots.iter().all(|s| s.1.is_none()) {
                    return;
                }
                if stopping.elapsed() > GIVE_UP {
                    log::error!(
                        "kvxfer: {}: chains still in flight {GIVE_UP:?} after shutdown; stopping its poller anyway",
                        self.nic.name()
                    );
                    return;
                }
            }
            // Arm, then poll once more (a completion between the last poll and the arm
            // raises no event), then sleep on the channel.
            // SAFETY: the CQ is live while the NIC (held by self) is.
            if unsafe { req_notify_cq(cq, 0) } != 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if self.poll(cq, &mut wcs) > 0 {
                last_busy = Instant::now();
                continue;
            }
            self.sleep();
            self.abort_stopped();
        }
    }

    /// A stopped batch (cancelled, past its deadline) whose chains the NIC has not
    /// completed `ABORT_GRACE` after they were posted (a peer or link that went silent: RC
    /// retries can take long, and a port that went down may never answer) gets their queue
    /// pairs moved to the error state, which flushes every request on them as a
    /// completion, so the batch ends.
    fn abort_stopped(&self) {
        let stuck: Vec<Arc<Endpoint>> = lock(&self.inflight)
            .slots
            .iter()
            .filter_map(|(_, p)| p.as_ref())
            .filter(|p| p.posted_at.elapsed() > ABORT_GRACE && p.work.is_stopped())
            .map(|p| Arc::clone(&p.endpoint))
            .collect();
        for ep in stuck {
            ep.abort("its batch was stopped and the NIC did not complete its requests");
        }
    }

    /// Polls up to 64 completions and handles them; returns how many.
    fn poll(&self, cq: *mut ibv_cq, wcs: &mut [ibv_wc; 64]) -> usize {
        // SAFETY: the CQ is live; wcs has 64 entries; only this thread polls it.
        let n = unsafe { poll_cq(cq, wcs.len() as c_int, wcs.as_mut_ptr()) };
        if n < 0 {
            log::error!("kvxfer: ibv_poll_cq on {} failed ({n})", self.nic.name());
            std::thread::sleep(Duration::from_millis(10));
            return 0;
        }
        for wc in &wcs[..n as usize] {
            self.handle(wc);
        }
        n as usize
    }

    fn handle(&self, wc: &ibv_wc) {
        let Some(p) = lock(&self.inflight).take(wc.wr_id) else {
            // A flushed request of a chain already failed.
            return;
        };
        let failed = wc.status != ibv_wc_status::IBV_WC_SUCCESS;
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
            // What counts towards pausing this NIC: the first failure of a queue pair (its
            // other chains are then flushed: one error, not many), and only statuses that
            // may be this NIC's or its link's doing (the peer refusing an access is not).
            let first_of_qp = !p.endpoint.is_broken();
            let peers_doing = matches!(
                wc.status,
                ibv_wc_status::IBV_WC_WR_FLUSH_ERR
                    | ibv_wc_status::IBV_WC_REM_ACCESS_ERR
                    | ibv_wc_status::IBV_WC_REM_INV_REQ_ERR
                    | ibv_wc_status::IBV_WC_REM_OP_ERR
            );
            if first_of_qp && !peers_doing && !p.work.is_stopped() {
                if let Some((selector, id)) = self.health() {
                    selector.report_failure(id, Instant::now());
                }
            }
        }
        if failed && !p.work.is_stopped() {
            // Failover: the requests are idempotent, so the range moves to a live queue
            // pair of the same peer on another NIC, within the batch's deadline.
            if let Some(alt) = p.endpoint.alternative() {
                log::warn!(
                    "kvxfer: an RDMA request on {} failed (work completion status {}); moving its slices to {}",
                    self.nic.name(),
                    wc.status.0,
                    alt.worker_name()
                );
                p.endpoint.completed(p.wrs, true);
                alt.retry(p.work, p.range);
                return;
            }
        }
        let result = if failed {
            Err(TransportError {
                transport: TransportKind::Rdma,
                reason: format!(
                    "{} on {}: work completion status {} (vendor error {:#x})",
                    if wc.status == ibv_wc_status::IBV_WC_REM_ACCESS_ERR {
                        "the peer refused the access (bad key or range)"
                    } else {
                        "an RDMA request failed"
                    },
                    self.nic.name(),
                    wc.status.0,
                    wc.vendor_err
                ),
            })
        } else {
            Ok(())
        };
        p.work.complete(p.range, result);
        p.endpoint.completed(p.wrs, failed);
    }

    /// Waits for the channel's event (bounded, to notice shutdown).
    fn sleep(&self) {
        let channel = self.nic.channel();
        // SAFETY: the channel is live while the NIC is; fd is a plain field.
        let fd = unsafe { (*channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, TICK_MS) };
        if ready <= 0 {
            return;
        }
        let mut cq: *mut ibv_cq = ptr::null_mut();
        let mut ctx: *mut c_void = ptr::null_mut();
        let v = self.nic.verbs();
        // SAFETY: the channel is readable (an event is pending), the out-pointers valid;
        // the event is acknowledged right away (destroy_cq waits for acknowledgements).
        unsafe {
            if v.get_cq_event(channel, &mut cq, &mut ctx) == 0 {
                v.ack_cq_events(cq, 1);
            }
        }
    }
}

impl Drop for NicWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}
