//! Discovery from sysfs trees: the fixtures under tests/fixtures/ (made by
//! tests/fixtures/make_sysfs_fixtures.py), damaged trees that must give errors naming
//! the bad file, trees corrupted file by file that must never panic, and this machine.

use std::fs;
use std::path::{Path, PathBuf};

use kvxfer::topology::{
    discover, pci_distance, LinkLayer, Nic, PortState, Topology, TopologyError,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name)
}

fn gpu8() -> Topology {
    discover(&fixture("gpu8")).expect("gpu8 is discoverable")
}

fn nic<'a>(t: &'a Topology, name: &str) -> &'a Nic {
    t.nics
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// GPU i: bus id; mlx5_i behind the same switch: bus id (gpu8, see the generator).
const GPU8_PAIRS: [(&str, &str); 8] = [
    ("0000:18:00.0", "0000:22:00.0"),
    ("0000:33:00.0", "0000:29:00.0"),
    ("0000:4b:00.0", "0000:55:00.0"),
    ("0000:66:00.0", "0000:5c:00.0"),
    ("0000:9a:00.0", "0000:a4:00.0"),
    ("0000:b5:00.0", "0000:ab:00.0"),
    ("0000:cb:00.0", "0000:d5:00.0"),
    ("0000:e6:00.0", "0000:dc:00.0"),
];

#[test]
fn gpu8_has_eight_gpus_in_bus_order_on_two_nodes() {
    let t = gpu8();
    assert_eq!(t.numa_nodes, vec![0, 1]);
    // The BMC's VGA (ASPEED) and the NVIDIA bridge-class function are not GPUs.
    assert_eq!(t.gpus.len(), 8);
    for (i, gpu) in t.gpus.iter().enumerate() {
        assert_eq!(gpu.index as usize, i);
        assert_eq!(gpu.bus_id, GPU8_PAIRS[i].0);
        assert_eq!(gpu.numa_node, Some(if i < 4 { 0 } else { 1 }), "GPU {i}");
        assert_eq!(
            gpu.pci_path.len(),
            5,
            "root complex, root port, 2 switch ports, GPU"
        );
        assert_eq!(gpu.pci_path.last(), Some(&gpu.bus_id));
    }
    assert_eq!(
        t.gpus[0].pci_path,
        strings(&[
            "pci0000:15",
            "0000:15:01.0",
            "0000:16:00.0",
            "0000:17:00.0",
            "0000:18:00.0"
        ])
    );
}

#[test]
fn gpu8_has_ten_roce_nics_with_ports_gids_and_mtu() {
    let t = gpu8();
    let names: Vec<&str> = t.nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7",
            "mlx5_8", "mlx5_9"
        ]
    );
    for (i, n) in t.nics.iter().enumerate() {
        let expected_node = if matches!(i, 0..=3 | 8) { 0 } else { 1 };
        assert_eq!(n.numa_node, Some(expected_node), "{}", n.name);
        let address = n.pci_address.as_deref().expect("a PCI NIC");
        assert_eq!(
            n.pci_path.last().map(String::as_str),
            Some(address),
            "{}",
            n.name
        );
        assert!(n.pci_path[0].starts_with("pci0000:"), "{:?}", n.pci_path);
        assert!(n.is_up());
        assert_eq!(n.ports.len(), 1);
        let port = &n.ports[0];
        assert_eq!(port.number, 1);
        assert_eq!(port.state, PortState::Active);
        assert_eq!(port.link_layer, LinkLayer::Ethernet);
        assert_eq!(port.mtu, Some(9000), "{}", n.name);
        // Indices 2 and 3 are empty (all-zero) entries and are left out.
        assert_eq!(port.gids.len(), 2, "{}: {:?}", n.name, port.gids);
        let (index, gid, kind) = &port.gids[0];
        assert_eq!(*index, 0);
        assert!(gid.starts_with("fe80:0000:0000:0000:"), "{gid}");
        assert_eq!(kind.as_deref(), Some("IB/RoCE v1"));
        let (index, gid, kind) = &port.gids[1];
        assert_eq!(*index, 1);
        assert_eq!(
            *gid,
            format!("0000:0000:0000:0000:0000:ffff:0a00:{i:02x}01")
        );
        assert_eq!(kind.as_deref(), Some("RoCE v2"));
    }
    for (i, (_, nic_bus)) in GPU8_PAIRS.iter().enumerate() {
        let n = nic(&t, &format!("mlx5_{i}"));
        assert_eq!(n.pci_address.as_deref(), Some(*nic_bus));
        assert_eq!(n.pci_path.len(), 5, "{}: behind a switch", n.name);
    }
    for (name, bus) in [("mlx5_8", "0000:38:00.0"), ("mlx5_9", "0000:b8:00.0")] {
        let n = nic(&t, name);
        assert_eq!(n.pci_address.as_deref(), Some(bus));
        assert_eq!(n.pci_path.len(), 3, "{name}: directly on a root port");
    }
    assert_eq!(
        nic(&t, "mlx5_8").pci_path,
        strings(&["pci0000:37", "0000:37:01.0", "0000:38:00.0"])
    );
}

#[test]
fn gpu8_each_gpu_is_nearest_to_the_nic_behind_its_switch() {
    let t = gpu8();
    for gpu in &t.gpus {
        let own = nic(&t, &format!("mlx5_{}", gpu.index));
        let d_own = pci_distance(&gpu.pci_path, &own.pci_path);
        assert_eq!(
            d_own, 4,
            "GPU {} and {}: up two switch ports and down",
            gpu.index, own.name
        );
        for other in t.nics.iter().filter(|n| n.name != own.name) {
            let d = pci_distance(&gpu.pci_path, &other.pci_path);
            assert!(
                d > d_own,
                "GPU {}: {} at {d}, {} at {d_own}",
                gpu.index,
                other.name,
                own.name
            );
        }
        for storage in ["mlx5_8", "mlx5_9"] {
            let d = pci_distance(&gpu.pci_path, &nic(&t, storage).pci_path);
            assert_eq!(
                d, 8,
                "GPU {} to {storage}: different root complexes",
                gpu.index
            );
        }
    }
}

#[test]
fn gpu8_bus_numbers_alone_would_pair_wrongly() {
    // The fixture is built so only the PCI tree pairs GPUs with NICs.
    let t = gpu8();
    let bus = |address: &str| u8::from_str_radix(&address[5..7], 16).unwrap();
    let mut by_bus: Vec<&Nic> = t.nics.iter().collect();
    by_bus.sort_by_key(|n| bus(n.pci_address.as_deref().unwrap()));
    let zipped: Vec<&str> = by_bus.iter().take(8).map(|n| n.name.as_str()).collect();
    assert_ne!(
        zipped,
        ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7"]
    );
    let nearest_by_number = |gpu_bus: u8| {
        t.nics
            .iter()
            .min_by_key(|n| bus(n.pci_address.as_deref().unwrap()).abs_diff(gpu_bus))
            .map(|n| n.name.clone())
            .unwrap()
    };
    let wrong = t
        .gpus
        .iter()
        .filter(|g| nearest_by_number(bus(&g.bus_id)) != format!("mlx5_{}", g.index))
        .count();
    assert!(
        wrong >= 2,
        "only {wrong} GPUs would be paired wrongly by bus number"
    );
}

#[test]
fn one_nic_is_an_infiniband_nic_without_gpus() {
    let t = discover(&fixture("one_nic")).unwrap();
    assert_eq!(t.numa_nodes, vec![0]);
    assert!(t.gpus.is_empty());
    assert_eq!(t.nics.len(), 1);
    let n = &t.nics[0];
    assert_eq!(n.name, "mlx5_0");
    assert_eq!(n.pci_address.as_deref(), Some("0000:01:00.0"));
    assert_eq!(
        n.pci_path,
        strings(&["pci0000:00", "0000:00:01.0", "0000:01:00.0"])
    );
    assert_eq!(n.numa_node, Some(0));
    assert_eq!(n.ports.len(), 1);
    let p = &n.ports[0];
    assert_eq!(
        (p.number, p.state, p.link_layer),
        (1, PortState::Active, LinkLayer::InfiniBand)
    );
    assert_eq!(
        p.gids,
        vec![(
            0,
            "fe80:0000:0000:0000:b859:9f03:00a1:b2c3".to_string(),
            Some("IB/RoCE v1".to_string())
        )]
    );
    // The IPoIB interface (mtu 4092) says nothing about the RDMA MTU.
    assert_eq!(p.mtu, None);
}

#[test]
fn no_nic_has_one_vga_gpu_and_no_nics() {
    let t = discover(&fixture("no_nic")).unwrap();
    assert!(t.nics.is_empty());
    assert_eq!(t.numa_nodes, vec![0]);
    // The GPU's HDMI audio function (NVIDIA, class 0x0403) is not a GPU.
    assert_eq!(t.gpus.len(), 1);
    let g = &t.gpus[0];
    assert_eq!((g.index, g.bus_id.as_str()), (0, "0000:01:00.0"));
    assert_eq!(g.numa_node, None, "numa_node -1");
    assert_eq!(
        g.pci_path,
        strings(&["pci0000:00", "0000:00:01.0", "0000:01:00.0"])
    );
}

#[test]
fn ports_down_reports_the_down_port() {
    let t = discover(&fixture("ports_down")).unwrap();
    assert_eq!(t.nics.len(), 2);
    let (up, down) = (&t.nics[0], &t.nics[1]);
    assert_eq!((up.name.as_str(), down.name.as_str()), ("mlx5_0", "mlx5_1"));
    assert!(up.is_up());
    assert!(!down.is_up());
    assert_eq!(down.ports[0].state, PortState::Down);
    assert_eq!(up.ports[0].mtu, Some(1500));
    assert_eq!(down.ports[0].mtu, Some(1500));
}

#[derive(Debug, PartialEq)]
enum Kind {
    Read,
    Malformed,
}

/// Every damaged tree: its error kind, the file it must name (path suffix), and the
/// content the message must quote (Malformed).
const DAMAGED: &[(&str, Kind, &str, &str)] = &[
    (
        "bad_port_state",
        Kind::Malformed,
        "mlx5_0/ports/1/state",
        "\"banana\"",
    ),
    (
        "bad_state_number",
        Kind::Malformed,
        "mlx5_0/ports/1/state",
        "\"9: ACTIVE\"",
    ),
    ("missing_port_state", Kind::Read, "mlx5_0/ports/1/state", ""),
    (
        "bad_link_layer",
        Kind::Malformed,
        "ports/1/link_layer",
        "\"Token Ring\"",
    ),
    (
        "binary_garbage",
        Kind::Malformed,
        "ports/1/link_layer",
        "not text",
    ),
    (
        "bad_port_dir_name",
        Kind::Malformed,
        "mlx5_0/ports/abc",
        "\"abc\"",
    ),
    (
        "bad_gid",
        Kind::Malformed,
        "ports/1/gids/1",
        "\"not-a-gid\"",
    ),
    (
        "bad_gid_index",
        Kind::Malformed,
        "ports/1/gids/x1",
        "\"x1\"",
    ),
    (
        "bad_ndev_name",
        Kind::Malformed,
        "ports/1/gid_attrs/ndevs/0",
        "\"../../../etc\"",
    ),
    (
        "bad_mtu",
        Kind::Malformed,
        "sys/class/net/enp1s0np0/mtu",
        "\"nine thousand\"",
    ),
    (
        "bad_nic_numa",
        Kind::Malformed,
        "mlx5_0/device/numa_node",
        "\"x\"",
    ),
    (
        "dangling_device",
        Kind::Read,
        "infiniband/mlx5_0/device",
        "",
    ),
    ("device_loop", Kind::Read, "infiniband/mlx5_0/device", ""),
    (
        "dangling_class_link",
        Kind::Read,
        "sys/class/infiniband/mlx5_0",
        "",
    ),
    (
        "bad_gpu_vendor",
        Kind::Malformed,
        "devices/0000:02:00.0/vendor",
        "\"0xzzzz\"",
    ),
    (
        "bad_gpu_class",
        Kind::Malformed,
        "devices/0000:02:00.0/class",
        "\"banana\"",
    ),
    (
        "bad_gpu_numa",
        Kind::Malformed,
        "devices/0000:02:00.0/numa_node",
        "\"two\"",
    ),
    (
        "missing_gpu_class",
        Kind::Read,
        "devices/0000:02:00.0/class",
        "",
    ),
];

#[test]
fn every_damaged_tree_gives_an_error_naming_the_file() {
    for (case, kind, file, quoted) in DAMAGED {
        let root = fixture("damaged").join(case);
        assert!(root.is_dir(), "missing fixture {}", root.display());
        let err = discover(&root).expect_err(case);
        let text = err.to_string();
        let (got, path) = match &err {
            TopologyError::Read { path, .. } => (Kind::Read, path),
            TopologyError::Malformed { path, .. } => (Kind::Malformed, path),
            other => panic!("{case}: unexpected {other:?}"),
        };
        assert_eq!(&got, kind, "{case}: {text}");
        assert!(
            path.ends_with(file),
            "{case}: {} does not end with {file}",
            path.display()
        );
        assert!(text.contains(file), "{case}: {text}");
        assert!(
            text.contains(quoted),
            "{case}: {text} does not quote {quoted}"
        );
    }
}

#[test]
fn every_damaged_tree_has_a_case_here() {
    let mut on_disk: Vec<String> = fs::read_dir(fixture("damaged"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = DAMAGED.iter().map(|d| d.0.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}

#[test]
fn every_fixture_tree_is_discovered_without_panic() {
    for name in ["gpu8", "one_nic", "no_nic", "ports_down"] {
        discover(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("kvxfer-topology-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copies a tree, symlinks as symlinks; collects regular files and symlinks (relative).
fn copy_tree(
    from: &Path,
    to: &Path,
    rel: &Path,
    files: &mut Vec<PathBuf>,
    links: &mut Vec<PathBuf>,
) {
    for entry in fs::read_dir(from.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let rel = rel.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), to.join(&rel))
                .unwrap();
            links.push(rel);
        } else if kind.is_dir() {
            fs::create_dir_all(to.join(&rel)).unwrap();
            copy_tree(from, to, &rel, files, links);
        } else {
            fs::copy(entry.path(), to.join(&rel)).unwrap();
            files.push(rel);
        }
    }
}

/// The damaged trees share one small base (a RoCE NIC and a GPU); `bad_gpu_vendor` with
/// its vendor file repaired is that base.
fn sound_base(scratch: &Scratch) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut files, mut links) = (Vec::new(), Vec::new());
    copy_tree(
        &fixture("damaged/bad_gpu_vendor"),
        &scratch.0,
        Path::new(""),
        &mut files,
        &mut links,
    );
    let vendor = scratch
        .0
        .join("sys/devices/pci0000:00/0000:00:02.0/0000:02:00.0/vendor");
    fs::write(vendor, "0x10de\n").unwrap();
    files.sort();
    links.sort();
    (files, links)
}

#[test]
fn the_damaged_trees_base_is_sound() {
    let scratch = Scratch::new("base");
    sound_base(&scratch);
    let t = discover(&scratch.0).expect("the base of the damaged trees is sound");
    assert_eq!(t.numa_nodes, vec![0]);
    assert_eq!(t.gpus.len(), 1);
    assert_eq!(t.nics.len(), 1);
    let port = &t.nics[0].ports[0];
    assert_eq!(
        (port.state, port.mtu, port.gids.len()),
        (PortState::Active, Some(9000), 2)
    );
}

#[test]
fn the_mtu_falls_back_to_the_devices_own_netdev() {
    let scratch = Scratch::new("mtu");
    sound_base(&scratch);
    let port = scratch.0.join("sys/class/infiniband/mlx5_0/ports/1");
    fs::remove_dir_all(port.join("gid_attrs/ndevs")).unwrap();
    let t = discover(&scratch.0).unwrap();
    assert_eq!(
        t.nics[0].ports[0].mtu,
        Some(9000),
        "from device/net/enp1s0np0/mtu"
    );
    // Without any netdev, the MTU is unknown.
    fs::remove_dir_all(scratch.0.join("sys/class/infiniband/mlx5_0/device/net")).unwrap();
    assert_eq!(discover(&scratch.0).unwrap().nics[0].ports[0].mtu, None);
}

#[test]
fn a_nic_without_a_parent_device_is_not_pci() {
    // Soft-RoCE (rxe) and siw devices have no PCI function behind them.
    let scratch = Scratch::new("rxe");
    sound_base(&scratch);
    fs::remove_file(scratch.0.join("sys/class/infiniband/mlx5_0/device")).unwrap();
    let t = discover(&scratch.0).unwrap();
    let n = &t.nics[0];
    assert_eq!(
        (n.pci_address.as_deref(), n.pci_path.len(), n.numa_node),
        (None, 0, None)
    );
    assert_eq!(
        n.ports[0].mtu,
        Some(9000),
        "still found through gid_attrs/ndevs"
    );
}

#[test]
fn corrupting_any_file_or_link_gives_a_result_not_a_panic() {
    let scratch = Scratch::new("corrupt");
    let (files, links) = sound_base(&scratch);
    assert!(
        files.len() > 15 && links.len() > 5,
        "{} files, {} links",
        files.len(),
        links.len()
    );
    let long = "7".repeat(10_000);
    let garbage: [&[u8]; 9] = [
        b"",
        b"\n",
        b"\xff\xfe\x00",
        b"-1\n",
        b"99999999999999999999\n",
        b"4: ACTIVE\n",
        b"0000:0000:0000:0000:0000:0000:0000:0000\n",
        b"../../..\n",
        long.as_bytes(),
    ];
    let mut errors = 0;
    for rel in &files {
        let path = scratch.0.join(rel);
        let original = fs::read(&path).unwrap();
        for bad in garbage {
            fs::write(&path, bad).unwrap();
            errors += usize::from(discover(&scratch.0).is_err());
        }
        fs::remove_file(&path).unwrap();
        errors += usize::from(discover(&scratch.0).is_err());
        fs::write(&path, original).unwrap();
    }
    for rel in &links {
        let path = scratch.0.join(rel);
        let original = fs::read_link(&path).unwrap();
        let name = path.file_name().unwrap().to_owned();
        for target in [
            Path::new("nowhere"),
            Path::new(&name),
            Path::new("/"),
            Path::new(".."),
        ] {
            fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink(target, &path).unwrap();
            errors += usize::from(discover(&scratch.0).is_err());
        }
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(original, &path).unwrap();
    }
    assert!(errors > 0);
    discover(&scratch.0).expect("restored");
}

#[test]
fn an_empty_root_has_nothing_and_a_missing_root_is_an_error() {
    let scratch = Scratch::new("empty");
    assert_eq!(discover(&scratch.0).unwrap(), Topology::default());
    let missing = scratch.0.join("no/such/root");
    match discover(&missing) {
        Err(TopologyError::Read { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
}

#[test]
fn this_machine_is_discovered() {
    let t = discover(Path::new("/")).expect("discovery of / succeeds");
    // This development machine has no RDMA hardware; elsewhere, one NIC per entry.
    let expected = fs::read_dir("/sys/class/infiniband").map_or(0, |d| d.count());
    assert_eq!(t.nics.len(), expected, "{:?}", t.nics);
    if Path::new("/sys/devices/system/node/node0").exists() {
        assert!(t.numa_nodes.contains(&0), "{:?}", t.numa_nodes);
    }
    for (i, gpu) in t.gpus.iter().enumerate() {
        assert_eq!(gpu.index as usize, i);
        assert_eq!(gpu.pci_path.last(), Some(&gpu.bus_id), "{gpu:?}");
    }
}
