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

"$binary" bench moe --device cpu > "$work/err.txt" 2>&1
[ $? -eq 2 ] || fail "bench moe on CPU without --quick must exit 2"
"$binary" bench moe --no-such-flag > /dev/null 2>&1
[ $? -eq 2 ] || fail "unknown flag must exit 2"
echo "bench moe: ok"
