#!/usr/bin/env bash
# One device call does the GPU work of a session: build with the device's own Python,
# run the GPU test suite, then the benchmarks. Logs and JSON go to $OUT (the device tool
# copies them back). Usage on the device, from the repository root:
#   bash benchmarks/run_gpu_session.sh [quick|full]
set -uo pipefail
mode=${1:-full}
out=${OUT:-/tmp/dpfc_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export DPFC_COMMIT=${DPFC_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
echo "== build" | tee "$out/build.log"
python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tee -a "$out/build.log" | tail -40
python3 -c "import dpfc_native; print(dpfc_native.build_info())" 2>&1 | tee -a "$out/build.log"

echo "== gpu tests"
python3 -m pytest -m gpu -q -x --timeout=300 -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -60

echo "== benchmarks ($mode)"
flag=""
[ "$mode" = quick ] && flag="--quick"
python3 benchmarks/bench_stats.py $flag --out "$out/bench_stats.json" 2>&1 | tee "$out/bench_stats.log" | tail -60
python3 benchmarks/bench_cholesky.py $flag --out "$out/bench_cholesky.json" 2>&1 | tee "$out/bench_cholesky.log" | tail -60
