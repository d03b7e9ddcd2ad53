//! `kvxfer_store_node`: a dedicated store node. It runs an engine, contributes memory (and
//! optionally an SSD tier) to the kvxfer L3 KV store, and serves clients until stopped.
//! There is no master: clients list the nodes' sessions and place keys by rendezvous
//! hashing, so a node only needs to be started and its `ready` line read.
//!
//! ```text
//! kvxfer_store_node [--listen HOST:PORT] [--memory SIZE] [--disk DIR --disk-size SIZE]
//!                   [--members HOST:PORT,...] [--transports tcp,shm,rdma]
//!                   [--device-list L] [--forever]
//! ```
//!
//! It prints one line `ready <session>` on stdout once it serves (clients use that
//! session as a member), logs what it serves on stderr, and serves until stdin reaches
//! EOF (or, with `--forever`, until SIGINT/SIGTERM). On the way out it prints its
//! counters to stderr. Run `--help` for the details.

#[path = "support/sizes.rs"]
mod sizes;
use sizes::{fmt_size, parse_size};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;

use kvxfer::store::{SegmentConfig, Store, StoreConfig, StoreStats};
use kvxfer::{Engine, EngineConfig, TransportKind};

const USAGE: &str = "\
kvxfer_store_node: a dedicated kvxfer store node (memory, and optionally disk, for the
L3 KV store; no master: clients list the nodes' sessions)

USAGE:
  kvxfer_store_node [--listen HOST:PORT] [--memory SIZE] [--disk DIR --disk-size SIZE]
                    [--members HOST:PORT,...] [--transports LIST] [--device-list L]
                    [--forever]
  kvxfer_store_node --help

  --listen HOST:PORT   the engine's control listener, which is also the node's session
                       (default 127.0.0.1:0: a free port on loopback; use the host's
                       address, e.g. 10.0.0.5:7100, for clients on other hosts)
  --memory SIZE        memory contributed to the store (default 1GiB)
  --disk DIR           a directory for the SSD tier's cache file (created if missing;
                       objects evicted from memory are demoted there and promoted back
                       on a hit); needs --disk-size. The file is deleted when the node
                       stops (EOF or SIGINT/SIGTERM; not when killed with SIGKILL).
  --disk-size SIZE     size of the SSD tier's file (a multiple of 4KiB)
  --members LIST       the other store nodes' sessions, comma-separated (only used for
                       the `members` command: nodes do not talk to each other)
  --transports LIST    transports to clients, in order of preference, comma-separated
                       from shm, rdma, tcp (default: the engine's, shm,rdma,tcp)
  --device-list L      the RDMA NICs to use, in any device-list form (`auto`,
                       `mlx5_0,mlx5_1`, JSON, a .json file); default auto
  --forever            ignore stdin (scripts that start the node with stdin at
                       /dev/null would otherwise see EOF at once); stop with
                       SIGINT/SIGTERM

Once it serves, it prints `ready <session>` on stdout. It serves until stdin reaches
EOF, or SIGINT/SIGTERM; then it prints its counters to stderr and exits with status 0.
Lines on stdin:
  stats     answered with `stats <name>=<value> ...` (this node's counters)
  members   answered with one `member <session> <name>=<value> ...` or
            `member <session> error <why>` line per member, then `members end`

SIZE: a number with an optional binary suffix: K Ki KiB KB = 1024, M Mi MiB MB = 1024^2,
      G Gi GiB GB = 1024^3, T Ti TiB TB = 1024^4 (case-insensitive).

Environment: the KVX_* engine overrides (KVX_IO_THREADS, KVX_TCP_LANES, ...) apply.
Exit status: 0 stopped (EOF or signal), 1 failure, 2 bad arguments.
";

const DEFAULT_MEMORY: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why the node stops early; each kind has its own exit status (see `main`).
#[derive(Debug, PartialEq)]
enum Failure {
    /// Bad command line: exit 2.
    Usage(String),
    /// The engine, the store or the OS failed: exit 1.
    Run(String),
}

type Res<T> = Result<T, Failure>;

fn usage_err(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

fn run_err(msg: impl Into<String>) -> Failure {
    Failure::Run(msg.into())
}

/// Prints kvxfer's log lines (a fallback, the SSD tier, a member skipped) to stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
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
        log::set_max_level(log::LevelFilter::Info);
    }
    // args_os: std::env::args() panics on an argument that is not UTF-8.
    let args: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let result = match args {
        Ok(args) => match parse_args(&args) {
            Ok(Cmd::Help) => out_line(USAGE.trim_end()),
            Ok(Cmd::Serve(node)) => serve(&node),
            Err(e) => Err(e),
        },
        Err(bad) => Err(usage_err(format!("argument {bad:?} is not valid UTF-8"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("kvxfer_store_node: {msg}\nRun `kvxfer_store_node --help` for usage.");
            ExitCode::from(2)
        }
        Err(Failure::Run(msg)) => {
            eprintln!("kvxfer_store_node: error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Writes one line to stdout and flushes it. `println!` would panic when stdout is gone
/// (a closed pipe); here that is an error like any other.
fn out_line(line: &str) -> Res<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| run_err(format!("cannot write to stdout: {e}")))
}

// ---------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------

/// What the node serves.
#[derive(Debug, PartialEq)]
struct NodeArgs {
    listen: String,
    memory: u64,
    /// The SSD tier: directory and file size.
    disk: Option<(PathBuf, u64)>,
    members: Vec<String>,
    /// `None`: the engine's default order.
    transports: Option<Vec<TransportKind>>,
    /// RDMA NICs (`--device-list`).
    devices: Option<String>,
    forever: bool,
}

#[derive(Debug, PartialEq)]
enum Cmd {
    Help,
    Serve(NodeArgs),
}

const VALUED: [&str; 7] = [
    "listen",
    "memory",
    "disk",
    "disk-size",
    "members",
    "transports",
    "device-list",
];
const SWITCHES: [&str; 1] = ["forever"];

/// Parses `--name value`, `--name=value` and `--switch`; a flag given twice is refused
/// (wrapper scripts appending options must not silently win or lose).
fn parse_flags(args: &[String]) -> Res<Vec<(&'static str, Option<String>)>> {
    let mut flags: Vec<(&'static str, Option<String>)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(body) = arg.strip_prefix("--") else {
            return Err(usage_err(format!(
                "unexpected argument {arg:?} (options start with --)"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let entry = if let Some(&flag) = VALUED.iter().find(|f| **f == name) {
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
            (flag, Some(value))
        } else if let Some(&flag) = SWITCHES.iter().find(|f| **f == name) {
            if inline.is_some() {
                return Err(usage_err(format!("--{name} takes no value")));
            }
            (flag, None)
        } else {
            return Err(usage_err(format!("unknown option {arg:?}")));
        };
        if flags.iter().any(|(f, _)| *f == entry.0) {
            return Err(usage_err(format!("--{name} is given twice")));
        }
        flags.push(entry);
        i += 1;
    }
    Ok(flags)
}

fn parse_args(args: &[String]) -> Res<Cmd> {
    if args
        .iter()
        .any(|a| a == "--help" || a == "-h" || a == "help")
    {
        return Ok(Cmd::Help);
    }
    let flags = parse_flags(args)?;
    let value = |name: &str| -> Option<&str> {
        flags
            .iter()
            .find(|(f, _)| *f == name)
            .and_then(|(_, v)| v.as_deref())
    };
    let size = |name: &str| -> Res<Option<u64>> {
        match value(name) {
            None => Ok(None),
            Some(v) => match parse_size(v) {
                Ok(0) => Err(usage_err(format!("--{name} must be at least 1 byte"))),
                Ok(n) => Ok(Some(n)),
                Err(e) => Err(usage_err(format!("--{name}: {e}"))),
            },
        }
    };
    let listen = value("listen").unwrap_or("127.0.0.1:0").trim().to_string();
    if listen.is_empty() {
        return Err(usage_err("--listen needs HOST:PORT"));
    }
    let memory = size("memory")?.unwrap_or(DEFAULT_MEMORY);
    let disk = match (value("disk"), size("disk-size")?) {
        (None, None) => None,
        (Some(dir), Some(bytes)) => {
            if dir.trim().is_empty() {
                return Err(usage_err("--disk needs a directory"));
            }
            if bytes % 4096 != 0 {
                return Err(usage_err(format!(
                    "--disk-size {} is not a multiple of 4KiB",
                    fmt_size(bytes)
                )));
            }
            Some((PathBuf::from(dir), bytes))
        }
        (Some(_), None) => return Err(usage_err("--disk needs --disk-size SIZE")),
        (None, Some(_)) => return Err(usage_err("--disk-size needs --disk DIR")),
    };
    let members = match value("members") {
        None => Vec::new(),
        Some(list) => {
            let members: Vec<String> = list.split(',').map(|m| m.trim().to_string()).collect();
            if let Some(bad) = members.iter().find(|m| !m.contains(':')) {
                return Err(usage_err(format!(
                    "--members {list:?}: {bad:?} is not HOST:PORT"
                )));
            }
            members
        }
    };
    let transports = match value("transports") {
        None => None,
        Some(list) => {
            let kinds = kvxfer::transport::parse_transport_list(list)
                .map_err(|e| usage_err(format!("--transports {list:?}: {e}")))?;
            if let Some(bad) = kinds.iter().find(|k| **k == TransportKind::Local) {
                return Err(usage_err(format!(
                    "--transports {list:?}: {bad} is not a transport to other processes (use shm, rdma, tcp)"
                )));
            }
            Some(kinds)
        }
    };
    Ok(Cmd::Serve(NodeArgs {
        listen,
        memory,
        disk,
        members,
        transports,
        devices: value("device-list").map(str::to_string),
        forever: flags.iter().any(|(f, _)| *f == "forever"),
    }))
}

// ---------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------

/// What ends (or is asked of) the main loop.
enum Event {
    /// A line on stdin.
    Line(String),
    /// stdin reached EOF (or failed).
    Eof(Option<String>),
    /// SIGINT or SIGTERM.
    Signal(i32),
}

/// Blocks SIGINT and SIGTERM in this thread, so in every thread started after it (the
/// engine's too), and starts a thread that waits for them with `sigwait` and reports them
/// on `events`. The node then stops in order (counters printed, engine shut down) instead
/// of in a signal handler, where almost nothing is allowed.
fn catch_stop_signals(events: mpsc::Sender<Event>) -> Res<()> {
    // SAFETY: `sigset_t` is a plain C type for which all-zero bytes is a valid value (it
    // is initialised by sigemptyset right after).
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; SIGINT and SIGTERM are valid signals.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(run_err(format!(
            "cannot block SIGINT/SIGTERM: {}",
            std::io::Error::from_raw_os_error(rc)
        )));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset_t owned by this closure and `sig` a
            // valid place for the result; the signals are blocked in every thread.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = events.send(Event::Signal(sig));
                return;
            }
        })
        .map_err(|e| run_err(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

/// Reads stdin line by line into `events` until EOF.
fn read_stdin(events: mpsc::Sender<Event>) -> Res<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line {
                    Ok(line) => {
                        if events.send(Event::Line(line)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = events.send(Event::Eof(Some(e.to_string())));
                        return;
                    }
                }
            }
            let _ = events.send(Event::Eof(None));
        })
        .map_err(|e| run_err(format!("cannot start the stdin thread: {e}")))?;
    Ok(())
}

/// `name=value` pairs of every counter, in one line.
fn stats_line(s: &StoreStats) -> String {
    let fields: [(&str, u64); 16] = [
        ("memory_capacity", s.memory_capacity),
        ("memory_used", s.memory_used),
        ("disk_capacity", s.disk_capacity),
        ("disk_used", s.disk_used),
        ("objects_in_memory", s.objects_in_memory),
        ("objects_on_disk", s.objects_on_disk),
        ("reservations", s.reservations),
        ("leases", s.leases),
        ("puts", s.puts),
        ("hits", s.hits),
        ("misses", s.misses),
        ("evictions", s.evictions),
        ("demotions", s.demotions),
        ("promotions", s.promotions),
        ("reclaimed_reservations", s.reclaimed_reservations),
        ("expired_leases", s.expired_leases),
    ];
    let parts: Vec<String> = fields.iter().map(|(n, v)| format!("{n}={v}")).collect();
    parts.join(" ")
}

fn serve(args: &NodeArgs) -> Res<()> {
    if let Some((dir, _)) = &args.disk {
        std::fs::create_dir_all(dir)
            .map_err(|e| run_err(format!("cannot create --disk {}: {e}", dir.display())))?;
    }
    let (tx, events) = mpsc::channel();
    // Before the engine starts its threads: they inherit the blocked signals.
    catch_stop_signals(tx.clone())?;
    let mut builder = EngineConfig::builder().listen(Some(&args.listen));
    if let Some(kinds) = &args.transports {
        builder = builder.transports(kinds);
    }
    if let Some(devices) = &args.devices {
        builder = builder.rdma_devices(devices);
    }
    let config = builder
        .build()
        .map_err(|e| usage_err(format!("bad engine configuration: {e}")))?;
    let engine = Arc::new(
        Engine::new(config)
            .map_err(|e| run_err(format!("cannot listen on {}: {e}", args.listen)))?,
    );
    let store = Store::setup(
        Arc::clone(&engine),
        StoreConfig {
            members: args.members.clone(),
            segment: Some(SegmentConfig {
                memory_bytes: args.memory,
                disk: args.disk.clone(),
                ..SegmentConfig::default()
            }),
            ..StoreConfig::default()
        },
    )
    .map_err(|e| match e {
        kvxfer::store::StoreError::BadMember { .. } => usage_err(format!("--members: {e}")),
        e => run_err(e.to_string()),
    })?;
    let session = engine
        .session_id()
        .ok_or_else(|| run_err("the engine does not listen (KVX_LISTEN=none?)"))?
        .to_string();
    let transports: Vec<String> = engine
        .transports()
        .iter()
        .map(|t| format!("{} ({})", t.kind, t.detail))
        .collect();
    let disk = match &args.disk {
        Some((dir, bytes)) => format!("{} of disk in {}", fmt_size(*bytes), dir.display()),
        None => "no disk tier".into(),
    };
    eprintln!(
        "store node: pid {}, session {session}, {} of memory, {disk}; transports: {}; members: {}",
        std::process::id(),
        fmt_size(args.memory),
        transports.join(", "),
        store.members().join(",")
    );
    out_line(&format!("ready {session}"))?;

    if !args.forever {
        read_stdin(tx)?;
    } else {
        drop(tx);
    }
    let why = loop {
        match events.recv() {
            Ok(Event::Line(line)) => match line.trim() {
                "" => {}
                "stats" => out_line(&format!("stats {}", stats_line(&own_stats(&store))))?,
                "members" => {
                    for (member, stats) in store.member_stats() {
                        out_line(&match stats {
                            Ok(s) => format!("member {member} {}", stats_line(&s)),
                            Err(why) => format!("member {member} error {why}"),
                        })?;
                    }
                    out_line("members end")?;
                }
                other => eprintln!(
                    "store node: ignoring unknown request {other:?} (known: stats, members)"
                ),
            },
            Ok(Event::Eof(None)) => break "end of stdin".to_string(),
            Ok(Event::Eof(Some(e))) => break format!("stdin failed: {e}"),
            Ok(Event::Signal(sig)) => break format!("signal {sig}"),
            // Every sender gone: cannot happen while the signal thread waits.
            Err(_) => break "no more events".to_string(),
        }
    };
    eprintln!(
        "store node: stopping ({why}); counters: {}",
        stats_line(&own_stats(&store))
    );
    // The store stops serving first (peers are then told it serves no store), then the
    // engine goes (its batches quiesced).
    drop(store);
    drop(engine);
    Ok(())
}

fn own_stats(store: &Store) -> StoreStats {
    store.segment().map(|s| s.stats()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn node(line: &str) -> NodeArgs {
        match parse_args(&args(line)) {
            Ok(Cmd::Serve(n)) => n,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    fn usage_message(line: &str) -> String {
        match parse_args(&args(line)) {
            Err(Failure::Usage(msg)) => msg,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(
            node(""),
            NodeArgs {
                listen: "127.0.0.1:0".into(),
                memory: 1 << 30,
                disk: None,
                members: vec![],
                transports: None,
                devices: None,
                forever: false,
            }
        );
    }

    #[test]
    fn every_option_parses() {
        let n = node(
            "--listen 10.0.0.5:7100 --memory 64MiB --disk /mnt/ssd --disk-size=2GiB \
             --members a:1,b:2 --transports tcp,shm --device-list mlx5_0 --forever",
        );
        assert_eq!(
            n,
            NodeArgs {
                listen: "10.0.0.5:7100".into(),
                memory: 64 << 20,
                disk: Some((PathBuf::from("/mnt/ssd"), 2 << 30)),
                members: vec!["a:1".into(), "b:2".into()],
                transports: Some(vec![TransportKind::Tcp, TransportKind::Shm]),
                devices: Some("mlx5_0".into()),
                forever: true,
            }
        );
    }

    #[test]
    fn sizes_with_every_suffix_are_binary() {
        assert_eq!(parse_size("4096"), Ok(4096));
        for s in ["4K", "4Ki", "4KiB", "4KB", "4k", "4kib", " 4 KiB "] {
            assert_eq!(parse_size(s), Ok(4096), "{s}");
        }
        for s in ["64M", "64Mi", "64MiB", "64mb"] {
            assert_eq!(parse_size(s), Ok(64 << 20), "{s}");
        }
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in [
            "",
            "KiB",
            "1.5GiB",
            "4KiBB",
            "-1",
            "4Q",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("16777216T").is_err(), "overflow");
        assert_eq!(node("--memory 16MiB").memory, 16 << 20);
        assert_eq!(node("--memory=32m").memory, 32 << 20);
    }

    #[test]
    fn sizes_print_exactly() {
        assert_eq!(fmt_size(4096), "4KiB");
        assert_eq!(fmt_size(1 << 20), "1MiB");
        assert_eq!(fmt_size(3 << 30), "3GiB");
        assert_eq!(fmt_size(4000), "4000B");
    }

    #[test]
    fn help_wins() {
        assert_eq!(parse_args(&args("--help")), Ok(Cmd::Help));
        assert_eq!(parse_args(&args("--memory 1G -h")), Ok(Cmd::Help));
        assert!(USAGE.contains("--disk-size"));
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for bad in [
            "--memory",
            "--memory 0",
            "--memory lots",
            "--memory 1.5GiB",
            "--disk /tmp",
            "--disk-size 1GiB",
            "--disk /tmp --disk-size 4097",
            "--disk /tmp --disk-size 0",
            "--members a:1,nonsense",
            "--members a:1,",
            "--transports udp",
            "--transports tcp,tcp",
            "--transports local",
            "--transports",
            "--forever=yes",
            "--memory 1G --memory 2G",
            "--forever --forever",
            "--peer 1.2.3.4:5",
            "stray",
            "--listen=",
        ] {
            match parse_args(&args(bad)) {
                Err(Failure::Usage(_)) => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        assert!(usage_message("--disk /tmp").contains("--disk-size"));
        assert!(usage_message("--disk-size 1G").contains("--disk DIR"));
        assert!(usage_message("--members a:1,oops").contains("\"oops\""));
        assert!(usage_message("--transports udp").contains("udp"));
        assert!(usage_message("--memory 1G --memory 2G").contains("twice"));
        assert!(usage_message("--disk /tmp --disk-size 5000").contains("4KiB"));
        assert!(usage_message("--bogus").contains("--bogus"));
    }

    #[test]
    fn stats_lines_name_every_counter() {
        let s = StoreStats {
            memory_capacity: 1,
            evictions: 7,
            expired_leases: 9,
            ..StoreStats::default()
        };
        let line = stats_line(&s);
        assert_eq!(line.split(' ').count(), 16);
        assert!(line.starts_with("memory_capacity=1 "));
        assert!(line.contains(" evictions=7 "));
        assert!(line.ends_with(" expired_leases=9"));
    }
}
