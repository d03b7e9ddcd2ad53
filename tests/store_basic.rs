//! The store over two engines in one process (a store node and a client), over TCP.

use std::sync::Arc;
use std::time::Duration;

use kvxfer::store::{ItemError, SegmentConfig, Store, StoreConfig};
use kvxfer::{Engine, EngineConfig, Location, TransportKind};

fn engine() -> Arc<Engine> {
    let config = EngineConfig::builder()
        .transports(&[TransportKind::Tcp])
        .build()
        .unwrap();
    Arc::new(Engine::new(config).unwrap())
}

#[test]
fn put_get_exists_between_a_node_and_a_client() {
    let node_engine = engine();
    let node = Store::setup(
        Arc::clone(&node_engine),
        StoreConfig {
            segment: Some(SegmentConfig {
                memory_bytes: 64 << 20,
                ..SegmentConfig::default()
            }),
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let client_engine = engine();
    let client = Store::setup(
        Arc::clone(&client_engine),
        StoreConfig {
            members: node.members(),
            timeout: Duration::from_secs(5),
            ..StoreConfig::default()
        },
    )
    .unwrap();
    const N: usize = 32;
    const V: usize = 64 << 10;
    let src = client_engine.allocate(N * V, Location::Any).unwrap();
    let dst = client_engine.allocate(N * V, Location::Any).unwrap();
    let image: Vec<u8> = (0..N * V).map(|i| (i * 7 % 251) as u8).collect();
    src.write_at(0, &image).unwrap();
    let keys: Vec<Vec<u8>> = (0..N).map(|i| format!("page-{i}").into_bytes()).collect();
    let key_refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let ptrs: Vec<u64> = (0..N).map(|i| src.addr() + (i * V) as u64).collect();
    let sizes = vec![V as u64; N];
    let put = client.batch_put_from(&key_refs, &ptrs, &sizes).unwrap();
    assert!(put.iter().all(|r| r.is_ok()), "{put:?}");
    let again = client
        .batch_put_from(&key_refs[..2], &ptrs[..2], &sizes[..2])
        .unwrap();
    assert_eq!(again, vec![Err(ItemError::AlreadyExists); 2]);
    let e = client.batch_exists(&key_refs).unwrap();
    assert_eq!(e.prefix, N);
    let dptrs: Vec<u64> = (0..N).map(|i| dst.addr() + (i * V) as u64).collect();
    let got = client.batch_get_into(&key_refs, &dptrs, &sizes).unwrap();
    assert!(got.iter().all(|r| *r == Ok(V as u64)), "{got:?}");
    assert!(dst.to_vec() == image, "bytes differ");
    let missing: Vec<&[u8]> = vec![b"page-0", b"nope", b"page-1"];
    let e = client.batch_exists(&missing).unwrap();
    assert_eq!((e.found, e.prefix), (vec![true, false, true], 1));
    let stats = client.stats();
    println!("{stats:?}");
    assert_eq!(stats.objects_in_memory, N as u64);
}

fn node(memory: u64, disk: Option<(std::path::PathBuf, u64)>) -> (Arc<Engine>, Store) {
    let e = engine();
    let s = Store::setup(
        Arc::clone(&e),
        StoreConfig {
            segment: Some(SegmentConfig {
                memory_bytes: memory,
                disk,
                ..SegmentConfig::default()
            }),
            ..StoreConfig::default()
        },
    )
    .unwrap();
    (e, s)
}

fn client(members: Vec<String>) -> (Arc<Engine>, Store) {
    let e = engine();
    let s = Store::setup(
        Arc::clone(&e),
        StoreConfig {
            members,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    (e, s)
}

/// The node's engine publishes many descriptor changes (registrations) while the
/// client's fast store connection sits idle: the next request still works.
#[test]
fn descriptor_churn_does_not_break_an_idle_store_connection() {
    let (node_engine, node) = node(16 << 20, None);
    let (ce, c) = client(node.members());
    let buf = ce.allocate(4096, Location::Any).unwrap();
    buf.fill(0, 4096, 9).unwrap();
    let key: [&[u8]; 1] = [b"churn"];
    assert_eq!(
        c.batch_put_from(&key, &[buf.addr()], &[4096]).unwrap(),
        vec![Ok(())]
    );
    for _ in 0..2000 {
        drop(node_engine.allocate(4096, Location::Any).unwrap());
    }
    let out = ce.allocate(4096, Location::Any).unwrap();
    assert_eq!(
        c.batch_get_into(&key, &[out.addr()], &[4096]).unwrap(),
        vec![Ok(4096)]
    );
    assert!(out.to_vec() == buf.to_vec());
}

/// A Reserve naming an object far larger than memory is refused without moving the
/// segment's objects to disk.
#[test]
fn an_oversized_reserve_does_not_demote_the_segment() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("store-basic-ssd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_ne, node) = node(8 << 20, Some((dir.clone(), 32 << 20)));
    let (ce, c) = client(node.members());
    let buf = ce.allocate(64 << 10, Location::Any).unwrap();
    let keys: Vec<Vec<u8>> = (0..100).map(|i| format!("k{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let put = c
        .batch_put_from(&refs, &[buf.addr(); 100], &[4096; 100])
        .unwrap();
    assert!(put.iter().all(|r| r.is_ok()), "{put:?}");
    let before = c.stats();
    let peer = ce.open_peer(&node.members()[0]).unwrap();
    let huge = kvxfer::store::wire::Request::Reserve {
        items: vec![(b"huge".to_vec(), 1 << 40)],
    };
    let reply = ce
        .store_call(peer, huge.encode(), Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        kvxfer::store::wire::Reply::decode(&reply).unwrap(),
        kvxfer::store::wire::Reply::Reserved(vec![kvxfer::store::wire::ReserveItem::Refused(
            kvxfer::store::wire::ItemStatus::NoSpace
        )])
    );
    let after = c.stats();
    assert_eq!(
        after.objects_in_memory, before.objects_in_memory,
        "{after:?}"
    );
    assert_eq!(after.demotions, before.demotions, "{after:?}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A member that accepts connections but never answers does not hold up requests to the
/// other members: a put to a healthy member finishes while one to the hung member is
/// still connecting.
#[test]
fn a_hung_member_does_not_stall_the_others() {
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_session = hung.local_addr().unwrap().to_string();
    let (_ne, node) = node(16 << 20, None);
    let healthy = node.members()[0].clone();
    let members = vec![hung_session.clone(), healthy.clone()];
    let (ce, c) = client(members.clone());
    let owned_by = |m: usize| -> Vec<u8> {
        (0..)
            .map(|i| format!("key-{i}").into_bytes())
            .find(|k| kvxfer::store::placement::owners(&members, k, 1, |_| true)[0] == m)
            .unwrap()
    };
    let (to_hung, to_healthy) = (owned_by(0), owned_by(1));
    let buf = ce.allocate(4096, Location::Any).unwrap();
    let hung_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (c, buf, to_hung, hung_done) = (&c, &buf, &to_hung, &hung_done);
        s.spawn(move || {
            tx.send(()).unwrap();
            // Connects to the hung member and waits out its connect timeout.
            let _ = c.batch_put_from(&[to_hung], &[buf.addr()], &[4096]);
            hung_done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        rx.recv().unwrap();
        // Give the first put the head start of a real connect attempt: wait until the
        // hung listener has the connection queued.
        let _conn = hung.accept().unwrap();
        let r = c
            .batch_put_from(&[&to_healthy], &[buf.addr()], &[4096])
            .unwrap();
        assert_eq!(r, vec![Ok(())]);
        assert!(
            !hung_done.load(std::sync::atomic::Ordering::SeqCst),
            "the healthy member's put waited for the hung member"
        );
    });
}

/// `Duration::MAX` timeouts mean "practically never", not a panic.
#[test]
fn huge_timeouts_are_not_a_panic() {
    let (_ne, node) = node(16 << 20, None);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_session = dead.local_addr().unwrap().to_string();
    drop(dead);
    let ce = engine();
    let c = Store::setup(
        Arc::clone(&ce),
        StoreConfig {
            members: vec![dead_session, node.members()[0].clone()],
            timeout: Duration::MAX,
            member_retry: Duration::MAX,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let buf = ce.allocate(4096, Location::Any).unwrap();
    let keys: Vec<Vec<u8>> = (0..16).map(|i| format!("m{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let put = c
        .batch_put_from(&refs, &[buf.addr(); 16], &[4096; 16])
        .unwrap();
    assert!(put.iter().all(|r| r.is_ok()), "{put:?}");
    let got = c
        .batch_get_into(&refs, &[buf.addr(); 16], &[4096; 16])
        .unwrap();
    assert!(got.iter().all(|r| *r == Ok(4096)), "{got:?}");
}

/// One segment per engine: a second contributing store on the same engine is refused,
/// and dropping a client store does not stop the engine serving its segment.
#[test]
fn one_segment_per_engine() {
    let (ne, node) = node(16 << 20, None);
    let second = Store::setup(
        Arc::clone(&ne),
        StoreConfig {
            segment: Some(SegmentConfig {
                memory_bytes: 16 << 20,
                ..SegmentConfig::default()
            }),
            ..StoreConfig::default()
        },
    );
    assert!(
        matches!(&second, Err(kvxfer::store::StoreError::Segment(why)) if why.contains("already serves")),
        "{second:?}"
    );
    let plain = Store::setup(
        Arc::clone(&ne),
        StoreConfig {
            members: node.members(),
            ..StoreConfig::default()
        },
    )
    .unwrap();
    drop(plain);
    assert!(ne.store_service().is_some(), "the segment stopped serving");
}

/// A remove right after a get is not refused as busy: the get's leases are released
/// first.
#[test]
fn remove_right_after_get_is_not_busy() {
    let (_ne, node) = node(16 << 20, None);
    let (ce, c) = client(node.members());
    let buf = ce.allocate(8 * 4096, Location::Any).unwrap();
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("r{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let ptrs: Vec<u64> = (0..8).map(|i| buf.addr() + i * 4096).collect();
    for round in 0..20 {
        let put = c.batch_put_from(&refs, &ptrs, &[4096; 8]).unwrap();
        assert!(put.iter().all(|r| r.is_ok()), "round {round}: {put:?}");
        let got = c.batch_get_into(&refs, &ptrs, &[4096; 8]).unwrap();
        assert!(got.iter().all(|r| *r == Ok(4096)), "round {round}: {got:?}");
        let removed = c.remove(&refs).unwrap();
        assert!(
            removed.iter().all(|r| r.is_ok()),
            "round {round}: {removed:?}"
        );
    }
}
