#!/usr/bin/env bash
# Whole-program test of the nvlink expert-parallel transport's hang detection (needs 2 GPUs with
# peer access; exits 77, skipped, elsewhere).
#
# Two ranks run `switchyard bench ep --ep-transport nvlink` with a 5 s collective timeout; rank 1
# stops participating inside the layer, after the count exchange and before it writes its rows
# (SWITCHYARD_INJECT_FAULT=1:ep_layer_dispatch:hang). Rank 0's device-side wait for rank 1's
# 'dispatch' signal must time out, and the job must end non-zero within about 40 s with an error
# line naming the signal and rank 1.
# Usage: test_nvlink_hang.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
binary=${1:?usage: test_nvlink_hang.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]}
mpiexec=${3:-mpirun}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${gpus:-0}" -lt 2 ]; then
  echo "test_nvlink_hang: skipped (needs 2 GPUs, found ${gpus:-0})"
  exit 77
fi
work_dir=$(mktemp -d)
trap 'rm -rf "$work_dir"' EXIT
cd "$work_dir"

start_ns=$(date +%s%N)
SWITCHYARD_INJECT_FAULT=1:ep_layer_dispatch:hang timeout --kill-after=10 120 \
  "$mpiexec" --allow-run-as-root --oversubscribe --bind-to none -np 2 -x SWITCHYARD_INJECT_FAULT -x NCCL_NVLS_ENABLE=0 \
  "$binary" bench ep --ep-transport nvlink --only layer --tokens 1024 --warmup 0 --iters 1 --timeout 5 \
  >output.log 2>&1
status=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
elapsed="$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))"

failures=()
[ "$status" -ne 0 ] || failures+=("mpirun exited 0: the hang was not detected")
[ "$status" -ne 124 ] && [ "$status" -ne 137 ] || failures+=("the job hung: killed by timeout after 120 s")
(( elapsed_ms < 40000 )) || failures+=("the job took ${elapsed} s (limit 40 s)")
grep -q "switchyard: rank 1 stops participating at ep_layer_dispatch" output.log ||
  failures+=("rank 1 did not report the injected hang")
grep -Eq "switchyard: error: \[rank 0 on [^]]*\].*rank 0 waited more than 5.* for rank 1's 'dispatch' signal" output.log ||
  failures+=("no error line from rank 0 naming the 'dispatch' signal and rank 1")

if [ ${#failures[@]} -gt 0 ]; then
  echo "test_nvlink_hang: FAILED (exit status $status, ${elapsed} s)"
  printf '  - %s\n' "${failures[@]}"
  echo "---- output ----"
  cat output.log
  exit 1
fi
echo "test_nvlink_hang: ok (exit status $status after ${elapsed} s)"
grep "switchyard: error:" output.log
