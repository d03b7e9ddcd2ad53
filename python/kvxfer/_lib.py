"""Loading libkvxfer.so and declaring the C ABI of include/kvxfer.h for ctypes.

Only this module knows C types; everything above it speaks Python. The declarations
mirror the header one for one (same names, same field order), so a reader can check
them against include/kvxfer.h side by side.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import List, Optional

# The C ABI this package was written against: the major must match the library's, the
# minor must not exceed it (1.2 added the store, which the package uses).
ABI_MAJOR = 1
ABI_MINOR = 2

LIB_NAME = "libkvxfer.so"

# kvx_status codes (include/kvxfer.h). Names come from kvx_status_name at run time;
# these constants are for branching in Python.
OK = 0
IN_PROGRESS = 1
ERR_INVALID_ARGUMENT = -1
ERR_ZERO_LENGTH = -2
ERR_NOT_REGISTERED = -5
ERR_BUSY = -6
ERR_UNSUPPORTED = -8
ERR_UNKNOWN_BATCH = -13
ERR_UNKNOWN_PEER = -14
ERR_CANCELLED = -16
ERR_TIMED_OUT = -17
ERR_CONFIG = -19
ERR_PEER = -24
ERR_BAD_KEY = -26
ERR_ALREADY_EXISTS = -27
ERR_NO_SPACE = -28
ERR_NOT_FOUND = -29
ERR_SIZE_MISMATCH = -30
ERR_LEASE_EXPIRED = -31
ERR_UNAVAILABLE = -32

ACCESS_LOCAL_READ = 1
ACCESS_LOCAL_WRITE = 2
ACCESS_REMOTE_READ = 4
ACCESS_REMOTE_WRITE = 8
ACCESS_ALL = 15

OP_READ = 0
OP_WRITE = 1

WAIT_FOREVER = 2**64 - 1
SESSION_ID_MAX = 4096
NOTIFY_MAX = 1 << 20
STORE_KEY_MAX = 256

TRANSPORT_NAMES = {1: "local", 2: "shm", 3: "tcp", 4: "rdma", 5: "cuda"}

c_status = ctypes.c_int32
c_engine_p = ctypes.c_void_p
c_store_p = ctypes.c_void_p
c_buffer_p = ctypes.c_void_p


class kvx_config(ctypes.Structure):
    _fields_ = [
        ("slice_size", ctypes.c_uint64),
        ("copy_threads", ctypes.c_uint32),
        ("struct_size", ctypes.c_uint32),
        ("batch_timeout_ms", ctypes.c_uint64),
        ("max_slices_per_batch", ctypes.c_uint64),
        ("max_batches", ctypes.c_uint64),
        ("connect_timeout_ms", ctypes.c_uint64),
        ("listen", ctypes.c_char_p),
        ("io_threads", ctypes.c_uint32),
        ("tcp_lanes", ctypes.c_uint32),
        ("transports", ctypes.c_char_p),
    ]


class kvx_region(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
        ("location", ctypes.c_char_p),
        ("access", ctypes.c_uint32),
    ]


class kvx_op(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("local_addr", ctypes.c_uint64),
        ("remote_addr", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
    ]


class kvx_stats(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "batches_submitted",
            "submits_refused",
            "batches_completed",
            "batches_failed",
            "batches_cancelled",
            "batches_timed_out",
            "bytes_moved",
        )
    ]


class kvx_region_info(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("access", ctypes.c_uint32),
        ("location_kind", ctypes.c_uint32),
        ("location_index", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class kvx_store_config(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("replicas", ctypes.c_uint32),
        ("members", ctypes.c_char_p),
        ("contributed_bytes", ctypes.c_uint64),
        ("disk_dir", ctypes.c_char_p),
        ("disk_bytes", ctypes.c_uint64),
        ("timeout_ms", ctypes.c_uint64),
        ("member_retry_ms", ctypes.c_uint64),
        ("lease_ms", ctypes.c_uint64),
        ("reserve_timeout_ms", ctypes.c_uint64),
        ("high_watermark", ctypes.c_double),
        ("low_watermark", ctypes.c_double),
    ]


class kvx_store_stats(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "memory_capacity",
            "memory_used",
            "disk_capacity",
            "disk_used",
            "objects_in_memory",
            "objects_on_disk",
            "reservations",
            "leases",
            "puts",
            "hits",
            "misses",
            "evictions",
            "demotions",
            "promotions",
            "reclaimed_reservations",
            "expired_leases",
        )
    ]


P = ctypes.POINTER
u8pp = P(P(ctypes.c_uint8))

# name: (restype, argtypes). Every function the package calls, as the header declares it.
_SIGNATURES = {
    "kvx_version": (ctypes.c_char_p, []),
    "kvx_abi_version": (ctypes.c_uint32, []),
    "kvx_config_init": (None, [P(kvx_config)]),
    "kvx_engine_new": (c_status, [P(kvx_config), P(c_engine_p)]),
    "kvx_engine_free": (None, [c_engine_p]),
    "kvx_register": (c_status, [c_engine_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_uint32]),
    "kvx_register_batch": (c_status, [c_engine_p, P(kvx_region), ctypes.c_size_t]),
    "kvx_unregister": (c_status, [c_engine_p, ctypes.c_void_p]),
    "kvx_region_location": (c_status, [c_engine_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
    "kvx_allocate": (c_status, [c_engine_p, ctypes.c_size_t, ctypes.c_char_p, P(c_buffer_p)]),
    "kvx_buffer_addr": (ctypes.c_void_p, [c_buffer_p]),
    "kvx_buffer_len": (ctypes.c_size_t, [c_buffer_p]),
    "kvx_buffer_free": (None, [c_buffer_p]),
    "kvx_local_peer": (c_status, [c_engine_p, P(ctypes.c_uint64)]),
    "kvx_peer_transport": (c_status, [c_engine_p, ctypes.c_uint64, P(ctypes.c_uint32)]),
    "kvx_batch_transport": (c_status, [c_engine_p, ctypes.c_uint64, P(ctypes.c_uint32)]),
    "kvx_submit": (c_status, [c_engine_p, ctypes.c_uint64, P(kvx_op), ctypes.c_size_t, P(ctypes.c_uint64)]),
    "kvx_batch_status": (c_status, [c_engine_p, ctypes.c_uint64]),
    "kvx_wait": (c_status, [c_engine_p, ctypes.c_uint64, ctypes.c_uint64]),
    "kvx_cancel": (c_status, [c_engine_p, ctypes.c_uint64]),
    "kvx_free_batch": (c_status, [c_engine_p, ctypes.c_uint64]),
    "kvx_engine_stats": (c_status, [c_engine_p, P(kvx_stats)]),
    "kvx_transfer_sync": (c_status, [c_engine_p, ctypes.c_uint64, P(kvx_op), ctypes.c_size_t]),
    "kvx_engine_session_id": (c_status, [c_engine_p, ctypes.c_char_p, ctypes.c_size_t, P(ctypes.c_size_t)]),
    "kvx_open_peer": (c_status, [c_engine_p, ctypes.c_char_p, P(ctypes.c_uint64)]),
    "kvx_close_peer": (c_status, [c_engine_p, ctypes.c_uint64]),
    "kvx_probe_peer": (c_status, [c_engine_p, ctypes.c_uint64, P(ctypes.c_uint64)]),
    "kvx_peer_regions": (c_status, [c_engine_p, ctypes.c_uint64, P(kvx_region_info), ctypes.c_size_t, P(ctypes.c_size_t)]),
    "kvx_submit_with_notify": (
        c_status,
        [c_engine_p, ctypes.c_uint64, P(kvx_op), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, P(ctypes.c_uint64)],
    ),
    "kvx_poll_notification": (
        c_status,
        [c_engine_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t, P(ctypes.c_size_t), ctypes.c_char_p, ctypes.c_size_t],
    ),
    "kvx_status_name": (ctypes.c_char_p, [c_status]),
    "kvx_last_error": (ctypes.c_char_p, []),
    "kvx_store_config_init": (None, [P(kvx_store_config)]),
    "kvx_store_setup": (c_status, [c_engine_p, P(kvx_store_config), P(c_store_p)]),
    "kvx_store_free": (None, [c_store_p]),
    "kvx_store_batch_put_from": (
        c_status,
        [c_store_p, u8pp, P(ctypes.c_size_t), P(ctypes.c_void_p), P(ctypes.c_uint64), ctypes.c_size_t, P(ctypes.c_int32)],
    ),
    "kvx_store_batch_get_into": (
        c_status,
        [c_store_p, u8pp, P(ctypes.c_size_t), P(ctypes.c_void_p), P(ctypes.c_uint64), ctypes.c_size_t, P(ctypes.c_int64)],
    ),
    "kvx_store_batch_exists": (
        c_status,
        [c_store_p, u8pp, P(ctypes.c_size_t), ctypes.c_size_t, P(ctypes.c_uint8), P(ctypes.c_size_t)],
    ),
    "kvx_store_remove": (c_status, [c_store_p, u8pp, P(ctypes.c_size_t), ctypes.c_size_t, P(ctypes.c_int32)]),
    "kvx_store_remove_all": (c_status, [c_store_p, P(ctypes.c_uint64)]),
    "kvx_store_get_stats": (c_status, [c_store_p, P(kvx_store_stats)]),
}


class LibraryNotFound(ImportError):
    """libkvxfer.so is not where the package looks for it (the message lists where)."""


def candidate_paths() -> List[Path]:
    """Where the library is looked for, in order.

    KVXFER_LIB wins so a deployment (or a test) can pin one build; then the copy that
    `pip install ./python` bundles next to the package; then the cargo target directory of
    the source tree this package sits in (running from a checkout without installing),
    release before debug because that is what a user builds for real work.
    """
    paths: List[Path] = []
    env = os.environ.get("KVXFER_LIB")
    if env:
        paths.append(Path(env))
    here = Path(__file__).resolve().parent
    paths.append(here / LIB_NAME)
    repo = here.parent.parent  # python/kvxfer -> repository root
    targets = []
    if os.environ.get("CARGO_TARGET_DIR"):
        targets.append(Path(os.environ["CARGO_TARGET_DIR"]))
    targets.append(repo / "target")
    for target in targets:
        for profile in ("release", "debug"):
            paths.append(target / profile / LIB_NAME)
    return paths


_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
_lib_lock = threading.Lock()


def lib() -> ctypes.CDLL:
    """The loaded library, loaded and checked on first use (importing kvxfer is cheap)."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        tried = candidate_paths()
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            raise LibraryNotFound(
                f"{LIB_NAME} not found; looked at: " + ", ".join(str(p) for p in tried)
                + " (set KVXFER_LIB, or build it with `cargo build --release --lib`)"
            )
        handle = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.restype = restype
            fn.argtypes = argtypes
        abi = handle.kvx_abi_version()
        major, minor = abi >> 16, abi & 0xFFFF
        if major != ABI_MAJOR or minor < ABI_MINOR:
            raise LibraryNotFound(
                f"{path} has C ABI {major}.{minor}; this package needs {ABI_MAJOR}.x with x >= {ABI_MINOR}"
            )
        _lib, _lib_path = handle, path
        return handle


def lib_path() -> Path:
    """The file the library was loaded from."""
    lib()
    assert _lib_path is not None
    return _lib_path
