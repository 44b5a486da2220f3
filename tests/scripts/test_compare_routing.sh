#!/usr/bin/env bash
# launch/compare-routing.sh on the CPU, small enough for CI (well under a minute on 2 cores):
#   1. --table-only on a hand-written metrics file: the row's numbers are the last validation loss
#      (and / ln 2 in bits per byte), the mean and max of load_imbalance over every logged layer
#      and window, the mean dropped fraction, the median tokens/s without the first step; a run
#      folder without metrics gets a row that says so;
#   2. two variants of configs/tiny-cpu.yaml (top-1, top-2) trained for 8 steps each through the
#      script (extra --set arguments reach every run), one table row with numbers per config, the
#      run folders and logs where the script says; run again, a config starts over beside its
#      previous run (whose files are kept), and with --fresh in an emptied run folder;
#   3. bad input exits 2: an override of what the script sets, an unknown config file.
# Usage: test_compare_routing.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
source "$(dirname "$0")/lib.sh"
script="$source_dir/launch/compare-routing.sh"
command -v python3 >/dev/null 2>&1 || { echo "python3 not found: skipped"; exit 77; }

# ---- 1. the table from a known history ------------------------------------------------------------
mkdir -p "$work/known/a" "$work/known/b"
{
  echo '{"step":1,"total_steps":4,"loss":3,"dropped_fraction":0.01,"tokens_per_s":100}'
  echo '{"step":2,"total_steps":4,"loss":3,"dropped_fraction":0.02,"tokens_per_s":2000,"router":[{"layer":0,"forwards":2,"load_imbalance":1.2},{"layer":1,"forwards":2,"load_imbalance":2.0}]}'
  echo '{"step":3,"total_steps":4,"loss":3,"dropped_fraction":0.03,"tokens_per_s":3000,"val_loss":1.3862943611198906}'
  echo '{"step":4,"total_steps":4,"loss":3,"dropped_fraction":0.04,"tokens_per_s":4000,"val_loss":0.6931471805599453,"router":[{"layer":0,"forwards":2,"load_imbalance":1.4},{"layer":1,"forwards":0,"load_imbalance":9.0}]}'
  printf '{"step":5,"lo'  # a run cut off mid-line
} >"$work/known/a/metrics.jsonl"
cp "$source_dir/configs/tiny-cpu.yaml" "$work/a.yaml"
cp "$source_dir/configs/tiny-cpu.yaml" "$work/b.yaml"
bash "$script" --table-only --out "$work/known" --configs "$work/a.yaml,$work/b.yaml" >"$work/known.out" 2>&1 ||
  fail "--table-only exited $?: $(cat "$work/known.out")"
# Load: windows at steps 2 and 4, layer 1 of step 4 had no forward: mean of 1.2, 2.0, 1.4; max 2.0.
grep -qF '| a | 4 | 0.6931 | 1.0000 | 1.533 | 2.000 | 2.50% | 3,000 |' "$work/known.out" ||
  fail "the row of the known history is wrong: $(grep '^| a ' "$work/known.out")"
grep -q '^| b | no metrics' "$work/known.out" || fail "a run folder without metrics needs its own row"
cmp -s <(grep '^|' "$work/known.out") "$work/known/compare.md" || fail "compare.md differs from the printed table"

# ---- 2. two tiny runs through the script ----------------------------------------------------------
awk 'BEGIN { srand(5); for (i = 0; i < 6000; i++) printf "%c%s", 97 + int(rand() * 12), (rand() < 0.2 ? " " : "") }' \
  >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" >/dev/null 2>&1 ||
  { echo "FAIL: prepare-data"; exit 1; }
sed -e 's/^  top_k: 1 .*/  top_k: 2/' -e 's/^  k_min: 1 .*/  k_min: 2/' -e 's/^  expert_d_ff: 128 .*/  expert_d_ff: 64/' \
  -e 's/^  renormalize_gates: false .*/  renormalize_gates: true/' "$source_dir/configs/tiny-cpu.yaml" >"$work/top2.yaml"
cp "$source_dir/configs/tiny-cpu.yaml" "$work/top1.yaml"
grep -q '^  top_k: 2' "$work/top2.yaml" || fail "the top-2 variant was not made (tiny-cpu.yaml changed?)"
runs=(--binary "$binary" --out "$work/runs" --configs "$work/top1.yaml $work/top2.yaml"
      --set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin" --set training.steps=8
      --set training.log_every=4 --set training.eval_batches=2 --set optimizer.warmup_steps=2)
timeout 240 bash "$script" "${runs[@]}" >"$work/runs.out" 2>&1
status=$?
[ "$status" -eq 0 ] || fail "two tiny runs: exit $status"
for name in top1 top2; do
  row="$(grep "^| $name |" "$work/runs.out")"
  # steps 8, then validation loss and bits/byte, load mean and max, dropped, tokens/s: all numbers.
  echo "$row" | grep -Eq "^\| $name \| 8 \| [0-9]+\.[0-9]{4} \| [0-9]+\.[0-9]{4} \| [0-9]+\.[0-9]{3} \| [0-9]+\.[0-9]{3} \| [0-9]+\.[0-9]{2}% \| [0-9,]+ \|$" ||
    fail "$name: the row lacks a number: '$row'"
  [ -s "$work/runs/$name/metrics.jsonl" ] || fail "$name: no metrics in its run folder"
  [ -s "$work/runs/$name.log" ] || fail "$name: no console log beside its run folder"
done
grep -q '"total_steps":8' "$work/runs/top2/metrics.jsonl" || fail "the extra --set did not reach the runs"
# Again (top-1 only): a new run beside the previous one, whose files are kept; then --fresh.
timeout 240 bash "$script" "${runs[@]}" --configs "$work/top1.yaml" >"$work/again.out" 2>&1 || fail "the rerun exited $?"
ls "$work/runs/top1" | grep -q 'metrics.before-start-over' || fail "a rerun should keep the previous run's metrics"
grep -q '^| top1 | 8 |' "$work/again.out" || fail "the rerun lacks its row"
timeout 240 bash "$script" "${runs[@]}" --configs "$work/top1.yaml" --fresh >"$work/fresh.out" 2>&1 ||
  fail "the --fresh pass exited $?"
ls "$work/runs/top1" | grep -q 'before-start-over' && fail "--fresh should start from an empty run folder"
grep -q '^| top1 | 8 |' "$work/fresh.out" || fail "the --fresh pass lacks its row"
if [ "$failures" -ne 0 ]; then
  echo "--- output of the tiny runs:" >&2
  cat "$work/runs.out" >&2
fi

# ---- 3. bad input ------------------------------------------------------------------------------
bash "$script" --binary "$binary" --out "$work/bad" --configs "$work/top1.yaml" --set "logging.run_dir=$work/x" \
  >"$work/bad.out" 2>&1
[ $? -eq 2 ] || fail "an override of logging.run_dir must exit 2"
grep -q "set by this script" "$work/bad.out" || fail "the refusal must say why: $(cat "$work/bad.out")"
bash "$script" --binary "$binary" --out "$work/bad" --configs "$work/missing.yaml" >"$work/bad.out" 2>&1
[ $? -eq 2 ] || fail "a missing config file must exit 2"

summarize_and_exit "compare-routing checks"
