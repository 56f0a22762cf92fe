#!/usr/bin/env bash
# Wheels that the lent GPU machine's image lacks, for its Python (3.12, manylinux x86_64),
# downloaded here into .whl/ (git-ignored) so that a device call can carry them: the Dask
# backend and its multi-GPU workers (dask, distributed, dask-cuda), zarr shards and the
# dp-accounting cross-check, with the pure dependencies the image does not have either.
# The image already holds numpy, scipy, pandas, cupy, pyarrow, torch, timm, onnxruntime,
# click, cloudpickle, fsspec, jinja2, msgpack, psutil, pyyaml, sortedcontainers, toolz,
# absl-py, attrs, wrapt, nvidia-ml-py and cuda-core, so --no-deps: one version of each.
#   bash tools/device_wheels.sh            # then carry ".whl"; run_gpu_session.sh installs them
# dask and distributed are pinned to the release dask-cuda's RAPIDS metapackage asks for
# (rapids-dask-dependency 26.10: dask and distributed 2026.7.1); the metapackage itself is
# only that pin and an import hook, and is left out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${DEVICE_PYTHON:-3.12}
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  "dask-cuda==26.10.*" "dask==2026.7.1" "distributed==2026.7.1" \
  "tornado>=6.2" "tblib>=1.6" "zict>=3" "locket>=1" "partd>=1.4" \
  "zarr>=3" "donfig>=0.8" "numcodecs>=0.14" "google-crc32c>=1.5" \
  "dp-accounting>=0.4" "dm-tree>=0.1.8" 2>&1 | grep -v "^WARNING: Location" || true
ls .whl
du -sh .whl
