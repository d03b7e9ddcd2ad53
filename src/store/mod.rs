//! The L3 KV store on top of the engine: every process that contributes memory runs a
//! segment server inside its engine (allocation, index, leases, eviction of its own
//! segment, an optional SSD tier); a key's owners are chosen by rendezvous hashing over
//! the live members, so there is no master whose loss loses all metadata.
//!
//! * [`alloc`]: the offset allocator of a segment (and of an SSD file).
//! * [`index`]: the object index of a segment server: reservations, commits, leases,
//!   approximate-LRU eviction; a pure state machine, clocks passed in.
//! * [`ssd`]: the SSD tier's file, read and written with io_uring.
//! * [`wire`]: the store requests and replies carried in control frames.
//! * [`placement`]: which members own a key (rendezvous hashing).
//! * [`server`]: the segment server a contributing engine runs.
//! * [`client`]: [`Store`], the batched put / get / exists API.

pub mod alloc;
pub mod client;
pub mod index;
pub mod placement;
pub mod server;
pub mod ssd;
pub mod wire;

pub use client::{Existence, GetResult, ItemError, PutResult, Store, StoreConfig, StoreError};
pub use server::{SegmentConfig, SegmentServer};
pub use wire::StoreStats;
