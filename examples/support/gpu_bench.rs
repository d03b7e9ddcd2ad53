//! `kvxfer_bench gpu`: in-process batches between pinned host memory and GPU memory (and
//! GPU to GPU) through the engine, next to the same copies issued directly on a CUDA
//! stream in the same program (the baseline: what the copy engines do without kvxfer).

use std::time::{Duration, Instant};

use kvxfer::sys::cuda::{driver, DeviceBuffer, PinnedHost, Stream};
use kvxfer::{Access, Engine, EngineConfig, Location, Op};

use super::{fmt_size, out_line, parse_flags, parse_seconds, percentile, usage_err, Failure, Res};

pub(super) const USAGE: &str = "\
  kvxfer_bench gpu       [--op h2d,d2h,d2d,ipc] [--block SIZE] [--batch N] [--duration SECS]

gpu        one engine, pinned host memory and two GPU buffers of --batch x --block bytes
           (default 16 x 256MiB) on cuda:0; per --op (default all three) one row moved
           by the engine (transport cuda) and one of the same copies queued directly on a
           CUDA stream (transport baseline). --op ipc: a second process (started here)
           registers GPU memory and this one writes into it through the engine (same host:
           CUDA IPC over the shm transport), next to a same-size GPU-to-GPU copy in this
           process. Needs the CUDA driver.
  kvxfer_bench pair --mem vram [--transport cuda|tcp] [--op write|read] [--block SIZE]
                    [--batch N] [--duration SECS] [--gpu N] [--target-gpu N]

pair --mem vram   GPU memory on both ends, a second process (started here) as the target:
           --transport cuda (default) carries it over shm with CUDA IPC (copies by the GPU),
           --transport tcp over TCP with both ends staging their GPU memory through pinned
           host buffers. Rows: the engine GPU to GPU; for tcp also the engine host to host
           (what staging costs); and a baseline GPU-to-GPU copy of the same bytes in this
           process (with --target-gpu other than --gpu: a peer-to-peer copy between the two
           GPUs, as cudaMemcpyPeer does). Default 16 x 256MiB (cuda) or 16 x 4MiB (tcp),
           both ends on GPU 0.";

#[derive(Debug)]
pub(super) struct GpuArgs {
    ops: Vec<&'static str>,
    block: u64,
    batch: usize,
    duration: Duration,
}

pub(super) fn parse_gpu(rest: &[String]) -> Res<GpuArgs> {
    let f = parse_flags("gpu", rest, &["op", "block", "batch", "duration"], &[])?;
    let ops = match f.value("op") {
        None => vec!["h2d", "d2h", "d2d"],
        Some(list) => list
            .split(',')
            .map(|o| match o.trim() {
                "h2d" => Ok("h2d"),
                "d2h" => Ok("d2h"),
                "d2d" => Ok("d2d"),
                "ipc" => Ok("ipc"),
                other => Err(usage_err(format!(
                    "--op {other:?}: expected h2d, d2h, d2d or ipc"
                ))),
            })
            .collect::<Res<Vec<_>>>()?,
    };
    Ok(GpuArgs {
        ops,
        block: f.size("block", 256 << 20)?,
        batch: match f.value("batch") {
            Some(n) => super::parse_count("batch", n, 4096)?,
            None => 16,
        },
        duration: match f.value("duration") {
            Some(d) => parse_seconds(d).map_err(usage_err)?,
            None => Duration::from_secs(3),
        },
    })
}

fn run_err(what: &str) -> impl Fn(String) -> Failure + '_ {
    move |e| Failure::Run(format!("{what}: {e}"))
}

pub(super) fn gpu_main(args: &GpuArgs) -> Res<()> {
    let cuda = driver().map_err(|e| Failure::Run(format!("no CUDA driver: {e}")))?;
    let len = args.block as usize * args.batch;
    let host = PinnedHost::alloc(len).map_err(|e| run_err("pinned host memory")(e.to_string()))?;
    let a = DeviceBuffer::alloc(0, len).map_err(|e| run_err("GPU memory")(e.to_string()))?;
    let b = DeviceBuffer::alloc(0, len).map_err(|e| run_err("GPU memory")(e.to_string()))?;
    let engine =
        Engine::new(EngineConfig::default()).map_err(|e| run_err("engine")(e.to_string()))?;
    for (addr, location) in [
        (host.addr(), Some(Location::Any)),
        (a.addr(), None),
        (b.addr(), None),
    ] {
        // SAFETY: the buffers outlive the engine's use of them (dropped after it).
        unsafe { engine.register(addr, len as u64, location, Access::ALL) }
            .map_err(|e| run_err("register")(e.to_string()))?;
    }
    eprintln!(
        "gpu: CUDA {} on {}, {} x {} per batch",
        cuda.version(),
        cuda.pci_bus_id(0).unwrap_or_default(),
        args.batch,
        fmt_size(args.block)
    );
    out_line(&format!(
        "{:<9} {:<5} {:>8} {:>5} {:>9} {:>10} {:>10}",
        "transport", "op", "block", "batch", "GB/s", "p50_us", "p99_us"
    ))?;
    let stream = Stream::new(0).map_err(|e| run_err("stream")(e.to_string()))?;
    let me = engine.local_peer();
    for &op in &args.ops {
        if op == "ipc" {
            ipc_point(&engine, &a, &b, &stream, args)?;
            continue;
        }
        // (source, destination) of each op i: block i of each buffer.
        let (src, dst) = match op {
            "h2d" => (host.addr(), a.addr()),
            "d2h" => (a.addr(), host.addr()),
            _ => (a.addr(), b.addr()),
        };
        let ops: Vec<Op> = (0..args.batch as u64)
            .map(|i| Op::write(src + i * args.block, dst + i * args.block, args.block))
            .collect();
        let engine_point =
            || -> Result<(), String> { engine.transfer_sync(me, &ops).map_err(|e| e.to_string()) };
        let baseline_point = || -> Result<(), String> {
            for o in &ops {
                // SAFETY: both ranges are this program's live buffers.
                unsafe { stream.copy_async(o.remote_addr, o.local_addr, o.len as usize) }
                    .map_err(|e| e.to_string())?;
            }
            stream.synchronize().map_err(|e| e.to_string())
        };
        for (name, point) in [
            ("cuda", &engine_point as &dyn Fn() -> Result<(), String>),
            ("baseline", &baseline_point),
        ] {
            point().map_err(run_err("warm-up"))?;
            let mut lat = Vec::new();
            let start = Instant::now();
            while start.elapsed() < args.duration {
                let t = Instant::now();
                point().map_err(run_err(name))?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            let secs = start.elapsed().as_secs_f64();
            let bytes = lat.len() as f64 * len as f64;
            lat.sort_unstable();
            out_line(&format!(
                "{:<9} {:<5} {:>8} {:>5} {:>9.2} {:>10.1} {:>10.1}",
                name,
                op,
                fmt_size(args.block),
                args.batch,
                bytes / secs / 1e9,
                percentile(&lat, 0.5) as f64 / 1e3,
                percentile(&lat, 0.99) as f64 / 1e3
            ))?;
        }
    }
    for addr in [host.addr(), a.addr(), b.addr()] {
        let _ = engine.unregister(addr);
    }
    drop(engine);
    Ok(())
}

/// An engine on loopback with the transports `list` (comma-separated), or the defaults.
fn engine_with(list: Option<&str>) -> Res<Engine> {
    let mut builder = EngineConfig::builder().listen(Some("127.0.0.1:0"));
    if let Some(list) = list {
        let kinds = kvxfer::transport::parse_transport_list(list).map_err(usage_err)?;
        builder = builder.transports(&kinds);
    }
    let config = builder.build().map_err(|e| usage_err(e.to_string()))?;
    Engine::new(config).map_err(|e| Failure::Run(format!("engine: {e}")))
}

/// The hidden `gpu-target` subcommand: GPU memory and host memory of `len` bytes each,
/// registered with an engine on `transports`; prints `ready <session> <gpu> <host>` and
/// serves until stdin closes.
pub(super) fn target_main(len: u64, transports: Option<&str>, gpu: u32) -> Res<()> {
    use std::io::BufRead;
    let vram = DeviceBuffer::alloc(gpu, len as usize).map_err(|e| Failure::Run(e.to_string()))?;
    let engine = engine_with(transports)?;
    // SAFETY: the buffer outlives the engine (dropped after it).
    unsafe { engine.register(vram.addr(), len, None, Access::ALL) }
        .map_err(|e| Failure::Run(e.to_string()))?;
    let host = engine
        .allocate(len as usize, Location::Any)
        .map_err(|e| Failure::Run(e.to_string()))?;
    out_line(&format!(
        "ready {} {} {}",
        engine.session_id().unwrap_or("?"),
        vram.addr(),
        host.addr()
    ))?;
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    let _ = engine.unregister(vram.addr());
    drop(host);
    drop(engine);
    Ok(())
}

/// A `gpu-target` process: its stdin (closing it ends the process), session and addresses.
struct Target {
    child: std::process::Child,
    session: String,
    vram: u64,
    host: u64,
}

impl Target {
    fn spawn(len: u64, transports: Option<&str>, gpu: u32) -> Res<Target> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe().map_err(|e| Failure::Run(e.to_string()))?;
        let mut command = Command::new(exe);
        command.args([
            "gpu-target",
            "--size",
            &len.to_string(),
            "--gpu",
            &gpu.to_string(),
        ]);
        if let Some(t) = transports {
            command.args(["--transports", t]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Failure::Run(format!("cannot start the target: {e}")))?;
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        let ready = lines
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| Failure::Run("the target said nothing".into()))?;
        let f: Vec<&str> = ready.split_whitespace().collect();
        let addr = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| Failure::Run(format!("bad address in {ready:?}")))
        };
        if f.len() != 4 || f[0] != "ready" {
            return Err(Failure::Run(format!("the target said {ready:?}")));
        }
        Ok(Target {
            session: f[1].to_string(),
            vram: addr(f[2])?,
            host: addr(f[3])?,
            child,
        })
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// `batch` ops of `block` bytes, op i between block i of `local` and of `remote`.
fn block_ops(write: bool, local: u64, remote: u64, block: u64, batch: usize) -> Vec<Op> {
    (0..batch as u64)
        .map(|i| {
            let (l, r) = (local + i * block, remote + i * block);
            if write {
                Op::write(l, r, block)
            } else {
                Op::read(l, r, block)
            }
        })
        .collect()
}

/// Runs `point` for `duration` (after one untimed run) and prints its row.
fn timed_row(
    name: &str,
    op: &str,
    args: &GpuArgs,
    point: &dyn Fn() -> Result<(), String>,
) -> Res<()> {
    point().map_err(run_err("warm-up"))?;
    let len = args.block * args.batch as u64;
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < args.duration {
        let t = Instant::now();
        point().map_err(run_err(name))?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    out_line(&format!(
        "{:<9} {:<5} {:>8} {:>5} {:>9.2} {:>10.1} {:>10.1}",
        name,
        op,
        fmt_size(args.block),
        args.batch,
        lat.len() as f64 * len as f64 / secs / 1e9,
        percentile(&lat, 0.5) as f64 / 1e3,
        percentile(&lat, 0.99) as f64 / 1e3
    ))
}

/// `kvxfer_bench pair --mem vram`.
#[derive(Debug)]
pub(super) struct GpuPairArgs {
    tcp: bool,
    write: bool,
    gpu: u32,
    target_gpu: u32,
    bench: GpuArgs,
}

pub(super) fn parse_pair(f: &super::Flags) -> Res<GpuPairArgs> {
    let tcp = match f.value("transport").unwrap_or("cuda") {
        "cuda" => false,
        "tcp" => true,
        other => {
            return Err(usage_err(format!(
                "--transport {other:?} with --mem vram: expected cuda or tcp"
            )))
        }
    };
    let write = match f.value("op").unwrap_or("write") {
        "write" => true,
        "read" => false,
        other => return Err(usage_err(format!("--op {other:?}: expected write or read"))),
    };
    let gpu = |name: &str| -> Res<u32> {
        f.value(name).map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| usage_err(format!("--{name} {v:?}: expected a GPU number")))
        })
    };
    Ok(GpuPairArgs {
        tcp,
        write,
        gpu: gpu("gpu")?,
        target_gpu: gpu("target-gpu")?,
        bench: GpuArgs {
            ops: Vec::new(),
            block: f.size("block", if tcp { 4 << 20 } else { 256 << 20 })?,
            batch: match f.value("batch") {
                Some(n) => super::parse_count("batch", n, 4096)?,
                None => 16,
            },
            duration: match f.value("duration") {
                Some(d) => parse_seconds(d).map_err(usage_err)?,
                None => Duration::from_secs(3),
            },
        },
    })
}

/// GPU memory on both ends, a `gpu-target` process as the peer.
pub(super) fn pair_main(args: &GpuPairArgs) -> Res<()> {
    let cuda = driver().map_err(|e| Failure::Run(format!("no CUDA driver: {e}")))?;
    let b = &args.bench;
    let len = b.block * b.batch as u64;
    let transports = if args.tcp { "tcp" } else { "shm" };
    let a = DeviceBuffer::alloc(args.gpu, len as usize)
        .map_err(|e| run_err("GPU memory")(e.to_string()))?;
    // The baseline's destination: on the target's GPU, as the engine's.
    let c = DeviceBuffer::alloc(args.target_gpu, len as usize)
        .map_err(|e| run_err("GPU memory")(e.to_string()))?;
    let engine = engine_with(Some(transports))?;
    // SAFETY: the buffer outlives the engine's use of it (unregistered before it drops).
    unsafe { engine.register(a.addr(), len, None, Access::ALL) }
        .map_err(|e| run_err("register")(e.to_string()))?;
    let host = engine
        .allocate(len as usize, Location::Any)
        .map_err(|e| run_err("host memory")(e.to_string()))?;
    let target = Target::spawn(len, Some(transports), args.target_gpu)?;
    let peer = engine
        .open_peer(&target.session)
        .map_err(|e| run_err("open the target")(e.to_string()))?;
    let op = if args.write { "write" } else { "read" };
    let gpu_ops = block_ops(args.write, a.addr(), target.vram, b.block, b.batch);
    let host_ops = block_ops(args.write, host.addr(), target.host, b.block, b.batch);
    let probe = engine
        .submit(peer, &gpu_ops[..1])
        .map_err(|e| run_err("probe batch")(e.to_string()))?;
    let transport = engine
        .batch_transport(probe)
        .map_err(|e| run_err("probe batch")(e.to_string()))?;
    engine
        .wait(probe, Duration::from_secs(60))
        .map_err(|e| run_err("probe batch")(e.to_string()))?
        .into_result()
        .map_err(|e| run_err("probe batch")(e.to_string()))?;
    let _ = engine.free(probe);
    eprintln!(
        "pair --mem vram: CUDA {}, cuda:{} ({}) -> target cuda:{} ({}), {} x {} per batch, \
         {op} over {transport}, target {}",
        cuda.version(),
        args.gpu,
        cuda.pci_bus_id(args.gpu).unwrap_or_default(),
        args.target_gpu,
        cuda.pci_bus_id(args.target_gpu).unwrap_or_default(),
        b.batch,
        fmt_size(b.block),
        target.session
    );
    out_line(&format!(
        "{:<9} {:<5} {:>8} {:>5} {:>9} {:>10} {:>10}",
        "transport", "op", "block", "batch", "GB/s", "p50_us", "p99_us"
    ))?;
    let sync = |ops: &[Op]| engine.transfer_sync(peer, ops).map_err(|e| e.to_string());
    timed_row(&format!("{transport}-vram"), op, b, &|| sync(&gpu_ops))?;
    if args.tcp {
        timed_row(&format!("{transport}-host"), op, b, &|| sync(&host_ops))?;
    }
    let stream = Stream::new(args.gpu).map_err(|e| run_err("stream")(e.to_string()))?;
    let local = block_ops(true, a.addr(), c.addr(), b.block, b.batch);
    let baseline = if args.gpu == args.target_gpu {
        "d2d"
    } else {
        for (from, to) in [(args.gpu, args.target_gpu), (args.target_gpu, args.gpu)] {
            let enabled = cuda
                .enable_peer_access(from, to)
                .map_err(|e| run_err("peer access")(e.to_string()))?;
            eprintln!("peer access cuda:{from} -> cuda:{to}: {enabled}");
        }
        "peer"
    };
    timed_row("baseline", baseline, b, &|| {
        for o in &local {
            // SAFETY: both ranges are this program's live GPU buffers.
            unsafe { stream.copy_async(o.remote_addr, o.local_addr, o.len as usize) }
                .map_err(|e| e.to_string())?;
        }
        stream.synchronize().map_err(|e| e.to_string())
    })?;
    // Close before the target goes, or the engine warns that the peer left.
    let _ = engine.close_peer(peer);
    drop(target);
    let _ = engine.unregister(a.addr());
    Ok(())
}

/// Cross-process GPU to GPU: this engine writes `a` into a `gpu-target` process's GPU
/// memory; the baseline is the same copy from `a` to `b` in this process.
fn ipc_point(
    engine: &Engine,
    a: &DeviceBuffer,
    b: &DeviceBuffer,
    stream: &Stream,
    args: &GpuArgs,
) -> Res<()> {
    let len = args.block * args.batch as u64;
    let target = Target::spawn(len, None, 0)?;
    let peer = engine
        .open_peer(&target.session)
        .map_err(|e| Failure::Run(e.to_string()))?;
    let ops = block_ops(true, a.addr(), target.vram, args.block, args.batch);
    let local = block_ops(true, a.addr(), b.addr(), args.block, args.batch);
    let transport = {
        let id = engine
            .submit(peer, &ops)
            .map_err(|e| Failure::Run(e.to_string()))?;
        let t = engine
            .batch_transport(id)
            .map_err(|e| Failure::Run(e.to_string()))?;
        engine
            .wait(id, Duration::from_secs(60))
            .map_err(|e| Failure::Run(e.to_string()))?
            .into_result()
            .map_err(|e| Failure::Run(e.to_string()))?;
        let _ = engine.free(id);
        t
    };
    let engine_point =
        || -> Result<(), String> { engine.transfer_sync(peer, &ops).map_err(|e| e.to_string()) };
    let baseline_point = || -> Result<(), String> {
        for o in &local {
            // SAFETY: both ranges are this program's live GPU buffers.
            unsafe { stream.copy_async(o.remote_addr, o.local_addr, o.len as usize) }
                .map_err(|e| e.to_string())?;
        }
        stream.synchronize().map_err(|e| e.to_string())
    };
    timed_row(&format!("{transport}-ipc"), "ipc", args, &engine_point)?;
    timed_row("baseline", "ipc", args, &baseline_point)?;
    let _ = engine.close_peer(peer);
    drop(target);
    Ok(())
}
