"""Shared test helpers: GPU availability (build capability and device presence are
separate facts) and a float64 reference for the clipped statistics."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import dpfc_native


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


def reference_clip64(x: np.ndarray, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Float64 clipped rows and scales, written independently of dpfc_native.ops."""
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=1))
    target = clip_norm * dpfc_native._core.clip_margin
    scale = np.ones_like(norms)
    over = norms > target
    scale[over] = target / norms[over]
    return x64 * scale[:, None], scale


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
