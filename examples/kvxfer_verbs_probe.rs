//! Lists the RDMA devices through kvxfer's own verbs bindings — name, node GUID, ports
//! with state, active MTU, link layer and GIDs — or says exactly why there are none:
//! libibverbs missing, no kernel RDMA support, no devices.
//!
//! ```text
//! cargo run --release --example kvxfer_verbs_probe
//! ```
//!
//! Exit status: 0 when at least one device was listed, 1 when RDMA is unavailable.

use std::fs;
use std::net::Ipv6Addr;
use std::process::ExitCode;

use kvxfer::sys::verbs::{
    gid_raw, kernel_support, link_layer_name, mtu_bytes, port_state_name, Context, DeviceList,
    Verbs,
};

fn main() -> ExitCode {
    let verbs = match Verbs::load() {
        Ok(verbs) => verbs,
        Err(e) => return unavailable(&e.to_string()),
    };
    println!("library: {} loaded ({verbs:?})", verbs.library());

    let kernel = kernel_support();
    match &kernel {
        Ok(devices) => println!(
            "kernel: RDMA user verbs available, devices {}",
            devices.join(", ")
        ),
        Err(e) => {
            // Say what libibverbs itself answers too: it is what the engine will see.
            match DeviceList::new(verbs) {
                Ok(list) => println!(
                    "libibverbs: ibv_get_device_list lists {} device(s)",
                    list.len()
                ),
                Err(err) => println!("libibverbs: ibv_get_device_list failed: {err}"),
            }
            return unavailable(&e.to_string());
        }
    }

    let list = match DeviceList::new(verbs) {
        Ok(list) => list,
        Err(e) => return unavailable(&format!("ibv_get_device_list failed: {e}")),
    };
    if list.is_empty() {
        let hint = match &kernel {
            Ok(devices) => format!(
                "the kernel has {} but libibverbs lists none: is the provider library \
                 package (ibverbs-providers / rdma-core) installed?",
                devices.join(", ")
            ),
            Err(_) => String::new(),
        };
        return unavailable(&format!("no RDMA devices. {hint}"));
    }

    println!("{} device(s)", list.len());
    let mut listed = 0;
    for device in &list {
        let name = device.name();
        match device.open() {
            Ok(ctx) => {
                describe(&name, &ctx);
                listed += 1;
            }
            Err(e) => println!("{name}: ibv_open_device failed: {e}"),
        }
    }
    if listed == 0 {
        return unavailable("no device could be opened (see above)");
    }
    ExitCode::SUCCESS
}

fn unavailable(why: &str) -> ExitCode {
    println!("RDMA unavailable: {why}");
    ExitCode::FAILURE
}

/// Prints one open device: attributes, then each port with its GIDs.
fn describe(name: &str, ctx: &Context) {
    let attr = match ctx.query_device() {
        Ok(attr) => attr,
        Err(e) => {
            println!("{name}: ibv_query_device failed: {e}");
            return;
        }
    };
    let guid = u64::from_be(attr.node_guid);
    let fw: String = attr
        .fw_ver
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    println!(
        "{name}: node_guid {}, fw_ver {}, vendor {:#x}:{:#x}, ports {}, max_qp {}, max_qp_wr {}, \
         max_sge {}, max_cqe {}, max_mr_size {:#x}, max_qp_rd_atom {}",
        guid_string(guid),
        if fw.is_empty() { "-" } else { &fw },
        attr.vendor_id,
        attr.vendor_part_id,
        attr.phys_port_cnt,
        attr.max_qp,
        attr.max_qp_wr,
        attr.max_sge,
        attr.max_cqe,
        attr.max_mr_size,
        attr.max_qp_rd_atom,
    );
    for port in 1..=attr.phys_port_cnt {
        let p = match ctx.query_port(port) {
            Ok(p) => p,
            Err(e) => {
                println!("  port {port}: ibv_query_port failed: {e}");
                continue;
            }
        };
        let mtu = |m| mtu_bytes(m).map_or_else(|| format!("?({})", m.0), |b| b.to_string());
        println!(
            "  port {port}: {}, active_mtu {} (max {}), link_layer {}, lid {}, gid_tbl_len {}",
            port_state_name(p.state),
            mtu(p.active_mtu),
            mtu(p.max_mtu),
            link_layer_name(p.link_layer),
            p.lid,
            p.gid_tbl_len,
        );
        let mut failed = 0;
        for index in 0..u32::try_from(p.gid_tbl_len).unwrap_or(0) {
            let gid = match ctx.query_gid(port, index) {
                Ok(gid) => gid,
                Err(_) => {
                    failed += 1;
                    continue;
                }
            };
            let raw = gid_raw(&gid);
            if raw == [0; 16] {
                continue;
            }
            let addr = Ipv6Addr::from(raw);
            let v4 = addr
                .to_ipv4_mapped()
                .map(|v4| format!(" (IPv4 {v4})"))
                .unwrap_or_default();
            let sysfs = format!("/sys/class/infiniband/{name}/ports/{port}/gid_attrs");
            let gid_type = read_trimmed(&format!("{sysfs}/types/{index}"));
            let ndev = read_trimmed(&format!("{sysfs}/ndevs/{index}"));
            println!("    gid[{index}] {addr}{v4}  type {gid_type}  netdev {ndev}");
        }
        if failed > 0 {
            println!("    ({failed} GID entries could not be read)");
        }
    }
}

/// `0011:2233:4455:6677`, as ibv_devinfo prints GUIDs.
fn guid_string(guid: u64) -> String {
    format!(
        "{:04x}:{:04x}:{:04x}:{:04x}",
        (guid >> 48) & 0xffff,
        (guid >> 32) & 0xffff,
        (guid >> 16) & 0xffff,
        guid & 0xffff
    )
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}
