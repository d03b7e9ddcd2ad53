//! The main demo: P→D transfer between two processes. A "decode" process registers a KV
//! pool laid out as SGLang lays it out (one K and one V buffer per layer, pages of 64
//! tokens); a "prefill" process writes a request's KV pages into it through the engine
//! with a notification; the decode side, on the notification, verifies every byte and
//! prints what arrived, how fast, and over which transport.
//!
//! Run: `cargo run --release --example kvxfer_demo -- [--pages N] [--layers N]`
//! (the prefill process starts the decode process itself, as a child).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvxfer::{Engine, EngineConfig, Location, Op};

/// Bytes of one KV page of one layer's K (or V): 64 tokens × 8 KV heads × 128 dims × bf16.
const PAGE_BYTES: usize = 64 * 8 * 128 * 2;
/// Pages in each pool.
const POOL_PAGES: usize = 128;

/// The request's pages sit at scattered slots on both sides (as each server's page
/// allocator placed them): source slot 3p+1, destination slot (7p + 5) mod pool.
fn src_slot(p: usize) -> usize {
    (3 * p + 1) % POOL_PAGES
}
fn dst_slot(p: usize) -> usize {
    (7 * p + 5) % POOL_PAGES
}

/// The content of page `page` of buffer `buffer` on the prefill side: distinct per
/// buffer, page and byte, so a misplaced or torn page is caught.
fn page_bytes(buffer: usize, page: usize) -> Vec<u8> {
    let seed = (buffer * 131 + page * 17 + 1) as u32;
    (0..PAGE_BYTES as u32)
        .map(|j| (seed.wrapping_mul(2_654_435_761) ^ j.wrapping_mul(40_503)) as u8)
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("decode") => parse_args(&args[1..]).and_then(|(p, l)| decode(p, l)),
        _ => parse_args(&args).and_then(|(p, l)| prefill(p, l)),
    };
    if let Err(e) = result {
        eprintln!("kvxfer_demo: {e}");
        std::process::exit(1);
    }
}

type DemoResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// The prefill process: starts the decode process, writes the request's pages into its
/// pool with a notification, and waits for the decode side's verdict.
fn prefill(pages: usize, layers: usize) -> DemoResult {
    println!(
        "kvxfer {} demo: P->D transfer of {pages} KV pages x {layers} layers x K,V between two processes",
        kvxfer::VERSION
    );
    let engine = Engine::new(EngineConfig::default())?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "decode",
            "--pages",
            &pages.to_string(),
            "--layers",
            &layers.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no child stdout")?).lines();
    // The decode process announces its session id and the addresses of its K/V buffers.
    let ready = lines
        .next()
        .ok_or("the decode process exited before it was ready")??;
    let mut words = ready.split_whitespace();
    if words.next() != Some("ready") {
        return Err(format!("unexpected line from the decode process: {ready:?}").into());
    }
    let session = words
        .next()
        .ok_or("ready line without a session id")?
        .to_string();
    let remote: Vec<u64> = words.map(str::parse).collect::<Result<_, _>>()?;
    if remote.len() != layers * 2 {
        return Err("the decode process announced the wrong number of buffers".into());
    }

    let home = home_location();
    let local = (0..layers * 2)
        .map(|i| {
            let buf = engine.allocate(POOL_PAGES * PAGE_BYTES, home)?;
            for p in 0..pages {
                buf.write_at(src_slot(p) * PAGE_BYTES, &page_bytes(i, src_slot(p)))?;
            }
            Ok(buf)
        })
        .collect::<DemoResult<Vec<_>>>()?;

    let peer = engine.open_peer(&session)?;
    println!(
        "  prefill (pid {}): session {}, opened decode peer {session} over {}",
        std::process::id(),
        engine.session_id().unwrap_or("-"),
        engine.peer_transport(peer)?
    );
    let ops: Vec<Op> = local
        .iter()
        .zip(&remote)
        .flat_map(|(src, &dst)| {
            (0..pages).map(move |p| {
                Op::write(
                    src.addr() + (src_slot(p) * PAGE_BYTES) as u64,
                    dst + (dst_slot(p) * PAGE_BYTES) as u64,
                    PAGE_BYTES as u64,
                )
            })
        })
        .collect();
    let sent_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let start = Instant::now();
    let over = engine.peer_transport(peer)?;
    let note = format!("req-1 pages={pages} layers={layers} transport={over} sent_at_ns={sent_at}");
    let batch = engine.submit_with_notify(peer, &ops, note.as_bytes())?;
    let state = engine.wait(batch, Duration::from_secs(60))?;
    let elapsed = start.elapsed();
    let moved_by = engine.batch_transport(batch)?;
    engine.free(batch)?;
    state.into_result()?;
    let bytes = ops.len() * PAGE_BYTES;
    println!(
        "  prefill: wrote {} ops ({:.1} MiB) over {moved_by} and the notification in {:.2} ms ({:.2} GB/s)",
        ops.len(),
        bytes as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64() * 1e3,
        bytes as f64 / elapsed.as_secs_f64() / 1e9
    );

    // The decode side prints its verdict, then exits when its stdin closes.
    let mut verdict = Err("the decode process exited without a verdict".to_string());
    for line in lines.by_ref() {
        let line = line?;
        println!("{line}");
        if line.contains("verified:") {
            verdict = Ok(());
            break;
        }
        if line.contains("FAILED") {
            verdict = Err("the decode side found wrong bytes".into());
            break;
        }
    }
    drop(child.stdin.take());
    let status = child.wait()?;
    verdict?;
    if !status.success() {
        return Err(format!("the decode process exited with {status}").into());
    }
    Ok(())
}

/// The decode process: registers its KV pool, announces it, waits for the notification,
/// then checks every page it was promised.
fn decode(pages: usize, layers: usize) -> DemoResult {
    let engine = Engine::new(EngineConfig::default())?;
    let home = home_location();
    let pool = (0..layers * 2)
        .map(|_| engine.allocate(POOL_PAGES * PAGE_BYTES, home))
        .collect::<Result<Vec<_>, _>>()?;
    let session = engine.session_id().ok_or("the engine does not listen")?;
    let addrs: Vec<String> = pool.iter().map(|b| b.addr().to_string()).collect();
    println!("ready {session} {}", addrs.join(" "));
    std::io::stdout().flush()?;

    let note = engine
        .wait_notification(Duration::from_secs(60))
        .ok_or("no notification within 60 s")?;
    let got_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let text = String::from_utf8_lossy(&note.bytes).into_owned();
    let sent_at: u128 = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sent_at_ns="))
        .and_then(|v| v.parse().ok())
        .ok_or("notification without sent_at_ns")?;
    let mut bad = 0;
    let mut page = vec![0u8; PAGE_BYTES];
    for (i, buf) in pool.iter().enumerate() {
        for p in 0..pages {
            buf.read_at(dst_slot(p) * PAGE_BYTES, &mut page)?;
            bad += usize::from(page != page_bytes(i, src_slot(p)));
        }
    }
    let total = pages * layers * 2;
    let bytes = total * PAGE_BYTES;
    let secs = (got_at.saturating_sub(sent_at)) as f64 / 1e9;
    println!(
        "  decode (pid {}): session {session}, notification {text:?} from {}",
        std::process::id(),
        note.from
    );
    println!(
        "  decode: {total} pages ({pages} pages x {layers} layers x K,V), {bytes} bytes arrived over {} in {:.2} ms ({:.2} GB/s, submit to notification)",
        transport_of(&engine, &text),
        secs * 1e3,
        bytes as f64 / secs.max(1e-9) / 1e9
    );
    if bad > 0 {
        println!("  decode: FAILED: {bad} of {total} pages differ from what prefill wrote");
        std::io::stdout().flush()?;
        return Err("wrong bytes".into());
    }
    println!("  decode: verified: all {total} pages identical at their destination slots");
    std::io::stdout().flush()?;
    // Serve until the prefill process is done with us (it closes our stdin).
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink)? > 0 {}
    Ok(())
}

/// The transport the prefill side says it used (in the notification), with what this
/// engine reports about it.
fn transport_of(engine: &Engine, note: &str) -> String {
    let Some(kind) = note
        .split_whitespace()
        .find_map(|w| w.strip_prefix("transport="))
    else {
        return "?".into();
    };
    engine
        .transports()
        .iter()
        .find(|t| t.kind.to_string() == kind)
        .map_or(kind.to_string(), |t| format!("{} ({})", t.kind, t.detail))
}

/// Host memory on NUMA node 0 where the kernel has NUMA nodes, else anywhere.
fn home_location() -> Location {
    if std::path::Path::new("/sys/devices/system/node/node0").exists() {
        Location::Cpu(0)
    } else {
        Location::Any
    }
}

fn parse_args(args: &[String]) -> Result<(usize, usize), Box<dyn std::error::Error>> {
    let (mut pages, mut layers) = (64, 8);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name} {v:?} is not a number"))
        };
        match arg.as_str() {
            "--pages" => pages = value("--pages")?,
            "--layers" => layers = value("--layers")?,
            "-h" | "--help" => {
                println!("usage: kvxfer_demo [--pages N (1..={POOL_PAGES}, default 64)] [--layers N (1..=64, default 8)]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if !(1..=POOL_PAGES).contains(&pages) || !(1..=64).contains(&layers) {
        return Err(format!("--pages must be 1..={POOL_PAGES} and --layers 1..=64").into());
    }
    Ok((pages, layers))
}
