"""PD disaggregation: SGLang's MooncakeKVManager (prefill) sends KV pages to another
process through `mooncake.engine` = python/compat (kvxfer); the receiving process checks
every byte of its pool (see pd_roles.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import COMPAT_DIR, HERE

ROLES = str(HERE / "pd_roles.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mooncake_kv_manager_sends_through_kvxfer():
    env = dict(os.environ, PYTHONPATH=f"{COMPAT_DIR}{os.pathsep}{os.environ['PYTHONPATH']}")
    decode = subprocess.Popen([sys.executable, ROLES, "decode"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        info = json.loads(decode.stdout.readline())
        assert info["engine"] == "kvxfer.engine"
        # Scattered, partly contiguous pages on both sides, as a real request's are.
        src_pages = [1, 2, 3, 10, 11, 40, 41, 42, 43, 63]
        dst_pages = [5, 6, 7, 20, 30, 31, 32, 33, 50, 0]
        spec = dict(session=info["session"], ptrs=info["ptrs"], src_pages=src_pages, dst_pages=dst_pages,
                    seed=7, bootstrap_port=free_port())
        prefill = subprocess.run([sys.executable, ROLES, "prefill", json.dumps(spec)], capture_output=True, text=True,
                                 timeout=180, env=env)
        assert prefill.returncode == 0, prefill.stderr[-3000:]
        sent = json.loads(prefill.stdout.strip().splitlines()[-1])
        assert sent["ret"] == 0
        assert sent["engine"] == "kvxfer.engine.TransferEngine"
        assert sent["probe"] == 0
        # 10 pages x 3 layers x (K, V) x 128 bytes, all in batches that completed.
        assert sent["stats"]["bytes_moved"] == 10 * 3 * 2 * 128
        assert sent["stats"]["batches_failed"] == 0

        decode.stdin.write(json.dumps(spec) + "\n")
        decode.stdin.flush()
        verdict = json.loads(decode.stdout.readline())
        assert verdict["checked_pages"] == 64 * 6
        assert verdict["n_bad"] == 0, verdict
    finally:
        decode.stdin.close()
        decode.wait(timeout=30)
