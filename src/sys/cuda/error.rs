//! [`CudaError`]: what went wrong, in words a log reader can act on.

use std::fmt;

/// Why a CUDA operation could not be done. The driver's own errors carry the call, the
/// `CUresult` code and the driver's name and description of it; the other variants say why
/// the driver (or one of its functions) cannot be used at all, or which argument was refused
/// before the driver was called.
///
/// [`is_unavailable`](CudaError::is_unavailable) tells "CUDA cannot be used in this
/// process" (no driver, no device, not NVIDIA's library: say it once and carry on without
/// GPU memory) from errors of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaError {
    /// `dlopen` of the driver library failed: no NVIDIA driver is installed (or its library
    /// is not on the loader path).
    LibraryNotFound {
        /// The name or path given to `dlopen`.
        library: String,
        /// `dlerror()`'s text.
        reason: String,
    },
    /// The library loaded but lacks a function that every CUDA driver has (`cuInit`,
    /// `cuDeviceGetCount`): it is not NVIDIA's driver library.
    NotDriver {
        /// The library that was opened.
        library: String,
        /// The function it lacks.
        symbol: &'static str,
        /// `dlerror()`'s text.
        reason: String,
    },
    /// `cuInit(0)` failed: typically `CUDA_ERROR_NO_DEVICE` (no GPU visible, e.g.
    /// `CUDA_VISIBLE_DEVICES=""`), `CUDA_ERROR_STUB_LIBRARY` (the toolkit's stub library was
    /// found instead of the driver's) or `CUDA_ERROR_SYSTEM_DRIVER_MISMATCH`.
    InitFailed {
        /// The library that was opened.
        library: String,
        /// The `CUresult`.
        code: i32,
        /// The driver's name of the code (`CUDA_ERROR_NO_DEVICE`).
        name: String,
        /// The driver's description of the code.
        message: String,
    },
    /// The driver works but is too old for one feature: it does not export the function
    /// the feature needs (e.g. `cuMemGetHandleForAddressRange`, CUDA 11.7+). Everything
    /// else keeps working.
    MissingSymbol {
        /// The library that was opened.
        library: String,
        /// The missing function.
        symbol: &'static str,
        /// The CUDA version that introduced it (`"11.7"`).
        since: &'static str,
        /// `cuDriverGetVersion` (`12060` for CUDA 12.6; 0 if unknown).
        driver_version: i32,
    },
    /// A driver call returned an error.
    Driver {
        /// The exported function called (`cuMemAlloc_v2`).
        call: &'static str,
        /// The `CUresult`.
        code: i32,
        /// The driver's name of the code (`CUDA_ERROR_OUT_OF_MEMORY`).
        name: String,
        /// The driver's description of the code (`out of memory`).
        message: String,
    },
    /// An argument was refused before calling the driver (a device that does not exist, a
    /// range outside a buffer, an interior pointer given where an allocation's base is
    /// needed, ...).
    Invalid {
        /// The operation or driver function the argument was for.
        call: &'static str,
        /// What was wrong and what to do instead.
        reason: String,
    },
}

impl CudaError {
    /// The driver function (or operation) the error is about: `dlopen` for a missing
    /// library, `cuInit` for a failed initialisation, the missing function's name.
    pub fn call(&self) -> &'static str {
        match self {
            CudaError::LibraryNotFound { .. } => "dlopen",
            CudaError::InitFailed { .. } => "cuInit",
            CudaError::NotDriver { symbol, .. } | CudaError::MissingSymbol { symbol, .. } => symbol,
            CudaError::Driver { call, .. } | CudaError::Invalid { call, .. } => call,
        }
    }

    /// The `CUresult` code, for errors the driver returned.
    pub fn code(&self) -> Option<i32> {
        match self {
            CudaError::InitFailed { code, .. } | CudaError::Driver { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when CUDA cannot be used in this process at all (no driver library, not
    /// NVIDIA's library, `cuInit` failed), as opposed to one operation failing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CudaError::LibraryNotFound { .. }
                | CudaError::NotDriver { .. }
                | CudaError::InitFailed { .. }
        )
    }

    pub(crate) fn invalid(call: &'static str, reason: impl Into<String>) -> CudaError {
        CudaError::Invalid {
            call,
            reason: reason.into(),
        }
    }
}

/// `12060` → `12.6`.
pub(crate) struct DriverVersion(pub i32);

impl fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 <= 0 {
            f.write_str("unknown")
        } else {
            write!(f, "{}.{}", self.0 / 1000, (self.0 % 1000) / 10)
        }
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::LibraryNotFound { library, reason } => write!(
                f,
                "CUDA not available: dlopen(\"{library}\") failed: {reason}; {library} is \
                 installed by the NVIDIA GPU driver (the CUDA toolkit alone does not provide it)"
            ),
            CudaError::NotDriver {
                library,
                symbol,
                reason,
            } => write!(
                f,
                "CUDA not available: {library} has no {symbol} ({reason}); it is not NVIDIA's \
                 CUDA driver library"
            ),
            CudaError::InitFailed {
                library,
                code,
                name,
                message,
            } => {
                write!(
                    f,
                    "CUDA not available: cuInit(0) failed: {name} ({message})"
                )?;
                if *code == super::api::CUDA_ERROR_STUB_LIBRARY {
                    write!(
                        f,
                        "; the {library} found is the CUDA toolkit's stub: put the driver's \
                         library first on the loader path"
                    )?;
                }
                Ok(())
            }
            CudaError::MissingSymbol {
                library,
                symbol,
                since,
                driver_version,
            } => write!(
                f,
                "{symbol} is not available: {library} (CUDA driver {}) does not export it; it \
                 appeared in CUDA {since}: update the NVIDIA driver to use this feature",
                DriverVersion(*driver_version)
            ),
            CudaError::Driver {
                call,
                name,
                message,
                ..
            } => write!(f, "{call} failed: {name} ({message})"),
            CudaError::Invalid { call, reason } => write!(f, "{call}: {reason}"),
        }
    }
}

impl std::error::Error for CudaError {}
