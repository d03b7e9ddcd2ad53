#!/usr/bin/env bash
# perftest baselines for the RDMA transport, in the soft-RoCE VM of ../shared/rdma-vm:
# ib_write_bw and ib_read_bw with 64 KiB messages, client on rxe1 -> server on rxe0
# (RoCE v2, GID index 1 = the IPv4-mapped GID), one RC QP, tx depth 128 (perftest's
# default), each for 5 s (`-D 5`: the average over the steady middle of the run, as a
# --duration bench measures; in perftest's iteration mode the average also takes in the
# ramp-up and the drain and comes out lower and noisier under TCG, READ most of all).
#
#   scripts/rdma-vm-baseline.sh [COMMAND [ARGS...]]
#
# Prints each client's result table and a summary line per test. A COMMAND runs after the
# baselines in the same VM boot (cwd = the repo root, shared at the same path), so that
# `kvxfer_bench pair --transport rdma` can be compared with numbers from the same run:
#
#   cargo build --release --example kvxfer_bench
#   scripts/rdma-vm-baseline.sh target/release/examples/kvxfer_bench pair --transport rdma \
#       --op write --block 64KiB --batch 128
#
# The VM is emulated (TCG): only ratios measured in one run mean anything, and bandwidth
# varies by about +-30 % between runs.
# Environment: RDMA_VM_DIR (default: ../shared/rdma-vm beside the repo); PERFTEST_ARGS
# (perftest flags for both sides instead of "-D 5", e.g. "-n 2000"); run.sh's RDMA_VM_*
# knobs (RDMA_VM_MTU=9000 for IB MTU 4096).
set -euo pipefail
start=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
VM_DIR=${RDMA_VM_DIR:-$ROOT/../shared/rdma-vm}
[[ -x $VM_DIR/run.sh ]] || { echo "rdma-vm-baseline: no $VM_DIR/run.sh (set RDMA_VM_DIR)" >&2; exit 2; }
if ! PATH=$PATH:/usr/sbin:/sbin command -v qemu-system-x86_64 >/dev/null ||
    ! PATH=$PATH:/usr/sbin:/sbin command -v debootstrap >/dev/null; then
    "$VM_DIR/setup-host.sh"
fi

# shellcheck disable=SC2016 # expanded in the guest
guest='
set -u
common="-d DEV -s 65536 -x 1 -F $PERFTEST_ARGS"
rc=0
bw() {   # TEST PORT
    local t=$1 port=$2 out i
    $t ${common/DEV/rxe0} -p "$port" >/tmp/$t.server 2>&1 &
    local srv=$!
    for i in $(seq 40); do   # the server needs a moment to listen (emulated CPU)
        sleep 0.5
        out=$($t ${common/DEV/rxe1} -p "$port" 10.77.0.1 2>&1) && break
        grep -q -i "connect" <<<"$out" || break
    done
    if ! wait "$srv" || ! grep -q "^ *65536 " <<<"$out"; then
        echo "---- $t failed; client:"; echo "$out"; echo "---- server:"; cat /tmp/$t.server
        rc=1; return
    fi
    echo "---- $t rxe1 -> rxe0, 64 KiB messages (server: $t ${common/DEV/rxe0} -p $port; client: $t ${common/DEV/rxe1} -p $port 10.77.0.1)"
    grep -E "^ *(#bytes|65536) " <<<"$out"
    awk -v t="$t" "/^ *65536 / { printf \"baseline: %s rxe1 -> rxe0 64 KiB: %s MiB/s average%s, %s iterations\\n\", t, \$4, (\$3 + 0 > 0 ? \" (peak \" \$3 \")\" : \"\"), \$2 }" <<<"$out" >>/tmp/summary
}
: >/tmp/summary
bw ib_write_bw 18515
bw ib_read_bw 18516
echo; cat /tmp/summary
if (($#)); then echo; echo "---- $*"; "$@" || rc=$?; fi
exit $rc
'
set +e
RDMA_VM_SHARE=$ROOT RDMA_VM_PASSENV="${RDMA_VM_PASSENV:-} PERFTEST_ARGS" PERFTEST_ARGS=${PERFTEST_ARGS-"-D 5"} \
    "$VM_DIR/run.sh" bash -c "$guest" baseline "$@"
rc=$?
set -e
case $rc in
    0) echo "rdma-vm-baseline: done in $((SECONDS - start)) s" >&2 ;;
    254 | 255) echo "rdma-vm-baseline: VM failed (run.sh exit $rc)" >&2 ;;
    *) echo "rdma-vm-baseline: FAILED (exit $rc) after $((SECONDS - start)) s" >&2 ;;
esac
exit "$rc"
