#!/usr/bin/env bash
# The SWITCHYARD_* switches (src/core/switches.h) are parsed once at start-up, before any
# subcommand runs:
#   1. a bad value ends `train --dry-run` with exit 2 and an error naming the variable, the value
#      and the choices, before the config is even read (a missing config is not what is reported)
#      and before set-up writes anything (also under mpirun -np 2); the same call with good values
#      exits 0;
#   2. the run header of `train` prints every switch with its resolved value (set, empty, unset).
# Usage: test_switches.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
source "$(dirname "$0")/lib.sh"
# The checks below set what they need; switches left in the caller's environment would blur them.
unset SWITCHYARD_ATTENTION SWITCHYARD_GROUPED_GEMM SWITCHYARD_FUSED_ACTIVATION SWITCHYARD_SM90_GEMM \
  SWITCHYARD_SM90_STORE SWITCHYARD_SM90_SCHEDULE SWITCHYARD_SM90_MULTICAST SWITCHYARD_SM90_SKIP_PADDING \
  SWITCHYARD_NCCL_BLOCKING SWITCHYARD_SMALL_BATCH_TOKENS

awk 'BEGIN { srand(3); for (i = 0; i < 4000; i++) printf "%c%s", 97 + int(rand() * 12), (rand() < 0.2 ? " " : "") }' \
  >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" >/dev/null 2>&1 ||
  { echo "FAIL: prepare-data"; exit 1; }
config="$source_dir/configs/tiny-cpu.yaml"
common=(--set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin" --set training.eval_every=0)

# ---- 1. bad values exit 2 at start-up ----------------------------------------------------------
timeout 120 "$binary" train "$config" "${common[@]}" --set "logging.run_dir=$work/good" --dry-run \
  >"$work/good.log" 2>&1 || { fail "the dry run with default switches failed"; cat "$work/good.log" >&2; }
[ -e "$work/good" ] || fail "the dry run wrote no run directory, so 'set-up wrote nothing' below would prove nothing"

# expect_rejected ASSIGNMENT NEEDLE...: `train --dry-run` under ASSIGNMENT exits 2, its error line
# holds every NEEDLE, and set-up wrote nothing.
expect_rejected() {
  local assignment="$1" run_dir="$work/rejected" failures_before=$failures
  shift
  rm -rf "$run_dir"
  timeout 60 env "$assignment" "$binary" train "$config" "${common[@]}" --set "logging.run_dir=$run_dir" --dry-run \
    >"$work/rejected.log" 2>&1
  local status=$?
  [ "$status" -eq 2 ] || fail "$assignment: exit $status, expected 2"
  for needle in "$@"; do
    grep -qF -- "$needle" <(grep "switchyard: error:" "$work/rejected.log") ||
      fail "$assignment: the error does not name \"$needle\""
  done
  [ ! -e "$run_dir" ] || fail "$assignment: set-up ran (wrote $run_dir) before the switch was checked"
  [ "$failures" -eq "$failures_before" ] || { cat "$work/rejected.log" >&2; return; }
  echo "ok: $assignment -> exit 2: $(grep -m1 'switchyard: error:' "$work/rejected.log")"
}
expect_rejected SWITCHYARD_SM90_GEMM=bogus SWITCHYARD_SM90_GEMM "got 'bogus'" "'pipelined', 'basic'"
expect_rejected SWITCHYARD_SMALL_BATCH_TOKENS=-3 SWITCHYARD_SMALL_BATCH_TOKENS "got '-3'" "non-negative integer"
expect_rejected SWITCHYARD_SHARED_EXPERT_STREAM=yes SWITCHYARD_SHARED_EXPERT_STREAM "got 'yes'" "'1', '0'"
expect_rejected SWITCHYARD_ATTENTION=cuDNN SWITCHYARD_ATTENTION "got 'cuDNN'" \
  "'auto', 'cudnn', 'cudnn-nondeterministic', 'cublas'"
expect_rejected SWITCHYARD_NCCL_BLOCKING=yes SWITCHYARD_NCCL_BLOCKING "got 'yes'" "'1', '0'"

# The switches come before the config: a missing config file is not what gets reported.
timeout 60 env SWITCHYARD_SM90_STORE=fast "$binary" train "$work/no-such-config.yaml" --dry-run >"$work/order.log" 2>&1
status=$?
if [ "$status" -eq 2 ] && grep -q "switchyard: error: .*SWITCHYARD_SM90_STORE" "$work/order.log"; then
  echo "ok: a bad switch is reported before a missing config"
else
  fail "a bad switch with a missing config: exit $status, expected 2 naming SWITCHYARD_SM90_STORE"
  cat "$work/order.log" >&2
fi

# Under mpirun every rank stops the same way, and so does the job.
timeout 120 env SWITCHYARD_SM90_GEMM=bogus "${mpi[@]}" -x SWITCHYARD_SM90_GEMM "$binary" train "$config" \
  "${common[@]}" --set "logging.run_dir=$work/mpi" --dry-run >"$work/mpi.log" 2>&1
status=$?
if [ "$status" -eq 2 ] && grep -q "switchyard: error: .*SWITCHYARD_SM90_GEMM" "$work/mpi.log"; then
  echo "ok: under ${mpi[*]:0:3}: exit 2"
else
  fail "under ${mpi[*]:0:3}: exit $status, expected 2 naming SWITCHYARD_SM90_GEMM"
  cat "$work/mpi.log" >&2
fi

# ---- 2. the run header shows the resolved values ------------------------------------------------
timeout 120 env SWITCHYARD_SM90_STORE=tma SWITCHYARD_SMALL_BATCH_TOKENS=0 SWITCHYARD_ATTENTION= \
  "$binary" train "$config" "${common[@]}" --set training.steps=1 --set optimizer.warmup_steps=1 \
  --set "logging.run_dir=$work/run" --set "checkpoint.dir=$work/run/ckpt" >"$work/train.log" 2>&1 ||
  fail "the one-step run failed"
header="$(grep "^switchyard train: switches:" "$work/train.log")"
if [ -z "$header" ]; then
  fail "the run header has no switches line"
  cat "$work/train.log" >&2
else
  for expected in SWITCHYARD_SM90_STORE=tma SWITCHYARD_SMALL_BATCH_TOKENS=0 SWITCHYARD_ATTENTION=auto \
                  SWITCHYARD_GROUPED_GEMM=auto SWITCHYARD_FUSED_ACTIVATION=1 SWITCHYARD_SM90_GEMM=pipelined \
                  SWITCHYARD_SM90_SCHEDULE=auto SWITCHYARD_SM90_MULTICAST=auto SWITCHYARD_SM90_SKIP_PADDING=1 \
                  SWITCHYARD_NCCL_BLOCKING=1; do
    grep -qF " $expected " <<<"$header " || fail "the header does not show $expected: $header"
  done
  echo "ok: $header"
fi

summarize_and_exit "switch checks"
