"""Build facts: capability and device presence are separate."""

import pytest

import dpfc_native


def test_build_info_fields():
    info = dpfc_native.build_info()
    assert isinstance(info["version"], str) and info["version"] == dpfc_native.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0
    assert isinstance(info["cuda_arches"], list)
    if info["cuda_compiled"]:
        assert {"80-real", "90-real"} <= set(info["cuda_arches"])
    else:
        assert info["cuda_devices"] == 0


def test_cuda_error_is_a_python_exception_type():
    assert issubclass(dpfc_native.CudaError, RuntimeError)


# --- Which GPUs a build can run on (decided from compute capabilities on the CPU) ---------

DEV = ["80-real", "90-real", "90-virtual"]  # the development default
RELEASE = ["80-real", "90-real", "100-real", "120-real", "120-virtual"]


@pytest.mark.parametrize("arches", [DEV, RELEASE, ["80"], ["90a-real"]])
@pytest.mark.parametrize("cc", [(3, 5), (6, 1), (7, 0), (7, 5)])
def test_gpus_below_sm80_never_count(arches, cc):
    reason = dpfc_native._device_unsupported_reason(arches, *cc)
    assert reason is not None and "below 8.0" in reason and f"{cc[0]}.{cc[1]}" in reason


@pytest.mark.parametrize(
    "arches, cc, usable",
    [
        (DEV, (8, 0), True),  # A100: sm_80 cubin
        (DEV, (8, 6), True),  # A10 / RTX 30: same major, sm_80 cubin runs
        (DEV, (8, 9), True),  # L4 / RTX 40
        (DEV, (9, 0), True),  # H100: sm_90 cubin
        (DEV, (10, 0), True),  # B200: JIT from the sm_90 PTX
        (DEV, (12, 0), True),  # RTX 50: JIT from the sm_90 PTX
        (["80-real", "90-real"], (10, 0), False),  # cubins do not cross a major version
        (["80-real", "90-real"], (8, 7), True),
        (["90-real"], (8, 0), False),  # a cubin does not run on an older GPU
        (["90-real"], (9, 0), True),
        (RELEASE, (10, 0), True),
        (RELEASE, (10, 3), True),  # B300: sm_100 cubin, same major
        (RELEASE, (12, 1), True),
        (RELEASE, (11, 0), False),  # 120-virtual is newer; no 11.x cubin, no older PTX
        (["80-real", "120-virtual"], (13, 0), True),
        (["90a-real"], (9, 0), True),  # arch-specific code: exactly 9.0
        (["100a-real"], (10, 3), False),
        (["90a-virtual"], (10, 0), False),  # arch-specific PTX does not carry forward
        (["100f-real"], (10, 3), True),  # family code: same major, newer minor
        (["100f-virtual"], (12, 0), False),
        (["90"], (10, 0), True),  # plain: cubin and PTX
        (["native"], (8, 6), True),  # symbolic lists: only the floor applies
    ],
)
def test_device_kernel_image_rule(arches, cc, usable):
    reason = dpfc_native._device_unsupported_reason(arches, *cc)
    assert (reason is None) is usable, reason
    if not usable:
        assert f"compute capability {cc[0]}.{cc[1]}" in reason
        assert f"(compiled for {', '.join(arches)})" in reason


def test_device_report_counts_and_explains():
    devices = [
        (0, "NVIDIA H100 80GB HBM3", 9, 0),
        (1, "Tesla T4", 7, 5),
        (2, "NVIDIA A10", 8, 6),
        (3, "Future GPU", 11, 0),
    ]
    usable, skipped = dpfc_native._device_report(["80-real", "90-real"], devices)
    assert usable == 2
    assert len(skipped) == 2
    assert skipped[0].startswith("device 1 (Tesla T4): ") and "below 8.0" in skipped[0]
    assert skipped[1].startswith("device 3 (Future GPU): ") and "80-real, 90-real" in skipped[1]
    assert dpfc_native._device_report(DEV, []) == (0, [])


def test_build_info_device_fields_agree():
    info = dpfc_native.build_info()
    assert isinstance(info["cuda_devices_skipped"], list)
    assert all(isinstance(s, str) and s.startswith("device ") for s in info["cuda_devices_skipped"])
    if info["cuda_compiled"]:
        # The same rule applied to what the runtime reports right now.
        devices = dpfc_native._core.cuda_devices()
        assert all(len(d) == 4 for d in devices)
        assert info["cuda_devices"] + len(info["cuda_devices_skipped"]) == len(devices)
    else:
        assert info["cuda_devices_skipped"] == []
