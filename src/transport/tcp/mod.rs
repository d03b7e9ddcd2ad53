//! TCP over io_uring: the transport that works between any two hosts.
//!
//! Every engine runs a data listener ([`TcpServer`]) whose connections are served by a
//! fixed pool of I/O threads (`IoPool`); to reach a peer it opens a few connections
//! ("lanes", [`TcpTransport`]) driven by the same threads. Requests carry the target
//! addresses; the serving side checks each against its own registry before it moves a
//! byte (see `serve`), and a WRITE completes only when the target has acknowledged that
//! the bytes are in its memory.

mod io;
mod lane;
mod serve;
pub mod wire;

use std::io as stdio;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use io::Command;
pub(crate) use io::IoPool;
use lane::{fail_all, LaneShared, PeerLanes};

use super::{SliceSource, Transport, TransportKind};
use crate::memory::Registry;

/// Lanes to one peer: a set of connections sharing the peer's batches.
#[derive(Debug)]
pub struct TcpTransport {
    lanes: Vec<Arc<LaneShared>>,
    peer: Arc<PeerLanes>,
    remote: SocketAddr,
    threads: usize,
}

impl TcpTransport {
    /// Connects `lanes` connections to the data listener at `remote` (each within
    /// `timeout`) and hands them to `pool`'s threads.
    pub(crate) fn connect(
        pool: &IoPool,
        name: &str,
        remote: SocketAddr,
        lanes: usize,
        timeout: Duration,
    ) -> stdio::Result<TcpTransport> {
        let peer = Arc::new(PeerLanes {
            name: name.to_string(),
            alive: AtomicUsize::new(0),
            last_error: Mutex::new(None),
        });
        // One deadline for all lanes: opening a peer takes at most `timeout`.
        let deadline = std::time::Instant::now() + timeout;
        let mut streams = Vec::new();
        for _ in 0..lanes.max(1) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(stdio::Error::new(
                    stdio::ErrorKind::TimedOut,
                    format!("connecting {lanes} lanes took longer than {timeout:?}"),
                ));
            }
            let stream = TcpStream::connect_timeout(&remote, left)?;
            stream.set_nodelay(true)?;
            // Bounds how long a direct send from a submitting thread can block (io_uring's
            // own sends never block on it).
            stream.set_write_timeout(Some(Duration::from_secs(1)))?;
            streams.push(stream);
        }
        let mut shared = Vec::new();
        for stream in streams {
            let lane = Arc::new(LaneShared::new(pool.pick(), Arc::clone(&peer)));
            peer.alive.fetch_add(1, Ordering::AcqRel);
            lane.start(stream);
            shared.push(lane);
        }
        Ok(TcpTransport {
            lanes: shared,
            peer,
            remote,
            threads: pool.len(),
        })
    }

    /// Whether every lane has died (the peer went away); the engine then reconnects.
    pub fn is_broken(&self) -> bool {
        self.peer.alive.load(Ordering::Acquire) == 0
    }

    /// Why the last lane died, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.peer
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl TcpTransport {
    /// Closes every lane: requests in flight and queued work fail once the kernel is done
    /// with their buffers. Batches holding this transport keep it alive, so closing the
    /// peer cannot wait for its drop.
    pub(crate) fn close(&self) {
        for lane in &self.lanes {
            lane.request_close();
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.close();
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn describe(&self) -> String {
        format!(
            "TCP over io_uring to {}: {} lanes on {} I/O threads",
            self.remote,
            self.lanes.len(),
            self.threads
        )
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        if is_small(&*work) {
            // Small batches (a synchronous 4 KiB write, say) go out from this thread when a
            // lane is idle, saving a hand-off to the I/O thread.
            for lane in &self.lanes {
                match lane.try_direct(&work) {
                    Some(true) => return,
                    Some(false) => break,
                    None => {}
                }
            }
        }
        let mut posted = 0;
        for lane in &self.lanes {
            if lane.post(&work) {
                posted += 1;
            }
        }
        if posted == 0 {
            let why = self
                .last_error()
                .unwrap_or_else(|| format!("no connection to {} is open", self.peer.name));
            fail_all(&*work, &why);
        }
    }
}

/// Batches of at most this many bytes may be sent by the submitting thread itself.
const DIRECT_BYTES: u64 = 64 << 10;
/// ... and of at most this many slices.
const DIRECT_SLICES: usize = 64;

/// Whether `work` may go out directly: few bytes, few slices, one direction (a direct
/// send is a single request, and a request has one kind).
fn is_small(work: &dyn SliceSource) -> bool {
    let slices = work.slices();
    slices.len() <= DIRECT_SLICES
        && slices.iter().map(|s| u64::from(s.len)).sum::<u64>() <= DIRECT_BYTES
        && slices.windows(2).all(|w| w[0].kind == w[1].kind)
}

/// The data listener: accepts lanes and hands them to the I/O threads.
#[derive(Debug)]
pub struct TcpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl TcpServer {
    /// Listens on `listener`; every connection is served against `registry`.
    pub(crate) fn start(
        listener: TcpListener,
        registry: Arc<Registry>,
        pool: Arc<IoPool>,
    ) -> stdio::Result<TcpServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("kvx-tcp-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    match stream {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            pool.pick()
                                .send(Command::Serve(stream, Arc::clone(&registry)));
                        }
                        Err(e) => log::warn!("kvxfer: accepting a data lane failed: {e}"),
                    }
                }
            })?;
        Ok(TcpServer {
            addr,
            stop,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (connections already accepted are closed with the I/O pool).
    pub(crate) fn shutdown(&self) {
        let Some(join) = self
            .accept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if join.join().is_err() {
            log::error!("kvxfer bug: the accept thread panicked");
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{OpKind, Slice, TransportError};
    use std::ops::Range;
    use std::time::Instant;

    /// A batch stand-in: one claim of everything, counts completions.
    struct Work {
        slices: Vec<Slice>,
        claimed: AtomicBool,
        stopped: AtomicBool,
        completed: AtomicUsize,
        _buf: Vec<u8>,
    }

    impl SliceSource for Work {
        fn slices(&self) -> &[Slice] {
            &self.slices
        }
        fn claim(&self) -> Option<Range<usize>> {
            if self.stopped.load(Ordering::SeqCst) || self.claimed.swap(true, Ordering::SeqCst) {
                return None;
            }
            Some(0..self.slices.len())
        }
        fn complete(&self, range: Range<usize>, _result: Result<(), TransportError>) {
            self.completed.fetch_add(range.len(), Ordering::SeqCst);
        }
        fn is_stopped(&self) -> bool {
            self.stopped.load(Ordering::SeqCst)
        }
    }

    fn work(n: usize, len: u32) -> Arc<Work> {
        let buf = vec![7u8; n * len as usize];
        let slices = (0..n)
            .map(|i| Slice {
                kind: OpKind::Write,
                op: 0,
                len,
                local: buf.as_ptr() as u64 + (i * len as usize) as u64,
                remote: 0x1000_0000 + (i * len as usize) as u64,
            })
            .collect();
        Arc::new(Work {
            slices,
            claimed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            completed: AtomicUsize::new(0),
            _buf: buf,
        })
    }

    /// A peer that accepts lanes and reads everything but never answers.
    fn hung_peer() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut s = stream.unwrap();
                std::thread::spawn(move || {
                    let mut b = [0u8; 65536];
                    while std::io::Read::read(&mut s, &mut b).is_ok_and(|n| n > 0) {}
                });
            }
        });
        addr
    }

    /// Waits until a lane has claimed `w`, stops it, and waits (bounded) until every slice
    /// has been completed.
    fn stop_and_wait(w: &Work, limit: Duration) -> bool {
        let start = Instant::now();
        while !w.claimed.load(Ordering::SeqCst) {
            assert!(start.elapsed() < limit, "no lane claimed the work");
            std::thread::yield_now();
        }
        w.stopped.store(true, Ordering::SeqCst);
        while start.elapsed() < limit {
            if w.completed.load(Ordering::SeqCst) == w.slices.len() {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    /// A stopped batch whose requests a hung peer never answers still ends (its lane is
    /// dropped), whether the I/O thread or the submitting thread sent them.
    #[test]
    fn stopped_batches_to_a_hung_peer_end() {
        let pool = IoPool::start(1).unwrap();
        for (slices, len) in [(4, 64 << 10), (1, 4096)] {
            let t = TcpTransport::connect(&pool, "hung", hung_peer(), 1, Duration::from_secs(1))
                .unwrap();
            let w = work(slices, len);
            t.post(Arc::clone(&w) as Arc<dyn SliceSource>);
            assert!(
                stop_and_wait(&w, Duration::from_secs(5)),
                "{slices} x {len} bytes: the batch never ended after it was stopped"
            );
        }
    }
}
