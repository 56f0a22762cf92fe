"""Philox known answers, the shared Gaussian transform, and the noise ops' layout.

The noise ops run on NumPy and, with ``-m gpu`` on a machine with a device, on CuPy
(``device="cuda"``), against the float64 Box-Muller reference on the raw Philox blocks.
That the two devices give bit-identical noise is a GPU-only fact (tests/test_gpu_only.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from _reference import to_host

from dpfc_native import _core, ops


def _device(xp) -> str:
    return "cpu" if xp is np else "cuda"


# Random123's kat_vectors for philox4x32-10: counter (4 words), key (2 words), output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF,) * 2,
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(_core.philox4x32_10(counter, key)) == expected


def test_shared_log_and_sincos_are_accurate(rng):
    t = np.concatenate([rng.random(200_000), [2.0**-52 * 0.5, 0.125, 0.25, 0.5, 0.75, 1 - 2**-52]])
    # A few ulp: the series is evaluated in double precision without compensated sums.
    np.testing.assert_allclose(_core.eval_transform(t, "log"), np.log(t), rtol=5 * 2.0**-52, atol=0)
    np.testing.assert_allclose(
        _core.eval_transform(t, "cos2pi"), np.cos(2 * np.pi * t), rtol=0, atol=2e-15
    )
    np.testing.assert_allclose(
        _core.eval_transform(t, "sin2pi"), np.sin(2 * np.pi * t), rtol=0, atol=2e-15
    )


def _normals_reference(key_words, block0, count):
    """Box-Muller on the raw Philox blocks, with NumPy's log/cos/sin (to ~1 ulp)."""
    k0, k1, c2, c3 = key_words
    out = []
    for blk in range((count + 1) // 2):
        b = block0 + blk
        r = _core.philox4x32_10((b & 0xFFFFFFFF, b >> 32, c2, c3), (k0, k1))
        u1 = ((((r[0] << 32) | r[1]) >> 12) + 0.5) * 2.0**-52
        u2 = ((((r[2] << 32) | r[3]) >> 12) + 0.5) * 2.0**-52
        rad = np.sqrt(-2 * np.log(u1))
        out += [rad * np.cos(2 * np.pi * u2), rad * np.sin(2 * np.pi * u2)]
    return np.array(out[:count])


@pytest.mark.parametrize("count", [1, 37, 1001])
def test_gaussian_noise_is_box_muller_on_philox(xp, count):
    key = 0x0123456789ABCDEF_FEDCBA9876543210
    words = ops._key_words(key)
    z = to_host(ops.gaussian_noise(count, 1.0, key=key, counter=2**40 + 3, device=_device(xp)))
    assert z.shape == (count,) and z.dtype == np.float64
    np.testing.assert_allclose(
        z, _normals_reference(words, 2**40 + 3, count), rtol=1e-13, atol=1e-14
    )
    # std scales, and float32 output is the rounded float64 output.
    z2 = to_host(
        ops.gaussian_noise(
            (count,), 2.5, key=key, counter=2**40 + 3, dtype=np.float32, device=_device(xp)
        )
    )
    np.testing.assert_array_equal(z2, (z * 2.5).astype(np.float32))
    # Shaped output: the same stream, row-major.
    z3 = to_host(ops.gaussian_noise((count, 3), 1.0, key=key, counter=5, device=_device(xp)))
    np.testing.assert_allclose(
        z3.ravel(), _normals_reference(words, 5, 3 * count), rtol=1e-13, atol=1e-14
    )


@pytest.mark.parametrize("d", [1, 2, 7, 64, 65])
def test_sym_noise_layout_and_scales(xp, d):
    key = 12345
    batch = 3
    dev = _device(xp)
    m = to_host(ops.sym_gaussian_noise(d, 2.0, batch=batch, key=key, counter=11, device=dev))
    assert m.shape == (batch, d, d) and m.dtype == np.float64
    np.testing.assert_array_equal(m, np.swapaxes(m, 1, 2))
    per = d * (d + 1) // 2
    z = _normals_reference(ops._key_words(key), 11, batch * per)
    iu = np.triu_indices(d)  # row-major upper triangle: the documented stream order
    for b in range(batch):
        zb = z[b * per : (b + 1) * per]
        expected = np.where(iu[0] == iu[1], 2.0 * zb, zb * (2.0 * np.sqrt(0.5)))
        np.testing.assert_allclose(m[b][iu], expected, rtol=1e-13, atol=1e-14)
    single = to_host(ops.sym_gaussian_noise(d, 2.0, key=key, counter=11, device=dev))
    np.testing.assert_array_equal(single, m[0])
    assert ops.sym_noise_blocks(d, batch) == (batch * per + 1) // 2


def test_sym_noise_layout_matches_the_iid_stream():
    """Bit for bit: the symmetric noise scales the iid stream's normals."""
    for d in (1, 2, 7, 64, 65):
        m = ops.sym_gaussian_noise(d, 2.0, batch=3, key=12345, counter=11)
        per = d * (d + 1) // 2
        z = ops.gaussian_noise(3 * per, 1.0, key=12345, counter=11)
        iu = np.triu_indices(d)
        for b in range(3):
            zb = z[b * per : (b + 1) * per]
            expected = np.where(iu[0] == iu[1], 2.0 * zb, zb * (2.0 * np.sqrt(0.5)))
            np.testing.assert_allclose(m[b][iu], expected, rtol=1e-15, atol=0)


def test_determinism_and_fresh_keys(xp):
    dev = _device(xp)

    def sym(**kw):
        return to_host(ops.sym_gaussian_noise(20, 1.0, device=dev, **kw))

    a = sym(key=7, counter=0)
    np.testing.assert_array_equal(a, sym(key=7, counter=0))
    assert not np.array_equal(a, sym(key=7, counter=ops.sym_noise_blocks(20)))
    assert not np.array_equal(a, sym(key=8, counter=0))
    fresh = [sym() for _ in range(2)]
    assert not np.array_equal(fresh[0], fresh[1])
    # The upper 64 key bits matter (they live in the counter's upper words).
    assert not np.array_equal(a, sym(key=7 + (1 << 100), counter=0))


def test_noise_distribution_diag_and_offdiag(xp):
    m = to_host(ops.sym_gaussian_noise(400, 3.0, key=99, device=_device(xp)))
    diag = np.diagonal(m)
    off = m[np.triu_indices(400, 1)]
    assert scipy.stats.kstest(diag / 3.0, "norm").pvalue > 1e-3
    assert scipy.stats.kstest(off / (3.0 / np.sqrt(2)), "norm").pvalue > 1e-3
    # Frobenius-norm calibration: E ||Z||_F^2 = std^2 d(d+1)/2 ... per vectorised coordinate.
    v = np.concatenate([diag, np.sqrt(2) * off])
    assert abs(v.var() / 9.0 - 1) < 5 * np.sqrt(2 / v.size)
    z = to_host(ops.gaussian_noise((1 << 20,), 1.0, key=0x0123456789ABCDEF, device=_device(xp)))
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1.0) < 5e-3


def test_noise_argument_errors():
    with pytest.raises(ValueError, match="std"):
        ops.sym_gaussian_noise(3, -1.0)
    with pytest.raises(ValueError, match="key"):
        ops.sym_gaussian_noise(3, 1.0, key=1 << 128)
    with pytest.raises(TypeError, match="key"):
        ops.sym_gaussian_noise(3, 1.0, key=1.5)
    with pytest.raises(ValueError, match="counter"):
        ops.sym_gaussian_noise(3, 1.0, key=1, counter=-1)
    with pytest.raises(ValueError, match="counter"):
        ops.gaussian_noise(4, 1.0, key=1, counter=2**64 - 1)
    with pytest.raises(TypeError, match="dtype"):
        ops.gaussian_noise(4, 1.0, dtype=np.int32)
    with pytest.raises(ValueError, match="device"):
        ops.gaussian_noise(4, 1.0, device="tpu")
    with pytest.raises(ValueError, match="d must be"):
        ops.sym_gaussian_noise(0, 1.0)
