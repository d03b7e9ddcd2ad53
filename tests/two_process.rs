//! Two real processes over loopback TCP: this test binary re-executes itself as a "target"
//! child (an engine with buffers, driven by commands on stdin, answering on stdout), and
//! the test itself is the initiator. Covers WRITE and READ verified byte for byte in the
//! other process, notifications ordered after data, a peer killed mid-batch, a peer
//! restarted on the same session, refusals (by the initiator and, with hand-built frames,
//! by the serving side), garbage on both listeners, and closed peer ids.
//!
//! Child protocol: the child prints `KVXCHILD ready <session> <rw> <ro> <extra> <data_port>
//! <epoch>` once it serves, then answers one `KVXCHILD ...` line per command line read on
//! stdin (see `serve_commands`). Only lines with the `KVXCHILD ` marker are parsed: libtest
//! prints its own lines on the same stdout. Reading the ready line (and each answer) is the
//! only synchronisation; a `Target` guard kills its child on drop, so no test leaks one.
//!
//! Memory discipline: `Vec` memory registered with an engine is declared before the engine,
//! so the engine (which quiesces its batches on drop) goes first.

mod common;
use common::{digest, pattern};

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvxfer::control::{self, ControlClient, FrameHeader, SegmentDescriptor};
use kvxfer::transport::tcp::wire::{self, Code, Entry, Header, Kind};
use kvxfer::{
    Access, BatchState, Engine, EngineConfig, Error, Location, MemoryError, Op, Side, TransportKind,
};

/// Set (to the role) in the environment of a child.
const CHILD_ENV: &str = "KVX_TEST_CHILD";
/// Marks the child's protocol lines on its stdout.
const MARK: &str = "KVXCHILD ";
/// One KV page of the transfers here.
const PAGE: usize = 64 << 10;
/// How long any answer of a child may take before the test fails (a hung child must not
/// hang the test run).
const ANSWER: Duration = Duration::from_secs(30);
/// A wait that is effectively unbounded but still ends a hung test.
const LONG: Duration = Duration::from_secs(60);
/// Seed of the pattern every child writes into its read-only buffer at start.
const RO_SEED: u64 = 0x0dd5_eed0_f0ad_0001;

// ---------------------------------------------------------------------------------------
// Hex dumps (patterns and digests: tests/common)
// ---------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "-".into();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    if s == "-" {
        return Vec::new();
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A small xorshift generator for garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Index of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

// ---------------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------------

/// Entry point of the child processes: does nothing unless `KVX_TEST_CHILD` is set.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    match role.as_str() {
        "target" => run_target(),
        other => panic!("unknown child role {other:?}"),
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A leading newline: libtest may have printed "test child_process_entry ... " without
    // one.
    writeln!(out, "\n{MARK}{line}").expect("stdout");
    out.flush().expect("stdout");
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| v.parse().expect(name))
}

/// The regions of a target child, by name.
struct TargetMemory {
    rw: kvxfer::Buffer,
    ro: kvxfer::Buffer,
    /// Caller memory (a leaked allocation), registered with every right.
    extra: *mut u8,
    extra_len: usize,
}

impl TargetMemory {
    fn addr(&self, which: &str) -> u64 {
        match which {
            "rw" => self.rw.addr(),
            "ro" => self.ro.addr(),
            "extra" => self.extra as u64,
            other => panic!("no region {other:?}"),
        }
    }

    fn bytes(&self, which: &str, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        match which {
            "rw" => self.rw.read_at(offset, &mut out).expect("inside rw"),
            "ro" => self.ro.read_at(offset, &mut out).expect("inside ro"),
            "extra" => {
                assert!(offset + len <= self.extra_len, "outside extra");
                // SAFETY: `extra` is a leaked allocation of `extra_len` bytes that is never
                // freed; the range was checked just above. Commands run only while no
                // batch of the parent writes it (the parent waits for its batches first).
                unsafe {
                    std::ptr::copy_nonoverlapping(self.extra.add(offset), out.as_mut_ptr(), len)
                };
            }
            other => panic!("no region {other:?}"),
        }
        out
    }
}

fn run_target() {
    let listen = std::env::var("KVX_TEST_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into());
    let rw_len = env_usize("KVX_TEST_RW_LEN", 1 << 20);
    let ro_len = env_usize("KVX_TEST_RO_LEN", 1 << 20);
    let extra_len = env_usize("KVX_TEST_EXTRA_LEN", 1 << 20);
    // Declared before the engine and never freed.
    let extra = Box::into_raw(vec![0u8; extra_len].into_boxed_slice()) as *mut u8;
    let config = EngineConfig::builder()
        .listen(Some(&listen))
        .batch_timeout(Duration::from_secs(30))
        .build()
        .expect("child config");
    let engine = Engine::new(config).expect("child engine starts");
    let rw = engine
        .allocate(rw_len, Location::Any)
        .expect("child rw buffer");
    if let Ok(seed) = std::env::var("KVX_TEST_RW_SEED") {
        let seed: u64 = seed.parse().expect("KVX_TEST_RW_SEED");
        rw.write_at(0, &pattern(seed, rw_len)).expect("fits");
    }
    let ro = engine
        .allocate_with_access(
            ro_len,
            Location::Any,
            Access::REMOTE_READ | Access::LOCAL_READ | Access::LOCAL_WRITE,
        )
        .expect("child ro buffer");
    ro.write_at(0, &pattern(RO_SEED, ro_len)).expect("fits");
    // SAFETY: `extra` is a leaked allocation of `extra_len` bytes, valid for the rest of
    // the process.
    unsafe { engine.register(extra as u64, extra_len as u64, None, Access::ALL) }
        .expect("register extra");
    let memory = TargetMemory {
        rw,
        ro,
        extra,
        extra_len,
    };

    // The data port, as a peer learns it: from the descriptor of a control handshake.
    let session = engine.session_id().expect("listens").to_string();
    let me = SegmentDescriptor {
        engine_id: 1,
        session: "127.0.0.1:9".into(),
        host: "kvxfer-two-process-test".into(),
        epoch: 1,
        version: 1,
        regions: vec![],
        transports: vec![],
        rdma_nics: vec![],
        rkeys: vec![],
    };
    let ctl = ControlClient::connect(&session, &me, Duration::from_secs(5)).expect("self");
    let own = ctl.descriptor();
    let port = own
        .transports
        .iter()
        .find(|t| t.kind == "tcp")
        .and_then(|t| t.param("port"))
        .expect("a tcp offer with a port")
        .to_string();
    let epoch = own.epoch;
    ctl.close();
    drop(ctl);

    say(&format!(
        "ready {session} {} {} {} {port} {epoch}",
        memory.addr("rw"),
        memory.addr("ro"),
        memory.addr("extra"),
    ));
    serve_commands(&engine, &memory);
}

/// Commands (one per line) and their answers:
///
/// - `ping` → `pong`
/// - `hash <region> <offset> <len>` → `hash <digest as 16 hex digits>`
/// - `bytes <region> <offset> <len>` → `bytes <hex>`
/// - `wait-notify <region> <offset> <len> <ms>` → `waiting`, then on the first
///   notification, having hashed the region at once: `notified <hex bytes> <from>
///   <digest>`; or `no-notification` after `ms`
/// - `drain` → `drained <count> <hex bytes of the first or ->` (without waiting)
/// - `pins <region>` → `pins <n>`
/// - `unregister-extra` → `unregister ok` or `unregister err <error>`
/// - `exit` (or end of input) ends the child.
fn serve_commands(engine: &Engine, memory: &TargetMemory) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> usize { words[i].parse().expect("number") };
        match words.as_slice() {
            [] => {}
            ["ping"] => say("pong"),
            ["hash", which, _, _] => {
                let bytes = memory.bytes(which, num(2), num(3));
                say(&format!("hash {:016x}", digest(&bytes)));
            }
            ["bytes", which, _, _] => {
                say(&format!(
                    "bytes {}",
                    hex(&memory.bytes(which, num(2), num(3)))
                ));
            }
            ["wait-notify", which, _, _, _] => {
                say("waiting");
                match engine.wait_notification(Duration::from_millis(num(4) as u64)) {
                    Some(n) => {
                        // Hash first: the bytes must already be there when it arrives.
                        let h = digest(&memory.bytes(which, num(2), num(3)));
                        say(&format!("notified {} {} {h:016x}", hex(&n.bytes), n.from));
                    }
                    None => say("no-notification"),
                }
            }
            ["drain"] => {
                let all = engine.notifications();
                let first = all.first().map_or("-".to_string(), |n| hex(&n.bytes));
                say(&format!("drained {} {first}", all.len()));
            }
            ["pins", which] => {
                let pins = engine
                    .region(memory.addr(which))
                    .map_or(usize::MAX, |r| r.pins());
                say(&format!("pins {pins}"));
            }
            ["unregister-extra"] => match engine.unregister(memory.addr("extra")) {
                Ok(()) => say("unregister ok"),
                Err(e) => say(&format!("unregister err {e}")),
            },
            ["exit"] => break,
            _ => panic!("child: unknown command {line:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------

/// How to start a target child.
#[derive(Clone, Debug)]
struct Spec {
    listen: String,
    rw_len: usize,
    ro_len: usize,
    rw_seed: Option<u64>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            listen: "127.0.0.1:0".into(),
            rw_len: 1 << 20,
            ro_len: 1 << 20,
            rw_seed: None,
        }
    }
}

/// A running target child; killed (SIGKILL) and reaped on drop.
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    spec: Spec,
    session: String,
    rw: u64,
    ro: u64,
    extra: u64,
    data_port: u16,
    epoch: u64,
}

impl Target {
    fn spawn(spec: Spec) -> Target {
        let exe = std::env::current_exe().expect("test binary");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "target")
        .env("KVX_TEST_LISTEN", &spec.listen)
        .env("KVX_TEST_RW_LEN", spec.rw_len.to_string())
        .env("KVX_TEST_RO_LEN", spec.ro_len.to_string())
        .env_remove("KVX_TEST_RW_SEED")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        // The child's configuration must be what the test says.
        for (name, _) in std::env::vars() {
            if name.starts_with("KVX_") && !name.starts_with("KVX_TEST_") {
                cmd.env_remove(name);
            }
        }
        if let Some(seed) = spec.rw_seed {
            cmd.env("KVX_TEST_RW_SEED", seed.to_string());
        }
        let mut child = cmd.spawn().expect("spawn the child");
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, rest)) = line.split_once(MARK) {
                    if tx.send(rest.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines,
            spec,
            session: String::new(),
            rw: 0,
            ro: 0,
            extra: 0,
            data_port: 0,
            epoch: 0,
        };
        let ready = t.answer();
        let f: Vec<&str> = ready.split_whitespace().collect();
        assert!(
            f.len() == 7 && f[0] == "ready",
            "unexpected first line {ready:?}"
        );
        t.session = f[1].to_string();
        t.rw = f[2].parse().expect("rw");
        t.ro = f[3].parse().expect("ro");
        t.extra = f[4].parse().expect("extra");
        t.data_port = f[5].parse().expect("port");
        t.epoch = f[6].parse().expect("epoch");
        t
    }

    /// The child's next protocol line.
    fn answer(&mut self) -> String {
        match self.lines.recv_timeout(ANSWER) {
            Ok(line) => line,
            Err(e) => panic!(
                "no answer from child {} ({e}); its exit status: {:?}",
                self.child.id(),
                self.child.try_wait()
            ),
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("child stdin open");
        writeln!(stdin, "{command}").expect("write to child");
        stdin.flush().expect("flush to child");
    }

    fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.answer()
    }

    fn hash(&mut self, which: &str, offset: usize, len: usize) -> u64 {
        let a = self.ask(&format!("hash {which} {offset} {len}"));
        let h = a.strip_prefix("hash ").unwrap_or_else(|| panic!("{a:?}"));
        u64::from_str_radix(h, 16).expect("hex digest")
    }

    fn bytes(&mut self, which: &str, offset: usize, len: usize) -> Vec<u8> {
        let a = self.ask(&format!("bytes {which} {offset} {len}"));
        unhex(a.strip_prefix("bytes ").unwrap_or_else(|| panic!("{a:?}")))
    }

    fn pins(&mut self, which: &str) -> usize {
        let a = self.ask(&format!("pins {which}"));
        a.strip_prefix("pins ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{a:?}"))
    }

    /// The child answers and has not exited.
    fn assert_alive(&mut self) {
        assert_eq!(self.ask("ping"), "pong");
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "child exited"
        );
    }

    /// The read-only buffer still holds the pattern written at start.
    fn assert_ro_intact(&mut self) {
        let len = self.spec.ro_len;
        assert_eq!(
            self.hash("ro", 0, len),
            digest(&pattern(RO_SEED, len)),
            "the child's read-only buffer changed"
        );
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        drop(self.stdin.take());
        self.kill();
    }
}

/// The initiator: TCP only, which is what this file tests (same-host shared memory, which
/// two processes here would otherwise use, has its own tests in same_host.rs).
fn engine() -> Engine {
    let config = EngineConfig::builder()
        .listen(Some("127.0.0.1:0"))
        .transports(&[TransportKind::Tcp])
        .batch_timeout(Duration::from_secs(20))
        .build()
        .expect("config");
    Engine::new(config).expect("engine starts")
}

/// Waits for a batch, frees it and returns how it ended.
fn finish(e: &Engine, id: kvxfer::BatchId) -> BatchState {
    let state = e.wait(id, LONG).expect("wait");
    assert!(
        state.is_finished(),
        "batch still in progress after {LONG:?}"
    );
    e.free(id).expect("free");
    state
}

fn assert_completed(state: BatchState) {
    assert!(
        matches!(state, BatchState::Completed),
        "batch ended {state:?}"
    );
}

/// A permutation of `0..n` for odd-stride page shuffles (`n` a power of two).
fn slot(i: usize, n: usize) -> usize {
    (i * 37 + 11) % n
}

// ---------------------------------------------------------------------------------------
// Raw data-lane frames
// ---------------------------------------------------------------------------------------

fn connect_raw(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// A request frame: header, entries and (for WRITE) the payload.
fn request(kind: Kind, id: u64, entries: &[(u64, u32)], payload: &[u8]) -> Vec<u8> {
    let mut out = Header {
        kind,
        count: entries.len() as u32,
        status: 0,
        id,
    }
    .encode()
    .to_vec();
    for &(addr, len) in entries {
        Entry { addr, len }.encode_into(&mut out);
    }
    out.extend_from_slice(payload);
    out
}

/// Reads one response header (and an ERROR's message).
fn response(s: &mut TcpStream) -> (Header, String) {
    let mut head = [0u8; wire::HEADER_LEN];
    s.read_exact(&mut head).expect("a response header");
    let h = Header::decode(&head).expect("a valid response header");
    let mut message = vec![0u8; if h.kind == Kind::Error { h.count } else { 0 } as usize];
    s.read_exact(&mut message).expect("the error message");
    (h, String::from_utf8_lossy(&message).into_owned())
}

/// Reads until the peer closes; true if it did (EOF or reset) within the read timeout.
fn closed_by_peer(s: &mut TcpStream) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (true, got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (false, got)
            }
            Err(_) => return (true, got),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// 128 pages of 64 KiB, each a distinct pattern, written into shuffled slots of the other
/// process; its whole buffer (one spare page included) hashes to what the parent predicts.
#[test]
fn write_is_byte_exact_in_the_other_process() {
    const PAGES: usize = 128;
    let mut t = Target::spawn(Spec {
        rw_len: (PAGES + 1) * PAGE,
        ..Spec::default()
    });
    let e = engine();
    let image = pattern(1, PAGES * PAGE);
    let src = e.allocate(PAGES * PAGE, Location::Any).unwrap();
    src.write_at(0, &image).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    assert_eq!(e.peer_transport(p).unwrap(), TransportKind::Tcp);
    let ops: Vec<Op> = (0..PAGES)
        .map(|i| {
            Op::write(
                src.addr() + (i * PAGE) as u64,
                t.rw + (slot(i, PAGES) * PAGE) as u64,
                PAGE as u64,
            )
        })
        .collect();
    let id = e.submit(p, &ops).unwrap();
    assert_completed(finish(&e, id));

    let mut expected = vec![0u8; (PAGES + 1) * PAGE];
    for i in 0..PAGES {
        expected[slot(i, PAGES) * PAGE..][..PAGE].copy_from_slice(&image[i * PAGE..][..PAGE]);
    }
    if t.hash("rw", 0, expected.len()) != digest(&expected) {
        for s in 0..=PAGES {
            let got = t.bytes("rw", s * PAGE, PAGE);
            if let Some(at) = first_difference(&got, &expected[s * PAGE..][..PAGE]) {
                panic!("target slot {s} differs first at byte {at}");
            }
        }
        panic!("digests differ but no page does");
    }
    t.assert_ro_intact();
    let stats = e.stats();
    assert!(stats.bytes_moved >= (PAGES * PAGE) as u64, "{stats:?}");
    t.assert_alive();
}

/// The target fills its buffer with a pattern at start; the parent reads it (shuffled
/// pages, then one op spanning all of it, then the read-only buffer) and checks every byte.
#[test]
fn read_returns_every_byte_of_the_other_process() {
    const PAGES: usize = 128;
    let len = PAGES * PAGE;
    let mut t = Target::spawn(Spec {
        rw_len: len,
        rw_seed: Some(42),
        ..Spec::default()
    });
    let e = engine();
    let remote = pattern(42, len);
    let dst = e.allocate(len, Location::Any).unwrap();
    dst.fill(0, len, 0xee).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    let ops: Vec<Op> = (0..PAGES)
        .map(|i| {
            Op::read(
                dst.addr() + (slot(i, PAGES) * PAGE) as u64,
                t.rw + (i * PAGE) as u64,
                PAGE as u64,
            )
        })
        .collect();
    e.transfer_sync(p, &ops).unwrap();
    let got = dst.to_vec();
    for i in 0..PAGES {
        let page = &got[slot(i, PAGES) * PAGE..][..PAGE];
        if let Some(at) = first_difference(page, &remote[i * PAGE..][..PAGE]) {
            panic!("remote page {i} read wrong, first at byte {at}");
        }
    }

    // One op over the whole buffer (cut into many slices and requests).
    dst.fill(0, len, 0).unwrap();
    e.transfer_sync(p, &[Op::read(dst.addr(), t.rw, len as u64)])
        .unwrap();
    assert_eq!(first_difference(&dst.to_vec(), &remote), None);

    // The read-only buffer allows READ.
    let ro_len = t.spec.ro_len;
    let ro_copy = e.allocate(ro_len, Location::Any).unwrap();
    e.transfer_sync(p, &[Op::read(ro_copy.addr(), t.ro, ro_len as u64)])
        .unwrap();
    assert_eq!(
        first_difference(&ro_copy.to_vec(), &pattern(RO_SEED, ro_len)),
        None
    );
    t.assert_alive();
}

/// `submit_with_notify`: the child, blocked on its inbox, hashes the written region the
/// moment the notification arrives; every byte must already be there. And a batch that
/// reports `Completed` has had its notification queued at the target.
#[test]
fn notification_arrives_after_the_data() {
    const PAGES: usize = 256;
    let len = PAGES * PAGE;
    let mut t = Target::spawn(Spec {
        rw_len: len,
        ..Spec::default()
    });
    let e = engine();
    let image = pattern(7, len);
    let src = e.allocate(len, Location::Any).unwrap();
    src.write_at(0, &image).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    let ops: Vec<Op> = (0..PAGES)
        .map(|i| {
            Op::write(
                src.addr() + (i * PAGE) as u64,
                t.rw + (slot(i, PAGES) * PAGE) as u64,
                PAGE as u64,
            )
        })
        .collect();
    let mut expected = vec![0u8; len];
    for i in 0..PAGES {
        expected[slot(i, PAGES) * PAGE..][..PAGE].copy_from_slice(&image[i * PAGE..][..PAGE]);
    }

    t.send(&format!("wait-notify rw 0 {len} 20000"));
    assert_eq!(t.answer(), "waiting");
    let id = e
        .submit_with_notify(p, &ops, b"layer 0: 256 pages")
        .unwrap();
    assert_completed(finish(&e, id));
    let line = t.answer();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"notified"), "{line}");
    assert_eq!(unhex(f[1]), b"layer 0: 256 pages");
    assert_eq!(f[2], e.session_id().unwrap());
    assert_eq!(
        u64::from_str_radix(f[3], 16).unwrap(),
        digest(&expected),
        "the notification arrived before every byte of the batch"
    );

    // Completed means queued at the target: drained at once, no waiting.
    src.write_at(0, &pattern(8, len)).unwrap();
    let id = e.submit_with_notify(p, &ops, b"layer 1").unwrap();
    assert_completed(finish(&e, id));
    assert_eq!(t.ask("drain"), format!("drained 1 {}", hex(b"layer 1")));
    t.assert_alive();
}

/// Asks the child until a request of the batch is being served into or out of its `rw`
/// buffer (the serving side pins the region meanwhile), so that what follows lands
/// mid-transfer. Fails if the batch ends first.
fn wait_serving(e: &Engine, id: kvxfer::BatchId, t: &mut Target) {
    let until = Instant::now() + Duration::from_secs(10);
    while t.pins("rw") == 0 {
        let state = e.status(id).unwrap();
        assert!(!state.is_finished(), "the batch ended first: {state:?}");
        assert!(Instant::now() < until, "the batch does not reach the child");
    }
}

/// A large batch (`kind`) in 1 MiB ops, then SIGKILL of the target once bytes flow: the
/// batch fails at once (it does not wait for its deadline), nothing stays pinned, and the
/// dead peer is refused cleanly.
fn kill_mid_batch(kind: kvxfer::OpKind, len: usize) {
    const OP: usize = 1 << 20;
    // Caller memory, registered below, declared before the engine. A WRITE only reads it
    // (its pages stay the shared zero page, so this costs no memory).
    let local = vec![0u8; len];
    let base = local.as_ptr() as u64;
    let mut t = Target::spawn(Spec {
        rw_len: len,
        ..Spec::default()
    });
    let e = engine();
    // SAFETY: `local` is ours, `len` bytes, and outlives the engine (declared before it).
    unsafe { e.register(base, len as u64, None, Access::ALL) }.unwrap();
    let p = e.open_peer(&t.session).unwrap();
    let ops: Vec<Op> = (0..(len / OP) as u64)
        .map(|i| Op {
            kind,
            local_addr: base + i * OP as u64,
            remote_addr: t.rw + i * OP as u64,
            len: OP as u64,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let id = e.submit_with_deadline(p, &ops, deadline).unwrap();
    // The batch uses the caller memory.
    match e.unregister(base) {
        Err(Error::Memory(MemoryError::Busy { .. })) => {}
        other => panic!("unregister during the batch: {other:?}"),
    }
    wait_serving(&e, id, &mut t);
    t.kill();
    let killed = Instant::now();
    let state = e.wait(id, LONG).unwrap();
    let took = killed.elapsed();
    assert!(
        Instant::now() < deadline + Duration::from_secs(1),
        "wait returned {took:?} after the kill, past the deadline"
    );
    match &state {
        BatchState::Failed(Error::Transport { .. }) => {}
        other => panic!("the batch ended {other:?} {took:?} after its peer was killed"),
    }
    assert!(
        took < Duration::from_secs(3),
        "the failure took {took:?} to notice"
    );
    e.free(id).unwrap();
    assert_eq!(e.live_batches(), 0);
    e.unregister(base)
        .expect("nothing may stay pinned after the batch failed");

    // The dead peer: opening the same session returns the same id (documented), but
    // using it fails cleanly, and after closing, opening again fails with `Peer`.
    assert_eq!(e.open_peer(&t.session).unwrap(), p);
    match e.probe_peer(p) {
        Err(Error::Peer { .. }) => {}
        other => panic!("probe of a dead peer: {other:?}"),
    }
    let dst = e.allocate(OP, Location::Any).unwrap();
    match e.submit(p, &[Op::read(dst.addr(), t.rw, OP as u64)]) {
        Err(Error::Peer { .. }) => {}
        other => panic!("submit to a dead peer: {other:?}"),
    }
    e.close_peer(p).unwrap();
    match e.open_peer(&t.session) {
        Err(Error::Peer { session, .. }) => assert_eq!(session, t.session),
        other => panic!("open of a dead peer: {other:?}"),
    }
    assert_eq!(e.live_batches(), 0);
}

#[test]
fn peer_killed_mid_write_fails_the_batch_and_releases_memory() {
    kill_mid_batch(kvxfer::OpKind::Write, 512 << 20);
}

#[test]
fn peer_killed_mid_read_fails_the_batch_and_releases_memory() {
    kill_mid_batch(kvxfer::OpKind::Read, 256 << 20);
}

/// `close_peer` with a batch in flight: as `close_peer` documents, the peer's connections
/// close and its requests still in flight fail, so the batch fails promptly (it cannot
/// have completed: it is 256 MiB and had just started) and leaves nothing pinned.
#[test]
fn close_peer_fails_the_batch_in_flight() {
    const LEN: usize = 256 << 20;
    let local = vec![0u8; LEN];
    let base = local.as_ptr() as u64;
    let mut t = Target::spawn(Spec {
        rw_len: LEN,
        ..Spec::default()
    });
    let e = engine();
    // SAFETY: `local` is ours, `LEN` bytes, and outlives the engine (declared before it).
    unsafe { e.register(base, LEN as u64, None, Access::ALL) }.unwrap();
    let p = e.open_peer(&t.session).unwrap();
    let ops: Vec<Op> = (0..(LEN / PAGE) as u64)
        .map(|i| Op::write(base + i * PAGE as u64, t.rw + i * PAGE as u64, PAGE as u64))
        .collect();
    let id = e.submit(p, &ops).unwrap();
    wait_serving(&e, id, &mut t);
    e.close_peer(p).unwrap();
    let closed = Instant::now();
    let state = e.wait(id, LONG).unwrap();
    let took = closed.elapsed();
    e.free(id).unwrap();
    e.unregister(base).expect("nothing stays pinned");
    t.assert_alive();
    assert!(
        matches!(state, BatchState::Failed(_)),
        "close_peer says its requests in flight fail, but the batch ended {state:?} \
         {took:?} after close_peer returned"
    );
}

/// Picks a port that is free now (bind port 0, read it, drop the listener).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A target restarted on the same session: the next submit to the same `PeerId`
/// reconnects to the new process and uses its addresses; an address only the old process
/// had is refused before anything moves.
#[test]
fn restarted_peer_on_the_same_session_is_reconnected() {
    const LEN: usize = 16 * PAGE;
    let port = free_port();
    let spec = Spec {
        listen: format!("127.0.0.1:{port}"),
        rw_len: LEN,
        ..Spec::default()
    };
    let mut old = Target::spawn(spec.clone());
    let e = engine();
    let src = e.allocate(LEN, Location::Any).unwrap();
    src.write_at(0, &pattern(100, LEN)).unwrap();
    let p = e.open_peer(&old.session).unwrap();
    e.transfer_sync(p, &[Op::write(src.addr(), old.rw, LEN as u64)])
        .unwrap();
    assert_eq!(old.hash("rw", 0, LEN), digest(&pattern(100, LEN)));
    let old_regions = e.peer_regions(p).unwrap();
    assert!(old_regions.iter().any(|r| r.addr == old.rw));
    old.kill();

    let mut new = Target::spawn(spec);
    assert_eq!(new.session, old.session);
    assert!(new.epoch > old.epoch, "{} !> {}", new.epoch, old.epoch);
    src.write_at(0, &pattern(200, LEN)).unwrap();
    e.transfer_sync(p, &[Op::write(src.addr(), new.rw, LEN as u64)])
        .expect("the same PeerId reaches the restarted process");
    assert_eq!(new.hash("rw", 0, LEN), digest(&pattern(200, LEN)));
    let regions = e.peer_regions(p).unwrap();
    assert!(regions
        .iter()
        .any(|r| r.addr == new.rw && r.len == LEN as u64));
    assert!(e.probe_peer(p).is_ok());

    // An address of the old process that the new one has not registered (with ASLR the
    // old buffer's first page; otherwise some page of it that is free now).
    let covered = |a: u64| regions.iter().any(|r| a >= r.addr && a - r.addr < r.len);
    let stale = (0..LEN / 4096)
        .map(|i| old.rw + (i * 4096) as u64)
        .find(|&a| !covered(a) && !covered(a + 4095))
        .expect("some page of the old buffer is not registered in the new process");
    match e.transfer_sync(p, &[Op::write(src.addr(), stale, 4096)]) {
        Err(Error::NotRegistered {
            side: Side::Remote,
            at,
            ..
        }) => assert_eq!(at, stale),
        other => panic!("WRITE to an address of the old process: {other:?}"),
    }
    assert_eq!(new.hash("rw", 0, LEN), digest(&pattern(200, LEN)));
    new.assert_ro_intact();
    new.assert_alive();
}

/// Refusals: by the initiator (unregistered remote or local memory, a read-only region),
/// and by the serving side when the initiator's checks are bypassed with hand-built
/// frames on a raw data connection. Nothing of a refused request is written.
#[test]
fn refused_requests_move_nothing() {
    let mut t = Target::spawn(Spec::default());
    let rw_len = t.spec.rw_len;
    let e = engine();
    let src = e.allocate(1 << 20, Location::Any).unwrap();
    src.fill(0, 1 << 20, 0x5a).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    let refused_before = e.stats();

    // Remote memory the target never registered; a range running past its buffer's end.
    match e.submit(p, &[Op::write(src.addr(), 0x1000, 4096)]) {
        Err(Error::NotRegistered {
            side: Side::Remote, ..
        }) => {}
        other => panic!("WRITE to unregistered remote memory: {other:?}"),
    }
    match e.submit(
        p,
        &[Op::write(src.addr(), t.rw + rw_len as u64 - 4096, 8192)],
    ) {
        Err(Error::NotRegistered {
            side: Side::Remote,
            at,
            ..
        }) => assert_eq!(at, t.rw + rw_len as u64),
        other => panic!("WRITE past the end of the remote buffer: {other:?}"),
    }
    // Local memory this engine never registered.
    match e.submit(p, &[Op::write(0x1000, t.rw, 4096)]) {
        Err(Error::NotRegistered {
            side: Side::Local, ..
        }) => {}
        other => panic!("WRITE from unregistered local memory: {other:?}"),
    }
    // The read-only region.
    match e.submit(p, &[Op::write(src.addr(), t.ro, 4096)]) {
        Err(Error::AccessDenied {
            side: Side::Remote,
            need,
            ..
        }) => assert_eq!(need, Access::REMOTE_WRITE),
        other => panic!("WRITE into the read-only region: {other:?}"),
    }
    // One good op does not carry a bad one through.
    match e.submit(
        p,
        &[
            Op::write(src.addr(), t.rw, 4096),
            Op::write(src.addr(), t.ro, 4096),
        ],
    ) {
        Err(Error::AccessDenied { op: 1, .. }) => {}
        other => panic!("batch with one bad op: {other:?}"),
    }
    assert_eq!(e.live_batches(), 0);
    assert_eq!(
        e.stats().submits_refused,
        refused_before.submits_refused + 5
    );
    t.assert_ro_intact();
    assert_eq!(t.hash("rw", 0, rw_len), digest(&vec![0; rw_len]));

    // Bypassing the initiator: hand-built frames on a raw data connection.
    let mut s = connect_raw(t.data_port);
    let payload = vec![0xa5u8; 4096];
    // Control: a good WRITE is acknowledged and lands (the frames here are well formed).
    s.write_all(&request(Kind::Write, 1, &[(t.rw + 8192, 4096)], &payload))
        .unwrap();
    let (h, _) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::Ack, 1));
    assert_eq!(t.bytes("rw", 8192, 4096), payload);
    // Read-only region.
    s.write_all(&request(Kind::Write, 2, &[(t.ro, 4096)], &payload))
        .unwrap();
    let (h, message) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::Error, 2), "{message}");
    assert_eq!(Code::from_status(h.status), Code::AccessDenied, "{message}");
    // Unregistered address.
    s.write_all(&request(Kind::Write, 3, &[(0x1000, 4096)], &payload))
        .unwrap();
    let (h, message) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::Error, 3), "{message}");
    assert_eq!(
        Code::from_status(h.status),
        Code::NotRegistered,
        "{message}"
    );
    // Straddling the end of the writable buffer.
    s.write_all(&request(
        Kind::Write,
        4,
        &[(t.rw + rw_len as u64 - 2048, 4096)],
        &payload,
    ))
    .unwrap();
    let (h, message) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::Error, 4), "{message}");
    assert_eq!(
        Code::from_status(h.status),
        Code::NotRegistered,
        "{message}"
    );
    // A good entry followed by a bad one: the whole request is refused, nothing written.
    let two = [0x3cu8; 8192];
    s.write_all(&request(
        Kind::Write,
        5,
        &[(t.rw, 4096), (t.ro + 4096, 4096)],
        &two,
    ))
    .unwrap();
    let (h, message) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::Error, 5), "{message}");
    assert_eq!(Code::from_status(h.status), Code::AccessDenied, "{message}");
    // READ of unregistered memory.
    s.write_all(&request(Kind::Read, 6, &[(0x1000, 4096)], &[]))
        .unwrap();
    let (h, message) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::Error, 6), "{message}");
    assert_eq!(
        Code::from_status(h.status),
        Code::NotRegistered,
        "{message}"
    );
    // The connection is still good after refusals: READ the read-only region.
    s.write_all(&request(Kind::Read, 7, &[(t.ro, 4096)], &[]))
        .unwrap();
    let (h, _) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::ReadData, 7));
    let mut back = vec![0u8; 4096];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, pattern(RO_SEED, 4096));
    drop(s);

    t.assert_ro_intact();
    let mut expected = vec![0u8; rw_len];
    expected[8192..12288].copy_from_slice(&payload);
    assert_eq!(
        t.hash("rw", 0, rw_len),
        digest(&expected),
        "a refused request wrote into the writable buffer"
    );
    // The serving side unpins once its reply's send has completed, which the child's I/O
    // thread may see just after we have read the reply.
    wait_unpinned(&mut t, "rw");
    wait_unpinned(&mut t, "ro");
    t.assert_alive();
}

/// Asks the child for a region's pins until they drop to 0 (a dropped connection is
/// noticed by the child's I/O thread asynchronously), failing after a few seconds.
fn wait_unpinned(t: &mut Target, which: &str) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let pins = t.pins(which);
        if pins == 0 {
            return;
        }
        assert!(
            Instant::now() < until,
            "{which} still has {pins} pins after a dropped connection"
        );
        std::thread::yield_now();
    }
}

/// Garbage on the control and data listeners of the child: random bytes, a bad magic,
/// truncated frames, a header announcing more than is sent. Each connection is closed by
/// the child (or by us); after each the child is alive and the parent can open, probe
/// and transfer.
#[test]
fn garbage_on_both_listeners_is_survived() {
    let mut t = Target::spawn(Spec::default());
    let e = engine();
    let src = e.allocate(PAGE, Location::Any).unwrap();
    let ctl_port: u16 = t.session.rsplit_once(':').unwrap().1.parse().unwrap();
    let ctl_frame = |kind: u16, len: u32, body: &[u8]| {
        let mut out = FrameHeader::new(kind, len, 1).encode().to_vec();
        out.extend_from_slice(body);
        out
    };
    let mut bad_magic = ctl_frame(control::kind::PROBE, 8, &[0; 8]);
    bad_magic[..4].copy_from_slice(b"XXXX");
    let mut bad_version = ctl_frame(control::kind::HANDSHAKE, 0, &[]);
    bad_version[4] = 9;

    use control::error_code::{MALFORMED, UNEXPECTED, UNSUPPORTED_VERSION};
    const DATA_MALFORMED: u16 = Code::Malformed as u16;
    // (name, bytes, the error code the child must answer with before it closes; `None`:
    // it just closes). `Some(0)`: we close without reading.
    let control_cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        ("random bytes", garbage(1, 4096), Some(MALFORMED)),
        ("random bytes, short", garbage(2, 7), None),
        ("bad magic", bad_magic, Some(MALFORMED)),
        ("bad version", bad_version, Some(UNSUPPORTED_VERSION)),
        (
            "truncated header",
            ctl_frame(control::kind::HANDSHAKE, 100, &[])[..10].to_vec(),
            None,
        ),
        (
            "huge body announced, then close",
            ctl_frame(control::kind::HANDSHAKE, control::MAX_BODY, &[0x41; 1000]),
            None,
        ),
        (
            "body over the limit announced",
            ctl_frame(control::kind::HANDSHAKE, control::MAX_BODY + 1, &[]),
            Some(MALFORMED),
        ),
        (
            "handshake with a garbage body",
            ctl_frame(control::kind::HANDSHAKE, 64, &garbage(3, 64)),
            Some(MALFORMED),
        ),
        (
            "probe before handshake",
            ctl_frame(control::kind::PROBE, 8, &[0; 8]),
            Some(UNEXPECTED),
        ),
    ];
    let data_cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        ("random bytes", garbage(4, 4096), Some(DATA_MALFORMED)),
        ("random bytes, short", garbage(5, 11), None),
        (
            "bad magic",
            {
                let mut f = request(Kind::Write, 1, &[(t.rw, 16)], &[0; 16]);
                f[..4].copy_from_slice(b"XXXX");
                f
            },
            Some(DATA_MALFORMED),
        ),
        (
            "truncated header",
            request(Kind::Write, 1, &[(t.rw, 16)], &[])[..10].to_vec(),
            None,
        ),
        (
            "1024 entries announced, 100 sent",
            {
                let entries: Vec<(u64, u32)> = (0..1024).map(|i| (t.rw + i * 16, 16)).collect();
                request(Kind::Read, 1, &entries, &[])[..wire::HEADER_LEN + 100 * wire::ENTRY_LEN]
                    .to_vec()
            },
            None,
        ),
        (
            "1025 entries announced",
            {
                let mut f = request(Kind::Read, 1, &[(t.rw, 16)], &[]);
                f[8..12].copy_from_slice(&(wire::MAX_ENTRIES + 1).to_le_bytes());
                f
            },
            Some(DATA_MALFORMED),
        ),
        (
            "a response kind as a request",
            Header {
                kind: Kind::Ack,
                count: 0,
                status: 0,
                id: 9,
            }
            .encode()
            .to_vec(),
            Some(DATA_MALFORMED),
        ),
        (
            "entry with a reserved field set",
            {
                let mut f = request(Kind::Read, 1, &[(t.rw, 16)], &[]);
                f[wire::HEADER_LEN + 12] = 1;
                f
            },
            Some(DATA_MALFORMED),
        ),
        (
            "entries moving more than 1 GiB",
            request(Kind::Read, 1, &[(t.rw, u32::MAX), (t.rw, u32::MAX)], &[]),
            Some(DATA_MALFORMED),
        ),
        (
            "WRITE cut off mid-payload",
            // Received straight into the target region: the pin must go with the
            // connection.
            [
                request(Kind::Write, 1, &[(t.rw, 1 << 20)], &[]),
                vec![0x77; 1000],
            ]
            .concat(),
            Some(0),
        ),
        (
            "READ of the whole buffer, never read back",
            request(Kind::Read, 1, &[(t.rw, 1 << 20)], &[]),
            Some(0),
        ),
    ];
    let rounds = control_cases
        .iter()
        .map(|c| (true, c))
        .chain(data_cases.iter().map(|c| (false, c)));
    let mut p = e.open_peer(&t.session).unwrap();
    for (round, (to_control, (name, bytes, answer))) in rounds.enumerate() {
        let port = if to_control { ctl_port } else { t.data_port };
        let what = format!(
            "{} port, {name}",
            if to_control { "control" } else { "data" }
        );
        let mut s = connect_raw(port);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The child may close (and reset) the connection before everything is written.
        let _ = s.write_all(bytes);
        if *answer == Some(0) {
            drop(s);
        } else {
            let _ = s.shutdown(Shutdown::Write);
            let (closed, got) = closed_by_peer(&mut s);
            assert!(closed, "{what}: the child did not close the connection");
            match answer {
                None => assert!(got.is_empty(), "{what}: unexpected answer {got:?}"),
                Some(code) if to_control => {
                    assert!(got.len() >= control::HEADER_LEN, "{what}: no answer");
                    let h = FrameHeader::decode(got[..control::HEADER_LEN].try_into().unwrap())
                        .unwrap_or_else(|e| panic!("{what}: answer does not decode: {e}"));
                    assert_eq!(h.kind, control::kind::ERROR, "{what}");
                    match control::Message::decode(h.kind, &got[control::HEADER_LEN..]) {
                        Ok(control::Message::Error { code: c, message }) => {
                            assert_eq!(c, *code, "{what}: {message}")
                        }
                        other => panic!("{what}: answered {other:?}"),
                    }
                }
                Some(code) => {
                    assert!(got.len() >= wire::HEADER_LEN, "{what}: no answer");
                    let (h, _) = wire::decode_frame(&got).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(
                        (h.kind, h.status),
                        (Kind::Error, u32::from(*code)),
                        "{what}"
                    );
                    assert_eq!(got.len(), wire::HEADER_LEN + h.count as usize, "{what}");
                }
            }
        }
        wait_unpinned(&mut t, "rw");
        t.assert_alive();

        // A well-behaved engine still gets everything done, from a fresh handshake.
        e.close_peer(p).unwrap();
        p = e.open_peer(&t.session).unwrap();
        e.probe_peer(p)
            .unwrap_or_else(|err| panic!("{what}: probe: {err}"));
        let bytes = pattern(round as u64, PAGE);
        src.write_at(0, &bytes).unwrap();
        let at = (round % 8) * PAGE;
        e.transfer_sync(p, &[Op::write(src.addr(), t.rw + at as u64, PAGE as u64)])
            .unwrap_or_else(|err| panic!("{what}: transfer: {err}"));
        assert_eq!(t.hash("rw", at, PAGE), digest(&bytes), "{what}");
    }
    t.assert_ro_intact();
    t.assert_alive();
}

/// A region that a served request is writing into is pinned: the target cannot unregister
/// it until the request's connection is gone. Once unregistered, neither a raw request nor
/// the initiator can reach it any more.
#[test]
fn served_request_pins_its_region_until_the_connection_drops() {
    let mut t = Target::spawn(Spec::default());
    let e = engine();
    let src = e.allocate(PAGE, Location::Any).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    assert!(e.peer_regions(p).unwrap().iter().any(|r| r.addr == t.extra));

    let mut s = connect_raw(t.data_port);
    s.write_all(&request(Kind::Write, 1, &[(t.extra, 1 << 20)], &[]))
        .unwrap();
    s.write_all(&[0x11; 1000]).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while t.pins("extra") == 0 {
        assert!(Instant::now() < until, "the WRITE never pinned its region");
    }
    let a = t.ask("unregister-extra");
    assert!(
        a.starts_with("unregister err") && a.contains("unfinished"),
        "unregister while a request writes the region: {a}"
    );
    drop(s);
    wait_unpinned(&mut t, "extra");
    assert_eq!(t.ask("unregister-extra"), "unregister ok");

    let mut s = connect_raw(t.data_port);
    s.write_all(&request(Kind::Write, 2, &[(t.extra, 4096)], &[0x22; 4096]))
        .unwrap();
    let (h, message) = response(&mut s);
    assert_eq!((h.kind, h.id), (Kind::Error, 2), "{message}");
    assert_eq!(
        Code::from_status(h.status),
        Code::NotRegistered,
        "{message}"
    );
    // The target pushes its new descriptor from its publisher thread (never from the
    // thread that unregistered); it reaches the initiator shortly after.
    let until = Instant::now() + Duration::from_secs(5);
    while e.peer_regions(p).unwrap().iter().any(|r| r.addr == t.extra) {
        assert!(
            Instant::now() < until,
            "the unregistered region was never unpublished"
        );
        std::thread::yield_now();
    }
    match e.submit(p, &[Op::write(src.addr(), t.extra, PAGE as u64)]) {
        Err(Error::NotRegistered {
            side: Side::Remote, ..
        }) => {}
        other => panic!("WRITE to a region the peer unregistered: {other:?}"),
    }
    assert_eq!(t.bytes("extra", 1000, 16), vec![0; 16]);
    t.assert_alive();
}

/// A closed peer's id stays invalid, even after the session is opened again.
#[test]
fn closed_peer_id_is_unknown() {
    let mut t = Target::spawn(Spec::default());
    let e = engine();
    let src = e.allocate(PAGE, Location::Any).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    assert!(e.probe_peer(p).unwrap() < Duration::from_secs(1));
    assert_eq!(e.peer_name(p).unwrap(), t.session);
    e.transfer_sync(p, &[Op::write(src.addr(), t.rw, PAGE as u64)])
        .unwrap();
    e.close_peer(p).unwrap();
    let write = [Op::write(src.addr(), t.rw, PAGE as u64)];
    match e.submit(p, &write) {
        Err(Error::UnknownPeer(raw)) => assert_eq!(raw, p.raw()),
        other => panic!("submit to a closed peer: {other:?}"),
    }
    assert!(matches!(e.probe_peer(p), Err(Error::UnknownPeer(_))));
    assert!(matches!(e.peer_regions(p), Err(Error::UnknownPeer(_))));
    assert!(matches!(e.close_peer(p), Err(Error::UnknownPeer(_))));
    assert_eq!(e.live_batches(), 0);

    let q = e.open_peer(&t.session).unwrap();
    assert_ne!(q, p);
    assert!(matches!(e.submit(p, &write), Err(Error::UnknownPeer(_))));
    e.probe_peer(q).unwrap();
    e.transfer_sync(q, &write).unwrap();
    t.assert_alive();
}
