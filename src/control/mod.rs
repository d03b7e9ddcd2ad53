//! The engine's control plane: versioned, length-prefixed binary frames over TCP between
//! engines, for the handshake (segment descriptors), descriptor refreshes, probes,
//! notifications and the connection of RDMA queue pairs.
//!
//! - [`frame`]: the 16-byte frame header (`"KVXC"`, version, kind, body length, request
//!   id) and frame encoding;
//! - [`Message`]: the messages and their bodies, with [`SegmentDescriptor`] (an engine's
//!   identity, registered regions, transport offers, RDMA NICs and memory keys) and the
//!   RDMA queue-pair exchange ([`RdmaConnectRequest`], [`RdmaConnectReply`]);
//! - [`ControlServer`]: the listener of an engine, one thread per peer connection (at
//!   most [`ServerLimits::max_connections`], each to handshake within
//!   [`ServerLimits::handshake_timeout`]), serving a [`ControlHandler`] and pushing
//!   descriptor changes from a publisher thread ([`ControlServer::publish`] never blocks
//!   on a peer);
//! - [`ControlClient`]: a connection to a peer's server, with request/reply matching by
//!   request id and pushed descriptors applied as they come.
//!
//! Every decoder refuses bad input with a [`ControlError`] that names what is wrong; none
//! panics or allocates beyond what the frame's bytes allow (see the `control_frame` fuzz
//! target).
//!
//! ```
//! use std::net::TcpListener;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use kvxfer::control::{ControlClient, ControlHandler, ControlServer, SegmentDescriptor};
//!
//! struct Target(SegmentDescriptor);
//! impl ControlHandler for Target {
//!     fn descriptor(&self) -> SegmentDescriptor {
//!         self.0.clone()
//!     }
//!     fn notified(&self, from: &SegmentDescriptor, bytes: Vec<u8>) -> Result<(), String> {
//!         println!("{} says {bytes:?}", from.session);
//!         Ok(()) // Err("inbox full".into()) would answer the peer BUSY
//!     }
//! }
//!
//! let describe = |session: &str| SegmentDescriptor {
//!     engine_id: 1,
//!     session: session.into(),
//!     host: "host-a".into(),
//!     epoch: 1,
//!     version: 1,
//!     regions: vec![],
//!     transports: vec![],
//!     rdma_nics: vec![],
//!     rkeys: vec![],
//! };
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let session = listener.local_addr()?.to_string();
//! let server = ControlServer::start(listener, Arc::new(Target(describe(&session))))?;
//!
//! let timeout = Duration::from_secs(5);
//! let client = ControlClient::connect(&session, &describe("127.0.0.1:1"), timeout)?;
//! assert_eq!(client.descriptor().session, session);
//! client.probe(timeout)?;
//! client.notify(b"batch 7 done", timeout)?;
//! drop(server);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod client;
mod error;
pub mod frame;
mod message;
mod server;

pub use client::{ControlClient, PendingReply, SyncControlClient};
pub use error::ControlError;
pub use frame::{FrameHeader, HEADER_LEN, MAGIC, MAX_BODY, VERSION};
pub use message::{
    error_code, kind, kind_name, Message, RdmaConnectReply, RdmaConnectRequest, RdmaNic,
    RegionInfo, RegionKey, SegmentDescriptor, TransportOffer, MAX_NOTIFY, MAX_PARAMS,
    MAX_RDMA_NICS, MAX_REGIONS, MAX_RKEYS, MAX_STRING, MAX_TRANSPORTS, RDMA_MTUS,
};
pub use server::{ControlHandler, ControlServer, ServerLimits, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
