"""kvxfer for Python: ctypes bindings over libkvxfer.so (the C ABI of include/kvxfer.h).

- `Engine`, `Buffer`, `Store`: the engine, registered memory and the L3 KV store.
- `TransferEngine` (kvxfer.engine): the method set of `mooncake.engine.TransferEngine`
  that SGLang's PD disaggregation calls; python/compat/mooncake re-exports it.
- `kvxfer.sglang.HiCacheKvxfer`: an SGLang HiCache L3 storage backend (imports SGLang,
  so it is not imported here).

Importing this package does not load the library; the first call that needs it does,
from KVXFER_LIB, next to the package, or the cargo target directory of the checkout.
Failed calls raise `KvxError` with the kvx_status name and the library's error text.
"""

from ._lib import (
    ACCESS_ALL,
    ACCESS_LOCAL_READ,
    ACCESS_LOCAL_WRITE,
    ACCESS_REMOTE_READ,
    ACCESS_REMOTE_WRITE,
    OP_READ,
    OP_WRITE,
    STORE_KEY_MAX,
    LibraryNotFound,
    lib_path,
)
from .core import (
    Buffer,
    Engine,
    ExistsResult,
    KvxError,
    Notification,
    RegionInfo,
    Store,
    abi_version,
    last_error,
    status_name,
    version,
)
from .engine import TransferEngine, TransferNotify, TransferOpcode

__all__ = [
    "ACCESS_ALL",
    "ACCESS_LOCAL_READ",
    "ACCESS_LOCAL_WRITE",
    "ACCESS_REMOTE_READ",
    "ACCESS_REMOTE_WRITE",
    "OP_READ",
    "OP_WRITE",
    "STORE_KEY_MAX",
    "Buffer",
    "Engine",
    "ExistsResult",
    "KvxError",
    "LibraryNotFound",
    "Notification",
    "RegionInfo",
    "Store",
    "TransferEngine",
    "TransferNotify",
    "TransferOpcode",
    "abi_version",
    "last_error",
    "lib_path",
    "status_name",
    "version",
]
