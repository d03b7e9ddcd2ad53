//! Engine-owned registered memory (`Engine::allocate`).

use std::sync::Arc;

use super::region::Backing;
use super::{Access, Location, MemoryError, Region, RegionSpec, Registry};
use crate::sys::shm::SharedMapping;

/// A registered buffer owned by the engine, backed by a memfd so a same-host peer can map
/// the same pages. Dropping it unregisters it; the pages are unmapped once no unfinished
/// batch uses them any more, so dropping is always safe.
#[derive(Debug)]
pub struct Buffer {
    region: Arc<Region>,
    registry: Arc<Registry>,
}

impl Buffer {
    /// Maps `len` bytes, places them on `location`, faults them in (registered memory is
    /// meant to be hot) and registers them with `access`.
    pub(crate) fn allocate(
        registry: &Arc<Registry>,
        len: usize,
        location: Location,
        access: Access,
    ) -> Result<Buffer, MemoryError> {
        let fail = |source: std::io::Error| MemoryError::AllocationFailed {
            len,
            location,
            source: Arc::new(source),
        };
        if len == 0 {
            return Err(MemoryError::ZeroLength {
                range: super::AddrRange::new(0, 0),
            });
        }
        // Faulting in more than the machine (or our cgroup) has would get the whole server
        // OOM-killed; refuse up front instead. (A racing allocation elsewhere can still
        // take the memory first: this catches the mistakes, not every race.)
        if let Some(available) = crate::sys::meminfo::available_bytes() {
            if len as u64 > available {
                return Err(fail(std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    format!(
                        "only {available} bytes are available (MemAvailable, cgroup memory.max)"
                    ),
                )));
            }
        }
        let mapping = match location {
            Location::Cuda(_) => {
                return Err(MemoryError::UnsupportedLocation {
                    location,
                    reason:
                        "allocate() makes host memory; GPU memory is registered, not allocated here",
                })
            }
            Location::Cpu(node) => {
                let mapping = SharedMapping::create(&location.to_string(), len).map_err(fail)?;
                match crate::sys::numa::prefer_node(mapping.as_ptr(), mapping.mapped_len(), node) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                        log::debug!(
                            "kernel has no NUMA support; {location} allocation is not bound"
                        );
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        return Err(MemoryError::UnsupportedLocation {
                            location,
                            reason: "this machine has no such NUMA node, or the node has no memory",
                        })
                    }
                    Err(e) => return Err(fail(e)),
                }
                mapping
            }
            Location::Any => SharedMapping::create("any", len).map_err(fail)?,
        };
        mapping.populate().map_err(fail)?;
        let spec = RegionSpec {
            addr: mapping.as_ptr() as u64,
            len: len as u64,
            location: Some(location),
            access,
            backing: Backing::Owned(mapping),
        };
        let region = registry.register(vec![spec])?.remove(0);
        Ok(Buffer {
            region,
            registry: Arc::clone(registry),
        })
    }

    /// Start address, for building ops.
    pub fn addr(&self) -> u64 {
        self.region.range().start
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region.range().len as usize
    }

    /// Always false: zero-length buffers cannot be allocated.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The registered region.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Copies bytes out of the buffer at `offset`. Fails if the range does not fit.
    /// Bytes a running batch is writing may be read half-written: wait for it first.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), OutOfBounds> {
        self.mapping()
            .read_at(offset, out)
            .then_some(())
            .ok_or(OutOfBounds)
    }

    /// Copies `data` into the buffer at `offset`. Fails if the range does not fit.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        self.mapping()
            .write_at(offset, data)
            .then_some(())
            .ok_or(OutOfBounds)
    }

    /// Sets `len` bytes at `offset` to `byte`. Fails if the range does not fit.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), OutOfBounds> {
        self.mapping()
            .fill(offset, len, byte)
            .then_some(())
            .ok_or(OutOfBounds)
    }

    /// The whole buffer copied into a `Vec`.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len()];
        self.mapping().read_at(0, &mut out);
        out
    }

    fn mapping(&self) -> &SharedMapping {
        match &self.region.backing {
            Backing::Owned(mapping) => mapping,
            Backing::Caller => unreachable!("a Buffer always owns its mapping"),
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.registry.remove_owned(&self.region);
    }
}

/// A `Buffer` access outside its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("access outside the buffer")]
pub struct OutOfBounds;
