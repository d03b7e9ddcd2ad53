//! Discovery from a sysfs root: RDMA NICs from `sys/class/infiniband`, NVIDIA GPUs from
//! `sys/bus/pci/devices`, NUMA nodes from `sys/devices/system/node`.
//!
//! Plain file reads only (no libibverbs, no CUDA), so it runs anywhere, and the root is a
//! parameter so tests point it at fixture trees (`tests/fixtures/`, made by
//! `tests/fixtures/make_sysfs_fixtures.py`).
//!
//! What is absent is normal: a host without `sys/class/infiniband` has no NICs, one
//! without `sys/devices/system/node` reports no NUMA nodes, an attribute the kernel did
//! not create (a GID's type, a netdev's MTU, `numa_node`) is `None`. What is present but
//! is not what the kernel writes (a state of `banana`, a `numa_node` of `x`, a port
//! directory named `abc`) is [`TopologyError::Malformed`], naming the file and quoting
//! its content; a file every such device has (`ports/<n>/state`, `link_layer`, a PCI
//! function's `vendor` and `class`) that cannot be read is [`TopologyError::Read`].
//! Formats follow the kernel's `drivers/infiniband/core/sysfs.c` and
//! `drivers/pci/pci-sysfs.c`.

use std::cmp::Ordering;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::{Gpu, LinkLayer, Nic, Port, PortState, Topology, TopologyError};

/// PCI vendor id of NVIDIA.
const NVIDIA_VENDOR: u32 = 0x10de;
/// PCI base class of display controllers (VGA 0x0300, 3D 0x0302, other 0x0380).
const DISPLAY_CLASS: u32 = 0x03;
/// Longest attribute file read; sysfs attributes are at most a page.
const MAX_ATTR_BYTES: u64 = 4096;
/// Longest content quoted in an error message.
const MAX_QUOTED_CHARS: usize = 64;
/// A network interface name is at most `IFNAMSIZ - 1` bytes.
const MAX_NETDEV_NAME: usize = 15;

/// Discovers NICs, GPUs and NUMA nodes under `root` (`/` for this machine).
///
/// NICs come sorted by name in natural order (`mlx5_2` before `mlx5_10`), their ports by
/// number, and GPUs by PCI bus id with [`Gpu::index`] their position in that order.
/// [`Port::mtu`] is the MTU of the port's network device for RoCE (`Ethernet`) ports; it
/// is `None` for InfiniBand ports, whose IPoIB interface MTU says nothing about the RDMA
/// path MTU.
///
/// # Errors
///
/// [`TopologyError::Read`] when `root` does not exist, or a file that every such device
/// has cannot be read (a port without `state`, a dangling `device` link);
/// [`TopologyError::Malformed`] when a file holds something the kernel never writes there.
/// One bad device fails the whole discovery: a half-read topology would silently steer
/// traffic away from the devices it missed.
pub fn discover(root: &Path) -> Result<Topology, TopologyError> {
    let sys = Sysfs::new(root)?;
    Ok(Topology {
        numa_nodes: sys.numa_nodes()?,
        nics: sys.nics()?,
        gpus: sys.gpus()?,
    })
}

/// Hops between two devices through their closest common ancestor in the PCI tree:
/// `(a.len() - common) + (b.len() - common)` where `common` is the length of the common
/// prefix of the two resolved PCI paths ([`Nic::pci_path`], [`Gpu::pci_path`]).
///
/// A device and its sibling behind the same PCIe switch are 4 hops apart (device →
/// downstream port → upstream port, down again); devices under different root complexes
/// share no component and get the sum of both path lengths: they meet only at the CPU.
/// An empty path (a device that is not PCI) therefore compares as "directly on the CPU";
/// callers that can tell should treat it as unknown instead.
pub fn pci_distance(a: &[String], b: &[String]) -> u32 {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let hops = (a.len() - common).saturating_add(b.len() - common);
    u32::try_from(hops).unwrap_or(u32::MAX)
}

/// A sysfs tree being read.
struct Sysfs {
    /// The root as given (paths in errors are under it).
    root: PathBuf,
    /// `<canonical root>/sys/devices`, the prefix stripped from resolved device paths.
    devices: PathBuf,
}

impl Sysfs {
    fn new(root: &Path) -> Result<Self, TopologyError> {
        let canonical = fs::canonicalize(root).map_err(|e| read_error(root, e))?;
        Ok(Sysfs {
            root: root.to_path_buf(),
            devices: canonical.join("sys").join("devices"),
        })
    }

    /// NUMA nodes from `sys/devices/system/node/node<N>`.
    fn numa_nodes(&self) -> Result<Vec<u32>, TopologyError> {
        let dir = self.root.join("sys/devices/system/node");
        let mut nodes: Vec<u32> = list_dir(&dir)?
            .unwrap_or_default()
            .iter()
            // Other entries (online, possible, has_cpu, power, ...) are not nodes.
            .filter_map(|(name, _)| name.strip_prefix("node"))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|n| n.parse().ok())
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        Ok(nodes)
    }

    /// RDMA devices from `sys/class/infiniband/*`.
    fn nics(&self) -> Result<Vec<Nic>, TopologyError> {
        let dir = self.root.join("sys/class/infiniband");
        let Some(entries) = list_dir(&dir)? else {
            return Ok(Vec::new());
        };
        let mut nics = entries
            .into_iter()
            .map(|(name, path)| self.nic(name, &path))
            .collect::<Result<Vec<_>, _>>()?;
        nics.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        Ok(nics)
    }

    fn nic(&self, name: String, entry: &Path) -> Result<Nic, TopologyError> {
        // The class entry is a link into sys/devices; a dangling one is a broken device.
        fs::canonicalize(entry).map_err(|e| read_error(entry, e))?;
        let device = entry.join("device");
        let (pci_address, pci_path, numa_node) = match fs::symlink_metadata(&device) {
            // No parent device (soft-RoCE, siw): not PCI, no NUMA node.
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, Vec::new(), None),
            Err(e) => return Err(read_error(&device, e)),
            Ok(_) => {
                let resolved = fs::canonicalize(&device).map_err(|e| read_error(&device, e))?;
                let (address, path) = self.pci_location(&resolved);
                (address, path, read_numa_node(&device.join("numa_node"))?)
            }
        };

        let ports_dir = entry.join("ports");
        let mut ports = Vec::new();
        for (port_name, port_path) in read_dir_sorted(&ports_dir)? {
            let number = port_name.parse::<u32>().map_err(|_| {
                malformed(
                    &port_path,
                    format!(
                        "port directory name {} is not a port number",
                        quote(&port_name)
                    ),
                )
            })?;
            ports.push(self.port(number, &port_path, &device)?);
        }
        ports.sort_by_key(|p| p.number);
        Ok(Nic {
            name,
            pci_address,
            pci_path,
            numa_node,
            ports,
        })
    }

    fn port(&self, number: u32, dir: &Path, device: &Path) -> Result<Port, TopologyError> {
        let state = parse_file(&dir.join("state"), parse_port_state)?;
        let link_layer = parse_file(&dir.join("link_layer"), parse_link_layer)?;

        let gids_dir = dir.join("gids");
        let mut gids = Vec::new();
        for (index_name, gid_path) in list_dir(&gids_dir)?.unwrap_or_default() {
            let index = index_name.parse::<u32>().map_err(|_| {
                malformed(
                    &gid_path,
                    format!("GID file name {} is not a GID index", quote(&index_name)),
                )
            })?;
            // Older kernels refuse (EINVAL) to show an empty entry: same as all zeros.
            let Some(text) = read_lenient(&gid_path)? else {
                log::debug!(
                    "{}: unreadable, taken as an empty GID entry",
                    gid_path.display()
                );
                continue;
            };
            let Some(gid) = parse_gid(&text).map_err(|reason| malformed(&gid_path, reason))? else {
                continue;
            };
            // The kernel refuses to show the type of an invalid entry: unknown then.
            let gid_type = read_lenient(&dir.join("gid_attrs/types").join(&index_name))?
                .filter(|t| !t.is_empty());
            gids.push((index, gid, gid_type));
        }
        gids.sort_by_key(|g| g.0);

        let mtu = match link_layer {
            LinkLayer::Ethernet => self.port_mtu(number, dir, device, &gids)?,
            // The IPoIB MTU is not the RDMA path MTU; EFA and others do not say.
            LinkLayer::InfiniBand | LinkLayer::Unspecified => None,
        };
        Ok(Port {
            number,
            state,
            link_layer,
            gids,
            mtu,
        })
    }

    /// MTU of a RoCE port's netdev: the netdev named by the first GID that names one
    /// (`gid_attrs/ndevs/<i>` → `sys/class/net/<ndev>/mtu`), else the device's own
    /// `device/net/*` interface (the only one, or the one whose `dev_port` is this port).
    fn port_mtu(
        &self,
        number: u32,
        dir: &Path,
        device: &Path,
        gids: &[(u32, String, Option<String>)],
    ) -> Result<Option<u32>, TopologyError> {
        for (index, _, _) in gids {
            let ndev_file = dir.join("gid_attrs/ndevs").join(index.to_string());
            let Some(ndev) = read_lenient(&ndev_file)? else {
                continue;
            };
            if !is_netdev_name(&ndev) {
                return Err(malformed(
                    &ndev_file,
                    format!("{} is not a network interface name", quote(&ndev)),
                ));
            }
            let mtu_file = self.root.join("sys/class/net").join(&ndev).join("mtu");
            if let Some(mtu) = read_mtu(&mtu_file)? {
                return Ok(Some(mtu));
            }
        }

        let Some(netdevs) = list_dir(&device.join("net"))? else {
            return Ok(None);
        };
        if let [(_, only)] = netdevs.as_slice() {
            return read_mtu(&only.join("mtu"));
        }
        for (_, netdev) in &netdevs {
            let dev_port_file = netdev.join("dev_port");
            let Some(text) = read_optional(&dev_port_file)? else {
                continue;
            };
            let dev_port = text.parse::<u32>().map_err(|_| {
                malformed(
                    &dev_port_file,
                    format!("{} is not a port index", quote(&text)),
                )
            })?;
            // dev_port counts from 0, RDMA port numbers from 1.
            if dev_port.checked_add(1) == Some(number) {
                return read_mtu(&netdev.join("mtu"));
            }
        }
        Ok(None)
    }

    /// NVIDIA GPUs (vendor 0x10de, class VGA or 3D) from `sys/bus/pci/devices/*`.
    fn gpus(&self) -> Result<Vec<Gpu>, TopologyError> {
        let dir = self.root.join("sys/bus/pci/devices");
        let mut found = Vec::new();
        for (name, entry) in list_dir(&dir)?.unwrap_or_default() {
            let vendor = parse_file(&entry.join("vendor"), |t| parse_hex(t, 0xffff))?;
            if vendor != NVIDIA_VENDOR {
                continue;
            }
            let class = parse_file(&entry.join("class"), |t| parse_hex(t, 0xff_ffff))?;
            // Any display controller (0x03xxxx): VGA, 3D, and "other display" (0x0380).
            if class >> 16 != DISPLAY_CLASS {
                continue;
            }
            let Some(key) = pci_address_key(&name) else {
                return Err(malformed(
                    &entry,
                    format!("PCI device entry {} is not a PCI address", quote(&name)),
                ));
            };
            let resolved = fs::canonicalize(&entry).map_err(|e| read_error(&entry, e))?;
            let (_, pci_path) = self.pci_location(&resolved);
            let numa_node = read_numa_node(&entry.join("numa_node"))?;
            found.push((key, name, pci_path, numa_node));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        Ok(found
            .into_iter()
            .zip(0u32..)
            .map(|((_, bus_id, pci_path, numa_node), index)| Gpu {
                index,
                bus_id,
                pci_path,
                numa_node,
            })
            .collect())
    }

    /// The PCI address and PCI path of a resolved device directory: the components below
    /// `sys/devices` that are root complexes (`pci0000:15`) or PCI addresses
    /// (`0000:16:00.0`). A device whose own directory is not a PCI function has neither.
    fn pci_location(&self, resolved: &Path) -> (Option<String>, Vec<String>) {
        let below = resolved.strip_prefix(&self.devices).unwrap_or(resolved);
        let address = resolved
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| pci_address_key(n).is_some())
            .map(str::to_owned);
        if address.is_none() {
            return (None, Vec::new());
        }
        let path = below
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .filter(|s| is_pci_root(s) || pci_address_key(s).is_some())
            .map(str::to_owned)
            .collect();
        (address, path)
    }
}

// --- file access -----------------------------------------------------------------------

fn read_error(path: &Path, source: io::Error) -> TopologyError {
    TopologyError::Read {
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

fn malformed(path: &Path, reason: String) -> TopologyError {
    TopologyError::Malformed {
        path: path.to_path_buf(),
        reason,
    }
}

/// Content for an error message: quoted, escaped, cut to a readable length.
fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(MAX_QUOTED_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}...")
    } else {
        format!("{head:?}")
    }
}

/// The content of an attribute file, trimmed, or the I/O error. At most
/// [`MAX_ATTR_BYTES`]; longer or non-UTF-8 content is malformed.
fn read_attr(path: &Path) -> Result<Result<String, io::Error>, TopologyError> {
    // Opening a FIFO (or a device) planted in a damaged tree would block or worse.
    match fs::metadata(path) {
        Err(e) => return Ok(Err(e)),
        Ok(meta) if !meta.is_file() => {
            return Err(malformed(
                path,
                "not a regular file, not a sysfs attribute".into(),
            ))
        }
        Ok(_) => {}
    }
    let mut bytes = Vec::new();
    let read =
        fs::File::open(path).and_then(|f| f.take(MAX_ATTR_BYTES + 1).read_to_end(&mut bytes));
    if let Err(e) = read {
        return Ok(Err(e));
    }
    if bytes.len() as u64 > MAX_ATTR_BYTES {
        return Err(malformed(
            path,
            format!("more than {MAX_ATTR_BYTES} bytes, not a sysfs attribute"),
        ));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Ok(text.trim().to_owned())),
        Err(e) => Err(malformed(
            path,
            format!(
                "not text: {}",
                quote(&String::from_utf8_lossy(e.as_bytes()))
            ),
        )),
    }
}

/// A file that must exist.
fn read_required(path: &Path) -> Result<String, TopologyError> {
    read_attr(path)?.map_err(|e| read_error(path, e))
}

/// A file that may be absent (`None`); other read errors are errors.
fn read_optional(path: &Path) -> Result<Option<String>, TopologyError> {
    match read_attr(path)? {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_error(path, e)),
    }
}

/// A file the kernel may refuse to show (GID attributes of empty entries, the netdev of
/// an InfiniBand GID): any read error is `None`; malformed content is still an error.
fn read_lenient(path: &Path) -> Result<Option<String>, TopologyError> {
    Ok(read_attr(path)?.ok())
}

/// Reads a file that must exist and parses it; a parse failure names file and reason.
fn parse_file<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, TopologyError> {
    let text = read_required(path)?;
    parse(&text).map_err(|reason| malformed(path, reason))
}

fn read_numa_node(path: &Path) -> Result<Option<u32>, TopologyError> {
    match read_optional(path)? {
        Some(text) => parse_numa_node(&text).map_err(|reason| malformed(path, reason)),
        None => Ok(None),
    }
}

fn read_mtu(path: &Path) -> Result<Option<u32>, TopologyError> {
    match read_optional(path)? {
        Some(text) => parse_mtu(&text)
            .map(Some)
            .map_err(|reason| malformed(path, reason)),
        None => Ok(None),
    }
}

/// A directory's entries as (name, path), sorted by name; `None` when it does not exist.
fn list_dir(dir: &Path) -> Result<Option<Vec<(String, PathBuf)>>, TopologyError> {
    match read_dir_sorted(dir) {
        Ok(entries) => Ok(Some(entries)),
        Err(TopologyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A directory that must exist, as (name, path) sorted by name.
fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, PathBuf)>, TopologyError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| read_error(dir, e))? {
        let entry = entry.map_err(|e| read_error(dir, e))?;
        let path = entry.path();
        let Ok(name) = entry.file_name().into_string() else {
            return Err(malformed(&path, "the file name is not UTF-8".to_owned()));
        };
        entries.push((name, path));
    }
    entries.sort();
    Ok(entries)
}

// --- parsers ---------------------------------------------------------------------------

/// `ports/<n>/state`: `"<number>: <NAME>"` as the kernel writes it ("4: ACTIVE").
/// The number decides; the name must agree with it. State 0 ("NOP", no state yet) is
/// taken as DOWN: the port cannot carry traffic.
fn parse_port_state(text: &str) -> Result<PortState, String> {
    let bad = || format!("{} is not a port state such as \"4: ACTIVE\"", quote(text));
    let (number, name) = text.split_once(':').ok_or_else(bad)?;
    let (number, name) = (number.trim(), name.trim());
    let (state, expected) = match number {
        "0" => (PortState::Down, "NOP"),
        "1" => (PortState::Down, "DOWN"),
        "2" => (PortState::Init, "INIT"),
        "3" => (PortState::Armed, "ARMED"),
        "4" => (PortState::Active, "ACTIVE"),
        "5" => (PortState::ActiveDefer, "ACTIVE_DEFER"),
        _ => return Err(bad()),
    };
    if name != expected {
        return Err(bad());
    }
    Ok(state)
}

/// `ports/<n>/link_layer`: `InfiniBand` or `Ethernet`.
fn parse_link_layer(text: &str) -> Result<LinkLayer, String> {
    match text {
        "InfiniBand" => Ok(LinkLayer::InfiniBand),
        "Ethernet" => Ok(LinkLayer::Ethernet),
        // What the kernel writes for IB_LINK_LAYER_UNSPECIFIED (EFA, for one).
        "Unknown" => Ok(LinkLayer::Unspecified),
        _ => Err(format!(
            "{} is not a link layer (InfiniBand, Ethernet or Unknown)",
            quote(text)
        )),
    }
}

/// `ports/<n>/gids/<i>`: eight colon-separated groups of hex digits (the kernel's `%pI6`,
/// e.g. `fe80:0000:0000:0000:ba59:9fff:fe12:3456`). `None` for the all-zero empty entry.
fn parse_gid(text: &str) -> Result<Option<String>, String> {
    let groups: Vec<&str> = text.split(':').collect();
    let valid = groups.len() == 8
        && groups
            .iter()
            .all(|g| (1..=4).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid {
        return Err(format!(
            "{} is not a GID (eight groups of hex digits separated by ':')",
            quote(text)
        ));
    }
    if groups.iter().all(|g| g.bytes().all(|b| b == b'0')) {
        return Ok(None);
    }
    Ok(Some(text.to_owned()))
}

/// `numa_node`: a node number, or -1 when the kernel does not know.
fn parse_numa_node(text: &str) -> Result<Option<u32>, String> {
    if text == "-1" {
        return Ok(None);
    }
    text.parse::<u32>()
        .map(Some)
        .map_err(|_| format!("{} is not a NUMA node number or -1", quote(text)))
}

/// A netdev's `mtu`: bytes, decimal.
fn parse_mtu(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .map_err(|_| format!("{} is not an MTU in bytes", quote(text)))
}

/// `vendor` ("0x10de") and `class` ("0x030200"): hex, at most `max`.
fn parse_hex(text: &str, max: u32) -> Result<u32, String> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u32::from_str_radix(digits, 16)
        .ok()
        .filter(|v| *v <= max && !digits.starts_with('+'))
        .ok_or_else(|| format!("{} is not a hex number up to {max:#x}", quote(text)))
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Sort key of a PCI address `DDDD:BB:DD.F` (domain of 4 to 8 hex digits); `None` when
/// `s` is not one.
fn pci_address_key(s: &str) -> Option<(u32, u8, u8, u8)> {
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let ok = (4..=8).contains(&domain.len())
        && is_hex(domain)
        && bus.len() == 2
        && is_hex(bus)
        && device.len() == 2
        && is_hex(device)
        && function.len() == 1
        && is_hex(function);
    if !ok {
        return None;
    }
    Some((
        u32::from_str_radix(domain, 16).ok()?,
        u8::from_str_radix(bus, 16).ok()?,
        u8::from_str_radix(device, 16).ok()?,
        u8::from_str_radix(function, 16).ok()?,
    ))
}

/// Whether `s` names a PCI root complex directory, `pciDDDD:BB`.
fn is_pci_root(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("pci") else {
        return false;
    };
    let Some((domain, bus)) = rest.split_once(':') else {
        return false;
    };
    (4..=8).contains(&domain.len()) && is_hex(domain) && bus.len() == 2 && is_hex(bus)
}

/// A name the kernel accepts for a network interface (`dev_valid_name`).
fn is_netdev_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NETDEV_NAME
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
}

/// Orders names with their digit runs compared as numbers: `mlx5_2` < `mlx5_10`.
pub(super) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a, b);
    loop {
        match (x.chars().next(), y.chars().next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let (nx, rx) = split_digits(x);
                let (ny, ry) = split_digits(y);
                let (tx, ty) = (nx.trim_start_matches('0'), ny.trim_start_matches('0'));
                let order = tx.len().cmp(&ty.len()).then_with(|| tx.cmp(ty));
                if order != Ordering::Equal {
                    return order;
                }
                (x, y) = (rx, ry);
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(&d);
                }
                (x, y) = (&x[c.len_utf8()..], &y[d.len_utf8()..]);
            }
        }
    }
}

/// Splits the leading ASCII digits off `s`.
/// Runs every attribute parser of this module on `text` and checks what each promises:
/// no panic, and what parses is what was given. For the `sysfs_attributes` fuzz target
/// (discovery itself is exercised on damaged trees by the tests); not API.
#[doc(hidden)]
pub fn fuzz_attribute_parsers(text: &str, other: &str) {
    if let Ok(state) = parse_port_state(text) {
        let number = text.split(':').next().unwrap_or_default().trim();
        assert!(
            matches!(number, "0" | "1" | "2" | "3" | "4" | "5"),
            "{text:?} gave {state}"
        );
    }
    if let Ok(layer) = parse_link_layer(text) {
        assert!(layer.to_string() == text, "{text:?} gave {layer}");
    }
    if let Ok(Some(gid)) = parse_gid(text) {
        assert_eq!(gid.split(':').count(), 8, "{text:?} gave {gid}");
    }
    if let Ok(Some(node)) = parse_numa_node(text) {
        // Lenient on form ("00", "+1"), exact on value.
        assert_eq!(
            text.trim_start_matches('+').parse::<u64>(),
            Ok(u64::from(node))
        );
    }
    let _ = parse_mtu(text);
    if let Ok(value) = parse_hex(text, 0xff_ffff) {
        assert!(value <= 0xff_ffff);
    }
    if let Some((_, bus, dev, func)) = pci_address_key(text) {
        assert!(dev < 32 && func < 8, "{text:?} gave {bus:x}:{dev:x}.{func}");
    }
    let _ = (is_pci_root(text), is_netdev_name(text));
    // natural_cmp is a total order: antisymmetric and consistent with equality.
    assert_eq!(natural_cmp(text, other), natural_cmp(other, text).reverse());
    assert_eq!(natural_cmp(text, text), Ordering::Equal);
}

fn split_digits(s: &str) -> (&str, &str) {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    s.split_at(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn distance_behind_one_switch_is_four_hops() {
        let gpu = path(&[
            "pci0000:15",
            "0000:15:01.0",
            "0000:16:00.0",
            "0000:17:00.0",
            "0000:18:00.0",
        ]);
        let nic = path(&[
            "pci0000:15",
            "0000:15:01.0",
            "0000:16:00.0",
            "0000:17:01.0",
            "0000:19:00.0",
        ]);
        assert_eq!(pci_distance(&gpu, &nic), 4);
        assert_eq!(pci_distance(&nic, &gpu), 4);
        assert_eq!(pci_distance(&gpu, &gpu), 0);
    }

    #[test]
    fn distance_across_root_complexes_is_both_lengths() {
        let gpu = path(&[
            "pci0000:15",
            "0000:15:01.0",
            "0000:16:00.0",
            "0000:17:00.0",
            "0000:18:00.0",
        ]);
        let storage = path(&["pci0000:37", "0000:37:01.0", "0000:38:00.0"]);
        assert_eq!(pci_distance(&gpu, &storage), 8);
        // Same root complex, other root port: meet at the root complex.
        let sibling = path(&["pci0000:15", "0000:15:03.0", "0000:1a:00.0"]);
        assert_eq!(pci_distance(&gpu, &sibling), 6);
        // An ancestor is as many hops away as the levels between.
        assert_eq!(pci_distance(&gpu, &gpu[..2]), 3);
        assert_eq!(pci_distance(&[], &storage), 3);
        assert_eq!(pci_distance(&[], &[]), 0);
    }

    #[test]
    fn port_states_as_the_kernel_writes_them() {
        assert_eq!(parse_port_state("4: ACTIVE"), Ok(PortState::Active));
        assert_eq!(parse_port_state("1: DOWN"), Ok(PortState::Down));
        assert_eq!(parse_port_state("2: INIT"), Ok(PortState::Init));
        assert_eq!(parse_port_state("3: ARMED"), Ok(PortState::Armed));
        assert_eq!(
            parse_port_state("5: ACTIVE_DEFER"),
            Ok(PortState::ActiveDefer)
        );
        assert_eq!(parse_port_state("0: NOP"), Ok(PortState::Down));
        for bad in [
            "banana",
            "",
            "4",
            "4:",
            ": ACTIVE",
            "9: ACTIVE",
            "4: DOWN",
            "ACTIVE",
            "-1: DOWN",
        ] {
            let err = parse_port_state(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad:?}: {err}");
        }
    }

    #[test]
    fn link_layers() {
        assert_eq!(parse_link_layer("InfiniBand"), Ok(LinkLayer::InfiniBand));
        assert_eq!(parse_link_layer("Ethernet"), Ok(LinkLayer::Ethernet));
        assert_eq!(parse_link_layer("Unknown"), Ok(LinkLayer::Unspecified));
        assert!(parse_link_layer("ethernet").is_err());
    }

    #[test]
    fn gids_zero_ones_are_empty_garbage_is_an_error() {
        let ll = "fe80:0000:0000:0000:ba59:9fff:fe19:0a00";
        assert_eq!(parse_gid(ll), Ok(Some(ll.to_owned())));
        let v4 = "0000:0000:0000:0000:0000:ffff:0a00:0001";
        assert_eq!(parse_gid(v4), Ok(Some(v4.to_owned())));
        assert_eq!(
            parse_gid("0000:0000:0000:0000:0000:0000:0000:0000"),
            Ok(None)
        );
        for bad in [
            "not-a-gid",
            "",
            "fe80::1",
            "fe80:0000:0000:0000:ba59:9fff:fe19",
            "fe80:0000:0000:0000:ba59:9fff:fe19:0a00:0000",
            "fe80:0000:0000:0000:ba59:9fff:fe19:0g00",
            "fe80:00000:000:0000:ba59:9fff:fe19:0a00",
            "+e80:0000:0000:0000:ba59:9fff:fe19:0a00",
        ] {
            assert!(parse_gid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn numa_nodes_and_mtus() {
        assert_eq!(parse_numa_node("0"), Ok(Some(0)));
        assert_eq!(parse_numa_node("3"), Ok(Some(3)));
        assert_eq!(parse_numa_node("-1"), Ok(None));
        for bad in ["x", "", "-2", "1.5", "0x1", "99999999999"] {
            assert!(parse_numa_node(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_mtu("9000"), Ok(9000));
        assert!(parse_mtu("nine thousand").is_err());
        assert!(parse_mtu("-1500").is_err());
    }

    #[test]
    fn pci_ids_and_names() {
        assert_eq!(parse_hex("0x10de", 0xffff), Ok(0x10de));
        assert_eq!(parse_hex("0x030200", 0xff_ffff), Ok(0x030200));
        for bad in ["0xzzzz", "", "0x", "0x+10de", "0x10000", "banana"] {
            assert!(parse_hex(bad, 0xffff).is_err(), "{bad:?}");
        }
        assert_eq!(pci_address_key("0000:18:00.0"), Some((0, 0x18, 0, 0)));
        assert_eq!(
            pci_address_key("10000:e1:1f.7"),
            Some((0x10000, 0xe1, 0x1f, 7))
        );
        for bad in [
            "pci0000:15",
            "0000:18:00",
            "000:18:00.0",
            "0000:1:00.0",
            "0000:18:00.00",
            "0000:zz:00.0",
        ] {
            assert_eq!(pci_address_key(bad), None, "{bad:?}");
        }
        assert!(is_pci_root("pci0000:15"));
        assert!(is_pci_root("pci10000:00"));
        for bad in ["pci0000", "0000:15", "pci0000:1", "pcixxxx:15", "platform"] {
            assert!(!is_pci_root(bad), "{bad:?}");
        }
        assert!(is_netdev_name("enp25s0np0"));
        for bad in ["", ".", "..", "../../etc", "a b", "sixteen_chars_xx"] {
            assert!(!is_netdev_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_sort_naturally() {
        let mut names = vec![
            "mlx5_10", "mlx5_2", "mlx5_0", "irdma1", "mlx5_1", "mlx4_0", "mlx5_02",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["irdma1", "mlx4_0", "mlx5_0", "mlx5_1", "mlx5_02", "mlx5_2", "mlx5_10"]
        );
    }

    #[test]
    fn quotes_are_cut() {
        assert_eq!(quote("abc"), "\"abc\"");
        let long = "x".repeat(200);
        assert!(quote(&long).ends_with("\"..."));
        assert!(quote(&long).len() < 80);
    }
}
