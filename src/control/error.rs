//! Errors of the control plane: frame and message decoding, and the client and server.

use std::sync::Arc;
use std::time::Duration;

use super::message::kind_name;

/// What went wrong decoding a control frame, or talking to a peer's control server.
///
/// Decoding and sending checks (`BadMagic` .. `NotifyTooLarge`) name no peer; the connection
/// errors (`BadAddress` .. `Disconnected`) name the session (`"host:port"`) they concern.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The first four bytes of a frame are not `"KVXC"`.
    #[error(
        "not a kvxfer control frame: magic {found:#010x}, expected 0x4358564b (\"KVXC\"); \
         the peer is not a kvxfer engine or the stream lost sync, so close the connection"
    )]
    BadMagic {
        /// The magic number read.
        found: u32,
    },
    /// A frame announces (or would carry) a body larger than the limit.
    #[error(
        "control frame body of {len} bytes exceeds the limit of {max} bytes; \
         the frame is refused before anything is allocated"
    )]
    BodyTooLong {
        /// The body length announced or given.
        len: u64,
        /// The limit ([`MAX_BODY`](super::MAX_BODY)).
        max: u32,
    },
    /// A frame carries a protocol version this build does not speak.
    #[error(
        "control protocol version {version} is not supported (this build speaks version \
         {supported}); upgrade the older side"
    )]
    UnsupportedVersion {
        /// The version in the frame.
        version: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// A frame carries a message kind this build does not know.
    #[error("unknown control message kind {kind}; the peer is newer than this build, or confused")]
    UnknownKind {
        /// The kind number.
        kind: u16,
    },
    /// A message body does not decode (too short, trailing bytes, bad UTF-8, a bound
    /// exceeded, invalid regions, ...).
    #[error("malformed {} message (kind {kind}): {reason}", kind_name(*kind))]
    Malformed {
        /// The message kind whose body is wrong.
        kind: u16,
        /// What is wrong with it.
        reason: String,
    },
    /// A valid message arrived at the wrong time (e.g. anything but Handshake first).
    #[error("unexpected {} message (kind {kind}): {reason}", kind_name(*kind))]
    Unexpected {
        /// The message kind.
        kind: u16,
        /// Why it is not acceptable now.
        reason: String,
    },
    /// The stream ended in the middle of a frame.
    #[error(
        "control connection closed in the middle of a frame ({got} of {expected} bytes read); \
         the peer died or is broken"
    )]
    Truncated {
        /// Bytes the frame part needed.
        expected: u64,
        /// Bytes that arrived before the end of the stream.
        got: u64,
    },
    /// A descriptor of this engine cannot be sent: it breaks a bound or its regions are
    /// not sorted and disjoint.
    #[error("invalid segment descriptor: {reason}; fix the descriptor before sending it")]
    InvalidDescriptor {
        /// What is wrong with it.
        reason: String,
    },
    /// An RDMA connection request or reply of this engine cannot be sent: a field breaks
    /// a bound (a QP number or PSN beyond 24 bits, an MTU that is not one of
    /// [`RDMA_MTUS`](super::RDMA_MTUS), a NIC name too long).
    #[error(
        "invalid {} message (kind {kind}): {reason}; it was not sent",
        kind_name(*kind)
    )]
    InvalidMessage {
        /// The message kind.
        kind: u16,
        /// What is wrong with it.
        reason: String,
    },
    /// A notification is larger than the limit.
    #[error(
        "notification of {len} bytes exceeds the limit of {max} bytes; send the data \
         through a transfer and notify with a small message"
    )]
    NotifyTooLarge {
        /// Bytes given.
        len: usize,
        /// The limit ([`MAX_NOTIFY`](super::MAX_NOTIFY)).
        max: usize,
    },
    /// A socket operation failed.
    #[error("control socket: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// What the OS said.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A session string does not resolve to a socket address.
    #[error("invalid control session address {session:?}: {reason}; expected \"host:port\"")]
    BadAddress {
        /// The session given.
        session: String,
        /// Why it does not resolve.
        reason: String,
    },
    /// Nothing listens at the session's address.
    #[error(
        "connection to {session} refused: no kvxfer engine listens there (not started yet, \
         or gone); check the session address or retry later"
    )]
    Refused {
        /// The session.
        session: String,
    },
    /// Connecting failed for another reason than a refusal or a timeout.
    #[error("cannot connect to {session}: {source}")]
    Connect {
        /// The session.
        session: String,
        /// What the OS said.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The peer did not answer in time.
    #[error(
        "{session} did not answer {what} within {timeout:?}; the peer is overloaded, \
         unreachable or hung; retry with a longer timeout"
    )]
    Timeout {
        /// The session.
        session: String,
        /// What was waited for.
        what: &'static str,
        /// The time allowed.
        timeout: Duration,
    },
    /// The peer answered a request with an Error message.
    #[error("{session} refused the request: {} (code {code}): {message}", super::message::error_code::name(*code))]
    PeerError {
        /// The session.
        session: String,
        /// The error code (see [`error_code`](super::error_code)).
        code: u16,
        /// The peer's explanation.
        message: String,
    },
    /// The peer answered with something that is not a valid reply to the request.
    #[error(
        "{session} sent a malformed reply: {reason}; the peer is broken or speaks another protocol"
    )]
    MalformedReply {
        /// The session.
        session: String,
        /// What is wrong with the reply.
        reason: String,
    },
    /// The connection is gone (peer closed it, sent a malformed frame, restarted under
    /// the same session, or this side closed it).
    #[error("control connection to {session} is down: {reason}; connect (handshake) again")]
    Disconnected {
        /// The session.
        session: String,
        /// Why the connection ended.
        reason: String,
    },
}

impl ControlError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> ControlError {
        ControlError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}
