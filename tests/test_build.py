"""Build facts: capability and device presence are separate."""

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
