//! Errors of topology discovery, device lists and priority matrices.

use std::path::PathBuf;
use std::sync::Arc;

/// What went wrong reading the topology or a user's device list / matrix.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// A sysfs (or device list) file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A sysfs file holds something that is not what the kernel writes there.
    #[error("malformed {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A device list names devices this host does not have.
    #[error("unknown RDMA device(s) {unknown:?}; this host has {known:?}")]
    UnknownDevices {
        /// Names given that do not exist.
        unknown: Vec<String>,
        /// Names that exist.
        known: Vec<String>,
    },
    /// A device list could not be parsed.
    #[error("invalid device list {input:?}: {reason}")]
    BadDeviceList {
        /// The list given (truncated to 200 characters).
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A priority matrix (topology JSON) could not be parsed.
    #[error("invalid topology matrix: {reason}")]
    BadMatrix {
        /// What is wrong with it.
        reason: String,
    },
}
