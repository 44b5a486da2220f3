#!/usr/bin/env bash
# The train command: set-up, build, fetch and prepare the default data when missing, then train.
#   GPUs present: configs/sotu-1gpu.yaml on all local GPUs (mpirun -np <GPUs>, parallel.ep_size =
#                 the GPU count, micro-batches shrunk so the global batch stays 32 sequences)
#   no GPU:       configs/tiny-cpu.yaml on the same corpus, on this machine's CPU
# and finally prints a sample from the trained model (switchyard generate).
# Runs again continue the run where it stopped (--resume auto: a finished run just prints its sample;
# more steps, e.g. --set training.steps=500, extend it), unless the arguments say --resume PATH or
# --start-over.
# Usage: bash launch/train.sh [extra `switchyard train` arguments, e.g. --set training.steps=500]
# Environment: BUILD_DIR (default build), JOBS (build jobs, default: cores), GPUS (override the count).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build_dir="${BUILD_DIR:-build}"
jobs="${JOBS:-$(nproc)}"

bash launch/setup.sh
if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null 2>&1; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
generator=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$build_dir/CMakeCache.txt" ]; then generator=(-G Ninja); fi
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build_dir" -j "$jobs" --target switchyard
binary="$root/$build_dir/switchyard"

bash launch/get-data.sh "$binary"

gpus="${GPUS:-0}"
if [ -z "${GPUS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi

mpi=()
if [ "$(id -u)" -eq 0 ]; then mpi+=(--allow-run-as-root); fi
resume=(--resume auto)
for argument in "$@"; do
  case "$argument" in --resume|--resume=*|--start-over) resume=() ;; esac
done

if [ "$gpus" -ge 1 ]; then
  config=configs/sotu-1gpu.yaml
  experts="$(sed -n 's/^ *num_experts: *\([0-9]*\).*/\1/p' "$config")"
  micro="$(sed -n 's/^ *micro_batch_size: *\([0-9]*\).*/\1/p' "$config")"
  # ep_size must divide both the number of ranks and the number of experts.
  ep=1
  for candidate in $(seq "$gpus" -1 1); do
    if [ $((gpus % candidate)) -eq 0 ] && [ $((experts % candidate)) -eq 0 ]; then ep="$candidate"; break; fi
  done
  per_gpu=$(( micro / gpus > 0 ? micro / gpus : 1 ))
  if [ "$gpus" -eq 1 ]; then
    run_dir=runs/sotu-1gpu
    "$binary" train "$config" "${resume[@]}" "$@"
  else
    run_dir="runs/sotu-${gpus}gpu"
    [ "$ep" -eq "$gpus" ] || echo "train: $gpus GPUs but $experts experts: using ep_size $ep"
    mpirun -np "$gpus" "${mpi[@]}" --bind-to none -x NCCL_NVLS_ENABLE=0 \
      "$binary" train "$config" --set "parallel.ep_size=$ep" --set "training.micro_batch_size=$per_gpu" \
      --set "logging.run_dir=$run_dir" --set "checkpoint.dir=$run_dir/checkpoints" "${resume[@]}" "$@"
  fi
else
  echo "train: no GPU found: training configs/tiny-cpu.yaml on the CPU"
  run_dir=runs/tiny-cpu-sotu
  "$binary" train configs/tiny-cpu.yaml --set data.path=data/sotu/train.bin --set data.val_path=data/sotu/val.bin \
    --set "logging.run_dir=$run_dir" --set "checkpoint.dir=$run_dir/checkpoints" "${resume[@]}" "$@"
fi

echo "train: a sample from the model in $run_dir:"
"$binary" generate --checkpoint "$run_dir" --prompt "Mr. Speaker, " --max-new-tokens 400 --seed 1
