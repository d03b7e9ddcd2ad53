//! Topology: which RDMA NICs, GPUs and NUMA nodes a host has (read from a sysfs root, so
//! tests use fixture trees), which NICs the user allows (device lists in every form users
//! pass today), the preferred / fallback NICs per memory location (the priority matrix,
//! importable and exportable in Mooncake's JSON format), and the NIC choice per slice.
//!
//! Nothing here needs libibverbs or CUDA: it is plain files, so it runs everywhere.

mod devices;
mod error;
mod matrix;
mod model;
mod select;
mod sysfs;

pub use devices::DeviceList;
pub use error::TopologyError;
pub use matrix::{Priorities, PriorityMatrix};
pub use model::{Gpu, LinkLayer, Nic, Port, PortState, Topology};
pub use select::{remote_nic, NicId, NicSelector, PausePolicy};
pub use sysfs::{discover, fuzz_attribute_parsers, pci_distance};
