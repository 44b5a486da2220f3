#!/usr/bin/env bash
# Whole-program test: one failing rank ends the whole job promptly.
#
# Four ranks start `switchyard train --dry-run configs/tiny-cpu.yaml`; rank 1 throws right after
# bootstrap (SWITCHYARD_INJECT_FAULT=1:after_bootstrap, a testing aid of src/comm/bootstrap.h). Its
# error path must MPI_Abort the job: mpirun returns (so every rank has exited) non-zero within
# 30 s, far below the 60 s collective timeout the other ranks run with, and the error line names
# rank 1 and the fault.
# Usage: test_failing_rank.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
binary=${1:?usage: test_failing_rank.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]}
source_dir=${2:?source dir}
mpiexec=${3:-mpirun}
limit_seconds=30

work_dir=$(mktemp -d)
trap 'rm -rf "$work_dir"' EXIT
cd "$work_dir"  # the run's data, run directory and logs stay out of the source tree
# tiny-cpu.yaml reads data/tiny/{train,val}.bin relative to the working directory.
if ! "$binary" prepare-data --output data/tiny/train.bin --val-output data/tiny/val.bin "$source_dir/src/comm" \
    >prepare.log 2>&1; then
  echo "$(basename "$0"): FAILED: could not prepare token files"; cat prepare.log; exit 1
fi

start_ns=$(date +%s%N)
SWITCHYARD_INJECT_FAULT=1:after_bootstrap timeout --kill-after=10 120 \
  "$mpiexec" --allow-run-as-root --oversubscribe --bind-to none -np 4 -x SWITCHYARD_INJECT_FAULT \
  "$binary" train --dry-run "$source_dir/configs/tiny-cpu.yaml" --set parallel.collective_timeout_s=60 \
  >output.log 2>&1
status=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
elapsed="$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))"

failures=()
[ "$status" -ne 0 ] || failures+=("mpirun exited 0: the injected failure did not fail the job")
[ "$status" -ne 124 ] && [ "$status" -ne 137 ] || failures+=("the job hung: killed by timeout after 120 s")
(( elapsed_ms < limit_seconds * 1000 )) || failures+=("the job took ${elapsed} s (limit ${limit_seconds} s)")
grep -Eq "switchyard: error: \[rank 1 on [^]]*\] injected fault at after_bootstrap" output.log ||
  failures+=("no error line naming rank 1 and the injected fault")

if [ ${#failures[@]} -gt 0 ]; then
  echo "test_failing_rank: FAILED (exit status $status, ${elapsed} s)"
  printf '  - %s\n' "${failures[@]}"
  echo "---- output ----"
  cat output.log
  exit 1
fi
echo "test_failing_rank: ok (exit status $status after ${elapsed} s)"
grep "switchyard: error:" output.log
