#!/usr/bin/env bash
# Whole-program test: a rank that hangs is detected by the collective timeout.
#
# Four ranks start `switchyard train --dry-run configs/tiny-cpu.yaml` with a 5 s collective
# timeout; rank 1 stops participating right after bootstrap
# (SWITCHYARD_INJECT_FAULT=1:after_bootstrap:hang, a testing aid of src/comm/bootstrap.h). The others
# must time out in their next collective, print an error naming the collective, the
# communicator and the 5 s limit, and abort the job: mpirun returns non-zero within about 30 s.
# Usage: test_hang_timeout.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
source "$(dirname "$0")/lib.sh"
timeout_seconds=5

# tiny-cpu.yaml reads data/tiny/{train,val}.bin relative to the working directory ($work).
if ! (cd "$work" && "$binary" prepare-data --output data/tiny/train.bin --val-output data/tiny/val.bin \
      "$source_dir/src/comm") >"$work/prepare.log" 2>&1; then
  echo "test_hang_timeout: FAILED: could not prepare token files"; cat "$work/prepare.log"; exit 1
fi

SWITCHYARD_INJECT_FAULT=1:after_bootstrap:hang run_timed timeout --kill-after=10 120 \
  "$mpiexec" -np 4 "${mpi_flags[@]}" -x SWITCHYARD_INJECT_FAULT \
  "$binary" train --dry-run "$source_dir/configs/tiny-cpu.yaml" \
  --set parallel.collective_timeout_s=$timeout_seconds
expect_prompt_failure 30
(( elapsed_ms >= timeout_seconds * 1000 - 500 )) ||
  fail "the job ended after ${elapsed} s, before the ${timeout_seconds} s timeout could have fired"
expect_output "switchyard: rank 1 stops participating at after_bootstrap" "rank 1 did not report the injected hang"
expect_output "switchyard: error: \[rank [023] on [^]]*\] collective [a-z_]+[^']* on communicator '[a-z_]+' timed out after $timeout_seconds s" \
  "no error line from a waiting rank naming the timed-out collective and communicator"
report_output test_hang_timeout
