#!/usr/bin/env bash
#SBATCH --job-name=switchyard
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# SLURM batch script: one switchyard rank per GPU, started by srun, resuming from the newest
# complete checkpoint, saving one before the time limit. Edit the #SBATCH lines for your cluster
# (or override them: sbatch --nodes=4 ...).
#
#   sbatch launch/sbatch-train.sh CONFIG.yaml [switchyard train arguments...]
#   sbatch launch/sbatch-train.sh configs/sotu-ep4.yaml --set parallel.ep_size=16
#
# What happens around the time limit and preemption:
#   --signal=USR1@300   SLURM sends SIGUSR1 to every task (the ranks; no "B:", which would signal
#                       only this batch shell) 300 s before the limit. Each rank finishes its step,
#                       the ranks agree, write a checkpoint and exit 0 (src/train/checkpoint_signals.h).
#                       Make the lead time longer than a step plus a save on your file system.
#   SIGTERM             (scancel, preemption, the limit itself) does the same; SLURM sends SIGKILL
#                       KillWait seconds later (30 by default), so prefer the USR1 warning.
#   --requeue           a requeued job (preemption, node failure, `scontrol requeue`) starts again
#                       from the top, and --resume auto continues from the newest complete checkpoint
#                       (a checkpoint the crash interrupted is reported and skipped).
#   Longer runs: chain jobs, each continuing where the last stopped:
#     jid=$(sbatch --parsable launch/sbatch-train.sh CONFIG.yaml)
#     sbatch --dependency=afterany:$jid launch/sbatch-train.sh CONFIG.yaml
#   By hand: scancel --signal=USR1 JOBID  (save and stop now; --full would signal this shell too).
#
# Requirements: checkpoint.dir and logging.run_dir on a file system every node sees (the ranks of
# all nodes write shard files into the same checkpoint directory); an MPI built with PMIx (or set
# SRUN_MPI to what `srun --mpi=list` offers). parallel.ep_size must divide the number of tasks.
# Environment: SWITCHYARD_BIN (default build/switchyard), SRUN_MPI (default pmix),
# SWITCHYARD_RESUME (default auto; "none" starts over).
set -uo pipefail

config="${1:?usage: sbatch launch/sbatch-train.sh CONFIG.yaml [switchyard train arguments...]}"
shift
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
binary="${SWITCHYARD_BIN:-build/switchyard}"
[ -x "$binary" ] || { echo "sbatch-train: $binary is not built (bash launch/setup.sh; cmake ... ; or set SWITCHYARD_BIN)" >&2; exit 2; }

echo "sbatch-train: job ${SLURM_JOB_ID:-?} (restart count ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-?} node(s):" \
     "${SLURM_NTASKS:-?} ranks; $(date)"
# NCCL_NVLS_ENABLE=0: NVLink multicast off, as everywhere in this project (see docs/PERFORMANCE.md).
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"

# --kill-on-bad-exit: one rank failing ends the step at once (the others would only wait for it).
# Each rank uses the only GPU it sees when SLURM binds one per task (--gpus-per-task=1), else GPU =
# its node-local rank (src/comm/gpu_pick.h).
srun --mpi="${SRUN_MPI:-pmix}" --kill-on-bad-exit=1 --cpu-bind=none \
  "$binary" train "$config" --resume "${SWITCHYARD_RESUME:-auto}" "$@"
status=$?
echo "sbatch-train: switchyard exited $status; $(date)"
exit "$status"
