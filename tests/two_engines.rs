//! Two engines in one process talking over real loopback sockets: the control plane,
//! TCP lanes and same-host shared memory (two engines of one process share a host, so
//! they prove it and use shm unless told otherwise), remote checks and notifications,
//! without process management. The data tests run once per transport.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvxfer::{Access, BatchState, Engine, EngineConfig, Error, Location, Op, TransportKind};

fn engine() -> Engine {
    Engine::new(EngineConfig::default()).unwrap()
}

/// An initiator that uses only `kind` to other processes, and a default target.
fn pair(kind: TransportKind) -> (Engine, Engine) {
    let config = EngineConfig::builder().transports(&[kind]).build().unwrap();
    (Engine::new(config).unwrap(), engine())
}

/// Runs `test` once over TCP and once over same-host shared memory.
fn each_transport(test: impl Fn(TransportKind)) {
    for kind in [TransportKind::Tcp, TransportKind::Shm] {
        test(kind);
    }
}

#[test]
fn write_read_and_notify_between_two_engines() {
    each_transport(|kind| {
        let (a, b) = pair(kind);
        let src = a.allocate(8 << 20, Location::Any).unwrap();
        let dst = b.allocate(8 << 20, Location::Any).unwrap();
        for i in 0..(8 << 20) / 4096 {
            src.fill(i * 4096, 4096, (i % 251) as u8).unwrap();
        }
        let peer = a.open_peer(b.session_id().unwrap()).unwrap();
        assert_eq!(a.open_peer(b.session_id().unwrap()).unwrap(), peer);
        assert_eq!(a.peer_transport(peer).unwrap(), kind);
        let ops: Vec<Op> = (0..128u64)
            .map(|i| Op::write(src.addr() + i * 65536, dst.addr() + i * 65536, 65536))
            .collect();
        let id = a.submit_with_notify(peer, &ops, b"pages ready").unwrap();
        assert_eq!(a.batch_transport(id).unwrap(), kind);
        let state = a.wait(id, Duration::from_secs(10)).unwrap();
        assert!(state.into_result().unwrap());
        let n = b
            .wait_notification(Duration::from_secs(5))
            .expect("notification");
        assert_eq!(n.bytes, b"pages ready");
        assert_eq!(n.from, a.session_id().unwrap());
        assert_eq!(dst.to_vec(), src.to_vec());

        // READ it back into a fresh buffer.
        let back = a.allocate(8 << 20, Location::Any).unwrap();
        a.transfer_sync(peer, &[Op::read(back.addr(), dst.addr(), 8 << 20)])
            .unwrap();
        assert_eq!(back.to_vec(), src.to_vec());
        assert!(a.probe_peer(peer).unwrap() < Duration::from_secs(1));
    });
}

#[test]
fn remote_checks_refuse_and_nothing_is_written() {
    each_transport(|kind| {
        let (a, b) = pair(kind);
        let src = a.allocate(1 << 20, Location::Any).unwrap();
        let ro = b
            .allocate_with_access(
                1 << 20,
                Location::Any,
                Access::REMOTE_READ | Access::LOCAL_READ | Access::LOCAL_WRITE,
            )
            .unwrap();
        src.fill(0, 1 << 20, 9).unwrap();
        let peer = a.open_peer(b.session_id().unwrap()).unwrap();
        let err = a
            .transfer_sync(peer, &[Op::write(src.addr(), ro.addr(), 4096)])
            .unwrap_err();
        assert!(matches!(err, Error::AccessDenied { .. }), "{err}");
        let err = a
            .transfer_sync(peer, &[Op::write(src.addr(), 0x1000, 4096)])
            .unwrap_err();
        assert!(matches!(err, Error::NotRegistered { .. }), "{err}");
        assert!(ro.to_vec().iter().all(|&x| x == 0));
    });
}

#[test]
fn memory_registered_later_is_seen_by_the_peer() {
    each_transport(|kind| {
        let (a, b) = pair(kind);
        let src = a.allocate(1 << 20, Location::Any).unwrap();
        src.fill(0, 1 << 20, 3).unwrap();
        let peer = a.open_peer(b.session_id().unwrap()).unwrap();
        let late = b.allocate(1 << 20, Location::Any).unwrap();
        a.transfer_sync(peer, &[Op::write(src.addr(), late.addr(), 1 << 20)])
            .unwrap();
        assert!(late.to_vec().iter().all(|&x| x == 3));
    });
}

#[test]
fn oversized_notification_is_refused_before_anything_moves() {
    let (a, b) = (engine(), engine());
    let src = a.allocate(4096, Location::Any).unwrap();
    let dst = b.allocate(4096, Location::Any).unwrap();
    src.fill(0, 4096, 1).unwrap();
    let peer = a.open_peer(b.session_id().unwrap()).unwrap();
    let huge = vec![0u8; (1 << 20) + 1];
    let err = a
        .submit_with_notify(peer, &[Op::write(src.addr(), dst.addr(), 4096)], &huge)
        .unwrap_err();
    assert!(matches!(err, Error::NotificationTooLarge { .. }), "{err}");
    assert_eq!(a.live_batches(), 0);
    assert!(dst.to_vec().iter().all(|&x| x == 0));
    assert!(b.notifications().is_empty());
}

/// Small batches (sent by the submitting thread itself when a lane is idle) and large ones
/// (sent by the I/O thread) from several threads at once: replies are matched to the right
/// requests and every byte lands where it was sent.
#[test]
fn small_and_large_batches_from_many_threads_interleave_correctly() {
    each_transport(|kind| {
        let (a, b) = pair(kind);
        const THREADS: usize = 4;
        const ROUNDS: usize = 300;
        let src = a.allocate(THREADS * (1 << 20), Location::Any).unwrap();
        let dst = b.allocate(THREADS * (1 << 20), Location::Any).unwrap();
        let back = a.allocate(THREADS * (1 << 20), Location::Any).unwrap();
        let peer = a.open_peer(b.session_id().unwrap()).unwrap();
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (a, src, dst, back) = (&a, &src, &dst, &back);
                scope.spawn(move || {
                    let base = (t << 20) as u64;
                    for round in 0..ROUNDS {
                        let byte = (t * 61 + round) as u8;
                        // Alternate a 4 KiB op, a batch of 8 small ops, and a 1 MiB op.
                        let (ops, len): (Vec<Op>, u64) = match round % 3 {
                            0 => (
                                vec![Op::write(src.addr() + base, dst.addr() + base, 4096)],
                                4096,
                            ),
                            1 => (
                                (0..8u64)
                                    .map(|i| {
                                        Op::write(
                                            src.addr() + base + i * 4096,
                                            dst.addr() + base + i * 4096,
                                            4096,
                                        )
                                    })
                                    .collect(),
                                8 * 4096,
                            ),
                            _ => (
                                vec![Op::write(src.addr() + base, dst.addr() + base, 1 << 20)],
                                1 << 20,
                            ),
                        };
                        src.fill(base as usize, len as usize, byte).unwrap();
                        a.transfer_sync(peer, &ops).unwrap();
                        a.transfer_sync(
                            peer,
                            &[Op::read(back.addr() + base, dst.addr() + base, len)],
                        )
                        .unwrap();
                        let mut got = vec![0u8; len as usize];
                        back.read_at(base as usize, &mut got).unwrap();
                        assert!(
                            got.iter().all(|&x| x == byte),
                            "thread {t} round {round}: wrong bytes"
                        );
                    }
                });
            }
        });
        assert_eq!(a.live_batches(), 0);
    });
}

/// A small batch mixing WRITEs and READs (small enough for the direct path) moves each op
/// in its own direction.
#[test]
fn small_mixed_batch_moves_each_op_in_its_own_direction() {
    each_transport(|kind| {
        let (a, b) = pair(kind);
        const N: u64 = 64;
        const L: u64 = 1024;
        let src = a.allocate((N * L) as usize, Location::Any).unwrap();
        let dst = a.allocate((N * L) as usize, Location::Any).unwrap();
        let remote = b.allocate((N * L) as usize, Location::Any).unwrap();
        src.fill(0, (N * L) as usize, 0xaa).unwrap();
        dst.fill(0, (N * L) as usize, 0x11).unwrap();
        remote.fill(0, (N * L) as usize, 0xbb).unwrap();
        let peer = a.open_peer(b.session_id().unwrap()).unwrap();
        let ops: Vec<Op> = (0..N)
            .map(|i| {
                if i % 2 == 0 {
                    Op::write(src.addr() + i * L, remote.addr() + i * L, L)
                } else {
                    Op::read(dst.addr() + i * L, remote.addr() + i * L, L)
                }
            })
            .collect();
        a.transfer_sync(peer, &ops).unwrap();
        let (rv, dv) = (remote.to_vec(), dst.to_vec());
        for i in 0..N as usize {
            let at = i * L as usize;
            if i % 2 == 0 {
                assert_eq!(rv[at], 0xaa, "op {i} (write)");
            } else {
                assert_eq!((rv[at], dv[at]), (0xbb, 0xbb), "op {i} (read)");
            }
        }
    });
}

/// Forwards one connection to `to` until `frozen` is set; then holds everything it reads.
fn freezable_proxy(to: String) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let frozen = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&frozen);
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(&to).unwrap();
        for (mut from, mut into) in [
            (client.try_clone().unwrap(), server.try_clone().unwrap()),
            (server, client),
        ] {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || stop.load(Ordering::SeqCst) || into.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                // Frozen or closed: keep both sockets open and silent.
                std::mem::forget((from, into));
            });
        }
    });
    (addr, frozen)
}

/// Two engines, the initiator opening the target through a proxy it can freeze, with one
/// notified batch already delivered (so the link is up).
fn frozen_pair(batch_timeout: Duration) -> (Engine, Engine, kvxfer::PeerId, Arc<AtomicBool>) {
    let a = Engine::new(
        EngineConfig::builder()
            .batch_timeout(batch_timeout)
            .build()
            .unwrap(),
    )
    .unwrap();
    let b = engine();
    let (proxy, frozen) = freezable_proxy(b.session_id().unwrap().to_string());
    let peer = a.open_peer(&proxy).unwrap();
    a.transfer_sync(peer, &[]).unwrap();
    (a, b, peer, frozen)
}

/// A notified batch to a peer that stops answering ends at cancel, not when the peer
/// answers (or the notification times out).
#[test]
fn cancel_does_not_wait_for_a_hung_peers_notification() {
    let (a, b, peer, frozen) = frozen_pair(Duration::from_secs(30));
    let src = a.allocate(4096, Location::Any).unwrap();
    let dst = b.allocate(4096, Location::Any).unwrap();
    let op = [Op::write(src.addr(), dst.addr(), 4096)];
    let id = a.submit_with_notify(peer, &op, b"first").unwrap();
    assert!(a
        .wait(id, Duration::from_secs(5))
        .unwrap()
        .into_result()
        .unwrap());
    a.free(id).unwrap();
    assert_eq!(
        b.wait_notification(Duration::from_secs(5)).unwrap().bytes,
        b"first"
    );

    frozen.store(true, Ordering::SeqCst);
    let id = a.submit_with_notify(peer, &op, b"second").unwrap();
    let start = Instant::now();
    let state = a.cancel(id).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        start.elapsed()
    );
    assert!(matches!(state, BatchState::Cancelled), "{state:?}");
    a.free(id).unwrap();
    let start = Instant::now();
    drop(a);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        start.elapsed()
    );
}

/// The same at the batch's deadline: the wait ends then, not at the end of the wait.
#[test]
fn deadline_does_not_wait_for_a_hung_peers_notification() {
    let (a, b, peer, frozen) = frozen_pair(Duration::from_millis(500));
    let src = a.allocate(4096, Location::Any).unwrap();
    let dst = b.allocate(4096, Location::Any).unwrap();
    let op = [Op::write(src.addr(), dst.addr(), 4096)];
    // While the proxy still forwards: the initiator learns the new region.
    a.transfer_sync(peer, &op).unwrap();
    frozen.store(true, Ordering::SeqCst);
    let id = a.submit_with_notify(peer, &op, b"late").unwrap();
    let start = Instant::now();
    let state = a.wait(id, Duration::from_secs(10)).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "wait took {:?}",
        start.elapsed()
    );
    assert!(
        matches!(
            state,
            BatchState::TimedOut | BatchState::Failed(Error::Notify(_))
        ),
        "{state:?}"
    );
    a.free(id).unwrap();
}

/// A batch touching a peer's GPU memory is never copied with the CPU there: over TCP the
/// peer's server stages GPU memory through pinned buffers, shared memory needs the peer's
/// CUDA IPC handle. Here the "GPU" memory is host memory declared cuda:0 and the peer has
/// no driver, so both refuse, and nothing moves.
#[test]
fn a_peers_gpu_memory_is_not_reached_by_cpu_copies() {
    each_transport(|kind| {
        let (a, b) = pair(kind);
        let src = a.allocate(4096, Location::Any).unwrap();
        let mut fake_vram = vec![3u8; 4096];
        // SAFETY: the vector outlives the engines' use of it (unregistered below).
        unsafe {
            b.register(
                fake_vram.as_mut_ptr() as u64,
                4096,
                Some(Location::Cuda(0)),
                Access::ALL,
            )
            .unwrap();
        }
        let peer = a.open_peer(b.session_id().unwrap()).unwrap();
        let op = Op::write(src.addr(), fake_vram.as_ptr() as u64, 4096);
        match a.submit(peer, &[op]) {
            // Shared memory asks the peer for the GPU region's CUDA IPC handle, which a
            // peer without a CUDA driver cannot give.
            Err(Error::Peer { reason, .. }) => assert!(
                kind == TransportKind::Shm
                    && reason
                        .contains("cannot be shared: this process does not use the CUDA driver"),
                "{kind}: {reason}"
            ),
            // TCP carries it to the peer's server, which must stage GPU memory through
            // pinned buffers and, without a driver, refuses the request.
            Ok(id) if kind == TransportKind::Tcp => {
                let state = a.wait(id, Duration::from_secs(10)).unwrap();
                let err = state.into_result().expect_err("the WRITE must fail");
                let text = err.to_string();
                assert!(text.contains("its GPU could not copy the bytes"), "{text}");
                a.free(id).unwrap();
            }
            other => panic!("{kind}: expected a refusal, got {other:?}"),
        }
        assert!(fake_vram.iter().all(|&x| x == 3), "{kind}: bytes moved");
        b.unregister(fake_vram.as_ptr() as u64).unwrap();
    });
}
