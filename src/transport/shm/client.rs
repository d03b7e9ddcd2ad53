//! The initiating side of the same-host transport: proves to the peer that both processes
//! share memory, then attaches the peer's regions (a pin-table slot each, plus a mapping of
//! the memfd for engine-allocated memory) and copies slices itself: through the mapping,
//! or with `process_vm_readv` / `process_vm_writev` for caller-owned memory.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::table::{PinTable, SLOT_BYTES};
use super::wire::{self, code, MapKind, Message, NONCE_LEN};
use crate::memory::Access;
use crate::sys::cma::{self, Piece};
use crate::sys::shm::PeerMapping;
use crate::sys::unix::{Received, SeqPacket};
use crate::transport::copy::Mover;
use crate::transport::{OpKind, Slice, TransportError, TransportKind};

/// A region of the peer, attached for this connection.
#[derive(Debug)]
pub struct Attached {
    /// Start in the peer's address space.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
    /// Rights the peer granted, as it saw them when attaching.
    pub access: Access,
    slot: u32,
    gen: u64,
    /// The peer's memfd mapped here (engine-allocated memory).
    map: Option<PeerMapping>,
    /// The peer's GPU memory mapped here through CUDA IPC: where the region starts in this
    /// process (copies go by the GPU).
    gpu: Option<GpuMapping>,
}

/// A peer's GPU allocation opened here (`cuIpcOpenMemHandle`), closed on drop.
#[derive(Debug)]
struct GpuMapping {
    mapping: crate::sys::cuda::IpcMapping,
    /// The region's first byte in this process.
    start: u64,
}

impl Attached {
    fn end(&self) -> u64 {
        self.addr + self.len
    }

    fn holds(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.end())
    }

    /// Whether a slice of `kind` can be moved by this process: through the mapping (which
    /// must be writable for a WRITE) or, without one, by cross-memory attach. In a batch
    /// that touches GPU memory (`gpu`) the GPU copies, which needs the peer's bytes mapped
    /// here: its GPU memory by CUDA IPC or its memfd (writable for a WRITE); cross-memory
    /// attach cannot read or write GPU memory.
    fn reachable(&self, kind: OpKind, cma: bool, gpu: bool) -> bool {
        if self.gpu.is_some() {
            return true;
        }
        match (&self.map, kind) {
            (Some(m), OpKind::Write) => m.is_writable() || (cma && !gpu),
            (Some(_), OpKind::Read) => true,
            (None, _) => cma && !gpu,
        }
    }
}

/// Tells whether the peer's engine is still there (its control connection is up).
pub type Alive = Arc<dyn Fn() -> bool + Send + Sync>;

/// A proven same-host connection to one peer.
pub struct ShmLink {
    session: String,
    sock: Mutex<SeqPacket>,
    table: PinTable,
    /// The peer's pid as our pid namespace sees it, when cross-memory attach works.
    pid: i32,
    cma: AtomicBool,
    attached: RwLock<BTreeMap<u64, Arc<Attached>>>,
    alive: Alive,
    next_req: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ShmLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmLink")
            .field("session", &self.session)
            .field("pid", &self.pid)
            .field("cma", &self.cma.load(Ordering::Relaxed))
            .field("attached", &self.attached_count())
            .finish()
    }
}

/// Why same-host memory is not used with a peer (one line for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotShared(pub String);

impl ShmLink {
    /// Connects to the peer's abstract socket `name` and proves that both sides share
    /// memory. On success also checks whether cross-memory attach to the peer works; the
    /// second value says why not when it does not.
    pub fn connect(
        session: &str,
        name: &str,
        target_engine: u64,
        own_engine: u64,
        timeout: Duration,
        alive: Alive,
    ) -> Result<(ShmLink, Option<String>), NotShared> {
        let deadline = Instant::now() + timeout;
        let fail = |what: String| NotShared(what);
        let sock = SeqPacket::connect_abstract(name.as_bytes(), timeout).map_err(|e| {
            fail(format!(
                "cannot reach its socket @{name} ({e}): it runs in another network namespace (a container) or on another host"
            ))
        })?;
        let cred = sock
            .peer_cred()
            .map_err(|e| fail(format!("cannot read the socket's peer credentials: {e}")))?;
        let client_nonce = super::random_nonce();
        let hello = Message::Hello {
            target_engine,
            client_engine: own_engine,
            client_nonce,
        };
        sock.send(&hello.encode(1), &[])
            .map_err(|e| fail(format!("cannot send Hello: {e}")))?;
        let (reply, fds) = round_trip_reply(&sock, 1, deadline).map_err(fail)?;
        let Message::HelloReply {
            engine_id,
            proof_addr,
            proof_len,
            table_slots,
            ..
        } = reply
        else {
            return Err(fail(format!("answered Hello with {}", describe(&reply))));
        };
        if engine_id != target_engine {
            return Err(fail(format!(
                "its socket belongs to engine {engine_id:016x}, not {target_engine:016x}"
            )));
        }
        let mut fds = fds.into_iter();
        let (Some(proof_fd), Some(table_fd)) = (fds.next(), fds.next()) else {
            return Err(fail("its HelloReply carried no shared pages".into()));
        };
        let proof = PeerMapping::map(proof_fd, 0, proof_len as usize, true)
            .map_err(|e| fail(format!("cannot map its proof page: {e}")))?;
        let mut server_nonce = [0u8; NONCE_LEN];
        // SAFETY: the mapping is at least MIN_PROOF_LEN (32) bytes (the decoder enforces
        // it) and writable; the peer only wrote the first 16 bytes before replying and
        // reads the next 16 after our Confirm, so nobody writes these bytes concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping(proof.as_ptr(), server_nonce.as_mut_ptr(), NONCE_LEN);
            std::ptr::copy_nonoverlapping(
                client_nonce.as_ptr(),
                proof.as_ptr().add(NONCE_LEN),
                NONCE_LEN,
            );
        }
        let confirm = Message::Confirm { server_nonce };
        sock.send(&confirm.encode(2), &[])
            .map_err(|e| fail(format!("cannot send Confirm: {e}")))?;
        match round_trip_reply(&sock, 2, deadline).map_err(fail)?.0 {
            Message::Proven => {}
            other => {
                return Err(fail(format!(
                    "did not accept the proof: {}",
                    describe(&other)
                )))
            }
        }
        drop(proof);
        let table_len = table_slots as usize * SLOT_BYTES;
        let table_map = PeerMapping::map(table_fd, 0, table_len, true)
            .map_err(|e| fail(format!("cannot map its pin table: {e}")))?;
        let base = table_map.as_ptr();
        // SAFETY: `base` starts a shared, writable mapping of `table_len` bytes that the
        // table keeps alive (it owns `table_map`); the peer sealed the memfd against
        // shrinking (checked by PeerMapping::map), so the pages stay valid; both sides
        // access it only through the table's atomics.
        let table = unsafe { PinTable::new(base, table_len, table_slots, Box::new(table_map)) }
            .ok_or_else(|| fail("its pin table is misaligned".into()))?;
        let cma_note = probe_cma(cred.pid, proof_addr, &server_nonce);
        let link = ShmLink {
            session: session.to_string(),
            sock: Mutex::new(sock),
            table,
            pid: cred.pid,
            cma: AtomicBool::new(cma_note.is_none()),
            attached: RwLock::new(BTreeMap::new()),
            alive,
            next_req: std::sync::atomic::AtomicU64::new(3),
        };
        Ok((link, cma_note))
    }

    /// Whether cross-memory attach to the peer works (else only its engine-allocated
    /// memory is reachable).
    pub fn cma(&self) -> bool {
        self.cma.load(Ordering::Acquire)
    }

    /// Regions attached now.
    pub fn attached_count(&self) -> usize {
        self.attached
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The attached region holding `[addr, addr + len)`.
    fn find(&self, addr: u64, len: u64) -> Option<Arc<Attached>> {
        let attached = self.attached.read().unwrap_or_else(PoisonError::into_inner);
        attached
            .range(..=addr)
            .next_back()
            .map(|(_, a)| a)
            .filter(|a| a.holds(addr, len))
            .cloned()
    }

    fn forget(&self, a: &Attached) {
        let mut attached = self
            .attached
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if attached
            .get(&a.addr)
            .is_some_and(|x| x.gen == a.gen && x.slot == a.slot)
        {
            attached.remove(&a.addr);
        }
    }

    /// Attaches the peer's region starting at `region_start` (asks the peer once; later
    /// calls hit the cache).
    pub fn attach(&self, region_start: u64, deadline: Instant) -> Result<Arc<Attached>, String> {
        let sock = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(a) = self
            .find(region_start, 1)
            .filter(|a| a.addr == region_start)
        {
            return Ok(a);
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        sock.send(&Message::Attach { addr: region_start }.encode(req), &[])
            .map_err(|e| format!("cannot ask to attach {region_start:#x}: {e}"))?;
        let (reply, fds) = round_trip_reply(&sock, req, deadline)?;
        drop(sock);
        let reply = match reply {
            Message::AttachedCuda(att) => return self.attach_gpu(region_start, &att),
            other => other,
        };
        let Message::Attached(att) = reply else {
            return Err(format!(
                "refused to attach {region_start:#x}: {}",
                describe(&reply)
            ));
        };
        if att.addr != region_start {
            return Err(format!(
                "attached {:#x} when asked for {region_start:#x}",
                att.addr
            ));
        }
        let access = Access::from_bits_truncate(att.access);
        let map = match (att.map, fds.into_iter().next()) {
            (MapKind::None, _) | (_, None) => None,
            (MapKind::ReadOnly { offset, .. }, Some(fd)) => self.map(fd, offset, att.len, false),
            (MapKind::ReadWrite { offset, .. }, Some(fd)) => self.map(fd, offset, att.len, true),
        };
        let attached = Arc::new(Attached {
            addr: att.addr,
            len: att.len,
            access,
            slot: att.slot,
            gen: att.gen,
            map,
            gpu: None,
        });
        self.keep(attached)
    }

    /// Opens a peer's GPU region (its CUDA IPC handle) on the GPU with the same PCI bus id.
    fn attach_gpu(
        &self,
        region_start: u64,
        att: &crate::transport::shm::wire::CudaAttachment,
    ) -> Result<Arc<Attached>, String> {
        if att.addr != region_start {
            return Err(format!(
                "attached {:#x} when asked for {region_start:#x}",
                att.addr
            ));
        }
        let cuda = crate::sys::cuda::driver()
            .map_err(|e| format!("the peer's region is GPU memory, but here: {e}"))?;
        let pci = att.pci_bus_id();
        let device = (0..cuda.device_count())
            .find(|&d| cuda.pci_bus_id(d).is_ok_and(|p| p == pci))
            .ok_or_else(|| format!("the peer's GPU {pci} is not visible to this process"))?;
        let mapping = crate::sys::cuda::ipc_open(device, &crate::sys::cuda::IpcHandle(att.handle))
            .map_err(|e| format!("cannot open the peer's GPU memory: {e}"))?;
        let start = mapping
            .addr()
            .checked_add(att.offset)
            .filter(|s| {
                s.checked_add(att.len)
                    .is_some_and(|end| end <= mapping.addr() + mapping.len())
            })
            .ok_or_else(|| {
                "the peer's GPU region lies outside the allocation it named".to_string()
            })?;
        self.keep(Arc::new(Attached {
            addr: att.addr,
            len: att.len,
            access: Access::from_bits_truncate(att.access),
            slot: att.slot,
            gen: att.gen,
            map: None,
            gpu: Some(GpuMapping { mapping, start }),
        }))
    }

    /// Records a new attachment (a live one already recorded for its address wins).
    fn keep(&self, attached: Arc<Attached>) -> Result<Arc<Attached>, String> {
        let att = &*attached;
        let mut all = self
            .attached
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // Two attaches of one address can cross (another thread's may already have put the
        // region registered since in place): a live entry is not replaced.
        match all.get(&att.addr) {
            Some(newer) if self.table.is_live(newer.slot, newer.gen) => Ok(Arc::clone(newer)),
            _ => {
                all.insert(att.addr, Arc::clone(&attached));
                Ok(attached)
            }
        }
    }

    fn map(
        &self,
        fd: std::os::fd::OwnedFd,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Option<PeerMapping> {
        match usize::try_from(len)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
            .and_then(|len| PeerMapping::map(fd, offset, len, writable))
        {
            Ok(m) => Some(m),
            Err(e) => {
                log::debug!(
                    "kvxfer: cannot map a region of peer {} ({e}); using cross-memory attach for it",
                    self.session
                );
                None
            }
        }
    }

    /// Checks that every slice can be moved through shared memory, attaching the regions
    /// it needs (all by `deadline`); `region_start` gives the start of the peer's region
    /// holding an address (from its published descriptor). `Err` says why not (the batch
    /// goes another way).
    pub fn reach(
        &self,
        slices: &[Slice],
        region_start: impl Fn(u64) -> Option<u64>,
        gpu: bool,
        deadline: Instant,
    ) -> Result<(), String> {
        let cma = self.cma();
        let mut last: Option<Arc<Attached>> = None;
        for s in slices {
            let len = u64::from(s.len);
            if last.as_ref().is_some_and(|a| {
                a.holds(s.remote, len)
                    && a.reachable(s.kind, cma, gpu)
                    && a.access.contains(need(s.kind))
            }) {
                continue;
            }
            let cached = self.find(s.remote, len).filter(|a| {
                // A region the peer unregistered (and maybe registered again since) is
                // attached afresh rather than failing the batch later.
                let live = self.table.is_live(a.slot, a.gen);
                if !live {
                    self.forget(a);
                }
                live
            });
            let a = match cached {
                Some(a) => a,
                None => {
                    let start = region_start(s.remote).ok_or_else(|| {
                        format!("{:#x} is in no region the peer published", s.remote)
                    })?;
                    self.attach(start, deadline)?
                }
            };
            if !a.holds(s.remote, len) {
                return Err(format!(
                    "the peer's region at {:#x} is {} bytes now, too short for {:#x}+{len}",
                    a.addr, a.len, s.remote
                ));
            }
            let need = match s.kind {
                OpKind::Write => Access::REMOTE_WRITE,
                OpKind::Read => Access::REMOTE_READ,
            };
            if !a.access.contains(need) {
                return Err(format!(
                    "the peer's region at {:#x} does not grant {need}",
                    a.addr
                ));
            }
            if !a.reachable(s.kind, cma, gpu) {
                return Err(if gpu {
                    format!(
                        "the batch touches GPU memory and the peer's region at {:#x} is not mapped here (the GPU copies only between mapped memory)",
                        a.addr
                    )
                } else {
                    format!(
                        "the peer's region at {:#x} is its own memory, reachable only by cross-memory attach, which is not available",
                        a.addr
                    )
                });
            }
            last = Some(a);
        }
        Ok(())
    }

    fn error(&self, reason: String) -> TransportError {
        TransportError {
            transport: TransportKind::Shm,
            reason,
        }
    }

    /// Drops the attachments of regions the peer has unregistered (their mappings with
    /// them, so the peer's freed memory goes back to the kernel).
    pub fn sweep(&self) {
        let mut attached = self
            .attached
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        attached.retain(|_, a| self.table.is_live(a.slot, a.gen));
    }

    /// Moves consecutive slices that lie in one attached region, with it pinned.
    fn move_in(&self, a: &Attached, slices: &[Slice], gpu: bool) -> Result<(), TransportError> {
        // The rights are checked again here, against what the peer granted when this
        // attachment was made: the region may have been registered again, with fewer
        // rights, since the batch was routed.
        if let Some(s) = slices.iter().find(|s| !a.access.contains(need(s.kind))) {
            return Err(self.error(format!(
                "the peer's region at {:#x} does not grant {} (it was registered again)",
                a.addr,
                need(s.kind)
            )));
        }
        if !self.table.pin(a.slot, a.gen) {
            self.forget(a);
            return Err(self.error(format!(
                "peer {} unregistered its region at {:#x} during the transfer",
                self.session, a.addr
            )));
        }
        if let Some(moved) = self.gpu_move(a, slices, gpu) {
            self.table.unpin(a.slot);
            return moved;
        }
        // A read-only mapping serves READs; WRITEs into it go by cross-memory attach.
        let via_map = a
            .map
            .as_ref()
            .filter(|m| m.is_writable() || slices.iter().all(|s| s.kind == OpKind::Read));
        let moved = match via_map {
            Some(m) => {
                for s in slices {
                    let remote = m.as_ptr().wrapping_add((s.remote - a.addr) as usize);
                    let local = s.local as *mut u8;
                    let len = s.len as usize;
                    // SAFETY: `reach` checked the slice lies inside the attached region,
                    // which is mapped here for its whole length (writable when this is a
                    // WRITE, checked above; the peer sealed the file so it cannot shrink).
                    // The pin keeps the peer from giving the region back to its caller
                    // while we copy. The local range was checked against our registry and
                    // is pinned by the batch. The two are different mappings.
                    unsafe {
                        match s.kind {
                            OpKind::Write => std::ptr::copy_nonoverlapping(local, remote, len),
                            OpKind::Read => std::ptr::copy_nonoverlapping(remote, local, len),
                        }
                    }
                }
                Ok(())
            }
            None => self.cma_move(a, slices),
        };
        self.table.unpin(a.slot);
        moved
    }

    /// Moves the slices with the GPU (`cuMemcpy`, unified addressing) when the peer's region
    /// is mapped here by CUDA IPC or the batch touches GPU memory (`gpu`; the peer's region
    /// is then mapped here as its memfd, which `reach` checked). `None`: the CPU copies.
    /// The region is pinned by the caller.
    fn gpu_move(
        &self,
        a: &Attached,
        slices: &[Slice],
        gpu: bool,
    ) -> Option<Result<(), TransportError>> {
        // The engine's region labels say whether the batch touches GPU memory: then the GPU
        // copies every slice (unified addressing also takes host ends), the CPU none.
        let remote_base = match (&a.gpu, &a.map) {
            (Some(g), _) => g.start,
            (None, _) if !gpu => return None,
            (None, Some(m)) => m.as_ptr() as u64,
            (None, None) => {
                return Some(Err(self.error(format!(
                    "GPU memory cannot be copied to or from the peer's region at {:#x} by cross-memory attach",
                    a.addr
                ))))
            }
        };
        // The copies run on a stream of the GPU holding the peer's region (else our end's):
        // queued one after another, waited for once, never on the legacy default stream
        // (which would serialise them with everything else this process runs on the GPU).
        let cuda = crate::sys::cuda::driver_in_use();
        let local_device = cuda
            .zip(slices.first())
            .and_then(|(c, s)| c.device_memory(s.local))
            .map(|m| m.device);
        let device = match (&a.gpu, local_device) {
            (Some(g), local) => {
                let mapped = g.mapping.device();
                // Two GPUs: copies between them go peer to peer (NVLink or PCIe) once
                // both contexts may access the other's memory; else through the host.
                if let (Some(cuda), Some(local)) = (cuda, local.filter(|&l| l != mapped)) {
                    for (from, to) in [(mapped, local), (local, mapped)] {
                        if let Err(e) = cuda.enable_peer_access(from, to) {
                            log::debug!("kvxfer: peer access cuda:{from} -> cuda:{to}: {e}");
                        }
                    }
                }
                mapped
            }
            (None, local) => local.unwrap_or(0),
        };
        let result = with_stream(device, |stream| {
            self.queue_gpu_copies(a, remote_base, slices, stream)
        });
        Some(result.unwrap_or_else(|e| {
            Err(self.error(format!("GPU copies with peer {}: {e}", self.session)))
        }))
    }

    /// Queues one copy per run of slices contiguous on both sides in one direction (a copy
    /// call costs microseconds; a GPU moves a 64 KiB slice in less), then waits for them.
    fn queue_gpu_copies(
        &self,
        a: &Attached,
        remote_base: u64,
        slices: &[Slice],
        stream: &crate::sys::cuda::Stream,
    ) -> Result<(), TransportError> {
        let mut queued = Ok(());
        let mut i = 0;
        while i < slices.len() {
            let first = &slices[i];
            let mut len = u64::from(first.len);
            let mut j = i + 1;
            while j < slices.len()
                && slices[j].kind == first.kind
                && slices[j].local == first.local + len
                && slices[j].remote == first.remote + len
            {
                len += u64::from(slices[j].len);
                j += 1;
            }
            let remote = remote_base + (first.remote - a.addr);
            let (dst, src) = match first.kind {
                OpKind::Write => (remote, first.local),
                OpKind::Read => (first.local, remote),
            };
            // SAFETY: the remote range lies in the attached region (checked by `reach`),
            // mapped here for its whole length and pinned by the caller; the local range
            // was checked against our registry (GPU memory: still allocated, at submit)
            // and is pinned by the batch. The stream is waited for below, before this
            // returns and the slices complete.
            if let Err(e) = unsafe { stream.copy_async(dst, src, len as usize) } {
                queued = Err(self.error(format!(
                    "GPU copy {} region {:#x} of peer {}: {e}",
                    first.kind, a.addr, self.session
                )));
                break;
            }
            i = j;
        }
        // Whatever was queued must be done before the slices complete.
        let waited = stream.synchronize().map_err(|e| {
            self.error(format!(
                "GPU copies with region {:#x} of peer {}: {e}",
                a.addr, self.session
            ))
        });
        queued.and(waited)
    }

    /// Moves slices by cross-memory attach (the region is pinned by the caller).
    fn cma_move(&self, a: &Attached, slices: &[Slice]) -> Result<(), TransportError> {
        let mut start = 0;
        while start < slices.len() {
            let kind = slices[start].kind;
            let end = slices[start..]
                .iter()
                .position(|s| s.kind != kind)
                .map_or(slices.len(), |n| start + n);
            let pieces: Vec<Piece> = slices[start..end]
                .iter()
                .map(|s| Piece {
                    local: s.local,
                    remote: s.remote,
                    len: s.len as usize,
                })
                .collect();
            // SAFETY: every local range was checked against our registry (with the right
            // this direction needs) and is pinned by the batch until it completes; the
            // remote ranges lie in the attached region, pinned by our caller.
            let done = unsafe {
                match kind {
                    OpKind::Write => cma::write_to(self.pid, &pieces),
                    OpKind::Read => cma::read_from(self.pid, &pieces),
                }
            };
            if let Err(e) = done {
                if e.raw_os_error() == Some(libc::EPERM) && self.cma.swap(false, Ordering::AcqRel) {
                    log::warn!(
                        "kvxfer: cross-memory attach to peer {} (pid {}) is no longer permitted ({e}); its own memory is reached over the next transport from now on",
                        self.session,
                        self.pid
                    );
                }
                return Err(self.error(format!(
                    "cross-memory {} of region {:#x} of peer {} (pid {}) failed: {e}",
                    kind, a.addr, self.session, self.pid
                )));
            }
            start = end;
        }
        Ok(())
    }
}

/// The right a slice of `kind` needs on the peer's side.
fn need(kind: OpKind) -> Access {
    match kind {
        OpKind::Write => Access::REMOTE_WRITE,
        OpKind::Read => Access::REMOTE_READ,
    }
}

impl Mover for ShmLink {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn move_slices(&self, slices: &[Slice], gpu: bool) -> Result<(), TransportError> {
        if !(self.alive)() {
            return Err(self.error(format!("peer {} is gone", self.session)));
        }
        let mut start = 0;
        while start < slices.len() {
            let first = &slices[start];
            let a = self
                .find(first.remote, u64::from(first.len))
                .ok_or_else(|| {
                    self.error(format!(
                        "region {:#x} of peer {} is no longer attached (it was unregistered)",
                        first.remote, self.session
                    ))
                })?;
            let end = slices[start..]
                .iter()
                .position(|s| !a.holds(s.remote, u64::from(s.len)))
                .map_or(slices.len(), |n| start + n);
            self.move_in(&a, &slices[start..end], gpu)?;
            start = end;
        }
        Ok(())
    }
}

/// Whether process_vm_readv of the proof page gives the nonce back: `None` when it does
/// (cross-memory attach works), else why not.
fn probe_cma(pid: i32, proof_addr: u64, nonce: &[u8; NONCE_LEN]) -> Option<String> {
    if pid <= 0 {
        return Some("the peer's pid is not visible here (another pid namespace)".into());
    }
    let mut seen = [0u8; NONCE_LEN];
    let piece = Piece {
        local: seen.as_mut_ptr() as u64,
        remote: proof_addr,
        len: NONCE_LEN,
    };
    // SAFETY: `seen` is a local array valid for NONCE_LEN bytes of writes, not otherwise
    // referenced during the call.
    match unsafe { cma::read_from(pid, &[piece]) } {
        Ok(()) if &seen == nonce => None,
        Ok(()) => Some(format!(
            "pid {pid} is not the peer's process here (another pid namespace)"
        )),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Some(format!(
            "the kernel does not permit it ({e}): another user, or kernel.yama.ptrace_scope ≥ 1 and the peer is not our descendant, or the peer is not dumpable"
        )),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            Some("the kernel has no process_vm_readv (CONFIG_CROSS_MEMORY_ATTACH)".into())
        }
        Err(e) => Some(format!("process_vm_readv of pid {pid} failed: {e}")),
    }
}

/// Waits for the reply to request `req`; Refused becomes the error text. Replies to
/// earlier requests (that timed out here) are skipped, with their file descriptors closed.
fn round_trip_reply(
    sock: &SeqPacket,
    req: u64,
    deadline: Instant,
) -> Result<(Message, Vec<std::os::fd::OwnedFd>), String> {
    let mut buf = [0u8; wire::MAX_MESSAGE];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Received {
            len,
            fds,
            truncated,
            fds_truncated,
        } = sock
            .recv(&mut buf, Some(left))
            .map_err(|e| format!("no reply ({e})"))?;
        if len == 0 && fds.is_empty() {
            return Err("the peer closed the connection".into());
        }
        if truncated || fds_truncated {
            return Err("a reply was too long".into());
        }
        let (got_req, msg) = wire::decode(&buf[..len]).map_err(|e| format!("bad reply: {e}"))?;
        if got_req < req && got_req != 0 {
            continue;
        }
        if let Message::Refused { code: c, reason } = &msg {
            return Err(format!("refused ({}): {reason}", code::name(*c)));
        }
        if got_req != req {
            return Err(format!("a reply to request {got_req}, expected {req}"));
        }
        if fds.len() != msg.fds() {
            return Err(format!(
                "{} carried {} file descriptors, expected {}",
                msg.kind_name(),
                fds.len(),
                msg.fds()
            ));
        }
        return Ok((msg, fds));
    }
}

fn describe(msg: &Message) -> String {
    match msg {
        Message::Refused { code: c, reason } => format!("refused ({}): {reason}", code::name(*c)),
        other => format!("unexpected {}", other.kind_name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Buffer, Location, MemoryError, RegionSpec, Registry};
    use crate::transport::shm::ShmServer;
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;

    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// A server over `registry` (asked before unregistering, as the engine wires it) and a
    /// proven link to it, in this process.
    fn served(registry: &Arc<Registry>) -> (Arc<ShmServer>, ShmLink) {
        let engine_id = 0x5eed_0000 + NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("kvxfer-test.{}.{engine_id:x}", std::process::id());
        let server = Arc::new(ShmServer::start(&name, engine_id, Arc::clone(registry)).unwrap());
        registry.set_revoker(Some(server.revoker()));
        let (link, cma) = ShmLink::connect(
            "test-peer",
            &name,
            engine_id,
            1,
            Duration::from_secs(5),
            Arc::new(|| true),
        )
        .unwrap();
        assert_eq!(cma, None, "cross-memory attach to ourselves works");
        (server, link)
    }

    fn write(remote: u64, local: &[u8]) -> Slice {
        Slice {
            kind: OpKind::Write,
            op: 0,
            len: local.len() as u32,
            local: local.as_ptr() as u64,
            remote,
        }
    }

    /// Registers caller memory at `addr` (the test keeps it alive).
    fn register_caller(registry: &Registry, addr: u64, len: u64, access: Access) {
        registry
            .register(vec![RegionSpec::caller(
                addr,
                len,
                Some(Location::Any),
                access,
            )])
            .unwrap();
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// Caller memory: unregister is refused while a copy is counted, and once it went
    /// through, the peer's next copy fails instead of writing into it.
    #[test]
    fn unregister_waits_for_copies_and_then_stops_them() {
        let registry = Arc::new(Registry::new());
        let (_server, link) = served(&registry);
        let target = vec![0u8; 8192];
        let addr = target.as_ptr() as u64;
        register_caller(&registry, addr, 8192, Access::ALL);
        let a = link.attach(addr, far()).unwrap();
        assert!(
            a.map.is_none(),
            "caller memory is reached by cross-memory attach"
        );
        let src = vec![7u8; 4096];
        link.move_slices(&[write(addr, &src)], false).unwrap();
        assert_eq!(target[..4096], src[..]);

        assert!(link.table.pin(a.slot, a.gen));
        assert!(matches!(
            registry.unregister(addr),
            Err(MemoryError::PeerBusy { copies: 1, .. })
        ));
        link.table.unpin(a.slot);
        registry.unregister(addr).unwrap();
        let err = link
            .move_slices(&[write(addr, &[9u8; 16])], false)
            .unwrap_err();
        assert!(err.reason.contains("unregistered"), "{err}");
        assert_eq!(target[..4096], src[..], "written after unregister");
    }

    /// Shutting the server down takes every region away from its peers.
    #[test]
    fn shutdown_revokes_every_region() {
        let registry = Arc::new(Registry::new());
        let (server, link) = served(&registry);
        let target = vec![0u8; 4096];
        let addr = target.as_ptr() as u64;
        register_caller(&registry, addr, 4096, Access::ALL);
        link.attach(addr, far()).unwrap();
        server.shutdown();
        registry.set_revoker(None);
        registry.unregister(addr).unwrap();
        assert!(link.move_slices(&[write(addr, &[1u8; 64])], false).is_err());
        assert!(target.iter().all(|&b| b == 0), "written after shutdown");
    }

    /// A buffer dropped while a peer counts a copy into it (its pages reached by
    /// cross-memory attach, as read-only regions are) is unmapped only after the copy.
    #[test]
    fn dropping_a_buffer_waits_for_copies_in_flight() {
        let registry = Arc::new(Registry::new());
        let (_server, link) = served(&registry);
        let access = Access::LOCAL_READ | Access::LOCAL_WRITE | Access::REMOTE_READ;
        let buffer = Buffer::allocate(&registry, 4096, Location::Any, access).unwrap();
        let a = link.attach(buffer.addr(), far()).unwrap();
        assert!(
            a.map.is_none(),
            "a read-only region is not shared as a file"
        );
        assert!(link.table.pin(a.slot, a.gen));
        let (tx, rx) = mpsc::channel();
        let dropper = std::thread::spawn(move || {
            drop(buffer);
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the buffer went while a copy was counted"
        );
        link.table.unpin(a.slot);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the drop finishes once the copy is done");
        dropper.join().unwrap();
        assert!(!link.table.is_live(a.slot, a.gen));
    }

    /// A region registered again with fewer rights is not written through an older route.
    #[test]
    fn rights_are_checked_again_at_copy_time() {
        let registry = Arc::new(Registry::new());
        let (_server, link) = served(&registry);
        let target = vec![0u8; 4096];
        let addr = target.as_ptr() as u64;
        register_caller(&registry, addr, 4096, Access::ALL);
        let w = write(addr, &[5u8; 64]);
        link.reach(&[w], |_| Some(addr), false, far()).unwrap();
        registry.unregister(addr).unwrap();
        let read_only = Access::LOCAL_READ | Access::REMOTE_READ;
        register_caller(&registry, addr, 4096, read_only);
        // Another batch attaches the region as it is now.
        let r = Slice {
            kind: OpKind::Read,
            ..w
        };
        link.reach(&[r], |_| Some(addr), false, far()).unwrap();
        let err = link.move_slices(&[w], false).unwrap_err();
        assert!(err.reason.contains("does not grant"), "{err}");
        assert!(target.iter().all(|&b| b == 0));
    }
}

thread_local! {
    /// This copy thread's stream per GPU: threads copying slices of one batch at once each
    /// wait only for their own copies.
    static STREAMS: std::cell::RefCell<std::collections::HashMap<u32, crate::sys::cuda::Stream>> =
        std::cell::RefCell::default();
}

/// Runs `f` with this thread's stream on `device` (created on first use).
fn with_stream<R>(
    device: u32,
    f: impl FnOnce(&crate::sys::cuda::Stream) -> R,
) -> Result<R, crate::sys::cuda::CudaError> {
    STREAMS.with(|streams| {
        let mut streams = streams.borrow_mut();
        let stream = match streams.entry(device) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(crate::sys::cuda::Stream::new(device)?)
            }
        };
        Ok(f(stream))
    })
}
