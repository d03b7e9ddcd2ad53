//! RC queue pairs and the work posted on them. An [`Endpoint`] is one QP from a local NIC
//! to a peer's NIC. Batches waiting for it queue on the endpoint; ranges of their slices
//! are claimed only while the QP has room (a bound on outstanding work requests, so a huge
//! batch pushes back instead of filling the send queue), posted as one chain with one
//! doorbell and only the last request signaled. The NIC's poller completes the range when
//! that completion arrives (RC completes in order) and refills the queue pair.

use std::collections::VecDeque;
use std::ffi::c_int;
use std::io;
use std::ops::Range;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::mr::{LocalKeys, MrTable, RemoteKeys};
use super::nic::{path_mtu, PortAddress};
use super::worker::{NicWorker, Posted};
use crate::sys::verbs::bindings::*;
use crate::sys::verbs::post_send;
use crate::transport::{OpKind, Slice, SliceSource, TransportError, TransportKind};

/// Work requests a queue pair holds at most (bounded by the device's limit).
pub const MAX_SEND_WR: u32 = 512;
/// Bytes sent inline (copied into the work request) for small WRITEs.
pub const MAX_INLINE: u32 = 64;
/// Slices in one claimed range, at most (the batch's claim size); a range is claimed only
/// when the queue pair has room for this many more requests.
const MAX_RANGE: u32 = 32;

/// What the other side of a queue pair told us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteQp {
    /// Its QP number.
    pub qpn: u32,
    /// Its starting packet sequence number.
    pub psn: u32,
    /// Its port's address.
    pub address: PortAddress,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One RC queue pair.
pub struct Endpoint {
    worker: Arc<NicWorker>,
    /// Index of the local NIC (for local keys).
    nic: usize,
    /// Index of the peer's NIC (for its keys).
    remote_nic: usize,
    qp: NonNull<ibv_qp>,
    psn: u32,
    max_wr: u32,
    outstanding: AtomicU32,
    /// Slices posted since creation (the per-NIC counter).
    posted: AtomicU64,
    broken: AtomicBool,
    /// Batches with slices left to claim, oldest first. Locked while claiming and posting.
    waiting: Mutex<Waiting>,
    mrs: Arc<MrTable>,
    /// The peer's keys, replaced when it publishes new ones.
    keys: Mutex<Arc<RemoteKeys>>,
    /// The other queue pairs to the same peer (other NICs), for failover.
    siblings: std::sync::OnceLock<Vec<std::sync::Weak<Endpoint>>>,
}

#[derive(Default)]
struct Waiting {
    queue: VecDeque<Arc<dyn SliceSource>>,
    /// Ranges another queue pair of the same peer failed to move, to post again here.
    retry: VecDeque<(Arc<dyn SliceSource>, Range<usize>)>,
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
}

// SAFETY: the QP is a verbs object (thread-safe); its pointer is owned here and destroyed
// once in Drop. The scratch work requests hold raw pointers only while `waiting` is locked.
unsafe impl Send for Endpoint {}
// SAFETY: as above.
unsafe impl Sync for Endpoint {}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("nic", &self.worker.nic().name())
            .field("qpn", &self.qpn())
            .field("outstanding", &self.outstanding.load(Ordering::Relaxed))
            .field("broken", &self.broken.load(Ordering::Relaxed))
            .finish()
    }
}

impl Endpoint {
    /// Creates an RC QP on the worker's NIC (in INIT), to reach the peer's NIC number
    /// `remote_nic` with the peer's `keys`; `mrs` holds our keys (NIC number `nic`).
    pub fn create(
        worker: &Arc<NicWorker>,
        nic: usize,
        remote_nic: usize,
        mrs: Arc<MrTable>,
        keys: Arc<RemoteKeys>,
    ) -> Result<Endpoint, String> {
        Self::create_sized(worker, nic, remote_nic, mrs, keys, MAX_SEND_WR)
    }

    /// A queue pair that only answers the peer's requests (it posts nothing): the
    /// smallest send queue, so it takes little of the NIC's completion queue.
    pub fn create_responder(
        worker: &Arc<NicWorker>,
        nic: usize,
        mrs: Arc<MrTable>,
    ) -> Result<Endpoint, String> {
        Self::create_sized(worker, nic, 0, mrs, Arc::new(RemoteKeys::default()), 1)
    }

    fn create_sized(
        worker: &Arc<NicWorker>,
        nic: usize,
        remote_nic: usize,
        mrs: Arc<MrTable>,
        keys: Arc<RemoteKeys>,
        send_wr: u32,
    ) -> Result<Endpoint, String> {
        let n = worker.nic();
        let v = n.verbs();
        let max_wr = send_wr.min(n.max_qp_wr().max(1));
        // Room in the completion queue for every request (a queue pair in error flushes
        // each of them as a completion).
        if !n.reserve_cq(max_wr) {
            return Err(format!(
                "the completion queue of {} has no room for another queue pair",
                n.name()
            ));
        }
        let release = Release(worker, max_wr);
        let mut init = ibv_qp_init_attr {
            send_cq: n.cq(),
            recv_cq: n.cq(),
            cap: ibv_qp_cap {
                max_send_wr: max_wr,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: MAX_INLINE,
            },
            qp_type: ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: the PD and CQ are live (the worker holds the NIC); init is valid.
        let qp = NonNull::new(unsafe { v.create_qp(n.pd(), &mut init) }).ok_or_else(|| {
            format!(
                "ibv_create_qp on {}: {}",
                n.name(),
                io::Error::last_os_error()
            )
        })?;
        // From here the endpoint gives the reservation back when dropped.
        std::mem::forget(release);
        let ep = Endpoint {
            worker: Arc::clone(worker),
            nic,
            remote_nic,
            qp,
            psn: random_psn(),
            max_wr,
            outstanding: AtomicU32::new(0),
            posted: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            waiting: Mutex::new(Waiting::default()),
            mrs,
            keys: Mutex::new(keys),
            siblings: std::sync::OnceLock::new(),
        };
        let address = n.address();
        let mut attr = ibv_qp_attr {
            qp_state: ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: address.port,
            qp_access_flags: (ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
                .0,
            ..Default::default()
        };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        ep.modify(&mut attr, mask, "INIT")?;
        Ok(ep)
    }

    /// The NIC's name.
    pub fn worker_name(&self) -> &str {
        self.worker.nic().name()
    }

    /// Our QP number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is live until Drop; qp_num is a plain field.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    /// Our starting packet sequence number.
    pub fn psn(&self) -> u32 {
        self.psn
    }

    /// Uses `keys` for the peer's memory from now on (it published a new descriptor).
    pub fn set_keys(&self, keys: Arc<RemoteKeys>) {
        *lock(&self.keys) = keys;
    }

    /// Whether the peer published a key for every slice's remote range (on its NIC this
    /// endpoint reaches) and we hold one for every local range.
    pub fn reaches(&self, slices: &[Slice]) -> bool {
        let keys = Arc::clone(&lock(&self.keys));
        let local = self.mrs.local_keys(self.nic);
        slices.iter().all(|s| {
            let len = u64::from(s.len);
            keys.rkey(self.remote_nic, s.remote, len).is_some()
                && local.lkey(s.local, len).is_some()
        })
    }

    /// Slices posted on this queue pair so far.
    pub fn slices_posted(&self) -> u64 {
        self.posted.load(Ordering::Relaxed)
    }

    /// Whether the QP failed (it then fails everything posted to it).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    fn modify(
        &self,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
        state: &str,
    ) -> Result<(), String> {
        let v = self.worker.nic().verbs();
        // SAFETY: the QP is live; attr is a valid ibv_qp_attr for the call.
        let rc = unsafe { v.modify_qp(self.qp.as_ptr(), attr, mask.0 as c_int) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "moving QP {} on {} to {state}: {}",
                self.qpn(),
                self.worker.nic().name(),
                io::Error::from_raw_os_error(if rc > 0 { rc } else { libc::EIO })
            ))
        }
    }

    /// Moves the QP to RTR and RTS, connected to `remote`.
    pub fn connect(&self, remote: &RemoteQp) -> Result<(), String> {
        let local = self.worker.nic().address();
        let mut attr = ibv_qp_attr {
            qp_state: ibv_qp_state::IBV_QPS_RTR,
            path_mtu: path_mtu(local.mtu, remote.address.mtu),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: self.worker.nic().rd_atomic().1,
            min_rnr_timer: 12,
            ah_attr: ibv_ah_attr {
                dlid: remote.address.lid,
                is_global: 1,
                port_num: local.port,
                grh: ibv_global_route {
                    dgid: ibv_gid {
                        raw: remote.address.gid,
                    },
                    sgid_index: local.gid_index,
                    hop_limit: 64,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "RTR")?;
        let mut attr = ibv_qp_attr {
            qp_state: ibv_qp_state::IBV_QPS_RTS,
            timeout: 14,
            // 7, the most. (rxe reads 7 as "retry forever": a silent peer then holds a
            // batch until its deadline, when its queue pair is flushed.)
            retry_cnt: 7,
            rnr_retry: 7,
            sq_psn: self.psn,
            max_rd_atomic: self.worker.nic().rd_atomic().0,
            ..Default::default()
        };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "RTS")
    }

    /// The queue pairs to the same peer on other NICs (set once, by the transport).
    pub(super) fn set_siblings(&self, all: &[Arc<Endpoint>]) {
        let others = all
            .iter()
            .filter(|e| !std::ptr::eq(e.as_ref(), self))
            .map(Arc::downgrade)
            .collect();
        let _ = self.siblings.set(others);
    }

    /// A live queue pair to the same peer on another NIC, one on a NIC that is not
    /// paused first.
    pub(super) fn alternative(&self) -> Option<Arc<Endpoint>> {
        let live: Vec<Arc<Endpoint>> = self
            .siblings
            .get()?
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|e| !e.is_broken())
            .collect();
        let healthy = live.iter().position(|e| !e.worker.is_paused());
        let pick = healthy.unwrap_or(0);
        live.into_iter().nth(pick)
    }

    /// The memory registrations it posts with.
    pub fn mrs(&self) -> &Arc<MrTable> {
        &self.mrs
    }

    /// The NIC this queue pair is on.
    pub fn worker(&self) -> &Arc<NicWorker> {
        &self.worker
    }

    /// Posts `range` of `work` (claimed already, failed on another queue pair) again.
    pub(super) fn retry(self: &Arc<Self>, work: Arc<dyn SliceSource>, range: Range<usize>) {
        lock(&self.waiting).retry.push_back((work, range));
        self.pump();
    }

    /// Queues `work` and posts as much of it as the QP has room for; the NIC's poller
    /// posts the rest as completions free room.
    pub fn post(self: &Arc<Self>, work: Arc<dyn SliceSource>) {
        lock(&self.waiting).queue.push_back(work);
        self.pump();
    }

    /// Claims and posts ranges while the QP has room.
    pub(super) fn pump(self: &Arc<Self>) {
        let mut waiting = lock(&self.waiting);
        if self.is_broken() {
            // Hand what waits here to a live queue pair of the same peer, if any.
            if let Some(alt) = self.alternative() {
                let retry: Vec<_> = waiting.retry.drain(..).collect();
                let queue: Vec<_> = waiting.queue.drain(..).collect();
                drop(waiting);
                for (work, range) in retry {
                    alt.retry(work, range);
                }
                for work in queue {
                    alt.post(work);
                }
                return;
            }
        }
        while self.outstanding.load(Ordering::Acquire) + MAX_RANGE <= self.max_wr {
            if let Some((work, range)) = waiting.retry.pop_front() {
                if let Err(reason) = self.post_range(&mut waiting, &work, range.clone()) {
                    work.complete(range, Err(error(reason)));
                }
                continue;
            }
            let Some(work) = waiting.queue.front().cloned() else {
                return;
            };
            let Some(range) = work.claim() else {
                waiting.queue.pop_front();
                continue;
            };
            if let Err(reason) = self.post_range(&mut waiting, &work, range.clone()) {
                work.complete(range, Err(error(reason)));
            }
        }
    }

    /// Posts one claimed range as a chain; the last request is signaled.
    fn post_range(
        self: &Arc<Self>,
        scratch: &mut Waiting,
        work: &Arc<dyn SliceSource>,
        range: Range<usize>,
    ) -> Result<(), String> {
        if self.is_broken() {
            return Err(format!(
                "the queue pair on {} failed earlier",
                self.worker.nic().name()
            ));
        }
        let slices = &work.slices()[range.clone()];
        let count = slices.len();
        let wr_id = self.worker.track(Posted {
            work: Arc::clone(work),
            range,
            endpoint: Arc::clone(self),
            wrs: count as u32,
            posted_at: std::time::Instant::now(),
        });
        scratch.wrs.clear();
        scratch.sges.clear();
        let keys = Arc::clone(&lock(&self.keys));
        let local = self.mrs.local_keys(self.nic);
        for (i, s) in slices.iter().enumerate() {
            let (lkey, rkey) = match self.keys_of(s, &local, &keys) {
                Ok(k) => k,
                Err(e) => {
                    self.worker.untrack(wr_id);
                    return Err(e);
                }
            };
            scratch.sges.push(ibv_sge {
                addr: s.local,
                length: s.len,
                lkey,
            });
            let mut flags = 0;
            if i + 1 == count {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if s.kind == OpKind::Write && s.len <= MAX_INLINE {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
            let mut wr = ibv_send_wr {
                wr_id,
                num_sge: 1,
                opcode: match s.kind {
                    OpKind::Write => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                    OpKind::Read => ibv_wr_opcode::IBV_WR_RDMA_READ,
                },
                send_flags: flags,
                ..Default::default()
            };
            wr.wr.rdma = ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: s.remote,
                rkey,
            };
            scratch.wrs.push(wr);
        }
        drop(local);
        // Link the chain now that the vectors no longer move.
        let sges = scratch.sges.as_mut_ptr();
        let wrs = scratch.wrs.as_mut_ptr();
        for i in 0..count {
            // SAFETY: i < count = len of both vectors, which are not resized until the
            // next call (we hold the lock); the pointers stay valid through post_send.
            unsafe {
                let wr = &mut *wrs.add(i);
                wr.sg_list = sges.add(i);
                wr.next = if i + 1 < count {
                    wrs.add(i + 1)
                } else {
                    ptr::null_mut()
                };
            }
        }
        self.outstanding.fetch_add(count as u32, Ordering::AcqRel);
        self.posted.fetch_add(count as u64, Ordering::Relaxed);
        self.worker.count_posted(count as u64);
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live; the chain and its SGEs are valid for the call (the
        // provider copies them); local ranges are in our MRs (lkeys looked up above),
        // pinned by the batch until the range completes.
        let rc = unsafe { post_send(self.qp.as_ptr(), wrs, &mut bad) };
        if rc != 0 {
            self.broken.store(true, Ordering::Release);
            if bad == wrs {
                // Nothing of the chain was accepted.
                self.outstanding.fetch_sub(count as u32, Ordering::AcqRel);
                self.worker.untrack(wr_id);
                return Err(format!(
                    "ibv_post_send on {}: {}",
                    self.worker.nic().name(),
                    io::Error::from_raw_os_error(rc)
                ));
            }
            // Part of the chain was accepted, without its signaled last request: move the
            // QP to the error state so that everything on it completes (flushed), which
            // fails the range through the poller.
            let mut attr = ibv_qp_attr {
                qp_state: ibv_qp_state::IBV_QPS_ERR,
                ..Default::default()
            };
            let moved = self.modify(&mut attr, ibv_qp_attr_mask::IBV_QP_STATE, "ERR");
            // The accepted part is unsignaled: a signaled empty request with the same id,
            // flushed at once in the error state, is what completes the range.
            let mut drain = ibv_send_wr {
                wr_id,
                num_sge: 0,
                opcode: ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                send_flags: ibv_send_flags::IBV_SEND_SIGNALED.0,
                ..Default::default()
            };
            let mut bad: *mut ibv_send_wr = ptr::null_mut();
            // SAFETY: the QP is live; the request has no SGE and is valid for the call.
            let drained =
                moved.is_ok() && unsafe { post_send(self.qp.as_ptr(), &mut drain, &mut bad) } == 0;
            if !drained && self.worker.take(wr_id).is_some() {
                // Nothing will complete this range: fail it now.
                self.outstanding.fetch_sub(count as u32, Ordering::AcqRel);
                return Err(format!(
                    "ibv_post_send on {} accepted part of a chain and the queue pair could not be drained",
                    self.worker.nic().name()
                ));
            }
        }
        Ok(())
    }

    /// The local and remote keys of a slice.
    fn keys_of(
        &self,
        s: &Slice,
        local: &LocalKeys<'_>,
        keys: &RemoteKeys,
    ) -> Result<(u32, u32), String> {
        let len = u64::from(s.len);
        let lkey = local.lkey(s.local, len).ok_or_else(|| {
            format!(
                "local range {:#x}+{len} has no memory registration on {}",
                s.local,
                self.worker.nic().name()
            )
        })?;
        let rkey = keys.rkey(self.remote_nic, s.remote, len).ok_or_else(|| {
            format!(
                "the peer published no key for {:#x}+{len} on its NIC {}",
                s.remote, self.remote_nic
            )
        })?;
        Ok((lkey, rkey))
    }

    /// Moves the queue pair to the error state: everything posted on it completes as
    /// flushed, and it takes nothing more (the link reconnects).
    pub(super) fn abort(&self, why: &str) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        log::warn!(
            "kvxfer: aborting QP {} on {}: {why}",
            self.qpn(),
            self.worker.nic().name()
        );
        let mut attr = ibv_qp_attr {
            qp_state: ibv_qp_state::IBV_QPS_ERR,
            ..Default::default()
        };
        if let Err(e) = self.modify(&mut attr, ibv_qp_attr_mask::IBV_QP_STATE, "ERR") {
            log::error!("kvxfer: {e}");
        }
    }

    /// A posted chain of `wrs` requests completed (`Ok`) or failed.
    pub(super) fn completed(self: &Arc<Self>, wrs: u32, failed: bool) {
        self.outstanding.fetch_sub(wrs, Ordering::AcqRel);
        if failed {
            self.broken.store(true, Ordering::Release);
        }
        self.pump();
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let v = self.worker.nic().verbs();
        // SAFETY: the QP was created in `create` and is destroyed only here; every chain
        // posted to it holds the endpoint (Arc) until it completed, so none is in flight.
        if unsafe { v.destroy_qp(self.qp.as_ptr()) } != 0 {
            log::warn!(
                "kvxfer: ibv_destroy_qp on {} failed",
                self.worker.nic().name()
            );
        }
        self.worker.nic().release_cq(self.max_wr);
    }
}

/// Gives a completion-queue reservation back unless forgotten (the endpoint then owns it).
struct Release<'a>(&'a NicWorker, u32);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.nic().release_cq(self.1);
    }
}

fn error(reason: String) -> TransportError {
    TransportError {
        transport: TransportKind::Rdma,
        reason,
    }
}

/// A random 24-bit starting PSN.
fn random_psn() -> u32 {
    let nonce = crate::transport::shm::random_nonce();
    u32::from_le_bytes([nonce[0], nonce[1], nonce[2], 0])
}
