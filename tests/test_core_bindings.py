"""The private compiled module: its type stub matches it, and the CUDA entry points take their
kernel choices as validated arguments (checked before any device work, so these run on a
CUDA build without a GPU too)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
from conftest import requires_cuda_build

import dpfc_native
from dpfc_native import _core

STUB = pathlib.Path(dpfc_native.__file__).with_name("_core.pyi")


def _stub_functions() -> dict:
    tree = ast.parse(STUB.read_text())
    return {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}


def _module_functions() -> list:
    return sorted(
        n
        for n in dir(_core)
        if not n.startswith("_") and callable(getattr(_core, n)) and n != "CudaError"
    )


def test_stub_lists_every_binding():
    stub = _stub_functions()
    funcs = _module_functions()
    assert set(funcs) <= set(stub)
    cuda_only = {n for n in stub if n.startswith("cuda_")}
    if _core.cuda_compiled:
        assert set(stub) == set(funcs)
    else:
        assert set(stub) - set(funcs) == cuda_only
    # The naming scheme: cpu_/cuda_ prefixes, or a backend-neutral helper.
    assert all(
        re.match(r"(cpu|cuda)_", n) or n in ("philox4x32_10", "eval_transform") for n in stub
    )


@pytest.mark.parametrize("name", sorted(_stub_functions()))
def test_stub_signature_matches_the_binding(name):
    """Parameter names and defaults of the stub equal pybind11's signature line."""
    if not hasattr(_core, name):
        pytest.skip("CUDA entry point: not in this build")
    f = _stub_functions()[name]
    assert f.returns is not None and all(a.annotation is not None for a in f.args.args)
    head = getattr(_core, name).__doc__.splitlines()[0]
    m = re.match(rf"{name}\((.*)\) -> .*$", head)
    assert m, head
    got = []
    for p in re.split(r",\s*(?![^\[]*\])", m.group(1)):
        if p.strip():
            pname = p.split(":")[0].strip()
            default = ast.literal_eval(p.split("=", 1)[1].strip()) if "=" in p else None
            got.append((pname, default))
    args = f.args
    defaults = [None] * (len(args.args) - len(args.defaults))
    defaults += [ast.literal_eval(d) for d in args.defaults]
    assert got == [(a.arg, d) for a, d in zip(args.args, defaults)]


@requires_cuda_build
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel": "tensor"}, "kernel must be"),
        ({"schedule": "sideways"}, "schedule must be"),
        ({"small_max": 129}, "small_max must be"),
        ({"small_max": -1}, "small_max must be"),
    ],
)
def test_cholesky_options_are_validated_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _core.cuda_cholesky_plan(1, 10, 1, **kwargs)
    with pytest.raises(ValueError, match="dtype must be"):
        _core.cuda_cholesky_plan(1, 10, 5)
    assert _core.cuda_cholesky_plan(1000, 20, 1).startswith("small tier=32")
    assert (
        _core.cuda_cholesky_plan(1000, 20, 0, small_max=0, schedule="left", kernel="simt")
        == "blocked nb=64 schedule=left gemm=simt"
    )


@requires_cuda_build
def test_linear_grad_engine_and_chunk_are_validated_arguments():
    args = (1, 0, 10, 5, 5, 1, 1, 5, 0, 3, 1.0, "sigmoid", -1.0, 1, 1, 0)
    with pytest.raises(ValueError, match="engine must be"):
        _core.cuda_clipped_linear_grad(*args, "tensor", 10)
    with pytest.raises(ValueError, match="chunk_rows must be"):
        _core.cuda_clipped_linear_grad(*args, "auto", 0)


@requires_cuda_build
def test_blocked_cholesky_plan_reports_a_missing_device():
    """The schedule depends on the multiprocessor count: without a device that is an error,
    never a guessed count."""
    if len(_core.cuda_devices()) > 0:
        assert _core.cuda_cholesky_plan(1, 1024, 1).startswith("blocked nb=64")
    else:
        with pytest.raises(_core.CudaError):
            _core.cuda_cholesky_plan(1, 1024, 1)


@pytest.mark.parametrize("d", [0, 1, 2, 63, 64, 65, 130, 257])
def test_mirror_upper_fills_the_lower_triangle_from_the_upper(d):
    import numpy as np

    rng = np.random.default_rng(d)
    src = rng.standard_normal((d, d))
    a = np.asfortranarray(np.triu(src))
    a[np.tril_indices(d, -1)] = np.nan  # every lower element must be written
    _core.cpu_mirror_upper(a)
    want = np.triu(src) + np.triu(src, 1).T
    assert a.tobytes(order="F") == np.asfortranarray(want).tobytes(order="F")


def test_mirror_upper_refuses_what_it_cannot_update_in_place():
    import numpy as np

    for bad, match in [
        (np.zeros((4, 4)), "Fortran"),  # C order (d > 1)
        (np.zeros((4, 4), np.float32, order="F"), "float64"),
        (np.zeros((4, 5), order="F"), "square"),
    ]:
        with pytest.raises(ValueError, match=match):
            _core.cpu_mirror_upper(bad)
    ro = np.zeros((3, 3), order="F")
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core.cpu_mirror_upper(ro)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("m, d", [(0, 3), (1, 1), (7, 3), (4097, 33), (300, 129)])
def test_syrk_without_the_gil_has_the_bits_of_scipys_syrk(dtype, m, d):
    """The native call goes to the same BLAS function as scipy.linalg.blas.?syrk, with
    the same arguments: the same bits, the strict lower triangle untouched."""
    import numpy as np
    import scipy.linalg.blas as blas

    from dpfc_native import _cpu_stats

    rng = np.random.default_rng(m * 1000 + d)
    rows = rng.standard_normal((m, d)).astype(dtype)
    start = np.asfortranarray(rng.standard_normal((d, d)).astype(dtype))
    g = start.copy(order="F")
    cap = _cpu_stats._syrk_capsule("d" if dtype == "float64" else "s")
    assert cap is not None
    _core.cpu_syrk_upper(cap, rows.T, g, 1.0, 1.0)
    syrk = blas.dsyrk if dtype == "float64" else blas.ssyrk
    want = syrk(1.0, rows.T, beta=1.0, c=start.copy(order="F"), trans=0, lower=0)
    assert g.tobytes(order="F") == np.asfortranarray(want).tobytes(order="F")
    low = np.tril_indices(d, -1)
    assert np.array_equal(g[low], start[low])
    # The statistics' helper takes the same route, or SciPy's wrapper where it cannot.
    via = _cpu_stats._syrk_upper_into(start.copy(order="F"), np.ascontiguousarray(rows))
    strided = _cpu_stats._syrk_upper_into(start.copy(order="F"), np.asfortranarray(rows))
    assert via.tobytes(order="F") == strided.tobytes(order="F") == g.tobytes(order="F")


def test_syrk_refuses_mismatched_arguments_and_foreign_capsules():
    import numpy as np

    from dpfc_native import _cpu_stats

    cap = _cpu_stats._syrk_capsule("d")
    a = np.zeros((3, 5), order="F")
    for args, match in [
        ((a.astype(np.float32), np.zeros((3, 3), order="F")), "same dtype"),
        ((a, np.zeros((3, 3))), "Fortran"),
        ((np.zeros((3, 5)), np.zeros((3, 3), order="F")), "Fortran"),
        ((a, np.zeros((4, 4), order="F")), r"\(d, m\)"),
        ((a.astype(np.int64), np.zeros((3, 3), np.int64, order="F")), "float32 or float64"),
    ]:
        with pytest.raises(ValueError, match=match):
            _core.cpu_syrk_upper(cap, *args, 1.0, 1.0)
    # A capsule with another signature is never called (the helper falls back).
    assert _cpu_stats._capsule_name(cap).startswith("void (char *, char *, int *, int *")
    from scipy.linalg import cython_blas

    other = cython_blas.__pyx_capi__["dgemm"]
    assert _cpu_stats._capsule_name(other) != _cpu_stats._capsule_name(cap)


def test_bindings_accept_equivalent_dtypes_and_refuse_byte_swapped_ones():
    """An unpickled array's dtype is an equal descriptor, not the same object (as arrays
    reach Dask workers): accepted. A byte-swapped float64 is not float64 in memory."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(5)
    x = pickle.loads(pickle.dumps(rng.standard_normal((3, 4))))
    assert x.dtype is not np.dtype(np.float64)
    out = pickle.loads(pickle.dumps(np.full((3, 4), np.nan)))
    assert _core.cpu_preprocess_rows(x, out, None, False, 1.0) == -1
    assert np.isfinite(out).all()
    hi = pickle.loads(pickle.dumps(np.zeros(12, np.int64)))
    lo = pickle.loads(pickle.dumps(np.zeros(12, np.int64)))
    assert _core.cpu_grid_accumulate(x.ravel(), 2.0**10, 2.0**40, hi, lo) == 0
    assert lo.any()
    swapped = x.astype(">f8")
    with pytest.raises(ValueError, match="float32 or float64"):
        _core.cpu_preprocess_rows(swapped, out, None, False, 1.0)


@pytest.mark.parametrize("m, d", [(1, 1), (9, 5), (333, 769)])
def test_clip_rows_native_pass_matches_the_float64_formula(m, d):
    """cpu_clip_rows (the CPU statistics' clipping) against the NumPy formula: scales and
    rows within a few ulps, every element written, NaN/Inf rows copied with scale 1, in
    place = out of place, float32 rows = their float64 widening."""
    import numpy as np

    from dpfc_native import _cpu_stats

    rng = np.random.default_rng(m * 7 + d)
    x = rng.standard_normal((m, d)) * np.exp(rng.uniform(-20, 20, (m, 1)))
    x[0] = 0.0
    if m > 4:
        x[1] *= 1e295  # overflowing sum of squares
        x[2] *= 1e-290  # underflowing
        x[3, 0] = np.nan
        x[4, -1] = -np.inf
    clip = 0.9
    with np.errstate(all="ignore"):
        norms = _cpu_stats._row_norms64(x)
        want_s = _cpu_stats._clip_scale(norms, clip)
        want = x * want_s[:, None]
    out, s = np.full(x.shape, 7.0), np.full(m, 7.0)
    _core.cpu_clip_rows(x, out, s, clip)
    ok = np.isfinite(x).all(axis=1)
    np.testing.assert_allclose(s[ok], want_s[ok], rtol=4 * d * 2.0**-52, atol=0)
    scale = np.abs(want[ok]).max(axis=1, keepdims=True)
    assert (np.abs(out[ok] - want[ok]) <= 4 * d * 2.0**-52 * scale).all()
    assert (s[~ok] == 1.0).all()
    assert np.array_equal(out[~ok], x[~ok], equal_nan=True)
    assert (np.linalg.norm(out[ok], axis=1) < clip).all()
    inplace, s2 = x.copy(), np.empty(m)
    _core.cpu_clip_rows(inplace, inplace, s2, clip)
    assert inplace.tobytes() == out.tobytes() and s2.tobytes() == s.tobytes()
    x32 = x[ok].astype(np.float32)
    a, b = np.empty(x32.shape), np.empty(x32.shape)
    sa, sb = np.empty(len(x32)), np.empty(len(x32))
    _core.cpu_clip_rows(x32, a, sa, clip)
    _core.cpu_clip_rows(x32.astype(np.float64), b, sb, clip)
    assert a.tobytes() == b.tobytes() and sa.tobytes() == sb.tobytes()
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="clip"):
            _core.cpu_clip_rows(x, out, s, bad)
    with pytest.raises(ValueError, match="scales"):
        _core.cpu_clip_rows(x, out, np.empty(m + 1), clip)


_CORE_MISUSE = {
    # A list as center: reinterpret_borrow<py::array> of a list segfaulted.
    "preprocess_list_center": "_core.cpu_preprocess_rows(np.ones((4, 3)), np.empty((4, 3)), "
    "[0.0, 0.0, 0.0], True, 1.0)",
    # tri_d * tri_d overflowed (2^32 -> 0: SIGFPE in %, 2^63 - 1 -> 1: segfault).
    "grid_tri_d_2_32": "_core.cpu_grid_accumulate(np.ones(4), 1.0, 10.0, h, l, 2**32)",
    "grid_tri_d_max": "_core.cpu_grid_accumulate(np.ones(4), 1.0, 10.0, h, l, 2**63 - 1)",
    # Another BLAS function's capsule (dgemm) segfaulted; ssyrk on float64 gave wrong values.
    "syrk_dgemm_capsule": "_core.cpu_syrk_upper(capi['dgemm'], a, c, 1.0, 1.0)",
    "syrk_ssyrk_on_float64": "_core.cpu_syrk_upper(capi['ssyrk'], a, c, 1.0, 1.0)",
}


@pytest.mark.parametrize("case", sorted(_CORE_MISUSE))
def test_core_misuse_raises_instead_of_crashing(case):
    """The private bindings check what they dereference: each misuse is a ValueError in a
    process that survives (run in a subprocess: the old behaviour killed it)."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from scipy.linalg import cython_blas\n"
        "capi = cython_blas.__pyx_capi__\n"
        "from dpfc_native import _core\n"
        "h = np.zeros(4, np.int64); l = np.zeros(4, np.int64)\n"
        "a = np.ones((3, 2), order='F'); c = np.zeros((3, 3), order='F')\n"
        "try:\n"
        f"    {_CORE_MISUSE[case]}\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert r.stdout.startswith("ValueError"), r.stdout + r.stderr[-500:]
