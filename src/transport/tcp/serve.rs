//! A served lane: requests from a peer, each checked against this engine's registry and
//! access rights before a byte moves. WRITE payloads are received straight into the
//! target region; READ payloads are sent straight from it. The regions a request uses are
//! pinned until its bytes have moved, so `unregister` reports them busy meanwhile.
//!
//! GPU memory is never touched by the CPU or the socket: a request whose regions include
//! GPU memory goes through pinned host staging buffers of the connection (WRITE payloads
//! are received into one and copied to the GPU before the ACK; READ payloads are copied
//! from the GPU into one just before they are sent). Those copies are queued on a
//! non-blocking stream of the connection (never the legacy default stream, which would wait
//! for the application's kernels) and waited for on the I/O thread: at tens of GB/s they
//! cost a TCP stream a few percent.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::io::{outcome, token, Driven, IoVecs, Outcome, Submit, OP_RECV, OP_SEND};
use super::wire::{decode_entries, Code, Entry, Header, Kind, ENTRY_LEN, HEADER_LEN};
use crate::memory::{Access, Location, Region, RegionLookup, Registry};
use crate::sys::cuda::{self, PinnedHost, Stream};

/// How long a request may sit half-received (or a reply half-sent) without a byte moving
/// before the connection is dropped: a stalled peer must not keep regions pinned (and
/// `unregister` busy) forever.
const STALL: Duration = Duration::from_secs(10);
/// Responses queued before the connection stops reading requests (backpressure).
const MAX_QUEUED: usize = 256;
/// Scratch for discarding the payload of a refused WRITE.
const SCRATCH: usize = 64 << 10;

/// Regions pinned for one request; unpinned on drop.
pub(super) struct Pinned(Vec<Arc<Region>>);

impl Pinned {
    /// Whether a region of the request is GPU memory (its bytes must be staged).
    fn touches_gpu(&self) -> bool {
        self.0
            .iter()
            .any(|r| matches!(r.location(), Location::Cuda(_)))
    }

    /// The device of the first GPU region, once every GPU region has been found to be one
    /// live device allocation still: the driver takes a freed device address for host
    /// memory, and a copy would fault instead of failing.
    fn live_gpu(&self) -> Result<u32, String> {
        let cuda = cuda::driver().map_err(|e| e.to_string())?;
        let mut device = None;
        for r in &self.0 {
            if matches!(r.location(), Location::Cuda(_)) {
                let mem = cuda.device_range(r.range().start, r.range().len)?;
                device.get_or_insert(mem.device);
            }
        }
        device.ok_or_else(|| "the request touches no GPU memory".into())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.0.iter().for_each(|r| r.unpin());
    }
}

/// Checks every entry against `registry`: inside one registered region that grants
/// `need`. On success the regions are pinned (under the registry's read lock, like a
/// batch), so they cannot be unregistered while the bytes move.
pub(super) fn check(
    registry: &Registry,
    entries: &[Entry],
    need: Access,
) -> Result<Pinned, (Code, String)> {
    let map = registry.read();
    let mut regions: Vec<Arc<Region>> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let end = e.addr + u64::from(e.len);
        let region = map
            .region_at(e.addr)
            .filter(|r| end <= r.range().end())
            .ok_or_else(|| {
                (
                    Code::NotRegistered,
                    format!(
                        "entry {i}: [{:#x}, {end:#x}) is not inside one region registered here",
                        e.addr
                    ),
                )
            })?;
        if !region.access().contains(need) {
            return Err((
                Code::AccessDenied,
                format!(
                    "entry {i}: region {} grants {} but the request needs {need}",
                    region.range(),
                    region.access()
                ),
            ));
        }
        if !regions.last().is_some_and(|r| Arc::ptr_eq(r, region)) {
            regions.push(Arc::clone(region));
        }
    }
    regions.sort_unstable_by_key(|r| Arc::as_ptr(r) as usize);
    regions.dedup_by(|a, b| Arc::ptr_eq(a, b));
    regions.iter().for_each(|r| r.pin());
    Ok(Pinned(regions))
}

enum Response {
    Ack(u64),
    ReadData {
        id: u64,
        entries: Vec<Entry>,
        pins: Pinned,
        /// The entries include GPU memory: sent from `stage_out`.
        staged: bool,
    },
    Error {
        id: u64,
        code: Code,
        message: String,
    },
}

enum Rx {
    Header,
    Entries(Header),
    /// Receiving a WRITE's payload into the target (`refused: None`) or into scratch.
    Payload {
        id: u64,
        pins: Option<Pinned>,
        refused: Option<(Code, String)>,
        discard_left: u64,
        /// The target includes GPU memory: the payload lands in `stage_in`, in entry
        /// order, and these entries are copied from there once it is all in.
        staged: Option<Vec<Entry>>,
    },
}

/// A connection's buffers and stream for requests that touch GPU memory.
#[derive(Default)]
struct GpuStaging {
    /// For WRITE payloads bound for GPU memory (allocated on first use, grown to the
    /// largest such request).
    stage_in: Option<PinnedHost>,
    /// For READ payloads taken from GPU memory (one staged reply per send).
    stage_out: Option<PinnedHost>,
    /// The CUDA stream staging copies run on (made on first use, on the request's GPU).
    stream: Option<Stream>,
}

/// The I/O thread's state for one served connection.
pub(super) struct ServerConn {
    stream: TcpStream,
    fd: i32,
    registry: Arc<Registry>,
    rx: Rx,
    /// A header and the first entry: every request has one, so receiving this much never
    /// reads into the next frame, and a single-entry request needs one receive less.
    hdr: Box<[u8; HEADER_LEN + ENTRY_LEN]>,
    /// Bytes of `hdr` received so far.
    hdr_got: usize,
    /// Payload bytes of the last request (small ones make the thread poll for the next).
    last_request_bytes: u64,
    /// When bytes last moved on this connection.
    last_progress: Instant,
    entry_bytes: Vec<u8>,
    entries: Vec<Entry>,
    scratch: Vec<u8>,
    /// Staging of GPU memory (boxed: most connections never touch any).
    gpu: Box<GpuStaging>,
    recv: IoVecs,
    recv_pending: bool,
    out: VecDeque<Response>,
    send: IoVecs,
    send_bytes: Vec<u8>,
    /// Reused between sends: (own bytes?, offset or address, length).
    pieces: Vec<(bool, usize, usize)>,
    sending: Vec<Response>,
    send_pending: bool,
    /// A malformed frame was answered; close once the answer is out.
    close_after_send: bool,
    closing: Option<String>,
    shut: bool,
}

impl ServerConn {
    pub(super) fn new(stream: TcpStream, registry: Arc<Registry>) -> Self {
        let fd = stream.as_raw_fd();
        ServerConn {
            stream,
            fd,
            registry,
            rx: Rx::Header,
            hdr: Box::new([0; HEADER_LEN + ENTRY_LEN]),
            hdr_got: 0,
            last_request_bytes: 0,
            last_progress: Instant::now(),
            entry_bytes: Vec::new(),
            entries: Vec::new(),
            scratch: Vec::new(),
            gpu: Box::default(),
            recv: IoVecs::new(),
            recv_pending: false,
            out: VecDeque::new(),
            send: IoVecs::new(),
            send_bytes: Vec::new(),
            pieces: Vec::new(),
            sending: Vec::new(),
            send_pending: false,
            close_after_send: false,
            closing: None,
            shut: false,
        }
    }

    fn malformed(&mut self, id: u64, message: String) {
        log::warn!("kvxfer: dropping a data lane that sent a malformed frame: {message}");
        self.out.push_back(Response::Error {
            id,
            code: Code::Malformed,
            message,
        });
        self.close_after_send = true;
    }

    fn on_received(&mut self) {
        match std::mem::replace(&mut self.rx, Rx::Header) {
            Rx::Header => {
                let got = std::mem::take(&mut self.hdr_got);
                let mut head = [0u8; HEADER_LEN];
                head.copy_from_slice(&self.hdr[..HEADER_LEN]);
                match Header::decode(&head) {
                    Ok(h) if matches!(h.kind, Kind::Write | Kind::Read) => {
                        self.entry_bytes.clear();
                        self.entry_bytes.resize(h.count as usize * ENTRY_LEN, 0);
                        // The first entry (or part of it) came with the header.
                        let have = got - HEADER_LEN;
                        self.entry_bytes[..have].copy_from_slice(&self.hdr[HEADER_LEN..got]);
                        self.rx = Rx::Entries(h);
                        self.recv.clear();
                        if have == self.entry_bytes.len() {
                            self.on_received();
                        } else {
                            self.recv.push(
                                self.entry_bytes[have..].as_ptr(),
                                self.entry_bytes.len() - have,
                            );
                        }
                    }
                    Ok(h) => self.malformed(h.id, format!("a {} frame is not a request", h.kind)),
                    Err(e) => self.malformed(0, e.to_string()),
                }
            }
            Rx::Entries(h) => {
                let total = match decode_entries(&self.entry_bytes, &mut self.entries) {
                    Ok(total) => total,
                    Err(e) => return self.malformed(h.id, e.to_string()),
                };
                self.last_request_bytes = total;
                let need = match h.kind {
                    Kind::Write => Access::REMOTE_WRITE,
                    _ => Access::REMOTE_READ,
                };
                let checked = check(&self.registry, &self.entries, need);
                if h.kind == Kind::Read {
                    self.out.push_back(match checked {
                        Ok(pins) => Response::ReadData {
                            id: h.id,
                            entries: self.entries.clone(),
                            staged: pins.touches_gpu(),
                            pins,
                        },
                        Err((code, message)) => Response::Error {
                            id: h.id,
                            code,
                            message,
                        },
                    });
                    return;
                }
                let staging = match checked {
                    Ok(pins) if pins.touches_gpu() => {
                        let stage = pins
                            .live_gpu()
                            .and_then(|device| staging(&mut self.gpu.stage_in, total, device));
                        match stage {
                            Ok(base) => Ok((pins, Some(base))),
                            Err(message) => Err((Code::Device, message)),
                        }
                    }
                    Ok(pins) => Ok((pins, None)),
                    Err(refusal) => Err(refusal),
                };
                let rx = match staging {
                    Ok((pins, stage)) => {
                        self.recv.clear();
                        match stage {
                            Some(base) => self.recv.push(base as *const u8, total as usize),
                            None => {
                                for e in &self.entries {
                                    self.recv.push(e.addr as *const u8, e.len as usize);
                                }
                            }
                        }
                        Rx::Payload {
                            id: h.id,
                            pins: Some(pins),
                            refused: None,
                            discard_left: 0,
                            staged: stage.map(|_| self.entries.clone()),
                        }
                    }
                    Err(refusal) => {
                        log::debug!("kvxfer: refusing a WRITE: {}", refusal.1);
                        Rx::Payload {
                            id: h.id,
                            pins: None,
                            refused: Some(refusal),
                            discard_left: total,
                            staged: None,
                        }
                    }
                };
                self.rx = rx;
                self.discard_next();
            }
            Rx::Payload {
                id,
                pins,
                mut refused,
                discard_left,
                staged,
            } => {
                if discard_left > 0 {
                    self.rx = Rx::Payload {
                        id,
                        pins,
                        refused,
                        discard_left,
                        staged,
                    };
                    self.discard_next();
                    return;
                }
                if let (Some(entries), Some(stage), Some(pins)) =
                    (staged, &self.gpu.stage_in, &pins)
                {
                    if let Err(message) = unstage(&mut self.gpu.stream, pins, stage, &entries) {
                        refused = Some((Code::Device, message));
                    }
                }
                // The bytes are in the target's memory: release the pins, then answer.
                drop(pins);
                self.out.push_back(match refused {
                    None => Response::Ack(id),
                    Some((code, message)) => Response::Error { id, code, message },
                });
            }
        }
    }

    /// For a refused WRITE, points the receive at scratch for the next piece to discard.
    fn discard_next(&mut self) {
        if let Rx::Payload {
            refused: Some(_),
            discard_left,
            ..
        } = &mut self.rx
        {
            if self.scratch.is_empty() {
                self.scratch.resize(SCRATCH, 0);
            }
            let n = (*discard_left).min(SCRATCH as u64) as usize;
            *discard_left -= n as u64;
            self.recv.clear();
            self.recv.push(self.scratch.as_ptr(), n);
        }
    }

    fn build_send(&mut self) {
        self.send_bytes.clear();
        self.sending.clear();
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        let mut staged_one = false;
        while let Some(r) = self.out.front() {
            let (extra, staged) = match r {
                Response::ReadData {
                    entries, staged, ..
                } => (entries.len(), *staged),
                _ => (0, false),
            };
            if !self.sending.is_empty() && pieces.len() + 1 + extra > 1024 {
                break;
            }
            if staged && staged_one {
                break; // `stage_out` holds one reply at a time
            }
            let mut r = self.out.pop_front().expect("front exists");
            if let Response::ReadData {
                id,
                entries,
                staged: true,
                pins,
            } = &r
            {
                staged_one = true;
                if let Err(message) =
                    stage(&mut self.gpu.stream, pins, &mut self.gpu.stage_out, entries)
                {
                    r = Response::Error {
                        id: *id,
                        code: Code::Device,
                        message,
                    };
                }
            }
            let start = self.send_bytes.len();
            match &r {
                Response::Ack(id) => {
                    self.send_bytes
                        .extend_from_slice(&header(Kind::Ack, 0, 0, *id));
                }
                Response::ReadData {
                    id,
                    entries,
                    staged,
                    ..
                } => {
                    self.send_bytes
                        .extend_from_slice(&header(Kind::ReadData, 0, 0, *id));
                    pieces.push((true, start, HEADER_LEN));
                    match (staged, &self.gpu.stage_out) {
                        (true, Some(stage)) => {
                            let total = entries.iter().map(|e| e.len as usize).sum();
                            pieces.push((false, stage.addr() as usize, total));
                        }
                        _ => {
                            for e in entries {
                                pieces.push((false, e.addr as usize, e.len as usize));
                            }
                        }
                    }
                }
                Response::Error { id, code, message } => {
                    let text = &message.as_bytes()[..message.len().min(4096)];
                    self.send_bytes.extend_from_slice(&header(
                        Kind::Error,
                        text.len() as u32,
                        *code as u32,
                        *id,
                    ));
                    self.send_bytes.extend_from_slice(text);
                }
            }
            if !matches!(r, Response::ReadData { .. }) {
                pieces.push((true, start, self.send_bytes.len() - start));
            }
            self.sending.push(r);
        }
        self.send.set_pieces(self.send_bytes.as_ptr(), &pieces);
        self.pieces = pieces;
    }
}

/// The address of a staging buffer of at least `len` bytes in `buf`, allocating (or
/// growing) it. Called only between requests (WRITE) or sends (READ): nothing is using it.
fn staging(buf: &mut Option<PinnedHost>, len: u64, device: u32) -> Result<u64, String> {
    if let Some(b) = buf.as_ref().filter(|b| b.len() as u64 >= len) {
        return Ok(b.addr());
    }
    // Powers of two (at least 4 MiB): a stream of growing requests reallocates a few times.
    let size = len.max(4 << 20).next_power_of_two() as usize;
    *buf = None; // free the old one first
    let fresh = PinnedHost::alloc_on(device, size).map_err(|e| {
        format!("cannot allocate a {size}-byte pinned staging buffer for GPU memory: {e}")
    })?;
    Ok(buf.insert(fresh).addr())
}

/// Queues `copies` (dst, src, len) on the connection's stream for `device` and waits for
/// them all.
fn copy_all(
    stream: &mut Option<Stream>,
    device: u32,
    copies: impl Iterator<Item = (u64, u64, u64)>,
) -> Result<(), String> {
    if stream.as_ref().is_none_or(|s| s.device() != device) {
        *stream = Some(Stream::new(device).map_err(|e| e.to_string())?);
    }
    let stream = stream.as_ref().expect("just made");
    let copies = copies.map(|(dst, src, len)| (dst, src, len as usize));
    // SAFETY: every caller passes ranges inside registered regions pinned for the request
    // (GPU ones checked live just before) and inside a staging buffer nothing else uses
    // until this returns, which is after the stream has drained.
    unsafe { stream.copy_all(copies) }.map_err(|e| e.to_string())
}

/// The copies of entries laid out one after another from `base`: (entry, staged address).
fn laid_out(entries: &[Entry], base: u64) -> impl Iterator<Item = (&Entry, u64)> {
    entries.iter().scan(base, |at, e| {
        let here = *at;
        *at += u64::from(e.len);
        Some((e, here))
    })
}

/// Copies a staged WRITE payload (in entry order at the start of `stage`) to its targets.
fn unstage(
    stream: &mut Option<Stream>,
    pins: &Pinned,
    stage: &PinnedHost,
    entries: &[Entry],
) -> Result<(), String> {
    let device = pins.live_gpu()?;
    let copies = laid_out(entries, stage.addr()).map(|(e, at)| (e.addr, at, u64::from(e.len)));
    copy_all(stream, device, copies).map_err(|e| format!("landing in GPU memory: {e}"))
}

/// Copies a READ reply's entries from their (GPU) memory into `buf`, in entry order.
fn stage(
    stream: &mut Option<Stream>,
    pins: &Pinned,
    buf: &mut Option<PinnedHost>,
    entries: &[Entry],
) -> Result<(), String> {
    let device = pins.live_gpu()?;
    let total = entries.iter().map(|e| u64::from(e.len)).sum();
    let base = staging(buf, total, device)?;
    let copies = laid_out(entries, base).map(|(e, at)| (at, e.addr, u64::from(e.len)));
    copy_all(stream, device, copies).map_err(|e| format!("staging GPU memory: {e}"))
}

fn header(kind: Kind, count: u32, status: u32, id: u64) -> [u8; HEADER_LEN] {
    Header {
        kind,
        count,
        status,
        id,
    }
    .encode()
}

impl Driven for ServerConn {
    fn pump(&mut self, slot: usize, sq: &mut Submit<'_>) {
        if self.closing.is_some() {
            if !self.shut {
                self.shut = true;
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            return;
        }
        if !self.send_pending && (self.send.left() > 0 || !self.out.is_empty()) {
            if self.send.left() == 0 {
                self.build_send();
            }
            let entry = self.send.send(self.fd, token(slot, OP_SEND));
            // SAFETY: the iovecs point at `send_bytes` (untouched until this send
            // completes) and at registered memory pinned by the responses in `sending`,
            // which are kept until then.
            unsafe { sq.push(&entry) };
            self.send_pending = true;
        } else if !self.send_pending && self.close_after_send {
            self.close("sent a malformed frame".into());
            return;
        }
        let backlog = self.out.len() + self.sending.len();
        if !self.recv_pending && !self.close_after_send && backlog < MAX_QUEUED {
            let header = matches!(self.rx, Rx::Header);
            if self.recv.left() == 0 {
                self.recv.clear();
                self.recv.push(
                    self.hdr[self.hdr_got..].as_ptr(),
                    HEADER_LEN + ENTRY_LEN - self.hdr_got,
                );
            }
            // A header is taken as soon as its 24 bytes are in (a peer that sent a bad one
            // still gets its ERROR frame); everything else is received whole.
            let entry = self.recv.recv_some(self.fd, token(slot, OP_RECV), !header);
            // SAFETY: the iovecs point at the boxed header, `entry_bytes` or `scratch`
            // (not resized while receiving) or at registered memory pinned by the
            // request being received until this receive completes.
            unsafe { sq.push(&entry) };
            self.recv_pending = true;
        }
    }

    fn on_complete(&mut self, op: u64, res: i32) {
        if op == OP_SEND {
            self.send_pending = false;
        } else {
            self.recv_pending = false;
        }
        let n = match outcome(res) {
            Outcome::Moved(n) if self.closing.is_none() => n,
            Outcome::Broken(why) => return self.close(why),
            _ => return,
        };
        self.last_progress = Instant::now();
        if op == OP_SEND {
            if self.send.advance(n) {
                // The bytes left: drop the responses (unpinning READ regions).
                self.sending.clear();
            }
        } else if matches!(self.rx, Rx::Header) {
            self.recv.advance(n);
            self.hdr_got += n;
            if self.hdr_got >= HEADER_LEN {
                self.on_received();
            } else {
                // Ask for the rest of the header and first entry afresh.
                self.recv.clear();
            }
        } else if self.recv.advance(n) {
            self.on_received();
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.busy() && now.saturating_duration_since(self.last_progress) > STALL {
            self.close(format!(
                "the peer stalled for {} s in the middle of a request; its regions are released",
                STALL.as_secs()
            ));
        }
    }

    /// Mid-request (entries or payload partly in) or with replies not yet out: the
    /// connection holds pins, so it is watched for stalls.
    fn busy(&self) -> bool {
        matches!(self.rx, Rx::Entries(_) | Rx::Payload { .. })
            || self.hdr_got > 0
            || !self.out.is_empty()
            || !self.sending.is_empty()
    }

    fn latency_sensitive(&self) -> bool {
        self.last_request_bytes <= super::lane::SMALL_TRAFFIC
    }

    fn ops_in_flight(&self) -> usize {
        usize::from(self.send_pending) + usize::from(self.recv_pending)
    }

    fn close(&mut self, reason: String) {
        if self.closing.is_none() {
            log::debug!("kvxfer: served lane closing: {reason}");
            self.closing = Some(reason);
        }
    }

    fn closing(&self) -> bool {
        self.closing.is_some()
    }

    fn finish(&mut self) {
        self.out.clear();
        self.sending.clear();
        self.rx = Rx::Header;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Location, RegionSpec};

    /// A peer that stops in the middle of a WRITE's payload is dropped after [`STALL`],
    /// which unpins the target region.
    #[test]
    fn a_stalled_request_is_dropped_and_unpinned() {
        let registry = Arc::new(Registry::new());
        let mut target = vec![0u8; 4096];
        registry
            .register(vec![RegionSpec::caller(
                target.as_mut_ptr() as u64,
                4096,
                Some(Location::Any),
                Access::ALL,
            )])
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut conn = ServerConn::new(server, Arc::clone(&registry));
        let entry = Entry {
            addr: target.as_ptr() as u64,
            len: 4096,
        };
        let pins = check(&registry, &[entry], Access::REMOTE_WRITE).unwrap();
        conn.rx = Rx::Payload {
            id: 1,
            pins: Some(pins),
            refused: None,
            discard_left: 0,
            staged: None,
        };
        assert!(conn.busy());
        let region = registry.lookup(target.as_ptr() as u64).unwrap();
        assert_eq!(region.pins(), 1);
        conn.tick(Instant::now() + STALL / 2);
        assert!(!conn.closing(), "dropped before the stall limit");
        conn.tick(Instant::now() + STALL + Duration::from_secs(1));
        assert!(conn.closing(), "a stalled request was not dropped");
        conn.finish();
        assert_eq!(
            region.pins(),
            0,
            "the stalled request's region stayed pinned"
        );
    }

    #[test]
    fn check_refuses_outside_and_wrong_rights() {
        let registry = Registry::new();
        registry
            .register(vec![
                RegionSpec::caller(0x1000, 0x1000, Some(Location::Any), Access::REMOTE_READ),
                RegionSpec::caller(0x2000, 0x1000, Some(Location::Any), Access::ALL),
            ])
            .unwrap();
        let e = |addr, len| Entry { addr, len };
        let (code, _) = check(&registry, &[e(0x800, 16)], Access::REMOTE_WRITE)
            .err()
            .unwrap();
        assert_eq!(code, Code::NotRegistered);
        // Straddling two regions is refused even though every byte is registered.
        let (code, _) = check(&registry, &[e(0x1ff0, 32)], Access::REMOTE_READ)
            .err()
            .unwrap();
        assert_eq!(code, Code::NotRegistered);
        let (code, msg) = check(&registry, &[e(0x1000, 16)], Access::REMOTE_WRITE)
            .err()
            .unwrap();
        assert_eq!(code, Code::AccessDenied, "{msg}");
        let pins = check(
            &registry,
            &[e(0x2000, 16), e(0x2100, 16)],
            Access::REMOTE_WRITE,
        )
        .unwrap();
        assert_eq!(registry.lookup(0x2000).unwrap().pins(), 1);
        drop(pins);
        assert_eq!(registry.lookup(0x2000).unwrap().pins(), 0);
    }
}
