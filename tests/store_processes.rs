//! The L3 store over real processes: store nodes are children of this test binary
//! (re-executed with `KVX_TEST_CHILD=node`, each an engine contributing memory and, in two
//! tests, an SSD tier), clients are the test process and children
//! (`KVX_TEST_CHILD=client`). Everything goes over loopback TCP (the network path), except
//! the one-key race, which uses the engines' default transports (shm between processes).
//!
//! Covered: three nodes shared by two client processes; a node killed (its keys only are
//! lost, and puts re-home); eviction under pressure and reads racing it; reads outliving
//! their lease; one key raced by five writers; bad input and bad members; the SSD tier
//! (demotion under pressure, promotion on a hit); replicas outliving a killed primary.
//!
//! Every value is derived from its key and a seed (`value`), so a reader can tell the
//! right bytes from a misplaced, stale, torn or foreign object; every get here is checked
//! byte for byte.
//!
//! Child protocol: a child prints `KVXSTORE ready [<session>]` once it serves, then
//! answers one `KVXSTORE ...` line per command line on stdin (see `run_client`); a node
//! takes no commands and exits at EOF. Only lines with the marker are parsed (libtest
//! prints its own lines on the same stdout). Reading those lines, reaping a killed child
//! and the store's own answers (its counters, polled with a deadline where housekeeping
//! runs in the background) are the only synchronisation; every wait has a deadline, and a
//! `Proc` guard kills its child on drop, so no test leaks one.

mod common;
use common::{digest, pattern};

use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use kvxfer::store::placement::owners;
use kvxfer::store::{
    ItemError, PutResult, SegmentConfig, Store, StoreConfig, StoreError, StoreStats,
};
use kvxfer::{Access, Buffer, Engine, EngineConfig, Location, TransportKind};

/// Set (to the role) in the environment of a child.
const CHILD_ENV: &str = "KVX_TEST_CHILD";
/// Marks the children's protocol lines on their stdout.
const MARK: &str = "KVXSTORE ";
/// How long any line of a child may take before the test fails (a hung child must not
/// hang the test run).
const ANSWER: Duration = Duration::from_secs(30);
/// How long one store request or transfer may take.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of each client's staging buffers (puts and gets go in chunks of this).
const STAGING: usize = 8 << 20;
/// The usual value: one 64 KiB KV page.
const PAGE: usize = 64 << 10;

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

/// The bytes stored under `key` by a writer using `seed`.
fn value(seed: u64, key: &[u8], size: usize) -> Vec<u8> {
    pattern(seed ^ digest(key), size)
}

/// `tag-i` for each `i` in `range`.
fn keys(tag: &str, range: Range<usize>) -> Vec<Vec<u8>> {
    range.map(|i| format!("{tag}-{i}").into_bytes()).collect()
}

fn refs(keys: &[Vec<u8>]) -> Vec<&[u8]> {
    keys.iter().map(|k| k.as_slice()).collect()
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// What a batch of checked gets found.
#[derive(Debug, Default)]
struct Checked {
    /// The right bytes, and the right length.
    ok: usize,
    /// NotFound.
    missing: Vec<Vec<u8>>,
    /// Bytes (or a length) that are not the key's value: never allowed.
    wrong: Vec<Vec<u8>>,
    /// Any other error.
    failed: Vec<(Vec<u8>, ItemError)>,
}

impl Checked {
    /// One line: `ok=N missing=N wrong=N failed=N first=<first failure or ->`.
    fn line(&self) -> String {
        let first = self
            .wrong
            .first()
            .map(|k| format!("wrong bytes for {}", show(k)))
            .or_else(|| {
                self.failed
                    .first()
                    .map(|(k, e)| format!("{}: {e:?}: {e}", show(k)))
            })
            .unwrap_or_else(|| "-".into());
        format!(
            "ok={} missing={} wrong={} failed={} first={first}",
            self.ok,
            self.missing.len(),
            self.wrong.len(),
            self.failed.len()
        )
    }

    fn assert_all_ok(&self, n: usize, what: &str) {
        assert!(
            self.ok == n && self.missing.is_empty() && self.wrong.is_empty(),
            "{what}: {}",
            self.line()
        );
    }

    fn assert_no_wrong_bytes(&self, what: &str) {
        assert!(self.wrong.is_empty(), "{what}: {}", self.line());
    }
}

/// One line summing put results: `ok=N exists=N failed=N first=<first failure or ->`.
fn put_line(results: &[PutResult]) -> String {
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exists = results
        .iter()
        .filter(|r| **r == Err(ItemError::AlreadyExists))
        .count();
    let first = results
        .iter()
        .find_map(|r| match r {
            Err(ItemError::AlreadyExists) | Ok(()) => None,
            Err(e) => Some(format!("{e:?}: {e}")),
        })
        .unwrap_or_else(|| "-".into());
    format!(
        "ok={ok} exists={exists} failed={} first={first}",
        results.len() - ok - exists
    )
}

// ---------------------------------------------------------------------------------------
// A client (in the test process or in a child)
// ---------------------------------------------------------------------------------------

/// How a client is set up.
#[derive(Clone, Debug)]
struct ClientOpts {
    /// TCP only (else the engine's default transports).
    tcp: bool,
    replicas: usize,
    member_retry: Duration,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            tcp: true,
            replicas: 1,
            member_retry: Duration::from_secs(2),
        }
    }
}

fn engine(tcp: bool) -> Arc<Engine> {
    let mut builder = EngineConfig::builder()
        .listen(Some("127.0.0.1:0"))
        .batch_timeout(Duration::from_secs(20));
    if tcp {
        builder = builder.transports(&[TransportKind::Tcp]);
    }
    Arc::new(Engine::new(builder.build().expect("config")).expect("engine starts"))
}

/// A store client with its own engine and two registered staging buffers.
struct Client {
    // Dropped in this order: the store, the buffers, then the engine.
    store: Store,
    src: Buffer,
    dst: Buffer,
    engine: Arc<Engine>,
}

impl Client {
    fn new(members: &[String], opts: &ClientOpts) -> Client {
        let engine = engine(opts.tcp);
        let store = Store::setup(
            Arc::clone(&engine),
            StoreConfig {
                members: members.to_vec(),
                replicas: opts.replicas,
                timeout: STORE_TIMEOUT,
                member_retry: opts.member_retry,
                ..StoreConfig::default()
            },
        )
        .expect("store client");
        let src = engine.allocate(STAGING, Location::Any).expect("src");
        let dst = engine.allocate(STAGING, Location::Any).expect("dst");
        Client {
            store,
            src,
            dst,
            engine,
        }
    }

    /// Puts each key's `value(seed, key, size)`.
    fn put(&self, keys: &[Vec<u8>], seed: u64, size: usize) -> Vec<PutResult> {
        assert!(size <= STAGING);
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(STAGING / size) {
            let mut ptrs = Vec::with_capacity(chunk.len());
            for (i, key) in chunk.iter().enumerate() {
                self.src
                    .write_at(i * size, &value(seed, key, size))
                    .expect("fits");
                ptrs.push(self.src.addr() + (i * size) as u64);
            }
            let sizes = vec![size as u64; chunk.len()];
            out.extend(
                self.store
                    .batch_put_from(&refs(chunk), &ptrs, &sizes)
                    .expect("put batch"),
            );
        }
        out
    }

    /// Gets each key into a `size`-byte slot; the bytes of each found object.
    fn get(&self, keys: &[Vec<u8>], size: usize) -> Vec<Result<Vec<u8>, ItemError>> {
        assert!(size <= STAGING);
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(STAGING / size) {
            let ptrs: Vec<u64> = (0..chunk.len())
                .map(|i| self.dst.addr() + (i * size) as u64)
                .collect();
            let sizes = vec![size as u64; chunk.len()];
            // Poison the slots: bytes left from an earlier get must not pass as data.
            self.dst.fill(0, chunk.len() * size, 0xee).expect("fits");
            let got = self
                .store
                .batch_get_into(&refs(chunk), &ptrs, &sizes)
                .expect("get batch");
            for (i, r) in got.into_iter().enumerate() {
                out.push(r.map(|len| {
                    let mut bytes = vec![0u8; len as usize];
                    self.dst.read_at(i * size, &mut bytes).expect("inside");
                    bytes
                }));
            }
        }
        out
    }

    /// Gets each key and compares it with `value(seed, key, size)`.
    fn check(&self, keys: &[Vec<u8>], seed: u64, size: usize) -> Checked {
        let mut c = Checked::default();
        for (key, r) in keys.iter().zip(self.get(keys, size)) {
            match r {
                Ok(bytes) if bytes == value(seed, key, size) => c.ok += 1,
                Ok(_) => c.wrong.push(key.clone()),
                Err(ItemError::NotFound) => c.missing.push(key.clone()),
                Err(e) => c.failed.push((key.clone(), e)),
            }
        }
        c
    }

    /// Each member's counters; panics naming a member that cannot be asked.
    fn member_stats(&self) -> Vec<(String, StoreStats)> {
        self.store
            .member_stats()
            .into_iter()
            .map(|(m, s)| {
                let s = s.unwrap_or_else(|e| panic!("stats of {m}: {e}"));
                (m, s)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The children
// ---------------------------------------------------------------------------------------

/// Entry point of the child processes: does nothing unless `KVX_TEST_CHILD` is set.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    match role.as_str() {
        "node" => run_node(),
        "client" => run_client(),
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

fn env_u64(name: &str) -> u64 {
    std::env::var(name).map_or(0, |v| v.parse().expect(name))
}

/// A store node: an engine contributing `KVX_TEST_MEMORY` bytes (0: none, an engine that
/// serves no store), optionally an SSD tier (`KVX_TEST_DISK`, `KVX_TEST_DISK_SIZE`) and
/// leases of `KVX_TEST_LEASE_MS`; serves until stdin reaches EOF.
fn run_node() {
    let tcp = std::env::var("KVX_TEST_TCP").is_ok_and(|v| v == "1");
    let memory = env_u64("KVX_TEST_MEMORY");
    let disk = std::env::var("KVX_TEST_DISK")
        .ok()
        .map(|dir| (PathBuf::from(dir), env_u64("KVX_TEST_DISK_SIZE")));
    let engine = engine(tcp);
    let session = engine.session_id().expect("listens").to_string();
    let store = (memory > 0).then(|| {
        Store::setup(
            Arc::clone(&engine),
            StoreConfig {
                segment: Some(SegmentConfig {
                    memory_bytes: memory,
                    disk,
                    lease: match env_u64("KVX_TEST_LEASE_MS") {
                        0 => SegmentConfig::default().lease,
                        ms => Duration::from_millis(ms),
                    },
                    ..SegmentConfig::default()
                }),
                ..StoreConfig::default()
            },
        )
        .expect("store node")
    });
    say(&format!("ready {session}"));
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_until(0, &mut sink);
    // EOF: stop serving in order (the SSD tier's file is deleted on the way).
    drop(store);
    drop(engine);
}

/// A client child: members in `KVX_TEST_MEMBERS` (comma-separated). Commands and answers:
///
/// - `put <tag> <first> <count> <size> <seed>` → `put <put_line>`
/// - `check <tag> <first> <count> <size> <seed>` → `check <Checked::line>`
/// - `exists <key>...` → `exists <0|1 per key> <prefix>`
/// - `arm <key> <size> <seed>` → `armed` (the value is staged), then `go` → `race ok`,
///   `race exists` or `race failed <error>` (the put of the armed key)
/// - end of input ends the child.
fn run_client() {
    let members: Vec<String> = std::env::var("KVX_TEST_MEMBERS")
        .expect("KVX_TEST_MEMBERS")
        .split(',')
        .map(str::to_string)
        .collect();
    let opts = ClientOpts {
        tcp: std::env::var("KVX_TEST_TCP").is_ok_and(|v| v == "1"),
        ..ClientOpts::default()
    };
    let client = Client::new(&members, &opts);
    say("ready");
    let mut armed: Option<(Vec<u8>, u64)> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 { words[i].parse().expect("number") };
        match words.as_slice() {
            [] => {}
            ["put", tag, _, _, _, _] => {
                let first = num(2) as usize;
                let keys = keys(tag, first..first + num(3) as usize);
                say(&format!(
                    "put {}",
                    put_line(&client.put(&keys, num(5), num(4) as usize))
                ));
            }
            ["check", tag, _, _, _, _] => {
                let first = num(2) as usize;
                let keys = keys(tag, first..first + num(3) as usize);
                say(&format!(
                    "check {}",
                    client.check(&keys, num(5), num(4) as usize).line()
                ));
            }
            ["exists", keys @ ..] => {
                let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
                let e = client.store.batch_exists(&keys).expect("exists");
                let bits: String = e.found.iter().map(|&f| if f { '1' } else { '0' }).collect();
                say(&format!("exists {bits} {}", e.prefix));
            }
            ["arm", key, _, _] => {
                let size = num(2);
                client
                    .src
                    .write_at(0, &value(num(3), key.as_bytes(), size as usize))
                    .expect("fits");
                armed = Some((key.as_bytes().to_vec(), size));
                say("armed");
            }
            ["go"] => {
                let (key, size) = armed.take().expect("armed first");
                let r = client
                    .store
                    .batch_put_from(&[&key], &[client.src.addr()], &[size])
                    .expect("put")
                    .remove(0);
                say(&match r {
                    Ok(()) => "race ok".to_string(),
                    Err(ItemError::AlreadyExists) => "race exists".to_string(),
                    Err(e) => format!("race failed {e:?}: {e}"),
                });
            }
            _ => panic!("client child: unknown command {line:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------

/// A running child; killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// The node's session (empty for a client).
    session: String,
}

/// A node child contributing `memory` bytes (0: an engine serving no store).
fn spawn_node(memory: u64, tcp: bool, disk: Option<(&PathBuf, u64)>) -> Proc {
    let mut env = vec![
        ("KVX_TEST_MEMORY", memory.to_string()),
        ("KVX_TEST_TCP", if tcp { "1" } else { "0" }.to_string()),
    ];
    if let Some((dir, size)) = disk {
        env.push(("KVX_TEST_DISK", dir.display().to_string()));
        env.push(("KVX_TEST_DISK_SIZE", size.to_string()));
    }
    Proc::spawn("node", &env)
}

/// `n` TCP nodes of `memory` bytes each, started together.
fn nodes(n: usize, memory: u64) -> Vec<Proc> {
    let mut nodes: Vec<Proc> = (0..n).map(|_| spawn_node(memory, true, None)).collect();
    for node in &mut nodes {
        node.ready();
    }
    nodes
}

fn sessions(nodes: &[Proc]) -> Vec<String> {
    nodes.iter().map(|n| n.session.clone()).collect()
}

/// A client child over `members`.
fn spawn_client(members: &[String], tcp: bool) -> Proc {
    Proc::spawn(
        "client",
        &[
            ("KVX_TEST_MEMBERS", members.join(",")),
            ("KVX_TEST_TCP", if tcp { "1" } else { "0" }.to_string()),
        ],
    )
}

impl Proc {
    /// Starts a child; call [`ready`](Self::ready) before using it.
    fn spawn(role: &str, env: &[(&str, String)]) -> Proc {
        let exe = std::env::current_exe().expect("test binary");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        // The child's configuration must be what the test says.
        for (name, _) in std::env::vars() {
            if name.starts_with("KVX_") {
                cmd.env_remove(name);
            }
        }
        for (name, v) in env {
            cmd.env(name, v);
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
        Proc {
            child,
            stdin,
            lines,
            session: String::new(),
        }
    }

    /// Waits for the `ready [<session>]` line.
    fn ready(&mut self) {
        let line = self.answer();
        let mut words = line.split_whitespace();
        assert_eq!(
            words.next(),
            Some("ready"),
            "unexpected first line {line:?}"
        );
        self.session = words.next().unwrap_or_default().to_string();
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

    /// SIGKILL and reap: once this returns the process is gone and the kernel has closed
    /// its sockets.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Closes stdin and waits (up to `within`) for the child to exit by itself.
    fn finish(&mut self, within: Duration) {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait().expect("try_wait") {
                Some(status) => {
                    assert!(status.success(), "child exited with {status}");
                    return;
                }
                None if Instant::now() >= deadline => {
                    self.kill();
                    panic!("child did not exit within {within:?} of its stdin closing");
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        self.kill();
    }
}

/// The index of `session` in `members`.
fn member_index(members: &[String], session: &str) -> usize {
    members
        .iter()
        .position(|m| m == session)
        .unwrap_or_else(|| panic!("{session} is not a member of {members:?}"))
}

/// The keys of `keys` whose owner of rank `rank` (with every member live) is `member`.
fn owned_by(members: &[String], keys: &[Vec<u8>], member: usize, rank: usize) -> Vec<Vec<u8>> {
    keys.iter()
        .filter(|k| owners(members, k, rank + 1, |_| true).get(rank) == Some(&member))
        .cloned()
        .collect()
}

fn total(stats: &[(String, StoreStats)]) -> StoreStats {
    let mut t = StoreStats::default();
    for (_, s) in stats {
        t.add(s);
    }
    t
}

// ---------------------------------------------------------------------------------------
// a. Three nodes, two clients
// ---------------------------------------------------------------------------------------

#[test]
fn three_nodes_two_clients_share_every_key_byte_for_byte() {
    const N: usize = 48;
    const SEED_P: u64 = 0x9a11_0001;
    const SEED_C: u64 = 0x9a11_0002;
    let nodes = nodes(3, 32 << 20);
    let members = sessions(&nodes);
    let mut child = spawn_client(&members, true);
    let me = Client::new(&members, &ClientOpts::default());
    child.ready();

    // Both clients put at once, each its own keys.
    child.send(&format!("put c 0 {N} {PAGE} {SEED_C}"));
    let mine = keys("p", 0..N);
    assert_eq!(
        put_line(&me.put(&mine, SEED_P, PAGE)),
        format!("ok={N} exists=0 failed=0 first=-")
    );
    assert_eq!(
        child.answer(),
        format!("put ok={N} exists=0 failed=0 first=-")
    );

    // Each reads both sets, byte for byte.
    let theirs = keys("c", 0..N);
    me.check(&mine, SEED_P, PAGE).assert_all_ok(N, "own keys");
    me.check(&theirs, SEED_C, PAGE)
        .assert_all_ok(N, "the child's keys");
    let all_ok = format!("check ok={N} missing=0 wrong=0 failed=0 first=-");
    assert_eq!(child.ask(&format!("check c 0 {N} {PAGE} {SEED_C}")), all_ok);
    assert_eq!(child.ask(&format!("check p 0 {N} {PAGE} {SEED_P}")), all_ok);

    // Objects are immutable, whoever asks: the child's keys cannot be overwritten.
    let again = me.put(&theirs[..4], SEED_P, PAGE);
    assert_eq!(again, vec![Err(ItemError::AlreadyExists); 4]);
    me.check(&theirs, SEED_C, PAGE)
        .assert_all_ok(N, "the child's keys after a refused overwrite");

    // Existence and the longest prefix over a list with a hole (both clients agree).
    let list: Vec<&[u8]> = vec![b"p-0", b"c-1", b"p-2", b"hole", b"c-3"];
    let e = me.store.batch_exists(&list).expect("exists");
    assert_eq!(
        (e.found.clone(), e.prefix),
        (vec![true, true, true, false, true], 3)
    );
    assert_eq!(child.ask("exists p-0 c-1 p-2 hole c-3"), "exists 11101 3");
    assert_eq!(child.ask("exists hole p-0"), "exists 01 0");
    let e = me.store.batch_exists(&refs(&mine)).expect("exists");
    assert_eq!(e.prefix, N);

    // The keys spread over all three nodes, and every object is counted once.
    let stats = me.member_stats();
    for (m, s) in &stats {
        assert!(s.objects_in_memory > 0, "{m} holds nothing: {stats:?}");
        let expect = (owned_by(&members, &mine, member_index(&members, m), 0).len()
            + owned_by(&members, &theirs, member_index(&members, m), 0).len())
            as u64;
        assert_eq!(
            s.objects_in_memory, expect,
            "{m}: objects where placement says"
        );
        assert_eq!(s.reservations, 0, "{m}: a reservation left over");
    }
    let t = total(&stats);
    assert_eq!((t.objects_in_memory, t.puts), (2 * N as u64, 2 * N as u64));
    assert_eq!(t.evictions, 0);
}

// ---------------------------------------------------------------------------------------
// b. A node killed
// ---------------------------------------------------------------------------------------

#[test]
fn a_killed_node_loses_only_its_own_keys() {
    const N: usize = 96;
    const SEED: u64 = 0xb0b0_0001;
    let mut nodes = nodes(3, 32 << 20);
    let members = sessions(&nodes);
    let me = Client::new(&members, &ClientOpts::default());
    let all = keys("k", 0..N);
    assert_eq!(
        put_line(&me.put(&all, SEED, PAGE)),
        format!("ok={N} exists=0 failed=0 first=-")
    );
    me.check(&all, SEED, PAGE)
        .assert_all_ok(N, "before the kill");

    let victim = member_index(&members, &nodes[1].session);
    let lost = owned_by(&members, &all, victim, 0);
    let kept: Vec<Vec<u8>> = all.iter().filter(|k| !lost.contains(k)).cloned().collect();
    assert!(!lost.is_empty() && !kept.is_empty(), "a skewed placement");
    nodes[1].kill();
    let killed = Instant::now();

    // The victim's keys answer NotFound (an Unavailable on the way is tolerated) within
    // 5 s; never wrong bytes.
    let deadline = killed + Duration::from_secs(5);
    loop {
        let c = me.check(&lost, SEED, PAGE);
        c.assert_no_wrong_bytes("the victim's keys");
        assert_eq!(c.ok, 0, "keys of a killed node read back: {}", c.line());
        let unexpected: Vec<_> = c
            .failed
            .iter()
            .filter(|(_, e)| !matches!(e, ItemError::Unavailable(_)))
            .collect();
        assert!(unexpected.is_empty(), "{unexpected:?}");
        if c.missing.len() == lost.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim's keys still not NotFound 5 s after the kill: {}",
            c.line()
        );
    }
    let noticed = killed.elapsed();

    // The other nodes' keys are unaffected.
    me.check(&kept, SEED, PAGE)
        .assert_all_ok(kept.len(), "the survivors' keys");
    let e = me.store.batch_exists(&refs(&lost)).expect("exists");
    assert!(e.found.iter().all(|f| !f), "{:?}", e.found);

    // New puts land on the survivors (the victim's share included) and read back.
    let after = keys("after", 0..N);
    let rehomed = owned_by(&members, &after, victim, 0).len();
    assert!(rehomed > 0);
    assert_eq!(
        put_line(&me.put(&after, SEED, PAGE)),
        format!("ok={N} exists=0 failed=0 first=-")
    );
    me.check(&after, SEED, PAGE)
        .assert_all_ok(N, "puts after the kill");
    let stats: Vec<(String, Result<StoreStats, String>)> = me.store.member_stats();
    let mut held = 0;
    for (m, s) in &stats {
        match s {
            Ok(s) => held += s.objects_in_memory,
            Err(why) => assert_eq!(m, &members[victim], "{m} unreachable: {why}"),
        }
    }
    assert_eq!(held as usize, kept.len() + N, "objects on the survivors");
    eprintln!(
        "a_killed_node: {} of {N} keys lost with the victim, NotFound {noticed:?} after the kill; {rehomed} new keys re-homed",
        lost.len()
    );
}

// ---------------------------------------------------------------------------------------
// c. Eviction under memory pressure
// ---------------------------------------------------------------------------------------

#[test]
fn eviction_under_memory_pressure_never_returns_wrong_bytes() {
    const V: usize = 256 << 10;
    const N: usize = 256; // 64 MiB into a 16 MiB segment
    const BATCH: usize = 8;
    const SEED: u64 = 0xe51c_0001;
    let nodes = nodes(1, 16 << 20);
    let members = sessions(&nodes);
    let writer = Client::new(&members, &ClientOpts::default());
    let reader = Client::new(&members, &ClientOpts::default());
    let all = keys("ev", 0..N);
    let (progress, written) = mpsc::channel::<usize>();

    let read_while_writing = std::thread::scope(|s| {
        // The reader reads back recent keys while the writer keeps evicting.
        let (reader, all) = (&reader, &all);
        let r = s.spawn(move || {
            let mut seen = Checked::default();
            let mut upto = 0;
            while let Ok(n) = written.recv() {
                // The latest keys written (the reader is slower than the writer).
                upto = written.try_iter().fold(upto.max(n), usize::max);
                let from = upto.saturating_sub(2 * BATCH);
                let c = reader.check(&all[from..upto], SEED, V);
                seen.ok += c.ok;
                seen.missing.extend(c.missing);
                seen.wrong.extend(c.wrong);
                seen.failed.extend(c.failed);
            }
            seen
        });
        for (b, chunk) in all.chunks(BATCH).enumerate() {
            let r = writer.put(chunk, SEED, V);
            assert!(
                r.iter().all(|r| r.is_ok()),
                "batch {b}: puts must keep succeeding by evicting: {}",
                put_line(&r)
            );
            let _ = progress.send((b + 1) * BATCH);
        }
        drop(progress);
        r.join().expect("reader")
    });
    read_while_writing.assert_no_wrong_bytes("gets during the puts");
    assert!(
        read_while_writing.failed.is_empty(),
        "{}",
        read_while_writing.line()
    );
    // The newest keys fit many times over: most of them must be read back.
    assert!(
        read_while_writing.ok > read_while_writing.missing.len(),
        "{}",
        read_while_writing.line()
    );

    let end = writer.check(&all, SEED, V);
    end.assert_no_wrong_bytes("gets after the puts");
    assert!(end.failed.is_empty(), "{}", end.line());
    let fits = (16 << 20) / V;
    assert!(
        end.ok > 0 && end.ok <= fits,
        "{} objects found of {N} (at most {fits} fit): {}",
        end.ok,
        end.line()
    );
    let s = &writer.member_stats()[0].1;
    assert!(s.evictions > 0, "{s:?}");
    assert_eq!(s.puts, N as u64, "{s:?}");
    assert_eq!(
        s.puts,
        s.objects_in_memory + s.evictions,
        "every object committed is in memory or was evicted: {s:?}"
    );
    assert_eq!(s.objects_in_memory as usize, end.ok, "{s:?}");
    assert!(s.memory_used <= s.memory_capacity, "{s:?}");
    eprintln!(
        "eviction: during puts {}; after {}; {s:?}",
        read_while_writing.line(),
        end.line()
    );
}

/// A read that ends after its lease expired is an error, never data: with 1 ms leases an
/// 8 MiB batch cannot finish in time, so every key of it reports `LeaseExpired` (or, if
/// one did finish in time, the right bytes), and nothing is left pinned.
#[test]
fn reads_outliving_their_lease_are_errors_never_data() {
    const V: usize = 256 << 10;
    const N: usize = 32; // one 8 MiB batch
    const SEED: u64 = 0x1ea5_0001;
    let mut node = Proc::spawn(
        "node",
        &[
            ("KVX_TEST_MEMORY", (32u64 << 20).to_string()),
            ("KVX_TEST_TCP", "1".into()),
            ("KVX_TEST_LEASE_MS", "1".into()),
        ],
    );
    node.ready();
    let c = Client::new(&[node.session.clone()], &ClientOpts::default());
    let all = keys("lease", 0..N);
    assert_eq!(
        put_line(&c.put(&all, SEED, V)),
        format!("ok={N} exists=0 failed=0 first=-")
    );
    let got = c.get(&all, V);
    let mut expired = 0;
    for (k, r) in all.iter().zip(&got) {
        match r {
            Ok(bytes) => assert!(*bytes == value(SEED, k, V), "wrong bytes for {}", show(k)),
            Err(ItemError::LeaseExpired { lease_ms: 1 }) => expired += 1,
            Err(e) => panic!("{}: {e:?}", show(k)),
        }
    }
    eprintln!("leases: {expired} of {N} reads outlived their 1 ms lease");
    assert!(expired > 0, "an 8 MiB read finished within a 1 ms lease?");
    // The objects are intact and unpinned: removing them is not refused as Busy once
    // the leases are over (expired or released).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.store.remove(&refs(&all)).expect("remove");
        if r.iter()
            .all(|r| r.is_ok() || *r == Err(ItemError::NotFound))
        {
            break;
        }
        assert!(
            r.iter()
                .all(|r| r.is_ok() || matches!(r, Err(ItemError::NotFound | ItemError::Busy))),
            "{r:?}"
        );
        assert!(Instant::now() < deadline, "still leased 5 s later: {r:?}");
    }
    let s = &c.member_stats()[0].1;
    assert_eq!(
        (s.objects_in_memory, s.leases, s.memory_used),
        (0, 0, 0),
        "{s:?}"
    );
}

// ---------------------------------------------------------------------------------------
// d. One key, many writers
// ---------------------------------------------------------------------------------------

#[test]
fn concurrent_puts_of_one_key_have_exactly_one_winner() {
    const ROUNDS: usize = 8;
    const THREADS: usize = 3;
    const CHILDREN: usize = 2;
    const V: usize = 256 << 10;
    // The engines' default transports here (shm between processes on this host).
    let mut nodes: Vec<Proc> = (0..2).map(|_| spawn_node(32 << 20, false, None)).collect();
    for n in &mut nodes {
        n.ready();
    }
    let members = sessions(&nodes);
    let opts = ClientOpts {
        tcp: false,
        ..ClientOpts::default()
    };
    let mut children: Vec<Proc> = (0..CHILDREN)
        .map(|_| spawn_client(&members, false))
        .collect();
    let clients: Vec<Client> = (0..THREADS).map(|_| Client::new(&members, &opts)).collect();
    for c in &mut children {
        c.ready();
    }
    let seed = |round: usize, contender: usize| (round * 100 + contender) as u64 + 0xd00d_0000;

    for round in 0..ROUNDS {
        let key = format!("race-{round}");
        for (i, c) in children.iter_mut().enumerate() {
            let s = seed(round, THREADS + i);
            assert_eq!(c.ask(&format!("arm {key} {V} {s}")), "armed");
        }
        let start = Barrier::new(THREADS + 1);
        let mut results: Vec<(usize, String)> = std::thread::scope(|s| {
            let threads: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (key, start) = (&key, &start);
                    s.spawn(move || {
                        c.src
                            .write_at(0, &value(seed(round, i), key.as_bytes(), V))
                            .expect("fits");
                        start.wait();
                        let r = c
                            .store
                            .batch_put_from(&[key.as_bytes()], &[c.src.addr()], &[V as u64])
                            .expect("put")
                            .remove(0);
                        match r {
                            Ok(()) => "race ok".to_string(),
                            Err(ItemError::AlreadyExists) => "race exists".to_string(),
                            Err(e) => format!("race failed {e:?}: {e}"),
                        }
                    })
                })
                .collect();
            for c in children.iter_mut() {
                c.send("go");
            }
            start.wait();
            threads
                .into_iter()
                .enumerate()
                .map(|(i, t)| (i, t.join().expect("contender")))
                .collect()
        });
        for (i, c) in children.iter_mut().enumerate() {
            results.push((THREADS + i, c.answer()));
        }
        let winners: Vec<usize> = results
            .iter()
            .filter(|(_, r)| r == "race ok")
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .all(|(_, r)| r == "race ok" || r == "race exists"),
            "round {round}: {results:?}"
        );
        // Whoever reads it gets the winner's bytes, exactly.
        let expect = value(seed(round, winners[0]), key.as_bytes(), V);
        for c in &clients {
            let got = c.get(&[key.clone().into_bytes()], V).remove(0);
            assert!(
                got.as_ref() == Ok(&expect),
                "round {round}: a get did not return the winner's ({}) bytes: {:?}",
                winners[0],
                got.map(|b| b.len())
            );
        }
    }
    let t = total(&clients[0].member_stats());
    assert_eq!(t.objects_in_memory, ROUNDS as u64);
    assert_eq!(t.reservations, 0, "a losing reservation was left: {t:?}");
}

// ---------------------------------------------------------------------------------------
// e. Bad input
// ---------------------------------------------------------------------------------------

#[test]
fn bad_input_gets_clear_per_key_errors_and_nothing_else_is_affected() {
    const SEED: u64 = 0xbad0_0001;
    let mut node = spawn_node(32 << 20, true, None);
    let mut plain = spawn_node(0, true, None);
    node.ready();
    plain.ready();
    let members = vec![node.session.clone()];
    let c = Client::new(&members, &ClientOpts::default());

    // One batch mixing good and bad items: each bad one fails alone.
    let long = vec![b'x'; 257];
    let max = vec![b'y'; 256];
    let good: Vec<Vec<u8>> = vec![b"good-0".to_vec(), max.clone(), b"good-1".to_vec()];
    for (i, k) in good.iter().enumerate() {
        c.src
            .write_at(i * PAGE, &value(SEED, k, PAGE))
            .expect("fits");
    }
    let at = |i: usize| c.src.addr() + (i * PAGE) as u64;
    let unregistered = vec![0u8; PAGE];
    let items: Vec<&[u8]> = vec![
        &good[0],
        &long,
        b"",
        b"zero",
        b"unregistered",
        &good[1],
        b"past-the-end",
        &good[2],
    ];
    let ptrs = vec![
        at(0),
        at(3),
        at(3),
        at(3),
        unregistered.as_ptr() as u64,
        at(1),
        c.src.addr() + (STAGING - PAGE / 2) as u64,
        at(2),
    ];
    let p = PAGE as u64;
    let sizes = vec![p, p, p, 0, p, p, p, p];
    let r = c.store.batch_put_from(&items, &ptrs, &sizes).expect("put");
    assert_eq!(r[0], Ok(()));
    assert!(
        matches!(&r[1], Err(ItemError::BadKey(why)) if why.contains("257")),
        "{:?}",
        r[1]
    );
    assert!(matches!(&r[2], Err(ItemError::BadKey(_))), "{:?}", r[2]);
    assert_eq!(r[3], Err(ItemError::ZeroSize));
    assert!(
        matches!(r[4], Err(ItemError::NotRegistered { addr, len, .. })
            if addr == unregistered.as_ptr() as u64 && len == p),
        "{:?}",
        r[4]
    );
    assert_eq!(r[5], Ok(()), "a 256-byte key is allowed");
    assert!(
        matches!(r[6], Err(ItemError::NotRegistered { .. })),
        "a buffer running past its region: {:?}",
        r[6]
    );
    assert_eq!(r[7], Ok(()));
    for e in r.iter().filter_map(|r| r.as_ref().err()) {
        eprintln!("put refused: {e}");
        assert!(!e.to_string().is_empty());
    }

    // Gets: good, too small, unknown, unregistered, bad key, a buffer the engine may not
    // write (registered without LOCAL_WRITE).
    let ro = c
        .engine
        .allocate_with_access(
            PAGE,
            Location::Any,
            Access::LOCAL_READ | Access::REMOTE_READ,
        )
        .expect("read-only buffer");
    let mut unregistered_dst = vec![0u8; PAGE];
    let items: Vec<&[u8]> = vec![
        &good[0],
        &good[2],
        b"never-put",
        &good[1],
        &long,
        &good[1],
        &good[1],
    ];
    let d = |i: usize| c.dst.addr() + (i * PAGE) as u64;
    c.dst.fill(0, 8 * PAGE, 0xee).expect("fits");
    let ptrs = vec![
        d(0),
        d(1),
        d(2),
        unregistered_dst.as_mut_ptr() as u64,
        d(3),
        ro.addr(),
        d(4),
    ];
    let sizes = vec![p, 4096, p, p, p, p, p];
    let r = c.store.batch_get_into(&items, &ptrs, &sizes).expect("get");
    assert_eq!(r[0], Ok(p));
    let mut bytes = vec![0u8; PAGE];
    c.dst.read_at(0, &mut bytes).expect("inside");
    assert!(bytes == value(SEED, &good[0], PAGE), "wrong bytes");
    assert_eq!(
        r[1],
        Err(ItemError::SizeMismatch {
            stored: p,
            buffer: 4096
        })
    );
    let mut untouched = vec![0u8; PAGE];
    c.dst.read_at(PAGE, &mut untouched).expect("inside");
    assert!(
        untouched.iter().all(|&b| b == 0xee),
        "a too-small buffer was written"
    );
    assert_eq!(r[2], Err(ItemError::NotFound));
    assert!(
        matches!(r[3], Err(ItemError::NotRegistered { .. })),
        "{:?}",
        r[3]
    );
    assert!(unregistered_dst.iter().all(|&b| b == 0));
    assert!(matches!(&r[4], Err(ItemError::BadKey(_))), "{:?}", r[4]);
    assert!(
        matches!(&r[5], Err(ItemError::NotRegistered { need, .. }) if need.contains("LOCAL_WRITE")),
        "{:?}",
        r[5]
    );
    assert_eq!(r[6], Ok(p));
    c.dst.read_at(4 * PAGE, &mut bytes).expect("inside");
    assert!(bytes == value(SEED, &good[1], PAGE), "wrong bytes");

    // Lists of different lengths: the whole call is refused.
    let two: Vec<&[u8]> = vec![b"a", b"b"];
    match c.store.batch_put_from(&two, &[at(0)], &[p, p]) {
        Err(StoreError::LengthMismatch {
            keys: 2,
            ptrs: 1,
            sizes: 2,
        }) => {}
        other => panic!("{other:?}"),
    }
    match c.store.batch_get_into(&two, &[d(0), d(1)], &[p]) {
        Err(e @ StoreError::LengthMismatch { .. }) => {
            assert!(e.to_string().contains("one entry per key"), "{e}")
        }
        other => panic!("{other:?}"),
    }

    // exists and remove with bad keys.
    let e = c
        .store
        .batch_exists(&[&good[0], &long, &good[2]])
        .expect("exists");
    assert_eq!((e.found, e.prefix), (vec![true, false, true], 1));
    let r = c.store.remove(&[&long, b"never-put"]).expect("remove");
    assert!(matches!(&r[0], Err(ItemError::BadKey(_))), "{r:?}");
    assert_eq!(r[1], Err(ItemError::NotFound));

    // Bad configurations.
    let setup = |members: Vec<String>, replicas: usize| {
        Store::setup(
            Arc::clone(&c.engine),
            StoreConfig {
                members,
                replicas,
                ..StoreConfig::default()
            },
        )
    };
    for (list, what) in [
        (vec![node.session.clone(), "nonsense".into()], "nonsense"),
        (vec!["127.0.0.1:notaport".into()], "notaport"),
        (vec![node.session.clone(), node.session.clone()], "twice"),
    ] {
        match setup(list.clone(), 1) {
            Err(e @ StoreError::BadMember { .. }) => {
                assert!(e.to_string().contains(what), "{list:?}: {e}")
            }
            other => panic!("{list:?}: {other:?}"),
        }
    }
    assert!(matches!(setup(vec![], 1), Err(StoreError::NoMembers)));
    assert!(matches!(
        setup(members.clone(), 0),
        Err(StoreError::BadConfig(_))
    ));

    // A member that is an engine but not a store: its keys fail saying so.
    let only_plain = Client::new(&[plain.session.clone()], &ClientOpts::default());
    let k = keys("plain", 0..4);
    for r in only_plain.put(&k, SEED, PAGE) {
        match r {
            Err(ItemError::Unavailable(why) | ItemError::Failed(why))
                if why.contains("serves no store") => {}
            other => panic!("a put to an engine serving no store: {other:?}"),
        }
    }
    for r in only_plain.get(&k, PAGE) {
        match r {
            Err(ItemError::Unavailable(why) | ItemError::Failed(why))
                if why.contains("serves no store") => {}
            Err(ItemError::NotFound) => {}
            other => panic!("a get from an engine serving no store: {other:?}"),
        }
    }
    // With a real node beside it, each key either is stored (and reads back) or fails
    // saying why; never silently lost.
    let mixed = Client::new(
        &[plain.session.clone(), node.session.clone()],
        &ClientOpts::default(),
    );
    let k = keys("mixed", 0..16);
    let put = mixed.put(&k, SEED, PAGE);
    let stored: Vec<Vec<u8>> = k
        .iter()
        .zip(&put)
        .filter(|(_, r)| r.is_ok())
        .map(|(k, _)| k.clone())
        .collect();
    for r in &put {
        match r {
            Ok(()) => {}
            Err(ItemError::Unavailable(why) | ItemError::Failed(why))
                if why.contains("serves no store") => {}
            other => panic!("a put beside an engine serving no store: {other:?}"),
        }
    }
    mixed
        .check(&stored, SEED, PAGE)
        .assert_all_ok(stored.len(), "keys stored beside a non-store member");

    // Nothing else was affected: the good objects are all there is, and read back.
    c.check(&good, SEED, PAGE)
        .assert_all_ok(good.len(), "the good keys");
    let s = &c.member_stats()[0].1;
    assert_eq!(
        (s.objects_in_memory, s.reservations),
        ((good.len() + stored.len()) as u64, 0),
        "{s:?}"
    );
    eprintln!(
        "bad input: beside a non-store member {} of 16 keys were stored",
        stored.len()
    );
    drop(ro);
}

// ---------------------------------------------------------------------------------------
// f. SSD tier
// ---------------------------------------------------------------------------------------

#[test]
fn ssd_tier_demotes_under_pressure_and_promotes_on_hit() {
    const V: usize = 256 << 10;
    const N: usize = 256; // 64 MiB through 16 MiB of memory and 128 MiB of disk
    const BATCH: usize = 8;
    const SEED: u64 = 0x55d0_0001;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("store_processes")
        .join(format!("ssd-{}", std::process::id()));
    // Declared before the node: removed after the node is gone, pass or fail.
    let dir = TempDir::new(dir);
    let mut node = spawn_node(16 << 20, true, Some((&dir.0, 128 << 20)));
    node.ready();
    let c = Client::new(&[node.session.clone()], &ClientOpts::default());
    let all = keys("ssd", 0..N);
    for (b, chunk) in all.chunks(BATCH).enumerate() {
        let r = c.put(chunk, SEED, V);
        assert!(r.iter().all(|r| r.is_ok()), "batch {b}: {}", put_line(&r));
    }
    let after_puts = c.member_stats()[0].1;
    let got = c.check(&all, SEED, V);
    let s = c.member_stats()[0].1;
    eprintln!(
        "ssd: after puts {after_puts:?}\nssd: after gets {s:?}\nssd: {}",
        got.line()
    );
    got.assert_no_wrong_bytes("gets through the SSD tier");
    // 64 MiB fit in 16 MiB of memory plus 128 MiB of disk: nothing may be dropped.
    assert!(
        got.ok == N && s.evictions == 0,
        "values lost although the disk tier had room ({}): {} objects dropped during the \
         puts, {} during the gets (promotions make room by dropping objects from memory \
         instead of demoting them)",
        got.line(),
        after_puts.evictions,
        s.evictions - after_puts.evictions
    );
    assert!(after_puts.demotions > 0, "{after_puts:?}");
    assert!(s.promotions > 0, "{s:?}");
    assert_eq!(
        s.puts,
        s.objects_in_memory + s.objects_on_disk + s.evictions,
        "{s:?}"
    );
    node.finish(Duration::from_secs(10));
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("disk dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the tier's file outlived the node: {left:?}"
    );
}

/// One get of a demoted object is one hit (and one promotion), and returns its bytes.
#[test]
fn a_get_from_the_ssd_tier_counts_one_hit() {
    const V: usize = 256 << 10;
    const N: usize = 60; // 15 MiB: above the 90% watermark of 16 MiB, no drop needed
    const SEED: u64 = 0x55d0_0002;
    let dir = TempDir::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("store_processes")
            .join(format!("hit-{}", std::process::id())),
    );
    let mut node = spawn_node(16 << 20, true, Some((&dir.0, 64 << 20)));
    node.ready();
    let c = Client::new(&[node.session.clone()], &ClientOpts::default());
    let all = keys("hit", 0..N);
    assert_eq!(
        put_line(&c.put(&all, SEED, V)),
        format!("ok={N} exists=0 failed=0 first=-")
    );
    // Housekeeping demotes the oldest objects (hit-0 first) down to the low watermark.
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = loop {
        let s = c.member_stats()[0].1;
        if s.objects_on_disk > 0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "nothing demoted within 5 s: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(before.evictions, 0, "{before:?}");
    c.check(&all[..1], SEED, V)
        .assert_all_ok(1, "the oldest object, from disk");
    let after = c.member_stats()[0].1;
    assert_eq!(
        after.promotions - before.promotions,
        1,
        "hit-0 was not promoted: {before:?} -> {after:?}"
    );
    assert_eq!(
        (after.hits - before.hits, after.misses - before.misses),
        (1, 0),
        "one get of one object on disk: hits and misses {before:?} -> {after:?}"
    );
}

/// A directory removed (with what is in it) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(path: PathBuf) -> TempDir {
        std::fs::create_dir_all(&path).expect("create the directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// g. Replicas
// ---------------------------------------------------------------------------------------

#[test]
fn a_second_replica_serves_the_keys_of_a_killed_primary() {
    const N: usize = 64;
    const SEED: u64 = 0x2e91_0001;
    let mut nodes = nodes(3, 32 << 20);
    let members = sessions(&nodes);
    let c = Client::new(
        &members,
        &ClientOpts {
            replicas: 2,
            ..ClientOpts::default()
        },
    );
    let all = keys("r", 0..N);
    assert_eq!(
        put_line(&c.put(&all, SEED, PAGE)),
        format!("ok={N} exists=0 failed=0 first=-")
    );
    // Two copies of each, where placement says.
    let stats = c.member_stats();
    for (m, s) in &stats {
        let i = member_index(&members, m);
        let expect = owned_by(&members, &all, i, 0).len() + owned_by(&members, &all, i, 1).len();
        assert_eq!(s.objects_in_memory as usize, expect, "{m}: {stats:?}");
    }
    assert_eq!(total(&stats).objects_in_memory, 2 * N as u64);

    let victim = member_index(&members, &nodes[0].session);
    let primary = owned_by(&members, &all, victim, 0);
    let secondary = owned_by(&members, &all, victim, 1);
    assert!(
        !primary.is_empty() && !secondary.is_empty(),
        "skewed placement"
    );
    nodes[0].kill();
    c.check(&primary, SEED, PAGE)
        .assert_all_ok(primary.len(), "keys whose primary was killed");
    c.check(&all, SEED, PAGE)
        .assert_all_ok(N, "every key after the kill");
    let e = c.store.batch_exists(&refs(&all)).expect("exists");
    assert_eq!(e.prefix, N, "{:?}", e.found);
}
