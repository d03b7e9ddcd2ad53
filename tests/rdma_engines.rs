//! Two engines over real RDMA (soft-RoCE in the VM of `../shared/rdma-vm`: rxe0 and rxe1
//! over a veth pair): the control-plane handshake publishes each side's NICs and memory
//! keys, `open_peer` connects one RC queue pair per NIC, and batches go one-sided. Runs
//! where `RDMA_VM=1` (`./dev rdma-test`); elsewhere each test checks that an engine
//! without RDMA says why and goes on over the next transport.

use std::time::Duration;

use kvxfer::{Engine, EngineConfig, Error, Location, Op, TransportKind};

fn in_vm() -> bool {
    std::env::var("RDMA_VM").as_deref() == Ok("1")
}

/// An engine that reaches peers over RDMA only, on `devices`.
fn rdma_engine(devices: &str) -> Engine {
    let config = EngineConfig::builder()
        .transports(&[TransportKind::Rdma])
        .rdma_devices(devices)
        .batch_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    Engine::new(config).unwrap()
}

#[test]
fn write_read_and_notify_over_rdma() {
    if !in_vm() {
        // Without RDMA an engine still starts, and says why in transports().
        let e = Engine::new(EngineConfig::default()).unwrap();
        let rdma = e
            .transports()
            .into_iter()
            .find(|t| t.kind == TransportKind::Rdma)
            .unwrap();
        assert!(rdma.detail.starts_with("not used: "), "{}", rdma.detail);
        assert!(e.rdma_nic_counters().is_empty());
        println!("skipped: not in the RDMA VM ({})", rdma.detail);
        return;
    }
    let target = rdma_engine("rxe0");
    let initiator = rdma_engine("rxe1");
    const LEN: usize = 8 << 20;
    let src = initiator.allocate(LEN, Location::Any).unwrap();
    let back = initiator.allocate(LEN, Location::Any).unwrap();
    let dst = target.allocate(LEN, Location::Any).unwrap();
    let image: Vec<u8> = (0..LEN).map(|i| (i * 31 % 253) as u8).collect();
    src.write_at(0, &image).unwrap();
    let peer = initiator.open_peer(target.session_id().unwrap()).unwrap();
    assert_eq!(initiator.peer_transport(peer).unwrap(), TransportKind::Rdma);
    // 128 pages of 64 KiB into reversed slots.
    let page = 64 << 10;
    let ops: Vec<Op> = (0..128u64)
        .map(|i| Op::write(src.addr() + i * page, dst.addr() + (127 - i) * page, page))
        .collect();
    let id = initiator
        .submit_with_notify(peer, &ops, b"pages ready")
        .unwrap();
    assert_eq!(initiator.batch_transport(id).unwrap(), TransportKind::Rdma);
    assert!(initiator
        .wait(id, Duration::from_secs(20))
        .unwrap()
        .into_result()
        .unwrap());
    initiator.free(id).unwrap();
    let note = target
        .wait_notification(Duration::from_secs(5))
        .expect("the notification");
    assert_eq!(note.bytes, b"pages ready");
    let got = dst.to_vec();
    for i in 0..128usize {
        let (d, s) = ((127 - i) * page as usize, i * page as usize);
        assert!(
            got[d..d + page as usize] == image[s..s + page as usize],
            "page {i} differs"
        );
    }
    // READ the whole target buffer back.
    initiator
        .transfer_sync(peer, &[Op::read(back.addr(), dst.addr(), LEN as u64)])
        .unwrap();
    assert!(back.to_vec() == got, "READ differs");
    let stats = initiator.stats();
    println!("over rdma: {stats:?}");
    // The per-NIC counters saw the slices: 128 WRITE slices of 64 KiB and the READ's.
    let nics = initiator.rdma_nic_counters();
    println!("per NIC: {nics:?}");
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].0, "rxe1");
    assert!(nics[0].1 >= 128 + (LEN / (64 << 10)) as u64, "{nics:?}");
    assert_eq!(nics[0].2, 0, "no chain failed: {nics:?}");
}

#[test]
fn memory_the_target_does_not_grant_is_refused() {
    if !in_vm() {
        println!("skipped: not in the RDMA VM");
        return;
    }
    let target = rdma_engine("rxe0");
    let initiator = rdma_engine("rxe1");
    let src = initiator.allocate(1 << 20, Location::Any).unwrap();
    let ro = target
        .allocate_with_access(
            1 << 20,
            Location::Any,
            kvxfer::Access::LOCAL_READ | kvxfer::Access::LOCAL_WRITE | kvxfer::Access::REMOTE_READ,
        )
        .unwrap();
    let peer = initiator.open_peer(target.session_id().unwrap()).unwrap();
    let err = initiator
        .transfer_sync(peer, &[Op::write(src.addr(), ro.addr(), 4096)])
        .unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err}");
    // Outside anything registered: refused before anything moves.
    let err = initiator
        .transfer_sync(peer, &[Op::write(src.addr(), 0x1000, 4096)])
        .unwrap_err();
    assert!(matches!(err, Error::NotRegistered { .. }), "{err}");
    assert!(ro.to_vec().iter().all(|&b| b == 0));
}

/// An engine on both NICs spreads one batch over both (the per-NIC counters), and every
/// byte lands.
#[test]
fn one_engine_spreads_a_batch_over_both_nics() {
    if !in_vm() {
        println!("skipped: not in the RDMA VM");
        return;
    }
    let target = rdma_engine("rxe0,rxe1");
    let initiator = rdma_engine("rxe0,rxe1");
    const LEN: usize = 16 << 20;
    let src = initiator.allocate(LEN, Location::Any).unwrap();
    let dst = target.allocate(LEN, Location::Any).unwrap();
    let image: Vec<u8> = (0..LEN).map(|i| (i * 29 % 251) as u8).collect();
    src.write_at(0, &image).unwrap();
    let peer = initiator.open_peer(target.session_id().unwrap()).unwrap();
    let page = 16u64 << 10;
    let ops: Vec<Op> = (0..(LEN as u64 / page))
        .map(|i| Op::write(src.addr() + i * page, dst.addr() + i * page, page))
        .collect();
    initiator.transfer_sync(peer, &ops).unwrap();
    assert!(dst.to_vec() == image, "bytes differ");
    let nics = initiator.rdma_nic_counters();
    println!("per NIC: {nics:?}");
    assert_eq!(nics.len(), 2, "{nics:?}");
    assert!(
        nics.iter()
            .all(|(_, slices, failed)| *slices > 0 && *failed == 0),
        "a NIC carried nothing or failed: {nics:?}"
    );
    let total: u64 = nics.iter().map(|n| n.1).sum();
    assert_eq!(total, LEN as u64 / page, "{nics:?}");
}
