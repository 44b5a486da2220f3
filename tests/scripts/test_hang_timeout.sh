#!/usr/bin/env bash
# Whole-program test: a rank that hangs is detected by the collective timeout.
#
# Four ranks start `switchyard train --dry-run configs/tiny-cpu.yaml` with a 5 s collective
# timeout; rank 1 stops participating right after bootstrap
# (SWITCHYARD_INJECT_FAULT=1:after_bootstrap:hang, a testing aid of comm/bootstrap.h). The others
# must time out in their next collective, print an error naming the collective, the
# communicator and the 5 s limit, and abort the job: mpirun returns non-zero within about 30 s.
# Usage: test_hang_timeout.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
binary=${1:?usage: test_hang_timeout.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]}
source_dir=${2:?source dir}
mpiexec=${3:-mpirun}
timeout_seconds=5
limit_seconds=30

work_dir=$(mktemp -d)
trap 'rm -rf "$work_dir"' EXIT
cd "$work_dir"  # the run's data, run directory and logs stay out of the source tree
# tiny-cpu.yaml reads data/tiny/{train,val}.bin relative to the working directory.
if ! "$binary" prepare-data --output data/tiny/train.bin --val-output data/tiny/val.bin "$source_dir/comm" \
    >prepare.log 2>&1; then
  echo "$(basename "$0"): FAILED: could not prepare token files"; cat prepare.log; exit 1
fi

start_ns=$(date +%s%N)
SWITCHYARD_INJECT_FAULT=1:after_bootstrap:hang timeout --kill-after=10 120 \
  "$mpiexec" --allow-run-as-root --oversubscribe --bind-to none -np 4 -x SWITCHYARD_INJECT_FAULT \
  "$binary" train --dry-run "$source_dir/configs/tiny-cpu.yaml" \
  --set parallel.collective_timeout_s=$timeout_seconds >output.log 2>&1
status=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
elapsed="$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))"

failures=()
[ "$status" -ne 0 ] || failures+=("mpirun exited 0: the hang was not detected")
[ "$status" -ne 124 ] && [ "$status" -ne 137 ] || failures+=("the job hung: killed by timeout after 120 s")
(( elapsed_ms < limit_seconds * 1000 )) || failures+=("the job took ${elapsed} s (limit ${limit_seconds} s)")
(( elapsed_ms >= timeout_seconds * 1000 - 500 )) ||
  failures+=("the job ended after ${elapsed} s, before the ${timeout_seconds} s timeout could have fired")
grep -q "switchyard: rank 1 stops participating at after_bootstrap" output.log ||
  failures+=("rank 1 did not report the injected hang")
grep -Eq "switchyard: error: \[rank [023] on [^]]*\] collective [a-z_]+[^']* on communicator '[a-z_]+' timed out after $timeout_seconds s" output.log ||
  failures+=("no error line from a waiting rank naming the timed-out collective and communicator")

if [ ${#failures[@]} -gt 0 ]; then
  echo "test_hang_timeout: FAILED (exit status $status, ${elapsed} s)"
  printf '  - %s\n' "${failures[@]}"
  echo "---- output ----"
  cat output.log
  exit 1
fi
echo "test_hang_timeout: ok (exit status $status after ${elapsed} s)"
grep "switchyard: error:" output.log
