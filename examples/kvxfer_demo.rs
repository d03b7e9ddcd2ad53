//! The main demo: a prefill KV pool hands a request's KV pages to a decode KV pool, laid
//! out as SGLang lays them out (one K and one V buffer per layer, pages of 64 tokens), with
//! every byte verified and a summary of what moved.
//!
//! For now both pools live in one engine (the in-process transport); the two-process
//! version replaces this once the TCP transport lands.
//!
//! Run: `cargo run --release --example kvxfer_demo -- [--pages N] [--layers N]`

use std::time::{Duration, Instant};

use kvxfer::{Engine, EngineConfig, Location, Op};

/// Bytes of one KV page of one layer's K (or V): 64 tokens × 8 KV heads × 128 dims × bf16.
const PAGE_BYTES: usize = 64 * 8 * 128 * 2;
/// Pages in each pool.
const POOL_PAGES: usize = 512;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (pages, layers) = parse_args()?;
    let engine = Engine::new(EngineConfig::default())?;
    // Host memory on NUMA node 0 where the kernel has NUMA nodes, else anywhere.
    let home = if std::path::Path::new("/sys/devices/system/node/node0").exists() {
        Location::Cpu(0)
    } else {
        Location::Any
    };
    println!(
        "kvxfer {} demo: in-process KV page transfer",
        kvxfer::VERSION
    );
    for t in engine.transports() {
        println!("  transport {}: {}", t.kind, t.detail);
    }

    // One K and one V buffer per layer on each side, as SGLang's MHA token-to-KV pool does.
    let buffers = |side: &str| -> Result<Vec<kvxfer::Buffer>, kvxfer::Error> {
        let all = (0..layers * 2)
            .map(|_| engine.allocate(POOL_PAGES * PAGE_BYTES, home))
            .collect::<Result<Vec<_>, _>>()?;
        let region = engine.region(all[0].addr()).expect("just registered");
        println!(
            "  {side:7}: {} layers x K,V, {} pages of {} KiB each, location {}",
            layers,
            POOL_PAGES,
            PAGE_BYTES >> 10,
            region.location()
        );
        Ok(all)
    };
    let prefill = buffers("prefill")?;
    let decode = buffers("decode")?;
    for (i, buf) in prefill.iter().enumerate() {
        for page in 0..POOL_PAGES {
            buf.fill(page * PAGE_BYTES, PAGE_BYTES, stamp(i, page))?;
        }
    }

    // The request's pages sit at scattered slots on both sides (as allocated by each
    // server's page allocator): source slot 3p+1, destination slot (7p + 5) mod pool.
    let src_slot = |p: usize| (3 * p + 1) % POOL_PAGES;
    let dst_slot = |p: usize| (7 * p + 5) % POOL_PAGES;
    let mut ops = Vec::with_capacity(pages * layers * 2);
    for (src, dst) in prefill.iter().zip(&decode) {
        for p in 0..pages {
            ops.push(Op::write(
                src.addr() + (src_slot(p) * PAGE_BYTES) as u64,
                dst.addr() + (dst_slot(p) * PAGE_BYTES) as u64,
                PAGE_BYTES as u64,
            ));
        }
    }

    let start = Instant::now();
    let batch = engine.submit(engine.local_peer(), &ops)?;
    let state = engine.wait(batch, Duration::from_secs(30))?;
    let elapsed = start.elapsed();
    engine.free(batch)?;
    state.into_result()?;

    let mut bad = 0;
    let mut page = vec![0u8; PAGE_BYTES];
    for (i, dst) in decode.iter().enumerate() {
        for p in 0..pages {
            dst.read_at(dst_slot(p) * PAGE_BYTES, &mut page)?;
            let want = stamp(i, src_slot(p));
            bad += usize::from(page.iter().any(|&b| b != want));
        }
    }
    let bytes = ops.len() * PAGE_BYTES;
    println!(
        "  moved {} pages x {} layers x K,V = {} ops, {:.1} MiB in {:.3} ms ({:.2} GB/s)",
        pages,
        layers,
        ops.len(),
        bytes as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64() * 1e3,
        bytes as f64 / elapsed.as_secs_f64() / 1e9
    );
    if bad > 0 {
        return Err(format!("{bad} of {} pages differ after the transfer", ops.len()).into());
    }
    println!(
        "  verified: all {} pages identical at their destination slots",
        ops.len()
    );
    let stats = engine.stats();
    println!(
        "  engine counters: {} batch submitted, {} completed, {} bytes moved",
        stats.batches_submitted, stats.batches_completed, stats.bytes_moved
    );
    Ok(())
}

/// The byte every position of (buffer, page) holds on the prefill side.
fn stamp(buffer: usize, page: usize) -> u8 {
    (buffer * 131 + page * 17 + 1) as u8
}

fn parse_args() -> Result<(usize, usize), String> {
    let (mut pages, mut layers) = (64, 8);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name} {v:?} is not a number"))
        };
        match arg.as_str() {
            "--pages" => pages = value("--pages")?,
            "--layers" => layers = value("--layers")?,
            "-h" | "--help" => {
                println!("usage: kvxfer_demo [--pages N (1..={POOL_PAGES}, default 64)] [--layers N (default 8)]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if !(1..=POOL_PAGES).contains(&pages) || layers == 0 {
        return Err(format!("--pages must be 1..={POOL_PAGES} and --layers > 0"));
    }
    Ok((pages, layers))
}
