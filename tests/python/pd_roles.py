"""The two processes of the PD test: `python pd_roles.py decode` and `... prefill`.

decode: a process with `mooncake.engine.TransferEngine` (resolved to python/compat, i.e.
kvxfer) and a per-layer K/V pool in ordinary torch memory, registered with
batch_register_memory as SGLang's decode side registers its pool. It prints one JSON
line (session, buffer addresses, page bytes), then waits for a line on stdin naming the
pages that were sent and answers with the verification of every byte.

prefill: SGLang's real sender. It publishes a prefill topology, starts SGLang's
bootstrap server and builds `MooncakeKVManager` in PREFILL mode, whose engine is SGLang's
`MooncakeTransferEngine` wrapper around `mooncake.engine.TransferEngine` (kvxfer through
the compat module); then it calls the manager's `send_kvcache`, which groups the page
indices, builds per-layer blocks and moves them with `batch_transfer_sync_write`.

Both fill their pages from the same seeded generator, so the decode side knows what
every sent page must hold without being told the bytes.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

LAYERS = 3
PAGES = 64
PAGE_BYTES = 4 * 2 * 8 * 2  # page_size 4 x 2 heads x head_dim 8 x bf16


def source_pool(seed: int) -> list:
    """The prefill pool: K buffers of every layer, then V buffers (SGLang's order)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (PAGES, PAGE_BYTES), dtype=torch.uint8, generator=gen) for _ in range(2 * LAYERS)]


def decode() -> int:
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    pool = [torch.zeros((PAGES, PAGE_BYTES), dtype=torch.uint8) for _ in range(2 * LAYERS)]
    ptrs = [t.data_ptr() for t in pool]
    assert engine.batch_register_memory(ptrs, [t.numel() for t in pool]) == 0
    session = f"127.0.0.1:{engine.get_rpc_port()}"
    print(json.dumps({"session": session, "ptrs": ptrs, "engine": type(engine).__module__}), flush=True)

    request = json.loads(sys.stdin.readline())
    src = source_pool(request["seed"])
    bad = []
    sent = dict(zip(request["dst_pages"], request["src_pages"]))
    for buf_i, (got, want) in enumerate(zip(pool, src)):
        for page in range(PAGES):
            expected = want[sent[page]] if page in sent else torch.zeros(PAGE_BYTES, dtype=torch.uint8)
            if not torch.equal(got[page], expected):
                bad.append([buf_i, page])
    print(json.dumps({"checked_pages": PAGES * 2 * LAYERS, "bad": bad[:10], "n_bad": len(bad)}), flush=True)
    engine.close()
    return 0


def prefill(session: str, dst_ptrs: list, src_pages: list, dst_pages: list, seed: int, bootstrap_port: int) -> int:
    from sglang.srt.disaggregation.base.conn import KVArgs
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVBootstrapServer, MooncakeKVManager
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
        init_mooncake_transfer_engine,
    )
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(
        model_path="dummy", device="cpu", host="127.0.0.1", page_size=4,
        disaggregation_mode="prefill", disaggregation_transfer_backend="mooncake",
        disaggregation_bootstrap_port=bootstrap_port,
    )
    reset_context()
    publish(server_args, role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    # One stage, no torch.distributed groups: the manager only stores the PP group.
    get_parallel().override_permanently(pp_group=None)
    MooncakeKVBootstrapServer("127.0.0.1", bootstrap_port)

    # What SGLang's scheduler does before building the manager (parallel_state).
    shared = init_mooncake_transfer_engine(hostname="127.0.0.1", gpu_id=0, ib_device=None)

    pool = source_pool(seed)
    args = KVArgs()
    args.engine_rank = 0
    args.kv_data_ptrs = [t.data_ptr() for t in pool]
    args.kv_data_lens = [t.numel() for t in pool]
    args.kv_item_lens = [PAGE_BYTES] * len(pool)
    args.kv_layer_ids = []
    args.kv_cache_dtype_str = "bfloat16"
    args.kv_layout = None
    args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens = [], [], []
    args.state_types, args.state_data_ptrs, args.state_data_lens, args.state_item_lens = [], [], [], []
    args.state_layer_ids, args.state_dim_per_tensor, args.state_slice_outer_counts = [], [], []
    args.state_conv_shard_groups = []
    args.is_hybrid_mla_backend = False
    args.swa_kv_cache_layout = None
    args.ib_device = ""
    args.gpu_id = 0
    args.kv_head_num = args.total_kv_head_num = 2
    args.page_size = 4
    args.system_dp_rank = 0
    args.rust_http_port = None
    args.pp_rank = 0
    args.prefill_start_layer = 0
    args.prefill_end_layer = LAYERS
    args.mla_compression_ratios = None
    args.kv_buf_groups = 1
    args.hidden_kv_layers = args.draft_kv_layers = 0
    manager = MooncakeKVManager(args, DisaggregationMode.PREFILL, server_args, is_mla_backend=False)

    ret = manager.send_kvcache(
        session,
        np.array(src_pages, dtype=np.int32),
        dst_ptrs,
        np.array(dst_pages, dtype=np.int32),
        manager.executors[0],
    )
    engine = shared.engine
    print(json.dumps({
        "ret": ret,
        "engine": type(engine).__module__ + "." + type(engine).__name__,
        "session": shared.get_session_id(),
        "probe": shared.send_probe(session),
        "stats": engine.get_engine().stats(),
    }), flush=True)
    # Exit without manager.teardown(): in SGLang 0.5.23 it closes zmq sockets that its
    # bootstrap thread is still polling, which trips a libzmq assertion (SIGABRT) that
    # says nothing about the transfer. The engine and its memory go with the process.
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "decode":
        sys.exit(decode())
    spec = json.loads(sys.argv[2])
    sys.exit(prefill(spec["session"], spec["ptrs"], spec["src_pages"], spec["dst_pages"], spec["seed"],
                     spec["bootstrap_port"]))
