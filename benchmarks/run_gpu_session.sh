#!/usr/bin/env bash
# The GPU work of a session in as few device calls as possible: build with the device's
# own Python (incrementally, in build/device, which a warm machine keeps between calls),
# then the stages asked for. Logs and JSON go to $OUT (the device tool copies them back;
# at most 8 files come back, so each stage writes one log and at most one JSON).
# Usage on the device, from the repository root (carry ".whl" from tools/device_wheels.sh
# so that the Dask and multi-GPU tests run instead of skipping):
#   bash benchmarks/run_gpu_session.sh tests            # build + pytest -m gpu
#   bash benchmarks/run_gpu_session.sh bench-quick      # build + all benchmarks, --quick
#   bash benchmarks/run_gpu_session.sh tests bench-quick
#   bash benchmarks/run_gpu_session.sh stats cholesky   # full-size benchmarks one by one
#   bash benchmarks/run_gpu_session.sh e2e              #   (each a few minutes)
# "bench" is stats + cholesky + e2e at full size; QUICK=1 makes those three --quick.
# Extra pytest arguments for the tests stage (split on spaces, so a -k expression must be
# one word): PYTEST_ARGS="-k cholesky" or PYTEST_ARGS="tests/test_gpu_only.py"; extra arguments
# of one benchmark: BENCH_ARGS_stats="--only linear_grad" (likewise _cholesky, _e2e).
# Time knobs (seconds): BUDGET caps the whole run (each stage gets what is left of it, so
# a 10-minute device call still returns every log), TESTS_TIMEOUT and BENCH_TIMEOUT cap
# one stage. ARCH=90-real builds for the H100/H200 alone (the same code a default
# build runs there, in a third of the compile time).
set -uo pipefail
t0=$(date +%s)
budget=${BUDGET:-100000}
left() {  # seconds left of BUDGET, capped at $1, at least 1
  local r=$(( budget - ($(date +%s) - t0) - 5 ))
  [ "$r" -gt "$1" ] && r=$1
  [ "$r" -lt 1 ] && r=1
  echo "$r"
}
out=${OUT:-/tmp/dpfc_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export DPFC_COMMIT=${DPFC_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
[ $# -eq 0 ] && set -- tests bench-quick
build=1
if [ "$1" = --no-build ]; then
  build=0
  shift
fi

# Python packages the device image lacks (Dask, dask-cuda, zarr, dp-accounting), when the
# call carries them: `bash tools/device_wheels.sh` here, then carry ".whl".
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== carried wheels: $(ls .whl | wc -l)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dpfc_site .whl/*.whl 2>&1 | tail -5
  export PYTHONPATH=/tmp/dpfc_site${PYTHONPATH:+:$PYTHONPATH}
fi

[ $build = 1 ] && {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "== build ($DPFC_COMMIT)"
  start=$(date +%s)
  arch=()
  [ -n "${ARCH:-}" ] && arch=(-C "cmake.define.DPFC_CUDA_ARCHITECTURES=$ARCH")
  # DPFC_CUDA=ON: a build that did not find nvcc fails here instead of silently building
  # the CPU core (every gpu test would then skip and the device call be wasted).
  rm -f "$out/build.rc"
  python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=build/device \
    -C cmake.define.DPFC_CUDA=ON "${arch[@]}" . 2>&1 | tail -40
  echo "${PIPESTATUS[0]}" > "$out/build.rc"
  echo "build: $(( $(date +%s) - start )) s (pip status $(cat "$out/build.rc"))"
  python3 -c "import dpfc_native; print(dpfc_native.build_info())"
} 2>&1 | tee "$out/build.log"
if [ $build = 1 ]; then
  # A failed build must stop the run (a warm machine still has the previous build
  # installed, which would be tested instead); the installed package must have the CUDA
  # kernels and see a device (and CuPy), or the stages below would only skip.
  if [ "$(cat "$out/build.rc" 2>/dev/null)" != 0 ]; then
    echo "build failed: see $out/build.log" >&2
    exit 1
  fi
  rm -f "$out/build.rc"  # at most 8 files come back
  python3 -c 'import sys, dpfc_native as d; i = d.build_info()
sys.exit(0 if i["cuda_compiled"] and i["cuda_devices"] > 0 and i["cupy"] else 1)' || {
    echo "build or device check failed: see $out/build.log" >&2
    exit 1
  }
fi

for stage in "$@"; do
  case "$stage" in
    tests)
      echo "== gpu tests"
      # No -x: one call should show every failing test (after a sticky CUDA error the
      # rest fail fast anyway); the outer timeout keeps a hung kernel from eating the call.
      timeout "$(left "${TESTS_TIMEOUT:-420}")" python3 -m pytest -m gpu -q -rfE --maxfail=150 --timeout=120 --durations=10 \
        -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$out/gpu_tests.log" | tail -80
      ;;
    stats | cholesky | e2e)
      flag=""
      [ "${QUICK:-0}" = 1 ] && flag="--quick"
      script=benchmarks/bench_$stage.py
      [ "$stage" = e2e ] && script=benchmarks/bench_end_to_end.py
      echo "== benchmark $stage $flag"
      extra="BENCH_ARGS_$stage"  # e.g. BENCH_ARGS_stats="--only linear_grad"
      timeout "$(left "${BENCH_TIMEOUT:-570}")" python3 "$script" $flag ${!extra:-} \
        --out "$out/bench_$stage.json" 2>&1 |
        tee "$out/bench_$stage.log" | tail -60
      ;;
    bench-quick)
      QUICK=1 BUDGET=$(left 100000) bash "$0" --no-build stats cholesky e2e
      ;;
    bench)
      BUDGET=$(left 100000) bash "$0" --no-build stats cholesky e2e
      ;;
    *)
      echo "unknown stage: $stage (tests, stats, cholesky, e2e, bench-quick, bench)" >&2
      exit 2
      ;;
  esac
done
