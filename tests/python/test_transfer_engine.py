"""kvxfer.TransferEngine against Mooncake's Python API conventions, between two
processes (the peer is `mooncake.engine.TransferEngine` from python/compat)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from conftest import COMPAT_DIR
from kvxfer import TransferEngine, TransferNotify, TransferOpcode

SIZE = 1 << 20

# The peer: registers a pattern buffer (readable) and a zeroed one (writable), prints
# its session and addresses, then answers "dump OFF LEN" with hex bytes and "notifies"
# with what get_notifies() returned.
PEER = r"""
import ctypes, json, sys
from mooncake.engine import TransferEngine
te = TransferEngine()
assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
src = (ctypes.c_uint8 * (1 << 20))(*[(i * 7) & 0xff for i in range(1 << 20)])
dst = (ctypes.c_uint8 * (1 << 20))()
assert te.batch_register_memory([ctypes.addressof(src), ctypes.addressof(dst)], [1 << 20, 1 << 20]) == 0
print(json.dumps({"session": f"127.0.0.1:{te.get_rpc_port()}", "src": ctypes.addressof(src),
                  "dst": ctypes.addressof(dst), "module": type(te).__module__}), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "dump":
        off, n = int(cmd[1]), int(cmd[2])
        print(bytes(dst[off:off + n]).hex(), flush=True)
    elif cmd[0] == "notifies":
        print(json.dumps([[n.name, n.msg] for n in te.get_notifies()]), flush=True)
"""


@pytest.fixture(scope="module")
def peer():
    import os

    env = dict(os.environ, PYTHONPATH=f"{COMPAT_DIR}{os.pathsep}{os.environ['PYTHONPATH']}")
    proc = subprocess.Popen([sys.executable, "-c", PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    info = json.loads(proc.stdout.readline())
    assert info["module"] == "kvxfer.engine"  # the compat module resolved to kvxfer

    def ask(line: str) -> str:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    info["ask"] = ask
    yield info
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def te():
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def local(te):
    buf = (ctypes.c_uint8 * SIZE)()
    assert te.register_memory(ctypes.addressof(buf), SIZE) == 0
    yield buf


def pattern(off: int, n: int) -> bytes:
    return bytes(((off + i) * 7) & 0xFF for i in range(n))


def test_initialize_conventions():
    te = TransferEngine()
    assert te.initialize("127.0.0.1", "etcd://127.0.0.1:2379", "tcp", "") < 0
    assert "P2PHANDSHAKE" in str(te.last_error())
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "carrier-pigeon", "") < 0
    assert te.initialize("127.0.0.1:0", "P2PHANDSHAKE", "tcp", "") == 0
    assert te.get_rpc_port() > 0
    assert te.get_session_id() == f"127.0.0.1:{te.get_rpc_port()}"
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") < 0  # twice
    te.close()


def test_sync_read_and_write(te, local, peer):
    # Read 4 KiB of the peer's pattern, write it back into the peer's zeroed buffer.
    assert te.transfer_sync_read(peer["session"], ctypes.addressof(local), peer["src"] + 100, 4096) == 0
    assert bytes(local[:4096]) == pattern(100, 4096)
    assert te.transfer_sync_write(peer["session"], ctypes.addressof(local), peer["dst"], 4096) == 0
    assert bytes.fromhex(peer["ask"]("dump 0 4096")) == pattern(100, 4096)


def test_batch_sync_read_write(te, local, peer):
    base = ctypes.addressof(local)
    offs = [0, 8192, 65536, 500000]
    assert te.batch_transfer_sync_read(peer["session"], [base + o for o in offs], [peer["src"] + o for o in offs],
                                       [1000] * 4) == 0
    for o in offs:
        assert bytes(local[o:o + 1000]) == pattern(o, 1000)
    assert te.batch_transfer_sync_write(peer["session"], [base + o for o in offs], [peer["dst"] + o for o in offs],
                                        [1000] * 4) == 0
    for o in offs:
        assert bytes.fromhex(peer["ask"](f"dump {o} 1000")) == pattern(o, 1000)


def test_async_batches_and_status(te, local, peer):
    base = ctypes.addressof(local)
    ids = [
        te.batch_transfer_async_read(peer["session"], [base + 200000], [peer["src"] + 200000], [4096]),
        te.batch_transfer_async_write(peer["session"], [base + 200000], [peer["dst"] + 300000], [4096]),
    ]
    assert all(i > 0 for i in ids)
    # The write may run before the read lands: only the read's bytes are checked here.
    assert te.get_batch_transfer_status(ids) == 0
    assert bytes(local[200000:204096]) == pattern(200000, 4096)
    bid = te.transfer_submit_write(peer["session"], base + 200000, peer["dst"] + 400000, 4096)
    assert bid > 0
    st = 0
    while st == 0:
        st = te.transfer_check_status(bid)
    assert st == 1
    assert bytes.fromhex(peer["ask"]("dump 400000 4096")) == pattern(200000, 4096)


def test_notifications(te, local, peer):
    base = ctypes.addressof(local)
    assert te.transfer_sync(peer["session"], base, peer["dst"], 16, TransferOpcode.WRITE,
                            TransferNotify("room-7", "kv done")) == 0
    assert te.batch_transfer_sync(peer["session"], [base], [peer["dst"]], [16], TransferOpcode.WRITE,
                                  TransferNotify("room-8", "aux done")) == 0
    assert json.loads(peer["ask"]("notifies")) == [["room-7", "kv done"], ["room-8", "aux done"]]
    assert json.loads(peer["ask"]("notifies")) == []


def test_probe_and_first_buffer(te, peer):
    assert te.send_probe(peer["session"]) == 0
    assert te.get_first_buffer_address(peer["session"]) == min(peer["src"], peer["dst"])
    assert te.send_probe("127.0.0.1:1") != 0


def test_failures_are_negative_codes(te, local, peer):
    raw = (ctypes.c_uint8 * 64)()
    # Unregistered local memory.
    assert te.transfer_sync_write(peer["session"], ctypes.addressof(raw), peer["dst"], 64) == -5
    assert te.last_error().name == "KVX_ERR_NOT_REGISTERED"
    # A peer address outside what the peer registered.
    assert te.transfer_sync_write(peer["session"], ctypes.addressof(local), 0x1000, 64) < 0
    # A wrong session, and mismatched batch lists.
    assert te.transfer_sync_read("127.0.0.1:1", ctypes.addressof(local), peer["src"], 64) < 0
    assert te.batch_transfer_sync_write(peer["session"], [ctypes.addressof(local)], [], [64]) < 0
    assert te.batch_transfer_async_write("127.0.0.1:1", [ctypes.addressof(local)], [peer["dst"]], [64]) == 0
    assert te.get_batch_transfer_status([123456789]) == -1
    # Registration: zero length, double registration, unknown address.
    assert te.register_memory(ctypes.addressof(raw), 0) < 0
    assert te.register_memory(ctypes.addressof(local), SIZE) < 0
    assert te.unregister_memory(ctypes.addressof(raw)) < 0
    assert te.batch_register_memory([ctypes.addressof(raw)], [64, 64]) < 0


def test_managed_buffers(te):
    addr = te.allocate_managed_buffer(4096)
    assert addr != 0
    assert te.write_bytes_to_buffer(addr, b"hello", 5) == 0
    assert te.read_bytes_from_buffer(addr, 5) == b"hello"
    assert te.write_bytes_to_buffer(addr + 4094, b"hello", 5) < 0  # past the end
    assert te.free_managed_buffer(addr, 4096) == 0
    assert te.free_managed_buffer(addr, 4096) < 0


def test_closed_or_uninitialized_engine():
    te = TransferEngine()
    assert te.register_memory(0x1000, 64) < 0
    assert "not initialized" in str(te.last_error())
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    te.close()
    assert te.transfer_sync_write("127.0.0.1:1", 0x1000, 0x1000, 1) < 0
    assert te.get_notifies() == []
