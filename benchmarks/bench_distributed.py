"""Benchmark of the Dask backend (dpfc_native.distributed) on generated shards.

    python benchmarks/bench_distributed.py                   # 262144 x 512 float32, 8 shards
    python benchmarks/bench_distributed.py --quick           # small smoke run
    python benchmarks/bench_distributed.py --rows 8388608 --dim 768 --workers 1,2,4,8,16 \\
        --out benchmarks/results/bench_distributed_16core.json   # a larger machine

Rows of the table (each configuration repeated --repeats times; min and median reported,
the machine is shared and noisy):
  single-process   ops.clipped_gram on the whole array in memory (1 BLAS thread): the
                   plain path the Dask overhead is measured against.
  single-process   ops.clipped_gram shard by shard on the same memory-mapped files the
  from the files   workers read (float64 sum of the shard results; 1 BLAS thread): the
                   same path paying the same reads (page-cache pages mapped anew).
  local exact      dpfc_native.reduction.reduce(Gram) over the shards in this process (the
                   same leaves and exact merge as Dask, no cluster; leaves side by side on
                   DPFC_REDUCE_THREADS threads, default the CPU count, one BLAS thread each).
  ops leaf_rows    ops.clipped_gram(x, C, leaf_rows=--leaf-rows) on the array in memory: the
                   same reduction through the ops API (same bits as the local exact row when
                   the shards are multiples of the leaf, asserted).
  ops all threads  ops.clipped_gram(x, C), one pass, on every BLAS thread: the op's
                   default, against which the leaf_rows row is the user's choice.
  dask Nw          distributed.compute(Gram) on a LocalCluster of N single-threaded worker
                   processes; rows/s per worker; the 1-worker time / single-process time is
                   the Dask overhead (target <= 1.1x). Each Dask run is timed right after
                   a run of each single-process baseline (interleaved: the machine's load
                   drifts), and "x single" / "x files" / "x local 1t" are the ratios of
                   those minima; "local 1t" is reduction.reduce on one thread, the same
                   leaves and merge as one worker. Dask's task stream gives the time each
                   worker spent in its tasks; the rest of the wall time is the cluster's.
  dpfc pass Nw     one clipped-gradient pass (DP-FC / DP-SGD step, K classes) through Dask.
  fit dpfc local   DPFCClassifier(steps=--fit-steps).fit on the shards in this process
                   (client=False); "fit dpfc Nw": the same fit through Dask (same coef_ bits,
                   asserted), noise on the client.
Also: bytes a partial carries (arrays, and pickled), the exact merge's cost (grid conversion
and integer merge per leaf) against the leaf statistic's compute (target <= 5%), and the
SHA-256 manifest's hashing rate when the shards are opened.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from _common import git_commit, results_path, utc_now, write_json


def _timeit(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "runs": times}, out


def _write_shards(folder, rows, dim, shards, k, seed):
    rng = np.random.default_rng(seed)
    per = [rows // shards + (1 if i < rows % shards else 0) for i in range(shards)]
    for i, m in enumerate(per):
        path = os.path.join(folder, f"part-{i:04d}.features.npy")
        x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(m, dim))
        for a in range(0, m, 65536):
            b = min(m, a + 65536)
            x[a:b] = rng.standard_normal((b - a, dim), dtype=np.float32)
        x.flush()
        del x
        np.save(os.path.join(folder, f"part-{i:04d}.labels.npy"), rng.integers(0, k, m))
    return per


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--leaf-rows", type=int, default=4096)
    ap.add_argument("--leaves-per-task", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fit-steps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.repeats = 20000, 64, 2

    import warnings

    from distributed import Client, LocalCluster, get_task_stream
    from threadpoolctl import threadpool_limits

    from dpfc_native import _cpu_stats, models, ops
    from dpfc_native import distributed as dd
    from dpfc_native import reduction as R
    from dpfc_native.shards import open_sharded

    workers = [int(w) for w in args.workers.split(",") if w]
    n, d, k, c = args.rows, args.dim, args.classes, 1.0
    result = {
        "benchmark": "bench_distributed",
        "date": utc_now(),
        "commit": git_commit(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
        "config": {
            "rows": n,
            "dim": d,
            "shards": args.shards,
            "classes": k,
            "dtype": "float32",
            "leaf_rows": args.leaf_rows,
            "leaves_per_task": args.leaves_per_task,
            "repeats": args.repeats,
            "workers": workers,
        },
        "rows": [],
    }
    table = result["rows"]

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        _write_shards(folder, n, d, args.shards, k, seed=7)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        t0 = time.perf_counter()
        sf = open_sharded(os.path.join(folder, "*.npy"), num_classes=k)
        t_open = time.perf_counter() - t0
        result["open_sharded"] = {"seconds": t_open, "bytes": size, "MB_per_s": size / t_open / 1e6}

        # Kept for the interleaved baselines of the Dask runs below.
        x_mem = np.concatenate([sf.read(i)[0] for i in range(len(sf.shards))])
        with threadpool_limits(1):
            tm, _ = _timeit(lambda: ops.clipped_gram(x_mem, c), args.repeats)
            table.append(
                {
                    "config": "single-process ops.clipped_gram",
                    "workers": 1,
                    **tm,
                    "rows_per_s_per_worker": n / tm["min_s"],
                }
            )
            base = tm["min_s"]

            def from_files():
                total = None
                for i in range(len(sf.shards)):
                    g = ops.clipped_gram(sf.read(i)[0], c)
                    total = g if total is None else total + g
                return total

            tm, _ = _timeit(from_files, args.repeats)
            table.append(
                {
                    "config": "single-process from the files",
                    "workers": 1,
                    **tm,
                    "rows_per_s_per_worker": n / tm["min_s"],
                    "vs_single": tm["min_s"] / base,
                }
            )

            def local_one_thread():  # the work of one Dask worker, in this process
                return R.reduce(R.Gram(c), sf, leaf_rows=args.leaf_rows, threads=1)

            tm, (g_local, partial) = _timeit(
                lambda: R.reduce(R.Gram(c), sf, leaf_rows=args.leaf_rows, return_partial=True),
                args.repeats,
            )
            table.append(
                {
                    "config": "local exact reduction",
                    "workers": 1,
                    **tm,
                    "rows_per_s_per_worker": n / tm["min_s"],
                    "vs_single": tm["min_s"] / base,
                }
            )

            tm, g_ops = _timeit(
                lambda: ops.clipped_gram(x_mem, c, leaf_rows=args.leaf_rows), args.repeats
            )
            if all(r % args.leaf_rows == 0 for r in sf.shard_rows[:-1]):
                assert np.array_equal(g_ops, g_local), "ops leaf_rows differs from the reduction"
            table.append(
                {
                    "config": "ops leaf_rows (in memory)",
                    "workers": 1,
                    **tm,
                    "rows_per_s_per_worker": n / tm["min_s"],
                    "vs_single": tm["min_s"] / base,
                }
            )

            # The exact merge's cost against the leaf compute, per leaf.
            layout = R.LeafLayout(sf.shard_rows, args.leaf_rows)
            stat = R.Gram(c)
            t_leaf = t_grid = 0.0
            acc = R._accumulator(stat, layout, None, d)  # noqa: SLF001 - what range_partial uses
            # As range_partial computes leaves: reused outputs, one triangle of the gram.
            with _cpu_stats.leaf_outputs():
                for leaf in range(layout.n_leaves):
                    xs, ys = sf.read(
                        int(layout.shard[leaf]), int(layout.start[leaf]), int(layout.stop[leaf])
                    )
                    t0 = time.perf_counter()
                    out = stat.leaf(xs, ys, None)
                    t1 = time.perf_counter()
                    acc.add(out, xs.shape[0], leaf)  # grid conversion and integer accumulation
                    t2 = time.perf_counter()
                    t_leaf += t1 - t0
                    t_grid += t2 - t1
            parts = [
                R.range_partial(stat, sf, layout, a, b)
                for a, b in layout.tasks(args.leaves_per_task)
            ]
            t0 = time.perf_counter()
            total = parts[0]
            for p in parts[1:]:
                total = total.merge(p)
            t_merge = time.perf_counter() - t0
            result["exact_merge"] = {
                "leaves": layout.n_leaves,
                "tasks": len(parts),
                "leaf_compute_s": t_leaf,
                "grid_and_accumulate_s": t_grid,
                "client_merge_s": t_merge,
                "fraction_of_leaf_compute": (t_grid + t_merge) / t_leaf,
            }
            result["partial_bytes"] = {
                "arrays": partial.nbytes,
                "pickled": len(pickle.dumps(partial)),
                "float64_statistic": d * d * 8,
            }

        tm, _ = _timeit(lambda: ops.clipped_gram(x_mem, c), args.repeats)
        table.append(
            {
                "config": "ops one pass, all BLAS threads",
                "workers": 1,
                **tm,
                "rows_per_s_per_worker": n / tm["min_s"],
                "vs_single": tm["min_s"] / base,
            }
        )

        def fit(client):
            est = models.DPFCClassifier(
                epsilon=1.0, steps=args.fit_steps, reg=10.0, classes=np.arange(k), random_state=3
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random_state=int: a PrivacyWarning
                return est.fit(sf, client=client)

        # No outer thread limit: the local path computes leaves side by side on threads
        # (each on one BLAS thread) and the client's solves use this process's BLAS
        # threads, as in the Dask fits below (a limit here would change the solves' bits).
        tm, fit_local = _timeit(lambda: fit(False), max(2, args.repeats // 2))
        table.append(
            {
                "config": f"fit dpfc local ({args.fit_steps} steps)",
                "workers": 1,
                **tm,
                "rows_per_s_per_worker": n * (args.fit_steps + 1) / tm["min_s"],
            }
        )
        w_grad = np.random.default_rng(1).standard_normal((k, d)) * 0.1
        for nw in workers:
            with (
                LocalCluster(
                    n_workers=nw,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                ) as cluster,
                Client(cluster) as client,
            ):
                client.wait_for_workers(nw)

                def run():
                    return dd.compute(
                        R.Gram(c),
                        sf,
                        client=client,
                        leaf_rows=args.leaf_rows,
                        leaves_per_task=args.leaves_per_task,
                    )

                assert np.array_equal(run(), g_local), "Dask result differs from the local one"
                paired = {"single": [], "files": [], "local1": [], "dask": []}
                busy = []  # the worker's time in the tasks, from Dask's task stream
                for _ in range(args.repeats):
                    with threadpool_limits(1):
                        paired["single"].append(
                            _timeit(lambda: ops.clipped_gram(x_mem, c), 1)[0]["min_s"]
                        )
                        paired["files"].append(_timeit(from_files, 1)[0]["min_s"])
                        paired["local1"].append(_timeit(local_one_thread, 1)[0]["min_s"])
                    with get_task_stream(client) as stream:
                        paired["dask"].append(_timeit(run, 1)[0]["min_s"])
                    busy.append(
                        sum(
                            ss["stop"] - ss["start"]
                            for task in stream.data
                            for ss in task["startstops"]
                            if ss["action"] == "compute"
                        )
                        / nw
                    )
                tm = {
                    "min_s": min(paired["dask"]),
                    "median_s": statistics.median(paired["dask"]),
                    "runs": paired["dask"],
                }
                table.append(
                    {
                        "config": f"dask gram {nw}w",
                        "workers": nw,
                        **tm,
                        "rows_per_s_per_worker": n / tm["min_s"] / nw,
                        "vs_single": tm["min_s"] / min(paired["single"]),
                        "vs_files": tm["min_s"] / min(paired["files"]),
                        "vs_local_1_thread": tm["min_s"] / min(paired["local1"]),
                        "interleaved_single_runs": paired["single"],
                        "interleaved_files_runs": paired["files"],
                        "interleaved_local_1_thread_runs": paired["local1"],
                        "worker_busy_s_per_worker": busy,
                    }
                )

                def grad_pass():
                    return dd.clipped_linear_grad(
                        sf,
                        w_grad,
                        0.0,
                        1.0,
                        client=client,
                        leaf_rows=args.leaf_rows,
                        leaves_per_task=args.leaves_per_task,
                    )

                grad_pass()
                tm, _ = _timeit(grad_pass, args.repeats)
                table.append(
                    {
                        "config": f"dpfc pass {nw}w (K={k})",
                        "workers": nw,
                        **tm,
                        "rows_per_s_per_worker": n / tm["min_s"] / nw,
                    }
                )

                tm, est = _timeit(lambda: fit(client), max(2, args.repeats // 2))
                assert est.coef_.tobytes() == fit_local.coef_.tobytes(), "Dask fit differs"
                table.append(
                    {
                        "config": f"fit dpfc {nw}w ({args.fit_steps} steps)",
                        "workers": nw,
                        **tm,
                        "rows_per_s_per_worker": n * (args.fit_steps + 1) / tm["min_s"] / nw,
                    }
                )

    print(
        f"bench_distributed: {n} x {d} float32 in {args.shards} shards, "
        f"leaf {args.leaf_rows} rows, "
        f"{args.leaves_per_task} leaves/task, {result['machine']['cores']} cores "
        f"({result['machine']['cpu']})"
    )
    print(
        f"{'configuration':34s} {'min s':>8s} {'median s':>9s} {'rows/s/worker':>14s} "
        f"{'x single':>9s} {'x files':>8s} {'x local 1t':>11s}"
    )
    for row in table:
        vs = f"{row['vs_single']:.2f}" if "vs_single" in row else ""
        vf = f"{row['vs_files']:.2f}" if "vs_files" in row else ""
        vl = f"{row['vs_local_1_thread']:.2f}" if "vs_local_1_thread" in row else ""
        print(
            f"{row['config']:34s} {row['min_s']:8.3f} {row['median_s']:9.3f} "
            f"{row['rows_per_s_per_worker']:14.0f} {vs:>9s} {vf:>8s} {vl:>11s}"
        )
    for row in table:
        if "worker_busy_s_per_worker" in row:
            idle = [1 - b / t for b, t in zip(row["worker_busy_s_per_worker"], row["runs"])]
            print(
                f"{row['config']}: each worker in its tasks for "
                f"{min(row['worker_busy_s_per_worker']):.3f} s (min); outside them "
                f"{100 * min(idle):.1f}-{100 * max(idle):.1f}% of the wall time"
            )
    em = result["exact_merge"]
    print(
        f"exact merge: grid conversion + accumulation {em['grid_and_accumulate_s']:.3f} s, client "
        f"merge of {em['tasks']} partials {em['client_merge_s']:.3f} s = "
        f"{100 * em['fraction_of_leaf_compute']:.1f}% of the leaf compute "
        f"({em['leaf_compute_s']:.3f} s, {em['leaves']} leaves)"
    )
    pb = result["partial_bytes"]
    print(
        f"partial: {pb['arrays']} bytes of arrays, {pb['pickled']} pickled "
        f"(the float64 statistic: {pb['float64_statistic']})"
    )
    print(f"open_sharded with SHA-256: {result['open_sharded']['MB_per_s']:.0f} MB/s")
    write_json(args.out or results_path(f"bench_distributed_{os.cpu_count()}core.json"), result)


if __name__ == "__main__":
    main()
