#!/usr/bin/env bash
# bench ep runs under mpirun -np 2 on the CPU backend (tiny shapes, chunked overlap) and writes JSON;
# --ep-dispatch fp8 runs too and is named in the header and the records; fp8 with nvlink is bad input;
# --ranks-per-node 1 runs the layer over two emulated nodes (hierarchical, network rows reported);
# --skew makes the first rank's experts hot (load max/mean well above 1, about 1 without), and
# --max-replicas-per-rank replicates them in the layer: the busiest rank's rows drop (the printed
# plan's before -> after, the measured load), and it is bad input with --a2a-chunks 2 or across nodes.
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
timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 256 --iters 1 --warmup 0 --ranks-per-node 1 --capacity-factor 0 --json "$work/nodes.jsonl" \
  > "$work/nodes.txt" 2>&1 || { cat "$work/nodes.txt"; fail "bench ep --ranks-per-node 1 exited non-zero"; }
grep -q 'spans 2 nodes of 1 ranks' "$work/nodes.txt" || { cat "$work/nodes.txt"; fail "no hierarchical note"; }
grep -q '"network_rows_mean"' "$work/nodes.jsonl" || { cat "$work/nodes.jsonl"; fail "no network_rows_mean"; }
grep -q '"part": "exchange"' "$work/nodes.jsonl" && fail "the one-level exchange part must be skipped across nodes"
timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 256 --iters 1 --warmup 0 --only layer --capacity-factor 0 --skew 4 \
  --json "$work/skew.jsonl" \
  > "$work/skew.txt" 2>&1 || { cat "$work/skew.txt"; fail "bench ep --skew 4 exited non-zero"; }
timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 256 --iters 1 --warmup 0 --only layer --capacity-factor 0 --skew 4 --max-replicas-per-rank 1 \
  --json "$work/replicas.jsonl" > "$work/replicas.txt" 2>&1 \
  || { cat "$work/replicas.txt"; fail "bench ep --skew 4 --max-replicas-per-rank 1 exited non-zero"; }
ratio() { awk -F'"received_rows_mean": ' '{ split($2, a, ","); mean = a[1] }
  { split($0, b, "\"received_rows_max\": "); split(b[2], c, /[,}]/); print c[1] / mean }' "$1"; }
awk -v r="$(ratio "$work/nodes.jsonl")" 'BEGIN { exit !(r < 1.3) }' || fail "balanced load max/mean $(ratio "$work/nodes.jsonl") is not about 1"
awk -v r="$(ratio "$work/skew.jsonl")" 'BEGIN { exit !(r > 1.5) }' || fail "--skew 4 load max/mean $(ratio "$work/skew.jsonl") is not skewed"
grep -q 'replication' "$work/skew.txt" && { cat "$work/skew.txt"; fail "replication reported without --max-replicas-per-rank"; }
grep -q 'replication (up to 1 per rank, applied' "$work/replicas.txt" || { cat "$work/replicas.txt"; fail "no replication line"; }
field() { awk -F"\"$2\": " '{ split($2, a, /[,}]/); print a[1] }' "$1"; }
before=$(field "$work/replicas.jsonl" replication_max_load_before); after=$(field "$work/replicas.jsonl" replication_max_load_after)
awk -v b="$before" -v a="$after" 'BEGIN { exit !(a < b) }' || { cat "$work/replicas.jsonl"; fail "the plan did not lower the busiest load ($before -> $after)"; }
# Applied: the rows the busiest rank received are the plan's, and the measured imbalance drops.
[ "$(field "$work/replicas.jsonl" received_rows_max)" = "$after" ] \
  || { cat "$work/replicas.jsonl"; fail "received_rows_max is not the plan's load after replication ($after)"; }
awk -v with="$(ratio "$work/replicas.jsonl")" -v without="$(ratio "$work/skew.jsonl")" 'BEGIN { exit !(with < without) }' \
  || fail "replication did not lower load max/mean ($(ratio "$work/replicas.jsonl") vs $(ratio "$work/skew.jsonl"))"
"$binary" bench ep --device cpu --quick --max-replicas-per-rank 1 --a2a-chunks 2 > "$work/bad_replicas.txt" 2>&1
[ $? -eq 2 ] || { cat "$work/bad_replicas.txt"; fail "--max-replicas-per-rank with --a2a-chunks 2 must exit 2"; }
grep -q -- '--max-replicas-per-rank 1 needs --a2a-chunks 1' "$work/bad_replicas.txt" \
  || { cat "$work/bad_replicas.txt"; fail "the error must name --max-replicas-per-rank and --a2a-chunks"; }
timeout 120 "$mpiexec" -np 2 --oversubscribe --allow-run-as-root "$binary" bench ep --device cpu --quick \
  --tokens 64 --iters 1 --warmup 0 --only layer --ranks-per-node 1 --max-replicas-per-rank 1 > "$work/bad_nodes.txt" 2>&1
[ $? -eq 2 ] || { cat "$work/bad_nodes.txt"; fail "--max-replicas-per-rank across nodes must exit 2"; }
grep -q -- '--max-replicas-per-rank needs the one-level exchange' "$work/bad_nodes.txt" \
  || { cat "$work/bad_nodes.txt"; fail "the error must name --max-replicas-per-rank"; }
"$binary" bench ep --device cpu > /dev/null 2>&1
[ $? -eq 2 ] || fail "bench ep on CPU without --quick must exit 2"
echo "bench ep: ok"
