#!/usr/bin/env bash
# One GPU's measurement set, as docs/PERFORMANCE.md reports it: build, every CUDA test, the routing
# benchmark, ncu on the two routing cases' kernel (occupancy, issue and stall figures), the MoE
# layer (SonicMoE's five shapes and the seed's against dense, stage breakdowns at 8,192 and 65,536
# tokens and at SonicMoE's shapes; with --anchors the PyTorch layer anchors beside them), the step-time breakdown of the
# three throughput configs (with their sub-stages; bench-1gpu again with parallel.deterministic:
# true, i.e. without cuDNN's atomic attention backward; bench-large-1gpu again with the weight
# gradients' direct stores, SWITCHYARD_SM90_STORE=direct), the optimizer's passes and the other
# memory-bound passes alone (bench optimizer, bench passes), a short bench-large-1gpu run (does it
# fit, tokens/s, MFU), the shared experts' second stream on and off, run-to-run determinism,
# bench-1gpu's 73,728-token step as 1 x 72 and 2 x 36 sequences instead of 3 x 24 (fewer
# micro-steps: fewer fp32 gradient read-add-writes, larger GEMMs) and, with --anchors, the PyTorch
# training anchor beside bench-1gpu (as 3 x 24 and as 1 x 72 sequences, both sides). Each part
# writes OUT/<part>.log and one line to OUT/summary.log; a part that fails is reported and the
# next one runs.
#
# Usage: bash launch/measure-1gpu.sh [--out DIR] [--budget SECONDS] [--anchors DIR] [--only LIST]
#   --out       where the logs go (default: runs/measure)
#   --budget    stop starting new parts after this many seconds (default: 0 = no limit); each part
#               is also capped by what is left
#   --anchors   a folder holding the project's anchors (torch_train_bench.py, torch_moe_bench.py,
#               torch_moe_shapes_bench.py); without it the anchor part and the layer part's anchors
#               are skipped
#   --only      comma list of parts, in this order: build,tests,routing,ncu,layer,profile,large,stream,determinism,microbatch,anchor
#               (default: all)
# Needs a CUDA GPU, nvcc, and data/sotu/{train,val}.bin (bash launch/get-data.sh writes them; this
# script runs it when they are missing). Run from anywhere; it works in the repository root. Every
# training run gets its own folder in a scratch directory outside OUT (under $TMPDIR or /tmp),
# removed when the script exits: the runs are cut short after their last logged step, so no
# checkpoint is worth keeping, and OUT holds only the logs (a device call returns a limited number
# of files).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="runs/measure"
budget=0
anchors=""
only="build,tests,routing,ncu,layer,profile,large,stream,determinism,microbatch,anchor"
fail() { echo "measure-1gpu: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || fail "--out needs a folder"; out="$2"; shift 2 ;;
    --budget) [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || fail "--budget needs a whole number of seconds"; budget="$2"; shift 2 ;;
    --anchors) [ $# -ge 2 ] || fail "--anchors needs a folder"; anchors="$2"; shift 2 ;;
    --only) [ $# -ge 2 ] || fail "--only needs a list"; only="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) fail "unknown argument '$1' (see --help)" ;;
  esac
done
for part in ${only//,/ }; do
  case "$part" in build|tests|routing|ncu|layer|profile|large|stream|determinism|microbatch|anchor) ;;
    *) fail "--only: unknown part '$part' (parts: build,tests,routing,ncu,layer,profile,large,stream,determinism,microbatch,anchor)" ;;
  esac
done
[ -z "$anchors" ] || [ -f "$anchors/torch_train_bench.py" ] || fail "--anchors $anchors holds no torch_train_bench.py"
mkdir -p "$out" || fail "cannot create $out"
binary="build/switchyard"
start=$(date +%s)
wants() { [[ ",$only," == *",$1,"* ]]; }
left() { [ "$budget" -eq 0 ] && echo 100000 || echo $(( budget - ($(date +%s) - start) )); }
cap() { local remaining; remaining=$(left); echo $(( remaining < $1 ? remaining : $1 )); }
note() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/summary.log"; }
# Training runs' folders, outside OUT; a fresh one per run (the previous one's removed: its
# numbers are in the logs).
runs_root="$(mktemp -d "${TMPDIR:-/tmp}/measure-1gpu-runs.XXXXXX")" || fail "cannot create a scratch directory"
trap 'rm -rf "$runs_root"' EXIT
run_dir() { rm -rf "$runs_root/$1"; echo "$runs_root/$1"; }
# A part runs only when asked for and when at least `needed` seconds are left.
runs() { wants "$1" || return 1; [ "$(left)" -ge "$2" ] || { note "$1: skipped (budget)"; return 1; }; note "$1"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1 ||
  fail "nvidia-smi failed: this script needs a GPU"
note "gpu: $(head -1 "$out/gpu.txt"); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"

if runs build 60; then
  { cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build -j "$(nproc)" --target switchyard cuda_tests; } \
    > "$out/build.log" 2>&1 || { note "build: FAILED (build.log)"; exit 1; }
fi
[ -x "$binary" ] || fail "$binary is missing (run with the build part)"
[ -s data/sotu/train.bin ] || bash launch/get-data.sh "$binary" > "$out/data.log" 2>&1 || fail "get-data failed ($out/data.log)"

if runs tests 60; then
  timeout "$(cap 300)" ./build/tests/cuda_tests --gtest_brief=1 > "$out/cuda_tests.log" 2>&1
  note "tests: rc $? -- $(grep -E '^\[  (PASSED|FAILED) ' "$out/cuda_tests.log" | tr '\n' ' ')"
fi
if runs routing 30; then
  timeout "$(cap 120)" "$binary" bench moe --only routing > "$out/routing.log" 2>&1
  grep "^Routing alone" "$out/routing.log" | while read -r line; do note "routing: $line"; done
fi
if runs ncu 60; then
  # bench moe --only routing with --warmup 1 --iters 1 launches the softmax case's kernel 22 times
  # (2 lone calls, 2 x 10 back to back), then the fine-grained case's: one launch of each.
  for case in "softmax 0" "fine-grained 22"; do
    read -r name skip <<<"$case"
    [ "$(left)" -ge 30 ] || { note "ncu $name: skipped (budget)"; continue; }
    timeout "$(cap 120)" ncu --kernel-name regex:route_forward --launch-skip "$skip" --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats "$binary" bench moe --only routing --warmup 1 --iters 1 > "$out/ncu-$name.log" 2>&1
    note "ncu $name: rc $? -- $(grep -E 'route_forward_kernel|Duration|Achieved Occupancy|Issued Warp Per Scheduler|No Eligible' \
      "$out/ncu-$name.log" | sed -E 's/ +/ /g' | tr '\n' ';')"
  done
fi
if runs layer 60; then
  timeout "$(cap 180)" "$binary" bench moe --shape sonic --json "$out/layer-sonic.json" > "$out/layer-sonic.log" 2>&1
  note "layer sonic: rc $? (layer-sonic.log)"
  if [ -n "$anchors" ] && [ "$(left)" -ge 60 ]; then
    timeout "$(cap 180)" python3 "$anchors/torch_moe_shapes_bench.py" > "$out/layer-sonic-anchor.log" 2>&1
    note "layer sonic anchor: rc $? (layer-sonic-anchor.log)"
  fi
  [ "$(left)" -ge 40 ] && timeout "$(cap 120)" "$binary" bench moe --only seed,large > "$out/layer-seed.log" 2>&1 &&
    note "layer seed: $(grep -m3 -E 'B16_S512|B64_S1024|65536' "$out/layer-seed.log" | tr -s ' ' | tr '\n' ';')"
  if [ -n "$anchors" ] && [ "$(left)" -ge 60 ]; then
    timeout "$(cap 150)" python3 "$anchors/torch_moe_bench.py" > "$out/layer-seed-anchor.log" 2>&1
    note "layer seed anchor: rc $? (layer-seed-anchor.log)"
  fi
  for tokens in 8192 65536; do
    [ "$(left)" -ge 30 ] || { note "layer breakdown $tokens: skipped (budget)"; continue; }
    timeout "$(cap 90)" "$binary" bench moe --breakdown --breakdown-tokens "$tokens" --iters 30 \
      > "$out/layer-breakdown-$tokens.log" 2>&1
    note "layer breakdown $tokens: rc $? (layer-breakdown-$tokens.log)"
  done
  # Where the time goes at SonicMoE's five shapes (stage times and each GEMM's TFLOP/s).
  if [ "$(left)" -ge 60 ]; then
    timeout "$(cap 180)" "$binary" bench moe --breakdown --shape sonic --iters 10 > "$out/layer-breakdown-sonic.log" 2>&1
    note "layer breakdown sonic: rc $? (layer-breakdown-sonic.log)"
  fi
fi
# One profiled training run: profile_run NAME CONFIG [train options...] writes the step breakdown
# of configs/CONFIG.yaml to OUT/NAME.log (a SWITCHYARD_* assignment before the call passes through).
profile_run() {
  local name="$1" config="$2"
  shift 2
  timeout "$(cap 150)" "$binary" train "configs/$config.yaml" --profile-steps 3 "$@" \
    --set "logging.run_dir=$(run_dir "$name")" 2>&1 | sed -u '/step profile ->/q' > "$out/$name.log"
}
if runs profile 60; then
  for config in bench-1gpu finegrained-1gpu bench-large-1gpu; do
    [ "$(left)" -ge 40 ] || { note "profile $config: skipped (budget)"; continue; }
    profile_run "profile-$config" "$config"
    note "profile $config: $(grep -m1 'MFU = ' "$out/profile-$config.log" | sed 's/.*= //')"
  done
  # bench-1gpu with parallel.deterministic: true (cuDNN's attention backward without the atomic
  # dQ) against the default: compare "attention core backward" with profile-bench-1gpu.log's.
  if [ "$(left)" -ge 40 ]; then
    profile_run profile-bench-1gpu-deterministic bench-1gpu --set parallel.deterministic=true
    note "profile bench-1gpu, parallel.deterministic=true: $(grep -m1 'MFU = ' \
      "$out/profile-bench-1gpu-deterministic.log" | sed 's/.*= //'); core backward (default, deterministic): $(grep \
      -h 'attention core backward' "$out/profile-bench-1gpu.log" "$out/profile-bench-1gpu-deterministic.log" |
      tr -s ' ' | tr '\n' ';')"
  fi
  # bench-large-1gpu with the weight gradients' direct stores (128 x 256 tiles, red.global.add on
  # the accumulating micro-steps) against the default staged 128 x 128 tiles: compare the MoE
  # backward's "weight grad" rows (ms and TFLOP/s) with profile-bench-large-1gpu.log's.
  if [ "$(left)" -ge 60 ]; then
    SWITCHYARD_SM90_STORE=direct profile_run profile-bench-large-1gpu-direct bench-large-1gpu
    note "profile bench-large-1gpu, SWITCHYARD_SM90_STORE=direct: $(grep -m1 'MFU = ' \
      "$out/profile-bench-large-1gpu-direct.log" | sed 's/.*= //'); weight grads (default, direct): $(grep -h \
      'weight grad [12]' "$out/profile-bench-large-1gpu.log" "$out/profile-bench-large-1gpu-direct.log" |
      tr -s ' ' | tr '\n' ';')"
  fi
  # The optimizer's passes alone at bench-1gpu's parameter count (ms and GB/s against the HBM).
  if [ "$(left)" -ge 30 ]; then
    timeout "$(cap 90)" "$binary" bench optimizer > "$out/optimizer.log" 2>&1
    note "optimizer: rc $? -- $(grep -E 'gradient norm|AdamW' "$out/optimizer.log" | tr -s ' ' | tr '\n' ';')"
  fi
  # The memory-bound passes alone (norms, rotary, activations, residual add) at bench-1gpu's and
  # bench-large-1gpu's micro-step shapes: GB/s against the HBM's ~3 TB/s.
  if [ "$(left)" -ge 30 ]; then
    timeout "$(cap 60)" "$binary" bench passes > "$out/passes.log" 2>&1
    timeout "$(cap 60)" "$binary" bench passes --tokens 8192 --d-model 2048 --heads 16 --d-ff 7168 --seq-len 2048 \
      > "$out/passes-large.log" 2>&1
    note "passes: rc $? -- $(grep -E 'norm backward|rotary forward' "$out/passes.log" | tr -s ' ' | tr '\n' ';')"
  fi
fi
if runs large 60; then
  timeout "$(cap 200)" "$binary" train configs/bench-large-1gpu.yaml --set training.steps=8 --set training.log_every=2 \
    --set "logging.run_dir=$(run_dir large)" 2>&1 | sed -u '/step 8\//q' > "$out/large.log"
  note "large: $(grep -m1 'device memory' "$out/large.log" | sed 's/.*: device/device/')"
  note "large: $(grep 'step 8/' "$out/large.log" | head -1)"
fi
if runs stream 60; then
  for round in 1 2; do
    for stream in 1 0; do
      [ "$(left)" -ge 30 ] || { note "stream $stream: skipped (budget)"; continue; }
      SWITCHYARD_SHARED_EXPERT_STREAM=$stream timeout "$(cap 90)" "$binary" train configs/finegrained-1gpu.yaml \
        --set training.steps=30 --set training.log_every=10 --set "logging.run_dir=$(run_dir "stream-$stream-$round")" \
        2>&1 | sed -u '/step 30\//q' > "$out/stream-$stream-$round.log"
      note "stream $stream (round $round): $(grep 'step 30/' "$out/stream-$stream-$round.log" | head -1)"
    done
  done
fi
if runs determinism 60; then
  for run in a b; do
    dir="$(run_dir "determinism-$run")"
    timeout "$(cap 90)" "$binary" train configs/finegrained-1gpu.yaml --set parallel.deterministic=true \
      --set training.steps=4 --set optimizer.warmup_steps=1 --set training.log_every=1 \
      --set "logging.run_dir=$dir" > "$out/determinism-$run.log" 2>&1
    python3 -c "import json,sys; [print(r['step'], r['loss'], r['grad_norm']) for r in map(json.loads, open(sys.argv[1]))]" \
      "$dir/metrics.jsonl" > "$out/determinism-$run.losses" 2>&1
  done
  if [ -s "$out/determinism-a.losses" ] && cmp -s "$out/determinism-a.losses" "$out/determinism-b.losses"; then
    note "determinism: two runs, identical losses and gradient norms over 4 steps"
  else
    note "determinism: DIFFER or failed (determinism-*.losses, determinism-*.log)"
  fi
fi
if runs microbatch 60; then
  for split in 1x72 2x36; do
    [ "$(left)" -ge 30 ] || { note "microbatch $split: skipped (budget)"; continue; }
    timeout "$(cap 90)" "$binary" train configs/bench-1gpu.yaml --set training.steps=20 \
      --set "optimizer.grad_accum_steps=${split%x*}" --set "training.micro_batch_size=${split#*x}" \
      --set "logging.run_dir=$(run_dir "microbatch-$split")" 2>&1 | sed -u '/step 20\//q' > "$out/microbatch-$split.log"
    note "microbatch $split: $(grep -m1 'device memory' "$out/microbatch-$split.log" | sed 's/.*: device/device/')"
    note "microbatch $split: $(grep 'step 20/' "$out/microbatch-$split.log" | head -1)"
  done
fi
if [ -n "$anchors" ] && runs anchor 120; then
  timeout "$(cap 200)" python3 "$anchors/torch_train_bench.py" --compile --steps 10 > "$out/anchor-compile.log" 2>&1
  note "anchor: $(tail -1 "$out/anchor-compile.log")"
  timeout "$(cap 120)" "$binary" train configs/bench-1gpu.yaml --set training.steps=20 \
    --set "logging.run_dir=$(run_dir bench-1gpu)" 2>&1 | sed -u '/step 20\//q' > "$out/bench-1gpu.log"
  note "bench-1gpu: $(grep 'step 20/' "$out/bench-1gpu.log" | head -1)"
  # Both with the step as one micro-step of 72 sequences: each side's fastest split, side by side.
  if [ "$(left)" -ge 120 ]; then
    timeout "$(cap 200)" python3 "$anchors/torch_train_bench.py" --compile --steps 10 --micro 72 --accum 1 \
      > "$out/anchor-compile-1x72.log" 2>&1
    note "anchor 1x72: rc $? -- $(tail -1 "$out/anchor-compile-1x72.log")"
    timeout "$(cap 120)" "$binary" train configs/bench-1gpu.yaml --set training.steps=20 \
      --set optimizer.grad_accum_steps=1 --set training.micro_batch_size=72 \
      --set "logging.run_dir=$(run_dir bench-1gpu-1x72)" 2>&1 | sed -u '/step 20\//q' > "$out/bench-1gpu-1x72.log"
    note "bench-1gpu 1x72: $(grep 'step 20/' "$out/bench-1gpu-1x72.log" | head -1)"
  fi
fi
note "done: $out/summary.log"
