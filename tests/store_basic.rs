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
