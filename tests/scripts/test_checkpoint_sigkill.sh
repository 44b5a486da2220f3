#!/usr/bin/env bash
# Crash safety: SIGKILL at any moment, during saves included, never costs more than the steps
# since the last complete checkpoint, and never leaves anything that passes for a checkpoint but
# is not one.
#
# A run of configs/tiny-cpu.yaml (shortened, a checkpoint after every step, keep_last 2) is
# killed with SIGKILL (its whole session: mpirun and every rank) again and again and restarted
# with --resume auto each time:
#   - deterministically inside each stage of a save: the fault points of src/train/checkpoint.h
#     make rank 0 (or, for the shard stage, the last rank) stop there until killed;
#   - at random moments, many times, one rank and two ranks (ep_size 2): 1 to 3 steps after the
#     restart, plus a random fraction of a step's time (measured on the uninterrupted run), so
#     the kills land anywhere in steps and saves whatever the machine's speed.
# After every kill: each checkpoint that has a COMPLETE marker passes `ckpt inspect` (every
# checksum), the newest complete step never goes backwards, and the restarted run reports that
# it resumed from exactly the newest complete checkpoint found before it started (or, when there
# was none, that it started fresh). Finally each run is completed and its metrics (the losses of
# all steps, across every restart) and final checkpoint tensors must equal a run never killed.
# Usage: test_checkpoint_sigkill.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC [RANDOM_KILLS]
set -u
source "$(dirname "$0")/lib.sh"
random_kills="${4:-12}"
sessions=()
cleanup() {  # replaces lib.sh's EXIT trap: stop what is still running, then remove $work
  for session in "${sessions[@]+"${sessions[@]}"}"; do kill_session "$session"; done
  rm -rf "$work"
}
trap cleanup EXIT
RANDOM=$(( $(date +%s) % 32768 ))
echo "random seed for the kill times: $RANDOM"

awk 'BEGIN { srand(3); for (i = 0; i < 6000; i++) printf "%c%s", 97 + int(rand() * 10), (rand() < 0.2 ? " " : "") }' \
  >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" >/dev/null 2>&1 ||
  { echo "FAIL: prepare-data"; exit 1; }
steps=0  # per scenario, below
common=("$source_dir/configs/tiny-cpu.yaml" --set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin"
        --set optimizer.warmup_steps=4 --set training.eval_every=0
        --set training.micro_batch_size=4 --set checkpoint.every=1 --set checkpoint.keep_last=2
        --set parallel.deterministic=true)

# Every process of session SID (mpirun puts each rank in its own process group, but they all stay
# in the session that setsid started).
kill_session() {
  local pids
  pids=$(ps -e -o pid=,sid= | awk -v sid="$1" '$2 == sid { print $1 }')
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  return 0
}
# The launcher itself runs (also before its setsid() call, when its session id is still ours: on a
# loaded machine the first check can come that early) or something in its session still runs.
session_alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null)
  if [ -n "$state" ] && [ "${state:0:1}" != "Z" ]; then return 0; fi
  [ -n "$(ps -e -o sid= | awk -v sid="$1" '$1 == sid')" ]
}

# start NAME RANKS [env assignments...]: starts a --resume auto run in its own session; sets `session`.
start() {
  local name="$1" ranks="$2"
  shift 2
  local launcher=()
  if [ "$ranks" -gt 1 ]; then launcher=("$mpiexec" -np "$ranks" "${mpi_flags[@]}" -x SWITCHYARD_INJECT_FAULT); fi
  env "$@" setsid "${launcher[@]}" "$binary" train "${common[@]}" --set "training.steps=$steps" \
    --set "parallel.ep_size=$ranks" \
    --set "logging.run_dir=$work/$name" --set "checkpoint.dir=$work/$name/ckpt" --resume auto \
    >"$work/$name.log" 2>&1 &
  session=$!  # setsid runs the program itself (not a process group leader here), so its pid is the session id
  sessions+=("$session")
}

newest_complete() {  # the newest step-* directory with a COMPLETE marker, or ""
  local found=""
  for directory in "$work/$1"/ckpt/step-*; do
    [ -f "$directory/COMPLETE" ] && found="$directory"
  done
  echo "$found"
}

# after_kill NAME EXPECTED: the checks after each kill; EXPECTED = newest complete before the start.
kills=0
resumes_checked=0
saves_interrupted=0
after_kill() {
  local name="$1" expected="$2" log="$work/$1.log"
  kills=$((kills + 1))
  cp "$log" "$work/$name.kill$kills.log"
  # A save was cut short when a temporary directory or a step without its marker is left.
  if ls -A "$work/$name/ckpt" 2>/dev/null | grep -q '^\.step-' ||
     [ -n "$(for d in "$work/$name"/ckpt/step-*; do [ -d "$d" ] && [ ! -f "$d/COMPLETE" ] && echo "$d"; done)" ]; then
    saves_interrupted=$((saves_interrupted + 1))
  fi
  if grep -q "resumed from\|no usable checkpoint" "$log"; then resumes_checked=$((resumes_checked + 1)); fi
  if grep -q "resumed from" "$log"; then
    grep -q "resumed from $expected at step" "$log" ||
      fail "kill $kills: resumed from '$(sed -n 's/.*resumed from \([^ ]*\) .*/\1/p' "$log")', expected $expected"
  elif grep -q "no usable checkpoint" "$log"; then
    [ -z "$expected" ] || fail "kill $kills: started fresh although $expected was complete"
  fi
  for directory in "$work/$name"/ckpt/step-*; do
    [ -f "$directory/COMPLETE" ] || continue
    "$binary" ckpt inspect "$directory" >"$work/inspect.log" 2>&1 ||
      { fail "kill $kills: $directory is marked complete but does not verify"; tail -2 "$work/inspect.log" >&2; }
  done
  local now
  now=$(newest_complete "$name")
  if [ -n "$expected" ] && [[ "$now" < "$expected" ]]; then
    fail "kill $kills: the newest complete checkpoint went back from $expected to '${now}'"
  fi
}

# kill_at NAME RANKS POINT RANK: rank RANK stops at fault point POINT; kill once it says so.
kill_at() {
  local name="$1" ranks="$2" point="$3" rank="$4"
  local expected
  expected=$(newest_complete "$name")
  start "$name" "$ranks" "SWITCHYARD_INJECT_FAULT=$rank:$point:hang"
  local waited=0
  until grep -q "stops participating at $point" "$work/$name.log" 2>/dev/null; do
    if ! session_alive "$session" || [ "$waited" -ge 1200 ]; then
      fail "$name: never reached $point"
      tail -3 "$work/$name.log" >&2
      break
    fi
    sleep 0.05
    waited=$((waited + 1))
  done
  kill_session "$session"
  wait "$session" 2>/dev/null
  after_kill "$name" "$expected"
}

step_ms=100  # one step and its save, measured by reference()
kill_randomly() {  # NAME RANKS: kill 1 to 3 steps after the restart, plus 0 .. 1.2 steps' time
  local name="$1" ranks="$2"
  local expected from target waited=0
  expected=$(newest_complete "$name")
  from=$(basename "${expected:-step-0}" | sed 's/^step-0*//')
  target=$(( ${from:-0} + 1 + RANDOM % 3 ))
  start "$name" "$ranks" SWITCHYARD_INJECT_FAULT=
  while session_alive "$session" && [ "$(cat "$work/$name/metrics.jsonl" 2>/dev/null | wc -l)" -lt "$target" ] &&
        [ "$waited" -lt 3000 ]; do
    sleep 0.02
    waited=$((waited + 1))
  done
  local delay_ms=$(( RANDOM % (step_ms * 12 / 10 + 1) ))
  sleep "$((delay_ms / 1000)).$(printf %03d $((delay_ms % 1000)))"
  kill_session "$session"
  wait "$session" 2>/dev/null
  after_kill "$name" "$expected"
}

# finish NAME RANKS: run to the end; the metrics and final tensors must equal the reference's.
losses() { grep -o '"loss":[-0-9.eE+]*' "$1" | cut -d: -f2; }
checksums() { "$binary" ckpt inspect "$1" --tensors --no-verify | awk '/^    / { print $1, $NF }'; }
finish() {
  local name="$1" ranks="$2" reference="$3"
  local expected
  expected=$(newest_complete "$name")
  start "$name" "$ranks" SWITCHYARD_INJECT_FAULT=
  wait "$session"
  local status=$?
  [ "$status" -eq 0 ] || { fail "$name: the final run exited $status"; tail -5 "$work/$name.log" >&2; }
  if [ -n "$expected" ]; then
    grep -q "resumed from $expected at step" "$work/$name.log" || fail "$name: the final run did not resume from $expected"
  fi
  if cmp -s <(losses "$work/$reference/metrics.jsonl") <(losses "$work/$name/metrics.jsonl"); then
    echo "ok: $name: after $kills kills in all, the losses of all $steps steps equal the uninterrupted run's"
  else
    fail "$name: the losses differ from the uninterrupted run's"
    diff <(losses "$work/$reference/metrics.jsonl") <(losses "$work/$name/metrics.jsonl") | head -5 >&2
  fi
  local final="ckpt/step-$(printf %09d "$steps")"
  [ "$(checksums "$work/$name/$final")" = "$(checksums "$work/$reference/$final")" ] ||
    fail "$name: the final checkpoint's tensors differ from the uninterrupted run's"
  "$binary" ckpt inspect "$work/$name/ckpt" >"$work/$name.inspect.log" 2>&1 ||
    { fail "$name: ckpt inspect of the checkpoint directory found problems"; cat "$work/$name.inspect.log" >&2; }
  if [ "$(ls -A "$work/$name/ckpt" | grep -c '^\.')" -ne 0 ]; then
    fail "$name: leftovers of interrupted saves remain"
    ls -lA "$work/$name/ckpt" >&2  # which leftovers, and which run ids the processes took
    grep -h "run id\|resumed from\|no usable checkpoint" "$work/$name".kill*.log "$work/$name.log" 2>/dev/null >&2
  fi
}

reference() {  # NAME RANKS: the uninterrupted run; sets step_ms
  local began
  began=$(date +%s%N)
  start "$1" "$2" SWITCHYARD_INJECT_FAULT=
  wait "$session" || { echo "FAIL: the reference run $1 exited $?"; tail "$work/$1.log"; exit 1; }
  step_ms=$(( ($(date +%s%N) - began) / 1000000 / steps ))
  echo "reference $1: $steps steps, about $step_ms ms per step and save"
}

# ---- one rank ----------------------------------------------------------------------------------
steps=$((8 + 4 * 4 + 2 * random_kills + 4))  # room for every kill to land before the end
reference reference1 1
for point in checkpoint_shard_written checkpoint_manifest_written checkpoint_renamed checkpoint_complete; do
  kill_randomly single 1  # some progress first, so that there is a complete checkpoint to go back to
  kill_at single 1 "$point" 0
done
for _ in $(seq "$random_kills"); do kill_randomly single 1; done
finish single 1 reference1

# ---- two ranks (ep_size 2) ---------------------------------------------------------------------
steps=20
reference reference2 2
kill_randomly double 2
kill_at double 2 checkpoint_shard_written 1
kill_at double 2 checkpoint_renamed 0
for _ in $(seq 3); do kill_randomly double 2; done
finish double 2 reference2

echo "$kills kills: $resumes_checked restarts checked for where they resumed, $saves_interrupted saves cut short"
[ "$resumes_checked" -ge $((kills / 2)) ] || fail "too few restarts got as far as resuming before their kill"
[ "$saves_interrupted" -ge 5 ] || fail "too few kills landed inside a save"
summarize_and_exit "SIGKILL checks"
