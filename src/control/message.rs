//! Control messages and their bodies.
//!
//! Encoding (little endian): integers fixed-size; a string is a `u32` byte count and that
//! many UTF-8 bytes; a vector is a `u32` item count and the items. A body holds exactly one
//! message: trailing bytes are an error. Decoding checks every count against the bytes
//! left (and the bounds below) before it allocates, and never panics.
//!
//! A segment descriptor is encoded as `engine_id u64, session str, host str, epoch u64,
//! version u64, regions vec<addr u64, len u64, location str, access u32>,
//! transports vec<kind str, params vec<key str, value str>>, rdma_nics vec<nic>,
//! rkeys vec<addr u64, len u64, nic u16, rkey u32>`, where an RDMA NIC (`nic`) is
//! `name str, port u8, lid u16, gid [u8; 16], gid_index u8, mtu u32`.
//!
//! RdmaConnect is `initiator nic, target_nic u16, qpn u32, psn u32`; RdmaConnectReply is
//! `qpn u32, psn u32`.

use std::fmt;
use std::str::FromStr;

use super::error::ControlError;
use crate::memory::{Access, Location};

/// Message kind numbers (the `kind` field of the frame header).
pub mod kind {
    /// [`Message::Handshake`](super::Message::Handshake).
    pub const HANDSHAKE: u16 = 1;
    /// [`Message::HandshakeReply`](super::Message::HandshakeReply).
    pub const HANDSHAKE_REPLY: u16 = 2;
    /// [`Message::DescriptorRequest`](super::Message::DescriptorRequest).
    pub const DESCRIPTOR_REQUEST: u16 = 3;
    /// [`Message::Refresh`](super::Message::Refresh).
    pub const REFRESH: u16 = 4;
    /// [`Message::Probe`](super::Message::Probe).
    pub const PROBE: u16 = 5;
    /// [`Message::ProbeReply`](super::Message::ProbeReply).
    pub const PROBE_REPLY: u16 = 6;
    /// [`Message::Notify`](super::Message::Notify).
    pub const NOTIFY: u16 = 7;
    /// [`Message::NotifyAck`](super::Message::NotifyAck).
    pub const NOTIFY_ACK: u16 = 8;
    /// [`Message::Error`](super::Message::Error).
    pub const ERROR: u16 = 9;
    /// [`Message::RdmaConnect`](super::Message::RdmaConnect).
    pub const RDMA_CONNECT: u16 = 10;
    /// [`Message::RdmaConnectReply`](super::Message::RdmaConnectReply).
    pub const RDMA_CONNECT_REPLY: u16 = 11;
    /// [`Message::StoreRequest`](super::Message::StoreRequest).
    pub const STORE_REQUEST: u16 = 12;
    /// [`Message::StoreReply`](super::Message::StoreReply).
    pub const STORE_REPLY: u16 = 13;
    /// [`Message::Quiet`](super::Message::Quiet).
    pub const QUIET: u16 = 14;

    /// Whether this build knows the kind.
    pub fn is_known(kind: u16) -> bool {
        (HANDSHAKE..=QUIET).contains(&kind)
    }
}

/// Codes of [`Message::Error`].
pub mod error_code {
    /// The frame's protocol version is not spoken here; the connection is closed.
    pub const UNSUPPORTED_VERSION: u16 = 1;
    /// The frame's message kind is unknown here; the body was skipped, the connection
    /// stays usable.
    pub const UNKNOWN_KIND: u16 = 2;
    /// The frame or its body does not decode; the connection is closed.
    pub const MALFORMED: u16 = 3;
    /// A valid message at the wrong time (e.g. anything but Handshake first).
    pub const UNEXPECTED: u16 = 4;
    /// The serving side failed (e.g. its own descriptor is invalid).
    pub const INTERNAL: u16 = 5;
    /// The serving side cannot take the request now (e.g. its notification inbox is
    /// full); the connection stays usable, retry later.
    pub const BUSY: u16 = 6;
    /// The serving side does not connect the RDMA queue pair asked for (it serves no
    /// RDMA, the NIC index is out of range, it is out of QPs, ...); the message says why.
    /// The connection stays usable.
    pub const RDMA_REFUSED: u16 = 7;
    /// A store request was refused as a whole (the engine serves no store segment); the
    /// connection stays up.
    pub const STORE_REFUSED: u16 = 8;

    /// The name of a code (`"UNKNOWN"` for codes this build does not know).
    pub fn name(code: u16) -> &'static str {
        match code {
            UNSUPPORTED_VERSION => "UNSUPPORTED_VERSION",
            UNKNOWN_KIND => "UNKNOWN_KIND",
            MALFORMED => "MALFORMED",
            UNEXPECTED => "UNEXPECTED",
            INTERNAL => "INTERNAL",
            BUSY => "BUSY",
            RDMA_REFUSED => "RDMA_REFUSED",
            STORE_REFUSED => "STORE_REFUSED",
            _ => "UNKNOWN",
        }
    }
}

/// Largest notification payload (1 MiB).
pub const MAX_NOTIFY: usize = 1 << 20;
/// Most regions in one descriptor.
pub const MAX_REGIONS: usize = 1 << 20;
/// Most transport offers in one descriptor.
pub const MAX_TRANSPORTS: usize = 64;
/// Most parameters of one transport offer.
pub const MAX_PARAMS: usize = 64;
/// Longest string (in bytes) in a message.
pub const MAX_STRING: usize = 4096;
/// Most RDMA NICs in one descriptor.
pub const MAX_RDMA_NICS: usize = 64;
/// Most RDMA memory keys ([`RegionKey`]) in one descriptor: one per region and NIC, more
/// for a region larger than a NIC's largest memory registration.
///
/// This bound (as [`MAX_REGIONS`]) only lets a decoder refuse an absurd count before
/// reading on; the 16 MiB frame ([`MAX_BODY`](super::MAX_BODY)) binds first: at 22 bytes
/// each on the wire, about 760 000 keys alone fill a frame, fewer beside many regions.
/// A descriptor that validates but does not fit a frame is refused when it is sent
/// ([`ControlError::BodyTooLong`]).
pub const MAX_RKEYS: usize = 1 << 20;
/// The active MTUs an RDMA NIC may have (bytes): the five of InfiniBand and RoCE.
pub const RDMA_MTUS: [u32; 5] = [256, 512, 1024, 2048, 4096];
/// QP numbers and packet sequence numbers are 24-bit: they are below this.
const QPN_PSN_LIMIT: u32 = 1 << 24;

/// The largest body a frame of a known `kind` can carry and still decode (a length prefix
/// plus [`MAX_NOTIFY`] for Notify, a code, a length prefix and [`MAX_STRING`] for Error,
/// an RDMA NIC with a name of [`MAX_STRING`] bytes and 10 bytes for RdmaConnect, 8 bytes
/// for RdmaConnectReply, [`MAX_BODY`](super::MAX_BODY) for the descriptor kinds and for
/// unknown kinds). A header announcing more is refused before its body is read.
pub(crate) fn max_body(kind: u16) -> u32 {
    const MAX_NOTIFY_BODY: u32 = 4 + MAX_NOTIFY as u32;
    const MAX_ERROR_BODY: u32 = 2 + 4 + MAX_STRING as u32;
    const MAX_RDMA_CONNECT_BODY: u32 = (MIN_NIC_BYTES + MAX_STRING) as u32 + 2 + 4 + 4;
    match kind {
        kind::PROBE | kind::PROBE_REPLY | kind::RDMA_CONNECT_REPLY => 8,
        kind::DESCRIPTOR_REQUEST | kind::NOTIFY_ACK | kind::QUIET => 0,
        kind::NOTIFY => MAX_NOTIFY_BODY,
        kind::ERROR => MAX_ERROR_BODY,
        kind::RDMA_CONNECT => MAX_RDMA_CONNECT_BODY,
        _ => super::frame::MAX_BODY,
    }
}

/// The body of a Handshake, HandshakeReply or Refresh carrying `d`, encoded from a
/// reference (no copy of the descriptor).
pub(crate) fn descriptor_body(d: &SegmentDescriptor) -> Vec<u8> {
    let mut w = Writer::default();
    w.descriptor(d);
    w.0
}

/// The name of a message kind (`"unknown"` for kinds this build does not know).
pub fn kind_name(kind: u16) -> &'static str {
    match kind {
        kind::HANDSHAKE => "Handshake",
        kind::HANDSHAKE_REPLY => "HandshakeReply",
        kind::DESCRIPTOR_REQUEST => "DescriptorRequest",
        kind::REFRESH => "Refresh",
        kind::PROBE => "Probe",
        kind::PROBE_REPLY => "ProbeReply",
        kind::NOTIFY => "Notify",
        kind::NOTIFY_ACK => "NotifyAck",
        kind::ERROR => "Error",
        kind::RDMA_CONNECT => "RdmaConnect",
        kind::RDMA_CONNECT_REPLY => "RdmaConnectReply",
        kind::STORE_REQUEST => "StoreRequest",
        kind::STORE_REPLY => "StoreReply",
        kind::QUIET => "Quiet",
        _ => "unknown",
    }
}

/// One registered region as a peer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Start address (in the owner's address space).
    pub addr: u64,
    /// Length in bytes (> 0).
    pub len: u64,
    /// Where the bytes live.
    pub location: Location,
    /// What peers and the owner may do with it.
    pub access: Access,
}

/// A transport the engine offers to peers, with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportOffer {
    /// Transport name, e.g. `"tcp"`.
    pub kind: String,
    /// Parameters, e.g. `[("port", "4242"), ("lanes", "2")]`.
    pub params: Vec<(String, String)>,
}

impl TransportOffer {
    /// The value of the first parameter named `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An RDMA NIC (one port of an HCA) as peers need it to connect a queue pair to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RdmaNic {
    /// Device name, e.g. `"mlx5_0"` (at most [`MAX_STRING`] bytes).
    pub name: String,
    /// Port number on the device (verbs counts from 1).
    pub port: u8,
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID at `gid_index` (raw bytes, network order).
    pub gid: [u8; 16],
    /// Index of `gid` in the port's GID table.
    pub gid_index: u8,
    /// The port's active MTU in bytes: one of [`RDMA_MTUS`].
    pub mtu: u32,
}

impl RdmaNic {
    /// What decoding checks: the name within [`MAX_STRING`], the MTU one of
    /// [`RDMA_MTUS`]. `what` names the NIC in the reason.
    fn check(&self, what: &str) -> Result<(), String> {
        check_string(&format!("{what} name"), &self.name)?;
        if !RDMA_MTUS.contains(&self.mtu) {
            return Err(format!(
                "{what} ({:?}) has MTU {}, not one of 256, 512, 1024, 2048, 4096",
                self.name, self.mtu
            ));
        }
        Ok(())
    }
}

/// An RDMA memory registration of (part of) a region on one NIC: peers address the bytes
/// `addr .. addr + len` through that NIC with `rkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionKey {
    /// Start address (in the owner's address space).
    pub addr: u64,
    /// Length in bytes (> 0, not wrapping past the end of the address space).
    pub len: u64,
    /// Index of the NIC in the descriptor's [`rdma_nics`](SegmentDescriptor::rdma_nics).
    pub nic: u16,
    /// The remote key of the registration on that NIC.
    pub rkey: u32,
}

/// Initiator → target ([`Message::RdmaConnect`]): "I created an RC queue pair `qpn` with
/// starting packet sequence number `psn` on my NIC `initiator`; connect a queue pair of
/// yours on your NIC `target_nic` to it".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RdmaConnectRequest {
    /// The initiator's NIC the queue pair is on.
    pub initiator: RdmaNic,
    /// Index of the target's NIC in the target's descriptor's
    /// [`rdma_nics`](SegmentDescriptor::rdma_nics).
    pub target_nic: u16,
    /// The initiator's queue pair number (24 bits).
    pub qpn: u32,
    /// The initiator's starting packet sequence number (24 bits).
    pub psn: u32,
}

impl RdmaConnectRequest {
    /// Checks what decoding checks: the initiator NIC's name within [`MAX_STRING`] and
    /// its MTU one of [`RDMA_MTUS`]; `qpn` and `psn` below 2^24.
    ///
    /// Errors: [`ControlError::InvalidMessage`] naming the first problem.
    pub fn validate(&self) -> Result<(), ControlError> {
        self.check().map_err(|reason| ControlError::InvalidMessage {
            kind: kind::RDMA_CONNECT,
            reason,
        })
    }

    fn check(&self) -> Result<(), String> {
        self.initiator.check("initiator NIC")?;
        check_24_bits("qpn", self.qpn)?;
        check_24_bits("psn", self.psn)
    }
}

/// Target → initiator ([`Message::RdmaConnectReply`]): the target's queue pair, already
/// connected to the initiator's and moved to ready-to-send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RdmaConnectReply {
    /// The target's queue pair number (24 bits).
    pub qpn: u32,
    /// The target's starting packet sequence number (24 bits).
    pub psn: u32,
}

impl RdmaConnectReply {
    /// Checks what decoding checks: `qpn` and `psn` below 2^24.
    ///
    /// Errors: [`ControlError::InvalidMessage`] naming the first problem.
    pub fn validate(&self) -> Result<(), ControlError> {
        self.check().map_err(|reason| ControlError::InvalidMessage {
            kind: kind::RDMA_CONNECT_REPLY,
            reason,
        })
    }

    fn check(&self) -> Result<(), String> {
        check_24_bits("qpn", self.qpn)?;
        check_24_bits("psn", self.psn)
    }
}

fn check_24_bits(what: &str, value: u32) -> Result<(), String> {
    if value < QPN_PSN_LIMIT {
        Ok(())
    } else {
        Err(format!(
            "{what} {value:#x} does not fit in 24 bits (at most 0xffffff)"
        ))
    }
}

/// What an engine tells peers about itself: who it is, its registered regions, the
/// transports it offers and, when it serves RDMA, its NICs and memory keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentDescriptor {
    /// Random per engine instance.
    pub engine_id: u64,
    /// `"host:port"` the engine's control server listens on.
    pub session: String,
    /// Host identity (hostname + boot id), used to detect same-host peers.
    pub host: String,
    /// Changes when a process restarts under the same session.
    pub epoch: u64,
    /// Bumped on each registry change.
    pub version: u64,
    /// Registered regions, sorted by address and disjoint.
    pub regions: Vec<RegionInfo>,
    /// Transports offered.
    pub transports: Vec<TransportOffer>,
    /// The NICs this engine serves RDMA on (empty when it serves none).
    pub rdma_nics: Vec<RdmaNic>,
    /// The memory registrations of the regions, per NIC of
    /// [`rdma_nics`](SegmentDescriptor::rdma_nics).
    pub rkeys: Vec<RegionKey>,
}

impl SegmentDescriptor {
    /// Checks what decoding checks: the bounds ([`MAX_REGIONS`], [`MAX_TRANSPORTS`],
    /// [`MAX_PARAMS`], [`MAX_STRING`], [`MAX_RDMA_NICS`], [`MAX_RKEYS`]); that regions
    /// are non-empty, do not wrap past the end of the address space, and are sorted by
    /// address without overlapping; that each RDMA NIC's MTU is one of [`RDMA_MTUS`];
    /// that each memory key is non-empty, does not wrap and names one of the RDMA NICs.
    ///
    /// Errors: [`ControlError::InvalidDescriptor`] naming the first problem.
    pub fn validate(&self) -> Result<(), ControlError> {
        self.check()
            .map_err(|reason| ControlError::InvalidDescriptor { reason })
    }

    fn check(&self) -> Result<(), String> {
        check_string("session", &self.session)?;
        check_string("host", &self.host)?;
        if self.regions.len() > MAX_REGIONS {
            return Err(format!(
                "{} regions, more than the limit of {MAX_REGIONS}",
                self.regions.len()
            ));
        }
        let mut prev: Option<(usize, u64)> = None; // (index, end) of the previous region
        for (i, region) in self.regions.iter().enumerate() {
            if region.len == 0 {
                return Err(format!("region {i} at {:#x} has length 0", region.addr));
            }
            let end = region.addr.checked_add(region.len).ok_or_else(|| {
                format!(
                    "region {i} ({} bytes at {:#x}) wraps past the end of the address space",
                    region.len, region.addr
                )
            })?;
            if let Some((p, prev_end)) = prev {
                if region.addr < prev_end {
                    return Err(format!(
                        "region {i} at {:#x} is not after region {p} (which ends at {prev_end:#x}): \
                         regions must be sorted by address and must not overlap",
                        region.addr
                    ));
                }
            }
            prev = Some((i, end));
        }
        if self.transports.len() > MAX_TRANSPORTS {
            return Err(format!(
                "{} transports, more than the limit of {MAX_TRANSPORTS}",
                self.transports.len()
            ));
        }
        for (i, offer) in self.transports.iter().enumerate() {
            check_string("transport kind", &offer.kind)?;
            if offer.params.len() > MAX_PARAMS {
                return Err(format!(
                    "transport {i} ({:?}) has {} parameters, more than the limit of {MAX_PARAMS}",
                    offer.kind,
                    offer.params.len()
                ));
            }
            for (key, value) in &offer.params {
                check_string("transport parameter name", key)?;
                check_string("transport parameter value", value)?;
            }
        }
        if self.rdma_nics.len() > MAX_RDMA_NICS {
            return Err(format!(
                "{} RDMA NICs, more than the limit of {MAX_RDMA_NICS}",
                self.rdma_nics.len()
            ));
        }
        for (i, nic) in self.rdma_nics.iter().enumerate() {
            nic.check(&format!("RDMA NIC {i}"))?;
        }
        if self.rkeys.len() > MAX_RKEYS {
            return Err(format!(
                "{} rkeys, more than the limit of {MAX_RKEYS}",
                self.rkeys.len()
            ));
        }
        for (i, key) in self.rkeys.iter().enumerate() {
            if key.len == 0 {
                return Err(format!("rkey {i} at {:#x} has length 0", key.addr));
            }
            if key.addr.checked_add(key.len).is_none() {
                return Err(format!(
                    "rkey {i} ({} bytes at {:#x}) wraps past the end of the address space",
                    key.len, key.addr
                ));
            }
            if usize::from(key.nic) >= self.rdma_nics.len() {
                return Err(format!(
                    "rkey {i} at {:#x} is for RDMA NIC {}, but the descriptor has {} RDMA NICs",
                    key.addr,
                    key.nic,
                    self.rdma_nics.len()
                ));
            }
        }
        Ok(())
    }
}

fn check_string(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_STRING {
        Err(format!(
            "{what} of {} bytes exceeds the limit of {MAX_STRING} bytes",
            s.len()
        ))
    } else {
        Ok(())
    }
}

/// A control message. Each has a fixed kind number (see [`kind`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Initiator → target, first message of a connection: the initiator's descriptor.
    Handshake(SegmentDescriptor),
    /// Target → initiator: the target's descriptor.
    HandshakeReply(SegmentDescriptor),
    /// Asks for the current descriptor; the reply is [`Message::Refresh`].
    DescriptorRequest,
    /// The target's descriptor: pushed (request id 0) when its registered memory changes,
    /// or the reply to a [`Message::DescriptorRequest`].
    Refresh(SegmentDescriptor),
    /// Liveness / latency probe.
    Probe {
        /// Echoed in the reply.
        nonce: u64,
    },
    /// Reply to [`Message::Probe`].
    ProbeReply {
        /// The probe's nonce.
        nonce: u64,
    },
    /// A notification for the target (at most [`MAX_NOTIFY`] bytes).
    Notify {
        /// The payload.
        bytes: Vec<u8>,
    },
    /// The notification was queued at the target.
    NotifyAck,
    /// A request (or frame) was refused.
    Error {
        /// See [`error_code`].
        code: u16,
        /// Explanation (at most [`MAX_STRING`] bytes).
        message: String,
    },
    /// Asks the target to connect one of its RDMA queue pairs to the initiator's; the
    /// reply is [`Message::RdmaConnectReply`] or an Error (code
    /// [`error_code::RDMA_REFUSED`] when the target's handler refused).
    RdmaConnect(RdmaConnectRequest),
    /// Reply to [`Message::RdmaConnect`]: the target's queue pair.
    RdmaConnectReply(RdmaConnectReply),
    /// A request to the store segment the target serves; the body is the store's own
    /// message (`store::wire`), opaque here. The reply is [`Message::StoreReply`] or an
    /// Error (code [`error_code::STORE_REFUSED`] when the target serves no store).
    StoreRequest(Vec<u8>),
    /// Reply to [`Message::StoreRequest`].
    StoreReply(Vec<u8>),
    /// Asks the server not to push Refresh on this connection any more (a connection
    /// whose client only reads replies to its own requests); no reply.
    Quiet,
}

impl Message {
    /// An Error message; `message` is cut to [`MAX_STRING`] bytes (at a character
    /// boundary).
    pub fn error(code: u16, message: impl Into<String>) -> Message {
        let mut message = message.into();
        if message.len() > MAX_STRING {
            let mut cut = MAX_STRING;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Message::Error { code, message }
    }

    /// This message's kind number.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Handshake(_) => kind::HANDSHAKE,
            Message::HandshakeReply(_) => kind::HANDSHAKE_REPLY,
            Message::DescriptorRequest => kind::DESCRIPTOR_REQUEST,
            Message::Refresh(_) => kind::REFRESH,
            Message::Probe { .. } => kind::PROBE,
            Message::ProbeReply { .. } => kind::PROBE_REPLY,
            Message::Notify { .. } => kind::NOTIFY,
            Message::NotifyAck => kind::NOTIFY_ACK,
            Message::Error { .. } => kind::ERROR,
            Message::RdmaConnect(_) => kind::RDMA_CONNECT,
            Message::RdmaConnectReply(_) => kind::RDMA_CONNECT_REPLY,
            Message::StoreRequest(_) => kind::STORE_REQUEST,
            Message::StoreReply(_) => kind::STORE_REPLY,
            Message::Quiet => kind::QUIET,
        }
    }

    /// The kind number and body bytes of this message.
    ///
    /// Encoding does not check bounds: a message that breaks one (see
    /// [`SegmentDescriptor::validate`], [`RdmaConnectRequest::validate`],
    /// [`RdmaConnectReply::validate`], [`MAX_NOTIFY`]) encodes, and is refused by the
    /// decoder.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut w = Writer::default();
        match self {
            Message::Handshake(d) | Message::HandshakeReply(d) | Message::Refresh(d) => {
                w.descriptor(d)
            }
            Message::DescriptorRequest | Message::NotifyAck | Message::Quiet => {}
            Message::Probe { nonce } | Message::ProbeReply { nonce } => w.u64(*nonce),
            Message::Notify { bytes } => w.bytes(bytes),
            Message::Error { code, message } => {
                w.u16(*code);
                w.bytes(message.as_bytes());
            }
            Message::RdmaConnect(request) => {
                w.nic(&request.initiator);
                w.u16(request.target_nic);
                w.u32(request.qpn);
                w.u32(request.psn);
            }
            Message::RdmaConnectReply(reply) => {
                w.u32(reply.qpn);
                w.u32(reply.psn);
            }
            // The store's bytes are the whole body (the frame has the length).
            Message::StoreRequest(body) | Message::StoreReply(body) => {
                return (self.kind(), body.clone())
            }
        }
        (self.kind(), w.0)
    }

    /// Decodes the body of a message of kind `kind`.
    ///
    /// Errors: [`ControlError::UnknownKind`] for kinds this build does not know,
    /// [`ControlError::Malformed`] naming what is wrong for everything else.
    pub fn decode(kind: u16, body: &[u8]) -> Result<Message, ControlError> {
        if !kind::is_known(kind) {
            return Err(ControlError::UnknownKind { kind });
        }
        let malformed = |reason: String| ControlError::Malformed { kind, reason };
        let mut r = Reader { buf: body, pos: 0 };
        let message = match kind {
            kind::HANDSHAKE => Message::Handshake(r.descriptor().map_err(malformed)?),
            kind::HANDSHAKE_REPLY => Message::HandshakeReply(r.descriptor().map_err(malformed)?),
            kind::DESCRIPTOR_REQUEST => Message::DescriptorRequest,
            kind::REFRESH => Message::Refresh(r.descriptor().map_err(malformed)?),
            kind::PROBE => Message::Probe {
                nonce: r.u64("nonce").map_err(malformed)?,
            },
            kind::PROBE_REPLY => Message::ProbeReply {
                nonce: r.u64("nonce").map_err(malformed)?,
            },
            kind::NOTIFY => Message::Notify {
                bytes: r
                    .bytes("notification", MAX_NOTIFY)
                    .map_err(malformed)?
                    .to_vec(),
            },
            kind::NOTIFY_ACK => Message::NotifyAck,
            kind::QUIET => Message::Quiet,
            kind::RDMA_CONNECT => Message::RdmaConnect(r.rdma_connect().map_err(malformed)?),
            kind::RDMA_CONNECT_REPLY => {
                Message::RdmaConnectReply(r.rdma_connect_reply().map_err(malformed)?)
            }
            kind::STORE_REQUEST => {
                r.pos = body.len();
                Message::StoreRequest(body.to_vec())
            }
            kind::STORE_REPLY => {
                r.pos = body.len();
                Message::StoreReply(body.to_vec())
            }
            _ => {
                // kind::ERROR, the only one left.
                let code = r.u16("error code").map_err(malformed)?;
                let message = r.string("error message").map_err(malformed)?;
                Message::Error { code, message }
            }
        };
        let left = body.len() - r.pos;
        if left != 0 {
            return Err(malformed(format!(
                "{left} trailing bytes after the message"
            )));
        }
        Ok(message)
    }
}

impl fmt::Display for Message {
    /// The kind name and the gist (descriptor versions, nonces, sizes, error codes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = kind_name(self.kind());
        match self {
            Message::Handshake(d) | Message::HandshakeReply(d) | Message::Refresh(d) => write!(
                f,
                "{name}({}, engine {:#x}, epoch {}, version {}, {} regions)",
                d.session,
                d.engine_id,
                d.epoch,
                d.version,
                d.regions.len()
            ),
            Message::Probe { nonce } | Message::ProbeReply { nonce } => {
                write!(f, "{name}({nonce:#x})")
            }
            Message::Notify { bytes } => write!(f, "{name}({} bytes)", bytes.len()),
            Message::StoreRequest(body) | Message::StoreReply(body) => {
                write!(f, "{name}({} bytes)", body.len())
            }
            Message::Error { code, message } => {
                write!(f, "{name}({} {code}: {message})", error_code::name(*code))
            }
            Message::RdmaConnect(r) => write!(
                f,
                "{name}({} port {} → NIC {}, qpn {:#x}, psn {:#x})",
                r.initiator.name, r.initiator.port, r.target_nic, r.qpn, r.psn
            ),
            Message::RdmaConnectReply(r) => {
                write!(f, "{name}(qpn {:#x}, psn {:#x})", r.qpn, r.psn)
            }
            Message::DescriptorRequest | Message::NotifyAck | Message::Quiet => f.write_str(name),
        }
    }
}

/// Appends little-endian fields.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A count. Counts beyond u32 cannot be decoded anyway; they are written saturated so
    /// that the decoder refuses the message.
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.count(b.len());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn nic(&mut self, nic: &RdmaNic) {
        self.str(&nic.name);
        self.u8(nic.port);
        self.u16(nic.lid);
        self.0.extend_from_slice(&nic.gid);
        self.u8(nic.gid_index);
        self.u32(nic.mtu);
    }
    fn descriptor(&mut self, d: &SegmentDescriptor) {
        self.u64(d.engine_id);
        self.str(&d.session);
        self.str(&d.host);
        self.u64(d.epoch);
        self.u64(d.version);
        self.count(d.regions.len());
        for region in &d.regions {
            self.u64(region.addr);
            self.u64(region.len);
            self.str(&region.location.to_string());
            self.u32(region.access.bits());
        }
        self.count(d.transports.len());
        for offer in &d.transports {
            self.str(&offer.kind);
            self.count(offer.params.len());
            for (key, value) in &offer.params {
                self.str(key);
                self.str(value);
            }
        }
        self.count(d.rdma_nics.len());
        for nic in &d.rdma_nics {
            self.nic(nic);
        }
        self.count(d.rkeys.len());
        for key in &d.rkeys {
            self.u64(key.addr);
            self.u64(key.len);
            self.u16(key.nic);
            self.u32(key.rkey);
        }
    }
}

/// Smallest encoding of a region: addr, len, a location of one byte, access.
const MIN_REGION_BYTES: usize = 8 + 8 + 4 + 1 + 4;
/// Smallest encoding of a transport offer: an empty kind and no parameters.
const MIN_TRANSPORT_BYTES: usize = 4 + 4;
/// Smallest encoding of a parameter: two empty strings.
const MIN_PARAM_BYTES: usize = 4 + 4;
/// Smallest encoding of an RDMA NIC: an empty name, port, lid, gid, gid index, mtu.
const MIN_NIC_BYTES: usize = 4 + 1 + 2 + 16 + 1 + 4;
/// Encoding of a memory key: addr, len, nic, rkey.
const RKEY_BYTES: usize = 8 + 8 + 2 + 4;

/// Reads little-endian fields from a body; every failure is a reason string.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.left() {
            return Err(format!(
                "body ends inside {what} (needs {n} bytes, {} left)",
                self.left()
            ));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        self.array(what).map(u8::from_le_bytes)
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_bytes` each, at most `max`, that fit in the
    /// bytes left.
    fn count(&mut self, what: &str, max: usize, min_bytes: usize) -> Result<usize, String> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(format!("{n} {what}, more than the limit of {max}"));
        }
        if n.saturating_mul(min_bytes) > self.left() {
            return Err(format!(
                "{n} {what} cannot fit in the {} bytes left",
                self.left()
            ));
        }
        Ok(n)
    }

    fn bytes(&mut self, what: &str, max: usize) -> Result<&'a [u8], String> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(format!(
                "{what} of {n} bytes exceeds the limit of {max} bytes"
            ));
        }
        self.take(n, what)
    }

    fn str(&mut self, what: &str) -> Result<&'a str, String> {
        let bytes = self.bytes(what, MAX_STRING)?;
        std::str::from_utf8(bytes).map_err(|e| format!("{what} is not valid UTF-8: {e}"))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        self.str(what).map(str::to_owned)
    }

    fn descriptor(&mut self) -> Result<SegmentDescriptor, String> {
        let engine_id = self.u64("engine id")?;
        let session = self.string("session")?;
        let host = self.string("host")?;
        let epoch = self.u64("epoch")?;
        let version = self.u64("version")?;
        let n = self.count("regions", MAX_REGIONS, MIN_REGION_BYTES)?;
        let mut regions = Vec::with_capacity(n);
        for i in 0..n {
            let addr = self.u64("region address")?;
            let len = self.u64("region length")?;
            let text = self.str("region location")?;
            let location = Location::from_str(text).map_err(|e| format!("region {i}: {e}"))?;
            let bits = self.u32("region access")?;
            let access = Access::from_bits(bits).ok_or_else(|| {
                format!("region {i}: access bits {bits:#x} include unknown flags")
            })?;
            regions.push(RegionInfo {
                addr,
                len,
                location,
                access,
            });
        }
        let n = self.count("transports", MAX_TRANSPORTS, MIN_TRANSPORT_BYTES)?;
        let mut transports = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = self.string("transport kind")?;
            let n = self.count("transport parameters", MAX_PARAMS, MIN_PARAM_BYTES)?;
            let mut params = Vec::with_capacity(n);
            for _ in 0..n {
                let key = self.string("transport parameter name")?;
                let value = self.string("transport parameter value")?;
                params.push((key, value));
            }
            transports.push(TransportOffer { kind, params });
        }
        let n = self.count("RDMA NICs", MAX_RDMA_NICS, MIN_NIC_BYTES)?;
        let mut rdma_nics = Vec::with_capacity(n);
        for i in 0..n {
            rdma_nics.push(self.nic(&format!("RDMA NIC {i}"))?);
        }
        let n = self.count("rkeys", MAX_RKEYS, RKEY_BYTES)?;
        let mut rkeys = Vec::with_capacity(n);
        for _ in 0..n {
            rkeys.push(RegionKey {
                addr: self.u64("rkey address")?,
                len: self.u64("rkey length")?,
                nic: self.u16("rkey NIC")?,
                rkey: self.u32("rkey")?,
            });
        }
        let descriptor = SegmentDescriptor {
            engine_id,
            session,
            host,
            epoch,
            version,
            regions,
            transports,
            rdma_nics,
            rkeys,
        };
        descriptor.check()?;
        Ok(descriptor)
    }

    /// An RDMA NIC, checked; `what` names it in errors.
    fn nic(&mut self, what: &str) -> Result<RdmaNic, String> {
        let nic = RdmaNic {
            name: self.string(&format!("{what} name"))?,
            port: self.u8("RDMA NIC port")?,
            lid: self.u16("RDMA NIC LID")?,
            gid: self.array("RDMA NIC GID")?,
            gid_index: self.u8("RDMA NIC GID index")?,
            mtu: self.u32("RDMA NIC MTU")?,
        };
        nic.check(what)?;
        Ok(nic)
    }

    fn rdma_connect(&mut self) -> Result<RdmaConnectRequest, String> {
        let request = RdmaConnectRequest {
            initiator: self.nic("initiator NIC")?,
            target_nic: self.u16("target NIC")?,
            qpn: self.u32("qpn")?,
            psn: self.u32("psn")?,
        };
        request.check()?;
        Ok(request)
    }

    fn rdma_connect_reply(&mut self) -> Result<RdmaConnectReply, String> {
        let reply = RdmaConnectReply {
            qpn: self.u32("qpn")?,
            psn: self.u32("psn")?,
        };
        reply.check()?;
        Ok(reply)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn max_body_admits_the_largest_valid_message_of_each_kind() {
        let largest = [
            Message::Probe { nonce: u64::MAX },
            Message::ProbeReply { nonce: 1 },
            Message::DescriptorRequest,
            Message::NotifyAck,
            Message::Quiet,
            Message::Notify {
                bytes: vec![7; MAX_NOTIFY],
            },
            Message::error(error_code::BUSY, "x".repeat(MAX_STRING + 10)),
            Message::RdmaConnect(RdmaConnectRequest {
                initiator: RdmaNic {
                    name: "n".repeat(MAX_STRING),
                    ..nic(0)
                },
                target_nic: u16::MAX,
                qpn: 0xff_ffff,
                psn: 0xff_ffff,
            }),
            Message::RdmaConnectReply(RdmaConnectReply {
                qpn: 0xff_ffff,
                psn: 0,
            }),
        ];
        for message in largest {
            let (kind, body) = message.encode();
            assert_eq!(body.len() as u32, max_body(kind), "{message}");
            assert_eq!(Message::decode(kind, &body).unwrap(), message);
        }
        for kind in [
            kind::HANDSHAKE,
            kind::HANDSHAKE_REPLY,
            kind::REFRESH,
            0,
            200,
        ] {
            assert_eq!(max_body(kind), super::super::frame::MAX_BODY);
        }
        let d = descriptor(4);
        assert_eq!(descriptor_body(&d), Message::Refresh(d.clone()).encode().1);
        assert_eq!(error_code::name(error_code::BUSY), "BUSY");
        assert_eq!(error_code::name(error_code::RDMA_REFUSED), "RDMA_REFUSED");
        assert_eq!(error_code::name(error_code::STORE_REFUSED), "STORE_REFUSED");
        assert_eq!(error_code::name(9), "UNKNOWN");
    }

    #[test]
    fn every_known_kind_has_a_name_and_a_bound() {
        for k in 0..=20u16 {
            let known = kind::is_known(k);
            assert_eq!(known, (1..=14).contains(&k), "kind {k}");
            assert_eq!(kind_name(k) != "unknown", known, "kind {k}");
        }
        assert_eq!(kind_name(kind::RDMA_CONNECT), "RdmaConnect");
        assert_eq!(kind_name(kind::RDMA_CONNECT_REPLY), "RdmaConnectReply");
        assert_eq!(max_body(kind::RDMA_CONNECT_REPLY), 8);
        assert_eq!(max_body(kind::RDMA_CONNECT), 4 + 4096 + 24 + 10);
        assert_eq!(kind_name(kind::STORE_REQUEST), "StoreRequest");
        assert_eq!(kind_name(kind::STORE_REPLY), "StoreReply");
    }

    #[test]
    fn store_bodies_travel_as_they_are() {
        for m in [
            Message::StoreRequest(vec![1, 2, 3]),
            Message::StoreReply(Vec::new()),
        ] {
            let (kind, body) = m.encode();
            assert_eq!(Message::decode(kind, &body).unwrap(), m);
        }
        assert_eq!(
            Message::StoreRequest(vec![9; 5]).encode(),
            (kind::STORE_REQUEST, vec![9; 5])
        );
    }
    use proptest::collection::vec;
    use proptest::prelude::*;

    pub(crate) fn descriptor(version: u64) -> SegmentDescriptor {
        SegmentDescriptor {
            engine_id: 0xfeed,
            session: "127.0.0.1:4242".into(),
            host: "node1/boot-1".into(),
            epoch: 3,
            version,
            regions: vec![
                RegionInfo {
                    addr: 0x1000,
                    len: 0x1000,
                    location: Location::Cpu(0),
                    access: Access::ALL,
                },
                RegionInfo {
                    addr: 0x2000,
                    len: 0x10,
                    location: Location::Cuda(1),
                    access: Access::REMOTE_READ,
                },
            ],
            transports: vec![TransportOffer {
                kind: "tcp".into(),
                params: vec![("port".into(), "4242".into()), ("lanes".into(), "2".into())],
            }],
            rdma_nics: vec![nic(0), nic(1)],
            rkeys: vec![
                RegionKey {
                    addr: 0x1000,
                    len: 0x1000,
                    nic: 0,
                    rkey: 0x1234,
                },
                RegionKey {
                    addr: 0x1000,
                    len: 0x800,
                    nic: 1,
                    rkey: 0x5678,
                },
                RegionKey {
                    addr: 0x1800,
                    len: 0x800,
                    nic: 1,
                    rkey: 0x9abc,
                },
            ],
        }
    }

    /// RDMA NIC `mlx5_{i}` (RoCE v2 with an IPv4-mapped GID, MTU 4096).
    pub(crate) fn nic(i: u8) -> RdmaNic {
        let mut gid = [0u8; 16];
        gid[10..12].copy_from_slice(&[0xff, 0xff]);
        gid[12..].copy_from_slice(&[10, 0, 0, i]);
        RdmaNic {
            name: format!("mlx5_{i}"),
            port: 1,
            lid: 0,
            gid,
            gid_index: 3,
            mtu: 4096,
        }
    }

    fn any_location() -> impl Strategy<Value = Location> {
        prop_oneof![
            any::<u32>().prop_map(Location::Cpu),
            any::<u32>().prop_map(Location::Cuda),
            Just(Location::Any),
        ]
    }

    /// Valid regions: sorted, disjoint, non-empty, not wrapping.
    fn any_regions() -> impl Strategy<Value = Vec<RegionInfo>> {
        vec(
            (0u64..1 << 40, 1u64..1 << 40, any_location(), 0u32..16),
            0..8,
        )
        .prop_map(|items| {
            let mut next = 0u64;
            items
                .into_iter()
                .map(|(gap, len, location, bits)| {
                    let addr = next + gap;
                    next = addr + len;
                    RegionInfo {
                        addr,
                        len,
                        location,
                        access: Access::from_bits_truncate(bits),
                    }
                })
                .collect()
        })
    }

    fn any_transports() -> impl Strategy<Value = Vec<TransportOffer>> {
        vec(
            ("\\PC{0,8}", vec(("\\PC{0,8}", "\\PC{0,8}"), 0..4))
                .prop_map(|(kind, params)| TransportOffer { kind, params }),
            0..4,
        )
    }

    fn any_nic() -> impl Strategy<Value = RdmaNic> {
        (
            "\\PC{0,12}",
            any::<u8>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u8>(),
            prop::sample::select(RDMA_MTUS.to_vec()),
        )
            .prop_map(|(name, port, lid, gid, gid_index, mtu)| RdmaNic {
                name,
                port,
                lid,
                gid,
                gid_index,
                mtu,
            })
    }

    /// Valid RDMA NICs and keys: non-empty, not wrapping, each naming one of the NICs
    /// (none without NICs).
    fn any_rdma() -> impl Strategy<Value = (Vec<RdmaNic>, Vec<RegionKey>)> {
        vec(any_nic(), 0..4).prop_flat_map(|nics| {
            let n = nics.len() as u16;
            let keys = vec(
                (any::<u64>(), 1u64..1 << 40, any::<u16>(), any::<u32>()).prop_map(
                    move |(addr, len, nic, rkey)| RegionKey {
                        addr: addr.min(u64::MAX - len),
                        len,
                        nic: nic % n.max(1),
                        rkey,
                    },
                ),
                if n == 0 { 0..1 } else { 0..8 },
            );
            (Just(nics), keys)
        })
    }

    pub(crate) fn any_descriptor() -> impl Strategy<Value = SegmentDescriptor> {
        (
            any::<u64>(),
            "\\PC{0,24}",
            "\\PC{0,24}",
            any::<u64>(),
            any::<u64>(),
            any_regions(),
            any_transports(),
            any_rdma(),
        )
            .prop_map(
                |(engine_id, session, host, epoch, version, regions, transports, rdma)| {
                    SegmentDescriptor {
                        engine_id,
                        session,
                        host,
                        epoch,
                        version,
                        regions,
                        transports,
                        rdma_nics: rdma.0,
                        rkeys: rdma.1,
                    }
                },
            )
    }

    fn any_rdma_connect() -> impl Strategy<Value = RdmaConnectRequest> {
        (any_nic(), any::<u16>(), 0u32..1 << 24, 0u32..1 << 24).prop_map(
            |(initiator, target_nic, qpn, psn)| RdmaConnectRequest {
                initiator,
                target_nic,
                qpn,
                psn,
            },
        )
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            any_descriptor().prop_map(Message::Handshake),
            any_descriptor().prop_map(Message::HandshakeReply),
            Just(Message::DescriptorRequest),
            any_descriptor().prop_map(Message::Refresh),
            any::<u64>().prop_map(|nonce| Message::Probe { nonce }),
            any::<u64>().prop_map(|nonce| Message::ProbeReply { nonce }),
            vec(any::<u8>(), 0..64).prop_map(|bytes| Message::Notify { bytes }),
            Just(Message::NotifyAck),
            (any::<u16>(), "\\PC{0,32}")
                .prop_map(|(code, message)| Message::Error { code, message }),
            any_rdma_connect().prop_map(Message::RdmaConnect),
            (0u32..1 << 24, 0u32..1 << 24)
                .prop_map(|(qpn, psn)| Message::RdmaConnectReply(RdmaConnectReply { qpn, psn })),
        ]
    }

    #[test]
    fn descriptor_round_trips_and_param_finds_values() {
        let d = descriptor(7);
        let (kind, body) = Message::Refresh(d.clone()).encode();
        assert_eq!(kind, kind::REFRESH);
        assert_eq!(
            Message::decode(kind, &body).unwrap(),
            Message::Refresh(d.clone())
        );
        assert_eq!(d.transports[0].param("lanes"), Some("2"));
        assert_eq!(d.transports[0].param("nope"), None);
    }

    fn refused(d: &SegmentDescriptor) -> String {
        assert!(d.validate().is_err());
        let (kind, body) = Message::Handshake(d.clone()).encode();
        match Message::decode(kind, &body) {
            Err(ControlError::Malformed { kind: 1, reason }) => reason,
            other => panic!("{d:?} decoded as {other:?}"),
        }
    }

    #[test]
    fn invalid_regions_are_refused() {
        let mut d = descriptor(1);
        d.regions[1].len = 0;
        assert!(refused(&d).contains("length 0"));

        let mut d = descriptor(1);
        d.regions[1].addr = u64::MAX - 4;
        assert!(refused(&d).contains("wraps"));

        let mut d = descriptor(1);
        d.regions[1].addr = 0x1fff; // overlaps region 0
        assert!(refused(&d).contains("sorted"));

        let mut d = descriptor(1);
        d.regions.swap(0, 1); // unsorted
        assert!(refused(&d).contains("sorted"));

        // Adjacent regions are fine; a region may end exactly at u64::MAX.
        let mut d = descriptor(1);
        d.regions[1].addr = u64::MAX - 0x10;
        assert!(d.validate().is_ok());
    }

    #[test]
    fn bounds_are_enforced() {
        let mut d = descriptor(1);
        d.host = "h".repeat(MAX_STRING + 1);
        assert!(refused(&d).contains("host"));

        let mut d = descriptor(1);
        d.host = "h".repeat(MAX_STRING);
        assert!(d.validate().is_ok());

        let mut d = descriptor(1);
        d.transports = vec![d.transports[0].clone(); MAX_TRANSPORTS + 1];
        assert!(refused(&d).contains("transports"));

        let mut d = descriptor(1);
        d.transports[0].params = vec![("k".into(), "v".into()); MAX_PARAMS + 1];
        assert!(refused(&d).contains("parameters"));

        let (kind, body) = Message::Notify {
            bytes: vec![0; MAX_NOTIFY + 1],
        }
        .encode();
        assert!(matches!(
            Message::decode(kind, &body),
            Err(ControlError::Malformed { kind: 7, .. })
        ));
        let (kind, body) = Message::Notify {
            bytes: vec![0; MAX_NOTIFY],
        }
        .encode();
        assert!(Message::decode(kind, &body).is_ok());
    }

    #[test]
    fn counts_are_checked_before_allocating() {
        // A Refresh claiming 1<<20 regions in a 60-byte body.
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&(1u32 << 20).to_le_bytes());
        let err = Message::decode(kind::REFRESH, &body).unwrap_err();
        assert!(err.to_string().contains("cannot fit"), "{err}");
        body.truncate(body.len() - 4);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = Message::decode(kind::REFRESH, &body).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn bad_fields_are_refused() {
        // Unknown access bits.
        let mut d = descriptor(1);
        d.transports.clear();
        d.rdma_nics.clear();
        d.rkeys.clear();
        let (_, mut body) = Message::Refresh(d.clone()).encode();
        // Without transports, NICs and keys, the body ends with region 1's access and
        // three zero counts.
        let pos = body.len() - 16;
        assert_eq!(body[pos..pos + 4], Access::REMOTE_READ.bits().to_le_bytes());
        body[pos..pos + 4].copy_from_slice(&0x100u32.to_le_bytes());
        let err = Message::decode(kind::REFRESH, &body).unwrap_err();
        assert!(err.to_string().contains("unknown flags"), "{err}");

        // A bad location string.
        let (_, body) = Message::Refresh(d).encode();
        let pos = body
            .windows(6)
            .position(|w| w == b"cuda:1")
            .expect("location of region 1");
        let mut bad = body.clone();
        bad[pos..pos + 6].copy_from_slice(b"gpus:1");
        let err = Message::decode(kind::REFRESH, &bad).unwrap_err();
        assert!(err.to_string().contains("invalid location"), "{err}");

        // Invalid UTF-8.
        let mut bad = body.clone();
        bad[pos] = 0xff;
        let err = Message::decode(kind::REFRESH, &bad).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");

        // Trailing bytes, and empty messages with a body.
        let mut bad = body;
        bad.push(0);
        let err = Message::decode(kind::REFRESH, &bad).unwrap_err();
        assert!(err.to_string().contains("1 trailing bytes"), "{err}");
        assert!(Message::decode(kind::NOTIFY_ACK, &[0]).is_err());
        assert!(Message::decode(kind::DESCRIPTOR_REQUEST, &[]).is_ok());

        // Unknown kinds.
        assert!(matches!(
            Message::decode(0, &[]),
            Err(ControlError::UnknownKind { kind: 0 })
        ));
        assert!(matches!(
            Message::decode(15, &[]),
            Err(ControlError::UnknownKind { kind: 15 })
        ));
    }

    #[test]
    fn rdma_fields_are_encoded_after_the_transports() {
        let mut d = descriptor(1);
        d.rdma_nics.clear();
        d.rkeys.clear();
        let plain = descriptor_body(&d).len();
        d.rdma_nics = vec![RdmaNic {
            name: "ab".into(),
            ..nic(0)
        }];
        d.rkeys = vec![RegionKey {
            addr: 0x1000,
            len: 0x10,
            nic: 0,
            rkey: 0xdead_beef,
        }];
        let body = descriptor_body(&d);
        assert_eq!(body.len(), plain + (4 + 2 + 1 + 2 + 16 + 1 + 4) + 22);
        let mut tail = Vec::new();
        tail.extend_from_slice(&1u32.to_le_bytes());
        tail.extend_from_slice(&2u32.to_le_bytes());
        tail.extend_from_slice(b"ab");
        tail.push(1); // port
        tail.extend_from_slice(&0u16.to_le_bytes()); // lid
        tail.extend_from_slice(&nic(0).gid);
        tail.push(3); // gid index
        tail.extend_from_slice(&4096u32.to_le_bytes());
        tail.extend_from_slice(&1u32.to_le_bytes());
        tail.extend_from_slice(&0x1000u64.to_le_bytes());
        tail.extend_from_slice(&0x10u64.to_le_bytes());
        tail.extend_from_slice(&0u16.to_le_bytes());
        tail.extend_from_slice(&0xdead_beefu32.to_le_bytes());
        assert_eq!(body[plain - 8..], tail[..]);
        assert_eq!(
            Message::decode(kind::HANDSHAKE, &body).unwrap(),
            Message::Handshake(d)
        );
    }

    #[test]
    fn invalid_rdma_fields_are_refused() {
        let mut d = descriptor(1);
        d.rdma_nics = vec![nic(0); MAX_RDMA_NICS + 1];
        assert!(refused(&d).contains("65 RDMA NICs, more than the limit of 64"));
        let mut d = descriptor(1);
        d.rdma_nics = vec![nic(0); MAX_RDMA_NICS];
        assert!(d.validate().is_ok());

        let mut d = descriptor(1);
        d.rdma_nics[1].name = "n".repeat(MAX_STRING + 1);
        let reason = refused(&d);
        assert!(reason.contains("RDMA NIC 1 name"), "{reason}");
        d.rdma_nics[1].name = "n".repeat(MAX_STRING);
        assert!(d.validate().is_ok());

        for mtu in [0, 1500, 9000, 4097] {
            let mut d = descriptor(1);
            d.rdma_nics[1].mtu = mtu;
            let reason = refused(&d);
            assert!(
                reason.contains("RDMA NIC 1 (\"mlx5_1\") has MTU")
                    && reason.contains(&mtu.to_string()),
                "{reason}"
            );
        }
        for mtu in RDMA_MTUS {
            let mut d = descriptor(1);
            d.rdma_nics[1].mtu = mtu;
            assert!(d.validate().is_ok());
        }

        let mut d = descriptor(1);
        d.rkeys = vec![d.rkeys[0]; MAX_RKEYS + 1];
        assert!(d
            .validate()
            .unwrap_err()
            .to_string()
            .contains("1048577 rkeys, more than the limit of 1048576"));
        // (Not encoded: more than a frame. The decoder's bound is checked below.)

        let mut d = descriptor(1);
        d.rkeys[2].len = 0;
        assert!(refused(&d).contains("rkey 2 at 0x1800 has length 0"));

        let mut d = descriptor(1);
        d.rkeys[2].addr = u64::MAX - 0x7ff; // ends at 2^64 + 1
        assert!(refused(&d).contains("rkey 2 (2048 bytes at 0xfffffffffffff800) wraps"));
        d.rkeys[2].addr = u64::MAX - 0x800; // ends exactly at u64::MAX
        assert!(d.validate().is_ok());

        let mut d = descriptor(1);
        d.rkeys[1].nic = 2;
        let reason = refused(&d);
        assert!(
            reason
                .contains("rkey 1 at 0x1000 is for RDMA NIC 2, but the descriptor has 2 RDMA NICs"),
            "{reason}"
        );
        let mut d = descriptor(1);
        d.rdma_nics.clear();
        assert!(
            refused(&d).contains("rkey 0 at 0x1000 is for RDMA NIC 0, but the descriptor has 0")
        );
        d.rkeys.clear();
        assert!(d.validate().is_ok());
    }

    #[test]
    fn rdma_counts_are_checked_before_allocating() {
        let mut d = descriptor(1);
        d.regions.clear();
        d.transports.clear();
        d.rdma_nics.clear();
        d.rkeys.clear();
        let body = descriptor_body(&d);
        // The body ends with the NIC count and the key count.
        let nics = body.len() - 8;
        let keys = body.len() - 4;
        let with = |pos: usize, count: u32| {
            let mut bad = body.clone();
            bad[pos..pos + 4].copy_from_slice(&count.to_le_bytes());
            Message::decode(kind::REFRESH, &bad)
                .unwrap_err()
                .to_string()
        };
        let err = with(nics, MAX_RDMA_NICS as u32);
        assert!(
            err.contains("64 RDMA NICs cannot fit in the 4 bytes left"),
            "{err}"
        );
        let err = with(nics, MAX_RDMA_NICS as u32 + 1);
        assert!(
            err.contains("65 RDMA NICs, more than the limit of 64"),
            "{err}"
        );
        let err = with(keys, MAX_RKEYS as u32);
        assert!(
            err.contains("1048576 rkeys cannot fit in the 0 bytes left"),
            "{err}"
        );
        let err = with(keys, u32::MAX);
        assert!(
            err.contains("rkeys, more than the limit of 1048576"),
            "{err}"
        );
    }

    #[test]
    fn rdma_connect_fields_are_checked() {
        let request = RdmaConnectRequest {
            initiator: nic(1),
            target_nic: 2,
            qpn: 0xff_ffff,
            psn: 0,
        };
        assert!(request.validate().is_ok());
        let (k, body) = Message::RdmaConnect(request.clone()).encode();
        assert_eq!(k, kind::RDMA_CONNECT);
        assert_eq!(body.len(), 4 + 6 + 24 + 2 + 4 + 4);
        assert_eq!(
            Message::decode(k, &body).unwrap(),
            Message::RdmaConnect(request.clone())
        );
        let bad_requests = [
            (
                RdmaConnectRequest {
                    qpn: 1 << 24,
                    ..request.clone()
                },
                "qpn 0x1000000 does not fit in 24 bits",
            ),
            (
                RdmaConnectRequest {
                    psn: u32::MAX,
                    ..request.clone()
                },
                "psn 0xffffffff does not fit in 24 bits",
            ),
            (
                RdmaConnectRequest {
                    initiator: RdmaNic {
                        mtu: 1500,
                        ..nic(1)
                    },
                    ..request.clone()
                },
                "initiator NIC (\"mlx5_1\") has MTU 1500",
            ),
            (
                RdmaConnectRequest {
                    initiator: RdmaNic {
                        name: "n".repeat(MAX_STRING + 1),
                        ..nic(1)
                    },
                    ..request.clone()
                },
                "initiator NIC name of 4097 bytes exceeds the limit of 4096 bytes",
            ),
        ];
        for (bad, reason) in bad_requests {
            match bad.validate() {
                Err(e @ ControlError::InvalidMessage { kind: 10, .. }) => {
                    let e = e.to_string();
                    assert!(e.contains(reason), "{e}");
                    assert!(e.contains("RdmaConnect") && e.contains("not sent"), "{e}");
                }
                other => panic!("{bad:?} validated as {other:?}"),
            }
            let (k, body) = Message::RdmaConnect(bad).encode();
            match Message::decode(k, &body) {
                Err(ControlError::Malformed {
                    kind: 10,
                    reason: r,
                }) => {
                    assert!(r.contains(reason), "{r}")
                }
                other => panic!("decoded as {other:?}"),
            }
        }

        let reply = RdmaConnectReply {
            qpn: 0x11,
            psn: 0xff_ffff,
        };
        assert!(reply.validate().is_ok());
        let (k, body) = Message::RdmaConnectReply(reply).encode();
        assert_eq!((k, body.len()), (kind::RDMA_CONNECT_REPLY, 8));
        assert_eq!(
            Message::decode(k, &body).unwrap(),
            Message::RdmaConnectReply(reply)
        );
        for (bad, reason) in [
            (
                RdmaConnectReply {
                    qpn: 1 << 24,
                    ..reply
                },
                "qpn 0x1000000",
            ),
            (
                RdmaConnectReply {
                    psn: 1 << 24,
                    ..reply
                },
                "psn 0x1000000",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(
                matches!(e, ControlError::InvalidMessage { kind: 11, .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains(reason), "{e}");
            let (k, body) = Message::RdmaConnectReply(bad).encode();
            let e = Message::decode(k, &body).unwrap_err();
            assert!(
                matches!(e, ControlError::Malformed { kind: 11, .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains(reason), "{e}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(Message::decode(k, &long)
            .unwrap_err()
            .to_string()
            .contains("1 trailing bytes"));
        assert!(Message::decode(k, &body[..7])
            .unwrap_err()
            .to_string()
            .contains("psn"));

        let shown = Message::RdmaConnect(request).to_string();
        assert_eq!(
            shown,
            "RdmaConnect(mlx5_1 port 1 → NIC 2, qpn 0xffffff, psn 0x0)"
        );
        assert_eq!(
            Message::RdmaConnectReply(reply).to_string(),
            "RdmaConnectReply(qpn 0x11, psn 0xffffff)"
        );
    }

    #[test]
    fn error_messages_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_STRING); // 2 bytes each
        let Message::Error { message, .. } = Message::error(error_code::INTERNAL, long) else {
            unreachable!()
        };
        assert_eq!(message.len(), MAX_STRING);
        let (kind, body) = Message::error(5, "é".repeat(3000)).encode();
        assert!(Message::decode(kind, &body).is_ok());
    }

    proptest! {
        #[test]
        fn every_message_round_trips(message in any_message()) {
            let (kind, body) = message.encode();
            prop_assert_eq!(kind, message.kind());
            prop_assert_eq!(Message::decode(kind, &body).unwrap(), message);
        }

        #[test]
        fn truncated_bodies_are_errors(message in any_message(), cut in any::<prop::sample::Index>()) {
            let (kind, body) = message.encode();
            if !body.is_empty() {
                let cut = cut.index(body.len());
                prop_assert!(Message::decode(kind, &body[..cut]).is_err());
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(kind in 0u16..14, body in vec(any::<u8>(), 0..256)) {
            if let Ok(message) = Message::decode(kind, &body) {
                let (again_kind, again) = message.encode();
                prop_assert_eq!(again_kind, kind);
                prop_assert_eq!(Message::decode(kind, &again).unwrap(), message);
            }
        }

        #[test]
        fn mutated_messages_never_panic(message in any_message(), at in any::<prop::sample::Index>(), byte: u8) {
            let (kind, mut body) = message.encode();
            if !body.is_empty() {
                let at = at.index(body.len());
                body[at] = byte;
                if let Ok(decoded) = Message::decode(kind, &body) {
                    let (_, again) = decoded.encode();
                    prop_assert_eq!(Message::decode(kind, &again).unwrap(), decoded);
                }
            }
        }
    }
}
