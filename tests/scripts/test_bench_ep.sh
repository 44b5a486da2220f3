#!/usr/bin/env bash
# bench ep runs under mpirun -np 2 on the CPU backend (tiny shapes, chunked overlap) and writes JSON;
# --ep-dispatch fp8 runs too and is named in the header and the records; fp8 with nvlink is bad input.
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
"$binary" bench ep --device cpu --quick --ep-dispatch fp8 --ep-transport nvlink > "$work/bad.txt" 2>&1
[ $? -eq 2 ] || { cat "$work/bad.txt"; fail "--ep-dispatch fp8 with --ep-transport nvlink must exit 2"; }
grep -q -- '--ep-transport' "$work/bad.txt" || { cat "$work/bad.txt"; fail "the error must name --ep-transport"; }
"$binary" bench ep --device cpu > /dev/null 2>&1
[ $? -eq 2 ] || fail "bench ep on CPU without --quick must exit 2"
echo "bench ep: ok"
