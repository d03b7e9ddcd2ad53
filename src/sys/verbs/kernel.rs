//! Whether the kernel offers RDMA to user space, and if not, why — read from sysfs and
//! `/dev`, without libibverbs.

use std::fs;
use std::path::{Path, PathBuf};

/// Why the kernel offers no RDMA verbs to this process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelSupportError {
    /// No RDMA subsystem: the kernel was built without InfiniBand/RDMA support, or `ib_core`
    /// is not loaded (or `/sys` is not this host's).
    #[error(
        "no kernel RDMA support: {} does not exist (kernel without CONFIG_INFINIBAND, or \
         the ib_core module not loaded)",
        .0.display()
    )]
    NoRdmaSubsystem(PathBuf),
    /// The RDMA subsystem is there but has no device.
    #[error(
        "kernel RDMA support present but no RDMA devices ({} is empty): no RDMA NIC, its \
         driver not loaded, or no soft-RoCE device added (`rdma link add rxe0 type rxe \
         netdev eth0`)",
        .0.display()
    )]
    NoDevices(PathBuf),
    /// Devices exist but user space cannot use them.
    #[error("RDMA devices present ({}) but no user-space verbs: {reason}", .devices.join(", "))]
    NoUserVerbs {
        /// The devices seen in sysfs.
        devices: Vec<String>,
        /// What is missing.
        reason: String,
    },
}

/// Checks that the kernel offers RDMA verbs to user space, reading `/sys` and `/dev`:
/// the RDMA subsystem (`/sys/class/infiniband`), at least one device in it, the user
/// verbs module (`/sys/class/infiniband_verbs/abi_version`, what libibverbs itself checks
/// before failing with `ENOSYS`) and its device files (`/dev/infiniband/uverbs*`). Returns
/// the device names, sorted.
///
/// This tells "no kernel support" apart from "no devices", which `ibv_get_device_list`
/// alone does not; it does not open anything (permissions are `ibv_open_device`'s
/// business).
pub fn kernel_support() -> Result<Vec<String>, KernelSupportError> {
    kernel_support_at(Path::new("/sys"), Path::new("/dev"))
}

/// [`kernel_support`] with other roots for `/sys` and `/dev` (for tests with fixture trees).
pub fn kernel_support_at(sys: &Path, dev: &Path) -> Result<Vec<String>, KernelSupportError> {
    let class = sys.join("class/infiniband");
    let entries =
        fs::read_dir(&class).map_err(|_| KernelSupportError::NoRdmaSubsystem(class.clone()))?;
    let mut devices: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if devices.is_empty() {
        return Err(KernelSupportError::NoDevices(class));
    }
    devices.sort();

    let abi = sys.join("class/infiniband_verbs/abi_version");
    if !abi.exists() {
        return Err(KernelSupportError::NoUserVerbs {
            devices,
            reason: format!(
                "{} does not exist (the ib_uverbs module is not loaded: modprobe ib_uverbs)",
                abi.display()
            ),
        });
    }

    let dev_dir = dev.join("infiniband");
    let has_uverbs = fs::read_dir(&dev_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("uverbs"))
        })
        .unwrap_or(false);
    if !has_uverbs {
        return Err(KernelSupportError::NoUserVerbs {
            devices,
            reason: format!(
                "no {}/uverbs* device files (not created by udev, or not passed into this \
                 container: docker run --device={}/uverbs0 ...)",
                dev_dir.display(),
                dev_dir.display()
            ),
        });
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(tag: &str) -> TempTree {
            let dir = std::env::temp_dir().join(format!(
                "kvxfer-verbs-kernel-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempTree(dir)
        }
        fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.0.join(rel)).unwrap();
        }
        fn touch(&self, rel: &str) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, "").unwrap();
        }
        fn check(&self) -> Result<Vec<String>, KernelSupportError> {
            kernel_support_at(&self.0.join("sys"), &self.0.join("dev"))
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn no_subsystem() {
        let t = TempTree::new("none");
        let err = t.check().unwrap_err();
        assert!(
            matches!(err, KernelSupportError::NoRdmaSubsystem(_)),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("no kernel RDMA support"),
            "{err}"
        );
    }

    #[test]
    fn no_devices() {
        let t = TempTree::new("nodev");
        t.mkdir("sys/class/infiniband");
        let err = t.check().unwrap_err();
        assert!(matches!(err, KernelSupportError::NoDevices(_)), "{err}");
        assert!(err.to_string().contains("no RDMA devices"), "{err}");
    }

    #[test]
    fn no_uverbs_module() {
        let t = TempTree::new("nomod");
        t.mkdir("sys/class/infiniband/rxe1");
        t.mkdir("sys/class/infiniband/rxe0");
        let err = t.check().unwrap_err();
        match &err {
            KernelSupportError::NoUserVerbs { devices, reason } => {
                assert_eq!(devices, &["rxe0", "rxe1"]);
                assert!(reason.contains("ib_uverbs"), "{reason}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("rxe0, rxe1"), "{err}");
    }

    #[test]
    fn no_device_files() {
        let t = TempTree::new("nofiles");
        t.mkdir("sys/class/infiniband/mlx5_0");
        t.touch("sys/class/infiniband_verbs/abi_version");
        t.mkdir("dev/infiniband");
        t.touch("dev/infiniband/rdma_cm");
        let err = t.check().unwrap_err();
        assert!(
            matches!(&err, KernelSupportError::NoUserVerbs { reason, .. } if reason.contains("uverbs*")),
            "{err}"
        );
    }

    #[test]
    fn supported() {
        let t = TempTree::new("ok");
        t.mkdir("sys/class/infiniband/mlx5_1");
        t.mkdir("sys/class/infiniband/mlx5_0");
        t.touch("sys/class/infiniband_verbs/abi_version");
        t.touch("dev/infiniband/uverbs0");
        assert_eq!(t.check().unwrap(), ["mlx5_0", "mlx5_1"]);
    }
}
