//! What discovery finds: NICs with their ports, GPUs, NUMA nodes.

use std::fmt;

/// A host's devices, as discovered from sysfs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// NUMA node numbers, ascending (empty when the kernel has no NUMA information).
    pub numa_nodes: Vec<u32>,
    /// RDMA NICs, sorted by name.
    pub nics: Vec<Nic>,
    /// NVIDIA GPUs, sorted by PCI bus id; `Gpu::index` is the position in that order
    /// (CUDA's order with `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub gpus: Vec<Gpu>,
}

/// An RDMA device (`/sys/class/infiniband/<name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// Device name, e.g. `mlx5_0`.
    pub name: String,
    /// PCI address (`0000:17:00.0`), when the device is a PCI device (soft-RoCE is not).
    pub pci_address: Option<String>,
    /// The resolved PCI path from the root complex down to the device, e.g.
    /// `["pci0000:16", "0000:16:01.0", "0000:17:00.0"]`; empty when not PCI.
    pub pci_path: Vec<String>,
    /// NUMA node of the device (`None` when the kernel says -1 or nothing).
    pub numa_node: Option<u32>,
    /// Ports, by number.
    pub ports: Vec<Port>,
}

impl Nic {
    /// Whether at least one port is ACTIVE.
    pub fn is_up(&self) -> bool {
        self.ports.iter().any(|p| p.state == PortState::Active)
    }
}

/// One port of a NIC (`ports/<n>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Port number (from 1).
    pub number: u32,
    /// Logical state (`state`).
    pub state: PortState,
    /// `InfiniBand` or `Ethernet` (RoCE) (`link_layer`).
    pub link_layer: LinkLayer,
    /// Non-zero GIDs as (index, text, type such as "RoCE v2" when known).
    pub gids: Vec<(u32, String, Option<String>)>,
    /// MTU of the port's network device (RoCE), in bytes, when known.
    pub mtu: Option<u32>,
}

/// Logical port state, as in `ports/<n>/state` ("4: ACTIVE").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    /// 1: DOWN.
    Down,
    /// 2: INIT.
    Init,
    /// 3: ARMED.
    Armed,
    /// 4: ACTIVE.
    Active,
    /// 5: ACTIVE_DEFER.
    ActiveDefer,
}

/// Link layer of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// Native InfiniBand.
    InfiniBand,
    /// RoCE.
    Ethernet,
    /// The driver does not say (`Unknown`, e.g. AWS EFA).
    Unspecified,
}

/// An NVIDIA GPU (PCI vendor 0x10de, display class: VGA 0x0300 or 3D 0x0302).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// Ordinal in PCI bus id order.
    pub index: u32,
    /// PCI bus id, e.g. `0000:18:00.0`.
    pub bus_id: String,
    /// Resolved PCI path from the root complex, as for [`Nic::pci_path`].
    pub pci_path: Vec<String>,
    /// NUMA node (`None` when unknown).
    pub numa_node: Option<u32>,
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortState::Down => "DOWN",
            PortState::Init => "INIT",
            PortState::Armed => "ARMED",
            PortState::Active => "ACTIVE",
            PortState::ActiveDefer => "ACTIVE_DEFER",
        })
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkLayer::InfiniBand => "InfiniBand",
            LinkLayer::Ethernet => "Ethernet",
            LinkLayer::Unspecified => "Unknown",
        })
    }
}
