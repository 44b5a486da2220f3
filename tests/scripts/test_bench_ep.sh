#!/usr/bin/env bash
# bench ep runs under mpirun -np 2 on the CPU backend (tiny shapes, chunked overlap) and writes JSON.
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
"$binary" bench ep --device cpu > /dev/null 2>&1
[ $? -eq 2 ] || fail "bench ep on CPU without --quick must exit 2"
echo "bench ep: ok"
