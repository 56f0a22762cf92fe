"""The kernel configuration: the one place the DPFC_* kernel variables are read."""

from __future__ import annotations

import pytest

from dpfc_native import _config
from dpfc_native._config import KernelConfig


def test_defaults_and_env_parsing():
    assert KernelConfig.from_env({}) == KernelConfig()
    empty = {var: "" for var in _config.ENV_VARS.values()}
    assert KernelConfig.from_env(empty) == KernelConfig()
    cfg = KernelConfig.from_env(
        {
            "DPFC_GRAM_KERNEL": "mma884",
            "DPFC_GRAD_KERNEL": "simt32",
            "DPFC_LG_CHUNK": "777",
            "DPFC_LG_BLOCK": "16384",
            "DPFC_CHOL_KERNEL": "simt",
            "DPFC_CHOL_SCHEDULE": "left",
            "DPFC_CHOL_SMALL_MAX": "0",
        }
    )
    assert cfg == KernelConfig(
        gram_kernel="mma884",
        grad_kernel="simt32",
        lg_chunk=777,
        lg_block=16384,
        chol_kernel="simt",
        chol_schedule="left",
        chol_small_max=0,
    )


@pytest.mark.parametrize(
    "var,value",
    [
        ("DPFC_GRAM_KERNEL", "bogus"),
        ("DPFC_GRAD_KERNEL", "tensorcore"),
        ("DPFC_LG_CHUNK", "0"),
        ("DPFC_LG_CHUNK", "12x"),
        ("DPFC_LG_BLOCK", "-1"),
        ("DPFC_CHOL_KERNEL", "tensor"),
        ("DPFC_CHOL_SCHEDULE", "sideways"),
        ("DPFC_CHOL_SMALL_MAX", "129"),
        ("DPFC_CHOL_SMALL_MAX", "-1"),
    ],
)
def test_bad_values_name_their_variable(var, value):
    with pytest.raises(ValueError, match=var):
        KernelConfig.from_env({var: value})


def test_frozen():
    with pytest.raises(AttributeError):
        KernelConfig().gram_kernel = "simt"  # type: ignore[misc]


def test_read_once_reload_and_override(monkeypatch, kernel_env):
    kernel_env(DPFC_CHOL_SCHEDULE="left")
    assert _config.get().chol_schedule == "left"
    # Read once: a later change of the environment is not seen until reload().
    monkeypatch.setenv("DPFC_CHOL_SCHEDULE", "right")
    assert _config.get().chol_schedule == "left"
    kernel_env(DPFC_CHOL_SCHEDULE="right")
    assert _config.get().chol_schedule == "right"
    with _config.override(chol_schedule="auto", lg_chunk=5) as cfg:
        assert cfg is _config.get()
        assert (cfg.chol_schedule, cfg.lg_chunk) == ("auto", 5)
        with _config.override(gram_kernel="simt"):
            assert (_config.get().gram_kernel, _config.get().lg_chunk) == ("simt", 5)
        assert _config.get().gram_kernel == "auto"
    assert _config.get().chol_schedule == "right"
    with pytest.raises(ValueError, match="DPFC_CHOL_SMALL_MAX"):
        with _config.override(chol_small_max=500):
            pass
