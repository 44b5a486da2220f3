#!/usr/bin/env bash
# The layer rule is enforced by the build, not by review: src/ is layered
#   core < ops < comm < model < train < report < cli          (docs/DESIGN.md, "Layers")
# and each layer's library sees only its own and lower layers' headers (each layer's include root,
# build/layer_include/<layer>, is on the include path of that layer and the ones above it; the source
# tree is on none; CMakeLists.txt, switchyard_layer). So `#include "src/model/..."` in src/ops must not
# compile. This test shows it does not, and catches an include-path leak (the source root, or a
# higher layer's root, added to a lower layer): with the build's own compile command of a file of
# each layer (compile_commands.json), a scratch file in a temporary directory that includes a header
# of any higher layer must fail with "No such file", and, as the control, the same command on a
# scratch file that includes a header of the layer itself and of the one below must compile.
# Exits 77 (skipped) where the build wrote no compile_commands.json.
# Usage: test_layer_includes.sh SWITCHYARD_BINARY SOURCE_DIR [MPIEXEC]
set -u
build_dir=$(dirname "$1")
source_dir="$2"
commands="$build_dir/compile_commands.json"
if [ ! -f "$commands" ]; then
  echo "test_layer_includes: skipped (no $commands)"
  exit 77
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "test_layer_includes: skipped (no python3)"
  exit 77
fi
exec python3 - "$commands" "$source_dir" <<'PY'
import json, os, re, shlex, subprocess, sys, tempfile

LAYERS = ["core", "ops", "comm", "model", "train", "report", "cli"]
# One header of each layer, included as the code writes it (from the repository root).
HEADERS = {
    "core": "src/core/error.h",
    "ops": "src/ops/ops.h",
    "comm": "src/comm/communicator.h",
    "model": "src/model/moe_layer.h",
    "train": "src/train/trainer.h",
    "report": "src/report/report.h",
    "cli": "src/cli/commands.h",
}
DEPFILE_FLAGS = {"-MD", "-MMD"}
DEPFILE_FLAGS_WITH_VALUE = {"-MT", "-MF", "-MQ"}
# CUDA-only sources (nvcc commands, or C++ files built only with CUDA): not the plain C++ command.
CUDA_ONLY = re.compile(r"(^src/ops/cuda/|/(cuda|nccl|cudnn)_[^/]*\.cpp$|\.cu$)")

commands_path, source_dir = sys.argv[1], os.path.realpath(sys.argv[2])
entries = json.load(open(commands_path))


def layer_command(layer):
    """The build's compile command of one C++ file of the layer's library (the first by path)."""
    found = []
    for entry in entries:
        path = os.path.realpath(os.path.join(entry["directory"], entry["file"]))
        relative = os.path.relpath(path, source_dir)
        if not relative.startswith(f"src/{layer}/") or not relative.endswith(".cpp"):
            continue
        if CUDA_ONLY.search(relative) or relative == "src/cli/main.cpp":
            continue
        found.append((relative, entry))
    return min(found, key=lambda item: item[0]) if found else (None, None)


def compile_scratch(entry, includes, scratch):
    """Compiles a scratch file holding `includes` with the entry's command; (exit code, output)."""
    given = entry.get("arguments") or shlex.split(entry["command"])
    source = os.path.realpath(os.path.join(entry["directory"], entry["file"]))
    text_path = os.path.join(scratch, "scratch.cpp")
    with open(text_path, "w") as text:
        text.write("".join(f'#include "{header}"\n' for header in includes))
    args, skip_next = [], False
    for arg in given:  # the same command, minus the depfile flags, on the scratch file
        if skip_next:
            skip_next = False
        elif arg in DEPFILE_FLAGS:
            pass
        elif arg in DEPFILE_FLAGS_WITH_VALUE:
            skip_next = True
        elif os.path.realpath(os.path.join(entry["directory"], arg)) == source:
            args.append(text_path)
        else:
            args.append(arg)
    if "-o" in args:
        args[args.index("-o") + 1] = os.path.join(scratch, "scratch.o")
    run = subprocess.run(args, cwd=entry["directory"], capture_output=True, text=True)
    return run.returncode, run.stdout + run.stderr


failures = 0


def report(ok, message, output=""):
    global failures
    print(("PASS  " if ok else "FAIL  ") + message)
    if not ok:
        failures += 1
        if output:
            print("      " + output.strip()[-1500:].replace("\n", "\n      "))


for header in HEADERS.values():
    if not os.path.isfile(os.path.join(source_dir, header)):
        report(False, f"{header} is not in the source tree (update HEADERS in this test)")
if failures:
    sys.exit(1)

with tempfile.TemporaryDirectory() as scratch:
    for index, layer in enumerate(LAYERS):
        relative, entry = layer_command(layer)
        if entry is None:
            report(False, f"{layer}: no C++ file of src/{layer}/ in {commands_path}")
            continue
        # Control: the layer's own header and the one below it compile with this command.
        visible = [HEADERS[name] for name in LAYERS[max(index - 1, 0):index + 1]]
        code, output = compile_scratch(entry, visible, scratch)
        report(code == 0, f"{layer} (command of {relative}) sees {' and '.join(visible)}", output)
        # Every higher layer's header is out of reach: a missing file, not some other error.
        for higher in LAYERS[index + 1:]:
            header = HEADERS[higher]
            code, output = compile_scratch(entry, [header], scratch)
            missing = code != 0 and header in output and ("No such file" in output or "file not found" in output)
            if code == 0:
                report(False, f"{layer} can include {header} ({higher} is above {layer}): an include-path leak")
            else:
                report(missing, f"{layer} cannot include {header} ({higher}): No such file", output)

if failures:
    print(f"test_layer_includes: {failures} failure(s)")
    sys.exit(1)
print("test_layer_includes: every layer sees only its own and lower layers' headers")
PY
