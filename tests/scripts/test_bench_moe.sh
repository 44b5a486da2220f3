#!/usr/bin/env bash
# bench moe runs end to end on the CPU backend (tiny shapes) and writes one JSON record per part.
set -u
binary="$1"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$binary" bench moe --quick --device cpu --iters 2 --warmup 1 --json "$work/bench.jsonl" > "$work/out.txt" 2>&1 \
  || { cat "$work/out.txt"; fail "bench moe --quick exited non-zero"; }
for part in seed dense-mode large routing; do
  grep -q "\"part\": \"$part\"" "$work/bench.jsonl" || fail "no '$part' record in the JSON output"
done
[ "$(grep -c '"part": "seed"' "$work/bench.jsonl")" -eq 2 ] || fail "expected 2 seed records"
grep -q "Routing alone" "$work/out.txt" || fail "no routing line in the table"

# --breakdown alone: one table of per-stage times for the forward and the backward, nothing else.
"$binary" bench moe --quick --device cpu --iters 2 --warmup 1 --breakdown --breakdown-tokens 48 \
  --json "$work/breakdown.jsonl" > "$work/breakdown.txt" 2>&1 || { cat "$work/breakdown.txt"; fail "--breakdown exited non-zero"; }
for stage in "router GEMM" "routing" "permute" "expert GEMM 1" "activation" "combine" "combine backward" \
             "weight grad 1" "data grad 1" "activation backward" "permute backward" "routing backward" \
             "router weight grad" "router input grad"; do
  grep -q "\"stage\": \"$stage\"" "$work/breakdown.jsonl" || fail "--breakdown has no '$stage' stage"
done
grep -q "sum of stages" "$work/breakdown.txt" || fail "--breakdown prints no sum-vs-whole line"
grep -q '"part": "seed"' "$work/breakdown.jsonl" && fail "--breakdown alone must not run the other parts"
grep -q "48 tokens" "$work/breakdown.txt" || fail "--breakdown-tokens was ignored"
# --breakdown with --shape: the breakdown at that shape (--quick: its tiny stand-in), no shape table.
"$binary" bench moe --quick --device cpu --iters 2 --warmup 1 --breakdown --shape 512,64,64,8,2 \
  --json "$work/breakdown-shape.jsonl" > "$work/breakdown-shape.txt" 2>&1 ||
  { cat "$work/breakdown-shape.txt"; fail "--breakdown --shape exited non-zero"; }
grep -q "Stage breakdown, .* swiglu" "$work/breakdown-shape.txt" || fail "--breakdown --shape: no swiglu breakdown"
grep -q '"part": "shape"' "$work/breakdown-shape.jsonl" && fail "--breakdown --shape must not print the shape table"
grep -q '"shape": "' "$work/breakdown-shape.jsonl" || fail "--breakdown records name their shape"
"$binary" bench moe --quick --device cpu --breakdown --shape sonic --breakdown-tokens 64 > /dev/null 2>&1
[ $? -eq 2 ] || fail "--breakdown-tokens with --shape must exit 2"

"$binary" bench moe --device cpu > "$work/err.txt" 2>&1
[ $? -eq 2 ] || fail "bench moe on CPU without --quick must exit 2"
"$binary" bench moe --no-such-flag > /dev/null 2>&1
[ $? -eq 2 ] || fail "unknown flag must exit 2"
echo "bench moe: ok"
