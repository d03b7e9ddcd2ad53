#!/usr/bin/env bash
# Run the RDMA tests on real soft-RoCE verbs (rxe0, rxe1) in the throw-away QEMU VM of
# ../shared/rdma-vm, all test binaries in one boot.
#
#   scripts/rdma-vm-test.sh [FILTER...] [LIBTEST OPTION...]
#
# Builds the test executables (`cargo test --no-run`, debug profile), picks the lib
# unit-test binary (run with the filters `sys::verbs transport::rdma`) and every
# integration test binary named `rdma*` or `verbs_layout` (run unfiltered), writes
# target/rdma-vm/run-tests.sh that runs them one after the other, and runs that in the VM
# (RDMA_VM=1 there; tests that need devices skip themselves elsewhere).
#
# FILTERs replace the lib binary's default filters and are given to every integration
# binary as well; options (`--nocapture`, `--exact`, `--skip NAME`, `--test-threads N`, ...)
# go to every binary. Tests run one at a time (`--test-threads=1`) unless told otherwise:
# they share the two devices, and some take a link down under the others.
#
# Exit status: 0 all passed; 1 a test binary failed; 2 setup or build failed;
# 254/255 the VM failed (guest setup / crash or timeout), reported as "VM failed".
#
# Environment: RDMA_VM_DIR (default: ../shared/rdma-vm beside the repo),
# RDMA_VM_TEST_TIMEOUT (seconds per test binary in the guest, default 600),
# RDMA_VM_TIMEOUT (whole VM, default here 1200), and run.sh's RDMA_VM_* knobs.
set -euo pipefail
start=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
say() { echo "rdma-vm-test: $*" >&2; }

VM_DIR=${RDMA_VM_DIR:-$ROOT/../shared/rdma-vm}
if [[ ! -x $VM_DIR/run.sh ]]; then
    say "no $VM_DIR/run.sh (the soft-RoCE VM kit belongs in ../shared/rdma-vm beside the repo; or set RDMA_VM_DIR)"
    exit 2
fi
VM_DIR=$(cd "$VM_DIR" && pwd -P)

# ---- 1. host tools (qemu, debootstrap for the one-time image build) ----------------------
if ! PATH=$PATH:/usr/sbin:/sbin command -v qemu-system-x86_64 >/dev/null ||
    ! PATH=$PATH:/usr/sbin:/sbin command -v debootstrap >/dev/null; then
    say "installing the VM's host tools ($VM_DIR/setup-host.sh)"
    "$VM_DIR/setup-host.sh" || { say "setup-host.sh failed"; exit 2; }
fi

# ---- 2. arguments: filters vs. libtest options -------------------------------------------
filters=() opts=() threads_given=0
while (($#)); do
    case $1 in
        --skip | --test-threads | --format | --color | --logfile | --shuffle-seed | -Z)
            (($# >= 2)) || { say "$1 needs a value"; exit 2; }
            [[ $1 == --test-threads ]] && threads_given=1
            opts+=("$1" "$2"); shift 2; continue ;;
        --test-threads=*) threads_given=1; opts+=("$1") ;;
        -*) opts+=("$1") ;;
        *) filters+=("$1") ;;
    esac
    shift
done
((threads_given)) || opts+=(--test-threads=1)

# ---- 3. build the test executables and pick ours -----------------------------------------
if command -v python3 >/dev/null; then
    pick() {
        python3 -c '
import json, sys
seen = set()
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("profile", {}).get("test") or not m.get("executable"):
        continue
    t = m["target"]
    if "test" in t["kind"]:
        if not (t["name"].startswith("rdma") or t["name"] == "verbs_layout"):
            continue
        kind = "test"
    elif any(k in ("lib", "rlib", "dylib", "cdylib", "staticlib") for k in t["kind"]):
        kind = "lib"
    else:
        continue
    if m["executable"] not in seen:
        seen.add(m["executable"])
        print(kind, t["name"], m["executable"], sep="\t")
'
    }
elif command -v jq >/dev/null; then
    pick() {
        jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null)
            | (if (.target.kind | index("test")) then
                 (if (.target.name | startswith("rdma")) or .target.name == "verbs_layout" then "test" else empty end)
               elif ([.target.kind[] | select(. == "lib" or . == "rlib" or . == "dylib" or . == "cdylib" or . == "staticlib")] | length > 0) then "lib"
               else empty end) as $k
            | [$k, .target.name, .executable] | @tsv' | awk '!seen[$3]++'
    }
else
    say "needs python3 or jq to read cargo's JSON (apt-get install python3-minimal)"
    exit 2
fi

tb=$SECONDS
json=$(cargo test --locked --no-run --message-format=json-render-diagnostics) || {
    say "build failed (cargo test --no-run)"; exit 2; }
list=$(pick <<<"$json")
target_dir=$(cargo metadata --locked --no-deps --format-version 1 | { if command -v python3 >/dev/null; then
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'; else jq -r .target_directory; fi; })
build_s=$((SECONDS - tb))

lib=() tests=()
while IFS=$'\t' read -r kind name exe; do
    [[ -n $kind ]] || continue
    if [[ $kind == lib ]]; then lib+=("$name" "$exe"); else tests+=("$name"$'\t'"$exe"); fi
done <<<"$list"
((${#lib[@]} == 2)) || { say "expected one lib unit-test binary, found $((${#lib[@]} / 2))"; exit 2; }
mapfile -t tests < <(printf '%s\n' "${tests[@]}" | LC_ALL=C sort)

# ---- 4. what the guest runs ---------------------------------------------------------------
# The VM shares one host directory at the same absolute path; it must hold the repo (tests
# find fixtures through CARGO_MANIFEST_DIR) and the target dir (CARGO_TARGET_DIR may point
# elsewhere): share their deepest common ancestor. Paths in the script are relative to the
# repo root, the guest's cwd (cargo runs tests there too).
target_dir=$(mkdir -p "$target_dir" && cd "$target_dir" && pwd -P)
share=$ROOT
while [[ $target_dir != "$share" && $target_dir != "$share"/* ]]; do share=$(dirname "$share"); done
if [[ $share == / ]]; then
    say "the repo ($ROOT) and the target dir ($target_dir) share no directory but /: put the target dir under the repo"
    exit 2
fi
rel() { realpath -m --relative-to="$ROOT" "$1"; }
lib_filters=("${filters[@]}")
((${#filters[@]})) || lib_filters=(sys::verbs transport::rdma)

out=$target_dir/rdma-vm
mkdir -p "$out"
script=$out/run-tests.sh
{
    echo '#!/bin/bash'
    echo '# Written by scripts/rdma-vm-test.sh; runs inside the soft-RoCE VM, cwd = the repo root.'
    echo 'export CARGO_MANIFEST_DIR=$PWD'
    printf 'limit=%q\n' "${RDMA_VM_TEST_TIMEOUT:-600}"
    cat <<'EOF'
failed=() n=0
run() {   # NAME BINARY ARGS...
    local name=$1 t0=$SECONDS rc; shift
    n=$((n + 1))
    echo "======== rdma-vm: $name: ${*@Q}"
    if [ ! -x "$1" ]; then
        echo "rdma-vm: $1 missing"; rc=127
    else
        timeout -k 10 "$limit" "$@"; rc=$?
        [ $rc -eq 124 ] && echo "rdma-vm: $name: still running after ${limit}s, killed"
    fi
    echo "======== rdma-vm: $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
    echo
    [ $rc -eq 0 ] || failed+=("$name")
}
echo "rdma-vm: kernel $(uname -r), verbs devices: $(ls /sys/class/infiniband 2>/dev/null | tr '\n' ' ')"
EOF
    printf 'run %q' "lib (${lib[0]})"; printf ' %q' "$(rel "${lib[1]}")" "${lib_filters[@]}" "${opts[@]}"; echo
    for t in "${tests[@]}"; do
        printf 'run %q' "${t%%$'\t'*}"; printf ' %q' "$(rel "${t#*$'\t'}")" "${filters[@]}" "${opts[@]}"; echo
    done
    cat <<'EOF'
if ((${#failed[@]})); then
    echo "rdma-vm: ${#failed[@]} of $n test binaries FAILED: ${failed[*]}"
    exit 1
fi
echo "rdma-vm: all $n test binaries passed"
EOF
} >"$script.tmp"
mv "$script.tmp" "$script"

# ---- 5. one VM boot -----------------------------------------------------------------------
say "$((1 + ${#tests[@]})) test binaries (lib: ${lib_filters[*]}; ${#tests[@]} integration), built in ${build_s} s; booting the VM"
tv=$SECONDS
set +e
RDMA_VM_SHARE=$share RDMA_VM_TIMEOUT=${RDMA_VM_TIMEOUT:-1200} "$VM_DIR/run.sh" bash "$(rel "$script")"
rc=$?
set -e
times="build ${build_s} s, VM $((SECONDS - tv)) s, total $((SECONDS - start)) s"
case $rc in
    0) say "passed ($times)" ;;
    1) say "TESTS FAILED ($times)" ;;
    254) say "VM failed: guest setup failed, no test ran ($times)" ;;
    255) say "VM failed: the VM died or timed out ($times)" ;;
    *) say "VM failed: run.sh exited $rc ($times)" ;;
esac
exit "$rc"
