//! RDMA over verbs: batched one-sided WRITE and READ on RC queue pairs, spread over NICs.
//!
//! * [`nic`]: one opened device per selected NIC (protection domain, completion queue on
//!   a completion channel, the port address: LID, GID chosen RoCE v2 IPv4-mapped first,
//!   active MTU).
//! * [`mr`]: every registered region gets a memory registration per NIC, split at the
//!   NIC's `max_mr_size`; local keys by address, remote keys as peers published them.
//! * [`endpoint`]: an RC queue pair from a local NIC to a peer's NIC; claimed ranges of a
//!   batch are posted as chains (one doorbell, last request signaled, small WRITEs
//!   inline) while fewer than a bound of requests is outstanding.
//! * [`worker`]: the poller of a NIC's completion queue, which completes ranges and
//!   refills the queue pairs.
//!
//! A batch posted to several endpoints (one per local NIC) is claimed by all of them, so
//! its slices spread over the NICs in proportion to how fast each completes them.
//!
//! Status: the building blocks run on real verbs (soft-RoCE, see the tests); the control
//! plane handshake, the engine's choice of this transport and failover are the next step.

pub mod endpoint;
pub mod mr;
pub mod nic;
pub mod worker;

use std::sync::Arc;

pub use endpoint::{Endpoint, RemoteQp};
pub use mr::{Key, MrTable, RemoteKeys};
pub use nic::{Nic, PortAddress};
pub use worker::NicWorker;

use super::{SliceSource, Transport, TransportKind};

/// The RDMA transport to one peer: its queue pairs, one per local NIC in use.
#[derive(Debug)]
pub struct RdmaTransport {
    endpoints: Vec<Arc<Endpoint>>,
}

impl RdmaTransport {
    /// Moves batches over `endpoints` (connected queue pairs to the peer).
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        RdmaTransport { endpoints }
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.endpoints.iter().map(|e| format!("{e:?}")).collect();
        format!("RDMA RC queue pairs: {}", names.join(", "))
    }

    fn post(&self, work: Arc<dyn SliceSource>) {
        let live: Vec<&Arc<Endpoint>> = self.endpoints.iter().filter(|e| !e.is_broken()).collect();
        // Every live queue pair claims from the batch; if none is left, the first fails
        // what it claims (the batch ends with its error).
        let targets = if live.is_empty() {
            self.endpoints.iter().take(1).collect()
        } else {
            live
        };
        for ep in targets {
            ep.post(Arc::clone(&work));
        }
    }
}

#[cfg(test)]
mod tests;
