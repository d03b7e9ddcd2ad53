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

/// An engine on loopback with only `transports` (the child gets them by `CHILD_ENV`).
fn engine_with(transports: &str) -> Engine {
    let kinds = kvxfer::transport::parse_transport_list(transports).unwrap();
    let config = EngineConfig::builder()
        .listen(Some("127.0.0.1:0"))
        .transports(&kinds)
        .build()
        .unwrap();
    Engine::new(config).unwrap()
}

/// Prints a line the parent picks out of the test harness's output.
fn say(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{MARK}{line}").unwrap();
    out.flush().unwrap();
}

/// `KVX_GPU_DEVICE` and `KVX_GPU_SALT` of a child (0 and 11 unless set).
fn child_device_and_salt() -> (u32, u8) {
    let var = |name: &str, default: u32| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (var("KVX_GPU_DEVICE", 0), var("KVX_GPU_SALT", 11) as u8)
}

/// The decode process: GPU memory for 64 pages on `KVX_GPU_DEVICE`, registered; says
/// where; waits for the notification; checks every page against the pattern of
/// `KVX_GPU_SALT`; says the verdict; serves READs until stdin closes.
#[test]
fn child_process_entry() {
    let Ok(transports) = std::env::var(CHILD_ENV) else {
        return;
    };
    use std::io::BufRead;
    let (device, salt) = child_device_and_salt();
    let engine = engine_with(&transports);
    let vram = DeviceBuffer::alloc(device, PAGE * PAGES).unwrap();
    // SAFETY: the buffer outlives its registration (unregistered below).
    unsafe {
        engine
            .register(vram.addr(), vram.len() as u64, None, Access::ALL)
            .unwrap();
    }
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
    let want = pattern(PAGE * PAGES, salt);
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

/// Prefill writes 64 KV pages from its GPU memory into a decode process's GPU memory
/// (same host, same GPU) over `transports`, with a notification after the data; the
/// decode process checks every page; then prefill reads the pages back from the decode
/// process's GPU memory into its own and checks them. Returns the transport used.
/// A child process running `entry` of this test binary with `env`; its stdin (closing it
/// ends a decode child) and the lines it says.
struct Child {
    process: std::process::Child,
    lines: Box<dyn Iterator<Item = String>>,
}

impl Child {
    fn spawn(entry: &str, env: &[(&str, String)]) -> Child {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe().unwrap();
        let mut command = Command::new(exe);
        command.args(["--exact", entry, "--nocapture", "--test-threads=1"]);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut process = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(process.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.split_once(MARK).map(|(_, r)| r.to_string()));
        Child {
            process,
            lines: Box::new(lines),
        }
    }

    fn next_line(&mut self, what: &str) -> String {
        self.lines
            .next()
            .unwrap_or_else(|| panic!("the child said no {what}"))
    }

    /// A decode child on `device` with `transports`: its session and GPU address.
    fn decode(transports: &str, device: u32, salt: u8) -> (Child, String, u64) {
        let mut child = Child::spawn(
            "child_process_entry",
            &[
                (CHILD_ENV, transports.to_string()),
                ("KVX_GPU_DEVICE", device.to_string()),
                ("KVX_GPU_SALT", salt.to_string()),
            ],
        );
        let ready = child.next_line("ready line");
        let f: Vec<&str> = ready.split_whitespace().collect();
        assert_eq!(f[0], "ready", "{ready}");
        let remote = u64::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap();
        (child, f[1].to_string(), remote)
    }

    /// Closes stdin and waits for the process.
    fn finish(mut self) {
        drop(self.process.stdin.take());
        let _ = self.process.wait();
    }
}

fn pages_between_processes(transports: &str) -> TransportKind {
    pages_between_gpus(transports, 0, 0)
}

fn pages_between_gpus(transports: &str, local_gpu: u32, remote_gpu: u32) -> TransportKind {
    let (mut child, session, remote) = Child::decode(transports, remote_gpu, 11);
    let session = session.as_str();
    let engine = engine_with(transports);
    let src = DeviceBuffer::alloc(local_gpu, PAGE * PAGES).unwrap();
    let back = DeviceBuffer::alloc(local_gpu, PAGE * PAGES).unwrap();
    src.copy_from_host(0, &pattern(PAGE * PAGES, 11)).unwrap();
    for v in [&src, &back] {
        // SAFETY: the buffers outlive their registrations (unregistered below).
        unsafe {
            engine
                .register(v.addr(), v.len() as u64, None, Access::ALL)
                .unwrap();
        }
    }
    let peer = engine.open_peer(session).unwrap();
    let page_ops = |op: fn(u64, u64, u64) -> Op, local: u64| -> Vec<Op> {
        (0..PAGES as u64)
            .map(|i| {
                op(
                    local + i * PAGE as u64,
                    remote + i * PAGE as u64,
                    PAGE as u64,
                )
            })
            .collect()
    };
    let t = std::time::Instant::now();
    let id = engine
        .submit_with_notify(peer, &page_ops(Op::write, src.addr()), b"pages ready")
        .unwrap();
    let transport = engine.batch_transport(id).unwrap();
    assert!(engine
        .wait(id, std::time::Duration::from_secs(60))
        .unwrap()
        .into_result()
        .unwrap());
    let took = t.elapsed();
    engine.free(id).unwrap();
    let done = child.next_line("verdict");
    // Read the pages back into another GPU buffer (the peer's GPU end of a READ).
    engine
        .transfer_sync(peer, &page_ops(Op::read, back.addr()))
        .unwrap();
    child.finish();
    println!(
        "{PAGES} pages of {PAGE} bytes cuda:{local_gpu} -> cuda:{remote_gpu} across processes over {transport} in {took:?}: {done}"
    );
    assert_eq!(done, "done pages ready bad=0");
    let mut got = vec![0u8; PAGE * PAGES];
    back.copy_to_host(0, &mut got).unwrap();
    assert!(
        got == pattern(PAGE * PAGES, 11),
        "pages read back over {transport} differ"
    );
    for v in [&src, &back] {
        engine.unregister(v.addr()).unwrap();
    }
    transport
}

/// Same host: CUDA IPC over the shm transport.
#[test]
fn prefill_writes_pages_into_the_decode_processes_gpu_memory() {
    let Some(_cuda) = gpu() else { return };
    assert_eq!(pages_between_processes("shm,tcp"), TransportKind::Shm);
}

/// Prefill on GPU 0, decode on GPU 1: CUDA IPC with peer access (NVLink or PCIe).
#[test]
fn prefill_on_one_gpu_writes_into_decode_on_another() {
    let Some(cuda) = gpu() else { return };
    if cuda.device_count() < 2 {
        println!(
            "skipped: needs two GPUs (the driver sees {})",
            cuda.device_count()
        );
        return;
    }
    assert_eq!(pages_between_gpus("shm,tcp", 0, 1), TransportKind::Shm);
}

/// The prefill side of the tensor-parallel test: rank `KVX_GPU_SALT` on `KVX_GPU_DEVICE`
/// writes its 64 pages into its decode rank (`KVX_GPU_PEER`: session and address) with a
/// notification, and says how it went.
#[test]
fn prefill_process_entry() {
    let Ok(peer) = std::env::var("KVX_GPU_PEER") else {
        return;
    };
    let (device, salt) = child_device_and_salt();
    let (session, remote) = peer.split_once(' ').unwrap();
    let remote = u64::from_str_radix(remote.trim_start_matches("0x"), 16).unwrap();
    let engine = engine_with("shm,tcp");
    let src = DeviceBuffer::alloc(device, PAGE * PAGES).unwrap();
    src.copy_from_host(0, &pattern(PAGE * PAGES, salt)).unwrap();
    // SAFETY: the buffer outlives its registration (unregistered below).
    unsafe {
        engine
            .register(src.addr(), src.len() as u64, None, Access::ALL)
            .unwrap();
    }
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
    let id = engine
        .submit_with_notify(peer, &ops, format!("rank {salt}").as_bytes())
        .unwrap();
    let transport = engine.batch_transport(id).unwrap();
    let state = engine.wait(id, std::time::Duration::from_secs(60)).unwrap();
    say(format!("sent over {transport}: {state:?}"));
    engine.free(id).unwrap();
    engine.unregister(src.addr()).unwrap();
}

/// Tensor parallelism 2 on each side: prefill ranks 0 and 1 (two processes) each write
/// their pages into decode rank 0 and 1 (two more processes), at the same time; each
/// decode rank checks it got its own prefill rank's pages. Spread over the GPUs there are
/// (prefill rank r on GPU r, decode rank r on GPU r + n/2, modulo n), else all on GPU 0.
#[test]
fn tensor_parallel_prefill_ranks_write_to_their_decode_ranks() {
    let Some(cuda) = gpu() else { return };
    let n = cuda.device_count();
    let decode: Vec<(Child, String, u64)> = (0..2u32)
        .map(|r| Child::decode("shm,tcp", (r + n / 2) % n, r as u8 + 1))
        .collect();
    let prefill: Vec<Child> = (0..2u32)
        .map(|r| {
            let (_, session, addr) = &decode[r as usize];
            Child::spawn(
                "prefill_process_entry",
                &[
                    ("KVX_GPU_PEER", format!("{session} {addr:#x}")),
                    ("KVX_GPU_DEVICE", (r % n).to_string()),
                    ("KVX_GPU_SALT", (r + 1).to_string()),
                ],
            )
        })
        .collect();
    for (r, mut p) in prefill.into_iter().enumerate() {
        let line = p.next_line("report");
        assert!(line.ends_with("Completed"), "prefill rank {r}: {line}");
        println!("prefill rank {r} on cuda:{}: {line}", r as u32 % n);
        p.finish();
    }
    for (r, (mut d, _, _)) in decode.into_iter().enumerate() {
        let verdict = d.next_line("verdict");
        assert_eq!(
            verdict,
            format!("done rank {} bad=0", r + 1),
            "decode rank {r}"
        );
        d.finish();
    }
}

/// TCP only: both ends stage their GPU memory through pinned host buffers.
#[test]
fn tcp_stages_gpu_memory_on_both_ends() {
    let Some(_cuda) = gpu() else { return };
    assert_eq!(pages_between_processes("tcp"), TransportKind::Tcp);
}

/// Two engines of one process over TCP, larger than the staging pipeline (several
/// chunks in flight), WRITE and READ with GPU memory on one end and host memory on the
/// other, in both arrangements: each side stages only its own GPU end.
#[test]
fn tcp_staging_with_gpu_memory_on_one_end() {
    let Some(_cuda) = gpu() else { return };
    const LEN: usize = 80 << 20; // five 16 MiB staging slots
    let (a, b) = (engine_with("tcp"), engine_with("tcp"));
    let vram_a = DeviceBuffer::alloc(0, LEN).unwrap();
    let vram_b = DeviceBuffer::alloc(0, LEN).unwrap();
    register_vram(&a, &vram_a);
    register_vram(&b, &vram_b);
    let host_a = a.allocate(LEN, Location::Any).unwrap();
    let host_b = b.allocate(LEN, Location::Any).unwrap();
    let peer = a.open_peer(b.session_id().unwrap()).unwrap();
    let image = pattern(LEN, 5);
    // a's VRAM -> b's host memory (a stages), 5 MiB ops.
    vram_a.copy_from_host(0, &image).unwrap();
    let op = 5u64 << 20;
    let ops = |local: u64, remote: u64, write: bool| -> Vec<Op> {
        (0..LEN as u64 / op)
            .map(|i| {
                let (l, r) = (local + i * op, remote + i * op);
                if write {
                    Op::write(l, r, op)
                } else {
                    Op::read(l, r, op)
                }
            })
            .collect()
    };
    let id = a
        .submit(peer, &ops(vram_a.addr(), host_b.addr(), true))
        .unwrap();
    assert_eq!(a.batch_transport(id).unwrap(), TransportKind::Tcp);
    assert!(a
        .wait(id, std::time::Duration::from_secs(60))
        .unwrap()
        .into_result()
        .unwrap());
    a.free(id).unwrap();
    assert!(host_b.to_vec() == image, "VRAM -> remote host differs");
    // b's host -> a's host -> (READ) ... a reads b's VRAM into its host memory (b stages).
    vram_b.copy_from_host(0, &pattern(LEN, 9)).unwrap();
    a.transfer_sync(peer, &ops(host_a.addr(), vram_b.addr(), false))
        .unwrap();
    assert!(
        host_a.to_vec() == pattern(LEN, 9),
        "remote VRAM -> host differs"
    );
    // a's host -> b's VRAM (b stages), then a reads b's VRAM into a's VRAM (both stage).
    host_a.write_at(0, &pattern(LEN, 13)).unwrap();
    a.transfer_sync(peer, &ops(host_a.addr(), vram_b.addr(), true))
        .unwrap();
    a.transfer_sync(peer, &ops(vram_a.addr(), vram_b.addr(), false))
        .unwrap();
    let mut got = vec![0u8; LEN];
    vram_a.copy_to_host(0, &mut got).unwrap();
    assert!(
        got == pattern(LEN, 13),
        "host -> remote VRAM -> VRAM differs"
    );
    a.unregister(vram_a.addr()).unwrap();
    b.unregister(vram_b.addr()).unwrap();
}

/// Bad GPU memory gets a clear error and moves nothing: a range running past its
/// allocation, host memory labelled GPU memory, the wrong device, and an allocation freed
/// while registered (in-process, and as a TCP peer's target).
#[test]
fn bad_gpu_memory_is_refused() {
    let Some(cuda) = gpu() else { return };
    let engine = engine_with("tcp");
    let vram = DeviceBuffer::alloc(0, 1 << 20).unwrap();
    // SAFETY: refused (asserted below), so nothing stays registered.
    let past = unsafe { engine.register(vram.addr(), 2 << 20, None, Access::ALL) };
    let text = past.expect_err("past the allocation").to_string();
    assert!(text.contains("runs past the end"), "{text}");
    let mut host = vec![1u8; 4096];
    // SAFETY: refused (asserted below), so nothing stays registered.
    let labelled = unsafe {
        engine.register(
            host.as_mut_ptr() as u64,
            4096,
            Some(Location::Cuda(0)),
            Access::ALL,
        )
    };
    let text = labelled.expect_err("host memory as cuda:0").to_string();
    assert!(text.contains("not (or no longer) device memory"), "{text}");
    // SAFETY: refused (asserted below), so nothing stays registered.
    let wrong = unsafe {
        engine.register(
            vram.addr(),
            4096,
            Some(Location::Cuda(cuda.device_count())),
            Access::ALL,
        )
    };
    let text = wrong.expect_err("the wrong device").to_string();
    assert!(text.contains("the memory is on cuda:0"), "{text}");

    // Freed while registered: in-process batches are refused before any copy.
    let host_buf = engine.allocate(1 << 20, Location::Any).unwrap();
    let doomed = DeviceBuffer::alloc(0, 1 << 20).unwrap();
    let doomed_addr = doomed.addr();
    register_vram(&engine, &doomed);
    drop(doomed);
    let me = engine.local_peer();
    match engine.submit(me, &[Op::write(host_buf.addr(), doomed_addr, 4096)]) {
        Err(kvxfer::Error::GpuMemoryGone { .. }) => {}
        other => panic!("expected GpuMemoryGone, got {other:?}"),
    }
    // ... and a TCP peer's server refuses to copy into it.
    let other = engine_with("tcp");
    let peer = other.open_peer(engine.session_id().unwrap()).unwrap();
    let src = other.allocate(4096, Location::Any).unwrap();
    let id = other
        .submit(peer, &[Op::write(src.addr(), doomed_addr, 4096)])
        .unwrap();
    let state = other.wait(id, std::time::Duration::from_secs(10)).unwrap();
    let text = state.into_result().expect_err("a freed target").to_string();
    assert!(text.contains("its GPU could not copy the bytes"), "{text}");
    other.free(id).unwrap();
    engine.unregister(doomed_addr).unwrap();
    assert!(host.iter().all(|&x| x == 1));
}
