#!/usr/bin/env bash
# Whole-program training test on the CPU backend:
#   1. configs/tiny-cpu.yaml under mpirun -np 2 with parallel.ep_size 2 (experts split over the two
#      ranks) on generated text: the loss must fall by a clear margin, metrics.jsonl must hold one
#      line per step with per-expert token counts, evaluations and final.weights must appear, and
#      `switchyard generate` must sample from those weights;
#   2. the same seed twice gives bit-identical losses (parallel.deterministic);
#   3. expert parallelism changes nothing but summation order: ep_size 2 and ep_size 1 (experts
#      replicated) on the same two ranks give the same first losses; so with two accumulating
#      micro-steps per step (gradients added in place), with one part and with two_part;
#   4. parallel.ep_dispatch fp8 reaches the layer through the trainer: the first losses move (the
#      expert inputs are quantized) but stay within 1% of the activation dispatch's;
#   5. parallel.ranks_per_node 1 makes the ep_size 2 group span two (emulated) nodes: the
#      hierarchical exchange, which changes nothing but summation order;
#   6. training.recompute all (every block's attention and MoE / FFN forward repeated in backward,
#      the all-to-alls included) reaches the model through the trainer and changes nothing: the
#      losses and final weights of run 2 bit for bit; a bad value is refused naming the key;
#   7. hot-expert replication (parallel.max_replicas_per_rank 1) replicates on some steps and gives
#      the losses and final weights of run 2 bit for bit, and with accumulating micro-steps those of
#      3b's ep_size 2 run; with ep_overlap two_part it is refused (exit 2) naming both keys.
# Usage: test_train_tiny.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC
set -u

source "$(dirname "$0")/lib.sh"


# Generated text: sentences from a small grammar, fixed seed (~400 KB), and a validation split.
awk 'BEGIN {
  srand(7);
  split("the nation|our people|the congress|every citizen|this union|the world|our children|the government", s, "|");
  split("will build|must defend|has seen|shall honor|can restore|will remember|must reform|has earned", v, "|");
  split("a stronger economy|the common good|our freedom|new schools|peace abroad|the future of work|fair wages|clean water", o, "|");
  for (i = 0; i < 9000; i++) {
    printf "%s %s %s", s[int(rand() * 8) + 1], v[int(rand() * 8) + 1], o[int(rand() * 8) + 1];
    printf (rand() < 0.25 ? ".\n" : ". ");
  }
}' >"$work/corpus.txt"
mkdir -p "$work/text"
split -n 4 -d "$work/corpus.txt" "$work/text/part"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/text" >"$work/prepare.log" 2>&1 ||
  { fail "prepare-data failed"; cat "$work/prepare.log" >&2; exit 1; }

data=(--set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin")

# losses FILE: the "loss" of every metrics line, one per line.
losses() { grep -o '"loss":[-0-9.eE+]*' "$1" | cut -d: -f2; }

# ---- 1. tiny-cpu, two ranks, experts split -----------------------------------------------------
run="$work/run"
start=$(date +%s)
timeout 300 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" \
  --set parallel.ep_size=2 --set "logging.run_dir=$run" --set "checkpoint.dir=$run/checkpoints" \
  >"$work/train.out" 2>"$work/train.err"
status=$?
seconds=$(( $(date +%s) - start ))
if [ "$status" -ne 0 ]; then
  fail "training tiny-cpu under mpirun -np 2 exited $status"
  tail -20 "$work/train.err" >&2
else
  echo "ok: tiny-cpu trained under mpirun -np 2, ep_size 2, in ${seconds}s"
fi
metrics="$run/metrics.jsonl"
if [ ! -s "$metrics" ]; then
  fail "no metrics at $metrics"
else
  lines=$(wc -l <"$metrics")
  [ "$lines" -eq 200 ] || fail "metrics.jsonl has $lines lines, expected 200 (one per step)"
  grep -q '"tokens_per_expert":\[\[[0-9]*,[0-9]*,[0-9]*,[0-9]*\]\]' "$metrics" ||
    fail "metrics lack per-expert token counts of the 4 experts"
  evaluations=$(grep -c '"val_loss"' "$metrics")
  [ "$evaluations" -eq 4 ] || fail "expected 4 evaluations (every 50 steps), found $evaluations"
  first=$(losses "$metrics" | head -1)
  last=$(losses "$metrics" | tail -20 | awk '{ sum += $1 } END { printf "%.4f", sum / NR }')
  if awk -v first="$first" -v last="$last" 'BEGIN { exit !(first > 5.0 && last < first - 2.0) }'; then
    echo "ok: loss fell from $first to $last (mean of the last 20 steps)"
  else
    fail "loss did not fall by 2 nats: first $first, mean of the last 20 steps $last"
  fi
  val=$(grep -o '"val_loss":[-0-9.eE+]*' "$metrics" | tail -1 | cut -d: -f2)
  awk -v val="$val" 'BEGIN { exit !(val < 3.5) }' || fail "final validation loss $val is not below 3.5"
fi
grep -q "step 200/200 | loss" "$work/train.out" || fail "no progress line for step 200"
grep -q "GFLOP/s" "$work/train.out" || fail "progress lines lack the CPU GFLOP/s figure"
grep -q "ETA" "$work/train.out" || fail "progress lines lack an ETA"
[ "$(grep -c '^step ' "$work/train.out")" -le 25 ] || fail "progress lines printed by more than one rank"
[ -s "$run/final.weights" ] || fail "no final.weights"

timeout 60 "$binary" generate --checkpoint "$run" --prompt "the nation " --max-new-tokens 60 --seed 1 \
  >"$work/generate.out" 2>"$work/generate.err"
status=$?
if [ "$status" -ne 0 ]; then
  fail "generate exited $status"
  cat "$work/generate.err" >&2
else
  grep -q "^the nation " "$work/generate.out" || fail "generate did not echo the prompt"
  [ "$(wc -c <"$work/generate.out")" -ge 70 ] || fail "generate printed too little"
  echo "ok: generate: $(head -c 80 "$work/generate.out" | tr '\n' ' ')"
fi
timeout 60 "$binary" generate --checkpoint "$work/absent" >/dev/null 2>&1
[ $? -eq 2 ] || fail "generate with a missing checkpoint should exit 2"

# ---- 2. determinism ----------------------------------------------------------------------------
short=(--set training.steps=30 --set optimizer.warmup_steps=5 --set training.eval_every=0 --set parallel.ep_size=2)
for attempt in a b; do
  timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
    --set "logging.run_dir=$work/same_$attempt" >"$work/same_$attempt.out" 2>&1 ||
    fail "determinism run $attempt failed"
done
if [ -s "$work/same_a/metrics.jsonl" ] && cmp -s <(losses "$work/same_a/metrics.jsonl") <(losses "$work/same_b/metrics.jsonl"); then
  echo "ok: two runs with the same seed give identical losses"
else
  fail "two runs with the same seed gave different losses"
fi
# tensors FILE: the weights file without its header and config (which names the run directory).
tensors() {
  local config_bytes
  config_bytes=$(od -An -t u8 -j 16 -N 8 "$1" | tr -d ' ')
  tail -c +$((24 + config_bytes + 1)) "$1"
}
if [ -s "$work/same_a/final.weights" ] && cmp -s <(tensors "$work/same_a/final.weights") <(tensors "$work/same_b/final.weights"); then
  echo "ok: and bit-identical final weights"
else
  fail "the two runs' final weights differ"
fi

# ---- 3. ep_size 2 == ep_size 1 on the same ranks -------------------------------------------------
timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
  --set parallel.ep_size=1 --set "logging.run_dir=$work/replicated" >"$work/replicated.out" 2>&1 ||
  fail "the ep_size 1 run failed"
if [ -s "$work/replicated/metrics.jsonl" ]; then
  paste <(losses "$work/same_a/metrics.jsonl" | head -5) <(losses "$work/replicated/metrics.jsonl" | head -5) |
    awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > 1e-4 * $2) { bad = 1; print "  step " NR ": " $1 " vs " $2 } }
         END { exit bad }' >&2 && echo "ok: ep_size 2 and ep_size 1 agree on the first 5 losses" ||
    fail "ep_size 2 and ep_size 1 disagree"
fi

# ---- 3b. gradient accumulation in place: ep_size 2 (one part, and two_part) == ep_size 1 ----------
# Two micro-steps of 4 sequences: micro-step 2 adds the expert, router and norm gradients in place
# (MoeGradients::accumulate, NormAccumulate); with two_part, part 1 adds to part 0's as well.
accumulating=(--set optimizer.grad_accum_steps=2 --set training.micro_batch_size=4)
for variant in ep1 ep2 ep2_two_part; do
  case "$variant" in
    ep1) extra=(--set parallel.ep_size=1) ;;
    ep2) extra=() ;;
    ep2_two_part) extra=(--set parallel.ep_overlap=two_part) ;;
  esac
  timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
    "${accumulating[@]}" "${extra[@]}" --set "logging.run_dir=$work/accumulate_$variant" \
    >"$work/accumulate_$variant.out" 2>&1 || fail "the accumulating $variant run failed"
done
# The gradient norm sees a lost micro-step at once (the losses only through the next update).
grad_norms() { grep -o '"grad_norm":[-0-9.eE+]*' "$1" | cut -d: -f2; }
for variant in ep2 ep2_two_part; do
  agreed=1
  for metric in losses grad_norms; do
    paste <("$metric" "$work/accumulate_ep1/metrics.jsonl" | head -5) <("$metric" "$work/accumulate_$variant/metrics.jsonl" | head -5) |
      awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > 1e-4 * $1 || NF < 2) { bad = 1; print "  step " NR ": " $1 " vs " $2 } }
           END { exit bad || NR < 5 }' >&2 ||
      { agreed=0; fail "accumulating micro-steps: $variant and ep_size 1 disagree ($metric)"; }
  done
  [ "$agreed" -eq 0 ] ||
    echo "ok: accumulating micro-steps: $variant agrees with ep_size 1 on the first 5 losses and gradient norms"
done

# ---- 4. fp8 dispatch through the trainer ---------------------------------------------------------
timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
  --set parallel.ep_dispatch=fp8 --set "logging.run_dir=$work/fp8" >"$work/fp8.out" 2>&1 ||
  fail "the ep_dispatch fp8 run failed"
if [ -s "$work/fp8/metrics.jsonl" ]; then
  paste <(losses "$work/same_a/metrics.jsonl" | head -5) <(losses "$work/fp8/metrics.jsonl" | head -5) |
    awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > 0.01 * $1) { bad = 1; print "  step " NR ": " $1 " vs " $2 }
           if (d > 0) moved = 1 }
         END { if (!moved) print "  fp8 dispatch gave the activation dispatch'"'"'s losses exactly"; exit bad || !moved }' >&2 &&
    echo "ok: fp8 dispatch: the first 5 losses within 1% of the activation dispatch's, not identical" ||
    fail "fp8 dispatch losses are off (or identical: not quantized)"
fi

# ---- 5. the hierarchical exchange through the trainer -------------------------------------------
timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
  --set parallel.ranks_per_node=1 --set "logging.run_dir=$work/nodes" >"$work/nodes.out" 2>&1 ||
  fail "the ranks_per_node 1 run failed"
grep -q "spans 2 nodes of 1 ranks: hierarchical exchange" "$work/nodes.out" ||
  fail "ranks_per_node 1 did not report the hierarchical exchange"
if [ -s "$work/nodes/metrics.jsonl" ]; then
  paste <(losses "$work/same_a/metrics.jsonl" | head -5) <(losses "$work/nodes/metrics.jsonl" | head -5) |
    awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > 1e-4 * $2) { bad = 1; print "  step " NR ": " $1 " vs " $2 } }
         END { exit bad }' >&2 && echo "ok: the hierarchical exchange (2 nodes x 1) agrees with the one-level one" ||
    fail "the hierarchical and one-level exchanges disagree"
fi

# ---- 6. activation recomputation through the trainer ------------------------------------------
timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
  --set training.recompute=all --set "logging.run_dir=$work/recompute" --profile-steps 1 >"$work/recompute.out" 2>&1 ||
  fail "the training.recompute all run failed"
grep -q 'recompute: all' "$work/recompute/config.yaml" 2>/dev/null ||
  fail "the resolved config.yaml does not record training.recompute: all"
# The profiled step shows the repeated forward work: the option reached the model.
grep -q '"stage": "MoE recompute"' "$work/recompute/profile.json" 2>/dev/null &&
  grep -q '"stage": "attention recompute"' "$work/recompute/profile.json" ||
  fail "the profiled step of the recompute all run has no MoE / attention recompute stages"
if [ -s "$work/recompute/metrics.jsonl" ] && [ -s "$work/same_a/metrics.jsonl" ] &&
  cmp -s <(losses "$work/same_a/metrics.jsonl") <(losses "$work/recompute/metrics.jsonl") &&
  cmp -s <(tensors "$work/same_a/final.weights") <(tensors "$work/recompute/final.weights"); then
  echo "ok: training.recompute all gives the losses and final weights of none, bit for bit ($(losses "$work/recompute/metrics.jsonl" | wc -l) steps)"
else
  fail "training.recompute all changed the losses or the final weights"
  paste <(losses "$work/same_a/metrics.jsonl" | head -5) <(losses "$work/recompute/metrics.jsonl" | head -5) >&2
fi
timeout 60 "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" --set training.recompute=full \
  --set "logging.run_dir=$work/bad_recompute" >"$work/bad_recompute.out" 2>&1
status=$?
[ "$status" -eq 2 ] || fail "training.recompute=full should exit 2, exited $status"
grep -q 'training.recompute.*one of: none, moe, attention, all' "$work/bad_recompute.out" ||
  fail "the bad training.recompute value's message does not name the key and its choices"

# ---- 7. hot-expert replication through the trainer -------------------------------------------
timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
  --set parallel.max_replicas_per_rank=1 --set "logging.run_dir=$work/replicas" >"$work/replicas.out" 2>&1 ||
  fail "the parallel.max_replicas_per_rank 1 run failed"
if [ -s "$work/replicas/metrics.jsonl" ] && [ -s "$work/same_a/metrics.jsonl" ]; then
  # Steps whose plan replicated something: without any the comparison below would prove nothing.
  replicated=$(grep -o '"replicated_experts":[-0-9.eE+]*' "$work/replicas/metrics.jsonl" | cut -d: -f2 |
    awk '$1 > 0' | wc -l)
  steps=$(losses "$work/replicas/metrics.jsonl" | wc -l)
  if [ "$replicated" -eq 0 ]; then
    fail "parallel.max_replicas_per_rank 1 replicated nothing in $steps steps (no replicated_experts > 0)"
  elif cmp -s <(losses "$work/same_a/metrics.jsonl") <(losses "$work/replicas/metrics.jsonl") &&
    cmp -s <(tensors "$work/same_a/final.weights") <(tensors "$work/replicas/final.weights"); then
    echo "ok: hot-expert replication ($replicated of $steps steps replicated) gives the losses and final weights of none, bit for bit"
  else
    fail "hot-expert replication changed the losses or the final weights"
    paste <(losses "$work/same_a/metrics.jsonl" | head -5) <(losses "$work/replicas/metrics.jsonl" | head -5) >&2
  fi
  grep -q '| replicas [0-9.]* (.* rows), max rank load' "$work/replicas.out" ||
    fail "the progress lines do not report the replicas"
fi
# With two accumulating micro-steps per step too (section 3b's ep2 run without replication).
timeout 120 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" "${short[@]}" \
  "${accumulating[@]}" --set parallel.max_replicas_per_rank=1 --set "logging.run_dir=$work/replicas_accumulate" \
  >"$work/replicas_accumulate.out" 2>&1 || fail "the accumulating parallel.max_replicas_per_rank 1 run failed"
if [ -s "$work/replicas_accumulate/metrics.jsonl" ] && [ -s "$work/accumulate_ep2/metrics.jsonl" ]; then
  replicated=$(grep -o '"replicated_experts":[-0-9.eE+]*' "$work/replicas_accumulate/metrics.jsonl" | cut -d: -f2 |
    awk '$1 > 0' | wc -l)
  if [ "$replicated" -eq 0 ]; then
    fail "the accumulating replication run replicated nothing"
  elif cmp -s <(losses "$work/accumulate_ep2/metrics.jsonl") <(losses "$work/replicas_accumulate/metrics.jsonl") &&
    cmp -s <(tensors "$work/accumulate_ep2/final.weights") <(tensors "$work/replicas_accumulate/final.weights"); then
    echo "ok: with accumulating micro-steps too, replication ($replicated steps) gives the losses and final weights of none, bit for bit"
  else
    fail "with accumulating micro-steps, hot-expert replication changed the losses or the final weights"
  fi
fi
timeout 60 "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" --set parallel.ep_size=2 \
  --set parallel.max_replicas_per_rank=1 --set parallel.ep_overlap=two_part \
  --set "logging.run_dir=$work/bad_replicas" >"$work/bad_replicas.out" 2>&1
status=$?
[ "$status" -eq 2 ] || fail "parallel.max_replicas_per_rank with ep_overlap two_part should exit 2, exited $status"
grep -q 'parallel.max_replicas_per_rank = 1 needs parallel.ep_overlap = none' "$work/bad_replicas.out" ||
  fail "the unsupported replication combination's message does not name both keys"

summarize_and_exit "training checks"
