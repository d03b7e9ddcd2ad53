//! The RDMA building blocks on real verbs: two NICs of the soft-RoCE VM (rxe0, rxe1) in
//! one process, queue pairs connected directly (no control plane), batches of WRITEs and
//! READs between registered buffers through endpoints and [`RdmaTransport`], a key the
//! peer did not publish, and a wrong key the NIC refuses. Run where `RDMA_VM=1`; skipped
//! elsewhere.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::memory::{Access, Location, RegionSpec, Registry};
use crate::sys::verbs::{DeviceList, Verbs};
use crate::transport::{OpKind, Slice, SliceSource, TransportError};

/// A batch as a transport sees it, recording what completed.
struct Work {
    slices: Vec<Slice>,
    next: AtomicUsize,
    chunk: usize,
    done: Mutex<(usize, Vec<TransportError>)>,
    ended: Condvar,
}

impl Work {
    fn new(slices: Vec<Slice>) -> Arc<Work> {
        Arc::new(Work {
            slices,
            next: AtomicUsize::new(0),
            chunk: 8,
            done: Mutex::new((0, Vec::new())),
            ended: Condvar::new(),
        })
    }

    /// Waits until every slice completed; the errors.
    fn wait(&self) -> Vec<TransportError> {
        let until = Instant::now() + Duration::from_secs(30);
        let mut done = self.done.lock().unwrap();
        while done.0 < self.slices.len() {
            let left = until.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the batch did not end: {} of {} done",
                done.0,
                self.slices.len()
            );
            done = self.ended.wait_timeout(done, left).unwrap().0;
        }
        done.1.clone()
    }
}

impl SliceSource for Work {
    fn slices(&self) -> &[Slice] {
        &self.slices
    }

    fn claim(&self) -> Option<Range<usize>> {
        let start = self.next.fetch_add(self.chunk, Ordering::AcqRel);
        (start < self.slices.len()).then(|| start..(start + self.chunk).min(self.slices.len()))
    }

    fn complete(&self, range: Range<usize>, result: Result<(), TransportError>) {
        let mut done = self.done.lock().unwrap();
        done.0 += range.len();
        if let Err(e) = result {
            done.1.push(e);
        }
        self.ended.notify_all();
    }

    fn is_stopped(&self) -> bool {
        false
    }
}

struct Rig {
    workers: Vec<Arc<NicWorker>>,
    mrs: Arc<MrTable>,
    _registry: Registry,
    bufs: Vec<Vec<u8>>,
}

const LEN: usize = 1 << 20;

fn rig() -> Option<Rig> {
    if std::env::var("RDMA_VM").as_deref() != Ok("1") {
        println!("skipped: not in the RDMA VM (RDMA_VM=1 unset)");
        return None;
    }
    let verbs = Verbs::load().expect("libibverbs");
    let list = DeviceList::new(verbs).expect("devices");
    let workers: Vec<Arc<NicWorker>> = ["rxe0", "rxe1"]
        .iter()
        .map(|name| {
            NicWorker::start(Arc::new(Nic::open(verbs, &list, name, None).unwrap())).unwrap()
        })
        .collect();
    let nics = workers.iter().map(|w| w.nic_arc()).collect();
    let mrs = Arc::new(MrTable::new(nics));
    let registry = Registry::new();
    let bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; LEN]).collect();
    for (i, b) in bufs.iter().enumerate() {
        // Buffer 3 is on NUMA node 0 (for the NIC choice by location).
        let location = if i == 3 {
            Location::Cpu(0)
        } else {
            Location::Any
        };
        let region = registry
            .register(vec![RegionSpec::caller(
                b.as_ptr() as u64,
                LEN as u64,
                Some(location),
                Access::ALL,
            )])
            .unwrap()
            .remove(0);
        mrs.add(&region).unwrap();
    }
    Some(Rig {
        workers,
        mrs,
        _registry: registry,
        bufs,
    })
}

impl Rig {
    /// A connected pair: an endpoint on NIC `from` to NIC `to`, and its partner.
    fn pair(
        &self,
        from: usize,
        to: usize,
        keys: Arc<RemoteKeys>,
    ) -> (Arc<Endpoint>, Arc<Endpoint>) {
        let a = Endpoint::create(
            &self.workers[from],
            from,
            to,
            Arc::clone(&self.mrs),
            Arc::clone(&keys),
        )
        .unwrap();
        let b = Endpoint::create(&self.workers[to], to, from, Arc::clone(&self.mrs), keys).unwrap();
        let remote = |e: &Endpoint, w: &NicWorker| RemoteQp {
            qpn: e.qpn(),
            psn: e.psn(),
            address: w.nic().address(),
        };
        a.connect(&remote(&b, &self.workers[to])).unwrap();
        b.connect(&remote(&a, &self.workers[from])).unwrap();
        (Arc::new(a), Arc::new(b))
    }

    /// Gives both NICs a selector over `matrix` (JSON) pausing by `policy`.
    fn select(&self, matrix: &str, policy: PausePolicy) -> Arc<NicSelector> {
        let m = PriorityMatrix::from_json(matrix).unwrap();
        let selector = Arc::new(NicSelector::new(&m, policy, Instant::now()));
        for w in &self.workers {
            let id = selector.id(w.nic().name()).unwrap();
            w.set_health(Arc::clone(&selector), id);
        }
        selector
    }

    fn keys(&self) -> Arc<RemoteKeys> {
        Arc::new(RemoteKeys::new(&self.mrs.keys()))
    }

    fn addr(&self, buf: usize) -> u64 {
        self.bufs[buf].as_ptr() as u64
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for w in &self.workers {
            w.shutdown();
        }
    }
}

fn slices(kind: OpKind, local: u64, remote: u64, n: usize, len: u32) -> Vec<Slice> {
    (0..n)
        .map(|i| Slice {
            kind,
            op: i as u32,
            len,
            local: local + (i as u64) * u64::from(len),
            remote: remote + (i as u64) * u64::from(len),
        })
        .collect()
}

#[test]
fn batches_of_writes_and_reads_move_exact_bytes() {
    let Some(mut rig) = rig() else { return };
    for (i, b) in rig.bufs[0].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let (ep, _partner) = rig.pair(0, 1, rig.keys());
    // WRITE buf0 -> buf1: 256 slices of 4 KiB.
    let w = Work::new(slices(OpKind::Write, rig.addr(0), rig.addr(1), 256, 4096));
    ep.post(w.clone());
    assert!(w.wait().is_empty());
    assert!(rig.bufs[1] == rig.bufs[0], "WRITE: buffers differ");
    // 16 small WRITEs (sent inline) of the start of buf0 into the middle of buf1.
    let half = LEN / 2;
    rig.bufs[1][half..half + 16 * 48].fill(0);
    let small = Work::new(slices(
        OpKind::Write,
        rig.addr(0),
        rig.addr(1) + half as u64,
        16,
        48,
    ));
    ep.post(small.clone());
    assert!(small.wait().is_empty());
    assert!(
        rig.bufs[1][half..half + 16 * 48] == rig.bufs[0][..16 * 48],
        "inline WRITEs: bytes differ"
    );
    // READ buf1 -> buf2.
    let r = Work::new(slices(OpKind::Read, rig.addr(2), rig.addr(1), 16, 65536));
    ep.post(r.clone());
    assert!(r.wait().is_empty());
    assert!(rig.bufs[2] == rig.bufs[1], "READ: buffers differ");
    assert!(!ep.is_broken());
}

#[test]
fn a_key_the_peer_did_not_publish_fails_before_posting() {
    let Some(rig) = rig() else { return };
    let (ep, _partner) = rig.pair(0, 1, rig.keys());
    // Remote range past the end of every registered buffer.
    let w = Work::new(slices(OpKind::Write, rig.addr(0), 0x10, 4, 4096));
    ep.post(w.clone());
    let errors = w.wait();
    assert!(!errors.is_empty());
    assert!(
        errors[0].reason.contains("published no key"),
        "{}",
        errors[0]
    );
    assert!(!ep.is_broken(), "nothing reached the NIC");
}

#[test]
fn a_wrong_key_is_refused_by_the_nic_and_the_batch_fails() {
    let Some(rig) = rig() else { return };
    let wrong: Vec<Key> = rig
        .mrs
        .keys()
        .into_iter()
        .map(|k| Key {
            rkey: k.rkey ^ 0x5a5a_0000,
            ..k
        })
        .collect();
    let (ep, _partner) = rig.pair(0, 1, Arc::new(RemoteKeys::new(&wrong)));
    let w = Work::new(slices(OpKind::Write, rig.addr(0), rig.addr(1), 8, 4096));
    ep.post(w.clone());
    let errors = w.wait();
    assert!(!errors.is_empty(), "a write with a wrong rkey completed");
    assert!(
        rig.bufs[1].iter().all(|&b| b == 0),
        "bytes landed despite the wrong key"
    );
    assert!(ep.is_broken());
}

#[test]
fn one_batch_spreads_over_both_nics() {
    let Some(mut rig) = rig() else { return };
    for (i, b) in rig.bufs[0].iter_mut().enumerate() {
        *b = (i % 239) as u8;
    }
    let keys = rig.keys();
    let (a, _pa) = rig.pair(0, 1, Arc::clone(&keys));
    let (b, _pb) = rig.pair(1, 0, keys);
    let t = RdmaTransport::new(vec![a.clone(), b.clone()]);
    let w = Work::new(slices(OpKind::Write, rig.addr(0), rig.addr(1), 1024, 1024));
    t.post(w.clone());
    assert!(w.wait().is_empty());
    assert!(rig.bufs[1] == rig.bufs[0], "buffers differ");
    let (sa, sb) = (a.slices_posted(), b.slices_posted());
    println!("slices per NIC: rxe0 {sa}, rxe1 {sb}");
    assert_eq!(sa + sb, 1024);
    assert!(sa > 0 && sb > 0, "one NIC carried everything: {sa} / {sb}");
}

/// One batch over two queue pairs, one of which the peer's NIC refuses (a wrong key):
/// its failed ranges move to the other queue pair, and the batch completes with every
/// byte in place.
#[test]
fn failed_ranges_move_to_the_other_queue_pair() {
    let Some(mut rig) = rig() else { return };
    for (i, b) in rig.bufs[0].iter_mut().enumerate() {
        *b = (i % 229) as u8;
    }
    let good = rig.keys();
    let wrong: Vec<Key> = rig
        .mrs
        .keys()
        .into_iter()
        .map(|k| Key {
            rkey: k.rkey ^ 0x5a5a_0000,
            ..k
        })
        .collect();
    let (a, _pa) = rig.pair(0, 1, good);
    let (b, _pb) = rig.pair(1, 0, Arc::new(RemoteKeys::new(&wrong)));
    let t = RdmaTransport::new(vec![a.clone(), b.clone()]);
    let w = Work::new(slices(OpKind::Write, rig.addr(0), rig.addr(1), 512, 2048));
    t.post(w.clone());
    let errors = w.wait();
    assert!(errors.is_empty(), "ranges failed: {:?}", errors.first());
    assert!(rig.bufs[1] == rig.bufs[0], "buffers differ after failover");
    assert!(b.is_broken(), "the refused queue pair is not marked failed");
    assert!(!a.is_broken());
    assert!(!t.is_broken(), "one queue pair still lives");
    println!(
        "posted: good QP {} slices, refused QP {} slices",
        a.slices_posted(),
        b.slices_posted()
    );
    assert!(
        b.slices_posted() > 0,
        "the refused queue pair carried nothing: no failover tested"
    );
}

/// A queue pair the peer refuses (a wrong key: the peer's doing) fails over but does not
/// pause its NIC; a NIC that is paused (its own failures, reported to the selector) gets
/// no new batches: a fresh, good queue pair on it carries nothing while the other NIC
/// carries the batch.
#[test]
fn a_paused_nic_gets_no_new_batches_and_peer_refusals_do_not_pause() {
    let Some(mut rig) = rig() else { return };
    for (i, b) in rig.bufs[0].iter_mut().enumerate() {
        *b = (i % 227) as u8;
    }
    let policy = PausePolicy {
        failures: 1,
        window: Duration::from_secs(60),
        pause: Duration::from_secs(60),
    };
    let selector = rig.select(r#"{"*": [["rxe0", "rxe1"]]}"#, policy);
    let good = rig.keys();
    let wrong: Vec<Key> = rig
        .mrs
        .keys()
        .into_iter()
        .map(|k| Key {
            rkey: k.rkey ^ 0x5a5a_0000,
            ..k
        })
        .collect();
    let (a, _pa) = rig.pair(0, 1, Arc::clone(&good));
    let (b, _pb) = rig.pair(1, 0, Arc::new(RemoteKeys::new(&wrong)));
    let t = RdmaTransport::new(vec![a.clone(), b.clone()]);
    let w = Work::new(slices(OpKind::Write, rig.addr(0), rig.addr(1), 512, 2048));
    t.post(w.clone());
    assert!(w.wait().is_empty(), "failover did not complete the batch");
    assert!(
        b.slices_posted() > 0,
        "the refused queue pair carried nothing"
    );
    let rxe1 = selector.id("rxe1").unwrap();
    assert!(
        !selector.is_paused(rxe1, Instant::now()),
        "a refusal by the peer paused the local NIC"
    );
    // rxe1 fails on its own (as the poller reports a local error): paused.
    assert!(selector.report_failure(rxe1, Instant::now()));
    assert!(rig.workers[1].is_paused() && !rig.workers[0].is_paused());
    // A fresh queue pair on the paused NIC, with good keys: it gets nothing.
    let (c, _pc) = rig.pair(1, 0, good);
    let t2 = RdmaTransport::new(vec![a.clone(), c.clone()]);
    let before = a.slices_posted();
    let w = Work::new(slices(OpKind::Write, rig.addr(0), rig.addr(2), 512, 2048));
    t2.post(w.clone());
    assert!(w.wait().is_empty());
    assert!(rig.bufs[2] == rig.bufs[0], "buffers differ");
    assert_eq!(c.slices_posted(), 0, "a batch went to the paused NIC");
    assert_eq!(a.slices_posted() - before, 512);
}

/// Memory on NUMA node 0, whose preferred NIC is rxe0 (rxe1 is fallback), goes over
/// rxe0 only; memory anywhere else over both.
#[test]
fn batches_go_over_the_nics_preferred_for_their_memory() {
    let Some(mut rig) = rig() else { return };
    for (i, b) in rig.bufs[3].iter_mut().enumerate() {
        *b = (i % 223) as u8;
    }
    rig.select(
        r#"{"cpu:0": [["rxe0"], ["rxe1"]], "*": [["rxe0", "rxe1"]]}"#,
        PausePolicy::default(),
    );
    let keys = rig.keys();
    let (a, _pa) = rig.pair(0, 1, Arc::clone(&keys));
    let (b, _pb) = rig.pair(1, 0, keys);
    let t = RdmaTransport::new(vec![a.clone(), b.clone()]);
    let w = Work::new(slices(OpKind::Write, rig.addr(3), rig.addr(1), 1024, 1024));
    t.post(w.clone());
    assert!(w.wait().is_empty());
    assert!(rig.bufs[1] == rig.bufs[3], "buffers differ");
    assert_eq!((a.slices_posted(), b.slices_posted()), (1024, 0));
    let w = Work::new(slices(OpKind::Write, rig.addr(0), rig.addr(2), 1024, 1024));
    t.post(w.clone());
    assert!(w.wait().is_empty());
    let (sa, sb) = (a.slices_posted() - 1024, b.slices_posted());
    println!("memory anywhere: rxe0 {sa}, rxe1 {sb} slices");
    assert!(sa > 0 && sb > 0, "one NIC carried everything: {sa} / {sb}");
}

/// A region labelled GPU memory is registered through a dma-buf first; where the CUDA
/// driver cannot export one (here: there is none) plain `ibv_reg_mr` takes it (what
/// nvidia-peermem makes work for real GPU memory), and the bytes move over the NICs.
#[test]
fn gpu_memory_falls_back_to_plain_registration_without_a_dmabuf() {
    let Some(mut rig) = rig() else { return };
    let mut gpu_labelled = vec![0u8; 64 << 10];
    let registry = Registry::new();
    let region = registry
        .register(vec![RegionSpec::caller(
            gpu_labelled.as_mut_ptr() as u64,
            gpu_labelled.len() as u64,
            Some(Location::Cuda(0)),
            Access::ALL,
        )])
        .unwrap()
        .remove(0);
    assert!(crate::sys::cuda::dmabuf_fd(region.range().start & !4095, 64 << 10).is_err());
    rig.mrs
        .add(&region)
        .expect("ibv_reg_mr after the dma-buf was refused");
    assert!(rig.mrs.contains(region.range().start));
    rig.bufs[0][..64 << 10].fill(0x3c);
    let (a, _b) = rig.pair(0, 1, rig.keys());
    let work = Work::new(slices(
        OpKind::Write,
        rig.addr(0),
        region.range().start,
        16,
        4096,
    ));
    a.post(Arc::clone(&work) as Arc<dyn SliceSource>);
    assert!(work.wait().is_empty());
    assert!(gpu_labelled.iter().all(|&x| x == 0x3c));
    rig.mrs.remove(region.range().start);
}
