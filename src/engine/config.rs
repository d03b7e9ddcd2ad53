//! Engine configuration: a builder in Rust (a struct in C), with `KVX_*` environment
//! variables as overrides, read in exactly one place ([`EngineConfig::with_env_overrides`]).

use std::time::Duration;

use super::{Error, Result};
use crate::topology::PausePolicy;
use crate::transport::{parse_transport_list, TransportKind};

/// How an engine runs. Build one with [`EngineConfig::builder`] or `Default`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Largest piece a transport moves at once (bytes). Default 64 KiB.
    pub slice_size: usize,
    /// Threads that copy for the in-process transport. Default: CPU count, at most 4.
    pub copy_threads: usize,
    /// Deadline of a batch after submission, unless given explicitly. Default 60 s.
    pub batch_timeout: Duration,
    /// Largest batch, counted in slices. Default 1 Mi (64 GiB at 64 KiB slices).
    pub max_slices_per_batch: usize,
    /// Most batches alive (submitted and not freed) at once. Default 64 Ki.
    pub max_batches: usize,
    /// `host:port` the control plane listens on; it is also this engine's session id
    /// (port 0 picks a free port). `None`: no listener, only the local peer works.
    /// Default `127.0.0.1:0`.
    pub listen: Option<String>,
    /// I/O threads serving TCP connections (each with its own io_uring). Default 1.
    pub io_threads: usize,
    /// TCP connections ("lanes") opened to each peer. Default 2.
    pub tcp_lanes: usize,
    /// How long opening a peer (connect and handshake) may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Transports to other processes, in order of preference: `Shm` (same host, proven
    /// during the handshake), `Rdma` (when this host has usable RDMA NICs; otherwise the
    /// reason is logged once and it is skipped) and `Tcp`. A batch goes over the first one
    /// that can carry it. The engine itself is always reached in-process. Default
    /// `[Shm, Rdma, Tcp]`.
    pub transports: Vec<TransportKind>,
    /// Which RDMA NICs to use: a device list in any form users pass (`auto`,
    /// `mlx5_0,mlx5_1`, JSON, a `.json` file). Default `auto` (every active device).
    pub rdma_devices: String,
    /// The GID index to use on every NIC; `None` chooses per NIC (RoCE v2 with an
    /// IPv4-mapped address first). Default `None`.
    pub rdma_gid_index: Option<u8>,
    /// When an RDMA NIC that keeps failing is paused: `failures` within `window` pause it
    /// for `pause` (batches go over the engine's other NICs meanwhile). Default 3 failures
    /// within 10 s pause it for 30 s.
    pub nic_pause: PausePolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineConfig {
            slice_size: 64 << 10,
            copy_threads: cpus.min(4),
            batch_timeout: Duration::from_secs(60),
            max_slices_per_batch: 1 << 20,
            max_batches: 1 << 16,
            listen: Some("127.0.0.1:0".into()),
            io_threads: 1,
            tcp_lanes: 2,
            connect_timeout: Duration::from_secs(5),
            transports: vec![TransportKind::Shm, TransportKind::Rdma, TransportKind::Tcp],
            rdma_devices: "auto".into(),
            rdma_gid_index: None,
            nic_pause: PausePolicy::default(),
        }
    }
}

/// Limits on the slice size: small enough to fit a slice length in 32 bits, large enough
/// that per-slice costs stay small.
pub const SLICE_SIZE_RANGE: std::ops::RangeInclusive<usize> = 512..=(1 << 30);

impl EngineConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> EngineConfigBuilder {
        EngineConfigBuilder(EngineConfig::default())
    }

    /// Checks every value; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if !SLICE_SIZE_RANGE.contains(&self.slice_size) {
            return Err(Error::Config(format!(
                "slice_size {} is outside {}..={}",
                self.slice_size,
                SLICE_SIZE_RANGE.start(),
                SLICE_SIZE_RANGE.end()
            )));
        }
        if !(1..=256).contains(&self.copy_threads) {
            return Err(Error::Config(format!(
                "copy_threads {} is outside 1..=256",
                self.copy_threads
            )));
        }
        if self.batch_timeout.is_zero() {
            return Err(Error::Config("batch_timeout is zero".into()));
        }
        if self.max_slices_per_batch == 0 || self.max_batches == 0 {
            return Err(Error::Config(
                "max_slices_per_batch and max_batches must be > 0".into(),
            ));
        }
        if self.max_batches > u32::MAX as usize || self.max_slices_per_batch > u32::MAX as usize {
            return Err(Error::Config(
                "max_batches and max_slices_per_batch must fit in 32 bits".into(),
            ));
        }
        if !(1..=64).contains(&self.io_threads) {
            return Err(Error::Config(format!(
                "io_threads {} is outside 1..=64",
                self.io_threads
            )));
        }
        if !(1..=64).contains(&self.tcp_lanes) {
            return Err(Error::Config(format!(
                "tcp_lanes {} is outside 1..=64",
                self.tcp_lanes
            )));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::Config("connect_timeout is zero".into()));
        }
        if self.transports.is_empty() {
            return Err(Error::Config(
                "transports is empty: list shm and/or tcp".into(),
            ));
        }
        for (i, kind) in self.transports.iter().enumerate() {
            if !matches!(
                kind,
                TransportKind::Shm | TransportKind::Rdma | TransportKind::Tcp
            ) {
                return Err(Error::Config(format!(
                    "transports: {kind} cannot be chosen for other processes (only shm, rdma and tcp)"
                )));
            }
            if self.transports[..i].contains(kind) {
                return Err(Error::Config(format!("transports lists {kind} twice")));
            }
        }
        if let Some(listen) = &self.listen {
            super::net::split_host_port(listen).map_err(Error::Config)?;
        }
        Ok(())
    }

    /// Applies `KVX_SLICE_SIZE`, `KVX_COPY_THREADS`, `KVX_BATCH_TIMEOUT_MS`, `KVX_LISTEN`
    /// (`none` turns the listener off), `KVX_IO_THREADS`, `KVX_TCP_LANES` and
    /// `KVX_TRANSPORTS` (comma-separated, in order of preference: `shm,rdma,tcp`),
    /// `KVX_RDMA_DEVICES` and `KVX_RDMA_GID_INDEX` from
    /// `lookup` (the process environment when called by the engine). A variable that is set
    /// but unparsable is an error naming it.
    pub fn with_env_overrides(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
            value
                .trim()
                .parse()
                .map_err(|_| Error::Config(format!("{name}={value:?} is not a valid number")))
        }
        if let Some(v) = lookup("KVX_SLICE_SIZE") {
            self.slice_size = parse("KVX_SLICE_SIZE", &v)?;
        }
        if let Some(v) = lookup("KVX_COPY_THREADS") {
            self.copy_threads = parse("KVX_COPY_THREADS", &v)?;
        }
        if let Some(v) = lookup("KVX_BATCH_TIMEOUT_MS") {
            self.batch_timeout = Duration::from_millis(parse("KVX_BATCH_TIMEOUT_MS", &v)?);
        }
        if let Some(v) = lookup("KVX_LISTEN") {
            let v = v.trim();
            self.listen = (v != "none").then(|| v.to_string());
        }
        if let Some(v) = lookup("KVX_IO_THREADS") {
            self.io_threads = parse("KVX_IO_THREADS", &v)?;
        }
        if let Some(v) = lookup("KVX_TCP_LANES") {
            self.tcp_lanes = parse("KVX_TCP_LANES", &v)?;
        }
        if let Some(v) = lookup("KVX_RDMA_DEVICES") {
            self.rdma_devices = v;
        }
        if let Some(v) = lookup("KVX_RDMA_GID_INDEX") {
            self.rdma_gid_index = Some(parse("KVX_RDMA_GID_INDEX", &v)?);
        }
        if let Some(v) = lookup("KVX_TRANSPORTS") {
            self.transports = parse_transport_list(&v)
                .map_err(|e| Error::Config(format!("KVX_TRANSPORTS={v:?}: {e}")))?;
        }
        Ok(self)
    }
}

/// Builds an [`EngineConfig`].
#[derive(Clone, Debug)]
pub struct EngineConfigBuilder(EngineConfig);

impl EngineConfigBuilder {
    /// See [`EngineConfig::slice_size`].
    pub fn slice_size(mut self, bytes: usize) -> Self {
        self.0.slice_size = bytes;
        self
    }

    /// See [`EngineConfig::copy_threads`].
    pub fn copy_threads(mut self, threads: usize) -> Self {
        self.0.copy_threads = threads;
        self
    }

    /// See [`EngineConfig::batch_timeout`].
    pub fn batch_timeout(mut self, timeout: Duration) -> Self {
        self.0.batch_timeout = timeout;
        self
    }

    /// See [`EngineConfig::max_slices_per_batch`].
    pub fn max_slices_per_batch(mut self, slices: usize) -> Self {
        self.0.max_slices_per_batch = slices;
        self
    }

    /// See [`EngineConfig::max_batches`].
    pub fn max_batches(mut self, batches: usize) -> Self {
        self.0.max_batches = batches;
        self
    }

    /// See [`EngineConfig::listen`].
    pub fn listen(mut self, addr: Option<&str>) -> Self {
        self.0.listen = addr.map(str::to_string);
        self
    }

    /// See [`EngineConfig::io_threads`].
    pub fn io_threads(mut self, threads: usize) -> Self {
        self.0.io_threads = threads;
        self
    }

    /// See [`EngineConfig::tcp_lanes`].
    pub fn tcp_lanes(mut self, lanes: usize) -> Self {
        self.0.tcp_lanes = lanes;
        self
    }

    /// See [`EngineConfig::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.0.connect_timeout = timeout;
        self
    }

    /// See [`EngineConfig::transports`].
    pub fn transports(mut self, kinds: &[TransportKind]) -> Self {
        self.0.transports = kinds.to_vec();
        self
    }

    /// See [`EngineConfig::rdma_devices`].
    pub fn rdma_devices(mut self, devices: &str) -> Self {
        self.0.rdma_devices = devices.to_string();
        self
    }

    /// See [`EngineConfig::rdma_gid_index`].
    pub fn rdma_gid_index(mut self, index: Option<u8>) -> Self {
        self.0.rdma_gid_index = index;
        self
    }

    /// See [`EngineConfig::nic_pause`].
    pub fn nic_pause(mut self, policy: PausePolicy) -> Self {
        self.0.nic_pause = policy;
        self
    }

    /// The configuration, validated.
    pub fn build(self) -> Result<EngineConfig> {
        self.0.validate()?;
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        EngineConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let err = EngineConfig::builder().slice_size(100).build().unwrap_err();
        assert!(err.to_string().contains("slice_size 100"), "{err}");
        let err = EngineConfig::builder().copy_threads(0).build().unwrap_err();
        assert!(err.to_string().contains("copy_threads 0"), "{err}");
        let err = EngineConfig::builder()
            .batch_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("batch_timeout"), "{err}");
    }

    #[test]
    fn environment_overrides_and_bad_values_are_errors() {
        let env = |name: &str| match name {
            "KVX_SLICE_SIZE" => Some("8192".to_string()),
            "KVX_BATCH_TIMEOUT_MS" => Some(" 250 ".to_string()),
            _ => None,
        };
        let cfg = EngineConfig::default().with_env_overrides(env).unwrap();
        assert_eq!(cfg.slice_size, 8192);
        assert_eq!(cfg.batch_timeout, Duration::from_millis(250));
        let err = EngineConfig::default()
            .with_env_overrides(|n| (n == "KVX_COPY_THREADS").then(|| "many".to_string()))
            .unwrap_err();
        assert!(
            err.to_string().contains("KVX_COPY_THREADS=\"many\""),
            "{err}"
        );
    }

    #[test]
    fn transport_lists() {
        let env = |v: &'static str| move |n: &str| (n == "KVX_TRANSPORTS").then(|| v.to_string());
        let cfg = EngineConfig::default()
            .with_env_overrides(env("tcp, shm"))
            .unwrap();
        assert_eq!(cfg.transports, [TransportKind::Tcp, TransportKind::Shm]);
        for bad in ["", "tcp,tcp", "udp", "shm,,tcp"] {
            let err = EngineConfig::default()
                .with_env_overrides(env(bad))
                .unwrap_err();
            assert!(err.to_string().contains("KVX_TRANSPORTS"), "{bad}: {err}");
        }
        let err = EngineConfig::builder().transports(&[]).build().unwrap_err();
        assert!(err.to_string().contains("transports is empty"), "{err}");
        let err = EngineConfig::builder()
            .transports(&[TransportKind::Local])
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("only shm, rdma and tcp"), "{err}");
    }
}
