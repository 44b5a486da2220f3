#!/usr/bin/env bash
# The test command: set-up, configure, build, then every test (unit, CUDA, mpirun, whole-program).
# Usage: bash launch/test.sh [BUILD_DIR]   (default: build)
# Environment: JOBS (parallel build jobs, default: cores), CTEST_ARGS (extra ctest flags).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${1:-build}"
jobs="${JOBS:-$(nproc)}"

bash launch/setup.sh
if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null 2>&1; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
if [ -f "$build_dir/CMakeCache.txt" ]; then generator=(); fi  # keep the generator it was made with

echo "test: configuring $build_dir"
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
echo "test: building with $jobs jobs"
cmake --build "$build_dir" -j "$jobs"
echo "test: running the suite"
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" ${CTEST_ARGS:-}
