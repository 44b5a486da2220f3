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
