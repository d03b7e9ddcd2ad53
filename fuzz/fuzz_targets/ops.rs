//! `Engine::submit` on arbitrary batches against a few engine buffers (one of them
//! read-only to peers): a batch is accepted exactly when every op is non-empty, its two
//! ranges do not partly overlap (one address space: the loopback peer), and every
//! byte of both its ranges lies in registered memory with the rights its direction needs;
//! an accepted batch completes, and when no op's destination overlaps another op's bytes
//! the buffers then hold what a sequential reference copy predicts. A refused batch moves
//! nothing and leaves no batch behind.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use kvxfer::{Access, Buffer, Engine, EngineConfig, Location, Op, OpKind};
use libfuzzer_sys::fuzz_target;

/// Bytes of input per op.
const OP_BYTES: usize = 10;
const MAX_OPS: usize = 64;

struct World {
    engine: Engine,
    buffers: Vec<Buffer>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // Small slices, so that ops are cut into several pieces.
        let config = EngineConfig::builder()
            .slice_size(4096)
            .build()
            .expect("config");
        let engine = Engine::new(config).expect("engine");
        let buffers = [
            (64 << 10, Access::ALL),
            (10_000, Access::ALL),
            (8192, Access::LOCAL_READ | Access::REMOTE_READ),
        ]
        .into_iter()
        .map(|(len, access)| {
            engine
                .allocate_with_access(len, Location::Any, access)
                .expect("allocate")
        })
        .collect();
        World { engine, buffers }
    })
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let engine = &world.engine;
    let ops: Vec<Op> = data
        .chunks_exact(OP_BYTES)
        .take(MAX_OPS)
        .map(|b| decode(world, b))
        .collect();

    let before: Vec<Vec<u8>> = world.buffers.iter().map(Buffer::to_vec).collect();
    let expect_ok = ops.iter().all(|op| op_is_valid(world, op));
    let live = engine.live_batches();

    match engine.submit(engine.local_peer(), &ops) {
        Ok(id) => {
            assert!(expect_ok, "accepted an invalid batch: {ops:x?}");
            let state = engine.wait(id, Duration::from_secs(30)).expect("wait");
            assert!(
                matches!(state.into_result(), Ok(true)),
                "valid batch did not complete: {ops:x?}"
            );
            engine.free(id).expect("free");
            if !overlapping(&ops) {
                let mut model = before;
                for op in &ops {
                    model_copy(world, &mut model, op);
                }
                for (buffer, want) in world.buffers.iter().zip(&model) {
                    assert!(
                        buffer.to_vec() == *want,
                        "bytes differ from the model: {ops:x?}"
                    );
                }
            }
        }
        Err(err) => {
            assert!(!expect_ok, "refused a valid batch ({err}): {ops:x?}");
            assert!(!err.to_string().is_empty());
            for (buffer, was) in world.buffers.iter().zip(&before) {
                assert!(buffer.to_vec() == *was, "a refused batch moved bytes");
            }
        }
    }
    assert_eq!(engine.live_batches(), live, "batch left behind");
});

/// One op from 10 bytes: flags (direction, and for each side which buffer or an arbitrary
/// address), 3-byte offsets per side (may run past a buffer), 3-byte length (may be 0).
fn decode(world: &World, b: &[u8]) -> Op {
    let flags = b[0];
    let u24 = |x: &[u8]| u64::from(x[0]) | u64::from(x[1]) << 8 | u64::from(x[2]) << 16;
    let addr = |which: u8, offset: u64| match world.buffers.get(usize::from(which)) {
        Some(buffer) => buffer.addr().wrapping_add(offset),
        // Unregistered, or near the top of the address space (overflow checks).
        None if offset & 1 == 0 => offset,
        None => u64::MAX - offset,
    };
    let local = addr((flags >> 1) & 3, u24(&b[1..4]));
    let remote = addr((flags >> 3) & 3, u24(&b[4..7]));
    // Mostly short ops, sometimes long ones.
    let len = u24(&b[7..10]) >> if flags & 0x20 != 0 { 0 } else { 10 };
    if flags & 1 == 0 {
        Op::write(local, remote, len)
    } else {
        Op::read(local, remote, len)
    }
}

/// The buffer and offset holding `addr`, if any.
fn locate(world: &World, addr: u64) -> Option<(usize, usize)> {
    world.buffers.iter().enumerate().find_map(|(i, b)| {
        let offset = addr.checked_sub(b.addr())?;
        (offset < b.len() as u64).then_some((i, offset as usize))
    })
}

/// Whether every byte of `[addr, addr + len)` is registered with `need`.
fn covered(world: &World, addr: u64, len: u64, need: Access) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    while at < end {
        let Some((i, offset)) = locate(world, at) else {
            return false;
        };
        let region = world.buffers[i].region();
        if !region.access().contains(need) {
            return false;
        }
        at += (world.buffers[i].len() - offset) as u64;
    }
    true
}

fn op_is_valid(world: &World, op: &Op) -> bool {
    let (local, remote) = match op.kind {
        OpKind::Write => (Access::LOCAL_READ, Access::REMOTE_WRITE),
        OpKind::Read => (Access::LOCAL_WRITE, Access::REMOTE_READ),
    };
    // The loopback peer shares one address space: ranges that partly overlap are refused
    // (identical ranges copy onto themselves and are fine).
    let partial_overlap = op.local_addr != op.remote_addr
        && op.local_addr < op.remote_addr.saturating_add(op.len)
        && op.remote_addr < op.local_addr.saturating_add(op.len);
    op.len > 0
        && !partial_overlap
        && covered(world, op.local_addr, op.len, local)
        && covered(world, op.remote_addr, op.len, remote)
}

/// (source, destination) of an op.
fn ends(op: &Op) -> (u64, u64) {
    match op.kind {
        OpKind::Write => (op.local_addr, op.remote_addr),
        OpKind::Read => (op.remote_addr, op.local_addr),
    }
}

/// Whether some op's destination overlaps any byte another op (or itself, as source)
/// touches; then slices copied in parallel may race and the result is not predictable.
fn overlapping(ops: &[Op]) -> bool {
    let hit = |a: u64, b: u64, len_a: u64, len_b: u64| a < b + len_b && b < a + len_a;
    ops.iter().enumerate().any(|(i, x)| {
        let (_, dst) = ends(x);
        ops.iter().enumerate().any(|(j, y)| {
            let (src_y, dst_y) = ends(y);
            hit(dst, src_y, x.len, y.len) || (i != j && hit(dst, dst_y, x.len, y.len))
        })
    })
}

/// Applies `op` to the model. Buffers may be adjacent in memory, so copy byte by byte
/// through addresses (ops are short, and only checked ones reach here).
fn model_copy(world: &World, model: &mut [Vec<u8>], op: &Op) {
    let (src, dst) = ends(op);
    let bytes: Vec<u8> = (0..op.len)
        .map(|k| {
            let (i, o) = locate(world, src + k).expect("checked");
            model[i][o]
        })
        .collect();
    for (k, byte) in bytes.into_iter().enumerate() {
        let (i, o) = locate(world, dst + k as u64).expect("checked");
        model[i][o] = byte;
    }
}
