//! The address → region index: a `BTreeMap` keyed by start address, so lookups, inserts
//! and removals are O(log n). Regions never overlap, so the region holding an address is
//! the last one starting at or before it, if it reaches that far.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use super::region::Backing;
use super::{Access, AddrRange, Location, MemoryError, Region};

/// Finds the region holding an address.
pub trait RegionLookup {
    /// The region that contains `addr`, if any.
    fn region_at(&self, addr: u64) -> Option<&Arc<Region>>;
}

impl RegionLookup for BTreeMap<u64, Arc<Region>> {
    fn region_at(&self, addr: u64) -> Option<&Arc<Region>> {
        self.range(..=addr)
            .next_back()
            .map(|(_, region)| region)
            .filter(|region| region.range().contains(addr))
    }
}

/// What to register.
#[derive(Debug)]
pub struct RegionSpec {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the memory lives; `None` = detect it.
    pub location: Option<Location>,
    /// Rights granted.
    pub access: Access,
    pub(crate) backing: Backing,
}

impl RegionSpec {
    /// Caller-owned memory.
    pub fn caller(addr: u64, len: u64, location: Option<Location>, access: Access) -> Self {
        RegionSpec {
            addr,
            len,
            location,
            access,
            backing: Backing::Caller,
        }
    }
}

/// Called after every change of a registry (to publish the new set to peers).
pub type ChangeObserver = Arc<dyn Fn() + Send + Sync>;

/// Called with the registry's write lock held before a region leaves it, so that peers
/// copying into it directly (same-host shared memory) lose access first. The flag is
/// `force` (engine-owned memory, whose pages outlive the registration anyway). Returns
/// `Err(copies)` when, without `force`, peers are copying into or out of it right now: the
/// region then stays registered.
pub type Revoker = Arc<dyn Fn(&Arc<Region>, bool) -> Result<(), u64> + Send + Sync>;

/// The set of registered regions of one engine.
#[derive(Default)]
pub struct Registry {
    regions: RwLock<BTreeMap<u64, Arc<Region>>>,
    /// Bumped on every change, so peers' cached copies can be checked for staleness.
    version: AtomicU64,
    observer: RwLock<Option<ChangeObserver>>,
    revoker: RwLock<Option<Revoker>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("regions", &self.len())
            .field("version", &self.version())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every spec, or none of them: an invalid one (zero length, address 0,
    /// overflow, overlap with another spec or with a registered region) fails the call and
    /// nothing is added. O(n log n) in the number of specs; the write lock is held
    /// only for the checks against what is registered and the inserts.
    pub fn register(&self, specs: Vec<RegionSpec>) -> Result<Vec<Arc<Region>>, MemoryError> {
        let mut regions = Vec::with_capacity(specs.len());
        for spec in specs {
            let range = AddrRange::new(spec.addr, spec.len);
            if spec.len == 0 {
                return Err(MemoryError::ZeroLength { range });
            }
            if spec.addr == 0 {
                return Err(MemoryError::NullAddress { len: spec.len });
            }
            if range.checked_end().is_none() {
                return Err(MemoryError::AddressOverflow {
                    addr: spec.addr,
                    len: spec.len,
                });
            }
            let location = spec.location.unwrap_or_else(|| detect_location(spec.addr));
            check_gpu_range(range, location)?;
            regions.push(Arc::new(Region::new(
                range,
                location,
                spec.access,
                spec.backing,
            )));
        }
        let mut by_start: Vec<AddrRange> = regions.iter().map(|r| r.range()).collect();
        by_start.sort_unstable_by_key(|r| r.start);
        if let Some(pair) = by_start.windows(2).find(|w| w[0].overlaps(&w[1])) {
            return Err(MemoryError::OverlapInRequest {
                range: pair[1],
                other: pair[0],
            });
        }
        let mut map = self.write();
        for region in &regions {
            let range = region.range();
            if let Some(existing) = overlapping(&map, &range) {
                return Err(MemoryError::Overlap { range, existing });
            }
        }
        for region in &regions {
            map.insert(region.range().start, Arc::clone(region));
        }
        drop(map);
        self.changed();
        Ok(regions)
    }

    /// Sets the function called (without any registry lock held) after every change.
    pub fn set_observer(&self, observer: Option<ChangeObserver>) {
        *self
            .observer
            .write()
            .unwrap_or_else(PoisonError::into_inner) = observer;
    }

    /// Sets the function asked before a region is unregistered (a `Revoker`).
    pub fn set_revoker(&self, revoker: Option<Revoker>) {
        *self.revoker.write().unwrap_or_else(PoisonError::into_inner) = revoker;
    }

    fn revoke(&self, region: &Arc<Region>, force: bool) -> Result<(), u64> {
        let revoker = self
            .revoker
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        revoker.map_or(Ok(()), |revoke| revoke(region, force))
    }

    /// How many changes the registry has seen.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        let observer = self
            .observer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(observe) = observer {
            observe();
        }
    }

    /// Removes the region starting at `addr`. Fails with `Busy` while an unfinished batch
    /// uses it (the caller's memory must not be freed yet), `NotRegistered` when no region
    /// starts there, and `OwnedByBuffer` for engine-allocated memory (drop the buffer).
    pub fn unregister(&self, addr: u64) -> Result<Arc<Region>, MemoryError> {
        let mut map = self.write();
        let region = map.get(&addr).ok_or(MemoryError::NotRegistered { addr })?;
        if matches!(region.backing, Backing::Owned(_)) {
            return Err(MemoryError::OwnedByBuffer {
                range: region.range(),
            });
        }
        let pins = region.pins();
        if pins > 0 {
            return Err(MemoryError::Busy {
                range: region.range(),
                batches: pins,
            });
        }
        if let Err(copies) = self.revoke(region, false) {
            return Err(MemoryError::PeerBusy {
                range: region.range(),
                copies,
            });
        }
        let region = map
            .remove(&addr)
            .expect("present: looked up under the same lock");
        drop(map);
        self.changed();
        Ok(region)
    }

    /// Removes `region` if it is still the one registered at its address, busy or not.
    /// Only for engine-owned memory, which batches keep alive through their `Arc`.
    pub(crate) fn remove_owned(&self, region: &Arc<Region>) {
        let mut map = self.write();
        if map
            .get(&region.range().start)
            .is_some_and(|r| Arc::ptr_eq(r, region))
        {
            // Peers that mapped the pages keep them; they only lose the right to use them.
            let _ = self.revoke(region, true);
            map.remove(&region.range().start);
            drop(map);
            self.changed();
        }
    }

    /// The region holding `addr`.
    pub fn lookup(&self, addr: u64) -> Option<Arc<Region>> {
        self.read().region_at(addr).cloned()
    }

    /// A read lock over the index, for checking a whole batch under one lock.
    pub fn read(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Arc<Region>>> {
        self.regions.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every registered region, ordered by address.
    pub fn snapshot(&self) -> Vec<Arc<Region>> {
        self.read().values().cloned().collect()
    }

    /// Number of registered regions.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<Region>>> {
        self.regions.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A registered region sharing bytes with `range`, if any: only the last region starting
/// before the range's end can, since regions are disjoint and sorted.
fn overlapping(map: &BTreeMap<u64, Arc<Region>>, range: &AddrRange) -> Option<AddrRange> {
    map.range(..range.end())
        .next_back()
        .map(|(_, r)| r.range())
        .filter(|r| r.overlaps(range))
}

/// GPU memory must be one live allocation on the device its location names. Only checked
/// when this process uses the driver: without one, nothing here can be device memory and
/// the label only keeps the engine's CPU copies away from it.
fn check_gpu_range(range: AddrRange, location: Location) -> Result<(), MemoryError> {
    let (Location::Cuda(device), Some(cuda)) = (location, crate::sys::cuda::driver_in_use()) else {
        return Ok(());
    };
    let fail = |reason: String| MemoryError::NotGpuMemory {
        range,
        location,
        reason,
    };
    let mem = cuda.device_range(range.start, range.len).map_err(fail)?;
    if mem.device != device {
        return Err(fail(format!("the memory is on cuda:{}", mem.device)));
    }
    Ok(())
}

/// Device memory of a GPU (asked of the CUDA driver, when this process uses one):
/// `cuda:N`; host memory: the NUMA node of its first page, `*` when the kernel cannot
/// tell.
fn detect_location(addr: u64) -> Location {
    if let Some(device) = crate::sys::cuda::driver_in_use().and_then(|c| c.device_memory(addr)) {
        return Location::Cuda(device.device);
    }
    crate::sys::numa::node_of_address(addr).map_or(Location::Any, Location::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(addr: u64, len: u64) -> RegionSpec {
        RegionSpec::caller(addr, len, Some(Location::Any), Access::ALL)
    }

    #[test]
    fn each_registration_error_is_distinct() {
        let reg = Registry::new();
        assert!(matches!(
            reg.register(vec![spec(0x1000, 0)]),
            Err(MemoryError::ZeroLength { .. })
        ));
        assert!(matches!(
            reg.register(vec![spec(0, 64)]),
            Err(MemoryError::NullAddress { len: 64 })
        ));
        assert!(matches!(
            reg.register(vec![spec(u64::MAX - 1, 4)]),
            Err(MemoryError::AddressOverflow { .. })
        ));
        reg.register(vec![spec(0x1000, 0x1000)]).unwrap();
        let err = reg.register(vec![spec(0x1800, 0x1000)]).unwrap_err();
        assert!(matches!(err, MemoryError::Overlap { existing, .. } if existing.start == 0x1000));
        assert!(err.to_string().contains("0x1800"), "{err}");
        assert!(matches!(
            reg.unregister(0x1800),
            Err(MemoryError::NotRegistered { addr: 0x1800 })
        ));
        let region = reg.lookup(0x1fff).unwrap();
        region.pin();
        assert!(matches!(
            reg.unregister(0x1000),
            Err(MemoryError::Busy { batches: 1, .. })
        ));
        region.unpin();
        reg.unregister(0x1000).unwrap();
        assert!(reg.is_empty());
    }

    #[test]
    fn batch_registration_is_all_or_nothing() {
        let reg = Registry::new();
        let err = reg
            .register(vec![
                spec(0x1000, 0x100),
                spec(0x3000, 0x100),
                spec(0x30ff, 0x10),
            ])
            .unwrap_err();
        assert!(
            matches!(err, MemoryError::OverlapInRequest { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("same call"), "{err}");
        assert!(reg.is_empty(), "a failed batch must register nothing");
        reg.register(vec![spec(0x1000, 0x100), spec(0x1100, 0x100)])
            .unwrap();
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn explicit_location_overrides_detection() {
        let reg = Registry::new();
        let buf = vec![0u8; 4096];
        let r = reg
            .register(vec![RegionSpec::caller(
                buf.as_ptr() as u64,
                4096,
                Some(Location::Cuda(3)),
                Access::ALL,
            )])
            .unwrap();
        assert_eq!(r[0].location(), Location::Cuda(3));
    }

    #[derive(Clone, Debug)]
    enum Step {
        Register(u64, u64),
        Unregister(u64),
        Lookup(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        // A small address space so that overlaps and hits are frequent.
        prop_oneof![
            (0u64..512, 0u64..64).prop_map(|(a, l)| Step::Register(a, l)),
            (0u64..512).prop_map(Step::Unregister),
            (0u64..600).prop_map(Step::Lookup),
        ]
    }

    proptest! {
        /// The index agrees with a naive list of ranges on every step.
        #[test]
        fn index_matches_a_naive_model(steps in proptest::collection::vec(step(), 1..200)) {
            let reg = Registry::new();
            let mut model: Vec<AddrRange> = Vec::new();
            for step in steps {
                match step {
                    Step::Register(addr, len) => {
                        let range = AddrRange::new(addr, len);
                        let expect_ok = len > 0 && addr != 0 && !model.iter().any(|r| r.overlaps(&range));
                        let got = reg.register(vec![spec(addr, len)]);
                        prop_assert_eq!(got.is_ok(), expect_ok, "register {}", range);
                        if expect_ok {
                            model.push(range);
                        }
                    }
                    Step::Unregister(addr) => {
                        let pos = model.iter().position(|r| r.start == addr);
                        prop_assert_eq!(reg.unregister(addr).is_ok(), pos.is_some());
                        if let Some(pos) = pos {
                            model.remove(pos);
                        }
                    }
                    Step::Lookup(addr) => {
                        let want = model.iter().find(|r| r.contains(addr)).copied();
                        prop_assert_eq!(reg.lookup(addr).map(|r| r.range()), want);
                    }
                }
                prop_assert_eq!(reg.len(), model.len());
            }
        }
    }
}
