//! Benchmarks of the in-process transport, each paired with a plain-memcpy baseline of the
//! same bytes in the same layout, so that the engine's own cost can be read off one run:
//!
//! * `submit_wait/{4KiB,64KiB}/{1,32,1024}`: one `submit` + `wait` + `free` of a batch of
//!   that many ops (page i of the source to slot `batch - 1 - i` of the destination),
//!   reported per op (`Throughput::Elements`).
//! * `memcpy_baseline/{4KiB,64KiB}/{1,32,1024}`: the same copies with `copy_from_slice`
//!   between two `Vec<u8>`, per op. Engine overhead per op = `submit_wait` − `memcpy_baseline`.
//! * `copy_128MiB/{engine,memcpy}`: 128 ops × 1 MiB through the engine vs. 128
//!   `copy_from_slice` of 1 MiB, reported as bytes per second.
//!
//! * `cpu_time/{submit_wait,memcpy}/4KiB/1024`: the 4 KiB × 1024 pair again, measured in
//!   CPU time of every thread of the process instead of wall-clock time, so the engine is
//!   charged for all of its copy threads: the difference is its CPU overhead per op.
//!
//! The engine runs with its default configuration: its copy threads (CPU count, at most 4)
//! and the waiting caller all copy, so on several cores it can beat the single-threaded
//! baseline. The difference is therefore the wall-clock cost of going through the engine,
//! not its CPU cost (`perf stat` shows the CPUs used).
//!
//! Every buffer is touched before timing, and each engine configuration's result is checked
//! once (outside the timing) so that a broken transport cannot look fast.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use kvxfer::{Buffer, Engine, EngineConfig, Location, Op};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Op sizes of `submit_wait` / `memcpy_baseline`, with their labels.
const OP_SIZES: [(usize, &str); 2] = [(4 * KIB, "4KiB"), (64 * KIB, "64KiB")];
/// Ops per batch.
const BATCHES: [usize; 3] = [1, 32, 1024];

/// The largest batch; buffers are sized for it.
const MAX_BATCH: usize = BATCHES[BATCHES.len() - 1];

/// How long one submit + wait may take before the bench calls it broken.
const WAIT: Duration = Duration::from_secs(10);

/// Modest times, so that the whole bench runs in a minute or two on two cores.
fn configure<M: Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
}

fn engine() -> Engine {
    Engine::new(EngineConfig::default()).expect("engine starts")
}

/// Two touched engine buffers of `len` bytes: a source filled with a pattern that differs
/// per page (so a misplaced page is caught) and a zeroed destination.
fn engine_buffers(engine: &Engine, len: usize, page: usize) -> (Buffer, Buffer) {
    let src = engine.allocate(len, Location::Any).expect("allocate src");
    let dst = engine.allocate(len, Location::Any).expect("allocate dst");
    for (i, offset) in (0..len).step_by(page).enumerate() {
        src.fill(offset, page.min(len - offset), page_byte(i))
            .expect("fill src");
    }
    dst.fill(0, len, 0).expect("fill dst");
    (src, dst)
}

/// Two touched `Vec`s laid out as [`engine_buffers`].
fn vec_buffers(len: usize, page: usize) -> (Vec<u8>, Vec<u8>) {
    let mut src = vec![0u8; len];
    for (i, chunk) in src.chunks_mut(page).enumerate() {
        chunk.fill(page_byte(i));
    }
    // `vec![0; n]` may hand out untouched zero pages; write every byte.
    let mut dst = vec![1u8; len];
    dst.fill(0);
    (src, dst)
}

fn page_byte(i: usize) -> u8 {
    (i % 251) as u8 + 1
}

/// Slot of page `i` in the destination: reversed, so source and destination offsets differ.
fn slot(i: usize, batch: usize) -> usize {
    batch - 1 - i
}

/// `batch` ops of `size` bytes: page i of `src` to slot `slot(i)` of `dst`.
fn ops(src: &Buffer, dst: &Buffer, size: usize, batch: usize) -> Vec<Op> {
    (0..batch)
        .map(|i| {
            Op::write(
                src.addr() + (i * size) as u64,
                dst.addr() + (slot(i, batch) * size) as u64,
                size as u64,
            )
        })
        .collect()
}

/// One batch through the engine: submit, wait for completion, free.
fn submit_wait_free(engine: &Engine, ops: &[Op]) {
    let id = engine
        .submit(engine.local_peer(), black_box(ops))
        .expect("submit");
    let state = engine.wait(id, WAIT).expect("wait");
    assert!(
        state.into_result().expect("batch fails"),
        "batch still running after {WAIT:?}"
    );
    engine.free(id).expect("free");
}

/// The memcpy equivalent of one batch: page i of `src` to slot `slot(i)` of `dst`.
fn memcpy_pages(src: &[u8], dst: &mut [u8], size: usize, batch: usize) {
    for i in 0..batch {
        let s = slot(i, batch);
        dst[s * size..(s + 1) * size].copy_from_slice(&src[i * size..(i + 1) * size]);
    }
}

/// Checks that page i of `src` landed at slot `slot(i)` of `dst`.
fn check_layout(src: &[u8], dst: &[u8], size: usize, batch: usize) {
    for i in 0..batch {
        let s = slot(i, batch);
        assert!(
            dst[s * size..(s + 1) * size] == src[i * size..(i + 1) * size],
            "page {i} (of {batch}, {size} bytes) did not land in slot {s}"
        );
    }
}

fn submit_wait(c: &mut Criterion) {
    let engine = engine();
    let mut group = c.benchmark_group("submit_wait");
    configure(&mut group);
    for (size, label) in OP_SIZES {
        // One pair of buffers per op size, big enough for the largest batch; made on first
        // use so that a filtered run does not allocate what it does not time.
        // (Criterion calls the closure once per sample: set up and check only the first time.)
        let mut buffers = None;
        for batch in BATCHES {
            let mut batch_ops = None;
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(label, batch), |b| {
                let (src, dst) =
                    buffers.get_or_insert_with(|| engine_buffers(&engine, size * MAX_BATCH, size));
                let ops = batch_ops.get_or_insert_with(|| {
                    let ops = ops(src, dst, size, batch);
                    submit_wait_free(&engine, &ops);
                    check_layout(&src.to_vec(), &dst.to_vec(), size, batch);
                    ops
                });
                b.iter(|| submit_wait_free(&engine, ops))
            });
        }
    }
    group.finish();
}

fn memcpy_baseline(c: &mut Criterion) {
    let mut group = c.benchmark_group("memcpy_baseline");
    configure(&mut group);
    for (size, label) in OP_SIZES {
        let mut buffers = None;
        for batch in BATCHES {
            let mut checked = false;
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(label, batch), |b| {
                let (src, dst) = buffers.get_or_insert_with(|| vec_buffers(size * MAX_BATCH, size));
                if !std::mem::replace(&mut checked, true) {
                    memcpy_pages(src, dst, size, batch);
                    check_layout(src, dst, size, batch);
                }
                b.iter(|| memcpy_pages(black_box(src), black_box(dst), size, batch))
            });
        }
    }
    group.finish();
}

fn copy_128mib(c: &mut Criterion) {
    const OPS: usize = 128;
    const SIZE: usize = MIB;
    const TOTAL: usize = OPS * SIZE;
    let mut group = c.benchmark_group("copy_128MiB");
    configure(&mut group);
    // Milliseconds per iteration: a fixed number of iterations per sample is plenty.
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(TOTAL as u64));

    let engine = engine();
    let mut engine_state = None;
    group.bench_function("engine", |b| {
        let (_src, _dst, ops) = engine_state.get_or_insert_with(|| {
            let (src, dst) = engine_buffers(&engine, TOTAL, SIZE);
            let ops: Vec<Op> = (0..OPS)
                .map(|i| {
                    let at = (i * SIZE) as u64;
                    Op::write(src.addr() + at, dst.addr() + at, SIZE as u64)
                })
                .collect();
            submit_wait_free(&engine, &ops);
            assert!(dst.to_vec() == src.to_vec(), "engine copy is wrong");
            (src, dst, ops)
        });
        b.iter(|| submit_wait_free(&engine, ops))
    });
    // Give the engine's 256 MiB back before the memcpy buffers are made.
    drop(engine_state);
    drop(engine);

    let mut vecs = None;
    group.bench_function("memcpy", |b| {
        let (src, dst) = vecs.get_or_insert_with(|| {
            let (src, mut dst) = vec_buffers(TOTAL, SIZE);
            memcpy_1mib(&src, &mut dst);
            assert!(dst == src, "memcpy copy is wrong");
            (src, dst)
        });
        b.iter(|| memcpy_1mib(black_box(src), black_box(dst)));
    });
    group.finish();
}

/// 128 × `copy_from_slice` of 1 MiB.
fn memcpy_1mib(src: &[u8], dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(MIB).zip(src.chunks_exact(MIB)) {
        d.copy_from_slice(s);
    }
}

/// CPU time consumed by every thread of this process: the sum of the run times the
/// scheduler reports in `/proc/self/task/*/schedstat` (nanoseconds).
struct ProcessCpuTime;

fn process_cpu_ns() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task is readable")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

impl Measurement for ProcessCpuTime {
    type Intermediate = u64;
    type Value = Duration;

    fn start(&self) -> u64 {
        process_cpu_ns()
    }

    fn end(&self, start: u64) -> Duration {
        Duration::from_nanos(process_cpu_ns().saturating_sub(start))
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as wall time's are, so its formatter prints them right.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

/// The 4 KiB × 1024 pair in CPU time of all threads.
fn cpu_time(c: &mut Criterion<ProcessCpuTime>) {
    const SIZE: usize = 4 * KIB;
    const BATCH: usize = 1024;
    let mut group = c.benchmark_group("cpu_time");
    configure(&mut group);
    group.throughput(Throughput::Elements(BATCH as u64));
    let engine = engine();
    let (src, dst) = engine_buffers(&engine, SIZE * BATCH, SIZE);
    let batch_ops = ops(&src, &dst, SIZE, BATCH);
    submit_wait_free(&engine, &batch_ops);
    check_layout(&src.to_vec(), &dst.to_vec(), SIZE, BATCH);
    group.bench_function("submit_wait/4KiB/1024", |b| {
        b.iter(|| submit_wait_free(&engine, &batch_ops))
    });
    let (vsrc, mut vdst) = vec_buffers(SIZE * BATCH, SIZE);
    group.bench_function("memcpy/4KiB/1024", |b| {
        b.iter(|| memcpy_pages(black_box(&vsrc), black_box(&mut vdst), SIZE, BATCH))
    });
    group.finish();
}

/// `criterion_group!` makes an undocumented `pub fn`; a private module keeps it internal.
mod group {
    criterion::criterion_group!(
        benches,
        super::submit_wait,
        super::memcpy_baseline,
        super::copy_128mib
    );
    criterion::criterion_group! {
        name = cpu;
        config = criterion::Criterion::default().with_measurement(super::ProcessCpuTime);
        targets = super::cpu_time
    }
}
criterion_main!(group::benches, group::cpu);
