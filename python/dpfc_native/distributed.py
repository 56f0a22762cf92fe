"""The clipped statistics on a Dask cluster, by the exact reduction.

Needs the ``distributed`` extra (``pip install "dpfc-native[distributed]"``). Every
function here computes the same statistic as :mod:`dpfc_native.reduction` computes in one
process, with the same leaves, so the result has the same bits whatever the number of
workers, the task sizes, the order partials arrive in, retries, or a worker lost mid-run:

* one task per group of leaves (``leaves_per_task``; None: one task per shard), each
  opening its own shard slice on the worker (a :class:`~dpfc_native.shards.ShardedFeatures`
  pickles as its manifest, never as data) or receiving its own chunk of a dask array;
* each task returns one :class:`~dpfc_native.reduction.Partial` (integer limbs and the
  leaf ranges it covers); the client merges them as they arrive, exactly, and refuses
  duplicates and gaps (:class:`~dpfc_native.reduction.CoverageError`);
* tasks are pure and keyed by what they compute, so a task lost with a worker is
  recomputed and counted once.

Noise is never added here: the functions return unnoised statistics to the client, which
releases them with :mod:`dpfc_native.mechanisms` (one NoiseSource, on the client; a
NoiseSource refuses to be pickled, so it cannot reach a worker by accident). Workers see
the data and the unnoised partials, so the cluster must be trusted like the machine that
holds the data: TLS between scheduler, workers and client, no published dashboard, and
spill directories on encrypted disks (workers spill partials to disk under memory
pressure). Under Poisson sampling the workers also see the sampling key (never the noise
key).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import uuid
from typing import Callable, Optional, Sequence

import numpy as np

from . import _validation
from . import reduction as _red
from ._optional import require
from .reduction import (
    LEAF_ROWS,
    ClassGrams,
    ClassSums,
    Gram,
    LeafLayout,
    LinearGrad,
    Partial,
    PoissonSampling,
    Stats,
    WeightedGrams,
)

__all__ = [
    "compute",
    "clipped_gram",
    "clipped_stats",
    "clipped_class_sums",
    "clipped_class_grams",
    "clipped_weighted_grams",
    "clipped_linear_grad",
    "DEFAULT_LEAVES_PER_TASK",
    "local_cuda_cluster",
]

#: Leaves per task by default: 8 leaves of 4096 rows (32768 rows) keep the per-task
#: overhead small next to the compute; a task holds one leaf's rows at a time.
DEFAULT_LEAVES_PER_TASK = 8
# Statistics whose pickle is larger than this (a LinearGrad's W) are scattered to every
# worker once instead of travelling inside each task.
_SCATTER_BYTES = 256 * 1024


def _get_client(client):
    default_client = require("distributed", "the Dask backend", "distributed").default_client
    return default_client() if client is None else client


class _DaskChunkSource:
    """A worker-side view of one dask chunk as shard ``index`` of a source."""

    def __init__(self, index: int, x, y, shard_rows: Sequence[int]):
        self.index, self.x, self.y = index, x, y
        self.shard_rows = tuple(shard_rows)
        self.n_features = int(x.shape[1])

    def read(self, i: int, start: int, stop: int):
        if i != self.index:
            raise IndexError(f"this task holds chunk {self.index}, not {i}")
        return self.x[start:stop], self.y[start:stop]

    def take(self, i: int, rows):
        if i != self.index:
            raise IndexError(f"this task holds chunk {self.index}, not {i}")
        return self.x[rows], self.y[rows]


def _range_task(stat, source, layout, first, stop, sampling, weights):
    return _red.range_partial(stat, source, layout, first, stop, sampling=sampling, weights=weights)


def _chunk_task(
    stat, index, x, y, shard_rows, layout, first, stop, sampling, weights, transform=None
):
    x = np.asarray(x)
    y = np.asarray(y)
    source = _DaskChunkSource(index, x, y, shard_rows)
    if transform is not None:
        source = _red.TransformedSource(source, transform)
    return _red.range_partial(stat, source, layout, first, stop, sampling=sampling, weights=weights)


class _TaskWeights:
    """Weights of the rows of one task (global rows [g0, g1)), sliced on the client."""

    def __init__(self, weights, layout: LeafLayout, first: int, stop: int):
        g0 = int(layout.global_start[first])
        g1 = int(layout.global_start[stop - 1] + layout.stop[stop - 1] - layout.start[stop - 1])
        self.rows = np.ascontiguousarray(np.asarray(weights[g0:g1], dtype=np.float64))
        self.g0 = g0
        self.layout = layout

    def leaf_weights(self, leaf: int):
        a = int(self.layout.global_start[leaf]) - self.g0
        m = int(self.layout.stop[leaf] - self.layout.start[leaf])
        return self.rows[a : a + m]


def _source_token(source) -> str:
    if hasattr(source, "manifest"):
        text = repr(source.manifest()) + repr(getattr(source, "_opts", ""))
    else:
        text = repr(source)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dask_inputs(x, labels):
    da = require("dask.array", "the Dask backend", "distributed")

    if not isinstance(x, da.Array):
        raise TypeError("x must be a ShardedFeatures or a dask array")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D, got shape {x.shape}")
    if any(math.isnan(c) for c in x.chunks[0]) or any(math.isnan(c) for c in x.chunks[1]):
        raise ValueError(
            "x has unknown chunk sizes (e.g. after boolean indexing or from a dataframe): "
            "call x.compute_chunk_sizes() first"
        )
    if labels is None:
        labels = da.zeros(x.shape[0], dtype=np.int64, chunks=(x.chunks[0],))
    elif not isinstance(labels, da.Array):
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
        labels = da.from_array(labels, chunks=(x.chunks[0],))
    if any(math.isnan(c) for c in labels.chunks[0]):
        raise ValueError("labels have unknown chunk sizes: call labels.compute_chunk_sizes() first")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
    if len(x.chunks[1]) != 1:
        x = x.rechunk({1: -1})
    if labels.chunks[0] != x.chunks[0]:
        labels = labels.rechunk((x.chunks[0],))
    return x, labels


def compute(
    stat,
    x,
    labels=None,
    *,
    client=None,
    leaf_rows: int = LEAF_ROWS,
    leaves_per_task: Optional[int] = DEFAULT_LEAVES_PER_TASK,
    sampling: Optional[PoissonSampling] = None,
    weights=None,
    progress: Optional[Callable[[int, int], None]] = None,
    workers=None,
    task_ranges: Optional[Sequence[tuple]] = None,
    return_partial: bool = False,
    transform: Optional[Callable] = None,
):
    """A statistic of :mod:`dpfc_native.reduction` over a cluster.

    Parameters
    ----------
    stat : Gram, Stats, ClassSums, ClassGrams, WeightedGrams or LinearGrad
    x : ShardedFeatures, or a dask array (n, d) whose row chunks act as shards
    labels : dask or NumPy array (n,) with a dask ``x`` (ignored for ShardedFeatures)
    client : distributed.Client or None
        None: the current default client.
    leaf_rows : int
        Leaf size; results equal :func:`dpfc_native.reduction.reduce` with the same
        ``leaf_rows`` (and ``shard_rows=x.chunks[0]`` for dask arrays) bit for bit.
    leaves_per_task : int or None
        Leaves per task (tasks never cross a shard); None: one task per shard.
    sampling : PoissonSampling or None
        Only the rows Poisson-sampled at ``sampling.step`` (drawn on the workers from the
        sampling key; row-addressable shards read only those rows).
    weights : array (n, K) for WeightedGrams without a ``weight_fn`` (sliced per task
        on the client).
    progress : callable (leaves_done, n_leaves) or None
        Called on the client as partials arrive.
    workers : list of worker addresses or None
        Restrict the tasks to these workers.
    task_ranges : sequence of (first, stop) leaf ranges, or None
        ShardedFeatures only: the tasks' leaf ranges, overriding ``leaves_per_task``
        (custom scheduling). Ranges that overlap or leave a leaf out raise
        :class:`~dpfc_native.reduction.CoverageError` when the partials are merged.
    return_partial : bool
        Also return the merged :class:`~dpfc_native.reduction.Partial`, whose ``ranges``
        record the leaves covered (each exactly once).
    transform : callable or None
        A picklable per-row map applied on the workers as leaves are read (see
        :class:`~dpfc_native.reduction.TransformedSource`); the local equivalent is
        ``reduce(stat, TransformedSource(source, transform))``.

    Returns
    -------
    As :func:`dpfc_native.reduction.reduce`.
    """
    client = _get_client(client)  # first: without the extra, its error names the extra
    from distributed import as_completed

    if isinstance(x, _red.ArraySource):
        raise TypeError(
            "an in-memory ArraySource would travel inside every task: pass a "
            "dask array (da.from_array / da.from_zarr) or a ShardedFeatures"
        )
    if hasattr(x, "shard_rows") and hasattr(x, "read"):
        source, chunked = x, False
        if transform is not None:
            source = _red.TransformedSource(source, transform)
        shard_rows = tuple(source.shard_rows)
        token = _source_token(source)
    else:
        x, labels = _dask_inputs(x, labels)
        if transform is None:  # a transform widens rows (e.g. integers) exactly itself
            _validation.feature_float(x.dtype, "x")
        shard_rows = tuple(int(c) for c in x.chunks[0])
        chunked = True
        token = f"{x.name}-{labels.name}-{getattr(transform, 'fingerprint', repr(transform))}"
    layout = LeafLayout(shard_rows, leaf_rows)
    if leaves_per_task is not None:
        leaves_per_task = _validation.integer(leaves_per_task, "leaves_per_task", 1)
    if task_ranges is not None and len(task_ranges) == 0:
        raise ValueError("task_ranges is empty: give the tasks' leaf ranges, or None")
    if stat.needs_weights and weights is None:
        raise ValueError("this statistic needs weights (n, K) or a weight_fn")
    if weights is not None:
        _red._check_weight_rows(weights, layout.n_rows)  # noqa: SLF001 - same module family
    d = int(x.shape[1]) if chunked else int(source.n_features)
    key = _red._partial_key(stat, layout, sampling, d)  # noqa: SLF001 - same module family
    # Task keys name what a task computes (for the dashboard) plus a fresh nonce: a call
    # never reuses the keys (or the scattered statistic's key) of an earlier call, which
    # the scheduler may still be forgetting. Retries of a task keep its key; the bits do
    # not depend on keys.
    tag = hashlib.sha256(f"{key}|{token}".encode()).hexdigest()[:12] + "-" + uuid.uuid4().hex[:12]
    blob = pickle.dumps(stat)
    stat_arg = (
        client.scatter(stat, broadcast=True, hash=False) if len(blob) > _SCATTER_BYTES else stat
    )

    futures = []
    if chunked:
        import dask

        if task_ranges is not None:
            raise ValueError("task_ranges applies to ShardedFeatures sources only")
        xd = x.to_delayed().reshape(-1)
        yd = labels.to_delayed().reshape(-1)
        parts = []
        for first, stop in layout.tasks(leaves_per_task):
            s = int(layout.shard[first])
            w = None if weights is None else _TaskWeights(weights, layout, first, stop)
            parts.append(
                dask.delayed(_chunk_task, name=f"dpfc-partial-{tag}-{first}-{stop}")(
                    stat_arg,
                    s,
                    xd[s],
                    yd[s],
                    shard_rows,
                    layout,
                    first,
                    stop,
                    sampling,
                    w,
                    transform,
                )
            )
        futures = client.compute(parts, workers=workers)
    else:
        ranges = (
            layout.tasks(leaves_per_task)
            if task_ranges is None
            else [(int(a), int(b)) for a, b in task_ranges]
        )
        m = len(ranges)
        # One graph update for all the tasks (client.map), not one message per task: the
        # scheduler sees the whole task group at once.
        futures = client.map(
            _range_task,
            [stat_arg] * m,
            [source] * m,
            [layout] * m,
            [a for a, _ in ranges],
            [b for _, b in ranges],
            [sampling] * m,
            [None if weights is None else _TaskWeights(weights, layout, a, b) for a, b in ranges],
            key=[f"dpfc-partial-{tag}-{a}-{b}-{i}" for i, (a, b) in enumerate(ranges)],
            workers=workers,
        )
    total: Optional[Partial] = None
    done = 0
    try:
        # Results are fetched one at a time from this thread (fut.result()), not by
        # as_completed(with_results=True): that gathers finished futures concurrently on
        # the client's event loop, and a partial finishing within milliseconds of another
        # was seen never to be delivered (the scheduler holding it in memory, every
        # worker idle, the client waiting).
        for fut in as_completed(futures):
            part = fut.result()
            total = part if total is None else total.merge(part)
            done += part.n_leaves_covered
            if progress is not None:
                progress(done, layout.n_leaves)
            fut.release()  # a partial can be large (limbs of K x d x d): free it now
    finally:
        for fut in futures:
            fut.release()
    result = stat.finish(total.values(layout.n_leaves))
    return (result, total) if return_partial else result


def _merge_blocks(results):
    return np.concatenate(results, axis=0)


def _blocks(k: int, class_block: Optional[int]):
    if class_block is None:
        return [None]
    if int(class_block) < 1:
        raise ValueError(f"class_block must be >= 1, got {class_block!r}")
    return [(a, min(k, a + int(class_block))) for a in range(0, k, int(class_block))]


def _num_classes(x, num_classes):
    if num_classes is not None:
        return int(num_classes)
    if hasattr(x, "num_classes"):
        return int(x.num_classes)
    raise ValueError("num_classes is required for dask arrays")


def clipped_gram(x, clip_norm: float, *, client=None, **options):
    """``G = sum_i xbar_i xbar_i^T`` over a cluster (see :func:`compute` for options)."""
    return compute(Gram(clip_norm), x, options.pop("labels", None), client=client, **options)


def clipped_stats(
    x, clip_norm: float, *, labels=None, num_classes: Optional[int] = None, client=None, **options
):
    """``(G, B, counts)`` as :func:`dpfc_native.ops.clipped_stats`, over a cluster."""
    k = _num_classes(x, num_classes)
    return compute(Stats(clip_norm, k), x, labels, client=client, **options)


def clipped_class_sums(
    x, clip_norm: float, *, labels=None, num_classes: Optional[int] = None, client=None, **options
):
    """``B`` as :func:`dpfc_native.ops.clipped_class_sums`, over a cluster."""
    k = _num_classes(x, num_classes)
    return compute(ClassSums(clip_norm, k), x, labels, client=client, **options)


def clipped_class_grams(
    x,
    clip_norm: float,
    *,
    labels=None,
    num_classes: Optional[int] = None,
    class_block: Optional[int] = None,
    client=None,
    **options,
):
    """Per-class grams ``(K, d, d)`` over a cluster; ``class_block`` classes per
    reduction (each block its own tasks and partials: K x d x d never in one partial)."""
    k = _num_classes(x, num_classes)
    out = [
        compute(ClassGrams(clip_norm, k, classes=blk), x, labels, client=client, **options)
        for blk in _blocks(k, class_block)
    ]
    return _merge_blocks(out)


def clipped_weighted_grams(
    x,
    clip_norm: float,
    *,
    num_weights: int,
    weights=None,
    weight_fn: Optional[Callable] = None,
    weight_fn_id: str = "",
    weight_bound: float = 0.25,
    labels=None,
    class_block: Optional[int] = None,
    client=None,
    **options,
):
    """Weighted grams ``H_l = sum_i w_il xbar_i xbar_i^T`` over a cluster.

    Weights come from ``weights`` (n, K), sliced per task, or from ``weight_fn(x_rows,
    labels)`` on the workers (e.g. Newton's ``p (1 - p)``); ``weight_bound`` bounds
    every weight (it sets the grid; a larger weight raises). ``weight_fn_id`` names the
    function's parameters (e.g. a hash of the current weights): partials of different
    ids never merge.
    """
    out = [
        compute(
            WeightedGrams(clip_norm, int(num_weights), weight_bound, weight_fn, blk, weight_fn_id),
            x,
            labels,
            client=client,
            weights=weights,
            **options,
        )
        for blk in _blocks(int(num_weights), class_block)
    ]
    return _merge_blocks(out)


def clipped_linear_grad(
    x,
    w,
    bias,
    clip_norm: float,
    *,
    labels=None,
    loss: str = "sigmoid",
    feature_clip: Optional[float] = None,
    client=None,
    **options,
):
    """``(grad, n_clipped)`` as :func:`dpfc_native.ops.clipped_linear_grad`, over a
    cluster: one pass, ``w`` sent to the workers once (scattered when large)."""
    stat = LinearGrad(clip_norm, np.asarray(w), bias, loss=loss, feature_clip=feature_clip)
    return compute(stat, x, labels, client=client, **options)


def local_cuda_cluster(**kwargs):
    """A ``dask_cuda.LocalCUDACluster``: one worker process per visible GPU (``kwargs`` go
    to it, e.g. ``CUDA_VISIBLE_DEVICES="0,1"``).

    Fit an estimator with ``device="cuda"`` on a ShardedFeatures through a client of this
    cluster: each worker reads its leaves, preprocesses them on the host and computes the
    leaf statistic with the native CUDA kernels on its GPU (CuPy arrays); partials come
    back as integer limbs and merge exactly, so any number of GPUs gives the same bits as
    one (GPU leaves round differently from CPU leaves: compare GPU with GPU).

    Raises
    ------
    ImportError
        Without dask-cuda (``pip install "dpfc-native[multigpu]"``).
    """
    LocalCUDACluster = require("dask_cuda", "multi-GPU workers", "multigpu").LocalCUDACluster
    kwargs.setdefault("threads_per_worker", 1)
    return LocalCUDACluster(**kwargs)
