#!/usr/bin/env python3
"""Check a built dpfc-native wheel, and the installation made from it.

Usage (the wheel must already be installed in the running interpreter's environment)::

    python tools/check_wheel.py dist/dpfc_native-*.whl --flavour cuda
    python tools/check_wheel.py dist/dpfc_native-*.whl --flavour cpu

What it asserts, one line of output per check:

* the archive: the distribution's name and version, the metadata (SPDX license
  expression, license file, the ``cuda`` extra), every module of the source package and
  exactly one extension module, nothing else (no build junk: object files, CMake files,
  caches, bytecode), and a size gate per flavour;
* the extension's ELF ``NEEDED`` list holds only the C/C++ runtime (the CUDA runtime is
  static, the driver's ``libcuda.so.1`` is opened at run time), and no RPATH;
* in a fresh interpreter started outside the source tree: ``dpfc_native`` imports from
  site-packages, its ``_core`` is byte-identical to the wheel's, ``build_info()`` reports
  the intended flavour, CUDA architectures and CUDA major version;
* with no device visible (``CUDA_VISIBLE_DEVICES=""``; and in the plain environment too
  when no driver is installed) the import works and no device is counted;
* a native op (Philox4x32-10 against its published known-answer vector; symmetric
  Gaussian noise: symmetric, every element written, deterministic, variances within a
  5-sigma band) and a real private fit on the embedded digits data with sensible accuracy.

The expected CUDA architectures default to the release list of pyproject.toml beside this
script (``[tool.cibuildwheel] config-settings``), the build the wheel jobs make.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "dpfc_native"
DISTRIBUTION = "dpfc-native"

# The C and C++ runtime: everything else must be linked statically or dlopen'ed.
# libpthread/libdl/librt are separate libraries before glibc 2.34 (manylinux_2_28).
ALLOWED_NEEDED = {
    "libstdc++.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "libc.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
}
# Measured: 0.2 MB CPU-only, 5.4 MB with the release architecture list (five targets).
# The gates leave room to grow without letting a debug build or a stray library in.
SIZE_GATE_MB = {"cpu": 1.0, "cuda": 10.0}
# An installed-from-wheel file set: the package's modules, its stub, the extension, and
# the metadata scikit-build-core writes.
ALLOWED_EXTRA = re.compile(
    r"^(dpfc_native/_core\.pyi"
    r"|dpfc_native/_core\.[A-Za-z0-9_.-]+\.so"
    r"|dpfc_native-[^/]+\.dist-info/(METADATA|WHEEL|RECORD|entry_points\.txt|licenses/LICENSE))$"
)
# Philox4x32-10, counter 0, key 0 (the Random123 known-answer test).
PHILOX_KAT = ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8))

_results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    _results.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""), flush=True)
    return bool(ok)


def release_arches(pyproject: Path) -> list[str]:
    """The CUDA architecture list the wheel jobs pass to the build."""
    # A regular expression, not tomllib: the check also runs on Python 3.10.
    m = re.search(
        r'"cmake\.define\.DPFC_CUDA_ARCHITECTURES"\s*=\s*"([^"]*)"', pyproject.read_text()
    )
    if m is None:
        raise SystemExit(f"no DPFC_CUDA_ARCHITECTURES config-setting in {pyproject}")
    return [a for a in m.group(1).split(";") if a]


def check_archive(wheel: Path, flavour: str) -> tuple[bytes, str]:
    """Static checks of the wheel file; returns the extension's bytes and the version."""
    # name-version-python-abi-platform.whl (no build tag here)
    stem = wheel.name[: -len(".whl")].split("-")
    version, tags = stem[1], "-".join(stem[-3:])
    check("wheel name", len(stem) == 5 and stem[0] == PACKAGE, f"{wheel.name} (tag {tags})")
    size_mb = wheel.stat().st_size / 1e6
    check(
        "size gate",
        size_mb <= SIZE_GATE_MB[flavour],
        f"{size_mb:.2f} MB <= {SIZE_GATE_MB[flavour]} MB ({flavour})",
    )

    with zipfile.ZipFile(wheel) as zf:
        # auditwheel repair adds directory entries: not files, not junk.
        names = [n for n in zf.namelist() if not n.endswith("/")]
        meta = Parser().parsestr(zf.read(f"{PACKAGE}-{version}.dist-info/METADATA").decode())
        ext = [n for n in names if re.fullmatch(r"dpfc_native/_core\.[^/]+\.so", n)]
        ext_bytes = zf.read(ext[0]) if len(ext) == 1 else b""
    check("one extension module", len(ext) == 1, ", ".join(ext) or "none")

    check(
        "metadata name/version",
        meta["Name"] == DISTRIBUTION and meta["Version"] == version,
        f"{meta['Name']} {meta['Version']}",
    )
    check(
        "license metadata (PEP 639)",
        meta["License-Expression"] == "Apache-2.0"
        and meta.get_all("License-File") == ["LICENSE"]
        and f"{PACKAGE}-{version}.dist-info/licenses/LICENSE" in names,
        f"License-Expression {meta['License-Expression']}, "
        f"License-File {meta.get_all('License-File')}",
    )
    requires = meta.get_all("Requires-Dist") or []
    check(
        "cuda extra brings CuPy",
        any(r.startswith("cupy-cuda13x") and 'extra == "cuda"' in r for r in requires),
    )

    # Every module of the source package (subpackages included), its type stub and its
    # py.typed marker are in the wheel; nothing but the allowed rest.
    src = REPO / "python"
    expected = {
        p.relative_to(src).as_posix()
        for p in (src / PACKAGE).rglob("*")
        if p.suffix in (".py", ".pyi") or p.name == "py.typed"
        if "__pycache__" not in p.parts
    }
    missing = sorted(expected - set(names))
    check(
        "all package modules present",
        not missing and bool(expected),
        f"{len(expected)} modules" if not missing else f"missing {missing}",
    )
    junk = sorted(n for n in names if n not in expected and not ALLOWED_EXTRA.match(n))
    check("no build junk", not junk, f"{len(names)} files" if not junk else f"unexpected {junk}")
    return ext_bytes, version


def check_elf(ext_bytes: bytes) -> None:
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(BytesIO(ext_bytes))
    needed, rpaths = [], []
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag in ("DT_RPATH", "DT_RUNPATH"):
                    rpaths.append(getattr(tag, "rpath", None) or getattr(tag, "runpath", ""))
    extra = sorted(set(needed) - ALLOWED_NEEDED)
    check(
        "NEEDED is the C/C++ runtime only",
        not extra,
        ", ".join(needed) if not extra else f"also needs {extra}",
    )
    check("no RPATH/RUNPATH", not rpaths, ", ".join(rpaths))


# Run in a fresh interpreter from a temporary directory: prints one JSON object.
_PROBE = r"""
import hashlib, json, os, sys, warnings
import numpy as np
import dpfc_native
from dpfc_native import _core, ops, data
out = {"file": dpfc_native.__file__, "core_file": _core.__file__,
       "core_sha256": hashlib.sha256(open(_core.__file__, "rb").read()).hexdigest(),
       "sys_path0": sys.path[0], "info": dpfc_native.build_info()}
if "--full" in sys.argv:
    from importlib.metadata import distribution
    out["dist_version"] = distribution("dpfc-native").version
    counter, key, want = (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    out["philox_ok"] = tuple(_core.philox4x32_10(counter, key)) == want
    d, batch, std = 61, 3, 1.7  # odd size
    a = ops.sym_gaussian_noise(d, std, batch=batch, key=0x1234_5678_9ABC_DEF0_0FED, counter=5)
    b = ops.sym_gaussian_noise(d, std, batch=batch, key=0x1234_5678_9ABC_DEF0_0FED, counter=5)
    iu = np.triu_indices(d, 1)
    diag = np.concatenate([np.diagonal(m) for m in a])
    off = np.concatenate([m[iu] for m in a])
    # 5-sigma bands for the sample variance of n normals: var * (1 +- 5 sqrt(2/n)).
    def within(x, var):
        second_moment = float(np.mean(np.square(x, dtype=np.float64)))
        return abs(second_moment / var - 1) <= 5 * (2 / x.size) ** 0.5
    symmetric = bool(np.array_equal(a, np.swapaxes(a, 1, 2)))
    out["noise"] = {"shape": list(a.shape), "symmetric": symmetric,
                    "finite_nonzero": bool(np.isfinite(a).all() and np.count_nonzero(a) == a.size),
                    "deterministic": bool(np.array_equal(a, b)),
                    "diag_var_ok": within(diag, std ** 2), "off_var_ok": within(off, std ** 2 / 2)}
    train, test = data.digits_features()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = dpfc_native.DPFCClassifier(epsilon=8.0, delta=1e-5, classes=range(10),
                                         random_state=0, device="cpu")
        clf.fit(train.features, train.labels)
    out["fit"] = {"accuracy": float(clf.score(test.features, test.labels)),
                  "epsilon": float(clf.privacy_.epsilon), "n_train": int(len(train.labels))}
print(json.dumps(out))
"""


def probe(env_extra: dict[str, str], full: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(
            [sys.executable, "-c", _PROBE] + (["--full"] if full else []),
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
    if r.returncode != 0:
        check("import in a fresh interpreter", False, r.stderr.strip()[-2000:])
        raise SystemExit(1)
    return json.loads(r.stdout.strip().splitlines()[-1])


def driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path, help="the wheel file (installed from, into this Python)")
    ap.add_argument(
        "--flavour",
        choices=("cpu", "cuda"),
        required=True,
        help="cpu: built with DPFC_CUDA=OFF; cuda: with the CUDA kernels",
    )
    ap.add_argument(
        "--arches",
        help="expected CUDA architectures, ';'-separated "
        "(default: the release list in pyproject.toml)",
    )
    ap.add_argument("--cuda-major", type=int, default=13, help="expected CUDA major version")
    args = ap.parse_args(argv)
    wheel: Path = args.wheel.resolve()
    cuda = args.flavour == "cuda"
    print(f"check_wheel: {wheel.name} ({args.flavour}), Python {sys.version.split()[0]}")

    ext_bytes, version = check_archive(wheel, args.flavour)
    check_elf(ext_bytes)

    out = probe({}, full=True)
    info = out["info"]
    pkg_dir = Path(out["file"]).resolve().parent
    site = pkg_dir.parent
    check(
        "imports from site-packages, not the sources",
        site.name in ("site-packages", "dist-packages") and REPO not in pkg_dir.parents,
        str(pkg_dir),
    )
    check(
        "installed _core is the wheel's",
        out["core_sha256"] == hashlib.sha256(ext_bytes).hexdigest(),
        out["core_sha256"][:16],
    )
    check("installed version", out["dist_version"] == version == info["version"], version)

    check("flavour", info["cuda_compiled"] is cuda, f"cuda_compiled={info['cuda_compiled']}")
    if cuda:
        want = args.arches.split(";") if args.arches else release_arches(REPO / "pyproject.toml")
        want = [a for a in want if a]
        check("CUDA architectures", info["cuda_arches"] == want, ",".join(info["cuda_arches"]))
        rt = info["cuda_runtime_version"]
        check("CUDA major", rt is not None and rt // 1000 == args.cuda_major, f"runtime {rt}")
    else:
        check(
            "no CUDA in a CPU-only wheel",
            info["cuda_arches"] == []
            and info["cuda_runtime_version"] is None
            and info["cuda_devices"] == 0,
        )

    hidden = probe({"CUDA_VISIBLE_DEVICES": ""}, full=False)["info"]
    check(
        "no visible device: imports, counts none",
        hidden["cuda_devices"] == 0,
        f"cuda_devices={hidden['cuda_devices']}",
    )
    if driver_present():
        check(
            "devices with a driver",
            True,
            f"counted {info['cuda_devices']}, skipped {info['cuda_devices_skipped'] or 'none'}",
        )
    else:
        check(
            "no driver: imports, counts none",
            info["cuda_devices"] == 0,
            f"libcuda.so.1 absent, cuda_devices={info['cuda_devices']}",
        )

    check("native op: Philox4x32-10 known answer", out["philox_ok"])
    noise = out["noise"]
    check(
        "native op: symmetric Gaussian noise",
        all(
            noise[k]
            for k in ("symmetric", "finite_nonzero", "deterministic", "diag_var_ok", "off_var_ok")
        ),
        json.dumps(noise),
    )
    fit = out["fit"]
    check(
        "DP-FC fit on digits (epsilon 8)",
        fit["accuracy"] >= 0.85 and fit["epsilon"] <= 8.0 + 1e-9,
        f"test accuracy {fit['accuracy']:.3f} (gate 0.85), epsilon {fit['epsilon']:.4f}, "
        f"{fit['n_train']} training rows",
    )

    failed = [n for n, ok, _ in _results if not ok]
    # Worded so that it is not read as a test runner's closing line.
    print(
        f"check_wheel: {wheel.name}: "
        + (
            f"all {len(_results)} checks passed"
            if not failed
            else f"{len(failed)} of {len(_results)} checks FAILED: {', '.join(failed)}"
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
