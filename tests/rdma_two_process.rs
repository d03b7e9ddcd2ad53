//! Two real processes over real RDMA (soft-RoCE in the VM of `../shared/rdma-vm`: rxe0 and
//! rxe1 over the veth pair veth0/veth1). This test binary re-executes itself as a "target"
//! child whose engine uses `rxe0`; the test itself is the initiator on `rxe1`, so every
//! byte crosses the veth "wire". Both engines allow RDMA only (`transports = [Rdma]`); the
//! control plane (handshake, QP connection, notifications) runs over loopback TCP.
//!
//! Covers:
//! 1. WRITE of 128 pages of 64 KiB (each a distinct position-dependent pattern) into
//!    shuffled slots of the child's `Engine::allocate` buffer, with a notification: the
//!    child, blocked on its inbox, hashes its buffer the moment the notification arrives
//!    and the parent checks both. Then READ of that buffer back (shuffled), of caller
//!    memory the child registered with `unsafe register` and filled with a known pattern,
//!    and of its read-only region; every batch goes over RDMA (`batch_transport`).
//! 2. Refusals: WRITE into a child region without REMOTE_WRITE (`AccessDenied`) and to an
//!    address the child never registered (`NotRegistered`), alone and mixed with a valid
//!    op, are refused at submit (no batch is created, nothing moves): the child's buffers
//!    hash as before, the child is alive and the peer still works afterwards.
//! 3. `ip link set veth1 down` (rxe1, the initiator's NIC) in the middle of a large WRITE
//!    batch with a 15 s deadline: the batch must end (Failed or TimedOut) by its deadline
//!    plus a few seconds, never hang; the link comes back up in a guard (even when the
//!    test fails), which waits for both ports to be ACTIVE again (polling sysfs: the
//!    kernel applies veth carrier changes asynchronously). Failover to another NIC is not
//!    implemented yet, so a clean failure is the expected result; the test prints what
//!    the batch ended with and how long after the link went down. Once the
//!    link is back, the same peer (its link reconnects, replacing the failed queue pair)
//!    and a fresh engine both move bytes to the child again.
//! 4. Packets to the child silently lost mid-batch (a bogus neighbour entry on veth1;
//!    ports stay up, so only the NIC's retransmission could notice, and rxe retries
//!    without limit): the batch still ends by its (5 s) deadline plus a few seconds.
//!
//! 5. A batch stopped at its deadline, or cancelled, while the NIC holds its requests
//!    ends `TimedOut` or `Cancelled` (its queue pair is flushed; the flush is not reported
//!    as a failure).
//!
//! Every test skips (printing why) unless `RDMA_VM=1` (`./dev rdma-test` runs them in the
//! VM, as root). The tests of this file run one at a time (a lock), since tests 3 and 4
//! cut the link under whatever else runs.
//!
//! Child protocol: the child prints `KVXRDMA ready <session> <rw> <ro> <extra> <unreg>`
//! (addresses in decimal) once it serves, then answers one `KVXRDMA ...` line per command
//! line read on stdin (see `serve_commands`). Only lines with the `KVXRDMA ` marker are
//! parsed: libtest prints its own lines on the same stdout. Reading the ready line (and
//! each answer) is the only synchronisation between the processes; a `Target` guard kills
//! its child on drop, so no test leaks one. The child polls its own memory for one thing
//! only (`wait-landed`: has a one-sided WRITE begun to land?), since a one-sided WRITE
//! raises no event at the target.

mod common;
use common::{digest, pattern};

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kvxfer::{
    Access, BatchId, BatchState, Engine, EngineConfig, Error, Location, Op, Side, TransportKind,
};

/// Set (to the role) in the environment of a child.
const CHILD_ENV: &str = "KVX_RDMA_TEST_CHILD";
/// Marks the child's protocol lines on its stdout.
const MARK: &str = "KVXRDMA ";
/// One KV page of the transfers here.
const PAGE: usize = 64 << 10;
/// How long any answer of a child may take before the test fails.
const ANSWER: Duration = Duration::from_secs(60);
/// The NIC of the child (target) and its network device.
const TARGET_NIC: &str = "rxe0";
/// The NIC of the parent (initiator) and its network device (the one tests 3 and 4 cut).
const INITIATOR_NIC: &str = "rxe1";
const INITIATOR_NETDEV: &str = "veth1";
/// Size of the child's read-only region (REMOTE_READ, no REMOTE_WRITE).
const RO_LEN: usize = 1 << 20;
/// Seeds of the patterns the child writes at start into its read-only region and its
/// caller-memory region.
const RO_SEED: u64 = 0x0dd5_eed0_f0ad_0001;
const EXTRA_SEED: u64 = 0x0dd5_eed0_f0ad_0002;
/// Size of the child's memory that is never registered.
const UNREG_LEN: usize = 1 << 20;

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

/// Index of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// A permutation of `0..n` for odd-stride page shuffles (`n` a power of two).
fn slot(i: usize, n: usize) -> usize {
    (i * 37 + 11) % n
}

/// An engine that reaches peers over RDMA only, on the NIC `device`.
fn rdma_engine(device: &str) -> Engine {
    let config = EngineConfig::builder()
        .transports(&[TransportKind::Rdma])
        .rdma_devices(device)
        .batch_timeout(Duration::from_secs(30))
        .build()
        .expect("config");
    let engine = Engine::new(config).expect("engine starts");
    let rdma = engine
        .transports()
        .into_iter()
        .find(|t| t.kind == TransportKind::Rdma)
        .expect("an RDMA entry");
    assert!(
        !rdma.detail.starts_with("not used"),
        "RDMA on {device} is not used: {}",
        rdma.detail
    );
    engine
}

// ---------------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------------

/// Entry point of the child processes: does nothing unless `KVX_RDMA_TEST_CHILD` is set.
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

fn env_usize(name: &str) -> usize {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set"))
        .parse()
        .expect(name)
}

/// The regions of a target child, by name.
struct TargetMemory {
    /// `Engine::allocate`d, every right; zero or a pattern at start.
    rw: kvxfer::Buffer,
    /// REMOTE_READ but no REMOTE_WRITE; `pattern(RO_SEED)` at start.
    ro: kvxfer::Buffer,
    /// Caller memory (a leaked allocation) registered with every right;
    /// `pattern(EXTRA_SEED)` at start.
    extra: *mut u8,
    extra_len: usize,
    /// Memory of the child that is never registered (a leaked allocation).
    unreg: *mut u8,
}

impl TargetMemory {
    fn addr(&self, which: &str) -> u64 {
        match which {
            "rw" => self.rw.addr(),
            "ro" => self.ro.addr(),
            "extra" => self.extra as u64,
            "unreg" => self.unreg as u64,
            other => panic!("no region {other:?}"),
        }
    }

    /// A copy of `len` bytes at `offset` of a region. Bytes a running WRITE lands in may
    /// be read half-written (only `wait-landed` reads during a batch, and it only looks
    /// for a nonzero byte).
    fn bytes(&self, which: &str, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        match which {
            "rw" => self.rw.read_at(offset, &mut out).expect("inside rw"),
            "ro" => self.ro.read_at(offset, &mut out).expect("inside ro"),
            "extra" => {
                assert!(offset + len <= self.extra_len, "outside extra");
                // SAFETY: `extra` is a leaked allocation of `extra_len` bytes that is never
                // freed; the range was checked just above.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.extra.add(offset), out.as_mut_ptr(), len)
                };
            }
            other => panic!("no region {other:?}"),
        }
        out
    }
}

fn leak(bytes: Vec<u8>) -> *mut u8 {
    Box::into_raw(bytes.into_boxed_slice()) as *mut u8
}

fn run_target() {
    let rw_len = env_usize("KVX_TEST_RW_LEN");
    let extra_len = env_usize("KVX_TEST_EXTRA_LEN");
    // Declared before the engine and never freed.
    let extra = leak(pattern(EXTRA_SEED, extra_len));
    let unreg = leak(vec![0x5a; UNREG_LEN]);
    let engine = rdma_engine(TARGET_NIC);
    let rw = engine
        .allocate(rw_len, Location::Any)
        .expect("child rw buffer");
    if let Ok(seed) = std::env::var("KVX_TEST_RW_SEED") {
        let seed: u64 = seed.parse().expect("KVX_TEST_RW_SEED");
        rw.write_at(0, &pattern(seed, rw_len)).expect("fits");
    }
    let ro = engine
        .allocate_with_access(
            RO_LEN,
            Location::Any,
            Access::REMOTE_READ | Access::LOCAL_READ | Access::LOCAL_WRITE,
        )
        .expect("child ro buffer");
    ro.write_at(0, &pattern(RO_SEED, RO_LEN)).expect("fits");
    // SAFETY: `extra` is a leaked allocation of `extra_len` bytes, valid for the rest of
    // the process.
    unsafe { engine.register(extra as u64, extra_len as u64, None, Access::ALL) }
        .expect("register extra");
    let memory = TargetMemory {
        rw,
        ro,
        extra,
        extra_len,
        unreg,
    };
    say(&format!(
        "ready {} {} {} {} {}",
        engine.session_id().expect("listens"),
        memory.addr("rw"),
        memory.addr("ro"),
        memory.addr("extra"),
        memory.addr("unreg"),
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
/// - `wait-landed <region> <offset> <len> <ms>` → `landed <ms waited>` once a byte of the
///   range is not zero (polled every millisecond: a one-sided WRITE raises no event
///   here), or `not-landed` after `ms`
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
            ["wait-landed", which, _, _, _] => {
                let start = Instant::now();
                let limit = Duration::from_millis(num(4) as u64);
                loop {
                    if memory.bytes(which, num(2), num(3)).iter().any(|&b| b != 0) {
                        say(&format!("landed {}", start.elapsed().as_millis()));
                        break;
                    }
                    if start.elapsed() >= limit {
                        say("not-landed");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            ["exit"] => break,
            _ => panic!("child: unknown command {line:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------

/// Serialises the tests of this file (tests 3 and 4 cut the initiator off).
static SERIAL: Mutex<()> = Mutex::new(());

/// The lock that runs a test alone, or `None` (with the reason printed) outside the VM.
fn in_vm(test: &str) -> Option<MutexGuard<'static, ()>> {
    if std::env::var("RDMA_VM").as_deref() != Ok("1") {
        println!(
            "skipped {test}: RDMA_VM is not 1, so not in the soft-RoCE VM with {TARGET_NIC} and \
             {INITIATOR_NIC} (run ./dev rdma-test)"
        );
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(PoisonError::into_inner))
}

/// How to start a target child.
#[derive(Clone, Debug)]
struct Spec {
    rw_len: usize,
    rw_seed: Option<u64>,
    extra_len: usize,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            rw_len: 1 << 20,
            rw_seed: None,
            extra_len: 1 << 20,
        }
    }
}

/// A running target child; killed (SIGKILL) and reaped on drop.
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    session: String,
    rw: u64,
    ro: u64,
    extra: u64,
    unreg: u64,
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
        .env("KVX_TEST_RW_LEN", spec.rw_len.to_string())
        .env("KVX_TEST_EXTRA_LEN", spec.extra_len.to_string())
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
            session: String::new(),
            rw: 0,
            ro: 0,
            extra: 0,
            unreg: 0,
        };
        let ready = t.answer();
        let f: Vec<&str> = ready.split_whitespace().collect();
        assert!(
            f.len() == 6 && f[0] == "ready",
            "unexpected first line {ready:?}"
        );
        t.session = f[1].to_string();
        t.rw = f[2].parse().expect("rw");
        t.ro = f[3].parse().expect("ro");
        t.extra = f[4].parse().expect("extra");
        t.unreg = f[5].parse().expect("unreg");
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

    /// The child's `rw` buffer hashes to `digest(expected)`; otherwise fails naming the
    /// first page that differs.
    fn assert_rw(&mut self, expected: &[u8], what: &str) {
        if self.hash("rw", 0, expected.len()) == digest(expected) {
            return;
        }
        for (s, want) in expected.chunks(PAGE).enumerate() {
            let got = self.bytes("rw", s * PAGE, want.len());
            if let Some(at) = first_difference(&got, want) {
                panic!("{what}: the child's page {s} differs first at byte {at}");
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

/// Waits for a batch, frees it and returns how it ended.
fn finish(e: &Engine, id: BatchId) -> BatchState {
    let state = e.wait(id, ANSWER).expect("wait");
    assert!(state.is_finished(), "batch still running after {ANSWER:?}");
    e.free(id).expect("free");
    state
}

fn assert_completed(state: BatchState) {
    assert!(
        matches!(state, BatchState::Completed),
        "batch ended {state:?}"
    );
}

/// Submits `ops` to `peer`, checks the batch goes over RDMA, and waits for it to complete.
fn rdma_transfer(e: &Engine, peer: kvxfer::PeerId, ops: &[Op]) {
    let id = e.submit(peer, ops).expect("submit");
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Rdma);
    assert_completed(finish(e, id));
}

/// `Engine::wait` (or `cancel`, with `cancel`) on another thread, bounded from outside as
/// well: `None` if it has not returned within `limit` plus 5 s (a hang: both wait without
/// bound for slices in flight once the batch is stopped). Returns the state and when the
/// call returned.
fn end_bounded(
    e: &Arc<Engine>,
    id: BatchId,
    limit: Duration,
    cancel: bool,
) -> Option<(BatchState, Instant)> {
    let (tx, rx) = mpsc::channel();
    let engine = Arc::clone(e);
    std::thread::spawn(move || {
        let state = if cancel {
            engine.cancel(id)
        } else {
            engine.wait(id, limit)
        };
        let _ = tx.send((state, Instant::now()));
    });
    rx.recv_timeout(limit + Duration::from_secs(5))
        .ok()
        .map(|(state, at)| (state.expect("wait or cancel"), at))
}

/// [`end_bounded`] with `Engine::wait`.
fn wait_bounded(e: &Arc<Engine>, id: BatchId, limit: Duration) -> Option<(BatchState, Instant)> {
    end_bounded(e, id, limit, false)
}

// ---------------------------------------------------------------------------------------
// Cutting the initiator off (tests 3 and 4)
// ---------------------------------------------------------------------------------------

/// Runs `ip ARGS...` (from PATH, else /usr/sbin or /sbin); `Err` says what went wrong.
fn ip(args: &[&str]) -> Result<(), String> {
    let mut last = String::new();
    for program in ["ip", "/usr/sbin/ip", "/sbin/ip"] {
        match Command::new(program).args(args).output() {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                return Err(format!(
                    "ip {}: {}: {}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Err(e) => last = format!("{program}: {e}"),
        }
    }
    Err(format!("cannot run ip ({last})"))
}

/// The state of port 1 of an RDMA device, as sysfs says (`4: ACTIVE`, `1: DOWN`).
fn port_state(device: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/infiniband/{device}/ports/1/state"))
        .map_or_else(|e| format!("unreadable ({e})"), |s| s.trim().to_string())
}

/// Waits until both NICs' ports are ACTIVE. The kernel applies a veth carrier change
/// (which rxe follows) asynchronously, from its link watch, and tells no one here; so this
/// polls sysfs, bounded.
fn wait_ports_active(limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let states: Vec<(&str, String)> = [TARGET_NIC, INITIATOR_NIC]
            .into_iter()
            .map(|d| (d, port_state(d)))
            .collect();
        if states.iter().all(|(_, s)| s.ends_with("ACTIVE")) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            return Err(format!("ports not ACTIVE after {limit:?}: {states:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How tests 3 and 4 (and the library-bug test) cut the initiator off from the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// `ip link set veth1 down`: rxe1's port goes DOWN (and rxe0's, with veth0's carrier).
    LinkDown,
    /// Packets to the child are silently lost: veth1's neighbour entry for the child's
    /// address gets a MAC nobody has, so veth0 drops every frame; ports stay ACTIVE and
    /// only the NIC's retransmission timeout can notice.
    SilentLoss,
}

/// The child's IPv4 address (rxe0 on veth0), as the VM says.
fn target_ip() -> String {
    std::env::var("RDMA_VM_IPS")
        .ok()
        .and_then(|ips| ips.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "10.77.0.1".into())
}

/// A cut in place; [`CutGuard::restore`] (or drop, even while a failed test unwinds)
/// undoes it and waits for both ports to be ACTIVE again, so the tests after this one find
/// the devices as they were.
struct CutGuard {
    cut: Cut,
    restored: bool,
}

impl CutGuard {
    fn take(cut: Cut) -> Result<CutGuard, String> {
        // The guard exists before the command runs: whatever happens, drop restores.
        let guard = CutGuard {
            cut,
            restored: false,
        };
        match cut {
            Cut::LinkDown => ip(&["link", "set", INITIATOR_NETDEV, "down"])?,
            Cut::SilentLoss => ip(&[
                "neigh",
                "replace",
                &target_ip(),
                "dev",
                INITIATOR_NETDEV,
                "lladdr",
                "02:77:00:00:00:99",
                "nud",
                "permanent",
            ])?,
        }
        Ok(guard)
    }

    /// Undoes the cut; how long the ports then took to be ACTIVE.
    fn restore(&mut self) -> Result<Duration, String> {
        self.restored = true;
        match self.cut {
            Cut::LinkDown => ip(&["link", "set", INITIATOR_NETDEV, "up"])?,
            // ARP resolves the address again.
            Cut::SilentLoss => ip(&["neigh", "del", &target_ip(), "dev", INITIATOR_NETDEV])?,
        }
        wait_ports_active(Duration::from_secs(20))
    }
}

impl Drop for CutGuard {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = self.restore() {
                eprintln!("rdma_two_process: undoing {:?} failed: {e}", self.cut);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Test 1: WRITE with a notification into shuffled slots of the child's buffer; the child
/// hashes its buffer when the notification arrives. Then READ back that buffer, the
/// child's caller memory (registered with `unsafe register`) and its read-only region.
#[test]
fn write_with_notification_then_read_back_over_rdma() {
    let Some(_serial) = in_vm("write_with_notification_then_read_back_over_rdma") else {
        return;
    };
    const PAGES: usize = 128;
    // One spare page past the written ones must stay zero.
    let rw_len = (PAGES + 1) * PAGE;
    let extra_len = 4 << 20;
    let mut t = Target::spawn(Spec {
        rw_len,
        extra_len,
        ..Spec::default()
    });
    let e = rdma_engine(INITIATOR_NIC);
    let image = pattern(1, PAGES * PAGE);
    let src = e.allocate(PAGES * PAGE, Location::Any).unwrap();
    src.write_at(0, &image).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    assert_eq!(e.peer_transport(p).unwrap(), TransportKind::Rdma);
    let ops: Vec<Op> = (0..PAGES)
        .map(|i| {
            Op::write(
                src.addr() + (i * PAGE) as u64,
                t.rw + (slot(i, PAGES) * PAGE) as u64,
                PAGE as u64,
            )
        })
        .collect();
    let mut expected = vec![0u8; rw_len];
    for i in 0..PAGES {
        expected[slot(i, PAGES) * PAGE..][..PAGE].copy_from_slice(&image[i * PAGE..][..PAGE]);
    }

    t.send(&format!("wait-notify rw 0 {rw_len} 30000"));
    assert_eq!(t.answer(), "waiting");
    let note = b"layer 0: 128 pages over rdma";
    let id = e.submit_with_notify(p, &ops, note).unwrap();
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Rdma);
    assert_completed(finish(&e, id));
    let line = t.answer();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(f.len() == 4 && f[0] == "notified", "child: {line}");
    assert_eq!(unhex(f[1]), note);
    assert_eq!(f[2], e.session_id().unwrap());
    let at_notification = u64::from_str_radix(f[3], 16).unwrap();
    if at_notification != digest(&expected) {
        // Tell a late notification from wrong bytes.
        t.assert_rw(&expected, "after the WRITE");
        panic!("the notification arrived before every byte of the batch");
    }
    t.assert_rw(&expected, "after the WRITE");

    // READ the child's buffer back, page by page out of the shuffled slots, into page
    // order (the spare page as well).
    let back = e.allocate(rw_len, Location::Any).unwrap();
    back.fill(0, rw_len, 0xee).unwrap();
    let mut ops: Vec<Op> = (0..PAGES)
        .map(|i| {
            Op::read(
                back.addr() + (i * PAGE) as u64,
                t.rw + (slot(i, PAGES) * PAGE) as u64,
                PAGE as u64,
            )
        })
        .collect();
    ops.push(Op::read(
        back.addr() + (PAGES * PAGE) as u64,
        t.rw + (PAGES * PAGE) as u64,
        PAGE as u64,
    ));
    rdma_transfer(&e, p, &ops);
    let got = back.to_vec();
    for i in 0..PAGES {
        if let Some(at) = first_difference(&got[i * PAGE..][..PAGE], &image[i * PAGE..][..PAGE]) {
            panic!("page {i} read back wrong, first at byte {at}");
        }
    }
    assert!(
        got[PAGES * PAGE..].iter().all(|&b| b == 0),
        "the spare page read back not zero"
    );

    // READ the caller memory the child registered (one op, cut into slices).
    let copy = e.allocate(extra_len, Location::Any).unwrap();
    rdma_transfer(&e, p, &[Op::read(copy.addr(), t.extra, extra_len as u64)]);
    assert_eq!(
        first_difference(&copy.to_vec(), &pattern(EXTRA_SEED, extra_len)),
        None,
        "the child's caller memory read wrong"
    );

    // And the read-only region (REMOTE_READ allows it).
    let ro_copy = e.allocate(RO_LEN, Location::Any).unwrap();
    rdma_transfer(&e, p, &[Op::read(ro_copy.addr(), t.ro, RO_LEN as u64)]);
    assert_eq!(
        first_difference(&ro_copy.to_vec(), &pattern(RO_SEED, RO_LEN)),
        None,
        "the child's read-only region read wrong"
    );

    let stats = e.stats();
    assert!(
        stats.bytes_moved >= (2 * PAGES * PAGE + extra_len + RO_LEN) as u64,
        "{stats:?}"
    );
    assert_eq!(stats.batches_failed, 0, "{stats:?}");
    println!("over rdma, two processes: {stats:?}");
    t.assert_alive();
}

/// Test 2: WRITEs the child does not allow are refused at submit, before anything moves:
/// into its region without REMOTE_WRITE (`AccessDenied`), to memory it never registered
/// (`NotRegistered`), alone or behind a valid op. Its buffers are unchanged, it is alive,
/// and the peer still carries a valid WRITE afterwards.
#[test]
fn writes_the_child_does_not_allow_are_refused() {
    let Some(_serial) = in_vm("writes_the_child_does_not_allow_are_refused") else {
        return;
    };
    const LEN: usize = 1 << 20;
    const SEED: u64 = 77;
    let mut t = Target::spawn(Spec {
        rw_len: LEN,
        rw_seed: Some(SEED),
        ..Spec::default()
    });
    let e = rdma_engine(INITIATOR_NIC);
    let src = e.allocate(LEN, Location::Any).unwrap();
    let new = pattern(SEED + 1, LEN);
    src.write_at(0, &new).unwrap();
    let p = e.open_peer(&t.session).unwrap();
    assert_eq!(e.peer_transport(p).unwrap(), TransportKind::Rdma);
    let rw_before = pattern(SEED, LEN);
    assert_eq!(t.hash("rw", 0, LEN), digest(&rw_before));
    let ro_before = t.hash("ro", 0, RO_LEN);
    assert_eq!(ro_before, digest(&pattern(RO_SEED, RO_LEN)));

    let good = Op::write(src.addr(), t.rw, LEN as u64);
    let to_ro = Op::write(src.addr(), t.ro, 4096);
    let to_unreg = Op::write(src.addr(), t.unreg + 4096, 4096);
    let mut refused = 0;

    // No REMOTE_WRITE on the region: alone, and as op 1 behind a valid op 0.
    for (ops, op) in [(vec![to_ro], 0), (vec![good, to_ro], 1)] {
        match e.submit(p, &ops) {
            Err(Error::AccessDenied {
                op: o,
                side: Side::Remote,
                need,
                ..
            }) if o == op && need.contains(Access::REMOTE_WRITE) => {}
            other => panic!("WRITE into the read-only region: {other:?}"),
        }
        refused += 1;
    }
    // Never registered by the child: alone, and as op 1 behind a valid op 0.
    for (ops, op) in [(vec![to_unreg], 0), (vec![good, to_unreg], 1)] {
        match e.submit(p, &ops) {
            Err(Error::NotRegistered {
                op: o,
                side: Side::Remote,
                ..
            }) if o == op => {}
            other => panic!("WRITE to unregistered memory: {other:?}"),
        }
        refused += 1;
    }
    // Nothing was created, nothing moved.
    let stats = e.stats();
    assert_eq!(stats.submits_refused, refused, "{stats:?}");
    assert_eq!(stats.batches_submitted, 0, "{stats:?}");
    assert_eq!(stats.bytes_moved, 0, "{stats:?}");
    assert_eq!(e.live_batches(), 0);
    t.assert_rw(&rw_before, "after the refused WRITEs");
    assert_eq!(
        t.hash("ro", 0, RO_LEN),
        ro_before,
        "the read-only region changed"
    );
    t.assert_alive();

    // The peer still works: the valid op alone goes over RDMA and lands.
    rdma_transfer(&e, p, &[good]);
    t.assert_rw(&new, "after the valid WRITE");
    assert_eq!(
        t.hash("ro", 0, RO_LEN),
        ro_before,
        "the read-only region changed"
    );
    t.assert_alive();
}

/// Size of the child's region in the cut tests, and of each op cycling over it.
const LINK_REGION: usize = 64 << 20;
const LINK_OP: usize = 1 << 20;
/// The link-down batch's deadline (after submission), and how much later it may end.
const LINK_DEADLINE: Duration = Duration::from_secs(15);
const LINK_GRACE: Duration = Duration::from_secs(3);

/// WRITEs of `len` bytes as 1 MiB ops from `local` cycling over the child's region at
/// `remote` (later ops overwrite earlier ones: only the timing matters here).
fn cycling_writes(local: u64, remote: u64, len: usize) -> Vec<Op> {
    (0..len / LINK_OP)
        .map(|i| {
            let at = ((i * LINK_OP) % LINK_REGION) as u64;
            Op::write(local + at, remote + at, LINK_OP as u64)
        })
        .collect()
}

/// A batch in flight, cut off from the child.
struct Cutting {
    id: BatchId,
    guard: CutGuard,
    submitted: Instant,
    cut_at: Instant,
}

/// Submits `total` bytes of cycling WRITEs from `local` (not zero) into the child's `rw`
/// region (zero at its start) with `deadline`, and makes `cut` once the child sees the
/// first bytes land.
fn submit_and_cut(
    e: &Engine,
    p: kvxfer::PeerId,
    t: &mut Target,
    local: u64,
    total: usize,
    deadline: Instant,
    cut: Cut,
) -> Cutting {
    assert!(
        t.bytes("rw", 0, 4096).iter().all(|&b| b == 0),
        "the region is not zero"
    );
    let submitted = Instant::now();
    let id = e
        .submit_with_deadline(p, &cycling_writes(local, t.rw, total), deadline)
        .unwrap();
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Rdma);
    // Bytes flow (the first op's first page landed at the child), then the cut.
    let landed = t.ask("wait-landed rw 0 4096 10000");
    assert!(landed.starts_with("landed "), "child: {landed}");
    let state = e.status(id).unwrap();
    assert!(
        !state.is_finished(),
        "the batch ended before the cut: {state:?}"
    );
    let guard = CutGuard::take(cut).unwrap_or_else(|e| panic!("{cut:?}: {e}"));
    Cutting {
        id,
        guard,
        submitted,
        cut_at: Instant::now(),
    }
}

/// The queue pairs as the kernel lists them (for a hang's report).
fn queue_pairs() -> String {
    Command::new("rdma")
        .args(["resource", "show", "qp"])
        .output()
        .map_or_else(
            |e| e.to_string(),
            |o| String::from_utf8_lossy(&o.stdout).into(),
        )
}

/// What [`write_through_cut`] saw.
struct CutRun {
    /// How the batch ended.
    state: BatchState,
    /// When `wait` returned, and its deadline.
    ended_at: Instant,
    deadline: Instant,
    /// From the cut to the end of the batch.
    took: Duration,
}

/// With a child of a 64 MiB region opened by `e` (on the initiator's NIC): measures the
/// WRITE rate (one pass of zeros over the region, so its first bytes stay zero), submits
/// a batch sized to run about 8 s uncut with a deadline `deadline_in` after submission,
/// makes `cut` once the child sees the first bytes land, waits for the batch (bounded
/// from outside: a hang fails the test) and undoes the cut (ports ACTIVE). The batch is
/// freed.
fn write_through_cut(
    e: &Arc<Engine>,
    p: kvxfer::PeerId,
    t: &mut Target,
    cut: Cut,
    deadline_in: Duration,
) -> CutRun {
    // How long the batch would run uncut.
    const RUN: Duration = Duration::from_secs(8);
    let src = e.allocate(LINK_REGION, Location::Any).unwrap();

    let start = Instant::now();
    rdma_transfer(e, p, &cycling_writes(src.addr(), t.rw, LINK_REGION));
    let rate = LINK_REGION as f64 / start.elapsed().as_secs_f64();
    let total = ((rate * RUN.as_secs_f64()) as usize / LINK_OP * LINK_OP).clamp(256 << 20, 2 << 30);
    println!(
        "{cut:?}: WRITE rate {:.1} MB/s, so a batch of {} MiB in {} ops of 1 MiB",
        rate / 1e6,
        total >> 20,
        total / LINK_OP
    );
    let moved_before = e.stats().bytes_moved;

    src.fill(0, LINK_REGION, 0xa5).unwrap();
    let deadline = Instant::now() + deadline_in;
    let mut c = submit_and_cut(e, p, t, src.addr(), total, deadline, cut);
    let limit = deadline.saturating_duration_since(c.cut_at) + LINK_GRACE;
    let Some((state, ended_at)) = wait_bounded(e, c.id, limit) else {
        let qps = queue_pairs();
        // A hang: keep the engine (held by the waiting thread) and the source buffer
        // alive, so that no drop blocks on the stuck batch; the guards undo the cut and
        // kill the child.
        std::mem::forget(src);
        panic!(
            "{cut:?}: the batch did not end within {limit:?} after the cut (deadline \
             {deadline_in:?} after submission, + {LINK_GRACE:?}); status now {:?}; queue \
             pairs:\n{qps}",
            e.status(c.id)
        );
    };
    let took = ended_at.saturating_duration_since(c.cut_at);
    let port_then = port_state(INITIATOR_NIC);
    let restored = c.guard.restore();
    println!(
        "{cut:?}: cut {:?} after submission ({total} bytes batch, deadline {deadline_in:?}); \
         the batch ended {state:?} {took:?} later ({} of {total} bytes moved; \
         {INITIATOR_NIC} port then: {port_then}); cut undone, ports ACTIVE after \
         {restored:?}",
        c.cut_at - c.submitted,
        e.stats().bytes_moved - moved_before,
    );
    e.free(c.id).unwrap();
    assert_eq!(e.live_batches(), 0);
    restored.expect("the cut is undone");
    CutRun {
        state,
        ended_at,
        deadline,
        took,
    }
}

/// The batch of a [`CutRun`] ended, Failed or TimedOut, by its deadline plus the grace.
fn assert_ended_in_time(run: &CutRun, cut: Cut) {
    assert!(
        matches!(run.state, BatchState::Failed(_) | BatchState::TimedOut),
        "{cut:?}: the batch ended {:?}",
        run.state
    );
    assert!(
        run.ended_at <= run.deadline + LINK_GRACE,
        "{cut:?}: the batch ended {:?} after the cut, {:?} past its deadline",
        run.took,
        run.ended_at.saturating_duration_since(run.deadline)
    );
}

/// Test 3: the initiator's link goes down in the middle of a large WRITE batch; the batch
/// ends (Failed or TimedOut) by its deadline plus a few seconds, and never hangs. After
/// the link is back, the same peer (reconnected) and a fresh engine both reach the child
/// again.
#[test]
fn link_down_mid_batch_ends_the_batch_by_its_deadline() {
    let Some(_serial) = in_vm("link_down_mid_batch_ends_the_batch_by_its_deadline") else {
        return;
    };
    wait_ports_active(Duration::from_secs(5)).expect("both ports ACTIVE before the test");
    let mut t = Target::spawn(Spec {
        rw_len: LINK_REGION,
        ..Spec::default()
    });
    let e = Arc::new(rdma_engine(INITIATOR_NIC));
    let p = e.open_peer(&t.session).unwrap();
    let run = write_through_cut(&e, p, &mut t, Cut::LinkDown, LINK_DEADLINE);
    assert_ended_in_time(&run, Cut::LinkDown);
    t.assert_alive();

    // The same peer: its link reconnects (new queue pairs) and carries a batch again.
    let page = e.allocate(LINK_OP, Location::Any).unwrap();
    let image = pattern(3, LINK_OP);
    page.write_at(0, &image).unwrap();
    let write = Op::write(page.addr(), t.rw, LINK_OP as u64);
    let id = e
        .submit(p, &[write])
        .expect("a batch on the peer after the link came back");
    assert_eq!(e.batch_transport(id).unwrap(), TransportKind::Rdma);
    match wait_bounded(&e, id, Duration::from_secs(20)) {
        Some((state, _)) => {
            e.free(id).unwrap();
            assert_completed(state);
        }
        None => {
            std::mem::forget(page);
            panic!("a batch on the peer after the link came back hangs");
        }
    }
    assert_eq!(t.hash("rw", 0, LINK_OP), digest(&image));

    // A fresh initiator on the same NIC as well.
    let fresh = rdma_engine(INITIATOR_NIC);
    let src = fresh.allocate(LINK_OP, Location::Any).unwrap();
    let image = pattern(4, LINK_OP);
    src.write_at(0, &image).unwrap();
    let q = fresh.open_peer(&t.session).unwrap();
    rdma_transfer(&fresh, q, &[Op::write(src.addr(), t.rw, LINK_OP as u64)]);
    assert_eq!(t.hash("rw", 0, LINK_OP), digest(&image));
    t.assert_alive();
}

/// Test 4: packets to the child are silently lost mid-batch (ports stay up; only the
/// NIC's retransmission could notice, and rxe retries without limit at `retry_cnt` 7):
/// the batch still ends by its deadline (5 s here) plus a few seconds, since the engine
/// flushes the queue pair of a stopped batch.
#[test]
fn silent_loss_mid_batch_ends_the_batch_by_its_deadline() {
    let Some(_serial) = in_vm("silent_loss_mid_batch_ends_the_batch_by_its_deadline") else {
        return;
    };
    wait_ports_active(Duration::from_secs(5)).expect("both ports ACTIVE before the test");
    let mut t = Target::spawn(Spec {
        rw_len: LINK_REGION,
        ..Spec::default()
    });
    let e = Arc::new(rdma_engine(INITIATOR_NIC));
    let p = e.open_peer(&t.session).unwrap();
    let run = write_through_cut(&e, p, &mut t, Cut::SilentLoss, Duration::from_secs(5));
    assert_ended_in_time(&run, Cut::SilentLoss);
    t.assert_alive();
}

/// A batch the engine stops while the NIC holds its requests (packets silently lost) ends
/// as it was stopped: `TimedOut` once the deadline passed (`Engine::wait`), `Cancelled`
/// after `Engine::cancel`, although the queue pair's flush fails the requests. (It ended
/// `Failed` with "work completion status 5" before a failure after a stop counted as the
/// stop.)
#[test]
fn a_stopped_batch_reports_why_it_was_stopped() {
    let Some(_serial) = in_vm("a_stopped_batch_reports_why_it_was_stopped") else {
        return;
    };
    wait_ports_active(Duration::from_secs(5)).expect("both ports ACTIVE before the test");
    let e = Arc::new(rdma_engine(INITIATOR_NIC));
    let src = e.allocate(LINK_REGION, Location::Any).unwrap();
    src.fill(0, LINK_REGION, 0xa5).unwrap();
    let mut ended = Vec::new();
    for cancel in [false, true] {
        // A fresh child each time: its region starts zero, so the first bytes show.
        let mut t = Target::spawn(Spec {
            rw_len: LINK_REGION,
            ..Spec::default()
        });
        let p = e.open_peer(&t.session).unwrap();
        let deadline = Instant::now() + Duration::from_secs(if cancel { 60 } else { 3 });
        let c = submit_and_cut(
            &e,
            p,
            &mut t,
            src.addr(),
            256 << 20,
            deadline,
            Cut::SilentLoss,
        );
        let limit = Duration::from_secs(10);
        let Some((state, at)) = end_bounded(&e, c.id, limit, cancel) else {
            let qps = queue_pairs();
            std::mem::forget(src);
            panic!("the stopped batch (cancel: {cancel}) hangs; queue pairs:\n{qps}");
        };
        println!(
            "{}: ended {state:?} {:?} after the cut",
            if cancel { "cancel" } else { "deadline" },
            at.saturating_duration_since(c.cut_at)
        );
        e.free(c.id).unwrap();
        drop(c.guard);
        ended.push(state);
    }
    assert!(
        matches!(ended[..], [BatchState::TimedOut, BatchState::Cancelled]),
        "a batch stopped at its deadline, then one cancelled, ended {ended:?}"
    );
}
