"""`HiCacheKvxfer`: an SGLang HiCache L3 storage backend on the kvxfer store.

SGLang loads it with

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvxfer",
        "module_path": "kvxfer.sglang", "class_name": "HiCacheKvxfer",
        "interface_v1": 1, "members": ["10.0.0.7:7700"], "protocol": "rdma"}'

constructs it as `HiCacheKvxfer(storage_config, kwargs)` and then calls
`register_mem_pool_host(host_pool)`, which registers the whole host KV pool with the
engine once; from then on pages move between the pool and the store members without a
copy (the engine writes and reads the pool's memory directly).

Objects and keys follow SGLang's MooncakeStore, so both name a page the same way:

- MHA: two objects per page, `{key}_{tp_rank}_k` and `{key}_{tp_rank}_v` (with pipeline
  parallelism `{key}_{tp_rank}_{pp_rank}_k`); every TP rank writes its own.
- MLA: one object per page, `{key}__k` (`{key}_{pp_rank}_k` with PP); rank 0 writes it
  (SGLang's controller skips the backup on the other ranks) and every rank reads it.
- `extra_backend_tag` and the model name, when set, prefix every key ("{tag}_{model}_").

An object's bytes are what `get_page_buffer_meta` points at. In the page_first and
page_first_direct layouts that is one contiguous range per object, moved zero-copy. In
layer_first a page is one range per layer; its object is those ranges in layer order
(as Mooncake's multi-buffer put stores it), gathered into and scattered from a
registered staging buffer, because a store object is one contiguous range.

Extra config keys (all optional but one of `members` / `contributed_bytes`):
`members` (list or comma-separated "host:port" sessions of the engines serving store
memory, e.g. kvxfer_store_node), `contributed_bytes` (this rank's contribution, int or
"4GiB"), `protocol` ("rdma" or "tcp"), `device_name` (RDMA device list), `listen`
("host:port" of this rank's engine; default 127.0.0.1:0), `disk_dir` and `disk_bytes`
(an SSD tier of the contributed segment), `replicas`, `timeout_ms`,
`extra_backend_tag`, `interface_v1` (1: zero-copy page methods, as SGLang requires for
this backend; 0: SGLang's generic path through get/set, one flat object per page).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from . import _lib as L
from .core import Buffer, Engine, KvxError, Store, _error
from .engine import PROTOCOL_TRANSPORTS

logger = logging.getLogger("kvxfer.sglang")

SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")

# Per-key statuses that mean the caller passed something wrong (not that the store is
# missing data or busy): they raise instead of reading as an ordinary miss.
_CALLER_ERRORS = (L.ERR_BAD_KEY, L.ERR_NOT_REGISTERED, L.ERR_ZERO_LENGTH, L.ERR_INVALID_ARGUMENT)

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Any) -> int:
    """An int, or "64MiB" / "4 GB" / "512k" (binary units, case-insensitive)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if not m:
        raise ValueError(f"not a size: {value!r} (use bytes, or a number with K/M/G/T[i][B])")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def _members(value: Any) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [m.strip() for m in value.split(",") if m.strip()]
    return [str(m).strip() for m in value]


class _Object:
    """One store object of a page: its key, its ranges in host memory (one, or one per
    layer in layer_first), and its total size."""

    __slots__ = ("key", "ranges", "size")

    def __init__(self, key: str, ranges: List[Tuple[int, int]]):
        self.key = key
        self.ranges = ranges
        self.size = sum(n for _, n in ranges)


class _Staging:
    """Registered bounce memory for objects that are not one contiguous range, one
    buffer per thread (SGLang's backup and prefetch threads call concurrently), grown
    on demand."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._local = threading.local()
        self._all: List[Buffer] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> Buffer:
        buf: Optional[Buffer] = getattr(self._local, "buf", None)
        if buf is None or buf.len < nbytes:
            new = self._engine.allocate(max(nbytes, 1 << 20))
            with self._lock:
                if buf is not None:
                    self._all.remove(buf)
                    buf.free()
                self._all.append(new)
            self._local.buf = buf = new
        return buf

    def free(self) -> None:
        with self._lock:
            for buf in self._all:
                buf.free()
            self._all.clear()


class HiCacheKvxfer(HiCacheStorage):
    """SGLang HiCache L3 storage on the kvxfer store (see the module doc)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.storage_config = storage_config
        self.members = _members(extra.get("members"))
        self.contributed_bytes = parse_size(extra.get("contributed_bytes", 0))
        if not self.members and self.contributed_bytes == 0:
            raise ValueError(
                "HiCacheKvxfer needs store memory: set 'members' (sessions of kvxfer store "
                "nodes) and/or 'contributed_bytes' in --hicache-storage-backend-extra-config"
            )
        protocol = str(extra.get("protocol", "rdma")).lower()
        if protocol not in PROTOCOL_TRANSPORTS:
            raise ValueError(f"protocol {protocol!r} is not supported; use one of {sorted(PROTOCOL_TRANSPORTS)}")
        device = extra.get("device_name") or None
        self.zero_copy = bool(extra.get("interface_v1", 0))

        self.tp_rank = storage_config.tp_rank
        self.is_mla = storage_config.is_mla_model
        pp = f"_{storage_config.pp_rank}" if storage_config.pp_size > 1 else ""
        self.mha_suffix = f"{self.tp_rank}{pp}"
        self.mla_suffix = pp[1:]
        prefix_parts = []
        if extra.get("extra_backend_tag") is not None:
            prefix_parts.append(str(extra["extra_backend_tag"]))
        if storage_config.model_name:
            prefix_parts.append("-".join(storage_config.model_name.split("/")))
        self.key_prefix = "_".join(prefix_parts) + "_" if prefix_parts else ""

        self.engine = Engine(
            listen=extra.get("listen", "127.0.0.1:0"),
            transports=PROTOCOL_TRANSPORTS[protocol],
            rdma_devices=device if protocol == "rdma" else None,
        )
        try:
            self.store = Store(
                self.engine,
                members=self.members,
                contributed_bytes=self.contributed_bytes,
                replicas=int(extra.get("replicas", 0)),
                disk_dir=extra.get("disk_dir"),
                disk_bytes=parse_size(extra.get("disk_bytes", 0)),
                timeout_ms=int(extra.get("timeout_ms", 0)),
            )
        except BaseException:
            self.engine.close()
            raise
        self._staging = _Staging(self.engine)
        self._registered: List[int] = []
        self.mem_pool_host = None
        self.enable_storage_metrics = bool(getattr(storage_config, "enable_storage_metrics", False))
        self._metrics_lock = threading.Lock()
        self.prefetch_pgs: List[int] = []
        self.backup_pgs: List[int] = []
        self.prefetch_bandwidth: List[float] = []
        self.backup_bandwidth: List[float] = []
        self.gb_per_page = 0.0
        logger.info(
            "HiCacheKvxfer: engine %s, members %s, contributing %d bytes, protocol %s",
            self.engine.session_id, self.members or "(itself)", self.contributed_bytes, protocol,
        )

    # -- setup -----------------------------------------------------------------------

    @staticmethod
    def _pool_buffers(pool) -> List[torch.Tensor]:
        get = getattr(pool, "get_hybrid_pool_buffer", None)
        bufs = get() if get is not None else [getattr(pool, "kv_buffer", None)]
        return [b for b in bufs if b is not None and b.numel() > 0]

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Registers the whole host pool with the engine, once: pages then move between
        it and the store members without a copy."""
        layout = getattr(mem_pool_host, "layout", None)
        if layout not in SUPPORTED_LAYOUTS:
            raise ValueError(f"HiCacheKvxfer supports the host layouts {SUPPORTED_LAYOUTS}, not {layout!r}")
        if self.mem_pool_host is not None:
            raise RuntimeError("HiCacheKvxfer: a host pool is registered already")
        super().register_mem_pool_host(mem_pool_host)
        for buf in self._pool_buffers(mem_pool_host):
            ptr, nbytes = buf.data_ptr(), buf.numel() * buf.element_size()
            self.engine.register(ptr, nbytes)
            self._registered.append(ptr)
        page_bytes = mem_pool_host.get_size_per_token() * mem_pool_host.page_size
        self.gb_per_page = page_bytes / (1 << 30)

    def close(self) -> None:
        """Leaves the store and stops the engine (SGLang calls this on detach).
        Idempotent."""
        if self.store.closed:
            return
        for ptr in self._registered:
            try:
                self.engine.unregister(ptr)
            except KvxError as e:
                logger.warning("HiCacheKvxfer: unregister %#x: %s", ptr, e)
        self._registered.clear()
        self._staging.free()
        self.store.close()
        self.engine.close()

    # -- keys and objects ------------------------------------------------------------

    def _page_suffixes(self) -> List[str]:
        if self.is_mla:
            return [f"_{self.mla_suffix}_k"]
        return [f"_{self.mha_suffix}_k", f"_{self.mha_suffix}_v"]

    def page_object_keys(self, keys: Sequence[str]) -> List[str]:
        """The store keys of the pages `keys` (objects of a page are adjacent)."""
        suffixes = self._page_suffixes()
        return [f"{self.key_prefix}{k}{s}" for k in keys for s in suffixes]

    def flat_object_key(self, key: str) -> str:
        """The store key of the generic interface's object `key` (get/set/exists)."""
        return f"{self.key_prefix}{key}_{self.mla_suffix if self.is_mla else self.mha_suffix}"

    def _page_objects(self, keys: Sequence[str], host_indices: torch.Tensor) -> List[_Object]:
        pool = self.mem_pool_host
        if pool is None:
            raise RuntimeError("HiCacheKvxfer: register_mem_pool_host was not called")
        n = len(keys)
        if n == 0:
            return []
        if len(host_indices) != n * pool.page_size:
            raise ValueError(
                f"{n} page keys need {n * pool.page_size} host indices (page size {pool.page_size}), "
                f"got {len(host_indices)}"
            )
        ptrs, sizes = pool.get_page_buffer_meta(host_indices)
        per_page = len(ptrs) // n
        object_keys = self.page_object_keys(keys)
        per_object = len(object_keys) // n  # 2 for MHA (K, V), 1 for MLA
        if per_page * n != len(ptrs) or per_page % per_object:
            raise RuntimeError(
                f"get_page_buffer_meta gave {len(ptrs)} ranges for {n} pages of {per_object} objects"
            )
        objects = []
        for p in range(n):
            base = p * per_page
            for j in range(per_object):
                # Ranges of object j: every per_object-th range of the page, from j
                # (K, V alternate per layer in MHA layer_first).
                idx = range(base + j, base + per_page, per_object)
                objects.append(_Object(object_keys[p * per_object + j], [(ptrs[i], sizes[i]) for i in idx]))
        return objects

    @staticmethod
    def _raise_caller_errors(results: Sequence[int], keys: Sequence[str], call: str) -> None:
        for key, r in zip(keys, results):
            if r in _CALLER_ERRORS:
                raise _error(r, f"key {key!r}", call)

    def _page_results(self, ok: List[bool], n_pages: int) -> List[bool]:
        per = len(ok) // n_pages if n_pages else 1
        return [all(ok[p * per:(p + 1) * per]) for p in range(n_pages)]

    # -- zero-copy page interface (interface_v1) -------------------------------------

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """How many pages lead `keys` with every object present in the store."""
        if not keys:
            return 0
        if not self.zero_copy:
            found = self.store.batch_exists([self.flat_object_key(k) for k in keys]).found
            return found.index(False) if False in found else len(keys)
        object_keys = self.page_object_keys(keys)
        found = self.store.batch_exists(object_keys).found
        pages = self._page_results(found, len(keys))
        return pages.index(False) if False in pages else len(keys)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Reads pages into the host pool at `host_indices`; per page, whether every
        object was read whole."""
        objects = self._page_objects(keys, host_indices)
        if not objects:
            return []
        start = time.perf_counter()
        staged = [o for o in objects if len(o.ranges) > 1]
        stage = self._staging.get(sum(o.size for o in staged)) if staged else None
        targets, offset = [], 0
        for o in objects:
            if len(o.ranges) == 1:
                targets.append(o.ranges[0][0])
            else:
                targets.append(stage.addr + offset)
                offset += o.size
        results = self.store.batch_get_into([o.key for o in objects], targets, [o.size for o in objects])
        self._raise_caller_errors(results, [o.key for o in objects], "batch_get_v1")
        ok = [r == o.size for r, o in zip(results, objects)]
        for o, target, good in zip(objects, targets, ok):
            if good and len(o.ranges) > 1:
                src = target
                for ptr, n in o.ranges:
                    ctypes.memmove(ptr, src, n)
                    src += n
        pages = self._page_results(ok, len(keys))
        self._record(self.prefetch_pgs, self.prefetch_bandwidth, len(keys), start)
        return pages

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Writes the pages at `host_indices` whose objects the store lacks (objects are
        immutable, so a page already there is left as it is and counts as written)."""
        objects = self._page_objects(keys, host_indices)
        if not objects:
            return []
        start = time.perf_counter()
        found = self.store.batch_exists([o.key for o in objects]).found
        missing = [o for o, f in zip(objects, found) if not f]
        ok = {o.key: True for o, f in zip(objects, found) if f}
        if missing:
            staged = [o for o in missing if len(o.ranges) > 1]
            stage = self._staging.get(sum(o.size for o in staged)) if staged else None
            sources, offset = [], 0
            for o in missing:
                if len(o.ranges) == 1:
                    sources.append(o.ranges[0][0])
                else:
                    dst = stage.addr + offset
                    sources.append(dst)
                    for ptr, n in o.ranges:
                        ctypes.memmove(dst, ptr, n)
                        dst += n
                    offset += o.size
            results = self.store.batch_put_from([o.key for o in missing], sources, [o.size for o in missing])
            self._raise_caller_errors(results, [o.key for o in missing], "batch_set_v1")
            for o, r in zip(missing, results):
                # ALREADY_EXISTS: another writer put it between our exists and put.
                ok[o.key] = r in (L.OK, L.ERR_ALREADY_EXISTS)
            self._record(self.backup_pgs, self.backup_bandwidth, len(missing) // max(1, len(objects) // len(keys)),
                         start)
        return self._page_results([ok[o.key] for o in objects], len(keys))

    # -- generic interface: one object per key ---------------------------------------

    def _tensor_bytes(self, t: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        if t.device.type != "cpu":
            raise ValueError(f"HiCacheKvxfer moves host tensors only, not {t.device}")
        t = t.contiguous()
        return t, t.data_ptr(), t.numel() * t.element_size()

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        """Stores one object under `key`: the bytes of tensor `value` (copied through
        registered staging memory), or `target_sizes` bytes at registered address
        `target_location` (zero-copy, as MooncakeStore.set takes them). True if the
        object is in the store afterwards (also when it was there already)."""
        return self.batch_set([key], None if value is None else [value],
                              None if target_location is None else [target_location],
                              None if target_sizes is None else [target_sizes])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        """set() for several keys; True only if every object is stored."""
        if not keys:
            return True
        object_keys = [self.flat_object_key(k) for k in keys]
        keep = []
        if values is not None:
            tensors = [self._tensor_bytes(v) for v in values]
            stage = self._staging.get(sum(n for _, _, n in tensors))
            ptrs, sizes, offset = [], [], 0
            for t, src, n in tensors:
                ctypes.memmove(stage.addr + offset, src, n)
                ptrs.append(stage.addr + offset)
                sizes.append(n)
                offset += n
                keep.append(t)
        elif target_locations is not None and target_sizes is not None:
            ptrs, sizes = [int(p) for p in target_locations], [int(s) for s in target_sizes]
        else:
            raise ValueError("batch_set needs values (tensors) or target_locations and target_sizes")
        if not (len(keys) == len(ptrs) == len(sizes)):
            raise ValueError(f"{len(keys)} keys but {len(ptrs)} values")
        found = self.store.batch_exists(object_keys).found
        todo = [i for i, f in enumerate(found) if not f]
        if not todo:
            return True
        results = self.store.batch_put_from([object_keys[i] for i in todo], [ptrs[i] for i in todo],
                                            [sizes[i] for i in todo])
        self._raise_caller_errors(results, [object_keys[i] for i in todo], "batch_set")
        return all(r in (L.OK, L.ERR_ALREADY_EXISTS) for r in results)

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        """Reads object `key` into tensor `target_location` (through registered staging
        memory; returns the tensor, or None if the key is missing), or into `target_sizes`
        bytes at registered address `target_location` (zero-copy; returns True/False as
        MooncakeStore.get does)."""
        out = self.batch_get([key], None if target_location is None else [target_location],
                             None if target_sizes is None else [target_sizes])
        return out[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[Any]:
        """get() for several keys: per key the tensor / True, or None / False."""
        if not keys:
            return []
        if target_locations is None:
            raise ValueError("batch_get needs target tensors or target_locations and target_sizes")
        object_keys = [self.flat_object_key(k) for k in keys]
        if all(isinstance(t, torch.Tensor) for t in target_locations):
            tensors = [self._tensor_bytes(t) for t in target_locations]
            for (c, _, _), t in zip(tensors, target_locations):
                if c.data_ptr() != t.data_ptr():
                    raise ValueError("batch_get target tensors must be contiguous")
            stage = self._staging.get(sum(n for _, _, n in tensors))
            ptrs, offset = [], 0
            for _, _, n in tensors:
                ptrs.append(stage.addr + offset)
                offset += n
            sizes = [n for _, _, n in tensors]
            results = self.store.batch_get_into(object_keys, ptrs, sizes)
            self._raise_caller_errors(results, object_keys, "batch_get")
            out = []
            for (t, dst, n), src, r in zip(tensors, ptrs, results):
                if r == n:
                    ctypes.memmove(dst, src, n)
                    out.append(t)
                else:
                    out.append(None)
            return out
        if target_sizes is None:
            raise ValueError("batch_get with addresses needs target_sizes")
        ptrs, sizes = [int(p) for p in target_locations], [int(s) for s in target_sizes]
        results = self.store.batch_get_into(object_keys, ptrs, sizes)
        self._raise_caller_errors(results, object_keys, "batch_get")
        return [r == s for r, s in zip(results, sizes)]

    def exists(self, key: str) -> bool:
        """Whether object `key` of the generic interface is in the store."""
        return self.store.batch_exists([self.flat_object_key(key)]).found[0]

    # -- housekeeping ----------------------------------------------------------------

    def clear(self) -> None:
        """Removes every object no one is reading, on every member."""
        removed = self.store.remove_all()
        logger.info("HiCacheKvxfer: cleared %d objects", removed)

    def store_stats(self) -> Dict[str, int]:
        """The store members' counters, summed (memory, objects, hits, misses, ...)."""
        return self.store.stats()

    def _record(self, pages: List[int], bandwidth: List[float], n: int, start: float) -> None:
        if not self.enable_storage_metrics or n == 0:
            return
        elapsed = max(time.perf_counter() - start, 1e-9)
        with self._metrics_lock:
            pages.append(n)
            bandwidth.append(n / elapsed * self.gb_per_page)

    def get_stats(self):
        """SGLang's StorageMetrics of the pages moved since the last call (what the
        scheduler exports), as MooncakeStore reports them."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        metrics = StorageMetrics()
        with self._metrics_lock:
            metrics.prefetch_pgs.extend(self.prefetch_pgs)
            metrics.backup_pgs.extend(self.backup_pgs)
            metrics.prefetch_bandwidth.extend(self.prefetch_bandwidth)
            metrics.backup_bandwidth.extend(self.backup_bandwidth)
            self.prefetch_pgs.clear()
            self.backup_pgs.clear()
            self.prefetch_bandwidth.clear()
            self.backup_bandwidth.clear()
        return metrics
