//! Same host, another process: the bytes move with one CPU copy by the initiator, through
//! the peer's memfd mapped here (memory the peer allocated with `Engine::allocate`) or by
//! cross-memory attach (`process_vm_readv` / `process_vm_writev`) for memory the peer's
//! caller owns.
//!
//! Same host is proven, not guessed: host identity (hostname and boot id) must match, the
//! peer's abstract Unix socket must be reachable (same network namespace), and a nonce
//! written by each side into a memfd page the peer passed must be read back by the other.
//! Cross-memory attach is used only when reading a nonce from the peer's memory with
//! `process_vm_readv` works (same user or privileges, ptrace policy, pid namespace).
//!
//! Every access is checked before a byte moves: the initiator checks each op against the
//! peer's published regions and the rights it granted when attaching, and a pin table
//! shared with the peer (see [`table`]) keeps the peer from giving a region back to its
//! caller while a copy into it runs.

pub mod client;
pub mod server;
pub mod table;
pub mod wire;

use std::sync::Arc;
use std::time::Instant;

pub use client::{Alive, NotShared, ShmLink};
pub use server::ShmServer;

use super::copy::{self, CopyPool};
use super::{SliceSource, Transport, TransportKind};

/// The same-host transport to one peer.
#[derive(Debug)]
pub struct ShmTransport {
    link: Arc<ShmLink>,
    pool: Arc<CopyPool>,
}

impl ShmTransport {
    /// Moves slices over `link` with the copy threads of `pool`.
    pub fn new(link: ShmLink, pool: Arc<CopyPool>) -> Self {
        ShmTransport {
            link: Arc::new(link),
            pool,
        }
    }

    /// The proven connection.
    pub fn link(&self) -> &ShmLink {
        &self.link
    }
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn reaches_gpu(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "same-host copies ({} regions attached; caller memory {})",
            self.link.attached_count(),
            if self.link.cma() {
                "by cross-memory attach"
            } else {
                "not reachable"
            }
        )
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        self.pool
            .post(work, Arc::clone(&self.link) as Arc<dyn copy::Mover>);
    }

    fn progress(&self, work: &dyn SliceSource, until: Instant) {
        copy::drain(work, &*self.link, Some(until));
    }
}

/// 16 random bytes (from the kernel's generator; time and pid if that is unavailable,
/// which still makes a replayed proof fail).
pub(crate) fn random_nonce() -> [u8; wire::NONCE_LEN] {
    let mut nonce = [0u8; wire::NONCE_LEN];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut nonce));
    if read.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        nonce = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    nonce
}
