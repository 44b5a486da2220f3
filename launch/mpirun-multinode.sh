#!/usr/bin/env bash
# Training on several nodes with Open MPI's mpirun and a hostfile (no SLURM).
#
#   bash launch/mpirun-multinode.sh HOSTFILE CONFIG.yaml [switchyard train arguments...]
#   bash launch/mpirun-multinode.sh launch/hostfile.example configs/sotu-ep4.yaml --set parallel.ep_size=16
#
# One rank per slot (GPU), ranks filled node by node, so the node-local rank picks the GPU
# (src/comm/bootstrap.h). Resumes from the newest complete checkpoint (--resume auto).
# Stopping cleanly: SIGTERM or Ctrl-C to this script becomes SIGUSR1 to mpirun, which forwards it
# to every rank: they finish the step, save a checkpoint and exit 0, and so does this script.
# (SIGTERM sent to mpirun itself also reaches the ranks, which save, but mpirun then reports
# failure; a second Ctrl-C here ends the job at once.)
#
# Requirements: the same binary path on every node (SWITCHYARD_BIN, default: this checkout's
# build/switchyard), passwordless ssh between the nodes, checkpoint.dir and logging.run_dir on a
# shared file system. Environment: MPIRUN (default mpirun), MPIRUN_ARGS (extra mpirun flags, e.g.
# "--mca btl_tcp_if_include eth0"), NCCL_SOCKET_IFNAME / NCCL_IB_HCA as your network needs (every
# NCCL_* variable set here is passed to the ranks).
set -uo pipefail

hostfile="${1:?usage: mpirun-multinode.sh HOSTFILE CONFIG.yaml [switchyard train arguments...]}"
config="${2:?usage: mpirun-multinode.sh HOSTFILE CONFIG.yaml [switchyard train arguments...]}"
shift 2
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="${SWITCHYARD_BIN:-$root/build/switchyard}"
[ -f "$hostfile" ] || { echo "mpirun-multinode: no hostfile '$hostfile'" >&2; exit 2; }
[ -x "$binary" ] || { echo "mpirun-multinode: $binary is not built (or set SWITCHYARD_BIN)" >&2; exit 2; }

# Ranks = the sum of the slots (a host without slots= counts 1).
ranks=$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, kv, "="); n = kv[2] } total += n }
             END { print total + 0 }' "$hostfile")
[ "$ranks" -gt 0 ] || { echo "mpirun-multinode: '$hostfile' lists no hosts" >&2; exit 2; }

export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
forward=(-x PATH -x LD_LIBRARY_PATH)
for name in $(compgen -e | grep -E '^(NCCL_|SWITCHYARD_)'); do forward+=(-x "$name"); done
flags=(--hostfile "$hostfile" -np "$ranks" --map-by slot --bind-to none "${forward[@]}")
if [ "$(id -u)" -eq 0 ]; then flags+=(--allow-run-as-root); fi
# shellcheck disable=SC2206
extra=(${MPIRUN_ARGS:-})

echo "mpirun-multinode: $ranks ranks from $hostfile"
"${MPIRUN:-mpirun}" "${flags[@]}" "${extra[@]+"${extra[@]}"}" "$binary" train "$config" --resume auto "$@" &
launcher=$!
stopping=0
stop() {
  if [ "$stopping" -eq 0 ]; then
    stopping=1
    echo "mpirun-multinode: stopping: the ranks finish their step and save a checkpoint (again to abort)" >&2
    kill -USR1 "$launcher" 2>/dev/null
  else
    kill -TERM "$launcher" 2>/dev/null
  fi
}
trap stop TERM INT
status=0
while :; do
  wait "$launcher"
  status=$?
  kill -0 "$launcher" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done
echo "mpirun-multinode: exit status $status"
exit "$status"
