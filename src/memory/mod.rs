//! Registered memory: the regions this engine may move bytes from and to, with their
//! location and access rights, and an address → region index.

mod access;
mod buffer;
mod error;
mod location;
mod region;
mod registry;

pub use access::Access;
pub use buffer::{Buffer, OutOfBounds};
pub use error::MemoryError;
pub use location::{Location, LocationParseError};
pub(crate) use region::Backing;
pub use region::{AddrRange, Region};
pub use registry::{RegionLookup, RegionSpec, Registry, Revoker};
