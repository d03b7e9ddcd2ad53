//! GPU memory on a machine with the CUDA driver (the H100 of the `device` tool): device
//! memory registered without a location is detected as `cuda:N`, in-process batches that
//! touch it are moved by the GPU's copy engines (never by the CPU), and the bytes land.
//! Without a driver every test says why it is skipped.

use kvxfer::sys::cuda::{driver, DeviceBuffer};
use kvxfer::{Access, Engine, EngineConfig, Location, Op, TransportKind};

/// The driver, or `None` after saying why the test is skipped.
fn gpu() -> Option<&'static kvxfer::sys::cuda::Cuda> {
    match driver() {
        Ok(cuda) if cuda.device_count() > 0 => Some(cuda),
        Ok(_) => {
            println!("skipped: the CUDA driver sees no device");
            None
        }
        Err(e) => {
            println!("skipped: no CUDA driver ({e})");
            None
        }
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 12) as u8)
        .collect()
}

/// Registers device memory without a location (detection must say cuda:0).
fn register_vram(engine: &Engine, vram: &DeviceBuffer) {
    // SAFETY: every buffer outlives the engine in these tests.
    unsafe {
        engine
            .register(vram.addr(), vram.len() as u64, None, Access::ALL)
            .unwrap();
    }
    let region = engine.region(vram.addr()).expect("registered");
    assert_eq!(region.location(), Location::Cuda(0), "VRAM not detected");
}

#[test]
fn device_memory_is_detected() {
    let Some(_cuda) = gpu() else { return };
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let vram = DeviceBuffer::alloc(0, 1 << 20).expect("cuMemAlloc");
    register_vram(&engine, &vram);
    let host = engine.allocate(1 << 20, Location::Any).unwrap();
    assert!(
        !matches!(
            engine.region(host.addr()).unwrap().location(),
            Location::Cuda(_)
        ),
        "host memory taken for VRAM"
    );
    engine.unregister(vram.addr()).unwrap();
}

/// 64 KV pages host → VRAM (scattered slots), VRAM → VRAM, VRAM → host, each one batch
/// moved by the copy engines, every byte checked.
#[test]
fn in_process_batches_through_gpu_memory() {
    let Some(_cuda) = gpu() else { return };
    const PAGE: usize = 256 << 10;
    const PAGES: usize = 64;
    const LEN: usize = PAGE * PAGES;
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let src = engine.allocate(LEN, Location::Any).unwrap();
    let back = engine.allocate(LEN, Location::Any).unwrap();
    let a = DeviceBuffer::alloc(0, LEN).unwrap();
    let b = DeviceBuffer::alloc(0, LEN).unwrap();
    register_vram(&engine, &a);
    register_vram(&engine, &b);
    let image = pattern(LEN, 7);
    src.write_at(0, &image).unwrap();
    let me = engine.local_peer();
    let slot = |i: usize| ((i * 37) % PAGES) * PAGE;
    // host -> VRAM a, page i to slot(i)
    let ops: Vec<Op> = (0..PAGES)
        .map(|i| {
            Op::write(
                src.addr() + (i * PAGE) as u64,
                a.addr() + slot(i) as u64,
                PAGE as u64,
            )
        })
        .collect();
    let id = engine.submit(me, &ops).unwrap();
    assert_eq!(engine.batch_transport(id).unwrap(), TransportKind::Cuda);
    assert!(engine
        .wait(id, std::time::Duration::from_secs(30))
        .unwrap()
        .into_result()
        .unwrap());
    engine.free(id).unwrap();
    let mut got = vec![0u8; LEN];
    a.copy_to_host(0, &mut got).unwrap();
    for i in 0..PAGES {
        assert!(
            got[slot(i)..slot(i) + PAGE] == image[i * PAGE..(i + 1) * PAGE],
            "page {i} differs in VRAM"
        );
    }
    // VRAM a -> VRAM b (one op), then VRAM b -> host (READ into host).
    engine
        .transfer_sync(me, &[Op::write(a.addr(), b.addr(), LEN as u64)])
        .unwrap();
    engine
        .transfer_sync(me, &[Op::read(back.addr(), b.addr(), LEN as u64)])
        .unwrap();
    assert!(back.to_vec() == got, "VRAM -> VRAM -> host differs");
    for v in [&a, &b] {
        engine.unregister(v.addr()).unwrap();
    }
    println!("{PAGES} pages of {PAGE} bytes through VRAM: ok");
}

const CHILD_ENV: &str = "KVX_GPU_CHILD";
const MARK: &str = "KVXGPU ";
const PAGE: usize = 256 << 10;
const PAGES: usize = 64;

/// The decode process: GPU memory for 64 pages, registered; says where; waits for the
/// notification; checks every page; says the verdict.
#[test]
fn child_process_entry() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    use std::io::{BufRead, Write};
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "\n{MARK}{line}").unwrap();
        out.flush().unwrap();
    };
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let vram = DeviceBuffer::alloc(0, PAGE * PAGES).unwrap();
    register_vram(&engine, &vram);
    say(format!(
        "ready {} {:#x}",
        engine.session_id().unwrap(),
        vram.addr()
    ));
    let note = engine
        .wait_notification(std::time::Duration::from_secs(60))
        .expect("the prefill's notification");
    let mut got = vec![0u8; PAGE * PAGES];
    vram.copy_to_host(0, &mut got).unwrap();
    let want = pattern(PAGE * PAGES, 11);
    let bad = (0..PAGES)
        .filter(|&i| got[i * PAGE..(i + 1) * PAGE] != want[i * PAGE..(i + 1) * PAGE])
        .count();
    say(format!(
        "done {} bad={bad}",
        String::from_utf8_lossy(&note.bytes)
    ));
    // Stay until the parent is done (it closes our stdin).
    let _ = std::io::stdin().lock().lines().count();
    engine.unregister(vram.addr()).unwrap();
}

/// Prefill writes 64 KV pages from its GPU memory into the decode process's GPU memory
/// (same host, same GPU: CUDA IPC), with a notification after the data; the decode
/// process checks every page.
#[test]
fn prefill_writes_pages_into_the_decode_processes_gpu_memory() {
    let Some(_cuda) = gpu() else { return };
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "decode")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_once(MARK).map(|(_, r)| r.to_string()));
    let ready = lines.next().expect("the decode process's ready line");
    let f: Vec<&str> = ready.split_whitespace().collect();
    assert_eq!(f[0], "ready", "{ready}");
    let (session, remote) = (
        f[1],
        u64::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap(),
    );
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let src = DeviceBuffer::alloc(0, PAGE * PAGES).unwrap();
    src.copy_from_host(0, &pattern(PAGE * PAGES, 11)).unwrap();
    register_vram(&engine, &src);
    let peer = engine.open_peer(session).unwrap();
    let ops: Vec<Op> = (0..PAGES as u64)
        .map(|i| {
            Op::write(
                src.addr() + i * PAGE as u64,
                remote + i * PAGE as u64,
                PAGE as u64,
            )
        })
        .collect();
    let t = std::time::Instant::now();
    let id = engine
        .submit_with_notify(peer, &ops, b"pages ready")
        .unwrap();
    let transport = engine.batch_transport(id).unwrap();
    assert!(engine
        .wait(id, std::time::Duration::from_secs(60))
        .unwrap()
        .into_result()
        .unwrap());
    let took = t.elapsed();
    engine.free(id).unwrap();
    let done = lines.next().expect("the decode process's verdict");
    drop(child.stdin.take());
    let _ = child.wait();
    println!(
        "{PAGES} pages of {PAGE} bytes GPU -> GPU across processes over {transport} in {took:?}: {done}"
    );
    assert_eq!(transport, TransportKind::Shm);
    assert_eq!(done, "done pages ready bad=0");
    engine.unregister(src.addr()).unwrap();
}
