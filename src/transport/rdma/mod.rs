//! RDMA over verbs: batched one-sided WRITE and READ on RC queue pairs, spread over NICs.
//!
//! * [`nic`]: one opened device per selected NIC (protection domain, completion queue on
//!   a completion channel, the port address: LID, GID chosen RoCE v2 IPv4-mapped first,
//!   active MTU).
//! * [`mr`]: every registered region gets a memory registration per NIC, split at the
//!   NIC's `max_mr_size`; local keys by address, remote keys as peers published them.
//! * [`endpoint`]: an RC queue pair from a local NIC to a peer's NIC; claimed ranges of a
//!   batch are posted as chains (one doorbell, last request signaled, small WRITEs
//!   inline) while fewer than a bound of requests is outstanding.
//! * [`worker`]: the poller of a NIC's completion queue, which completes ranges and
//!   refills the queue pairs.
//!
//! A batch posted to several endpoints (one per local NIC) is claimed by all of them, so
//! its slices spread over the NICs in proportion to how fast each completes them.
//!
//! Status: the building blocks run on real verbs (soft-RoCE, see the tests); the control
//! plane handshake, the engine's choice of this transport and failover are the next step.

pub mod endpoint;
pub mod mr;
pub mod nic;
pub mod worker;

use std::sync::Arc;

use std::time::Instant;

use crate::memory::{Region, Registry};
use crate::sys::verbs::{kernel_support, DeviceList, Verbs};

use crate::topology::{
    discover, DeviceList as DeviceFilter, NicSelector, PausePolicy, PriorityMatrix,
};
use std::path::Path;

pub use endpoint::{Endpoint, RemoteQp};
pub use mr::{Key, MrTable, RemoteKeys};
pub use nic::{Nic, PortAddress};
pub use worker::NicWorker;

use super::{SliceSource, Transport, TransportKind};

/// The RDMA transport to one peer: its queue pairs, one per local NIC in use.
#[derive(Debug)]
pub struct RdmaTransport {
    endpoints: Vec<Arc<Endpoint>>,
}

impl RdmaTransport {
    /// Moves batches over `endpoints` (connected queue pairs to the peer).
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        for e in &endpoints {
            e.set_siblings(&endpoints);
        }
        RdmaTransport { endpoints }
    }
}

impl RdmaTransport {
    /// Whether a live queue pair reaches every slice (keys on both sides).
    pub fn reaches(&self, slices: &[crate::transport::Slice]) -> bool {
        self.endpoints
            .iter()
            .any(|e| !e.is_broken() && e.reaches(slices))
    }

    /// Whether every queue pair failed (the link is then reconnected; while one lives,
    /// the failed ones' work moves to it).
    pub fn is_broken(&self) -> bool {
        self.endpoints.iter().all(|e| e.is_broken())
    }

    /// The peer published new keys.
    pub fn set_keys(&self, keys: Arc<RemoteKeys>) {
        for e in &self.endpoints {
            e.set_keys(Arc::clone(&keys));
        }
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn reaches_gpu(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.endpoints.iter().map(|e| format!("{e:?}")).collect();
        format!("RDMA RC queue pairs: {}", names.join(", "))
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        let live: Vec<&Arc<Endpoint>> = self.endpoints.iter().filter(|e| !e.is_broken()).collect();
        // The live queue pairs on the NICs the selector picks for the batch's memory (its
        // location's preferred NICs that are not paused, else fallback ones) claim from
        // the batch; if none of them lives, every live one; if none is left, the first
        // fails what it claims (the batch ends with its error).
        let location = work
            .slices()
            .first()
            .and_then(|s| self.endpoints.first()?.mrs().location_of(s.local));
        let selector = self.endpoints.first().and_then(|e| e.worker().health());
        let chosen: Vec<&Arc<Endpoint>> = match (location, selector) {
            (Some(location), Some((selector, _))) => {
                let usable = selector.usable(location, Instant::now());
                live.iter()
                    .copied()
                    .filter(|e| {
                        e.worker()
                            .health()
                            .is_some_and(|(_, id)| usable.contains(&id))
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let targets = if !chosen.is_empty() {
            chosen
        } else if !live.is_empty() {
            live
        } else {
            self.endpoints.iter().take(1).collect()
        };
        for ep in targets {
            ep.post(Arc::clone(&work));
        }
    }
}

/// The NIC preferences per memory location: from this host's topology (`/sys`) when it
/// knows every opened NIC, else every NIC preferred everywhere (said in the log).
fn nic_matrix(filter: &DeviceFilter, opened: &[String]) -> PriorityMatrix {
    let built = discover(Path::new("/sys")).map(|t| {
        let mut m = PriorityMatrix::build(&t, filter);
        m.retain_nics(|n| opened.iter().any(|o| o == n));
        m
    });
    match built {
        Ok(m) if m.nics().len() == opened.len() => {
            log::info!(
                "kvxfer: RDMA NIC preferences by memory location: {}",
                m.to_json()
            );
            m
        }
        Ok(m) => {
            log::info!(
                "kvxfer: the topology places {} of the {} RDMA NICs; all are preferred for all memory",
                m.nics().len(),
                opened.len()
            );
            PriorityMatrix::flat(opened)
        }
        Err(e) => {
            log::info!("kvxfer: no topology ({e}); all RDMA NICs are preferred for all memory");
            PriorityMatrix::flat(opened)
        }
    }
}

impl Drop for Rdma {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The RDMA side of an engine: its NICs (with pollers) and the registrations of its
/// memory on them.
#[derive(Debug)]
pub struct Rdma {
    workers: Vec<Arc<NicWorker>>,
    mrs: Arc<MrTable>,
    /// Serialises `sync` (two concurrent ones must not both register a region), and holds
    /// the regions (by the address of their `Region`) whose registration failed and was
    /// reported: later syncs retry them without repeating the warning.
    syncing: std::sync::Mutex<std::collections::HashSet<usize>>,
}

impl std::fmt::Debug for MrTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MrTable")
    }
}

impl Rdma {
    /// Opens the NICs `devices` allows (a device list in any accepted form: `auto`,
    /// `mlx5_0,mlx5_1`, JSON, a `.json` file; per-GPU lists contribute all their
    /// devices), on port 1, with the GID `gid_index` or one chosen per NIC. `Err` says why
    /// RDMA cannot be used here, in one line: no libibverbs, no kernel support, no
    /// devices, none passing the list, every port down.
    /// NICs that fail `policy.failures` times within `policy.window` are paused (their
    /// queue pairs get no new batches while another NIC can carry them).
    pub fn open(devices: &str, gid_index: Option<u8>, policy: PausePolicy) -> Result<Rdma, String> {
        let filter = DeviceFilter::parse(devices).map_err(|e| format!("bad device list: {e}"))?;
        let verbs = Verbs::load().map_err(|e| e.to_string())?;
        kernel_support().map_err(|e| e.to_string())?;
        let list = DeviceList::new(verbs).map_err(|e| format!("cannot list RDMA devices: {e}"))?;
        let present: Vec<String> = list.iter().map(|d| d.name()).collect();
        if present.is_empty() {
            return Err("no RDMA devices".into());
        }
        let wanted: Vec<String> = match &filter {
            DeviceFilter::Auto => present.clone(),
            DeviceFilter::Names(names) => names.clone(),
            DeviceFilter::PerGpu { gpus, default } => {
                let mut all: Vec<String> = gpus
                    .values()
                    .flatten()
                    .chain(default.iter().flatten())
                    .cloned()
                    .collect();
                all.sort();
                all.dedup();
                all
            }
        };
        let mut why_not = Vec::new();
        let mut workers = Vec::new();
        for name in &wanted {
            if !present.contains(name) {
                why_not.push(format!(
                    "{name}: no such device (present: {})",
                    present.join(", ")
                ));
                continue;
            }
            match Nic::open(verbs, &list, name, gid_index) {
                Ok(nic) => match NicWorker::start(Arc::new(nic)) {
                    Ok(w) => workers.push(w),
                    Err(e) => why_not.push(format!("{name}: cannot start its poller: {e}")),
                },
                Err(e) => why_not.push(e),
            }
        }
        if workers.is_empty() {
            return Err(format!("no usable RDMA NIC ({})", why_not.join("; ")));
        }
        for why in &why_not {
            log::warn!("kvxfer: RDMA NIC not used: {why}");
        }
        let names: Vec<String> = workers.iter().map(|w| w.nic().name().to_string()).collect();
        let matrix = nic_matrix(&filter, &names);
        let selector = Arc::new(NicSelector::new(&matrix, policy, Instant::now()));
        for w in &workers {
            if let Some(id) = selector.id(w.nic().name()) {
                w.set_health(Arc::clone(&selector), id);
            }
        }
        let mrs = Arc::new(MrTable::new(workers.iter().map(|w| w.nic_arc()).collect()));
        Ok(Rdma {
            workers,
            mrs,
            syncing: std::sync::Mutex::default(),
        })
    }

    /// The NICs in use, in order (their index is the NIC number peers see).
    pub fn workers(&self) -> &[Arc<NicWorker>] {
        &self.workers
    }

    /// The memory registrations.
    pub fn mrs(&self) -> &Arc<MrTable> {
        &self.mrs
    }

    /// Registers every region of `registry` not registered yet (after a registry change).
    /// Under the registry's read lock, so that no region can be unregistered (and its
    /// memory freed) between the look and the registration.
    pub fn sync(&self, registry: &Registry) {
        let mut reported = self
            .syncing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let map = registry.read();
        reported.retain(|&p| map.values().any(|r| Arc::as_ptr(r) as usize == p));
        for region in map.values() {
            if !self.mrs.contains(region.range().start) {
                if let Err(e) = self.mrs.add(region) {
                    let range = region.range();
                    if reported.insert(Arc::as_ptr(region) as usize) {
                        log::warn!("kvxfer: region {range} is not reachable over RDMA: {e}");
                    } else {
                        log::debug!("kvxfer: region {range} is still not reachable over RDMA: {e}");
                    }
                }
            }
        }
    }

    /// Deregisters `region` on every NIC: no NIC touches it once this returns.
    pub fn revoke(&self, region: &Region) {
        self.mrs.remove(region.range().start);
    }

    /// Stops the pollers (once nothing is in flight, bounded) and deregisters all memory:
    /// afterwards no NIC touches the engine's memory.
    pub fn shutdown(&self) {
        for w in &self.workers {
            w.shutdown();
        }
        self.mrs.clear();
    }

    /// One line for `Engine::transports()`.
    pub fn describe(&self) -> String {
        let nics: Vec<String> = self
            .workers
            .iter()
            .map(|w| {
                let a = w.nic().address();
                format!(
                    "{} (port {}, GID index {}, MTU {})",
                    w.nic().name(),
                    a.port,
                    a.gid_index,
                    crate::sys::verbs::mtu_bytes(a.mtu).unwrap_or(0)
                )
            })
            .collect();
        format!("RDMA RC over {}", nics.join(", "))
    }
}

#[cfg(test)]
mod tests;
