#!/usr/bin/env bash
# The GPU work of a session in as few device calls as possible: build with the device's
# own Python (incrementally, in build/device, which a warm machine keeps between calls),
# then the stages asked for. Logs and JSON go to $OUT (the device tool copies them back;
# at most 8 files come back, so each stage writes one log and at most one JSON).
# Usage on the device, from the repository root:
#   bash benchmarks/run_gpu_session.sh tests            # build + pytest -m gpu
#   bash benchmarks/run_gpu_session.sh bench-quick      # build + both benchmarks, --quick
#   bash benchmarks/run_gpu_session.sh tests bench-quick
#   bash benchmarks/run_gpu_session.sh bench            # build + full benchmarks
# Extra pytest arguments for the tests stage: PYTEST_ARGS="-k cholesky".
set -uo pipefail
out=${OUT:-/tmp/dpfc_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export DPFC_COMMIT=${DPFC_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
[ $# -eq 0 ] && set -- tests bench-quick

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "== build ($DPFC_COMMIT)"
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=build/device . 2>&1 | tail -40
  echo "build: $(( $(date +%s) - start )) s"
  python3 -c "import dpfc_native; print(dpfc_native.build_info())"
} 2>&1 | tee "$out/build.log"

for stage in "$@"; do
  case "$stage" in
    tests)
      echo "== gpu tests"
      # No -x: one call should show every failing test (after a sticky CUDA error the
      # rest fail fast anyway); the outer timeout keeps a hung kernel from eating the call.
      timeout 420 python3 -m pytest -m gpu -q -rfE --maxfail=40 --timeout=120 --durations=10 \
        -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$out/gpu_tests.log" | tail -80
      ;;
    bench-quick | bench)
      flag=""
      [ "$stage" = bench-quick ] && flag="--quick"
      echo "== benchmarks ($stage)"
      timeout 280 python3 benchmarks/bench_stats.py $flag --out "$out/bench_stats.json" 2>&1 |
        tee "$out/bench_stats.log" | tail -60
      timeout 280 python3 benchmarks/bench_cholesky.py $flag --out "$out/bench_cholesky.json" 2>&1 |
        tee "$out/bench_cholesky.log" | tail -60
      ;;
    *)
      echo "unknown stage: $stage (tests, bench-quick, bench)" >&2
      exit 2
      ;;
  esac
done
