"""The Dask backend: the same bits as the local exact reduction, whatever the partitioning,
the number of workers, or a worker SIGKILLed mid-run; coverage guard; noise only on the
client (a NoiseSource refuses to be pickled); Poisson masks identical across partitions.

One LocalCluster(n_workers=2, processes=True, threads_per_worker=1) serves the module.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
cloudpickle = pytest.importorskip("cloudpickle")

from _reference import npy_shards  # noqa: E402

from dpfc_native import distributed as dd  # noqa: E402
from dpfc_native import mechanisms, ops  # noqa: E402
from dpfc_native import reduction as R  # noqa: E402
from dpfc_native.shards import open_sharded  # noqa: E402

# Test-only statistics below are shipped to the workers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHARDS = (301, 77, 1000, 250)  # unequal, none a multiple of the leaf
LEAF = 64
D = 9
K = 5


def _local_cluster(n_workers, **kwargs):
    """Worker processes of one thread each, quiet, no dashboard."""
    return distributed.LocalCluster(
        n_workers=n_workers,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
        **kwargs,
    )


@pytest.fixture(scope="module")
def client():
    with _local_cluster(2) as cluster:
        with distributed.Client(cluster) as c:
            c.wait_for_workers(2, timeout=60)
            yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(20261207)
    tmp = tmp_path_factory.mktemp("shards")
    n = sum(SHARDS)
    x = (rng.standard_normal((n, D)) * rng.uniform(0.2, 3.0, size=(n, 1))).astype(np.float32)
    y = rng.integers(0, K, size=n)
    return npy_shards(tmp, x, y, SHARDS, K), x, y


def _bits(result):
    if isinstance(result, tuple):
        return tuple(_bits(r) for r in result)
    if isinstance(result, (int, np.integer)):
        return int(result)
    return np.ascontiguousarray(result).tobytes()


def _stat_cases(rng):
    w = rng.standard_normal((K, D))
    bias = rng.standard_normal(K)
    return [
        ("gram", R.Gram(1.7), {}),
        ("stats", R.Stats(1.7, K), {}),
        ("class_sums", R.ClassSums(0.9, K), {}),
        ("class_grams", R.ClassGrams(1.1, K), {}),
        ("class_grams_block", R.ClassGrams(1.1, K, classes=(1, 4)), {}),
        ("newton", R.WeightedGrams(1.1, K, weight_fn=R.NewtonWeights(w, bias, 1.1)), {}),
        ("weights", R.WeightedGrams(1.1, K), {"weights": rng.uniform(0, 0.25, (sum(SHARDS), K))}),
        ("grad_sigmoid", R.LinearGrad(0.2, w, bias), {}),
        ("grad_softmax", R.LinearGrad(0.2, w, bias, loss="softmax", feature_clip=2.0), {}),
    ]


def test_every_statistic_bit_identical_to_local(client, data):
    sf, x, y = data
    rng = np.random.default_rng(1)
    for name, stat, kw in _stat_cases(rng):
        local = R.reduce(stat, sf, leaf_rows=LEAF, **kw)
        remote = dd.compute(stat, sf, client=client, leaf_rows=LEAF, leaves_per_task=3, **kw)
        assert _bits(remote) == _bits(local), name
        # The same rows as one array cut like the shards: the same leaves, the same bits.
        arr = R.reduce(stat, x, y, leaf_rows=LEAF, shard_rows=SHARDS, **kw)
        assert _bits(arr) == _bits(local), name


def test_wrappers_match_ops_shapes_and_local(client, data):
    sf, x, y = data
    g, b, counts = dd.clipped_stats(sf, 1.0, client=client, leaf_rows=LEAF)
    assert g.shape == (D, D) and b.shape == (K, D)
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=K))
    assert _bits(dd.clipped_gram(sf, 1.0, client=client, leaf_rows=LEAF)) == _bits(g)
    a = dd.clipped_class_grams(sf, 1.0, client=client, leaf_rows=LEAF, class_block=2)
    assert _bits(a) == _bits(R.reduce(R.ClassGrams(1.0, K), sf, leaf_rows=LEAF))
    w = np.random.default_rng(2).standard_normal((K, D))
    h = dd.clipped_weighted_grams(
        sf,
        1.0,
        num_weights=K,
        weight_fn=R.NewtonWeights(w, 0.0, 1.0),
        class_block=3,
        client=client,
        leaf_rows=LEAF,
    )
    assert _bits(h) == _bits(
        R.reduce(
            R.WeightedGrams(1.0, K, weight_fn=R.NewtonWeights(w, 0.0, 1.0)), sf, leaf_rows=LEAF
        )
    )
    grad, n_clipped = dd.clipped_linear_grad(sf, w, 0.5, 0.1, client=client, leaf_rows=LEAF)
    assert grad.shape == (K, D) and n_clipped > 0


def test_partitioning_and_worker_count_invariance(client, data):
    sf, _, _ = data
    stat = R.Stats(1.3, K)
    local = _bits(R.reduce(stat, sf, leaf_rows=LEAF))
    one_worker = [sorted(client.scheduler_info()["workers"])[0]]
    for per_task in (1, 4, None):  # one leaf, several, a whole shard
        for workers in (None, one_worker):
            got = dd.compute(
                stat, sf, client=client, leaf_rows=LEAF, leaves_per_task=per_task, workers=workers
            )
            assert _bits(got) == local, (per_task, workers)


def test_large_statistic_parameters_are_scattered_once(client, data, monkeypatch):
    sf, x, y = data
    monkeypatch.setattr(dd, "_SCATTER_BYTES", 0)  # every W counts as large
    w = np.random.default_rng(8).standard_normal((K, D))
    stat = R.LinearGrad(0.3, w, 0.1)
    assert _bits(dd.compute(stat, sf, client=client, leaf_rows=LEAF, leaves_per_task=5)) == _bits(
        R.reduce(stat, sf, leaf_rows=LEAF)
    )
    with pytest.raises(TypeError, match="ArraySource"):
        dd.compute(stat, R.ArraySource(x, y), client=client)
    with pytest.raises(TypeError, match="dask array"):
        dd.compute(stat, x, y, client=client)


def test_dask_array_input(client, data):
    _, x, y = data
    xd = da.from_array(x, chunks=(333, D))  # row chunks act as shards
    yd = da.from_array(y, chunks=(333,))
    for stat in (R.Gram(1.2), R.Stats(1.2, K), R.ClassGrams(1.2, K)):
        got = dd.compute(stat, xd, yd, client=client, leaf_rows=LEAF, leaves_per_task=2)
        assert _bits(got) == _bits(R.reduce(stat, x, y, leaf_rows=LEAF, shard_rows=xd.chunks[0]))


def test_ops_leaf_rows_equal_the_cluster(client, data):
    """The one-process ops with ``leaf_rows`` and the cluster give the same bits: a dask
    array chunked in multiples of the leaf has the leaves of one array."""
    _, x, y = data
    rng = np.random.default_rng(11)
    w, bias = rng.standard_normal((K, D)), rng.standard_normal(K)
    weights = rng.uniform(0, 0.25, (len(x), K))
    xd = da.from_array(x, chunks=(5 * LEAF, D))
    yd = da.from_array(y, chunks=(5 * LEAF,))
    on_cluster = dict(client=client, leaf_rows=LEAF, leaves_per_task=2)
    pairs = [
        (ops.clipped_gram(x, 1.2, leaf_rows=LEAF), dd.clipped_gram(xd, 1.2, **on_cluster)),
        (
            ops.clipped_stats(x, y, K, 1.2, leaf_rows=LEAF),
            dd.clipped_stats(xd, 1.2, labels=yd, num_classes=K, **on_cluster),
        ),
        (
            ops.clipped_class_sums(x, y, K, 0.8, leaf_rows=LEAF),
            dd.clipped_class_sums(xd, 0.8, labels=yd, num_classes=K, **on_cluster),
        ),
        (
            ops.clipped_class_grams(x, y, K, 1.2, leaf_rows=LEAF),
            dd.clipped_class_grams(xd, 1.2, labels=yd, num_classes=K, class_block=2, **on_cluster),
        ),
        (
            ops.clipped_weighted_grams(x, weights, 1.2, leaf_rows=LEAF, weight_bound=0.25),
            dd.clipped_weighted_grams(xd, 1.2, num_weights=K, weights=weights, **on_cluster),
        ),
        (
            ops.clipped_linear_grad(x, y, w, bias, 0.2, leaf_rows=LEAF),
            dd.clipped_linear_grad(xd, w, bias, 0.2, labels=yd, **on_cluster),
        ),
    ]
    for i, (local, remote) in enumerate(pairs):
        assert _bits(local) == _bits(remote), i


def test_zarr_float16_shards_as_stored(client, tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(3)
    for i, m in enumerate((129, 70)):
        g = zarr.open_group(str(tmp_path / f"z{i}.zarr"), mode="w")
        g.create_array(
            "features", data=rng.standard_normal((m, D)).astype(np.float16), chunks=(50, D)
        )
        g.create_array("labels", data=rng.integers(0, K, m), chunks=(50,))
    sf = open_sharded(str(tmp_path / "*.zarr"))
    assert sf.dtype == np.float16
    stat = R.Stats(2.0, sf.num_classes)
    assert _bits(dd.compute(stat, sf, client=client, leaf_rows=32, leaves_per_task=1)) == _bits(
        R.reduce(stat, sf, leaf_rows=32)
    )


def test_coverage_guard_on_duplicated_or_missing_partials(client, data):
    sf, _, _ = data
    lay = R.LeafLayout(sf.shard_rows, LEAF)
    stat = R.Gram(1.0)
    ranges = lay.tasks(4)
    with pytest.raises(R.CoverageError, match="counted twice"):
        dd.compute(stat, sf, client=client, leaf_rows=LEAF, task_ranges=ranges + [ranges[3]])
    with pytest.raises(R.CoverageError, match="missing"):
        dd.compute(stat, sf, client=client, leaf_rows=LEAF, task_ranges=ranges[:2] + ranges[3:])
    _, partial = dd.compute(
        stat, sf, client=client, leaf_rows=LEAF, task_ranges=ranges[::-1], return_partial=True
    )
    assert partial.ranges == ((0, lay.n_leaves),)


def test_poisson_sampling_identical_across_partitions(client, data):
    sf, x, y = data
    s = R.PoissonSampling.new(0.2, seed=9).at_step(3)
    stat = R.LinearGrad(0.5, np.random.default_rng(4).standard_normal((K, D)), 0.0)
    local = _bits(R.reduce(stat, sf, leaf_rows=LEAF, sampling=s))
    for per_task in (1, None):
        assert (
            _bits(
                dd.compute(
                    stat, sf, client=client, leaf_rows=LEAF, leaves_per_task=per_task, sampling=s
                )
            )
            == local
        )
    # The batch is exactly the rows whose mask is set, read whatever the partitioning.
    g, _, counts = dd.compute(R.Stats(1.0, K), sf, client=client, leaf_rows=LEAF, sampling=s)
    np.testing.assert_array_equal(counts, np.bincount(y[s.mask(0, len(y))], minlength=K))


def test_noise_is_added_once_on_the_client(client, data):
    sf, _, _ = data
    g = dd.clipped_gram(sf, 1.0, client=client, leaf_rows=LEAF)
    outs = []
    for stat in (g, R.reduce(R.Gram(1.0), sf, leaf_rows=LEAF)):
        source = mechanisms.NoiseSource(1234)
        noisy, rec = mechanisms.release_symmetric(stat, 1.0, 2.0, source, "gram")
        outs.append((noisy, rec, source.draws))
    assert _bits(outs[0][0]) == _bits(outs[1][0])
    assert outs[0][1] == outs[1][1] and len(outs[0][2]) == 1 == len(outs[1][2])
    assert not np.array_equal(outs[0][0], g)


def test_noise_source_refuses_pickling(client):
    source = mechanisms.NoiseSource()
    for dump in (pickle.dumps, cloudpickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match="cannot be pickled"):
            dump(source)
    # Through Dask the refusal surfaces wrapped in Dask's serialisation error.
    with pytest.raises(Exception) as info:
        client.submit(lambda s: 0, source).result(timeout=30)
    chain, err = [], info.value
    while err is not None and len(chain) < 20:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, TypeError) and "cannot be pickled" in str(e) for e in chain)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps({"model": [source]})


class _SlowLoggedGram(R.Gram):
    """Gram whose leaves take a while and log each computation (to count recomputes);
    once armed, the first worker to finish logging a leaf SIGKILLs itself, mid-task."""

    log_path: str = ""
    arm_path: str = ""
    killed_path: str = ""

    def leaf(self, x, y, weights):
        time.sleep(0.02)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {float(np.asarray(x[0, 0], np.float64))!r}\n".encode())
        finally:
            os.close(fd)
        if os.path.exists(self.arm_path):
            try:
                os.close(os.open(self.killed_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().leaf(x, y, weights)


def test_worker_killed_mid_run_gives_same_bits_and_counts_each_leaf_once(client, data, tmp_path):
    sf, _, _ = data
    stat = _SlowLoggedGram(1.0)
    for name in ("log", "arm", "killed"):
        object.__setattr__(stat, f"{name}_path", str(tmp_path / name))
    lay = R.LeafLayout(sf.shard_rows, LEAF)
    local = R.reduce(R.Gram(1.0), sf, leaf_rows=LEAF)

    def arm_after_first(done, total):
        # Part of the tasks have finished: the next leaf logged kills its worker.
        if not os.path.exists(stat.arm_path):
            open(stat.arm_path, "w").close()

    got, partial = dd.compute(
        stat,
        sf,
        client=client,
        leaf_rows=LEAF,
        leaves_per_task=2,
        progress=arm_after_first,
        return_partial=True,
    )
    assert os.path.exists(stat.killed_path), "no worker was killed"
    assert _bits(got) == _bits(local)
    assert partial.ranges == ((0, lay.n_leaves),) and partial.n_leaves_covered == lay.n_leaves
    computed = open(stat.log_path).read().splitlines()
    # The killed worker's leaf (logged just before the kill) was computed again, elsewhere;
    # none was counted twice.
    assert len(computed) > lay.n_leaves
    print(f"{lay.n_leaves} leaves, {len(computed) - lay.n_leaves} recomputed after the kill")
    client.wait_for_workers(2, timeout=60)


def _p_shards(folder, x, y, sizes, k):
    """Shards ``p0, p1, ...`` opened without checksums."""
    return npy_shards(folder, x, y, sizes, k, stem="p", checksum=False)


def test_replay_neighbours_through_dask_within_declared_sensitivity(client, tmp_path):
    """D and D' = D plus one example (adversarial rows, at shard starts, middles and ends;
    the leaves of that shard shift): before noise, every statistic moves by at most its
    declared add/remove sensitivity (Frobenius), rounding of the exact reduction included."""
    rng = np.random.default_rng(5)
    sizes = [70, 129, 41]
    x = rng.standard_normal((sum(sizes), D)) * 2.0
    y = rng.integers(0, K - 1, sum(sizes))  # class K-1 never occurs in D
    c, cg = 1.5, 0.4
    w = rng.standard_normal((K, D)) * 3
    base = _p_shards(str(tmp_path / "d"), x, y, sizes, K)
    stats = [
        (R.Gram(c), c * c),
        (R.ClassSums(c, K), c),
        (R.ClassGrams(c, K), c * c),
        (R.WeightedGrams(c, K, weight_fn=R.NewtonWeights(w, 0.0, c)), c * c * np.sqrt(K) / 4),
        (R.LinearGrad(cg, w, 0.0, loss="softmax"), cg),
    ]
    before = [dd.compute(s, base, client=client, leaf_rows=16, leaves_per_task=2) for s, _ in stats]
    direction = np.linalg.svd(x, full_matrices=True)[2][-1]  # least present in D
    rows = [np.full(D, 1e30), direction * c, direction * 1e-3, np.zeros(D)]
    checked = 0
    for t, (row, pos) in enumerate(zip(rows, [0, 70 + 64, 70 + 129, 239])):
        label = (K - 1) if t % 2 else 0
        x2 = np.insert(x, pos, row, axis=0)
        y2 = np.insert(y, pos, label)
        sizes2 = list(sizes)
        shard = int(np.searchsorted(np.cumsum(sizes), pos, side="right")) if pos < sum(sizes) else 2
        sizes2[min(shard, 2)] += 1
        nb = _p_shards(str(tmp_path / f"n{t}"), x2, y2, sizes2, K)
        for (stat, sens), s0 in zip(stats, before):
            s1 = dd.compute(stat, nb, client=client, leaf_rows=16, leaves_per_task=3)
            v0 = s0[0] if isinstance(s0, tuple) else s0
            v1 = s1[0] if isinstance(s1, tuple) else s1
            change = float(np.linalg.norm(np.asarray(v1) - np.asarray(v0)))
            assert change <= sens, (type(stat).__name__, t, change, sens)
            checked += 1
    assert checked == len(rows) * len(stats)


# --------------------------------------------------------------------------------------
# Estimators: a fit through Dask is the local fit, bit for bit
# --------------------------------------------------------------------------------------

from dpfc_native import (  # noqa: E402
    _fitstats,  # noqa: E402
    models,  # noqa: E402
)

FIT_CASES = [
    ("ls_global", models.DPLeastSquaresClassifier, {"reg": 5.0}),
    ("ls_per_class", models.DPLeastSquaresClassifier, {"variant": "per_class", "reg": 5.0}),
    ("newton", models.DPNewtonClassifier, {"steps": 2, "reg": 5.0}),
    ("fc", models.DPFCClassifier, {"steps": 3, "reg": 5.0}),
    ("sgd_full", models.DPSGDClassifier, {"steps": 2}),
    (
        "sgd_poisson",
        models.DPSGDClassifier,
        {
            "steps": 3,
            "sample_rate": 0.3,
            "loss": "sigmoid",
            "accountant": "rdp",
            "optimizer": "adam",
        },
    ),
]


def _fit(cls, kw, X, y=None, **fit_kw):
    import warnings

    kw = dict(kw)
    device = kw.pop("device", "cpu")
    est = cls(
        epsilon=2.0,
        delta=1e-5,
        clip_norm=1.3,
        classes=np.arange(K),
        random_state=77,
        keep_stats=True,
        device=device,
        center=np.full(X.shape[1], 0.1),
        **kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random_state=int: PrivacyWarning, on purpose
        return est.fit(X, y, **fit_kw)


def _same_fit(a, b):
    assert a.coef_.tobytes() == b.coef_.tobytes()
    assert a.intercept_.tobytes() == b.intercept_.tobytes()
    assert a.privacy_ == b.privacy_
    assert a.stats_.keys() == b.stats_.keys()
    for key in a.stats_:
        assert _bits(tuple(np.atleast_1d(v) for v in np.atleast_1d(a.stats_[key]))) == _bits(
            tuple(np.atleast_1d(v) for v in np.atleast_1d(b.stats_[key]))
        ), key
    assert getattr(a, "diagnostics_", None) == getattr(b, "diagnostics_", None)


@pytest.mark.parametrize("name,cls,kw", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_through_dask_equals_local_fit(client, data, monkeypatch, name, cls, kw):
    """coef_, released statistics and ledger: the same bits from the local path (NumPy
    array, one shard; ShardedFeatures in this process) and through Dask (shards of
    unequal length, a dask array), for every estimator."""
    monkeypatch.setattr(_fitstats, "FIT_LEAF_ROWS", LEAF)  # many leaves, ragged last ones
    sf, x, y = data
    one = open_sharded(
        os.path.join(os.path.dirname(sf.shards[0].path), "part2.*.npy"), num_classes=K
    )
    a, b = sum(SHARDS[:2]), sum(SHARDS[:3])
    local_np = _fit(cls, kw, x[a:b], y[a:b])
    _same_fit(local_np, _fit(cls, kw, one, client=client))
    local_sf = _fit(cls, kw, sf, client=False)
    _same_fit(local_sf, _fit(cls, kw, sf))  # client=None: the default (module) client
    _same_fit(local_sf, _fit(cls, kw, da.from_array(x, chunks=(SHARDS, D)), y, client=client))
    assert local_sf.n_samples_ == len(y) and local_sf.coef_.shape == (K, D)
    assert np.isfinite(local_sf.coef_).all() and np.any(local_sf.coef_ != 0)


def test_cli_train_on_shards_with_workers_matches_this_process(tmp_path, data):
    """``dpfc train "shards/*.npy" --workers 2`` (a LocalCluster of its own) saves the same
    model as the same command in this process, and reports progress over leaves."""
    from typer.testing import CliRunner

    from dpfc_native.cli import app

    sf, _, _ = data
    pattern = os.path.join(os.path.dirname(sf.shards[0].path), "*.npy")
    runner = CliRunner()
    outs = []
    for extra in (["--workers", "2"], []):
        out = tmp_path / f"m{len(outs)}.npz"
        res = runner.invoke(
            app,
            [
                "train",
                pattern,
                "--num-classes",
                str(K),
                "--method",
                "ls",
                "--seed",
                "5",
                "--reg",
                "3",
                "-o",
                str(out),
            ]
            + extra,
        )
        assert res.exit_code == 0, res.output
        assert "leaves, done" in res.output and "4 shard(s)" in res.output
        outs.append(np.load(out))
    assert outs[0]["coef"].tobytes() == outs[1]["coef"].tobytes()
    assert np.isfinite(outs[0]["coef"]).all() and outs[0]["coef"].shape == (K, D)


def test_cli_workers_report_a_bad_shard_in_one_line(tmp_path):
    """A NaN in a shard read by a worker of ``dpfc train --workers``: one line naming the
    shard and the row, exit 2, and no worker log or traceback on stderr."""
    x = np.ones((50, 4), np.float32)
    x[17, 2] = np.nan
    np.save(tmp_path / "p.features.npy", x)
    np.save(tmp_path / "p.labels.npy", np.arange(50) % 3)
    cmd = [sys.executable, "-m", "dpfc_native", "train", str(tmp_path / "*.npy")]
    cmd += ["--num-classes", "3", "--workers", "2", "-o", str(tmp_path / "m.npz")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "Error" in line or "Traceback" in line]
    assert errors == [
        f"Error: {tmp_path / 'p.features.npy'}: the features have NaN or Inf at row 17"
    ], res.stderr
    assert not (tmp_path / "m.npz").exists()


def test_dask_arguments_checked(client, data):
    _, x, y = data
    xd = da.from_array(x, chunks=(300, D))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="leaves_per_task"):
            dd.clipped_gram(xd, 1.0, client=client, leaves_per_task=bad)
    with pytest.raises(TypeError, match="leaves_per_task"):
        dd.clipped_gram(xd, 1.0, client=client, leaves_per_task=2.0)
    sf = data[0]
    with pytest.raises(ValueError, match="task_ranges is empty"):
        dd.compute(R.Gram(1.0), sf, client=client, task_ranges=[])
    unknown = xd[xd[:, 0] > -100]  # boolean indexing: unknown chunk sizes
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        dd.clipped_gram(unknown, 1.0, client=client)
    with pytest.raises(ValueError, match=rf"labels must have shape \({len(x)},\)"):
        dd.clipped_stats(xd, 1.0, labels=y[:5], num_classes=K, client=client)
    with pytest.raises(ValueError, match="weights must have one row per example"):
        dd.clipped_weighted_grams(
            xd, 1.0, num_weights=K, weights=np.full((len(x) + 3, K), 0.1), client=client
        )
    with pytest.raises(TypeError, match="x must hold float"):
        dd.clipped_gram(da.from_array(np.ones((40, 3), np.int64), chunks=20), 1.0, client=client)


def test_parameters_arriving_unaligned_through_dask_give_the_same_bits(client, tmp_path):
    """Arrays shipped inside a task's arguments can sit at any byte offset of Dask's
    message frame (W arrived at offset 19, and NumPy then multiplied without BLAS, in
    another summation order): leaves align them, so a worker's leaf is the client's."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3001, 16)) * 0.3  # sizes where NumPy's loops and BLAS differ
    y = rng.integers(0, K, 3001)
    w = rng.standard_normal((K, 16))
    src = _p_shards(str(tmp_path), x, y, [3001], K)  # the task carries a manifest, no data
    lay = R.LeafLayout(src.shard_rows)
    for stat in (
        R.LinearGrad(0.3, w, -1.0, feature_clip=1.0),
        R.WeightedGrams(1.1, K, weight_fn=R.NewtonWeights(w, 0.5, 1.1)),
    ):
        ref = R.leaf_partial(stat, src, lay, 0).values(1)
        for _ in range(3):
            got = client.submit(R.leaf_partial, stat, src, lay, 0, pure=False).result().values(1)
            assert _bits(tuple(got.values())) == _bits(tuple(ref.values()))


def _unaligned(a, offset=3):
    buf = np.zeros(a.nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


def test_unaligned_parameters_give_the_same_bits():
    """The same statistic with W at byte offset 3 (as Dask may deliver it) and aligned:
    the leaves align their inputs, so no bit changes."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3001, 16)) + rng.integers(0, 4, (3001, 1)) * 0.5).astype(np.float32)
    x = x.astype(np.float64)
    y = rng.integers(0, 4, 3001)
    w = np.random.default_rng(12).standard_normal((4, 16))
    for stat in (
        R.LinearGrad(0.3, w, -1.0, feature_clip=1.0),
        R.WeightedGrams(1.1, 4, weight_fn=R.NewtonWeights(w, 0.5, 1.1)),
    ):
        ref = R.reduce(stat, x, y)
        moved = copy.copy(stat)
        if isinstance(stat, R.LinearGrad):
            object.__setattr__(moved, "w", _unaligned(w))
        else:
            object.__setattr__(moved, "weight_fn", copy.copy(stat.weight_fn))
            object.__setattr__(moved.weight_fn, "w", _unaligned(w))
        assert _bits(R.reduce(moved, x, y)) == _bits(ref)


@pytest.mark.gpu
def test_multi_gpu_workers_match_the_local_gpu_fit(data):
    """One dask_cuda worker per GPU (here: every visible GPU, at least one): leaves as CuPy
    arrays through the native kernels, partials merged exactly; the fit equals the same
    GPU-leaf fit in this process bit for bit."""
    pytest.importorskip("dask_cuda")
    sf, _, _ = data
    with dd.local_cuda_cluster(dashboard_address=None, silence_logs=logging.CRITICAL) as cluster:
        with distributed.Client(cluster) as gpu_client:
            for _name, cls, kw in FIT_CASES:
                kw = dict(kw, device="cuda")
                local = _fit(cls, kw, sf, client=False)
                remote = _fit(cls, kw, sf, client=gpu_client)
                _same_fit(local, remote)
                assert local.device_ == "cuda"


def _worker_memory_with_the_package():
    """Bytes held by a fresh worker once it has imported what a fit task imports."""

    def imported(dask_worker):
        import dpfc_native._fitstats  # noqa: F401  (what the fit's tasks import)
        import dpfc_native.models  # noqa: F401

        return dask_worker.monitor.get_process_memory()

    with _local_cluster(1) as cluster:
        with distributed.Client(cluster) as c:
            return max(c.run(imported).values())


def test_fit_completes_with_a_worker_memory_limit_below_the_dataset(tmp_path, monkeypatch):
    """A worker whose memory limit is its own footprint (after importing the package) plus
    100 MB fits on shards 1.3 times that limit: tasks read one leaf (here 8192 rows, a few
    MB) at a time and ship only partials. Pausing is off (a paused worker whose freed
    memory the allocator keeps would wait forever); the nanny still kills the worker at
    95% of the limit, which fails the fit (KilledWorker) instead of hanging."""
    import dask

    monkeypatch.setattr(_fitstats, "FIT_LEAF_ROWS", 8192)
    limit = _worker_memory_with_the_package() + 100 * 1000**2
    n_shards, d = 5, 64
    rows = int(1.3 * limit / (n_shards * d * 4)) + 1
    rng = np.random.default_rng(31)
    for i in range(n_shards):
        x = np.lib.format.open_memmap(
            str(tmp_path / f"s{i}.features.npy"),
            mode="w+",
            dtype=np.float32,
            shape=(rows + 7 * i, d),
        )
        for a in range(0, x.shape[0], 65536):
            b = min(x.shape[0], a + 65536)
            x[a:b] = rng.standard_normal((b - a, d), dtype=np.float32)
        x.flush()
        del x
        np.save(tmp_path / f"s{i}.labels.npy", rng.integers(0, K, rows + 7 * i))
    sf = open_sharded(str(tmp_path / "*.npy"), num_classes=K, checksum=False)
    data_bytes = sf.n_rows * d * 4
    assert data_bytes > limit * 1.25
    with (
        dask.config.set({"distributed.worker.memory.pause": False}),
        _local_cluster(1, memory_limit=limit) as cluster,
    ):
        with distributed.Client(cluster) as c:
            est = _fit(models.DPLeastSquaresClassifier, {"reg": 5.0}, sf, client=c)
            after = max(
                c.run(lambda dask_worker: dask_worker.monitor.get_process_memory()).values()
            )
    assert np.isfinite(est.coef_).all() and est.n_samples_ == sf.n_rows
    assert after < limit, after
    print(
        f"dataset {data_bytes / 1e6:.0f} MB, worker limit {limit / 1e6:.0f} MB, "
        f"worker memory after the fit {after / 1e6:.0f} MB"
    )


@pytest.mark.parametrize("name", ["ls_per_class", "newton"])
def test_class_blocks_give_the_same_fit(client, data, monkeypatch, name):
    """K x d x d statistics split into blocks of 2 classes (each its own reduction, locally
    and through Dask) give the unsplit fit's bits."""
    _, cls, kw = next(c for c in FIT_CASES if c[0] == name)
    monkeypatch.setattr(_fitstats, "FIT_LEAF_ROWS", LEAF)
    sf, _, _ = data
    whole = _fit(cls, kw, sf, client=False)
    assert _fitstats.class_block(K, D) is None
    monkeypatch.setattr(_fitstats, "CLASS_BLOCK_BYTES", 2 * 16 * D * D)
    assert _fitstats.class_block(K, D) == 2
    _same_fit(whole, _fit(cls, kw, sf, client=False))
    _same_fit(whole, _fit(cls, kw, sf, client=client))


def test_replay_estimators_through_dask_within_declared_sensitivity(client, tmp_path, monkeypatch):
    """The estimators' replay test through the Dask backend at small n: D in three shards,
    D' = D plus one adversarial example at a shard's start or end (the leaves after it
    shift); with the releases of D replayed on D' (same trajectory), every released
    statistic moves, before noise, by at most its declared sensitivity."""
    from _reference import REPLAY_FITS, ReleaseRecorder, expected_sensitivity

    monkeypatch.setattr(_fitstats, "FIT_LEAF_ROWS", 16)
    rng = np.random.default_rng(23)
    sizes, d, k, c = [20, 17, 13], 5, 4, 0.8
    x = rng.standard_normal((sum(sizes), d)) * np.exp(rng.uniform(-2, 2, (sum(sizes), 1)))
    y = rng.integers(0, k - 1, sum(sizes))
    y[: k - 1] = np.arange(k - 1)
    direction = np.linalg.eigh(x.T @ x)[1][:, 0]
    neighbours = [(direction * 1e30, k - 1, 0, 0), (direction * c, 0, sum(sizes), 2)]
    folders = {}
    for t, (row, label, pos, shard) in enumerate(neighbours):
        sizes2 = list(sizes)
        sizes2[shard] += 1
        x2, y2 = np.insert(x, pos, row, axis=0), np.insert(y, pos, label)
        folders[t] = _p_shards(str(tmp_path / f"n{t}"), x2, y2, sizes2, k)
    base_sf = _p_shards(str(tmp_path / "d"), x, y, sizes, k)
    checked = 0
    for name, cls, kw in REPLAY_FITS:
        common = dict(
            epsilon=2.0,
            delta=1e-5,
            clip_norm=c,
            normalize=False,
            classes=np.arange(k),
            random_state=1234,
            device="cpu",
            **kw,
        )
        base = ReleaseRecorder(monkeypatch)
        with pytest.warns(Warning):
            est = cls(**common).fit(base_sf, client=client)
        for t in folders:
            rec = ReleaseRecorder(monkeypatch, replay=base.records)
            with pytest.warns(Warning):
                cls(**common).fit(folders[t], client=client)
            for step, (r0, r1) in enumerate(zip(base.records, rec.records)):
                if name.startswith("sgd") and step > 0:
                    break  # the expected batch size q n differs between D and D'
                sens = expected_sensitivity(r0["name"], k, c, est)
                moved = float(np.linalg.norm((r1["stat"] - r0["stat"]).ravel()))
                assert moved <= sens, (name, t, r0["name"], moved, sens)
                checked += 1
    assert checked >= 2 * len(REPLAY_FITS)
