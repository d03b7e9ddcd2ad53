//! Memory registrations: every registered region gets an MR on every NIC (split where it
//! is larger than the NIC's `max_mr_size`), looked up by address for the local side of a
//! slice, and listed (address, length, NIC, rkey) for peers.
//!
//! GPU memory (GPUDirect RDMA) is exported by the CUDA driver as a dma-buf and registered
//! with `ibv_reg_dmabuf_mr`; where that is refused (old driver, kernel or rdma-core, or a
//! NIC driver without dma-buf support) plain `ibv_reg_mr` is tried, which works when the
//! `nvidia-peermem` module is loaded. A failure names both reasons.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, PoisonError, RwLock};

use super::nic::Nic;
use crate::memory::{Access, Location, Region};
use crate::sys::verbs::bindings::{ibv_access_flags, ibv_mr};

/// One memory registration.
struct Mr {
    ptr: NonNull<ibv_mr>,
    addr: u64,
    len: u64,
    lkey: u32,
    rkey: u32,
}

/// A region's registrations, per NIC.
struct RegionMrs {
    per_nic: Vec<Vec<Mr>>,
    /// End of the region (exclusive) and where its memory is, for the NIC choice.
    end: u64,
    location: Location,
}

/// A region's key on one NIC, as peers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// First byte covered.
    pub addr: u64,
    /// Bytes covered.
    pub len: u64,
    /// Index of the NIC.
    pub nic: u16,
    /// The remote key.
    pub rkey: u32,
}

/// Every region's registrations on every NIC.
pub struct MrTable {
    nics: Vec<Arc<Nic>>,
    regions: RwLock<BTreeMap<u64, RegionMrs>>,
}

// SAFETY: MRs are verbs objects, usable from any thread; the pointers are owned here and
// deregistered once (in `remove` or Drop), under the write lock.
unsafe impl Send for MrTable {}
// SAFETY: as above; shared use only reads keys.
unsafe impl Sync for MrTable {}

impl MrTable {
    /// An empty table over `nics`.
    pub fn new(nics: Vec<Arc<Nic>>) -> MrTable {
        MrTable {
            nics,
            regions: RwLock::new(BTreeMap::new()),
        }
    }

    /// Registers `region` on every NIC (all or nothing).
    pub fn add(&self, region: &Region) -> Result<(), String> {
        let range = region.range();
        let access = verbs_access(region.access());
        let dmabuf = matches!(region.location(), Location::Cuda(_)).then(|| export_dmabuf(range));
        let mut per_nic = Vec::with_capacity(self.nics.len());
        for nic in &self.nics {
            let mut mrs = Vec::new();
            let piece = nic.max_mr_size().max(4096);
            let mut at = range.start;
            while at < range.end() {
                let len = (range.end() - at).min(piece);
                let registered = match &dmabuf {
                    Some(exported) => register_gpu(nic, exported, at, len, access.0),
                    None => register_host(nic, at, len, access.0),
                };
                let mr = match registered {
                    Ok(mr) => mr,
                    Err(why) => {
                        per_nic.push(mrs);
                        release(&self.nics, per_nic);
                        return Err(why);
                    }
                };
                // SAFETY: just registered; keys are plain fields.
                let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
                mrs.push(Mr {
                    ptr: mr,
                    addr: at,
                    len,
                    lkey,
                    rkey,
                });
                at += len;
            }
            per_nic.push(mrs);
        }
        let old = self
            .regions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                range.start,
                RegionMrs {
                    per_nic,
                    end: range.end(),
                    location: region.location(),
                },
            );
        if let Some(old) = old {
            release(&self.nics, old.per_nic);
        }
        Ok(())
    }

    /// Deregisters the region starting at `addr` on every NIC: after this returns no NIC
    /// touches it any more (an RDMA access by a peer fails).
    pub fn remove(&self, addr: u64) {
        let old = self
            .regions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&addr);
        if let Some(old) = old {
            release(&self.nics, old.per_nic);
        }
    }

    /// Deregisters everything.
    pub fn clear(&self) {
        let regions =
            std::mem::take(&mut *self.regions.write().unwrap_or_else(PoisonError::into_inner));
        for r in regions.into_values() {
            release(&self.nics, r.per_nic);
        }
    }

    /// Whether the region starting at `addr` is registered.
    pub fn contains(&self, addr: u64) -> bool {
        self.regions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&addr)
    }

    /// The local keys of NIC `nic`, under one read lock for a whole range of slices.
    pub fn local_keys(&self, nic: usize) -> LocalKeys<'_> {
        LocalKeys {
            regions: self.regions.read().unwrap_or_else(PoisonError::into_inner),
            nic,
        }
    }

    /// Where the registered memory holding `addr` is (`None`: not registered here).
    pub fn location_of(&self, addr: u64) -> Option<Location> {
        let regions = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        let (_, r) = regions.range(..=addr).next_back()?;
        (addr < r.end).then_some(r.location)
    }

    /// Every key, for peers.
    pub fn keys(&self) -> Vec<Key> {
        let regions = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for r in regions.values() {
            for (nic, mrs) in r.per_nic.iter().enumerate() {
                out.extend(mrs.iter().map(|m| Key {
                    addr: m.addr,
                    len: m.len,
                    nic: nic as u16,
                    rkey: m.rkey,
                }));
            }
        }
        out
    }
}

impl Drop for MrTable {
    fn drop(&mut self) {
        let regions =
            std::mem::take(&mut *self.regions.write().unwrap_or_else(PoisonError::into_inner));
        for r in regions.into_values() {
            release(&self.nics, r.per_nic);
        }
    }
}

/// A GPU region exported as a dma-buf: the fd and the (page-aligned) address it starts
/// at, or why the driver would not export it.
type Exported = Result<(OwnedFd, u64), String>;

/// Exports the pages holding `range` (device allocations are at least page-aligned, so
/// the rounded range stays inside the allocation).
fn export_dmabuf(range: crate::memory::AddrRange) -> Exported {
    let page = crate::sys::page_size() as u64;
    let start = range.start & !(page - 1);
    let end = range.end().div_ceil(page) * page;
    crate::sys::cuda::dmabuf_fd(start, end - start)
        .map(|fd| (fd, start))
        .map_err(|e| e.to_string())
}

/// `ibv_reg_mr` of host memory (or GPU memory through nvidia-peermem).
fn register_host(nic: &Nic, at: u64, len: u64, access: u32) -> Result<NonNull<ibv_mr>, String> {
    // SAFETY: the range is registered memory of this process (the registry promises it
    // stays valid until unregistered, and the owner removes the MRs before that happens);
    // the PD is live.
    let mr = unsafe {
        nic.verbs()
            .reg_mr(nic.pd(), at as *mut c_void, len as usize, access)
    };
    NonNull::new(mr).ok_or_else(|| {
        let e = io::Error::last_os_error();
        format!(
            "ibv_reg_mr of {len} bytes at {at:#x} on {}: {e}",
            nic.name()
        )
    })
}

/// GPU memory: the dma-buf first, then plain `ibv_reg_mr` (nvidia-peermem).
fn register_gpu(
    nic: &Nic,
    exported: &Exported,
    at: u64,
    len: u64,
    access: u32,
) -> Result<NonNull<ibv_mr>, String> {
    let dmabuf_refused = match exported {
        Ok((fd, base)) => {
            // SAFETY: the PD is live; the fd is a dma-buf of the pages from `base`, which
            // cover at..at + len; the memory stays allocated while registered (as for
            // host memory, the owner removes the MRs before unregistering).
            let mr = unsafe {
                nic.verbs().reg_dmabuf_mr(
                    nic.pd(),
                    at - base,
                    len as usize,
                    at,
                    fd.as_raw_fd(),
                    access,
                )
            };
            match mr {
                Some(mr) => match NonNull::new(mr) {
                    Some(mr) => return Ok(mr),
                    None => format!("ibv_reg_dmabuf_mr: {}", io::Error::last_os_error()),
                },
                None => "this libibverbs has no ibv_reg_dmabuf_mr (rdma-core 34+)".into(),
            }
        }
        Err(why) => format!("the CUDA driver exports no dma-buf: {why}"),
    };
    register_host(nic, at, len, access)
        .inspect(|_| {
            log::info!(
                "kvxfer: GPU memory at {at:#x} registered on {} through nvidia-peermem \
                 (dma-buf: {dmabuf_refused})",
                nic.name()
            );
        })
        .map_err(|e| {
            format!(
                "GPU memory at {at:#x} cannot be registered on {}: dma-buf: {dmabuf_refused}; \
                 {e} (GPUDirect RDMA needs dma-buf support or the nvidia-peermem module)",
                nic.name()
            )
        })
}

fn release(nics: &[Arc<Nic>], per_nic: Vec<Vec<Mr>>) {
    for (nic, mrs) in nics.iter().zip(per_nic) {
        for mr in mrs {
            // SAFETY: registered by `add` on this NIC and deregistered only here, once.
            let rc = unsafe { nic.verbs().dereg_mr(mr.ptr.as_ptr()) };
            if rc != 0 {
                log::warn!("kvxfer: ibv_dereg_mr on {} failed ({rc})", nic.name());
            }
        }
    }
}

/// The NIC access flags for a region's rights (local write is always needed: READs land
/// in local memory, and remote write requires it).
fn verbs_access(access: Access) -> ibv_access_flags {
    let mut flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
    if access.contains(Access::REMOTE_WRITE) {
        flags |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
    }
    if access.contains(Access::REMOTE_READ) {
        flags |= ibv_access_flags::IBV_ACCESS_REMOTE_READ;
    }
    flags
}

/// One NIC's local keys, read under the table's lock (see [`MrTable::local_keys`]).
pub struct LocalKeys<'a> {
    regions: std::sync::RwLockReadGuard<'a, BTreeMap<u64, RegionMrs>>,
    nic: usize,
}

impl LocalKeys<'_> {
    /// The local key for `[addr, addr + len)`, if one MR covers it.
    pub fn lkey(&self, addr: u64, len: u64) -> Option<u32> {
        let (_, r) = self.regions.range(..=addr).next_back()?;
        r.per_nic
            .get(self.nic)?
            .iter()
            .find(|m| addr >= m.addr && addr + len <= m.addr + m.len)
            .map(|m| m.lkey)
    }
}

/// A peer's keys, by NIC and address.
#[derive(Debug, Default)]
pub struct RemoteKeys {
    per_nic: Vec<BTreeMap<u64, (u64, u32)>>,
}

impl RemoteKeys {
    /// Indexes `keys` (as a peer published them).
    pub fn new(keys: &[Key]) -> RemoteKeys {
        let mut per_nic: Vec<BTreeMap<u64, (u64, u32)>> = Vec::new();
        for k in keys {
            let nic = k.nic as usize;
            if per_nic.len() <= nic {
                per_nic.resize_with(nic + 1, BTreeMap::new);
            }
            per_nic[nic].insert(k.addr, (k.len, k.rkey));
        }
        RemoteKeys { per_nic }
    }

    /// The peer's rkey on its NIC `nic` covering `[addr, addr + len)`.
    pub fn rkey(&self, nic: usize, addr: u64, len: u64) -> Option<u32> {
        let (&start, &(klen, rkey)) = self.per_nic.get(nic)?.range(..=addr).next_back()?;
        (addr.checked_add(len)? <= start + klen).then_some(rkey)
    }
}
