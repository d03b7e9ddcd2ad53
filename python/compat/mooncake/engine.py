"""`mooncake.engine` on kvxfer: the names SGLang imports from Mooncake's engine module,
re-exported from kvxfer.engine (see python/compat/mooncake/__init__.py)."""

from kvxfer.engine import TransferEngine, TransferNotify, TransferOpcode

# Mooncake's build-feature flags, which callers read to pick code paths: this engine
# moves host memory (and GPU memory through the library's CUDA support), but has none
# of Mooncake's NVLink/EFA/HIP transports.
SUPPORT_CUDA = False
SUPPORT_EFA = False
SUPPORT_HIP = False
SUPPORT_MNNVL = False
SUPPORT_INTRA_NVLINK = False

__all__ = ["TransferEngine", "TransferNotify", "TransferOpcode"]
