#!/usr/bin/env bash
# bench comm runs under mpirun on the CPU backend, verifies its results and writes JSON.
set -u
binary="$1"; mpiexec="$3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench comm --device cpu \
  --sizes 4K,1M --iters 3 --warmup 1 --op all --json "$work/comm.json" > "$work/out.txt" 2>&1 \
  || { cat "$work/out.txt"; fail "bench comm under mpirun -np 2 exited non-zero"; }
grep -qi "all_to_all" "$work/out.txt" || { cat "$work/out.txt"; fail "no all_to_all rows"; }
grep -qi "all_reduce" "$work/out.txt" || { cat "$work/out.txt"; fail "no all_reduce rows"; }
[ -s "$work/comm.json" ] || fail "no JSON written"
"$binary" bench comm --op nonsense > /dev/null 2>&1
[ $? -eq 2 ] || fail "a bad --op must exit 2"
echo "bench comm: ok"
