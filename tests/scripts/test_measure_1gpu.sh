#!/usr/bin/env bash
# launch/measure-1gpu.sh's command line (the measurements themselves need a GPU): --help describes
# every part; bad arguments exit 2 naming what is wrong and write nothing; on a machine without a
# GPU it exits 2 saying so, before building anything.
# Usage: test_measure_1gpu.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
source "$(dirname "$0")/lib.sh"
script="$source_dir/launch/measure-1gpu.sh"

bash "$script" --help >"$work/help.log" 2>&1 || fail "--help exited $?"
for part in build tests routing ncu layer profile large stream determinism microbatch anchor; do
  grep -q "$part" "$work/help.log" || fail "--help does not name the part '$part'"
done

expect_bad() {  # expect_bad NEEDLE ARGUMENTS...: exit 2, the message names NEEDLE, no OUT written
  local needle="$1"
  shift
  bash "$script" --out "$work/out" "$@" >"$work/bad.log" 2>&1
  local status=$?
  [ "$status" -eq 2 ] || fail "$*: exit $status, expected 2: $(cat "$work/bad.log")"
  grep -qF -- "$needle" "$work/bad.log" || fail "$*: the message does not name '$needle': $(cat "$work/bad.log")"
  [ ! -e "$work/out" ] || fail "$*: wrote $work/out before rejecting its arguments"
}
expect_bad "unknown argument '--bogus'" --bogus
expect_bad "unknown part 'foo'" --only build,foo
expect_bad "--budget needs a whole number" --budget soon
expect_bad "holds no torch_train_bench.py" --anchors "$work"

if nvidia-smi >/dev/null 2>&1; then
  echo "a GPU is present: the no-GPU exit is not checked here"
else
  bash "$script" --out "$work/out" >"$work/nogpu.log" 2>&1
  status=$?
  [ "$status" -eq 2 ] || fail "without a GPU: exit $status, expected 2"
  grep -q "needs a GPU" "$work/nogpu.log" || fail "without a GPU: the message does not say so: $(cat "$work/nogpu.log")"
fi
summarize_and_exit "measure-1gpu script tests"
