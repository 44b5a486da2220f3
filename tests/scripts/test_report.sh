#!/usr/bin/env bash
# Router statistics, the run report and the specialization map, end to end on the CPU backend:
#   1. configs/tiny-cpu.yaml for 40 steps under mpirun -np 2 with parallel.ep_size 2: every 10th
#      metrics line carries per-layer router statistics summed over both ranks (10 steps x 2 ranks
#      x 512 tokens), the progress lines show the load balance;
#   2. `switchyard report RUN_DIR` writes a self-contained HTML page with the curves, the expert
#      load heatmap, router statistics and a specialization map of the run's validation data;
#   3. `switchyard specialize` prints the map as a table and writes it as JSON;
#   4. bad input exits 2; a run without weights still gets a report (without the map);
#   5. warnings: a run with a far too large learning rate collapses its router, which the console
#      (rank 0, "switchyard train: warning:") and the metrics lines report alike and the report
#      lists; a loss and grad-norm spike written into a metrics file does not set the charts' y
#      range but gets edge markers with the true value.
# Usage: test_report.sh SWITCHYARD_BINARY SOURCE_DIR MPIEXEC
set -u

source "$(dirname "$0")/lib.sh"


# A small generated corpus (~120 KB) with digits, capitals and punctuation, so byte classes differ.
awk 'BEGIN {
  srand(11);
  split("The nation|Our people|Congress|Every citizen|This union|The world|In 1999 we|By 2024 they", s, "|");
  split("will build|must defend|has seen|shall honor|can restore|will remember|must reform|has earned", v, "|");
  split("a stronger economy|the common good|our freedom|42 new schools|peace abroad|7 fair wages|clean water", o, "|");
  for (i = 0; i < 2600; i++) {
    printf "%s %s %s", s[int(rand() * 8) + 1], v[int(rand() * 8) + 1], o[int(rand() * 7) + 1];
    printf (rand() < 0.3 ? ".\n" : (rand() < 0.5 ? "! " : ", "));
  }
}' >"$work/corpus.txt"
"$binary" prepare-data --output "$work/train.bin" --val-output "$work/val.bin" "$work/corpus.txt" \
  >"$work/prepare.log" 2>&1 || { cat "$work/prepare.log" >&2; echo "FAIL: prepare-data" >&2; exit 1; }

# ---- 1. training with router statistics ----------------------------------------------------------
run="$work/run"
timeout 300 "${mpi[@]}" "$binary" train "$source_dir/configs/tiny-cpu.yaml" \
  --set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin" --set training.steps=40 \
  --set training.eval_every=20 --set optimizer.warmup_steps=5 --set parallel.ep_size=2 \
  --set "logging.run_dir=$run" --set "checkpoint.dir=$run/checkpoints" >"$work/train.out" 2>"$work/train.err"
status=$?
if [ "$status" -ne 0 ]; then
  fail "training exited $status"
  tail -20 "$work/train.err" >&2
fi
metrics="$run/metrics.jsonl"
if [ -s "$metrics" ]; then
  with_router=$(grep -c '"router":\[' "$metrics")
  [ "$with_router" -eq 4 ] || fail "expected router statistics on 4 metrics lines (every 10 steps), found $with_router"
  line10=$(grep '"step":10,' "$metrics")
  echo "$line10" | grep -q '"router":\[{"layer":0,"forwards":20,"tokens":10240,' ||
    fail "step 10 should carry 20 forwards and 10240 tokens (10 steps x 2 ranks x 8 x 64): $(echo "$line10" | grep -o '"router":.*' | head -c 200)"
  for key in load_imbalance experts_used dropped_fraction mean_gate entropy entropy_normalized aux_loss z_loss; do
    echo "$line10" | grep -q "\"$key\":[0-9]" || fail "router statistics lack a numeric $key"
  done
  # The window's tokens per expert add up to its routed choices (top-1: one per token).
  echo "$line10" | grep -o '"router":.*' | grep -o '"tokens_per_expert":\[[0-9,]*\]' | head -1 |
    grep -o '[0-9][0-9,]*' | tr ',' '\n' | awk '{ s += $1 } END { exit !(s == 10240) }' ||
    fail "the router's tokens per expert do not add up to 10240"
  grep '"step":11,' "$metrics" | grep -q '"router"' && fail "step 11 must not carry router statistics"
else
  fail "no metrics at $metrics"
fi
grep -q "load max/mean [0-9.]* H [0-9.]*" "$work/train.out" || fail "progress lines lack the router balance"
# Each progress figure names its window: the router's covers the steps since the previous one.
grep -q "^step 10/40 | .* | dropped [0-9.]*% (step) | .* | load max/mean [0-9.]* H [0-9.]* (steps 1-10) |" \
  "$work/train.out" || fail "step 10's progress line lacks the window labels: $(grep '^step 10/' "$work/train.out")"
grep -q "^step 30/40 | .* (steps 21-30) |" "$work/train.out" || fail "step 30's router window should be steps 21-30"
grep '"step":20,' "$metrics" 2>/dev/null | grep -q '"router_first_step":11' ||
  fail "step 20's metrics line should say its router window starts at step 11"

# ---- 2. the report -------------------------------------------------------------------------------
timeout 120 "$binary" report "$run" >"$work/report.out" 2>"$work/report.err"
status=$?
report="$run/report.html"
if [ "$status" -ne 0 ]; then
  fail "report exited $status: $(cat "$work/report.err")"
elif [ ! -s "$report" ]; then
  fail "report wrote no $report"
else
  grep -q "specialization map of" "$work/report.out" || fail "the report did not compute the specialization map: $(cat "$work/report.out")"
  for section in "Training curves" "Expert load" "Router statistics" "Expert specialization" "validation loss" \
                 "MoE layer 0: expert load over training" "By byte class" "By preceding byte" "By position in the window"; do
    grep -q "$section" "$report" || fail "the report lacks '$section'"
  done
  svgs=$(grep -o '<svg ' "$report" | wc -l)
  [ "$svgs" -ge 12 ] || fail "the report has $svgs plots, expected at least 12"
  grep -q '<script' "$report" && fail "the report must not contain scripts"
  grep -Eq '(src|href)="(https?:)?//' "$report" && fail "the report must not fetch anything"
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$report" <<'EOF' || fail "an SVG of the report is not well-formed XML"
import re, sys, xml.etree.ElementTree as ET
html = open(sys.argv[1], encoding="utf-8").read()
svgs = re.findall(r"<svg .*?</svg>", html, re.S)
assert svgs, "no svg"
for svg in svgs:
    ET.fromstring(svg)
EOF
    # Every plot scales with the window: a viewBox, and the page shrinks wide SVGs to fit.
    python3 - "$report" <<'EOF' || fail "an SVG of the report cannot scale to a narrow window"
import re, sys
html = open(sys.argv[1], encoding="utf-8").read()
tags = re.findall(r"<svg [^>]*>", html)
bad = [tag for tag in tags if not re.search(r'viewBox="0 0 [0-9.]+ [0-9.]+"', tag)]
assert not bad, "no viewBox: %s" % bad[:2]
assert "figure svg { display: block; max-width: 100%; height: auto; }" in html, "no scaling CSS"
EOF
  fi
  grep -q "1 MoE layer (every 2 blocks)" "$report" || fail "the report should say '1 MoE layer', in the singular"
  echo "ok: report with $svgs plots ($(wc -c <"$report") bytes)"
fi

# ---- 3. specialize -------------------------------------------------------------------------------
timeout 120 "$binary" specialize --checkpoint "$run" --text "$work/corpus.txt" --tokens 4096 \
  --json "$work/map.json" >"$work/map.txt" 2>"$work/map.err"
status=$?
if [ "$status" -ne 0 ]; then
  fail "specialize exited $status: $(cat "$work/map.err")"
else
  grep -q "MoE layer 0 (block 1): 4 experts, 4096 tokens, 4096 routed choices" "$work/map.txt" ||
    fail "unexpected table header: $(head -2 "$work/map.txt")"
  [ "$(grep -Ec '^[0-3] ' "$work/map.txt")" -eq 4 ] || fail "the table should have one row per expert"
  grep -q '"layers":\[{"moe_layer":0,"block":1,"experts":\[' "$work/map.json" || fail "bad specialization JSON"
  echo "ok: specialize"; sed -n 1,7p "$work/map.txt"
fi

# ---- 4. errors and a run without weights ---------------------------------------------------------
"$binary" report "$work/absent" >/dev/null 2>&1
[ $? -eq 2 ] || fail "report of a missing directory should exit 2"
"$binary" specialize --checkpoint "$run" >/dev/null 2>&1
[ $? -eq 2 ] || fail "specialize without --text should exit 2"
"$binary" report "$run" --no-such-flag >/dev/null 2>&1
[ $? -eq 2 ] || fail "report with an unknown flag should exit 2"
mkdir -p "$work/metrics_only"
cp "$metrics" "$work/metrics_only/metrics.jsonl" 2>/dev/null
"$binary" report "$work/metrics_only" --output "$work/metrics_only.html" >"$work/metrics_only.out" 2>&1 ||
  fail "report of a run without weights failed: $(cat "$work/metrics_only.out")"
grep -q "Not computed" "$work/metrics_only.html" 2>/dev/null || fail "a run without weights should say why the map is missing"

# ---- 5. warnings and spikes ---------------------------------------------------------------------
hot="$work/hot"
timeout 300 "$binary" train "$source_dir/configs/tiny-cpu.yaml" \
  --set "data.path=$work/train.bin" --set "data.val_path=$work/val.bin" --set training.steps=30 \
  --set training.eval_every=0 --set optimizer.lr=0.5 --set optimizer.warmup_steps=1 --set checkpoint.every=0 \
  --set "logging.run_dir=$hot" --set "checkpoint.dir=$hot/checkpoints" >"$work/hot.out" 2>"$work/hot.err" ||
  fail "the run with lr 0.5 exited $?: $(tail -3 "$work/hot.err")"
console=$(grep -c "^switchyard train: warning: " "$work/hot.out")
logged=$(grep -o '"kind":"[a-z_]*","message"' "$hot/metrics.jsonl" 2>/dev/null | wc -l)
grep -q "^switchyard train: warning: MoE layer 0: .* router collapse$" "$work/hot.out" ||
  fail "lr 0.5 collapses the router, yet no collapse warning: $(grep -c '^step' "$work/hot.out") progress lines, $console warnings"
[ "$console" -eq "$logged" ] || fail "$console warnings on the console, $logged in metrics.jsonl"
[ "$console" -le 6 ] || fail "$console warnings in 30 steps: the rate limit does not work"
if timeout 120 "$binary" report "$hot" --no-specialization >"$work/hot_report.out" 2>&1; then
  grep -q "during training</strong>" "$hot/report.html" || fail "the report does not list the run's warnings"
  grep -q "router collapse</li>" "$hot/report.html" || fail "the report's warnings lack the collapse"
else
  fail "report of the lr 0.5 run failed: $(cat "$work/hot_report.out")"
fi
# One wild step (loss 60, grad norm 500) among 40: the charts keep their range and mark it.
mkdir -p "$work/spiked"
sed -E '/^\{"step":15,/ { s/"loss":[^,]*/"loss":60/; s/"grad_norm":[^,]*/"grad_norm":500/ }' "$metrics" \
  >"$work/spiked/metrics.jsonl" 2>/dev/null
"$binary" report "$work/spiked" --output "$work/spiked.html" >"$work/spiked.out" 2>&1 ||
  fail "report of the spiked metrics failed: $(cat "$work/spiked.out")"
markers=$(grep -c 'class="off-scale"' "$work/spiked.html" 2>/dev/null)
[ "$markers" -ge 2 ] || fail "the loss and grad-norm charts should mark the spike at their top edge ($markers markers)"
grep -q "<title>loss at 15: 60 (above the axis)</title>" "$work/spiked.html" ||
  fail "the loss spike's marker should carry its true value"
grep -q "1 point off the scale (max 500)" "$work/spiked.html" || fail "the grad-norm chart should count its clipped point"

summarize_and_exit "report checks"
