#!/usr/bin/env bash
# The ops layer's boundary: code above src/ops reaches the kernels through src/ops/ops.h only.
# Fails, naming file:line, where a file under src/comm, src/model, src/train, src/report or
# src/cli names a backend (cpu:: or cuda::, outside comments and string literals) or includes a
# backend-internal header (src/ops/cpu/..., src/ops/cuda/..., src/ops/dispatch.h). The family
# headers (src/ops/moe_ops.h, ...) stay includable for their types.
# The scanner first runs on a planted sample, so a scanner that finds nothing fails too.
# Usage: test_ops_boundary.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
source "$(dirname "$0")/lib.sh"
layers_above_ops=(comm model train report cli)

# scan FILE...: prints FILE:LINE: what, for every violation. Comments (// and /* */) and the
# contents of string and character literals are blanked before looking for cpu:: / cuda::; the
# include check reads the path of #include lines outside comments.
scan() {
  awk '
    FNR == 1 { in_block = 0 }
    {
      line = $0; code = ""; path_code = ""; n = length(line); i = 1
      while (i <= n) {
        c = substr(line, i, 1); two = substr(line, i, 2)
        if (in_block) {
          if (two == "*/") { in_block = 0; i += 2 } else i++
          continue
        }
        if (two == "//") break
        if (two == "/*") { in_block = 1; i += 2; continue }
        if (c == "\"" || c == "\047") {  # a literal: kept for the include check, blanked for names
          quote = c; literal = c; i++
          while (i <= n) {
            d = substr(line, i, 1)
            if (d == "\\") { literal = literal substr(line, i, 2); i += 2; continue }
            literal = literal d; i++
            if (d == quote) break
          }
          code = code quote quote; path_code = path_code literal
          continue
        }
        code = code c; path_code = path_code c; i++
      }
      text = $0; sub(/^[ \t]+/, "", text)
      if (code ~ /(^|[^A-Za-z0-9_])(cpu|cuda)::/)
        printf "%s:%d: names a backend (cpu:: / cuda::), call ops:: (src/ops/ops.h): %s\n", FILENAME, FNR, text
      if (path_code ~ /^[ \t]*#[ \t]*include[ \t]*[<"]src\/ops\/(cpu\/|cuda\/|dispatch\.h[">])/)
        printf "%s:%d: includes a backend-internal header, include src/ops/ops.h: %s\n", FILENAME, FNR, text
    }
  ' "$@"
}

# The scanner itself: exactly the planted violations of this sample, none of the decoys.
sample="$work/sample.cpp"
cat > "$sample" <<'EOF'
#include "src/ops/ops.h"
#include "src/ops/cpu/reference_util.h"
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/dispatch.h"
#include "src/comm/expert_dispatch.h"
// cpu::convert in a comment
/* cuda::gemm in a block comment,
   cpu::route on its next line */
const char* message = "cpu::convert in a string";
const ExecContext host{DeviceKind::cpu, nullptr};
void f() { cpu::convert(a, b); }
void g() { switchyard::cuda::gemm(a); /* cpu:: */ }
char quote = '"'; const char* slashes = "//"; void h() { cuda::gemm(b); }
EOF
expected="$sample:2 $sample:3 $sample:4 $sample:11 $sample:12 $sample:13"
found=$(scan "$sample" | cut -d: -f1-2 | tr '\n' ' ' | sed 's/ $//')
[ "$found" = "$expected" ] || fail "the scanner is broken: on its sample it reports [$found], expected [$expected]"

cd "$source_dir" || { echo "test_ops_boundary: no source tree at $source_dir" >&2; exit 1; }
files=()
for layer in "${layers_above_ops[@]}"; do
  directory="src/$layer"  # relative, so that violations read src/<layer>/FILE:LINE
  [ -d "$directory" ] || { fail "no $directory in $source_dir: is it the source tree?"; continue; }
  while IFS= read -r file; do files+=("$file"); done < <(
    find "$directory" -type f \( -name '*.h' -o -name '*.hpp' -o -name '*.cpp' -o -name '*.cc' -o -name '*.cu' \
      -o -name '*.cuh' \) | sort)
done
if [ "${#files[@]}" -gt 0 ]; then
  violations=$(scan "${files[@]}")
  if [ -n "$violations" ]; then
    echo "$violations" >&2
    fail "$(echo "$violations" | wc -l) place(s) above src/ops bypass src/ops/ops.h"
  fi
fi
echo "checked ${#files[@]} files under src/{$(IFS=,; echo "${layers_above_ops[*]}")}"
summarize_and_exit "ops boundary checks"
