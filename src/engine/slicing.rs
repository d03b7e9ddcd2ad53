//! Checking ops against both sides' registered regions and cutting them into slices that
//! never cross a region boundary and never exceed the slice size. Pure: it reads region
//! indexes and writes slices, nothing else.

use std::sync::Arc;

use super::error::{Error, Side};
use crate::memory::{Access, AddrRange, Region, RegionLookup};
use crate::transport::{OpKind, Slice};

/// One transfer request: move `len` bytes between `local_addr` (this engine) and
/// `remote_addr` (the peer) in the direction `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// READ (remote → local) or WRITE (local → remote).
    pub kind: OpKind,
    /// Address in this engine's registered memory.
    pub local_addr: u64,
    /// Address in the peer's registered memory.
    pub remote_addr: u64,
    /// Bytes to move.
    pub len: u64,
}

impl Op {
    /// A WRITE of `len` bytes from `local_addr` to the peer's `remote_addr`.
    pub fn write(local_addr: u64, remote_addr: u64, len: u64) -> Self {
        Op {
            kind: OpKind::Write,
            local_addr,
            remote_addr,
            len,
        }
    }

    /// A READ of `len` bytes from the peer's `remote_addr` into `local_addr`.
    pub fn read(local_addr: u64, remote_addr: u64, len: u64) -> Self {
        Op {
            kind: OpKind::Read,
            local_addr,
            remote_addr,
            len,
        }
    }
}

/// The regions a batch uses: collected while slicing, then each pinned exactly once
/// ([`Pins::pin_all`], under the registry's read lock) so that `unregister` reports them
/// busy, with the right number of batches, until the batch ends.
#[derive(Debug, Default)]
pub(crate) struct Pins {
    regions: Vec<Arc<Region>>,
    pinned: bool,
    /// The device of the batch's first local GPU region, once the engine has checked them.
    local_gpu: Option<u32>,
}

impl Pins {
    /// Records `region` unless it is among the last few recorded (ops of a batch mostly
    /// hit the same one or two regions, so the list stays short before deduplication).
    fn add(&mut self, region: &Arc<Region>) {
        let recent = self.regions.iter().rev().take(4);
        if !recent.into_iter().any(|r| Arc::ptr_eq(r, region)) {
            self.regions.push(Arc::clone(region));
        }
    }

    /// The GPU location of a region the batch touches (either side), if any.
    pub(crate) fn gpu_location(&self) -> Option<crate::memory::Location> {
        self.regions
            .iter()
            .map(|r| r.location())
            .find(|l| matches!(l, crate::memory::Location::Cuda(_)))
    }

    /// Records the device of the batch's local GPU memory (see `Engine::check_gpu_alive`).
    pub(crate) fn set_local_gpu(&mut self, device: Option<u32>) {
        self.local_gpu = device;
    }

    /// The device of the batch's local GPU memory, if it has any.
    pub(crate) fn local_gpu(&self) -> Option<u32> {
        self.local_gpu
    }

    /// Deduplicates the regions and pins each once. Call with the registry's read lock
    /// still held, so that no `unregister` can slip in between the checks and the pins.
    pub(crate) fn pin_all(&mut self) {
        self.regions
            .sort_unstable_by_key(|r| Arc::as_ptr(r) as usize);
        self.regions.dedup_by(|a, b| Arc::ptr_eq(a, b));
        self.regions.iter().for_each(|r| r.pin());
        self.pinned = true;
    }

    /// Unpins every region; later calls do nothing.
    pub(crate) fn release(&mut self) {
        if std::mem::replace(&mut self.pinned, false) {
            self.regions.iter().for_each(|r| r.unpin());
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.regions.len()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.release();
    }
}

/// The rights each side needs for an op of `kind`: (local, remote).
fn needed_rights(kind: OpKind) -> (Access, Access) {
    match kind {
        OpKind::Write => (Access::LOCAL_READ, Access::REMOTE_WRITE),
        OpKind::Read => (Access::LOCAL_WRITE, Access::REMOTE_READ),
    }
}

/// Where the two sides of ops live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AddressSpaces {
    /// Local and remote addresses are in one process (the loopback peer): an op whose two
    /// ranges partly overlap cannot be copied slice by slice, in parallel, and is refused.
    Same,
    /// The remote side is another process's memory (the remote peers that later
    /// transports add; until then only tests use it).
    #[allow(dead_code)]
    Distinct,
}

/// Checks op number `index` against `local` and `remote` and appends its slices to `out`,
/// recording in `pins` every region it touches. On error nothing is appended for this op.
#[allow(clippy::too_many_arguments)]
pub(crate) fn slice_op(
    index: usize,
    op: &Op,
    slice_size: u64,
    local: &impl RegionLookup,
    remote: &impl RegionLookup,
    spaces: AddressSpaces,
    out: &mut Vec<Slice>,
    pins: &mut Pins,
) -> Result<(), Error> {
    if op.len == 0 {
        return Err(Error::ZeroLengthOp { op: index });
    }
    let (need_local, need_remote) = needed_rights(op.kind);
    let local_side = SideCheck {
        side: Side::Local,
        addr: op.local_addr,
        need: need_local,
    };
    let remote_side = SideCheck {
        side: Side::Remote,
        addr: op.remote_addr,
        need: need_remote,
    };
    for s in [&local_side, &remote_side] {
        if s.addr.checked_add(op.len).is_none() {
            return Err(Error::AddressOverflow {
                op: index,
                side: s.side,
                addr: s.addr,
                len: op.len,
            });
        }
    }
    let (local_range, remote_range) = (
        AddrRange::new(op.local_addr, op.len),
        AddrRange::new(op.remote_addr, op.len),
    );
    // Identical ranges are fine (every slice copies onto itself); a partial overlap is not.
    let partial_overlap = local_range.overlaps(&remote_range) && op.local_addr != op.remote_addr;
    if spaces == AddressSpaces::Same && partial_overlap {
        return Err(Error::OverlappingOp {
            op: index,
            local: local_range,
            remote: remote_range,
        });
    }
    let first = out.len();
    let mut cursor = None::<(&Arc<Region>, &Arc<Region>)>;
    let mut offset = 0;
    while offset < op.len {
        let (la, ra) = (op.local_addr + offset, op.remote_addr + offset);
        let (lr, rr) = match cursor {
            Some((lr, rr)) if lr.range().contains(la) && rr.range().contains(ra) => (lr, rr),
            _ => {
                let found = local_side
                    .region(index, op, local, la)
                    .and_then(|lr| Ok((lr, remote_side.region(index, op, remote, ra)?)));
                let (lr, rr) = match found {
                    Ok(found) => found,
                    Err(e) => {
                        out.truncate(first);
                        return Err(e);
                    }
                };
                pins.add(lr);
                pins.add(rr);
                cursor = Some((lr, rr));
                (lr, rr)
            }
        };
        let len = (op.len - offset)
            .min(slice_size)
            .min(lr.range().end() - la)
            .min(rr.range().end() - ra);
        out.push(Slice {
            kind: op.kind,
            op: index as u32,
            len: len as u32,
            local: la,
            remote: ra,
        });
        offset += len;
    }
    Ok(())
}

/// One side of an op being checked.
struct SideCheck {
    side: Side,
    addr: u64,
    need: Access,
}

impl SideCheck {
    /// The region holding `at`, if it grants the right this side needs.
    fn region<'a>(
        &self,
        index: usize,
        op: &Op,
        lookup: &'a impl RegionLookup,
        at: u64,
    ) -> Result<&'a Arc<Region>, Error> {
        let range = AddrRange::new(self.addr, op.len);
        let Some(region) = lookup.region_at(at) else {
            return Err(Error::NotRegistered {
                op: index,
                side: self.side,
                range,
                at,
            });
        };
        if !region.access().contains(self.need) {
            return Err(Error::AccessDenied {
                op: index,
                kind: op.kind,
                side: self.side,
                range,
                region: region.range(),
                need: self.need,
                granted: region.access(),
            });
        }
        Ok(region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Location, RegionSpec, Registry};
    use proptest::prelude::*;

    fn registry(regions: &[(u64, u64, Access)]) -> Registry {
        let reg = Registry::new();
        for &(addr, len, access) in regions {
            reg.register(vec![RegionSpec::caller(
                addr,
                len,
                Some(Location::Any),
                access,
            )])
            .unwrap();
        }
        reg
    }

    fn slice(op: &Op, reg: &Registry, size: u64) -> (Result<(), Error>, Vec<Slice>, Pins) {
        let (mut out, mut pins) = (Vec::new(), Pins::default());
        let map = reg.read();
        let r = slice_op(
            7,
            op,
            size,
            &*map,
            &*map,
            AddressSpaces::Distinct,
            &mut out,
            &mut pins,
        );
        (r, out, pins)
    }

    #[test]
    fn slices_split_at_size_and_at_both_sides_region_boundaries() {
        let reg = registry(&[
            (0x10000, 0x3000, Access::ALL),
            (0x13000, 0x1000, Access::ALL),
            (0x20000, 0x1800, Access::ALL),
            (0x21800, 0x4000, Access::ALL),
        ]);
        let (r, out, pins) = slice(&Op::write(0x10000, 0x20000, 0x4000), &reg, 0x1000);
        r.unwrap();
        let cuts: Vec<_> = out.iter().map(|s| (s.local, s.remote, s.len)).collect();
        assert_eq!(
            cuts,
            vec![
                (0x10000, 0x20000, 0x1000),
                (0x11000, 0x21000, 0x800),
                (0x11800, 0x21800, 0x1000),
                (0x12800, 0x22800, 0x800),
                (0x13000, 0x23000, 0x1000),
            ]
        );
        assert_eq!(pins.len(), 4);
    }

    #[test]
    fn violations_name_the_op_side_and_right() {
        let reg = registry(&[
            (0x1000, 0x1000, Access::LOCAL_READ | Access::REMOTE_READ),
            (0x8000, 0x1000, Access::ALL),
        ]);
        let (r, out, _) = slice(&Op::write(0x8000, 0x1000, 0x100), &reg, 0x1000);
        let err = r.unwrap_err();
        assert!(matches!(
            err,
            Error::AccessDenied {
                op: 7,
                side: Side::Remote,
                need: Access::REMOTE_WRITE,
                ..
            }
        ));
        assert!(err.to_string().contains("REMOTE_WRITE"), "{err}");
        assert!(out.is_empty());

        let (r, out, _) = slice(&Op::read(0x1000, 0x8000, 0x100), &reg, 0x1000);
        assert!(matches!(
            r,
            Err(Error::AccessDenied {
                side: Side::Local,
                need: Access::LOCAL_WRITE,
                ..
            })
        ));
        assert!(out.is_empty());

        let (r, out, _) = slice(&Op::write(0x8000, 0x8f00, 0x200), &reg, 0x1000);
        assert!(
            matches!(
                r,
                Err(Error::NotRegistered {
                    side: Side::Remote,
                    at: 0x9000,
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(out.is_empty(), "a failed op leaves no slices behind");

        let (r, _, _) = slice(&Op::write(0x8000, 0x8000, 0), &reg, 0x1000);
        assert!(matches!(r, Err(Error::ZeroLengthOp { op: 7 })));
        let (r, _, _) = slice(&Op::write(u64::MAX - 4, 0x8000, 16), &reg, 0x1000);
        assert!(matches!(
            r,
            Err(Error::AddressOverflow {
                side: Side::Local,
                ..
            })
        ));
    }

    #[test]
    fn overlapping_ranges_are_refused_in_one_address_space_only() {
        let reg = registry(&[(0x10000, 0x10000, Access::ALL)]);
        let op = Op::write(0x10000, 0x10800, 0x1000);
        let map = reg.read();
        let (mut out, mut pins) = (Vec::new(), Pins::default());
        let same = slice_op(
            3,
            &op,
            0x400,
            &*map,
            &*map,
            AddressSpaces::Same,
            &mut out,
            &mut pins,
        );
        let err = same.unwrap_err();
        assert!(matches!(err, Error::OverlappingOp { op: 3, .. }), "{err:?}");
        assert!(err.to_string().contains("overlap"), "{err}");
        assert!(out.is_empty());
        let distinct = slice_op(
            3,
            &op,
            0x400,
            &*map,
            &*map,
            AddressSpaces::Distinct,
            &mut out,
            &mut pins,
        );
        distinct.unwrap();
        assert_eq!(out.len(), 4);
        // Adjacent, not overlapping: fine in one address space too.
        let adjacent = Op::read(0x10000, 0x11000, 0x1000);
        slice_op(
            4,
            &adjacent,
            0x400,
            &*map,
            &*map,
            AddressSpaces::Same,
            &mut out,
            &mut pins,
        )
        .unwrap();
    }

    #[test]
    fn each_region_is_pinned_once_per_batch() {
        let reg = registry(&[
            (0x10000, 0x1000, Access::ALL),
            (0x20000, 0x1000, Access::ALL),
            (0x30000, 0x1000, Access::ALL),
        ]);
        let map = reg.read();
        let (mut out, mut pins) = (Vec::new(), Pins::default());
        // Alternate over three regions so that the "recent" shortcut cannot deduplicate.
        for i in 0..60u64 {
            let (a, b) = (0x10000 * (1 + i % 3), 0x10000 * (1 + (i + 1) % 3));
            let op = Op::write(a + i * 16, b + i * 16, 16);
            slice_op(
                i as usize,
                &op,
                0x400,
                &*map,
                &*map,
                AddressSpaces::Same,
                &mut out,
                &mut pins,
            )
            .unwrap();
        }
        pins.pin_all();
        assert_eq!(pins.len(), 3);
        assert!(map.values().all(|r| r.pins() == 1));
        pins.release();
        assert!(map.values().all(|r| r.pins() == 0));
    }

    proptest! {
        /// Slices cover each op exactly, in order, stay within one region on each side and
        /// within the slice size; and an op is refused iff some byte of it is unregistered.
        #[test]
        fn slices_tile_the_op(
            cuts in proptest::collection::btree_set(1u64..64, 0..8),
            gap in proptest::option::of(0u64..64),
            local_off in 0u64..64,
            remote_off in 0u64..64,
            len in 1u64..64,
            size in 1u64..20,
        ) {
            // Regions tiling [BASE, BASE + 64 units) at `cuts` (units of 16 bytes), minus an
            // optional gap. BASE keeps address 0 (never registrable) out of the picture.
            const BASE: u64 = 0x10000;
            let mut bounds: Vec<u64> = std::iter::once(0).chain(cuts).chain(std::iter::once(64)).collect();
            bounds.dedup();
            let reg = Registry::new();
            let mut covered = [true; 64];
            for w in bounds.windows(2) {
                if gap.is_some_and(|g| w[0] <= g && g < w[1]) {
                    covered[w[0] as usize..w[1] as usize].iter_mut().for_each(|c| *c = false);
                    continue;
                }
                reg.register(vec![RegionSpec::caller(BASE + w[0] * 16, (w[1] - w[0]) * 16, Some(Location::Any), Access::ALL)]).unwrap();
            }
            let op = Op::write(BASE + local_off * 16, BASE + remote_off * 16 + 3, len * 16);
            let in_map = |a: u64| (BASE..BASE + 64 * 16).contains(&a) && covered[((a - BASE) / 16) as usize];
            let all_covered = (0..op.len).all(|o| in_map(op.local_addr + o) && in_map(op.remote_addr + o));
            let (r, out, _) = slice(&op, &reg, size * 16);
            prop_assert_eq!(r.is_ok(), all_covered);
            if r.is_ok() {
                let mut expect = 0;
                for s in &out {
                    prop_assert_eq!(s.local, op.local_addr + expect);
                    prop_assert_eq!(s.remote, op.remote_addr + expect);
                    prop_assert!(s.len > 0 && s.len as u64 <= size * 16);
                    for addr in [s.local, s.remote] {
                        let region = reg.lookup(addr).unwrap().range();
                        let last = if addr == s.local { s.local } else { s.remote } + s.len as u64 - 1;
                        prop_assert!(region.contains(last), "slice crosses a region boundary");
                    }
                    expect += s.len as u64;
                }
                prop_assert_eq!(expect, op.len);
            }
        }
    }
}
