//! `kvxfer_bench store`: put / get / exists throughput and latency of the L3 store, with
//! store nodes as child processes (`kvxfer_bench store-node`, the same engine and segment
//! server `kvxfer_store_node` runs) and the client in this process.
//!
//! Each point is one op over `--duration`: `put` writes fresh keys (the nodes evict the
//! oldest as they fill), `get` and `exists` walk a working set put before the point (half
//! of the nodes' memory at most, so nothing of it is evicted). Latency is per call of
//! `batch_*` (all its keys); `ops/s` counts calls, `keys/s` keys; GB/s counts value bytes
//! (0 for exists).

use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvxfer::store::{SegmentConfig, Store, StoreConfig};
use kvxfer::{Engine, EngineConfig, Location, TransportKind};

use super::{
    fmt_size, out_line, parse_flags, parse_seconds, percentile, process_cpu_s, usage_err, Context,
    Failure, MemoryChoice, Res, TargetProc,
};

pub(super) const USAGE: &str = "\
  kvxfer_bench store     [--nodes N | --members HOST:PORT,...] [--value SIZE] [--batch N]
                         [--op put,get,exists] [--duration SECS] [--node-memory SIZE]
                         [--transport tcp|shm|auto] [--json]

store      starts --nodes store nodes (child processes, each contributing --node-memory,
           default 1GiB) and a client in this process, then one point per --op (default
           put,get,exists): values of --value bytes (default 64KiB), --batch keys per call
           (default 32), over --transport (default tcp: loopback TCP). Columns as above,
           plus keys/s; here ops/s counts batch calls and GB/s value bytes.
           --members uses running store nodes (kvxfer_store_node) instead of starting any
           (--node-memory then only sizes the get/exists working set; cpu_tgt_s is -).";

/// Options of `store`.
#[derive(Debug)]
pub(super) struct StoreArgs {
    nodes: usize,
    value: u64,
    batch: usize,
    ops: Vec<StoreOp>,
    duration: Duration,
    node_memory: u64,
    transport: Vec<TransportKind>,
    transport_name: String,
    json: bool,
    /// Running nodes to use instead of starting any.
    members: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreOp {
    Put,
    Get,
    Exists,
}

impl StoreOp {
    fn name(self) -> &'static str {
        match self {
            StoreOp::Put => "put",
            StoreOp::Get => "get",
            StoreOp::Exists => "exists",
        }
    }
}

fn transports(name: &str) -> Res<Vec<TransportKind>> {
    match name {
        "tcp" => Ok(vec![TransportKind::Tcp]),
        "shm" => Ok(vec![TransportKind::Shm]),
        "auto" => Ok(EngineConfig::default().transports),
        other => Err(usage_err(format!(
            "--transport {other:?}: expected tcp, shm or auto"
        ))),
    }
}

pub(super) fn parse_store(rest: &[String]) -> Res<StoreArgs> {
    let f = parse_flags(
        "store",
        rest,
        &[
            "nodes",
            "value",
            "batch",
            "op",
            "duration",
            "node-memory",
            "transport",
            "members",
        ],
        &["json"],
    )?;
    let ops = match f.value("op") {
        None => vec![StoreOp::Put, StoreOp::Get, StoreOp::Exists],
        Some(list) => list
            .split(',')
            .map(|o| match o.trim() {
                "put" => Ok(StoreOp::Put),
                "get" => Ok(StoreOp::Get),
                "exists" => Ok(StoreOp::Exists),
                other => Err(usage_err(format!(
                    "--op {other:?}: expected put, get or exists (comma-separated)"
                ))),
            })
            .collect::<Res<Vec<_>>>()?,
    };
    let transport_name = f.value("transport").unwrap_or("tcp").to_string();
    Ok(StoreArgs {
        nodes: match f.value("nodes") {
            Some(n) => super::parse_count("nodes", n, 64)?,
            None => 1,
        },
        value: f.size("value", 64 << 10)?,
        batch: match f.value("batch") {
            Some(n) => super::parse_count("batch", n, 8192)?,
            None => 32,
        },
        ops,
        duration: match f.value("duration") {
            Some(d) => parse_seconds(d).map_err(usage_err)?,
            None => Duration::from_secs(5),
        },
        node_memory: f.size("node-memory", 1 << 30)?,
        transport: transports(&transport_name)?,
        transport_name,
        json: f.has("json"),
        members: f
            .value("members")
            .map(|m| m.split(',').map(|s| s.trim().to_string()).collect()),
    })
}

/// Options of the hidden `store-node` subcommand.
#[derive(Debug)]
pub(super) struct NodeArgs {
    memory: u64,
    transport: Vec<TransportKind>,
}

pub(super) fn parse_node(rest: &[String]) -> Res<NodeArgs> {
    let f = parse_flags("store-node", rest, &["memory", "transport"], &[])?;
    Ok(NodeArgs {
        memory: f.size("memory", 1 << 30)?,
        transport: transports(f.value("transport").unwrap_or("tcp"))?,
    })
}

fn engine(transport: &[TransportKind]) -> Res<Arc<Engine>> {
    let config = EngineConfig::builder()
        .transports(transport)
        .build()
        .context(|| "bad engine configuration".into())?;
    Ok(Arc::new(
        Engine::new(config).context(|| "cannot start an engine".into())?,
    ))
}

/// A store node: contributes `--memory`, prints `ready <session>`, answers `cpu` on
/// stdin, exits at EOF.
pub(super) fn node_main(args: &NodeArgs) -> Res<()> {
    let engine = engine(&args.transport)?;
    let store = Store::setup(
        Arc::clone(&engine),
        StoreConfig {
            segment: Some(SegmentConfig {
                memory_bytes: args.memory,
                ..SegmentConfig::default()
            }),
            ..StoreConfig::default()
        },
    )
    .context(|| "cannot set up the store segment".into())?;
    let session = engine.session_id().unwrap_or("?").to_string();
    eprintln!(
        "store-node: pid {}, session {session}, {} contributed",
        std::process::id(),
        fmt_size(args.memory)
    );
    out_line(&format!("ready {session}"))?;
    for line in std::io::stdin().lock().lines() {
        let line = line.context(|| "cannot read stdin".into())?;
        if line.trim() == "cpu" {
            out_line(&format!("cpu_s {:.6}", process_cpu_s()))?;
        }
    }
    let stats = store.segment().map(|s| s.stats());
    eprintln!("store-node {session}: {stats:?}");
    let _ = out_line(&format!("cpu_s {:.6}", process_cpu_s()));
    drop(store);
    Ok(())
}

/// What one point measured.
struct Measured {
    calls: u64,
    keys: u64,
    bytes: u64,
    latencies_ns: Vec<u64>,
    elapsed: Duration,
    failures: u64,
    first_failure: Option<String>,
}

pub(super) fn store_main(args: &StoreArgs) -> Res<()> {
    let mut nodes = Vec::new();
    let started = if args.members.is_some() {
        0
    } else {
        args.nodes
    };
    for _ in 0..started {
        let a: Vec<String> = [
            "store-node".to_string(),
            "--memory".into(),
            args.node_memory.to_string(),
            "--transport".into(),
            args.transport_name.clone(),
        ]
        .to_vec();
        nodes.push(TargetProc::spawn_args(&a, MemoryChoice::Buffer)?);
    }
    let members: Vec<String> = match &args.members {
        Some(m) => m.clone(),
        None => nodes.iter().map(|n| n.session.clone()).collect(),
    };
    let node_count = members.len() as u64;
    let engine = engine(&args.transport)?;
    let store = Store::setup(
        Arc::clone(&engine),
        StoreConfig {
            members,
            ..StoreConfig::default()
        },
    )
    .context(|| "cannot set up the store client".into())?;
    let batch_bytes = args.value as usize * args.batch;
    let src = engine
        .allocate(batch_bytes, Location::Any)
        .context(|| "cannot allocate the client's buffer".into())?;
    let dst = engine
        .allocate(batch_bytes, Location::Any)
        .context(|| "cannot allocate the client's buffer".into())?;
    let pattern: Vec<u8> = (0..batch_bytes).map(|i| (i * 131 % 251) as u8).collect();
    src.write_at(0, &pattern)
        .map_err(|e| Failure::Run(e.to_string()))?;
    let value = args.value;
    let src_ptrs: Vec<u64> = (0..args.batch)
        .map(|i| src.addr() + i as u64 * value)
        .collect();
    let dst_ptrs: Vec<u64> = (0..args.batch)
        .map(|i| dst.addr() + i as u64 * value)
        .collect();
    let sizes = vec![value; args.batch];
    // The working set of get/exists: half of the nodes' memory at most, whole batches.
    let set_bytes = (args.node_memory * node_count / 2).min(4 << 30);
    let set_batches = ((set_bytes / value) as usize / args.batch).clamp(1, 4096);
    let key = |prefix: &str, n: u64| format!("{prefix}-{n:016}").into_bytes();
    let mut working_set_ready = false;

    if !args.json {
        out_line(&format!(
            "{:<9} {:<6} {:>7} {:>5} {:>8} {:>11} {:>10} {:>10} {:>10} {:>9} {:>11}",
            "transport",
            "op",
            "block",
            "batch",
            "GB/s",
            "ops/s",
            "p50_us",
            "p99_us",
            "cpu_init_s",
            "cpu_tgt_s",
            "keys/s"
        ))?;
    }
    for &op in &args.ops {
        if op != StoreOp::Put && !working_set_ready {
            for b in 0..set_batches {
                let keys: Vec<Vec<u8>> = (0..args.batch)
                    .map(|i| key("set", (b * args.batch + i) as u64))
                    .collect();
                let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
                let r = store
                    .batch_put_from(&refs, &src_ptrs, &sizes)
                    .context(|| "put of the working set".into())?;
                if let Some(Err(e)) = r.iter().find(|r| r.is_err()) {
                    return Err(Failure::Run(format!("put of the working set: {e}")));
                }
            }
            working_set_ready = true;
        }
        let cpu_nodes_before: f64 = nodes.iter_mut().map(|n| n.cpu()).sum::<Res<f64>>()?;
        let cpu_before = process_cpu_s();
        let m = run_point(
            &store,
            op,
            args,
            set_batches,
            &key,
            (&src_ptrs, &dst_ptrs, &sizes),
        )?;
        let cpu_client = process_cpu_s() - cpu_before;
        let cpu_nodes = nodes.iter_mut().map(|n| n.cpu()).sum::<Res<f64>>()? - cpu_nodes_before;
        if m.failures > 0 {
            eprintln!(
                "store: {} of {} keys failed during {} (first: {})",
                m.failures,
                m.keys,
                op.name(),
                m.first_failure.as_deref().unwrap_or("?")
            );
        }
        if op == StoreOp::Get && dst.to_vec() != pattern {
            return Err(Failure::Mismatch(
                "get returned bytes other than those put".into(),
            ));
        }
        let mut lat = m.latencies_ns;
        lat.sort_unstable();
        let secs = m.elapsed.as_secs_f64();
        let gbps = m.bytes as f64 / secs / 1e9;
        let (p50, p99) = (
            percentile(&lat, 0.50) as f64 / 1e3,
            percentile(&lat, 0.99) as f64 / 1e3,
        );
        let line = if args.json {
            format!(
                "{{\"transport\":\"{}\",\"op\":\"{}\",\"block\":{},\"batch\":{},\"gbps\":{gbps:.6},\
                 \"ops_per_s\":{:.3},\"keys_per_s\":{:.3},\"p50_us\":{p50:.3},\"p99_us\":{p99:.3},\
                 \"cpu_s\":{:.6},\"cpu_initiator_s\":{cpu_client:.6},\"cpu_target_s\":{},\
                 \"nodes\":{},\"failures\":{}}}",
                args.transport_name,
                op.name(),
                value,
                args.batch,
                m.calls as f64 / secs,
                m.keys as f64 / secs,
                cpu_client + cpu_nodes,
                if nodes.is_empty() { "null".to_string() } else { format!("{cpu_nodes:.6}") },
                node_count,
                m.failures
            )
        } else {
            format!(
                "{:<9} {:<6} {:>7} {:>5} {:>8.3} {:>11.0} {:>10.1} {:>10.1} {:>10.3} {:>9} {:>11.0}",
                args.transport_name,
                op.name(),
                fmt_size(value),
                args.batch,
                gbps,
                m.calls as f64 / secs,
                p50,
                p99,
                cpu_client,
                if nodes.is_empty() { "-".to_string() } else { format!("{cpu_nodes:.3}") },
                m.keys as f64 / secs
            )
        };
        out_line(&line)?;
    }
    drop(store);
    for n in nodes {
        n.finish()?;
    }
    Ok(())
}

type Ptrs<'a> = (&'a [u64], &'a [u64], &'a [u64]);

fn run_point(
    store: &Store,
    op: StoreOp,
    args: &StoreArgs,
    set_batches: usize,
    key: &dyn Fn(&str, u64) -> Vec<u8>,
    (src, dst, sizes): Ptrs<'_>,
) -> Res<Measured> {
    let mut m = Measured {
        calls: 0,
        keys: 0,
        bytes: 0,
        latencies_ns: Vec::new(),
        elapsed: Duration::ZERO,
        failures: 0,
        first_failure: None,
    };
    let run_id = std::process::id() as u64 * 1_000_000 + Instant::now().elapsed().as_nanos() as u64;
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < args.duration {
        let keys: Vec<Vec<u8>> = match op {
            StoreOp::Put => (0..args.batch as u64)
                .map(|i| key(&format!("put{run_id}"), n * args.batch as u64 + i))
                .collect(),
            _ => {
                let b = n as usize % set_batches;
                (0..args.batch)
                    .map(|i| key("set", (b * args.batch + i) as u64))
                    .collect()
            }
        };
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let t = Instant::now();
        let failed: Vec<String> = match op {
            StoreOp::Put => store
                .batch_put_from(&refs, src, sizes)
                .context(|| "put".into())?
                .into_iter()
                .filter_map(|r| r.err().map(|e| e.to_string()))
                .collect(),
            StoreOp::Get => store
                .batch_get_into(&refs, dst, sizes)
                .context(|| "get".into())?
                .into_iter()
                .filter_map(|r| r.err().map(|e| e.to_string()))
                .collect(),
            StoreOp::Exists => {
                let e = store.batch_exists(&refs).context(|| "exists".into())?;
                if e.prefix == refs.len() {
                    Vec::new()
                } else {
                    vec![format!("only {} of {} keys exist", e.prefix, refs.len())]
                }
            }
        };
        m.latencies_ns.push(t.elapsed().as_nanos() as u64);
        m.calls += 1;
        m.keys += args.batch as u64;
        if op != StoreOp::Exists {
            m.bytes += args.value * args.batch as u64;
        }
        if !failed.is_empty() {
            m.failures += failed.len() as u64;
            m.first_failure.get_or_insert_with(|| failed[0].clone());
        }
        n += 1;
    }
    m.elapsed = start.elapsed();
    Ok(m)
}
