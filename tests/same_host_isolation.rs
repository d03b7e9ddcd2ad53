//! Same-host isolation with real processes: the same-host transport (shm) must be used only
//! where it is proven, and must fall back to TCP, not fail, where it is not.
//!
//! - `peer_in_another_network_namespace_is_not_same_host`: two containers that share a
//!   hostname and a kernel (same boot id) but not a network namespace must not be treated
//!   as one host. A target child runs in a network namespace created here (joined to ours
//!   by a veth pair on a private /30); the test's own engine opens it: the peer is `Tcp`,
//!   its shm note says the socket could not be reached, and WRITEs into the child's
//!   engine-allocated buffer (which would be shared if the host were proven) and into its
//!   caller memory go over TCP and land byte for byte. Needs root and iproute2's `ip`;
//!   without either it prints `skipped: ...` and passes. A `Netns` guard kills the child
//!   and deletes the namespace and the veth pair on drop, panics included.
//! - `refused_cross_memory_attach_sends_caller_memory_over_tcp`: a target child and an
//!   initiator child, both under uid/gid 65534 (no capabilities, so no `CAP_SYS_PTRACE`);
//!   the target makes itself non-dumpable, so the kernel refuses `process_vm_readv` of it.
//!   The initiator still proves the host (peer `Shm`), its shm note says the kernel does
//!   not permit cross-memory attach, a WRITE into the target's caller-registered memory
//!   goes over TCP and one into its engine-allocated (memfd) buffer over shm; the target's
//!   digests of both regions are checked. Needs root (to switch uid) and a test binary that
//!   uid 65534 may execute; otherwise prints `skipped: ...` and passes.
//!
//! Child roles: this binary re-executes itself with `KVX_ISOLATION_CHILD=<role>` and the
//! test-harness arguments `--exact isolation_child_entry`, so the child runs only that
//! entry point (which does nothing in a normal run). Commands go to the child's stdin, one
//! per line; the child answers on stdout with lines starting `KVXISO ` (libtest prints its
//! own lines there too; only marked lines are read). Reading an answer is the only
//! synchronisation; a `Kid` guard kills and reaps its child on drop.
//!
//! - `target` (listens on `KVX_ISOLATION_LISTEN`; with `KVX_ISOLATION_NONDUMPABLE=1` it
//!   first calls `prctl(PR_SET_DUMPABLE, 0)`): leaks a zeroed caller allocation, starts an
//!   engine (`[Shm, Tcp]`), allocates `buf` (`Engine::allocate`, memfd) and registers
//!   `caller` (`Engine::register`), both `REGION_LEN` bytes, then prints
//!   `ready <session> <buf addr> <caller addr> <uid> <dumpable> <CapEff>` and serves
//!   - `ping` → `pong`
//!   - `hash <buf|caller> <offset> <len>` → `hash <digest, 16 hex digits>`
//!   - `exit` or end of input: ends.
//! - `initiator` (listens on `KVX_ISOLATION_LISTEN`): starts an engine (`[Shm, Tcp]`),
//!   prints `ready <uid> <CapEff>` and serves
//!   - `open <session>` → `opened <peer transport> <shm note, or ->` (the note is the rest
//!     of the line) or `open-failed <error>`
//!   - `write <remote addr> <len> <seed>` (to the peer opened last) → `wrote <batch
//!     transport or -> <completed | how it ended>`
//!   - `exit` or end of input: ends.

mod common;
use common::{digest, pattern};

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kvxfer::{Access, BatchState, Engine, EngineConfig, Location, Op, PeerId, TransportKind};

/// Set (to the role) in the environment of a child.
const CHILD_ENV: &str = "KVX_ISOLATION_CHILD";
/// Where a child's engine listens (`ip:0`).
const LISTEN_ENV: &str = "KVX_ISOLATION_LISTEN";
/// `1`: the target makes itself non-dumpable before anything else.
const NONDUMPABLE_ENV: &str = "KVX_ISOLATION_NONDUMPABLE";
/// Name of the child entry point, as the test harness filters it.
const ENTRY: &str = "isolation_child_entry";
/// Marks the child's protocol lines on its stdout.
const MARK: &str = "KVXISO ";
/// Bytes of each of the target's regions (and of each WRITE).
const REGION_LEN: usize = 1 << 20;
/// How long any answer of a child may take before the test fails.
const ANSWER: Duration = Duration::from_secs(30);
/// How long a batch may take.
const LONG: Duration = Duration::from_secs(30);
/// The unprivileged uid and gid both children of the cross-memory-attach test run as.
const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------------------
// The children
// ---------------------------------------------------------------------------------------

/// Entry point of the child processes: does nothing unless `KVX_ISOLATION_CHILD` is set.
#[test]
fn isolation_child_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    match role.as_str() {
        "target" => run_target(),
        "initiator" => run_initiator(),
        other => panic!("unknown child role {other:?}"),
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A leading newline: libtest may have printed "test isolation_child_entry ... "
    // without one. Protocol lines never span lines.
    writeln!(out, "\n{MARK}{}", line.replace('\n', " ")).expect("stdout");
    out.flush().expect("stdout");
}

/// Effective capabilities of this process (`CapEff` of /proc/self/status, hex).
fn cap_eff() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn uid() -> u32 {
    // SAFETY: getuid takes no arguments and cannot fail.
    unsafe { libc::getuid() }
}

/// An engine of a child: listens on `KVX_ISOLATION_LISTEN`, shm preferred over TCP.
fn child_engine() -> Engine {
    let listen = std::env::var(LISTEN_ENV).expect("KVX_ISOLATION_LISTEN");
    let config = EngineConfig::builder()
        .listen(Some(&listen))
        .transports(&[TransportKind::Shm, TransportKind::Tcp])
        .batch_timeout(LONG)
        .build()
        .expect("child config");
    Engine::new(config).unwrap_or_else(|e| panic!("child engine on {listen} starts: {e}"))
}

fn run_target() {
    if std::env::var(NONDUMPABLE_ENV).is_ok_and(|v| v == "1") {
        // SAFETY: PR_SET_DUMPABLE takes integer arguments only and touches no memory of
        // ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        assert_eq!(
            rc,
            0,
            "prctl(PR_SET_DUMPABLE, 0): {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    // Caller memory: a leaked allocation, valid (and never freed) for the whole process,
    // made before the engine.
    let caller = Box::into_raw(vec![0u8; REGION_LEN].into_boxed_slice()) as *mut u8;
    let engine = child_engine();
    let buf = engine
        .allocate(REGION_LEN, Location::Any)
        .unwrap_or_else(|e| panic!("target: allocate (memfd) as uid {}: {e}", uid()));
    // SAFETY: `caller` is a leaked allocation of REGION_LEN bytes, valid for reads and
    // writes for the rest of the process; this process only reads it (in `hash`) while
    // no batch of a peer writes it (the test waits for its batches first).
    unsafe { engine.register(caller as u64, REGION_LEN as u64, None, Access::ALL) }
        .unwrap_or_else(|e| panic!("target: register caller memory: {e}"));
    let session = engine.session_id().expect("listens").to_string();
    say(&format!(
        "ready {session} {} {} {} {dumpable} {}",
        buf.addr(),
        caller as u64,
        uid(),
        cap_eff()
    ));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["ping"] => say("pong"),
            ["hash", which, offset, len] => {
                let offset: usize = offset.parse().expect("offset");
                let len: usize = len.parse().expect("len");
                assert!(offset + len <= REGION_LEN, "hash outside the region");
                let mut out = vec![0u8; len];
                match *which {
                    "buf" => buf.read_at(offset, &mut out).expect("inside buf"),
                    // SAFETY: the range lies inside the leaked allocation (checked above);
                    // no batch writes it now (see the registration).
                    "caller" => unsafe {
                        std::ptr::copy_nonoverlapping(caller.add(offset), out.as_mut_ptr(), len)
                    },
                    other => panic!("target: no region {other:?}"),
                }
                say(&format!("hash {:016x}", digest(&out)));
            }
            ["exit"] => break,
            _ => panic!("target: unknown command {line:?}"),
        }
    }
}

fn run_initiator() {
    let engine = child_engine();
    say(&format!("ready {} {}", uid(), cap_eff()));
    let mut peer: Option<PeerId> = None;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["open", session] => match engine.open_peer(session) {
                Ok(p) => {
                    peer = Some(p);
                    let transport = engine.peer_transport(p).expect("peer_transport");
                    let note = engine.peer_shm_note(p).expect("peer_shm_note");
                    say(&format!(
                        "opened {transport} {}",
                        note.as_deref().unwrap_or("-")
                    ));
                }
                Err(e) => say(&format!("open-failed {e}")),
            },
            ["write", remote, len, seed] => {
                let p = peer.expect("write before open");
                let (transport, outcome) = write_pattern(
                    &engine,
                    p,
                    remote.parse().expect("remote"),
                    len.parse().expect("len"),
                    seed.parse().expect("seed"),
                );
                say(&format!("wrote {transport} {outcome}"));
            }
            ["exit"] => break,
            _ => panic!("initiator: unknown command {line:?}"),
        }
    }
}

/// WRITEs `pattern(seed, len)` from a fresh buffer of `e` to `remote` of peer `p` and
/// waits: (the batch's transport, or `-` when submit refused it; `completed` or how the
/// batch ended).
fn write_pattern(e: &Engine, p: PeerId, remote: u64, len: usize, seed: u64) -> (String, String) {
    let src = e.allocate(len, Location::Any).expect("source buffer");
    src.write_at(0, &pattern(seed, len)).expect("fits");
    let id = match e.submit(p, &[Op::write(src.addr(), remote, len as u64)]) {
        Ok(id) => id,
        Err(err) => return ("-".into(), format!("submit refused: {err}")),
    };
    let transport = e
        .batch_transport(id)
        .map_or_else(|err| format!("?({err})"), |k| k.to_string());
    let outcome = match e.wait(id, LONG) {
        Ok(BatchState::Completed) => "completed".to_string(),
        Ok(other) => format!("ended {other:?}"),
        Err(err) => format!("wait failed: {err}"),
    };
    let _ = e.free(id);
    (transport, outcome)
}

// ---------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------

/// A running child; killed (SIGKILL) and reaped on drop.
struct Kid {
    role: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Kid {
    /// Starts `program args...`, which must end up executing this binary as the child
    /// `role` (`extra_env` added to its environment), and returns it once it has started.
    fn spawn(
        role: &'static str,
        mut cmd: Command,
        listen: &str,
        extra_env: &[(&str, &str)],
    ) -> Kid {
        // The children's configuration must be what the test says: no KVX_* overrides
        // from the environment of the test run.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KVX_") {
                cmd.env_remove(name);
            }
        }
        cmd.env(CHILD_ENV, role)
            .env(LISTEN_ENV, listen)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {role} child ({cmd:?}): {e}"));
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
        Kid {
            role,
            child,
            stdin,
            lines,
        }
    }

    /// The child's next protocol line.
    fn answer(&mut self) -> String {
        match self.lines.recv_timeout(ANSWER) {
            Ok(line) => line,
            Err(e) => panic!(
                "no answer from the {} child {} ({e}); its exit status: {:?}",
                self.role,
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

    fn hash(&mut self, which: &str, len: usize) -> u64 {
        let a = self.ask(&format!("hash {which} 0 {len}"));
        let h = a.strip_prefix("hash ").unwrap_or_else(|| panic!("{a:?}"));
        u64::from_str_radix(h, 16).expect("hex digest")
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command that re-executes this binary so that it runs only the child entry point.
fn self_command(program: impl Into<OsString>, before: &[OsString]) -> Command {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(program.into());
    cmd.args(before)
        .arg(exe)
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"]);
    cmd
}

/// What a target child reported when ready.
#[derive(Debug)]
struct TargetInfo {
    session: String,
    buf: u64,
    caller: u64,
    uid: u32,
    dumpable: i32,
    cap_eff: String,
}

fn target_ready(kid: &mut Kid) -> TargetInfo {
    let ready = kid.answer();
    let f: Vec<&str> = ready.split_whitespace().collect();
    assert!(
        f.len() == 7 && f[0] == "ready",
        "unexpected first line of the target: {ready:?}"
    );
    TargetInfo {
        session: f[1].to_string(),
        buf: f[2].parse().expect("buf"),
        caller: f[3].parse().expect("caller"),
        uid: f[4].parse().expect("uid"),
        dumpable: f[5].parse().expect("dumpable"),
        cap_eff: f[6].to_string(),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Says on the real stderr (not libtest's capture, which hides a passing test's output)
/// why `test` did not run.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "skipped: {test}: {why}");
}

// ---------------------------------------------------------------------------------------
// A network namespace joined to ours by a veth pair
// ---------------------------------------------------------------------------------------

/// Runs `ip args...`; panics with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Whether iproute2's `ip` can be run.
fn have_ip() -> bool {
    Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace named after this process, a veth pair between it and ours on a
/// private /30, and the child running in it. On drop (panics included) kills the child,
/// then deletes the veth pair and the namespace.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_addr: String,
    ns_addr: String,
    ns_created: bool,
    link_created: bool,
    child: Option<Kid>,
}

impl Netns {
    fn create() -> Netns {
        let pid = std::process::id();
        // 14 bits of the pid pick the /30 in 10.231.0.0/16: runs at the same time (other
        // pids) almost never share a subnet, and interface names stay ≤ 15 characters
        // (pids have at most 7 digits).
        let (third, fourth) = ((pid >> 6) & 0xff, (pid & 0x3f) << 2);
        let mut ns = Netns {
            name: format!("kvxiso-{pid}"),
            host_if: format!("kvxh{pid}"),
            ns_if: format!("kvxn{pid}"),
            host_addr: format!("10.231.{third}.{}", fourth + 1),
            ns_addr: format!("10.231.{third}.{}", fourth + 2),
            ns_created: false,
            link_created: false,
            child: None,
        };
        assert!(ns.host_if.len() <= 15 && ns.ns_if.len() <= 15);
        ip(&["netns", "add", &ns.name]);
        ns.ns_created = true;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ]);
        ns.link_created = true;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.ns_addr),
            "dev",
            &ns.ns_if,
        ]);
        ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The child running in the namespace.
    fn child(&mut self) -> &mut Kid {
        self.child.as_mut().expect("a child in the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The child first: a namespace lives on while a process is in it.
        drop(self.child.take());
        let run = |args: &[&str]| match Command::new("ip").args(args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cleanup: ip {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("cleanup: cannot run ip {}: {e}", args.join(" ")),
        };
        // Deleting our end deletes the pair (its other end may already be gone with the
        // namespace; then there is nothing to delete).
        if self.link_created {
            run(&["link", "del", &self.host_if]);
        }
        if self.ns_created {
            run(&["netns", "del", &self.name]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Two containers that share a hostname and a kernel but not a network namespace must not
/// be treated as one host: the peer's abstract socket is out of reach, so the peer is TCP,
/// and even its engine-allocated (memfd) buffer is written over TCP.
#[test]
fn peer_in_another_network_namespace_is_not_same_host() {
    const TEST: &str = "peer_in_another_network_namespace_is_not_same_host";
    if !is_root() {
        return skip(TEST, "needs root to create a network namespace");
    }
    if !have_ip() {
        return skip(TEST, "needs the `ip` command (iproute2)");
    }
    let mut ns = Netns::create();
    let cmd = self_command(
        "ip",
        &["netns".into(), "exec".into(), ns.name.clone().into()],
    );
    let listen = format!("{}:0", ns.ns_addr);
    ns.child = Some(Kid::spawn("target", cmd, &listen, &[]));
    let t = target_ready(ns.child());
    assert!(
        t.session.starts_with(&format!("{}:", ns.ns_addr)),
        "the target listens on {} (not {listen}): did its environment reach it? {t:?}",
        t.session
    );

    // Declared after the namespace guard, so it is dropped before the veth goes.
    let config = EngineConfig::builder()
        .listen(Some(&format!("{}:0", ns.host_addr)))
        .transports(&[TransportKind::Shm, TransportKind::Tcp])
        .batch_timeout(LONG)
        .build()
        .expect("config");
    let e = Engine::new(config).expect("engine starts");
    assert!(
        e.config().transports.contains(&TransportKind::Shm),
        "KVX_TRANSPORTS in the environment leaves shm out ({:?}): this test would prove nothing",
        e.config().transports
    );
    let p = e
        .open_peer(&t.session)
        .expect("open the target over the veth");
    let note = e.peer_shm_note(p).unwrap();
    assert_eq!(
        e.peer_transport(p).unwrap(),
        TransportKind::Tcp,
        "a peer in another network namespace was taken for this host (note: {note:?})"
    );
    let note = note.expect("a peer on TCP says why it does not use shm");
    assert!(
        note.contains("cannot reach its socket"),
        "the shm note does not say the socket was out of reach: {note}"
    );
    assert!(
        e.peer_regions(p)
            .unwrap()
            .iter()
            .any(|r| r.addr == t.buf && r.len == REGION_LEN as u64),
        "the target's buffer is not published"
    );

    for (which, remote, seed) in [("buf", t.buf, 0x15_0001), ("caller", t.caller, 0x15_0002)] {
        let (transport, outcome) = write_pattern(&e, p, remote, REGION_LEN, seed);
        assert_eq!(outcome, "completed", "WRITE into the target's {which}");
        assert_eq!(transport, "tcp", "WRITE into the target's {which}");
        assert_eq!(
            ns.child().hash(which, REGION_LEN),
            digest(&pattern(seed, REGION_LEN)),
            "the target's {which} does not hold what was written"
        );
    }
    assert_eq!(ns.child().ask("ping"), "pong");
}

/// Why uid/gid `NOBODY` cannot execute `path` (every directory on the way searchable, the
/// file executable, by mode bits), or `None` when it can.
fn not_executable_by_nobody(path: &Path) -> Option<String> {
    let can = |p: &Path, bit: u32| -> Result<bool, String> {
        let m = std::fs::metadata(p).map_err(|e| format!("cannot stat {}: {e}", p.display()))?;
        let shift = if m.uid() == NOBODY {
            6
        } else if m.gid() == NOBODY {
            3
        } else {
            0
        };
        Ok(m.mode() >> shift & bit != 0)
    };
    let path = match path.canonicalize() {
        Ok(p) => p,
        Err(e) => return Some(format!("cannot resolve {}: {e}", path.display())),
    };
    for dir in path.ancestors().skip(1) {
        match can(dir, 0o1) {
            Ok(true) => {}
            Ok(false) => {
                return Some(format!(
                    "directory {} is not searchable by uid {NOBODY} (mode bits)",
                    dir.display()
                ))
            }
            Err(e) => return Some(e),
        }
    }
    match can(&path, 0o1) {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{} is not executable by uid {NOBODY}",
            path.display()
        )),
        Err(e) => Some(e),
    }
}

/// Both processes run as an unprivileged uid and the target is not dumpable, so the kernel
/// refuses cross-memory attach: the host is still proven (shm), but the target's
/// caller-owned memory is written over TCP while its engine-allocated memory goes over shm.
#[test]
fn refused_cross_memory_attach_sends_caller_memory_over_tcp() {
    const TEST: &str = "refused_cross_memory_attach_sends_caller_memory_over_tcp";
    if !is_root() {
        return skip(TEST, "needs root to run its children as another uid");
    }
    let exe = std::env::current_exe().expect("test binary");
    if let Some(why) = not_executable_by_nobody(&exe) {
        return skip(
            TEST,
            &format!(
                "the children run as uid {NOBODY}, which cannot execute the test binary: {why}"
            ),
        );
    }
    let unprivileged = |role: &'static str, extra: &[(&str, &str)]| {
        let mut cmd = self_command(exe.clone(), &[]);
        cmd.uid(NOBODY).gid(NOBODY);
        Kid::spawn(role, cmd, "127.0.0.1:0", extra)
    };

    let mut target = unprivileged("target", &[(NONDUMPABLE_ENV, "1")]);
    let t = target_ready(&mut target);
    assert_eq!(t.uid, NOBODY, "the target does not run as uid {NOBODY}");
    assert_eq!(t.dumpable, 0, "the target is still dumpable");
    assert!(
        t.cap_eff.chars().all(|c| c == '0'),
        "the target kept capabilities: CapEff {}",
        t.cap_eff
    );

    let mut init = unprivileged("initiator", &[]);
    let ready = init.answer();
    let f: Vec<&str> = ready.split_whitespace().collect();
    assert!(
        f.len() == 3 && f[0] == "ready",
        "unexpected first line of the initiator: {ready:?}"
    );
    assert_eq!(f[1], NOBODY.to_string(), "the initiator's uid");
    assert!(
        f[2].chars().all(|c| c == '0'),
        "the initiator kept capabilities (CAP_SYS_PTRACE would make the refusal moot): CapEff {}",
        f[2]
    );

    let opened = init.ask(&format!("open {}", t.session));
    let (transport, note) = opened
        .strip_prefix("opened ")
        .and_then(|rest| rest.split_once(' '))
        .unwrap_or_else(|| panic!("the initiator could not open the target: {opened}"));
    assert_eq!(
        transport, "shm",
        "same host, same uid: the host should be proven (note: {note})"
    );
    assert!(
        note.contains("caller-owned memory") && note.contains("the kernel does not permit it"),
        "the shm note does not say the kernel refused cross-memory attach: {note}"
    );

    // Caller memory: reachable only by cross-memory attach, which is refused: TCP.
    let wrote = init.ask(&format!("write {} {REGION_LEN} {}", t.caller, 0x15_0003));
    assert_eq!(
        wrote, "wrote tcp completed",
        "WRITE into the target's caller memory"
    );
    // Engine-allocated memory: its memfd is mapped here, no cross-memory attach needed.
    let wrote = init.ask(&format!("write {} {REGION_LEN} {}", t.buf, 0x15_0004));
    assert_eq!(
        wrote, "wrote shm completed",
        "WRITE into the target's engine-allocated buffer"
    );

    assert_eq!(
        target.hash("caller", REGION_LEN),
        digest(&pattern(0x15_0003, REGION_LEN)),
        "the target's caller memory does not hold what was written"
    );
    assert_eq!(
        target.hash("buf", REGION_LEN),
        digest(&pattern(0x15_0004, REGION_LEN)),
        "the target's buffer does not hold what was written"
    );
    assert_eq!(target.ask("ping"), "pong");
}
