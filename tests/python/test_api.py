"""kvxfer's Python API over the C ABI: engine, memory, batches, notifications, store, and
the errors bad input gets (each a KvxError naming the kvx_status and the library's
reason)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvxfer
from kvxfer import KvxError


@pytest.fixture
def engine():
    e = kvxfer.Engine(transports="shm,tcp")
    yield e
    e.close()


def test_version_and_library():
    assert kvxfer.version().count(".") == 2
    major, minor = kvxfer.abi_version()
    assert major == 1 and minor >= 2
    assert Path(kvxfer.lib_path()).resolve() == Path(os.environ["KVXFER_LIB"]).resolve()


def test_local_write_moves_bytes(engine):
    with engine.allocate(1 << 16) as src, engine.allocate(1 << 16) as dst:
        src.view()[:] = bytes(range(256)) * 256
        engine.transfer_sync(engine.local_peer(), [(kvxfer.OP_WRITE, src.addr, dst.addr, 1 << 16)])
        assert bytes(dst.view()) == bytes(src.view())


def test_caller_memory_register_and_batches(engine):
    src = (ctypes.c_uint8 * 8192)(*([7] * 8192))
    dst = (ctypes.c_uint8 * 8192)()
    engine.register_batch([(ctypes.addressof(src), 8192), (ctypes.addressof(dst), 8192)])
    assert engine.region_location(ctypes.addressof(src)).startswith("cpu:")
    batch = engine.submit(engine.local_peer(), [(kvxfer.OP_WRITE, ctypes.addressof(src), ctypes.addressof(dst), 8192)])
    assert engine.wait(batch, timeout_s=30) == 0
    assert engine.batch_transport(batch) == "local"
    engine.free_batch(batch)
    assert bytes(dst) == bytes(src)
    engine.unregister(ctypes.addressof(src))
    engine.unregister(ctypes.addressof(dst))


def test_unregistered_memory_is_refused(engine):
    raw = (ctypes.c_uint8 * 4096)()
    with engine.allocate(4096) as dst:
        with pytest.raises(KvxError) as err:
            engine.transfer_sync(engine.local_peer(), [(kvxfer.OP_WRITE, ctypes.addressof(raw), dst.addr, 4096)])
    assert err.value.name == "KVX_ERR_NOT_REGISTERED"
    assert err.value.status == -5 and err.value.detail


def test_bad_registration_names_the_reason(engine):
    with pytest.raises(KvxError) as err:
        engine.register(0x1000, 0)
    assert err.value.name == "KVX_ERR_ZERO_LENGTH" and "zero length" in err.value.detail
    with engine.allocate(4096) as buf:
        with pytest.raises(KvxError) as err:
            engine.register(buf.addr, 4096)
        assert err.value.name == "KVX_ERR_OVERLAP"


def test_wrong_session_is_refused(engine):
    with pytest.raises(KvxError) as err:
        engine.open_peer("not-a-session")
    assert err.value.name == "KVX_ERR_INVALID_ARGUMENT"
    # A port nothing listens on (this engine's listener is closed once it stops).
    other = kvxfer.Engine()
    gone = other.session_id
    other.close()
    with pytest.raises(KvxError) as err:
        engine.open_peer(gone)
    assert err.value.name == "KVX_ERR_PEER"


def test_closed_engine_raises_instead_of_crashing():
    e = kvxfer.Engine()
    e.close()
    e.close()  # idempotent
    with pytest.raises(KvxError) as err:
        e.allocate(4096)
    assert err.value.name == "KVX_ERR_INVALID_ARGUMENT" and "closed" in str(err.value)


def test_engine_without_listener_has_no_session():
    with kvxfer.Engine(listen="") as e:
        with pytest.raises(KvxError) as err:
            e.session_id
        assert err.value.name == "KVX_ERR_CONFIG"


# A peer in another process: it registers a buffer, prints its session and address, and
# prints the notification it receives plus the bytes that arrived before it.
PEER = r"""
import json, sys, kvxfer
e = kvxfer.Engine(transports=sys.argv[1])
buf = e.allocate(1 << 20)
print(json.dumps({"session": e.session_id, "addr": buf.addr}), flush=True)
n = e.poll_notification(30000)
print(json.dumps({"sender": n.sender, "payload": n.payload.decode(), "head": bytes(buf.view()[:8]).hex()}), flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("transports", ["shm,tcp", "tcp"])
def test_two_processes_write_with_notification(engine, transports):
    peer = subprocess.Popen([sys.executable, "-c", PEER, transports], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        info = json.loads(peer.stdout.readline())
        p = engine.open_peer(info["session"])
        assert engine.probe(p) >= 0
        regions = engine.peer_regions(p)
        assert any(r.addr == info["addr"] and r.len == 1 << 20 for r in regions)
        with engine.allocate(1 << 20) as src:
            src.view()[:8] = b"kvxfer!!"
            batch = engine.submit(p, [(kvxfer.OP_WRITE, src.addr, info["addr"], 1 << 20)], notify=b"req-1 done")
            assert engine.wait(batch, timeout_s=30) == 0
            engine.free_batch(batch)
        got = json.loads(peer.stdout.readline())
        assert got["payload"] == "req-1 done" and got["sender"] == engine.session_id
        assert bytes.fromhex(got["head"]) == b"kvxfer!!"
    finally:
        peer.stdin.close()
        peer.wait(timeout=30)


def test_store_put_exists_get_remove(engine):
    store = kvxfer.Store(engine, contributed_bytes=64 << 20)
    with engine.allocate(8 * 4096) as buf:
        view = buf.view()
        for i in range(4):
            view[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
        keys = [f"page-{i}" for i in range(4)]
        ptrs = [buf.addr + i * 4096 for i in range(4)]
        assert store.batch_put_from(keys, ptrs, [4096] * 4) == [0] * 4
        assert store.batch_put_from(keys[:1], ptrs[:1], [4096]) == [-27]  # KVX_ERR_ALREADY_EXISTS
        ex = store.batch_exists(keys[:2] + ["missing"] + keys[2:])
        assert ex.found == [True, True, False, True, True] and ex.prefix == 2
        out = [buf.addr + (4 + i) * 4096 for i in range(4)]
        assert store.batch_get_into(keys, out, [4096] * 4) == [4096] * 4
        assert bytes(view[4 * 4096:]) == bytes(view[:4 * 4096])
        assert store.batch_get_into(["missing"], out[:1], [4096]) == [-29]  # KVX_ERR_NOT_FOUND
        assert store.batch_get_into(keys[:1], out[:1], [100]) == [-30]  # KVX_ERR_SIZE_MISMATCH
        assert store.remove(keys[:1]) == [0]
        assert store.stats()["objects_in_memory"] == 3
        assert store.remove_all() == 3
    store.close()
    with pytest.raises(KvxError):
        store.stats()


def test_store_bad_keys_and_memory(engine):
    with pytest.raises(KvxError) as err:
        kvxfer.Store(engine)  # neither members nor memory
    assert err.value.name == "KVX_ERR_CONFIG"
    with kvxfer.Store(engine, contributed_bytes=16 << 20) as store, engine.allocate(4096) as buf:
        raw = (ctypes.c_uint8 * 4096)()
        assert store.batch_put_from(["x" * 300, ""], [buf.addr] * 2, [16] * 2) == [-26, -26]  # KVX_ERR_BAD_KEY
        assert store.batch_put_from(["k"], [ctypes.addressof(raw)], [16]) == [-5]  # KVX_ERR_NOT_REGISTERED
        assert "key 0 of 1" in kvxfer.last_error()
