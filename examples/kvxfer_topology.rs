//! Prints the RDMA NICs, GPUs and NUMA nodes of a host and the NIC priority matrix built
//! from them (as a table and as Mooncake-format JSON).
//!
//! Run: `cargo run --example kvxfer_topology -- [--root SYSFS_ROOT] [--devices LIST]`
//! (`--root` defaults to `/`; `--devices` takes any device-list form: `mlx5_0,mlx5_1`, a
//! per-GPU JSON map, a `.json` file, or `auto`).

use std::path::PathBuf;
use std::process::ExitCode;

use kvxfer::topology::{discover, DeviceList, PriorityMatrix};

/// Prints kvxfer's warnings (a device skipped, and why) to stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    static LOGGER: StderrLog = StderrLog;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvxfer_topology: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut root = PathBuf::from("/");
    let mut devices = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--root" => root = args.next().ok_or("--root needs a path")?.into(),
            "--devices" => devices = args.next().ok_or("--devices needs a list")?,
            "-h" | "--help" => {
                println!("usage: kvxfer_topology [--root SYSFS_ROOT] [--devices LIST]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    let topology = discover(&root)?;
    let list = DeviceList::parse(&devices)?;
    list.validate(&topology)?;

    println!("sysfs root {}", root.display());
    let nodes: Vec<String> = topology.numa_nodes.iter().map(u32::to_string).collect();
    println!(
        "NUMA nodes: {}",
        if nodes.is_empty() {
            "none reported".into()
        } else {
            nodes.join(", ")
        }
    );
    if topology.nics.is_empty() {
        println!("RDMA NICs: none. This host has no RDMA devices (nothing under sys/class/infiniband); transfers will use shared memory or TCP.");
    } else {
        println!("RDMA NICs:");
        println!("  {:<10} {:<14} {:>4}  ports", "name", "pci", "numa");
        for nic in &topology.nics {
            let ports: Vec<String> = nic
                .ports
                .iter()
                .map(|p| {
                    let mtu = p.mtu.map_or(String::new(), |m| format!(" mtu {m}"));
                    format!(
                        "{}:{} {}{} ({} gids)",
                        p.number,
                        p.state,
                        p.link_layer,
                        mtu,
                        p.gids.len()
                    )
                })
                .collect();
            println!(
                "  {:<10} {:<14} {:>4}  {}",
                nic.name,
                nic.pci_address.as_deref().unwrap_or("-"),
                nic.numa_node.map_or("-".into(), |n| n.to_string()),
                ports.join("; ")
            );
        }
    }
    if topology.gpus.is_empty() {
        println!("NVIDIA GPUs: none");
    } else {
        println!("NVIDIA GPUs:");
        for gpu in &topology.gpus {
            let node = gpu.numa_node.map_or("-".into(), |n| n.to_string());
            println!("  cuda:{:<3} {}  numa {}", gpu.index, gpu.bus_id, node);
        }
    }
    let matrix = PriorityMatrix::build(&topology, &list);
    if matrix.is_empty() {
        println!("priority matrix: empty (no usable RDMA NIC), so RDMA is not used on this host");
        return Ok(());
    }
    println!(
        "priority matrix ({}):",
        if devices.is_empty() { "auto" } else { &devices }
    );
    println!("  {:<8} {:<40} fallback", "memory", "preferred");
    for (location, p) in matrix.entries() {
        let show = |names: &[String]| {
            if names.is_empty() {
                "-".to_string()
            } else {
                names.join(",")
            }
        };
        println!(
            "  {:<8} {:<40} {}",
            location.to_string(),
            show(&p.preferred),
            show(&p.fallback)
        );
    }
    println!("{}", matrix.to_json());
    Ok(())
}
