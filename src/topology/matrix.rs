//! The priority matrix: for each memory location, the NICs to use first (preferred) and
//! the rest (fallback). Built from a discovered topology and a device list, or imported
//! from Mooncake's JSON format so existing topology files keep working:
//!
//! ```json
//! {"cpu:0": [["mlx5_0", "mlx5_1"], ["mlx5_2"]], "cuda:0": [["mlx5_0"], ["mlx5_1", "mlx5_2"]]}
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::devices::{check_name, top_level_keys};
use super::sysfs::natural_cmp;
use super::{pci_distance, DeviceList, Gpu, Nic, Topology, TopologyError};
use crate::memory::Location;

/// Largest topology JSON accepted.
const MAX_JSON_BYTES: usize = 1 << 20;

/// Most devices in one list of a topology JSON (hosts have tens).
const MAX_NICS_PER_LIST: usize = 1024;

/// Preferred and fallback NICs of one memory location.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Priorities {
    /// Used first, spread by load.
    pub preferred: Vec<String>,
    /// Used when no preferred NIC can be (errors, pauses, none preferred).
    pub fallback: Vec<String>,
}

impl Priorities {
    /// Every NIC of the entry, preferred first.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.preferred.iter().chain(&self.fallback)
    }
}

/// NIC priorities per memory location.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorityMatrix {
    entries: BTreeMap<Location, Priorities>,
}

impl PriorityMatrix {
    /// The matrix of `topology` restricted to `devices`:
    /// - `cuda:N` prefers the allowed NICs closest to GPU N, ranked as `nvidia-smi topo`
    ///   does: under the same root complex by PCI hops (same switch first); then on the
    ///   GPU's NUMA node; then the rest (ties kept at every rank);
    /// - `cpu:N` prefers the allowed NICs on NUMA node N (every allowed NIC when none has
    ///   a known node);
    /// - `*` (memory at a location the matrix does not list) allows what the device list
    ///   allows there, all preferred.
    ///
    /// Everything else allowed is fallback. Devices the list allows but whose ports are
    /// all down are skipped, with one log line each.
    pub fn build(topology: &Topology, devices: &DeviceList) -> Self {
        let nic = |name: &String| topology.nics.iter().find(|n| &n.name == name);
        devices.log_down(topology);
        let allowed = |location| devices.allowed_quietly(topology, location);
        let mut entries = BTreeMap::new();
        let nodes: Vec<u32> = if topology.numa_nodes.is_empty() {
            vec![0]
        } else {
            topology.numa_nodes.clone()
        };
        for node in nodes {
            let location = Location::Cpu(node);
            let allowed = allowed(location);
            let any_known = allowed
                .iter()
                .any(|n| nic(n).is_some_and(|n| n.numa_node.is_some()));
            let on_node =
                |name: &String| nic(name).is_some_and(|n| n.numa_node == Some(node) || !any_known);
            entries.insert(location, split(allowed, on_node));
        }
        for gpu in &topology.gpus {
            let location = Location::Cuda(gpu.index);
            let allowed = allowed(location);
            let rank = |name: &String| nic(name).map(|n| gpu_to_nic_rank(gpu, n));
            let best = allowed.iter().filter_map(rank).min();
            entries.insert(location, split(allowed, |name| rank(name) == best));
        }
        let anywhere = allowed(Location::Any);
        entries.insert(Location::Any, split(anywhere, |_| true));
        PriorityMatrix { entries }
    }

    /// Every NIC in `names` preferred for memory anywhere (no topology known).
    pub fn flat(names: &[String]) -> Self {
        let anywhere = Priorities {
            preferred: names.to_vec(),
            fallback: Vec::new(),
        };
        PriorityMatrix {
            entries: BTreeMap::from([(Location::Any, anywhere)]),
        }
    }

    /// Parses Mooncake's topology JSON: an object from location (`cpu:N`, `cuda:N`, `*`)
    /// to `[[preferred...], [fallback...]]` (the fallback list may be omitted).
    pub fn from_json(text: &str) -> Result<Self, TopologyError> {
        let bad = |reason: String| TopologyError::BadMatrix { reason };
        if text.len() > MAX_JSON_BYTES {
            return Err(bad(format!(
                "{} bytes is more than the {MAX_JSON_BYTES} accepted",
                text.len()
            )));
        }
        let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        // serde_json keeps the last of duplicate keys silently; a file that says two things
        // about one location is a mistake worth naming.
        let mut keys = top_level_keys(text);
        keys.sort();
        if let Some(pair) = keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("location {:?} appears twice", cut(&pair[0]))));
        }
        let Value::Object(map) = value else {
            return Err(bad(
                "expected an object from location to [[preferred], [fallback]]".into(),
            ));
        };
        let mut entries = BTreeMap::new();
        for (key, value) in map {
            let location: Location = key.parse().map_err(|e| bad(format!("key {key:?}: {e}")))?;
            let lists = match &value {
                Value::Array(lists) if (1..=2).contains(&lists.len()) => lists,
                _ => {
                    return Err(bad(format!(
                        "{key}: expected [[preferred...], [fallback...]]"
                    )))
                }
            };
            let mut names = lists.iter().map(|list| names_of(&key, list));
            let preferred = names.next().unwrap_or(Ok(Vec::new()))?;
            let fallback = names.next().unwrap_or(Ok(Vec::new()))?;
            let in_preferred: std::collections::HashSet<&String> = preferred.iter().collect();
            if let Some(both) = fallback.iter().find(|n| in_preferred.contains(n)) {
                return Err(bad(format!("{key}: {both} is both preferred and fallback")));
            }
            entries.insert(
                location,
                Priorities {
                    preferred,
                    fallback,
                },
            );
        }
        Ok(PriorityMatrix { entries })
    }

    /// The matrix in Mooncake's JSON format, one location per line, in location order.
    pub fn to_json(&self) -> String {
        let list = |names: &[String]| {
            let quoted: Vec<String> = names
                .iter()
                .map(|n| Value::from(n.as_str()).to_string())
                .collect();
            format!("[{}]", quoted.join(", "))
        };
        let mut out = String::from("{");
        for (i, (location, p)) in self.entries.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                out,
                "{sep}\n  \"{location}\": [{}, {}]",
                list(&p.preferred),
                list(&p.fallback)
            );
        }
        out.push_str(if self.entries.is_empty() { "}" } else { "\n}" });
        out
    }

    /// The priorities for memory at `location`: its own entry; for a location the matrix
    /// does not list, the `*` entry; without one, every NIC of the matrix, preferred.
    pub fn for_location(&self, location: Location) -> Priorities {
        if let Some(p) = self
            .entries
            .get(&location)
            .or_else(|| self.entries.get(&Location::Any))
        {
            return p.clone();
        }
        Priorities {
            preferred: self.nics(),
            fallback: Vec::new(),
        }
    }

    /// The entries, in location order.
    pub fn entries(&self) -> impl Iterator<Item = (Location, &Priorities)> {
        self.entries.iter().map(|(l, p)| (*l, p))
    }

    /// Every NIC named anywhere, once, in natural order (`mlx5_2` before `mlx5_10`, as
    /// discovery orders them).
    pub fn nics(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .entries
            .values()
            .flat_map(|p| p.all().cloned())
            .collect();
        all.sort_by(|a, b| natural_cmp(a, b));
        all.dedup();
        all
    }

    /// Keeps only the NICs `keep` accepts (a device list applied to an imported matrix).
    pub fn retain_nics(&mut self, keep: impl Fn(&str) -> bool) {
        for p in self.entries.values_mut() {
            p.preferred.retain(|n| keep(n));
            p.fallback.retain(|n| keep(n));
        }
    }

    /// Whether no location has any NIC.
    pub fn is_empty(&self) -> bool {
        self.entries
            .values()
            .all(|p| p.preferred.is_empty() && p.fallback.is_empty())
    }
}

/// At most 64 characters of `text`, for error messages.
fn cut(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// How close NIC `n` is to GPU `g`, smaller first: (0, hops) under the same root complex;
/// (1, 0) on the GPU's NUMA node; (2, 0) anywhere else. Without PCI paths only the NUMA
/// node can tell.
fn gpu_to_nic_rank(g: &Gpu, n: &Nic) -> (u8, u32) {
    let same_root =
        !g.pci_path.is_empty() && !n.pci_path.is_empty() && g.pci_path[0] == n.pci_path[0];
    if same_root {
        (0, pci_distance(&g.pci_path, &n.pci_path))
    } else if g.numa_node.is_some() && g.numa_node == n.numa_node {
        (1, 0)
    } else {
        (2, 0)
    }
}

/// Splits `allowed` (in order) into preferred and fallback.
fn split(allowed: Vec<String>, preferred: impl Fn(&String) -> bool) -> Priorities {
    let (preferred, fallback) = allowed.into_iter().partition(|n| preferred(n));
    Priorities {
        preferred,
        fallback,
    }
}

/// The device names of one JSON list, checked.
fn names_of(key: &str, list: &Value) -> Result<Vec<String>, TopologyError> {
    let bad = |reason: String| TopologyError::BadMatrix { reason };
    let Value::Array(items) = list else {
        return Err(bad(format!(
            "{key}: expected a list of device names, got {}",
            cut(&list.to_string())
        )));
    };
    if items.len() > MAX_NICS_PER_LIST {
        return Err(bad(format!(
            "{key}: {} devices in one list, more than the {MAX_NICS_PER_LIST} accepted",
            items.len()
        )));
    }
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    for item in items {
        let name = item.as_str().ok_or_else(|| {
            bad(format!(
                "{key}: {} is not a device name",
                cut(&item.to_string())
            ))
        })?;
        check_name(name).map_err(|reason| bad(format!("{key}: {reason}")))?;
        if seen.insert(name) {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Gpu, LinkLayer, Port, PortState};
    use proptest::prelude::*;

    fn nic(name: &str, node: u32, path: &[&str]) -> Nic {
        Nic {
            name: name.into(),
            pci_address: path.last().map(|s| s.to_string()),
            pci_path: path.iter().map(|s| s.to_string()).collect(),
            numa_node: Some(node),
            ports: vec![Port {
                number: 1,
                state: PortState::Active,
                link_layer: LinkLayer::Ethernet,
                gids: Vec::new(),
                mtu: None,
            }],
        }
    }

    /// Two GPUs, each behind a switch with one NIC, plus a NIC on each root complex.
    fn host() -> Topology {
        Topology {
            numa_nodes: vec![0, 1],
            nics: vec![
                nic(
                    "mlx5_0",
                    0,
                    &[
                        "pci0000:10",
                        "0000:10:01.0",
                        "0000:11:00.0",
                        "0000:12:01.0",
                        "0000:14:00.0",
                    ],
                ),
                nic(
                    "mlx5_1",
                    1,
                    &[
                        "pci0000:80",
                        "0000:80:01.0",
                        "0000:81:00.0",
                        "0000:82:01.0",
                        "0000:84:00.0",
                    ],
                ),
                nic("mlx5_2", 0, &["pci0000:10", "0000:10:02.0", "0000:20:00.0"]),
                nic("mlx5_3", 1, &["pci0000:80", "0000:80:02.0", "0000:90:00.0"]),
            ],
            gpus: vec![
                Gpu {
                    index: 0,
                    bus_id: "0000:13:00.0".into(),
                    pci_path: [
                        "pci0000:10",
                        "0000:10:01.0",
                        "0000:11:00.0",
                        "0000:12:00.0",
                        "0000:13:00.0",
                    ]
                    .map(String::from)
                    .to_vec(),
                    numa_node: Some(0),
                },
                Gpu {
                    index: 1,
                    bus_id: "0000:83:00.0".into(),
                    pci_path: [
                        "pci0000:80",
                        "0000:80:01.0",
                        "0000:81:00.0",
                        "0000:82:00.0",
                        "0000:83:00.0",
                    ]
                    .map(String::from)
                    .to_vec(),
                    numa_node: Some(1),
                },
            ],
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn gpus_prefer_the_nic_on_their_switch_and_cpus_their_node() {
        let m = PriorityMatrix::build(&host(), &DeviceList::Auto);
        let cuda0 = m.for_location(Location::Cuda(0));
        assert_eq!(cuda0.preferred, names(&["mlx5_0"]));
        assert_eq!(cuda0.fallback, names(&["mlx5_1", "mlx5_2", "mlx5_3"]));
        assert_eq!(
            m.for_location(Location::Cuda(1)).preferred,
            names(&["mlx5_1"])
        );
        assert_eq!(
            m.for_location(Location::Cpu(0)).preferred,
            names(&["mlx5_0", "mlx5_2"])
        );
        assert_eq!(
            m.for_location(Location::Cpu(1)).preferred,
            names(&["mlx5_1", "mlx5_3"])
        );
        // Unknown locations get every NIC.
        assert_eq!(m.for_location(Location::Any).preferred.len(), 4);
    }

    #[test]
    fn nics_without_a_numa_node_are_preferred_when_no_nic_has_one() {
        let mut topology = host();
        topology.nics.iter_mut().for_each(|n| n.numa_node = None);
        let m = PriorityMatrix::build(&topology, &DeviceList::Auto);
        for node in [0, 1] {
            let p = m.for_location(Location::Cpu(node));
            assert_eq!(p.preferred.len(), 4, "cpu:{node}: {p:?}");
        }
    }

    #[test]
    fn a_device_list_restricts_every_entry() {
        let m = PriorityMatrix::build(&host(), &DeviceList::Names(names(&["mlx5_2", "mlx5_3"])));
        for (location, p) in m.entries() {
            assert!(
                p.all().all(|n| n == "mlx5_2" || n == "mlx5_3"),
                "{location}: {p:?}"
            );
        }
        // GPU 0's nearest allowed NIC is now mlx5_2 (same root complex).
        assert_eq!(
            m.for_location(Location::Cuda(0)).preferred,
            names(&["mlx5_2"])
        );
    }

    #[test]
    fn json_round_trips_and_reads_mooncake_files() {
        let m = PriorityMatrix::build(&host(), &DeviceList::Auto);
        let text = m.to_json();
        assert!(
            text.starts_with(
                "{\n  \"cpu:0\": [[\"mlx5_0\", \"mlx5_2\"], [\"mlx5_1\", \"mlx5_3\"]]"
            ),
            "{text}"
        );
        assert_eq!(PriorityMatrix::from_json(&text).unwrap(), m);
        let mooncake = r#"{"cpu:0": [["mlx5_0","mlx5_1"],["mlx5_2"]], "cuda:0": [["mlx5_0"]]}"#;
        let m = PriorityMatrix::from_json(mooncake).unwrap();
        assert_eq!(
            m.for_location(Location::Cpu(0)).fallback,
            names(&["mlx5_2"])
        );
        assert!(m.for_location(Location::Cuda(0)).fallback.is_empty());
        assert_eq!(PriorityMatrix::from_json("{}").unwrap().to_json(), "{}");
    }

    #[test]
    fn bad_json_is_refused_with_a_reason() {
        for (text, needle) in [
            ("[]", "expected an object"),
            ("{", "not JSON"),
            (r#"{"gpu:0": [[]]}"#, "gpu:0"),
            (r#"{"cpu:0": "mlx5_0"}"#, "cpu:0: expected"),
            (r#"{"cpu:0": [[], [], []]}"#, "cpu:0: expected"),
            (r#"{"cpu:0": [[1]]}"#, "1 is not a device name"),
            (r#"{"cpu:0": [["a b"]]}"#, "has ' ' at character 2"),
            (r#"{"cpu:0": [["a"]], "cpu:0": [["b"]]}"#, "appears twice"),
            (
                r#"{"cpu:0": [["x"], ["x"]]}"#,
                "both preferred and fallback",
            ),
        ] {
            let err = PriorityMatrix::from_json(text).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }

    proptest! {
        /// Whatever the text, parsing never panics, and what parses prints back to the
        /// same matrix.
        #[test]
        fn parse_print_parse(text in r#"\{("(cpu|cuda):[0-9]{1,2}": \[\[("[a-z_0-9]{1,6}"(, )?){0,3}\](, \[("[a-z0-9_]{1,6}",?){0,3}\])?\],? ?){0,4}\}|\PC{0,40}"#) {
            if let Ok(m) = PriorityMatrix::from_json(&text) {
                prop_assert_eq!(PriorityMatrix::from_json(&m.to_json()).unwrap(), m);
            }
        }
    }
}
