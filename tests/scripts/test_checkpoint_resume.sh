#!/usr/bin/env bash
# Whole-program checkpoint test on the CPU backend (configs/tiny-cpu.yaml, shortened):
#   1. straight: 16 steps under mpirun -np 2, ep_size 2, checkpoints at steps 8 and 16;
#   2. exact resume: a second run started from the step-8 checkpoint (--resume PATH) repeats
#      steps 9..16 bit for bit: the same losses, the same tensor checksums in its step-16
#      checkpoint (masters and both AdamW moments), the same final.weights tensors;
#   3. preemption: SIGUSR1 to mpirun (forwarded to the ranks, as SLURM's --signal does) finishes
#      the step, saves, exits 0; --resume auto continues, and the whole run's metrics equal the
#      straight run's; SIGTERM to a single process does the same;
#   4. resharding: the 2-rank step-8 checkpoint resumes on 4 ranks with ep_size 4, that one on
#      2 ranks with ep_size 2 again; ckpt inspect verifies; generate samples from a checkpoint;
#   5. ckpt export writes a safetensors file that a strict reader of the format accepts (Python's
#      json + struct here; the safetensors package too when it is installed).
# Usage: test_checkpoint_resume.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC
# On GPUs (one rank per GPU; the 4-rank part needs 4 GPUs and is skipped with fewer):
#   SWITCHYARD_TEST_DEVICE=cuda bash tests/scripts/test_checkpoint_resume.sh build/switchyard . mpirun
# runs the same checks with training.device = cuda and bf16 compute (parallel.deterministic on).
set -u
source "$(dirname "$0")/lib.sh"
mpi_flags+=(-x NCCL_NVLS_ENABLE=0)
device="${SWITCHYARD_TEST_DEVICE:-cpu}"
device_args=()
max_ranks=4
if [ "$device" = cuda ]; then
  device_args=(--set training.device=cuda --set model.compute_dtype=bf16)
  max_ranks=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  [ "$max_ranks" -ge 2 ] || { echo "SWITCHYARD_TEST_DEVICE=cuda needs at least 2 GPUs, found $max_ranks"; exit 1; }
  echo "device: cuda, $max_ranks GPU(s)"
fi

# A generated corpus (fixed seed) as token files.
awk 'BEGIN {
  srand(11);
  split("the nation|our people|the congress|every citizen|this union|the world", s, "|");
  split("will build|must defend|has seen|shall honor|can restore|will remember", v, "|");
  split("a stronger economy|the common good|our freedom|new schools|peace abroad|fair wages", o, "|");
  for (i = 0; i < 3000; i++) printf "%s %s %s%s", s[int(rand() * 6) + 1], v[int(rand() * 6) + 1], o[int(rand() * 6) + 1], (rand() < 0.25 ? ".\n" : ". ");
}' >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" >"$work/prepare.log" 2>&1 ||
  { echo "FAIL: prepare-data"; cat "$work/prepare.log"; exit 1; }

common=("$source_dir/configs/tiny-cpu.yaml" --set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin"
        --set training.steps=16 --set optimizer.warmup_steps=4 --set training.eval_every=8 --set training.log_every=4
        --set checkpoint.keep_last=0 --set parallel.deterministic=true ${device_args[@]+"${device_args[@]}"})
# command_for NAME RANKS EP [extra args...]: sets `command` to a run in $work/NAME (checkpoints in
# $work/NAME/ckpt). train runs it, output in $work/NAME.log, and returns its exit status.
command_for() {
  local name="$1" ranks="$2" ep="$3"
  shift 3
  command=(timeout 300)
  if [ "$ranks" -gt 1 ]; then command+=("$mpiexec" -np "$ranks" "${mpi_flags[@]}"); fi
  command+=("$binary" train "${common[@]}" --set "parallel.ep_size=$ep" --set "logging.run_dir=$work/$name"
            --set "checkpoint.dir=$work/$name/ckpt" "$@")
}
train() {
  command_for "$@"
  "${command[@]}" >"$work/$1.log" 2>&1
}
losses() { grep -o '"loss":[-0-9.eE+]*' "$1" | cut -d: -f2; }
# checksums CHECKPOINT: every tensor's name and XXH64 from ckpt inspect --tensors.
checksums() { "$binary" ckpt inspect "$1" --tensors --no-verify | awk '/^    / { print $1, $NF }'; }
weights_tensors() {
  local config_bytes
  config_bytes=$(od -An -t u8 -j 16 -N 8 "$1" | tr -d ' ')
  tail -c +$((24 + config_bytes + 1)) "$1"
}
step8() { echo "$work/$1/ckpt/step-000000008"; }

# ---- 1. straight ---------------------------------------------------------------------------------
train straight 2 2 --set checkpoint.every=8 || { fail "the straight run exited $?"; tail -5 "$work/straight.log" >&2; }
[ "$(losses "$work/straight/metrics.jsonl" | wc -l)" -eq 16 ] || fail "the straight run did not log 16 steps"
for step in 8 16; do
  [ -f "$work/straight/ckpt/step-$(printf %09d $step)/COMPLETE" ] || fail "no complete checkpoint at step $step"
done
reference_checksums="$(checksums "$work/straight/ckpt/step-000000016")"
[ "$(echo "$reference_checksums" | wc -l)" -gt 30 ] || fail "ckpt inspect --tensors listed too few tensors"

# ---- 2. exact resume from a path -----------------------------------------------------------------
train resumed 2 2 --set checkpoint.every=8 --resume "$(step8 straight)" || fail "the resumed run exited $?"
grep -q "resumed from $(step8 straight) at step 8" "$work/resumed.log" || fail "the resumed run did not report step 8"
if cmp -s <(losses "$work/straight/metrics.jsonl" | tail -8) <(losses "$work/resumed/metrics.jsonl"); then
  echo "ok: 8 steps + resume + 8 steps = 16 steps straight (identical losses)"
else
  fail "the resumed run's losses differ from the straight run's steps 9..16"
fi
[ "$(checksums "$work/resumed/ckpt/step-000000016")" = "$reference_checksums" ] &&
  echo "ok: and bit-identical weights and AdamW moments at step 16" || fail "step-16 tensors differ after resuming"
cmp -s <(weights_tensors "$work/straight/final.weights") <(weights_tensors "$work/resumed/final.weights") ||
  fail "final.weights differ after resuming"

# ---- 3. preemption -------------------------------------------------------------------------------
run_preempted() {  # NAME RANKS EP SIGNAL: start, wait for 3 logged steps, send SIGNAL, expect exit 0
  local name="$1" ranks="$2" ep="$3" signal="$4"
  command_for "$name" "$ranks" "$ep" --set checkpoint.every=1000
  local status
  if [ "$device" = cuda ]; then
    # A GPU runs the 16 steps before a signal from outside can land: the process signals itself
    # after step 3 instead (every rank; the same handler and stop agreement run).
    local lower
    lower=$(echo "$signal" | tr 'A-Z' 'a-z')
    SWITCHYARD_INJECT_FAULT="*:after_step_3:sig$lower" "${command[@]}" >"$work/$name.log" 2>&1
    status=$?
  else
    "${command[@]}" >"$work/$name.log" 2>&1 &
    local pid=$! waited=0
    while [ "$(cat "$work/$name/metrics.jsonl" 2>/dev/null | wc -l)" -lt 3 ] && [ "$waited" -lt 600 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    # timeout's child: mpirun (which forwards SIGUSR1 and SIGTERM to the ranks) or the one rank.
    local target
    target=$(pgrep -P "$pid" | head -1)
    kill "-$signal" "${target:-$pid}"
    wait "$pid"
    status=$?
    if [ "$status" -eq 0 ] && ! grep -q "SIG$signal received" "$work/$name.log" &&
        grep -q "done: step 16 " "$work/$name.log"; then
      # The run finished before the signal reached the ranks (seen on a 64-core machine with Open
      # MPI 4.1.6; CI's runs are slow enough): check the same handler with a self-sent signal.
      echo "note: $name: the outside SIG$signal landed after the last step; retrying with a self-sent one"
      rm -rf "${work:?}/$name"
      local lower
      lower=$(echo "$signal" | tr 'A-Z' 'a-z')
      SWITCHYARD_INJECT_FAULT="*:after_step_3:sig$lower" "${command[@]}" >"$work/$name.log" 2>&1
      status=$?
    fi
  fi
  [ "$status" -eq 0 ] || fail "$name: the $signal-preempted run exited $status"
  grep -q "SIG$signal received" "$work/$name.log" || fail "$name: no SIG$signal message"
  local stopped
  stopped=$(sed -n 's/.*preempted at step \([0-9]*\) of.*/\1/p' "$work/$name.log")
  if [ -n "$stopped" ] && [ "$stopped" -lt 16 ] && [ -f "$work/$name/ckpt/step-$(printf %09d "$stopped")/COMPLETE" ]; then
    echo "ok: $name: SIG$signal -> checkpoint at step $stopped, exit 0"
  else
    fail "$name: no preemption checkpoint (stopped at '${stopped}')"
    tail -5 "$work/$name.log" >&2
  fi
  mv "$work/$name.log" "$work/$name.first.log"
  train "$name" "$ranks" "$ep" --set checkpoint.every=1000 --resume auto || fail "$name: resuming exited $?"
  grep -q "resumed from $work/$name/ckpt/step-$(printf %09d "${stopped:-0}") at step ${stopped:-x}" "$work/$name.log" ||
    fail "$name: --resume auto did not continue from step $stopped"
}
run_preempted preempted 2 2 USR1
if cmp -s <(losses "$work/straight/metrics.jsonl") <(losses "$work/preempted/metrics.jsonl"); then
  echo "ok: preempted + resumed auto = straight (all 16 losses identical)"
else
  fail "the preempted-and-resumed run's losses differ from the straight run's"
fi
[ "$(checksums "$work/preempted/ckpt/step-000000016")" = "$reference_checksums" ] ||
  fail "step-16 tensors differ after preemption and resume"
run_preempted single 1 1 TERM
[ "$(losses "$work/single/metrics.jsonl" | wc -l)" -eq 16 ] || fail "the single-process run did not end with 16 logged steps"

# ---- 4. resharding -------------------------------------------------------------------------------
wide=4
[ "$max_ranks" -ge 4 ] || { wide=2; echo "note: fewer than 4 GPUs: resharding 2 ranks ep 2 -> 2 ranks ep 1 instead"; }
wide_ep=$([ "$wide" -eq 4 ] && echo 4 || echo 1)
train wide "$wide" "$wide_ep" --set training.steps=10 --set checkpoint.every=1000 --resume "$(step8 straight)" ||
  fail "resuming the 2-rank checkpoint on $wide ranks (ep_size $wide_ep) exited $?"
grep -q "resumed from $(step8 straight) at step 8" "$work/wide.log" || fail "$wide ranks did not resume at step 8"
"$binary" ckpt inspect "$work/wide/ckpt/step-000000010" >"$work/inspect_wide.log" 2>&1 ||
  fail "ckpt inspect of the $wide-rank checkpoint failed"
grep -q "$wide rank(s), ep_size $wide_ep" "$work/inspect_wide.log" || fail "ckpt inspect does not show $wide ranks, ep_size $wide_ep"
grep -q "every checksum matches" "$work/inspect_wide.log" || fail "ckpt inspect did not verify the $wide-rank checkpoint"
train back 2 2 --set training.steps=12 --set checkpoint.every=1000 --resume "$work/wide/ckpt/step-000000010" ||
  fail "resuming the $wide-rank checkpoint on 2 ranks (ep_size 2) exited $?"
grep -q "at step 10" "$work/back.log" && [ -f "$work/back/ckpt/step-000000012/COMPLETE" ] &&
  echo "ok: 2 ranks (ep 2) -> $wide ranks (ep $wide_ep) -> 2 ranks (ep 2)" ||
  fail "the $wide -> 2 rank resume did not reach step 12"
timeout 60 "$binary" generate --checkpoint "$work/wide/ckpt/step-000000010" --prompt "the nation " --max-new-tokens 30 \
  --seed 2 --device "$device" >"$work/generate.out" 2>"$work/generate.err" || fail "generate from a checkpoint exited $?"
grep -q "^the nation " "$work/generate.out" || fail "generate from a checkpoint printed nothing useful"

# ---- 5. safetensors export -----------------------------------------------------------------------
for dtype in fp32 bf16; do
  out="$work/model-$dtype.safetensors"
  "$binary" ckpt export "$work/straight/ckpt/step-000000016" --format safetensors "$out" --dtype "$dtype" \
    >"$work/export.log" 2>&1 || { fail "ckpt export --dtype $dtype exited $?"; cat "$work/export.log" >&2; continue; }
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$out" "$dtype" <<'PY' || fail "the $dtype safetensors file does not follow the format"
import json, struct, sys
path, dtype = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
(n,) = struct.unpack("<Q", data[:8])
assert (8 + n) % 8 == 0, "data not 8-byte aligned"
header = json.loads(data[8:8 + n].decode("utf-8"))
meta = header.pop("__metadata__")
assert all(isinstance(v, str) for v in meta.values()), "metadata values must be strings"
size = {"F32": 4, "BF16": 2}
end = 0
for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
    begin, stop = info["data_offsets"]
    assert begin == end, f"{name}: gap or overlap at {begin}"
    count = 1
    for dim in info["shape"]:
        count *= dim
    assert info["dtype"] == ("F32" if dtype == "fp32" else "BF16"), name
    assert stop - begin == count * size[info["dtype"]], name
    end = stop
assert 8 + n + end == len(data), "trailing or missing bytes"
assert "blocks.1.moe.experts.3.w1" in header and header["blocks.1.moe.experts.3.w1"]["shape"] == [64, 128]
try:
    from safetensors.numpy import load_file
except ImportError:
    print("  (python safetensors not installed: checked the format with json + struct only)")
else:
    if dtype == "fp32":
        tensors = load_file(path)
        assert tensors["embedding.token"].shape == (256, 64)
        print("  (python safetensors loaded it)")
PY
  fi
done
[ "$failures" -eq 0 ] && echo "ok: ckpt export writes valid safetensors (fp32, bf16)"

summarize_and_exit "checkpoint resume checks"
