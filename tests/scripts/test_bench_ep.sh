#!/usr/bin/env bash
# bench ep runs under mpirun -np 2 on the CPU backend (tiny shapes, chunked overlap) and writes JSON;
# --ep-dispatch fp8 runs too and is named in the header and the records; fp8 with nvlink is bad input;
# --ep-overlap two_part with --ep-sm-budget runs the layer part and is named in the header and records,
# a bad --ep-overlap is bad input naming the flag.
set -u
binary="$1"; mpiexec="$3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --iters 2 --warmup 1 --a2a-chunks 2 --json "$work/ep.jsonl" > "$work/out.txt" 2>&1 \
  || { cat "$work/out.txt"; fail "bench ep under mpirun -np 2 exited non-zero"; }
grep -q '"part": "exchange"' "$work/ep.jsonl" || { cat "$work/ep.jsonl"; fail "no exchange record"; }
grep -q '"part": "layer"' "$work/ep.jsonl" || { cat "$work/ep.jsonl"; fail "no layer record"; }
grep -q '"ep_dispatch": "activation"' "$work/ep.jsonl" || { cat "$work/ep.jsonl"; fail "no ep_dispatch activation"; }

timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 64 --iters 1 --warmup 0 --a2a-chunks 2 --ep-dispatch fp8 --json "$work/fp8.jsonl" > "$work/fp8.txt" 2>&1 \
  || { cat "$work/fp8.txt"; fail "bench ep --ep-dispatch fp8 under mpirun -np 2 exited non-zero"; }
grep -q '^# switchyard bench ep:.*dispatch fp8' "$work/fp8.txt" || { cat "$work/fp8.txt"; fail "header lacks dispatch fp8"; }
[ "$(grep -c '"ep_dispatch": "fp8"' "$work/fp8.jsonl")" = 2 ] \
  || { cat "$work/fp8.jsonl"; fail "expected an exchange and a layer record with ep_dispatch fp8"; }
grep -q '"ep_overlap": "none"' "$work/ep.jsonl" || { cat "$work/ep.jsonl"; fail "no ep_overlap none (the default)"; }

timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 1,65 --iters 1 --warmup 0 --a2a-chunks 2 --only layer --ep-overlap two_part --ep-sm-budget 8 \
  --json "$work/overlap.jsonl" > "$work/overlap.txt" 2>&1 \
  || { cat "$work/overlap.txt"; fail "bench ep --ep-overlap two_part under mpirun -np 2 exited non-zero"; }
grep -q '^# switchyard bench ep:.*ep_overlap two_part, ep_sm_budget 8' "$work/overlap.txt" \
  || { cat "$work/overlap.txt"; fail "header lacks ep_overlap two_part, ep_sm_budget 8"; }
[ "$(grep -c '"ep_overlap": "two_part", "ep_sm_budget": 8' "$work/overlap.jsonl")" = 2 ] \
  || { cat "$work/overlap.jsonl"; fail "expected two layer records with ep_overlap two_part and ep_sm_budget 8"; }
"$binary" bench ep --device cpu --quick --ep-overlap dual > "$work/bad_overlap.txt" 2>&1
[ $? -eq 2 ] || { cat "$work/bad_overlap.txt"; fail "--ep-overlap dual must exit 2"; }
grep -q -- '--ep-overlap' "$work/bad_overlap.txt" || { cat "$work/bad_overlap.txt"; fail "the error must name --ep-overlap"; }

"$binary" bench ep --device cpu --quick --ep-dispatch fp8 --ep-transport nvlink > "$work/bad.txt" 2>&1
[ $? -eq 2 ] || { cat "$work/bad.txt"; fail "--ep-dispatch fp8 with --ep-transport nvlink must exit 2"; }
grep -q -- '--ep-transport' "$work/bad.txt" || { cat "$work/bad.txt"; fail "the error must name --ep-transport"; }
"$binary" bench ep --device cpu > /dev/null 2>&1
[ $? -eq 2 ] || fail "bench ep on CPU without --quick must exit 2"
echo "bench ep: ok"
