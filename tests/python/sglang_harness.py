"""SGLang's own HiCache objects, built on CPU, for driving kvxfer from real SGLang code.

`HiCacheStack` builds what SGLang's scheduler builds for a HiCache model: the device KV
pool (MHA or MLA), its paged allocator, the host KV pool in a given layout and the
`HiCacheController`, which attaches the storage backend through SGLang's
`StorageBackendFactory` (here `dynamic` -> kvxfer.sglang.HiCacheKvxfer) and runs SGLang's
real backup, prefetch and sync threads. The test then plays the scheduler's part only:
it puts page data into the host pool, queues backups with `write_storage`, queues
prefetches with `prefetch`, and, when SGLang reports a storage hit, allocates host
memory for it and hands the operation to the controller's I/O thread
(`prefetch_buffer`), as `UnifiedRadixCache` does.

Why CPU works: the device pool is built on "cpu", the host pool with pin_memory=False
(the only CUDA call on this path is cudaHostRegister, which pinning would need), and
io_backend "direct". Nothing is mocked: every storage call comes from SGLang's threads.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Tuple

import torch

from sglang.srt.managers.cache_controller import HiCacheController, PrefetchOperation
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import _mha_host_inputs
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_storage_hash_str
from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
from sglang.srt.server_args import ServerArgs

KVXFER_BACKEND = {
    "backend_name": "kvxfer",
    "module_path": "kvxfer.sglang",
    "class_name": "HiCacheKvxfer",
    "interface_v1": 1,
}

# How long one backup or prefetch may take before a test fails (they take milliseconds;
# this only bounds a hang).
TIMEOUT_S = 60.0


def publish_cpu_topology(page_size: int) -> None:
    """SGLang reads parallel ranks and memory settings from its runtime context; publish
    a single-rank CPU one, as SGLang's own tests do (sglang.test.test_utils)."""
    reset_context()
    publish(
        ServerArgs(model_path="dummy", device="cpu", page_size=page_size),
        role="test",
        ranks=SpawnRanks(world_rank=0, dp_rank=None),
    )


class HiCacheStack:
    """Device pool + allocator + host pool + HiCacheController with a storage backend."""

    def __init__(
        self,
        *,
        mla: bool,
        layout: str,
        extra_config: dict,
        page_size: int = 4,
        layers: int = 3,
        device_tokens: int = 2048,
        host_ratio: float = 2.0,
        model_name: Optional[str] = None,
    ):
        publish_cpu_topology(page_size)
        self.page_size = page_size
        dtype = torch.bfloat16
        if mla:
            self.device_pool = MLATokenToKVPool(
                size=device_tokens, page_size=page_size, dtype=dtype, kv_lora_rank=16,
                qk_rope_head_dim=8, layer_num=layers, device="cpu", enable_memory_saver=False,
            )
            self.host_pool = MLATokenToKVPoolHost(
                self.device_pool.get_device_pool_infos()[0].buffer_info, host_ratio, 0, page_size, layout,
                pin_memory=False, device="cpu", override_kv_cache_dim=self.device_pool.kv_cache_dim,
                device_capacity_tokens=self.device_pool.size, start_layer=self.device_pool.start_layer,
                end_layer=self.device_pool.end_layer, target_layer_num=self.device_pool.layer_num,
            )
        else:
            self.device_pool = MHATokenToKVPool(
                size=device_tokens, page_size=page_size, dtype=dtype, head_num=2, head_dim=8,
                layer_num=layers, device="cpu", enable_memory_saver=False,
            )
            cls, info, kwargs = _mha_host_inputs(self.device_pool)
            self.host_pool = cls(info, host_ratio, 0, page_size, layout, pin_memory=False, device="cpu", **kwargs)
        self.allocator = PagedTokenToKVPoolAllocator(
            device_tokens, page_size, dtype, "cpu", self.device_pool, need_sort=False
        )
        self.controller = HiCacheController(
            self.allocator,
            self.host_pool,
            page_size,
            tp_group=None,
            load_cache_event=threading.Event(),
            io_backend="direct",
            storage_backend="dynamic",
            model_name=model_name,
            storage_backend_extra_config=dict(extra_config),
        )

    @property
    def backend(self):
        """The backend SGLang created (maybe wrapped by its fault injector)."""
        return self.controller.storage_backend

    # -- page data -------------------------------------------------------------------

    def page_bytes(self, host_indices: torch.Tensor) -> List[bytes]:
        """Each page's bytes as SGLang's generic interface sees them (get_data_page)."""
        return [
            self.host_pool.get_data_page(int(host_indices[i]), flat=True).contiguous().view(torch.uint8)
            .numpy().tobytes()
            for i in range(0, len(host_indices), self.page_size)
        ]

    def fill_pages(self, n_pages: int, seed: int) -> torch.Tensor:
        """Allocates n_pages in the host pool and writes distinct random bytes into each
        (every layer, K and V); returns the host indices."""
        indices = self.host_pool.alloc(n_pages * self.page_size)
        assert indices is not None, "host pool full"
        gen = torch.Generator().manual_seed(seed)
        for i in range(0, len(indices), self.page_size):
            page = self.host_pool.get_data_page(int(indices[i]), flat=True)
            data = torch.randint(0, 256, (page.numel() * page.element_size(),), dtype=torch.uint8, generator=gen)
            self.host_pool.set_from_flat_data_page(int(indices[i]), data.view(page.dtype))
        return indices

    # -- SGLang's L3 paths -----------------------------------------------------------

    def hashes(self, tokens: List[int]) -> List[str]:
        """SGLang's page keys for `tokens` (its JIT-compiled SHA-256 chain)."""
        return get_storage_hash_str(tokens, None, page_size=self.page_size)

    def backup(self, host_indices: torch.Tensor, tokens: List[int]) -> int:
        """Queues the pages for SGLang's backup thread and waits for its ack; returns the
        tokens it reports written."""
        op_id = self.controller.write_storage(host_indices, tokens, hash_value=self.hashes(tokens))
        op = self.controller.ack_backup_queue.get(timeout=TIMEOUT_S)
        assert op.id == op_id
        return op.completed_tokens

    def prefetch(self, tokens: List[int], rid: str = "req") -> Tuple[int, int, Optional[torch.Tensor]]:
        """Runs one prefetch the way the scheduler does: SGLang's prefetch thread asks
        the backend how many pages exist; the hit gets host memory and goes to SGLang's
        I/O thread, which reads the pages. Returns (hit tokens, loaded tokens, host
        indices of the loaded pages)."""
        cc = self.controller
        op: PrefetchOperation = cc.prefetch(rid, tokens, None)
        hit_op = cc.prefetch_hit_queue.get(timeout=TIMEOUT_S)
        assert hit_op is op
        hit = op.storage_hit_count
        if hit == 0:
            return 0, 0, None
        op.host_indices = self.host_pool.alloc(hit)
        assert op.host_indices is not None, "host pool full"
        cc.prefetch_buffer.put(op)
        completed = 0
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            ack = cc.ack_prefetch_queue.get(timeout=max(0.1, deadline - time.monotonic()))
            assert ack.operation is op
            if ack.completed_tokens is not None:
                completed = ack.completed_tokens
            if ack.completed_req:
                return hit, completed, op.host_indices

    def close(self) -> None:
        # Detach stops SGLang's storage threads and calls the backend's close(); SGLang's
        # fault injector has no close(), so the backend behind it is closed here.
        backend = self.controller.storage_backend
        inner = getattr(backend, "_backend", backend)
        try:
            self.controller.detach_storage_backend()
            if inner is not None and inner is not backend:
                inner.close()
        finally:
            reset_context()

