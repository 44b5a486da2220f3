#!/usr/bin/env bash
# Weak scaling of the expert-parallel MoE layer: `switchyard bench ep` at 1, 2, 4, 8, ... ranks on
# this node (up to the GPU count, or --max-ranks), the same experts in all and the same tokens per
# rank at every size, then one table:
#   ranks, tokens/rank, dispatch+combine against the raw all-to-all-v of the same bytes, layer
#   forward and forward+backward, and per-rank f+b throughput against the one-rank run's.
# Each size's JSON records stay in the output folder (bench-ep-<ranks>.jsonl, bench-ep-<ranks>.log).
#
# Usage: bash launch/bench-ep-scaling.sh [--binary PATH] [--max-ranks N] [--experts N] [--out DIR]
#                                        [-- extra `switchyard bench ep` arguments]
#   --binary     the switchyard binary (default: build/switchyard)
#   --max-ranks  the largest size (default: the GPU count; sizes are the powers of two up to it)
#   --experts    experts in all, split over the ranks (default 32; every size must divide it)
#   --out        where the records go (default: runs/bench-ep-scaling)
# Environment: MPIRUN (default: mpirun).
# Example (the figures in docs/PERFORMANCE.md):
#   bash launch/bench-ep-scaling.sh -- --top-k 1 --capacity-factor 0 --ep-transport nvlink
# On a machine without GPUs: bash launch/bench-ep-scaling.sh --max-ranks 2 --experts 4 -- --quick
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="$root/build/switchyard"
max_ranks=""
experts=32
out="runs/bench-ep-scaling"
extra=()

fail() {
  echo "bench-ep-scaling: $*" >&2
  exit 2
}
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "$1 needs a positive integer, got '$2'"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || fail "--binary needs a path"; binary="$2"; shift 2 ;;
    --max-ranks) [ $# -ge 2 ] || fail "--max-ranks needs a value"; positive --max-ranks "$2"; max_ranks="$2"; shift 2 ;;
    --experts) [ $# -ge 2 ] || fail "--experts needs a value"; positive --experts "$2"; experts="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || fail "--out needs a folder"; out="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) fail "unknown option '$1' (see --help; bench ep's own options go after --)" ;;
  esac
done
[ -x "$binary" ] || fail "no switchyard binary at $binary (build it, or pass --binary)"
mpirun="${MPIRUN:-mpirun}"
command -v "$mpirun" >/dev/null 2>&1 || fail "$mpirun not found (launch/setup.sh installs Open MPI)"
for option in "${extra[@]}"; do
  case "$option" in
    --experts-per-rank|--json|--ep-size) fail "$option is set by this script (per size)" ;;
  esac
done

if [ -z "$max_ranks" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"; fi
  [ "$gpus" -ge 1 ] || fail "no GPU found: pass --max-ranks (and -- --quick to run on CPU ranks)"
  max_ranks="$gpus"
fi
sizes=()
for ((ranks = 1; ranks <= max_ranks; ranks *= 2)); do
  [ $((experts % ranks)) -eq 0 ] || fail "$experts experts do not split over $ranks ranks (--experts)"
  sizes+=("$ranks")
done

mkdir -p "$out"
mpi=(--oversubscribe --bind-to none -x NCCL_NVLS_ENABLE=0)
if [ "$(id -u)" -eq 0 ]; then mpi+=(--allow-run-as-root); fi
for ranks in "${sizes[@]}"; do
  echo "bench-ep-scaling: $ranks rank(s), $((experts / ranks)) experts each"
  rm -f "$out/bench-ep-$ranks.jsonl"
  if ! "$mpirun" -np "$ranks" "${mpi[@]}" "$binary" bench ep --experts-per-rank $((experts / ranks)) \
      --json "$out/bench-ep-$ranks.jsonl" "${extra[@]}" > "$out/bench-ep-$ranks.log" 2>&1; then
    tail -5 "$out/bench-ep-$ranks.log" >&2
    fail "bench ep failed at $ranks rank(s) (log: $out/bench-ep-$ranks.log)"
  fi
done

# One JSON record per line; the fields are plain numbers (src/core/json.cpp writes them so).
field() { sed -n "s/.*\"$1\": \([-0-9.e+]*\).*/\1/p" <<< "$2"; }
ms() { [ "$1" = "-" ] && echo "-" || awk -v value="$1" 'BEGIN { printf "%.3f", value }'; }
table="$out/scaling.md"
{
  echo "| ranks | tokens/rank | dispatch+combine ms | raw a2a-v x2 ms | share of raw | fwd ms | f+b ms | f+b per-rank vs 1 rank |"
  echo "|---|---|---|---|---|---|---|---|"
  declare -A one_rank_fb=()
  for ranks in "${sizes[@]}"; do
    records="$out/bench-ep-$ranks.jsonl"
    [ -s "$records" ] || fail "no records from $ranks rank(s) in $records"
    for tokens in $(sed -n 's/.*"tokens_per_rank": \([0-9]*\).*/\1/p' "$records" | sort -un); do
      exchange="$(grep '"part": "exchange"' "$records" | grep "\"tokens_per_rank\": $tokens," || true)"
      layer="$(grep '"part": "layer"' "$records" | grep "\"tokens_per_rank\": $tokens," || true)"
      ours="-" raw="-" share="-" forward="-" both="-" scaling="-"
      if [ -n "$exchange" ]; then
        ours="$(field dispatch_combine_ms "$exchange")"
        raw="$(field raw_a2a_ms "$exchange")"
        share="$(awk -v o="$ours" -v r="$raw" 'BEGIN { printf "%.0f%%", 100 * r / o }')"
        [ "$ranks" -gt 1 ] || share="(local copy)"
      fi
      if [ -n "$layer" ]; then
        forward="$(field fwd_ms "$layer")"
        both="$(field fwdbwd_ms "$layer")"
        [ "$ranks" -gt 1 ] || one_rank_fb[$tokens]="$both"
        if [ -n "${one_rank_fb[$tokens]:-}" ]; then
          scaling="$(awk -v one="${one_rank_fb[$tokens]}" -v many="$both" 'BEGIN { printf "%.0f%%", 100 * one / many }')"
        fi
      fi
      echo "| $ranks | $tokens | $(ms "$ours") | $(ms "$raw") | $share | $(ms "$forward") | $(ms "$both") | $scaling |"
    done
  done
} > "$table"
cat "$table"
echo "bench-ep-scaling: table in $table, records in $out/bench-ep-<ranks>.jsonl"
