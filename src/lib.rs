//! kvxfer moves KV-cache bytes between LLM inference processes: a prefill process writes
//! KV pages into the registered memory of a decode process, and KV pages go to and come
//! back from a pool of memory contributed by many processes.
//!
//! This version has the foundation: memory registration ([`Engine::register`],
//! [`Engine::allocate`]), batches of READ/WRITE ops with O(1) status, waits with deadlines
//! and cancellation that quiesces, and the in-process transport (the engine is its own
//! peer). Network, shared-memory and RDMA transports plug in behind the same API.
//!
//! ```
//! use kvxfer::{Engine, EngineConfig, Location, Op};
//! use std::time::Duration;
//!
//! let engine = Engine::new(EngineConfig::default())?;
//! let prefill = engine.allocate(64 * 4096, Location::Any)?;
//! let decode = engine.allocate(64 * 4096, Location::Any)?;
//! prefill.fill(0, 64 * 4096, 7)?;
//! // 64 KV pages of 4 KiB, page i written to slot 63 - i.
//! let ops: Vec<Op> = (0..64u64)
//!     .map(|i| Op::write(prefill.addr() + i * 4096, decode.addr() + (63 - i) * 4096, 4096))
//!     .collect();
//! let batch = engine.submit(engine.local_peer(), &ops)?;
//! assert!(engine.wait(batch, Duration::from_secs(5))?.into_result()?);
//! engine.free(batch)?;
//! assert_eq!(decode.to_vec(), prefill.to_vec());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layers (see DESIGN.md): `sys` (OS calls) → `memory` → `topology` → `transport` →
//! `engine` → `ffi`.

#![warn(missing_docs)]

pub mod control;
pub mod engine;
pub mod ffi;
pub mod memory;
pub mod store;
pub mod sys;
pub mod topology;
pub mod transport;

pub use control::RegionInfo;
pub use engine::{
    BatchId, BatchState, Engine, EngineConfig, EngineStats, Error, Notification, Op, PeerId,
    Result, Side,
};
pub use memory::{Access, AddrRange, Buffer, Location, MemoryError};
pub use transport::{OpKind, TransportInfo, TransportKind};

/// Compiles and runs the Rust snippet of README.md as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The crate version, also returned by `kvx_version()`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
