#!/usr/bin/env bash
# Whole-program tests of the CLI: help and exit codes, config errors, prepare-data output bytes,
# and `train --dry-run` alone and under mpirun.
# Usage: test_cli.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC
set -u

source "$(dirname "$0")/lib.sh"

# expect_exit CODE DESCRIPTION -- COMMAND...: runs COMMAND, stdout/stderr to $work/out, $work/err.
expect_exit() {
  local expected="$1" description="$2"
  shift 3
  timeout 180 "$@" >"$work/out" 2>"$work/err"
  local actual=$?
  if [ "$actual" -ne "$expected" ]; then
    fail "$description: exit $actual, expected $expected (command: $*)"
    sed 's/^/    stderr: /' "$work/err" | head -20 >&2
    return 1
  fi
  echo "ok: $description (exit $actual)"
  return 0
}

expect_in() {  # expect_in FILE TEXT DESCRIPTION
  if ! grep -qF -- "$2" "$1"; then
    fail "$3: '$2' not found in $(basename "$1")"
    sed 's/^/    /' "$1" | head -20 >&2
  fi
}

mpi_run2=("$mpiexec" -np 2 --oversubscribe --allow-run-as-root --bind-to none)

# ---- Help, version, unknown commands and flags -----------------------------------------------
expect_exit 0 "switchyard --help" -- "$binary" --help && expect_in "$work/out" "prepare-data" "--help lists commands"
expect_exit 0 "switchyard -h" -- "$binary" -h
expect_exit 0 "switchyard help" -- "$binary" help
expect_exit 0 "switchyard --version" -- "$binary" --version && expect_in "$work/out" "switchyard" "--version"
for command in train prepare-data bench; do
  expect_exit 0 "switchyard $command --help" -- "$binary" "$command" --help && expect_in "$work/out" "Usage:" "$command --help"
  expect_exit 0 "switchyard help $command" -- "$binary" help "$command"
done
expect_exit 0 "switchyard bench comm --help" -- "$binary" bench comm --help
expect_exit 0 "switchyard bench optimizer --quick" -- "$binary" bench optimizer --quick --device cpu --iters 2 \
  --json "$work/optimizer.json" && expect_in "$work/out" "AdamW" "bench optimizer prints the AdamW pass" &&
  expect_in "$work/optimizer.json" '"pass": "grad_norm"' "bench optimizer --json writes its records"
expect_exit 2 "bench optimizer on the CPU without --quick" -- "$binary" bench optimizer --device cpu
expect_exit 2 "bench optimizer --params 5" -- "$binary" bench optimizer --quick --device cpu --params 5 &&
  expect_in "$work/err" "--params" "the bad --params is named"
expect_exit 0 "switchyard bench passes --quick" -- "$binary" bench passes --quick --device cpu --iters 2 \
  --json "$work/passes.json" && expect_in "$work/out" "layernorm backward" "bench passes prints the norm backward" &&
  expect_in "$work/passes.json" '"pass": "rotary forward' "bench passes --json writes its records"
expect_exit 2 "bench passes --heads 5" -- "$binary" bench passes --quick --device cpu --heads 5 &&
  expect_in "$work/err" "--heads" "the bad --heads is named"
expect_exit 2 "bench passes on the CPU in bf16" -- "$binary" bench passes --quick --device cpu --dtype bf16
expect_exit 2 "no command" -- "$binary"
expect_exit 2 "unknown command" -- "$binary" frobnicate && expect_in "$work/err" "--help" "unknown command hints at --help"
expect_exit 2 "unknown top-level flag" -- "$binary" --frobnicate
expect_exit 2 "unknown train flag" -- "$binary" train "$source_dir/configs/tiny-cpu.yaml" --frobnicate &&
  expect_in "$work/err" "--frobnicate" "unknown flag is named"
expect_exit 2 "train without a config" -- "$binary" train
expect_exit 2 "unknown benchmark" -- "$binary" bench frobnicate
expect_exit 2 "prepare-data without --output" -- "$binary" prepare-data "$source_dir/configs"

# ---- Broken configs: exit 2, key and file:line on stderr --------------------------------------
cat >"$work/broken.yaml" <<'EOF'
model:
  d_model: 64
  n_layers: 2
  n_heads: 4
  seq_len: 32
moe:
  num_experts: 8
  top_k: 9
training:
  steps: 10
data:
  path: x.bin
EOF
expect_exit 2 "out-of-range config value" -- "$binary" train "$work/broken.yaml" &&
  expect_in "$work/err" "broken.yaml:8: moe.top_k = 9 is out of range [1, 8]" "range error names key and line"
sed 's/  top_k: 9/  top_kk: 2/' "$work/broken.yaml" >"$work/typo.yaml"
expect_exit 2 "unknown config key" -- "$binary" train "$work/typo.yaml" &&
  expect_in "$work/err" "typo.yaml:8: unknown key moe.top_kk (did you mean moe.top_k?)" "unknown key names key and line"
printf 'model:\n  d_model: [64\n' >"$work/syntax.yaml"
expect_exit 2 "YAML syntax error" -- "$binary" train "$work/syntax.yaml" && expect_in "$work/err" "syntax.yaml:" "syntax error names the file"
expect_exit 2 "bad --set" -- "$binary" train "$source_dir/configs/tiny-cpu.yaml" --set moe.top_k=0 &&
  expect_in "$work/err" "--set moe.top_k=0: moe.top_k = 0 is out of range" "--set error names the argument"
expect_exit 2 "missing config file" -- "$binary" train "$work/absent.yaml" && expect_in "$work/err" "absent.yaml" "missing file named"
mkdir -p "$work/adir"
expect_exit 2 "a directory as the config" -- "$binary" train "$work/adir" &&
  expect_in "$work/err" "config file '$work/adir' is a directory; expected a YAML config file" "a directory config says so"
grep -q "empty" "$work/err" && fail "a directory config must not be called empty"
# The shipped tiny config from a place without data/tiny: the message names the command that makes it.
in_work=(bash -c 'cd "$0" && exec "$@"' "$work")  # relative data paths resolve in $work, where there are none
expect_exit 2 "train without its data files" -- "${in_work[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" \
  --set "logging.run_dir=$work/run_nodata" --dry-run &&
  expect_in "$work/err" "cannot open token file 'data/tiny/train.bin': No such file or directory; make it with \`switchyard prepare-data --output data/tiny/train.bin --val-output data/tiny/val.bin INPUT...\`" \
    "a missing data file names prepare-data"
expect_exit 2 "a sotu config without its data files" -- "${in_work[@]}" "$binary" train "$source_dir/configs/sotu-1gpu.yaml" \
  --set "logging.run_dir=$work/run_nosotu" --set training.device=cpu --dry-run &&
  expect_in "$work/err" "\`bash launch/get-data.sh\`" "a missing data/sotu file names get-data.sh"

# ---- Weights-reading commands document the path rule in --help ------------------------------
# (help text is wrapped: compare it as one line)
for command in generate specialize "ckpt export"; do
  # shellcheck disable=SC2086
  expect_exit 0 "switchyard $command --help" -- "$binary" $command --help &&
    tr -s ' \n' '  ' <"$work/out" >"$work/help_line" &&
    expect_in "$work/help_line" "a run folder (its newest complete checkpoint, else its final.weights), a checkpoint (step-*), a folder of checkpoints (its newest complete one) or a weights file" \
      "$command --help states the rule"
done
expect_exit 0 "switchyard report --help" -- "$binary" report --help &&
  tr -s ' \n' '  ' <"$work/out" >"$work/help_line" &&
  expect_in "$work/help_line" "the specialization map runs its newest complete checkpoint, else its final.weights" \
    "report --help states the rule"

# ---- prepare-data: exact bytes of both splits --------------------------------------------------
mkdir -p "$work/text/sub" "$work/text/.git"
head -c 3000 /dev/urandom | base64 -w0 >"$work/text/a.txt"          # no trailing newline
{ head -c 2000 /dev/urandom | base64 -w0; echo; } >"$work/text/sub/b.txt"  # ends with a newline
echo "hidden: must be skipped" >"$work/text/.hidden.txt"
echo "inside a hidden directory: skipped" >"$work/text/.git/c.txt"
expect_exit 0 "prepare-data" -- "$binary" prepare-data --output "$work/data/train.bin" --val-output "$work/data/val.bin" \
  --val-fraction 0.25 "$work/text"
size_a=$(stat -c %s "$work/text/a.txt")
size_b=$(stat -c %s "$work/text/sub/b.txt")
val_a=$((size_a / 4))
val_b=$((size_b / 4))
{ head -c $((size_a - val_a)) "$work/text/a.txt"; echo; head -c $((size_b - val_b)) "$work/text/sub/b.txt"; } >"$work/expected_train"
{ tail -c "$val_a" "$work/text/a.txt"; echo; tail -c "$val_b" "$work/text/sub/b.txt"; } >"$work/expected_val"
for split in train val; do
  file="$work/data/$split.bin"
  if [ ! -f "$file" ]; then
    fail "prepare-data did not write $split.bin"
    continue
  fi
  [ "$(head -c 8 "$file")" = "SWYTOKNS" ] || fail "$split.bin lacks the SWYTOKNS magic"
  tail -c +65 "$file" | cmp -s - "$work/expected_$split" || fail "$split.bin tokens differ from the expected bytes"
  expected_size=$((64 + $(stat -c %s "$work/expected_$split")))
  [ "$(stat -c %s "$file")" -eq "$expected_size" ] || fail "$split.bin is $(stat -c %s "$file") bytes, expected $expected_size"
done
expect_in "$work/out" "$(stat -c %s "$work/expected_train") tokens" "prepare-data prints the train count"
ls -A "$work/data" | grep -q '\.tmp\.' && fail "prepare-data left a temporary file"
expect_exit 2 "prepare-data on a missing input" -- "$binary" prepare-data --output "$work/x.bin" "$work/absent"
mkdir -p "$work/empty" && touch "$work/empty/e.txt"
expect_exit 2 "prepare-data on empty input" -- "$binary" prepare-data --output "$work/x.bin" "$work/empty"
mkdir -p "$work/readonly" && chmod 500 "$work/readonly"
if [ "$(id -u)" -ne 0 ]; then  # root writes anywhere
  expect_exit 2 "prepare-data to an unwritable directory" -- "$binary" prepare-data --output "$work/readonly/x.bin" "$work/text"
fi
expect_exit 2 "prepare-data output under a file" -- "$binary" prepare-data --output "$work/text/a.txt/x.bin" "$work/text"

# ---- train --dry-run ---------------------------------------------------------------------------
data=(--set "data.path=$work/data/train.bin" --set "data.val_path=$work/data/val.bin")
expect_exit 0 "train --dry-run" -- "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" \
  --set "logging.run_dir=$work/run1" --dry-run
expect_in "$work/out" "world 1" "dry run prints the layout"
[ -f "$work/run1/config.yaml" ] || fail "train did not write run1/config.yaml"
expect_exit 0 "train --dry-run again, same config" -- "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" \
  --set "logging.run_dir=$work/run1" --dry-run
expect_exit 2 "train into a run directory with a different config" -- "$binary" train "$source_dir/configs/tiny-cpu.yaml" \
  "${data[@]}" --set "logging.run_dir=$work/run1" --set training.steps=7 --dry-run &&
  expect_in "$work/err" "training.steps" "conflict names the differing key"
expect_exit 0 "train --dry-run on the resolved config it wrote" -- "$binary" train "$work/run1/config.yaml" --dry-run
expect_exit 2 "train with data too short for seq_len" -- "$binary" train "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" \
  --set "logging.run_dir=$work/run2" --set model.seq_len=100000 --dry-run

expect_exit 0 "train --dry-run under $mpiexec -np 2, ep_size 2" -- "${mpi_run2[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" \
  "${data[@]}" --set "logging.run_dir=$work/run_mpi" --set parallel.ep_size=2 --dry-run
expect_in "$work/out" "world 2" "mpirun dry run prints the layout"
expect_in "$work/out" "experts 2-3" "rank 1 holds the second expert shard"
expect_exit 2 "broken config under $mpiexec -np 2" -- "${mpi_run2[@]}" "$binary" train "$work/broken.yaml"
expect_exit 2 "ep_size not dividing the world under $mpiexec -np 2" -- "${mpi_run2[@]}" "$binary" train \
  "$source_dir/configs/tiny-cpu.yaml" "${data[@]}" --set "logging.run_dir=$work/run_mpi4" --set parallel.ep_size=4 --dry-run

summarize_and_exit "CLI checks"
