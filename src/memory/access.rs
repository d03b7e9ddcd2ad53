//! Who may touch a registered region, and how.

bitflags::bitflags! {
    /// Access rights of a registered region. The local side of an op needs `LOCAL_*`, the
    /// remote (target) side `REMOTE_*`; a peer can never go beyond what was granted.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Access: u32 {
        /// This engine may read the region (source of a WRITE op).
        const LOCAL_READ = 1 << 0;
        /// This engine may write the region (destination of a READ op).
        const LOCAL_WRITE = 1 << 1;
        /// Peers may read the region (target of their READ ops).
        const REMOTE_READ = 1 << 2;
        /// Peers may write the region (target of their WRITE ops).
        const REMOTE_WRITE = 1 << 3;
    }
}

impl Access {
    /// Every right: what most KV pools register with.
    pub const ALL: Access = Access::all();
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("NONE");
        }
        bitflags::parser::to_writer(self, f)
    }
}
