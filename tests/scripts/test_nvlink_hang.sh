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
source "$(dirname "$0")/lib.sh"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${gpus:-0}" -lt 2 ]; then
  echo "test_nvlink_hang: skipped (needs 2 GPUs, found ${gpus:-0})"
  exit 77
fi

SWITCHYARD_INJECT_FAULT=1:ep_layer_dispatch:hang run_timed timeout --kill-after=10 120 \
  "${mpi[@]}" -x SWITCHYARD_INJECT_FAULT -x NCCL_NVLS_ENABLE=0 \
  "$binary" bench ep --ep-transport nvlink --only layer --tokens 1024 --warmup 0 --iters 1 --timeout 5
expect_prompt_failure 40
expect_output "switchyard: rank 1 stops participating at ep_layer_dispatch" "rank 1 did not report the injected hang"
expect_output "switchyard: error: \[rank 0 on [^]]*\].*rank 0 waited more than 5.* for rank 1's 'dispatch' signal" \
  "no error line from rank 0 naming the 'dispatch' signal and rank 1"
report_output test_nvlink_hang
