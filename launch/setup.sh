#!/usr/bin/env bash
# Installs what switchyard needs to build and test on a fresh Debian or Ubuntu machine.
# Idempotent: only missing packages are installed. Says what it does.
# CUDA (nvcc, cuBLAS, NCCL, cuDNN) is not installed here: without nvcc the CPU backend is built.
set -euo pipefail

packages=(cmake g++ make ninja-build libopenmpi-dev openmpi-bin libyaml-cpp-dev libgtest-dev)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
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
