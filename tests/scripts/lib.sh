# Shared set-up of the whole-program test scripts; `source` it after `set -u`.
# Every script takes SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC] first (further arguments are its own).
# Defines: binary, source_dir, mpiexec; work, a temporary directory removed at exit (a script with
# its own EXIT trap must remove it there); failures and fail MESSAGE; mpi_flags (what mpirun needs
# on these machines: oversubscription for 2-core CI, root in containers) and mpi (2 ranks);
# summarize_and_exit WHAT, which prints the summary and exits non-zero after any failure.
binary="$1"
source_dir="$2"
mpiexec="${3:-mpirun}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0
fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}
mpi_flags=(--oversubscribe --bind-to none)
if [ "$(id -u)" -eq 0 ]; then mpi_flags+=(--allow-run-as-root); fi
mpi=("$mpiexec" -np 2 "${mpi_flags[@]}")
summarize_and_exit() {
  if [ "$failures" -ne 0 ]; then
    echo "$failures failure(s)" >&2
    exit 1
  fi
  echo "all $1 passed"
}
# run_timed COMMAND...: runs it from $work with its output in $work/output.log; sets status,
# elapsed_ms and elapsed (seconds, text).
run_timed() {
  local start_ns
  start_ns=$(date +%s%N)
  (cd "$work" && "$@") >"$work/output.log" 2>&1
  status=$?
  elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
  elapsed="$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))"
}
# expect_prompt_failure LIMIT_SECONDS: the job run_timed ran failed (non-zero), was not killed by
# the `timeout` around it (124, 137: a hang) and ended within LIMIT_SECONDS.
expect_prompt_failure() {
  [ "$status" -ne 0 ] || fail "the job exited 0: the failure was not detected"
  { [ "$status" -ne 124 ] && [ "$status" -ne 137 ]; } || fail "the job hung: killed by timeout"
  (( elapsed_ms < $1 * 1000 )) || fail "the job took ${elapsed} s (limit $1 s)"
}
# expect_output PATTERN MESSAGE: fail with MESSAGE unless output.log matches the extended regex.
expect_output() {
  grep -Eq "$1" "$work/output.log" || fail "$2"
}
# report_output WHAT: on failure the whole output, else its error lines; then summarize_and_exit.
report_output() {
  if [ "$failures" -ne 0 ]; then
    echo "$1: exit status $status after ${elapsed} s; output:" >&2
    cat "$work/output.log" >&2
  else
    echo "$1: exit status $status after ${elapsed} s"
    grep "switchyard: error:" "$work/output.log"
  fi
  summarize_and_exit "$1 checks"
}
