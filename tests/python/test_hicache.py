"""kvxfer as SGLang's HiCache L3 backend, driven by SGLang's own HiCacheController.

SGLang creates the backend through `--hicache-storage-backend dynamic` (its
StorageBackendFactory imports kvxfer.sglang.HiCacheKvxfer from the extra config), its
backup thread writes pages with batch_set_v1 and its prefetch threads find the hit with
batch_exists and read pages with batch_get_v1. Every page read back is compared byte
for byte with what was written, through SGLang's own page accessor.
"""

from __future__ import annotations

import ctypes
import json

import pytest
import torch

from conftest import HERE, run_python
from kvxfer import KvxError
from sglang_harness import KVXFER_BACKEND, HiCacheStack
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageFailureInjector

PAGE = 4  # tokens per page
LAYOUTS = ["page_first", "page_first_direct", "layer_first"]


def tokens_for(n_pages: int, start: int = 1000):
    return list(range(start, start + n_pages * PAGE))


def local_store(**extra):
    return dict(KVXFER_BACKEND, contributed_bytes="64MiB", protocol="tcp", **extra)


@pytest.fixture
def stack_factory():
    stacks = []

    def make(**kwargs):
        kwargs.setdefault("extra_config", local_store())
        stack = HiCacheStack(**kwargs)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backup_and_prefetch_round_trip(stack_factory, layout, mla):
    """136 pages (more than SGLang's 128-page storage batch) written by the backup
    thread and read back by the prefetch threads, in each host layout."""
    stack = stack_factory(mla=mla, layout=layout)
    assert type(stack.backend).__name__ == "HiCacheKvxfer"
    n = 136
    written = stack.fill_pages(n, seed=1)
    want = stack.page_bytes(written)
    tokens = tokens_for(n)
    assert stack.backup(written, tokens) == n * PAGE
    stats = stack.backend.store_stats()
    assert stats["objects_in_memory"] == n * (1 if mla else 2)

    hit, loaded, indices = stack.prefetch(tokens)
    assert (hit, loaded) == (n * PAGE, n * PAGE)
    assert not set(indices.tolist()) & set(written.tolist())  # read into other host pages
    assert stack.page_bytes(indices) == want

    # Objects are immutable: a second backup of the same pages writes nothing new.
    assert stack.backup(written, tokens) == n * PAGE
    assert stack.backend.store_stats()["puts"] == stats["puts"]


def test_key_names_follow_sglang(stack_factory):
    mha = stack_factory(mla=False, layout="page_first", model_name="org/model")
    assert mha.backend.page_object_keys(["h"]) == ["org-model_h_0_k", "org-model_h_0_v"]
    mla = stack_factory(mla=True, layout="page_first")
    assert mla.backend.page_object_keys(["h"]) == ["h__k"]


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_partial_prefix_hits(stack_factory, mla):
    stack = stack_factory(mla=mla, layout="page_first")
    written = stack.fill_pages(10, seed=2)
    want = stack.page_bytes(written)
    tokens = tokens_for(10)
    assert stack.backup(written, tokens) == 10 * PAGE

    # The request continues past what was stored: only the stored prefix hits.
    hit, loaded, indices = stack.prefetch(tokens + tokens_for(5, start=5000), rid="longer")
    assert (hit, loaded) == (10 * PAGE, 10 * PAGE)
    assert stack.page_bytes(indices) == want

    # A page missing in the middle (one object gone) cuts the hit there.
    gone = stack.backend.page_object_keys([stack.hashes(tokens)[6]])[-1]
    assert stack.backend.store.remove([gone]) == [0]
    hit, loaded, indices = stack.prefetch(tokens, rid="hole")
    assert (hit, loaded) == (6 * PAGE, 6 * PAGE)
    assert stack.page_bytes(indices) == want[:6]

    # A different first token: a different hash chain, nothing hits.
    assert stack.prefetch(tokens_for(10, start=9000), rid="miss")[:2] == (0, 0)


def test_generic_interface(stack_factory):
    """interface_v1 = 0: SGLang's generic path, flat page tensors through get/set."""
    stack = stack_factory(mla=False, layout="page_first", extra_config=local_store(interface_v1=0))
    written = stack.fill_pages(20, seed=3)
    want = stack.page_bytes(written)
    tokens = tokens_for(20)
    assert stack.backup(written, tokens) == 20 * PAGE
    hit, loaded, indices = stack.prefetch(tokens)
    assert (hit, loaded) == (20 * PAGE, 20 * PAGE)
    assert stack.page_bytes(indices) == want
    backend = stack.backend
    key = stack.hashes(tokens)[0]
    assert backend.exists(key) and not backend.exists("nope")
    page = stack.host_pool.get_dummy_flat_data_page()
    assert backend.get(key, page) is page and page.view(torch.uint8).numpy().tobytes() == want[0]
    assert backend.get("nope", page) is None


def test_second_process_reads_what_the_first_wrote(store_node):
    """A writer process backs pages up to a kvxfer_store_node and exits; this process
    (another engine, another host pool) finds and reads them."""
    extra = dict(KVXFER_BACKEND, members=[store_node], protocol="tcp")
    writer = HERE / "hicache_writer.py"
    out = run_python([str(writer), json.dumps({"extra": extra, "pages": 40, "seed": 9, "layout": "page_first"})])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"completed_tokens": 40 * PAGE}

    stack = HiCacheStack(mla=False, layout="page_first", extra_config=extra)
    try:
        # The same seeded data the writer produced, in this pool, for comparison.
        want = stack.page_bytes(stack.fill_pages(40, seed=9))
        hit, loaded, indices = stack.prefetch(tokens_for(40))
        assert (hit, loaded) == (40 * PAGE, 40 * PAGE)
        assert stack.page_bytes(indices) == want
    finally:
        stack.backend.clear()
        stack.close()


def test_sglang_fault_injector(stack_factory, monkeypatch):
    """SGLang's SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE makes a fifth of the storage calls
    fail: whatever SGLang reports written or loaded must still be exactly right, and
    retries complete the work."""
    monkeypatch.setenv("SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE", "0.2")
    stack = stack_factory(mla=False, layout="page_first")
    assert isinstance(stack.backend, HiCacheStorageFailureInjector)
    n = 140
    written = stack.fill_pages(n, seed=4)
    want = stack.page_bytes(written)
    tokens = tokens_for(n)
    for _ in range(60):
        if stack.backup(written, tokens) == n * PAGE:
            break
    else:
        pytest.fail("backups never completed")
    full = 0
    for i in range(60):
        hit, loaded, indices = stack.prefetch(tokens, rid=f"r{i}")
        assert loaded <= hit
        if loaded:
            pages = loaded // PAGE
            assert stack.page_bytes(indices[: loaded]) == want[:pages]
        if indices is not None:
            stack.host_pool.free(indices)
        if loaded == n * PAGE:
            full += 1
            if full == 2:
                break
    assert full == 2, "no prefetch loaded every page in 60 tries"


def test_bad_input_raises(stack_factory):
    stack = stack_factory(mla=False, layout="page_first")
    backend = stack.backend
    indices = stack.fill_pages(1, seed=5)
    with pytest.raises(KvxError) as err:
        backend.batch_set_v1(["k" * 300], indices)
    assert err.value.name == "KVX_ERR_BAD_KEY"
    raw = (ctypes.c_uint8 * 64)()
    with pytest.raises(KvxError) as err:
        backend.set("raw", target_location=ctypes.addressof(raw), target_sizes=64)
    assert err.value.name == "KVX_ERR_NOT_REGISTERED"
    with pytest.raises(ValueError):
        backend.batch_get_v1(["a", "b"], indices)  # two keys, one page of indices
    stack.close()
    with pytest.raises(KvxError) as err:
        backend.batch_exists(["a"])
    assert "closed" in str(err.value)


def test_extra_config_is_checked():
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from kvxfer.sglang import HiCacheKvxfer, parse_size

    assert parse_size("64MiB") == 64 << 20 and parse_size("2 GB") == 2 << 30 and parse_size(4096) == 4096
    config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                  is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                  model_name=None, extra_config=dict(KVXFER_BACKEND))
    with pytest.raises(ValueError, match="members"):
        HiCacheKvxfer(config, {})
    config.extra_config = dict(KVXFER_BACKEND, contributed_bytes="1MiB", protocol="carrier-pigeon")
    with pytest.raises(ValueError, match="protocol"):
        HiCacheKvxfer(config, {})


def test_metrics_and_clear(stack_factory):
    stack = stack_factory(mla=False, layout="page_first")
    stack.backend.enable_storage_metrics = True
    written = stack.fill_pages(8, seed=6)
    assert stack.backup(written, tokens_for(8)) == 8 * PAGE
    assert stack.prefetch(tokens_for(8))[1] == 8 * PAGE
    metrics = stack.backend.get_stats()
    assert sum(metrics.backup_pgs) == 8 and sum(metrics.prefetch_pgs) == 8
    stack.backend.clear()
    assert stack.backend.store_stats()["objects_in_memory"] == 0
    assert stack.prefetch(tokens_for(8), rid="after-clear")[:2] == (0, 0)
