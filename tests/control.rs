//! The control plane over real sockets on 127.0.0.1: a `ControlServer` with a test
//! handler, `ControlClient`s, raw streams sending broken frames, and fake servers.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvxfer::control::{
    error_code, kind, ControlClient, ControlError, ControlHandler, ControlServer, FrameHeader,
    Message, RdmaConnectReply, RdmaConnectRequest, RdmaNic, RegionInfo, RegionKey,
    SegmentDescriptor, ServerLimits, SyncControlClient, TransportOffer, HANDSHAKE_TIMEOUT,
    HEADER_LEN, MAX_BODY, MAX_CONNECTIONS, MAX_NOTIFY, MAX_STRING,
};
use kvxfer::{Access, Location};

/// Generous bound for anything that should happen promptly.
const T: Duration = Duration::from_secs(10);

fn descriptor(engine_id: u64, session: &str, epoch: u64, version: u64) -> SegmentDescriptor {
    SegmentDescriptor {
        engine_id,
        session: session.into(),
        host: "test-host/boot-0".into(),
        epoch,
        version,
        regions: vec![
            RegionInfo {
                addr: 0x10_0000,
                len: 0x1000 * version.max(1),
                location: Location::Cpu(0),
                access: Access::ALL,
            },
            RegionInfo {
                addr: 0x1000_0000,
                len: 0x2000,
                location: Location::Cuda(3),
                access: Access::REMOTE_READ | Access::REMOTE_WRITE,
            },
        ],
        transports: vec![TransportOffer {
            kind: "tcp".into(),
            params: vec![("port".into(), "4242".into()), ("lanes".into(), "2".into())],
        }],
        rdma_nics: vec![rdma_nic(0), rdma_nic(1)],
        rkeys: vec![
            RegionKey {
                addr: 0x10_0000,
                len: 0x1000 * version.max(1),
                nic: 0,
                rkey: 0x100,
            },
            RegionKey {
                addr: 0x10_0000,
                len: 0x1000 * version.max(1),
                nic: 1,
                rkey: 0x101,
            },
            RegionKey {
                addr: 0x1000_0000,
                len: 0x2000,
                nic: 1,
                rkey: 0x201,
            },
        ],
    }
}

/// RDMA NIC `rxe{i}` (RoCE v2, IPv4-mapped GID 10.0.0.{i}, MTU 1024).
fn rdma_nic(i: u8) -> RdmaNic {
    let mut gid = [0u8; 16];
    gid[10..12].copy_from_slice(&[0xff, 0xff]);
    gid[12..].copy_from_slice(&[10, 0, 0, i]);
    RdmaNic {
        name: format!("rxe{i}"),
        port: 1,
        lid: 0,
        gid,
        gid_index: 1,
        mtu: 1024,
    }
}

fn initiator() -> SegmentDescriptor {
    descriptor(0x1111, "127.0.0.1:1", 7, 1)
}

/// Serves a settable descriptor and records notifications (sender's engine id, bytes),
/// or refuses them with the reason in `refuse`.
struct TestHandler {
    descriptor: Mutex<SegmentDescriptor>,
    notes: Mutex<Vec<(u64, Vec<u8>)>>,
    noted: Condvar,
    refuse: Mutex<Option<String>>,
}

impl TestHandler {
    fn set(&self, d: SegmentDescriptor) {
        *self.descriptor.lock().unwrap() = d;
    }

    fn wait_notes(&self, n: usize) -> Vec<(u64, Vec<u8>)> {
        let deadline = Instant::now() + T;
        let mut notes = self.notes.lock().unwrap();
        while notes.len() < n {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("only {} of {n} notifications arrived", notes.len()));
            notes = self.noted.wait_timeout(notes, left).unwrap().0;
        }
        notes.clone()
    }
}

impl ControlHandler for TestHandler {
    fn descriptor(&self) -> SegmentDescriptor {
        self.descriptor.lock().unwrap().clone()
    }

    fn notified(&self, from: &SegmentDescriptor, bytes: Vec<u8>) -> Result<(), String> {
        if let Some(reason) = self.refuse.lock().unwrap().clone() {
            return Err(reason);
        }
        self.notes.lock().unwrap().push((from.engine_id, bytes));
        self.noted.notify_all();
        Ok(())
    }

    /// Echoes the body reversed, or refuses a body starting with `no`.
    fn store(&self, _from: &SegmentDescriptor, mut body: Vec<u8>) -> Result<Vec<u8>, String> {
        if body.starts_with(b"no") {
            return Err("not serving that".into());
        }
        body.reverse();
        Ok(body)
    }
}

struct Fixture {
    server: ControlServer,
    handler: Arc<TestHandler>,
    session: String,
}

fn start() -> Fixture {
    start_limited(None)
}

/// A server under `limits` (the defaults if `None`, through `ControlServer::start`).
fn start_limited(limits: Option<ServerLimits>) -> Fixture {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let session = listener.local_addr().unwrap().to_string();
    let handler = Arc::new(TestHandler {
        descriptor: Mutex::new(descriptor(0x2222, &session, 9, 1)),
        notes: Mutex::new(Vec::new()),
        noted: Condvar::new(),
        refuse: Mutex::new(None),
    });
    let server = match limits {
        None => ControlServer::start(listener, handler.clone()).unwrap(),
        Some(limits) => ControlServer::start_with(listener, handler.clone(), limits).unwrap(),
    };
    assert_eq!(server.local_addr().to_string(), session);
    Fixture {
        server,
        handler,
        session,
    }
}

fn connect(session: &str) -> ControlClient {
    ControlClient::connect(session, &initiator(), T).unwrap()
}

/// Waits (yielding) until `cond` holds, failing the test at the deadline.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// A new, well-behaved client gets served; so does `old` if given.
fn assert_healthy(f: &Fixture, old: Option<&ControlClient>) {
    let client = connect(&f.session);
    client.probe(T).unwrap();
    let before = f.handler.notes.lock().unwrap().len();
    client.notify(b"still fine", T).unwrap();
    assert_eq!(f.handler.notes.lock().unwrap().len(), before + 1);
    if let Some(old) = old {
        assert!(old.is_alive());
        old.probe(T).unwrap();
        assert_eq!(old.fetch_descriptor(T).unwrap().engine_id, 0x2222);
    }
}

// ---- raw frames ----

fn raw(session: &str) -> TcpStream {
    let stream = TcpStream::connect(session).unwrap();
    // A safety net so a broken server fails the test instead of hanging it.
    stream.set_read_timeout(Some(T)).unwrap();
    stream
}

fn frame(kind: u16, request_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = FrameHeader::new(kind, body.len() as u32, request_id)
        .encode()
        .to_vec();
    out.extend_from_slice(body);
    out
}

fn message_frame(message: &Message, request_id: u32) -> Vec<u8> {
    let (kind, body) = message.encode();
    frame(kind, request_id, &body)
}

/// Reads one frame; `None` at end of stream (or reset).
fn read_frame(stream: &mut TcpStream) -> Option<(FrameHeader, Message)> {
    let mut header = [0u8; HEADER_LEN];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return None
        }
        Err(e) => panic!("reading a frame header: {e}"),
    }
    let header = FrameHeader::decode(&header).unwrap();
    let mut body = vec![0u8; header.len as usize];
    stream.read_exact(&mut body).unwrap();
    Some((header, Message::decode(header.kind, &body).unwrap()))
}

fn expect_error(stream: &mut TcpStream, code: u16, request_id: u32) -> String {
    match read_frame(stream) {
        Some((header, Message::Error { code: got, message })) => {
            assert_eq!(got, code, "error code (message: {message})");
            assert_eq!(header.request_id, request_id);
            message
        }
        other => panic!("expected Error {code}, got {other:?}"),
    }
}

fn expect_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected the connection to close, got {n} more bytes"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the connection to close: {e}"),
    }
}

fn raw_handshake(session: &str) -> TcpStream {
    let mut stream = raw(session);
    stream
        .write_all(&message_frame(&Message::Handshake(initiator()), 1))
        .unwrap();
    match read_frame(&mut stream) {
        Some((header, Message::HandshakeReply(d))) => {
            assert_eq!(header.request_id, 1);
            assert_eq!(d.engine_id, 0x2222);
        }
        other => panic!("expected a HandshakeReply, got {other:?}"),
    }
    stream
}

// ---- the happy paths ----

#[test]
fn handshake_gives_each_side_the_others_descriptor() {
    let f = start();
    let client = connect(&f.session);
    assert_eq!(*client.descriptor(), f.handler.descriptor());
    assert_eq!(client.session(), f.session);
    assert!(client.is_alive());
    // The server names the sender of a notification by its handshake descriptor.
    client.notify(b"hello", T).unwrap();
    assert_eq!(f.handler.wait_notes(1), vec![(0x1111, b"hello".to_vec())]);
}

#[test]
fn probe_measures_a_round_trip() {
    let f = start();
    let client = connect(&f.session);
    for _ in 0..10 {
        let rtt = client.probe(T).unwrap();
        assert!(rtt < T);
    }
}

#[test]
fn notify_reaches_the_handler_before_it_returns() {
    let f = start();
    let client = connect(&f.session);
    for i in 0..20u8 {
        client.notify(&[i; 3], T).unwrap();
        // No waiting: the ack is sent after the handler took it.
        let notes = f.handler.notes.lock().unwrap();
        assert_eq!(notes.len(), usize::from(i) + 1);
        assert_eq!(notes.last().unwrap().1, vec![i; 3]);
    }
    client.notify(&[], T).unwrap();
    client.notify(&vec![5; MAX_NOTIFY], T).unwrap();
    assert_eq!(
        f.handler.notes.lock().unwrap().last().unwrap().1.len(),
        MAX_NOTIFY
    );
    assert!(matches!(
        client.notify(&vec![5; MAX_NOTIFY + 1], T),
        Err(ControlError::NotifyTooLarge { .. })
    ));
    assert!(client.is_alive());
}

#[test]
fn published_descriptors_reach_the_client() {
    let f = start();
    let client = connect(&f.session);
    let other = connect(&f.session);
    let v2 = descriptor(0x2222, &f.session, 9, 2);
    f.handler.set(v2.clone());
    f.server.publish(&v2);
    wait_until("the pushed version 2", || client.descriptor().version == 2);
    assert_eq!(*client.descriptor(), v2);
    wait_until("the pushed version 2 (second client)", || {
        other.descriptor().version == 2
    });

    // An older version published late does not replace a newer one.
    f.server.publish(&descriptor(0x2222, &f.session, 9, 1));
    let v3 = descriptor(0x2222, &f.session, 9, 3);
    f.server.publish(&v3);
    wait_until("the pushed version 3", || client.descriptor().version == 3);
    assert_eq!(*client.descriptor(), v3);
    assert!(client.is_alive());
}

#[test]
fn fetch_descriptor_returns_the_current_one() {
    let f = start();
    let client = connect(&f.session);
    assert_eq!(client.fetch_descriptor(T).unwrap().version, 1);
    let v5 = descriptor(0x2222, &f.session, 9, 5);
    f.handler.set(v5.clone());
    assert_eq!(*client.fetch_descriptor(T).unwrap(), v5);
    assert_eq!(*client.descriptor(), v5);
}

#[test]
fn a_new_epoch_ends_the_connection() {
    let f = start();
    let pushed = connect(&f.session);
    let fetched = connect(&f.session);
    // The process "restarted" under the same session.
    let restarted = descriptor(0x3333, &f.session, 10, 1);
    f.handler.set(restarted.clone());
    match fetched.fetch_descriptor(T) {
        Err(ControlError::Disconnected { reason, .. }) => {
            assert!(reason.contains("epoch"), "{reason}")
        }
        other => panic!("fetch across a restart gave {other:?}"),
    }
    assert!(!fetched.is_alive());
    f.server.publish(&restarted);
    wait_until("the client to drop the restarted peer", || {
        !pushed.is_alive()
    });
    assert!(matches!(
        pushed.probe(T),
        Err(ControlError::Disconnected { .. })
    ));
    // The descriptor stays the handshake's.
    assert_eq!(pushed.descriptor().epoch, 9);
    // Handshaking again works.
    assert_eq!(connect(&f.session).descriptor().epoch, 10);
}

#[test]
fn many_threads_share_one_client() {
    let f = start();
    let client = Arc::new(connect(&f.session));
    let threads: Vec<JoinHandle<()>> = (0..8u8)
        .map(|t| {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    client.probe(T).unwrap();
                    client.notify(&[t, i], T).unwrap();
                    assert_eq!(client.fetch_descriptor(T).unwrap().engine_id, 0x2222);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let notes = f.handler.wait_notes(400);
    assert_eq!(notes.len(), 400);
    for t in 0..8u8 {
        // Each thread's notifications arrive in its order.
        let mine: Vec<u8> = notes
            .iter()
            .filter(|(_, b)| b[0] == t)
            .map(|(_, b)| b[1])
            .collect();
        assert_eq!(mine, (0..50).collect::<Vec<u8>>());
    }
}

#[test]
fn connections_are_counted_and_closing_a_client_ends_its_connection() {
    let f = start();
    let a = connect(&f.session);
    let b = connect(&f.session);
    assert_eq!(f.server.connections(), 2);
    a.close();
    assert!(!a.is_alive());
    assert!(matches!(a.probe(T), Err(ControlError::Disconnected { .. })));
    wait_until("the server to see the close", || {
        f.server.connections() == 1
    });
    b.probe(T).unwrap();
    drop(b);
    wait_until("the server to see the drop", || f.server.connections() == 0);
}

// ---- bad input on the server's side ----

#[test]
fn garbage_closes_only_that_connection() {
    let f = start();
    let old = connect(&f.session);
    let mut stream = raw(&f.session);
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
    stream.write_all(&garbage).unwrap();
    let message = expect_error(&mut stream, error_code::MALFORMED, 0);
    assert!(message.contains("magic"), "{message}");
    expect_closed(&mut stream);
    assert_healthy(&f, Some(&old));
}

#[test]
fn bad_magic_is_answered_and_closed() {
    let f = start();
    let mut stream = raw_handshake(&f.session);
    let mut bad = message_frame(&Message::Probe { nonce: 1 }, 2);
    bad[3] = b'Z';
    stream.write_all(&bad).unwrap();
    expect_error(&mut stream, error_code::MALFORMED, 0);
    expect_closed(&mut stream);
    assert_healthy(&f, None);
}

#[test]
fn oversized_body_is_refused_before_it_arrives() {
    let f = start();
    let old = connect(&f.session);
    let mut stream = raw_handshake(&f.session);
    let header = FrameHeader::new(kind::NOTIFY, MAX_BODY + 1, 2).encode();
    stream.write_all(&header).unwrap();
    let message = expect_error(&mut stream, error_code::MALFORMED, 0);
    assert!(message.contains("exceeds"), "{message}");
    expect_closed(&mut stream);
    let header = FrameHeader::new(kind::NOTIFY, u32::MAX, 2).encode();
    let mut stream = raw(&f.session);
    stream.write_all(&header).unwrap();
    expect_error(&mut stream, error_code::MALFORMED, 0);
    expect_closed(&mut stream);
    assert_healthy(&f, Some(&old));
}

#[test]
fn truncated_frames_close_the_connection() {
    let f = start();
    let old = connect(&f.session);
    // Mid-body.
    let mut stream = raw_handshake(&f.session);
    let full = message_frame(
        &Message::Notify {
            bytes: vec![1; 100],
        },
        2,
    );
    stream.write_all(&full[..HEADER_LEN + 10]).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut stream);
    // Mid-header.
    let mut stream = raw(&f.session);
    stream.write_all(&full[..7]).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut stream);
    assert!(f.handler.notes.lock().unwrap().is_empty());
    assert_healthy(&f, Some(&old));
}

#[test]
fn unknown_version_is_answered_then_closed() {
    let f = start();
    let old = connect(&f.session);
    let mut stream = raw(&f.session);
    let mut bytes = FrameHeader {
        version: 2,
        kind: kind::PROBE,
        len: 8,
        request_id: 77,
    }
    .encode()
    .to_vec();
    bytes.extend_from_slice(&5u64.to_le_bytes());
    stream.write_all(&bytes).unwrap();
    let message = expect_error(&mut stream, error_code::UNSUPPORTED_VERSION, 77);
    assert!(message.contains("version 2"), "{message}");
    expect_closed(&mut stream);
    assert_healthy(&f, Some(&old));
}

#[test]
fn unknown_kind_is_answered_and_the_connection_stays_usable() {
    let f = start();
    let mut stream = raw_handshake(&f.session);
    stream.write_all(&frame(200, 42, b"12345")).unwrap();
    stream.write_all(&frame(0, 43, &[])).unwrap();
    expect_error(&mut stream, error_code::UNKNOWN_KIND, 42);
    expect_error(&mut stream, error_code::UNKNOWN_KIND, 43);
    stream
        .write_all(&message_frame(&Message::Probe { nonce: 0xabc }, 44))
        .unwrap();
    match read_frame(&mut stream) {
        Some((header, Message::ProbeReply { nonce: 0xabc })) => assert_eq!(header.request_id, 44),
        other => panic!("expected a ProbeReply, got {other:?}"),
    }
    // Unknown kinds before the handshake are answered the same way.
    let mut stream = raw(&f.session);
    stream.write_all(&frame(999, 5, b"x")).unwrap();
    expect_error(&mut stream, error_code::UNKNOWN_KIND, 5);
    assert_healthy(&f, None);
}

#[test]
fn malformed_body_is_answered_and_closed() {
    let f = start();
    let mut stream = raw_handshake(&f.session);
    stream
        .write_all(&frame(kind::PROBE, 3, &[1, 2, 3]))
        .unwrap();
    let message = expect_error(&mut stream, error_code::MALFORMED, 3);
    assert!(message.contains("Probe"), "{message}");
    expect_closed(&mut stream);
    // A handshake with an invalid descriptor (overlapping regions).
    let mut bad = initiator();
    bad.regions[1].addr = bad.regions[0].addr;
    let mut stream = raw(&f.session);
    stream
        .write_all(&message_frame(&Message::Handshake(bad), 1))
        .unwrap();
    expect_error(&mut stream, error_code::MALFORMED, 1);
    expect_closed(&mut stream);
    assert_healthy(&f, None);
}

#[test]
fn the_first_message_must_be_a_handshake() {
    let f = start();
    let mut stream = raw(&f.session);
    stream
        .write_all(&message_frame(&Message::Probe { nonce: 1 }, 9))
        .unwrap();
    expect_error(&mut stream, error_code::UNEXPECTED, 9);
    expect_closed(&mut stream);
    // After the handshake, a reply-kind message or a second handshake is UNEXPECTED but
    // the connection stays up.
    let mut stream = raw_handshake(&f.session);
    stream
        .write_all(&message_frame(&Message::NotifyAck, 2))
        .unwrap();
    expect_error(&mut stream, error_code::UNEXPECTED, 2);
    stream
        .write_all(&message_frame(&Message::Handshake(initiator()), 3))
        .unwrap();
    expect_error(&mut stream, error_code::UNEXPECTED, 3);
    stream
        .write_all(&message_frame(&Message::Notify { bytes: vec![9] }, 4))
        .unwrap();
    assert!(matches!(read_frame(&mut stream), Some((h, Message::NotifyAck)) if h.request_id == 4));
    assert_eq!(f.handler.wait_notes(1), vec![(0x1111, vec![9])]);
}

// ---- lifetimes ----

#[test]
fn dropping_the_server_disconnects_its_clients() {
    let f = start();
    let a = connect(&f.session);
    let b = connect(&f.session);
    let idle_raw = raw(&f.session);
    let Fixture {
        server, session, ..
    } = f;
    drop(server);
    wait_until("the clients to see the server go", || {
        !a.is_alive() && !b.is_alive()
    });
    assert!(matches!(a.probe(T), Err(ControlError::Disconnected { .. })));
    assert!(matches!(
        ControlClient::connect(&session, &initiator(), T),
        Err(ControlError::Refused { .. })
    ));
    drop(idle_raw);
}

#[test]
fn connecting_where_nobody_listens_is_refused() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let session = format!("127.0.0.1:{port}");
    match ControlClient::connect(&session, &initiator(), T) {
        Err(e @ ControlError::Refused { .. }) => assert!(e.to_string().contains(&session)),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn bad_addresses_and_descriptors_are_refused() {
    for session in ["no-port", "127.0.0.1:notaport", ""] {
        match ControlClient::connect(session, &initiator(), T) {
            Err(e @ ControlError::BadAddress { .. }) => {
                assert!(e.to_string().contains(&format!("{session:?}")), "{e}")
            }
            other => panic!("{session:?}: expected BadAddress, got {other:?}"),
        }
    }
    let mut bad = initiator();
    bad.regions[0].len = 0;
    assert!(matches!(
        ControlClient::connect("127.0.0.1:1", &bad, T),
        Err(ControlError::InvalidDescriptor { .. })
    ));
}

/// A fake server on its own thread, running `serve` on the first connection.
/// Answers a fake server's client's Handshake (the Handshake itself was read already).
fn answer_handshake(stream: &mut TcpStream) {
    stream
        .write_all(&message_frame(
            &Message::HandshakeReply(descriptor(5, "fake", 1, 1)),
            1,
        ))
        .unwrap();
}

fn fake_server(serve: impl FnOnce(TcpStream) + Send + 'static) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let session = listener.local_addr().unwrap().to_string();
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        // Read the Handshake.
        match read_frame(&mut stream) {
            Some((_, Message::Handshake(_))) => serve(stream),
            other => panic!("fake server expected a Handshake, got {other:?}"),
        }
    });
    (session, thread)
}

#[test]
fn a_dying_server_fails_waiting_callers_promptly() {
    let (session, thread) = fake_server(|mut stream| {
        stream
            .write_all(&message_frame(
                &Message::HandshakeReply(descriptor(5, "fake", 1, 1)),
                1,
            ))
            .unwrap();
        // Take the Probe, then die without answering.
        assert!(matches!(
            read_frame(&mut stream),
            Some((_, Message::Probe { .. }))
        ));
    });
    let client = ControlClient::connect(&session, &initiator(), T).unwrap();
    let long = Duration::from_secs(600);
    let start = Instant::now();
    match client.probe(long) {
        Err(ControlError::Disconnected { reason, .. }) => {
            assert!(reason.contains("closed"), "{reason}")
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(
        start.elapsed() < T,
        "the caller waited {:?}",
        start.elapsed()
    );
    assert!(!client.is_alive());
    // Later calls fail at once.
    assert!(matches!(
        client.notify(b"x", long),
        Err(ControlError::Disconnected { .. })
    ));
    thread.join().unwrap();
}

#[test]
fn a_handshake_answered_with_an_error_is_a_peer_error() {
    let (session, thread) = fake_server(|mut stream| {
        stream
            .write_all(&message_frame(
                &Message::error(error_code::INTERNAL, "not today"),
                1,
            ))
            .unwrap();
        expect_closed(&mut stream);
    });
    match ControlClient::connect(&session, &initiator(), T) {
        Err(
            e @ ControlError::PeerError {
                code: error_code::INTERNAL,
                ..
            },
        ) => {
            let text = e.to_string();
            assert!(
                text.contains("not today") && text.contains(&session),
                "{text}"
            );
        }
        other => panic!("expected PeerError, got {other:?}"),
    }
    thread.join().unwrap();
}

#[test]
fn a_malformed_handshake_reply_is_refused() {
    let replies: Vec<Vec<u8>> = vec![
        frame(kind::HANDSHAKE_REPLY, 1, &[1, 2, 3]),
        message_frame(&Message::ProbeReply { nonce: 1 }, 1),
        message_frame(&Message::HandshakeReply(descriptor(5, "fake", 1, 1)), 2),
        b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
    ];
    for reply in replies {
        let sent = reply.clone();
        let (session, thread) = fake_server(move |mut stream| {
            stream.write_all(&sent).unwrap();
            expect_closed(&mut stream);
        });
        match ControlClient::connect(&session, &initiator(), T) {
            Err(ControlError::MalformedReply { session: s, .. }) => assert_eq!(s, session),
            other => panic!("reply {reply:?}: expected MalformedReply, got {other:?}"),
        }
        thread.join().unwrap();
    }
}

#[test]
fn a_silent_server_times_the_handshake_out() {
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (session, thread) = fake_server(move |_stream| {
        // Say nothing until the client gave up.
        let _ = hold.recv();
    });
    let start = Instant::now();
    match ControlClient::connect(&session, &initiator(), Duration::from_millis(200)) {
        Err(ControlError::Timeout { session: s, .. }) => assert_eq!(s, session),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(200));
    release.send(()).unwrap();
    thread.join().unwrap();
}

#[test]
fn a_slow_reply_times_out_and_the_late_reply_is_ignored() {
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (session, thread) = fake_server(move |mut stream| {
        stream
            .write_all(&message_frame(
                &Message::HandshakeReply(descriptor(5, "fake", 1, 1)),
                1,
            ))
            .unwrap();
        let Some((first, Message::Probe { nonce })) = read_frame(&mut stream) else {
            panic!("expected a Probe")
        };
        // Answer only after the client gave up on it.
        let _ = hold.recv();
        stream
            .write_all(&message_frame(
                &Message::ProbeReply { nonce },
                first.request_id,
            ))
            .unwrap();
        // The next probe is answered at once.
        let Some((second, Message::Probe { nonce })) = read_frame(&mut stream) else {
            panic!("expected a second Probe")
        };
        assert_ne!(second.request_id, first.request_id);
        stream
            .write_all(&message_frame(
                &Message::ProbeReply { nonce },
                second.request_id,
            ))
            .unwrap();
        expect_closed(&mut stream);
    });
    let client = ControlClient::connect(&session, &initiator(), T).unwrap();
    assert!(matches!(
        client.probe(Duration::from_millis(100)),
        Err(ControlError::Timeout { .. })
    ));
    release.send(()).unwrap();
    client.probe(T).unwrap();
    assert!(client.is_alive());
    drop(client);
    thread.join().unwrap();
}

// ---- limits: refused notifications, connection caps, handshake deadline, body sizes ----

#[test]
fn a_refused_notification_is_a_busy_peer_error_and_the_connection_stays() {
    let f = start();
    let client = connect(&f.session);
    *f.handler.refuse.lock().unwrap() = Some("inbox full (64 of 64)".into());
    match client.notify(b"one too many", T) {
        Err(
            e @ ControlError::PeerError {
                code: error_code::BUSY,
                ..
            },
        ) => {
            let text = e.to_string();
            assert!(
                text.contains("BUSY") && text.contains("inbox full (64 of 64)"),
                "{text}"
            );
        }
        other => panic!("expected PeerError BUSY, got {other:?}"),
    }
    assert!(client.is_alive());
    assert!(f.handler.notes.lock().unwrap().is_empty());
    // The same request id gets the Error on a raw connection too.
    let mut stream = raw_handshake(&f.session);
    stream
        .write_all(&message_frame(&Message::Notify { bytes: vec![1] }, 12))
        .unwrap();
    let message = expect_error(&mut stream, error_code::BUSY, 12);
    assert_eq!(message, "inbox full (64 of 64)");
    // Once the handler takes notifications again, the same connections work.
    *f.handler.refuse.lock().unwrap() = None;
    client.notify(b"again", T).unwrap();
    stream
        .write_all(&message_frame(&Message::Notify { bytes: vec![2] }, 13))
        .unwrap();
    assert!(matches!(read_frame(&mut stream), Some((h, Message::NotifyAck)) if h.request_id == 13));
    assert_eq!(
        f.handler.wait_notes(2),
        vec![(0x1111, b"again".to_vec()), (0x1111, vec![2])]
    );
}

#[test]
fn default_limits_are_the_documented_ones() {
    let limits = ServerLimits::default();
    assert_eq!(limits.max_connections, MAX_CONNECTIONS);
    assert_eq!(MAX_CONNECTIONS, 1024);
    assert_eq!(limits.handshake_timeout, HANDSHAKE_TIMEOUT);
    assert_eq!(HANDSHAKE_TIMEOUT, Duration::from_secs(10));
}

#[test]
fn a_connection_that_does_not_handshake_in_time_is_closed() {
    let timeout = Duration::from_millis(300);
    let f = start_limited(Some(ServerLimits {
        handshake_timeout: timeout,
        ..ServerLimits::default()
    }));
    // Handshaken before the others: its deadline passes too, and must not matter.
    let early = connect(&f.session);
    let opened = Instant::now();
    let mut silent = raw(&f.session);
    // Unknown kinds are answered, but do not extend the deadline.
    let mut chatty = raw(&f.session);
    chatty.write_all(&frame(200, 5, b"hi")).unwrap();
    expect_error(&mut chatty, error_code::UNKNOWN_KIND, 5);
    // Half a header, then nothing.
    let mut stalled = raw(&f.session);
    stalled
        .write_all(&FrameHeader::new(kind::HANDSHAKE, 100, 1).encode()[..9])
        .unwrap();
    expect_closed(&mut silent);
    assert!(
        opened.elapsed() >= timeout,
        "closed after {:?}",
        opened.elapsed()
    );
    expect_closed(&mut chatty);
    expect_closed(&mut stalled);
    wait_until("the server to drop the three", || {
        f.server.connections() == 1
    });
    // The handshaken connection outlived its handshake deadline.
    assert!(early.is_alive());
    early.probe(T).unwrap();
    assert_healthy(&f, Some(&early));
}

#[test]
fn connections_beyond_the_cap_are_closed_and_the_others_keep_working() {
    let f = start_limited(Some(ServerLimits {
        max_connections: 2,
        ..ServerLimits::default()
    }));
    let a = connect(&f.session);
    let b = connect(&f.session);
    assert_eq!(f.server.connections(), 2);
    for _ in 0..3 {
        let mut extra = raw(&f.session);
        expect_closed(&mut extra);
    }
    match ControlClient::connect(&f.session, &initiator(), T) {
        Err(ControlError::Disconnected { .. }) => {}
        other => panic!("expected the capped handshake to be Disconnected, got {other:?}"),
    }
    assert_eq!(f.server.connections(), 2);
    a.probe(T).unwrap();
    b.notify(b"still served", T).unwrap();
    assert_eq!(
        f.handler.wait_notes(1),
        vec![(0x1111, b"still served".to_vec())]
    );
    // A freed place is taken again.
    drop(a);
    wait_until("the server to see the drop", || f.server.connections() == 1);
    let c = connect(&f.session);
    c.probe(T).unwrap();
    b.probe(T).unwrap();
}

#[test]
fn a_body_longer_than_its_kind_allows_is_refused_from_the_header() {
    let f = start();
    let old = connect(&f.session);
    // 1 MiB announced for a Probe (8 bytes), none sent: the server must answer without
    // waiting for (or allocating) the body.
    let cases = [
        (kind::PROBE, 1 << 20),
        (kind::PROBE_REPLY, 9),
        (kind::DESCRIPTOR_REQUEST, 1),
        (kind::NOTIFY_ACK, 1),
        (kind::NOTIFY, MAX_NOTIFY as u32 + 5),
        (kind::ERROR, 1 << 20),
        (kind::RDMA_CONNECT, 4 + MAX_STRING as u32 + 24 + 10 + 1),
        (kind::RDMA_CONNECT_REPLY, 9),
    ];
    for (k, len) in cases {
        let mut stream = raw_handshake(&f.session);
        stream
            .write_all(&FrameHeader::new(k, len, 21).encode())
            .unwrap();
        let message = expect_error(&mut stream, error_code::MALFORMED, 21);
        assert!(
            message.contains("exceeds") && message.contains(&len.to_string()),
            "{message}"
        );
        expect_closed(&mut stream);
    }
    // Before the handshake too (and a non-Handshake is refused from its header).
    let mut stream = raw(&f.session);
    stream
        .write_all(&FrameHeader::new(kind::PROBE, 1 << 20, 3).encode())
        .unwrap();
    expect_error(&mut stream, error_code::MALFORMED, 3);
    expect_closed(&mut stream);
    let mut stream = raw(&f.session);
    stream
        .write_all(&FrameHeader::new(kind::NOTIFY, 1000, 4).encode())
        .unwrap();
    expect_error(&mut stream, error_code::UNEXPECTED, 4);
    expect_closed(&mut stream);
    assert!(f.handler.notes.lock().unwrap().is_empty());
    assert_healthy(&f, Some(&old));
}

/// A valid descriptor with `regions` regions (about 29 bytes each on the wire).
fn big_descriptor(session: &str, version: u64, regions: usize) -> SegmentDescriptor {
    let mut d = descriptor(0x2222, session, 9, version);
    d.regions = (0..regions as u64)
        .map(|i| RegionInfo {
            addr: 0x1_0000_0000 + i * 0x2000,
            len: 0x1000,
            location: Location::Cpu(0),
            access: Access::ALL,
        })
        .collect();
    d
}

#[test]
fn publish_does_not_wait_for_a_peer_that_does_not_read() {
    let f = start();
    // Handshaken, then never reads: the pushes pile up in the socket buffers.
    let stuck = raw_handshake(&f.session);
    let client = connect(&f.session);
    assert_eq!(f.server.connections(), 2);
    // Well under the 1 s a blocking write to the stuck peer would take (publish still
    // validates the 200k-region descriptor, a few ms in a debug build).
    let fast = Duration::from_millis(500);
    let mut version = 1;
    let started = Instant::now();
    // Each round pushes ~5.8 MB to the stuck peer; the socket buffers fill within a few
    // rounds, then the publisher gives up on that peer after its 1 s deadline.
    for round in 0.. {
        assert!(round < 20, "the stuck peer was never disconnected");
        version += 1;
        let d = big_descriptor(&f.session, version, 200_000);
        let t = Instant::now();
        f.server.publish(&d);
        assert!(t.elapsed() < fast, "publish took {:?}", t.elapsed());
        // Again while the publisher is (likely) busy writing to the stuck peer.
        version += 1;
        let d = big_descriptor(&f.session, version, 200_000);
        let t = Instant::now();
        f.server.publish(&d);
        assert!(t.elapsed() < fast, "publish took {:?}", t.elapsed());
        // The well-behaved client gets the newest (it is served after the stuck one).
        wait_until("the client to get the newest descriptor", || {
            client.descriptor().version == version
        });
        assert_eq!(client.descriptor().regions.len(), 200_000);
        if f.server.connections() == 1 {
            break;
        }
    }
    wait_until("the stuck peer to be dropped", || {
        f.server.connections() == 1
    });
    assert!(started.elapsed() >= Duration::from_secs(1));
    drop(stuck);
    assert!(client.is_alive());
    client.probe(T).unwrap();
    // Small descriptors still flow.
    let small = descriptor(0x2222, &f.session, 9, version + 1);
    f.server.publish(&small);
    wait_until("the small descriptor", || {
        client.descriptor().version == version + 1
    });
}

#[test]
fn publish_with_no_handshaken_peer_returns_at_once_and_latecomers_get_the_newest() {
    let f = start();
    // A connection that has not handshaken is not pushed to.
    let mut pending = raw(&f.session);
    let big = big_descriptor(&f.session, 2, 200_000);
    let t = Instant::now();
    f.server.publish(&big);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // The handler still serves version 1: a peer handshaking now gets version 1, then
    // the published version 2 right after.
    pending
        .write_all(&message_frame(&Message::Handshake(initiator()), 1))
        .unwrap();
    assert!(matches!(
        read_frame(&mut pending),
        Some((h, Message::HandshakeReply(d))) if h.request_id == 1 && d.version == 1
    ));
    match read_frame(&mut pending) {
        Some((h, Message::Refresh(d))) => {
            assert_eq!(h.request_id, 0);
            assert_eq!(d, big);
        }
        other => panic!("expected the pushed Refresh, got {other:?}"),
    }
    let client = connect(&f.session);
    wait_until("the latecomer to get version 2", || {
        client.descriptor().version == 2
    });
    // No older version is pushed after a newer one.
    f.server.publish(&descriptor(0x2222, &f.session, 9, 1));
    f.server.publish(&descriptor(0x2222, &f.session, 9, 3));
    match read_frame(&mut pending) {
        Some((_, Message::Refresh(d))) => assert_eq!(d.version, 3),
        other => panic!("expected Refresh version 3, got {other:?}"),
    }
}

#[test]
fn dropping_the_server_is_prompt_with_a_stuck_peer() {
    let f = start();
    let stuck = raw_handshake(&f.session);
    let client = connect(&f.session);
    for version in 2..6 {
        f.server
            .publish(&big_descriptor(&f.session, version, 200_000));
    }
    let Fixture { server, .. } = f;
    let t = Instant::now();
    drop(server);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        t.elapsed()
    );
    wait_until("the client to see the server go", || !client.is_alive());
    drop(stuck);
}

// ---- RDMA queue-pair connection ----

/// A target that serves RDMA on the two NICs of its descriptor: it records each request
/// (sender's engine id and the request) and answers with a QP of its own, refuses a NIC
/// it does not have, and gives an invalid reply (a QPN beyond 24 bits) to PSN 0xbad.
struct RdmaTarget {
    descriptor: SegmentDescriptor,
    requests: Mutex<Vec<(u64, RdmaConnectRequest)>>,
}

impl ControlHandler for RdmaTarget {
    fn descriptor(&self) -> SegmentDescriptor {
        self.descriptor.clone()
    }

    fn notified(&self, _: &SegmentDescriptor, _: Vec<u8>) -> Result<(), String> {
        Ok(())
    }

    fn rdma_connect(
        &self,
        from: &SegmentDescriptor,
        request: &RdmaConnectRequest,
    ) -> Result<RdmaConnectReply, String> {
        let nics = self.descriptor.rdma_nics.len();
        if usize::from(request.target_nic) >= nics {
            return Err(format!(
                "no RDMA NIC {}: this engine has {nics}",
                request.target_nic
            ));
        }
        self.requests
            .lock()
            .unwrap()
            .push((from.engine_id, request.clone()));
        if request.psn == 0xbad {
            return Ok(RdmaConnectReply {
                qpn: 1 << 24,
                psn: 1,
            });
        }
        Ok(RdmaConnectReply {
            qpn: 0x40_0000 | request.qpn,
            psn: (request.psn + 1) & 0xff_ffff,
        })
    }
}

fn start_rdma() -> (ControlServer, Arc<RdmaTarget>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let session = listener.local_addr().unwrap().to_string();
    let handler = Arc::new(RdmaTarget {
        descriptor: descriptor(0x4444, &session, 2, 1),
        requests: Mutex::new(Vec::new()),
    });
    let server = ControlServer::start(listener, handler.clone()).unwrap();
    (server, handler, session)
}

fn connect_request(target_nic: u16, qpn: u32, psn: u32) -> RdmaConnectRequest {
    RdmaConnectRequest {
        initiator: rdma_nic(7),
        target_nic,
        qpn,
        psn,
    }
}

#[test]
fn rdma_connect_reaches_the_handler_and_its_reply_comes_back() {
    let (_server, handler, session) = start_rdma();
    let client = connect(&session);
    // The target's NICs and keys come with its descriptor.
    assert_eq!(
        client.descriptor().rdma_nics,
        vec![rdma_nic(0), rdma_nic(1)]
    );
    assert_eq!(client.descriptor().rkeys.len(), 3);

    let request = connect_request(1, 0x12, 0xff_ffff);
    let reply = client.rdma_connect(&request, T).unwrap();
    assert_eq!(
        reply,
        RdmaConnectReply {
            qpn: 0x40_0012,
            psn: 0
        }
    );
    assert_eq!(*handler.requests.lock().unwrap(), vec![(0x1111, request)]);

    // Replies are matched to their requests across threads.
    let client = Arc::new(client);
    let threads: Vec<JoinHandle<()>> = (0..8u32)
        .map(|t| {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                for i in 0..25u32 {
                    let qpn = t << 8 | i;
                    let request = connect_request((i % 2) as u16, qpn, qpn + 5);
                    let reply = client.rdma_connect(&request, T).unwrap();
                    assert_eq!(reply.qpn, 0x40_0000 | qpn);
                    assert_eq!(reply.psn, qpn + 6);
                    client.probe(T).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(handler.requests.lock().unwrap().len(), 1 + 8 * 25);
}

#[test]
fn rdma_connect_refusals_keep_the_connection_usable() {
    let (_server, handler, session) = start_rdma();
    let client = connect(&session);

    // The handler refuses a NIC it does not have.
    match client.rdma_connect(&connect_request(2, 1, 1), T) {
        Err(e @ ControlError::PeerError { code, .. }) if code == error_code::RDMA_REFUSED => {
            let text = e.to_string();
            assert!(
                text.contains("RDMA_REFUSED (code 7): no RDMA NIC 2: this engine has 2"),
                "{text}"
            );
        }
        other => panic!("expected RDMA_REFUSED, got {other:?}"),
    }
    assert!(client.is_alive());

    // An invalid reply of the handler is not sent: the peer gets INTERNAL.
    match client.rdma_connect(&connect_request(0, 1, 0xbad), T) {
        Err(ControlError::PeerError { code, message, .. }) => {
            assert_eq!(code, error_code::INTERNAL, "{message}");
            assert!(
                message.contains("qpn 0x1000000 does not fit in 24 bits"),
                "{message}"
            );
        }
        other => panic!("expected INTERNAL, got {other:?}"),
    }
    assert!(client.is_alive());

    // An invalid request is not sent at all.
    for bad in [
        connect_request(0, 1 << 24, 1),
        connect_request(0, 1, 1 << 24),
        RdmaConnectRequest {
            initiator: RdmaNic {
                mtu: 1500,
                ..rdma_nic(7)
            },
            ..connect_request(0, 1, 1)
        },
    ] {
        match client.rdma_connect(&bad, T) {
            Err(e @ ControlError::InvalidMessage { .. }) => {
                assert!(e.to_string().contains("not sent"), "{e}")
            }
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
    assert_eq!(handler.requests.lock().unwrap().len(), 1); // the 0xbad one
    assert!(client.is_alive());
    client.probe(T).unwrap();
    client.notify(b"after", T).unwrap();
    assert_eq!(
        client.rdma_connect(&connect_request(0, 3, 4), T).unwrap(),
        RdmaConnectReply {
            qpn: 0x40_0003,
            psn: 5
        }
    );
}

#[test]
fn an_engine_that_serves_no_rdma_refuses_and_stays_usable() {
    // TestHandler does not implement rdma_connect: the default refuses.
    let f = start();
    let client = connect(&f.session);
    for _ in 0..3 {
        match client.rdma_connect(&connect_request(0, 0x77, 0x88), T) {
            Err(ControlError::PeerError { code, message, .. }) => {
                assert_eq!(code, error_code::RDMA_REFUSED);
                assert_eq!(message, "this engine does not serve RDMA");
            }
            other => panic!("expected RDMA_REFUSED, got {other:?}"),
        }
        assert!(client.is_alive());
    }
    assert_healthy(&f, Some(&client));

    // On the wire: the Error echoes the request id; the connection goes on.
    let mut stream = raw_handshake(&f.session);
    stream
        .write_all(&message_frame(
            &Message::RdmaConnect(connect_request(0, 1, 2)),
            31,
        ))
        .unwrap();
    let message = expect_error(&mut stream, error_code::RDMA_REFUSED, 31);
    assert_eq!(message, "this engine does not serve RDMA");
    stream
        .write_all(&message_frame(&Message::Probe { nonce: 5 }, 32))
        .unwrap();
    assert!(matches!(
        read_frame(&mut stream),
        Some((h, Message::ProbeReply { nonce: 5 })) if h.request_id == 32
    ));
}

#[test]
fn bad_rdma_frames_on_the_wire() {
    let (_server, handler, session) = start_rdma();
    let old = connect(&session);

    // A reply kind sent to the server is UNEXPECTED; the connection stays up.
    let mut stream = raw(&session);
    stream
        .write_all(&message_frame(&Message::Handshake(initiator()), 1))
        .unwrap();
    assert!(matches!(
        read_frame(&mut stream),
        Some((_, Message::HandshakeReply(_)))
    ));
    stream
        .write_all(&message_frame(
            &Message::RdmaConnectReply(RdmaConnectReply { qpn: 1, psn: 2 }),
            2,
        ))
        .unwrap();
    expect_error(&mut stream, error_code::UNEXPECTED, 2);
    stream
        .write_all(&message_frame(
            &Message::RdmaConnect(connect_request(1, 9, 10)),
            3,
        ))
        .unwrap();
    match read_frame(&mut stream) {
        Some((h, Message::RdmaConnectReply(reply))) => {
            assert_eq!(h.request_id, 3);
            assert_eq!(reply.qpn, 0x40_0009);
        }
        other => panic!("expected an RdmaConnectReply, got {other:?}"),
    }

    // A QPN beyond 24 bits does not decode: MALFORMED, and the connection closes.
    stream
        .write_all(&message_frame(
            &Message::RdmaConnect(connect_request(1, 1 << 24, 10)),
            4,
        ))
        .unwrap();
    let message = expect_error(&mut stream, error_code::MALFORMED, 4);
    assert!(message.contains("qpn 0x1000000"), "{message}");
    expect_closed(&mut stream);

    // Before the handshake: UNEXPECTED, closed, the handler never called.
    let mut stream = raw(&session);
    stream
        .write_all(&message_frame(
            &Message::RdmaConnect(connect_request(0, 1, 1)),
            1,
        ))
        .unwrap();
    expect_error(&mut stream, error_code::UNEXPECTED, 1);
    expect_closed(&mut stream);

    assert_eq!(handler.requests.lock().unwrap().len(), 1);
    assert!(old.is_alive());
    old.probe(T).unwrap();
}

#[test]
fn descriptors_with_bad_rdma_fields_are_refused_at_the_handshake() {
    let f = start();
    let mut bad = initiator();
    bad.rkeys[0].nic = 5;
    match ControlClient::connect(&f.session, &bad, T) {
        Err(ControlError::InvalidDescriptor { reason }) => {
            assert!(reason.contains("rkey 0"), "{reason}")
        }
        other => panic!("expected InvalidDescriptor, got {other:?}"),
    }
    let mut stream = raw(&f.session);
    stream
        .write_all(&message_frame(&Message::Handshake(bad), 1))
        .unwrap();
    let message = expect_error(&mut stream, error_code::MALFORMED, 1);
    assert!(message.contains("for RDMA NIC 5"), "{message}");
    expect_closed(&mut stream);
    assert_healthy(&f, None);
}

#[test]
fn store_requests_reach_the_handler_over_both_clients() {
    let f = start();
    let client = connect(&f.session);
    assert_eq!(client.store(b"abc".to_vec(), T).unwrap(), b"cba");
    match client.store(b"no thanks".to_vec(), T) {
        Err(ControlError::PeerError { code, message, .. }) => {
            assert_eq!(code, error_code::STORE_REFUSED);
            assert!(message.contains("not serving"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(client.is_alive(), "a refusal keeps the connection");
    let mut sync = SyncControlClient::connect(&f.session, &initiator(), T).unwrap();
    for i in 0..100u8 {
        assert_eq!(sync.store(vec![1, 2, i], T).unwrap(), vec![i, 2, 1]);
    }
    // A descriptor published meanwhile is not pushed to this quiet connection (one pushed
    // before the server saw Quiet would be skipped by the next call).
    f.server.publish(&descriptor(0x2222, &f.session, 9, 2));
    assert_eq!(sync.store(b"xy".to_vec(), T).unwrap(), b"yx");
    assert!(matches!(
        sync.store(b"no".to_vec(), T),
        Err(ControlError::PeerError {
            code: error_code::STORE_REFUSED,
            ..
        })
    ));
    assert!(!sync.is_dead(), "a refusal keeps the connection");
    assert_eq!(sync.store(b"ok".to_vec(), T).unwrap(), b"ko");
}

#[test]
fn a_sync_client_times_out_and_notices_a_dead_server() {
    let (session, thread) = fake_server(|mut stream| {
        answer_handshake(&mut stream);
        // Take Quiet and one request, never answer it, and hang up.
        assert!(matches!(read_frame(&mut stream), Some((_, Message::Quiet))));
        assert!(matches!(
            read_frame(&mut stream),
            Some((_, Message::StoreRequest(_)))
        ));
    });
    let mut sync = SyncControlClient::connect(&session, &initiator(), T).unwrap();
    let start = Instant::now();
    match sync.store(b"q".to_vec(), Duration::from_secs(600)) {
        Err(ControlError::Disconnected { .. }) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(start.elapsed() < T, "waited {:?}", start.elapsed());
    thread.join().unwrap();

    // A server that never answers: the call ends at its timeout.
    let (session, thread) = fake_server(|mut stream| {
        answer_handshake(&mut stream);
        let _ = read_frame(&mut stream); // Quiet
        let _ = read_frame(&mut stream); // the request, never answered
        let _ = read_frame(&mut stream); // blocks until the client hangs up
    });
    let mut sync = SyncControlClient::connect(&session, &initiator(), T).unwrap();
    let t = Duration::from_millis(200);
    let start = Instant::now();
    assert!(matches!(
        sync.store(b"q".to_vec(), t),
        Err(ControlError::Timeout { .. })
    ));
    assert!(start.elapsed() >= t && start.elapsed() < T);
    drop(sync);
    thread.join().unwrap();
}

/// A peer that sends its reply a byte at a time cannot stretch a sync call past its
/// timeout.
#[test]
fn a_dribbled_reply_does_not_outlast_the_timeout() {
    let (session, thread) = fake_server(|mut stream| {
        answer_handshake(&mut stream);
        let _ = read_frame(&mut stream); // Quiet
        let Some((header, _)) = read_frame(&mut stream) else {
            panic!("no request")
        };
        let reply = message_frame(&Message::StoreReply(vec![7; 64]), header.request_id);
        for byte in reply {
            if stream.write_all(&[byte]).is_err() {
                return; // the client gave up
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut sync = SyncControlClient::connect(&session, &initiator(), T).unwrap();
    let t = Duration::from_millis(400);
    let start = Instant::now();
    let r = sync.store(b"q".to_vec(), t);
    assert!(matches!(r, Err(ControlError::Timeout { .. })), "{r:?}");
    assert!(start.elapsed() < t * 3, "took {:?}", start.elapsed());
    drop(sync);
    thread.join().unwrap();
}

/// A sync connection the peer closed while it was idle is found dead before the next
/// request is sent (so the caller may send it elsewhere without risk of it running twice).
#[test]
fn a_sync_connection_closed_while_idle_sends_nothing() {
    let (session, thread) = fake_server(|mut stream| {
        answer_handshake(&mut stream);
        let _ = read_frame(&mut stream); // Quiet; then hang up
    });
    let mut sync = SyncControlClient::connect(&session, &initiator(), T).unwrap();
    thread.join().unwrap();
    let r = sync.store(b"q".to_vec(), T);
    assert!(matches!(r, Err(ControlError::Disconnected { .. })), "{r:?}");
    assert!(
        !sync.last_request_sent(),
        "the request went out on a dead connection"
    );
}
