//! `DeviceList::parse_text` on arbitrary input (it never touches the filesystem, so the
//! fuzzer cannot make it read files): it never panics; refusals are `BadDeviceList`
//! carrying the first 200 characters of the input and a reason; accepted lists print
//! (`Display`) to a text that parses back to the same list, and `allowed_for` over a
//! fixed topology returns only NICs that are up, in topology order, without duplicates.
//! Inputs that cannot be paths also go through `DeviceList::parse`, which must agree.

#![no_main]

use kvxfer::topology::{DeviceList, LinkLayer, Nic, Port, PortState, Topology, TopologyError};
use kvxfer::Location;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(input) => check(input),
        // Not UTF-8: still exercise the parser with the closest string.
        Err(_) => check(&String::from_utf8_lossy(data)),
    }
});

fn check(input: &str) {
    let parsed = DeviceList::parse_text(input);
    // Anything that could be a path is left out: the fuzzer must not read files.
    if !input.to_ascii_lowercase().contains("json") {
        let again = DeviceList::parse(input);
        assert_eq!(
            format!("{again:?}"),
            format!("{parsed:?}"),
            "parse and parse_text disagree on {input:?}"
        );
    }
    match parsed {
        Ok(list) => check_list(input, &list),
        Err(TopologyError::BadDeviceList {
            input: shown,
            reason,
        }) => {
            let expected: String = input.chars().take(200).collect();
            assert_eq!(shown, expected, "error does not carry the (cut) input");
            assert!(!reason.is_empty(), "no reason for {input:?}");
        }
        Err(other) => panic!("parse_text({input:?}) gave {other:?}"),
    }
}

fn check_list(input: &str, list: &DeviceList) {
    let shown = list.to_string();
    match DeviceList::parse_text(&shown) {
        Ok(again) => assert_eq!(&again, list, "{input:?} → {shown:?} does not round-trip"),
        Err(e) => panic!("{input:?} → {list:?} prints as {shown:?}, which is refused: {e}"),
    }

    let topology = topology();
    let up: Vec<&str> = topology
        .nics
        .iter()
        .filter(|n| n.is_up())
        .map(|n| n.name.as_str())
        .collect();
    for location in [
        Location::Cpu(0),
        Location::Cpu(1),
        Location::Cuda(0),
        Location::Cuda(1),
        Location::Cuda(7),
        Location::Cuda(u32::MAX),
        Location::Any,
    ] {
        let allowed = list.allowed_for(&topology, location);
        for name in &allowed {
            assert!(
                up.contains(&name.as_str()),
                "{list:?} at {location} allows {name}, which is not an up NIC"
            );
        }
        assert!(
            allowed.windows(2).all(|w| w[0] < w[1]),
            "{list:?} at {location}: {allowed:?} is not in topology order"
        );
    }

    let names = list.names();
    match list.validate(&topology) {
        Ok(()) => {
            for name in &names {
                assert!(topology.nics.iter().any(|n| &n.name == name));
            }
        }
        Err(TopologyError::UnknownDevices { unknown, known }) => {
            assert!(!unknown.is_empty());
            assert!(unknown
                .iter()
                .all(|u| names.contains(u) && !known.contains(u)));
            assert_eq!(known.len(), topology.nics.len());
        }
        Err(other) => panic!("validate gave {other:?}"),
    }
}

/// mlx5_0 and mlx5_1 up, mlx5_2 down, mlx5_3 up on its second port, rxe0 without ports.
fn topology() -> Topology {
    let nic = |name: &str, states: &[PortState]| Nic {
        name: name.to_owned(),
        pci_address: None,
        pci_path: Vec::new(),
        numa_node: None,
        ports: states
            .iter()
            .zip(1..)
            .map(|(&state, number)| Port {
                number,
                state,
                link_layer: LinkLayer::Ethernet,
                gids: Vec::new(),
                mtu: Some(4096),
            })
            .collect(),
    };
    Topology {
        numa_nodes: vec![0, 1],
        nics: vec![
            nic("mlx5_0", &[PortState::Active]),
            nic("mlx5_1", &[PortState::Active]),
            nic("mlx5_2", &[PortState::Down]),
            nic("mlx5_3", &[PortState::Down, PortState::Active]),
            nic("rxe0", &[]),
        ],
        gpus: Vec::new(),
    }
}
