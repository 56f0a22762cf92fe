"""Where an estimator's fit gets its statistics: the exact leaf reduction (in this
process or on a Dask cluster) or, on the GPU, the native ops over the whole device array.

The estimators ask one of these objects for every unnoised statistic (gram, class sums
and counts, per-class grams, Newton's weighted grams, clipped gradients) and add the
noise themselves, on the client, from the fit's NoiseSource. Both objects answer the
same questions:

* :class:`ReducedStatistics`: rows are read a leaf at a time from a source (a NumPy
  array or memory map, a :class:`~dpfc_native.shards.ShardedFeatures`, or a dask array),
  centred, normalised and clipped by :class:`RowTransform` as they are read, and summed by
  :mod:`dpfc_native.reduction` (``client=None``) or :mod:`dpfc_native.distributed` (a
  Dask client): the same leaves, hence the same bits, either way.
* :class:`DeviceStatistics`: the preprocessed rows already on the GPU, through
  :mod:`dpfc_native.ops`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
from typing import Any, Callable, Optional

import numpy as np

from . import _cpu_stats, ops
from . import reduction as _red

__all__ = ["RowTransform", "ReducedStatistics", "DeviceStatistics", "scaled_input", "class_block"]

#: Largest K x d x d partial (bytes of its two int64 limbs) held in one reduction: above
#: it, per-class statistics are split into blocks of classes, one reduction each.
CLASS_BLOCK_BYTES = 256 * 1024 * 1024


def class_block(k: int, d: int) -> Optional[int]:
    """Classes per block of a K x d x d statistic (None: all in one block)."""
    per_class = 16 * d * d  # hi and lo limbs
    if k * per_class <= CLASS_BLOCK_BYTES:
        return None
    return max(1, CLASS_BLOCK_BYTES // per_class)


#: Leaf size of the estimators' reductions (local and distributed alike).
FIT_LEAF_ROWS = _red.LEAF_ROWS

_LEAF_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("dpfc_leaf_progress", default=None)


@contextlib.contextmanager
def leaf_progress(callback: Optional[Callable[[int, int, str], None]]):
    """Within the block, fits that reduce over leaves call ``callback(leaves_done,
    n_leaves, what)`` as partials arrive (the CLI's progress over leaves)."""
    token = _LEAF_PROGRESS.set(callback)
    try:
        yield
    finally:
        _LEAF_PROGRESS.reset(token)


def _blocks(k: int, block: Optional[int]):
    if block is None:
        return [None]
    return [(a, min(k, a + block)) for a in range(0, k, block)]


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p, dtype=np.float64).tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class RowTransform:
    """The estimators' per-example preprocessing (public centre, optional normalisation,
    clipping to ``clip``) as a picklable map over a block of rows: float64 out, every row
    of norm below ``clip``. A pure function of each row, so it runs on any worker."""

    clip: float
    center: Optional[np.ndarray] = None
    #: The rows it returns are finite and clipped (X itself was validated once per fit):
    #: the leaf statistics skip the public ops' scans.
    rows_checked = True
    normalize: bool = False
    #: "cuda": the rows leave as CuPy arrays, so the leaf statistic runs on the GPU of
    #: the process reading the leaf (one dask_cuda worker per GPU).
    device: str = "cpu"

    @property
    def fingerprint(self) -> str:
        c = None if self.center is None else np.asarray(self.center, np.float64)
        return "rows:" + _fingerprint(float(self.clip), c, bool(self.normalize), self.device)

    def __call__(self, x, first_row=0):
        """The preprocessed rows; ``first_row`` (the index of x's first row in its shard,
        or the indices of all its rows) numbers the row an error names."""
        from .models import _preprocess_rows_cpu

        x = np.asarray(x)
        if x.shape[0] == 0:
            return np.array(x, dtype=np.float64)
        # Preprocessed on the host in one native pass into a float64 block: inside the
        # reduction's leaf loop this thread's reused block (the leaf statistic reads it
        # before the next leaf is transformed), else a fresh array.
        out = _preprocess_rows_cpu(
            x,
            float(self.clip),
            self.center,
            bool(self.normalize),
            first_row=first_row,
            out=_cpu_stats.leaf_buffer("transformed_rows", x.shape),
        )
        if self.device == "cuda":
            return ops._cupy().asarray(out)  # noqa: SLF001 - the package's CuPy accessor
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class NewtonRowWeights:
    """Newton's weights ``min(s (1 - s), 1/4)``, ``s = sigmoid(W x + b)``, of preprocessed
    rows: a picklable ``weight_fn`` evaluated where the leaf is read."""

    w: np.ndarray
    bias: Any

    @property
    def fingerprint(self) -> str:
        return "newton:" + _fingerprint(np.asarray(self.w), np.asarray(self.bias, np.float64))

    def __call__(self, x, y):
        xp = ops.array_module(x)
        w = _red._on_device_of(x, _red._aligned(np.asarray(self.w, np.float64)))
        z = xp.asarray(x, xp.float64) @ w.T + self.bias
        s = 0.5 + 0.5 * xp.tanh(0.5 * z)
        return xp.minimum(s * (1.0 - s), 0.25)


@dataclasses.dataclass(frozen=True, eq=False)
class CountedLinearGrad(_red.LinearGrad):
    """:class:`~dpfc_native.reduction.LinearGrad` that also counts the rows summed (the
    batch size under Poisson sampling)."""

    def key(self):
        return "counted_" + super().key()

    def int_shapes(self, d):
        return {"n_clipped": (), "rows": ()}

    def leaf(self, x, y, weights):
        out = super().leaf(x, y, weights)
        out["rows"] = np.asarray(int(x.shape[0]), np.int64)
        return out

    def finish(self, v):
        return v["grad"], int(v["n_clipped"]), int(v["rows"])


def scaled_input(X) -> bool:
    """Whether X is read through a source (sharded files or a dask array) rather than
    as one in-memory array."""
    if hasattr(X, "shard_rows") and hasattr(X, "read") and hasattr(X, "n_features"):
        return True
    return type(X).__module__.startswith("dask.") and hasattr(X, "chunks")


def resolve_client(client):
    """``client`` itself; None: the current default Dask client, if there is one;
    False: none (this process)."""
    if client is False:
        return None
    if client is not None:
        return client
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:  # no client has been started in this process
        return None


class _DaskArraySource:
    """A dask array read without a cluster: chunk i of its rows is shard i."""

    def __init__(self, x, labels):
        self.x, self.labels = x, np.asarray(labels)
        self.shard_rows = tuple(int(c) for c in x.chunks[0])
        self.n_features = int(x.shape[1])
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)

    def read(self, i, start, stop):
        o = int(self.offsets[i])
        return np.asarray(self.x[o + start : o + stop].compute()), self.labels[o + start : o + stop]


class ReducedStatistics:
    """The statistics of one fit by the exact leaf reduction.

    Parameters
    ----------
    x : NumPy array or memory map (n, d), ShardedFeatures, or dask array
    labels : int array (n,) of class indices (ignored for ShardedFeatures)
    transform : RowTransform
    client : distributed.Client or None
        None: in this process.
    leaf_rows : int
    leaves_per_task : int or None
        Cluster only: leaves per task.
    progress : callable (leaves_done, n_leaves, what) or None
    """

    def __init__(
        self,
        x,
        labels,
        transform: RowTransform,
        *,
        client=None,
        leaf_rows: Optional[int] = None,
        leaves_per_task=None,
        progress=None,
    ):
        self.transform, self.client = transform, client
        self.leaf_rows = int(FIT_LEAF_ROWS if leaf_rows is None else leaf_rows)
        self.leaves_per_task = leaves_per_task
        self.progress_cb = _LEAF_PROGRESS.get() if progress is None else progress
        self.is_dask = not (hasattr(x, "shard_rows") and hasattr(x, "read")) and type(
            x
        ).__module__.startswith("dask.")
        if hasattr(x, "shard_rows") and hasattr(x, "read"):
            self.x, self.labels = x, None
        elif self.is_dask:
            self.x, self.labels = x, labels
        else:
            self.x, self.labels = _red.ArraySource(x, labels), None
        self.d = int(x.shape[1]) if hasattr(x, "shape") else int(x.n_features)

    def _run(self, stat, what: str, sampling=None):
        if self.client is not None:
            from . import distributed

            options = (
                {} if self.leaves_per_task is None else {"leaves_per_task": self.leaves_per_task}
            )
            cb = (
                None
                if self.progress_cb is None
                else (lambda done, total: self.progress_cb(done, total, what))
            )
            return distributed.compute(
                stat,
                self.x,
                self.labels,
                client=self.client,
                leaf_rows=self.leaf_rows,
                sampling=sampling,
                transform=self.transform,
                progress=cb,
                **options,
            )
        source = self.x
        if self.is_dask:
            source = _DaskArraySource(self.x, self.labels)
        # GPU leaves: one thread (the device serialises them anyway).
        threads = 1 if getattr(self.transform, "device", "cpu") == "cuda" else None
        out = _red.reduce(
            stat,
            _red.TransformedSource(source, self.transform),
            leaf_rows=self.leaf_rows,
            sampling=sampling,
            threads=threads,
        )
        if self.progress_cb is not None:
            n_leaves = _red.LeafLayout(source.shard_rows, self.leaf_rows).n_leaves
            self.progress_cb(n_leaves, n_leaves, what)
        return out

    def gram(self, C):
        return self._run(_red.Gram(C), "gram")

    def stats(self, k, C):
        return self._run(_red.Stats(C, k), "gram and class sums")

    def class_grams(self, k, C):
        blocks = _blocks(k, class_block(k, self.d))
        out = [self._run(_red.ClassGrams(C, k, classes=b), "class grams") for b in blocks]
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def newton_hessians(self, W, bias, C):
        W = np.asarray(W, np.float64)
        k = W.shape[0]
        fn = NewtonRowWeights(W.copy(), float(bias))
        blocks = _blocks(k, class_block(k, self.d))
        out = [self._run(_red.WeightedGrams(C, k, 0.25, fn, b), "Newton Hessians") for b in blocks]
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def linear_grad(self, W, bias, clip, *, loss="sigmoid", feature_clip=None, sampling=None):
        """``(grad, n_clipped, rows summed)``."""
        stat = CountedLinearGrad(
            clip, np.asarray(W, np.float64), bias, loss=loss, feature_clip=feature_clip
        )
        return self._run(stat, "gradient", sampling=sampling)


class DeviceStatistics:
    """The statistics of one fit from preprocessed rows on the GPU (validated once per fit),
    through the ops' unchecked entries."""

    def __init__(self, xc, y, xp):
        self.X, self.y, self.xp = xc, y, xp

    def gram(self, C):
        return ops._unchecked.clipped_gram(self.X, C)

    def stats(self, k, C):
        return ops._unchecked.clipped_stats(self.X, self.y, k, C)

    def class_grams(self, k, C):
        return ops._unchecked.clipped_class_grams(self.X, self.y, k, C)

    def newton_hessians(self, W, bias, C):
        from ._special import sigmoid
        from .models import _scores

        xp = self.xp
        s = sigmoid(_scores(xp, self.X, W, bias))
        weights = xp.minimum(s * (1.0 - s), 0.25)
        del s
        return ops._unchecked.clipped_weighted_grams(self.X, weights, C)

    def linear_grad(self, W, bias, clip, *, loss="sigmoid", feature_clip=None, sampling=None):
        X, y = self.X, self.y
        if sampling is not None:
            # The same keyed mask as the reduction draws (row i's fate depends only on
            # the key, the step and i), computed on the host.
            idx = np.flatnonzero(sampling.mask(0, X.shape[0]))
            if idx.size == 0:
                return self.xp.zeros(tuple(np.shape(W)), dtype=self.xp.float64), 0, 0
            X, y = X[self.xp.asarray(idx)], y[self.xp.asarray(idx)]
        g, n_clip = ops._unchecked.clipped_linear_grad(
            X, y, W, bias, clip, loss=loss, feature_clip=feature_clip
        )
        return g, int(n_clip), int(X.shape[0])


def scaled_fit_data(X, y, classes_param):
    """``(X, labels, classes, n, d)`` for a ShardedFeatures or a dask array.

    Sharded labels are class indices in ``[0, num_classes)``: ``classes_`` is the public
    ``classes`` given (at least ``num_classes`` of them), else ``arange(num_classes)``.
    A dask array's labels (``y``, NumPy or dask) are encoded on the client like an
    in-memory fit's.
    """
    from .models import _encode_labels

    if hasattr(X, "shard_rows") and hasattr(X, "read"):
        if y is not None:
            raise ValueError("a ShardedFeatures carries its labels: pass y=None")
        n, d = int(sum(X.shard_rows)), int(X.n_features)
        k_seen = int(X.num_classes)
        if classes_param is None:
            classes = np.arange(k_seen)
        else:
            classes = np.asarray(classes_param)
            if (
                classes.ndim != 1
                or classes.size < max(k_seen, 2)
                or np.unique(classes).size != classes.size
            ):
                raise ValueError(
                    f"classes must list at least the {max(k_seen, 2)} distinct labels "
                    f"the shards index (their labels are indices into classes)"
                )
        if classes.size < 2:
            raise ValueError("need at least 2 classes")
        return X, None, classes, n, d
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    if X.dtype.kind != "f" and X.dtype.kind not in "iu":
        raise TypeError(f"X must have a real numeric dtype, got {X.dtype}")
    n, d = int(X.shape[0]), int(X.shape[1])
    if y is None:
        raise ValueError("y is required with a dask array X")
    if hasattr(y, "compute") and not isinstance(y, np.ndarray):
        y = y.compute()
    classes, y_idx = _encode_labels(np.asarray(y), n, classes_param)
    if len(X.chunks[1]) != 1:
        X = X.rechunk({1: -1})
    return X, y_idx, classes, n, d


def sampling_for(rate: float, random_state) -> _red.PoissonSampling:
    """DP-SGD's Poisson sampling key: fresh OS entropy, or derived from the user seed
    (apart from the noise key's derivation, so the two are unrelated)."""
    return _red.PoissonSampling.new(rate, None if random_state is None else int(random_state))
