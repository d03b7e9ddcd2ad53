//! Issue 5's acceptance checks on the 8-GPU fixture (tests/fixtures/gpu8: 2 NUMA nodes,
//! mlx5_i behind the same PCIe switch as GPU i, storage NICs mlx5_8 on node 0 and mlx5_9 on
//! node 1): the matrix prefers the right NICs, a device list restricts every choice, and
//! the matrix survives a trip through Mooncake's JSON format.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvxfer::topology::{discover, DeviceList, NicSelector, PausePolicy, PriorityMatrix, Topology};
use kvxfer::Location;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn gpu8() -> Topology {
    discover(&fixture("gpu8")).expect("the gpu8 fixture is discoverable")
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn cuda3_prefers_exactly_the_nic_behind_its_switch() {
    let m = PriorityMatrix::build(&gpu8(), &DeviceList::Auto);
    for gpu in 0..8 {
        let p = m.for_location(Location::Cuda(gpu));
        assert_eq!(p.preferred, vec![format!("mlx5_{gpu}")], "cuda:{gpu}");
        assert_eq!(
            p.fallback.len(),
            9,
            "cuda:{gpu}: every other NIC is fallback"
        );
    }
}

#[test]
fn cpu1_prefers_the_nics_on_node_1() {
    let m = PriorityMatrix::build(&gpu8(), &DeviceList::Auto);
    let cpu1 = m.for_location(Location::Cpu(1));
    assert_eq!(
        cpu1.preferred,
        names(&["mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7", "mlx5_9"])
    );
    assert_eq!(
        cpu1.fallback,
        names(&["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_8"])
    );
    let cpu0 = m.for_location(Location::Cpu(0));
    assert_eq!(
        cpu0.preferred,
        names(&["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_8"])
    );
}

#[test]
fn a_device_list_restricts_every_choice_to_its_devices() {
    let topology = gpu8();
    let list = DeviceList::parse("mlx5_1,mlx5_2").unwrap();
    list.validate(&topology).unwrap();
    let m = PriorityMatrix::build(&topology, &list);
    assert_eq!(m.nics(), names(&["mlx5_1", "mlx5_2"]));
    // GPU 1 and 2 keep their own NIC; GPU 3 falls to the nearest allowed ones.
    assert_eq!(
        m.for_location(Location::Cuda(1)).preferred,
        names(&["mlx5_1"])
    );
    assert_eq!(
        m.for_location(Location::Cuda(2)).preferred,
        names(&["mlx5_2"])
    );

    let t0 = Instant::now();
    let policy = PausePolicy {
        failures: 1,
        window: Duration::from_secs(1),
        pause: Duration::from_secs(5),
    };
    let selector = NicSelector::new(&m, policy, t0);
    let locations = (0..2)
        .map(Location::Cpu)
        .chain((0..8).map(Location::Cuda))
        .chain([Location::Any]);
    for location in locations {
        let mut tried = Vec::new();
        for round in 0..4 {
            let now = t0 + Duration::from_secs(round);
            let nic = selector.choose_excluding(location, &tried, now);
            let Some(nic) = nic else { break };
            let name = selector.name(nic);
            assert!(
                name == "mlx5_1" || name == "mlx5_2",
                "{location}: chose {name}"
            );
            selector.begin(nic, 65536);
            selector.report_failure(nic, now);
            tried.push(nic);
        }
    }
}

#[test]
fn unknown_devices_in_a_list_name_the_ones_that_exist() {
    let err = DeviceList::parse("mlx5_1,mlx5_42")
        .unwrap()
        .validate(&gpu8())
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("mlx5_42") && text.contains("mlx5_9"),
        "{text}"
    );
}

#[test]
fn the_matrix_survives_mooncake_json() {
    let m = PriorityMatrix::build(&gpu8(), &DeviceList::Auto);
    let back = PriorityMatrix::from_json(&m.to_json()).unwrap();
    assert_eq!(back, m);
}

#[test]
fn a_host_without_nics_has_an_empty_matrix() {
    let topology = discover(&fixture("no_nic")).unwrap();
    assert!(topology.nics.is_empty());
    let m = PriorityMatrix::build(&topology, &DeviceList::Auto);
    assert!(m.is_empty());
    let t0 = Instant::now();
    assert_eq!(
        NicSelector::new(&m, PausePolicy::default(), t0).choose(Location::Cpu(0), t0),
        None
    );
}

#[test]
fn without_its_switch_nic_a_gpu_prefers_its_own_socket() {
    let topology = gpu8();
    // mlx5_1 shares GPU 0's socket, mlx5_9 is on the other one: same socket wins.
    let m = PriorityMatrix::build(&topology, &DeviceList::parse("mlx5_1,mlx5_9").unwrap());
    assert_eq!(
        m.for_location(Location::Cuda(0)).preferred,
        names(&["mlx5_1"])
    );
    assert_eq!(
        m.for_location(Location::Cuda(0)).fallback,
        names(&["mlx5_9"])
    );
    // Every NIC but GPU 0's own: all node-0 NICs tie, none from node 1 is preferred.
    let rest = "mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7,mlx5_8,mlx5_9";
    let m = PriorityMatrix::build(&topology, &DeviceList::parse(rest).unwrap());
    assert_eq!(
        m.for_location(Location::Cuda(0)).preferred,
        names(&["mlx5_1", "mlx5_2", "mlx5_3", "mlx5_8"])
    );
}

#[test]
fn locations_the_matrix_does_not_list_follow_the_lists_default() {
    let topology = gpu8();
    let list = DeviceList::parse(r#"{"0": "mlx5_0", "default": "mlx5_3"}"#).unwrap();
    let m = PriorityMatrix::build(&topology, &list);
    assert_eq!(
        m.for_location(Location::Cuda(0)).all().collect::<Vec<_>>(),
        ["mlx5_0"]
    );
    // GPU 8 does not exist on this host, and `*` is any memory: both get the default.
    for location in [Location::Cuda(8), Location::Any] {
        assert_eq!(
            m.for_location(location).preferred,
            names(&["mlx5_3"]),
            "{location}"
        );
    }
    let t0 = Instant::now();
    let selector = NicSelector::new(&m, PausePolicy::default(), t0);
    for _ in 0..8 {
        let nic = selector.choose(Location::Cuda(8), t0).unwrap();
        assert_eq!(selector.name(nic), "mlx5_3");
    }
}
