"""The kvxfer C ABI in Python terms: Engine, Buffer, Store, and KvxError.

Each class owns one C handle. A handle is freed exactly once, and never while a call on
it runs in another thread (the C ABI forbids that: `kvx_engine_free` and `kvx_store_free`
wait for no call), so every call goes through `_Handle.use()`, which counts calls in
flight and makes `close()` wait for them; a call after `close()` raises KvxError instead
of passing a dangling pointer to C.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import _lib as L

KeyLike = Union[str, bytes]


class KvxError(RuntimeError):
    """A kvxfer call failed: `status` is the kvx_status code, `name` its name
    ("KVX_ERR_NOT_REGISTERED"), `detail` the library's kvx_last_error() text."""

    def __init__(self, status: int, name: str, detail: str, call: str = ""):
        self.status = status
        self.name = name
        self.detail = detail
        self.call = call
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{name}: {detail}" if detail else f"{where}{name}")


def status_name(status: int) -> str:
    """The name of a kvx_status code ("KVX_OK", "KVX_ERR_BUSY", ...)."""
    return L.lib().kvx_status_name(status).decode()


def last_error() -> str:
    """kvx_last_error() of this thread (the reason of this thread's last failed call)."""
    return (L.lib().kvx_last_error() or b"").decode(errors="replace")


def _check(status: int, call: str) -> int:
    # kvx_last_error is thread-local and this thread made the call, so reading it right
    # after the failure gives that call's reason even with other threads calling in.
    if status < 0:
        raise KvxError(status, status_name(status), last_error(), call)
    return status


def _error(status: int, detail: str, call: str) -> KvxError:
    """A KvxError the package raises itself (e.g. a closed handle), named like the
    library's own errors so callers handle both the same way."""
    return KvxError(status, status_name(status), detail, call)


def version() -> str:
    """The library's version, e.g. "0.1.0"."""
    return L.lib().kvx_version().decode()


def abi_version() -> Tuple[int, int]:
    """The library's C ABI version as (major, minor)."""
    abi = L.lib().kvx_abi_version()
    return abi >> 16, abi & 0xFFFF


class _Handle:
    """A C handle plus the bookkeeping that keeps it from being freed under a call."""

    def __init__(self, ptr: int, free, what: str):
        self._ptr: Optional[int] = ptr
        self._free = free
        self._what = what
        self._calls = 0
        self._cond = threading.Condition()

    @contextmanager
    def use(self, call: str):
        with self._cond:
            if self._ptr is None:
                raise _error(L.ERR_INVALID_ARGUMENT, f"the {self._what} is closed", call)
            self._calls += 1
            ptr = self._ptr
        try:
            yield ptr
        finally:
            with self._cond:
                self._calls -= 1
                if self._calls == 0:
                    self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        with self._cond:
            if self._ptr is None:
                return
            ptr, self._ptr = self._ptr, None  # no new call starts from here on
            while self._calls:
                self._cond.wait()
        self._free(ptr)


def _cstr(value: Optional[str]) -> Optional[bytes]:
    return None if value is None else value.encode()


@dataclass(frozen=True)
class RegionInfo:
    """A region a peer registered (kvx_region_info): its address in the peer's address
    space, length, KVX_ACCESS_* bits, and location ("cpu:0", "cuda:1", "*")."""

    addr: int
    len: int
    access: int
    location: str


@dataclass(frozen=True)
class Notification:
    """A notification another engine sent with its batch: the sender's session id and
    the payload bytes."""

    sender: str
    payload: bytes


class Buffer:
    """Registered host memory the engine allocated (kvx_allocate): `addr`, `len`, and a
    writable `view()` of its bytes. Free it with `free()` (or use it as a context)."""

    def __init__(self, handle: int):
        lib = L.lib()
        self.addr: int = lib.kvx_buffer_addr(handle) or 0
        self.len: int = lib.kvx_buffer_len(handle)
        self._handle = _Handle(handle, lib.kvx_buffer_free, "buffer")

    def view(self) -> memoryview:
        """The buffer's bytes, writable. Do not keep the view past free()."""
        with self._handle.use("Buffer.view"):
            return memoryview((ctypes.c_uint8 * self.len).from_address(self.addr)).cast("B")

    def free(self) -> None:
        self._handle.close()

    @property
    def freed(self) -> bool:
        return self._handle.closed

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


Op = Tuple[int, int, int, int]  # (OP_READ | OP_WRITE, local_addr, remote_addr, len)


def _ops_array(ops: Sequence[Op]):
    arr = (L.kvx_op * len(ops))()
    for i, (kind, local, remote, length) in enumerate(ops):
        arr[i].kind = kind
        arr[i].local_addr = local
        arr[i].remote_addr = remote
        arr[i].len = length
    return arr


class _Closable:
    """Lifetime of an object owning a `_Handle` as `self._h`: `closed`, use as a context,
    closed when collected. Subclasses define `close()`."""

    _h: "_Handle"

    @property
    def closed(self) -> bool:
        return self._h.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Engine(_Closable):
    """A kvxfer engine (kvx_engine_new). It listens for peers on `listen` ("host:port";
    port 0 picks a free one; "" means no listener), which is also its `session_id`.

    `transports` is the order of preference ("shm,rdma,tcp" by default; "tcp" forces
    TCP). `rdma_devices` is a device list in any form the library takes ("auto",
    "mlx5_0,mlx5_1", JSON); the C config has no field for it, so it travels in
    KVX_RDMA_DEVICES, the library's own override, set only while the engine starts.
    """

    _env_lock = threading.Lock()

    def __init__(
        self,
        listen: Optional[str] = "127.0.0.1:0",
        transports: Optional[str] = None,
        rdma_devices: Optional[str] = None,
        connect_timeout_ms: Optional[int] = None,
        batch_timeout_ms: Optional[int] = None,
        io_threads: Optional[int] = None,
    ):
        lib = L.lib()
        config = L.kvx_config()
        lib.kvx_config_init(ctypes.byref(config))
        config.listen = _cstr(listen)
        config.transports = _cstr(transports)
        if connect_timeout_ms is not None:
            config.connect_timeout_ms = connect_timeout_ms
        if batch_timeout_ms is not None:
            config.batch_timeout_ms = batch_timeout_ms
        if io_threads is not None:
            config.io_threads = io_threads
        out = L.c_engine_p()
        with Engine._env_lock:
            saved = os.environ.get("KVX_RDMA_DEVICES")
            if rdma_devices is not None:
                os.environ["KVX_RDMA_DEVICES"] = rdma_devices
            try:
                _check(lib.kvx_engine_new(ctypes.byref(config), ctypes.byref(out)), "kvx_engine_new")
            finally:
                if rdma_devices is not None:
                    if saved is None:
                        os.environ.pop("KVX_RDMA_DEVICES", None)
                    else:
                        os.environ["KVX_RDMA_DEVICES"] = saved
        self._h = _Handle(out.value, lib.kvx_engine_free, "engine")
        self._lib = lib

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Stops the engine (its unfinished batches are cancelled first). Idempotent."""
        self._h.close()

    # -- identity ----------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        """The "host:port" peers open this engine by."""
        buf = ctypes.create_string_buffer(L.SESSION_ID_MAX + 1)
        with self._h.use("kvx_engine_session_id") as e:
            _check(self._lib.kvx_engine_session_id(e, buf, len(buf), None), "kvx_engine_session_id")
        return buf.value.decode()

    def stats(self) -> Dict[str, int]:
        out = L.kvx_stats()
        with self._h.use("kvx_engine_stats") as e:
            _check(self._lib.kvx_engine_stats(e, ctypes.byref(out)), "kvx_engine_stats")
        return {name: getattr(out, name) for name, _ in L.kvx_stats._fields_}

    # -- memory ------------------------------------------------------------------------

    def register(self, addr: int, length: int, location: Optional[str] = None, access: int = L.ACCESS_ALL) -> None:
        """Registers caller memory [addr, addr + length): it must stay valid until
        unregister() succeeds. `location` None detects it ("cpu:N" or "cuda:N")."""
        with self._h.use("kvx_register") as e:
            _check(self._lib.kvx_register(e, addr, length, _cstr(location), access), "kvx_register")

    def register_batch(self, regions: Sequence[Tuple[int, int]], location: Optional[str] = None,
                       access: int = L.ACCESS_ALL) -> None:
        """Registers several (addr, length) regions, all or none."""
        arr = (L.kvx_region * len(regions))()
        loc = _cstr(location)
        for i, (addr, length) in enumerate(regions):
            arr[i].addr, arr[i].len, arr[i].location, arr[i].access = addr, length, loc, access
        with self._h.use("kvx_register_batch") as e:
            _check(self._lib.kvx_register_batch(e, arr, len(regions)), "kvx_register_batch")

    def unregister(self, addr: int) -> None:
        """Unregisters the region starting at `addr` (KVX_ERR_BUSY while a batch uses it)."""
        with self._h.use("kvx_unregister") as e:
            _check(self._lib.kvx_unregister(e, addr), "kvx_unregister")

    def region_location(self, addr: int) -> str:
        buf = ctypes.create_string_buffer(32)
        with self._h.use("kvx_region_location") as e:
            _check(self._lib.kvx_region_location(e, addr, buf, len(buf)), "kvx_region_location")
        return buf.value.decode()

    def allocate(self, length: int, location: Optional[str] = None) -> Buffer:
        """Allocates `length` bytes of registered host memory (every access right)."""
        out = L.c_buffer_p()
        with self._h.use("kvx_allocate") as e:
            _check(self._lib.kvx_allocate(e, length, _cstr(location), ctypes.byref(out)), "kvx_allocate")
        return Buffer(out.value)

    # -- peers -------------------------------------------------------------------------

    def local_peer(self) -> int:
        out = ctypes.c_uint64()
        with self._h.use("kvx_local_peer") as e:
            _check(self._lib.kvx_local_peer(e, ctypes.byref(out)), "kvx_local_peer")
        return out.value

    def open_peer(self, session: str) -> int:
        """Opens the engine whose session id is `session` ("host:port"); the same id
        again for a session already open."""
        out = ctypes.c_uint64()
        with self._h.use("kvx_open_peer") as e:
            _check(self._lib.kvx_open_peer(e, session.encode(), ctypes.byref(out)), "kvx_open_peer")
        return out.value

    def close_peer(self, peer: int) -> None:
        with self._h.use("kvx_close_peer") as e:
            _check(self._lib.kvx_close_peer(e, peer), "kvx_close_peer")

    def probe(self, peer: int) -> int:
        """Checks that `peer` answers; returns the round trip in nanoseconds."""
        out = ctypes.c_uint64()
        with self._h.use("kvx_probe_peer") as e:
            _check(self._lib.kvx_probe_peer(e, peer, ctypes.byref(out)), "kvx_probe_peer")
        return out.value

    def peer_transport(self, peer: int) -> str:
        out = ctypes.c_uint32()
        with self._h.use("kvx_peer_transport") as e:
            _check(self._lib.kvx_peer_transport(e, peer, ctypes.byref(out)), "kvx_peer_transport")
        return L.TRANSPORT_NAMES.get(out.value, str(out.value))

    def peer_regions(self, peer: int) -> List[RegionInfo]:
        """The regions `peer` registered, in address order."""
        count = ctypes.c_size_t()
        with self._h.use("kvx_peer_regions") as e:
            # The peer may register more between the two calls; ask until it fits.
            cap = 0
            arr = None
            while True:
                _check(self._lib.kvx_peer_regions(e, peer, arr, cap, ctypes.byref(count)), "kvx_peer_regions")
                if count.value <= cap:
                    break
                cap = count.value
                arr = (L.kvx_region_info * cap)()
        kinds = {0: "*", 1: "cpu", 2: "cuda"}
        return [
            RegionInfo(r.addr, r.len, r.access,
                       "*" if r.location_kind == 0 else f"{kinds.get(r.location_kind, '?')}:{r.location_index}")
            for r in (arr[: count.value] if arr is not None else [])
        ]

    # -- batches -----------------------------------------------------------------------

    def submit(self, peer: int, ops: Sequence[Op], notify: Optional[bytes] = None) -> int:
        """Submits ops to `peer` and returns the batch id; with `notify`, the payload is
        delivered to the peer after every byte of the batch is there."""
        arr = _ops_array(ops)
        out = ctypes.c_uint64()
        with self._h.use("kvx_submit") as e:
            if notify is None:
                _check(self._lib.kvx_submit(e, peer, arr, len(ops), ctypes.byref(out)), "kvx_submit")
            else:
                _check(self._lib.kvx_submit_with_notify(e, peer, arr, len(ops), notify, len(notify),
                                                        ctypes.byref(out)), "kvx_submit_with_notify")
        return out.value

    def batch_status(self, batch: int) -> int:
        """KVX_OK (0), KVX_IN_PROGRESS (1), or the negative status the batch ended with
        (a batch's failure is its state, not an exception)."""
        with self._h.use("kvx_batch_status") as e:
            st = self._lib.kvx_batch_status(e, batch)
        if st in (L.ERR_UNKNOWN_BATCH, L.ERR_INVALID_ARGUMENT):
            _check(st, "kvx_batch_status")
        return st

    def wait(self, batch: int, timeout_s: Optional[float] = None) -> int:
        """Waits up to `timeout_s` (None: the batch's own deadline) and returns its state
        as batch_status() does."""
        timeout_us = L.WAIT_FOREVER if timeout_s is None else max(0, int(timeout_s * 1e6))
        with self._h.use("kvx_wait") as e:
            st = self._lib.kvx_wait(e, batch, timeout_us)
        if st in (L.ERR_UNKNOWN_BATCH, L.ERR_INVALID_ARGUMENT):
            _check(st, "kvx_wait")
        return st

    def cancel(self, batch: int) -> int:
        with self._h.use("kvx_cancel") as e:
            st = self._lib.kvx_cancel(e, batch)
        if st in (L.ERR_UNKNOWN_BATCH, L.ERR_INVALID_ARGUMENT):
            _check(st, "kvx_cancel")
        return st

    def free_batch(self, batch: int) -> None:
        with self._h.use("kvx_free_batch") as e:
            _check(self._lib.kvx_free_batch(e, batch), "kvx_free_batch")

    def batch_transport(self, batch: int) -> str:
        out = ctypes.c_uint32()
        with self._h.use("kvx_batch_transport") as e:
            _check(self._lib.kvx_batch_transport(e, batch, ctypes.byref(out)), "kvx_batch_transport")
        return L.TRANSPORT_NAMES.get(out.value, str(out.value))

    def transfer_sync(self, peer: int, ops: Sequence[Op]) -> None:
        """Submits, waits and frees; raises KvxError unless every byte moved."""
        arr = _ops_array(ops)
        with self._h.use("kvx_transfer_sync") as e:
            _check(self._lib.kvx_transfer_sync(e, peer, arr, len(ops)), "kvx_transfer_sync")

    # -- notifications -----------------------------------------------------------------

    def poll_notification(self, timeout_ms: int = 0) -> Optional[Notification]:
        """The oldest notification peers sent, waiting up to `timeout_ms`; None if none
        came."""
        cap = 4096
        length = ctypes.c_size_t()
        sender = ctypes.create_string_buffer(L.SESSION_ID_MAX + 1)
        with self._h.use("kvx_poll_notification") as e:
            while True:
                buf = ctypes.create_string_buffer(cap)
                st = self._lib.kvx_poll_notification(e, timeout_ms, buf, cap, ctypes.byref(length),
                                                     sender, len(sender))
                if st == L.IN_PROGRESS:
                    return None
                if st == L.ERR_INVALID_ARGUMENT and length.value > cap:
                    cap = length.value  # it stays first in line: ask again with room for it
                    timeout_ms = 0
                    continue
                _check(st, "kvx_poll_notification")
                return Notification(sender.value.decode(), buf.raw[: length.value])


def _keys_array(keys: Sequence[KeyLike]):
    encoded = [k.encode() if isinstance(k, str) else bytes(k) for k in keys]
    n = len(encoded)
    # Keep the byte strings referenced by the returned tuple: the pointer array only
    # borrows them for the duration of the call.
    bufs = [ctypes.create_string_buffer(k, len(k)) if k else None for k in encoded]
    ptrs = (ctypes.POINTER(ctypes.c_uint8) * n)(
        *[ctypes.cast(b, ctypes.POINTER(ctypes.c_uint8)) if b is not None else None for b in bufs]
    )
    lens = (ctypes.c_size_t * n)(*[len(k) for k in encoded])
    return ptrs, lens, bufs


def _batch_ptrs(ptrs: Sequence[int], sizes: Sequence[int]):
    if len(ptrs) != len(sizes):
        raise ValueError(f"{len(ptrs)} buffers but {len(sizes)} sizes")
    n = len(ptrs)
    return (ctypes.c_void_p * n)(*ptrs), (ctypes.c_uint64 * n)(*sizes)


@dataclass(frozen=True)
class ExistsResult:
    """Which keys exist (`found`, one bool per key) and how many lead the list without
    a gap (`prefix`)."""

    found: List[bool]
    prefix: int


class Store(_Closable):
    """A client of the kvxfer L3 store, and a member of it when it contributes memory
    (kvx_store_setup). `members` are the sessions of the engines that serve segments;
    `contributed_bytes` > 0 makes this engine serve one too (it is then a member itself).

    Per-key outcomes come back as kvx_status codes (put: 0 or negative; get: the
    object's size or negative), as the C ABI returns them; whole-call failures raise
    KvxError. The store holds its engine: close them in either order.
    """

    def __init__(
        self,
        engine: Engine,
        members: Union[str, Iterable[str], None] = None,
        contributed_bytes: int = 0,
        replicas: int = 0,
        disk_dir: Optional[str] = None,
        disk_bytes: int = 0,
        timeout_ms: int = 0,
        member_retry_ms: int = 0,
        lease_ms: int = 0,
    ):
        lib = L.lib()
        if members is not None and not isinstance(members, str):
            members = ",".join(members)
        config = L.kvx_store_config()
        lib.kvx_store_config_init(ctypes.byref(config))
        config.members = _cstr(members)
        config.contributed_bytes = contributed_bytes
        config.replicas = replicas
        config.disk_dir = _cstr(disk_dir)
        config.disk_bytes = disk_bytes
        config.timeout_ms = timeout_ms
        config.member_retry_ms = member_retry_ms
        config.lease_ms = lease_ms
        out = L.c_store_p()
        with engine._h.use("kvx_store_setup") as e:
            _check(lib.kvx_store_setup(e, ctypes.byref(config), ctypes.byref(out)), "kvx_store_setup")
        self._h = _Handle(out.value, lib.kvx_store_free, "store")
        self._lib = lib
        self.engine = engine

    def close(self) -> None:
        """Leaves the store; a contributing store's objects are gone with it."""
        self._h.close()

    def batch_put_from(self, keys: Sequence[KeyLike], ptrs: Sequence[int], sizes: Sequence[int]) -> List[int]:
        """Puts each key's bytes from registered memory if the key does not exist yet.
        Per key: KVX_OK, or KVX_ERR_ALREADY_EXISTS / KVX_ERR_NO_SPACE / ... (negative)."""
        kp, kl, _keep = _keys_array(keys)
        pp, sz = _batch_ptrs(ptrs, sizes)
        results = (ctypes.c_int32 * len(keys))()
        with self._h.use("kvx_store_batch_put_from") as s:
            _check(self._lib.kvx_store_batch_put_from(s, kp, kl, pp, sz, len(keys), results),
                   "kvx_store_batch_put_from")
        return list(results)

    def batch_get_into(self, keys: Sequence[KeyLike], ptrs: Sequence[int], sizes: Sequence[int]) -> List[int]:
        """Reads each key's object into registered memory. Per key: the object's size
        (> 0), or KVX_ERR_NOT_FOUND / KVX_ERR_SIZE_MISMATCH / ... (negative)."""
        kp, kl, _keep = _keys_array(keys)
        pp, sz = _batch_ptrs(ptrs, sizes)
        results = (ctypes.c_int64 * len(keys))()
        with self._h.use("kvx_store_batch_get_into") as s:
            _check(self._lib.kvx_store_batch_get_into(s, kp, kl, pp, sz, len(keys), results),
                   "kvx_store_batch_get_into")
        return list(results)

    def batch_exists(self, keys: Sequence[KeyLike]) -> ExistsResult:
        """Which keys exist, and the longest existing prefix. A bad or unreachable key
        counts as missing (the library logs why in last_error())."""
        kp, kl, _keep = _keys_array(keys)
        found = (ctypes.c_uint8 * len(keys))()
        prefix = ctypes.c_size_t()
        with self._h.use("kvx_store_batch_exists") as s:
            _check(self._lib.kvx_store_batch_exists(s, kp, kl, len(keys), found, ctypes.byref(prefix)),
                   "kvx_store_batch_exists")
        return ExistsResult([bool(f) for f in found], prefix.value)

    def remove(self, keys: Sequence[KeyLike]) -> List[int]:
        """Removes objects. Per key: KVX_OK, KVX_ERR_NOT_FOUND, KVX_ERR_BUSY, ..."""
        kp, kl, _keep = _keys_array(keys)
        results = (ctypes.c_int32 * len(keys))()
        with self._h.use("kvx_store_remove") as s:
            _check(self._lib.kvx_store_remove(s, kp, kl, len(keys), results), "kvx_store_remove")
        return list(results)

    def remove_all(self) -> int:
        """Removes every object no one is reading, on every member; returns how many."""
        removed = ctypes.c_uint64()
        with self._h.use("kvx_store_remove_all") as s:
            _check(self._lib.kvx_store_remove_all(s, ctypes.byref(removed)), "kvx_store_remove_all")
        return removed.value

    def stats(self) -> Dict[str, int]:
        """The members' counters, summed."""
        out = L.kvx_store_stats()
        with self._h.use("kvx_store_get_stats") as s:
            _check(self._lib.kvx_store_get_stats(s, ctypes.byref(out)), "kvx_store_get_stats")
        return {name: getattr(out, name) for name, _ in L.kvx_store_stats._fields_}
