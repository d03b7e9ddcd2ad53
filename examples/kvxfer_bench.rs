//! `kvxfer_bench`: the target/initiator tool every kvxfer throughput and latency figure
//! comes from. One row per point: transport, op, block, batch, GB/s, ops/s, p50/p99 batch
//! latency and the CPU seconds both sides spent on the point.
//!
//! ```text
//! kvxfer_bench target    [--listen HOST:PORT] [--size SIZE] [--memory buffer|caller] [--forever]
//! kvxfer_bench initiator --peer HOST:PORT [--transport tcp|shm|rdma|auto] [--device-list L] [BENCH OPTIONS]
//! kvxfer_bench pair      [--transport tcp|shm|rdma|local|auto] [--memory buffer|caller]
//!                        [--device-list L] [--target-device-list L] [BENCH OPTIONS]
//! ```
//!
//! Transports: `shm` (same host, another process: the initiator's CPU copies through the
//! target's memfd mapped into it, or by cross-memory attach for memory the target
//! registered itself), `tcp` (io_uring), `local` (one process, `pair` only). `auto` keeps
//! the engine's default order (shm, then tcp). The `transport` column is what actually
//! moved each point's batches (`Engine::batch_transport`), not what the peer prefers: a
//! batch goes over the first configured transport that reaches its memory.
//!
//! `--memory caller` makes the target map its region itself (anonymous `mmap`) and
//! register it with the unsafe `Engine::register`, as a server registers its own pool
//! (SGLang's pinned KV pool); over shm that memory is reached by cross-memory attach
//! (`process_vm_writev/readv`) instead of a shared memfd mapping.
//!
//! Build with `cargo build --release --example kvxfer_bench`; run `--help` for the
//! options. Sizes take binary suffixes only: `K`, `Ki`, `KiB` (and `KB`) all mean 1024,
//! likewise `M`/`G`/`T`, so `--block 4K` and `--block 4KiB` are the same 4096 bytes.
//!
//! How a point is measured, and why:
//! - Each thread owns a disjoint slice of the local buffer and of the remote region, and
//!   walks through it batch after batch (wrapping around), so a batch's ops never overlap
//!   each other or another thread's, and the bytes moved are not one cache-hot block.
//! - One untimed warm-up batch per thread precedes the point (first-touch costs, lane
//!   ramp-up); then every thread starts together at a barrier.
//! - Latency is submit → `wait` returning, per batch (`free` is outside it). GB/s and
//!   ops/s are the bytes and ops of all threads over the wall time of the point.
//! - The transport is per batch: one untimed probe op before the first point shows the
//!   stderr description line, and each thread records the transport of its first timed
//!   batch of every point for the row (distinct ones joined with `+`).
//! - CPU time is `getrusage(RUSAGE_SELF)` (user + system, every thread, so the engine's
//!   own I/O and copy threads count). In `pair` with a target process (tcp, shm, auto) the
//!   target is asked for its cumulative CPU before and after each point over its
//!   stdin/stdout (over shm it should be near zero: the initiator copies); with
//!   `--transport local` both sides are one process and all CPU is the initiator's.

use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Barrier};
use std::time::{Duration, Instant};

use kvxfer::{Access, Buffer, Engine, EngineConfig, Location, Op, PeerId, TransportKind};

#[path = "support/gpu_bench.rs"]
mod gpu_bench;
#[path = "support/sizes.rs"]
mod sizes;
use sizes::{fmt_size, parse_size};
#[path = "support/store_bench.rs"]
mod store_bench;

const USAGE: &str = "\
kvxfer_bench: throughput and latency of kvxfer transfers

USAGE:
  kvxfer_bench target    [--listen HOST:PORT] [--size SIZE] [--memory buffer|caller] [--forever]
  kvxfer_bench initiator --peer HOST:PORT [--transport tcp|shm|rdma|auto] [--device-list L] [BENCH OPTIONS]
  kvxfer_bench pair      [--transport tcp|shm|rdma|local|auto] [--memory buffer|caller]
                         [--device-list L] [--target-device-list L] [BENCH OPTIONS]
  kvxfer_bench memcpy    [BENCH OPTIONS]
  kvxfer_bench --help

target     starts an engine listening on --listen (default 127.0.0.1:0), registers one
           region of --size bytes (default 1GiB, every access right), prints
           `ready <session-id>` on stdout and serves until stdin reaches EOF (or, with
           --forever, until killed). A line `cpu` on stdin is answered with
           `cpu_s <seconds>` (its CPU time so far); at EOF it prints a last `cpu_s` line.
           Its CPU seconds also go to stderr when it exits or is stopped by SIGINT/SIGTERM.
           --memory buffer (default): the engine allocates it (Engine::allocate, memfd).
           --memory caller: the target maps it itself (anonymous mmap) and registers it
           with the unsafe Engine::register, like a server's own pool; over shm such
           memory is reached by cross-memory attach instead of a shared mapping.
initiator  opens the target --peer, picks its first region granting the remote rights the
           run needs, and runs the points against it.
pair       starts a target process (tcp, shm, auto; --memory goes to it) or, with local, a
           second region in the same engine, and runs the points against it.
memcpy     the baseline: one thread copying each batch's blocks between two buffers of
           --size with plain memcpy (no engine), same rows (transport `memcpy`); run it in
           the same session as the transports it is compared with.

--transport (initiator and pair; sets the initiator's engine transports):
  auto     the engine default: shm when the target proves it shares this host's memory,
           else tcp; per batch, the first that reaches its memory (default)
  shm      shm only; fails, with the reason, when the target is not reachable over shm
  tcp      tcp only
  rdma     RDMA only (verbs RC queue pairs); fails, with the reason, without usable NICs
  local    (pair only) both regions in one engine, in-process copies
  The transport column of each row is the one that actually moved the point's batches.
--device-list L (initiator, pair, target): the RDMA NICs of this process's engine, in any
  device-list form (`auto`, `mlx5_0,mlx5_1`, JSON, a .json file); --target-device-list L
  (pair): those of the target it starts (in the soft-RoCE VM: --device-list rxe1
  --target-device-list rxe0 makes the traffic cross the veth pair)

BENCH OPTIONS:
  --op write|read     direction (default write; with --sweep: both unless given)
  --block SIZE        bytes per op (default 64KiB)
  --batch N           ops per batch (default 128)
  --duration SECS     seconds per point (default 5, or 2 with --sweep)
  --threads N         submitting threads, each on its own slice of both buffers (default 1)
  --size SIZE         local buffer (and, for pair, the target's buffer) (default 1GiB);
                      for initiator the local buffer is at most the remote region's size
  --sweep             block {4Ki,64Ki,1Mi,4Mi} x batch {1,32,128} x op {write,read}
  --check             verify every byte moved (write: read back; read: pre-fill the
                      remote); a mismatch prints where and exits with status 1.
                      Throughput then includes verification: do not quote it.
  --json              one JSON object per point instead of the table

SIZE: a number with an optional binary suffix: K Ki KiB KB = 1024, M Mi MiB MB = 1024^2,
      G Gi GiB GB = 1024^3, T Ti TiB TB = 1024^4 (case-insensitive).

Columns: GB/s in 10^9 bytes/s; ops/s counts ops (not batches); p50_us/p99_us are batch
latencies (submit to wait return); cpu_init_s / cpu_tgt_s are CPU seconds (user+system, all
threads) each process spent during the point; `-` (JSON null) where not measurable: a
standalone initiator cannot see its target's CPU, and with --transport local both sides
are one process (all in cpu_init_s). JSON cpu_s = initiator + target (what was measured).

Environment: KVX_TCP_LANES, KVX_IO_THREADS, KVX_COPY_THREADS (and the other KVX_* engine
overrides) apply to both processes; KVX_TRANSPORTS conflicting with --transport tcp|shm is
refused. Exit status: 0 ok, 1 run failure or --check mismatch, 2 bad arguments.
";

/// Grid of `--sweep`: the KV page sizes that matter (4 KiB pages up to whole 4 MiB layer
/// chunks) against a lone op, a typical request and a large one.
const SWEEP_BLOCKS: [u64; 4] = [4 << 10, 64 << 10, 1 << 20, 4 << 20];
const SWEEP_BATCHES: [usize; 3] = [1, 32, 128];

/// How long the target may take to register its buffer and say `ready` (faulting in
/// gigabytes takes seconds), and to answer a `cpu` request.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Errors and exit status
// ---------------------------------------------------------------------------------------

/// Why the tool stops; each kind has its own exit status (see `main`).
#[derive(Debug)]
enum Failure {
    /// Bad command line: exit 2.
    Usage(String),
    /// `--check` found wrong bytes: exit 1.
    Mismatch(String),
    /// The engine, the target or the OS failed: exit 1.
    Run(String),
}

type Res<T> = Result<T, Failure>;

fn usage_err(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

/// Adds what we were doing to any error, so messages say more than the library's text.
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Res<T>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Res<T> {
        self.map_err(|e| Failure::Run(format!("{}: {e}", what())))
    }
}

/// Prints kvxfer's warnings (a fallback, a lane that died) to stderr: no fallback is silent.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    static LOGGER: StderrLog = StderrLog;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    // args_os: std::env::args() panics on an argument that is not UTF-8.
    let args: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let result = match args {
        Ok(args) => run(&args),
        Err(bad) => Err(usage_err(format!("argument {bad:?} is not valid UTF-8"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("kvxfer_bench: {msg}\nRun `kvxfer_bench --help` for usage.");
            ExitCode::from(2)
        }
        Err(Failure::Mismatch(msg)) => {
            eprintln!("kvxfer_bench: CHECK FAILED: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Run(msg)) => {
            eprintln!("kvxfer_bench: error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &[String]) -> Res<()> {
    match parse_command(args)? {
        Cmd::Help => {
            out_line(USAGE.trim_end())?;
            out_line(store_bench::USAGE)?;
            out_line(gpu_bench::USAGE)
        }
        Cmd::Target(t) => target_main(&t),
        Cmd::Initiator {
            peer,
            transport,
            bench,
        } => initiator_main(&peer, transport, &bench),
        Cmd::Pair {
            transport,
            memory,
            bench,
        } => pair_main(transport, memory, &bench),
        Cmd::Memcpy(bench) => memcpy_main(&bench),
        Cmd::Store(args) => store_bench::store_main(&args),
        Cmd::Gpu(args) => gpu_bench::gpu_main(&args),
        Cmd::GpuTarget(len, transports, gpu) => {
            gpu_bench::target_main(len, transports.as_deref(), gpu)
        }
        Cmd::GpuPair(args) => gpu_bench::pair_main(&args),
        Cmd::StoreNode(args) => store_bench::node_main(&args),
    }
}

/// The baseline the transports are measured against: one thread, plain `memcpy` of each
/// batch's blocks (source and destination slots cycling through two buffers of `--size`,
/// so large points do not stay in cache), latency per batch.
fn memcpy_main(args: &BenchArgs) -> Res<()> {
    let plan = args.plan();
    let len = usize_len(args.size, "--size")?;
    // Written once so every page is faulted in before timing, as registered memory is.
    let src = vec![0x5au8; len];
    let mut dst = vec![0xa5u8; len];
    let mut report = Report { json: plan.json };
    report.header()?;
    for p in &plan.points {
        let block = usize_len(p.block, "--block")?;
        let slots = len / block;
        if slots < p.batch {
            eprintln!(
                "# skipped memcpy {}x{}: needs {} per buffer, --size is {}",
                fmt_size(p.block),
                p.batch,
                fmt_size(p.block * p.batch as u64),
                fmt_size(args.size)
            );
            continue;
        }
        let cpu0 = process_cpu_s();
        let start = Instant::now();
        let mut lat = Vec::new();
        let (mut ops, mut next) = (0u64, 0usize);
        while start.elapsed() < plan.duration {
            let t = Instant::now();
            for _ in 0..p.batch {
                let at = (next % slots) * block;
                // READ and WRITE are the same copy here; the direction only names the row.
                dst[at..at + block].copy_from_slice(&src[at..at + block]);
                next += 1;
            }
            std::hint::black_box(&mut dst);
            lat.push(t.elapsed().as_nanos() as u64);
            ops += p.batch as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        lat.sort_unstable();
        report.row(&Row {
            transport: "memcpy".into(),
            dir: p.dir,
            block: p.block,
            batch: p.batch,
            gbps: (ops * p.block) as f64 / secs / 1e9,
            ops_per_s: ops as f64 / secs,
            p50_us: percentile(&lat, 0.50) as f64 / 1e3,
            p99_us: percentile(&lat, 0.99) as f64 / 1e3,
            cpu_initiator_s: process_cpu_s() - cpu0,
            cpu_target_s: None,
        })?;
    }
    Ok(())
}

/// Writes one line to stdout and flushes it. `println!` would panic when stdout is gone
/// (a closed pipe); here that is an error like any other.
fn out_line(line: &str) -> Res<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context(|| "cannot write to stdout".into())
}

// ---------------------------------------------------------------------------------------
// Size and argument parsing
// ---------------------------------------------------------------------------------------

/// Seconds as a positive finite number, optionally with an `s` suffix.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let t = t.strip_suffix('s').unwrap_or(t);
    match t.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "{text:?} is not a duration (seconds, > 0 and at most 86400)"
        )),
    }
}

fn parse_count(flag: &str, text: &str, max: usize) -> Res<usize> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(usage_err(format!(
            "--{flag} {text:?}: expected a whole number from 1 to {max}"
        ))),
    }
}

/// The flags given to one subcommand.
#[derive(Default)]
struct Flags {
    values: Vec<(&'static str, String)>,
    switches: Vec<&'static str>,
}

impl Flags {
    fn value(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.switches.contains(&name)
    }

    fn size(&self, name: &str, default: u64) -> Res<u64> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => match parse_size(v) {
                Ok(0) => Err(usage_err(format!("--{name} must be at least 1 byte"))),
                Ok(n) => Ok(n),
                Err(e) => Err(usage_err(format!("--{name}: {e}"))),
            },
        }
    }
}

/// Parses `--name value`, `--name=value` and `--switch` against the subcommand's known
/// flags. A flag given twice is refused: with wrapper scripts appending options, silently
/// keeping one of two values has produced mislabelled numbers before.
fn parse_flags(
    cmd: &str,
    args: &[String],
    valued: &[&'static str],
    switches: &[&'static str],
) -> Res<Flags> {
    let mut flags = Flags::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(body) = arg.strip_prefix("--") else {
            return Err(usage_err(format!(
                "unexpected argument {arg:?} for `{cmd}` (options start with --)"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        if let Some(&flag) = valued.iter().find(|f| **f == name) {
            let value = match inline {
                Some(v) => v,
                None => match args.get(i + 1) {
                    Some(v) if !v.starts_with("--") => {
                        i += 1;
                        v.clone()
                    }
                    _ => return Err(usage_err(format!("--{name} needs a value"))),
                },
            };
            if flags.value(flag).is_some() {
                return Err(usage_err(format!("--{name} is given twice")));
            }
            flags.values.push((flag, value));
        } else if let Some(&flag) = switches.iter().find(|f| **f == name) {
            if inline.is_some() {
                return Err(usage_err(format!("--{name} takes no value")));
            }
            if flags.has(flag) {
                return Err(usage_err(format!("--{name} is given twice")));
            }
            flags.switches.push(flag);
        } else {
            return Err(usage_err(format!("unknown option {arg:?} for `{cmd}`")));
        }
        i += 1;
    }
    Ok(flags)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Write,
    Read,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Write => "write",
            Dir::Read => "read",
        }
    }

    fn op(self, local: u64, remote: u64, len: u64) -> Op {
        match self {
            Dir::Write => Op::write(local, remote, len),
            Dir::Read => Op::read(local, remote, len),
        }
    }

    /// The right the target's region must grant.
    fn remote_access(self) -> Access {
        match self {
            Dir::Write => Access::REMOTE_WRITE,
            Dir::Read => Access::REMOTE_READ,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TransportChoice {
    Tcp,
    Shm,
    Rdma,
    Local,
    Auto,
}

impl TransportChoice {
    fn name(self) -> &'static str {
        match self {
            TransportChoice::Tcp => "tcp",
            TransportChoice::Shm => "shm",
            TransportChoice::Rdma => "rdma",
            TransportChoice::Local => "local",
            TransportChoice::Auto => "auto",
        }
    }

    /// The initiator engine's `transports` for this choice; `None` keeps the default.
    fn engine_transports(self) -> Option<&'static [TransportKind]> {
        match self {
            TransportChoice::Tcp => Some(&[TransportKind::Tcp]),
            TransportChoice::Shm => Some(&[TransportKind::Shm]),
            TransportChoice::Rdma => Some(&[TransportKind::Rdma]),
            TransportChoice::Local | TransportChoice::Auto => None,
        }
    }
}

/// Parses `--transport` against the choices the subcommand offers (default auto).
fn parse_transport(f: &Flags, allowed: &[TransportChoice]) -> Res<TransportChoice> {
    let text = f.value("transport").unwrap_or("auto");
    allowed
        .iter()
        .copied()
        .find(|c| c.name() == text)
        .ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|c| c.name()).collect();
            usage_err(format!(
                "--transport {text:?}: expected one of {}",
                names.join(", ")
            ))
        })
}

/// Where the target's region comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemoryChoice {
    /// `Engine::allocate`: memfd-backed, shared by mapping over shm.
    Buffer,
    /// Mapped by the bench itself and registered with `Engine::register`: reached by
    /// cross-memory attach over shm.
    Caller,
}

impl MemoryChoice {
    fn name(self) -> &'static str {
        match self {
            MemoryChoice::Buffer => "buffer",
            MemoryChoice::Caller => "caller",
        }
    }

    fn parse(f: &Flags) -> Res<MemoryChoice> {
        match f.value("memory").unwrap_or("buffer") {
            "buffer" => Ok(MemoryChoice::Buffer),
            "caller" => Ok(MemoryChoice::Caller),
            other => Err(usage_err(format!(
                "--memory {other:?}: expected buffer or caller"
            ))),
        }
    }
}

#[derive(Debug)]
struct TargetArgs {
    listen: String,
    size: u64,
    memory: MemoryChoice,
    forever: bool,
    /// RDMA NICs of the target's engine (`--device-list`).
    devices: Option<String>,
}

/// The options `initiator` and `pair` share.
#[derive(Debug)]
struct BenchArgs {
    op: Option<Dir>,
    block: Option<u64>,
    batch: Option<usize>,
    duration: Option<Duration>,
    threads: usize,
    size: u64,
    sweep: bool,
    check: bool,
    json: bool,
    /// RDMA NICs of this engine (`--device-list`).
    devices: Option<String>,
    /// RDMA NICs of the target `pair` starts (`--target-device-list`).
    target_devices: Option<String>,
}

#[derive(Debug)]
enum Cmd {
    Help,
    Target(TargetArgs),
    Initiator {
        peer: String,
        transport: TransportChoice,
        bench: BenchArgs,
    },
    Pair {
        transport: TransportChoice,
        memory: MemoryChoice,
        bench: BenchArgs,
    },
    Memcpy(BenchArgs),
    Store(store_bench::StoreArgs),
    Gpu(gpu_bench::GpuArgs),
    GpuTarget(u64, Option<String>, u32),
    /// `pair --mem vram`.
    GpuPair(gpu_bench::GpuPairArgs),
    StoreNode(store_bench::NodeArgs),
}

const BENCH_VALUED: [&str; 6] = ["op", "block", "batch", "duration", "threads", "size"];
const BENCH_SWITCHES: [&str; 3] = ["sweep", "check", "json"];
const DEFAULT_SIZE: u64 = 1 << 30;

fn parse_command(args: &[String]) -> Res<Cmd> {
    if args
        .iter()
        .any(|a| a == "--help" || a == "-h" || a == "help")
    {
        return Ok(Cmd::Help);
    }
    let Some((cmd, rest)) = args.split_first() else {
        return Err(usage_err("missing subcommand: target, initiator or pair"));
    };
    match cmd.as_str() {
        "target" => {
            let f = parse_flags(
                "target",
                rest,
                &["listen", "size", "memory", "device-list"],
                &["forever"],
            )?;
            Ok(Cmd::Target(TargetArgs {
                listen: f.value("listen").unwrap_or("127.0.0.1:0").to_string(),
                size: f.size("size", DEFAULT_SIZE)?,
                memory: MemoryChoice::parse(&f)?,
                forever: f.has("forever"),
                devices: f.value("device-list").map(str::to_string),
            }))
        }
        "initiator" => {
            let mut valued = BENCH_VALUED.to_vec();
            valued.extend(["peer", "transport", "device-list"]);
            let f = parse_flags("initiator", rest, &valued, &BENCH_SWITCHES)?;
            let peer = f
                .value("peer")
                .ok_or_else(|| {
                    usage_err("initiator needs --peer HOST:PORT (the target's `ready` line)")
                })?
                .to_string();
            use TransportChoice::{Auto, Rdma, Shm, Tcp};
            Ok(Cmd::Initiator {
                peer,
                transport: parse_transport(&f, &[Tcp, Shm, Rdma, Auto])?,
                bench: bench_args(&f)?,
            })
        }
        "pair" => {
            let mut valued = BENCH_VALUED.to_vec();
            valued.extend([
                "transport",
                "memory",
                "device-list",
                "target-device-list",
                "mem",
                "gpu",
                "target-gpu",
            ]);
            let f = parse_flags("pair", rest, &valued, &BENCH_SWITCHES)?;
            match f.value("mem").unwrap_or("host") {
                "vram" => return Ok(Cmd::GpuPair(gpu_bench::parse_pair(&f)?)),
                "host" => {}
                other => return Err(usage_err(format!("--mem {other:?}: expected host or vram"))),
            }
            use TransportChoice::{Auto, Local, Rdma, Shm, Tcp};
            Ok(Cmd::Pair {
                transport: parse_transport(&f, &[Tcp, Shm, Rdma, Local, Auto])?,
                memory: MemoryChoice::parse(&f)?,
                bench: bench_args(&f)?,
            })
        }
        "memcpy" => {
            let f = parse_flags("memcpy", rest, &BENCH_VALUED, &BENCH_SWITCHES)?;
            let bench = bench_args(&f)?;
            if bench.threads != 1 || bench.check {
                return Err(usage_err(
                    "memcpy is the single-thread baseline: --threads and --check do not apply",
                ));
            }
            Ok(Cmd::Memcpy(bench))
        }
        "store" => Ok(Cmd::Store(store_bench::parse_store(rest)?)),
        "gpu" => Ok(Cmd::Gpu(gpu_bench::parse_gpu(rest)?)),
        "gpu-target" => {
            let f = parse_flags("gpu-target", rest, &["size", "transports", "gpu"], &[])?;
            let gpu = f.value("gpu").unwrap_or("0");
            Ok(Cmd::GpuTarget(
                f.size("size", 1 << 30)?,
                f.value("transports").map(str::to_string),
                gpu.parse()
                    .map_err(|_| usage_err(format!("--gpu {gpu:?}: expected a GPU number")))?,
            ))
        }
        "store-node" => Ok(Cmd::StoreNode(store_bench::parse_node(rest)?)),
        other => Err(usage_err(format!(
            "unknown subcommand {other:?}: expected target, initiator, pair, memcpy or store"
        ))),
    }
}

fn bench_args(f: &Flags) -> Res<BenchArgs> {
    let op = match f.value("op") {
        None => None,
        Some("write") => Some(Dir::Write),
        Some("read") => Some(Dir::Read),
        Some(other) => return Err(usage_err(format!("--op {other:?}: expected write or read"))),
    };
    let sweep = f.has("sweep");
    // The sweep fixes block and batch; accepting them too would leave the reader guessing
    // which one the rows show.
    for name in ["block", "batch"] {
        if sweep && f.value(name).is_some() {
            return Err(usage_err(format!(
                "--{name} cannot be combined with --sweep (the sweep sets it)"
            )));
        }
    }
    let block = match f.value("block") {
        None => None,
        Some(_) => Some(f.size("block", 0)?),
    };
    let batch = f
        .value("batch")
        .map(|v| parse_count("batch", v, 1 << 20))
        .transpose()?;
    let duration = f
        .value("duration")
        .map(|v| parse_seconds(v).map_err(|e| usage_err(format!("--duration: {e}"))))
        .transpose()?;
    let threads = f
        .value("threads")
        .map(|v| parse_count("threads", v, 256))
        .transpose()?
        .unwrap_or(1);
    Ok(BenchArgs {
        op,
        block,
        batch,
        duration,
        threads,
        size: f.size("size", DEFAULT_SIZE)?,
        sweep,
        check: f.has("check"),
        json: f.has("json"),
        devices: f.value("device-list").map(str::to_string),
        target_devices: f.value("target-device-list").map(str::to_string),
    })
}

/// One measured point.
#[derive(Clone, Copy, Debug)]
struct Point {
    dir: Dir,
    block: u64,
    batch: usize,
}

/// What to run, resolved from the options.
struct Plan {
    points: Vec<Point>,
    duration: Duration,
    threads: usize,
    check: bool,
    json: bool,
}

impl BenchArgs {
    fn plan(&self) -> Plan {
        let points = if self.sweep {
            let dirs = match self.op {
                Some(d) => vec![d],
                None => vec![Dir::Write, Dir::Read],
            };
            let mut points = Vec::new();
            for &block in &SWEEP_BLOCKS {
                for &batch in &SWEEP_BATCHES {
                    for &dir in &dirs {
                        points.push(Point { dir, block, batch });
                    }
                }
            }
            points
        } else {
            vec![Point {
                dir: self.op.unwrap_or(Dir::Write),
                block: self.block.unwrap_or(64 << 10),
                batch: self.batch.unwrap_or(128),
            }]
        };
        let default_secs = if self.sweep { 2 } else { 5 };
        Plan {
            points,
            duration: self.duration.unwrap_or(Duration::from_secs(default_secs)),
            threads: self.threads,
            check: self.check,
            json: self.json,
        }
    }
}

impl Plan {
    /// Remote rights the run needs: each op's, and both when `--check` reads back what it
    /// wrote or writes what it will read.
    fn remote_access(&self) -> Access {
        let mut need = Access::empty();
        for p in &self.points {
            need |= p.dir.remote_access();
        }
        if self.check {
            need |= Access::REMOTE_READ | Access::REMOTE_WRITE;
        }
        need
    }

    /// Bytes one batch of every thread covers at the largest point.
    fn largest_footprint(&self) -> u64 {
        self.points
            .iter()
            .map(|p| {
                p.block
                    .saturating_mul(p.batch as u64)
                    .saturating_mul(self.threads as u64)
            })
            .max()
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------
// CPU time
// ---------------------------------------------------------------------------------------

/// CPU seconds (user + system) this process has used, all threads included.
fn process_cpu_s() -> f64 {
    let (sec, usec) = rusage_self();
    sec as f64 + usec as f64 * 1e-6
}

/// `(seconds, microseconds)` of user + system time, from getrusage(RUSAGE_SELF). Used by
/// the signal handler too: it allocates nothing and makes one system call.
fn rusage_self() -> (u64, u64) {
    // SAFETY: `rusage` is a plain C struct of integers, for which all-zero bytes is a
    // valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0);
    }
    let usec = (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec).max(0) as u64;
    let sec = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec).max(0) as u64;
    (sec + usec / 1_000_000, usec % 1_000_000)
}

/// SIGINT/SIGTERM handler of the target: reports its CPU time to stderr, then exits with
/// 128 + signal as a shell would. Only async-signal-safe work: no allocation, no locks
/// (the digits are formatted by hand into a stack buffer), `write(2)` and `_exit(2)`.
extern "C" fn report_cpu_and_exit(sig: libc::c_int) {
    fn push(buf: &mut [u8; 128], len: &mut usize, bytes: &[u8]) {
        for &b in bytes {
            if *len < buf.len() {
                buf[*len] = b;
                *len += 1;
            }
        }
    }
    fn push_num(buf: &mut [u8; 128], len: &mut usize, mut n: u64, min_digits: usize) {
        let mut digits = [0u8; 20];
        let mut count = 0;
        while n > 0 || count < min_digits.max(1) {
            digits[count] = b'0' + (n % 10) as u8;
            n /= 10;
            count += 1;
        }
        for i in (0..count).rev() {
            push(buf, len, &[digits[i]]);
        }
    }
    let (sec, usec) = rusage_self();
    let mut buf = [0u8; 128];
    let mut len = 0;
    push(&mut buf, &mut len, b"target: cpu seconds used: ");
    push_num(&mut buf, &mut len, sec, 1);
    push(&mut buf, &mut len, b".");
    push_num(&mut buf, &mut len, usec / 1000, 3);
    push(&mut buf, &mut len, b" (stopped by signal ");
    push_num(&mut buf, &mut len, sig.max(0) as u64, 1);
    push(&mut buf, &mut len, b")\n");
    // SAFETY: `buf[..len]` is initialised memory we own; write(2) and _exit(2) are
    // async-signal-safe. A short or failed write only loses the message.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(128 + sig);
    }
}

fn install_signal_report() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler is an `extern "C" fn(c_int)` that only does
        // async-signal-safe work (see `report_cpu_and_exit`).
        unsafe {
            libc::signal(
                sig,
                report_cpu_and_exit as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Target
// ---------------------------------------------------------------------------------------

/// Anonymous memory the bench maps itself, as a server maps its own KV pool: registered
/// with the unsafe `Engine::register`, not allocated by the engine. Unmapped on drop, so
/// it must be made before the engine that registers it (locals drop in reverse order) and
/// unregistered before it goes.
struct CallerMemory {
    ptr: *mut libc::c_void,
    len: usize,
}

impl CallerMemory {
    /// Maps `len` bytes, faulted in now (`MAP_POPULATE`) as `Engine::allocate` faults its
    /// buffers in, so the first point does not pay the page faults.
    fn map(len: usize) -> Res<CallerMemory> {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel (null hint) aliases
        // nothing of ours; the result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Failure::Run(format!(
                "cannot map {} of caller memory: {}",
                fmt_size(len as u64),
                std::io::Error::last_os_error()
            )));
        }
        Ok(CallerMemory { ptr, len })
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Registers the whole mapping with `engine`, every access right.
    fn register(&self, engine: &Engine) -> Res<()> {
        // SAFETY: the range is our live mapping, readable and writable. It stays mapped
        // until `self` drops, which every caller arranges to happen after the engine is
        // dropped (or after `unregister` succeeded); nothing else in the bench touches it
        // while batches run.
        unsafe { engine.register(self.addr(), self.len as u64, None, Access::ALL) }.context(|| {
            format!(
                "cannot register {} of caller memory at {:#x}",
                fmt_size(self.len as u64),
                self.addr()
            )
        })
    }

    fn unregister(&self, engine: &Engine) -> Res<()> {
        engine
            .unregister(self.addr())
            .context(|| format!("cannot unregister the caller memory at {:#x}", self.addr()))
    }
}

impl Drop for CallerMemory {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made, unmapped once; the engine that registered
        // it is gone or has unregistered it (see the type's comment).
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// The region a target serves: engine memory, or caller memory registered by hand.
enum Served {
    Buffer(Buffer),
    /// Registered caller memory; the mapping itself is owned by the caller of `serve`.
    Caller(u64),
}

impl Served {
    /// Registers the target's `len` bytes in `engine`: `caller` when given (mapped before
    /// the engine was made), else an engine buffer.
    fn new(engine: &Engine, len: usize, caller: Option<&CallerMemory>) -> Res<Served> {
        match caller {
            Some(m) => {
                m.register(engine)?;
                Ok(Served::Caller(m.addr()))
            }
            None => engine
                .allocate(len, Location::Any)
                .map(Served::Buffer)
                .context(|| format!("cannot allocate the {} target buffer", fmt_size(len as u64))),
        }
    }

    fn addr(&self) -> u64 {
        match self {
            Served::Buffer(b) => b.addr(),
            Served::Caller(addr) => *addr,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Served::Buffer(_) => "buffer memory (Engine::allocate, memfd)",
            Served::Caller(_) => "caller memory (mmap + Engine::register)",
        }
    }

    /// Unregisters (caller memory) or frees (buffer) the region.
    fn release(self, engine: &Engine, caller: Option<&CallerMemory>) -> Res<()> {
        match (self, caller) {
            (Served::Caller(_), Some(m)) => m.unregister(engine),
            _ => Ok(()),
        }
    }
}

fn map_caller(memory: MemoryChoice, len: usize) -> Res<Option<CallerMemory>> {
    match memory {
        MemoryChoice::Buffer => Ok(None),
        MemoryChoice::Caller => CallerMemory::map(len).map(Some),
    }
}

fn target_main(args: &TargetArgs) -> Res<()> {
    let len = usize::try_from(args.size)
        .map_err(|_| usage_err(format!("--size {} does not fit this machine", args.size)))?;
    // Before the engine: dropped after it on every path.
    let caller = map_caller(args.memory, len)?;
    let mut builder = EngineConfig::builder().listen(Some(&args.listen));
    if let Some(devices) = &args.devices {
        builder = builder.rdma_devices(devices);
    }
    let config = builder
        .build()
        .context(|| "bad engine configuration".into())?;
    let engine = Engine::new(config).context(|| format!("cannot listen on {}", args.listen))?;
    let served = Served::new(&engine, len, caller.as_ref())?;
    let session = engine
        .session_id()
        .ok_or_else(|| Failure::Run("the engine does not listen (KVX_LISTEN=none?)".into()))?
        .to_string();
    let cfg = engine.config();
    let transports: Vec<String> = cfg.transports.iter().map(|t| t.to_string()).collect();
    eprintln!(
        "target: pid {}, session {session}, {} {} at {:#x}, transports {}, {} TCP lanes per peer, {} I/O threads",
        std::process::id(),
        fmt_size(args.size),
        served.describe(),
        served.addr(),
        transports.join(","),
        cfg.tcp_lanes,
        cfg.io_threads
    );
    install_signal_report();
    out_line(&format!("ready {session}"))?;

    if args.forever {
        // Scripts that start the target with stdin at /dev/null would see EOF at once.
        loop {
            std::thread::park();
        }
    }
    // The engine's own threads serve the peers; this one only answers on stdin.
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.context(|| "cannot read stdin".into())?;
        match line.trim() {
            "cpu" => out_line(&format!("cpu_s {:.6}", process_cpu_s()))?,
            "" => {}
            other => eprintln!("target: ignoring unknown request {other:?} (known: cpu)"),
        }
    }
    let cpu = process_cpu_s();
    eprintln!("target: cpu seconds used: {cpu:.3}");
    // The parent may be gone already (closed pipe); the stderr line above still counts.
    let _ = out_line(&format!("cpu_s {cpu:.6}"));
    served.release(&engine, caller.as_ref())?;
    drop(engine);
    drop(caller);
    Ok(())
}

/// A target running as a child process, spoken to over its stdin/stdout.
struct TargetProc {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines from the target's stdout, read by a thread so every wait can time out.
    lines: mpsc::Receiver<String>,
    session: String,
    memory: MemoryChoice,
}

impl TargetProc {
    fn spawn(size: u64, memory: MemoryChoice, devices: Option<&str>) -> Res<TargetProc> {
        let mut args: Vec<String> = ["target", "--listen", "127.0.0.1:0", "--size"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.push(size.to_string());
        args.extend(["--memory".to_string(), memory.name().to_string()]);
        if let Some(devices) = devices {
            args.extend(["--device-list".to_string(), devices.to_string()]);
        }
        Self::spawn_args(&args, memory)
    }

    /// Starts this executable with `args` (a subcommand that prints `ready <session>` and
    /// answers `cpu` on stdin, as `target` does).
    fn spawn_args(args: &[String], memory: MemoryChoice) -> Res<TargetProc> {
        let exe = std::env::current_exe().context(|| "cannot find this executable".into())?;
        let mut command = Command::new(&exe);
        command.args(args);
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context(|| format!("cannot start the target process {}", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Failure::Run("the target process has no stdout pipe".into()))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut target = TargetProc {
            stdin: child.stdin.take(),
            child,
            lines,
            session: String::new(),
            memory,
        };
        let ready = target.next_line(READY_TIMEOUT, "its `ready` line")?;
        target.session = ready
            .strip_prefix("ready ")
            .ok_or_else(|| {
                Failure::Run(format!(
                    "the target said {ready:?} instead of `ready <session>`"
                ))
            })?
            .trim()
            .to_string();
        Ok(target)
    }

    fn next_line(&mut self, timeout: Duration, what: &str) -> Res<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::Run(format!(
                "the target (pid {}) did not send {what} within {timeout:?}",
                self.child.id()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = match self.child.try_wait() {
                    Ok(Some(status)) => format!("it exited with {status}"),
                    _ => "its stdout closed".to_string(),
                };
                Err(Failure::Run(format!(
                    "the target (pid {}) ended before sending {what}: {status}",
                    self.child.id()
                )))
            }
        }
    }

    fn parse_cpu(line: &str) -> Res<f64> {
        line.strip_prefix("cpu_s ")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| {
                Failure::Run(format!(
                    "the target said {line:?} instead of `cpu_s <seconds>`"
                ))
            })
    }

    /// The target's cumulative CPU seconds, asked for over its stdin.
    fn cpu(&mut self) -> Res<f64> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Failure::Run("the target's stdin is closed".into()))?;
        writeln!(stdin, "cpu")
            .and_then(|()| stdin.flush())
            .context(|| "cannot ask the target for its CPU time".into())?;
        let line = self.next_line(ANSWER_TIMEOUT, "its CPU time")?;
        Self::parse_cpu(&line)
    }

    /// Closes the target's stdin; returns the CPU seconds it reports on the way out.
    fn finish(mut self) -> Res<f64> {
        drop(self.stdin.take());
        let line = self.next_line(ANSWER_TIMEOUT, "its final CPU time")?;
        let cpu = Self::parse_cpu(&line)?;
        let status = self
            .child
            .wait()
            .context(|| "cannot wait for the target".into())?;
        if !status.success() {
            return Err(Failure::Run(format!("the target exited with {status}")));
        }
        Ok(cpu)
    }
}

impl Drop for TargetProc {
    /// On every path (errors included) the target goes away: EOF first, so it exits
    /// cleanly; killed if it has not within a few seconds.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Initiator and pair
// ---------------------------------------------------------------------------------------

fn initiator_main(session: &str, transport: TransportChoice, args: &BenchArgs) -> Res<()> {
    let plan = args.plan();
    run_remote(session, transport, args, &plan, None)
}

fn pair_main(transport: TransportChoice, memory: MemoryChoice, args: &BenchArgs) -> Res<()> {
    let plan = args.plan();
    match transport {
        TransportChoice::Local => run_local(args.size, memory, &plan),
        TransportChoice::Tcp
        | TransportChoice::Shm
        | TransportChoice::Rdma
        | TransportChoice::Auto => {
            let mut target = TargetProc::spawn(args.size, memory, args.target_devices.as_deref())?;
            let session = target.session.clone();
            run_remote(&session, transport, args, &plan, Some(&mut target))?;
            let total = target.finish()?;
            eprintln!("# target total cpu_s {total:.3}");
            Ok(())
        }
    }
}

fn usize_len(n: u64, what: &str) -> Res<usize> {
    usize::try_from(n).map_err(|_| usage_err(format!("{what} {n} does not fit this machine")))
}

/// Scratch memory `--check` reads back into (write) or writes from (read): one batch per
/// thread at the largest point.
fn allocate_scratch(engine: &Engine, plan: &Plan) -> Res<Option<Buffer>> {
    if !plan.check {
        return Ok(None);
    }
    let len = usize_len(plan.largest_footprint(), "--check scratch size")?;
    engine.allocate(len, Location::Any).map(Some).context(|| {
        format!(
            "cannot allocate {} of --check scratch",
            fmt_size(len as u64)
        )
    })
}

fn kind_list(kinds: &[TransportKind]) -> String {
    let names: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    names.join(",")
}

/// `KVX_TRANSPORTS` overrides the configuration inside `Engine::new`; a run asked for one
/// transport must not quietly measure another.
fn check_transports(engine: &Engine, choice: TransportChoice) -> Res<()> {
    let Some(want) = choice.engine_transports() else {
        return Ok(());
    };
    let have = &engine.config().transports;
    if have.as_slice() != want {
        return Err(usage_err(format!(
            "--transport {} configures the transports [{}] but the engine has [{}] \
             (KVX_TRANSPORTS overrides the configuration: unset it, or use --transport auto)",
            choice.name(),
            kind_list(want),
            kind_list(have)
        )));
    }
    Ok(())
}

/// Benchmarks against a target in another process, reached at `session`.
fn run_remote(
    session: &str,
    choice: TransportChoice,
    args: &BenchArgs,
    plan: &Plan,
    target: Option<&mut TargetProc>,
) -> Res<()> {
    let size = args.size;
    // open_peer needs a listener of our own: the control plane is symmetric.
    let mut builder = EngineConfig::builder().listen(Some("127.0.0.1:0"));
    if let Some(kinds) = choice.engine_transports() {
        builder = builder.transports(kinds);
    }
    if let Some(devices) = &args.devices {
        builder = builder.rdma_devices(devices);
    }
    let config = builder
        .build()
        .context(|| "bad engine configuration".into())?;
    let engine = Engine::new(config).context(|| "cannot start the engine".into())?;
    check_transports(&engine, choice)?;
    let peer = engine
        .open_peer(session)
        // The library's error already names the session (and, with shm only, why shm
        // cannot reach it).
        .context(|| match choice {
            TransportChoice::Shm => "cannot open the target over shm (--transport shm)".into(),
            _ => "cannot open the target".into(),
        })?;
    let preferred = engine
        .peer_transport(peer)
        .context(|| "cannot tell the peer's transport".into())?;
    let shm_note = engine
        .peer_shm_note(peer)
        .context(|| "cannot tell why shm is not used".into())?;
    if choice == TransportChoice::Shm && preferred != TransportKind::Shm {
        return Err(Failure::Run(format!(
            "--transport shm: the target {session} is reached over {preferred}, not shm: {}",
            shm_note.as_deref().unwrap_or("the engine gave no reason")
        )));
    }
    let need = plan.remote_access();
    let regions = engine
        .peer_regions(peer)
        .context(|| format!("cannot get the regions of {session}"))?;
    let region = regions
        .iter()
        .find(|r| r.access.contains(need))
        .ok_or_else(|| {
            let have: Vec<String> = regions
                .iter()
                .map(|r| format!("{:#x}+{} {}", r.addr, fmt_size(r.len), r.access))
                .collect();
            Failure::Run(format!(
                "peer {session} has no region granting {need}; it has [{}]",
                have.join(", ")
            ))
        })?;
    let local_len = usize_len(size.min(region.len), "local buffer size")?;
    let local = engine.allocate(local_len, Location::Any).context(|| {
        format!(
            "cannot allocate the {} local buffer",
            fmt_size(local_len as u64)
        )
    })?;
    let scratch = allocate_scratch(&engine, plan)?;
    let with_note = |msg: String| match &shm_note {
        Some(note) => format!("{msg} (shm: {note})"),
        None => msg,
    };
    let actual = probe_transport(&engine, peer, plan, &local, region.addr, region.len).map_err(
        |e| match e {
            Failure::Run(msg) => Failure::Run(with_note(msg)),
            other => other,
        },
    )?;
    let wanted = match choice {
        TransportChoice::Shm => Some(TransportKind::Shm),
        TransportChoice::Tcp => Some(TransportKind::Tcp),
        TransportChoice::Rdma => Some(TransportKind::Rdma),
        TransportChoice::Local | TransportChoice::Auto => None,
    };
    if let Some(wanted) = wanted.filter(|&w| w != actual) {
        return Err(Failure::Run(with_note(format!(
            "--transport {wanted}: the probe batch to {session} went over {actual}"
        ))));
    }
    let (pid, memory) = match &target {
        Some(t) => (Some(t.child.id()), Some(t.memory)),
        None => (None, None),
    };
    let bench = Bench {
        engine: &engine,
        peer,
        transport: actual.to_string(),
        remote_addr: region.addr,
        remote_len: region.len,
        local: &local,
        scratch: scratch.as_ref(),
    };
    let mut target_desc = match pid {
        Some(pid) => format!("target pid {pid} at {session}"),
        None => format!("target {session}"),
    };
    if let Some(m) = memory {
        target_desc.push_str(&format!(" ({} memory)", m.name()));
    }
    // Say why shm is not (or not wholly) used, unless the run left it out on purpose.
    let note = shm_note.filter(|_| engine.config().transports.contains(&TransportKind::Shm));
    describe(
        &bench,
        plan,
        &target_desc,
        actual,
        preferred,
        note.as_deref(),
    );
    run_plan(&bench, plan, target)
}

/// Moves one small untimed op (the first point's direction, between the starts of both
/// regions) and returns the transport that carried it. The transport is chosen per batch,
/// by whose memory the batch touches, so it can differ from the peer's preferred one.
fn probe_transport(
    engine: &Engine,
    peer: PeerId,
    plan: &Plan,
    local: &Buffer,
    remote_addr: u64,
    remote_len: u64,
) -> Res<TransportKind> {
    let dir = plan.points.first().map_or(Dir::Write, |p| p.dir);
    let len = 4096u64.min(local.len() as u64).min(remote_len);
    let op = dir.op(local.addr(), remote_addr, len);
    let id = engine
        .submit(peer, &[op])
        .context(|| "submit of the probe batch".into())?;
    let state = engine.wait(id, Duration::MAX);
    let kind = engine.batch_transport(id);
    let freed = engine.free(id);
    state
        .context(|| "wait of the probe batch".into())?
        .into_result()
        .context(|| "probe batch".into())?;
    freed.context(|| "free of the probe batch".into())?;
    kind.context(|| "batch_transport of the probe batch".into())
}

/// Benchmarks the in-process transport: both regions in one engine, the local peer.
fn run_local(size: u64, memory: MemoryChoice, plan: &Plan) -> Res<()> {
    let len = usize_len(size, "--size")?;
    // Before the engine: dropped after it on every path.
    let caller = map_caller(memory, len)?;
    let config = EngineConfig::builder()
        .listen(None)
        .build()
        .context(|| "bad engine configuration".into())?;
    let engine = Engine::new(config).context(|| "cannot start the engine".into())?;
    // The local peer's regions are our own, so the target region is named directly rather
    // than found with peer_regions (which would also list the local buffer).
    let remote = Served::new(&engine, len, caller.as_ref())?;
    let local = engine
        .allocate(len, Location::Any)
        .context(|| format!("cannot allocate the {} local buffer", fmt_size(size)))?;
    let scratch = allocate_scratch(&engine, plan)?;
    let peer = engine.local_peer();
    let actual = probe_transport(&engine, peer, plan, &local, remote.addr(), size)?;
    let bench = Bench {
        engine: &engine,
        peer,
        transport: actual.to_string(),
        remote_addr: remote.addr(),
        remote_len: size,
        local: &local,
        scratch: scratch.as_ref(),
    };
    describe(
        &bench,
        plan,
        &format!("target region in this process: {}", remote.describe()),
        actual,
        actual,
        None,
    );
    run_plan(&bench, plan, None)?;
    drop(scratch);
    drop(local);
    remote.release(&engine, caller.as_ref())
}

/// One line of context on stderr (stdout stays header + rows, for scripts). `actual` is
/// the transport the probe batch went over; the details are that transport's.
fn describe(
    b: &Bench<'_>,
    plan: &Plan,
    target: &str,
    actual: TransportKind,
    preferred: TransportKind,
    shm_note: Option<&str>,
) {
    let cfg = b.engine.config();
    let detail = match actual {
        TransportKind::Tcp => format!(
            ", {} TCP lanes, {} I/O threads",
            cfg.tcp_lanes, cfg.io_threads
        ),
        TransportKind::Shm => format!(
            " (copies by this process: the target's memfd mapped here, or cross-memory attach), \
             {} copy threads",
            cfg.copy_threads
        ),
        TransportKind::Local => format!(", {} copy threads", cfg.copy_threads),
        TransportKind::Rdma => format!(", NICs {}", cfg.rdma_devices),
        // A transport added to the library later: its name alone.
        _ => String::new(),
    };
    let mut why = String::new();
    if preferred != actual {
        why.push_str(&format!(" (the peer prefers {preferred})"));
    }
    if let Some(note) = shm_note {
        why.push_str(&format!(" [shm: {note}]"));
    }
    eprintln!(
        "# kvxfer {} bench: transport {actual}{why}{detail}, {target}, remote region {} at \
         {:#x}, local buffer {}, {} thread(s), slice {}, {:.1} s per point{}",
        kvxfer::VERSION,
        fmt_size(b.remote_len),
        b.remote_addr,
        fmt_size(b.local.len() as u64),
        plan.threads,
        fmt_size(cfg.slice_size as u64),
        plan.duration.as_secs_f64(),
        if plan.check {
            ", --check on: throughput includes verification"
        } else {
            ""
        }
    );
}

// ---------------------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------------------

/// What every point runs against.
struct Bench<'e> {
    engine: &'e Engine,
    peer: PeerId,
    transport: String,
    /// The target region, in the target's address space.
    remote_addr: u64,
    remote_len: u64,
    local: &'e Buffer,
    scratch: Option<&'e Buffer>,
}

/// How a point's threads share the buffers: thread `t` owns `[t * slice, (t+1) * slice)`
/// of each, cut into `slots` blocks that its batches cycle through.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    remote_slice: u64,
    remote_slots: u64,
    local_slice: u64,
    local_slots: u64,
}

impl Geometry {
    fn new(b: &Bench<'_>, p: Point, threads: usize) -> Result<Geometry, String> {
        let threads = threads as u64;
        let remote_slice = b.remote_len / threads;
        let local_slice = b.local.len() as u64 / threads;
        let g = Geometry {
            remote_slice,
            remote_slots: remote_slice / p.block,
            local_slice,
            local_slots: local_slice / p.block,
        };
        let batch = p.batch as u64;
        if g.remote_slots < batch || g.local_slots < batch {
            // Ops of one batch must not overlap (their order is unspecified), so a batch
            // must fit in one thread's slice.
            return Err(format!(
                "block {} x batch {} x {} thread(s) needs {} on each side, but the remote \
                 region is {} and the local buffer {}: raise --size or lower --threads",
                fmt_size(p.block),
                p.batch,
                threads,
                fmt_size(p.block.saturating_mul(batch).saturating_mul(threads)),
                fmt_size(b.remote_len),
                fmt_size(b.local.len() as u64)
            ));
        }
        Ok(g)
    }
}

/// What one thread measured.
struct ThreadRun {
    latencies_ns: Vec<u64>,
    ops: u64,
    bytes: u64,
    ended: Instant,
    /// The transport that moved the thread's first timed batch.
    transport: Option<TransportKind>,
}

/// One row of output.
struct Row {
    transport: String,
    dir: Dir,
    block: u64,
    batch: usize,
    gbps: f64,
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_initiator_s: f64,
    cpu_target_s: Option<f64>,
}

fn run_plan(b: &Bench<'_>, plan: &Plan, mut target: Option<&mut TargetProc>) -> Res<()> {
    let points: Vec<_> = plan
        .points
        .iter()
        .map(|&p| (p, Geometry::new(b, p, plan.threads)))
        .collect();
    // A single point that cannot run is an error (before any output); a sweep goes on
    // without it.
    if let [(_, Err(why))] = points.as_slice() {
        return Err(usage_err(why.clone()));
    }
    let mut report = Report { json: plan.json };
    report.header()?;
    for (p, geometry) in points {
        let geometry = match geometry {
            Ok(g) => g,
            Err(why) => {
                eprintln!(
                    "# skipped {} {}x{}: {why}",
                    p.dir.name(),
                    fmt_size(p.block),
                    p.batch
                );
                continue;
            }
        };
        let row = run_point(b, plan, p, geometry, target.as_deref_mut())?;
        report.row(&row)?;
    }
    Ok(())
}

fn run_point(
    b: &Bench<'_>,
    plan: &Plan,
    p: Point,
    g: Geometry,
    mut target: Option<&mut TargetProc>,
) -> Res<Row> {
    let barrier = Barrier::new(plan.threads + 1);
    let stop = AtomicBool::new(false);
    let (runs, start, cpu0, tcpu0) = std::thread::scope(|s| -> Res<_> {
        let workers: Vec<_> = (0..plan.threads)
            .map(|t| {
                let (barrier, stop) = (&barrier, &stop);
                s.spawn(move || {
                    let mut w = Worker::new(b, p, g, t, plan.check);
                    // Reach the barrier whatever the warm-up did, or the others hang there.
                    let warm = w.step().map(drop);
                    barrier.wait();
                    warm?;
                    let result = w.timed(plan.duration, stop);
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let cpu0 = process_cpu_s();
        // Asked while the workers already run; the pipe round trip is tens of µs.
        let tcpu0 = target.as_deref_mut().map(TargetProc::cpu).transpose();
        if tcpu0.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let mut runs = Vec::new();
        let mut first_err = None;
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(Failure::Run("a benchmark thread panicked".into())));
            match r {
                Ok(run) => runs.push(run),
                // A mismatch is the news; report it before any follow-on error.
                Err(e) => match (&first_err, &e) {
                    (None, _) | (Some(Failure::Run(_)), Failure::Mismatch(_)) => {
                        first_err = Some(e)
                    }
                    _ => {}
                },
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok((runs, start, cpu0, tcpu0?))
    })?;
    let cpu_initiator_s = process_cpu_s() - cpu0;
    let cpu_target_s = match (target, tcpu0) {
        (Some(t), Some(before)) => Some(t.cpu()? - before),
        _ => None,
    };
    let ended = runs.iter().map(|r| r.ended).max().unwrap_or(start);
    let secs = ended.duration_since(start).as_secs_f64().max(1e-9);
    let mut lat: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let ops: u64 = runs.iter().map(|r| r.ops).sum();
    let bytes: u64 = runs.iter().map(|r| r.bytes).sum();
    // What moved the batches, not what the peer prefers; threads that disagree show all.
    let mut kinds: Vec<String> = runs
        .iter()
        .filter_map(|r| r.transport)
        .map(|k| k.to_string())
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    let transport = if kinds.is_empty() {
        b.transport.clone()
    } else {
        kinds.join("+")
    };
    Ok(Row {
        transport,
        dir: p.dir,
        block: p.block,
        batch: p.batch,
        gbps: bytes as f64 / secs / 1e9,
        ops_per_s: ops as f64 / secs,
        p50_us: percentile(&lat, 0.50) as f64 / 1e3,
        p99_us: percentile(&lat, 0.99) as f64 / 1e3,
        cpu_initiator_s,
        cpu_target_s,
    })
}

/// Nearest-rank percentile of sorted samples (0 when there are none).
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One submitting thread of a point: its slices of the buffers and where it is in them.
struct Worker<'b, 'e> {
    b: &'b Bench<'e>,
    p: Point,
    g: Geometry,
    thread: usize,
    check: bool,
    /// Next slot (block index) in this thread's remote and local slices.
    remote_slot: u64,
    local_slot: u64,
    iteration: u64,
    ops: Vec<Op>,
    /// Remote offset (within the region) and local offset (within the buffer) of each op.
    offsets: Vec<(u64, u64)>,
    expected: Vec<u8>,
    actual: Vec<u8>,
    /// Set while the next batch's transport is to be recorded into `transport`.
    record_transport: bool,
    transport: Option<TransportKind>,
}

impl<'b, 'e> Worker<'b, 'e> {
    fn new(b: &'b Bench<'e>, p: Point, g: Geometry, thread: usize, check: bool) -> Self {
        let block = if check { p.block as usize } else { 0 };
        Worker {
            b,
            p,
            g,
            thread,
            check,
            remote_slot: 0,
            local_slot: 0,
            iteration: 0,
            ops: Vec::with_capacity(p.batch),
            offsets: Vec::with_capacity(p.batch),
            expected: vec![0; block],
            actual: vec![0; block],
            record_transport: false,
            transport: None,
        }
    }

    /// Batches until `duration` has passed (at least one) or another thread failed.
    fn timed(&mut self, duration: Duration, stop: &AtomicBool) -> Res<ThreadRun> {
        let t0 = Instant::now();
        let mut latencies_ns = Vec::with_capacity(1024);
        self.record_transport = true;
        loop {
            latencies_ns.push(self.step()?.as_nanos() as u64);
            if t0.elapsed() >= duration || stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let ended = Instant::now();
        let batches = latencies_ns.len() as u64;
        let ops = batches * self.p.batch as u64;
        Ok(ThreadRun {
            latencies_ns,
            ops,
            bytes: ops * self.p.block,
            ended,
            transport: self.transport.take(),
        })
    }

    /// One batch (with `--check`'s preparation and verification around it); returns the
    /// submit → wait latency.
    fn step(&mut self) -> Res<Duration> {
        let (b, p, g) = (self.b, self.p, self.g);
        self.ops.clear();
        self.offsets.clear();
        for k in 0..p.batch as u64 {
            let r_off = self.thread as u64 * g.remote_slice
                + (self.remote_slot + k) % g.remote_slots * p.block;
            let l_off = self.thread as u64 * g.local_slice
                + (self.local_slot + k) % g.local_slots * p.block;
            self.offsets.push((r_off, l_off));
            self.ops.push(
                p.dir
                    .op(b.local.addr() + l_off, b.remote_addr + r_off, p.block),
            );
        }
        if self.check {
            self.prepare()?;
        }
        let t0 = Instant::now();
        let id = b
            .engine
            .submit(b.peer, &self.ops)
            .context(|| self.what("submit"))?;
        let state = b.engine.wait(id, Duration::MAX);
        let latency = t0.elapsed();
        // Outside the latency, and before `free` retires the id.
        let transport = self.record_transport.then(|| b.engine.batch_transport(id));
        // Free even when the batch failed; the wait has ended it either way.
        let freed = b.engine.free(id);
        state
            .context(|| self.what("wait"))?
            .into_result()
            .context(|| self.what("batch"))?;
        freed.context(|| self.what("free"))?;
        if let Some(kind) = transport {
            self.transport = Some(kind.context(|| self.what("batch_transport"))?);
            self.record_transport = false;
        }
        if self.check {
            self.verify()?;
        }
        self.remote_slot = (self.remote_slot + p.batch as u64) % g.remote_slots;
        self.local_slot = (self.local_slot + p.batch as u64) % g.local_slots;
        self.iteration += 1;
        Ok(latency)
    }

    fn what(&self, call: &str) -> String {
        format!(
            "{call} of {} batch {} (block {}, batch {}, thread {})",
            self.p.dir.name(),
            self.iteration,
            fmt_size(self.p.block),
            self.p.batch,
            self.thread
        )
    }

    fn scratch(&self) -> Res<&'e Buffer> {
        self.b
            .scratch
            .ok_or_else(|| Failure::Run("--check has no scratch buffer".into()))
    }

    /// This thread's piece of scratch for op `k`.
    fn scratch_off(&self, k: usize) -> u64 {
        (self.thread * self.p.batch + k) as u64 * self.p.block
    }

    /// Write: puts this iteration's pattern in the sources. Read: puts it at the remote
    /// (through an untimed write from scratch) and its complement in the destinations, so
    /// a byte the read did not move cannot pass.
    fn prepare(&mut self) -> Res<()> {
        let b = self.b;
        match self.p.dir {
            Dir::Write => {
                for k in 0..self.p.batch {
                    fill_pattern(&mut self.expected, self.iteration, k);
                    b.local
                        .write_at(self.offsets[k].1 as usize, &self.expected)
                        .context(|| "pattern outside the local buffer".into())?;
                }
            }
            Dir::Read => {
                let scratch = self.scratch()?;
                let mut fill_ops = Vec::with_capacity(self.p.batch);
                for k in 0..self.p.batch {
                    fill_pattern(&mut self.expected, self.iteration, k);
                    let s_off = self.scratch_off(k);
                    scratch
                        .write_at(s_off as usize, &self.expected)
                        .context(|| "pattern outside the scratch buffer".into())?;
                    self.expected.iter_mut().for_each(|x| *x = !*x);
                    b.local
                        .write_at(self.offsets[k].1 as usize, &self.expected)
                        .context(|| "pattern outside the local buffer".into())?;
                    fill_ops.push(Op::write(
                        scratch.addr() + s_off,
                        b.remote_addr + self.offsets[k].0,
                        self.p.block,
                    ));
                }
                b.engine
                    .transfer_sync(b.peer, &fill_ops)
                    .context(|| self.what("--check pre-fill write"))?;
            }
        }
        Ok(())
    }

    /// Write: reads the remote bytes back into scratch and compares. Read: compares the
    /// destinations.
    fn verify(&mut self) -> Res<()> {
        let b = self.b;
        let scratch = self.scratch()?;
        if self.p.dir == Dir::Write {
            let back: Vec<Op> = (0..self.p.batch)
                .map(|k| {
                    Op::read(
                        scratch.addr() + self.scratch_off(k),
                        b.remote_addr + self.offsets[k].0,
                        self.p.block,
                    )
                })
                .collect();
            b.engine
                .transfer_sync(b.peer, &back)
                .context(|| self.what("--check read-back"))?;
        }
        for k in 0..self.p.batch {
            let (buf, off) = match self.p.dir {
                Dir::Write => (scratch, self.scratch_off(k)),
                Dir::Read => (b.local, self.offsets[k].1),
            };
            buf.read_at(off as usize, &mut self.actual)
                .context(|| "check outside a buffer".into())?;
            fill_pattern(&mut self.expected, self.iteration, k);
            if let Some(pos) = self
                .expected
                .iter()
                .zip(&self.actual)
                .position(|(e, a)| e != a)
            {
                let (r_off, l_off) = self.offsets[k];
                return Err(Failure::Mismatch(format!(
                    "{} {} block {} batch {} thread {} iteration {}: op {k} differs at byte {pos} \
                     of the op (offset {} in the remote region, {} in the local buffer): \
                     expected {:#04x}, got {:#04x}",
                    b.transport,
                    self.p.dir.name(),
                    fmt_size(self.p.block),
                    self.p.batch,
                    self.thread,
                    self.iteration,
                    r_off + pos as u64,
                    l_off + pos as u64,
                    self.expected[pos],
                    self.actual[pos]
                )));
            }
        }
        Ok(())
    }
}

/// The bytes op `op` of iteration `iteration` carries: per 4 KiB chunk a fill byte that
/// differs between ops, iterations and chunks, led by an 8-byte stamp of all three, so a
/// misplaced slice, a stale slot or a skipped op shows up as a mismatch.
fn fill_pattern(buf: &mut [u8], iteration: u64, op: usize) {
    const CHUNK: usize = 4096;
    for (c, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        let c = c as u64;
        let byte = (op as u64)
            .wrapping_mul(31)
            .wrapping_add(iteration)
            .wrapping_add(c.wrapping_mul(7)) as u8;
        chunk.fill(byte);
        let stamp = iteration.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((op as u64) << 32) ^ c;
        let n = chunk.len().min(8);
        chunk[..n].copy_from_slice(&stamp.to_le_bytes()[..n]);
    }
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

struct Report {
    json: bool,
}

impl Report {
    fn header(&mut self) -> Res<()> {
        if self.json {
            return Ok(());
        }
        out_line(&format!(
            "{:<9} {:<5} {:>7} {:>5} {:>8} {:>11} {:>10} {:>10} {:>10} {:>9}",
            "transport",
            "op",
            "block",
            "batch",
            "GB/s",
            "ops/s",
            "p50_us",
            "p99_us",
            "cpu_init_s",
            "cpu_tgt_s"
        ))
    }

    fn row(&mut self, r: &Row) -> Res<()> {
        let line = if self.json {
            let target = r
                .cpu_target_s
                .map_or_else(|| "null".to_string(), |c| format!("{c:.6}"));
            format!(
                "{{\"transport\":\"{}\",\"op\":\"{}\",\"block\":{},\"batch\":{},\"gbps\":{:.6},\
                 \"ops_per_s\":{:.3},\"p50_us\":{:.3},\"p99_us\":{:.3},\"cpu_s\":{:.6},\
                 \"cpu_initiator_s\":{:.6},\"cpu_target_s\":{target}}}",
                r.transport,
                r.dir.name(),
                r.block,
                r.batch,
                r.gbps,
                r.ops_per_s,
                r.p50_us,
                r.p99_us,
                r.cpu_initiator_s + r.cpu_target_s.unwrap_or(0.0),
                r.cpu_initiator_s,
            )
        } else {
            format!(
                "{:<9} {:<5} {:>7} {:>5} {:>8.3} {:>11.0} {:>10.1} {:>10.1} {:>10.3} {:>9}",
                r.transport,
                r.dir.name(),
                fmt_size(r.block),
                r.batch,
                r.gbps,
                r.ops_per_s,
                r.p50_us,
                r.p99_us,
                r.cpu_initiator_s,
                r.cpu_target_s
                    .map_or_else(|| "-".to_string(), |c| format!("{c:.3}"))
            )
        };
        out_line(&line)
    }
}

// ---------------------------------------------------------------------------------------
// Tests (`cargo test --example kvxfer_bench`)
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn sizes_with_every_suffix_are_binary() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        for s in ["4K", "4Ki", "4KiB", "4KB", "4k", "4kib", " 4 KiB "] {
            assert_eq!(parse_size(s), Ok(4096), "{s}");
        }
        for s in ["64M", "64Mi", "64MiB", "64mb"] {
            assert_eq!(parse_size(s), Ok(64 << 20), "{s}");
        }
        for s in ["1G", "1Gi", "1GiB", "1gib"] {
            assert_eq!(parse_size(s), Ok(1 << 30), "{s}");
        }
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
    }

    #[test]
    fn bad_sizes_are_errors_not_panics() {
        for s in [
            "",
            "KiB",
            "-4K",
            "1.5GiB",
            "4Q",
            "4 K i B",
            "4KiBB",
            "0x10",
            "99999999999999999999",
            "16777216TiB",
            "4K4",
        ] {
            assert!(parse_size(s).is_err(), "{s:?} should be refused");
        }
        assert!(parse_size("16777215TiB").is_ok());
    }

    #[test]
    fn sizes_print_exactly() {
        assert_eq!(fmt_size(4096), "4KiB");
        assert_eq!(fmt_size(1 << 20), "1MiB");
        assert_eq!(fmt_size(3 << 30), "3GiB");
        assert_eq!(fmt_size(4000), "4000B");
        assert_eq!(fmt_size(1536), "1536B");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn command_lines_parse_and_bad_ones_are_usage_errors() {
        let Cmd::Pair {
            transport,
            memory,
            bench,
        } = parse_command(&args(
            "pair --transport tcp --op read --block 1MiB --batch=32 --duration 2.5 --check",
        ))
        .unwrap()
        else {
            panic!("not pair")
        };
        assert_eq!(transport, TransportChoice::Tcp);
        assert_eq!(memory, MemoryChoice::Buffer);
        assert_eq!(bench.op, Some(Dir::Read));
        assert_eq!(bench.block, Some(1 << 20));
        assert_eq!(bench.batch, Some(32));
        assert_eq!(bench.duration, Some(Duration::from_millis(2500)));
        assert!(bench.check && !bench.json);
        assert_eq!(bench.plan().points.len(), 1);

        let Cmd::Initiator { bench, .. } =
            parse_command(&args("initiator --peer 127.0.0.1:9 --sweep --op write")).unwrap()
        else {
            panic!("not initiator")
        };
        let plan = bench.plan();
        assert_eq!(plan.points.len(), 12);
        assert_eq!(plan.duration, Duration::from_secs(2));
        assert_eq!(plan.largest_footprint(), 512 << 20);

        assert!(matches!(parse_command(&args("pair --help")), Ok(Cmd::Help)));
        for bad in [
            "",
            "bench",
            "initiator --op write",
            "pair --bogus",
            "pair --block",
            "pair --block --batch 3",
            "pair --block 4Q",
            "pair --block 0",
            "pair --batch 0",
            "pair --threads many",
            "pair --duration -1",
            "pair --duration nan",
            "pair --op copy",
            "pair --transport udp",
            "pair --transport",
            "pair --transport SHM",
            "pair --memory gpu",
            "pair --memory caller --memory buffer",
            "initiator --peer 127.0.0.1:9 --transport local",
            "initiator --peer 127.0.0.1:9 --memory caller",
            "target --memory gpu",
            "target --transport shm",
            "memcpy --threads 2",
            "memcpy --check",
            "memcpy --transport shm",
            "pair --sweep --block 4K",
            "pair --json=yes",
            "pair --block 4K --block 8K",
            "pair stray",
            "target --peer 1.2.3.4:5",
        ] {
            match parse_command(&args(bad)) {
                Err(Failure::Usage(_)) => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    fn usage_message(line: &str) -> String {
        match parse_command(&args(line)) {
            Err(Failure::Usage(msg)) => msg,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn transport_and_memory_options_parse() {
        // Defaults: auto transport, engine buffer memory.
        let Cmd::Pair {
            transport, memory, ..
        } = parse_command(&args("pair")).unwrap()
        else {
            panic!("not pair")
        };
        assert_eq!(
            (transport, memory),
            (TransportChoice::Auto, MemoryChoice::Buffer)
        );
        for (line, want_t, want_m) in [
            (
                "pair --transport shm --memory caller",
                TransportChoice::Shm,
                MemoryChoice::Caller,
            ),
            (
                "pair --transport=local --memory=buffer",
                TransportChoice::Local,
                MemoryChoice::Buffer,
            ),
            (
                "pair --memory caller --transport tcp --op read",
                TransportChoice::Tcp,
                MemoryChoice::Caller,
            ),
            (
                "pair --transport auto",
                TransportChoice::Auto,
                MemoryChoice::Buffer,
            ),
        ] {
            let Cmd::Pair {
                transport, memory, ..
            } = parse_command(&args(line)).unwrap()
            else {
                panic!("{line:?}: not pair")
            };
            assert_eq!((transport, memory), (want_t, want_m), "{line:?}");
        }

        for (line, want) in [
            ("initiator --peer 127.0.0.1:9", TransportChoice::Auto),
            (
                "initiator --peer 127.0.0.1:9 --transport shm",
                TransportChoice::Shm,
            ),
            (
                "initiator --transport=tcp --peer 127.0.0.1:9",
                TransportChoice::Tcp,
            ),
            (
                "initiator --peer 127.0.0.1:9 --transport auto",
                TransportChoice::Auto,
            ),
        ] {
            let Cmd::Initiator {
                peer, transport, ..
            } = parse_command(&args(line)).unwrap()
            else {
                panic!("{line:?}: not initiator")
            };
            assert_eq!(peer, "127.0.0.1:9");
            assert_eq!(transport, want, "{line:?}");
        }

        let Cmd::Target(t) = parse_command(&args("target --size 64MiB --memory caller")).unwrap()
        else {
            panic!("not target")
        };
        assert_eq!((t.size, t.memory), (64 << 20, MemoryChoice::Caller));
        let Cmd::Target(t) = parse_command(&args("target")).unwrap() else {
            panic!("not target")
        };
        assert_eq!(t.memory, MemoryChoice::Buffer);
        assert!(!t.forever);

        // The initiator's engine transports follow the choice; auto and local keep the
        // default.
        assert_eq!(
            TransportChoice::Tcp.engine_transports(),
            Some(&[TransportKind::Tcp][..])
        );
        assert_eq!(
            TransportChoice::Shm.engine_transports(),
            Some(&[TransportKind::Shm][..])
        );
        assert_eq!(TransportChoice::Auto.engine_transports(), None);
        assert_eq!(TransportChoice::Local.engine_transports(), None);
    }

    #[test]
    fn memcpy_takes_the_bench_options() {
        let Cmd::Memcpy(b) =
            parse_command(&args("memcpy --block 1MiB --batch 128 --duration 2")).unwrap()
        else {
            panic!("not the memcpy command");
        };
        assert_eq!((b.block, b.batch, b.threads), (Some(1 << 20), Some(128), 1));
    }

    #[test]
    fn bad_transport_and_memory_name_the_valid_choices() {
        let msg = usage_message("pair --transport udp");
        assert!(msg.contains("\"udp\""), "{msg}");
        assert!(msg.contains("tcp, shm, rdma, local, auto"), "{msg}");
        // The initiator has no in-process target: local is not offered.
        let msg = usage_message("initiator --peer 127.0.0.1:9 --transport local");
        assert!(msg.contains("tcp, shm, rdma, auto"), "{msg}");
        // RDMA with device lists parses for both sides.
        let Cmd::Pair {
            transport, bench, ..
        } = parse_command(&args(
            "pair --transport rdma --device-list rxe1 --target-device-list rxe0",
        ))
        .unwrap()
        else {
            panic!("not pair")
        };
        assert_eq!(transport, TransportChoice::Rdma);
        assert_eq!(
            (bench.devices.as_deref(), bench.target_devices.as_deref()),
            (Some("rxe1"), Some("rxe0"))
        );
        for line in ["pair --memory gpu", "target --memory gpu"] {
            let msg = usage_message(line);
            assert!(
                msg.contains("\"gpu\"") && msg.contains("buffer or caller"),
                "{msg}"
            );
        }
        let msg = usage_message("pair --transport");
        assert!(msg.contains("--transport needs a value"), "{msg}");
    }

    #[test]
    fn patterns_differ_between_ops_iterations_and_chunks() {
        let mut a = vec![0; 3 * 4096 + 5];
        let mut b = a.clone();
        fill_pattern(&mut a, 0, 0);
        fill_pattern(&mut b, 0, 1);
        assert_ne!(a, b);
        fill_pattern(&mut b, 1, 0);
        assert_ne!(a, b);
        assert_ne!(a[..4096], a[4096..8192]);
        let mut tiny = [0u8; 3];
        fill_pattern(&mut tiny, 5, 2); // shorter than the stamp: no panic
    }
}
