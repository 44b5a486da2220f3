#!/usr/bin/env bash
# Weights from a path, end to end (src/train/weights_source.h): one short finished run and one
# preempted run (SIGTERM after step 3: checkpoints, no final.weights), then
#   1. specialize on a checkpoint folder, on the preempted run folder and on the finished one,
#      each reporting which weights it picked (the run folder: its newest complete checkpoint);
#   2. generate, report (with its specialization map) and ckpt export on the preempted run folder,
#      ckpt export on a weights file;
#   3. paths that lead to no weights: exit 2 and a message saying what the path is (a run folder
#      without weights, a checkpoint folder without COMPLETE, an empty folder, a file, another
#      folder) and what was expected, for ckpt export, ckpt inspect, specialize and generate.
# Usage: test_weights_paths.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC
set -u
source "$(dirname "$0")/lib.sh"

awk 'BEGIN { srand(9); for (i = 0; i < 6000; i++) printf "%c%s", 97 + int(rand() * 10), (rand() < 0.2 ? " " : "") }' \
  >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" >/dev/null 2>&1 ||
  { echo "FAIL: prepare-data"; exit 1; }
common=("$source_dir/configs/tiny-cpu.yaml" --set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin"
        --set optimizer.warmup_steps=1 --set training.eval_every=0 --set checkpoint.keep_last=0
        --set checkpoint.every=2)

finished="$work/finished"
timeout 120 "$binary" train "${common[@]}" --set training.steps=6 --set "logging.run_dir=$finished" \
  >"$work/finished.log" 2>&1 || { echo "FAIL: the finished run"; tail "$work/finished.log"; exit 1; }
[ -f "$finished/final.weights" ] && [ -f "$finished/checkpoints/step-000000006/COMPLETE" ] ||
  { echo "FAIL: the finished run lacks final.weights or step-6"; exit 1; }

preempted="$work/preempted"
SWITCHYARD_INJECT_FAULT="0:after_step_3:sigterm" timeout 120 "$binary" train "${common[@]}" --set training.steps=50 \
  --set "logging.run_dir=$preempted" >"$work/preempted.log" 2>&1 ||
  { echo "FAIL: the preempted run exited $?"; tail "$work/preempted.log"; exit 1; }
grep -q "preempted at step 3 of 50" "$work/preempted.log" || { echo "FAIL: the run was not preempted at step 3"; exit 1; }
[ ! -e "$preempted/final.weights" ] && [ -f "$preempted/checkpoints/step-000000003/COMPLETE" ] ||
  { echo "FAIL: the preempted run should have step-3 and no final.weights"; exit 1; }

# run_tool NAME COMMAND...: runs it, stdout to $work/NAME.out, stderr to $work/NAME.err; sets status.
run_tool() {
  local name="$1"
  shift
  timeout 120 "$@" >"$work/$name.out" 2>"$work/$name.err"
  status=$?
}
# expect_ok NAME NEEDLE FILE: status 0 and NEEDLE (fixed text) in FILE.
expect_ok() {
  if [ "$status" -ne 0 ]; then
    fail "$1: exit $status: $(tail -2 "$work/$1.err")"
  elif ! grep -qF -- "$2" "$3"; then
    fail "$1: '$2' not in $(basename "$3"): $(head -3 "$3")"
  else
    echo "ok: $1"
  fi
}
# expect_bad NAME NEEDLE...: status 2 and every NEEDLE in the error line; never the misleading
# "COMPLETE is missing (the save did not finish)" unless a needle asks for it.
expect_bad() {
  local name="$1" needle
  shift
  [ "$status" -eq 2 ] || { fail "$name: exit $status, expected 2: $(tail -2 "$work/$name.err")"; return; }
  for needle in "$@"; do
    grep -qF -- "$needle" "$work/$name.err" || { fail "$name: '$needle' not in: $(cat "$work/$name.err")"; return; }
  done
  case "$*" in
    *"COMPLETE is missing"*) ;;
    *) grep -q "COMPLETE is missing" "$work/$name.err" && { fail "$name: says COMPLETE is missing"; return; } ;;
  esac
  echo "ok: $name (exit 2)"
}

# ---- 1. specialize on a checkpoint folder and on run folders -------------------------------------
table_header="MoE layer 0 (block 1): 4 experts, 2048 tokens"
run_tool specialize_checkpoint "$binary" specialize --checkpoint "$finished/checkpoints/step-000000004" \
  --text "$work/corpus.txt" --tokens 2048
expect_ok specialize_checkpoint "$table_header" "$work/specialize_checkpoint.out"
grep -qF "weights from $finished/checkpoints/step-000000004" "$work/specialize_checkpoint.err" ||
  fail "specialize on a checkpoint does not say it read it: $(cat "$work/specialize_checkpoint.err")"

run_tool specialize_preempted "$binary" specialize --checkpoint "$preempted" --text "$work/corpus.txt" --tokens 2048
expect_ok specialize_preempted "$table_header" "$work/specialize_preempted.out"
grep -qF "weights from $preempted/checkpoints/step-000000003 (the newest complete checkpoint of run folder $preempted)" \
  "$work/specialize_preempted.err" || fail "specialize on the preempted run: $(cat "$work/specialize_preempted.err")"

run_tool specialize_finished "$binary" specialize --checkpoint "$finished" --text "$work/corpus.txt" --tokens 2048
expect_ok specialize_finished "$table_header" "$work/specialize_finished.out"
grep -qF "weights from $finished/checkpoints/step-000000006" "$work/specialize_finished.err" ||
  fail "specialize on the finished run did not take step-6: $(cat "$work/specialize_finished.err")"
# The last checkpoint and final.weights are the same weights: the same map.
run_tool specialize_final "$binary" specialize --checkpoint "$finished/final.weights" --text "$work/corpus.txt" --tokens 2048
expect_ok specialize_final "$table_header" "$work/specialize_final.out"
cmp -s "$work/specialize_finished.out" "$work/specialize_final.out" ||
  fail "the map from the last checkpoint differs from the map from final.weights"

# ---- 2. the other weights readers on the preempted run ---------------------------------------------
run_tool generate_preempted "$binary" generate --checkpoint "$preempted" --prompt "abc" --max-new-tokens 20 --seed 1
expect_ok generate_preempted "abc" "$work/generate_preempted.out"
grep -qF "step-000000003" "$work/generate_preempted.err" || fail "generate did not read the preempted run's step-3"

run_tool report_preempted "$binary" report "$preempted" --output "$work/preempted.html" --tokens 2048
expect_ok report_preempted "tokens (weights from $preempted/checkpoints/step-000000003" \
  "$work/report_preempted.out"

run_tool export_preempted "$binary" ckpt export "$preempted" --format safetensors "$work/preempted.safetensors"
expect_ok export_preempted "step-000000003" "$work/export_preempted.err"
[ "$(head -c 8 "$work/preempted.safetensors" 2>/dev/null | wc -c)" -eq 8 ] || fail "ckpt export of a run folder wrote nothing"

run_tool export_weights "$binary" ckpt export "$finished/final.weights" --format safetensors "$work/final.safetensors"
expect_ok export_weights "tensors (fp32)" "$work/export_weights.out"
run_tool export_checkpoint "$binary" ckpt export "$finished/checkpoints/step-000000006" --format safetensors \
  "$work/step6.safetensors"
expect_ok export_checkpoint "tensors (fp32)" "$work/export_checkpoint.out"
# Same tensors (names, shapes, bytes), in whatever order each lists them.
if command -v python3 >/dev/null 2>&1; then
  python3 - "$work/final.safetensors" "$work/step6.safetensors" <<'EOF' || fail "final.weights and the last checkpoint export different tensors"
import json, struct, sys
def tensors(path):
    data = open(path, "rb").read()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    return {name: (entry["shape"], body[entry["data_offsets"][0]:entry["data_offsets"][1]])
            for name, entry in header.items() if name != "__metadata__"}
first, second = tensors(sys.argv[1]), tensors(sys.argv[2])
assert "blocks.1.moe.experts.3.w1" in first, sorted(first)
assert first == second, sorted(set(first) ^ set(second))
EOF
fi

# ---- 3. paths that lead to no weights ---------------------------------------------------------------
expected="expected a run folder (logging.run_dir of \`switchyard train\`), a checkpoint folder (step-*)"
no_weights="$work/no_weights"
mkdir -p "$no_weights"
cp "$preempted/config.yaml" "$preempted/metrics.jsonl" "$no_weights/"
sed -i "s|$preempted|$no_weights|g" "$no_weights/config.yaml"
incomplete="$work/incomplete/step-000000002"
mkdir -p "$work/incomplete"
cp -r "$finished/checkpoints/step-000000002" "$incomplete"
rm "$incomplete/COMPLETE"
mkdir -p "$work/empty" "$work/other"
echo "notes" >"$work/other/notes.txt"

run_tool export_no_weights "$binary" ckpt export "$no_weights" "$work/x.safetensors"
expect_bad export_no_weights "'$no_weights' is a run folder with no final.weights, 0 complete checkpoints in $no_weights/checkpoints" \
  "it has no weights yet"
run_tool inspect_run "$binary" ckpt inspect "$no_weights"
expect_bad inspect_run "'$no_weights' is a run folder" "ckpt inspect expects a checkpoint (step-* folder) or a folder of checkpoints" \
  "try \`switchyard ckpt inspect $no_weights/checkpoints\`"
run_tool export_incomplete "$binary" ckpt export "$incomplete" "$work/x.safetensors"
expect_bad export_incomplete "'$incomplete' is a checkpoint folder without COMPLETE" \
  "$incomplete/COMPLETE is missing (the save did not finish)"
run_tool inspect_incomplete "$binary" ckpt inspect "$incomplete"
expect_bad inspect_incomplete "$incomplete/COMPLETE is missing (the save did not finish)"
for tool in export inspect; do
  if [ "$tool" = export ]; then args=(ckpt export); out=("$work/x.safetensors"); else args=(ckpt inspect); out=(); fi
  run_tool "${tool}_empty" "$binary" "${args[@]}" "$work/empty" "${out[@]}"
  expect_bad "${tool}_empty" "'$work/empty' is an empty folder"
  run_tool "${tool}_file" "$binary" "${args[@]}" "$work/corpus.txt" "${out[@]}"
  expect_bad "${tool}_file" "'$work/corpus.txt' is a file but not a switchyard weights file"
  run_tool "${tool}_other" "$binary" "${args[@]}" "$work/other" "${out[@]}"
  expect_bad "${tool}_other" "'$work/other' is a folder but not a run folder"
done
grep -qF "$expected" "$work/export_empty.err" || fail "ckpt export on an empty folder does not say what was expected"
grep -qF "ckpt inspect expects a checkpoint (step-* folder) or a folder of checkpoints" "$work/inspect_file.err" ||
  fail "ckpt inspect on a file does not say what was expected"
[ ! -e "$work/x.safetensors" ] || fail "a failed ckpt export left an output file"
run_tool specialize_other "$binary" specialize --checkpoint "$work/other" --text "$work/corpus.txt"
expect_bad specialize_other "'$work/other' is a folder but not a run folder" "$expected"
run_tool generate_no_weights "$binary" generate --checkpoint "$no_weights"
expect_bad generate_no_weights "is a run folder with no final.weights"
run_tool report_no_weights "$binary" report "$no_weights" --output "$work/no_weights.html"
expect_ok report_no_weights "no specialization map ('$no_weights' is a run folder with no final.weights" \
  "$work/report_no_weights.out"

summarize_and_exit "weights-path checks"
