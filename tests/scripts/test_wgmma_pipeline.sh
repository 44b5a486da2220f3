#!/usr/bin/env bash
# Build check of the sm_90a grouped GEMM kernels: ptxas must keep every kernel's wgmma pipeline
# asynchronous. A wgmma issued under a runtime branch (or beside a function call) makes ptxas
# serialize the MMAs of the whole kernel: results stay right, the kernel gets 15-20% slower, and
# only ptxas's note "C7520 Potential Performance Loss: wgmma.mma_async instructions are serialized"
# says so (it cost the expert GEMMs that much once, docs/PERFORMANCE.md). This recompiles the
# kernel files with the build's own commands (compile_commands.json) plus -Xptxas -v, and fails on
# that note. Exits 77 (skipped) where the build has no CUDA backend.
# Usage: test_wgmma_pipeline.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
build_dir=$(dirname "$1")
commands="$build_dir/compile_commands.json"
if [ ! -f "$commands" ]; then
  echo "test_wgmma_pipeline: skipped (no $commands)"
  exit 77
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "test_wgmma_pipeline: skipped (no python3)"
  exit 77
fi
exec python3 - "$commands" <<'PY'
import json, os, shlex, subprocess, sys, tempfile

KERNEL_FILES = ("src/ops/cuda/sm90/grouped_gemm_sm90_forward.cu", "src/ops/cuda/sm90/grouped_gemm_sm90_weight_grad.cu")
DEPFILE_FLAGS = {"-MD", "-MMD"}
DEPFILE_FLAGS_WITH_VALUE = {"-MT", "-MF", "-MQ"}

entries = json.load(open(sys.argv[1]))
checked, problems = [], []
with tempfile.TemporaryDirectory() as scratch:
    for entry in entries:
        path = os.path.normpath(os.path.join(entry["directory"], entry["file"]))
        name = next((f for f in KERNEL_FILES if path.endswith(f)), None)
        if name is None:
            continue
        given = entry.get("arguments") or shlex.split(entry["command"])
        args, skip_next = [], False
        for arg in given:  # the same command, minus the depfile flags, into scratch
            if skip_next:
                skip_next = False
            elif arg in DEPFILE_FLAGS:
                pass
            elif arg in DEPFILE_FLAGS_WITH_VALUE:
                skip_next = True
            else:
                args.append(arg)
        args[args.index("-o") + 1] = os.path.join(scratch, "kernel.o")
        run = subprocess.run(args + ["-Xptxas", "-v"], cwd=entry["directory"], capture_output=True, text=True)
        checked.append(name)
        if run.returncode != 0:
            problems.append(f"{name}: did not compile:\n{run.stderr[-2000:]}")
            continue
        for line in run.stderr.splitlines():
            if "C7520" in line or "mma_async instructions are serialized" in line:
                problems.append(f"{name}: {line.strip()}")
if not checked:
    print("test_wgmma_pipeline: skipped (the sm_90a kernel files are not in this build)")
    sys.exit(77)
for problem in problems:
    print("test_wgmma_pipeline: FAIL", problem)
if problems:
    sys.exit(1)
print(f"test_wgmma_pipeline: ptxas keeps the wgmma pipeline asynchronous in {', '.join(checked)}")
PY
