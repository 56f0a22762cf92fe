"""Fixtures: GPU availability (build capability and device presence are separate facts),
the ``xp`` backend (NumPy always, CuPy where it can run), outputs poisoned before the ops
write them, kernel environment variables, and per-test random generators. Shared
references and data live in tests/_reference.py."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

pytest.register_assert_rewrite("_reference")

from _reference import AUDIT_RESULTS, COUNTS, reference_clip64  # noqa: E402,F401  (re-exported)

import dpfc_native  # noqa: E402


def _gpu_available() -> bool:
    info = dpfc_native.build_info()
    if not info["cuda_compiled"] or info["cuda_devices"] == 0:
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


CUDA_COMPILED = dpfc_native.build_info()["cuda_compiled"]
GPU_AVAILABLE = _gpu_available()

requires_cuda_build = pytest.mark.skipif(not CUDA_COMPILED, reason="built without CUDA")
requires_gpu = pytest.mark.skipif(not GPU_AVAILABLE, reason="no CUDA device (or no CuPy)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not GPU_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason="no CUDA device (or no CuPy)"))


def pytest_terminal_summary(terminalreporter):
    """The rows, examples and normals the adversarial and statistical tests tried."""
    if COUNTS:
        terminalreporter.write_sep("-", "adversarial and statistical cases tried")
        for key, v in sorted(COUNTS.items()):
            terminalreporter.write_line(f"  {key}: {v}")
    if AUDIT_RESULTS:
        terminalreporter.write_sep("-", "audit eps_lower (95% Clopper-Pearson, delta = 1e-5)")
        for (mech, eps, bug, backend), value in sorted(AUDIT_RESULTS.items(), key=str):
            terminalreporter.write_line(
                f"  {mech:15s} eps={eps:g} bug={bug or '-':10s} "
                f"backend={backend:6s} eps_lower={value:.3f}"
            )


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module of the backend under test: NumPy, or CuPy (``-m gpu``; skipped
    without a CUDA device, a CUDA build and CuPy). Tests with per-backend cases
    parametrise it indirectly (tests/_reference.py: xp_cases)."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture
def poisoned(xp, monkeypatch):
    """Makes ``xp.empty`` / ``xp.empty_like`` return NaN-filled float arrays (and a
    sentinel in integer arrays) for the test, so an op's output element it forgot to
    write is NaN (assert_all_written), not whatever memory held."""

    def poison(make):
        def made(*args, **kwargs):
            a = make(*args, **kwargs)
            if a.dtype.kind in "fc":
                a.fill(np.nan)
            elif a.dtype.kind == "i":
                a.fill(-12345)
            return a

        return made

    monkeypatch.setattr(xp, "empty", poison(xp.empty))
    monkeypatch.setattr(xp, "empty_like", poison(xp.empty_like))
    return xp


@pytest.fixture
def kernel_env(monkeypatch):
    """Set (a string) or unset (None) DPFC_* kernel variables for one test, e.g.
    ``kernel_env(DPFC_CHOL_SCHEDULE="left")``. The kernel configuration is read from the
    environment once (dpfc_native._config): each call makes its next use read it again, and
    so does the end of the test (after monkeypatch has restored the environment)."""
    from dpfc_native import _config

    def set_env(**env):
        for key, value in env.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        _config.reload()

    yield set_env
    _config.reload()


@pytest.fixture
def rng(request):
    """Fresh random data per test, seeded from the test id (a stable hash, unlike hash()),
    so a failure reproduces in the next run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fifo_alarm():
    """Guards a test against blocking on a FIFO (opening one for reading waits for a
    writer forever): after 10 s the alarm opens each FIFO listed for writing and closes
    it, so a blocked reader gets end-of-file, and the test fails."""
    import signal

    fifos = []

    def _unblock(signum, frame):
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        raise AssertionError("blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, _unblock)
    signal.alarm(10)
    try:
        yield fifos
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
