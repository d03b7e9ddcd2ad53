//! One RDMA NIC as the transport uses it: the opened device, a protection domain, one
//! completion queue on a completion channel, the port and GID it talks through.

use std::ffi::c_int;
use std::io;
use std::net::Ipv6Addr;
use std::ptr::{self, NonNull};

use crate::sys::verbs::bindings::*;
use crate::sys::verbs::{gid_raw, mtu_bytes, Context, DeviceList, Verbs, IBV_LINK_LAYER_ETHERNET};

/// Completion queue entries per NIC, at most (the device's limit may be lower). Every
/// queue pair on the NIC reserves room for all its work requests (a queue pair in error
/// flushes each of them, signaled or not, as a completion), so the queue never overflows.
pub const CQ_ENTRIES: c_int = 1 << 16;

/// The address a NIC's port is reached at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAddress {
    /// Port number (from 1).
    pub port: u8,
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID used (RoCE v2 with an IPv4-mapped address when there is one).
    pub gid: [u8; 16],
    /// Its index in the port's GID table.
    pub gid_index: u8,
    /// Active MTU.
    pub mtu: ibv_mtu,
}

/// An opened NIC. Objects are destroyed in reverse order on drop.
pub struct Nic {
    name: String,
    verbs: &'static Verbs,
    /// Dropped last (closes the device).
    ctx: Context,
    pd: NonNull<ibv_pd>,
    channel: NonNull<ibv_comp_channel>,
    cq: NonNull<ibv_cq>,
    address: PortAddress,
    max_mr_size: u64,
    max_qp_wr: u32,
    max_rd_atomic: u8,
    max_dest_rd_atomic: u8,
    /// Completion queue entries not reserved by a queue pair.
    cq_room: std::sync::atomic::AtomicU32,
}

// SAFETY: verbs objects may be used from any thread (libibverbs and its providers lock
// internally); the raw pointers are owned by this value and freed only in Drop.
unsafe impl Send for Nic {}
// SAFETY: as above; shared use only posts to, polls or queries thread-safe objects.
unsafe impl Sync for Nic {}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish()
    }
}

impl Nic {
    /// Opens device `name` on port 1 and creates its PD and CQ. `gid_index`: the GID to
    /// use, or `None` to choose one (RoCE v2 with an IPv4-mapped address first, then any
    /// non-zero GID; InfiniBand ports use GID 0 with their LID).
    pub fn open(
        verbs: &'static Verbs,
        devices: &DeviceList,
        name: &str,
        gid_index: Option<u8>,
    ) -> Result<Nic, String> {
        let device = devices
            .find(name)
            .ok_or_else(|| format!("no RDMA device named {name}"))?;
        let ctx = device
            .open()
            .map_err(|e| format!("cannot open {name}: {e}"))?;
        let attr = ctx
            .query_device()
            .map_err(|e| format!("cannot query {name}: {e}"))?;
        let port = 1u8;
        let pattr = ctx
            .query_port(port)
            .map_err(|e| format!("cannot query port {port} of {name}: {e}"))?;
        if pattr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(format!(
                "port {port} of {name} is {}",
                crate::sys::verbs::port_state_name(pattr.state)
            ));
        }
        let (gid_index, gid) = choose_gid(&ctx, port, &pattr, gid_index)?;
        let address = PortAddress {
            port,
            lid: pattr.lid,
            gid,
            gid_index,
            mtu: pattr.active_mtu,
        };
        // SAFETY: the context is open; every object is created on it and destroyed (in
        // reverse order) before it closes, in Drop or on the error paths below.
        unsafe {
            let pd = NonNull::new(verbs.alloc_pd(ctx.as_ptr()))
                .ok_or_else(|| format!("ibv_alloc_pd on {name}: {}", io::Error::last_os_error()))?;
            let Some(channel) = NonNull::new(verbs.create_comp_channel(ctx.as_ptr())) else {
                let e = io::Error::last_os_error();
                verbs.dealloc_pd(pd.as_ptr());
                return Err(format!("ibv_create_comp_channel on {name}: {e}"));
            };
            let entries = CQ_ENTRIES.min(attr.max_cqe.max(1));
            let clamp = |v: c_int| u8::try_from(v.clamp(1, 16)).unwrap_or(1);
            let cq = verbs.create_cq(ctx.as_ptr(), entries, ptr::null_mut(), channel.as_ptr(), 0);
            let Some(cq) = NonNull::new(cq) else {
                let e = io::Error::last_os_error();
                verbs.destroy_comp_channel(channel.as_ptr());
                verbs.dealloc_pd(pd.as_ptr());
                return Err(format!("ibv_create_cq on {name}: {e}"));
            };
            Ok(Nic {
                name: name.to_string(),
                verbs,
                ctx,
                pd,
                channel,
                cq,
                address,
                max_mr_size: attr.max_mr_size,
                max_qp_wr: u32::try_from(attr.max_qp_wr).unwrap_or(0),
                max_rd_atomic: clamp(attr.max_qp_init_rd_atom),
                max_dest_rd_atomic: clamp(attr.max_qp_rd_atom),
                cq_room: std::sync::atomic::AtomicU32::new(entries.max(0) as u32),
            })
        }
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port address peers connect to.
    pub fn address(&self) -> PortAddress {
        self.address
    }

    /// Largest memory registration the device takes.
    pub fn max_mr_size(&self) -> u64 {
        self.max_mr_size
    }

    /// Most work requests one queue pair may hold.
    pub fn max_qp_wr(&self) -> u32 {
        self.max_qp_wr
    }

    /// RDMA READs a queue pair may have outstanding as initiator / as responder (the
    /// device's limits, at most 16).
    pub fn rd_atomic(&self) -> (u8, u8) {
        (self.max_rd_atomic, self.max_dest_rd_atomic)
    }

    /// Reserves `entries` completion-queue entries for a queue pair; false when the
    /// queue has no room left (too many queue pairs on this NIC).
    pub fn reserve_cq(&self, entries: u32) -> bool {
        self.cq_room
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |room| room.checked_sub(entries),
            )
            .is_ok()
    }

    /// Gives back what `reserve_cq` took.
    pub fn release_cq(&self, entries: u32) {
        self.cq_room
            .fetch_add(entries, std::sync::atomic::Ordering::AcqRel);
    }

    /// The library.
    pub fn verbs(&self) -> &'static Verbs {
        self.verbs
    }

    /// The protection domain (valid while `self` lives).
    pub fn pd(&self) -> *mut ibv_pd {
        self.pd.as_ptr()
    }

    /// The completion queue (valid while `self` lives).
    pub fn cq(&self) -> *mut ibv_cq {
        self.cq.as_ptr()
    }

    /// The completion channel (valid while `self` lives).
    pub fn channel(&self) -> *mut ibv_comp_channel {
        self.channel.as_ptr()
    }

    /// The open context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
}

impl Drop for Nic {
    fn drop(&mut self) {
        // SAFETY: the CQ, channel and PD were created on this context and are destroyed
        // once, children first; the owner drops every QP and MR on them first.
        unsafe {
            if self.verbs.destroy_cq(self.cq.as_ptr()) != 0 {
                log::warn!("kvxfer: ibv_destroy_cq on {} failed", self.name);
            }
            if self.verbs.destroy_comp_channel(self.channel.as_ptr()) != 0 {
                log::warn!("kvxfer: ibv_destroy_comp_channel on {} failed", self.name);
            }
            if self.verbs.dealloc_pd(self.pd.as_ptr()) != 0 {
                log::warn!(
                    "kvxfer: ibv_dealloc_pd on {} failed (objects left on it)",
                    self.name
                );
            }
        }
    }
}

/// The GID to talk through: `wanted`, or RoCE v2 with an IPv4-mapped address, then any
/// non-zero GID; InfiniBand ports (addressed by LID) use index 0.
fn choose_gid(
    ctx: &Context,
    port: u8,
    pattr: &ibv_port_attr,
    wanted: Option<u8>,
) -> Result<(u8, [u8; 16]), String> {
    let name = ctx.name();
    if let Some(index) = wanted {
        let gid = ctx
            .query_gid(port, u32::from(index))
            .map_err(|e| format!("GID {index} of {name} port {port}: {e}"))?;
        return Ok((index, gid_raw(&gid)));
    }
    let entries: Vec<(u8, [u8; 16])> = (0..pattr.gid_tbl_len.clamp(0, 256) as u32)
        .filter_map(|i| {
            Some((
                u8::try_from(i).ok()?,
                gid_raw(&ctx.query_gid(port, i).ok()?),
            ))
        })
        .filter(|(_, g)| g.iter().any(|&b| b != 0))
        .collect();
    if pattr.link_layer != IBV_LINK_LAYER_ETHERNET {
        return entries
            .first()
            .copied()
            .or(Some((0, [0; 16])))
            .ok_or_else(|| format!("{name} has no GID"));
    }
    // RoCE v2 (routable) with an IPv4-mapped address first: on ConnectX each address is
    // listed as RoCE v1 and again as v2, and v1 does not cross routers.
    let v2 =
        |index: u8| gid_type(&name, port, index).is_some_and(|t| t.eq_ignore_ascii_case("RoCE v2"));
    let mapped = |g: &[u8; 16]| Ipv6Addr::from(*g).to_ipv4_mapped().is_some();
    entries
        .iter()
        .find(|(i, g)| mapped(g) && v2(*i))
        .or_else(|| entries.iter().find(|(_, g)| mapped(g)))
        .or_else(|| entries.iter().find(|(i, _)| v2(*i)))
        .or(entries.first())
        .copied()
        .ok_or_else(|| {
            format!("{name} port {port} has no usable GID (no IP address on its netdev?)")
        })
}

/// The type sysfs gives GID `index` of `device` port `port` (`RoCE v2`, `IB/RoCE v1`).
fn gid_type(device: &str, port: u8, index: u8) -> Option<String> {
    let path = format!("/sys/class/infiniband/{device}/ports/{port}/gid_attrs/types/{index}");
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
}

/// The smaller of two MTUs.
pub fn path_mtu(a: ibv_mtu, b: ibv_mtu) -> ibv_mtu {
    if mtu_bytes(a).unwrap_or(0) <= mtu_bytes(b).unwrap_or(0) {
        a
    } else {
        b
    }
}
