//! Two real processes on one host, over the same-host transport (`shm`). This test binary
//! re-executes itself as a "target" child (an engine driven by commands on stdin, answering
//! on stdout) and the test itself is the initiator, with the default configuration
//! (transports `[Shm, Rdma, Tcp]`), so the two processes prove at `open_peer` that they share
//! memory and then move bytes with CPU copies done by the initiator.
//!
//! Covered:
//! - memory the child got from `Engine::allocate*` (a memfd, which the initiator maps when
//!   peers may write it): WRITE of shuffled pages and READ back, byte exact in the other
//!   process; a WRITE into a region without `REMOTE_WRITE` is refused before anything
//!   moves;
//! - caller memory the child registered with `Engine::register` (reached by cross-memory
//!   attach): WRITE and READ, byte exact;
//! - the child giving memory back in the middle of a large batch into it (`unregister` of
//!   caller memory, retried while it answers `PeerBusy`; dropping an allocated buffer): the
//!   batch fails naming the unregister instead of completing or hanging, no byte lands in
//!   caller memory after `unregister` returned, and the child lives and still serves;
//! - forged requests on the child's raw shm socket (out of turn, wrong engine, wrong nonces,
//!   garbage), then a proof done by hand and attaches of unregistered, local-only,
//!   read-only, read-write and caller regions, checked against what the server may hand
//!   out; the child serves normal transfers afterwards;
//! - a pin held in the shared pin table (as a copy in flight holds one) keeps the child's
//!   `unregister` answering `PeerBusy` until it is released; and (ignored, it fails: a
//!   library bug) a busy `unregister` must not fail a peer's batch.
//!
//! Child protocol: the child prints `KVXSHM ready <session> <pid>` once its engine serves,
//! then answers one `KVXSHM ...` line per command line read on stdin (see
//! `serve_commands`). Only lines with the `KVXSHM ` marker are parsed: libtest prints its
//! own lines on the same stdout. Reading the ready line (and each answer) is the only
//! synchronisation; waiting for something the child sees is a loop that asks it, with a
//! deadline. A `Target` guard kills (SIGKILL) and reaps its child on drop, so no test leaks
//! one, and every test declares its `Target` before its engine, so the engine goes first.
//!
//! Bytes are checked with position-dependent patterns (every 8-byte word depends on a seed
//! and its index) and digests computed in the child, so a misplaced, missing, stale or torn
//! page fails the test; on a digest mismatch the page and byte that differ are named.

mod common;
use common::{digest, pattern};

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvxfer::control::{ControlClient, SegmentDescriptor};
use kvxfer::sys::cma::{self, Piece};
use kvxfer::sys::shm::PeerMapping;
use kvxfer::sys::unix::SeqPacket;
use kvxfer::transport::shm::table::{PinTable, SLOT_BYTES};
use kvxfer::transport::shm::wire::{self, code, MapKind, Message, NONCE_LEN};
use kvxfer::{
    Access, BatchId, BatchState, Buffer, Engine, EngineConfig, Error, Location, MemoryError, Op,
    PeerId, Side, TransportKind,
};

/// Set (to the role) in the environment of a child.
const CHILD_ENV: &str = "KVX_SAME_HOST_CHILD";
/// Marks the child's protocol lines on its stdout.
const MARK: &str = "KVXSHM ";
/// One KV page of the transfers here.
const PAGE: usize = 64 << 10;
/// How long any answer of a child may take before the test fails (a hung child must not
/// hang the test run).
const ANSWER: Duration = Duration::from_secs(30);
/// A wait that is effectively unbounded but still ends a hung test.
const LONG: Duration = Duration::from_secs(120);
/// Read-only regions are filled with this seed's pattern.
const RO_SEED: u64 = 0x0dd5_eed0_5a3e_0001;
/// The child fills caller memory with this byte right after `unregister` succeeds: a copy
/// that lands afterwards shows.
const SENTINEL: u8 = 0x5a;
/// Rights of a region peers may only read.
const READ_ONLY: Access = Access::LOCAL_READ
    .union(Access::LOCAL_WRITE)
    .union(Access::REMOTE_READ);
/// Rights of a region peers may not touch at all.
const LOCAL_ONLY: Access = Access::LOCAL_READ.union(Access::LOCAL_WRITE);

// ---------------------------------------------------------------------------------------
// Hex dumps (patterns and digests: tests/common)
// ---------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Index of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// A permutation of `0..n` (`n` a power of two, or any `n` not a multiple of 37), so
/// that page `i` goes to a slot far from `i`.
fn slot(i: usize, n: usize) -> usize {
    (i * 37 + 11) % n
}

// ---------------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------------

/// Entry point of the child processes: does nothing unless `KVX_SAME_HOST_CHILD` is set.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    assert_eq!(role, "target", "unknown child role");
    run_target();
}

fn say(line: &str) {
    let mut out = io::stdout().lock();
    // A leading newline: libtest may have printed "test child_process_entry ... " without
    // one.
    writeln!(out, "\n{MARK}{line}").expect("stdout");
    out.flush().expect("stdout");
}

/// A region of the child, by how it was made.
enum Memory {
    /// From `Engine::allocate_with_access` (a memfd); dropping it unregisters it.
    Allocated(Buffer),
    /// Anonymous memory the child mapped itself and registered with `Engine::register`;
    /// unmapped only by the `unmap` command, once unregistered.
    Caller {
        ptr: *mut u8,
        len: usize,
        registered: bool,
    },
}

impl Memory {
    fn addr(&self) -> u64 {
        match self {
            Memory::Allocated(b) => b.addr(),
            Memory::Caller { ptr, .. } => *ptr as u64,
        }
    }

    fn len(&self) -> usize {
        match self {
            Memory::Allocated(b) => b.len(),
            Memory::Caller { len, .. } => *len,
        }
    }

    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len(), "read outside the region");
        let mut out = vec![0u8; len];
        match self {
            Memory::Allocated(b) => b.read_at(offset, &mut out).expect("inside"),
            // SAFETY: the range lies inside memory the child mapped read/write and has not
            // unmapped (the entry is removed when it is). The copy is of plain bytes into
            // our own buffer, no reference into the region is made: a peer writing it
            // meanwhile (`start_big_write` polls while its batch runs) only changes what
            // is read.
            Memory::Caller { ptr, .. } => unsafe {
                std::ptr::copy_nonoverlapping(ptr.add(offset), out.as_mut_ptr(), len)
            },
        }
        out
    }

    fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.len(),
            "write outside the region"
        );
        match self {
            Memory::Allocated(b) => b.write_at(offset, data).expect("inside"),
            // SAFETY: as in `read`; the parent asks only while none of its batches reads or
            // writes the region.
            Memory::Caller { ptr, .. } => unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.add(offset), data.len())
            },
        }
    }
}

fn run_target() {
    // Declared before the engine, so the engine (which quiesces on drop) goes first.
    let mut regions: HashMap<String, Memory> = HashMap::new();
    let engine = Engine::new(EngineConfig::default()).expect("child engine starts");
    assert_eq!(
        engine.config().transports,
        [TransportKind::Shm, TransportKind::Rdma, TransportKind::Tcp],
        "child: the default transports are [Shm, Rdma, Tcp]"
    );
    let session = engine.session_id().expect("listens").to_string();
    say(&format!("ready {session} {}", std::process::id()));
    serve_commands(&engine, &mut regions);
}

/// Commands (one per line) and their answers:
///
/// - `ping` → `pong`
/// - `alloc <name> <len> <access bits>` → `region <addr>` (`Engine::allocate_with_access`)
/// - `caller <name> <len> <access bits>` → `region <addr>` (mmap + `Engine::register`)
/// - `fill <name> <seed>` → `filled` (the whole region gets `pattern(seed, len)`)
/// - `hash <name> <offset> <len>` → `hash <digest as 16 hex digits>`
/// - `bytes <name> <offset> <len>` → `bytes <hex>`
/// - `unregister <name> <limit ms>` → `unregistered <PeerBusy retries>` (and the memory,
///   still mapped, is filled with `SENTINEL` at once), or `unregister-failed <retries>
///   <error>` (any other error, or still `PeerBusy` after the limit)
/// - `unmap <name>` → `unmapped` (caller memory, once unregistered)
/// - `drop <name>` → `dropped` (an allocated buffer: unregisters and unmaps it)
/// - `exit` (or end of input) ends the child.
fn serve_commands(engine: &Engine, regions: &mut HashMap<String, Memory>) {
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 { words[i].parse().expect("number") };
        let access = |i: usize| Access::from_bits(num(i) as u32).expect("access bits");
        let region = |name: &str| {
            regions
                .get(name)
                .unwrap_or_else(|| panic!("child: no region {name:?}"))
        };
        match words.as_slice() {
            [] => {}
            ["ping"] => say("pong"),
            ["alloc", name, _, _] => {
                let buf = engine
                    .allocate_with_access(num(2) as usize, Location::Any, access(3))
                    .expect("child allocate");
                say(&format!("region {}", buf.addr()));
                regions.insert(name.to_string(), Memory::Allocated(buf));
            }
            ["caller", name, _, _] => {
                let len = num(2) as usize;
                // SAFETY: a fresh anonymous private mapping at an address the kernel picks;
                // no existing memory is affected.
                let ptr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(
                    ptr,
                    libc::MAP_FAILED,
                    "child mmap: {}",
                    io::Error::last_os_error()
                );
                // SAFETY: `[ptr, ptr + len)` was just mapped read/write and stays mapped
                // until the `unmap` command, which refuses while it is registered.
                unsafe { engine.register(ptr as u64, len as u64, None, access(3)) }
                    .expect("child register");
                say(&format!("region {}", ptr as u64));
                regions.insert(
                    name.to_string(),
                    Memory::Caller {
                        ptr: ptr.cast(),
                        len,
                        registered: true,
                    },
                );
            }
            ["fill", name, _] => {
                let m = region(name);
                m.write(0, &pattern(num(2), m.len()));
                say("filled");
            }
            ["hash", name, _, _] => {
                let bytes = region(name).read(num(2) as usize, num(3) as usize);
                say(&format!("hash {:016x}", digest(&bytes)));
            }
            ["bytes", name, _, _] => {
                let bytes = region(name).read(num(2) as usize, num(3) as usize);
                say(&format!("bytes {}", hex(&bytes)));
            }
            ["unregister", name, _] => {
                let limit = Duration::from_millis(num(2));
                let addr = region(name).addr();
                let started = Instant::now();
                let mut retries = 0u64;
                let result = loop {
                    match engine.unregister(addr) {
                        Err(Error::Memory(MemoryError::PeerBusy { .. }))
                            if started.elapsed() < limit =>
                        {
                            retries += 1;
                            std::thread::yield_now();
                        }
                        other => break other,
                    }
                };
                match result {
                    Ok(()) => {
                        let m = regions.get_mut(*name).expect("looked up above");
                        if let Memory::Caller { registered, .. } = m {
                            *registered = false;
                        }
                        // Any byte a peer copies from now on would overwrite this.
                        m.write(0, &vec![SENTINEL; m.len()]);
                        say(&format!("unregistered {retries}"));
                    }
                    Err(e) => say(&format!("unregister-failed {retries} {e}")),
                }
            }
            ["unmap", name] => {
                let Some(Memory::Caller {
                    ptr,
                    len,
                    registered: false,
                }) = regions.remove(*name)
                else {
                    panic!("child: {name:?} is not unregistered caller memory");
                };
                // SAFETY: `ptr` and `len` are exactly a mapping made by `caller` above,
                // unregistered (no transfer may touch it any more) and forgotten here.
                let rc = unsafe { libc::munmap(ptr.cast(), len) };
                assert_eq!(rc, 0, "child munmap: {}", io::Error::last_os_error());
                say("unmapped");
            }
            ["drop", name] => match regions.remove(*name) {
                Some(Memory::Allocated(buf)) => {
                    drop(buf);
                    say("dropped");
                }
                _ => panic!("child: {name:?} is not an allocated buffer"),
            },
            ["exit"] => break,
            _ => panic!("child: unknown command {line:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------

/// A running target child; killed (SIGKILL) and reaped on drop.
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    session: String,
    pid: u32,
}

impl Target {
    fn spawn() -> Target {
        let exe = std::env::current_exe().expect("test binary");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "target")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        // The child's configuration must be the default: no KVX_* overrides.
        for (name, _) in std::env::vars() {
            if name.starts_with("KVX_") && name != CHILD_ENV {
                cmd.env_remove(name);
            }
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
            session: String::new(),
            pid: 0,
        };
        let ready = t.answer();
        let f: Vec<&str> = ready.split_whitespace().collect();
        assert!(
            f.len() == 3 && f[0] == "ready",
            "unexpected first line {ready:?}"
        );
        t.session = f[1].to_string();
        t.pid = f[2].parse().expect("pid");
        assert_eq!(t.pid, t.child.id(), "the ready line names another process");
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

    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("child stdin open");
        writeln!(stdin, "{command}").expect("write to child");
        stdin.flush().expect("flush to child");
        self.answer()
    }

    fn region_answer(&mut self, command: &str) -> u64 {
        let a = self.ask(command);
        a.strip_prefix("region ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{command}: {a:?}"))
    }

    /// Memory from `Engine::allocate_with_access` in the child.
    fn alloc(&mut self, name: &str, len: usize, access: Access) -> u64 {
        self.region_answer(&format!("alloc {name} {len} {}", access.bits()))
    }

    /// Caller memory (mmap) the child registers with `Engine::register`.
    fn caller(&mut self, name: &str, len: usize, access: Access) -> u64 {
        self.region_answer(&format!("caller {name} {len} {}", access.bits()))
    }

    fn fill(&mut self, name: &str, seed: u64) {
        assert_eq!(self.ask(&format!("fill {name} {seed}")), "filled");
    }

    fn hash(&mut self, name: &str, offset: usize, len: usize) -> u64 {
        let a = self.ask(&format!("hash {name} {offset} {len}"));
        let h = a.strip_prefix("hash ").unwrap_or_else(|| panic!("{a:?}"));
        u64::from_str_radix(h, 16).expect("hex digest")
    }

    fn bytes(&mut self, name: &str, offset: usize, len: usize) -> Vec<u8> {
        let a = self.ask(&format!("bytes {name} {offset} {len}"));
        unhex(a.strip_prefix("bytes ").unwrap_or_else(|| panic!("{a:?}")))
    }

    /// `name` at `offset` holds exactly `expected` in the child; names the first page and
    /// byte that differ when it does not.
    fn assert_holds(&mut self, name: &str, offset: usize, expected: &[u8], what: &str) {
        if self.hash(name, offset, expected.len()) == digest(expected) {
            return;
        }
        for (page, want) in expected.chunks(PAGE).enumerate() {
            let got = self.bytes(name, offset + page * PAGE, want.len());
            if let Some(at) = first_difference(&got, want) {
                panic!("{what}: the child's {name:?} page {page} differs first at byte {at}");
            }
        }
        panic!("{what}: digests differ but no page does");
    }

    /// The child answers and has not exited.
    fn assert_alive(&mut self) {
        assert_eq!(self.ask("ping"), "pong");
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "child exited"
        );
    }

    /// The child's engine id and shm socket name, from its engine descriptor.
    fn shm_socket(&self) -> (u64, String) {
        let d = self.descriptor();
        let socket = d
            .transports
            .iter()
            .find(|o| o.kind == "shm")
            .unwrap_or_else(|| panic!("the child offers no shm: {:?}", d.transports))
            .param("socket")
            .expect("the shm offer names its socket")
            .to_string();
        (d.engine_id, socket)
    }

    /// The engine descriptor of the child, as a peer gets it in the control handshake.
    fn descriptor(&self) -> std::sync::Arc<SegmentDescriptor> {
        let me = SegmentDescriptor {
            engine_id: 1,
            session: "127.0.0.1:9".into(),
            host: "kvxfer-same-host-test".into(),
            epoch: 1,
            version: 1,
            regions: vec![],
            transports: vec![],
            rdma_nics: vec![],
            rkeys: vec![],
        };
        let ctl = ControlClient::connect(&self.session, &me, Duration::from_secs(5))
            .expect("control handshake with the child");
        let d = ctl.descriptor();
        ctl.close();
        d
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The initiator: the default configuration, which prefers same-host shared memory.
fn initiator() -> Engine {
    let e = Engine::new(EngineConfig::default()).expect("engine starts");
    assert_eq!(
        e.config().transports,
        [TransportKind::Shm, TransportKind::Rdma, TransportKind::Tcp],
        "KVX_TRANSPORTS in the environment changes what these tests check; unset it"
    );
    assert!(
        e.session_id().is_some(),
        "KVX_LISTEN=none in the environment: these tests need a listening engine; unset it"
    );
    e
}

/// Opens the child and checks that the link is same-host memory for all of it (caller
/// memory included: cross-memory attach works, the child being our own descendant).
fn open_same_host(e: &Engine, t: &Target) -> PeerId {
    let p = e.open_peer(&t.session).expect("open the child");
    let note = e.peer_shm_note(p).expect("shm note");
    assert_eq!(
        e.peer_transport(p).unwrap(),
        TransportKind::Shm,
        "two processes of one host do not use shared memory: {note:?}"
    );
    assert_eq!(
        note, None,
        "same-host memory is not used for all of the child's memory"
    );
    p
}

/// Waits for a batch, frees it and returns how it ended.
fn finish(e: &Engine, id: BatchId) -> BatchState {
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

/// WRITEs `pages` pages, each a distinct pattern of `seed`, into shuffled slots of the
/// first `pages` pages of the child's region `name` (at `addr`) over shm, and checks in
/// the child that those pages hold exactly the expected image.
fn write_shuffled(
    e: &Engine,
    p: PeerId,
    t: &mut Target,
    name: &str,
    addr: u64,
    pages: usize,
    seed: u64,
) {
    let image = pattern(seed, pages * PAGE);
    let src = e.allocate(pages * PAGE, Location::Any).unwrap();
    src.write_at(0, &image).unwrap();
    let ops: Vec<Op> = (0..pages)
        .map(|i| {
            Op::write(
                src.addr() + (i * PAGE) as u64,
                addr + (slot(i, pages) * PAGE) as u64,
                PAGE as u64,
            )
        })
        .collect();
    let id = e.submit(p, &ops).unwrap();
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Shm);
    assert_completed(finish(e, id));
    let mut expected = vec![0u8; pages * PAGE];
    for i in 0..pages {
        expected[slot(i, pages) * PAGE..][..PAGE].copy_from_slice(&image[i * PAGE..][..PAGE]);
    }
    t.assert_holds(name, 0, &expected, "WRITE of shuffled pages");
}

/// READs the child's memory at `addr` (which holds `expected`) over shm: page by page
/// into shuffled slots, then in one op over all of it; checks every byte.
fn read_and_verify(e: &Engine, p: PeerId, addr: u64, expected: &[u8]) {
    let len = expected.len();
    let pages = len / PAGE;
    let dst = e.allocate(len, Location::Any).unwrap();
    dst.fill(0, len, 0xee).unwrap();
    let ops: Vec<Op> = (0..pages)
        .map(|i| {
            Op::read(
                dst.addr() + (slot(i, pages) * PAGE) as u64,
                addr + (i * PAGE) as u64,
                PAGE as u64,
            )
        })
        .collect();
    let id = e.submit(p, &ops).unwrap();
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Shm);
    assert_completed(finish(e, id));
    let got = dst.to_vec();
    for i in 0..pages {
        let page = &got[slot(i, pages) * PAGE..][..PAGE];
        if let Some(at) = first_difference(page, &expected[i * PAGE..][..PAGE]) {
            panic!("remote page {i} read wrong, first at byte {at}");
        }
    }

    dst.fill(0, len, 0).unwrap();
    let id = e
        .submit(p, &[Op::read(dst.addr(), addr, len as u64)])
        .unwrap();
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Shm);
    assert_completed(finish(e, id));
    if let Some(at) = first_difference(&dst.to_vec(), expected) {
        panic!("one READ over {len} bytes differs first at byte {at}");
    }
}

// ---------------------------------------------------------------------------------------
// Data both ways
// ---------------------------------------------------------------------------------------

/// Memory the child allocated (memfds): 128 shuffled pages written byte exact into the
/// read-write region (a spare page stays untouched) and a pattern the child wrote there
/// read back, both through the initiator's mapping of the memfd; a read-only region read
/// back (peers get no file for it: by cross-memory attach); a WRITE into the read-only
/// region refused before anything moves.
#[test]
fn memfd_regions_are_mapped_and_copied_both_ways() {
    const PAGES: usize = 128;
    const RO_LEN: usize = 32 * PAGE;
    let mut t = Target::spawn();
    let rw = t.alloc("rw", (PAGES + 1) * PAGE, Access::ALL);
    let ro = t.alloc("ro", RO_LEN, READ_ONLY);
    t.fill("ro", RO_SEED);
    let e = initiator();
    let p = open_same_host(&e, &t);

    write_shuffled(&e, p, &mut t, "rw", rw, PAGES, 1);
    assert_eq!(
        t.hash("rw", PAGES * PAGE, PAGE),
        digest(&[0; PAGE]),
        "the spare page after the written ones changed"
    );

    t.fill("rw", 55);
    read_and_verify(&e, p, rw, &pattern(55, (PAGES + 1) * PAGE));

    read_and_verify(&e, p, ro, &pattern(RO_SEED, RO_LEN));

    let src = e.allocate(PAGE, Location::Any).unwrap();
    src.write_at(0, &pattern(99, PAGE)).unwrap();
    match e.submit(p, &[Op::write(src.addr(), ro + PAGE as u64, PAGE as u64)]) {
        Err(Error::AccessDenied {
            side: Side::Remote,
            need,
            ..
        }) => assert_eq!(need, Access::REMOTE_WRITE),
        other => panic!("a WRITE into the child's read-only region: {other:?}"),
    }
    assert_eq!(
        t.hash("ro", 0, RO_LEN),
        digest(&pattern(RO_SEED, RO_LEN)),
        "the read-only region changed"
    );
    t.assert_alive();
}

/// Caller memory of the child (mmap + `Engine::register`), reached by cross-memory attach:
/// shuffled pages written byte exact (a spare page stays untouched), then a pattern the
/// child wrote read back.
#[test]
fn caller_memory_goes_by_cross_memory_attach() {
    const PAGES: usize = 64;
    const LEN: usize = (PAGES + 1) * PAGE;
    let mut t = Target::spawn();
    let mem = t.caller("mem", LEN, Access::ALL);
    let e = initiator();
    let p = open_same_host(&e, &t);

    write_shuffled(&e, p, &mut t, "mem", mem, PAGES, 2);
    assert_eq!(
        t.hash("mem", PAGES * PAGE, PAGE),
        digest(&[0; PAGE]),
        "the spare page after the written ones changed"
    );

    t.fill("mem", 77);
    read_and_verify(&e, p, mem, &pattern(77, LEN));
    t.assert_alive();
}

// ---------------------------------------------------------------------------------------
// Memory given back mid-batch
// ---------------------------------------------------------------------------------------

/// Bytes of the region given back mid-batch.
const VICTIM: usize = 64 << 20;
/// Bytes per op of the large batch.
const BIG_OP: usize = 1 << 20;
/// Ops of the large batch, cycling over the victim region: 60 GiB (just under the default
/// `max_slices_per_batch`), seconds of copying even on a fast machine (seen: 2 s through
/// a mapping, 3 to 6 s by cross-memory attach), against the milliseconds the child needs
/// to give the memory back.
const BIG_OPS: usize = 60 << 10;

/// Submits the large WRITE into `victim` and returns once its first op's bytes are in
/// the child (a loop that asks the child, with a deadline), so that what follows lands
/// mid-transfer. Fails if the batch ends first.
fn start_big_write(e: &Engine, p: PeerId, t: &mut Target, src: &Buffer, victim: u64) -> BatchId {
    let ops: Vec<Op> = (0..BIG_OPS)
        .map(|i| {
            let slot = i % (VICTIM / BIG_OP);
            Op::write(src.addr(), victim + (slot * BIG_OP) as u64, BIG_OP as u64)
        })
        .collect();
    let id = e.submit(p, &ops).unwrap();
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Shm);
    let first_word = src.to_vec()[..8].to_vec();
    let until = Instant::now() + Duration::from_secs(10);
    while t.bytes("victim", 0, 8) != first_word {
        let state = e.status(id).unwrap();
        assert!(
            !state.is_finished(),
            "the batch ended ({state:?}) before its first bytes were seen in the child"
        );
        assert!(
            Instant::now() < until,
            "the batch's bytes do not reach the child"
        );
    }
    let state = e.status(id).unwrap();
    assert!(
        !state.is_finished(),
        "the {} GiB batch already ended ({state:?}) before the child was asked to give its \
         memory back: make BIG_OPS larger",
        (BIG_OPS * BIG_OP) >> 30
    );
    id
}

/// An initiator with one copy thread. A peer's copies into a region pin it one claimed
/// range at a time; with several copy threads one of them holds a pin at nearly every
/// instant, and `unregister` (which succeeds only while no copy is counted) may answer
/// `PeerBusy` until the whole batch is done (seen: 6.7 s, the whole 60 GiB). One thread
/// leaves the region unpinned between its ranges, so a retrying `unregister` gets in
/// within milliseconds, mid-batch.
fn one_copy_thread_initiator() -> Engine {
    let config = EngineConfig::builder().copy_threads(1).build().unwrap();
    let e = Engine::new(config).expect("engine starts");
    assert_eq!(
        e.config().copy_threads,
        1,
        "KVX_COPY_THREADS in the environment changes what this test checks; unset it"
    );
    assert_eq!(
        e.config().transports,
        [TransportKind::Shm, TransportKind::Rdma, TransportKind::Tcp],
        "KVX_TRANSPORTS in the environment changes what these tests check; unset it"
    );
    e
}

/// The large batch, whose target memory was given back at `given_back` (time since
/// submit), must fail promptly, naming the unregister.
fn assert_failed_by_unregister(e: &Engine, id: BatchId, given_back: Duration) {
    let asked = Instant::now();
    let state = finish(e, id);
    let took = asked.elapsed();
    match &state {
        BatchState::Failed(err) => {
            let text = err.to_string();
            assert!(
                text.contains("unregistered"),
                "the batch failed, but not because the child unregistered: {text}"
            );
        }
        BatchState::Completed => panic!(
            "the batch COMPLETED although the child gave its target memory back {given_back:?} \
             after submit: either all {} GiB moved before that (make BIG_OPS larger) or \
             copies went on into memory that was given back",
            (BIG_OPS * BIG_OP) >> 30
        ),
        other => panic!("the batch ended {other:?}, not Failed"),
    }
    assert!(
        took < Duration::from_secs(10),
        "the failure took {took:?} to be reported"
    );
}

/// The child unregisters caller memory while a 60 GiB WRITE into it runs, retrying while
/// `unregister` answers `PeerBusy`, then fills it with a sentinel: the batch fails naming
/// the unregister, no byte lands after `unregister` returned, and the child, having
/// unmapped the memory, still serves a verified WRITE.
#[test]
fn unregister_mid_batch_fails_the_batch_not_the_process() {
    let mut t = Target::spawn();
    let victim = t.caller("victim", VICTIM, Access::ALL);
    let rw = t.alloc("rw", 16 * PAGE, Access::ALL);
    let e = one_copy_thread_initiator();
    let p = open_same_host(&e, &t);
    let src = e.allocate(BIG_OP, Location::Any).unwrap();
    src.write_at(0, &pattern(5, BIG_OP)).unwrap();

    let submitted = Instant::now();
    let id = start_big_write(&e, p, &mut t, &src, victim);
    let answer = t.ask("unregister victim 10000");
    let given_back = submitted.elapsed();
    let retries: u64 = answer
        .strip_prefix("unregistered ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the child could not unregister mid-batch: {answer}"));
    eprintln!("unregister mid-batch: {retries} PeerBusy retries, done {given_back:?} after submit");
    assert_failed_by_unregister(&e, id, given_back);

    assert_eq!(
        t.hash("victim", 0, VICTIM),
        digest(&vec![SENTINEL; VICTIM]),
        "bytes landed in the child's memory after its unregister returned Ok"
    );
    assert_eq!(t.ask("unmap victim"), "unmapped");
    t.assert_alive();
    write_shuffled(&e, p, &mut t, "rw", rw, 16, 3);
    t.assert_alive();
}

/// The child drops an allocated buffer while a 60 GiB WRITE into it runs (through the
/// initiator's mapping of its memfd): the batch fails naming the unregister, and the
/// child still serves a verified WRITE.
#[test]
fn dropping_an_allocated_buffer_mid_batch_fails_the_batch_not_the_process() {
    let mut t = Target::spawn();
    let victim = t.alloc("victim", VICTIM, Access::ALL);
    let rw = t.alloc("rw", 16 * PAGE, Access::ALL);
    let e = initiator();
    let p = open_same_host(&e, &t);
    let src = e.allocate(BIG_OP, Location::Any).unwrap();
    src.write_at(0, &pattern(6, BIG_OP)).unwrap();

    let submitted = Instant::now();
    let id = start_big_write(&e, p, &mut t, &src, victim);
    assert_eq!(t.ask("drop victim"), "dropped");
    let given_back = submitted.elapsed();
    assert_failed_by_unregister(&e, id, given_back);

    t.assert_alive();
    write_shuffled(&e, p, &mut t, "rw", rw, 16, 4);
    t.assert_alive();
}

// ---------------------------------------------------------------------------------------
// Forged requests on the raw shm socket
// ---------------------------------------------------------------------------------------

/// How long a raw reply may take.
const RAW_REPLY: Duration = Duration::from_secs(10);

fn connect_raw(socket: &str) -> SeqPacket {
    SeqPacket::connect_abstract(socket.as_bytes(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot connect to the child's shm socket @{socket}: {e}"))
}

/// The next datagram, decoded, with the descriptors it carried.
fn reply(sock: &SeqPacket) -> (u64, Message, Vec<OwnedFd>) {
    let mut buf = [0u8; wire::MAX_MESSAGE];
    let got = sock
        .recv(&mut buf, Some(RAW_REPLY))
        .expect("a reply from the child's shm server");
    assert!(
        got.len > 0,
        "the server closed the connection instead of replying"
    );
    assert!(!got.truncated && !got.fds_truncated, "a reply too long");
    let (req, msg) = wire::decode(&buf[..got.len]).expect("the reply decodes");
    assert_eq!(
        got.fds.len(),
        msg.fds(),
        "{} carried {} descriptors",
        msg.kind_name(),
        got.fds.len()
    );
    (req, msg, got.fds)
}

/// Sends `msg` as request `req` and returns the reply, which must answer `req`.
fn request(sock: &SeqPacket, req: u64, msg: &Message) -> (Message, Vec<OwnedFd>) {
    sock.send(&msg.encode(req), &[]).expect("send");
    let (got_req, reply, fds) = reply(sock);
    assert_eq!(got_req, req, "a reply to another request: {reply:?}");
    (reply, fds)
}

/// The reply is a `Refused` with `want` (a `code::` constant).
fn assert_refused(reply: &Message, want: u32, what: &str) {
    match reply {
        Message::Refused { code: got, reason } => assert_eq!(
            *got,
            want,
            "{what}: refused with {} ({reason}), expected {}",
            code::name(*got),
            code::name(want)
        ),
        other => panic!(
            "{what}: expected Refused {}, got {other:?}",
            code::name(want)
        ),
    }
}

/// The server closed the connection: the next receive is end of stream.
fn assert_closed(sock: &SeqPacket, what: &str) {
    let mut buf = [0u8; wire::MAX_MESSAGE];
    let got = sock
        .recv(&mut buf, Some(RAW_REPLY))
        .unwrap_or_else(|e| panic!("{what}: the connection stays open ({e})"));
    assert!(
        got.len == 0 && got.fds.is_empty(),
        "{what}: a further message of {} bytes instead of end of stream",
        got.len
    );
}

fn hello(target_engine: u64, client_nonce: [u8; NONCE_LEN]) -> Message {
    Message::Hello {
        target_engine,
        client_engine: 0x7e57,
        client_nonce,
    }
}

/// A fresh connection past Hello: the proof page mapped, the server's nonce read from it,
/// and the pin table it shares with us.
struct Proving {
    sock: SeqPacket,
    page: PeerMapping,
    server_nonce: [u8; NONCE_LEN],
    table: OwnedFd,
    table_slots: u32,
}

fn start_proof(socket: &str, engine_id: u64, pid: u32, client_nonce: [u8; NONCE_LEN]) -> Proving {
    let sock = connect_raw(socket);
    let (msg, mut fds) = request(&sock, 1, &hello(engine_id, client_nonce));
    let Message::HelloReply {
        engine_id: got_id,
        proof_addr,
        pid: got_pid,
        proof_len,
        table_slots,
    } = msg
    else {
        panic!("Hello answered with {msg:?}");
    };
    assert_eq!(got_id, engine_id);
    assert_eq!(got_pid, pid, "HelloReply names another process");
    assert!(proof_addr != 0 && table_slots > 0);
    assert_eq!(
        fds.len(),
        2,
        "HelloReply carries the proof page and the pin table"
    );
    let table = fds.pop().expect("the pin table");
    let proof_fd = fds.pop().expect("the proof page");
    let page = PeerMapping::map(proof_fd, 0, proof_len as usize, true).expect("map the proof page");
    let mut server_nonce = [0u8; NONCE_LEN];
    // SAFETY: the page is mapped for proof_len >= 32 bytes (the decoder checks the minimum)
    // while `page` lives; the server wrote its nonce before replying and does not write
    // the page again.
    unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), server_nonce.as_mut_ptr(), NONCE_LEN) };
    Proving {
        sock,
        page,
        server_nonce,
        table,
        table_slots,
    }
}

impl Proving {
    /// Writes `nonce` where the server looks for the client's nonce (bytes 16..32).
    fn write_client_nonce(&self, nonce: &[u8; NONCE_LEN]) {
        assert!(self.page.is_writable());
        // SAFETY: bytes NONCE_LEN..2 * NONCE_LEN of a writable mapping of at least 32
        // bytes; the server reads them only after our Confirm.
        unsafe {
            std::ptr::copy_nonoverlapping(
                nonce.as_ptr(),
                self.page.as_ptr().add(NONCE_LEN),
                NONCE_LEN,
            )
        };
    }
}

/// A connection proven by hand, and the pin table the server shares over it (mapped the
/// way the library's own client maps it).
struct RawLink {
    sock: SeqPacket,
    table: PinTable,
}

/// Connects to `socket` and does the whole proof by hand: map the proof page from
/// HelloReply, read the server's nonce at offset 0, write ours at offset 16, send the
/// server's nonce back in Confirm, get Proven.
fn prove_by_hand(socket: &str, engine_id: u64, pid: u32) -> RawLink {
    let client_nonce = [0xc3; NONCE_LEN];
    let p = start_proof(socket, engine_id, pid, client_nonce);
    p.write_client_nonce(&client_nonce);
    let (msg, _) = request(
        &p.sock,
        2,
        &Message::Confirm {
            server_nonce: p.server_nonce,
        },
    );
    assert_eq!(msg, Message::Proven, "a correct proof");
    let len = p.table_slots as usize * SLOT_BYTES;
    let map = PeerMapping::map(p.table, 0, len, true).expect("map the pin table");
    let base = map.as_ptr();
    // SAFETY: `base` starts a shared, writable mapping of `len` bytes that the table keeps
    // alive (it owns `map`); the server sealed the memfd against shrinking (checked by
    // PeerMapping::map); both sides touch it only through PinTable's atomics.
    let table = unsafe { PinTable::new(base, len, p.table_slots, Box::new(map)) }
        .expect("the pin table is aligned");
    RawLink {
        sock: p.sock,
        table,
    }
}

/// Raw requests on the child's shm socket: every out-of-turn, misdirected, unproven or
/// malformed request is refused with its code, and after a proof done by hand only
/// registered regions with remote rights are attached; only a region peers may write comes
/// with a file to map (read-only regions and caller memory come without one). The child
/// serves a normal transfer afterwards.
#[test]
fn forged_requests_on_the_shm_socket_are_refused() {
    const RO_LEN: usize = 4 * PAGE;
    const RW_LEN: usize = 16 * PAGE;
    const CALLER_LEN: usize = 4 * PAGE;
    let mut t = Target::spawn();
    let rw = t.alloc("rw", RW_LEN, Access::ALL);
    let ro = t.alloc("ro", RO_LEN, READ_ONLY);
    t.fill("ro", RO_SEED);
    let local = t.alloc("local", PAGE, LOCAL_ONLY);
    let caller = t.caller("caller", CALLER_LEN, Access::ALL);

    let (engine_id, socket) = t.shm_socket();

    // Attach before Hello: out of turn, and the connection is closed.
    let sock = connect_raw(&socket);
    let (msg, _) = request(&sock, 7, &Message::Attach { addr: ro });
    assert_refused(&msg, code::PROTOCOL, "Attach before Hello");
    assert_closed(&sock, "after Attach before Hello");

    // Hello to another engine.
    let sock = connect_raw(&socket);
    let (msg, _) = request(&sock, 1, &hello(engine_id ^ 1, [1; NONCE_LEN]));
    assert_refused(&msg, code::WRONG_ENGINE, "Hello naming another engine");
    assert_closed(&sock, "after a Hello naming another engine");

    // A proof with a wrong server nonce (the right one with a bit flipped) ...
    let client_nonce = [0xc1; NONCE_LEN];
    let p = start_proof(&socket, engine_id, t.pid, client_nonce);
    p.write_client_nonce(&client_nonce);
    let mut wrong = p.server_nonce;
    wrong[0] ^= 1;
    let (msg, _) = request(
        &p.sock,
        2,
        &Message::Confirm {
            server_nonce: wrong,
        },
    );
    assert_refused(&msg, code::BAD_PROOF, "Confirm with a wrong server nonce");
    assert_closed(&p.sock, "after a wrong server nonce");
    // ... and with the right server nonce but our own not written to the page.
    let p = start_proof(&socket, engine_id, t.pid, [0xc2; NONCE_LEN]);
    let (msg, _) = request(
        &p.sock,
        2,
        &Message::Confirm {
            server_nonce: p.server_nonce,
        },
    );
    assert_refused(&msg, code::BAD_PROOF, "Confirm without the client's nonce");
    assert_closed(&p.sock, "after Confirm without the client's nonce");

    // Garbage.
    let sock = connect_raw(&socket);
    let junk = b"GET / HTTP/1.1\r\n\r\nxx";
    assert_eq!(junk.len(), 20);
    sock.send(junk, &[]).expect("send");
    let (req, msg, _) = reply(&sock);
    assert_eq!(req, 0, "garbage has no request id to answer");
    assert_refused(&msg, code::PROTOCOL, "20 bytes of garbage");
    assert_closed(&sock, "after garbage");

    // A correct proof by hand.
    let sock = prove_by_hand(&socket, engine_id, t.pid).sock;

    // Attaches on that connection; refusals leave it usable.
    let (msg, _) = request(&sock, 3, &Message::Attach { addr: 0x1000 });
    assert_refused(
        &msg,
        code::NOT_REGISTERED,
        "Attach of an unregistered address",
    );
    let inside = rw + PAGE as u64;
    let (msg, _) = request(&sock, 4, &Message::Attach { addr: inside });
    assert_refused(
        &msg,
        code::NOT_REGISTERED,
        "Attach of an address inside a region, not its start",
    );
    let (msg, fds) = request(&sock, 5, &Message::Attach { addr: local });
    assert_refused(
        &msg,
        code::NO_REMOTE_ACCESS,
        "Attach of a local-only region",
    );
    assert!(fds.is_empty());

    // The read-only region: attached with its rights but without a file (a memfd's
    // read-only descriptor could be reopened read-write through /proc), so a peer reaches
    // it only by cross-memory attach, which shows the child's pattern at that address.
    let (msg, fds) = request(&sock, 6, &Message::Attach { addr: ro });
    let Message::Attached(a) = msg else {
        panic!("Attach of the read-only region: {msg:?}");
    };
    assert_eq!((a.addr, a.len), (ro, RO_LEN as u64));
    assert_eq!(Access::from_bits(a.access), Some(READ_ONLY));
    assert_eq!(
        a.map,
        MapKind::None,
        "the read-only region is shared as a file"
    );
    assert!(
        fds.is_empty(),
        "the read-only region came with {} descriptors",
        fds.len()
    );
    let mut seen = vec![0u8; RO_LEN];
    let piece = Piece {
        local: seen.as_mut_ptr() as u64,
        remote: a.addr,
        len: RO_LEN,
    };
    // SAFETY: `seen` is ours, RO_LEN bytes, valid for writes and not otherwise referenced
    // during the call; the remote range is checked by the kernel.
    unsafe { cma::read_from(t.pid as i32, &[piece]) }
        .expect("cross-memory read of the read-only region");
    assert_eq!(
        first_difference(&seen, &pattern(RO_SEED, RO_LEN)),
        None,
        "the read-only region does not hold the child's pattern"
    );

    // The read-write region: a writable file, the child's very memory.
    let (msg, mut fds) = request(&sock, 7, &Message::Attach { addr: rw });
    let Message::Attached(a) = msg else {
        panic!("Attach of the read-write region: {msg:?}");
    };
    assert_eq!((a.addr, a.len), (rw, RW_LEN as u64));
    assert_eq!(Access::from_bits(a.access), Some(Access::ALL));
    let MapKind::ReadWrite { offset, .. } = a.map else {
        panic!("the read-write region is shared as {:?}", a.map);
    };
    assert_eq!(fds.len(), 1);
    let rw_map =
        PeerMapping::map(fds.pop().expect("one fd"), offset, RW_LEN, true).expect("rw mapping");
    let image = pattern(11, RW_LEN);
    // SAFETY: the mapping is writable for RW_LEN bytes while `rw_map` lives; nothing else
    // touches the child's region meanwhile.
    unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), rw_map.as_ptr(), RW_LEN) };
    t.assert_holds(
        "rw",
        0,
        &image,
        "bytes written through the attached mapping",
    );
    drop(rw_map);

    // Caller memory: attached without a file (cross-memory attach only).
    let (msg, fds) = request(&sock, 8, &Message::Attach { addr: caller });
    let Message::Attached(a) = msg else {
        panic!("Attach of caller memory: {msg:?}");
    };
    assert_eq!(
        (a.addr, a.len, a.map),
        (caller, CALLER_LEN as u64, MapKind::None)
    );
    assert!(fds.is_empty());
    drop(sock);

    // The child lives and serves a normal transfer.
    t.assert_alive();
    let e = initiator();
    let p = open_same_host(&e, &t);
    write_shuffled(&e, p, &mut t, "rw", rw, RW_LEN / PAGE, 12);
    assert_eq!(
        t.hash("ro", 0, RO_LEN),
        digest(&pattern(RO_SEED, RO_LEN)),
        "the read-only region changed"
    );
}

// ---------------------------------------------------------------------------------------
// A peer's pin against unregister
// ---------------------------------------------------------------------------------------

/// Asks the child to unregister `name`, retrying on `PeerBusy` for `limit_ms`, and
/// returns the answer, which must say it stayed busy (another error fails the test).
fn unregister_stays_busy(t: &mut Target, name: &str, limit_ms: u64) -> String {
    let answer = t.ask(&format!("unregister {name} {limit_ms}"));
    assert!(
        answer.starts_with("unregister-failed ")
            && answer.contains("a same-host peer is copying into or out of it"),
        "unregister of {name:?} while a peer holds a pin on it: {answer}"
    );
    answer
}

/// A pin held in the pin table (as a copy in flight holds one) makes the child's
/// `unregister` answer `PeerBusy` and change nothing: the region still takes a verified
/// WRITE from an engine. Once the pin is released `unregister` succeeds, the slot no
/// longer pins, the region is no longer attached, and the engine's next copy into it does
/// not land.
#[test]
fn a_peers_pin_keeps_unregister_busy_until_released() {
    const PAGES: usize = 4;
    const LEN: usize = PAGES * PAGE;
    let mut t = Target::spawn();
    let mem = t.caller("mem", LEN, Access::ALL);
    let (engine_id, socket) = t.shm_socket();
    let raw = prove_by_hand(&socket, engine_id, t.pid);
    let (msg, fds) = request(&raw.sock, 3, &Message::Attach { addr: mem });
    let Message::Attached(a) = msg else {
        panic!("Attach of caller memory: {msg:?}");
    };
    assert_eq!(a.map, MapKind::None);
    assert!(fds.is_empty());
    assert!(raw.table.pin(a.slot, a.gen), "a live region does not pin");

    unregister_stays_busy(&mut t, "mem", 200);
    let e = initiator();
    let p = open_same_host(&e, &t);
    write_shuffled(&e, p, &mut t, "mem", mem, PAGES, 21);

    raw.table.unpin(a.slot);
    let answer = t.ask("unregister mem 10000");
    assert!(
        answer.starts_with("unregistered "),
        "unregister once the pin is released: {answer}"
    );
    assert!(
        !raw.table.pin(a.slot, a.gen),
        "the slot still pins after unregister succeeded"
    );
    let (msg, _) = request(&raw.sock, 4, &Message::Attach { addr: mem });
    assert_refused(&msg, code::NOT_REGISTERED, "Attach after unregister");

    // The engine's next WRITE into it: refused at submit if the child's new descriptor
    // already reached it, else the batch fails; either way no byte lands.
    let src = e.allocate(PAGE, Location::Any).unwrap();
    src.write_at(0, &pattern(22, PAGE)).unwrap();
    match e.submit(p, &[Op::write(src.addr(), mem, PAGE as u64)]) {
        Err(Error::NotRegistered {
            side: Side::Remote, ..
        }) => {}
        // Shm refuses it at its next pin ("unregistered"), or, the attachment being gone,
        // the batch goes over TCP, whose server refuses it.
        Ok(id) => match finish(&e, id) {
            BatchState::Failed(Error::Transport { .. }) => {}
            other => panic!("a WRITE into unregistered memory ended {other:?}"),
        },
        Err(other) => panic!("a WRITE into unregistered memory: {other:?}"),
    }
    assert_eq!(
        t.hash("mem", 0, LEN),
        digest(&vec![SENTINEL; LEN]),
        "bytes landed in the child's memory after its unregister returned Ok"
    );
    t.assert_alive();
}

/// Other same-host peers of the child in the test below: connections proven by hand, each
/// with the victim region attached; the last one holds a pin on it.
const OTHER_PEERS: usize = 128;

/// An `unregister` that answers `PeerBusy` changes nothing (`MemoryError::PeerBusy`: "retry
/// once its transfer is done"), so a same-host peer's batch into the region must not fail
/// because of it. Here the child has several same-host peers: an engine writing 60 GiB into
/// its caller memory, and raw connections that attached the region, the last of which holds
/// a pin on it, so every `unregister` of it answers `PeerBusy`. The child keeps asking for
/// 2 s; the engine's batch must not end `Failed` ("peer unregistered its region").
///
/// (This failed before the pin table had a "revoking" state: a slot was marked dead while
/// the engine counted the pins, and a pin landing then failed the batch.)
#[test]
fn a_busy_unregister_does_not_fail_the_peers_batch() {
    let mut t = Target::spawn();
    let victim = t.caller("victim", VICTIM, Access::ALL);
    // The engine first, so that its connection is the first the child's server revokes;
    // with one copy thread, so that it is often idle (between two ranges) at that instant.
    let e = one_copy_thread_initiator();
    let p = open_same_host(&e, &t);
    let (engine_id, socket) = t.shm_socket();
    let others: Vec<(RawLink, u32, u64)> = (0..OTHER_PEERS)
        .map(|_| {
            let raw = prove_by_hand(&socket, engine_id, t.pid);
            let (msg, _) = request(&raw.sock, 3, &Message::Attach { addr: victim });
            let Message::Attached(a) = msg else {
                panic!("Attach of caller memory: {msg:?}");
            };
            (raw, a.slot, a.gen)
        })
        .collect();
    let (pinner, slot, gen) = others.last().expect("other peers");
    assert!(pinner.table.pin(*slot, *gen), "a live region does not pin");

    let src = e.allocate(BIG_OP, Location::Any).unwrap();
    src.write_at(0, &pattern(7, BIG_OP)).unwrap();
    let id = start_big_write(&e, p, &mut t, &src, victim);
    let answer = unregister_stays_busy(&mut t, "victim", 2000);
    // Enough has been shown; the batch need not run to its end.
    e.cancel(id).unwrap();
    match finish(&e, id) {
        BatchState::Cancelled | BatchState::Completed => {}
        BatchState::Failed(err) => panic!(
            "every unregister answered PeerBusy ({answer}) and the region is still \
             registered, yet the peer's batch failed: {err}"
        ),
        other => panic!("the batch ended {other:?}"),
    }
    pinner.table.unpin(*slot);
    t.assert_alive();
}
