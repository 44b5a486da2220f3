#!/usr/bin/env bash
# bench ep runs under mpirun -np 2 on the CPU backend (tiny shapes, chunked overlap) and writes JSON;
# --ep-dispatch fp8 runs too and is named in the header and the records; fp8 with nvlink is bad input;
# --ranks-per-node 1 runs the layer over two emulated nodes (hierarchical, network rows reported);
# --skew makes the first rank's experts hot (load max/mean well above 1, about 1 without), and
# --max-replicas-per-rank prints a replication plan that lowers the busiest rank's load.
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
timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 256 --iters 1 --warmup 0 --ranks-per-node 1 --capacity-factor 0 --json "$work/nodes.jsonl" \
  > "$work/nodes.txt" 2>&1 || { cat "$work/nodes.txt"; fail "bench ep --ranks-per-node 1 exited non-zero"; }
grep -q 'spans 2 nodes of 1 ranks' "$work/nodes.txt" || { cat "$work/nodes.txt"; fail "no hierarchical note"; }
grep -q '"network_rows_mean"' "$work/nodes.jsonl" || { cat "$work/nodes.jsonl"; fail "no network_rows_mean"; }
grep -q '"part": "exchange"' "$work/nodes.jsonl" && fail "the one-level exchange part must be skipped across nodes"
timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 256 --iters 1 --warmup 0 --only layer --capacity-factor 0 --skew 4 --max-replicas-per-rank 1 \
  --json "$work/skew.jsonl" \
  > "$work/skew.txt" 2>&1 || { cat "$work/skew.txt"; fail "bench ep --skew 4 exited non-zero"; }
ratio() { awk -F'"received_rows_mean": ' '{ split($2, a, ","); mean = a[1] }
  { split($0, b, "\"received_rows_max\": "); split(b[2], c, /[,}]/); print c[1] / mean }' "$1"; }
awk -v r="$(ratio "$work/nodes.jsonl")" 'BEGIN { exit !(r < 1.3) }' || fail "balanced load max/mean $(ratio "$work/nodes.jsonl") is not about 1"
awk -v r="$(ratio "$work/skew.jsonl")" 'BEGIN { exit !(r > 1.5) }' || fail "--skew 4 load max/mean $(ratio "$work/skew.jsonl") is not skewed"
grep -q 'replication plan (up to 1 per rank' "$work/skew.txt" || { cat "$work/skew.txt"; fail "no replication plan line"; }
awk -F'"replication_max_load_after": ' '{ split($2, a, ","); after = a[1] }
     { split($0, b, "\"replication_max_load_before\": "); split(b[2], c, ","); before = c[1] }
     END { exit !(after < before) }' "$work/skew.jsonl" || { cat "$work/skew.jsonl"; fail "the plan did not lower the busiest load"; }
"$binary" bench ep --device cpu > /dev/null 2>&1
[ $? -eq 2 ] || fail "bench ep on CPU without --quick must exit 2"
echo "bench ep: ok"
