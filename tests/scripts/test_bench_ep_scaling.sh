#!/usr/bin/env bash
# launch/bench-ep-scaling.sh on CPU ranks (bench ep --quick): one table row per size and token
# count, the one-rank row at 100%, the records kept; bad options exit 2.
set -u
binary="$1"; source_dir="$2"; mpiexec="$3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
script="$source_dir/launch/bench-ep-scaling.sh"

MPIRUN="$mpiexec" timeout 300 bash "$script" --binary "$binary" --max-ranks 2 --experts 4 --out "$work/out" \
  -- --quick --tokens 64,128 --iters 3 --warmup 1 > "$work/stdout.txt" 2>&1 \
  || { cat "$work/stdout.txt"; fail "the scaling run exited non-zero"; }
table="$work/out/scaling.md"
[ -s "$table" ] || { cat "$work/stdout.txt"; fail "no table written"; }
for row in "| 1 | 64 |" "| 1 | 128 |" "| 2 | 64 |" "| 2 | 128 |"; do
  grep -qF "$row" "$table" || { cat "$table"; fail "no row starting '$row'"; }
done
[ "$(grep -cF '| 100% |' "$table")" -eq 2 ] || { cat "$table"; fail "the one-rank rows must read 100%"; }
grep '^| 2 |' "$table" | grep -qE '\| [0-9]+% \| [0-9.]+ \| [0-9.]+ \| [0-9]+% \|$' \
  || { cat "$table"; fail "the two-rank rows need a share of raw, times and a scaling figure"; }
for ranks in 1 2; do
  [ -s "$work/out/bench-ep-$ranks.jsonl" ] || fail "no records from $ranks rank(s)"
done

bash "$script" --binary "$binary" --max-ranks two > "$work/bad.txt" 2>&1
[ $? -eq 2 ] && grep -q "positive integer" "$work/bad.txt" || { cat "$work/bad.txt"; fail "--max-ranks two must exit 2"; }
bash "$script" --binary "$binary" --max-ranks 4 --experts 6 > "$work/bad.txt" 2>&1
[ $? -eq 2 ] && grep -q "do not split over 4 ranks" "$work/bad.txt" || { cat "$work/bad.txt"; fail "6 experts over 4 ranks must exit 2"; }
bash "$script" --binary "$binary" --max-ranks 2 -- --json x > "$work/bad.txt" 2>&1
[ $? -eq 2 ] && grep -q "set by this script" "$work/bad.txt" || { cat "$work/bad.txt"; fail "--json after -- must exit 2"; }
echo "bench-ep-scaling: ok"
