//! Integration tests of the public Rust API through the in-process (loopback) transport:
//! bytes moved by WRITE and READ batches, slicing across region boundaries, every error
//! path with its exact variant and message, deadlines, cancel, concurrency, and dropping
//! buffers and engines while batches run.
//!
//! Memory discipline: every test that registers `Vec` memory declares the `Vec`s *before*
//! the engine, so that if an assertion panics the engine is dropped first (which cancels
//! and quiesces its batches) and only then is the memory freed.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kvxfer::memory::RegionSpec;
use kvxfer::{
    Access, AddrRange, BatchId, BatchState, Buffer, Engine, EngineConfig, Error, Location,
    MemoryError, Op, OpKind, PeerId, Side, TransportKind,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// One KV page.
const PAGE: usize = 4096;
/// `PAGE` as an address offset.
const P: u64 = PAGE as u64;
/// Pages in the "big" batches used to keep copy threads busy: 256 MiB.
const BIG_PAGES: usize = 64 * 1024;
/// A wait that is effectively unbounded but still ends a hung test eventually.
const LONG: Duration = Duration::from_secs(300);

/// An engine with the given slice size and copy threads, other settings default.
fn engine_with(slice_size: usize, copy_threads: usize) -> Engine {
    let config = EngineConfig::builder()
        .slice_size(slice_size)
        .copy_threads(copy_threads)
        .build()
        .expect("valid config");
    Engine::new(config).expect("engine starts")
}

/// Writes page `i` of the pattern salted with `salt` into `page`: the body byte differs per
/// page and is never zero, the head holds `i` and the salt, the tail `!i`. A misplaced,
/// missing or torn (partly copied) page therefore never matches.
fn stamp_page(page: &mut [u8], i: usize, salt: u8) {
    let body = (i as u8).wrapping_mul(31).wrapping_add(salt) | 1;
    page.fill(body);
    page[..8].copy_from_slice(&(i as u64).to_le_bytes());
    page[8] = salt;
    let n = page.len();
    page[n - 8..].copy_from_slice(&(!(i as u64)).to_le_bytes());
}

/// Page `i` of the pattern.
fn expected_page(i: usize, salt: u8) -> Vec<u8> {
    let mut page = vec![0; PAGE];
    stamp_page(&mut page, i, salt);
    page
}

/// `pages` pages of the pattern, in order.
fn stamped_vec(pages: usize, salt: u8) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE];
    for (i, page) in v.chunks_mut(PAGE).enumerate() {
        stamp_page(page, i, salt);
    }
    v
}

/// Fills a buffer with the pattern, page by page.
fn stamp_buffer(buf: &Buffer, salt: u8) {
    let mut page = vec![0; PAGE];
    for i in 0..buf.len() / PAGE {
        stamp_page(&mut page, i, salt);
        buf.write_at(i * PAGE, &page)
            .expect("page inside the buffer");
    }
}

/// Page `i` of a buffer.
fn buffer_page(buf: &Buffer, i: usize) -> Vec<u8> {
    let mut page = vec![0; PAGE];
    buf.read_at(i * PAGE, &mut page)
        .expect("page inside the buffer");
    page
}

/// A permutation of `0..n` (n a power of two): page i goes to slot `perm(i, n)`.
fn perm(i: usize, n: usize) -> usize {
    (i * 37 + 11) % n
}

/// Submits `ops` to the engine itself, waits for the end, frees the batch, returns its state.
fn run(engine: &Engine, ops: &[Op]) -> BatchState {
    let id = engine.submit(engine.local_peer(), ops).expect("submit");
    let state = engine.wait(id, LONG).expect("wait");
    engine.free(id).expect("free an ended batch");
    state
}

fn assert_completed(state: &BatchState) {
    assert!(
        matches!(state, BatchState::Completed),
        "expected Completed, got {state:?}"
    );
}

/// After a batch ended early (cancel, timeout, engine drop), every page of `dst` must be
/// either a whole copy of the matching source page or untouched (zero): slices are never
/// left half-copied. Returns how many pages moved.
fn pages_whole_or_untouched(dst: &[u8], salt: u8) -> usize {
    let zero = vec![0u8; PAGE];
    let mut moved = 0;
    for (i, page) in dst.chunks(PAGE).enumerate() {
        if page == zero.as_slice() {
            continue;
        }
        assert_eq!(
            page,
            expected_page(i, salt),
            "page {i} is torn or misplaced"
        );
        moved += 1;
    }
    moved
}

/// Spins (no sleep) until page `k` of `dst` is no longer all zero, or the batch has ended.
/// Reading a Buffer that a batch is writing is allowed (bytes may be half-written); this
/// only serves to stop a batch part-way through.
fn spin_until_page_moved(engine: &Engine, id: BatchId, dst: &Buffer, k: usize) {
    let zero = vec![0u8; PAGE];
    while buffer_page(dst, k) == zero && !engine.status(id).unwrap().is_finished() {
        std::hint::spin_loop();
    }
}

fn hex(addr: u64) -> String {
    format!("{addr:#x}")
}

/// The engine must be shareable between threads (DESIGN.md: `Engine` is `Send + Sync`).
#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<Buffer>();
    assert_send_sync::<BatchId>();
    assert_send_sync::<BatchState>();
    assert_send_sync::<Error>();
}

// ---------------------------------------------------------------------------------------
// 1. Moving KV pages
// ---------------------------------------------------------------------------------------

/// A WRITE batch of 256 pages, page i to slot perm(i), between two allocated buffers moves
/// every page to its slot.
#[test]
fn write_batch_moves_permuted_pages_between_buffers() {
    const N: usize = 256;
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let src = engine.allocate(N * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(N * PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x11);
    let mut slots: Vec<usize> = (0..N).map(|i| perm(i, N)).collect();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), N, "perm must be a permutation");

    let ops: Vec<Op> = (0..N as u64)
        .map(|i| {
            Op::write(
                src.addr() + i * P,
                dst.addr() + perm(i as usize, N) as u64 * P,
                P,
            )
        })
        .collect();
    assert_completed(&run(&engine, &ops));

    for i in 0..N {
        assert_eq!(
            buffer_page(&dst, perm(i, N)),
            expected_page(i, 0x11),
            "page {i}"
        );
    }
    assert_eq!(engine.live_batches(), 0);
}

/// A READ batch pulls permuted pages from an allocated buffer (the "remote" side) into
/// registered `Vec` memory.
#[test]
fn read_batch_pulls_permuted_pages_into_registered_vec() {
    const N: usize = 128;
    let mut local = vec![0u8; N * PAGE];
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let remote = engine.allocate(N * PAGE, Location::Any).unwrap();
    stamp_buffer(&remote, 0x22);
    let l = local.as_mut_ptr() as u64;
    // SAFETY: `local` is a live Vec of exactly N * PAGE bytes, declared before the engine
    // and never resized; it is unregistered below (or the engine dropped) before it is freed.
    unsafe { engine.register(l, (N * PAGE) as u64, None, Access::ALL) }.unwrap();

    let ops: Vec<Op> = (0..N as u64)
        .map(|i| Op::read(l + perm(i as usize, N) as u64 * P, remote.addr() + i * P, P))
        .collect();
    assert_completed(&run(&engine, &ops));
    engine.unregister(l).unwrap();

    for i in 0..N {
        let slot = perm(i, N);
        assert_eq!(
            &local[slot * PAGE..(slot + 1) * PAGE],
            expected_page(i, 0x22).as_slice(),
            "page {i}"
        );
    }
}

/// WRITE between two registered `Vec`s, each registered with only the one right the
/// direction needs (LOCAL_READ on the source, REMOTE_WRITE on the target).
#[test]
fn write_between_vecs_with_minimal_rights() {
    const N: usize = 64;
    let src = stamped_vec(N, 0x33);
    let mut dst = vec![0u8; N * PAGE];
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    // SAFETY: both Vecs are live, N * PAGE bytes long, declared before the engine and never
    // resized; the engine only reads `src` (LOCAL_READ) and writes `dst` through a pointer
    // from as_mut_ptr. Both are unregistered before being freed.
    unsafe {
        engine.register_batch(vec![
            RegionSpec::caller(s, (N * PAGE) as u64, None, Access::LOCAL_READ),
            RegionSpec::caller(d, (N * PAGE) as u64, None, Access::REMOTE_WRITE),
        ])
    }
    .unwrap();
    assert_eq!(engine.region(s).unwrap().access(), Access::LOCAL_READ);
    assert_eq!(engine.region(d + 5).unwrap().access(), Access::REMOTE_WRITE);

    // Page i to slot N-1-i.
    let ops: Vec<Op> = (0..N as u64)
        .map(|i| Op::write(s + i * P, d + (N as u64 - 1 - i) * P, P))
        .collect();
    assert_completed(&run(&engine, &ops));
    engine.unregister(s).unwrap();
    engine.unregister(d).unwrap();
    for i in 0..N {
        let slot = N - 1 - i;
        assert_eq!(&dst[slot * PAGE..][..PAGE], &src[i * PAGE..][..PAGE]);
    }
}

/// `transfer_sync` round trip: write pages out, read them back elsewhere, same bytes; the
/// batch is freed by the call.
#[test]
fn transfer_sync_round_trip() {
    const N: usize = 32;
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let a = engine.allocate(N * PAGE, Location::Any).unwrap();
    let b = engine.allocate(N * PAGE, Location::Any).unwrap();
    let c = engine.allocate(N * PAGE, Location::Any).unwrap();
    stamp_buffer(&a, 0x44);
    let len = (N * PAGE) as u64;
    engine
        .transfer_sync(engine.local_peer(), &[Op::write(a.addr(), b.addr(), len)])
        .unwrap();
    engine
        .transfer_sync(engine.local_peer(), &[Op::read(c.addr(), b.addr(), len)])
        .unwrap();
    assert_eq!(c.to_vec(), a.to_vec());
    assert_eq!(b.to_vec(), a.to_vec());
    assert_eq!(engine.live_batches(), 0);
}

/// An empty batch has nothing to move: it is Completed at once.
#[test]
fn empty_batch_is_completed() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let id = engine.submit(engine.local_peer(), &[]).unwrap();
    assert_completed(&engine.status(id).unwrap());
    assert_completed(&engine.wait(id, Duration::ZERO).unwrap());
    engine.free(id).unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. Slicing
// ---------------------------------------------------------------------------------------

/// An op much larger than the slice size, not page aligned and of odd length, moves
/// exactly its bytes: nothing before or after the target range changes.
#[test]
fn op_larger_than_slice_size_moves_exactly_its_bytes() {
    let engine = engine_with(PAGE, 2);
    let src = engine.allocate(300 * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(300 * PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x55);
    dst.fill(0, dst.len(), 0xee).unwrap();
    let (from, to, len) = (7usize, 1001usize, (1 << 20) + 123usize);

    let ops = [Op::write(
        src.addr() + from as u64,
        dst.addr() + to as u64,
        len as u64,
    )];
    assert_completed(&run(&engine, &ops));

    let s = src.to_vec();
    let d = dst.to_vec();
    assert_eq!(&d[to..to + len], &s[from..from + len]);
    assert!(
        d[..to].iter().all(|&b| b == 0xee),
        "bytes before the op changed"
    );
    assert!(
        d[to + len..].iter().all(|&b| b == 0xee),
        "bytes after the op changed"
    );
}

/// Ops spanning regions registered separately from one `Vec` (adjacent, cut at unaligned
/// and different points on each side) succeed and move every byte, both directions.
#[test]
fn ops_spanning_adjacent_regions_move_every_byte() {
    const N: usize = 64;
    const LEN: u64 = (N * PAGE) as u64;
    let src = stamped_vec(N, 0x66);
    let mut dst = vec![0u8; N * PAGE];
    let mut back = vec![0u8; N * PAGE];
    let engine = engine_with(PAGE, 2);
    let (s, d, b) = (
        src.as_ptr() as u64,
        dst.as_mut_ptr() as u64,
        back.as_mut_ptr() as u64,
    );
    let (s_cut, d_cut) = (10 * P + 100, 37 * P + 1);
    // SAFETY: `src`, `dst` and `back` are live Vecs of LEN bytes, declared before the engine
    // and never resized; the regions below tile each of them exactly, and every one is
    // unregistered before the Vecs are freed. The engine writes `dst` and `back` only
    // through pointers from as_mut_ptr.
    unsafe {
        engine.register(s, s_cut, None, Access::ALL).unwrap();
        engine
            .register(s + s_cut, LEN - s_cut, None, Access::ALL)
            .unwrap();
        engine.register(d, d_cut, None, Access::ALL).unwrap();
        engine
            .register(d + d_cut, LEN - d_cut, None, Access::ALL)
            .unwrap();
        engine
            .register_batch(vec![
                RegionSpec::caller(b, 5 * P, None, Access::ALL),
                RegionSpec::caller(b + 5 * P, 3, None, Access::ALL),
                RegionSpec::caller(b + 5 * P + 3, LEN - 5 * P - 3, None, Access::ALL),
            ])
            .unwrap();
    }
    assert_eq!(engine.region(s).unwrap().range(), AddrRange::new(s, s_cut));
    assert_eq!(
        engine.region(s + s_cut).unwrap().range(),
        AddrRange::new(s + s_cut, LEN - s_cut)
    );

    assert_completed(&run(&engine, &[Op::write(s, d, LEN)]));
    assert_completed(&run(&engine, &[Op::read(b, d, LEN)]));

    for addr in [s, s + s_cut, d, d + d_cut, b, b + 5 * P, b + 5 * P + 3] {
        engine.unregister(addr).unwrap();
    }
    assert!(dst == src, "WRITE across region boundaries lost bytes");
    assert!(back == src, "READ across region boundaries lost bytes");
}

/// An op that crosses a gap between two registered regions is refused with NotRegistered
/// naming the op index, the side, the op's range and the first uncovered address; nothing
/// moves and no region stays pinned.
#[test]
fn op_across_a_gap_is_not_registered() {
    let mut holey = vec![0u8; 16 * PAGE];
    let mut whole = vec![0u8; 16 * PAGE];
    let engine = engine_with(PAGE, 2);
    let (h, w) = (holey.as_mut_ptr() as u64, whole.as_mut_ptr() as u64);
    // SAFETY: both Vecs are live, 16 pages long, declared before the engine and never
    // resized; the regions lie inside them and are all unregistered before they are freed.
    unsafe {
        engine.register(h, 4 * P, None, Access::ALL).unwrap();
        engine
            .register(h + 5 * P, 11 * P, None, Access::ALL)
            .unwrap();
        engine.register(w, 16 * P, None, Access::ALL).unwrap();
    }
    let gap = h + 4 * P;
    let good = Op::write(w, w + 8 * P, P);
    let cases = [
        // (the failing op, side, range on that side)
        (
            Op::write(h + 3 * P, w, 3 * P),
            Side::Local,
            AddrRange::new(h + 3 * P, 3 * P),
        ),
        (
            Op::write(w, h + 2 * P, 4 * P),
            Side::Remote,
            AddrRange::new(h + 2 * P, 4 * P),
        ),
        (
            Op::read(h + 3 * P, w, 2 * P),
            Side::Local,
            AddrRange::new(h + 3 * P, 2 * P),
        ),
        (
            Op::read(w, h + 4 * P, 2 * P),
            Side::Remote,
            AddrRange::new(h + 4 * P, 2 * P),
        ),
    ];
    for (bad, want_side, want_range) in cases {
        let err = engine
            .submit(engine.local_peer(), &[good, good, bad])
            .unwrap_err();
        match &err {
            Error::NotRegistered {
                op,
                side,
                range,
                at,
            } => {
                assert_eq!((*op, *side, *range, *at), (2, want_side, want_range, gap));
            }
            other => panic!("expected NotRegistered for {bad:?}, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("op 2"), "{msg}");
        assert!(msg.contains(&want_side.to_string()), "{msg}");
        assert!(msg.contains(&hex(gap)), "{msg}");
    }
    assert!(
        whole.iter().all(|&b| b == 0) && holey.iter().all(|&b| b == 0),
        "a refused batch moved bytes"
    );
    for addr in [h, h + 5 * P, w] {
        assert_eq!(engine.region(addr).unwrap().pins(), 0, "leaked pin");
        engine.unregister(addr).unwrap();
    }
    assert_eq!(engine.live_batches(), 0);
}

// ---------------------------------------------------------------------------------------
// 3. Error paths
// ---------------------------------------------------------------------------------------

/// A zero-length op is refused with ZeroLengthOp naming its index.
#[test]
fn zero_length_op_is_refused() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let a = engine.allocate(4 * PAGE, Location::Any).unwrap();
    let b = engine.allocate(4 * PAGE, Location::Any).unwrap();
    a.fill(0, a.len(), 9).unwrap();
    let ops = [
        Op::write(a.addr(), b.addr(), P),
        Op::write(a.addr() + P, b.addr() + P, P),
        Op::write(a.addr(), b.addr(), 0),
    ];
    let err = engine.submit(engine.local_peer(), &ops).unwrap_err();
    assert!(matches!(err, Error::ZeroLengthOp { op: 2 }), "{err:?}");
    assert!(err.to_string().contains("op 2"), "{err}");
    assert!(
        b.to_vec().iter().all(|&x| x == 0),
        "a refused batch moved bytes"
    );
    assert_eq!(b.region().pins(), 0);
}

/// An op whose range wraps past the end of the address space is refused on the side that
/// wraps, naming the op, the address and the length.
#[test]
fn address_overflow_is_refused_per_side() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let a = engine.allocate(PAGE, Location::Any).unwrap();
    let wild = u64::MAX - 10;
    let cases = [
        (Op::write(wild, a.addr(), 100), Side::Local),
        (Op::write(a.addr(), wild, 100), Side::Remote),
        (Op::read(wild, a.addr(), 100), Side::Local),
        (Op::read(a.addr(), wild, 100), Side::Remote),
    ];
    for (bad, want_side) in cases {
        let ops = [Op::write(a.addr(), a.addr(), 16), bad];
        let err = engine.submit(engine.local_peer(), &ops).unwrap_err();
        assert!(
            matches!(
                err,
                Error::AddressOverflow { op: 1, side, addr, len: 100 }
                    if side == want_side && addr == wild
            ),
            "{bad:?}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("op 1") && msg.contains(&hex(wild)), "{msg}");
    }
}

/// Addresses no region holds are refused on the right side, naming the op and address.
#[test]
fn unregistered_local_or_remote_is_refused() {
    let stray = vec![0u8; PAGE]; // never registered
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let a = engine.allocate(PAGE, Location::Any).unwrap();
    let x = stray.as_ptr() as u64;
    let cases = [
        (Op::write(x, a.addr(), P), Side::Local, x),
        (Op::write(a.addr(), x, P), Side::Remote, x),
        (Op::read(x, a.addr(), P), Side::Local, x),
        (Op::read(a.addr(), x + 8, 8), Side::Remote, x + 8),
        (Op::write(0x10, a.addr(), 1), Side::Local, 0x10),
    ];
    for (bad, want_side, want_at) in cases {
        let err = engine.submit(engine.local_peer(), &[bad]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotRegistered { op: 0, side, at, range }
                    if side == want_side && at == want_at && range.start == want_at
            ),
            "{bad:?}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("op 0") && msg.contains(&hex(want_at)), "{msg}");
    }
    assert!(stray.iter().all(|&b| b == 0));
}

/// Each of the four rights is enforced: a region lacking exactly that right refuses the op
/// that needs it with AccessDenied naming op, direction, side, region, needed and granted
/// rights; the valid op before it in the batch does not move either.
#[test]
fn each_access_right_is_enforced() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let full = engine.allocate(2 * PAGE, Location::Any).unwrap();
    let sink = engine.allocate(PAGE, Location::Any).unwrap();
    full.fill(0, full.len(), 0x5a).unwrap();
    let good = Op::write(full.addr(), sink.addr(), P);
    let rights = [
        Access::LOCAL_READ,
        Access::LOCAL_WRITE,
        Access::REMOTE_READ,
        Access::REMOTE_WRITE,
    ];
    for missing in rights {
        let granted = Access::ALL.difference(missing);
        let restricted = engine
            .allocate_with_access(2 * PAGE, Location::Any, granted)
            .unwrap();
        assert_eq!(restricted.region().access(), granted);
        let (r, f) = (restricted.addr(), full.addr());
        let (bad, kind, side, range) = if missing == Access::LOCAL_READ {
            (
                Op::write(r, f, P),
                OpKind::Write,
                Side::Local,
                AddrRange::new(r, P),
            )
        } else if missing == Access::REMOTE_WRITE {
            (
                Op::write(f, r, P),
                OpKind::Write,
                Side::Remote,
                AddrRange::new(r, P),
            )
        } else if missing == Access::LOCAL_WRITE {
            (
                Op::read(r, f, P),
                OpKind::Read,
                Side::Local,
                AddrRange::new(r, P),
            )
        } else {
            (
                Op::read(f, r, P),
                OpKind::Read,
                Side::Remote,
                AddrRange::new(r, P),
            )
        };
        let err = engine
            .submit(engine.local_peer(), &[good, bad])
            .unwrap_err();
        match &err {
            Error::AccessDenied {
                op: 1,
                kind: k,
                side: s,
                range: rg,
                region,
                need,
                granted: g,
            } => {
                assert_eq!((*k, *s, *rg), (kind, side, range), "{missing}");
                assert_eq!(*region, restricted.region().range());
                assert_eq!((*need, *g), (missing, granted));
            }
            other => panic!("missing {missing}: expected AccessDenied op 1, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("op 1"), "{msg}");
        assert!(msg.contains(&missing.to_string()), "{msg}");
        assert!(msg.contains(&kind.to_string()), "{msg}");
        assert!(
            sink.to_vec().iter().all(|&b| b == 0),
            "refused batch moved bytes"
        );
        assert_eq!(restricted.region().pins(), 0);
    }
    assert_eq!(engine.live_batches(), 0);
}

/// The same with caller memory: a `Vec` registered without REMOTE_WRITE cannot be the
/// target of a WRITE, one without LOCAL_WRITE cannot be a READ destination; then the
/// regions unregister (nothing pinned) and hold no moved bytes.
#[test]
fn access_denied_on_registered_vecs() {
    let mut no_remote_write = vec![0u8; 2 * PAGE];
    let mut no_local_write = vec![0u8; 2 * PAGE];
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let src = engine.allocate(2 * PAGE, Location::Any).unwrap();
    src.fill(0, src.len(), 0x77).unwrap();
    let a = no_remote_write.as_mut_ptr() as u64;
    let b = no_local_write.as_mut_ptr() as u64;
    let a_rights = Access::LOCAL_READ | Access::LOCAL_WRITE | Access::REMOTE_READ;
    let b_rights = Access::LOCAL_READ | Access::REMOTE_READ | Access::REMOTE_WRITE;
    // SAFETY: both Vecs are live, 2 pages long, declared before the engine and never
    // resized; they are unregistered at the end of the test before they are freed.
    unsafe {
        engine.register(a, 2 * P, None, a_rights).unwrap();
        engine.register(b, 2 * P, None, b_rights).unwrap();
    }
    let err = engine
        .submit(engine.local_peer(), &[Op::write(src.addr(), a + P, P)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::AccessDenied {
                op: 0,
                kind: OpKind::Write,
                side: Side::Remote,
                need: Access::REMOTE_WRITE,
                granted,
                region,
                ..
            } if granted == a_rights && region == AddrRange::new(a, 2 * P)
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("REMOTE_WRITE"), "{err}");

    let ops = [Op::write(src.addr(), b, P), Op::read(b + P, src.addr(), P)];
    let err = engine.submit(engine.local_peer(), &ops).unwrap_err();
    assert!(
        matches!(
            err,
            Error::AccessDenied {
                op: 1,
                kind: OpKind::Read,
                side: Side::Local,
                need: Access::LOCAL_WRITE,
                granted,
                ..
            } if granted == b_rights
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("LOCAL_WRITE"), "{err}");

    engine.unregister(a).unwrap();
    engine.unregister(b).unwrap();
    assert!(no_remote_write.iter().all(|&x| x == 0));
    assert!(no_local_write.iter().all(|&x| x == 0));
}

/// Batches over max_slices_per_batch are refused with BatchTooLarge, whether the slices
/// come from many ops, one big op, or several ops together; a batch at the limit runs.
#[test]
fn batch_too_large_is_refused() {
    let config = EngineConfig::builder()
        .slice_size(PAGE)
        .max_slices_per_batch(4)
        .build()
        .unwrap();
    let engine = Engine::new(config).unwrap();
    let src = engine.allocate(8 * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(8 * PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x12);
    let (s, d) = (src.addr(), dst.addr());
    let five_ops: Vec<Op> = (0..5).map(|i| Op::write(s + i * P, d + i * P, P)).collect();
    let refused: [&[Op]; 4] = [
        &five_ops,
        &[Op::write(s, d, 5 * P)],
        &[
            Op::write(s, d, 3 * P),
            Op::write(s + 3 * P, d + 3 * P, 2 * P),
        ],
        &[Op::write(s, d, 4 * P + 1)],
    ];
    for ops in refused {
        let err = engine.submit(engine.local_peer(), ops).unwrap_err();
        assert!(
            matches!(err, Error::BatchTooLarge { slices: 5, max: 4 }),
            "{ops:?}: {err:?}"
        );
        assert!(
            err.to_string().contains("max_slices_per_batch (4)"),
            "{err}"
        );
    }
    assert!(
        dst.to_vec().iter().all(|&b| b == 0),
        "refused batch moved bytes"
    );
    assert_eq!((src.region().pins(), dst.region().pins()), (0, 0));

    assert_completed(&run(&engine, &[Op::write(s, d, 4 * P)]));
    for i in 0..4 {
        assert_eq!(buffer_page(&dst, i), expected_page(i, 0x12));
    }
}

/// With max_batches = 2, a third unfreed batch is refused (TooManyBatches) even though the
/// first two have ended; freeing one makes room again.
#[test]
fn too_many_batches_until_one_is_freed() {
    let config = EngineConfig::builder().max_batches(2).build().unwrap();
    let engine = Engine::new(config).unwrap();
    let src = engine.allocate(PAGE, Location::Any).unwrap();
    let d1 = engine.allocate(PAGE, Location::Any).unwrap();
    let d3 = engine.allocate(PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x13);
    let op = |d: &Buffer| [Op::write(src.addr(), d.addr(), P)];
    let a = engine.submit(engine.local_peer(), &op(&d1)).unwrap();
    let b = engine.submit(engine.local_peer(), &op(&d1)).unwrap();
    assert_completed(&engine.wait(a, LONG).unwrap());
    assert_completed(&engine.wait(b, LONG).unwrap());

    let err = engine.submit(engine.local_peer(), &op(&d3)).unwrap_err();
    assert!(matches!(err, Error::TooManyBatches { max: 2 }), "{err:?}");
    assert!(err.to_string().contains("2 batches"), "{err}");
    assert!(
        d3.to_vec().iter().all(|&x| x == 0),
        "refused batch moved bytes"
    );
    assert_eq!(d3.region().pins(), 0, "refused batch left a pin");
    assert_eq!(engine.live_batches(), 2);

    engine.free(a).unwrap();
    assert_completed(&run(&engine, &op(&d3)));
    assert_eq!(buffer_page(&d3, 0), expected_page(0, 0x13));
    engine.free(b).unwrap();
    assert_eq!(engine.live_batches(), 0);
}

/// Freed, double-freed, forged and stale (slot reused) batch ids are refused by every call
/// with UnknownBatch carrying the raw id.
#[test]
fn unknown_batch_ids_are_refused_everywhere() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let a = engine.allocate(PAGE, Location::Any).unwrap();
    let op = [Op::write(a.addr(), a.addr(), 8)];
    let freed = engine.submit(engine.local_peer(), &op).unwrap();
    assert_completed(&engine.wait(freed, LONG).unwrap());
    engine.free(freed).unwrap();
    // The next batch likely reuses the slot; the old id must still find nothing.
    let live = engine.submit(engine.local_peer(), &op).unwrap();
    assert_ne!(live, freed);

    for id in [
        freed,
        BatchId::from_raw(12345),
        BatchId::from_raw(0),
        BatchId::from_raw(u64::MAX),
    ] {
        let raw = id.raw();
        let is_unknown = |r: Result<BatchState, Error>, call: &str| match r {
            Err(e @ Error::UnknownBatch(got)) if got == raw => {
                assert!(e.to_string().contains(&hex(raw)), "{e}");
            }
            other => panic!("{call}({raw:#x}): expected UnknownBatch, got {other:?}"),
        };
        is_unknown(engine.status(id), "status");
        is_unknown(engine.wait(id, Duration::ZERO), "wait");
        is_unknown(engine.cancel(id), "cancel");
        is_unknown(engine.free(id).map(|()| BatchState::Completed), "free");
    }
    assert_completed(&engine.wait(live, LONG).unwrap());
    engine.free(live).unwrap();
    assert!(matches!(engine.free(live), Err(Error::UnknownBatch(r)) if r == live.raw()));
}

/// A peer id never issued is refused by submit and the peer queries with UnknownPeer.
#[test]
fn unknown_peer_is_refused() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let a = engine.allocate(PAGE, Location::Any).unwrap();
    let ops = [Op::write(a.addr(), a.addr(), 8)];
    let bogus = PeerId::from_raw(999);
    let far = Instant::now() + LONG;
    let errs = [
        engine.submit(bogus, &ops).unwrap_err(),
        engine.submit_with_deadline(bogus, &ops, far).unwrap_err(),
        engine.peer_transport(bogus).unwrap_err(),
        engine.peer_name(bogus).unwrap_err(),
    ];
    for err in errs {
        assert!(matches!(err, Error::UnknownPeer(999)), "{err:?}");
        assert!(err.to_string().contains("0x3e7"), "{err}");
    }
    assert_eq!(engine.live_batches(), 0);
    assert_eq!(a.region().pins(), 0);
}

/// Registration errors: zero length, overlap (with a registered region and within one
/// register_batch, which is all-or-nothing), unregister of an address that starts no region.
#[test]
fn registration_errors() {
    let mut mem = vec![0u8; 8 * PAGE];
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let base = mem.as_mut_ptr() as u64;
    // SAFETY: every range below lies inside `mem`, a live Vec of 8 pages declared before
    // the engine and never resized; all successful registrations are undone before the end.
    unsafe {
        let err = engine.register(base, 0, None, Access::ALL).unwrap_err();
        assert!(
            matches!(err, Error::Memory(MemoryError::ZeroLength { range }) if range == AddrRange::new(base, 0)),
            "{err:?}"
        );
        assert!(err.to_string().contains(&hex(base)), "{err}");

        engine.register(base, 4 * P, None, Access::ALL).unwrap();
        let err = engine
            .register(base + 2 * P, 4 * P, None, Access::ALL)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Memory(MemoryError::Overlap { range, existing })
                    if range == AddrRange::new(base + 2 * P, 4 * P)
                        && existing == AddrRange::new(base, 4 * P)
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&hex(base + 2 * P)) && msg.contains(&hex(base)),
            "{msg}"
        );

        let err = engine
            .register_batch(vec![
                RegionSpec::caller(base + 4 * P, 2 * P, None, Access::ALL),
                RegionSpec::caller(base + 6 * P, 2 * P, None, Access::ALL),
                RegionSpec::caller(base + 7 * P, P, None, Access::ALL),
            ])
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Memory(MemoryError::OverlapInRequest { range, other })
                    if range == AddrRange::new(base + 7 * P, P)
                        && other == AddrRange::new(base + 6 * P, 2 * P)
            ),
            "{err:?}"
        );
        assert!(
            engine.region(base + 4 * P).is_none() && engine.region(base + 6 * P).is_none(),
            "a failed register_batch must register nothing"
        );
        engine
            .register_batch(vec![
                RegionSpec::caller(base + 4 * P, 2 * P, None, Access::ALL),
                RegionSpec::caller(base + 6 * P, 2 * P, None, Access::ALL),
            ])
            .unwrap();
    }
    for addr in [base + 1, base + 4 * P - 1, 0xdead_0000] {
        let err = engine.unregister(addr).unwrap_err();
        assert!(
            matches!(err, Error::Memory(MemoryError::NotRegistered { addr: a }) if a == addr),
            "{err:?}"
        );
        assert!(err.to_string().contains(&hex(addr)), "{err}");
    }
    for addr in [base, base + 4 * P, base + 6 * P] {
        engine.unregister(addr).unwrap();
        assert!(matches!(
            engine.unregister(addr),
            Err(Error::Memory(MemoryError::NotRegistered { .. }))
        ));
    }
    assert!(engine.region(base).is_none());
}

/// A refused batch (one bad op after eight good ones) moves no byte and leaves no region
/// pinned: the regions unregister at once.
#[test]
fn refused_batch_moves_nothing_and_pins_nothing() {
    let src = stamped_vec(16, 0x14);
    let mut dst = vec![0u8; 16 * PAGE];
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    // SAFETY: both Vecs are live, 16 pages long, declared before the engine and never
    // resized; both are unregistered below before being freed.
    unsafe {
        engine.register(s, 16 * P, None, Access::ALL).unwrap();
        engine.register(d, 8 * P, None, Access::ALL).unwrap();
    }
    let mut ops: Vec<Op> = (0..8).map(|i| Op::write(s + i * P, d + i * P, P)).collect();
    ops.push(Op::write(s + 8 * P, d + 8 * P, P)); // dst page 8 is not registered
    let err = engine.submit(engine.local_peer(), &ops).unwrap_err();
    assert!(
        matches!(err, Error::NotRegistered { op: 8, side: Side::Remote, at, .. } if at == d + 8 * P),
        "{err:?}"
    );
    assert_eq!(engine.region(s).unwrap().pins(), 0);
    assert_eq!(engine.region(d).unwrap().pins(), 0);
    assert_eq!(engine.live_batches(), 0);
    engine.unregister(s).unwrap();
    engine.unregister(d).unwrap();
    assert!(dst.iter().all(|&b| b == 0), "refused batch moved bytes");
}

/// Unregistering a region that an unfinished batch uses fails with Busy (naming the region
/// and the batch count). The batch is huge (256 MiB in 4 KiB slices, one copy thread) so
/// it is still running when unregister comes right after submit; should it have ended,
/// unregister may succeed, but then the batch must be seen finished. After cancel the
/// regions unregister.
#[test]
fn unregister_of_a_region_in_use_is_busy() {
    const LEN: usize = BIG_PAGES * PAGE;
    let src = vec![0x5au8; LEN];
    let mut dst = vec![0u8; LEN];
    let engine = engine_with(PAGE, 1);
    let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    // SAFETY: both Vecs are live, LEN bytes, declared before the engine and never resized;
    // the batch is cancelled (quiesced) and both regions unregistered before they are freed.
    unsafe {
        engine.register(s, LEN as u64, None, Access::ALL).unwrap();
        engine.register(d, LEN as u64, None, Access::ALL).unwrap();
    }
    let far = Instant::now() + LONG;
    let id = engine
        .submit_with_deadline(engine.local_peer(), &[Op::write(s, d, LEN as u64)], far)
        .unwrap();
    let mut d_registered = true;
    match engine.unregister(d) {
        Err(err @ Error::Memory(MemoryError::Busy { range, batches })) => {
            assert_eq!(range, AddrRange::new(d, LEN as u64));
            assert_eq!(batches, 1);
            assert!(err.to_string().contains(&hex(d)), "{err}");
        }
        Ok(()) => {
            d_registered = false;
            // status(), not wait(): a waiter helps copy, which would finish the batch.
            let state = engine.status(id).unwrap();
            assert!(
                state.is_finished(),
                "unregister succeeded while the batch using the region was {state:?}"
            );
        }
        Err(other) => panic!("expected Busy, got {other:?}"),
    }
    let state = engine.cancel(id).unwrap();
    assert!(
        matches!(state, BatchState::Cancelled | BatchState::Completed),
        "{state:?}"
    );
    engine.unregister(s).unwrap();
    if d_registered {
        engine.unregister(d).unwrap();
    }
    engine.free(id).unwrap();
    // Every page moved whole or not at all, and only 0x5a could have been written.
    assert!(dst.iter().all(|&b| b == 0 || b == 0x5a));
}

/// free() of a batch that has not ended is refused with BatchInProgress. Batch B waits
/// behind a 256 MiB batch A on a single copy thread, so it has normally not started when
/// freed; if it had already ended, free succeeds and B's id is gone. B is 4 MiB, far more
/// than the in-process transport copies inline at submit (256 KiB), so it is queued.
#[test]
fn free_of_an_unfinished_batch_is_refused() {
    let engine = engine_with(PAGE, 1);
    let big_src = engine.allocate(BIG_PAGES * PAGE, Location::Any).unwrap();
    let big_dst = engine.allocate(BIG_PAGES * PAGE, Location::Any).unwrap();
    const HALF: usize = 1024;
    let small = engine.allocate(2 * HALF * PAGE, Location::Any).unwrap();
    stamp_buffer(&small, 0x15);
    let far = Instant::now() + LONG;
    let peer = engine.local_peer();
    let len = big_src.len() as u64;
    let a = engine
        .submit_with_deadline(peer, &[Op::write(big_src.addr(), big_dst.addr(), len)], far)
        .unwrap();
    let b = engine
        .submit_with_deadline(
            peer,
            &[Op::write(
                small.addr(),
                small.addr() + HALF as u64 * P,
                HALF as u64 * P,
            )],
            far,
        )
        .unwrap();
    match engine.free(b) {
        Err(err @ Error::BatchInProgress(raw)) => {
            assert_eq!(raw, b.raw());
            assert!(err.to_string().contains(&hex(raw)), "{err}");
            // Still known: it can be waited for and then freed.
            assert_completed(&engine.wait(b, LONG).unwrap());
            engine.free(b).unwrap();
        }
        Ok(()) => {
            // B only runs once the single copy thread has drained A, so A must have ended.
            assert!(matches!(engine.status(b), Err(Error::UnknownBatch(_))));
            let a_state = engine.status(a).unwrap();
            assert!(a_state.is_finished(), "B was freed while {a_state:?}");
        }
        Err(other) => panic!("expected BatchInProgress, got {other:?}"),
    }
    for i in 0..HALF {
        assert_eq!(
            buffer_page(&small, HALF + i),
            expected_page(i, 0x15),
            "page {i}"
        );
    }
    let state = engine.cancel(a).unwrap();
    assert!(state.is_finished(), "{state:?}");
    engine.free(a).unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Deadlines, cancel, wait
// ---------------------------------------------------------------------------------------

/// A deadline already passed at submit: no slice is claimed, wait returns TimedOut, no
/// byte moves, and the regions are free again.
#[test]
fn past_deadline_times_out_without_moving_bytes() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let src = engine.allocate(64 * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(64 * PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x16);
    let ops: Vec<Op> = (0..64)
        .map(|i| Op::write(src.addr() + i * P, dst.addr() + i * P, P))
        .collect();
    let deadline = Instant::now();
    let id = engine
        .submit_with_deadline(engine.local_peer(), &ops, deadline)
        .unwrap();
    let state = engine.wait(id, LONG).unwrap();
    assert!(matches!(state, BatchState::TimedOut), "{state:?}");
    assert!(matches!(engine.status(id).unwrap(), BatchState::TimedOut));
    assert!(matches!(state.into_result(), Err(Error::TimedOut)));
    assert!(
        dst.to_vec().iter().all(|&b| b == 0),
        "bytes moved after the deadline"
    );
    assert_eq!((src.region().pins(), dst.region().pins()), (0, 0));
    // Cancel of an ended batch reports how it ended.
    assert!(matches!(engine.cancel(id).unwrap(), BatchState::TimedOut));
    engine.free(id).unwrap();
}

/// Cancel of a running batch returns a finished state (Cancelled, or Completed if it won
/// the race); once it returns nothing touches the buffers: the regions unregister, every
/// page moved whole or not at all, and the destination no longer changes.
#[test]
fn cancel_quiesces_the_batch() {
    const LEN: usize = BIG_PAGES * PAGE;
    let src = stamped_vec(BIG_PAGES, 0x17);
    let mut dst = vec![0u8; LEN];
    let engine = engine_with(PAGE, 1);
    let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    // SAFETY: both Vecs are live, LEN bytes, declared before the engine and never resized;
    // the batch is cancelled and both regions unregistered before they are freed.
    unsafe {
        engine.register(s, LEN as u64, None, Access::ALL).unwrap();
        engine.register(d, LEN as u64, None, Access::ALL).unwrap();
    }
    let id = engine
        .submit(engine.local_peer(), &[Op::write(s, d, LEN as u64)])
        .unwrap();
    let state = engine.cancel(id).unwrap();
    assert!(
        matches!(state, BatchState::Cancelled | BatchState::Completed),
        "{state:?}"
    );
    let again = engine.status(id).unwrap();
    assert_eq!(
        std::mem::discriminant(&again),
        std::mem::discriminant(&state),
        "status {again:?} disagrees with cancel {state:?}"
    );
    engine.unregister(s).unwrap();
    engine.unregister(d).unwrap();

    let snapshot = dst.clone();
    let moved = pages_whole_or_untouched(&dst, 0x17);
    if matches!(state, BatchState::Completed) {
        assert_eq!(moved, BIG_PAGES, "Completed but pages are missing");
    } else {
        assert!(matches!(state.into_result(), Err(Error::Cancelled)));
    }
    assert!(snapshot == dst, "destination changed after cancel returned");
    engine.free(id).unwrap();
}

/// Cancel part-way through (after some pages are seen to have moved): the batch ends
/// Cancelled (or Completed if it won the race), the pages already moved are whole and
/// exact, none moves after cancel returns, and the source region unregisters at once.
#[test]
fn cancel_mid_flight_leaves_whole_pages_only() {
    const LEN: usize = BIG_PAGES * PAGE;
    let src = stamped_vec(BIG_PAGES, 0x25);
    let engine = engine_with(PAGE, 1);
    let dst = engine.allocate(LEN, Location::Any).unwrap();
    let s = src.as_ptr() as u64;
    // SAFETY: `src` is a live Vec of LEN bytes, declared before the engine and never
    // resized; the engine only reads it, and it is unregistered before it is freed.
    unsafe { engine.register(s, LEN as u64, None, Access::ALL) }.unwrap();
    let id = engine
        .submit(engine.local_peer(), &[Op::write(s, dst.addr(), LEN as u64)])
        .unwrap();
    spin_until_page_moved(&engine, id, &dst, BIG_PAGES / 16);
    let state = engine.cancel(id).unwrap();
    assert!(
        matches!(state, BatchState::Cancelled | BatchState::Completed),
        "{state:?}"
    );
    engine.unregister(s).unwrap();
    assert_eq!(
        dst.region().pins(),
        0,
        "an ended batch still pins its target"
    );

    let snapshot = dst.to_vec();
    let moved = pages_whole_or_untouched(&snapshot, 0x25);
    // Page k was seen (at least partly) moved before cancel, so it must now be whole.
    let k = BIG_PAGES / 16;
    assert_eq!(
        &snapshot[k * PAGE..][..PAGE],
        expected_page(k, 0x25).as_slice()
    );
    assert!(moved >= 1);
    if matches!(state, BatchState::Completed) {
        assert_eq!(moved, BIG_PAGES);
    }
    assert!(
        snapshot == dst.to_vec(),
        "destination changed after cancel returned"
    );
    engine.free(id).unwrap();
}

/// Cancel of a batch that already completed reports Completed (not Cancelled).
#[test]
fn cancel_after_completion_reports_completed() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let a = engine.allocate(4 * PAGE, Location::Any).unwrap();
    stamp_buffer(&a, 0x18);
    let id = engine
        .submit(
            engine.local_peer(),
            &[Op::write(a.addr(), a.addr() + 2 * P, 2 * P)],
        )
        .unwrap();
    assert_completed(&engine.wait(id, LONG).unwrap());
    assert_completed(&engine.cancel(id).unwrap());
    assert_completed(&engine.status(id).unwrap());
    engine.free(id).unwrap();
    assert_eq!(buffer_page(&a, 3), expected_page(1, 0x18));
}

/// wait with a zero timeout on a running batch returns InProgress or how it ended (here
/// only Completed is possible); once finished, status and further waits agree.
#[test]
fn zero_timeout_wait_and_status_agree() {
    let engine = engine_with(PAGE, 1);
    let src = engine
        .allocate(BIG_PAGES / 4 * PAGE, Location::Any)
        .unwrap();
    let dst = engine
        .allocate(BIG_PAGES / 4 * PAGE, Location::Any)
        .unwrap();
    stamp_buffer(&src, 0x19);
    let id = engine
        .submit(
            engine.local_peer(),
            &[Op::write(src.addr(), dst.addr(), src.len() as u64)],
        )
        .unwrap();
    let first = engine.wait(id, Duration::ZERO).unwrap();
    assert!(
        matches!(first, BatchState::InProgress | BatchState::Completed),
        "{first:?}"
    );
    if matches!(first, BatchState::InProgress) {
        assert!(!first.is_finished());
        assert!(matches!(first.clone().into_result(), Ok(false)));
    }
    let done = engine.wait(id, LONG).unwrap();
    assert_completed(&done);
    assert!(done.is_finished());
    assert!(matches!(done.into_result(), Ok(true)));
    assert_completed(&engine.status(id).unwrap());
    assert_completed(&engine.wait(id, Duration::ZERO).unwrap());
    engine.free(id).unwrap();
    for i in [0, 1, BIG_PAGES / 8, BIG_PAGES / 4 - 1] {
        assert_eq!(buffer_page(&dst, i), expected_page(i, 0x19), "page {i}");
    }
    assert!(dst.to_vec() == src.to_vec());
}

// ---------------------------------------------------------------------------------------
// 5. Concurrency
// ---------------------------------------------------------------------------------------

/// Four threads submit 50 batches each (alternating WRITE and READ batches) on one shared
/// engine into disjoint destination pages; every page lands where it should.
#[test]
fn concurrent_submitters_on_a_shared_engine() {
    const THREADS: usize = 4;
    const BATCHES: usize = 50;
    const PER: usize = 4;
    const TOTAL: usize = THREADS * BATCHES * PER;
    let engine = Arc::new(engine_with(PAGE, 2));
    let src = engine.allocate(TOTAL * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(TOTAL * PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x20);
    let (s, d) = (src.addr(), dst.addr());

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let engine = Arc::clone(&engine);
            thread::spawn(move || {
                let peer = engine.local_peer();
                let mut ids = Vec::with_capacity(BATCHES);
                for b in 0..BATCHES {
                    let first = (t * BATCHES + b) * PER;
                    // Within a batch the pages are reversed.
                    let ops: Vec<Op> = (0..PER)
                        .map(|k| {
                            let from = s + ((first + k) * PAGE) as u64;
                            let to = d + ((first + PER - 1 - k) * PAGE) as u64;
                            if b % 2 == 0 {
                                Op::write(from, to, P)
                            } else {
                                Op::read(to, from, P)
                            }
                        })
                        .collect();
                    ids.push(engine.submit(peer, &ops).unwrap());
                }
                for id in ids {
                    let state = engine.wait(id, LONG).unwrap();
                    assert!(matches!(state, BatchState::Completed), "{state:?}");
                    engine.free(id).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("submitter thread panicked");
    }
    for batch in 0..THREADS * BATCHES {
        for k in 0..PER {
            let from = batch * PER + k;
            let to = batch * PER + PER - 1 - k;
            assert_eq!(
                buffer_page(&dst, to),
                expected_page(from, 0x20),
                "page {from}"
            );
        }
    }
    assert_eq!(engine.live_batches(), 0);
}

// ---------------------------------------------------------------------------------------
// 6 & 7. Dropping buffers and engines while batches run
// ---------------------------------------------------------------------------------------

/// Dropping the source Buffer right after submitting a big batch that reads it is safe:
/// the region leaves the index at once, but the batch keeps the pages mapped, completes,
/// and delivers every byte. The old address is refused afterwards.
#[test]
fn dropping_a_buffer_in_use_is_safe() {
    let engine = engine_with(PAGE, 1);
    let src = engine.allocate(BIG_PAGES * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(BIG_PAGES * PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x21);
    let (s, len) = (src.addr(), src.len() as u64);
    let id = engine
        .submit(engine.local_peer(), &[Op::write(s, dst.addr(), len)])
        .unwrap();
    drop(src);
    assert!(
        engine.region(s).is_none(),
        "a dropped buffer stays registered"
    );

    let state = engine.wait(id, LONG).unwrap();
    assert_completed(&state);
    engine.free(id).unwrap();
    for i in 0..BIG_PAGES {
        assert_eq!(buffer_page(&dst, i), expected_page(i, 0x21), "page {i}");
    }
    let err = engine
        .submit(engine.local_peer(), &[Op::write(s, dst.addr(), P)])
        .unwrap_err();
    assert!(
        matches!(err, Error::NotRegistered { op: 0, side: Side::Local, at, .. } if at == s),
        "{err:?}"
    );
}

/// Dropping the engine with big batches in flight over caller memory returns (cancel on
/// drop) and quiesces: afterwards every page moved whole or not at all and the memory no
/// longer changes, so it may be freed.
#[test]
fn dropping_the_engine_with_batches_in_flight_quiesces() {
    const LEN: usize = BIG_PAGES * PAGE;
    const QUARTER: u64 = (LEN / 4) as u64;
    let src = stamped_vec(BIG_PAGES, 0x23);
    let mut dst = vec![0u8; LEN];
    {
        let engine = engine_with(PAGE, 1);
        let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
        // SAFETY: both Vecs are live, LEN bytes, declared before the engine and never
        // resized; they outlive the engine, whose drop cancels and quiesces every batch.
        unsafe {
            engine.register(s, LEN as u64, None, Access::ALL).unwrap();
            engine.register(d, LEN as u64, None, Access::ALL).unwrap();
        }
        let far = Instant::now() + LONG;
        for q in 0..4 {
            let op = Op::write(s + q * QUARTER, d + q * QUARTER, QUARTER);
            engine
                .submit_with_deadline(engine.local_peer(), &[op], far)
                .unwrap();
        }
        assert_eq!(engine.live_batches(), 4);
        drop(engine);
    }
    let snapshot = dst.clone();
    pages_whole_or_untouched(&dst, 0x23);
    assert!(
        snapshot == dst,
        "destination changed after the engine was dropped"
    );
}

/// Buffers may outlive their engine: dropping the engine mid-batch cancels it, and the
/// buffers stay readable (each page whole or untouched) and drop cleanly afterwards.
#[test]
fn buffers_outlive_a_dropped_engine() {
    let engine = engine_with(PAGE, 1);
    let src = engine.allocate(BIG_PAGES * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(BIG_PAGES * PAGE, Location::Any).unwrap();
    stamp_buffer(&src, 0x24);
    let len = src.len() as u64;
    let id = engine
        .submit(
            engine.local_peer(),
            &[Op::write(src.addr(), dst.addr(), len)],
        )
        .unwrap();
    spin_until_page_moved(&engine, id, &dst, BIG_PAGES / 16);
    drop(engine);
    let snapshot = dst.to_vec();
    pages_whole_or_untouched(&snapshot, 0x24);
    assert!(
        snapshot == dst.to_vec(),
        "destination changed after the engine was dropped"
    );
    assert_eq!(buffer_page(&src, 7), expected_page(7, 0x24));
    drop(src);
    drop(dst);
}

// ---------------------------------------------------------------------------------------
// 8. allocate, locations, Buffer accessors, engine info
// ---------------------------------------------------------------------------------------

/// allocate refuses GPU locations, zero length and impossible NUMA nodes, each with its
/// own MemoryError naming what was asked for.
#[test]
fn allocate_refusals() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let err = engine.allocate(PAGE, Location::Cuda(0)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Memory(MemoryError::UnsupportedLocation {
                location: Location::Cuda(0),
                ..
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("cuda:0"), "{err}");

    let err = engine.allocate(0, Location::Any).unwrap_err();
    assert!(
        matches!(err, Error::Memory(MemoryError::ZeroLength { .. })),
        "{err:?}"
    );

    let err = engine.allocate(PAGE, Location::Cpu(5000)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Memory(MemoryError::UnsupportedLocation {
                location: Location::Cpu(5000),
                ..
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("cpu:5000"), "{err}");
    assert!(err.to_string().contains("no such NUMA node"), "{err}");
}

/// allocate on NUMA node 0 (where the kernel has one) records the location; the region is
/// found by any address inside it, with its exact length even when not page sized.
#[test]
fn allocate_on_cpu0_reports_its_location() {
    if !Path::new("/sys/devices/system/node/node0").exists() {
        eprintln!("no NUMA node 0 on this host; skipping");
        return;
    }
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let len = 10_000;
    let buf = engine.allocate(len, Location::Cpu(0)).unwrap();
    assert_eq!(buf.len(), len);
    assert!(!buf.is_empty());
    assert_eq!(buf.region().location(), Location::Cpu(0));
    let region = engine
        .region(buf.addr() + len as u64 - 1)
        .expect("last byte is registered");
    assert_eq!(region.location(), Location::Cpu(0));
    assert_eq!(region.range(), AddrRange::new(buf.addr(), len as u64));
    assert_eq!(region.access(), Access::ALL);
    assert!(
        engine.region(buf.addr() + len as u64).is_none(),
        "registered past its length"
    );

    // The bytes past `len` (in the same page) are not usable by ops.
    let err = engine
        .submit(
            engine.local_peer(),
            &[Op::write(buf.addr(), buf.addr() + 9_999, 2)],
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::NotRegistered { side: Side::Remote, at, .. } if at == buf.addr() + len as u64),
        "{err:?}"
    );
    let addr = buf.addr();
    drop(buf);
    assert!(
        engine.region(addr).is_none(),
        "dropping a Buffer unregisters it"
    );
}

/// Buffer accessors copy exactly and refuse out-of-bounds ranges.
#[test]
fn buffer_accessors_check_bounds() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let buf = engine.allocate(1000, Location::Any).unwrap();
    buf.fill(0, 1000, 0xab).unwrap();
    buf.write_at(990, b"0123456789").unwrap();
    let mut out = [0u8; 12];
    buf.read_at(988, &mut out).unwrap();
    assert_eq!(&out, b"\xab\xab0123456789");
    assert!(buf.write_at(991, b"0123456789").is_err());
    assert!(buf.read_at(usize::MAX, &mut out).is_err());
    assert!(buf.fill(999, 2, 0).is_err());
    let v = buf.to_vec();
    assert_eq!(v.len(), 1000);
    assert!(v[..990].iter().all(|&b| b == 0xab));
    assert_eq!(&v[990..], b"0123456789");
}

/// The engine's own peer is the in-process transport, named "self"; bad configurations
/// are refused naming the value.
#[test]
fn local_peer_and_config() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let me = engine.local_peer();
    assert_eq!(engine.peer_transport(me).unwrap(), TransportKind::Local);
    assert_eq!(engine.peer_name(me).unwrap(), "self");
    let transports = engine.transports();
    assert_eq!(transports.len(), 4);
    assert_eq!(transports[0].kind, TransportKind::Local);
    assert_eq!(transports[1].kind, TransportKind::Shm);
    assert!(
        transports[1].detail.contains("serving @kvxfer."),
        "{}",
        transports[1].detail
    );
    // RDMA is used or says why not, in one line.
    assert_eq!(transports[2].kind, TransportKind::Rdma);
    assert!(
        transports[2].detail.starts_with("RDMA RC over")
            || transports[2].detail.starts_with("not used: "),
        "{}",
        transports[2].detail
    );
    assert_eq!(transports[3].kind, TransportKind::Tcp);
    assert!(
        transports[3].detail.contains(engine.session_id().unwrap()),
        "{}",
        transports[3].detail
    );

    let bad = EngineConfig {
        slice_size: 100,
        ..EngineConfig::default()
    };
    let err = Engine::new(bad).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("slice_size 100"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

/// stats() counts accepted and refused submissions, each outcome, and the bytes of
/// completed slices only.
#[test]
fn stats_count_outcomes_and_bytes() {
    let engine = engine_with(PAGE, 2);
    let src = engine.allocate(64 * PAGE, Location::Any).unwrap();
    let dst = engine.allocate(64 * PAGE, Location::Any).unwrap();
    let peer = engine.local_peer();
    assert_eq!(engine.stats(), kvxfer::EngineStats::default());

    let whole = Op::write(src.addr(), dst.addr(), 64 * P);
    engine.transfer_sync(peer, &[whole]).unwrap();
    engine
        .transfer_sync(peer, &[Op::read(dst.addr(), src.addr(), 3 * P)])
        .unwrap();
    let id = engine.submit(peer, &[]).unwrap();
    engine.free(id).unwrap();
    assert!(engine.submit(peer, &[Op::write(src.addr(), 8, P)]).is_err());
    let late = engine
        .submit_with_deadline(peer, &[whole], Instant::now() - Duration::from_millis(1))
        .unwrap();
    assert!(matches!(
        engine.wait(late, LONG).unwrap(),
        BatchState::TimedOut
    ));
    engine.free(late).unwrap();

    let stats = engine.stats();
    assert_eq!(stats.batches_submitted, 4, "{stats:?}");
    assert_eq!(stats.submits_refused, 1, "{stats:?}");
    assert_eq!(stats.batches_completed, 3, "{stats:?}");
    assert_eq!(stats.batches_timed_out, 1, "{stats:?}");
    assert_eq!(
        stats.batches_failed + stats.batches_cancelled,
        0,
        "{stats:?}"
    );
    assert_eq!(stats.bytes_moved, 67 * P, "{stats:?}");
}

// ---------------------------------------------------------------------------------------
// Refusals found in review
// ---------------------------------------------------------------------------------------

/// An allocation larger than the machine can give is refused, not faulted in until the
/// kernel kills the process.
#[test]
fn allocation_beyond_available_memory_is_refused() {
    let engine = engine_with(PAGE, 1);
    let err = engine.allocate(1 << 50, Location::Any).unwrap_err();
    assert!(
        matches!(err, Error::Memory(MemoryError::AllocationFailed { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("available"), "{err}");
}

/// Engine-owned memory is released by dropping its buffer, not by unregister.
#[test]
fn unregister_of_an_engine_buffer_is_refused() {
    let engine = engine_with(PAGE, 1);
    let buf = engine.allocate(PAGE, Location::Any).unwrap();
    let err = engine.unregister(buf.addr()).unwrap_err();
    assert!(
        matches!(err, Error::Memory(MemoryError::OwnedByBuffer { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("drop the buffer"), "{err}");
    assert!(engine.region(buf.addr()).is_some(), "still registered");
    let addr = buf.addr();
    drop(buf);
    assert!(
        engine.region(addr).is_none(),
        "dropping the buffer unregisters it"
    );
}

/// Address 0 is never memory.
#[test]
fn registering_null_is_refused() {
    let engine = engine_with(PAGE, 1);
    // SAFETY: the call is refused before anything could use the (invalid) range.
    let err = unsafe { engine.register(0, 4096, None, Access::ALL) }.unwrap_err();
    assert!(
        matches!(err, Error::Memory(MemoryError::NullAddress { len: 4096 })),
        "{err:?}"
    );
}

/// On the loopback peer an op whose source and destination overlap cannot be copied in
/// parallel slices; it is refused and nothing moves.
#[test]
fn self_overlapping_op_is_refused_and_moves_nothing() {
    let engine = engine_with(PAGE, 2);
    let buf = engine.allocate(64 * PAGE, Location::Any).unwrap();
    stamp_buffer(&buf, 0x31);
    let before = buf.to_vec();
    let op = Op::write(buf.addr(), buf.addr() + P, 32 * P);
    let err = engine.submit(engine.local_peer(), &[op]).unwrap_err();
    assert!(matches!(err, Error::OverlappingOp { op: 0, .. }), "{err:?}");
    assert_eq!(buf.to_vec(), before);
}

/// status() stops a batch past its deadline without anyone waiting: a batch queued behind
/// a big one reports TimedOut at once instead of after the big one. One copy thread with
/// 64 MiB slices is busy for milliseconds per slice, and B (512 KiB, above the inline
/// limit) is queued behind A, so only status() can end B this early.
#[test]
fn status_times_out_a_queued_batch_past_its_deadline() {
    const BIG: usize = 256 << 20;
    let engine = engine_with(64 << 20, 1);
    let big_src = engine.allocate(BIG, Location::Any).unwrap();
    let big_dst = engine.allocate(BIG, Location::Any).unwrap();
    let small = engine.allocate(1 << 20, Location::Any).unwrap();
    let peer = engine.local_peer();
    let far = Instant::now() + LONG;
    let a = engine
        .submit_with_deadline(
            peer,
            &[Op::write(big_src.addr(), big_dst.addr(), BIG as u64)],
            far,
        )
        .unwrap();
    let past = Instant::now() - Duration::from_millis(1);
    let half = Op::write(small.addr(), small.addr() + (512 << 10), 512 << 10);
    let b = engine.submit_with_deadline(peer, &[half], past).unwrap();
    assert!(matches!(engine.status(b).unwrap(), BatchState::TimedOut));
    assert_eq!(
        small.to_vec()[512 << 10..],
        vec![0; 512 << 10],
        "a timed-out batch moved bytes"
    );
    engine.free(b).unwrap();
    assert!(engine.cancel(a).unwrap().is_finished());
}

/// Memory registered as GPU memory is never copied with the CPU: a batch touching it
/// over the in-process transport is refused (nothing moves, no fault), naming the
/// location and the transport.
#[test]
fn gpu_memory_is_refused_by_cpu_transports() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let host = engine.allocate(4096, Location::Any).unwrap();
    // Host bytes declared cuda:0: the engine must treat them as unreachable by CPU copies.
    let mut fake_vram = vec![7u8; 4096];
    // SAFETY: the vector outlives its registration (unregistered below).
    unsafe {
        engine
            .register(
                fake_vram.as_mut_ptr() as u64,
                4096,
                Some(Location::Cuda(0)),
                kvxfer::Access::ALL,
            )
            .unwrap();
    }
    let op = Op::write(host.addr(), fake_vram.as_ptr() as u64, 4096);
    match engine.submit(engine.local_peer(), &[op]) {
        Err(kvxfer::Error::GpuUnreachable {
            location,
            transport,
        }) => {
            assert_eq!(location, Location::Cuda(0));
            assert_eq!(transport, kvxfer::TransportKind::Local);
        }
        other => panic!("expected GpuUnreachable, got {other:?}"),
    }
    assert!(fake_vram.iter().all(|&b| b == 7), "bytes moved");
    engine.unregister(fake_vram.as_ptr() as u64).unwrap();
}
