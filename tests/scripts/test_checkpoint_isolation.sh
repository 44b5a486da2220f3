#!/usr/bin/env bash
# A run never touches another run's checkpoints. configs/tiny-cpu.yaml, shortened (4
# steps, a checkpoint after each, keep_last 2), on CPU ranks:
#   A. the issue's three commands with the default checkpoint.dir (<logging.run_dir>/checkpoints):
#      `mpirun -np 2 ... --set logging.run_dir=runs/ep2`, then `--set logging.run_dir=runs/other
#      --resume auto` (starts fresh in its own folder instead of resuming ep2's run), then
#      `--set moe.num_experts=3` (its own folder): each folder holds exactly its run's checkpoints,
#      and earlier runs' files stay byte for byte;
#   B. the same runs sharing one folder (checkpoint.dir set, as the configs did before): a fresh
#      run there is refused (exit 2, saying how to resume or pick another folder); the
#      other-model run with --resume auto reports and skips the 2-rank run's checkpoints, saves
#      its own beside them (step-N-<run id>) and prunes only its own; --resume PATH to the other
#      model is exit 2 naming the difference and writes nothing; --resume auto picks each model's
#      own; --start-over in the first run's directory starts a new run (new run id) beside all of
#      them, keeping the previous config.yaml and metrics, and a later --resume auto there
#      continues the new run; --start-over with --resume is exit 2. Every checkpoint verifies.
# Usage: test_checkpoint_isolation.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC
set -u
source "$(dirname "$0")/lib.sh"

awk 'BEGIN { srand(11); for (i = 0; i < 5000; i++) printf "%c%s", 97 + int(rand() * 12), (rand() < 0.2 ? " " : "") }' \
  >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" >/dev/null 2>&1 ||
  { echo "FAIL: prepare-data"; exit 1; }
config="$source_dir/configs/tiny-cpu.yaml"
common=(--set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin" --set training.steps=4
        --set optimizer.warmup_steps=1 --set training.eval_every=0 --set training.micro_batch_size=4
        --set checkpoint.every=1 --set checkpoint.keep_last=2)
cd "$work" || exit 1  # relative run directories, as in the issue

# train NAME [mpirun -np 2] ARGS...: `switchyard train CONFIG` with the common settings from $work;
# output in $work/NAME.log; sets status.
train() {
  local name="$1"
  shift
  local launcher=()
  if [ "${1:-}" = "-np2" ]; then launcher=("${mpi[@]}"); shift; fi
  timeout 180 "${launcher[@]}" "$binary" train "$config" "${common[@]}" "$@" >"$work/$name.log" 2>&1
  status=$?
}
expect_ok() {  # NAME WHAT
  [ "$status" -eq 0 ] || { fail "$2: exited $status"; tail -5 "$work/$1.log" >&2; }
}
snapshot() { (cd "$1" && find . -type f -exec cksum {} + | sort); }
steps_in() { ls "$1" 2>/dev/null | grep '^step-' | tr '\n' ' '; }
run_id_of() { sed -n 's/^ *"run_id": "\([0-9a-f]*\)".*/\1/p' "$1/manifest.json"; }
run_ids_in() { for d in "$1"/step-*; do run_id_of "$d"; done | sort -u | tr '\n' ' '; }

# ---- A. the issue's commands, default folders ----------------------------------------------------
train a_ep2 -np2 --set parallel.ep_size=2 --set logging.run_dir=runs/ep2
expect_ok a_ep2 "A: the 2-rank run"
[ "$(steps_in runs/ep2/checkpoints)" = "step-000000003 step-000000004 " ] ||
  fail "A: runs/ep2/checkpoints holds '$(steps_in runs/ep2/checkpoints)', expected steps 3 and 4"
ep2_files="$(snapshot runs/ep2/checkpoints)"

train a_other --set logging.run_dir=runs/other --resume auto
expect_ok a_other "A: the --resume auto run in runs/other"
grep -q "resumed from" "$work/a_other.log" && fail "A: runs/other resumed another run: $(grep 'resumed from' "$work/a_other.log")"
grep -q "no usable checkpoint in runs/other/checkpoints; starting from step 0" "$work/a_other.log" ||
  fail "A: runs/other did not start fresh in its own folder"

train a_three --set moe.num_experts=3
expect_ok a_three "A: the 3-expert run"
[ "$(steps_in runs/tiny-cpu/checkpoints)" = "step-000000003 step-000000004 " ] ||
  fail "A: the 3-expert run's folder holds '$(steps_in runs/tiny-cpu/checkpoints)'"
[ "$(snapshot runs/ep2/checkpoints)" = "$ep2_files" ] || fail "A: the 2-rank run's checkpoints changed"
for folder in runs/ep2/checkpoints runs/other/checkpoints runs/tiny-cpu/checkpoints; do
  ids=$(run_ids_in "$folder")
  [ "$(echo "$ids" | wc -w)" -eq 1 ] || fail "A: $folder holds checkpoints of run ids '$ids', expected one run's"
done
[ "$(run_ids_in runs/ep2/checkpoints)" != "$(run_ids_in runs/other/checkpoints)" ] || fail "A: two runs share a run id"
[ "$failures" -eq 0 ] && echo "ok: A: the issue's three runs each keep their own checkpoints"

# ---- B. one shared folder ------------------------------------------------------------------------
failures_before=$failures
train b_ep2 -np2 --set parallel.ep_size=2 --set logging.run_dir=runs/b-ep2 --set checkpoint.dir=shared
expect_ok b_ep2 "B: the 2-rank run"
first_id=$(run_id_of shared/step-000000004)
[ -n "$first_id" ] || fail "B: no run id in shared/step-000000004/manifest.json"
first_files="$(snapshot shared)"
unchanged() {  # WHAT: the 2-rank run's checkpoints are all there, byte for byte
  [ -z "$(comm -23 <(echo "$first_files") <(snapshot shared))" ] || fail "$1: the first run's checkpoints changed"
}

# A fresh run in that folder is refused, saying what to do; nothing is written.
train b_fresh --set logging.run_dir=runs/b-other --set checkpoint.dir=shared
[ "$status" -eq 2 ] || fail "B: a fresh run in another run's folder exited $status, expected 2"
for needle in "checkpoint.dir 'shared' already holds 2 checkpoint(s) of another run" "run id $first_id" \
              "--resume auto" "--set checkpoint.dir=" "--start-over"; do
  grep -q -- "switchyard: error: .*$needle" "$work/b_fresh.log" || fail "B: the refusal does not say '$needle'"
done
[ ! -e runs/b-other ] || fail "B: the refused run created runs/b-other"
train b_fresh_same -np2 --set parallel.ep_size=2 --set logging.run_dir=runs/b-ep2 --set checkpoint.dir=shared
[ "$status" -eq 2 ] || fail "B: rerunning the first run's command without --resume exited $status, expected 2"
unchanged "B: the refused runs"

# The issue's third run, sharing the folder: the other model is skipped, never loaded or pruned.
train b_three --set logging.run_dir=runs/b-three --set checkpoint.dir=shared --set moe.num_experts=3 --resume auto
expect_ok b_three "B: the 3-expert run with --resume auto"
for step in 4 3; do
  grep -q "resume: skipping shared/step-00000000$step: another model (moe.num_experts is 4 there, 3 in this run)" \
    "$work/b_three.log" || fail "B: the 3-expert run did not report skipping step $step of the other model"
done
grep -q "resumed from" "$work/b_three.log" && fail "B: the 3-expert run loaded a checkpoint of another model"
three_id=$(run_id_of "shared/step-000000004-$(sed -n 's/.*run id \([0-9a-f]*\) (a new run).*/\1/p' "$work/b_three.log")")
[ -n "$three_id" ] && [ "$three_id" != "$first_id" ] ||
  fail "B: no shared/step-000000004-<run id> of the 3-expert run ($(steps_in shared))"
[ "$(steps_in shared)" = "step-000000003 step-000000003-$three_id step-000000004 step-000000004-$three_id " ] ||
  fail "B: shared holds '$(steps_in shared)'"
unchanged "B: the 3-expert run"

# --resume PATH to the other model: exit 2 naming the difference; nothing written.
train b_wrong --set logging.run_dir=runs/b-wrong --set checkpoint.dir=shared --set moe.num_experts=3 \
  --resume shared/step-000000004
[ "$status" -eq 2 ] || fail "B: --resume PATH of another model exited $status, expected 2"
grep -q "switchyard: error: .*shared/step-000000004/manifest.json is of another model: moe.num_experts is 4 there, 3 in this run" \
  "$work/b_wrong.log" || fail "B: the wrong --resume does not name the difference"
[ ! -e runs/b-wrong ] || fail "B: the refused --resume wrote into runs/b-wrong"

# --resume auto continues each model's own run.
train b_three_more --set logging.run_dir=runs/b-three --set checkpoint.dir=shared --set moe.num_experts=3 \
  --set training.steps=5 --resume auto
expect_ok b_three_more "B: the 3-expert run resumed"
grep -q "resumed from shared/step-000000004-$three_id at step 4" "$work/b_three_more.log" ||
  fail "B: the 3-expert run did not resume its own step 4"
unchanged "B: the 3-expert run resumed"
[ "$failures" -eq "$failures_before" ] && echo "ok: B: a shared folder: fresh start refused, other model skipped and kept"

# --start-over in the first run's directory: a new run beside the others, deleting nothing.
failures_before=$failures
"$binary" train --help | grep -q -- "--start-over" || fail "B: train --help does not document --start-over"
cp runs/b-ep2/config.yaml "$work/b-ep2.config.yaml"
cp runs/b-ep2/metrics.jsonl "$work/b-ep2.metrics.jsonl"
cp runs/b-ep2/final.weights "$work/b-ep2.final.weights"
before_start_over="$(snapshot shared)"
train b_start_over --set logging.run_dir=runs/b-ep2 --set checkpoint.dir=shared --set parallel.ep_size=1 --start-over
expect_ok b_start_over "B: --start-over"
new_id=$(sed -n 's/.*run id \([0-9a-f]*\) (a new run).*/\1/p' "$work/b_start_over.log")
[ -n "$new_id" ] && [ "$new_id" != "$first_id" ] || fail "B: --start-over did not start a new run id ('$new_id')"
[ -z "$(comm -23 <(echo "$before_start_over") <(snapshot shared))" ] || fail "B: --start-over changed or removed checkpoints"
[ "$(run_id_of "shared/step-000000004-$new_id")" = "$new_id" ] || fail "B: no shared/step-000000004-$new_id"
cmp -s runs/b-ep2/config.before-start-over-1.yaml "$work/b-ep2.config.yaml" ||
  fail "B: --start-over did not keep the previous config.yaml"
cmp -s runs/b-ep2/metrics.before-start-over-1.jsonl "$work/b-ep2.metrics.jsonl" ||
  fail "B: --start-over did not keep the previous metrics"
cmp -s runs/b-ep2/final.before-start-over-1.weights "$work/b-ep2.final.weights" ||
  fail "B: --start-over did not keep the previous final.weights"
[ "$(cat runs/b-ep2/run_id)" = "$new_id" ] || fail "B: runs/b-ep2/run_id is not the new run's"
train b_start_over_more --set logging.run_dir=runs/b-ep2 --set checkpoint.dir=shared --set parallel.ep_size=1 \
  --set training.steps=5 --resume auto
expect_ok b_start_over_more "B: resuming after --start-over"
grep -q "resumed from shared/step-000000004-$new_id at step 4" "$work/b_start_over_more.log" ||
  fail "B: --resume auto after --start-over did not continue the new run"
train b_both --set logging.run_dir=runs/b-ep2 --set checkpoint.dir=shared --start-over --resume auto
[ "$status" -eq 2 ] && grep -q "give only one of them" "$work/b_both.log" || fail "B: --start-over with --resume is not exit 2"
unchanged "B: after --start-over"
"$binary" ckpt inspect shared >"$work/inspect.log" 2>&1 || { fail "B: ckpt inspect shared found problems"; cat "$work/inspect.log" >&2; }
[ "$failures" -eq "$failures_before" ] && echo "ok: B: --start-over writes beside every other run's checkpoints"

summarize_and_exit "checkpoint isolation checks"
