#!/usr/bin/env bash
# Installs what switchyard needs to build and test on a fresh Debian or Ubuntu machine.
# Idempotent: only missing packages are installed. Says what it does.
# CUDA (nvcc, cuBLAS, NCCL, cuDNN) is not installed here: without nvcc the CPU backend is built.
set -euo pipefail

packages=(cmake g++ make ninja-build libopenmpi-dev openmpi-bin libyaml-cpp-dev libgtest-dev)
# Build tools installed some other way (pip's cmake, a toolkit's ninja) count when they are on
# PATH and new enough; libraries must be Debian packages.
tool_present() {
  case "$1" in
    cmake)
      command -v cmake >/dev/null 2>&1 || return 1
      local version major minor
      version=$(cmake --version | sed -n 's/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
      read -r major minor <<<"$version"
      [ -n "$major" ] && { [ "$major" -gt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -ge 25 ]; }; } ;;
    ninja-build) command -v ninja >/dev/null 2>&1 ;;
    g++) command -v g++ >/dev/null 2>&1 ;;
    make) command -v make >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" &&
      ! tool_present "$package"; then
    missing+=("$package")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all packages present (${packages[*]})"
else
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: nvcc found: the CUDA backend will be built"
else
  echo "setup: no nvcc: building the CPU backend only"
fi
