#!/usr/bin/env bash
# Creates (once) and prints the path of the Python venv the SGLang-driven tests run in.
#
#   venv=$(scripts/python-env.sh)   # progress on stderr, the venv path alone on stdout
#
# The venv holds exactly the pins of tests/python/requirements.txt (installed with
# --no-deps, so nothing unpinned sneaks in) and lives in a cache directory keyed by a hash
# of that file and the interpreter: ${KVXFER_CACHE_DIR:-$HOME/.cache/kvxfer}/py-<hash>.
# A venv whose pins are unchanged is reused as it is (about 4.5 GiB, most of it torch's
# CUDA libraries, which its PyPI wheel needs even to import on a machine without a GPU);
# a changed file makes a new one. It is marked complete only once it imports, so an
# interrupted build is never reused.
#
# SGLang JIT-compiles its page hash (C++ with OpenSSL) on first use: g++ and the OpenSSL
# headers come from Debian here when missing; ninja is pinned in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${KVXFER_PYTHON:-python3}
req=tests/python/requirements.txt
# sglang==0.5.23 ships CPython 3.11 wheels only.
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "python-env: $python is $("$python" -V 2>&1); the pinned SGLang wheel needs Python 3.11 (set KVXFER_PYTHON)" >&2
    exit 1
fi

missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)
[ -f /usr/include/openssl/sha.h ] || missing+=(libssl-dev)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
# Debian's python3 makes venvs (with pip) only with python3-venv installed.
"$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "python-env: installing ${missing[*]}" >&2
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >&2
fi

hash=$( { cat "$req"; "$python" -VV; } | sha256sum | cut -c1-16)
cache=${KVXFER_CACHE_DIR:-$HOME/.cache/kvxfer}
venv=$cache/py-$hash
if [ -f "$venv/.complete" ]; then
    echo "python-env: reusing $venv" >&2
    echo "$venv"
    exit 0
fi

mkdir -p "$cache"
# One builder at a time (two CI jobs, or a developer and CI, may start together); the
# second finds the venv complete once it gets the lock.
exec 9>"$cache/.py-$hash.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
    # A venv's scripts name its own path, so it is built where it stays; one without
    # .complete is a build that did not finish and is started again.
    rm -rf "$venv"
    echo "python-env: creating $venv (pip install --no-deps -r $req)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$req" >&2
    # Kept only if what the tests import imports (no GPU, no network needed).
    (cd / && "$venv/bin/python" -W ignore -c '
import sys, torch, pytest
import sglang.srt.managers.cache_controller
import sglang.srt.disaggregation.mooncake.conn
print("python-env: torch", torch.__version__, "and SGLang import", file=sys.stderr)
')
    touch "$venv/.complete"
fi
echo "$venv"
