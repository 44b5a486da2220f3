#!/usr/bin/env bash
# The routing comparison (docs/TRAINING.md, "Modern MoE designs"): trains the four configs of
# configs/compare/ one after the other on one GPU -- switch-top1, softmax-top2, sigmoid-bias,
# sigmoid-bias-seq: equal active and total parameters, equal steps, data and seed -- then prints
# one markdown table (also written to OUT/compare.md), one row per config:
#   val loss        the last validation loss (nats per token; the trainer evaluates at the last
#                   step) and, since the tokens are bytes, the same in bits per byte (/ ln 2)
#   load max/mean   the router's max_e load_e / mean_e load_e (docs/ANALYTICS.md), one value per
#                   MoE layer and logged window (training.log_every steps): their mean and their max
#   dropped         dropped / routed choices (capacity overflow), mean over the steps
#   tokens/s        median over the logged steps, the first (warm-up) step left out
# Each run gets OUT/<config name> as its run folder (config.yaml, metrics.jsonl, final.weights;
# `switchyard report OUT/<name>` draws it) and OUT/<config name>.log for its console output.
#
# Usage: bash launch/compare-routing.sh [--binary PATH] [--out DIR] [--configs "A.yaml B.yaml ..."]
#                                       [--fresh] [--table-only] [extra `switchyard train` arguments]
#   --binary      the switchyard binary (default: build/switchyard; launch/train.sh builds it)
#   --out         where the run folders go (default: runs/compare)
#   --configs     the configs to compare, in order (default: the four of configs/compare/)
#   --fresh       delete each config's run folder before training it; without it each run starts
#                 over beside the previous one (--start-over keeps its files as *.before-start-over-N.*)
#   --table-only  train nothing: tabulate the run folders already in OUT
#   extra arguments go to every `switchyard train`, e.g. --set training.steps=1000 (applied to all
#   four configs, so the comparison stays at equal steps)
# Run it from the repository root: the configs read data/sotu/{train,val}.bin (bash
# launch/get-data.sh) relative to it, unless --set data.path=... says otherwise. Each run also
# leaves its final checkpoint (about 1 GB at these sizes) in OUT/<name>/checkpoints. Only bash and python3.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="$root/build/switchyard"
out="runs/compare"
configs=("$root/configs/compare/switch-top1.yaml" "$root/configs/compare/softmax-top2.yaml"
         "$root/configs/compare/sigmoid-bias.yaml" "$root/configs/compare/sigmoid-bias-seq.yaml")
fresh=0
table_only=0
extra=()

fail() {
  echo "compare-routing: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || fail "--binary needs a path"; binary="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || fail "--out needs a folder"; out="$2"; shift 2 ;;
    --configs) [ $# -ge 2 ] || fail "--configs needs a list of files"; read -r -a configs <<< "${2//,/ }"; shift 2 ;;
    --fresh) fresh=1; shift ;;
    --table-only) table_only=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done
[ "${#configs[@]}" -ge 1 ] || fail "--configs names no config"
[ -n "$out" ] || fail "--out needs a folder"
command -v python3 >/dev/null 2>&1 || fail "python3 not found (the table is computed with it)"
resume=(--start-over)
for argument in "${extra[@]}"; do
  case "$argument" in
    logging.run_dir=*|logging.metrics_file=*|checkpoint.dir=*)
      fail "$argument is set by this script (each config gets OUT/<name>; use --out)" ;;
    --resume|--resume=*|--start-over) resume=() ;;
  esac
done
names=()
for config in "${configs[@]}"; do
  [ -f "$config" ] || fail "no config file $config"
  name="$(basename "$config" .yaml)"
  for seen in "${names[@]}"; do [ "$seen" != "$name" ] || fail "two configs are named $name"; done
  names+=("$name")
done

mkdir -p "$out"
failed=()
if [ "$table_only" -eq 0 ]; then
  [ -x "$binary" ] || fail "no switchyard binary at $binary (build it, e.g. bash launch/train.sh, or pass --binary)"
  for index in "${!configs[@]}"; do
    config="${configs[$index]}" name="${names[$index]}"
    run_dir="$out/$name"
    [ "$fresh" -eq 0 ] || rm -rf "$run_dir"
    echo "compare-routing: training $name ($config) -> $run_dir"
    start=$(date +%s)
    if "$binary" train "$config" --set "logging.run_dir=$run_dir" --set "checkpoint.dir=$run_dir/checkpoints" \
        "${resume[@]}" "${extra[@]}" > "$out/$name.log" 2>&1; then
      echo "compare-routing: $name done in $(( $(date +%s) - start )) s"
    else
      status=$?
      tail -5 "$out/$name.log" >&2
      echo "compare-routing: $name failed (exit $status; log: $out/$name.log)" >&2
      failed+=("$name")
    fi
  done
fi

table="$out/compare.md"
python3 - "$out" "${names[@]}" > "$table" <<'PYTHON'
import json, math, os, statistics, sys

out, names = sys.argv[1], sys.argv[2:]

def fmt(value, spec):
    return "-" if value is None or not math.isfinite(value) else format(value, spec)

def percent(fraction):
    return "-" if fraction is None or not math.isfinite(fraction) else format(100 * fraction, ".2f") + "%"

def number(record, key):
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

print("| config | steps | val loss (nats) | val bits/byte | load max/mean: mean | load max/mean: max "
      "| dropped | tokens/s |")
print("|---|---|---|---|---|---|---|---|")
for name in names:
    path = os.path.join(out, name, "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as lines:
            for line in lines:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a line cut off by a crash
    if not records:
        print(f"| {name} | no metrics ({path}) | - | - | - | - | - | - |")
        continue
    val = [record for record in records if number(record, "val_loss") is not None]
    val_loss = number(val[-1], "val_loss") if val else None
    bits = val_loss / math.log(2) if val_loss is not None else None
    imbalance = [number(layer, "load_imbalance") for record in records for layer in record.get("router") or []
                 if (number(layer, "forwards") or 0) > 0 and number(layer, "load_imbalance") is not None]
    dropped = [number(record, "dropped_fraction") for record in records
               if number(record, "dropped_fraction") is not None]
    # The first step pays for allocation and warm-up.
    speed = [number(record, "tokens_per_s") for record in records[1:] if number(record, "tokens_per_s")]
    step, total = int(number(records[-1], "step") or 0), int(number(records[-1], "total_steps") or 0)
    print(f"| {name} | {step}{'' if step == total else f' of {total}'} | {fmt(val_loss, '.4f')} | {fmt(bits, '.4f')} "
          f"| {fmt(statistics.mean(imbalance) if imbalance else None, '.3f')} "
          f"| {fmt(max(imbalance) if imbalance else None, '.3f')} "
          f"| {percent(statistics.mean(dropped) if dropped else None)} "
          f"| {fmt(statistics.median(speed) if speed else None, ',.0f')} |")
PYTHON
cat "$table"
echo "compare-routing: table in $table; run folders $out/<config> (switchyard report $out/<config> draws one)"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "compare-routing: failed: ${failed[*]}" >&2
  exit 1
fi
