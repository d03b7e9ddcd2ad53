"""pytest setup for the Python suite: the library, the import paths, the caches, and a
kvxfer store node.

Run it in the venv of scripts/python-env.sh (see .ci/run):

    $(scripts/python-env.sh)/bin/python -m pytest tests/python

The library is the debug cdylib that `cargo test` builds anyway (target/debug), built
here once if needed, unless KVXFER_LIB names another; it is put in KVXFER_LIB so every
subprocess a test starts loads the same file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON_DIR = REPO / "python"
COMPAT_DIR = PYTHON_DIR / "compat"
CACHE = REPO / "target" / "python-cache"


def _cargo(*args: str) -> None:
    subprocess.run(["cargo", "build", "--locked", "--quiet", *args], cwd=REPO, check=True)


if "KVXFER_LIB" not in os.environ:
    _cargo("--lib")
    os.environ["KVXFER_LIB"] = str(REPO / "target" / "debug" / "libkvxfer.so")

# SGLang, torch and friends write JIT builds and caches under $HOME by default; keep them
# in the build directory (set before SGLang is imported: it only fills in unset ones).
for var, sub in {
    "SGLANG_CACHE_DIR": "sglang",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
    "TRITON_CACHE_DIR": "triton",
    "XDG_CACHE_HOME": "xdg",
    "HF_HOME": "huggingface",
}.items():
    os.environ.setdefault(var, str(CACHE / sub))
# SGLang's JIT build runs `ninja`; the venv's pinned one is next to its interpreter.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Subprocesses import kvxfer and the harness the same way this process does.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PYTHON_DIR), str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
)
sys.path[:0] = [str(PYTHON_DIR), str(HERE)]


@pytest.fixture(scope="session")
def store_node():
    """A kvxfer_store_node process contributing 256 MiB on loopback; yields its session.
    It serves until its stdin closes, so it never outlives the test session."""
    _cargo("--example", "kvxfer_store_node")
    exe = REPO / "target" / "debug" / "examples" / "kvxfer_store_node"
    proc = subprocess.Popen(
        [str(exe), "--listen", "127.0.0.1:0", "--memory", "256MiB", "--transports", "shm,tcp"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline().split()  # "ready <session>", printed once it serves
    assert line[:1] == ["ready"], f"store node did not start: {line}"
    yield line[1]
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def run_python(args, timeout=180, **kwargs) -> subprocess.CompletedProcess:
    """Runs this interpreter on `args` with the suite's environment."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
