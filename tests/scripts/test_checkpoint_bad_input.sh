#!/usr/bin/env bash
# Damaged checkpoints are bad input: a clear error naming the file, exit status 2, nothing deleted.
# From one good checkpoint (configs/tiny-cpu.yaml, shortened) each damage gets its own copy:
#   truncated shard, one flipped byte inside a tensor, missing shard, missing manifest, missing
#   completion marker (an interrupted save), an edited manifest, and a run of another model.
# For each: `train --resume PATH`, `ckpt inspect` and `ckpt export` exit 2 naming the damaged
# file (inspect and export accept the other-model case: the checkpoint itself is fine), and
# every file is still there, unchanged; the run directory resumed into (seeded with the run's
# config.yaml and metrics, as a run resuming in place finds them) is byte-identical afterwards: a
# run changes nothing of itself before its inputs are verified. `train --resume auto` reports the damaged newest
# checkpoint, skips it and continues from the older one (exit 0). Under mpirun -np 2 a byte
# flipped in the shard that only rank 1 reads still ends the job with status 2 and the message.
# A --resume path that does not exist, or that holds checkpoints but is not one, is exit 2 too.
# Usage: test_checkpoint_bad_input.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC
set -u
source "$(dirname "$0")/lib.sh"

awk 'BEGIN { srand(5); for (i = 0; i < 4000; i++) printf "%c%s", 97 + int(rand() * 12), (rand() < 0.2 ? " " : "") }' \
  >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" >/dev/null 2>&1 ||
  { echo "FAIL: prepare-data"; exit 1; }
common=("$source_dir/configs/tiny-cpu.yaml" --set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin"
        --set training.steps=4 --set optimizer.warmup_steps=1 --set training.eval_every=0 --set checkpoint.keep_last=0)

timeout 120 "$binary" train "${common[@]}" --set checkpoint.every=2 --set "logging.run_dir=$work/good" \
  --set "checkpoint.dir=$work/good/ckpt" >"$work/good.log" 2>&1 || { echo "FAIL: the good run"; tail "$work/good.log"; exit 1; }
older="$work/good/ckpt/step-000000002"
newest="$work/good/ckpt/step-000000004"
[ -f "$newest/COMPLETE" ] && [ -f "$older/COMPLETE" ] || { echo "FAIL: no checkpoints at steps 2 and 4"; exit 1; }

# flip_byte FILE OFFSET: xor one byte with 0x20 in place.
flip_byte() {
  local value
  value=$(od -An -t u1 -j "$2" -N 1 "$1" | tr -d ' ')
  printf "$(printf '\\%03o' $((value ^ 32)))" | dd of="$1" bs=1 seek="$2" count=1 conv=notrunc status=none
}
# tensor_offset CHECKPOINT NAME: the byte offset of tensor NAME inside its shard (from ckpt inspect).
tensor_offset() {
  "$binary" ckpt inspect "$1" --tensors --no-verify | awk -v name="$2" '$1 == name { print $(NF - 2) }'
}
snapshot() { (cd "$1" && find . -type f -exec cksum {} + | sort); }

# check_damage NAME NEEDLE CHECK_TOOLS: NEEDLE must appear in every error message.
check_damage() {
  local name="$1" needle="$2" check_tools="$3" case_dir="$work/$1"
  local checkpoint="$case_dir/ckpt/step-000000004" failures_before=$failures
  local before run_before
  # The run directory as the interrupted run left it: its config.yaml (this case's paths, resume none)
  # and metrics.
  mkdir -p "$case_dir/run"
  sed -e "s#\"$work/good/ckpt\"#\"$case_dir/ckpt\"#" -e "s#\"$work/good\"#\"$case_dir/run\"#" \
    "$work/good/config.yaml" >"$case_dir/run/config.yaml"
  cp "$work/good/metrics.jsonl" "$case_dir/run/metrics.jsonl"
  grep -q "run_dir: \"$case_dir/run\"" "$case_dir/run/config.yaml" || fail "$name: could not seed config.yaml"
  before="$(snapshot "$case_dir")"
  run_before="$(snapshot "$case_dir/run")"
  timeout 120 "$binary" train "${common[@]}" --set "logging.run_dir=$case_dir/run" --set "checkpoint.dir=$case_dir/ckpt" \
    ${extra_args[@]+"${extra_args[@]}"} --resume "$checkpoint" >"$case_dir.train.log" 2>&1
  local status=$?
  [ "$status" -eq 2 ] || fail "$name: train --resume exited $status, expected 2"
  grep -q "switchyard: error: .*${needle}" "$case_dir.train.log" ||
    { fail "$name: train's error does not name '$needle'"; tail -3 "$case_dir.train.log" >&2; }
  if [ "$check_tools" = yes ]; then
    timeout 60 "$binary" ckpt inspect "$checkpoint" >"$case_dir.inspect.log" 2>&1
    status=$?
    [ "$status" -eq 2 ] || fail "$name: ckpt inspect exited $status, expected 2"
    grep -q "switchyard: error: .*${needle}" "$case_dir.inspect.log" || fail "$name: ckpt inspect's error does not name '$needle'"
    timeout 60 "$binary" ckpt export "$checkpoint" --format safetensors "$case_dir/out.safetensors" >"$case_dir.export.log" 2>&1
    status=$?
    [ "$status" -eq 2 ] || fail "$name: ckpt export exited $status, expected 2"
    [ ! -e "$case_dir/out.safetensors" ] || fail "$name: ckpt export left an output file"
  fi
  [ "$(snapshot "$case_dir" | grep -v '/run/')" = "$(echo "$before" | grep -v '/run/')" ] ||
    fail "$name: files under the checkpoint directory changed or disappeared"
  [ "$(snapshot "$case_dir/run")" = "$run_before" ] ||
    { fail "$name: the failed resume changed the run directory (config.yaml, metrics or new files)";
      diff <(echo "$run_before") <(snapshot "$case_dir/run") >&2; }
  [ "$failures" -eq "$failures_before" ] && echo "ok: $name: exit 2 naming '$needle', nothing deleted"
}

new_case() {  # NAME: a copy of the good checkpoints in $work/NAME/ckpt
  mkdir -p "$work/$1"
  cp -r "$work/good/ckpt" "$work/$1/ckpt"
}

shard="shard-00000.bin"
extra_args=()
new_case truncated
truncate -s -9 "$work/truncated/ckpt/step-000000004/$shard"
check_damage truncated "step-000000004/$shard is truncated" yes

new_case flipped
victim="blocks.1.moe.experts.2.w2"
offset=$(tensor_offset "$newest" "$victim")
[ -n "$offset" ] || fail "no offset for $victim"
flip_byte "$work/flipped/ckpt/step-000000004/$shard" $((offset + 1000))
check_damage flipped "step-000000004/$shard is corrupt: tensor $victim" yes

new_case missing_shard
rm "$work/missing_shard/ckpt/step-000000004/$shard"
check_damage missing_shard "step-000000004/$shard is missing" yes

new_case missing_manifest
rm "$work/missing_manifest/ckpt/step-000000004/manifest.json"
check_damage missing_manifest "step-000000004/manifest.json is missing" yes

new_case incomplete
rm "$work/incomplete/ckpt/step-000000004/COMPLETE"
check_damage incomplete "step-000000004/COMPLETE is missing" yes

new_case edited
sed -i 's/"tokens_seen": \([0-9]*\)/"tokens_seen": 1\1/' "$work/edited/ckpt/step-000000004/manifest.json"
check_damage edited "step-000000004/manifest.json does not match its completion marker" yes

new_case other_model
extra_args=(--set model.n_heads=2)
check_damage other_model "step-000000004/manifest.json is of another model: model.n_heads is 4 there, 2 in this run" no
extra_args=()

# --resume auto: the damaged newest is reported and skipped; the run continues from step 2 (and,
# stopping at step 3, saves step-3 beside the others: every file that was there stays as it was).
for name in flipped incomplete truncated; do
  before="$(snapshot "$work/$name/ckpt")"
  timeout 120 "$binary" train "${common[@]}" --set training.steps=3 --set "logging.run_dir=$work/$name/auto" \
    --set "checkpoint.dir=$work/$name/ckpt" --resume auto >"$work/$name.auto.log" 2>&1
  status=$?
  [ "$status" -eq 0 ] || fail "$name: --resume auto exited $status"
  grep -q "resume: skipping $work/$name/ckpt/step-000000004: " "$work/$name.auto.log" ||
    fail "$name: --resume auto did not report the damaged checkpoint"
  grep -q "resumed from $work/$name/ckpt/step-000000002 at step 2" "$work/$name.auto.log" ||
    fail "$name: --resume auto did not continue from step 2"
  [ -z "$(comm -23 <(echo "$before") <(snapshot "$work/$name/ckpt"))" ] ||
    fail "$name: --resume auto changed or removed files of the checkpoints"
done
echo "ok: --resume auto skips damaged checkpoints and continues from the older one"

# Paths that are not checkpoints.
timeout 60 "$binary" train "${common[@]}" --set "logging.run_dir=$work/x" --resume "$work/absent" >"$work/absent.log" 2>&1
[ $? -eq 2 ] && grep -q "$work/absent' does not exist" "$work/absent.log" || fail "a missing --resume path is not exit 2"
timeout 60 "$binary" train "${common[@]}" --set "logging.run_dir=$work/x" --resume "$work/good/ckpt" >"$work/root.log" 2>&1
[ $? -eq 2 ] && grep -q "holds checkpoints but is not one" "$work/root.log" || fail "a checkpoint.dir as --resume is not exit 2"

# Two ranks: only rank 1 reads the damaged expert, and the whole job still fails cleanly with 2.
timeout 120 "${mpi[@]}" "$binary" train "${common[@]}" --set checkpoint.every=2 --set parallel.ep_size=2 \
  --set "logging.run_dir=$work/two" --set "checkpoint.dir=$work/two/ckpt" >"$work/two.log" 2>&1 ||
  fail "the 2-rank run exited $?"
two="$work/two/ckpt/step-000000004"
victim="blocks.1.moe.experts.3.w1"
line=$("$binary" ckpt inspect "$two" --tensors --no-verify | awk -v name="$victim" '$1 == name { print $(NF - 4), $(NF - 2) }')
file=${line% *}
offset=${line#* }
[ "$file" = "shard-00001.bin" ] || fail "expert 3 is in '$file', expected rank 1's shard"
flip_byte "$two/$file" $((offset + 10))
before="$(snapshot "$work/two/ckpt")"
timeout 120 "${mpi[@]}" "$binary" train "${common[@]}" --set parallel.ep_size=2 --set "logging.run_dir=$work/two_resume" \
  --resume "$two" >"$work/two_resume.log" 2>&1
status=$?
[ "$status" -eq 2 ] || fail "2 ranks, corrupt expert on rank 1: mpirun exited $status, expected 2"
grep -q "switchyard: error: .*$two/$file is corrupt: tensor $victim" "$work/two_resume.log" ||
  fail "2 ranks: the error does not name the damaged file and tensor"
[ "$(snapshot "$work/two/ckpt")" = "$before" ] || fail "2 ranks: the checkpoints changed"
[ -z "$(ls -A "$work/two_resume" 2>/dev/null)" ] ||
  fail "2 ranks: the failed resume wrote into its run directory: $(ls -A "$work/two_resume" | tr '\n' ' ')"
echo "ok: 2 ranks: a corrupt expert read by rank 1 only ends the job with status 2"

summarize_and_exit "bad-input checkpoint checks"
