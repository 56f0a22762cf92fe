"""Helpers shared by the benchmark scripts (run as scripts: this folder is on sys.path)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import subprocess


def git_commit() -> str:
    """$DPFC_COMMIT when set (benchmarks/run_gpu_session.sh exports it: the device's copy of
    the working tree may carry a stale .git), else HEAD of the checkout the script lives in,
    else 'unknown'."""
    if os.environ.get("DPFC_COMMIT"):
        return os.environ["DPFC_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except Exception:
        pass
    return "unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def device_name(cp) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


@contextlib.contextmanager
def env_vars(**values: str):
    """Set environment variables for the block, then restore them. The kernel knobs (e.g.
    DPFC_GRAM_KERNEL) are read once into dpfc_native's kernel configuration: it is told to
    read the environment again on entry and on exit."""
    from dpfc_native import _config

    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    _config.reload()
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _config.reload()


def results_path(name: str) -> str:
    """``benchmarks/results/<name>``: where a benchmark writes its JSON by default."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def write_json(path: str, result, indent: int = 2) -> None:
    """Write ``result`` as JSON to ``path`` (making its folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=indent)
    print(f"wrote {path}")
